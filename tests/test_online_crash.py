"""Crashes during an online backup (issue 6), with real processes killed at chosen points.

- A node killed right after it logged a before image (before its overwrite reached the
  disk), and one killed right after the overwrite: in ``central`` mode the logs are at
  the coordinator already, so the backup commits and restores exactly T0; in ``merged``
  mode the node took its own log with it, so the generation is marked failed and never
  committed.
- The coordinator killed in the middle of the copy: no committed generation; after a
  restart, ``gc`` removes the remains and the next backup works.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_online_backup import (
    Cluster,
    _check_restores_t0,
    _seed,
    sdb,
)

from sdbackup.cluster.launch import start_coordinator, start_node

WRITER = r"""
import os, random, sys
from sdbackup.cluster.access import open_fs
cdir, node, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
try:
    with open_fs(cdir, node=node) as fs:
        for i in range(100000):
            a = fs.resolve(f"/f{rng.randrange(12)}")
            fs.write(a.ino, rng.randrange(0, 3 << 20), rng.randbytes(rng.choice([4096, 65536])))
            if i % 5 == 0:
                fs.fsync(a.ino)
except Exception as e:  # the node was killed under us: expected here
    print("writer stopped:", e, file=sys.stderr)
"""


def _start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: str | None) -> Cluster:
    cdir = tmp_path / "c"
    sdb("init", str(cdir), "--block-size", "1024",
        "--disk", f"d0={tmp_path}/d0.img:48MiB", "--disk", f"d1={tmp_path}/d1.img:48MiB")
    monkeypatch.setenv("SDBACKUP_TEST_T0_IMAGE_DIR", str(tmp_path / "t0"))
    monkeypatch.setenv("SDBACKUP_TEST_COPY_DELAY", "0.25")
    coord = start_coordinator(cdir, lease=3.0)
    n1 = start_node(cdir, "n1", cache_size="8MiB", flush_delay=0.2)
    c = Cluster(cdir, coord, [n1], tmp_path / "t0")
    _seed(c)
    if crash_at:
        monkeypatch.setenv("SDBACKUP_TEST_NODE_CRASH_AT", crash_at)
    c.nodes.append(start_node(cdir, "n2", cache_size="8MiB", flush_delay=0.2))
    monkeypatch.delenv("SDBACKUP_TEST_NODE_CRASH_AT", raising=False)
    return c


def _stop_all(c: Cluster) -> None:
    for p in c.nodes:
        p.kill()
    c.coord.stop()


@pytest.mark.parametrize("mode,crash_at", [("central", "after-bi-log"),
                                           ("central", "after-bi-write"),
                                           ("inline", "after-bi-log")])
def test_node_killed_around_its_overwrite_central_modes_commit_t0(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, crash_at: str) -> None:
    c = _start(tmp_path, monkeypatch, crash_at)
    try:
        w = subprocess.Popen([sys.executable, "-c", WRITER, str(c.dir), "n2", "1"],
                             stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        r = sdb("backup", str(c.dir), "--medium", str(tmp_path / "m"), "--log-mode", mode,
                "--compress", "none", "--json")
        w.wait(timeout=60)
        c.nodes[1].p.wait(timeout=30)
        assert c.nodes[1].p.returncode == -9, "the node did not die at the crash point"
        s = json.loads(r.stdout)
        _check_restores_t0(c, tmp_path / "m", s["generation"])
    finally:
        _stop_all(c)


def test_node_killed_with_its_merged_log_fails_the_generation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = _start(tmp_path, monkeypatch, "after-bi-log")
    try:
        w = subprocess.Popen([sys.executable, "-c", WRITER, str(c.dir), "n2", "1"],
                             stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        r = sdb("backup", str(c.dir), "--medium", str(tmp_path / "m"), "--log-mode",
                "merged", "--compress", "none", check=False)
        w.wait(timeout=60)
        c.nodes[1].p.wait(timeout=30)
        assert c.nodes[1].p.returncode == -9
        assert r.returncode == 1, r.stderr
        assert "failed" in r.stderr and "n2" in r.stderr
        g = sdb("generations", "--medium", str(tmp_path / "m"), "--json")
        assert json.loads(g.stdout)["generations"] == []
        assert "failed generation" in sdb("generations", "--medium",
                                          str(tmp_path / "m")).stderr
        sdb("gc", "--medium", str(tmp_path / "m"))
        assert not any((tmp_path / "m" / "generations").iterdir())
        # The cluster goes on: the next backup (n2 is gone) commits.
        r2 = sdb("backup", str(c.dir), "--medium", str(tmp_path / "m"), "--log-mode",
                 "merged", "--compress", "none", "--json")
        _check_restores_t0(c, tmp_path / "m", json.loads(r2.stdout)["generation"])
    finally:
        _stop_all(c)


def test_coordinator_killed_mid_copy_leaves_no_committed_generation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDBACKUP_TEST_CRASH_AT", "mid-copy")
    c = _start(tmp_path, monkeypatch, None)
    monkeypatch.delenv("SDBACKUP_TEST_CRASH_AT")
    try:
        w = subprocess.Popen([sys.executable, "-c", WRITER, str(c.dir), "n2", "1"],
                             stderr=subprocess.PIPE, text=True)
        r = sdb("backup", str(c.dir), "--medium", str(tmp_path / "m"), "--log-mode",
                "central", check=False)
        assert r.returncode != 0
        c.coord.p.wait(timeout=30)
        assert c.coord.p.returncode == -9
        g = json.loads(sdb("generations", "--medium", str(tmp_path / "m"), "--json").stdout)
        assert g["generations"] == [] and g["unfinished"] == 1
        # Restart the coordinator: nodes come back by themselves; gc; a backup commits.
        c.coord = start_coordinator(c.dir, lease=3.0)
        sdb("gc", "--medium", str(tmp_path / "m"))
        r2 = sdb("backup", str(c.dir), "--medium", str(tmp_path / "m"), "--log-mode",
                 "central", "--compress", "none", "--json")
        w.kill()
        _check_restores_t0(c, tmp_path / "m", json.loads(r2.stdout)["generation"])
    finally:
        _stop_all(c)
