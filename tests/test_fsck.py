"""``sdbackup fsck``: passes on a healthy cluster; each check catches exactly its damage.

Every case corrupts one invariant of the metadata store with plain sqlite3 (as a bug
or a bad disk would), keeping every other invariant intact, then runs the real
``sdbackup fsck`` and asserts exit 1 with that check's name and no other. The same
damage is also run through each check function in-process, and a test makes sure
every function in ``fsck.CHECKS`` has a case.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from sdbackup.cluster.local import DiskSpec, init_cluster, open_cluster
from sdbackup.errors import EXIT_CHECK_FAILED
from sdbackup.fs import transfer
from sdbackup.meta import fsck
from sdbackup.meta.alloc import CHUNK_BITS, CHUNK_BYTES
from sdbackup.meta.store import MetaStore

SDBACKUP = Path(sys.executable).with_name("sdbackup")
BS = 512
D1_BLOCKS = 40_000  # more than CHUNK_BITS: disk d1's bitmap spans two chunks


def run(*args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(SDBACKUP), *map(str, args)], capture_output=True, text=True,
                          timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


# -- the damaged store, through sqlite3 ------------------------------------------------------

class Db:
    """A sqlite3 connection to CLUSTER_DIR/meta.db with the helpers the damage needs."""

    def __init__(self, path: Path) -> None:
        self.con = sqlite3.connect(path, isolation_level=None)

    def rows(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple]:  # type: ignore[type-arg]
        return self.con.execute(sql, params).fetchall()

    def do(self, sql: str, params: tuple[object, ...] = ()) -> None:
        cur = self.con.execute(sql, params)
        assert cur.rowcount != 0, sql  # the damage must hit something

    def ino(self, path: str) -> int:
        """The inode of a path of the template's tree (which lives under /src)."""
        ino = 1
        for name in ("src" + path).rstrip("/").split("/"):
            (ino,), = self.rows("SELECT ino FROM dirents WHERE parent=? AND name=?",
                                (ino, name.encode()))
        return int(ino)

    def extents(self, path: str) -> list[tuple[int, int, int, int]]:
        return [(int(a), int(b), int(c), int(d)) for a, b, c, d in self.rows(
            "SELECT fblock, count, disk, dblock FROM extents WHERE ino=? ORDER BY fblock",
            (self.ino(path),))]

    def nblocks(self, disk: int) -> int:
        return int(self.rows("SELECT nblocks FROM disks WHERE id=?", (disk,))[0][0])

    # Bitmap chunks: bit i of byte j of chunk c of a disk is block c*CHUNK_BITS + j*8 + i.
    def bit(self, disk: int, block: int) -> bool:
        chunk, off = divmod(block, CHUNK_BITS)
        row = self.rows("SELECT bits FROM alloc WHERE disk=? AND chunk=?", (disk, chunk))
        if not row or len(row[0][0]) <= off // 8:
            return False
        return bool(row[0][0][off // 8] >> (off % 8) & 1)

    def set_bits(self, disk: int, start: int, count: int, value: bool) -> None:
        for block in range(start, start + count):
            chunk, off = divmod(block, CHUNK_BITS)
            row = self.rows("SELECT bits FROM alloc WHERE disk=? AND chunk=?", (disk, chunk))
            bits = bytearray(row[0][0]) if row else bytearray(CHUNK_BYTES)
            if len(bits) <= off // 8:
                bits.extend(bytes(off // 8 + 1 - len(bits)))
            if value:
                bits[off // 8] |= 1 << (off % 8)
            else:
                bits[off // 8] &= ~(1 << (off % 8)) & 0xFF
            self.con.execute("INSERT OR REPLACE INTO alloc(disk, chunk, bits) VALUES (?,?,?)",
                             (disk, chunk, bytes(bits)))

    def free_block(self, disk: int) -> int:
        """The last block of a disk (free: the files are small and allocated from the start)."""
        block = self.nblocks(disk) - 1
        assert not self.bit(disk, block)
        return block

    def close(self) -> None:
        self.con.close()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A healthy cluster with files on both disks; tests copy its directory."""
    base = tmp_path_factory.mktemp("fsck-template")
    cdir = base / "cluster"
    init_cluster(cdir, [DiskSpec("d0", base / "d0.img", 4 << 20),
                        DiskSpec("d1", base / "d1.img", D1_BLOCKS * BS)], block_size=BS)
    src = base / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "big").write_bytes(os.urandom(40 * BS))
    (src / "mid").write_bytes(os.urandom(3 * BS))
    (src / "small").write_bytes(b"s" * 100)
    (src / "empty").write_bytes(b"")
    (src / "a" / "b" / "deep").write_bytes(os.urandom(5 * BS + 1))
    (src / "a" / "other").write_bytes(os.urandom(2 * BS))
    os.symlink("big", src / "link")
    os.link(src / "mid", src / "a" / "mid-link")
    with open_cluster(cdir) as c:
        transfer.put(c.fs, src, "/")
    return cdir


@pytest.fixture
def cdir(template: Path, tmp_path: Path) -> Path:
    """A private copy of the template's cluster directory (its disks are only read)."""
    dest = tmp_path / "cluster"
    shutil.copytree(template, dest)
    (dest / "lock").unlink(missing_ok=True)
    return dest


def test_template_bitmap_helpers_agree_with_the_cli(cdir: Path) -> None:
    """The test's own bit order must be the store's, or the damage below means nothing."""
    db = Db(cdir / "meta.db")
    try:
        disks = dict(db.rows("SELECT name, id FROM disks"))
        used: set[tuple[int, int]] = set()
        for line in run("blocks", cdir, "--used").stdout.splitlines():
            name, start, count = line.split()
            used.update((disks[name], b) for b in range(int(start), int(start) + int(count)))
        mine = {(d, b) for d in disks.values() for b in range(db.nblocks(d)) if db.bit(d, b)}
        assert mine == used
        assert {d for d, _ in used} == {1, 2}  # files on both disks
    finally:
        db.close()


def test_healthy_cluster_passes(cdir: Path) -> None:
    proc = run("fsck", cdir)
    assert f"consistent ({len(fsck.CHECKS)} checks passed)" in proc.stdout
    assert json.loads(run("fsck", cdir, "--json").stdout) == []


# -- one case per invariant ------------------------------------------------------------------

def extent_past_disk_end(db: Db) -> None:
    fb, cnt, disk, dblock = db.extents("/big")[0]
    db.set_bits(disk, dblock, cnt, False)  # the old blocks are free now, consistently
    db.do("UPDATE extents SET dblock=? WHERE ino=? AND fblock=?",
          (db.nblocks(disk) - cnt + 1, db.ino("/big"), fb))


def extent_on_unknown_disk(db: Db) -> None:
    fb, cnt, disk, dblock = db.extents("/mid")[0]
    db.set_bits(disk, dblock, cnt, False)
    db.do("UPDATE extents SET disk=99 WHERE ino=? AND fblock=?", (db.ino("/mid"), fb))


def file_block_mapped_twice(db: Db) -> None:
    fb, cnt, disk, _ = db.extents("/big")[0]
    assert cnt >= 2
    free = db.free_block(disk)
    db.set_bits(disk, free, 1, True)
    db.do("INSERT INTO extents(ino, fblock, count, disk, dblock) VALUES (?,?,1,?,?)",
          (db.ino("/big"), fb + 1, disk, free))


def block_of_two_files(db: Db) -> None:
    _, _, bdisk, bblock = db.extents("/big")[0]
    fb, cnt, disk, dblock = db.extents("/small")[0]
    db.set_bits(disk, dblock, cnt, False)
    db.do("UPDATE extents SET disk=?, dblock=? WHERE ino=? AND fblock=?",
          (bdisk, bblock + 1, db.ino("/small"), fb))


def used_block_marked_free(db: Db) -> None:
    _, cnt, disk, dblock = db.extents("/a/b/deep")[0]
    db.set_bits(disk, dblock + cnt - 1, 1, False)


def free_block_marked_used(db: Db) -> None:
    db.set_bits(1, db.free_block(1), 1, True)


def free_block_in_second_chunk_marked_used(db: Db) -> None:
    block = CHUNK_BITS + 1000
    assert block < db.nblocks(2) and not db.bit(2, block)
    db.set_bits(2, block, 1, True)


def size_too_small(db: Db) -> None:
    db.do("UPDATE inodes SET size=? WHERE id=?", (BS + 1, db.ino("/big")))


def extents_of_a_directory(db: Db) -> None:
    free = db.free_block(1)
    db.set_bits(1, free, 1, True)
    db.do("INSERT INTO extents(ino, fblock, count, disk, dblock) VALUES (?,0,1,1,?)",
          (db.ino("/a"), free))


def dirent_names_a_missing_inode(db: Db) -> None:
    db.do("DELETE FROM inodes WHERE id=?", (db.ino("/empty"),))


def dirent_in_a_non_directory(db: Db) -> None:
    db.do("UPDATE dirents SET parent=? WHERE ino=?", (db.ino("/small"), db.ino("/empty")))


def nlink_too_high(db: Db) -> None:
    db.do("UPDATE inodes SET nlink=nlink+1 WHERE id=?", (db.ino("/big"),))


def nlink_zero_but_named(db: Db) -> None:
    db.do("UPDATE inodes SET nlink=0 WHERE id=?", (db.ino("/mid"),))


def directory_nlink_wrong(db: Db) -> None:
    db.do("UPDATE inodes SET nlink=2 WHERE id=?", (db.ino("/a"),))  # has a subdirectory


def directory_cycle(db: Db) -> None:
    top, a, b = db.ino("/"), db.ino("/a"), db.ino("/a/b")
    db.do("UPDATE dirents SET parent=? WHERE ino=?", (b, a))  # a inside b inside a
    db.do("UPDATE inodes SET nlink=nlink-1 WHERE id=?", (top,))  # keep link counts right
    db.do("UPDATE inodes SET nlink=nlink+1 WHERE id=?", (b,))


@dataclass(frozen=True)
class Case:
    damage: Callable[[Db], None]
    check: Callable[[MetaStore], list[fsck.Problem]]
    name: str  # the check's name as fsck reports it


CASES = [
    Case(extent_past_disk_end, fsck.check_extent_bounds, "extent_bounds"),
    Case(extent_on_unknown_disk, fsck.check_extent_bounds, "extent_bounds"),
    Case(file_block_mapped_twice, fsck.check_overlapping_file_blocks, "file_overlap"),
    Case(block_of_two_files, fsck.check_double_use, "double_use"),
    Case(used_block_marked_free, fsck.check_extents_marked, "extents_marked"),
    Case(free_block_marked_used, fsck.check_unreferenced, "unreferenced"),
    Case(free_block_in_second_chunk_marked_used, fsck.check_unreferenced, "unreferenced"),
    Case(size_too_small, fsck.check_sizes, "sizes"),
    Case(extents_of_a_directory, fsck.check_sizes, "sizes"),
    Case(dirent_names_a_missing_inode, fsck.check_dirents, "dirents"),
    Case(dirent_in_a_non_directory, fsck.check_dirents, "dirents"),
    Case(nlink_too_high, fsck.check_nlink, "nlink"),
    Case(nlink_zero_but_named, fsck.check_nlink, "nlink"),
    Case(directory_nlink_wrong, fsck.check_nlink, "nlink"),
    Case(directory_cycle, fsck.check_tree, "tree"),
]


def test_every_check_has_a_case() -> None:
    assert {c.check for c in CASES} == set(fsck.CHECKS)


def _dump(path: Path) -> dict[str, list[tuple]]:  # type: ignore[type-arg]
    db = Db(path)
    try:
        return {t: sorted(db.rows(f"SELECT * FROM {t}"))
                for (t,) in db.rows("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        db.close()


@pytest.mark.parametrize("case", CASES, ids=[c.damage.__name__ for c in CASES])
def test_fsck_finds_exactly_the_damage(cdir: Path, case: Case) -> None:
    db = Db(cdir / "meta.db")
    try:
        case.damage(db)
    finally:
        db.close()
    damaged = _dump(cdir / "meta.db")

    proc = run("fsck", cdir, check=False)
    assert proc.returncode == EXIT_CHECK_FAILED, proc.stdout + proc.stderr
    *problems, summary = proc.stdout.strip().splitlines()
    assert summary == f"fsck: {len(problems)} problem(s) found"
    assert problems and {p.split(":", 1)[0] for p in problems} == {case.name}, problems

    # fsck only reads: the damage is still there, nothing was "repaired" on open.
    assert _dump(cdir / "meta.db") == damaged

    # In-process: the case's own check finds it, every other check finds nothing.
    store = MetaStore(cdir / "meta.db")
    try:
        for check in fsck.CHECKS:
            found = check(store)
            if check is case.check:
                assert found and {p.check for p in found} == {case.name}
            else:
                assert found == [], (check.__name__, found)
    finally:
        store.close()


def test_many_problems_are_summarised(cdir: Path) -> None:
    db = Db(cdir / "meta.db")
    try:
        for block in range(3000, 3040, 2):  # 20 separate runs of one block
            db.set_bits(1, block, 1, True)
    finally:
        db.close()
    proc = run("fsck", cdir, check=False)
    assert proc.returncode == EXIT_CHECK_FAILED
    assert proc.stdout.startswith("unreferenced:")
    line = proc.stdout.splitlines()[0]
    assert "20 blocks are marked used" in line and "3000, 3002" in line
    assert "(+12 more runs)" in line  # eight runs are listed, the rest counted
    listed = json.loads(run("fsck", cdir, "--json", check=False).stdout)
    assert listed == [{"check": "unreferenced", "message": line.split(": ", 1)[1]}]
