"""A node agent: joins the cluster, caches file data coherently, serves local clients.

``sdbackup node CLUSTER_DIR --name NAME`` runs :class:`NodeAgent` in the foreground:

- it joins the coordinator (found through ``CLUSTER_DIR/coordinator.addr``, or given
  with ``--coordinator HOST:PORT --secret-file FILE`` on a host without the cluster
  directory), opens the shared disks itself (paths from the coordinator; every disk's
  label must name this cluster), and keeps a :class:`CachedFileSystem`;
- it answers the coordinator's recalls, flushes and reports;
- it renews its lease with heartbeats and stops writing to the disks when the lease
  may have run out (self-fencing), so a node cut off from the coordinator never
  overwrites blocks that were given to someone else meanwhile;
- when the connection is lost it reconnects by itself; after a coordinator restart
  (a new epoch) it reclaims the write rights of its dirty segments during the grace
  period; if the same coordinator dropped it (lease expired), its unwritten data is
  lost and logged by file and range, never silently;
- local programs reach its file system through a control port (TCP on 127.0.0.1 by
  default, ``--control-listen`` otherwise; the same authenticated protocol), whose
  address is in ``CLUSTER_DIR/nodes/NAME.addr``: ``sdbackup fs CLUSTER_DIR --node NAME
  ...`` and the tests use it; other nodes reach it at its advertised address when it
  is a backup's log node (``--control-advertise``).

:class:`ClusterClient` is the same machinery without the agent's extras: a short-lived
command (``sdbackup fs`` while a coordinator runs) joins as a client, with a small
cache, and writes everything back before it leaves.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sdbackup.backup.bilog import BiLog
from sdbackup.backup.log_node import NodeLogManager
from sdbackup.blocks.blockset import BlockSet
from sdbackup.blocks.disk_access import DiskPlace, disk_identity, open_disk_set
from sdbackup.blocks.diskset import DiskSet
from sdbackup.blocks.durable import write_atomic
from sdbackup.cluster.config import read_addr
from sdbackup.cluster.part_runner import PartRunner
from sdbackup.errors import FencedError, NotFoundError, RemoteError, SdbError, UsageError
from sdbackup.fs.cached import BiItem, CachedFileSystem
from sdbackup.net import messages as msg
from sdbackup.net import wire
from sdbackup.net.auth import load_secret
from sdbackup.net.cached_meta import CachingMeta
from sdbackup.net.protocol import Blob
from sdbackup.net.remote import RemoteRights
from sdbackup.net.rpc import (
    Args,
    BaseHandler,
    Connection,
    HandlerResult,
    Result,
    RpcClient,
    RpcServer,
)

log = logging.getLogger("sdbackup.node")


class _Ref:
    """Forwards calls to the current RpcClient (replaced on reconnect)."""

    def __init__(self) -> None:
        self.client: RpcClient | None = None

    def _c(self) -> RpcClient:
        c = self.client
        if c is None or c.closed:
            raise RemoteError("not connected to the coordinator (reconnecting); try again")
        return c

    def call(self, method: str, args: Args | None = None, blob: Blob | None = None,
             timeout: float | None = None) -> Result:
        return self._c().call(method, args, blob, timeout)

    def notify(self, method: str, args: Args | None = None, blob: Blob | None = None) -> None:
        self._c().notify(method, args, blob)


def coordinator_address(cluster_dir: str | os.PathLike[str] | None,
                        coordinator: str | None) -> tuple[str, int]:
    if coordinator:
        host, _, port = coordinator.rpartition(":")
        try:
            return host or "127.0.0.1", int(port)
        except ValueError:
            raise UsageError(f"bad --coordinator {coordinator!r}: use HOST:PORT") from None
    if cluster_dir is None:
        raise UsageError("give CLUSTER_DIR or --coordinator HOST:PORT with --secret-file")
    addr = read_addr(cluster_dir)
    if addr is None:
        raise NotFoundError(f"no coordinator is running for {cluster_dir}: start one with "
                            f"'sdbackup coordinator {cluster_dir}'")
    return addr


class ClusterClient:
    """A connection to the coordinator plus a coherent file system over the shared disks.

    Opens and checks the disks before it joins (``disk_paths``: where this host sees
    each disk, by name; the coordinator's paths otherwise), renews its lease with
    heartbeats, and writes to the disks only while the lease certainly holds.
    """

    kind = "client"

    def __init__(self, name: str, *, cluster_dir: str | os.PathLike[str] | None = None,
                 coordinator: str | None = None, secret_file: str | os.PathLike[str] | None
                 = None, cache_bytes: int = 16 << 20, flush_delay: float = 5.0,
                 connect_timeout: float = 10.0, disk_paths: dict[str, str] | None = None
                 ) -> None:
        self.name = name
        self.cluster_dir = Path(cluster_dir) if cluster_dir else None
        self.address = coordinator_address(cluster_dir, coordinator)
        if secret_file is None:
            if self.cluster_dir is None:
                raise UsageError("--secret-file is needed with --coordinator")
            secret_file = self.cluster_dir / "secret"
        self.secret = load_secret(secret_file)
        self.connect_timeout = connect_timeout
        self.ref = _Ref()
        self.epoch = ""
        self.session = ""
        self.lease = 10.0
        self.last_ok = time.monotonic()
        self._joined_at = self.last_ok
        self._closing = False
        self._stop = threading.Event()
        self._renew_lock = threading.Lock()
        self._renewable = False
        self.session_gen = 0
        client = self._dial()
        try:
            info, _ = msg.call(client, msg.ClusterInfo())
            self.block_size = int(info["block_size"])
            self.cluster_id = str(info["cluster_id"])
            self.disks = self._open_disks(info["disks"], disk_paths or {})
        except BaseException:
            client.close()
            raise
        try:
            info = self._join(client)
        except BaseException:
            self.disks.close()
            raise
        self.meta = CachingMeta(self.ref, self.block_size, trusted=self.cache_trusted)
        self.rights = RemoteRights(self.ref)
        self.fs = CachedFileSystem(self.meta, self.disks, self.rights, cache_bytes=cache_bytes,
                                   flush_delay=flush_delay)
        self.fs.can_write = self.lease_valid
        self.fs.log_write_back_errors = self.kind == "node"
        self.fs.session_of = lambda: self.session_gen
        self._bi_lock = threading.Lock()
        self._local_log: BiLog | None = None
        self._bi_closed = False
        self._bi_gen: str | None = None
        # Dispersed backups (a.12): the parts this node copies (cluster/part_runner.py).
        self.parts = PartRunner(name, self.cluster_id, self.block_size, self.disks, self.ref)
        # The log manager of a backup whose log is on this node (--log-node, Fig. 36).
        self.log_manager = NodeLogManager(
            self.cluster_id, self.block_size,
            lambda gen, why: _abort_backup(self.ref, gen, f"its log could not store a "
                                           f"before image: {why}"))
        if info.get("backup"):
            b = info["backup"]
            self._backup_begin(str(b["gen"]), str(b["mode"]), b.get("log_node"),
                               b.get("log_addr"))
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="sdb-heartbeat",
                                           daemon=True)
        self._heartbeat.start()

    # -- connection ------------------------------------------------------------------------
    def _dial(self) -> RpcClient:
        host, port = self.address
        return RpcClient.connect(host, port, self.secret, self._callback,
                                 timeout=self.connect_timeout, on_lost=self._lost,
                                 name=self.name, max_workers=32)

    def _join(self, client: RpcClient, renew: bool = True) -> dict[str, Any]:
        """Join on a connected client; ``renew=False``: the lease does not count yet (a
        rejoin must first drop what the coordinator may have given away meanwhile)."""
        t = time.monotonic()  # a lease runs from the request's sending, not its answer
        try:
            info, _ = msg.call(client, msg.Join(self.name, self.kind, socket.gethostname(),
                                                os.getpid(), None, self._disk_views))
        except BaseException:
            client.close()
            raise
        # The new session's lease counts only once it may write: a heartbeat answered
        # on the new connection must not renew it before the caller says so.
        self._renewable = False
        self.session_gen += 1
        meta: CachingMeta | None = getattr(self, "meta", None)
        if meta is not None:  # capabilities belong to the session that got them
            meta.drop_all()
        self.ref.client = client
        self.epoch = str(info["epoch"])
        self.session = str(info.get("session", ""))
        self.lease = float(info["lease"])
        self._joined_at = t
        if renew:
            self.last_ok = t
            self._renewable = True
        return info

    def _connect(self, renew: bool = True) -> dict[str, Any]:
        return self._join(self._dial(), renew)

    def _open_disks(self, disks: list[dict[str, Any]], paths: dict[str, str]) -> DiskSet:
        """Open every disk where this host sees it, labels checked, before joining."""
        known = {str(d["name"]) for d in disks}
        for name in paths:
            if name not in known:
                raise UsageError(f"--disk {name}: the cluster has no disk {name!r} (disks: "
                                 f"{', '.join(sorted(known))})")
        places = [DiskPlace(str(d["name"]), int(d["id"]),
                            paths.get(str(d["name"]), str(d["path"])), bool(d.get("direct", True)))
                  for d in disks]
        self._disk_views: dict[str, str] = {}
        for p, d in zip(places, disks, strict=True):
            if p.direct:
                continue
            try:
                mine = disk_identity(p.path)
            except OSError:
                mine = "missing"
            if mine != d.get("identity"):
                raise UsageError(f"disk {p.name} is a single-host disk (its file system "
                                 f"refuses direct I/O) and {p.path} on this host is not the "
                                 "coordinator's file on the coordinator's host: this node "
                                 "cannot use it")
            self._disk_views[p.name] = mine
        return open_disk_set(places, cluster_id=self.cluster_id, block_size=self.block_size)

    def lease_valid(self) -> bool:
        """False when the lease may have run out: then this process must not write disks.

        The lease counts from the sending of the last heartbeat the coordinator answered
        (earlier than the coordinator's own count, which starts when it answered), and
        ends at 0.9 of it here; the coordinator reassigns nothing before a whole lease
        plus a margin. Called before every write to a shared disk. Past half the lease
        it renews the lease itself (one heartbeat), so that a write-back is not refused
        merely because the heartbeat thread was slow.
        """
        if time.monotonic() - self.last_ok < self.lease * 0.5:
            return True
        self._renew(self.lease / 4)
        return time.monotonic() - self.last_ok < self.lease * 0.9

    def cache_trusted(self) -> bool:
        """Whether cached metadata may answer (never blocks): only while the session may
        write, and well inside the lease (capabilities end with it, cluster/caps.py)."""
        return self._renewable and time.monotonic() - self.last_ok < self.lease * 0.9

    def _renew(self, timeout: float) -> bool:
        """One heartbeat; False when the session is lost (fenced, or a new epoch)."""
        if not self._renew_lock.acquire(timeout=timeout):
            return True  # another thread is renewing
        try:
            gen, renewable = self.session_gen, self._renewable
            t = time.monotonic()  # the coordinator renews on receipt: later than t
            body, _ = msg.call(self.ref, msg.Heartbeat(), timeout=timeout)
            if body.get("epoch") != self.epoch:
                return False
            # Only a heartbeat sent and answered within one session that may write
            # renews its lease.
            if renewable and self._renewable and gen == self.session_gen:
                self.last_ok = max(self.last_ok, t)
            return True
        finally:
            self._renew_lock.release()

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(max(0.2, self.lease / 4)):
            try:
                ok = self._renew(self.lease / 2)
                why = "the coordinator restarted"
            except RemoteError as e:
                ok, why = False, str(e)
            if not ok and not self._stop.is_set():
                self._on_lost_session(why)

    def _on_lost_session(self, why: str) -> None:
        """A short-lived client does not rejoin: its calls fail from now on."""
        if not self._closing:
            log.error("%s %s lost its session: %s", self.kind, self.name, why)

    def _lost(self, error: RemoteError) -> None:
        if not self._closing:
            log.warning("lost the coordinator: %s", error)

    # -- coordinator requests --------------------------------------------------------------------
    def _callback(self, method: str, args: Args, blob: bytes | None) -> HandlerResult:
        # No lease renewal here: the coordinator's calls do not renew it on its side.
        match msg.decode(msg.NODE_CALLBACKS, method, args):
            case msg.Recall(ino, segs, keep):
                self.fs.recall(ino, list(segs), keep)
            case msg.FlushInode(ino):
                self.fs.flush_inode(ino)
            case msg.DropCaps(inos):
                self.meta.drop(inos)
            case msg.NodeFlush():
                self.fs.flush_all()
            case msg.Report():
                return self.fs.report()
            case msg.BackupBegin(gen, mode, log_node, log_addr):
                self._backup_begin(gen, mode, log_node, log_addr)
            case msg.BiFetch(gen, offset, size):
                if self.log_manager.holds(gen):
                    data, eof = self.log_manager.read(gen, offset, size)
                    return {"eof": eof}, data
                return self._bi_fetch(gen, offset, size)
            case msg.BackupEnd(gen):
                self._backup_end(gen)
                self.log_manager.end(gen)
            case msg.LogOpen(gen, mode, path, log_medium):
                addr = self._log_addr()
                self.log_manager.open(gen, mode, Path(path), log_medium)
                log.info("backup %s: this node is the log manager (%s, log %s)", gen, mode,
                         path)
                return {"addr": addr}
            case msg.LogClose(gen, discard):
                return self.log_manager.close(gen, discard)
            case msg.PutBi(gen, items):  # the coordinator's own before images
                return {"stored": self.log_manager.put(gen, items, blob)}
            case msg.CopyPart() as r:
                return self.parts.start(r, blob)
            case msg.PartCancel(gen, discard):
                self.parts.cancel(gen, discard)
            case _:
                raise RemoteError(f"node {self.name} does not know request {method!r}")
        return None

    # -- online backup: before-image logging (issue 6) -----------------------------------------
    def _bi_dir(self) -> Path:
        d = (self.cluster_dir / "nodes") if self.cluster_dir else Path(tempfile.gettempdir())
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _log_addr(self) -> str:
        raise UsageError(f"{self.kind} {self.name} has no control port: only a node agent "
                         "('sdbackup node') can be the log node")

    def _backup_begin(self, gen: str, mode: str, log_node: str | None = None,
                      log_addr: str | None = None) -> None:
        """Arm before-image logging for backup ``gen`` (the coordinator is frozen)."""
        with self._bi_lock:
            self._backup_end_locked()
            if log_node is not None and log_node == self.name:
                self.fs.bi_sink = OwnLogSink(self.log_manager, self.ref, gen,
                                             self.block_size)
            elif log_node is not None:
                if log_addr is None:
                    raise RemoteError(f"backup {gen}: log node {log_node} without an address")
                self.fs.bi_sink = LogNodeBiSink(self.ref, gen, self.block_size, log_node,
                                                log_addr, self.secret,
                                                max(2 * self.lease, 10.0), self.name)
            elif mode == "merged":
                path = self._bi_dir() / f"{self.name}.{gen}.bilog"
                self._local_log = BiLog(path, block_size=self.block_size, dedup=True,
                                        label={"node": self.name, "generation": gen})
                self.fs.bi_sink = LocalBiSink(self._local_log, self.ref, gen)
            else:
                self.fs.bi_sink = RemoteBiSink(self.ref, gen, self.block_size)
            self._bi_gen = gen
        log.info("backup %s: before-image logging armed (%s)", gen, mode)

    def _bi_fetch(self, gen: str, offset: int, size: int) -> Result:
        with self._bi_lock:
            lg = self._local_log
            if lg is None or self._bi_gen != gen:
                raise RemoteError(f"node {self.name} holds no before-image log of backup {gen}")
            if not self._bi_closed:
                # Appending ends here: the copy is finished before logs are gathered,
                # so later overwrites need no before images.
                sink = self.fs.bi_sink
                self.fs.bi_sink = ClosedBiSink()
                if isinstance(sink, LocalBiSink):
                    sink.close()  # under the sink's lock: no append races the close
                else:
                    lg.close()
                self._bi_closed = True
            with open(lg.path, "rb") as f:
                f.seek(offset)
                data = f.read(min(size, 32 << 20))
            return {"eof": len(data) < size}, data

    def _backup_end(self, gen: str) -> None:
        with self._bi_lock:
            if self._bi_gen == gen:
                self._backup_end_locked()

    def _backup_end_locked(self) -> None:
        # Not None: a write-back mapped while the window was open may still carry
        # before-image requests; they are no longer needed.
        old = self.fs.bi_sink
        self.fs.bi_sink = ClosedBiSink()
        if isinstance(old, LogNodeBiSink):
            old.close()
        if self._local_log is not None:
            if not self._bi_closed:
                self._local_log.writer.abort()
            self._local_log.path.unlink(missing_ok=True)
        self._local_log = None
        self._bi_closed = False
        self._bi_gen = None

    def close(self) -> None:
        """Write everything back, give the rights up (goodbye), disconnect."""
        self._closing = True
        self._stop.set()
        try:
            self.fs.close()
            if self.ref.client is not None and not self.ref.client.closed:
                try:
                    msg.call(self.ref, msg.Goodbye(), timeout=self.lease)
                except RemoteError as e:
                    log.warning("leaving the cluster: %s", e)
        finally:
            if self.ref.client is not None:
                self.ref.client.close()
            self.disks.close()

    def __enter__(self) -> ClusterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _abort_backup(ref: _Ref, gen: str, reason: str) -> None:
    """Tell the coordinator that a before image could not be stored: it aborts that
    backup, and only once it has acknowledged may the overwrite go on (if it cannot be
    told, the write-back fails as for a lost coordinator)."""
    log.error("backup %s: %s; asking the coordinator to abort it (writes go on)", gen,
              reason)
    msg.call(ref, msg.BiFailed(gen, reason))


class LocalBiSink:
    """Merged mode (a.2): before images go to this node's own temporary log."""

    def __init__(self, log: BiLog, ref: _Ref, gen: str) -> None:
        self.bilog = log
        self.ref = ref
        self.gen = gen
        self._lock = threading.Lock()
        self.closed = False

    def log(self, items: list[BiItem]) -> None:
        with self._lock:
            if self.closed:
                return  # the copy is finished, or logging failed and the backup is off
            try:
                for disk, start, data, ltime in items:
                    self.bilog.append(disk, start, data, ltime)
                # To the OS, not fsynced: in merged mode a crash of this node fails the
                # backup anyway; the log is fsynced when it is closed, before gathering.
                self.bilog.flush()
                return
            except (OSError, SdbError) as e:  # e.g. this node's disk is full
                reason = f"its log {self.bilog.path} could not be written ({e})"
                self.closed = True
                self.bilog.writer.abort()
                self.bilog.path.unlink(missing_ok=True)
        _abort_backup(self.ref, self.gen, reason)

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                self.bilog.close()


class RemoteBiSink:
    """Central, inline and separate modes (a.3-a.5): before images go to the
    coordinator's log manager at once; it acknowledges once they are durable."""

    def __init__(self, ref: _Ref, gen: str, block_size: int) -> None:
        self.ref = ref
        self.gen = gen
        self.block_size = block_size

    def log(self, items: list[BiItem]) -> None:
        desc = tuple((d, s, len(data) // self.block_size, t) for d, s, data, t in items)
        try:
            msg.call(self.ref, msg.PutBi(self.gen, desc),
                     b"".join(data for _, _, data, _ in items))
        except FencedError:
            raise
        except RemoteError as e:  # the log manager failed or timed out: abort the backup
            _abort_backup(self.ref, self.gen, f"the log manager did not store it ({e})")


class OwnLogSink:
    """This node is the log node: its own before images go to its log manager
    directly (no round trip), with the same rule as any other node's."""

    def __init__(self, manager: NodeLogManager, ref: _Ref, gen: str, block_size: int
                 ) -> None:
        self.manager = manager
        self.ref = ref
        self.gen = gen
        self.block_size = block_size

    def log(self, items: list[BiItem]) -> None:
        desc = tuple((d, s, len(data) // self.block_size, t) for d, s, data, t in items)
        try:
            self.manager.put(self.gen, desc, b"".join(data for _, _, data, _ in items))
        except FencedError:
            raise
        except (RemoteError, UsageError) as e:  # the coordinator could not be told
            _abort_backup(self.ref, self.gen, f"the log manager did not store it ({e})")


class LogNodeBiSink:
    """Central, inline and separate modes with a log node (Fig. 36): before images go
    straight to the log node's control port, not through the coordinator; it
    acknowledges once they are in its log. A log node that cannot be reached or fails
    aborts the backup (the coordinator is told, then the overwrite goes on). Blocks
    it acknowledged are not sent again: their oldest before image is stored."""

    def __init__(self, ref: _Ref, gen: str, block_size: int, node: str, addr: str,
                 secret: bytes, timeout: float, me: str) -> None:
        self.ref = ref
        self.gen = gen
        self.block_size = block_size
        self.node = node
        host, _, port = addr.rpartition(":")
        self.address = (host, int(port))
        self.secret = secret
        self.timeout = timeout
        self.me = me
        self._lock = threading.Lock()
        self._client: RpcClient | None = None
        self._acked: dict[int, BlockSet] = {}
        self.aborted = False

    def _conn(self) -> RpcClient:
        with self._lock:
            c = self._client
            if c is None or c.closed:
                c = self._client = RpcClient.connect(
                    *self.address, self.secret, timeout=self.timeout,
                    name=f"{self.me}-bi-to-{self.node}")
            return c

    def log(self, items: list[BiItem]) -> None:
        if self.aborted:
            return  # the coordinator acknowledged the abort: no before image is needed
        with self._lock:
            todo = [it for it in items
                    if not (a := self._acked.get(it[0])) or
                    not a.contains_run(it[1], len(it[2]) // self.block_size)]
        if not todo:
            return
        desc = tuple((d, s, len(data) // self.block_size, t) for d, s, data, t in todo)
        try:
            msg.call(self._conn(), msg.PutBi(self.gen, desc),
                     b"".join(data for _, _, data, _ in todo), timeout=self.timeout)
        except (SdbError, OSError) as e:  # dead, hung or failing log node
            _abort_backup(self.ref, self.gen,
                          f"log node {self.node} did not store it ({e})")
            self.aborted = True
            return
        with self._lock:
            for d, s, n, _ in desc:
                self._acked.setdefault(d, BlockSet()).add_run(s, n)

    def close(self) -> None:
        with self._lock:
            c, self._client = self._client, None
        if c is not None:
            c.close(timeout=1.0)


class ClosedBiSink:
    """After the coordinator started gathering this node's log: the copy is finished,
    so no overwrite from now on needs a before image."""

    def log(self, items: list[BiItem]) -> None:
        pass


class NodeAgent(ClusterClient):
    """A long-running node: heartbeats, reconnection, delayed write-back, control port."""

    kind = "node"

    def __init__(self, name: str, **kw: Any) -> None:
        self._reconnecting = threading.Lock()
        self.control: RpcServer | None = None
        self.advertised: str | None = None
        super().__init__(name, **kw)

    def _log_addr(self) -> str:
        """The address other nodes reach this node's control port at (``--log-node``)."""
        if self.control is None or self.advertised is None:
            raise UsageError(f"node {self.name} has no control port yet")
        return self.advertised

    def start(self, control_host: str = "127.0.0.1", control_port: int = 0,
              advertise: str | None = None) -> None:
        """Serve the control port on ``control_host:control_port`` (port 0: any free
        port). Other nodes reach it at ``advertise`` (``HOST`` or ``HOST:PORT``; the
        port defaults to the bound one), else at the bound address; a wildcard bind
        needs ``advertise`` (this process cannot know which of its addresses others
        reach)."""
        adv = control_advertise(control_host, advertise)
        self.fs.start_flusher()
        self.control = RpcServer(lambda conn: _ControlHandler(self), self.secret,
                                 host=control_host, port=control_port, max_workers=32,
                                 name=f"node {self.name} control port")
        self.control.start()
        h, p = self.control.address
        ah, ap = adv if adv is not None else (h, p)
        self.advertised = f"{ah}:{ap if ap is not None else p}"
        if self.cluster_dir is not None:
            (self.cluster_dir / "nodes").mkdir(exist_ok=True)
            local = h
            if h in WILDCARDS:  # local programs come over the loopback interface
                local = "::1" if ":" in h else "127.0.0.1"
            write_atomic(self._addr_file(), f"{local}:{p} pid={os.getpid()}\n".encode())
        log.info("node %s up (coordinator %s:%d, cache %d MiB, control port %s:%d, "
                 "advertised as %s)", self.name, *self.address, self.fs.cache_bytes >> 20,
                 h, p, self.advertised)

    def _addr_file(self) -> Path:
        assert self.cluster_dir is not None
        return self.cluster_dir / "nodes" / f"{self.name}.addr"

    def _on_lost_session(self, why: str) -> None:
        log.warning("lost the session with the coordinator (%s); joining again", why)
        self._reconnect()

    def _reconnect(self) -> None:
        """Join again as a new session. After a coordinator restart (new epoch): reclaim
        the dirty segments. Fenced by the same coordinator: the cache is dropped first
        (its rights were, or will be, given to others) and what was lost is logged by
        path and byte range; only then may this node write again."""
        self._renewable = False  # the lost session's lease must not be renewed now
        if self._stop.is_set() or not self._reconnecting.acquire(blocking=False):
            return
        try:
            old_epoch = self.epoch
            while not self._stop.is_set():
                try:
                    if self.cluster_dir is not None:
                        addr = read_addr(self.cluster_dir)
                        if addr is not None:
                            self.address = addr
                    if self.ref.client is not None:
                        self.ref.client.close(timeout=1.0)
                    self._connect(renew=False)
                    break
                except Exception as e:  # keep trying: the coordinator may be restarting
                    log.info("reconnect to the coordinator failed: %s", e)
                    self._stop.wait(0.5)
            if self._stop.is_set():
                return
            if self.epoch != old_epoch:
                # Nothing was given away: a new coordinator grants only reclaims first.
                self._renewable = True
                self.last_ok = self._joined_at
                self._reclaim()
            else:
                self._log_lost(self.fs.drop_all(), "this node was fenced (declared failed "
                               "by the coordinator) before it could write it back")
                log.warning("joined the same coordinator again as session %s; cache dropped",
                            self.session)
            self._renewable = True
            self.last_ok = self._joined_at  # only now may it write again
        finally:
            self._reconnecting.release()

    def _log_lost(self, lost: dict[int, list[tuple[int, int]]], why: str) -> None:
        if not lost:
            return
        try:
            inos = tuple(sorted(lost)[:msg.MAX_PATHS])
            body, _ = msg.call(self.ref, msg.Paths(inos), timeout=self.lease)
            paths = {int(k): str(v) for k, v in body["paths"].items()}
        except RemoteError:
            paths = {}
        for ino, ranges in sorted(lost.items()):
            for lo, hi in ranges:
                log.error("LOST unwritten data of %s bytes %d-%d (inode %d): %s",
                          paths.get(ino, f"<inode {ino}>"), lo, hi, ino, why)

    def _reclaim(self) -> None:
        """After a coordinator restart: take back the write rights of dirty segments."""
        dirty = self.fs.dirty_segments()
        self.fs.forget_clean()
        for ino, segs in dirty.items():
            try:
                self.rights.acquire(ino, segs, "w", reclaim=True)
            except Exception as e:
                log.error("LOST unwritten data of inode %d segments %s: reclaim failed: %s",
                          ino, segs, e)
        log.warning("reconnected to a restarted coordinator; reclaimed %d dirty files",
                    len(dirty))
        if dirty:
            self.fs.flush_all()

    def stop(self) -> None:
        self._stop.set()
        try:
            if self.control is not None:
                self.control.stop()
            if self.cluster_dir is not None:
                self._addr_file().unlink(missing_ok=True)
        finally:
            self.close()
        log.info("node %s stopped", self.name)


class _ControlHandler(BaseHandler):
    """Local programs' requests to a node: the file system, through the node's cache.
    Each request is decoded and checked (net/messages.py); those the node does not
    serve itself go on to the coordinator as they are."""

    def __init__(self, agent: NodeAgent) -> None:
        self.a = agent

    def handle(self, conn: Connection, method: str, args: Args, blob: bytes | None
               ) -> HandlerResult:
        fs = self.a.fs
        match msg.decode(msg.NODE_CONTROL_REQUESTS, method, args):
            case msg.ControlJoin():
                return {"cluster_id": self.a.cluster_id, "block_size": self.a.block_size,
                        "node": self.a.name}
            case msg.Read(ino, offset, size):
                return {}, fs.read(ino, offset, size)
            case msg.Write(ino, offset):
                return {"written": fs.write(ino, offset, blob or b"")}
            case msg.Fsync(ino):
                fs.fsync(ino)
            case msg.FlushInode(ino):
                fs.flush_inode(ino)
            case msg.GetAttr(ino):
                return {"attr": wire.enc_attr(fs.getattr(ino))}
            case msg.Lookup(parent, name):
                return {"attr": wire.enc_attr(fs.lookup(parent, name))}
            case msg.Truncate(ino, size):
                return {"attr": wire.enc_attr(fs.truncate(ino, size))}
            case msg.Release(ino):
                fs.release(ino)
            case msg.Report():
                return fs.report()
            case msg.PutBi(gen, items):  # this node is the log node (Fig. 36)
                return {"stored": self.a.log_manager.put(gen, items, blob)}
            case msg.Request() as req if req.METHOD in msg.NODE_PASS_THROUGH:
                # Through the node's metadata cache: a change made here must update
                # it as the node's own changes do (the coordinator counts this node as
                # the actor and tells no one else).
                return self.a.meta.forward(req)
            case _:
                raise RemoteError(f"unknown request {method!r} for node {self.a.name}")
        return None


WILDCARDS = ("0.0.0.0", "::", "")
"""Bind addresses that mean every address of this host."""


def split_host_port(value: str, option: str) -> tuple[str, int | None]:
    """``HOST``, ``HOST:PORT`` or ``[V6]:PORT`` (a bare IPv6 address is a host)."""
    host, port = value, ""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise UsageError(f"bad {option} {value!r}: use HOST, HOST:PORT or [V6]:PORT")
        port = rest[1:]
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    if not port:
        return host, None
    try:
        n = int(port)
    except ValueError:
        n = -1
    if not 0 <= n <= 65535:
        raise UsageError(f"bad {option} {value!r}: the port must be a number 0-65535")
    return host, n


def control_advertise(host: str, advertise: str | None) -> tuple[str, int | None] | None:
    """Check a control port's bind and advertised addresses (``sdbackup node
    --control-listen/--control-advertise``); returns the advertised host and port
    (None: the bound one), or None to advertise the bound address."""
    if advertise:
        ah, ap = split_host_port(advertise, "--control-advertise")
        if ah in WILDCARDS or ap == 0:
            raise UsageError(f"bad --control-advertise {advertise!r}: give an address and "
                             "port other nodes can reach (not a wildcard, not port 0)")
        return ah, ap
    if host in WILDCARDS:
        raise UsageError(f"--control-listen {host or '*'}: listening on every address "
                         "needs --control-advertise HOST[:PORT], the address other nodes "
                         "reach this node at")
    return None


def node_control_address(cluster_dir: str | os.PathLike[str], name: str) -> tuple[str, int]:
    p = Path(cluster_dir) / "nodes" / f"{name}.addr"
    try:
        text = p.read_text().split()[0]
    except (FileNotFoundError, IndexError):
        raise NotFoundError(f"node {name!r} is not running for {cluster_dir} (no {p})") from None
    host, _, port = text.rpartition(":")
    return host, int(port)
