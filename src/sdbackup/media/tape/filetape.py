"""A faithful file-backed tape, named ``file:PATH`` wherever a tape drive is accepted.

It behaves as a tape in an ``st`` drive does (see :mod:`.device` for the contract):
strictly sequential blocks of bounded size and filemarks, end of data after the last
one, a write that discards everything after it, a capacity with an early-warning zone,
fixed or variable blocks. And it reports the time a real drive would take, from a
time model in the manner of the LTFS file backend (``filedebug``): the tape is
serpentine, ``wraps`` passes end to end, even wraps written forward, odd ones back;
moving the tape from one longitudinal position to another takes the distance times
``eot_to_bot`` (end to end), changing the direction of motion ``change_direction``,
changing wraps ``change_track``; data moves at ``speed`` bytes per second while
streaming. Written blocks fill the drive's buffer (at most ``drive_buffer`` bytes),
which the tape drains at ``speed`` in wall-clock time; a write that arrives after it ran
dry (the tape stopped) costs a backhitch (two direction changes): a host that feeds the
drive slower than it streams makes it shoe-shine, and that is visible in the figures.
The parameters default to an LTO-8-class drive (12 TB native, 208 wraps of 57.7 GB)
and are stored in the tape file, so that they travel with it. A tape created with a
smaller capacity is the beginning of such a cartridge: its wraps keep their native
length, so that a locate costs what it costs on the real tape (about 1.7 times faster
than streaming), not a shrunken tape's.

File layout (private to this module): a 4096-byte header (``SDBTAPE1``, u32 length,
JSON: capacity, early-warning zone, largest block, the model's parameters), then one
entry per object: ``<IIQ`` (magic ``SDBE``, kind 1 data / 2 filemark, length) and the
block's bytes. The file ends at end of data. A torn last entry (a crash while writing)
reads as end of data and is cut off by the next write.
"""

from __future__ import annotations

import bisect
import dataclasses
import errno
import fcntl
import json
import math
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdbackup.errors import BusyError, NotFoundError, UsageError
from sdbackup.media.tape.device import (
    EarlyWarning,
    EndOfData,
    EndOfTape,
    TapeDevice,
    TapeError,
    TapeStatus,
)

MAGIC = b"SDBTAPE1"
HEADER_BYTES = 4096
ENTRY = struct.Struct("<IIQ")
ENTRY_MAGIC = 0x45424453  # "SDBE"
DATA, MARK = 1, 2
DEFAULT_MAX_BLOCK = 8 << 20


@dataclass(frozen=True)
class TapeModel:
    """Times of an LTO-8-class drive (defaults): 360 MB/s native, 208 wraps, about
    94 s from one end of the tape to the other, seconds to turn the tape around."""

    speed: float = 360e6  # bytes per second while streaming
    wraps: int = 208
    native_capacity: float = 12e12  # bytes of the full cartridge: sets a wrap's length
    eot_to_bot: float = 94.0  # seconds to move the tape end to end
    change_direction: float = 2.0  # seconds to reverse the tape
    change_track: float = 0.01  # seconds to step the head to another wrap
    load: float = 15.0  # seconds to load and thread a cartridge (charged at open)
    drive_buffer: int = 1 << 30  # bytes the drive buffers (drained at speed while writing)

    def describe(self) -> str:
        return (f"{self.speed / 1e6:.0f} MB/s, {self.wraps} wraps of "
                f"{self.native_capacity / self.wraps / 1e9:.3g} GB, end to end "
                f"{self.eot_to_bot:g} s, direction change {self.change_direction:g} s, "
                f"wrap change {self.change_track * 1e3:g} ms, load {self.load:g} s, drive "
                f"buffer {self.drive_buffer >> 20} MiB")


class _Motion:
    """Where the head is along the tape and which way the tape last moved."""

    def __init__(self, model: TapeModel, capacity: int) -> None:
        # A tape of a smaller capacity is the beginning of a full cartridge: its wraps
        # are as long as the cartridge's, so locating and streaming stay consistent.
        self.m = model
        self.wrap_bytes = max(1.0, model.native_capacity / model.wraps)
        self.direction = 1

    def _place(self, x: int) -> tuple[int, float]:
        """(wrap, longitudinal position 0..1) of tape byte ``x``."""
        wrap = int(x // self.wrap_bytes)
        frac = (x - wrap * self.wrap_bytes) / self.wrap_bytes
        return wrap, (frac if wrap % 2 == 0 else 1.0 - frac)

    def locate(self, x0: int, x1: int, stats: Any) -> float:
        """Seconds to move from tape byte ``x0`` to ``x1``, ready to read forward."""
        if x0 == x1:
            return 0.0
        w0, l0 = self._place(x0)
        w1, l1 = self._place(x1)
        t = abs(l1 - l0) * self.m.eot_to_bot
        move = 1 if l1 > l0 else -1 if l1 < l0 else 0
        if move and move != self.direction:
            t += self.m.change_direction
            stats.direction_changes += 1
            self.direction = move
        if w1 != w0:
            t += self.m.change_track
            stats.wrap_changes += 1
        read_dir = 1 if w1 % 2 == 0 else -1
        if read_dir != self.direction:
            t += self.m.change_direction
            stats.direction_changes += 1
            self.direction = read_dir
        return t

    def stream(self, x0: int, n: int, stats: Any) -> float:
        """Seconds to read or write ``n`` bytes from tape byte ``x0`` on."""
        if n <= 0:
            return 0.0
        # Wrap boundaries k * wrap_bytes (k >= 1) in [x0, x0 + n): each is a turn.
        first = max(1, math.ceil(x0 / self.wrap_bytes))
        w1 = int((x0 + n - 1) // self.wrap_bytes)
        t = n / self.m.speed
        if w1 >= first:
            t += (w1 - first + 1) * self.m.change_track
            stats.wrap_changes += w1 - first + 1
        self.direction = 1 if w1 % 2 == 0 else -1
        return t


class FileTape(TapeDevice):
    """A tape kept in one file (see the module docstring)."""

    def __init__(self, path: Path, fd: int, meta: dict[str, Any], writable: bool) -> None:
        super().__init__()
        self.path = path
        self.name = f"file:{path}"
        self.fd = fd
        self.meta = meta
        self.capacity: int = int(meta["capacity"])
        self.early_warning_bytes: int = int(meta["early_warning"])
        self._max_block: int = int(meta["max_block"])
        self.model = TapeModel(**meta["model"])
        self.writable = writable
        self._fixed = 0
        self._offs: list[int] = []  # file offset of each object's entry
        self._kinds = bytearray()
        self._tape: list[int] = [0]  # tape bytes before object i (len = objects + 1)
        self._marks: list[int] = []  # object numbers of the filemarks, ascending
        self._end = HEADER_BYTES  # file offset of end of data
        self.pos = 0
        self._warned = False
        self._last_write_wall: float | None = None
        self._drive_level = 0.0  # bytes in the drive's buffer at the last write
        self._motion = _Motion(self.model, self.capacity)
        self._scan()
        self.clock = self.model.load
        self.last_cost = self.model.load

    # -- making and opening ---------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], capacity: int, *,
               model: TapeModel | None = None, early_warning: int | None = None,
               max_block: int = DEFAULT_MAX_BLOCK, force: bool = False) -> None:
        """A blank tape of ``capacity`` bytes at ``path``."""
        p = Path(path)
        if capacity < 64 << 10:
            raise UsageError(f"a tape needs a capacity of at least 64 KiB, not {capacity}")
        if p.exists() and not force:
            raise UsageError(f"{p} exists; a new blank tape needs a new file (or --force "
                             "to erase it)")
        if not p.parent.is_dir():
            raise NotFoundError(f"cannot create tape {p}: {p.parent} does not exist")
        ew = early_warning if early_warning is not None else \
            max(min(capacity // 50, 256 << 20), 2 * max_block)
        ew = min(ew, capacity // 2)
        meta = {"format": "sdbackup-file-tape", "version": 1, "capacity": capacity,
                "early_warning": ew, "max_block": max_block,
                "model": dataclasses.asdict(model or TapeModel())}
        raw = json.dumps(meta).encode()
        head = MAGIC + struct.pack("<I", len(raw)) + raw
        if len(head) > HEADER_BYTES:
            raise UsageError("tape parameters too long")
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, head.ljust(HEADER_BYTES, b"\0"))
            os.fsync(fd)
        finally:
            os.close(fd)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, write: bool = True) -> FileTape:
        p = Path(path)
        try:
            # The write-protect tab: no write bit on the file (root ignores access(2)).
            writable = write and bool(os.stat(p).st_mode & 0o222) and os.access(p, os.W_OK)
            fd = os.open(p, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFoundError(f"no tape at file:{p} ('sdbackup tape create file:{p} "
                                "--capacity SIZE' makes a blank one)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BusyError(f"tape file:{p} is in use by another process (a drive serves "
                            "one process at a time)") from None
        try:
            head = os.pread(fd, HEADER_BYTES, 0)
            if not head.startswith(MAGIC):
                raise UsageError(f"file:{p} is not a file-backed tape ('sdbackup tape "
                                 "create' makes one)")
            (n,) = struct.unpack_from("<I", head, len(MAGIC))
            meta = json.loads(head[len(MAGIC) + 4 : len(MAGIC) + 4 + n])
            return cls(p, fd, meta, writable)
        except (ValueError, KeyError, TypeError, struct.error) as e:
            os.close(fd)
            raise UsageError(f"file:{p} has a damaged tape header ({e})") from None
        except BaseException:
            os.close(fd)
            raise

    def _scan(self) -> None:
        """Find every object (headers only); a torn last entry is end of data."""
        size = os.fstat(self.fd).st_size
        off = HEADER_BYTES
        while off + ENTRY.size <= size:
            magic, kind, n = ENTRY.unpack(os.pread(self.fd, ENTRY.size, off))
            if magic != ENTRY_MAGIC or kind not in (DATA, MARK) or off + ENTRY.size + n > size:
                break
            self._offs.append(off)
            self._kinds.append(kind)
            if kind == MARK:
                self._marks.append(len(self._kinds) - 1)
            self._tape.append(self._tape[-1] + n)
            off += ENTRY.size + n
        self._end = off

    # -- accounting ---------------------------------------------------------------------------

    def _cost(self, t: float) -> None:
        self.last_cost = t
        self.clock += t

    def _move_to(self, obj: int) -> None:
        t = self._motion.locate(self._tape[self.pos], self._tape[obj], self.stats)
        self.stats.locates += 1
        self.stats.locate_seconds += t
        self.pos = obj
        self._warned = False
        self._cost(t)

    @property
    def objects(self) -> int:
        return len(self._kinds)

    @property
    def used_bytes(self) -> int:
        return self._tape[-1]

    def describe(self) -> str:
        return (f"{self.name}: capacity {self.capacity / 1e9:.3g} GB (early warning "
                f"{self.early_warning_bytes >> 20} MiB before the end); {self.model.describe()}")

    # -- the interface --------------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self._fixed

    def set_block_size(self, size: int) -> None:
        if size < 0 or size > self._max_block:
            raise UsageError(f"tape {self.name}: block size {size} is outside 0.."
                             f"{self._max_block}")
        self._fixed = size

    @property
    def max_block(self) -> int:
        return self._max_block

    def rewind(self) -> None:
        self._move_to(0)

    def seek(self, block: int) -> None:
        self.stats.seeks.append(block)
        if not 0 <= block <= self.objects:
            self._move_to(self.objects)
            raise TapeError(f"tape {self.name}: cannot locate block {block}: end of data is "
                            f"at block {self.objects}")
        self._move_to(block)

    def tell(self) -> int:
        return self.pos

    def to_eod(self) -> None:
        self._move_to(self.objects)

    def _read_obj(self, i: int) -> bytes:
        off = self._offs[i]
        nxt = self._offs[i + 1] if i + 1 < self.objects else self._end
        raw = os.pread(self.fd, nxt - off, off)
        magic, _kind, n = ENTRY.unpack_from(raw)
        if magic != ENTRY_MAGIC or len(raw) != ENTRY.size + n:
            raise TapeError(f"tape {self.name}: medium error at block {i}")
        return raw[ENTRY.size :]

    def read(self, size: int) -> bytes:
        if self.pos >= self.objects:
            raise EndOfData(f"tape {self.name}: end of data at block {self.pos}")
        if self._kinds[self.pos] == MARK:
            self.pos += 1
            self._cost(0.0)
            return b""
        start = self.pos
        if self._fixed:
            want = size // self._fixed
            if want < 1:
                raise UsageError(f"tape {self.name}: a read of {size} bytes is less than "
                                 f"one {self._fixed}-byte block")
            parts: list[bytes] = []
            while len(parts) < want and self.pos < self.objects \
                    and self._kinds[self.pos] == DATA:
                parts.append(self._read_obj(self.pos))
                self.pos += 1
            data = b"".join(parts)
        else:
            n = self._tape[self.pos + 1] - self._tape[self.pos]
            if n > size:
                raise TapeError(f"tape {self.name}: the block at {self.pos} has {n} bytes, "
                                f"more than the {size} asked for")
            data = self._read_obj(self.pos)
            self.pos += 1
        self.stats.bytes_read += len(data)
        self.stats.blocks_read += self.pos - start
        self._cost(self._motion.stream(self._tape[start], len(data), self.stats))
        return data

    def _truncate_here(self) -> None:
        if not self.writable:
            raise UsageError(f"tape {self.name} is write-protected (opened read-only)")
        if self.pos < self.objects:
            self._end = self._offs[self.pos]
            del self._offs[self.pos :]
            del self._kinds[self.pos :]
            del self._tape[self.pos + 1 :]
            del self._marks[bisect.bisect_left(self._marks, self.pos) :]
            os.ftruncate(self.fd, self._end)
        elif os.fstat(self.fd).st_size != self._end:
            os.ftruncate(self.fd, self._end)  # a torn entry from a crash

    def _append(self, kind: int, data: bytes | memoryview) -> None:
        n = len(data)
        os.pwrite(self.fd, ENTRY.pack(ENTRY_MAGIC, kind, n) + bytes(data), self._end)
        self._offs.append(self._end)
        self._kinds.append(kind)
        self._tape.append(self._tape[-1] + n)
        if kind == MARK:
            self._marks.append(self.objects - 1)
        self._end += ENTRY.size + n
        self.pos = self.objects

    def write(self, data: bytes | memoryview) -> None:
        n = len(data)
        if n == 0:
            raise UsageError(f"tape {self.name}: a block cannot be empty")
        if self._fixed and n % self._fixed:
            raise UsageError(f"tape {self.name}: {n} bytes are not whole "
                             f"{self._fixed}-byte blocks")
        step = self._fixed or n
        if step > self._max_block:
            raise UsageError(f"tape {self.name}: a block of {step} bytes is larger than "
                             f"the drive's {self._max_block}")
        if not self.writable:
            raise UsageError(f"tape {self.name} is write-protected (opened read-only)")
        here = self._tape[self.pos]
        if here >= self.capacity - self.early_warning_bytes and not self._warned:
            self._warned = True
            raise EarlyWarning(f"tape {self.name} is nearly full (early warning at block "
                               f"{self.pos})")
        if here + n > self.capacity:
            raise EndOfTape(f"tape {self.name} is full (physical end at block {self.pos})")
        self._truncate_here()
        t = 0.0
        now = time.monotonic()
        if self._last_write_wall is not None:
            drained = (now - self._last_write_wall) * self.model.speed
            if drained > self._drive_level:  # the buffer ran dry: the tape stopped
                t += 2 * self.model.change_direction
                self.stats.backhitches += 1
                self._drive_level = 0.0
            else:
                self._drive_level -= drained
        self._drive_level = min(self._drive_level + n, float(self.model.drive_buffer))
        self._last_write_wall = now
        try:
            mv = memoryview(data)
            for i in range(0, n, step):
                self._append(DATA, mv[i : i + step])
        except OSError as e:
            raise self._os_error(e) from None
        self.stats.bytes_written += n
        self.stats.blocks_written += n // step
        self._cost(t + self._motion.stream(here, n, self.stats))

    def write_filemarks(self, count: int = 1) -> None:
        self._truncate_here()
        try:
            for _ in range(count):
                self._append(MARK, b"")
            os.fdatasync(self.fd)
        except OSError as e:
            raise self._os_error(e) from None
        self._cost(0.0)

    def _os_error(self, e: OSError) -> Exception:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return EndOfTape(f"tape {self.name}: the file system holding the tape is full")
        return TapeError(f"tape {self.name}: write error at block {self.pos}: {e.strerror}")

    def space_files(self, count: int) -> None:
        if count > 0:
            i = bisect.bisect_left(self._marks, self.pos) + count - 1
            if i >= len(self._marks):
                self._move_to(self.objects)
                raise EndOfData(f"tape {self.name}: end of data before {count} filemark(s)")
            self._move_to(self._marks[i] + 1)
        elif count < 0:
            i = bisect.bisect_left(self._marks, self.pos) + count
            if i < 0:
                self._move_to(0)
                raise TapeError(f"tape {self.name}: beginning of tape before {-count} "
                                "filemark(s)")
            self._move_to(self._marks[i])

    def space_blocks(self, count: int) -> None:
        target = self.pos + count
        lo, hi = sorted((self.pos, target))
        j = bisect.bisect_left(self._marks, lo)
        if j < len(self._marks) and self._marks[j] < hi:
            raise TapeError(f"tape {self.name}: a filemark at block {self._marks[j]} stops "
                            f"spacing {count} blocks from {self.pos}")
        if not 0 <= target <= self.objects:
            raise EndOfData(f"tape {self.name}: cannot space {count} blocks from {self.pos}")
        self._move_to(target)

    def status(self) -> TapeStatus:
        f = bisect.bisect_left(self._marks, self.pos)
        last = self._marks[f - 1] + 1 if f else 0
        here = self._tape[self.pos]
        return TapeStatus(
            file_number=f, block_number=self.pos - last, block=self.pos,
            block_size=self._fixed, bot=self.pos == 0, eod=self.pos == self.objects,
            early_warning=here >= self.capacity - self.early_warning_bytes,
            write_protected=not self.writable)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
