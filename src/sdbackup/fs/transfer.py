"""Copy trees between the local file system and the cluster (``sdbackup fs put/get``).

Like ``cp -a``: contents, modes, owners (when permitted), times, symlinks and hard
links are kept. Data moves in large requests (``CHUNK``) so that the cluster sees
MiB-sized writes. Errors carry the path that failed.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from sdbackup.errors import FsError, UsageError
from sdbackup.fs.filesystem import FileSystem
from sdbackup.meta.types import Attr

CHUNK = 4 << 20

Progress = Callable[[int], None]


def _name(path: Path) -> bytes:
    return os.fsencode(path.name)


def put(fs: FileSystem, src: Path, dest: str, progress: Progress | None = None) -> int:
    """Copy local ``src`` (file, symlink or tree) to cluster path ``dest``.

    If ``dest`` is an existing directory the copy goes inside it, as ``cp`` does.
    Returns the number of bytes copied.
    """
    if not src.exists() and not src.is_symlink():
        raise UsageError(f"{src} does not exist")
    try:
        target = fs.resolve(dest)
        if target.is_dir:
            parent, name = target, _name(src)
        else:
            parent, name = fs.split(dest)
    except FsError as e:
        if e.errno != errno.ENOENT:
            raise
        parent, name = fs.split(dest)
    links: dict[tuple[int, int], int] = {}
    return _put(fs, src, parent.ino, name, links, progress)


def _put(fs: FileSystem, src: Path, parent: int, name: bytes,
         links: dict[tuple[int, int], int], progress: Progress | None) -> int:
    st = src.lstat()
    key = (st.st_dev, st.st_ino)
    if stat.S_ISLNK(st.st_mode):
        _replace(fs, parent, name)
        a = fs.symlink(parent, name, os.fsencode(os.readlink(src)), st.st_uid, st.st_gid)
        fs.setattr(a.ino, atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns)  # as lutimes
        return 0
    if stat.S_ISDIR(st.st_mode):
        try:
            attr = fs.lookup(parent, name)
            if not attr.is_dir:
                raise FsError(errno.ENOTDIR, f"{src}: target exists and is not a directory")
        except FsError as e:
            if e.errno != errno.ENOENT:
                raise
            attr = fs.mkdir(parent, name, st.st_mode & 0o7777, st.st_uid, st.st_gid)
        total = 0
        for child in sorted(src.iterdir()):
            total += _put(fs, child, attr.ino, _name(child), links, progress)
        fs.setattr(attr.ino, mode=st.st_mode & 0o7777, atime_ns=st.st_atime_ns,
                   mtime_ns=st.st_mtime_ns)
        return total
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{src}: only files, directories and symlinks can be copied")
    if st.st_nlink > 1 and key in links:
        _replace(fs, parent, name)
        fs.link(links[key], parent, name)
        return 0
    # Written under a temporary name and renamed over the target at the end: a copy
    # that fails (the cluster is full...) leaves the old file, and no partial one.
    tmp = b".sdbackup-put-" + os.urandom(6).hex().encode() + b"-" + name[:200]
    attr = fs.create(parent, tmp, st.st_mode & 0o7777, st.st_uid, st.st_gid)
    total = 0
    try:
        with open(src, "rb", buffering=0) as f:
            buf = bytearray(CHUNK)
            zeros = bytes(CHUNK)
            mv = memoryview(buf)
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                if mv[:n] != zeros[:n]:  # all-zero chunks stay holes (sparse stays sparse)
                    fs.write(attr.ino, total, mv[:n])
                total += n
                if progress:
                    progress(n)
        if fs.getattr(attr.ino).size < total:
            fs.truncate(attr.ino, total)
        flush = getattr(fs, "flush_inode", None)  # a node's cache writes back later:
        if flush is not None:  # a write-back error (no space) must surface for this file
            flush(attr.ino)
        fs.rename(parent, tmp, parent, name)  # replaces an existing file atomically
    except BaseException as e:
        try:
            fs.unlink(parent, tmp)
        except FsError:
            pass
        if isinstance(e, FsError):
            raise FsError(e.errno or errno.EIO, f"{src}: {e.what or e.strerror}") from None
        raise
    links[key] = attr.ino
    fs.setattr(attr.ino, atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns)
    return total


def _replace(fs: FileSystem, parent: int, name: bytes) -> None:
    """Remove an existing non-directory at the target, as cp does."""
    try:
        old = fs.lookup(parent, name)
    except FsError as e:
        if e.errno == errno.ENOENT:
            return
        raise
    if old.is_dir:
        raise FsError(errno.EISDIR, f"{os.fsdecode(name)} exists and is a directory")
    fs.unlink(parent, name)


def get(fs: FileSystem, src: str, dest: Path, progress: Progress | None = None) -> int:
    """Copy cluster path ``src`` to local ``dest`` (into it if it is a directory)."""
    attr = fs.resolve(src, follow=False)
    name = os.fsencode(src).rstrip(b"/").rpartition(b"/")[2] or b"root"
    target = dest / os.fsdecode(name) if dest.is_dir() else dest
    links: dict[int, Path] = {}
    return _get(fs, attr, target, links, progress)


def _get(fs: FileSystem, attr: Attr, target: Path, links: dict[int, Path],
         progress: Progress | None) -> int:
    if attr.is_link:
        if target.is_symlink() or target.exists():
            target.unlink()
        os.symlink(fs.readlink(attr.ino), target)
        _owner(target, attr, follow=False)
        os.utime(target, ns=(attr.atime_ns, attr.mtime_ns), follow_symlinks=False)
        return 0
    if attr.is_dir:
        target.mkdir(exist_ok=True)
        total = 0
        for ent in fs.listdir(attr.ino):
            total += _get(fs, ent.attr, target / os.fsdecode(ent.name), links, progress)
        _owner(target, attr)
        os.chmod(target, attr.mode & 0o7777)
        os.utime(target, ns=(attr.atime_ns, attr.mtime_ns))
        return total
    if attr.nlink > 1 and attr.ino in links:
        if target.exists():
            target.unlink()
        os.link(links[attr.ino], target)
        return 0
    total = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while total < attr.size:
            data = fs.read(attr.ino, total, CHUNK)
            if not data:
                break
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            total += len(data)
            if progress:
                progress(len(data))
    finally:
        os.close(fd)
    links[attr.ino] = target
    _owner(target, attr)  # first: chown clears set-user-ID bits that chmod sets
    os.chmod(target, attr.mode & 0o7777)
    os.utime(target, ns=(attr.atime_ns, attr.mtime_ns))
    return total


def _owner(target: Path, attr: Attr, follow: bool = True) -> None:
    if os.geteuid() == 0:
        try:
            os.chown(target, attr.uid, attr.gid, follow_symlinks=follow)
        except OSError:
            pass
