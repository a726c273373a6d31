"""The one read interface every source of blocks implements.

The live shared disks, one backup generation, a chain of generations, a log-first
overlay and a tape behind a disk buffer all answer ``read(disk, block, count)``; the
file system is written once against it, so "mount a backup" is the same file system
code over another reader (DESIGN.md, layer 1).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class BlockReader(Protocol):
    """Reads whole blocks by (disk name, block number).

    Guarantees: the returned buffer is exactly ``count * block_size`` bytes; blocks
    the source does not hold (unused, never written) read as zeros; a block the source
    holds but cannot prove intact raises :class:`sdbackup.errors.CorruptError` naming
    the disk and block, never returns wrong data.
    """

    @property
    def block_size(self) -> int: ...

    def read(self, disk: str, block: int, count: int) -> bytes: ...


@runtime_checkable
class BlockWriter(Protocol):
    """Writes whole blocks by (disk name, block number); only the live disks do."""

    @property
    def block_size(self) -> int: ...

    def write(self, disk: str, block: int, data: bytes | memoryview) -> None: ...
