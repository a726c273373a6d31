"""Crashes around incremental backups (issue 12), with real processes killed at chosen
points.

- The coordinator killed with SIGKILL between a node's ``map_write`` and its
  ``commit_write`` (the node held by a test hook right after the grant, or right after
  its data reached the disk), or the node itself killed once its data is on the disk:
  an overwrite in place was recorded as changed before the write could reach the disk
  (meta/tracking.py), so the next incremental holds the block and restores what the
  disk holds; an append's new blocks were never committed, so the incremental restores
  the file as the metadata says (the old size, zeros in the blocks the append wrote).
- ``sdbackup merge`` and ``sdbackup prune`` killed with SIGKILL at each of their crash
  points: every current generation still restores exactly as before, ``verify --all``
  passes, ``gc`` removes the leftovers, and running the command again finishes the job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster_helpers import ClusterProcs, sdb, wait_for
from test_backup_support import SMALL, cli, make_cluster, make_tree, put_tree
from test_incremental import INCR, View, Workload, backup, check_views, held, views

from sdbackup.backup.merge import CRASH_POINTS as MERGE_CRASH_POINTS
from sdbackup.backup.prune import CRASH_POINTS as PRUNE_CRASH_POINTS
from sdbackup.blocks.blockset import BlockSet
from sdbackup.cluster.access import open_fs
from sdbackup.cluster.local import open_cluster
from sdbackup.media.generation import Generation
from sdbackup.media.medium import DiskMedium
from sdbackup.media.snapshot import SnapshotMeta

BS = 512
LEASE = 2.0
KiB = 1 << 10


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ClusterProcs]:
    c = ClusterProcs(tmp_path, block_size=BS, disk_size="16MiB")
    try:
        yield c
    finally:
        c.cleanup()


def _stopped(pid: int) -> bool:
    """The process is stopped (state T in /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


def snapshot_of(medium: Path, gen: str) -> SnapshotMeta:
    g = Generation.open(medium, gen)
    return SnapshotMeta(g.meta_file(), f"generation {gen}")


def backup_json(cdir: Path, medium: Path, *extra: str) -> dict[str, object]:
    r = sdb("backup", str(cdir), "--medium", str(medium), "--compress", "none", "--json",
            "-q", *extra, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


def restore_file(medium: Path, gen: str, path: str, to: Path) -> bytes:
    r = sdb("restore", "--medium", str(medium), gen, path, "--to", str(to), "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    return (to / path.lstrip("/")).read_bytes()


# -- 1. a write granted, then the coordinator or the node killed before its commit ---------

CASES = {
    # name: (what is killed, the node's test hook, the write)
    "coordinator-before-commit-overwrite":
        ("coordinator", "SDBACKUP_TEST_NODE_STOP_AT=before-commit", "overwrite"),
    "coordinator-before-commit-append":
        ("coordinator", "SDBACKUP_TEST_NODE_STOP_AT=before-commit", "append"),
    "coordinator-mapped-overwrite":
        ("coordinator", "SDBACKUP_TEST_NODE_STOP_AT=mapped", "overwrite"),
    "node-before-commit-overwrite":
        ("node", "SDBACKUP_TEST_NODE_CRASH_AT=before-commit", "overwrite"),
    "node-before-commit-append":
        ("node", "SDBACKUP_TEST_NODE_CRASH_AT=before-commit", "append"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_write_granted_then_killed_before_commit_then_incremental(
        cp: ClusterProcs, tmp_path: Path, name: str) -> None:
    """A node's write-back is granted (the coordinator answered ``map_write``), and then
    a process is killed with SIGKILL before the node's ``commit_write``:

    - *coordinator-...*: the node is held by a test hook (``SDBACKUP_TEST_NODE_STOP_AT``)
      right after ``map_write`` (*mapped*: nothing written yet) or once its data is
      written and flushed to the disk (*before-commit*); the coordinator is killed, and
      the node too (it never commits); then the coordinator is started again;
    - *node-...*: the node kills itself once its data is on the disk
      (``SDBACKUP_TEST_NODE_CRASH_AT=before-commit``); the coordinator, alive, fences it.

    Then ``backup --incremental`` (through the coordinator) must:

    - overwrite in place: hold those blocks (recorded as changed, durably, before
      ``map_write`` answered), and restore what the disk holds: the new data once it
      was written (*before-commit*), the old data when it was not (*mapped*);
    - append (new blocks): restore the file as its metadata says, the old size: the new
      blocks were never committed, so they are free, and read as zeros in the restored
      image although the disk holds the appended bytes.

    In every case the restored file equals the file as the cluster reads it afterwards,
    and the restored disk image equals the disk in every block in use.
    """
    who, hook, case = CASES[name]
    written = "mapped" not in hook
    old = bytes(range(256)) * (64 * KiB // 256)  # 64 KiB: 128 whole blocks
    with open_cluster(cp.dir) as c:
        a = c.fs.create(1, b"f")
        c.fs.write(a.ino, 0, old)
        c.fs.fsync(a.ino)
        ino = a.ino
    medium = tmp_path / "m"
    full = str(backup_json(cp.dir, medium)["generation"])
    with snapshot_of(medium, full) as snap:
        (ext,) = snap.map_read(ino, 0, len(old) // BS)
    assert ext.fblock == 0 and ext.length == len(old) // BS
    img = tmp_path / "d0.img"

    cp.start_coordinator(lease=LEASE)
    n1 = cp.start_node("n1", flush_delay=0.3, prefix=["env", hook])
    if case == "overwrite":
        fblock = 37
        new = b"N" * (3 * BS)  # blocks 37-39 of the file, in place
        at = fblock * BS
        dblock = ext.dblock + fblock
    else:
        new = b"A" * (16 * BS)  # 16 new blocks past the end
        at = len(old)
    with open_fs(cp.dir, node="n1") as fs:
        fs.write(fs.resolve("/f").ino, at, new)  # acknowledged, dirty on n1 only
    if who == "coordinator":
        wait_for(lambda: _stopped(n1.pid), 15, "n1 to stop inside its write-back")
    else:
        assert n1.wait(15) == -signal.SIGKILL, n1.output()[-3000:]
    disk = img.read_bytes()
    if case == "overwrite":
        on_disk = disk[dblock * BS : dblock * BS + len(new)]
        assert on_disk == (new if written else old[at:at + len(new)])
    else:
        # The data is on the disk (written with O_DIRECT and flushed): find it there.
        pos = disk.find(new)
        assert pos > 0 and pos % BS == 0, "the appended data did not reach the disk"
        appended = BlockSet.from_runs([(pos // BS, len(new) // BS)])
    assert cp.coordinator is not None
    if who == "coordinator":
        cp.coordinator.popen.send_signal(signal.SIGKILL)
        assert cp.coordinator.wait(10) == -signal.SIGKILL
        n1.kill()  # stopped, never commits: kill -9 works on a stopped process
        cp.start_coordinator(lease=LEASE)
    else:
        cp.wait_log("fenced", timeout=3 * LEASE + 10)

    inc = backup_json(cp.dir, medium, "--incremental")
    gen = str(inc["generation"])
    assert inc["kind"] == "incremental"
    stored = held(medium, gen)
    if case == "overwrite":
        want = BlockSet.from_runs([(dblock, len(new) // BS)])
        assert stored == want, f"the incremental holds {stored!r}, not the granted {want!r}"
        expect = old[:at] + new + old[at + len(new):] if written else old
    else:
        assert not stored & appended, "uncommitted (free) blocks were copied"
        expect = old
    restored_f = restore_file(medium, gen, "/f", tmp_path / "r")
    assert restored_f == expect
    with open_fs(cp.dir) as fs:  # the cluster as it reads now, through the coordinator
        a = fs.resolve("/f")
        assert fs.read(a.ino, 0, a.size + BS) == restored_f
    # The image of the newest generation is the disk as the metadata says, block for
    # block: the used blocks as on the disk, free blocks (the append's) as zeros.
    r = sdb("restore-image", "--medium", str(medium), gen, "--disk", "d0",
            "--to", str(tmp_path / "restored.img"), "-q")
    assert r.returncode == 0, r.stderr
    restored = (tmp_path / "restored.img").read_bytes()
    disk = img.read_bytes()
    with snapshot_of(medium, gen) as snap:
        used = snap.used_blocks(ext.disk, len(disk) // BS)
    for s, n in used.runs():
        assert restored[s * BS : (s + n) * BS] == disk[s * BS : (s + n) * BS], (s, n)
    if case == "append":
        assert not used & appended
        s0 = pos // BS
        assert restored[s0 * BS : s0 * BS + len(new)] == bytes(len(new))
    assert sdb("verify", "--medium", str(medium), "--all").returncode == 0
    assert cp.coordinator.stop() == 0
    assert sdb("fsck", str(cp.dir)).returncode == 0


# -- 2. merge and prune killed at chosen points ------------------------------------------------

@dataclass(frozen=True)
class Chains:
    """A medium with two chains of one cluster: A = [F1, A1] and B = [F2, B1, B2, B3],
    and how each generation restored before anything was merged."""

    medium: Path
    ids: dict[str, str]
    before: dict[str, View]


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> Chains:
    base = tmp_path_factory.mktemp("chains")
    cdir = make_cluster(base / "c")
    put_tree(cdir, make_tree(base / "tree"))
    medium = base / "m"
    work = Workload(cdir)
    ids: dict[str, str] = {}
    for name in ("F1", "A1", "F2", "B1", "B2", "B3"):
        if name != "F1":
            work.change()
        opts = SMALL if name.startswith("F") else INCR
        ids[name] = backup(cdir, medium, opts).manifest.id
    cat = DiskMedium.open(medium).catalog()
    assert [cat.all[ids[n]].kind for n in ids] == ["full", "incremental", "full",
                                                   "incremental", "incremental", "incremental"]
    return Chains(medium, ids, views(medium, base / "views"))


def _copy(chains: Chains, tmp_path: Path) -> Path:
    medium = tmp_path / "m"
    shutil.copytree(chains.medium, medium)
    return medium


def _killed(*args: str | os.PathLike[str], crash_at: str) -> subprocess.CompletedProcess[str]:
    """Run an sdbackup command that must die at ``crash_at`` (SIGKILL, as kill -9)."""
    env = {**os.environ, "SDBACKUP_TEST_CRASH_AT": crash_at}
    r = subprocess.run([sys.executable, "-m", "sdbackup.cli.main", *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, (crash_at, r.returncode, r.stdout, r.stderr)
    return r


def _listed(medium: Path) -> list[str]:
    return sorted(os.listdir(medium / "generations"))


def _verify_all(medium: Path) -> None:
    r = cli("verify", "--medium", medium, "--all")
    assert r.code == 0, r.out + r.err


def _gc(medium: Path) -> dict[str, list[str]]:
    r = cli("gc", "--medium", medium, "--json")
    assert r.code == 0, r.err
    out: dict[str, list[str]] = json.loads(r.out)
    return out


@pytest.mark.parametrize("pair", [("F2", "B1"), ("B1", "B2")])
@pytest.mark.parametrize("point,then", [
    ("merge-mid-copy", "gc"), ("merge-before-commit", "gc"),
    ("merge-after-commit", "gc"), ("merge-after-commit", "rerun")])
def test_merge_killed_at_each_point(chains: Chains, tmp_path: Path, pair: tuple[str, str],
                                    point: str, then: str) -> None:
    """``sdbackup merge O N`` killed with SIGKILL at ``point``: every current generation
    restores exactly as before (a committed merge stands for N), ``verify --all``
    passes, and both ``gc`` and running the merge again finish the job, in either
    order."""
    assert point in MERGE_CRASH_POINTS
    medium = _copy(chains, tmp_path)
    o, n = (chains.ids[x] for x in pair)
    _killed("merge", "--medium", medium, o, n, "-q", crash_at=point)
    committed = point == "merge-after-commit"
    cur = check_views(medium, chains.before, tmp_path / "v1")
    if committed:
        (m,) = set(cur) - set(chains.before)
        assert set(cur) == set(chains.before) - {o, n} | {m}
        assert {o, n} <= set(_listed(medium)), "the merged-away generations wait for gc"
        kind = DiskMedium.open(medium).catalog().all[m].kind
        assert kind == ("synthetic" if pair[0] == "F2" else "incremental")
    else:
        assert cur == sorted(chains.before)
        assert len(_listed(medium)) == len(chains.before) + 1  # the unfinished one
    _verify_all(medium)
    steps = ["gc", "rerun"] if then == "gc" else ["rerun", "gc"]
    for step in steps:
        if step == "gc":
            out = _gc(medium)
            if committed and then == "gc":
                assert sorted(out["merged_away"]) == sorted([o, n]) and not out["removed"]
            elif not committed:
                assert len(out["removed"]) == 1 and not out["merged_away"]
            else:  # the rerun finished it already
                assert out == {"removed": [], "merged_away": [], "dry_run": False}
        else:
            r = cli("merge", "--medium", medium, o, n, "--json", "-q")
            assert r.code == 0, r.err
            res = json.loads(r.out)
            assert res["replaces"] == [o, n]
        cur = check_views(medium, chains.before, tmp_path / f"v-{step}")
        _verify_all(medium)
    # Finished: one generation stands for N, O and N are gone, nothing else changed.
    assert _listed(medium) == cur
    (m,) = set(cur) - set(chains.before)
    assert set(cur) == set(chains.before) - {o, n} | {m}
    # The chain goes on through the result: B3 (or B2) reads through it.
    assert cli("verify", "--medium", medium, chains.ids["B3"]).code == 0


@pytest.mark.parametrize("point", [*MERGE_CRASH_POINTS, *PRUNE_CRASH_POINTS])
def test_prune_killed_at_each_point(chains: Chains, tmp_path: Path, point: str) -> None:
    """``sdbackup prune --keep-last 2`` (keep B3 and B2: remove chain A, merge F2 into B1
    and the result into B2) killed at ``point``: every current generation restores as
    before, ``verify --all`` passes, ``gc`` removes the leftovers, and prune run again
    finishes the job: the same result as a prune that was never interrupted."""
    medium = _copy(chains, tmp_path)
    ids = chains.ids
    r = cli("prune", "--medium", medium, "--keep-last", "2", "--dry-run", "--json")
    assert r.code == 0, r.err
    plan = json.loads(r.out)
    assert [(s["action"], s["generations"]) for s in plan["steps"]] == [
        ("remove", [ids["F1"], ids["A1"]]), ("merge", [ids["F2"], ids["B1"]]),
        ("merge", [ids["B1"], ids["B2"]])], plan["steps"]
    _killed("prune", "--medium", medium, "--keep-last", "2", crash_at=point)
    cur = check_views(medium, chains.before, tmp_path / "v1")
    assert ids["B3"] in cur
    if point.startswith("prune-"):  # killed in the removal of chain A, A1 first
        assert ids["F1"] in cur and ids["A1"] not in cur
    _verify_all(medium)
    out = _gc(medium)
    if point == "prune-uncommitted":  # A1 lost its manifest first: unfinished now
        assert out["removed"] == [ids["A1"]] and not out["merged_away"]
    elif point == "merge-after-commit":
        assert sorted(out["merged_away"]) == sorted([ids["F2"], ids["B1"]])
    elif point != "prune-mid-remove":
        assert len(out["removed"]) == 1 and not out["merged_away"]
    assert _listed(medium) == cur
    cur = check_views(medium, chains.before, tmp_path / "v2")
    _verify_all(medium)
    r = cli("prune", "--medium", medium, "--keep-last", "2", "--json")
    assert r.code == 0, r.err
    cur = check_views(medium, chains.before, tmp_path / "v3")
    _verify_all(medium)
    # The same end as an uninterrupted prune: B2 (a synthetic full now) and B3.
    assert len(cur) == 2 and ids["B3"] in cur and _listed(medium) == cur
    cat = DiskMedium.open(medium).catalog()
    (s,) = [g for g in cur if g != ids["B3"]]
    assert cat.all[s].kind == "synthetic" and cat.all[s].extra["merged"]["newer"] == ids["B2"]
    b3_parent = cat.all[ids["B3"]].parent
    assert b3_parent is not None and cat.get(b3_parent) is cat.all[s]
    assert _gc(medium) == {"removed": [], "merged_away": [], "dry_run": False}
