"""A node's side of a dispersed backup (seed a.12, Fig. 27): copy the parts it is given.

The coordinator's copy manager (``cluster/dispersed.py``) sends ``copy_part``: the
blocks of one part (a serialized :class:`BlockSet` per disk), the stream number, and
the medium -- a directory as this host sees it. :class:`PartRunner` answers at once
and copies in a thread of its own, with the same :class:`~sdbackup.backup.copy.Copier`
as a central backup (coalesced batches read with ``preadv`` through this node's
``O_DIRECT`` view of the shared disks, compression and checksums in the record
writer's threads, ``--bwlimit`` per copier), into one record stream:

* on the medium that commits the generation (the coordinator's), the part goes into
  the generation's own directory, which must exist already;
* on any other medium (created like any backup medium, labelled for this cluster), it
  goes to ``MEDIUM/parts/<GEN>/``.

When the stream is closed (END, fsynced, its directory fsynced) the node sends
``part_done`` with the size, record count, header digest and one index row per DATA
record; on a failure it sends ``part_done`` with the error, and the coordinator gives
the part to another copier. ``part_cancel`` stops the copies of a backup (and with
``discard`` removes what they wrote): a backup that fails leaves nothing on a node's
medium but directories.

What is guaranteed: a part is reported done only when every byte of it is durable on
its medium; a part that is not reported done is never part of a committed generation.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from sdbackup.backup.copy import Copier, CopyResult
from sdbackup.backup.engine import COPY_DELAY_ENV
from sdbackup.backup.parts import part_file, rows_to_bytes
from sdbackup.blocks.blockset import BlockSet
from sdbackup.blocks.diskset import DiskSet
from sdbackup.blocks.durable import sync_dir
from sdbackup.errors import NotFoundError, RemoteError, SdbError, UsageError
from sdbackup.media.medium import PARTS_DIR, PARTS_ORIGIN, DiskMedium
from sdbackup.media.record_writer import RecordWriter
from sdbackup.net import messages as msg
from sdbackup.types import DiskId

log = logging.getLogger("sdbackup.node")

PROGRESS_EVERY = 0.5
"""Seconds between two progress notifications of a part."""


class _Cancelled(Exception):
    pass


class PartRunner:
    """Copies the parts the coordinator gives this node (see the module docstring)."""

    def __init__(self, name: str, cluster_id: str, block_size: int, disks: DiskSet,
                 coordinator: msg.Caller) -> None:
        self.name = name
        self.cluster_id = cluster_id
        self.block_size = block_size
        self.disks = disks
        self.coordinator = coordinator
        self._lock = threading.Lock()
        self._cancel: dict[str, threading.Event] = {}
        self._written: dict[str, list[Path]] = {}

    def start(self, r: msg.CopyPart, blob: bytes | None) -> dict[str, Any]:
        """Check the request, start the copy in a thread, answer at once."""
        data = memoryview(blob or b"")
        if sum(n for _, n in r.sets) != len(data):
            raise UsageError(f"copy_part: the blob holds {len(data)} bytes, the sets "
                             f"{sum(n for _, n in r.sets)}")
        plan: dict[int, BlockSet] = {}
        pos = 0
        for disk, n in r.sets:
            if DiskId(disk) not in self.disks.by_id:
                raise UsageError(f"copy_part: node {self.name} has no disk id {disk}")
            plan[disk] = BlockSet.deserialize(data[pos : pos + n])
            pos += n
        with self._lock:
            ev = self._cancel.setdefault(r.gen, threading.Event())
            if ev.is_set():
                raise RemoteError(f"backup {r.gen} was cancelled on node {self.name}")
        threading.Thread(target=self._run, args=(r, plan, ev), daemon=True,
                         name=f"sdb-part-{r.stream}").start()
        return {"accepted": True, "node": self.name}

    def cancel(self, gen: str, discard: bool) -> None:
        """Stop every copy of ``gen`` at its next batch; ``discard``: remove its parts."""
        with self._lock:
            self._cancel.setdefault(gen, threading.Event()).set()
            paths = self._written.pop(gen, []) if discard else []
        for p in paths:
            p.unlink(missing_ok=True)
            if p.parent.parent.name == PARTS_DIR:
                try:  # nothing but its origin left: the directory goes too
                    if set(os.listdir(p.parent)) <= {PARTS_ORIGIN}:
                        (p.parent / PARTS_ORIGIN).unlink(missing_ok=True)
                        p.parent.rmdir()
                except OSError:  # another part came meanwhile (or it is gone)
                    pass
        if paths:
            log.info("backup %s: removed %d part(s) written here", gen, len(paths))

    def _run(self, r: msg.CopyPart, plan: dict[int, BlockSet], ev: threading.Event) -> None:
        t0 = time.monotonic()
        writer: RecordWriter | None = None
        path: Path | None = None
        try:
            medium = DiskMedium.open_for_backup(r.medium, self.cluster_id)
            primary = medium.medium_id == r.primary_medium
            rel = part_file(r.gen, r.stream, r.attempt, primary=primary)
            path = medium.root / rel
            if primary and not path.parent.is_dir():
                raise NotFoundError(
                    f"node {self.name} sees medium {medium.root} but not generation {r.gen} "
                    "being written there: give this node a medium of its own (--medium "
                    f"{self.name}=DIR)")
            if not primary:  # parts/<gen>/, with the id of the medium that commits it
                medium.parts_dir(r.gen, r.primary_medium)
            with self._lock:
                self._written.setdefault(r.gen, []).append(path)
            label = {"kind": "data", "cluster": self.cluster_id, "generation": r.gen,
                     "medium": medium.medium_id, "stream": r.stream,
                     "block_size": self.block_size, "node": self.name, "attempt": r.attempt}
            writer = RecordWriter.create(path, label=label, compress=r.compression,
                                         level=max(r.level, 1))
            copied = self._copy(r, plan, writer, ev)
            size = writer.close()  # END, fsync
            sync_dir(path.parent)
            done = msg.PartDone(r.gen, r.stream, r.attempt, medium.medium_id, primary, size,
                                writer.records_written, f"{writer.header_digest:016x}",
                                copied.blocks, copied.read_bytes, copied.batches,
                                time.monotonic() - t0)
            msg.call(self.coordinator, done, rows_to_bytes(copied), timeout=120)
            log.info("backup %s: part %d done (%d blocks, %d bytes on %s)", r.gen, r.stream,
                     copied.blocks, size, medium.root)
        except BaseException as e:
            if writer is not None:
                writer.abort()
            if path is not None:
                path.unlink(missing_ok=True)
            if isinstance(e, _Cancelled) or ev.is_set():
                return
            why = e.message if isinstance(e, SdbError) else f"{type(e).__name__}: {e}"
            log.error("backup %s: part %d failed on node %s: %s", r.gen, r.stream, self.name,
                      why)
            try:
                msg.call(self.coordinator, msg.PartDone(
                    r.gen, r.stream, r.attempt, "", False, 0, 0, "0", 0, 0, 0,
                    time.monotonic() - t0, why[: msg.MAX_TEXT]), timeout=30)
            except SdbError as e2:
                log.warning("backup %s: could not report the failure of part %d: %s", r.gen,
                            r.stream, e2)

    def _copy(self, r: msg.CopyPart, plan: dict[int, BlockSet], writer: RecordWriter,
              ev: threading.Event) -> CopyResult:
        delay = float(os.environ.get(COPY_DELAY_ENV, "0") or 0)
        done = 0
        last = time.monotonic()

        def progress(n: int) -> None:
            nonlocal done, last
            done += n
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY:
                last = now
                try:
                    msg.notify(self.coordinator,
                               msg.PartProgress(r.gen, r.stream, r.attempt, done))
                except SdbError:
                    pass  # progress is advisory; part_done says what counts

        def after_batch(n: int) -> None:
            if delay:
                time.sleep(delay)  # test hook: a slow copy, so writers overlap it
            if ev.is_set():
                raise _Cancelled()

        copier = Copier(self.disks, self.block_size, writer, batch_bytes=r.batch_bytes,
                        record_bytes=r.record_bytes, gap_bytes=r.gap_bytes,
                        progress=progress, after_batch=after_batch, bwlimit=r.bwlimit)
        return copier.copy(plan)
