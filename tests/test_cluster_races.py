"""Interleavings that real processes hit only by chance, forced in-process.

The coordinator and the nodes run in this process over real TCP on 127.0.0.1; a small
patch of one step makes another thread (or the coordinator) act exactly inside the
window under test. Each test names the invariant it protects.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdbackup.cluster.coordinator import Coordinator
from sdbackup.cluster.local import DiskSpec, init_cluster
from sdbackup.cluster.node import ClusterClient, NodeAgent
from sdbackup.errors import RemoteError
from sdbackup.fs.segments import SEGMENT_BYTES

MiB = 1 << 20


@pytest.fixture
def cdir(tmp_path: Path) -> Path:
    init_cluster(tmp_path / "c", [DiskSpec.parse(f"d0={tmp_path}/d0.img:32MiB")],
                 block_size=512)
    return tmp_path / "c"


@pytest.fixture
def coord(cdir: Path) -> Iterator[Coordinator]:
    c = Coordinator(cdir, lease=1.0)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def _writers(coord: Coordinator, ino: int, seg: int) -> list[str]:
    return [e.node.partition("#")[0] for e in coord.rights.table()
            if e.ino == ino and e.mode == "w" and e.offset <= seg * SEGMENT_BYTES
            < e.offset + e.size]


def test_eviction_release_does_not_drop_a_right_taken_again_meanwhile(
        coord: Coordinator, cdir: Path) -> None:
    """Invariant: a node caches (and dirties) a segment only under a right the
    coordinator knows of. An eviction gives segments back with a release RPC; if
    another thread of the same node takes the segment again before that RPC lands,
    the release must not remove the new right."""
    a = ClusterClient("a", cluster_dir=cdir, cache_bytes=4 * MiB, flush_delay=60)
    b = ClusterClient("b", cluster_dir=cdir, cache_bytes=64 * MiB, flush_delay=60)
    try:
        ino = a.fs.create(1, b"f").ino
        real_release = a.rights.release
        raced = threading.Event()
        threads: list[threading.Thread] = []

        def release(i: int, segs: list[int]) -> None:
            if i == ino and 0 in segs and not raced.is_set():
                raced.set()
                # Another thread of node a writes segment 0 again, right now.
                # (It may have to wait for this release; give it every chance not to.)
                t = threading.Thread(target=a.fs.write, args=(ino, 10, b"A" * 100))
                threads.append(t)
                t.start()
                t.join(0.5)
            real_release(i, segs)

        a.rights.release = release  # type: ignore[method-assign]
        for s in range(5):  # the fifth segment evicts the first ones
            a.fs.write(ino, s * SEGMENT_BYTES, bytes([65 + s]) * 4096)
        assert raced.is_set(), "no eviction happened"
        for t in threads:
            t.join(10)
        assert a.fs.read(ino, 10, 100) == b"A" * 100
        # The coordinator must still know that a holds the write right on segment 0...
        assert _writers(coord, ino, 0) == ["a"], coord.rights.table()
        # ... so that b's write recalls a's dirty data first, and a cannot later
        # write its older data over b's.
        b.fs.write(ino, 0, b"B" * 200)
        b.fs.fsync(ino)
        a.fs.flush_all()
        want = b"B" * 200 + b"A" * 100 + b"A" * (4096 - 300)
        assert b.fs.read(ino, 0, 4096) == want
        assert a.fs.read(ino, 0, 4096) == want
    finally:
        a.close()
        b.close()


def test_truncate_release_does_not_drop_a_right_taken_again_meanwhile(
        coord: Coordinator, cdir: Path) -> None:
    """Same invariant on the node's truncate, which also gives rights back."""
    a = ClusterClient("a", cluster_dir=cdir, flush_delay=60)
    try:
        ino = a.fs.create(1, b"f").ino
        a.fs.write(ino, 0, b"x" * 8192)
        real_release = a.rights.release
        raced = threading.Event()
        threads: list[threading.Thread] = []

        def release(i: int, segs: list[int]) -> None:
            if i == ino and not raced.is_set():
                raced.set()
                t = threading.Thread(target=a.fs.write, args=(ino, 0, b"y" * 100))
                threads.append(t)
                t.start()
                t.join(0.5)
            real_release(i, segs)

        a.rights.release = release  # type: ignore[method-assign]
        a.fs.truncate(ino, 4096)
        assert raced.is_set()
        for t in threads:
            t.join(10)
        table = coord.rights.table()
        cached = [o for o in a.fs._snapshot(ino) if o.mode is not None]
        if cached:  # whatever a still caches, the coordinator must know of
            assert _writers(coord, ino, 0) == ["a"], table
    finally:
        a.close()


def test_rejoin_after_being_dropped_never_writes_back_stale_data(
        coord: Coordinator, cdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Invariant (self-fencing): a node that the coordinator dropped (lease expired)
    must not write back its old dirty data, even in the moment between rejoining
    the same coordinator and dropping its cache, and even when the coordinator
    calls it (a status report) in that moment."""
    caplog.set_level(logging.INFO)
    a = NodeAgent("a", cluster_dir=cdir, flush_delay=60)
    b = ClusterClient("b", cluster_dir=cdir, flush_delay=60)
    a.start()
    try:
        ino = b.fs.create(1, b"f").ino
        b.fs.write(ino, 0, b"o" * 4096)
        b.fs.fsync(ino)
        a.fs.write(ino, 0, b"S" * 1000)  # acknowledged, dirty on a
        # a stops answering: its heartbeats hang until the coordinator drops it.
        gate = threading.Event()
        real_call = a.ref.call

        def call(method: str, args: Any = None, blob: Any = None,
                 timeout: float | None = None) -> Any:
            if method == "heartbeat":
                gate.wait(10)
            return real_call(method, args, blob, timeout)

        a.ref.call = call  # type: ignore[method-assign]
        deadline = time.monotonic() + 10
        while "LOST unwritten data of node a" not in caplog.text:
            assert time.monotonic() < deadline, "the coordinator never dropped node a"
            time.sleep(0.05)
        b.fs.write(ino, 0, b"N" * 2000)  # the newer data, acknowledged and written
        b.fs.fsync(ino)

        real_drop = a.fs.drop_all
        tried: list[str] = []

        def drop_all() -> dict[int, list[int]]:
            # Inside the window: the coordinator calls a (status), and a's flusher runs.
            coord.node_reports()
            try:
                a.fs.flush_all()
                tried.append("written")
            except RemoteError as e:
                tried.append(f"refused: {e}")
            return real_drop()

        a.fs.drop_all = drop_all  # type: ignore[method-assign]
        gate.set()  # a runs again: its heartbeat fails, it rejoins the same coordinator
        deadline = time.monotonic() + 10
        while "cache dropped" not in caplog.text:
            assert time.monotonic() < deadline, "node a did not rejoin"
            time.sleep(0.05)
        assert tried and tried[0].startswith("refused"), tried
        b.fs.recall(ino, [0], None)  # b forgets its copy: read from the disk again
        b.rights.release(ino, [0])
        assert b.fs.read(ino, 0, 4096) == b"N" * 2000 + b"o" * 2096
        assert a.fs.read(ino, 0, 4096) == b"N" * 2000 + b"o" * 2096
    finally:
        a.stop()
        b.close()


def test_short_lived_client_writes_back_for_longer_than_a_lease(coord: Coordinator,
                                                                 cdir: Path) -> None:
    """A client (``sdbackup fs`` without --node) has no heartbeats and no lease at the
    coordinator: it may write back for as long as its connection lasts (a long put)."""
    c = ClusterClient("cli", cluster_dir=cdir, cache_bytes=4 * MiB)
    try:
        ino = c.fs.create(1, b"long").ino
        c.fs.write(ino, 0, b"1" * 5000)
        time.sleep(1.2)  # longer than the coordinator's lease of 1 s
        for s in range(6):  # more than the cache: evictions write back
            c.fs.write(ino, s * SEGMENT_BYTES, bytes([49 + s]) * 5000)
        c.fs.fsync(ino)
        assert c.fs.read(ino, 5 * SEGMENT_BYTES, 5000) == b"6" * 5000
    finally:
        c.close()
