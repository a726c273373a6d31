"""The ``sdbackup`` command: one entry point, one error handler.

A :class:`~sdbackup.errors.SdbError` becomes one line on stderr and its exit code; a
POSIX error from the file system becomes one line naming the path; anything else is a
bug and keeps its traceback.

Start-up stays light (issue 11): every command module is loaded to build the command
tree (``sdbackup --help`` lists them all), so at load a command module imports only
click, the standard library, :mod:`sdbackup.errors` and :mod:`sdbackup.cli.progress`.
Each command imports the modules it runs on inside its function (numpy, zstandard
and pyroaring come with them; rich only when a progress bar is shown), and names
their types for annotations under ``TYPE_CHECKING``. ``tests/test_cli_startup.py`` checks it.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import sys

import click

from sdbackup import __version__
from sdbackup.errors import (
    EXIT_CORRUPT,
    EXIT_NO_SPACE,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    FsError,
    SdbError,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sdbackup")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """sdbackup: a shared-disk cluster file system with online block-level image backup.

    A cluster is a directory (config, metadata store, secret) plus one or more shared
    disks. Start with 'sdbackup init', copy files in with 'sdbackup fs put', inspect
    with 'sdbackup info' and 'sdbackup blocks --used', check with 'sdbackup fsck'.
    'sdbackup demo' shows the whole product working on a throw-away cluster.
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _register() -> None:
    from sdbackup.cli import (
        backup_cmds,
        cluster_cmds,
        daemon_cmds,
        demo,
        fs_cmds,
        group_cmds,
        mount_cmds,
        tape_cmds,
    )

    cluster_cmds.register(cli)
    backup_cmds.register(cli)
    daemon_cmds.register(cli)
    fs_cmds.register(cli)
    mount_cmds.register(cli)
    group_cmds.register(cli)
    demo.register(cli)
    tape_cmds.register(cli)


_register()


# POSIX errors from ``sdbackup fs`` that have an exit code of their own; others are 2.
_FS_EXIT = {errno.ENOENT: EXIT_NOT_FOUND, errno.ENOSPC: EXIT_NO_SPACE}


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    try:
        cli.main(args=argv, prog_name="sdbackup", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("sdbackup: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except SdbError as e:
        click.echo(f"sdbackup: error: {e.message}", err=True)
        sys.exit(e.exit_code)
    except FsError as e:
        what = e.what or os.strerror(e.errno or 0)
        click.echo(f"sdbackup: error: {what} ({os.strerror(e.errno or 0)})", err=True)
        sys.exit(_FS_EXIT.get(e.errno or 0, EXIT_USAGE))
    except sqlite3.DatabaseError as e:  # a metadata store SQLite cannot read
        click.echo(f"sdbackup: error: a metadata store is damaged ({e}): restore the "
                   "cluster from a backup with 'sdbackup restore-cluster'", err=True)
        sys.exit(EXIT_CORRUPT)
    except KeyboardInterrupt:
        click.echo("sdbackup: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    sys.exit(0)


if __name__ == "__main__":
    main()
