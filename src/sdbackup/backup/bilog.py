"""Before-image (BI) logs: records of blocks as they were before an overwrite (a.2-a.7).

While a backup copies the shared disks, writers go on. Whoever overwrites a block of the
backup's block set first saves the block's old contents, its *before image*, in a log
(durably, before the overwrite reaches the disk). Writing the oldest before image of
every block over the copied data yields exactly the image at T0.

A log is one record stream (``media/record_format.py``) of BI records; each record
carries its disk, original block address, block count and logical time (Fig. 16), so a
log can be merged, overlaid or applied with no other file.

- :class:`BiLog` appends to one log file and keeps the index of what it holds.
  ``dedup=True`` makes it the seed's log manager (a.3): a run is stored only for the
  blocks that have no before image stored yet.
- :func:`merge_logs` gathers several logs (a.2), sorts their records by logical time
  and keeps the oldest per block.
- :func:`apply_log` writes a log onto a restored disk image.

Reading a log's entries and looking blocks up in it is the media layer's
(:mod:`sdbackup.media.bilog`); a generation's reader reads a log first where it was
not overlaid (c.5).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdbackup.blocks.blockset import BlockSet
from sdbackup.errors import CorruptError, UsageError
from sdbackup.media.bilog import BiEntry, read_entries
from sdbackup.media.record_format import Kind
from sdbackup.media.record_reader import RecordReader
from sdbackup.media.record_writer import RecordWriter


class BiLog:
    """One before-image log file being written."""

    def __init__(self, path: str | os.PathLike[str], *, block_size: int,
                 label: Mapping[str, Any] | None = None, dedup: bool = False) -> None:
        self.path = Path(path)
        self.block_size = block_size
        self.dedup = dedup
        self.writer = RecordWriter.create(self.path, label={"kind": "bilog", **(label or {})})
        self.entries: list[BiEntry] = []
        self.logged: dict[int, BlockSet] = {}
        self.bytes = 0

    def append(self, disk: int, start: int, data: bytes | memoryview, ltime: int
               ) -> list[tuple[int, int]]:
        """Log ``data`` as the before image of blocks starting at ``start``.

        Returns the runs actually stored (with ``dedup``, blocks logged before are
        skipped). Not durable until :meth:`sync`.
        """
        mv = memoryview(data).cast("B")
        bs = self.block_size
        if mv.nbytes == 0 or mv.nbytes % bs:
            raise UsageError(f"a before image must be whole blocks of {bs} bytes")
        count = mv.nbytes // bs
        have = self.logged.setdefault(disk, BlockSet())
        runs = [(start, count)]
        if self.dedup:
            runs = list((BlockSet.from_runs([(start, count)]) - have).runs())
        for s, n in runs:
            piece = mv[(s - start) * bs : (s - start + n) * bs]
            loc = self.writer.write_blocks(Kind.BI, disk, s, n, piece, logical_time=ltime)
            off, _ = loc.result()
            self.entries.append(BiEntry(disk, s, n, ltime, off, str(self.path)))
            have.add_run(s, n)
            self.bytes += n * bs
        return runs

    def sync(self) -> None:
        """Make everything appended so far durable."""
        self.writer.flush(fsync=True)

    def flush(self) -> None:
        """Hand everything appended so far to the operating system (it survives a crash
        of this process, not of the host)."""
        self.writer.flush(fsync=False)

    def close(self) -> None:
        self.writer.close(fsync=True)


@dataclass
class MergeStats:
    inputs: int = 0
    records_in: int = 0
    records_out: int = 0
    blocks_out: int = 0


def merge_logs(inputs: Iterable[str | os.PathLike[str]], out: str | os.PathLike[str], *,
               block_size: int, label: Mapping[str, Any] | None = None,
               allow_truncated: bool = False) -> MergeStats:
    """Merge BI logs (a.2, Fig. 5): sort by logical time, keep the oldest per block.

    Ties in logical time keep the input order. The output holds each block at most once.
    """
    stats = MergeStats()
    entries: list[BiEntry] = []
    for p in inputs:
        stats.inputs += 1
        entries.extend(read_entries(p, allow_truncated=allow_truncated))
    stats.records_in = len(entries)
    entries.sort(key=lambda e: e.ltime)  # stable: input order breaks ties
    readers: dict[str, RecordReader] = {}
    merged = BiLog(out, block_size=block_size, label=label, dedup=True)
    try:
        for e in entries:
            r = readers.get(e.path)
            if r is None:
                r = readers[e.path] = RecordReader(e.path)
            rec = r.read_at(e.offset)
            if rec.header.block_size != block_size:
                raise CorruptError(f"{e.path}: block size {rec.header.block_size} in a log "
                                   f"merged at block size {block_size}")
            stored = merged.append(e.disk, e.start, rec.data, e.ltime)
            stats.records_out += len(stored)
            stats.blocks_out += sum(n for _, n in stored)
        merged.close()
    except BaseException:
        merged.writer.abort()
        raise
    finally:
        for r in readers.values():
            r.close()
    return stats


def apply_log(log: str | os.PathLike[str], image: str | os.PathLike[str], *, disk_id: int,
              block_size: int | None = None) -> int:
    """Write every before image of ``disk_id`` from a (merged) log onto a disk image.

    The log needs no other file (a.7): each record says where its blocks go. Returns
    the number of blocks written. With several records for one block, the oldest
    logical time wins.
    """
    entries = sorted((e for e in read_entries(log) if e.disk == disk_id),
                     key=lambda e: -e.ltime)  # newest first, so the oldest is written last
    n = 0
    fd = os.open(image, os.O_WRONLY)
    try:
        with RecordReader(log) as r:
            for e in entries:
                rec = r.read_at(e.offset)
                bs = rec.header.block_size
                if block_size is not None and bs != block_size:
                    raise UsageError(f"the log's block size is {bs}, not {block_size}")
                os.pwrite(fd, rec.data, e.start * bs)
                n += e.count
        os.fsync(fd)
    finally:
        os.close(fd)
    return n
