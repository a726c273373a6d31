"""Metadata capabilities (issue 14): nodes answer lookup and getattr from their own
cache, and are never older than the coordinator.

One coordinator and two or three :class:`~sdbackup.cluster.node.ClusterClient` nodes
in this process over TCP on 127.0.0.1. Each test checks both that the cache is used
(hits counted by the node) and that it is exact: what one node changes, the next call
on any other node sees, with no delay. The state machine drives random namespace and
attribute changes from random nodes in one directory and compares every node's
answers with a model after every step; the concurrent test has two nodes create,
rename and delete in one directory at the same time and checks that both end with
the coordinator's view, name by name.
"""

from __future__ import annotations

import errno
import itertools
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from sdbackup.cluster.coordinator import Coordinator
from sdbackup.cluster.local import DiskSpec, init_cluster
from sdbackup.cluster.node import ClusterClient
from sdbackup.errors import FsError
from sdbackup.net.cached_meta import CachingMeta
from sdbackup.types import ROOT_INODE

S_IFMT = 0o170000


@pytest.fixture
def cdir(tmp_path: Path) -> Path:
    init_cluster(tmp_path / "c", [DiskSpec.parse(f"d0={tmp_path}/d0.img:32MiB")],
                 block_size=512)
    return tmp_path / "c"


@pytest.fixture
def coord(cdir: Path) -> Iterator[Coordinator]:
    c = Coordinator(cdir, lease=2.0)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def nodes(coord: Coordinator, cdir: Path) -> Iterator[list[ClusterClient]]:
    out = [ClusterClient(f"n{i}", cluster_dir=cdir, flush_delay=60) for i in range(3)]
    try:
        yield out
    finally:
        for c in out:
            c.close()


def meta(c: ClusterClient) -> CachingMeta:
    assert isinstance(c.meta, CachingMeta)
    return c.meta


def lookup_or_none(c: ClusterClient, parent: int, name: bytes) -> tuple[int, int] | None:
    try:
        a = c.fs.lookup(parent, name)
    except FsError as e:
        assert e.errno == errno.ENOENT
        return None
    return a.ino, a.mode


def test_a_change_on_one_node_is_seen_at_once_by_a_node_that_cached_it(
        nodes: list[ClusterClient], coord: Coordinator) -> None:
    a, b, _ = nodes
    ino = a.fs.create(ROOT_INODE, b"f", 0o644).ino
    assert b.fs.lookup(ROOT_INODE, b"f").mode & 0o7777 == 0o644
    hits = meta(b).stats["hits"]
    assert b.fs.lookup(ROOT_INODE, b"f").mode & 0o7777 == 0o644
    assert meta(b).stats["hits"] == hits + 1, "the second lookup was not answered locally"
    assert b.meta.block_size and b.session in coord.caps.holders(ino)
    a.fs.setattr(ino, mode=0o600)
    assert ino not in meta(b).cached()[0], "the holder kept the inode after the change"
    assert b.fs.lookup(ROOT_INODE, b"f").mode & 0o7777 == 0o600
    assert b.fs.getattr(ino).mode & 0o7777 == 0o600


def test_a_name_cached_as_absent_appears_when_another_node_creates_it(
        nodes: list[ClusterClient]) -> None:
    a, b, _ = nodes
    assert lookup_or_none(b, ROOT_INODE, b"new") is None
    hits = meta(b).stats["hits"]
    assert lookup_or_none(b, ROOT_INODE, b"new") is None
    assert meta(b).stats["hits"] == hits + 1, "the absent name was not cached"
    ino = a.fs.create(ROOT_INODE, b"new").ino
    assert lookup_or_none(b, ROOT_INODE, b"new") == (ino, b.fs.getattr(ino).mode)
    a.fs.unlink(ROOT_INODE, b"new")
    assert lookup_or_none(b, ROOT_INODE, b"new") is None


def test_the_actor_keeps_what_it_changed(nodes: list[ClusterClient]) -> None:
    """The node that makes a change caches its result (one round trip, not two)."""
    a = nodes[0]
    d = a.fs.mkdir(ROOT_INODE, b"d").ino
    ino = a.fs.create(d, b"x").ino
    hits = meta(a).stats["hits"]
    assert a.fs.lookup(d, b"x").ino == ino
    assert lookup_or_none(a, d, b"y") is None or True  # fills the absent name
    a.fs.setattr(ino, mode=0o640)
    assert a.fs.lookup(d, b"x").mode & 0o7777 == 0o640
    assert a.fs.getattr(d).nlink == 2
    assert meta(a).stats["hits"] > hits


def test_no_capability_while_another_node_writes_the_file(nodes: list[ClusterClient]) -> None:
    """A writer's size changes in its own cache: the others ask the coordinator (which
    has the writer write back first), never their caches."""
    a, b, _ = nodes
    ino = a.fs.create(ROOT_INODE, b"w").ino
    assert b.fs.getattr(ino).size == 0
    a.fs.write(ino, 0, b"x" * 3000)  # a holds the write right, data dirty in a
    assert b.fs.getattr(ino).size == 3000
    assert b.fs.lookup(ROOT_INODE, b"w").size == 3000
    a.fs.write(ino, 3000, b"y" * 1000)
    assert b.fs.getattr(ino).size == 4000
    assert ino not in meta(b).cached()[0]


def test_a_fenced_node_stops_answering_from_its_cache(nodes: list[ClusterClient]) -> None:
    a, b, _ = nodes
    a.fs.create(ROOT_INODE, b"f")
    b.fs.lookup(ROOT_INODE, b"f")
    b._renewable = False  # as while it joins again after being fenced
    assert meta(b).peek_lookup(ROOT_INODE, b"f") is None
    b._renewable = True
    assert meta(b).peek_lookup(ROOT_INODE, b"f") is not None


class Namespace(RuleBasedStateMachine):
    """Random changes from random nodes in one directory against a model."""

    NAMES = [b"a", b"b", b"c", b"d"]

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[bytes, int] = {}  # name -> mode (permission bits)
        self.dir = NODES[0].fs.mkdir(ROOT_INODE, f"t{next(_DIRS)}".encode()).ino

    node = st.integers(0, 2)
    name = st.sampled_from(NAMES)

    @rule(n=node, name=name, mode=st.sampled_from([0o600, 0o644, 0o755]))
    def create(self, n: int, name: bytes, mode: int) -> None:
        try:
            NODES[n].fs.create(self.dir, name, mode)
        except FsError as e:
            assert e.errno == errno.EEXIST and name in self.model
            return
        assert name not in self.model
        self.model[name] = mode

    @rule(n=node, name=name)
    def unlink(self, n: int, name: bytes) -> None:
        try:
            NODES[n].fs.unlink(self.dir, name)
        except FsError as e:
            assert e.errno == errno.ENOENT and name not in self.model
            return
        del self.model[name]

    @rule(n=node, src=name, dst=name)
    def rename(self, n: int, src: bytes, dst: bytes) -> None:
        try:
            NODES[n].fs.rename(self.dir, src, self.dir, dst)
        except FsError as e:
            assert e.errno == errno.ENOENT and src not in self.model
            return
        mode = self.model.pop(src)
        self.model[dst] = mode

    @rule(n=node, name=name, mode=st.sampled_from([0o600, 0o640, 0o700]))
    def chmod(self, n: int, name: bytes, mode: int) -> None:
        try:
            ino = NODES[n].fs.lookup(self.dir, name).ino
        except FsError:
            assert name not in self.model
            return
        NODES[n].fs.setattr(ino, mode=0o100000 | mode)
        self.model[name] = mode

    @rule(n=node, name=name)
    def look(self, n: int, name: bytes) -> None:
        got = lookup_or_none(NODES[n], self.dir, name)
        want = self.model.get(name)
        assert (got[1] & 0o7777 if got else None) == want

    @invariant()
    def every_node_sees_the_model(self) -> None:
        for c in NODES:
            for name in self.NAMES:
                got = lookup_or_none(c, self.dir, name)
                assert (got[1] & 0o7777 if got else None) == self.model.get(name), \
                    (c.name, name, got, self.model)


NODES: list[ClusterClient] = []
_DIRS = itertools.count()


def test_namespace_state_machine(nodes: list[ClusterClient]) -> None:
    NODES[:] = nodes
    try:
        run_state_machine_as_test(Namespace, settings=settings(
            max_examples=25, stateful_step_count=30, deadline=None,
            suppress_health_check=list(HealthCheck)))
    finally:
        NODES.clear()
    assert sum(meta(c).stats["hits"] for c in nodes) > 100, "the caches were never used"


def test_two_nodes_changing_one_directory_at_once_agree_with_the_coordinator(
        nodes: list[ClusterClient], coord: Coordinator) -> None:
    """Concurrent creates, renames and deletes from two nodes in one directory; a
    third node keeps looking names up all along. At the end every node answers every
    name exactly as the coordinator's metadata does."""
    a, b, watcher = nodes
    d = a.fs.mkdir(ROOT_INODE, b"shared").ino
    names = [f"n{i}".encode() for i in range(12)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def work(c: ClusterClient, seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for _ in range(300):
                op, n1, n2 = rnd.random(), rnd.choice(names), rnd.choice(names)
                try:
                    if op < 0.4:
                        c.fs.create(d, n1, 0o644)
                    elif op < 0.6:
                        c.fs.rename(d, n1, d, n2)
                    elif op < 0.8:
                        c.fs.unlink(d, n1)
                    else:
                        ino = c.fs.lookup(d, n1).ino
                        c.fs.setattr(ino, mode=0o100000 | rnd.choice([0o600, 0o644]))
                except FsError as e:
                    assert e.errno in (errno.EEXIST, errno.ENOENT), e
        except BaseException as e:  # reported below
            errors.append(e)

    def watch() -> None:
        while not stop.is_set():
            for n in names:
                lookup_or_none(watcher, d, n)

    threads = [threading.Thread(target=work, args=(a, 1)),
               threading.Thread(target=work, args=(b, 2))]
    w = threading.Thread(target=watch)
    w.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    w.join()
    assert not errors, errors
    truth = {}
    for n in names:
        try:
            attr = coord.meta.lookup(d, n)
            truth[n] = (attr.ino, attr.mode)
        except FsError:
            truth[n] = None
    for c in nodes:
        got = {n: lookup_or_none(c, d, n) for n in names}
        assert got == truth, (c.name, got, truth)
    assert coord.caps.stats["drops"] > 0


def test_a_directory_its_node_made_is_known_complete_until_another_node_changes_it(
        nodes: list[ClusterClient]) -> None:
    """Absent names in a directory this node made (and changed alone since) are
    answered locally -- what makes creating many files cheap -- and the first change
    by another node ends that."""
    a, b, _ = nodes
    d = a.fs.mkdir(ROOT_INODE, b"mine").ino
    misses = meta(a).stats["misses"]
    for i in range(20):
        assert lookup_or_none(a, d, f"x{i}".encode()) is None
        a.fs.create(d, f"x{i}".encode())
        assert lookup_or_none(a, d, f"x{i}".encode()) is not None
    assert meta(a).stats["misses"] == misses, "absent names in a complete directory asked"
    ino = b.fs.create(d, b"from-b").ino
    assert lookup_or_none(a, d, b"from-b") == (ino, a.fs.getattr(ino).mode)
    b.fs.unlink(d, b"x3")
    assert lookup_or_none(a, d, b"x3") is None
    assert lookup_or_none(a, d, b"x4") is not None


def test_a_program_create_takes_the_write_right_with_the_name(
        nodes: list[ClusterClient]) -> None:
    """create_open: one round trip gives the name, the open and the write right on the
    first segment; the first write asks for nothing, and the right is as real as any
    (another node's read recalls it and sees the data)."""
    a, b, _ = nodes
    attr = a.fs.create_open(ROOT_INODE, b"prog", 0o644)
    acquires = a.fs.stats["acquires"]
    a.fs.write(attr.ino, 0, b"hello" * 100)
    assert a.fs.stats["acquires"] == acquires, "the first write asked for its right"
    assert b.fs.read(attr.ino, 0, 1000) == b"hello" * 100
    a.fs.write(attr.ino, 500, b"again")
    assert b.fs.read(attr.ino, 500, 5) == b"again"
    a.fs.release(attr.ino)
