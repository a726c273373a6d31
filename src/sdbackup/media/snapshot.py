"""A generation's metadata snapshot (the store at T0), read-only: its metadata source.

The snapshot is opened with SQLite's ``immutable`` read-only mode: nothing is ever
written next to it on the medium (no journal, no WAL, no lock files). The caller checks
its checksum against the manifest first (:meth:`Generation.meta_file`), so SQLite never
reads a damaged file; SQLite errors are still turned into :class:`CorruptError`.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sdbackup.blocks.blockset import BlockSet
from sdbackup.errors import CorruptError, SdbError
from sdbackup.meta.alloc import CHUNK_BYTES
from sdbackup.meta.reader import MetadataReader
from sdbackup.meta.store import MetaStore


class SnapshotMeta(MetadataReader):
    """A generation's metadata snapshot at T0: that generation's metadata source (the
    read half of the metadata seam, as the live cluster's), plus what ``verify`` checks.
    """

    def __init__(self, path: Path, where: str) -> None:
        self.path = path
        self.where = where
        try:
            store = MetaStore(path, read_only=True)
        except SdbError as e:
            raise CorruptError(f"{where}: metadata snapshot {path} cannot be read "
                               f"({e.message})") from None
        try:
            super().__init__(store)
        except sqlite3.DatabaseError as e:
            store.close()
            raise CorruptError(f"{where}: metadata snapshot {path} cannot be read ({e})"
                               ) from None

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> SnapshotMeta:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return self.store.query(sql, params)
        except sqlite3.DatabaseError as e:
            raise CorruptError(f"{self.where}: metadata snapshot {self.path} is damaged "
                               f"({e})") from None

    def get_meta(self, key: str) -> str | None:
        rows = self.query("SELECT value FROM meta WHERE key=?", (key,))
        return None if not rows else str(rows[0][0])

    def quick_check(self) -> list[str]:
        return [str(r[0]) for r in self.query("PRAGMA quick_check") if r[0] != "ok"]

    def disks(self) -> list[tuple[int, str, int, int]]:
        return [(int(i), str(n), int(nb), int(r)) for i, n, nb, r in
                self.query("SELECT id, name, nblocks, reserved FROM disks ORDER BY id")]

    def used_blocks(self, disk_id: int, nblocks: int) -> BlockSet:
        """The used blocks of a disk from the snapshot's allocation bitmap."""
        bits = np.zeros((nblocks + 7) // 8, dtype=np.uint8)
        for chunk, blob in self.query("SELECT chunk, bits FROM alloc WHERE disk=?", (disk_id,)):
            start = int(chunk) * CHUNK_BYTES
            arr = np.frombuffer(bytes(blob), dtype=np.uint8)
            n = max(0, min(arr.size, bits.size - start))
            bits[start : start + n] |= arr[:n]
        used = BlockSet.from_bitmap(bits)
        used.remove_run(nblocks, bits.size * 8 - nblocks)  # padding bits are set
        return used

    def group_info(self) -> dict[str, str] | None:
        """For a group generation (``meta/groups.py``: ``sdb_group``): its name, list
        (JSON), meta scope and file count; None for a whole-cluster generation."""
        if not self.query("SELECT 1 FROM sqlite_master WHERE type='table' AND "
                          "name='sdb_group'"):
            return None
        return {str(k): str(v) for k, v in self.query("SELECT key, value FROM sdb_group")}

    def group_blocks(self, disk_id: int) -> BlockSet | None:
        """The group block list at T0 of a group generation (the blocks it answers
        for); None for a whole-cluster generation."""
        if self.group_info() is None:
            return None
        rows = self.query("SELECT data FROM sdb_group_blocks WHERE disk=?", (disk_id,))
        return BlockSet.deserialize(bytes(rows[0][0])) if rows else BlockSet()

    def view_blocks(self, disk_id: int, nblocks: int) -> BlockSet:
        """The blocks the generation answers for: those in use at T0, or, for a group
        generation, the group's blocks at T0 (its chain holds exactly these)."""
        g = self.group_blocks(disk_id)
        return self.used_blocks(disk_id, nblocks) if g is None else g

    def extent_rows(self) -> npt.NDArray[np.int64]:
        """Every extent as rows (ino, fblock, count, disk, dblock)."""
        rows = self.query("SELECT ino, fblock, count, disk, dblock FROM extents "
                          "ORDER BY ino, fblock")
        return np.array(rows, dtype=np.int64).reshape(-1, 5)
