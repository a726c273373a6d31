"""The running coordinator as a :class:`~sdbackup.backup.source.BackupSource`.

``freeze`` is the instant T0 of an online backup (issue 6): new write rights are held
and every node's write rights are recalled, which writes every dirty cache back
(a.1, Fig. 3); under the metadata store's lock the store is synced and snapshotted in
one step, and the used blocks are listed; the engine then arms before-image logging
(:meth:`arm`) before the freeze ends. Writes go on during the copy; whoever overwrites a
block of the backup's set first logs its before image (see ``backup/window.py``; the
coordinator's window manager is ``backup/window_manager.py``).

Developer note (what must stay adjacent): the snapshot, the listing of used blocks and
arming the window happen while both the rights freeze and the store lock are held. The
store lock keeps out metadata changes (a free, a truncate's zeroing) between the
snapshot and the arming; the rights freeze keeps out data write-backs.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdbackup.backup.source import Snapshot, SourceConfig, SourceDisk
from sdbackup.blocks.blockset import BlockSet
from sdbackup.blocks.diskset import DiskSet
from sdbackup.cluster.rights import RecallFailed
from sdbackup.errors import NoSpaceError, RemoteError
from sdbackup.meta.tracking import ChangeTracker

log = logging.getLogger("sdbackup.backup")

if TYPE_CHECKING:
    from sdbackup.cluster.coordinator import Coordinator, Session
    from sdbackup.cluster.local import LocalCluster


class CoordinatorSource:
    """BackupSource over the coordinator of a running cluster."""

    online = True

    def __init__(self, coord: Coordinator, log_node: Session | None = None) -> None:
        self.coord = coord
        self.log_node = log_node  # the log manager's node (Fig. 36), else the coordinator
        rows = coord.store.query("SELECT id, name, nblocks FROM disks ORDER BY id")
        self._config = SourceConfig(coord.config.cluster_id, coord.config.block_size,
                                    tuple(SourceDisk(int(i), str(n), int(nb))
                                          for i, n, nb in rows))
        self.freeze_flush_seconds = 0.0

    @property
    def config(self) -> SourceConfig:
        return self._config

    @property
    def disks(self) -> DiskSet:
        return self.coord.disks

    def freeze(self, snapshot_path: Path) -> AbstractContextManager[Snapshot]:
        return self._freeze(snapshot_path)

    @contextmanager
    def _freeze(self, snapshot_path: Path) -> Iterator[Snapshot]:
        c = self.coord
        t = time.monotonic()
        try:
            c.rights.freeze()  # holds new write rights; every dirty cache is written back
        except RecallFailed as e:  # frozen no more: writes go on, nothing is dropped
            what = (f"backup not started: node {e.refused[0][0].partition('#')[0]} cannot "
                    f"write back {c.path_of(e.ino)} ({os.strerror(e.errno or 5)}); its data "
                    "stays in its cache and its programs are told; fix that and try again")
            log.error("%s", what)
            if e.errno == errno.ENOSPC:
                raise NoSpaceError(what) from None
            raise RemoteError(what) from None
        self.freeze_flush_seconds = time.monotonic() - t
        try:
            with c.store.lock:
                c.disks.fsync()
                c.store.sync()
                t0 = time.time_ns()
                c.store.snapshot_to(snapshot_path)
                yield Snapshot(snapshot_path, t0, c.rights.clock)
        finally:
            c.rights.thaw()

    def used_blocks(self, disk_id: int) -> BlockSet:
        return self.coord.meta.used_set(disk_id)

    @property
    def tracker(self) -> ChangeTracker:
        return self.coord.meta.tracker

    def write_activity(self) -> int:
        return self.coord.meta.write_ops

    # -- online backup --------------------------------------------------------------------
    def arm(self, gen_id: str, mode: str, blocks: dict[int, BlockSet], log_path: Path,
            work_dir: Path) -> None:
        self.coord.windows.begin(gen_id, mode, blocks, log_path, work_dir, self.log_node)

    def aborted(self) -> str | None:
        """Why the running online backup was aborted (before-image logging failed)."""
        return self.coord.windows.aborted()

    def logged(self, disk_id: int) -> BlockSet:
        return self.coord.windows.logged(disk_id)

    def disarm(self, out_log: Path | None, work_dir: Path) -> dict[str, Any]:
        return self.coord.windows.end(out_log, work_dir)


class LocalClusterSource:
    """:class:`BackupSource` over a cluster opened in this process (embedded coordinator).

    The cluster lock that :class:`~sdbackup.cluster.local.LocalCluster` holds keeps every
    other process from writing. ``freeze`` also holds the metadata store's lock, so
    that metadata operations of this process (allocations, commits) wait until the
    freeze ends, syncs the disks and the store (nothing is cached in between on this
    node), and snapshots the store with SQLite's online backup in one step.
    """

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        rows = cluster.store.query("SELECT id, name, nblocks FROM disks ORDER BY id")
        self._config = SourceConfig(
            cluster.config.cluster_id,
            cluster.config.block_size,
            tuple(SourceDisk(int(i), str(n), int(nb)) for i, n, nb in rows),
        )

    @property
    def config(self) -> SourceConfig:
        return self._config

    @property
    def disks(self) -> DiskSet:
        return self.cluster.disks

    def freeze(self, snapshot_path: Path) -> AbstractContextManager[Snapshot]:
        return self._freeze(snapshot_path)

    @contextmanager
    def _freeze(self, snapshot_path: Path) -> Iterator[Snapshot]:
        store = self.cluster.store
        with store.lock:
            self.cluster.disks.fsync()
            store.sync()
            t0 = time.time_ns()
            store.snapshot_to(snapshot_path)
            yield Snapshot(snapshot_path, t0, 0)

    def used_blocks(self, disk_id: int) -> BlockSet:
        return self.cluster.meta.used_set(disk_id)

    @property
    def tracker(self) -> ChangeTracker:
        return self.cluster.meta.tracker

    def write_activity(self) -> int:
        return self.cluster.meta.write_ops
