"""Checking a whole record stream, read sequentially from LABEL to END.

A backup's verify, reading an index and rebuilding one, and reading a before-image
log's entries all go through a stream front to back; :func:`scan_stream` does that in
large sequential reads (:meth:`RecordReader.scan
<sdbackup.media.record_reader.RecordReader.scan>` is the usual way in). One record at
a time, through an index, is :mod:`~sdbackup.media.record_reader`.

What this module guarantees:

* Records come out in stream order, each checked by
  :func:`~sdbackup.media.record_format.decode_header` and (unless payloads are
  skipped) :func:`~sdbackup.media.record_format.verify_payload`, and only after those
  checks passed.
* The stream's structure is checked too: LABEL first and only first, sequence numbers
  0, 1, 2, ... without a gap, END's record and byte counts equal to what precedes it,
  nothing after END. A stream cut off inside a record, or (when END is required)
  before END, raises :class:`~sdbackup.media.record_format.StreamTruncatedError`
  whose ``offset`` is where the intact prefix ends, after that prefix was yielded.
* :class:`StreamDigest` recomputes :attr:`RecordWriter.header_digest
  <sdbackup.media.record_writer.RecordWriter.header_digest>` from the scanned headers,
  so a whole stream is compared with its manifest by hashing 64 bytes per record.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import xxhash

from sdbackup.media.record_format import (
    HEADER_SIZE,
    Kind,
    Record,
    RecordHeader,
    StreamTruncatedError,
    corrupt_record,
    decode_header,
    encode_header,
    json_object,
    verify_payload,
)

__all__ = ["StreamDigest", "scan_stream"]


class _Source:
    """Sequential reads from a descriptor in large chunks (pread when it can seek,
    read otherwise), for :func:`scan_stream`."""

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


def scan_stream(
    fd: int,
    *,
    medium: str,
    start: int = 0,
    require_end: bool = True,
    payloads: bool = True,
    chunk_size: int = 8 << 20,
) -> Iterator[Record]:
    """Every record of the stream at ``start`` of ``fd`` in order, from LABEL to END,
    read sequentially (``medium`` names it in error messages).

    Checks as it goes: LABEL first, sequence numbers 0, 1, 2..., END's record and
    byte counts, nothing after END. A stream cut off inside a record, or (with
    ``require_end``) before END, raises
    :class:`~sdbackup.media.record_format.StreamTruncatedError` after the intact
    records were yielded. With ``payloads=False`` only headers are read and checked
    (payloads are skipped, ``data`` is empty): for rebuilding an index.
    """
    src = _Source(fd, start, chunk_size)
    if src.seekable:
        try:
            os.posix_fadvise(fd, start, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass
    offset = start
    seq = 0
    ended = False
    while True:
        raw = src.read(HEADER_SIZE)
        if not raw:
            if not ended and require_end:
                raise StreamTruncatedError(
                    f"stream truncated at offset {offset} on backup medium "
                    f"{medium}: it ends after {seq} records without an END "
                    "record (the writer did not finish: it crashed, was killed, or "
                    "the medium filled up)",
                    offset,
                )
            return
        if ended:
            raise corrupt_record(medium, offset, "data after the END record")
        h = decode_header(raw, medium=medium, offset=offset)
        if (seq == 0) != (h.kind == Kind.LABEL):
            what = (
                f"stream starts with a {h.kind.name} record, not LABEL"
                if seq == 0
                else "a second LABEL record inside the stream"
            )
            raise corrupt_record(medium, offset, what)
        if h.seq != seq:
            raise corrupt_record(
                medium,
                offset,
                f"{h.kind.name} record has sequence number {h.seq}, expected {seq}: "
                "a record is missing, repeated, or from another stream",
            )
        if payloads or h.kind == Kind.END:
            payload = src.read(h.payload_len)
            data = verify_payload(h, payload, medium, offset)
        else:
            got = src.skip(h.payload_len)
            if got < h.payload_len:
                raise StreamTruncatedError(
                    f"stream truncated at offset {offset}: payload of {h.describe()} on "
                    f"backup medium {medium} cut off after {got} of "
                    f"{h.payload_len} bytes",
                    offset,
                )
            data = b""
        rec = Record(offset, h, data)
        if h.kind == Kind.END:
            end = json_object(rec, medium)
            want = {"records": seq, "bytes": offset - start}
            if {k: end.get(k) for k in want} != want:
                raise corrupt_record(
                    medium,
                    offset,
                    f"END record says {end.get('records')} records and "
                    f"{end.get('bytes')} bytes precede it, but {seq} records and "
                    f"{offset - start} bytes do",
                )
            ended = True
        yield rec
        offset += h.record_len
        seq += 1


class StreamDigest:
    """The whole-stream checksum of
    :attr:`~sdbackup.media.record_writer.RecordWriter.header_digest`, recomputed by a
    reader: XXH3-64 over the 64 header bytes of every record, LABEL to END, in order.

    A header's checksum covers its ``payload_checksum``, so this digest covers every
    payload byte too, while hashing only 64 bytes per record. Feed it the header of
    each :class:`~sdbackup.media.record_format.Record` of a scan
    (:func:`scan_stream`, :meth:`RecordReader.scan
    <sdbackup.media.record_reader.RecordReader.scan>`) in order.
    """

    def __init__(self) -> None:
        self._h = xxhash.xxh3_64()

    def update(self, header: RecordHeader) -> None:
        self._h.update(encode_header(header))

    def intdigest(self) -> int:
        return int(self._h.intdigest())
