"""The record codec: the one self-describing record format used on every backup medium.

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

What this module guarantees:

* :func:`encode_header` and :func:`encode_record` produce only records that
  :func:`decode_header` and :func:`verify_payload` accept (a header a reader would
  reject is a ``ValueError`` here, never bytes on a medium), in the current
  :data:`FORMAT_VERSION`.
* :func:`decode_header` and :func:`verify_payload` return only checked data: every
  check of ``docs/FORMAT.md`` ("Read checks, in this order") is made, in that order,
  and any failure is a :class:`~sdbackup.errors.CorruptError` (a
  :class:`StreamTruncatedError` when bytes are missing) naming the medium and offset.
* No allocation for one record exceeds :data:`MAX_RECORD_BYTES`, whatever a damaged
  header or a hostile zstd frame claims.
* No I/O: this module turns bytes into records and back. Writing a stream is
  :mod:`~sdbackup.media.record_writer`, reading one record
  :mod:`~sdbackup.media.record_reader`, checking a whole stream
  :mod:`~sdbackup.media.record_scan`.
"""

from __future__ import annotations

import enum
import json
import struct
import threading
from dataclasses import dataclass
from typing import Any, Literal

import xxhash
import zstandard

from sdbackup.errors import CorruptError

__all__ = [
    "BLOCK_KINDS",
    "COMPRESSION_NONE",
    "COMPRESSION_ZSTD",
    "FLAG_BLOCKS",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_RECORD_BYTES",
    "MIN_BLOCK_SIZE",
    "SUPPORTED_VERSIONS",
    "Buffer",
    "Compression",
    "Kind",
    "Record",
    "RecordHeader",
    "StreamTruncatedError",
    "corrupt_record",
    "decode_header",
    "encode_header",
    "encode_record",
    "json_object",
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


BLOCK_KINDS = frozenset({Kind.DATA, Kind.BI})
"""The kinds whose payload is a block run (they, and only they, carry :data:`FLAG_BLOCKS`)."""
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
    if k in BLOCK_KINDS:
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


def corrupt_record(medium: str, offset: int, what: str) -> CorruptError:
    """The error for the record at ``offset`` of ``medium`` that is wrong in ``what``."""
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
        raise corrupt_record(
            medium,
            offset,
            f"bad magic {bytes(magic)!r} (expected {MAGIC!r}): not the start of an "
            "sdbackup record (damaged medium, or an index pointing at the wrong offset)",
        )
    if version not in SUPPORTED_VERSIONS:
        supported = ", ".join(str(v) for v in sorted(SUPPORTED_VERSIONS))
        raise corrupt_record(
            medium,
            offset,
            f"unsupported record format version {version} (this sdbackup reads "
            f"version {supported}): written by a newer sdbackup, or the header is damaged",
        )
    (stored,) = _CHECKSUM.unpack_from(mv, _BODY.size)
    computed = xxhash.xxh3_64_intdigest(mv[: _BODY.size])
    if stored != computed:
        raise corrupt_record(
            medium,
            offset,
            f"header checksum mismatch (stored 0x{stored:016x}, computed 0x{computed:016x})",
        )
    problem = _header_problem(kind, flags, disk_id, start_block, block_count, payload_len, raw_len)
    if problem is not None:
        raise corrupt_record(medium, offset, problem)
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
# record encoding (compression and checksums)


Buffer = bytes | bytearray | memoryview
"""What a record's payload may be given as."""


def encode_record(
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

    The payload is stored zstd-compressed only when ``compress`` and that makes it
    smaller; otherwise ``data`` itself is returned as the payload. Raises ValueError
    for a record a reader would reject. :class:`~sdbackup.media.record_writer.RecordWriter`
    runs it in its thread pool: zstd and xxhash release the GIL.
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
    flags = comp | (FLAG_BLOCKS if kind in BLOCK_KINDS else 0)
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


def json_object(rec: Record, medium: str) -> dict[str, Any]:
    """The payload of ``rec`` (a LABEL or END record) as a dict; CorruptError when it
    is not a JSON object."""
    try:
        value = json.loads(rec.data)
    except ValueError as e:
        raise corrupt_record(
            medium, rec.offset, f"{rec.kind.name} payload is not JSON ({e})"
        ) from None
    if not isinstance(value, dict):
        raise corrupt_record(medium, rec.offset, f"{rec.kind.name} payload is not a JSON object")
    return value
