"""The cluster's shared disks, opened on one host: the live block source and store."""

from __future__ import annotations

from collections.abc import Iterable

from sdbackup.blocks.device import BlockDevice
from sdbackup.blocks.source import Buffer
from sdbackup.errors import UsageError
from sdbackup.types import DiskId


class DiskSet:
    """Disks by id (and their names); a :class:`~sdbackup.blocks.source.BlockStore`."""

    def __init__(self, block_size: int, disks: Iterable[tuple[int, str, BlockDevice]]) -> None:
        self._block_size = block_size
        self.by_id: dict[DiskId, BlockDevice] = {}
        self.ids: dict[str, DiskId] = {}
        self.names: dict[DiskId, str] = {}
        for disk_id, name, dev in disks:
            self.by_id[DiskId(disk_id)] = dev
            self.ids[name] = DiskId(disk_id)
            self.names[DiskId(disk_id)] = name

    @property
    def block_size(self) -> int:
        return self._block_size

    def device(self, disk: DiskId | int) -> BlockDevice:
        try:
            return self.by_id[DiskId(disk)]
        except KeyError:
            known = ", ".join(f"{n} (id {i})" for i, n in sorted(self.names.items()))
            raise UsageError(f"unknown disk id {disk} (disks: {known or 'none'})") from None

    def id_of(self, name: str) -> DiskId:
        try:
            return self.ids[name]
        except KeyError:
            known = ", ".join(sorted(self.ids)) or "none"
            raise UsageError(f"unknown disk {name!r} (disks: {known})") from None

    def readinto(self, disk: DiskId, block: int, buf: Buffer) -> None:
        self.device(disk).readinto(block, buf)

    def write(self, disk: DiskId, block: int, data: bytes | Buffer) -> None:
        self.device(disk).write(block, data)

    def datasync(self, disks: Iterable[DiskId] | None = None) -> None:
        """Everything written to these disks (default: all) before the call is on stable
        storage when it returns (a group commit per disk, see BlockDevice.datasync)."""
        for disk_id in sorted(set(self.by_id if disks is None else disks)):
            self.by_id[disk_id].datasync()

    def fsync(self) -> None:
        self.datasync()

    def close(self) -> None:
        for dev in self.by_id.values():
            dev.close()
