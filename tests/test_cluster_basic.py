"""Two node agents and a coordinator as real processes on 127.0.0.1 (issue 3, "Done when").

What one node writes (fsynced or only acknowledged into its write-back cache) the
other reads; ``sdbackup cache ls --json`` shows the dirty areas per node and
``sdbackup flush`` empties them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

try:  # tests/ as a plain directory of modules...
    from cluster_helpers import (
        ClusterProcs,
        embedded_file,
        read_file_via,
        sdb,
        wait_for,
        write_file_via,
    )
except ModuleNotFoundError:  # ...or as a package (with tests/__init__.py)
    from tests.cluster_helpers import (
        ClusterProcs,
        embedded_file,
        read_file_via,
        sdb,
        wait_for,
        write_file_via,
    )

from sdbackup.cluster.access import open_fs

MiB = 1 << 20


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ClusterProcs]:
    c = ClusterProcs(tmp_path)
    try:
        yield c
    finally:
        c.cleanup()


def _dirty(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return [r for r in rows if r["dirty"]]


def test_two_nodes_read_each_others_writes_cache_table_and_flush(cp: ClusterProcs,
                                                                 tmp_path: Path) -> None:
    cp.start_coordinator(lease=3.0)
    # A long flush delay: nothing is written back unless someone asks.
    cp.start_node("n1", flush_delay=60)
    cp.start_node("n2", flush_delay=60)

    # 1. Written through n1 and left dirty there (a program that has not closed the
    # file: `fs put` writes each file back when done, as cp's close does), read back
    # through the CLI on n2.
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(3 * MiB + 12345))
    write_file_via(cp.dir, "n1", "/f.bin", src.read_bytes(), fsync=False)
    rows = cp.cache_table()
    dirty = _dirty(rows)
    assert dirty, f"put through n1 left nothing dirty in the cache table: {rows}"
    assert {r["node"] for r in dirty} == {"n1"}
    assert {r["path"] for r in dirty} == {"/f.bin"}
    covered = sorted((int(r["offset"]), int(r["offset"]) + int(r["size"])) for r in dirty)
    assert covered[0][0] == 0 and covered[-1][1] >= src.stat().st_size
    text = sdb("cache", "ls", str(cp.dir), check=True).stdout
    assert "n1" in text and "/f.bin" in text and "yes" in text

    got = tmp_path / "g.bin"
    sdb("fs", "--node", "n2", str(cp.dir), "get", "-q", "/f.bin", str(got), check=True)
    assert got.read_bytes() == src.read_bytes()
    # n2's read recalled n1's write right: n1 wrote back and keeps a read right.
    assert not _dirty(cp.cache_table())

    # 2. In Python, both directions, with and without fsync, several files.
    a = os.urandom(MiB + 777)
    b = os.urandom(2 * MiB)
    c = os.urandom(5000)
    write_file_via(cp.dir, "n2", "/a", a, fsync=False)
    write_file_via(cp.dir, "n1", "/b", b, fsync=True)
    write_file_via(cp.dir, "n1", "/c", c, fsync=False)
    rows = cp.cache_table()
    by_node = {(r["node"], r["path"]) for r in _dirty(rows)}
    assert by_node == {("n2", "/a"), ("n1", "/c")}, rows
    assert read_file_via(cp.dir, "n1", "/a") == a
    assert read_file_via(cp.dir, "n2", "/b") == b
    assert read_file_via(cp.dir, "n2", "/c") == c

    # 3. Overwrite in the middle from the other node; both see the new bytes.
    with open_fs(cp.dir, node="n2") as fs:
        ino = fs.resolve("/b").ino
        fs.write(ino, MiB - 100, b"X" * 300)
    want = b[: MiB - 100] + b"X" * 300 + b[MiB + 200 :]
    assert read_file_via(cp.dir, "n1", "/b") == want
    assert read_file_via(cp.dir, "n2", "/b") == want

    # 4. Dirty areas on both nodes at once; flush empties them.
    with open_fs(cp.dir, node="n1") as fs:
        fs.write(fs.resolve("/a").ino, 0, b"1" * 1000)
    with open_fs(cp.dir, node="n2") as fs:
        fs.write(fs.resolve("/c").ino, 4000, b"2" * 2000)
    nodes = {r["node"] for r in _dirty(cp.cache_table())}
    assert nodes == {"n1", "n2"}
    st = cp.status()
    dirty_bytes = {n["name"]: n.get("dirty_bytes", 0) for n in st["nodes"]}
    assert dirty_bytes["n1"] > 0 and dirty_bytes["n2"] > 0
    r = cp.flush()
    assert "no dirty areas left" in r.stdout
    rows = cp.cache_table()
    assert rows, "flush must not drop the cached areas, only write them back"
    assert not _dirty(rows), rows
    st = cp.status()
    assert all(n.get("dirty_bytes", 0) == 0 for n in st["nodes"] if n["kind"] == "node")
    assert {n["name"] for n in st["nodes"] if n["kind"] == "node"} == {"n1", "n2"}

    # 5. Stop everything cleanly; the disk (read with no coordinator) has it all.
    for n in ("n1", "n2"):
        assert cp.nodes[n].stop() == 0
    assert cp.coordinator is not None and cp.coordinator.stop() == 0
    assert embedded_file(cp.dir, "/a") == b"1" * 1000 + a[1000:]
    assert embedded_file(cp.dir, "/b") == want
    assert embedded_file(cp.dir, "/c") == c[:4000] + b"2" * 2000
    assert embedded_file(cp.dir, "/f.bin") == src.read_bytes()
    fsck = sdb("fsck", str(cp.dir))
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cp.assert_no_tracebacks()


def test_dirty_data_is_written_on_node_stop_and_after_the_flush_delay(cp: ClusterProcs) -> None:
    cp.start_coordinator(lease=3.0)
    cp.start_node("n1", flush_delay=60)
    cp.start_node("n2", flush_delay=0.5)
    data1, data2 = os.urandom(300_000), os.urandom(200_000)
    write_file_via(cp.dir, "n1", "/one", data1, fsync=False)
    write_file_via(cp.dir, "n2", "/two", data2, fsync=False)
    # n2 writes back by itself after its flush delay; n1 keeps its data dirty.
    wait_for(lambda: {r["node"] for r in _dirty(cp.cache_table())} == {"n1"}, 10,
             "n2's delayed write-back")
    # n1 writes its dirty data back when it is stopped.
    assert cp.nodes["n1"].stop() == 0
    assert not _dirty(cp.cache_table())
    assert read_file_via(cp.dir, "n2", "/one") == data1
    assert cp.coordinator is not None and cp.coordinator.stop() == 0
    assert embedded_file(cp.dir, "/one") == data1
    assert embedded_file(cp.dir, "/two") == data2
    cp.assert_no_tracebacks()
