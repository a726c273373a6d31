"""Online backup benchmark (issue 6): what a backup costs the writers, per log mode.

One cluster (4 KiB blocks, two sparse disks), its coordinator and two node agents as
real processes (``sdbackup coordinator``, ``sdbackup node``), filled with ``--fill``
bytes of files first (half per writer). Then, as medians of ``--runs`` runs (the order
of the log modes rotates from run to run):

1. **foreground write throughput**: two writer processes (one per node) overwrite
   their own existing files with ``--write`` (1 MiB) writes at random 1 MiB-aligned
   offsets, with an fsync every ``--fsync-every`` writes (so that write-backs happen
   while the backup runs, each needing before images). Bytes acknowledged per second
   (a write counts when ``write`` returns; the fsyncs' time is part of the window)
   over a fixed ``--baseline`` window without a backup, and over exactly the backup's
   duration during a backup in each log mode. Ratio = during / without.
   Target (issue 6): >= 0.7 in ``inline`` and ``central`` modes.
2. **backup time under load / backup time idle**, per mode (the idle backup has no
   writer at all).
3. **before-image log volume** per mode (the backup's summary: ``log.blocks``,
   ``log.bytes``, ``log.records``).

The backup is the coordinator's ``backup`` request with the arguments that
``sdbackup backup CLUSTER --medium M --log-mode MODE [--log-medium LM] --json`` sends
(so the window is exactly the request, without the CLI's start-up); each generation
is deleted after it is measured. The page cache is dropped right before every window
(after the writers' warm-up, so that every copy reads the disks cold; needs root).

Writer paths (``--path``):

- ``client`` (default, the reported figure): each writer process *is* the cluster
  member, an in-process :class:`~sdbackup.cluster.node.ClusterClient` with its own
  coherent write-back cache (64 MiB), what a program on a node does through FUSE or
  linked with the node: its write-backs, before-image reads and ``put_bi`` calls
  happen in the writer process. Every writer also times its own calls to the
  coordinator and the disks (wrapped in the writer process, no change to the code
  under test), which gives the per-write breakdown printed after the tables.
- ``node``: the writer reaches node agent n1/n2 through its control port
  (``open_fs(cluster, node=NAME)``): the node agent's cache does the write-backs.

::

    .venv/bin/python bench/online.py                 # ~6-8 minutes on 2 CPUs
    .venv/bin/python bench/online.py --quick         # a smoke run (~1 minute)
    .venv/bin/python bench/online.py --json          # JSON on stdout, no table
    .venv/bin/python bench/online.py --json out.json # the table, and JSON in out.json
    .venv/bin/python bench/online.py --path both     # control-port writers too
    .venv/bin/python bench/online.py --profile DIR   # + py-spy of a central backup
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import drop_caches
from common import format_table as table

_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

MiB = 1 << 20
HERE = Path(__file__).resolve()
MODES = ("merged", "central", "inline", "separate")
LOGNODE = "lognode"
"""Not in the default list (``--modes central,lognode``): central mode with the log
manager on node agent n2 (``--log-node n2``, Fig. 36) instead of the coordinator."""
TARGET = 0.7
TARGET_MODES = ("central", "inline")
SDB = [sys.executable, "-m", "sdbackup.cli.main"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"



def git_commit() -> str:
    r = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain",
                            "--untracked-files=no", "--", "../src"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return (r.stdout.strip() or "?") + ("+dirty src" if dirty else "")


# -- the writer (a child process) -----------------------------------------------------------
# Calls the writer times in itself (client path): name -> (module, class, method).
_TIMED = {
    "acquire": ("sdbackup.cluster.node", "RemoteRights", "acquire"),
    "release_rights": ("sdbackup.cluster.node", "RemoteRights", "release"),
    "getattr": ("sdbackup.net.remote", "RemoteMeta", "getattr"),
    "map_write": ("sdbackup.net.remote", "RemoteMeta", "map_write"),
    "commit_write": ("sdbackup.net.remote", "RemoteMeta", "commit_write"),
    "meta_sync": ("sdbackup.net.remote", "RemoteMeta", "sync"),
    "bi_log (read old + put_bi)": ("sdbackup.fs.cached", "CachedFileSystem",
                                   "_log_before_images"),
    "put_bi": ("sdbackup.cluster.node", "RemoteBiSink", "log"),
    "merged: local log + fsync": ("sdbackup.cluster.node", "LocalBiSink", "log"),
    "disk pwrite": ("sdbackup.blocks.device", "BlockDevice", "write"),
    "disk fsync": ("sdbackup.blocks.device", "BlockDevice", "fsync"),
    "write-back (whole)": ("sdbackup.fs.cached", "CachedFileSystem", "_writeback"),
}


def _instrument(events: list[tuple[str, float, float]]) -> None:
    """Wrap the calls of _TIMED so that each records (name, start, end)."""
    import importlib

    for name, (mod, cls, meth) in _TIMED.items():
        klass = getattr(importlib.import_module(mod), cls)
        orig = getattr(klass, meth)

        def wrapper(*a: Any, __o: Any = orig, __n: str = name, **k: Any) -> Any:
            t = time.monotonic()
            try:
                return __o(*a, **k)
            finally:
                events.append((__n, t, time.monotonic()))

        setattr(klass, meth, wrapper)


def worker(spec: dict[str, Any]) -> None:
    rng = random.Random(spec["seed"])
    chunk = os.urandom(spec["write"])
    events: list[tuple[str, float, float]] = []
    if spec["path"] == "client":
        _instrument(events)
        from sdbackup.cluster.node import ClusterClient

        cc = ClusterClient(spec["name"], cluster_dir=spec["cluster"],
                           cache_bytes=spec["cache"], flush_delay=5.0)
        fs: Any = cc.fs
        ctx: Any = cc
    else:
        from sdbackup.cluster.access import open_fs

        ctx = open_fs(spec["cluster"], node=spec["node"])
        fs = ctx.__enter__()
    inos = [fs.resolve(p).ino for p in spec["files"]]
    slots = spec["file_size"] // spec["write"]
    if spec["hot"]:  # control: overwrite only the first HOT bytes of the first file
        inos, slots = inos[:1], max(1, min(slots, spec["hot"] // spec["write"]))
    go, stop = Path(spec["go"]), Path(spec["stop"])
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.002)
    acks: list[float] = []
    errors: list[tuple[float, str]] = []
    n = 0
    mono = time.monotonic
    while not stop.exists():
        ino = inos[rng.randrange(len(inos))]
        try:
            fs.write(ino, rng.randrange(slots) * spec["write"], chunk)
        except Exception as e:  # counted and reported (see the report's 'errors')
            errors.append((mono(), f"write: {type(e).__name__}: {e}"))
            continue
        acks.append(mono())
        n += 1
        if n % spec["fsync_every"] == 0:
            try:
                fs.fsync(ino)
            except Exception as e:  # the data stays dirty; the next fsync retries
                errors.append((mono(), f"fsync: {type(e).__name__}: {e}"))
    for _ in range(5):
        try:
            fs.fsync(None)
            break
        except Exception as e:
            errors.append((mono(), f"final fsync: {type(e).__name__}: {e}"))
            time.sleep(0.2)
    stats = dict(cc.fs.stats) if spec["path"] == "client" else {}
    if spec["path"] == "client":
        cc.close()
    else:
        ctx.__exit__(None, None, None)
    Path(spec["out"]).write_text(json.dumps({"acks": acks, "write": spec["write"],
                                             "events": events, "stats": stats,
                                             "errors": errors}))


def plain_copy(spec: dict[str, Any]) -> None:
    """Control load (``--control``): what a copy costs without any backup machinery:
    the first ``bytes`` of each disk image (where the files were put) read in 8 MiB
    ``preadv`` calls by a reader thread and written to one file by this thread (four
    buffers in flight, as the copier does), fsynced at the end."""
    import queue
    import threading

    bufs = [bytearray(8 * MiB) for _ in range(4)]
    free: queue.Queue[int] = queue.Queue()
    full: queue.Queue[tuple[int, int] | None] = queue.Queue()
    for i in range(len(bufs)):
        free.put(i)

    def reader() -> None:
        for path in spec["disks"]:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                for off in range(0, spec["bytes"], 8 * MiB):
                    i = free.get()
                    n = os.preadv(fd, [bufs[i]], off)
                    full.put((i, n))
                    if n <= 0:
                        break
            finally:
                os.close(fd)
        full.put(None)

    t = time.monotonic()
    th = threading.Thread(target=reader, daemon=True)
    th.start()
    out = os.open(spec["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while (item := full.get()) is not None:
            i, n = item
            if n > 0:
                os.write(out, memoryview(bufs[i])[:n])
            free.put(i)
        os.fsync(out)
    finally:
        os.close(out)
        os.unlink(spec["out"])
    th.join()
    print(json.dumps({"seconds": time.monotonic() - t}))


class Writers:
    """Two writer processes; ``start()`` returns once both are connected and going."""

    def __init__(self, env: Env, tag: str, path: str) -> None:
        self.env, self.tag, self.path = env, tag, path
        self.go = env.base / f"go-{tag}"
        self.stop_file = env.base / f"stop-{tag}"
        self.procs: list[subprocess.Popen[str]] = []
        self.outs: list[Path] = []
        for f in (self.go, self.stop_file):  # a tag used before must start afresh
            f.unlink(missing_ok=True)

    def start(self) -> None:
        e = self.env
        for i, node in enumerate(("n1", "n2")):
            out = e.base / f"w-{self.tag}-{node}.json"
            spec = {"path": self.path, "cluster": str(e.cdir), "node": node,
                    "name": f"w-{self.tag}-{node}", "files": e.files[node],
                    "file_size": e.file_size, "write": e.args.write,
                    "fsync_every": e.args.fsync_every, "cache": e.args.cache,
                    "hot": e.args.hot,
                    "seed": hash((self.tag, i)) & 0xFFFF, "go": str(self.go),
                    "stop": str(self.stop_file), "out": str(out)}
            self.procs.append(subprocess.Popen(
                [sys.executable, str(HERE), "--worker", json.dumps(spec)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            self.outs.append(out)
        for p in self.procs:
            line = p.stdout.readline() if p.stdout else ""
            if line.strip() != "ready":
                self.kill()
                raise SystemExit(f"writer did not start: {p.stderr.read() if p.stderr else ''}")
        self.go.touch()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def finish(self) -> list[dict[str, Any]]:
        self.stop_file.touch()
        res = []
        for p, out in zip(self.procs, self.outs, strict=True):
            _, err = p.communicate(timeout=300)
            if p.returncode != 0:
                raise SystemExit(f"writer failed ({p.returncode}):\n{err[-3000:]}")
            res.append(json.loads(out.read_text()))
            out.unlink()
        return res

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def window_stats(res: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    """Bytes acknowledged in [t0, t1] by all writers, and the writers' time per call."""
    acked = sum(sum(1 for t in r["acks"] if t0 <= t <= t1) * r["write"] for r in res)
    secs = max(t1 - t0, 1e-9)
    calls: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for r in res:
        for name, a, b in r["events"]:
            if t0 <= b <= t1:
                c = calls[name]
                c[0] += 1
                c[1] += b - a
    writes = acked // res[0]["write"] if res else 0
    errors = [m for r in res for _, m in r["errors"]]
    # The longest time in the window during which no writer had a write acknowledged.
    edges = [t0, *sorted(t for r in res for t in r["acks"] if t0 <= t <= t1), t1]
    stall = max(b - a for a, b in itertools.pairwise(edges))
    return {"seconds": secs, "bytes": acked, "mib_s": acked / MiB / secs, "writes": writes,
            "calls": {k: {"n": int(v[0]), "s": v[1]} for k, v in calls.items()},
            "stats": [r["stats"] for r in res], "errors": errors, "stall_s": stall}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


class CpuMeter:
    """CPU seconds per wall second of the coordinator and the writers over a window."""

    def __init__(self, env: Env, w: Writers) -> None:
        self.pids = {"coordinator": [env.coord.pid], "writers": w.pids(),
                     "node agents": [p.pid for p in env.nodes.values()]}
        self.t0 = time.monotonic()
        self.c0 = {k: sum(cpu_seconds(p) for p in v) for k, v in self.pids.items()}

    def stop(self) -> dict[str, float]:
        dt = time.monotonic() - self.t0
        return {k: round((sum(cpu_seconds(p) for p in v) - self.c0[k]) / dt, 3)
                for k, v in self.pids.items()}


# -- the cluster ------------------------------------------------------------------------------
class Env:
    def __init__(self, base: Path, args: argparse.Namespace) -> None:
        from sdbackup.cluster.launch import start_coordinator, start_node

        self.base, self.args = base, args
        self.cdir = base / "cluster"
        self.procs: list[Any] = []
        r = subprocess.run([*SDB, "init", str(self.cdir), "--block-size", "4096",
                            "--disk", f"d0={base / 'd0.img'}:{args.disk}",
                            "--disk", f"d1={base / 'd1.img'}:{args.disk}"],
                           capture_output=True, text=True, check=False)
        if r.returncode:
            raise SystemExit(f"init failed: {r.stderr}")
        self.coord = start_coordinator(self.cdir, lease=10.0)
        self.procs.append(self.coord)
        self.nodes = {}
        for n in ("n1", "n2"):
            self.nodes[n] = start_node(self.cdir, n, cache_size=f"{args.cache // MiB}MiB",
                                       flush_delay=5.0)
            self.procs.append(self.nodes[n])
        self.files: dict[str, list[str]] = {}
        self.file_size = 0

    def fill(self) -> float:
        """``--fill`` bytes in ``--files`` files per writer, written through an in-process
        client (the data the backups copy and the writers overwrite)."""
        from sdbackup.cluster.node import ClusterClient

        a = self.args
        per_file = max(a.write, (a.fill // 2 // a.files) // a.write * a.write)
        self.file_size = per_file
        t = time.monotonic()
        chunk = bytearray(os.urandom(a.write))
        with ClusterClient("fill", cluster_dir=self.cdir, cache_bytes=64 * MiB) as cc:
            fs = cc.fs
            for node in ("n1", "n2"):
                self.files[node] = []
                for k in range(a.files):
                    path = f"/{node}-f{k}"
                    ino = fs.create(1, path[1:].encode()).ino
                    for off in range(0, per_file, a.write):
                        chunk[:8] = off.to_bytes(8, "little")
                        fs.write(ino, off, chunk)
                    self.files[node].append(path)
            fs.fsync(None)
        return time.monotonic() - t

    def backup(self, mode: str, tag: str) -> tuple[float, dict[str, Any]]:
        """One backup through the coordinator (what ``sdbackup backup --log-mode MODE
        --json`` asks for); the generation is removed afterwards."""
        from sdbackup.cluster.access import coordinator_client

        where = self.args.medium_dir or self.base
        medium = where / f"medium-{tag}"
        lm = where / f"logmedium-{tag}"
        args = {"medium": str(medium), "compression": self.args.compress_name,
                "level": self.args.compress_level,
                "log_mode": "central" if mode == LOGNODE else mode,
                "log_medium": str(lm) if mode == "separate" else None, "overlay": False,
                "pre_freeze": None, "post_thaw": None, "bwlimit": self.args.bwlimit_bytes,
                "pace": self.args.pace, **({"log_node": "n2"} if mode == LOGNODE else {})}
        with coordinator_client(self.cdir) as c:
            t = time.monotonic()
            s, _ = c.call("backup", args, timeout=None)
            dt = time.monotonic() - t
        shutil.rmtree(medium, ignore_errors=True)
        shutil.rmtree(lm, ignore_errors=True)
        return dt, s

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


# -- phases --------------------------------------------------------------------------------------
def warm_then_drop(env: Env) -> bool:
    """Let the writers (if any) reach their steady state, then empty the page cache and
    let the disk settle, so that every window starts alike: the copy reads the disks
    cold (the writers' overwrites would otherwise leave much of the data cached, and
    a loaded backup would read faster than an idle one)."""
    time.sleep(env.args.warmup)
    dropped = drop_caches()
    time.sleep(0.5)
    return dropped


def phase_baseline(env: Env, path: str, tag: str) -> dict[str, Any]:
    w = Writers(env, tag, path)
    try:
        w.start()
        dropped = warm_then_drop(env)
        t0 = time.monotonic()
        cpu = CpuMeter(env, w)
        time.sleep(env.args.baseline)
        t1 = time.monotonic()
        cpu_s = cpu.stop()
        res = w.finish()
    except BaseException:
        w.kill()
        raise
    out = window_stats(res, t0, t1)
    out["dropped_caches"] = dropped
    out["cpu"] = cpu_s
    return out


def phase_loaded(env: Env, path: str, mode: str, tag: str,
                 profile: Path | None = None, kind: str = "wall") -> dict[str, Any]:
    w = Writers(env, tag, path)
    spies: list[subprocess.Popen[bytes]] = []
    try:
        w.start()
        dropped = warm_then_drop(env)
        if profile is not None:
            spies = start_spies(env, w, profile, tag, kind)
        t0 = time.monotonic()
        cpu = CpuMeter(env, w)
        dt, summary = env.backup(mode, tag)
        t1 = time.monotonic()
        cpu_s = cpu.stop()
        for s in spies:
            s.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        res = w.finish()
    except BaseException:
        w.kill()
        raise
    finally:
        for s in spies:
            with contextlib.suppress(subprocess.TimeoutExpired):
                s.wait(30)
    out = window_stats(res, t0, t1)
    out.update(backup_s=dt, summary=summary, dropped_caches=dropped, cpu=cpu_s)
    # When writer errors happened, relative to the end of the backup (s; < 0: before).
    out["error_times_rel_end"] = [round(t - t1, 4) for r in res for t, _ in r["errors"]]
    return out


def phase_control(env: Env, path: str, tag: str) -> dict[str, Any]:
    """The writers while a plain file copy (no backup, no before images) reads the
    disks and writes a medium file: the share of the slowdown that the copy's I/O and
    CPU alone cause on this machine."""
    w = Writers(env, tag, path)
    where = env.args.medium_dir or env.base
    spec = {"disks": [str(env.base / "d0.img"), str(env.base / "d1.img")],
            "bytes": env.file_size * env.args.files + 8 * MiB,
            "out": str(where / f"plain-copy-{tag}")}
    try:
        w.start()
        dropped = warm_then_drop(env)
        t0 = time.monotonic()
        cpu = CpuMeter(env, w)
        r = subprocess.run([sys.executable, str(HERE), "--copier", json.dumps(spec)],
                           capture_output=True, text=True, check=True)
        t1 = time.monotonic()
        cpu_s = cpu.stop()
        res = w.finish()
    except BaseException:
        w.kill()
        raise
    out = window_stats(res, t0, t1)
    out.update(copy_s=json.loads(r.stdout)["seconds"], dropped_caches=dropped, cpu=cpu_s)
    return out


def phase_idle(env: Env, mode: str, tag: str) -> dict[str, Any]:
    dropped = warm_then_drop(env)
    dt, summary = env.backup(mode, tag)
    return {"backup_s": dt, "summary": summary, "dropped_caches": dropped}


# -- profiling -------------------------------------------------------------------------------------
def _spy() -> str | None:
    p = Path(sys.executable).parent / "py-spy"
    return str(p) if p.exists() else shutil.which("py-spy")


_SPY_KINDS = {"wall": ["--idle"],  # every thread, waiting or not: where the time goes
              "cpu": [],  # only threads running (on a CPU or runnable)
              "gil": ["--gil"]}  # only the thread holding the GIL


def start_spies(env: Env, w: Writers, out: Path, tag: str,
                kind: str) -> list[subprocess.Popen[bytes]]:
    """py-spy record (raw collapsed stacks) of the coordinator, the first writer
    (client path: the cluster member doing the write-backs) or node n1 (node path)."""
    spy = _spy()
    if spy is None:
        log("py-spy is not installed (pip install py-spy): not profiling")
        return []
    out.mkdir(parents=True, exist_ok=True)
    targets = {"coordinator": env.coord.pid, "writer-n1": w.pids()[0]}
    if w.path == "node":
        targets["node-n1"] = env.nodes["n1"].pid
    spies = []
    for name, pid in targets.items():
        dest = out / f"{tag}-{name}.txt"
        spies.append(subprocess.Popen(
            [spy, "record", "-p", str(pid), "-r", str(env.args.profile_rate), "-f", "raw",
             "-o", str(dest), "--nonblocking", *_SPY_KINDS[kind]],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # py-spy attaches
    return spies


_ANCHORS = (".rpc_", "Copier.copy.<locals>.reader", "run_backup", "_flush_loop",
            "CachedFileSystem.", "NodeAgent.", "_heartbeat_loop", "worker")


_PLUMBING = ("threading.py:", "/rpc.py:", "/protocol.py:", "socket.py:", "online.py:",
             "contextlib.py:", "queue.py:", "_base.py:", "/thread.py:", "_Ref.call ")


def summarize_profile(path: Path, chains: int = 4) -> str:
    """Samples of a raw py-spy file grouped by what the thread was doing: the outermost
    'anchor' frame (an RPC handler, the copy's reader thread, the backup, the writer's
    file system call...), then the innermost three frames under it."""
    if not path.exists():
        return f"{path.name}: missing"
    total = 0
    groups: collections.Counter[str] = collections.Counter()
    inner: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        k = int(n)
        total += k
        frames = stack.split(";")
        names = [f.split(" (")[0] for f in frames]
        # Frames of the plumbing (threads, RPC, sockets, this script's timing wrapper)
        # say nothing about what is waited for: the inner chain skips them, so that a
        # wait shows under the call that waits (e.g. RemoteMeta.map_write).
        keep = [i for i, f in enumerate(frames)
                if not any(x in f for x in _PLUMBING)]
        anchor = "other (idle threads: socket reads, pool waits)"
        at = 0
        for idx, f in enumerate(names):
            if any(a in f for a in _ANCHORS) and f != "worker":
                anchor, at = f, idx
                break
        else:
            if "worker" in names:
                anchor, at = "worker", names.index("worker")
        groups[anchor] += k
        below = [names[i] for i in keep if i > at]
        leaf = names[-1] if names[-1] not in below[-1:] else ""
        chain = " < ".join(reversed(below[-3:]))
        inner[anchor][chain + (f" [{leaf}]" if leaf and chain else leaf)] += k
    lines = [f"{path.name}: {total} samples"]
    for g, k in groups.most_common(12):
        lines.append(f"  {100 * k / max(total, 1):5.1f}%  {g}")
        for c, m in inner[g].most_common(chains):
            lines.append(f"           {100 * m / max(total, 1):5.1f}%  {c or '(itself)'}")
    return "\n".join(lines)


# -- the run --------------------------------------------------------------------------------------
def med(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def run_all(env: Env, args: argparse.Namespace, paths: list[str]) -> dict[str, Any]:
    modes = args.mode_list
    raw: dict[str, Any] = {p: {"baseline": [], **{m: [] for m in modes}} for p in paths}
    idle: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for r in range(args.runs):
        k = r % len(modes)
        order = modes[k:] + modes[:k]
        for path in paths:
            b = phase_baseline(env, path, f"{path}-base-{r}")
            raw[path]["baseline"].append(b)
            log(f"run {r + 1}/{args.runs} [{path}] baseline: {b['mib_s']:.0f} MiB/s "
                f"(load {loadavg()})")
            if args.control:
                c = phase_control(env, path, f"{path}-control-{r}")
                raw[path].setdefault("plain copy", []).append(c)
                log(f"run {r + 1}/{args.runs} [{path}] during a plain copy of the disks "
                    f"({c['copy_s']:.1f} s): {c['mib_s']:.0f} MiB/s")
        for mode in order:
            i = phase_idle(env, mode, f"idle-{mode}-{r}")
            idle[mode].append(i)
            msg = f"run {r + 1}/{args.runs} {mode:<8} idle {i['backup_s']:5.1f} s"
            for path in paths:
                ld = phase_loaded(env, path, mode, f"{path}-{mode}-{r}")
                raw[path][mode].append(ld)
                lg = ld["summary"].get("log", {})
                msg += (f" | [{path}] loaded {ld['backup_s']:5.1f} s, writers "
                        f"{ld['mib_s']:.0f} MiB/s, log {lg.get('bytes', 0) / MiB:.0f} MiB")
                if ld["errors"]:
                    msg += f", {len(ld['errors'])} writer error(s): {ld['errors'][0][:200]}"

            log(msg + f" (load {loadavg()})")
    return {"raw": raw, "idle": idle}


def tabulate(res: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    idle = res["idle"]
    for path in paths:
        raw = res["raw"][path]
        base = med([b["mib_s"] for b in raw["baseline"]])
        rows = []
        for m in idle:
            lds = raw[m]
            if not lds:
                continue
            thr = med([x["mib_s"] for x in lds])
            ratios = [x["mib_s"] / b["mib_s"] for x, b in zip(lds, raw["baseline"],
                                                              strict=False)]
            t_idle = med([x["backup_s"] for x in idle[m]])
            t_load = med([x["backup_s"] for x in lds])
            logs = [x["summary"].get("log", {}) for x in lds]
            blocks = med([x["summary"]["blocks"] for x in lds])
            rows.append({
                "mode": m, "baseline_mib_s": base, "during_mib_s": thr,
                "ratio": thr / base if base else float("nan"),
                "ratio_per_run": [round(x, 3) for x in ratios],
                "idle_backup_s": t_idle, "loaded_backup_s": t_load,
                "time_ratio": t_load / t_idle if t_idle else float("nan"),
                "log_mib": med([lg.get("bytes", 0) / MiB for lg in logs]),
                "log_blocks": med([lg.get("blocks", 0) for lg in logs]),
                "log_records": med([lg.get("records", 0) for lg in logs]),
                "bi_runs": med([lg.get("bi_runs", 0) for lg in logs]),
                "log_pct_of_backup": 100 * med([lg.get("blocks", 0) for lg in logs]) / blocks
                if blocks else 0.0,
                "written_during_mib": med([x["bytes"] / MiB for x in lds]),
                "freeze_s": med([x["summary"]["freeze_seconds"] for x in lds]),
                "writer_errors": sum(len(x["errors"]) for x in lds),
                "stall_s": med([x["stall_s"] for x in lds]),
                "error_samples": sorted({e[:300] for x in lds for e in x["errors"]})[:5],
                "copy_mib_s_idle": med([x["summary"]["raw_bytes"] / MiB / x["backup_s"]
                                        for x in idle[m]]),
            })
        for r, m in zip(rows, [r["mode"] for r in rows], strict=True):
            r["cpu"] = {k: med([x["cpu"][k] for x in raw[m]]) for k in raw[m][0]["cpu"]}
        base_cpu = {k: med([x["cpu"][k] for x in raw["baseline"]])
                    for k in raw["baseline"][0]["cpu"]} if raw["baseline"] else {}
        ctl = raw.get("plain copy", [])
        control = {"during_mib_s": med([x["mib_s"] for x in ctl]),
                   "ratio": med([x["mib_s"] for x in ctl]) / base if base else 0.0,
                   "copy_s": med([x["copy_s"] for x in ctl]),
                   "cpu": {k: med([x["cpu"][k] for x in ctl]) for k in ctl[0]["cpu"]}
                   } if ctl else None
        out[path] = {"baseline_mib_s": base, "baseline_cpu": base_cpu, "control": control,
                     "baseline_stall_s": med([b["stall_s"] for b in raw["baseline"]]),
                     "baseline_runs": [round(b["mib_s"], 1) for b in raw["baseline"]],
                     "rows": rows, "breakdown": breakdown(raw)}
    return out


def breakdown(raw: dict[str, Any]) -> dict[str, Any]:
    """Per phase: the writers' milliseconds per acknowledged MiB spent in each timed
    call (client path; summed over both writers, so per-writer time = value)."""
    out = {}
    for phase in raw:
        agg: dict[str, float] = collections.defaultdict(float)
        cnt: dict[str, float] = collections.defaultdict(float)
        mib = 0.0
        for x in raw[phase]:
            mib += x["bytes"] / MiB
            for k, v in x["calls"].items():
                agg[k] += v["s"]
                cnt[k] += v["n"]
        if mib:
            out[phase] = {k: {"ms_per_mib": 1000 * agg[k] / mib, "calls_per_mib": cnt[k] / mib,
                              "ms_per_call": 1000 * agg[k] / cnt[k] if cnt[k] else 0.0}
                          for k in agg}
            out[phase]["_wall_ms_per_mib"] = {
                "ms_per_mib": 1000 * sum(x["seconds"] for x in raw[phase]) * 2 / mib,
                "calls_per_mib": 0.0, "ms_per_call": 0.0}
    return out



def report(out: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\nonline backup benchmark: medians of {args.runs} run(s); {os.cpu_count()} CPUs; "
          f"load average before/after {out['load_before']} / {out['load_after']}; "
          f"page cache dropped: {out['dropped_caches']}; commit {out['commit']}")
    print(f"cluster: 2 disks x {args.disk_text}, 4 KiB blocks, {out['fill_mib']:.0f} MiB of "
          f"files ({args.files} per writer), node/writer caches {args.cache // MiB} MiB; "
          f"writers: {args.write // MiB} MiB random overwrites, fsync every "
          f"{args.fsync_every}; compression {args.compress}"
          + (f"; HOT SET {args.hot // MiB} MiB per writer" if args.hot else "")
          + f"; media in {args.medium_dir or 'the scratch dir (same file system as the disks)'}")
    for path, t in out.get("tables", {}).items():
        label = ("in-process ClusterClient writers" if path == "client"
                 else "control-port writers (node agents)")
        print(f"\n[{path}] {label}: baseline {t['baseline_mib_s']:.0f} MiB/s "
              f"(runs {t['baseline_runs']}; longest stall {t['baseline_stall_s']:.3f} s)")
        print(table(["mode", "during MiB/s", "ratio", "per run", "backup idle s",
                     "loaded s", "loaded/idle", "log MiB", "log blocks", "log % of copy",
                     "records", "freeze s", "stall s", "errors"],
                    [[r["mode"], r["during_mib_s"], r["ratio"],
                      ",".join(f"{x:.2f}" for x in r["ratio_per_run"]),
                      r["idle_backup_s"], r["loaded_backup_s"], r["time_ratio"], r["log_mib"],
                      int(r["log_blocks"]), r["log_pct_of_backup"], int(r["log_records"]),
                      r["freeze_s"], r["stall_s"], r["writer_errors"]] for r in t["rows"]]))
        if t.get("control"):
            c = t["control"]
            print(f"  control, a plain file copy of the disks' used part to the medium "
                  f"directory (no backup): writers {c['during_mib_s']:.0f} MiB/s, ratio "
                  f"{c['ratio']:.2f} (copy {c['copy_s']:.2f} s)")
        for r in t["rows"]:
            for e in r["error_samples"]:
                print(f"  writer error in {r['mode']}: {e}")
        for r in t["rows"]:
            if r["mode"] in TARGET_MODES:
                ok = "met" if r["ratio"] >= TARGET else "MISSED"
                print(f"  target ratio >= {TARGET} in {r['mode']}: {ok} ({r['ratio']:.2f})")
        cpu_rows = [["baseline", *t["baseline_cpu"].values()]] + \
            ([["plain copy", *t["control"]["cpu"].values()]] if t.get("control") else []) + \
            [[r["mode"], *r["cpu"].values()] for r in t["rows"]]
        print("\n  CPU seconds per second over the window (2 CPUs in all)")
        print(table(["phase", *t["baseline_cpu"].keys()], cpu_rows))
        bd = t["breakdown"]
        if path == "client" and bd:
            names = sorted({k for ph in bd.values() for k in ph if not k.startswith("_")})
            print("\n  writers' time per acknowledged MiB (ms; sum over the calls in the window;"
                  " calls nest: write-back contains map_write, bi_log, pwrite, commit_write)")
            phases = list(bd)
            print(table(["call", *phases],
                        [[n, *[bd[p].get(n, {}).get("ms_per_mib", 0.0) for p in phases]]
                         for n in names]
                        + [["wall (2 writers)", *[bd[p]["_wall_ms_per_mib"]["ms_per_mib"]
                                                 for p in phases]]]))
            print("\n  ms per call")
            print(table(["call", *phases],
                        [[n, *[bd[p].get(n, {}).get("ms_per_call", 0.0) for p in phases]]
                         for n in names]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--copier", help=argparse.SUPPRESS)
    ap.add_argument("--control", action="store_true",
                    help="also measure the writers during a plain file copy of the disks "
                         "(no backup): the cost of the copy's I/O and CPU alone")
    ap.add_argument("--quick", action="store_true", help="small sizes, one run (smoke)")
    ap.add_argument("--runs", type=int, default=None, help="runs per measurement (3; "
                    "--quick: 1); 0 with --profile: only the profiled backup")
    ap.add_argument("--disk", default="1GiB", help="size of each of the 2 sparse disks")
    ap.add_argument("--fill", default="600MiB", help="data written before the runs")
    ap.add_argument("--files", type=int, default=6, help="files per writer")
    ap.add_argument("--write", default="1MiB", help="size of each overwrite")
    ap.add_argument("--fsync-every", type=int, default=8)
    ap.add_argument("--cache", default="64MiB", help="node agents' and writers' cache")
    ap.add_argument("--baseline", type=float, default=8.0,
                    help="seconds of the window without a backup")
    ap.add_argument("--warmup", type=float, default=1.5,
                    help="seconds the writers run before a window opens")
    ap.add_argument("--compress", default="none", help="backup compression (none, zstd:N)")
    ap.add_argument("--bwlimit", default="0",
                    help="the backup's --bwlimit (e.g. 100MiB; 0: none)")
    ap.add_argument("--pace", default="off", choices=["off", "adaptive"],
                    help="the backup's --pace")
    ap.add_argument("--medium-dir", type=Path, metavar="DIR",
                    help="put the backup and log media here (default: next to the disks, "
                         "i.e. on the same file system); e.g. /dev/shm stands for a "
                         "separate, fast medium")
    ap.add_argument("--hot", default="0", metavar="SIZE",
                    help="control experiment: writers overwrite only the first SIZE bytes "
                         "of one file (fits the cache: after the first overwrite of each "
                         "block no before image is needed in central/inline/separate)")
    ap.add_argument("--path", choices=["client", "node", "both"], default="client")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="afterwards, py-spy a central-mode backup under load into DIR")
    ap.add_argument("--profile-rate", type=int, default=100)
    ap.add_argument("--profile-kinds", default="wall,gil",
                    help="py-spy modes, one profiled backup each: wall (--idle), cpu, gil")
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE",
                    help="print the results as JSON instead of the table; with FILE, "
                         "print the table and write the JSON there")
    ap.add_argument("--dir", type=Path, default=Path(os.environ.get("SDBACKUP_BENCH_DIR",
                                                                     "/var/tmp")))
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.copier:
        plain_copy(json.loads(args.copier))
        return
    from sdbackup.backup.engine import parse_compression
    from sdbackup.cluster.config import parse_size

    if args.quick:
        args.disk, args.fill, args.baseline = "256MiB", "160MiB", 3.0
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    args.disk_text = args.disk
    for k in ("disk", "fill", "write", "cache", "hot"):
        setattr(args, k, parse_size(getattr(args, k)))
    args.compress_name, args.compress_level = parse_compression(args.compress)
    args.compress_level = args.compress_level or 1
    args.bwlimit_bytes = parse_size(args.bwlimit)
    args.mode_list = tuple(m for m in args.modes.split(",") if m)
    if not set(args.mode_list) <= {*MODES, LOGNODE}:
        raise SystemExit(f"--modes: choose among {', '.join((*MODES, LOGNODE))}")
    paths = ["client", "node"] if args.path == "both" else [args.path]

    base = Path(tempfile.mkdtemp(prefix="sdbackup-bench-online-", dir=args.dir))
    if args.medium_dir is not None:
        args.medium_dir = Path(tempfile.mkdtemp(prefix="sdbackup-bench-media-",
                                                dir=args.medium_dir))
    started = time.monotonic()
    out: dict[str, Any] = {"load_before": loadavg(), "commit": git_commit(),
                           "cpus": os.cpu_count(), "runs": args.runs,
                           "config": {k: v for k, v in vars(args).items()
                                      if k not in ("worker", "copier", "profile", "dir")}}
    env = None
    try:
        env = Env(base, args)
        fill_s = env.fill()
        out["fill_mib"] = env.file_size * args.files * 2 / MiB
        log(f"filled {out['fill_mib']:.0f} MiB in {fill_s:.1f} s (load {loadavg()})")
        out["dropped_caches"] = drop_caches()
        if args.runs > 0:
            res = run_all(env, args, paths)
            out["tables"] = tabulate(res, paths)
            out["raw"] = {p: {ph: [{k: v for k, v in x.items() if k != "calls"} for x in xs]
                              for ph, xs in res["raw"][p].items()} for p in paths}
            out["idle_raw"] = res["idle"]
        if args.profile is not None:
            prof_path = "node" if args.path == "node" else "client"
            out["profile"] = {"dir": str(args.profile), "path": prof_path, "backups": []}
            texts = []
            for kind in args.profile_kinds.split(","):
                log(f"profiling a central-mode backup under load ({prof_path} writers, "
                    f"py-spy {kind}) ...")
                pr = phase_loaded(env, prof_path, "central", f"central-{prof_path}-{kind}",
                                  args.profile, kind)
                out["profile"]["backups"].append(
                    {"kind": kind, "backup_s": pr["backup_s"], "mib_s": pr["mib_s"],
                     "errors": pr["errors"], "load": loadavg()})
                log(f"  backup {pr['backup_s']:.1f} s, writers {pr['mib_s']:.0f} MiB/s")
                for f in sorted(args.profile.glob(f"central-{prof_path}-{kind}-*.txt")):
                    texts.append(summarize_profile(f))
            (args.profile / "summary.txt").write_text("\n\n".join(texts) + "\n")
            print("\n\n".join(texts), file=sys.stderr)
    finally:
        if env is not None:
            env.close()
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
        if args.medium_dir is not None:
            shutil.rmtree(args.medium_dir, ignore_errors=True)
    out["load_after"] = loadavg()
    out["total_s"] = time.monotonic() - started
    if args.json == "-":
        print(json.dumps(out, indent=2, default=str))
        return
    report(out, args)
    print(f"\ntotal {out['total_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
