"""The command-line side of a dispersed backup (``sdbackup backup --copy-nodes``, a.12).

:func:`parse_backup_media` reads the ``--medium`` options (one DIR, and NODE=DIR per
copy node that has a medium of its own); :func:`run_dispersed` asks the coordinator to
run the backup and, while it runs, shows each copier's progress from the coordinator's
``status`` (a bar per copier on a terminal, a line every few seconds otherwise).
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

from sdbackup.errors import SdbError, UsageError
from sdbackup.net import messages as msg
from sdbackup.net.rpc import RpcClient

_NODE_MEDIUM = re.compile(r"^([A-Za-z0-9_.-]+)=(.+)$")
LINE_EVERY = 5.0
"""Seconds between two progress lines when stderr is not a terminal."""


def parse_backup_media(media: tuple[str, ...], copy_nodes: str | None
                       ) -> tuple[Path, dict[str, str], list[str] | None]:
    """(the medium that commits the generation, each copy node's own medium, the copy
    nodes or None). A NODE=DIR medium needs --copy-nodes and a node named there."""
    copiers = None
    if copy_nodes is not None:
        copiers = [n.strip() for n in copy_nodes.split(",") if n.strip()]
        if not copiers:
            raise UsageError("--copy-nodes names no node: give N1,N2,...")
    plain: list[str] = []
    node_media: dict[str, str] = {}
    for text in media:
        m = _NODE_MEDIUM.match(text)
        if m is not None and "/" not in m.group(1):
            node, where = m.group(1), m.group(2)
            if copiers is None:
                raise UsageError(f"--medium {text}: a medium for node {node} goes with "
                                 "--copy-nodes")
            if node not in copiers:
                raise UsageError(f"--medium {text}: {node} is not one of the copy nodes "
                                 f"({', '.join(copiers)})")
            if node in node_media:
                raise UsageError(f"--medium: node {node} is given two media")
            node_media[node] = str(Path(where).absolute())
        else:
            plain.append(text)
    if len(plain) != 1:
        raise UsageError("give exactly one --medium DIR (where the generation is committed)"
                         + (" and NODE=DIR for copy nodes with a medium of their own"
                            if copiers else "") + f"; got {len(plain)}")
    return Path(plain[0]), node_media, copiers


def run_dispersed(rc: RpcClient, base: msg.Backup, copiers: list[str],
                  node_media: dict[str, str], no_reassign: bool, split: str, part_size: str,
                  *, quiet: bool) -> dict[str, Any]:
    """Run the dispersed backup on the coordinator; show progress per copier."""
    from sdbackup.cluster.config import parse_size

    try:
        part_bytes = parse_size(part_size)
    except (ValueError, SdbError) as e:
        raise UsageError(f"--part-size {part_size!r}: {e}") from None
    request = msg.Backup.decode({**base.to_wire(), "copy_nodes": copiers,
                                 "node_media": node_media, "no_reassign": no_reassign,
                                 "split": split, "part_bytes": part_bytes})
    result: dict[str, Any] = {}
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.update(msg.call(rc, request, timeout=None)[0])
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=run, name="sdb-backup-call", daemon=True)
    t.start()
    show = _Shower(quiet)
    try:
        while t.is_alive():
            t.join(0.5)
            if t.is_alive() and show.enabled:
                try:
                    st = msg.call(rc, msg.Status(), timeout=10)[0].get("dispersed")
                except SdbError:
                    st = None
                if isinstance(st, dict):
                    show.update(st)
    finally:
        show.close()
    if error:
        raise error[0]
    return result


class _Shower:
    """Per-copier progress: rich bars on a terminal, a line now and then otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.enabled = not quiet
        self.tty = sys.stderr.isatty()
        self._last = 0.0
        self._bars: Any = None
        self._tasks: dict[str, Any] = {}

    def update(self, st: dict[str, Any]) -> None:
        copiers = st.get("copiers", [])
        if self.tty:
            if self._bars is None:
                from rich.progress import (
                    BarColumn,
                    DownloadColumn,
                    Progress,
                    TextColumn,
                    TransferSpeedColumn,
                )

                self._bars = Progress(TextColumn("{task.description}"), BarColumn(),
                                      DownloadColumn(), TransferSpeedColumn(), transient=True)
                self._bars.start()
                self._tasks["*"] = self._bars.add_task("backup", total=st["bytes_total"])
            self._bars.update(self._tasks["*"], completed=st["bytes_done"])
            for c in copiers:
                name = c["node"]
                if name not in self._tasks:
                    self._tasks[name] = self._bars.add_task(f"  {name}", total=None)
                self._bars.update(self._tasks[name], completed=c["bytes_done"],
                                  description=f"  {name} ({c['state']})")
            return
        now = time.monotonic()
        if now - self._last < LINE_EVERY:
            return
        self._last = now
        total = max(1, int(st.get("bytes_total", 0)))
        parts = ", ".join(f"{c['node']} {c['bytes_done'] >> 20} MiB {c['state']}"
                          for c in copiers)
        click.echo(f"backup {st.get('generation')}: {100 * st.get('bytes_done', 0) // total}% "
                   f"({st.get('parts_done')}/{st.get('parts')} parts): {parts}", err=True)

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
