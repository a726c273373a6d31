"""The record format: round trips, every header field's damage, payload damage,
truncation, hostile zstd frames, and a full medium."""

from __future__ import annotations

import io
import json
import os
import random
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from sdbackup.errors import CorruptError, NoSpaceError
from sdbackup.media.record_format import (
    FLAG_BLOCKS,
    HEADER_SIZE,
    MAGIC,
    Compression,
    Kind,
    Record,
    RecordHeader,
    StreamTruncatedError,
    decode_header,
    encode_header,
    verify_payload,
)
from sdbackup.media.record_reader import RecordReader
from sdbackup.media.record_writer import RecordWriter

# The layout as docs/FORMAT.md states it (offset, struct format), written out again
# here on purpose: the tests check the code against the document, not against itself.
FIELDS: dict[str, tuple[int, str]] = {
    "magic": (0, "4s"),
    "version": (4, "<H"),
    "kind": (6, "<B"),
    "flags": (7, "<B"),
    "disk_id": (8, "<I"),
    "block_count": (12, "<I"),
    "start_block": (16, "<Q"),
    "logical_time": (24, "<Q"),
    "seq": (32, "<Q"),
    "payload_len": (40, "<I"),
    "raw_len": (44, "<I"),
    "payload_checksum": (48, "<Q"),
    "header_checksum": (56, "<Q"),
}

BS = 4096
MEDIUM = "test-medium"


def half_compressible(n: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += rng.randbytes(2048) + bytes(2048)
    return bytes(out[:n])


def get_field(hdr: bytes | bytearray, name: str) -> int | bytes:
    off, fmt = FIELDS[name]
    value: int | bytes = struct.unpack_from(fmt, hdr, off)[0]
    return value


def set_field(buf: bytearray, at: int, name: str, value: int | bytes, *, forge: bool) -> None:
    """Change one header field of the record at ``at``; with ``forge`` recompute the
    header checksum so that only the field's own checks can catch it."""
    off, fmt = FIELDS[name]
    struct.pack_into(fmt, buf, at + off, value)
    if forge:
        struct.pack_into("<Q", buf, at + 56, xxhash.xxh3_64_intdigest(bytes(buf[at : at + 56])))


def write_stream(
    path: Path,
    runs: list[tuple[Kind, int, int, bytes]],
    *,
    compress: Compression = "none",
    threads: int | None = 2,
) -> list[int]:
    """Write LABEL + ``runs`` (kind, disk, start, data) + END; returns record offsets."""
    with RecordWriter.create(
        path,
        medium=MEDIUM,
        label={"cluster": "c1", "generation": "g1", "stream": 0},
        compress=compress,
        threads=threads,
    ) as w:
        futs = [w.write_blocks(k, d, s, len(b) // BS, b) for k, d, s, b in runs]
    return [f.result().offset for f in futs]


@pytest.fixture
def stream(tmp_path: Path) -> Iterator[tuple[Path, list[int]]]:
    """A small stream: DATA records on disk 7 and a BI record, uncompressed."""
    runs = [
        (Kind.DATA, 7, 100, half_compressible(3 * BS, 1)),
        (Kind.DATA, 7, 103, half_compressible(2 * BS, 2)),
        (Kind.BI, 7, 5, half_compressible(BS, 3)),
    ]
    p = tmp_path / "s.sdbr"
    yield p, write_stream(p, runs)


# --- round trips ------------------------------------------------------------------------


SIZES = [1, 2, 3, 16, 255, 256, 1024]  # in 4 KiB blocks: 4 KiB .. 4 MiB


@pytest.mark.parametrize(
    ("compress", "threads"), [("none", None), ("zstd", 0), ("zstd", 1), ("zstd", 3)]
)
def test_round_trip(tmp_path: Path, compress: Compression, threads: int | None) -> None:
    rng = random.Random(42)
    runs: list[tuple[Kind, int, int, bytes]] = []
    block = 0
    for i, n in enumerate(SIZES * 2):
        kind = Kind.BI if i % 5 == 4 else Kind.DATA
        flavour = i % 3
        if flavour == 0:
            data = rng.randbytes(n * BS)  # incompressible: stored raw even with zstd
        elif flavour == 1:
            data = bytes(n * BS)
        else:
            data = half_compressible(n * BS, i)
        runs.append((kind, i % 4, block, data))
        block += n
    p = tmp_path / "s"
    offsets = write_stream(p, runs, compress=compress, threads=threads)

    r = RecordReader(p, MEDIUM)
    assert r.label() == {"cluster": "c1", "generation": "g1", "stream": 0}
    recs = list(r.scan())
    assert [x.kind for x in recs] == [Kind.LABEL, *(k for k, *_ in runs), Kind.END]
    assert [x.header.seq for x in recs] == list(range(len(runs) + 2))
    body = recs[1:-1]
    assert [x.offset for x in body] == offsets
    for rec, (_kind, disk, start, data) in zip(body, runs, strict=True):
        assert (rec.header.disk_id, rec.header.start_block) == (disk, start)
        assert rec.header.block_count * BS == len(data) and rec.header.block_size == BS
        assert rec.data == data
        assert r.read_at(rec.offset) == rec
        if compress == "none":
            assert rec.header.compression == "none"
    if compress == "zstd":  # zeros compressed, random stored raw
        assert {x.header.compression for x in body} == {"none", "zstd"}
    end = recs[-1].json()
    assert end == {"records": len(runs) + 1, "bytes": recs[-1].offset}
    assert os.path.getsize(p) == recs[-1].offset + recs[-1].header.record_len
    # header-only scan for index rebuilding sees the same headers
    assert [x.header for x in r.scan(payloads=False)] == [x.header for x in recs]
    r.close()


def test_bytes_written_and_metadata_records(tmp_path: Path) -> None:
    p = tmp_path / "s"
    w = RecordWriter.create(p, compress="zstd", threads=2)
    f1 = w.write_record(Kind.META, b'{"inodes": []}' * 100)
    f2 = w.write_record(Kind.INDEX, b"\x01" * 1000, disk_id=2, compress=False)
    total = w.close()
    assert total == os.path.getsize(p) == w.bytes_written
    with RecordReader(p) as r:
        recs = list(r.scan())
    assert [x.kind for x in recs] == [Kind.LABEL, Kind.META, Kind.INDEX, Kind.END]
    assert recs[1].offset == f1.result().offset and recs[1].data == b'{"inodes": []}' * 100
    assert recs[2].header.disk_id == 2 and recs[2].header.compression == "none"
    assert f2.result().stored_len == HEADER_SIZE + 1000
    assert recs[0].json() == {}


def test_mutable_buffer_may_be_reused_after_submit(tmp_path: Path) -> None:
    p = tmp_path / "s"
    buf = bytearray(half_compressible(16 * BS))
    want = bytes(buf)
    with RecordWriter.create(p, compress="zstd", threads=2) as w:
        w.write_blocks(Kind.DATA, 1, 0, 16, buf)
        buf[:] = bytes(len(buf))  # reuse immediately
        w.write_blocks(Kind.DATA, 1, 16, 16, memoryview(buf))
    with RecordReader(p) as r:
        recs = list(r.scan())
    assert recs[1].data == want and recs[2].data == bytes(16 * BS)


def test_file_object_and_pipe(tmp_path: Path) -> None:
    bio = io.BytesIO()
    # BytesIO has no fileno: the writer uses write()
    w = RecordWriter(bio, medium="bytesio", compress="zstd", threads=1)
    w.write_blocks(Kind.DATA, 0, 0, 2, half_compressible(2 * BS))
    w.close()
    raw = bio.getvalue()
    # read it back through a pipe (no pread: sequential reads)
    rfd, wfd = os.pipe()

    def feed() -> None:
        os.write(wfd, raw)
        os.close(wfd)

    t = threading.Thread(target=feed)
    t.start()
    try:
        recs = list(RecordReader(rfd, "pipe").scan(chunk_size=1000))
    finally:
        t.join()
        os.close(rfd)
    assert [x.kind for x in recs] == [Kind.LABEL, Kind.DATA, Kind.END]
    assert recs[1].data == half_compressible(2 * BS)


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with RecordWriter.create(tmp_path / "s") as w:
        with pytest.raises(ValueError):
            w.write_blocks(Kind.META, 0, 0, 1, bytes(BS))
        with pytest.raises(ValueError):
            w.write_blocks(Kind.DATA, 0, 0, 3, bytes(BS))
        with pytest.raises(ValueError):
            w.write_blocks(Kind.DATA, 1 << 32, 0, 1, bytes(BS))
        with pytest.raises(ValueError):
            w.write_blocks(Kind.DATA, 0, (1 << 64) - 1, 2, bytes(2 * BS))
        with pytest.raises(ValueError):
            w.write_record(Kind.DATA, b"")
        with pytest.raises(ValueError, match="power of two"):
            w.write_blocks(Kind.DATA, 0, 0, 2, bytes(3000))


def test_header_layout_matches_the_document() -> None:
    h = RecordHeader(
        kind=Kind.BI,
        flags=FLAG_BLOCKS,
        disk_id=0x01020304,
        start_block=0x1122334455667788,
        block_count=9,
        logical_time=0xA0B0C0D0E0F0,
        seq=77,
        payload_len=9 * 512,
        raw_len=9 * 512,
        payload_checksum=0xDEADBEEFCAFEF00D,
    )
    b = encode_header(h)
    assert len(b) == HEADER_SIZE == 64
    expect = {
        "magic": MAGIC,
        "version": 1,
        "kind": 2,
        "flags": 4,
        "disk_id": 0x01020304,
        "block_count": 9,
        "start_block": 0x1122334455667788,
        "logical_time": 0xA0B0C0D0E0F0,
        "seq": 77,
        "payload_len": 4608,
        "raw_len": 4608,
        "payload_checksum": 0xDEADBEEFCAFEF00D,
        "header_checksum": xxhash.xxh3_64_intdigest(b[:56]),
    }
    assert {name: get_field(b, name) for name in FIELDS} == expect
    assert decode_header(b, medium=MEDIUM, offset=0) == h
    assert h.block_size == 512 and h.end_block == 0x1122334455667788 + 9


# --- every header field damaged ----------------------------------------------------------

# What the error must name when one field of a stored header is damaged (a bit flip):
# the header checksum catches every field except the two checked before it.
FLIP_EXPECT = {name: "header checksum mismatch" for name in FIELDS}
FLIP_EXPECT["magic"] = "bad magic"
FLIP_EXPECT["version"] = "unsupported record format version"


@pytest.mark.parametrize("name", list(FIELDS))
@pytest.mark.parametrize("bit", [0, 7])
def test_flipped_header_field(stream: tuple[Path, list[int]], name: str, bit: int) -> None:
    path, offsets = stream
    at = offsets[1]  # the second DATA record: a non-zero offset
    buf = bytearray(path.read_bytes())
    off, fmt = FIELDS[name]
    buf[at + off + struct.calcsize(fmt) - 1] ^= 1 << bit  # flip a bit in the field
    path.write_bytes(buf)
    for read in (
        lambda r: r.read_at(at),
        lambda r: list(r.scan()),
    ):
        with RecordReader(path, MEDIUM) as r, pytest.raises(CorruptError) as ei:
            read(r)
        msg = str(ei.value)
        assert FLIP_EXPECT[name] in msg
        assert MEDIUM in msg and f"offset {at}" in msg


# Damage that passes the header checksum (a buggy or hostile writer): each field's own
# check must catch it, and say what is wrong.
FORGED: list[tuple[str, int | bytes, str]] = [
    ("magic", b"SDBX", "bad magic b'SDBX'"),
    ("version", 2, "unsupported record format version 2 (this sdbackup reads version 1"),
    ("version", 0, "unsupported record format version 0"),
    ("kind", 9, "unknown record kind 9"),
    ("kind", 0, "unknown record kind 0"),
    ("kind", int(Kind.META), "META record with the BLOCKS flag"),
    ("kind", int(Kind.LABEL), "LABEL record with the BLOCKS flag"),
    ("flags", 0x80 | FLAG_BLOCKS, "reserved flag bits set in flags 0x84"),
    ("flags", 0x03 | FLAG_BLOCKS, "unknown compression 3"),
    ("flags", 0x00, "DATA record without the BLOCKS flag"),
    ("flags", 0x01 | FLAG_BLOCKS, "impossible lengths: zstd payload length"),
    ("block_count", 0, "DATA record with block count 0"),
    ("block_count", 5, "not a whole number of blocks for block count 5"),
    ("block_count", 4, "makes blocks of 3072 bytes"),
    ("start_block", (1 << 64) - 1, "runs past block 2**64"),
    ("payload_len", 5, "impossible lengths: uncompressed payload length 5"),
    ("payload_len", 1 << 30, "a record holds at most"),
    ("raw_len", 3 * BS + 1, "differs from raw length"),
    ("raw_len", 0xFFFFFFFF, "a record holds at most"),
    ("header_checksum", 0, "header checksum mismatch"),
]


@pytest.mark.parametrize(
    ("name", "value", "fragment"), FORGED, ids=[f"{n}={v!r}" for n, v, _ in FORGED]
)
def test_forged_header_field(
    stream: tuple[Path, list[int]], name: str, value: int | bytes, fragment: str
) -> None:
    path, offsets = stream
    at = offsets[0]
    buf = bytearray(path.read_bytes())
    set_field(buf, at, name, value, forge=name != "header_checksum")
    with pytest.raises(CorruptError) as ei:
        decode_header(bytes(buf[at : at + HEADER_SIZE]), medium=MEDIUM, offset=at)
    msg = str(ei.value)
    assert fragment in msg and MEDIUM in msg and f"offset {at}" in msg


def test_forged_payload_checksum_names_disk_block_offset(stream: tuple[Path, list[int]]) -> None:
    path, offsets = stream
    at = offsets[0]
    buf = bytearray(path.read_bytes())
    set_field(buf, at, "payload_checksum", 12345, forge=True)
    path.write_bytes(buf)
    with RecordReader(path, MEDIUM) as r, pytest.raises(CorruptError) as ei:
        r.read_at(at)
    msg = str(ei.value)
    assert "payload checksum mismatch" in msg
    assert "disk 7 blocks 100..102" in msg and f"offset {at}" in msg and MEDIUM in msg


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("seq", 5, "sequence number 5, expected 2"),
        ("seq", 1, "sequence number 1, expected 2"),
        ("kind", int(Kind.LABEL), "LABEL record"),
    ],
)
def test_forged_stream_fields(
    stream: tuple[Path, list[int]], name: str, value: int, fragment: str
) -> None:
    """Fields that only make sense in the stream: the scan checks them."""
    path, offsets = stream
    at = offsets[1]
    buf = bytearray(path.read_bytes())
    set_field(buf, at, name, value, forge=True)
    if name == "kind":
        set_field(buf, at, "flags", 0, forge=False)
        set_field(buf, at, "block_count", 0, forge=False)
        set_field(buf, at, "start_block", 0, forge=False)
        set_field(buf, at, "disk_id", 0, forge=True)
    path.write_bytes(buf)
    with RecordReader(path, MEDIUM) as r, pytest.raises(CorruptError) as ei:
        list(r.scan())
    assert fragment in str(ei.value) and f"offset {at}" in str(ei.value)


def test_stream_level_damage(stream: tuple[Path, list[int]], tmp_path: Path) -> None:
    path, offsets = stream
    good = path.read_bytes()
    # data after END
    path.write_bytes(good + good[:HEADER_SIZE])
    with RecordReader(path, MEDIUM) as r, pytest.raises(CorruptError, match="after the END"):
        list(r.scan())
    # a stream that does not start with LABEL (starts at the first DATA record)
    path.write_bytes(good[offsets[0] :])
    with RecordReader(path, MEDIUM) as r, pytest.raises(CorruptError, match="not LABEL"):
        list(r.scan())
    # END that does not match what precedes it (a record cut out, seqs renumbered)
    buf = bytearray(good[: offsets[1]] + good[offsets[2] :])
    pos = offsets[1]
    while pos < len(buf):
        h = decode_header(bytes(buf[pos : pos + 64]), medium="x", offset=pos)
        set_field(buf, pos, "seq", h.seq - 1, forge=True)
        pos += h.record_len
    path.write_bytes(buf)
    with RecordReader(path, MEDIUM) as r, pytest.raises(CorruptError, match="END record says"):
        list(r.scan())


# --- payload damage ------------------------------------------------------------------------


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_flipped_payload_byte(tmp_path: Path, compress: Compression) -> None:
    p = tmp_path / "s"
    runs = [
        (Kind.DATA, 3, 1000, half_compressible(8 * BS, 1)),
        (Kind.BI, 4, 2000, half_compressible(4 * BS, 2)),
    ]
    offsets = write_stream(p, runs, compress=compress)
    buf = bytearray(p.read_bytes())
    at = offsets[1]
    h = decode_header(bytes(buf[at : at + 64]), medium="x", offset=at)
    assert h.compression == compress
    buf[at + HEADER_SIZE + h.payload_len // 2] ^= 0x10
    p.write_bytes(buf)
    for read in (lambda r: r.read_at(at), lambda r: list(r.scan())):
        with RecordReader(p, MEDIUM) as r, pytest.raises(CorruptError) as ei:
            read(r)
        msg = str(ei.value)
        assert "payload checksum mismatch" in msg
        assert "BI record #2 for disk 4 blocks 2000..2003" in msg
        assert f"offset {at}" in msg and MEDIUM in msg
    # the record before is intact and still readable through the index
    with RecordReader(p, MEDIUM) as r:
        assert r.read_at(offsets[0]).data == runs[0][3]


# --- truncation ------------------------------------------------------------------------------


def test_truncated_stream_at_many_cut_points(tmp_path: Path) -> None:
    p = tmp_path / "s"
    runs = [(Kind.DATA, 1, i * 4, half_compressible(4 * BS, i)) for i in range(3)]
    offsets = write_stream(p, runs, compress="zstd")
    full = p.read_bytes()
    with RecordReader(p) as r:
        recs = list(r.scan())
    starts = [x.offset for x in recs]
    ends = [x.offset + x.header.record_len for x in recs]
    assert starts[1:-1] == offsets
    cuts = {
        5: 0,  # inside the LABEL header
        starts[1]: starts[1],  # right after LABEL: no END
        starts[1] + 10: starts[1],  # inside a header
        starts[1] + HEADER_SIZE: starts[1],  # header complete, no payload
        starts[2] + HEADER_SIZE + 7: starts[2],  # inside a payload
        ends[-2]: ends[-2],  # everything but END
        ends[-2] + 3: ends[-2],  # inside END's header
        len(full) - 1: ends[-2],  # inside END's payload
    }
    for cut, bad_at in cuts.items():
        p.write_bytes(full[:cut])
        with RecordReader(p, MEDIUM) as r:
            seen: list[Record] = []
            with pytest.raises(StreamTruncatedError) as ei:
                seen.extend(r.scan())
            assert f"stream truncated at offset {bad_at}" in str(ei.value), cut
            assert ei.value.offset == bad_at
            assert all(x.offset < bad_at for x in seen)
            assert len(seen) == starts.index(bad_at)  # intact records came out
            with pytest.raises(StreamTruncatedError):
                list(r.scan(payloads=False))
            if bad_at < cut:  # the cut record itself, read through an index
                with pytest.raises(StreamTruncatedError, match="truncated"):
                    r.read_at(bad_at)
    # a crashed log writer: records up to the last whole one are usable
    p.write_bytes(full[: ends[-2]])
    with RecordReader(p, MEDIUM) as r:
        assert len(list(r.scan(require_end=False))) == len(recs) - 1


# --- hostile zstd payloads -----------------------------------------------------------------

_HOSTILE = textwrap.dedent(
    """
    import resource, struct, sys, xxhash
    from sdbackup.errors import CorruptError
    from sdbackup.media.record_format import (
        FLAG_BLOCKS, Kind, RecordHeader, decode_header, encode_header, verify_payload)

    resource.setrlimit(resource.RLIMIT_AS, (256 << 20, 256 << 20))
    RAW = 1 << 20
    MAGIC = struct.pack("<I", 0xFD2FB528)

    def block(last, btype, size, body):
        return struct.pack("<I", last | (btype << 1) | (size << 3))[:3] + body

    rle_bomb = MAGIC + bytes([0x00, 0x38])  # no content size, window 128 KiB
    n = (4 << 30) // (128 << 10)  # 4 GiB of 'A' in RLE blocks
    rle_bomb += b"".join(block(i == n - 1, 1, 128 << 10, b"A") for i in range(n))
    huge_fcs = MAGIC + bytes([0xE0]) + struct.pack("<Q", 1 << 40) + block(1, 0, 4, b"abcd")
    right_fcs_short = MAGIC + bytes([0xE0]) + struct.pack("<Q", RAW) + block(1, 0, 4, b"abcd")
    garbage = MAGIC + bytes([0xE0]) + struct.pack("<Q", RAW) + bytes(range(256)) * 4
    huge_window = MAGIC + bytes([0xC0, 0xF8]) + struct.pack("<Q", RAW)  # window 2**41
    huge_window += block(1, 1, RAW & 0x1FFFFF, b"x")
    # declares the right size but expands to 4 GiB: decoding must stop at 1 MiB
    sized_bomb = MAGIC + bytes([0xC0, 0x38]) + struct.pack("<Q", RAW)
    sized_bomb += b"".join(block(i == n - 1, 1, 128 << 10, b"A") for i in range(n))
    # right size, but it asks for a 2 GiB window: valid zstd, decoded in place (no
    # window buffer when the whole frame and output are at hand), so it is accepted
    window_2g = MAGIC + bytes([0xC0, 0xA8]) + struct.pack("<Q", RAW)
    window_2g += b"".join(block(i == 7, 1, 128 << 10, b"A") for i in range(8))
    not_zstd = b"this is not a zstd frame at all"
    import zstandard
    good = zstandard.ZstdCompressor().compress(b"B" * RAW)
    two_frames = good + good

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, payload in [
        ("rle_bomb", rle_bomb), ("huge_fcs", huge_fcs),
        ("right_fcs_short", right_fcs_short), ("garbage", garbage),
        ("huge_window", huge_window), ("not_zstd", not_zstd), ("two_frames", two_frames),
        ("sized_bomb", sized_bomb),
    ]:
        h = RecordHeader(kind=Kind.DATA, flags=FLAG_BLOCKS | 1, disk_id=9, start_block=64,
                         block_count=RAW // 4096, logical_time=0, seq=3,
                         payload_len=len(payload), raw_len=RAW,
                         payload_checksum=xxhash.xxh3_64_intdigest(payload))
        h = decode_header(encode_header(h), medium="m", offset=4096)  # checksums valid
        try:
            verify_payload(h, payload, "m", 4096)
        except CorruptError as e:
            msg = str(e)
            assert "does not decompress" in msg and "disk 9 blocks 64..319" in msg, msg
            assert "offset 4096" in msg, msg
            print(name, "ok:", msg)
        else:
            sys.exit(f"{name}: no CorruptError")
    h = decode_header(encode_header(RecordHeader(
        kind=Kind.DATA, flags=FLAG_BLOCKS | 1, disk_id=9, start_block=64,
        block_count=RAW // 4096, logical_time=0, seq=3, payload_len=len(window_2g),
        raw_len=RAW, payload_checksum=xxhash.xxh3_64_intdigest(window_2g))), medium="m",
        offset=0)
    assert verify_payload(h, window_2g, "m", 0) == b"A" * RAW
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print("peak rss growth KiB", grew)
    assert grew < 64 << 10, grew
    """
)


def test_hostile_zstd_payload_is_bounded_and_corrupt() -> None:
    """Payloads whose checksum is valid (forged) but whose zstd frame claims 1 TiB,
    expands to 4 GiB (with or without declaring 1 MiB) or is garbage: each is a
    CorruptError, and
    memory stays bounded (the process runs under a 256 MiB address-space limit)."""
    res = subprocess.run(
        [sys.executable, "-c", _HOSTILE], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count(" ok: ") == 8, res.stdout


# --- a full medium ----------------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, mounted for the test and unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize(("compress", "threads"), [("none", None), ("zstd", 2)])
def test_full_medium_raises_no_space(
    tiny_fs: Path, compress: Compression, threads: int | None
) -> None:
    path = tiny_fs / "stream"
    rng = random.Random(5)
    futs = []
    with (
        pytest.raises(NoSpaceError) as ei,
        RecordWriter.create(
            path,
            label={"stream": 1},
            compress=compress,
            threads=threads,
        ) as w,
    ):
        for i in range(100):  # 100 x 64 KiB incompressible > 1 MiB
            futs.append(w.write_blocks(Kind.DATA, 1, i * 16, 16, rng.randbytes(16 * BS)))
    msg = str(ei.value)
    assert f"the file system holding {path} is full" in msg
    assert 0 < len(futs) < 100
    assert all(f.done() for f in futs)
    # pipelined records still queued when the medium filled up fail with it too
    assert all(isinstance(f.exception(), NoSpaceError) for f in futs if f.exception())
    assert futs[0].exception() is None  # the first records did reach the medium
    # the unfinished stream is recognised as such
    with RecordReader(path, "tiny") as r, pytest.raises(StreamTruncatedError):
        list(r.scan())
    # a closed writer refuses more records
    w2 = RecordWriter(io.BytesIO())
    w2.close()
    with pytest.raises(ValueError, match="closed"):
        w2.write_blocks(Kind.DATA, 0, 0, 1, bytes(BS))


def test_label_must_be_json_object(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with RecordWriter.create(p, label={"a": [1, 2]}):
        pass
    with RecordReader(p) as r:
        assert r.label() == {"a": [1, 2]}
        recs = list(r.scan())
    assert json.loads(recs[-1].data) == {"records": 1, "bytes": recs[-1].offset}
    assert verify_payload(recs[0].header, b'{"a": [1, 2]}', "m", 0) == b'{"a": [1, 2]}'


def test_stream_after_other_bytes_in_append_mode(tmp_path: Path) -> None:
    """Offsets are positions on the medium, also when the stream does not start at 0."""
    p = tmp_path / "s"
    p.write_bytes(b"x" * 1000)
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        w = RecordWriter(fd, compress="zstd", threads=2)
        assert w.start_offset == 1000
        fut = w.write_blocks(Kind.BI, 2, 9, 1, half_compressible(BS), logical_time=41)
        w.close()
    finally:
        os.close(fd)
    loc = fut.result()
    with RecordReader(p, MEDIUM, start=1000) as r:
        rec = r.read_at(loc.offset)
        assert rec.header.logical_time == 41 and rec.data == half_compressible(BS)
        assert [x.offset for x in r.scan()][1] == loc.offset
