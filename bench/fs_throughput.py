"""Issue 2: file system throughput against the raw disk, and small-file creation rate.

One invocation measures, on a scratch directory on the real disk (see
``bench/common.py``):

- **raw**: a sparse disk file like the cluster's (``--disk-size``), opened with
  ``O_DIRECT`` as the cluster opens its shared disks, ``--size`` bytes
  written sequentially with ``os.pwrite`` in ``--request`` pieces from the byte where
  the fs puts its first data block (just after the disk label), then ``fsync``; page
  cache dropped; read back sequentially with ``os.pread``. Same offsets, because on
  the test VM page-cache writes at 2 MiB-aligned offsets were 2-4x slower than at
  4 KiB ones (``--raw-offset 0`` shows it);
- **fs**: a fresh cluster (one sparse disk of ``--disk-size``, 4 KiB blocks) opened
  with its embedded coordinator; one file of ``--size`` bytes written through
  :meth:`FileSystem.write` in ``--request`` pieces, then :meth:`FileSystem.fsync`;
  page cache dropped; read back through :meth:`FileSystem.read`; then ``--files``
  files of 4 KiB created (create + write each, one fsync at the end).

Runs alternate raw, fs, raw, fs, ... (``--runs`` of each) so that drift of a noisy
machine hits both sides alike; the table shows medians and the fs/raw ratios.
Write times include the final fsync (the data is on the disk, not just in the page
cache). Dropping the page cache needs root: the output says whether it happened.
Every timed phase of both sides starts with a drop and a ``--settle`` pause. Each
phase also reports this process's CPU time, steadier than the wall clock when other
work shares the machine.

    python bench/fs_throughput.py                 # 1 GiB, 20,000 files, 3 runs each
    python bench/fs_throughput.py --quick         # a smoke run in seconds
    python bench/fs_throughput.py --json          # machine-readable
    python bench/fs_throughput.py --profile       # one fs run under pyinstrument
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    KiB,
    MiB,
    Timer,
    bench_dir,
    disk_backed_dir,
    drop_caches,
    emit_json,
    fmt_rate,
    fmt_size,
    fs_type,
    machine_info,
    maybe_profile,
    median,
    parse_size,
    print_table,
    runs_summary,
)

from sdbackup.blocks.label import LABEL_BLOCKS
from sdbackup.cluster.local import DiskSpec, init_cluster, open_cluster
from sdbackup.types import ROOT_INODE

TARGET_RATIO = 0.7
TARGET_FILES_PER_S = 2000
BLOCK_SIZE = 4096
SMALL_FILE = 4 * KiB
_PATTERNS = 16  # distinct request buffers, so that misplaced data is detected


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _buffers(request: int) -> list[bytes]:
    seed = os.urandom(request)
    # Distinct contents per buffer index, without 16 x urandom(request).
    return [i.to_bytes(8, "little") + seed[8:] for i in range(_PATTERNS)]


def _aligned(bufs: list[bytes]) -> list[mmap.mmap]:
    """The same contents in page-aligned memory: what a program doing direct I/O
    writes from. Both sides write from these, so neither pays a copy the other does
    not (with unaligned buffers the fs copies each write into an aligned one)."""
    out = []
    for b in bufs:
        m = mmap.mmap(-1, len(b))
        m[:] = b
        out.append(m)
    return out


def _check(got: bytes, want: bytes, what: str, off: int) -> None:
    if got != want:
        raise SystemExit(f"fs_throughput: {what} read back wrong data at byte {off}")


# -- raw baseline ------------------------------------------------------------------------------
def _cold(settle: float) -> bool:
    """Drop the page cache, then let the machine settle; True if the drop worked.

    The settle pause is the same before every timed phase of both sides: on this VM
    (free page reporting to the host) the cost of allocating page-cache memory depends
    on how long ago memory was freed, which would otherwise favour whichever side
    happens to start right after a cleanup.
    """
    dropped = drop_caches()
    if settle > 0:
        time.sleep(settle)
    return dropped


def run_raw(work: Path, size: int, request: int, disk_size: int, base: int,
            bufs: list[bytes], settle: float) -> dict[str, Any]:
    """The baseline: the same I/O straight on a disk file like the cluster's (a sparse
    file of ``disk_size``), at byte ``base`` onwards, where the fs puts the data, with
    the same direct I/O the cluster uses on its shared disks (``O_DIRECT`` from
    page-aligned buffers, then one ``fsync``)."""
    path = work / "raw.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_DIRECT,
                 0o600)
    aligned = _aligned(bufs)
    rbuf = mmap.mmap(-1, request)
    try:
        os.ftruncate(fd, disk_size)
        os.fsync(fd)
        dropped = _cold(settle)
        with Timer() as tw:
            for i, off in enumerate(range(base, base + size, request)):
                os.pwrite(fd, aligned[i % _PATTERNS], off)
            os.fsync(fd)
        dropped = _cold(settle) and dropped
        with Timer() as tr:
            for off in range(base, base + size, request):
                os.preadv(fd, [rbuf], off)
        last = (size - 1) // request
        _check(bytes(rbuf), bufs[last % _PATTERNS], "raw", last * request)
    finally:
        os.close(fd)
        path.unlink()
        for m in aligned:
            m.close()
        rbuf.close()
    return {"write_s": tw.seconds, "read_s": tr.seconds, "dropped": dropped,
            "write_cpu_s": tw.cpu, "read_cpu_s": tr.cpu}


# -- through the file system ---------------------------------------------------------------------
def run_fs(work: Path, size: int, request: int, disk_size: int, files: int,
           bufs: list[bytes], settle: float, profile: bool = False,
           profile_dir: Path | None = None) -> dict[str, Any]:
    cdir = work / "cluster"
    init_cluster(cdir, [DiskSpec("d0", work / "disk0.img", disk_size)],
                 block_size=BLOCK_SIZE)
    with open_cluster(cdir) as c:
        fs = c.fs
        ino = fs.create(ROOT_INODE, b"big").ino
        fs.open(ino)
        dropped = _cold(settle)
        aligned = _aligned(bufs)
        with maybe_profile(profile, "fs write", profile_dir), Timer() as tw:
            for i, off in enumerate(range(0, size, request)):
                fs.write(ino, off, aligned[i % _PATTERNS])
            fs.fsync(ino)
        for m in aligned:
            m.close()
        dropped = _cold(settle) and dropped
        with maybe_profile(profile, "fs read", profile_dir), Timer() as tr:
            for off in range(0, size, request):
                data = fs.read(ino, off, request)
        last = (size - 1) // request
        _check(data, bufs[last % _PATTERNS], "fs", last * request)
        for i in (0, 1, _PATTERNS - 1):  # a few more places, outside the timing
            if i * request < size:
                _check(fs.read(ino, i * request, request), bufs[i], "fs", i * request)
        fs.release(ino)
        if fs.getattr(ino).size != size:
            raise SystemExit("fs_throughput: the big file has the wrong size")
        exts = c.meta.map_read(ino, 0, size // BLOCK_SIZE)
        data_at = exts[0].dblock * BLOCK_SIZE

        small = os.urandom(SMALL_FILE)
        d = fs.mkdir(ROOT_INODE, b"files").ino
        dropped = _cold(settle) and dropped
        with maybe_profile(profile, "fs create", profile_dir), Timer() as tc:
            for i in range(files):
                a = fs.create(d, b"f%06d" % i)
                fs.write(a.ino, 0, small)
            fs.fsync()
        if files:
            got = fs.read(fs.lookup(d, b"f%06d" % (files - 1)).ino, 0, SMALL_FILE)
            _check(got, small, "small file", 0)
    return {"write_s": tw.seconds, "read_s": tr.seconds, "create_s": tc.seconds,
            "write_cpu_s": tw.cpu, "read_cpu_s": tr.cpu, "create_cpu_s": tc.cpu,
            "dropped": dropped, "extents": len(exts), "data_at": data_at}


# -- driver -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="File system throughput vs. raw disk I/O, and small-file creation "
                    "(issue 2).")
    ap.add_argument("--size", default=None, help="bytes to write and read (default 1GiB)")
    ap.add_argument("--request", default="1MiB", help="bytes per request (default 1MiB)")
    ap.add_argument("--files", type=int, default=None,
                    help="4 KiB files to create (default 20000)")
    ap.add_argument("--runs", type=int, default=None,
                    help="runs of each of raw and fs, alternating (default 3)")
    ap.add_argument("--disk-size", default="2GiB",
                    help="size of the cluster's sparse disk (default 2GiB; grown if "
                         "--size needs more)")
    ap.add_argument("--raw-offset", default=None,
                    help="byte offset of the raw baseline's data in its disk file "
                         "(default: where the fs puts its first data block, just after "
                         "the disk label, so that both do I/O at the same alignment)")
    ap.add_argument("--settle", type=float, default=None,
                    help="seconds to pause after each page-cache drop, before every "
                         "timed phase of both sides (default 3; 0.5 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 64 MiB, 1,000 files, 1 run (explicit flags win)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--profile", action="store_true",
                    help="run the fs side once under pyinstrument and print the call "
                         "trees of write, read and create (no raw runs, no table)")
    ap.add_argument("--profile-dir", type=Path, default=None,
                    help="with --profile: also save HTML profiles here")
    args = ap.parse_args(argv)

    size = parse_size(args.size or ("64MiB" if args.quick else "1GiB"))
    request = parse_size(args.request)
    files = args.files if args.files is not None else (1000 if args.quick else 20000)
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    settle = args.settle if args.settle is not None else (0.5 if args.quick else 3.0)
    if size <= 0 or request <= 0 or size % BLOCK_SIZE or request % BLOCK_SIZE:
        ap.error("--size and --request must be positive multiples of 4 KiB")
    if runs < 1 or files < 0:
        ap.error("--runs must be >= 1 and --files >= 0")
    need = size + files * SMALL_FILE + 64 * MiB
    disk_size = max(parse_size(args.disk_size), need)
    raw_base = (parse_size(args.raw_offset) if args.raw_offset is not None
                else LABEL_BLOCKS * BLOCK_SIZE)
    bufs = _buffers(request)
    where = disk_backed_dir()
    _log(f"fs_throughput: {fmt_size(size)} in {fmt_size(request)} requests, {files:,} "
         f"files of 4 KiB, {runs} run(s) each; scratch in {where} ({fs_type(where)})")

    if args.profile:
        with bench_dir("sdbackup-fsbench-") as work:
            r = run_fs(work, size, request, disk_size, files, bufs, settle, profile=True,
                       profile_dir=args.profile_dir)
        _log(f"profiled run (times include profiler overhead): write "
             f"{fmt_rate(size / r['write_s'])}, read {fmt_rate(size / r['read_s'])}, "
             f"create {files / r['create_s']:,.0f} files/s; "
             f"page cache dropped: {'yes' if r['dropped'] else 'NO'}")
        return 0

    raw: list[dict[str, Any]] = []
    fsr: list[dict[str, Any]] = []
    for k in range(runs):
        for kind in ("raw", "fs"):
            with bench_dir("sdbackup-fsbench-") as work:
                if kind == "raw":
                    r = run_raw(work, size, request, disk_size, raw_base, bufs, settle)
                    raw.append(r)
                    _log(f"  run {k + 1} raw: write {fmt_rate(size / r['write_s'])}, "
                         f"read {fmt_rate(size / r['read_s'])}  (CPU s: write "
                         f"{r['write_cpu_s']:.2f}, read {r['read_cpu_s']:.2f})")
                else:
                    r = run_fs(work, size, request, disk_size, files, bufs, settle)
                    fsr.append(r)
                    _log(f"  run {k + 1} fs:  write {fmt_rate(size / r['write_s'])}, "
                         f"read {fmt_rate(size / r['read_s'])}, "
                         f"create {files / r['create_s']:,.0f} files/s  (CPU s: write "
                         f"{r['write_cpu_s']:.2f}, read {r['read_cpu_s']:.2f}, create "
                         f"{r['create_cpu_s']:.2f})")

    dropped = all(r["dropped"] for r in raw + fsr)
    fs_at = sorted({r["data_at"] for r in fsr})
    if fs_at != [raw_base]:
        _log(f"note: the fs put its data at byte {fs_at} of its disk, the raw baseline "
             f"at {raw_base}: page-cache alignment differs")
    rw, rr = median([r["write_s"] for r in raw]), median([r["read_s"] for r in raw])
    fw, fr = median([r["write_s"] for r in fsr]), median([r["read_s"] for r in fsr])
    fc = median([r["create_s"] for r in fsr])
    ratio_w, ratio_r = rw / fw, rr / fr
    files_per_s = files / fc if fc > 0 else 0.0

    if args.json:
        emit_json({
            "benchmark": "fs_throughput",
            "params": {"size": size, "request": request, "files": files, "runs": runs,
                       "disk_size": disk_size, "block_size": BLOCK_SIZE, "settle_s": settle,
                       "scratch_dir": str(where), "scratch_fs": fs_type(where),
                       "raw_offset": raw_base, "fs_data_offset": fs_at,
                       "fs_extents": max(r["extents"] for r in fsr)},
            "machine": machine_info(),
            "page_cache_dropped": dropped,
            "raw": {"write_s": runs_summary([r["write_s"] for r in raw]),
                    "read_s": runs_summary([r["read_s"] for r in raw]),
                    "write_cpu_s": runs_summary([r["write_cpu_s"] for r in raw]),
                    "read_cpu_s": runs_summary([r["read_cpu_s"] for r in raw]),
                    "write_MiB_per_s": size / rw / MiB, "read_MiB_per_s": size / rr / MiB},
            "fs": {"write_s": runs_summary([r["write_s"] for r in fsr]),
                   "read_s": runs_summary([r["read_s"] for r in fsr]),
                   "write_cpu_s": runs_summary([r["write_cpu_s"] for r in fsr]),
                   "read_cpu_s": runs_summary([r["read_cpu_s"] for r in fsr]),
                   "create_cpu_s": runs_summary([r["create_cpu_s"] for r in fsr]),
                   "write_MiB_per_s": size / fw / MiB, "read_MiB_per_s": size / fr / MiB,
                   "create_s": runs_summary([r["create_s"] for r in fsr]),
                   "files_per_s": files_per_s},
            "ratio": {"write": ratio_w, "read": ratio_r},
            "target": {"ratio": TARGET_RATIO, "files_per_s": TARGET_FILES_PER_S},
            "pass": {"write": ratio_w >= TARGET_RATIO, "read": ratio_r >= TARGET_RATIO,
                     "create": files_per_s >= TARGET_FILES_PER_S},
        })
        return 0

    def ok(good: bool) -> str:
        return "ok" if good else "MISS"

    print(f"fs_throughput (issue 2): {fmt_size(size)} sequential, {fmt_size(request)} "
          f"requests, 4 KiB blocks; medians of {runs} alternating run(s)")
    print(f"raw: os.pwrite/os.pread on a {fmt_size(disk_size)} sparse file at byte "
          f"{raw_base}; fs: one file on a {fmt_size(disk_size)} sparse disk, data at byte "
          f"{', '.join(map(str, fs_at))} in {max(r['extents'] for r in fsr)} extent(s)")
    print(f"page cache dropped before each phase: "
          f"{'yes' if dropped else 'NO (not root): reads may come from memory'}; "
          f"settle {settle:g} s; writes include the final fsync")
    print()
    def cpu(rows: list[dict[str, Any]], key: str) -> float:
        return round(median([r[key] for r in rows]), 2)

    print_table(
        ["phase", "raw MiB/s", "fs MiB/s", "fs/raw", f"target >= {TARGET_RATIO}",
         "raw CPU s", "fs CPU s"],
        [["write + fsync", size / rw / MiB, size / fw / MiB, round(ratio_w, 2),
          ok(ratio_w >= TARGET_RATIO), cpu(raw, "write_cpu_s"), cpu(fsr, "write_cpu_s")],
         ["read (cold)", size / rr / MiB, size / fr / MiB, round(ratio_r, 2),
          ok(ratio_r >= TARGET_RATIO), cpu(raw, "read_cpu_s"), cpu(fsr, "read_cpu_s")]],
    )
    print()
    print_table(
        ["create 4 KiB files", "files", "seconds", "files/s",
         f"target >= {TARGET_FILES_PER_S:,}", "CPU s"],
        [["create + write, 1 fsync", files, round(fc, 2), round(files_per_s),
          ok(files_per_s >= TARGET_FILES_PER_S), cpu(fsr, "create_cpu_s")]],
    )
    print("\n(wall-clock medians; CPU s = this process's CPU time, median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
