"""The before-image machinery of an online backup, end to end over real TCP, without
the copy engine: freeze, arm the window, let two nodes overwrite, free and reuse
blocks, then check that the copied disk overlaid with the gathered log is the T0 image.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdbackup.backup.bilog import apply_log
from sdbackup.blocks.blockset import BlockSet
from sdbackup.cluster.coordinator import Coordinator
from sdbackup.cluster.local import DiskSpec, init_cluster
from sdbackup.cluster.node import ClusterClient
from sdbackup.fs.filesystem import FileSystem

BS = 512


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Coordinator, ClusterClient, ClusterClient]]:
    init_cluster(tmp_path / "c", [DiskSpec.parse(f"d0={tmp_path}/d0.img:4MiB"),
                                  DiskSpec.parse(f"d1={tmp_path}/d1.img:4MiB")],
                 block_size=BS)
    coord = Coordinator(tmp_path / "c", lease=5.0)
    coord.start()
    a = ClusterClient("a", cluster_dir=tmp_path / "c", cache_bytes=4 << 20)
    b = ClusterClient("b", cluster_dir=tmp_path / "c", cache_bytes=4 << 20)
    try:
        yield coord, a, b
    finally:
        a.close()
        b.close()
        coord.stop()


def _file(fs: FileSystem, name: str, data: bytes) -> int:
    ino = fs.create(1, name.encode()).ino
    fs.write(ino, 0, data)
    fs.fsync(ino)
    return ino


def _image(coord: Coordinator, disk: int) -> bytes:
    dev = coord.disks.device(disk)
    return dev.read(0, dev.nblocks)


@pytest.mark.parametrize("mode", ["merged", "central", "inline", "separate"])
def test_copy_plus_log_is_t0(cluster: tuple[Coordinator, ClusterClient, ClusterClient],
                             tmp_path: Path, mode: str) -> None:
    coord, a, b = cluster
    fa = _file(a.fs, "f", bytes(range(256)) * 40)  # ~10 KiB, written through node a
    _file(b.fs, "g", b"G" * 20000)
    ino_h = _file(a.fs, "h", b"H" * 3000)
    a.fs.write(fa, 100, b"dirty-at-T0")  # acknowledged, still in a's cache at T0
    # -- T0: freeze, take the block set and the T0 image, arm, thaw
    coord.rights.freeze()
    try:
        blocks = {d: BlockSet.from_bitmap(bm.committed)
                  for d, bm in coord.meta.bitmaps.items()}
        for d, bm in coord.meta.bitmaps.items():
            blocks[d] = blocks[d] & BlockSet.from_runs([(0, bm.nblocks)])
        t0 = {d: _image(coord, d) for d in blocks}
        work = tmp_path / "work"
        work.mkdir()
        coord.begin_window("gen1", mode, blocks, tmp_path / "central.log", work)
    finally:
        coord.rights.thaw()
    assert b"dirty-at-T0" in t0[1] + t0[2]
    # -- after T0: both nodes overwrite, free and reuse blocks, truncate
    errors: list[BaseException] = []

    def writer(fs: FileSystem, tag: bytes) -> None:
        try:
            for i in range(20):
                fs.write(fa, (i * 700) % 9000, tag * 300)
                fs.fsync(fa)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=writer, args=(n.fs, t)) for n, t in ((a, b"A"), (b, b"B"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    b.fs.unlink(1, b"g")  # frees blocks of the backup set ...
    _file(b.fs, "k", b"K" * 30000)  # ... which a new file reuses
    a.fs.truncate(ino_h, 1000)  # the coordinator zeroes the tail of a block in the set
    stats = coord.end_window(tmp_path / "merged.log", work)
    assert stats["failed"] is None
    log_path = tmp_path / ("merged.log" if mode == "merged" else "central.log")
    # -- the copy happens now, after all the writes (the worst case)
    for d in blocks:
        now = _image(coord, d)
        assert now != t0[d] or d == 2  # disk 1 certainly changed
        img = tmp_path / f"copy-{d}.img"
        img.write_bytes(now)
        apply_log(log_path, img, disk_id=d)  # the before images over the late copy
        got = img.read_bytes()
        for s, n in blocks[d].runs():
            assert got[s * BS : (s + n) * BS] == t0[d][s * BS : (s + n) * BS], \
                f"disk {d} blocks {s}+{n} differ from T0"
