"""The Linux SCSI tape driver (``st``) through ``fcntl.ioctl``.

Use the non-rewinding device (``/dev/nst0``): the rewinding one (``/dev/st0``) rewinds
at every close, which would lose the position between two commands.

The structures and request numbers are those of ``<sys/mtio.h>`` (glibc, which matches
``<linux/mtio.h>`` on Linux): ``struct mtop {short mt_op; int mt_count;}``,
``struct mtget {long mt_type, mt_resid, mt_dsreg, mt_gstat, mt_erreg; daddr_t
mt_fileno, mt_blkno;}`` (``daddr_t`` is ``int``), ``struct mtpos {long mt_blkno;}``,
and ``MTIOCTOP = _IOW('m', 1, struct mtop)``, ``MTIOCGET = _IOR('m', 2, struct
mtget)``, ``MTIOCPOS = _IOR('m', 3, struct mtpos)``. They are built here with ctypes
and the generic ``_IOC`` encoding; ``tests/test_tape_device.py`` compiles a C probe
against the kernel headers and checks every size, offset and number.

Errors, as ``st`` reports them: a write past early warning returns ``ENOSPC`` once
(:class:`~.device.EarlyWarning`), later writes are allowed until the physical end;
``EIO`` after that is :class:`~.device.EndOfTape` when the status says EOT; a read of
``0`` bytes is a filemark, or EOD when ``MTIOCGET`` says so.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import time

from sdbackup.errors import NotFoundError, UsageError
from sdbackup.media.tape.device import (
    EarlyWarning,
    EndOfData,
    EndOfTape,
    TapeDevice,
    TapeError,
    TapeStatus,
)

# -- <sys/mtio.h> ---------------------------------------------------------------------


class MtOp(ctypes.Structure):
    _fields_ = [("mt_op", ctypes.c_short), ("mt_count", ctypes.c_int)]


class MtGet(ctypes.Structure):
    _fields_ = [("mt_type", ctypes.c_long), ("mt_resid", ctypes.c_long),
                ("mt_dsreg", ctypes.c_long), ("mt_gstat", ctypes.c_long),
                ("mt_erreg", ctypes.c_long), ("mt_fileno", ctypes.c_int),
                ("mt_blkno", ctypes.c_int)]


class MtPos(ctypes.Structure):
    _fields_ = [("mt_blkno", ctypes.c_long)]


# asm-generic/ioctl.h (x86, arm, riscv...): nr 8 bits, type 8, size 14, dir 2.
_IOC_NRSHIFT, _IOC_TYPESHIFT, _IOC_SIZESHIFT, _IOC_DIRSHIFT = 0, 8, 16, 30
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (ord(kind) << _IOC_TYPESHIFT) \
        | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


MTIOCTOP = _ioc(_IOC_WRITE, "m", 1, ctypes.sizeof(MtOp))
MTIOCGET = _ioc(_IOC_READ, "m", 2, ctypes.sizeof(MtGet))
MTIOCPOS = _ioc(_IOC_READ, "m", 3, ctypes.sizeof(MtPos))

MTFSF, MTBSF, MTFSR, MTBSR, MTWEOF, MTREW = 1, 2, 3, 4, 5, 6
MTEOM = 12
MTSETBLK = 20
MTSEEK = 22

GMT_EOF = 0x80000000
GMT_BOT = 0x40000000
GMT_EOT = 0x20000000
GMT_EOD = 0x08000000
GMT_WR_PROT = 0x04000000
GMT_ONLINE = 0x01000000
MT_ST_BLKSIZE_MASK = 0xFFFFFF
MT_ST_BLKSIZE_SHIFT = 0

OPS = {"MTFSF": MTFSF, "MTBSF": MTBSF, "MTFSR": MTFSR, "MTBSR": MTBSR, "MTWEOF": MTWEOF,
       "MTREW": MTREW, "MTEOM": MTEOM, "MTSETBLK": MTSETBLK, "MTSEEK": MTSEEK}
"""The operations used, by their <sys/mtio.h> names (checked by the tests)."""

MAX_BLOCK = 1 << 24  # st's default buffer limit is lower; the drive answers EINVAL


class StTape(TapeDevice):
    """A tape in a drive reached through the Linux ``st`` driver."""

    def __init__(self, fd: int, name: str) -> None:
        super().__init__()
        self.fd = fd
        self.name = name
        self._warned = False

    @classmethod
    def open(cls, path: str, *, write: bool = True) -> StTape:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise NotFoundError(f"tape drive {path} does not exist (a file-backed tape is "
                                "named file:PATH)") from None
        if not stat.S_ISCHR(st.st_mode):
            raise UsageError(f"{path} is not a tape device (a character device such as "
                             "/dev/nst0); a file-backed tape is named file:PATH")
        try:
            fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.EROFS:
                raise UsageError(f"the tape in {path} is write-protected") from None
            raise TapeError(f"cannot open tape drive {path}: {e.strerror}") from None
        dev = cls(fd, path)
        try:
            dev.status()  # not a tape drive: ENOTTY here
        except BaseException:
            os.close(fd)
            raise
        return dev

    # -- ioctl ----------------------------------------------------------------------------

    def _op(self, op: int, count: int = 1) -> None:
        t = time.monotonic()
        try:
            fcntl.ioctl(self.fd, MTIOCTOP, MtOp(op, count))
        except OSError as e:
            raise TapeError(f"tape {self.name}: {_opname(op)} {count} failed at block "
                            f"{self._where()}: {e.strerror}") from None
        finally:
            self._charge(t)

    def _charge(self, t: float) -> None:
        self.last_cost = time.monotonic() - t
        self.clock += self.last_cost

    def _where(self) -> str:
        try:
            return str(self.tell())
        except (OSError, TapeError):
            return "?"

    def status(self) -> TapeStatus:
        g = MtGet()
        try:
            fcntl.ioctl(self.fd, MTIOCGET, g)
        except OSError as e:
            raise TapeError(f"{self.name} is not a tape drive or does not answer "
                            f"(MTIOCGET: {e.strerror})") from None
        gs = g.mt_gstat & 0xFFFFFFFF
        return TapeStatus(
            file_number=g.mt_fileno, block_number=g.mt_blkno, block=self.tell(),
            block_size=(g.mt_dsreg >> MT_ST_BLKSIZE_SHIFT) & MT_ST_BLKSIZE_MASK,
            bot=bool(gs & GMT_BOT), eod=bool(gs & GMT_EOD), early_warning=bool(gs & GMT_EOT),
            write_protected=bool(gs & GMT_WR_PROT), online=bool(gs & GMT_ONLINE))

    def tell(self) -> int:
        p = MtPos()
        try:
            fcntl.ioctl(self.fd, MTIOCPOS, p)
        except OSError as e:
            raise TapeError(f"tape {self.name}: MTIOCPOS failed: {e.strerror}") from None
        return int(p.mt_blkno)

    # -- the interface ----------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self.status().block_size

    def set_block_size(self, size: int) -> None:
        self._op(MTSETBLK, size)

    @property
    def max_block(self) -> int:
        return MAX_BLOCK

    def rewind(self) -> None:
        self._warned = False
        self._op(MTREW)

    def read(self, size: int) -> bytes:
        t = time.monotonic()
        try:
            data = os.read(self.fd, size)
        except OSError as e:
            if e.errno == errno.ENOMEM:
                raise TapeError(f"tape {self.name}: the block at {self._where()} is larger "
                                f"than {size} bytes") from None
            if e.errno == errno.EIO and self.status().eod:
                raise EndOfData(f"tape {self.name}: end of data at block "
                                f"{self._where()}") from None
            raise TapeError(f"tape {self.name}: read error at block {self._where()}: "
                            f"{e.strerror}") from None
        finally:
            self._charge(t)
        if not data and self.status().eod:
            raise EndOfData(f"tape {self.name}: end of data at block {self._where()}")
        self.stats.bytes_read += len(data)
        self.stats.blocks_read += 1 if data else 0
        return data

    def write(self, data: bytes | memoryview) -> None:
        t = time.monotonic()
        try:
            n = os.write(self.fd, data)
        except OSError as e:
            if e.errno == errno.ENOSPC and not self._warned:
                self._warned = True
                raise EarlyWarning(f"tape {self.name} is nearly full (early warning at "
                                   f"block {self._where()})") from None
            if e.errno in (errno.ENOSPC, errno.EIO) and self.status().early_warning:
                raise EndOfTape(f"tape {self.name} is full (physical end at block "
                                f"{self._where()})") from None
            if e.errno == errno.EROFS or e.errno == errno.EACCES:
                raise UsageError(f"the tape in {self.name} is write-protected") from None
            raise TapeError(f"tape {self.name}: write error at block {self._where()}: "
                            f"{e.strerror}") from None
        finally:
            self._charge(t)
        if n != len(data):
            # st returns a short count at early warning in fixed-block mode.
            raise EarlyWarning(f"tape {self.name} is nearly full: {n} of {len(data)} bytes "
                               f"written at block {self._where()}")
        self.stats.bytes_written += n
        self.stats.blocks_written += 1

    def write_filemarks(self, count: int = 1) -> None:
        self._op(MTWEOF, count)

    def space_files(self, count: int) -> None:
        if count > 0:
            self._op(MTFSF, count)
        elif count < 0:
            self._op(MTBSF, -count)

    def space_blocks(self, count: int) -> None:
        if count > 0:
            self._op(MTFSR, count)
        elif count < 0:
            self._op(MTBSR, -count)

    def seek(self, block: int) -> None:
        self.stats.locates += 1
        self.stats.seeks.append(block)
        self._op(MTSEEK, block)
        self.stats.locate_seconds += self.last_cost

    def to_eod(self) -> None:
        self._op(MTEOM)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _opname(op: int) -> str:
    for k, v in OPS.items():
        if v == op:
            return k
    return f"op {op}"
