"""Writing a record stream: :class:`RecordWriter`, threaded compression, ordered writes.

The records themselves (layout, kinds, checksums, compression) are
:mod:`~sdbackup.media.record_format`; this module puts them on a medium.

What this module guarantees:

* A stream is LABEL (seq 0), the records in the order they were submitted (seq 1, 2,
  ...), then END with the record and byte counts, written by :meth:`RecordWriter.close`
  (which fsyncs, unless told not to). Nothing follows END.
* Compression and checksumming run in a thread pool, but records reach the medium in
  submission order, and at most ``max_inflight`` records wait in memory.
* :meth:`RecordWriter.flush` with ``fsync=True`` returns only when every record
  submitted so far is written and fsynced (where the medium can be: not a pipe or a
  socket), as the before-image write-ahead rule needs.
* After any write error (a full medium is :class:`~sdbackup.errors.NoSpaceError`) or
  :meth:`RecordWriter.abort`, no END record is ever written: an unfinished stream is
  visibly unfinished to a reader.
* Each returned :class:`RecordLocation` is where the record starts on the medium and
  how many bytes it takes there, for an index.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import io
import json
import os
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, NamedTuple, Protocol

import xxhash

from sdbackup.errors import NoSpaceError
from sdbackup.media.record_format import (
    BLOCK_KINDS,
    MAX_RECORD_BYTES,
    MIN_BLOCK_SIZE,
    Buffer,
    Compression,
    Kind,
    encode_record,
)

__all__ = ["RecordLocation", "RecordWriter"]

_U64 = 1 << 64  # header fields are u64 at most
# Records of at most this many bytes are compressed in the calling thread: a round trip
# through the pool (submit, wake a worker, wait for its future) costs more than zstd
# on a few blocks (bench/incremental.py: 73 -> ~30 us per 4 KiB record).
INLINE_BYTES = 16 << 10


class RecordLocation(NamedTuple):
    """Where :class:`RecordWriter` put a record: ``offset`` on the medium, and
    ``stored_len`` bytes taken there (header + stored payload)."""

    offset: int
    stored_len: int


class _Writable(Protocol):
    def write(self, data: bytes | memoryview, /) -> int | None: ...


class RecordWriter:
    """Writes one record stream: a LABEL record, your records, an END record.

    ``dest`` is a file descriptor, a binary file object (its ``fileno()`` is used when
    it has one, after flushing it), or any object with ``write``. The stream starts at
    the descriptor's current position; every offset returned is a position on that
    medium. ``medium`` names the medium in error messages.

    With ``compress="zstd"`` and ``threads >= 1`` (default: the CPU count, at most 8),
    records are compressed and checksummed in a pool of ``threads`` threads, at most
    ``max_inflight`` records at a time (default ``2 * threads + 2``), and written in the
    order they were submitted. Memory stays bounded: a submit blocks while the oldest
    record is still being compressed and the queue is full. A record is stored
    uncompressed when zstd does not make it smaller.

    Data passed as ``bytes`` or a read-only memoryview is used as is; a mutable buffer
    (bytearray, writable memoryview) is copied before the call returns when records are
    compressed in the background, so callers may reuse their buffers.

    ``write_blocks``/``write_record`` return a Future of :class:`RecordLocation`: it is
    already done with ``compress="none"``; otherwise it is done when the record has
    been written (at the latest after :meth:`flush`). Not meant for concurrent use by
    several threads, but safe: calls are serialized by a lock.

    A full medium raises :class:`NoSpaceError`; the stream is then unusable (no END
    record is written), as after any write error.
    """

    def __init__(
        self,
        dest: int | BinaryIO | _Writable,
        *,
        medium: str | None = None,
        label: Mapping[str, Any] | None = None,
        compress: Compression = "none",
        level: int = 1,
        threads: int | None = None,
        max_inflight: int | None = None,
    ) -> None:
        if compress not in ("none", "zstd"):
            raise ValueError(f"compress must be 'none' or 'zstd', not {compress!r}")
        self._fd: int | None = None
        self._file: _Writable | None = None
        self._owns_fd = False
        if isinstance(dest, int):
            self._fd = dest
        else:
            try:
                fd = dest.fileno()  # type: ignore[attr-defined]
            except (AttributeError, io.UnsupportedOperation, OSError):
                self._file = dest
            else:
                flush = getattr(dest, "flush", None)
                if flush is not None:
                    flush()
                self._fd = fd
        self.medium = medium if medium is not None else self._default_name(dest)
        self.start_offset = self._initial_offset(dest)
        self._pos = self.start_offset
        self._seq = 0
        self._compress = compress == "zstd"
        self._level = level
        if threads is None:
            threads = min(os.cpu_count() or 1, 8)
        self._pool: ThreadPoolExecutor | None = None
        if self._compress and threads >= 1:
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="sdb-records")
        self._max_inflight = max_inflight if max_inflight else 2 * max(threads, 1) + 2
        self._inflight: collections.deque[
            tuple[Future[tuple[bytes, Buffer]], Future[RecordLocation]]
        ] = collections.deque()
        self._lock = threading.Lock()
        self._failed: BaseException | None = None
        self._closed = False
        self._digest = xxhash.xxh3_64()
        payload = json.dumps(dict(label or {}), sort_keys=True).encode()
        try:
            self._submit(Kind.LABEL, 0, 0, 0, 0, payload, compress=False)
        except BaseException:
            self._failed = self._failed or RuntimeError("could not write the LABEL record")
            self._release()
            raise

    @classmethod
    def create(cls, path: str | os.PathLike[str], **kwargs: Any) -> RecordWriter:
        """Create (or truncate) the file ``path`` and write a stream into it; the
        writer owns the descriptor and closes it on :meth:`close`."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        kwargs.setdefault("medium", os.fspath(path))
        try:
            w = cls(fd, **kwargs)
        except BaseException:
            os.close(fd)
            raise
        w._owns_fd = True
        return w

    @staticmethod
    def _default_name(dest: object) -> str:
        if isinstance(dest, int):
            return f"fd {dest}"
        name = getattr(dest, "name", None)
        return str(name) if isinstance(name, str | int) else repr(dest)

    def _initial_offset(self, dest: object) -> int:
        if self._fd is not None:
            try:
                if fcntl.fcntl(self._fd, fcntl.F_GETFL) & os.O_APPEND:
                    return os.lseek(self._fd, 0, os.SEEK_END)
                return os.lseek(self._fd, 0, os.SEEK_CUR)
            except OSError:  # pipe, socket, tape: positions count from here
                return 0
        tell = getattr(dest, "tell", None)
        if tell is not None:
            try:
                pos = tell()
                return pos if isinstance(pos, int) else 0
            except (OSError, io.UnsupportedOperation):
                return 0
        return 0

    # -- public API ----------------------------------------------------------------------

    @property
    def bytes_written(self) -> int:
        """Bytes of this stream written to the medium so far (records still being
        compressed are not counted until they are written)."""
        return self._pos - self.start_offset

    @property
    def records_written(self) -> int:
        """Records submitted so far, LABEL included."""
        return self._seq

    @property
    def header_digest(self) -> int:
        """XXH3-64 of every record header written so far, in order (see
        :class:`~sdbackup.media.record_scan.StreamDigest`): a checksum of the whole
        stream that costs 64 bytes of hashing per record, since each header's checksums
        cover its payload."""
        return int(self._digest.intdigest())

    def write_blocks(
        self,
        kind: Kind,
        disk_id: int,
        start_block: int,
        count: int,
        data: Buffer,
        logical_time: int = 0,
    ) -> Future[RecordLocation]:
        """Write ``count`` blocks of ``disk_id`` from ``start_block`` as one DATA or BI
        record; ``len(data)`` must be a whole, non-zero number of blocks."""
        if kind not in BLOCK_KINDS:
            raise ValueError(f"write_blocks writes DATA or BI records, not {kind!r}")
        n = memoryview(data).nbytes
        if count < 1 or n == 0 or n % count:
            raise ValueError(f"{n} bytes are not a whole number of blocks for count {count}")
        bs = n // count
        if bs < MIN_BLOCK_SIZE or bs & (bs - 1):
            raise ValueError(f"block size {bs} is not a power of two >= {MIN_BLOCK_SIZE}")
        return self._submit(kind, disk_id, start_block, count, logical_time, data, self._compress)

    def write_record(
        self,
        kind: Kind,
        payload: Buffer,
        *,
        disk_id: int = 0,
        logical_time: int = 0,
        compress: bool | None = None,
    ) -> Future[RecordLocation]:
        """Write a META or INDEX record (``compress`` defaults to the writer's)."""
        if kind not in (Kind.META, Kind.INDEX):
            raise ValueError(f"write_record writes META or INDEX records, not {kind!r}")
        c = self._compress if compress is None else compress
        return self._submit(kind, disk_id, 0, 0, logical_time, payload, c)

    def flush(self, *, fsync: bool = False) -> None:
        """Write every record submitted so far; with ``fsync`` make them durable (the
        write-ahead rule for BI logs needs that before the overwrite may proceed)."""
        with self._lock:
            self._check_usable()
            self._drain(everything=True)
            if fsync:
                self._fsync()

    def close(self, *, fsync: bool = True) -> int:
        """Write the remaining records and the END record, fsync, release the pool (and
        the descriptor if the writer opened it). Returns the stream's length in bytes."""
        if self._closed:
            return self.bytes_written
        try:
            with self._lock:
                self._check_usable()
                self._drain(everything=True)
            end = {"records": self._seq, "bytes": self.bytes_written}
            self._submit(Kind.END, 0, 0, 0, 0, json.dumps(end, sort_keys=True).encode(), False)
            if fsync:
                with self._lock:
                    self._fsync()
            return self.bytes_written
        finally:
            self._release()

    def abort(self) -> None:
        """Stop without writing END (the stream stays visibly unfinished)."""
        if not self._closed:
            self._failed = self._failed or RuntimeError("record stream aborted")
            self._release()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- internals -----------------------------------------------------------------------

    def _release(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        err = self._failed or RuntimeError("record stream closed")
        while self._inflight:
            _, fut = self._inflight.popleft()
            if not fut.done():
                fut.set_exception(err)
        if self._owns_fd and self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _check_usable(self) -> None:
        if self._failed is not None:
            if isinstance(self._failed, NoSpaceError):
                raise NoSpaceError(self._failed.message)
            raise RuntimeError(
                f"record stream on {self.medium} failed earlier: {self._failed}"
            ) from self._failed
        if self._closed:
            raise ValueError(f"record stream on {self.medium} is closed")

    def _submit(
        self,
        kind: Kind,
        disk_id: int,
        start_block: int,
        count: int,
        logical_time: int,
        data: Buffer,
        compress: bool,
    ) -> Future[RecordLocation]:
        raw_len = memoryview(data).nbytes
        if raw_len > MAX_RECORD_BYTES:
            raise ValueError(
                f"record of {raw_len} bytes is larger than {MAX_RECORD_BYTES}: split it"
            )
        for name, value, limit in (
            ("disk id", disk_id, 1 << 32),
            ("block count", count, 1 << 32),
            ("logical time", logical_time, _U64),
        ):
            if not 0 <= value < limit:
                raise ValueError(f"{name} {value} is out of range for a record header")
        if not 0 <= start_block <= _U64 - count:
            raise ValueError(f"block run {start_block}+{count} is out of range")
        with self._lock:
            self._check_usable()
            seq = self._seq
            fut: Future[RecordLocation] = Future()
            if self._pool is None or not compress:
                # Keep stream order: everything queued goes out before this record.
                self._drain(everything=True)
                built = encode_record(
                    seq,
                    kind,
                    disk_id,
                    start_block,
                    count,
                    logical_time,
                    data,
                    compress,
                    self._level,
                )
                self._seq += 1
                self._write_out(built, fut)
                return fut
            job: Future[tuple[bytes, Buffer]]
            if raw_len <= INLINE_BYTES:
                # A small record (an incremental's scattered blocks): encoding it here
                # costs less than the round trip through the pool; it still goes out
                # in order, behind the records in flight.
                job = Future()
                job.set_result(encode_record(seq, kind, disk_id, start_block, count,
                                             logical_time, data, True, self._level))
            else:
                if isinstance(data, bytearray) or (isinstance(data, memoryview)
                                                   and not data.readonly):
                    # The caller may reuse a writable buffer once we return: copy it.
                    # A read-only view is the caller's promise to keep the bytes as
                    # they are until this record's future is done (the copier's ring
                    # buffers do), so it goes to the pool as it is: no extra copy.
                    data = bytes(data)
                job = self._pool.submit(
                    encode_record,
                    seq,
                    kind,
                    disk_id,
                    start_block,
                    count,
                    logical_time,
                    data,
                    True,
                    self._level,
                )
            self._seq += 1
            self._inflight.append((job, fut))
            self._drain(everything=False)
            return fut

    def _drain(self, *, everything: bool) -> None:
        """Write finished records from the head of the queue, in order. Blocks on the
        oldest record while the queue is full (or always with ``everything``)."""
        while self._inflight:
            job, fut = self._inflight[0]
            if not everything and not job.done() and len(self._inflight) < self._max_inflight:
                return
            built = job.result()
            self._inflight.popleft()
            self._write_out(built, fut)

    def _write_out(self, built: tuple[bytes, Buffer], fut: Future[RecordLocation]) -> None:
        header, payload = built
        offset = self._pos
        total = len(header) + memoryview(payload).nbytes
        try:
            if self._fd is not None:
                _writev_all(self._fd, header, payload)
            else:
                assert self._file is not None
                _write_all(self._file, header)
                _write_all(self._file, payload)
        except OSError as e:
            err = self._write_error(e, offset, total)
            fut.set_exception(err)
            raise err from (None if isinstance(err, NoSpaceError) else e)
        self._pos += total
        self._digest.update(header)
        fut.set_result(RecordLocation(offset, total))

    def _write_error(self, e: OSError, offset: int, total: int) -> BaseException:
        err: BaseException
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            why = "is full" if e.errno == errno.ENOSPC else "is over its disk quota"
            err = NoSpaceError(
                f"the file system holding {self.medium} {why}: could not write a {total}-byte "
                f"record at offset {offset} after {self.bytes_written} bytes of this stream; "
                "free space there or use a larger medium, then run the backup again (this "
                "stream is incomplete and will not be used)"
            )
        else:
            err = e
        self._failed = err
        return err

    def _fsync(self) -> None:
        if self._fd is None:
            fl = getattr(self._file, "flush", None)
            if fl is not None:
                fl()
            return
        try:
            os.fsync(self._fd)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EROFS):  # pipe, socket, char device
                return
            err = self._write_error(e, self._pos, 0)
            raise err from (None if isinstance(err, NoSpaceError) else e)


def _writev_all(fd: int, header: bytes, payload: Buffer) -> None:
    bufs: list[memoryview] = [memoryview(header), memoryview(payload).cast("B")]
    while bufs:
        n = os.writev(fd, bufs)
        while n and bufs:
            if n >= bufs[0].nbytes:
                n -= bufs[0].nbytes
                bufs.pop(0)
            else:
                bufs[0] = bufs[0][n:]
                n = 0
        while bufs and bufs[0].nbytes == 0:
            bufs.pop(0)


def _write_all(f: _Writable, data: Buffer) -> None:
    mv = memoryview(data).cast("B")
    while mv.nbytes:
        n = f.write(mv)
        if n is None:  # raw non-blocking file object: nothing written; buffered: all
            n = mv.nbytes
        mv = mv[n:]
