"""Dispersed backup benchmark (issue 17, seed a.12): 1, 2 and 4 copiers.

One cluster (4 KiB blocks, two sparse disks of ``--disk``), its coordinator and four
node agents as real processes, filled with ``--fill`` bytes of incompressible files.
Then, as medians of ``--runs`` runs (the copier counts rotate from run to run):

1. **rate-limited media**: ``backup --copy-nodes n1..nN`` with each copier limited to
   ``--rate`` bytes per second (``--bwlimit``, which each copier applies to itself: as
   when every node has its own tape drive or link of that speed), every copier writing
   to a medium directory of its own. Target (issue 17): N copiers take at most
   1.15 x (1/N) of one copier's time, for N = 2 and 4.
2. **unlimited**: the same without a limit, on this machine (every copier reads the
   same disk images on one physical disk, and the machine has few cores: the figure
   says what this machine does, not what a cluster does).

Each backup is the coordinator's ``backup`` request exactly as ``sdbackup backup
--copy-nodes ... --compress none --log-mode central --json`` sends it (the time is the
request's, without the CLI's start-up); the media are removed after each run.

3. **coordinator cost per copy-manager call**: the coordinator's CPU seconds (from
   /proc) per ``part_progress`` notification and per ``status`` call, and the cost of
   building the index from parts' rows per record (in this process, the code the
   coordinator runs), which feed
4. **a simulation of 1 PB over 1,000 nodes** (:func:`simulate`): documented inputs
   (per-node disk and medium bandwidth, the shared storage's aggregate bandwidth, part
   size, progress interval, calls per part, the measured costs) give the backup time
   and which limit binds first as the number of copiers grows.

::

    .venv/bin/python bench/dispersed.py                  # ~3-4 minutes on 2 CPUs
    .venv/bin/python bench/dispersed.py --quick          # a smoke run
    .venv/bin/python bench/dispersed.py --json out.json  # the table, and JSON in out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    GiB,
    MiB,
    bench_dir,
    emit_json,
    fmt_size,
    machine_info,
    median,
    parse_size,
    print_table,
)

SDB = [sys.executable, "-m", "sdbackup.cli.main"]
NODES = ("n1", "n2", "n3", "n4")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Env:
    """The cluster, its coordinator and four node agents."""

    def __init__(self, base: Path, args: argparse.Namespace) -> None:
        from sdbackup.cluster.launch import start_coordinator, start_node

        self.base, self.args = base, args
        self.cdir = base / "cluster"
        r = subprocess.run([*SDB, "init", str(self.cdir), "--block-size", "4096",
                            "--disk", f"d0={base / 'd0.img'}:{args.disk}",
                            "--disk", f"d1={base / 'd1.img'}:{args.disk}"],
                           capture_output=True, text=True, check=False)
        if r.returncode:
            raise SystemExit(f"init failed: {r.stderr}")
        self.procs: list[Any] = []
        self.coord = start_coordinator(self.cdir, lease=10.0)
        self.procs.append(self.coord)
        for n in NODES:
            self.procs.append(start_node(self.cdir, n, cache_size="16MiB", flush_delay=1.0))

    def fill(self) -> float:
        from sdbackup.cluster.node import ClusterClient

        t = time.monotonic()
        chunk = bytearray(os.urandom(MiB))
        per_file = 32 * MiB
        with ClusterClient("fill", cluster_dir=self.cdir, cache_bytes=64 * MiB) as cc:
            fs = cc.fs
            for k in range(max(1, self.args.fill // per_file)):
                ino = fs.create(1, f"f{k}".encode()).ino
                for off in range(0, per_file, MiB):
                    chunk[:8] = (k * per_file + off).to_bytes(8, "little")
                    fs.write(ino, off, chunk)
            fs.fsync(None)
        return time.monotonic() - t

    def backup(self, copiers: int, rate: int, tag: str) -> tuple[float, dict[str, Any]]:
        from sdbackup.cluster.access import coordinator_client

        names = list(NODES[:copiers])
        media = {n: str(self.base / f"m-{tag}-{n}") for n in names}
        primary = self.base / f"m-{tag}"
        args = {"medium": str(primary), "compression": "none", "level": 1,
                "log_mode": "central", "log_medium": None, "overlay": False,
                "pre_freeze": None, "post_thaw": None, "bwlimit": rate, "pace": "off",
                "copy_nodes": names, "node_media": media, "no_reassign": False,
                "split": "ranges", "part_bytes": self.args.part_size}
        with coordinator_client(self.cdir) as c:
            t = time.monotonic()
            s, _ = c.call("backup", args, timeout=None)
            dt = time.monotonic() - t
        shutil.rmtree(primary, ignore_errors=True)
        for m in media.values():
            shutil.rmtree(m, ignore_errors=True)
        return dt, s

    def call_cost(self, n: int = 3000) -> dict[str, float]:
        """Coordinator CPU seconds per part_progress notification and per status call
        (no dispersed backup runs: the handler's lookup is the same either way)."""
        from sdbackup.cluster.access import coordinator_client
        from sdbackup.net import messages as msg

        out: dict[str, float] = {}
        with coordinator_client(self.cdir) as c:
            c0 = cpu_seconds(self.coord.pid)
            for i in range(n):
                msg.notify(c, msg.PartProgress("g", 0, 0, i))
            msg.call(c, msg.Status())  # every notification before it was handled
            out["part_progress_cpu_s"] = (cpu_seconds(self.coord.pid) - c0) / n
            c0 = cpu_seconds(self.coord.pid)
            for _ in range(n // 10):
                msg.call(c, msg.Status())
            out["status_cpu_s"] = (cpu_seconds(self.coord.pid) - c0) / (n // 10)
        return out

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def index_cost(records: int = 1_000_000) -> dict[str, float]:
    """Seconds and bytes per record to merge parts' rows and build the index, with the
    code the coordinator runs (backup/parts.py PartsResult, media/index.py)."""
    import tracemalloc

    import numpy as np

    from sdbackup.backup.parts import PartDone, PartsResult
    from sdbackup.media.index import make_entries

    rows = np.zeros((records, 4), dtype=np.int64)
    rows[:, 0] = 1
    rows[:, 1] = np.arange(records) * 256
    rows[:, 2] = 256
    rows[:, 3] = np.arange(records) * (256 * 4096 + 64)
    half = records // 2
    parts = [PartDone(i, "n", "m", "p", "f", 0, 0, len(r) + 2, 0, int(r[:, 2].sum()), 0, 0,
                      0.0, r) for i, r in enumerate((rows[:half], rows[half:]))]
    tracemalloc.start()
    t = time.perf_counter()
    res = PartsResult(parts)
    c = res.copy
    e = make_entries(c.disk, c.start, c.count, c.offset, res.streams, [1] * c.records)
    dt = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert e.size == records
    return {"index_s_per_record": dt / records, "index_bytes_per_record": peak / records}


def simulate(inp: dict[str, float]) -> dict[str, Any]:
    """Backup time of ``data`` bytes over 1, 2, 4, ... ``nodes`` copiers, and at how
    many copiers each limit starts to bind (the first is the first bottleneck).

    Each copier moves min(its disk link, its medium) bytes per second; together at most
    the shared storage's aggregate bandwidth. The coordinator (one Python process; one
    core for this work) handles per part a ``copy_part`` and a ``part_done`` call
    (``part_call_cpu_s`` each) and per copier a ``part_progress`` notification every
    ``progress_s`` (``progress_cpu_s``); it is saturated when those take a core. After
    the copy it builds the index from the parts' rows, ``index_s_per_record`` per
    record of ``record_bytes``, holding ``index_bytes_per_record`` each in memory
    (``coordinator_mem_bytes`` available): that limit does not depend on the copiers.
    """
    data, nodes = inp["data_bytes"], int(inp["nodes"])
    per = min(inp["node_disk_Bps"], inp["node_medium_Bps"])
    records = data / inp["record_bytes"]
    index_s = records * inp["index_s_per_record"]
    index_mem = records * inp["index_bytes_per_record"]
    rows = []
    binds: dict[str, int] = {}
    if index_mem > inp["coordinator_mem_bytes"]:
        binds["coordinator memory for the index (any number of copiers)"] = 1
    n = 1
    while True:
        rate = min(n * per, inp["shared_storage_Bps"])
        copy_s = data / rate
        calls_cpu = (2 * rate / inp["part_bytes"] * inp["part_call_cpu_s"]
                     + n / inp["progress_s"] * inp["progress_cpu_s"])
        for name, hit in (("shared storage bandwidth", n * per > inp["shared_storage_Bps"]),
                          ("coordinator CPU for copy-manager calls", calls_cpu >= 1.0),
                          ("index build longer than the copy", index_s > copy_s)):
            if hit:
                binds.setdefault(name, n)
        rows.append({"copiers": n, "copy_hours": copy_s / 3600, "coord_cores": calls_cpu,
                     "index_hours": index_s / 3600, "index_mem_GiB": index_mem / GiB})
        if n >= nodes:
            break
        n = min(nodes, n * 2)
    order = sorted(binds.items(), key=lambda kv: kv[1])
    return {"inputs": inp, "rows": rows,
            "limits": [{"limit": k, "from_copiers": v} for k, v in order],
            "first_bottleneck": order[0][0] if order else "none up to the node count"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fill", type=parse_size, default=parse_size("512MiB"))
    ap.add_argument("--disk", default="2GiB")
    ap.add_argument("--rate", type=parse_size, default=parse_size("32MiB"),
                    help="each copier's limit in the rate-limited runs (bytes/s)")
    ap.add_argument("--part-size", type=parse_size, default=parse_size("256MiB"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="128 MiB, one run")
    ap.add_argument("--json", nargs="?", const="-", default=None)
    args = ap.parse_args()
    if args.quick:
        args.fill, args.runs = parse_size("128MiB"), 1
    out: dict[str, Any] = {"machine": machine_info(), "args": {
        "fill": args.fill, "rate": args.rate, "part_size": args.part_size, "runs": args.runs}}
    with bench_dir("sdbackup-bench-dispersed-") as base:
        env = Env(base, args)
        try:
            log(f"filling {fmt_size(args.fill)}")
            out["fill_s"] = env.fill()
            times: dict[str, list[float]] = {}
            engine: dict[str, list[float]] = {}
            counts = [1, 2, 4]
            for run in range(args.runs):
                order = counts[run % 3:] + counts[:run % 3]
                for rate in (args.rate, 0):
                    for n in order:
                        key = f"{n}@{'limited' if rate else 'unlimited'}"
                        dt, s = env.backup(n, rate, f"{run}-{key.replace('@', '-')}")
                        times.setdefault(key, []).append(dt)
                        engine.setdefault(key, []).append(float(s["seconds"]))
                        log(f"run {run}: {n} copier(s), "
                            f"{'rate ' + fmt_size(rate) + '/s' if rate else 'no limit'}: "
                            f"{dt:.2f} s ({s['raw_bytes'] / dt / MiB:.0f} MiB/s)")
            out["times"] = {k: median(v) for k, v in times.items()}
            out["engine_seconds"] = {k: median(v) for k, v in engine.items()}
            costs = env.call_cost()
        finally:
            env.close()
    costs.update(index_cost())
    out["costs"] = costs
    t = out["times"]
    rows = []
    for mode in ("limited", "unlimited"):
        one = t[f"1@{mode}"]
        for n in (1, 2, 4):
            x = t[f"{n}@{mode}"]
            rows.append([mode if mode == "unlimited" else f"{fmt_size(args.rate)}/s each", n,
                         round(x, 2), round(args.fill / x / MiB, 1), round(one / x, 2),
                         round(x / (one / n), 3)])
    out["table"] = rows
    sim_in = {"data_bytes": float(1 << 50), "nodes": 1000.0,
              "node_disk_Bps": 1.0 * GiB, "node_medium_Bps": 300.0 * MiB,
              "shared_storage_Bps": 200.0 * GiB, "part_bytes": float(args.part_size),
              "record_bytes": float(MiB), "progress_s": 0.5,
              "progress_cpu_s": costs["part_progress_cpu_s"],
              # copy_part and part_done: a status call's cost (a request with an answer
              # and some work), an upper bound of what they cost at the coordinator
              "part_call_cpu_s": costs["status_cpu_s"],
              "index_s_per_record": costs["index_s_per_record"],
              "index_bytes_per_record": costs["index_bytes_per_record"],
              "coordinator_mem_bytes": 64.0 * GiB}
    out["simulation"] = simulate(sim_in)
    if args.json == "-":
        emit_json(out)
        return
    print_table(["copier limit", "copiers", "seconds", "MiB/s", "speed-up",
                 "time / (1/N of one)"], rows,
                title=f"dispersed backup of {fmt_size(args.fill)} (medians of {args.runs})")
    print(f"\ncoordinator CPU per part_progress: {costs['part_progress_cpu_s'] * 1e6:.0f} us, "
          f"per status: {costs['status_cpu_s'] * 1e6:.0f} us; index build per record: "
          f"{costs['index_s_per_record'] * 1e9:.0f} ns, "
          f"{costs['index_bytes_per_record']:.0f} bytes\n")
    sim = out["simulation"]
    print_table(["copiers", "copy h", "coordinator cores for calls", "index h", "index GiB"],
                [[r["copiers"], round(r["copy_hours"], 2), round(r["coord_cores"], 3),
                  round(r["index_hours"], 2), round(r["index_mem_GiB"], 1)]
                 for r in sim["rows"]],
                title="simulation: 1 PiB, 1 GiB/s disk link and 300 MiB/s medium per node, "
                      "200 GiB/s shared storage")
    for lim in sim["limits"]:
        print(f"limit: {lim['limit']}, from {lim['from_copiers']} copiers on")
    print(f"first bottleneck: {sim['first_bottleneck']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
