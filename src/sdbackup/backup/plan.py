"""What a full backup copies: the used blocks of every disk at T0 (seed a.8, Fig. 17-19).

The allocation bitmap (the seed's empty-area control table, Fig. 18) is read as runs
(the used-block list, Fig. 19) into one :class:`~sdbackup.blocks.blockset.BlockSet` per
disk. It holds exactly the blocks of every file's extents plus each disk's reserved
label blocks (``tests/test_backup_plan.py`` checks this as a property).
"""

from __future__ import annotations

from dataclasses import dataclass

from sdbackup.backup.source import BackupSource, SourceDisk
from sdbackup.blocks.blockset import BlockSet
from sdbackup.errors import CorruptError


@dataclass
class Plan:
    """Used blocks per disk id, listed at T0."""

    disks: dict[int, BlockSet]
    info: dict[int, SourceDisk]

    @property
    def blocks(self) -> int:
        return sum(len(s) for s in self.disks.values())

    def runs(self) -> int:
        return sum(s.num_runs() for s in self.disks.values())


def make_plan(source: BackupSource) -> Plan:
    """List every disk's used blocks from the allocation bitmap (call inside the freeze)."""
    disks: dict[int, BlockSet] = {}
    for d in source.config.disks:
        used = source.used_blocks(d.id)
        if used and used.max() >= d.nblocks:
            raise CorruptError(f"the allocation bitmap of disk {d.name} lists blocks outside "
                               f"the disk's {d.nblocks} blocks: run 'sdbackup fsck'")
        disks[d.id] = used
    return Plan(disks, {d.id: d for d in source.config.disks})
