"""Opening the cluster's shared disks on one host: where, how, and whether it is safe.

Each host sees each disk at a path of its own (a LUN may be ``/dev/sdc`` on one host
and ``/dev/mapper/mpatha`` on another): the coordinator takes its paths from
``cluster.toml``, a node from ``--disk NAME=PATH`` or else the coordinator's path.
Before any I/O the disk's label (block 0) is checked: cluster id, disk id, block size.
A disk that is missing, read-only, foreign or mixed up is one clear error naming the
disk and the path, and the process does not join.

**Direct I/O.** Every disk is opened with ``O_DIRECT``, so no host serves a block from
its own page cache after another host wrote it (two hosts on one LUN have two page
caches; so do two loop devices over one image). A disk whose file system refuses
``O_DIRECT`` (ramfs; tmpfs before Linux 6.6) is a **single-host disk**: ``init``
records ``direct = false`` in ``cluster.toml``, ``sdbackup info`` says so, and only
processes that see the very same file under the same kernel may use it -- the
coordinator hands out its identity (:func:`disk_identity`: boot id plus device and
inode) and refuses any node whose own differs.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sdbackup.blocks.device import BlockDevice
from sdbackup.blocks.diskset import DiskSet
from sdbackup.blocks.label import DISK_MAGIC
from sdbackup.errors import CorruptError, SdbError, UsageError

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class DiskPlace:
    """One disk as one host opens it."""

    name: str
    id: int
    path: str
    direct: bool  # False: a single-host disk (its file system refuses O_DIRECT)


def host_id() -> str:
    """This kernel's boot id: two processes share a page cache only if it is equal."""
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        import socket

        return f"host:{socket.gethostname()}"


def disk_identity(path: str | os.PathLike[str]) -> str:
    """Which object a path is on this kernel: equal only for the same file or device."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        return f"{host_id()}:blk:{st.st_rdev}"
    return f"{host_id()}:file:{st.st_dev}:{st.st_ino}"


def supports_direct(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` can be opened with ``O_DIRECT`` (a disk others can share)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


def open_disk(place: DiskPlace, *, cluster_id: str, block_size: int,
              writable: bool = True) -> BlockDevice:
    """Open one disk and check its label; errors name the disk and the path."""
    where = f"disk {place.name} at {place.path}"
    if not os.path.exists(place.path):
        raise UsageError(f"{where} does not exist on this host: give the path where this "
                         f"host sees it (--disk {place.name}=PATH)")
    try:
        dev = BlockDevice(place.path, block_size, writable=writable, direct=place.direct)
    except SdbError as e:
        raise UsageError(f"{where}: {e.message}") from None
    except PermissionError:
        raise UsageError(f"{where} cannot be opened for writing (read-only, or no "
                         "permission): the cluster needs to write it") from None
    except OSError as e:
        raise UsageError(f"{where} cannot be opened: {e.strerror or e}") from None
    try:
        check_label(dev, place, cluster_id=cluster_id, block_size=block_size)
    except BaseException:
        dev.close()
        raise
    return dev


def check_label(dev: BlockDevice, place: DiskPlace, *, cluster_id: str,
                block_size: int) -> None:
    """The label in block 0 names this cluster, this disk id and this block size."""
    where = f"disk {place.name} at {place.path}"
    head = dev.read(0, 1) if dev.nblocks else b""
    if not head.startswith(DISK_MAGIC):
        raise UsageError(f"{where} carries no sdbackup label: it is not a disk of this "
                         "cluster (wrong path?)")
    n = int.from_bytes(head[8:12], "little")
    try:
        label = json.loads(head[12 : 12 + n])
    except ValueError:
        raise CorruptError(f"{where} has a damaged sdbackup label") from None
    if label.get("cluster_id") != cluster_id:
        raise UsageError(f"{where} belongs to another cluster ({label.get('cluster_id')}, "
                         f"disk {label.get('disk')}): wrong path?")
    if label.get("disk_id") != place.id:
        raise UsageError(f"{where} is this cluster's disk {label.get('disk')} (id "
                         f"{label.get('disk_id')}), not disk {place.name} (id {place.id}): "
                         "the disk paths are mixed up")
    if label.get("block_size", block_size) != block_size:
        raise UsageError(f"{where} was labelled with block size {label.get('block_size')}, "
                         f"the cluster uses {block_size}")


def open_disk_set(places: Iterable[DiskPlace], *, cluster_id: str, block_size: int,
                  writable: bool = True) -> DiskSet:
    """Open and check every disk; on any error none stays open."""
    devs: list[tuple[int, str, BlockDevice]] = []
    try:
        for p in places:
            devs.append((p.id, p.name, open_disk(p, cluster_id=cluster_id,
                                                 block_size=block_size, writable=writable)))
    except BaseException:
        for _, _, dev in devs:
            dev.close()
        raise
    return DiskSet(block_size, devs)


def parse_disk_overrides(specs: Iterable[str]) -> dict[str, str]:
    """``--disk NAME=PATH`` options of a node: where this host sees each disk."""
    out: dict[str, str] = {}
    for text in specs:
        name, eq, path = text.partition("=")
        if not eq or not name or not path:
            raise UsageError(f"bad --disk {text!r}: use NAME=PATH, e.g. d0=/dev/sdc")
        if name in out:
            raise UsageError(f"--disk {name} is given twice")
        out[name] = os.path.abspath(path)
    return out
