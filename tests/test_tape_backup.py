"""A backup straight to tape with no coordinator (Fig. 36), on file-backed tapes: a
tape set too small fails the backup cleanly, naming the tape, and commits nothing;
given a blank tape, the next backup continues on it and restores. And the spool: a
copy slower than the drive makes the drive stop once per spool-full, not per block.
(The online backup with writers and a separate log: tests/test_tape_online.py.)"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from test_backup_support import cli, diff_trees, make_cluster, make_tree, put_tree

from sdbackup.media.tape.catalog import TapeCatalog
from sdbackup.media.tape.filetape import FileTape, TapeModel
from sdbackup.media.tape.format import (
    SpooledPart,
    TapeSetWriter,
    new_label,
    read_piece,
    write_label,
)

KiB, MiB = 1 << 10, 1 << 20


def test_a_full_tape_set_fails_the_backup_cleanly_then_a_blank_tape_continues_it(
        tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path / "c")
    tree = make_tree(tmp_path / "tree")
    (tree / "big.bin").write_bytes(os.urandom(1_500_000))
    put_tree(cluster, tree)
    t1, t2 = tmp_path / "t1.tape", tmp_path / "t2.tape"
    # About 1.5 MiB before the early warning: the label, a part header, four blocks.
    FileTape.create(t1, 2 * MiB, early_warning=512 * KiB, max_block=256 * KiB)
    FileTape.create(t2, 64 * MiB, max_block=256 * KiB)
    cat, spool = tmp_path / "catalog", tmp_path / "spool"
    common = ["--catalog", cat, "--spool", spool, "--compress", "none", "-q"]

    r = cli("backup", cluster, "--tape", f"file:{t1}", *common)
    assert r.code == 6, (r.code, r.err)
    assert len(r.err.strip().splitlines()) == 1, r.err
    cat_ = TapeCatalog(cat)
    (set_id,) = cat_.sets()
    (tape1,) = cat_.tapes(set_id)
    assert f"tape {tape1}" in r.err and f"file:{t1} is full" in r.err, r.err
    assert "blank tape for #2" in r.err and "was not committed" in r.err, r.err
    failed = re.search(r"generation (\S+) was not committed", r.err)
    assert failed is not None
    assert cat_.generation_ids(set_id) == []
    assert list((cat / set_id / "generations").iterdir()) == []  # nothing left behind
    rb = cli("tape", "catalog", "--rebuild", "--tape", f"file:{t1}", "--catalog",
             tmp_path / "cat-r1", "--json")
    assert rb.code == 0, rb.err
    assert json.loads(rb.out)["incomplete"] == [failed.group(1)]

    # Given a blank tape after the set's full one, the backup continues on it.
    r = cli("backup", cluster, "--tape", f"file:{t1}", "--tape", f"file:{t2}", *common,
            "--json")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    assert s["tape"]["set"] == set_id and s["tape"]["tapes"][0] == tape1
    assert len(s["tape"]["tapes"]) == 2
    assert cat_.generation_ids(set_id) == [s["generation"]]
    out = tmp_path / "restored"
    r = cli("restore", "--tape", f"file:{t1}", "--tape", f"file:{t2}", "--buffer",
            tmp_path / "buf", "--catalog", cat, s["generation"], "--to", out, "-q")
    assert r.code == 0, r.err
    assert diff_trees(tree, out / "tree", times=False) == []
    rb = cli("tape", "catalog", "--rebuild", "--tape", f"file:{t1}", "--tape",
             f"file:{t2}", "--catalog", tmp_path / "cat-r2", "--json")
    assert rb.code == 0, rb.err
    got = json.loads(rb.out)
    assert got["generations"] == [s["generation"]]
    assert got["incomplete"] == [failed.group(1)]


def test_a_backup_to_tape_refuses_what_a_tape_cannot_take(tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path / "c")
    t = tmp_path / "t.tape"
    FileTape.create(t, 8 * MiB, max_block=256 * KiB)
    r = cli("backup", cluster, "--tape", f"file:{t}", "--log-mode", "inline", "--catalog",
            tmp_path / "cat")
    assert r.code == 2 and "--log-mode separate" in r.err, r.err
    r = cli("backup", cluster, "--tape", f"file:{t}", "--medium", tmp_path / "m")
    assert r.code == 2 and "not both" in r.err, r.err
    r = cli("backup", cluster, "--spool", tmp_path / "sp", "--medium", tmp_path / "m")
    assert r.code == 2 and "go with --tape" in r.err, r.err


def _stream_through_spool(tmp_path: Path, name: str, spool_bytes: int, data: bytes
                          ) -> tuple[int, int]:
    """Write ``data`` as a part through a spool of ``spool_bytes``, 64 KiB every 8 ms (a
    copy at ~8 MB/s, slower than the drive); (backhitches, bursts). The part reads back
    as written."""
    path = tmp_path / f"{name}.tape"
    # A drive whose buffer covers 12 ms of streaming: a longer gap stops it (a tape
    # block takes the copy 32 ms here, a burst of the spool's blocks 1 ms each).
    FileTape.create(path, 64 * MiB, model=TapeModel(drive_buffer=4 * MiB),
                    max_block=256 * KiB)
    with FileTape.open(path) as dev:
        label = new_label("cluster")
        write_label(dev, label)
        w = TapeSetWriter(dev, label, [], next_label=lambda d, n: label)
        sp = SpooledPart(w, "gen", "stream-0.sdr", tmp_path / "spool", spool_bytes)
        for i in range(0, len(data), 64 * KiB):
            sp.write(data[i:i + 64 * KiB])
            time.sleep(0.008)
        (piece,) = sp.close()
        assert piece.offset == 0 and piece.length == len(data)
        hitches = dev.stats.backhitches
        assert read_piece(dev, piece, label.block_size) == data
    return hitches, sp.bursts


def test_the_spool_keeps_the_drive_streaming_while_a_slower_copy_fills_it(
        tmp_path: Path) -> None:
    data = os.urandom(8 * MiB + 1234)
    small = _stream_through_spool(tmp_path, "small", 512 * KiB, data)  # two tape blocks
    big = _stream_through_spool(tmp_path, "big", 4 * MiB, data)
    # Two blocks of spool: the drive stops after nearly every other block.
    assert small[0] >= 12 and small[1] >= 12, small
    # 4 MiB of spool: a burst per 4 MiB, then the rest at the end; the drive stops
    # before each (and rarely within one, when this host is slow to hand it a block).
    assert big[1] <= 2 and big[0] <= 4, big
