"""Issue 13: reading a backup through ``sdbackup mount`` against the live mount, a
restore, ``restic mount`` and ``borg mount``.

One invocation, in a scratch directory on the real disk:

1. a cluster (one sparse disk, 4 KiB blocks) holding one ``--size`` file of random
   bytes, written through the embedded cluster; a full backup (zstd:1), then
   ``--chain - 1`` incrementals, each after rewriting ``--change`` bytes at random
   places of the file: a chain of ``--chain`` generations;
2. **first byte**: ``sdbackup mount --background`` of the newest generation (page cache
   dropped) until the first byte of the file is read, repeated ``--runs`` times;
3. **sequential read** of the whole file in 1 MiB reads, page cache dropped before
   each run, through: the backup mount (newest generation, so through the chain), a
   live node mount of the same cluster (``sdbackup coordinator`` + ``sdbackup node
   --mount``), ``sdbackup restore`` of the file into a directory (its time includes
   the write), ``restic mount`` and ``borg mount`` of repositories holding the same
   file (the restic and borg repositories are made from a copy of the file on the
   local disk);
4. **random 4 KiB reads** (``--random`` of them at random aligned offsets, one
   ``pread`` each, page cache dropped first): median and p99 latency, backup mount
   against the live mount.

Runs alternate between the readers; the table shows medians and ratios against the
live mount (and, for the peers, sdbackup's rate over theirs).

    python bench/mount.py                 # 1 GiB, 30 generations, 3 runs (root)
    python bench/mount.py --quick         # a smoke run: 64 MiB, 5 generations, 1 run
    python bench/mount.py --json

Needs root (drop_caches, FUSE with allow_other), /dev/fuse, pyfuse3; restic and borg
when present.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from common import bench_dir, drop_caches, fmt_size, machine_info, print_table  # noqa: E402

from sdbackup.backup.engine import BackupOptions, run_backup  # noqa: E402
from sdbackup.cluster.backup_source import LocalClusterSource  # noqa: E402
from sdbackup.cluster.config import parse_size  # noqa: E402
from sdbackup.cluster.launch import start_coordinator, start_node  # noqa: E402
from sdbackup.cluster.local import DiskSpec, init_cluster, open_cluster  # noqa: E402
from sdbackup.fs import fuse_mount  # noqa: E402
from sdbackup.types import ROOT_INODE  # noqa: E402

MiB = 1 << 20
SDB = [sys.executable, "-m", "sdbackup"]
NAME = "big.bin"


def log(msg: str) -> None:
    print(f"[mount] {msg}", file=sys.stderr, flush=True)


def sh(*args: object, env: dict[str, str] | None = None, check: bool = True
       ) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, check=False)
    if check and r.returncode != 0:
        raise SystemExit(f"bench/mount.py: {' '.join(map(str, args))} failed:\n{r.stderr}")
    return r


def wait_for(pred: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench/mount.py: timed out waiting for {what}")
        time.sleep(0.01)


def mounted(mp: Path) -> bool:
    return fuse_mount.is_mounted(mp) or os.path.ismount(mp)


# -- building the chain ---------------------------------------------------------------------
def build(work: Path, size: int, chain: int, change: int, seed: int) -> tuple[Path, Path]:
    rng = random.Random(seed)
    cdir, medium = work / "cluster", work / "medium"
    init_cluster(cdir, [DiskSpec.parse(f"d0={work}/d0.img:{size * 2 + (256 << 20)}")])
    block = rng.randbytes(8 * MiB)
    with open_cluster(cdir) as c:
        ino = c.fs.create(ROOT_INODE, NAME.encode()).ino
        for off in range(0, size, 8 * MiB):
            n = min(8 * MiB, size - off)
            # Different bytes in every 8 MiB (incompressible, no repeats to dedupe).
            c.fs.write(ino, off, (off // (8 * MiB)).to_bytes(8, "little") + block[8:n])
        c.fs.fsync(ino)
        opts = BackupOptions(compression="zstd", level=1)
        t = time.perf_counter()
        run_backup(LocalClusterSource(c), medium, opts)
        log(f"full backup of {fmt_size(size)}: {time.perf_counter() - t:.1f} s")
        inc = BackupOptions(compression="zstd", level=1, incremental=True)
        for _ in range(chain - 1):
            left = change
            while left > 0:
                n = min(left, 256 << 10)
                off = rng.randrange(0, size - n) & ~4095
                c.fs.write(ino, off, rng.randbytes(n))
                left -= n
            run_backup(LocalClusterSource(c), medium, inc)
        if chain > 1:
            log(f"{chain - 1} incrementals of {fmt_size(change)} each")
    return cdir, medium


@contextlib.contextmanager
def backup_mount(medium: Path, mp: Path) -> Iterator[float]:
    """Mount the newest generation; yields the seconds the mount command took."""
    t = time.perf_counter()
    sh(*SDB, "mount", "--medium", medium, mp, "--background", "--log-file",
       mp.parent / "mount.log")
    took = time.perf_counter() - t
    try:
        yield took
    finally:
        sh(*SDB, "umount", mp, check=False)


@contextlib.contextmanager
def live_mount(cdir: Path, mp: Path) -> Iterator[None]:
    coord = start_coordinator(cdir)
    node = None
    try:
        node = start_node(cdir, "bench", extra=["--mount", str(mp)])
        wait_for(lambda: mounted(mp) and (mp / NAME).exists(), "the live mount")
        yield
    finally:
        if node is not None:
            node.stop()
        coord.stop()


@contextlib.contextmanager
def peer_mount(cmd: list[str], mp: Path, env: dict[str, str], find: Callable[[], Path | None]
               ) -> Iterator[Path]:
    """restic mount / borg mount --foreground as a process; yields the file's path."""
    p = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        found: list[Path] = []

        def ready() -> bool:
            if p.poll() is not None:
                raise SystemExit(f"bench/mount.py: {' '.join(cmd)} exited: {p.stderr.read()}"
                                 if p.stderr else "exited")
            f = find() if mounted(mp) else None
            if f is not None:
                found.append(f)
            return bool(found)

        wait_for(ready, " ".join(cmd[:2]))
        yield found[0]
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
        sh("fusermount3", "-u", mp, check=False)


def _find(root: Path, name: str) -> Path | None:
    for dirpath, _dirs, names in os.walk(root):
        if name in names:
            return Path(dirpath) / name
    return None


# -- the reads ------------------------------------------------------------------------------
def seq_read(path: Path, size: int) -> float:
    buf = bytearray(MiB)
    t = time.perf_counter()
    got = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            got += n
    took = time.perf_counter() - t
    if got != size:
        raise SystemExit(f"bench/mount.py: read {got} bytes of {path}, expected {size}")
    return took


def first_byte(medium: Path, mp: Path) -> tuple[float, float]:
    drop_caches()
    t = time.perf_counter()
    with backup_mount(medium, mp) as took:
        with open(mp / NAME, "rb", buffering=0) as f:
            if len(f.read(1)) != 1:
                raise SystemExit("bench/mount.py: the first byte did not come")
        return took, time.perf_counter() - t


def random_reads(path: Path, size: int, count: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    offs = [rng.randrange(0, size // 4096) * 4096 for _ in range(count)]
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offs:
            t = time.perf_counter()
            os.pread(fd, 4096, off)
            out.append(time.perf_counter() - t)
    finally:
        os.close(fd)
    return out


def p99(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * 0.99))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--chain", type=int, default=30, help="generations in the chain")
    ap.add_argument("--change", default="8MiB", help="bytes rewritten per incremental")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--random", type=int, default=2000, help="random 4 KiB reads per run")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-peers", action="store_true", help="skip restic and borg")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.size, args.chain, args.change, args.runs, args.random = "64MiB", 5, "1MiB", 1, 300
    size, change = parse_size(args.size), parse_size(args.change)
    fuse_mount.check_fuse()
    res: dict[str, Any] = {"machine": machine_info(), "size": size, "chain": args.chain,
                           "change_per_generation": change, "runs": args.runs}
    times: dict[str, list[float]] = {}
    lat: dict[str, list[float]] = {}
    with bench_dir("sdbackup-bench-mount-", keep=args.keep) as work:
        cdir, medium = build(work, size, args.chain, change, 1)
        mps = {k: work / f"mnt-{k}" for k in ("backup", "live", "restic", "borg")}
        for mp in mps.values():
            mp.mkdir()
        # peers' repositories, from a copy of the file on the local disk
        peers: dict[str, Callable[[], contextlib.AbstractContextManager[Path]]] = {}
        if not args.no_peers:
            plain = work / "plain"
            plain.mkdir()
            sh(*SDB, "restore", "--medium", medium, "--to", plain / "r", f"/{NAME}")
            data = plain / "r" / NAME
            if shutil.which("restic"):
                renv = {"RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(work / "rc")}
                sh("restic", "init", "-q", "-r", work / "restic", env=renv)
                sh("restic", "backup", "-q", "-r", work / "restic", data, env=renv)
                peers["restic mount"] = lambda: peer_mount(
                    ["restic", "-r", str(work / "restic"), "mount", str(mps["restic"])],
                    mps["restic"], renv, lambda: _find(mps["restic"] / "snapshots" / "latest",
                                                       NAME))
            if shutil.which("borg"):
                benv = {"BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                        "BORG_BASE_DIR": str(work / "bb")}
                sh("borg", "init", "-e", "none", work / "borg", env=benv)
                sh("borg", "create", "--compression", "zstd,1", f"{work / 'borg'}::a", data,
                   env=benv)
                peers["borg mount"] = lambda: peer_mount(
                    ["borg", "mount", "--foreground", f"{work / 'borg'}::a", str(mps["borg"])],
                    mps["borg"], benv, lambda: _find(mps["borg"], NAME))
            shutil.rmtree(plain)
        log("built; measuring")
        fb: list[tuple[float, float]] = []
        for run in range(args.runs):
            fb.append(first_byte(medium, mps["backup"]))
            with backup_mount(medium, mps["backup"]):
                drop_caches()
                times.setdefault("backup mount", []).append(seq_read(mps["backup"] / NAME, size))
                drop_caches()
                lat.setdefault("backup mount", []).extend(
                    random_reads(mps["backup"] / NAME, size, args.random, run))
            with live_mount(cdir, mps["live"]):
                drop_caches()
                times.setdefault("live mount", []).append(seq_read(mps["live"] / NAME, size))
                drop_caches()
                lat.setdefault("live mount", []).extend(
                    random_reads(mps["live"] / NAME, size, args.random, run))
            out = work / f"restored-{run}"
            drop_caches()
            t = time.perf_counter()
            sh(*SDB, "restore", "--medium", medium, "--to", out, f"/{NAME}")
            os.sync()
            times.setdefault("sdbackup restore", []).append(time.perf_counter() - t)
            shutil.rmtree(out)
            for name, mk in peers.items():
                with mk() as path:
                    drop_caches()
                    times.setdefault(name, []).append(seq_read(path, size))
            log(f"run {run + 1}/{args.runs} done")
    med = {k: statistics.median(v) for k, v in times.items()}
    live = med["live mount"]
    rows = []
    for k, v in med.items():
        rate = size / v / MiB
        vs_peer = ""
        if k in peers:
            vs_peer = f"{v / med['backup mount']:.1f}x"
        rows.append([k, f"{v:.2f}", f"{rate:,.0f}", f"{live / v:.2f}", vs_peer])
    print_table(["sequential read of the file", "seconds", "MiB/s", "rate vs live mount",
                 "backup mount is faster by"], rows)
    print()
    fb_mount = statistics.median(x[0] for x in fb)
    fb_first = statistics.median(x[1] for x in fb)
    print(f"first byte on a {args.chain}-generation chain: mount command {fb_mount:.2f} s, "
          f"mount + open + first byte {fb_first:.2f} s (median of {len(fb)})")
    rows = [[k, f"{statistics.median(v) * 1e3:.2f}", f"{p99(v) * 1e3:.2f}", len(v)]
            for k, v in lat.items()]
    print_table(["random 4 KiB pread", "median ms", "p99 ms", "reads"], rows)
    res.update(seconds=times, medians=med, first_byte={"mount": fb_mount, "first": fb_first},
               random_ms={k: {"median": statistics.median(v) * 1e3, "p99": p99(v) * 1e3}
                          for k, v in lat.items()})
    ratio = live / med["backup mount"]
    print(f"\nbackup mount / live mount rate: {ratio:.2f} (target >= 0.8); first byte "
          f"{fb_first:.2f} s (target <= 1 s)")
    for k in peers:
        print(f"backup mount vs {k}: {med[k] / med['backup mount']:.1f}x faster (target >= 3x)")
    if args.json:
        print(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
