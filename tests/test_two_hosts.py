"""Two hosts on one LUN, for real (issue 9): two loop devices over one disk image.

Each loop device has its own page cache, exactly like two hosts that see one shared
LUN: a block written through loop A and read through loop B is only seen if both
sides bypass their page cache (``O_DIRECT``). The cluster is created on loop A
(``cluster.toml``), so the coordinator and node ``n1`` use loop A; node ``n2`` is told
``--disk d0=LOOP_B``, either with the cluster directory or, like a host without it,
with ``--coordinator HOST:PORT --secret-file FILE``.

What is proven here:

- **Control-port ping-pong**: thousands of rounds in which one node overwrites a
  range in place (every byte changes, so any stale byte shows) and the other node
  reads it at once, then the other way round: partial blocks, whole blocks, ranges
  across a 1 MiB segment boundary, the file's partial last block. Never a stale
  read; afterwards the raw blocks read through *both* loop devices (``O_DIRECT``)
  equal the model.
- **FUSE ping-pong**: the same through kernel mounts on both nodes, with real
  programs (``dd``) and in-process ``pwrite``/``close``, ``read`` and ``mmap``:
  close-to-open coherence across two page caches; a close on one node puts the data
  on the shared disk, where the other loop device sees it.
- **Online backup** while both nodes write (n2 through loop B) restores exactly the
  T0 image that the coordinator dumped while the cluster was frozen.
- **A wrong disk is refused**: a node given another cluster's disk, an unlabelled
  file, a missing path or a read-only loop device of the right disk exits with code
  2 and one error line naming the disk and the path, and never appears at the
  coordinator.

Every test FAILS (never skips) where ``losetup`` or loop devices are unavailable.
Loop devices are always detached in teardown, FUSE mounts always unmounted.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

import pytest
import test_backup_support as support

try:  # tests/ as a plain directory of modules...
    from cluster_helpers import PY, ClusterProcs, Proc, sdb, sdb_cmd, wait_for
except ModuleNotFoundError:  # ...or as a package (with tests/__init__.py)
    from tests.cluster_helpers import PY, ClusterProcs, Proc, sdb, sdb_cmd, wait_for

from sdbackup.cluster.access import open_fs
from sdbackup.fs.filesystem import FileSystem

MiB = 1 << 20
BS = 4096
IMAGE_SIZE = 256 * MiB
LEASE = 5.0
FILE_SIZE = 3 * MiB + 4321  # four segments, the last one partial, a partial last block


# -- loop devices ------------------------------------------------------------------------

def require_losetup() -> None:
    """Fail (never skip) where loop devices cannot be used."""
    problems = []
    if shutil.which("losetup") is None:
        problems.append("losetup is not installed (Debian package util-linux/mount)")
    if os.geteuid() != 0:
        problems.append("the test must run as root to attach loop devices")
    if not os.path.exists("/dev/loop-control"):
        problems.append("/dev/loop-control is missing (no loop driver: modprobe loop)")
    if problems:
        pytest.fail("two-host tests cannot run: " + "; ".join(problems) +
                    " -- they need two loop devices over one image", pytrace=False)


@dataclass
class Loops:
    """Loop devices attached by one test; ``detach_all`` always runs in teardown."""

    devices: list[str] = field(default_factory=list)

    def attach(self, image: Path, *, read_only: bool = False) -> str:
        args = ["losetup", *(["-r"] if read_only else []), "--find", "--show", str(image)]
        r = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
        dev = r.stdout.strip()
        if r.returncode != 0 or not dev.startswith("/dev/"):
            pytest.fail(f"cannot attach a loop device: {' '.join(args)} exited "
                        f"{r.returncode}: {r.stderr.strip() or r.stdout.strip()}",
                        pytrace=False)
        self.devices.append(dev)
        return dev

    def detach_all(self) -> None:
        errors = []
        for dev in reversed(self.devices):
            r = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True,
                               timeout=60, check=False)
            if r.returncode != 0:
                errors.append(f"losetup -d {dev}: {r.stderr.strip()}")
        self.devices.clear()
        if errors:
            raise AssertionError("could not detach loop devices: " + "; ".join(errors))


@contextlib.contextmanager
def loop_devices() -> Iterator[Loops]:
    require_losetup()
    loops = Loops()
    try:
        yield loops
    finally:
        loops.detach_all()


def make_image(path: Path, size: int = IMAGE_SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)  # sparse
    return path


def raw_read(dev: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of a block device, read with ``O_DIRECT``.

    Bypasses this process's view through the device's page cache: what is on the
    shared medium now (offset and size are block-aligned).
    """
    assert offset % BS == 0 and size % BS == 0
    buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT requires
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        got = 0
        while got < size:
            n = os.preadv(fd, [memoryview(buf)[got:]], offset + got)
            if n <= 0:
                raise AssertionError(f"short O_DIRECT read of {dev} at {offset + got}")
            got += n
        return bytes(buf)
    finally:
        os.close(fd)
        buf.close()


def open_devices(pid: int) -> set[str]:
    """The block devices a process holds open (from /proc/PID/fd)."""
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("/dev/loop"):
            out.add(target)
    return out


# -- the cluster: coordinator and n1 on loop A, n2 on loop B ------------------------------

def mounted(mp: Path) -> bool:
    needle = f" {os.path.abspath(mp)} "
    with open("/proc/self/mountinfo") as f:
        return any(needle in line and "fuse.sdbackup" in line for line in f)


@dataclass
class TwoHosts(ClusterProcs):
    """A cluster on loop A with processes that see the disk through loop A or loop B."""

    loop_a: str = ""
    loop_b: str = ""
    mounts: dict[str, Path] = field(default_factory=dict)
    remote_logs: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.dir = self.base / "cluster"
        self.logs = self.base / "out"
        self.logs.mkdir(exist_ok=True)
        sdb("init", str(self.dir), "--disk", f"d0={self.loop_a}",
            "--block-size", str(self.block_size), check=True)

    def spawn_in(self, name: str, argv: list[str], cwd: Path) -> Proc:
        self._n += 1
        out = self.logs / f"{name}.{self._n}.out"
        with open(out, "wb") as fh:
            p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=cwd)
        proc = Proc(name, p, out)
        self.procs.append(proc)
        return proc

    def coordinator_address(self) -> str:
        return (self.dir / "coordinator.addr").read_text().split()[0]

    def start_n2(self, how: str, *, mount: Path | None = None,
                 flush_delay: float = 5.0) -> Proc:
        """Node n2 on loop B: with the cluster directory (``how="cluster-dir"``), or as a
        host without it (``how="remote"``: ``--coordinator`` and a copy of the secret)."""
        extra = ["--disk", f"d0={self.loop_b}"]
        if mount is not None:
            extra += ["--mount", str(mount)]
        if how == "cluster-dir":
            p = self.start_node("n2", flush_delay=flush_delay, extra=extra)
        else:
            assert how == "remote", how
            host = self.base / "host2"
            host.mkdir(exist_ok=True)
            secret = host / "secret"
            shutil.copyfile(self.dir / "secret", secret)
            secret.chmod(0o600)
            argv = sdb_cmd("node", "--coordinator", self.coordinator_address(),
                           "--secret-file", str(secret), "--name", "n2",
                           "--flush-delay", str(flush_delay), "--cache-size", "64MiB", *extra)
            p = self.spawn_in("node-n2", argv, cwd=host)
            self.nodes["n2"] = p
            log = host / "node-n2.log"
            self.remote_logs["n2"] = log
            self._publish_remote_control_port(p, log)
        if mount is not None:
            self._wait_mounted(p, mount)
        return p

    def _publish_remote_control_port(self, p: Proc, log: Path) -> None:
        """A node without the cluster directory publishes no address file; write the
        one ``open_fs(node="n2")`` reads, from the node's log (as the repro script does)."""
        pat = re.compile(r"listening on (\S+):(\d+)")

        def port() -> tuple[str, str] | None:
            if not p.alive():
                raise AssertionError(f"n2 exited with {p.popen.returncode} before it was "
                                     f"ready:\n{p.output()[-3000:]}")
            try:
                text = log.read_text(errors="replace")
            except FileNotFoundError:
                return None
            if "node n2 up" not in text:
                return None
            m = pat.findall(text)
            return m[-1] if m else None

        host, prt = wait_for(port, 30, "n2 (remote) to join and listen")
        nodes = self.dir / "nodes"
        nodes.mkdir(exist_ok=True)
        (nodes / "n2.addr").write_text(f"{host}:{prt} pid={p.pid}\n")

    def start_n1(self, *, mount: Path | None = None, flush_delay: float = 5.0) -> Proc:
        extra = ["--mount", str(mount)] if mount is not None else []
        p = self.start_node("n1", flush_delay=flush_delay, extra=extra)
        if mount is not None:
            self._wait_mounted(p, mount)
        return p

    def _wait_mounted(self, p: Proc, mp: Path) -> None:
        def up() -> bool:
            if not p.alive():
                raise AssertionError(f"{p.name} exited {p.popen.returncode} before it "
                                     f"mounted {mp}:\n{p.output()[-3000:]}")
            return mounted(mp) and os.stat(mp).st_dev != os.stat(mp.parent).st_dev

        wait_for(up, 30, f"{p.name} to mount {mp}")
        self.mounts[p.name] = mp

    def check_disk_views(self) -> None:
        """The setup is what it claims: coordinator and n1 hold loop A, n2 loop B only."""
        assert self.coordinator is not None
        want = {"coordinator": self.loop_a, "node-n1": self.loop_a, "node-n2": self.loop_b}
        for p in [self.coordinator, *self.nodes.values()]:
            held = open_devices(p.pid)
            assert held == {want[p.name]}, f"{p.name} holds {held}, expected {want[p.name]}"

    def unmount_all(self) -> None:
        """``sdbackup umount`` each mount; the agent writes back and exits by itself."""
        problems = []
        for name, mp in list(self.mounts.items()):
            if mounted(mp):
                r = sdb("umount", str(mp), timeout=90)
                if r.returncode != 0:
                    problems.append(f"sdbackup umount {mp}: {r.stderr.strip()}")
            p = self.nodes.get(name.removeprefix("node-"))
            if p is not None:
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    problems.append(f"{name} did not exit after its mount went away")
            if mounted(mp):  # last resort, so that nothing is left behind
                subprocess.run(["fusermount3", "-uz", str(mp)], check=False, timeout=30)
                problems.append(f"{mp} was still mounted")
            del self.mounts[name]
        if problems:
            raise AssertionError("; ".join(problems))

    def teardown(self) -> None:
        try:
            self.unmount_all()
        finally:
            for mp in self.mounts.values():
                if mounted(mp):
                    subprocess.run(["fusermount3", "-uz", str(mp)], check=False, timeout=30)
            self.cleanup()

    def all_logs(self) -> dict[str, str]:
        texts = {"coordinator.log": self.coordinator_log()}
        for p in (self.dir / "logs").glob("node-*.log"):
            texts[p.name] = p.read_text(errors="replace")
        for name, log in self.remote_logs.items():
            texts[f"remote {name}"] = log.read_text(errors="replace") if log.exists() else ""
        return texts

    def assert_clean_logs(self) -> None:
        """No traceback and no ERROR line in any log of the cluster's processes."""
        bad = []
        for name, text in self.all_logs().items():
            if "Traceback (most recent call last)" in text:
                bad.append(f"{name}: traceback:\n{text.split('Traceback')[1][:2000]}")
            bad += [f"{name}: {line}" for line in text.splitlines()
                    if " ERROR " in line or " CRITICAL " in line or "LOST" in line]
        assert not bad, "problems in the logs:\n" + "\n".join(bad[:20])

    def fsck(self) -> None:
        r = sdb("fsck", str(self.dir), timeout=120)
        assert r.returncode == 0, f"fsck: {r.stdout}{r.stderr}"


@contextlib.contextmanager
def two_hosts(base: Path, loops: Loops) -> Iterator[TwoHosts]:
    image = make_image(base / "lun.img")
    loop_a = loops.attach(image)
    loop_b = loops.attach(image)
    assert loop_a != loop_b
    c = TwoHosts(base, block_size=BS, loop_a=loop_a, loop_b=loop_b)
    try:
        yield c
    finally:
        c.teardown()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[TwoHosts]:
    with loop_devices() as loops, two_hosts(tmp_path, loops) as c:
        yield c


# -- ping-pong workload -------------------------------------------------------------------

def pick_range(rng: Random, rnd: int, size: int) -> tuple[int, int, str]:
    """(offset, length, kind) of one round's overwrite, inside the file."""
    kind = ("partial", "segment", "blocks", "large", "segment", "tail")[rnd % 6]
    if kind == "partial":  # inside one block, both ends unaligned
        blk = rng.randrange(size // BS)
        start = rng.randrange(1, BS - 1)
        return blk * BS + start, rng.randint(1, BS - start), kind
    if kind == "segment":  # across a 1 MiB segment boundary, unaligned ends
        boundary = MiB * rng.randint(1, size // MiB)
        off = boundary - rng.randint(1, 3 * BS)
        return off, min(size, boundary + rng.randint(1, 3 * BS)) - off, kind
    if kind == "blocks":  # whole blocks
        nblk = rng.randint(1, 8)
        return rng.randrange(size // BS - nblk) * BS, nblk * BS, kind
    if kind == "large":
        n = rng.randint(64 << 10, 300 << 10)
        return rng.randrange(size - n), n, kind
    off = size - rng.randint(1, 2 * BS)  # the partial last block, up to EOF
    return off, size - off, kind


def new_version(rng: Random, old: bytes) -> bytes:
    """Distinct content for a range: every byte differs from its previous value, so
    that a stale byte anywhere in the range is caught."""
    key = rng.randbytes(len(old)).replace(b"\0", b"\x5a")
    return (int.from_bytes(old, "big") ^ int.from_bytes(key, "big")).to_bytes(len(old), "big")


@dataclass
class Problems:
    """Bad reads, described precisely; the first few are kept in full."""

    items: list[str] = field(default_factory=list)
    count: int = 0

    def check(self, what: str, got: bytes, want: bytes, prev: bytes | None,
              base: int) -> None:
        if got == want:
            return
        self.count += 1
        if len(self.items) >= 15:
            return
        if len(got) != len(want):
            self.items.append(f"{what}: read {len(got)} bytes, expected {len(want)}")
            return
        diff = [i for i in range(len(want)) if got[i] != want[i]]
        stale = sum(1 for i in diff if prev is not None and got[i] == prev[i])
        self.items.append(
            f"{what}: {len(diff)} of {len(want)} bytes wrong, first at file offset "
            f"{base + diff[0]} (block {(base + diff[0]) // BS}), {stale} of them STALE "
            f"(the previous version)")

    def assert_none(self, rounds: int) -> None:
        assert self.count == 0, (f"{self.count} bad reads in {rounds} rounds; first:\n" +
                                 "\n".join(self.items))


Write = Callable[[int, bytes], None]
Read = Callable[[int, int], bytes]


@dataclass
class Side:
    name: str
    write: Write
    read: Read


def ping_pong(sides: Sequence[Side], model: bytearray, rounds: int, seed: int,
              full_check_every: int = 500) -> tuple[Problems, dict[str, int], float]:
    """Alternately one side overwrites a range and the other reads it back at once.

    Round r: side r % 2 writes, the other reads the written range plus a margin on
    either side (so a write that clobbered its neighbours shows too). Every
    ``full_check_every`` rounds both sides read the whole file. Returns the problems,
    the number of rounds per kind of range, and the elapsed seconds.
    """
    rng = Random(seed)
    problems = Problems()
    kinds: dict[str, int] = {}
    size = len(model)
    t0 = time.monotonic()
    for rnd in range(rounds):
        w, r = sides[rnd % 2], sides[1 - rnd % 2]
        off, n, kind = pick_range(rng, rnd, size)
        kinds[kind] = kinds.get(kind, 0) + 1
        prev = bytes(model[off : off + n])
        data = new_version(rng, prev)
        w.write(off, data)
        model[off : off + n] = data
        pad = rng.choice((0, 1, 100, BS))
        lo, hi = max(0, off - pad), min(size, off + n + pad)
        got = r.read(lo, hi - lo)
        old = bytes(model[lo:off]) + prev + bytes(model[off + n : hi])
        problems.check(f"round {rnd} ({kind}): {w.name} wrote [{off}, {off + n}), "
                       f"{r.name} read [{lo}, {hi})", got, bytes(model[lo:hi]), old, lo)
        if (rnd + 1) % full_check_every == 0 or rnd == rounds - 1:
            for s in sides:
                problems.check(f"after round {rnd}: whole file read by {s.name}",
                               s.read(0, size), bytes(model), None, 0)
    return problems, kinds, time.monotonic() - t0


def fs_side(name: str, fs: FileSystem, ino: int) -> Side:
    def write(off: int, data: bytes) -> None:
        assert fs.write(ino, off, data) == len(data)

    def read(off: int, n: int) -> bytes:
        parts = []
        while n > 0:
            chunk = fs.read(ino, off, min(n, 4 * MiB))
            if not chunk:
                break
            parts.append(chunk)
            off += len(chunk)
            n -= len(chunk)
        return b"".join(parts)

    return Side(name, write, read)


def file_extents(cluster_dir: Path, path: str) -> list[tuple[int, int, int]]:
    """(file block, disk block, length) of every extent of ``path`` (asked through n1)."""
    with open_fs(cluster_dir, node="n1") as fs:
        a = fs.resolve(path)
        nblocks = (a.size + BS - 1) // BS
        exts = fs.meta.map_read(a.ino, 0, nblocks)
    assert len({e.disk for e in exts}) == 1, exts
    assert sum(e.length for e in exts) == nblocks, f"holes in {path}: {exts}"
    return [(e.fblock, e.dblock, e.length) for e in exts]


def check_raw_disks(c: TwoHosts, path: str, model: bytes,
                    ranges: Sequence[tuple[int, int]] | None = None) -> None:
    """The file's blocks as stored on the shared disk, read with ``O_DIRECT`` through
    loop A and through loop B, equal ``model`` (optionally only in ``ranges``)."""
    exts = file_extents(c.dir, path)
    for dev in (c.loop_a, c.loop_b):
        disk = bytearray(len(model))
        for fblock, dblock, length in exts:
            raw = raw_read(dev, dblock * BS, length * BS)
            end = min(len(model), (fblock + length) * BS)
            disk[fblock * BS : end] = raw[: end - fblock * BS]
        for lo, hi in ranges or [(0, len(model))]:
            if disk[lo:hi] != model[lo:hi]:
                bad = next(i for i in range(lo, hi) if disk[i] != model[i])
                raise AssertionError(f"{path} on the shared disk through {dev} differs from "
                                     f"what was written, first at byte {bad} (block "
                                     f"{bad // BS})")


def create_file(fs: FileSystem, path: str, data: bytes) -> int:
    parent, name = fs.split(path)
    ino = int(fs.create(parent.ino, name).ino)
    for off in range(0, len(data), 4 * MiB):
        fs.write(ino, off, data[off : off + 4 * MiB])
    fs.fsync(ino)
    return ino


# -- control port -------------------------------------------------------------------------

CONTROL_ROUNDS = {"cluster-dir": 2000, "remote": 1000}


@pytest.mark.slow
@pytest.mark.parametrize("n2_how", ["cluster-dir", "remote"])
def test_control_port_ping_pong_never_reads_stale(hosts: TwoHosts, n2_how: str,
                                                  record_property: Callable[..., None]
                                                  ) -> None:
    """n1 (loop A) and n2 (loop B) take turns overwriting a range and reading it back
    through their control ports: every read sees the other node's latest write (the
    recall writes back with O_DIRECT through one page cache, the reader reads with
    O_DIRECT through the other), and at the end the disk holds exactly the model when
    read raw through either loop device."""
    hosts.start_coordinator(lease=LEASE)
    hosts.start_n1()
    hosts.start_n2(n2_how)
    hosts.check_disk_views()

    rounds = CONTROL_ROUNDS[n2_how]
    model = bytearray(Random(1).randbytes(FILE_SIZE))
    with open_fs(hosts.dir, node="n1") as fs1, open_fs(hosts.dir, node="n2") as fs2:
        ino = create_file(fs1, "/pingpong", bytes(model))
        assert fs2.resolve("/pingpong").size == FILE_SIZE
        sides = [fs_side("n1", fs1, ino), fs_side("n2", fs2, ino)]
        problems, kinds, secs = ping_pong(sides, model, rounds, seed=42)
    print(f"\ncontrol-port ping-pong (n2 {n2_how}): {rounds} rounds in {secs:.1f} s = "
          f"{rounds / secs:.0f} rounds/s; ranges {kinds}")
    record_property("rounds_per_second", round(rounds / secs, 1))
    problems.assert_none(rounds)

    hosts.flush()
    check_raw_disks(hosts, "/pingpong", bytes(model))
    hosts.check_disk_views()
    hosts.assert_clean_logs()
    hosts.fsck()


# -- FUSE ---------------------------------------------------------------------------------

def require_fuse() -> None:
    support.require_fuse("FUSE two-host test", "fusermount3", "dd")


def mount_side(name: str, path: Path, scratch: Path) -> Side:
    """Programs on one mount. Writes: ``pwrite`` + ``close`` (with ``fsync`` on some
    rounds) or ``dd conv=notrunc``; reads: ``open``/``pread``/``close``, ``mmap``, or
    ``dd``. Every access opens the file anew (close-to-open coherence)."""
    counter = {"w": 0, "r": 0}

    def write(off: int, data: bytes) -> None:
        counter["w"] += 1
        k = counter["w"]
        if k % 7 == 0:
            src = scratch / f"{name}.src"
            src.write_bytes(data)
            r = subprocess.run(["dd", f"if={src}", f"of={path}", f"bs={len(data)}", "count=1",
                                f"seek={off}", "oflag=seek_bytes", "iflag=fullblock",
                                "conv=notrunc", "status=none"],
                               capture_output=True, text=True, timeout=60, check=False)
            assert r.returncode == 0, f"dd on {name}: {r.stderr}"
            return
        fd = os.open(path, os.O_WRONLY)
        try:
            assert os.pwrite(fd, data, off) == len(data)
            if k % 3 == 0:
                os.fsync(fd)
        finally:
            os.close(fd)

    def read(off: int, n: int) -> bytes:
        counter["r"] += 1
        k = counter["r"]
        if k % 7 == 3:
            r = subprocess.run(["dd", f"if={path}", f"bs={min(n, MiB)}", f"skip={off}",
                                f"count={n}", "iflag=skip_bytes,count_bytes,fullblock",
                                "status=none"], capture_output=True, timeout=60, check=False)
            assert r.returncode == 0, f"dd on {name}: {r.stderr!r}"
            return r.stdout
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.fstat(fd).st_size == FILE_SIZE
            if k % 5 == 1:
                with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as m:
                    return bytes(m[off : off + n])
            parts = []
            while n > 0:
                chunk = os.pread(fd, n, off)
                if not chunk:
                    break
                parts.append(chunk)
                off += len(chunk)
                n -= len(chunk)
            return b"".join(parts)
        finally:
            os.close(fd)

    return Side(name, write, read)


FUSE_ROUNDS = 400


@pytest.mark.slow
@pytest.mark.fuse
def test_fuse_ping_pong_never_reads_stale(hosts: TwoHosts, tmp_path: Path,
                                          record_property: Callable[..., None]) -> None:
    """Programs on n1's mount (loop A) and on n2's mount (loop B; n2 started like a
    host without the cluster directory) take turns overwriting a range and reading it:
    an open after the other node's close always sees its data. A close puts the data on
    the shared disk: read raw through the *other* loop device right after the close,
    before any flush, it is there."""
    require_fuse()
    m1, m2 = tmp_path / "mnt-n1", tmp_path / "mnt-n2"
    m1.mkdir()
    m2.mkdir()
    hosts.start_coordinator(lease=LEASE)
    hosts.start_n1(mount=m1)
    hosts.start_n2("remote", mount=m2)
    hosts.check_disk_views()

    model = bytearray(Random(2).randbytes(FILE_SIZE))
    (m1 / "pp.bin").write_bytes(model)
    assert (m2 / "pp.bin").read_bytes() == model
    sides = [mount_side("n1", m1 / "pp.bin", tmp_path), mount_side("n2", m2 / "pp.bin",
                                                                  tmp_path)]
    problems, kinds, secs = ping_pong(sides, model, FUSE_ROUNDS, seed=7, full_check_every=100)
    print(f"\nFUSE ping-pong: {FUSE_ROUNDS} rounds in {secs:.1f} s = "
          f"{FUSE_ROUNDS / secs:.0f} rounds/s; ranges {kinds}")
    record_property("rounds_per_second", round(FUSE_ROUNDS / secs, 1))
    problems.assert_none(FUSE_ROUNDS)

    # Close wrote back: the last write is on the disk, seen through both loop devices.
    rng = Random(3)
    for rnd in range(6):
        w = sides[rnd % 2]
        off, n, _ = pick_range(rng, rnd, FILE_SIZE)
        data = new_version(rng, bytes(model[off : off + n]))
        w.write(off, data)
        model[off : off + n] = data
        check_raw_disks(hosts, "/pp.bin", bytes(model), [(off, off + n)])
    check_raw_disks(hosts, "/pp.bin", bytes(model))

    hosts.check_disk_views()
    hosts.unmount_all()
    hosts.assert_clean_logs()
    hosts.fsck()


# -- online backup ------------------------------------------------------------------------

WRITER = r"""
import os, random, sys
from sdbackup.cluster.access import open_fs
from sdbackup.errors import FsError
cdir, node, seed, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
n = 0
with open_fs(cdir, node=node) as fs:
    while not os.path.exists(stop):
        name = f"/f{rng.randrange(12)}".encode()
        try:
            try:
                a = fs.resolve(name)
            except FsError:
                a = fs.create(1, name[1:])
            op = rng.random()
            if op < 0.7:
                off = rng.randrange(0, 3 << 20)
                fs.write(a.ino, off, rng.randbytes(rng.choice([512, 4096, 5000, 65536, 300000])))
            elif op < 0.8:
                fs.truncate(a.ino, rng.randrange(0, 2 << 20))
            elif op < 0.87:
                fs.unlink(1, name[1:])
            else:
                fs.fsync(a.ino)
            n += 1
        except FsError:
            pass  # the other writer deleted or replaced the file meanwhile
print(n)
"""


def same_image(got: Path, want: Path) -> None:
    """Two image files are equal, compared in chunks (they are 256 MiB)."""
    assert got.stat().st_size == want.stat().st_size, (got.stat().st_size,
                                                       want.stat().st_size)
    chunk = 8 * MiB
    bad: list[int] = []
    with open(got, "rb") as g, open(want, "rb") as w:
        pos = 0
        while True:
            a, b = g.read(chunk), w.read(chunk)
            if not b:
                break
            if a != b:
                bad += [(pos + i) // BS for i in range(0, len(b), BS)
                        if a[i : i + BS] != b[i : i + BS]]
            pos += len(b)
    assert not bad, f"{len(bad)} blocks of {got.name} differ from T0, first {bad[:10]}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["central", "merged"])
def test_online_backup_while_both_hosts_write_restores_t0(
        hosts: TwoHosts, tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An online backup while n1 (loop A) and n2 (loop B) overwrite, truncate, delete
    and create files throughout the copy: the restored image equals, block for block,
    the image the coordinator dumped at T0 while the cluster was frozen. (Before images
    are read by the writing node through its own loop device; a stale page cache
    anywhere would put wrong blocks into the generation.)"""
    t0_dir = tmp_path / "t0"
    monkeypatch.setenv("SDBACKUP_TEST_T0_IMAGE_DIR", str(t0_dir))
    monkeypatch.setenv("SDBACKUP_TEST_COPY_DELAY", "0.25")
    hosts.start_coordinator(lease=LEASE)
    monkeypatch.delenv("SDBACKUP_TEST_T0_IMAGE_DIR")
    monkeypatch.delenv("SDBACKUP_TEST_COPY_DELAY")
    hosts.start_n1(flush_delay=0.2)
    hosts.start_n2("cluster-dir", flush_delay=0.2)
    hosts.check_disk_views()

    with open_fs(hosts.dir, node="n1") as fs1, open_fs(hosts.dir, node="n2") as fs2:
        for i in range(12):
            create_file((fs1, fs2)[i % 2], f"/f{i}", os.urandom(3 * MiB))
    stop = tmp_path / "stop"
    ws = [subprocess.Popen([PY, "-c", WRITER, str(hosts.dir), n, str(i), str(stop)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i, n in enumerate(("n1", "n2"))]
    try:
        time.sleep(1.0)  # the writers are busy and both caches dirty
        medium = tmp_path / "medium"
        r = sdb("backup", str(hosts.dir), "--medium", str(medium), "--log-mode", mode,
                "--compress", "none", "--json", timeout=240)
        time.sleep(0.5)  # writes go on after the backup too
    finally:
        stop.touch()
        outs = [w.communicate(timeout=60) for w in ws]
    for w, (_so, se) in zip(ws, outs, strict=True):
        assert w.returncode == 0, se
    ops = [int(so.strip()) for so, _ in outs]
    assert r.returncode == 0, f"backup exited {r.returncode}: {r.stderr}"
    s = json.loads(r.stdout)
    print(f"\nonline backup ({mode}): writers did {ops} operations; before images "
          f"{s['log']['blocks']} blocks; freeze {s['freeze_seconds']:.3f} s")
    assert min(ops) > 20, f"writers barely ran: {ops}"
    assert s["log"]["mode"] == mode
    assert s["log"]["blocks"] > 0, "no write needed a before image: the test proves nothing"
    gen = s["generation"]
    assert "OK" in sdb("verify", "--medium", str(medium), gen, check=True).stdout
    img = tmp_path / "restored-d0.img"
    sdb("restore-image", "--medium", str(medium), gen, "--disk", "d0", "--to", str(img),
        check=True, timeout=240)
    same_image(img, t0_dir / gen / "d0.img")

    hosts.check_disk_views()
    hosts.assert_clean_logs()
    hosts.fsck()


# -- a wrong disk ---------------------------------------------------------------------------

@dataclass
class RefuseSetup:
    hosts: TwoHosts
    disks: dict[str, str]


@pytest.fixture(scope="module")
def refuse_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RefuseSetup]:
    """A running cluster on loop A (coordinator and n1) and a set of wrong disks."""
    base = tmp_path_factory.mktemp("refuse")
    with loop_devices() as loops, two_hosts(base, loops) as c:
        c.start_coordinator(lease=LEASE)
        c.start_n1()
        other = base / "other"
        sdb("init", str(other), "--disk", f"d0={base / 'other-d0.img'}:16MiB",
            "--block-size", str(BS), check=True)
        blank = make_image(base / "blank.img", 16 * MiB)
        disks = {
            "foreign": str(base / "other-d0.img"),  # another cluster's disk
            "unlabelled": str(blank),  # a file that holds no label
            "missing": str(base / "no-such-disk"),
            "read-only": loops.attach(base / "lun.img", read_only=True),  # the right disk
        }
        yield RefuseSetup(c, disks)
        c.assert_clean_logs()


def _node_names(c: TwoHosts) -> list[str]:
    return [n["name"] for n in c.status()["nodes"]]


@pytest.mark.parametrize("how", ["cluster-dir", "remote"])
@pytest.mark.parametrize("case", ["foreign", "unlabelled", "missing", "read-only"])
def test_node_with_a_wrong_disk_refuses_to_join(refuse_setup: RefuseSetup, case: str,
                                                how: str) -> None:
    """``sdbackup node ... --disk d0=WRONG`` exits with code 2 and one error line that
    names the disk and the path, without joining: the coordinator never lists it."""
    c = refuse_setup.hosts
    path = refuse_setup.disks[case]
    name = f"bad-{case}-{how}"
    if how == "cluster-dir":
        argv = sdb_cmd("node", str(c.dir), "--name", name, "--disk", f"d0={path}")
        cwd = c.base
    else:
        cwd = c.base / f"host-{name}"
        cwd.mkdir()
        shutil.copyfile(c.dir / "secret", cwd / "secret")
        argv = sdb_cmd("node", "--coordinator", c.coordinator_address(), "--secret-file",
                       str(cwd / "secret"), "--name", name, "--disk", f"d0={path}")
    errf = cwd / f"{name}.stderr"
    with open(errf, "wb") as fh:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=fh,
                             stdin=subprocess.DEVNULL, cwd=cwd)
    try:
        # It must exit at once; a node that says it joined is the failure itself.
        wait_for(lambda: p.poll() is not None or b"joined the coordinator" in
                 errf.read_bytes(), 20, f"the node given a {case} disk to exit")
        if p.poll() is None:
            joined = name in _node_names(c)
            raise AssertionError(
                f"node given a {case} disk ({path}) did not refuse: it runs"
                f"{' and the coordinator lists it as a member' if joined else ''}; its "
                f"output:\n{errf.read_text(errors='replace')[-1500:]}")
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
    out = p.stdout.read().decode() if p.stdout else ""
    if p.stdout:
        p.stdout.close()
    err = errf.read_text(errors="replace")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == 2, f"exit code {p.returncode}, stderr:\n{err}"
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith("sdbackup: error: "), lines[0]
    assert "disk d0" in lines[0] and path in lines[0], lines[0]
    assert out == ""
    assert name not in _node_names(c)
    assert not (c.dir / "nodes" / f"{name}.addr").exists()


def test_loop_devices_are_two_page_caches_over_one_image(tmp_path: Path) -> None:
    """The premise of this file: a buffered read through loop B keeps returning what
    its page cache holds after a write through loop A (O_DIRECT), while an O_DIRECT
    read through loop B sees the new data. Without this, the tests above would prove
    nothing about two hosts."""
    with loop_devices() as loops:
        image = make_image(tmp_path / "img", 16 * MiB)
        a, b = loops.attach(image), loops.attach(image)
        assert stat.S_ISBLK(os.stat(a).st_mode) and os.stat(a).st_rdev != os.stat(b).st_rdev
        # Loop B stays open throughout: the last close of a block device drops its
        # page cache (as a node holds its disks open, so does this test).
        with open(b, "rb", buffering=0) as fb:
            assert os.pread(fb.fileno(), BS, 8 * BS) == bytes(BS)  # now in B's cache
            new = mmap.mmap(-1, BS)
            new.write(b"x" * BS)
            fd = os.open(a, os.O_WRONLY | os.O_DIRECT)
            try:
                assert os.pwritev(fd, [new], 8 * BS) == BS
                os.fsync(fd)
            finally:
                os.close(fd)
            assert raw_read(b, 8 * BS, BS) == b"x" * BS, "O_DIRECT through B missed it"
            buffered = os.pread(fb.fileno(), BS, 8 * BS)
        assert buffered == bytes(BS), ("loop B's page cache already saw loop A's write: "
                                       "this kernel does not make two page caches here")
