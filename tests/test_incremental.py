"""Incremental backups (issue 12): scenarios of the seed and the command line.

- Fig. 26 (a.11): a mark moves the start of the next incremental: blocks changed
  before the mark are left out of it, those changed after it are in it.
- Fig. 30-31 (c.2): a generation reads through its chain, the newest generation that
  holds a block wins, back to the full; every generation restores exactly the disk
  image taken at its T0 (``SDBACKUP_TEST_T0_IMAGE_DIR``).
- The command line: ``backup --incremental`` with no parent, ``--full-if-needed``,
  ``--full --incremental``, a restored cluster on the same medium, ``generations
  --json``, ``mark``/``marks``, ``merge`` of generations that are not adjacent.
- Online incrementals in every log mode with writers on two node processes: the
  restored incremental equals the T0 image (about 15 s each).

Helpers used by ``tests/test_incremental_crash.py`` live here too (``views``,
``Workload``...): they are plain functions, imported by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_backup_support import SMALL, cli, make_cluster, make_tree, put_tree
from test_online_backup import Cluster as OnlineCluster
from test_online_backup import _check_restores_t0 as check_restores_t0
from test_online_backup import _stop as stop_writers
from test_online_backup import _writers as writers
from test_online_backup import sdb as online_sdb

from sdbackup.backup.engine import BackupOptions, BackupResult, run_backup
from sdbackup.blocks.blockset import BlockSet
from sdbackup.cluster.backup_source import LocalClusterSource
from sdbackup.cluster.local import open_cluster
from sdbackup.media.chain import ChainReader
from sdbackup.media.generation import Generation
from sdbackup.media.medium import DiskMedium, Manifest
from sdbackup.media.record_format import Kind
from sdbackup.media.snapshot import SnapshotMeta

BS = 512
INCR = dataclasses.replace(SMALL, incremental=True)

# -- helpers ---------------------------------------------------------------------------------


def backup(cdir: Path, medium: Path, options: BackupOptions = SMALL) -> BackupResult:
    """A backup in this process (the embedded cluster)."""
    with open_cluster(cdir) as c:
        return run_backup(LocalClusterSource(c), medium, options)


def incremental(cdir: Path, medium: Path) -> BackupResult:
    r = backup(cdir, medium, INCR)
    assert r.manifest.kind == "incremental"
    return r


def held(medium: Path, gen: str, disk: str = "d0") -> BlockSet:
    """The blocks of ``disk`` that generation ``gen`` itself stores (DATA and BI)."""
    g = Generation.open(medium, gen)
    did = g.manifest.disk(disk).id
    idx = g.index()
    e = np.concatenate([idx.for_disk(did), idx.for_disk(did, int(Kind.BI))])
    return BlockSet.from_runs(np.stack([e["start"].astype(np.int64),
                                        e["count"].astype(np.int64)], axis=1))


def locate(medium: Path, gen: str, path: str, fblock: int) -> tuple[int, int]:
    """(disk id, disk block) of file block ``fblock`` of top-level file ``path`` at
    ``gen``'s T0."""
    g = Generation.open(medium, gen)
    with SnapshotMeta(g.meta_file(), g.where()) as snap:
        ino = snap.lookup(1, path.lstrip("/").encode()).ino
        (ext,) = snap.map_read(ino, fblock, 1)
        return int(ext.disk), int(ext.dblock)


def dblocks(medium: Path, gen: str, path: str, fblocks: list[int]) -> BlockSet:
    """The disk blocks that file blocks ``fblocks`` of ``path`` map to at ``gen``'s T0."""
    out = BlockSet()
    for fb in fblocks:
        out.add_run(locate(medium, gen, path, fb)[1], 1)
    return out


def image_digest(medium: Path, gen: str, disk: str, work: Path) -> str:
    """sha256 of the disk image ``sdbackup restore-image`` makes of ``gen``."""
    out = work / f"img-{gen}-{disk}-{time.monotonic_ns()}"
    r = cli("restore-image", "--medium", medium, gen, "--disk", disk, "--to", out, "-q")
    assert r.code == 0, r.err
    h = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return h


def tree_state(root: Path) -> dict[str, tuple[object, ...]]:
    """What a restored tree holds, per path: type, mode, mtime, contents or target."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_nlink,
                            hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def restored_tree(medium: Path, gen: str, work: Path) -> dict[str, tuple[object, ...]]:
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"tree-{gen}-{time.monotonic_ns()}"
    r = cli("restore", "--medium", medium, gen, "--to", out, "-q")
    assert r.code == 0, r.err
    return tree_state(out)


def live_files(cdir: Path) -> dict[str, str]:
    """sha256 of every regular file of the cluster, by path (read in this process)."""
    out: dict[str, str] = {}
    with open_cluster(cdir) as c:
        todo = [(1, "")]
        while todo:
            ino, prefix = todo.pop()
            for e in c.fs.listdir(ino):
                path = f"{prefix}/{e.name.decode()}"
                if stat.S_ISDIR(e.attr.mode):
                    todo.append((e.attr.ino, path))
                elif stat.S_ISREG(e.attr.mode):
                    data = c.fs.read(e.attr.ino, 0, e.attr.size)
                    out[path.lstrip("/")] = hashlib.sha256(data).hexdigest()
    return out


@dataclasses.dataclass(frozen=True)
class View:
    """How a generation restores: the digest of every disk image, and the file tree."""

    images: tuple[str, ...]
    tree: tuple[tuple[str, tuple[object, ...]], ...]


def views(medium: Path, work: Path) -> dict[str, View]:
    """The view of every current generation on the medium."""
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for m in DiskMedium.open(medium).committed():
        out[m.id] = View(tuple(image_digest(medium, m.id, d.name, work) for d in m.disks),
                         tuple(sorted(restored_tree(medium, m.id, work).items())))
    return out


def stands_for(m: Manifest) -> str:
    """The generation whose view ``m`` has: itself, or the newer of a merge."""
    merged = m.extra.get("merged")
    return str(merged["newer"]) if isinstance(merged, dict) else m.id


def check_views(medium: Path, before: dict[str, View], work: Path) -> list[str]:
    """Every current generation restores as the one it stands for did ``before``;
    returns the current ids."""
    now = views(medium, work)
    cat = DiskMedium.open(medium).catalog()
    for gid, v in now.items():
        was = stands_for(cat.all[gid])
        assert was in before, f"generation {gid} stands for {was}, unknown before"
        assert v.images == before[was].images, f"{gid}: disk images differ from {was}'s"
        if v.tree != before[was].tree:
            a, b = dict(before[was].tree), dict(v.tree)
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise AssertionError(f"{gid}: restored tree differs from {was}'s at {diff[:10]}")
    return sorted(now)


class Workload:
    """Changes of a small cluster between backups, each touching other blocks: in-place
    overwrites, appends, a new file, a truncate, an unlink (freed blocks reused later)."""

    def __init__(self, cdir: Path) -> None:
        self.cdir = cdir
        self.step = 0
        with open_cluster(cdir) as c:
            c.fs.write(c.fs.create(1, b"big").ino, 0, os.urandom(64 * BS))

    def change(self) -> None:
        self.step += 1
        k = self.step
        with open_cluster(self.cdir) as c:
            fs = c.fs
            big = fs.resolve("/big")
            # in place: blocks 8k..8k+1, and block 3 again at every step
            fs.write(big.ino, 8 * k * BS, bytes([k]) * (2 * BS))
            fs.write(big.ino, 3 * BS + 100, f"step {k}".encode())
            tail = fs.resolve("/tree/c/hardlink")
            fs.write(tail.ino, tail.size, f"append {k}\n".encode() * 40)  # new blocks
            fs.write(fs.create(1, f"new{k}".encode()).ino, 0, os.urandom(3000 + 700 * k))
            if k % 2 == 0:
                fs.truncate(fs.resolve(f"/new{k - 1}").ino, 1000)
            if k == 3:
                fs.unlink(fs.resolve("/tree/a").ino, b"f12.bin")
            fs.fsync()


@pytest.fixture
def tree_cluster(tmp_path: Path) -> Path:
    """A two-disk cluster holding the sample tree of test_backup_support."""
    cdir = make_cluster(tmp_path / "c")
    put_tree(cdir, make_tree(tmp_path / "tree"))
    return cdir


# -- Fig. 26: a mark moves the start of the next incremental ---------------------------------

FILE_BLOCKS = 64


def _write_blocks(cdir: Path, path: str, fblocks: list[int], fill: bytes) -> None:
    with open_cluster(cdir) as c:
        a = c.fs.resolve(path)
        for fb in fblocks:
            c.fs.write(a.ino, fb * BS, fill * BS)
        c.fs.fsync(a.ino)


@pytest.mark.parametrize("where", ["embedded", "coordinator"])
def test_fig26_mark_moves_the_start_of_the_next_incremental(
        tmp_path: Path, where: str) -> None:
    """Seed Fig. 26: full backup at t0; blocks x and y change; a mark at t1; block z
    changes; the incremental at t2 holds z only. Restored, it shows z new and x, y as
    at the full. The next incremental (no mark since) starts at t2 again."""
    cdir = make_cluster(tmp_path / "c", disks=(1 << 20,))
    old = os.urandom(FILE_BLOCKS * BS)
    with open_cluster(cdir) as c:
        c.fs.write(c.fs.create(1, b"f").ino, 0, old)
    medium = tmp_path / "m"
    full = backup(cdir, medium).manifest.id
    x, y, z = 5, 20, 40
    _write_blocks(cdir, "/f", [x, y], b"X")  # between t0 and t1
    coord = None
    if where == "coordinator":
        from sdbackup.cluster.launch import start_coordinator

        coord = start_coordinator(cdir, lease=3.0)
    try:
        r = cli("mark", cdir, "t1", "--json")
        assert r.code == 0, r.err
        assert json.loads(r.out)["name"] == "t1"
        r = cli("marks", cdir, "--json")
        assert [m["name"] for m in json.loads(r.out)["marks"]] == ["t1"]
    finally:
        if coord is not None:
            assert coord.stop() == 0
    _write_blocks(cdir, "/f", [z], b"Z")  # between t1 and t2
    inc = incremental(cdir, medium).manifest
    assert inc.parent == full and inc.extra["tracking"]["mark"] == "t1"
    want_z = dblocks(medium, full, "/f", [z])
    assert held(medium, inc.id) == want_z, "the incremental must hold block z only"
    assert not held(medium, inc.id) & dblocks(medium, full, "/f", [x, y])
    out = tmp_path / "r1"
    assert cli("restore", "--medium", medium, inc.id, "--to", out, "-q").code == 0
    got = (out / "f").read_bytes()
    expect = bytearray(old)
    expect[z * BS : (z + 1) * BS] = b"Z" * BS
    assert got == bytes(expect), "z new, x and y as at the full"
    assert cli("verify", "--medium", medium, "--all").code == 0
    rows = json.loads(cli("generations", "--medium", medium, "--json").out)["generations"]
    assert [(g["kind"], g["mark"]) for g in rows] == [("full", None), ("incremental", "t1")]
    # No mark after the incremental: the next one holds what changed since its T0.
    _write_blocks(cdir, "/f", [x], b"W")
    inc2 = incremental(cdir, medium).manifest
    assert inc2.parent == inc.id and inc2.extra["tracking"]["mark"] is None
    assert held(medium, inc2.id) == dblocks(medium, full, "/f", [x])
    out = tmp_path / "r2"
    assert cli("restore", "--medium", medium, inc2.id, "--to", out, "-q").code == 0
    expect[x * BS : (x + 1) * BS] = b"W" * BS
    assert (out / "f").read_bytes() == bytes(expect)  # y: still as at the full


# -- Fig. 30-31: reading through the chain ---------------------------------------------------

def test_fig31_chain_read_newest_generation_holding_a_block_wins(
        tmp_path: Path, tree_cluster: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seed Fig. 31 (c.2): a full G3 and incrementals G2, G1 (here four of them), each
    changing other blocks, some blocks changed again later, files appended, created,
    truncated and removed (freed blocks reused). A block is read from the newest
    generation that holds it, tracing back to the full; every generation's restored
    image equals the exact disk image at its T0, and its files those read at its T0."""
    t0 = tmp_path / "t0"
    monkeypatch.setenv("SDBACKUP_TEST_T0_IMAGE_DIR", str(t0))
    medium = tmp_path / "m"
    work = Workload(tree_cluster)
    files = [live_files(tree_cluster)]
    gens = [backup(tree_cluster, medium).manifest]
    for _ in range(4):
        work.change()
        files.append(live_files(tree_cluster))
        gens.append(incremental(tree_cluster, medium).manifest)
    assert [g.kind for g in gens] == ["full"] + ["incremental"] * 4
    assert [g.parent for g in gens] == [None] + [g.id for g in gens[:-1]]
    assert len({g.chain for g in gens}) == 1
    # Incrementals are small: only what changed.
    assert all(g.blocks < gens[0].blocks // 4 for g in gens[1:])
    for g in gens:
        for d in g.disks:
            out = tmp_path / f"{g.id}-{d.name}.img"
            r = cli("restore-image", "--medium", medium, g.id, "--disk", d.name, "--to", out,
                    "-q")
            assert r.code == 0, r.err
            want = (t0 / g.id / f"{d.name}.img").read_bytes()
            got = out.read_bytes()
            if got != want:
                bad = [i // BS for i in range(0, len(want), BS)
                       if got[i:i + BS] != want[i:i + BS]]
                raise AssertionError(f"{g.id} ({g.kind}) disk {d.name}: {len(bad)} blocks "
                                     f"differ from T0, first {bad[:10]}")
    # Who answers for a block: the newest generation of the chain that holds it.
    med = DiskMedium.open(medium)
    newest = gens[-1]
    with ChainReader(med, med.resolve(newest.id)) as chain:
        assert chain.length == 5
        for d in newest.disks:
            did = chain.disk_id(d.name)
            own = chain.owners(did)
            owned: list[BlockSet] = [BlockSet() for _ in gens]
            for s, e, o in zip(own.starts.tolist(), own.ends.tolist(), own.owner.tolist(),
                               strict=True):
                owned[int(o)].add_run(s, e - s)
            holds = [held(medium, g.id, d.name) for g in reversed(gens)]  # newest first
            covered = BlockSet()
            for i, h in enumerate(holds):
                # every block a newer generation holds is not answered by this one
                assert not owned[i] & covered
                assert not (owned[i] - h), "a generation answers for a block it lacks"
                covered |= h
            # the full answers for what no incremental changed, the newest for its own
            assert len(owned[-1]) > 0 and len(owned[0]) > 0
            assert owned[0] == holds[0]
        # /big: block 3 changed at every step (the newest answers), block 8 at the
        # first only (the first incremental answers), block 60 never (the full).
        for fb, who in ((3, 0), (8, 3), (16, 2), (60, 4)):
            disk, b = locate(medium, newest.id, "/big", fb)
            own = chain.owners(chain.disk_id(disk))
            lo, hi = own.find(b, 1)
            assert hi - lo == 1 and int(own.owner[lo]) == who, (fb, who, own.owner[lo:hi])
    # Files: each generation restores what the files held at its T0.
    for g, want_files in zip(gens, files, strict=True):
        tree = restored_tree(medium, g.id, tmp_path / "trees")
        got_files = {k: v[-1] for k, v in tree.items() if v[0] == "file"}
        assert got_files == want_files, f"{g.id}: restored files differ from those at T0"
    assert files[1] != files[0] and files[4] != files[3]
    assert cli("verify", "--medium", medium, "--all").code == 0


# -- merges and prunes keep the chain going ------------------------------------------------

def _check_t0(medium: Path, m: Manifest, t0: Path, work: Path) -> None:
    """Every disk of generation ``m`` restores to the image dumped at its T0."""
    for d in m.disks:
        out = work / f"{m.id}-{d.name}-{time.monotonic_ns()}.img"
        r = cli("restore-image", "--medium", medium, m.id, "--disk", d.name, "--to", out, "-q")
        assert r.code == 0, r.err
        stands = stands_for(m)
        assert out.read_bytes() == (t0 / stands / f"{d.name}.img").read_bytes(), \
            f"{m.id} ({m.kind}, for {stands}) disk {d.name} differs from its T0 image"


def test_incrementals_follow_merges_and_prunes(
        tmp_path: Path, tree_cluster: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Merges (a.10) and prune replace generations; the next incremental follows the
    newest generation whatever it became, and every generation restores its T0."""
    t0 = tmp_path / "t0"
    monkeypatch.setenv("SDBACKUP_TEST_T0_IMAGE_DIR", str(t0))
    medium = tmp_path / "m"
    work = Workload(tree_cluster)
    f = backup(tree_cluster, medium).manifest
    work.change()
    i1 = incremental(tree_cluster, medium).manifest
    work.change()
    i2 = incremental(tree_cluster, medium).manifest
    r = cli("merge", "--medium", medium, f.id, i1.id, "--json", "-q")
    assert r.code == 0, r.err
    s1 = json.loads(r.out)
    assert s1["kind"] == "synthetic" and s1["replaces"] == [f.id, i1.id]
    assert sorted(s1["removed"]) == sorted([f.id, i1.id])
    work.change()
    i3 = incremental(tree_cluster, medium).manifest
    assert i3.parent == i2.id
    r = cli("merge", "--medium", medium, i2.id, i3.id, "--json", "-q")
    assert r.code == 0, r.err
    m23 = json.loads(r.out)
    assert m23["kind"] == "incremental" and m23["parent"] == s1["generation"]
    work.change()
    i4 = incremental(tree_cluster, medium).manifest
    assert i4.parent == m23["generation"]  # the head: it stands for i3
    med = DiskMedium.open(medium)
    assert med.catalog().get(i3.id).id == m23["generation"]  # type: ignore[union-attr]
    # 'generations' names parents as they stand now: each one is listed too.
    rows = json.loads(cli("generations", "--medium", medium, "--json").out)["generations"]
    assert [(g["kind"], g["parent"]) for g in rows] == [
        ("synthetic", None), ("incremental", s1["generation"]),
        ("incremental", m23["generation"])]
    for m in med.committed():
        _check_t0(medium, m, t0, tmp_path)
    r = cli("prune", "--medium", medium, "--keep-last", "1", "--json")
    assert r.code == 0, r.err
    (only,) = DiskMedium.open(medium).committed()
    assert only.kind == "synthetic" and stands_for(only) == i4.id
    work.change()
    i5 = incremental(tree_cluster, medium).manifest
    assert i5.parent == only.id
    for m in DiskMedium.open(medium).committed():
        _check_t0(medium, m, t0, tmp_path)
    assert cli("verify", "--medium", medium, "--all").code == 0
    assert sorted(os.listdir(medium / "generations")) == sorted([only.id, i5.id])


# -- the command line --------------------------------------------------------------------------

def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdbackup: error: "), err
    return lines[0]


def test_cli_incremental_backups(tmp_path: Path) -> None:
    cdir = make_cluster(tmp_path / "c", disks=(1 << 20,))
    with open_cluster(cdir) as c:
        c.fs.write(c.fs.create(1, b"f").ino, 0, os.urandom(20 * BS))
    medium = tmp_path / "m"
    # No generation to follow: exit 2, one line that names the fix.
    for where in (medium, tmp_path / "empty"):
        if where.name == "empty":
            where.mkdir()
        r = cli("backup", cdir, "--medium", where, "--incremental", "-q")
        assert r.code == 2, r.out + r.err
        line = _one_line(r.err)
        assert "no incremental possible" in line and "holds no backup" in line
        assert "without --incremental" in line and "--full-if-needed" in line
        # Refused, it leaves nothing behind: no medium made, the directory as it was.
        assert not medium.exists()
        assert not where.exists() or not any(where.iterdir())
    r = cli("backup", cdir, "--medium", medium, "--full", "--incremental", "-q")
    assert r.code == 2 and "exclude each other" in _one_line(r.err)
    r = cli("backup", cdir, "--medium", medium, "--full-if-needed", "-q")
    assert r.code == 2 and "--incremental" in _one_line(r.err)
    # --full-if-needed: a full instead, with a warning that says why (a real process:
    # the warning is a log line on stderr, -q or not).
    p = online_sdb("backup", str(cdir), "--medium", str(medium), "--incremental",
                   "--full-if-needed", "--json", "-q")
    full = json.loads(p.stdout)
    assert full["kind"] == "full" and full["blocks"] > 0
    (warning,) = [x for x in p.stderr.splitlines() if "WARNING" in x]
    assert "holds no backup of this cluster yet: taking a full backup (--full-if-needed)" \
        in warning, p.stderr
    # Now an incremental follows it; then --full starts a new chain.
    _write_blocks(cdir, "/f", [3], b"a")
    r = cli("backup", cdir, "--medium", medium, "--incremental", "--json", "-q")
    assert r.code == 0, r.err
    inc = json.loads(r.out)
    assert inc["kind"] == "incremental" and inc["blocks"] == 1
    _write_blocks(cdir, "/f", [4], b"b")
    r = cli("backup", cdir, "--medium", medium, "--incremental", "--full-if-needed", "--json",
            "-q")
    assert r.code == 0, r.err
    inc2 = json.loads(r.out)
    assert inc2["kind"] == "incremental" and inc2["blocks"] == 1
    r = cli("backup", cdir, "--medium", medium, "--full", "--json", "-q")
    assert r.code == 0, r.err
    full2 = json.loads(r.out)
    assert full2["kind"] == "full"

    # generations --json: kind, parent and chain.
    r = cli("generations", "--medium", medium, "--json")
    assert r.code == 0, r.err
    rows = json.loads(r.out)["generations"]
    ids = [full["generation"], inc["generation"], inc2["generation"], full2["generation"]]
    assert [g["id"] for g in rows] == ids
    assert [g["kind"] for g in rows] == ["full", "incremental", "incremental", "full"]
    assert [g["parent"] for g in rows] == [None, ids[0], ids[1], None]
    chain = rows[0]["chain"]
    assert isinstance(chain, str) and len(chain) == 32
    assert [g["chain"] for g in rows[:3]] == [chain] * 3 and rows[3]["chain"] != chain
    assert [g["blocks"] for g in rows[1:3]] == [1, 1]
    text = cli("generations", "--medium", medium).out
    assert text.count(" incremental ") == 2 and chain[:8] in text

    # merge takes two adjacent generations of one chain, the older first: else one line,
    # exit 2 ("usage error or bad input", README's table of exit codes).
    for older, newer in ((ids[0], ids[2]), (ids[1], ids[0]), (ids[2], ids[3]),
                         (ids[0], ids[0])):
        r = cli("merge", "--medium", medium, older, newer, "-q")
        assert r.code == 2, (older, newer, r.out, r.err)
        line = _one_line(r.err)
        assert "adjacent" in line or "two different generations" in line
    # A generation the medium does not have: "not found", exit 4 (README's table).
    r = cli("merge", "--medium", medium, ids[0], "20990101T000000.000000Z-00000000", "-q")
    assert r.code == 4 and "is not on medium" in _one_line(r.err)
    assert len(DiskMedium.open(medium).committed()) == 4  # nothing merged, nothing left
    assert sorted(os.listdir(medium / "generations")) == sorted(ids)

    # A cluster restored from the medium is another cluster (a new id and tracking
    # history): no incremental of it on this medium, not even --full-if-needed.
    new = tmp_path / "restored"
    r = cli("restore-cluster", "--medium", medium, ids[2], "--to", new, "-q")
    assert r.code == 0, r.err
    for extra in ((), ("--full-if-needed",)):
        r = cli("backup", new, "--medium", medium, "--incremental", *extra, "-q")
        assert r.code == 2, r.out + r.err
        assert "medium directory of its own" in _one_line(r.err)
    with open_cluster(cdir) as c, open_cluster(new) as c2:
        assert c.meta.tracker.token != c2.meta.tracker.token
    assert sorted(os.listdir(medium / "generations")) == sorted(ids)
    # The restored cluster's first backup on its own medium is a full, and its next
    # backup an incremental of that.
    r = cli("backup", new, "--medium", tmp_path / "m2", "--incremental", "--full-if-needed",
            "--json", "-q")
    assert r.code == 0 and json.loads(r.out)["kind"] == "full", r.err
    _write_blocks(new, "/f", [7], b"n")
    r = cli("backup", new, "--medium", tmp_path / "m2", "--incremental", "--json", "-q")
    assert r.code == 0 and json.loads(r.out)["blocks"] == 1, r.err


def test_cli_incremental_after_the_tracking_started_anew(tmp_path: Path) -> None:
    """The cluster's changed-block tracking starts a new history (its token deleted, as
    restore-cluster does to the cluster it makes): what changed since the newest
    generation is not known, so ``--incremental`` is refused (exit 2, one line that
    says why and what to do), ``--full-if-needed`` takes a full with a warning, and
    incrementals follow that full, in a new chain."""
    import sqlite3

    from sdbackup.meta.tracking import TOKEN_KEY

    cdir = make_cluster(tmp_path / "c", disks=(1 << 20,))
    with open_cluster(cdir) as c:
        c.fs.write(c.fs.create(1, b"f").ino, 0, os.urandom(20 * BS))
    medium = tmp_path / "m"
    first = backup(cdir, medium).manifest
    _write_blocks(cdir, "/f", [2], b"x")
    con = sqlite3.connect(cdir / "meta.db")
    with con:
        assert con.execute("DELETE FROM meta WHERE key=?", (TOKEN_KEY,)).rowcount == 1
    con.close()
    r = cli("backup", cdir, "--medium", medium, "--incremental", "-q")
    assert r.code == 2, r.out + r.err
    line = _one_line(r.err)
    assert f"changed-block tracking started anew after generation {first.id}" in line
    assert "--full-if-needed" in line
    assert [m.id for m in DiskMedium.open(medium).committed()] == [first.id]
    p = online_sdb("backup", str(cdir), "--medium", str(medium), "--incremental",
                   "--full-if-needed", "--json", "-q")
    full = json.loads(p.stdout)
    assert full["kind"] == "full"
    assert "started anew" in p.stderr and "taking a full backup (--full-if-needed)" in p.stderr
    _write_blocks(cdir, "/f", [3], b"y")
    r = cli("backup", cdir, "--medium", medium, "--incremental", "--json", "-q")
    assert r.code == 0, r.err
    inc = json.loads(r.out)
    assert inc["kind"] == "incremental" and inc["blocks"] == 1
    rows = json.loads(cli("generations", "--medium", medium, "--json").out)["generations"]
    assert [(g["kind"], g["parent"]) for g in rows] == [
        ("full", None), ("full", None), ("incremental", full["generation"])]
    assert rows[0]["chain"] != rows[1]["chain"] == rows[2]["chain"]
    out = tmp_path / "r"
    assert cli("restore", "--medium", medium, inc["generation"], "--to", out, "-q").code == 0
    assert hashlib.sha256((out / "f").read_bytes()).hexdigest() == live_files(cdir)["f"]


def test_cli_marks(tmp_path: Path) -> None:
    cdir = make_cluster(tmp_path / "c", disks=(1 << 20,))
    r = cli("marks", cdir)
    assert r.code == 0 and "0 mark(s)" in r.out
    r = cli("mark", cdir, "before-load")
    assert r.code == 0 and "mark before-load set" in r.out
    r = cli("mark", cdir, "--json")  # the default name: the time
    assert r.code == 0, r.err
    auto = json.loads(r.out)["name"]
    assert auto.startswith("mark-")
    r = cli("mark", cdir, "before-load")
    assert r.code == 2 and "exists already" in _one_line(r.err)
    r = cli("marks", cdir, "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert [m["name"] for m in d["marks"]] == ["before-load", auto]
    assert d["marks"][0]["era"] < d["marks"][1]["era"] == d["tracking"]["era"]
    text = cli("marks", cdir).out.splitlines()
    assert text[0].startswith("before-load ") and text[1].startswith(auto)
    assert "2 mark(s)" in text[-1]


# -- online incrementals ---------------------------------------------------------------------

def _seed_files(cdir: Path) -> None:
    """The 12 files of 3 MiB the writers of test_online_backup work on, written through
    node n1 (its control port) from this process: one connection, not 12 commands."""
    from sdbackup.cluster.access import open_fs

    with open_fs(cdir, node="n1") as fs:
        for i in range(12):
            a = fs.create(1, f"f{i}".encode())
            fs.write(a.ino, 0, os.urandom(3 << 20))
        fs.fsync()


@pytest.fixture
def online(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[OnlineCluster]:
    """A coordinator and two node processes (test_online_backup's setup), 12 files of
    3 MiB, a copy slowed down by 50 ms a batch (enough for the writers to overwrite
    blocks it still has to copy), the T0 image hook on."""
    from sdbackup.cluster.launch import start_coordinator, start_node

    cdir = tmp_path / "c"
    online_sdb("init", str(cdir), "--block-size", "1024",
               "--disk", f"d0={tmp_path}/d0.img:48MiB", "--disk", f"d1={tmp_path}/d1.img:48MiB")
    t0_dir = tmp_path / "t0"
    monkeypatch.setenv("SDBACKUP_TEST_T0_IMAGE_DIR", str(t0_dir))
    monkeypatch.setenv("SDBACKUP_TEST_COPY_DELAY", "0.05")
    coord = start_coordinator(cdir, lease=5.0)
    nodes = []
    try:
        for n in ("n1", "n2"):
            nodes.append(start_node(cdir, n, cache_size="8MiB", flush_delay=0.2))
        _seed_files(cdir)
        yield OnlineCluster(cdir, coord, nodes, t0_dir)
    finally:
        for p in nodes:
            p.kill()
        coord.stop()


@pytest.mark.parametrize("mode", ["merged", "central", "inline", "separate",
                                  "separate+overlay"])
def test_online_incrementals_restore_t0(online: OnlineCluster, tmp_path: Path,
                                        mode: str) -> None:
    """An online full and two online incrementals in one log mode, while two writer
    processes keep writing through both nodes (before, during and between the
    backups): every generation, the incrementals read through their chain, restores
    to exactly the disk image at its T0."""
    log_mode, _, overlay = mode.partition("+")
    extra = ["--log-mode", log_mode]
    if log_mode == "separate":
        extra += ["--log-medium", str(tmp_path / "lm")]
    if overlay:
        extra.append("--overlay")
    medium = tmp_path / "m"
    stop = tmp_path / "stop"
    ws = writers(online, stop)
    gens = []
    try:
        time.sleep(1.0)  # the writers are busy and the caches dirty
        for kind in ("full", "incremental", "incremental"):
            args = ["--incremental"] if kind == "incremental" else []
            r = online_sdb("backup", str(online.dir), "--medium", str(medium), "--compress",
                           "none", "--json", *args, *extra)
            s = json.loads(r.stdout)
            assert s["kind"] == kind and s["log"]["mode"] == log_mode
            gens.append(s)
            time.sleep(0.5)  # writes go on between the backups
    finally:
        ops = stop_writers(ws, stop)
    assert min(ops) > 20, f"writers barely ran: {ops}"
    full, inc1, inc2 = gens
    assert inc1["blocks"] > 0 and inc2["blocks"] > 0
    # Writers overwrote blocks the incrementals still had to copy: before images.
    assert inc1["log"]["blocks"] + inc2["log"]["blocks"] > 0, "no before image: proves nothing"
    cat = DiskMedium.open(medium).catalog()
    assert [cat.all[g["generation"]].parent for g in gens] == \
        [None, full["generation"], inc1["generation"]]
    for s in gens:
        check_restores_t0(online, medium, s["generation"])
    r = online_sdb("verify", "--medium", str(medium), "--all", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
