"""Commands that run or talk to the cluster's processes: coordinator, node, status,
cache ls, flush, umount.

Each command imports what it runs on when it runs (see :mod:`sdbackup.cli.main`).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sdbackup.errors import SdbError, UsageError

if TYPE_CHECKING:
    from sdbackup.net import messages as msg


def register(cli: click.Group) -> None:
    cli.add_command(coordinator)
    cli.add_command(node)
    cli.add_command(status)
    cli.add_command(cache)
    cli.add_command(flush)
    cli.add_command(umount)


def _log_to(path: Path, level: int = logging.INFO) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    fmt = logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    fh = logging.FileHandler(path)
    fh.setFormatter(fmt)
    root.addHandler(fh)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        root.addHandler(sh)
    root.setLevel(min(root.level, level) if root.level else level)


def _wait_for_signal() -> None:
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop.wait(1.0):
        pass


@click.command()
@click.argument("cluster_dir", type=click.Path(path_type=Path))
@click.option("--listen", default="127.0.0.1:0", show_default=True, metavar="HOST:PORT",
              help="Address to serve nodes on (port 0: any free port).")
@click.option("--lease", default=10.0, show_default=True,
              help="Seconds without a heartbeat after which a node loses its rights.")
@click.option("--schedules/--no-schedules", default=True, show_default=True,
              help="Run the file groups' scheduled backups (b.4) here, as 'sdbackup "
                   "scheduler' would (one scheduler per cluster).")
def coordinator(cluster_dir: Path, listen: str, lease: float, schedules: bool) -> None:
    """Run the cluster's coordinator in the foreground (until SIGTERM or Ctrl-C).

    It keeps the metadata and the cluster cache table, grants write rights, and
    records its address in CLUSTER_DIR/coordinator.addr; while it runs, every other
    sdbackup command on the cluster goes through it. It also runs the groups' due
    backups (unless --no-schedules, or another scheduler runs already). Logs go to
    stderr and to CLUSTER_DIR/logs/coordinator.log.
    """
    from sdbackup.cluster.config import load_config
    from sdbackup.cluster.coordinator import Coordinator

    host, _, port = listen.rpartition(":")
    try:
        port_n = int(port)
    except ValueError:
        raise UsageError(f"bad --listen {listen!r}: use HOST:PORT, e.g. 0.0.0.0:7070") from None
    if not 0 <= port_n <= 65535:
        raise UsageError(f"bad --listen {listen!r}: the port must be 0 (any free port) to "
                         "65535")
    if not lease >= 0.5 or lease > 3600:  # also refuses NaN
        raise UsageError(f"bad --lease {lease}: give seconds between 0.5 and 3600")
    load_config(cluster_dir)  # a clear error for a wrong path, before logs/ is made
    _log_to(cluster_dir / "logs" / "coordinator.log")
    c = Coordinator(cluster_dir, host=host or "127.0.0.1", port=port_n, lease=lease)
    stop_schedules = threading.Event()
    try:
        h, p = c.start()
        click.echo(f"coordinator listening on {h}:{p}", err=True)
        if schedules:
            _start_schedules(cluster_dir, stop_schedules)
        _wait_for_signal()
    finally:
        stop_schedules.set()
        c.stop()


def _start_schedules(cluster_dir: Path, stop: threading.Event) -> None:
    """The groups' scheduler in a thread of the coordinator (b.4: the management
    computer runs the schedules). Each due run is a 'sdbackup backup' child process,
    which the coordinator then runs like any other backup. A scheduler already running
    for the cluster keeps the job: this one says so and stays off."""
    from sdbackup.cluster.groups import GroupStore
    from sdbackup.cluster.scheduler import CommandRunner, Scheduler, SystemClock

    log = logging.getLogger("sdbackup.scheduler")
    sch = Scheduler(GroupStore(cluster_dir), CommandRunner(cluster_dir.absolute()),
                    SystemClock(stop), say=lambda line: log.info("%s", line))
    try:
        sch.acquire()
    except SdbError as e:
        log.warning("%s: this coordinator runs no schedules", e)
        return

    def run() -> None:
        try:
            while not stop.is_set():
                try:
                    sch.run_forever(stop)
                except Exception:  # keep scheduling; say what failed
                    log.exception("scheduled backups: a round failed")
                    stop.wait(5.0)
        finally:
            sch.release()

    threading.Thread(target=run, name="sdb-scheduler", daemon=True).start()


@click.command()
@click.argument("cluster_dir", required=False, type=click.Path(path_type=Path))
@click.option("--name", required=True, help="This node's name (unique in the cluster).")
@click.option("--cache-size", default="64MiB", show_default=True,
              help="Write-back cache size limit.")
@click.option("--flush-delay", default=5.0, show_default=True,
              help="Seconds after which dirty data is written back.")
@click.option("--coordinator", "coord", metavar="HOST:PORT",
              help="Coordinator address (on a host without the cluster directory).")
@click.option("--secret-file", type=click.Path(path_type=Path),
              help="The cluster secret (a copy of CLUSTER_DIR/secret), with --coordinator.")
@click.option("--mount", "mountpoint", type=click.Path(path_type=Path), metavar="MOUNTPOINT",
              help="Mount the cluster's file system there with FUSE, for every program "
                   "on this host; the node runs until it is unmounted (sdbackup umount, "
                   "fusermount3 -u) or stopped (SIGTERM), and then unmounts itself.")
@click.option("--disk", "disk_paths", multiple=True, metavar="NAME=PATH",
              help="Where this host sees shared disk NAME (e.g. d0=/dev/sdc): repeat for "
                   "each disk whose path differs from the coordinator's cluster.toml.")
@click.option("--control-listen", default="127.0.0.1:0", show_default=True,
              metavar="HOST:PORT",
              help="Address of this node's control port (local programs; other nodes' "
                   "before images when this node is a backup's --log-node). Port 0: any "
                   "free port. Listen on an address other hosts reach when the log node "
                   "may be another host's.")
@click.option("--control-advertise", metavar="HOST[:PORT]",
              help="The address other nodes reach the control port at (default: the "
                   "--control-listen address; needed when that is 0.0.0.0 or ::). The "
                   "port defaults to the bound one.")
def node(cluster_dir: Path | None, name: str, cache_size: str, flush_delay: float,
         coord: str | None, secret_file: Path | None, mountpoint: Path | None,
         disk_paths: tuple[str, ...], control_listen: str, control_advertise: str | None
         ) -> None:
    """Run a node agent in the foreground (until SIGTERM or Ctrl-C).

    The node reads and writes file data on the shared disks directly (O_DIRECT: never
    through this host's page cache), keeps a coherent write-back cache, and serves
    local programs: through FUSE with --mount, and through its control port
    (sdbackup fs CLUSTER_DIR --node NAME). Before it joins, it opens every disk (at
    the coordinator's path, or where --disk says) and checks its label; a missing,
    read-only or foreign disk is an error and the node does not join.
    """
    from sdbackup.blocks.disk_access import parse_disk_overrides
    from sdbackup.cluster.config import load_config, parse_size
    from sdbackup.cluster.node import NodeAgent, split_host_port
    from sdbackup.cluster.node import control_advertise as check_advertise

    overrides = parse_disk_overrides(disk_paths)
    control_host, control_port = split_host_port(control_listen, "--control-listen")
    check_advertise(control_host, control_advertise)  # before joining
    if cluster_dir is None and coord is None:
        raise UsageError("give CLUSTER_DIR, or --coordinator HOST:PORT with --secret-file")
    if cluster_dir is not None and coord is None:
        load_config(cluster_dir)  # a clear error for a wrong path, before logs/ is made
    if mountpoint is not None:
        from sdbackup.fs import fuse_mount

        fuse_mount.check_fuse()
        fuse_mount.check_mountpoint(mountpoint)  # fail before joining the cluster
    log_dir = (cluster_dir / "logs") if cluster_dir else Path(".")
    _log_to(log_dir / f"node-{name}.log")
    agent = NodeAgent(name, cluster_dir=cluster_dir, coordinator=coord,
                      secret_file=secret_file, cache_bytes=parse_size(cache_size),
                      flush_delay=flush_delay, disk_paths=overrides)
    try:
        agent.start(control_host, control_port or 0, control_advertise)
        click.echo(f"node {name} joined the coordinator at "
                   f"{agent.address[0]}:{agent.address[1]}", err=True)
        if mountpoint is None:
            _wait_for_signal()
        else:
            fuse_mount.serve(agent.fs, mountpoint, name=name,
                             on_ready=lambda mp: click.echo(f"node {name} mounted the "
                                                            f"file system at {mp}", err=True))
    finally:
        agent.stop()


def _rpc(cluster_dir: Path, request: msg.Request) -> dict[str, Any]:
    from sdbackup.cluster.access import coordinator_client
    from sdbackup.net import messages as msg

    with coordinator_client(cluster_dir) as c:
        body, _ = msg.call(c, request, timeout=300)
        return body


@click.command()
@click.argument("cluster_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def status(cluster_dir: Path, as_json: bool) -> None:
    """Show the coordinator, the nodes (host, state, cache used/dirty) and the disks."""
    from sdbackup.net import messages as msg

    st = _rpc(cluster_dir, msg.Status())
    failed = _failed_group_runs(cluster_dir)
    if as_json:
        click.echo(json.dumps({**st, "failed_group_runs": failed}, indent=2))
        return
    for f in failed:
        click.echo(f"group {f['group']}: last scheduled run FAILED at "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(f['at']))}: "
                   f"{f['result']}"
                   + (f" (on-failure hook exit {f['hook_status']})"
                      if f["hook_status"] is not None else ""))
    click.echo(f"coordinator {st['coordinator']} (pid {st['pid']}, epoch {st['epoch']}, "
               f"logical clock {st['clock']}{', FROZEN' if st['frozen'] else ''})")
    click.echo(f"{'node':<16} {'kind':<7} {'host':<16} {'state':<7} {'cached':>10} "
               f"{'dirty':>10} {'limit':>10}")
    for n in st["nodes"]:
        click.echo(f"{n['name']:<16} {n['kind']:<7} {n['host']:<16} {n['state']:<7} "
                   f"{n.get('cached_bytes', 0) >> 10:>8}Ki {n.get('dirty_bytes', 0) >> 10:>8}Ki "
                   f"{n.get('limit', 0) >> 20:>8}Mi")
    for d in st["disks"]:
        click.echo(f"disk {d['name']}: {d['used']} of {d['blocks']} blocks used")
    for n in st["nodes"]:
        for path, what in (n.get("write_back_errors") or {}).items():
            click.echo(f"write-back failing on node {n['name']}: {path}: {what} (the data "
                       "stays dirty there; its programs are told)")
    for loss in st.get("losses", []):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(loss["time"]))
        click.echo(f"LOST {when} node {loss['node']}: {loss['path']} bytes "
                   f"{loss['start']}-{loss['end']}: {loss['why']}")
    b = st.get("backup")
    if isinstance(b, dict):  # an online backup's before-image window is open
        if b.get("log_node"):
            keeper = f"log node {b['log_node']} (before images to {b['log_addr']})"
        elif b["mode"] == "merged":
            keeper = "every node its own"
        else:
            keeper = "the coordinator"
        click.echo(f"backup {b['generation']}: online, log mode {b['mode']}, log kept by "
                   f"{keeper}" + (f"; FAILED: {b['failed']}" if b.get("failed") else ""))
    d = st.get("dispersed")
    if isinstance(d, dict):  # a dispersed backup is copying (a.12)
        click.echo(f"backup {d['generation']}: {d['bytes_done'] >> 20} of "
                   f"{d['bytes_total'] >> 20} MiB, {d['parts_done']} of {d['parts']} parts, "
                   f"{d['reassigned']} reassigned, {d['seconds']:.1f} s")
        for c in d["copiers"]:
            part = f", part {c['part']}" if c.get("part") is not None else ""
            click.echo(f"  copier {c['node']:<12} {c['state']:<8} {c['bytes_done'] >> 20:>6} "
                       f"MiB, {c['parts_done']} parts done{part} -> {c['medium']}"
                       + (f" (failed: {c['failed']})" if c.get("failed") else ""))


def _failed_group_runs(cluster_dir: Path) -> list[dict[str, Any]]:
    """Groups whose last scheduled run failed (``sdbackup scheduler``)."""
    from sdbackup.cluster.groups import GroupStore

    out = []
    for name, r in sorted(GroupStore(cluster_dir).runs().items()):
        if r.last_result and r.last_result.startswith("failed"):
            out.append({"group": name, "at": r.last_start or 0.0, "result": r.last_result,
                        "hook_status": r.hook_status})
    return out


@click.group()
def cache() -> None:
    """The cluster cache table (which node caches which file area, dirty or not)."""


@cache.command(name="ls")
@click.argument("cluster_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def cache_ls(cluster_dir: Path, as_json: bool) -> None:
    """Print the cache table: node, file, offset, size, right, dirty (the seed's Fig. 3)."""
    from sdbackup.net import messages as msg

    rows = _rpc(cluster_dir, msg.CacheTable())["entries"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'node':<14} {'right':<5} {'dirty':<5} {'offset':>12} {'size':>10}  file")
    for r in rows:
        click.echo(f"{r['node']:<14} {r['mode']:<5} {'yes' if r['dirty'] else 'no':<5} "
                   f"{r['offset']:>12} {r['size']:>10}  {r['path']} (inode {r['ino']})")


@click.command()
@click.argument("cluster_dir", type=click.Path(path_type=Path))
@click.option("--timeout", default=60.0, show_default=True)
def flush(cluster_dir: Path, timeout: float) -> None:
    """Make every node write its dirty cache back; returns when nothing is dirty."""
    from sdbackup.net import messages as msg

    r = _rpc(cluster_dir, msg.FlushAll(timeout))
    for name, err in r["errors"].items():
        click.echo(f"node {name}: {err}", err=True)
    if not r["clean"] or r["errors"]:
        raise UsageError("flush did not finish: some areas are still dirty (see above)", 1)
    click.echo(f"flushed {r['nodes']} node(s) in {r['seconds']:.3f} s; no dirty areas left")


@click.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--lazy", is_flag=True,
              help="Detach the mount now even if programs still use it (umount -l).")
@click.option("--timeout", default=60.0, show_default=True,
              help="Seconds to wait for the node agent to write its cache back and exit.")
def umount(mountpoint: Path, lazy: bool, timeout: float) -> None:
    """Unmount a node's or a backup's FUSE mount point; also clears a dead mount.

    A live node agent writes its cache back and exits once its mount is gone, and a
    'sdbackup mount' process exits; this command waits for that (up to --timeout). A
    mount whose agent died (accesses fail with 'Transport endpoint is not connected') is
    detached lazily.
    """
    from sdbackup.fs import fuse_mount

    r = fuse_mount.unmount(mountpoint, lazy=lazy, timeout=timeout)
    click.echo(f"{r['mountpoint']}: {r['how']}")
    still = r["still_running"]
    if still:
        click.echo(f"node agent(s) {still} still running after {timeout:g} s "
                   "(writing their cache back?)", err=True)
