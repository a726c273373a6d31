"""Write-back errors are per file, never per node (issue 10, item 1 and its fault suite).

What is proven here:

- **Item 1 reproduced as the issue describes it** (real processes, FUSE mounts, a real
  128 MiB disk with about 49 MB free, ``dd`` filling it from another mount): the backup
  fails cleanly (exit 6, one line naming the node and the path), nobody is fenced,
  ``sdbackup status`` shows the failing write-back, the program's later ``fsync()`` and
  ``close()`` return ENOSPC (not 0), nothing is lost, and once space is freed a retry
  writes the program's 300 KB.
- **Fault injection per inode at one node's disk layer** (in-process: a coordinator and
  node agents over real TCP, as in ``test_cluster_races.py``): EIO and ENOSPC from the
  disk (``BlockDevice.write``) and ENOSPC from the cluster's allocation
  (``map_write``) for one inode only, while other files of that node are dirty too. The
  other files are written and committed, the failing file keeps its data (and gives its
  reserved blocks back), ``error_since`` names only that inode, ``fsync`` gets the right
  errno, another node gets EIO while the fault lasts and the right data after, a backup's
  freeze fails naming the node and the path, and the node is never fenced.
- **The error reaches exactly the programs that have the file open** (FUSE, real
  programs, a node process with the same faults injected by a wrapper): two programs
  with the failing file open get it once each, a program with another file open never.
- Operations around a failing file: unlink and rename over it proceed, truncate is
  refused; a removed file's unwritable data never reaches a later file; evictions and
  the cluster-wide flush do not turn one file's error into other programs' errors.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import test_backup_support as support

try:  # tests/ as a plain directory of modules...
    from cluster_helpers import PY, ClusterProcs, sdb, wait_for
except ModuleNotFoundError:  # ...or as a package (with tests/__init__.py)
    from tests.cluster_helpers import PY, ClusterProcs, sdb, wait_for

from sdbackup.backup.engine import BackupOptions, run_backup
from sdbackup.blocks.device import BlockDevice
from sdbackup.cluster.backup_source import CoordinatorSource
from sdbackup.cluster.coordinator import Coordinator
from sdbackup.cluster.local import DiskSpec, init_cluster
from sdbackup.cluster.node import ClusterClient, NodeAgent
from sdbackup.errors import FsError, NoSpaceError, RemoteError
from sdbackup.fs.cached import CachedFileSystem, WriteBackError
from sdbackup.fs.filesystem import FileSystem
from sdbackup.meta.fsck import check_all
from sdbackup.meta.types import WriteRun

MiB = 1 << 20
BS = 4096

# Fault kinds and the errno a program must see for each.
#   eio:    the disk refuses the write (OSError EIO from BlockDevice.write)
#   enospc: the host file system behind the disk is full (NoSpaceError from the write)
#   alloc:  the cluster has no free block for the file (FsError ENOSPC from map_write)
KIND_ERRNO = {"eio": errno.EIO, "enospc": errno.ENOSPC, "alloc": errno.ENOSPC}


def pattern(seed: int, n: int) -> bytes:
    """``n`` bytes that depend on ``seed`` (the programs below make the same ones)."""
    return random.Random(seed).randbytes(n)


def blocks(size: int) -> int:
    return -(-size // BS)


def read_all(fs: FileSystem, ino: int) -> bytes:
    size = fs.getattr(ino).size
    return fs.read(ino, 0, size) if size else b""


# -- in-process fault injection --------------------------------------------------------------


class Faults:
    """Write-back faults for chosen inodes, at one node's disk layer only.

    ``kind[ino]`` selects the fault of that inode's write-backs (see ``KIND_ERRNO``).
    The node's ``map_write`` runs first in every write-back of a segment and its disk
    writes follow in the same thread, so the inode being written back is known there:
    the node's disks fail only those writes. Other nodes (own ``BlockDevice`` objects)
    and the coordinator are untouched.
    """

    def __init__(self, node: ClusterClient) -> None:
        self.kind: dict[int, str] = {}
        self.hits: dict[int, int] = {}
        self._tl = threading.local()
        meta = node.fs.meta
        real_map: Callable[[int, int, int], list[WriteRun]] = meta.map_write

        def map_write(ino: int, fblock: int, count: int) -> list[WriteRun]:
            self._tl.kind = None
            kind = self.kind.get(ino)
            if kind == "alloc":
                self.hits[ino] = self.hits.get(ino, 0) + 1
                raise FsError(errno.ENOSPC, "no space left on the cluster's disks (injected)")
            runs = real_map(ino, fblock, count)
            self._tl.kind = kind
            if kind is not None:
                self.hits[ino] = self.hits.get(ino, 0) + 1
            return runs

        meta.map_write = map_write  # type: ignore[method-assign]
        for dev in node.disks.by_id.values():
            self._wrap(dev)

    def _wrap(self, dev: BlockDevice) -> None:
        real = dev.write

        def write(block: int, data: Any) -> None:
            kind = getattr(self._tl, "kind", None)
            if kind == "eio":
                raise OSError(errno.EIO, "Input/output error (injected)")
            if kind == "enospc":
                raise NoSpaceError("the host file system holding the disk is full (injected)")
            real(block, data)

        dev.write = write  # type: ignore[method-assign]


@pytest.fixture
def cdir(tmp_path: Path) -> Path:
    init_cluster(tmp_path / "c", [DiskSpec.parse(f"d0={tmp_path}/d0.img:32MiB")],
                 block_size=BS)
    return tmp_path / "c"


@pytest.fixture
def coord(cdir: Path) -> Iterator[Coordinator]:
    c = Coordinator(cdir, lease=3.0)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def _coordinator_fenced(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "sdbackup.coordinator" and ("fenced" in r.getMessage()
                                                     or "LOST" in r.getMessage())]


def _dirty_rows(coord: Coordinator) -> set[tuple[str, int]]:
    """(node, inode) of every dirty area in the coordinator's cache table (the dirty
    flags are one-way notifications from the nodes, so they may lag a little)."""
    return {(e.node.partition("#")[0], e.ino) for e in coord.rights.table() if e.dirty}


def _make(fs: CachedFileSystem, name: bytes, seed: int, size0: int, at: int, n: int
          ) -> tuple[int, bytes]:
    """A file with ``size0`` bytes written and fsynced, then ``n`` more bytes at ``at``
    left dirty (in place over old blocks, and past the end into new ones). Returns the
    inode and the contents the file must end up with."""
    ino = fs.create(1, name).ino
    base = pattern(seed, size0)
    fs.write(ino, 0, base)
    fs.fsync(ino)
    upd = pattern(seed + 1, n)
    fs.write(ino, at, upd)
    want = bytearray(base)
    want[at : at + n] = upd
    return ino, bytes(want)


@pytest.mark.parametrize("kind", ["eio", "enospc", "alloc"])
def test_a_failing_write_back_stays_with_its_file(
        coord: Coordinator, cdir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        kind: str) -> None:
    """One inode's write-back fails at node a's disk layer while two other files of a are
    dirty too: the others are written and committed, only the failing file stays dirty
    (its reserved blocks given back), its error is reported for that inode only and
    once per opener, fsync gets the right errno, node b gets EIO for that file while the
    fault lasts and the right data after, a backup's freeze fails naming node and path
    (the cluster thaws), status shows the failing write-back, nothing is fenced or lost.
    """
    caplog.set_level(logging.INFO)
    want_errno = KIND_ERRNO[kind]
    a = NodeAgent("a", cluster_dir=cdir, flush_delay=60)
    a.start()
    b = ClusterClient("b", cluster_dir=cdir, flush_delay=60)
    faults = Faults(a)
    try:
        fs = a.fs
        bad, bad_want = _make(fs, b"bad", 10, 300_000, 100_000, 1_400_000)
        good1, good1_want = _make(fs, b"good1", 20, 300_000, 50_000, 200_000)
        good2, good2_want = _make(fs, b"good2", 30, 1_000_000, 900_000, 1_500_000)
        assert sorted(fs.dirty_segments()) == sorted([bad, good1, good2])
        session = {r["name"]: r["session"] for r in coord.node_reports()}["a"]
        free0 = coord.meta.statfs().free
        seq0 = fs.error_seq()

        faults.kind[bad] = kind
        with pytest.raises(WriteBackError) as ei:
            fs.flush_all()
        assert set(ei.value.failed) == {bad}, ei.value
        assert ei.value.errno == want_errno
        assert faults.hits.get(bad), "the fault was never hit: the test proves nothing"

        # The other files were written and committed; only the failing one is dirty.
        assert fs.dirty_segments() == {bad: [0, 1]}
        wait_for(lambda: _dirty_rows(coord) == {("a", bad)}, 5,
                 "the coordinator's table to show only the failing file dirty")
        for ino, want in ((good1, good1_want), (good2, good2_want)):
            assert coord.meta.getattr(ino).size == len(want)
            assert read_all(b.fs, ino) == want
        assert coord.meta.getattr(bad).size == 300_000  # nothing of the failed one
        # Only the good files' new blocks are taken: the failed file gave its back.
        grown = (blocks(len(good1_want)) - blocks(300_000)) + \
            (blocks(len(good2_want)) - blocks(1_000_000))
        assert coord.meta.statfs().free == free0 - grown

        # errseq: that inode only, once per opener.
        got = fs.error_since(bad, seq0)
        assert got is not None and got[0] == want_errno, got
        assert fs.error_since(good1, seq0) is None
        assert fs.error_since(good2, seq0) is None
        told = fs.error_seq()  # one opener was told
        assert fs.error_since(bad, told) is None
        assert fs.error_since(bad, seq0) is not None  # another opener still will be

        # fsync of that inode: the right errno (the write-back is tried again).
        with pytest.raises(OSError) as e2:
            fs.fsync(bad)
        assert e2.value.errno == want_errno
        fs.fsync(good1)

        # Another node: EIO while the fault lasts (reads and writes), the others fine.
        with pytest.raises(OSError) as e3:
            b.fs.read(bad, 0, 4096)
        assert e3.value.errno == errno.EIO, e3.value
        with pytest.raises(OSError) as e4:
            b.fs.write(bad, 0, b"x" * 100)
        assert e4.value.errno == errno.EIO, e4.value
        assert read_all(b.fs, good2) == good2_want

        # Status shows it; the node is the same session (not fenced, not dropped).
        rep = {r["name"]: r for r in coord.node_reports()}["a"]
        assert (rep["state"], rep["session"]) == ("up", session)
        assert list(rep["write_back_errors"]) == ["/bad"], rep

        # A backup's freeze fails cleanly, naming the node and the path; writes go on.
        exc = NoSpaceError if want_errno == errno.ENOSPC else RemoteError
        with pytest.raises(exc) as e5:
            run_backup(CoordinatorSource(coord), tmp_path / "medium",
                       BackupOptions(log_mode="central"))
        assert "node a " in e5.value.message and "/bad" in e5.value.message, e5.value
        assert not coord.rights.frozen
        b.fs.write(good1, 0, b"after the failed backup")
        b.fs.fsync(good1)
        good1_want = b"after the failed backup" + good1_want[23:]
        assert _coordinator_fenced(caplog) == []

        # The fault goes: node b reads the right data, node a has nothing dirty left.
        faults.kind.clear()
        assert read_all(b.fs, bad) == bad_want
        assert fs.dirty_segments() == {}
        fs.fsync(bad)
        assert fs.error_since(bad, fs.error_seq()) is None  # a new opener sees nothing
        assert read_all(fs, good1) == good1_want
        rep = {r["name"]: r for r in coord.node_reports()}["a"]
        assert rep["write_back_errors"] == {} and rep["session"] == session
        assert _coordinator_fenced(caplog) == []
    finally:
        faults.kind.clear()
        b.close()
        a.stop()


def test_unlink_and_rename_over_proceed_truncate_is_refused(
        coord: Coordinator, cdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """While node a cannot write a file back: another node's truncate of it fails with a's
    error and changes nothing (strict); unlink of it and rename over it proceed (the data
    of a removed file may go, as POSIX allows); nobody is fenced; once the fault is gone,
    a's data of the removed files is dropped without an error and fsck is clean."""
    caplog.set_level(logging.INFO)
    a = ClusterClient("a", cluster_dir=cdir, flush_delay=60)
    b = ClusterClient("b", cluster_dir=cdir, flush_delay=60)
    faults = Faults(a)
    try:
        keep, keep_want = _make(a.fs, b"keep", 1, 100_000, 0, 50_000)
        gone, _ = _make(a.fs, b"gone", 3, 100_000, 100_000, 100_000)
        other = b.fs.create(1, b"other").ino
        b.fs.write(other, 0, b"other" * 1000)
        b.fs.fsync(other)
        faults.kind[keep] = "eio"
        faults.kind[gone] = "eio"

        with pytest.raises(OSError) as ei:
            b.fs.truncate(keep, 10)
        assert ei.value.errno == errno.EIO, ei.value
        assert coord.meta.getattr(keep).size == 100_000
        assert sorted(a.fs.dirty_segments()) == sorted([keep, gone])

        b.fs.unlink(1, b"gone")
        with pytest.raises(OSError) as e2:
            b.fs.lookup(1, b"gone")
        assert e2.value.errno == errno.ENOENT
        b.fs.rename(1, b"other", 1, b"keep")
        assert read_all(b.fs, b.fs.lookup(1, b"keep").ino) == b"other" * 1000
        assert _coordinator_fenced(caplog) == []

        faults.kind.clear()
        a.fs.flush_all()  # the removed files' data: dropped, not an error
        assert a.fs.dirty_segments() == {}
        assert read_all(a.fs, other) == b"other" * 1000
        assert keep_want  # (a's data of the replaced file is gone with the file)
    finally:
        faults.kind.clear()
        b.close()
        a.close()
    with coord.store.lock:
        assert check_all(coord.store) == []


def test_a_removed_file_s_unwritten_data_never_reaches_a_new_file(
        coord: Coordinator, cdir: Path) -> None:
    """An unlink goes on although node a cannot write the file back (lenient). a's dirty
    data and write right of that inode must go with the file: a file created afterwards
    (which may get the same inode number) must hold exactly what was written to it."""
    a = ClusterClient("a", cluster_dir=cdir, flush_delay=60)
    b = ClusterClient("b", cluster_dir=cdir, flush_delay=60)
    faults = Faults(a)
    try:
        victim = a.fs.create(1, b"victim").ino  # the newest inode
        a.fs.write(victim, 0, b"V" * 200_000)  # acknowledged, dirty on a only
        faults.kind[victim] = "eio"
        b.fs.unlink(1, b"victim")
        faults.kind.clear()

        fresh = b.fs.create(1, b"fresh").ino
        note = f"(the new file is inode {fresh}; the removed one was inode {victim})"
        b.fs.write(fresh, 0, b"F" * 1000)
        b.fs.fsync(fresh)
        a.fs.flush_all()
        assert read_all(b.fs, fresh) == b"F" * 1000, \
            f"a removed file's data landed in a new file {note}"
        assert read_all(a.fs, fresh) == b"F" * 1000, note
    finally:
        faults.kind.clear()
        b.close()
        a.close()


def test_last_close_of_a_file_that_cannot_be_written_back_still_closes_it(
        coord: Coordinator, cdir: Path) -> None:
    """A program closes a file whose write-back fails (close(2) reports the error; FUSE
    then sends RELEASE). The close must still reach the coordinator: a file that is
    (or later gets) unlinked is then freed, its blocks given back. Otherwise the
    coordinator counts it open for as long as the node lives (``rm`` frees nothing)."""
    a = ClusterClient("a", cluster_dir=cdir, flush_delay=60)
    b = ClusterClient("b", cluster_dir=cdir, flush_delay=60)
    faults = Faults(a)
    try:
        ino, _ = _make(a.fs, b"held", 1, 400_000, 0, 100_000)
        a.fs.open(ino)
        faults.kind[ino] = "eio"
        try:  # FUSE RELEASE after close(): its error goes nowhere, the close must count
            a.fs.release(ino)
        except OSError:
            pass
        free0 = coord.meta.statfs().free
        b.fs.unlink(1, b"held")
        try:
            coord.meta.getattr(ino)
        except OSError as e:
            assert e.errno == errno.ENOENT, e
        else:
            pytest.fail("the unlinked file was not freed: the coordinator still counts it "
                        "open (the close after a failed write-back never reached it)")
        assert coord.meta.statfs().free == free0 + blocks(400_000)
    finally:
        faults.kind.clear()
        b.close()
        a.close()


def test_eviction_does_not_fail_programs_of_other_files(coord: Coordinator, cdir: Path
                                                        ) -> None:
    """Node a's cache is full and holds a file it cannot write back: reads and writes of
    other files on a must still succeed (the write-back error belongs to the failing
    file's programs only), and the failing file's data must stay, not be lost."""
    a = ClusterClient("a", cluster_dir=cdir, cache_bytes=4 * MiB, flush_delay=60)
    b = ClusterClient("b", cluster_dir=cdir, flush_delay=60)
    faults = Faults(a)
    try:
        third = b.fs.create(1, b"third").ino
        third_data = pattern(3, 3 * MiB)
        b.fs.write(third, 0, third_data)
        b.fs.fsync(third)
        bad = a.fs.create(1, b"bad").ino
        bad_data = pattern(1, 2 * MiB)
        a.fs.write(bad, 0, bad_data)  # two dirty segments, the oldest in a's cache
        faults.kind[bad] = "eio"

        problems: list[str] = []
        try:
            if a.fs.read(third, 0, 3 * MiB) != third_data:
                problems.append("a read of another file returned wrong data")
        except OSError as e:
            problems.append(f"a read of another file failed: {e!r}")
        other = a.fs.create(1, b"other").ino
        other_data = pattern(2, 6 * MiB)
        for off in range(0, len(other_data), MiB):
            try:
                a.fs.write(other, off, other_data[off : off + MiB])
            except OSError as e:
                problems.append(f"a write of another file at {off} failed: {e!r}")
        assert problems == [], "\n".join(problems)
        a.fs.fsync(other)
        assert read_all(b.fs, other) == other_data
        assert set(a.fs.dirty_segments()) == {bad}  # kept, not lost

        faults.kind.clear()
        a.fs.fsync(bad)
        assert read_all(b.fs, bad) == bad_data
    finally:
        faults.kind.clear()
        b.close()
        a.close()


def test_cluster_flush_names_the_node_that_cannot_write_back(coord: Coordinator, cdir: Path
                                                             ) -> None:
    """The cluster-wide flush (``sdbackup flush``) with one file that node a cannot write
    back: the other files are written, and the answer names node a at once (it
    answered), instead of waiting out the timeout with no word of why."""
    a = NodeAgent("a", cluster_dir=cdir, flush_delay=60)
    a.start()
    faults = Faults(a)
    try:
        bad, _ = _make(a.fs, b"bad", 1, 100_000, 0, 50_000)
        good, good_want = _make(a.fs, b"good", 3, 100_000, 0, 50_000)
        faults.kind[bad] = "eio"
        t = time.monotonic()
        r = coord.flush_all(timeout=4.0)
        took = time.monotonic() - t
        assert a.fs.dirty_segments() == {bad: [0]}
        assert read_all(a.fs, good) == good_want
        assert not r["clean"]
        assert "a" in r["errors"], f"the flush does not say which node failed: {r}"
        assert took < 2.0, f"the flush waited {took:.1f} s for a node that had answered"
    finally:
        faults.kind.clear()
        a.stop()


# -- FUSE: real programs, real mounts ----------------------------------------------------------

_FAULTY_NODE = textwrap.dedent('''
    """``sdbackup`` with per-inode write-back faults (tests/test_writeback_errors.py).

    $SDB_TEST_FAULTS names a JSON file {"INODE": "eio" | "enospc" | "alloc"}, read at
    every map_write of this process's write-backs; the disk writes that follow in the
    same thread fail as that kind says. Only this process is affected.
    """
    import errno, json, os, sys, threading
    from sdbackup.blocks.device import BlockDevice
    from sdbackup.net.remote import RemoteMeta
    from sdbackup.errors import FsError, NoSpaceError

    _tl = threading.local()
    _real_map, _real_write = RemoteMeta.map_write, BlockDevice.write

    def _kind(ino):
        try:
            with open(os.environ["SDB_TEST_FAULTS"]) as f:
                return json.load(f).get(str(ino))
        except (OSError, ValueError):
            return None

    def map_write(self, ino, fblock, count):
        _tl.kind = None
        kind = _kind(ino)
        if kind == "alloc":
            raise FsError(errno.ENOSPC, "no space left on the cluster's disks (injected)")
        runs = _real_map(self, ino, fblock, count)
        _tl.kind = kind
        return runs

    def write(self, block, data):
        kind = getattr(_tl, "kind", None)
        if kind == "eio":
            raise OSError(errno.EIO, "Input/output error (injected)")
        if kind == "enospc":
            raise NoSpaceError("the host file system holding the disk is full (injected)")
        return _real_write(self, block, data)

    RemoteMeta.map_write = map_write
    BlockDevice.write = write
    from sdbackup.cli.main import main
    main(sys.argv[1:])
''')

_PROGRAM = textwrap.dedent('''
    import json, os, random, sys
    path, how = sys.argv[1], sys.argv[2]
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if how == "create" else 0), 0o644)
    print(json.dumps({"op": "open", "errno": 0}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        err = 0
        try:
            if cmd[0] == "write":
                off, n, seed = map(int, cmd[1:4])
                if os.pwrite(fd, random.Random(seed).randbytes(n), off) != n:
                    err = -1
            elif cmd[0] == "fsync":
                os.fsync(fd)
            elif cmd[0] == "close":
                os.close(fd)
            elif cmd[0] == "reopen":
                fd = os.open(path, os.O_RDWR)
        except OSError as e:
            err = e.errno
        print(json.dumps({"op": cmd[0], "errno": err}), flush=True)
''')


class Program:
    """A real program with a file open on a mount, driven one system call at a time."""

    def __init__(self, path: Path, create: bool = False) -> None:
        self.path = path
        self.p = subprocess.Popen([PY, "-c", _PROGRAM, str(path), "create" if create
                                   else "open"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.errors: list[tuple[str, int]] = []
        assert self._answer()["op"] == "open"

    def _answer(self) -> dict[str, Any]:
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        if not line:
            err = self.p.stderr.read() if self.p.stderr else ""
            raise AssertionError(f"program on {self.path} exited ({self.p.poll()}): {err}")
        got: dict[str, Any] = json.loads(line)
        return got

    def do(self, *cmd: object) -> int:
        """Run one call (write OFF N SEED, fsync, close, reopen); returns its errno."""
        assert self.p.stdin is not None
        self.p.stdin.write(" ".join(map(str, cmd)) + "\n")
        self.p.stdin.flush()
        e = int(self._answer()["errno"])
        if e:
            self.errors.append((str(cmd[0]), e))
        return e

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(10)


def require_fuse() -> None:
    """Fail (never skip) when this machine cannot run FUSE tests."""
    support.require_fuse("FUSE tests")


def mounted(mp: Path) -> bool:
    needle = f" {os.path.abspath(mp)} "
    with open("/proc/self/mountinfo") as f:
        return any(needle in line and "fuse.sdbackup" in line for line in f)


class FuseCluster:
    """A coordinator and mounted node agents (real processes), torn down in any case."""

    def __init__(self, base: Path, disk_size: str) -> None:
        self.cp = ClusterProcs(base, block_size=BS, disk_size=disk_size)
        self.mounts: dict[str, Path] = {}
        self.programs: list[Program] = []
        self.faults = base / "faults.json"

    def start_node(self, name: str, *, flush_delay: float, cache_size: str = "64MiB",
                   faulty: bool = False) -> Path:
        mp = self.cp.base / f"mnt-{name}"
        mp.mkdir()
        args = ["node", str(self.cp.dir), "--name", name, "--flush-delay", str(flush_delay),
                "--cache-size", cache_size, "--mount", str(mp)]
        if faulty:
            p = self.cp.spawn(f"node-{name}", ["env", f"SDB_TEST_FAULTS={self.faults}", PY,
                                                "-c", _FAULTY_NODE, *args])
            self.cp._wait_addr(self.cp.dir / "nodes" / f"{name}.addr", p)
            self.cp.nodes[name] = p
        else:
            p = self.cp.spawn(f"node-{name}", [PY, "-m", "sdbackup.cli.main", *args])
            self.cp._wait_addr(self.cp.dir / "nodes" / f"{name}.addr", p)
            self.cp.nodes[name] = p
        self.mounts[name] = mp

        def up() -> bool:
            if not p.alive():
                raise AssertionError(f"node {name} exited: {p.output()[-2000:]}")
            return mounted(mp) and os.stat(mp).st_dev != os.stat(self.cp.base).st_dev

        wait_for(up, 30, f"node {name} to mount {mp}")
        return mp

    def set_faults(self, faults: dict[int, str]) -> None:
        tmp = self.faults.with_suffix(".tmp")
        tmp.write_text(json.dumps({str(k): v for k, v in faults.items()}))
        tmp.replace(self.faults)

    def program(self, path: Path, create: bool = False) -> Program:
        prog = Program(path, create)
        self.programs.append(prog)
        return prog

    def node_sessions(self) -> dict[str, tuple[str, str]]:
        return {n["name"]: (n["state"], n["session"]) for n in self.cp.status()["nodes"]
                if n["kind"] == "node"}

    def teardown(self) -> None:
        self.set_faults({})
        for prog in self.programs:
            prog.kill()
        for name, p in list(self.cp.nodes.items()):
            try:
                p.stop(timeout=30)
            except AssertionError:
                pass
            mp = self.mounts.get(name)
            if mp is not None and mounted(mp):
                subprocess.run(["fusermount3", "-uz", str(mp)], check=False,
                               capture_output=True)
        self.cp.cleanup()


@pytest.fixture
def fuse_cluster(tmp_path: Path) -> Iterator[Callable[[str], FuseCluster]]:
    """Factory: ``fuse_cluster(disk_size)`` -> a FuseCluster (one per test)."""
    require_fuse()
    made: list[FuseCluster] = []

    def make(disk_size: str) -> FuseCluster:
        fc = FuseCluster(tmp_path, disk_size)
        made.append(fc)
        return fc

    try:
        yield make
    finally:
        for fc in made:
            fc.teardown()


def free_bytes(mp: Path) -> int:
    st = os.statvfs(mp)
    return st.f_bavail * st.f_frsize


def fill(path: Path, n: int) -> None:
    """Write ``n`` bytes to a new file and fsync it (raises if they do not fit)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        chunk = b"P" * MiB
        for off in range(0, n, MiB):
            os.pwrite(fd, chunk[: min(MiB, n - off)], off)
        os.fsync(fd)
    finally:
        os.close(fd)


def stable_free(mp: Path) -> int:
    """Free bytes once the count holds still (a write-back that fails reserves blocks for
    a moment before it gives them back)."""
    last = free_bytes(mp)
    for _ in range(50):
        time.sleep(0.3)
        now = free_bytes(mp)
        if now == last:
            return now
        last = now
    return last


def top_off(mp: Path, below: int) -> list[Path]:
    """Take free space with fsynced files until less than ``below`` bytes are free
    (16 blocks are left as a margin against a reservation that comes and goes)."""
    pads = []
    for i in range(5):
        left = stable_free(mp)
        if left < below:
            return pads
        pads.append(mp / f"pad{i}")
        fill(pads[-1], left - 16 * BS)
    raise AssertionError(f"could not fill the disk: {free_bytes(mp)} bytes still free")


def _log_lines(text: str, *needles: str) -> list[str]:
    return [ln for ln in text.splitlines() if any(n in ln for n in needles)]


@pytest.mark.slow
@pytest.mark.fuse
def test_issue10_item1_full_disk_backup_fails_cleanly_and_nothing_is_lost(
        fuse_cluster: Callable[[str], FuseCluster], tmp_path: Path) -> None:
    """Issue 10, item 1, as the issue's repro: a 128 MiB disk with about 49 MB free; n1
    (``--flush-delay 120``, mounted) holds a program's 300 KB unwritten while ``dd`` on
    n2's mount fills the disk; ``sdbackup backup`` must fail with exit 6 and one line
    naming a node and a path, no node is fenced or dropped, status shows the failing
    write-back, the program's fsync() and close() return ENOSPC, nothing is logged lost,
    and after ``rm big`` a retry (fsync) writes the 300 KB.

    n2 runs with an 8 MiB cache so that dd's data reaches the disk as dd goes (with a
    cache larger than the file, the whole failed file gives its blocks back at close and
    the disk never fills). What dd leaves free (less than one eviction batch) is then
    taken by files written on n1 and fsynced, so that the 300 KB cannot be placed.
    """
    fc = fuse_cluster("128MiB")
    cp = fc.cp
    filler = tmp_path / "filler.bin"
    with open(filler, "wb") as f:
        size = ((128 * MiB - 49_000_000) // BS - 1) * BS
        chunk = b"F" * MiB
        for off in range(0, size, MiB):
            f.write(chunk[: min(MiB, size - off)])
    sdb("fs", str(cp.dir), "put", str(filler), "/filler", check=True, timeout=180)
    filler.unlink()
    cp.start_coordinator(lease=5.0)
    m1 = fc.start_node("n1", flush_delay=120)
    m2 = fc.start_node("n2", flush_delay=120, cache_size="8MiB")
    assert 47_000_000 < free_bytes(m1) < 50_000_000, free_bytes(m1)
    sessions = fc.node_sessions()

    app = fc.program(m1 / "app.dat", create=True)
    data = pattern(10, 300_000)
    assert app.do("write", 0, 300_000, 10) == 0  # acknowledged; it sleeps before fsync

    dd = subprocess.run(["dd", "if=/dev/zero", f"of={m2 / 'big'}", "bs=1M", "count=60"],
                        capture_output=True, text=True, timeout=180)
    assert dd.returncode != 0 and "No space left on device" in dd.stderr, dd.stderr
    pads = top_off(m1, len(data))

    medium = tmp_path / "medium"
    r = sdb("backup", str(cp.dir), "--medium", str(medium), timeout=180)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 6, f"exit {r.returncode}: {r.stdout}{r.stderr}"
    assert len(lines) == 1 and lines[0].startswith("sdbackup: error: "), r.stderr
    print(f"backup exit {r.returncode}: {lines[0]}")  # shown with -s / on failure
    failing = [("n1", "/app.dat"), ("n2", "/big")]
    assert any(f"node {n} " in lines[0] and f"{p} " in lines[0] for n, p in failing), lines[0]
    gens = json.loads(sdb("generations", "--medium", str(medium), "--json",
                          check=True).stdout)
    assert gens["generations"] == []

    # Nobody fenced or dropped: same sessions, up; status shows the failing write-back.
    assert fc.node_sessions() == sessions
    st = cp.status()
    reports = {n["name"]: n for n in st["nodes"] if n["kind"] == "node"}
    assert "/app.dat" in reports["n1"]["write_back_errors"], reports["n1"]
    assert st["losses"] == [] and not st["frozen"]
    text = sdb("status", str(cp.dir), check=True).stdout
    assert "write-back failing on node n1: /app.dat" in text, text

    # The program learns of it: its fsync() and close() return ENOSPC, not 0.
    assert app.do("fsync") == errno.ENOSPC
    assert app.do("close") == errno.ENOSPC

    # Free space; a retry of the write-back (fsync) succeeds and the data is all there.
    os.unlink(m2 / "big")
    for pad in pads:
        os.unlink(pad)
    wait_for(lambda: free_bytes(m1) > 10 * MiB, 10, "rm big to free its blocks (dd's close "
             "failed: does the coordinator still count big open on n2?)")
    assert app.do("reopen") == 0
    assert app.do("fsync") == 0
    assert app.do("close") == 0
    assert (m2 / "app.dat").read_bytes() == data
    assert (m1 / "app.dat").read_bytes() == data
    st = cp.status()
    assert {n["name"]: n["write_back_errors"] for n in st["nodes"]
            if n["kind"] == "node"}["n1"] == {}
    assert st["losses"] == []
    assert fc.node_sessions() == sessions
    for name, log in [("coordinator", cp.coordinator_log()), ("n1", cp.node_log("n1")),
                      ("n2", cp.node_log("n2"))]:
        assert _log_lines(log, "LOST", "fenced", "cache dropped") == [], name
    r = sdb("backup", str(cp.dir), "--medium", str(medium), timeout=180)
    assert r.returncode == 0, r.stderr

    # The failed close still closed the file: once removed, its blocks come back.
    before = free_bytes(m1)
    os.unlink(m2 / "app.dat")
    time.sleep(0.5)
    assert free_bytes(m1) >= before + blocks(len(data)) * BS, \
        "app.dat's blocks were not freed after rm: the coordinator still counts it open"


@pytest.mark.slow
@pytest.mark.fuse
@pytest.mark.parametrize("kind", ["eio", "enospc"])
def test_write_back_error_reaches_exactly_the_programs_with_the_file_open(
        fuse_cluster: Callable[[str], FuseCluster], kind: str) -> None:
    """Through FUSE: programs P1 and P2 have /bad open on n1, P3 has /good open there.
    n1's disk fails the write-backs of /bad only (injected in the n1 process). A read of
    /bad on n2 gets EIO and makes n1 try; then P1 and P2 each get the error exactly
    once (at their next write), P3 never; /good is written normally; n1 is not fenced.
    Once the fault is gone every fsync and close returns 0 and n2 reads all the data."""
    want = KIND_ERRNO[kind]
    fc = fuse_cluster("64MiB")
    fc.set_faults({})
    fc.cp.start_coordinator(lease=5.0)
    m1 = fc.start_node("n1", flush_delay=120, faulty=True)
    m2 = fc.start_node("n2", flush_delay=120)
    for name, seed in (("bad", 1), ("good", 2)):
        (m1 / name).write_bytes(pattern(seed, 100_000))
    sessions = fc.node_sessions()
    p1, p2 = fc.program(m1 / "bad"), fc.program(m1 / "bad")
    p3 = fc.program(m1 / "good")
    assert p1.do("write", 0, 200_000, 11) == 0
    assert p3.do("write", 0, 200_000, 13) == 0
    bad_ino = os.stat(m1 / "bad").st_ino

    fc.set_faults({bad_ino: kind})
    with pytest.raises(OSError) as ei:
        (m2 / "bad").read_bytes()
    assert ei.value.errno == errno.EIO
    assert (m2 / "good").read_bytes() == pattern(13, 200_000)  # written normally
    st = fc.cp.status()
    rep = {n["name"]: n for n in st["nodes"] if n["kind"] == "node"}["n1"]
    assert list(rep["write_back_errors"]) == ["/bad"], rep

    # The error reaches P1 and P2 once each, at their next write; P3 never.
    assert p1.do("write", 300_000, 4096, 21) == want
    assert p1.do("write", 300_000, 4096, 21) == 0
    assert p2.do("write", 400_000, 4096, 22) == want
    assert p2.do("write", 400_000, 4096, 22) == 0
    assert p3.do("write", 200_000, 4096, 23) == 0
    assert p3.do("fsync") == 0

    fc.set_faults({})
    for p in (p1, p2, p3):
        assert p.do("fsync") == 0
        assert p.do("close") == 0
    assert p1.errors == [("write", want)]
    assert p2.errors == [("write", want)]
    assert p3.errors == []
    expect = bytearray(pattern(11, 200_000))
    expect += bytes(100_000) + pattern(21, 4096) + bytes(400_000 - 304_096) + pattern(22, 4096)
    assert (m2 / "bad").read_bytes() == bytes(expect)
    assert (m2 / "good").read_bytes() == pattern(13, 200_000) + pattern(23, 4096)
    assert fc.node_sessions() == sessions
    assert fc.cp.status()["losses"] == []
    assert _log_lines(fc.cp.coordinator_log(), "LOST", "fenced") == []
