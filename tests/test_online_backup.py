"""Online backup with writers active on two node processes (issue 6).

The coordinator (a real process) runs the backup; two node agents (real processes)
keep overwriting, appending, truncating, deleting and creating files through their
write-back caches during the whole copy (slowed down by a test hook so that it
overlaps the writes). A test hook in the engine writes the exact T0 image while the
cluster is frozen; the restored images must equal it, block for block, in every log
mode, with and without overlay.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sdbackup.cluster.launch import Proc, start_coordinator, start_node

SDB = [sys.executable, "-m", "sdbackup.cli.main"]

WRITER = r"""
import os, random, sys, time
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
                fs.write(a.ino, off, rng.randbytes(rng.choice([512, 4096, 65536, 300000])))
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


@dataclass
class Cluster:
    dir: Path
    coord: Proc
    nodes: list[Proc]
    t0_dir: Path


def sdb(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*SDB, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"sdbackup {' '.join(args)} exited {r.returncode}:\n{r.stderr}")
    return r


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    cdir = tmp_path / "c"
    sdb("init", str(cdir), "--block-size", "1024",
        "--disk", f"d0={tmp_path}/d0.img:48MiB", "--disk", f"d1={tmp_path}/d1.img:48MiB")
    t0_dir = tmp_path / "t0"
    monkeypatch.setenv("SDBACKUP_TEST_T0_IMAGE_DIR", str(t0_dir))
    monkeypatch.setenv("SDBACKUP_TEST_COPY_DELAY", "0.25")
    coord = start_coordinator(cdir, lease=5.0)
    nodes: list[Proc] = []
    try:
        for n in ("n1", "n2"):
            nodes.append(start_node(cdir, n, cache_size="8MiB", flush_delay=0.2))
        yield Cluster(cdir, coord, nodes, t0_dir)
    finally:
        for p in nodes:
            p.kill()
        coord.stop()


def _seed(c: Cluster) -> None:
    data = c.dir.parent / "seed.bin"
    for i in range(12):
        data.write_bytes(os.urandom(3 << 20))
        sdb("fs", str(c.dir), "put", "--node", "n1", str(data), f"/f{i}")


def _writers(c: Cluster, stop: Path) -> list[subprocess.Popen[str]]:
    return [subprocess.Popen([sys.executable, "-c", WRITER, str(c.dir), n, str(i), str(stop)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i, n in enumerate(("n1", "n2"))]


def _stop(ws: list[subprocess.Popen[str]], stop: Path) -> list[int]:
    stop.touch()
    out = []
    for w in ws:
        so, se = w.communicate(timeout=60)
        assert w.returncode == 0, se
        out.append(int(so.strip()))
    return out


def _check_restores_t0(c: Cluster, medium: Path, gen: str, tag: str = "") -> None:
    for disk in ("d0", "d1"):
        img = c.dir.parent / f"restored-{gen}-{disk}{tag}.img"
        sdb("restore-image", "--medium", str(medium), gen, "--disk", disk, "--to", str(img))
        want = (c.t0_dir / gen / f"{disk}.img").read_bytes()
        got = img.read_bytes()
        assert len(got) == len(want)
        if got != want:
            bs = 1024
            bad = [i for i in range(0, len(want), bs) if got[i:i + bs] != want[i:i + bs]]
            raise AssertionError(f"{disk}: {len(bad)} blocks differ from T0, first "
                                 f"{[b // bs for b in bad[:10]]}")


def _check_log_apply(c: Cluster, medium: Path, gen: str, log_medium: Path) -> None:
    from sdbackup.media.generation import Generation, GenerationReader
    from sdbackup.media.record_format import Kind

    g = Generation.open(medium, gen)
    with GenerationReader(g) as reader:
        for d in g.manifest.disks:
            img = c.dir.parent / f"data-only-{d.name}.img"
            with open(img, "wb") as f:
                f.truncate(d.nblocks * g.block_size)
                for start, _count, data in reader.records(d.id, kind=int(Kind.DATA)):
                    f.seek(start * g.block_size)
                    f.write(data)
            want = (c.t0_dir / gen / f"{d.name}.img").read_bytes()
            out = sdb("log", "apply", "--log-medium", str(log_medium), "--to", str(img),
                      "--generation", gen, "--disk-id", str(d.id)).stdout
            assert "applied" in out
            assert img.read_bytes() == want, f"log apply did not bring {d.name} to T0"


@pytest.mark.parametrize("mode", ["merged", "central", "inline", "separate"])
def test_online_backup_restores_t0(cluster: Cluster, tmp_path: Path, mode: str) -> None:
    _seed(cluster)
    stop = tmp_path / "stop"
    ws = _writers(cluster, stop)
    time.sleep(1.0)  # the writers are busy and the caches dirty
    medium = tmp_path / "m"
    extra = ["--log-medium", str(tmp_path / "lm")] if mode == "separate" else []
    r = sdb("backup", str(cluster.dir), "--medium", str(medium), "--log-mode", mode,
            "--compress", "none", "--json", *extra)
    time.sleep(0.5)  # writes go on after the backup too
    ops = _stop(ws, stop)
    s = json.loads(r.stdout)
    assert min(ops) > 20, f"writers barely ran: {ops}"
    assert s["log"]["mode"] == mode
    assert s["log"]["blocks"] > 0, "no write needed a before image: the test proves nothing"
    assert s["freeze_seconds"] < 5
    gen = s["generation"]
    assert "OK" in sdb("verify", "--medium", str(medium), gen).stdout
    _check_restores_t0(cluster, medium, gen)
    if mode == "separate":
        # The log medium alone brings a data-only image back to T0 (a.7: its records
        # say where they go): 'sdbackup log apply'.
        _check_log_apply(cluster, medium, gen, tmp_path / "lm")
        # Not overlaid: the restore read the log medium first. Overlay it, then restore
        # with the log medium gone.
        sdb("overlay", "--medium", str(medium), gen)
        (tmp_path / "lm").rename(tmp_path / "lm-gone")
        _check_restores_t0(cluster, medium, gen, "-overlaid")
        assert "OK" in sdb("verify", "--medium", str(medium), gen).stdout
