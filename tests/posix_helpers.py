"""Helpers for the POSIX tests on a real FUSE mount (tests/test_posix_*.py).

- :class:`Mounts`: a coordinator and node agents mounted with FUSE, each a separate
  ``sdbackup`` process as in production (the same shape as tests/test_fuse_mount.py).
- :func:`run_ops`: run a short list of file operations in a child process that starts
  as root, may change its identity (uid, gid, supplementary groups) or run without
  CAP_FSETID, and reports every result (a value or an errno name). The child changes
  into the test directory *before* it gives up root, so that it can use relative names
  in a directory whose ancestors it could not search (pytest's tmp_path is 0700).
- Oracles: the same operations on a local ext4 directory and on tmpfs, in the same
  test, so that an expectation is what this very kernel does, not what a man page says.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import test_backup_support as support

SDB = [sys.executable, "-m", "sdbackup.cli.main"]
NOBODY = 65534
NOGROUP = 65534
CAP_FSETID = 1 << 4

Op = list[Any]
"""One operation for :func:`run_ops`, e.g. ``["open", "f", ["O_WRONLY"]]``."""


def require_fuse() -> None:
    """Fail (never skip) when this machine cannot run FUSE tests."""
    support.require_fuse("POSIX tests", "fusermount3", root=True)


def sh(*args: str | Path, timeout: float = 120, check: bool = True
       ) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                       timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {r.returncode}\n"
                             f"stdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-2000:]}")
    return r


def mounted(mp: Path) -> bool:
    needle = f" {os.path.abspath(mp)} "
    with open("/proc/self/mountinfo") as f:
        return any(needle in line and "fuse.sdbackup" in line for line in f)


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@dataclass
class Mounts:
    """A cluster with a coordinator and FUSE-mounted node agents (stopped in ``stop``)."""

    base: Path
    nodes: dict[str, tuple[subprocess.Popen[bytes], Path]] = field(default_factory=dict)
    coord: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.cdir = self.base / "cluster"
        sh(*SDB, "init", self.cdir, "--disk", f"d0={self.base}/d0.img:512MiB")

    def start(self, *names: str) -> Mounts:
        self.coord = subprocess.Popen([*SDB, "coordinator", str(self.cdir)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: (self.cdir / "coordinator.addr").exists(), 30, "the coordinator")
        for name in names:
            self.start_node(name)
        return self

    def start_node(self, name: str) -> Path:
        mp = self.base / f"mnt-{name}"
        mp.mkdir(exist_ok=True)
        out = self.base / f"node-{name}.out"
        with open(out, "ab") as f:
            proc = subprocess.Popen([*SDB, "node", str(self.cdir), "--name", name,
                                     "--mount", str(mp)], stdout=f, stderr=f)
        self.nodes[name] = (proc, mp)

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"node {name} exited {proc.returncode}: "
                                     f"{out.read_text()[-2000:]}")
            return mounted(mp) and os.stat(mp).st_dev != os.stat(self.base).st_dev

        wait_for(up, 30, f"node {name} to mount {mp}")
        return mp

    def mp(self, name: str) -> Path:
        return self.nodes[name][1]

    def log_problems(self) -> list[str]:
        bad = []
        for p in sorted((self.cdir / "logs").glob("*.log")):
            for line in p.read_text(errors="replace").splitlines():
                if " ERROR " in line or "Traceback" in line or " CRITICAL " in line:
                    bad.append(f"{p.name}: {line}")
        return bad

    def stop(self) -> None:
        for name, (proc, mp) in list(self.nodes.items()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if mounted(mp):
                sh("fusermount3", "-uz", mp, check=False)
            del self.nodes[name]
        if self.coord is not None and self.coord.poll() is None:
            self.coord.terminate()
            try:
                self.coord.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.coord.kill()
                self.coord.wait(10)


@contextmanager
def mounted_cluster(base: Path, *names: str) -> Iterator[Mounts]:
    """A running cluster with ``names`` mounted; at the end: no errors logged, fsck clean."""
    require_fuse()
    m = Mounts(base)
    try:
        m.start(*names)
        yield m
    finally:
        m.stop()
    assert m.log_problems() == [], "errors in the agents' logs"
    r = sh(*SDB, "fsck", m.cdir, check=False)
    assert r.returncode == 0, f"fsck after the tests: {r.stdout}{r.stderr}"


@contextmanager
def tmpfs_dir() -> Iterator[Path]:
    """A fresh directory on tmpfs (/dev/shm), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="sdb-oracle-", dir="/dev/shm"))
    os.chmod(d, 0o755)  # searchable by the child after it gives up root
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def fs_type(path: Path) -> str:
    """The file system type of the mount that holds ``path`` (from mountinfo)."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            mp = left.split()[4]
            if (real == mp or real.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                best, kind = mp, right.split()[0]
    return kind


# -- the child ----------------------------------------------------------------------------

_CHILD = r"""
import errno, json, os, stat, sys
spec = json.loads(sys.argv[1])
os.chdir(spec["dir"])
fd = -1
out = []

def flags(names):
    v = 0
    for n in names:
        v |= getattr(os, n)
    return v

def mode(m):
    return "0o%o" % stat.S_IMODE(m)

for op in spec["ops"]:
    name, args = op[0], op[1:]
    try:
        if name == "as":  # uid, gid, supplementary groups
            os.setgroups(args[2])
            os.setresgid(args[1], args[1], args[1])
            os.setresuid(args[0], args[0], args[0])
            r = None
        elif name == "open":  # name, flags, [mode]
            fd = os.open(args[0], flags(args[1]), args[2] if len(args) > 2 else 0o644)
            r = None
        elif name == "umask":
            os.umask(args[0])
            r = None
        elif name == "unlink":
            os.unlink(args[0])
            r = None
        elif name == "write":
            r = os.write(fd, args[0].encode())
        elif name == "writev":
            r = os.writev(fd, [a.encode() for a in args[0]])
        elif name == "copy_file_range":  # from file args[0] into the open descriptor
            src = os.open(args[0], os.O_RDONLY)
            try:
                r = os.copy_file_range(src, fd, args[1])
            finally:
                os.close(src)
        elif name == "pwrite":
            r = os.pwrite(fd, args[0].encode(), args[1])
        elif name == "ftruncate":
            os.ftruncate(fd, args[0])
            r = None
        elif name == "truncate":
            os.truncate(args[0], args[1])
            r = None
        elif name == "fchmod":
            os.fchmod(fd, args[0])
            r = None
        elif name == "chmod":
            os.chmod(args[0], args[1])
            r = None
        elif name == "chown":
            os.chown(args[0], args[1], args[2])
            r = None
        elif name == "fstat":
            r = mode(os.fstat(fd).st_mode)
        elif name == "stat":
            r = mode(os.stat(args[0]).st_mode)
        elif name == "size":
            r = os.fstat(fd).st_size
        elif name == "close":
            os.close(fd)
            fd = -1
            r = None
        elif name == "fsetid":  # does this process hold CAP_FSETID?
            with open("/proc/self/status") as f:
                cap = [ln for ln in f if ln.startswith("CapEff:")][0].split()[1]
            r = bool(int(cap, 16) & (1 << 4))
        else:
            raise SystemExit("unknown op %r" % (name,))
    except OSError as e:
        r = errno.errorcode.get(e.errno, str(e.errno))
    out.append(r)
print(json.dumps(out))
"""


def run_ops(d: Path, ops: Sequence[Op], *, drop_fsetid: bool = False,
            timeout: float = 60) -> list[Any]:
    """Run ``ops`` in a child that starts as root in directory ``d``; its results.

    ``drop_fsetid``: the child runs as root without CAP_FSETID (``setpriv``).
    """
    prefix = (["setpriv", "--bounding-set=-fsetid", "--inh-caps=-fsetid"]
              if drop_fsetid else [])
    r = subprocess.run([*prefix, sys.executable, "-c", _CHILD,
                        json.dumps({"dir": str(d), "ops": list(ops)})],
                       capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise AssertionError(f"child failed ({r.returncode}): {r.stderr[-3000:]}")
    out: list[Any] = json.loads(r.stdout)
    return out


def omode(path: Path) -> str:
    """The permission bits of ``path`` as the child reports them (``0o4755``)."""
    return f"0o{stat.S_IMODE(os.stat(path).st_mode):o}"


def make_file(path: Path, mode: int, uid: int = 0, gid: int = 0,
              data: bytes = b"abc") -> None:
    """Create ``path`` as root with ``data``, owner and mode (chmod after chown, which
    would clear the set-ID bits)."""
    path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
