"""Backups on tape, end to end, on file-backed tapes: several generations (a full and
incrementals) written to a tape set that spans two tapes, restored and mounted
through the disk buffer, the catalog rebuilt from the tapes alone, and bad media."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_backup_support import (
    SMALL,
    backup,
    cli,
    diff_trees,
    make_cluster,
    make_tree,
    put_tree,
    require_fuse,
)

from sdbackup.cluster.local import open_cluster
from sdbackup.media.tape.catalog import TapeCatalog
from sdbackup.media.tape.filetape import FileTape
from sdbackup.media.tape.library import open_set
from sdbackup.types import ROOT_INODE

KiB = 1 << 10


@dataclasses.dataclass
class World:
    base: Path
    cluster: Path
    medium: Path
    gens: list[str]
    trees: dict[str, Path]  # generation -> the tree at its T0
    tapes: list[Path]
    catalog: Path

    def tape_args(self, *which: int) -> list[str]:
        out = []
        for i in which or range(len(self.tapes)):
            out += ["--tape", f"file:{self.tapes[i]}"]
        return out


def _new_tape(path: Path) -> Path:
    FileTape.create(path, 512 * KiB, early_warning=32 * KiB, max_block=64 * KiB)
    return path


def _snapshot_tree(cluster: Path, dest: Path) -> Path:
    from sdbackup.fs import transfer

    with open_cluster(cluster) as c:
        transfer.get(c.fs, "/tree", dest)
    return dest


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp("tape")
    cluster = make_cluster(base / "c")
    tree = make_tree(base / "tree")
    put_tree(cluster, tree)
    medium = base / "medium"
    gens, trees = [], {}
    for step in range(3):
        if step:
            with open_cluster(cluster) as c:
                t = c.fs.lookup(ROOT_INODE, b"tree").ino
                a = c.fs.lookup(t, b"a").ino
                f = c.fs.create(a, f"new{step}.bin".encode()).ino
                c.fs.write(f, 0, os.urandom(40_000 + step))
                g = c.fs.lookup(a, b"f00.bin").ino
                c.fs.write(g, 100, f"changed in step {step}".encode())
        opts = dataclasses.replace(SMALL, incremental=bool(step))
        r = backup(cluster, medium, opts)
        gens.append(r.manifest.id)
        trees[r.manifest.id] = _snapshot_tree(cluster, base / f"t0-{step}")
    tapes = [_new_tape(base / "t1.tape"), _new_tape(base / "t2.tape")]
    w = World(base, cluster, medium, gens, trees, tapes, base / "catalog")
    r = cli("tape", "write", "--medium", medium, *w.tape_args(), "--catalog", w.catalog,
            "--block-size", "4KiB", "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["written"] == gens
    assert len(rep["tapes"]) == 2, "the set should span two tapes"
    return w


def _restore(w: World, gen: str, dest: Path, *extra: str | os.PathLike[str]) -> None:
    r = cli("restore", *w.tape_args(), "--buffer", w.base / "buf", "--catalog", w.catalog,
            gen, "--to", dest, "-q", *extra)
    assert r.code == 0, r.err


def test_every_generation_restores_from_a_set_of_two_tapes(world: World) -> None:
    for i, g in enumerate(world.gens):
        out = world.base / f"restored-{i}"
        _restore(world, g, out)
        assert diff_trees(world.trees[g], out / "tree") == [], g


def test_tape_ls_and_catalog_show_where_generations_lie(world: World) -> None:
    r = cli("tape", "ls", *world.tape_args(), "--json")
    assert r.code == 0, r.err
    listing = json.loads(r.out)
    assert [t["label"]["sequence"] for t in listing] == [1, 2]
    parts = [(f["generation"], f["part"]) for t in listing for f in t["files"]]
    for g in world.gens:
        assert (g, "manifest.json") in parts and (g, "stream-0.sdr") in parts
    continued = [f for f in listing[1]["files"] if f["offset"]]
    assert continued, "a part should continue on the second tape"
    r = cli("tape", "catalog", "--catalog", world.catalog, "--json")
    assert r.code == 0, r.err
    cat = json.loads(r.out)
    assert [g["id"] for g in cat[0]["generations"]] == world.gens


def test_catalog_rebuilt_from_the_tapes_alone(world: World) -> None:
    fresh = world.base / "catalog-rebuilt"
    r = cli("tape", "catalog", "--rebuild", *world.tape_args(), "--catalog", fresh, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["generations"] == world.gens
    old = json.loads(cli("tape", "catalog", "--catalog", world.catalog, "--json").out)
    new = json.loads(cli("tape", "catalog", "--catalog", fresh, "--json").out)
    assert [g["parts"] for g in old[0]["generations"]] == \
        [g["parts"] for g in new[0]["generations"]]
    out = world.base / "restored-rebuilt"
    r = cli("restore", *world.tape_args(), "--buffer", world.base / "buf-r", "--catalog",
            fresh, world.gens[-1], "--to", out, "-q")
    assert r.code == 0, r.err
    assert diff_trees(world.trees[world.gens[-1]], out / "tree") == []
    # Without a tape of the set, the rebuild names the missing one.
    r = cli("tape", "catalog", "--rebuild", *world.tape_args(1), "--catalog",
            world.base / "catalog-partial")
    assert r.code == 4 and "tape #1 of set" in r.err and "missing" in r.err


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_image_restore_from_tape_is_one_pass(world: World) -> None:
    for g in (world.gens[0], world.gens[-1]):
        disk_img = world.base / f"img-disk-{g}"
        r = cli("restore-image", "--medium", world.medium, g, "--disk", "d0", "--to",
                disk_img, "-q")
        assert r.code == 0, r.err
        shutil.rmtree(world.base / "buf-img", ignore_errors=True)
        with open_set([f"file:{t}" for t in world.tapes], world.base / "buf-img",
                      catalog=TapeCatalog(world.catalog), limit=64 << 20) as s:
            from sdbackup.media.chain import ChainReader
            from sdbackup.restore.image import restore_image

            with ChainReader(s.medium, s.medium.resolve(g)) as rd:
                restore_image(rd, "d0", world.base / f"img-tape-{g}")
            seeks = [d.stats.seeks for d in s.lib.devices]
            loaded = s.buffer.stats.order
        assert _sha(disk_img) == _sha(world.base / f"img-tape-{g}")
        # One pass: every tape block is loaded once, in ascending order per tape, and
        # the tapes in the order of the set.
        assert len(loaded) == len(set(loaded))
        per_tape: dict[str, list[int]] = {}
        for t, b in loaded:
            per_tape.setdefault(t, []).append(b)
        assert all(v == sorted(v) for v in per_tape.values()), per_tape
        assert all(list(s) == sorted(s) for s in seeks), seeks


def test_mount_from_tape_through_the_buffer(world: World) -> None:
    require_fuse("mounting a backup on tape", "diff")
    mp = world.base / "mnt"
    mp.mkdir()
    g = world.gens[-1]
    buf = world.base / "buf-mount"
    for _attempt in range(2):  # the second mount finds the blocks in the buffer
        r = cli("mount", *world.tape_args(), "--buffer", buf, "--catalog", world.catalog, g,
                mp, "--background", "--log-file", world.base / "mount.log")
        assert r.code == 0, r.err
        try:
            d = subprocess.run(["diff", "-r", "--no-dereference", world.trees[g], mp / "tree"],
                               capture_output=True, text=True)
            assert d.returncode == 0, d.stdout + d.stderr
        finally:
            assert cli("umount", mp).code == 0
            for _ in range(100):
                if not os.path.ismount(mp):
                    break
                time.sleep(0.05)
        _wait_released(world.tapes)  # the serving process has let go of the drives
    import sqlite3

    with sqlite3.connect(buf / "buffer.db") as db:
        assert db.execute("SELECT COUNT(*) FROM blocks").fetchone()[0] > 0


def _wait_released(tapes: list[Path]) -> None:
    from sdbackup.errors import BusyError

    for _ in range(200):
        try:
            for t in tapes:
                FileTape.open(t, write=False).close()
            return
        except BusyError:
            time.sleep(0.05)
    raise AssertionError("the mount process still holds the tapes")


# -- bad media ------------------------------------------------------------------------------


def test_bad_media_are_one_clear_error(world: World, tmp_path: Path) -> None:
    g = world.gens[0]
    # a blank tape holds no backup
    blank = _new_tape(tmp_path / "blank.tape")
    r = cli("restore", "--tape", f"file:{blank}", "--buffer", tmp_path / "b", "--catalog",
            world.catalog, g, "--to", tmp_path / "o1")
    assert r.code == 2 and "carries an sdbackup label" in r.err
    # a foreign tape: block 0 is not a label
    foreign = _new_tape(tmp_path / "foreign.tape")
    t = FileTape.open(foreign)
    t.write(b"tar archive, not sdbackup" * 10)
    t.write_filemarks()
    t.close()
    r = cli("tape", "ls", "--tape", f"file:{foreign}")
    assert r.code == 2 and "is not an sdbackup tape" in r.err and str(foreign) in r.err
    r = cli("tape", "label", "--tape", f"file:{foreign}", "--medium", world.medium)
    assert r.code == 2 and "--force" in r.err
    # a labelled tape is not labelled again without --force
    r = cli("tape", "label", "--tape", f"file:{world.tapes[0]}", "--medium", world.medium)
    assert r.code == 2 and "labelled already" in r.err and "--force" in r.err
    # a tape of another set next to this set's tape
    other = _new_tape(tmp_path / "other.tape")
    assert cli("tape", "label", "--tape", f"file:{other}", "--cluster", "x", "--block-size",
               "4KiB", "--catalog", tmp_path / "cat-x").code == 0
    r = cli("restore", "--tape", f"file:{world.tapes[0]}", "--tape", f"file:{other}",
            "--buffer", tmp_path / "b", "--catalog", world.catalog, g, "--to", tmp_path / "o2")
    assert r.code == 2 and "different tape sets" in r.err
    # writing to another cluster's tape is refused
    r = cli("tape", "write", "--medium", world.medium, "--tape", f"file:{other}",
            "--catalog", tmp_path / "cat")
    assert r.code == 2 and "holds backups of cluster x" in r.err
    # a missing tape of the set: the tape and where to give it are named
    r = cli("restore", "--tape", f"file:{world.tapes[1]}", "--buffer", tmp_path / "b2",
            "--catalog", world.catalog, world.gens[-1], "--to", tmp_path / "o3", "-q")
    assert r.code == 4 and "is in none of the drives given" in r.err
    tape1 = TapeCatalog(world.catalog).placement(TapeCatalog(world.catalog).sets()[0],
                                                 world.gens[0])["stream-0.sdr"][0].tape
    assert f"tape {tape1} is needed" in r.err


def test_a_damaged_record_on_tape_names_tape_and_block(world: World, tmp_path: Path) -> None:
    t1 = tmp_path / "t1.tape"
    t2 = tmp_path / "t2.tape"
    shutil.copyfile(world.tapes[0], t1)
    shutil.copyfile(world.tapes[1], t2)
    cat = TapeCatalog(world.catalog)
    set_id = cat.sets()[0]
    p = cat.placement(set_id, world.gens[0])["stream-0.sdr"][0]
    # flip bytes inside the 3rd data block of the full's stream, on tape 1
    t = FileTape.open(t1)
    off = t._offs[p.block + 2] + 16 + 1000
    t.close()
    with open(t1, "r+b") as f:
        f.seek(off)
        f.write(b"\xff" * 16)
    r = cli("restore", "--tape", f"file:{t1}", "--tape", f"file:{t2}", "--buffer",
            tmp_path / "b", "--catalog", world.catalog, world.gens[0], "--to",
            tmp_path / "out", "-q")
    assert r.code == 5
    assert f"tape {p.tape} (#1), file {p.file}, block {p.block + 2}" in r.err
