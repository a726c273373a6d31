"""Fencing: a node declared failed while it is alive and in the middle of a write-back.

A node is SIGSTOPped (by itself, at a named point of its write-back, so the stop
lands exactly there) after the coordinator mapped its write and before it wrote a
byte. Another node then writes the same range: its grant must wait until the stopped
node's lease has certainly run out (the recall times out, the node is fenced, then a
lease plus a margin pass). When the stopped node runs again, its write-back must be
refused (its lease ran out; its calls are fenced), nothing it had must land on the
disk after the other node's write, and what it lost must be logged by path and byte
range. fsck is clean afterwards, and the node works again as a new session.

Two cases: the stopped write overwrites blocks in place (another node now owns
them), and the stopped write fills a hole with blocks reserved for it (freed at the
fence and, here, given to another file before the node runs again).
"""

from __future__ import annotations

import signal
import time
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

LEASE = 2.0
MiB = 1 << 20


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ClusterProcs]:
    c = ClusterProcs(tmp_path)
    try:
        yield c
    finally:
        c.cleanup()


def _stopped(pid: int) -> bool:
    """The process is stopped (state T in /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


@pytest.mark.parametrize("case", ["overwrite", "new-blocks"])
def test_a_stopped_node_is_fenced_and_never_writes_after_the_next_writer(
        cp: ClusterProcs, case: str) -> None:
    cp.start_coordinator(lease=LEASE)
    # n1 stops itself once, right after its first write-back was mapped.
    n1 = cp.start_node("n1", flush_delay=0.5,
                       prefix=["env", "SDBACKUP_TEST_NODE_STOP_AT=mapped"])
    cp.start_node("n2", flush_delay=60)
    base = bytes(range(256)) * (MiB // 256)
    write_file_via(cp.dir, "n2", "/f", base, fsync=True)
    if case == "overwrite":
        stale, at = b"S" * 200_000, 0  # in place: blocks that n2 will own
    else:
        stale, at = b"S" * 300_000, len(base)  # past the end: blocks reserved for n1
    from sdbackup.cluster.access import open_fs

    with open_fs(cp.dir, node="n1") as fs:
        fs.write(fs.resolve("/f").ino, at, stale)  # acknowledged, dirty on n1 only
    wait_for(lambda: _stopped(n1.pid), 15, "n1 to stop inside its write-back")
    t_stop = time.monotonic()
    try:
        newer = b"N" * 150_000
        at_newer = 0 if case == "overwrite" else len(base)
        with open_fs(cp.dir, node="n2") as fs:
            ino = fs.resolve("/f").ino
            fs.write(ino, at_newer, newer)
            fs.fsync(ino)
        # The grant waited for the recall to time out, then for the lease to run out:
        # n1's own lease ends at most 0.9 of a lease after it stopped (it renewed last
        # before it stopped), and nothing may be granted before that.
        assert time.monotonic() - t_stop >= 0.9 * LEASE
        if case == "new-blocks":
            # The blocks reserved for n1 were freed at the fence: another file may get
            # them now, and n1 must never write into it.
            other = b"O" * MiB
            write_file_via(cp.dir, "n2", "/other", other, fsync=True)
        cp.wait_log("fenced", timeout=5)
        time.sleep(0.5)
    finally:
        n1.signal(signal.SIGCONT)
    cp.wait_log("cache dropped", node="n1", timeout=15)
    log_n1 = cp.node_log("n1")
    assert "not writing back: this node's lease may have expired" in log_n1 \
        or "was fenced" in log_n1, log_n1[-3000:]
    # The loss is logged by path and byte range: whole 512-byte blocks, up to the size
    # n1 had given the file.
    lo, hi = at, at + len(stale) + (-len(stale)) % 512
    if case == "new-blocks":
        hi = at + len(stale)
    assert f"LOST unwritten data of /f bytes {lo}-{hi} " in log_n1, log_n1[-3000:]
    time.sleep(1.0)  # every chance for a wrong write to land
    expect = newer + base[len(newer):] if case == "overwrite" else base + newer
    assert read_file_via(cp.dir, "n2", "/f") == expect
    assert read_file_via(cp.dir, "n1", "/f") == expect
    if case == "new-blocks":
        assert read_file_via(cp.dir, "n1", "/other") == b"O" * MiB
    # n1 is a working member again (a new session).
    write_file_via(cp.dir, "n1", "/g", b"g" * 5000, fsync=True)
    assert read_file_via(cp.dir, "n2", "/g") == b"g" * 5000
    cp.flush()
    for p in cp.nodes.values():
        assert p.stop() == 0
    assert cp.coordinator is not None and cp.coordinator.stop() == 0
    assert embedded_file(cp.dir, "/f") == expect
    if case == "new-blocks":
        assert embedded_file(cp.dir, "/other") == b"O" * MiB
    r = sdb("fsck", str(cp.dir))
    assert r.returncode == 0, r.stdout + r.stderr
    cp.assert_no_tracebacks()
