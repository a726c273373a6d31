"""Sets of block numbers, stored as compressed bitmaps and handled as runs.

:class:`BlockSet` is the one structure behind every block list in the product: the
used-block list read from a disk's allocation bitmap (seed Fig. 19), the changed-block
list behind an incremental backup (Fig. 20), a file group's block list as runs of
contiguous blocks (Fig. 24) and the coverage of a generation's index.

A 4 GiB disk already has a million 4 KiB blocks, so nothing here loops in Python per
block (DESIGN.md, "Per-block Python is too slow"):

* storage is a 64-bit roaring bitmap (``pyroaring.BitMap64``): union, intersection,
  difference, counting and serialization run in C on compressed containers;
* runs are found without visiting blocks: the run starts are ``S - (S + 1)`` and the run
  ends are ``S - (S - 1)``, two shifted set differences done in C, so the cost grows
  with the number of runs and containers, not with the number of blocks;
* a packed allocation bitmap is read chunk by chunk with numpy: all-zero and all-one
  chunks cost nothing per block, long runs are added as ranges, and fragmented chunks
  are bulk-loaded as arrays.

Python work is proportional to the size of what the caller asks for (the runs it
iterates, the batches it plans), never to the number of blocks in the set.

``BitMap64`` was chosen over the 32-bit ``BitMap``: in pyroaring 1.2 it has every
operation needed here, measured within ~1.5x of the 32-bit bitmap on bulk loads and
equal on set algebra, and it lifts the 2**32 block limit (16 TiB at 4 KiB, only 2 TiB
with 512-byte blocks). Block numbers are limited to ``0 <= n < 2**63`` (:data:`BLOCK_LIMIT`)
so that every block, run start and count fits the int64 arrays handed to numpy.

Not thread-safe for mutation: a set shared between threads must not be changed while
others use it.
"""

from __future__ import annotations

import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
from pyroaring import BitMap64

from sdbackup.errors import CorruptError

BLOCK_LIMIT = 1 << 63
"""Exclusive upper bound of block numbers (so runs fit int64 numpy arrays)."""

# from_bitmap works through the packed bitmap this many bytes (8x as many blocks) at a
# time, so that a 16 TiB disk's 512 MiB bitmap never unpacks to 4 GiB at once.
_BITMAP_CHUNK_BYTES = 1 << 17
# In a chunk whose runs average at least this many blocks, add_range per run (about
# 0.1 us per Python call) beats bulk-adding every block (about 10 ns per block).
_RUN_LOOP_MIN_AVG = 16
# runs() converts the run array to Python ints this many runs at a time.
_RUNS_ITER_BATCH = 1 << 16
_REPR_RUNS = 4

Int64Array = npt.NDArray[np.int64]


def _check_block(block: int) -> None:
    if not 0 <= block < BLOCK_LIMIT:
        raise ValueError(f"block {block} is outside 0..2**63-1")


def _check_run(start: int, count: int) -> None:
    if count < 0:
        raise ValueError(f"run {start}+{count} has a negative count")
    if start < 0 or start + count > BLOCK_LIMIT:
        raise ValueError(f"run {start}+{count} is outside blocks 0..2**63-1")


def _bitmap_from_array(values: npt.NDArray[Any]) -> Any:
    """A BitMap64 of the (non-negative) integers in ``values``, loaded in bulk.

    pyroaring takes a typed ``array.array`` through its buffer fast path; a numpy array
    passed directly is iterated element by element, about 10x slower.
    """
    arr = array.array("Q")
    arr.frombytes(np.ascontiguousarray(values, dtype=np.uint64).tobytes())
    return BitMap64(arr)


class BlockSet:
    """A set of block numbers (``0 <= n < 2**63``) kept as a compressed bitmap.

    Guarantees:

    * membership, size, set algebra, run counting and serialization cost time in
      proportion to the compressed size (containers of 2**16 blocks), not the number
      of blocks;
    * :meth:`runs` and :meth:`runs_array` give ascending, maximal runs: no two touch
      or overlap, and together they cover exactly the set;
    * :meth:`serialize` is the portable roaring64 format (readable by CRoaring,
      Java/Go ``Roaring64`` portable readers); :meth:`deserialize` validates it and
      raises :class:`~sdbackup.errors.CorruptError` rather than return a broken set.

    The class is deliberately not iterable: :meth:`iter_blocks` visits every block and is
    meant for small sets and tests; data paths use :meth:`runs`.
    """

    __slots__ = ("_bm",)

    def __init__(self) -> None:
        self._bm: Any = BitMap64()

    @classmethod
    def _wrap(cls, bm: Any) -> BlockSet:
        obj = cls.__new__(cls)
        obj._bm = bm
        return obj

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_runs(cls, runs: Iterable[tuple[int, int]]) -> BlockSet:
        """The set of blocks covered by ``(start, count)`` runs (may overlap, any order).

        Costs one C call per run; a numpy ``(N, 2)`` array is accepted too.
        """
        if isinstance(runs, np.ndarray):
            runs = [(int(s), int(c)) for s, c in runs.tolist()]
        bs = cls()
        add_range = bs._bm.add_range
        for r in runs:
            start, count = int(r[0]), int(r[1])
            _check_run(start, count)
            if count:
                add_range(start, start + count)
        bs._bm.run_optimize()
        return bs

    @classmethod
    def from_blocks(cls, blocks: Iterable[int] | npt.NDArray[np.integer[Any]]) -> BlockSet:
        """The set of the given block numbers; a numpy integer array is bulk-loaded."""
        if isinstance(blocks, np.ndarray):
            arr = blocks.ravel()
            if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= BLOCK_LIMIT):
                raise ValueError("block numbers must be in 0..2**63-1")
            return cls._wrap(_bitmap_from_array(arr))
        bs = cls()
        add = bs._bm.add
        for b in blocks:
            _check_block(b)
            add(b)
        return bs

    @classmethod
    def from_bitmap(
        cls,
        bits: npt.NDArray[np.uint8] | bytes | bytearray | memoryview,
        offset: int = 0,
    ) -> BlockSet:
        """The blocks whose bit is set in a packed allocation bitmap.

        Bit order is little-endian within each byte: bit ``i`` (value ``1 << i``) of
        byte ``j`` stands for block ``offset + j * 8 + i``. This is the layout of the
        seed's empty-area control table and of ext2/3/4 block bitmaps.

        Works through the bitmap in chunks: all-clear chunks are skipped, all-set chunks
        become one range, chunks of long runs are added run by run and fragmented chunks
        are bulk-loaded from ``numpy.flatnonzero``. About 10 ms per million blocks.
        """
        if isinstance(bits, np.ndarray):
            if bits.dtype != np.uint8:
                raise ValueError(f"bitmap must be a uint8 array, not {bits.dtype}")
            packed = np.ascontiguousarray(bits).ravel()
        else:
            packed = np.frombuffer(bits, dtype=np.uint8)
        if offset < 0 or offset + packed.size * 8 > BLOCK_LIMIT:
            raise ValueError(
                f"bitmap of {packed.size * 8} blocks at offset {offset} is outside 0..2**63-1"
            )
        bm: Any = BitMap64()
        chunk_bytes = _BITMAP_CHUNK_BYTES
        for c0 in range(0, packed.size, chunk_bytes):
            chunk = packed[c0 : c0 + chunk_bytes]
            base = offset + c0 * 8
            if not chunk.any():
                continue
            if bool((chunk == 0xFF).all()):
                bm.add_range(base, base + chunk.size * 8)
                continue
            flags = np.unpackbits(chunk, bitorder="little").view(np.int8)
            edges = np.diff(flags, prepend=np.int8(0), append=np.int8(0))
            starts = np.flatnonzero(edges == 1)
            ends = np.flatnonzero(edges == -1)
            nset = int((ends - starts).sum())
            if starts.size * _RUN_LOOP_MIN_AVG <= nset:
                add_range = bm.add_range
                for s, e in zip((starts + base).tolist(), (ends + base).tolist(), strict=True):
                    add_range(s, e)
            else:
                idx = np.flatnonzero(flags).astype(np.uint64)
                idx += np.uint64(base)
                arr = array.array("Q")
                arr.frombytes(idx.tobytes())
                bm.update(arr)
        bm.run_optimize()
        return cls._wrap(bm)

    # ------------------------------------------------------------------ mutation

    def add(self, block: int) -> None:
        """Add one block."""
        _check_block(block)
        self._bm.add(block)

    def add_run(self, start: int, count: int) -> None:
        """Add blocks ``start .. start + count - 1`` (one C call; ``count == 0`` is a no-op)."""
        _check_run(start, count)
        if count:
            self._bm.add_range(start, start + count)

    def remove_run(self, start: int, count: int) -> None:
        """Remove blocks ``start .. start + count - 1``; absent blocks are ignored."""
        _check_run(start, count)
        if count:
            self._bm.remove_range(start, start + count)

    def clear(self) -> None:
        """Remove every block."""
        self._bm.clear()

    def copy(self) -> BlockSet:
        """An independent copy."""
        return BlockSet._wrap(self._bm.copy())

    # ------------------------------------------------------------------ queries

    def __contains__(self, block: object) -> bool:
        if not isinstance(block, int | np.integer) or isinstance(block, bool):
            return False
        b = int(block)
        return 0 <= b < BLOCK_LIMIT and bool(b in self._bm)

    def __len__(self) -> int:
        """Number of blocks (not runs)."""
        return len(self._bm)

    def __bool__(self) -> bool:
        return bool(self._bm)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockSet):
            return NotImplemented
        return bool(self._bm == other._bm)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def issubset(self, other: BlockSet) -> bool:
        """True when every block of this set is in ``other``."""
        return bool(self._bm.issubset(other._bm))

    def isdisjoint(self, other: BlockSet) -> bool:
        """True when the sets share no block."""
        return not self._bm.intersect(other._bm)

    def intersects_run(self, start: int, count: int) -> bool:
        """True when any block of ``start .. start + count - 1`` is in the set (O(log n))."""
        _check_run(start, count)
        if count == 0 or not self._bm:
            return False
        try:
            nxt = int(self._bm.next_set_bit(start))
        except ValueError:  # no block >= start
            return False
        return nxt < start + count

    def contains_run(self, start: int, count: int) -> bool:
        """True when every block of ``start .. start + count - 1`` is in the set."""
        _check_run(start, count)
        return count == 0 or bool(self._bm.contains_range(start, start + count))

    def count_in_run(self, start: int, count: int) -> int:
        """How many blocks of ``start .. start + count - 1`` are in the set."""
        _check_run(start, count)
        if count == 0:
            return 0
        return int(self._bm.range_cardinality(start, start + count))

    def min(self) -> int:
        """Smallest block; ValueError when empty."""
        if not self._bm:
            raise ValueError("empty BlockSet has no min()")
        return int(self._bm.min())

    def max(self) -> int:
        """Largest block; ValueError when empty."""
        if not self._bm:
            raise ValueError("empty BlockSet has no max()")
        return int(self._bm.max())

    def iter_blocks(self) -> Iterator[int]:
        """Every block in ascending order, one Python int each: small sets and tests only."""
        return iter(self._bm)

    # ------------------------------------------------------------------ set algebra

    def __or__(self, other: object) -> BlockSet:
        if not isinstance(other, BlockSet):
            return NotImplemented
        return BlockSet._wrap(self._bm | other._bm)

    def __and__(self, other: object) -> BlockSet:
        if not isinstance(other, BlockSet):
            return NotImplemented
        return BlockSet._wrap(self._bm & other._bm)

    def __sub__(self, other: object) -> BlockSet:
        if not isinstance(other, BlockSet):
            return NotImplemented
        return BlockSet._wrap(self._bm - other._bm)

    def __xor__(self, other: object) -> BlockSet:
        if not isinstance(other, BlockSet):
            return NotImplemented
        return BlockSet._wrap(self._bm ^ other._bm)

    def __ior__(self, other: object) -> BlockSet:
        if not isinstance(other, BlockSet):
            return NotImplemented
        self._bm |= other._bm
        return self

    def __iand__(self, other: object) -> BlockSet:
        if not isinstance(other, BlockSet):
            return NotImplemented
        self._bm &= other._bm
        return self

    def __isub__(self, other: object) -> BlockSet:
        if not isinstance(other, BlockSet):
            return NotImplemented
        self._bm -= other._bm
        return self

    def __ixor__(self, other: object) -> BlockSet:
        if not isinstance(other, BlockSet):
            return NotImplemented
        self._bm ^= other._bm
        return self

    # ------------------------------------------------------------------ runs

    def _run_bounds(self) -> tuple[Any, Any]:
        """Bitmaps of the first and of the last block of every run.

        A block starts a run when the block before it is absent: ``S - (S + 1)``; it ends
        one when the block after it is absent: ``S - (S - 1)``. Both sets have one
        element per run, so pairing them in order gives the runs.
        """
        bm = self._bm
        return bm - bm.shift(1), bm - bm.shift(-1)

    def num_runs(self) -> int:
        """Number of maximal runs, counted in C without listing them."""
        if not self._bm:
            return 0
        return int(self._bm.difference_cardinality(self._bm.shift(1)))

    def runs_array(self) -> Int64Array:
        """Maximal runs as an ``(N, 2)`` int64 array of ``(start, count)``, ascending."""
        if not self._bm:
            return np.empty((0, 2), dtype=np.int64)
        firsts, lasts = self._run_bounds()
        s = np.frombuffer(firsts.to_array(), dtype=np.uint64).astype(np.int64)
        e = np.frombuffer(lasts.to_array(), dtype=np.uint64).astype(np.int64)
        out = np.empty((s.size, 2), dtype=np.int64)
        out[:, 0] = s
        out[:, 1] = e - s + 1
        return out

    def runs(self) -> Iterator[tuple[int, int]]:
        """Maximal runs ``(start, count)`` in ascending order.

        Consecutive runs never touch (``next.start > start + count``); together they
        cover exactly the set. Computed from :meth:`runs_array`.
        """
        arr = self.runs_array()
        for i in range(0, arr.shape[0], _RUNS_ITER_BATCH):
            part = arr[i : i + _RUNS_ITER_BATCH]
            yield from zip(part[:, 0].tolist(), part[:, 1].tolist(), strict=True)

    def coalesced_runs(
        self, max_gap: int, max_count: int | None = None
    ) -> list[tuple[int, int]]:
        """Plan large sequential reads: runs merged across small gaps, capped in length.

        Returns ascending, non-overlapping ``(start, count)`` batches such that:

        * every block of the set is in exactly one batch; a batch may also cover
          blocks not in the set, but only inside holes of at most ``max_gap`` blocks
          (the copier reads a small gap rather than issue another I/O);
        * every batch starts and ends on a block of the set;
        * without ``max_count``, batches are separated by holes longer than
          ``max_gap`` (maximal merging);
        * with ``max_count``, no batch is longer than ``max_count``; batches are filled
          greedily, so a batch that is followed by a hole of at most ``max_gap`` could
          not have taken the next block without exceeding ``max_count``.

        Merging is vectorized with numpy; only groups longer than ``max_count`` that
        hold several runs are split in Python, one step per batch produced.
        """
        if max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, not {max_gap}")
        if max_count is not None and max_count < 1:
            raise ValueError(f"max_count must be >= 1, not {max_count}")
        runs = self.runs_array()
        n = runs.shape[0]
        if n == 0:
            return []
        starts = runs[:, 0]
        ends = starts + runs[:, 1]
        cut = np.flatnonzero(starts[1:] - ends[:-1] > max_gap) + 1
        first = np.concatenate((np.zeros(1, dtype=np.int64), cut))
        last = np.concatenate((cut, np.full(1, n, dtype=np.int64))) - 1
        gs = starts[first]
        ge = ends[last]
        glen = ge - gs
        if max_count is None or not bool((glen > max_count).any()):
            return list(zip(gs.tolist(), glen.tolist(), strict=True))

        long = glen > max_count
        single = long & (first == last)
        multi = np.flatnonzero(long & (first != last))
        keep = ~long
        piece_s: list[Int64Array] = [gs[keep]]
        piece_c: list[Int64Array] = [glen[keep]]

        if single.any():
            # One long run: cut it into max_count pieces, all at once.
            ss, ll = gs[single], glen[single]
            k = -(-ll // max_count)
            offs = np.arange(int(k.sum()), dtype=np.int64) - np.repeat(np.cumsum(k) - k, k)
            ps = np.repeat(ss, k) + offs * max_count
            piece_s.append(ps)
            piece_c.append(np.minimum(max_count, np.repeat(ss + ll, k) - ps))

        if multi.size:
            ms: list[int] = []
            mc: list[int] = []
            for g in multi.tolist():
                lo, hi = int(first[g]), int(last[g]) + 1
                _split_group(starts[lo:hi].tolist(), ends[lo:hi].tolist(), max_count, ms, mc)
            piece_s.append(np.asarray(ms, dtype=np.int64))
            piece_c.append(np.asarray(mc, dtype=np.int64))

        all_s = np.concatenate(piece_s)
        all_c = np.concatenate(piece_c)
        order = np.argsort(all_s, kind="stable")
        return list(zip(all_s[order].tolist(), all_c[order].tolist(), strict=True))

    # ------------------------------------------------------------------ persistence

    def serialize(self) -> bytes:
        """Portable roaring64 bytes (run containers are optimized first, in place)."""
        self._bm.run_optimize()
        return bytes(self._bm.serialize())

    @classmethod
    def deserialize(cls, data: bytes | bytearray | memoryview) -> BlockSet:
        """Read :meth:`serialize` output back; CorruptError on anything else.

        Checks what the format allows: structure (pyroaring validates every container),
        no trailing bytes, block numbers below 2**63. A flipped bit inside a container
        can still decode to a different valid set, so the record that carries these
        bytes must have its own checksum (every medium record does).
        """
        raw = bytes(data)
        try:
            bm = BitMap64.deserialize(raw)
        except (ValueError, IndexError, OverflowError, MemoryError) as e:
            raise CorruptError(
                f"block list of {len(raw)} bytes is corrupt ({e}); the record holding it "
                "is damaged: verify the medium"
            ) from None
        used = len(bm.serialize())
        if used != len(raw):
            raise CorruptError(
                f"block list is corrupt: {len(raw) - used} unexpected bytes after its "
                f"{used}-byte encoding; the record holding it is damaged: verify the medium"
            )
        if bm and int(bm.max()) >= BLOCK_LIMIT:
            raise CorruptError(
                f"block list is corrupt: block {int(bm.max())} is beyond 2**63-1; the "
                "record holding it is damaged: verify the medium"
            )
        return cls._wrap(bm)

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return (BlockSet.deserialize, (self.serialize(),))

    def __repr__(self) -> str:
        if not self._bm:
            return "BlockSet(empty)"
        nruns = self.num_runs()
        firsts, lasts = self._run_bounds()
        shown = []
        for i in range(min(nruns, _REPR_RUNS)):
            s, e = int(firsts[i]), int(lasts[i])
            shown.append(f"{s}+{e - s + 1}")
        more = ", ..." if nruns > _REPR_RUNS else ""
        return (
            f"BlockSet({len(self._bm)} blocks in {nruns} runs: {', '.join(shown)}{more})"
        )


def _split_group(
    starts: list[int], ends: list[int], max_count: int, out_s: list[int], out_c: list[int]
) -> None:
    """Greedily cut one merged group (runs ``starts[i]..ends[i]-1``) into batches.

    Each batch begins at the next block of the set and reaches as far as
    ``max_count`` allows, ending on the last set block before that limit. One loop
    step per batch produced.
    """
    m = len(starts)
    i = 0
    x = starts[0]
    while True:
        limit = x + max_count
        j = bisect_left(starts, limit, i) - 1  # last run that starts before the limit
        e = ends[j]
        if e > limit:  # run j goes on past the limit: the next batch starts inside it
            out_s.append(x)
            out_c.append(max_count)
            i, x = j, limit
        else:
            out_s.append(x)
            out_c.append(e - x)
            i = j + 1
            if i == m:
                return
            x = starts[i]
