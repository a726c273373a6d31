"""Shared helpers for the benchmarks in ``bench/``.

Every benchmark script is a plain program (``python bench/NAME.py --help``) that uses
these helpers so that all of them measure and report the same way:

- :func:`bench_dir` -- a scratch directory on the real disk (never tmpfs, whose
  "disk" is RAM), removed afterwards; ``SDBACKUP_BENCH_DIR`` overrides the choice;
- :func:`drop_caches` -- flush dirty pages and empty the page cache (root only), so
  that a read phase measures the disk; it reports whether it worked;
- :class:`Timer`, :func:`median`, :func:`runs_summary` -- wall-clock timing and the
  median of N runs (the test machine is a noisy VM: report medians and ratios,
  never a single run);
- :func:`print_table`, :func:`emit_json` -- a plain aligned table and JSON output;
- :func:`parse_size`, :func:`fmt_size`, :func:`fmt_rate` -- sizes like ``1GiB``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# The package is normally installed in the venv (pip install -e .); running a script
# straight from a checkout works too. PYTHONPATH=/other/src runs against other code.
_SRC = Path(__file__).resolve().parent.parent / "src"
if importlib.util.find_spec("sdbackup") is None and _SRC.is_dir():
    sys.path.append(str(_SRC))

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# File systems whose storage is memory: a benchmark there never touches a disk.
_MEMORY_FS = {"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"}
_REPO = Path(__file__).resolve().parent.parent


# -- sizes -------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """'1GiB', '64M', '4096' -> bytes (binary units, K = 1024)."""
    from sdbackup.cluster.config import parse_size as _parse

    return _parse(text)


def fmt_size(n: float) -> str:
    """Bytes in binary units: 1073741824 -> '1 GiB', 1536 -> '1.5 KiB'."""
    for unit, mult in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= mult:
            v = n / mult
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / MiB:,.0f} MiB/s"


# -- where to put scratch files ------------------------------------------------------------
def fs_type(path: str | os.PathLike[str]) -> str:
    """The type of the file system holding ``path`` (from /proc/mounts), or '?'."""
    p = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mnt = fields[1].replace("\\040", " ")
                inside = p == mnt or p.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, kind = mnt, fields[2]
    except OSError:
        pass
    return kind


def disk_backed_dir() -> Path:
    """A directory on a real disk for scratch files: /tmp unless it is tmpfs,
    else /var/tmp, else ``bench-out/`` in the repository (git-ignored)."""
    env = os.environ.get("SDBACKUP_BENCH_DIR")
    if env:
        return Path(env)
    for cand in (Path(tempfile.gettempdir()), Path("/var/tmp"), _REPO / "bench-out"):
        if fs_type(cand) not in _MEMORY_FS:
            return cand
    return _REPO / "bench-out"


@contextlib.contextmanager
def bench_dir(prefix: str = "sdbackup-bench-", keep: bool = False) -> Iterator[Path]:
    """A fresh scratch directory on a real disk, removed at the end unless ``keep``."""
    parent = disk_backed_dir()
    parent.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield d
    finally:
        if keep:
            print(f"bench files kept in {d}", file=sys.stderr)
        else:
            shutil.rmtree(d, ignore_errors=True)


# -- page cache ------------------------------------------------------------------------------
def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache; False when not permitted.

    Needs root (``echo 3 > /proc/sys/vm/drop_caches``). Without it a read phase may be
    served from memory: say so next to the figures.
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# -- timing ------------------------------------------------------------------------------------
class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall clock, perf_counter) and
    ``t.cpu`` (this process's CPU seconds, user + system: less disturbed than the
    wall clock by other load on a shared machine, and blind to time spent waiting)."""

    def __init__(self) -> None:
        self.start = self.cpu_start = 0.0
        self.seconds = self.cpu = 0.0

    def __enter__(self) -> Timer:
        self.cpu_start = time.process_time()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
        self.cpu = time.process_time() - self.cpu_start


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def runs_summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and every run, for JSON output."""
    return {
        "median": median(values),
        "min": min(values),
        "max": max(values),
        "runs": list(values),
    }


# -- profiling ---------------------------------------------------------------------------------
@contextlib.contextmanager
def maybe_profile(enabled: bool, title: str, out_dir: Path | None = None) -> Iterator[None]:
    """Profile the body with pyinstrument when ``enabled``; print the call tree to
    stderr and, with ``out_dir``, save it as ``<title>.html`` there."""
    if not enabled:
        yield
        return
    try:
        from pyinstrument import Profiler
    except ImportError:
        print("pyinstrument is not installed (pip install -e '.[bench]'): "
              "not profiling", file=sys.stderr)
        yield
        return
    prof = Profiler(interval=0.001)
    prof.start()
    try:
        yield
    finally:
        prof.stop()
        print(f"\n===== profile: {title} =====", file=sys.stderr)
        print(prof.output_text(unicode=True, color=False, show_all=False), file=sys.stderr)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in title)
            (out_dir / f"{safe}.html").write_text(prof.output_html())


# -- output ------------------------------------------------------------------------------------
def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table; numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        all(_is_num(r[i]) for r in rows) if rows else False for i in range(len(headers))
    ]

    def line(r: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w)
                 for c, w, num in zip(r, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                title: str | None = None, file: Any = None) -> None:
    out = file or sys.stdout
    if title:
        print(title, file=out)
    print(format_table(headers, rows), file=out)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def machine_info() -> dict[str, Any]:
    """What the figures were measured on (goes into the JSON output)."""
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * KiB
                    break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def emit_json(obj: Any, file: Any = None) -> None:
    json.dump(obj, file or sys.stdout, indent=2, sort_keys=False)
    print(file=file or sys.stdout)
