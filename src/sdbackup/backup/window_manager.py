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

With a log node (``backup --log-node NAME``, Fig. 36) the log manager is that node's
(:mod:`sdbackup.backup.log_node`): ``begin`` opens the log there first (``log_open``)
and tells every session where to send before images; the coordinator's own before
images go there too (``log_put``); a log node that goes (its session ends) or fails
aborts the backup; ``end`` closes the log there (``log_close``: fsynced, described) and,
in separate mode, fetches a copy for the engine (the log medium is on the node's host).

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
from sdbackup.backup.log_node import before_images
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

    def backup_begin(self, peer: P, gen: str, mode: str, log_node: str | None = None,
                     log_addr: str | None = None) -> None:
        """Arm before-image logging on the session (to the log node at ``log_addr``)."""
        ...

    def log_open(self, peer: P, gen: str, mode: str, path: str, log_medium: bool) -> str:
        """Make the node ``peer`` the log manager: it opens the log at ``path`` on its
        host; returns the HOST:PORT where it takes ``put_bi``."""
        ...

    def log_put(self, peer: P, gen: str, items: tuple[tuple[int, int, int, int], ...],
                data: bytes) -> int:
        """The coordinator's own before images, to the log node."""
        ...

    def log_close(self, peer: P, gen: str, discard: bool) -> dict[str, Any]:
        """Close (fsync, describe) or discard the log at the log node."""
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
        self.log_peer: P | None = None  # the log node of the open window, if any
        self._log_path: Path | None = None
        self._log_addr: str | None = None

    # -- what the rest of the coordinator asks ------------------------------------------------
    def current(self) -> dict[str, str | None] | None:
        """The open window, for a session that joins now ({gen, mode}), or None."""
        w = self.window
        if w is None:
            return None
        lp = self.log_peer
        return {"gen": w.gen_id, "mode": w.mode,
                **({"log_node": lp.name, "log_addr": self._log_addr} if lp is not None
                   else {})}

    def status(self) -> dict[str, Any] | None:
        """The open window for ``sdbackup status``: generation, log mode, who keeps the
        log (``log_node`` and the address writers send to; None: the coordinator, or
        every node its own in merged mode) and why it failed, if it did."""
        w = self.window
        if w is None:
            return None
        lp = self.log_peer
        return {"generation": w.gen_id, "mode": w.mode,
                "log_node": lp.name if lp is not None else None,
                "log_addr": self._log_addr if lp is not None else None,
                "failed": w.failed}

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
        if w.log is None:  # the log is on a log node: never acknowledge unstored images
            raise UsageError(f"backup {gen} logs before images on node "
                             f"{getattr(self.log_peer, 'name', '?')}, not here")
        return w.put(before_images(items, data, self.block_size))

    def node_failed(self, gen: str, name: str, reason: str) -> None:
        """Node ``name`` could not store a before image: that backup is aborted (not the
        node's write, which goes on once this returns)."""
        w = self.window
        if w is not None and gen == w.gen_id:
            why = f"node {name} could not log a before image: {reason}"
            log.error("backup %s aborted: %s", w.gen_id, why)
            w.fail(why)

    def session_gone(self, key: str, name: str) -> None:
        """Session ``key`` went (left, failed). In merged mode its log went with it; the
        log node's going takes the backup's log with it."""
        w = self.window
        lp = self.log_peer
        if w is not None and lp is not None and lp.key == key and w.failed is None:
            w.fail(f"log node {name} failed during the backup and took the before-image "
                   "log with it")
            return
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
        lp = self.log_peer
        if lp is not None:
            # To the log node, as any node's before image (a rare call: a truncate
            # during a backup zeroes at most one cut block).
            try:
                self.nodes.log_put(lp, w.gen_id, ((disk, block, 1, need[0].bi_time),), old)
            except (RemoteError, SdbError) as e:
                w.fail(f"the coordinator's before image could not be stored at log node "
                       f"{lp.name} ({e})")
        elif w.central:
            w.put([(disk, block, old, need[0].bi_time)])
        elif self._own_log is not None:
            try:
                self._own_log.append(disk, block, old, need[0].bi_time)
                self._own_log.sync()
            except (OSError, SdbError) as e:
                w.fail(f"the coordinator's before-image log could not be written ({e})")

    # -- the window ---------------------------------------------------------------------------
    def begin(self, gen_id: str, mode: str, blocks: dict[int, BlockSet], log_path: Path,
              work_dir: Path, log_peer: P | None = None) -> BackupWindow:
        """Arm before-image logging (call while frozen: no write-back is in flight).
        ``log_peer``: the log manager is that node's (central, inline, separate)."""
        bs = self.block_size
        # The log becomes stream 1 of the generation (or, in separate mode, can be
        # brought into it by 'sdbackup overlay'), so it is labelled as that stream.
        label = {"cluster": self.cluster_id, "generation": gen_id, "stream": 1}
        central = mode != "merged"
        addr: str | None = None
        if log_peer is not None:
            if not central:
                raise UsageError("--log-node goes with --log-mode central, inline or "
                                 "separate (in merged mode every node keeps its own log)")
            # Opened before any node is told to send there. A log node that cannot open
            # it stops the backup here, before the thaw.
            try:
                addr = self.nodes.log_open(log_peer, gen_id, mode, str(log_path),
                                           mode == "separate")
            except (RemoteError, SdbError) as e:
                raise RemoteError(f"backup not started: log node {log_peer.name} could "
                                  f"not open the before-image log: {e}") from None
            if mode != "separate" and not log_path.exists():
                self._log_close_quietly(log_peer, gen_id)
                raise UsageError(
                    f"backup not started: log node {log_peer.name} does not see the "
                    f"backup medium at {log_path.parent} (its log must be the generation's "
                    "stream 1 there): put the medium on storage both hosts see, or use "
                    "--log-mode separate with a --log-medium on the log node's host")
        w = BackupWindow(gen_id, mode, blocks,
                         BiLog(log_path, block_size=bs, label=label, dedup=True)
                         if central and log_peer is None else None)
        if not central:
            self._own_log = BiLog(work_dir / "coordinator.bilog", block_size=bs, label=label,
                                  dedup=True)
        self.window = w
        self.log_peer = log_peer
        self._log_path = log_path
        self._log_addr = addr
        name = log_peer.name if log_peer is not None else None
        for peer in self.nodes.writers():
            try:
                self.nodes.backup_begin(peer, gen_id, mode, name, addr)
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
        lp, self.log_peer = self.log_peer, None
        try:
            if lp is not None:
                stats.update(self._close_log_node(w, lp, work_dir))
            elif w.central:
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

    def _close_log_node(self, w: BackupWindow, lp: P, work_dir: Path) -> dict[str, Any]:
        """The log node's log: closed there (fsynced) and described; in separate mode
        a copy fetched here (the engine reads it and, to overlay, copies it in)."""
        if w.failed is not None:
            self._log_close_quietly(lp, w.gen_id)
            return {}
        if self.nodes.by_key(lp.key) is None:
            w.fail(f"log node {lp.name} left before the backup's log was closed")
            return {}
        try:
            st = self.nodes.log_close(lp, w.gen_id, False)
        except (RemoteError, SdbError) as e:
            w.fail(f"log node {lp.name} could not complete the before-image log ({e})")
            return {}
        out: dict[str, Any] = {"log_bytes": st.get("log_bytes", 0), "log_node": lp.name}
        if w.mode == "separate":
            assert self._log_path is not None
            copy = work_dir / self._log_path.name
            try:
                self._fetch_log(lp, w.gen_id, copy)
            except (OSError, SdbError) as e:
                w.fail(f"the before-image log at log node {lp.name} could not be fetched "
                       f"({e})")
                return {}
            out["log_copy"] = str(copy)
        return out

    def _log_close_quietly(self, lp: P, gen: str) -> None:
        try:
            self.nodes.log_close(lp, gen, True)
        except (RemoteError, SdbError) as e:
            log.warning("log node %s did not discard the log of backup %s: %s", lp.name,
                        gen, e)

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

