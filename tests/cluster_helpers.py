"""Helpers for the multi-process cluster tests (tests/test_cluster_*.py).

Real processes on 127.0.0.1: ``sdbackup coordinator`` and ``sdbackup node`` run as
subprocesses (killed in teardown, always), and the workload runs in small worker
subprocesses that reach a node through its control port
(:func:`sdbackup.cluster.access.open_fs` with ``node=NAME``).

Self-checking records: every record is ``RECORD`` bytes at a record-aligned offset and
names the writer, the file, the slot and a sequence number, plus a checksum; a reader
can tell a torn or misplaced record from an intact one. Writers and readers log every
operation with CLOCK_MONOTONIC timestamps (one clock for every process on the
machine), and :func:`check_history` checks the logs afterwards: no torn record, no
value that was never written, no read older than a write acknowledged before the read
began, and a final state where every slot holds a write that nothing followed.

Run as a script, this module is the worker: ``python cluster_helpers.py worker JSON``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECORD = 128
_HEAD = struct.Struct(">4sIIIQ")  # magic, writer, file index, slot, seq
_MAGIC = b"SDBR"
_SUM = 16
HERE = Path(__file__).resolve().parent
PY = sys.executable
STARTUP_TIMEOUT = 20.0

# Log lines that are expected in fault tests and never a failure by themselves.
TRACEBACK_ALLOW: tuple[str, ...] = ()


# -- records -------------------------------------------------------------------------------

def make_record(writer: int, fidx: int, slot: int, seq: int) -> bytes:
    head = _HEAD.pack(_MAGIC, writer, fidx, slot, seq)
    fill_len = RECORD - len(head) - _SUM
    seed = hashlib.blake2b(head, digest_size=32).digest()
    body = head + (seed * (fill_len // len(seed) + 1))[:fill_len]
    return body + hashlib.blake2b(body, digest_size=_SUM).digest()


def parse_record(data: bytes, fidx: int, slot: int) -> tuple[int, int]:
    """(writer, seq) of an intact record at (fidx, slot); ValueError if torn or misplaced."""
    if len(data) != RECORD:
        raise ValueError(f"short record: {len(data)} bytes")
    body, tag = data[:-_SUM], data[-_SUM:]
    if hashlib.blake2b(body, digest_size=_SUM).digest() != tag:
        raise ValueError(f"torn record (bad checksum): {data[:24].hex()}")
    magic, writer, f, s, seq = _HEAD.unpack_from(body)
    if magic != _MAGIC or f != fidx or s != slot:
        raise ValueError(f"misplaced record: file {f} slot {s} found at file {fidx} slot {slot}")
    if make_record(writer, f, s, seq) != data:
        raise ValueError("record filler does not match its header")
    return writer, seq


def initial_content(fidx: int, nslots: int) -> bytes:
    return b"".join(make_record(0, fidx, s, 0) for s in range(nslots))


# -- processes -----------------------------------------------------------------------------

def sdb_cmd(*args: str) -> list[str]:
    return [PY, "-m", "sdbackup.cli.main", *args]


def sdb(*args: str, timeout: float = 60.0, check: bool = False,
        prefix: Sequence[str] = (), cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run one ``sdbackup`` command to completion (optionally under ``prefix``)."""
    r = subprocess.run([*prefix, *sdb_cmd(*args)], capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"sdbackup {' '.join(args)} exited {r.returncode}:\n"
                             f"{r.stdout}\n{r.stderr}")
    return r


@dataclass
class Proc:
    """A long-running subprocess with its output in a file."""

    name: str
    popen: subprocess.Popen[bytes]
    out: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def output(self) -> str:
        try:
            return self.out.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (after SIGCONT, in case it was stopped), then SIGKILL if it hangs."""
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            raise AssertionError(f"{self.name} did not stop on SIGTERM within {timeout} s:\n"
                                 f"{self.output()[-3000:]}") from None

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
        self.popen.wait(10)


def wait_for(pred: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _addr_pid(path: Path) -> int | None:
    try:
        fields = path.read_text().split()
    except FileNotFoundError:
        return None
    for f in fields[1:]:
        if f.startswith("pid="):
            return int(f[4:])
    return None


@dataclass
class ClusterProcs:
    """One cluster directory and the processes that serve it (killed in ``cleanup``)."""

    base: Path
    block_size: int = 512
    disk_size: str = "64MiB"
    procs: list[Proc] = field(default_factory=list)
    coordinator: Proc | None = None
    nodes: dict[str, Proc] = field(default_factory=dict)
    _n: int = 0

    def __post_init__(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.dir = self.base / "cluster"
        self.logs = self.base / "out"
        self.logs.mkdir(exist_ok=True)
        sdb("init", str(self.dir), "--disk", f"d0={self.base / 'd0.img'}:{self.disk_size}",
            "--block-size", str(self.block_size), check=True)

    # -- starting ------------------------------------------------------------------
    def spawn(self, name: str, argv: list[str], prefix: Sequence[str] = ()) -> Proc:
        self._n += 1
        out = self.logs / f"{name}.{self._n}.out"
        with open(out, "wb") as fh:
            # In the test's own directory: a node without CLUSTER_DIR logs to its cwd.
            p = subprocess.Popen([*prefix, *argv], stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=self.base)
        proc = Proc(name, p, out)
        self.procs.append(proc)
        return proc

    def start_coordinator(self, lease: float = 2.0, listen: str | None = None,
                          prefix: Sequence[str] = ()) -> Proc:
        args = ["coordinator", str(self.dir), "--lease", str(lease)]
        if listen:
            args += ["--listen", listen]
        p = self.spawn("coordinator", sdb_cmd(*args), prefix)
        self._wait_addr(self.dir / "coordinator.addr", p)
        self.coordinator = p
        return p

    def start_node(self, name: str, *, flush_delay: float = 5.0, cache_size: str = "64MiB",
                   cluster_dir: Path | None = None, extra: Sequence[str] = (),
                   prefix: Sequence[str] = (), wait: bool = True) -> Proc:
        cdir = cluster_dir or self.dir
        args = ["node", str(cdir), "--name", name, "--flush-delay", str(flush_delay),
                "--cache-size", cache_size, *extra]
        p = self.spawn(f"node-{name}", sdb_cmd(*args), prefix)
        if wait:
            self._wait_addr(cdir / "nodes" / f"{name}.addr", p)
        self.nodes[name] = p
        return p

    def _wait_addr(self, path: Path, p: Proc) -> None:
        def ready() -> bool:
            if not p.alive():
                raise AssertionError(f"{p.name} exited with {p.popen.returncode} before it "
                                     f"was ready:\n{p.output()[-3000:]}")
            return _addr_pid(path) == p.pid

        wait_for(ready, STARTUP_TIMEOUT, f"{p.name} to write {path.name}")

    def cleanup(self) -> None:
        for p in self.procs:
            try:
                os.kill(p.pid, signal.SIGCONT)
            except (ProcessLookupError, PermissionError):
                pass
            p.kill()

    # -- logs and admin commands ----------------------------------------------------
    def coordinator_log(self) -> str:
        try:
            return (self.dir / "logs" / "coordinator.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def node_log(self, name: str) -> str:
        try:
            return (self.dir / "logs" / f"node-{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, needle: str, timeout: float = 15.0, node: str | None = None) -> str:
        def found() -> str | None:
            text = self.node_log(node) if node else self.coordinator_log()
            return text if needle in text else None

        who = f"node {node}'s log" if node else "the coordinator log"
        return str(wait_for(found, timeout, f"{needle!r} in {who}", 0.1))

    def cache_table(self) -> list[dict[str, Any]]:
        r = sdb("cache", "ls", str(self.dir), "--json", check=True)
        rows: list[dict[str, Any]] = json.loads(r.stdout)
        return rows

    def flush(self) -> subprocess.CompletedProcess[str]:
        return sdb("flush", str(self.dir), check=True)

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = json.loads(sdb("status", str(self.dir), "--json", check=True).stdout)
        return st

    def assert_no_tracebacks(self, allow: Sequence[str] = TRACEBACK_ALLOW) -> None:
        """No process logged a traceback (an unexpected exception), unless allowed."""
        texts = {"coordinator.log": self.coordinator_log()}
        for p in (self.dir / "logs").glob("node-*.log"):
            texts[p.name] = p.read_text(errors="replace")
        for name, text in texts.items():
            for chunk in text.split("Traceback (most recent call last)")[1:]:
                if not any(a in chunk for a in allow):
                    raise AssertionError(f"traceback in {name}:\n{chunk[:3000]}")


# -- workers --------------------------------------------------------------------------------

def start_worker(cp: ClusterProcs, name: str, spec: dict[str, Any],
                 prefix: Sequence[str] = ()) -> Proc:
    return cp.spawn(name, [PY, str(HERE / "cluster_helpers.py"), "worker", json.dumps(spec)],
                    prefix)


def _open(spec: dict[str, Any]) -> Any:
    from sdbackup.cluster.access import open_fs

    return open_fs(spec["cluster"], node=spec["node"], wait=10.0)


def _worker(spec: dict[str, Any]) -> int:
    """Write or read records through one node until ``duration`` runs out.

    Every operation goes to ``spec['out']`` as one JSON line, flushed at once, so
    that the log survives a kill of the node (or of this worker).
    """
    from sdbackup.errors import SdbError

    rng = random.Random(spec.get("seed", 0))
    role, wid = spec["role"], int(spec.get("id", 0))
    files: list[str] = spec["files"]
    slots: list[int] = spec["slots"]
    run = int(spec.get("run", 1))
    end = time.monotonic() + float(spec["duration"])
    max_ops = int(spec.get("max_ops", 1 << 30))
    fsync_every = int(spec.get("fsync_every", 0))
    seq = int(spec.get("seq0", 0))
    errors = 0
    with open(spec["out"], "a", buffering=1) as out, _open(spec) as fs:
        while True:  # a node may be reconnecting (tests that restart the coordinator)
            try:
                inos = [fs.resolve(f).ino for f in files]
                break
            except SdbError:
                if time.monotonic() > end or not spec.get("max_errors"):
                    raise
                time.sleep(0.1)
        ops = 0
        stop = Path(spec["stop"]) if spec.get("stop") else None
        while time.monotonic() < end and ops < max_ops and not (stop and stop.exists()):
            ops += 1
            fidx = rng.randrange(len(files))
            first = rng.choice(slots)
            n = rng.randint(1, run)
            n = max(1, min(n, spec["nslots"] - first))
            t0 = time.monotonic()
            try:
                if role == "writer":
                    seq += 1
                    data = b"".join(make_record(wid, fidx, first + i, seq) for i in range(n))
                    fs.write(inos[fidx], first * RECORD, data)
                    t1 = time.monotonic()
                    synced = bool(fsync_every and seq % fsync_every == 0)
                    if synced:
                        fs.fsync(inos[fidx])
                    t2 = time.monotonic()
                    out.write(json.dumps({"op": "w", "f": fidx, "s": first, "n": n, "w": wid,
                                          "seq": seq, "t0": t0, "t1": t1, "sync": synced,
                                          "t2": t2}) + "\n")
                else:
                    data = fs.read(inos[fidx], first * RECORD, n * RECORD)
                    t1 = time.monotonic()
                    vals = []
                    for i in range(n):
                        rec = data[i * RECORD : (i + 1) * RECORD]
                        try:
                            vals.append(list(parse_record(rec, fidx, first + i)))
                        except ValueError as e:
                            vals.append(["torn", str(e)])
                    out.write(json.dumps({"op": "r", "f": fidx, "s": first, "n": n, "w": wid,
                                          "t0": t0, "t1": t1, "v": vals}) + "\n")
            except (SdbError, OSError) as e:
                # Not acknowledged: the write may or may not have happened.
                errors += 1
                out.write(json.dumps({"op": "err", "role": role, "f": fidx, "s": first,
                                      "n": n, "w": wid, "seq": seq, "t0": t0,
                                      "t1": time.monotonic(), "error": str(e)[:300]}) + "\n")
                if errors > int(spec.get("max_errors", 0)):
                    raise
                time.sleep(0.05)
    return 0


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut off by a kill
            pass
    return out


# -- history checks -------------------------------------------------------------------------

@dataclass
class Write:
    w: int
    seq: int
    t0: float
    t1: float  # inf when never acknowledged
    acked: bool


def writes_by_slot(logs: Sequence[dict[str, Any]]) -> dict[tuple[int, int], dict[tuple[int, int],
                                                                               Write]]:
    """(file, slot) -> {(writer, seq): Write}; failed attempts count as unacknowledged."""
    out: dict[tuple[int, int], dict[tuple[int, int], Write]] = {}
    for e in logs:
        if e["op"] == "w" or (e["op"] == "err" and e["role"] == "writer"):
            ok = e["op"] == "w"
            for i in range(e["n"]):
                wr = Write(e["w"], e["seq"], e["t0"], e["t1"] if ok else float("inf"), ok)
                out.setdefault((e["f"], e["s"] + i), {})[(e["w"], e["seq"])] = wr
    return out


def check_reads(writes: dict[tuple[int, int], dict[tuple[int, int], Write]],
                reads: Sequence[dict[str, Any]]) -> int:
    """Every read record intact, really written, and not older than the reader may see.

    Returns the number of records checked. Raises AssertionError with the first
    violations found.
    """
    problems: list[str] = []
    checked = 0
    last_seen: dict[tuple[int, int, int], Write | None] = {}  # (reader, f, s) -> last value
    for r in sorted(reads, key=lambda e: e["t0"]):
        if r["op"] != "r":
            continue
        for i, v in enumerate(r["v"]):
            key = (r["f"], r["s"] + i)
            checked += 1
            if v[0] == "torn":
                problems.append(f"read at {r['t0']:.4f} of file {key[0]} slot {key[1]}: {v[1]}")
                continue
            ws = writes.get(key, {})
            val = None if (v[0], v[1]) == (0, 0) else ws.get((v[0], v[1]))
            if val is None and (v[0], v[1]) != (0, 0):
                problems.append(f"file {key[0]} slot {key[1]}: read writer {v[0]} seq {v[1]}, "
                                "which was never written there")
                continue
            done = [w for w in ws.values() if w.acked and w.t1 < r["t0"]]
            if done:
                latest = max(done, key=lambda w: w.t1)
                if val is None or (val is not latest and val.t1 < latest.t0):
                    problems.append(
                        f"stale read of file {key[0]} slot {key[1]} (began {r['t0']:.4f}): got "
                        f"{v}, but writer {latest.w} seq {latest.seq} was acknowledged at "
                        f"{latest.t1:.4f}")
            if val is not None and val.t0 > r["t1"]:
                problems.append(f"file {key[0]} slot {key[1]}: read returned a write that "
                                "started after the read ended")
            rk = (r["w"], *key)
            prev = last_seen.get(rk)
            if prev is not None and (val is None or val.t1 < prev.t0):
                problems.append(f"reader {r['w']} went back in time on file {key[0]} slot "
                                f"{key[1]}: {v} after writer {prev.w} seq {prev.seq}")
            last_seen[rk] = val if val is not None else prev
    if problems:
        raise AssertionError(f"{len(problems)} bad reads, first ones:\n" +
                             "\n".join(problems[:15]))
    return checked


def check_final(writes: dict[tuple[int, int], dict[tuple[int, int], Write]],
                content: dict[int, bytes], nslots: int) -> int:
    """Every slot holds a write that no later write followed (or the initial record).

    Returns the number of slots that hold a written (not initial) record.
    """
    problems: list[str] = []
    written = 0
    for fidx, data in content.items():
        for s in range(nslots):
            rec = data[s * RECORD : (s + 1) * RECORD]
            try:
                w, seq = parse_record(rec, fidx, s)
            except ValueError as e:
                problems.append(f"file {fidx} slot {s}: {e}")
                continue
            ws = writes.get((fidx, s), {})
            acked = [x for x in ws.values() if x.acked]
            if (w, seq) == (0, 0):
                if acked:
                    last = max(acked, key=lambda x: x.t1)
                    problems.append(f"file {fidx} slot {s}: acknowledged writes missing "
                                    f"(last: writer {last.w} seq {last.seq})")
                continue
            written += 1
            val = ws.get((w, seq))
            if val is None:
                problems.append(f"file {fidx} slot {s}: holds writer {w} seq {seq}, never "
                                "written there")
                continue
            later = [x for x in acked if x.t0 > val.t1]
            if later:
                x = max(later, key=lambda x: x.t1)
                problems.append(f"file {fidx} slot {s}: holds writer {w} seq {seq}, but "
                                f"writer {x.w} seq {x.seq} was written after it")
    if problems:
        raise AssertionError(f"{len(problems)} bad slots, first ones:\n" +
                             "\n".join(problems[:15]))
    return written


def read_file_via(cluster_dir: Path, node: str, path: str) -> bytes:
    from sdbackup.cluster.access import open_fs

    with open_fs(cluster_dir, node=node) as fs:
        a = fs.resolve(path)
        return _read_all(fs, a.ino, a.size)


def _read_all(fs: Any, ino: int, size: int) -> bytes:
    parts = []
    off = 0
    while off < size:
        chunk = fs.read(ino, off, min(4 << 20, size - off))
        if not chunk:
            break
        parts.append(chunk)
        off += len(chunk)
    return b"".join(parts)


def write_file_via(cluster_dir: Path, node: str, path: str, data: bytes,
                   fsync: bool = True) -> int:
    """Create (or overwrite) ``path`` through a node; returns its inode."""
    from sdbackup.cluster.access import open_fs
    from sdbackup.errors import FsError

    with open_fs(cluster_dir, node=node) as fs:
        parent, name = fs.split(path)
        try:
            ino = fs.lookup(parent.ino, name).ino
        except FsError:
            ino = fs.create(parent.ino, name).ino
        for off in range(0, len(data), 4 << 20):
            fs.write(ino, off, data[off : off + (4 << 20)])
        if fsync:
            fs.fsync(ino)
        return int(ino)


def embedded_file(cluster_dir: Path, path: str) -> bytes:
    """A file's bytes read with the cluster opened in this process (no coordinator)."""
    from sdbackup.cluster.local import open_cluster

    with open_cluster(cluster_dir, wait=10.0) as c:
        a = c.fs.resolve(path)
        return _read_all(c.fs, a.ino, a.size)


def iter_lines(text: str, needle: str) -> Iterator[str]:
    return (line for line in text.splitlines() if needle in line)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        sys.exit(_worker(json.loads(sys.argv[2])))
    sys.exit(f"usage: {sys.argv[0]} worker JSON")
