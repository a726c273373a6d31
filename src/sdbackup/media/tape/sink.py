"""A backup written straight to tape (a.5, Fig. 36): the tape-backed medium writer.

:class:`TapeTarget` opens the drives and the tape set a backup appends to (the set's
last tape, then blank tapes to continue on) and its catalog entry, a disk medium
without streams (:mod:`.catalog`), where the engine keeps the generation it writes:
the metadata snapshot and the index are written there as on a disk medium.
:class:`TapeSink` is what the engine writes the generation through
(:class:`~sdbackup.media.sink.DiskSink` is the disk medium's):

* a record stream goes to tape *while it is written*, as a part whose size is not
  known yet (:class:`~.format.SpooledPart`: a size-bounded disk spool between the
  copy and the drive, so that the drive streams while the copy reads the cluster);
* a finished stream file (the separate before-image log, from the log medium) is
  appended as the next part: the generation's ``stream-1.sdr``, as overlay would make
  it (the index, written after, names its BI records): the tape alone restores T0;
* the commit writes the index, the snapshot and the manifest as the last parts, then
  the placement and, last, the manifest into the catalog.

A set that fills continues on the next blank tape given; with none left the backup
fails naming the full tape, and is not committed (its parts on tape are incomplete:
a rebuild reports them; the next write appends after them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdbackup.blocks.durable import write_atomic
from sdbackup.errors import UsageError
from sdbackup.media.medium import (
    MANIFEST,
    META,
    FileEntry,
    Manifest,
    PendingGeneration,
    stream_name,
)
from sdbackup.media.sink import renamed, stream_file_entry
from sdbackup.media.tape.catalog import PLACEMENT, TapeCatalog
from sdbackup.media.tape.format import DEFAULT_BLOCK, Piece, SpooledPart, TapeSetWriter
from sdbackup.media.tape.library import TapeLibrary, open_set_writer, record_eod

if TYPE_CHECKING:
    from sdbackup.media.record_writer import RecordWriter

DEFAULT_SPOOL = 256 << 20


@dataclass(frozen=True)
class TapeSpec:
    """Where a backup to tape goes: the drives (the set's last tape first, then blank
    ones), the catalog, and the spool (directory, size)."""

    tapes: tuple[str, ...]
    catalog: Path
    spool: Path | None = None  # default: CATALOG/spool
    spool_bytes: int = DEFAULT_SPOOL
    block_size: int = DEFAULT_BLOCK
    force: bool = False


class TapeTarget:
    """The drives and the tape set a backup writes to, opened (see the module
    docstring); ``medium`` is the set's catalog, where the generation is made."""

    def __init__(self, spec: TapeSpec, cluster_id: str) -> None:
        if not spec.tapes:
            raise UsageError("a backup to tape needs --tape DEV (file:PATH or /dev/nstN)")
        self.spec = spec
        self.catalog = TapeCatalog(spec.catalog)
        self.lib = TapeLibrary.open(spec.tapes, write=True, foreign_ok=spec.force)
        try:
            self.writer = open_set_writer(self.lib, self.catalog, cluster_id,
                                          force=spec.force, block_size=spec.block_size)
            self.writer.full_hint = "and run the backup again"
            self.set_id = self.writer.label.set
            self.medium = self.catalog.medium(self.set_id)
            # Drive time and counters from here on are this backup's.
            self.clock0 = sum(d.clock for d in self.lib.devices)
            self.hitches0 = sum(d.stats.backhitches for d in self.lib.devices)
        except BaseException:
            self.lib.close()
            raise

    def sink(self, pending: PendingGeneration) -> TapeSink:
        return TapeSink(self, pending)

    def close(self) -> None:
        try:
            record_eod(self.catalog, self.writer)
        finally:
            self.lib.close()

    def __enter__(self) -> TapeTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TapeSink:
    """A generation written to tape as the engine makes it (see the module docstring)."""

    def __init__(self, target: TapeTarget, pending: PendingGeneration) -> None:
        self.target = target
        self.w: TapeSetWriter = target.writer
        self.pending = pending
        self.path = pending.path
        self.gen_id = pending.id
        self.parts: dict[str, list[Piece]] = {}
        self._open: SpooledPart | None = None
        self.spool_stats: dict[str, int] = {}

    def describe(self) -> dict[str, Any]:
        lib = self.target.lib
        return {"tape": {
            "set": self.target.set_id,
            "tapes": [lab.tape for _, lab in self.w.used],
            "catalog": str(self.target.catalog.root),
            "drive_seconds": round(sum(d.clock for d in lib.devices) - self.target.clock0,
                                   3),
            "backhitches": sum(d.stats.backhitches for d in lib.devices) -
            self.target.hitches0,
            "bytes_written": sum(d.stats.bytes_written for d in lib.devices),
            "spool": self.spool_stats}}

    # -- streams --------------------------------------------------------------------------

    def stream_writer(self, n: int, **kwargs: Any) -> RecordWriter:
        from sdbackup.media.record_writer import RecordWriter

        if self._open is not None:
            raise RuntimeError("one stream at a time goes to tape")
        spec = self.target.spec
        part = stream_name(n)
        self._open = SpooledPart(self.w, self.gen_id, part,
                                 spec.spool or self.target.catalog.root / "spool",
                                 spec.spool_bytes)
        kwargs.setdefault("medium", f"{part} of generation {self.gen_id} on tape set "
                                    f"{self.target.set_id}")
        try:
            return RecordWriter(self._open, **kwargs)
        except BaseException:
            self.abort()
            raise

    def stream_done(self, n: int) -> None:
        sp = self._open
        assert sp is not None
        self._open = None
        self.parts[stream_name(n)] = sp.close()
        self.spool_stats = {"bytes": sp.capacity, "bursts": sp.bursts,
                            "copy_waited": sp.producer_waits}

    def add_stream(self, n: int, src: Path) -> FileEntry:
        entry = renamed(stream_file_entry(src), n)
        self.parts[entry.name] = self.w.write_part(self.gen_id, entry.name, src,
                                                   entry.bytes)
        return entry

    # -- commit ---------------------------------------------------------------------------

    def commit(self, manifest: Manifest) -> None:
        """The index and the snapshot, then the manifest go to tape (a generation is on
        a tape set exactly when its manifest part is); then the placement and the
        manifest into the catalog (its commit)."""
        gdir = self.path
        for name, size in ((manifest.index.name, manifest.index.bytes),
                           (META, manifest.meta.bytes)):
            self.parts[name] = self.w.write_part(self.gen_id, name, gdir / name, size)
        raw = manifest.to_json()
        bs = self.w.bs
        self.parts[MANIFEST] = self.w.write_chunks(
            self.gen_id, MANIFEST, _chunks(raw, bs), len(raw))
        write_atomic(gdir / PLACEMENT, (json.dumps(
            {"parts": {k: [p.to_obj() for p in v] for k, v in self.parts.items()}},
            indent=2) + "\n").encode())
        record_eod(self.target.catalog, self.w)
        self.pending.commit(manifest)

    def abort(self) -> None:
        sp, self._open = self._open, None
        if sp is not None:
            sp.abort()


def _chunks(raw: bytes, bs: int) -> Iterator[bytes]:
    for i in range(0, len(raw), bs):
        yield raw[i:i + bs]


def open_tape_target(spec: TapeSpec, cluster_id: str) -> TapeTarget:
    return TapeTarget(spec, cluster_id)


def absolute_spec(spec: str) -> str:
    """A tape named on a command line, as another process (the coordinator) opens it."""
    from sdbackup.media.tape.device import FILE_PREFIX

    if spec.startswith(FILE_PREFIX):
        return FILE_PREFIX + os.path.abspath(spec[len(FILE_PREFIX):])
    return spec


__all__: Sequence[str] = ("TapeSink", "TapeSpec", "TapeTarget", "absolute_spec",
                          "open_tape_target")
