"""Restores never write outside --to, whatever the medium says, and never follow a
symlink while restoring. The medium is forged here the way an attacker (or a bug) could:
the snapshot is edited and the manifest resealed with valid checksums."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from test_backup_support import backup, cli, gen_dir, make_cluster, make_tree, put_tree, reseal

from sdbackup.cluster.local import open_cluster


@pytest.fixture
def gen(tmp_path: Path) -> tuple[Path, str]:
    cdir = make_cluster(tmp_path / "c")
    put_tree(cdir, make_tree(tmp_path / "tree", files=6))
    res = backup(cdir, tmp_path / "m")
    return tmp_path / "m", res.manifest.id


def _forge(medium: Path, gid: str, *sql: str) -> None:
    db = gen_dir(medium, gid) / "meta.db"
    con = sqlite3.connect(db, isolation_level=None)
    try:
        for s in sql:
            con.execute(s)
    finally:
        con.close()
    assert not Path(str(db) + "-journal").exists() and not Path(str(db) + "-wal").exists()
    reseal(medium, gid)


def _files_under(p: Path) -> set[str]:
    return {str(x.relative_to(p)) for x in p.rglob("*")} if p.exists() else set()


@pytest.mark.parametrize("name", [b"../escape", b"a/../../escape", b"/abs", b"..", b".",
                                  b"", b"nul\0byte", b"x" * 256])
def test_forged_names_are_refused(gen: tuple[Path, str], tmp_path: Path, name: bytes) -> None:
    medium, gid = gen
    _forge(medium, gid, f"UPDATE dirents SET name=x'{name.hex()}' WHERE name=CAST('f00.bin' "
                        "AS BLOB)")
    before = _files_under(tmp_path)
    out = tmp_path / "deep" / "out"
    out.parent.mkdir()
    r = cli("restore", "--medium", medium, "--to", out)
    assert r.code == 5 and "file name" in r.err and gid in r.err
    assert _files_under(tmp_path) - before <= {"deep", "deep/out"}
    assert not (tmp_path / "escape").exists() and not (tmp_path / "deep" / "escape").exists()


def test_symlink_then_directory_of_the_same_name(gen: tuple[Path, str], tmp_path: Path) -> None:
    """A forged tree where a directory and a symlink to a directory outside share one
    name: whatever the order, nothing lands outside --to."""
    medium, gid = gen
    outside = tmp_path / "outside"
    outside.mkdir()
    target = str(outside).encode().hex()
    _forge(
        medium, gid,
        # drop UNIQUE(parent, name), as a forged snapshot may
        "CREATE TABLE d2 (id INTEGER PRIMARY KEY, parent INTEGER NOT NULL, name BLOB NOT NULL,"
        " ino INTEGER NOT NULL)",
        "INSERT INTO d2 SELECT id, parent, name, ino FROM dirents",
        "DROP TABLE dirents",
        "ALTER TABLE d2 RENAME TO dirents",
        # a symlink 'a' -> outside, next to the real directory 'a' of /tree, listed first
        "INSERT INTO inodes(id, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, nlink,"
        f" target) VALUES (9000, {0o120777}, 0, 0, 10, 0, 0, 0, 1, x'{target}')",
        "INSERT INTO dirents(id, parent, name, ino) SELECT -1, parent, name, 9000 FROM "
        "dirents WHERE name=CAST('a' AS BLOB)",
    )
    out = tmp_path / "out"
    r = cli("restore", "--medium", medium, "--to", out)
    assert r.code == 5 and "twice" in r.err
    assert list(outside.iterdir()) == []
    assert not (out / "tree" / "a").is_symlink()


def test_symlinks_restored_as_links_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    tree = tmp_path / "t"
    tree.mkdir()
    os.symlink(str(outside), tree / "abs-dir-link")
    os.symlink(str(outside / "file"), tree / "abs-file-link")
    (tree / "real").write_text("data")
    cdir = make_cluster(tmp_path / "c", disks=(1 << 20,))
    put_tree(cdir, tree)
    backup(cdir, tmp_path / "m")
    out = tmp_path / "out"
    r = cli("restore", "--medium", tmp_path / "m", "--to", out)
    assert r.code == 0, r.err
    assert os.readlink(out / "t" / "abs-dir-link") == str(outside)
    assert os.readlink(out / "t" / "abs-file-link") == str(outside / "file")
    assert list(outside.iterdir()) == []
    # --to itself: new or empty only; a file is refused
    (tmp_path / "afile").write_text("x")
    assert cli("restore", "--medium", tmp_path / "m", "--to", tmp_path / "afile").code == 2
    r = cli("restore", "--medium", tmp_path / "m", "--to", tmp_path / "no" / "such")
    assert r.code == 4


@pytest.mark.skipif(os.geteuid() != 0, reason="owners are restored as root only")
def test_owners_modes_times_restored(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    f = tree / "owned"
    f.write_text("x")
    os.chown(f, 1234, 5678)
    os.chmod(f, 0o4751)  # setuid survives: chmod comes after chown
    os.utime(f, ns=(1_000_000_000_123, 2_000_000_000_456))
    os.chown(tree, 4321, 8765)
    cdir = make_cluster(tmp_path / "c", disks=(1 << 20,))
    put_tree(cdir, tree)
    with open_cluster(cdir) as c:  # fs put copies files, dirs and links; add a FIFO node
        c.meta.mknod(c.fs.resolve("/t").ino, b"fifo2", 0o10644, 7, 8)
    backup(cdir, tmp_path / "m")
    out = tmp_path / "out"
    r = cli("restore", "--medium", tmp_path / "m", "--to", out, "/t")
    assert r.code == 0, r.err
    st = os.stat(out / "t" / "owned")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 5678, 0o4751)
    assert st.st_mtime_ns == 2_000_000_000_456
    assert os.stat(out / "t").st_uid == 4321
    st2 = os.lstat(out / "t" / "fifo2")
    assert (st2.st_mode & 0o170000, st2.st_uid, st2.st_mode & 0o777) == (0o10000, 7, 0o644)
