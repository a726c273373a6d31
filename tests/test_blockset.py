"""BlockSet against plain Python sets, plus the bulk paths on realistic sizes."""

from __future__ import annotations

import itertools
import pickle
import random
import time
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sdbackup.blocks import blockset as blockset_mod
from sdbackup.blocks.blockset import BLOCK_LIMIT, BlockSet
from sdbackup.errors import CorruptError

# Bases put small sets next to roaring container edges (2**16), the old 32-bit limit
# and far beyond it, so that the 64-bit paths are exercised too.
BASES = [0, 2**16 - 40, 2**32 - 60, 2**40 + 7, BLOCK_LIMIT - 5000]

run_lists = st.lists(
    st.tuples(st.integers(0, 3000), st.integers(0, 60)), max_size=25
)


@st.composite
def block_sets(draw: st.DrawFn) -> tuple[BlockSet, set[int]]:
    base = draw(st.sampled_from(BASES))
    runs = [(base + s, c) for s, c in draw(run_lists)]
    model = {b for s, c in runs for b in range(s, s + c)}
    return BlockSet.from_runs(runs), model


@st.composite
def two_sets(draw: st.DrawFn) -> tuple[BlockSet, set[int], BlockSet, set[int]]:
    base = draw(st.sampled_from(BASES))
    out: list[object] = []
    for _ in range(2):
        runs = [(base + s, c) for s, c in draw(run_lists)]
        out += [BlockSet.from_runs(runs), {b for s, c in runs for b in range(s, s + c)}]
    return out[0], out[1], out[2], out[3]  # type: ignore[return-value]


def model_runs(model: set[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for b in sorted(model):
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def check_equal(bs: BlockSet, model: set[int]) -> None:
    assert len(bs) == len(model)
    assert bool(bs) == bool(model)
    assert list(bs.iter_blocks()) == sorted(model)
    assert list(bs.runs()) == model_runs(model)
    assert bs.num_runs() == len(model_runs(model))


# ---------------------------------------------------------------------------- basics


@given(block_sets())
def test_queries_match_model(data: tuple[BlockSet, set[int]]) -> None:
    bs, model = data
    check_equal(bs, model)
    if model:
        assert bs.min() == min(model)
        assert bs.max() == max(model)
        lo, hi = min(model), max(model)
        for b in (lo - 1, lo, (lo + hi) // 2, hi, hi + 1):
            assert (b in bs) == (b in model)
    else:
        with pytest.raises(ValueError):
            bs.min()
        with pytest.raises(ValueError):
            bs.max()


@given(block_sets())
def test_runs_are_maximal_and_cover(data: tuple[BlockSet, set[int]]) -> None:
    bs, model = data
    runs = list(bs.runs())
    covered: set[int] = set()
    prev_end = -2
    for start, count in runs:
        assert isinstance(start, int) and isinstance(count, int)
        assert count >= 1
        assert start > prev_end  # ascending and never touching: maximal
        prev_end = start + count
        covered.update(range(start, start + count))
    assert covered == model
    arr = bs.runs_array()
    assert arr.dtype == np.int64 and arr.shape == (len(runs), 2)
    assert [tuple(r) for r in arr.tolist()] == runs


@given(two_sets())
def test_set_algebra(data: tuple[BlockSet, set[int], BlockSet, set[int]]) -> None:
    a, ma, b, mb = data
    a0 = a.copy()
    check_equal(a | b, ma | mb)
    check_equal(a & b, ma & mb)
    check_equal(a - b, ma - mb)
    check_equal(a ^ b, ma ^ mb)
    assert a == a0  # the operands are untouched
    assert a.issubset(b) == ma.issubset(mb)
    assert a.isdisjoint(b) == ma.isdisjoint(mb)
    assert (a == b) == (ma == mb)
    for op, mop in (
        ("__ior__", set.__ior__),
        ("__iand__", set.__iand__),
        ("__isub__", set.__isub__),
        ("__ixor__", set.__ixor__),
    ):
        c, mc = a.copy(), set(ma)
        res = getattr(c, op)(b)
        mop(mc, mb)
        assert res is c
        check_equal(c, mc)
    assert a == a0


@given(block_sets(), st.integers(-10, 3100), st.integers(0, 80))
def test_run_queries(data: tuple[BlockSet, set[int]], rel: int, count: int) -> None:
    bs, model = data
    base = min(model) if model else 0
    # A run is at most up to the last block there is (queries past it are errors,
    # test_bounds_and_bad_arguments): near the top, the window ends at the limit.
    start = min(max(0, base + rel), BLOCK_LIMIT - count)
    want = len(model & set(range(start, start + count)))
    assert bs.count_in_run(start, count) == want
    assert bs.intersects_run(start, count) == (want > 0)
    assert bs.contains_run(start, count) == (want == count)


def test_copy_is_independent_and_clear() -> None:
    a = BlockSet.from_runs([(10, 5)])
    b = a.copy()
    b.add(100)
    assert 100 not in a and 100 in b
    b.clear()
    assert not b and len(b) == 0 and a.num_runs() == 1
    assert list(b.runs()) == [] and b.runs_array().shape == (0, 2)
    assert b.coalesced_runs(10) == []


def test_bounds_and_bad_arguments() -> None:
    bs = BlockSet()
    bs.add(BLOCK_LIMIT - 1)
    bs.add_run(BLOCK_LIMIT - 10, 10)
    assert list(bs.runs()) == [(BLOCK_LIMIT - 10, 10)]
    assert bs.runs_array().tolist() == [[BLOCK_LIMIT - 10, 10]]
    for bad in (-1, BLOCK_LIMIT):
        with pytest.raises(ValueError):
            bs.add(bad)
        assert bad not in bs
    with pytest.raises(ValueError):
        bs.add_run(BLOCK_LIMIT - 1, 2)
    with pytest.raises(ValueError):
        bs.add_run(5, -1)
    with pytest.raises(ValueError):
        BlockSet.from_runs([(-3, 2)])
    assert "x" not in bs and True not in bs
    bs.add_run(7, 0)
    bs.remove_run(7, 0)
    assert bs.count_in_run(0, 0) == 0 and not bs.intersects_run(0, 0)
    with pytest.raises(TypeError):
        iter(bs)  # type: ignore[call-overload]  # deliberately not iterable
    with pytest.raises(ValueError):
        bs.coalesced_runs(-1)
    with pytest.raises(ValueError):
        bs.coalesced_runs(0, 0)


def test_from_blocks_and_numpy_runs() -> None:
    arr = np.array([5, 1, 2, 3, 2**40, 5], dtype=np.int64)
    assert list(BlockSet.from_blocks(arr).runs()) == [(1, 3), (5, 1), (2**40, 1)]
    assert BlockSet.from_blocks([3, 1, 2]) == BlockSet.from_runs([(1, 3)])
    assert BlockSet.from_runs(np.array([[4, 2], [0, 1]])) == BlockSet.from_blocks([0, 4, 5])
    with pytest.raises(ValueError):
        BlockSet.from_blocks(np.array([-1]))


def test_repr() -> None:
    assert repr(BlockSet()) == "BlockSet(empty)"
    r = repr(BlockSet.from_runs([(0, 3), (10, 1), (20, 2), (30, 1), (40, 5), (50, 1)]))
    assert r == "BlockSet(13 blocks in 6 runs: 0+3, 10+1, 20+2, 30+1, ...)"


class BlockSetMachine(RuleBasedStateMachine):
    """Random sequences of mutations keep BlockSet equal to a Python set."""

    def __init__(self) -> None:
        super().__init__()
        self.bs = BlockSet()
        self.model: set[int] = set()

    @rule(b=st.integers(0, 500))
    def add(self, b: int) -> None:
        self.bs.add(b)
        self.model.add(b)

    @rule(s=st.integers(0, 500), c=st.integers(0, 70))
    def add_run(self, s: int, c: int) -> None:
        self.bs.add_run(s, c)
        self.model.update(range(s, s + c))

    @rule(s=st.integers(0, 500), c=st.integers(0, 70))
    def remove_run(self, s: int, c: int) -> None:
        self.bs.remove_run(s, c)
        self.model.difference_update(range(s, s + c))

    @rule(s=st.integers(0, 500), c=st.integers(0, 70))
    def union_run(self, s: int, c: int) -> None:
        self.bs |= BlockSet.from_runs([(s, c)])
        self.model |= set(range(s, s + c))

    @rule()
    def roundtrip(self) -> None:
        self.bs = BlockSet.deserialize(self.bs.serialize())

    @invariant()
    def same(self) -> None:
        check_equal(self.bs, self.model)


TestBlockSetMachine = BlockSetMachine.TestCase
TestBlockSetMachine.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)


# ---------------------------------------------------------------------------- coalesced_runs


@settings(deadline=None)
@given(block_sets(), st.integers(0, 12), st.one_of(st.none(), st.integers(1, 40)))
def test_coalesced_runs(
    data: tuple[BlockSet, set[int]], max_gap: int, max_count: int | None
) -> None:
    bs, model = data
    batches = bs.coalesced_runs(max_gap, max_count)
    covered = 0
    prev: tuple[int, int] | None = None
    for start, count in batches:
        assert count >= 1
        if max_count is not None:
            assert count <= max_count
        # starts and ends on a block of the set
        assert start in model and start + count - 1 in model
        inside = sorted(b for b in model if start <= b < start + count)
        covered += len(inside)
        # a batch only reads holes of at most max_gap blocks
        assert all(y - x - 1 <= max_gap for x, y in itertools.pairwise(inside))
        if prev is not None:
            pstart, pcount = prev
            gap = start - (pstart + pcount)
            assert gap >= 0  # ascending, no overlap
            if gap <= max_gap:
                # only max_count kept these apart, and the earlier batch was full
                assert max_count is not None
                assert start >= pstart + max_count
        prev = (start, count)
    assert covered == len(model)  # disjoint batches, so every block exactly once


def test_coalesced_runs_examples() -> None:
    bs = BlockSet.from_runs([(0, 3), (5, 2), (10, 1), (100, 10)])
    assert bs.coalesced_runs(0) == [(0, 3), (5, 2), (10, 1), (100, 10)]
    assert bs.coalesced_runs(2) == [(0, 7), (10, 1), (100, 10)]
    assert bs.coalesced_runs(3) == [(0, 11), (100, 10)]
    assert bs.coalesced_runs(3, 4) == [(0, 3), (5, 2), (10, 1), (100, 4), (104, 4), (108, 2)]
    assert bs.coalesced_runs(3, 6) == [(0, 6), (6, 5), (100, 6), (106, 4)]
    assert bs.coalesced_runs(1000, 1000) == [(0, 110)]


def test_coalesced_runs_large_is_fast() -> None:
    alt = BlockSet.from_bitmap(np.full(1 << 17, 0x55, dtype=np.uint8))  # 2**19 runs of 1
    t = time.perf_counter()
    batches = alt.coalesced_runs(1, 1024)
    assert time.perf_counter() - t < 2
    assert batches[0] == (0, 1023) and len(batches) == (1 << 20) // 1024
    assert sum(alt.count_in_run(s, c) for s, c in batches) == len(alt)


# ---------------------------------------------------------------------------- from_bitmap


def model_from_bitmap(data: bytes, offset: int) -> set[int]:
    return {offset + j * 8 + i for j, byte in enumerate(data) for i in range(8) if byte >> i & 1}


bitmaps = st.lists(
    st.one_of(st.sampled_from([0x00, 0xFF]), st.integers(0, 255)), max_size=80
).map(bytes)


@given(bitmaps, st.one_of(st.integers(0, 100), st.integers(0, 2**40)))
def test_from_bitmap_matches_model(data: bytes, offset: int) -> None:
    want = model_from_bitmap(data, offset)
    check_equal(BlockSet.from_bitmap(data, offset), want)
    check_equal(BlockSet.from_bitmap(np.frombuffer(data, dtype=np.uint8), offset), want)


@given(bitmaps, st.integers(0, 2**33), st.integers(1, 5))
def test_from_bitmap_across_chunks(data: bytes, offset: int, chunk: int) -> None:
    """Tiny chunks: runs that cross chunk edges, all-set/all-clear chunks, both paths."""
    with mock.patch.object(blockset_mod, "_BITMAP_CHUNK_BYTES", chunk):
        got = BlockSet.from_bitmap(data, offset)
    check_equal(got, model_from_bitmap(data, offset))


def test_from_bitmap_roundtrip_random_numpy() -> None:
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2, size=(1 << 18) + 5, dtype=np.uint8).astype(bool)
    bits[1000:300000] = True  # one long run across chunk edges
    packed = np.packbits(bits, bitorder="little")
    offset = 12345
    bs = BlockSet.from_bitmap(packed, offset)
    assert len(bs) == int(bits.sum())
    edges = np.diff(bits.astype(np.int8), prepend=0, append=0)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    runs = bs.runs_array()
    assert np.array_equal(runs[:, 0], starts + offset)
    assert np.array_equal(runs[:, 1], ends - starts)
    assert BlockSet.from_runs(runs) == bs


def test_from_bitmap_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        BlockSet.from_bitmap(np.zeros(4, dtype=np.uint16))
    with pytest.raises(ValueError):
        BlockSet.from_bitmap(b"\x01", offset=-1)
    with pytest.raises(ValueError):
        BlockSet.from_bitmap(b"\x01\x01", offset=BLOCK_LIMIT - 8)
    assert not BlockSet.from_bitmap(b"")


def test_from_bitmap_million_blocks_is_fast() -> None:
    """A guard, not a benchmark: 2**20 blocks, about half used in random runs."""
    rng = random.Random(3)
    bits = np.zeros(1 << 20, dtype=bool)
    pos, used = 0, False
    while pos < bits.size:
        n = rng.randint(1, 200)
        bits[pos : pos + n] = used
        used = not used
        pos += n
    packed = np.packbits(bits, bitorder="little")
    t = time.perf_counter()
    bs = BlockSet.from_bitmap(packed)
    runs = bs.runs_array()
    elapsed = time.perf_counter() - t
    assert elapsed < 2.0, f"from_bitmap + runs_array took {elapsed:.2f}s"
    assert len(bs) == int(bits.sum())
    assert 0.4 < len(bs) / bits.size < 0.6
    edges = np.flatnonzero(np.diff(bits.astype(np.int8), prepend=0, append=0) == 1)
    assert np.array_equal(runs[:, 0], edges)


# ---------------------------------------------------------------------------- serialization


@given(block_sets())
def test_serialize_roundtrip(data: tuple[BlockSet, set[int]]) -> None:
    bs, model = data
    raw = bs.serialize()
    assert isinstance(raw, bytes)
    back = BlockSet.deserialize(raw)
    assert back == bs
    check_equal(back, model)
    assert BlockSet.deserialize(memoryview(raw)) == bs
    assert pickle.loads(pickle.dumps(bs)) == bs


def test_deserialize_rejects_bad_bytes() -> None:
    good = BlockSet.from_runs([(5, 100), (2**40, 3), (7000, 1)]).serialize()
    for bad in (b"", b"\x00", b"not a block set at all", good[:-3], good[:9], good + b"\x00"):
        with pytest.raises(CorruptError, match="corrupt"):
            BlockSet.deserialize(bad)


@settings(deadline=None)
@given(block_sets(), st.data())
def test_deserialize_damaged_bytes_never_misbehaves(
    data: tuple[BlockSet, set[int]], draw: st.DataObject
) -> None:
    """A damaged encoding gives CorruptError or some valid set, never another error."""
    raw = bytearray(data[0].serialize())
    for _ in range(draw.draw(st.integers(1, 4))):
        i = draw.draw(st.integers(0, len(raw) - 1))
        raw[i] = draw.draw(st.integers(0, 255))
    try:
        bs = BlockSet.deserialize(bytes(raw))
    except CorruptError:
        return
    assert len(bs) == sum(c for _, c in bs.runs())
