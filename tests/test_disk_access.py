"""Where a host sees a shared disk, and whether it may use it (issue 9).

- Direct I/O: aligned buffers go straight to the disk, unaligned ones through a
  reused bounce buffer; the data is the same either way.
- Group commit: ``BlockDevice.datasync`` returns only after an ``fdatasync`` that
  started after the call, and concurrent callers share flushes.
- A node opens every disk where ``--disk NAME=PATH`` says and checks its label before
  it joins: a missing, unlabelled or foreign disk is one line naming the disk and the
  path, exit code 2, and the node never appears at the coordinator.
- A single-host disk (its file system refuses O_DIRECT: ramfs here) is recorded as
  such, shown by ``sdbackup info``, usable by a node that sees the very same file,
  and refused to a node that sees another file at its place.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

try:  # tests/ as a plain directory of modules...
    from cluster_helpers import ClusterProcs, read_file_via, sdb, sdb_cmd, write_file_via
except ModuleNotFoundError:  # ...or as a package (with tests/__init__.py)
    from tests.cluster_helpers import (
        ClusterProcs,
        read_file_via,
        sdb,
        sdb_cmd,
        write_file_via,
    )

from sdbackup.blocks.device import BlockDevice, aligned_buffer, create_sparse

MiB = 1 << 20


# -- the device ------------------------------------------------------------------------------

def test_direct_io_aligned_and_unaligned_buffers_read_and_write_the_same(
        tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    create_sparse(path, 4 * MiB)
    with BlockDevice(path, 512, direct=True) as dev:
        assert dev.direct and dev.align in (512, 4096)
        data = os.urandom(64 * 1024)
        dev.write(3, data)  # bytes: not aligned -> bounce buffer
        buf = aligned_buffer(len(data))
        dev.readinto(3, buf)  # aligned: straight from the disk
        assert bytes(buf) == data
        odd = bytearray(len(data) + 1)
        view = memoryview(odd)[1:]  # an address that is certainly not aligned
        dev.readinto(3, view)
        assert bytes(view) == data
        assert dev.read(3, len(data) // 512) == data
        buf[:] = os.urandom(len(data))
        dev.write(1000, buf)  # aligned write
        assert dev.read(1000, len(data) // 512) == bytes(buf)
    # Another descriptor (no O_DIRECT, its own read) sees exactly what was written.
    with open(path, "rb") as f:
        f.seek(3 * 512)
        assert f.read(len(data)) == data


def test_datasync_is_a_group_commit_that_covers_every_caller(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each caller returns only after an fdatasync that *started* after it called, and
    many concurrent callers share few flushes."""
    path = tmp_path / "d.img"
    create_sparse(path, MiB)
    starts: list[float] = []
    real = os.fdatasync

    def slow_fdatasync(fd: int) -> None:
        starts.append(time.monotonic())
        time.sleep(0.02)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
    calls: list[tuple[float, float]] = []
    lock = threading.Lock()
    with BlockDevice(path, 512, direct=True) as dev:
        def worker() -> None:
            for _ in range(10):
                t0 = time.monotonic()
                dev.datasync()
                with lock:
                    calls.append((t0, time.monotonic()))

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(calls) == 80
    assert len(starts) < 60, f"{len(starts)} flushes for 80 calls: no grouping"
    for t0, t1 in calls:
        assert any(t0 <= s and s + 0.02 <= t1 + 1e-3 for s in starts), \
            "a caller returned without a flush that started after its call"


# -- node --disk ---------------------------------------------------------------------------

@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ClusterProcs]:
    c = ClusterProcs(tmp_path / "a")
    try:
        yield c
    finally:
        c.cleanup()


def _node_fails(cp: ClusterProcs, disk_arg: str, *extra: str) -> str:
    r = subprocess.run(sdb_cmd("node", str(cp.dir), "--name", "bad", "--disk", disk_arg,
                               *extra), capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL, cwd=cp.base)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, r.stderr
    assert "bad" not in {n["name"] for n in cp.status()["nodes"]}
    return errors[0]


def test_a_node_given_a_wrong_disk_does_not_join(cp: ClusterProcs, tmp_path: Path) -> None:
    cp.start_coordinator()
    missing = tmp_path / "nowhere.img"
    line = _node_fails(cp, f"d0={missing}")
    assert "disk d0" in line and str(missing) in line and "does not exist" in line
    blank = tmp_path / "blank.img"
    create_sparse(blank, 64 * MiB)
    line = _node_fails(cp, f"d0={blank}")
    assert "disk d0" in line and str(blank) in line and "no sdbackup label" in line
    other = ClusterProcs(tmp_path / "other")  # another cluster's disk
    line = _node_fails(cp, f"d0={other.base / 'd0.img'}")
    assert "belongs to another cluster" in line and str(other.base / "d0.img") in line
    line = _node_fails(cp, f"d9={cp.base / 'd0.img'}")
    assert "no disk 'd9'" in line
    # The right disk at another path (a symlink: another name for it) works.
    link = tmp_path / "link.img"
    link.symlink_to(cp.base / "d0.img")
    cp.start_node("n1", extra=["--disk", f"d0={link}"])
    write_file_via(cp.dir, "n1", "/f", b"x" * 5000)
    assert read_file_via(cp.dir, "n1", "/f") == b"x" * 5000


# -- single-host disks -----------------------------------------------------------------------

@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "ram"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], capture_output=True,
                       text=True)
    assert r.returncode == 0, f"cannot mount a ramfs (needs root): {r.stderr}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_single_host_disk_is_recorded_shown_and_refused_to_other_views(
        ramfs: Path, tmp_path: Path) -> None:
    cp = ClusterProcs(ramfs / "c")
    try:
        cfg = tomllib.loads((cp.dir / "cluster.toml").read_text())
        assert cfg["disk"][0]["direct"] is False
        info = sdb("info", str(cp.dir), check=True).stdout
        assert "single-host" in info
        cp.start_coordinator()
        # A node seeing the very same file on this host works.
        cp.start_node("n1")
        write_file_via(cp.dir, "n1", "/f", b"s" * 3000)
        # A node that sees another file in its place (as another host would, with a
        # copy of the image) is refused before it joins.
        copy = ramfs / "copy.img"
        copy.write_bytes((cp.base / "d0.img").read_bytes())
        line = _node_fails(cp, f"d0={copy}")
        assert "single-host disk" in line
        assert read_file_via(cp.dir, "n1", "/f") == b"s" * 3000
    finally:
        cp.cleanup()
