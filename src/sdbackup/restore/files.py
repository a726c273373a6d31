"""Restore files from a generation: the tree from the T0 metadata, the data from its blocks.

Safety: nothing is ever written outside ``--to``, whatever the medium says.

* Every name from the snapshot is checked (1..255 bytes, no ``/`` or NUL, not ``.`` or
  ``..``); a bad one is a :class:`CorruptError`, not a path.
* Every file, directory, link and node is created relative to an open directory
  descriptor (``openat``-style ``dir_fd=``), and every open of an existing entry uses
  ``O_NOFOLLOW``: directories are opened one component at a time from ``--to`` with
  ``O_DIRECTORY | O_NOFOLLOW``, so a symlink is never followed while restoring.
* Symlinks are restored as symlinks, with whatever target they had (absolute targets
  included); they are never followed.
* ``--to`` must be a new or empty directory, so nothing there is overwritten.

Data is restored in disk order (files sorted by their first block), so records are read
from the medium in order and each decoded record serves all the files it holds.
Contents, modes, owners (when running as root), times, symlinks, hard links and FIFOs
are restored; device nodes need root.
"""

from __future__ import annotations

import collections
import errno
import fnmatch
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sdbackup.blocks.device import pwrite_all
from sdbackup.blocks.source import read_blocks
from sdbackup.errors import CorruptError, NoSpaceError, NotFoundError, UsageError
from sdbackup.fs.readonly import ReadOnlyFileSystem
from sdbackup.media.chain import GenerationSource
from sdbackup.media.generation import Generation
from sdbackup.media.snapshot import SnapshotMeta
from sdbackup.meta.types import Attr, Extent
from sdbackup.types import ROOT_INODE

CHUNK_BLOCKS_BYTES = 8 << 20
_DIR_FDS = 64
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class RestoreStats:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    special: int = 0
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)
    # Files not restored because a record holding their data is damaged: the other
    # files are restored all the same (the command then exits 5, naming each).
    damaged: list[str] = field(default_factory=list)
    # Files a group generation made with --meta all lists but does not hold (outside
    # its group): not restored.
    outside: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"files": self.files, "directories": self.directories,
                "symlinks": self.symlinks, "hardlinks": self.hardlinks,
                "special": self.special, "bytes": self.bytes, "warnings": self.warnings,
                "damaged": self.damaged, "outside_group": self.outside}


@dataclass
class _Node:
    parent: int  # index of the parent node (-1 for the root)
    name: bytes
    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    rdev: int
    target: bytes | None
    wanted: bool = False  # selected, or an ancestor of a selected node


def check_name(name: bytes, where: str) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name or len(name) > 255:
        raise CorruptError(f"{where}: the metadata snapshot holds the file name {name!r}, "
                           "which no restore may create (damaged or forged medium)")


def parse_patterns(patterns: Sequence[str]) -> list[list[bytes]]:
    out = []
    for p in patterns:
        parts = [c for c in os.fsencode(p).split(b"/") if c and c != b"."]
        if b".." in parts:
            raise UsageError(f"pattern {p!r} contains '..': give paths inside the cluster, "
                             "e.g. /home/*/docs")
        if not parts:
            raise UsageError(f"pattern {p!r} selects nothing: to restore everything, give "
                             "no pattern")
        out.append(parts)
    return out


def _matches(path: list[bytes], pat: list[bytes]) -> bool:
    return len(path) >= len(pat) and all(
        fnmatch.fnmatchcase(path[i], pat[i]) for i in range(len(pat)))


def _may_contain(path: list[bytes], pat: list[bytes]) -> bool:
    return len(path) < len(pat) and all(
        fnmatch.fnmatchcase(path[i], pat[i]) for i in range(len(path)))


class _Tree:
    """The namespace at T0, walked from the root through the read-only file system over
    the generation (its T0 metadata, its blocks), with the selection marked. Only the
    directories that may hold something selected are listed."""

    def __init__(self, fs: ReadOnlyFileSystem, where: str) -> None:
        self.fs = fs
        self.where = where
        self.nodes: list[_Node] = []

    def _node(self, parent: int, name: bytes, a: Attr) -> _Node:
        target = self.fs.readlink(a.ino) if stat.S_ISLNK(a.mode) else None
        return _Node(parent, name, a.ino, a.mode, a.uid, a.gid, a.size, a.atime_ns,
                     a.mtime_ns, a.rdev, target)

    def path(self, i: int) -> bytes:
        parts = []
        while i > 0:
            parts.append(self.nodes[i].name)
            i = self.nodes[i].parent
        return b"/" + b"/".join(reversed(parts))

    def select(self, pats: list[list[bytes]]) -> list[int]:
        """Walk from the root; mark wanted nodes; return how often each pattern matched."""
        hits = [0] * len(pats)
        root = self.fs.getattr(ROOT_INODE)
        if not root.is_dir:
            raise CorruptError(f"{self.where}: the root inode is not a directory")
        self.nodes = [self._node(-1, b"", root)]
        seen_dirs: set[int] = {ROOT_INODE}
        # (node index, its path components, whole subtree selected)
        stack: list[tuple[int, list[bytes], bool]] = [(0, [], not pats)]
        while stack:
            idx, path, whole = stack.pop()
            kids = [(e.name, e.attr) for e in self.fs.listdir(self.nodes[idx].ino)]
            if len({name for name, _ in kids}) != len(kids):
                names = [name for name, _ in kids]
                dup = next(n for n in names if names.count(n) > 1)
                raise CorruptError(f"{self.where}: the metadata snapshot lists {dup!r} twice "
                                   f"in directory {self.path(idx)!r} (damaged or forged)")
            for name, attr in reversed(kids):
                check_name(name, self.where)
                cpath = [*path, name]
                sel = whole
                if not sel:
                    for k, p in enumerate(pats):
                        if _matches(cpath, p):
                            hits[k] += 1
                            sel = True
                ino = attr.ino
                is_dir = attr.is_dir
                if not sel and not (is_dir and any(_may_contain(cpath, p) for p in pats)):
                    continue
                node = self._node(idx, name, attr)
                self.nodes.append(node)
                ci = len(self.nodes) - 1
                if sel:
                    self._want(ci)
                if is_dir:
                    if ino in seen_dirs:
                        raise CorruptError(f"{self.where}: directory inode {ino} appears "
                                           "twice in the tree (a loop): damaged snapshot")
                    seen_dirs.add(ino)
                    stack.append((ci, cpath, sel))
        return hits

    def _want(self, i: int) -> None:
        while i >= 0 and not self.nodes[i].wanted:
            self.nodes[i].wanted = True
            i = self.nodes[i].parent


class _DirFds:
    """Descriptors of restored directories, opened one component at a time with
    O_NOFOLLOW from the destination's descriptor; a small LRU keeps them."""

    def __init__(self, tree: _Tree, root_fd: int) -> None:
        self.tree = tree
        self.root_fd = root_fd
        self.cache: collections.OrderedDict[int, int] = collections.OrderedDict()

    def get(self, i: int) -> int:
        if i == 0:
            return self.root_fd
        fd = self.cache.get(i)
        if fd is not None:
            self.cache.move_to_end(i)
            return fd
        chain = []
        j = i
        while j != 0 and j not in self.cache:
            chain.append(j)
            j = self.tree.nodes[j].parent
        fd = self.root_fd if j == 0 else self.cache[j]
        for k in reversed(chain):
            fd = os.open(self.tree.nodes[k].name, _O_DIR, dir_fd=fd)
            self.cache[k] = fd
            self.cache.move_to_end(k)
        while len(self.cache) > _DIR_FDS:
            old, ofd = next(iter(self.cache.items()))
            if old == i:
                break
            del self.cache[old]
            os.close(ofd)
        return self.cache[i]

    def close(self) -> None:
        for fd in self.cache.values():
            os.close(fd)
        self.cache.clear()


def prepare_dest(dest: Path) -> int:
    """Create ``dest`` (or accept an empty directory); return its descriptor."""
    if dest.is_symlink() and not dest.exists():
        raise UsageError(f"--to {dest} is a dangling symlink")
    if dest.exists():
        if not dest.is_dir():
            raise UsageError(f"--to {dest} exists and is not a directory")
        if any(dest.iterdir()):
            raise UsageError(f"--to {dest} is not empty: restore into a new or empty "
                             "directory (nothing is ever overwritten)")
    else:
        if not dest.parent.is_dir():
            raise NotFoundError(f"cannot create --to {dest}: {dest.parent} does not exist")
        dest.mkdir()
    return os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def restore_files(
    gen: Generation,
    reader: GenerationSource,
    dest: Path,
    patterns: Sequence[str] = (),
    *,
    on_total: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> RestoreStats:
    """Restore the files selected by ``patterns`` (all when empty) under ``dest``.

    A pattern is a path inside the cluster whose components may use shell wildcards
    (``/home/*/docs``, ``*.txt`` at the top level); it selects what it names and
    everything below. Paths are restored under ``dest`` as they were in the cluster
    (``dest/home/ann/docs/...``).
    """
    pats = parse_patterns(patterns)
    where = f"generation {gen.id}"
    bs = gen.block_size
    disks = {d.id: d.nblocks for d in gen.manifest.disks}
    stats = RestoreStats()
    with SnapshotMeta(gen.meta_file(), where) as snap:
        # The same read-only file-system code as the live cluster, over the generation:
        # its T0 metadata and its blocks (log first where not overlaid).
        fs = ReadOnlyFileSystem(snap, reader)
        tree = _Tree(fs, where)
        hits = tree.select(pats)
        unmatched = [p for p, h in zip(patterns, hits, strict=True) if not h]
        if unmatched:
            raise NotFoundError(f"{where} holds nothing matching {', '.join(unmatched)}")
        nodes = tree.nodes
        # Regular files: one data copy per inode, the other names become hard links.
        first_name: dict[int, int] = {}
        links: list[int] = []
        for i, n in enumerate(nodes):
            if n.wanted and stat.S_ISREG(n.mode):
                if n.ino in first_name:
                    links.append(i)
                else:
                    first_name[n.ino] = i
        # Each file's extents; files in the order of their first block on disk, so that
        # the medium is read in order and each decoded record serves all its files.
        order_key: list[tuple[tuple[int, int], int, list[Extent]]] = []
        bad_maps: dict[int, str] = {}
        # A group generation whose metadata lists every file: files outside the group
        # have no data in it, and are left out (listed in ``stats.outside``).
        outside = getattr(reader, "outside", None)
        skipped: set[int] = set()
        for ino, i in first_name.items():
            nfb = (nodes[i].size + bs - 1) // bs
            exts = fs.meta.map_read(ino, 0, nfb) if nfb else []
            for e in exts:
                if e.disk not in disks:
                    bad_maps[i] = f"maps blocks to unknown disk id {e.disk}"
                elif e.dblock < 0 or e.length < 1 or e.dblock + e.length > disks[e.disk]:
                    bad_maps[i] = "maps blocks outside its disks"
            if outside is not None and any(
                    e.disk in disks and outside(e.disk).intersects_run(e.dblock, e.length)
                    for e in exts):
                stats.outside.append(os.fsdecode(tree.path(i)))
                skipped.add(ino)
                continue
            first = (int(exts[0].disk), exts[0].dblock) if exts else (-1, 0)
            order_key.append((first, i, exts))
    order_key.sort(key=lambda t: (t[0], t[1]))
    if on_total is not None:
        on_total(sum(nodes[i].size for ino, i in first_name.items() if ino not in skipped))

    root_fd = prepare_dest(dest)
    dirs = _DirFds(tree, root_fd)
    i = 0
    try:
        # 1. directories (parents come before children in node order)
        for i in range(1, len(nodes)):
            n = nodes[i]
            if n.wanted and stat.S_ISDIR(n.mode):
                os.mkdir(n.name, 0o700, dir_fd=dirs.get(n.parent))
                stats.directories += 1
        # 2. file data, in disk order
        bad_inos: set[int] = set()
        step = max(1, CHUNK_BLOCKS_BYTES // bs)
        for _first, i, exts in order_key:
            n = nodes[i]
            if i in bad_maps:  # a damaged or forged snapshot: this file only
                bad_inos.add(n.ino)
                stats.damaged.append(f"{os.fsdecode(tree.path(i))}: the metadata "
                                     f"snapshot {bad_maps[i]}")
                continue
            pfd = dirs.get(n.parent)
            fd = os.open(n.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=pfd)
            try:
                for e in exts:
                    for k in range(0, e.length, step):
                        c = min(step, e.length - k)
                        data = read_blocks(fs.blocks, e.disk, e.dblock + k, c)
                        pwrite_all(fd, data, (e.fblock + k) * bs)
                os.ftruncate(fd, n.size)
                _attrs_fd(fd, n)
            except CorruptError as err:  # this file only: the others are restored
                os.close(fd)
                fd = -1
                os.unlink(n.name, dir_fd=pfd)
                bad_inos.add(n.ino)
                stats.damaged.append(f"{os.fsdecode(tree.path(i))}: {err.message}")
                continue
            finally:
                if fd >= 0:
                    os.close(fd)
            stats.files += 1
            stats.bytes += n.size
            if progress is not None:
                progress(n.size)
        # 3. hard links, symlinks, special files
        for i in links:
            n = nodes[i]
            if n.ino in skipped:
                stats.outside.append(os.fsdecode(tree.path(i)))
                continue
            if n.ino in bad_inos:
                stats.damaged.append(f"{os.fsdecode(tree.path(i))}: a hard link of a "
                                     "damaged file")
                continue
            src = nodes[first_name[n.ino]]
            sfd = os.dup(dirs.get(src.parent))
            try:
                os.link(src.name, n.name, src_dir_fd=sfd, dst_dir_fd=dirs.get(n.parent),
                        follow_symlinks=False)
            finally:
                os.close(sfd)
            stats.hardlinks += 1
        for i in range(1, len(nodes)):
            n = nodes[i]
            if not n.wanted:
                continue
            if stat.S_ISLNK(n.mode):
                _symlink(n, dirs.get(n.parent), where, tree.path(i))
                stats.symlinks += 1
            elif not (stat.S_ISDIR(n.mode) or stat.S_ISREG(n.mode)) and _special(
                    n, dirs.get(n.parent), stats, tree.path(i)):
                stats.special += 1
        # 4. directory attributes, children first (their creation changed the times)
        for i in range(len(nodes) - 1, 0, -1):
            n = nodes[i]
            if n.wanted and stat.S_ISDIR(n.mode):
                fd = os.open(n.name, _O_DIR, dir_fd=dirs.get(n.parent))
                try:
                    _attrs_fd(fd, n)
                finally:
                    os.close(fd)
    except OSError as e:
        what = f"cannot restore {os.fsdecode(tree.path(i))} under {dest}: {e.strerror or e}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpaceError(f"{what}; free space there") from None
        raise UsageError(what) from None
    finally:
        dirs.close()
        os.close(root_fd)
    return stats



def _attrs_fd(fd: int, n: _Node) -> None:
    if os.geteuid() == 0:
        try:
            os.fchown(fd, n.uid, n.gid)
        except OSError:
            pass
    os.fchmod(fd, n.mode & 0o7777)
    os.utime(fd, ns=(n.atime_ns, n.mtime_ns))


def _symlink(n: _Node, pfd: int, where: str, path: bytes) -> None:
    target = n.target
    if not target or b"\0" in target or len(target) > 4095:
        raise CorruptError(f"{where}: symlink {path!r} has an impossible target {target!r}")
    os.symlink(target, n.name, dir_fd=pfd)
    if os.geteuid() == 0:
        try:
            os.chown(n.name, n.uid, n.gid, dir_fd=pfd, follow_symlinks=False)
        except OSError:
            pass
    os.utime(n.name, ns=(n.atime_ns, n.mtime_ns), dir_fd=pfd, follow_symlinks=False)


def _special(n: _Node, pfd: int, stats: RestoreStats, path: bytes) -> bool:
    kind = stat.S_IFMT(n.mode)
    if kind not in (stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK):
        stats.warnings.append(f"{os.fsdecode(path)}: unknown file type {kind:o}, skipped")
        return False
    try:
        os.mknod(n.name, kind | 0o600, n.rdev, dir_fd=pfd)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES):
            stats.warnings.append(f"{os.fsdecode(path)}: cannot create a device node "
                                  f"({e.strerror}), skipped")
            return False
        raise
    # The entry was just created by mknod: it is not a symlink.
    if os.geteuid() == 0:
        try:
            os.chown(n.name, n.uid, n.gid, dir_fd=pfd, follow_symlinks=False)
        except OSError:
            pass
    os.chmod(n.name, n.mode & 0o7777, dir_fd=pfd)
    os.utime(n.name, ns=(n.atime_ns, n.mtime_ns), dir_fd=pfd, follow_symlinks=False)
    return True
