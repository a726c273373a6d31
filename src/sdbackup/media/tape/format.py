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

from sdbackup.errors import CorruptError, NoSpaceError, UsageError
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
        dev.set_block_size(0)
        dev.to_eod()

    def _next_tape(self) -> None:
        """Continue on the next spare drive's tape, labelled as the next of the set."""
        seq = self.label.sequence + 1
        if not self.spares:
            raise NoSpaceError(
                f"{self.label.describe()} is full: give a blank tape for #{seq} of set "
                f"{self.label.set} with one more --tape, and run 'sdbackup tape write' "
                "again (generations already written stay on the set)")
        dev = self.spares.pop(0)
        self.label = self._next_label(dev, seq)
        self.dev = dev
        self.used.append((dev, self.label))
        dev.set_block_size(0)
        dev.to_eod()

    def write_part(self, gen_id: str, part: str, path: Path, size: int) -> list[Piece]:
        """Write the file ``path`` (``size`` bytes) as part ``part`` of ``gen_id``."""
        pieces: list[Piece] = []
        chunks = _spool(path, size, self.bs, self.spool)
        try:
            done = 0
            pending: bytes | None = None
            while True:
                piece = self._start_piece(gen_id, part, done, size)
                start_done = done
                full = False
                while done < size:
                    blk = pending if pending is not None else next(chunks)
                    pending = None
                    try:
                        self.dev.write(blk.ljust(self.bs, b"\0"))
                    except EarlyWarning:
                        pending, full = blk, True
                        break
                    done += len(blk)
                self.dev.write_filemarks(1)
                pieces.append(Piece(self.label.tape, self.label.sequence, piece[0],
                                    piece[1], start_done, done - start_done))
                if not full:
                    return pieces
                self._next_tape()
        finally:
            chunks.close()

    def _start_piece(self, gen_id: str, part: str, offset: int, size: int
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


# -- scanning (catalog rebuild) ----------------------------------------------------------------


@dataclass(frozen=True)
class FoundPiece:
    """A piece found on tape by :func:`scan_tape`."""

    generation: str
    part: str
    part_bytes: int
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
            offset, total = int(obj["offset"]), int(obj["bytes"])
        except (KeyError, ValueError, TypeError) as e:
            raise CorruptError(f"{where}: damaged part header ({e})") from None
        first = st.block + 1
        try:
            dev.space_files(1)
            end = dev.tell() - 1  # the filemark's address
        except EndOfData:
            end = dev.tell()
        nblocks = end - first
        length = min(total - offset, nblocks * label.block_size)
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
