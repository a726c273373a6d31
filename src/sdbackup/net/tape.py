"""Backups on tape read from a host without a tape drive (seed c.4, Fig. 37, 39).

The host with the drives runs ``sdbackup tape serve``: :class:`TapeServer` opens the
tape set in its drives through its disk buffer (c.3) and answers three requests over
the cluster's authenticated protocol (``net/messages.py``, :data:`TAPE_SERVER_REQUESTS`):

* ``tape_info``: the set, its cluster, block size and tapes, which tapes are in the
  drives, and the committed generations;
* ``tape_file``: bytes of a file of the set's disk catalog (the set's label; a
  generation's manifest, placement, index or snapshot), by name and offset;
* ``tape_read``: tape blocks by position (tape id, first block, count), served from
  the server's buffer or loaded from tape into it. Reads of all clients meet in that
  one buffer, so concurrent misses are batched and swept in tape order as for a local
  reader.

Any other host opens the set with :func:`open_remote_set`: the catalog files are
mirrored into a local directory (every manifest at once; a generation's index,
snapshot and placement when the generation or a chain through it is resolved), and
the set is read through the *same* :class:`~sdbackup.media.tape.catalog.TapeSetMedium`
as next to the drive, with :class:`RemoteTapeBlocks` (tape blocks over the network,
a few kept in memory) in place of the local :class:`~sdbackup.media.tape.buffer.TapeBuffer`.
So chains, snapshots, record checks, restores and mounts run the same code on both
hosts; only where a tape block comes from differs.

Nothing received is trusted more than a local tape: manifests are checked (checksum,
cluster), the snapshot against the manifest's digest, the index by the generation
reader, and every record by its checksums.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdbackup.blocks.durable import write_atomic
from sdbackup.errors import CorruptError, NotFoundError, RemoteError, UsageError
from sdbackup.media.medium import (
    GEN_ID_RE,
    GENERATIONS,
    INDEX_NAME_RE,
    MANIFEST,
    MEDIUM_LABEL,
    META,
    Manifest,
    file_digest,
)
from sdbackup.media.tape.catalog import PLACEMENT, TAPES, TapeCatalog, TapeSetMedium
from sdbackup.media.tape.library import OpenedSet
from sdbackup.net import messages as msg
from sdbackup.net.protocol import ConnectionLost
from sdbackup.net.rpc import ConnectFailed, Connection, HandlerResult, RpcClient, RpcServer

log = logging.getLogger("sdbackup.tape")

READ_TIMEOUT = 900.0
"""Seconds a ``tape_read`` may take: a locate end to end and a batch of misses."""
SERVER_GATHER = 0.03
"""Seconds the server's tape loader waits for more misses before it sweeps a batch
(``tape serve --gather``): longer sorts readers whose requests are spread wider
into one sweep, and adds that much to every miss."""
CLIENT_CACHE_BLOCKS = 64
"""Tape blocks a client keeps in memory (a record's header and payload are usually in
the same block: one round trip per record)."""


def parse_address(text: str, option: str = "--tape-server") -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        p = int(port)
    except ValueError:
        p = -1
    if not host or not 0 <= p < 65536:
        raise UsageError(f"bad {option} {text!r}: use HOST:PORT, e.g. 10.0.0.5:7071")
    return host.strip("[]"), p


# -- the server ------------------------------------------------------------------------


class TapeServer:
    """The tape set in this host's drives, read through this host's disk buffer,
    served to the cluster (``sdbackup tape serve``). Owns ``opened``."""

    def __init__(self, opened: OpenedSet, secret: bytes, host: str = "127.0.0.1",
                 port: int = 0, *, gather: float = SERVER_GATHER) -> None:
        self.opened = opened
        self.medium = opened.medium
        # Misses from the network arrive milliseconds apart (each client's round trip):
        # the loader waits a little longer for a batch than for local readers, still
        # nothing next to a locate of seconds.
        opened.buffer.gather = max(opened.buffer.gather, gather)
        self.rpc = RpcServer(lambda conn: _TapeHandler(self), secret, host, port,
                             name="tape server", max_workers=32)

    def start(self) -> tuple[str, int]:
        self.rpc.start()
        return self.rpc.address

    def stop(self) -> None:
        try:
            self.rpc.stop()
            log.info("tape server stopped: %s", json.dumps(self.stats()))
        finally:
            self.opened.close()

    def __enter__(self) -> TapeServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def committed(self) -> dict[str, Manifest]:
        return {m.id: m for m in self.medium.committed()}

    def info(self) -> dict[str, Any]:
        lib = self.opened.lib
        return {"set": self.medium.set_id, "cluster": self.medium.cluster_id,
                "block_size": self.opened.buffer.slot_size,
                "tapes": self.medium.catalog_.tapes(self.medium.set_id),
                "in_drives": [lab.tape for _, lab in lib.labelled()],
                "drives": [d.name for d in lib.devices],
                "generations": sorted(self.committed()),
                "stats": self.stats()}

    def stats(self) -> dict[str, Any]:
        """The buffer's counters and the drives' time (what the cluster's reads cost)."""
        st = self.opened.buffer.stats
        return {"buffer": {"hits": st.hits, "misses": st.misses,
                           "blocks_loaded": st.blocks_loaded, "batches": st.batches,
                           "largest_batch": st.largest_batch, "evictions": st.evictions,
                           "held": len(self.opened.buffer)},
                "drives": self.opened.lib.stats()}

    def catalog_file(self, gen: str | None, name: str) -> Path:
        """The catalog file a client may read (nothing else of this host)."""
        if gen is None:
            if name != MEDIUM_LABEL:
                raise UsageError(f"bad tape_file request: the set has no file {name!r}")
            return self.medium.root / MEDIUM_LABEL
        m = self.committed().get(gen)
        if m is None:
            raise NotFoundError(f"generation {gen} is not on tape set {self.medium.set_id} "
                                "(served by this tape server)")
        if name not in (MANIFEST, PLACEMENT, META, m.index.name):
            raise UsageError(f"bad tape_file request: generation {gen} has no file {name!r}")
        return self.medium.generations_dir / gen / name


class _TapeHandler(msg.RequestHandler):
    requests = msg.TAPE_SERVER_REQUESTS

    def __init__(self, server: TapeServer) -> None:
        self.server = server

    def rpc_tape_info(self, conn: Connection, req: msg.TapeInfo, blob: bytes | None
                      ) -> HandlerResult:
        return self.server.info()

    def rpc_tape_file(self, conn: Connection, req: msg.TapeFile, blob: bytes | None
                      ) -> HandlerResult:
        path = self.server.catalog_file(req.gen, req.name)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                data = os.pread(f.fileno(), req.size, req.offset)
        except FileNotFoundError:
            raise NotFoundError(f"tape catalog file {path} is missing: rebuild the "
                                "catalog ('sdbackup tape catalog --rebuild')") from None
        return {"size": size}, data

    def rpc_tape_read(self, conn: Connection, req: msg.TapeRead, blob: bytes | None
                      ) -> HandlerResult:
        buf = self.server.opened.buffer
        if req.count * buf.slot_size > msg.MAX_TAPE_READ:
            raise UsageError(f"bad tape_read request: {req.count} blocks of "
                             f"{buf.slot_size} bytes is more than {msg.MAX_TAPE_READ} bytes")
        return {}, buf.get(req.tape, req.first, req.count, max(req.end, req.first + req.count))


# -- the client --------------------------------------------------------------------------


class _Peer:
    """A connection to a tape server that reconnects once when it is lost (every
    request is a read: asking again is safe)."""

    def __init__(self, address: str, secret: bytes) -> None:
        self.address = address
        self.host, self.port = parse_address(address)
        self.secret = secret
        self._lock = threading.Lock()
        self._client: RpcClient | None = None
        self._closed = False
        self._connect()

    def _connect(self) -> RpcClient:
        with self._lock:
            if self._closed:
                raise RemoteError(f"the connection to tape server {self.address} is closed")
            if self._client is None or self._client.closed:
                try:
                    self._client = RpcClient.connect(
                        self.host, self.port, self.secret,
                        name=f"tape-reader@{socket.gethostname()}")
                except ConnectFailed as e:
                    raise ConnectFailed(f"{e.message.split(';')[0]}: is 'sdbackup tape "
                                        f"serve' running there?") from None
            return self._client

    def call(self, req: msg.Request, timeout: float = 60.0) -> tuple[dict[str, Any],
                                                                       bytes | None]:
        for attempt in (1, 2):
            c = self._connect()
            try:
                return msg.call(c, req, timeout=timeout)
            except ConnectionLost:
                if attempt == 2:
                    raise
                log.warning("lost the connection to tape server %s; reconnecting",
                            self.address)
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            c, self._client = self._client, None
        if c is not None:
            c.close()


class RemoteTapeBlocks:
    """Tape blocks from a tape server's buffer (:class:`~sdbackup.media.tape.buffer.
    TapeBlocks`): what a host without a drive reads a tape set through."""

    def __init__(self, peer: _Peer, slot_size: int, in_drives: list[str],
                 drives: list[str], *, cache_blocks: int = CLIENT_CACHE_BLOCKS) -> None:
        self.peer = peer
        self._slot_size = slot_size
        self.in_drives = set(in_drives)
        self.drives = drives
        self.max_count = max(1, msg.MAX_TAPE_READ // slot_size)
        self.cache_blocks = cache_blocks
        self._cache: collections.OrderedDict[tuple[str, int], bytes] = \
            collections.OrderedDict()
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes = 0

    @property
    def slot_size(self) -> int:
        return self._slot_size

    def check_tape(self, tape: str) -> None:
        if tape not in self.in_drives:
            raise NotFoundError(f"tape {tape} is needed and is in none of the drives of "
                                f"tape server {self.peer.address} ({', '.join(self.drives)}"
                                "): insert it there and give its drive to 'sdbackup tape "
                                "serve'")

    def get(self, tape: str, first: int, count: int, end: int) -> bytes:
        with self._lock:
            keys = [(tape, b) for b in range(first, first + count)]
            if all(k in self._cache for k in keys):
                for k in keys:
                    self._cache.move_to_end(k)
                return b"".join(self._cache[k] for k in keys)
        out: list[bytes] = []
        at = first
        while at < first + count:
            n = min(self.max_count, first + count - at)
            _, data = self.peer.call(msg.TapeRead(tape, at, n, end), timeout=READ_TIMEOUT)
            if data is None or len(data) != n * self._slot_size:
                raise CorruptError(f"tape server {self.peer.address} answered blocks "
                                   f"{at}-{at + n - 1} of tape {tape} with "
                                   f"{0 if data is None else len(data)} bytes, not "
                                   f"{n * self._slot_size}")
            self.requests += 1
            self.bytes += len(data)
            out.append(bytes(data))
            at += n
        got = out[0] if len(out) == 1 else b"".join(out)
        with self._lock:
            bs = self._slot_size
            for i in range(max(0, count - self.cache_blocks), count):
                self._cache[(tape, first + i)] = got[i * bs:(i + 1) * bs]
                self._cache.move_to_end((tape, first + i))
            while len(self._cache) > self.cache_blocks:
                self._cache.popitem(last=False)
        return got


class RemoteTapeSetMedium(TapeSetMedium):
    """A tape set's catalog mirrored from a tape server, its streams read through the
    server's buffer. Resolving a generation fetches what its chain needs first."""

    fetch_chain: Callable[[Manifest], None]

    def __str__(self) -> str:
        return f"tape set {self.set_id} (tape server {self.buffer_peer})"

    @property
    def buffer_peer(self) -> str:
        b = self.buffer
        return b.peer.address if isinstance(b, RemoteTapeBlocks) else "?"

    def resolve(self, gen: str | None) -> Manifest:
        m = super().resolve(gen)
        self.fetch_chain(m)
        return m


class RemoteSet:
    """A tape set opened through a tape server: the same shape as
    :class:`~sdbackup.media.tape.library.OpenedSet` (``medium``, ``close``)."""

    def __init__(self, peer: _Peer, blocks: RemoteTapeBlocks, medium: RemoteTapeSetMedium,
                 tmp: Path | None) -> None:
        self.peer = peer
        self.blocks = blocks
        self.medium = medium
        self._tmp = tmp

    def close(self) -> None:
        try:
            self.peer.close()
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None

    def __enter__(self) -> RemoteSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Mirror:
    """The server's catalog files copied into ``catalog``'s directory of the set."""

    def __init__(self, peer: _Peer, set_dir: Path, set_id: str) -> None:
        self.peer = peer
        self.set_dir = set_dir
        self.set_id = set_id
        self._lock = threading.Lock()
        self._done: set[str] = set()

    def fetch(self, gen: str | None, name: str) -> bytes:
        parts: list[bytes] = []
        at, size = 0, None
        while size is None or at < size:
            body, data = self.peer.call(msg.TapeFile(gen, name, at), timeout=300)
            size = int(body["size"])
            chunk = data or b""
            if not chunk and at < size:
                raise RemoteError(f"tape server {self.peer.address}: {name} of "
                                  f"{gen or 'the set'} ended at byte {at} of {size}")
            parts.append(bytes(chunk))
            at += len(chunk)
        return b"".join(parts)

    def manifests(self, gens: list[str]) -> None:
        """Every committed generation's manifest (a generation whose manifest changed
        on the server, e.g. written again, loses its other mirrored files)."""
        gdir = self.set_dir / GENERATIONS
        gdir.mkdir(parents=True, exist_ok=True)
        for stale in set(os.listdir(gdir)) - set(gens):
            shutil.rmtree(gdir / stale, ignore_errors=True)
        for g in gens:
            if not GEN_ID_RE.match(g):
                raise CorruptError(f"tape server {self.peer.address} lists a generation "
                                   f"with a bad id {g!r}")
            raw = self.fetch(g, MANIFEST)
            m = Manifest.from_json(raw, f"{g} from tape server {self.peer.address}")
            if m.id != g:
                raise CorruptError(f"tape server {self.peer.address}: the manifest of "
                                   f"generation {g} is that of {m.id}")
            d = gdir / g
            old = d / MANIFEST
            if old.exists() and old.read_bytes() == raw:
                continue
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            write_atomic(old, raw)

    def generation(self, m: Manifest) -> None:
        """The index, snapshot and placement of generation ``m`` (once per open)."""
        with self._lock:
            if m.id in self._done:
                return
            d = self.set_dir / GENERATIONS / m.id
            if not INDEX_NAME_RE.match(m.index.name):
                raise CorruptError(f"generation {m.id}: bad index name {m.index.name!r}")
            write_atomic(d / PLACEMENT, self.fetch(m.id, PLACEMENT))
            index = d / m.index.name
            if not index.exists() or index.stat().st_size != m.index.bytes:
                write_atomic(index, self.fetch(m.id, m.index.name))
            snap = d / META
            if not snap.exists() or file_digest(snap) != (m.meta.bytes, m.meta.digest):
                write_atomic(snap, self.fetch(m.id, META))
                if file_digest(snap) != (m.meta.bytes, m.meta.digest):
                    raise CorruptError(f"generation {m.id}: the snapshot from tape server "
                                       f"{self.peer.address} does not match its manifest")
            self._done.add(m.id)


_SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


def open_remote_set(address: str, secret: bytes, *,
                    catalog_dir: str | os.PathLike[str] | None = None) -> RemoteSet:
    """The tape set served by the tape server at ``address`` (HOST:PORT).

    ``catalog_dir``: where to keep the mirrored catalog across runs (a catalog
    directory like ``--catalog``; files still current are not fetched again);
    default: a temporary directory removed by ``close``."""
    peer = _Peer(address, secret)
    tmp: Path | None = None
    try:
        info, _ = peer.call(msg.TapeInfo())
        set_id = str(info.get("set", ""))
        if not _SAFE.match(set_id):
            raise CorruptError(f"tape server {address} names a bad tape set {set_id!r}")
        if catalog_dir is None:
            tmp = Path(tempfile.mkdtemp(prefix="sdbackup-tape-catalog."))
            root = tmp
        else:
            root = Path(catalog_dir)
        catalog = TapeCatalog(root)
        set_dir = catalog.set_dir(set_id)
        set_dir.mkdir(parents=True, exist_ok=True)
        mirror = _Mirror(peer, set_dir, set_id)
        write_atomic(set_dir / MEDIUM_LABEL, mirror.fetch(None, MEDIUM_LABEL))
        write_atomic(set_dir / TAPES, (json.dumps(info.get("tapes", {}), indent=2) +
                                       "\n").encode())
        mirror.manifests([str(g) for g in info.get("generations", [])])
        blocks = RemoteTapeBlocks(peer, int(info["block_size"]),
                                  [str(t) for t in info.get("in_drives", [])],
                                  [str(d) for d in info.get("drives", [])])
        base = catalog.medium(set_id)
        medium = RemoteTapeSetMedium(base.root, base.label, catalog, blocks)
        if medium.cluster_id != info.get("cluster"):
            raise CorruptError(f"tape server {address}: the set's label names cluster "
                               f"{medium.cluster_id}, the server {info.get('cluster')}")

        def fetch_chain(m: Manifest) -> None:
            chain = [m] if m.is_full else medium.catalog().chain(m)
            for g in chain:
                mirror.generation(g)

        medium.fetch_chain = fetch_chain
        return RemoteSet(peer, blocks, medium, tmp)
    except BaseException:
        peer.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
