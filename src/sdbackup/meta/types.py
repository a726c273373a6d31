"""Plain values that cross the coordinator/node boundary (and later the wire)."""

from __future__ import annotations

import stat
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from sdbackup.types import DiskId


@dataclass(frozen=True, slots=True)
class Attr:
    """The attributes of one inode, as ``stat`` would show them."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int  # in 512-byte units, as st_blocks
    atime_ns: int
    mtime_ns: int
    ctime_ns: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Attr:
        return cls(**d)


class Extent(NamedTuple):
    """File blocks [fblock, fblock+length) live at disk blocks [dblock, dblock+length)."""

    fblock: int
    length: int
    disk: DiskId
    dblock: int


class WriteRun(NamedTuple):
    """One run of a write mapping; ``new`` runs are reserved and must be committed.

    ``bi_time`` is non-zero while a backup runs and the run's disk blocks belong to its
    block set: the writer must first save their before image, stamped with this
    logical time, durably (the write-ahead rule).
    """

    fblock: int
    length: int
    disk: DiskId
    dblock: int
    new: bool
    bi_time: int = 0


class DirEntry(NamedTuple):
    """One directory entry; ``cookie`` resumes a listing after this entry."""

    cookie: int
    name: bytes
    attr: Attr


@dataclass(frozen=True, slots=True)
class StatFs:
    block_size: int
    blocks: int
    free: int
    files: int
    name_max: int = 255
