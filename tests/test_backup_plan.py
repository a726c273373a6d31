"""The used-block plan (a.8) equals the union of every file's extents and the disks'
label blocks, whatever the history of writes, truncates and deletes; and the index of a
generation finds exactly the records holding a block range."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_backup_support import make_cluster

from sdbackup.backup.plan import make_plan
from sdbackup.blocks.blockset import BlockSet
from sdbackup.blocks.label import LABEL_BLOCKS
from sdbackup.cluster.backup_source import LocalClusterSource
from sdbackup.cluster.local import open_cluster
from sdbackup.errors import FsError
from sdbackup.media.index import BlockIndex, check_entries, make_entries
from sdbackup.media.record_format import Kind

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 7), st.integers(0, 40_000),
                  st.integers(1, 20_000)),
        st.tuples(st.just("truncate"), st.integers(0, 7), st.integers(0, 30_000),
                  st.just(0)),
        st.tuples(st.just("unlink"), st.integers(0, 7), st.just(0), st.just(0)),
    ),
    min_size=1, max_size=25,
)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops)
def test_plan_is_union_of_extents_and_labels(tmp_path_factory: object, ops: list) -> None:
    base = Path(tmp_path_factory.mktemp("plan"))  # type: ignore[attr-defined]
    # The second disk's block count is not a multiple of 8: its bitmap's last byte has
    # padding bits, which are not blocks.
    cdir = make_cluster(base, disks=(256 << 10, (128 << 10) + 3 * 512))
    with open_cluster(cdir) as c:
        for op, f, a, b in ops:
            name = f"f{f}".encode()
            try:
                if op == "write":
                    try:
                        ino = c.fs.lookup(1, name).ino
                    except FsError:
                        ino = c.fs.create(1, name).ino
                    c.fs.write(ino, a, bytes([f + 1]) * b)
                elif op == "truncate":
                    c.fs.truncate(c.fs.lookup(1, name).ino, a)
                else:
                    c.fs.unlink(1, name)
            except FsError:
                pass  # ENOENT, ENOSPC: the plan must still match
        plan = make_plan(LocalClusterSource(c))
        want = {d.id: BlockSet.from_runs([(0, LABEL_BLOCKS)]) for d in c.config.disks}
        for (ino,) in c.store.query("SELECT id FROM inodes"):
            for e in c.meta.all_extents(int(ino)):
                want[e.disk].add_run(e.dblock, e.length)
    for disk_id, blocks in want.items():
        assert plan.disks[disk_id] == blocks
    assert plan.blocks == sum(len(b) for b in want.values())


@given(runs=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 500), st.integers(1, 30)),
                     max_size=40),
       probe=st.tuples(st.integers(0, 2), st.integers(0, 560), st.integers(1, 60)))
def test_index_find_is_exact(runs: list[tuple[int, int, int]],
                             probe: tuple[int, int, int]) -> None:
    # non-overlapping runs per disk, as a generation's DATA records are
    sets: dict[int, BlockSet] = {}
    for d, s, c in runs:
        sets.setdefault(d, BlockSet()).add_run(s, c)
    rows = [(d, int(s), int(c)) for d, bs in sets.items() for s, c in bs.runs()]
    disk = [r[0] for r in rows]
    entries = make_entries(disk, [r[1] for r in rows], [r[2] for r in rows],
                           np.arange(len(rows)) * 100, np.zeros(len(rows)),
                           np.full(len(rows), int(Kind.DATA)))
    assert check_entries(entries, {0: 600, 1: 600, 2: 600}, 1) == []
    idx = BlockIndex(entries)
    d, b, n = probe
    got = idx.find(d, int(Kind.DATA), b, n)
    want = sorted((s, c) for dd, s, c in rows if dd == d and s < b + n and s + c > b)
    assert [(int(e["start"]), int(e["count"])) for e in got] == want


def test_check_entries_finds_problems() -> None:
    e = make_entries([1, 1], [0, 5], [10, 10], [0, 100], [0, 0], [1, 1])
    assert any("overlap" in p for p in check_entries(e, {1: 100}, 1))
    e = make_entries([1], [95], [10], [0], [0], [1])
    assert any("beyond" in p for p in check_entries(e, {1: 100}, 1))
    e = make_entries([7], [0], [1], [0], [0], [1])
    assert any("unknown disk" in p for p in check_entries(e, {1: 100}, 1))
    e = make_entries([1], [0], [1], [0], [3], [1])
    assert any("stream" in p for p in check_entries(e, {1: 100}, 1))
    e = make_entries([1], [0], [1], [0], [0], [9])
    assert any("kinds" in p for p in check_entries(e, {1: 100}, 1))
