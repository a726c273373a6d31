"""The read half of the metadata service: answers over a metadata store, changes nothing.

:class:`MetadataReader` implements :class:`~sdbackup.meta.api.MetaSource` over a
:class:`~sdbackup.meta.store.MetaStore`: the live store (as the base of
:class:`~sdbackup.meta.service.MetadataService`, which adds every change), or the
immutable metadata snapshot of a backup generation at T0 (opened read-only), so that
a generation is walked and read by the very same code as the live cluster.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Sequence
from typing import Any

from sdbackup.blocks.blockset import BlockSet
from sdbackup.errors import CorruptError, FsError
from sdbackup.meta.alloc import DiskBitmap
from sdbackup.meta.api import READDIR_BATCH
from sdbackup.meta.store import MetaStore
from sdbackup.meta.types import Attr, DirEntry, Extent, StatFs
from sdbackup.types import ROOT_INODE, DiskId

NAME_MAX = 255
_ATTR_COLS = "id, mode, nlink, uid, gid, rdev, size, atime_ns, mtime_ns, ctime_ns"


class MetadataReader:
    """Metadata queries (the read half of the metadata seam)."""

    def __init__(self, store: MetaStore) -> None:
        self.store = store
        self.block_size = int(store.get_meta("block_size") or 4096)
        self.disk_names: dict[int, str] = {
            int(i): str(n) for i, n in store.query("SELECT id, name FROM disks ORDER BY id")}
        self._bitmaps: dict[int, DiskBitmap] | None = None

    @property
    def bitmaps(self) -> dict[int, DiskBitmap]:
        """The allocation bitmaps, loaded on first use (a reader that never asks for
        free space or used blocks never reads them)."""
        if self._bitmaps is None:
            bms: dict[int, DiskBitmap] = {}
            with self.store.lock:
                for disk_id, nblocks in self.store.query(
                        "SELECT id, nblocks FROM disks ORDER BY id"):
                    bm = DiskBitmap(int(disk_id), int(nblocks))
                    bm.load(self.store)
                    bms[int(disk_id)] = bm
            self._bitmaps = bms
        return self._bitmaps

    def _attr_row(self, ino: int) -> tuple[Any, ...]:
        row = self.store.get_row(f"SELECT {_ATTR_COLS} FROM inodes WHERE id=?", (ino,))
        if row is None:
            raise FsError(errno.ENOENT, f"inode {ino} does not exist")
        return row

    def _make_attr(self, row: Sequence[Any]) -> Attr:
        ino = int(row[0])
        nblk = 0
        if stat.S_ISREG(row[1]):
            nblk = int(
                self.store.get_val(
                    "SELECT COALESCE(SUM(count), 0) FROM extents WHERE ino=?", (ino,)
                )
            )
        return Attr(
            ino=ino,
            mode=row[1],
            nlink=row[2],
            uid=row[3],
            gid=row[4],
            rdev=row[5],
            size=row[6],
            blocks=nblk * self.block_size // 512,
            atime_ns=row[7],
            mtime_ns=row[8],
            ctime_ns=row[9],
        )

    def _dir_row(self, ino: int) -> tuple[Any, ...]:
        row = self._attr_row(ino)
        if not stat.S_ISDIR(row[1]):
            raise FsError(errno.ENOTDIR, f"inode {ino} is not a directory")
        return row

    def _child(self, parent: int, name: bytes) -> int | None:
        row = self.store.get_row(
            "SELECT ino FROM dirents WHERE parent=? AND name=?", (parent, name)
        )
        return None if row is None else int(row[0])

    def getattr(self, ino: int) -> Attr:
        with self.store.lock:
            return self._make_attr(self._attr_row(ino))

    def lookup(self, parent: int, name: bytes) -> Attr:
        with self.store.lock:
            self._dir_row(parent)
            if name == b".":
                return self.getattr(parent)
            if name == b"..":
                return self.getattr(self.parent_of(parent))
            if len(name) > NAME_MAX:
                raise FsError(errno.ENAMETOOLONG, "file name too long")
            ino = self._child(parent, name)
            if ino is None:
                raise FsError(errno.ENOENT, f"{name.decode(errors='replace')} not found")
            return self.getattr(ino)

    def parent_of(self, ino: int) -> int:
        if ino == ROOT_INODE:
            return ROOT_INODE
        row = self.store.get_row("SELECT parent FROM dirents WHERE ino=? LIMIT 1", (ino,))
        if row is None:
            raise FsError(errno.ENOENT, f"inode {ino} has no parent")
        return int(row[0])

    def readlink(self, ino: int) -> bytes:
        row = self.store.get_row("SELECT mode, target FROM inodes WHERE id=?", (ino,))
        if row is None:
            raise FsError(errno.ENOENT, f"inode {ino} does not exist")
        if not stat.S_ISLNK(row[0]):
            raise FsError(errno.EINVAL, f"inode {ino} is not a symlink")
        return bytes(row[1])

    def readdir(self, ino: int, after: int = 0, limit: int = READDIR_BATCH) -> list[DirEntry]:
        """Entries with cookie > ``after`` (0: from the start) in a stable order (no '.'
        or '..'). An entry naming an inode that does not exist is a CorruptError: a
        damaged (or forged) store is reported, never skipped."""
        with self.store.lock:
            self._dir_row(ino)
            rows = self.store.query(
                f"SELECT d.id, d.name, d.ino, i.{_ATTR_COLS.replace(', ', ', i.')} "
                "FROM dirents d LEFT JOIN inodes i ON i.id = d.ino "
                "WHERE d.parent=? AND d.id>? ORDER BY d.id LIMIT ?",
                (ino, after if after else -(1 << 63), limit),
            )
            out = []
            for r in rows:
                if r[3] is None:
                    raise CorruptError(f"directory entry {bytes(r[1])!r} of inode {ino} names "
                                       f"inode {r[2]}, which does not exist")
                out.append(DirEntry(int(r[0]), bytes(r[1]), self._make_attr(r[3:])))
            return out

    def statfs(self) -> StatFs:
        with self.store.lock:
            total = sum(bm.nblocks for bm in self.bitmaps.values())
            free = sum(bm.free_blocks() for bm in self.bitmaps.values())
            files = int(self.store.get_val("SELECT COUNT(*) FROM inodes"))
            return StatFs(block_size=self.block_size, blocks=total, free=free, files=files)

    def _extents(self, ino: int, fblock: int, count: int) -> list[Extent]:
        rows = self.store.query(
            "SELECT fblock, count, disk, dblock FROM extents WHERE ino=? AND fblock<? "
            "AND fblock>=COALESCE((SELECT MAX(fblock) FROM extents WHERE ino=? AND fblock<=?), 0)"
            " ORDER BY fblock",
            (ino, fblock + count, ino, fblock),
        )
        out = []
        end = fblock + count
        for f, c, d, b in rows:
            s, e = max(f, fblock), min(f + c, end)
            if s < e:
                out.append(Extent(s, e - s, DiskId(d), b + (s - f)))
        return out

    def map_read(self, ino: int, fblock: int, count: int) -> list[Extent]:
        """The extents that hold file blocks [fblock, fblock+count), clipped; gaps are holes."""
        with self.store.lock:
            return self._extents(ino, fblock, count)

    def all_extents(self, ino: int) -> list[Extent]:
        return [Extent(*r) for r in self.store.query(
            "SELECT fblock, count, disk, dblock FROM extents WHERE ino=? ORDER BY fblock", (ino,)
        )]

    def disk_ids(self) -> dict[str, int]:
        return {n: i for i, n in self.disk_names.items()}

    def used_set(self, disk: int) -> BlockSet:
        """The used blocks of one disk, from the allocation bitmap, as a set: built in C
        from the packed bitmap (about 10 ms per million blocks, whatever the
        fragmentation), never a Python object per run. The bitmap is copied under the
        store lock (a memcpy) and converted outside it."""
        with self.store.lock:
            bm = self.bitmaps[disk]
            nblocks = bm.nblocks
            packed = bm.committed[: (nblocks + 7) // 8].copy()
        used = BlockSet.from_bitmap(packed)
        if nblocks & 7:
            used.remove_run(nblocks, 8 - (nblocks & 7))  # the last byte's padding: set
        return used

    def used_runs(self, disk: int) -> list[tuple[int, int]]:
        """Runs (start, count) of used blocks of one disk, from the allocation bitmap."""
        import numpy as np

        with self.store.lock:
            bm = self.bitmaps[disk]
            bits = np.unpackbits(bm.committed, bitorder="little")[: bm.nblocks].astype(np.int8)
        edges = np.diff(np.concatenate(([0], bits, [0])))
        starts = np.flatnonzero(edges == 1)
        ends = np.flatnonzero(edges == -1)
        return [(int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]
