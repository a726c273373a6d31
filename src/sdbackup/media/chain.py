"""A generation read through its chain (c.2, Fig. 30-31): one block source.

An incremental holds only the blocks that changed since its parent; the rest of its
T0 image lies in older generations of its chain, back to the full. :class:`ChainReader`
answers ``readinto(disk, block, buf)`` for generation G with, for every block in use
at G's T0, the copy held by the newest generation of G's chain that holds it; blocks
not in use at G's T0 read as zeros, exactly as from a full.

The lookup is built once per disk, on first use: walking the chain newest first, each
generation *owns* the blocks it holds that no newer one holds (set algebra on
compressed bitmaps, in C), restricted to the blocks in use at G's T0. The owned runs of
all generations are sorted into one array, so finding who holds a block is a binary
search (O(log n) in the number of runs) whatever the chain's length; the data is then
read from that generation's records exactly as from a lone generation
(:class:`~sdbackup.media.generation.GenerationReader`, which checks every record).

A full's chain is itself: then every call goes straight to its
:class:`~sdbackup.media.generation.GenerationReader`, nothing more is loaded.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import numpy as np
import numpy.typing as npt

from sdbackup.blocks.blockset import BlockSet
from sdbackup.blocks.source import Buffer
from sdbackup.errors import NotInBackupError, UsageError
from sdbackup.media.generation import Generation, GenerationReader
from sdbackup.media.medium import DiskMedium, Manifest
from sdbackup.media.record_format import Kind
from sdbackup.media.snapshot import SnapshotMeta
from sdbackup.types import DiskId

READ_BATCH = 8 << 20  # bytes per read when streaming a disk (restore-image)


class GenerationSource(Protocol):
    """What restores read a generation through: a lone generation or a chain."""

    @property
    def gen(self) -> Generation: ...

    @property
    def manifest(self) -> Manifest: ...

    @property
    def block_size(self) -> int: ...

    def disk_id(self, disk: str | int) -> DiskId: ...

    def readinto(self, disk: DiskId, block: int, buf: Buffer) -> None: ...

    def read(self, disk: str | int, block: int, count: int) -> bytes: ...

    def records(self, disk: str | int, *, threads: int = 2, ahead: int = 8,
                kind: int = int(Kind.DATA)) -> Iterator[tuple[int, int, bytes]]: ...

    def close(self) -> None: ...


class _Owners:
    """Who holds which blocks of one disk: sorted, disjoint runs and their owner."""

    def __init__(self, starts: npt.NDArray[np.int64], ends: npt.NDArray[np.int64],
                 owner: npt.NDArray[np.int32]) -> None:
        self.starts = starts
        self.ends = ends
        self.owner = owner

    def find(self, block: int, count: int) -> tuple[int, int]:
        """Index range [lo, hi) of the runs that meet blocks [block, block+count)."""
        lo = int(np.searchsorted(self.ends, block, side="right"))
        hi = int(np.searchsorted(self.starts, block + count, side="left"))
        return lo, hi


class ChainReader:
    """Generation ``manifest`` as a block source through its chain (see the module
    docstring). Thread-safe. ``log_medium``: where separate before-image logs that
    were not overlaid are (c.5), for every generation of the chain."""

    def __init__(self, medium: DiskMedium, manifest: Manifest, *,
                 log_medium: str | os.PathLike[str] | None = None,
                 cache_records: int = 16, chain: list[Manifest] | None = None,
                 used: dict[int, BlockSet] | None = None,
                 snapshot: SnapshotMeta | None = None) -> None:
        """``chain``: read through these generations (newest first, ``manifest``
        first) instead of its whole chain: a merge reads two. ``used``: the blocks to
        answer for, per disk, instead of those in use at the generation's T0.
        ``snapshot``: the generation's metadata snapshot, already open (a mount): the
        blocks in use at T0 are read from it, so that nothing on the medium is opened
        after this returns (a prune may remove the generation while it is read)."""
        if chain is None:
            chain = medium.catalog().chain(manifest) if not manifest.is_full else [manifest]
        if chain[0] is not manifest:
            raise ValueError("a chain starts with the generation it reads")
        self.chain = chain
        self.readers: list[GenerationReader] = []
        try:
            for m in chain:
                self.readers.append(GenerationReader(Generation(medium, m),
                                                     cache_records=cache_records,
                                                     log_medium=log_medium))
        except BaseException:
            self.close()
            raise
        self._top = self.readers[0]
        self._used = used
        self._snapshot = snapshot
        self._owners: dict[int, _Owners] = {}
        self._lock = threading.Lock()
        # A group generation made with --meta all lists files whose blocks it does not
        # hold: reading them must fail, never read as zeros (seed, after Fig. 24).
        g = manifest.extra.get("group_spec")
        self.group: str | None = manifest.group
        self._guard = self.group is not None and isinstance(g, dict) \
            and g.get("meta") == "all" and used is None
        self._outside: dict[int, BlockSet] = {}

    @classmethod
    def open(cls, medium_path: str | os.PathLike[str], gen: str | None = None, *,
             log_medium: str | os.PathLike[str] | None = None) -> ChainReader:
        medium = DiskMedium.open(medium_path)
        return cls(medium, medium.resolve(gen), log_medium=log_medium)

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def __enter__(self) -> ChainReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def gen(self) -> Generation:
        return self._top.gen

    @property
    def manifest(self) -> Manifest:
        return self._top.manifest

    @property
    def block_size(self) -> int:
        return self._top.block_size

    @property
    def length(self) -> int:
        """Generations read: 1 for a full."""
        return len(self.readers)

    def disk_id(self, disk: str | int) -> DiskId:
        return self._top.disk_id(disk)

    # -- the lookup -------------------------------------------------------------------------
    def owners(self, disk: DiskId) -> _Owners:
        with self._lock:
            got = self._owners.get(disk)
            if got is None:
                got = self._owners[disk] = self._build(disk)
            return got

    def _build(self, disk: DiskId) -> _Owners:
        if self._used is not None:
            used = self._used.get(disk, BlockSet())
        else:
            used = self.used_blocks(disk)
        covered = BlockSet()
        parts: list[npt.NDArray[np.int64]] = []
        who: list[npt.NDArray[np.int32]] = []
        for i, r in enumerate(self.readers):
            held = BlockSet()
            for kind in (int(Kind.DATA), int(Kind.BI)):
                e = r.index.for_disk(disk, kind)
                if e.size:
                    held |= BlockSet.from_runs(np.stack(
                        [e["start"].astype(np.int64), e["count"].astype(np.int64)], axis=1))
            own = (held & used) - covered
            covered |= held
            runs = own.runs_array()
            if runs.size:
                parts.append(runs)
                who.append(np.full(len(runs), i, dtype=np.int32))
        if not parts:
            z = np.zeros(0, dtype=np.int64)
            return _Owners(z, z, np.zeros(0, dtype=np.int32))
        runs = np.concatenate(parts)
        owner = np.concatenate(who)
        order = np.argsort(runs[:, 0], kind="stable")
        runs, owner = runs[order], owner[order]
        return _Owners(runs[:, 0].copy(), runs[:, 0] + runs[:, 1], owner)

    def used_blocks(self, disk: DiskId) -> BlockSet:
        """The blocks of ``disk`` the generation answers for: those in use at its T0
        (its snapshot's bitmap), or a group generation's block list at T0."""
        return self._from_snapshot(disk)[0]

    def _from_snapshot(self, disk: DiskId) -> tuple[BlockSet, BlockSet]:
        """(blocks answered for, blocks in use at T0 and not answered for)."""
        nblocks = self.manifest.disk_by_id(disk).nblocks
        if self._snapshot is not None:
            snap = self._snapshot
            view = snap.view_blocks(disk, nblocks)
            return view, (snap.used_blocks(disk, nblocks) - view if self._guard
                          else BlockSet())
        with SnapshotMeta(self.gen.meta_file(), f"metadata snapshot of {self.gen.where()}"
                          ) as snap:
            view = snap.view_blocks(disk, nblocks)
            return view, (snap.used_blocks(disk, nblocks) - view if self._guard
                          else BlockSet())

    def outside(self, disk: DiskId) -> BlockSet:
        """Blocks in use at T0 that this (group) generation does not hold."""
        with self._lock:
            got = self._outside.get(disk)
        if got is None:
            got = self._from_snapshot(disk)[1] if self._guard else BlockSet()
            with self._lock:
                self._outside[disk] = got
        return got

    def _check_held(self, disk: DiskId, block: int, count: int) -> None:
        if self._guard and self.outside(disk).intersects_run(block, count):
            raise NotInBackupError(
                f"blocks {block}-{block + count - 1} of disk {self.gen.disk_name(disk)} "
                f"belong to a file outside group {self.group}: generation {self.gen.id} "
                f"is a backup of group {self.group} only and does not hold them")

    # -- the block seam -----------------------------------------------------------------------
    def readinto(self, disk: DiskId, block: int, buf: Buffer) -> None:
        """Fill ``buf`` with blocks of ``disk`` from ``block`` as generation G holds them
        through its chain; zeros for blocks not in use at G's T0. A group generation
        made with ``--meta all`` raises :class:`NotInBackupError` for blocks of files
        outside the group."""
        if self._guard:
            n = memoryview(buf).nbytes // self.block_size
            self._check_held(self._top.disk_id(int(disk)), block, n)
        if len(self.readers) == 1:
            self._top.readinto(disk, block, buf)
            return
        bs = self.block_size
        with memoryview(buf) as mv:
            out = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
            if out.nbytes % bs:
                raise ValueError("buffer is not a whole number of blocks")
            count = out.nbytes // bs
            did = self._top.disk_id(int(disk))
            nb = self.manifest.disk_by_id(did).nblocks
            if block < 0 or block + count > nb:
                raise UsageError(f"block range {block}+{count} is outside disk "
                                 f"{self.gen.disk_name(did)} ({nb} blocks)")
            own = self.owners(did)
            lo, hi = own.find(block, count)
            end = block + count
            pos = block
            for i in range(lo, hi):
                s, e = max(int(own.starts[i]), block), min(int(own.ends[i]), end)
                if s > pos:
                    out[(pos - block) * bs : (s - block) * bs] = bytes((s - pos) * bs)
                self.readers[int(own.owner[i])].readinto(
                    did, s, out[(s - block) * bs : (e - block) * bs])
                pos = e
            if pos < end:
                out[(pos - block) * bs :] = bytes((end - pos) * bs)

    def read(self, disk: str | int, block: int, count: int) -> bytes:
        buf = bytearray(count * self.block_size)
        self.readinto(self.disk_id(disk), block, buf)
        return bytes(buf)

    def records(self, disk: str | int, *, threads: int = 2, ahead: int = 8,
                kind: int = int(Kind.DATA)) -> Iterator[tuple[int, int, bytes]]:
        """The generation's blocks of a disk as (start, count, data): for a full, its
        records in medium order (DATA, then BI, which wins); for a chain, the blocks in
        use at T0 as the chain holds them (all in the DATA pass, each block once, from
        its before image where its owner has one), in the order the records lie on their
        media: a chain on tape is restored in one pass along the tape."""
        if len(self.readers) == 1:
            yield from self._top.records(disk, threads=threads, ahead=ahead, kind=kind)
            return
        if kind != int(Kind.DATA):
            return
        did = self.disk_id(disk)
        plan = self._medium_order_plan(did)
        if not self.gen.medium.streams_local:
            threads = 1  # tape: records are asked for strictly in tape order
        bs = self.block_size
        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="sdb-chainread") as pool:
            pending: collections.deque[tuple[list[tuple[int, int]], int, Future[bytes]]] = \
                collections.deque()
            try:
                for _, i, e, parts in plan:
                    pending.append((parts, int(e["start"]),
                                    pool.submit(self.readers[i]._load, e)))
                    if len(pending) >= ahead:
                        ps, s, f = pending.popleft()
                        data = f.result()
                        for lo, hi in ps:
                            yield lo, hi - lo, data[(lo - s) * bs : (hi - s) * bs]
                while pending:
                    ps, s, f = pending.popleft()
                    data = f.result()
                    for lo, hi in ps:
                        yield lo, hi - lo, data[(lo - s) * bs : (hi - s) * bs]
            finally:
                for _, _, f in pending:
                    f.cancel()

    def _medium_order_plan(self, did: DiskId
                           ) -> list[tuple[tuple[int, ...], int, np.void, list[tuple[int, int]]]]:
        """Every record the chain reads for disk ``did``, with the runs of it that are
        read (each block once: the owner's before image if it has one, else its copy),
        sorted by where the records lie on their media (``DiskMedium.read_position``):
        on tape, one pass from the beginning to the end."""
        own = self.owners(did)
        plan: list[tuple[tuple[int, ...], int, np.void, list[tuple[int, int]]]] = []
        for i, r in enumerate(self.readers):
            mask = own.owner == i
            if not mask.any():
                continue
            mine = BlockSet.from_runs(np.stack(
                [own.starts[mask], own.ends[mask] - own.starts[mask]], axis=1))
            bi_e = r.index.for_disk(did, int(Kind.BI))
            bi = BlockSet.from_runs(np.stack([bi_e["start"].astype(np.int64),
                                              bi_e["count"].astype(np.int64)], axis=1)) \
                if bi_e.size else BlockSet()
            med = r.gen.medium
            for kind, allowed in ((int(Kind.DATA), mine - bi), (int(Kind.BI), mine & bi)):
                runs = allowed.runs_array()
                if not runs.size:
                    continue
                starts = runs[:, 0]
                ends = runs[:, 0] + runs[:, 1]
                for e in r.index.for_disk(did, kind):
                    s, c = int(e["start"]), int(e["count"])
                    lo = int(np.searchsorted(ends, s, side="right"))
                    hi = int(np.searchsorted(starts, s + c, side="left"))
                    parts = [(max(int(starts[j]), s), min(int(ends[j]), s + c))
                             for j in range(lo, hi)]
                    if parts:
                        key = med.read_position(r.manifest, int(e["stream"]),
                                                int(e["offset"]))
                        plan.append((key, i, e, parts))
        plan.sort(key=lambda x: x[0])
        return plan


def open_chain(medium: DiskMedium, manifest: Manifest, *,
               log_medium: str | os.PathLike[str] | None = None
               ) -> tuple[SnapshotMeta, ChainReader]:
    """Generation ``manifest`` opened for reading as a file system: its T0 snapshot
    (the metadata source) and its chain (the block source), which takes the blocks in
    use from that same open snapshot, so that nothing of the generation is opened by
    path afterwards (a prune or merge may remove it while it is read). The caller
    closes both."""
    g = Generation(medium, manifest)
    snap = SnapshotMeta(g.meta_file(), f"metadata snapshot of {g.where()}")
    try:
        return snap, ChainReader(medium, manifest, log_medium=log_medium, snapshot=snap)
    except BaseException:
        snap.close()
        raise
