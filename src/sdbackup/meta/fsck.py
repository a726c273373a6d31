"""Consistency checks of the metadata store: one function per invariant.

Each check returns a list of :class:`Problem`; ``check_all`` runs them all. The checks
work on whole tables at once with numpy (coverage counts per block via a difference
array), so a disk of millions of blocks is checked without a Python step per block.
Tests corrupt exactly one invariant and assert that its check, and only the right
kind of problem, is reported.
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sdbackup.meta.alloc import DiskBitmap
from sdbackup.meta.store import MetaStore
from sdbackup.types import ROOT_INODE

MAX_LISTED = 20  # problems of one kind listed one by one; the rest are counted


@dataclass(frozen=True)
class Problem:
    check: str
    message: str


def _runs_text(blocks: np.ndarray, limit: int = 8) -> str:
    """Format sorted block numbers as 'a-b, c, ...' runs."""
    if len(blocks) == 0:
        return ""
    brk = np.flatnonzero(np.diff(blocks) != 1)
    starts = np.concatenate(([blocks[0]], blocks[brk + 1]))
    ends = np.concatenate((blocks[brk], [blocks[-1]]))
    parts = [f"{s}" if s == e else f"{s}-{e}" for s, e in zip(starts[:limit], ends[:limit],
                                                              strict=True)]
    more = len(starts) - limit
    return ", ".join(parts) + (f" (+{more} more runs)" if more > 0 else "")


def _load(store: MetaStore) -> tuple[dict[int, tuple[str, int, int]], np.ndarray]:
    disks = {int(i): (str(n), int(nb), int(r))
             for i, n, nb, r in store.query("SELECT id, name, nblocks, reserved FROM disks")}
    rows = store.query("SELECT ino, fblock, count, disk, dblock FROM extents")
    ext = np.array(rows, dtype=np.int64).reshape(-1, 5)
    return disks, ext


def check_extent_bounds(store: MetaStore) -> list[Problem]:
    """Every extent names a known disk and lies inside it, past the reserved label."""
    disks, ext = _load(store)
    out = []
    for ino, fb, cnt, disk, db in ext.tolist():
        if disk not in disks:
            out.append(Problem("extent_bounds", f"inode {ino} block {fb}: unknown disk id {disk}"))
        else:
            name, nb, res = disks[disk]
            if db < res or db + cnt > nb or cnt <= 0:
                out.append(Problem("extent_bounds", f"inode {ino} blocks {fb}+{cnt} map to "
                                   f"{name}:{db}+{cnt}, outside the disk's {res}..{nb}"))
    return out


def _coverage(store: MetaStore) -> dict[int, np.ndarray]:
    """Per disk: how many extents cover each block (difference array + cumsum)."""
    disks, ext = _load(store)
    cov: dict[int, np.ndarray] = {}
    for disk, (_n, nb, res) in disks.items():
        diff = np.zeros(nb + 1, dtype=np.int32)
        diff[0] += 1
        diff[res] -= 1  # the reserved label blocks count as owned by the system
        sel = ext[(ext[:, 3] == disk) & (ext[:, 4] >= 0) & (ext[:, 4] + ext[:, 2] <= nb)] \
            if len(ext) else ext
        if len(sel):
            np.add.at(diff, sel[:, 4], 1)
            np.add.at(diff, sel[:, 4] + sel[:, 2], -1)
        cov[disk] = np.cumsum(diff[:-1])
    return cov


def _used_bits(store: MetaStore, disk: int, nblocks: int) -> np.ndarray:
    bm = DiskBitmap(disk, nblocks)
    bm.load(store)
    return np.unpackbits(bm.committed, bitorder="little")[:nblocks].astype(bool)


def check_double_use(store: MetaStore) -> list[Problem]:
    """No disk block belongs to two extents (of one file or of two)."""
    disks, _ = _load(store)
    out = []
    for disk, c in _coverage(store).items():
        bad = np.flatnonzero(c > 1)
        if len(bad):
            out.append(Problem("double_use", f"disk {disks[disk][0]}: {len(bad)} blocks belong "
                               f"to more than one file: {_runs_text(bad)}"))
    return out


def check_extents_marked(store: MetaStore) -> list[Problem]:
    """Every block of every extent is marked used in the allocation bitmap."""
    disks, _ = _load(store)
    out = []
    for disk, c in _coverage(store).items():
        used = _used_bits(store, disk, disks[disk][1])
        bad = np.flatnonzero((c > 0) & ~used)
        if len(bad):
            out.append(Problem("extents_marked", f"disk {disks[disk][0]}: {len(bad)} blocks "
                               f"in use by files are marked free: {_runs_text(bad)}"))
    return out


def check_unreferenced(store: MetaStore) -> list[Problem]:
    """No block is marked used unless an extent (or the disk label) holds it."""
    disks, _ = _load(store)
    out = []
    for disk, c in _coverage(store).items():
        used = _used_bits(store, disk, disks[disk][1])
        bad = np.flatnonzero(used & (c == 0))
        if len(bad):
            out.append(Problem("unreferenced", f"disk {disks[disk][0]}: {len(bad)} blocks are "
                               f"marked used but belong to no file: {_runs_text(bad)}"))
    return out


def check_sizes(store: MetaStore) -> list[Problem]:
    """Sizes agree with extents: no extent of a file lies wholly past its last byte."""
    bs = int(store.get_meta("block_size") or 4096)
    rows = store.query(
        "SELECT e.ino, MAX(e.fblock + e.count), i.size, i.mode FROM extents e "
        "LEFT JOIN inodes i ON i.id = e.ino GROUP BY e.ino"
    )
    out = []
    for ino, end, size, mode in rows:
        if size is None:
            out.append(Problem("sizes", f"extents of inode {ino}, which does not exist"))
        elif not stat.S_ISREG(mode):
            out.append(Problem("sizes", f"inode {ino} is not a regular file but has extents"))
        elif end > (size + bs - 1) // bs:
            out.append(Problem("sizes", f"inode {ino}: size {size} bytes but blocks mapped up "
                               f"to file block {end - 1}"))
    return out


def check_overlapping_file_blocks(store: MetaStore) -> list[Problem]:
    """Extents of one file do not overlap in file blocks."""
    rows = store.query(
        "SELECT ino, fblock, count FROM extents ORDER BY ino, fblock"
    )
    out = []
    prev: tuple[int, int] | None = None
    for ino, fb, cnt in rows:
        if prev is not None and prev[0] == ino and fb < prev[1]:
            out.append(Problem("file_overlap", f"inode {ino}: file block {fb} mapped twice"))
        prev = (ino, fb + cnt)
    return out


def check_dirents(store: MetaStore) -> list[Problem]:
    """Entries name existing inodes, live in directories, and directories have one name."""
    out = []
    for parent, name, ino in store.query(
        "SELECT d.parent, d.name, d.ino FROM dirents d LEFT JOIN inodes i ON i.id=d.ino "
        "WHERE i.id IS NULL"
    ):
        out.append(Problem("dirents", f"entry {bytes(name)!r} in directory {parent} names "
                           f"missing inode {ino}"))
    for parent, name in store.query(
        "SELECT d.parent, d.name FROM dirents d LEFT JOIN inodes i ON i.id=d.parent "
        "WHERE i.id IS NULL OR (i.mode & 61440) != 16384"
    ):
        out.append(Problem("dirents", f"entry {bytes(name)!r} has parent {parent}, which is "
                           "not a directory"))
    for ino, n in store.query(
        "SELECT d.ino, COUNT(*) FROM dirents d JOIN inodes i ON i.id=d.ino "
        "WHERE (i.mode & 61440) = 16384 GROUP BY d.ino HAVING COUNT(*) != 1"
    ):
        out.append(Problem("dirents", f"directory inode {ino} has {n} names"))
    return out


def check_nlink(store: MetaStore) -> list[Problem]:
    """nlink equals the names of an inode (+1 and +subdirectories for directories)."""
    rows = store.query(
        """
        SELECT i.id, i.mode, i.nlink,
               (SELECT COUNT(*) FROM dirents d WHERE d.ino = i.id),
               (SELECT COUNT(*) FROM dirents d JOIN inodes c ON c.id = d.ino
                 WHERE d.parent = i.id AND (c.mode & 61440) = 16384)
        FROM inodes i
        """
    )
    out = []
    for ino, mode, nlink, names, subdirs in rows:
        want = 2 + subdirs if stat.S_ISDIR(mode) else names
        if nlink != want:
            out.append(Problem("nlink", f"inode {ino}: nlink {nlink}, but {want} expected"))
        if ino != ROOT_INODE and names == 0:
            out.append(Problem("nlink", f"inode {ino} has no name (orphan)"))
    if not store.has_val("SELECT 1 FROM inodes WHERE id=? AND (mode & 61440) = 16384",
                         (ROOT_INODE,)):
        out.append(Problem("nlink", "the root directory (inode 1) is missing"))
    return out


def check_tree(store: MetaStore) -> list[Problem]:
    """Every directory is reachable from the root (no cycles, no detached subtrees)."""
    parent = dict(store.query(
        "SELECT d.ino, d.parent FROM dirents d JOIN inodes i ON i.id=d.ino "
        "WHERE (i.mode & 61440) = 16384"
    ))
    ok = {ROOT_INODE}
    out = []
    for start in parent:
        path = []
        cur = start
        while cur not in ok:
            if cur in path or cur not in parent:
                out.append(Problem("tree", f"directory inode {start} is not reachable from "
                                   "the root"))
                break
            path.append(cur)
            cur = parent[cur]
        else:
            ok.update(path)
    return out


CHECKS: list[Callable[[MetaStore], list[Problem]]] = [
    check_extent_bounds,
    check_overlapping_file_blocks,
    check_double_use,
    check_extents_marked,
    check_unreferenced,
    check_sizes,
    check_dirents,
    check_nlink,
    check_tree,
]


def check_all(store: MetaStore) -> list[Problem]:
    problems: list[Problem] = []
    for check in CHECKS:
        problems.extend(check(store))
    return problems
