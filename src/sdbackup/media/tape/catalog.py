"""The disk catalog of tape sets, and a tape set read as a medium.

Layout (``docs/FORMAT.md``, "The disk catalog")::

    CATALOG/<SET_ID>/sdbackup-medium.json          a medium label (medium id = set id)
    CATALOG/<SET_ID>/tapes.json                    the set's tapes: id, sequence, ...
    CATALOG/<SET_ID>/generations/<GEN>/manifest.json   as on the disk medium (LAST)
    CATALOG/<SET_ID>/generations/<GEN>/meta.db          the metadata snapshot at T0
    CATALOG/<SET_ID>/generations/<GEN>/index            (disk, block run) -> (stream, offset)
    CATALOG/<SET_ID>/generations/<GEN>/tape.json        part -> pieces (tape, file, block)

So a tape set's catalog *is* a disk medium without the record streams: the chain
logic, the snapshot and the index work unchanged, and a block is found on tape in two
steps: index → (stream, offset), ``tape.json`` → (tape, file, block). Everything in it
also lies on the tapes (:func:`~.library.rebuild_catalog` rebuilds it from them).
A generation enters the catalog when its manifest part is on tape; its manifest file
is written last here too, so a crash leaves it absent, never half there.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sdbackup.blocks.durable import sync_dir, write_atomic
from sdbackup.errors import CorruptError, NotFoundError, UsageError
from sdbackup.media.medium import (
    GENERATIONS,
    MANIFEST,
    MEDIUM_FORMAT,
    MEDIUM_LABEL,
    MEDIUM_VERSION,
    DiskMedium,
    Manifest,
    iso_utc,
    stream_name,
)
from sdbackup.media.record_format import Record
from sdbackup.media.record_reader import RecordReader
from sdbackup.media.tape.buffer import TapeBlocks, TapeStreamSource
from sdbackup.media.tape.format import Piece, TapeLabel

TAPES = "tapes.json"
PLACEMENT = "tape.json"


def default_catalog() -> Path:
    env = os.environ.get("SDBACKUP_TAPE_CATALOG")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "sdbackup" / "tape-catalog"


class TapeCatalog:
    """The catalog directory: one sub-directory per tape set."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def set_dir(self, set_id: str) -> Path:
        return self.root / set_id

    def sets(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MEDIUM_LABEL).exists())

    def has_set(self, set_id: str) -> bool:
        return (self.set_dir(set_id) / MEDIUM_LABEL).exists()

    def ensure_set(self, label: TapeLabel) -> Path:
        d = self.set_dir(label.set)
        if (d / MEDIUM_LABEL).exists():
            return d
        try:
            (d / GENERATIONS).mkdir(parents=True, exist_ok=True)
            write_atomic(d / MEDIUM_LABEL, (json.dumps({
                "format": MEDIUM_FORMAT, "version": MEDIUM_VERSION, "medium_id": label.set,
                "cluster_id": label.cluster, "created": iso_utc(time.time_ns()),
                "tape_set": label.set}, indent=2) + "\n").encode())
        except OSError as e:
            raise UsageError(f"cannot write the tape catalog {self.root}: {e.strerror}"
                             ) from None
        return d

    def tapes(self, set_id: str) -> dict[str, dict[str, Any]]:
        """The set's tapes by id: ``{sequence, block_size, created, ...}``."""
        p = self.set_dir(set_id) / TAPES
        if not p.exists():
            return {}
        try:
            d = json.loads(p.read_bytes())
        except ValueError:
            raise CorruptError(f"tape catalog {p} is damaged (not JSON): rebuild it with "
                               "'sdbackup tape catalog --rebuild'") from None
        return dict(d)

    def record_tape(self, label: TapeLabel, **extra: Any) -> None:
        d = self.ensure_set(label)
        tapes = self.tapes(label.set)
        tapes[label.tape] = {**tapes.get(label.tape, {}), "sequence": label.sequence,
                             "block_size": label.block_size, "created": label.created,
                             "cluster": label.cluster, **extra}
        write_atomic(d / TAPES, (json.dumps(tapes, indent=2) + "\n").encode())

    def medium(self, set_id: str) -> DiskMedium:
        if not self.has_set(set_id):
            raise NotFoundError(f"the tape catalog {self.root} knows no tape set {set_id}: "
                                "rebuild it from the tapes with 'sdbackup tape catalog "
                                "--rebuild --tape DEV...'")
        return DiskMedium.open(self.set_dir(set_id))

    def generation_ids(self, set_id: str) -> list[str]:
        return [m.id for m in self.medium(set_id).committed()] if self.has_set(set_id) else []

    def placement(self, set_id: str, gen_id: str) -> dict[str, list[Piece]]:
        p = self.set_dir(set_id) / GENERATIONS / gen_id / PLACEMENT
        try:
            d = json.loads(p.read_bytes())
            return {k: [Piece.from_obj(x) for x in v] for k, v in d["parts"].items()}
        except FileNotFoundError:
            raise CorruptError(f"tape catalog: generation {gen_id} has no {PLACEMENT}: "
                               "rebuild with 'sdbackup tape catalog --rebuild'") from None
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptError(f"tape catalog {p} is damaged ({e}): rebuild with "
                               "'sdbackup tape catalog --rebuild'") from None

    def add_generation(self, label: TapeLabel, gen_id: str, files: Mapping[str, bytes | Path],
                       parts: Mapping[str, Sequence[Piece]]) -> None:
        """Enter a generation whose every part is on tape: its index, snapshot and
        placement first, its manifest last (the catalog's commit)."""
        d = self.ensure_set(label) / GENERATIONS / gen_id
        tmp = d.with_name(d.name + ".new")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, src in files.items():
            if name == MANIFEST:
                continue
            if isinstance(src, Path):
                shutil.copyfile(src, tmp / name)
            else:
                (tmp / name).write_bytes(src)
        write_atomic(tmp / PLACEMENT, (json.dumps(
            {"parts": {k: [p.to_obj() for p in v] for k, v in parts.items()}},
            indent=2) + "\n").encode())
        shutil.rmtree(d, ignore_errors=True)
        os.rename(tmp, d)
        man = files[MANIFEST]
        write_atomic(d / MANIFEST, man.read_bytes() if isinstance(man, Path) else man)
        sync_dir(d.parent)


class TapeSetMedium(DiskMedium):
    """A tape set's catalog opened as a medium whose streams are read from tape,
    through ``buffer`` (c.3: the disk buffer of the drives here; c.4: a tape server's,
    :mod:`sdbackup.net.tape`). Generations, chains and snapshots come from the catalog."""

    streams_local = False

    def __init__(self, root: Path, label: Mapping[str, Any], catalog: TapeCatalog,
                 buffer: TapeBlocks) -> None:
        super().__init__(root, label)
        self.catalog_ = catalog
        self.buffer = buffer
        self.set_id = str(label.get("tape_set") or label["medium_id"])
        self._tapes = catalog.tapes(self.set_id)
        self._placements: dict[str, dict[str, list[Piece]]] = {}

    @classmethod
    def open_set(cls, catalog: TapeCatalog, set_id: str, buffer: TapeBlocks) -> TapeSetMedium:
        m = catalog.medium(set_id)
        return cls(m.root, m.label, catalog, buffer)

    def __str__(self) -> str:
        return f"tape set {self.set_id}"

    def _source(self, gen_id: str, part: str, size: int) -> TapeStreamSource:
        pieces = self._placement(gen_id).get(part)
        if not pieces:
            raise CorruptError(f"tape catalog: generation {gen_id} has no {part} on tape "
                               f"set {self.set_id}")
        bs = int(self._tapes.get(pieces[0].tape, {}).get("block_size",
                                                         self.buffer.slot_size))
        return TapeStreamSource(self.buffer, pieces, size, bs,
                                f"{part} of generation {gen_id} on tape set {self.set_id}")

    def open_stream(self, manifest: Manifest, n: int) -> RecordReader:
        # On tape every stream is a part of the generation named stream-N.sdr, parts of
        # a dispersed generation included (the tape writer gathered them).
        src = self._source(manifest.id, stream_name(n), manifest.streams[n].bytes)
        return TapeRecordReader(src)

    def read_position(self, manifest: Manifest, stream: int, offset: int) -> tuple[int, ...]:
        """(tape's number in the set, tape block): reading in this order is one pass."""
        pieces = self._placement(manifest.id).get(stream_name(stream), [])
        for p in pieces:
            if p.offset <= offset < p.offset + p.length:
                bs = int(self._tapes.get(p.tape, {}).get("block_size",
                                                         self.buffer.slot_size))
                return (p.sequence, p.block + (offset - p.offset) // bs)
        return (1 << 62, 0)

    def _placement(self, gen_id: str) -> dict[str, list[Piece]]:
        got = self._placements.get(gen_id)
        if got is None:
            got = self._placements[gen_id] = self.catalog_.placement(self.set_id, gen_id)
        return got

    def check_streams(self, manifest: Manifest) -> None:
        parts = self._placement(manifest.id)
        for n, s in enumerate(manifest.streams):
            pieces = sorted(parts.get(stream_name(n), []), key=lambda p: p.offset)
            at = 0
            for p in pieces:
                if p.offset != at:
                    break
                at += p.length
                # Every tape the generation needs is in a drive, or one error says which.
                self.buffer.check_tape(p.tape)
            if at != s.bytes:
                raise CorruptError(f"generation {manifest.id}: {stream_name(n)} is on tape "
                                   f"set {self.set_id} for {at} of its {s.bytes} bytes only: "
                                   "a tape of the set is missing from the catalog "
                                   "('sdbackup tape catalog --rebuild')")


class TapeRecordReader(RecordReader):
    """A record stream on tape: errors name the tape, file and block of the record."""

    def __init__(self, src: TapeStreamSource) -> None:
        super().__init__(src, medium=src.name)
        self.tape_src = src

    def read_at(self, offset: int) -> Record:
        try:
            return super().read_at(offset)
        except CorruptError as e:
            raise CorruptError(f"{e.message} ({self.tape_src.position(offset)})") from None
