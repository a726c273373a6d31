"""The drives given on a command line, and what is done with them: label, write
generations, rebuild the catalog, open a tape set for reading.

Bad media are one clear error each, naming the tape and the drive: a foreign tape
(block 0 is not an sdbackup label), a blank one where a labelled one is needed, a tape
of another cluster or set, a tape of the set that is missing (by its number in the
set), and no labelled tape is ever written over without ``force``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdbackup.errors import CorruptError, NotFoundError, SdbError, UsageError
from sdbackup.media.media_set import part_path
from sdbackup.media.medium import (
    MANIFEST,
    META,
    DiskMedium,
    Manifest,
    stream_name,
)
from sdbackup.media.tape.buffer import DEFAULT_LIMIT, DEFAULT_READAHEAD, TapeBuffer
from sdbackup.media.tape.catalog import TapeCatalog, TapeSetMedium
from sdbackup.media.tape.device import TapeDevice, open_tape
from sdbackup.media.tape.format import (
    DEFAULT_BLOCK,
    FoundPiece,
    Piece,
    TapeLabel,
    TapeSetWriter,
    new_label,
    part_names,
    read_label,
    read_piece,
    scan_tape,
    write_label,
)


class TapeLibrary:
    """The drives named on the command line, each with the label of its tape (None:
    blank). Finds a tape by id for the buffer (:class:`~.buffer.Drives`)."""

    def __init__(self, devices: Sequence[TapeDevice], labels: Sequence[TapeLabel | None]
                 ) -> None:
        self.devices = list(devices)
        self.labels = list(labels)

    @classmethod
    def open(cls, specs: Sequence[str], *, write: bool = False,
             foreign_ok: bool = False) -> TapeLibrary:
        if not specs:
            raise UsageError("give a tape with --tape DEV (file:PATH or /dev/nstN)")
        devs: list[TapeDevice] = []
        labels: list[TapeLabel | None] = []
        try:
            for s in specs:
                d = open_tape(s, write=write)
                devs.append(d)
                try:
                    labels.append(read_label(d))
                except UsageError:
                    if not foreign_ok:
                        raise
                    labels.append(None)
        except BaseException:
            for d in devs:
                d.close()
            raise
        return cls(devs, labels)

    def close(self) -> None:
        for d in self.devices:
            d.close()

    def __enter__(self) -> TapeLibrary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def labelled(self) -> list[tuple[TapeDevice, TapeLabel]]:
        return [(d, lab) for d, lab in zip(self.devices, self.labels, strict=True)
                if lab is not None]

    def the_set(self) -> str:
        """The one tape set of the labelled tapes given."""
        sets = {lab.set for _, lab in self.labelled()}
        if not sets:
            raise UsageError("none of the tapes given (" + ", ".join(
                d.name for d in self.devices) + ") carries an sdbackup label: blank or "
                "foreign tapes hold no backup")
        if len(sets) > 1:
            raise UsageError("the tapes given belong to different tape sets (" + ", ".join(
                f"{d.name}: set {lab.set}" for d, lab in self.labelled()) + "): give the "
                "tapes of one set")
        return sets.pop()

    def device_for(self, tape: str) -> TapeDevice:
        for d, lab in self.labelled():
            if lab.tape == tape:
                return d
        raise NotFoundError(self._missing(tape))

    def _missing(self, tape: str) -> str:
        return (f"tape {tape} is needed and is in none of the drives given (" + ", ".join(
            f"{d.name}: {lab.describe() if lab else 'blank'}"
            for d, lab in zip(self.devices, self.labels, strict=True)) +
            "): insert it and give its drive with --tape")

    def stats(self) -> dict[str, Any]:
        """Emulated or measured drive time and counters, per drive."""
        return {d.name: {"seconds": round(d.clock, 3), "locates": d.stats.locates,
                         "locate_seconds": round(d.stats.locate_seconds, 3),
                         "bytes_read": d.stats.bytes_read,
                         "bytes_written": d.stats.bytes_written,
                         "backhitches": d.stats.backhitches} for d in self.devices}


# -- label -------------------------------------------------------------------------------


def label_tape(lib: TapeLibrary, cluster: str, *, set_id: str | None = None,
               sequence: int = 1, block_size: int = DEFAULT_BLOCK,
               force: bool = False) -> TapeLabel:
    """Label the (first) tape given; a labelled or foreign one only with ``force``."""
    dev, old = lib.devices[0], lib.labels[0]
    if old is not None and not force:
        raise UsageError(f"the tape in {dev.name} is labelled already ({old.describe()}, "
                         f"cluster {old.cluster}); labelling it again erases every backup on "
                         "it: add --force to do so")
    if old is None and not force and _holds_data(dev):
        raise UsageError(f"the tape in {dev.name} holds data that is not sdbackup's; "
                         "labelling it erases that data: add --force to do so")
    lab = new_label(cluster, set_id=set_id, sequence=sequence, block_size=block_size)
    write_label(dev, lab)
    lib.labels[0] = lab
    return lab


def _holds_data(dev: TapeDevice) -> bool:
    from sdbackup.media.tape.device import EndOfData

    dev.set_block_size(0)
    dev.rewind()
    try:
        dev.read(dev.max_block)
    except EndOfData:
        return False
    except SdbError:
        return True
    return True


# -- write -------------------------------------------------------------------------------


@dataclass
class WriteReport:
    set: str = ""
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes: int = 0
    tapes: list[str] = field(default_factory=list)
    drive_seconds: float = 0.0
    wall_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"set": self.set, "written": self.written, "skipped": self.skipped,
                "bytes": self.bytes, "tapes": self.tapes,
                "drive_seconds": round(self.drive_seconds, 3),
                "wall_seconds": round(self.wall_seconds, 3)}


def open_set_writer(lib: TapeLibrary, catalog: TapeCatalog, cluster_id: str, *,
                    force: bool = False, block_size: int = DEFAULT_BLOCK) -> TapeSetWriter:
    """A writer appending to the tape set of ``cluster_id`` in the drives.

    The set's last tape is the labelled tape with the highest number among those
    given (the catalog must not know a higher one); blank tapes given after it are
    where the set continues when it is full. With no labelled tape, the first blank
    one starts a new set. Tapes of another cluster, or foreign ones, are used as blank
    ones only with ``force``."""
    mine = [(d, lab) for d, lab in lib.labelled() if lab.cluster == cluster_id]
    others = [(d, lab) for d, lab in lib.labelled() if lab.cluster != cluster_id]
    if others and not force:
        d, lab = others[0]
        raise UsageError(f"the tape in {d.name} ({lab.describe()}) holds backups of cluster "
                         f"{lab.cluster}, not of {cluster_id}: give another tape "
                         "(or --force to relabel it, erasing it)")
    blanks = [d for d, lab in zip(lib.devices, lib.labels, strict=True) if lab is None]
    if force:
        blanks += [d for d, _ in others]
    if mine:
        sets = {lab.set for _, lab in mine}
        if len(sets) > 1:
            raise UsageError("the tapes given belong to different tape sets: give the "
                             "last tape of one set and blank tapes")
        set_id = sets.pop()
        dev, label = max(mine, key=lambda x: x[1].sequence)
        known = catalog.tapes(set_id)
        top = max((int(t["sequence"]) for t in known.values()), default=0)
        if top > label.sequence:
            tid = next(k for k, v in known.items() if int(v["sequence"]) == top)
            raise NotFoundError(f"tape set {set_id} continues on tape {tid} (#{top}); the "
                                f"last one given is #{label.sequence}: give tape #{top}")
        if label.block_size != block_size and block_size != DEFAULT_BLOCK:
            raise UsageError(f"tape set {set_id} uses blocks of {label.block_size} bytes")
    else:
        if not blanks:
            raise UsageError("no tape to write on: give a blank tape, or a tape of this "
                             "cluster's set")
        dev = blanks.pop(0)
        if not force and _holds_data(dev):
            raise UsageError(f"the tape in {dev.name} holds data that is not sdbackup's: "
                             "add --force to erase it")
        label = new_label(cluster_id, block_size=block_size)
        write_label(dev, label)
    catalog.record_tape(label)
    first = label

    def next_label(d: TapeDevice, seq: int) -> TapeLabel:
        lab = new_label(cluster_id, set_id=first.set, sequence=seq,
                        block_size=first.block_size)
        write_label(d, lab)
        catalog.record_tape(lab)
        return lab

    return TapeSetWriter(dev, label, blanks, next_label=next_label)


def record_eod(catalog: TapeCatalog, w: TapeSetWriter) -> None:
    """Note where each tape written on now ends (its end of data) in the catalog."""
    for d, lab in w.used:
        catalog.record_tape(lab, eod=d.tell())


def write_generations(medium: DiskMedium, gens: Sequence[Manifest], lib: TapeLibrary,
                      catalog: TapeCatalog, *, force: bool = False,
                      block_size: int = DEFAULT_BLOCK,
                      progress: Callable[[int], None] | None = None) -> WriteReport:
    """Append committed generations of ``medium`` to the tape set in the drives
    (:func:`open_set_writer` says which tapes are used). Each generation must be whole
    on disk (its separate log overlaid: the caller does it first, Fig. 38)."""
    import time as _time

    t0 = _time.monotonic()
    rep = WriteReport()
    w = open_set_writer(lib, catalog, medium.cluster_id, force=force, block_size=block_size)
    label = w.label
    rep.set = label.set
    have = set(catalog.generation_ids(label.set))
    for m in gens:
        if m.cluster_id != medium.cluster_id:
            raise UsageError(f"generation {m.id} is of cluster {m.cluster_id}")
        if m.id in have:
            rep.skipped.append(m.id)
            continue
        log = m.extra.get("log")
        if isinstance(log, dict) and log.get("medium") and not log.get("overlaid", True):
            raise UsageError(f"generation {m.id} has a separate before-image log that is "
                             "not overlaid: overlay it first (Fig. 38)")
        gdir = medium.generations_dir / m.id
        # The streams: a dispersed generation's parts may lie elsewhere on the medium,
        # or on its companions (media/media_set.py); on tape each is stream-N.sdr.
        sources = {stream_name(i): part_path(medium, m, i) for i in range(len(m.streams))}
        sizes = {stream_name(i): s.bytes for i, s in enumerate(m.streams)}
        sizes[m.index.name] = m.index.bytes
        sizes[META] = m.meta.bytes
        sizes[MANIFEST] = os.stat(gdir / MANIFEST).st_size
        parts: dict[str, list[Piece]] = {}
        for part in part_names(len(m.streams), m.index.name):
            parts[part] = w.write_part(m.id, part, sources.get(part, gdir / part), sizes[part])
            rep.bytes += sizes[part]
            if progress is not None:
                progress(sizes[part])
        catalog.add_generation(w.label, m.id, {
            m.index.name: gdir / m.index.name, META: gdir / META,
            MANIFEST: gdir / MANIFEST}, parts)
        rep.written.append(m.id)
    record_eod(catalog, w)
    rep.tapes = [lab.tape for _, lab in w.used]
    rep.drive_seconds = sum(d.clock for d in lib.devices)
    rep.wall_seconds = _time.monotonic() - t0
    return rep


# -- rebuild -----------------------------------------------------------------------------


def rebuild_catalog(lib: TapeLibrary, catalog: TapeCatalog) -> dict[str, Any]:
    """Rebuild the catalog of the set in the drives from the tapes alone: every tape
    of the set must be given (a missing number is named)."""
    set_id = lib.the_set()
    tapes = sorted(((d, lab) for d, lab in lib.labelled() if lab.set == set_id),
                   key=lambda x: x[1].sequence)
    seqs = [lab.sequence for _, lab in tapes]
    for want, (_, lab) in enumerate(tapes, start=1):
        if lab.sequence != want:
            raise NotFoundError(f"tape #{want} of set {set_id} is missing (tapes given: "
                                f"#{', #'.join(map(str, seqs))}): give every tape of the set")
    if len(set(seqs)) != len(seqs):
        raise UsageError(f"two tapes given carry the same number in set {set_id}")
    found: dict[str, dict[str, list[FoundPiece]]] = {}
    order: list[str] = []
    for dev, lab in tapes:
        catalog.record_tape(lab)
        for fp in scan_tape(dev, lab):
            g = found.setdefault(fp.generation, {})
            if fp.generation not in order:
                order.append(fp.generation)
            if fp.part.startswith("stream-0") and fp.piece.offset == 0:
                g.clear()  # written again after an interrupted write: the last one counts
            g.setdefault(fp.part, []).append(fp)
        catalog.record_tape(lab, eod=dev.tell())
    byid = {lab.tape: dev for dev, lab in tapes}
    done, incomplete = [], []
    have = set(catalog.generation_ids(set_id))
    for gen in order:
        parts = found[gen]
        man = parts.get(MANIFEST)
        if not man or not _whole(man):
            incomplete.append(gen)
            continue
        man_bytes = _read_part(man, byid, tapes[0][1].block_size)
        m = Manifest.from_json(man_bytes, f"manifest of generation {gen} on tape set {set_id}")
        if m.cluster_id != tapes[0][1].cluster:
            raise CorruptError(f"generation {gen} on tape set {set_id} belongs to cluster "
                               f"{m.cluster_id}, the set to {tapes[0][1].cluster}")
        names = part_names(len(m.streams), m.index.name)
        sizes = {stream_name(i): s.bytes for i, s in enumerate(m.streams)}
        sizes.update({m.index.name: m.index.bytes, META: m.meta.bytes,
                      MANIFEST: len(man_bytes)})
        # Parts streamed to tape while they were written (a backup to tape) have no
        # size in their headers: the manifest gives it, and clips their last piece.
        for n in names:
            if n in parts:
                parts[n] = [_sized(fp, sizes[n], where=f"generation {gen} on tape set "
                                   f"{set_id}") for fp in parts[n]]
        if any(n not in parts or not _whole(parts[n]) for n in names):
            incomplete.append(gen)
            continue
        files: dict[str, bytes | Path] = {
            MANIFEST: man_bytes,
            m.index.name: _read_part(parts[m.index.name], byid, tapes[0][1].block_size),
            META: _read_part(parts[META], byid, tapes[0][1].block_size)}
        catalog.add_generation(tapes[0][1], gen, files,
                               {n: [fp.piece for fp in parts[n]] for n in names})
        done.append(gen)
    return {"set": set_id, "tapes": [lab.tape for _, lab in tapes], "generations": done,
            "incomplete": incomplete, "new": [g for g in done if g not in have]}


def _sized(fp: FoundPiece, size: int, where: str) -> FoundPiece:
    """``fp`` with the part's size the manifest gives (its length clipped to it)."""
    if fp.part_bytes is not None and fp.part_bytes != size:
        raise CorruptError(f"{where}: {fp.part} is {fp.part_bytes} bytes on tape "
                           f"{fp.piece.tape} (file {fp.piece.file}), its manifest says {size}")
    p = fp.piece
    return FoundPiece(fp.generation, fp.part, size,
                      Piece(p.tape, p.sequence, p.file, p.block, p.offset,
                            max(0, min(p.length, size - p.offset))))


def _whole(pieces: list[FoundPiece]) -> bool:
    at = 0
    for fp in sorted(pieces, key=lambda f: f.piece.offset):
        if fp.piece.offset != at:
            return False
        at += fp.piece.length
    return bool(pieces) and pieces[0].part_bytes is not None and at == pieces[0].part_bytes


def _read_part(pieces: list[FoundPiece], byid: dict[str, TapeDevice], bs: int) -> bytes:
    return b"".join(read_piece(byid[fp.piece.tape], fp.piece, bs)
                    for fp in sorted(pieces, key=lambda f: f.piece.offset))


# -- reading -----------------------------------------------------------------------------


@dataclass
class OpenedSet:
    """A tape set opened for reading: the drives, the buffer, the medium over them."""

    lib: TapeLibrary
    buffer: TapeBuffer
    medium: TapeSetMedium

    def close(self) -> None:
        try:
            self.buffer.close()
        finally:
            self.lib.close()

    def __enter__(self) -> OpenedSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_set(specs: Sequence[str], buffer_dir: str | os.PathLike[str], *,
             catalog: TapeCatalog, limit: int = DEFAULT_LIMIT,
             readahead: int = DEFAULT_READAHEAD) -> OpenedSet:
    """The tape set in the drives ``specs``, read through the buffer at ``buffer_dir``."""
    lib = TapeLibrary.open(specs, write=False)
    try:
        set_id = lib.the_set()
        if not catalog.has_set(set_id):
            raise NotFoundError(f"the tape catalog {catalog.root} knows no tape set {set_id} "
                                "(the set of the tapes given): rebuild it from the tapes "
                                "with 'sdbackup tape catalog --rebuild --tape DEV...'")
        bs = next(lab.block_size for _, lab in lib.labelled())
        buf = TapeBuffer(buffer_dir, lib, slot_size=bs, limit=limit, readahead=readahead)
    except BaseException:
        lib.close()
        raise
    try:
        return OpenedSet(lib, buf, TapeSetMedium.open_set(catalog, set_id, buf))
    except BaseException:
        buf.close()
        lib.close()
        raise
