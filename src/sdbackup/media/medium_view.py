"""Every generation of a medium as one tree: a metadata source and a block source.

``sdbackup mount --all`` serves this through the same read-only file system and FUSE
adapter as a single generation. The root directory holds one directory per current
generation, named by its T0 and id (``2026-12-02T00:50:27Z_20261202T005027.595796Z-
d0810042``), plus ``latest``, a symbolic link to the newest; the medium is scanned
again when the root is looked at (at most every :data:`RESCAN_SECONDS`), so backups,
merges and prunes made while it is mounted appear and disappear without a remount.

Each generation is opened when first used (its T0 snapshot and its chain's block
source, c.2) and kept open while used; at most :data:`MAX_OPEN` stay open when idle.
A generation that a merge or prune removes while it is open leaves the root at once,
but what was found in it (files a program has open, a shell's working directory)
reads on from the files it holds open, as a deleted file that is still open does,
until it is the least recently used of more than :data:`MAX_OPEN`.
Inode numbers and disk ids are those of the generation, tagged with the generation's
*slot* (a number given to each generation id the first time the view sees it, never
reused while mounted): inode ``slot << 40 | ino``, disk ``slot << 16 | disk``. So
every inode of the view is unique and stable, as the kernel requires.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from sdbackup.blocks.source import Buffer
from sdbackup.errors import CorruptError, FsError, NotFoundError
from sdbackup.media.chain import ChainReader, open_chain
from sdbackup.media.media_set import MediaPaths, open_media
from sdbackup.media.medium import GEN_ID_RE, MANIFEST, Catalog, Manifest, iso_utc
from sdbackup.media.snapshot import SnapshotMeta
from sdbackup.meta.api import READDIR_BATCH
from sdbackup.meta.types import Attr, DirEntry, Extent, StatFs
from sdbackup.types import ROOT_INODE, DiskId

log = logging.getLogger("sdbackup.mount")

INO_SHIFT = 40
DISK_SHIFT = 16
LATEST_INO = 2
LATEST = b"latest"
RESCAN_SECONDS = 1.0
MAX_OPEN = 8


def dir_name(m: Manifest) -> str:
    """The directory of a generation in the view: its T0 (to the second, UTC), its id,
    and its group when it is a group's generation."""
    t0 = iso_utc(m.t0_wall_ns)[:19] + "Z"
    return f"{t0}_{m.id}" + (f"_{m.group}" if m.group else "")


@dataclass
class _Gen:
    slot: int
    manifest: Manifest
    name: bytes
    snap: SnapshotMeta | None = None
    reader: ChainReader | None = None
    users: int = 0
    opening: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        if self.snap is not None:
            self.snap.close()
        if self.reader is not None:
            self.reader.close()
        self.snap = self.reader = None


class MediumView:
    """The metadata source and block source of the view (see the module docstring)."""

    def __init__(self, medium_path: MediaPaths, *,
                 log_medium: str | os.PathLike[str] | None = None,
                 max_open: int = MAX_OPEN) -> None:
        # Several media: the first holds the generations, the others parts of dispersed
        # ones (media/media_set.py).
        self.medium = open_media(medium_path)
        self.log_medium = log_medium
        self.max_open = max_open
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self._slots: dict[str, int] = {}
        self._gens: dict[int, _Gen] = {}  # current generations by slot
        self._gone: dict[int, _Gen] = {}  # removed from the medium while open
        self._open: OrderedDict[int, None] = OrderedDict()  # opened, least recent first
        self._scanned = 0.0
        self._manifests: dict[str, Manifest] = {}
        self._damaged: set[str] = set()
        self._block_size = 4096
        self._root_attr = _dir_attr(ROOT_INODE, time.time_ns())
        self.rescan(force=True)

    # -- the generations ----------------------------------------------------------------
    def rescan(self, *, force: bool = False) -> None:
        """Look at the medium again (at most every :data:`RESCAN_SECONDS` unless
        ``force``): one directory listing and one ``stat`` per generation; manifests
        are read once per generation."""
        now = time.monotonic()
        if not force and now - self._scanned < RESCAN_SECONDS:
            return
        with self._scan_lock:  # FUSE workers call this concurrently: one scan at a time
            self._rescan(now)

    def _rescan(self, now: float) -> None:
        gdir = self.medium.generations_dir
        try:
            names = [n for n in os.listdir(gdir) if GEN_ID_RE.match(n)]
        except FileNotFoundError:
            names = []
        for n in list(self._manifests):
            if n not in names:
                del self._manifests[n]
        for n in names:
            if not (gdir / n / MANIFEST).exists():
                self._manifests.pop(n, None)  # unfinished, or being removed
            elif n not in self._manifests and n not in self._damaged:
                try:
                    self._manifests[n] = self.medium.read_manifest(n)
                except (CorruptError, NotFoundError) as e:
                    self._damaged.add(n)
                    log.warning("medium %s: generation %s is left out of the view: %s",
                                self.medium.root, n, e.message)
        current = {m.id: m for m in Catalog(list(self._manifests.values())).current}
        with self._lock:
            self._scanned = now
            for slot, g in list(self._gens.items()):
                if g.manifest.id not in current:
                    del self._gens[slot]
                    if g.reader is not None:  # files may be open in it: reads go on
                        self._gone[slot] = g
                        continue
                    self._open.pop(slot, None)
                    if g.users == 0:
                        g.close()
            for gid, m in sorted(current.items(), key=lambda kv: (kv[1].t0_wall_ns, kv[0])):
                if gid not in self._slots:
                    self._slots[gid] = len(self._slots) + 2  # 1 is the root's cookie
                slot = self._slots[gid]
                if slot not in self._gens:
                    self._gens[slot] = _Gen(slot, m, os.fsencode(dir_name(m)))
            if current:
                self._block_size = next(iter(current.values())).block_size
            newest = max((g.manifest.committed_ns for g in self._gens.values()),
                         default=time.time_ns())
            self._root_attr = _dir_attr(ROOT_INODE, newest)

    @contextmanager
    def _use(self, slot: int) -> Iterator[_Gen]:
        """Generation ``slot``, opened, held open while the block runs."""
        with self._lock:
            g = self._gens.get(slot) or self._gone.get(slot)
            if g is None:
                raise FsError(errno.ENOENT, "the generation is no longer on the medium")
            g.users += 1
        try:
            if g.reader is None:
                self._open_gen(g)
            with self._lock:
                self._open[slot] = None
                self._open.move_to_end(slot)
                self._evict()
            yield g
        finally:
            with self._lock:
                g.users -= 1
                if g.users == 0 and g.slot not in self._gens and g.slot not in self._gone:
                    g.close()  # removed from the medium while in use

    def _open_gen(self, g: _Gen) -> None:
        with g.opening:  # one opener per generation; its other users wait for it
            if g.reader is not None:
                return
            g.snap, g.reader = open_chain(self.medium, g.manifest,
                                          log_medium=self.log_medium)

    def _evict(self) -> None:
        idle = [s for s in self._open if (g := self._gens.get(s) or self._gone.get(s))
                is not None and g.users == 0]
        while len(self._open) > self.max_open and idle:
            s = idle.pop(0)
            self._open.pop(s, None)
            g = self._gens.get(s) or self._gone.pop(s)  # a removed one for good
            g.close()

    def _by_name(self, name: bytes) -> _Gen:
        for force in (False, True):  # a name not seen yet: maybe a new generation
            self.rescan(force=force)
            with self._lock:
                for g in self._gens.values():
                    if g.name == name:
                        return g
        raise FsError(errno.ENOENT, f"no generation {os.fsdecode(name)} on the medium")

    def _newest(self) -> _Gen | None:
        with self._lock:
            return max(self._gens.values(), key=lambda g: (g.manifest.t0_wall_ns,
                                                           g.manifest.id), default=None)

    def close(self) -> None:
        with self._lock:
            gens = [*self._gens.values(), *self._gone.values()]
            self._gens.clear()
            self._gone.clear()
            self._open.clear()
        for g in gens:
            g.close()

    # -- the metadata seam ------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self._block_size

    def getattr(self, ino: int) -> Attr:
        if ino == ROOT_INODE:
            self.rescan()
            return self._root_attr
        if ino == LATEST_INO:
            newest = self._newest()
            size = len(newest.name) if newest is not None else 0
            return replace(self._root_attr, ino=LATEST_INO, mode=stat.S_IFLNK | 0o777,
                           size=size)
        slot, real = _split(ino)
        if real == ROOT_INODE:  # a generation's directory
            with self._lock:
                g = self._gens.get(slot) or self._gone.get(slot)
            if g is None:
                raise FsError(errno.ENOENT, "the generation is no longer on the medium")
            return _dir_attr(ino, g.manifest.t0_wall_ns)
        with self._use(slot) as g:
            assert g.snap is not None
            return _tag_attr(g.snap.getattr(real), slot)

    def lookup(self, parent: int, name: bytes) -> Attr:
        if parent == ROOT_INODE:
            if name == LATEST:
                if self._newest() is None:
                    raise FsError(errno.ENOENT, "the medium holds no generation")
                return self.getattr(LATEST_INO)
            return self.getattr(_join(self._by_name(name).slot, ROOT_INODE))
        if parent == LATEST_INO:
            raise FsError(errno.ENOTDIR, "not a directory")
        slot, real = _split(parent)
        with self._use(slot) as g:
            assert g.snap is not None
            return _tag_attr(g.snap.lookup(real, name), slot)

    def readdir(self, ino: int, after: int = 0, limit: int = READDIR_BATCH) -> list[DirEntry]:
        if ino == ROOT_INODE:
            self.rescan(force=after == 0)  # a new listing sees new generations at once
            out: list[DirEntry] = []
            newest = self._newest()
            if after < 1 and newest is not None:
                out.append(DirEntry(1, LATEST, self.getattr(LATEST_INO)))
            with self._lock:
                gens = sorted((g for g in self._gens.values() if g.slot > after),
                              key=lambda g: g.slot)[:limit]
            for g in gens:
                out.append(DirEntry(g.slot, g.name, _dir_attr(
                    _join(g.slot, ROOT_INODE), g.manifest.t0_wall_ns)))
            return out[:limit]
        if ino == LATEST_INO:
            raise FsError(errno.ENOTDIR, "not a directory")
        slot, real = _split(ino)
        with self._use(slot) as g:
            assert g.snap is not None
            return [DirEntry(e.cookie, e.name, _tag_attr(e.attr, slot))
                    for e in g.snap.readdir(real, after, limit)]

    def readlink(self, ino: int) -> bytes:
        if ino == LATEST_INO:
            newest = self._newest()
            if newest is None:
                raise FsError(errno.ENOENT, "the medium holds no generation")
            return newest.name
        if ino == ROOT_INODE:
            raise FsError(errno.EINVAL, "not a symbolic link")
        slot, real = _split(ino)
        with self._use(slot) as g:
            assert g.snap is not None
            return g.snap.readlink(real)

    def map_read(self, ino: int, fblock: int, count: int) -> list[Extent]:
        if ino in (ROOT_INODE, LATEST_INO):
            return []
        slot, real = _split(ino)
        with self._use(slot) as g:
            assert g.snap is not None
            return [e._replace(disk=DiskId(slot << DISK_SHIFT | e.disk))
                    for e in g.snap.map_read(real, fblock, count)]

    def statfs(self) -> StatFs:
        """The newest generation's, with nothing free (a backup cannot grow)."""
        newest = self._newest()
        if newest is None:
            return StatFs(block_size=self.block_size, blocks=0, free=0, files=1)
        with self._use(newest.slot) as g:
            assert g.snap is not None
            st = g.snap.statfs()
        return replace(st, free=0)

    # -- the block seam -----------------------------------------------------------------------
    def readinto(self, disk: DiskId, block: int, buf: Buffer) -> None:
        slot, real = disk >> DISK_SHIFT, disk & ((1 << DISK_SHIFT) - 1)
        with self._use(slot) as g:
            assert g.reader is not None
            g.reader.readinto(DiskId(real), block, buf)


def _split(ino: int) -> tuple[int, int]:
    slot, real = ino >> INO_SHIFT, ino & ((1 << INO_SHIFT) - 1)
    if slot < 2 or real == 0:
        raise FsError(errno.ENOENT, f"no inode {ino} in this view")
    return slot, real


def _join(slot: int, ino: int) -> int:
    return slot << INO_SHIFT | ino


def _tag_attr(a: Attr, slot: int) -> Attr:
    return replace(a, ino=_join(slot, a.ino))


def _dir_attr(ino: int, ns: int) -> Attr:
    """A directory the view makes up (the root, a generation's directory). Its link
    count is 1, "not counted", as btrfs reports: tools then never infer the number of
    subdirectories from it."""
    return Attr(ino=ino, mode=stat.S_IFDIR | 0o555, nlink=1, uid=0, gid=0, rdev=0,
                size=0, blocks=0, atime_ns=ns, mtime_ns=ns, ctime_ns=ns)

