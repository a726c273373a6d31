"""Power loss (issue 9): the data blocks of a write are on stable storage before the
metadata transaction that makes them reachable can become durable (ext4 data=ordered).

How: a whole cluster — cluster directory and disk image — lives inside a recording
FUSE mount (``tests/logwrites.py``), which logs every write, truncation, namespace
change and fsync that the processes send to their files, in order. The cluster runs
as in production: first embedded (``sdbackup fs CL put``/``rm`` and the cluster opened
in this process with an explicit ``fsync``), then a real ``sdbackup coordinator`` and
one ``sdbackup node`` (reached through its control port), with a coordinator restart
in the middle. The workload is built so that freed blocks are reused by other files —
which is what exposes metadata-before-data: a file appended right after its deleted
neighbour takes the neighbour's blocks, a coordinator (re)start allocates new files
from the first free block on, a file grown again after a truncation gets its own old
blocks back, a rename replaces a file whose blocks are then reused. Then the
processes stop cleanly, the mount goes, and :class:`logwrites.ReplayModel` produces
the crash states: cuts before and after every fsync record (of the disk image, of
SQLite's WAL and database) and at the end of the log; at each, the state with none of
the unsynced writes, with all, seeded random subsets (per file: none, all, or a mix
with writes torn at 512-byte sectors), and for each file with unsynced writes the
state where only its writes landed (the WAL without the disk image's writes: how
metadata overtakes data; the disk image without the WAL's). Each state is
materialized, its ``cluster.toml`` pointed at its own disk image, SQLite's ``-shm``
removed, and checked with the product's own code, in this process:

1. ``fsck`` (``sdbackup.meta.fsck.check_all``) finds nothing;
2. every file's contents are explained by the workload. File contents are
   self-describing: every 16-byte chunk is (magic, file tag, version, byte offset),
   the version being the number of the workload operation that wrote it. A chunk
   that names another file or another offset is another file's (or a stale block's)
   bytes: always wrong. For each file the test keeps the version held by every chunk
   after every operation; the *window* of a file at a cut is its contents at its last
   durable point (the last fsync of it, or an embedded command's close, whose MARK
   precedes the cut) plus its contents after each later operation that had started
   before the cut. Every chunk must hold a value it held at some moment of that window
   (zeros included only where the chunk was zero, a hole or past the end, at such a
   moment); the size must lie between the smallest and largest size of the window;
   a file with a durable point must exist at one of the paths it had in its window
   (it may be missing only if it was unlinked or replaced in the window). So a file
   whose fsync MARK precedes the cut and that was not touched since reads exactly its
   marked contents; one written again reads, chunk by chunk, the marked or a later
   version.

This catches both halves of ordered writes. Data before metadata: an extent whose
commit became durable while its data did not shows the block's old contents (a deleted
file's bytes, or the file's own older bytes after a truncation). And freed before
reused: a block freed by an unlink or truncation whose transaction is not yet durable
must not be overwritten durably by another file, or the crash brings the freed file
back holding the other file's bytes (ext4 keeps such blocks out of the allocator until
the freeing transaction commits).

Operations are numbered; ``MARK(op-N)`` is recorded before operation N starts and
``MARK(synced-N)`` after an fsync (or embedded command) N returned, so the test knows,
for any cut, which operations had started and which syncs had completed. After the
clean shutdown (the node writes its cache back, the coordinator syncs the disks and the
WAL), ``MARK(synced-N)`` of a "shutdown" operation makes every file durable.

After the scripted part, ``SDB_POWERLOSS_OPS`` (default 30) seeded random operations
(creates, overwrites, appends, writes past EOF, truncates down and up, fsyncs, unlinks,
write-fsync-rename-over replacements) run on more files. The test also checks itself:
the workload must have made some file reuse blocks another file freed (seen through
the extents at fsyncs), else it could not see metadata-before-data at all.

Run time: 10-15 s on 2 cores (about 300-500 distinct crash states). A soak run:
``SDB_POWERLOSS_OPS`` (random operations), ``SDB_POWERLOSS_RANDOM`` (random states per
cut, default 3), ``SDB_POWERLOSS_SEED`` (default 1), ``SDB_POWERLOSS_ROUNDS`` (seeds
replayed over the one recorded workload, default 1), e.g. ``SDB_POWERLOSS_OPS=150
SDB_POWERLOSS_RANDOM=8 SDB_POWERLOSS_ROUNDS=2`` checks about 3,000 states in 45 s.
On a failure, ``power-loss-report.txt`` in the test's directory lists every failing
state and every operation.
"""

from __future__ import annotations

import bisect
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

try:  # tests/ as a plain directory of modules...
    import logwrites as lw
    from cluster_helpers import Proc, sdb, sdb_cmd, wait_for
except ModuleNotFoundError:  # ...or as a package
    from tests import logwrites as lw
    from tests.cluster_helpers import Proc, sdb, sdb_cmd, wait_for

from sdbackup.cluster.access import open_fs
from sdbackup.cluster.local import open_cluster, open_store
from sdbackup.meta.fsck import check_all

pytestmark = pytest.mark.fuse

KiB = 1024
BS = 4096
DISK_SIZE = "64MiB"
N_RANDOM = int(os.environ.get("SDB_POWERLOSS_RANDOM", "3"))
SEED = int(os.environ.get("SDB_POWERLOSS_SEED", "1"))
ROUNDS = int(os.environ.get("SDB_POWERLOSS_ROUNDS", "1"))
RANDOM_OPS = int(os.environ.get("SDB_POWERLOSS_OPS", "30"))
FLUSH_DELAY = 0.2  # the node writes dirty data back on its own, between our fsyncs
LEASE = 2.0
MAX_REPORTED = int(os.environ.get("SDB_POWERLOSS_LIST", "8"))  # failing states listed

# -- self-describing contents ----------------------------------------------------------------

CHUNK = 16
MAGIC = b"PL"
_CH = np.dtype([("magic", "S2"), ("tag", ">u2"), ("ver", ">u4"), ("off", ">u8")])


def payload(tag: int, ver: int, off: int, n: int) -> bytes:
    """``n`` bytes of file ``tag``, version ``ver``, starting at byte ``off``."""
    assert off % CHUNK == 0 and n % CHUNK == 0
    a = np.zeros(n // CHUNK, dtype=_CH)
    a["magic"] = MAGIC
    a["tag"] = tag
    a["ver"] = ver
    a["off"] = np.arange(off, off + n, CHUNK, dtype=np.uint64)
    return a.tobytes()


# -- the workload and its model ----------------------------------------------------------------

@dataclass
class FileModel:
    """One file incarnation: its tag, and what it held after each operation on it."""

    tag: int
    created: int  # operation number
    vers: np.ndarray  # the version of every 16-byte chunk now (0: zeros); len = size // 16
    snaps: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (op, vers) after op
    paths: list[tuple[int, str | None]] = field(default_factory=list)  # (op, path or gone)
    syncs: list[int] = field(default_factory=list)  # ops that made it durable
    history: list[int] = field(default_factory=list)  # every op on it

    def snap(self, op: int) -> None:
        self.snaps.append((op, self.vers.copy()))

    def path(self) -> str | None:
        return self.paths[-1][1]


@dataclass
class Window:
    """What a file may look like after a crash at some cut (see the module docstring)."""

    tag: int
    durable_op: int | None
    states: list[np.ndarray]  # chunk versions at each moment of the window
    paths: set[str]
    may_be_absent: bool

    def sizes(self) -> tuple[int, int]:
        lens = [len(v) * CHUNK for v in self.states]
        return min(lens), max(lens)


class Workload:
    """Runs operations on a cluster file system and keeps the model of every file.

    ``fs`` is whatever :class:`sdbackup.fs.filesystem.FileSystem` the phase uses (the
    node's, through its control port, or the embedded cluster's).
    """

    def __init__(self, mount: lw.RecordingMount, cdir: Path, scratch: Path) -> None:
        self.m = mount
        self.cdir = cdir
        self.scratch = scratch
        self.fs: Any = None
        self.files: dict[int, FileModel] = {}
        self.live: dict[str, int] = {}  # path -> tag
        self.ever: dict[str, set[int]] = {}  # path -> tags that ever had it
        self.ops: list[str] = ["(none)"]  # description by operation number
        self.sync_all: list[int] = []  # operations after which every file is durable
        # Disk blocks each file was seen to own at its fsyncs: the self-check that the
        # workload really makes files reuse blocks other files freed.
        self.owners: dict[tuple[int, int], set[int]] = {}

    # -- bookkeeping -----------------------------------------------------------------------
    def _begin(self, desc: str, *tags: int) -> int:
        n = len(self.ops)
        self.ops.append(desc)
        for t in tags:
            self.files[t].history.append(n)
        self.m.mark(f"op-{n}")
        return n

    def _synced(self, n: int, what: str) -> None:
        self.m.mark(f"synced-{n}-{what}")

    def _note_blocks(self, tag: int) -> None:
        ino = self._ino(tag)
        nblocks = -(-len(self.files[tag].vers) * CHUNK // BS)
        for e in self.fs.meta.map_read(ino, 0, nblocks):
            for b in range(e.dblock, e.dblock + e.length):
                self.owners.setdefault((e.disk, b), set()).add(tag)

    def reused_blocks(self) -> int:
        """Disk blocks seen owned by two different files (at their fsyncs)."""
        return sum(1 for tags in self.owners.values() if len(tags) > 1)

    def _new(self, path: str, n: int) -> FileModel:
        tag = len(self.files) + 1
        f = FileModel(tag, n, np.zeros(0, dtype=np.uint32))
        f.history.append(n)
        f.snap(n)
        f.paths.append((n, path))
        self.files[tag] = f
        self.live[path] = tag
        self.ever.setdefault(path, set()).add(tag)
        return f

    def _ino(self, tag: int) -> int:
        path = self.files[tag].path()
        assert path is not None, f"file {tag} is gone"
        return int(self.fs.resolve(path).ino)

    @staticmethod
    def _write_model(f: FileModel, off: int, n: int, ver: int) -> None:
        end = (off + n) // CHUNK
        if end > len(f.vers):
            f.vers = np.concatenate([f.vers, np.zeros(end - len(f.vers), dtype=np.uint32)])
        f.vers[off // CHUNK : end] = ver

    # -- operations ------------------------------------------------------------------------
    def create(self, path: str) -> int:
        n = self._begin(f"create {path}")
        parent, name = self.fs.split(path)
        self.fs.create(parent.ino, name)
        return self._new(path, n).tag

    def write(self, tag: int, off: int, size: int) -> None:
        f = self.files[tag]
        n = self._begin(f"write {f.path()} [{off}, {off + size}) v{len(self.ops)}", tag)
        data = payload(tag, n, off, size)
        ino = self._ino(tag)
        for i in range(0, size, 1 << 20):
            self.fs.write(ino, off + i, data[i : i + (1 << 20)])
        self._write_model(f, off, size, n)
        f.snap(n)

    def truncate(self, tag: int, size: int) -> None:
        assert size % CHUNK == 0
        f = self.files[tag]
        n = self._begin(f"truncate {f.path()} to {size}", tag)
        self.fs.truncate(self._ino(tag), size)
        vers = f.vers[: size // CHUNK]
        f.vers = np.concatenate([vers, np.zeros(size // CHUNK - len(vers), dtype=np.uint32)])
        f.snap(n)

    def fsync(self, tag: int) -> None:
        f = self.files[tag]
        n = self._begin(f"fsync {f.path()}", tag)
        self.fs.fsync(self._ino(tag))
        f.syncs.append(n)
        f.snap(n)
        self._synced(n, f"file{tag}-{f.path()}".replace("/", ":"))
        self._note_blocks(tag)

    def unlink(self, tag: int) -> None:
        f = self.files[tag]
        path = f.path()
        assert path is not None
        n = self._begin(f"unlink {path}", tag)
        parent, name = self.fs.split(path)
        self.fs.unlink(parent.ino, name)
        f.paths.append((n, None))
        del self.live[path]

    def rename(self, tag: int, new: str) -> None:
        f = self.files[tag]
        old = f.path()
        assert old is not None
        n = self._begin(f"rename {old} -> {new}", tag,
                        *([self.live[new]] if new in self.live else []))
        p, name = self.fs.split(old)
        np_, nname = self.fs.split(new)
        self.fs.rename(p.ino, name, np_.ino, nname)
        victim = self.live.pop(new, None)
        if victim is not None:
            self.files[victim].paths.append((n, None))
        del self.live[old]
        self.live[new] = tag
        self.ever.setdefault(new, set()).add(tag)
        f.paths.append((n, new))

    def put_embedded(self, path: str, size: int) -> int:
        """``sdbackup fs CL put`` (no coordinator: embedded, synced when it closes)."""
        n = self._begin(f"sdbackup fs put {path} ({size} bytes, v{len(self.ops)})")
        tag = len(self.files) + 1
        local = self.scratch / f"put-{tag}"
        local.write_bytes(payload(tag, n, 0, size))
        sdb("fs", str(self.cdir), "put", "-q", str(local), path, check=True)
        f = self._new(path, n)
        self._write_model(f, 0, size, n)
        f.snap(n)
        self._all_durable(n)
        return tag

    def rm_embedded(self, tag: int) -> None:
        f = self.files[tag]
        path = f.path()
        assert path is not None
        n = self._begin(f"sdbackup fs rm {path}", tag)
        sdb("fs", str(self.cdir), "rm", path, check=True)
        f.paths.append((n, None))
        del self.live[path]
        self._all_durable(n)

    def close_embedded(self, c: Any) -> None:
        n = self._begin("close the embedded cluster (syncs disks and WAL)")
        c.close()
        self._all_durable(n)

    def shutdown(self, procs: list[Proc]) -> None:
        n = self._begin("stop the node and the coordinator (SIGTERM: write back, sync)")
        for p in procs:
            rc = p.stop(timeout=30)
            assert rc == 0, f"{p.name} exited with {rc}:\n{p.output()[-3000:]}"
        self._all_durable(n)

    def _all_durable(self, n: int) -> None:
        for f in self.files.values():
            if f.path() is not None:
                f.syncs.append(n)
                f.snap(n)
        self.sync_all.append(n)
        self._synced(n, "all")

    # -- expectations at a cut -----------------------------------------------------------------
    def window(self, tag: int, started: int, synced: set[int]) -> Window:
        """The window of file ``tag`` when operations 1..started had started and the
        syncs in ``synced`` had returned."""
        f = self.files[tag]
        durable = [s for s in f.syncs if s in synced]
        d = max(durable) if durable else None
        lo = d if d is not None else -1
        # The state at the durable point (the last snapshot at or before it) and after
        # every later operation that had started.
        base = [v for op, v in f.snaps if op <= lo][-1:] if d is not None \
            else [np.zeros(0, dtype=np.uint32)]
        later = [v for op, v in f.snaps if lo < op <= started]
        paths_before = [p for op, p in f.paths if op <= lo]
        paths_after = [p for op, p in f.paths if lo < op <= started]
        paths = {p for p in paths_before[-1:] + paths_after if p is not None}
        absent = d is None or any(p is None for p in paths_after) \
            or (bool(paths_before) and paths_before[-1] is None)
        return Window(tag, d, base + later, paths, absent)


# -- checking one recovered state --------------------------------------------------------------

def check_contents(w: Window, data: bytes, wl: Workload) -> list[str]:
    """Problems of one file's bytes against its window (empty: explained)."""
    out: list[str] = []
    lo, hi = w.sizes()
    if not lo <= len(data) <= hi:
        out.append(f"size {len(data)} is outside [{lo}, {hi}], the sizes it had in its "
                   "window")
    n = len(data) // CHUNK
    if len(data) % CHUNK:
        out.append(f"size {len(data)} is not a multiple of {CHUNK} (no operation did that)")
    if n == 0:
        return out
    arr = np.frombuffer(data[: n * CHUNK], dtype=_CH)
    zero = ~np.frombuffer(data[: n * CHUNK], dtype=np.uint64).reshape(-1, 2).any(axis=1)
    offs = np.arange(n, dtype=np.uint64) * CHUNK
    good = (arr["magic"] == MAGIC) & (arr["tag"] == w.tag) & (arr["off"] == offs)
    foreign = ~zero & ~good
    for i in np.flatnonzero(foreign)[:4].tolist():
        out.append(f"offset {i * CHUNK}: {describe_chunk(arr[i], wl)} (never written to this "
                   "file at this offset)")
    if foreign.sum() > 4:
        out.append(f"... {int(foreign.sum())} foreign chunks in all")
    obs = np.where(zero, 0, arr["ver"]).astype(np.uint32)
    held = np.zeros(n, dtype=bool)
    for v in w.states:
        col = np.zeros(n, dtype=np.uint32)
        k = min(n, len(v))
        col[:k] = v[:k]
        held |= col == obs
    wrong = ~held & ~foreign
    for i in np.flatnonzero(wrong)[:4].tolist():
        held_vals = sorted({int(v[i]) if i < len(v) else 0 for v in w.states})
        what = "zeros" if obs[i] == 0 else f"version {int(obs[i])} ({wl.ops[int(obs[i])]})"
        out.append(f"offset {i * CHUNK}: {what}, but in its window it only held "
                   + ", ".join("zeros" if x == 0 else f"v{x}" for x in held_vals))
    if wrong.sum() > 4:
        out.append(f"... {int(wrong.sum())} such chunks in all")
    return out


def describe_chunk(c: Any, wl: Workload) -> str:
    if bytes(c["magic"]) != MAGIC:
        return f"bytes {bytes(np.array([c]).tobytes()).hex()} that no operation wrote"
    tag, ver, off = int(c["tag"]), int(c["ver"]), int(c["off"])
    f = wl.files.get(tag)
    name = f.paths[0][1] if f else "?"
    op = wl.ops[ver] if ver < len(wl.ops) else "?"
    return f"bytes of file {tag} ({name}) version {ver} ({op}) offset {off}"


@dataclass
class Recovered:
    files: dict[str, tuple[int, bytes]]  # path -> (inode, bytes)


def recover(sdir: Path, mount_path: Path) -> tuple[Recovered | None, list[str]]:
    """Point the state's cluster at its own disk, run fsck, read every file."""
    cdir = sdir / "c"
    toml = cdir / "cluster.toml"
    toml.write_text(toml.read_text().replace(str(mount_path), str(sdir)))
    for shm in cdir.glob("*-shm"):
        shm.unlink()
    try:
        with open_store(cdir, wait=0) as store:
            problems = check_all(store)
    except Exception as e:
        return None, [f"the metadata store does not open: {type(e).__name__}: {e}"]
    if problems:
        return None, [f"fsck: {p.check}: {p.message}" for p in problems[:10]]
    files: dict[str, tuple[int, bytes]] = {}
    try:
        with open_cluster(cdir, wait=0) as c:
            stack = [(1, "")]
            while stack:
                ino, prefix = stack.pop()
                for ent in c.fs.listdir(ino):
                    path = f"{prefix}/{os.fsdecode(ent.name)}"
                    a = ent.attr
                    if a.is_dir:
                        stack.append((a.ino, path))
                    elif a.is_reg:
                        files[path] = (a.ino, c.fs.read(a.ino, 0, a.size))
    except Exception as e:
        return None, [f"the cluster does not open or read: {type(e).__name__}: {e}"]
    return Recovered(files), []


def check_recovered(rec: Recovered, wl: Workload, started: int, synced: set[int]
                    ) -> list[str]:
    out: list[str] = []
    windows = {t: wl.window(t, started, synced) for t, f in wl.files.items()
               if f.created <= started}
    found: dict[int, set[str]] = {}
    for path, (_ino, data) in sorted(rec.files.items()):
        # The files that may be at this path at this cut; the most recent first (its
        # problems are listed first).
        cands = [t for t in sorted(wl.ever.get(path, ()), reverse=True)
                 if t in windows and path in windows[t].paths]
        if not cands:
            out.append(f"{path}: no file may be there at this cut (files ever there: "
                       f"{sorted(wl.ever.get(path, ()))})")
            continue
        errs: list[str] = []
        for t in cands:
            e = check_contents(windows[t], data, wl)
            if not e:
                found.setdefault(t, set()).add(path)
                break
            errs += [f"{path} (file {t}, window from "
                     f"{_durable_text(windows[t], wl)}): {x}" for x in e]
        else:
            out += errs
    for t, w in windows.items():
        where = found.get(t, set())
        if where - w.paths:
            out.append(f"file {t} found at {sorted(where)}, outside its paths {sorted(w.paths)}")
        if not where and not w.may_be_absent:
            out.append(f"file {t} ({sorted(w.paths)}) is missing or unexplained, though "
                       f"{_durable_text(w, wl)} made it durable")
    return out


def _durable_text(w: Window, wl: Workload) -> str:
    if w.durable_op is None:
        return "its creation (never synced)"
    return f"op {w.durable_op} ({wl.ops[w.durable_op]})"


# -- processes --------------------------------------------------------------------------------

def start_daemon(name: str, args: list[str], out_dir: Path, addr: Path) -> Proc:
    out = out_dir / f"{name}.{time.monotonic_ns()}.out"
    with open(out, "wb") as fh:
        popen = subprocess.Popen(sdb_cmd(*args), stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=out_dir)
    p = Proc(name, popen, out)

    def ready() -> bool:
        if not p.alive():
            raise AssertionError(f"{name} exited with {p.popen.returncode}:\n"
                                 f"{p.output()[-3000:]}")
        try:
            return f"pid={p.pid}" in addr.read_text()
        except FileNotFoundError:
            return False

    wait_for(ready, 30.0, f"{name} to write {addr.name}")
    return p


# -- the workload -------------------------------------------------------------------------------

def run_workload(wl: Workload, out_dir: Path, procs: list[Proc]) -> None:
    cdir = wl.cdir
    # Embedded: every command opens the cluster itself; each starts allocating new files
    # at the first free block, so e3 gets e1's freed blocks.
    e1 = wl.put_embedded("/e1", 256 * KiB)
    wl.put_embedded("/e2", 64 * KiB)
    wl.rm_embedded(e1)
    c = open_cluster(cdir)
    try:
        wl.fs = c.fs
        e3 = wl.create("/e3")
        wl.write(e3, 0, 96 * KiB)
        wl.fsync(e3)  # the explicit fsync of the embedded path
        wl.write(e3, 16 * KiB, 32 * KiB)  # overwrite in place
        wl.write(e3, 96 * KiB, 32 * KiB)  # append: e1's next freed blocks
        wl.fsync(e3)
        wl.write(e3, 128 * KiB, 16 * KiB)  # left for the close to sync
    finally:
        wl.close_embedded(c)
        wl.fs = None

    coord = start_daemon("coordinator", ["coordinator", str(cdir), "--lease", str(LEASE)],
                         out_dir, cdir / "coordinator.addr")
    procs.append(coord)
    node = start_daemon("node-n1", ["node", str(cdir), "--name", "n1", "--flush-delay",
                                    str(FLUSH_DELAY), "--cache-size", "64MiB"],
                        out_dir, cdir / "nodes" / "n1.addr")
    procs.append(node)
    with open_fs(cdir, node="n1", wait=20.0) as fs:
        wl.fs = fs
        root = fs.resolve("/")
        fs.mkdir(root.ino, b"w")
        # A fresh coordinator allocates from the first free block: the rest of e1's.
        a = wl.create("/w/a")
        wl.write(a, 0, 64 * KiB)
        wl.fsync(a)
        b = wl.create("/w/b")  # right after a on the disk
        wl.write(b, 0, 64 * KiB)
        wl.fsync(b)
        c_ = wl.create("/w/c")
        wl.write(c_, 0, 32 * KiB)
        wl.fsync(c_)
        wl.unlink(b)
        wl.write(a, 64 * KiB, 64 * KiB)  # append: takes b's freed blocks
        wl.fsync(a)
        wl.truncate(a, 40 * KiB + 16)  # frees a's tail, zeroes the rest of the cut block
        wl.fsync(a)
        wl.write(a, 100 * KiB, 20 * KiB)  # past EOF: a's own freed blocks come back
        wl.fsync(a)
        wl.truncate(a, 160 * KiB)  # up: zeros
        wl.fsync(a)
        wl.write(c_, 8 * KiB, 16 * KiB)  # overwrite, not synced
        wl.write(c_, 64 * KiB, 16 * KiB)  # past EOF, not synced
        d = wl.create("/w/d")
        wl.write(d, 0, 48 * KiB)
        wl.fsync(d)
        t = wl.create("/w/d.tmp")  # write a new version, fsync it, rename it over d
        wl.write(t, 0, 48 * KiB)
        wl.fsync(t)
        wl.rename(t, "/w/d")
        wl.fsync(t)
        wl.unlink(c_)  # with unsynced data in the node's cache

        # A coordinator restart: the new one allocates from the first free block again,
        # so the next new files take blocks freed above (b's, a's tail, c's, old d's).
        coord.stop(timeout=30)
        procs.remove(coord)
        coord = start_daemon("coordinator", ["coordinator", str(cdir), "--lease",
                                             str(LEASE)], out_dir, cdir / "coordinator.addr")
        procs.insert(0, coord)
        wait_for(lambda: "reconnected to a restarted coordinator" in _read(
            cdir / "logs" / "node-n1.log"), 30.0, "node n1 to reconnect")
        f = wl.create("/w/f")  # (its first write waits for the grace period)
        wl.write(f, 0, 96 * KiB)
        wl.fsync(f)
        g = wl.create("/w/g")
        wl.write(g, 0, 64 * KiB)
        wl.fsync(g)
        wl.unlink(f)
        h = wl.create("/w/h")  # next to g's end? no: after the cursor
        wl.write(g, 64 * KiB, 64 * KiB)  # append: f's freed blocks are not next to g...
        wl.write(h, 0, 32 * KiB)  # ...but h's first write takes the first free run
        wl.fsync(h)
        wl.fsync(g)
        random_ops(wl, RANDOM_OPS, SEED)
        wl.write(g, 0, 16 * KiB)  # left unsynced for the shutdown
        wl.write(h, 32 * KiB, 16 * KiB)
    wl.fs = None
    wl.shutdown([node, coord])
    procs.clear()


def random_ops(wl: Workload, count: int, seed: int) -> None:
    """``count`` seeded random operations on files /w/r*: creates, overwrites, appends,
    writes past EOF, truncates down and up (16-byte aligned, rarely block-aligned),
    fsyncs, unlinks and write-fsync-rename-over replacements."""
    rng = np.random.default_rng(seed)
    mine: list[int] = []

    def pick() -> int:
        return mine[int(rng.integers(len(mine)))]

    def size(f: int) -> int:
        return len(wl.files[f].vers) * CHUNK

    def span(hi: int) -> int:
        return int(rng.integers(1, hi // CHUNK + 1)) * CHUNK

    for _ in range(count):
        kind = str(rng.choice(["create", "write", "append", "past", "truncate", "fsync",
                               "fsync", "unlink", "replace"]))
        if kind == "create" or not mine or (kind == "replace" and len(mine) < 2):
            t = wl.create(f"/w/r{len(wl.ops)}")
            wl.write(t, 0, span(64 * KiB))
            mine.append(t)
        elif kind == "write" and size(pick()) > 0:
            t = pick()
            off = int(rng.integers(size(t) // CHUNK)) * CHUNK
            wl.write(t, off, span(32 * KiB))
        elif kind in ("append", "past", "write"):
            t = pick()
            gap = span(24 * KiB) if kind == "past" else 0
            wl.write(t, size(t) + gap, span(48 * KiB))
        elif kind == "truncate":
            t = pick()
            new = int(rng.integers(0, size(t) * 2 // CHUNK + 2)) * CHUNK
            wl.truncate(t, new)
        elif kind == "fsync":
            wl.fsync(pick())
        elif kind == "unlink" and len(mine) > 1:
            t = pick()
            wl.unlink(t)
            mine.remove(t)
        elif kind == "replace":
            victim = pick()
            new_path = wl.files[victim].path()
            assert new_path is not None
            t = wl.create(f"/w/tmp{len(wl.ops)}")
            wl.write(t, 0, span(64 * KiB))
            wl.fsync(t)
            wl.rename(t, new_path)
            mine.remove(victim)
            mine.append(t)


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# -- the test -------------------------------------------------------------------------------------

@dataclass
class Failure:
    state: lw.CrashState
    started: int
    problems: list[str]


def cut_progress(model: lw.ReplayModel, k: int) -> tuple[int, set[int]]:
    """(operations started, syncs returned) before log index ``k``."""
    started = 0
    synced: set[int] = set()
    for idx, label in model.marks:
        if idx >= k:
            break
        kind, _, rest = label.partition("-")
        if kind == "op":
            started = max(started, int(rest))
        elif kind == "synced":
            synced.add(int(rest.split("-")[0]))
    return started, synced


_FATE = {"": "durable (fsynced before the cut)", "all": "pending, landed",
         "none": "pending, LOST"}


def explain(state: lw.CrashState, model: lw.ReplayModel, wl: Workload, sdir: Path,
            rec: Recovered | None, problems: list[str]) -> str:
    """Which pending writes of the disk image and the WAL landed in this state, and,
    for the first bad chunk, the extent that maps it and the writes of its disk block."""
    lines = [f"first failing crash state: cut at log record {state.cut.index} "
             f"({state.cut.why}), {state.label}"]
    paths = state.paths()
    op_marks = [(idx, int(lab[3:])) for idx, lab in model.marks if lab.startswith("op-")]
    op_idx = [i for i, _ in op_marks]

    def during(idx: int) -> str:
        j = bisect.bisect_right(op_idx, idx) - 1
        return f"during op {op_marks[j][1]} ({wl.ops[op_marks[j][1]]})" if j >= 0 else ""

    for name in ("d0.img", "c/meta.db-wal", "c/meta.db"):
        obj = paths.get(name)
        ch = {i: w for i, w in state.choices.items() if model.obj_of[i] == obj}
        if obj is None or not ch:
            continue
        landed = sum(1 for w in ch.values() if w == "all")
        torn = sum(1 for w in ch.values() if w.startswith("torn"))
        lines.append(f"  {name}: {len(ch)} unsynced writes (records #{min(ch)}..#{max(ch)}): "
                     f"{landed} landed, {torn} torn, {len(ch) - landed - torn} lost")
    lines += [f"  problem: {p}" for p in problems[:6]]
    started, _ = cut_progress(model, state.cut.index)
    for p in problems[:1]:
        if "(file " not in p or "window from op " not in p:
            continue
        tag = int(p.split("(file ", 1)[1].split(",", 1)[0])
        d = int(p.split("window from op ", 1)[1].split(" ", 1)[0])
        later = [n for n in wl.files[tag].history if d < n <= started]
        lines.append(f"  file {tag} was made durable by op {d} ({wl.ops[d]}); operations on "
                     f"it after that, started before the cut: "
                     + ("; ".join(f"op {n} ({wl.ops[n]})" for n in later) or "none"))
    # Locate the first bad chunk's block on the disk image.
    for p in problems:
        if not p.startswith("/") or "offset " not in p:
            continue
        path = p.split(" ", 1)[0]
        off = int(p.split("offset ", 1)[1].split(":", 1)[0])
        if rec is None or path not in rec.files:
            lines.append(f"  (the state did not recover a second time, or has no {path})")
            break
        ino = rec.files[path][0]
        try:
            with open_store(sdir / "c", wait=0) as store:
                exts = store.query("SELECT fblock, count, disk, dblock FROM extents WHERE "
                                   "ino=? ORDER BY fblock", (ino,))
        except Exception as e:
            lines.append(f"  (cannot look the extents up: {e})")
            break
        fb = off // BS
        for efb, cnt, disk, db in exts:
            if efb <= fb < efb + cnt:
                block = db + fb - efb
                lines.append(f"  the recovered metadata maps {path} (inode {ino}) block {fb} "
                             f"to disk {disk} block {block} (extent: file blocks {efb}+{cnt} "
                             f"-> disk blocks {db}+{cnt})")
                obj = paths.get("d0.img")
                lo, hi = block * BS, (block + 1) * BS
                for i, r in enumerate(model.records[: state.cut.index]):
                    if model.obj_of[i] != obj or r.op != "write":
                        continue
                    if r.args["off"] < hi and r.args["off"] + len(r.data) > lo:
                        fate = _FATE.get(state.choices.get(i, ""), "torn")
                        lines.append(f"    d0.img write #{i} [{r.args['off']}, "
                                     f"+{len(r.data)}) {during(i)}: {fate}")
                break
        else:
            lines.append(f"  {path} block {fb} is not mapped (a hole) in the recovered "
                         "metadata")
        break
    return "\n".join(lines)


def test_power_loss_data_before_metadata(tmp_path: Path, record_property: Any) -> None:
    lw.check_fuse()
    t0 = time.monotonic()
    backing, mnt, logp = tmp_path / "backing", tmp_path / "mnt", tmp_path / "log"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    procs: list[Proc] = []
    # Not logged: SQLite's -shm (rebuilt from the WAL), the processes' logs, the lock
    # file's pid (their contents play no part in recovery).
    with lw.recording_mount(backing, mnt, logp, skip_suffixes=("-shm", ".log", "lock")) as m:
        cdir = m.path / "c"
        try:
            sdb("init", str(cdir), "--disk", f"d0={m.path / 'd0.img'}:{DISK_SIZE}",
                "--block-size", str(BS), check=True)
            m.mark("init-done")
            wl = Workload(m, cdir, out_dir)
            run_workload(wl, out_dir, procs)
        finally:
            for p in procs:
                p.kill()
    t_work = time.monotonic() - t0

    records = lw.read_log(logp)
    model = lw.ReplayModel(records, m.initial)
    cuts = model.cuts(start=model.mark_index("init-done") + 1)
    sdir = tmp_path / "state"
    checked = 0
    failures: list[Failure] = []
    seen: set[tuple[Any, ...]] = set()
    for rnd in range(ROUNDS):
        for state in model.all_states(cuts, n_random=N_RANDOM, seed=f"{SEED}.{rnd}"):
            if state.key in seen:  # the same state from another cut or round
                continue
            seen.add(state.key)
            shutil.rmtree(sdir, ignore_errors=True)
            model.materialize(state, sdir)
            started, synced = cut_progress(model, state.cut.index)
            rec, problems = recover(sdir, m.path)
            if rec is not None:
                problems = check_recovered(rec, wl, started, synced)
            checked += 1
            if problems:
                failures.append(Failure(state, started, problems))
    t_all = time.monotonic() - t0
    summary = (f"{checked} crash states checked ({len(cuts)} cuts, {len(records)} log "
               f"records, {len(wl.ops) - 1} operations, {wl.reused_blocks()} disk blocks "
               f"reused by another file; workload {t_work:.1f} s, total {t_all:.1f} s)")
    print(summary)
    record_property("crash_states_checked", checked)
    # The test is only as good as its workload: it must have reused freed blocks, and
    # produced a fair number of states.
    assert wl.reused_blocks() > 0, "no file reused another file's freed blocks: the " \
        "workload no longer exposes metadata-before-data (did the allocator change?)"
    assert len(cuts) > 50 and checked > 200, summary
    if failures:
        first = failures[0]
        shutil.rmtree(sdir, ignore_errors=True)
        model.materialize(first.state, sdir)
        rec, _ = recover(sdir, m.path)
        text = [f"{len(failures)} of {summary} fail:",
                explain(first.state, model, wl, sdir, rec, first.problems)]
        for fl in failures[1:MAX_REPORTED]:
            text.append(f"- cut {fl.state.cut.index} ({fl.state.cut.why}) "
                        f"{fl.state.label}: " + "\n    ".join(fl.problems[:3]))
        report = tmp_path / "power-loss-report.txt"
        report.write_text("\n".join(text) + "\n\nall failing states:\n" + "\n".join(
            f"- cut {fl.state.cut.index} ({fl.state.cut.why}) {fl.state.label}: "
            + "\n    ".join(fl.problems) for fl in failures) + "\n\noperations:\n" +
            "\n".join(f"{i:4} {d}" for i, d in enumerate(wl.ops)) + "\n")
        text.append(f"(every failing state and the operations: {report})")
        pytest.fail("\n".join(text), pytrace=False)
