"""The cluster's file groups (b.1-b.5) and their schedules (b.4), kept in the cluster
directory.

``CLUSTER_DIR/groups.json`` holds every group's definition: its name, its group list
(the lines of Fig. 22, as parsed and normalised by :mod:`sdbackup.meta.groups`) and
its schedule, if any. ``CLUSTER_DIR/group-runs.json`` holds what the scheduler did
(last slot, last run and its result). Both are replaced atomically (temporary file,
fsync, rename, directory fsync) under an ``flock`` of ``CLUSTER_DIR/groups.lock``, so
that a crash leaves the old or the new file, never a mix, and two commands editing
groups at once never lose one's change.

Why the cluster directory and not the metadata store: group definitions are
configuration, read and changed by commands whether or not a coordinator runs (the
coordinator alone opens the store), and a backup records the group list it used in
the generation itself (manifest and snapshot), so nothing on a medium depends on
this file.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdbackup.blocks.durable import write_atomic
from sdbackup.cluster.config import load_config
from sdbackup.errors import CorruptError, UsageError
from sdbackup.meta.groups import META_SCOPES, GroupList, check_group_name, parse_group_list

GROUPS_FILE = "groups.json"
RUNS_FILE = "group-runs.json"
GROUPS_LOCK = "groups.lock"
FORMAT = "sdbackup-groups"
LEVELS = ("full", "incremental")


@dataclass
class Schedule:
    """When and how a group is backed up by ``sdbackup scheduler`` (b.4)."""

    cron: str
    level: str
    medium: str
    full_every: int = 0  # with level incremental: every Nth run is a full (0: never)
    keep_last: int = 0  # after each run, keep the group's N newest generations (0: all)
    on_failure: str | None = None  # shell command run when a scheduled run fails
    tz: str | None = None  # IANA time zone of the cron expression (None: local time)
    meta: str = "all"

    def check(self) -> None:
        from sdbackup.cluster.scheduler import check_cron, zone

        check_cron(self.cron)
        zone(self.tz)
        if self.level not in LEVELS:
            raise UsageError(f"--level {self.level!r}: use full or incremental")
        if self.full_every < 0 or self.keep_last < 0:
            raise UsageError("--full-every and --keep-last take a number >= 0")
        if self.full_every and self.level != "incremental":
            raise UsageError("--full-every goes with --level incremental")
        if self.meta not in META_SCOPES:
            raise UsageError(f"--meta {self.meta!r}: use all or group")
        if not self.medium:
            raise UsageError("a schedule needs --medium DIR (where its backups go)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schedule:
        return cls(cron=str(d["cron"]), level=str(d["level"]), medium=str(d["medium"]),
                   full_every=int(d.get("full_every", 0)),
                   keep_last=int(d.get("keep_last", 0)),
                   on_failure=d.get("on_failure"), tz=d.get("tz"),
                   meta=str(d.get("meta", "all")))


@dataclass
class GroupDef:
    name: str
    lines: list[str]
    created_ns: int
    schedule: Schedule | None = None

    def group_list(self) -> GroupList:
        return parse_group_list("\n".join(self.lines), where=f"group {self.name}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "list": self.lines, "created_ns": self.created_ns,
                "schedule": asdict(self.schedule) if self.schedule else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroupDef:
        s = d.get("schedule")
        return cls(name=str(d["name"]), lines=[str(x) for x in d["list"]],
                   created_ns=int(d["created_ns"]),
                   schedule=Schedule.from_dict(s) if isinstance(s, dict) else None)


@dataclass
class RunState:
    """What the scheduler last did for a group."""

    last_slot: float | None = None  # the cron slot (epoch seconds) last run or skipped
    last_start: float | None = None
    last_end: float | None = None
    last_result: str | None = None  # "ok", "failed: ...", "skipped: ..."
    last_generation: str | None = None
    since_full: int = 0  # scheduled incrementals since the last full
    hook_status: int | None = None  # exit status of the --on-failure hook, last failure
    runs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # last few runs

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunState:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


class GroupStore:
    """The group definitions and run states of one cluster directory."""

    def __init__(self, cluster_dir: str | os.PathLike[str]) -> None:
        load_config(cluster_dir)  # a clear error for a missing or wrong cluster directory
        self.dir = Path(cluster_dir)
        self.path = self.dir / GROUPS_FILE
        self.runs_path = self.dir / RUNS_FILE

    @contextmanager
    def _lock(self) -> Iterator[None]:
        fd = os.open(self.dir / GROUPS_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self, path: Path, key: str) -> dict[str, Any]:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            d = json.loads(raw)
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise ValueError("not an sdbackup groups file")
            items = d[key]
            if not isinstance(items, dict):
                raise ValueError(f"{key} is not an object")
            return items
        except (ValueError, KeyError, UnicodeDecodeError) as e:
            raise CorruptError(f"{path} is damaged ({e}): fix or remove it (group "
                               "definitions are lost with it)") from None

    def load(self) -> dict[str, GroupDef]:
        try:
            return {k: GroupDef.from_dict(v) for k, v in
                    self._read(self.path, "groups").items()}
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptError(f"{self.path} is damaged ({e})") from None

    def get(self, name: str) -> GroupDef:
        groups = self.load()
        if name not in groups:
            known = ", ".join(sorted(groups)) or "none"
            raise UsageError(f"unknown group {name!r} (groups of this cluster: {known}); "
                             "'sdbackup group add' defines one")
        return groups[name]

    def _write_groups(self, groups: dict[str, GroupDef]) -> None:
        body = {"format": FORMAT, "version": 1,
                "groups": {k: g.to_dict() for k, g in sorted(groups.items())}}
        write_atomic(self.path, (json.dumps(body, indent=2) + "\n").encode())

    def add(self, g: GroupDef) -> None:
        check_group_name(g.name)
        g.group_list()
        if g.schedule is not None:
            g.schedule.check()
        with self._lock():
            groups = self.load()
            if g.name in groups:
                raise UsageError(f"group {g.name!r} exists already: change it with "
                                 f"'sdbackup group edit', or remove it first")
            groups[g.name] = g
            self._write_groups(groups)

    def replace(self, g: GroupDef) -> None:
        g.group_list()
        if g.schedule is not None:
            g.schedule.check()
        with self._lock():
            groups = self.load()
            if g.name not in groups:
                raise UsageError(f"unknown group {g.name!r}")
            groups[g.name] = g
            self._write_groups(groups)

    def remove(self, name: str) -> GroupDef:
        with self._lock():
            groups = self.load()
            if name not in groups:
                self.get(name)  # the error
            g = groups.pop(name)
            self._write_groups(groups)
            runs = self._read(self.runs_path, "runs")
            if name in runs:
                runs.pop(name)
                self._write_runs(runs)
            return g

    # -- run states ------------------------------------------------------------------
    def runs(self) -> dict[str, RunState]:
        try:
            return {k: RunState.from_dict(v) for k, v in
                    self._read(self.runs_path, "runs").items()}
        except (TypeError, ValueError) as e:
            raise CorruptError(f"{self.runs_path} is damaged ({e})") from None

    def _write_runs(self, runs: dict[str, Any]) -> None:
        body = {"format": FORMAT, "version": 1, "runs": runs}
        write_atomic(self.runs_path, (json.dumps(body, indent=2) + "\n").encode())

    def set_run(self, name: str, state: RunState) -> None:
        with self._lock():
            runs = self._read(self.runs_path, "runs")
            state.history = state.history[-10:]
            runs[name] = asdict(state)
            self._write_runs(runs)


def new_group(name: str, gl: GroupList, schedule: Schedule | None) -> GroupDef:
    return GroupDef(check_group_name(name), gl.lines, time.time_ns(), schedule)
