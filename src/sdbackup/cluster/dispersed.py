"""The copy manager of a dispersed backup on the coordinator (seed a.12, Fig. 27).

``sdbackup backup CLUSTER_DIR --copy-nodes n1,n2 --medium DIR [--medium n1=DIR1 ...]``:
the coordinator freezes once (T0 is the whole cluster's, as for any backup), lists the
plan, arms the before-image window, thaws, and then, instead of copying itself, hands
the plan to :class:`DispersedCopier` (the engine's
:class:`~sdbackup.backup.parts.PartCopier`):

1. the plan is cut into parts (``backup/parts.py: split_plan``: ranges balanced by
   used blocks, or whole disks), each with its stream number;
2. one dispatcher thread per copier node gives it one part at a time (``copy_part``:
   the part's blocks, its stream number, the node's medium) and waits for its
   ``part_done``; parts go to whichever copier is free, so a faster copier takes more;
3. a copier that dies, is fenced, or reports a failure loses its part: the part goes
   back to the front of the queue with a new attempt number (its own file name: a
   fenced copier that still writes cannot touch it) and another copier takes it; with
   ``--no-reassign`` the backup fails instead. Either way the freeze is not repeated:
   the window stays open until the last part is done, so before images keep covering
   every overwrite;
4. once every part is reported durable, the engine writes the index (every part's
   rows) and commits the generation on the coordinator's medium, manifest last.

A failed or aborted dispersed copy tells every copier to stop and remove what it wrote
(``part_cancel``); the engine marks the generation failed. Progress per copier is in
:meth:`DispersedCopier.status` (``sdbackup status`` and the backup's progress output).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdbackup.backup.engine import BackupFailed, BackupOptions
from sdbackup.backup.parts import (
    PART_BYTES,
    PartDone,
    PartsResult,
    part_file,
    rows_from_bytes,
    split_plan,
)
from sdbackup.blocks.blockset import BlockSet
from sdbackup.errors import SdbError, UsageError
from sdbackup.net import messages as msg

if TYPE_CHECKING:
    from sdbackup.cluster.coordinator import Coordinator, Session

log = logging.getLogger("sdbackup.coordinator")

POLL = 0.2
"""How often a dispatcher looks at its copier's session while it waits."""


@dataclass
class _Part:
    index: int
    stream: int
    disks: dict[int, BlockSet]
    blocks: int
    attempt: int = 0
    copier: str | None = None  # session key of the copier it is given to
    done: PartDone | None = None
    error: str | None = None
    progress: int = 0  # bytes copied so far by its current copier


@dataclass
class _Copier:
    name: str
    session: Session
    medium: str
    state: str = "waiting"
    current: int | None = None
    parts_done: int = 0
    bytes_done: int = 0
    seconds: float = 0.0
    failed: str | None = None
    thread: threading.Thread | None = field(default=None, repr=False)


class DispersedCopier:
    """Copies a backup's plan as parts on several node agents (module docstring)."""

    def __init__(self, coord: Coordinator, names: Sequence[str], *, medium: str,
                 node_media: Mapping[str, str], opts: BackupOptions, reassign: bool = True,
                 split: str = "ranges", part_bytes: int = 0) -> None:
        if not names:
            raise UsageError("--copy-nodes names no node")
        if len(set(names)) != len(names):
            raise UsageError(f"--copy-nodes names a node twice: {', '.join(names)}")
        if opts.pace != "off":
            raise UsageError("--pace adaptive does not work with --copy-nodes yet (the "
                             "copiers do not see the cluster's write activity): use "
                             "--bwlimit, which limits each copier")
        unknown = sorted(set(node_media) - set(names))
        if unknown:
            raise UsageError(f"--medium {unknown[0]}=DIR: {unknown[0]} is not one of the copy "
                             f"nodes ({', '.join(names)})")
        self.coord = coord
        self.names = list(names)
        self.medium = medium
        self.node_media = dict(node_media)
        self.opts = opts
        self.reassign = reassign
        self.split = split
        self.part_bytes = part_bytes or PART_BYTES
        self.gen: str | None = None
        self._cv = threading.Condition()
        self._parts: list[_Part] = []
        self._by_stream: dict[int, _Part] = {}
        self._queue: collections.deque[int] = collections.deque()
        self._copiers: dict[str, _Copier] = {}
        self._failure: str | None = None
        self._reassigned: list[dict[str, Any]] = []
        self._started = 0.0
        self._progress: Callable[[int], None] | None = None

    # -- before the freeze ---------------------------------------------------------------
    def check(self) -> None:
        """Every copy node is connected now (else the backup does not start)."""
        for name in self.names:
            self._session(name)

    def _session(self, name: str) -> Session:
        with self.coord._mu:
            hit = [s for s in self.coord.sessions.values()
                   if s.name == name and s.state == "up" and s.kind == "node"]
        if not hit:
            raise UsageError(f"copy node {name} is not connected to the coordinator: start "
                             f"it ('sdbackup node CLUSTER_DIR --name {name}') or leave it out "
                             "of --copy-nodes")
        return hit[0]

    # -- the copy (PartCopier) ---------------------------------------------------------------
    def copy(self, gen_id: str, gdir: Path, medium_id: str, disks: dict[int, BlockSet],
             streams: Callable[[int], Sequence[int]],
             progress: Callable[[int], None] | None,
             aborted: Callable[[], str | None]) -> PartsResult:
        bs = self.coord.config.block_size
        pieces = split_plan(disks, len(self.names), split=self.split,
                            part_bytes=self.part_bytes, block_size=bs)
        nums = streams(len(pieces))
        with self._cv:
            self.gen = gen_id
            self._primary_id = medium_id
            self._parts = [_Part(i, n, p, sum(len(b) for b in p.values()))
                           for i, (n, p) in enumerate(zip(nums, pieces, strict=True))]
            self._by_stream = {p.stream: p for p in self._parts}
            self._queue = collections.deque(range(len(self._parts)))
            self._progress = progress
            self._started = time.monotonic()
            for name in self.names:
                s = self._session(name)
                self._copiers[name] = _Copier(name, s, self.node_media.get(name, self.medium))
        log.info("backup %s: %d parts (%s) over copiers %s", gen_id, len(pieces), self.split,
                 ", ".join(self.names))
        try:
            for c in self._copiers.values():
                c.thread = threading.Thread(target=self._dispatch, args=(c,), daemon=True,
                                            name=f"sdb-copier-{c.name}")
                c.thread.start()
            with self._cv:
                while self._failure is None and not self._all_done():
                    why = aborted()
                    if why:
                        self._failure = why
                        break
                    if not any(c.failed is None for c in self._copiers.values()):
                        self._failure = "every copy node failed: " + "; ".join(
                            f"{c.name}: {c.failed}" for c in self._copiers.values())
                        break
                    self._cv.wait(POLL)
                failure = self._failure
                self._cv.notify_all()
            for c in self._copiers.values():
                if c.thread is not None:
                    c.thread.join(timeout=5.0)
            if failure is not None:
                raise BackupFailed(f"the dispersed copy failed: {failure}")
            done = [p.done for p in self._parts if p.done is not None]
            return PartsResult(done, copiers=self._copier_summary(),
                               reassigned=list(self._reassigned), split=self.split)
        except BaseException:
            with self._cv:
                self._failure = self._failure or "the backup was interrupted"
                self._cv.notify_all()
            self._cancel_all(gen_id)
            raise

    def _failed(self) -> bool:
        """The copy failed (read anew each time: other threads set it)."""
        return self._failure is not None

    def _all_done(self) -> bool:
        return all(p.done is not None for p in self._parts)

    def _dispatch(self, c: _Copier) -> None:
        """One copier: take the next part, send it, wait for its end; until no part is
        left, or the copier is lost."""
        while True:
            with self._cv:
                while not self._queue and self._failure is None and not self._all_done():
                    c.state = "waiting"
                    self._cv.wait(POLL)
                if self._failure is not None or self._all_done() or c.failed is not None:
                    if c.failed is None:
                        c.state = "done" if self._failure is None else "stopped"
                    return
                p = self._parts[self._queue.popleft()]
                p.copier, p.error, p.progress = c.session.key, None, 0
                c.current, c.state = p.index, "copying"
                gen = self.gen
                assert gen is not None
            req, blob = self._request(gen, p, c)
            try:
                msg.call(c.session.conn, req, blob, timeout=self.coord.lease)
            except SdbError as e:
                self._lost(c, p, f"it did not take part {p.stream}: {e}")
                return
            with self._cv:
                while p.done is None and p.error is None and self._failure is None:
                    if self.coord.by_key(c.session.key) is None:
                        break
                    self._cv.wait(POLL)
                if p.done is not None:
                    c.parts_done += 1
                    c.bytes_done += p.blocks * self.coord.config.block_size
                    c.seconds += p.done.seconds
                    c.current = None
                    if self._progress is not None:
                        self._progress(p.blocks * self.coord.config.block_size)
                    self._cv.notify_all()
                    continue
                if self._failed():
                    c.state = "stopped"
                    return
                why = p.error or f"its session {c.session.key} failed (it died, was fenced " \
                                 "or left)"
            self._lost(c, p, why)
            return

    def _request(self, gen: str, p: _Part, c: _Copier) -> tuple[msg.CopyPart, bytes]:
        sets = [(d, b.serialize()) for d, b in sorted(p.disks.items())]
        o = self.opts
        req = msg.CopyPart(gen, p.stream, p.attempt, c.medium, self._primary_id,
                           tuple((d, len(x)) for d, x in sets), o.compression, o.level,
                           o.bwlimit, o.batch_bytes, o.record_bytes, o.gap_bytes)
        return req, b"".join(x for _, x in sets)

    def _lost(self, c: _Copier, p: _Part, why: str) -> None:
        """Copier ``c`` lost part ``p``: give it to another copier, or fail the backup."""
        with self._cv:
            c.failed, c.state, c.current = why, "failed", None
            p.copier, p.progress = None, 0
            alive = [x.name for x in self._copiers.values() if x.failed is None]
            log.error("backup %s: copy node %s failed on part %d: %s", self.gen, c.name,
                      p.stream, why)
            if self._failure is None:
                if not self.reassign:
                    self._failure = (f"copy node {c.name} failed mid-copy ({why}) and "
                                     "--no-reassign was given")
                elif not alive:
                    self._failure = f"copy node {c.name} failed ({why}) and no copy node is left"
                else:
                    p.attempt += 1
                    self._queue.appendleft(p.index)
                    self._reassigned.append({"stream": p.stream, "from": c.name,
                                             "attempt": p.attempt, "why": why})
                    log.warning("backup %s: part %d goes to another copier (%s left)",
                                self.gen, p.stream, ", ".join(alive))
            self._cv.notify_all()

    def _cancel_all(self, gen: str) -> None:
        """Every copier still connected stops and removes what it wrote for ``gen``."""
        for c in self._copiers.values():
            s = self.coord.by_key(c.session.key)
            if s is None:
                continue
            try:
                msg.call(s.conn, msg.PartCancel(gen, True), timeout=self.coord.lease)
            except SdbError as e:
                log.warning("backup %s: copy node %s did not cancel its parts: %s", gen,
                            c.name, e)

    # -- what the copiers report ---------------------------------------------------------------
    def on_progress(self, s: Session, r: msg.PartProgress) -> None:
        with self._cv:
            p = self._by_stream.get(r.stream)
            if r.gen == self.gen and p is not None and p.copier == s.key \
                    and p.attempt == r.attempt:
                p.progress = min(r.bytes, p.blocks * self.coord.config.block_size)

    def on_done(self, s: Session, r: msg.PartDone, blob: bytes | None) -> dict[str, Any]:
        """A part's end as its copier reports it; a report for anything but the part's
        current attempt by its current copier is ignored (a lost copier's late word)."""
        with self._cv:
            p = self._by_stream.get(r.stream)
            if r.gen != self.gen or p is None or p.copier != s.key \
                    or p.attempt != r.attempt or p.done is not None:
                return {"accepted": False}
            if r.error is not None:
                p.error = r.error
                self._cv.notify_all()
                return {"accepted": True}
            try:
                rows = rows_from_bytes(blob or b"", r.records - 2)
            except (UsageError, ValueError) as e:
                p.error = f"its report of part {r.stream} is malformed ({e})"
                self._cv.notify_all()
                raise UsageError(p.error) from None
            if int(rows[:, 2].sum()) != p.blocks or r.blocks != p.blocks:
                p.error = (f"it reported {r.blocks} blocks for part {r.stream}, which has "
                           f"{p.blocks}")
                self._cv.notify_all()
                raise UsageError(p.error)
            c = self._copiers[s.name]
            primary = r.medium_id == self._primary_id
            p.done = PartDone(
                r.stream, s.name, r.medium_id, self.medium if primary else c.medium,
                part_file(r.gen, r.stream, r.attempt, primary=primary), r.attempt, r.bytes,
                r.records, int(r.digest, 16), r.blocks, r.read_bytes, r.batches, r.seconds,
                rows)
            self._cv.notify_all()
            return {"accepted": True}

    # -- progress ----------------------------------------------------------------------------
    def _copier_summary(self) -> dict[str, dict[str, Any]]:
        return {c.name: {"parts": c.parts_done, "bytes": c.bytes_done,
                         "seconds": round(c.seconds, 3), "medium": c.medium,
                         **({"failed": c.failed} if c.failed else {})}
                for c in self._copiers.values()}

    def status(self) -> dict[str, Any]:
        """The copy's state, per copier: for ``sdbackup status`` and progress output."""
        bs = self.coord.config.block_size
        with self._cv:
            total = sum(p.blocks for p in self._parts) * bs
            copiers = []
            for c in self._copiers.values():
                cur = self._parts[c.current] if c.current is not None else None
                copiers.append({
                    "node": c.name, "state": c.state, "medium": c.medium,
                    "parts_done": c.parts_done,
                    "bytes_done": c.bytes_done + (cur.progress if cur is not None else 0),
                    "part": cur.stream if cur is not None else None,
                    "part_bytes": cur.blocks * bs if cur is not None else 0,
                    **({"failed": c.failed} if c.failed else {})})
            done = sum(p.blocks for p in self._parts if p.done is not None) * bs
            return {"generation": self.gen, "parts": len(self._parts),
                    "parts_done": sum(1 for p in self._parts if p.done is not None),
                    "bytes_total": total,
                    "bytes_done": done + sum(p.progress for p in self._parts
                                             if p.done is None),
                    "seconds": round(time.monotonic() - self._started, 3),
                    "reassigned": len(self._reassigned), "copiers": copiers,
                    **({"failed": self._failure} if self._failure else {})}
