"""What a backup copies from: the :class:`BackupSource` protocol, and its embedded-cluster
implementation.

The backup engine (``backup/engine.py``) is written against this small protocol only,
so that the embedded cluster (:class:`LocalClusterSource`, here) and the coordinator
process (later) are backed up by the same code. A source gives:

* ``config`` -- the cluster's identity, block size and disks (id, name, block count);
* ``disks`` -- the live disks (a :class:`~sdbackup.blocks.diskset.DiskSet`: a
  ``BlockReader`` whose devices the copier reads with large ``preadv`` calls);
* ``freeze(snapshot_path)`` -- a context manager: on entry every acknowledged write is
  on the disks (dirty caches flushed), new writes are held, and the metadata store's
  state at that instant T0 is written to ``snapshot_path``; it yields a
  :class:`Snapshot`. Writes stay held until the context exits. The engine lists the
  used blocks (``used_runs``) inside the freeze, so that list and snapshot describe the
  same instant; for now it also copies inside it (writes are held for the whole backup).
  Online backup (issue 6) will shorten the freeze to the T0 instant and add
  before-image logging, without changing this protocol's shape.
* ``used_runs(disk_id)`` -- the used blocks of a disk from the allocation bitmap, as
  ``(start, count)`` runs (a list of pairs or an ``(N, 2)`` integer array).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from sdbackup.blocks.diskset import DiskSet

if TYPE_CHECKING:  # the engine must not depend on the embedded cluster at run time
    from sdbackup.cluster.local import LocalCluster


@dataclass(frozen=True)
class SourceDisk:
    id: int
    name: str
    nblocks: int


@dataclass(frozen=True)
class SourceConfig:
    cluster_id: str
    block_size: int
    disks: tuple[SourceDisk, ...]


@dataclass(frozen=True)
class Snapshot:
    """The state at T0: where the metadata snapshot was written, and when.

    ``wall_ns`` is the wall-clock time of T0; ``logical_time`` the cluster's logical
    clock at T0 (0 for a source without one: the embedded cluster has no other writer).
    """

    path: Path
    wall_ns: int
    logical_time: int


Runs = Sequence[tuple[int, int]] | npt.NDArray[np.integer]


class BackupSource(Protocol):
    """A cluster to back up (see the module docstring)."""

    @property
    def config(self) -> SourceConfig: ...

    @property
    def disks(self) -> DiskSet: ...

    def freeze(self, snapshot_path: Path) -> AbstractContextManager[Snapshot]: ...

    def used_runs(self, disk_id: int) -> Runs: ...


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

    def used_runs(self, disk_id: int) -> Runs:
        return self.cluster.meta.used_runs(disk_id)
