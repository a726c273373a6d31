"""A block device: a regular (usually sparse) file or a raw block device.

All I/O is positional (``os.pread``/``os.pwrite``/``os.preadv``) so that many threads
may share one descriptor without seeking. ``direct=True`` opens with ``O_DIRECT`` for
disks shared between hosts, so that no host serves a stale page from its own page
cache; buffers are then page-aligned ``mmap`` buffers and I/O is block-aligned.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
import threading
from pathlib import Path

from sdbackup.errors import CorruptError, NoSpaceError, UsageError


def device_size(path: str | os.PathLike[str]) -> int:
    """Size in bytes of a regular file or a block device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def is_block_device(path: str | os.PathLike[str]) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


_HOLDS_DATA_MAX_EXTENTS = 32  # at most 64 MiB of probes with the default probe


def holds_data(path: str | os.PathLike[str], probe: int = 1 << 20) -> bool:
    """True when the file or device visibly holds data (a guard before overwriting it).

    Looks for a non-zero byte in the first and last ``probe`` bytes of every allocated
    extent of a regular file (``SEEK_DATA``/``SEEK_HOLE``; a file system without them
    reports one extent, the whole file), or of a block device as a whole (where
    partition tables and file system labels live). A file with more than 32
    allocated extents that all probe as zeros counts as holding data: the guard
    errs on the side of not destroying anything.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size == 0:
            return False
        if is_block_device(path):
            extents = [(0, size)]
        else:
            extents = []
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:  # no data after pos
                        break
                    if e.errno != errno.EINVAL:
                        raise
                    extents = [(0, size)]  # SEEK_DATA unsupported: probe the whole file
                    break
                end = os.lseek(fd, start, os.SEEK_HOLE)
                if len(extents) == _HOLDS_DATA_MAX_EXTENTS:
                    return True
                extents.append((start, end))
                pos = end
        for start, end in extents:
            for off in {start, max(start, end - probe)}:
                chunk = os.pread(fd, min(probe, end - off), off)
                if chunk.count(0) != len(chunk):
                    return True
        return False
    finally:
        os.close(fd)


class BlockDevice:
    """One disk of the cluster, addressed in blocks of ``block_size`` bytes.

    Thread-safe: positional I/O only. Short reads past the end of a sparse file read
    as zeros; a short read inside the device's size is a :class:`CorruptError`.

    ``direct=True`` (every disk shared between hosts) opens with ``O_DIRECT``: no read
    is served from, and no write lingers in, this host's page cache, so a block written
    back by a node on another host is what the next read here returns. ``O_DIRECT``
    needs memory, offsets and lengths aligned to the device's sector (512 or 4096
    bytes, probed at open, :attr:`align`); callers that pass aligned buffers (the
    node's segment buffers, the copier's ring) go straight to the disk, everything
    else goes through one reused, aligned buffer per thread: no allocation and no
    ``mmap`` per call on the hot path.

    :meth:`datasync` is a group commit: concurrent callers share one ``fdatasync``
    that started after each of them called, so a busy node pays one flush per batch.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        block_size: int,
        *,
        writable: bool = True,
        direct: bool = False,
        sync: bool = False,
    ) -> None:
        self.path = Path(path)
        self.block_size = block_size
        self.direct = direct
        flags = os.O_RDWR if writable else os.O_RDONLY
        if direct:
            flags |= os.O_DIRECT
        if sync:
            flags |= os.O_DSYNC
        try:
            self.fd = os.open(self.path, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UsageError(f"disk {self.path} does not exist: check the path in the "
                             "cluster config or re-create the disk") from None
        except PermissionError:
            raise UsageError(f"no permission to open disk {self.path}: run as a user "
                             "that can read and write it") from None
        except OSError as e:
            if e.errno == errno.EROFS:
                raise UsageError(f"disk {self.path} is read-only on this host: the "
                                 "cluster needs to write it") from None
            if direct and e.errno == errno.EINVAL:
                raise UsageError(f"the file system holding disk {self.path} does not "
                                 "support O_DIRECT (direct I/O): put the disk elsewhere"
                                 ) from None
            raise
        try:
            if writable and _read_only_block_device(self.fd):
                raise UsageError(f"disk {self.path} is read-only on this host (a read-only "
                                 "block device): the cluster needs to write it")
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
            self.nblocks = self.size // block_size
            self.align = _probe_alignment(self.fd, self.path) if direct else 1
            if direct and block_size % self.align:
                raise UsageError(f"disk {self.path} needs direct I/O in units of "
                                 f"{self.align} bytes, more than the block size "
                                 f"{block_size}: use --block-size {self.align} or larger")
        except BaseException:
            os.close(self.fd)
            raise
        self._sync_cv = threading.Condition()
        self._sync_started = 0
        self._sync_done = 0
        self._sync_running = False
        self._sync_errors: dict[int, OSError] = {}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> BlockDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, block: int, count: int) -> None:
        if block < 0 or count < 0 or block + count > self.nblocks:
            raise UsageError(
                f"block range {block}+{count} is outside disk {self.path} "
                f"({self.nblocks} blocks)"
            )

    def read(self, block: int, count: int) -> bytes:
        """Read ``count`` blocks starting at ``block``."""
        self._check(block, count)
        n = count * self.block_size
        off = block * self.block_size
        if self.direct:
            view = _bounce(n)
            try:
                self._preadv_full(view, off)
                return bytes(view)
            finally:
                view.release()
        data = os.pread(self.fd, n, off)
        if len(data) != n:  # a short read (the kernel caps one call below 2 GiB): go on
            parts = [data]
            got = len(data)
            while got < n:
                more = os.pread(self.fd, n - got, off + got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            self._short(got, n, off)
            data = b"".join(parts)
        return data

    def readinto(self, block: int, buf: memoryview | bytearray | mmap.mmap) -> None:
        """Fill ``buf`` (a whole number of blocks) from ``block`` on.

        With ``direct=True`` a buffer that is not aligned is filled through this
        thread's aligned bounce buffer (``O_DIRECT`` refuses unaligned memory).
        """
        with memoryview(buf) as mv:
            n = mv.nbytes
            if n % self.block_size:
                raise ValueError("buffer is not a whole number of blocks")
            self._check(block, n // self.block_size)
            off = block * self.block_size
            if self.direct and n and not _aligned(mv, self.align):
                bounce = _bounce(n)
                try:
                    self._preadv_full(bounce, off)
                    mv.cast("B")[:] = bounce
                finally:
                    bounce.release()
                return
            self._preadv_full(mv, off)

    def _preadv_full(self, mv: memoryview, off: int) -> None:
        """Fill ``mv`` from byte ``off``, going on after short reads; CorruptError at EOF."""
        view = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
        n = view.nbytes
        got = 0
        while got < n:
            r = os.preadv(self.fd, [view[got:]], off + got)
            if r == 0:
                break
            got += r
        self._short(got, n, off)

    def _short(self, got: int, want: int, off: int) -> None:
        if got < want:
            raise CorruptError(
                f"short read from disk {self.path} at byte {off + got}: "
                f"expected {want} bytes, got {got} (truncated device?)"
            )

    def write(self, block: int, data: bytes | bytearray | memoryview | mmap.mmap) -> None:
        """Write whole blocks at ``block``; raises NoSpaceError if the host disk is full."""
        mv = memoryview(data)
        try:
            if mv.nbytes % self.block_size:
                raise ValueError("write is not a whole number of blocks")
            self._check(block, mv.nbytes // self.block_size)
            if mv.nbytes == 0:
                return
            off = block * self.block_size
            if self.direct and not _aligned(mv, self.align):
                bounce = _bounce(mv.nbytes)
                try:
                    bounce[:] = mv.cast("B")
                    self._pwrite_all(bounce, off)
                finally:
                    bounce.release()
                return
            self._pwrite_all(mv, off)
        finally:
            mv.release()

    def _pwrite_all(self, mv: memoryview, off: int) -> None:
        view = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
        done = 0
        try:
            while done < view.nbytes:
                done += os.pwrite(self.fd, view[done:], off + done)
        except OSError as e:
            if e.errno == errno.ENOSPC:  # the host file system behind a sparse disk
                raise NoSpaceError(
                    f"the host file system holding disk {self.path} is full: free space "
                    "there (the cluster's own allocation was fine)"
                ) from None
            raise

    def fsync(self) -> None:
        os.fsync(self.fd)

    def datasync(self) -> None:
        """Return once everything written before this call is on stable storage.

        Group commit: a caller waits for the first ``fdatasync`` that *starts* after it
        called (one already running may have started before its writes ended), and
        every caller waiting at that moment shares it. An ``fdatasync`` error reaches
        every caller it covered.
        """
        cv = self._sync_cv
        with cv:
            want = self._sync_started + 1
            while self._sync_done < want:
                if self._sync_running:
                    cv.wait()
                    continue
                self._sync_running = True
                self._sync_started += 1
                n = self._sync_started
                cv.release()
                err: OSError | None = None
                try:
                    os.fdatasync(self.fd)
                except OSError as e:
                    err = e
                finally:
                    cv.acquire()
                    self._sync_running = False
                    self._sync_done = n
                    if err is not None:
                        self._sync_errors[n] = err
                        for old in [k for k in self._sync_errors if k < n - 64]:
                            del self._sync_errors[old]
                    cv.notify_all()
            err = self._sync_errors.get(want)
        if err is not None:
            raise OSError(err.errno, f"flushing disk {self.path} failed: {err.strerror}; "
                          "writes since the last flush may not be on the disk")

    def punch(self, block: int, count: int) -> None:
        """Give the blocks' space back to the host (sparse files); contents become zeros."""
        self._check(block, count)
        if count == 0:
            return
        try:
            _punch_hole(self.fd, block * self.block_size, count * self.block_size)
        except OSError:  # not supported (block device, old fs): zero instead
            zeros = _bounce(count * self.block_size)
            try:
                zeros[:] = bytes(zeros.nbytes)
                self._pwrite_all(zeros, block * self.block_size)
            finally:
                zeros.release()


_PAGE = mmap.PAGESIZE
_BOUNCE_KEEP = 64 << 20  # a thread keeps its bounce buffer up to this size
_local = threading.local()


def _bounce(n: int) -> memoryview:
    """A page-aligned view of ``n`` bytes of this thread's reused buffer.

    The caller releases the view before its next call (one view per thread at a time).
    """
    buf: mmap.mmap | None = getattr(_local, "buf", None)
    if buf is None or len(buf) < n:
        size = max(1 << 20, 1 << (max(n, 1) - 1).bit_length())
        buf = mmap.mmap(-1, size)
        if size <= _BOUNCE_KEEP:
            _local.buf = buf
    return memoryview(buf)[:n]


def aligned_buffer(size: int) -> mmap.mmap:
    """A zero-filled, page-aligned buffer (memory ``O_DIRECT`` I/O can use as it is)."""
    return mmap.mmap(-1, max(size, _PAGE))


_BLKROGET = 0x125E  # _IO(0x12, 94): is this block device read-only?


def _read_only_block_device(fd: int) -> bool:
    """A block device set read-only (``losetup -r``, ``blockdev --setro``) still opens
    for writing on Linux; only its writes fail (EPERM). Ask it."""
    if not stat.S_ISBLK(os.fstat(fd).st_mode):
        return False
    import fcntl
    import struct

    try:
        flag = fcntl.ioctl(fd, _BLKROGET, struct.pack("i", 0))
    except OSError:
        return False
    return bool(struct.unpack("i", flag)[0])


def _probe_alignment(fd: int, path: Path) -> int:
    """The alignment ``O_DIRECT`` needs on this device: 512 or 4096 bytes.

    Reads one sector at offset 0 into memory aligned to exactly 512 (not 4096): the
    kernel refuses (EINVAL) when the device needs more.
    """
    buf = mmap.mmap(-1, 3 * 4096)
    try:
        with memoryview(buf) as mv:
            for a in (512, 4096):
                try:
                    os.preadv(fd, [mv[a : 2 * a]], 0)
                    return a
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
    finally:
        buf.close()
    raise UsageError(f"disk {path} refuses direct I/O of 512 and 4096 bytes")


def _aligned(mv: memoryview, align: int) -> bool:
    if mv.nbytes % align:
        return False
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mv))
    except TypeError:  # read-only buffer
        return False
    return addr % align == 0


def _punch_hole(fd: int, offset: int, length: int) -> None:
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    falloc_fl_keep_size, falloc_fl_punch_hole = 0x01, 0x02
    r = libc.fallocate(
        ctypes.c_int(fd),
        ctypes.c_int(falloc_fl_keep_size | falloc_fl_punch_hole),
        ctypes.c_longlong(offset),
        ctypes.c_longlong(length),
    )
    if r != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less)."""
    mv = memoryview(data).cast("B")
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv = mv[n:]
        offset += n


def create_sparse(path: str | os.PathLike[str], size: int) -> None:
    """Create a sparse file of ``size`` bytes (refuses to overwrite)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
