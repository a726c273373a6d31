"""Cluster benchmark (issue 3): node agents as real processes on 127.0.0.1.

    .venv/bin/python bench/cluster.py              # full run, ~3-4 minutes
    .venv/bin/python bench/cluster.py --quick      # small sizes, one run each
    .venv/bin/python bench/cluster.py --json out.json

Measures, as medians of ``--runs`` runs:

1. aggregate write throughput of 1, 2 and 4 node agents on disjoint files:
   ``--per-node`` bytes each (default 256 MiB) in 1 MiB writes, then fsync; one
   writer process per node. Two paths:
   - ``control port``: the writer talks to its node agent through the node's control
     port (``open_fs(cluster, node=NAME)``), so every write crosses one more
     authenticated TCP hop (writer -> node) before the node's cache;
   - ``in-process client``: the writer *is* the cluster member
     (:class:`~sdbackup.cluster.node.ClusterClient`, the same cache and coherence
     code), which is what a FUSE mount or an application linked against the node
     does: no extra hop.
2. write-right grants per second under contention: one program writes 4 KiB
   alternately through node n1 and node n2 at the same offset of one file; each
   write needs the write right, which recalls the other node's dirty data first.
   Grants are counted by the coordinator's logical clock.
3. flush latency: every node holds ``--dirty`` (64 MiB) of unwritten data, then
   the cluster-wide flush (the coordinator's flush RPC, what ``sdbackup flush``
   calls) until nothing is dirty; for 1, 2 and 4 nodes.

The disk images live on a real disk (not tmpfs); the page cache is not dropped: the
figures are the cluster's software path (protocol, coherence, caches, metadata),
which is what this issue adds, with the host's page cache absorbing the data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import format_table as table

MiB = 1 << 20
HERE = Path(__file__).resolve()


# -- processes ---------------------------------------------------------------------------
class Proc:
    def __init__(self, argv: list[str], out: Path) -> None:
        self.out = out
        with open(out, "ab") as fh:
            self.p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def sdb_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "sdbackup.cli.main", *args]


def wait_addr(path: Path, proc: Proc, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.p.poll() is not None:
            raise SystemExit(f"process exited early:\n{proc.out.read_text()[-2000:]}")
        try:
            if f"pid={proc.p.pid}" in path.read_text():
                return
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{path} did not appear")


class Cluster:
    """A fresh cluster with a coordinator and ``n`` node agents (n1..nN)."""

    def __init__(self, base: Path, nodes: int, disk_size: int, cache: str = "64MiB",
                 flush_delay: float = 600.0) -> None:
        self.base = base
        self.dir = base / "cluster"
        self.procs: list[Proc] = []
        subprocess.run(sdb_argv("init", str(self.dir), "--disk",
                                f"d0={base / 'd0.img'}:{disk_size}"), check=True,
                       capture_output=True)
        try:
            c = Proc(sdb_argv("coordinator", str(self.dir), "--lease", "10"),
                     base / "coordinator.out")
            self.procs.append(c)
            wait_addr(self.dir / "coordinator.addr", c)
            for i in range(1, nodes + 1):
                n = Proc(sdb_argv("node", str(self.dir), "--name", f"n{i}", "--cache-size",
                                  cache, "--flush-delay", str(flush_delay)),
                         base / f"n{i}.out")
                self.procs.append(n)
                wait_addr(self.dir / "nodes" / f"n{i}.addr", n)
        except BaseException:
            self.close()
            raise

    def rpc(self, method: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        from sdbackup.cluster.access import coordinator_client

        with coordinator_client(self.dir) as c:
            body, _ = c.call(method, args or {}, timeout=600)
            return body

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def fresh(root: Path, name: str) -> Path:
    d = root / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


# -- the writer worker (a separate process per node) ----------------------------------------------
def worker(spec: dict[str, Any]) -> None:
    chunk = bytes(os.urandom(MiB))
    total, path = int(spec["bytes"]), spec["path"]
    if spec["mode"] == "client":
        from sdbackup.cluster.node import ClusterClient

        cc = ClusterClient(spec["name"], cluster_dir=spec["cluster"], cache_bytes=64 * MiB,
                           flush_delay=600)
        fs: Any = cc.fs
    else:
        from sdbackup.cluster.access import open_fs

        ctx = open_fs(spec["cluster"], node=spec["node"])
        fs = ctx.__enter__()
    ino = fs.create(1, path.lstrip("/").encode()).ino
    go = Path(spec["go"])
    while not go.exists():  # start together
        time.sleep(0.001)
    t0 = time.monotonic()
    for off in range(0, total, MiB):
        fs.write(ino, off, chunk)
    t1 = time.monotonic()
    fs.fsync(ino)
    t2 = time.monotonic()
    print(json.dumps({"t0": t0, "t1": t1, "t2": t2, "bytes": total}), flush=True)
    if spec["mode"] == "client":
        cc.close()
    else:
        ctx.__exit__(None, None, None)


def run_writers(cl: Cluster, nodes: int, per_node: int, mode: str, tag: str) -> dict[str, float]:
    go = cl.base / f"go-{tag}"
    procs = []
    for i in range(1, nodes + 1):
        spec = {"mode": mode, "cluster": str(cl.dir), "node": f"n{i}", "name": f"w{tag}{i}",
                "path": f"/{tag}-{i}", "bytes": per_node, "go": str(go)}
        procs.append(subprocess.Popen([sys.executable, str(HERE), "--worker", json.dumps(spec)],
                                      stdout=subprocess.PIPE, text=True))
    time.sleep(1.0 + 0.3 * nodes)  # let every worker connect and create its file
    go.touch()
    res = []
    for p in procs:
        out, _ = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"writer failed ({p.returncode})")
        res.append(json.loads(out.strip().splitlines()[-1]))
    t0 = min(r["t0"] for r in res)
    total = sum(r["bytes"] for r in res)
    return {"written_s": max(r["t1"] for r in res) - t0,
            "synced_s": max(r["t2"] for r in res) - t0,
            "mib_s": total / MiB / (max(r["t2"] for r in res) - t0)}


# -- benchmarks ------------------------------------------------------------------------
def bench_throughput(root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for mode in ("node", "client"):
        for nodes in args.nodes:
            runs = []
            for r in range(args.runs):
                base = fresh(root, f"tp-{mode}-{nodes}-{r}")
                cl = Cluster(base, nodes, nodes * args.per_node + 256 * MiB)
                try:
                    runs.append(run_writers(cl, nodes, args.per_node, mode, f"r{r}"))
                finally:
                    cl.close()
                    shutil.rmtree(base, ignore_errors=True)
            med = statistics.median(x["mib_s"] for x in runs)
            rows.append({"path": "control port" if mode == "node" else "in-process client",
                         "nodes": nodes, "per_node_mib": args.per_node // MiB,
                         "mib_s": med, "per_node_mib_s": med / nodes,
                         "runs_mib_s": [round(x["mib_s"], 1) for x in runs],
                         "written_s": statistics.median(x["written_s"] for x in runs),
                         "synced_s": statistics.median(x["synced_s"] for x in runs)})
            print(f"  throughput {rows[-1]['path']:<18} {nodes} node(s): {med:7.1f} MiB/s "
                  f"(runs {rows[-1]['runs_mib_s']})", file=sys.stderr)
    return rows


def bench_grants(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from sdbackup.cluster.access import open_fs

    base = fresh(root, "grants")
    cl = Cluster(base, 2, 64 * MiB)
    runs = []
    try:
        with open_fs(cl.dir, node="n1") as f1, open_fs(cl.dir, node="n2") as f2:
            ino = f1.create(1, b"contended").ino
            block = os.urandom(4096)
            f1.write(ino, 0, block)
            for _ in range(args.runs):
                c0 = cl.rpc("status")["clock"]
                t0 = time.monotonic()
                for i in range(args.grant_writes):
                    (f1 if i % 2 == 0 else f2).write(ino, 0, block)
                dt = time.monotonic() - t0
                grants = cl.rpc("status")["clock"] - c0
                runs.append({"grants": grants, "seconds": dt, "grants_s": grants / dt,
                             "writes_s": args.grant_writes / dt})
    finally:
        cl.close()
        shutil.rmtree(base, ignore_errors=True)
    med = statistics.median(r["grants_s"] for r in runs)
    print(f"  grants: {med:.0f}/s (runs {[round(r['grants_s']) for r in runs]})",
          file=sys.stderr)
    return {"grants_s": med, "latency_ms": 1000 / med, "writes": args.grant_writes,
            "grants_per_write": statistics.median(r["grants"] / args.grant_writes
                                                  for r in runs),
            "runs_grants_s": [round(r["grants_s"], 1) for r in runs]}


def bench_flush(root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from sdbackup.cluster.access import open_fs

    rows = []
    for nodes in args.nodes:
        base = fresh(root, f"flush-{nodes}")
        cl = Cluster(base, nodes, nodes * args.dirty * (args.runs + 1) + 256 * MiB,
                     cache=f"{2 * args.dirty // MiB}MiB")
        runs = []
        try:
            chunk = os.urandom(MiB)
            for r in range(args.runs):
                for i in range(1, nodes + 1):
                    with open_fs(cl.dir, node=f"n{i}") as fs:
                        ino = fs.create(1, f"dirty-{r}-{i}".encode()).ino
                        for off in range(0, args.dirty, MiB):
                            fs.write(ino, off, chunk)
                dirty = sum(n.get("dirty_bytes", 0) for n in cl.rpc("status")["nodes"])
                assert dirty >= nodes * args.dirty, dirty
                t0 = time.monotonic()
                res = cl.rpc("flush", {"timeout": 600})
                dt = time.monotonic() - t0
                assert res["clean"] and not res["errors"], res
                runs.append(dt)
        finally:
            cl.close()
            shutil.rmtree(base, ignore_errors=True)
        med = statistics.median(runs)
        rows.append({"nodes": nodes, "dirty_per_node_mib": args.dirty // MiB,
                     "flush_s": med, "mib_s": nodes * args.dirty / MiB / med,
                     "runs_s": [round(x, 3) for x in runs]})
        print(f"  flush {nodes} node(s) x {args.dirty // MiB} MiB dirty: {med:.3f} s "
              f"(runs {rows[-1]['runs_s']})", file=sys.stderr)
    return rows



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small sizes, one run each")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--per-node", default="256MiB", help="bytes each writer writes")
    ap.add_argument("--dirty", default="64MiB", help="dirty bytes per node for the flush")
    ap.add_argument("--grant-writes", type=int, default=2000)
    ap.add_argument("--nodes", default="1,2,4")
    ap.add_argument("--only", choices=["throughput", "grants", "flush"])
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--dir", type=Path, help="scratch directory (default: on /var/tmp)")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    from sdbackup.cluster.config import parse_size

    args.per_node, args.dirty = parse_size(args.per_node), parse_size(args.dirty)
    args.nodes = [int(x) for x in args.nodes.split(",")]
    if args.quick:
        args.runs, args.per_node, args.dirty, args.grant_writes = 1, 32 * MiB, 16 * MiB, 300
    root = Path(tempfile.mkdtemp(prefix="sdbackup-bench-cluster-",
                                 dir=args.dir or "/var/tmp"))
    out: dict[str, Any] = {"cpus": os.cpu_count(), "runs": args.runs}
    try:
        if args.only in (None, "throughput"):
            out["throughput"] = bench_throughput(root, args)
        if args.only in (None, "grants"):
            out["grants"] = bench_grants(root, args)
        if args.only in (None, "flush"):
            out["flush"] = bench_flush(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\ncluster benchmark: medians of {args.runs} run(s), {os.cpu_count()} CPUs, "
          "127.0.0.1, 4 KiB blocks")
    if "throughput" in out:
        print(f"\n1. aggregate write throughput, disjoint files, 1 MiB writes + fsync "
              f"({args.per_node // MiB} MiB per writer)")
        print(table(["path", "nodes", "MiB/s", "MiB/s per node", "writes s", "+fsync s"],
                    [[r["path"], r["nodes"], r["mib_s"], r["per_node_mib_s"],
                      r["written_s"], r["synced_s"]]
                     for r in out["throughput"]]))
    if "grants" in out:
        g = out["grants"]
        print("\n2. write-right grants under contention (4 KiB writes alternating n1/n2, "
              "one segment)")
        print(table(["grants/s", "ms per grant", "grants per write"],
                    [[round(g["grants_s"]), g["latency_ms"], g["grants_per_write"]]]))
    if "flush" in out:
        print(f"\n3. cluster-wide flush, {args.dirty // MiB} MiB dirty per node")
        print(table(["nodes", "flush s", "MiB/s written back"],
                    [[r["nodes"], r["flush_s"], r["mib_s"]] for r in out["flush"]]))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
