"""``sdbackup fs CLUSTER_DIR ...``: the file system for scripts (copy in/out, inspect).

The cluster's modules are imported when a subcommand runs, in :func:`_fs` (see
:mod:`sdbackup.cli.main`).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sdbackup.cli.progress import ByteProgress
from sdbackup.errors import FsError, UsageError

if TYPE_CHECKING:
    from sdbackup.fs.filesystem import FileSystem
    from sdbackup.meta.types import Attr


def register(cli: click.Group) -> None:
    cli.add_command(fs)


@click.group()
@click.argument("cluster_dir", type=click.Path(path_type=Path))
@click.option("--wait", default=10.0, show_default=True,
              help="Seconds to wait while another sdbackup command holds the cluster.")
@click.option("--node", "node_name", metavar="NAME",
              help="Go through this running node agent (and its cache).")
@click.pass_context
def fs(ctx: click.Context, cluster_dir: Path, wait: float, node_name: str | None) -> None:
    """Copy files in and out of the cluster file system and inspect it.

    Paths inside the cluster are absolute ('/dir/file'). With a coordinator running,
    the command joins it as a short-lived client (coherent with every node's cache);
    with --node NAME it goes through that node agent; with no coordinator running, it
    opens the cluster itself and holds its lock until it is done.
    """
    ctx.obj = {"dir": cluster_dir, "wait": wait, "node": node_name}


def _set_wait(ctx: click.Context, _param: click.Parameter, value: float | None) -> None:
    if value is not None:
        ctx.obj["wait"] = value


# The same --wait on every subcommand ('fs DIR ls --wait 1'), overriding 'fs --wait'.
_wait_option = click.option(
    "--wait", type=float, default=None, expose_value=False, callback=_set_wait,
    metavar="SECONDS", help="Seconds to wait while another sdbackup command holds the cluster "
    "(default 10).")


def _set_node(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.obj["node"] = value


# The same --node on every subcommand ('fs DIR ls --node n1'), like --wait.
_node_option = click.option(
    "--node", type=str, default=None, expose_value=False, callback=_set_node,
    metavar="NAME", help="Go through this running node agent (and its cache).")


@contextmanager
def _fs(ctx: click.Context) -> Iterator[FileSystem]:
    from sdbackup.cluster.access import open_fs

    with open_fs(ctx.obj["dir"], node=ctx.obj["node"], wait=ctx.obj["wait"]) as f:
        yield f


@fs.command()
@click.argument("src", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.argument("dest")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@_wait_option
@_node_option
@click.pass_context
def put(ctx: click.Context, src: tuple[Path, ...], dest: str, quiet: bool) -> None:
    """Copy local files or trees SRC... to cluster path DEST (like cp -a)."""
    from sdbackup.fs import transfer

    for s in src:
        if not s.exists() and not s.is_symlink():
            raise UsageError(f"{s} does not exist")
    total = sum(_local_size(s) for s in src)
    with _fs(ctx) as f, ByteProgress("put", total, quiet=quiet) as prog:
        if len(src) > 1 and not f.resolve(dest).is_dir:
            raise UsageError(f"{dest} is not a directory (needed for several sources)")
        for s in src:
            transfer.put(f, s, dest, prog.advance)


def _local_size(p: Path) -> int:
    if p.is_symlink() or not p.is_dir():
        return p.lstat().st_size if p.is_file() and not p.is_symlink() else 0
    return sum(q.lstat().st_size for q in p.rglob("*") if q.is_file() and not q.is_symlink())


@fs.command()
@click.argument("src", nargs=-1, required=True)
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@_wait_option
@_node_option
@click.pass_context
def get(ctx: click.Context, src: tuple[str, ...], dest: Path, quiet: bool) -> None:
    """Copy cluster paths SRC... to local DEST (like cp -a)."""
    from sdbackup.fs import transfer

    if len(src) > 1 and not dest.is_dir():
        raise UsageError(f"{dest} is not a directory (needed for several sources)")
    if not dest.parent.exists():
        raise UsageError(f"{dest.parent} does not exist")
    with _fs(ctx) as f, ByteProgress("get", None, quiet=quiet) as prog:
        for s in src:
            transfer.get(f, s, dest, prog.advance)


def _mode_str(mode: int) -> str:
    return stat.filemode(mode)


def _ls_line(name: str, a: Attr) -> str:
    t = time.strftime("%Y-%m-%d %H:%M", time.localtime(a.mtime_ns / 1e9))
    return f"{_mode_str(a.mode)} {a.nlink:>3} {a.uid:>5} {a.gid:>5} {a.size:>12} {t} {name}"


@fs.command()
@click.argument("path", default="/")
@click.option("-l", "long", is_flag=True, help="Long listing (mode, links, owner, size, time).")
@_wait_option
@_node_option
@click.pass_context
def ls(ctx: click.Context, path: str, long: bool) -> None:
    """List a directory (or show one file)."""
    with _fs(ctx) as f:
        a = f.resolve(path)
        entries = [(os.fsdecode(e.name), e.attr) for e in f.listdir(a.ino)] if a.is_dir \
            else [(path.rstrip("/").rpartition("/")[2], a)]
        for name, attr in sorted(entries):
            if long:
                suffix = f" -> {os.fsdecode(f.readlink(attr.ino))}" if attr.is_link else ""
                click.echo(_ls_line(name, attr) + suffix)
            else:
                click.echo(name + ("/" if attr.is_dir else ""))


@fs.command()
@click.argument("path")
@_wait_option
@_node_option
@click.pass_context
def cat(ctx: click.Context, path: str) -> None:
    """Write a file's contents to standard output."""
    from sdbackup.fs import transfer

    with _fs(ctx) as f:
        a = f.resolve(path)
        if a.is_dir:
            raise FsError(errno.EISDIR, f"{path} is a directory")
        out = sys.stdout.buffer
        off = 0
        while off < a.size:
            data = f.read(a.ino, off, transfer.CHUNK)
            if not data:
                break
            out.write(data)
            off += len(data)
        out.flush()


@fs.command()
@click.argument("path")
@click.option("-p", "--parents", is_flag=True, help="Create parents; no error if it exists.")
@click.option("-m", "--mode", default="755", show_default=True, help="Octal mode.")
@_wait_option
@_node_option
@click.pass_context
def mkdir(ctx: click.Context, path: str, parents: bool, mode: str) -> None:
    """Create a directory."""
    try:
        m = int(mode, 8)
    except ValueError:
        raise UsageError(f"mode {mode!r} is not octal, e.g. 755") from None
    with _fs(ctx) as f:
        if not parents:
            parent, name = f.split(path)
            f.mkdir(parent.ino, name, m)
            return
        cur = f.resolve("/")
        for part in [p for p in os.fsencode(path).split(b"/") if p]:
            try:
                cur = f.lookup(cur.ino, part)
                if not cur.is_dir:
                    raise FsError(errno.ENOTDIR, f"{os.fsdecode(part)} is not a directory")
            except FsError as e:
                if e.errno != errno.ENOENT:
                    raise
                cur = f.mkdir(cur.ino, part, m)


@fs.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("-r", "--recursive", is_flag=True, help="Remove directories and their contents.")
@click.option("-f", "--force", is_flag=True, help="No error when a path does not exist.")
@_wait_option
@_node_option
@click.pass_context
def rm(ctx: click.Context, paths: tuple[str, ...], recursive: bool, force: bool) -> None:
    """Remove files (and with -r, directories)."""
    with _fs(ctx) as f:
        for p in paths:
            try:
                parent, name = f.split(p)
                a = f.lookup(parent.ino, name)
            except FsError as e:
                if force and e.errno == errno.ENOENT:
                    continue
                raise
            if a.is_dir:
                if not recursive:
                    raise FsError(errno.EISDIR, f"{p} is a directory (use -r)")
                _rmtree(f, parent.ino, name)
            else:
                f.unlink(parent.ino, name)


def _rmtree(f: FileSystem, parent: int, name: bytes) -> None:
    a = f.lookup(parent, name)
    for ent in list(f.listdir(a.ino)):
        if ent.attr.is_dir:
            _rmtree(f, a.ino, ent.name)
        else:
            f.unlink(a.ino, ent.name)
    f.rmdir(parent, name)


@fs.command()
@click.argument("src")
@click.argument("dest")
@_wait_option
@_node_option
@click.pass_context
def mv(ctx: click.Context, src: str, dest: str) -> None:
    """Rename or move SRC to DEST (atomically replaces an existing file)."""
    with _fs(ctx) as f:
        sp, sn = f.split(src)
        try:
            d = f.resolve(dest)
            if d.is_dir:
                dp, dn = d, sn
            else:
                dp, dn = f.split(dest)
        except FsError as e:
            if e.errno != errno.ENOENT:
                raise
            dp, dn = f.split(dest)
        f.rename(sp.ino, sn, dp.ino, dn)


@fs.command(name="stat")
@click.argument("path")
@click.option("--extents", is_flag=True, help="Also list the file's extents (disk block runs).")
@_wait_option
@_node_option
@click.pass_context
def stat_cmd(ctx: click.Context, path: str, extents: bool) -> None:
    """Show a file's attributes (and where its blocks are)."""
    with _fs(ctx) as f:
        a = f.resolve(path, follow=False)
        for k, v in a.to_dict().items():
            if k == "mode":
                v = f"{v:o} ({_mode_str(v)})"
            click.echo(f"{k:<9} {v}")
        if a.is_link:
            click.echo(f"target    {os.fsdecode(f.readlink(a.ino))}")
        if extents and a.is_reg:
            from sdbackup.cluster.config import load_config
            names = {d.id: d.name for d in load_config(ctx.obj["dir"]).disks}
            for e in f.meta.map_read(a.ino, 0, (a.size + f.bs - 1) // f.bs):
                disk = names.get(e.disk, str(e.disk))
                click.echo(f"extent    file {e.fblock}+{e.length} -> {disk}:{e.dblock}")
