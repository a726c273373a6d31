"""The writable file system: the read half plus namespace changes and ordered writes.

:class:`FileSystem` extends :class:`~sdbackup.fs.readonly.ReadOnlyFileSystem` and is
written against the write halves of the two seams: the metadata API
(:class:`~sdbackup.meta.api.MetaApi`: the coordinator's metadata service, in-process or
over the cluster protocol) and a block store (the live shared disks). The CLI's
``sdbackup fs`` commands, the FUSE adapter and the tests all drive this class.

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
from collections.abc import Callable

from sdbackup.blocks.source import BlockStore, read_blocks
from sdbackup.errors import FsError
from sdbackup.fs.readonly import ReadOnlyFileSystem
from sdbackup.meta.api import MetaApi
from sdbackup.meta.types import Attr
from sdbackup.types import DiskId


class FileSystem(ReadOnlyFileSystem):
    """POSIX file system operations by inode, plus path helpers for scripts."""

    meta: MetaApi
    blocks: BlockStore

    def __init__(self, meta: MetaApi, blocks: BlockStore, *,
                 sync_before_commit: bool = True) -> None:
        """``sync_before_commit=False`` only where the metadata store itself flushes the
        disks before its commits can become durable (the embedded cluster's group
        commit, see MetaStore.group_commits): then writes skip their own flush."""
        super().__init__(meta, blocks)
        self.meta = meta
        self.blocks = blocks
        self.sync_before_commit = sync_before_commit
        # Writes and truncates of one inode are serialised on this node (striped
        # locks); across nodes the coherence protocol grants one writer per area.
        self._locks = [threading.Lock() for _ in range(64)]

    # -- namespace (straight to the coordinator) ------------------------------------------
    def create(self, parent: int, name: bytes, mode: int = 0o644, uid: int | None = None,
               gid: int | None = None) -> Attr:
        return self.meta.mknod(parent, name, stat.S_IFREG | (mode & 0o7777),
                               _uid(uid), _gid(gid))

    def create_open(self, parent: int, name: bytes, mode: int = 0o644,
                    uid: int | None = None, gid: int | None = None) -> Attr:
        """``create`` and ``open`` of the new file: one call where the metadata source
        can do both at once (a node: one round trip to the coordinator)."""
        both = getattr(self.meta, "mknod_open", None)
        if both is None:
            made = self.create(parent, name, mode, uid, gid)
            self.open(made.ino)
            return made
        attr: Attr = both(parent, name, stat.S_IFREG | (mode & 0o7777), _uid(uid), _gid(gid))
        return attr

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755, uid: int | None = None,
              gid: int | None = None) -> Attr:
        return self.meta.mkdir(parent, name, mode, _uid(uid), _gid(gid))

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int | None = None,
                gid: int | None = None) -> Attr:
        return self.meta.symlink(parent, name, target, _uid(uid), _gid(gid))

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        return self.meta.link(ino, new_parent, new_name)

    def unlink(self, parent: int, name: bytes) -> None:
        self.meta.unlink(parent, name)

    def rmdir(self, parent: int, name: bytes) -> None:
        self.meta.rmdir(parent, name)

    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0) -> None:
        self.meta.rename(parent, name, new_parent, new_name, flags)

    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None) -> Attr:
        if size is not None:
            self.truncate(ino, size)
        return self.meta.setattr(ino, mode=mode, uid=uid, gid=gid, atime_ns=atime_ns,
                                 mtime_ns=mtime_ns)

    def open(self, ino: int) -> None:
        self.meta.open(ino)

    def release(self, ino: int) -> None:
        self.meta.release(ino)

    # -- data --------------------------------------------------------------------------------
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
                zeroed = zero_tail(self.meta, self.blocks, ino, old_size)
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
                            self.blocks.readinto(
                                r.disk, r.dblock + (e - r.fblock), buf[lo : lo + bs]
                            )
                            cut = max(old_size - e * bs, 0)  # past EOF: zeros
                            if cut < bs:
                                buf[lo + cut : lo + bs] = bytes(bs - cut)
                buf[head : head + n] = src
            for r in runs:
                lo = (r.fblock - fb) * bs
                self.blocks.write(r.disk, r.dblock, buf[lo : lo + r.length * bs])
            # Data before metadata, across power loss too: the blocks are on stable
            # storage before the commit that makes them reachable can be.
            if self.sync_before_commit:
                self.blocks.datasync(synced)
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
            disk = zero_tail(self.meta, self.blocks, ino, min(size, attr.size))
            if disk is not None:
                self.blocks.datasync([disk])
        return self.meta.truncate(ino, size)

    def fsync(self, ino: int | None = None) -> None:
        """Make the file's data and all committed metadata durable."""
        self.blocks.fsync()
        self.meta.sync()

def zero_tail(meta: MetaApi, blocks: BlockStore, ino: int, pos: int,
              before: Callable[[DiskId, int, bytes], None] | None = None) -> DiskId | None:
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
        # Asking to write the mapped block records it as changed (durably, before the
        # write: changed-block tracking); it reserves nothing, the block is mapped.
        meta.map_write(ino, pos // bs, 1)
        old = read_blocks(blocks, ext.disk, ext.dblock, 1)
        if before is not None:
            before(ext.disk, ext.dblock, old)
        block = bytearray(old)
        block[pos % bs :] = bytes(bs - pos % bs)
        blocks.write(ext.disk, ext.dblock, block)
        return ext.disk
    return None


def _uid(uid: int | None) -> int:
    return os.getuid() if uid is None else uid


def _gid(gid: int | None) -> int:
    return os.getgid() if gid is None else gid
