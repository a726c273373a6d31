"""Incremental backups, marks, merges and prunes against a model of the exact image
every generation must read as (issue 12).

A hypothesis state machine drives the embedded cluster: writes, truncates, creates,
deletes and renames of files, interleaved with full and incremental backups, marks,
merges of adjacent generations and prunes. The model knows, per generation, the disks
as they were at its T0 (read from the disks right after the backup: the embedded
cluster has no other writer) and the blocks in use then; from those alone it decides
what every generation must read as:

* a full, or an incremental with no mark since its parent: exactly the disks at T0,
  on every block in use at T0 (the exact image);
* an incremental after a mark (a.11): the blocks that changed after the mark as at T0;
  every other block as its chain held it before (the newest older generation that
  stored it, or zeros);
* what an incremental stores must lie between the blocks that changed since its base
  (a miss would be data loss) and the blocks in use at T0 (a superset is fine);
* a merge or a prune changes what no remaining generation reads, and the merged
  generation reads as the newer one did.

Every current generation is read back through the real chain reader after each backup,
merge and prune and compared, block by block, with the model; the newest generation's
files are read through the read-only file system and compared with the model's files.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from test_backup_support import make_cluster

from sdbackup.backup.engine import BackupOptions, run_backup
from sdbackup.backup.merge import merge
from sdbackup.backup.prune import Retention, prune
from sdbackup.blocks.blockset import BlockSet
from sdbackup.blocks.source import read_blocks
from sdbackup.cluster.backup_source import LocalClusterSource
from sdbackup.cluster.local import LocalCluster, open_cluster
from sdbackup.errors import FsError
from sdbackup.fs.readonly import ReadOnlyFileSystem
from sdbackup.media.chain import ChainReader
from sdbackup.media.generation import Generation
from sdbackup.media.medium import DiskMedium
from sdbackup.media.record_format import Kind
from sdbackup.media.snapshot import SnapshotMeta
from sdbackup.meta.tracking import TrackingLost
from sdbackup.types import ROOT_INODE, DiskId

BS = 512
OPTS = BackupOptions(compression="none", batch_bytes=8 << 10, record_bytes=2 << 10,
                     gap_bytes=1 << 10)
NAMES = [f"f{i}" for i in range(5)]
Image = dict[int, bytes]  # disk id -> the whole disk's bytes


@dataclass
class Gen:
    """The model of one current generation."""

    id: str
    t0: int  # order of its T0 among all backups
    t0_ns: int
    parent: Gen | None
    used: dict[int, set[int]]
    held: dict[int, set[int]]
    stored: dict[int, dict[int, bytes]]  # what it holds, block by block
    view: dict[int, dict[int, bytes]] = field(default_factory=dict)  # what it reads as
    files: dict[str, bytes] | None = None  # the files at T0, when exact
    cut: bool = False  # a mark left changes out of it or of its chain

    def chain(self) -> list[Gen]:
        out: list[Gen] = [self]
        while out[-1].parent is not None:
            out.append(out[-1].parent)  # type: ignore[arg-type]
        return out


def _read_view(chain: list[Gen], disk: int, b: int) -> bytes:
    for g in chain:
        if b in g.held[disk]:
            return g.stored[disk][b]
    return bytes(BS)


class IncrementalMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="sdb-inc-"))
        cdir = make_cluster(self.tmp / "c", block_size=BS, disks=(256 << 10, 128 << 10))
        self.c: LocalCluster = open_cluster(cdir)
        self.medium_path = self.tmp / "medium"
        self.files: dict[str, bytes] = {}
        self.gens: list[Gen] = []  # current generations, oldest T0 first
        self.backups = 0
        self.mark_image: Image | None = None  # disks at the newest mark after the head
        self.head_image: Image = {}  # disks at the newest generation's T0
        self.marks = 0
        self.disk_ids = [d.id for d in self.c.config.disks]

    def teardown(self) -> None:
        self.c.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the live cluster ---------------------------------------------------------------
    def _ino(self, name: str) -> int:
        return self.c.fs.lookup(ROOT_INODE, name.encode()).ino

    @rule(name=st.sampled_from(NAMES), offset=st.integers(0, 40_000),
          size=st.integers(1, 9_000), seed=st.integers(0, 2**32 - 1))
    def write(self, name: str, offset: int, size: int, seed: int) -> None:
        if name not in self.files:
            self.c.fs.create(ROOT_INODE, name.encode())
            self.files[name] = b""
        data = seed.to_bytes(4, "little") * (size // 4 + 1)
        data = bytes((x + i) & 0xFF for i, x in enumerate(data[:size]))
        try:
            self.c.fs.write(self._ino(name), offset, data)
        except FsError as e:  # the small disks fill up: then nothing changed
            assert e.errno == 28
            return
        old = self.files[name]
        new = bytearray(old.ljust(offset, b"\0") if len(old) < offset else old)
        new[offset : offset + size] = data
        self.files[name] = bytes(new)

    @precondition(lambda self: bool(self.files))
    @rule(data=st.data(), size=st.integers(0, 30_000))
    def truncate(self, data: st.DataObject, size: int) -> None:
        name = data.draw(st.sampled_from(sorted(self.files)))
        self.c.fs.truncate(self._ino(name), size)
        self.files[name] = self.files[name][:size].ljust(size, b"\0")

    @precondition(lambda self: bool(self.files))
    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.files)))
        self.c.fs.unlink(ROOT_INODE, name.encode())
        del self.files[name]

    @precondition(lambda self: bool(self.files))
    @rule(data=st.data(), new=st.sampled_from(NAMES))
    def rename(self, data: st.DataObject, new: str) -> None:
        name = data.draw(st.sampled_from(sorted(self.files)))
        if new == name:
            return
        self.c.fs.rename(ROOT_INODE, name.encode(), ROOT_INODE, new.encode())
        self.files[new] = self.files.pop(name)

    # -- backups ----------------------------------------------------------------------------
    def _disks(self) -> Image:
        return {d: read_blocks(self.c.disks, DiskId(d), 0, self.c.meta.bitmaps[d].nblocks)
                for d in self.disk_ids}

    def _used(self) -> dict[int, set[int]]:
        return {d: {b for s, n in self.c.meta.used_runs(d) for b in range(s, s + n)}
                for d in self.disk_ids}

    def _held(self, gid: str) -> dict[int, set[int]]:
        g = Generation(DiskMedium.open(self.medium_path),
                       DiskMedium.open(self.medium_path).resolve(gid))
        out: dict[int, set[int]] = {}
        for d in self.disk_ids:
            s: set[int] = set()
            for kind in (int(Kind.DATA), int(Kind.BI)):
                for e in g.index().for_disk(d, kind):
                    s.update(range(int(e["start"]), int(e["start"]) + int(e["count"])))
            out[d] = s
        return out

    def _backup(self, incremental: bool) -> None:
        opts = BackupOptions(**{**OPTS.__dict__, "incremental": incremental})
        head = self.gens[-1] if self.gens else None
        if incremental and head is None:
            try:
                run_backup(LocalClusterSource(self.c), self.medium_path, opts)
            except TrackingLost:
                return
            raise AssertionError("an incremental with no generation to follow was taken")
        r = run_backup(LocalClusterSource(self.c), self.medium_path, opts)
        m = r.manifest
        self.backups += 1
        img = self._disks()
        used = self._used()
        held = self._held(m.id)
        parent = head if incremental else None
        assert (m.kind == "incremental") == incremental
        assert m.parent == (parent.id if parent is not None else None)
        stored = {d: {b: img[d][b * BS : (b + 1) * BS] for b in held[d]} for d in held}
        g = Gen(m.id, self.backups, m.t0_wall_ns, parent, used, held, stored)
        for d in self.disk_ids:
            assert held[d] <= used[d], "stored a block that was not in use at T0"
        if parent is None:
            assert held == used, "a full must hold exactly the blocks in use at T0"
        else:
            base = self.mark_image if self.mark_image is not None else self.head_image
            for d in self.disk_ids:
                changed = {b for b in used[d]
                           if img[d][b * BS : (b + 1) * BS] != base[d][b * BS : (b + 1) * BS]}
                assert changed <= held[d], (
                    f"missed changed blocks {sorted(changed - held[d])[:10]} of disk {d}")
        g.cut = (self.mark_image is not None and parent is not None) or \
            (parent is not None and parent.cut)
        chain = g.chain()
        g.view = {d: {b: _read_view(chain, d, b) for b in used[d]} for d in self.disk_ids}
        if not g.cut:
            for d in self.disk_ids:
                for b in used[d]:
                    assert g.view[d][b] == img[d][b * BS : (b + 1) * BS], \
                        f"generation {m.id} would not restore disk {d} block {b} as at T0"
            g.files = dict(self.files)
        self.gens.append(g)
        self.head_image = img
        self.mark_image = None
        self._check_reads()

    @rule()
    def backup_full(self) -> None:
        self._backup(False)

    @rule()
    def backup_incremental(self) -> None:
        self._backup(True)

    @rule()
    def mark(self) -> None:
        self.marks += 1
        self.c.meta.tracker.mark_now(f"m{self.marks}")
        self.mark_image = self._disks()

    # -- merge and prune -------------------------------------------------------------------
    def _merge_model(self, o: Gen, n: Gen, new_id: str) -> Gen:
        later_cut = [g for g in self.gens if g is not n and n in g.chain() and g.cut]
        keep = {d: set(n.used[d]).union(*(g.used[d] for g in later_cut))
                for d in self.disk_ids}
        held = {d: (n.held[d] | o.held[d]) & keep[d] for d in self.disk_ids}
        stored = {d: {b: (n.stored[d][b] if b in n.held[d] else o.stored[d][b])
                      for b in held[d]} for d in self.disk_ids}
        m = Gen(new_id, n.t0, n.t0_ns, o.parent, n.used, held, stored, n.view, n.files,
                n.cut or o.cut)
        for g in self.gens:
            if g.parent is n:
                g.parent = m
        self.gens = [m if g is n else g for g in self.gens if g is not o]
        return m

    @precondition(lambda self: any(g.parent is not None for g in self.gens))
    @rule(data=st.data())
    def merge_pair(self, data: st.DataObject) -> None:
        n = data.draw(st.sampled_from([g for g in self.gens if g.parent is not None]))
        o = n.parent
        assert o is not None
        r = merge(DiskMedium.open(self.medium_path), o.id, n.id)
        assert r.manifest.kind == ("synthetic" if o.parent is None else "incremental")
        m = self._merge_model(o, n, r.manifest.id)
        assert self._held(m.id) == m.held
        self._check_reads()

    @precondition(lambda self: len(self.gens) >= 2)
    @rule(keep=st.integers(1, 3))
    def prune_last(self, keep: int) -> None:
        kept = {g.t0 for g in sorted(self.gens, key=lambda g: g.t0)[-keep:]}
        prune(DiskMedium.open(self.medium_path), Retention(last=keep))
        # the model: dropped generations with a kept descendant merge forward, the rest go
        cat = DiskMedium.open(self.medium_path).catalog()
        real = sorted(cat.current, key=lambda m: m.t0_wall_ns)
        # Oldest dropped generation first, as prune does: a merge's result stands for the
        # newer generation and is itself dropped when that one is.
        while dropped := [g for g in sorted(self.gens, key=lambda g: g.t0) if g.t0 not in kept]:
            g = dropped[0]
            kids = [k for k in self.gens if k.parent is g]
            if kids and any(x.t0 in kept for x in self.gens if g in x.chain() and x is not g):
                self._merge_model(g, kids[0], "")
            else:
                self.gens = [x for x in self.gens if x is not g]
        for g in self.gens:
            if not g.id:  # a merge's result: its id is known only from the medium
                new = [m for m in real if m.t0_wall_ns == g.t0_ns]
                assert len(new) == 1
                g.id = new[0].id
        assert {g.t0 for g in self.gens} == kept
        assert [m.id for m in real] == [g.id for g in sorted(self.gens, key=lambda g: g.t0)]
        self._check_reads()

    # -- checks ---------------------------------------------------------------------------
    def _check_reads(self) -> None:
        med = DiskMedium.open(self.medium_path)
        cur = sorted(med.committed(), key=lambda m: m.t0_wall_ns)
        assert [m.id for m in cur] == [g.id for g in self.gens]
        for g in self.gens:
            chain = g.chain()
            with ChainReader(med, med.resolve(g.id)) as r:
                for d in self.disk_ids:
                    for s, n in BlockSet.from_blocks(sorted(g.used[d])).runs():
                        got = r.read(d, s, n)
                        for i in range(n):
                            b = s + i
                            want = _read_view(chain, d, b)
                            assert want == g.view[d][b], "the model's view moved"
                            assert got[i * BS : (i + 1) * BS] == want, \
                                f"generation {g.id} disk {d} block {b} reads wrong"
        newest = self.gens[-1] if self.gens else None
        if newest is not None and newest.files is not None:
            m = med.resolve(newest.id)
            gen = Generation(med, m)
            with SnapshotMeta(gen.meta_file(), "snapshot") as snap, \
                    ChainReader(med, m) as blocks:
                fs = ReadOnlyFileSystem(snap, blocks)
                names = {e.name.decode() for e in fs.listdir(ROOT_INODE)}
                assert names == set(newest.files)
                for name, content in newest.files.items():
                    a = fs.lookup(ROOT_INODE, name.encode())
                    assert fs.read(a.ino, 0, a.size + 1) == content, name

    @invariant()
    def medium_matches_model(self) -> None:
        if self.medium_path.exists():
            cur = DiskMedium.open(self.medium_path).committed()
            assert len(cur) == len(self.gens)


IncrementalMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestIncrementalModel = IncrementalMachine.TestCase


def test_a_child_finds_its_parent_after_nested_merges(tmp_path: Path) -> None:
    """F <- I1 <- I2 <- I3 <- I4. Merge I2+I3 into M, F+I1 into S, then S+M into S2:
    once the merged-away manifests are gone, I4's parent (I3) must resolve to S2, and
    I4 must read exactly as before (the merge's ``replaces`` is transitive)."""
    c = open_cluster(make_cluster(tmp_path / "c", block_size=BS, disks=(256 << 10,)))
    med = tmp_path / "m"
    try:
        ino = c.fs.create(ROOT_INODE, b"f").ino
        ids = []
        for i in range(5):
            c.fs.write(ino, i * 3000, bytes([65 + i]) * 5000)
            r = run_backup(LocalClusterSource(c), med, replace(OPTS, incremental=i > 0))
            ids.append(r.manifest.id)
        want = c.fs.read(ino, 0, 1 << 20)
        f, i1, i2, i3, i4 = ids
        m = merge(DiskMedium.open(med), i2, i3).manifest.id
        s = merge(DiskMedium.open(med), f, i1).manifest.id
        s2 = merge(DiskMedium.open(med), s, m).manifest
        cat = DiskMedium.open(med).catalog()
        assert {g.id for g in cat.current} == {s2.id, i4}
        top = cat.get(i4)
        assert top is not None and top.parent == i3
        assert [g.id for g in cat.chain(top)] == [i4, s2.id]
        with ChainReader(DiskMedium.open(med), top) as reader, \
                SnapshotMeta(Generation(DiskMedium.open(med), top).meta_file(), "snap") as snap:
            fs = ReadOnlyFileSystem(snap, reader)
            a = fs.lookup(ROOT_INODE, b"f")
            got = fs.read(a.ino, 0, a.size + 1)
        assert got == want
    finally:
        c.close()


def test_a_full_ends_the_older_chains_of_its_medium_only(tmp_path: Path) -> None:
    """Tracking keeps the eras a chain may still ask for; a new full on a medium ends
    that medium's older chains (no incremental can follow them any more), and leaves
    another medium's chain alone."""
    c = open_cluster(make_cluster(tmp_path / "c", block_size=BS, disks=(256 << 10,)))
    try:
        ino = c.fs.create(ROOT_INODE, b"f").ino
        chains = []
        for i, (med, inc) in enumerate([("a", False), ("b", False), ("a", True),
                                        ("a", False), ("a", True)]):
            c.fs.write(ino, i * 700, b"x" * 900)
            r = run_backup(LocalClusterSource(c), tmp_path / med, replace(OPTS, incremental=inc))
            chains.append(r.manifest.chain)
        a1, b1, a1_inc, a2, a2_inc = chains
        assert a1 == a1_inc and a2 == a2_inc and len({a1, b1, a2}) == 3
        assert set(c.meta.tracker.chains()) == {b1, a2}
        # medium b's chain still gets its incremental
        c.fs.write(ino, 0, b"y" * 100)
        r = run_backup(LocalClusterSource(c), tmp_path / "b", replace(OPTS, incremental=True))
        assert r.manifest.chain == b1 and r.manifest.kind == "incremental"
    finally:
        c.close()
