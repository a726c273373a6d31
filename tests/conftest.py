"""Shared fixtures: small throw-away clusters with tiny blocks (STYLE.md, item 11)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from sdbackup.cluster.local import DiskSpec, LocalCluster, init_cluster, open_cluster

MakeCluster = Callable[..., Path]

DEFAULT_DISKS = (1 << 20,)


def make_cluster(base: Path, *, block_size: int = 512,
                 disks: Sequence[int] = DEFAULT_DISKS) -> Path:
    """Create a cluster under ``base`` with one disk image per size; return its directory."""
    base.mkdir(parents=True, exist_ok=True)
    specs = [DiskSpec(f"d{i}", base / f"d{i}.img", size) for i, size in enumerate(disks)]
    init_cluster(base / "cluster", specs, block_size=block_size)
    return base / "cluster"


@pytest.fixture
def tmp_cluster(tmp_path: Path) -> MakeCluster:
    """Factory: ``tmp_cluster(block_size=512, disks=[1 MiB])`` -> a new cluster directory.

    Each call makes a fresh cluster under the test's ``tmp_path``.
    """
    counter = itertools.count()

    def make(*, block_size: int = 512, disks: Sequence[int] = DEFAULT_DISKS) -> Path:
        return make_cluster(tmp_path / f"c{next(counter)}", block_size=block_size,
                            disks=disks)

    return make


@pytest.fixture
def cluster(tmp_cluster: MakeCluster) -> Iterator[LocalCluster]:
    """An opened cluster (512-byte blocks, one 1 MiB disk), closed at teardown."""
    c = open_cluster(tmp_cluster())
    try:
        yield c
    finally:
        if c.lock.fd >= 0:  # the test may have closed it itself
            c.close()
