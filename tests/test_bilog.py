"""Before-image logs against a model: overlaying the merged logs on any copy taken
during the writes gives back the image at T0."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdbackup.backup.bilog import BiLog, apply_log, merge_logs
from sdbackup.errors import CorruptError
from sdbackup.media.bilog import LogIndex, read_entries
from sdbackup.media.record_reader import RecordReader

BS = 512
NBLOCKS = 64


def log_first(copy: list[bytes], index: LogIndex, log: Path, block: int, count: int
              ) -> bytes:
    """Blocks [block, block+count) read log first (c.5): from the log where its index
    has them, from the copy otherwise (the model of what a generation's reader does)."""
    out = list(copy[block : block + count])
    with RecordReader(log) as r:
        for e in index.lookup(0, block, count):
            data = r.read_at(e.offset).data
            for b in range(max(e.start, block), min(e.start + e.count, block + count)):
                out[b - block] = bytes(data[(b - e.start) * BS : (b - e.start + 1) * BS])
    return b"".join(out)


writes = st.lists(
    st.tuples(st.integers(0, 2),  # node
              st.integers(0, NBLOCKS - 1),  # start
              st.integers(1, 8),  # count
              st.integers(0, 255)),  # fill byte
    min_size=1, max_size=40)


def _run(tmp: Path, ops: list[tuple[int, int, int, int]], copy_at: int, central: bool
         ) -> tuple[list[bytes], list[bytes], Path]:
    t0 = [bytes([i]) * BS for i in range(NBLOCKS)]
    disk = list(t0)
    copy: list[bytes] | None = None
    if central:
        logs = [BiLog(tmp / "central.log", block_size=BS, dedup=True)]
    else:
        logs = [BiLog(tmp / f"node{i}.log", block_size=BS) for i in range(3)]
    logged: list[set[int]] = [set() for _ in range(3)]
    for t, (node, start, count, fill) in enumerate(ops, start=1):
        if t - 1 == copy_at:
            copy = list(disk)
        count = min(count, NBLOCKS - start)
        # Each node logs the first overwrite of a block by that node (node-local dedup).
        todo = [b for b in range(start, start + count) if b not in logged[node]]
        log = logs[0] if central else logs[node]
        for b in todo:
            log.append(0, b, disk[b], ltime=t)
            logged[node].add(b)
        log.sync()
        for b in range(start, start + count):
            disk[b] = bytes([fill]) * BS
    if copy is None:
        copy = list(disk)
    for log in logs:
        log.close()
    merged = tmp / "merged.log"
    merge_logs([lg.path for lg in logs], merged, block_size=BS)
    return t0, copy, merged


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=writes, copy_frac=st.floats(0, 1), central=st.booleans())
def test_overlay_of_merged_logs_gives_t0(tmp_path_factory: pytest.TempPathFactory,
                                        ops: list[tuple[int, int, int, int]],
                                        copy_frac: float, central: bool) -> None:
    tmp = tmp_path_factory.mktemp("bilog")
    t0, copy, merged = _run(tmp, ops, int(copy_frac * len(ops)), central)
    index = LogIndex(read_entries(merged))
    assert log_first(copy, index, merged, 0, NBLOCKS) == b"".join(t0)
    # Any sub-range too (exercises partial overlaps of log records).
    assert log_first(copy, index, merged, 5, 17) == b"".join(t0[5:22])
    # Applying the merged log onto the copy as an image file gives T0 as well.
    img = tmp / "image"
    img.write_bytes(b"".join(copy))
    apply_log(merged, img, disk_id=0)
    assert img.read_bytes() == b"".join(t0)


def test_central_log_stores_each_block_once(tmp_path: Path) -> None:
    log = BiLog(tmp_path / "c.log", block_size=BS, dedup=True)
    assert log.append(0, 10, b"a" * BS * 4, ltime=1) == [(10, 4)]
    assert log.append(0, 8, b"b" * BS * 8, ltime=2) == [(8, 2), (14, 2)]
    assert log.append(1, 10, b"c" * BS, ltime=3) == [(10, 1)]
    log.close()
    ents = read_entries(tmp_path / "c.log")
    assert [(e.disk, e.start, e.count) for e in ents] == [(0, 10, 4), (0, 8, 2), (0, 14, 2),
                                                          (1, 10, 1)]


def test_index_refuses_unmerged_overlap(tmp_path: Path) -> None:
    log = BiLog(tmp_path / "n.log", block_size=BS)
    log.append(0, 1, b"x" * BS * 2, ltime=1)
    log.append(0, 2, b"y" * BS * 2, ltime=2)
    log.close()
    with pytest.raises(CorruptError, match="logged twice"):
        LogIndex(read_entries(tmp_path / "n.log"))


def test_merge_reads_a_log_cut_off_by_a_crash(tmp_path: Path) -> None:
    log = BiLog(tmp_path / "n.log", block_size=BS)
    log.append(0, 1, b"x" * BS, ltime=1)
    log.append(0, 2, b"y" * BS, ltime=2)
    log.sync()
    size = os.path.getsize(tmp_path / "n.log")
    log.writer.abort()
    with open(tmp_path / "n.log", "r+b") as f:
        f.truncate(size - 10)  # the second record is torn
    with pytest.raises(CorruptError):
        read_entries(tmp_path / "n.log")
    ents = read_entries(tmp_path / "n.log", allow_truncated=True)
    assert [(e.start, e.ltime) for e in ents] == [(1, 1)]
