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
