"""Cache coherence at the coordinator: who may cache and who may dirty which area (a.1).

The seed's cluster cache table (Fig. 3) keeps, per cached area, the computer, the file,
the area's offset and size, and whether it is dirty. Here an *area* is one segment of a
file (``SEGMENT_BYTES``, 1 MiB), and the table holds each node's right on it:

- ``r`` (shared): the node may cache the segment's data for reading;
- ``w`` (exclusive): the node may also dirty it in its write-back cache.

Granting ``w`` to one node first *recalls* the segment from every other holder: the
coordinator asks them to write back what is dirty and drop it, and waits until they
have. The seed says "discard"; an acknowledged write must never be lost, so holders
write back first. Granting ``r`` recalls only a writer, which writes back and keeps a
read right. A read therefore always sees the latest acknowledged write in the cluster.

Logical time (the seed's clock unit 33): every ``w`` grant carries the next value of a
cluster-wide counter. Writes to one segment are serialised by these grants: a grant
happens only after the previous writer wrote its dirty data back, so the grant order is
the order in which the segment's contents reach the disk. A node stamps each write-back
with (grant sequence, local counter); comparing stamps orders writes to one area as
the disk saw them, which is what "keep the oldest before-image" needs (issue 6).

Developer note (what must stay adjacent): acquisitions of one inode are serialised
(``_busy``). Between picking the conflicting holders and granting, the coordinator waits
for recalls *without* holding ``_cond``; it re-checks after the recalls, because a
holder may have released or died meanwhile. A node never holds its local segment lock
while it waits for ``acquire``, so a recall can always make progress.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sdbackup.errors import FsError, SdbError
from sdbackup.fs.segments import SEGMENT_BYTES

log = logging.getLogger("sdbackup.cluster")

# recall(node, ino, segs, keep) asks one node to write back the segments and keep
# only right ``keep`` ("r") or nothing (None). It raises when the node cannot answer.
RecallFn = Callable[[str, int, list[int], str | None], None]
# fence(node, why) declares a node that did not answer failed and returns only once
# it can certainly no longer write (its lease ran out) and its rights were dropped
# (by a call to node_failed). Until then nothing it holds may be given to another.
FenceFn = Callable[[str, str], None]


@dataclass
class SegState:
    writer: str | None = None
    readers: set[str] = field(default_factory=set)
    dirty: bool = False
    seq: int = 0  # logical time of the last write grant


@dataclass(frozen=True)
class CacheEntry:
    """One row of the cluster cache table: contiguous segments with the same state."""

    node: str
    ino: int
    offset: int
    size: int
    mode: str
    dirty: bool


class FrozenError(SdbError):
    pass


class RecallFailed(FsError):
    """Nodes answered a recall of ``ino`` but could not write it back (their data
    stays with them, dirty). Its errno is the first node's."""

    def __init__(self, ino: int, refused: list[tuple[str, FsError]]) -> None:
        node, first = refused[0]
        super().__init__(first.errno or errno.EIO,
                         f"node {node.partition('#')[0]} cannot write back inode {ino}: "
                         f"{first.what or first.strerror}")
        self.ino = ino
        self.refused = refused


class RightsManager:
    """The table of rights and the grant/recall protocol."""

    def __init__(self, recall: RecallFn, fence: FenceFn) -> None:
        self._recall = recall
        self._fence = fence
        self._cond = threading.Condition()
        self._table: dict[int, dict[int, SegState]] = {}
        self._busy: set[int] = set()
        self._frozen = False
        self._freezer_waiting = 0
        self._clock = 0
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="recall")

    # -- logical clock ----------------------------------------------------------------
    def tick(self) -> int:
        with self._cond:
            self._clock += 1
            return self._clock

    @property
    def clock(self) -> int:
        return self._clock

    # -- acquisition --------------------------------------------------------------------
    def _enter(self, ino: int, for_write: bool) -> None:
        with self._cond:
            while ino in self._busy or (for_write and (self._frozen or self._freezer_waiting)):
                self._cond.wait()
            self._busy.add(ino)

    def _leave(self, ino: int) -> None:
        with self._cond:
            self._busy.discard(ino)
            self._cond.notify_all()

    def acquire(self, node: str, ino: int, segs: Iterable[int], mode: str) -> int:
        """Give ``node`` right ``mode`` ('r' or 'w') on the segments; returns the grant seq.

        Blocks while the cluster is frozen (for 'w') and while other holders are
        recalled. A holder that cannot be reached is declared failed (its rights go).
        """
        if mode not in ("r", "w"):
            raise ValueError(mode)
        segs = sorted(set(segs))
        self._enter(ino, mode == "w")
        try:
            while True:
                conflicts = self._conflicts(node, ino, segs, mode)
                if not conflicts:
                    break
                self._recall_all(ino, conflicts, keep="r" if mode == "r" else None)
            with self._cond:
                table = self._table.setdefault(ino, {})
                seq = 0
                if mode == "w":
                    self._clock += 1
                    seq = self._clock
                for s in segs:
                    st = table.setdefault(s, SegState())
                    if mode == "w":
                        st.writer = node
                        st.readers.discard(node)
                        st.seq = seq
                    elif st.writer != node:
                        st.readers.add(node)
                return seq
        finally:
            self._leave(ino)

    def _conflicts(self, node: str, ino: int, segs: list[int],
                   mode: str) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        with self._cond:
            table = self._table.get(ino, {})
            for s in segs:
                st = table.get(s)
                if st is None:
                    continue
                if st.writer is not None and st.writer != node:
                    out.setdefault(st.writer, []).append(s)
                if mode == "w":
                    for r in st.readers:
                        if r != node:
                            out.setdefault(r, []).append(s)
        return out

    def _recall_all(self, ino: int, conflicts: dict[str, list[int]], keep: str | None,
                    ) -> None:
        """Recall in parallel; apply each node's answer to the table.

        A node that answers that it could not write the file back (FsError: no space,
        a disk error) keeps its right and its data, and :class:`RecallFailed` tells
        the caller; only a node that does not answer at all is fenced.
        """
        refused: list[tuple[str, FsError]] = []

        def one(node: str, segs: list[int]) -> None:
            try:
                self._recall(node, ino, segs, keep)
            except FsError as e:  # it answered: this file cannot be written back now
                refused.append((node, e))
                return
            except Exception as e:  # any other failure: the node is gone
                # Fencing first: its rights go only once it certainly cannot write.
                self._fence(node, f"did not answer a recall of inode {ino}: {e}")
                self.node_failed(node)
                return
            self.released(node, ino, segs, keep=keep)

        futures = [self._pool.submit(one, n, s) for n, s in conflicts.items()]
        for f in futures:
            f.result()
        if refused:
            raise RecallFailed(ino, refused)

    def exclusive(self, ino: int, *, strict: bool = True) -> _Exclusive:
        """Recall every right on ``ino`` from every node and hold new grants off.

        Used before freeing an inode's blocks (unlink of the last name, truncate), so
        that no node writes a block after it was freed and perhaps reused. ``strict``
        (truncate): a node that cannot write the file back fails the operation.
        Otherwise (unlink, rename over, last close: the data may go, as POSIX allows)
        such a node keeps its right; once the inode is freed its write-back finds the
        file gone and writes nothing.
        """
        return _Exclusive(self, ino, strict)

    def segments_of(self, node: str, ino: int) -> list[int]:
        """The segments of ``ino`` on which ``node`` holds a right."""
        with self._cond:
            return sorted(s for s, st in self._table.get(ino, {}).items()
                          if st.writer == node or node in st.readers)

    def recall_inode(self, ino: int, strict: bool = True) -> list[str]:
        with self._cond:
            table = self._table.get(ino, {})
            conflicts: dict[str, list[int]] = {}
            for s, st in table.items():
                for n in ([st.writer] if st.writer else []) + sorted(st.readers):
                    conflicts.setdefault(n, []).append(s)
        refused: list[str] = []
        if conflicts:
            try:
                self._recall_all(ino, conflicts, keep=None)
            except RecallFailed as e:
                if strict:
                    raise
                log.warning("%s; going on without that data (the file is being removed)",
                            e.what)
                refused = [node for node, _ in e.refused]
        with self._cond:
            if ino in self._table and not any(
                st.writer or st.readers for st in self._table[ino].values()
            ):
                del self._table[ino]
        return refused

    # -- reports from nodes ------------------------------------------------------------------
    def released(self, node: str, ino: int, segs: Iterable[int], keep: str | None = None
                 ) -> None:
        """``node`` no longer holds the segments (or holds only 'r' when keep='r')."""
        with self._cond:
            table = self._table.get(ino)
            if not table:
                return
            for s in segs:
                st = table.get(s)
                if st is None:
                    continue
                if st.writer == node:
                    st.writer = None
                    st.dirty = False
                    if keep == "r":
                        st.readers.add(node)
                if keep is None:
                    st.readers.discard(node)
                if st.writer is None and not st.readers:
                    del table[s]
            if not table:
                del self._table[ino]
            self._cond.notify_all()

    def set_dirty(self, node: str, ino: int, segs: Iterable[int], dirty: bool) -> None:
        with self._cond:
            table = self._table.get(ino, {})
            for s in segs:
                st = table.get(s)
                if st is not None and st.writer == node:
                    st.dirty = dirty
            self._cond.notify_all()

    def writers(self, ino: int) -> list[str]:
        """Nodes holding a write right on any segment of ``ino`` (one dict lookup: this
        runs on every getattr)."""
        with self._cond:
            return sorted({st.writer for st in self._table.get(ino, {}).values()
                           if st.writer is not None})

    def dirty_holders(self, ino: int, exclude: str | None = None) -> list[str]:
        with self._cond:
            return sorted({st.writer for st in self._table.get(ino, {}).values()
                           if st.dirty and st.writer and st.writer != exclude})

    def any_dirty(self) -> bool:
        with self._cond:
            return any(st.dirty for t in self._table.values() for st in t.values())

    def wait_clean(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while any(st.dirty for t in self._table.values() for st in t.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def node_failed(self, node: str) -> list[CacheEntry]:
        """Drop every right of a failed (fenced) node; returns the areas it had dirty.

        Only for a node that can no longer write (see FenceFn); idempotent."""
        lost = [e for e in self.table() if e.node == node and e.dirty]
        with self._cond:
            for ino in list(self._table):
                table = self._table[ino]
                for s in list(table):
                    st = table[s]
                    if st.writer == node:
                        st.writer = None
                        st.dirty = False
                    st.readers.discard(node)
                    if st.writer is None and not st.readers:
                        del table[s]
                if not table:
                    del self._table[ino]
            self._cond.notify_all()
        return lost

    def holds(self, node: str) -> bool:
        with self._cond:
            return any(st.writer == node or node in st.readers
                       for t in self._table.values() for st in t.values())

    # -- the table --------------------------------------------------------------------------------
    def table(self) -> list[CacheEntry]:
        """The cluster cache table, contiguous segments with equal state merged."""
        rows: list[tuple[str, int, int, str, bool]] = []
        with self._cond:
            for ino, t in self._table.items():
                for s, st in t.items():
                    if st.writer:
                        rows.append((st.writer, ino, s, "w", st.dirty))
                    for r in st.readers:
                        rows.append((r, ino, s, "r", False))
        rows.sort()
        out: list[CacheEntry] = []
        for node, ino, s, mode, dirty in rows:
            if out:
                p = out[-1]
                if (p.node, p.ino, p.mode, p.dirty) == (node, ino, mode, dirty) and \
                        p.offset + p.size == s * SEGMENT_BYTES:
                    out[-1] = CacheEntry(node, ino, p.offset, p.size + SEGMENT_BYTES, mode, dirty)
                    continue
            out.append(CacheEntry(node, ino, s * SEGMENT_BYTES, SEGMENT_BYTES, mode, dirty))
        return out

    # -- freeze (the instant T0 of a backup) ---------------------------------------
    def freeze(self) -> None:
        """Hold new write grants and take every write right back (dirty data written).

        When this returns, no node holds a write right and nothing is dirty anywhere:
        the shared disks hold every acknowledged write.
        """
        with self._cond:
            self._freezer_waiting += 1
            try:
                while self._frozen or any(self._busy_writes()):
                    self._cond.wait()
                self._frozen = True
            finally:
                self._freezer_waiting -= 1
        try:
            while True:
                with self._cond:
                    writers: dict[int, dict[str, list[int]]] = {}
                    for ino, t in self._table.items():
                        for s, st in t.items():
                            if st.writer:
                                writers.setdefault(ino, {}).setdefault(st.writer,
                                                                      []).append(s)
                if not writers:
                    return
                for ino, conflicts in writers.items():
                    self._recall_all(ino, conflicts, keep="r")
        except BaseException:
            self.thaw()  # a node could not write back: no T0, writes go on
            raise

    def _busy_writes(self) -> list[int]:
        return list(self._busy)

    def thaw(self) -> None:
        with self._cond:
            self._frozen = False
            self._cond.notify_all()

    @property
    def frozen(self) -> bool:
        return self._frozen

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Exclusive:
    def __init__(self, mgr: RightsManager, ino: int, strict: bool) -> None:
        self.mgr = mgr
        self.ino = ino
        self.strict = strict

    def __enter__(self) -> list[str]:
        self.mgr._enter(self.ino, False)
        try:
            return self.mgr.recall_inode(self.ino, self.strict)
        except BaseException:
            self.mgr._leave(self.ino)
            raise

    def __exit__(self, *exc: object) -> None:
        self.mgr._leave(self.ino)
