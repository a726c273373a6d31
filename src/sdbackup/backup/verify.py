"""Verify a committed generation: read every byte, check it against everything else.

Checks, in order (each problem is reported; verification goes on with the next part):

1. the manifest (checksum, format, cluster: done when the generation is resolved);
2. the metadata snapshot: size and XXH3 against the manifest, SQLite's quick_check,
   its cluster id, block size and disks against the manifest;
3. the index stream: record checksums, entry count, order, no overlaps, bounds, size and
   digest against the manifest;
4. every record stream, read sequentially: every header and payload checksum, the
   decompression, sequence numbers and END (``RecordReader.scan``), the stream LABEL
   (cluster, generation, stream number), size, record count and header digest against
   the manifest, and every DATA record against its index entry (same offset, disk,
   blocks, kind) and vice versa;
5. coverage: the blocks the index holds, per disk, are exactly the used blocks of the
   snapshot's allocation bitmap at T0, and the manifest's counts.

A damaged record is reported with the generation, the disk and blocks it holds (from its
index entry when its header cannot be trusted) and its offset on the medium.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdbackup.blocks.blockset import BlockSet
from sdbackup.errors import CorruptError, SdbError
from sdbackup.media.generation import Generation, external_log
from sdbackup.media.index import BlockIndex, Entries
from sdbackup.media.medium import Manifest
from sdbackup.media.record_format import Kind
from sdbackup.media.record_reader import RecordReader
from sdbackup.media.record_scan import StreamDigest
from sdbackup.media.snapshot import SnapshotMeta


@dataclass
class VerifyReport:
    generation: str
    problems: list[str] = field(default_factory=list)
    records: int = 0
    blocks: int = 0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        return {"generation": self.generation, "ok": self.ok, "problems": self.problems,
                "records": self.records, "blocks": self.blocks, "bytes": self.bytes}


def verify_generation(gen: Generation, progress: Callable[[int], None] | None = None,
                      log_medium: str | os.PathLike[str] | None = None) -> VerifyReport:
    """Verify everything (see the module docstring); a generation whose before-image
    log is still on a separate log medium (not overlaid) needs that log too: it is read
    and checked as every stream is, and missing it is a problem."""
    rep = VerifyReport(gen.id)
    m = gen.manifest
    tag = f"generation {gen.id}"
    used: dict[int, BlockSet] | None = None

    # -- the metadata snapshot -------------------------------------------------------
    try:
        path = gen.meta_file()
        with SnapshotMeta(path, tag) as snap:
            bad = snap.quick_check()
            if bad:
                rep.problems.append(f"{tag}: metadata snapshot fails SQLite's check: {bad[0]}")
            if snap.get_meta("cluster_id") != m.cluster_id:
                rep.problems.append(f"{tag}: metadata snapshot belongs to cluster "
                                    f"{snap.get_meta('cluster_id')}, not {m.cluster_id}")
            if snap.get_meta("block_size") != str(m.block_size):
                rep.problems.append(f"{tag}: metadata snapshot has block size "
                                    f"{snap.get_meta('block_size')}, the manifest "
                                    f"{m.block_size}")
            gi = snap.group_info()
            if (gi or {}).get("name") != m.group:
                rep.problems.append(f"{tag}: metadata snapshot is of group "
                                    f"{(gi or {}).get('name')}, the manifest of {m.group}")
            have = [(i, n, nb) for i, n, nb, _ in snap.disks()]
            want = [(d.id, d.name, d.nblocks) for d in m.disks]
            if have != want:
                rep.problems.append(f"{tag}: metadata snapshot lists disks {have}, the "
                                    f"manifest {want}")
            else:
                used = {d.id: snap.view_blocks(d.id, d.nblocks) for d in m.disks}
    except SdbError as err:
        rep.problems.append(err.message if tag in err.message else f"{tag}: {err.message}")

    # -- the index -------------------------------------------------------------------
    index: BlockIndex | None = None
    try:
        index = gen.index()
    except SdbError as err:
        rep.problems.append(err.message if tag in err.message else f"{tag}: {err.message}")

    # -- the streams -----------------------------------------------------------------
    for n in range(len(m.streams)):
        _verify_stream(gen, n, index, rep, progress)

    # -- a separate before-image log, not overlaid yet -------------------------------
    try:
        ext = external_log(gen, log_medium)
    except SdbError as err:
        rep.problems.append(err.message)
    else:
        if ext is not None:
            verify_log_file(gen, ext, rep, progress)

    # -- the chain (incrementals) -----------------------------------------------------
    ancestors: list[Generation] | None = None
    marked = False  # a mark (a.11) leaves blocks changed before it out, on purpose
    if not m.is_full:
        try:
            chain = gen.medium.catalog().chain(m)
            ancestors = [Generation(gen.medium, a) for a in chain[1:]]
            marked = any(cut_by_mark(c) for c in chain)
        except SdbError as err:
            rep.problems.append(err.message if tag in err.message else f"{tag}: {err.message}")

    # -- coverage --------------------------------------------------------------------
    if index is not None:
        for d in m.disks:
            # DATA and before images together hold the T0 image (an inline copy skips
            # blocks whose before images were logged first).
            de = np.concatenate([index.for_disk(d.id), index.for_disk(d.id, int(Kind.BI))])
            have_set = BlockSet.from_runs(np.stack([de["start"].astype(np.int64),
                                                    de["count"].astype(np.int64)], axis=1))
            if len(have_set) != d.blocks:
                rep.problems.append(f"{tag}: the index holds {len(have_set)} blocks of disk "
                                    f"{d.name}, the manifest says {d.blocks}")
            if used is not None and not m.is_full:
                # An incremental holds the changed blocks in use at T0; its chain, the rest.
                extra = have_set - used[d.id]
                if extra and not m.extra.get("kept_for_later"):
                    rep.problems.append(f"{tag}: disk {d.name}: {len(extra)} blocks stored "
                                        f"that were not in use at T0 ({extra!r})")
                if ancestors is not None:
                    held = have_set.copy()
                    for a in ancestors:
                        held |= _held(a, d.id)
                    missing = used[d.id] - held
                    if missing and not marked:
                        rep.problems.append(
                            f"{tag}: disk {d.name}: {len(missing)} blocks in use at T0 are in "
                            f"no generation of its chain ({missing!r})")
            elif used is not None and have_set != used[d.id]:
                missing = used[d.id] - have_set
                extra = have_set - used[d.id]
                # A synthetic full of a chain a mark cut may lack blocks (on purpose) and
                # hold blocks a later generation of it reads (kept by the merge).
                if (not missing or cut_by_mark(m)) and \
                        (not extra or m.extra.get("kept_for_later")):
                    continue  # a synthetic full of a chain a mark cut: on purpose
                rep.problems.append(
                    f"{tag}: disk {d.name}: the generation does not hold exactly the blocks "
                    f"used at T0: {len(missing)} used blocks missing ({missing!r}), "
                    f"{len(extra)} unused blocks stored ({extra!r})")
    return rep


def cut_by_mark(m: Manifest) -> bool:
    """A mark (a.11) left changes out of ``m`` (or of what a merge made it from)."""
    t = m.extra.get("tracking")
    return bool(m.extra.get("marks_in_chain")) or (isinstance(t, dict) and bool(t.get("mark")))


def _held(gen: Generation, disk: int) -> BlockSet:
    """The blocks of ``disk`` a generation holds (DATA and before images)."""
    idx = gen.index()
    de = np.concatenate([idx.for_disk(disk), idx.for_disk(disk, int(Kind.BI))])
    return BlockSet.from_runs(np.stack([de["start"].astype(np.int64),
                                        de["count"].astype(np.int64)], axis=1))


def _verify_stream(gen: Generation, n: int, index: BlockIndex | None, rep: VerifyReport,
                   progress: Callable[[int], None] | None) -> None:
    m = gen.manifest
    s = m.streams[n]
    path = gen.stream_path(n)
    tag = f"generation {gen.id}"
    ents: Entries | None = None
    if index is not None:
        e = index.entries
        ents = e[e["stream"] == n]
        ents = ents[np.argsort(ents["offset"], kind="stable")]
    rows: list[tuple[int, int, int, int, int]] = []
    digest = StreamDigest()
    pos = 0
    records = 0
    try:
        reader = RecordReader(path, medium=str(path))
    except FileNotFoundError:
        rep.problems.append(f"{tag}: stream {path} is missing")
        return
    try:
        with reader:
            for rec in reader.scan():
                h = rec.header
                digest.update(h)
                records += 1
                if rec.kind == Kind.LABEL:
                    lab = rec.json()
                    want = {"cluster": m.cluster_id, "generation": gen.id, "stream": n}
                    got = {k: lab.get(k) for k in want}
                    if got != want:
                        rep.problems.append(f"{tag}: stream {path} is labelled {got}, expected "
                                            f"{want}: it belongs to another generation")
                elif rec.kind in (Kind.DATA, Kind.BI):
                    if h.raw_len != h.block_count * m.block_size:
                        rep.problems.append(
                            f"{tag}: {h.describe()} at medium offset {rec.offset} of {path} "
                            f"has blocks of {h.block_size} bytes, the generation "
                            f"{m.block_size}")
                    rows.append((rec.offset, h.disk_id, h.start_block, h.block_count,
                                 int(h.kind)))
                    rep.blocks += h.block_count
                elif rec.kind != Kind.END:
                    rep.problems.append(f"{tag}: unexpected {rec.kind.name} record at medium "
                                        f"offset {rec.offset} of {path}")
                pos = rec.offset + h.record_len
                rep.bytes += h.record_len
                if progress is not None:
                    progress(h.record_len)
    except CorruptError as err:
        rep.problems.append(_name_failure(gen, n, ents, pos, err))
        if ents is not None:
            lost = ents[ents["offset"] > pos]
            if lost.size:
                rep.problems.append(
                    f"{tag}: {int(lost['count'].sum())} more blocks in {lost.size} records "
                    f"after medium offset {pos} of {path} could not be verified")
        return
    rep.records += records
    if (pos, records, digest.intdigest()) != (s.bytes, s.records, s.digest):
        rep.problems.append(
            f"{tag}: stream {path} has {pos} bytes, {records} records, digest "
            f"{digest.intdigest():016x}; the manifest says {s.bytes}, {s.records}, "
            f"{s.digest:016x}")
    if ents is not None:
        got_rows = np.array(rows, dtype=np.int64).reshape(-1, 5)
        want_rows = np.stack([ents["offset"].astype(np.int64), ents["disk"].astype(np.int64),
                         ents["start"].astype(np.int64), ents["count"].astype(np.int64),
                         ents["kind"].astype(np.int64)], axis=1)
        if got_rows.shape != want_rows.shape or not np.array_equal(got_rows, want_rows):
            rep.problems.append(f"{tag}: the index entries of stream {path} do not match "
                                f"its records ({want_rows.shape[0]} entries, "
                                f"{got_rows.shape[0]} block records)")


def _name_failure(gen: Generation, n: int, ents: Entries | None, offset: int,
                  err: CorruptError) -> str:
    """The failure of the record at ``offset``, named by disk and blocks from the index
    (the record's own header may be what is damaged)."""
    tag = f"generation {gen.id}"
    path = gen.stream_path(n)
    if ents is not None:
        hit = ents[ents["offset"] == offset]
        if hit.size:
            e = hit[0]
            s, c = int(e["start"]), int(e["count"])
            try:
                name = gen.disk_name(int(e["disk"]))
            except CorruptError:
                name = f"id {int(e['disk'])}"
            return (f"{tag}: disk {name} blocks {s}..{s + c - 1} at medium offset {offset} "
                    f"of {path}: {err.message}")
    return f"{tag}: medium offset {offset} of {path} (no data record indexed there): " \
           f"{err.message}"


def verify_log_file(gen: Generation, path: Path, rep: VerifyReport,
                    progress: Callable[[int], None] | None = None) -> None:
    """Read a separate before-image log whole: every record checksum, only BI records
    of this generation's disks and block size, its END, and its size and digest as the
    manifest recorded them."""
    m = gen.manifest
    tag = f"generation {gen.id}"
    log = m.extra.get("log")
    want = (int(log.get("bytes", -1)), str(log.get("digest"))) if isinstance(log, dict) \
        else (-1, "")
    disks = {d.id for d in m.disks}
    digest = StreamDigest()
    pos = 0
    try:
        with RecordReader(path, medium=str(path)) as reader:
            for rec in reader.scan():
                h = rec.header
                digest.update(h)
                if rec.kind == Kind.BI:
                    if h.disk_id not in disks or h.raw_len != h.block_count * m.block_size:
                        rep.problems.append(f"{tag}: before-image log {path}: {h.describe()} "
                                            f"at offset {rec.offset} does not fit the "
                                            "generation's disks or block size")
                    rep.blocks += h.block_count
                    rep.records += 1
                elif rec.kind not in (Kind.LABEL, Kind.END):
                    rep.problems.append(f"{tag}: before-image log {path}: unexpected "
                                        f"{rec.kind.name} record at offset {rec.offset}")
                pos = rec.offset + h.record_len
                rep.bytes += h.record_len
                if progress is not None:
                    progress(h.record_len)
    except CorruptError as err:
        rep.problems.append(f"{tag}: before-image log {path}, at offset {pos}: {err.message}")
        return
    if (pos, f"{digest.intdigest():016x}") != want:
        rep.problems.append(f"{tag}: before-image log {path} has {pos} bytes, digest "
                            f"{digest.intdigest():016x}; the manifest says {want[0]}, {want[1]}")
