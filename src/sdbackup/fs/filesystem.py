"""File system operations on a node: namespace through the coordinator, data direct.

``FileSystem`` is written once against two seams: the metadata API (the coordinator's
:class:`~sdbackup.meta.service.MetadataService`, in-process or over the cluster
protocol) and a set of block devices. The CLI's ``sdbackup fs`` commands, the FUSE
adapter and the tests all drive this class.

Write path (ordered, like ext4's data=ordered, across power loss too): map the range
(holes get *reserved* blocks), write the data to the disks, ``fdatasync`` them, then
commit the new extents and the size in one metadata transaction: no commit can reach
stable storage before the data it points at. A crash before the commit leaves the
file as it was and the reserved blocks free. Partial blocks at the edges are
read-modify-written; newly allocated blocks are zero-filled around the data, never
showing a deleted file's bytes.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from sdbackup.blocks.diskset import DiskSet
from sdbackup.errors import FsError
from sdbackup.meta.types import Attr, DirEntry, Extent, StatFs, WriteRun
from sdbackup.types import ROOT_INODE


class MetaApi(Protocol):
    """What a node needs from the coordinator's metadata service."""

    block_size: int

    def getattr(self, ino: int) -> Attr: ...
    def lookup(self, parent: int, name: bytes) -> Attr: ...
    def mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
              rdev: int = 0) -> Attr: ...
    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr: ...
    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr: ...
    def readlink(self, ino: int) -> bytes: ...
    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr: ...
    def unlink(self, parent: int, name: bytes) -> None: ...
    def rmdir(self, parent: int, name: bytes) -> None: ...
    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0) -> None: ...
    def readdir(self, ino: int, after: int = 0, limit: int = ...) -> list[DirEntry]: ...
    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None) -> Attr: ...
    def statfs(self) -> StatFs: ...
    def open(self, ino: int) -> None: ...
    def release(self, ino: int) -> None: ...
    def map_read(self, ino: int, fblock: int, count: int) -> list[Extent]: ...
    def map_write(self, ino: int, fblock: int, count: int) -> list[WriteRun]: ...
    def abort_write(self, runs: list[WriteRun]) -> None: ...
    def commit_write(self, ino: int, runs: list[WriteRun], end: int,
                     mtime_ns: int | None = None) -> Attr: ...
    def truncate(self, ino: int, size: int) -> Attr: ...
    def sync(self) -> None: ...


class FileSystem:
    """POSIX file system operations by inode, plus path helpers for scripts."""

    def __init__(self, meta: MetaApi, disks: DiskSet, *,
                 sync_before_commit: bool = True) -> None:
        """``sync_before_commit=False`` only where the metadata store itself flushes the
        disks before its commits can become durable (the embedded cluster's group
        commit, see MetaStore.group_commits): then writes skip their own flush."""
        self.meta = meta
        self.disks = disks
        self.sync_before_commit = sync_before_commit
        self.bs = meta.block_size
        # Writes and truncates of one inode are serialised on this node (striped
        # locks); across nodes the coherence protocol grants one writer per area.
        self._locks = [threading.Lock() for _ in range(64)]

    # -- namespace (straight to the coordinator) ------------------------------------------
    def getattr(self, ino: int) -> Attr:
        return self.meta.getattr(ino)

    def lookup(self, parent: int, name: bytes) -> Attr:
        return self.meta.lookup(parent, name)

    def create(self, parent: int, name: bytes, mode: int = 0o644, uid: int | None = None,
               gid: int | None = None) -> Attr:
        return self.meta.mknod(parent, name, stat.S_IFREG | (mode & 0o7777),
                               _uid(uid), _gid(gid))

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755, uid: int | None = None,
              gid: int | None = None) -> Attr:
        return self.meta.mkdir(parent, name, mode, _uid(uid), _gid(gid))

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int | None = None,
                gid: int | None = None) -> Attr:
        return self.meta.symlink(parent, name, target, _uid(uid), _gid(gid))

    def readlink(self, ino: int) -> bytes:
        return self.meta.readlink(ino)

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        return self.meta.link(ino, new_parent, new_name)

    def unlink(self, parent: int, name: bytes) -> None:
        self.meta.unlink(parent, name)

    def rmdir(self, parent: int, name: bytes) -> None:
        self.meta.rmdir(parent, name)

    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0) -> None:
        self.meta.rename(parent, name, new_parent, new_name, flags)

    def readdir(self, ino: int, after: int = 0) -> list[DirEntry]:
        return self.meta.readdir(ino, after)

    def listdir(self, ino: int) -> Iterator[DirEntry]:
        after = 0
        while True:
            batch = self.meta.readdir(ino, after)
            if not batch:
                return
            yield from batch
            after = batch[-1].cookie

    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None) -> Attr:
        if size is not None:
            self.truncate(ino, size)
        return self.meta.setattr(ino, mode=mode, uid=uid, gid=gid, atime_ns=atime_ns,
                                 mtime_ns=mtime_ns)

    def statfs(self) -> StatFs:
        return self.meta.statfs()

    def open(self, ino: int) -> None:
        self.meta.open(ino)

    def release(self, ino: int) -> None:
        self.meta.release(ino)

    # -- data --------------------------------------------------------------------------------
    def read(self, ino: int, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``; holes read as zeros; short at end of file."""
        if offset < 0 or size < 0:
            raise FsError(errno.EINVAL, "negative offset or size")
        attr = self.meta.getattr(ino)
        if attr.is_dir:
            raise FsError(errno.EISDIR, "is a directory")
        end = min(attr.size, offset + size)
        if end <= offset:
            return b""
        bs = self.bs
        fb = offset // bs
        nb = (end + bs - 1) // bs - fb
        skip = offset - fb * bs
        exts = self.meta.map_read(ino, fb, nb)
        if len(exts) == 1 and exts[0].fblock == fb and exts[0].length == nb:
            # One run, no hole (the common case): read straight into the result, with
            # no zero-filled buffer and no second copy.
            ext = exts[0]
            data = self.disks.device(ext.disk).read(ext.dblock, nb)
            if skip == 0 and len(data) == end - offset:
                return data
            return data[skip : skip + end - offset]
        buf = bytearray(nb * bs)
        mv = memoryview(buf)
        for ext in exts:
            lo = (ext.fblock - fb) * bs
            self.disks.device(ext.disk).readinto(ext.dblock, mv[lo : lo + ext.length * bs])
        return bytes(mv[skip : skip + end - offset])

    def write(self, ino: int, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at ``offset``; the file grows as needed. Returns bytes written."""
        src = memoryview(data).cast("B")
        n = src.nbytes
        if offset < 0:
            raise FsError(errno.EINVAL, "negative offset")
        if n == 0:
            return 0
        with self._locks[ino % 64]:
            return self._write(ino, offset, src)

    def _write(self, ino: int, offset: int, src: memoryview) -> int:
        n = src.nbytes
        bs = self.bs
        fb = offset // bs
        lb = (offset + n - 1) // bs
        nb = lb - fb + 1
        runs = self.meta.map_write(ino, fb, nb)
        try:
            # Bytes past the end of the file are never trusted: a write that failed (or
            # a crash) before its commit may have left data there, which must not become
            # part of the file when it grows. Zero them in the old last block.
            old_size = self.meta.getattr(ino).size
            synced = {r.disk for r in runs}
            if offset > old_size and old_size // bs < fb:
                zeroed = zero_tail(self.meta, self.disks, ino, old_size)
                if zeroed is not None:
                    synced.add(zeroed)
            head = offset - fb * bs
            if head == 0 and n % bs == 0:
                buf = src
            else:
                buf = memoryview(bytearray(nb * bs))
                # Old contents of partial edge blocks that already exist on disk.
                edges = {fb} if head else set()
                if (offset + n) % bs:
                    edges.add(lb)
                for r in runs:
                    if r.new:
                        continue
                    for e in edges:
                        if r.fblock <= e < r.fblock + r.length:
                            lo = (e - fb) * bs
                            self.disks.device(r.disk).readinto(
                                r.dblock + (e - r.fblock), buf[lo : lo + bs]
                            )
                            cut = max(old_size - e * bs, 0)  # past EOF: zeros
                            if cut < bs:
                                buf[lo + cut : lo + bs] = bytes(bs - cut)
                buf[head : head + n] = src
            for r in runs:
                lo = (r.fblock - fb) * bs
                self.disks.device(r.disk).write(r.dblock, buf[lo : lo + r.length * bs])
            # Data before metadata, across power loss too: the blocks are on stable
            # storage before the commit that makes them reachable can be.
            if self.sync_before_commit:
                self.disks.datasync(synced)
        except BaseException:
            self.meta.abort_write(runs)
            raise
        self.meta.commit_write(ino, runs, offset + n, time.time_ns())
        return n

    def truncate(self, ino: int, size: int) -> Attr:
        """Set the file size; the tail of a cut block is zeroed on disk first."""
        with self._locks[ino % 64]:
            return self._truncate(ino, size)

    def _truncate(self, ino: int, size: int) -> Attr:
        attr = self.meta.getattr(ino)
        if attr.is_dir:
            raise FsError(errno.EISDIR, "is a directory")
        # Zero the tail of the block holding the new end (shrinking), or the old end
        # (growing: bytes past the old end on disk are not trusted, see _write).
        if size != attr.size:
            disk = zero_tail(self.meta, self.disks, ino, min(size, attr.size))
            if disk is not None:
                self.disks.datasync([disk])
        return self.meta.truncate(ino, size)

    def fsync(self, ino: int | None = None) -> None:
        """Make the file's data and all committed metadata durable."""
        self.disks.fsync()
        self.meta.sync()

    # -- paths (for scripts and the CLI) -------------------------------------------------------
    def resolve(self, path: str | bytes, *, follow: bool = True) -> Attr:
        """The inode at an absolute path inside the file system."""
        parts = [p for p in os.fsencode(path).split(b"/") if p and p != b"."]
        attr = self.meta.getattr(ROOT_INODE)
        depth = 0
        stack: list[Attr] = []
        while parts:
            name = parts.pop(0)
            if name == b"..":
                attr = stack.pop() if stack else attr
                continue
            if not attr.is_dir:
                raise FsError(errno.ENOTDIR, f"{os.fsdecode(path)}: not a directory")
            child = self.meta.lookup(attr.ino, name)
            if child.is_link and (parts or follow):
                depth += 1
                if depth > 40:
                    raise FsError(errno.ELOOP, f"{os.fsdecode(path)}: too many symlinks")
                target = self.meta.readlink(child.ino)
                parts = [p for p in target.split(b"/") if p and p != b"."] + parts
                if target.startswith(b"/"):
                    attr = self.meta.getattr(ROOT_INODE)
                    stack = []
                continue
            stack.append(attr)
            attr = child
        return attr

    def split(self, path: str | bytes) -> tuple[Attr, bytes]:
        """(parent directory, last name) of a path, the parent resolved."""
        p = os.fsencode(path).rstrip(b"/")
        head, _, name = p.rpartition(b"/")
        if not name:
            raise FsError(errno.EINVAL, f"{os.fsdecode(path)!r} names no file")
        parent = self.resolve(head or b"/")
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR, f"{os.fsdecode(head)}: not a directory")
        return parent, name


def zero_tail(meta: MetaApi, disks: DiskSet, ino: int, pos: int,
              before: Callable[[int, int, bytes], None] | None = None) -> int | None:
    """Zero the bytes from ``pos`` to the end of its block on disk, if it is mapped.

    Bytes past a file's end are never trusted (a write that failed before its commit
    may have left data there): whatever grows or cuts a file zeroes them first.
    ``before(disk, block, old)`` sees the old block first (a backup's before image).
    Returns the disk written, which the caller syncs before the metadata change.
    """
    bs = meta.block_size
    if pos % bs == 0:
        return None
    for ext in meta.map_read(ino, pos // bs, 1):
        dev = disks.device(ext.disk)
        old = dev.read(ext.dblock, 1)
        if before is not None:
            before(ext.disk, ext.dblock, old)
        block = bytearray(old)
        block[pos % bs :] = bytes(bs - pos % bs)
        dev.write(ext.dblock, block)
        return ext.disk
    return None


def _uid(uid: int | None) -> int:
    return os.getuid() if uid is None else uid


def _gid(gid: int | None) -> int:
    return os.getgid() if gid is None else gid
