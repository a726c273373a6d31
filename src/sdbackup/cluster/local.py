"""Create a cluster, and open one with the coordinator embedded in this process.

The embedded default: with no coordinator process running, a command opens the
metadata store itself after taking the cluster lock (``CLUSTER_DIR/lock``, an
``flock``), so two such commands never change the cluster at once. The second one
waits up to ``wait`` seconds, then fails with a message naming the holder.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sdbackup.blocks.device import BlockDevice, create_sparse, device_size, holds_data
from sdbackup.blocks.disk_access import DiskPlace, open_disk_set, supports_direct
from sdbackup.blocks.diskset import DiskSet
from sdbackup.blocks.durable import write_atomic
from sdbackup.blocks.label import LABEL_BLOCKS, make_label, read_label
from sdbackup.cluster.config import (
    CONFIG_NAME,
    ClusterConfig,
    DiskConfig,
    check_block_size,
    check_disk_name,
    load_config,
    parse_size,
)
from sdbackup.errors import BusyError, CorruptError, SdbError, UsageError
from sdbackup.fs.filesystem import FileSystem
from sdbackup.meta.alloc import DiskBitmap
from sdbackup.meta.service import MetadataService
from sdbackup.meta.store import SCHEMA_VERSION, MetaStore
from sdbackup.types import ROOT_INODE

MIN_BLOCKS = 16
MAX_DISK_BYTES = (1 << 63) - 1  # the largest file offset (off_t)


@dataclass
class DiskSpec:
    """A disk as given on the command line: NAME=PATH[:SIZE]."""

    name: str
    path: Path
    size: int | None

    @classmethod
    def parse(cls, text: str) -> DiskSpec:
        name, eq, rest = text.partition("=")
        if not eq or not rest:
            raise UsageError(f"bad --disk {text!r}: use NAME=PATH or NAME=PATH:SIZE, "
                             "e.g. d0=/srv/disk0.img:4GiB")
        check_disk_name(name)
        path, size = rest, None
        head, colon, tail = rest.rpartition(":")
        if colon and tail and tail[0].isdigit():
            path, size = head, parse_size(tail)
        return cls(name, Path(path).absolute(), size)


def init_cluster(cluster_dir: str | os.PathLike[str], disks: list[DiskSpec], *,
                 block_size: int = 4096, force: bool = False) -> ClusterConfig:
    """Create a cluster directory and its disks. Checks everything before changing anything."""
    cdir = Path(cluster_dir).absolute()
    check_block_size(block_size)
    if not disks:
        raise UsageError("a cluster needs at least one disk: add --disk NAME=PATH:SIZE")
    names = [d.name for d in disks]
    if len(set(names)) != len(names):
        raise UsageError(f"disk names must be unique, got {', '.join(names)}")
    paths = [d.path.resolve() for d in disks]
    if len(set(paths)) != len(paths):
        raise UsageError("two disks name the same path")
    if (cdir / CONFIG_NAME).exists():
        raise UsageError(f"{cdir} is already an sdbackup cluster; choose another directory")
    if cdir.exists() and (not cdir.is_dir() or any(cdir.iterdir())):
        raise UsageError(f"{cdir} exists and is not an empty directory; choose a new one")
    sizes: list[int] = []
    for d in disks:
        if d.path.exists():
            if d.path.is_dir():
                raise UsageError(f"disk path {d.path} is a directory; give a file or device")
            label = read_label(d.path)
            if label is not None and not force:
                raise UsageError(
                    f"disk {d.path} belongs to sdbackup cluster {label.get('cluster_id')} "
                    f"(disk {label.get('disk')}); use another path, or --force to overwrite it"
                )
            if label is None and not force and holds_data(d.path):
                raise UsageError(f"disk {d.path} holds data; use --force to overwrite it")
            size = device_size(d.path)
            if d.size is not None and d.size > size and stat.S_ISREG(d.path.stat().st_mode):
                size = d.size  # grow a regular file to the requested size
        else:
            if d.size is None:
                raise UsageError(f"disk {d.path} does not exist: give its size, "
                                 f"e.g. --disk {d.name}={d.path}:4GiB")
            if not d.path.parent.is_dir():
                raise UsageError(f"directory {d.path.parent} for disk {d.name} does not exist")
            size = d.size
        if size // block_size < MIN_BLOCKS:
            raise UsageError(f"disk {d.name} is too small: {size} bytes is under "
                             f"{MIN_BLOCKS} blocks of {block_size}")
        if size > MAX_DISK_BYTES:
            raise UsageError(f"disk {d.name} is too large: {size} bytes is over the "
                             f"{MAX_DISK_BYTES} a file offset can address")
        sizes.append(size)

    created: list[Path] = []
    # Existing disks as they were (path, size, first block), put back if init fails.
    touched: list[tuple[Path, int, bytes]] = []
    made_dir = not cdir.exists()
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        (cdir / "logs").mkdir(exist_ok=True)
        cfg = ClusterConfig(str(uuid.uuid4()), block_size)
        for i, (d, size) in enumerate(zip(disks, sizes, strict=True)):
            if not d.path.exists():
                try:
                    create_sparse(d.path, size)
                except FileExistsError:
                    raise UsageError(f"disk {d.path} appeared while the cluster was being "
                                     "created; try again") from None
                except BaseException as e:
                    # create_sparse opened (created) the file before sizing it failed.
                    d.path.unlink(missing_ok=True)
                    if isinstance(e, OSError):
                        raise UsageError(f"cannot create disk {d.path} of {size} bytes: "
                                         f"{e.strerror or e}") from None
                    raise
                created.append(d.path)
            else:
                old_size = device_size(d.path)
                with open(d.path, "rb") as f:
                    touched.append((d.path, old_size, f.read(block_size * LABEL_BLOCKS)))
                if old_size < size:
                    try:
                        os.truncate(d.path, size)
                    except OSError as e:
                        raise UsageError(f"cannot grow disk {d.path} to {size} bytes: "
                                         f"{e.strerror or e}") from None
            cfg.disks.append(DiskConfig(d.name, str(d.path), i + 1))
        write_atomic(cdir / "secret", secrets.token_hex(32).encode() + b"\n", mode=0o600)
        os.chmod(cdir / "secret", 0o600)
        store = MetaStore(cdir / "meta.db", create=True)
        try:
            with store.transaction():
                store.set_meta("schema_version", str(SCHEMA_VERSION))
                store.set_meta("cluster_id", cfg.cluster_id)
                store.set_meta("block_size", str(block_size))
                now = time.time_ns()
                store.execute(
                    "INSERT INTO inodes(id, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns,"
                    " nlink) VALUES (?,?,?,?,?,?,?,?,2)",
                    (ROOT_INODE, stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), 0, now, now,
                     now),
                )
                for dc, size in zip(cfg.disks, sizes, strict=True):
                    nblocks = size // block_size
                    store.execute("INSERT INTO disks(id, name, nblocks, reserved) VALUES (?,?,?,?)",
                                  (dc.id, dc.name, nblocks, LABEL_BLOCKS))
                    bm = DiskBitmap(dc.id, nblocks)
                    bm.commit(0, LABEL_BLOCKS)
                    bm.save_dirty(store)
                    with BlockDevice(dc.path, block_size) as dev:
                        dev.write(0, make_label(cfg.cluster_id, dc.name, dc.id, block_size,
                                                nblocks))
                        dev.fsync()
                    dc.direct = supports_direct(dc.path)
                    if dc.direct:
                        # O_DIRECT I/O in units of the block size must work here.
                        BlockDevice(dc.path, block_size, direct=True).close()
            store.sync()
        finally:
            store.close()
        write_atomic(cdir / CONFIG_NAME, cfg.to_toml().encode())
        return cfg
    except BaseException:
        for p in created:
            p.unlink(missing_ok=True)
        for p, old_size, head in touched:
            _restore_disk(p, old_size, head)
        if made_dir:
            shutil.rmtree(cdir, ignore_errors=True)
        else:
            for child in cdir.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise


def _restore_disk(path: Path, size: int, head: bytes) -> None:
    """Put an existing disk back as init found it (its first blocks and its size)."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return
    try:
        os.pwrite(fd, head, 0)
        if stat.S_ISREG(os.fstat(fd).st_mode) and os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ClusterLock:
    """The exclusive right to run the coordinator of one cluster (an flock)."""

    def __init__(self, cluster_dir: Path, wait: float = 10.0) -> None:
        self.path = cluster_dir / "lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip()
                    os.close(self.fd)
                    raise BusyError(
                        f"cluster {cluster_dir} is in use by another sdbackup process "
                        f"({holder or 'unknown'}); wait for it to finish, or stop it"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def disk_places(cfg: ClusterConfig) -> list[DiskPlace]:
    """Where this host sees the disks (cluster.toml), and whether each is shared."""
    return [DiskPlace(d.name, d.id, d.path,
                      d.direct if d.direct is not None else _probe_direct(d.path))
            for d in cfg.disks]


def _probe_direct(path: str) -> bool:
    try:
        return supports_direct(path)
    except FileNotFoundError:
        return True  # open_disk names the missing disk


def open_disks(cfg: ClusterConfig) -> DiskSet:
    """Open the cluster's disks as cluster.toml places them, labels checked."""
    return open_disk_set(disk_places(cfg), cluster_id=cfg.cluster_id,
                         block_size=cfg.block_size)


class LocalCluster:
    """A cluster opened with its coordinator embedded in this process."""

    def __init__(self, cluster_dir: str | os.PathLike[str], *, wait: float = 10.0) -> None:
        self.dir = Path(cluster_dir).absolute()
        self.config = load_config(self.dir)
        self.lock = ClusterLock(self.dir, wait)
        try:
            self.store = MetaStore(self.dir / "meta.db")
            check_store(self.store, self.config, self.dir)
            self.meta = MetadataService(self.store)
            self.disks = open_disks(self.config)
            check_disk_sizes(self.store, self.disks)
            # Data before metadata, one disk flush per group of commits (MetaStore).
            self.store.group_commits(self.disks.datasync)
            self.fs = FileSystem(self.meta, self.disks, sync_before_commit=False)
        except BaseException:
            self.lock.release()
            raise

    def close(self) -> None:
        try:
            self.disks.fsync()
            self.store.sync()
            self.disks.close()
            self.store.close()
        finally:
            self.lock.release()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_store(store: MetaStore, cfg: ClusterConfig, cluster_dir: Path) -> None:
    """The config must describe the cluster the metadata store holds.

    Only disk paths may be edited in cluster.toml: a changed block size, or a disk
    added, dropped or renamed there, would map file blocks to the wrong bytes.
    """
    where = f"{cluster_dir}/{CONFIG_NAME}"
    if store.get_meta("cluster_id") != cfg.cluster_id:
        raise UsageError(f"{cluster_dir}/meta.db belongs to another cluster than "
                         f"{CONFIG_NAME} says")
    bs = store.get_meta("block_size")
    if bs != str(cfg.block_size):
        raise UsageError(f"{where} says block size {cfg.block_size}, but the cluster was "
                         f"created with {bs}: the block size cannot change; put {bs} back")
    have = {int(i): str(n) for i, n in store.query("SELECT id, name FROM disks")}
    want = {d.id: d.name for d in cfg.disks}
    if have != want:
        fmt = ", ".join
        raise UsageError(f"{where} lists disks {fmt(f'{n} (id {i})' for i, n in want.items())}"
                         f" but the cluster has {fmt(f'{n} (id {i})' for i, n in have.items())}"
                         ": only disk paths may be edited")


def check_disk_sizes(store: MetaStore, disks: DiskSet) -> None:
    """Every disk is at least as large as the cluster knows it (not truncated)."""
    for disk_id, name, nblocks in store.query("SELECT id, name, nblocks FROM disks"):
        dev = disks.device(int(disk_id))
        if dev.nblocks < nblocks:
            raise CorruptError(f"disk {name} at {dev.path} has {dev.nblocks} blocks, but the "
                               f"cluster uses {nblocks}: the disk was truncated or replaced")


@contextmanager
def open_store(cluster_dir: str | os.PathLike[str], *, wait: float = 10.0) -> Iterator[MetaStore]:
    """The metadata store alone, under the cluster lock, exactly as it is on disk.

    For fsck: unlike :func:`open_cluster` it starts no metadata service, which would
    first purge inodes it takes for orphans (changing what fsck is about to check).
    The disks' labels are checked, their contents are not read.
    """
    cdir = Path(cluster_dir).absolute()
    cfg = load_config(cdir)
    lock = ClusterLock(cdir, wait)
    try:
        store = MetaStore(cdir / "meta.db")
        try:
            check_store(store, cfg, cdir)
            open_disks(cfg).close()
            yield store
        finally:
            store.close()
    finally:
        lock.release()


def open_cluster(cluster_dir: str | os.PathLike[str], *, wait: float = 10.0) -> LocalCluster:
    """Open a cluster for this process (embedded coordinator)."""
    try:
        return LocalCluster(cluster_dir, wait=wait)
    except SdbError:
        raise
