"""A dispersed copy (seed a.12, Fig. 27): one generation, one T0, many copiers and media.

The backup engine freezes once, lists the plan (the used blocks at T0) and arms the
before-image window as for any online backup; then, instead of copying the plan
itself, it hands it to a :class:`PartCopier`, which splits it into *parts* and has
copiers (node agents, each reading the shared disks itself) write each part as one
record stream on a medium of their own. The engine commits the generation once every
part is durable, with the parts, their media and their checksums in the manifest.

This module is the backup layer's half, free of the protocol:

* :func:`split_plan` -- the plan cut into parts: ranges of the disks balanced by used
  blocks (a part ends at a disk's end or at the block where its share is full), or
  whole disks (Fig. 27: "the device name of the disk to be copied");
* :func:`stream_numbers` -- which stream number each part gets (stream 1 stays the
  before-image log's, as in every online generation);
* :class:`PartDone` -- what a copier reports for a finished part: where it is, its
  size, record count and header digest, and one row per DATA record for the index;
* :class:`PartsResult` -- every part of the generation, merged into the copy result and
  the manifest keys (``parts``, ``media``, ``copiers``; see docs/FORMAT.md);
* :class:`PartCopier` -- the protocol the engine calls (the coordinator's
  implementation, ``cluster/dispersed.py``, reaches the nodes).

Why before images need nothing new: a copier reads the live disks after the thaw, as
the central copier does; a block overwritten after T0 may be read new, but its before
image (the oldest, logged before the overwrite reached the disk) is in the
generation's BI stream and wins over the DATA record at read time. Who read the block
does not matter, so every log mode works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from sdbackup.backup.copy import CopyResult
from sdbackup.blocks.blockset import BlockSet
from sdbackup.errors import UsageError
from sdbackup.media.medium import PARTS_DIR, FileEntry, stream_name

SPLITS = ("ranges", "disks")
PART_BYTES = 256 << 20
"""Default size of a part (used bytes): a lost copier costs at most its part in flight;
parts this large keep each copier's reads long and sequential."""
ROW_DTYPE = np.dtype("<i8")
"""A part's index rows travel as little-endian int64 quadruples (disk, start, count,
offset), one per DATA record, in stream order."""



def part_file(gen_id: str, stream: int, attempt: int, *, primary: bool) -> str:
    """Where part ``stream`` lies, relative to its medium's root: in the generation's
    directory on the medium that commits it, under ``parts/`` on any other. A second
    attempt (after its copier was lost) gets a file of its own, so a fenced copier that
    still writes cannot touch it."""
    base = stream_name(stream)
    if attempt:
        base = base.removesuffix(".sdr") + f".try{attempt}.sdr"
    return f"{'generations' if primary else PARTS_DIR}/{gen_id}/{base}"


def split_plan(disks: Mapping[int, BlockSet], copiers: int, *, split: str = "ranges",
               part_bytes: int = PART_BYTES, block_size: int = 4096
               ) -> list[dict[int, BlockSet]]:
    """The plan cut into parts, in disk and block order.

    ``ranges``: consecutive ranges holding about the same number of used blocks, at
    least ``copiers`` of them (when there are that many blocks) and none much larger
    than ``part_bytes``; a part never spans two disks. ``disks``: one part per disk
    that has used blocks. Every planned block is in exactly one part.
    """
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}: use {' or '.join(SPLITS)}")
    live = {d: b for d, b in disks.items() if b}
    if split == "disks":
        return [{d: b.copy()} for d, b in live.items()]
    total = sum(len(b) for b in live.values())
    if total == 0:
        return []
    per = max(1, part_bytes // block_size)
    nparts = max(min(copiers, total), -(-total // per))
    # Each disk gets parts in proportion to its used blocks (at least one): cuts stay
    # inside disks, and every part is about total / nparts blocks.
    out: list[dict[int, BlockSet]] = []
    for d, b in live.items():
        k = max(1, round(nparts * len(b) / total))
        runs = b.runs_array()
        ends = np.cumsum(runs[:, 1])  # used blocks up to the end of each run
        n = len(b)
        lo_block = 0
        for i in range(1, k + 1):
            want = n * i // k  # used blocks in parts 1..i
            if i == k:
                hi_block = int(runs[-1, 0] + runs[-1, 1])
            else:
                j = int(np.searchsorted(ends, want, side="left"))
                before = int(ends[j - 1]) if j else 0
                hi_block = int(runs[j, 0]) + (want - before)
            if hi_block <= lo_block:
                continue
            piece = b & BlockSet.from_runs([(lo_block, hi_block - lo_block)])
            if piece:
                out.append({d: piece})
            lo_block = hi_block
    return out


def stream_numbers(count: int, *, online: bool) -> list[int]:
    """Stream numbers for ``count`` parts: 0, 2, 3, ... when the generation has a
    before-image log (stream 1, as in every online generation), else 0, 1, 2, ..."""
    nums = [n for n in range(count + 1) if not (online and n == 1)]
    return nums[:count]


def rows_to_bytes(result: CopyResult) -> bytes:
    """A part's index rows (see :data:`ROW_DTYPE`) for the part-done message."""
    a = np.empty((result.records, 4), dtype=ROW_DTYPE)
    if result.records:
        a[:, 0] = result.disk
        a[:, 1] = result.start
        a[:, 2] = result.count
        a[:, 3] = result.offset
    return a.tobytes()


def rows_from_bytes(blob: bytes, records: int) -> npt.NDArray[np.int64]:
    """The rows of a part-done message, checked for size (UsageError otherwise)."""
    if len(blob) != records * 4 * ROW_DTYPE.itemsize:
        raise UsageError(f"part done: {len(blob)} bytes of index rows for {records} records")
    return np.frombuffer(blob, dtype=ROW_DTYPE).reshape(records, 4).astype(np.int64)


@dataclass
class PartDone:
    """A part a copier finished: its record stream is closed (END) and fsynced."""

    stream: int
    node: str
    medium_id: str
    medium_path: str
    file: str
    attempt: int
    bytes: int
    records: int
    digest: int
    blocks: int
    read_bytes: int
    batches: int
    seconds: float
    rows: npt.NDArray[np.int64]

    def file_entry(self) -> FileEntry:
        return FileEntry(stream_name(self.stream), self.bytes, self.digest, self.records)


@dataclass
class PartsResult:
    """Every part of a generation: the merged copy result (one row per DATA record,
    with its stream number in ``streams``) and what the manifest says of them."""

    parts: list[PartDone]
    copy: CopyResult = field(default_factory=CopyResult)
    streams: list[int] = field(default_factory=list)
    copiers: dict[str, dict[str, Any]] = field(default_factory=dict)
    reassigned: list[dict[str, Any]] = field(default_factory=list)
    split: str = "ranges"

    def __post_init__(self) -> None:
        c = self.copy
        for p in sorted(self.parts, key=lambda p: p.stream):
            r = p.rows
            c.disk += r[:, 0].tolist()
            c.start += r[:, 1].tolist()
            c.count += r[:, 2].tolist()
            c.offset += r[:, 3].tolist()
            self.streams += [p.stream] * len(r)
            c.blocks += p.blocks
            c.read_bytes += p.read_bytes
            c.batches += p.batches

    def file_entries(self) -> dict[int, FileEntry]:
        return {p.stream: p.file_entry() for p in self.parts}

    def manifest_keys(self, primary_medium_id: str) -> dict[str, Any]:
        """``parts``, ``media`` and ``dispersed`` for the manifest (docs/FORMAT.md)."""
        media: dict[str, dict[str, Any]] = {}
        for p in self.parts:
            if p.medium_id == primary_medium_id:
                continue
            e = media.setdefault(p.medium_id, {"path": p.medium_path, "nodes": []})
            if p.node not in e["nodes"]:
                e["nodes"].append(p.node)
        return {
            "parts": [{"stream": p.stream, "node": p.node, "medium": p.medium_id,
                       "file": p.file, "attempt": p.attempt, "blocks": p.blocks,
                       "seconds": round(p.seconds, 3)}
                      for p in sorted(self.parts, key=lambda p: p.stream)],
            "media": media,
            "dispersed": {"split": self.split, "copiers": self.copiers,
                          "reassigned": self.reassigned},
        }


class PartCopier(Protocol):
    """Copies the plan as parts on several copiers (see the module docstring)."""

    def copy(self, gen_id: str, gdir: Path, medium_id: str, disks: dict[int, BlockSet],
             streams: Callable[[int], Sequence[int]],
             progress: Callable[[int], None] | None,
             aborted: Callable[[], str | None]) -> PartsResult:
        """Copy ``disks`` (the plan) as parts; ``streams(n)`` gives the stream numbers
        of ``n`` parts; ``aborted()`` says why the backup was aborted meanwhile (then
        raise). Returns once every part is durable; raises (and has every copier drop
        what it wrote) otherwise."""
        ...
