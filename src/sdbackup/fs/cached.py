"""A node's coherent write-back cache (seed a.1), under the same file system API.

:class:`CachedFileSystem` is :class:`~sdbackup.fs.filesystem.FileSystem` with file data
kept in a per-node cache of *segments* (``SEGMENT_BYTES`` of one file). A node caches a
segment only while it holds a right on it from the coordinator (``r`` to read, ``w`` to
dirty it), see :mod:`sdbackup.cluster.rights`. Dirty data is written back on fsync, on
close (release), when the cache is over its limit, after ``flush_delay`` seconds, and
when the coordinator asks (recall, flush, freeze).

Guarantees:

- a write is acknowledged only while the node holds ``w`` on every segment it touches,
  so no other node caches those segments at that moment;
- a recall writes the segment's dirty blocks back (ordered: data, then commit) before
  the node answers, so the next holder reads the latest acknowledged data from disk;
- a write-back that fails keeps the data dirty (and logs why) instead of dropping it;
- data before metadata (ext4's data=ordered, across power loss too): the blocks of a
  write-back are on stable storage (``fdatasync``, one per batch of segments, shared
  by concurrent write-backs) before the ``commit_write`` that makes them reachable is
  sent, so no commit can reach the disk before the data it points at;
- the lease is checked right before every write to a shared disk: a node that may
  have been fenced never writes;
- bytes past the end of a file are never trusted: a write past the end (or an
  append) zeroes the old last block's tail in the cache first, and the new size is
  published under the segment locks, before any write-back can see the data.

Developer notes (steps that must stay adjacent):

- Never wait for the coordinator while holding a segment lock, except for the
  write-back RPCs (map_write/commit_write), which never wait for a recall.
- ``Seg.recalls`` is read before an acquire and compared after it under the segment
  lock: a recall that overtook the grant's reply means the right is already gone.
- Lock order: the inode's write lock (``self._locks``), then segment locks in
  (inode, segment) order, then ``self._mu``; never the other way round.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import signal
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from sdbackup.blocks.source import BlockStore, read_blocks
from sdbackup.errors import FsError, NoSpaceError, RemoteError, SdbError
from sdbackup.fs.filesystem import FileSystem, _gid, _uid
from sdbackup.fs.segments import SEGMENT_BYTES
from sdbackup.meta.api import MetaApi
from sdbackup.meta.types import Attr, Extent, WriteRun
from sdbackup.types import DiskId

log = logging.getLogger("sdbackup.cache")


class WriteBackError(FsError):
    """Some files could not be written back (their data stays dirty); ``failed`` maps
    each inode to its error. Its errno is the first file's."""

    def __init__(self, failed: dict[int, OSError]) -> None:
        first = next(iter(failed.values()))
        what = "; ".join(f"inode {ino}: {e.strerror or e}" for ino, e in failed.items())
        super().__init__(first.errno or errno.EIO, f"write-back failed: {what}")
        self.failed = failed


BiItem = tuple[DiskId, int, bytes, int]  # disk, start block, old blocks, logical time


class BiSink(Protocol):
    """Where this node's before images go while a backup runs (see backup/bilog.py)."""

    def log(self, items: list[BiItem]) -> None:
        """Store (disk, start block, old blocks, logical time) items; durable on return."""


class RightsApi(Protocol):
    """The coordinator's coherence calls, as seen by one node."""

    def acquire(self, ino: int, segs: list[int], mode: str) -> int: ...
    def acquire_mapped(self, ino: int, segs: list[int], mode: str
                       ) -> tuple[int, dict[int, list[Extent]]]: ...
    def release(self, ino: int, segs: list[int]) -> None: ...
    def set_dirty(self, ino: int, segs: list[int], dirty: bool) -> None: ...


@dataclass(eq=False)
class Seg:
    ino: int
    seg: int
    mode: str | None = None  # None: not held (yet)
    seq: int = 0
    buf: memoryview | None = None  # SEGMENT_BYTES of page-aligned memory (O_DIRECT)
    valid: int = 0  # bit i: block i of the segment is in buf
    dirty: int = 0  # bit i: block i differs from disk
    dirty_since: float = 0.0
    recalls: int = 0
    dropped: bool = False
    # The segment's block map (one map_read for the whole segment), valid while it is
    # held: another node changes it only under a write right, which recalls this one.
    extents: list[Extent] | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)


CRASH_ENV = "SDBACKUP_TEST_NODE_CRASH_AT"
STOP_ENV = "SDBACKUP_TEST_NODE_STOP_AT"
READ_AHEAD_MIN = 64 << 10
READ_AHEAD_SEGMENTS = 4
FLUSH_BATCH = 64  # segments written back per disk flush (64 MiB)
_stopped_once: set[str] = set()


def _crash_point(name: str) -> None:
    """Test hooks at named points of a write-back: die here, as kill -9 would
    (``SDBACKUP_TEST_NODE_CRASH_AT``), or stop here once, as SIGSTOP would
    (``SDBACKUP_TEST_NODE_STOP_AT``; the test sends SIGCONT). Points: after-bi-log
    (the before image is durable, the overwrite has not happened), after-bi-write
    (the overwrite is on disk, not committed), mapped (map_write answered, nothing
    written yet), before-commit (every run of the batch is written and flushed to the
    disks, no ``commit_write`` sent yet: an overwrite in place is on disk, new blocks
    are written but still free)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(STOP_ENV) == name and name not in _stopped_once:
        _stopped_once.add(name)
        # To this very thread: a signal sent to the process may be taken by another
        # thread while this one goes on for a moment.
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)


def _runs(mask: int) -> list[tuple[int, int]]:
    """Runs (start, count) of set bits of an int bitmask, lowest first."""
    out = []
    pos = 0
    while mask:
        tz = (mask & -mask).bit_length() - 1
        mask >>= tz
        pos += tz
        ones = (~mask & (mask + 1)).bit_length() - 1
        out.append((pos, ones))
        mask >>= ones
        pos += ones
    return out


_ZERO_SEGMENT = bytes(SEGMENT_BYTES)


def _mask(lo: int, hi: int) -> int:
    """Bits lo..hi-1 set."""
    return ((1 << (hi - lo)) - 1) << lo if hi > lo else 0


class CachedFileSystem(FileSystem):
    """File system operations of a node with a coherent write-back cache."""

    def __init__(self, meta: MetaApi, blocks: BlockStore, rights: RightsApi, *,
                 cache_bytes: int = 64 << 20, flush_delay: float = 5.0) -> None:
        super().__init__(meta, blocks)
        self.rights = rights
        self.cache_bytes = max(cache_bytes, 4 * SEGMENT_BYTES)
        self.flush_delay = flush_delay
        self.bps = SEGMENT_BYTES // self.bs  # blocks per segment
        self._mu = threading.Lock()
        self._segs: OrderedDict[tuple[int, int], Seg] = OrderedDict()
        self._sizes: dict[int, int] = {}  # file sizes as this node's writes left them
        self._pool: list[memoryview] = []  # segment buffers to reuse (aligned, zeroed)
        # A lower bound of a file's size, learnt while this node held rights on it and
        # forgotten at the first drop of any of its segments: a size shrinks only by a
        # truncate, which recalls every right first. Reads below it skip the getattr.
        self._floor: dict[int, int] = {}
        self._drops = 0
        self.log_write_back_errors = True
        # Write-back errors per file (errseq): inode -> (sequence, errno, message).
        self._errors: dict[int, tuple[int, int, str]] = {}
        self._err_seq = 0
        # Sequential reads: the next segment is read from the disk in the background
        # while the current one is handed out (direct I/O has no kernel readahead).
        self._prefetcher = ThreadPoolExecutor(max_workers=2,
                                              thread_name_prefix="sdb-prefetch")
        self._cached = 0
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self.stats = {"writebacks": 0, "acquires": 0, "recalls": 0}
        # Self-fencing: the node agent says False when its lease may have run out, and
        # numbers its sessions: a write-back mapped in one session never writes in
        # another (the first one's rights may have gone to others meanwhile).
        self.can_write: Callable[[], bool] = lambda: True
        self.session_of: Callable[[], int] = lambda: 0
        # Called (ino) whenever this node stops caching a segment (recall, eviction,
        # truncate, reconnect). A FUSE mount uses it to drop the kernel's pages of the
        # file, which are only valid while this node holds a right on them. Called
        # under the segment lock, from any thread: it must only queue, never block.
        self.on_drop: Callable[[int], None] | None = None
        # Set by the node agent while a backup runs (the write-ahead rule, issue 6).
        self.bi_sink: BiSink | None = None

    # -- life cycle ----------------------------------------------------------------------
    def start_flusher(self) -> None:
        self._flusher = threading.Thread(target=self._flush_loop, name="sdb-flusher",
                                         daemon=True)
        self._flusher.start()

    def close(self) -> None:
        self._stop.set()
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
        if self._flusher:
            self._flusher.join(timeout=10)
        self.flush_all()

    def _flush_loop(self) -> None:
        while not self._stop.wait(min(0.5, self.flush_delay / 2 or 0.5)):
            now = time.monotonic()
            due = [s for s in self._snapshot()
                   if s.dirty and now - s.dirty_since >= self.flush_delay]
            try:
                self._flush(due)
            except WriteBackError:
                pass  # recorded and logged per file; tried again at the next round
            except Exception as e:  # lost session: the reconnect decides
                log.error("delayed write-back failed: %s", e)

    # -- segment table -------------------------------------------------------------------
    def _snapshot(self, ino: int | None = None) -> list[Seg]:
        with self._mu:
            return [s for s in self._segs.values() if ino is None or s.ino == ino]

    def _get(self, ino: int, seg: int) -> Seg:
        with self._mu:
            key = (ino, seg)
            s = self._segs.get(key)
            if s is None:
                s = Seg(ino, seg)
                self._segs[key] = s
            else:
                self._segs.move_to_end(key)
            return s

    def _drop(self, s: Seg) -> None:
        """Forget a segment (caller holds s.lock and has written it back)."""
        s.dropped = True
        s.mode = None
        s.extents = None
        with self._mu:
            self._floor.pop(s.ino, None)
            self._drops += 1
            if self._segs.get((s.ino, s.seg)) is s:
                del self._segs[(s.ino, s.seg)]
            if s.buf is not None:
                self._cached -= len(s.buf)
                if len(self._pool) * SEGMENT_BYTES < self.cache_bytes:
                    self._pool.append(s.buf)
            s.buf = None
            s.valid = 0
            if not any(x.ino == s.ino and x.mode == "w" for x in self._segs.values()):
                self._sizes.pop(s.ino, None)
        if self.on_drop is not None:
            self.on_drop(s.ino)

    def _hold(self, ino: int, segs: list[int], mode: str) -> list[Seg]:
        """Make sure this node holds ``mode`` on all segments; returns them (unlocked).

        Read rights come with the segments' block maps in the same round trip."""
        while True:
            objs = [self._get(ino, s) for s in segs]
            need = [o for o in objs if o.dropped or o.mode is None
                    or (mode == "w" and o.mode != "w")]
            if not need:
                return objs
            before = {id(o): o.recalls for o in need}
            self.stats["acquires"] += 1
            maps: dict[int, list[Extent]] = {}
            if mode == "r":
                seq, maps = self.rights.acquire_mapped(ino, [o.seg for o in need], mode)
            else:
                seq = self.rights.acquire(ino, [o.seg for o in need], mode)
            for o in need:
                with o.lock:
                    if o.recalls == before[id(o)] and not o.dropped:
                        o.mode = mode if o.mode != "w" else "w"
                        if mode == "w":
                            o.seq = seq
                        if o.seg in maps and not o.dirty:
                            o.extents = maps[o.seg]
            # Loop: a segment recalled meanwhile (or dropped) is acquired again.

    def _segs_of(self, offset: int, length: int) -> list[int]:
        if length <= 0:
            return []
        return list(range(offset // SEGMENT_BYTES, (offset + length - 1) // SEGMENT_BYTES + 1))

    # -- data ---------------------------------------------------------------------------
    def getattr(self, ino: int) -> Attr:
        attr = self.meta.getattr(ino)
        local = self._sizes.get(ino)
        if local is not None and local > attr.size:
            attr = replace(attr, size=local)
        return attr

    def lookup(self, parent: int, name: bytes) -> Attr:
        attr = self.meta.lookup(parent, name)
        local = self._sizes.get(attr.ino)
        return replace(attr, size=local) if local is not None and local > attr.size else attr

    def create_open(self, parent: int, name: bytes, mode: int = 0o644,
                    uid: int | None = None, gid: int | None = None) -> Attr:
        """Create and open a file, and take the write right on its first segment in the
        same round trip when the metadata source can (a program's create is usually
        followed by a write). The right is kept only if no recall came meanwhile (the
        coordinator may have moved it already); otherwise the first write asks again."""
        both = getattr(self.meta, "mknod_open_writing", None)
        if both is None:
            return super().create_open(parent, name, mode, uid, gid)
        recalls = self.stats["recalls"]
        attr: Attr
        seq: int | None
        attr, seq = both(parent, name, stat.S_IFREG | (mode & 0o7777),
                         _uid(uid), _gid(gid))
        if seq is not None:
            o = self._get(attr.ino, 0)
            with o.lock:
                if self.stats["recalls"] == recalls and not o.dropped and o.mode is None:
                    o.mode, o.seq = "w", seq
        return attr

    def peek_getattr(self, ino: int) -> Attr | None:
        """``getattr`` answered from cached metadata, or None; never blocks (the FUSE
        adapter calls it in its event loop). Only metadata sources with capabilities
        (net/cached_meta.py) have such a cache."""
        peek = getattr(self.meta, "peek_getattr", None)
        attr: Attr | None = peek(ino) if peek is not None else None
        if attr is None:
            return None
        local = self._sizes.get(ino)
        return replace(attr, size=local) if local is not None and local > attr.size else attr

    def peek_lookup(self, parent: int, name: bytes) -> Attr | None:
        """``lookup`` answered from cached metadata, or None; raises FsError(ENOENT) for
        a name cached as absent; never blocks."""
        peek = getattr(self.meta, "peek_lookup", None)
        attr: Attr | None = peek(parent, name) if peek is not None else None
        if attr is None:
            return None
        local = self._sizes.get(attr.ino)
        return replace(attr, size=local) if local is not None and local > attr.size else attr

    def read(self, ino: int, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise FsError(errno.EINVAL, "negative offset or size")
        if size == 0:
            return b""
        segs = self._segs_of(offset, size)
        if size >= READ_AHEAD_MIN:
            # Sequential reads: take the read rights of the next segments in the same
            # round trip (harmless past the end of the file).
            with self._mu:
                held = all((ino, s) in self._segs for s in segs)
            if not held:
                segs += range(segs[-1] + 1, segs[-1] + 1 + READ_AHEAD_SEGMENTS)
        while True:
            objs = self._hold(ino, segs, "r")
            with self._mu:
                floor = self._floor.get(ino, -1)
                drops = self._drops
            if offset + size <= floor:
                end = offset + size
            else:
                # The size is read after the rights are held: a writer elsewhere has
                # written its data back by then (the coordinator flushes writers).
                attr = self.getattr(ino)
                if attr.is_dir:
                    raise FsError(errno.EISDIR, "is a directory")
                end = min(attr.size, offset + size)
                with self._mu:
                    if self._drops == drops and attr.is_reg:
                        self._floor[ino] = max(self._floor.get(ino, 0), attr.size)
            if end <= offset:
                return b""
            data = self._copy_all(objs, offset, end)
            if data is not None:
                if size >= READ_AHEAD_MIN:
                    self._prefetch(ino, (end - 1) // SEGMENT_BYTES + 1)
                self._maybe_evict()  # reads fill the cache too
                return data

    def _copy_all(self, objs: list[Seg], offset: int, end: int) -> bytes | None:
        """Bytes [offset, end) from the segments (filled from disk as needed); None
        when one of them was recalled meanwhile (the caller acquires again)."""
        first = offset // SEGMENT_BYTES
        if (end - 1) // SEGMENT_BYTES == first:  # one segment: one copy, not two
            o = next(x for x in objs if x.seg == first)
            with o.lock:
                if o.dropped or o.mode is None:
                    return None
                base = first * SEGMENT_BYTES
                self._fill(o, (offset - base) // self.bs, (end - base + self.bs - 1) // self.bs)
                assert o.buf is not None
                return bytes(o.buf[offset - base : end - base])
        out = bytearray(end - offset)
        for o in objs:
            with o.lock:
                if o.dropped or o.mode is None:
                    return None
                self._copy_out(o, offset, end, out)
        return bytes(out)

    def _prefetch(self, ino: int, seg: int) -> None:
        """Fill a segment this node already holds, in the background (sequential reads)."""
        with self._mu:
            o = self._segs.get((ino, seg))
        if o is None or o.mode is None or o.dropped or o.valid == _mask(0, self.bps):
            return
        try:
            self._prefetcher.submit(self._prefetch_one, o)
        except RuntimeError:  # shut down
            pass

    def _prefetch_one(self, o: Seg) -> None:
        if not o.lock.acquire(blocking=False):
            return  # a reader is at it already
        try:
            if not o.dropped and o.mode is not None:
                self._fill(o, 0, self.bps)
        except Exception as e:  # the reader that needs it will meet the error itself
            log.debug("prefetch of inode %d segment %d failed: %s", o.ino, o.seg, e)
        finally:
            o.lock.release()

    def _copy_out(self, o: Seg, offset: int, end: int, out: bytearray) -> None:
        base = o.seg * SEGMENT_BYTES
        lo = max(offset, base)
        hi = min(end, base + SEGMENT_BYTES)
        if lo >= hi:
            return
        self._fill(o, (lo - base) // self.bs, (hi - base + self.bs - 1) // self.bs)
        assert o.buf is not None
        out[lo - offset : hi - offset] = o.buf[lo - base : hi - base]

    def _ensure_buf(self, o: Seg) -> memoryview:
        """The segment's buffer: page-aligned, so disk I/O goes to it directly with
        O_DIRECT; reused from dropped segments (zeroed: invalid blocks read as zeros)."""
        if o.buf is None:
            with self._mu:
                buf = self._pool.pop() if self._pool else None
                self._cached += SEGMENT_BYTES
            if buf is None:
                buf = memoryview(mmap.mmap(-1, SEGMENT_BYTES))
            else:
                buf[:] = _ZERO_SEGMENT
            o.buf = buf
        return o.buf

    def _fill(self, o: Seg, b0: int, b1: int) -> None:
        """Make blocks [b0, b1) of the segment valid, reading from disk what is missing."""
        want = _mask(b0, b1) & ~o.valid
        if not want:
            return
        mv = self._ensure_buf(o)
        fb0 = o.seg * self.bps
        if o.extents is None:
            o.extents = self.meta.map_read(o.ino, fb0, self.bps)
        for start, count in _runs(want):
            lo_b, hi_b = fb0 + start, fb0 + start + count
            for ext in o.extents:
                a, b = max(ext.fblock, lo_b), min(ext.fblock + ext.length, hi_b)
                if a >= b:
                    continue
                lo = (a - fb0) * self.bs
                self.blocks.readinto(ext.disk, ext.dblock + (a - ext.fblock),
                                     mv[lo : lo + (b - a) * self.bs])
        # Holes read as zeros: a block that is not valid was never written into buf
        # (valid bits are only cleared together with the whole buffer).
        o.valid |= want

    def write(self, ino: int, offset: int, data: bytes | bytearray | memoryview) -> int:
        if offset < 0:
            raise FsError(errno.EINVAL, "negative offset")
        src = memoryview(data).cast("B")
        if src.nbytes == 0:
            return 0
        self._write_at(ino, src, offset)
        return src.nbytes

    def append(self, ino: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at the end of the file (O_APPEND); returns where it went.

        The end is decided while this node holds the write right on every segment the
        data covers, starting with the one holding the end: another node that appends
        meanwhile must take that right away first, which the segment's recall counter
        (or its mode) shows under the segment lock, and then this node tries again.
        Writes of other nodes past the end, in segments not held here, may land
        between the check and the copy: they order after this append, as if it had
        happened first. Appends of one node to one file are serialised locally.
        """
        src = memoryview(data).cast("B")
        if src.nbytes == 0:
            return self.getattr(ino).size
        return self._write_at(ino, src, None)

    def _write_at(self, ino: int, src: memoryview, offset: int | None) -> int:
        """Write at ``offset`` (None: at the end); returns the offset used.

        A write that starts past the end grows the file: the bytes between the old end
        and the end of its block are made zero in the cache (disk bytes past the end
        are never trusted), so the old last block's segment is held too. The size that
        decides this must not move while the rights are held: it is read again after
        the grant (other writers of these segments were recalled, and ``getattr``
        makes writers elsewhere write back) and the segments' recall counters are
        checked under their locks. The new size is published under those locks, so a
        write-back never sees the data without it.
        """
        n = src.nbytes
        bs = self.bs
        with self._locks[ino % 64]:
            while True:
                attr = self.getattr(ino)
                if not attr.is_reg:
                    raise FsError(errno.EISDIR if attr.is_dir else errno.EINVAL,
                                  "not a regular file")
                size = attr.size
                start = size if offset is None else offset
                grow = start > size and size % bs != 0
                segs = self._segs_of(start, n)
                if grow and size // SEGMENT_BYTES not in segs:
                    segs.insert(0, size // SEGMENT_BYTES)
                objs = self._hold(ino, segs, "w")
                marks = [o.recalls for o in objs]
                if (offset is None or grow) and self.getattr(ino).size != size:
                    continue
                with ExitStack() as held:
                    for o in objs:
                        held.enter_context(o.lock)
                    if any(o.dropped or o.mode != "w" or o.recalls != m
                           for o, m in zip(objs, marks, strict=True)):
                        continue  # a recall came in between: look again
                    for o in objs:
                        self._apply(o, start, src, size if grow else None, size)
                    with self._mu:
                        self._sizes[ino] = max(self._sizes.get(ino, size), start + n)
                break
        self._maybe_evict()
        return start

    def _apply(self, o: Seg, offset: int, src: memoryview, grow_from: int | None,
               old_size: int | None = None) -> None:
        """Copy the part of a write that falls in this segment into its buffer (caller
        holds o.lock and the write right); with ``grow_from`` (the old size, when the
        write starts past it), zero the old last block from there first. A partial
        block wholly past ``old_size`` (the size under these rights) is zeros, not read
        from the disk: no byte of the file was ever there (a new file's first write
        asks the coordinator for nothing)."""
        bs = self.bs
        base = o.seg * SEGMENT_BYTES
        buf = self._ensure_buf(o)
        touched = 0
        if grow_from is not None:
            zlo = max(grow_from, base)
            zhi = min(offset, (grow_from // bs + 1) * bs, base + SEGMENT_BYTES)
            if zlo < zhi:
                b = (zlo - base) // bs
                if not (o.valid >> b) & 1:
                    self._fill(o, b, b + 1)
                buf[zlo - base : zhi - base] = _ZERO_SEGMENT[: zhi - zlo]
                touched |= _mask(b, b + 1)
        lo = max(offset, base)
        hi = min(offset + src.nbytes, base + SEGMENT_BYTES)
        if lo < hi:
            b0, b1 = (lo - base) // bs, (hi - base + bs - 1) // bs
            # Partial edge blocks must hold their old bytes around the new data.
            for b in {b0, b1 - 1}:
                edge_partial = (b == b0 and lo % bs) or (b == b1 - 1 and hi % bs)
                if edge_partial and not (o.valid >> b) & 1:
                    if old_size is not None and base + b * bs >= old_size:
                        buf[b * bs : (b + 1) * bs] = _ZERO_SEGMENT[:bs]
                        o.valid |= _mask(b, b + 1)
                    else:
                        self._fill(o, b, b + 1)
            buf[lo - base : hi - base] = src[lo - offset : hi - offset]
            touched |= _mask(b0, b1)
        if not touched:
            return
        o.valid |= touched
        was_clean = not o.dirty
        o.dirty |= touched
        if was_clean:
            o.dirty_since = time.monotonic()
            self.rights.set_dirty(o.ino, [o.seg], True)

    def _writeback(self, o: Seg) -> None:
        """Write one segment back (caller holds o.lock); see :meth:`_writeback_many`."""
        self._writeback_many([o])

    def _writeback_many(self, segs: list[Seg]) -> None:
        """Write the segments' dirty blocks to disk, then commit them (caller holds
        every segment's lock).

        Ordered as ext4's data=ordered, across power loss: map every dirty run, write
        its data (before images first while a backup runs), one ``fdatasync`` of the
        disks written (a group commit shared with concurrent write-backs), and only
        then the ``commit_write`` calls that make the new blocks reachable. The lease
        is checked before every disk write.

        Errors are per file: a file whose write-back fails (no space for its new
        blocks, a disk error) keeps its data dirty, gives its reserved blocks back, and
        has the error recorded for the programs that have it open
        (:meth:`error_since`); the other files are written and committed. Then
        :class:`WriteBackError` names the files that failed. Losing the session (lease,
        fence, connection) stops the whole batch: nothing more is written.
        """
        pending: list[tuple[Seg, int, int, list[WriteRun]]] = []
        failed: dict[int, OSError] = {}
        bs = self.bs
        session = self.session_of()

        def fail(ino: int, err: OSError) -> None:
            failed.setdefault(ino, err)
            for item in [x for x in pending if x[0].ino == ino]:
                pending.remove(item)
                self._abort_quietly(item[3])

        try:
            for o in segs:
                if not o.dirty or o.buf is None or o.ino in failed:
                    continue
                mv = o.buf
                fb0 = o.seg * self.bps
                for start, count in _runs(o.dirty):
                    try:
                        runs = self.meta.map_write(o.ino, fb0 + start, count)
                    except FsError as e:
                        if e.errno != errno.ENOENT:
                            fail(o.ino, e)
                            break
                        # The file was removed (its last name, and it is not open):
                        # nothing can ever read this data, so it is not written.
                        o.dirty = 0
                        self.rights.set_dirty(o.ino, [o.seg], False)
                        break
                    pending.append((o, start, count, runs))
                    _crash_point("mapped")
                    try:
                        if self._log_before_images(runs):
                            _crash_point("after-bi-log")
                        for r in runs:
                            if not self.can_write() or self.session_of() != session:
                                raise RemoteError(
                                    "not writing back: this node's lease may have expired "
                                    "(cut off from the coordinator, or fenced); the data "
                                    "stays dirty")
                            lo = (r.fblock - fb0) * bs
                            self.blocks.write(r.disk, r.dblock, mv[lo : lo + r.length * bs])
                    except SdbError as e:
                        if isinstance(e, RemoteError):
                            raise
                        fail(o.ino, FsError(errno.ENOSPC if isinstance(e, NoSpaceError)
                                            else errno.EIO, e.message))
                        break
                    except OSError as e:  # the disk refused the write
                        fail(o.ino, e)
                        break
                    if any(r.bi_time for r in runs):
                        _crash_point("after-bi-write")
            if pending:
                try:
                    self.blocks.datasync({r.disk for _, _, _, runs in pending for r in runs})
                except OSError as e:  # nothing written since the last flush is safe
                    for ino in {x[0].ino for x in pending}:
                        fail(ino, e)
                _crash_point("before-commit")
        except BaseException:
            for _, _, _, runs in pending:
                self._abort_quietly(runs)
            raise
        done: set[int] = set()
        for i, (o, start, count, runs) in enumerate(pending):
            if o.ino in failed:
                self._abort_quietly(runs)
                continue
            size = self._sizes.get(o.ino)
            run_end = (o.seg * self.bps + start + count) * bs
            end = run_end if size is None else min(run_end, size)
            try:
                self.meta.commit_write(o.ino, runs, end, time.time_ns())
            except FsError as e:  # commit_write gave this one's blocks back itself
                failed.setdefault(o.ino, e)
                continue
            except BaseException:
                for _, _, _, later in pending[i + 1 :]:
                    self._abort_quietly(later)
                raise
            o.dirty &= ~_mask(start, start + count)
            o.extents = None  # holes of this segment may have got blocks
            done.add(id(o))
        for o in segs:
            if id(o) in done:
                self.stats["writebacks"] += 1
                if not o.dirty:
                    self.rights.set_dirty(o.ino, [o.seg], False)
        if failed:
            for ino, err in failed.items():
                self._record_error(ino, err)
            raise WriteBackError(failed)

    def _record_error(self, ino: int, err: OSError) -> None:
        """errseq, as Linux reports write-back errors: every program that has the file
        open learns of it once, at its next write, fsync or close."""
        with self._mu:
            self._err_seq += 1
            self._errors[ino] = (self._err_seq, err.errno or errno.EIO, str(err))
        dirty = sum(bin(o.dirty).count("1") for o in self._snapshot(ino)) * self.bs
        # A node agent logs it (its programs learn of it too); a short-lived command
        # reports it as its one error line instead.
        log.log(logging.ERROR if self.log_write_back_errors else logging.DEBUG,
                "write-back of inode %d failed (%s); its %d dirty bytes stay in the "
                "cache and are tried again", ino, err, dirty)

    def error_seq(self) -> int:
        """The current error sequence: a program that opens a file now has seen every
        error so far."""
        with self._mu:
            return self._err_seq

    def error_since(self, ino: int, seen: int) -> tuple[int, str] | None:
        """(errno, message) of the newest write-back error of ``ino`` after ``seen``."""
        with self._mu:
            got = self._errors.get(ino)
        if got is None or got[0] <= seen:
            return None
        return got[1], got[2]

    def _abort_quietly(self, runs: list[WriteRun]) -> None:
        try:
            self.meta.abort_write(runs)
        except Exception as e:  # the coordinator frees a failed session's blocks itself
            log.warning("giving back reserved blocks failed: %s", e)

    def _log_before_images(self, runs: list[WriteRun]) -> bool:
        """Write-ahead rule: save the old contents of blocks the running backup still
        needs, durably, before they are overwritten. They are read while this node
        holds the write right on the segment, so nobody changes them in between."""
        need = [r for r in runs if r.bi_time]
        if not need:
            return False
        sink = self.bi_sink
        if sink is None:
            raise RemoteError("a backup needs before images of these blocks, but this node "
                              "has no before-image log set up; retry")
        items = [(r.disk, r.dblock, read_blocks(self.blocks, r.disk, r.dblock, r.length),
                  r.bi_time) for r in need]
        sink.log(items)
        self.stats["bi_runs"] = self.stats.get("bi_runs", 0) + len(items)
        return True

    def _maybe_evict(self) -> None:
        """Over the limit: write the least recently used segments back, as one batch
        (one disk flush), and forget them, down to three quarters of the limit."""
        if self._cached <= self.cache_bytes:
            return
        excess = self._cached - self.cache_bytes * 3 // 4
        victims = self._snapshot()[: max(1, excess // SEGMENT_BYTES)]
        victims.sort(key=lambda o: (o.ino, o.seg))
        with ExitStack() as held:
            for o in victims:
                held.enter_context(o.lock)
            victims = [o for o in victims if not o.dropped]
            try:
                self._writeback_many(victims)
            except WriteBackError as e:
                # Recorded for the failing files' own programs: an eviction done for
                # another program's read or write must not hand it their error. Those
                # files stay cached (dirty); the rest go.
                victims = [o for o in victims if o.ino not in e.failed]
            by_ino: dict[int, list[Seg]] = {}
            for o in victims:
                by_ino.setdefault(o.ino, []).append(o)
            # Release before the drop, under the locks: once a segment is out of the
            # table another thread may take it again, and a release landing after that
            # new grant would remove it at the coordinator. One round trip for all.
            items = [(ino, [o.seg for o in objs]) for ino, objs in by_ino.items()]
            many = getattr(self.rights, "release_many", None)
            if many is not None and len(items) > 1:
                many(items)
            else:
                for ino, segs in items:
                    self.rights.release(ino, segs)
            for objs in by_ino.values():
                for o in objs:
                    self._drop(o)

    # -- coordinator requests -------------------------------------------------------------
    def recall(self, ino: int, segs: Iterable[int], keep: str | None) -> None:
        """Write back the segments; keep a read right (keep='r') or drop them.

        keep='discard': the file was removed while this node could not write it back;
        its data is dropped unwritten (nothing can read it any more)."""
        self.stats["recalls"] += 1
        with self._mu:
            objs = [o for o in (self._segs.get((ino, seg)) for seg in sorted(set(segs)))
                    if o is not None]
        if keep == "discard":
            for o in objs:
                with o.lock:
                    if o.dirty:
                        log.info("dropped unwritten data of removed inode %d segment %d",
                                 ino, o.seg)
                        o.dirty = 0
                        self.rights.set_dirty(ino, [o.seg], False)
                    self._drop(o)
            with self._mu:
                self._errors.pop(ino, None)
            return
        with ExitStack() as held:
            for o in objs:
                held.enter_context(o.lock)
                o.recalls += 1
            self._writeback_many(objs)
            for o in objs:
                if keep == "r" and o.mode is not None:
                    o.mode = "r"
                else:
                    self._drop(o)
        with self._mu:
            if not any(x.ino == ino and x.mode == "w" for x in self._segs.values()):
                self._sizes.pop(ino, None)

    def flush_inode(self, ino: int) -> None:
        self._flush([o for o in self._snapshot(ino) if o.dirty])

    def flush_all(self) -> None:
        self._flush([o for o in self._snapshot() if o.dirty])

    def _flush(self, objs: list[Seg]) -> None:
        """Write segments back in batches: one disk flush per batch, not per segment.
        Locks are taken in (inode, segment) order, as every writer takes them."""
        objs.sort(key=lambda o: (o.ino, o.seg))
        failed: dict[int, OSError] = {}
        for i in range(0, len(objs), FLUSH_BATCH):
            with ExitStack() as held:
                batch = objs[i : i + FLUSH_BATCH]
                for o in batch:
                    held.enter_context(o.lock)
                try:
                    self._writeback_many(batch)
                except WriteBackError as e:  # the other files go on
                    failed.update(e.failed)
        if failed:
            raise WriteBackError(failed)

    def drop_all(self) -> dict[int, list[tuple[int, int]]]:
        """Forget every cached segment (the session was lost); returns what was dirty,
        as byte ranges per inode (clipped to the size this node gave the file)."""
        lost: dict[int, list[tuple[int, int]]] = {}
        bs = self.bs
        for o in sorted(self._snapshot(), key=lambda o: (o.ino, o.seg)):
            with o.lock:
                if o.dirty:
                    size = self._sizes.get(o.ino)
                    base = o.seg * SEGMENT_BYTES
                    for start, count in _runs(o.dirty):
                        lo, hi = base + start * bs, base + (start + count) * bs
                        if size is not None:
                            hi = min(hi, max(size, lo))
                        lost.setdefault(o.ino, []).append((lo, hi))
                o.dirty = 0
                self._drop(o)
        return lost

    def forget_clean(self) -> None:
        """Drop every clean segment (its right was lost with the old coordinator)."""
        for o in self._snapshot():
            with o.lock:
                if not o.dirty:
                    self._drop(o)

    def dirty_segments(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for o in self._snapshot():
            if o.dirty:
                out.setdefault(o.ino, []).append(o.seg)
        return out

    def report(self) -> dict[str, Any]:
        segs = self._snapshot()
        with self._mu:
            errors = {str(ino): msg for ino, (_, _, msg) in self._errors.items()
                      if any(s.ino == ino and s.dirty for s in segs)}
        return {"cached_bytes": self._cached,
                "dirty_bytes": sum(bin(s.dirty).count("1") for s in segs) * self.bs,
                "segments": len(segs), "limit": self.cache_bytes,
                "write_back_errors": errors}

    # -- operations that need the cache emptied first ----------------------------------------
    def fsync(self, ino: int | None = None) -> None:
        if ino is None:
            self.flush_all()
        else:
            self.flush_inode(ino)
        super().fsync(ino)

    def release(self, ino: int) -> None:
        """Last close of a descriptor: write back (the error, if any, goes to the program
        at close), and always tell the coordinator, so an unlinked file is freed."""
        try:
            self.flush_inode(ino)
        finally:
            self.meta.release(ino)

    def truncate(self, ino: int, size: int) -> Attr:
        """Write back and forget this node's cache of the file, then truncate at the
        coordinator (which recalls every other node and zeroes the cut block's tail)."""
        for o in self._snapshot(ino):
            with o.lock:
                self._writeback(o)
                self.rights.release(ino, [o.seg])  # before the drop: see _maybe_evict
                self._drop(o)
        attr = self.meta.truncate(ino, size)
        return attr
