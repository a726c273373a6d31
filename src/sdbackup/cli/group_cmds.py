"""File groups (seed b.1-b.5) and their schedules (b.4): ``sdbackup group ...`` and
``sdbackup scheduler``.

Group definitions live in the cluster directory (``cluster/groups.py``); membership is
evaluated against the live metadata for ``group add``/``show``, and against the T0
snapshot by ``sdbackup backup --group``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sdbackup.errors import UsageError

if TYPE_CHECKING:
    from sdbackup.cluster.groups import GroupDef, RunState, Schedule
    from sdbackup.meta.groups import GroupList, Membership

JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def register(cli: click.Group) -> None:
    cli.add_command(group)
    cli.add_command(scheduler_cmd)


@click.group()
def group() -> None:
    """File groups: back up the files a list of paths selects (seed b.1-b.5).

    A group list has one entry per line: 'dir_A/*' is every file below dir_A at any
    depth (a directory a pattern names brings everything below it), 'X dir_D/file_d'
    excludes a file or directory (at any depth; '/dir_D' from the root only); '*', '?'
    and '**' match as in a shell ('**' any number of directories). A file may belong to
    several groups; each group has its own chain of backups and its own schedule.
    """


def _read_list(from_file: Path | None) -> str | None:
    if from_file is None:
        return None
    try:
        if str(from_file) == "-":
            return sys.stdin.read()
        return from_file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the group list {from_file}: {e}") from None


def _schedule(cron: str | None, level: str | None, medium: Path | None, full_every: int | None,
              keep_last: int | None, on_failure: str | None, tz: str | None,
              meta: str | None, old: Schedule | None = None) -> Schedule | None:
    from sdbackup.cluster.groups import Schedule

    given = [x is not None for x in (level, medium, full_every, keep_last, on_failure, tz,
                                      meta)]
    if cron is None and old is None:
        if any(given):
            raise UsageError("--level, --medium, --full-every, --keep-last, --on-failure, "
                             "--tz and --meta describe a schedule: add --schedule CRON")
        return None
    base = old or Schedule(cron="", level="", medium="")
    s = Schedule(cron=cron if cron is not None else base.cron,
                 level=level if level is not None else (base.level or "full"),
                 medium=str(medium.absolute()) if medium is not None else base.medium,
                 full_every=full_every if full_every is not None else base.full_every,
                 keep_last=keep_last if keep_last is not None else base.keep_last,
                 on_failure=on_failure if on_failure is not None else base.on_failure,
                 tz=tz if tz is not None else base.tz,
                 meta=meta if meta is not None else base.meta)
    s.check()
    return s


def _evaluate(cluster_dir: Path, gl: GroupList) -> tuple[Membership, dict[int, Any]]:
    """Membership and block list in the live cluster (through a running coordinator,
    or embedded)."""
    from sdbackup.cluster.access import open_fs
    from sdbackup.meta.groups import evaluate

    with open_fs(cluster_dir) as fs:
        mem = evaluate(fs.meta, gl)
        return mem, mem.blocks(fs.meta)


def _warn_empty(gl: GroupList, mem: Membership) -> None:
    for p, n in zip(gl.includes, mem.hits, strict=True):
        if n == 0:
            click.echo(f"sdbackup: warning: line {p.line}: {p.text!r} selects no file now",
                       err=True)
    if not mem.files:
        click.echo("sdbackup: warning: the group selects no file now: a backup of it "
                   "would be refused until it does", err=True)


SCHEDULE_OPTS = [
    click.option("--schedule", "cron", metavar="CRON",
                 help="Back the group up on this cron schedule (e.g. '30 2 * * *'), run "
                      "by 'sdbackup scheduler CLUSTER_DIR'."),
    click.option("--level", type=click.Choice(["full", "incremental"]),
                 help="Scheduled backups: full, or incremental (the first is a full)."),
    click.option("--medium", type=click.Path(path_type=Path),
                 help="Where scheduled backups go (needed with --schedule)."),
    click.option("--full-every", type=int, metavar="N",
                 help="With --level incremental: every Nth scheduled run is a full."),
    click.option("--keep-last", type=int, metavar="N",
                 help="After each scheduled run, keep the group's N newest generations "
                      "('sdbackup prune --group').",),
    click.option("--on-failure", metavar="CMD",
                 help="Shell command run when a scheduled run fails (SDBACKUP_GROUP, "
                      "SDBACKUP_ERROR, SDBACKUP_SLOT in its environment)."),
    click.option("--tz", metavar="ZONE",
                 help="Time zone of the cron schedule (IANA name; default: this host's)."),
    click.option("--meta", type=click.Choice(["all", "group"]),
                 help="Scheduled backups: the generation's metadata lists all files "
                      "(default) or only the group's."),
]


def _with_schedule_opts(f: Any) -> Any:
    for opt in reversed(SCHEDULE_OPTS):
        f = opt(f)
    return f


@group.command("add")
@click.argument("cluster_dir", type=click.Path(path_type=Path))
@click.argument("name")
@click.option("--include", "includes", multiple=True, metavar="PATTERN",
              help="A path pattern of files to include (repeat).")
@click.option("--exclude", "excludes", multiple=True, metavar="PATTERN",
              help="A path pattern to exclude from the included ones (repeat).")
@click.option("--from-file", type=click.Path(path_type=Path), metavar="LIST",
              help="A group list file (Fig. 22 syntax; '-' for standard input).")
@_with_schedule_opts
def group_add(cluster_dir: Path, name: str, includes: tuple[str, ...],
              excludes: tuple[str, ...], from_file: Path | None, cron: str | None,
              level: str | None, medium: Path | None, full_every: int | None,
              keep_last: int | None, on_failure: str | None, tz: str | None,
              meta: str | None) -> None:
    """Define group NAME from --include/--exclude patterns and/or a list file.

    Warns about patterns that select no file now (they may later).
    """
    from sdbackup.cluster.groups import GroupStore, new_group
    from sdbackup.meta.groups import check_group_name, group_list_from

    store = GroupStore(cluster_dir)
    check_group_name(name)
    if name in store.load():
        raise UsageError(f"group {name!r} exists already: change it with 'sdbackup group "
                         "edit', or remove it first")
    if not includes and from_file is None:
        raise UsageError("give the group's files: --include PATTERN (repeat) or --from-file "
                         "LIST")
    gl = group_list_from(includes, excludes, _read_list(from_file),
                         where=str(from_file) if from_file else "group list")
    sched = _schedule(cron, level, medium, full_every, keep_last, on_failure, tz, meta)
    mem, _blocks = _evaluate(cluster_dir, gl)
    store.add(new_group(name, gl, sched))
    _warn_empty(gl, mem)
    click.echo(f"group {name}: {len(gl.includes)} include(s), {len(gl.excludes)} "
               f"exclude(s); selects {len(mem.files)} file(s) now"
               + (f"; scheduled '{sched.cron}' ({sched.level}) to {sched.medium}"
                  if sched else ""))


@group.command("edit")
@click.argument("cluster_dir", type=click.Path(path_type=Path))
@click.argument("name")
@click.option("--include", "includes", multiple=True, metavar="PATTERN",
              help="Replace the list: these inclusions (with --exclude, --from-file).")
@click.option("--exclude", "excludes", multiple=True, metavar="PATTERN")
@click.option("--from-file", type=click.Path(path_type=Path), metavar="LIST")
@click.option("--no-schedule", is_flag=True, help="Remove the group's schedule.")
@_with_schedule_opts
def group_edit(cluster_dir: Path, name: str, includes: tuple[str, ...],
               excludes: tuple[str, ...], from_file: Path | None, no_schedule: bool,
               cron: str | None, level: str | None, medium: Path | None,
               full_every: int | None, keep_last: int | None, on_failure: str | None,
               tz: str | None, meta: str | None) -> None:
    """Change group NAME: a new list (--include/--exclude/--from-file replace the whole
    list) and/or its schedule. The next backup of the group uses the new list; its
    chain goes on (files that join are copied whole by the next incremental)."""
    import dataclasses

    from sdbackup.cluster.groups import GroupStore
    from sdbackup.meta.groups import group_list_from

    store = GroupStore(cluster_dir)
    g = store.get(name)
    changed_list = bool(includes or excludes or from_file)
    sched_given = any(x is not None for x in (cron, level, medium, full_every, keep_last,
                                                on_failure, tz, meta))
    if not changed_list and not sched_given and not no_schedule:
        raise UsageError("nothing to change: give a new list (--include/--exclude/"
                         "--from-file), schedule options, or --no-schedule")
    if no_schedule and sched_given:
        raise UsageError("--no-schedule and schedule options exclude each other")
    lines = g.lines
    gl = g.group_list()
    if changed_list:
        if not includes and from_file is None:
            raise UsageError("a new list needs --include PATTERN or --from-file LIST")
        gl = group_list_from(includes, excludes, _read_list(from_file),
                             where=str(from_file) if from_file else "group list")
        lines = gl.lines
    sched = None if no_schedule else (
        _schedule(cron, level, medium, full_every, keep_last, on_failure, tz, meta,
                  old=g.schedule) if sched_given else g.schedule)
    if changed_list:
        mem, _b = _evaluate(cluster_dir, gl)
    store.replace(dataclasses.replace(g, lines=lines, schedule=sched))
    if changed_list:
        _warn_empty(gl, mem)
    click.echo(f"group {name} changed" + (f"; selects {len(mem.files)} file(s) now"
                                          if changed_list else ""))


@group.command("rm")
@click.argument("cluster_dir", type=click.Path(path_type=Path))
@click.argument("name")
def group_rm(cluster_dir: Path, name: str) -> None:
    """Remove group NAME (its generations on media stay: they record their list)."""
    from sdbackup.cluster.groups import GroupStore

    GroupStore(cluster_dir).remove(name)
    click.echo(f"group {name} removed (its backups stay on their media)")


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def _row(g: GroupDef, st: RunState | None, nxt: float | None) -> dict[str, Any]:
    return {"name": g.name, "list": g.lines,
            "schedule": None if g.schedule is None else {
                "cron": g.schedule.cron, "level": g.schedule.level, "tz": g.schedule.tz,
                "medium": g.schedule.medium, "full_every": g.schedule.full_every,
                "keep_last": g.schedule.keep_last, "on_failure": g.schedule.on_failure,
                "meta": g.schedule.meta},
            "next_run": nxt,
            "last_run": None if st is None else st.last_start,
            "last_result": None if st is None else st.last_result,
            "last_generation": None if st is None else st.last_generation,
            "hook_status": None if st is None else st.hook_status}


@group.command("ls")
@click.argument("cluster_dir", type=click.Path(path_type=Path))
@JSON
def group_ls(cluster_dir: Path, as_json: bool) -> None:
    """List the groups: their lists, schedules, last and next run, last result."""
    from sdbackup.cluster.groups import GroupStore
    from sdbackup.cluster.scheduler import next_run

    store = GroupStore(cluster_dir)
    groups, runs = store.load(), store.runs()
    rows = [_row(g, runs.get(n), next_run(g, runs.get(n))) for n, g in sorted(
        groups.items())]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no groups: 'sdbackup group add CLUSTER_DIR NAME --include PATTERN' "
                   "defines one")
        return
    for r in rows:
        click.echo(f"{r['name']}: {'; '.join(r['list'])}")
        s = r["schedule"]
        if s is None:
            click.echo("  not scheduled")
            continue
        click.echo(f"  schedule '{s['cron']}'{' ' + s['tz'] if s['tz'] else ''} "
                   f"{s['level']}" + (f", full every {s['full_every']}" if s["full_every"]
                                      else "")
                   + (f", keep last {s['keep_last']}" if s["keep_last"] else "")
                   + f" to {s['medium']}")
        click.echo(f"  last run {_when(r['last_run'])}: {r['last_result'] or '-'}"
                   + (f" (on-failure hook exit {r['hook_status']})"
                      if r["hook_status"] is not None else ""))
        click.echo(f"  next run {_when(r['next_run'])}")


@group.command("show")
@click.argument("cluster_dir", type=click.Path(path_type=Path))
@click.argument("name")
@click.option("--limit", type=int, default=1000, show_default=True,
              help="Show at most this many files and runs per disk (0: all).")
@JSON
def group_show(cluster_dir: Path, name: str, limit: int, as_json: bool) -> None:
    """Show group NAME: its list, the files it selects now, and its group block list
    as runs of contiguous blocks per disk (Fig. 24)."""
    from sdbackup.cluster.config import load_config
    from sdbackup.cluster.groups import GroupStore
    from sdbackup.meta.groups import format_runs

    g = GroupStore(cluster_dir).get(name)
    gl = g.group_list()
    mem, blocks = _evaluate(cluster_dir, gl)
    names = {d.id: d.name for d in load_config(cluster_dir).disks}
    lim = limit or None
    if as_json:
        click.echo(json.dumps({
            "name": name, "list": gl.lines,
            "files": [m.path.decode(errors="surrogateescape") for m in mem.files][:lim],
            "file_count": len(mem.files), "dirs_listed": mem.dirs_listed,
            "blocks": {names.get(d, str(d)): {"count": len(b), "runs": format_runs(b, lim)}
                       for d, b in sorted(blocks.items())}}, indent=2))
        return
    click.echo(f"group {name}:")
    for line in gl.lines:
        click.echo(f"  {line}")
    click.echo(f"files ({len(mem.files)}):")
    for m in mem.files[:lim]:
        click.echo(f"  {m.path.decode(errors='replace')}")
    if lim is not None and len(mem.files) > lim:
        click.echo(f"  ... {len(mem.files) - lim} more")
    click.echo("group block list (blockno):")
    for d, b in sorted(blocks.items()):
        runs = format_runs(b, lim)
        click.echo(f"  disk {names.get(d, d)}: {len(b)} blocks in {b.num_runs()} runs")
        for r in runs:
            click.echo(f"    {r}")
        if lim is not None and b.num_runs() > lim:
            click.echo(f"    ... {b.num_runs() - lim} more runs")
    if not blocks:
        click.echo("  (none)")


@click.command("scheduler")
@click.argument("cluster_dir", type=click.Path(path_type=Path))
@click.option("--once", is_flag=True, help="Run what is due now, then exit.")
def scheduler_cmd(cluster_dir: Path, once: bool) -> None:
    """Run the groups' scheduled backups (b.4) until stopped (Ctrl-C, SIGTERM).

    A slot missed while no scheduler ran is made up once (not once per missed slot);
    runs of one group never overlap (a slot that falls during the group's previous run
    waits for it); failures run the group's --on-failure command and show in
    'sdbackup group ls' and 'sdbackup status'.
    """
    import os
    import signal
    import threading

    from sdbackup.cluster.groups import GroupStore
    from sdbackup.cluster.scheduler import CommandRunner, Scheduler, SystemClock

    stop = threading.Event()
    store = GroupStore(cluster_dir)
    sch = Scheduler(store, CommandRunner(cluster_dir.absolute()), SystemClock(stop),
                    say=lambda line: click.echo(
                        f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"))
    sch.acquire()
    try:
        if once:
            sch.tick()
            return
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        click.echo(f"scheduler for {cluster_dir} started (pid {os.getpid()})")
        try:
            sch.run_forever(stop)
        except KeyboardInterrupt:
            pass
        click.echo("scheduler stopped")
    finally:
        sch.release()
