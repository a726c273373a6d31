"""The log manager of an online backup on the coordinator: the window of one backup,
its central log, the coordinator's own log, and gathering the nodes' logs.

:class:`WindowManager` holds the :class:`~sdbackup.backup.window.BackupWindow` of the
running online backup, from the freeze (:meth:`~WindowManager.begin`) to the end of the
copy (:meth:`~WindowManager.end`):

- ``begin`` arms the window and tells every session that may write to log before
  images (a session that cannot be told is fenced: it must not write unlogged);
- while it is open, every write mapping is split at the backup's blocks
  (:meth:`~WindowManager.split`); before images sent by nodes are stored in the
  central log (:meth:`~WindowManager.put`, central/inline/separate modes); the
  coordinator's own overwrites (zeroing a cut block) log theirs through
  :meth:`~WindowManager.own_before_image` -- into the central log, or in merged mode
  into the coordinator's own log, merged with the nodes' logs at the end;
- ``end`` closes the window: in merged mode it gathers every node's log and merges
  them, keeping the oldest before image per block; then every session is told the
  window is over.

What only the coordinator knows -- its sessions, and how to call them -- comes through
the small :class:`WindowNodes` interface, so that this layer knows nothing of the
protocol (backup imports neither net nor cluster).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from sdbackup.backup.bilog import BiLog, merge_logs
from sdbackup.backup.window import BackupWindow
from sdbackup.blocks.blockset import BlockSet
from sdbackup.errors import RemoteError, SdbError, UsageError
from sdbackup.meta.types import WriteRun
from sdbackup.types import DiskId

log = logging.getLogger("sdbackup.coordinator")

FETCH_BYTES = 8 << 20
"""How much of a node's log one ``bi_fetch`` asks for."""
FETCH_TIMEOUT = 60.0
OWN = "coordinator"
"""The window's name for the coordinator's own overwrites."""


class Peer(Protocol):
    """A session of the coordinator, as the window sees it."""

    @property
    def key(self) -> str: ...

    @property
    def name(self) -> str: ...


P = TypeVar("P", bound=Peer)


class WindowNodes(Protocol[P]):
    """The coordinator's sessions, and the calls the window makes to them. The calls
    raise :class:`RemoteError` when the session does not answer."""

    def writers(self) -> Sequence[P]:
        """Every session that is up and may write (nodes and clients)."""
        ...

    def by_key(self, key: str) -> P | None:
        """The session ``key`` if it is still up."""
        ...

    def fence(self, peer: P, why: str) -> None:
        """Declare the session failed; return once it can no longer write."""
        ...

    def backup_begin(self, peer: P, gen: str, mode: str) -> None:
        """Arm before-image logging on the session."""
        ...

    def bi_fetch(self, peer: P, gen: str, offset: int, size: int) -> tuple[bytes, bool]:
        """Bytes of the session's own log (merged mode) from ``offset``; True at the end."""
        ...

    def backup_end(self, peer: P, gen: str) -> None:
        """The window is closed: the session drops what it kept for it."""
        ...


class WindowManager(Generic[P]):
    """The before-image window of the running online backup (at most one)."""

    def __init__(self, nodes: WindowNodes[P], *, cluster_id: str, block_size: int,
                 tick: Callable[[], int], own_lock: AbstractContextManager[Any]) -> None:
        """``tick`` gives the next logical time; ``own_lock`` is held by whoever calls
        :meth:`own_before_image` (the metadata store's lock: see the coordinator's
        truncate), and is taken here to close the coordinator's own log."""
        self.nodes = nodes
        self.cluster_id = cluster_id
        self.block_size = block_size
        self.tick = tick
        self.own_lock = own_lock
        self.window: BackupWindow | None = None
        self._own_log: BiLog | None = None  # merged mode: the coordinator's own writes

    # -- what the rest of the coordinator asks ------------------------------------------------
    def current(self) -> dict[str, str] | None:
        """The open window, for a session that joins now ({gen, mode}), or None."""
        w = self.window
        return None if w is None else {"gen": w.gen_id, "mode": w.mode}

    def aborted(self) -> str | None:
        """Why the open window's backup was aborted (before-image logging failed)."""
        w = self.window
        return w.failed if w is not None else None

    def logged(self, disk: int) -> BlockSet:
        """Blocks of ``disk`` whose before image is in the central log already."""
        w = self.window
        return w.logged(disk) if w is not None else BlockSet()

    def split(self, key: str, runs: list[WriteRun]) -> list[WriteRun]:
        """A write mapping for session ``key``: the parts that need a before image get a
        logical time (see BackupWindow.split); unchanged when no window is open."""
        w = self.window
        return runs if w is None else w.split(key, runs, self.tick)

    def put(self, gen: str, items: Sequence[tuple[int, int, int, int]], data: bytes | None
            ) -> int:
        """Before images from a node (central, inline, separate modes): ``items`` are
        (disk, first block, block count, logical time), their blocks in ``data`` in
        order. Stored durably unless stored already; returns the blocks stored."""
        w = self.window
        if w is None or not w.central or gen != w.gen_id:
            # The window closed after the copy finished: this overwrite needs no before
            # image any more. (A write-back cannot span two windows: the next freeze
            # recalls the write right, which waits for the write-back to finish.)
            return 0
        view = memoryview(data or b"")
        out = []
        pos = 0
        for disk, start, count, ltime in items:
            n = count * self.block_size
            if pos + n > len(view):
                raise UsageError("put_bi: blob shorter than the items say")
            out.append((disk, start, bytes(view[pos : pos + n]), ltime))
            pos += n
        return w.put(out)

    def node_failed(self, gen: str, name: str, reason: str) -> None:
        """Node ``name`` could not store a before image: that backup is aborted (not the
        node's write, which goes on once this returns)."""
        w = self.window
        if w is not None and gen == w.gen_id:
            why = f"node {name} could not log a before image: {reason}"
            log.error("backup %s aborted: %s", w.gen_id, why)
            w.fail(why)

    def session_gone(self, key: str, name: str) -> None:
        """Session ``key`` went (left, failed). In merged mode its log went with it."""
        w = self.window
        if w is not None and not w.central and key in w.asked and w.failed is None:
            w.failed = (f"node {name} failed during the backup and took its before-image "
                        "log with it (merged mode)")
            log.error("backup %s: %s", w.gen_id, w.failed)

    def own_before_image(self, disk: DiskId, block: int, old: bytes) -> None:
        """The coordinator overwrites a block itself: same write-ahead rule as nodes.
        Called with ``own_lock`` held."""
        w = self.window
        if w is None:
            return
        run = [WriteRun(0, 1, disk, block, False)]
        need = [r for r in w.split(OWN, run, self.tick) if r.bi_time]
        if not need:
            return
        if w.central:
            w.put([(disk, block, old, need[0].bi_time)])
        elif self._own_log is not None:
            try:
                self._own_log.append(disk, block, old, need[0].bi_time)
                self._own_log.sync()
            except (OSError, SdbError) as e:
                w.fail(f"the coordinator's before-image log could not be written ({e})")

    # -- the window ---------------------------------------------------------------------------
    def begin(self, gen_id: str, mode: str, blocks: dict[int, BlockSet], log_path: Path,
              work_dir: Path) -> BackupWindow:
        """Arm before-image logging (call while frozen: no write-back is in flight)."""
        bs = self.block_size
        # The log becomes stream 1 of the generation (or, in separate mode, can be
        # brought into it by 'sdbackup overlay'), so it is labelled as that stream.
        label = {"cluster": self.cluster_id, "generation": gen_id, "stream": 1}
        central = mode != "merged"
        w = BackupWindow(gen_id, mode, blocks,
                         BiLog(log_path, block_size=bs, label=label, dedup=True)
                         if central else None)
        if not central:
            self._own_log = BiLog(work_dir / "coordinator.bilog", block_size=bs, label=label,
                                  dedup=True)
        self.window = w
        for peer in self.nodes.writers():
            try:
                self.nodes.backup_begin(peer, gen_id, mode)
            except RemoteError as e:
                # Fenced before the thaw: a node that logs no before images must not
                # write while the window is open.
                self.nodes.fence(peer, f"did not arm before-image logging: {e}")
        return w

    def end(self, out_log: Path | None, work_dir: Path) -> dict[str, Any]:
        """Close the window after the copy: gather and merge logs (merged mode)."""
        w = self.window
        if w is None:
            raise UsageError("no backup window is open")
        stats: dict[str, Any] = {"mode": w.mode, "bi_runs": w.bi_runs}
        self.window = None  # no more before images are asked for: the copy is done
        try:
            if w.central:
                assert w.log is not None
                w.close()
                stats["log_bytes"] = w.log.bytes
            else:
                stats.update(self._gather(w, out_log, work_dir))
        finally:
            self.window = None
            self._own_log = None
            for peer in self.nodes.writers():
                try:
                    self.nodes.backup_end(peer, w.gen_id)
                except RemoteError as e:
                    log.warning("node %s did not end the backup window: %s", peer.name, e)
        stats["failed"] = w.failed
        return stats

    def _gather(self, w: BackupWindow, out_log: Path | None, work_dir: Path
                ) -> dict[str, Any]:
        """Merged mode: the coordinator's own log and every asked node's, merged."""
        inputs: list[Path] = []
        own, self._own_log = self._own_log, None
        if own is not None and w.failed is None:
            try:
                with self.own_lock:  # own_before_image appends under it
                    own.close()
                inputs.append(own.path)
            except (OSError, SdbError) as e:
                w.fail(f"the coordinator's before-image log failed ({e})")
        for key in sorted(w.asked - {OWN}):
            if w.failed is not None:
                break  # aborted: nothing to gather
            peer = self.nodes.by_key(key)
            if peer is None:
                w.failed = w.failed or f"node session {key} left before its log was gathered"
                continue
            path = work_dir / _log_file_name(peer.name)
            try:
                self._fetch_log(peer, w.gen_id, path)
            except (OSError, SdbError) as e:
                w.fail(f"the before-image log of node {peer.name} could not be gathered ({e})")
                break
            inputs.append(path)
        if w.failed is not None or out_log is None:
            return {}
        m = merge_logs(inputs, out_log, block_size=self.block_size,
                       label={"cluster": self.cluster_id, "generation": w.gen_id,
                              "stream": 1, "merged": len(inputs)})
        return {"records_in": m.records_in, "records_out": m.records_out,
                "log_blocks": m.blocks_out}

    def _fetch_log(self, peer: P, gen_id: str, path: Path) -> None:
        off = 0
        with open(path, "wb") as f:
            while True:
                data, eof = self.nodes.bi_fetch(peer, gen_id, off, FETCH_BYTES)
                f.write(data)
                off += len(data)
                if eof or not data:
                    break
            f.flush()
            os.fsync(f.fileno())


def _log_file_name(node: str) -> str:
    """Where a node's gathered log goes in the work directory: its name, with anything
    but letters, digits, '.', '_' and '-' replaced (a node chooses its own name)."""
    return f"node-{re.sub(r'[^A-Za-z0-9_.-]', '_', node)}.bilog"

