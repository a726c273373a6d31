"""The block seam: one interface for every source of blocks, keyed by disk id.

The file system is written once against it (DESIGN.md, layer 1): the live shared disks
(:class:`~sdbackup.blocks.diskset.DiskSet`), one backup generation
(:class:`~sdbackup.media.generation.GenerationReader`) and, in later issues, a chain of
generations, a tape behind a disk buffer and a group generation are each one
:class:`BlockSource`. Only the live disks are a :class:`BlockStore` (the write half).

Contract of ``readinto(disk, block, buf)``: ``buf`` is a whole number of blocks and is
filled completely; blocks the source does not hold (unused, never written) read as
zeros; a block it holds but cannot prove intact raises
:class:`~sdbackup.errors.CorruptError` naming the disk and the block, never returns
wrong data. A page-aligned ``buf`` lets a direct-I/O source read into it with no copy.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from sdbackup.types import DiskId

Buffer = memoryview | bytearray | mmap.mmap


@runtime_checkable
class BlockSource(Protocol):
    """The read half: whole blocks by (disk id, block number)."""

    @property
    def block_size(self) -> int: ...

    def readinto(self, disk: DiskId, block: int, buf: Buffer) -> None: ...


@runtime_checkable
class BlockStore(BlockSource, Protocol):
    """The write half (the live disks only): writes, and making them durable."""

    def write(self, disk: DiskId, block: int, data: bytes | Buffer) -> None: ...

    def datasync(self, disks: Iterable[DiskId] | None = None) -> None:
        """Everything written to these disks (default: all) before the call is on
        stable storage when it returns."""
        ...

    def fsync(self) -> None: ...


def read_blocks(src: BlockSource, disk: DiskId, block: int, count: int) -> bytes:
    """``count`` blocks as bytes (a convenience over ``readinto``)."""
    buf = bytearray(count * src.block_size)
    src.readinto(disk, block, buf)
    return bytes(buf)
