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
