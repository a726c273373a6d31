"""The ``sdbackup`` command, driven as a user drives it: one subprocess per command.

Covers issue 2: ``init`` (config, store, secret, sparse disks, existing disks, labels),
bad input (one-line error, its exit code, nothing changed), ``fs`` round trips of real
trees checked with the real ``diff -r``, ``info`` and ``blocks --used`` against the
metadata store, the cluster lock, help texts, ``demo`` and the exit codes of
``sdbackup.errors``. Tiny blocks (512 bytes) and small sparse disks keep it quick.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import random
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from sdbackup import errors
from sdbackup.blocks.durable import write_atomic
from sdbackup.blocks.label import LABEL_BLOCKS
from sdbackup.cli.main import cli
from sdbackup.cluster import local
from sdbackup.cluster.local import DiskSpec, init_cluster, open_cluster
from sdbackup.errors import FsError

SDBACKUP = Path(sys.executable).with_name("sdbackup")
BS = 512
ROOT = os.geteuid() == 0


# -- helpers -------------------------------------------------------------------------------

# Every call is its own process. Most are forked from one "zygote" that imported the CLI
# and the modules its commands use once: an interpreter start plus those imports cost
# ~0.3 s of CPU per call, and this file makes well over a hundred calls. The child runs
# the entry point (cli.main.main) with its own stdin/stdout/stderr and exit status, as
# the installed script does.
# ``real=True`` (and SDB_TEST_EXEC=1 for all calls) runs the installed script instead.
ZYGOTE = r"""
import importlib, json, os, sys, traceback
from sdbackup.cli.main import main
# The commands import what they run on when they run (issue 11): import it here, once.
for mod in ("backup.engine", "backup.overlay", "backup.verify", "cluster.access",
            "cluster.backup_source", "cluster.local", "cluster.node", "fs.transfer",
            "media.bilog", "media.generation", "meta.fsck", "restore.files",
            "restore.image"):
    importlib.import_module("sdbackup." + mod)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if req["cwd"]:
                os.chdir(req["cwd"])
            for fd, name, flags in ((0, os.devnull, os.O_RDONLY),
                                    (1, req["out"], os.O_WRONLY | os.O_TRUNC),
                                    (2, req["err"], os.O_WRONLY | os.O_TRUNC)):
                os.dup2(os.open(name, flags), fd)
            sys.argv = ["sdbackup", *req["args"]]
            try:
                main(req["args"])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (e.code is not None)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""
_zygote: subprocess.Popen[str] | None = None


@pytest.fixture(scope="module", autouse=True)
def _zygote_process() -> Iterator[None]:
    global _zygote
    env = {**os.environ, "COLUMNS": "200", "OPENBLAS_NUM_THREADS": "1"}
    _zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=env)
    yield
    assert _zygote.stdin is not None
    _zygote.stdin.close()
    _zygote.wait(timeout=10)
    _zygote = None


def run(*args: object, check: bool = True, text: bool = True, cwd: Path | None = None,
        real: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    """Run ``sdbackup ARGS``; with ``check`` it must succeed. Never a traceback."""
    argv = [str(a) for a in args]
    if real or _zygote is None or os.environ.get("SDB_TEST_EXEC") == "1":
        env = {**os.environ, "COLUMNS": "200"}
        proc = subprocess.run([str(SDBACKUP), *argv], capture_output=True, text=text,
                              cwd=cwd, env=env, timeout=timeout)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp, "out"), Path(tmp, "err")
            out.touch()
            err.touch()
            assert _zygote.stdin is not None and _zygote.stdout is not None
            _zygote.stdin.write(json.dumps({"args": argv, "cwd": str(cwd or ""),
                                            "out": str(out), "err": str(err)}) + "\n")
            _zygote.stdin.flush()
            code = int(_zygote.stdout.readline())
            proc = subprocess.CompletedProcess(
                ["sdbackup", *argv], code,
                out.read_text() if text else out.read_bytes(),
                err.read_text() if text else err.read_bytes())
    err_text = proc.stderr if text else proc.stderr.decode(errors="replace")
    assert "Traceback" not in err_text, err_text
    if check:
        assert proc.returncode == 0, f"sdbackup {args} exited {proc.returncode}: {err_text}"
    return proc


def fails(code: int, *args: object, cwd: Path | None = None) -> str:
    """Run a command that must fail with ``code`` and a one-line error; return the line."""
    proc = run(*args, check=False, cwd=cwd)
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sdbackup: error: "), lines[0]
    return str(lines[0])


def init(base: Path, *disks: str, bs: int = BS, name: str = "cluster") -> Path:
    """A cluster for tests that are not about init (in-process: the CLI costs an
    interpreter start per call); disks are NAME=FILE:SIZE, FILE relative to ``base``."""
    specs = []
    for d in disks:
        n, _, rest = d.partition("=")
        specs.append(DiskSpec.parse(f"{n}={base / rest}"))
    init_cluster(base / name, specs, block_size=bs)
    return base / name


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(cdir: Path) -> dict[str, object]:
    """Everything a command could change: every row of meta.db, the config, the disks."""
    con = sqlite3.connect(cdir / "meta.db")
    try:
        tables = [r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        state: dict[str, object] = {t: sorted(con.execute(f"SELECT * FROM {t}").fetchall())
                                    for t in tables}
    finally:
        con.close()
    cfg = tomllib.loads((cdir / "cluster.toml").read_text())
    state["cluster.toml"] = (cdir / "cluster.toml").read_text()
    state["secret"] = (cdir / "secret").read_text()
    for d in cfg["disk"]:
        state[d["path"]] = sha(Path(d["path"]))
    return state


def db_rows(cdir: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple]:  # type: ignore[type-arg]
    con = sqlite3.connect(cdir / "meta.db")
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def expected_used(cdir: Path) -> set[tuple[str, int]]:
    """Used blocks computed from the store: every extent's blocks plus each disk's label."""
    names = dict(db_rows(cdir, "SELECT id, name FROM disks"))
    out = {(n, b) for n in names.values() for b in range(LABEL_BLOCKS)}
    for count, disk, dblock in db_rows(cdir, "SELECT count, disk, dblock FROM extents"):
        out.update((names[disk], b) for b in range(dblock, dblock + count))
    return out


def runs_to_blocks(lines: str) -> set[tuple[str, int]]:
    out: set[tuple[str, int]] = set()
    for line in lines.splitlines():
        name, start, count = line.split()
        out.update((name, b) for b in range(int(start), int(start) + int(count)))
    return out


def make_tree(root: Path) -> None:
    """A tree with everything a copy can get wrong."""
    rng = random.Random(2)
    for d in ("sub/deeper/deepest", "with space", "ünïcødé dir", "empty dir", "ro dir",
              "sticky", "-dash"):
        (root / d).mkdir(parents=True)
    for n in (1, 511, 512, 513, 1023, 1024, 1025, 2047, 4097, 70_000, (4 << 20) + 1):
        (root / "sub" / f"f{n}").write_bytes(rng.randbytes(n))
    (root / "sub/deeper/deepest/zeros-2k").write_bytes(bytes(2048))
    (root / "empty").write_bytes(b"")
    (root / "ünïcødé dir" / "ƒilé 名前.txt").write_text("unicode ✓\n")
    (root / "with space" / "a file with  spaces ").write_text("spaces\n")
    (root / ("n" * 255)).write_text("a name of 255 bytes\n")
    (root / "new\nline").write_text("a newline in the name\n")
    with open(root / "sparse.img", "wb") as f:  # holes of whole 4 MiB copy chunks
        f.seek(8 << 20)
        f.write(b"tail of a sparse file\n")
    os.symlink("sub/f1", root / "link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.symlink("sub/deeper", root / "dirlink")
    os.symlink("../sub/f512", root / "with space" / "up-link")
    os.link(root / "sub/f512", root / "hard")
    os.link(root / "sub/f512", root / "with space" / "hard2")
    os.link(root / "sub/f1023", root / "sub/f1023-twin")
    os.chmod(root / "sub/f1", 0o000 if ROOT else 0o400)
    os.chmod(root / "sub/f511", 0o777)
    os.chmod(root / "sub/f513", 0o640)
    os.chmod(root / "empty", 0o444)
    os.chmod(root / "sticky", 0o1777)
    os.chmod(root / "-dash", 0o700)
    os.chmod(root / "ro dir", 0o555)
    os.utime(root / "sub/f1025", ns=(1_000_000_000, 981_173_106_123_456_789))
    os.utime(root / "sub/deeper", ns=(1_000_000_000, 1_234_567_890_987_654_321))


def walk(root: Path) -> dict[str, os.stat_result]:
    out = {".": root.lstat()}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = p.lstat()
    return out


def assert_same_tree(a: Path, b: Path, *, symlink_mtimes: bool = False) -> None:
    """Contents (real diff -r), types, modes, mtimes, symlink targets, hard links."""
    proc = subprocess.run(["diff", "-r", "--no-dereference", str(a), str(b)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sa, sb = walk(a), walk(b)
    assert sorted(sa) == sorted(sb)
    for rel, x in sa.items():
        y = sb[rel]
        assert stat.S_IFMT(x.st_mode) == stat.S_IFMT(y.st_mode), rel
        if stat.S_ISLNK(x.st_mode):
            assert os.readlink(a / rel) == os.readlink(b / rel), rel
            if symlink_mtimes:
                assert x.st_mtime_ns == y.st_mtime_ns, rel
            continue
        assert stat.S_IMODE(x.st_mode) == stat.S_IMODE(y.st_mode), (rel, oct(x.st_mode),
                                                                    oct(y.st_mode))
        assert x.st_mtime_ns == y.st_mtime_ns, rel
        if stat.S_ISREG(x.st_mode):
            assert x.st_size == y.st_size, rel
            assert x.st_nlink == y.st_nlink, rel
    # Hard links: the same groups of names share an inode on both sides.
    def groups(s: dict[str, os.stat_result]) -> set[frozenset[str]]:
        by: dict[int, set[str]] = {}
        for rel, st in s.items():
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                by.setdefault(st.st_ino, set()).add(rel)
        return {frozenset(v) for v in by.values()}
    assert groups(sa) == groups(sb)


@pytest.fixture
def cdir(tmp_path: Path) -> Path:
    """A cluster of two small disks of 512-byte blocks."""
    return init(tmp_path, "d0=d0.img:8MiB", "d1=d1.img:8MiB")


# -- help, version, demo ---------------------------------------------------------------------

def test_help_of_every_command() -> None:
    out = run("--help", real=True).stdout  # the installed script itself
    for cmd in ("init", "info", "blocks", "fsck", "fs", "demo"):
        assert cmd in out
    assert "--wait" in run("fs", "DIR", "ls", "--help").stdout
    assert "0.1" in run("--version").stdout
    proc = run("no-such-command", check=False, real=True)  # a usage error, click's own message
    assert proc.returncode == errors.EXIT_USAGE and "No such command" in proc.stderr
    # Every command's help, in-process (the same click objects, without 15 interpreters).
    runner = CliRunner()
    for cmd in ("init", "info", "blocks", "fsck", "fs", "demo"):
        res = runner.invoke(cli, [cmd, "--help"], prog_name="sdbackup")
        assert res.exit_code == 0 and f"Usage: sdbackup {cmd}" in res.output, res.output
    for sub in ("put", "get", "ls", "cat", "mkdir", "rm", "mv", "stat"):
        res = runner.invoke(cli, ["fs", "DIR", sub, "--help"], prog_name="sdbackup")
        assert res.exit_code == 0, res.output
        assert f"Usage: sdbackup fs CLUSTER_DIR {sub}" in res.output and "--wait" in res.output


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run([str(SDBACKUP), "demo"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "demo finished" in proc.stdout and "identical" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # its temporary cluster is gone


# -- init ------------------------------------------------------------------------------------

def test_init_creates_config_store_secret_and_sparse_disks(tmp_path: Path) -> None:
    proc = run("init", "cluster", "--disk", "d0=d0.img:4MiB", "--disk", "big=sub.img:16MiB",
               "--block-size", 1024, cwd=tmp_path, real=True)
    cdir = tmp_path / "cluster"
    assert "created cluster" in proc.stdout
    cfg = tomllib.loads((cdir / "cluster.toml").read_text())
    assert cfg["block_size"] == 1024
    assert [(d["name"], d["id"], d["path"]) for d in cfg["disk"]] == [
        ("d0", 1, str(tmp_path / "d0.img")), ("big", 2, str(tmp_path / "sub.img"))]
    assert db_rows(cdir, "SELECT value FROM meta WHERE key='cluster_id'") == [
        (cfg["cluster_id"],)]
    assert db_rows(cdir, "SELECT id, name, nblocks, reserved FROM disks ORDER BY id") == [
        (1, "d0", 4096, 1), (2, "big", 16384, 1)]
    secret = cdir / "secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert len(bytes.fromhex(secret.read_text().strip())) == 32
    for name, size in (("d0.img", 4 << 20), ("sub.img", 16 << 20)):
        st = (tmp_path / name).stat()
        assert st.st_size == size
        assert st.st_blocks * 512 <= 64 * 1024  # sparse: little more than the label
        assert (tmp_path / name).read_bytes()[:8] == b"SDBDISK1"
    info = json.loads(run("info", cdir, "--json").stdout)
    assert info["block_size"] == 1024 and info["cluster_id"] == cfg["cluster_id"]
    assert [(d["name"], d["blocks"], d["used"], d["free"]) for d in info["disks"]] == [
        ("d0", 4096, 1, 4095), ("big", 16384, 1, 16383)]
    assert (info["files"], info["directories"], info["symlinks"]) == (0, 1, 0)
    run("fsck", cdir)
    # A second init in the same directory is refused and changes nothing.
    before = snapshot(cdir)
    assert "already an sdbackup cluster" in fails(
        2, "init", cdir, "--disk", f"x={tmp_path / 'x.img'}:1MiB")
    assert snapshot(cdir) == before and not (tmp_path / "x.img").exists()


def test_init_in_an_existing_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    run("init", tmp_path / "c", "--disk", f"d0={tmp_path / 'd.img'}:1MiB", "--block-size", BS)
    run("fsck", tmp_path / "c")


def test_init_uses_an_existing_empty_file_as_is(tmp_path: Path) -> None:
    disk = tmp_path / "zeros.img"
    disk.write_bytes(bytes(96 * 1024))  # really allocated zeros, no label
    run("init", tmp_path / "c", "--disk", f"d0={disk}", "--block-size", BS)
    assert disk.stat().st_size == 96 * 1024
    info = json.loads(run("info", tmp_path / "c", "--json").stdout)
    assert info["disks"][0]["blocks"] == 96 * 1024 // BS


def test_init_grows_an_existing_file_to_the_given_size(tmp_path: Path) -> None:
    disk = tmp_path / "small.img"
    disk.write_bytes(bytes(64 * 1024))
    run("init", tmp_path / "c", "--disk", f"d0={disk}:1MiB", "--block-size", BS)
    assert disk.stat().st_size == 1 << 20


def test_init_refuses_a_file_holding_data_unless_forced(tmp_path: Path) -> None:
    disk = tmp_path / "data.img"
    disk.write_bytes(bytes(32 * 1024) + b"precious" + bytes(32 * 1024))
    before = sha(disk)
    msg = fails(2, "init", tmp_path / "c", "--disk", f"d0={disk}", "--block-size", BS)
    assert "holds data" in msg and "--force" in msg
    assert sha(disk) == before and not (tmp_path / "c").exists()
    run("init", tmp_path / "c", "--disk", f"d0={disk}", "--block-size", BS, "--force")
    assert disk.read_bytes()[:8] == b"SDBDISK1"
    run("fsck", tmp_path / "c")


def test_init_refuses_a_disk_of_another_cluster(tmp_path: Path) -> None:
    first = init(tmp_path, "d0=shared.img:1MiB", name="first")
    disk = tmp_path / "shared.img"
    before = sha(disk)
    msg = fails(2, "init", tmp_path / "second", "--disk", f"d0={disk}", "--block-size", BS)
    first_id = tomllib.loads((first / "cluster.toml").read_text())["cluster_id"]
    assert "belongs to sdbackup cluster" in msg and first_id in msg
    assert sha(disk) == before and not (tmp_path / "second").exists()
    # --force takes the disk over; the first cluster then refuses to use it.
    run("init", tmp_path / "second", "--disk", f"d0={disk}", "--block-size", BS, "--force")
    assert "belongs to another cluster" in fails(2, "info", first)
    run("info", tmp_path / "second")


@pytest.mark.parametrize(("disk_args", "extra", "message"), [
    (["d0=@/d.img:1MiB"], ["--block-size", "1000"], "not a power of two"),
    (["d0=@/d.img:1MiB"], ["--block-size", "256"], "not a power of two"),
    (["d0=@/d.img:4MiB"], ["--block-size", str(2 << 20)], "not a power of two"),
    (["d0=@/d.img:12XB"], [], "cannot parse size"),
    (["d0=@/d.img:lots"], [], "does not exist"),  # ':lots' is taken as part of the path
    (["d0=@/d.img:100PiB"], [], "cannot create disk"),  # EFBIG from the host fs
    (["d0=@/d.img:99999999PiB"], [], "too large"),
    (["d0=@/d.img:2KiB"], [], "too small"),
    (["d0=@/d.img"], [], "give its size"),
    (["d0"], [], "bad --disk"),
    (["bad name=@/d.img:1MiB"], [], "invalid disk name"),
    (["d0=@/d.img:1MiB", "d0=@/e.img:1MiB"], [], "must be unique"),
    (["d0=@/d.img:1MiB", "d1=@/d.img:1MiB"], [], "same path"),
    (["d0=@/no/such/dir/d.img:1MiB"], [], "does not exist"),
    (["d0=@:1MiB"], [], "is a directory"),
    (["d0=@/d.img:1MiB", "d1=@/e.img:100PiB"], [], "cannot create disk"),
])
def test_init_bad_input_changes_nothing(tmp_path: Path, disk_args: list[str],
                                        extra: list[str], message: str) -> None:
    base = tmp_path / "base"
    base.mkdir()
    args = [a for d in disk_args for a in ("--disk", d.replace("@", str(base)))]
    msg = fails(errors.EXIT_USAGE, "init", tmp_path / "cluster", *args, *extra)
    assert message in msg
    assert sorted(tmp_path.iterdir()) == [base] and list(base.iterdir()) == []


def test_init_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    assert "not an empty directory" in fails(
        2, "init", tmp_path / "c", "--disk", f"d0={tmp_path / 'd.img'}:1MiB")
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["keep.txt"]
    assert not (tmp_path / "d.img").exists()


def test_failed_init_puts_existing_disks_back(tmp_path: Path) -> None:
    """An existing disk grown (or labelled) before a later step fails is restored."""
    disk = tmp_path / "old.img"
    disk.write_bytes(bytes(64 * 1024))
    before = sha(disk)
    fails(2, "init", tmp_path / "c", "--disk", f"d0={disk}:1MiB",
          "--disk", f"d1={tmp_path / 'new.img'}:100PiB", "--block-size", BS)
    assert sha(disk) == before and disk.stat().st_size == 64 * 1024
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.img"]


def test_failed_init_restores_the_first_block_of_a_forced_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process: make the very last step (writing cluster.toml) fail after the label."""
    disk = tmp_path / "data.img"
    disk.write_bytes(random.Random(1).randbytes(64 * 1024))
    before = sha(disk)
    real = write_atomic

    def failing(path: Path, data: bytes, mode: int = 0o644) -> None:
        if path.name == "cluster.toml":
            raise OSError(errno.EIO, "simulated failure")
        real(path, data, mode)

    monkeypatch.setattr(local, "write_atomic", failing)
    with pytest.raises(OSError, match="simulated"):
        init_cluster(tmp_path / "c", [DiskSpec("d0", disk, None)], block_size=BS, force=True)
    assert sha(disk) == before
    assert not (tmp_path / "c").exists()


# -- clusters that are missing, malformed, or mixed up -------------------------------------------

@pytest.mark.parametrize("cmd", [("info",), ("fsck",), ("fs", "put", "x", "/")])
def test_not_an_initialised_cluster(tmp_path: Path, cmd: tuple[str, ...]) -> None:
    def args(d: Path) -> list[object]:
        return [cmd[0], d, *cmd[1:]] if cmd[0] != "fs" else ["fs", d, *cmd[1:]]
    (tmp_path / "x").write_text("a local file")
    assert "does not exist" in fails(errors.EXIT_NOT_FOUND, *args(tmp_path / "nope"),
                                     cwd=tmp_path)
    assert not (tmp_path / "nope").exists()
    (tmp_path / "empty").mkdir()
    assert "not an sdbackup cluster" in fails(errors.EXIT_NOT_FOUND, *args(tmp_path / "empty"),
                                              cwd=tmp_path)
    assert list((tmp_path / "empty").iterdir()) == []  # not even a lock file


def _swap_paths(text: str) -> str:
    return text.replace("d0.img", "TMP").replace("d1.img", "d0.img").replace("TMP", "d1.img")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cluster for tests that restore whatever they change (a file /t.py in it)."""
    base = tmp_path_factory.mktemp("shared")
    cdir = init(base, "d0=d0.img:1MiB", "d1=d1.img:1MiB")
    run("fs", cdir, "put", Path(__file__), "/t.py")
    return cdir


# Each edit is tried on one command; they share load_config / check_store / open_disks.
@pytest.mark.parametrize(("edit", "cmd", "message"), [
    (lambda t: "cluster_id = [[[\n", "info", "malformed"),
    (lambda t: t.replace("block_size", "blocksize"), "fsck", "malformed"),
    (lambda t: t.replace("block_size = 512", "block_size = 1000"), "cat", "not a power of two"),
    (lambda t: t.replace("block_size = 512", "block_size = 1024"), "cat", "cannot change"),
    (lambda t: t.replace("block_size = 512", "block_size = 1024"), "fsck", "cannot change"),
    (lambda t: t.replace("id = 2", "id = 7"), "info", "only disk paths may be edited"),
    (lambda t: t.replace("id = 2", "id = 1"), "fsck", "only disk paths may be edited"),
    (lambda t: t.replace('name = "d1"', 'name = "d0"'), "blocks",
     "only disk paths may be edited"),
    (lambda t: t[: t.rindex("[[disk]]")], "cat", "only disk paths may be edited"),
    (_swap_paths, "cat", "mixed up"),
    (_swap_paths, "fsck", "mixed up"),
], ids=["garbage", "no-block-size", "block-size-1000", "block-size-changed",
        "block-size-changed-fsck", "unknown-disk-id", "duplicate-id", "duplicate-name",
        "disk-dropped", "paths-swapped", "paths-swapped-fsck"])
def test_malformed_cluster_toml(shared: Path, edit: object, cmd: str, message: str) -> None:
    args = {"info": ("info", shared), "fsck": ("fsck", shared),
            "blocks": ("blocks", shared, "--used"), "cat": ("fs", shared, "cat", "/t.py")}[cmd]
    toml = shared / "cluster.toml"
    good = toml.read_text()
    before = snapshot(shared)
    try:
        toml.write_text(edit(good))  # type: ignore[operator]
        assert message in fails(errors.EXIT_USAGE, *args)
    finally:
        toml.write_text(good)
    assert snapshot(shared) == before


def test_non_utf8_cluster_toml(shared: Path) -> None:
    toml = shared / "cluster.toml"
    good = toml.read_bytes()
    try:
        toml.write_bytes(b"\xff\xfe garbage")
        assert "malformed" in fails(errors.EXIT_USAGE, "info", shared)
    finally:
        toml.write_bytes(good)
    assert run("fs", shared, "cat", "/t.py").stdout == Path(__file__).read_text()


def test_moved_disk_path_may_be_edited(cdir: Path, tmp_path: Path) -> None:
    run("fs", cdir, "put", Path(__file__), "/t.py")
    (tmp_path / "moved").mkdir()
    shutil.move(tmp_path / "d1.img", tmp_path / "moved" / "d1.img")
    assert "does not exist" in fails(errors.EXIT_USAGE, "info", cdir)
    toml = cdir / "cluster.toml"
    toml.write_text(toml.read_text().replace(str(tmp_path / "d1.img"),
                                             str(tmp_path / "moved" / "d1.img")))
    assert run("fs", cdir, "cat", "/t.py").stdout == Path(__file__).read_text()
    run("fsck", cdir)


# -- fs commands -----------------------------------------------------------------------------------

def test_fs_commands(cdir: Path, tmp_path: Path) -> None:
    data = random.Random(3).randbytes(3 * BS + 17)
    (tmp_path / "blob").write_bytes(data)
    run("fs", cdir, "mkdir", "/a")
    run("fs", cdir, "mkdir", "-p", "/a/b/c")
    run("fs", cdir, "mkdir", "-p", "/a/b/c")  # -p: no error when it exists
    run("fs", cdir, "mkdir", "-m", "700", "/private")
    run("fs", cdir, "put", tmp_path / "blob", "/a/blob")
    run("fs", cdir, "put", tmp_path / "blob", "/a/b")  # into an existing directory
    assert run("fs", cdir, "ls").stdout.split() == ["a/", "private/"]
    assert run("fs", cdir, "ls", "/a").stdout.split() == ["b/", "blob"]
    long = run("fs", cdir, "ls", "-l", "/").stdout.splitlines()
    assert long[1].startswith("drwx------") and long[1].endswith(" private")
    assert run("fs", cdir, "cat", "/a/b/blob", text=False).stdout == data
    st = dict(line.split(None, 1) for line in
              run("fs", cdir, "stat", "/a/blob").stdout.splitlines())
    assert st["size"] == str(len(data)) and st["nlink"] == "1"
    assert st["mode"].startswith("100") and "-rw" in st["mode"]
    assert st["blocks"] == str(4 * BS // 512)
    # mv: rename, move into a directory, replace a file.
    run("fs", cdir, "mv", "/a/blob", "/a/renamed")
    run("fs", cdir, "mv", "/a/renamed", "/private")
    run("fs", cdir, "mv", "/a/b/blob", "/private/renamed")
    assert run("fs", cdir, "ls", "/private").stdout.split() == ["renamed"]
    run("fs", cdir, "get", "/private/renamed", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data
    # rm: files, -r for directories, -f for missing paths.
    run("fs", cdir, "rm", "-f", "/nope", "/private/renamed")
    run("fs", cdir, "rm", "-r", "/a")
    assert run("fs", cdir, "ls").stdout.split() == ["private/"]
    run("fsck", cdir)
    assert expected_used(cdir) == {("d0", 0), ("d1", 0)}  # every file block was freed
    assert db_rows(cdir, "SELECT COUNT(*) FROM inodes") == [(2,)]


def test_fs_errors_change_nothing(cdir: Path, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    run("fs", cdir, "mkdir", "-p", "/d/sub")
    run("fs", cdir, "put", tmp_path / "f", "/d/f")
    before = snapshot(cdir)
    long_name = "n" * 256
    nf, usage = errors.EXIT_NOT_FOUND, errors.EXIT_USAGE
    cases: list[tuple[int, tuple[object, ...], str]] = [
        (usage, ("mkdir", "/d"), "exists"),
        (usage, ("mkdir", f"/{long_name}"), "too long"),
        (usage, ("put", tmp_path / "f", f"/d/{long_name}"), "too long"),
        (usage, ("mv", "/d/f", f"/{long_name}"), "too long"),
        (nf, ("mkdir", "/no/such/dir"), "not found"),
        (nf, ("cat", "/nope"), "not found"),
        (nf, ("get", "/nope", tmp_path / "out"), "not found"),
        (usage, ("put", tmp_path / "missing", "/"), "does not exist"),
        (usage, ("put", tmp_path / "f", tmp_path / "f", "/d/f"), "not a directory"),
        (usage, ("get", "/d/f", tmp_path / "no" / "dir"), "does not exist"),
        (usage, ("cat", "/d"), "is a directory"),
        (usage, ("rm", "/d"), "is a directory"),
        (usage, ("mv", "/d", "/d/sub/x"), "into itself"),
    ]
    for code, args, message in cases:
        assert message in fails(code, "fs", cdir, *args), args
    assert snapshot(cdir) == before
    assert not (tmp_path / "out").exists()


def test_names_with_slash_or_nul_are_refused(cdir: Path) -> None:
    """NUL cannot reach the file system through argv and '/' always splits a CLI path,
    so these go through the same FileSystem the commands use, in-process."""
    before = snapshot(cdir)
    with open_cluster(cdir) as c:
        f = c.fs.create(1, b"file")
        c.fs.mkdir(1, b"dir")
        ops: list[Callable[[bytes], object]] = [
            lambda n: c.fs.mkdir(1, n), lambda n: c.fs.create(1, n),
            lambda n: c.fs.symlink(1, n, b"target"), lambda n: c.fs.link(f.ino, 1, n),
            lambda n: c.fs.rename(1, b"file", 1, n)]
        for bad in (b"a/b", b"a\0b", b"/", b"\0", b"", b".", b".."):
            for op in ops:
                with pytest.raises(FsError) as ei:
                    op(bad)
                assert ei.value.errno == errno.EINVAL, (bad, op)
        with pytest.raises(FsError) as ei:
            c.fs.mkdir(1, b"x" * 256)
        assert ei.value.errno == errno.ENAMETOOLONG
        c.fs.mkdir(1, b"x" * 255)
        c.fs.unlink(1, b"file")
        c.fs.rmdir(1, b"dir")
        c.fs.rmdir(1, b"x" * 255)
    after = snapshot(cdir)
    assert after["dirents"] == before["dirents"] and after["extents"] == before["extents"]
    run("fsck", cdir)


def test_round_trip_of_a_real_tree(cdir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    run("fs", cdir, "mkdir", "/backup")
    run("fs", cdir, "put", src, "/backup", real=True)
    run("fsck", cdir)
    # The sparse file stays sparse in the cluster (holes are not allocated).
    st = dict(line.split(None, 1) for line in
              run("fs", cdir, "stat", "/backup/src/sparse.img").stdout.splitlines())
    assert st["size"] == str((8 << 20) + 22) and st["blocks"] == str(BS // 512)
    st = dict(line.split(None, 1) for line in
              run("fs", cdir, "stat", "/backup/src/link").stdout.splitlines())
    assert st["target"] == "sub/f1" and st["mode"].startswith("120")
    out = tmp_path / "out"
    out.mkdir()
    run("fs", cdir, "get", "/backup/src", out, real=True)
    assert_same_tree(src, out / "src")
    # Counts agree with the tree.
    tree = walk(src)
    regular = {s.st_ino for s in tree.values() if stat.S_ISREG(s.st_mode)}
    info = json.loads(run("info", cdir, "--json").stdout)
    assert info["files"] == len(regular)
    assert info["directories"] == 2 + sum(stat.S_ISDIR(s.st_mode) for s in tree.values())
    assert info["symlinks"] == sum(stat.S_ISLNK(s.st_mode) for s in tree.values())
    # A second put over the same tree replaces it in place; a get into a fresh dir agrees.
    run("fs", cdir, "put", src, "/backup")
    run("fsck", cdir)
    out2 = tmp_path / "out2"
    run("fs", cdir, "get", "/backup/src", out2)  # DEST does not exist: copied as DEST
    assert_same_tree(src, out2)


def test_round_trip_of_an_installed_package(tmp_path: Path) -> None:
    cdir = init(tmp_path, "d0=d0.img:16MiB", bs=1024)
    src = tmp_path / "click"
    shutil.copytree(Path(click.__file__).parent, src, symlinks=True)
    run("fs", cdir, "put", src, "/")
    run("fs", cdir, "get", "/click", tmp_path / "back")
    assert_same_tree(src, tmp_path / "back")
    assert run("fs", cdir, "cat", "/click/__init__.py").stdout == \
        (src / "__init__.py").read_text()
    run("fsck", cdir)


def test_round_trip_keeps_symlink_mtimes(cdir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.symlink("nowhere", src / "link")
    os.utime(src / "link", ns=(1_000_000_000, 1_000_000_000), follow_symlinks=False)
    run("fs", cdir, "put", src, "/")
    run("fs", cdir, "get", "/src", tmp_path / "out")
    assert_same_tree(src, tmp_path / "out", symlink_mtimes=True)


def test_round_trip_keeps_setuid_bit(cdir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "tool").write_text("#!/bin/sh\n")
    os.chmod(src / "tool", 0o4755)
    run("fs", cdir, "put", src, "/")
    assert "rws" in run("fs", cdir, "stat", "/src/tool").stdout  # stored right
    run("fs", cdir, "get", "/src", tmp_path / "out")
    assert_same_tree(src, tmp_path / "out")


# -- info and blocks ----------------------------------------------------------------------

def test_info_and_used_blocks_match_the_store(cdir: Path, tmp_path: Path) -> None:
    rng = random.Random(5)
    src = tmp_path / "src"
    src.mkdir()
    for i, n in enumerate((BS, 3 * BS + 1, 40 * BS, 7, 100 * BS - 1, 0)):
        (src / f"f{i}").write_bytes(rng.randbytes(n))
    with open(src / "holes", "wb") as f:  # a hole of two whole copy chunks, then data
        f.seek(8 << 20)
        f.write(rng.randbytes(BS))
    os.symlink("f0", src / "link")
    run("fs", cdir, "put", src, "/")
    run("fs", cdir, "rm", "/src/f1", "/src/f4")  # freed blocks leave gaps
    expected = expected_used(cdir)
    disks = {n for n, _ in expected}
    assert disks == {"d0", "d1"}
    assert len(expected) > 2 + 40  # both labels and the files' blocks

    used = run("blocks", cdir, "--used").stdout
    assert runs_to_blocks(used) == expected
    starts = [tuple(map(int, line.split()[1:])) for line in used.splitlines()]
    for (s1, n1), (s2, _) in itertools.pairwise(starts):  # runs are maximal
        assert s2 > s1 + n1 or s2 < s1
    as_json = json.loads(run("blocks", cdir, "--used", "--json").stdout)
    assert {(n, b) for n, runs in as_json.items() for s, c in runs
            for b in range(s, s + c)} == expected
    only = run("blocks", cdir, "--used", "--disk", "d1").stdout
    assert runs_to_blocks(only) == {x for x in expected if x[0] == "d1"}

    # fs stat --extents names each file's blocks as the store has them.
    names = dict(db_rows(cdir, "SELECT id, name FROM disks"))
    for name in ("f2", "holes"):
        out = run("fs", cdir, "stat", "--extents", f"/src/{name}").stdout
        shown = [ln.split()[2:] for ln in out.splitlines() if ln.startswith("extent")]
        (ino,), = db_rows(cdir, "SELECT ino FROM dirents WHERE name=?", (name.encode(),))
        stored = db_rows(cdir, "SELECT fblock, count, disk, dblock FROM extents WHERE ino=? "
                         "ORDER BY fblock", (ino,))
        assert shown == [[f"{f}+{c}", "->", f"{names[d]}:{b}"] for f, c, d, b in stored]
        if name == "holes":  # a hole of two copy chunks, then one block
            assert [x[0] for x in shown] == [f"{(8 << 20) // BS}+1"]

    info = json.loads(run("info", cdir, "--json").stdout)
    for d in info["disks"]:
        assert d["used"] == sum(1 for n, _ in expected if n == d["name"])
        assert d["used"] + d["free"] == d["blocks"] == (8 << 20) // BS
    assert (info["files"], info["directories"], info["symlinks"]) == (5, 2, 1)
    text = run("info", cdir).stdout
    assert "block size  512" in text
    assert "files       5   directories 2   symlinks 1" in text
    for d in info["disks"]:
        assert any(line.split()[:4] == [d["name"], str(d["blocks"]), str(d["used"]),
                                        str(d["free"])] for line in text.splitlines())
    assert "unknown disk 'nope'" in fails(errors.EXIT_USAGE, "blocks", cdir, "--used",
                                          "--disk", "nope")


# -- the cluster lock -----------------------------------------------------------------------------

HOLDER = """
import sys
from sdbackup.cluster.local import open_cluster
with open_cluster(sys.argv[1]):
    print("open", flush=True)
    sys.stdin.read()  # hold the cluster until the test closes our stdin
"""


def test_a_busy_cluster_waits_then_fails_or_succeeds(cdir: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(cdir)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        t0 = time.monotonic()
        msg = fails(errors.EXIT_BUSY, "fs", cdir, "ls", "--wait", "0.5")
        assert time.monotonic() - t0 >= 0.5
        assert "in use by another sdbackup process" in msg and f"pid {holder.pid}" in msg
        fails(errors.EXIT_BUSY, "fs", "--wait", "0.2", cdir, "ls")  # the group's option
        fails(errors.EXIT_BUSY, "fs", cdir, "mkdir", "/x", "--wait", "0")
        waiter = subprocess.Popen([str(SDBACKUP), "fs", str(cdir), "ls", "--wait", "30"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.7)
        assert waiter.poll() is None  # still waiting for the lock
        assert holder.stdin is not None
        holder.stdin.close()
        assert holder.wait(timeout=10) == 0
        _, err = waiter.communicate(timeout=30)
        assert waiter.returncode == 0, err
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    run("fs", cdir, "mkdir", "/x", "--wait", "0")  # the lock is free again


# -- exit codes ------------------------------------------------------------------------------------

def test_exit_codes_are_those_of_errors_py() -> None:
    assert (errors.EXIT_OK, errors.EXIT_CHECK_FAILED, errors.EXIT_USAGE, errors.EXIT_BUSY,
            errors.EXIT_NOT_FOUND, errors.EXIT_CORRUPT, errors.EXIT_NO_SPACE,
            errors.EXIT_REMOTE) == (0, 1, 2, 3, 4, 5, 6, 7)


def test_full_cluster_exits_no_space_and_stays_consistent(tmp_path: Path) -> None:
    cdir = init(tmp_path, "d0=d0.img:64KiB")
    (tmp_path / "small").write_bytes(b"s" * 1000)
    (tmp_path / "big").write_bytes(random.Random(4).randbytes(100_000))
    run("fs", cdir, "put", tmp_path / "small", "/small")
    assert "no space left" in fails(errors.EXIT_NO_SPACE, "fs", cdir, "put",
                                    tmp_path / "big", "/big")
    run("fsck", cdir)
    assert runs_to_blocks(run("blocks", cdir, "--used").stdout) == expected_used(cdir)
    assert run("fs", cdir, "cat", "/small").stdout == "s" * 1000


def test_damaged_or_truncated_disk_is_corrupt(cdir: Path, tmp_path: Path) -> None:
    disk = tmp_path / "d0.img"
    with open(disk, "r+b") as f:
        f.seek(12)  # the label's JSON body
        f.write(b"X")
    assert "damaged sdbackup label" in fails(errors.EXIT_CORRUPT, "info", cdir)
    assert "damaged sdbackup label" in fails(errors.EXIT_CORRUPT, "fsck", cdir)
    with open(disk, "r+b") as f:
        f.seek(12)
        f.write(b"{")
    run("info", cdir)
    os.truncate(disk, 1 << 20)
    assert "truncated" in fails(errors.EXIT_CORRUPT, "fs", cdir, "ls")


def test_check_failed_is_exit_1(cdir: Path) -> None:
    con = sqlite3.connect(cdir / "meta.db")
    con.execute("UPDATE inodes SET nlink = 7 WHERE id = 1")
    con.commit()
    con.close()
    proc = run("fsck", cdir, check=False)
    assert proc.returncode == errors.EXIT_CHECK_FAILED
    assert "nlink:" in proc.stdout and "1 problem(s) found" in proc.stdout
