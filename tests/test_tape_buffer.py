"""The disk buffer in front of a tape (c.3): LRU limit, persistence across opens,
concurrent misses batched and swept in tape order, damaged slots reloaded."""

from __future__ import annotations

import random
import threading
from pathlib import Path

from sdbackup.media.tape.buffer import TapeBuffer
from sdbackup.media.tape.device import TapeDevice
from sdbackup.media.tape.filetape import FileTape

BS = 4096


class OneDrive:
    def __init__(self, dev: TapeDevice) -> None:
        self.dev = dev

    def device_for(self, tape: str) -> TapeDevice:
        assert tape == "T"
        return self.dev


def _tape(tmp_path: Path, blocks: int = 200) -> FileTape:
    FileTape.create(tmp_path / "t", 4 << 20, max_block=64 << 10)
    t = FileTape.open(tmp_path / "t")
    for i in range(blocks):
        t.write(i.to_bytes(4, "little") * (BS // 4))
    t.write_filemarks()
    return t


def _block(i: int) -> bytes:
    return i.to_bytes(4, "little") * (BS // 4)


def test_lru_limit(tmp_path: Path) -> None:
    t = _tape(tmp_path)
    with TapeBuffer(tmp_path / "buf", OneDrive(t), slot_size=BS, limit=8 * BS,
                    readahead=0) as buf:
        for i in range(20):
            assert buf.get("T", i, 1, 200) == _block(i)
        assert len(buf) == 8
        assert [buf.cached("T", i) for i in (11, 12, 19)] == [False, True, True]
        buf.get("T", 12, 1, 200)  # now the most recent: 13 goes next
        buf.get("T", 0, 1, 200)
        assert buf.cached("T", 12) and not buf.cached("T", 13)
        assert buf.stats.evictions == 13
        assert (tmp_path / "buf" / "slots.dat").stat().st_size <= 8 * BS


def test_readahead_and_persistence_across_opens(tmp_path: Path) -> None:
    t = _tape(tmp_path)
    with TapeBuffer(tmp_path / "buf", OneDrive(t), slot_size=BS, limit=64 * BS,
                    readahead=4) as buf:
        assert buf.get("T", 10, 2, 200) == _block(10) + _block(11)
        assert [buf.cached("T", i) for i in range(10, 17)] == [True] * 6 + [False]
        assert buf.get("T", 13, 1, 15) == _block(13)
        assert buf.stats.misses == 1 and buf.stats.hits == 1
    reads = t.stats.blocks_read
    with TapeBuffer(tmp_path / "buf", OneDrive(t), slot_size=BS, limit=64 * BS,
                    readahead=4) as buf:
        assert buf.get("T", 10, 6, 200) == b"".join(_block(i) for i in range(10, 16))
        assert buf.stats.misses == 0
    assert t.stats.blocks_read == reads, "the reopened buffer read the tape again"
    # a torn slot is reloaded, never served
    with open(tmp_path / "buf" / "slots.dat", "r+b") as f:
        f.write(b"\xee" * 64)
    with TapeBuffer(tmp_path / "buf", OneDrive(t), slot_size=BS, limit=64 * BS,
                    readahead=0) as buf:
        got = b"".join(buf.get("T", i, 1, 200) for i in range(10, 16))
        assert got == b"".join(_block(i) for i in range(10, 16))
        assert buf.stats.bad_slots == 1


def test_concurrent_misses_are_swept_in_tape_order(tmp_path: Path) -> None:
    t = _tape(tmp_path)
    t.seek(100)
    wanted = random.Random(3).sample(range(0, 190, 5), 24)
    got: dict[int, bytes] = {}
    with TapeBuffer(tmp_path / "buf", OneDrive(t), slot_size=BS, limit=64 * BS,
                    readahead=0, gather=0.05) as buf:
        with buf.held():
            threads = [threading.Thread(target=lambda b=b: got.__setitem__(
                b, buf.get("T", b, 1, 200))) for b in wanted]
            for th in threads:
                th.start()
            while len(buf._loaders) < 1 or len(next(iter(buf._loaders.values())).queue) \
                    < len(wanted):
                threading.Event().wait(0.01)
        for th in threads:
            th.join()
        assert buf.stats.largest_batch == len(wanted)
    assert got == {b: _block(b) for b in wanted}
    ahead = sorted(b for b in wanted if b >= 100)
    behind = sorted(b for b in wanted if b < 100)
    assert [b for _, b in buf.stats.order] == ahead + behind  # one sweep, one jump back
    expected, pos = [], 100
    for b in ahead + behind:  # a locate only where the head is not already there
        if b != pos:
            expected.append(b)
        pos = b + 1
    assert t.stats.seeks[1:] == expected
