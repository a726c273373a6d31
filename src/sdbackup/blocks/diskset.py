"""The cluster's shared disks, opened on one host: the live :class:`BlockReader`."""

from __future__ import annotations

from collections.abc import Iterable

from sdbackup.blocks.device import BlockDevice
from sdbackup.errors import UsageError


class DiskSet:
    """Disks by id and by name; reads and writes whole blocks directly on them."""

    def __init__(self, block_size: int, disks: Iterable[tuple[int, str, BlockDevice]]) -> None:
        self._block_size = block_size
        self.by_id: dict[int, BlockDevice] = {}
        self.ids: dict[str, int] = {}
        self.names: dict[int, str] = {}
        for disk_id, name, dev in disks:
            self.by_id[disk_id] = dev
            self.ids[name] = disk_id
            self.names[disk_id] = name

    @property
    def block_size(self) -> int:
        return self._block_size

    def device(self, disk: str | int) -> BlockDevice:
        try:
            return self.by_id[disk] if isinstance(disk, int) else self.by_id[self.ids[disk]]
        except KeyError:
            known = ", ".join(sorted(self.ids)) or "none"
            raise UsageError(f"unknown disk {disk!r} (disks: {known})") from None

    def read(self, disk: str, block: int, count: int) -> bytes:
        return self.device(disk).read(block, count)

    def write(self, disk: str, block: int, data: bytes | memoryview) -> None:
        self.device(disk).write(block, data)

    def datasync(self, disks: Iterable[int] | None = None) -> None:
        """Everything written to these disks (default: all) before the call is on stable
        storage when it returns (a group commit per disk, see BlockDevice.datasync)."""
        for disk_id in sorted(set(self.by_id if disks is None else disks)):
            self.by_id[disk_id].datasync()

    def fsync(self) -> None:
        self.datasync()

    def close(self) -> None:
        for dev in self.by_id.values():
            dev.close()
