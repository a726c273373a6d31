"""Reading records of a stream: one at an offset (through an index), or all in order.

:class:`RecordReader` opens a stream on a medium; :meth:`RecordReader.read_at` reads
the record an index entry points at, :meth:`RecordReader.scan` the whole stream (the
sequential scanner itself is :mod:`~sdbackup.media.record_scan`). The record layout and
its checks are :mod:`~sdbackup.media.record_format`.

What this module guarantees:

* Every record returned passed every check of
  :func:`~sdbackup.media.record_format.decode_header` and
  :func:`~sdbackup.media.record_format.verify_payload` (header and payload checksums,
  lengths, bounded decompression); otherwise a
  :class:`~sdbackup.errors.CorruptError` names the medium and the offset, and nothing
  is returned.
* :meth:`RecordReader.read_at` checks the header found at the offset it is given: an
  index entry that points off a record boundary is caught (bad magic), and the header
  returned names the disk and block run the record really holds, so a caller catches a
  stale entry by comparing them with the index.
* :meth:`RecordReader.read_header` and :meth:`RecordReader.read_at` use positional
  reads only: one reader may be shared between threads for them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from sdbackup.media.record_format import (
    HEADER_SIZE,
    Kind,
    Record,
    RecordHeader,
    corrupt_record,
    decode_header,
    json_object,
    verify_payload,
)
from sdbackup.media.record_scan import scan_stream

__all__ = ["PositionalSource", "RecordReader"]


@runtime_checkable
class PositionalSource(Protocol):
    """A stream that is not a file: ``pread(n, offset)`` returns up to ``n`` bytes
    from ``offset`` (fewer only at the end), from any thread (a tape through its
    buffer, :class:`~sdbackup.media.tape.buffer.TapeStreamSource`)."""

    def pread(self, n: int, offset: int) -> bytes: ...

    def close(self) -> None: ...


class RecordReader:
    """Reads records from a stream written by
    :class:`~sdbackup.media.record_writer.RecordWriter`.

    ``source`` is a path (opened read-only, closed by :meth:`close`), a descriptor
    (left open) or a :class:`PositionalSource` (closed by :meth:`close`; :meth:`read_at`
    and :meth:`read_header` only). ``medium`` names the medium in error messages
    (default: the path).
    Every read verifies the header and payload checksums; nothing wrong is returned.
    Offsets are positions in the file; a stream is expected at offset 0 (``start``
    otherwise). Safe to share between threads for :meth:`read_at` (positional reads).
    """

    def __init__(
        self,
        source: int | str | os.PathLike[str] | PositionalSource,
        medium: str | None = None,
        *,
        start: int = 0,
    ) -> None:
        self._src: PositionalSource | None = None
        if isinstance(source, PositionalSource):
            self._src = source
            self._fd = -1
            self._owns = False
            default = repr(source)
        elif isinstance(source, int):
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
        if self._src is not None:
            self._src.close()
        if self._owns and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pread(self, n: int, offset: int) -> bytes:
        if self._src is not None:
            return self._src.pread(n, offset)
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
            raise corrupt_record(
                self.medium, self.start, f"stream starts with a {rec.kind.name} record, not LABEL"
            )
        value = json_object(rec, self.medium)
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
        ``require_end``) before END, raises
        :class:`~sdbackup.media.record_format.StreamTruncatedError` after the intact
        records were yielded. With ``payloads=False`` only headers are read and checked
        (payloads are skipped, ``data`` is empty): for rebuilding an index.
        See :func:`~sdbackup.media.record_scan.scan_stream`.
        """
        if self._src is not None:
            raise TypeError("scan() reads a file or descriptor, not a positional source")
        yield from scan_stream(
            self._fd,
            medium=self.medium,
            start=self.start,
            require_end=require_end,
            payloads=payloads,
            chunk_size=chunk_size,
        )
