"""Issue 14: aggregate metadata and data throughput with 1, 2 and 4 nodes, and the
coordinator's CPU per operation (where the first bottleneck for 100 and 1,000 nodes
lies).

For each node count N: a fresh cluster (one sparse disk), a coordinator and N node
agents, each mounted with FUSE (``sdbackup node --mount``), exactly as users run them.
N worker processes, one per mount, run at the same time:

* **metadata** (mdtest-like): ``--files`` creates of empty files in the worker's own
  directory, then a ``stat`` of each, then an ``unlink`` of each; operations per
  second summed over the workers, per phase;
* **data**: each worker writes a ``--stream`` file sequentially in 1 MiB writes with an
  fsync at the end, then reads it back (page cache dropped in between): MiB/s summed.

The coordinator's CPU time (user + system, from ``/proc``) over each phase, divided by
the operations of the phase, is its cost per operation: 1 / that cost is the rate at
which one coordinator CPU saturates, whatever the number of nodes. A baseline from the
same run: the same metadata workload on ext4 on a loop device (one worker).

    python bench/scale.py                 # 1, 2, 4 nodes; 2,000 files, 256 MiB each
    python bench/scale.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from common import bench_dir, drop_caches, print_table  # noqa: E402

from sdbackup.cluster.launch import Proc, start_coordinator, start_node  # noqa: E402
from sdbackup.cluster.local import DiskSpec, init_cluster  # noqa: E402
from sdbackup.fs import fuse_mount  # noqa: E402

MiB = 1 << 20
PHASES = ("create", "stat", "unlink")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def meta_worker(root: str, files: int, phase: str, start: Any, out: Any) -> None:
    d = Path(root)
    names = [str(d / f"f{i:06d}") for i in range(files)]
    start.wait()
    t = time.perf_counter()
    if phase == "create":
        for n in names:
            os.close(os.open(n, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    elif phase == "stat":
        for n in names:
            os.stat(n)
    else:
        for n in names:
            os.unlink(n)
    out.put(time.perf_counter() - t)


def stream_worker(path: str, size: int, phase: str, start: Any, out: Any) -> None:
    start.wait()
    t = time.perf_counter()
    if phase == "write":
        buf = os.urandom(MiB)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for _ in range(size // MiB):
            os.write(fd, buf)
        os.fsync(fd)
        os.close(fd)
    else:
        with open(path, "rb", buffering=0) as f:
            b = bytearray(MiB)
            while f.readinto(b):
                pass
    out.put(time.perf_counter() - t)


def run_phase(target: Any, args_per_worker: list[tuple[Any, ...]], coord_pid: int | None
              ) -> tuple[float, float]:
    """Run the workers at once; (wall seconds of the slowest, coordinator CPU seconds)."""
    ctx = mp.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, start, out)) for a in args_per_worker]
    for p in procs:
        p.start()
    time.sleep(0.2)
    c0 = cpu_seconds(coord_pid) if coord_pid else 0.0
    start.set()
    times = [out.get(timeout=3600) for _ in procs]
    c1 = cpu_seconds(coord_pid) if coord_pid else 0.0
    for p in procs:
        p.join()
    return max(times), c1 - c0


@contextlib.contextmanager
def cluster(work: Path, nodes: int, size: int) -> Iterator[tuple[list[Path], int]]:
    cdir = work / f"c{nodes}"
    init_cluster(cdir, [DiskSpec.parse(f"d0={work}/d{nodes}.img:{size}")])
    coord = start_coordinator(cdir)
    agents: list[Proc] = []
    mps = [work / f"mnt{nodes}-{i}" for i in range(nodes)]
    try:
        for i, m in enumerate(mps):
            m.mkdir()
            agents.append(start_node(cdir, f"n{i}", extra=["--mount", str(m)]))
        for p, m in zip(agents, mps, strict=True):
            deadline = time.monotonic() + 30
            while not (fuse_mount.is_mounted(m) and os.stat(m).st_dev != os.stat(work).st_dev):
                if not p.alive() or time.monotonic() > deadline:
                    raise SystemExit(f"bench/scale.py: node did not mount {m}:\n{p.tail()}")
                time.sleep(0.05)
        yield mps, coord.pid
    finally:
        for p in agents:
            p.stop()
        coord.stop()


@contextlib.contextmanager
def ext4(work: Path) -> Iterator[Path]:
    img, mnt = work / "ext4.img", work / "ext4"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "2G", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="1,2,4")
    ap.add_argument("--files", type=int, default=2000, help="files per worker")
    ap.add_argument("--stream", default="256MiB", help="bytes per worker streamed")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.nodes, args.files, args.stream = "1,2", 300, "32MiB"
    from sdbackup.cluster.config import parse_size

    stream = parse_size(args.stream)
    counts = [int(x) for x in args.nodes.split(",")]
    rows: list[list[Any]] = []
    with bench_dir("sdbackup-bench-scale-") as work:
        with ext4(work) as mnt:
            (mnt / "w0").mkdir()
            base = {}
            for phase in PHASES:
                secs, _ = run_phase(meta_worker, [(str(mnt / "w0"), args.files, phase)], None)
                base[phase] = args.files / secs
            rows.append(["ext4 (loop), 1 worker"] + [f"{base[p]:,.0f}" for p in PHASES]
                        + ["", "", "", ""])
        for n in counts:
            with cluster(work, n, max(4 << 30, n * stream * 2)) as (mps, cpid):
                for m in mps:
                    (m / f"w-{m.name}").mkdir()
                rates, cpu_per_op = {}, {}
                for phase in PHASES:
                    secs, cpu = run_phase(meta_worker, [(str(m / f"w-{m.name}"), args.files,
                                                         phase) for m in mps], cpid)
                    ops = args.files * n
                    rates[phase] = ops / secs
                    cpu_per_op[phase] = cpu / ops
                secs_w, _ = run_phase(stream_worker, [(str(m / "s.bin"), stream, "write")
                                                          for m in mps], cpid)
                drop_caches()
                secs_r, _ = run_phase(stream_worker, [(str(m / "s.bin"), stream, "read")
                                                      for m in mps], cpid)
            total = stream * n / MiB
            per_op_us = sum(cpu_per_op.values()) / len(PHASES) * 1e6
            rows.append([f"sdbackup, {n} node(s), {n} worker(s)"]
                        + [f"{rates[p]:,.0f}" for p in PHASES]
                        + [f"{per_op_us:,.0f}", f"{1e6 / per_op_us:,.0f}",
                           f"{total / secs_w:,.0f}", f"{total / secs_r:,.0f}"])
    print_table(["setup", "creates/s", "stats/s", "unlinks/s", "coord CPU us/op",
                 "ops/s one coord CPU can serve", "write MiB/s", "read MiB/s"], rows)


if __name__ == "__main__":
    main()
