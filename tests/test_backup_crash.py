"""A backup that dies (kill -9) or runs out of space never leaves a generation that
looks committed, and never harms what the medium held before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_backup_support import backup, cli, make_cluster, make_tree, put_tree

from sdbackup.backup.engine import CRASH_ENV, CRASH_POINTS
from sdbackup.cluster.local import open_cluster
from sdbackup.media.medium import DiskMedium


def _backup_process(cdir: Path, medium: Path, crash_at: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, CRASH_ENV: crash_at}
    return subprocess.run([sys.executable, "-m", "sdbackup.cli.main", "backup", str(cdir),
                           "--medium", str(medium), "-q"], env=env, capture_output=True,
                          text=True, timeout=120)


def test_kill_9_at_every_point(tmp_path: Path) -> None:
    cdir = make_cluster(tmp_path / "c")
    put_tree(cdir, make_tree(tmp_path / "tree"))
    medium = tmp_path / "m"
    first = backup(cdir, medium).manifest.id
    for point in CRASH_POINTS:
        p = _backup_process(cdir, medium, point)
        assert p.returncode == -9, (point, p.stdout, p.stderr)
    gens = sorted(os.listdir(medium / "generations"))
    assert len(gens) == 4
    crashed = {g: sorted(os.listdir(medium / "generations" / g)) for g in gens if g != first}
    kinds = sorted(tuple(x for x in files if not x.startswith(".")) for files in crashed.values())
    assert ("index", "meta.db", "stream-0.sdr") in kinds  # killed just before the manifest
    assert all("manifest.json" not in files for files in crashed.values())

    r = cli("generations", "--medium", medium, "--json")
    assert r.code == 0
    listing = json.loads(r.out)
    assert [g["id"] for g in listing["generations"]] == [first]
    assert listing["unfinished"] == 3
    r = cli("generations", "--medium", medium)
    assert "3 unfinished" in r.err and "gc" in r.err
    for g in crashed:
        r = cli("verify", "--medium", medium, g)
        assert r.code == 4 and "never committed" in r.err

    r = cli("gc", "--medium", medium, "--dry-run")
    assert r.code == 0 and r.out.count("would remove") == 3
    assert len(os.listdir(medium / "generations")) == 4
    r = cli("gc", "--medium", medium, "--json")
    assert r.code == 0 and sorted(json.loads(r.out)["removed"]) == sorted(crashed)
    assert os.listdir(medium / "generations") == [first]
    assert cli("verify", "--medium", medium, first).code == 0
    # the medium and the cluster are still usable
    second = backup(cdir, medium).manifest.id
    r = cli("verify", "--medium", medium, "--all")
    assert r.code == 0 and r.out.count(": OK") == 2 and second in r.out
    assert cli("fsck", cdir).code == 0


def test_gc_leaves_a_generation_being_written(tmp_path: Path) -> None:
    cdir = make_cluster(tmp_path / "c", disks=(1 << 20,))
    medium = tmp_path / "m"
    backup(cdir, medium)
    med = DiskMedium.open(medium)
    pending = med.begin()
    try:
        assert med.gc() == []
        assert pending.path.exists()
    finally:
        pending.release()
    assert [e.id for e in med.gc()] == [pending.id]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Path:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_medium_full(small_tmpfs: Path, tmp_path: Path) -> None:
    cdir = make_cluster(tmp_path / "c", disks=(4 << 20,))
    put_tree(cdir, make_tree(tmp_path / "tree", files=10))
    medium = small_tmpfs / "m"
    r = cli("backup", cdir, "--medium", medium, "--compress", "none", "--json")
    assert r.code == 0, r.err
    first = json.loads(r.out)["generation"]
    free_before = os.statvfs(small_tmpfs).f_bavail
    big = tmp_path / "big"
    big.mkdir()
    (big / "random.bin").write_bytes(os.urandom(1536 << 10))
    put_tree(cdir, big)
    r = cli("backup", cdir, "--medium", medium, "--compress", "none")
    assert r.code == 6, r.out + r.err
    assert "is full" in r.err and "not committed" in r.err and "intact" in r.err
    # not committed, cleaned up, and nothing earlier harmed
    assert os.listdir(medium / "generations") == [first]
    assert os.statvfs(small_tmpfs).f_bavail == free_before
    r = cli("generations", "--medium", medium, "--json")
    assert [g["id"] for g in json.loads(r.out)["generations"]] == [first]
    assert cli("verify", "--medium", medium).code == 0
    # still usable: with the big file gone the next backup fits
    with open_cluster(cdir) as c:
        c.fs.unlink(c.fs.resolve("/big").ino, b"random.bin")
    r = cli("backup", cdir, "--medium", medium, "--compress", "zstd")
    assert r.code == 0, r.err
    assert cli("verify", "--medium", medium, "--all").code == 0
    out = tmp_path / "out"
    assert cli("restore", "--medium", medium, first, "--to", out).code == 0
    assert (out / "tree").is_dir()


def _fill(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while os.write(fd, b"x" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return os.path.getsize(path)


def test_medium_full_at_every_stage(small_tmpfs: Path, tmp_path: Path) -> None:
    """The medium fills up at the snapshot, the stream, the index or the manifest (by
    leaving less and less room): each time a clear error (exit 6), the generation is
    gone, and what the medium held is intact. A medium that cannot even be created is
    left as it was."""
    cdir = make_cluster(tmp_path / "c", disks=(4 << 20,))
    put_tree(cdir, make_tree(tmp_path / "tree", files=8))
    medium = small_tmpfs / "m"
    assert cli("backup", cdir, "--medium", medium, "--compress", "none").code == 0
    filler = small_tmpfs / "filler"
    outcomes = []
    for room in (4, 16, 48, 96, 160, 240, 320):
        size = _fill(filler)
        os.truncate(filler, max(0, size - room * 1024))
        before = sorted(os.listdir(medium / "generations"))
        r = cli("backup", cdir, "--medium", medium, "--compress", "none")
        outcomes.append(r.code)
        if r.code == 6:
            assert "is full" in r.err, r.err
            assert sorted(os.listdir(medium / "generations")) == before
        else:
            assert r.code == 0, r.err
    assert 6 in outcomes, outcomes
    other = small_tmpfs / "new-medium"
    _fill(filler)
    r = cli("backup", cdir, "--medium", other)
    assert r.code == 6 and "full" in r.err
    assert not other.exists()
    filler.unlink()
    assert cli("backup", cdir, "--medium", other).code == 0
    r = cli("verify", "--medium", medium, "--all")
    assert r.code == 0, r.out
    assert r.out.count(": OK") == 1 + outcomes.count(0)
