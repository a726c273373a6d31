"""The disk buffer a tape is read through (seed c.3, Fig. 32-33).

A read asks for tape blocks ``first .. first+count-1`` of a tape (the catalog turned a
disk block into a stream offset and that into tape blocks: Fig. 33's #x → #y). Blocks
in the buffer are served from it (#z); the others are loaded from the tape, with
``readahead`` more blocks of the same tape file after them, into free slots of the
buffer, evicting the least recently used blocks when it is full. What is guaranteed:

* **Misses are batched and sorted by tape position.** Each drive has one loader
  thread; the misses that arrive while it is busy (from the file system's worker
  threads, a restore's read-ahead threads) are taken together and served in one
  sweep from the head's position onwards, then from the lowest position left (so a
  batch costs at most one locate back).
* **Bounded**: at most ``limit`` bytes of slots (``slots.dat``); a loaded block is
  handed to the waiting reader directly, so a request larger than the buffer works.
* **Survives remounts**: which block is in which slot, with its XXH3-64, is kept in
  ``buffer.db`` (SQLite); the slot's data is written before its row commits, and every
  hit is checked against the digest, so a slot torn by a crash reads as a miss, never
  as wrong data. The LRU order is saved on close.
* Wrong data never comes from here: what the records say is checked again above
  (record checksums), and a tape that fails is one error naming tape and block.
"""

from __future__ import annotations

import collections
import fcntl
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import xxhash

from sdbackup.errors import BusyError, CorruptError, SdbError, UsageError
from sdbackup.media.tape.device import TapeDevice, TapeError
from sdbackup.media.tape.format import Piece

DEFAULT_LIMIT = 1 << 30
DEFAULT_READAHEAD = 32  # blocks: 8 MiB of 256 KiB blocks


class Drives(Protocol):
    """Where the buffer finds a tape by id."""

    def device_for(self, tape: str) -> TapeDevice: ...


class TapeBlocks(Protocol):
    """Tape blocks by position: what a generation on tape is read through. The
    :class:`TapeBuffer` on the host with the drives; a tape server's buffer over the
    network on a host without one (c.4, ``sdbackup.net.tape``)."""

    @property
    def slot_size(self) -> int:
        """The tape block size."""
        ...

    def get(self, tape: str, first: int, count: int, end: int) -> bytes:
        """Tape blocks ``first .. first+count-1`` of ``tape`` (``end``: the first block
        past the tape file, which read-ahead stops before)."""
        ...

    def check_tape(self, tape: str) -> None:
        """Raise NotFoundError, naming the tape, if ``tape`` cannot be read now."""
        ...


@dataclass
class BufferStats:
    hits: int = 0  # requests served from the buffer alone
    misses: int = 0  # requests that waited for the tape
    blocks_loaded: int = 0
    batches: int = 0
    largest_batch: int = 0
    evictions: int = 0
    bad_slots: int = 0  # slots whose digest did not match (reloaded)
    order: list[tuple[str, int]] = field(default_factory=list)  # (tape, block) loads


@dataclass
class _Request:
    tape: str
    first: int
    count: int
    end: int  # first block not to read ahead into (the tape file's end)
    done: threading.Event = field(default_factory=threading.Event)
    data: bytes = b""
    error: BaseException | None = None


class _Loader:
    def __init__(self, buf: TapeBuffer, dev: TapeDevice) -> None:
        self.buf = buf
        self.dev = dev
        self.queue: list[_Request] = []
        self.cond = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self.run, name=f"sdb-tape-load-{dev.name}",
                                       daemon=True)
        self.thread.start()

    def submit(self, req: _Request) -> None:
        with self.cond:
            self.queue.append(req)
            self.cond.notify()

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if self.closing and not self.queue:
                    return
            if self.buf.gather:
                time.sleep(self.buf.gather)
            self.buf._hold.wait()
            with self.cond:
                batch, self.queue = self.queue, []
            self.buf._batch(self.dev, batch)

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join()


class TapeBuffer:
    """Tape blocks cached in a directory (see the module docstring). Thread-safe."""

    def __init__(self, path: str | os.PathLike[str], drives: Drives, *, slot_size: int,
                 limit: int = DEFAULT_LIMIT, readahead: int = DEFAULT_READAHEAD,
                 gather: float = 0.002) -> None:
        self.dir = Path(path)
        self.drives = drives
        self.slot_size = slot_size
        self.readahead = max(0, readahead)
        self.gather = gather
        self.nslots = limit // slot_size
        if self.nslots < 4:
            raise UsageError(f"a tape buffer of {limit} bytes holds fewer than 4 tape blocks "
                             f"of {slot_size} bytes; give --buffer-size of at least "
                             f"{4 * slot_size}")
        self.stats = BufferStats()
        self._hold = threading.Event()
        self._hold.set()
        self._lock = threading.RLock()
        self._loaders: dict[str, _Loader] = {}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create tape buffer {self.dir}: {e.strerror}") from None
        self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise BusyError(f"tape buffer {self.dir} is in use by another process (a mount "
                            "or 'sdbackup tape serve'); give another --buffer") from None
        self._fd = os.open(self.dir / "slots.dat", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                           0o644)
        self._db = sqlite3.connect(self.dir / "buffer.db", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)")
        self._db.execute("CREATE TABLE IF NOT EXISTS blocks (tape TEXT, block INTEGER, "
                         "slot INTEGER UNIQUE, digest INTEGER, used INTEGER, "
                         "PRIMARY KEY (tape, block))")
        row = self._db.execute("SELECT value FROM meta WHERE key='slot_size'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('slot_size', ?)", (slot_size,))
        elif int(row[0]) != slot_size:
            self.close()
            raise UsageError(f"tape buffer {self.dir} holds blocks of {row[0]} bytes, the "
                             f"tape's are {slot_size}: give another --buffer")
        # (tape, block) -> (slot, digest), least recently used first
        self._map: collections.OrderedDict[tuple[str, int], tuple[int, int]] = \
            collections.OrderedDict()
        used: set[int] = set()
        drop: list[tuple[str, int]] = []
        for tape, block, slot, digest in self._db.execute(
                "SELECT tape, block, slot, digest FROM blocks ORDER BY used"):
            if slot >= self.nslots:
                drop.append((tape, block))  # the buffer was made smaller
                continue
            self._map[(tape, block)] = (int(slot), int(digest) & (2**64 - 1))
            used.add(int(slot))
        while len(self._map) > self.nslots:
            drop.append(self._map.popitem(last=False)[0])
        if drop:
            self._db.executemany("DELETE FROM blocks WHERE tape=? AND block=?", drop)
        self._free = [s for s in range(self.nslots - 1, -1, -1) if s not in used]
        self._rows: dict[tuple[str, int], tuple[int, int]] = {}  # to insert at commit
        self._gone: list[tuple[str, int]] = []  # to delete at commit
        self._clock = int(self._db.execute("SELECT COALESCE(MAX(used), 0) FROM blocks"
                                           ).fetchone()[0])
        os.ftruncate(self._fd, self.nslots * slot_size) if \
            os.fstat(self._fd).st_size > self.nslots * slot_size else None

    # -- reading --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._map)

    def check_tape(self, tape: str) -> None:
        self.drives.device_for(tape)

    def cached(self, tape: str, block: int) -> bool:
        with self._lock:
            return (tape, block) in self._map

    def get(self, tape: str, first: int, count: int, end: int) -> bytes:
        """Tape blocks ``first .. first+count-1`` of ``tape`` (``end``: the first block
        past the tape file, which read-ahead stops before)."""
        with self._lock:
            got = self._from_slots(tape, first, count)
            if got is not None:
                self.stats.hits += 1
                return got
            self.stats.misses += 1
            dev = self.drives.device_for(tape)
            loader = self._loaders.get(dev.name)
            if loader is None:
                loader = self._loaders[dev.name] = _Loader(self, dev)
        req = _Request(tape, first, count, end)
        loader.submit(req)
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req.data

    def _from_slots(self, tape: str, first: int, count: int) -> bytes | None:
        keys = [(tape, b) for b in range(first, first + count)]
        if not all(k in self._map for k in keys):
            return None
        parts = []
        for k in keys:
            slot, digest = self._map[k]
            data = os.pread(self._fd, self.slot_size, slot * self.slot_size)
            if len(data) != self.slot_size or xxhash.xxh3_64_intdigest(data) != digest:
                self.stats.bad_slots += 1
                self._drop(k)
                return None
            parts.append(data)
        for k in keys:
            self._map.move_to_end(k)
        return b"".join(parts)

    def _drop(self, key: tuple[str, int]) -> None:
        slot, _ = self._map.pop(key)
        self._free.append(slot)
        self._rows.pop(key, None)
        self._gone.append(key)

    def _store(self, tape: str, block: int, data: bytes) -> None:
        key = (tape, block)
        if key in self._map:
            self._map.move_to_end(key)
            return
        if self._free:
            slot = self._free.pop()
        else:
            old, (slot, _) = self._map.popitem(last=False)
            self._rows.pop(old, None)
            self._gone.append(old)
            self.stats.evictions += 1
        os.pwrite(self._fd, data, slot * self.slot_size)
        digest = xxhash.xxh3_64_intdigest(data)
        self._map[key] = (slot, digest)
        self._rows[key] = (slot, digest)

    # -- loading (the loader threads) -----------------------------------------------------------

    @contextmanager
    def held(self) -> Iterator[None]:
        """Loaders take no batch while held (tests: let misses pile up)."""
        self._hold.clear()
        try:
            yield
        finally:
            self._hold.set()

    def _batch(self, dev: TapeDevice, batch: list[_Request]) -> None:
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        try:
            here = dev.tell()
        except SdbError:
            here = 0
        ahead = sorted((r for r in batch if r.first >= here), key=lambda r: r.first)
        behind = sorted((r for r in batch if r.first < here), key=lambda r: r.first)
        for req in ahead + behind:
            try:
                req.data = self._load(dev, req)
            except BaseException as e:  # the reader must hear of it, whatever it is
                req.error = e
            req.done.set()
        self._commit()

    def _load(self, dev: TapeDevice, req: _Request) -> bytes:
        with self._lock:
            got = self._from_slots(req.tape, req.first, req.count)
            if got is not None:
                return got  # loaded by an earlier request of this batch
            # Blocks at the front that are here already (a record that straddles the
            # end of the last read-ahead) are not read again: no locate back.
            out: list[bytes] = []
            start = req.first
            while start < req.first + req.count:
                got = self._from_slots(req.tape, start, 1)
                if got is None:
                    break
                out.append(got)
                start += 1
        stop = min(req.end, req.first + req.count + self.readahead)
        stop = max(stop, req.first + req.count)
        if dev.tell() != start:
            dev.seek(start)
        for b in range(start, stop):
            try:
                data = dev.read(dev.max_block)
            except TapeError as e:
                if b >= req.first + req.count:
                    break  # read-ahead only
                raise TapeError(f"tape {req.tape} in {dev.name}: cannot read block {b}: "
                                f"{e.message}") from None
            if len(data) != self.slot_size:
                if b >= req.first + req.count:
                    break
                what = "a filemark" if not data else f"a block of {len(data)} bytes"
                raise CorruptError(f"tape {req.tape} in {dev.name}: {what} at block {b}, "
                                   f"where the catalog expects a {self.slot_size}-byte "
                                   "block of a generation (wrong tape in the drive, or a "
                                   "stale catalog: 'sdbackup tape catalog --rebuild')")
            with self._lock:
                self._store(req.tape, b, data)
                self.stats.blocks_loaded += 1
                self.stats.order.append((req.tape, b))
            if b < req.first + req.count:
                out.append(data)
        return b"".join(out)

    def _commit(self) -> None:
        with self._lock:
            rows = [(t, b, s, d - (1 << 64) if d >= 1 << 63 else d, self._tick())
                    for (t, b), (s, d) in self._rows.items()]
            gone = self._gone
            self._rows, self._gone = {}, []
        try:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM blocks WHERE tape=? AND block=?", gone)
            self._db.executemany("DELETE FROM blocks WHERE slot=?", [(r[2],) for r in rows])
            self._db.executemany("INSERT OR REPLACE INTO blocks VALUES (?, ?, ?, ?, ?)", rows)
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            self._db.execute("ROLLBACK") if self._db.in_transaction else None
            raise UsageError(f"tape buffer {self.dir}: cannot record what it holds: {e}"
                             ) from None

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def close(self) -> None:
        """Stop the loaders; save which blocks are held, in LRU order."""
        for loader in list(self._loaders.values()):
            loader.close()
        self._loaders.clear()
        if self._fd < 0:
            return
        try:
            self._commit()
            with self._lock:
                order = [(i, t, b) for i, (t, b) in enumerate(self._map)]
            self._db.execute("BEGIN")
            self._db.executemany("UPDATE blocks SET used=? WHERE tape=? AND block=?", order)
            self._db.execute("COMMIT")
        except sqlite3.Error:
            pass
        finally:
            self._db.close()
            os.close(self._fd)
            os.close(self._lock_fd)
            self._fd = -1

    def __enter__(self) -> TapeBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TapeStreamSource:
    """One part of a generation (a record stream) on tape, read through the buffer as
    positional reads: what :class:`~sdbackup.media.record_reader.RecordReader` needs."""

    def __init__(self, buffer: TapeBlocks, pieces: Sequence[Piece], size: int,
                 block_size: int, name: str) -> None:
        self.buffer = buffer
        self.pieces = sorted(pieces, key=lambda p: p.offset)
        self.size = size
        self.bs = block_size
        self.name = name

    def piece_at(self, offset: int) -> Piece | None:
        for p in self.pieces:
            if p.offset <= offset < p.offset + p.length:
                return p
        return None

    def position(self, offset: int) -> str:
        """Where stream offset ``offset`` lies on tape, for error messages."""
        p = self.piece_at(offset)
        if p is None:
            return f"offset {offset} is on no tape"
        return (f"tape {p.tape} (#{p.sequence}), file {p.file}, block "
                f"{p.block + (offset - p.offset) // self.bs}")

    def pread(self, n: int, offset: int) -> bytes:
        end = min(offset + n, self.size)
        out: list[bytes] = []
        o = offset
        while o < end:
            p = self.piece_at(o)
            if p is None:
                raise CorruptError(f"{self.name}: offset {o} lies on no tape of the set "
                                   "(the catalog is damaged: 'sdbackup tape catalog "
                                   "--rebuild')")
            stop = min(end, p.offset + p.length)
            b0 = (o - p.offset) // self.bs
            b1 = (stop - 1 - p.offset) // self.bs
            data = self.buffer.get(p.tape, p.block + b0, b1 - b0 + 1,
                                   p.block + math.ceil(p.length / self.bs))
            skip = o - p.offset - b0 * self.bs
            out.append(data[skip : skip + stop - o])
            o = stop
        return out[0] if len(out) == 1 else b"".join(out)

    def close(self) -> None:
        pass
