"""The file system against an in-memory model, driven by hypothesis (stateful).

The model: path (tuple of names) -> node. Files are ``MFile`` objects shared by all
their hard links (identity = same object), with their bytes, the set of file blocks
that must be mapped (to check sparseness and space accounting exactly), and open
counts. Two small disks (256 KiB + 128 KiB at 512-byte blocks) make ENOSPC happen.

ENOSPC contract, checked exactly: the model knows how many blocks are free, so it
predicts whether a write fits. A write that does not fit fails as a whole: no byte,
size, time, extent or free block changes (``map_write`` reserves everything before
a byte is written and gives it all back on failure). fsck stays clean throughout.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from sdbackup.blocks.label import LABEL_BLOCKS
from sdbackup.cluster.local import LocalCluster, open_cluster
from sdbackup.errors import FsError
from sdbackup.meta import fsck
from sdbackup.types import ROOT_INODE

BS = 512
DISKS = (256 << 10, 128 << 10)
NAMES = [b"a", b"b", b"c", b"d"]
MAX_DEPTH = 3
PATTERN = bytes(range(1, 256)) * 1600  # never zero, so holes are told apart
LINK_TARGETS = [b"a", b"../b", b"/a/c", b"x" * 300]

Path_ = tuple[bytes, ...]


class MFile:
    def __init__(self, ino: int, mode: int) -> None:
        self.ino = ino
        self.mode = mode
        self.data = bytearray()
        self.blocks: set[int] = set()  # file blocks that hold a mapping
        self.opens = 0
        self.atime: int | None = None
        self.mtime: int | None = None


class MDir:
    def __init__(self, ino: int, mode: int) -> None:
        self.ino = ino
        self.mode = mode
        self.atime: int | None = None
        self.mtime: int | None = None


class MLink:
    def __init__(self, ino: int, target: bytes) -> None:
        self.ino = ino
        self.target = target


Node = MFile | MDir | MLink


def show(p: Path_) -> str:
    return "/" + "/".join(n.decode() for n in p)


class FsMachine(RuleBasedStateMachine):
    make_cluster: Callable[..., Path]  # set by the test: the tmp_cluster fixture

    def __init__(self) -> None:
        super().__init__()
        self.cdir = self.make_cluster(block_size=BS, disks=DISKS)
        self.c: LocalCluster = open_cluster(self.cdir)
        self.tree: dict[Path_, Node] = {(): MDir(ROOT_INODE, 0o755)}
        self.orphans: list[MFile] = []  # unlinked but still open
        self.handles: list[MFile] = []
        st_ = self.c.fs.statfs()
        self.capacity = st_.blocks - LABEL_BLOCKS * len(DISKS)

    def teardown(self) -> None:
        self.c.close()
        shutil.rmtree(self.cdir.parent, ignore_errors=True)  # the disk images too

    # -- model helpers ---------------------------------------------------------------------
    @property
    def fs(self) -> Any:
        return self.c.fs

    def dirs(self, max_depth: int = MAX_DEPTH) -> list[Path_]:
        return sorted(p for p, n in self.tree.items()
                      if isinstance(n, MDir) and len(p) < max_depth)

    def children(self, p: Path_) -> list[Path_]:
        return [q for q in self.tree if len(q) == len(p) + 1 and q[: len(p)] == p]

    def live_files(self) -> list[MFile]:
        seen: dict[int, MFile] = {}
        for n in self.tree.values():
            if isinstance(n, MFile):
                seen[id(n)] = n
        for f in self.orphans:
            seen[id(f)] = f
        return sorted(seen.values(), key=lambda f: f.ino)

    def nlink(self, f: MFile) -> int:
        return sum(1 for n in self.tree.values() if n is f)

    def free(self) -> int:
        return self.capacity - sum(len(f.blocks) for f in self.live_files())

    def touch(self, *paths: Path_) -> None:
        """A directory entry changed: the directory's mtime is no longer known."""
        for p in paths:
            d = self.tree[p]
            assert isinstance(d, MDir)
            d.mtime = None

    def drop(self, p: Path_) -> None:
        n = self.tree.pop(p)
        if isinstance(n, MFile) and self.nlink(n) == 0 and n.opens > 0:
            self.orphans.append(n)

    def call(self, expect: int | None, fn: Callable[..., Any], *args: Any) -> Any:
        if expect is None:
            return fn(*args)
        event(f"{fn.__name__} -> {errno.errorcode[expect]}")  # --hypothesis-show-statistics
        try:
            fn(*args)
        except FsError as e:
            got = errno.errorcode.get(e.errno or 0, str(e.errno))
            assert e.errno == expect, (f"{fn.__name__}{args}: {got}, "
                                       f"model expects {errno.errorcode[expect]}")
            return None
        raise AssertionError(f"{fn.__name__}{args} succeeded, model expects "
                             f"{errno.errorcode[expect]}")

    def pick_dir(self, data: st.DataObject, label: str) -> Path_:
        return data.draw(st.sampled_from(self.dirs()), label=label)

    def pick_entry(self, data: st.DataObject, label: str) -> Path_:
        """An existing path most of the time, else a name that may not exist."""
        existing = sorted(p for p in self.tree if p)
        kind = data.draw(st.integers(0, 3), label=f"{label} kind") if existing else 0
        if kind:
            return data.draw(st.sampled_from(existing), label=label)
        parent = self.pick_dir(data, f"{label} parent")
        return (*parent, data.draw(st.sampled_from(NAMES), label=f"{label} name"))

    def pick_file(self, data: st.DataObject) -> MFile | None:
        files = self.live_files()
        if not files:
            return None
        return data.draw(st.sampled_from(files), label="file")

    # -- namespace rules -------------------------------------------------------------------
    @initialize()
    def start(self) -> None:
        """A file and a directory to begin with, so that data rules have work at once."""
        f = self.fs.create(ROOT_INODE, b"a", 0o644)
        self.tree[(b"a",)] = MFile(f.ino, 0o644)
        d = self.fs.mkdir(ROOT_INODE, b"b", 0o750)
        self.tree[(b"b",)] = MDir(d.ino, 0o750)

    @rule(data=st.data(), name=st.sampled_from(NAMES), mode=st.sampled_from([0o644, 0o600]))
    def create(self, data: st.DataObject, name: bytes, mode: int) -> None:
        parent = self.pick_dir(data, "parent")
        p = (*parent, name)
        if p in self.tree:
            self.call(errno.EEXIST, self.fs.create, self.tree[parent].ino, name, mode)
            return
        attr = self.fs.create(self.tree[parent].ino, name, mode)
        assert attr.is_reg and attr.size == 0 and attr.nlink == 1
        self.tree[p] = MFile(attr.ino, mode)
        self.touch(parent)

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def mkdir(self, data: st.DataObject, name: bytes) -> None:
        parent = self.pick_dir(data, "parent")
        p = (*parent, name)
        if p in self.tree:
            self.call(errno.EEXIST, self.fs.mkdir, self.tree[parent].ino, name)
            return
        attr = self.fs.mkdir(self.tree[parent].ino, name, 0o750)
        assert attr.is_dir and attr.nlink == 2
        self.tree[p] = MDir(attr.ino, 0o750)
        self.touch(parent)

    @rule(data=st.data(), name=st.sampled_from(NAMES), dest=st.sampled_from(LINK_TARGETS))
    def symlink(self, data: st.DataObject, name: bytes, dest: bytes) -> None:
        parent = self.pick_dir(data, "parent")
        p = (*parent, name)
        if p in self.tree:
            self.call(errno.EEXIST, self.fs.symlink, self.tree[parent].ino, name, dest)
            return
        attr = self.fs.symlink(self.tree[parent].ino, name, dest)
        assert attr.is_link and attr.size == len(dest)
        self.tree[p] = MLink(attr.ino, dest)
        self.touch(parent)

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def link(self, data: st.DataObject, name: bytes) -> None:
        srcs = sorted(p for p, n in self.tree.items() if p and not isinstance(n, MLink))
        if not srcs:
            return
        src = data.draw(st.sampled_from(srcs), label="src")
        parent = self.pick_dir(data, "parent")
        p = (*parent, name)
        node = self.tree[src]
        expect = errno.EPERM if isinstance(node, MDir) else \
            errno.EEXIST if p in self.tree else None
        if expect is not None:
            self.call(expect, self.fs.link, node.ino, self.tree[parent].ino, name)
            return
        assert isinstance(node, MFile)
        attr = self.fs.link(node.ino, self.tree[parent].ino, name)
        self.tree[p] = node
        assert attr.nlink == self.nlink(node)
        self.touch(parent)

    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        p = self.pick_entry(data, "path")
        node = self.tree.get(p)
        expect = errno.ENOENT if node is None else \
            errno.EISDIR if isinstance(node, MDir) else None
        self.call(expect, self.fs.unlink, self.tree[p[:-1]].ino, p[-1])
        if expect is None:
            self.drop(p)
            self.touch(p[:-1])

    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        p = self.pick_entry(data, "path")
        node = self.tree.get(p)
        expect = errno.ENOENT if node is None else \
            errno.ENOTDIR if not isinstance(node, MDir) else \
            errno.ENOTEMPTY if self.children(p) else None
        self.call(expect, self.fs.rmdir, self.tree[p[:-1]].ino, p[-1])
        if expect is None:
            self.drop(p)
            self.touch(p[:-1])

    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        src = self.pick_entry(data, "src")
        dst = self.pick_entry(data, "dst")
        parent, name = dst[:-1], dst[-1]
        s = self.tree.get(src)
        t = self.tree.get(dst)
        args = (self.tree[src[:-1]].ino, src[-1], self.tree[parent].ino, name)
        expect: int | None = None
        if s is None:
            expect = errno.ENOENT
        elif t is s:
            self.fs.rename(*args)  # two names of one file (or the same name): no-op
            return
        elif isinstance(s, MDir) and dst[: len(src)] == src:
            expect = errno.EINVAL
        elif t is not None:
            if isinstance(s, MDir) and not isinstance(t, MDir):
                expect = errno.ENOTDIR
            elif not isinstance(s, MDir) and isinstance(t, MDir):
                expect = errno.EISDIR
            elif isinstance(t, MDir) and self.children(dst):
                expect = errno.ENOTEMPTY
        self.call(expect, self.fs.rename, *args)
        if expect is not None:
            return
        if t is not None:
            self.drop(dst)
        moved = {p: n for p, n in self.tree.items() if p[: len(src)] == src}
        for p in moved:
            del self.tree[p]
        for p, n in moved.items():
            self.tree[dst + p[len(src):]] = n
        self.touch(src[:-1], parent)

    @rule(data=st.data(), mode=st.sampled_from([0o600, 0o4755, 0o711, 0o1777]),
          atime=st.integers(0, 2**62), mtime=st.integers(0, 2**62))
    def setattr(self, data: st.DataObject, mode: int, atime: int, mtime: int) -> None:
        paths = sorted(p for p, n in self.tree.items() if not isinstance(n, MLink))
        p = data.draw(st.sampled_from(paths), label="path")
        node = self.tree[p]
        assert isinstance(node, MFile | MDir)
        attr = self.fs.setattr(node.ino, mode=mode, atime_ns=atime, mtime_ns=mtime)
        node.mode, node.atime, node.mtime = mode, atime, mtime
        assert stat.S_IMODE(attr.mode) == mode
        assert (attr.atime_ns, attr.mtime_ns) == (atime, mtime)

    @rule(data=st.data())
    def readlink(self, data: st.DataObject) -> None:
        links = sorted(p for p, n in self.tree.items() if isinstance(n, MLink))
        if not links:
            return
        node = self.tree[data.draw(st.sampled_from(links), label="link")]
        assert isinstance(node, MLink)
        assert self.fs.readlink(node.ino) == node.target

    # -- data rules --------------------------------------------------------------------------
    @rule(data=st.data(), seed=st.integers(0, 254))
    def write(self, data: st.DataObject, seed: int) -> None:
        """A few blocks, near the end of the file or anywhere (holes before it)."""
        f = self.pick_file(data)
        if f is None:
            return
        offset = data.draw(st.one_of(st.integers(0, len(f.data) + 2 * BS),
                                     st.integers(0, 300_000)), label="offset")
        self._write(f, offset, data.draw(st.integers(1, 6 * BS), label="length"), seed)

    @rule(data=st.data(), seed=st.integers(0, 254))
    def write_big(self, data: st.DataObject, seed: int) -> None:
        """Up to half the cluster's space in one write: this is what runs into ENOSPC."""
        f = self.pick_file(data)
        if f is None:
            return
        offset = data.draw(st.integers(0, 300_000), label="offset")
        # (sampled sizes: hypothesis draws small integers much more often than large)
        kib = data.draw(st.sampled_from([32, 64, 128, 192, 256]), label="KiB")
        n = (kib << 10) - data.draw(st.integers(0, 1023), label="less")
        self._write(f, offset, n, seed)

    @rule(data=st.data(), seed=st.integers(0, 254), delta=st.integers(-2, 2),
          gap=st.integers(0, 3))
    def write_to_the_brim(self, data: st.DataObject, seed: int, delta: int, gap: int) -> None:
        """Append just about all the free space: fits exactly, or misses by a block or two.

        A miss has reserved blocks on both disks before it found out: all must go back.
        """
        f = self.pick_file(data)
        if f is None:
            return
        offset = ((len(f.data) + BS - 1) // BS + gap) * BS
        self._write(f, offset, max(1, (self.free() + delta) * BS), seed)

    def _write(self, f: MFile, offset: int, n: int, seed: int) -> None:
        size = len(f.data)
        buf = PATTERN[seed : seed + n]
        blocks = set(range(offset // BS, (offset + n - 1) // BS + 1))
        need = len(blocks - f.blocks)
        if need > self.free():
            before = self.fs.getattr(f.ino)
            free = self.fs.statfs().free
            self.call(errno.ENOSPC, self.fs.write, f.ino, offset, buf)
            # A failed write changes nothing at all.
            assert self.fs.getattr(f.ino) == before
            assert self.fs.statfs().free == free
            return
        assert self.fs.write(f.ino, offset, buf) == n
        if offset > size:
            f.data.extend(bytes(offset - size))
        f.data[offset : offset + n] = buf
        f.blocks |= blocks
        f.mtime = None

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        f = self.pick_file(data)
        if f is None:
            return
        offset = data.draw(st.integers(0, len(f.data) + BS), label="offset")
        n = data.draw(st.integers(0, 8 * BS), label="length")
        assert self.fs.read(f.ino, offset, n) == bytes(f.data[offset : offset + n])

    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        f = self.pick_file(data)
        if f is None:
            return
        size = data.draw(st.one_of(st.integers(0, len(f.data) + 3 * BS),
                                   st.integers(0, 300_000)), label="size")
        self._truncate(f, size)

    @rule(data=st.data())
    def truncate_cut_and_regrow(self, data: st.DataObject) -> None:
        """Cut into the file, then grow it again: the cut-off bytes must read as zeros."""
        f = self.pick_file(data)
        if f is None or not f.data:
            return
        cut = data.draw(st.integers(0, len(f.data) - 1), label="cut")
        grow = data.draw(st.integers(cut + 1, len(f.data) + 2 * BS), label="grow")
        for size in (cut, grow):
            self._truncate(f, size)

    def _truncate(self, f: MFile, size: int) -> None:
        attr = self.fs.truncate(f.ino, size)
        assert attr.size == size
        if size < len(f.data):
            del f.data[size:]
        else:
            f.data.extend(bytes(size - len(f.data)))
        keep = (size + BS - 1) // BS
        f.blocks = {b for b in f.blocks if b < keep}
        f.mtime = None

    @rule(data=st.data(), times=st.integers(1, 2))
    def open_file(self, data: st.DataObject, times: int) -> None:
        files = [n for n in self.tree.values() if isinstance(n, MFile)]
        if not files:
            return
        f = data.draw(st.sampled_from(sorted(set(files), key=lambda f: f.ino)), label="file")
        for _ in range(times):
            self.fs.open(f.ino)
            f.opens += 1
            self.handles.append(f)

    @rule(data=st.data(), times=st.integers(1, 2))
    def orphan(self, data: st.DataObject, times: int) -> None:
        """Open a file, then remove all its names: it lives on until released (or reopen)."""
        files = sorted({id(n): n for n in self.tree.values() if isinstance(n, MFile)}.values(),
                       key=lambda f: f.ino)
        if not files:
            return
        f = data.draw(st.sampled_from(files), label="file")
        for _ in range(times):
            self.fs.open(f.ino)
            f.opens += 1
            self.handles.append(f)
        for p in sorted(p for p, n in self.tree.items() if n is f):
            self.fs.unlink(self.tree[p[:-1]].ino, p[-1])
            self.drop(p)
            self.touch(p[:-1])
        assert self.fs.getattr(f.ino).nlink == 0

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if not self.handles:
            return
        f = self.handles.pop(data.draw(st.integers(0, len(self.handles) - 1), label="handle"))
        self.fs.release(f.ino)
        f.opens -= 1
        if f.opens == 0 and f in self.orphans:
            self.orphans.remove(f)
            self.call(errno.ENOENT, self.fs.getattr, f.ino)

    @rule(checkpoint=st.booleans())
    def reopen(self, checkpoint: bool) -> None:
        """Close the cluster and open it again: everything named must be there.

        (The argument also keeps hypothesis from favouring this rule: it tries rules
        with fewer arguments first.)
        """
        if checkpoint:  # everything in the main database file, or left in the WAL
            self.c.store.checkpoint()
        self.c.close()
        self.c = open_cluster(self.cdir)
        for f in self.handles:
            f.opens = 0
        self.handles.clear()
        self.orphans.clear()  # purged when the cluster opens

    # -- the invariant -------------------------------------------------------------------------
    def listing(self) -> dict[Path_, Any]:
        out: dict[Path_, Any] = {}
        todo: list[tuple[Path_, int]] = [((), ROOT_INODE)]
        while todo:
            p, ino = todo.pop()
            for e in self.fs.listdir(ino):
                q = (*p, e.name)
                out[q] = e.attr
                if e.attr.is_dir:
                    todo.append((q, e.attr.ino))
        return out

    @invariant()
    def matches_model(self) -> None:
        fs = self.fs
        got = self.listing()
        want = {p: n for p, n in self.tree.items() if p}
        assert sorted(got) == sorted(want), \
            f"listing {sorted(map(show, got))} != model {sorted(map(show, want))}"
        for p, attr in got.items():
            node = want[p]
            assert attr.ino == node.ino, show(p)
            if isinstance(node, MFile):
                assert attr.is_reg, show(p)
                assert attr.size == len(node.data), show(p)
                assert attr.nlink == self.nlink(node), show(p)
            elif isinstance(node, MDir):
                assert attr.is_dir, show(p)
                subdirs = [q for q in self.children(p) if isinstance(self.tree[q], MDir)]
                assert attr.nlink == 2 + len(subdirs), show(p)
            else:
                assert attr.is_link and attr.size == len(node.target), show(p)
            if isinstance(node, MFile | MDir):
                assert stat.S_IMODE(attr.mode) == node.mode, show(p)
                if node.atime is not None:
                    assert attr.atime_ns == node.atime, show(p)
                if node.mtime is not None:
                    assert attr.mtime_ns == node.mtime, show(p)
        root = fs.getattr(ROOT_INODE)
        assert root.nlink == 2 + sum(1 for p, n in want.items()
                                     if len(p) == 1 and isinstance(n, MDir))
        # Contents and mapped blocks of every live file (named or open).
        for f in self.live_files():
            attr = fs.getattr(f.ino)
            assert attr.size == len(f.data)
            assert attr.blocks * 512 == len(f.blocks) * BS, \
                f"inode {f.ino}: {attr.blocks * 512 // BS} blocks mapped, {len(f.blocks)} expected"
            assert fs.read(f.ino, 0, len(f.data) + BS) == f.data, f"inode {f.ino} content"
        # Space: used = labels + every extent; free as the model counts it.
        stf = fs.statfs()
        extents = int(self.c.store.get_val("SELECT COALESCE(SUM(count), 0) FROM extents"))
        assert stf.blocks - stf.free == LABEL_BLOCKS * len(DISKS) + extents
        assert stf.free == self.free()
        # fsck: clean, but for inodes that are open after their last name went away.
        allowed = {f"inode {f.ino} has no name (orphan)" for f in self.orphans}
        problems = [pr for pr in fsck.check_all(self.c.store) if pr.message not in allowed]
        assert problems == []


SETTINGS = settings(
    max_examples=80,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# A passing run takes seconds; a failing one may shrink for hypothesis's five minutes,
# which must not be cut short by the default timeout.
@pytest.mark.timeout(900)
def test_file_system_against_model(tmp_cluster: Callable[..., Path],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Durability against power loss is not what this test checks (a reopen in the same
    # process reads the page cache), and thousands of fsyncs would make a failing run
    # shrink for minutes: skip them.
    monkeypatch.setattr(os, "fsync", lambda fd: None)

    class Machine(FsMachine):
        make_cluster = staticmethod(tmp_cluster)

    run_state_machine_as_test(Machine, settings=SETTINGS)
