"""Issue 14: what the freeze at T0 costs on a fragmented disk with many files.

Builds an embedded cluster with ``--files`` files (one block each) and a disk whose
allocation bitmap holds ``--runs`` separate runs of used blocks (every other block
used: written straight into the bitmap's rows, since the freeze reads only the
bitmap; the backup's copy is not run). Then, ``--repeat`` times, it times what the
engine does inside the freeze:

* **snapshot**: the metadata store copied at T0 (SQLite's backup API, one step);
* **plan**: the used blocks as a ``BlockSet`` from the packed bitmap, in C
  (``MetadataReader.used_set``, what the engine uses);
* baseline, same run: the plan as the engine built it before issue 14, one Python
  tuple per run (``used_runs`` then ``BlockSet.from_runs``).

    python bench/freeze.py                       # 100,000 files, 1,000,000 runs
    python bench/freeze.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from common import bench_dir, print_table  # noqa: E402

from sdbackup.blocks.blockset import BlockSet  # noqa: E402
from sdbackup.cluster.local import DiskSpec, init_cluster, open_cluster  # noqa: E402
from sdbackup.meta.alloc import CHUNK_BYTES  # noqa: E402
from sdbackup.types import ROOT_INODE  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.files, args.runs, args.repeat = 5_000, 100_000, 3
    bs = 512
    nblocks = (args.runs * 2 + args.files * 2 + 4096 + 7) // 8 * 8
    with bench_dir("sdbackup-bench-freeze-") as work:
        cdir = work / "c"
        init_cluster(cdir, [DiskSpec.parse(f"d0={work}/d0.img:{nblocks * bs}")], block_size=bs)
        t = time.perf_counter()
        with open_cluster(cdir) as c:
            d = c.config.disks[0].id
            dirs = [c.fs.mkdir(ROOT_INODE, f"d{i:03d}".encode()).ino for i in range(100)]
            for i in range(args.files):
                ino = c.fs.create(dirs[i % 100], f"f{i:06d}".encode()).ino
                c.fs.write(ino, 0, b"x" * 100)
            log_build = time.perf_counter() - t
            # Fragment the free part of the disk: every other block used, in the bitmap.
            bm = c.meta.bitmaps[d]
            first = (nblocks - args.runs * 2) // 8 * 8
            bm.committed[first // 8:] |= np.uint8(0x55)
            bm.inuse[first // 8:] |= np.uint8(0x55)
            chunks = range(first // 8 // CHUNK_BYTES, len(bm.committed) // CHUNK_BYTES + 1)
            bm.dirty_chunks.update(chunks)
            with c.store.lock, c.store.transaction():
                bm.save_dirty(c.store)
            c.store.sync()
            snap, plan, old = [], [], []
            runs = 0
            for i in range(args.repeat):
                dest = work / f"snap-{i}.db"
                t = time.perf_counter()
                c.store.snapshot_to(dest)
                snap.append(time.perf_counter() - t)
                dest.unlink()
                t = time.perf_counter()
                used = c.meta.used_set(d)
                plan.append(time.perf_counter() - t)
                t = time.perf_counter()
                legacy = BlockSet.from_runs(np.asarray(c.meta.used_runs(d),
                                                       dtype=np.int64).reshape(-1, 2))
                old.append(time.perf_counter() - t)
                if legacy != used:
                    raise SystemExit("bench/freeze.py: the two plans differ")
                runs = used.num_runs()
            meta_bytes = sum(p.stat().st_size for p in cdir.glob("meta.db*"))
    med = statistics.median
    print(f"{args.files:,} files (built in {log_build:.1f} s), metadata store "
          f"{meta_bytes / 2**20:.1f} MiB; disk of {nblocks:,} blocks with {runs:,} used runs")
    print_table(["inside the freeze", "median ms", "min ms"], [
        ["metadata snapshot (SQLite backup)", f"{med(snap) * 1e3:.1f}", f"{min(snap) * 1e3:.1f}"],
        ["plan from the bitmap (C)", f"{med(plan) * 1e3:.1f}", f"{min(plan) * 1e3:.1f}"],
        ["baseline: plan run by run (before)", f"{med(old) * 1e3:.1f}",
         f"{min(old) * 1e3:.1f}"],
    ])
    total = med(snap) + med(plan)
    print(f"\nfreeze work (snapshot + plan): {total * 1e3:.0f} ms (target <= 100 ms plus the "
          f"write-back of dirty caches); plan {med(old) / med(plan):.0f}x faster than "
          "before")


if __name__ == "__main__":
    main()
