"""Merging two adjacent generations of a chain (seed a.10, Fig. 25).

``merge(O, N)`` — N an incremental whose parent is O — makes one generation M that reads
exactly as N did, through what remains of the chain: per block, N's copy wins over O's
("newer data wins"), and only the blocks in use at N's T0 are kept (nothing after N can
need another: a block in use later and not changed since N's T0 was in use at N's T0;
one changed since is held by a later generation). M takes N's T0, its metadata
snapshot, its change-tracking era and its place in the chain: O a full gives a
synthetic full, O an incremental gives an incremental of O's parent. Before images of
N and O (logged by online backups) are applied on the way, so M needs no log medium.

The data is copied by the same copier as a backup, reading the pair as one block source
(:class:`~sdbackup.media.chain.ChainReader` over [N, O]): coalesced batches of up to
8 MiB, cut into 1 MiB records, compressed in threads; never block by block.

Crash safety. M is written as a new generation directory and committed by its manifest,
which lists ``replaces: [O, N, ...]`` (O, N and whatever they replaced, so that a child
naming any of them finds M once those manifests are gone); only then are O and N
removed. So at every instant the chain reads the same: before M's commit, M does not
exist (``gc`` removes its directory); after it, O and N are hidden (a parent naming N
resolves to M) and ``gc`` removes whatever a crash left of them. Running the same
merge again finishes it too: before M's commit it merges anew; after it, O and N name
M, so it only removes what is left of them (``MergeResult.already``), even once ``gc``
has removed them. M is verified (every record, the coverage of N's T0, its chain)
before it is committed. The medium's chain lock keeps backups, merges and prunes from
interleaving.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

from sdbackup import __version__
from sdbackup.backup.copy import Copier
from sdbackup.backup.verify import cut_by_mark, verify_generation
from sdbackup.blocks.blockset import BlockSet
from sdbackup.blocks.durable import fsync_path, sync_dir
from sdbackup.errors import CorruptError, NotFoundError, UsageError
from sdbackup.media.chain import ChainReader
from sdbackup.media.generation import Generation
from sdbackup.media.index import make_entries, write_index
from sdbackup.media.medium import (
    INDEX,
    META,
    Catalog,
    DiskEntry,
    DiskMedium,
    FileEntry,
    Manifest,
    PendingGeneration,
    file_digest,
    stream_name,
)
from sdbackup.media.record_format import Compression, Kind
from sdbackup.media.record_writer import RecordWriter
from sdbackup.media.snapshot import SnapshotMeta

CRASH_ENV = "SDBACKUP_TEST_CRASH_AT"
CRASH_POINTS = ("merge-mid-copy", "merge-before-commit", "merge-after-commit")


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class MergeResult:
    manifest: Manifest
    older: str
    newer: str
    removed: list[str]
    blocks: int
    read_bytes: int
    seconds: float
    already: bool = False  # a committed merge had made it already (nothing copied)

    def to_dict(self) -> dict[str, object]:
        m = self.manifest
        return {"generation": m.id, "kind": m.kind, "parent": m.parent,
                "replaces": [self.older, self.newer], "removed": self.removed,
                "blocks": self.blocks, "stored_bytes": m.stored_bytes,
                "read_bytes": self.read_bytes, "seconds": round(self.seconds, 3),
                "already_merged": self.already}


def _resolve(medium: DiskMedium, cat: Catalog, name: str) -> str:
    """The generation id ``name`` (an id or a unique prefix) names: one on the medium,
    or one a committed merge replaced and ``gc`` has removed since."""
    try:
        return medium.resolve(name).id
    except NotFoundError:
        gone = [g for g in cat.replaced_by if g == name] or \
            [g for g in cat.replaced_by if g.startswith(name)]
        if len(gone) != 1:
            raise
        return gone[0]


def merge(medium: DiskMedium, older: str, newer: str, *,
          compression: tuple[Compression, int] | None = None,
          log_medium: str | os.PathLike[str] | None = None,
          threads: int | None = None, progress: Callable[[int], None] | None = None,
          locked: bool = False) -> MergeResult:
    """Merge generation ``older`` and its child ``newer`` (ids or unique prefixes) into
    one (see the module docstring). ``locked``: the caller holds the chain lock."""
    if not locked:
        with medium.chain_lock():
            return merge(medium, older, newer, compression=compression,
                         log_medium=log_medium, threads=threads, progress=progress,
                         locked=True)
    started = time.monotonic()
    cat = medium.catalog()
    oid, nid = _resolve(medium, cat, older), _resolve(medium, cat, newer)
    o, n = cat.get(oid), cat.get(nid)
    assert o is not None and n is not None
    if o is n:
        if oid != nid and oid in cat.replaced_by and nid in cat.replaced_by:
            # Merged already (a crash after the commit, or the same merge run twice):
            # finish the job, which is removing what the merge replaced.
            return MergeResult(o, oid, nid, remove_replaced(medium), 0, 0,
                               time.monotonic() - started, already=True)
        raise UsageError("merge needs two different generations")
    if n.is_full or n.parent is None or cat.get(n.parent) is not o:
        raise UsageError(f"generation {n.id} is not an incremental of {o.id}: merge takes two "
                         "adjacent generations of one chain, the older first (see "
                         "'sdbackup generations': the newer one's PARENT is the older one)")
    kids = cat.children(o)
    if kids != [n]:
        raise UsageError(f"generation {o.id} has other incrementals than {n.id} "
                         f"({', '.join(k.id for k in kids if k is not n)}); merge them first")
    cat.chain(n)  # the chain is whole (CorruptError otherwise)
    if compression is None:
        comp: tuple[Compression, int] = (
            ("none", 0) if n.compression == "none"
            else ("zstd", int(n.compression.partition(":")[2] or 1)))
    else:
        comp = compression
    pending = medium.begin()
    try:
        result = _merge(medium, pending, o, n, comp, log_medium, threads, progress, started)
    except BaseException:
        pending.discard()
        raise
    return result


def _merge(medium: DiskMedium, pending: PendingGeneration, o: Manifest, n: Manifest,
           comp: tuple[Compression, int], log_medium: str | os.PathLike[str] | None,
           threads: int | None, progress: Callable[[int], None] | None,
           started: float) -> MergeResult:
    gdir = pending.path
    ngen = Generation(medium, n)
    # N's metadata snapshot is M's: copied, then checked against N's manifest digest.
    shutil.copyfile(ngen.meta_file(), gdir / META)
    fsync_path(gdir / META)
    size, digest = file_digest(gdir / META)
    if (size, digest) != (n.meta.bytes, n.meta.digest):
        raise CorruptError(f"the copy of {ngen.meta_path} differs from it (a failing medium?)")
    label = {"kind": "data", "cluster": n.cluster_id, "generation": pending.id,
             "medium": medium.medium_id, "stream": 0, "block_size": n.block_size}
    keep, beyond = _keep(medium, n)
    with ChainReader(medium, n, chain=[n, o], log_medium=log_medium, used=keep) as pair:
        plan: dict[int, BlockSet] = {}
        for d in n.disks:
            own = pair.owners(pair.disk_id(d.id))
            plan[d.id] = BlockSet.from_runs(
                [(int(s), int(e - s)) for s, e in zip(own.starts, own.ends, strict=True)])
        writer = RecordWriter.create(gdir / stream_name(0), label=label, compress=comp[0],
                                     level=max(comp[1], 1), threads=threads)
        try:
            def after_batch(k: int) -> None:
                if k == 1 and os.environ.get(CRASH_ENV) == "merge-mid-copy":
                    writer.flush(fsync=True)
                    _crash_point("merge-mid-copy")

            copied = Copier(pair, n.block_size, writer, progress=progress,
                            after_batch=after_batch).copy(plan)
            ssize = writer.close()
        except BaseException:
            writer.abort()
            raise
    stream = FileEntry(stream_name(0), ssize, writer.header_digest, writer.records_written)
    entries = make_entries(copied.disk, copied.start, copied.count, copied.offset,
                           [0] * copied.records, [int(Kind.DATA)] * copied.records)
    isize, irecs, idigest = write_index(gdir / INDEX, entries, {
        "cluster": n.cluster_id, "generation": pending.id, "medium": medium.medium_id})
    sync_dir(gdir)
    kind = "synthetic" if o.is_full else "incremental"
    extra = {k: v for k, v in n.extra.items() if k not in ("log", "copy", "writer", "replaces")}
    # M stands for O and N and for everything they stood for: a child naming any of
    # those as its parent must still find M once gc has removed the merged manifests.
    stands_for = list(dict.fromkeys([o.id, n.id, *o.replaces, *n.replaces]))
    extra.update(replaces=stands_for, writer=f"sdbackup {__version__}",
                 marks_in_chain=cut_by_mark(o) or cut_by_mark(n),
                 kept_for_later=beyond,
                 merged={"older": o.id, "newer": n.id, "older_kind": o.kind,
                         "newer_kind": n.kind, "at_ns": time.time_ns()})
    # O's parent as it stands now (a merge may have replaced the one O names).
    op = medium.catalog().get(o.parent) if o.parent is not None else None
    parent = op.id if op is not None else o.parent
    m = Manifest(
        id=pending.id, kind=kind, parent=parent, group=n.group, cluster_id=n.cluster_id,
        medium_id=medium.medium_id, block_size=n.block_size, t0_wall_ns=n.t0_wall_ns,
        t0_logical=n.t0_logical, committed_ns=time.time_ns(),
        disks=tuple(DiskEntry(d.id, d.name, d.nblocks, len(plan[d.id])) for d in n.disks),
        streams=(stream,), index=FileEntry(INDEX, isize, idigest, irecs),
        index_entries=int(entries.size), meta=FileEntry(META, size, digest),
        compression="none" if comp[0] == "none" else f"zstd:{max(comp[1], 1)}",
        freeze_seconds=n.freeze_seconds, copy_seconds=time.monotonic() - started,
        extra=extra)
    _crash_point("merge-before-commit")
    rep = verify_generation(Generation(medium, m))
    if not rep.ok:
        raise CorruptError(f"the merged generation failed verification and was not "
                           f"committed: {rep.problems[0]}")
    pending.commit(m)
    _crash_point("merge-after-commit")
    removed = remove_replaced(medium)
    return MergeResult(m, o.id, n.id, removed, copied.blocks, copied.read_bytes,
                       time.monotonic() - started)


def _keep(medium: DiskMedium, n: Manifest) -> tuple[dict[int, BlockSet], int]:
    """The blocks the merged generation must hold (from N, else O): those in use at
    N's T0, and, when a later generation of the chain was cut by a mark (a.11), those
    in use at its T0 too: it may read them from O (blocks changed between its parent
    and its mark that it does not hold), and a merge must not change what it reads.
    Without marks the second part adds nothing a later generation reads: a block in
    use later and not held by a later generation was in use at N's T0."""
    cat = medium.catalog()
    gens = [n]
    gens += [m for m in cat.current if m is not n and not m.is_full and n in cat.chain(m)
             and cut_by_mark(m)]
    keep: dict[int, BlockSet] = {}
    beyond = 0
    for i, m in enumerate(gens):
        g = Generation(medium, m)
        with SnapshotMeta(g.meta_file(), f"metadata snapshot of {g.where()}") as snap:
            for d in n.disks:
                u = snap.view_blocks(d.id, d.nblocks)
                if i:
                    beyond += len(u - keep[d.id])
                keep[d.id] = keep[d.id] | u if d.id in keep else u
    return keep, beyond


def remove_replaced(medium: DiskMedium) -> list[str]:
    """Remove the generations a committed merge replaced (call with the chain lock)."""
    cat = medium.catalog()
    gone = []
    for m in cat.replaced():
        medium.remove_generation(m.id)
        gone.append(m.id)
    return gone
