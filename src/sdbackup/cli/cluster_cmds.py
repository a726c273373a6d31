"""Cluster-level commands: init, info, blocks, fsck.

Each command imports what it runs on when it runs (see :mod:`sdbackup.cli.main`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from sdbackup.errors import EXIT_CHECK_FAILED

CLUSTER_DIR = click.argument("cluster_dir", type=click.Path(path_type=Path))


def register(cli: click.Group) -> None:
    cli.add_command(init)
    cli.add_command(info)
    cli.add_command(blocks)
    cli.add_command(fsck)


@click.command()
@CLUSTER_DIR
@click.option("--disk", "disks", multiple=True, required=True, metavar="NAME=PATH[:SIZE]",
              help="A shared disk: a file or block device. A file that does not exist is "
                   "created sparse with SIZE (e.g. 4GiB). Repeat for several disks.")
@click.option("--block-size", default=4096, show_default=True,
              help="Block size in bytes: a power of two, 512 to 1 MiB.")
@click.option("--force", is_flag=True,
              help="Use disks that hold data or belong to another cluster (destroys them).")
def init(cluster_dir: Path, disks: tuple[str, ...], block_size: int, force: bool) -> None:
    """Create a cluster in CLUSTER_DIR with its shared disks.

    Writes a readable config (cluster.toml), the metadata store, and a random secret
    (readable by its owner only) that nodes use to authenticate.
    """
    from sdbackup.cluster.local import DiskSpec, init_cluster

    specs = [DiskSpec.parse(d) for d in disks]
    cfg = init_cluster(cluster_dir, specs, block_size=block_size, force=force)
    click.echo(f"created cluster {cfg.cluster_id} in {cluster_dir}")
    for d in cfg.disks:
        click.echo(f"  disk {d.name}: {d.path}" + ("" if d.direct else
                   "  (single-host: its file system refuses direct I/O, so only "
                   "processes on this host can use it)"))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n}"


@click.command()
@CLUSTER_DIR
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def info(cluster_dir: Path, as_json: bool) -> None:
    """Show disks, block size, blocks used/free per disk, files and directories."""
    from sdbackup.cluster.access import try_coordinator_client
    from sdbackup.cluster.config import load_config
    from sdbackup.cluster.local import open_cluster
    from sdbackup.net import messages as msg

    rc = try_coordinator_client(cluster_dir)
    if rc is not None:
        with rc:
            data = msg.call(rc, msg.Info())[0]
        for d in data["disks"]:
            d["free"] = d["blocks"] - d["used"]
        data.update(cluster_dir=str(cluster_dir), cluster_id=load_config(cluster_dir).cluster_id)
        _print_info(cluster_dir, data, as_json)
        return
    with open_cluster(cluster_dir) as c:
        bs = c.config.block_size
        disks: list[dict[str, object]] = []
        for d in c.config.disks:
            bm = c.meta.bitmaps[d.id]
            used = bm.used_blocks()
            disks.append({"name": d.name, "id": d.id, "path": d.path, "blocks": bm.nblocks,
                          "used": used, "free": bm.nblocks - used,
                          "shared": c.disks.device(d.id).direct})
        files = int(c.store.get_val("SELECT COUNT(*) FROM inodes WHERE (mode & 61440) = 32768"))
        dirs = int(c.store.get_val("SELECT COUNT(*) FROM inodes WHERE (mode & 61440) = 16384"))
        links = int(c.store.get_val("SELECT COUNT(*) FROM inodes WHERE (mode & 61440) = 40960"))
        data = {"cluster_dir": str(c.dir), "cluster_id": c.config.cluster_id, "block_size": bs,
                "disks": disks, "files": files, "directories": dirs, "symlinks": links}
    _print_info(cluster_dir, data, as_json)


def _print_info(cluster_dir: Path, data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    bs = int(data["block_size"])
    disks = data["disks"]
    click.echo(f"cluster     {data['cluster_id']}  ({cluster_dir})")
    click.echo(f"block size  {bs}")
    click.echo(f"files       {data['files']}   directories {data['directories']}   "
               f"symlinks {data['symlinks']}")
    click.echo(f"{'disk':<12} {'blocks':>12} {'used':>12} {'free':>12}  {'size':>10}  "
               f"{'access':<11}  path")
    for row in disks:
        nb = int(str(row["blocks"]))
        access = "shared" if row.get("shared", True) else "single-host"
        click.echo(f"{row['name']!s:<12} {nb:>12} {row['used']!s:>12} {row['free']!s:>12}  "
                   f"{_human(nb * bs):>10}  {access:<11}  {row['path']}")
    if any(not row.get("shared", True) for row in disks):
        click.echo("single-host: the disk's file system refuses direct I/O; nodes on other "
                   "hosts cannot join")


@click.command()
@CLUSTER_DIR
@click.option("--disk", "disk_name", help="Only this disk (default: all disks).")
@click.option("--used", is_flag=True, required=True,
              help="List the used blocks (from the allocation bitmap), as runs.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: {disk: [[start, count]...]}.")
def blocks(cluster_dir: Path, disk_name: str | None, used: bool, as_json: bool) -> None:
    """Print the used-block list as runs: one 'DISK START COUNT' line per run.

    This is the list a full backup copies (the seed's Fig. 19), in runs of contiguous
    blocks (Fig. 24).
    """
    from sdbackup.cluster.access import try_coordinator_client
    from sdbackup.cluster.config import load_config
    from sdbackup.cluster.local import open_cluster
    from sdbackup.net import messages as msg

    rc = try_coordinator_client(cluster_dir)
    if rc is not None:
        cfg = load_config(cluster_dir)
        wanted = [cfg.disk(disk_name)] if disk_name else cfg.disks
        with rc:
            out = {d.name: [tuple(r) for r in msg.call(rc, msg.UsedRuns(d.name))[0]["runs"]]
                   for d in wanted}
    else:
        with open_cluster(cluster_dir) as c:
            wanted = [c.config.disk(disk_name)] if disk_name else c.config.disks
            out = {d.name: c.meta.used_runs(d.id) for d in wanted}
    if as_json:
        click.echo(json.dumps(out))
        return
    lines = [f"{name} {s} {n}" for name, runs in out.items() for s, n in runs]
    if lines:
        click.echo("\n".join(lines))


@click.command()
@CLUSTER_DIR
@click.option("--json", "as_json", is_flag=True, help="Print problems as JSON.")
def fsck(cluster_dir: Path, as_json: bool) -> None:
    """Check the metadata: every invariant, one check each; exit 1 on problems.

    Checks that extents lie inside their disks, no block belongs to two files, every
    extent's blocks are marked used, no used block is unreferenced, sizes agree with
    extents, directory entries and link counts are right, and every directory is
    reachable from the root.
    """
    from sdbackup.cluster.access import try_coordinator_client
    from sdbackup.cluster.local import open_store
    from sdbackup.meta import fsck as fsck_mod
    from sdbackup.net import messages as msg

    rc = try_coordinator_client(cluster_dir)
    if rc is not None:  # the running coordinator checks its own store
        with rc:
            problems = [fsck_mod.Problem(c, m) for c, m in msg.call(rc, msg.Fsck())[0]["problems"]]
    else:
        with open_store(cluster_dir) as store:  # not open_cluster: it would purge orphans
            problems = fsck_mod.check_all(store)
    if as_json:
        click.echo(json.dumps([{"check": p.check, "message": p.message} for p in problems]))
    else:
        for p in problems:
            click.echo(f"{p.check}: {p.message}")
        click.echo(f"fsck: {len(problems)} problem(s) found" if problems
                   else f"fsck: {cluster_dir} is consistent "
                        f"({len(fsck_mod.CHECKS)} checks passed)")
    if problems:
        raise SystemExit(EXIT_CHECK_FAILED)

