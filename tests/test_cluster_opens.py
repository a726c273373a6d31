"""Open counts are kept per session: a node that goes away with files open has them
closed for it, so an unlinked file it held open is freed (no orphan for fsck)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sdbackup.cluster.coordinator import Coordinator
from sdbackup.cluster.local import DiskSpec, init_cluster
from sdbackup.cluster.node import ClusterClient
from sdbackup.errors import FsError, UsageError
from sdbackup.meta.fsck import check_all


def test_a_vanished_node_closes_its_open_files(tmp_path: Path) -> None:
    init_cluster(tmp_path / "c", [DiskSpec.parse(f"d0={tmp_path}/d0.img:4MiB")],
                 block_size=512)
    coord = Coordinator(tmp_path / "c", lease=5.0)
    coord.start()
    a = ClusterClient("a", cluster_dir=tmp_path / "c")
    b = ClusterClient("b", cluster_dir=tmp_path / "c")
    try:
        ino = a.fs.create(1, b"held").ino
        a.fs.write(ino, 0, b"x" * 5000)
        a.fs.open(ino)
        a.fs.flush_all()
        b.fs.unlink(1, b"held")  # a still has it open: the data stays
        assert a.fs.read(ino, 0, 4) == b"xxxx"
        with pytest.raises(UsageError, match="not open"):
            b.fs.release(ino)  # b never opened it: refused, nothing changes
        assert coord.meta.getattr(ino).nlink == 0
        a.ref.client.close()  # a vanishes without closing the file
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                coord.meta.getattr(ino)
            except FsError:
                break
            time.sleep(0.05)
        with pytest.raises(FsError):
            coord.meta.getattr(ino)
        with coord.store.lock:
            assert check_all(coord.store) == []
        assert [r for r in coord.meta.used_runs(1) if r != (0, 1)] == []
    finally:
        a.close()  # stops a's heartbeat thread, which would log in later tests
        b.close()
        coord.stop()
