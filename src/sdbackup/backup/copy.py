"""The copier: used blocks from the live disks to a record stream, in large sequential I/O.

Reading, checksumming/compressing and writing overlap:

* a **reader thread** walks each disk's plan as coalesced batches
  (:meth:`BlockSet.coalesced_runs`: runs merged across gaps of at most ``gap_bytes``,
  so that blocks of different files go in one read, capped at ``batch_bytes``) and
  fills a small ring of reused, page-aligned buffers with one ``preadv`` per batch;
* the **calling thread** cuts every batch into records holding only used blocks (the
  gap blocks that were read through are not stored), at most ``record_bytes`` each,
  and hands them to :class:`~sdbackup.media.record_writer.RecordWriter`, whose thread
  pool compresses and checksums them while earlier records are written in order. The
  records are read-only views of the ring buffer, not copies: a buffer goes back to
  the reader only once every record cut from it is written (the last one's future is
  done: records complete in order).

Python work is per batch and per record, never per block.
"""

from __future__ import annotations

import collections
import mmap
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from sdbackup.blocks.blockset import BlockSet
from sdbackup.blocks.source import BlockSource
from sdbackup.media.record_format import Kind
from sdbackup.media.record_writer import RecordLocation, RecordWriter
from sdbackup.types import DiskId

MiB = 1 << 20
BATCH_BYTES = 8 * MiB
RECORD_BYTES = 1 * MiB
GAP_BYTES = 128 << 10
BUFFERS = 6


@dataclass
class CopyResult:
    """What was stored: one row per DATA record, and counters."""

    disk: list[int] = field(default_factory=list)
    start: list[int] = field(default_factory=list)
    count: list[int] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)
    blocks: int = 0
    read_bytes: int = 0
    batches: int = 0

    @property
    def records(self) -> int:
        return len(self.disk)


class Copier:
    """Copies planned blocks into one record stream (one copier per stream)."""

    def __init__(
        self,
        disks: BlockSource,
        block_size: int,
        writer: RecordWriter,
        *,
        batch_bytes: int = BATCH_BYTES,
        record_bytes: int = RECORD_BYTES,
        gap_bytes: int = GAP_BYTES,
        buffers: int = BUFFERS,
        progress: Callable[[int], None] | None = None,
        after_batch: Callable[[int], None] | None = None,
        bwlimit: int = 0,
        pace: Callable[[float], float] | None = None,
    ) -> None:
        self.disks = disks
        self.bs = block_size
        self.writer = writer
        self.batch_blocks = max(1, batch_bytes // block_size)
        self.record_blocks = max(1, min(record_bytes, batch_bytes) // block_size)
        self.gap_blocks = gap_bytes // block_size
        self.nbuffers = max(2, buffers)
        self.progress = progress
        self.after_batch = after_batch
        self.bwlimit = bwlimit  # bytes read per second at most (0: as fast as it goes)
        # Adaptive pacing: given how long a batch took to read, how long to rest.
        self.pace = pace

    def copy(self, plan: Mapping[int, BlockSet]) -> CopyResult:
        bs = self.bs
        size = self.batch_blocks * bs
        maps = [mmap.mmap(-1, size) for _ in range(self.nbuffers)]
        views = [memoryview(m) for m in maps]
        free: queue.Queue[int] = queue.Queue()
        for i in range(self.nbuffers):
            free.put(i)
        full: queue.Queue[tuple[int, int, int, int] | BaseException | None] = queue.Queue()
        stop = threading.Event()
        result = CopyResult()

        def reader() -> None:
            started = time.monotonic()
            done = 0
            try:
                for disk_id, blocks in plan.items():
                    if not blocks:
                        continue
                    did = DiskId(disk_id)
                    for start, count in blocks.coalesced_runs(self.gap_blocks,
                                                              self.batch_blocks):
                        bi = free.get()
                        if stop.is_set():
                            return
                        t_read = time.monotonic()
                        self.disks.readinto(did, start, views[bi][: count * bs])
                        t_read = time.monotonic() - t_read
                        full.put((disk_id, start, count, bi))
                        done += count * bs
                        if self.pace is not None:
                            rest = self.pace(t_read)
                            if rest > 0:
                                stop.wait(rest)
                        if self.bwlimit:
                            # --bwlimit: never ahead of the allowed rate; the disks'
                            # other users (writers during an online backup) get the rest.
                            ahead = done / self.bwlimit - (time.monotonic() - started)
                            if ahead > 0:
                                stop.wait(ahead)
                full.put(None)
            except BaseException as e:  # handed to the copying thread
                full.put(e)

        t = threading.Thread(target=reader, name="sdb-copy-reader", daemon=True)
        t.start()
        pending: collections.deque[Future[RecordLocation]] = collections.deque()
        # Buffers whose records are not all written yet: (buffer, its last record).
        lent: collections.deque[tuple[int, Future[RecordLocation] | None]] = \
            collections.deque()

        def give_back(wait: bool) -> None:
            while lent and (wait or lent[0][1] is None or lent[0][1].done()):
                bi, last = lent.popleft()
                if last is not None:
                    last.exception()  # waits; a failed write is raised from pending below
                free.put(bi)
                wait = False

        runs = {d: b.runs_array() for d, b in plan.items()}
        try:
            while True:
                give_back(wait=False)
                if len(lent) == self.nbuffers:
                    # The reader needs a buffer to go on: write out what is queued (the
                    # writer writes finished records only when handed more) and wait.
                    self.writer.flush()
                    give_back(wait=True)
                item = full.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                disk_id, bstart, bcount, bi = item
                before = len(pending)
                used = self._write_batch(disk_id, bstart, bcount, views[bi].toreadonly(),
                                         runs[disk_id], result, pending)
                lent.append((bi, pending[-1] if len(pending) > before else None))
                while pending and pending[0].done():
                    result.offset.append(pending.popleft().result().offset)
                result.read_bytes += bcount * bs
                result.batches += 1
                if self.progress is not None:
                    self.progress(used * bs)
                if self.after_batch is not None:
                    self.after_batch(result.batches)
            self.writer.flush()
            while pending:
                result.offset.append(pending.popleft().result().offset)
        finally:
            stop.set()
            for i in range(self.nbuffers):  # wake a reader waiting for a buffer
                free.put(i)
            t.join()
            for v in views:
                v.release()
            for m in maps:
                try:
                    m.close()
                except BufferError:  # a slice lives on in an exception's traceback
                    pass
        return result

    def _write_batch(self, disk_id: int, bstart: int, bcount: int, buf: memoryview,
                     runs: np.ndarray, result: CopyResult,
                     pending: collections.deque[Future[RecordLocation]]) -> int:
        """Write the used runs inside one batch as records; returns the blocks written."""
        bs = self.bs
        bend = bstart + bcount
        starts = runs[:, 0]
        ends = starts + runs[:, 1]
        i0 = int(np.searchsorted(ends, bstart, side="right"))
        i1 = int(np.searchsorted(starts, bend, side="left"))
        seg_s = np.maximum(starts[i0:i1], bstart).tolist()
        seg_e = np.minimum(ends[i0:i1], bend).tolist()
        rb = self.record_blocks
        write = self.writer.write_blocks
        used = 0
        for s, e in zip(seg_s, seg_e, strict=True):
            for ps in range(s, e, rb):
                pc = min(rb, e - ps)
                lo = (ps - bstart) * bs
                pending.append(write(Kind.DATA, disk_id, ps, pc, buf[lo : lo + pc * bs]))
                result.disk.append(disk_id)
                result.start.append(ps)
                result.count.append(pc)
            used += e - s
        result.blocks += used
        return used
