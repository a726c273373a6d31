"""Group schedules (seed b.4): ``sdbackup scheduler`` with a fake clock (missed slots,
overlap, DST, levels, failures) and once in real time with real backup processes."""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from test_backup_support import cli, make_cluster

from sdbackup.cluster.groups import GroupDef, GroupStore, Schedule
from sdbackup.cluster.local import open_cluster
from sdbackup.cluster.scheduler import Outcome, Scheduler, next_slot
from sdbackup.errors import BusyError
from sdbackup.media.medium import DiskMedium

UTC = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")


def ts(y: int, mo: int, d: int, h: int, mi: int = 0, tz: ZoneInfo = UTC, fold: int = 0
       ) -> float:
    return datetime(y, mo, d, h, mi, tzinfo=tz, fold=fold).timestamp()


class FakeClock:
    def __init__(self, now: float) -> None:
        self.t = now

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


class FakeRunner:
    """Records each run; a run takes ``takes`` seconds of the fake clock; the first run
    of a group is a full whatever was asked (as --full-if-needed makes it)."""

    def __init__(self, clock: FakeClock, takes: float = 60.0, fail: bool = False) -> None:
        self.clock = clock
        self.takes = takes
        self.fail = fail
        self.calls: list[tuple[str, bool, float]] = []

    def __call__(self, group: GroupDef, full: bool) -> Outcome:
        self.calls.append((group.name, full, self.clock.now()))
        self.clock.t += self.takes
        if self.fail:
            return Outcome(False, "backup failed (exit 6): medium full")
        kind = "full" if full or len(self.calls) == 1 else "incremental"
        return Outcome(True, f"{kind} generation G{len(self.calls)}", f"G{len(self.calls)}",
                       kind)


def setup(tmp_path: Path, cron: str, created: float, **kw: object
          ) -> tuple[Path, GroupStore]:
    cdir = make_cluster(tmp_path)
    store = GroupStore(cdir)
    sched = Schedule(cron=cron, level=str(kw.pop("level", "full")),
                     medium=str(tmp_path / "m"), **kw)  # type: ignore[arg-type]
    store.add(GroupDef("g", ["dir_A/*"], int(created * 1e9), sched))
    return cdir, store


def test_missed_slots_run_once(tmp_path: Path) -> None:
    created = ts(2026, 3, 1, 10, 5)
    _cdir, store = setup(tmp_path, "0 * * * *", created, tz="UTC")
    clock = FakeClock(ts(2026, 3, 1, 10, 30))
    said: list[str] = []
    run = FakeRunner(clock)
    sch = Scheduler(store, run, clock, said.append)
    assert sch.tick() == []  # defined at 10:05: the first slot is 11:00, not now
    clock.t = ts(2026, 3, 1, 15, 20)  # the scheduler was down from 10:30 to 15:20
    reps = sch.tick()
    assert len(reps) == 1 and reps[0].missed == 5 and len(run.calls) == 1
    assert reps[0].slot == ts(2026, 3, 1, 15, 0)
    assert any("5 slots passed" in s and "running once now" in s for s in said)
    # a new scheduler (a restart) does not run it again, and runs the next slot once
    sch2 = Scheduler(store, run, clock, said.append)
    assert sch2.tick() == []
    clock.t = ts(2026, 3, 1, 16, 0) + 30
    assert len(sch2.tick()) == 1 and len(run.calls) == 2
    st = store.runs()["g"]
    assert st.last_slot == ts(2026, 3, 1, 16, 0) and st.last_result.startswith("ok")
    assert [h["missed"] for h in st.history] == [4, 0]


def test_runs_of_one_group_never_overlap(tmp_path: Path) -> None:
    created = ts(2026, 3, 1, 10, 5)
    cdir, store = setup(tmp_path, "0 * * * *", created, tz="UTC")
    clock = FakeClock(ts(2026, 3, 1, 11, 0))
    said: list[str] = []
    run = FakeRunner(clock, takes=2.5 * 3600)  # each run outlasts two slots
    sch = Scheduler(store, run, clock, said.append)
    sch.tick()
    assert len(run.calls) == 1 and clock.now() == ts(2026, 3, 1, 13, 30)
    reps = sch.tick()  # the 12:00 and 13:00 slots fell during that run
    assert len(reps) == 1 and reps[0].waited and reps[0].missed == 2
    assert any("while the previous run was going" in s for s in said)
    starts = [c[2] for c in run.calls]
    assert starts[1] >= starts[0] + run.takes  # the second started after the first ended
    # a run of the group going on in another process: the slot is skipped, and said
    fd = os.open(cdir / "group-g.run.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        clock.t = ts(2026, 3, 1, 17, 1)
        reps = sch.tick()
        assert len(reps) == 1 and not reps[0].outcome.ok
        assert "skipped" in reps[0].outcome.message and len(run.calls) == 2
        assert store.runs()["g"].last_result.startswith("skipped")
    finally:
        os.close(fd)
    # one scheduler per cluster
    a, b = Scheduler(store, run, clock), Scheduler(store, run, clock)
    a.acquire()
    try:
        with pytest.raises(BusyError, match="a scheduler runs already"):
            b.acquire()
    finally:
        a.release()


def test_dst_spring_gap_and_autumn_fold() -> None:
    daily = Schedule(cron="30 2 * * *", level="full", medium="m", tz="Europe/Berlin")
    # spring: 02:30 does not exist on 2026-03-29; it runs once, at 03:00 CEST
    t = next_slot(daily, ts(2026, 3, 28, 12, 0, BERLIN))
    assert t == ts(2026, 3, 29, 3, 0, BERLIN)
    assert next_slot(daily, t) == ts(2026, 3, 30, 2, 30, BERLIN)
    # autumn: 02:30 happens twice on 2026-10-25; a fixed-hour job runs once
    t = next_slot(daily, ts(2026, 10, 24, 12, 0, BERLIN))
    assert t == ts(2026, 10, 25, 2, 30, BERLIN, fold=0)
    assert next_slot(daily, t) == ts(2026, 10, 26, 2, 30, BERLIN)
    # a sub-hourly job keeps its interval through the repeated hour
    every30 = Schedule(cron="*/30 * * * *", level="full", medium="m", tz="Europe/Berlin")
    t = ts(2026, 10, 25, 1, 50, BERLIN)
    got = []
    for _ in range(5):
        t = next_slot(every30, t)
        got.append(t)
    assert [b - a for a, b in itertools.pairwise(got)] == [1800.0] * 4
    assert got[0] == ts(2026, 10, 25, 2, 0, BERLIN, fold=0)


def test_dst_day_runs_daily_job_once(tmp_path: Path) -> None:
    created = ts(2026, 10, 24, 12, 0, BERLIN)
    _c, store = setup(tmp_path, "30 2 * * *", created, tz="Europe/Berlin")
    clock = FakeClock(created)
    run = FakeRunner(clock, takes=60)
    sch = Scheduler(store, run, clock, lambda s: None)
    while clock.now() < ts(2026, 10, 26, 12, 0, BERLIN):
        sch.tick()
        clock.sleep(min(sch.sleep_seconds(), 600) + 1)
    days = [datetime.fromtimestamp(c[2], BERLIN).strftime("%m-%d %H:%M") for c in run.calls]
    assert days == ["10-25 02:30", "10-26 02:30"]


def test_levels_full_every_and_failure_hook(tmp_path: Path) -> None:
    created = ts(2026, 3, 1, 0, 0)
    cdir, store = setup(tmp_path, "0 * * * *", created, tz="UTC", level="incremental",
                        full_every=3, on_failure=f"echo \"$SDBACKUP_GROUP|$SDBACKUP_ERROR\" "
                        f"> {tmp_path}/hook.out; exit 3")
    clock = FakeClock(created)
    run = FakeRunner(clock)
    sch = Scheduler(store, run, clock, lambda s: None)
    for h in range(1, 8):
        clock.t = ts(2026, 3, 1, h, 1)
        sch.tick()
    assert [c[1] for c in run.calls] == [False, False, False, True, False, False, True]
    run.fail = True
    clock.t = ts(2026, 3, 1, 8, 1)
    rep = sch.tick()[0]
    assert not rep.outcome.ok
    assert (tmp_path / "hook.out").read_text() == "g|backup failed (exit 6): medium full\n"
    st = store.runs()["g"]
    assert st.hook_status == 3 and st.last_result.startswith("failed: backup failed")
    r = cli("group", "ls", cdir, "--json")
    row = json.loads(r.out)[0]
    assert row["last_result"].startswith("failed") and row["hook_status"] == 3
    assert row["next_run"] == ts(2026, 3, 1, 9, 0)
    r = cli("group", "ls", cdir)
    assert "failed: backup failed" in r.out and "on-failure hook exit 3" in r.out


def test_scheduler_real_time(tmp_path: Path) -> None:
    """The real command, real backups in child processes, every 2 seconds for ~6 s."""
    cdir = make_cluster(tmp_path)
    with open_cluster(cdir) as c:
        d = c.fs.mkdir(1, b"dir_A", 0o755)
        a = c.fs.create(d.ino, b"f", 0o644)
        c.fs.write(a.ino, 0, b"x" * 5000)
    med = tmp_path / "m"
    r = cli("group", "add", cdir, "g", "--include", "dir_A/*", "--schedule", "* * * * * */2",
            "--level", "incremental", "--full-every", "2", "--medium", med, "--keep-last", "2")
    assert r.code == 0, r.err
    p = subprocess.Popen([sys.executable, "-m", "sdbackup", "scheduler", str(cdir)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(7)
        # a second scheduler is refused
        r2 = subprocess.run([sys.executable, "-m", "sdbackup", "scheduler", str(cdir),
                             "--once"], capture_output=True, text=True, timeout=60)
        assert r2.returncode == 3 and "a scheduler runs already" in r2.stderr
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "scheduler stopped" in out
    st = GroupStore(cdir).runs()["g"]
    assert st.runs >= 2, out
    assert all(h["result"].startswith("ok") for h in st.history), st.history
    ends = [(h["start"], h["end"]) for h in st.history]
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(ends))  # no overlap
    gens = DiskMedium.open(med).committed()
    assert 1 <= len(gens) <= 2 and all(g.group == "g" for g in gens)  # --keep-last 2
    assert any(h["full"] for h in st.history[1:]) or st.runs < 3


def test_the_coordinator_runs_the_schedules(tmp_path: Path) -> None:
    """With a coordinator running, it runs the groups' due backups itself (b.4: the
    management computer); a separate scheduler is then refused."""
    from sdbackup.cluster.launch import start_coordinator

    cdir = make_cluster(tmp_path)
    with open_cluster(cdir) as c:
        d = c.fs.mkdir(1, b"dir_A", 0o755)
        a = c.fs.create(d.ino, b"f", 0o644)
        c.fs.write(a.ino, 0, b"x" * 5000)
    med = tmp_path / "m"
    r = cli("group", "add", cdir, "g", "--include", "dir_A/*", "--schedule", "* * * * * */2",
            "--level", "full", "--medium", med, "--keep-last", "2")
    assert r.code == 0, r.err
    coord = start_coordinator(cdir)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = GroupStore(cdir).runs().get("g")
            if st is not None and st.runs >= 2:
                break
            time.sleep(0.5)
        r2 = subprocess.run([sys.executable, "-m", "sdbackup", "scheduler", str(cdir),
                             "--once"], capture_output=True, text=True, timeout=60)
        assert r2.returncode == 3 and "a scheduler runs already" in r2.stderr, r2.stderr
    finally:
        coord.stop()
    st = GroupStore(cdir).runs()["g"]
    assert st.runs >= 2, coord.tail() if hasattr(coord, "tail") else st
    assert all(h["result"].startswith("ok") for h in st.history), st.history
    gens = DiskMedium.open(med).committed()
    assert 1 <= len(gens) <= 2 and all(g.group == "g" for g in gens)
    log = (cdir / "logs" / "coordinator.log").read_text()
    assert "sdbackup.scheduler" in log
