"""DiskBitmap and allocate() against a model of two Python sets (committed, reserved).

Model: ``C`` = committed blocks, ``R`` = reserved-only blocks (kept disjoint from C),
in use = C | R. reserve adds to R what is not committed; unreserve removes from R;
commit moves to C; free removes from both (it clears ``inuse`` too). Only C is ever
persisted; a reload re-reads C from the store and keeps R.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from sdbackup.meta import alloc as alloc_mod
from sdbackup.meta.alloc import CHUNK_BITS, DiskBitmap, allocate
from sdbackup.meta.store import MetaStore

# Sizes around byte and chunk edges: a partial last byte, whole bytes, two chunks.
SIZES = [16, 61, 64, 1000, CHUNK_BITS + 77]


def bits_set(bits: np.ndarray, nblocks: int) -> set[int]:
    return set(np.flatnonzero(np.unpackbits(bits, bitorder="little")[:nblocks]).tolist())


def model_next_free_run(inuse: set[int], n: int, pos: int, limit: int) -> tuple[int, int] | None:
    start = max(pos, 0)
    while start < n and start in inuse:
        start += 1
    if start >= n:
        return None
    end = start
    while end < n and end < start + limit and end not in inuse:
        end += 1
    return start, end - start


def cyclic_free(inuse: set[int], n: int, goal: int, count: int) -> list[int]:
    """The first ``count`` free blocks in the order goal, goal+1, ..., n-1, 0, ..., goal-1."""
    out: list[int] = []
    goal = min(goal, n)
    for b in [*range(goal, n), *range(goal)]:
        if len(out) == count:
            break
        if b not in inuse:
            out.append(b)
    return out


def new_store(tmp: Path) -> MetaStore:
    return MetaStore(tmp / "meta.db", create=True)


class BitmapMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="sdb-alloc-"))
        self.store = new_store(self.tmp)
        self.n = 0
        self.bm: DiskBitmap
        self.C: set[int] = set()
        self.R: set[int] = set()
        self.Q: set[int] = set()  # freed, held until the freeing transaction is durable
        self.saved: set[int] = set()

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    @initialize(n=st.sampled_from(SIZES))
    def setup(self, n: int) -> None:
        self.n = n
        self.bm = DiskBitmap(1, n)

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        n = self.n
        edges = [0, 7, 8, n - 9, n - 1, CHUNK_BITS - 5]
        start = data.draw(st.one_of(
            st.integers(0, n - 1),
            st.sampled_from([e for e in edges if 0 <= e < n]),
        ), label="start")
        count = data.draw(st.one_of(st.integers(1, min(40, n - start)),
                                    st.integers(1, n - start)), label="count")
        return start, count

    # -- state changes ---------------------------------------------------------------
    @rule(data=st.data())
    def reserve(self, data: st.DataObject) -> None:
        s, c = self._range(data)
        self.bm.reserve(s, c)
        self.R |= set(range(s, s + c)) - self.C - self.Q

    @rule(data=st.data())
    def unreserve(self, data: st.DataObject) -> None:
        s, c = self._range(data)
        self.bm.unreserve(s, c)
        self.R -= set(range(s, s + c))

    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        s, c = self._range(data)
        self.bm.commit(s, c)
        self.C |= set(range(s, s + c))
        self.R -= self.C
        self.Q -= self.C

    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        """Freed committed blocks are held (not allocatable) until released."""
        s, c = self._range(data)
        self.bm.free(s, c)
        self.Q |= set(range(s, s + c)) & self.C
        self.C -= set(range(s, s + c))

    @rule()
    def release(self) -> None:
        """The freeing transactions became durable: held blocks are free again."""
        self.bm.release(self.bm.take_quarantine())
        self.Q.clear()

    @rule(data=st.data())
    def commit_reserved_run(self, data: st.DataObject) -> None:
        """The service's path: a reserved run is committed as a whole."""
        if not self.R:
            return
        b = data.draw(st.sampled_from(sorted(self.R)), label="reserved block")
        s = b
        while s - 1 in self.R:
            s -= 1
        e = b
        while e + 1 in self.R:
            e += 1
        self.bm.commit(s, e - s + 1)
        self.C |= set(range(s, e + 1))
        self.R -= self.C
        self.Q -= self.C

    @rule(count=st.integers(1, 300), goal=st.integers(0, CHUNK_BITS + 100))
    def allocate_blocks(self, count: int, goal: int) -> None:
        n = self.n
        inuse = self.C | self.R | self.Q
        free_before = n - len(inuse)
        runs = allocate(self.bm, count, goal)
        got = [b for s, c in runs for b in range(s, s + c)]
        assert all(c > 0 for _, c in runs)
        assert len(got) == len(set(got)), f"runs overlap: {runs}"
        assert not set(got) & inuse, "allocate handed out blocks in use"
        assert all(0 <= b < n for b in got)
        # Exactly what was asked, or everything that was left when that was less.
        assert len(got) == min(count, free_before)
        # Next fit from the goal: the first free blocks in cyclic order.
        assert got == cyclic_free(inuse, n, goal, count)
        if goal < n and goal not in inuse:
            assert runs[0][0] == goal, "goal was free but not used"
            run = model_next_free_run(inuse, n, goal, count)
            if run is not None and run[1] == count:
                assert runs == [(goal, count)], "a free run at the goal was split"
        self.R |= set(got)

    # -- persistence ---------------------------------------------------------------------
    @rule()
    def save(self) -> None:
        with self.store.transaction():
            self.bm.save_dirty(self.store)
        assert not self.bm.dirty_chunks
        self.saved = set(self.C)

    @rule()
    def load_fresh(self) -> None:
        """A new bitmap loaded from the store sees the saved committed bits, no reservations."""
        fresh = DiskBitmap(1, self.n)
        fresh.load(self.store)
        assert bits_set(fresh.committed, self.n) == self.saved
        assert bits_set(fresh.inuse, self.n) == self.saved
        assert fresh.used_blocks() == len(self.saved)

    @rule()
    def reload(self) -> None:
        """Like a rolled-back transaction: committed reverts to the store, R is kept."""
        self.bm.reload(self.store)
        self.C = set(self.saved)
        self.R -= self.C
        self.Q -= self.C

    # -- checks --------------------------------------------------------------------------
    @rule(pos=st.integers(0, CHUNK_BITS + 100), limit=st.integers(1, 500))
    def next_free_run(self, pos: int, limit: int) -> None:
        inuse = self.C | self.R | self.Q
        assert self.bm.next_free_run(pos, limit) == model_next_free_run(
            inuse, self.n, pos, limit)

    @rule(data=st.data())
    def is_free(self, data: st.DataObject) -> None:
        s, c = self._range(data)
        want = not (set(range(s, s + c)) & (self.C | self.R | self.Q))
        assert self.bm.is_free(s, c) == want
        assert not self.bm.is_free(self.n - c + 1, c)  # runs past the end are never free

    @precondition(lambda self: self.n > 0)
    @invariant()
    def matches_model(self) -> None:
        n = self.n
        assert bits_set(self.bm.committed, n) == self.C
        assert bits_set(self.bm.inuse, n) == self.C | self.R | self.Q
        assert self.bm.used_blocks() == len(self.C)
        # Held blocks count as free space (they are free, only not yet durably so).
        assert self.bm.free_blocks() == n - len(self.C | self.R)
        # Padding bits past the end of the disk stay "used" in both bitmaps.
        if n & 7:
            pad = (0xFF << (n & 7)) & 0xFF
            assert self.bm.committed[-1] & pad == pad
            assert self.bm.inuse[-1] & pad == pad


BitmapMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBitmap = BitmapMachine.TestCase


@given(n=st.sampled_from(SIZES), used=st.lists(st.tuples(st.integers(0, 2000),
                                                          st.integers(1, 50)), max_size=12),
       count=st.integers(1, 400), goal=st.integers(0, 2000))
@settings(max_examples=200, deadline=None)
def test_allocate_from_free_runs(n: int, used: list[tuple[int, int]], count: int,
                                 goal: int) -> None:
    bm = DiskBitmap(1, n)
    inuse: set[int] = set()
    for s, c in used:
        if s < n:
            c = min(c, n - s)
            bm.commit(s, c)
            inuse |= set(range(s, s + c))
    free_before = bm.free_blocks()
    runs = allocate(bm, count, goal)
    got = [b for s, c in runs for b in range(s, s + c)]
    assert len(got) == min(count, free_before)
    assert got == cyclic_free(inuse, n, goal, count)
    # Returned runs are maximal: merging left no two adjacent runs.
    assert all(a[0] + a[1] != b[0] for a, b in itertools.pairwise(runs))
    assert bm.free_blocks() == free_before - len(got)
    for s, c in runs:
        bm.unreserve(s, c)
    assert bm.free_blocks() == free_before


def test_search_crosses_windows() -> None:
    """The search steps a window of the bitmap at a time; the end is still found."""
    n = alloc_mod._WINDOW * 8 * 2 + 13
    bm = DiskBitmap(1, n)
    bm.commit(0, n - 5)
    assert bm.next_free_run(0, 100) == (n - 5, 5)
    assert bm.next_free_run(n - 2, 100) == (n - 2, 2)
    assert bm.next_free_run(n, 100) is None
    assert allocate(bm, 10, 0) == [(n - 5, 5)]
    assert bm.free_blocks() == 0
    assert allocate(bm, 1, 12345) == []


def test_reload_keeps_reservations(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    try:
        bm = DiskBitmap(3, 5000)
        bm.commit(0, 10)
        with store.transaction():
            bm.save_dirty(store)
        runs = allocate(bm, 20, 0)
        assert runs == [(10, 20)]
        bm.commit(100, 5)  # never saved: a failed transaction
        bm.reload(store)
        assert bm.used_blocks() == 10
        assert not bm.is_free(10, 1) and not bm.is_free(29, 1)
        assert bm.is_free(100, 5)
        assert allocate(bm, 5, 0) == [(30, 5)]
        # A fresh load (a restart) forgets reservations: they were never durable.
        fresh = DiskBitmap(3, 5000)
        fresh.load(store)
        assert fresh.free_blocks() == 5000 - 10
    finally:
        store.close()


@pytest.mark.parametrize("start,count", [(0, 1), (3, 5), (5, 3), (7, 2), (0, 8), (1, 30),
                                         (CHUNK_BITS - 3, 7)])
def test_set_bits_edges(start: int, count: int) -> None:
    n = CHUNK_BITS + 64
    bm = DiskBitmap(1, n)
    bm.commit(start, count)
    assert bits_set(bm.committed, n) == set(range(start, start + count))
    assert bm.dirty_chunks == set(range(start // CHUNK_BITS,
                                        (start + count - 1) // CHUNK_BITS + 1))
    bm.free(start, count)
    assert bits_set(bm.committed, n) == set()
