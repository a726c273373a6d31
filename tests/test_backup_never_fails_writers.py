"""A backup never fails an application (issue 10, item 2).

For each log mode, the medium that holds the before-image log is a tiny tmpfs that fills
in the middle of an online backup while two node processes (real ``sdbackup node``
processes, a real coordinator) keep writing, truncating and fsyncing through their
write-back caches:

- ``merged``: each node's own log, in ``CLUSTER_DIR/nodes`` (a 1 MiB tmpfs there);
- ``central`` and ``inline``: the log manager's log on the backup medium (a 2 MiB tmpfs;
  the copy is small there because the data compresses well, the log does not);
- ``separate``: the log medium (``--log-medium``, a 2 MiB tmpfs).

Proven for each: not one write, truncate or fsync fails; the backup exits non-zero with
one clear line; no generation is committed (``sdbackup generations`` lists none, what is
left of it is at most its ``FAILED`` marker); the partial before-image log is gone; the
cluster is not left frozen and nothing is fenced or lost; every byte the writers wrote is
there afterwards, read through the other node. The copy is slowed down by the engine's
test hook (``SDBACKUP_TEST_COPY_DELAY``) so that the writers overlap it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:  # tests/ as a plain directory of modules...
    from cluster_helpers import PY, ClusterProcs, Proc, read_file_via, sdb, wait_for
except ModuleNotFoundError:  # ...or as a package (with tests/__init__.py)
    from tests.cluster_helpers import PY, ClusterProcs, Proc, read_file_via, sdb, wait_for

MiB = 1 << 20

# One writer per node, on files of its own (so no operation of one can fail because of
# the other). Every operation is recorded; the model of each file's contents is kept so
# that the test can check every byte afterwards. The data written compresses well (the
# backup's copy stays small) but before images are logged raw.
_WRITER = textwrap.dedent('''
    import hashlib, json, os, random, sys, time
    from sdbackup.cluster.access import open_fs
    cdir, node, prefix, seed, ready, stop = sys.argv[1:7]
    rng = random.Random(int(seed))
    SIZE, NFILES = 2 << 20, 6
    names = [f"{prefix}{i}" for i in range(NFILES)]
    model, inos, times, errors = {}, {}, [], []

    def data(n):
        return (rng.randbytes(16) * (n // 16 + 1))[:n]

    with open_fs(cdir, node=node) as fs:
        for name in names:
            ino = fs.create(1, name.encode()).ino
            init = b"".join((f"{name} block {j:06d} ".encode() * 200)[:4096]
                            for j in range(SIZE // 4096))
            fs.write(ino, 0, init)
            fs.fsync(ino)
            inos[name], model[name] = ino, bytearray(init)
        open(ready, "w").close()
        while not os.path.exists(stop):
            name = rng.choice(names)
            ino, buf = inos[name], model[name]
            op = rng.random()
            t = time.monotonic()
            try:
                if op < 0.75:
                    n = rng.choice([4096, 5000, 65536, 262144])
                    off = rng.randrange(0, SIZE - n)
                    d = data(n)
                    fs.write(ino, off, d)
                    if off > len(buf):
                        buf.extend(bytes(off - len(buf)))
                    buf[off:off + n] = d
                elif op < 0.85:
                    size = rng.randrange(SIZE * 3 // 4, SIZE)
                    fs.truncate(ino, size)
                    if size < len(buf):
                        del buf[size:]
                    else:
                        buf.extend(bytes(size - len(buf)))
                else:
                    fs.fsync(ino)
                times.append(t)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
        for name, ino in inos.items():
            try:
                fs.fsync(ino)
            except Exception as e:
                errors.append(f"final fsync of {name}: {type(e).__name__}: {e}")
    print(json.dumps({"times": times, "errors": errors,
                      "files": {n: [len(b), hashlib.sha256(b).hexdigest()]
                                for n, b in model.items()}}))
''')


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a {size} tmpfs at {path} (these tests need root): "
                    f"{r.stderr.strip()}", pytrace=False)


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ClusterProcs]:
    """A cluster directory (one 64 MiB disk, 4 KiB blocks); processes started in it are
    killed and tmpfs mounts under ``tmp_path`` unmounted at the end."""
    monkeypatch.setenv("SDBACKUP_TEST_COPY_DELAY", "1.5")  # the coordinator copies slowly
    cp = ClusterProcs(tmp_path, block_size=4096, disk_size="64MiB")
    try:
        yield cp
    finally:
        cp.cleanup()
        with open("/proc/self/mountinfo") as f:
            mine = [ln.split()[4] for ln in f if ln.split()[4].startswith(str(tmp_path))]
        for mp in sorted(mine, reverse=True):
            subprocess.run(["umount", "-l", mp], check=False, capture_output=True)


def _writer_result(p: Proc) -> dict[str, Any]:
    rc = p.wait(120)
    lines = [ln for ln in p.output().splitlines() if ln.startswith("{")]
    assert rc == 0 and lines, f"{p.name} exited {rc}: {p.output()[-3000:]}"
    got: dict[str, Any] = json.loads(lines[-1])
    return got


def _leftovers(*dirs: Path) -> list[str]:
    """Before-image logs (whole or partial) left in these directories."""
    out = []
    for d in dirs:
        if d.exists():
            out += [str(p) for p in d.rglob("*") if p.suffix == ".bilog"
                    or p.name == "stream-1.sdr"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["merged", "central", "inline", "separate"])
def test_a_full_log_medium_aborts_the_backup_never_the_writers(
        cluster: ClusterProcs, tmp_path: Path, mode: str) -> None:
    """The log medium fills mid-backup while two nodes write: zero failed operations, the
    backup exits non-zero with one clear line, no generation, no partial log, and every
    byte written is there."""
    cp = cluster
    medium, log_medium = tmp_path / "medium", tmp_path / "logmedium"
    full = {"merged": cp.dir / "nodes", "separate": log_medium}.get(mode, medium)
    mount_tmpfs(full, "1m" if mode == "merged" else "2m")
    cp.start_coordinator(lease=5.0)
    for n in ("n1", "n2"):
        cp.start_node(n, flush_delay=0.2, cache_size="16MiB")
    stop = tmp_path / "stop"
    writers = []
    for i, (node, prefix) in enumerate((("n1", "a"), ("n2", "b"))):
        ready = tmp_path / f"ready-{node}"
        writers.append(cp.spawn(f"writer-{node}", [PY, "-c", _WRITER, str(cp.dir), node,
                                                   prefix, str(i), str(ready), str(stop)]))
    for w, node in zip(writers, ("n1", "n2"), strict=True):
        wait_for(lambda w=w, node=node: (tmp_path / f"ready-{node}").exists()
                 or not w.alive(), 60, f"{w.name} to seed its files")
        assert w.alive(), w.output()[-3000:]
    time.sleep(1.0)  # both writers are busy and the caches dirty

    args = ["backup", str(cp.dir), "--medium", str(medium), "--log-mode", mode]
    if mode == "separate":
        args += ["--log-medium", str(log_medium)]
    t0 = time.monotonic()
    r = sdb(*args, timeout=180)
    t1 = time.monotonic()
    time.sleep(1.0)  # writes go on after the backup too
    stop.touch()
    results = [_writer_result(w) for w in writers]

    # Not one operation of the writers failed, and they ran during and after the backup.
    for w, res in zip(writers, results, strict=True):
        assert res["errors"] == [], f"{w.name}: {len(res['errors'])} failed: " \
            f"{res['errors'][:5]}"
        times = res["times"]
        assert sum(1 for t in times if t0 < t < t1) >= 5, f"{w.name} did not overlap the backup"
        assert any(t > t1 for t in times), f"{w.name} did not write after the backup"

    # The backup failed cleanly: non-zero, one line, nothing committed, no partial log.
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0, f"the backup committed: the {full} medium never filled? " \
        f"{r.stdout}"
    assert len(lines) == 1 and lines[0].startswith("sdbackup: error: "), r.stderr
    assert "Traceback" not in r.stderr
    print(f"{mode}: backup exit {r.returncode}: {lines[0]}")  # shown with -s / on failure
    assert any(w in lines[0] for w in ("before image", "before-image", "is full")), lines[0]
    gens = json.loads(sdb("generations", "--medium", str(medium), "--json",
                          check=True).stdout)
    assert gens["generations"] == [], gens
    gdirs = list((medium / "generations").iterdir()) if (medium / "generations").exists() \
        else []
    for g in gdirs:
        assert {p.name for p in g.iterdir()} <= {"FAILED", ".lock"}, sorted(g.iterdir())
    # The generation is marked failed, with the reason (its data is gone).
    assert len(gdirs) == 1 and (gdirs[0] / "FAILED").exists(), gdirs
    assert _leftovers(medium, log_medium, cp.dir / "nodes") == []

    # The cluster goes on: not frozen, nobody fenced, nothing lost, every byte there.
    st = cp.status()
    assert not st["frozen"] and st["losses"] == []
    assert {n["name"]: n["state"] for n in st["nodes"] if n["kind"] == "node"} == \
        {"n1": "up", "n2": "up"}
    for res, other in zip(results, ("n2", "n1"), strict=True):
        for name, (size, digest) in res["files"].items():
            got = read_file_via(cp.dir, other, f"/{name}")
            assert (len(got), hashlib.sha256(got).hexdigest()) == (size, digest), name
    cp.assert_no_tracebacks()
    for text in (cp.coordinator_log(), cp.node_log("n1"), cp.node_log("n2")):
        bad = [ln for ln in text.splitlines() if "LOST" in ln or "fenced" in ln
               or "write-back of inode" in ln]
        assert bad == [], bad[:5]
