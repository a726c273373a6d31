"""A generation's index: (disk, block run) -> (stream, offset, kind), searched in O(log n).

On the medium the index is a record stream of its own (``index``): a LABEL, INDEX
records whose payloads are arrays of fixed-size 32-byte entries, and END; so it has the
same checksums and truncation checks as the data streams, and the same bytes can follow
the data on a tape. In memory it is a numpy structured array sorted by
(disk, start block, kind); a lookup is two binary searches (``numpy.searchsorted``).

Entry (little-endian, 32 bytes)::

    offset size field
    0      4    disk      u32  disk id (as in the records)
    4      4    count     u32  blocks in the run (= the record's block_count)
    8      8    start     u64  first block of the run (= the record's start_block)
    16     8    offset    u64  byte offset of the record's header in its stream
    24     2    stream    u16  stream number n (file stream-<n>.sdr)
    26     1    kind      u8   record kind (1 DATA, 2 BI)
    27     5    reserved  zero

Within one (disk, kind) the runs never overlap.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sdbackup.errors import CorruptError
from sdbackup.media.record_format import Kind
from sdbackup.media.record_reader import RecordReader
from sdbackup.media.record_scan import StreamDigest
from sdbackup.media.record_writer import RecordWriter

ENTRY_DTYPE = np.dtype(
    {
        "names": ["disk", "count", "start", "offset", "stream", "kind", "reserved"],
        "formats": ["<u4", "<u4", "<u8", "<u8", "<u2", "u1", "V5"],
        "offsets": [0, 4, 8, 16, 24, 26, 27],
        "itemsize": 32,
    }
)
ENTRY_SIZE = 32
ENTRIES_PER_RECORD = 32768  # 1 MiB INDEX records
INDEX_LAYOUT = "disk:u32 count:u32 start:u64 offset:u64 stream:u16 kind:u8 reserved:5"

Entries = npt.NDArray[Any]


def make_entries(disk: npt.ArrayLike, start: npt.ArrayLike, count: npt.ArrayLike,
                 offset: npt.ArrayLike, stream: npt.ArrayLike, kind: npt.ArrayLike) -> Entries:
    """An entry array from columns, sorted by (disk, start, kind)."""
    d = np.asarray(disk, dtype=np.uint32)
    e = np.zeros(d.size, dtype=ENTRY_DTYPE)
    e["disk"] = d
    e["start"] = np.asarray(start, dtype=np.uint64)
    e["count"] = np.asarray(count, dtype=np.uint32)
    e["offset"] = np.asarray(offset, dtype=np.uint64)
    e["stream"] = np.asarray(stream, dtype=np.uint16)
    e["kind"] = np.asarray(kind, dtype=np.uint8)
    order = np.lexsort((e["kind"], e["start"], e["disk"]))
    return e[order]


def write_index(path: Path, entries: Entries, label: Mapping[str, Any]) -> tuple[int, int, int]:
    """Write ``entries`` as an index stream at ``path`` (fsynced).

    Returns (bytes, records, header digest).
    """
    raw = np.ascontiguousarray(entries).view(np.uint8).reshape(-1)
    lab = {**label, "kind": "index", "entries": int(entries.size), "entry_size": ENTRY_SIZE,
           "layout": INDEX_LAYOUT}
    w = RecordWriter.create(path, label=lab)
    try:
        step = ENTRIES_PER_RECORD * ENTRY_SIZE
        for i in range(0, raw.size, step):
            w.write_record(Kind.INDEX, raw[i : i + step].tobytes(), logical_time=i // ENTRY_SIZE)
        size = w.close()
    except BaseException:
        w.abort()
        raise
    return size, w.records_written, w.header_digest


def read_index(path: Path, *, where: str) -> tuple[Entries, int, int, int]:
    """Read and check an index stream: (entries, bytes, records, digest).

    Checks the stream (checksums, sequence, END), the label's entry count and layout,
    and that each INDEX record starts at the entry its ``logical_time`` says.
    """
    parts: list[bytes] = []
    digest = StreamDigest()
    n_expected = -1
    records = 0
    size = 0
    try:
        rd = RecordReader(path, medium=str(path))
    except FileNotFoundError:
        raise CorruptError(f"{where}: index {path} is missing") from None
    with rd:
        have = 0
        for rec in rd.scan():
            digest.update(rec.header)
            records += 1
            size = rec.offset + rec.header.record_len
            if rec.kind == Kind.LABEL:
                lab = rec.json()
                if lab.get("kind") != "index" or lab.get("layout") != INDEX_LAYOUT:
                    raise CorruptError(f"{where}: {path} is not an index stream of this "
                                       f"format (label {lab})")
                n = lab.get("entries")
                if not isinstance(n, int) or n < 0:
                    raise CorruptError(f"{where}: index label has no entry count")
                n_expected = n
            elif rec.kind == Kind.INDEX:
                if len(rec.data) % ENTRY_SIZE or rec.header.logical_time != have:
                    raise CorruptError(
                        f"{where}: INDEX record at offset {rec.offset} of {path} holds "
                        f"{len(rec.data)} bytes starting at entry {rec.header.logical_time}, "
                        f"expected whole {ENTRY_SIZE}-byte entries from entry {have}")
                have += len(rec.data) // ENTRY_SIZE
                parts.append(rec.data)
            elif rec.kind != Kind.END:
                raise CorruptError(f"{where}: unexpected {rec.kind.name} record at offset "
                                   f"{rec.offset} of index {path}")
    blob = b"".join(parts)
    entries = np.frombuffer(blob, dtype=ENTRY_DTYPE).copy()
    if entries.size != n_expected:
        raise CorruptError(f"{where}: index {path} holds {entries.size} entries, its label "
                           f"says {n_expected}")
    if entries.size and np.frombuffer(blob, dtype=np.uint8).reshape(-1, ENTRY_SIZE)[:, 27:].any():
        raise CorruptError(f"{where}: index {path} has reserved bytes set")
    return entries, size, records, digest.intdigest()


def check_entries(entries: Entries, disks: Mapping[int, int], nstreams: int,
                  stream_sizes: Mapping[int, int] | None = None) -> list[str]:
    """Problems of an entry array: order, overlaps, bounds (``disks``: id -> nblocks)."""
    out: list[str] = []
    if entries.size == 0:
        return out
    d = entries["disk"].astype(np.int64)
    s = entries["start"].astype(np.uint64)
    c = entries["count"].astype(np.int64)
    k = entries["kind"].astype(np.int64)
    if (c <= 0).any():
        out.append("an index entry has block count 0")
    bad_kind = ~np.isin(k, [int(Kind.DATA), int(Kind.BI)])
    if bad_kind.any():
        out.append(f"index entry kinds {sorted(set(k[bad_kind].tolist()))} are not DATA or BI")
    if (entries["stream"] >= nstreams).any():
        out.append(f"an index entry names a stream beyond the {nstreams} listed")
    unknown = ~np.isin(d, np.array(list(disks), dtype=np.int64))
    if unknown.any():
        out.append(f"index entries name unknown disk ids {sorted(set(d[unknown].tolist()))}")
        return out
    if (s >= np.uint64(1 << 62)).any():
        out.append("an index entry starts beyond any disk")
        return out
    si = s.astype(np.int64)
    nb = _lookup(d, disks)
    if (si + c > nb).any():
        i = int(np.flatnonzero(si + c > nb)[0])
        out.append(f"index entry for disk id {int(d[i])} blocks {int(si[i])}+{int(c[i])} lies "
                   f"beyond the disk's {int(nb[i])} blocks")
    key_order = np.lexsort((k, si, d))
    if (key_order != np.arange(d.size)).any():
        out.append("index entries are not sorted by (disk, start, kind)")
        return out
    for kind in (int(Kind.DATA), int(Kind.BI)):
        sel = k == kind
        dd, ss, cc = d[sel], si[sel], c[sel]
        same = dd[1:] == dd[:-1]
        if (same & (ss[1:] < ss[:-1] + cc[:-1])).any():
            out.append(f"{Kind(kind).name} index entries overlap")
    if stream_sizes is not None:
        off = entries["offset"].astype(np.int64)
        for n, size in stream_sizes.items():
            sel = entries["stream"] == n
            if sel.any() and int(off[sel].max()) >= size:
                out.append(f"an index entry points past the end of stream {n}")
    return out


def _lookup(d: npt.NDArray[np.int64], disks: Mapping[int, int]) -> npt.NDArray[np.int64]:
    keys = np.array(sorted(disks), dtype=np.int64)
    vals = np.array([disks[int(x)] for x in keys], dtype=np.int64)
    return vals[np.searchsorted(keys, d)]


class BlockIndex:
    """Lookup of the records holding a block range, per (disk, kind)."""

    def __init__(self, entries: Entries) -> None:
        self.entries = entries
        self._by: dict[tuple[int, int], tuple[Entries, npt.NDArray[np.int64],
                                               npt.NDArray[np.int64]]] = {}
        d = entries["disk"]
        k = entries["kind"]
        for disk in np.unique(d).tolist():
            for kind in np.unique(k[d == disk]).tolist():
                sel = entries[(d == disk) & (k == kind)]
                starts = sel["start"].astype(np.int64)
                ends = starts + sel["count"].astype(np.int64)
                self._by[(int(disk), int(kind))] = (sel, starts, ends)

    def __len__(self) -> int:
        return int(self.entries.size)

    def find(self, disk_id: int, kind: int, block: int, count: int) -> Entries:
        """Entries of ``kind`` on ``disk_id`` that hold any of ``block .. block+count-1``,
        in block order (two binary searches)."""
        got = self._by.get((disk_id, kind))
        if got is None:
            return self.entries[:0]
        sel, starts, ends = got
        lo = int(np.searchsorted(starts, block, side="right")) - 1
        if lo < 0:
            lo = 0
        elif ends[lo] <= block:
            lo += 1
        hi = int(np.searchsorted(starts, block + count, side="left"))
        return sel[lo:hi]

    def for_disk(self, disk_id: int, kind: int = int(Kind.DATA)) -> Entries:
        got = self._by.get((disk_id, kind))
        return self.entries[:0] if got is None else got[0]
