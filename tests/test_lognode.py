"""The log manager on a node (``backup --log-node NAME``, seed Fig. 36; issue 17).

Real processes: a coordinator and node agents; writer processes keep overwriting,
truncating, deleting and creating files through the nodes during an online backup
whose copy is slowed by the engine's test hook. The before images of every node's
overwrites go to the log node's control port, not to the coordinator (which refuses
``put_bi`` for such a window: a backup that logged blocks and committed stored them at
the log node).

What is proven:

* with ``--log-node n2`` while writers run on n1 and n2 (so the log node logs its own
  overwrites and n1's), in central, inline and separate modes (the separate log on a
  log medium of the log node, fetched and overlaid), with and without
  ``--copy-nodes``: the images restored from the generation equal T0 block for block,
  and the manifest names the log node;
* the log node killed mid-backup: the backup fails with one line naming it (exit 1),
  nothing is committed, and not one operation of the writers on the other nodes fails;
  every byte they wrote is there; the cluster is not left frozen;
* bad input is one line, exit 2: an unknown node, a node that is not connected, a log
  node with merged mode or with no log mode, a log node with no running coordinator.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:  # tests/ as a plain directory of modules...
    from cluster_helpers import PY, ClusterProcs, read_file_via, wait_for
    from test_backup_never_fails_writers import _WRITER, _writer_result
    from test_dispersed import (
        Cluster,
        _check_restores_t0,
        _make,
        _manifest,
        _seed,
        _stop,
        _writers,
        sdb,
    )
except ModuleNotFoundError:  # ...or as a package (with tests/__init__.py)
    from tests.cluster_helpers import PY, ClusterProcs, read_file_via, wait_for
    from tests.test_backup_never_fails_writers import _WRITER, _writer_result
    from tests.test_dispersed import (
        Cluster,
        _check_restores_t0,
        _make,
        _manifest,
        _seed,
        _stop,
        _writers,
        sdb,
    )


@pytest.fixture
def two(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    yield from _make(tmp_path, monkeypatch, ("n1", "n2"), "0.05")


@pytest.mark.parametrize(("mode", "copiers"), [
    ("central", ()), ("central", ("n1", "n2")), ("inline", ("n1", "n2")),
    ("separate", ()),
])
def test_log_node_restores_t0_with_writers(two: Cluster, mode: str,
                                           copiers: tuple[str, ...]) -> None:
    c = two
    _seed(c)
    stop = c.tmp / "stop"
    ws = _writers(c, stop)  # on n1 and n2: the log node writes too
    time.sleep(1.0)  # the writers are busy and the caches dirty
    args = ["backup", str(c.dir), "--medium", str(c.tmp / "m0"), "--log-mode", mode,
            "--log-node", "n2", "--compress", "none", "--json"]
    log_medium = c.tmp / "lm-n2"
    if copiers:
        args += ["--copy-nodes", ",".join(copiers), "--part-size", "4MiB"]
        for n in copiers:
            args += ["--medium", f"{n}={c.tmp / ('m-' + n)}"]
    if mode == "separate":
        args += ["--log-medium", str(log_medium), "--overlay"]
    r = sdb(*args)
    time.sleep(0.3)
    ops = _stop(ws, stop)
    s = json.loads(r.stdout)
    assert min(ops) > 20, f"writers barely ran: {ops}"
    assert s["log"]["blocks"] > 0, "no write needed a before image: the test proves nothing"
    gen = s["generation"]
    m = _manifest(c.tmp / "m0", gen)
    log_info = m["log"]
    assert isinstance(log_info, dict) and log_info["node"] == "n2", log_info
    assert bool(copiers) == ("parts" in m)
    if mode == "separate":  # written on the log node's log medium, overlaid from there
        assert (log_medium / f"{gen}.bilog").exists()
        assert (log_medium / "sdbackup-logmedium.json").exists()
        assert log_info["overlaid"] is True
    node_log = (c.dir / "logs" / "node-n2.log").read_text()
    assert f"backup {gen}: this node is the log manager" in node_log
    media = ["--medium", str(c.tmp / "m0")]
    for n in copiers:
        media += ["--medium", str(c.tmp / f"m-{n}")]
    _check_restores_t0(c, media, gen)


@pytest.fixture
def procs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ClusterProcs]:
    monkeypatch.setenv("SDBACKUP_TEST_COPY_DELAY", "1.5")  # the coordinator copies slowly
    cp = ClusterProcs(tmp_path, block_size=4096, disk_size="64MiB")
    try:
        yield cp
    finally:
        cp.cleanup()


def test_log_node_killed_aborts_the_backup_never_the_writers(
        procs: ClusterProcs, tmp_path: Path) -> None:
    cp = procs
    medium = tmp_path / "medium"
    cp.start_coordinator(lease=3.0)
    for n in ("n1", "n2", "n3"):
        cp.start_node(n, flush_delay=0.2, cache_size="16MiB")
    stop = tmp_path / "stop"
    writers = []
    for i, (node, prefix) in enumerate((("n1", "a"), ("n2", "b"))):
        ready = tmp_path / f"ready-{node}"
        writers.append(cp.spawn(f"writer-{node}", [PY, "-c", _WRITER, str(cp.dir), node,
                                                   prefix, str(i), str(ready), str(stop)]))
    for w, node in zip(writers, ("n1", "n2"), strict=True):
        wait_for(lambda w=w, node=node: (tmp_path / f"ready-{node}").exists()
                 or not w.alive(), 60, f"{w.name} to seed its files")
        assert w.alive(), w.output()[-3000:]
    time.sleep(1.0)

    backup = cp.spawn("backup", [PY, "-m", "sdbackup.cli.main", "backup", str(cp.dir),
                                 "--medium", str(medium), "--log-mode", "central",
                                 "--log-node", "n3"])
    cp.wait_log("this node is the log manager", 60, node="n3")
    time.sleep(2.0)  # before images flow to n3 from n1 and n2
    assert backup.alive(), backup.output()
    b = cp.status()["backup"]  # the log node of the running backup, and its address
    n3_port = (cp.dir / "nodes" / "n3.addr").read_text().split()[0].rpartition(":")[2]
    assert b["log_node"] == "n3" and b["mode"] == "central", b
    assert b["log_addr"].endswith(f":{n3_port}") and b["failed"] is None, b
    text = sdb("status", str(cp.dir)).stdout
    assert f"backup {b['generation']}: online, log mode central, log kept by log node " \
           f"n3 (before images to {b['log_addr']})" in text, text
    t_kill = time.monotonic()
    cp.nodes["n3"].signal(signal.SIGKILL)
    rc = backup.wait(120)
    t_end = time.monotonic()
    time.sleep(1.0)  # writes go on after the backup too
    stop.touch()
    results = [_writer_result(w) for w in writers]

    for w, res in zip(writers, results, strict=True):
        assert res["errors"] == [], f"{w.name}: {len(res['errors'])} failed: " \
            f"{res['errors'][:5]}"
        times = res["times"]
        assert sum(1 for t in times if t_kill < t < t_end) >= 3, \
            f"{w.name} did not write while the backup was being aborted"
        assert any(t > t_end for t in times), f"{w.name} did not write after the backup"
    out = backup.output()
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert rc == 1, out
    assert len(lines) == 1 and lines[0].startswith("sdbackup: error: "), out
    assert "log node n3" in lines[0] and "not committed" in lines[0], lines[0]
    gens = json.loads(sdb("generations", "--medium", str(medium), "--json").stdout)
    assert gens["generations"] == []
    st = cp.status()
    assert not st["frozen"] and st["losses"] == []
    assert {n["name"]: n["state"] for n in st["nodes"] if n["kind"] == "node"} == \
        {"n1": "up", "n2": "up"}
    for res, other in zip(results, ("n2", "n1"), strict=True):
        for name, (size, digest) in res["files"].items():
            got = read_file_via(cp.dir, other, f"/{name}")
            assert (len(got), hashlib.sha256(got).hexdigest()) == (size, digest), name
    # The cluster backs up again, with the log on a live node.
    r = sdb("backup", str(cp.dir), "--medium", str(medium), "--log-mode", "central",
            "--log-node", "n1", "--json", timeout=180)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["log"]["node"] == "n1"


def test_log_node_bad_input_is_one_line_exit_2(procs: ClusterProcs, tmp_path: Path) -> None:
    cp = procs
    medium = str(tmp_path / "medium")
    base = ["backup", str(cp.dir), "--medium", medium]
    # No coordinator running.
    r = sdb(*base, "--log-mode", "central", "--log-node", "n1", check=False)
    _one_line(r, "needs a running coordinator")
    cp.start_coordinator(lease=3.0)
    cp.start_node("n1", flush_delay=0.2)
    gone = cp.start_node("n2", flush_delay=0.2)
    gone.kill()  # its address file stays: a node of this cluster, not connected
    wait_for(lambda: [n for n in cp.status()["nodes"] if n["name"] == "n2"
                      and n["state"] == "up"] == [], 20, "n2 to be gone")
    _one_line(sdb(*base, "--log-mode", "central", "--log-node", "n9", check=False),
              "--log-node n9: no node n9 in this cluster (connected nodes: n1)")
    _one_line(sdb(*base, "--log-mode", "central", "--log-node", "n2", check=False),
              "log node n2 is not connected")
    _one_line(sdb(*base, "--log-mode", "merged", "--log-node", "n1", check=False),
              "--log-node goes with --log-mode central, inline or separate")
    _one_line(sdb(*base, "--log-node", "n1", check=False),
              "--log-node goes with --log-mode central, inline or separate")
    _one_line(sdb(*base, "--log-mode", "central", "--log-node", "n1,n2", check=False),
              "give one node's name")
    assert not (tmp_path / "medium" / "generations").exists() or \
        list((tmp_path / "medium" / "generations").iterdir()) == []


def _one_line(r: object, needle: str) -> None:
    import subprocess

    assert isinstance(r, subprocess.CompletedProcess)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("sdbackup: error: "), r.stderr
    assert needle in lines[0], lines[0]
