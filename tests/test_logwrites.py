"""The power-loss harness itself (``tests/logwrites.py``): the recorder and the replay model.

Recorder tests run small programs through a real mount and compare the log with what
they did; model tests check the crash states against the rules in the module docstring
(fsynced writes are in every later state, pending writes are absent from the "none"
state, torn writes land by whole 512-byte sectors, namespace operations in order), on
recorded logs and on hand-made ones. A positive control: SQLite (WAL, synchronous=FULL,
with a second process reading) must recover a consistent database holding every
committed transaction from every crash state, which a correct program does only if the
model offers no impossible states.

Every test that mounts (marked ``fuse``) needs /dev/fuse and pyfuse3 and FAILS when
they are missing.
"""

from __future__ import annotations

import errno
import filecmp
import mmap
import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

try:  # tests/ as a plain directory of modules...
    import logwrites as lw
except ModuleNotFoundError:  # ...or as a package
    from tests import logwrites as lw

SECTOR = lw.SECTOR


def mounted(tmp_path: Path, **kw: Any) -> Any:
    return lw.recording_mount(tmp_path / "backing", tmp_path / "mnt", tmp_path / "log", **kw)


def ops(records: Sequence[lw.Record]) -> list[tuple[Any, ...]]:
    """Records as comparable tuples (writes with their payload)."""
    out: list[tuple[Any, ...]] = []
    for r in records:
        args = tuple(sorted(r.args.items()))
        out.append((r.op, args, r.data) if r.op == "write" else (r.op, args))
    return out


def rec(op: str, data: bytes = b"", **args: Any) -> tuple[str, dict[str, Any], bytes]:
    return (op, args, data)


def records(*items: tuple[str, dict[str, Any], bytes]) -> list[lw.Record]:
    return [lw.Record(i, op, args, data) for i, (op, args, data) in enumerate(items)]


def same_tree(a: Path, b: Path, ignore: Sequence[str] = ()) -> None:
    """The two directory trees have the same names, kinds, sizes and bytes."""
    cmp = filecmp.dircmp(a, b, ignore=list(ignore))
    pending = [cmp]
    while pending:
        c = pending.pop()
        assert not c.left_only and not c.right_only, (c.left, c.left_only, c.right_only)
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        assert not mismatch and not errors, (c.left, mismatch, errors)
        pending.extend(c.subdirs.values())


# -- the recorder ----------------------------------------------------------------------------

def test_check_fuse_fails_loudly_without_dev_fuse(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: p != "/dev/fuse" and real(p))
    with pytest.raises(RuntimeError, match="/dev/fuse is missing"):
        lw.check_fuse()


@pytest.mark.fuse
def test_log_records_every_state_change_in_order(tmp_path: Path) -> None:
    lw.check_fuse()
    with mounted(tmp_path) as m:
        p = m.path
        (p / "a").write_bytes(b"A" * 5000)
        fd = os.open(p / "a", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        m.mark("one")
        os.mkdir(p / "d")
        os.rename(p / "a", p / "d" / "b")
        os.link(p / "d" / "b", p / "c")
        os.symlink("d/b", p / "s")
        os.truncate(p / "c", 10)
        os.unlink(p / "c")
        (p / "d" / "b").write_bytes(b"q")  # O_TRUNC, then a write
        fd = os.open(p / "e", os.O_WRONLY | os.O_CREAT | os.O_DSYNC, 0o644)
        os.pwrite(fd, b"E" * 100, 7)
        os.close(fd)
        os.mkdir(p / "f")
        fd = os.open(p / "f", os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
        os.rmdir(p / "f")
        assert os.readlink(p / "s") == "d/b"
        assert sorted(os.listdir(p)) == ["d", "e", "s"]
        b = m.backing
        ids = {n: os.stat(b / n, follow_symlinks=False).st_ino for n in ("d", "d/b", "e", "s")}
    got = lw.read_log(m.log_path)
    a, d, e, s = ids["d/b"], ids["d"], ids["e"], ids["s"]
    f = got[-1].args["id"]
    want = records(
        rec("create", parent=1, name=b"a", id=a),
        rec("write", b"A" * 5000, id=a, off=0),
        rec("fsync", id=a, datasync=False),
        rec("mark", label="one"),
        rec("mkdir", parent=1, name=b"d", id=d),
        rec("rename", parent=1, name=b"a", newparent=d, newname=b"b", id=a, replaced=None),
        rec("link", id=a, parent=1, name=b"c"),
        rec("symlink", parent=1, name=b"s", id=s, target=b"d/b"),
        rec("truncate", id=a, size=10),
        rec("unlink", parent=1, name=b"c", id=a),
        rec("truncate", id=a, size=0),
        rec("write", b"q", id=a, off=0),
        rec("create", parent=1, name=b"e", id=e),
        rec("write", b"E" * 100, id=e, off=7),
        rec("fsync", id=e, datasync=True, why="O_SYNC"),  # the recorder's, for O_DSYNC
        rec("fsync", id=e, datasync=True),  # the kernel's FSYNC after an O_DSYNC write
        rec("mkdir", parent=1, name=b"f", id=f),
        rec("fsyncdir", id=f, datasync=False),
        rec("rmdir", parent=1, name=b"f", id=f),
    )
    assert ops(got) == ops(want)


@pytest.mark.fuse
def test_o_direct_through_the_mount(tmp_path: Path) -> None:
    """O_DIRECT opens work; aligned I/O goes through, unaligned fails as on a disk."""
    lw.check_fuse()
    with mounted(tmp_path) as m:
        fd = os.open(m.path / "img", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        try:
            os.ftruncate(fd, 1 << 20)
            buf = mmap.mmap(-1, 8192)
            buf[:] = bytes(range(256)) * 32
            assert os.pwrite(fd, buf, 4096) == 8192
            back = mmap.mmap(-1, 8192)
            assert os.preadv(fd, [back], 4096) == 8192
            assert back[:] == buf[:]
            for off, n in ((100, 4096), (0, 100)):
                with pytest.raises(OSError) as ei:
                    os.pwrite(fd, buf[:n], off)
                assert ei.value.errno == errno.EINVAL
            os.fdatasync(fd)
        finally:
            os.close(fd)
        # A buffered reader sees what the O_DIRECT writer wrote.
        assert (m.path / "img").read_bytes()[4096 : 4096 + 8192] == buf[:]
    got = [r for r in lw.read_log(m.log_path) if r.op in ("write", "fsync", "truncate")]
    ino = got[0].args["id"]
    assert ops(got) == ops(records(rec("truncate", id=ino, size=1 << 20),
                                   rec("write", bytes(buf), id=ino, off=4096),
                                   rec("fsync", id=ino, datasync=True)))


@pytest.mark.fuse
def test_recording_mount_unmounts_and_stops_even_when_busy(tmp_path: Path) -> None:
    """A process still inside the mount: the exit unmounts lazily, kills the server
    that cannot finish, and says so."""
    lw.check_fuse()
    sleeper = None
    with pytest.raises(RuntimeError, match="did not exit after the unmount"), \
            mounted(tmp_path, timeout=2.0) as m:
        sleeper = subprocess.Popen(["sleep", "60"], cwd=m.path)
    assert sleeper is not None
    sleeper.kill()
    sleeper.wait()
    assert not lw.is_mounted(tmp_path / "mnt")
    assert m.proc.poll() is not None


# -- the model on recorded logs ----------------------------------------------------------------

def sectors(data: bytes) -> list[bytes]:
    return [data[i : i + SECTOR] for i in range(0, len(data), SECTOR)]


@pytest.mark.fuse
def test_replayed_states_follow_the_model(tmp_path: Path) -> None:
    """fsynced writes are in every later state; pending ones absent from "none", whole in
    "all", by whole sectors in the others; a sync through another process counts."""
    lw.check_fuse()
    v1, v2 = b"1" * 8192, b"2" * 8192
    with mounted(tmp_path) as m:
        p = m.path
        os.mkdir(p / "d")
        (p / "d" / "a").write_bytes(v1)
        # fsync from another process, through its own descriptor: covers the file.
        subprocess.run([sys.executable, "-c", "import os, sys; fd = os.open(sys.argv[1], "
                        "os.O_RDONLY); os.fsync(fd)", str(p / "d" / "a")], check=True)
        m.mark("a-synced")
        with open(p / "d" / "a", "r+b") as f:
            f.write(v2)  # overwrite, never synced
        (p / "b").write_bytes(b"B" * 3000)  # never synced
        os.rename(p / "d" / "a", p / "a2")
    model = lw.ReplayModel(lw.read_log(m.log_path), m.initial)
    synced = model.mark_index("a-synced")
    fsync_at = synced - 1
    assert model.records[fsync_at].op == "fsync"
    a_id = model.records[fsync_at].args["id"]
    overwrites = [r.index for r in model.records
                  if r.op == "write" and r.args["id"] == a_id and r.index > synced]
    assert b"".join(model.records[i].data for i in overwrites) == v2
    cuts = model.cuts()
    assert [c.index for c in cuts] == [fsync_at, synced, len(model.records)]
    n_states = 0
    torn = 0
    for cut in cuts:
        for st in model.states(cut, n_random=8, seed=7):
            n_states += 1
            if cut.index == fsync_at:  # just before the fsync: nothing is durable yet
                want = {"none": b"", "all": v1}.get(st.label)
                if want is not None:
                    assert st.read("d/a") == want
                continue
            a = st.read("a2" if cut.index == len(model.records) else "d/a")
            # Independently of the model: v1, with each overwrite landed as chosen.
            want_a = bytearray(v1)
            for i in overwrites:
                what = st.choices.get(i, "none")
                r = model.records[i]
                off = r.args["off"]
                if what == "all":
                    want_a[off : off + len(r.data)] = r.data
                elif what.startswith("torn:"):
                    torn += 1
                    for sec in map(int, what[5:].split(",")):
                        lo = max(off, (off // SECTOR + sec) * SECTOR)
                        hi = min(off + len(r.data), (off // SECTOR + sec + 1) * SECTOR)
                        want_a[lo:hi] = r.data[lo - off : hi - off]
            assert a == bytes(want_a), (cut, st.label)
            assert all(sec in (v1[:SECTOR], v2[:SECTOR]) for sec in sectors(a))
            if st.label == "none":
                assert a == v1, "a pending write landed in the 'none' state"
                if "b" in st.paths():
                    assert st.read("b") == b""
            elif st.label == "all" and cut.index == len(model.records):
                assert a == v2
    assert n_states > 10 and torn > 0
    # The end of the log with every pending write is exactly the backing directory.
    end = list(model.states(cuts[-1], n_random=0))
    out = tmp_path / "all"
    model.materialize(end[1], out)
    same_tree(m.backing, out)
    none = tmp_path / "none"
    model.materialize(end[0], none)
    assert (none / "a2").read_bytes() == v1 and (none / "b").read_bytes() == b""


SQL_READER = textwrap.dedent("""
    import sqlite3, sys, time
    db = sqlite3.connect(sys.argv[1], timeout=30)
    end = time.monotonic() + 30
    seen = 0
    while time.monotonic() < end:
        n = db.execute("SELECT count(*) FROM t").fetchone()[0]
        assert n >= seen, (n, seen)
        seen = n
        if n >= int(sys.argv[2]):
            break
        time.sleep(0.005)
    print(seen)
""")


def row(i: int) -> bytes:
    return (f"row {i} ".encode() * 400)[:3000]


@pytest.mark.fuse
def test_sqlite_wal_recovers_every_committed_transaction(tmp_path: Path) -> None:
    """Positive control: a correct program (SQLite, WAL, synchronous=FULL) must come back
    consistent, with every transaction whose COMMIT returned, from every crash state."""
    lw.check_fuse()
    n = 25
    with mounted(tmp_path) as m:
        path = m.path / "t.db"
        db = sqlite3.connect(str(path), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, body BLOB)")
        m.mark("created")
        reader = subprocess.Popen([sys.executable, "-c", SQL_READER, str(path), str(n)],
                                  stdout=subprocess.PIPE, text=True)
        for i in range(1, n + 1):
            m.mark(f"begin-{i}")
            db.execute("INSERT INTO t VALUES (?, ?)", (i, row(i)))
            m.mark(f"commit-{i}")
            if i == n // 2:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        out, _ = reader.communicate(timeout=60)
        assert reader.returncode == 0 and int(out) == n
        db.close()
    model = lw.ReplayModel(lw.read_log(m.log_path), m.initial)
    begins = {i: model.mark_index(f"begin-{i}") for i in range(1, n + 1)}
    commits = {i: model.mark_index(f"commit-{i}") for i in range(1, n + 1)}
    states = 0
    for st in model.all_states(model.cuts(start=model.mark_index("created") + 1),
                               n_random=3, seed=3):
        k = st.cut.index
        d = tmp_path / f"s{states}"
        model.materialize(st, d)
        for shm in d.glob("*-shm"):
            shm.unlink()
        c = sqlite3.connect(str(d / "t.db"))
        try:
            assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",), st.describe(
                model.records)
            rows = c.execute("SELECT id, body FROM t ORDER BY id").fetchall()
        finally:
            c.close()
        low = max([i for i, idx in commits.items() if idx < k], default=0)
        high = max([i for i, idx in begins.items() if idx < k], default=0)
        assert low <= len(rows) <= high, (st.cut, st.label, low, len(rows), high)
        assert rows == [(i, row(i)) for i in range(1, len(rows) + 1)]
        states += 1
    assert states > 40


# -- the model on hand-made logs --------------------------------------------------------------

def test_torn_writes_land_by_whole_sectors_and_grow_the_file() -> None:
    data = bytes(range(256)) * 8  # 2048 bytes at 256: sectors 0..4 of the write
    recs = records(rec("create", parent=1, name=b"f", id=10),
                   rec("write", data, id=10, off=256))
    model = lw.ReplayModel(recs)
    seen: set[str] = set()
    for seed in range(40):
        for st in model.states(lw.Cut(2, "end"), n_random=4, seed=seed):
            what = st.choices[1]
            seen.add(what.split(":")[0])
            got = st.read("f")
            if what == "none":
                assert got == b""
                continue
            keep = range(5) if what == "all" else [int(x) for x in what[5:].split(",")]
            want = bytearray()
            for s in keep:
                lo, hi = max(256, s * SECTOR), min(256 + len(data), (s + 1) * SECTOR)
                if len(want) < hi:
                    want.extend(bytes(hi - len(want)))
                want[lo:hi] = data[lo - 256 : hi - 256]
            assert got == bytes(want), what
    assert seen == {"none", "all", "torn"}


def test_truncates_and_namespace_apply_in_log_order() -> None:
    recs = records(
        rec("create", parent=1, name=b"f", id=10),
        rec("write", b"x" * 100, id=10, off=0),
        rec("truncate", id=10, size=10),  # after the (pending) write: cuts it either way
        rec("mkdir", parent=1, name=b"d", id=11),
        rec("rename", parent=1, name=b"f", newparent=11, newname=b"g", id=10, replaced=None),
        rec("create", parent=1, name=b"h", id=12),
        rec("write", b"old", id=12, off=0),
        rec("fsync", id=12, datasync=False),
        rec("unlink", parent=1, name=b"h", id=12),
        rec("create", parent=1, name=b"h2", id=12),  # inode 12 reused: a new file
        rec("write", b"new", id=12, off=3),
        rec("link", id=12, parent=11, name=b"h3"),
    )
    model = lw.ReplayModel(recs)
    cuts = model.cuts()
    assert [c.index for c in cuts] == [7, 8, len(recs)]
    for st in model.states(cuts[-1], n_random=5):
        assert sorted(st.paths()) == ["d", "d/g", "d/h3", "h2"]
        assert st.read("d/g") in (bytes(10), b"x" * 10)
        assert st.read("h2") in (b"", b"\0\0\0new")
        assert st.read("h2") == st.read("d/h3")
    assert list(model.states(cuts[-1]))[1].read("d/g") == b"x" * 10
    before = list(model.states(cuts[0], n_random=0))
    assert sorted(before[0].paths()) == ["d", "d/g", "h"]
    assert before[0].read("h") == b"" and before[1].read("h") == b"old"
    after = list(model.states(cuts[1], n_random=3))
    assert all(st.read("h") == b"old" for st in after)


def test_a_log_naming_an_unknown_file_is_refused() -> None:
    with pytest.raises(ValueError, match="neither in the initial state nor created"):
        lw.ReplayModel(records(rec("write", b"x", id=99, off=0)))
    with pytest.raises(ValueError, match="recorder bug"):
        model = lw.ReplayModel(records(rec("create", parent=1, name=b"a", id=5),
                                       rec("unlink", parent=1, name=b"b", id=5)))
        list(model.states(lw.Cut(2, "end")))
