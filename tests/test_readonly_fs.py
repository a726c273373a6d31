"""One file-system code over any source: a generation read through the read-only file
system answers exactly as the live cluster did at T0.

The live cluster (embedded) holds a tree with holes, hard links, symlinks, empty and
large sparse files and nested directories; every answer of the live file system is
recorded (getattr of every inode, every directory listing with its attributes, every
symlink target, every file's whole contents and reads at odd offsets), then the cluster
is backed up and changed afterwards. The read-only file system over (the generation's
T0 metadata snapshot, the generation's blocks) must give the recorded answers, byte for
byte, and nothing of the later changes.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import make_cluster

from sdbackup.backup.engine import BackupOptions, run_backup
from sdbackup.cluster.backup_source import LocalClusterSource
from sdbackup.cluster.local import open_cluster
from sdbackup.errors import FsError
from sdbackup.fs.readonly import ReadOnlyFileSystem
from sdbackup.media.generation import Generation, GenerationReader
from sdbackup.media.snapshot import SnapshotMeta
from sdbackup.types import ROOT_INODE

MiB = 1 << 20


def _build(fs: Any) -> None:
    """A tree with every shape the reader must get right."""
    rng = random.Random(11)
    d = fs.mkdir(ROOT_INODE, b"dir").ino
    sub = fs.mkdir(d, b"sub").ino
    fs.mkdir(sub, b"empty-dir")
    small = fs.create(d, b"small.txt").ino
    fs.write(small, 0, b"hello, world\n" * 100)
    holes = fs.create(d, b"holes.bin").ino  # data, a hole, data, a hole at the end
    fs.write(holes, 0, rng.randbytes(3000))
    fs.write(holes, 200_000, rng.randbytes(5000))
    fs.truncate(holes, 400_000)
    sparse = fs.create(sub, b"sparse.img").ino  # large and mostly holes
    for off in (0, 7 * MiB + 123, 13 * MiB):
        fs.write(sparse, off, rng.randbytes(70_000))
    fs.truncate(sparse, 16 * MiB)
    fs.create(d, b"empty")
    multi = fs.create(sub, b"multi.bin").ino  # several extents, partial last block
    for k in range(12):
        fs.write(multi, k * 40_000 + k, rng.randbytes(9_999))
    fs.link(small, sub, b"hardlink-to-small")
    fs.symlink(d, b"link-rel", b"sub/multi.bin")
    fs.symlink(ROOT_INODE, b"link-abs", b"/dir/small.txt")
    fs.symlink(ROOT_INODE, b"dangling", b"/no/such/file")
    fs.setattr(multi, mode=0o640, mtime_ns=1_234_567_890_123_456_789)


def _answers(fs: ReadOnlyFileSystem) -> dict[str, Any]:
    """Every answer the read half of the file system gives about the whole tree."""
    out: dict[str, Any] = {"statfs_block_size": fs.statfs().block_size}
    todo = [(b"/", ROOT_INODE)]
    rng = random.Random(5)
    while todo:
        path, ino = todo.pop()
        a = fs.getattr(ino)
        out[f"getattr {path!r}"] = a
        if a.is_dir:
            ents = list(fs.listdir(ino))
            out[f"readdir {path!r}"] = [(e.name, e.attr) for e in ents]
            for e in ents:
                todo.append((path.rstrip(b"/") + b"/" + e.name, e.attr.ino))
                assert fs.lookup(ino, e.name) == e.attr
        elif a.is_link:
            out[f"readlink {path!r}"] = fs.readlink(ino)
        elif a.is_reg:
            out[f"read {path!r}"] = fs.read(ino, 0, a.size + 4096)  # short at the end
            for _ in range(5):
                off = rng.randrange(0, a.size + 2) if a.size else 0
                out[f"read {path!r} @{off}"] = fs.read(ino, off, rng.randrange(1, 300_000))
    out["resolve"] = fs.resolve("/dir/link-rel")  # follows a symlink through the seam
    with pytest.raises(FsError):
        fs.resolve("/dangling")
    return out


def test_a_generation_reads_as_the_live_file_system_did_at_t0(tmp_path: Path) -> None:
    cdir = make_cluster(tmp_path / "c", block_size=512, disks=(32 * MiB, 8 * MiB))
    medium = tmp_path / "medium"
    with open_cluster(cdir) as c:
        _build(c.fs)
        live = _answers(c.fs)
        res = run_backup(LocalClusterSource(c), medium, BackupOptions(compression="zstd"))
        # Changes after T0 must not show in the generation.
        small = c.fs.resolve("/dir/small.txt").ino
        c.fs.write(small, 0, b"CHANGED")
        c.fs.unlink(c.fs.resolve("/dir/sub").ino, b"multi.bin")
        c.fs.create(ROOT_INODE, b"after-t0")
        assert c.fs.read(small, 0, 7) == b"CHANGED"
    gen = Generation.open(medium, res.manifest.id)
    with SnapshotMeta(gen.meta_file(), f"generation {gen.id}") as meta, \
            GenerationReader(gen) as blocks:
        backup = _answers(ReadOnlyFileSystem(meta, blocks))
    assert backup.keys() == live.keys()
    for k in live:
        assert backup[k] == live[k], k


def test_the_read_half_has_no_way_to_write(tmp_path: Path) -> None:
    """The read-only file system offers no write, create, unlink or truncate: a mount of
    a backup built on it cannot change anything (the writable one adds them)."""
    for name in ("write", "create", "mkdir", "unlink", "rename", "truncate", "setattr",
                 "symlink", "link", "rmdir", "fsync"):
        assert not hasattr(ReadOnlyFileSystem, name), name
    assert os.path.exists(tmp_path)
