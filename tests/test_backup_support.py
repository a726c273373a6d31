"""Helpers shared by the backup and restore tests (no tests here).

Small clusters with tiny blocks, a varied sample tree, the CLI run in-process with its
exit code and output, and tree comparison that checks what ``diff -r`` does not (modes,
times, symlink targets, hard links).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from sdbackup.backup.engine import BackupOptions, BackupResult, run_backup
from sdbackup.cli.main import main
from sdbackup.cluster.backup_source import LocalClusterSource
from sdbackup.cluster.local import DiskSpec, init_cluster, open_cluster
from sdbackup.fs import transfer
from sdbackup.media.medium import MANIFEST, META, FileEntry, Manifest, file_digest

SMALL = BackupOptions(compression="none", batch_bytes=16 << 10, record_bytes=4 << 10,
                      gap_bytes=2 << 10)
"""Tiny batches and records, so that small test disks give many of each."""


def make_cluster(base: Path, *, block_size: int = 512,
                 disks: tuple[int, ...] = (4 << 20, 2 << 20)) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    specs = [DiskSpec(f"d{i}", base / f"d{i}.img", size) for i, size in enumerate(disks)]
    init_cluster(base / "cluster", specs, block_size=block_size)
    return base / "cluster"


def make_tree(root: Path, seed: int = 1, files: int = 24) -> Path:
    """Text, binary, sparse and empty files, nested directories, odd modes, a symlink to
    a file, a dangling absolute symlink, a directory symlink, and a hard link."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    dirs = [root / "a", root / "a" / "b", root / "c", root / "empty-dir", root / "a" / "b" / "d"]
    for d in dirs:
        d.mkdir(exist_ok=True)
    for i in range(files):
        d = dirs[i % 4] if i % 4 != 3 else dirs[4]
        size = rng.choice([0, 1, 100, 511, 512, 513, 3000, 9000, 30000])
        data = bytes(rng.getrandbits(8) for _ in range(size)) if i % 3 else \
            (f"line {i}\n" * (size // 7 + 1)).encode()[:size]
        (d / f"f{i:02d}.bin").write_bytes(data)
    with open(root / "c" / "sparse", "wb") as f:
        f.seek(70_000)
        f.write(b"tail of a sparse file")
    os.chmod(root / "a" / "f00.bin", 0o640)
    os.chmod(root / "a" / "b", 0o750)
    os.symlink("b/f01.bin", root / "a" / "link-to-file")
    os.symlink("/nonexistent/absolute/target", root / "c" / "dangling")
    os.symlink("../a", root / "c" / "dir-link")
    os.link(root / "a" / "b" / "f01.bin", root / "c" / "hardlink")
    os.utime(root / "c", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    return root


def put_tree(cluster_dir: Path, tree: Path, dest: str = "/") -> None:
    with open_cluster(cluster_dir) as c:
        transfer.put(c.fs, tree, dest)


def backup(cluster_dir: Path, medium: Path, options: BackupOptions | None = None
           ) -> BackupResult:
    with open_cluster(cluster_dir) as c:
        return run_backup(LocalClusterSource(c), medium, options or SMALL)


@dataclass
class Run:
    code: int
    out: str
    err: str


def cli(*args: str | os.PathLike[str]) -> Run:
    """Run the ``sdbackup`` command in-process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([os.fspath(a) for a in args])
        except SystemExit as e:
            code = int(e.code or 0) if not isinstance(e.code, str) else 1
    return Run(code, out.getvalue(), err.getvalue())


def gen_dir(medium: Path, gen_id: str) -> Path:
    return medium / "generations" / gen_id


def reseal(medium: Path, gen_id: str, **changes: object) -> None:
    """Rewrite a generation's manifest with ``changes`` and a valid checksum; the
    snapshot's size and checksum are recomputed (tests forge medium contents)."""
    d = gen_dir(medium, gen_id)
    m = Manifest.from_json((d / MANIFEST).read_bytes(), "test")
    size, digest = file_digest(d / META)
    m = dataclasses.replace(m, meta=FileEntry(META, size, digest), **changes)  # type: ignore[arg-type]
    (d / MANIFEST).write_bytes(m.to_json())


def diff_trees(a: Path, b: Path, *, times: bool = True) -> list[str]:
    """Differences between two trees: contents (``diff -r``), types, modes, times,
    symlink targets and hard-link structure."""
    out: list[str] = []
    r = subprocess.run(["diff", "-r", "--no-dereference", str(a), str(b)],
                       capture_output=True, text=True)
    if r.returncode:
        out.append(r.stdout + r.stderr)
    links_a: dict[int, str] = {}
    links_b: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(a):
        for name in dirnames + filenames:
            pa = Path(dirpath) / name
            rel = pa.relative_to(a)
            pb = b / rel
            try:
                sa, sb = pa.lstat(), pb.lstat()
            except FileNotFoundError:
                out.append(f"{rel}: missing")
                continue
            if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
                out.append(f"{rel}: type {sa.st_mode:o} != {sb.st_mode:o}")
                continue
            if stat.S_ISLNK(sa.st_mode):
                if os.readlink(pa) != os.readlink(pb):
                    out.append(f"{rel}: symlink target differs")
            elif stat.S_IMODE(sa.st_mode) != stat.S_IMODE(sb.st_mode):
                out.append(f"{rel}: mode {sa.st_mode:o} != {sb.st_mode:o}")
            if times and not stat.S_ISLNK(sa.st_mode) and sa.st_mtime_ns != sb.st_mtime_ns:
                out.append(f"{rel}: mtime {sa.st_mtime_ns} != {sb.st_mtime_ns}")
            if stat.S_ISREG(sa.st_mode) and sa.st_nlink > 1:
                first_a = links_a.setdefault(sa.st_ino, str(rel))
                first_b = links_b.setdefault(sb.st_ino, str(rel))
                if first_a != first_b:
                    out.append(f"{rel}: hard link structure differs")
    return out


def require_fuse(what: str, *programs: str, root: bool = False, hint: str = "") -> None:
    """Fail (never skip) when this machine cannot run ``what``: FUSE (``/dev/fuse``,
    pyfuse3), the ``programs`` it runs, and root when it changes its uid."""
    problems = []
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing")
    try:
        import pyfuse3  # noqa: F401
    except ImportError as e:
        problems.append(f"pyfuse3 cannot be imported ({e})")
    problems += [f"{p} is not installed" for p in programs if shutil.which(p) is None]
    if root and os.geteuid() != 0:
        problems.append("these tests change their uid and need root")
    if problems:
        pytest.fail(f"{what} cannot run: " + "; ".join(problems) + hint, pytrace=False)
