"""Power-loss testing à la dm-log-writes / CrashMonkey: record, then replay crash states.

Two halves:

**The recorder** (:class:`Recorder`, run as its own process:
``python tests/logwrites.py serve BACKING MOUNTPOINT LOG``; from tests use
:func:`recording_mount`) is a pyfuse3 passthrough file system over a backing directory.
Every operation is forwarded to the backing directory, and every operation that changes
stored state is appended to LOG *in the order the server handles it*: file creation,
``mkdir``, ``symlink``, ``unlink``, ``rmdir``, ``rename``, ``link``, truncation (a
``setattr`` of the size, ``O_TRUNC``), ``write`` (file id, offset, bytes), ``fsync`` /
``fdatasync`` of a file, ``fsyncdir``, and ``MARK(label)``: a lookup of the magic name
``.logwrites-mark-LABEL`` (in any directory) records ``MARK(LABEL)`` and answers
ENOENT, so a test marks a point of its workload from outside with :func:`mark`
(``os.stat``). Attribute changes (modes, owners, times) are forwarded but not logged:
the replay model does not model them.

File ids are the backing files' inode numbers (the root directory is id 1); they are
also the FUSE inode numbers. A backing inode number can be reused only after the file
is gone from the backing file system, and the server holds an ``O_PATH`` descriptor
of every inode the kernel knows, so reuse always shows up in the log as a new
``create``/``mkdir`` record first; the replay model starts a new object there.

Why it is correct under concurrency (several processes use the mount at once): every
handler does its backing system call synchronously in the trio thread, without an
``await``, and appends its record right there, so the log order is exactly the order
in which the operations were applied to the backing directory. A ``write`` is logged
after its ``pwrite``, before the reply to the kernel; an ``fsync`` is logged when it
arrives, before anything is synced. So a write that had completed (replied) before a
program called ``fsync`` is always logged before that ``fsync``, which is the
guarantee ``fsync`` gives; a write concurrent with the ``fsync`` may be logged after it
and is then (conservatively) not covered. The backing directory is scratch space: it is
not fsynced (``--real-fsync`` does it, in a worker thread), since durability is
modelled from the log, not from the host.

Kernel settings and why: no ``writeback_cache`` (the kernel would hold dirty pages and
send writes later, out of program order relative to ``fsync`` of other files); files are
opened without ``direct_io`` and with ``keep_cache``, so that shared writable ``mmap``
works (SQLite's WAL index, the ``-shm`` file) and buffered readers are served from the
page cache, which stays coherent because every change of the backing directory goes
through this mount. ``O_DIRECT`` opens work on Linux 6.18 without anything special:
the kernel passes ``O_DIRECT`` reads and writes to the server as ordinary
``READ``/``WRITE`` requests with the caller's offsets and lengths (``fuse_direct_IO``;
checked by ``tests/test_logwrites.py``). FUSE itself does not check their alignment, so
the server does, as a block device would: on a descriptor opened with ``O_DIRECT``, an
offset or length that is not a multiple of 512 fails with EINVAL (buffer alignment is
not visible to a FUSE server and is not checked). The server opens its backing
descriptors without ``O_DIRECT``, ``O_APPEND`` (the kernel computes the append offset),
``O_SYNC``/``O_DSYNC``: a write through a descriptor opened with ``O_SYNC`` or
``O_DSYNC`` is logged followed by an ``fsync`` record of its file, which is what those
flags promise (the kernel also sends an ``FSYNC`` after such a write; both are logged).
Writes to files whose name ends with one of the ``skip`` suffixes (default ``-shm``:
SQLite's shared-memory index, rebuilt from the WAL on recovery) are forwarded but not
logged, nor are their truncations and fsyncs.
Not supported (the kernel or the caller falls back): ``fallocate``, ``lseek``
``SEEK_DATA``/``SEEK_HOLE``, xattrs, ``syncfs`` (a program that relies on ``syncfs`` or
``sync`` instead of per-file ``fsync`` would be modelled as never syncing), special
files other than regular files, directories and symlinks.

**The replay model** (:class:`ReplayModel`) turns the initial state of the backing
directory (:func:`scan_tree`, taken before the server starts; or empty) and the log into
*crash states*. For a cut at log index ``k`` (records ``[0, k)`` happened before the
power went):

* namespace operations (create, mkdir, symlink, link, unlink, rmdir, rename) and
  truncations before ``k`` are all applied, in log order. This is a simplification: a
  real file system may lose or reorder namespace operations that were not followed by
  an ``fsync`` of the directory (or of the file, for ext4); here the namespace is
  durable at once and in order, so the model produces fewer crash states than a real
  file system could, never more. The data-ordering question the tests ask (are data
  blocks durable before the metadata that references them?) lives in file *contents*
  (a disk image, a write-ahead log), which this model covers exactly.
* a ``write`` before ``k`` is *durable* if an ``fsync``/``fdatasync`` of the same file
  (same id: whichever descriptor or process) follows it before ``k``; otherwise it is
  *pending*. A crash state replays the records in log order, applying every durable
  write and a chosen subset of the pending ones, each either whole, or *torn*: a random
  subset of its 512-byte sectors (sectors are aligned on file offsets; a write that
  covers part of a sector lands in that sector as a unit). A write that lands (in whole
  or in part) grows the file to the end of what landed; a dropped write leaves no trace.

Cuts are taken at every ``fsync``/``fsyncdir`` record (the state just before it and just
after it), optionally at every ``MARK``, plus the end of the log. For each cut the model
yields the state with none of the pending writes, with all of them, and ``n_random``
seeded random subsets. The random subsets pick, for each file that has pending writes, a
mode — drop all, keep all, or a mix (each write kept with probability 1/2, each kept
write torn with probability 1/3) — so that states where one file's pending writes all
landed and another's all vanished (the write-ahead log complete, the disk image
untouched: exactly how metadata overtakes data) come up in about one in nine random
states instead of almost never; and, deterministically, for every file with pending
writes, the state where only that file's pending writes landed (and, with three or
more such files, the one where all but that file's landed). Everything is
reproducible from the seed.
:meth:`ReplayModel.materialize` writes a crash state into a fresh directory with the
same relative paths as under the mount (sparse files stay sparse).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import errno
import json
import logging
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

MARK_PREFIX = b".logwrites-mark-"
ROOT_ID = 1
SECTOR = 512
FSTYPE = "fuse.logwrites"
DEFAULT_SKIP = ("-shm",)
_HEAD = struct.Struct(">II")  # JSON length, payload length
_LOG_MAGIC = b"LOGWRITES1\n"

# Operations that change the namespace (applied at once and in order by the model).
NAMESPACE_OPS = frozenset({"create", "mkdir", "symlink", "link", "unlink", "rmdir", "rename"})
SYNC_OPS = frozenset({"fsync", "fsyncdir"})

log = logging.getLogger("logwrites")


# == the log ===============================================================================

@dataclass(frozen=True)
class Record:
    """One logged operation. Names are bytes; ``data`` is the payload of a write."""

    index: int
    op: str
    args: dict[str, Any]
    data: bytes = b""

    def __str__(self) -> str:
        a = ", ".join(f"{k}={_show(v)}" for k, v in self.args.items())
        extra = f", {len(self.data)} bytes" if self.op == "write" else ""
        return f"#{self.index} {self.op}({a}{extra})"


def _show(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def _enc_name(name: bytes) -> str:
    return name.decode("latin-1")  # lossless for any bytes


def _dec_name(text: str) -> bytes:
    return text.encode("latin-1")


class LogWriter:
    """Appends records to the log file (buffered; flushed at syncs, marks and close)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.f: BinaryIO = open(path, "wb", buffering=1 << 20)  # noqa: SIM115
        self.f.write(_LOG_MAGIC)
        self.count = 0

    def append(self, op: str, data: bytes | memoryview = b"", **args: Any) -> None:
        args["op"] = op
        head = json.dumps(args, separators=(",", ":")).encode()
        self.f.write(_HEAD.pack(len(head), len(data)))
        self.f.write(head)
        if data:
            self.f.write(data)
        self.count += 1
        if op in SYNC_OPS or op == "mark":
            self.f.flush()

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def read_log(path: str | os.PathLike[str]) -> list[Record]:
    """All records of a log file, in order. Raises ValueError on a damaged log."""
    raw = Path(path).read_bytes()
    if not raw.startswith(_LOG_MAGIC):
        raise ValueError(f"{path} is not a logwrites log")
    mv = memoryview(raw)
    pos = len(_LOG_MAGIC)
    out: list[Record] = []
    while pos < len(raw):
        if pos + _HEAD.size > len(raw):
            raise ValueError(f"{path}: truncated record header at byte {pos}")
        hl, dl = _HEAD.unpack_from(raw, pos)
        pos += _HEAD.size
        if pos + hl + dl > len(raw):
            raise ValueError(f"{path}: truncated record at byte {pos}")
        args = json.loads(bytes(mv[pos : pos + hl]))
        pos += hl
        data = bytes(mv[pos : pos + dl])
        pos += dl
        op = args.pop("op")
        for key in ("name", "newname"):
            if key in args:
                args[key] = _dec_name(args[key])
        if "target" in args:
            args["target"] = _dec_name(args["target"])
        out.append(Record(len(out), op, args, data))
    return out


# == the recording server ==================================================================

@dataclass
class _Node:
    fd: int  # O_PATH descriptor of the backing inode
    nlookup: int
    skip: bool  # writes to it are not logged (e.g. SQLite's -shm)


@dataclass
class _Open:
    fd: int
    ino: int
    sync: bool  # opened with O_SYNC / O_DSYNC: every write is followed by an fsync record
    skip: bool
    direct: bool  # opened with O_DIRECT: offsets and lengths must be sector-aligned


@dataclass
class _Dir:
    ino: int
    entries: list[bytes]


def _import_pyfuse3() -> Any:
    import pyfuse3

    return pyfuse3


def make_recorder(backing: str | os.PathLike[str], log_path: str | os.PathLike[str], *,
                  skip_suffixes: Sequence[str] = DEFAULT_SKIP, real_fsync: bool = False,
                  timeout: float = 1.0) -> Any:
    """Build the pyfuse3 Operations object (pyfuse3 is imported only here)."""
    pyfuse3 = _import_pyfuse3()
    import trio

    FUSEError = pyfuse3.FUSEError
    skip_b = tuple(os.fsencode(s) for s in skip_suffixes)

    def oserr(e: OSError) -> Any:  # a pyfuse3.FUSEError
        return FUSEError(e.errno or errno.EIO)

    class Recorder(pyfuse3.Operations):  # type: ignore[misc,name-defined]
        """Passthrough to ``backing``; logs every state-changing operation (module doc)."""

        enable_writeback_cache = False
        enable_acl = False

        def __init__(self) -> None:
            super().__init__()
            self.log = LogWriter(log_path)
            root_fd = os.open(backing, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self.nodes: dict[int, _Node] = {ROOT_ID: _Node(root_fd, 1 << 60, False)}
            self.files: dict[int, _Open] = {}
            self.dirs: dict[int, _Dir] = {}
            self.next_fh = 1

        # -- helpers -------------------------------------------------------------------
        def _node(self, ino: int) -> _Node:
            try:
                return self.nodes[ino]
            except KeyError:
                raise FUSEError(errno.ESTALE) from None

        def _proc(self, ino: int) -> str:
            return f"/proc/self/fd/{self._node(ino).fd}"

        def _attr(self, st: os.stat_result, ino: int) -> Any:
            e = pyfuse3.EntryAttributes()
            e.st_ino = ino
            e.generation = 0
            e.entry_timeout = timeout
            e.attr_timeout = timeout
            e.st_mode = st.st_mode
            e.st_nlink = st.st_nlink
            e.st_uid = st.st_uid
            e.st_gid = st.st_gid
            e.st_rdev = st.st_rdev
            e.st_size = st.st_size
            e.st_blksize = st.st_blksize
            e.st_blocks = st.st_blocks
            e.st_atime_ns = st.st_atime_ns
            e.st_mtime_ns = st.st_mtime_ns
            e.st_ctime_ns = st.st_ctime_ns
            return e

        def _fid(self, st: os.stat_result) -> int:
            if st.st_ino == ROOT_ID:
                raise FUSEError(errno.EOVERFLOW)  # would collide with the root's id
            return int(st.st_ino)

        def _remember(self, parent_fd: int, name: bytes, st: os.stat_result) -> int:
            """Count one kernel lookup of the entry ``name`` (inode ``st``)."""
            ino = self._fid(st)
            node = self.nodes.get(ino)
            if node is None:
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
                if os.fstat(fd).st_ino != ino:  # cannot happen: one thread does everything
                    os.close(fd)
                    raise FUSEError(errno.EIO)
                node = _Node(fd, 0, name.endswith(skip_b) if skip_b else False)
                self.nodes[ino] = node
            node.nlookup += 1
            return ino

        def _entry(self, parent: int, name: bytes) -> Any:
            pfd = self._node(parent).fd
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except OSError as e:
                raise oserr(e) from None
            ino = self._remember(pfd, name, st)
            return self._attr(st, ino)

        def _new_fh(self) -> int:
            fh = self.next_fh
            self.next_fh += 1
            return fh

        # -- names ---------------------------------------------------------------------
        async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
            if name.startswith(MARK_PREFIX):
                self.log.append("mark", label=name[len(MARK_PREFIX):].decode("utf-8",
                                                                             "replace"))
                raise FUSEError(errno.ENOENT)
            return self._entry(parent_inode, name)

        async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
            for ino, n in inode_list:
                node = self.nodes.get(ino)
                if node is None or ino == ROOT_ID:
                    continue
                node.nlookup -= n
                if node.nlookup <= 0:
                    os.close(node.fd)
                    del self.nodes[ino]

        async def getattr(self, inode: int, ctx: Any = None) -> Any:
            try:
                st = os.stat(self._node(inode).fd)
            except OSError as e:
                raise oserr(e) from None
            return self._attr(st, inode)

        async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None,
                          ctx: Any) -> Any:
            node = self._node(inode)
            path = self._proc(inode)
            try:
                if fields.update_size:
                    of = self.files.get(fh) if fh is not None else None
                    if of is not None:
                        os.ftruncate(of.fd, attr.st_size)
                    else:
                        os.truncate(path, attr.st_size)
                    if not node.skip:
                        self.log.append("truncate", id=inode, size=attr.st_size)
                if fields.update_mode:
                    os.chmod(path, stat.S_IMODE(attr.st_mode))
                if fields.update_uid or fields.update_gid:
                    os.chown(path, attr.st_uid if fields.update_uid else -1,
                             attr.st_gid if fields.update_gid else -1)
                if fields.update_atime or fields.update_mtime:
                    st = os.stat(node.fd)
                    os.utime(path, ns=(attr.st_atime_ns if fields.update_atime
                                       else st.st_atime_ns,
                                       attr.st_mtime_ns if fields.update_mtime
                                       else st.st_mtime_ns))
            except OSError as e:
                raise oserr(e) from None
            return await self.getattr(inode)

        async def readlink(self, inode: int, ctx: Any) -> bytes:
            try:
                return os.readlink(b"", dir_fd=self._node(inode).fd)
            except OSError as e:
                raise oserr(e) from None

        def _own(self, parent_fd: int, name: bytes, ctx: Any) -> None:
            if os.getuid() == 0 and (ctx.uid, ctx.gid) != (0, 0):
                os.chown(name, ctx.uid, ctx.gid, dir_fd=parent_fd, follow_symlinks=False)

        async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                        ctx: Any) -> Any:
            if not stat.S_ISREG(mode):
                raise FUSEError(errno.EOPNOTSUPP)
            pfd = self._node(parent_inode).fd
            try:
                fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC,
                             stat.S_IMODE(mode), dir_fd=pfd)
                os.close(fd)
                self._own(pfd, name, ctx)
                e = self._entry(parent_inode, name)
            except OSError as e2:
                raise oserr(e2) from None
            self.log.append("create", parent=parent_inode, name=_enc_name(name), id=e.st_ino)
            return e

        async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
            pfd = self._node(parent_inode).fd
            try:
                os.mkdir(name, stat.S_IMODE(mode), dir_fd=pfd)
                self._own(pfd, name, ctx)
                e = self._entry(parent_inode, name)
            except OSError as e2:
                raise oserr(e2) from None
            self.log.append("mkdir", parent=parent_inode, name=_enc_name(name), id=e.st_ino)
            return e

        async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                          ctx: Any) -> Any:
            pfd = self._node(parent_inode).fd
            try:
                os.symlink(target, name, dir_fd=pfd)
                self._own(pfd, name, ctx)
                e = self._entry(parent_inode, name)
            except OSError as e2:
                raise oserr(e2) from None
            self.log.append("symlink", parent=parent_inode, name=_enc_name(name),
                            id=e.st_ino, target=_enc_name(target))
            return e

        async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                       ctx: Any) -> Any:
            pfd = self._node(new_parent_inode).fd
            try:
                os.link(self._proc(inode), new_name, dst_dir_fd=pfd, follow_symlinks=True)
                e = self._entry(new_parent_inode, new_name)
            except OSError as e2:
                raise oserr(e2) from None
            self.log.append("link", id=inode, parent=new_parent_inode,
                            name=_enc_name(new_name))
            return e

        def _victim(self, pfd: int, name: bytes) -> int:
            try:
                return int(os.stat(name, dir_fd=pfd, follow_symlinks=False).st_ino)
            except OSError as e:
                raise oserr(e) from None

        async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
            pfd = self._node(parent_inode).fd
            victim = self._victim(pfd, name)
            try:
                os.unlink(name, dir_fd=pfd)
            except OSError as e:
                raise oserr(e) from None
            self.log.append("unlink", parent=parent_inode, name=_enc_name(name), id=victim)

        async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
            pfd = self._node(parent_inode).fd
            victim = self._victim(pfd, name)
            try:
                os.rmdir(name, dir_fd=pfd)
            except OSError as e:
                raise oserr(e) from None
            self.log.append("rmdir", parent=parent_inode, name=_enc_name(name), id=victim)

        async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                         name_new: bytes, flags: int, ctx: Any) -> None:
            ofd = self._node(parent_inode_old).fd
            nfd = self._node(parent_inode_new).fd
            moved = self._victim(ofd, name_old)
            replaced: int | None = None
            try:
                replaced = int(os.stat(name_new, dir_fd=nfd, follow_symlinks=False).st_ino)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise oserr(e) from None
            if flags & pyfuse3.RENAME_EXCHANGE or flags & ~pyfuse3.RENAME_NOREPLACE:
                raise FUSEError(errno.EINVAL)
            if flags & pyfuse3.RENAME_NOREPLACE and replaced is not None:
                raise FUSEError(errno.EEXIST)
            try:
                os.rename(name_old, name_new, src_dir_fd=ofd, dst_dir_fd=nfd)
            except OSError as e:
                raise oserr(e) from None
            if replaced == moved:
                return  # two names of one inode: POSIX says nothing happens
            self.log.append("rename", parent=parent_inode_old, name=_enc_name(name_old),
                            newparent=parent_inode_new, newname=_enc_name(name_new),
                            id=moved, replaced=replaced)

        # -- files ---------------------------------------------------------------------
        def _open_fd(self, inode: int, flags: int) -> int:
            acc = flags & os.O_ACCMODE
            keep = flags & (os.O_NOATIME if hasattr(os, "O_NOATIME") else 0)
            return os.open(self._proc(inode), acc | keep | os.O_CLOEXEC)

        def _register(self, fd: int, inode: int, flags: int) -> Any:
            fh = self._new_fh()
            node = self._node(inode)
            self.files[fh] = _Open(fd, inode, bool(flags & (os.O_SYNC | os.O_DSYNC)),
                                   node.skip, bool(flags & os.O_DIRECT))
            return pyfuse3.FileInfo(fh=fh, direct_io=False, keep_cache=True)

        async def open(self, inode: int, flags: int, ctx: Any) -> Any:
            try:
                fd = self._open_fd(inode, flags)
            except OSError as e:
                raise oserr(e) from None
            if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
                try:
                    os.ftruncate(fd, 0)
                except OSError as e:
                    os.close(fd)
                    raise oserr(e) from None
                if not self._node(inode).skip:
                    self.log.append("truncate", id=inode, size=0)
            return self._register(fd, inode, flags)

        async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                         ctx: Any) -> tuple[Any, Any]:
            pfd = self._node(parent_inode).fd
            acc = flags & os.O_ACCMODE
            created = True
            try:
                try:
                    fd = os.open(name, acc | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 stat.S_IMODE(mode), dir_fd=pfd)
                except FileExistsError:
                    if flags & os.O_EXCL:
                        raise
                    fd = os.open(name, acc | os.O_CLOEXEC, dir_fd=pfd)
                    created = False
                if created:
                    self._own(pfd, name, ctx)
                e = self._entry(parent_inode, name)
            except OSError as e2:
                raise oserr(e2) from None
            if created:
                self.log.append("create", parent=parent_inode, name=_enc_name(name),
                                id=e.st_ino)
            elif flags & os.O_TRUNC and acc != os.O_RDONLY:
                os.ftruncate(fd, 0)
                if not self._node(e.st_ino).skip:
                    self.log.append("truncate", id=e.st_ino, size=0)
                e = await self.getattr(e.st_ino)
            return self._register(fd, e.st_ino, flags), e

        async def read(self, fh: int, off: int, size: int) -> bytes:
            of = self.files.get(fh)
            if of is None:
                raise FUSEError(errno.EBADF)
            if of.direct and (off % SECTOR or size % SECTOR):
                raise FUSEError(errno.EINVAL)  # as a block device does
            try:
                return os.pread(of.fd, size, off)
            except OSError as e:
                raise oserr(e) from None

        async def write(self, fh: int, off: int, buf: bytes) -> int:
            of = self.files.get(fh)
            if of is None:
                raise FUSEError(errno.EBADF)
            if of.direct and (off % SECTOR or len(buf) % SECTOR):
                raise FUSEError(errno.EINVAL)  # as a block device does
            mv = memoryview(buf)
            done = 0
            try:
                while done < len(mv):
                    done += os.pwrite(of.fd, mv[done:], off + done)
            except OSError as e:
                if done and not of.skip:  # what landed is in the backing file: log it
                    self.log.append("write", mv[:done], id=of.ino, off=off)
                raise oserr(e) from None
            if not of.skip:
                self.log.append("write", mv, id=of.ino, off=off)
                if of.sync:
                    self.log.append("fsync", id=of.ino, datasync=True, why="O_SYNC")
            return done

        async def flush(self, fh: int) -> None:
            return None

        async def release(self, fh: int) -> None:
            of = self.files.pop(fh, None)
            if of is not None:
                os.close(of.fd)

        async def fsync(self, fh: int, datasync: bool) -> None:
            of = self.files.get(fh)
            if of is None:
                raise FUSEError(errno.EBADF)
            if not of.skip:
                self.log.append("fsync", id=of.ino, datasync=bool(datasync))
            if real_fsync:
                fn = os.fdatasync if datasync else os.fsync
                await trio.to_thread.run_sync(fn, of.fd)

        # -- directories ---------------------------------------------------------------
        async def opendir(self, inode: int, ctx: Any) -> int:
            try:
                fd = os.open(self._proc(inode), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    names = sorted(os.fsencode(n) for n in os.listdir(fd))
                finally:
                    os.close(fd)
            except OSError as e:
                raise oserr(e) from None
            fh = self._new_fh()
            self.dirs[fh] = _Dir(inode, names)
            return fh

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            d = self.dirs.get(fh)
            if d is None:
                raise FUSEError(errno.EBADF)
            pfd = self._node(d.ino).fd
            for i in range(start_id, len(d.entries)):
                name = d.entries[i]
                try:
                    st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed since opendir
                except OSError as e:
                    raise oserr(e) from None
                ino = self._fid(st)
                if not pyfuse3.readdir_reply(token, name, self._attr(st, ino), i + 1):
                    return
                self._remember(pfd, name, st)  # a readdirplus entry counts as a lookup

        async def releasedir(self, fh: int) -> None:
            self.dirs.pop(fh, None)

        async def fsyncdir(self, fh: int, datasync: bool) -> None:
            d = self.dirs.get(fh)
            if d is None:
                raise FUSEError(errno.EBADF)
            self.log.append("fsyncdir", id=d.ino, datasync=bool(datasync))

        async def statfs(self, ctx: Any) -> Any:
            st = os.statvfs(self.nodes[ROOT_ID].fd)
            s = pyfuse3.StatvfsData()
            for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                         "f_files", "f_ffree", "f_favail"):
                setattr(s, attr, getattr(st, attr))
            s.f_namemax = st.f_namemax
            return s

    return Recorder()


def serve(backing: str | os.PathLike[str], mountpoint: str | os.PathLike[str],
          log_path: str | os.PathLike[str], *, skip_suffixes: Sequence[str] = DEFAULT_SKIP,
          real_fsync: bool = False) -> None:
    """Mount the recorder and serve until unmounted, SIGTERM or SIGINT (then unmount)."""
    pyfuse3 = _import_pyfuse3()
    import trio

    ops = make_recorder(backing, log_path, skip_suffixes=skip_suffixes, real_fsync=real_fsync)
    options = {"fsname=logwrites", "subtype=logwrites", "default_permissions"}
    if os.getuid() == 0:
        options.add("allow_other")
    pyfuse3.init(ops, os.fspath(mountpoint), options)
    reason = "unmounted"

    async def main() -> None:
        nonlocal reason

        async def watch() -> None:
            nonlocal reason
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    reason = "signal"
                    pyfuse3.terminate()
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await pyfuse3.main(min_tasks=1, max_tasks=8)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=reason != "unmounted")
        ops.log.close()


# == starting and stopping a recording mount ================================================

def check_fuse() -> None:
    """Raise (never skip) when this machine cannot run the recorder."""
    problems = []
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing (modprobe fuse; in a container pass "
                        "--device /dev/fuse)")
    try:
        _import_pyfuse3()
    except ImportError as e:
        problems.append(f"pyfuse3 cannot be imported ({e})")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 is not installed (apt-get install fuse3)")
    if problems:
        raise RuntimeError("the logwrites recorder cannot run: " + "; ".join(problems))


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    mp = os.path.abspath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4 and fields[4] == mp and right.startswith(FSTYPE + " "):
                return True
    return False


def mark(mountpoint: str | os.PathLike[str], label: str) -> None:
    """Record MARK(label) in the log of the recorder serving ``mountpoint``."""
    if "/" in label or "\0" in label:
        raise ValueError(f"bad mark label {label!r}")
    try:
        os.stat(os.path.join(os.fspath(mountpoint), MARK_PREFIX.decode() + label))
    except FileNotFoundError:
        return
    raise AssertionError(f"mark {label!r}: the lookup did not answer ENOENT (is "
                         f"{mountpoint} a logwrites mount?)")


@dataclass
class RecordingMount:
    """A running recorder: ``path`` is the mount point, ``log_path`` its log."""

    path: Path
    backing: Path
    log_path: Path
    initial: Snapshot
    proc: subprocess.Popen[bytes]
    out: Path

    def mark(self, label: str) -> None:
        mark(self.path, label)

    def output(self) -> str:
        try:
            return self.out.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _unmount(mp: Path) -> str:
    errors = []
    for cmd in (["fusermount3", "-u", str(mp)], ["fusermount3", "-uz", str(mp)],
                ["umount", "-l", str(mp)]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        if r.returncode == 0 or not is_mounted(mp):
            return " ".join(cmd)
        errors.append(f"{' '.join(cmd)}: {r.stderr.strip()}")
    raise RuntimeError(f"cannot unmount {mp}: " + "; ".join(errors))


@contextlib.contextmanager
def recording_mount(backing: str | os.PathLike[str], mountpoint: str | os.PathLike[str],
                    log_path: str | os.PathLike[str], *,
                    skip_suffixes: Sequence[str] = DEFAULT_SKIP, real_fsync: bool = False,
                    timeout: float = 20.0) -> Iterator[RecordingMount]:
    """Start the recorder in a subprocess, wait for the mount, yield; always unmount.

    The backing directory's initial state is scanned before the server starts
    (``RecordingMount.initial``, for :class:`ReplayModel`). On exit: ``fusermount3 -u``
    (lazy unmount as a fallback), then the server must exit by itself within
    ``timeout`` (flushing the log); otherwise it is killed and the exit raises, since
    the log may be incomplete.
    """
    check_fuse()
    backing, mp, logp = Path(backing), Path(mountpoint), Path(log_path)
    backing.mkdir(parents=True, exist_ok=True)
    mp.mkdir(parents=True, exist_ok=True)
    initial = scan_tree(backing)
    out = logp.with_name(logp.name + ".server.out")
    argv = [sys.executable, str(Path(__file__).resolve()), "serve", str(backing.resolve()),
            str(mp.resolve()), str(logp.resolve())]
    argv += [f"--skip={s}" for s in skip_suffixes] or ["--skip="]
    if real_fsync:
        argv.append("--real-fsync")
    with open(out, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    rm = RecordingMount(mp.resolve(), backing.resolve(), logp.resolve(), initial, proc, out)
    unmounted = False
    try:
        deadline = time.monotonic() + timeout
        while not is_mounted(rm.path):
            if proc.poll() is not None:
                raise RuntimeError(f"the logwrites server exited with {proc.returncode} "
                                   f"before mounting:\n{rm.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the logwrites server did not mount {mp} within "
                                   f"{timeout} s:\n{rm.output()[-3000:]}")
            time.sleep(0.02)
        _stat_with_timeout(rm.path, timeout)
        yield rm
    finally:
        try:
            if is_mounted(rm.path):
                _unmount(rm.path)
                unmounted = True
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise RuntimeError(f"the logwrites server did not exit after the unmount (killed;"
                               f" its log may be incomplete):\n{rm.output()[-3000:]}") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    if unmounted and proc.returncode != 0:
        raise RuntimeError(f"the logwrites server exited with {proc.returncode}:\n"
                           f"{rm.output()[-3000:]}")


def _stat_with_timeout(path: Path, timeout: float) -> None:
    result: list[BaseException | None] = []

    def probe() -> None:
        try:
            os.stat(path)
            result.append(None)
        except OSError as e:
            result.append(e)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        raise RuntimeError(f"the logwrites mount {path} does not answer")
    if result[0] is not None:
        raise RuntimeError(f"the logwrites mount {path} fails: {result[0]}")


# == file contents as copy-on-write chunks =================================================

CHUNK = 4096
_ZERO_CHUNK = bytes(CHUNK)


class SparseFile:
    """A file's contents: a size and 4 KiB chunks (absent chunks read as zeros).

    Chunks are immutable ``bytes``, so :meth:`copy` is a shallow dict copy and a crash
    state costs only the chunks its own writes touch.
    """

    __slots__ = ("chunks", "size")

    def __init__(self, size: int = 0, chunks: dict[int, bytes] | None = None) -> None:
        self.size = size
        self.chunks: dict[int, bytes] = chunks if chunks is not None else {}

    @classmethod
    def from_bytes(cls, data: bytes) -> SparseFile:
        f = cls()
        f.write(0, data)
        return f

    def copy(self) -> SparseFile:
        return SparseFile(self.size, dict(self.chunks))

    def write(self, off: int, data: bytes | memoryview) -> None:
        mv = memoryview(data)
        end = off + len(mv)
        pos = off
        while pos < end:
            c, lo = divmod(pos, CHUNK)
            n = min(CHUNK - lo, end - pos)
            part = mv[pos - off : pos - off + n]
            if n == CHUNK:
                self.chunks[c] = bytes(part)
            else:
                b = bytearray(self.chunks.get(c, _ZERO_CHUNK))
                b[lo : lo + n] = part
                self.chunks[c] = bytes(b)
            pos += n
        if end > self.size:
            self.size = end

    def truncate(self, size: int) -> None:
        if size < self.size:
            first_gone = -(-size // CHUNK)
            for c in [c for c in self.chunks if c >= first_gone]:
                del self.chunks[c]
            c, lo = divmod(size, CHUNK)
            if lo and c in self.chunks:
                self.chunks[c] = self.chunks[c][:lo] + bytes(CHUNK - lo)
        self.size = size

    def read(self, off: int = 0, n: int | None = None) -> bytes:
        end = self.size if n is None else min(self.size, off + n)
        if off >= end:
            return b""
        out = bytearray(end - off)
        for c in range(off // CHUNK, (end - 1) // CHUNK + 1):
            chunk = self.chunks.get(c)
            if chunk is None:
                continue
            lo = max(off, c * CHUNK)
            hi = min(end, (c + 1) * CHUNK)
            out[lo - off : hi - off] = chunk[lo - c * CHUNK : hi - c * CHUNK]
        return bytes(out)

    def write_to(self, path: str | os.PathLike[str]) -> None:
        """Create ``path`` with these contents, unwritten ranges as holes."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            run: list[bytes] = []
            start = -1
            for c in sorted(self.chunks):
                if c * CHUNK >= self.size:
                    break
                if run and c != start + len(run):
                    _pwrite_all(fd, b"".join(run), start * CHUNK)
                    run = []
                if not run:
                    start = c
                run.append(self.chunks[c])
            if run:
                _pwrite_all(fd, b"".join(run), start * CHUNK)
            os.ftruncate(fd, self.size)
        finally:
            os.close(fd)


def _pwrite_all(fd: int, data: bytes, off: int) -> None:
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, off)
        mv = mv[n:]
        off += n


# == the initial state ======================================================================

@dataclass
class Snapshot:
    """A directory tree keyed by inode number (the recorder's file ids; the root is 1)."""

    kinds: dict[int, str] = field(default_factory=lambda: {ROOT_ID: "d"})
    children: dict[int, dict[bytes, int]] = field(default_factory=lambda: {ROOT_ID: {}})
    contents: dict[int, bytes] = field(default_factory=dict)
    targets: dict[int, bytes] = field(default_factory=dict)


def scan_tree(root: str | os.PathLike[str]) -> Snapshot:
    """The tree under ``root`` as the recorder will name it (call before serving it)."""
    snap = Snapshot()

    def walk(dir_fd: int, dir_id: int) -> None:
        for name in sorted(os.fsencode(n) for n in os.listdir(dir_fd)):
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            ino = int(st.st_ino)
            snap.children[dir_id][name] = ino
            if stat.S_ISDIR(st.st_mode):
                snap.kinds[ino] = "d"
                snap.children[ino] = {}
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd)
                try:
                    walk(fd, ino)
                finally:
                    os.close(fd)
            elif stat.S_ISLNK(st.st_mode):
                snap.kinds[ino] = "l"
                snap.targets[ino] = os.readlink(name, dir_fd=dir_fd)
            elif stat.S_ISREG(st.st_mode):
                snap.kinds[ino] = "f"
                if ino not in snap.contents:
                    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
                    try:
                        with os.fdopen(fd, "rb", closefd=False) as f:
                            snap.contents[ino] = f.read()
                    finally:
                        os.close(fd)
            else:
                raise ValueError(f"{name!r}: special files are not modelled")

    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        walk(fd, ROOT_ID)
    finally:
        os.close(fd)
    return snap


# == the replay model =======================================================================

@dataclass(frozen=True)
class Cut:
    """A power cut after records ``[0, index)``; ``why`` says which record it is next to."""

    index: int
    why: str


@dataclass
class CrashState:
    """One crash state: what the storage could hold after the power went at ``cut``.

    ``files`` maps object numbers to contents; ``names`` is the namespace (directory
    object -> name -> object); ``choices`` says, per pending write (record index), what
    landed: ``"all"``, ``"none"`` or ``"torn:S"`` (S: the sector numbers, relative to the
    write's first sector, that landed).
    """

    cut: Cut
    label: str
    names: dict[int, dict[bytes, int]]
    kinds: dict[int, str]
    targets: dict[int, bytes]
    files: dict[int, SparseFile]
    choices: dict[int, str]
    key: tuple[Any, ...]

    def paths(self) -> dict[str, int]:
        """Every path (relative, '/'-separated, no leading '/') -> object."""
        return _paths(self.names, self.kinds)

    def read(self, path: str) -> bytes:
        """The contents of a regular file of this state (KeyError if absent)."""
        obj = self.paths()[path.strip("/")]
        return self.files[obj].read() if obj in self.files else b""

    def describe(self, records: Sequence[Record], limit: int = 40) -> str:
        """The pending writes of this state and what landed of each (for reports)."""
        lines = [f"cut at record {self.cut.index} ({self.cut.why}), state {self.label}: "
                 f"{len(self.choices)} pending writes"]
        for i, (idx, what) in enumerate(sorted(self.choices.items())):
            if i == limit:
                lines.append(f"  ... {len(self.choices) - limit} more")
                break
            r = records[idx]
            lines.append(f"  {r}: {what}")
        return "\n".join(lines)


class ReplayModel:
    """Crash states of a recorded log (see the module docstring for the model)."""

    def __init__(self, records: Sequence[Record], initial: Snapshot | None = None) -> None:
        self.records = list(records)
        snap = initial or Snapshot()
        # Objects: 0 is the root; every create/mkdir/symlink starts a new one.
        self.kinds: dict[int, str] = {0: "d"}
        self.targets: dict[int, bytes] = {}
        self.initial_contents: dict[int, bytes] = {}
        self._initial_names: dict[int, dict[bytes, int]] = {0: {}}
        cur: dict[int, int] = {ROOT_ID: 0}
        for ino, kind in snap.kinds.items():
            if ino != ROOT_ID:
                cur[ino] = len(self.kinds)
                self.kinds[cur[ino]] = kind
                if kind == "d":
                    self._initial_names[cur[ino]] = {}
        for d, entries in snap.children.items():
            for name, ino in entries.items():
                self._initial_names[cur[d]][name] = cur[ino]
        for ino, data in snap.contents.items():
            self.initial_contents[cur[ino]] = data
        for ino, t in snap.targets.items():
            self.targets[cur[ino]] = t
        # Which object each record touches, per object its data records and syncs.
        self.obj_of: list[int] = []
        self.dir_obj: list[dict[str, int]] = []  # per record: objects of parent, newparent
        self.data_ops: dict[int, list[int]] = {}
        self.syncs: dict[int, list[int]] = {}
        self.marks: list[tuple[int, str]] = []
        self.namespace_idx: list[int] = []
        self.name_at: dict[int, str] = {}  # sync record -> the file's name then
        name_of: dict[int, bytes] = {}
        for r in self.records:
            obj = -1
            dirs: dict[str, int] = {}
            for key in ("parent", "newparent"):
                if key in r.args:
                    try:
                        dirs[key] = cur[r.args[key]]
                    except KeyError:
                        raise ValueError(f"log record {r} names directory id {r.args[key]}, "
                                         "which was never created") from None
            self.dir_obj.append(dirs)
            if r.op in ("create", "mkdir", "symlink"):
                obj = len(self.kinds)
                cur[r.args["id"]] = obj
                self.kinds[obj] = {"create": "f", "mkdir": "d", "symlink": "l"}[r.op]
                if r.op == "symlink":
                    self.targets[obj] = r.args["target"]
            elif "id" in r.args:
                try:
                    obj = cur[r.args["id"]]
                except KeyError:
                    raise ValueError(f"log record {r} names file id {r.args['id']}, which "
                                     "was neither in the initial state nor created") from None
            self.obj_of.append(obj)
            if r.op in ("write", "truncate"):
                self.data_ops.setdefault(obj, []).append(r.index)
            elif r.op in SYNC_OPS:
                self.syncs.setdefault(obj, []).append(r.index)
            elif r.op == "mark":
                self.marks.append((r.index, r.args["label"]))
            if r.op in NAMESPACE_OPS:
                self.namespace_idx.append(r.index)
            if r.op in ("create", "mkdir", "symlink", "link"):
                name_of[obj] = r.args["name"]
            elif r.op == "rename":
                name_of[obj] = r.args["newname"]
            elif r.op in SYNC_OPS:
                self.name_at[r.index] = os.fsdecode(name_of.get(obj, b"?" if obj else b"/"))
        self._durable: dict[int, tuple[int, SparseFile]] = {}

    # -- cuts ------------------------------------------------------------------------------
    def mark_index(self, label: str) -> int:
        """Log index of the first MARK(label); KeyError when there is none."""
        for idx, lab in self.marks:
            if lab == label:
                return idx
        raise KeyError(label)

    def cuts(self, *, at_marks: bool = False, start: int = 0) -> list[Cut]:
        """Cuts just before and just after every sync record (and MARK), and at the end.

        Only cuts at or after index ``start`` are returned.
        """
        found: dict[int, str] = {}
        for r in self.records:
            if r.op in SYNC_OPS or (at_marks and r.op == "mark"):
                what = f"{r} of {self.name_at[r.index]}" if r.op in SYNC_OPS else str(r)
                found.setdefault(r.index, f"before {what}")
                found.setdefault(r.index + 1, f"after {what}")
        found[len(self.records)] = "end of the log"
        return [Cut(i, why) for i, why in sorted(found.items()) if i >= start]

    # -- states --------------------------------------------------------------------------------
    def _namespace_at(self, k: int) -> dict[int, dict[bytes, int]]:
        names = {d: dict(e) for d, e in self._initial_names.items()}
        for idx in self.namespace_idx:
            if idx >= k:
                break
            r = self.records[idx]
            a = r.args
            obj = self.obj_of[idx]
            if r.op in ("create", "mkdir", "symlink"):
                names[self._dir("parent", idx, names)][a["name"]] = obj
                if r.op == "mkdir":
                    names[obj] = {}
            elif r.op == "link":
                names[self._dir("parent", idx, names)][a["name"]] = obj
            elif r.op in ("unlink", "rmdir"):
                d = names[self._dir("parent", idx, names)]
                if d.get(a["name"]) != obj:
                    raise ValueError(f"log record {r}: the model has {a['name']!r} as object "
                                     f"{d.get(a['name'])}, not {obj} (recorder bug?)")
                del d[a["name"]]
            elif r.op == "rename":
                src = names[self._dir("parent", idx, names)]
                if src.get(a["name"]) != obj:
                    raise ValueError(f"log record {r}: source is not object {obj}")
                del src[a["name"]]
                names[self._dir("newparent", idx, names)][a["newname"]] = obj
        return names

    def _dir(self, key: str, idx: int, names: dict[int, dict[bytes, int]]) -> int:
        obj = self.dir_obj[idx][key]
        if obj not in names:
            raise ValueError(f"log record {self.records[idx]}: directory object {obj} is "
                             "not a live directory in the model (recorder bug?)")
        return obj

    def _durable_content(self, obj: int, upto: int) -> SparseFile:
        """The object's contents after all its data records with index < ``upto``."""
        ops = self.data_ops.get(obj, [])
        pos = bisect.bisect_left(ops, upto)
        cached = self._durable.get(obj)
        if cached is None or cached[0] > pos:
            f = SparseFile.from_bytes(self.initial_contents.get(obj, b""))
            done = 0
        else:
            done, f = cached
            if done < pos:
                f = f.copy()  # states handed out earlier may share the cached object
        for idx in ops[done:pos]:
            _apply(f, self.records[idx])
        self._durable[obj] = (pos, f)
        return f

    def states(self, cut: Cut, *, n_random: int = 3, seed: int | str = 0,
               per_file: bool = True) -> Iterator[CrashState]:
        """The crash states of one cut: no pending writes, all of them, random subsets,
        and (``per_file``, when two or more files have pending writes) for each such
        file the state where only its pending writes landed, whole, and (three or more
        files) the state where all but its pending writes landed."""
        k = cut.index
        names = self._namespace_at(k)
        live = _reachable_files(names, self.kinds)
        base: dict[int, SparseFile] = {}
        pending: dict[int, list[int]] = {}  # obj -> its data records after its last sync
        synced_upto: dict[int, int] = {}
        for obj in sorted(live):
            syncs = self.syncs.get(obj, [])
            s = bisect.bisect_left(syncs, k)
            last_sync = syncs[s - 1] if s else -1
            base[obj] = self._durable_content(obj, last_sync)
            ops = self.data_ops.get(obj, [])
            lo, hi = bisect.bisect_right(ops, last_sync), bisect.bisect_left(ops, k)
            pending[obj] = ops[lo:hi]
            synced_upto[obj] = lo
        ns_version = bisect.bisect_left(self.namespace_idx, k)

        def build(label: str, decide: Any) -> CrashState:
            files: dict[int, SparseFile] = {}
            choices: dict[int, str] = {}
            for obj in sorted(live):
                ops = pending[obj]
                f = base[obj]
                if ops:
                    f = f.copy()
                    for idx in ops:
                        r = self.records[idx]
                        if r.op == "truncate":
                            _apply(f, r)
                            continue
                        what = decide(obj, r)
                        choices[idx] = what
                        if what == "all":
                            _apply(f, r)
                        elif what.startswith("torn:"):
                            sectors = [int(s) for s in what[5:].split(",") if s]
                            _apply_sectors(f, r, sectors)
                files[obj] = f
            key = (ns_version, tuple(sorted((o, synced_upto[o]) for o in live)),
                   tuple(sorted(choices.items())))
            return CrashState(cut, label, names, self.kinds, self.targets, files, choices, key)

        yield build("none", lambda obj, r: "none")
        yield build("all", lambda obj, r: "all")
        for i in range(n_random):
            rng = random.Random(f"{seed}/{k}/{i}")
            modes: dict[int, str] = {}

            def decide(obj: int, r: Record, rng: random.Random = rng,
                       modes: dict[int, str] = modes) -> str:
                mode = modes.get(obj)
                if mode is None:
                    mode = modes[obj] = rng.choice(("none", "all", "mixed"))
                if mode != "mixed":
                    return mode
                if rng.random() < 0.5:
                    return "none"
                if rng.random() < 2 / 3:
                    return "all"
                n = _sector_count(r)
                keep = [s for s in range(n) if rng.random() < 0.5]
                if len(keep) == n:
                    return "all"
                return "torn:" + ",".join(map(str, keep)) if keep else "none"

            yield build(f"random-{i}", decide)
        if per_file:
            writers = [o for o in sorted(live)
                       if any(self.records[i].op == "write" for i in pending[o])]
            if len(writers) >= 2:
                where = {o: p for p, o in _paths(names, self.kinds).items()}
                for o in writers:
                    yield build(f"only {where.get(o, o)}",
                                lambda obj, r, o=o: "all" if obj == o else "none")
                    if len(writers) >= 3:
                        yield build(f"all but {where.get(o, o)}",
                                    lambda obj, r, o=o: "none" if obj == o else "all")

    def all_states(self, cuts: Iterable[Cut], *, n_random: int = 3, seed: int | str = 0,
                   per_file: bool = True, dedupe: bool = True) -> Iterator[CrashState]:
        """The states of every cut, each distinct state once (when ``dedupe``)."""
        seen: set[tuple[Any, ...]] = set()
        for cut in cuts:
            for st in self.states(cut, n_random=n_random, seed=seed, per_file=per_file):
                if dedupe:
                    if st.key in seen:
                        continue
                    seen.add(st.key)
                yield st

    # -- materializing -------------------------------------------------------------------------
    def materialize(self, state: CrashState, dest: str | os.PathLike[str]) -> None:
        """Write the state's tree into ``dest`` (created; must not exist or be empty)."""
        root = Path(dest)
        root.mkdir(parents=True, exist_ok=True)
        if any(root.iterdir()):
            raise ValueError(f"{root} is not empty")
        first_path: dict[int, Path] = {}

        def walk(d: int, here: Path) -> None:
            for name, obj in sorted(state.names.get(d, {}).items()):
                p = here / os.fsdecode(name)
                kind = state.kinds[obj]
                if kind == "d":
                    p.mkdir()
                    walk(obj, p)
                elif kind == "l":
                    os.symlink(state.targets[obj], p)
                elif obj in first_path:
                    os.link(first_path[obj], p)
                else:
                    first_path[obj] = p
                    state.files.get(obj, SparseFile()).write_to(p)

        walk(0, root)


def _paths(names: dict[int, dict[bytes, int]], kinds: dict[int, str]) -> dict[str, int]:
    out: dict[str, int] = {}

    def walk(d: int, prefix: str) -> None:
        for name, obj in sorted(names.get(d, {}).items()):
            p = prefix + os.fsdecode(name)
            out[p] = obj
            if kinds[obj] == "d":
                walk(obj, p + "/")

    walk(0, "")
    return out


def _reachable_files(names: dict[int, dict[bytes, int]], kinds: dict[int, str]) -> set[int]:
    out: set[int] = set()
    stack = [0]
    while stack:
        d = stack.pop()
        for obj in names.get(d, {}).values():
            if kinds[obj] == "d":
                stack.append(obj)
            elif kinds[obj] == "f":
                out.add(obj)
    return out


def _apply(f: SparseFile, r: Record) -> None:
    if r.op == "write":
        f.write(r.args["off"], r.data)
    elif r.op == "truncate":
        f.truncate(r.args["size"])


def _sector_count(r: Record) -> int:
    off, n = int(r.args["off"]), len(r.data)
    if n == 0:
        return 0
    return (off + n - 1) // SECTOR - off // SECTOR + 1


def _apply_sectors(f: SparseFile, r: Record, sectors: Sequence[int]) -> None:
    """Apply the parts of a write that fall in the given sectors (relative numbers)."""
    off = r.args["off"]
    first = off // SECTOR
    end = off + len(r.data)
    for s in sectors:
        lo = max(off, (first + s) * SECTOR)
        hi = min(end, (first + s + 1) * SECTOR)
        if lo < hi:
            f.write(lo, r.data[lo - off : hi - off])


# == command line ============================================================================

def _main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="logwrites.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="mount BACKING at MOUNTPOINT, recording to LOG")
    s.add_argument("backing")
    s.add_argument("mountpoint")
    s.add_argument("log")
    s.add_argument("--skip", action="append", default=None, metavar="SUFFIX",
                   help="file name suffix whose writes are not logged (default: -shm)")
    s.add_argument("--real-fsync", action="store_true",
                   help="also fsync the backing files (not needed for the model)")
    d = sub.add_parser("dump", help="print a log's records")
    d.add_argument("log")
    args = p.parse_args(argv)
    if args.cmd == "serve":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        skip = tuple(x for x in (args.skip if args.skip is not None else DEFAULT_SKIP) if x)
        serve(args.backing, args.mountpoint, args.log, skip_suffixes=skip,
              real_fsync=args.real_fsync)
        return 0
    for r in read_log(args.log):
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
