"""Start a coordinator and node agents as separate processes (demo, benchmarks).

Each process is ``sys.executable -m sdbackup.cli.main ...``, exactly what a user runs;
start functions return once the process has published its address, and raise with the
process's last log lines if it died instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sdbackup.errors import RemoteError


class Proc:
    """A started sdbackup process; ``stop()`` sends SIGTERM and waits."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self._logf = open(log, "ab")  # noqa: SIM115 - lives as long as the process
        self.p = subprocess.Popen([sys.executable, "-m", "sdbackup.cli.main", *args],
                                  stdout=self._logf, stderr=subprocess.STDOUT,
                                  start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> int:
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._logf.close()
        return self.p.returncode

    def kill(self) -> None:
        if self.alive():
            self.p.kill()
            self.p.wait()
        self._logf.close()


def _wait_file(proc: Proc, path: Path, timeout: float, pid_check: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RemoteError(f"{' '.join(proc.args[:1])} exited with status "
                              f"{proc.p.returncode}:\n{proc.tail()}")
        try:
            text = path.read_text()
            if not pid_check or f"pid={proc.pid}" in text:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RemoteError(f"{path} did not appear within {timeout:g} s:\n{proc.tail()}")


def start_coordinator(cluster_dir: str | os.PathLike[str], *, lease: float = 10.0,
                      timeout: float = 30.0) -> Proc:
    cdir = Path(cluster_dir)
    (cdir / "logs").mkdir(exist_ok=True)
    proc = Proc(["coordinator", str(cdir), "--lease", str(lease)],
                cdir / "logs" / "coordinator.out")
    _wait_file(proc, cdir / "coordinator.addr", timeout)
    return proc


def start_node(cluster_dir: str | os.PathLike[str], name: str, *, cache_size: str = "64MiB",
               flush_delay: float = 5.0, extra: list[str] | None = None,
               timeout: float = 30.0) -> Proc:
    cdir = Path(cluster_dir)
    proc = Proc(["node", str(cdir), "--name", name, "--cache-size", cache_size,
                 "--flush-delay", str(flush_delay), *(extra or [])],
                cdir / "logs" / f"node-{name}.out")
    _wait_file(proc, cdir / "nodes" / f"{name}.addr", timeout)
    return proc
