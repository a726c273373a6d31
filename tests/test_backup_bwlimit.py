"""``backup --bwlimit``: the copy reads the disks no faster than asked (an online backup
leaves the rest of the bandwidth to the applications), and the backup stays exact."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from test_backup_support import SMALL, cli, make_cluster, make_tree, put_tree

from sdbackup.backup.engine import run_backup
from sdbackup.cluster.backup_source import LocalClusterSource
from sdbackup.cluster.local import open_cluster
from sdbackup.media.generation import Generation, GenerationReader
from sdbackup.restore.files import restore_files


def test_bwlimit_paces_the_copy_and_the_backup_restores_exactly(tmp_path: Path) -> None:
    cdir = make_cluster(tmp_path / "c", block_size=4096, disks=(32 << 20,))
    tree = make_tree(tmp_path / "tree", files=12)
    put_tree(cdir, tree, "/")
    with open_cluster(cdir) as c:
        fast = run_backup(LocalClusterSource(c), tmp_path / "m1", SMALL)
        read = fast.read_bytes
        limit = max(1, int(read / 0.6))  # the whole copy should take about 0.6 s
        t = time.monotonic()
        slow = run_backup(LocalClusterSource(c), tmp_path / "m2", replace(SMALL, bwlimit=limit))
        took = time.monotonic() - t
    assert slow.read_bytes == read
    assert took >= 0.45, f"{read} bytes at {limit} B/s took only {took:.2f} s"
    assert fast.seconds < took
    gen = Generation.open(tmp_path / "m2", slow.manifest.id)
    with GenerationReader(gen) as reader:
        restore_files(gen, reader, tmp_path / "out", [])
    for p in tree.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert (tmp_path / "out" / p.relative_to(tmp_path)).read_bytes() == p.read_bytes()


def test_bad_bwlimit_is_one_line_exit_2(tmp_path: Path) -> None:
    cdir = make_cluster(tmp_path / "c")
    r = cli("backup", cdir, "--medium", tmp_path / "m", "--bwlimit", "fast")
    assert r.code == 2, r
    assert r.err.count("\n") == 1 and "--bwlimit 'fast'" in r.err, r.err
    assert not (tmp_path / "m").exists()


def test_adaptive_pace_rests_only_while_applications_write(tmp_path: Path) -> None:
    """--pace adaptive: a batch read while the cluster's write mappings grew is followed
    by a rest of twice its read time; with no writes, no rest. The backup is exact."""
    from sdbackup.backup.engine import PACE_RATIO, _adaptive_pace

    class Source:
        ops = 0

        def write_activity(self) -> int:
            return self.ops

    src = Source()
    pace = _adaptive_pace(src)  # type: ignore[arg-type]
    assert pace(0.01) == 0.0  # nobody wrote
    src.ops += 3
    assert pace(0.01) == PACE_RATIO * 0.01
    assert pace(0.01) == 0.0  # nothing new since

    cdir = make_cluster(tmp_path / "c", block_size=4096, disks=(32 << 20,))
    tree = make_tree(tmp_path / "tree", files=12)
    put_tree(cdir, tree, "/")
    with open_cluster(cdir) as c:
        before = c.meta.write_ops
        ino = c.fs.lookup(1, b"tree").ino
        assert ino
        f = c.fs.create(1, b"busy").ino
        c.fs.write(f, 0, b"x" * 8192)
        assert c.meta.write_ops > before  # the counter pacing reads
        r = run_backup(LocalClusterSource(c), tmp_path / "m", replace(SMALL, pace="adaptive"))
    gen = Generation.open(tmp_path / "m", r.manifest.id)
    with GenerationReader(gen) as reader:
        restore_files(gen, reader, tmp_path / "out", [])
    assert (tmp_path / "out" / "busy").read_bytes() == b"x" * 8192


def test_bad_pace_is_a_usage_error(tmp_path: Path) -> None:
    r = cli("backup", make_cluster(tmp_path / "c"), "--medium", tmp_path / "m",
            "--pace", "sometimes")
    assert r.code == 2 and not (tmp_path / "m").exists(), r
