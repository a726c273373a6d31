"""What a backup copies from: the :class:`BackupSource` protocol, and its embedded-cluster
implementation.

The backup engine (``backup/engine.py``) is written against this small protocol only,
so that the embedded cluster and the coordinator (both in
``cluster/backup_source.py``) are backed up by the same code. A source gives:

* ``config`` -- the cluster's identity, block size and disks (id, name, block count);
* ``disks`` -- the live disks (a :class:`~sdbackup.blocks.diskset.DiskSet`: a
  ``BlockReader`` whose devices the copier reads with large ``preadv`` calls);
* ``freeze(snapshot_path)`` -- a context manager: on entry every acknowledged write is
  on the disks (dirty caches flushed), new writes are held, and the metadata store's
  state at that instant T0 is written to ``snapshot_path``; it yields a
  :class:`Snapshot`. Writes stay held until the context exits. The engine lists the
  used blocks (``used_blocks``) inside the freeze, so that list and snapshot describe
  the same instant; without a log mode it also copies inside it (writes are held for
  the whole backup); with one, the freeze ends at T0 and before images cover the rest.
* ``used_blocks(disk_id)`` -- the used blocks of a disk from the allocation bitmap, as
  a :class:`BlockSet` built in C from the packed bitmap: the freeze never pays a Python
  object per run (a disk fragmented into a million runs costs tens of milliseconds).
* ``tracker`` -- the cluster's changed-block tracking (``meta/tracking.py``), read and
  advanced inside the freeze (an incremental copies what changed since its parent).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sdbackup.blocks.blockset import BlockSet
from sdbackup.blocks.diskset import DiskSet
from sdbackup.meta.tracking import ChangeTracker


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


class BackupSource(Protocol):
    """A cluster to back up (see the module docstring)."""

    @property
    def config(self) -> SourceConfig: ...

    @property
    def disks(self) -> DiskSet: ...

    def freeze(self, snapshot_path: Path) -> AbstractContextManager[Snapshot]: ...

    def used_blocks(self, disk_id: int) -> BlockSet: ...

    @property
    def tracker(self) -> ChangeTracker: ...

    def write_activity(self) -> int:
        """A counter that grows whenever an application writes (write mappings)."""
        ...
