"""CLI start-up time (issue 11): whole ``sdbackup`` processes, from start to exit.

    .venv/bin/python bench/startup.py                    # this checkout against 173e81b
    .venv/bin/python bench/startup.py --runs 31 --baseline REV --json out.json
    .venv/bin/python bench/startup.py --baseline none    # this checkout only

Times three commands on a tiny cluster (one 64 MiB sparse disk, a few files) and a
tiny medium (one full backup of it), each run as a new process the way the installed
``sdbackup`` script runs (the same interpreter, ``from sdbackup.cli.main import main``):

- ``sdbackup --help``
- ``sdbackup generations --medium M`` (reads the medium's JSON label and manifests)
- ``sdbackup fs CL ls /`` (no coordinator running: opens the cluster in the process)

Each command runs ``--runs`` times after one warm-up run that is not counted; the wall
time of each run is taken around the whole child process (``time.perf_counter`` from
before the start to after it is reaped), and the table gives the median, min and max,
with the median CPU time (user + system) and the peak resident memory of the child
(its own ``wait4`` accounting). One more run of each records which heavy modules the
process imported.

The baseline is another commit's ``src/`` (``git archive REV src``, unpacked in the
scratch directory) run by the same interpreter with ``PYTHONPATH`` pointing at it; the
runs alternate (baseline, this checkout, baseline, ...) so that a noisy machine slows
both sides alike. 173e81b is the commit before issue 11's start-up work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import bench_dir, machine_info, median, print_table

_REPO = Path(__file__).resolve().parent.parent
DEFAULT_BASELINE = "173e81b"
HEAVY = ("numpy", "zstandard", "rich", "pyroaring", "trio", "pyfuse3")

# What the console script does, plus (with SDB_BENCH_MODULES set) a list of the
# imported modules written at exit, for the "heavy imports" column.
_ENTRY = """\
import os, sys
if os.environ.get("SDB_BENCH_MODULES"):
    import atexit
    def _modules():
        with open(os.environ["SDB_BENCH_MODULES"], "w") as f:
            f.write("\\n".join(sorted(sys.modules)))
    atexit.register(_modules)
sys.argv[0] = "sdbackup"
from sdbackup.cli.main import main
main()
"""


def sdbackup(src: Path, *args: object, modules: Path | None = None,
             check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run ``sdbackup ARGS`` on the code in ``src``; output captured."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    env.pop("SDB_BENCH_MODULES", None)
    if modules is not None:
        env["SDB_BENCH_MODULES"] = str(modules)
    proc = subprocess.run([sys.executable, "-c", _ENTRY, *map(str, args)], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, check=False)
    if check and proc.returncode != 0:
        raise SystemExit(f"sdbackup {' '.join(map(str, args))} (PYTHONPATH={src}) exited "
                         f"{proc.returncode}:\n{proc.stderr.decode(errors='replace')}")
    return proc


def one_run(src: Path, args: tuple[str, ...]) -> tuple[float, float, float]:
    """One whole process, start to reap, output thrown away: wall seconds, CPU seconds
    (user + system) and peak resident MiB of the child."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    env.pop("SDB_BENCH_MODULES", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _ENTRY, *args], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    t = time.perf_counter() - t0
    proc.returncode = rc = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if rc != 0:
        raise SystemExit(f"sdbackup {' '.join(args)} (PYTHONPATH={src}) exited {rc}")
    return t, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def heavy_imports(src: Path, args: tuple[str, ...], scratch: Path) -> list[str]:
    out = scratch / "modules.txt"
    sdbackup(src, *args, modules=out)
    loaded = set(out.read_text().split())
    return [m for m in HEAVY if m in loaded]


def export_src(rev: str, dest: Path) -> Path:
    """``git archive REV src`` unpacked under ``dest``; returns its src directory."""
    dest.mkdir(parents=True)
    archive = dest / "src.tar"
    subprocess.run(["git", "-C", str(_REPO), "archive", "--format=tar", "-o", str(archive),
                    rev, "src"], check=True, stderr=subprocess.DEVNULL)
    subprocess.run(["tar", "-xf", str(archive), "-C", str(dest)], check=True)
    archive.unlink()
    return dest / "src"


def make_fixture(src: Path, base: Path) -> tuple[Path, Path]:
    """A tiny cluster with a few files, and a medium with one full backup of it."""
    cdir, medium, tree = base / "cluster", base / "medium", base / "tree"
    (tree / "sub").mkdir(parents=True)
    for i in range(5):
        (tree / f"file{i}.txt").write_text(f"file {i}\n" * 200)
    (tree / "sub" / "data.bin").write_bytes(os.urandom(256 << 10))
    sdbackup(src, "init", cdir, "--disk", f"d0={base / 'd0.img'}:64MiB")
    sdbackup(src, "fs", cdir, "put", "-q", tree, "/")
    sdbackup(src, "backup", cdir, "--medium", medium, "-q")
    return cdir, medium


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=21, help="timed runs per command and side")
    ap.add_argument("--baseline", default=DEFAULT_BASELINE,
                    help="git revision to compare with, or 'none' (default %(default)s)")
    ap.add_argument("--json", type=Path, help="also write every run to this file")
    opts = ap.parse_args()
    if opts.runs < 1:
        ap.error("--runs must be at least 1")

    with bench_dir("sdbackup-bench-startup-") as base:
        sides: dict[str, Path] = {}
        if opts.baseline != "none":
            try:
                sides[f"before ({opts.baseline})"] = export_src(opts.baseline,
                                                                base / "baseline")
            except (OSError, subprocess.CalledProcessError):
                print(f"no baseline: 'git archive {opts.baseline} src' failed; timing this "
                      "checkout only", file=sys.stderr)
        sides["after (this checkout)"] = _REPO / "src"
        cdir, medium = make_fixture(_REPO / "src", base)
        commands: dict[str, tuple[str, ...]] = {
            "sdbackup --help": ("--help",),
            "sdbackup generations --medium M": ("generations", "--medium", str(medium)),
            "sdbackup fs CL ls /": ("fs", str(cdir), "ls", "/"),
        }
        times: dict[str, dict[str, list[float]]] = {c: {s: [] for s in sides}
                                                    for c in commands}
        cpu: dict[str, dict[str, list[float]]] = {c: {s: [] for s in sides} for c in commands}
        peak: dict[str, dict[str, list[float]]] = {c: {s: [] for s in sides} for c in commands}
        heavy: dict[str, dict[str, list[str]]] = {c: {} for c in commands}
        for cmd, args in commands.items():
            for side, src in sides.items():
                one_run(src, args)  # warm-up: byte-compiles a fresh baseline tree
                heavy[cmd][side] = heavy_imports(src, args, base)
            for _ in range(opts.runs):
                for side, src in sides.items():
                    t, c, m = one_run(src, args)
                    times[cmd][side].append(t)
                    cpu[cmd][side].append(c)
                    peak[cmd][side].append(m)

    rows: list[list[Any]] = []
    for cmd in commands:
        for side in sides:
            ts = times[cmd][side]
            rows.append([cmd, side, round(median(ts) * 1000), round(min(ts) * 1000),
                         round(max(ts) * 1000), round(median(cpu[cmd][side]) * 1000),
                         round(max(peak[cmd][side])),
                         ", ".join(heavy[cmd][side]) or "none"])
    print(f"whole processes, {opts.runs} runs each (python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs); wall and CPU in ms")
    print_table(["command", "code", "wall median", "min", "max", "CPU median", "peak MiB",
                 "heavy modules imported"], rows)
    if len(sides) == 2:
        before, after = sides
        print()
        for cmd in commands:
            b, a = median(times[cmd][before]), median(times[cmd][after])
            print(f"{cmd}: {b * 1000:.0f} ms -> {a * 1000:.0f} ms ({b / a:.1f}x faster)")
    if opts.json:
        opts.json.write_text(json.dumps({
            "machine": machine_info(), "runs": opts.runs,
            "commands": {c: {s: {"seconds": times[c][s], "cpu_seconds": cpu[c][s],
                                 "peak_mib": peak[c][s], "heavy_imports": heavy[c][s]}
                             for s in sides} for c in commands}}, indent=2))


if __name__ == "__main__":
    main()
