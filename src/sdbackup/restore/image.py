"""Restore whole disks (images) and whole clusters from a generation.

``restore_image`` rebuilds one disk as it was at T0: a regular file is created sparse,
so blocks that were unused at T0 stay holes; every stored block is written at its
place. Records are read in medium order, verified and decompressed by a few threads
ahead of the writer. On a block device the unused blocks are not written (the cluster's
file system never reads them).

``restore_cluster`` is disaster recovery: a new cluster directory whose disks and
metadata equal the backup at T0. Decision: the restored cluster gets a **new cluster
id**; the disk labels (block 0) are rewritten with it and the metadata store records
where it came from (``restored_from_cluster``, ``restored_from_generation``). Two live
clusters must never share an id: disks of one would be accepted by the other, and their
backups would mix on one medium. Disk ids, names, block counts, every file, extent and
allocation bit stay exactly as at T0, so ``sdbackup fsck`` accepts the new cluster and
its files equal the originals. Backups of the restored cluster go to a new medium.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
import stat
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sdbackup.blocks.device import BlockDevice, holds_data
from sdbackup.blocks.disk_access import supports_direct
from sdbackup.blocks.durable import sync_dir, write_atomic
from sdbackup.blocks.label import make_label, read_label
from sdbackup.cluster.config import CONFIG_NAME, ClusterConfig, DiskConfig
from sdbackup.errors import CorruptError, NoSpaceError, NotFoundError, UsageError
from sdbackup.media.chain import GenerationSource
from sdbackup.media.generation import Generation
from sdbackup.media.medium import Manifest
from sdbackup.media.record_format import Kind
from sdbackup.meta import fsck as fsck_mod
from sdbackup.meta.store import MetaStore
from sdbackup.meta.tracking import TOKEN_KEY


@dataclass
class ImageStats:
    disk: str
    path: str
    blocks: int = 0
    bytes: int = 0
    size: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"disk": self.disk, "path": self.path, "blocks": self.blocks,
                "bytes": self.bytes, "size": self.size}


def _whole_cluster_only(m: Manifest, what: str) -> None:
    """A group generation holds the blocks of its group's files only: no disk image
    or cluster can be made from it."""
    if m.group is not None:
        raise UsageError(f"generation {m.id} is a backup of group {m.group}: it holds only "
                         f"the data of that group's files, not whole disks, so {what} "
                         "cannot use it; restore its files with 'sdbackup restore' or "
                         "mount it with 'sdbackup mount'")


def restore_image(
    reader: GenerationSource,
    disk: str,
    dest: Path,
    *,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ImageStats:
    """Write disk ``disk`` of the generation to ``dest`` (a new file, an empty file, or a
    device/file that holds data with ``force``)."""
    _whole_cluster_only(reader.manifest, "restore-image")
    d = reader.manifest.disk(disk)
    bs = reader.block_size
    size = d.nblocks * bs
    stats = ImageStats(disk, str(dest), size=size)
    created = False
    if dest.is_dir():
        raise UsageError(f"--to {dest} is a directory; give the path of the image file or "
                         "device to write")
    if dest.exists():
        st = os.stat(dest)
        is_blk = stat.S_ISBLK(st.st_mode)
        if not (is_blk or stat.S_ISREG(st.st_mode)):
            raise UsageError(f"--to {dest} is neither a regular file nor a block device")
        if not force and holds_data(dest):
            raise UsageError(f"{dest} holds data; use --force to overwrite it with disk "
                             f"{disk} of generation {reader.gen.id}")
        if is_blk:
            fd = os.open(dest, os.O_WRONLY | os.O_CLOEXEC)
            dev_size = os.lseek(fd, 0, os.SEEK_END)
            if dev_size < size:
                os.close(fd)
                raise UsageError(f"device {dest} has {dev_size} bytes; disk {disk} needs "
                                 f"{size}")
        else:
            fd = os.open(dest, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    else:
        if not dest.parent.is_dir():
            raise NotFoundError(f"cannot create {dest}: {dest.parent} does not exist")
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        created = True
        is_blk = False
    try:
        if not is_blk:
            os.ftruncate(fd, 0)  # every old byte goes: unused blocks become holes
            os.ftruncate(fd, size)
        # The image may be a shared disk other hosts read: it is written around this
        # host's page cache (O_DIRECT) wherever its file system allows.
        with BlockDevice(dest, bs, direct=supports_direct(dest)) as dev:
            for kind in (Kind.DATA, Kind.BI):  # before images (T0 contents) win: last
                for start, count, data in reader.records(d.id, kind=int(kind)):
                    dev.write(start, data)
                    if kind == Kind.DATA:
                        stats.blocks += count
                    stats.bytes += len(data)
                    if progress is not None:
                        progress(len(data))
            dev.fsync()
    except BaseException as e:
        os.close(fd)
        fd = -1
        if created:
            dest.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == 28:
            raise NoSpaceError(f"no space left to write {dest} ({size} bytes for disk "
                               f"{disk}); free space there") from None
        raise
    finally:
        if fd >= 0:
            os.close(fd)
    return stats



RESTORING = "RESTORING"


def _clean_interrupted(new_dir: Path) -> None:
    """Remove what an interrupted restore-cluster left in ``new_dir`` (it wrote
    RESTORING first, listing the disk images it was about to create)."""
    marker = new_dir / RESTORING
    if not marker.is_file():
        return
    try:
        info = json.loads(marker.read_text())
        created = [Path(p) for p in info.get("created", [])]
        if not isinstance(info.get("generation"), str):
            raise ValueError("no generation")
    except (ValueError, AttributeError, TypeError):
        raise UsageError(f"--to {new_dir} holds a {RESTORING} file that restore-cluster did "
                         "not write; give a new or empty directory") from None
    for p in created:
        # Only what this restore made: a disk image outside --to carrying a label.
        if p.parent != new_dir and p.is_file() and read_label(p) is not None:
            p.unlink(missing_ok=True)
    for child in new_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    sync_dir(new_dir)


@dataclass
class ClusterRestore:
    cluster_dir: str
    cluster_id: str
    from_cluster: str
    generation: str
    disks: list[ImageStats] = field(default_factory=list)
    fsck_checks: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"cluster_dir": self.cluster_dir, "cluster_id": self.cluster_id,
                "restored_from_cluster": self.from_cluster, "generation": self.generation,
                "disks": [d.to_dict() for d in self.disks], "fsck_checks": self.fsck_checks}


def parse_disk_paths(specs: list[str] | tuple[str, ...]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for text in specs:
        name, eq, path = text.partition("=")
        if not eq or not name or not path:
            raise UsageError(f"bad --disk {text!r}: use NAME=PATH, e.g. d0=/srv/new-d0.img")
        if name in out:
            raise UsageError(f"--disk {name} is given twice")
        out[name] = Path(path).absolute()
    return out


def restore_cluster(
    gen: Generation,
    reader: GenerationSource,
    new_dir: Path,
    disk_paths: Mapping[str, Path] | None = None,
    *,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ClusterRestore:
    """Create the cluster ``new_dir`` from the generation (see the module docstring)."""
    m = gen.manifest
    _whole_cluster_only(m, "restore-cluster")
    new_dir = new_dir.absolute()
    paths = dict(disk_paths or {})
    for name in paths:
        m.disk(name)  # UsageError for a disk the generation does not have
    _clean_interrupted(new_dir)
    if new_dir.exists() and (not new_dir.is_dir() or any(new_dir.iterdir())):
        raise UsageError(f"--to {new_dir} exists and is not an empty directory; give a new "
                         "directory for the restored cluster")
    if not new_dir.parent.is_dir():
        raise NotFoundError(f"cannot create {new_dir}: {new_dir.parent} does not exist")
    for d in m.disks:
        paths.setdefault(d.name, new_dir / f"{d.name}.img")
    resolved = [p.resolve() for p in paths.values()]
    if len(set(resolved)) != len(resolved):
        raise UsageError("two disks would be restored to the same path")
    for name, p in paths.items():
        if p.is_dir():
            raise UsageError(f"--disk {name}={p} is a directory; give the path of the image "
                             "file or device to write")
        if p.exists() and not force and holds_data(p):
            raise UsageError(f"{p} (for disk {name}) holds data; use --force to overwrite it")
    meta_src = gen.meta_file()

    new_id = str(uuid.uuid4())
    made_dir = not new_dir.exists()
    created: list[Path] = []
    result = ClusterRestore(str(new_dir), new_id, m.cluster_id, m.id)
    try:
        new_dir.mkdir(exist_ok=True)
        # Names what this restore creates, so that a rerun after an interruption (a
        # kill, a power cut) can clean it up; removed last, once the cluster is whole.
        write_atomic(new_dir / RESTORING, json.dumps(
            {"generation": m.id, "created": [str(p) for p in paths.values()
                                             if not p.exists()]}).encode())
        (new_dir / "logs").mkdir(exist_ok=True)
        bs = m.block_size
        for d in m.disks:
            p = paths[d.name]
            if not p.exists():
                created.append(p)
            result.disks.append(restore_image(reader, d.name, p, force=True,
                                              progress=progress))
            with BlockDevice(p, bs, direct=supports_direct(p)) as dev:
                dev.write(0, make_label(new_id, d.name, d.id, bs, d.nblocks))
                dev.fsync()
        db_path = new_dir / "meta.db"
        shutil.copyfile(meta_src, db_path)
        con = sqlite3.connect(str(db_path), isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("UPDATE meta SET value=? WHERE key='cluster_id'", (new_id,))
            for k, v in (("restored_from_cluster", m.cluster_id),
                         ("restored_from_generation", m.id),
                         ("restored_at_ns", str(time.time_ns()))):
                con.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (k, v))
            # The restored cluster starts a tracking history of its own: no incremental
            # can ever be taken relative to the generations of the one it came from.
            con.execute("DELETE FROM meta WHERE key=?", (TOKEN_KEY,))
            con.execute("COMMIT")
            con.execute("PRAGMA journal_mode=WAL").fetchall()
        finally:
            con.close()
        write_atomic(new_dir / "secret", secrets.token_hex(32).encode() + b"\n", mode=0o600)
        os.chmod(new_dir / "secret", 0o600)
        cfg = ClusterConfig(new_id, bs, [DiskConfig(d.name, str(paths[d.name]), d.id,
                                                    supports_direct(paths[d.name]))
                                         for d in m.disks])
        write_atomic(new_dir / CONFIG_NAME, cfg.to_toml().encode())
        store = MetaStore(db_path)
        try:
            problems = fsck_mod.check_all(store)
            store.sync()
        finally:
            store.close()
        if problems:
            raise CorruptError(f"the restored cluster fails fsck: {problems[0].check}: "
                               f"{problems[0].message} (the generation's metadata is "
                               "inconsistent)")
        result.fsck_checks = len(fsck_mod.CHECKS)
        (new_dir / RESTORING).unlink()
        sync_dir(new_dir)
    except BaseException:
        for p in created:
            p.unlink(missing_ok=True)
        if made_dir:
            shutil.rmtree(new_dir, ignore_errors=True)
        else:
            for child in new_dir.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise
    return result
