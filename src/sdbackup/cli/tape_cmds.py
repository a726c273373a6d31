"""``sdbackup tape ...``: blank, label, write, list and catalog tapes.

A tape is named ``file:PATH`` (a file-backed tape) or by the path of a Linux ``st``
device (``/dev/nst0``) wherever a tape is accepted. The disk catalog (where each
generation's blocks lie on which tape) is a directory, ``--catalog DIR``, by default
``$SDBACKUP_TAPE_CATALOG`` or ``~/.local/share/sdbackup/tape-catalog``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from sdbackup.errors import UsageError


def register(cli: click.Group) -> None:
    cli.add_command(tape)


@click.group()
def tape() -> None:
    """Tapes: blank (file-backed), label, write generations to, list, catalog."""


@tape.command("create")
@click.argument("spec", metavar="file:PATH")
@click.option("--capacity", required=True, metavar="SIZE",
              help="How much the tape holds (e.g. 12TB is LTO-8; 4GiB for a test).")
@click.option("--force", is_flag=True, help="Erase an existing file at PATH.")
def create(spec: str, capacity: str, force: bool) -> None:
    """Make a blank file-backed tape at PATH (its time model: an LTO-8-class drive)."""
    from sdbackup.cluster.config import parse_size
    from sdbackup.media.tape.device import FILE_PREFIX
    from sdbackup.media.tape.filetape import FileTape

    if not spec.startswith(FILE_PREFIX):
        raise UsageError(f"{spec}: only a file-backed tape (file:PATH) can be created; a "
                         "real tape is blank when it comes out of its box")
    path = Path(spec[len(FILE_PREFIX):])
    FileTape.create(path, parse_size(capacity.replace("TB", "T").replace("GB", "G")),
                    force=force)
    with FileTape.open(path) as t:
        click.echo(f"created a blank tape: {t.describe()}")


def _json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))
