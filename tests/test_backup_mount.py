"""``sdbackup mount``: backup generations as read-only FUSE file systems (issue 13).

Real processes, real kernel mounts, real tools. Every generation kind is mounted and
compared, with ``diff -r`` and a check of types, modes, times, symlink targets and hard
links, with a ``sdbackup restore`` of the same generation and with the data at its T0:

* offline backups (a full, incrementals in a chain of four, a synthetic full made by
  ``sdbackup merge`` and an incremental read through it): the T0 data is a ``cp -a`` of
  the source tree taken when the backup ran (the embedded cluster has no other writer);
* online backups in every log mode, taken while two node agents write (separate: the
  log read first, not overlaid, at its place or moved and given by ``--log-medium``;
  and overlaid by ``sdbackup overlay`` with the log medium gone): the T0 data is read
  through a read-only file system over the generation's snapshot and the exact disk
  image the engine's test hook wrote while the cluster was frozen.

Then: changes fail with EROFS and reads go on; a damaged record makes exactly the files
that use it fail with EIO and the mount's log names the generation, disk, blocks and
medium offset; a mount inside a network namespace of a "host" that has only a
read-only copy of the medium; ``--all`` with generations committed, merged and pruned
while mounted (and files open in a removed one reading on); mounted generations that
a prune removes reading on; the foreground process (SIGTERM, SIGINT), ``sdbackup
umount`` of a background one (busy while a file is open), and the exit codes of the
errors.

Every test needs /dev/fuse and pyfuse3 and fails (never skips) without them. Every
mount is unmounted at teardown, also when the test fails; a test that leaves a mount
behind fails.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import test_backup_support as support
from test_backup_support import diff_trees, make_tree

from sdbackup.backup.engine import T0Images
from sdbackup.blocks.source import Buffer
from sdbackup.fs.readonly import ReadOnlyFileSystem
from sdbackup.media.generation import Generation, GenerationReader
from sdbackup.media.medium import DiskMedium
from sdbackup.media.snapshot import SnapshotMeta
from sdbackup.types import ROOT_INODE, DiskId

pytestmark = pytest.mark.fuse

PY = sys.executable
SDB = [PY, "-m", "sdbackup"]
KiB = 1 << 10
MiB = 1 << 20


# -- processes, mounts ------------------------------------------------------------------------

def require_fuse() -> None:
    """Fail (never skip) when this machine cannot run these tests."""
    support.require_fuse("mount tests", "fusermount3", "diff", "cp", "tar", "unshare")


def run(*args: str | os.PathLike[str], check: bool = True, timeout: float = 120,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([os.fspath(a) for a in args], capture_output=True, errors="replace",
                       timeout=timeout, check=False, cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(os.fspath, args))} exited {r.returncode}\n"
                             f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}")
    return r


def sdb(*args: str | os.PathLike[str], check: bool = True, timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    return run(*SDB, *args, check=check, timeout=timeout)


def mounted(mp: Path) -> bool:
    """A sdbackup FUSE mount is at ``mp`` (in this mount namespace)."""
    want = os.path.abspath(mp)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4 and fields[4] == want and right.startswith("fuse.sdbackup "):
                return True
    return False


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def force_unmount(mp: Path, pid: int | None = None) -> None:
    """Teardown: unmount ``mp`` whatever state it is in, and end its mount process."""
    if mounted(mp):
        run(*SDB, "umount", mp, check=False, timeout=60)
    if mounted(mp):
        run("fusermount3", "-uz", mp, check=False)
    if pid is not None:
        deadline = time.monotonic() + 20
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(pid):  # our own mount process, hung: end it
            os.kill(pid, signal.SIGKILL)


@dataclass
class Mount:
    mp: Path
    pid: int  # the background process serving it
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextmanager
def mount_bg(medium: Path, mp: Path, *args: str | os.PathLike[str],
             prefix: tuple[str, ...] = ()) -> Iterator[Mount]:
    """``sdbackup mount --medium MEDIUM [ARGS] MP --background``; unmounted at the end
    (``sdbackup umount``, which must end the serving process)."""
    mp.mkdir(exist_ok=True)
    log = mp.parent / f"{mp.name}.log"
    r = run(*prefix, *SDB, "mount", "--medium", medium, *args, mp, "--background",
            "--log-file", log)
    m = re.search(r"served by process (\d+)", r.stdout)
    assert m, r.stdout
    pid = int(m[1])
    try:
        assert mounted(mp), f"{mp} is not mounted after the command returned: {r.stdout}"
        yield Mount(mp, pid, log)
        assert run(*SDB, "umount", mp).returncode == 0
        assert not mounted(mp)
        wait_for(lambda: not alive(pid), 20, f"the mount process {pid} to exit")
    finally:
        force_unmount(mp, pid)


@pytest.fixture(autouse=True)
def _no_mount_left(tmp_path: Path) -> Iterator[None]:
    require_fuse()
    yield
    left = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4].startswith(str(tmp_path)):
                left.append(Path(fields[4]))
    for mp in reversed(left):
        force_unmount(mp)
        run("umount", "-l", mp, check=False)  # whatever else the test mounted there
    assert not left, f"the test left mounts behind: {left}"


# -- trees ------------------------------------------------------------------------------------

def diff_r(a: Path, b: Path) -> None:
    """``diff -r`` finds no difference (symlinks compared as links)."""
    r = run("diff", "-r", "--no-dereference", a, b, check=False)
    assert r.returncode == 0, f"diff -r {a} {b}:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"


def same_trees(a: Path, b: Path, *, times: bool = True) -> None:
    """``diff -r`` plus types, modes, (times), symlink targets and hard links."""
    problems = diff_trees(a, b, times=times)
    assert not problems, f"{a} and {b} differ:\n" + "\n".join(problems[:20])


def all_files(root: Path) -> list[Path]:
    out = []
    for dirpath, _dirs, names in os.walk(root):
        out += [Path(dirpath) / n for n in names if not (Path(dirpath) / n).is_symlink()]
    return sorted(out)


def t0_tree(medium: Path, gen: str, images: Path, dest: Path) -> Path:
    """Write out the files of generation ``gen`` as they were at T0: its snapshot's
    metadata over the T0 disk images (modes, times, symlinks and hard links too)."""
    med = DiskMedium.open(medium)
    m = med.resolve(gen)
    g = Generation(med, m)
    blocks = T0Images({d.id: images / gen / f"{d.name}.img" for d in m.disks}, m.block_size)
    links: dict[int, Path] = {}

    def out(fs: ReadOnlyFileSystem, ino: int, target: Path) -> None:
        a = fs.getattr(ino)
        if a.is_dir:
            target.mkdir()
            for e in fs.listdir(ino):
                out(fs, e.attr.ino, target / os.fsdecode(e.name))
        elif a.is_link:
            os.symlink(fs.readlink(ino), target)
            return
        elif ino in links:
            os.link(links[ino], target)
            return
        elif stat.S_ISREG(a.mode):
            target.write_bytes(fs.read(ino, 0, a.size))
            links[ino] = target
        else:
            raise AssertionError(f"{target}: unexpected file type {a.mode:o}")
        os.chmod(target, a.mode & 0o7777)
        os.utime(target, ns=(a.atime_ns, a.mtime_ns))

    try:
        with SnapshotMeta(g.meta_file(), "T0 snapshot") as snap:
            out(ReadOnlyFileSystem(snap, blocks), ROOT_INODE, dest)
    finally:
        blocks.close()
    return dest


class Mirror:
    """Changes made both to a local tree and, through the embedded cluster (no
    coordinator, no other writer), to the same paths in the cluster: the local tree
    is then what the cluster holds (contents, names, modes; not times)."""

    def __init__(self, cdir: Path, local: Path) -> None:
        from sdbackup.cluster.local import open_cluster

        self.local = local
        self.c = open_cluster(cdir)
        self.fs = self.c.fs

    def __enter__(self) -> Mirror:
        return self

    def __exit__(self, *exc: object) -> None:
        self.c.close()

    def _parent(self, rel: str) -> tuple[int, bytes]:
        head, _, name = rel.rpartition("/")
        return self.fs.resolve("/" + head).ino, name.encode()

    def write(self, rel: str, offset: int, data: bytes) -> None:
        p = self.local / rel
        if not p.exists():
            p.touch()
            os.chmod(p, 0o644)
            parent, name = self._parent(rel)
            self.fs.create(parent, name, 0o644)
        with open(p, "r+b") as f:
            f.seek(offset)
            f.write(data)
        self.fs.write(self.fs.resolve("/" + rel).ino, offset, data)

    def truncate(self, rel: str, size: int) -> None:
        os.truncate(self.local / rel, size)
        self.fs.truncate(self.fs.resolve("/" + rel).ino, size)

    def unlink(self, rel: str) -> None:
        (self.local / rel).unlink()
        self.fs.unlink(*self._parent(rel))

    def rename(self, rel: str, new: str) -> None:
        (self.local / rel).rename(self.local / new)
        self.fs.rename(*self._parent(rel), *self._parent(new))

    def mkdir(self, rel: str) -> None:
        (self.local / rel).mkdir()
        os.chmod(self.local / rel, 0o755)
        self.fs.mkdir(*self._parent(rel), 0o755)

    def chmod(self, rel: str, mode: int) -> None:
        os.chmod(self.local / rel, mode)
        self.fs.setattr(self.fs.resolve("/" + rel).ino, mode=mode)


def init_cluster(base: Path, *disks: str) -> Path:
    cdir = base / "cluster"
    spec = []
    for i, size in enumerate(disks):
        spec += ["--disk", f"d{i}={base}/d{i}.img:{size}"]
    sdb("init", cdir, "--block-size", "1024", *spec)
    return cdir


def sample(root: Path, seed: int, big: int = 4, big_size: int = 300 * KiB) -> Path:
    """make_tree's tree (odd modes, symlinks, a hard link, a sparse file) plus a
    directory of larger random files."""
    make_tree(root, seed=seed)
    (root / "big").mkdir()
    for i in range(big):
        (root / "big" / f"b{i}").write_bytes(os.urandom(big_size + i * 1001))
    return root


def backup_cli(cdir: Path, medium: Path, *args: str) -> dict[str, object]:
    r = sdb("backup", cdir, "--medium", medium, "--json", "-q", *args)
    out: dict[str, object] = json.loads(r.stdout)
    return out


def generations(medium: Path) -> dict[str, dict[str, object]]:
    r = sdb("generations", "--medium", medium, "--json")
    return {g["id"]: g for g in json.loads(r.stdout)["generations"]}


# -- the generations under test ---------------------------------------------------------------

@dataclass
class Case:
    medium: Path
    gen: str
    t0: Path  # the cluster's root as it was at T0
    kind: str  # as 'sdbackup generations' lists it
    times: bool  # the T0 tree has the cluster's times (the offline copies do not)
    chain: int = 1  # generations read (the generation and its ancestors)
    log_medium: Path | None = None  # to give with --log-medium
    log_home: Path | None = None  # where the backup wrote the separate log


def _chain_len(medium: Path, gen: str) -> int:
    """Generations read for ``gen``: it and its ancestors (a parent that a merge
    replaced is found through the merged generation's 'replaces')."""
    med = DiskMedium.open(medium)
    return len(med.catalog().chain(med.resolve(gen)))


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    """A full and three incrementals (each after changes that leave most blocks of the
    changed files to older generations), and a copy of the medium where the full and the
    first incremental were merged into a synthetic full. The data at each T0 is a
    ``cp -a`` of the local tree that mirrors the cluster."""
    require_fuse()
    base = tmp_path_factory.mktemp("offline")
    cdir = init_cluster(base, "8MiB", "8MiB")
    work = base / "work"
    work.mkdir()
    sample(work / "data", seed=3)
    sdb("fs", cdir, "put", work / "data", "/")
    medium = base / "medium"
    (base / "t0").mkdir()
    ids: list[str] = []

    def take(*args: str) -> None:
        gid = str(backup_cli(cdir, medium, *args)["generation"])
        run("cp", "-a", work, base / "t0" / gid)
        ids.append(gid)

    take()
    with Mirror(cdir, work) as m:
        m.write("data/big/b0", 100_000, os.urandom(3000))  # inside a file: few blocks
        m.write("data/big/b1", (work / "data/big/b1").stat().st_size, os.urandom(5000))
        m.write("data/new1", 0, os.urandom(20_000))
        m.unlink("data/a/b/f01.bin")  # one name of a hard-linked file
    take("--incremental")
    with Mirror(cdir, work) as m:
        m.truncate("data/big/b2", 1000)
        m.rename("data/c/f02.bin", "data/renamed.bin")
        m.mkdir("data/newdir")
        m.write("data/newdir/inner", 0, b"inner file\n" * 500)
        m.write("data/big/b0", 0, os.urandom(2000))
    take("--incremental")
    with Mirror(cdir, work) as m:
        m.write("data/big/b3", 150_000, os.urandom(40_000))
        m.chmod("data/a/f00.bin", 0o600)
        m.unlink("data/big/b1")
        m.write("data/new1", 5000, b"x" * 100)
    take("--incremental")
    full, inc1, _inc2, inc3 = ids
    merged_medium = base / "medium-merged"
    run("cp", "-a", medium, merged_medium)
    r = sdb("merge", "--medium", merged_medium, full, inc1, "--json")
    synth = json.loads(r.stdout)["generation"]
    t0 = base / "t0"
    return {
        "full": Case(medium, full, t0 / full, "full", False),
        "incremental": Case(medium, inc3, t0 / inc3, "incremental", False, chain=4),
        "merged": Case(merged_medium, synth, t0 / inc1, "synthetic", False),
        "incremental-after-merge": Case(merged_medium, inc3, t0 / inc3, "incremental",
                                        False, chain=3),
    }


WRITER = r"""
import os, random, sys, time
from sdbackup.cluster.access import open_fs
from sdbackup.errors import FsError
cdir, node, seed, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
n = 0
with open_fs(cdir, node=node) as fs:
    wdir = fs.resolve("/w").ino
    while not os.path.exists(stop):
        try:
            if rng.random() < 0.7:  # overwrite what a file held at T0, in place
                a = fs.lookup(wdir, f"f{rng.randrange(8)}".encode())
                fs.write(a.ino, rng.randrange(0, 1 << 20),
                         rng.randbytes(rng.choice([1024, 4096, 65536])))
            else:  # churn: create, grow, shrink, delete, fsync other files
                name = f"x{rng.randrange(4)}".encode()
                try:
                    a = fs.lookup(wdir, name)
                except FsError:
                    a = fs.create(wdir, name)
                op = rng.random()
                if op < 0.6:
                    fs.write(a.ino, rng.randrange(0, 1 << 20), rng.randbytes(8192))
                elif op < 0.75:
                    fs.truncate(a.ino, rng.randrange(0, 1 << 20))
                elif op < 0.9:
                    fs.unlink(wdir, name)
                else:
                    fs.fsync(a.ino)
            n += 1
        except FsError:
            pass  # the other writer deleted or replaced the file meanwhile
print(n)
"""

ONLINE_MODES = ("merged", "central", "inline", "separate")


@contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def online(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    """One online backup per log mode, each taken while two node agents' writers
    overwrite, truncate, delete and create files; the engine's test hook wrote the exact
    disk images at each T0 (the coordinator runs the backups), and the copy is slowed
    down so that the writes overlap it. The separate mode's log is not overlaid; a copy
    of its medium is, with 'sdbackup overlay'."""
    from sdbackup.cluster.launch import start_coordinator, start_node

    require_fuse()
    base = tmp_path_factory.mktemp("online")
    cdir = init_cluster(base, "24MiB", "24MiB")
    make_tree(base / "tree", seed=5)
    sdb("fs", cdir, "put", base / "tree", "/")
    # The files the writers overwrite, each followed on disk by a free gap wider than
    # the copier reads through (128 KiB): each becomes a batch of its own, and the
    # test hook's delay after each batch makes the later ones be read while the
    # writers overwrite them (the copier reads up to four batches ahead).
    from sdbackup.cluster.local import open_cluster

    with open_cluster(cdir) as c:
        w = c.fs.mkdir(ROOT_INODE, b"w").ino
        for i in range(8):
            ino = c.fs.create(w, f"f{i}".encode()).ino
            c.fs.write(ino, 0, os.urandom(MiB + 512 * KiB))
            c.fs.truncate(ino, MiB)  # the gap
    images = base / "t0-images"
    with _env(SDBACKUP_TEST_T0_IMAGE_DIR=str(images), SDBACKUP_TEST_COPY_DELAY="0.3"):
        coord = start_coordinator(cdir, lease=5.0)
    nodes = []
    cases: dict[str, Case] = {}
    try:
        for n in ("n1", "n2"):
            nodes.append(start_node(cdir, n, cache_size="8MiB", flush_delay=0.2))
        for mode in ONLINE_MODES:
            stop = base / f"stop-{mode}"
            ws = [subprocess.Popen([PY, "-c", WRITER, str(cdir), n, str(i), str(stop)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for i, n in enumerate(("n1", "n2"))]
            try:
                time.sleep(0.5)  # the writers are busy, the caches dirty
                medium = base / f"medium-{mode}"
                lm = base / "log-medium"
                extra = ["--log-medium", str(lm)] if mode == "separate" else []
                s = backup_cli(cdir, medium, "--log-mode", mode, *extra)
            finally:
                stop.touch()
                outs = [w.communicate(timeout=60) for w in ws]
            for w, (so, se) in zip(ws, outs, strict=True):
                assert w.returncode == 0, se
                assert int(so) > 20, f"a writer barely ran: {so}"
            log = s["log"]
            assert isinstance(log, dict) and log["mode"] == mode
            assert log["blocks"] > 0, f"{mode}: no before image was logged: proves nothing"
            gid = str(s["generation"])
            t0 = t0_tree(medium, gid, images, base / f"t0-{mode}")
            # The before images matter: without them some file would not read as at T0.
            assert _wrong_without_before_images(medium, gid, t0), \
                f"{mode}: the copy alone reads as T0: the writes did not overlap it"
            cases[f"online-{mode}"] = Case(medium, gid, t0, "full", True,
                                           log_home=lm if mode == "separate" else None)
    finally:
        for p in nodes:
            p.stop()
        coord.stop()
    sep = cases["online-separate"]
    ov = base / "medium-separate-overlaid"
    run("cp", "-a", sep.medium, ov)
    sdb("overlay", "--medium", ov, sep.gen)
    cases["online-separate-moved"] = Case(sep.medium, sep.gen, sep.t0, "full", True,
                                          log_home=sep.log_home)
    cases["online-separate-overlaid"] = Case(ov, sep.gen, sep.t0, "full", True,
                                             log_home=sep.log_home)
    return cases


class _DataOnly:
    """A generation's copied data alone: its before images (in the generation, or in a
    separate log not overlaid) left out."""

    def __init__(self, reader: GenerationReader) -> None:
        self.r = reader
        self.block_size = reader.block_size

    def readinto(self, disk: DiskId, block: int, buf: Buffer) -> None:
        from sdbackup.media.record_format import Kind

        bs = self.block_size
        out = memoryview(buf).cast("B")
        count = out.nbytes // bs
        out[:] = bytes(out.nbytes)
        for e in self.r.index.find(disk, int(Kind.DATA), block, count):
            s, n = int(e["start"]), int(e["count"])
            lo, hi = max(s, block), min(s + n, block + count)
            out[(lo - block) * bs:(hi - block) * bs] = \
                self.r.record(e)[(lo - s) * bs:(hi - s) * bs]


def _wrong_without_before_images(medium: Path, gen: str, t0: Path) -> list[str]:
    """Files of ``gen`` that would not read as at T0 without its before images."""
    med = DiskMedium.open(medium)
    m = med.resolve(gen)
    log = m.extra.get("log")
    if isinstance(log, dict) and log.get("medium"):  # do not open the separate log
        m = dataclasses.replace(m, extra={**m.extra, "log": {**log, "overlaid": True}})
    g = Generation(med, m)
    wrong = []
    with GenerationReader(g) as r, SnapshotMeta(g.meta_file(), "snapshot") as snap:
        fs = ReadOnlyFileSystem(snap, _DataOnly(r))
        for p in all_files(t0):
            rel = str(p.relative_to(t0))
            a = fs.resolve("/" + rel)
            if fs.read(a.ino, 0, a.size) != p.read_bytes():
                wrong.append(rel)
    return wrong


@contextmanager
def _moved(path: Path | None) -> Iterator[Path | None]:
    """``path`` renamed away for the block (None: nothing to move)."""
    if path is None:
        yield None
        return
    away = path.with_name(path.name + "-moved")
    path.rename(away)
    try:
        yield away
    finally:
        away.rename(path)


CASES = ["full", "incremental", "merged", "incremental-after-merge",
         *(f"online-{m}" for m in ONLINE_MODES), "online-separate-moved",
         "online-separate-overlaid"]


@pytest.mark.parametrize("name", CASES)
def test_mount_equals_restore_and_t0(name: str, request: pytest.FixtureRequest,
                                     tmp_path: Path) -> None:
    """The mount, a 'sdbackup restore' of the same generation and the data at T0 are
    the same tree (diff -r; types, modes, times, symlink targets, hard links), and so is
    a 'cp -a' out of the mount."""
    cases = request.getfixturevalue("online" if name.startswith("online") else "offline")
    c: Case = cases[name]
    g = generations(c.medium)[c.gen]
    assert g["kind"] == c.kind
    assert _chain_len(c.medium, c.gen) == c.chain
    mp = tmp_path / "mnt"
    restored = tmp_path / "restored"
    moved = name in ("online-separate-moved", "online-separate-overlaid")
    with _moved(c.log_home if moved else None) as away:
        args: list[str | os.PathLike[str]] = [c.gen]
        if name == "online-separate-moved":
            assert away is not None
            # Without the log (not overlaid, not where the backup wrote it): a clear
            # error before anything is mounted, with or without --background.
            mp.mkdir()
            for bg in ((), ("--background",)):
                r = sdb("mount", "--medium", c.medium, c.gen, mp, *bg, check=False)
                assert r.returncode == 4, r.stderr
                assert "--log-medium" in r.stderr and len(r.stderr.splitlines()) == 1
                assert not mounted(mp)
            args += ["--log-medium", away]
        sdb("restore", "--medium", c.medium, *args, "--to", restored, "-q")
        with mount_bg(c.medium, mp, *args) as m:
            diff_r(mp, restored)
            diff_r(mp, c.t0)
            same_trees(restored, mp)
            same_trees(c.t0, mp, times=c.times)
            copied = tmp_path / "copied"
            run("cp", "-a", mp, copied)
            same_trees(restored, copied)
            assert "ERROR" not in m.log_text()
        if away is not None:  # the --all view reads the moved log too
            with mount_bg(c.medium, tmp_path / "mnt-all", "--all", "--log-medium", away) as m:
                diff_r(m.mp / os.readlink(m.mp / "latest"), c.t0)
                assert "ERROR" not in m.log_text()


# -- read-only ---------------------------------------------------------------------------------

def _errno_of(fn: Callable[[], object]) -> int:
    try:
        fn()
    except OSError as e:
        return e.errno or 0
    return 0


def test_changes_fail_with_erofs_and_reads_go_on(offline: dict[str, Case],
                                                 tmp_path: Path) -> None:
    """Every kind of change fails with EROFS (system calls, and programs: sh, cp, tar,
    touch); afterwards the mount still reads exactly the generation."""
    c = offline["incremental"]
    with mount_bg(c.medium, tmp_path / "mnt", c.gen) as m:
        d = m.mp / "data"
        f = d / "big" / "b0"
        before = f.read_bytes()
        st = f.stat()
        changes: dict[str, Callable[[], object]] = {
            "open O_WRONLY": lambda: os.open(f, os.O_WRONLY),
            "open O_RDWR": lambda: os.open(f, os.O_RDWR),
            "open O_WRONLY|O_APPEND": lambda: os.open(f, os.O_WRONLY | os.O_APPEND),
            "open O_WRONLY|O_TRUNC": lambda: os.open(f, os.O_WRONLY | os.O_TRUNC),
            "create": lambda: os.open(d / "new", os.O_WRONLY | os.O_CREAT, 0o644),
            "create O_EXCL": lambda: os.open(d / "new", os.O_RDWR | os.O_CREAT | os.O_EXCL),
            "mkdir": lambda: os.mkdir(d / "made-dir"),
            "rmdir": lambda: os.rmdir(d / "empty-dir"),
            "unlink": lambda: os.unlink(f),
            "rename": lambda: os.rename(f, d / "renamed"),
            "rename over": lambda: os.rename(f, d / "new1"),
            "chmod": lambda: os.chmod(f, 0o600),
            "chown": lambda: os.chown(f, 1, 1),
            "truncate": lambda: os.truncate(f, 0),
            "utime": lambda: os.utime(f, (0, 0)),
            "symlink": lambda: os.symlink("x", d / "sl"),
            "link": lambda: os.link(f, d / "hl"),
            "mkfifo": lambda: os.mkfifo(d / "fifo"),
            "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
        }
        got = {what: errno.errorcode.get(_errno_of(fn), "no error")
               for what, fn in changes.items()}
        assert got == dict.fromkeys(changes, "EROFS")
        # Programs see the same.
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "t.txt").write_text("to extract\n")
        run("tar", "-C", tmp_path / "in", "-cf", tmp_path / "t.tar", "t.txt")
        for cmd in (["sh", "-c", f"echo x > {f}"], ["sh", "-c", f"echo x >> {f}"],
                    ["cp", tmp_path / "in" / "t.txt", d / "copied"], ["touch", d / "touched"],
                    ["tar", "-C", d, "-xf", tmp_path / "t.tar"], ["mkdir", d / "x"],
                    ["rm", "-rf", d / "a"], ["mv", d / "new1", d / "new2"]):
            r = run(*cmd, check=False)
            assert r.returncode != 0 and "Read-only file system" in r.stderr, (cmd, r.stderr)
        # A descriptor opened for reading cannot write either.
        fd = os.open(f, os.O_RDONLY)
        try:
            assert _errno_of(lambda: os.write(fd, b"x")) == errno.EBADF
            assert os.pread(fd, 100, 0) == before[:100]
        finally:
            os.close(fd)
        # Nothing changed, and the mount reads on.
        assert f.read_bytes() == before and f.stat().st_mtime_ns == st.st_mtime_ns
        assert sorted(os.listdir(d)) == sorted(os.listdir(c.t0 / "data"))
        diff_r(m.mp, c.t0)
        statvfs = os.statvfs(m.mp)
        assert statvfs.f_flag & os.ST_RDONLY
        assert statvfs.f_bavail == 0
        assert "ERROR" not in m.log_text()


# -- a damaged medium -------------------------------------------------------------------------

def test_damaged_record_fails_only_its_files_with_eio(tmp_path: Path) -> None:
    """Bytes flipped inside one DATA record of a full, and an incremental of it mounted:
    reading any file with blocks in that record fails with EIO (and keeps failing:
    nothing wrong is cached), the mount's log names the generation that holds the
    record (the full), the disk, the block range and the medium offset, and every other
    file reads exactly as the source (diff -r reports only the damaged files)."""
    from test_backup_support import SMALL, backup, make_cluster, put_tree

    from sdbackup.media.record_format import HEADER_SIZE, Kind
    from sdbackup.media.record_reader import RecordReader

    cdir = make_cluster(tmp_path / "c", block_size=1024, disks=(4 * MiB, 2 * MiB))
    src = tmp_path / "src"
    src.mkdir()
    sample(src / "data", seed=7, big=3, big_size=60 * KiB)
    put_tree(cdir, src / "data", "/")
    medium = tmp_path / "medium"
    gid = backup(cdir, medium).manifest.id  # records of 4 KiB: one file needs many
    with Mirror(cdir, src) as mi:
        mi.write("data/big/b0", 0, os.urandom(9000))
        mi.write("data/after-the-full", 0, b"in the incremental only\n")
    inc = backup(cdir, medium, dataclasses.replace(SMALL, incremental=True)).manifest.id
    assert _chain_len(medium, inc) == 2
    med = DiskMedium.open(medium)
    g = Generation(med, med.resolve(gid))
    victim = "data/big/b1"  # unchanged since the full: read from the full's records
    with SnapshotMeta(Generation(med, med.resolve(inc)).meta_file(), "snapshot") as snap:
        fs = ReadOnlyFileSystem(snap, T0Images({}, g.block_size))  # metadata only
        a = fs.resolve("/" + victim)
        exts = snap.map_read(a.ino, 0, -(-a.size // g.block_size))
        ext = exts[len(exts) // 2]
        block = ext.dblock + ext.length // 2  # a block in the middle of the file
        e = g.index().find(ext.disk, int(Kind.DATA), block, 1)[0]
        disk, start, count = int(e["disk"]), int(e["start"]), int(e["count"])
        offset, stream = int(e["offset"]), int(e["stream"])
        # Every file with a block in that record (they share its checksum).
        affected = set()
        for p in all_files(src):
            rel = str(p.relative_to(src))
            fa = fs.resolve("/" + rel)
            nb = -(-fa.size // g.block_size)
            for x in snap.map_read(fa.ino, 0, nb) if nb else []:
                if x.disk == disk and x.dblock < start + count and start < x.dblock + x.length:
                    affected.add(rel)
    assert victim in affected and len(affected) < len(all_files(src)) // 2, affected
    path = g.stream_path(stream)
    with RecordReader(path) as rd:
        h = rd.read_header(offset)
    at = offset + HEADER_SIZE + h.payload_len // 2
    with open(path, "r+b") as f:
        f.seek(at)
        good = f.read(16)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in good))

    with mount_bg(medium, tmp_path / "mnt", inc) as m:
        for attempt in range(2):  # the second time too: a failure is not cached
            with pytest.raises(OSError) as ei:
                (m.mp / victim).read_bytes()
            assert ei.value.errno == errno.EIO, attempt
        r = run("cat", m.mp / victim, check=False)
        assert r.returncode != 0 and "Input/output error" in r.stderr
        for p in all_files(src):
            rel = str(p.relative_to(src))
            if rel in affected:
                assert _errno_of(lambda rel=rel: (m.mp / rel).read_bytes()) == errno.EIO, rel
            else:
                assert (m.mp / rel).read_bytes() == p.read_bytes(), rel
        # diff -r reads everything: no content differs, only the damaged files fail.
        r = run("diff", "-r", "--no-dereference", src, m.mp, check=False)
        assert r.returncode == 2 and r.stdout == "", r.stdout
        failed = {line.split(": ")[1] for line in r.stderr.splitlines()}
        assert failed == {str(m.mp / rel) for rel in affected}, r.stderr
        assert all(line.endswith(": Input/output error") for line in r.stderr.splitlines())
        want = (f"generation {gid}: disk {g.disk_name(disk)} blocks {start}..{start + count - 1}"
                f" (stream {stream}, medium offset {offset})")
        lines = [line for line in m.log_text().splitlines() if want in line]
        assert lines, f"no log line names {want!r}:\n{m.log_text()[-3000:]}"
        assert all(" ERROR " in line and inc not in line for line in lines)
        # The mount serves on.
        assert (m.mp / "data" / "big" / "b0").read_bytes() == (src / "data/big/b0").read_bytes()


# -- another host ------------------------------------------------------------------------------

def test_mount_in_a_network_namespace_with_only_the_medium(tmp_path: Path) -> None:
    """A "host" with no network (a new network namespace: not even loopback is up) and
    only a copy of the medium, which it sees read-only (the cluster, its disks and any
    coordinator gone), mounts an incremental through its chain; tar through the mount
    gives the data at T0."""
    base = tmp_path / "site"
    base.mkdir()
    cdir = init_cluster(base, "4MiB", "4MiB")
    work = tmp_path / "work"
    work.mkdir()
    sample(work / "data", seed=11, big=2)
    sdb("fs", cdir, "put", work / "data", "/")
    backup_cli(cdir, base / "medium")
    with Mirror(cdir, work) as m:
        m.write("data/big/b0", 50_000, os.urandom(10_000))
        m.unlink("data/c/f02.bin")
        m.write("data/later", 0, b"written after the full\n")
    gen = str(backup_cli(cdir, base / "medium", "--incremental")["generation"])
    run("cp", "-a", work, tmp_path / "t0")
    host = tmp_path / "host"
    host.mkdir()
    run("cp", "-a", base / "medium", host / "copy")
    shutil.rmtree(base)  # the cluster directory, its disks, the original medium
    netns = os.readlink("/proc/self/ns/net")
    if shutil.which("ip"):  # what such a host has: a loopback device, down
        links = run("unshare", "--net", "--", "ip", "-o", "link").stdout.splitlines()
        assert len(links) == 1 and "state DOWN" in links[0], links
    # The host sees its medium read-only (a write-protected drive).
    ro = host / "medium"
    ro.mkdir()
    run("mount", "--bind", host / "copy", ro)
    try:
        run("mount", "-o", "remount,ro,bind", ro)
        assert _errno_of(lambda: (ro / "x").touch()) == errno.EROFS
        with mount_bg(ro, host / "mnt", gen, prefix=("unshare", "--net", "--")) as m:
            assert os.readlink(f"/proc/{m.pid}/ns/net") != netns, "not in another namespace"
            run("tar", "-C", m.mp, "-cf", tmp_path / "out.tar", ".")
            (tmp_path / "untarred").mkdir()
            run("tar", "-C", tmp_path / "untarred", "-xf", tmp_path / "out.tar")
            same_trees(tmp_path / "t0", tmp_path / "untarred", times=False)
            diff_r(m.mp, tmp_path / "t0")
            assert (m.mp / "data" / "later").read_text() == "written after the full\n"
    finally:
        run("umount", ro, check=False)


# -- every generation --------------------------------------------------------------------------

def test_all_generations_follow_the_medium_while_mounted(tmp_path: Path) -> None:
    """``--all``: one directory per generation, named by T0 and id, and 'latest'. A
    backup committed while mounted appears (and 'latest' points at it) within a couple
    of seconds, with no remount, and reads as its T0; a merge and a prune while mounted
    make the generations they replace disappear and their results appear, each
    reading as the data at its T0."""
    base = tmp_path / "site"
    base.mkdir()
    cdir = init_cluster(base, "4MiB", "4MiB")
    work = tmp_path / "work"
    work.mkdir()
    sample(work / "data", seed=13, big=2)
    sdb("fs", cdir, "put", work / "data", "/")
    medium = tmp_path / "medium"
    t0 = tmp_path / "t0"
    t0.mkdir()
    t0_of: dict[str, Path] = {}

    def take(*args: str) -> str:
        gid = str(backup_cli(cdir, medium, *args)["generation"])
        run("cp", "-a", work, t0 / gid)
        t0_of[gid] = t0 / gid
        return gid

    def dirname(gid: str) -> str:  # '2026-12-02T00:59:31Z_<id>': T0 to the second, UTC
        return f"{str(generations(medium)[gid]['t0'])[:19]}Z_{gid}"

    def listing() -> set[str]:
        return set(os.listdir(mp))

    a = take()
    mp = tmp_path / "mnt"
    with mount_bg(medium, mp, "--all") as m:
        da = dirname(a)
        assert listing() == {da, "latest"}
        assert os.readlink(mp / "latest") == da
        assert (mp / "latest").is_dir()
        diff_r(mp / da, t0 / a)
        assert _errno_of(lambda: os.mkdir(mp / "x")) == errno.EROFS
        assert _errno_of(lambda: os.unlink(mp / "latest")) == errno.EROFS
        assert _errno_of(lambda: (mp / da / "data" / "new").write_text("x")) == errno.EROFS

        with Mirror(cdir, work) as mi:
            mi.write("data/big/b0", 10_000, os.urandom(5000))
            mi.write("data/second", 0, b"second backup\n")
        b = take("--incremental")
        db = dirname(b)
        t = time.monotonic()
        # 'latest' follows by itself (no listing needed), then the listing shows it.
        wait_for(lambda: os.readlink(mp / "latest") == db, 3, "'latest' to point at the new one")
        assert listing() == {da, db, "latest"}
        assert time.monotonic() - t < 3
        diff_r(mp / db, t0 / b)
        diff_r(mp / da, t0 / a)  # the older one is unchanged

        with Mirror(cdir, work) as mi:
            mi.unlink("data/second")
            mi.write("data/third", 0, b"third backup\n")
            mi.truncate("data/big/b1", 777)
        c = take("--incremental")
        dc = dirname(c)
        assert dc in listing()  # a new listing sees a new generation at once
        assert os.readlink(mp / "latest") == dc
        diff_r(mp / "latest" / "data", t0 / c / "data")

        # A program with a file and a directory open in the full (its cached pages
        # dropped, no readahead: every read of it reaches the mount).
        fd = os.open(mp / da / "data" / "big" / "b1", os.O_RDONLY)
        dfd = os.open(mp / da / "data", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            want = (t0 / a / "data" / "big" / "b1").read_bytes()
            assert os.pread(fd, 4096, 0) == want[:4096]

            # A merge while mounted: the full and the first incremental become a
            # synthetic full with the incremental's T0; the next incremental now reads
            # through it.
            ab = json.loads(sdb("merge", "--medium", medium, a, b, "--json").stdout
                            )["generation"]
            assert da not in listing()
            wait_for(lambda: not (mp / da).exists(), 3, "the full to disappear")
            # What the program had open reads on, like a deleted file still open.
            assert os.pread(fd, len(want), 0) == want
            assert sorted(os.listdir(dfd)) == sorted(os.listdir(t0 / a / "data"))
        finally:
            os.close(fd)
            os.close(dfd)
        dab = dirname(ab)
        assert dab.split("_")[0] == db.split("_")[0]
        assert listing() == {dab, dc, "latest"}
        wait_for(lambda: not (mp / da).exists() and not (mp / db).exists(), 3,
                 "the merged-away generations to disappear")
        diff_r(mp / dab, t0 / b)
        diff_r(mp / dc, t0 / c)
        assert os.readlink(mp / "latest") == dc

        # Programs walking the whole view see every generation's files, no error.
        found = run("find", mp, "-type", "f").stdout.splitlines()
        assert len(found) == sum(len(all_files(mp / d)) for d in (dab, dc))

        # A prune while mounted: one generation is left (the newest, now a full).
        sdb("prune", "--medium", medium, "--keep-last", "1")
        (last,) = generations(medium)
        dlast = dirname(last)
        assert listing() == {dlast, "latest"}
        wait_for(lambda: not (mp / dab).exists(), 3, "the pruned generation to disappear")
        wait_for(lambda: os.readlink(mp / "latest") == dlast, 3, "'latest' to follow the prune")
        diff_r(mp / dlast, t0 / c)
        assert "ERROR" not in m.log_text()


# -- processes and errors -------------------------------------------------------------------------

def test_foreground_mount_ends_on_sigterm_and_umount_ends_background(
        offline: dict[str, Case], tmp_path: Path) -> None:
    """``sdbackup mount`` in the foreground serves until SIGTERM, then unmounts and
    exits 0; a ``--background`` mount's process exits when ``sdbackup umount`` unmounts
    it (not while a program uses it: exit 3, the mount serves on); Ctrl-C (SIGINT)
    ends a foreground mount as SIGTERM does."""
    c = offline["full"]
    mp = tmp_path / "mnt"
    mp.mkdir()
    for sig in (signal.SIGTERM, signal.SIGINT):
        p = subprocess.Popen([*SDB, "mount", "--medium", str(c.medium), c.gen, str(mp)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda p=p: mounted(mp) or p.poll() is not None, 30, "the mount")
            assert p.poll() is None, p.communicate()
            diff_r(mp, c.t0)
            p.send_signal(sig)
            _out, err = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            force_unmount(mp)
        assert p.returncode == 0, err
        assert not mounted(mp)
        assert f"mounted generation {c.gen}" in err and "(read-only)" in err
        assert "Traceback" not in err and " ERROR " not in err, err
        assert os.listdir(mp) == []  # the empty directory under the mount again

    r = run(*SDB, "mount", "--medium", c.medium, c.gen, mp, "--background",
            "--log-file", tmp_path / "bg.log")
    pid = int(re.search(r"served by process (\d+)", r.stdout)[1])  # type: ignore[index]
    try:
        assert mounted(mp) and alive(pid)
        assert os.getsid(pid) == pid  # its own session: a closed terminal does not end it
        diff_r(mp, c.t0)
        with open(mp / "data" / "big" / "b0", "rb") as busy:  # a program uses the mount
            r = sdb("umount", mp, check=False)
            assert r.returncode == 3 and "busy" in r.stderr, r.stderr
            assert len(r.stderr.splitlines()) == 1
            assert mounted(mp) and alive(pid)
            assert busy.read() == (c.t0 / "data" / "big" / "b0").read_bytes()
        u = run(*SDB, "umount", mp)
        assert "unmounted" in u.stdout + u.stderr
        assert not mounted(mp)
        wait_for(lambda: not alive(pid), 20, "the background mount process to exit")
    finally:
        force_unmount(mp, pid)
    assert "unmounted" in (tmp_path / "bg.log").read_text()


def test_mount_errors_exit_codes(offline: dict[str, Case], tmp_path: Path) -> None:
    """Errors are one line on stderr with the README's exit codes (4 not found, 2 usage,
    3 busy), in the foreground and with --background, and nothing gets mounted."""
    c = offline["full"]
    mp = tmp_path / "mnt"
    mp.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    other = tmp_path / "other"
    other.mkdir()
    cases: list[tuple[int, list[str | os.PathLike[str]], str]] = [
        (4, ["--medium", tmp_path / "no-such-medium", mp], "no-such-medium"),
        (4, ["--medium", tmp_path / "no-such-medium", "--all", mp], "no-such-medium"),
        (4, ["--medium", c.medium, "20200101T000000.000000Z-deadbeef", mp], "deadbeef"),
        (4, ["--medium", c.medium, "nosuchgen", mp], "nosuchgen"),
        (2, ["--medium", c.medium, c.gen, a_file], "not a directory"),
        (2, ["--medium", c.medium, c.gen, tmp_path / "no-such-dir"], "no-such-dir"),
        (2, ["--medium", c.medium, "--all", c.gen, mp], "--all"),
        (2, ["--medium", c.medium, c.gen, mp, other], "give [GEN] MOUNTPOINT"),
    ]
    for code, args, says in cases:
        for bg in ((), ("--background",)):
            r = sdb("mount", *args, *bg, check=False)
            what = f"sdbackup mount {' '.join(map(str, [*args, *bg]))}"
            assert r.returncode == code, f"{what}: exit {r.returncode}, not {code}: {r.stderr}"
            assert len(r.stderr.splitlines()) == 1, f"{what}: not one line: {r.stderr}"
            assert says in r.stderr, f"{what}: {r.stderr}"
            assert "Traceback" not in r.stderr
            assert not mounted(mp) and not mounted(other)
    # A mount point that is already mounted: busy (3).
    with mount_bg(c.medium, mp, c.gen):
        for bg in ((), ("--background",)):
            r = sdb("mount", "--medium", c.medium, c.gen, mp, *bg, check=False)
            assert r.returncode == 3 and len(r.stderr.splitlines()) == 1, r.stderr
            assert "already mounted" in r.stderr
        diff_r(mp, c.t0)  # the first mount is unharmed
    # umount of what is not mounted: not found (4).
    r = sdb("umount", mp, check=False)
    assert r.returncode == 4 and len(r.stderr.splitlines()) == 1, r.stderr


def test_mounted_generations_read_on_after_a_prune_removes_them(
        offline: dict[str, Case], tmp_path: Path) -> None:
    """A prune while generations are mounted (a user browses yesterday's backup when
    the nightly prune runs): it merges them away and removes their directories, and
    the mounts go on reading exactly what they showed before, files opened before the
    prune and files first read after it, like a file deleted while open."""
    c = offline["incremental"]
    medium = tmp_path / "medium"
    run("cp", "-a", c.medium, medium)
    gens = sorted(generations(medium))
    assert len(gens) == 4
    middle, newest = gens[1], gens[3]
    t0 = c.t0.parent
    with mount_bg(medium, tmp_path / "m-middle", middle) as m1, \
            mount_bg(medium, tmp_path / "m-newest", newest) as m2:
        assert sorted(os.listdir(m1.mp)) == ["data"]  # looked at, nothing read yet
        held = open(m2.mp / "data" / "big" / "b3", "rb")  # noqa: SIM115
        try:
            first = held.read(1000)
            sdb("prune", "--medium", medium, "--keep-last", "1")
            assert not (medium / "generations" / middle).exists()
            assert not (medium / "generations" / newest).exists()
            assert first + held.read() == (t0 / newest / "data/big/b3").read_bytes()
        finally:
            held.close()
        diff_r(m1.mp, t0 / middle)
        diff_r(m2.mp, t0 / newest)
        assert "ERROR" not in m1.log_text() + m2.log_text()
