"""Allocation bitmaps: which blocks of each disk are in use (the seed's Fig. 18).

Each disk has two packed bitmaps in memory (numpy ``uint8``, little-endian bit order,
bit set = used):

- ``committed``: exactly what the metadata store says (persisted in chunks, in the
  same transaction as the extents that reference the blocks);
- ``inuse``: ``committed`` plus blocks *reserved* for writes in flight (allocated and
  being written by a node, but not yet committed to an extent).

Reservations are never persisted: a crash between the data write and the commit
leaves the blocks free, as they should be (ordered-mode semantics: an extent is
committed only after its data reached the disk).

**Freed blocks wait for durability** (``quarantine``): a block freed by a transaction
(unlink, truncate) leaves ``committed`` at once but stays in ``inuse`` until that
transaction is durable (:meth:`~sdbackup.meta.service.MetadataService.sync`).
Otherwise another file could take it, write its data there and make that durable,
while a power loss rolls the freeing transaction back: the old file would come back
showing the new file's bytes (ext4 holds freed blocks back until the freeing commit
for the same reason). Free-space counts include quarantined blocks. Finding free blocks looks at
``inuse``; persisting writes ``committed``. All searches work on whole bytes and
numpy windows, never one Python step per block.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from sdbackup.meta.store import MetaStore

CHUNK_BYTES = 4096
CHUNK_BITS = CHUNK_BYTES * 8
_WINDOW = 1 << 16  # bytes of bitmap looked at per search step (512 Ki blocks)
_FIRST_WINDOW = 64  # the first search step (512 blocks), growing x16 to _WINDOW

U8 = npt.NDArray[np.uint8]


def _set_bits(bits: U8, start: int, count: int, value: bool) -> None:
    """Set or clear bits [start, start+count) of a packed little-endian bitmap."""
    if count <= 0:
        return
    end = start + count
    sb, eb = start >> 3, (end - 1) >> 3
    if sb == eb:
        mask = ((1 << count) - 1) << (start & 7)
        if value:
            bits[sb] |= mask
        else:
            bits[sb] &= ~mask & 0xFF
        return
    head = (0xFF << (start & 7)) & 0xFF
    tail = (1 << (((end - 1) & 7) + 1)) - 1
    if value:
        bits[sb] |= head
        bits[eb] |= tail
        bits[sb + 1 : eb] = 0xFF
    else:
        bits[sb] &= ~head & 0xFF
        bits[eb] &= ~tail & 0xFF
        bits[sb + 1 : eb] = 0


def _range_mask(start: int, count: int) -> U8:
    """Bits [start, start+count) as a mask over bytes start>>3 .. (start+count+7)>>3."""
    sb, eb = start >> 3, (start + count + 7) >> 3
    mask = np.zeros(eb - sb, dtype=np.uint8)
    _set_bits(mask, start - (sb << 3), count, True)
    return mask


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def popcount(bits: U8) -> int:
    """Set bits of a packed bitmap (a table lookup per byte, in C)."""
    return int(_POPCOUNT[bits].sum())


def count_set(bits: U8, start: int, count: int) -> int:
    """Number of set bits in [start, start+count)."""
    if count <= 0:
        return 0
    sb, eb = start >> 3, (start + count + 7) >> 3
    # As one Python int (bit 0 = block sb*8): cheaper than numpy for short ranges.
    word = int.from_bytes(bits[sb:eb].tobytes(), "little") >> (start - (sb << 3))
    return (word & ((1 << count) - 1)).bit_count()


class DiskBitmap:
    """The allocation state of one disk."""

    def __init__(self, disk_id: int, nblocks: int) -> None:
        self.disk_id = disk_id
        self.nblocks = nblocks
        nbytes = (nblocks + 7) >> 3
        self.committed: U8 = np.zeros(nbytes, dtype=np.uint8)
        # Bits past the end of the disk are permanently "used".
        if nblocks & 7:
            self.committed[-1] |= (0xFF << (nblocks & 7)) & 0xFF
        self.inuse: U8 = self.committed.copy()
        self.dirty_chunks: set[int] = set()
        self.cursor = 0  # next-fit position for new files
        # Blocks freed by transactions that may not be durable yet (see the module doc):
        # set in ``held`` (and still in ``inuse``); ``quarantine`` lists the runs freed
        # since the last :meth:`take_quarantine`, so a release touches only those.
        self.held: U8 = np.zeros(nbytes, dtype=np.uint8)
        self.quarantine: list[tuple[int, int]] = []
        self.quarantined = 0
        # Set bits of ``committed`` and ``inuse`` (padding included), kept up to date by
        # every change, so that counting free blocks (statfs, choosing a disk for a new
        # file) never unpacks a bitmap. tests/test_alloc.py checks them against a count.
        self._pad = (nbytes << 3) - nblocks
        self._n_committed = self._n_inuse = self._pad

    def _recount(self) -> None:
        self._n_committed = popcount(self.committed)
        self._n_inuse = popcount(self.inuse)

    # -- persistence ---------------------------------------------------------------
    def load(self, store: MetaStore) -> None:
        for chunk, blob in store.query(
            "SELECT chunk, bits FROM alloc WHERE disk=?", (self.disk_id,)
        ):
            start = chunk * CHUNK_BYTES
            arr = np.frombuffer(blob, dtype=np.uint8)
            n = min(len(arr), len(self.committed) - start)
            self.committed[start : start + n] |= arr[:n]
        self.inuse = self.committed.copy()
        self._recount()

    def save_dirty(self, store: MetaStore) -> None:
        """Write the changed chunks of ``committed`` (inside the caller's transaction).

        UPDATE, and INSERT only a chunk that has no row yet: a chunk (4 KiB) is larger
        than fits in one SQLite page, and REPLACE (delete + insert) frees and allocates
        its overflow page every time, writing twice as many pages to the WAL per commit;
        UPDATE overwrites the row in place.
        """
        for chunk in sorted(self.dirty_chunks):
            blob = self.committed[chunk * CHUNK_BYTES : (chunk + 1) * CHUNK_BYTES].tobytes()
            cur = store.execute("UPDATE alloc SET bits=? WHERE disk=? AND chunk=?",
                                (blob, self.disk_id, chunk))
            if cur.rowcount == 0:
                store.execute("INSERT INTO alloc(disk, chunk, bits) VALUES (?,?,?)",
                              (self.disk_id, chunk, blob))
        self.dirty_chunks.clear()

    def _touch(self, start: int, count: int) -> None:
        first = start // CHUNK_BITS
        last = (start + count - 1) // CHUNK_BITS
        self.dirty_chunks.update(range(first, last + 1))

    # -- state changes ----------------------------------------------------------------
    def reserve(self, start: int, count: int) -> None:
        self._n_inuse += count - count_set(self.inuse, start, count)
        _set_bits(self.inuse, start, count, True)

    def unreserve(self, start: int, count: int) -> None:
        """Give back reserved blocks that were never committed."""
        if count <= 0:
            return
        sb, eb = start >> 3, (start + count + 7) >> 3
        before = popcount(self.inuse[sb:eb])
        _set_bits(self.inuse, start, count, False)
        # A block committed meanwhile (or freed and held) stays in use.
        self.inuse[sb:eb] |= self.committed[sb:eb] | self.held[sb:eb]
        self._n_inuse += popcount(self.inuse[sb:eb]) - before

    def commit(self, start: int, count: int) -> None:
        self._n_committed += count - count_set(self.committed, start, count)
        self._n_inuse += count - count_set(self.inuse, start, count)
        _set_bits(self.committed, start, count, True)
        _set_bits(self.inuse, start, count, True)
        self._touch(start, count)
        if self.quarantined:
            self.quarantined -= count_set(self.held, start, count)
            _set_bits(self.held, start, count, False)

    def free(self, start: int, count: int) -> None:
        """Free committed blocks; they stay unallocatable until :meth:`release`."""
        if count <= 0:
            return
        sb, eb = start >> 3, (start + count + 7) >> 3
        mask = _range_mask(start, count)
        newly = self.committed[sb:eb] & mask & ~self.held[sb:eb]
        self.held[sb:eb] |= newly
        self.quarantined += popcount(newly)
        self._n_committed -= count_set(self.committed, start, count)
        _set_bits(self.committed, start, count, False)
        self._touch(start, count)
        self.quarantine.append((start, count))

    def take_quarantine(self) -> list[tuple[int, int]]:
        """The runs freed so far; release them once their transactions are durable."""
        runs, self.quarantine = self.quarantine, []
        return runs

    def release(self, runs: list[tuple[int, int]]) -> None:
        """The transactions that freed these runs are durable: their blocks may go."""
        for start, count in runs:
            sb, eb = start >> 3, (start + count + 7) >> 3
            gone = self.held[sb:eb] & _range_mask(start, count)
            self.quarantined -= popcount(gone)
            self.held[sb:eb] &= ~gone
            self._n_inuse -= popcount(self.inuse[sb:eb] & gone)
            self.inuse[sb:eb] &= ~gone

    def reload(self, store: MetaStore) -> None:
        """Re-read ``committed`` from the store (after a failed transaction).

        Reservations of writes in flight are kept.
        """
        reserved = self.inuse & ~self.committed
        self.committed[:] = 0
        if self.nblocks & 7:
            self.committed[-1] |= (0xFF << (self.nblocks & 7)) & 0xFF
        self.dirty_chunks.clear()
        self.load(store)
        self.inuse |= reserved
        # A rolled-back free: those blocks are committed again, not held.
        self.held &= ~self.committed
        self.quarantined = popcount(self.held)
        self._recount()

    # -- queries -----------------------------------------------------------------------
    def used_blocks(self) -> int:
        """Committed blocks (O(1): the count is kept up to date)."""
        return self._n_committed - self._pad

    def free_blocks(self) -> int:
        """Blocks not in use, quarantined ones included (they are free, only not yet
        durably so). O(1)."""
        return self.nblocks - (self._n_inuse - self._pad) + self.quarantined

    def is_free(self, start: int, count: int) -> bool:
        if start < 0 or start + count > self.nblocks:
            return False
        return count_set(self.inuse, start, count) == 0

    def next_free_run(self, pos: int, limit: int) -> tuple[int, int] | None:
        """First run of free blocks starting at or after ``pos`` (length capped at limit).

        Searches forward a window of the bitmap at a time; ``None`` when no free
        block lies at or after ``pos``.
        """
        bits = self.inuse
        nbytes = len(bits)
        byte = pos >> 3
        if 0 <= byte < nbytes:
            # Fast path, without numpy: a free block in the byte holding pos (the
            # usual case: appending to a file, or next-fit after the last new file).
            v = int(bits[byte]) | ((1 << (pos & 7)) - 1)
            if v != 0xFF:
                bit = (~v & (v + 1)).bit_length() - 1  # lowest zero bit
                start = (byte << 3) + bit
                return start, self._run_length(start, limit)
            byte += 1
        # Then windows that grow from small (free space is usually near) to _WINDOW,
        # so that a nearby free block does not cost a scan of 64 KiB of bitmap.
        step = _FIRST_WINDOW
        while byte < nbytes:
            win = bits[byte : byte + step]
            if byte == pos >> 3 and pos & 7:
                win = win.copy()
                win[0] |= (1 << (pos & 7)) - 1
            cand = np.flatnonzero(win != 0xFF)
            if len(cand) == 0:
                byte += step
                step = min(step * 16, _WINDOW)
                continue
            b = byte + int(cand[0])
            v = int(win[int(cand[0])])
            bit = (~v & (v + 1)).bit_length() - 1  # lowest zero bit
            start = (b << 3) + bit
            return start, self._run_length(start, limit)
        return None

    def _run_length(self, start: int, limit: int) -> int:
        n = min(self.nblocks, start + limit) - start
        if n <= 0:
            return 0
        # The bits as one Python int (little-endian: block start is bit 0): the lowest
        # set bit is the first used block. Cheaper than numpy for the usual short runs.
        sb = start >> 3
        word = int.from_bytes(self.inuse[sb : (start + n + 7) >> 3].tobytes(), "little")
        word = (word >> (start - (sb << 3))) & ((1 << n) - 1)
        return (word & -word).bit_length() - 1 if word else n


def allocate(
    bm: DiskBitmap, count: int, goal: int, *, min_run: int = 1
) -> list[tuple[int, int]]:
    """Reserve ``count`` blocks on one disk, as few runs as it can, starting near ``goal``.

    Tries the exact goal first (appending stays contiguous), then free runs from the
    goal forward, then from the start of the disk. Returns the reserved runs, which
    may total less than ``count`` when the disk is full; the caller gives them back
    with :meth:`DiskBitmap.unreserve` if it cannot use them.
    """
    runs: list[tuple[int, int]] = []
    need = count
    for wrapped, lo in ((False, goal), (True, 0)):
        pos = lo
        while need > 0:
            found = bm.next_free_run(pos, need)
            if found is None:
                break
            start, length = found
            if wrapped and start >= goal:
                break  # the wrapped search reached the area already searched
            take = min(need, length)
            if take < min_run and take < need:
                pos = start + length
                continue
            bm.reserve(start, take)
            runs.append((start, take))
            need -= take
            pos = start + take
        if need == 0:
            break
    return _merge(runs)


def _merge(runs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, c in runs:
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + c)
        else:
            out.append((s, c))
    return out
