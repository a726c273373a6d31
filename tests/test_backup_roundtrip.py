"""Full backup round trips: files (diff -r), disk images (cmp), whole clusters (fsck)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_backup_support import (
    SMALL,
    backup,
    cli,
    diff_trees,
    gen_dir,
    make_cluster,
    make_tree,
    put_tree,
)

from sdbackup.backup.engine import BackupOptions, parse_compression, run_backup
from sdbackup.blocks.source import read_blocks
from sdbackup.cluster.backup_source import LocalClusterSource
from sdbackup.cluster.local import open_cluster
from sdbackup.errors import UsageError
from sdbackup.fs import transfer
from sdbackup.media.generation import Generation, GenerationReader
from sdbackup.media.medium import GEN_ID_RE, new_generation_id
from sdbackup.media.record_format import Kind
from sdbackup.media.record_reader import RecordReader
from sdbackup.types import DiskId


@pytest.fixture
def populated(tmp_path: Path) -> tuple[Path, Path]:
    cdir = make_cluster(tmp_path / "c")
    tree = make_tree(tmp_path / "tree")
    put_tree(cdir, tree)
    return cdir, tree


@pytest.mark.parametrize("compress", ["none", "zstd:3"])
def test_cli_round_trip_files_images_cluster(populated: tuple[Path, Path], tmp_path: Path,
                                             compress: str) -> None:
    cdir, tree = populated
    medium = tmp_path / "medium"
    r = cli("backup", cdir, "--medium", medium, "--compress", compress, "--json")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    gid = summary["generation"]
    assert GEN_ID_RE.match(gid)
    assert summary["compression"] == ("none" if compress == "none" else "zstd:3")

    # files
    r = cli("restore", "--medium", medium, "--to", tmp_path / "out")
    assert r.code == 0, r.err
    assert diff_trees(tree, tmp_path / "out" / "tree") == []

    # images: byte-identical to the disks, unused blocks as holes
    for name in ("d0", "d1"):
        img = tmp_path / f"{name}.restored"
        r = cli("restore-image", "--medium", medium, gid, "--disk", name, "--to", img)
        assert r.code == 0, r.err
        assert subprocess.run(["cmp", str(img), str(cdir.parent / f"{name}.img")]).returncode == 0
        assert os.stat(img).st_blocks * 512 < os.stat(img).st_size  # sparse

    # a whole cluster: fsck accepts it and its files equal the originals
    new = tmp_path / "restored-cluster"
    r = cli("restore-cluster", "--medium", medium, "--to", new,
            "--disk", f"d1={tmp_path / 'elsewhere-d1.img'}")
    assert r.code == 0, r.err
    assert (tmp_path / "elsewhere-d1.img").exists()
    r = cli("fsck", new)
    assert r.code == 0, r.out + r.err
    with open_cluster(new) as c:
        assert c.config.cluster_id != json.loads(cli("info", cdir, "--json").out)["cluster_id"]
        assert c.store.get_meta("restored_from_generation") == gid
        transfer.get(c.fs, "/tree", tmp_path / "from-cluster")
    assert diff_trees(tree, tmp_path / "from-cluster") == []
    # the restored cluster can be backed up (to a medium of its own)
    assert cli("backup", new, "--medium", tmp_path / "medium2", "-q").code == 0
    r = cli("backup", new, "--medium", medium)
    assert r.code == 2 and "holds backups of cluster" in r.err


def test_generation_reader_equals_live_disks(populated: tuple[Path, Path],
                                             tmp_path: Path) -> None:
    cdir, _ = populated
    res = backup(cdir, tmp_path / "m")
    rng = np.random.default_rng(3)
    with open_cluster(cdir) as c, GenerationReader.open(tmp_path / "m") as g:
        assert g.block_size == c.config.block_size
        for d in c.config.disks:
            nb = c.meta.bitmaps[d.id].nblocks
            used = np.zeros(nb, dtype=bool)
            for s, n in c.meta.used_runs(d.id):
                used[s : s + n] = True
            bs = g.block_size
            for _ in range(40):
                b = int(rng.integers(0, nb))
                n = int(rng.integers(1, min(300, nb - b) + 1))
                got = np.frombuffer(g.read(d.name, b, n), dtype=np.uint8).reshape(n, bs)
                raw = read_blocks(c.disks, DiskId(d.id), b, n)
                live = np.frombuffer(raw, dtype=np.uint8).reshape(n, bs)
                u = used[b : b + n]
                assert (got[u] == live[u]).all()
                assert not got[~u].any()  # unused blocks read as zeros
        with pytest.raises(UsageError):
            g.read("d0", 0, 10**9)
        with pytest.raises(UsageError):
            g.read("nope", 0, 1)
    assert res.manifest.blocks == sum(d.blocks for d in res.manifest.disks)


def test_copy_coalesces_runs_across_files_and_stores_only_used(tmp_path: Path) -> None:
    cdir = make_cluster(tmp_path / "c", disks=(2 << 20,))
    tree = tmp_path / "t"
    tree.mkdir()
    for i in range(40):
        (tree / f"f{i}").write_bytes(os.urandom(700))  # 2 blocks each, 40 files
    put_tree(cdir, tree)
    with open_cluster(cdir) as c:  # punch holes between files: delete every third one
        root = c.fs.resolve("/t")
        for i in range(0, 40, 3):
            c.fs.unlink(root.ino, f"f{i}".encode())
        runs = c.meta.used_runs(1)
    assert len(runs) > 5
    opts = BackupOptions(compression="none", batch_bytes=1 << 20, record_bytes=1 << 20,
                         gap_bytes=4 << 10)
    res = backup(cdir, tmp_path / "m", opts)
    extra = res.manifest.extra["copy"]
    # one large read covered many files and the gaps between them ...
    assert extra["batches"] == 1
    assert extra["read_bytes"] > res.manifest.blocks * 512
    # ... but only used blocks were stored: one record per run
    assert extra["records"] == len(runs)
    with RecordReader(gen_dir(tmp_path / "m", res.manifest.id) / "stream-0.sdr") as rd:
        stored = [(r.header.start_block, r.header.block_count) for r in rd.scan()
                  if r.kind == Kind.DATA]
    assert stored == [tuple(r) for r in runs]


def test_restore_patterns_select_subtrees(populated: tuple[Path, Path], tmp_path: Path) -> None:
    cdir, tree = populated
    medium = tmp_path / "m"
    gid = backup(cdir, medium).manifest.id
    out = tmp_path / "out"
    r = cli("restore", "--medium", medium, gid, "--to", out, "/tree/a/b", "tree/c/*link*")
    assert r.code == 0, r.err
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert "tree/a/b/f01.bin" in got and "tree/a/b/d" in got
    assert "tree/c/dir-link" in got and "tree/c/hardlink" in got
    assert "tree/c/sparse" not in got and "tree/a/f00.bin" not in got
    assert diff_trees(tree / "a" / "b", out / "tree" / "a" / "b") == []
    assert os.readlink(out / "tree" / "c" / "dir-link") == "../a"
    # a pattern that matches nothing: exit 4, nothing restored
    r = cli("restore", "--medium", medium, "--to", tmp_path / "o2", "/tree/none*")
    assert r.code == 4 and "nothing matching" in r.err
    assert not (tmp_path / "o2").exists()
    # --to must be new or empty
    r = cli("restore", "--medium", medium, "--to", out)
    assert r.code == 2 and "not empty" in r.err


def test_generations_listing_and_defaults(populated: tuple[Path, Path], tmp_path: Path) -> None:
    cdir, _ = populated
    medium = tmp_path / "m"
    first = backup(cdir, medium).manifest
    put_tree(cdir, make_tree(tmp_path / "more", seed=2, files=5))
    second = backup(cdir, medium).manifest
    assert first.id < second.id  # ids sort in time order
    r = cli("generations", "--medium", medium, "--json")
    assert r.code == 0
    data = json.loads(r.out)
    assert [g["id"] for g in data["generations"]] == [first.id, second.id]
    g = data["generations"][1]
    assert g["kind"] == "full" and g["parent"] is None and g["state"] == "committed"
    assert g["blocks"] == second.blocks > first.blocks
    assert g["stored_bytes"] == second.stored_bytes
    r = cli("generations", "--medium", medium)
    assert first.id in r.out and second.id in r.out
    # GEN defaults to the newest; a unique prefix works too
    assert Generation.open(medium).id == second.id
    assert Generation.open(medium, first.id[:24]).id == first.id
    r = cli("verify", "--medium", medium, "--all")
    assert r.code == 0 and r.out.count(": OK") == 2


def test_backup_holds_writes_and_reflects_t0(tmp_path: Path) -> None:
    """Until online backup lands, a write that comes during the backup waits for its
    end and is not in the generation; everything written before is."""
    cdir = make_cluster(tmp_path / "c", disks=(2 << 20,))
    with open_cluster(cdir) as c:
        f = c.fs.create(1, b"file")
        c.fs.write(f.ino, 0, b"A" * 5000)
        done = threading.Event()
        started = threading.Event()

        def writer() -> None:
            started.wait()
            c.fs.write(f.ino, 0, b"B" * 5000)
            done.set()

        t = threading.Thread(target=writer)
        t.start()
        source = LocalClusterSource(c)

        def on_plan(_plan: object) -> None:
            started.set()
            time.sleep(0.3)
            assert not done.is_set()  # held

        res = run_backup(source, tmp_path / "m", SMALL, on_plan=on_plan)
        t.join(5)
        assert done.is_set()
        assert c.fs.read(f.ino, 0, 10) == b"B" * 10
    assert res.manifest.freeze_seconds >= 0.3
    out = tmp_path / "out"
    assert cli("restore", "--medium", tmp_path / "m", "--to", out).code == 0
    assert (out / "file").read_bytes() == b"A" * 5000


def test_empty_cluster_and_bad_options(tmp_path: Path) -> None:
    cdir = make_cluster(tmp_path / "c", disks=(1 << 20,))
    r = cli("backup", cdir, "--medium", tmp_path / "m", "--compress", "none")
    assert r.code == 0, r.err
    assert cli("verify", "--medium", tmp_path / "m").code == 0
    out = tmp_path / "o"
    assert cli("restore", "--medium", tmp_path / "m", "--to", out).code == 0
    assert list(out.iterdir()) == []
    for bad in ("lz4", "zstd:0", "zstd:99", "zstd:x", "none:3"):
        r = cli("backup", cdir, "--medium", tmp_path / "m", "--compress", bad)
        assert r.code == 2 and "compression" in r.err
    assert parse_compression("ZSTD") == ("zstd", 1)
    r = cli("backup", tmp_path / "no-cluster", "--medium", tmp_path / "m")
    assert r.code == 4
    assert sorted(GEN_ID_RE.match(new_generation_id()) is not None for _ in range(3)) == [True] * 3


def test_help_says_when_writes_are_held() -> None:
    r = cli("backup", "--help")
    assert r.code == 0
    assert "Without --log-mode, writes are held for the whole backup" in " ".join(r.out.split())
