"""Throughput of RecordWriter (and RecordReader.scan) against the zstd command line.

Data: SIZE MiB (default 512) of half-compressible bytes: in every 64 KiB, 32 KiB of
random bytes then 32 KiB of zeros. Written as 1 MiB DATA records, with no compression,
with zstd level 1 without the thread pool (threads=0) and with it (threads=CPUs), and
compared with ``zstd -1 -T0`` compressing the same bytes from a file in the page cache.

Two times per writer: until every byte was handed to the kernel (page cache), and
until it was fsynced as well. "vs zstd CLI" compares the page-cache MB/s with zstd's.

    .venv/bin/python bench/records_throughput.py [--size-mib 512] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdbackup.media.record_format import Compression, Kind
from sdbackup.media.record_reader import RecordReader
from sdbackup.media.record_writer import RecordWriter

RECORD = 1 << 20
BS = 4096
MB = 1e6


@dataclass
class Row:
    mode: str
    seconds: float
    synced_seconds: float | None
    out_bytes: int | None


def make_data(size: int) -> bytes:
    rows = size // 65536
    arr = np.zeros((rows, 65536), dtype=np.uint8)
    arr[:, :32768] = np.frombuffer(os.urandom(rows * 32768), dtype=np.uint8).reshape(rows, 32768)
    return arr.tobytes()


def run_writer(
    data: bytes, path: Path, compress: Compression, threads: int | None, level: int = 1
) -> Row:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        mv = memoryview(data)  # read-only: the writer does not copy it
        t0 = time.perf_counter()
        w = RecordWriter(fd, medium=str(path), compress=compress, level=level, threads=threads)
        for off in range(0, len(data), RECORD):
            w.write_blocks(Kind.DATA, 1, off // BS, RECORD // BS, mv[off : off + RECORD])
        w.close(fsync=False)
        t1 = time.perf_counter()
        os.fsync(fd)
        t2 = time.perf_counter()
    finally:
        os.close(fd)
    name = "RecordWriter none" if compress == "none" else f"RecordWriter zstd:{level}"
    if compress == "zstd":
        name += f" threads={threads}"
    return Row(name, t1 - t0, t2 - t0, path.stat().st_size)


def run_scan(path: Path, label: str, size: int) -> Row:
    """Read the stream back (from the page cache), verifying and decompressing."""
    t0 = time.perf_counter()
    n = 0
    with RecordReader(path) as r:
        for rec in r.scan():
            n += len(rec.data) if rec.kind == Kind.DATA else 0
    t1 = time.perf_counter()
    if n != size:
        raise SystemExit(f"scan of {path} returned {n} bytes of data, expected {size}")
    return Row(f"RecordReader.scan {label}", t1 - t0, None, None)


def run_zstd_cli(src: Path, out: Path) -> Row:
    t0 = time.perf_counter()
    subprocess.run(["zstd", "-1", "-T0", "-q", "-f", str(src), "-o", str(out)], check=True)
    t1 = time.perf_counter()
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    t2 = time.perf_counter()
    return Row("zstd -1 -T0 (CLI)", t1 - t0, t2 - t0, out.stat().st_size)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: /tmp)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per mode; the best is shown")
    args = ap.parse_args()
    if shutil.which("zstd") is None:
        print("zstd is not installed", file=sys.stderr)
        return 2
    size = args.size_mib << 20
    cpus = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="sdb-bench-", dir=args.dir))
    try:
        data = make_data(size)
        src = work / "input.bin"
        with open(src, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())  # its dirty pages must not slow down what follows
        runs: list[tuple[Compression, int | None, bool]] = [
            ("none", None, True),
            ("zstd", 0, False),
            ("zstd", cpus, True),
        ]
        best: dict[str, Row] = {}

        def keep(row: Row) -> None:
            if row.mode not in best or row.seconds < best[row.mode].seconds:
                best[row.mode] = row

        for _ in range(args.repeat):
            keep(run_zstd_cli(src, work / "input.bin.zst"))
            (work / "input.bin.zst").unlink()
            for compress, threads, scan in runs:
                out = work / "stream.sdbr"
                keep(run_writer(data, out, compress, threads))
                if scan:
                    keep(run_scan(out, "none" if compress == "none" else "zstd:1", size))
                out.unlink()
        rows = list(best.values())
        zrow = rows[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"records_throughput: {args.size_mib} MiB half-compressible data (32 KiB random + "
        f"32 KiB zeros per 64 KiB), 1 MiB records, {cpus} CPUs, python {sys.version.split()[0]}"
    )
    print(
        f"written to {args.dir or tempfile.gettempdir()}; best of {args.repeat} runs; "
        "MB = 10^6 bytes of input per second; writers' fsync time is the extra column"
    )
    zspeed = size / zrow.seconds
    head = (
        f"{'mode':<34} {'time s':>7} {'MB/s':>7} {'+fsync s':>8} {'MB/s':>7} "
        f"{'out MiB':>8} {'out/in':>6} {'vs zstd CLI':>11}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        speed = size / row.seconds
        synced = (
            f"{row.synced_seconds:8.2f} {size / row.synced_seconds / MB:7.0f}"
            if row.synced_seconds is not None
            else f"{'':8} {'':7}"
        )
        stored = (
            f"{row.out_bytes / (1 << 20):8.1f} {row.out_bytes / size:6.3f}"
            if row.out_bytes is not None
            else f"{'':8} {'':6}"
        )
        print(
            f"{row.mode:<34} {row.seconds:7.2f} {speed / MB:7.0f} {synced} {stored} "
            f"{speed / zspeed:10.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
