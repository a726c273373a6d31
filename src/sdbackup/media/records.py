"""The one self-describing record format used on every backup medium.

A *stream* is a sequence of records written back to back, with no padding, on a disk
medium (one file per copying node), a log medium, or a tape file. Every record is a
fixed 64-byte little-endian header followed by ``payload_len`` bytes of payload. The
header says what the payload is and where its blocks came from (seed feature a.7, Fig.
16: a BI log record carries its own device, original address and length), so a stream
can be read, verified, overlaid or indexed without any other file. The full byte-by-byte
layout, the kinds and flags and the compatibility rule are in ``docs/FORMAT.md``.

Header (offsets in bytes; every integer little-endian):

======  ====  =====  ================  ===================================================
offset  size  type   field             why it exists
======  ====  =====  ================  ===================================================
0       4     bytes  magic b"SDBR"     finds record boundaries; a reader that lands
                                       off a boundary (bad index, torn tape position)
                                       says so instead of decoding garbage
4       2     u16    version           format version; a reader refuses versions it does
                                       not know instead of misreading them
6       1     u8     kind              DATA / BI / META / INDEX / LABEL / END
7       1     u8     flags             bits 0-1 compression (0 none, 1 zstd); bit 2
                                       BLOCKS (payload is the raw blocks of the run);
                                       bits 3-7 reserved, must be 0
8       4     u32    disk_id           the cluster disk the blocks belong to (a.7
                                       "device")
12      4     u32    block_count       length of the block run (a.7 "length")
16      8     u64    start_block       first block of the run (a.7 "original address")
24      8     u64    logical_time      BI: the write's logical time, so "keep the
                                       oldest per area" needs nothing but the records
                                       (a.2, a.3); DATA: 0 or the copy's time
32      8     u64    seq               record number in its stream (LABEL is 0); a lost,
                                       repeated or misplaced record is detected
40      4     u32    payload_len       bytes stored after the header (compressed size)
44      4     u32    raw_len           bytes after decompression; the block size of a
                                       run is raw_len / block_count; bounds the
                                       decompression buffer
48      8     u64    payload_checksum  xxh3_64 of the stored payload bytes
56      8     u64    header_checksum   xxh3_64 of header bytes 0..55
======  ====  =====  ================  ===================================================

Nothing read from a medium is trusted: :func:`decode_header` and :func:`verify_payload`
raise :class:`~sdbackup.errors.CorruptError` naming the medium, the byte offset, and for
payloads the disk and block run, never returning wrong data.

:class:`RecordWriter` writes a stream (LABEL first, END last, fsync on close), with zstd
compression and checksumming of successive records overlapped in a thread pool while the
records reach the medium in order; :class:`RecordReader` reads one record at an offset
(through an index) or scans a whole stream sequentially.
"""

from __future__ import annotations

import collections
import enum
import errno
import fcntl
import io
import json
import os
import stat
import struct
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal, NamedTuple, Protocol

import xxhash
import zstandard

from sdbackup.errors import CorruptError, NoSpaceError

__all__ = [
    "FLAG_BLOCKS",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_RECORD_BYTES",
    "MIN_BLOCK_SIZE",
    "SUPPORTED_VERSIONS",
    "Compression",
    "Kind",
    "Record",
    "RecordHeader",
    "RecordLocation",
    "RecordReader",
    "RecordWriter",
    "StreamDigest",
    "StreamTruncatedError",
    "decode_header",
    "encode_header",
    "verify_payload",
]

MAGIC = b"SDBR"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS: frozenset[int] = frozenset({1})
"""Versions this code reads. A writer always writes :data:`FORMAT_VERSION`."""

# Everything but the header checksum; the checksum (u64) follows at offset 56.
_BODY = struct.Struct("<4sHBBIIQQQIIQ")
_CHECKSUM = struct.Struct("<Q")
HEADER_SIZE = _BODY.size + _CHECKSUM.size
assert HEADER_SIZE == 64

MAX_RECORD_BYTES = 1 << 28
"""Largest raw (and stored) payload of one record: 256 MiB. Bounds every allocation a
reader makes for one record, whatever a damaged header or zstd frame claims."""

MIN_BLOCK_SIZE = 512
"""Blocks of a DATA or BI record are a power of two of at least this many bytes."""

_U64 = 1 << 64

# flags
_COMPRESSION_MASK = 0x03
COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
FLAG_BLOCKS = 0x04
"""The raw payload is exactly ``block_count`` blocks of ``disk_id`` starting at
``start_block``, ``raw_len // block_count`` bytes each. Set on DATA and BI, never on the
other kinds."""
_RESERVED_FLAGS = 0xFF & ~(_COMPRESSION_MASK | FLAG_BLOCKS)

Compression = Literal["none", "zstd"]
_COMPRESSION_NAMES: dict[int, Compression] = {
    COMPRESSION_NONE: "none",
    COMPRESSION_ZSTD: "zstd",
}


class Kind(enum.IntEnum):
    """What a record's payload is."""

    DATA = 1
    """Blocks copied from a disk (the backup image itself)."""
    BI = 2
    """A before-image log record: the blocks as they were before an overwrite (a.2-a.7)."""
    META = 3
    """A chunk of the metadata snapshot taken at T0."""
    INDEX = 4
    """A chunk of the (disk, block run) -> (stream, offset, kind) index (tape end)."""
    LABEL = 5
    """First record of every stream: a JSON object (cluster id, generation id, stream id)."""
    END = 6
    """Last record of every stream: JSON {"records": n, "bytes": b} of what precedes it."""


_BLOCK_KINDS = frozenset({Kind.DATA, Kind.BI})
_KIND_VALUES = frozenset(int(k) for k in Kind)


class StreamTruncatedError(CorruptError):
    """A stream ends inside a record, or before its END record.

    ``offset`` is where the first incomplete (or missing) record starts: the stream is
    intact up to there. A reader recovering a log medium after a crash may accept the
    records before ``offset``; a backup stream that is truncated is not usable.
    """

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


@dataclass(frozen=True, slots=True)
class RecordHeader:
    """A decoded (or to-be-encoded) record header."""

    kind: Kind
    flags: int
    disk_id: int
    start_block: int
    block_count: int
    logical_time: int
    seq: int
    payload_len: int
    raw_len: int
    payload_checksum: int
    version: int = FORMAT_VERSION

    @property
    def compression(self) -> Compression:
        return _COMPRESSION_NAMES[self.flags & _COMPRESSION_MASK]

    @property
    def is_blocks(self) -> bool:
        return bool(self.flags & FLAG_BLOCKS)

    @property
    def block_size(self) -> int:
        """Bytes per block of the run (0 for records that carry no blocks)."""
        return self.raw_len // self.block_count if self.block_count else 0

    @property
    def end_block(self) -> int:
        """One past the last block of the run."""
        return self.start_block + self.block_count

    @property
    def record_len(self) -> int:
        """Bytes the whole record takes on the medium (header + stored payload)."""
        return HEADER_SIZE + self.payload_len

    def describe(self) -> str:
        """``DATA record #7 for disk 3 blocks 1024..1279`` (used in error messages)."""
        what = f"{self.kind.name} record #{self.seq}"
        if self.block_count:
            return (
                f"{what} for disk {self.disk_id} blocks "
                f"{self.start_block}..{self.start_block + self.block_count - 1}"
            )
        return f"{what} (disk {self.disk_id}, block {self.start_block})"


@dataclass(frozen=True, slots=True)
class Record:
    """One record read back: where it was, its header, its verified raw payload."""

    offset: int
    header: RecordHeader
    data: bytes

    @property
    def kind(self) -> Kind:
        return self.header.kind

    def json(self) -> Any:
        """The payload of a LABEL or END record (or any JSON payload), decoded."""
        return json.loads(self.data)


class RecordLocation(NamedTuple):
    """Where :class:`RecordWriter` put a record: ``offset`` on the medium, and
    ``stored_len`` bytes taken there (header + stored payload)."""

    offset: int
    stored_len: int


# ---------------------------------------------------------------------------------------
# header encoding and checking


def _header_problem(
    kind: int,
    flags: int,
    disk_id: int,
    start_block: int,
    block_count: int,
    payload_len: int,
    raw_len: int,
) -> str | None:
    """What is impossible about these header fields, or None (shared by both sides)."""
    if kind not in _KIND_VALUES:
        known = ", ".join(f"{k.value} {k.name}" for k in Kind)
        return f"unknown record kind {kind} (known kinds: {known})"
    k = Kind(kind)
    if flags & _RESERVED_FLAGS:
        return f"reserved flag bits set in flags 0x{flags:02x} (only bits 0-2 are defined)"
    comp = flags & _COMPRESSION_MASK
    if comp not in _COMPRESSION_NAMES:
        return f"unknown compression {comp} in flags 0x{flags:02x} (0 none, 1 zstd)"
    if raw_len > MAX_RECORD_BYTES or payload_len > MAX_RECORD_BYTES:
        return (
            f"impossible lengths: payload length {payload_len}, raw length {raw_len} "
            f"(a record holds at most {MAX_RECORD_BYTES} bytes)"
        )
    if comp == COMPRESSION_NONE and payload_len != raw_len:
        return (
            f"impossible lengths: uncompressed payload length {payload_len} "
            f"differs from raw length {raw_len}"
        )
    if comp == COMPRESSION_ZSTD and not 0 < payload_len < raw_len:
        return (
            f"impossible lengths: zstd payload length {payload_len} for raw length "
            f"{raw_len} (a payload is stored compressed only when that makes it smaller)"
        )
    if k in _BLOCK_KINDS:
        if not flags & FLAG_BLOCKS:
            return f"{k.name} record without the BLOCKS flag (flags 0x{flags:02x})"
        if block_count == 0:
            return f"{k.name} record with block count 0"
        if raw_len == 0 or raw_len % block_count:
            return (
                f"impossible lengths: raw length {raw_len} is not a whole number of "
                f"blocks for block count {block_count}"
            )
        bs = raw_len // block_count
        if bs < MIN_BLOCK_SIZE or bs & (bs - 1):
            return (
                f"impossible lengths: raw length {raw_len} for block count {block_count} "
                f"makes blocks of {bs} bytes (a power of two >= {MIN_BLOCK_SIZE})"
            )
        if start_block + block_count > _U64:
            return f"block range {start_block}+{block_count} runs past block 2**64"
    else:
        if flags & FLAG_BLOCKS:
            return f"{k.name} record with the BLOCKS flag set (flags 0x{flags:02x})"
        if block_count or start_block:
            return (
                f"{k.name} record with a block run (start block {start_block}, "
                f"block count {block_count}); only DATA and BI carry blocks"
            )
        if k in (Kind.LABEL, Kind.END) and disk_id:
            return f"{k.name} record with disk id {disk_id} (must be 0)"
    return None


def encode_header(header: RecordHeader) -> bytes:
    """The 64 header bytes of ``header`` (header checksum computed here).

    Raises ValueError if the header is one a reader would reject (a programming error).
    """
    problem = _header_problem(
        header.kind,
        header.flags,
        header.disk_id,
        header.start_block,
        header.block_count,
        header.payload_len,
        header.raw_len,
    )
    if problem is not None:
        raise ValueError(f"refusing to write an invalid record header: {problem}")
    if header.version != FORMAT_VERSION:
        raise ValueError(f"this code writes format version {FORMAT_VERSION} only")
    try:
        body = _BODY.pack(
            MAGIC,
            header.version,
            header.kind,
            header.flags,
            header.disk_id,
            header.block_count,
            header.start_block,
            header.logical_time,
            header.seq,
            header.payload_len,
            header.raw_len,
            header.payload_checksum,
        )
    except struct.error as e:
        raise ValueError(f"record header field out of range: {e}") from None
    return body + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))


def _corrupt(medium: str, offset: int, what: str) -> CorruptError:
    return CorruptError(f"corrupt record on backup medium {medium} at offset {offset}: {what}")


def decode_header(buf: bytes | bytearray | memoryview, *, medium: str, offset: int) -> RecordHeader:
    """Decode and check the 64-byte header at the start of ``buf``.

    ``medium`` and ``offset`` (where ``buf`` was read) only go into error messages.
    Checks, in this order: length, magic, version (so that a header from a newer
    format is reported as such, not as damage), header checksum, then the fields'
    consistency (kind, flags, lengths, block run).
    """
    mv = memoryview(buf)
    if mv.nbytes < HEADER_SIZE:
        raise StreamTruncatedError(
            f"stream truncated at offset {offset} on backup medium {medium}: record "
            f"header cut off after {mv.nbytes} of {HEADER_SIZE} bytes",
            offset,
        )
    (
        magic,
        version,
        kind,
        flags,
        disk_id,
        block_count,
        start_block,
        logical_time,
        seq,
        payload_len,
        raw_len,
        payload_checksum,
    ) = _BODY.unpack_from(mv)
    if magic != MAGIC:
        raise _corrupt(
            medium,
            offset,
            f"bad magic {bytes(magic)!r} (expected {MAGIC!r}): not the start of an "
            "sdbackup record (damaged medium, or an index pointing at the wrong offset)",
        )
    if version not in SUPPORTED_VERSIONS:
        supported = ", ".join(str(v) for v in sorted(SUPPORTED_VERSIONS))
        raise _corrupt(
            medium,
            offset,
            f"unsupported record format version {version} (this sdbackup reads "
            f"version {supported}): written by a newer sdbackup, or the header is damaged",
        )
    (stored,) = _CHECKSUM.unpack_from(mv, _BODY.size)
    computed = xxhash.xxh3_64_intdigest(mv[: _BODY.size])
    if stored != computed:
        raise _corrupt(
            medium,
            offset,
            f"header checksum mismatch (stored 0x{stored:016x}, computed 0x{computed:016x})",
        )
    problem = _header_problem(kind, flags, disk_id, start_block, block_count, payload_len, raw_len)
    if problem is not None:
        raise _corrupt(medium, offset, problem)
    return RecordHeader(
        kind=Kind(kind),
        flags=flags,
        disk_id=disk_id,
        start_block=start_block,
        block_count=block_count,
        logical_time=logical_time,
        seq=seq,
        payload_len=payload_len,
        raw_len=raw_len,
        payload_checksum=payload_checksum,
        version=version,
    )


_tls = threading.local()


def _decompressor() -> Any:
    d = getattr(_tls, "dctx", None)
    if d is None:
        # The window can never need to exceed one record; zstd also sizes its window
        # buffer by min(window, frame content size), which we check against raw_len.
        d = zstandard.ZstdDecompressor(max_window_size=MAX_RECORD_BYTES)
        _tls.dctx = d
    return d


def verify_payload(
    header: RecordHeader,
    payload: bytes | bytearray | memoryview,
    medium: str,
    offset: int,
) -> bytes:
    """Check ``payload`` against ``header`` and return the raw (decompressed) bytes.

    ``offset`` is the medium offset of the record (its header). Raises CorruptError
    naming the disk, the block run and the offset on a checksum mismatch, a payload of
    the wrong length, or a zstd payload that does not decompress to exactly
    ``raw_len`` bytes. Decompression allocates at most ``raw_len`` bytes (itself at
    most :data:`MAX_RECORD_BYTES`), whatever the zstd frame claims.
    """
    mv = memoryview(payload)
    where = f"{header.describe()} on backup medium {medium} at offset {offset}"
    if mv.nbytes != header.payload_len:
        if mv.nbytes < header.payload_len:
            raise StreamTruncatedError(
                f"stream truncated at offset {offset}: payload of {where} cut off after "
                f"{mv.nbytes} of {header.payload_len} bytes",
                offset,
            )
        raise CorruptError(
            f"payload of {where} is {mv.nbytes} bytes, header says {header.payload_len}"
        )
    computed = xxhash.xxh3_64_intdigest(mv)
    if computed != header.payload_checksum:
        raise CorruptError(
            f"payload checksum mismatch in {where} (stored 0x{header.payload_checksum:016x},"
            f" computed 0x{computed:016x}): the medium is damaged; these blocks cannot be "
            "restored from this copy"
        )
    if header.compression == "none":
        return mv.tobytes() if not isinstance(payload, bytes) else payload
    return _decompress(header, mv, where)


def _decompress(header: RecordHeader, mv: memoryview, where: str) -> bytes:
    # The payload checksum matched, so a bad frame here was written bad (a bug), or
    # forged; either way it must not make us allocate what the frame claims.
    bad = f"zstd payload of {where} does not decompress"
    try:
        declared = zstandard.frame_content_size(mv)
    except zstandard.ZstdError as e:
        raise CorruptError(f"{bad}: bad frame header ({e})") from None
    if declared != header.raw_len:
        claim = "no size" if declared < 0 else f"{declared} bytes"
        raise CorruptError(f"{bad}: the frame declares {claim}, the header {header.raw_len} bytes")
    try:
        out = _decompressor().decompress(mv, max_output_size=header.raw_len, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise CorruptError(f"{bad}: {e}") from None
    if len(out) != header.raw_len:
        raise CorruptError(f"{bad}: got {len(out)} bytes, expected {header.raw_len}")
    assert isinstance(out, bytes)
    return out


# ---------------------------------------------------------------------------------------
# writer


class _Writable(Protocol):
    def write(self, data: bytes | memoryview, /) -> int | None: ...


Buffer = bytes | bytearray | memoryview


def _build(
    seq: int,
    kind: Kind,
    disk_id: int,
    start_block: int,
    block_count: int,
    logical_time: int,
    data: Buffer,
    compress: bool,
    level: int,
) -> tuple[bytes, Buffer]:
    """Compress (if it helps) and checksum one record: (header bytes, stored payload).

    Runs in the writer's thread pool: zstd and xxhash release the GIL.
    """
    raw_len = memoryview(data).nbytes
    payload: Buffer = data
    comp = COMPRESSION_NONE
    if compress and raw_len:
        cctx = getattr(_tls, "cctx", None)
        if cctx is None or _tls.level != level:
            cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
            _tls.cctx, _tls.level = cctx, level
        packed = cctx.compress(data)
        if len(packed) < raw_len:  # store raw when compression does not help
            payload, comp = packed, COMPRESSION_ZSTD
    flags = comp | (FLAG_BLOCKS if kind in _BLOCK_KINDS else 0)
    header = RecordHeader(
        kind=kind,
        flags=flags,
        disk_id=disk_id,
        start_block=start_block,
        block_count=block_count,
        logical_time=logical_time,
        seq=seq,
        payload_len=memoryview(payload).nbytes,
        raw_len=raw_len,
        payload_checksum=xxhash.xxh3_64_intdigest(payload),
    )
    return encode_header(header), payload


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
        :class:`StreamDigest`): a checksum of the whole stream that costs 64 bytes of
        hashing per record, since each header's checksums cover its payload."""
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
        if kind not in _BLOCK_KINDS:
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
                built = _build(
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
            if isinstance(data, bytearray) or (isinstance(data, memoryview) and not data.readonly):
                data = bytes(data)  # the caller may reuse its buffer once we return
            job = self._pool.submit(
                _build,
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


# ---------------------------------------------------------------------------------------
# reader


class _Source:
    """Sequential reads from a descriptor in large chunks (pread when it can seek,
    read otherwise), for :meth:`RecordReader.scan`."""

    def __init__(self, fd: int, start: int, chunk: int) -> None:
        self.fd = fd
        self.pos = start  # file offset of the next byte not yet in the buffer
        self.chunk = chunk
        self.buf = b""
        self.at = 0  # next unread byte in buf
        try:
            st = os.fstat(fd)
            self.seekable = stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)
        except OSError:
            self.seekable = False

    def _raw(self, n: int) -> bytes:
        """Up to ``n`` bytes from the medium; fewer only at its end."""
        parts: list[bytes] = []
        want = n
        while want:
            got = os.pread(self.fd, want, self.pos) if self.seekable else os.read(self.fd, want)
            if not got:
                break
            self.pos += len(got)
            parts.append(got)
            want -= len(got)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read(self, n: int) -> bytes:
        """``n`` bytes, or fewer at the end of the medium."""
        have = len(self.buf) - self.at
        if have >= n:
            out = self.buf[self.at : self.at + n]
            self.at += n
            return out
        head = self.buf[self.at :]
        self.buf, self.at = b"", 0
        if n - have >= self.chunk:
            return head + self._raw(n - have)
        self.buf = self._raw(self.chunk)
        take = min(n - have, len(self.buf))
        self.at = take
        return head + self.buf[:take]

    def skip(self, n: int) -> int:
        """Skip ``n`` bytes; returns how many were there to skip."""
        have = len(self.buf) - self.at
        if have >= n:
            self.at += n
            return n
        self.buf, self.at = b"", 0
        rest = n - have
        if not self.seekable:
            got = 0
            while got < rest:
                chunk = os.read(self.fd, min(self.chunk, rest - got))
                if not chunk:
                    break
                got += len(chunk)
            return have + got
        size = os.fstat(self.fd).st_size
        got = max(0, min(rest, size - self.pos))
        self.pos += got
        return have + got


class RecordReader:
    """Reads records from a stream written by :class:`RecordWriter`.

    ``source`` is a path (opened read-only, closed by :meth:`close`) or a descriptor
    (left open). ``medium`` names the medium in error messages (default: the path).
    Every read verifies the header and payload checksums; nothing wrong is returned.
    Offsets are positions in the file; a stream is expected at offset 0 (``start``
    otherwise). Safe to share between threads for :meth:`read_at` (positional reads).
    """

    def __init__(
        self,
        source: int | str | os.PathLike[str],
        medium: str | None = None,
        *,
        start: int = 0,
    ) -> None:
        if isinstance(source, int):
            self._fd = source
            self._owns = False
            default = f"fd {source}"
        else:
            self._fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
            self._owns = True
            default = os.fspath(source)
        self.medium = medium if medium is not None else default
        self.start = start

    def close(self) -> None:
        if self._owns and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pread(self, n: int, offset: int) -> bytes:
        parts: list[bytes] = []
        while n:
            got = os.pread(self._fd, n, offset)
            if not got:
                break
            parts.append(got)
            n -= len(got)
            offset += len(got)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_header(self, offset: int) -> RecordHeader:
        """The checked header of the record at ``offset``."""
        return decode_header(self._pread(HEADER_SIZE, offset), medium=self.medium, offset=offset)

    def read_at(self, offset: int) -> Record:
        """The record at ``offset``: header and verified, decompressed payload."""
        h = self.read_header(offset)
        payload = self._pread(h.payload_len, offset + HEADER_SIZE)
        return Record(offset, h, verify_payload(h, payload, self.medium, offset))

    def label(self) -> dict[str, Any]:
        """The stream's LABEL (its first record) as a dict."""
        rec = self.read_at(self.start)
        if rec.kind != Kind.LABEL or rec.header.seq != 0:
            raise _corrupt(
                self.medium, self.start, f"stream starts with a {rec.kind.name} record, not LABEL"
            )
        value = _json_object(rec, self.medium)
        return value

    def scan(
        self,
        *,
        require_end: bool = True,
        payloads: bool = True,
        chunk_size: int = 8 << 20,
    ) -> Iterator[Record]:
        """Every record of the stream in order, from LABEL to END, read sequentially.

        Checks as it goes: LABEL first, sequence numbers 0, 1, 2..., END's record and
        byte counts, nothing after END. A stream cut off inside a record, or (with
        ``require_end``) before END, raises :class:`StreamTruncatedError` after the
        intact records were yielded. With ``payloads=False`` only headers are read and
        checked (payloads are skipped, ``data`` is empty): for rebuilding an index.
        """
        src = _Source(self._fd, self.start, chunk_size)
        if src.seekable:
            try:
                os.posix_fadvise(self._fd, self.start, 0, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass
        offset = self.start
        seq = 0
        ended = False
        while True:
            raw = src.read(HEADER_SIZE)
            if not raw:
                if not ended and require_end:
                    raise StreamTruncatedError(
                        f"stream truncated at offset {offset} on backup medium "
                        f"{self.medium}: it ends after {seq} records without an END "
                        "record (the writer did not finish: it crashed, was killed, or "
                        "the medium filled up)",
                        offset,
                    )
                return
            if ended:
                raise _corrupt(self.medium, offset, "data after the END record")
            h = decode_header(raw, medium=self.medium, offset=offset)
            if (seq == 0) != (h.kind == Kind.LABEL):
                what = (
                    f"stream starts with a {h.kind.name} record, not LABEL"
                    if seq == 0
                    else "a second LABEL record inside the stream"
                )
                raise _corrupt(self.medium, offset, what)
            if h.seq != seq:
                raise _corrupt(
                    self.medium,
                    offset,
                    f"{h.kind.name} record has sequence number {h.seq}, expected {seq}: "
                    "a record is missing, repeated, or from another stream",
                )
            if payloads or h.kind == Kind.END:
                payload = src.read(h.payload_len)
                data = verify_payload(h, payload, self.medium, offset)
            else:
                got = src.skip(h.payload_len)
                if got < h.payload_len:
                    raise StreamTruncatedError(
                        f"stream truncated at offset {offset}: payload of {h.describe()} on "
                        f"backup medium {self.medium} cut off after {got} of "
                        f"{h.payload_len} bytes",
                        offset,
                    )
                data = b""
            rec = Record(offset, h, data)
            if h.kind == Kind.END:
                end = _json_object(rec, self.medium)
                want = {"records": seq, "bytes": offset - self.start}
                if {k: end.get(k) for k in want} != want:
                    raise _corrupt(
                        self.medium,
                        offset,
                        f"END record says {end.get('records')} records and "
                        f"{end.get('bytes')} bytes precede it, but {seq} records and "
                        f"{offset - self.start} bytes do",
                    )
                ended = True
            yield rec
            offset += h.record_len
            seq += 1


class StreamDigest:
    """The whole-stream checksum of :attr:`RecordWriter.header_digest`, recomputed by a
    reader: XXH3-64 over the 64 header bytes of every record, LABEL to END, in order.

    A header's checksum covers its ``payload_checksum``, so this digest covers every
    payload byte too, while hashing only 64 bytes per record. Feed it each
    :class:`Record` (or header) of :meth:`RecordReader.scan` in order.
    """

    def __init__(self) -> None:
        self._h = xxhash.xxh3_64()

    def update(self, header: RecordHeader) -> None:
        self._h.update(encode_header(header))

    def intdigest(self) -> int:
        return int(self._h.intdigest())


def _json_object(rec: Record, medium: str) -> dict[str, Any]:
    try:
        value = json.loads(rec.data)
    except ValueError as e:
        raise _corrupt(medium, rec.offset, f"{rec.kind.name} payload is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise _corrupt(medium, rec.offset, f"{rec.kind.name} payload is not a JSON object")
    return value
