"""Each group backed up on its own schedule (seed b.4): ``sdbackup scheduler``.

A group's schedule is a cron expression (croniter: five fields, or six with seconds)
in a time zone (IANA name; default the host's), a level (full, or incremental with a
full every N runs), the medium, and optionally a retention (``--keep-last``) and a
failure hook. What is guaranteed:

* **A missed run runs once.** Slots are computed from the last slot the scheduler
  handled (persisted in ``CLUSTER_DIR/group-runs.json``), not from "now": when the
  scheduler was down over one or many slots, the group runs once when it starts
  again, and the log says how many slots were missed. A group defined at 10:05 with an
  hourly schedule first runs at 11:00, not at once.
* **No two runs of one group overlap.** Runs are made one after another, in the order
  they fell due (backups of one cluster are exclusive anyway: the embedded cluster
  and the coordinator each run one at a time). A slot that passes while the group's
  previous run is still going waits for it and then runs once (said in the log and in
  the run's result); a run of the group by another process (a second scheduler is
  refused by ``CLUSTER_DIR/scheduler.lock``; the per-group run lock covers anything
  else) makes the slot be skipped, and says so.
* **Time zones and DST.** Slots are cron times in the schedule's zone. In the spring
  gap a slot that does not exist runs at the first minute after it (croniter); in the
  autumn fold a fixed-hour schedule (hour field not ``*``) runs once, at the first of
  the two instants, while sub-hourly ones go on every interval.
* **Failures are reported**: the run's result is kept (``group ls``, ``status``), the
  ``--on-failure`` command runs with ``SDBACKUP_GROUP``, ``SDBACKUP_ERROR`` and
  ``SDBACKUP_SLOT`` in its environment, and its exit status is recorded and logged.

Runs go through a :class:`Runner` (by default the ``sdbackup backup`` command in a
child process, so a run that crashes cannot take the scheduler with it) and time
through a :class:`Clock`, both injectable for tests.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sdbackup.cluster.groups import GroupDef, GroupStore, RunState, Schedule
from sdbackup.errors import BusyError, UsageError

log = logging.getLogger("sdbackup.scheduler")

SCHEDULER_LOCK = "scheduler.lock"
MAX_POLL = 60.0  # seconds: group edits are seen at least this often


# -- time ----------------------------------------------------------------------------------

class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def __init__(self, stop: threading.Event | None = None) -> None:
        self.stop = stop or threading.Event()

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        self.stop.wait(max(0.0, seconds))


def zone(tz: str | None) -> tzinfo:
    """The schedule's time zone: an IANA name, else ``$TZ``, else the host's."""
    name = tz or os.environ.get("TZ")
    try:
        if name:
            return ZoneInfo(name.lstrip(":"))
        if os.path.exists("/etc/localtime"):
            with open("/etc/localtime", "rb") as f:
                return ZoneInfo.from_file(f, key="localtime")
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise UsageError(f"unknown time zone {name!r}: give an IANA name such as "
                         "Europe/Berlin or UTC") from None
    return ZoneInfo("UTC")


def check_cron(expr: str) -> None:
    from croniter import croniter

    fields = expr.split()
    if len(fields) not in (5, 6) or not croniter.is_valid(expr):
        raise UsageError(f"invalid cron expression {expr!r}: give five fields, minute hour "
                         "day-of-month month day-of-week (e.g. '30 2 * * *'), or six with "
                         "seconds")


def _fixed_hour(expr: str) -> bool:
    return not expr.split()[1].startswith("*")


def next_slot(s: Schedule, after: float) -> float:
    """The first slot of ``s`` strictly after ``after`` (epoch seconds)."""
    from croniter import croniter

    z = zone(s.tz)
    it = croniter(s.cron, datetime.fromtimestamp(after, z))
    for _ in range(1000):
        t = float(it.get_next(float))
        if t <= after:
            continue
        local = datetime.fromtimestamp(t, z)
        if local.fold == 1 and _fixed_hour(s.cron):
            continue  # the autumn fold's second pass of a fixed-hour slot: ran already
        return t
    raise UsageError(f"cron expression {s.cron!r} has no next time")


def slots_between(s: Schedule, after: float, upto: float, cap: int = 10_000
                  ) -> tuple[float | None, int]:
    """(the last slot in (after, upto], how many there are, at most ``cap``)."""
    last: float | None = None
    n = 0
    t = after
    while n < cap:
        t = next_slot(s, t)
        if t > upto:
            break
        last = t
        n += 1
    return last, n


def next_run(g: GroupDef, st: RunState | None) -> float | None:
    """The group's next slot: the first after the last slot handled (or after the
    group was defined); None without a schedule."""
    if g.schedule is None:
        return None
    after = st.last_slot if st is not None and st.last_slot is not None \
        else g.created_ns / 1e9
    return next_slot(g.schedule, after)


# -- runs ----------------------------------------------------------------------------------

@dataclass
class Outcome:
    ok: bool
    message: str
    generation: str | None = None
    kind: str | None = None


class Runner(Protocol):
    def __call__(self, group: GroupDef, full: bool) -> Outcome: ...


class CommandRunner:
    """Runs ``sdbackup backup --group`` (and ``prune`` for ``--keep-last``) in a child
    process."""

    def __init__(self, cluster_dir: Path) -> None:
        self.cluster_dir = cluster_dir

    def _sdbackup(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sdbackup", *args], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, check=False)

    def __call__(self, group: GroupDef, full: bool) -> Outcome:
        s = group.schedule
        assert s is not None
        args = ["backup", str(self.cluster_dir), "--group", group.name, "--medium", s.medium,
                "--meta", s.meta, "--json", "-q"]
        if not full:
            args += ["--incremental", "--full-if-needed"]
        r = self._sdbackup(*args)
        if r.returncode != 0:
            err = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
            return Outcome(False, f"backup failed (exit {r.returncode}): {err}")
        try:
            summary = json.loads(r.stdout)
            gen, kind = str(summary["generation"]), str(summary["kind"])
        except (ValueError, KeyError, TypeError):
            return Outcome(False, f"backup printed no summary: {r.stdout[-200:]!r}")
        if s.keep_last:
            p = self._sdbackup("prune", "--medium", s.medium, "--group", group.name,
                               "--keep-last", str(s.keep_last), "--json")
            if p.returncode != 0:
                err = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
                return Outcome(False, f"backup {gen} committed, but prune failed: {err}",
                               gen, kind)
        return Outcome(True, f"{kind} generation {gen}", gen, kind)


@dataclass
class Report:
    group: str
    slot: float
    full: bool
    outcome: Outcome
    missed: int
    waited: bool


class Scheduler:
    """Runs the due backups of every scheduled group (see the module docstring)."""

    def __init__(self, store: GroupStore, runner: Runner, clock: Clock | None = None,
                 say: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.runner = runner
        self.clock = clock or SystemClock()
        self.say = say or (lambda line: log.info("%s", line))
        self._lock_fd = -1

    # -- one process per cluster ------------------------------------------------------
    def acquire(self) -> None:
        fd = os.open(self.store.dir / SCHEDULER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                who = os.pread(fd, 64, 0).decode(errors="replace").strip()
            finally:
                os.close(fd)
            raise BusyError(f"a scheduler runs already for {self.store.dir} ({who}); one "
                            "per cluster") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- what is due --------------------------------------------------------------------
    def next_run(self, g: GroupDef, st: RunState | None) -> float | None:
        return next_run(g, st)

    def due(self, now: float) -> list[tuple[GroupDef, float]]:
        """Groups with a slot at or before ``now`` not handled yet, oldest slot first."""
        runs = self.store.runs()
        out = []
        for g in self.store.load().values():
            t = self.next_run(g, runs.get(g.name))
            if t is not None and t <= now:
                out.append((g, t))
        out.sort(key=lambda x: (x[1], x[0].name))
        return out

    def tick(self) -> list[Report]:
        """Run every due group once, one after another; returns what was done."""
        reports = []
        for g, _first in self.due(self.clock.now()):
            # Reload: an edit or removal while an earlier run went on counts.
            try:
                g = self.store.get(g.name)
            except UsageError:
                continue
            reports.append(self._run_one(g))
        return reports

    def _run_one(self, g: GroupDef) -> Report:
        s = g.schedule
        assert s is not None
        st = self.store.runs().get(g.name) or RunState()
        first = self.next_run(g, st)
        assert first is not None
        now = self.clock.now()
        slot, n = slots_between(s, first - 1e-6, now)
        assert slot is not None
        waited = st.last_end is not None and st.last_start is not None \
            and st.last_end > first  # a slot fell while the previous run went on
        if n > 1:
            self.say(f"group {g.name}: {n} slots passed since the last run "
                     f"({_when(first, s)} .. {_when(slot, s)})"
                     + (" while the previous run was going" if waited else "")
                     + ": running once now")
        elif waited:
            self.say(f"group {g.name}: the slot {_when(slot, s)} fell while the previous "
                     "run was going: it waited and runs now")
        full = s.level == "full" or (s.full_every > 0 and st.since_full + 1 >= s.full_every)
        lock = _run_lock(self.store.dir, g.name)
        if lock < 0:
            out = Outcome(False, f"skipped: a run of group {g.name} is going in another "
                          "process")
            st.last_slot = slot
            st.last_result = out.message
            self.store.set_run(g.name, st)
            self.say(f"group {g.name}: slot {_when(slot, s)} {out.message}")
            return Report(g.name, slot, full, out, n, waited)
        try:
            st.last_start = self.clock.now()
            self.say(f"group {g.name}: {'full' if full else 'incremental'} backup for slot "
                     f"{_when(slot, s)} to {s.medium}")
            try:
                out = self.runner(g, full)
            except Exception as e:  # a runner bug must not stop the other groups
                out = Outcome(False, f"run failed: {type(e).__name__}: {e}")
            st.last_end = self.clock.now()
        finally:
            os.close(lock)
        st.last_slot = slot
        st.runs += 1
        if out.ok:
            st.last_result = "ok: " + out.message
            st.last_generation = out.generation
            st.since_full = 0 if out.kind in ("full", "synthetic") else st.since_full + 1
            st.hook_status = None
            self.say(f"group {g.name}: {out.message}")
        else:
            st.last_result = "failed: " + out.message
            self.say(f"group {g.name}: FAILED: {out.message}")
            if s.on_failure:
                st.hook_status = _hook(s.on_failure, g.name, out.message, slot)
                self.say(f"group {g.name}: --on-failure hook exited with status "
                         f"{st.hook_status}")
        st.history.append({"slot": slot, "start": st.last_start, "end": st.last_end,
                           "full": full, "result": st.last_result,
                           "missed": max(0, n - 1), "waited": waited})
        self.store.set_run(g.name, st)
        return Report(g.name, slot, full, out, n, waited)

    def sleep_seconds(self) -> float:
        """Until the earliest next slot (at most MAX_POLL, to see edits)."""
        runs = self.store.runs()
        now = self.clock.now()
        nxt = [t for g in self.store.load().values()
               if (t := self.next_run(g, runs.get(g.name))) is not None]
        return max(0.0, min([MAX_POLL, *(t - now for t in nxt)]))

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.tick()
            self.clock.sleep(self.sleep_seconds())


def _run_lock(cluster_dir: Path, name: str) -> int:
    """The group's run lock (an fd), or -1 when another process holds it."""
    fd = os.open(cluster_dir / f"group-{name}.run.lock",
                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return -1
    return fd


def _hook(cmd: str, group: str, error: str, slot: float) -> int:
    env = dict(os.environ, SDBACKUP_GROUP=group, SDBACKUP_ERROR=error,
               SDBACKUP_SLOT=str(int(slot)))
    try:
        return subprocess.run(cmd, shell=True, env=env, stdin=subprocess.DEVNULL,
                              check=False, timeout=600).returncode
    except subprocess.TimeoutExpired:
        return -1


def _when(t: float, s: Schedule) -> str:
    return datetime.fromtimestamp(t, zone(s.tz)).isoformat(timespec="minutes")
