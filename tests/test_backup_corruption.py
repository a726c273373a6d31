"""Nothing on a medium is trusted: damage anywhere is a clear error, never wrong data.

Every field of a DATA record's header is damaged in a real generation; ``verify`` names
the generation, the disk, the blocks and the medium offset and exits 1, and reading
those blocks (restore) fails with exit 5. Also: payloads, truncated streams, the index,
the snapshot, manifests (damaged, of another cluster), not-a-medium, unknown ids.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_backup_support import backup, cli, gen_dir, make_cluster, make_tree, put_tree

from sdbackup.errors import CorruptError
from sdbackup.media.generation import Generation, GenerationReader
from sdbackup.media.medium import MANIFEST
from sdbackup.media.record_format import Kind
from sdbackup.media.record_reader import RecordReader

HEADER_FIELDS = [  # name, offset, size (docs/FORMAT.md)
    ("magic", 0, 4), ("version", 4, 2), ("kind", 6, 1), ("flags", 7, 1),
    ("disk_id", 8, 4), ("block_count", 12, 4), ("start_block", 16, 8),
    ("logical_time", 24, 8), ("seq", 32, 8), ("payload_len", 40, 4), ("raw_len", 44, 4),
    ("payload_checksum", 48, 8), ("header_checksum", 56, 8),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    base = tmp_path_factory.mktemp("corrupt")
    cdir = make_cluster(base / "c")
    put_tree(cdir, make_tree(base / "tree"))
    res = backup(cdir, base / "medium")
    return base / "medium", res.manifest.id


@pytest.fixture
def medium(pristine: tuple[Path, str], tmp_path: Path) -> tuple[Path, str]:
    src, gid = pristine
    dst = tmp_path / "medium"
    shutil.copytree(src, dst)
    return dst, gid


def _data_records(medium: Path, gid: str) -> list[tuple[int, int, int, int]]:
    """(offset, disk id, start, count) of every DATA record of stream 0."""
    with RecordReader(gen_dir(medium, gid) / "stream-0.sdr") as rd:
        return [(r.offset, r.header.disk_id, r.header.start_block, r.header.block_count)
                for r in rd.scan(payloads=False) if r.kind == Kind.DATA]


def _flip(path: Path, offset: int, xor: int = 0xFF) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ xor]))


@pytest.mark.parametrize("field,at,size", HEADER_FIELDS, ids=[f[0] for f in HEADER_FIELDS])
def test_every_header_field_damaged(medium: tuple[Path, str], field: str, at: int,
                                    size: int) -> None:
    path, gid = medium
    recs = _data_records(path, gid)
    off, disk_id, start, count = recs[len(recs) // 2]
    disk = {1: "d0", 2: "d1"}[disk_id]
    _flip(gen_dir(path, gid) / "stream-0.sdr", off + at + size - 1)
    r = cli("verify", "--medium", path)
    assert r.code == 1, (field, r.out, r.err)
    lines = [ln for ln in r.out.splitlines() if ln.startswith("verify:")]
    first = lines[0]
    assert f"generation {gid}" in first
    assert f"disk {disk} blocks {start}..{start + count - 1}" in first
    assert f"offset {off}" in first
    # reading those blocks fails too, with the same names, and exit code 5
    with GenerationReader.open(path) as g, pytest.raises(CorruptError) as ei:
        g.read(disk, start, count)
    msg = ei.value.message
    assert gid in msg and f"disk {disk} blocks {start}.." in msg and f"offset {off}" in msg
    r = cli("restore-image", "--medium", path, "--disk", disk, "--to", path.parent / "img")
    assert r.code == 5 and gid in r.err
    assert not (path.parent / "img").exists()


def test_payload_byte_damaged(medium: tuple[Path, str], tmp_path: Path) -> None:
    path, gid = medium
    off = _data_records(path, gid)[1][0]
    _flip(gen_dir(path, gid) / "stream-0.sdr", off + 64 + 7, 0x01)
    r = cli("verify", "--medium", path, gid)
    assert r.code == 1
    assert "payload checksum mismatch" in r.out and f"offset {off}" in r.out
    r = cli("restore", "--medium", path, "--to", tmp_path / "out")
    assert r.code == 5 and "payload checksum mismatch" in r.err
    # an undamaged record still reads fine
    with GenerationReader.open(path) as g:
        _, d0, s0, c0 = _data_records(path, gid)[0]
        assert len(g.read(d0, s0, c0)) == c0 * g.block_size


def test_truncated_stream(medium: tuple[Path, str], tmp_path: Path) -> None:
    path, gid = medium
    stream = gen_dir(path, gid) / "stream-0.sdr"
    recs = _data_records(path, gid)
    off, _, start, _ = recs[-3]
    os.truncate(stream, off + 100)
    r = cli("verify", "--medium", path)
    assert r.code == 1
    assert "truncated" in r.out and f"offset {off}" in r.out and f"blocks {start}.." in r.out
    assert "could not be verified" in r.out
    r = cli("restore", "--medium", path, "--to", tmp_path / "out")
    assert r.code == 5 and "truncated" in r.err and f"block {start}" in r.err


def test_index_and_snapshot_damage(medium: tuple[Path, str], tmp_path: Path) -> None:
    path, gid = medium
    d = gen_dir(path, gid)
    shutil.copy(d / "index", tmp_path / "index.good")
    _flip(d / "index", os.path.getsize(d / "index") - 100)
    r = cli("verify", "--medium", path)
    assert r.code == 1 and "index" in r.out
    assert cli("restore", "--medium", path, "--to", tmp_path / "o1").code == 5
    shutil.copy(tmp_path / "index.good", d / "index")
    _flip(d / "meta.db", 5000)
    r = cli("verify", "--medium", path)
    assert r.code == 1 and "metadata snapshot" in r.out and "damaged" in r.out
    r = cli("restore", "--medium", path, "--to", tmp_path / "o2")
    assert r.code == 5 and "metadata snapshot" in r.err


def test_manifest_damaged_or_foreign(medium: tuple[Path, str], tmp_path: Path) -> None:
    path, gid = medium
    mpath = gen_dir(path, gid) / MANIFEST
    good = mpath.read_bytes()
    # one changed number, checksum not updated
    mpath.write_bytes(good.replace(b'"block_size": 512', b'"block_size": 1024'))
    r = cli("generations", "--medium", path)
    assert r.code == 5 and "checksum mismatch" in r.err and gid not in r.out.split("\n", 1)[1]
    r = cli("verify", "--medium", path, gid)
    assert r.code == 5 and "damaged" in r.err
    # a valid manifest of another cluster
    doc = json.loads(good)
    other = "00000000-0000-0000-0000-000000000000"
    doc["cluster_id"] = other
    from sdbackup.media.medium import Manifest, _manifest_checksum

    doc.pop("checksum")
    doc["checksum"] = _manifest_checksum(doc)
    mpath.write_text(json.dumps(doc))
    Manifest.from_json(mpath.read_bytes(), "x")  # valid in itself
    r = cli("generations", "--medium", path, "--json")
    assert r.code == 5
    inv = json.loads(r.out)["invalid"]
    assert inv[0]["id"] == gid and "belongs to cluster " + other in inv[0]["problem"]
    for args in (["verify", "--medium", path], ["restore", "--medium", path, gid, "--to",
                                                tmp_path / "o"]):
        r = cli(*args)
        assert r.code == 5 and "another medium" in r.err, r.err
    r = cli("restore", "--medium", path, gid, "--to", tmp_path / "o")
    assert r.code == 5 and other in r.err
    # gc leaves damaged or foreign generations alone
    assert cli("gc", "--medium", path).code == 0 and mpath.exists()


def test_not_a_medium(medium: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = medium
    for cmd in (["generations"], ["verify"], ["gc"]):
        r = cli(*cmd, "--medium", tmp_path / "nowhere")
        assert r.code == 4 and "does not exist" in r.err
        (tmp_path / "plain").mkdir(exist_ok=True)
        (tmp_path / "plain" / "x").write_text("x")
        r = cli(*cmd, "--medium", tmp_path / "plain")
        assert r.code == 2 and "not an sdbackup medium" in r.err
    cdir = make_cluster(tmp_path / "c2", disks=(1 << 20,))
    r = cli("backup", cdir, "--medium", tmp_path / "plain")
    assert r.code == 2 and "not an sdbackup medium" in r.err
    (path / "sdbackup-medium.json").write_text("{broken")
    r = cli("generations", "--medium", path)
    assert r.code == 5 and "damaged" in r.err


def test_unknown_generation(medium: tuple[Path, str], tmp_path: Path) -> None:
    path, gid = medium
    r = cli("verify", "--medium", path, "20990101T000000.000000Z-00000000")
    assert r.code == 4 and "is not on medium" in r.err and gid in r.err
    r = cli("restore-image", "--medium", path, "29990101T00", "--disk", "d0",
            "--to", tmp_path / "i")
    assert r.code == 4
    r = cli("restore-image", "--medium", path, "--disk", "nope", "--to", tmp_path / "i")
    assert r.code == 2 and "no disk 'nope'" in r.err
    # an unfinished generation (no manifest) is named as such
    unfinished = path / "generations" / "20200101T000000.000000Z-0badc0de"
    unfinished.mkdir()
    r = cli("verify", "--medium", path, "20200101T000000.000000Z-0badc0de")
    assert r.code == 4 and "never committed" in r.err
    assert Generation.open(path).id == gid
