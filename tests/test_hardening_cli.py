"""Issue 10, items 6, 7 and 8: bad input and damaged data as a user meets them.

Each failure is first reproduced the way the issue found it, then the command is run
as a user runs it (one process per command, see ``test_cli.run``) and must give exactly
one ``sdbackup: error:`` line with the exit code of ``sdbackup.errors`` (README), never a
traceback, and must lose nothing and leave nothing behind.

- Item 6: ``verify`` of a ``--log-mode separate`` generation reads its log (gone, moved
  or damaged); ``overlay`` of a damaged log leaves the generation byte for byte as it
  was.
- Item 7: a truncated or garbage ``meta.db``, a disk path that is a directory, a file
  given as the cluster directory, ``coordinator --listen/--lease`` out of range,
  ``--log-medium`` equal to, inside or around ``--medium``.
- Item 8: a file restore past damaged records restores every intact file and names
  every damaged one; ``fs put`` onto a full cluster leaves no partial file (embedded,
  through a coordinator, through a node); ``restore-cluster`` killed (SIGKILL) mid-way
  is cleaned up by the rerun. (The two former xfails of item 8 are
  ``test_cli.test_round_trip_keeps_symlink_mtimes`` and ``..._keeps_setuid_bit``.)

Tiny clusters (512-byte blocks, disks of 64 KiB to 4 MiB) keep it quick.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import random
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_backup_support import (
    SMALL,
    backup,
    cli,
    gen_dir,
    make_cluster,
    make_tree,
    put_tree,
    reseal,
)
from test_cli import _zygote_process, expected_used, run, runs_to_blocks  # noqa: F401

from sdbackup import errors
from sdbackup.backup.engine import run_backup
from sdbackup.cluster.backup_source import CoordinatorSource
from sdbackup.cluster.coordinator import Coordinator
from sdbackup.cluster.launch import Proc, start_node
from sdbackup.cluster.node import ClusterClient
from sdbackup.media.medium import MANIFEST, Manifest
from sdbackup.media.record_format import HEADER_SIZE, Kind
from sdbackup.media.record_reader import RecordReader

ERR = "sdbackup: error: "
NOT_RESTORED = "sdbackup: not restored (damaged on the medium): "

# `_zygote_process` (imported above) is test_cli's autouse fixture: with it, `run` forks
# each command from one process that imported the CLI once; `real=True` runs the
# installed script (with a timeout) for commands that could hang if the product broke.


# -- helpers ----------------------------------------------------------------------------------

def one_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The command exited ``code`` with exactly one error line and no traceback."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    errs = [ln for ln in proc.stderr.splitlines() if ln.startswith(ERR)]
    assert len(errs) == 1, proc.stderr
    return errs[0]


def fails(code: int, *args: object, real: bool = False, cwd: Path | None = None) -> str:
    """Run a command that must fail with ``code`` and print nothing but one error line."""
    proc = run(*args, check=False, real=real, cwd=cwd, timeout=30)
    line = one_error(proc, code)
    assert proc.stderr.strip().splitlines() == [line], proc.stderr
    return line


def state(root: Path, *, logs: bool = True) -> dict[str, str]:
    """Every path under ``root`` with its type and contents (a hash), for 'unchanged';
    without what is under a ``logs`` directory when ``logs`` is false (a daemon that
    refuses to start may have opened its log file)."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if not logs and "logs" in p.relative_to(root).parts[:-1]:
            continue
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = f"dir {stat.S_IMODE(p.stat().st_mode):o}"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def flip(path: Path, offset: int, xor: int = 0x01) -> None:
    """Flip bits of one byte of a file."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ xor]))


def records(path: Path, kind: Kind) -> list[tuple[int, int, int, int, int]]:
    """(offset, payload length, disk id, start block, block count) of each record of
    ``kind`` in a record stream or before-image log."""
    with RecordReader(path) as rd:
        return [(r.offset, r.header.payload_len, r.header.disk_id, r.header.start_block,
                 r.header.block_count) for r in rd.scan(payloads=False) if r.kind == kind]


# -- item 6: verify and overlay of a separate before-image log --------------------------------

@pytest.fixture(scope="module")
def separate_gen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A generation made with --log-mode separate (not overlaid) whose log holds before
    images: a client overwrites a file during the copy, through a coordinator."""
    base = tmp_path_factory.mktemp("separate")
    cdir = make_cluster(base / "c")
    put_tree(cdir, make_tree(base / "tree", files=8))
    coord = Coordinator(cdir, lease=5.0)
    coord.start()
    try:
        client = ClusterClient("w", cluster_dir=cdir, cache_bytes=1 << 20)
        try:
            hot = client.fs.create(1, b"hot").ino
            client.fs.write(hot, 0, random.Random(6).randbytes(48 << 10))
            client.fs.fsync(hot)
            done: list[int] = []

            def overwrite(n: int) -> None:
                if not done:  # first progress of the copy: after T0, before the end
                    done.append(n)
                    client.fs.write(hot, 0, b"written after T0 " * 2500)
                    client.fs.fsync(hot)

            opts = dataclasses.replace(SMALL, log_mode="separate", log_medium=base / "lm")
            res = run_backup(CoordinatorSource(coord), base / "m", opts, progress=overwrite)
        finally:
            client.close()
    finally:
        coord.stop()
    log = res.manifest.extra["log"]
    assert log["blocks"] > 0 and log["overlaid"] is False and log["medium"], log
    return base / "m", base / "lm", res.manifest.id


def copy_separate(gen: tuple[Path, Path, str], tmp_path: Path) -> tuple[Path, Path, str]:
    """A copy of the medium and of the log medium; the copy's manifest names the copied
    log medium, as if the backup had written it there."""
    medium, lm, gid = gen
    shutil.copytree(medium, tmp_path / "m")
    shutil.copytree(lm, tmp_path / "lm")
    m = Manifest.from_json((gen_dir(tmp_path / "m", gid) / MANIFEST).read_bytes(), "test")
    log = {**m.extra["log"], "medium": str(tmp_path / "lm")}
    reseal(tmp_path / "m", gid, extra={**m.extra, "log": log})
    return tmp_path / "m", tmp_path / "lm", gid


def test_item6_verify_reads_and_checks_the_separate_log(
        separate_gen: tuple[Path, Path, str], tmp_path: Path) -> None:
    medium, lm, gid = copy_separate(separate_gen, tmp_path)
    log = lm / f"{gid}.bilog"
    good = log.read_bytes()
    before = state(medium)
    bi = records(log, Kind.BI)
    assert bi, "the log holds no before image: the test proves nothing"

    out = run("verify", "--medium", medium, gid, "-q").stdout
    assert f"generation {gid}: OK" in out

    # The issue: the log medium is gone (unmounted, lost); verify said OK.
    lm.rename(tmp_path / "lm-moved")
    for args in ((gid,), ("--all",)):
        proc = run("verify", "--medium", medium, *args, "-q", check=False)
        assert proc.returncode == errors.EXIT_CHECK_FAILED, proc.stdout + proc.stderr
        assert str(log) in proc.stdout and "does not exist" in proc.stdout, proc.stdout
        assert "OK" not in proc.stdout and ERR not in proc.stderr
    # It moved: --log-medium says where, and everything checks out again.
    out = run("verify", "--medium", medium, gid, "-q", "--log-medium",
              tmp_path / "lm-moved").stdout
    assert f"generation {gid}: OK" in out
    (tmp_path / "lm-moved").rename(lm)

    # Damaged logs: a payload byte, a header byte, cut short, a foreign file.
    off, plen, *_ = bi[len(bi) // 2]
    damaged: dict[str, bytes] = {}
    for what, at in (("payload", off + HEADER_SIZE + plen // 2), ("header", off + 16)):
        flip(log, at)
        damaged[what] = log.read_bytes()
        log.write_bytes(good)
    damaged["truncated"] = good[: off + HEADER_SIZE + 5]
    damaged["foreign"] = random.Random(7).randbytes(len(good))
    for what, data in damaged.items():
        log.write_bytes(data)
        proc = run("verify", "--medium", medium, gid, "-q", check=False)
        assert proc.returncode == errors.EXIT_CHECK_FAILED, (what, proc.stdout, proc.stderr)
        assert str(log) in proc.stdout and "OK" not in proc.stdout, (what, proc.stdout)
        if what == "payload":
            assert f"offset {off}" in proc.stdout, proc.stdout
    log.write_bytes(good)
    assert state(medium) == before  # verify changed nothing


@pytest.mark.parametrize("damage", ["payload", "header", "truncated", "missing"])
def test_item6_overlay_of_a_damaged_log_leaves_the_generation_unchanged(
        separate_gen: tuple[Path, Path, str], tmp_path: Path, damage: str) -> None:
    medium, lm, gid = copy_separate(separate_gen, tmp_path)
    log = lm / f"{gid}.bilog"
    off, plen, *_ = records(log, Kind.BI)[-1]
    if damage == "payload":  # the issue: overlay copied this in and returned 0
        flip(log, off + HEADER_SIZE + plen // 2)
    elif damage == "header":
        flip(log, off + 16)
    elif damage == "truncated":
        os.truncate(log, off + HEADER_SIZE + 5)
    else:
        log.unlink()
    before, before_lm = state(medium), state(lm)
    code = errors.EXIT_NOT_FOUND if damage == "missing" else errors.EXIT_CORRUPT
    line = fails(code, "overlay", "--medium", medium, gid)
    assert gid in line and ("bilog" in line or "before-image log" in line), line
    assert state(medium) == before and state(lm) == before_lm
    # Still not overlaid, so still needing its log: verify says what is wrong.
    proc = run("verify", "--medium", medium, gid, "-q", check=False)
    assert proc.returncode == errors.EXIT_CHECK_FAILED and str(log) in proc.stdout


def test_item6_overlay_error_names_the_damaged_log(
        separate_gen: tuple[Path, Path, str], tmp_path: Path) -> None:
    medium, lm, gid = copy_separate(separate_gen, tmp_path)
    log = lm / f"{gid}.bilog"
    off, plen, *_ = records(log, Kind.BI)[-1]
    flip(log, off + HEADER_SIZE + plen // 2)
    line = fails(errors.EXIT_CORRUPT, "overlay", "--medium", medium, gid)
    assert str(log) in line and "stream-" not in line, line


def test_item6_overlay_of_an_intact_log_then_verify_without_it(
        separate_gen: tuple[Path, Path, str], tmp_path: Path) -> None:
    """The control for the two tests above: the same generation, log intact."""
    medium, lm, gid = copy_separate(separate_gen, tmp_path)
    out = run("overlay", "--medium", medium, gid).stdout
    assert "overlaid" in out and "before-image blocks" in out
    shutil.rmtree(lm)
    assert f"generation {gid}: OK" in run("verify", "--medium", medium, gid, "-q").stdout


def test_item6_overlay_that_runs_out_of_space_leaves_the_generation_unchanged(
        separate_gen: tuple[Path, Path, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process fault injection: the copy into the generation hits ENOSPC half way."""
    medium, _, gid = copy_separate(separate_gen, tmp_path)
    before = state(medium)

    def full_medium(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read(1000))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, "copyfile", full_medium)  # as overlay.py calls it
    try:
        r = cli("overlay", "--medium", medium, gid)
        outcome = (r.code, r.err)
    except OSError as e:  # escaped main(): a traceback for the user
        outcome = (-1, repr(e))
    finally:
        monkeypatch.undo()
    assert state(medium) == before, "the generation was changed"
    assert outcome[0] == errors.EXIT_NO_SPACE, outcome


# -- item 7: one line instead of a traceback; bad options refused --------------------------------

@pytest.fixture
def cdir(tmp_path: Path) -> Path:
    """A small cluster of two disks holding a tree (512-byte blocks)."""
    c = make_cluster(tmp_path / "base", disks=(1 << 20, 1 << 20))
    put_tree(c, make_tree(tmp_path / "tree", files=12))
    return c


@pytest.mark.parametrize("damage", ["empty", "header-only", "half", "garbage", "zeroed"])
def test_item7_damaged_meta_db_is_one_line_exit_5(cdir: Path, tmp_path: Path,
                                                   damage: str) -> None:
    db = cdir / "meta.db"
    raw = db.read_bytes()
    assert len(raw) >= 8 * 4096, len(raw)
    if damage == "empty":
        db.write_bytes(b"")
    elif damage == "header-only":
        db.write_bytes(raw[:100])
    elif damage == "half":  # whole pages, the schema page intact
        db.write_bytes(raw[: len(raw) // 2 // 4096 * 4096])
    elif damage == "garbage":
        db.write_bytes(random.Random(8).randbytes(len(raw)))
    else:
        db.write_bytes(bytes(4096) + raw[4096:])
    before = state(cdir.parent, logs=False)
    cmds: list[tuple[object, ...]] = [("info", cdir), ("fsck", cdir), ("fs", cdir, "ls", "/"),
                                      ("backup", cdir, "--medium", tmp_path / "m", "-q")]
    if damage == "garbage":
        cmds += [("blocks", cdir, "--used"), ("fs", cdir, "get", "/tree", tmp_path / "out")]
    for args in cmds:
        line = fails(errors.EXIT_CORRUPT, *args)
        assert "damaged" in line and str(db) in line, (args, line)
    line = fails(errors.EXIT_CORRUPT, "coordinator", cdir, real=True)
    assert "damaged" in line and str(db) in line, line
    after = state(cdir.parent, logs=False)
    if damage == "empty":  # SQLite's WAL switch writes a header into an empty file; it
        before.pop("cluster/meta.db"), after.pop("cluster/meta.db")  # still has no table
        assert len(db.read_bytes()) <= 4096
    assert after == before, "a command changed the damaged store or the cluster"
    assert not (tmp_path / "m").exists() and not (tmp_path / "out").exists()


def test_item7_disk_path_that_is_a_directory(cdir: Path, tmp_path: Path) -> None:
    toml = cdir / "cluster.toml"
    adir = tmp_path / "adir"
    adir.mkdir()
    old = str(cdir.parent / "d1.img")
    toml.write_text(toml.read_text().replace(f'"{old}"', f'"{adir}"'))
    assert str(adir) in toml.read_text()
    before = state(cdir.parent, logs=False)
    for args in (("info", cdir), ("fsck", cdir), ("blocks", cdir, "--used"),
                 ("fs", cdir, "ls", "/"), ("backup", cdir, "--medium", tmp_path / "m", "-q")):
        line = fails(errors.EXIT_USAGE, *args)
        assert str(adir) in line and "d1" in line, (args, line)
    line = fails(errors.EXIT_USAGE, "coordinator", cdir, real=True)
    assert str(adir) in line, line
    assert state(cdir.parent, logs=False) == before and list(adir.iterdir()) == []
    assert not (tmp_path / "m").exists()


def test_item7_restore_cluster_onto_a_disk_path_that_is_a_directory(
        plain_gen: tuple[Path, Path, Path, str], tmp_path: Path) -> None:
    _, _, medium, _ = plain_gen
    adir = tmp_path / "adir"
    adir.mkdir()
    line = fails(errors.EXIT_USAGE, "restore-cluster", "--medium", medium, "--to",
                 tmp_path / "new", "--disk", f"d0={adir}", "-q")
    assert str(adir) in line
    assert list(adir.iterdir()) == [] and not (tmp_path / "new").exists()


@pytest.mark.parametrize("cmd", [
    pytest.param(("info", "@"), id="info"),
    pytest.param(("fsck", "@"), id="fsck"),
    pytest.param(("blocks", "@", "--used"), id="blocks"),
    pytest.param(("fs", "@", "ls", "/"), id="fs-ls"),
    pytest.param(("fs", "@", "put", "@", "/x"), id="fs-put"),
    pytest.param(("backup", "@", "--medium", "M", "-q"), id="backup"),
    pytest.param(("status", "@"), id="status"),
    pytest.param(("flush", "@"), id="flush"),
    pytest.param(("node", "@", "--name", "n1"), id="node"),
    pytest.param(("coordinator", "@"), id="coordinator"),
])
def test_item7_file_given_as_the_cluster_directory(tmp_path: Path, cmd: tuple[str, ...]) -> None:
    f = tmp_path / "notadir"
    f.write_text("a file of mine\n")
    args = [str(f) if a == "@" else str(tmp_path / "m") if a == "M" else a for a in cmd]
    line = fails(errors.EXIT_USAGE, *args, real=cmd[0] in ("node", "coordinator"))
    assert str(f) in line and "file" in line, line
    assert f.read_text() == "a file of mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notadir"]


@pytest.mark.parametrize("opt", [("--listen", "127.0.0.1:99999"), ("--listen", "127.0.0.1:-1"),
                                 ("--listen", "127.0.0.1:65536"), ("--lease", "-1"),
                                 ("--lease", "0"), ("--lease", "nan"), ("--lease", "inf")],
                         ids=lambda o: " ".join(o) if isinstance(o, tuple) else str(o))
def test_item7_coordinator_refuses_bad_listen_and_lease(cdir: Path,
                                                        opt: tuple[str, str]) -> None:
    before = state(cdir.parent)
    line = fails(errors.EXIT_USAGE, "coordinator", cdir, *opt, real=True)
    assert opt[0] in line and opt[1] in line, line
    assert state(cdir.parent) == before  # no address file, no owner token, no log


@pytest.mark.parametrize("listen", ["192.0.2.1:0", "no-such-host.invalid:0", "in-use"])
def test_item7_coordinator_unusable_listen_address(cdir: Path, listen: str) -> None:
    """Well-formed but unusable: not an address of this host or unresolvable (bad
    input, exit 2), or in use by another process (busy, exit 3). One line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        if listen == "in-use":
            listen = f"127.0.0.1:{s.getsockname()[1]}"
        proc = run("coordinator", cdir, "--listen", listen, real=True, check=False,
                   timeout=30)
    line = one_error(proc, proc.returncode)
    want = errors.EXIT_BUSY if listen.startswith("127.0.0.1:") else errors.EXIT_USAGE
    assert proc.returncode == want, proc.returncode
    assert proc.stderr.strip().splitlines() == [line] and listen in line
    assert not (cdir / "coordinator.addr").exists()
    run("info", cdir)  # nobody believes a coordinator is running


def test_item7_coordinator_that_cannot_listen_leaves_nothing_behind(cdir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        before = state(cdir.parent, logs=False)
        run("coordinator", cdir, "--listen", f"127.0.0.1:{s.getsockname()[1]}", real=True,
            check=False, timeout=30)
    assert state(cdir.parent, logs=False) == before


def test_item7_log_medium_equal_to_inside_or_around_the_medium(cdir: Path,
                                                               tmp_path: Path) -> None:
    b = tmp_path / "media"
    b.mkdir()
    (b / "link-to-bk").symlink_to(b / "bk")
    cases = [  # (medium, log medium, cwd)
        (b / "bk", b / "bk", None),
        (b / "bk", b / "bk" / "log", None),
        (b / "lm" / "bk", b / "lm", None),
        (b / "bk", b / "link-to-bk", None),  # the same directory through a symlink
        (Path("bk"), b / "bk" / ".", b),  # relative and absolute spellings
        (b / "bk" / ".." / "bk", Path("bk/sub"), b),
    ]
    before = state(cdir.parent)
    for medium, lm, cwd in cases:
        line = fails(errors.EXIT_USAGE, "backup", cdir, "--medium", medium, "--log-mode",
                     "separate", "--log-medium", lm, "-q", cwd=cwd)
        assert "--log-medium" in line, line
        assert sorted(p.name for p in b.iterdir()) == ["link-to-bk"], (medium, lm)
    assert state(cdir.parent) == before
    # Control: a sibling whose name starts with the medium's is another directory.
    run("backup", cdir, "--medium", b / "bk", "--log-mode", "separate", "--log-medium",
        b / "bk2", "-q", "--compress", "none")
    assert (b / "bk" / "generations").is_dir() and (b / "bk2").is_dir()


# -- item 8: partial results -------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_gen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, str]:
    """(cluster, the tree it holds at /tree, medium, generation): one offline backup in
    records of 8 blocks (SMALL)."""
    base = tmp_path_factory.mktemp("plain")
    c = make_cluster(base / "c")
    tree = make_tree(base / "tree", files=24)
    (tree / "c" / "big.bin").write_bytes(random.Random(9).randbytes(600_000))
    put_tree(c, tree)
    res = backup(c, base / "m")
    return c, tree, base / "m", res.manifest.id


def _snapshot_files(medium: Path, gid: str) -> tuple[dict[int, list[str]],
                                                     dict[int, list[tuple[int, int, int]]]]:
    """From the generation's metadata snapshot: the names of every regular file (by
    inode) and its extents as (disk id, first block, count)."""
    db = gen_dir(medium, gid) / "meta.db"
    con = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
    try:
        modes = dict(con.execute("SELECT id, mode FROM inodes").fetchall())
        kids: dict[int, list[tuple[str, int]]] = {}
        for parent, name, ino in con.execute("SELECT parent, name, ino FROM dirents"):
            kids.setdefault(parent, []).append((os.fsdecode(bytes(name)), ino))
        names: dict[int, list[str]] = {}
        stack = [(1, "")]
        while stack:
            d, prefix = stack.pop()
            for name, ino in kids.get(d, []):
                if stat.S_ISDIR(modes[ino]):
                    stack.append((ino, f"{prefix}/{name}"))
                elif stat.S_ISREG(modes[ino]):
                    names.setdefault(ino, []).append(f"{prefix}/{name}")
        ext: dict[int, list[tuple[int, int, int]]] = {}
        for ino, disk, dblock, count in con.execute(
                "SELECT ino, disk, dblock, count FROM extents ORDER BY ino, fblock"):
            ext.setdefault(ino, []).append((disk, dblock, count))
    finally:
        con.close()
    return names, ext


def test_item8_restore_goes_on_past_damaged_records(
        plain_gen: tuple[Path, Path, Path, str], tmp_path: Path) -> None:
    _, tree, pristine, gid = plain_gen
    medium = tmp_path / "m"
    shutil.copytree(pristine, medium)
    stream = gen_dir(medium, gid) / "stream-0.sdr"
    names, ext = _snapshot_files(medium, gid)
    data = records(stream, Kind.DATA)

    def inos_in(rec: tuple[int, int, int, int, int]) -> set[int]:
        _, _, disk, start, count = rec
        return {ino for ino, es in ext.items()
                for d, b, n in es if d == disk and b < start + count and start < b + n}

    # Damage two records: the one holding a hard-linked file's first block (its other
    # name must be reported too) and one two thirds in; files come after both.
    linked = next(ino for ino, ns in names.items() if len(ns) > 1 and ino in ext)
    d0, b0, _ = ext[linked][0]
    first = next(r for r in data if r[2] == d0 and r[3] <= b0 < r[3] + r[4])
    second = next(r for r in data[len(data) * 2 // 3:] if inos_in(r) and r != first)
    for off, plen, *_ in (first, second):
        flip(stream, off + HEADER_SIZE + plen // 2)
    bad = inos_in(first) | inos_in(second)
    bad_names = {n for ino in bad for n in names[ino]}
    later = [ino for ino in ext if ino not in bad and ext[ino][0][:2] > (second[2], second[3])]
    assert bad and later, "no intact file after the damage: the test proves nothing"

    out = tmp_path / "out"
    proc = run("restore", "--medium", medium, "--to", out, "-q", check=False)
    line = one_error(proc, errors.EXIT_CORRUPT)
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == line, proc.stderr
    assert all(ln.startswith(NOT_RESTORED) for ln in lines[:-1]), proc.stderr
    reported = [ln.removeprefix(NOT_RESTORED).split(": ", 1)[0] for ln in lines[:-1]]
    assert sorted(reported) == sorted(bad_names), proc.stderr
    assert str(len(bad_names)) in line or str(len(bad)) in line, line
    intact = len(names) - len(bad)
    assert f"restored {intact} files" in proc.stdout, proc.stdout

    # Every intact file, link and directory is there as it was; no damaged one at all.
    src_paths = {"/tree/" + str(p.relative_to(tree)) for p in tree.rglob("*")}
    got_paths = {"/" + str(p.relative_to(out)) for p in out.rglob("*")}
    assert got_paths == (src_paths | {"/tree"}) - bad_names
    for p in sorted(tree.rglob("*")):
        cl = "/tree/" + str(p.relative_to(tree))
        if cl in bad_names:
            continue
        q = out / cl.lstrip("/")
        a, b = p.lstat(), q.lstat()
        assert stat.S_IFMT(a.st_mode) == stat.S_IFMT(b.st_mode), cl
        if stat.S_ISLNK(a.st_mode):
            assert os.readlink(p) == os.readlink(q), cl
            continue
        assert (stat.S_IMODE(a.st_mode), a.st_mtime_ns) == (stat.S_IMODE(b.st_mode),
                                                            b.st_mtime_ns), cl
        if stat.S_ISREG(a.st_mode):
            assert p.read_bytes() == q.read_bytes(), cl


def _full_cluster(tmp_path: Path) -> tuple[Path, Path]:
    """A 64 KiB cluster holding /keep (1000 bytes); a local tree src/ whose file b
    (100 KB) cannot fit, between two that do."""
    c = make_cluster(tmp_path / "base", disks=(64 << 10,))
    (tmp_path / "keep").write_bytes(b"k" * 1000)
    run("fs", c, "put", tmp_path / "keep", "/keep")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 1000)
    (src / "b").write_bytes(random.Random(4).randbytes(100_000))
    (src / "c").write_bytes(b"c" * 700)
    return c, src


def _no_partial_files(c: Path, src: Path) -> None:
    """Every file under /src in the cluster is complete; /keep is intact; the store and
    the allocation agree (fsck, used blocks)."""
    run("fsck", c)
    assert runs_to_blocks(run("blocks", c, "--used").stdout) == expected_used(c)
    assert run("fs", c, "cat", "/keep").stdout == "k" * 1000
    for name in run("fs", c, "ls", "/src").stdout.split():
        assert run("fs", c, "cat", f"/src/{name}", text=False).stdout == \
            (src / name).read_bytes(), f"/src/{name} is partial"
    assert "b" not in run("fs", c, "ls", "/src").stdout.split()


def test_item8_fs_put_onto_a_full_cluster_leaves_no_partial_file(tmp_path: Path) -> None:
    c, src = _full_cluster(tmp_path)
    line = fails(errors.EXIT_NO_SPACE, "fs", c, "put", src / "b", "/b")
    assert "no space" in line.lower()
    assert run("fs", c, "ls", "/").stdout.split() == ["keep"]  # the issue: a 0-byte /b
    fails(errors.EXIT_NO_SPACE, "fs", c, "put", src, "/")
    _no_partial_files(c, src)


def test_item8_fs_put_over_a_file_on_a_full_cluster_keeps_the_old_file(
        tmp_path: Path) -> None:
    c, src = _full_cluster(tmp_path)
    fails(errors.EXIT_NO_SPACE, "fs", c, "put", src / "b", "/keep")
    assert run("fs", c, "cat", "/keep").stdout == "k" * 1000


@pytest.fixture
def coordinator_of() -> Iterator[list[Coordinator]]:
    """Coordinators started in this process by the test (stopped at teardown)."""
    started: list[Coordinator] = []
    yield started
    for co in started:
        co.stop()


def test_item8_fs_put_through_a_coordinator_onto_a_full_cluster(
        tmp_path: Path, coordinator_of: list[Coordinator]) -> None:
    """With a coordinator running, fs put writes through a short-lived client's cache:
    the error comes at its write-back, after every write was acknowledged."""
    c, src = _full_cluster(tmp_path)
    co = Coordinator(c, lease=5.0)
    co.start()
    coordinator_of.append(co)
    proc = run("fs", c, "put", src, "/", check=False)
    one_error(proc, errors.EXIT_NO_SPACE)  # (and log records, see the test below)
    assert "b" not in run("fs", c, "ls", "/src").stdout.split()
    coordinator_of.remove(co)
    co.stop()
    _no_partial_files(c, src)


def test_item8_fs_put_through_a_coordinator_error_is_one_line_naming_the_file(
        tmp_path: Path, coordinator_of: list[Coordinator]) -> None:
    c, src = _full_cluster(tmp_path)
    co = Coordinator(c, lease=5.0)
    co.start()
    coordinator_of.append(co)
    line = fails(errors.EXIT_NO_SPACE, "fs", c, "put", src / "b", "/b")
    assert "/b" in line, line


def test_item8_fs_put_through_a_node_onto_a_full_cluster(
        tmp_path: Path, coordinator_of: list[Coordinator]) -> None:
    c, src = _full_cluster(tmp_path)
    co = Coordinator(c, lease=5.0)
    co.start()
    coordinator_of.append(co)
    node: Proc = start_node(c, "n1", cache_size="8MiB", flush_delay=60)
    try:
        proc = run("fs", c, "put", "--node", "n1", src, "/", check=False)
        listed = run("fs", c, "ls", "--node", "n1", "/src", check=False).stdout.split()
    finally:
        node.stop(timeout=10)
        coordinator_of.remove(co)
        co.stop()
    assert "b" not in listed, f"/src/b left behind (put exited {proc.returncode})"
    one_error(proc, errors.EXIT_NO_SPACE)
    _no_partial_files(c, src)


# A crash hook on the test's side: run the command in-process and SIGKILL it at the
# chosen point (the Nth block write into image file NAME, or once everything is
# written and fsck starts): what a kill -9 or a power cut leaves.
KILLER = r"""
import os, signal, sys
from sdbackup.blocks import device
from sdbackup.cli.main import main
from sdbackup.meta import fsck
at, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls = [0]
real_write = device.BlockDevice.write
def write(self, *a, **k):
    if at == "write" and self.path.name == name:
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_write(self, *a, **k)
def check_all(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
device.BlockDevice.write = write
if at == "fsck":
    fsck.check_all = check_all
main(sys.argv[4:])
"""


@pytest.mark.parametrize("at", [("write", "d0.img", 3), ("write", "d1.img", 3),
                                ("fsck", "", 0)],
                         ids=["in-first-image", "in-second-image", "at-fsck"])
def test_item8_interrupted_restore_cluster_is_cleaned_up_by_the_rerun(
        plain_gen: tuple[Path, Path, Path, str], tmp_path: Path,
        at: tuple[str, str, int]) -> None:
    _, tree, medium, gid = plain_gen
    new, ext = tmp_path / "new", tmp_path / "ext"
    ext.mkdir()
    args = ["restore-cluster", "--medium", str(medium), gid, "--to", str(new), "--disk",
            f"d1={ext / 'd1.img'}", "-q"]
    env = {**os.environ, "COLUMNS": "200"}
    killed = subprocess.run([sys.executable, "-c", KILLER, at[0], at[1], str(at[2]), *args],
                            capture_output=True, text=True, timeout=60, env=env)
    assert killed.returncode == -9, (killed.returncode, killed.stderr)
    assert (new / "RESTORING").is_file()  # the restore knows it was interrupted
    assert (new / "d0.img").exists() or at[0] != "write"
    if at[1] == "d1.img":
        assert (ext / "d1.img").exists()  # killed inside the second, external image

    # The rerun into the same --to cleans up and succeeds.
    out = run(*args).stdout
    assert "fsck: consistent" in out
    assert not (new / "RESTORING").exists()
    # What it made is what a restore that was never interrupted makes.
    ref, ref_ext = tmp_path / "ref", tmp_path / "ref-ext"
    ref_ext.mkdir()
    run("restore-cluster", "--medium", medium, gid, "--to", ref, "--disk",
        f"d1={ref_ext / 'd1.img'}", "-q")
    assert sorted(os.listdir(new)) == sorted(os.listdir(ref))
    assert os.listdir(ext) == ["d1.img"] and os.listdir(ref_ext) == ["d1.img"]
    run("fsck", new)
    run("fs", new, "get", "/tree", tmp_path / "back")
    for p in tree.rglob("*"):
        q = tmp_path / "back" / p.relative_to(tree)
        assert stat.S_IFMT(p.lstat().st_mode) == stat.S_IFMT(q.lstat().st_mode), p
        if p.is_file() and not p.is_symlink():
            assert p.read_bytes() == q.read_bytes(), p

