"""File system operations one by one: POSIX errors, link counts, space accounting.

Everything runs on clusters with 512-byte blocks, so a few KiB of data span many
blocks and extents (STYLE.md, item 11).
"""

from __future__ import annotations

import errno
import sqlite3
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sdbackup.blocks.device import BlockDevice
from sdbackup.blocks.label import LABEL_BLOCKS
from sdbackup.cluster.local import LocalCluster, open_cluster
from sdbackup.errors import FsError
from sdbackup.fs.filesystem import FileSystem
from sdbackup.meta import fsck
from sdbackup.meta.service import MetadataService
from sdbackup.types import ROOT_INODE

ROOT = ROOT_INODE
BS = 512


def err(code: int, fn: Callable[..., Any], *args: Any, **kw: Any) -> None:
    """Assert that ``fn(*args)`` raises FsError with exactly ``code``."""
    with pytest.raises(FsError) as ei:
        fn(*args, **kw)
    got = errno.errorcode.get(ei.value.errno or 0, str(ei.value.errno))
    assert ei.value.errno == code, f"{got} instead of {errno.errorcode[code]}: {ei.value}"


def clean(c: LocalCluster) -> None:
    assert fsck.check_all(c.store) == []


def used(c: LocalCluster) -> int:
    st = c.fs.statfs()
    return st.blocks - st.free


def extent_blocks(c: LocalCluster) -> int:
    return int(c.store.get_val("SELECT COALESCE(SUM(count), 0) FROM extents"))


def check_accounting(c: LocalCluster) -> None:
    """Used blocks are exactly the disk labels plus the blocks of all extents."""
    assert used(c) == LABEL_BLOCKS * len(c.meta.bitmaps) + extent_blocks(c)
    clean(c)


# -- names -----------------------------------------------------------------------------------
BAD_NAMES = [
    (b"", errno.EINVAL),
    (b".", errno.EINVAL),
    (b"..", errno.EINVAL),
    (b"a/b", errno.EINVAL),
    (b"/", errno.EINVAL),
    (b"a\0b", errno.EINVAL),
    (b"x" * 256, errno.ENAMETOOLONG),
]


@pytest.mark.parametrize("name,code", BAD_NAMES)
def test_bad_names_refused_everywhere(cluster: LocalCluster, name: bytes, code: int) -> None:
    fs = cluster.fs
    f = fs.create(ROOT, b"f")
    err(code, fs.create, ROOT, name)
    err(code, fs.mkdir, ROOT, name)
    err(code, fs.symlink, ROOT, name, b"target")
    err(code, fs.link, f.ino, ROOT, name)
    err(code, fs.rename, ROOT, b"f", ROOT, name)
    assert [e.name for e in fs.listdir(ROOT)] == [b"f"]
    clean(cluster)


def test_name_of_255_bytes_is_fine(cluster: LocalCluster) -> None:
    fs = cluster.fs
    name = b"n" * 255
    a = fs.create(ROOT, name)
    assert fs.lookup(ROOT, name).ino == a.ino
    d = fs.mkdir(ROOT, b"d" * 255)
    fs.rename(ROOT, name, d.ino, b"m" * 255)
    assert fs.resolve(b"/" + b"d" * 255 + b"/" + b"m" * 255).ino == a.ino
    err(errno.ENAMETOOLONG, fs.lookup, ROOT, b"n" * 256)


# -- errors -----------------------------------------------------------------------------------
def test_enoent(cluster: LocalCluster) -> None:
    fs = cluster.fs
    err(errno.ENOENT, fs.lookup, ROOT, b"nope")
    err(errno.ENOENT, fs.unlink, ROOT, b"nope")
    err(errno.ENOENT, fs.rmdir, ROOT, b"nope")
    err(errno.ENOENT, fs.rename, ROOT, b"nope", ROOT, b"other")
    err(errno.ENOENT, fs.getattr, 9999)
    err(errno.ENOENT, fs.create, 9999, b"x")
    err(errno.ENOENT, fs.mkdir, 9999, b"x")
    err(errno.ENOENT, fs.write, 9999, 0, b"x")
    err(errno.ENOENT, fs.resolve, "/nope/x")
    f = fs.create(ROOT, b"f")
    fs.unlink(ROOT, b"f")
    err(errno.ENOENT, fs.getattr, f.ino)
    err(errno.ENOENT, fs.read, f.ino, 0, 10)
    err(errno.ENOENT, fs.link, f.ino, ROOT, b"g")
    clean(cluster)


def test_eexist(cluster: LocalCluster) -> None:
    fs = cluster.fs
    f = fs.create(ROOT, b"f")
    fs.mkdir(ROOT, b"d")
    fs.symlink(ROOT, b"l", b"f")
    for name in (b"f", b"d", b"l"):
        err(errno.EEXIST, fs.create, ROOT, name)
        err(errno.EEXIST, fs.mkdir, ROOT, name)
        err(errno.EEXIST, fs.symlink, ROOT, name, b"x")
        err(errno.EEXIST, fs.link, f.ino, ROOT, name)
    err(errno.EEXIST, fs.rename, ROOT, b"l", ROOT, b"f", 1)  # RENAME_NOREPLACE
    assert fs.readlink(fs.lookup(ROOT, b"l").ino) == b"f"
    clean(cluster)


def test_enotdir(cluster: LocalCluster) -> None:
    fs = cluster.fs
    f = fs.create(ROOT, b"f")
    fs.mkdir(ROOT, b"d")
    err(errno.ENOTDIR, fs.create, f.ino, b"x")
    err(errno.ENOTDIR, fs.mkdir, f.ino, b"x")
    err(errno.ENOTDIR, fs.lookup, f.ino, b"x")
    err(errno.ENOTDIR, fs.readdir, f.ino)
    err(errno.ENOTDIR, fs.rmdir, ROOT, b"f")
    err(errno.ENOTDIR, fs.rename, ROOT, b"d", ROOT, b"f")  # dir over a file
    err(errno.ENOTDIR, fs.rename, f.ino, b"x", ROOT, b"y")
    err(errno.ENOTDIR, fs.resolve, "/f/x")
    assert fs.lookup(ROOT, b"d").is_dir and fs.lookup(ROOT, b"f").is_reg
    clean(cluster)


def test_eisdir(cluster: LocalCluster) -> None:
    fs = cluster.fs
    fs.create(ROOT, b"f")
    d = fs.mkdir(ROOT, b"d")
    err(errno.EISDIR, fs.unlink, ROOT, b"d")
    err(errno.EISDIR, fs.write, d.ino, 0, b"x")
    err(errno.EISDIR, fs.read, d.ino, 0, 1)
    err(errno.EISDIR, fs.truncate, d.ino, 0)
    err(errno.EISDIR, fs.rename, ROOT, b"f", ROOT, b"d")  # file over a dir
    assert fs.lookup(ROOT, b"d").is_dir
    clean(cluster)


def test_enotempty(cluster: LocalCluster) -> None:
    fs = cluster.fs
    a = fs.mkdir(ROOT, b"a")
    fs.create(a.ino, b"x")
    fs.mkdir(ROOT, b"b")
    err(errno.ENOTEMPTY, fs.rmdir, ROOT, b"a")
    err(errno.ENOTEMPTY, fs.rename, ROOT, b"b", ROOT, b"a")  # dir over a non-empty dir
    fs.rename(ROOT, b"a", ROOT, b"b")  # a non-empty dir over an empty one is fine
    assert [e.name for e in fs.listdir(fs.lookup(ROOT, b"b").ino)] == [b"x"]
    err(errno.ENOENT, fs.lookup, ROOT, b"a")
    clean(cluster)


def test_rename_into_own_subtree_is_einval(cluster: LocalCluster) -> None:
    fs = cluster.fs
    a = fs.mkdir(ROOT, b"a")
    b = fs.mkdir(a.ino, b"b")
    c = fs.mkdir(b.ino, b"c")
    err(errno.EINVAL, fs.rename, ROOT, b"a", a.ino, b"x")
    err(errno.EINVAL, fs.rename, ROOT, b"a", c.ino, b"x")
    err(errno.EINVAL, fs.rename, a.ino, b"b", c.ino, b"b")
    # Renaming onto itself, or a name onto another name of the same file, is a no-op.
    fs.rename(ROOT, b"a", ROOT, b"a")
    f = fs.create(ROOT, b"f")
    fs.link(f.ino, ROOT, b"g")
    fs.rename(ROOT, b"f", ROOT, b"g")
    assert fs.lookup(ROOT, b"f").ino == fs.lookup(ROOT, b"g").ino == f.ino
    assert fs.getattr(f.ino).nlink == 2
    # Moving a dir over its own ancestor: the ancestor is not empty.
    err(errno.ENOTEMPTY, fs.rename, b.ino, b"c", ROOT, b"a")
    assert fs.resolve("/a/b/c").ino == c.ino
    clean(cluster)


def test_misc_einval_eperm(cluster: LocalCluster) -> None:
    fs = cluster.fs
    f = fs.create(ROOT, b"f")
    d = fs.mkdir(ROOT, b"d")
    err(errno.EINVAL, fs.readlink, f.ino)
    err(errno.EPERM, fs.link, d.ino, ROOT, b"d2")
    err(errno.EINVAL, fs.write, f.ino, -1, b"x")
    err(errno.EINVAL, fs.read, f.ino, -1, 1)
    err(errno.EINVAL, fs.truncate, f.ino, -1)
    err(errno.EINVAL, fs.rename, ROOT, b"f", ROOT, b"g", 2)  # RENAME_EXCHANGE
    clean(cluster)


# -- link counts -----------------------------------------------------------------------------
def test_directory_nlink(cluster: LocalCluster) -> None:
    fs = cluster.fs

    def nl(ino: int) -> int:
        return fs.getattr(ino).nlink

    assert nl(ROOT) == 2
    a = fs.mkdir(ROOT, b"a")
    assert (nl(ROOT), nl(a.ino)) == (3, 2)
    b = fs.mkdir(a.ino, b"b")
    fs.create(a.ino, b"file")  # files do not count
    assert (nl(ROOT), nl(a.ino), nl(b.ino)) == (3, 3, 2)
    fs.rename(a.ino, b"b", ROOT, b"b")
    assert (nl(ROOT), nl(a.ino)) == (4, 2)
    fs.mkdir(ROOT, b"c")
    fs.rename(ROOT, b"b", ROOT, b"c")  # replaces the empty dir c
    assert nl(ROOT) == 4
    fs.rmdir(ROOT, b"c")
    assert nl(ROOT) == 3
    check_accounting(cluster)


def test_hard_links(cluster: LocalCluster) -> None:
    fs = cluster.fs
    f = fs.create(ROOT, b"f")
    fs.write(f.ino, 0, b"data" * 300)
    d = fs.mkdir(ROOT, b"d")
    fs.link(f.ino, d.ino, b"g")
    assert fs.getattr(f.ino).nlink == 2
    fs.unlink(ROOT, b"f")
    assert fs.getattr(f.ino).nlink == 1
    assert fs.read(fs.resolve("/d/g").ino, 0, 8) == b"datadata"
    before = used(cluster)
    fs.unlink(d.ino, b"g")
    err(errno.ENOENT, fs.getattr, f.ino)
    assert used(cluster) == before - 3  # 1200 bytes = 3 blocks given back
    check_accounting(cluster)


def test_unlinked_open_file_lives_until_release(cluster: LocalCluster) -> None:
    fs = cluster.fs
    f = fs.create(ROOT, b"f")
    fs.write(f.ino, 0, b"keep" * 500)
    fs.open(f.ino)
    fs.open(f.ino)
    before = used(cluster)
    fs.unlink(ROOT, b"f")
    err(errno.ENOENT, fs.lookup, ROOT, b"f")
    assert fs.getattr(f.ino).nlink == 0
    assert fs.read(f.ino, 0, 2000) == b"keep" * 500
    fs.write(f.ino, 2048, b"more")  # a fifth block
    assert used(cluster) == before + 1
    fs.release(f.ino)
    assert fs.read(f.ino, 1996, 100) == b"keep" + bytes(48) + b"more"
    fs.release(f.ino)
    err(errno.ENOENT, fs.getattr, f.ino)
    assert used(cluster) == before - 4
    check_accounting(cluster)


def test_unlinked_open_file_is_purged_on_reopen(tmp_cluster: Callable[..., Path]) -> None:
    cdir = tmp_cluster()
    with open_cluster(cdir) as c:
        base = used(c)
        f = c.fs.create(ROOT, b"f")
        c.fs.write(f.ino, 0, b"x" * 5000)
        c.fs.open(f.ino)
        c.fs.unlink(ROOT, b"f")  # the process "dies" with the file still open
    with open_cluster(cdir) as c:
        err(errno.ENOENT, c.fs.getattr, f.ino)
        assert used(c) == base
        check_accounting(c)


# -- data ---------------------------------------------------------------------------------------
def test_sparse_file(cluster: LocalCluster) -> None:
    fs = cluster.fs
    f = fs.create(ROOT, b"sparse")
    before = used(cluster)
    off = 10 << 20  # 10 MiB, far past the 1 MiB disk
    fs.write(f.ino, off, b"end")
    attr = fs.getattr(f.ino)
    assert attr.size == off + 3
    assert attr.blocks * 512 <= 2 * BS
    assert 1 <= used(cluster) - before <= 2
    assert fs.read(f.ino, 0, 4096) == bytes(4096)
    assert fs.read(f.ino, off - 100, 200) == bytes(100) + b"end"
    # Filling part of the hole allocates only what is written.
    fs.write(f.ino, 5 << 20, b"mid")
    assert used(cluster) - before <= 4
    assert fs.read(f.ino, (5 << 20) - 2, 7) == b"\0\0mid\0\0"
    check_accounting(cluster)


def test_write_past_eof_in_last_block_reads_zeros(cluster: LocalCluster) -> None:
    fs = cluster.fs
    f = fs.create(ROOT, b"f")
    fs.write(f.ino, 0, b"a" * 10)
    fs.write(f.ino, 100, b"b")
    fs.write(f.ino, 3 * BS + 7, b"c")
    assert fs.read(f.ino, 0, 4 * BS) == b"a" * 10 + bytes(90) + b"b" + bytes(3 * BS + 7 - 101) \
        + b"c"


def test_truncate_zeroes_the_tail(cluster: LocalCluster) -> None:
    fs = cluster.fs
    f = fs.create(ROOT, b"f")
    fs.write(f.ino, 0, b"x" * 1000)
    before = used(cluster)
    fs.truncate(f.ino, 10)
    assert used(cluster) == before - 1
    fs.truncate(f.ino, 1000)
    assert fs.read(f.ino, 0, 2000) == b"x" * 10 + bytes(990)
    assert used(cluster) == before - 1  # growing allocates nothing
    fs.truncate(f.ino, BS)  # exactly one block: nothing to zero, nothing past it
    fs.setattr(f.ino, size=0)
    assert fs.getattr(f.ino).blocks == 0
    assert used(cluster) == before - 2
    check_accounting(cluster)


def test_contiguous_appends(tmp_cluster: Callable[..., Path]) -> None:
    with open_cluster(tmp_cluster(disks=[4 << 20])) as c:
        fs = c.fs
        f = fs.create(ROOT, b"big")
        chunk = 64 << 10
        for i in range(16):
            fs.write(f.ino, i * chunk, bytes([i + 1]) * chunk)
        exts = c.meta.all_extents(f.ino)
        assert len(exts) == 1
        assert exts[0].length == (1 << 20) // BS
        assert fs.read(f.ino, 5 * chunk - 1, 2) == b"\x05\x06"
        check_accounting(c)


@pytest.mark.parametrize("chunk", [64 << 10, 4 << 10])
def test_interleaved_appends_stay_few_extents(tmp_cluster: Callable[..., Path],
                                              chunk: int) -> None:
    """Two or three files growing side by side do not alternate one run per write."""
    with open_cluster(tmp_cluster(disks=[8 << 20])) as c:
        fs = c.fs
        files = [fs.create(ROOT, name) for name in (b"a", b"b", b"c")]
        for i in range((1 << 20) // chunk):
            for k, f in enumerate(files):
                fs.write(f.ino, i * chunk, bytes([k + 1]) * chunk)
        for k, f in enumerate(files):
            exts = c.meta.all_extents(f.ino)
            assert len(exts) <= 3, exts
            assert fs.read(f.ino, 0, 1 << 20) == bytes([k + 1]) * (1 << 20)
        check_accounting(c)


def test_files_spread_over_disks(tmp_cluster: Callable[..., Path]) -> None:
    with open_cluster(tmp_cluster(disks=[256 << 10, 256 << 10])) as c:
        fs = c.fs
        files = [fs.create(ROOT, b"f%d" % i) for i in range(6)]
        for f in files:
            fs.write(f.ino, 0, b"z" * 3000)
        disks = {e.disk for f in files for e in c.meta.all_extents(f.ino)}
        assert disks == set(c.meta.bitmaps)
        # One file bigger than any single disk's free space spans both disks.
        big = fs.create(ROOT, b"big")
        data = bytes(range(256)) * 1400  # 350 KiB
        fs.write(big.ino, 0, data)
        assert {e.disk for e in c.meta.all_extents(big.ino)} == set(c.meta.bitmaps)
        assert fs.read(big.ino, 0, len(data)) == data
        check_accounting(c)


def test_enospc_changes_nothing(tmp_cluster: Callable[..., Path]) -> None:
    with open_cluster(tmp_cluster(disks=[64 << 10, 32 << 10])) as c:
        fs = c.fs
        a = fs.create(ROOT, b"a")
        fs.write(a.ino, 0, b"a" * 700)
        b = fs.create(ROOT, b"b")
        free = fs.statfs().free
        # Needs more blocks than are free (across both disks): refused as a whole.
        err(errno.ENOSPC, fs.write, b.ino, 0, b"b" * (free + 1) * BS)
        err(errno.ENOSPC, fs.write, a.ino, 600, b"c" * (free + 1) * BS)
        assert fs.statfs().free == free
        assert fs.getattr(a.ino).size == 700 and fs.getattr(b.ino).size == 0
        assert fs.read(a.ino, 0, 1000) == b"a" * 700
        assert c.meta.all_extents(b.ino) == []
        check_accounting(c)
        # Exactly what is left still fits, then nothing more.
        fs.write(b.ino, 0, b"b" * free * BS)
        assert fs.statfs().free == 0
        err(errno.ENOSPC, fs.write, a.ino, 2 * BS, b"!")
        fs.write(a.ino, 10, b"overwrite in place needs no space")
        fs.truncate(a.ino, 5000)  # a hole needs no space either
        check_accounting(c)
        fs.unlink(ROOT, b"b")
        assert fs.statfs().free == free
        fs.write(a.ino, 2 * BS, b"!")
        check_accounting(c)


class FailingWrites:
    """Make BlockDevice.write raise EIO on its n-th call (counting from 1)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int) -> None:
        self.calls = 0
        orig = BlockDevice.write

        def write(dev: BlockDevice, block: int, data: Any) -> None:
            self.calls += 1
            if self.calls == fail_at:
                raise OSError(errno.EIO, "injected I/O error")
            orig(dev, block, data)

        monkeypatch.setattr(BlockDevice, "write", write)


def test_write_failing_mid_way_releases_its_reservation(
        cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = cluster.fs
    f = fs.create(ROOT, b"f")
    free = fs.statfs().free
    FailingWrites(monkeypatch, fail_at=1)
    with pytest.raises(OSError):
        fs.write(f.ino, 0, b"x" * 5000)
    assert cluster.meta.all_extents(f.ino) == []
    assert fs.getattr(f.ino).size == 0
    assert fs.statfs().free == free
    check_accounting(cluster)
    fs.write(f.ino, 0, b"y" * 5000)  # the next write works and reuses the space
    assert fs.read(f.ino, 0, 5000) == b"y" * 5000
    check_accounting(cluster)


def test_failed_write_leaves_nothing_past_eof(
        cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that reached an existing block but failed later must not leak into the file.

    Block 0 (holding the end of the file) is written first, then the new block fails;
    the bytes it left past the end on disk must read as zeros when the file grows.
    """
    fs = cluster.fs
    f = fs.create(ROOT, b"f")
    fs.write(f.ino, 0, b"z" * 10)
    free = fs.statfs().free
    FailingWrites(monkeypatch, fail_at=2)
    with pytest.raises(OSError):
        fs.write(f.ino, 20, b"a" * 600)
    monkeypatch.undo()
    assert fs.getattr(f.ino).size == 10
    assert fs.statfs().free == free
    fs.truncate(f.ino, 100)
    assert fs.read(f.ino, 0, 100) == b"z" * 10 + bytes(90)
    fs.truncate(f.ino, 10)
    # The same by an extending write that starts in a later block.
    FailingWrites(monkeypatch, fail_at=2)
    with pytest.raises(OSError):
        fs.write(f.ino, 20, b"a" * 600)
    monkeypatch.undo()
    fs.write(f.ino, 3 * BS, b"end")
    assert fs.read(f.ino, 0, 3 * BS + 3) == b"z" * 10 + bytes(3 * BS - 10) + b"end"
    # And by a write into the last block itself, past the end.
    fs.truncate(f.ino, 10)
    FailingWrites(monkeypatch, fail_at=2)
    with pytest.raises(OSError):
        fs.write(f.ino, 20, b"a" * 600)
    monkeypatch.undo()
    fs.write(f.ino, 300, b"q")
    assert fs.read(f.ino, 0, 301) == b"z" * 10 + bytes(290) + b"q"
    check_accounting(cluster)


def test_failed_commit_releases_its_reservation(
        cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = cluster.fs
    f = fs.create(ROOT, b"f")
    free = fs.statfs().free

    def broken(*a: Any, **k: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(MetadataService, "_insert_extent", broken)
    with pytest.raises(sqlite3.OperationalError):
        fs.write(f.ino, 0, b"x" * 3000)
    monkeypatch.undo()
    assert fs.statfs().free == free
    assert fs.getattr(f.ino).size == 0
    check_accounting(cluster)


# -- rename --------------------------------------------------------------------------------------
def test_rename_replaces_a_file(cluster: LocalCluster) -> None:
    fs = cluster.fs
    a = fs.create(ROOT, b"a")
    fs.write(a.ino, 0, b"A" * 2000)
    b = fs.create(ROOT, b"b")
    fs.write(b.ino, 0, b"B" * 3000)
    fs.open(b.ino)
    before = used(cluster)
    fs.rename(ROOT, b"a", ROOT, b"b")
    assert fs.lookup(ROOT, b"b").ino == a.ino
    err(errno.ENOENT, fs.lookup, ROOT, b"a")
    assert fs.read(fs.lookup(ROOT, b"b").ino, 0, 5000) == b"A" * 2000
    assert fs.read(b.ino, 0, 5000) == b"B" * 3000  # still open: still readable
    assert used(cluster) == before
    fs.release(b.ino)
    err(errno.ENOENT, fs.getattr, b.ino)
    assert used(cluster) == before - 6
    check_accounting(cluster)


def test_rename_is_all_or_nothing(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rename that fails after dropping the target rolls back, bitmaps included."""
    fs = cluster.fs
    a = fs.create(ROOT, b"a")
    fs.write(a.ino, 0, b"A" * 2000)
    b = fs.create(ROOT, b"b")
    fs.write(b.ino, 0, b"B" * 3000)
    free = fs.statfs().free
    orig = MetadataService._touch_dir

    def fail_touch(self: MetadataService, ino: int, now: int) -> None:
        orig(self, ino, now)
        raise sqlite3.OperationalError("injected failure")

    monkeypatch.setattr(MetadataService, "_touch_dir", fail_touch)
    with pytest.raises(sqlite3.OperationalError):
        fs.rename(ROOT, b"a", ROOT, b"b")
    monkeypatch.undo()
    assert fs.lookup(ROOT, b"a").ino == a.ino
    assert fs.lookup(ROOT, b"b").ino == b.ino
    assert fs.read(b.ino, 0, 5000) == b"B" * 3000
    assert fs.statfs().free == free
    check_accounting(cluster)
    # The blocks of b are really still b's: new data does not land on them.
    c = fs.create(ROOT, b"c")
    fs.write(c.ino, 0, b"C" * 8000)
    assert fs.read(b.ino, 0, 5000) == b"B" * 3000
    check_accounting(cluster)


def test_rename_never_shows_a_missing_target(cluster: LocalCluster) -> None:
    """A reader looking the target up while it is replaced always finds a file there."""
    fs = cluster.fs
    fs.create(ROOT, b"target")
    stop = threading.Event()
    misses: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                fs.lookup(ROOT, b"target")
            except BaseException as e:  # collected, asserted below
                misses.append(e)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(200):
            tmp = b"tmp%d" % i
            f = fs.create(ROOT, tmp)
            fs.write(f.ino, 0, b"%d" % i)
            fs.rename(ROOT, tmp, ROOT, b"target")
    finally:
        stop.set()
        t.join()
    assert misses == []
    assert fs.read(fs.lookup(ROOT, b"target").ino, 0, 10) == b"199"
    check_accounting(cluster)


# -- readdir -------------------------------------------------------------------------------------
def test_readdir_cookies_stable_while_adding(cluster: LocalCluster) -> None:
    fs = cluster.fs
    meta = cluster.meta
    d = fs.mkdir(ROOT, b"d")
    names = {b"e%03d" % i for i in range(50)}
    for n in sorted(names):
        fs.create(d.ino, n)
    seen: list[bytes] = []
    after = 0
    added = 0
    while True:
        batch = meta.readdir(d.ino, after, limit=7)
        if not batch:
            break
        seen.extend(e.name for e in batch)
        after = batch[-1].cookie
        if added < 5:
            fs.create(d.ino, b"new%03d" % added)  # added during the listing
            added += 1
            if added == 3:
                fs.unlink(d.ino, b"e049")  # and one not yet listed removed
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    assert names - {b"e049"} <= set(seen), "an entry present all along was skipped"
    cookies = [e.cookie for e in fs.listdir(d.ino)]
    assert cookies == sorted(cookies)
    # Resuming from any cookie gives exactly the entries after it.
    full = list(fs.listdir(d.ino))
    for i, e in enumerate(full):
        assert [x.name for x in meta.readdir(d.ino, e.cookie, limit=1000)] == \
               [x.name for x in full[i + 1 :]]


# -- symlinks, attributes, persistence ----------------------------------------------------------
def test_symlinks_and_attrs_persist(tmp_cluster: Callable[..., Path]) -> None:
    cdir = tmp_cluster()
    with open_cluster(cdir) as c:
        fs = c.fs
        d = fs.mkdir(ROOT, b"d", mode=0o700)
        f = fs.create(d.ino, b"f", mode=0o600)
        fs.write(f.ino, 0, b"hello")
        fs.symlink(ROOT, b"abs", b"/d/f")
        fs.symlink(d.ino, b"rel", b"../d/f")
        err(errno.ENOENT, fs.symlink, ROOT, b"empty", b"")
        fs.setattr(f.ino, mode=0o4751, atime_ns=123, mtime_ns=456_000_000_789)
    with open_cluster(cdir) as c:
        fs = c.fs
        attr = fs.resolve("/abs")
        assert attr.ino == f.ino == fs.resolve("/d/rel").ino
        assert stat.S_IMODE(attr.mode) == 0o4751 and stat.S_ISREG(attr.mode)
        assert (attr.atime_ns, attr.mtime_ns) == (123, 456_000_000_789)
        assert stat.S_IMODE(fs.getattr(d.ino).mode) == 0o700
        link = fs.resolve("/abs", follow=False)
        assert link.is_link and fs.readlink(link.ino) == b"/d/f" and link.size == 4
        assert fs.read(f.ino, 0, 100) == b"hello"
        fs.symlink(ROOT, b"loop", b"/loop")
        err(errno.ELOOP, fs.resolve, "/loop")
        check_accounting(c)


def test_cluster_fixture_is_small_and_clean(cluster: LocalCluster) -> None:
    st = cluster.fs.statfs()
    assert st.block_size == BS and st.blocks == (1 << 20) // BS
    assert isinstance(cluster.fs, FileSystem)
    check_accounting(cluster)

