"""Issue 14: metadata through a mount, call by call, against ext4 on a loop device.

Two file systems in one run: ext4 on a loop device over a sparse image, and a fresh
cluster (one sparse disk) with its coordinator and one node agent as processes, the
node mounted with FUSE (``sdbackup node --mount``), exactly as users run them. On each:

* **per call** (``--calls`` of each, one process, one directory the node holds): the
  median and 90th percentile of ``stat``, ``chmod``, ``utime``, ``mkdir``, ``unlink``
  and ``create`` (open with O_CREAT|O_EXCL, write 4 KiB, close) -- the targets are a
  median of at most 0.5 ms each on the mount;
* **creates per second**: ``--files`` files of 4 KiB created and closed in a row
  (target: 2,000 per second per node);
* **cp -a** of the common data set's small files (``../shared/bench/gen_dataset.py``,
  ``--scale``: 1.0 is its 20,000 small files), from a local directory onto each file
  system, page cache dropped first (target: at most 5 x ext4).

    python bench/metadata.py                  # 1,000 calls, 5,000 files, scale 0.1
    python bench/metadata.py --scale 1.0      # the whole data set's small files
    python bench/metadata.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

import scale  # noqa: E402
from common import bench_dir, drop_caches, print_table  # noqa: E402

GEN_DATASET = Path(__file__).resolve().parent.parent.parent / "shared" / "bench" / "gen_dataset.py"
OPS = ("stat", "chmod", "utime", "mkdir", "unlink", "create")
DATA = b"x" * 4096


def per_call(root: Path, calls: int) -> dict[str, tuple[float, float]]:
    """(median, p90) in ms of each operation, ``calls`` times each, in ``root``."""
    d = root / "calls"
    d.mkdir()
    f = d / "f"
    f.write_bytes(DATA)
    for i in range(calls):
        (d / f"u{i}").write_bytes(b"")
    ops: dict[str, Callable[[int], None]] = {
        "stat": lambda i: os.stat(f),
        "chmod": lambda i: os.chmod(f, 0o600 if i % 2 else 0o644),
        "utime": lambda i: os.utime(f, (i, i)),
        "mkdir": lambda i: os.mkdir(d / f"m{i}"),
        "unlink": lambda i: os.unlink(d / f"u{i}"),
        "create": lambda i: create(d / f"c{i}"),
    }
    out = {}
    for name in OPS:
        fn = ops[name]
        for i in range(min(20, calls)):  # warm: the directory's names are looked up
            if name in ("stat", "chmod", "utime"):
                fn(i)
        lat = []
        for i in range(calls):
            t = time.perf_counter()
            fn(i)
            lat.append(time.perf_counter() - t)
        lat.sort()
        out[name] = (statistics.median(lat) * 1e3, lat[int(0.9 * (len(lat) - 1))] * 1e3)
    return out


def create(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, DATA)
    finally:
        os.close(fd)


def creates_per_second(root: Path, files: int) -> float:
    d = root / "creates"
    d.mkdir()
    t = time.perf_counter()
    for i in range(files):
        create(d / f"f{i:06d}")
    return files / (time.perf_counter() - t)


def cp_a(src: Path, root: Path) -> float:
    drop_caches()
    t = time.perf_counter()
    subprocess.run(["cp", "-a", str(src), str(root / "copy")], check=True)
    return time.perf_counter() - t


def measure(root: Path, args: argparse.Namespace, small: Path) -> dict[str, object]:
    return {"calls": per_call(root, args.calls), "creates": creates_per_second(root, args.files),
            "cp": cp_a(small, root)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=1000, help="calls of each operation")
    ap.add_argument("--files", type=int, default=5000, help="files for creates per second")
    ap.add_argument("--scale", type=float, default=0.1, help="data set scale for cp -a")
    ap.add_argument("--quick", action="store_true", help="200 calls, 500 files, scale 0.01")
    args = ap.parse_args()
    if args.quick:
        args.calls, args.files, args.scale = 200, 500, 0.01
    with bench_dir("sdbackup-bench-metadata-") as work:
        data = work / "dataset"
        subprocess.run([sys.executable, str(GEN_DATASET), str(data), "--scale", str(args.scale)],
                       check=True, capture_output=True)
        small = data / "small"
        nfiles = sum(len(fs) for _, _, fs in os.walk(small))
        nbytes = sum(p.stat().st_size for p in small.rglob("*") if p.is_file())
        with scale.ext4(work) as mnt:
            base = measure(mnt, args, small)
        with scale.cluster(work, 1, 8 << 30) as (mps, _):
            fuse = measure(mps[0], args, small)
    rows = []
    for op in OPS:
        (bm, bp), (fm, fp) = base["calls"][op], fuse["calls"][op]  # type: ignore[index]
        rows.append([f"{op} (median / p90 ms)", f"{bm:.3f} / {bp:.3f}", f"{fm:.3f} / {fp:.3f}",
                     f"{fm / bm:.1f}x", "median <= 0.5 ms",
                     "met" if fm <= 0.5 else f"missed ({fm / 0.5:.1f}x)"])
    bc, fc = float(base["creates"]), float(fuse["creates"])  # type: ignore[arg-type]
    rows.append(["creates of 4 KiB per second", f"{bc:,.0f}", f"{fc:,.0f}", f"{bc / fc:.1f}x",
                 ">= 2,000/s", "met" if fc >= 2000 else f"missed ({2000 / fc:.1f}x)"])
    bt, ft = float(base["cp"]), float(fuse["cp"])  # type: ignore[arg-type]
    rows.append([f"cp -a of {nfiles:,} small files ({nbytes / 1e6:,.0f} MB), s",
                 f"{bt:.2f}", f"{ft:.2f}", f"{ft / bt:.1f}x", "<= 5x ext4",
                 "met" if ft <= 5 * bt else f"missed ({ft / bt / 5:.1f}x)"])
    print_table(["", "ext4 (loop)", "sdbackup mount", "mount / ext4", "target", ""], rows)


if __name__ == "__main__":
    main()
