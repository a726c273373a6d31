"""``sdbackup mount``: a backup generation (or all of them) as a read-only file system."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sdbackup.cli.tape_cmds import reads_tape, tape_read_options
from sdbackup.errors import EXIT_USAGE, SdbError, UsageError

if TYPE_CHECKING:
    from sdbackup.restore.mount import MountSource

log = logging.getLogger("sdbackup.mount")


def register(cli: click.Group) -> None:
    cli.add_command(mount)


@click.command()
@click.option("--medium", "medium", multiple=True, metavar="DIR",
              type=click.Path(path_type=Path),
              help="The backup medium (a directory); or --tape DEV --buffer DIR, or "
                   "--tape-server HOST:PORT --secret-file FILE. Repeat it for generations "
                   "whose parts lie on several media (backup --copy-nodes): the first is "
                   "where they were committed.")
@click.argument("args", nargs=-1, required=True, metavar="[GEN] MOUNTPOINT")
@click.option("--all", "all_gens", is_flag=True,
              help="Mount every generation of the medium, one directory each (named by "
                   "T0 and id), plus 'latest'; new generations appear without a remount.")
@click.option("--log-medium", type=click.Path(path_type=Path),
              help="Where separate before-image logs are (default: where the backup wrote "
                   "them); needed only for generations made with --log-mode separate and "
                   "not overlaid.")
@click.option("--background", is_flag=True,
              help="Return once the mount works, serving it from a background process; "
                   "'sdbackup umount MOUNTPOINT' ends it.")
@click.option("--log-file", type=click.Path(path_type=Path),
              help="With --background: where the mount's log goes (default: a file in the "
                   "temporary directory, printed at start).")
@tape_read_options
def mount(medium: tuple[Path, ...], args: tuple[str, ...], all_gens: bool,
          log_medium: Path | None, background: bool, log_file: Path | None,
          tapes: tuple[str, ...], catalog_dir: Path | None, buffer_dir: Path | None,
          buffer_size: str, readahead: int, tape_server: str | None,
          secret_file: Path | None) -> None:
    """Mount a backup as a read-only file system: browse it, copy files back.

    GEN is a generation id or a unique prefix (default: the newest). An incremental
    reads through its chain, each block from the newest generation that holds it, and
    a before-image log that was not overlaid is read first. Needs only the medium: no
    cluster, no coordinator. Changes fail with 'Read-only file system'. A damaged
    record makes reads of the files that use it fail with an I/O error (the log names
    the generation, disk, blocks and medium offset); other files stay readable.

    Runs in the foreground until unmounted ('sdbackup umount MOUNTPOINT', or Ctrl-C),
    or with --background returns once the mount works.

    With --tape DEV --buffer DIR, the generation is read from a tape set (the catalog
    says where each block lies): only the blocks read are loaded from tape into the
    buffer, with read-ahead, and kept there for the next mount. On a host without a
    drive, --tape-server HOST:PORT --secret-file FILE reads it through the buffer of
    the host that has one ('sdbackup tape serve').
    """
    from sdbackup.fs import fuse_mount
    from sdbackup.restore import mount as mount_mod

    if all_gens:
        if len(args) != 1:
            raise UsageError("with --all, give only the MOUNTPOINT (no GEN)")
        gen, mp = None, args[0]
    elif len(args) == 1:
        gen, mp = None, args[0]
    elif len(args) == 2:
        gen, mp = args
    else:
        raise UsageError("give [GEN] MOUNTPOINT")
    fuse_mount.check_fuse()
    mp = fuse_mount.check_mountpoint(mp)

    if reads_tape(medium, tapes, tape_server, buffer_dir, secret_file):
        from sdbackup.cli.tape_cmds import open_tape_set

        if all_gens:
            raise UsageError("--tape and --tape-server mount one generation: give no --all")

        def from_tape() -> MountSource:
            return mount_mod.open_tape_generation(
                lambda: open_tape_set(tapes, buffer_dir, catalog_dir, buffer_size,
                                      readahead, tape_server, secret_file), gen)

        src = from_tape()  # resolves GEN and checks the tapes now, not in the child
        gen = src.manifest.id if src.manifest else gen
        where = (f"tape server {tape_server}" if tape_server is not None else
                 f"tape {' '.join(tapes)} (buffer {buffer_dir})")
        if not background:
            mount_mod.serve(src, mp, on_ready=lambda p: click.echo(
                f"mounted generation {gen} from {where} at {p} (read-only); "
                f"'sdbackup umount {p}' ends it", err=True))
            return
        src.close()
        if log_file is None:
            fd, tmp = tempfile.mkstemp(prefix="sdbackup-mount.", suffix=".log")
            os.close(fd)
            log_file = Path(tmp)
        _background(from_tape, mp, log_file, f"generation {gen}", where)
        return
    def opened() -> MountSource:
        if all_gens:
            return mount_mod.open_all(medium, log_medium=log_medium)
        return mount_mod.open_generation(medium, gen, log_medium=log_medium)

    if not all_gens:
        gen = mount_mod.resolve(medium, gen).id  # a clear error now, not in the child
    what = "every generation" if all_gens else f"generation {gen}"
    if not background:
        src = opened()  # errors (no medium, a damaged snapshot) before mounting
        mount_mod.serve(src, mp, on_ready=lambda p: click.echo(
            f"mounted {what} of {medium[0]} at {p} (read-only); 'sdbackup umount {p}' "
            "ends it", err=True))
        return
    if log_file is None:
        fd, tmp = tempfile.mkstemp(prefix="sdbackup-mount.", suffix=".log")
        os.close(fd)
        log_file = Path(tmp)
    _background(opened, mp, log_file, what, medium[0])


def _background(opened: Callable[[], MountSource], mp: str, log_file: Path, what: str,
                where: Path | str) -> None:
    """Fork; the child serves the mount, the parent returns once it works (or fails)."""
    from sdbackup.restore import mount as mount_mod

    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no threads exist yet (nothing opened before the fork)
        os.close(r)
        code = 0
        try:
            os.setsid()
            out = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.close(null)
            os.close(out)
            for h in logging.getLogger().handlers:
                if isinstance(h, logging.StreamHandler):
                    h.setStream(sys.stderr)
            if logging.getLogger().level > logging.INFO:
                logging.getLogger().setLevel(logging.INFO)

            def ready(p: str) -> None:
                os.write(w, b"ok\n")
                os.close(w)

            mount_mod.serve(opened(), mp, on_ready=ready)
        except SdbError as e:
            _tell(w, f"{e.exit_code} {e.message}")
            code = e.exit_code
        except BaseException as e:  # the parent must hear of it, whatever it is
            log.exception("the mount failed")
            _tell(w, f"1 {e}")
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        answer = f.read().decode(errors="replace").strip()
    if answer == "ok":
        click.echo(f"mounted {what} of {where} at {mp} (read-only), served by process "
                   f"{pid}; log: {log_file}; 'sdbackup umount {mp}' ends it")
        return
    code_s, _, message = answer.partition(" ")
    if not answer:
        message = f"the mount process {pid} ended before the mount worked (see {log_file})"
    raise SdbError(message, int(code_s) if code_s.isdigit() else EXIT_USAGE)


def _tell(w: int, text: str) -> None:
    try:
        os.write(w, text.replace("\n", " ").encode())
        os.close(w)
    except OSError:
        pass  # already told it worked, and the pipe is closed
