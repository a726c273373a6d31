"""What sdbackup writes on a tape (``docs/FORMAT.md``, "Tapes"), its writer and scanner.

A tape is a sequence of *tape files* separated by filemarks, each made of blocks of
the tape's block size (256 KiB by default; the last block of a file is padded with
zeros). File 0 is the **label**; every other file is one **piece of a part of a
generation**: its first block is a *part header*, the rest is the part's bytes from the
piece's offset on, verbatim. A generation's parts are its record streams
(``stream-0.sdr``, ``stream-1.sdr``...), its ``index``, its metadata snapshot
``meta.db`` and, last, its ``manifest.json``: a generation is on the tape exactly when
its manifest part is. Label and part headers are tiny record streams (a LABEL record,
JSON, then END), so they carry the record format's checksums. A part that does not fit
continues, from a block boundary, in a new piece on the next tape of the set.

Because the parts are the disk medium's files byte for byte, a stream offset in a
generation's index is also a position on tape: offset ``o`` of a part lies in the
piece with ``offset <= o < offset + length``, in tape block ``block + (o - offset) //
block_size`` (:class:`Piece`). The disk catalog (:mod:`.catalog`) keeps the pieces;
:func:`scan_tape` finds them again from the tape alone.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdbackup.errors import CorruptError, NoSpaceError, SdbError, UsageError
from sdbackup.media.record_format import (
    HEADER_SIZE,
    Kind,
    decode_header,
    encode_record,
    verify_payload,
)
from sdbackup.media.tape.device import (
    EarlyWarning,
    EndOfData,
    TapeDevice,
    TapeError,
)

TAPE_FORMAT = "sdbackup-tape"
TAPE_VERSION = 1
DEFAULT_BLOCK = 256 << 10
SPOOL_BYTES = 64 << 20


# -- tiny self-describing streams (label, part headers) ----------------------------------


def small_stream(obj: dict[str, Any]) -> bytes:
    """A LABEL record holding ``obj`` as JSON, then END: one checked, self-describing
    unit in the record format."""
    h, p = encode_record(0, Kind.LABEL, 0, 0, 0, 0, json.dumps(obj).encode(), False, 0)
    first = h + bytes(p)
    end = json.dumps({"bytes": len(first), "records": 1}).encode()
    h2, p2 = encode_record(1, Kind.END, 0, 0, 0, 0, end, False, 0)
    return first + h2 + bytes(p2)


def parse_small_stream(blob: bytes, where: str) -> dict[str, Any]:
    """The JSON object of a :func:`small_stream` at the start of ``blob``."""
    h = decode_header(blob, medium=where, offset=0)
    if h.kind != Kind.LABEL or h.seq != 0:
        raise CorruptError(f"{where}: starts with a {h.kind.name} record, not LABEL")
    payload = verify_payload(h, blob[HEADER_SIZE : HEADER_SIZE + h.payload_len], where, 0)
    end_at = HEADER_SIZE + h.payload_len
    e = decode_header(blob[end_at:], medium=where, offset=end_at)
    if e.kind != Kind.END:
        raise CorruptError(f"{where}: LABEL is not followed by END")
    try:
        obj = json.loads(payload)
    except ValueError:
        raise CorruptError(f"{where}: LABEL is not JSON") from None
    if not isinstance(obj, dict):
        raise CorruptError(f"{where}: LABEL is not a JSON object")
    return obj


# -- label ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TapeLabel:
    """File 0 of every sdbackup tape."""

    tape: str  # this tape's id
    set: str  # the tape set's id
    cluster: str  # the cluster whose backups the set holds
    sequence: int  # 1, 2, ...: its place in the set
    block_size: int
    created: str

    def to_obj(self) -> dict[str, Any]:
        return {"kind": "tape-label", "format": TAPE_FORMAT, "version": TAPE_VERSION,
                **asdict(self)}

    def describe(self) -> str:
        return f"tape {self.tape} (set {self.set}, #{self.sequence})"


def new_label(cluster: str, *, set_id: str | None = None, sequence: int = 1,
              block_size: int = DEFAULT_BLOCK) -> TapeLabel:
    if block_size < 4096 or block_size & (block_size - 1) or block_size > 8 << 20:
        raise UsageError(f"tape block size {block_size} is not a power of two between "
                         "4 KiB and 8 MiB")
    return TapeLabel(str(uuid.uuid4()), set_id or str(uuid.uuid4()), cluster, sequence,
                     block_size, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def read_label(dev: TapeDevice) -> TapeLabel | None:
    """The label of the tape in ``dev`` (rewinds it); None for a blank tape.

    A tape whose first block is not an sdbackup label is *foreign*: UsageError."""
    dev.set_block_size(0)
    dev.rewind()
    try:
        blob = dev.read(dev.max_block)
    except EndOfData:
        return None
    except TapeError as e:
        raise UsageError(f"the tape in {dev.name} is not an sdbackup tape (block 0 cannot "
                         f"be read as a label: {e.message})") from None
    where = f"the tape in {dev.name}, block 0"
    try:
        obj = parse_small_stream(blob, where)
    except CorruptError as e:
        raise UsageError(f"the tape in {dev.name} is not an sdbackup tape (block 0 is no "
                         f"label: {e.message}); 'sdbackup tape label --force' erases "
                         "it") from None
    if obj.get("format") != TAPE_FORMAT or obj.get("kind") != "tape-label":
        raise UsageError(f"the tape in {dev.name} is not an sdbackup tape (block 0 holds "
                         f"{obj.get('kind')!r})")
    if obj.get("version") != TAPE_VERSION:
        raise CorruptError(f"the tape in {dev.name} has format version "
                           f"{obj.get('version')!r}; this sdbackup reads {TAPE_VERSION}")
    try:
        return TapeLabel(str(obj["tape"]), str(obj["set"]), str(obj["cluster"]),
                         int(obj["sequence"]), int(obj["block_size"]), str(obj["created"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptError(f"{where}: the label is damaged ({e})") from None


def write_label(dev: TapeDevice, label: TapeLabel) -> None:
    """Write ``label`` at BOT: everything on the tape is gone."""
    dev.set_block_size(0)
    dev.rewind()
    dev.write(small_stream(label.to_obj()).ljust(label.block_size, b"\0"))
    dev.write_filemarks(1)


# -- pieces -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Bytes ``offset .. offset + length`` of a part, on tape ``tape`` (sequence
    ``sequence`` of its set), in tape file ``file`` from block ``block`` (the block
    after the part header) on."""

    tape: str
    sequence: int
    file: int
    block: int
    offset: int
    length: int

    def to_obj(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_obj(cls, d: dict[str, Any]) -> Piece:
        return cls(str(d["tape"]), int(d["sequence"]), int(d["file"]), int(d["block"]),
                   int(d["offset"]), int(d["length"]))


def part_names(manifest_streams: int, index_name: str) -> list[str]:
    """The parts of a generation in the order they go on tape (manifest last)."""
    return [f"stream-{i}.sdr" for i in range(manifest_streams)] + \
        [index_name, "meta.db", "manifest.json"]


# -- writing --------------------------------------------------------------------------------


class TapeSetWriter:
    """Appends generations to a tape set, continuing on the next tape when one is full.

    ``dev`` holds the set's last tape (``label``); ``spares`` hold the blank tapes the
    set may continue on, in order (each is labelled by ``next_label``). Each part is
    read from disk by a spooler thread ``spool`` bytes ahead of the drive, so the drive
    is handed blocks as fast as it takes them (streaming, no shoe-shining)."""

    def __init__(self, dev: TapeDevice, label: TapeLabel, spares: Sequence[TapeDevice], *,
                 next_label: Callable[[TapeDevice, int], TapeLabel],
                 spool: int = SPOOL_BYTES) -> None:
        self.dev = dev
        self.label = label
        self.spares = list(spares)
        self._next_label = next_label
        self.spool = spool
        self.bs = label.block_size
        self.used: list[tuple[TapeDevice, TapeLabel]] = [(dev, label)]
        self.full_hint = ("and run 'sdbackup tape write' again (generations already "
                          "written stay on the set)")
        dev.set_block_size(0)
        dev.to_eod()

    def _next_tape(self) -> None:
        """Continue on the next spare drive's tape, labelled as the next of the set."""
        seq = self.label.sequence + 1
        if not self.spares:
            raise NoSpaceError(
                f"{self.label.describe()} in {self.dev.name} is full: give a blank tape "
                f"for #{seq} of set {self.label.set} with one more --tape, "
                f"{self.full_hint}")
        dev = self.spares.pop(0)
        self.label = self._next_label(dev, seq)
        self.dev = dev
        self.used.append((dev, self.label))
        dev.set_block_size(0)
        dev.to_eod()

    def write_part(self, gen_id: str, part: str, path: Path, size: int) -> list[Piece]:
        """Write the file ``path`` (``size`` bytes) as part ``part`` of ``gen_id``."""
        chunks = _spool(path, size, self.bs, self.spool)
        try:
            return self.write_chunks(gen_id, part, chunks, size)
        finally:
            chunks.close()

    def write_chunks(self, gen_id: str, part: str, chunks: Iterator[bytes],
                     size: int | None) -> list[Piece]:
        """Write part ``part`` of ``gen_id`` from ``chunks`` (each one tape block, all
        full but the last). ``size`` is the part's length, or None when it is not known
        before the part is written (a backup streaming straight to tape): its headers
        then say ``"bytes": null`` and the manifest, written last, gives the size."""
        pieces: list[Piece] = []
        done = 0
        # The header goes right before the first block: a spooled part's drive waits
        # for its first burst, not for the header.
        pending: bytes | None = next(chunks, None)
        while True:
            piece = self._start_piece(gen_id, part, done, size)
            start_done = done
            full = False
            while True:
                if pending is None:
                    nxt = next(chunks, None)
                    if nxt is None:
                        break
                    blk = nxt
                else:
                    blk, pending = pending, None
                if len(blk) > self.bs:
                    raise ValueError(f"a chunk of {len(blk)} bytes is larger than a tape "
                                     f"block ({self.bs})")
                try:
                    self.dev.write(blk.ljust(self.bs, b"\0"))
                except EarlyWarning:
                    pending, full = blk, True
                    break
                done += len(blk)
                if len(blk) < self.bs:
                    break  # a short block ends a part
            self.dev.write_filemarks(1)
            pieces.append(Piece(self.label.tape, self.label.sequence, piece[0],
                                piece[1], start_done, done - start_done))
            if not full:
                if size is not None and done != size:
                    raise CorruptError(f"part {part} of generation {gen_id}: {done} bytes "
                                       f"written, {size} expected")
                return pieces
            self._next_tape()

    def _start_piece(self, gen_id: str, part: str, offset: int, size: int | None
                     ) -> tuple[int, int]:
        """Write a part header; (file number, first data block)."""
        for _ in range(2):
            head = small_stream({
                "kind": "tape-part", "format": TAPE_FORMAT, "tape": self.label.tape,
                "set": self.label.set, "sequence": self.label.sequence,
                "generation": gen_id, "part": part, "offset": offset, "bytes": size})
            st = self.dev.status()
            try:
                self.dev.write(head.ljust(self.bs, b"\0"))
            except EarlyWarning:
                self._next_tape()
                continue
            return st.file_number, st.block + 1
        raise NoSpaceError(f"{self.label.describe()}: a new tape is full at once")


def _spool(path: Path, size: int, bs: int, limit: int) -> Generator[bytes, None, None]:
    """The file's bytes in ``bs`` chunks, read by a thread up to ``limit`` bytes ahead."""
    q: queue.Queue[bytes | BaseException | None] = queue.Queue(max(2, limit // bs))
    stop = threading.Event()

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                off = 0
                while off < size and not stop.is_set():
                    b = os.pread(fd, min(bs, size - off), off)
                    if not b:
                        raise CorruptError(f"{path} ends at {off} bytes; {size} expected")
                    q.put(b)
                    off += len(b)
            finally:
                os.close(fd)
            q.put(None)
        except BaseException as e:
            q.put(e)

    t = threading.Thread(target=run, name="sdb-tape-spool", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.01)


class SpooledPart:
    """A part whose length is not known before it ends (a backup's record stream going
    straight to tape, Fig. 36), streamed to tape through a size-bounded disk spool.

    The producer (a :class:`~sdbackup.media.record_writer.RecordWriter`, through
    :meth:`write`) appends to a ring file of ``capacity`` bytes in ``spool_dir`` and
    waits only while it is full; a drive thread takes whole tape blocks from it. The
    drive starts a burst only when the spool is full (or the part has ended) and keeps
    writing until it runs dry: a copy slower than the drive makes the drive stop once
    per spool-full, not once per block (no shoe-shining); a faster one keeps it
    streaming. Errors of the drive (a full tape set, a drive error) reach the producer
    at its next write."""

    def __init__(self, writer: TapeSetWriter, gen_id: str, part: str, spool_dir: Path,
                 capacity: int) -> None:
        import tempfile

        self.writer = writer
        self.gen_id = gen_id
        self.part = part
        self.bs = writer.bs
        self.capacity = max(2, capacity // self.bs) * self.bs
        try:
            spool_dir.mkdir(parents=True, exist_ok=True)
            self._file = tempfile.TemporaryFile(dir=spool_dir, prefix="sdb-spool-")  # noqa: SIM115 (closed by close/abort)
        except OSError as e:
            raise UsageError(f"cannot make a tape spool in {spool_dir}: "
                             f"{e.strerror or e}") from None
        self._fd = self._file.fileno()
        self._head = 0  # bytes put into the spool, ever
        self._tail = 0  # bytes handed to the drive, ever
        self._closed = False
        self._abort = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self.pieces: list[Piece] = []
        self.bursts = 0  # times the drive started writing after the spool filled
        self.producer_waits = 0  # times the copy waited for the drive (spool full)
        self.bytes = 0
        self._thread = threading.Thread(target=self._run, name="sdb-tape-drive",
                                        daemon=True)
        self._thread.start()

    # -- the producer's side -----------------------------------------------------------

    def write(self, data: bytes | memoryview) -> int:
        mv = memoryview(data).cast("B")
        n = mv.nbytes
        while mv.nbytes:
            with self._cond:
                while self._head - self._tail >= self.capacity and self._error is None:
                    self.producer_waits += 1
                    self._cond.wait()
                self._raise_error()
                pos = self._head % self.capacity
                k = min(self.capacity - (self._head - self._tail), self.capacity - pos,
                        mv.nbytes)
            try:
                os.pwrite(self._fd, mv[:k], pos)  # the drive never reads past _head
            except OSError as e:
                raise NoSpaceError(f"the tape spool in {self._file.name} cannot be "
                                   f"written: {e.strerror or e}") from None
            with self._cond:
                self._head += k
                self._cond.notify_all()
            mv = mv[k:]
        self.bytes += n
        return n

    def _raise_error(self) -> None:
        e = self._error
        if e is None:
            return
        if isinstance(e, SdbError):
            try:
                err = type(e)(e.message, e.exit_code)
            except TypeError:
                err = SdbError(e.message, e.exit_code)
            raise err
        raise RuntimeError(f"the tape drive thread failed: {e}") from e

    def close(self) -> list[Piece]:
        """The part has ended: the drive writes what is left, then its filemark.
        Returns the part's pieces."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        self._file.close()
        with self._cond:
            self._raise_error()
        return self.pieces

    def abort(self) -> None:
        """Stop: the drive ends the tape file where it is (the part stays incomplete on
        tape, which a catalog rebuild reports and a later write supersedes)."""
        with self._cond:
            self._abort = self._closed = True
            self._cond.notify_all()
        self._thread.join()
        self._file.close()

    # -- the drive's side -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.pieces = self.writer.write_chunks(self.gen_id, self.part, self._blocks(),
                                                   None)
        except BaseException as e:  # handed to the producer
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def _blocks(self) -> Iterator[bytes]:
        streaming = False
        bs, cap = self.bs, self.capacity
        while True:
            with self._cond:
                while True:
                    avail = self._head - self._tail
                    if self._abort:
                        return
                    if self._closed or (streaming and avail >= bs):
                        break
                    if avail >= cap:
                        streaming = True
                        self.bursts += 1
                        break
                    streaming = False  # ran dry: the drive stops until the spool is full
                    self._cond.wait()
                n = min(bs, avail)
                if n == 0:
                    return
                pos = self._tail % cap
            blk = os.pread(self._fd, n, pos)
            if len(blk) != n:
                raise CorruptError(f"the tape spool {self._file.name} returned {len(blk)} "
                                   f"bytes at {pos}, {n} expected")
            with self._cond:
                self._tail += n
                self._cond.notify_all()
            yield blk


# -- scanning (catalog rebuild) ----------------------------------------------------------------


@dataclass(frozen=True)
class FoundPiece:
    """A piece found on tape by :func:`scan_tape`."""

    generation: str
    part: str
    part_bytes: int | None  # None: not known when the part was written (the manifest says)
    piece: Piece


def scan_tape(dev: TapeDevice, label: TapeLabel) -> Iterator[FoundPiece]:
    """Every piece on the tape, from its part headers alone (one block per tape file,
    then ``MTFSF`` over the rest)."""
    dev.set_block_size(0)
    dev.rewind()
    dev.space_files(1)
    while True:
        st = dev.status()
        try:
            blob = dev.read(dev.max_block)
        except EndOfData:
            return
        if not blob:
            continue  # an empty tape file (a part cut at a header)
        where = f"{label.describe()}, file {st.file_number}, block {st.block}"
        obj = parse_small_stream(blob, where)
        if obj.get("kind") != "tape-part" or obj.get("set") != label.set:
            raise CorruptError(f"{where}: not a part header of this set ({obj.get('kind')})")
        try:
            gen, part = str(obj["generation"]), str(obj["part"])
            offset = int(obj["offset"])
            total = None if obj["bytes"] is None else int(obj["bytes"])
        except (KeyError, ValueError, TypeError) as e:
            raise CorruptError(f"{where}: damaged part header ({e})") from None
        first = st.block + 1
        try:
            dev.space_files(1)
            end = dev.tell() - 1  # the filemark's address
        except EndOfData:
            end = dev.tell()
        nblocks = end - first
        # A part of unknown size: the whole blocks, padding too, until the manifest's
        # size clips it (rebuild_catalog).
        length = nblocks * label.block_size if total is None else \
            min(total - offset, nblocks * label.block_size)
        yield FoundPiece(gen, part, total, Piece(label.tape, label.sequence, st.file_number,
                                                 first, offset, length))


def read_piece(dev: TapeDevice, piece: Piece, block_size: int) -> bytes:
    """The bytes of a piece, read sequentially from its first block."""
    dev.seek(piece.block)
    out: list[bytes] = []
    have = 0
    while have < piece.length:
        b = dev.read(dev.max_block)
        if not b:
            break
        out.append(b)
        have += len(b)
    data = b"".join(out)[: piece.length]
    if len(data) != piece.length:
        raise CorruptError(f"tape {piece.tape} file {piece.file}: {len(data)} bytes from "
                           f"block {piece.block}, {piece.length} expected")
    return data


def write_json(path: Path, obj: Any) -> None:
    from sdbackup.blocks.durable import write_atomic

    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())
