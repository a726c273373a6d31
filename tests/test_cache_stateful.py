"""The nodes' coherent write-back caches against a simple model (issue 9).

One coordinator and three :class:`~sdbackup.cluster.node.ClusterClient` nodes run in
this process over TCP on 127.0.0.1 (as in ``tests/test_cluster_races.py``); each node
has the smallest cache a node can have (four 1 MiB segments), so that eviction
happens, and no background flusher: data is written back only when the test makes it
happen (fsync, close, eviction, a recall, a getattr from another node, or one
segment's write-back, as the flusher would do it, at a moment the test chooses).

What is modelled: the files of one directory, each a ``bytearray`` of its contents
(its length is the size; never-written bytes are zeros), with the number of opens per
node and whether it still has a name. Every node must show exactly that: a read from
any node returns the model's bytes (short at the end of the file), ``getattr`` from any
node returns the model's size, and an unlinked file lives on, readable by the nodes
that have it open, until its last close. The shared disks are filled with garbage
before the cluster is used, as disks that held deleted data are: a never-written byte
that reads as anything but zero shows where the cache exposes stale disk contents.

Two regression tests force the interleavings of two data bugs of the node cache
(issue 9) deterministically: ``test_size_published_under_the_segment_lock`` and
``test_bytes_past_eof_never_exposed``.
"""

from __future__ import annotations

import errno
import itertools
import shutil
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, suppress
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
from sdbackup.cluster.coordinator import Coordinator
from sdbackup.cluster.local import DiskSpec, init_cluster
from sdbackup.cluster.node import ClusterClient
from sdbackup.errors import FsError, RemoteError
from sdbackup.fs.cached import CachedFileSystem, Seg
from sdbackup.fs.segments import SEGMENT_BYTES
from sdbackup.meta import fsck
from sdbackup.types import ROOT_INODE

BS = 512
SEG = SEGMENT_BYTES
NODES = 3
DISK_BYTES = 8 << 20  # two disks of 16384 blocks
CACHE_BYTES = 4 * SEG  # the smallest cache a node has: the fifth segment evicts
NAMES = [b"f0", b"f1", b"f2", b"f3", b"f4"]
PATTERN = bytes(range(1, 256)) * 40  # never zero, so a zero is a hole or a gap
GARBAGE = b"\xde\xad\xbe\xef"  # on the disks before use: never consecutive in PATTERN
S_IFREG = 0o100000
S_IFMT = 0o170000

# A write's "gap action": run at the first moment after the write has applied its data
# to a segment at which the writing thread holds no segment lock (see GapHook).
GAP_ACTIONS = [None, None, None, None, "flusher", "stat", "recall"]


def garbage(n: int) -> bytes:
    return (GARBAGE * (n // len(GARBAGE) + 1))[:n]


def diff(got: bytes, want: bytes | bytearray, what: str) -> str:
    """A readable account of how two byte strings differ (for assertion messages)."""
    want = bytes(want)
    if len(got) != len(want):
        head = f"{what}: {len(got)} bytes, model has {len(want)}"
    else:
        head = f"{what}: same length ({len(got)})"
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            j = i
            while j < min(len(got), len(want)) and got[j] != want[j]:
                j += 1
            return (f"{head}; first difference at byte {i} (differs up to {j}): got "
                    f"{got[i:i + 8].hex(' ')}..., want {want[i:i + 8].hex(' ')}...")
    return head


# -- the cluster ---------------------------------------------------------------------------

class Cluster:
    """A fresh cluster with its coordinator and ``nodes`` clients, all in this process.

    The disks are filled with garbage past their labels before the coordinator opens
    them. ``close`` always stops everything, whatever state a failed example left.
    """

    def __init__(self, base: Path, nodes: int = NODES, *, lease: float = 2.0) -> None:
        self.base = base
        base.mkdir(parents=True)
        specs = [DiskSpec(f"d{i}", base / f"d{i}.img", DISK_BYTES) for i in range(2)]
        init_cluster(base / "c", specs, block_size=BS)
        for spec in specs:
            with open(spec.path, "r+b") as fh:
                fh.seek(LABEL_BLOCKS * BS)
                fh.write(garbage(DISK_BYTES - LABEL_BLOCKS * BS))
        self.coord = Coordinator(base / "c", lease=lease)
        self.clients: list[ClusterClient] = []
        self.hooks: list[GapHook] = []
        try:
            self.coord.start()
            for i in range(nodes):
                c = ClusterClient(f"n{i}", cluster_dir=base / "c", cache_bytes=CACHE_BYTES,
                                  flush_delay=3600.0)
                self.clients.append(c)
                self.hooks.append(GapHook(c.fs))
        except BaseException:
            self.close()
            raise

    @property
    def fs(self) -> list[CachedFileSystem]:
        return [c.fs for c in self.clients]

    def committed_size(self, ino: int) -> int:
        """The size in the metadata store (no node is asked to write anything back)."""
        return self.coord.meta.getattr(ino).size

    def fsck(self, orphans: Collection[int] = ()) -> list[str]:
        allowed = {f"inode {i} has no name (orphan)" for i in orphans}
        with self.coord.store.lock:
            problems = fsck.check_all(self.coord.store)
        return [p.message for p in problems if p.message not in allowed]

    def regular_inodes(self) -> set[int]:
        with self.coord.store.lock:
            rows = self.coord.store.query(
                "SELECT id FROM inodes WHERE (mode & ?) = ?", (S_IFMT, S_IFREG))
        return {int(r[0]) for r in rows}

    def plant_garbage_past_eof(self, ino: int) -> int:
        """Put garbage in the file's last block past its end, on disk; returns the size.

        This is the state a node leaves when it dies between the data write and the
        commit of a write-back that grew the file (and what any failed write-back may
        leave): bytes past the end of a file on disk are not to be trusted. Every right
        on the file is recalled first (as the coordinator's own truncate does), so no
        node caches the block meanwhile.
        """
        with self.coord.rights.exclusive(ino):
            size = self.committed_size(ino)
            if size % BS:
                for ext in self.coord.meta.map_read(ino, size // BS, 1):
                    dev = self.coord.disks.device(ext.disk)
                    block = bytearray(dev.read(ext.dblock, 1))
                    block[size % BS:] = garbage(BS - size % BS)
                    dev.write(ext.dblock, block)
        return size

    def close(self) -> None:
        for c in self.clients:
            with suppress(Exception):  # a failed example may leave data that cannot go
                c.close()
        with suppress(Exception):
            self.coord.stop()
        shutil.rmtree(self.base, ignore_errors=True)


# -- forcing an interleaving ---------------------------------------------------------------

class _GapLock:
    """A segment's reentrant lock that tells its hook when a thread lets go of it."""

    def __init__(self, hook: GapHook, key: tuple[int, int]) -> None:
        self._lock = threading.RLock()
        self._hook = hook
        self._key = key
        self._depth = 0  # changed only by the owner

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self._lock.acquire(blocking, timeout):
            return False
        self._depth += 1
        if self._depth == 1:
            self._hook._took()
        return True

    def release(self) -> None:
        self._depth -= 1
        last = self._depth == 0
        self._lock.release()
        if last:
            self._hook._let_go()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class GapHook:
    """Runs one action at the first moment another thread could take a segment that a
    write of this node has just changed.

    Once armed, the hook waits until the arming thread has applied data to a segment
    (``CachedFileSystem._apply``) and then holds no segment lock at all. At that moment
    the writing thread pauses and the action runs in a thread of its own: what the
    background flusher (blocked on that segment's lock), or a recall or a getattr
    arriving from another node, may do at that moment; the hook only makes the timing
    certain. An action that cannot finish within ``patience`` seconds (it needs a lock
    the writer still holds) could not have run in that moment either: the writer goes
    on, and the action finishes after it. The action gets (ino, segment) of the segment
    the write changed; its exception, if any, is kept in ``error``.
    """

    patience = 1.0

    def __init__(self, fs: CachedFileSystem) -> None:
        self.fs = fs
        self._tls = threading.local()
        self._thread: int | None = None
        self._action: Callable[[int, int], Any] | None = None
        self._applied: tuple[int, int] | None = None
        self._runners: list[threading.Thread] = []
        self.fired: tuple[int, int] | None = None  # the segment, once the action started
        self.in_gap = False  # the action finished before the writer went on
        self.error: BaseException | None = None
        real_get = fs._get
        real_apply = fs._apply

        def _get(ino: int, seg: int) -> Seg:
            s = real_get(ino, seg)
            lock: Any = s.lock
            if not isinstance(lock, _GapLock):  # a new segment, not yet seen by anyone
                s.lock = _GapLock(self, (ino, seg))  # type: ignore[assignment]
            return s

        def _apply(o: Seg, *args: Any, **kw: Any) -> Any:
            out = real_apply(o, *args, **kw)
            if self._action is not None and self._applied is None \
                    and threading.get_ident() == self._thread:
                self._applied = (o.ino, o.seg)
            return out

        fs._get = _get  # type: ignore[method-assign]
        fs._apply = _apply  # type: ignore[method-assign]

    def _took(self) -> None:
        self._tls.held = getattr(self._tls, "held", 0) + 1

    def _let_go(self) -> None:
        self._tls.held -= 1
        if self._tls.held or self._applied is None or self._action is None \
                or threading.get_ident() != self._thread:
            return
        action, self._action = self._action, None
        ino, seg = self.fired = self._applied

        def run() -> None:
            try:
                action(ino, seg)
            except BaseException as e:  # reported by the test after the write returns
                self.error = e

        runner = threading.Thread(target=run, name="gap-action", daemon=True)
        self._runners.append(runner)
        runner.start()
        runner.join(self.patience)
        self.in_gap = not runner.is_alive()

    @contextmanager
    def armed(self, action: Callable[[int, int], Any]) -> Iterator[GapHook]:
        self._thread = threading.get_ident()
        self._applied = None
        self._runners.clear()
        self.fired = None
        self.in_gap = False
        self.error = None
        self._action = action
        try:
            yield self
        finally:
            self._action = None
            self._thread = None
            for runner in self._runners:
                runner.join(60)
                if runner.is_alive() and self.error is None:
                    self.error = TimeoutError("the gap action did not finish in 60 s")


def flusher_writeback(fs: CachedFileSystem, ino: int, seg: int) -> bool:
    """What the background flusher does to one segment whose delay is up
    (``CachedFileSystem._flush_loop``): write it back under its lock."""
    for s in fs._snapshot(ino):
        if s.seg == seg:
            with s.lock:
                fs._writeback(s)
            return True
    return False


def gap_action(kind: str, fs: CachedFileSystem, other: CachedFileSystem | None
               ) -> Callable[[int, int], Any]:
    """The action of a GapHook: the writer's flusher, or another node's getattr (which
    makes the writer write back) or read of the segment (which recalls it)."""
    if kind == "flusher" or other is None:
        return lambda ino, seg: flusher_writeback(fs, ino, seg)
    if kind == "stat":
        return lambda ino, seg: other.getattr(ino)
    if kind == "recall":
        return lambda ino, seg: other.read(ino, seg * SEG, 1)
    raise ValueError(kind)


# -- the model -----------------------------------------------------------------------------

class MFile:
    """A file: its contents (zero-filled where never written), opens per node, and
    the last range written (for a recall: another node writes the same range)."""

    def __init__(self, ino: int, name: bytes | None) -> None:
        self.ino = ino
        self.name = name  # None once unlinked
        self.data = bytearray()
        self.opens = [0] * NODES
        self.last_write: tuple[int, int, int] | None = None  # (node, offset, length)

    def show(self) -> str:
        name = self.name.decode() if self.name is not None else "(unlinked)"
        return f"{name} (inode {self.ino}, {len(self.data)} bytes)"

    __repr__ = show  # how hypothesis prints the files it draws


class CacheMachine(RuleBasedStateMachine):
    """Three nodes' caches of one cluster against ``MFile`` models (see the module)."""

    base: Path  # set by the test: where the examples' clusters go
    counter = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.c = Cluster(self.base / f"ex{next(self.counter)}")
        self.files: list[MFile] = []
        self.writes = 0

    def teardown(self) -> None:
        self.c.close()

    # -- helpers --------------------------------------------------------------------------
    def node_fs(self, node: int) -> CachedFileSystem:
        return self.c.clients[node].fs

    def named(self) -> list[MFile]:
        return [f for f in self.files if f.name is not None]

    def by_name(self, name: bytes) -> MFile | None:
        return next((f for f in self.files if f.name == name), None)

    def users(self, f: MFile) -> list[int]:
        """Nodes that may use the file: all while it has a name, else those with it open."""
        return list(range(NODES)) if f.name is not None else \
            [n for n in range(NODES) if f.opens[n]]

    def pick(self, data: st.DataObject, files: list[MFile] | None = None
             ) -> tuple[MFile, int] | None:
        files = self.files if files is None else files
        if not files:
            return None
        f = data.draw(st.sampled_from(files), label="file")
        node = data.draw(st.sampled_from(self.users(f)), label="node")
        return f, node

    def draw_offset(self, data: st.DataObject, f: MFile, label: str) -> int:
        """Mostly small offsets near the data; sometimes around a segment boundary."""
        kind = data.draw(st.integers(0, 6), label=f"{label} kind")
        if kind < 5:
            return data.draw(st.integers(0, len(f.data) + 2 * BS), label=label)
        k = data.draw(st.integers(1, 3), label=f"{label} segment")
        if kind == 5:  # just before the boundary: a write of a few blocks crosses it
            return k * SEG - data.draw(st.integers(1, 2 * BS), label=label)
        return k * SEG + data.draw(st.integers(0, BS), label=label)

    def next_bytes(self, n: int) -> bytes:
        self.writes += 1
        seed = (self.writes * 37) % 255
        return PATTERN[seed : seed + n]

    def gap(self, kind: str | None, f: MFile, node: int) -> Callable[[int, int], Any] | None:
        if kind is None:
            return None
        others = [n for n in self.users(f) if n != node]
        other = self.node_fs(others[0]) if others else None
        return gap_action(kind, self.node_fs(node), other)

    @contextmanager
    def maybe_armed(self, node: int, action: Callable[[int, int], Any] | None
                    ) -> Iterator[None]:
        if action is None:
            yield
            return
        hook = self.c.hooks[node]
        with hook.armed(action):
            yield
        event(f"gap action fired: {hook.fired is not None}, in the gap: {hook.in_gap}")
        if hook.error is not None:
            raise AssertionError(f"the gap action failed: {hook.error!r}") from hook.error

    def expect_gone(self, ino: int) -> None:
        for n, fs in enumerate(self.c.fs):
            with pytest.raises(FsError) as ei:
                fs.getattr(ino)
            assert ei.value.errno == errno.ENOENT, f"node {n}: {ei.value}"

    def forget(self, f: MFile) -> None:
        """The file's last name and last open are gone: so is the inode."""
        self.files.remove(f)
        self.expect_gone(f.ino)

    @initialize()
    def start(self) -> None:
        for i, name in enumerate(NAMES[:2]):
            attr = self.node_fs(i).create(ROOT_INODE, name)
            self.files.append(MFile(attr.ino, name))

    # -- data -------------------------------------------------------------------------------
    # Hypothesis sorts rules by their number of arguments, then by name, and draws the
    # first one most often: ``write`` has one argument, every other rule two or more.
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        """A few blocks anywhere near the data, past the end, or across a segment
        boundary; sometimes with a gap action (see GapHook)."""
        got = self.pick(data)
        if got is None:
            return
        f, node = got
        offset = self.draw_offset(data, f, "offset")
        n = data.draw(st.integers(1, 4 * BS), label="length")
        gap = data.draw(st.sampled_from(GAP_ACTIONS), label="gap action")
        self._write(f, node, offset, n, gap)

    def _write(self, f: MFile, node: int, offset: int, n: int, gap: str | None) -> None:
        buf = self.next_bytes(n)
        fs = self.node_fs(node)
        cached = len(fs._snapshot())
        with self.maybe_armed(node, self.gap(gap, f, node)):
            assert fs.write(f.ino, offset, buf) == n
        if len(fs._snapshot()) < cached:
            event("a write evicted segments")
        if offset // SEG != (offset + n - 1) // SEG:
            event("a write crossed a segment boundary")
        if offset > len(f.data):
            event("a write past the end")
        if offset > len(f.data):
            f.data.extend(bytes(offset - len(f.data)))
        f.data[offset : offset + n] = buf
        f.last_write = (node, offset, n)

    @rule(data=st.data(), gap=st.sampled_from(GAP_ACTIONS))
    def append(self, data: st.DataObject, gap: str | None) -> None:
        got = self.pick(data)
        if got is None:
            return
        f, node = got
        buf = self.next_bytes(data.draw(st.integers(1, 2 * BS), label="length"))
        with self.maybe_armed(node, self.gap(gap, f, node)):
            at = self.node_fs(node).append(f.ino, buf)
        assert at == len(f.data), f"{f.show()}: appended at {at}"
        f.data += buf
        f.last_write = (node, at, len(buf))

    @rule(data=st.data(), segments=st.integers(5, 6))
    def spread_writes(self, data: st.DataObject, segments: int) -> None:
        """A few bytes in each of ``segments`` segments of a file: more segments than
        the node's cache holds, so the last writes evict the least recently used."""
        got = self.pick(data)
        if got is None:
            return
        f, node = got
        for k in range(segments):
            offset = k * SEG + data.draw(st.integers(0, 4 * BS), label="in segment")
            self._write(f, node, offset, data.draw(st.integers(1, BS), label="length"), None)

    @rule(data=st.data(), gap=st.sampled_from(GAP_ACTIONS))
    def overwrite_elsewhere(self, data: st.DataObject, gap: str | None) -> None:
        """Another node writes the range last written (a recall, often of dirty data)."""
        files = [f for f in self.files if f.last_write is not None
                 and any(n != f.last_write[0] for n in self.users(f))]
        if not files:
            return
        f = data.draw(st.sampled_from(files), label="file")
        assert f.last_write is not None
        was, offset, n = f.last_write
        if f.ino in self.node_fs(was).dirty_segments():
            event("overwrite elsewhere recalls dirty data")
        node = data.draw(st.sampled_from([n for n in self.users(f) if n != was]),
                         label="node")
        self._write(f, node, offset, n, gap)

    @rule(data=st.data(), grow=st.booleans())
    def truncate(self, data: st.DataObject, grow: bool) -> None:
        got = self.pick(data)
        if got is None:
            return
        f, node = got
        if grow:
            size = len(f.data) + self.draw_offset(data, f, "by") // 2
        else:
            size = data.draw(st.integers(0, len(f.data)), label="size")
        attr = self.node_fs(node).truncate(f.ino, size)
        assert attr.size == size
        if size < len(f.data):
            del f.data[size:]
        else:
            f.data.extend(bytes(size - len(f.data)))

    @rule(data=st.data(), near_last_write=st.booleans())
    def read(self, data: st.DataObject, near_last_write: bool) -> None:
        got = self.pick(data)
        if got is None:
            return
        f, node = got
        if f.last_write is not None and near_last_write:
            offset = max(0, f.last_write[1] - data.draw(st.integers(0, BS), label="before"))
        else:
            offset = self.draw_offset(data, f, "offset")
        n = data.draw(st.integers(0, 6 * BS), label="length")
        out = self.node_fs(node).read(f.ino, offset, n)
        want = f.data[offset : offset + n]
        assert out == want, diff(out, want, f"{f.show()} [{offset}:{offset + n}] from node {node}")

    @rule(data=st.data(), lookup=st.booleans())
    def stat(self, data: st.DataObject, lookup: bool) -> None:
        """getattr (or lookup) from a node: other nodes' writers write back first."""
        got = self.pick(data)
        if got is None:
            return
        f, node = got
        fs = self.node_fs(node)
        if lookup and f.name is not None:
            assert fs.lookup(ROOT_INODE, f.name).size == len(f.data), f.show()
        else:
            assert fs.getattr(f.ino).size == len(f.data), f"{f.show()} from node {node}"

    @rule(order=st.permutations(range(NODES)), lookup=st.booleans())
    def read_everything_everywhere(self, order: list[int], lookup: bool) -> None:
        """Every file's size and bytes, from every node that may use it."""
        for f in self.files:
            for node in order:
                if node not in self.users(f):
                    continue
                fs = self.node_fs(node)
                if lookup and f.name is not None:
                    size = fs.lookup(ROOT_INODE, f.name).size
                else:
                    size = fs.getattr(f.ino).size
                assert size == len(f.data), f"{f.show()}: size {size} on node {node}"
                out = fs.read(f.ino, 0, len(f.data) + BS)
                assert out == f.data, diff(out, f.data, f"{f.show()} from node {node}")

    @rule(data=st.data(), whole_node=st.booleans())
    def fsync(self, data: st.DataObject, whole_node: bool) -> None:
        got = self.pick(data)
        if got is None:
            return
        f, node = got
        fs = self.node_fs(node)
        fs.fsync(None if whole_node else f.ino)
        dirty = fs.dirty_segments()
        assert f.ino not in dirty, f"{f.show()} still dirty on node {node} after fsync"
        if whole_node:
            assert not dirty, dirty

    @rule(order=st.permutations(range(NODES)), sync=st.booleans())
    def flush_everything(self, order: list[int], sync: bool) -> None:
        """Every node writes everything back (``sync``: and syncs the disks and the
        metadata, as ``fsync`` of all files does)."""
        for node in order:
            fs = self.node_fs(node)
            if sync:
                fs.fsync(None)
            else:
                fs.flush_all()
        assert not any(fs.dirty_segments() for fs in self.c.fs)

    @rule(node=st.integers(0, NODES - 1), keep=st.integers(0, 3))
    def evict(self, node: int, keep: int) -> None:
        """The cache's eviction, with the limit lowered so that it keeps about ``keep``
        segments (it evicts down to 3/4 of the limit, least recently used first)."""
        fs = self.node_fs(node)
        if fs.dirty_segments():
            event("evict with dirty data cached")
        limit = fs.cache_bytes
        fs.cache_bytes = (keep * SEG * 4 + 2) // 3
        try:
            fs._maybe_evict()
        finally:
            fs.cache_bytes = limit

    @rule(node=st.integers(0, NODES - 1), data=st.data())
    def flusher(self, node: int, data: st.DataObject) -> None:
        """The background flusher writes back one dirty segment of a node, now."""
        fs = self.node_fs(node)
        segs = sorted((s.ino, s.seg) for s in fs._snapshot() if s.dirty)
        if not segs:
            return
        ino, seg = data.draw(st.sampled_from(segs), label="segment")
        flusher_writeback(fs, ino, seg)

    @rule(data=st.data(), then=st.sampled_from([None, "write", "truncate"]))
    def garbage_past_eof(self, data: st.DataObject, then: str | None) -> None:
        """The file's last block on disk gets garbage past the end of the file (as a node
        that died between a write-back's data and its commit leaves it); ``then``: a
        node grows the file over it at once."""
        files = [f for f in self.files if len(f.data) % BS]
        if not files:
            return
        f = data.draw(st.sampled_from(files), label="file")
        event("garbage planted past the end")
        size = self.c.plant_garbage_past_eof(f.ino)
        assert size == len(f.data), f"{f.show()}: size {size} once every node wrote back"
        if then is None:
            return
        node = data.draw(st.sampled_from(self.users(f)), label="node")
        by = data.draw(st.integers(1, 2 * BS), label="past the end by")
        if then == "write":
            self._write(f, node, size + by, data.draw(st.integers(1, BS), label="length"),
                        None)
        else:
            assert self.node_fs(node).truncate(f.ino, size + by).size == size + by
            f.data.extend(bytes(by))

    # -- namespace --------------------------------------------------------------------------
    @rule(node=st.integers(0, NODES - 1), name=st.sampled_from(NAMES))
    def create(self, node: int, name: bytes) -> None:
        fs = self.node_fs(node)
        if self.by_name(name) is not None:
            with pytest.raises(FsError) as ei:
                fs.create(ROOT_INODE, name)
            assert ei.value.errno == errno.EEXIST
            return
        attr = fs.create(ROOT_INODE, name)
        assert attr.size == 0 and attr.is_reg
        self.files.append(MFile(attr.ino, name))

    @rule(data=st.data(), times=st.integers(1, 2))
    def open(self, data: st.DataObject, times: int) -> None:
        got = self.pick(data)
        if got is None:
            return
        f, node = got
        for _ in range(times):
            self.node_fs(node).open(f.ino)
            f.opens[node] += 1

    @rule(data=st.data(), fsync_first=st.booleans())
    def release(self, data: st.DataObject, fsync_first: bool) -> None:
        """Close: the node writes the file back; the last close of an unlinked file frees it."""
        held = [(f, n) for f in self.files for n in range(NODES) if f.opens[n]]
        if not held:
            return
        f, node = data.draw(st.sampled_from(held), label="handle")
        if fsync_first:
            self.node_fs(node).fsync(f.ino)
        self.node_fs(node).release(f.ino)
        f.opens[node] -= 1
        if f.name is None and not any(f.opens):
            self.forget(f)

    @rule(data=st.data(), open_elsewhere=st.booleans())
    def unlink(self, data: st.DataObject, open_elsewhere: bool) -> None:
        """Remove a file's name; with ``open_elsewhere``, another node has it open (and
        perhaps dirty) and still reads all of it afterwards."""
        got = self.pick(data, self.named())
        if got is None:
            return
        f, node = got
        assert f.name is not None
        opener = None
        if open_elsewhere:
            opener = data.draw(st.sampled_from([n for n in range(NODES) if n != node]),
                               label="opener")
            self.node_fs(opener).open(f.ino)
            f.opens[opener] += 1
            if any(f.ino in fs.dirty_segments() for fs in self.c.fs):
                event("unlink while open elsewhere, with dirty data")
        self.node_fs(node).unlink(ROOT_INODE, f.name)
        f.name = None
        if not any(f.opens):
            self.forget(f)
        elif opener is not None:
            out = self.node_fs(opener).read(f.ino, 0, len(f.data) + BS)
            assert out == f.data, diff(out, f.data, f"{f.show()} read by its opener")

    # -- after every step ---------------------------------------------------------------------
    @invariant()
    def consistent(self) -> None:
        """fsck is clean; exactly the model's files exist; no size ever runs ahead of
        the data; and every node's size is the model's, checked wherever asking has no
        side effect (a getattr makes the other nodes' writers write back: it is asked
        only from nodes with no other node holding dirty data of the file)."""
        orphans = {f.ino for f in self.files if f.name is None}
        problems = self.c.fsck(orphans)
        assert problems == [], problems
        inodes = self.c.regular_inodes()
        assert inodes == {f.ino for f in self.files}, f"regular inodes {sorted(inodes)}"
        dirty = [fs.dirty_segments() for fs in self.c.fs]
        for f in self.files:
            committed = self.c.committed_size(f.ino)
            holders = [n for n in range(NODES) if f.ino in dirty[n]]
            if holders:
                assert committed <= len(f.data), \
                    f"{f.show()}: size {committed} committed, past the data"
            else:
                assert committed == len(f.data), \
                    f"{f.show()}: size {committed} committed, with nothing left to write"
            askable = range(NODES) if not holders else holders if len(holders) == 1 else []
            for node in askable:
                if node in self.users(f):
                    size = self.node_fs(node).getattr(f.ino).size
                    assert size == len(f.data), f"{f.show()}: size {size} on node {node}"


SETTINGS = settings(
    max_examples=80,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a failing run may shrink for minutes
def test_node_caches_against_model(tmp_path: Path) -> None:
    class Machine(CacheMachine):
        base = tmp_path

    run_state_machine_as_test(Machine, settings=SETTINGS)


# -- regression tests ---------------------------------------------------------------------

@pytest.fixture
def cache_cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster", lease=1.0)  # a dropped node's rights go sooner
    try:
        yield c
    finally:
        c.close()


@pytest.mark.parametrize("before", [0, 50], ids=["new-file", "50-bytes-written-back"])
@pytest.mark.parametrize("gap", ["flusher", "stat", "recall"])
def test_size_published_under_the_segment_lock(cache_cluster: Cluster, gap: str,
                                               before: int) -> None:
    """A write's new size must be known to a write-back of its segment as soon as that
    segment can be written back, i.e. as soon as the write lets go of its lock.

    The write-back runs exactly there: the flusher, a getattr from node 1 (which makes
    node 0 write back) or a read from node 1 (which recalls the segment). Today the size
    is published only afterwards: the write-back commits the whole block (a 100-byte
    file becomes 512 bytes, for good), or the older size of 50 bytes (the last 50 bytes
    are lost to every other node).
    """
    a, b = cache_cluster.fs[0], cache_cluster.fs[1]
    ino = a.create(ROOT_INODE, b"f").ino
    if before:
        a.write(ino, 0, b"o" * before)
        a.fsync(ino)  # written back; node 0 keeps its write right and its size
    with cache_cluster.hooks[0].armed(gap_action(gap, a, b)) as hook:
        assert a.write(ino, 0, b"x" * 100) == 100
    assert hook.fired == (ino, 0), "the write-back never ran between the write and its end"
    assert hook.error is None, repr(hook.error)
    assert a.getattr(ino).size == 100
    assert b.getattr(ino).size == 100
    assert b.read(ino, 0, 4096) == b"x" * 100
    for fs in cache_cluster.fs:
        fs.flush_all()
    assert cache_cluster.committed_size(ino) == 100
    a.truncate(ino, 100)  # the same size: every node drops its cache of the file
    for fs in (a, b):
        assert fs.getattr(ino).size == 100
        assert fs.read(ino, 0, 4096) == b"x" * 100
    assert cache_cluster.fsck() == []


def _commit_fails_then_node_dies(cluster: Cluster, ino: int, offset: int, n: int) -> None:
    """Node 2 writes past the end of the file; its write-back puts the data on disk, the
    commit fails, and the node is cut off (its cache is dropped, its loss logged)."""
    c = cluster.clients[2]
    c.fs.write(ino, offset, garbage(n))

    def commit_write(*args: Any, **kw: Any) -> Any:
        raise RemoteError("connection to the coordinator lost")

    c.meta.commit_write = commit_write  # type: ignore[method-assign]
    with pytest.raises(RemoteError):
        c.fs.fsync(ino)
    c.fs.drop_all()
    assert c.ref.client is not None
    c.ref.client.close()
    deadline = time.monotonic() + 10
    while any(e.node.partition("#")[0] == c.name for e in cluster.coord.rights.table()):
        assert time.monotonic() < deadline, "the coordinator never dropped node 2"
        time.sleep(0.01)


@pytest.mark.parametrize("grow", ["write-same-block", "write-later-block",
                                  "write-later-segment", "truncate-up"])
@pytest.mark.parametrize("how", ["raw-disk-write", "commit-failed"])
def test_bytes_past_eof_never_exposed(cache_cluster: Cluster, grow: str, how: str) -> None:
    """Bytes past the end of a file that were never written read as zeros when the
    file grows over them, whatever the disk holds there.

    The file has 100 bytes; its block on disk holds garbage after them (written raw
    by the test, or left by a write-back whose commit failed before its node died).
    Node 0 grows the file by writing past the end in the same block, in a later block
    or segment, or by truncating up; both nodes must read zeros between the old end and
    the new data. Today ``_apply`` fills the edge block from disk ignoring the size, and
    nothing zeroes the gap when the file grows.
    """
    a, b = cache_cluster.fs[0], cache_cluster.fs[1]
    ino = a.create(ROOT_INODE, b"f").ino
    a.write(ino, 0, b"x" * 100)
    a.fsync(ino)
    if how == "raw-disk-write":
        assert cache_cluster.plant_garbage_past_eof(ino) == 100
    else:
        _commit_fails_then_node_dies(cache_cluster, ino, 100, 300)
    assert b.getattr(ino).size == 100
    assert b.read(ino, 0, 4096) == b"x" * 100
    # The garbage really is on the disk, past the end of the file.
    ext = cache_cluster.coord.meta.map_read(ino, 0, 1)[0]
    assert cache_cluster.coord.disks.device(ext.disk).read(ext.dblock, 1)[100:104] == GARBAGE

    if grow == "truncate-up":
        a.truncate(ino, 3000)
        want = b"x" * 100 + bytes(2900)
    else:
        at = {"write-same-block": 450, "write-later-block": 2000,
              "write-later-segment": SEG + 100}[grow]
        a.write(ino, at, b"y" * 20)
        want = b"x" * 100 + bytes(at - 100) + b"y" * 20

    for rnd in ("before write-back", "from the disk"):
        for name, fs in (("node 0", a), ("node 1", b)):
            assert fs.getattr(ino).size == len(want), f"{name}, {rnd}"
            got = fs.read(ino, 0, len(want) + BS)
            assert got == want, diff(got, want, f"{name}, {rnd}")
        for fs in cache_cluster.fs[:2]:
            fs.flush_all()
        assert cache_cluster.committed_size(ino) == len(want)
        a.truncate(ino, len(want))  # the same size: every node drops its cache of the file
    assert cache_cluster.fsck() == []
