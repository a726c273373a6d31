"""The coordinator's side of an online backup: the window between T0 and the end of
the copy, during which overwrites of the backup's blocks need before images.

During the freeze the coordinator arms a :class:`BackupWindow` with the block set B
(every block in use at T0). From then on, every ``map_write`` a node asks for is split
at B's boundaries, and the parts inside B carry a logical time (``bi_time``): the node
must save their before images durably before it overwrites them.

Log modes (``sdbackup backup --log-mode``):

- ``merged`` (a.2): each node keeps a temporary log of its own; after the copy the
  coordinator gathers them and keeps the oldest per block. A node that dies with its
  log loses the backup: the window is marked failed.
- ``central`` (a.3): nodes send each before image to the coordinator at once; the
  log manager stores it unless that block is stored already (so later writers of a
  block are not even asked).
- ``inline`` (a.4): as central, but the log is part of the backup medium and the copy
  skips the blocks already logged (the log control set).
- ``separate`` (a.5): as central, the log on a separate log medium, so that the
  backup medium is written strictly sequentially (a tape).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sdbackup.backup.bilog import BiLog
from sdbackup.blocks.blockset import BlockSet
from sdbackup.errors import SdbError
from sdbackup.meta.types import WriteRun

LOG_MODES = ("merged", "central", "inline", "separate")

log = logging.getLogger("sdbackup.backup")


class BackupWindow:
    """Which blocks still need before images, and where those go."""

    def __init__(self, gen_id: str, mode: str, blocks: dict[int, BlockSet],
                 log: BiLog | None) -> None:
        if mode not in LOG_MODES:
            raise ValueError(mode)
        self.gen_id = gen_id
        self.mode = mode
        self.blocks = blocks
        self.log = log  # the log manager's log (None in merged mode)
        self.asked: set[str] = set()  # merged: nodes that were told to log something
        self.failed: str | None = None
        self.closed = False
        self.lock = threading.Lock()
        self.bi_runs = 0

    @property
    def central(self) -> bool:
        return self.mode != "merged"

    def logged(self, disk: int) -> BlockSet:
        if self.log is None:
            return BlockSet()
        with self.lock:
            return self.log.logged.get(disk, BlockSet()).copy()

    def fail(self, reason: str) -> None:
        """Abort this backup (it will not commit), never the writers: from now on no
        overwrite needs a before image, and the partial log is thrown away."""
        with self.lock:
            if self.failed is None:
                self.failed = reason
                log.error("backup %s aborted, the writes go on: %s", self.gen_id, reason)
            self.closed = True
            if self.log is not None:
                self.log.writer.abort()
                self.log.path.unlink(missing_ok=True)

    def split(self, node: str, runs: list[WriteRun], tick: Callable[[], int]) -> list[WriteRun]:
        """Split write runs at the block set's boundaries; mark the parts that need a
        before image with one fresh logical time."""
        if self.failed is not None:
            return runs  # the backup is aborted: no more before images
        out: list[WriteRun] = []
        ltime = 0
        for r in runs:
            b = self.blocks.get(r.disk)
            if b is None or not b.intersects_run(r.dblock, r.length):
                out.append(r)
                continue
            need = BlockSet.from_runs([(r.dblock, r.length)]) & b
            if self.log is not None:
                need -= self.logged(r.disk)
            if not need:
                out.append(r)
                continue
            if not ltime:
                ltime = tick()
            pos = r.dblock
            end = r.dblock + r.length
            for s, n in need.runs():
                if s > pos:
                    out.append(_piece(r, pos, s - pos, 0))
                out.append(_piece(r, s, n, ltime))
                pos = s + n
            if pos < end:
                out.append(_piece(r, pos, end - pos, 0))
        if ltime:
            with self.lock:
                self.asked.add(node)
                self.bi_runs += sum(1 for r in out if r.bi_time)
        return out

    def put(self, items: list[tuple[int, int, bytes, int]]) -> int:
        """The log manager: store before images unless stored already; on return they
        are out of the writer's hands (see the comment below on durability). Returns the
        number of blocks stored."""
        if self.log is None:
            raise ValueError("no log manager in merged mode")
        stored = 0
        with self.lock:
            if self.closed:
                return 0  # the copy is finished: later overwrites need no before image
            try:
                for disk, start, data, ltime in items:
                    for _, n in self.log.append(disk, start, data, ltime):
                        stored += n
                # Written to the operating system, not fsynced: a crash that could lose
                # it (of the coordinator's host) also aborts the backup, and the log is
                # fsynced when the window closes, before the generation can commit.
                self.log.flush()
                return stored
            except (OSError, SdbError) as e:  # a full or broken log medium
                reason = (f"the before-image log at {self.log.path} could not be "
                          f"written ({e}); the backup was aborted, the writes went on")
        self.fail(reason)
        return 0


    def close(self) -> None:
        """End of the window (after the copy): the log is closed; puts still in flight
        are accepted and dropped, as their overwrites come after the copy."""
        with self.lock:
            if self.failed is not None:
                return  # fail() threw the log away
            self.closed = True
            if self.log is not None:
                try:
                    self.log.close()
                except (OSError, SdbError) as e:
                    reason = f"the before-image log could not be completed ({e})"
                else:
                    return
        self.fail(reason)


def _piece(r: WriteRun, dblock: int, n: int, bi_time: int) -> WriteRun:
    off = dblock - r.dblock
    return WriteRun(r.fblock + off, n, r.disk, dblock, r.new, bi_time)
