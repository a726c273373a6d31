"""Reading before-image logs: their entries, and which record holds a block.

A before-image log is a record stream of BI records (see
:mod:`sdbackup.media.record_format`), each carrying its disk, original block address,
block count and logical time (a.7, Fig. 16). Writing, merging and applying logs is the
backup layer's (:mod:`sdbackup.backup.bilog`); reading them is needed wherever a
generation is read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from sdbackup.blocks.blockset import BlockSet
from sdbackup.errors import CorruptError
from sdbackup.media.record_format import Kind, StreamTruncatedError
from sdbackup.media.record_reader import RecordReader


@dataclass(frozen=True)
class BiEntry:
    """One BI record: blocks [start, start+count) of ``disk`` at logical time ``ltime``,
    stored at byte ``offset`` of log file ``path``."""

    disk: int
    start: int
    count: int
    ltime: int
    offset: int
    path: str


def read_entries(path: str | os.PathLike[str], *, allow_truncated: bool = False
                 ) -> list[BiEntry]:
    """The BI records of a log file (headers only). A log whose writer died is read up
    to its last intact record when ``allow_truncated``."""
    out: list[BiEntry] = []
    with RecordReader(path) as r:
        try:
            for rec in r.scan(payloads=False, require_end=not allow_truncated):
                h = rec.header
                if h.kind == Kind.BI:
                    out.append(BiEntry(h.disk_id, h.start_block, h.block_count,
                                       h.logical_time, rec.offset, os.fspath(path)))
        except StreamTruncatedError:
            if not allow_truncated:
                raise
    return out


class LogIndex:
    """Block → log record lookup over logs that hold each block at most once."""

    def __init__(self, entries: Iterable[BiEntry]) -> None:
        per_disk: dict[int, list[BiEntry]] = {}
        for e in entries:
            per_disk.setdefault(e.disk, []).append(e)
        self._disks: dict[int, tuple[np.ndarray, np.ndarray, list[BiEntry]]] = {}
        for disk, ents in per_disk.items():
            ents.sort(key=lambda e: e.start)
            starts = np.array([e.start for e in ents], dtype=np.int64)
            ends = starts + np.array([e.count for e in ents], dtype=np.int64)
            if len(ents) > 1 and np.any(starts[1:] < ends[:-1]):
                raise CorruptError(f"log index of disk {disk}: a block is logged twice "
                                   "(merge the logs first)")
            self._disks[disk] = (starts, ends, ents)

    def lookup(self, disk: int, block: int, count: int) -> list[BiEntry]:
        """Entries overlapping [block, block+count), in block order."""
        got = self._disks.get(disk)
        if got is None:
            return []
        starts, ends, ents = got
        i = int(np.searchsorted(ends, block, side="right"))
        out = []
        while i < len(ents) and starts[i] < block + count:
            out.append(ents[i])
            i += 1
        return out

    def blocks(self, disk: int) -> BlockSet:
        got = self._disks.get(disk)
        return BlockSet.from_runs((e.start, e.count) for e in got[2]) if got else BlockSet()

    def __len__(self) -> int:
        return sum(len(v[2]) for v in self._disks.values())
