"""Issue 4: throughput through a node's FUSE mount against a local ext4 file system.

One invocation measures, in a scratch directory on the real disk:

- **local**: ext4 on a loop device (a sparse image file next to the cluster's disks;
  tmpfs when loop devices are unavailable, and the output says so);
- **fuse**: a fresh cluster (one sparse disk, 4 KiB blocks), its coordinator and one
  node agent as processes (``sdbackup coordinator``, ``sdbackup node --mount``),
  exactly as a user runs them.

On each: a ``--size`` file written sequentially in ``--request`` writes, then fsync
(the time includes it: the data is on the disk, not in a cache); the page cache
dropped (root); the file read back sequentially in ``--request`` reads (every request
checked); then ``--files`` small files created (open, write ``--small`` bytes, close;
one ``sync`` at the end) in 20 directories. Runs alternate local, fuse, local, ...
(``--runs`` each); the table shows medians and fuse/local ratios.

    python bench/fuse.py                      # 1 GiB, 20,000 files, 3 runs each (root)
    python bench/fuse.py --quick              # a smoke run
    python bench/fuse.py --json               # machine-readable
    python bench/fuse.py --profile DIR        # py-spy of node and coordinator, fuse runs

Needs root (loop device, mount, drop_caches), /dev/fuse and pyfuse3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from common import drop_caches  # noqa: E402 - bench/ is the script's directory

from sdbackup.cluster.config import parse_size  # noqa: E402
from sdbackup.cluster.launch import Proc, start_coordinator, start_node  # noqa: E402
from sdbackup.fs import fuse_mount  # noqa: E402

MiB = 1 << 20
TARGET_RATIO = 0.5
SDB = [sys.executable, "-m", "sdbackup.cli.main"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(*args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)
    if check and r.returncode:
        raise SystemExit(f"bench/fuse.py: {' '.join(map(str, args))}: {r.stderr.strip()}")
    return r



@contextlib.contextmanager
def local_fs(scratch: Path, size: int) -> Iterator[tuple[Path, str]]:
    """ext4 on a loop device over a sparse file in ``scratch`` (or tmpfs, said so)."""
    mp = scratch / "local"
    mp.mkdir()
    img = scratch / "local.img"
    with open(img, "wb") as f:
        f.truncate(size)
    loop = run("losetup", "--find", "--show", img, check=False)
    if loop.returncode == 0:
        dev = loop.stdout.strip()
        try:
            run("mkfs.ext4", "-q", "-F", dev)
            run("mount", dev, mp)
            try:
                yield mp, f"ext4 on loop device {dev} (sparse image on the host disk)"
            finally:
                run("umount", mp, check=False)
        finally:
            run("losetup", "-d", dev, check=False)
        return
    log(f"loop device unavailable ({loop.stderr.strip()}): using tmpfs instead")
    run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mp)
    try:
        yield mp, "tmpfs (loop devices unavailable: memory, not a disk)"
    finally:
        run("umount", mp, check=False)


@contextlib.contextmanager
def fuse_fs(scratch: Path, size: int, profile: Path | None
            ) -> Iterator[tuple[Path, str, list[Proc]]]:
    cdir = scratch / "cluster"
    run(*SDB, "init", cdir, "--disk", f"d0={scratch}/d0.img:{size}")
    mp = scratch / "mnt"
    mp.mkdir()
    coord = start_coordinator(cdir)
    node: Proc | None = None
    try:
        node = start_node(cdir, "bench", extra=["--mount", str(mp)])
        deadline = time.monotonic() + 30
        while not (fuse_mount.is_mounted(mp) and os.stat(mp).st_dev != os.stat(scratch).st_dev):
            if not node.alive() or time.monotonic() > deadline:
                raise SystemExit(f"bench/fuse.py: the node did not mount {mp}:\n{node.tail()}")
            time.sleep(0.05)
        yield mp, "sdbackup node --mount (pyfuse3), 1 node, 4 KiB blocks", [coord, node]
    finally:
        if node is not None:
            node.stop()
        coord.stop()


@contextlib.contextmanager
def profiling(procs: list[Proc], out: Path | None, tag: str) -> Iterator[None]:
    """py-spy record of each process while the block runs (when asked and installed)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if out is None or not os.path.exists(spy):
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    spies = []
    for p in procs:
        name = p.args[0] + ("-" + p.args[3] if p.args[0] == "node" else "")
        dest = out / f"{tag}-{name}.txt"
        spies.append(subprocess.Popen([spy, "record", "-p", str(p.pid), "-r", "200", "-f",
                                       "raw", "-o", str(dest), "--nonblocking"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(0.5)
    try:
        yield
    finally:
        for s in spies:
            s.send_signal(signal.SIGINT)
        for s in spies:
            s.wait(timeout=60)


# -- the workloads -----------------------------------------------------------------------
def _block(i: int, request: int, seed: bytes) -> bytes:
    return i.to_bytes(8, "little") + seed[8:request]


def seq_write(path: Path, size: int, request: int, seed: bytes) -> float:
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(size // request):
            os.write(fd, _block(i, request, seed))
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t


def seq_read(path: Path, size: int, request: int) -> float:
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        i = 0
        while True:
            b = os.read(fd, request)
            if not b:
                break
            if b[:8] != i.to_bytes(8, "little"):
                raise SystemExit(f"bench/fuse.py: {path} read back wrong data at request {i}")
            i += 1
    finally:
        os.close(fd)
    if i * request != size:
        raise SystemExit(f"bench/fuse.py: {path}: read {i} requests, expected "
                         f"{size // request}")
    return time.perf_counter() - t


def small_files(root: Path, count: int, size: int) -> float:
    data = os.urandom(size)
    dirs = 20
    t = time.perf_counter()
    for d in range(dirs):
        os.mkdir(root / f"d{d:02d}")
    for i in range(count):
        fd = os.open(root / f"d{i % dirs:02d}" / f"f{i:06d}", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    os.sync()
    return time.perf_counter() - t


def one_run(mp: Path, args: argparse.Namespace, seed: bytes, dropped: list[bool]
            ) -> dict[str, float]:
    big = mp / "big"
    w = seq_write(big, args.size, args.request, seed)
    dropped.append(drop_caches())
    r = seq_read(big, args.size, args.request)
    os.unlink(big)
    work = mp / "small"
    work.mkdir()
    s = small_files(work, args.files, args.small)
    shutil.rmtree(work)
    return {"write_mbs": args.size / w / 1e6, "read_mbs": args.size / r / 1e6,
            "files_per_s": args.files / s, "write_s": w, "read_s": r, "files_s": s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB", help="sequential file size")
    ap.add_argument("--request", default="1MiB", help="request size of reads and writes")
    ap.add_argument("--files", type=int, default=20_000, help="small files to create")
    ap.add_argument("--small", type=int, default=4096, help="bytes per small file")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="128 MiB, 1,000 files, 1 run")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="record py-spy profiles of the node and coordinator (fuse runs)")
    ap.add_argument("--dir", type=Path, default=Path(os.environ.get("SDBACKUP_BENCH_DIR",
                                                                     "/var/tmp")),
                    help="where to put the scratch directory (a real disk, not tmpfs)")
    args = ap.parse_args()
    if args.quick:
        args.size, args.files, args.runs = "128MiB", 1000, 1
    args.size = parse_size(args.size)
    args.request = parse_size(args.request)
    if os.getuid() != 0:
        raise SystemExit("bench/fuse.py: needs root (loop device, mount, drop_caches)")
    fuse_mount.check_fuse()
    seed = os.urandom(args.request)
    scratch = Path(tempfile.mkdtemp(prefix="sdbackup-bench-fuse-", dir=args.dir))
    image = args.size * 3
    results: dict[str, list[dict[str, float]]] = {"local": [], "fuse": []}
    dropped: list[bool] = []
    load0 = os.getloadavg()
    try:
        with local_fs(scratch, image) as (lmp, local_kind), \
                fuse_fs(scratch, image, args.profile) as (fmp, fuse_kind, procs):
            for i in range(args.runs):
                for name, mp in (("local", lmp), ("fuse", fmp)):
                    log(f"run {i + 1}/{args.runs}: {name} ...")
                    spy = args.profile if name == "fuse" else None
                    with profiling(procs, spy, f"run{i + 1}"):
                        res = one_run(mp, args, seed, dropped)
                    results[name].append(res)
                    log(f"  write {res['write_mbs']:.0f} MB/s, read {res['read_mbs']:.0f} "
                        f"MB/s, {res['files_per_s']:.0f} files/s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    summary: dict[str, Any] = {
        "size": args.size, "request": args.request, "files": args.files,
        "small": args.small, "runs": args.runs, "local": local_kind, "fuse": fuse_kind,
        "caches_dropped": all(dropped), "cpus": os.cpu_count(),
        "kernel": platform.release(), "load_before": [round(x, 2) for x in load0],
        "load_after": [round(x, 2) for x in os.getloadavg()], "runs_detail": results,
        "target_ratio": TARGET_RATIO,
    }
    rows = []
    for key, label, unit in (("write_mbs", "sequential write + fsync", "MB/s"),
                             ("read_mbs", "sequential read (cold cache)", "MB/s"),
                             ("files_per_s", f"create {args.files} x {args.small} B files",
                              "files/s")):
        lo, fu = med("local", key), med("fuse", key)
        summary[key] = {"local": lo, "fuse": fu, "ratio": fu / lo}
        rows.append((label, f"{lo:,.0f} {unit}", f"{fu:,.0f} {unit}", f"{fu / lo:.2f}"))
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"fuse vs local, {args.size >> 20} MiB file in {args.request >> 10} KiB requests, "
          f"median of {args.runs} runs; local = {local_kind}; caches dropped before reads: "
          f"{'yes' if summary['caches_dropped'] else 'NO'}; {os.cpu_count()} CPUs, load "
          f"{load0[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"{'':<{w[0]}}  {'local':>{w[1]}}  {'fuse':>{w[2]}}  ratio")
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>5}")
    seq = min(summary["write_mbs"]["ratio"], summary["read_mbs"]["ratio"])
    print(f"target: sequential >= {TARGET_RATIO} of local: "
          f"{'met' if seq >= TARGET_RATIO else 'NOT met'} (lowest ratio {seq:.2f})")


if __name__ == "__main__":
    main()
