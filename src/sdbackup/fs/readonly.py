"""The read half of the file system: any metadata source over any block source.

:class:`ReadOnlyFileSystem` is the base of every file system here: the live cluster's
:class:`~sdbackup.fs.filesystem.FileSystem` (and the node's cache over it) adds the
write half; a backup generation is the same class over (the T0 metadata snapshot, the
generation's blocks), and later a chain, a tape buffer or a group generation is only
another block source. It reaches blocks and metadata only through the two seams
(:mod:`sdbackup.blocks.source`, :mod:`sdbackup.meta.api`).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Iterator

from sdbackup.blocks.source import BlockSource
from sdbackup.errors import FsError
from sdbackup.meta.api import MetaSource
from sdbackup.meta.types import Attr, DirEntry, StatFs
from sdbackup.types import ROOT_INODE

_local = threading.local()
_SCRATCH_KEEP = 64 << 20


def _scratch(n: int) -> memoryview:
    """A page-aligned view of ``n`` bytes of this thread's reused read buffer (a direct-
    I/O source reads into it with no bounce copy). Released by the caller."""
    buf: mmap.mmap | None = getattr(_local, "buf", None)
    if buf is None or len(buf) < n:
        buf = mmap.mmap(-1, max(1 << 20, 1 << (max(n, 1) - 1).bit_length()))
        if len(buf) <= _SCRATCH_KEEP:
            _local.buf = buf
    return memoryview(buf)[:n]


class ReadOnlyFileSystem:
    """POSIX reads by inode over (metadata source, block source), plus path helpers."""

    def __init__(self, meta: MetaSource, blocks: BlockSource) -> None:
        self.meta = meta
        self.blocks = blocks
        self.bs = meta.block_size

    # -- names and attributes -------------------------------------------------------------
    def getattr(self, ino: int) -> Attr:
        return self.meta.getattr(ino)

    def lookup(self, parent: int, name: bytes) -> Attr:
        return self.meta.lookup(parent, name)

    def readlink(self, ino: int) -> bytes:
        return self.meta.readlink(ino)

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

    def statfs(self) -> StatFs:
        return self.meta.statfs()

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
            # One run, no hole (the common case): read into the aligned scratch buffer
            # (a direct-I/O source fills it with no bounce) and copy out once.
            ext = exts[0]
            view = _scratch(nb * bs)
            try:
                self.blocks.readinto(ext.disk, ext.dblock, view)
                return bytes(view[skip : skip + end - offset])
            finally:
                view.release()
        buf = bytearray(nb * bs)
        mv = memoryview(buf)
        for ext in exts:
            lo = (ext.fblock - fb) * bs
            self.blocks.readinto(ext.disk, ext.dblock, mv[lo : lo + ext.length * bs])
        return bytes(mv[skip : skip + end - offset])

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
