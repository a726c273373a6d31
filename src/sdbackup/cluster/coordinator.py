"""The coordinator process: metadata authority, coherence, membership (the seed's
management computer 12).

``sdbackup coordinator CLUSTER_DIR`` runs :class:`Coordinator` in the foreground. It
takes the cluster lock (so no embedded command opens the store meanwhile), serves the
cluster protocol, and writes its address to ``CLUSTER_DIR/coordinator.addr`` so that
other commands find it.

Membership: a node joins with a unique name; it renews its lease with heartbeats. A
node that closes its connection, or whose lease runs out (default 10 s), is declared
failed: its rights go, its reserved blocks are freed, and the areas it had dirty are
logged by file name and byte range as lost. After a coordinator restart, nodes
reconnect by themselves and reclaim the write rights of their dirty segments during a
grace period of one lease, before any other node may take new rights.

Everything a node asks that may free blocks (unlink, rename over a file, the last
release of an unlinked file, truncate) first recalls every node's rights on that
inode, so no node writes a block after it has been freed and perhaps reused.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdbackup.backup.window import BackupWindow
from sdbackup.backup.window_manager import FETCH_TIMEOUT, WindowManager
from sdbackup.blocks.blockset import BlockSet
from sdbackup.blocks.disk_access import disk_identity
from sdbackup.blocks.diskset import DiskSet
from sdbackup.blocks.durable import write_atomic
from sdbackup.cluster.caps import CapTable
from sdbackup.cluster.config import ADDR_FILE, load_config
from sdbackup.cluster.dispersed import DispersedCopier
from sdbackup.cluster.local import ClusterLock, open_disks
from sdbackup.cluster.rights import RecallFailed, RightsManager
from sdbackup.errors import (
    BusyError,
    FencedError,
    FsError,
    RemoteError,
    UsageError,
)
from sdbackup.fs.filesystem import zero_tail
from sdbackup.fs.segments import SEGMENT_BYTES
from sdbackup.meta import fsck as fsck_mod
from sdbackup.meta.service import MetadataService
from sdbackup.meta.store import MetaStore
from sdbackup.meta.types import Attr, Extent, WriteRun
from sdbackup.net import messages as msg
from sdbackup.net import wire
from sdbackup.net.auth import load_secret
from sdbackup.net.rpc import Connection, RpcServer

log = logging.getLogger("sdbackup.coordinator")

DEFAULT_LEASE = 10.0
OWNER_TOKEN_FILE = "owner.token"
"""Written by the running coordinator, mode 0600: whoever can read it runs as the
cluster's owner on the coordinator's host. Node credentials (the shared secret) do not
include it, so nodes cannot ask for what only the owner may (backups: media paths and
hook commands on the coordinator)."""
RECLAIM_FILE = "coordinator.reclaim"
"""Left by a coordinator that stopped while nodes were connected: the next one starts
with a grace period for their reclaims, as after a crash."""


@dataclass
class Session:
    """One connected node (or a short-lived command acting as a client).

    ``key`` names the session in the rights table: a node that is fenced and joins
    again is a new session, so the old one's rights (dropped only when its lease has
    certainly run out) never mix with the new one's.
    """

    key: str
    name: str
    kind: str  # "node", "client" or "admin"
    host: str
    pid: int
    conn: Connection
    joined: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    # When the coordinator last renewed the lease (join, heartbeat): the node counts
    # its own lease from before it sent that request, so it stops writing earlier.
    renewed: float = field(default_factory=time.monotonic)
    reservations: dict[tuple[int, int], WriteRun] = field(default_factory=dict)
    opens: dict[int, int] = field(default_factory=dict)  # files this session has open
    dirty_n: dict[tuple[int, int], int] = field(default_factory=dict)
    state: str = "up"  # up -> left | fenced -> gone
    cleaned: threading.Event = field(default_factory=threading.Event)
    owner: bool = False  # proved to run as the cluster's owner on this host


@dataclass
class Change:
    """The inodes one request changes, and whether the actor keeps their capabilities."""

    touched: list[int]
    kept: bool = False


class Coordinator:
    """The metadata authority and cache-coherence manager of one cluster."""

    def __init__(self, cluster_dir: str | os.PathLike[str], *, host: str = "127.0.0.1",
                 port: int = 0, lease: float = DEFAULT_LEASE, wait: float = 0.0) -> None:
        self.dir = Path(cluster_dir).absolute()
        self.config = load_config(self.dir)
        self.lock = ClusterLock(self.dir, wait)
        try:
            self.secret = load_secret(self.dir / "secret")
            self.store = MetaStore(self.dir / "meta.db")
            self.meta = MetadataService(self.store)
            self.disks: DiskSet = open_disks(self.config)
            # Single-host disks (no O_DIRECT): which file they are on this kernel.
            self.disk_identities = {d.id: disk_identity(self.disks.device(d.id).path)
                                    for d in self.config.disks
                                    if not self.disks.device(d.id).direct}
        except BaseException:
            self.lock.release()
            raise
        self.lease = lease
        self.epoch = secrets.token_hex(8)
        # A previous coordinator crashed (its address file is still there) or stopped
        # while nodes were connected (RECLAIM_FILE): nodes may still hold dirty data
        # under rights this coordinator does not know, so they get a grace period to
        # reclaim them before anyone else is granted anything.
        restarted = (self.dir / ADDR_FILE).exists() or (self.dir / RECLAIM_FILE).exists()
        self.grace_until = time.monotonic() + (lease if restarted else 0.0)
        self.rights = RightsManager(self._recall, self._fence_key)
        self.caps = CapTable(self._drop_caps, self._fence_key)
        self._ns_mu = threading.Lock()
        self._ns_locks: dict[int, list[Any]] = {}  # directory -> [lock, users]
        self.sessions: dict[Connection, Session] = {}
        self._keys: dict[str, Session] = {}  # every session not yet cleaned up, by key
        self._serial = 0
        # The last data losses (fenced nodes' unwritten data), for 'sdbackup status'.
        self.losses: collections.deque[dict[str, Any]] = collections.deque(maxlen=200)
        # How long after a lease has run out (at the coordinator) before the node's
        # rights and blocks may go to others: covers a node's check-then-write, and
        # clocks of two hosts that do not tick at exactly the same rate.
        self.fence_margin = max(0.2, lease * 0.25)
        self._mu = threading.Lock()
        self._stop = threading.Event()
        self.server = RpcServer(lambda conn: _Handler(self), self.secret, host=host, port=port,
                                max_workers=64)
        self._monitor: threading.Thread | None = None
        # The online backup's before-image window (backup/window_manager.py).
        self.windows: WindowManager[Session] = WindowManager(
            _BackupNodes(self), cluster_id=self.config.cluster_id,
            block_size=self.config.block_size, tick=self.rights.tick,
            own_lock=self.store.lock)
        self.backup_lock = threading.Lock()
        # The copy manager of a running dispersed backup (cluster/dispersed.py).
        self.dispersed: DispersedCopier | None = None

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        self.owner_token = secrets.token_hex(32)
        write_atomic(self.dir / OWNER_TOKEN_FILE, self.owner_token.encode() + b"\n", mode=0o600)
        self.server.start()
        host, port = self.server.address
        write_atomic(self.dir / ADDR_FILE,
                     f"{host}:{port} pid={os.getpid()} epoch={self.epoch}\n".encode())
        (self.dir / RECLAIM_FILE).unlink(missing_ok=True)  # the address file covers a crash
        self._monitor = threading.Thread(target=self._lease_loop, name="sdb-lease", daemon=True)
        self._monitor.start()
        log.info("coordinator of cluster %s listening on %s:%d (epoch %s)",
                 self.config.cluster_id, host, port, self.epoch)
        return host, port

    def stop(self) -> None:
        self._stop.set()
        try:
            with self._mu:
                nodes_up = any(s.kind == "node" and s.state == "up"
                               for s in self.sessions.values())
            if nodes_up:  # written before the address file goes: one of them is always there
                write_atomic(self.dir / RECLAIM_FILE,
                             f"stopped with nodes connected, epoch {self.epoch}\n".encode())
            (self.dir / ADDR_FILE).unlink(missing_ok=True)
            (self.dir / OWNER_TOKEN_FILE).unlink(missing_ok=True)
            self.server.stop()
            self.rights.close()
            self.disks.fsync()
            self.store.sync()
            self.disks.close()
            self.store.close()
        finally:
            self.lock.release()
        if self._monitor is not None:  # it had started
            log.info("coordinator stopped")

    def _lease_loop(self) -> None:
        while not self._stop.wait(min(1.0, self.lease / 4)):
            if any(bm.quarantine for bm in self.meta.bitmaps.values()):
                try:  # blocks freed by unlink/truncate become allocatable once durable
                    self.meta.sync()
                except Exception as e:
                    log.error("syncing the metadata store failed: %s", e)
            now = time.monotonic()
            with self._mu:
                late = [s for s in self.sessions.values()
                        if s.kind != "admin" and now - s.renewed > self.lease
                        and s.state == "up"]
            for s in late:
                threading.Thread(target=self.fence, name="sdb-fence", daemon=True,
                                 args=(s, f"its lease of {self.lease:g} s ran out")).start()

    def cluster_info(self) -> dict[str, Any]:
        cfg = self.config
        return {"cluster_id": cfg.cluster_id, "block_size": cfg.block_size,
                "disks": [{"id": d.id, "name": d.name, "path": d.path,
                           "direct": self.disks.device(d.id).direct,
                           "identity": self.disk_identities.get(d.id)} for d in cfg.disks],
                "epoch": self.epoch, "lease": self.lease, "segment_bytes": SEGMENT_BYTES}

    def check_disk_views(self, views: dict[str, str], who: str) -> None:
        """A node may use a single-host disk only if it sees the very same file on the
        very same kernel (its page cache is the coordinator's)."""
        for d in self.config.disks:
            want = self.disk_identities.get(d.id)
            if want is None:
                continue
            got = views.get(d.name)
            if got != want:
                raise UsageError(
                    f"disk {d.name} is a single-host disk (its file system at {d.path} "
                    f"refuses direct I/O) and node {who} does not see the same file on "
                    "the same host: run the node on the coordinator's host, or move the "
                    "disk to storage that supports O_DIRECT")

    # -- sessions ---------------------------------------------------------------------------
    def session(self, conn: Connection) -> Session:
        """The caller's session; a fenced one gets FencedError (and nothing is done)."""
        with self._mu:
            s = self.sessions.get(conn)
        if s is None:
            raise RemoteError("join first: this connection has not joined the cluster")
        if s.state != "up":
            raise FencedError(f"session {s.key} of {s.kind} {s.name} was declared failed "
                              "(fenced); drop the cache and join again")
        s.last_seen = time.monotonic()
        return s

    def join(self, conn: Connection, name: str, kind: str, host: str, pid: int,
             token: str | None = None) -> Session:
        if kind not in ("node", "client", "admin"):
            raise UsageError(f"unknown session kind {kind!r}")
        with self._mu:
            for s in self.sessions.values():
                if s.name == name and s.state == "up":
                    raise UsageError(f"a node named {name!r} is already connected (from "
                                     f"{s.host}, pid {s.pid}); choose another --name")
            self._serial += 1
            sess = Session(f"{name}#{self._serial}", name, kind, host, pid, conn)
            sess.owner = token is not None and secrets.compare_digest(
                token, getattr(self, "owner_token", ""))
            self.sessions[conn] = sess
            self._keys[sess.key] = sess
        log.info("%s %s joined from %s (pid %d, session %s)", kind, name, host, pid, sess.key)
        return sess

    def renew(self, s: Session) -> None:
        """A heartbeat: the session's lease runs again from now."""
        with self._mu:
            if s.state != "up":
                raise FencedError(f"session {s.key} was fenced; join again")
            s.renewed = time.monotonic()

    def fence(self, s: Session, why: str) -> None:
        """Declare a session failed; return once it can certainly no longer write.

        Fencing, as GPFS and the Linux DLM do it: from now on every call of the session
        is refused and its connection is closed; then, and only once its lease has
        certainly run out (the last renewal + lease + margin: the node stops writing at
        0.9 of a lease counted from before its renewal was sent), its rights are
        dropped and its reserved blocks freed. Nothing it held is given to another
        before that. Called from several threads at once, all return together.
        """
        with self._mu:
            first = s.state == "up"
            if first:
                s.state = "fenced"
        if not first:
            s.cleaned.wait()
            return
        log.warning("%s %s (session %s) failed: %s; fenced", s.kind, s.name, s.key, why)
        if not s.conn.closed:
            s.conn.close(reason=f"fenced: {why}", timeout=1.0)
        wait = s.renewed + self.lease + self.fence_margin - time.monotonic()
        if wait > 0 and s.kind != "admin" and not self._stop.is_set():
            self._stop.wait(wait)
        self._cleanup(s, failed=True)

    def _fence_key(self, key: str, why: str) -> None:
        with self._mu:
            s = self._keys.get(key)
        if s is not None:
            self.fence(s, why)

    def leave(self, conn: Connection) -> None:
        """The connection closed. A session that still holds rights or reserved blocks
        did not leave cleanly: it is fenced (it may be alive behind a broken link)."""
        with self._mu:
            s = self.sessions.pop(conn, None)
        if s is None:
            return
        if s.state == "up":
            if self.rights.holds(s.key) or s.reservations:
                threading.Thread(target=self.fence, args=(s, "its connection closed"),
                                 name="sdb-fence", daemon=True).start()
                return
            s.state = "left"
            self._cleanup(s, failed=False)
        log.info("%s %s left", s.kind, s.name)

    def goodbye(self, s: Session) -> None:
        """A clean leave: the session wrote everything back and gives up its rights."""
        with self._mu:
            if s.state != "up":
                return
            s.state = "left"
        self._cleanup(s, failed=False)

    def _cleanup(self, s: Session, *, failed: bool) -> None:
        """Drop the session's rights and reservations (it can no longer write), then
        close the files it had open."""
        with self._mu:
            runs = list(s.reservations.values())
            s.reservations.clear()
            opens, s.opens = s.opens, {}
        if runs:
            self.meta.abort_write(runs)
        self.windows.session_gone(s.key, s.name)
        # A node that goes (or stops answering) because this coordinator stops keeps its
        # dirty data and reclaims it from the next coordinator: nothing is lost.
        lost = self.rights.node_failed(s.key)
        self.caps.forget(s.key)
        if failed and not self._stop.is_set():
            for e in lost:
                path = self.path_of(e.ino)
                log.error("LOST unwritten data of node %s: %s bytes %d-%d (inode %d)", s.name,
                          path, e.offset, e.offset + e.size, e.ino)
                self.losses.append({"time": time.time(), "node": s.name, "path": path,
                                    "ino": e.ino, "start": e.offset,
                                    "end": e.offset + e.size,
                                    "why": "the node was fenced with this area dirty"})
        with self._mu:
            if s.state == "fenced":
                s.state = "gone"
            if self._keys.get(s.key) is s:
                del self._keys[s.key]
        s.cleaned.set()
        # After the rights are gone (an acquire may be waiting for them, holding the
        # inode): files the session still had open are closed for it, so that an
        # unlinked file it held open is freed (open counts are per session here).
        for ino, n in opens.items():
            for _ in range(n):
                try:
                    self.release_inode(ino)
                    self.caps.break_([ino], None)  # it may be gone now
                except Exception as err:  # keep cleaning up the others
                    log.warning("closing inode %d for %s failed: %s", ino, s.name, err)

    def log_node_session(self, name: str) -> Session:
        """The node agent that is to be the log manager (``backup --log-node``): it must
        be connected now, or the backup does not start."""
        with self._mu:
            same = [s for s in self.sessions.values() if s.name == name]
            nodes = sorted({s.name for s in self.sessions.values()
                            if s.kind == "node" and s.state == "up"})
        up = [s for s in same if s.kind == "node" and s.state == "up"]
        if up:
            return up[0]
        known = any(s.kind == "node" for s in same) or \
            (self.dir / "nodes" / f"{name}.addr").exists()
        if not known:
            raise UsageError(f"--log-node {name}: no node {name} in this cluster (connected "
                             f"nodes: {', '.join(nodes) or 'none'})")
        raise UsageError(f"log node {name} is not connected to the coordinator: start it "
                         f"('sdbackup node CLUSTER_DIR --name {name}') or choose another "
                         f"(connected nodes: {', '.join(nodes) or 'none'})")

    def by_key(self, key: str) -> Session | None:
        with self._mu:
            s = self._keys.get(key)
        return s if s is not None and s.state == "up" else None

    # -- calls to nodes ---------------------------------------------------------------------------
    def _take_back(self, key: str, request: msg.Request, what: str) -> None:
        """Ask a session to give something back (a recall, capabilities) and wait for
        its answer. A session cleaned up already holds nothing; one fenced (or gone
        without a goodbye) is waited for until it certainly cannot use what it held."""
        with self._mu:
            s = self._keys.get(key)
        if s is None:
            return
        if s.state != "up":
            self.fence(s, f"{what} while fenced")
            return
        msg.call(s.conn, request, timeout=self.lease)

    def _recall(self, key: str, ino: int, segs: list[int], keep: str | None) -> None:
        self._take_back(key, msg.Recall(ino, tuple(segs), keep), "recalled")

    def _drop_caps(self, key: str, inos: list[int]) -> None:
        self._take_back(key, msg.DropCaps(tuple(inos)), "capabilities recalled")

    def may_cache(self, key: str, ino: int) -> bool:
        """No other node holds a write right on ``ino`` (its size and times would change
        in that node's cache, unseen here)."""
        return all(w == key for w in self.rights.writers(ino))

    @contextlib.contextmanager
    def namespace(self, *dirs: int) -> Iterator[None]:
        """Changes of names in these directories, one at a time per directory (in inode
        order), so that the inodes a change touches are the ones it looked up first."""
        order = sorted(set(dirs))
        with self._ns_mu:
            entries = []
            for d in order:
                e = self._ns_locks.setdefault(d, [threading.Lock(), 0])
                e[1] += 1
                entries.append((d, e))
        try:
            with contextlib.ExitStack() as stack:
                for _, e in entries:
                    stack.enter_context(e[0])
                yield
        finally:
            with self._ns_mu:
                for d, e in entries:
                    e[1] -= 1
                    if not e[1]:
                        del self._ns_locks[d]

    @contextlib.contextmanager
    def changing(self, key: str, inos: Sequence[int | None]) -> Iterator[Change]:
        """Around a change of these inodes: every other node's capability on them is
        taken back before it, and once more after it (grants made while it ran). The
        actor keeps them (``Change.kept``) when nothing else changed them meanwhile."""
        ch = Change(sorted({i for i in inos if i is not None}))
        with self._mu:
            s = self._keys.get(key)
        holds = s is not None and s.kind != "admin"  # admin sessions take no callbacks
        since = self.caps.begin(ch.touched, key)
        try:
            yield ch
        finally:
            ch.kept = self.caps.break_(
                ch.touched, key, since=since if holds else None,
                ok=lambda: all(self.may_cache(key, i) for i in ch.touched))

    def flush_writers(self, ino: int, exclude: str | None) -> None:
        """Make every other node holding a write right on ``ino`` write its data back."""
        for key in self.rights.writers(ino):
            if key == exclude:
                continue
            s = self.by_key(key)
            if s is not None:
                try:
                    msg.call(s.conn, msg.FlushInode(ino), timeout=self.lease)
                except FsError as e:  # it answered: it cannot write this file back now
                    log.warning("node %s cannot write back %s: %s (its data stays "
                                "dirty there)", s.name, self.path_of(ino), e.what or e)
                except RemoteError as e:
                    self.fence(s, f"did not answer a flush: {e}")

    def flush_all(self, timeout: float = 60.0) -> dict[str, Any]:
        """Cluster-wide flush (Fig. 3): every node writes its dirty areas back."""
        t0 = time.monotonic()
        with self._mu:
            nodes = [s for s in self.sessions.values() if s.state == "up" and s.kind == "node"]
        errors: dict[str, str] = {}

        def one(s: Session) -> None:
            try:
                msg.call(s.conn, msg.NodeFlush(), timeout=timeout)
            except (RemoteError, FsError) as e:  # FsError: files it cannot write back
                errors[s.name] = re.sub(r"inode (\d+)", lambda m: self.path_of(
                    int(m.group(1))), str(e))

        threads = [threading.Thread(target=one, args=(s,)) for s in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        clean = not errors and self.rights.wait_clean(
            max(0.1, timeout - (time.monotonic() - t0)))
        return {"nodes": len(nodes), "errors": errors, "clean": clean,
                "seconds": time.monotonic() - t0}

    def path_of(self, ino: int) -> str:
        """One path of an inode, for messages (best effort)."""
        parts: list[str] = []
        cur = ino
        try:
            for _ in range(256):
                if cur == 1:
                    return "/" + "/".join(reversed(parts))
                row = self.store.get_row("SELECT parent, name FROM dirents WHERE ino=? LIMIT 1",
                                         (cur,))
                if row is None:
                    return f"<inode {ino}, no name>"
                parts.append(bytes(row[1]).decode(errors="replace"))
                cur = int(row[0])
        except Exception:  # store closed during shutdown
            pass
        return f"<inode {ino}>"

    def node_reports(self) -> list[dict[str, Any]]:
        with self._mu:
            sessions = list({id(s): s for s in [*self.sessions.values(),
                                                *self._keys.values()]}.values())
        out = []
        for s in sessions:
            row: dict[str, Any] = {"name": s.name, "kind": s.kind, "host": s.host, "pid": s.pid,
                                   "state": s.state, "session": s.key,
                                   "last_seen_s": round(time.monotonic() - s.last_seen, 1)}
            if s.kind == "node" and s.state == "up":
                try:
                    body, _ = msg.call(s.conn, msg.Report(), timeout=5.0)
                    row.update(body)
                except RemoteError as e:
                    row["error"] = str(e)
                errs = row.get("write_back_errors") or {}
                row["write_back_errors"] = {self.path_of(int(i)): m for i, m in errs.items()}
            out.append(row)
        return out

    # -- metadata operations with coherence ----------------------------------------------------
    @contextlib.contextmanager
    def may_free(self, ino: int) -> Iterator[None]:
        """Recall every right on ``ino`` around an operation that may free it.

        A node that cannot write the file back does not stop the operation (POSIX lets
        a removed file's data go). If the inode is then gone, that node is told to
        discard its data of it and its rights go, before anything else may be granted
        on the inode: its dirty data must never land anywhere once the blocks are free.
        """
        with self.rights.exclusive(ino, strict=False) as refused:
            yield
            if not refused:
                return
            try:
                self.meta.getattr(ino)
                return  # still there (another name, or open): the data stays theirs
            except FsError:
                pass
            for key in refused:
                s = self.by_key(key)
                segs = self.rights.segments_of(key, ino)
                if s is not None and segs:
                    try:
                        msg.call(s.conn, msg.Recall(ino, tuple(segs), "discard"),
                                 timeout=self.lease)
                    except (RemoteError, FsError) as e:
                        self.fence(s, f"did not discard the data of removed inode {ino}: "
                                      f"{e}")
                        continue
                self.rights.released(key, ino, segs)

    def release_inode(self, ino: int) -> None:
        """One close of ``ino``; the last close of an unlinked file frees it, after
        every node's rights on it were recalled."""
        try:
            last = self.meta.getattr(ino).nlink == 0
        except FsError:
            last = False
        if last:
            with self.may_free(ino):
                self.meta.release(ino)
        else:
            self.meta.release(ino)

    def truncate(self, ino: int, size: int) -> Attr:
        # The store lock is held across the disk write too, so that a backup's freeze
        # (which snapshots under that lock) sees this truncate wholly before or after T0.
        with self.rights.exclusive(ino), self.store.lock:
            attr = self.meta.getattr(ino)
            if attr.is_reg and size != attr.size:
                # Shrinking: the cut block's tail; growing: the old last block's tail
                # (bytes past the end on disk are never trusted). On disk before the
                # metadata that exposes them.
                disk = zero_tail(self.meta, self.disks, ino, min(size, attr.size),
                                 self.windows.own_before_image)
                if disk is not None:
                    self.disks.datasync([disk])
            return self.meta.truncate(ino, size)

    def segment_maps(self, ino: int, segs: list[int]) -> dict[str, list[list[Any]]]:
        """Each segment's extents (one query over the whole range, split per segment)."""
        bps = SEGMENT_BYTES // self.config.block_size
        lo, hi = min(segs), max(segs) + 1
        exts = self.meta.map_read(ino, lo * bps, (hi - lo) * bps)
        maps: dict[int, list[Extent]] = {seg: [] for seg in segs}
        for e in exts:
            f, end = e.fblock, e.fblock + e.length
            while f < end:
                seg = f // bps
                cut = min(end, (seg + 1) * bps)
                if seg in maps:
                    maps[seg].append(Extent(f, cut - f, e.disk, e.dblock + (f - e.fblock)))
                f = cut
        return {str(seg): wire.enc_runs(m) for seg, m in maps.items()}

    # -- online backup window (issue 6) -----------------------------------------------------
    # ``self.windows`` (backup/window_manager.py) holds the window, the logs and the
    # gathering; the backup engine reaches it through CoordinatorSource. These two drive
    # it by hand (tests/test_online_window.py).
    def begin_window(self, gen_id: str, mode: str, blocks: dict[int, BlockSet],
                     log_path: Path, work_dir: Path) -> BackupWindow:
        """Arm before-image logging (call while frozen: no write-back is in flight)."""
        return self.windows.begin(gen_id, mode, blocks, log_path, work_dir)

    def end_window(self, out_log: Path | None, work_dir: Path) -> dict[str, Any]:
        """Close the window after the copy: gather and merge logs (merged mode)."""
        return self.windows.end(out_log, work_dir)


class _BackupNodes:
    """The coordinator's sessions as the window manager sees them (WindowNodes)."""

    def __init__(self, coord: Coordinator) -> None:
        self.c = coord

    def writers(self) -> list[Session]:
        with self.c._mu:
            return [s for s in self.c.sessions.values() if s.state == "up" and s.kind != "admin"]

    def by_key(self, key: str) -> Session | None:
        return self.c.by_key(key)

    def fence(self, peer: Session, why: str) -> None:
        self.c.fence(peer, why)

    def backup_begin(self, peer: Session, gen: str, mode: str, log_node: str | None = None,
                     log_addr: str | None = None) -> None:
        msg.call(peer.conn, msg.BackupBegin(gen, mode, log_node, log_addr),
                 timeout=self.c.lease)

    def log_open(self, peer: Session, gen: str, mode: str, path: str, log_medium: bool
                 ) -> str:
        body, _ = msg.call(peer.conn, msg.LogOpen(gen, mode, path, log_medium),
                           timeout=self.c.lease)
        return str(body["addr"])

    def log_put(self, peer: Session, gen: str, items: tuple[tuple[int, int, int, int], ...],
                data: bytes) -> int:
        body, _ = msg.call(peer.conn, msg.PutBi(gen, items), data, timeout=self.c.lease)
        return int(body.get("stored", 0))

    def log_close(self, peer: Session, gen: str, discard: bool) -> dict[str, Any]:
        body, _ = msg.call(peer.conn, msg.LogClose(gen, discard), timeout=FETCH_TIMEOUT)
        return dict(body)

    def bi_fetch(self, peer: Session, gen: str, offset: int, size: int) -> tuple[bytes, bool]:
        body, blob = msg.call(peer.conn, msg.BiFetch(gen, offset, size),
                              timeout=FETCH_TIMEOUT)
        return blob or b"", bool(body.get("eof"))

    def backup_end(self, peer: Session, gen: str) -> None:
        msg.call(peer.conn, msg.BackupEnd(gen), timeout=self.c.lease)


class _Handler(msg.RequestHandler):
    """One connection's requests, each decoded and checked (net/messages.py) before it
    reaches its ``rpc_`` method."""

    requests = msg.COORDINATOR_REQUESTS

    def __init__(self, coord: Coordinator) -> None:
        self.c = coord

    def on_disconnect(self, conn: Connection) -> None:
        self.c.leave(conn)

    def _s(self, conn: Connection) -> Session:
        return self.c.session(conn)

    # membership ---------------------------------------------------------------------------
    def rpc_cluster_info(self, conn: Connection, r: msg.ClusterInfo, blob: bytes | None
                         ) -> dict[str, Any]:
        """What a node needs to open the disks before it joins (no session yet)."""
        return self.c.cluster_info()

    def rpc_join(self, conn: Connection, r: msg.Join, blob: bytes | None) -> dict[str, Any]:
        if r.kind != "admin":  # admin sessions never open the disks
            self.c.check_disk_views(r.disks or {}, r.name)
        s = self.c.join(conn, r.name, r.kind, r.host, r.pid, r.owner_token)
        return {**self.c.cluster_info(), "session": s.key,
                "grace": max(0.0, self.c.grace_until - time.monotonic()),
                "backup": self.c.windows.current()}

    def rpc_heartbeat(self, conn: Connection, r: msg.Heartbeat, blob: bytes | None
                      ) -> dict[str, Any]:
        self.c.renew(self._s(conn))
        return {"epoch": self.c.epoch}

    def rpc_goodbye(self, conn: Connection, r: msg.Goodbye, blob: bytes | None) -> None:
        """A node or client that stops cleanly: everything written back, rights go now."""
        self.c.goodbye(self._s(conn))

    def rpc_paths(self, conn: Connection, r: msg.Paths, blob: bytes | None) -> dict[str, Any]:
        """One path per inode, for messages (a fenced node naming what it lost)."""
        self._s(conn)
        return {"paths": {str(i): self.c.path_of(i) for i in r.inos}}

    # coherence ------------------------------------------------------------------------------------
    def rpc_acquire(self, conn: Connection, r: msg.Acquire, blob: bytes | None
                    ) -> dict[str, Any]:
        s = self._s(conn)
        ino, segs = r.ino, list(r.segs)
        if not r.reclaim:
            wait = self.c.grace_until - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # let restarted nodes reclaim their dirty areas first
        self.c.meta.getattr(ino)  # ENOENT for a deleted inode
        try:
            seq = self.c.rights.acquire(s.key, ino, segs, r.mode)
        except RecallFailed as e:
            # Another node holds newer data of this area it cannot write back: this
            # node cannot see it, which is an I/O error here (the other node's
            # programs learn of the write-back error themselves).
            raise FsError(errno.EIO, f"{e.what} ({self.c.path_of(ino)})") from None
        if s.state != "up":
            # Fenced while it waited: its cleanup may have run already, so this grant
            # is dropped here (if not, the cleanup drops it; either way it goes).
            self.c.rights.released(s.key, ino, segs)
            raise FencedError(f"session {s.key} was fenced; join again")
        if r.mode == "w":
            # The file's size and times now change in this node's cache: no other node
            # may answer for them from its own (and none gets them while this lasts).
            self.c.caps.break_([ino], s.key)
        try:
            # Removed while this grant waited (an unlink holds the inode exclusively):
            # no right on a file that no longer exists.
            attr = self.c.meta.getattr(ino)
        except FsError:
            self.c.rights.released(s.key, ino, segs)
            raise
        if self.c._stop.is_set():
            # Recalls fail while we stop; a grant made on that basis must not reach a
            # node, whose data would then meet the recalled node's at the next start.
            raise RemoteError("the coordinator is stopping; try again when it is back")
        if not r.maps or not attr.is_reg:
            return {"seq": seq}
        # The segments' block maps, valid while the right is held (another node changes
        # them only under a write right, which recalls this one first).
        return {"seq": seq, "maps": self.c.segment_maps(ino, segs)}

    def rpc_release_rights(self, conn: Connection, r: msg.ReleaseRights, blob: bytes | None
                           ) -> None:
        s = self._s(conn)
        if len(r.more) != len(r.more_segs):
            raise UsageError("bad release_rights request: 'more' and 'more_segs' differ "
                             "in length")
        self.c.rights.released(s.key, r.ino, list(r.segs))
        for ino, segs in zip(r.more, r.more_segs, strict=True):
            self.c.rights.released(s.key, ino, list(segs))

    def rpc_dirty(self, conn: Connection, r: msg.Dirty, blob: bytes | None) -> None:
        s = self._s(conn)
        segs = []
        with self.c._mu:
            for seg in r.segs:
                if s.dirty_n.get((r.ino, seg), 0) < r.n:
                    s.dirty_n[(r.ino, seg)] = r.n
                    segs.append(seg)
        self.c.rights.set_dirty(s.key, r.ino, segs, r.dirty)

    # metadata ------------------------------------------------------------------------
    def _attr(self, attr: Attr) -> dict[str, Any]:
        return {"attr": wire.enc_attr(attr)}

    def rpc_getattr(self, conn: Connection, r: msg.GetAttr, blob: bytes | None
                    ) -> dict[str, Any]:
        s = self._s(conn)
        self.c.flush_writers(r.ino, s.key)
        since = self.c.caps.stamp()
        out = self._attr(self.c.meta.getattr(r.ino))
        if r.cap and s.kind != "admin":  # admin sessions take no callbacks
            out["cap"] = self.c.caps.grant(s.key, [r.ino], since,
                                           lambda: self.c.may_cache(s.key, r.ino))
        return out

    def rpc_lookup(self, conn: Connection, r: msg.Lookup, blob: bytes | None
                   ) -> dict[str, Any]:
        s = self._s(conn)
        since = self.c.caps.stamp()
        try:
            attr = self.c.meta.lookup(r.parent, r.name)
        except FsError as e:
            if not r.cap or s.kind == "admin" or e.errno != errno.ENOENT:
                raise
            # A name known absent is cached too (the parent's capability covers it).
            return {"absent": True, "cap": self.c.caps.grant(s.key, [r.parent], since)}
        if attr.is_reg:
            self.c.flush_writers(attr.ino, s.key)
            attr = self.c.meta.getattr(attr.ino)
        out = self._attr(attr)
        if r.cap and s.kind != "admin":  # admin sessions take no callbacks
            out["cap"] = self.c.caps.grant(s.key, [r.parent, attr.ino], since,
                                           lambda: self.c.may_cache(s.key, attr.ino))
        return out

    def _created(self, s: Session, ch: Change, attr: Attr, since: int) -> dict[str, Any]:
        """The answer to a new name: as any change, and when the actor keeps the
        parent, the new inode's capability too, unless another node changed it already
        (a new directory is then known complete, and empty, to its maker)."""
        out = self._changed(ch, attr)
        if ch.kept and self.c.caps.grant(s.key, [attr.ino], since,
                                         lambda: self.c.may_cache(s.key, attr.ino)):
            out["child_cap"] = True
        return out

    def _changed(self, ch: Change, attr: Attr | None = None) -> dict[str, Any]:
        """The answer to a change: what it touched, and when the actor keeps their
        capabilities, their attributes now (inodes gone are left out)."""
        out: dict[str, Any] = {"touched": ch.touched}
        if attr is not None:
            out["attr"] = wire.enc_attr(attr)
        if ch.kept:
            now = []
            for i in ch.touched:
                try:
                    now.append(wire.enc_attr(self.c.meta.getattr(i)))
                except FsError:
                    pass
            out["cap"] = True
            out["attrs"] = now
        return out

    def rpc_mknod(self, conn: Connection, r: msg.Mknod, blob: bytes | None) -> dict[str, Any]:
        s = self._s(conn)
        since = self.c.caps.stamp()
        with self.c.namespace(r.parent), self.c.changing(s.key, [r.parent]) as ch:
            attr = self.c.meta.mknod(r.parent, r.name, r.mode, r.uid, r.gid, r.rdev)
            if r.open:
                self._open(s, attr.ino)
        out = self._created(s, ch, attr, since)
        if r.write and attr.is_reg:
            # Outside the directory's lock: a write grant waits while a backup freezes.
            out["seq"] = self.c.rights.acquire(s.key, attr.ino, [0], "w")
            self.c.caps.break_([attr.ino], s.key)  # anyone who looked it up meanwhile
        return out

    def rpc_mkdir(self, conn: Connection, r: msg.Mkdir, blob: bytes | None) -> dict[str, Any]:
        s = self._s(conn)
        since = self.c.caps.stamp()
        with self.c.namespace(r.parent), self.c.changing(s.key, [r.parent]) as ch:
            attr = self.c.meta.mkdir(r.parent, r.name, r.mode, r.uid, r.gid)
        return self._created(s, ch, attr, since)

    def rpc_symlink(self, conn: Connection, r: msg.Symlink, blob: bytes | None
                    ) -> dict[str, Any]:
        s = self._s(conn)
        since = self.c.caps.stamp()
        with self.c.namespace(r.parent), self.c.changing(s.key, [r.parent]) as ch:
            attr = self.c.meta.symlink(r.parent, r.name, r.target, r.uid, r.gid)
        return self._created(s, ch, attr, since)

    def rpc_readlink(self, conn: Connection, r: msg.Readlink, blob: bytes | None
                     ) -> dict[str, Any]:
        self._s(conn)
        return {"target": wire.enc_name(self.c.meta.readlink(r.ino))}

    def rpc_link(self, conn: Connection, r: msg.Link, blob: bytes | None) -> dict[str, Any]:
        s = self._s(conn)
        with self.c.namespace(r.new_parent), \
                self.c.changing(s.key, [r.ino, r.new_parent]) as ch:
            attr = self.c.meta.link(r.ino, r.new_parent, r.new_name)
        return self._changed(ch, attr)

    def _target(self, parent: int, name: bytes) -> int | None:
        try:
            return self.c.meta.lookup(parent, name).ino
        except FsError:
            return None

    def rpc_unlink(self, conn: Connection, r: msg.Unlink, blob: bytes | None
                   ) -> dict[str, Any]:
        s = self._s(conn)
        with self.c.namespace(r.parent):
            ino = self._target(r.parent, r.name)
            with self.c.changing(s.key, [r.parent, ino]) as ch:
                if ino is None:
                    self.c.meta.unlink(r.parent, r.name)  # raises the right error
                else:
                    with self.c.may_free(ino):
                        self.c.meta.unlink(r.parent, r.name)
        return self._changed(ch)

    def rpc_rmdir(self, conn: Connection, r: msg.Rmdir, blob: bytes | None) -> dict[str, Any]:
        s = self._s(conn)
        with self.c.namespace(r.parent):
            ino = self._target(r.parent, r.name)
            with self.c.changing(s.key, [r.parent, ino]) as ch:
                self.c.meta.rmdir(r.parent, r.name)
        return self._changed(ch)

    def rpc_rename(self, conn: Connection, r: msg.Rename, blob: bytes | None
                   ) -> dict[str, Any]:
        s = self._s(conn)
        with self.c.namespace(r.parent, r.new_parent):
            source = self._target(r.parent, r.name)
            target = self._target(r.new_parent, r.new_name)
            with self.c.changing(s.key, [r.parent, r.new_parent, source, target]) as ch:
                if target is None:
                    self.c.meta.rename(r.parent, r.name, r.new_parent, r.new_name, r.flags)
                else:
                    with self.c.may_free(target):
                        self.c.meta.rename(r.parent, r.name, r.new_parent, r.new_name,
                                           r.flags)
        return self._changed(ch)

    def rpc_readdir(self, conn: Connection, r: msg.Readdir, blob: bytes | None
                    ) -> dict[str, Any]:
        self._s(conn)
        ents = self.c.meta.readdir(r.ino, r.after, min(r.limit, 5000))
        return {"entries": wire.enc_dirents(ents)}

    def rpc_setattr(self, conn: Connection, r: msg.Setattr, blob: bytes | None
                    ) -> dict[str, Any]:
        s = self._s(conn)
        with self.c.changing(s.key, [r.ino]) as ch:
            attr = self.c.meta.setattr(r.ino, mode=r.mode, uid=r.uid, gid=r.gid,
                                       atime_ns=r.atime_ns, mtime_ns=r.mtime_ns)
        return self._changed(ch, attr)

    def rpc_statfs(self, conn: Connection, r: msg.Statfs, blob: bytes | None
                   ) -> dict[str, Any]:
        self._s(conn)
        return {"statfs": wire.enc_statfs(self.c.meta.statfs())}

    def rpc_open(self, conn: Connection, r: msg.Open, blob: bytes | None) -> None:
        self._open(self._s(conn), r.ino)

    def _open(self, s: Session, ino: int) -> None:
        self.c.meta.open(ino)
        with self.c._mu:
            s.opens[ino] = s.opens.get(ino, 0) + 1

    def rpc_release(self, conn: Connection, r: msg.Release, blob: bytes | None
                    ) -> dict[str, Any]:
        s = self._s(conn)
        ino = r.ino
        with self.c._mu:
            n = s.opens.get(ino, 0)
            if n <= 0:
                raise UsageError(f"release of inode {ino}, which this node has not open")
            if n == 1:
                del s.opens[ino]
            else:
                s.opens[ino] = n - 1
        with self.c.changing(s.key, [ino]) as ch:
            self.c.release_inode(ino)
        return self._changed(ch)

    def rpc_map_read(self, conn: Connection, r: msg.MapRead, blob: bytes | None
                     ) -> dict[str, Any]:
        self._s(conn)
        return {"runs": wire.enc_runs(self.c.meta.map_read(r.ino, r.fblock, r.count))}

    def rpc_map_write(self, conn: Connection, r: msg.MapWrite, blob: bytes | None
                      ) -> dict[str, Any]:
        s = self._s(conn)
        runs = self.c.windows.split(s.key, self.c.meta.map_write(r.ino, r.fblock, r.count))
        with self.c._mu:
            fenced = s.state != "up"
            if not fenced:
                for run in runs:
                    if run.new:
                        s.reservations[(run.disk, run.dblock)] = run
        if fenced:  # its cleanup may have run: these blocks must not stay reserved
            self.c.meta.abort_write(runs)
            raise FencedError(f"session {s.key} was fenced; join again")
        return {"runs": wire.enc_runs(runs)}

    def _unreserve(self, s: Session, runs: Sequence[WriteRun]) -> list[WriteRun]:
        """Only runs this session really reserved count (a node cannot free others')."""
        mine = []
        with self.c._mu:
            if s.state != "up":  # its reservations belong to the cleanup now
                raise FencedError(f"session {s.key} was fenced; join again")
            for r in runs:
                if r.new:
                    got = s.reservations.pop((r.disk, r.dblock), None)
                    if got is None or got != r:
                        raise UsageError(f"write run {tuple(r)} was not reserved by this node")
                    mine.append(r)
        return mine

    def rpc_put_bi(self, conn: Connection, r: msg.PutBi, blob: bytes | None
                   ) -> dict[str, Any]:
        """Before images from a node (central, inline, separate modes): stored durably
        unless stored already, then acknowledged (the write-ahead rule)."""
        self._s(conn)
        return {"stored": self.c.windows.put(r.gen, r.items, blob)}

    def rpc_bi_failed(self, conn: Connection, r: msg.BiFailed, blob: bytes | None) -> None:
        """A node could not store a before image: that backup is aborted (not the node's
        write, which goes on once this is acknowledged)."""
        s = self._s(conn)
        self.c.windows.node_failed(r.gen, s.name, r.reason)

    def rpc_abort_write(self, conn: Connection, r: msg.AbortWrite, blob: bytes | None) -> None:
        s = self._s(conn)
        self.c.meta.abort_write(self._unreserve(s, r.runs))

    def rpc_commit_write(self, conn: Connection, r: msg.CommitWrite, blob: bytes | None
                         ) -> dict[str, Any]:
        s = self._s(conn)
        mine = self._unreserve(s, r.runs)
        # On failure commit_write gives the reserved blocks back itself (once).
        with self.c.changing(s.key, [r.ino]) as ch:
            attr = self.c.meta.commit_write(r.ino, mine, r.end, r.mtime_ns)
        return self._changed(ch, attr)

    def rpc_truncate(self, conn: Connection, r: msg.Truncate, blob: bytes | None
                     ) -> dict[str, Any]:
        s = self._s(conn)
        with self.c.changing(s.key, [r.ino]) as ch:
            attr = self.c.truncate(r.ino, r.size)
        return self._changed(ch, attr)

    def rpc_sync(self, conn: Connection, r: msg.Sync, blob: bytes | None) -> None:
        self._s(conn)
        self.c.meta.sync()

    # administration ------------------------------------------------------------------
    def rpc_cache_table(self, conn: Connection, r: msg.CacheTable, blob: bytes | None
                        ) -> dict[str, Any]:
        self._s(conn)
        rows = [{"node": e.node.partition("#")[0], "session": e.node, "ino": e.ino,
                 "path": self.c.path_of(e.ino),
                 "offset": e.offset, "size": e.size, "mode": e.mode, "dirty": e.dirty}
                for e in self.c.rights.table()]
        return {"entries": rows}

    def rpc_flush(self, conn: Connection, r: msg.FlushAll, blob: bytes | None
                  ) -> dict[str, Any]:
        self._s(conn)
        return self.c.flush_all(r.timeout)

    def rpc_status(self, conn: Connection, r: msg.Status, blob: bytes | None
                   ) -> dict[str, Any]:
        self._s(conn)
        host, port = self.c.server.address
        disks = [{"name": n, "id": i, "blocks": bm.nblocks, "used": bm.used_blocks()}
                 for i, n in self.c.meta.disk_names.items()
                 for bm in [self.c.meta.bitmaps[i]]]
        return {"coordinator": f"{host}:{port}", "pid": os.getpid(), "epoch": self.c.epoch,
                "cluster_id": self.c.config.cluster_id, "hostname": socket.gethostname(),
                "nodes": self.c.node_reports(), "disks": disks,
                "losses": list(self.c.losses),
                "frozen": self.c.rights.frozen, "clock": self.c.rights.clock,
                **({"backup": b} if (b := self.c.windows.status()) is not None else {}),
                **({"dispersed": d.status()} if (d := self.c.dispersed) is not None else {})}

    def rpc_backup(self, conn: Connection, r: msg.Backup, blob: bytes | None
                   ) -> dict[str, Any]:
        """Run a backup here, in the coordinator (the seed's management computer).

        Only for the cluster's owner on this host (see OWNER_TOKEN_FILE): a backup writes
        where its request says and runs its hook commands here, which node credentials
        must not allow."""
        s = self._s(conn)
        if not s.owner:
            log.warning("refused a backup request from %s %s (%s, pid %d): not the cluster's "
                        "owner on this host", s.kind, s.name, s.host, s.pid)
            raise UsageError(f"{s.kind} {s.name} may not start backups: only the cluster's "
                             "owner on the coordinator's host may (run 'sdbackup backup' "
                             "there, as the user that runs the coordinator)")
        from sdbackup.backup.engine import (
            TAPE_COPY_NODES,
            BackupOptions,
            check_log_node_options,
            run_backup,
        )
        from sdbackup.cluster.backup_source import CoordinatorSource

        tape = None
        if r.tapes and r.copy_nodes:
            raise UsageError(TAPE_COPY_NODES)
        if r.tapes:
            from sdbackup.media.tape.sink import DEFAULT_SPOOL, TapeSpec

            if r.medium or r.catalog is None:
                raise UsageError("a backup to tape names tapes and a catalog, no medium")
            tape = TapeSpec(r.tapes, Path(r.catalog), Path(r.spool) if r.spool else None,
                            r.spool_bytes or DEFAULT_SPOOL)
        elif not r.medium:
            raise UsageError("a backup names its medium (or tapes)")
        opts = BackupOptions(compression=r.compression, level=r.level, log_mode=r.log_mode,
                             log_medium=Path(r.log_medium) if r.log_medium else None,
                             overlay=r.overlay, pre_freeze=r.pre_freeze,
                             post_thaw=r.post_thaw, incremental=r.incremental,
                             full_if_needed=r.full_if_needed, bwlimit=r.bwlimit,
                             pace=r.pace, group=r.group, meta_scope=r.meta, tape=tape)
        if (r.group is None) != (r.group_list is None):
            raise UsageError("a group backup request needs the group's name and list")
        if r.group_list is not None:
            from sdbackup.meta.groups import check_group_name, parse_group_list

            check_group_name(str(r.group))
            opts.group_list = parse_group_list(r.group_list, where=f"group {r.group}")
        log_node: Session | None = None
        if r.log_node is not None:
            check_log_node_options(r.log_mode)
            log_node = self.c.log_node_session(r.log_node)
        opts.log_node = r.log_node
        if not self.c.backup_lock.acquire(blocking=False):
            raise BusyError("a backup of this cluster is running already; wait for it")
        try:
            if r.copy_nodes:  # a.12: copied as parts by these nodes
                opts.copier = self.c.dispersed = DispersedCopier(
                    self.c, r.copy_nodes, medium=r.medium, node_media=r.node_media or {},
                    opts=opts, reassign=not r.no_reassign, split=r.split,
                    part_bytes=r.part_bytes)
                self.c.dispersed.check()
            log.info("backup to %s started (log mode %s)",
                     r.medium or "tape " + ", ".join(r.tapes), opts.log_mode)
            result = run_backup(CoordinatorSource(self.c, log_node), r.medium, opts)
            summary = result.summary()
            if "dispersed" in result.manifest.extra:
                summary["dispersed"] = result.manifest.extra["dispersed"]
            log.info("backup %s committed (writes held %.3f s)", summary["generation"],
                     summary["freeze_seconds"])
            return summary
        finally:
            self.c.dispersed = None
            self.c.backup_lock.release()

    def rpc_part_progress(self, conn: Connection, r: msg.PartProgress, blob: bytes | None
                          ) -> None:
        d = self.c.dispersed
        if d is not None:
            d.on_progress(self._s(conn), r)

    def rpc_part_done(self, conn: Connection, r: msg.PartDone, blob: bytes | None
                      ) -> dict[str, Any]:
        s = self._s(conn)
        d = self.c.dispersed
        return {"accepted": False} if d is None else d.on_done(s, r, blob)

    def rpc_mark(self, conn: Connection, r: msg.SetMark, blob: bytes | None
                 ) -> dict[str, Any]:
        """A mark (a.11) decides what the next incremental holds: the owner's only."""
        s = self._s(conn)
        if not s.owner:
            raise UsageError(f"{s.kind} {s.name} may not set marks: only the cluster's owner "
                             "on the coordinator's host may")
        m = self.c.meta.tracker.mark_now(r.name)
        log.info("mark %s set (era %d)", m.name, m.era)
        return m.to_dict()

    def rpc_marks(self, conn: Connection, r: msg.Marks, blob: bytes | None
                  ) -> dict[str, Any]:
        self._s(conn)
        t = self.c.meta.tracker
        return {"marks": [m.to_dict() for m in t.marks()], "tracking": t.stats()}

    def rpc_used_runs(self, conn: Connection, r: msg.UsedRuns, blob: bytes | None
                      ) -> dict[str, Any]:
        self._s(conn)
        ids = self.c.meta.disk_ids()
        if r.disk not in ids:
            raise UsageError(f"unknown disk {r.disk!r}")
        return {"runs": self.c.meta.used_runs(ids[r.disk])}

    def rpc_fsck(self, conn: Connection, r: msg.Fsck, blob: bytes | None) -> dict[str, Any]:
        self._s(conn)
        with self.c.store.lock:
            problems = fsck_mod.check_all(self.c.store)
        return {"problems": [[p.check, p.message] for p in problems]}

    def rpc_info(self, conn: Connection, r: msg.Info, blob: bytes | None) -> dict[str, Any]:
        self._s(conn)
        st = self.c.store
        count = {k: int(st.get_val(f"SELECT COUNT(*) FROM inodes WHERE (mode & 61440) = {v}"))
                 for k, v in (("files", 32768), ("directories", 16384), ("symlinks", 40960))}
        disks = [{"name": d.name, "id": d.id, "path": d.path,
                  "blocks": self.c.meta.bitmaps[d.id].nblocks,
                  "used": self.c.meta.bitmaps[d.id].used_blocks(),
                  "shared": self.c.disks.device(d.id).direct} for d in self.c.config.disks]
        return {"disks": disks, "block_size": self.c.config.block_size, **count}
