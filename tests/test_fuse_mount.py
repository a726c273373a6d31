"""Real kernel mounts (STYLE.md test tier 2 and 3): node agents mounted with FUSE, used
by real programs (tar, diff, sqlite3, cp, dd, cmp, sh), two mounts of one cluster
checked against each other, and agents killed or stopped under their mounts.

Every test here needs /dev/fuse and pyfuse3 and FAILS when either is missing: a
machine that cannot run them must not look green.

One cluster (a coordinator and two node agents ``n1``, ``n2`` mounted at ``m1``, ``m2``,
each a separate ``sdbackup`` process, as in production) serves the whole module; the
tests that start, stop and kill agents use a third node of their own. At the end the
agents are stopped, the mounts must be gone, the agents' logs must hold no errors, and
``sdbackup fsck`` must find the metadata consistent.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import test_backup_support as support

pytestmark = pytest.mark.fuse

SDB = [sys.executable, "-m", "sdbackup.cli.main"]
SITE = Path(pytest.__file__).resolve().parent.parent  # the venv's site-packages


def require_fuse() -> None:
    """Fail (never skip) when this machine cannot run the FUSE tests."""
    support.require_fuse("FUSE tests", "fusermount3", "sqlite3", "tar", "diff", "cp", "dd",
                         "cmp", hint=" (./run installs fuse3, libfuse3-dev and sqlite3)")


def sh(*args: str | Path, cwd: Path | None = None, timeout: float = 120,
       check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {r.returncode}\n"
                             f"stdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-2000:]}")
    return r


def mounted(mp: Path) -> bool:
    needle = f" {os.path.abspath(mp)} "
    with open("/proc/self/mountinfo") as f:
        return any(needle in line and "fuse.sdbackup" in line for line in f)


def wait_for(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@dataclass
class Node:
    name: str
    mp: Path
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Cluster:
    base: Path
    cdir: Path
    coord: subprocess.Popen[bytes] | None = None
    nodes: dict[str, Node] = field(default_factory=dict)

    def start_coordinator(self) -> None:
        self.coord = subprocess.Popen([*SDB, "coordinator", str(self.cdir)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: (self.cdir / "coordinator.addr").exists(), 30, "the coordinator")

    def start_node(self, name: str, *extra: str) -> Node:
        mp = self.base / f"mnt-{name}"
        mp.mkdir(exist_ok=True)
        out = self.base / f"node-{name}.out"
        with open(out, "ab") as f:
            proc = subprocess.Popen([*SDB, "node", str(self.cdir), "--name", name,
                                     "--mount", str(mp), *extra], stdout=f, stderr=f)
        node = Node(name, mp, proc, self.cdir / "logs" / f"node-{name}.log")
        self.nodes[name] = node

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"node {name} exited {proc.returncode}: "
                                     f"{out.read_text()[-2000:]}")
            return mounted(mp) and os.stat(mp).st_dev != os.stat(self.base).st_dev

        wait_for(up, 30, f"node {name} to mount {mp}")
        return node

    def stop_node(self, name: str, sig: int = signal.SIGTERM) -> int:
        node = self.nodes.pop(name)
        if node.proc.poll() is None:
            node.proc.send_signal(sig)
        try:
            return node.proc.wait(timeout=60)
        finally:
            if mounted(node.mp):
                sh("fusermount3", "-uz", node.mp, check=False)

    def stop(self) -> None:
        for name in list(self.nodes):
            self.stop_node(name)
        if self.coord is not None and self.coord.poll() is None:
            self.coord.terminate()
            self.coord.wait(timeout=60)


def log_problems(path: Path, allow: tuple[str, ...] = ()) -> list[str]:
    if not path.exists():
        return []
    bad = []
    for line in path.read_text(errors="replace").splitlines():
        if (" ERROR " in line or "Traceback" in line or " CRITICAL " in line) and \
                not any(a in line for a in allow):
            bad.append(line)
    return bad


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_fuse()
    base = tmp_path_factory.mktemp("fuse")
    cdir = base / "cluster"
    sh(*SDB, "init", cdir, "--disk", f"d0={base}/d0.img:1GiB",
       "--disk", f"d1={base}/d1.img:1GiB")
    c = Cluster(base, cdir)
    try:
        c.start_coordinator()
        c.start_node("n1")
        c.start_node("n2")
        yield c
        logs = [c.nodes[n].log for n in ("n1", "n2")]
    finally:
        c.stop()
    for p in ("n1", "n2"):
        assert not mounted(base / f"mnt-{p}"), f"{p} is still mounted after SIGTERM"
    for log in logs:
        assert log_problems(log) == [], f"errors in {log}"
    r = sh(*SDB, "fsck", cdir, check=False)
    assert r.returncode == 0, f"fsck after the FUSE tests: {r.stdout}{r.stderr}"


@pytest.fixture
def m1(cluster: Cluster) -> Path:
    return cluster.nodes["n1"].mp


@pytest.fixture
def m2(cluster: Cluster) -> Path:
    return cluster.nodes["n2"].mp


@pytest.fixture
def work(cluster: Cluster, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """A fresh directory for one test, as seen from n1 and from n2."""
    name = request.node.name.replace("[", "_").replace("]", "")
    d1 = cluster.nodes["n1"].mp / name
    d1.mkdir()
    return d1, cluster.nodes["n2"].mp / name


# -- real programs ----------------------------------------------------------------------
def test_tar_extract_of_an_installed_package_matches_with_diff(
        work: tuple[Path, Path], tmp_path: Path) -> None:
    d1, d2 = work
    tarball = tmp_path / "pkgs.tar"
    with tarfile.open(tarball, "w") as t:
        for pkg in ("hypothesis", "click"):
            t.add(SITE / pkg, arcname=pkg)
    sh("tar", "-C", d1, "-xf", tarball)
    for pkg in ("hypothesis", "click"):
        # Read back through the other node: contents, then names, modes and sizes.
        sh("diff", "-r", SITE / pkg, d2 / pkg)
        listing = ("find . \\( -type d -printf '%P d %m\\n' \\) -o "
                   "-printf '%P %y %m %s\\n' | sort")
        want = sh("sh", "-c", listing, cwd=SITE / pkg).stdout
        assert sh("sh", "-c", listing, cwd=d2 / pkg).stdout == want
    # tar's own comparison (contents, modes, mtimes) through the other node too.
    sh("tar", "-C", d2, "--compare", "-f", tarball)


def test_sqlite3_database_shared_by_two_mounts(work: tuple[Path, Path]) -> None:
    d1, d2 = work
    db1, db2 = d1 / "app.db", d2 / "app.db"
    sh("sqlite3", db1, "CREATE TABLE t(id INTEGER PRIMARY KEY, who TEXT, v BLOB);"
       "CREATE INDEX t_who ON t(who);")
    rows = "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 2000) "
    sh("sqlite3", db1, f"BEGIN; {rows} INSERT INTO t(who, v) SELECT 'n1', randomblob(300) "
       "FROM s; COMMIT;")
    sh("sqlite3", db2, f"BEGIN; {rows} INSERT INTO t(who, v) SELECT 'n2', randomblob(300) "
       "FROM s; COMMIT;")
    sh("sqlite3", db1, "UPDATE t SET who = 'n1+' WHERE id % 7 = 0;")
    for db in (db1, db2):
        out = sh("sqlite3", db, "SELECT who, count(*) FROM t GROUP BY who ORDER BY who;"
                 "PRAGMA integrity_check;").stdout.split()
        assert out == ["n1|1715", "n1+|571", "n2|1714", "ok"], (db, out)
    assert not (d1 / "app.db-journal").exists()


def test_cp_a_preserves_symlinks_hard_links_modes_and_times(
        work: tuple[Path, Path], tmp_path: Path) -> None:
    d1, d2 = work
    src = tmp_path / "tree"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n" * 1000)
    (src / "sub" / "b.bin").write_bytes(os.urandom(200_000))
    os.link(src / "a.txt", src / "sub" / "a-again.txt")
    os.link(src / "a.txt", src / "sub" / "deep" / "a-third.txt")
    os.symlink("../a.txt", src / "sub" / "rel-link")
    os.symlink("/nonexistent/dangling", src / "dangling")
    os.symlink("sub/deep", src / "dir-link")
    os.mkfifo(src / "fifo")
    os.chmod(src / "sub" / "b.bin", 0o640)
    os.chmod(src / "sub" / "deep", 0o750)
    os.utime(src / "a.txt", ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    sh("cp", "-a", src, d1 / "tree")
    sh("diff", "-r", "--no-dereference", "-x", "fifo", src, d2 / "tree")
    dst = d2 / "tree"
    a, a2, a3 = (os.stat(dst / p) for p in ("a.txt", "sub/a-again.txt", "sub/deep/a-third.txt"))
    assert a.st_ino == a2.st_ino == a3.st_ino and a.st_nlink == 3
    assert os.stat(dst / "sub" / "b.bin").st_nlink == 1
    assert a.st_mtime_ns == 1_600_000_000_987_654_321
    assert os.readlink(dst / "sub" / "rel-link") == "../a.txt"
    assert os.readlink(dst / "dangling") == "/nonexistent/dangling"
    assert (dst / "sub" / "rel-link").read_text() == "alpha\n" * 1000
    assert sorted(os.listdir(dst / "dir-link")) == ["a-third.txt"]
    assert stat.S_ISFIFO(os.lstat(dst / "fifo").st_mode)
    for p in ("sub/b.bin", "sub/deep", "sub", "a.txt"):
        s, d = os.lstat(src / p), os.lstat(dst / p)
        assert (stat.S_IMODE(d.st_mode), d.st_uid, d.st_gid) == \
            (stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid), p
        if not stat.S_ISDIR(s.st_mode):
            assert (d.st_size, d.st_mtime_ns) == (s.st_size, s.st_mtime_ns), p


def test_dd_256_mib_then_cmp_from_both_mounts(work: tuple[Path, Path], tmp_path: Path
                                              ) -> None:
    d1, d2 = work
    local = tmp_path / "big"
    sh("dd", "if=/dev/urandom", f"of={local}", "bs=1M", "count=256", "status=none")
    sh("dd", f"if={local}", f"of={d1 / 'big'}", "bs=1M", "conv=fsync", "status=none")
    assert os.stat(d2 / "big").st_size == 256 << 20
    sh("cmp", local, d2 / "big")
    sh("cmp", local, d1 / "big")
    # Overwrite a range in the middle from the other node, unaligned, and re-check.
    patch = os.urandom(3 << 20)
    with open(d2 / "big", "r+b") as f:
        f.seek(100_000_001)
        f.write(patch)
    with open(local, "r+b") as f:
        f.seek(100_000_001)
        f.write(patch)
    sh("cmp", local, d1 / "big")
    os.unlink(d1 / "big")


def test_concurrent_shell_appends_from_two_mounts_lose_nothing(work: tuple[Path, Path]
                                                               ) -> None:
    d1, d2 = work
    loop = 'for i in $(seq 1 {n}); do echo "{who} line $i" >> "{path}"; done'
    n = 250
    procs = [subprocess.Popen(["sh", "-c", loop.format(n=n, who=who, path=d / "log")])
             for who, d in (("n1", d1), ("n2", d2))]
    for p in procs:
        assert p.wait(timeout=120) == 0
    for d in (d1, d2):
        lines = (d / "log").read_text().splitlines()
        assert len(lines) == 2 * n
        for who in ("n1", "n2"):
            mine = [ln for ln in lines if ln.startswith(who + " ")]
            assert mine == [f"{who} line {i}" for i in range(1, n + 1)]


_APPENDER = textwrap.dedent("""
    import os, sys
    path, tag, count, size = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3]), int(sys.argv[4])
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for i in range(count):
        rec = b"%s %06d " % (tag, i)
        rec += bytes([tag[0]]) * (size - len(rec) - 1) + b"\\n"
        assert os.write(fd, rec) == len(rec)
    os.close(fd)
""")


def test_concurrent_large_appends_cross_segments_intact(work: tuple[Path, Path]) -> None:
    """Records of 300 KiB from both nodes: appends that straddle 1 MiB segments."""
    d1, d2 = work
    count, size = 24, 300 * 1024
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(d / "data"), tag,
                               str(count), str(size)])
             for tag, d in (("A", d1), ("B", d2), ("C", d1))]
    for p in procs:
        assert p.wait(timeout=120) == 0
    data = (d2 / "data").read_bytes()
    assert len(data) == 3 * count * size
    seen: dict[str, list[int]] = {"A": [], "B": [], "C": []}
    for off in range(0, len(data), size):
        rec = data[off : off + size]
        tag = chr(rec[0])
        head = f"{tag} ".encode()
        assert rec.startswith(head), f"torn record at {off}"
        num = int(rec[2:8])
        assert rec[9:-1] == bytes([rec[0]]) * (size - 10), f"record {tag}{num} damaged"
        seen[tag].append(num)
    assert all(v == list(range(count)) for v in seen.values())


# -- two nodes see each other's names ---------------------------------------------------
def test_rename_and_unlink_are_seen_on_the_other_mount(work: tuple[Path, Path]) -> None:
    d1, d2 = work
    (d1 / "config").write_text("old\n")
    assert (d2 / "config").read_text() == "old\n"
    # The editor's pattern: write a temporary file, fsync, rename over the original.
    with open(d2 / "config.tmp", "w") as f:
        f.write("new contents\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(d2 / "config.tmp", d2 / "config")
    assert (d1 / "config").read_text() == "new contents\n"
    assert not (d1 / "config.tmp").exists()
    (d1 / "sub").mkdir()
    (d1 / "sub" / "x").write_text("x")
    os.rename(d1 / "sub", d1 / "renamed")
    assert sorted(os.listdir(d2)) == ["config", "renamed"]
    assert (d2 / "renamed" / "x").read_text() == "x"
    os.unlink(d2 / "renamed" / "x")
    with pytest.raises(FileNotFoundError):
        (d1 / "renamed" / "x").stat()
    os.rmdir(d1 / "renamed")
    assert not (d2 / "renamed").exists()


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_rename_flags(work: tuple[Path, Path]) -> None:
    d1, d2 = work
    (d1 / "a").write_text("a")
    (d1 / "b").write_text("b")
    with pytest.raises(OSError) as ei:
        _renameat2(d1 / "a", d1 / "b", 1)  # RENAME_NOREPLACE
    assert ei.value.errno == errno.EEXIST
    _renameat2(d1 / "a", d1 / "c", 1)
    assert (d2 / "c").read_text() == "a"
    with pytest.raises(OSError) as ei:
        _renameat2(d1 / "b", d1 / "c", 2)  # RENAME_EXCHANGE is not supported
    assert ei.value.errno == errno.EINVAL
    assert (d2 / "b").read_text() == "b"


def test_unlinked_open_file_lives_until_last_close(work: tuple[Path, Path]) -> None:
    d1, d2 = work
    with open(d1 / "tmp", "w+b") as f:
        f.write(b"still here" * 1000)
        f.flush()
        os.unlink(d2 / "tmp")  # by the other node
        assert not (d1 / "tmp").exists()
        f.write(b"!")
        f.seek(0)
        assert f.read() == b"still here" * 1000 + b"!"
        assert os.fstat(f.fileno()).st_nlink == 0
    assert os.listdir(d2) == []


def test_big_directory_listing_and_rm_rf(work: tuple[Path, Path]) -> None:
    """More entries than one answer of the coordinator, listed while it changes."""
    d1, d2 = work
    names = {f"entry-{i:05d}-{'x' * (i % 40)}" for i in range(1100)}
    for n in names:
        os.close(os.open(d1 / n, os.O_CREAT | os.O_WRONLY, 0o644))
    assert set(os.listdir(d2)) == names
    assert len(sh("ls", "-l", d2).stdout.splitlines()) == 1100 + 1  # plus "total"
    sh("rm", "-rf", d2)
    assert not d1.exists()
    d1.mkdir()  # for the fixture's next user of the name (none): keep the tree tidy
    d1.rmdir()


# -- POSIX details through one mount ----------------------------------------------------------
def test_errno_values(work: tuple[Path, Path]) -> None:
    d, _ = work
    (d / "f").write_text("x")
    (d / "dir" / "sub").mkdir(parents=True)
    cases = [
        (lambda: os.open(d / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY), errno.EEXIST),
        (lambda: os.open(d / "missing", os.O_RDONLY), errno.ENOENT),
        (lambda: os.open(d / "dir", os.O_WRONLY), errno.EISDIR),
        (lambda: os.open(d / "f" / "x", os.O_RDONLY), errno.ENOTDIR),
        (lambda: os.mkdir(d / "dir"), errno.EEXIST),
        (lambda: os.rmdir(d / "dir"), errno.ENOTEMPTY),
        (lambda: os.rmdir(d / "f"), errno.ENOTDIR),
        (lambda: os.unlink(d / "dir"), errno.EISDIR),
        (lambda: os.rename(d / "dir", d / "dir" / "sub" / "x"), errno.EINVAL),
        (lambda: os.link(d / "dir", d / "dlink"), errno.EPERM),
        (lambda: os.readlink(d / "f"), errno.EINVAL),
        (lambda: os.mkdir(d / ("n" * 256)), errno.ENAMETOOLONG),
        (lambda: os.rename(d / "f", d / "dir"), errno.EISDIR),
    ]
    for fn, want in cases:
        with pytest.raises(OSError) as ei:
            fn()
        assert ei.value.errno == want, (fn, ei.value)


def test_attributes_truncate_sync_statfs(work: tuple[Path, Path]) -> None:
    d, d2 = work
    p = d / "f"
    p.write_bytes(b"0123456789" * 1000)
    os.chmod(p, 0o600)
    os.chown(p, 1234, 5678)
    os.utime(p, ns=(1_000_000_000_000_000_001, 1_100_000_000_000_000_002))
    s = os.stat(d2 / "f")
    assert (stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid) == (0o600, 1234, 5678)
    assert (s.st_atime_ns, s.st_mtime_ns) == (1_000_000_000_000_000_001,
                                              1_100_000_000_000_000_002)
    os.truncate(p, 15)
    assert (d2 / "f").read_bytes() == b"012345678901234"
    os.truncate(d2 / "f", 9000)  # grow: the new part reads as zeros
    assert p.read_bytes() == b"012345678901234" + bytes(9000 - 15)
    fd = os.open(p, os.O_RDWR)
    try:
        os.pwrite(fd, b"x", 20_000)  # a hole
        os.fsync(fd)
        os.fdatasync(fd)
        os.ftruncate(fd, 20_001)
    finally:
        os.close(fd)
    data = (d2 / "f").read_bytes()
    assert len(data) == 20_001 and data[9000:20_000] == bytes(11_000) and data[-1:] == b"x"
    with open(p, "wb") as f:  # O_TRUNC
        f.write(b"short")
    assert (d2 / "f").read_bytes() == b"short"
    vfs = os.statvfs(d)
    assert vfs.f_frsize == 4096 and vfs.f_blocks == 2 * (1 << 30) // 4096
    assert 0 < vfs.f_bfree < vfs.f_blocks and vfs.f_namemax == 255


def test_mmap_reads(work: tuple[Path, Path]) -> None:
    d1, d2 = work
    payload = os.urandom(3 * 1024 * 1024 + 123)
    (d1 / "m").write_bytes(payload)
    with open(d2 / "m", "rb") as f:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:  # MAP_SHARED
            assert m[:] == payload
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as m:  # MAP_PRIVATE
            assert m[1_000_000:1_000_100] == payload[1_000_000:1_000_100]
    # A program run from the mount is mmapped by the loader.
    shutil.copy2("/bin/true", d1 / "true")
    sh(d2 / "true")
    # A shared writable mapping would be a dirty cache the coordinator cannot see.
    with open(d1 / "m", "r+b") as f:
        with pytest.raises(OSError) as ei:
            mmap.mmap(f.fileno(), 0)
        assert ei.value.errno == errno.ENODEV
    # Pages of a read-only descriptor on n2 are dropped when n1 changes the file.
    with open(d2 / "m", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m[:4] == payload[:4]
        with open(d1 / "m", "r+b") as w:
            w.write(b"NEW!")
        wait_for(lambda: m[:4] == b"NEW!", 5, "the other node's write in the mapping")


# -- life cycle: unmount, SIGTERM, crash -----------------------------------------------------
def test_umount_fusermount_and_sigterm_stop_the_agent_cleanly(cluster: Cluster) -> None:
    node = cluster.start_node("n3")
    (node.mp / "kept").write_text("written by n3\n")
    sh(*SDB, "umount", node.mp)
    assert node.proc.wait(timeout=30) == 0 and not mounted(node.mp)
    cluster.nodes.pop("n3")
    assert (cluster.nodes["n1"].mp / "kept").read_text() == "written by n3\n"

    node = cluster.start_node("n3")
    assert (node.mp / "kept").read_text() == "written by n3\n"
    sh("fusermount3", "-u", node.mp)
    assert node.proc.wait(timeout=30) == 0 and not mounted(node.mp)
    cluster.nodes.pop("n3")

    # SIGTERM while a program holds a file open that another node unlinked: the agent
    # unmounts (lazily), closes the file at the coordinator, and the file is freed
    # (fsck at the end of the module finds no orphan).
    node = cluster.start_node("n3")
    (node.mp / "held").write_bytes(b"h" * 100_000)
    holder = subprocess.Popen(["sh", "-c", 'exec 3<"$1"; exec sleep 60', "sh",
                               str(node.mp / "held")])
    wait_for(lambda: any(os.readlink(f"/proc/{holder.pid}/fd/{fd}").endswith("held")
                         for fd in os.listdir(f"/proc/{holder.pid}/fd")), 10, "the holder")
    os.unlink(cluster.nodes["n1"].mp / "held")
    assert cluster.stop_node("n3") == 0
    holder.kill()
    holder.wait()
    assert not mounted(node.mp)
    assert log_problems(node.log) == []
    assert "closed 1 file(s) that were still open" in node.log.read_text()
    r = sh(*SDB, "umount", node.mp, check=False)
    assert r.returncode == 4 and "nothing is mounted" in r.stderr


def test_killed_agent_leaves_a_dead_mount_that_umount_clears(cluster: Cluster) -> None:
    node = cluster.start_node("n4")
    (node.mp / "closed-before-crash").write_bytes(b"z" * 300_000)
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait(timeout=30)
    cluster.nodes.pop("n4")
    with pytest.raises(OSError) as ei:
        os.stat(node.mp)
    assert ei.value.errno == errno.ENOTCONN
    assert mounted(node.mp)
    # A new agent refuses the dead mount point and says what to do.
    r = sh(*SDB, "node", cluster.cdir, "--name", "n5", "--mount", node.mp, check=False)
    assert r.returncode == 2 and "sdbackup umount" in r.stderr
    r = sh(*SDB, "umount", node.mp)
    assert "dead" in r.stdout
    assert not mounted(node.mp) and os.path.isdir(node.mp)
    # What the node wrote and closed was on the shared disks before the crash.
    # (The file is not unlinked: the kernel's RELEASE of it may have been lost with the
    # agent, and the coordinator then counts it open for good; see the report.)
    assert (cluster.nodes["n1"].mp / "closed-before-crash").read_bytes() == b"z" * 300_000
