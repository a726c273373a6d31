"""The metadata authority: namespace, attributes, extents and allocation.

Runs inside the coordinator only. Nodes call it (in-process, or over the cluster
protocol) for everything but file data, which they read and write on the shared
disks themselves.

Guarantees:

- Every method is one SQLite transaction: it changes all or nothing, and a failed
  transaction leaves the in-memory bitmaps equal to the store (``_reload_bitmaps``).
- Ordered writes: :meth:`map_write` only *reserves* blocks for holes; a node writes the
  data, then :meth:`commit_write` makes the extents and the allocation durable
  together. A crash in between leaves the blocks free and the file unchanged.
- Names are bytes, 1..255 long, without ``/`` or NUL, never ``.`` or ``..``.

Developer note: ``self.store.lock`` is held across each whole method (it is an
RLock and ``transaction()`` takes it); bitmap changes happen inside that lock, so
allocation and commit of one write never interleave with another's.
"""

from __future__ import annotations

import errno
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sdbackup.errors import FsError
from sdbackup.meta.alloc import allocate
from sdbackup.meta.reader import NAME_MAX, MetadataReader
from sdbackup.meta.store import MetaStore
from sdbackup.meta.tracking import ChangeTracker, Run
from sdbackup.meta.types import Attr, Extent, WriteRun
from sdbackup.types import ROOT_INODE, DiskId

SPREAD_RUN = 1 << 16  # blocks: how far a file that ran into another one may jump ahead
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2



def check_name(name: bytes) -> None:
    """Refuse names a POSIX file system cannot hold."""
    if not name or name in (b".", b".."):
        raise FsError(errno.EINVAL, f"invalid file name {name!r}")
    if b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL, f"file name {name!r} contains '/' or NUL")
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG, f"file name is {len(name)} bytes, over {NAME_MAX}")


class MetadataService(MetadataReader):
    """All metadata operations of the cluster file system: the reads of
    :class:`~sdbackup.meta.reader.MetadataReader` and every change."""

    def __init__(self, store: MetaStore) -> None:
        super().__init__(store)
        self.bitmaps  # noqa: B018 - allocation needs them from the start
        self._opens: dict[int, int] = {}
        self.tracker = ChangeTracker(store)
        # Write mappings asked for so far (any node): an online backup's adaptive pacing
        # reads it to tell whether applications are writing (backup/copy.py).
        self.write_ops = 0
        self._tracked: list[tuple[int, list[Run]]] = []  # recorded in the open transaction
        self._purge_orphans()

    # -- helpers ----------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[None]:
        try:
            with self.store.transaction():
                yield
                for bm in self.bitmaps.values():
                    if bm.dirty_chunks:
                        bm.save_dirty(self.store)
        except BaseException:
            if not self.store._depth:
                self._reload_bitmaps()
                self._tracked.clear()
            raise
        if not self.store._depth and self._tracked:
            for era, runs in self._tracked:
                self.tracker.confirm(era, runs)
            self._tracked.clear()

    def _track(self, runs: Sequence[Run]) -> None:
        """Record changed blocks in the open transaction (allocations and frees: see
        meta/tracking.py for why these need no sync of their own)."""
        need = self.tracker.unrecorded(runs)
        if need:
            self._tracked.append((self.tracker.insert(need), need))

    def _reload_bitmaps(self) -> None:
        for bm in self.bitmaps.values():
            bm.reload(self.store)

    def _touch_dir(self, ino: int, now: int) -> None:
        self.store.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=? WHERE id=?", (now, now, ino))

    def _new_inode(self, mode: int, uid: int, gid: int, nlink: int, rdev: int = 0,
                   target: bytes | None = None, size: int = 0) -> int:
        now = time.time_ns()
        # Inode numbers are never reused: state that outlives a file anywhere (a node's
        # cache, a right, a write-back in flight) must never match a new file.
        ino = max(int(self.store.get_meta("next_inode") or 0),
                  int(self.store.get_val("SELECT COALESCE(MAX(id), 0) FROM inodes")) + 1)
        self.store.execute(
            "INSERT INTO inodes(id, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, nlink,"
            " rdev, target) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (ino, mode, uid, gid, size, now, now, now, nlink, rdev, target),
        )
        self.store.set_meta("next_inode", str(ino + 1))
        return ino

    def _maybe_delete(self, ino: int) -> None:
        """Free an inode whose last name is gone, unless someone still has it open."""
        row = self.store.get_row("SELECT nlink FROM inodes WHERE id=?", (ino,))
        if row is None or row[0] > 0 or self._opens.get(ino, 0) > 0:
            return
        self._free_extents(ino, 0)
        self.store.execute("DELETE FROM inodes WHERE id=?", (ino,))

    def _free_extents(self, ino: int, from_fblock: int) -> None:
        """Drop every mapping of file blocks >= from_fblock and free their disk blocks."""
        rows = self.store.query(
            "SELECT fblock, count, disk, dblock FROM extents WHERE ino=? "
            "AND fblock + count > ? ORDER BY fblock",
            (ino, from_fblock),
        )
        for fblock, count, disk, dblock in rows:
            if fblock < from_fblock:
                keep = from_fblock - fblock
                self.store.execute(
                    "UPDATE extents SET count=? WHERE ino=? AND fblock=?", (keep, ino, fblock)
                )
                self.bitmaps[disk].free(dblock + keep, count - keep)
                self._track([(disk, dblock + keep, count - keep)])
            else:
                self.store.execute("DELETE FROM extents WHERE ino=? AND fblock=?", (ino, fblock))
                self.bitmaps[disk].free(dblock, count)
                self._track([(disk, dblock, count)])

    def _purge_orphans(self) -> None:
        """Inodes with no names left over from a crash while they were open."""
        with self._tx():
            for (ino,) in self.store.query("SELECT id FROM inodes WHERE nlink<=0"):
                self._maybe_delete(int(ino))

    # -- namespace --------------------------------------------------------------------
    def _create(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
                rdev: int = 0, target: bytes | None = None) -> Attr:
        check_name(name)
        with self._tx():
            self._dir_row(parent)
            if self._child(parent, name) is not None:
                raise FsError(errno.EEXIST, f"{name.decode(errors='replace')} exists")
            is_dir = stat.S_ISDIR(mode)
            ino = self._new_inode(mode, uid, gid, 2 if is_dir else 1, rdev, target,
                                  size=len(target) if target is not None else 0)
            self.store.execute(
                "INSERT INTO dirents(parent, name, ino) VALUES (?,?,?)", (parent, name, ino)
            )
            now = time.time_ns()
            self._touch_dir(parent, now)
            if is_dir:
                self.store.execute("UPDATE inodes SET nlink=nlink+1 WHERE id=?", (parent,))
            return self.getattr(ino)

    def mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
              rdev: int = 0) -> Attr:
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            raise FsError(errno.EINVAL, "use mkdir or symlink for that type")
        return self._create(parent, name, mode, uid, gid, rdev)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        return self._create(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        if not target or len(target) > 4095 or b"\0" in target:
            raise FsError(errno.EINVAL if target else errno.ENOENT, "bad symlink target")
        return self._create(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        check_name(new_name)
        with self._tx():
            row = self._attr_row(ino)
            if stat.S_ISDIR(row[1]):
                raise FsError(errno.EPERM, "cannot hard-link a directory")
            self._dir_row(new_parent)
            if self._child(new_parent, new_name) is not None:
                raise FsError(errno.EEXIST, f"{new_name.decode(errors='replace')} exists")
            self.store.execute(
                "INSERT INTO dirents(parent, name, ino) VALUES (?,?,?)", (new_parent, new_name, ino)
            )
            now = time.time_ns()
            self.store.execute(
                "UPDATE inodes SET nlink=nlink+1, ctime_ns=? WHERE id=?", (now, ino)
            )
            self._touch_dir(new_parent, now)
            return self.getattr(ino)

    def unlink(self, parent: int, name: bytes) -> None:
        with self._tx():
            self._dir_row(parent)
            ino = self._child(parent, name)
            if ino is None:
                raise FsError(errno.ENOENT, f"{name.decode(errors='replace')} not found")
            if stat.S_ISDIR(self._attr_row(ino)[1]):
                raise FsError(errno.EISDIR, f"{name.decode(errors='replace')} is a directory")
            self._drop_entry(parent, name, ino, is_dir=False)

    def rmdir(self, parent: int, name: bytes) -> None:
        with self._tx():
            self._dir_row(parent)
            if name == b".":
                raise FsError(errno.EINVAL, "cannot remove '.'")
            ino = self._child(parent, name)
            if ino is None:
                raise FsError(errno.ENOENT, f"{name.decode(errors='replace')} not found")
            self._dir_row(ino)
            if self.store.has_val("SELECT 1 FROM dirents WHERE parent=? LIMIT 1", (ino,)):
                raise FsError(errno.ENOTEMPTY, f"{name.decode(errors='replace')} is not empty")
            self._drop_entry(parent, name, ino, is_dir=True)

    def _drop_entry(self, parent: int, name: bytes, ino: int, *, is_dir: bool) -> None:
        now = time.time_ns()
        self.store.execute("DELETE FROM dirents WHERE parent=? AND name=?", (parent, name))
        if is_dir:
            self.store.execute("UPDATE inodes SET nlink=0, ctime_ns=? WHERE id=?", (now, ino))
            self.store.execute("UPDATE inodes SET nlink=nlink-1 WHERE id=?", (parent,))
        else:
            self.store.execute(
                "UPDATE inodes SET nlink=nlink-1, ctime_ns=? WHERE id=?", (now, ino)
            )
        self._touch_dir(parent, now)
        self._maybe_delete(ino)

    def _is_ancestor(self, anc: int, ino: int) -> bool:
        """True when ``anc`` is ``ino`` or one of its ancestors."""
        cur = ino
        while True:
            if cur == anc:
                return True
            if cur == ROOT_INODE:
                return False
            cur = self.parent_of(cur)

    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0) -> None:
        """POSIX rename: atomic, replaces the target, never moves a dir into itself."""
        check_name(new_name)
        if flags & ~RENAME_NOREPLACE:
            raise FsError(errno.EINVAL, "only the RENAME_NOREPLACE flag is supported")
        with self._tx():
            self._dir_row(parent)
            self._dir_row(new_parent)
            ino = self._child(parent, name)
            if ino is None:
                raise FsError(errno.ENOENT, f"{name.decode(errors='replace')} not found")
            src_dir = stat.S_ISDIR(self._attr_row(ino)[1])
            target = self._child(new_parent, new_name)
            if target == ino:
                return
            if target is not None and flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST, f"{new_name.decode(errors='replace')} exists")
            if src_dir and self._is_ancestor(ino, new_parent):
                raise FsError(errno.EINVAL, "cannot move a directory into itself")
            now = time.time_ns()
            if target is not None:
                tgt_dir = stat.S_ISDIR(self._attr_row(target)[1])
                if src_dir and not tgt_dir:
                    raise FsError(errno.ENOTDIR, f"{new_name.decode(errors='replace')} is not "
                                  "a directory")
                if not src_dir and tgt_dir:
                    raise FsError(errno.EISDIR, f"{new_name.decode(errors='replace')} is a "
                                  "directory")
                if tgt_dir and self.store.has_val(
                    "SELECT 1 FROM dirents WHERE parent=? LIMIT 1", (target,)
                ):
                    raise FsError(errno.ENOTEMPTY, f"{new_name.decode(errors='replace')} is "
                                  "not empty")
                self._drop_entry(new_parent, new_name, target, is_dir=tgt_dir)
            self.store.execute(
                "UPDATE dirents SET parent=?, name=? WHERE parent=? AND name=?",
                (new_parent, new_name, parent, name),
            )
            if src_dir and parent != new_parent:
                self.store.execute("UPDATE inodes SET nlink=nlink-1 WHERE id=?", (parent,))
                self.store.execute("UPDATE inodes SET nlink=nlink+1 WHERE id=?", (new_parent,))
            self.store.execute("UPDATE inodes SET ctime_ns=? WHERE id=?", (now, ino))
            self._touch_dir(parent, now)
            if new_parent != parent:
                self._touch_dir(new_parent, now)

    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None) -> Attr:
        with self._tx():
            row = self._attr_row(ino)
            sets: list[str] = []
            vals: list[int] = []
            if mode is not None:
                sets.append("mode=?")
                vals.append(stat.S_IFMT(row[1]) | (mode & 0o7777))
            for col, v in (("uid", uid), ("gid", gid), ("atime_ns", atime_ns),
                           ("mtime_ns", mtime_ns)):
                if v is not None:
                    sets.append(f"{col}=?")
                    vals.append(v)
            sets.append("ctime_ns=?")
            vals.append(time.time_ns())
            self.store.execute(f"UPDATE inodes SET {', '.join(sets)} WHERE id=?", (*vals, ino))
            return self.getattr(ino)

    def open(self, ino: int) -> None:
        with self.store.lock:
            self._attr_row(ino)
            self._opens[ino] = self._opens.get(ino, 0) + 1

    def release(self, ino: int) -> None:
        with self._tx():
            n = self._opens.get(ino, 0) - 1
            if n <= 0:
                self._opens.pop(ino, None)
                self._maybe_delete(ino)
            else:
                self._opens[ino] = n

    # -- data mapping -------------------------------------------------------------------
    def _pick_disk(self, ino: int, need: int) -> list[int]:
        ids = sorted(self.bitmaps)
        first = ids[ino % len(ids)]
        rest = sorted((d for d in ids if d != first),
                      key=lambda d: -self.bitmaps[d].free_blocks())
        return [first, *rest]

    def map_write(self, ino: int, fblock: int, count: int) -> list[WriteRun]:
        """Map file blocks [fblock, fblock+count) for writing.

        Existing extents are returned as they are (overwrite in place); every hole is
        filled with newly *reserved* blocks (``new=True``), placed right after the
        file's previous block when that is free, so that files stay contiguous. The
        caller writes the data, then calls :meth:`commit_write` with the new runs (or
        :meth:`abort_write`). Raises ENOSPC, reserving nothing, when the disks are full.
        """
        self.write_ops += 1
        with self.store.lock:
            row = self._attr_row(ino)
            if not stat.S_ISREG(row[1]):
                raise FsError(errno.EISDIR if stat.S_ISDIR(row[1]) else errno.EINVAL,
                              f"inode {ino} is not a regular file")
            have = self._extents(ino, fblock, count)
            out: list[WriteRun] = []
            reserved: list[WriteRun] = []
            pos = fblock
            end = fblock + count
            try:
                for ext in [*have, Extent(end, 0, DiskId(-1), -1)]:
                    if ext.fblock > pos:
                        for r in self._reserve(ino, pos, ext.fblock - pos):
                            reserved.append(r)
                            out.append(r)
                    if ext.length:
                        out.append(WriteRun(ext.fblock, ext.length, ext.disk, ext.dblock, False))
                    pos = ext.fblock + ext.length
            except FsError:
                self.abort_write(reserved)
                raise
        # An overwrite in place may reach the disk as soon as this returns: its blocks
        # are recorded durably first (changed-block tracking, meta/tracking.py).
        over = [(r.disk, r.dblock, r.length) for r in out if not r.new]
        if over:
            try:
                self.tracker.record_overwrites(over)
            except BaseException:
                self.abort_write(reserved)
                raise
        return out

    def _reserve(self, ino: int, fblock: int, count: int) -> list[WriteRun]:
        prev = self.store.get_row(
            "SELECT fblock, count, disk, dblock FROM extents WHERE ino=? AND fblock<? "
            "ORDER BY fblock DESC LIMIT 1",
            (ino, fblock),
        )
        order: list[int]
        goal: dict[int, int] = {}
        if prev is not None:
            pf, pc, pd, pb = prev
            g = pb + pc + (fblock - pf - pc)
            bm = self.bitmaps[pd]
            if not bm.is_free(g, 1):
                # Another file took the blocks after this one (two files growing side
                # by side): go on in the middle of the next free run, so that both keep
                # growing contiguously instead of alternating one run per write.
                found = bm.next_free_run(g, SPREAD_RUN)
                if found is not None and found[1] >= 2 * count:
                    g = found[0] + found[1] // 2
            goal[pd] = g
            order = [pd, *(d for d in sorted(self.bitmaps) if d != pd)]
        else:
            order = self._pick_disk(ino, count)
        runs: list[WriteRun] = []
        need = count
        pos = fblock
        for disk in order:
            bm = self.bitmaps[disk]
            g = goal.get(disk, bm.cursor)
            got = allocate(bm, need, g)
            for start, n in got:
                runs.append(WriteRun(pos, n, DiskId(disk), start, True))
                pos += n
                need -= n
            if got and disk not in goal:
                bm.cursor = got[-1][0] + got[-1][1]
            if need == 0:
                return runs
        self.abort_write(runs)
        if any(bm.quarantine for bm in self.bitmaps.values()) and self.sync_release():
            return self._reserve(ino, fblock, count)  # freed blocks became durable
        raise FsError(errno.ENOSPC, "no space left on the cluster's disks")

    def abort_write(self, runs: Sequence[WriteRun | Sequence[Any]]) -> None:
        """Give back blocks reserved by :meth:`map_write` that will not be committed."""
        with self.store.lock:
            for r in runs:
                run = WriteRun(*r)
                if run.new:
                    self.bitmaps[run.disk].unreserve(run.dblock, run.length)

    def commit_write(self, ino: int, runs: Sequence[WriteRun | Sequence[Any]], end: int,
                     mtime_ns: int | None = None) -> Attr:
        """Commit a write whose data is on disk: new extents, allocation, size, times.

        ``end`` is the byte offset just after the written data; the size grows to it.
        When the commit fails, for whatever reason, the reserved blocks are given back
        here: the caller must not abort them again (they may be reserved anew by then).
        """
        new = [WriteRun(*r) for r in runs if WriteRun(*r).new]
        try:
            with self._tx():
                self._attr_row(ino)
                for run in new:
                    if self._extents(ino, run.fblock, run.length):
                        # Two writers filled the same hole: the coherence protocol
                        # prevents this across nodes; refuse rather than map a block twice.
                        raise FsError(errno.EAGAIN, f"concurrent write to inode {ino} "
                                      f"block {run.fblock}; retry")
                for run in new:
                    self._insert_extent(ino, run.fblock, run.length, run.disk, run.dblock)
                    self.bitmaps[run.disk].commit(run.dblock, run.length)
                self._track([(r.disk, r.dblock, r.length) for r in new])
                now = mtime_ns if mtime_ns is not None else time.time_ns()
                self.store.execute(
                    "UPDATE inodes SET size=MAX(size, ?), mtime_ns=?, ctime_ns=? WHERE id=?",
                    (end, now, now, ino),
                )
                return self.getattr(ino)
        except BaseException:
            self.abort_write(new)
            raise

    def _insert_extent(self, ino: int, fblock: int, count: int, disk: int, dblock: int) -> None:
        """Insert a run, merging it with the neighbours it continues on disk."""
        prev = self.store.get_row(
            "SELECT fblock, count, disk, dblock FROM extents WHERE ino=? AND fblock<? "
            "ORDER BY fblock DESC LIMIT 1",
            (ino, fblock),
        )
        nxt = self.store.get_row(
            "SELECT fblock, count, disk, dblock FROM extents WHERE ino=? AND fblock=?",
            (ino, fblock + count),
        )
        if nxt is not None and nxt[2] == disk and nxt[3] == dblock + count:
            self.store.execute("DELETE FROM extents WHERE ino=? AND fblock=?", (ino, nxt[0]))
            count += nxt[1]
        if prev is not None and prev[0] + prev[1] == fblock and prev[2] == disk \
                and prev[3] + prev[1] == dblock:
            self.store.execute(
                "UPDATE extents SET count=? WHERE ino=? AND fblock=?",
                (prev[1] + count, ino, prev[0]),
            )
        else:
            self.store.execute(
                "INSERT INTO extents(ino, fblock, count, disk, dblock) VALUES (?,?,?,?,?)",
                (ino, fblock, count, disk, dblock),
            )

    def truncate(self, ino: int, size: int) -> Attr:
        """Set the size; blocks wholly past the new end are freed.

        The caller (the node) must already have zeroed the tail of the last partial
        block on disk, so that growing the file later reads zeros there.
        """
        if size < 0:
            raise FsError(errno.EINVAL, "negative size")
        with self._tx():
            row = self._attr_row(ino)
            if stat.S_ISDIR(row[1]):
                raise FsError(errno.EISDIR, f"inode {ino} is a directory")
            if not stat.S_ISREG(row[1]):
                raise FsError(errno.EINVAL, f"inode {ino} is not a regular file")
            bs = self.block_size
            self._free_extents(ino, (size + bs - 1) // bs)
            now = time.time_ns()
            self.store.execute(
                "UPDATE inodes SET size=?, mtime_ns=?, ctime_ns=? WHERE id=?",
                (size, now, now, ino),
            )
            return self.getattr(ino)

    def sync(self) -> None:
        """Make every committed change durable (and release freed blocks, see below)."""
        self.sync_release()

    def sync_release(self) -> bool:
        """Make every committed change durable, then let blocks freed by those changes
        be allocated again (see alloc.py, quarantine). Returns whether any were."""
        with self.store.lock:
            if self.store.in_transaction():
                self.store.sync()
                return False
            taken = {d: bm.take_quarantine() for d, bm in self.bitmaps.items()}
        try:
            self.store.sync()
        except BaseException:
            with self.store.lock:
                for d, runs in taken.items():
                    self.bitmaps[d].quarantine[:0] = runs
            raise
        with self.store.lock:
            for d, runs in taken.items():
                if runs:
                    self.bitmaps[d].release(runs)
        return any(taken.values())

    # -- block lists (for info, blocks --used, backup planning) -------------------------
