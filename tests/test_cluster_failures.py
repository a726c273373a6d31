"""Failures of real processes: a node killed with SIGKILL while it writes, coordinator
restarts (SIGTERM and SIGKILL) under load, and a node that stops answering for longer
than its lease (SIGSTOP) and comes back (issue 3, "Membership and failure").
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:  # tests/ as a plain directory of modules...
    from cluster_helpers import (
        RECORD,
        ClusterProcs,
        check_final,
        check_reads,
        embedded_file,
        initial_content,
        parse_record,
        read_file_via,
        read_log,
        sdb,
        start_worker,
        wait_for,
        write_file_via,
        writes_by_slot,
    )
except ModuleNotFoundError:  # ...or as a package (with tests/__init__.py)
    from tests.cluster_helpers import (
        RECORD,
        ClusterProcs,
        check_final,
        check_reads,
        embedded_file,
        initial_content,
        parse_record,
        read_file_via,
        read_log,
        sdb,
        start_worker,
        wait_for,
        write_file_via,
        writes_by_slot,
    )

from sdbackup.cluster.access import coordinator_client, open_fs

MiB = 1 << 20
SEG_RECORDS = MiB // RECORD


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ClusterProcs]:
    c = ClusterProcs(tmp_path)
    try:
        yield c
    finally:
        c.cleanup()


def _fsck_rpc(cp: ClusterProcs) -> list[list[str]]:
    with coordinator_client(cp.dir) as c:
        body, _ = c.call("fsck", {}, timeout=60)
    problems: list[list[str]] = body["problems"]
    return problems


def _lost_lines(cp: ClusterProcs, node: str) -> list[tuple[str, int, int]]:
    pat = re.compile(rf"LOST unwritten data of node {node}: (\S+) bytes (\d+)-(\d+)")
    return [(m[1], int(m[2]), int(m[3])) for m in pat.finditer(cp.coordinator_log())]


def test_kill_9_of_a_node_while_it_writes(cp: ClusterProcs, tmp_path: Path) -> None:
    cp.start_coordinator(lease=2.0)
    cp.start_node("n1", flush_delay=60)
    cp.start_node("n2", flush_delay=0.5)
    synced = os.urandom(MiB + 5000)
    write_file_via(cp.dir, "n1", "/synced", synced, fsync=True)
    unsynced = os.urandom(2 * MiB + 100)
    write_file_via(cp.dir, "n1", "/unsynced", unsynced, fsync=False)
    nslots = SEG_RECORDS + 32
    write_file_via(cp.dir, "n2", "/hot", initial_content(0, nslots), fsync=True)

    # A writer on n1 writes records (fsync every 5th) until n1 dies under it.
    log = tmp_path / "w.jsonl"
    w = start_worker(cp, "writer", {
        "cluster": str(cp.dir), "node": "n1", "role": "writer", "id": 1, "files": ["/hot"],
        "slots": list(range(0, nslots - 4, 3)), "nslots": nslots, "run": 4, "duration": 30,
        "fsync_every": 5, "out": str(log), "max_errors": 0})
    wait_for(lambda: sum(1 for e in read_log(log) if e["op"] == "w") >= 60, 20,
             "the writer to get going")
    cp.nodes["n1"].signal(signal.SIGKILL)
    cp.nodes["n1"].wait(10)
    assert w.wait(30) != 0  # its node is gone
    t_kill = time.monotonic()

    # The coordinator names the lost areas by path and byte range.
    cp.wait_log("LOST unwritten data of node n1", timeout=10)
    lost = _lost_lines(cp, "n1")
    paths = {p for p, _, _ in lost}
    assert "/unsynced" in paths, cp.coordinator_log()[-3000:]
    assert "/synced" not in paths
    ranges = sorted((a, b) for p, a, b in lost if p == "/unsynced")
    assert ranges[0][0] == 0 and ranges[-1][1] >= len(unsynced)
    assert all(b > a and a % MiB == 0 for _, a, b in lost)
    assert not [r for r in cp.cache_table() if r["node"] == "n1"]
    st = cp.status()
    assert "n1" not in {n["name"] for n in st["nodes"]}

    # The rest of the cluster goes on: n2 reads what n1 had fsynced...
    assert read_file_via(cp.dir, "n2", "/synced") == synced
    # ... and every record of /hot is intact and not older than the last fsync.
    entries = read_log(log)
    writes = writes_by_slot(entries)
    hot = read_file_via(cp.dir, "n2", "/hot")
    check_final_after_crash(entries, hot, nslots)
    # n2 writes where n1 had dirty data, and a new node can take n1's name.
    write_file_via(cp.dir, "n2", "/unsynced", b"N" * 4096, fsync=True)
    cp.start_node("n1", flush_delay=0.5)
    got = read_file_via(cp.dir, "n1", "/unsynced")
    assert got[:4096] == b"N" * 4096
    assert _fsck_rpc(cp) == []
    assert time.monotonic() - t_kill < 60

    cp.flush()
    for p in list(cp.nodes.values())[1:]:
        assert p.stop() == 0
    assert cp.coordinator is not None and cp.coordinator.stop() == 0
    r = sdb("fsck", str(cp.dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert embedded_file(cp.dir, "/synced") == synced
    assert writes  # the history was not empty
    cp.assert_no_tracebacks()


def check_final_after_crash(entries: list[dict[str, object]], data: bytes, nslots: int) -> None:
    """Every record intact; every slot at least as new as the last write before the
    last completed fsync (those are durable), and only ever a write that happened."""
    writes = writes_by_slot(entries)  # type: ignore[arg-type]
    syncs = [e for e in entries if e["op"] == "w" and e["sync"]]
    assert syncs, "no fsync completed before the kill"
    barrier = max(float(e["t1"]) for e in syncs)  # type: ignore[arg-type]
    problems = []
    for s in range(nslots):
        w, seq = parse_record(data[s * RECORD : (s + 1) * RECORD], 0, s)
        ws = writes.get((0, s), {})
        durable = [x for x in ws.values() if x.acked and x.t1 <= barrier]
        if (w, seq) == (0, 0):
            if durable:
                problems.append(f"slot {s}: fsynced write seq {max(x.seq for x in durable)} "
                                "lost")
            continue
        if (w, seq) not in ws:
            problems.append(f"slot {s}: seq {seq} was never written")
            continue
        if durable and seq < max(x.seq for x in durable):
            problems.append(f"slot {s}: seq {seq} is older than fsynced seq "
                            f"{max(x.seq for x in durable)}")
    assert not problems, "\n".join(problems[:10])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill9"])
def test_coordinator_restart_under_load(cp: ClusterProcs, tmp_path: Path, sig: int) -> None:
    cp.start_coordinator(lease=2.0)
    cp.start_node("n1", flush_delay=60)
    cp.start_node("n2", flush_delay=60)
    # Metadata and dirty data from before the restart.
    with open_fs(cp.dir, node="n1") as fs:
        d = fs.mkdir(fs.resolve("/").ino, b"dir")
        for i in range(20):
            fs.create(d.ino, f"file{i}".encode())
    dirty1 = os.urandom(MiB + 3000)
    write_file_via(cp.dir, "n1", "/dirty1", dirty1, fsync=False)
    dirty2 = os.urandom(300_000)
    write_file_via(cp.dir, "n2", "/dirty2", dirty2, fsync=False)
    nslots = 2 * SEG_RECORDS
    write_file_via(cp.dir, "n1", "/load", initial_content(0, nslots), fsync=True)
    assert {r["node"] for r in cp.cache_table() if r["dirty"]} == {"n1", "n2"}

    # Load: a writer on each node (same slots) and a reader; errors while the
    # coordinator is away are expected (and such writes count as unacknowledged).
    slots = list(range(0, nslots - 2, 97))
    stop = tmp_path / "stop"
    logs = []
    workers = []
    for k, (node, role) in enumerate([("n1", "writer"), ("n2", "writer"), ("n2", "reader")],
                                     start=1):
        out = tmp_path / f"{role}{k}.jsonl"
        logs.append(out)
        workers.append(start_worker(cp, f"{role}{k}", {
            "cluster": str(cp.dir), "node": node, "role": role, "id": k, "files": ["/load"],
            "slots": slots, "nslots": nslots, "run": 2, "duration": 60, "fsync_every": 6,
            "out": str(out), "max_errors": 10_000, "seed": k, "stop": str(stop)}))
    for path in logs:  # every worker is under way (they start slowly on a busy machine)
        wait_for(lambda path=path: read_log(path), 30, f"{path.name} to begin")
    time.sleep(1.0)
    restarts = []
    for _ in range(2):
        coord = cp.coordinator
        assert coord is not None
        coord.signal(sig)
        rc = coord.wait(15)
        assert rc == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        cp.start_coordinator(lease=2.0)
        restarts.append(time.monotonic())
        for n in ("n1", "n2"):
            n_restarts = len(restarts)
            wait_for(lambda n=n, k=n_restarts: cp.node_log(n).count(
                "reconnected to a restarted coordinator") >= k, 15, f"{n} to reconnect")
        # Both writers go on (after the grace period for reclaims, one lease).
        for path in logs[:2]:
            wait_for(lambda path=path, t=restarts[-1]: any(
                e["op"] == "w" and e["t0"] > t + 0.5 for e in read_log(path)), 20,
                f"{path.name} to write after the restart")
    stop.touch()
    for p in workers:
        rc = p.wait(60)
        assert rc == 0, f"{p.name} exited with {rc}: {p.output()[-3000:]}"

    entries = [e for path in logs for e in read_log(path)]
    writes = writes_by_slot(entries)
    acked = [e for e in entries if e["op"] == "w"]
    # Writes went on after the last restart, on both nodes.
    assert {e["w"] for e in acked if e["t0"] > restarts[-1] + 0.5} == {1, 2}
    check_reads(writes, [e for e in entries if e["op"] == "r"])
    # Nothing is lost: metadata, the dirty data (reclaimed and written), the load.
    with open_fs(cp.dir, node="n2") as fs:
        names = {e.name for e in fs.listdir(fs.resolve("/dir").ino)}
    assert names == {f"file{i}".encode() for i in range(20)}
    assert read_file_via(cp.dir, "n2", "/dirty1") == dirty1
    assert read_file_via(cp.dir, "n1", "/dirty2") == dirty2
    for node in ("n1", "n2"):
        check_final(writes, {0: read_file_via(cp.dir, node, "/load")}, nslots)
    # Writes still work everywhere, and the flush leaves nothing dirty.
    write_file_via(cp.dir, "n1", "/after", b"after" * 1000, fsync=False)
    assert read_file_via(cp.dir, "n2", "/after") == b"after" * 1000
    cp.flush()
    assert not [r for r in cp.cache_table() if r["dirty"]]
    assert _fsck_rpc(cp) == []
    for p in cp.nodes.values():
        assert p.stop() == 0
    assert cp.coordinator is not None and cp.coordinator.stop() == 0
    assert embedded_file(cp.dir, "/dirty1") == dirty1
    assert embedded_file(cp.dir, "/dirty2") == dirty2
    check_final(writes, {0: embedded_file(cp.dir, "/load")}, nslots)
    r = sdb("fsck", str(cp.dir))
    assert r.returncode == 0, r.stdout + r.stderr
    # Failed write-backs while the coordinator was away may log errors; no tracebacks,
    # and nothing was lost, so nothing is logged as lost (a clean stop included).
    cp.assert_no_tracebacks()
    for text in (cp.coordinator_log(), cp.node_log("n1"), cp.node_log("n2")):
        assert "LOST" not in text, [ln for ln in text.splitlines() if "LOST" in ln][:5]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill9"])
def test_restart_a_slow_node_reclaims_before_others_read(cp: ClusterProcs, sig: int) -> None:
    """After a coordinator restart, a node that holds acknowledged dirty data but is slow
    to reconnect (stopped for less than a lease) must get its data in before another
    node reads the area: the read sees the latest acknowledged write."""
    cp.start_coordinator(lease=3.0)
    cp.start_node("n1", flush_delay=60)
    cp.start_node("n2", flush_delay=60)
    old = b"o" * 100_000
    write_file_via(cp.dir, "n1", "/f", old, fsync=True)
    assert read_file_via(cp.dir, "n2", "/f") == old  # n2 caches it (read right)
    new = b"n" * 100_000
    write_file_via(cp.dir, "n1", "/f", new, fsync=False)  # acknowledged, dirty on n1
    assert [r["node"] for r in cp.cache_table() if r["dirty"]] == ["n1"]

    n1 = cp.nodes["n1"]
    n1.signal(signal.SIGSTOP)
    got: list[bytes] = []
    try:
        coord = cp.coordinator
        assert coord is not None
        coord.signal(sig)
        coord.wait(15)
        cp.start_coordinator(lease=3.0)
        wait_for(lambda: "reconnected to a restarted coordinator" in cp.node_log("n2"), 10,
                 "n2 to reconnect")
        # n2 reads while n1 is still away; n1 comes back well within a lease.
        reader = threading.Thread(target=lambda: got.append(read_file_via(cp.dir, "n2", "/f")))
        reader.start()
        time.sleep(0.7)
    finally:
        n1.signal(signal.SIGCONT)
    reader.join(30)
    assert got and got[0] == new, "n2 read data older than n1's acknowledged write"
    cp.flush()
    assert read_file_via(cp.dir, "n1", "/f") == new
    for p in cp.nodes.values():
        assert p.stop() == 0
    assert cp.coordinator is not None and cp.coordinator.stop() == 0
    assert embedded_file(cp.dir, "/f") == new


def test_lease_expiry_of_a_stopped_node_fences_it(cp: ClusterProcs) -> None:
    cp.start_coordinator(lease=2.0)
    cp.start_node("n1", flush_delay=2.5)
    cp.start_node("n2", flush_delay=60)
    base = os.urandom(MiB)
    write_file_via(cp.dir, "n2", "/f", base, fsync=True)
    stale = b"S" * 200_000
    write_file_via(cp.dir, "n1", "/f", stale, fsync=False)  # dirty on n1 only
    n1 = cp.nodes["n1"]
    n1.signal(signal.SIGSTOP)
    t_stop = time.monotonic()
    try:
        # The coordinator drops n1 after its lease and logs what n1 had dirty.
        cp.wait_log("LOST unwritten data of node n1: /f bytes 0-1048576", timeout=10)
        assert time.monotonic() - t_stop >= 2.0
        assert "n1" not in {n["name"] for n in cp.status()["nodes"] if n["state"] == "up"}
        # Another node writes the same area.
        newer = b"N" * 150_000
        write_file_via(cp.dir, "n2", "/f", newer, fsync=True)
        expect = newer + base[150_000:]
        assert read_file_via(cp.dir, "n2", "/f") == expect
        # n1 stays stopped past its own flush delay, so it tries to write back first
        # thing when it runs again: it must not.
        time.sleep(max(0.0, 3.0 - (time.monotonic() - t_stop)))
    finally:
        n1.signal(signal.SIGCONT)
    cp.wait_log("cache dropped", node="n1", timeout=10)
    # Block granularity (512-byte blocks): the last dirty block ends at 200192.
    assert "LOST unwritten data of /f bytes 0-200192 " in cp.node_log("n1")
    time.sleep(1.0)  # give a wrong write-back every chance to happen
    assert read_file_via(cp.dir, "n2", "/f") == expect
    assert read_file_via(cp.dir, "n1", "/f") == expect
    # n1 is a working member again.
    write_file_via(cp.dir, "n1", "/g", b"g" * 5000, fsync=False)
    assert read_file_via(cp.dir, "n2", "/g") == b"g" * 5000
    cp.flush()
    for p in cp.nodes.values():
        assert p.stop() == 0
    assert cp.coordinator is not None and cp.coordinator.stop() == 0
    assert embedded_file(cp.dir, "/f") == expect
    r = sdb("fsck", str(cp.dir))
    assert r.returncode == 0, r.stdout + r.stderr
