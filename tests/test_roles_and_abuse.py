"""Roles and abuse (issue 10, items 4 and 5): what node credentials cannot do, and what
the cluster protocol withstands.

Real processes (``sdbackup coordinator``, ``sdbackup node``) on 127.0.0.1 where the
property is about the product; an in-process :class:`RpcServer` where the test must
hold a handler still (byte budgets). What is proven:

(a) a session that has only the shared secret (a node agent's ClusterClient, a raw
    client of any kind, an admin with a guessed owner token, a node's control port, a
    command on a host that has a copy of the cluster directory but not the
    coordinator's owner token) cannot start a backup: the request is refused with one
    clear error, the ``pre_freeze`` and ``post_thaw`` hooks never run and nothing is
    written where it named the medium; ``sdbackup backup CL --medium M`` by the owner
    on the coordinator's host works, hooks included; ``owner.token`` is 0600 and goes
    away with the coordinator;
(b) 500 unauthenticated connections held open (some having sent a HELLO and stalled)
    do not keep a node from joining or ``sdbackup status`` from answering, neither as
    one burst nor when the flood re-opens every connection the server drops;
(c) a client with the wrong secret never receives anything that depends on the secret
    (the CHALLENGE carries a nonce only; the server's proof comes in WELCOME, after the
    client's proof), and idle or stalled handshakes are dropped at their deadlines;
(d) a peer that queues more request bytes than its budget (256 MiB per connection, 1 GiB
    per process) loses its connection while others are still served; the requests
    dropped with it leave the budget at once, and every byte is accounted back at the
    end; JSON bodies count as well as blobs (a frame may carry 16 MiB of JSON);
(e) ``sdbackup init`` writes a 64-hex-character secret, mode 0600; a short or non-hex
    secret file is refused with one line and exit code 2.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    from cluster_helpers import ClusterProcs, sdb, sdb_cmd, wait_for, write_file_via
except ModuleNotFoundError:  # tests/ imported as a package
    from tests.cluster_helpers import ClusterProcs, sdb, sdb_cmd, wait_for, write_file_via

from sdbackup.cluster.config import read_addr
from sdbackup.cluster.node import ClusterClient, node_control_address
from sdbackup.errors import SdbError
from sdbackup.net import rpc
from sdbackup.net.auth import (
    AUTH_FAILED_MESSAGE,
    client_handshake,
    load_secret,
    proof,
)
from sdbackup.net.protocol import (
    HEADER,
    ZERO_MAC,
    FrameStream,
    FrameType,
    pack_header,
)
from sdbackup.net.rpc import BaseHandler, Connection, HandlerResult, RpcClient, RpcServer

MiB = 1 << 20
SECRET = b"5be0c3d1a2f94e8b7c6d5e4f3a2b1c0d"
LOGGER = "sdbackup.cluster"


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ClusterProcs]:
    """A cluster with its coordinator running (processes killed at teardown)."""
    c = ClusterProcs(tmp_path / "c")
    try:
        c.start_coordinator(lease=3.0)
        yield c
    finally:
        c.cleanup()


# -- raw frames --------------------------------------------------------------------------

def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def recv_raw_frame(sock: socket.socket) -> tuple[FrameType, dict[str, Any], bytes]:
    """One unauthenticated frame: (type, JSON body, every byte of it as received)."""
    head = _recv_exact(sock, HEADER.size)
    _, _, ftype, _, _, jlen, blen, _ = HEADER.unpack(head)
    rest = _recv_exact(sock, jlen + blen)
    return FrameType(ftype), (json.loads(rest[:jlen]) if jlen else {}), head + rest


def raw_frame(ftype: FrameType, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return pack_header(ftype, 0, 0, len(data), 0) + ZERO_MAC + data


def hello(nonce: bytes) -> bytes:
    return raw_frame(FrameType.HELLO, {"nonce": nonce.hex(), "name": "probe"})


def closed_within(sock: socket.socket, timeout: float) -> bool:
    """True when the peer closes ``sock`` (EOF or reset) within ``timeout`` seconds;
    whatever it sends meanwhile is read and dropped."""
    sock.settimeout(timeout)
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            sock.settimeout(max(0.01, end - time.monotonic()))
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def is_open(sock: socket.socket) -> bool:
    """The peer has not closed ``sock`` (checked without blocking)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


# -- (a) roles ---------------------------------------------------------------------------

def _hostile_backup(medium: Path, marker: Path) -> dict[str, Any]:
    return {"medium": str(medium), "compression": "zstd", "level": 1,
            "pre_freeze": f"touch {marker}.pre", "post_thaw": f"touch {marker}.post"}


def _assert_untouched(medium: Path, marker: Path) -> None:
    time.sleep(0.5)  # a hook started asynchronously would have run by now
    for p in (Path(f"{marker}.pre"), Path(f"{marker}.post")):
        assert not p.exists(), f"a hook ran on the coordinator: {p} exists"
    assert not medium.exists(), f"the coordinator wrote to {medium}"


def test_node_credentials_cannot_start_backups_but_the_owner_can(
        cp: ClusterProcs, tmp_path: Path) -> None:
    cp.start_node("n1")
    write_file_via(cp.dir, "n1", "/data", b"payload " * 1000)
    marker = tmp_path / "pwned"

    # 1. A node-style client (the ClusterClient a node agent uses), secret only.
    evil_medium = tmp_path / "evil-medium-1"
    with ClusterClient("intruder", cluster_dir=cp.dir) as cc:
        rc = cc.ref
        with pytest.raises(SdbError, match="may not start backups"):
            rc.call("backup", _hostile_backup(evil_medium, marker), timeout=30)
        # Naming a medium alone (no hooks) is refused too.
        with pytest.raises(SdbError, match="may not start backups"):
            rc.call("backup", {"medium": str(evil_medium)}, timeout=30)
        # The session still works for what nodes may do.
        assert rc.call("status", {}, timeout=30)[0]["nodes"]
    _assert_untouched(evil_medium, marker)

    # 2. Raw sessions of every kind, with no token or a guessed one.
    host, port = read_addr(cp.dir) or ("", 0)
    secret = load_secret(cp.dir / "secret")
    for i, join in enumerate([{"kind": "client"}, {"kind": "admin"},
                              {"kind": "admin", "owner_token": "0" * 64},
                              {"kind": "admin", "owner_token": ""}]):
        medium = tmp_path / f"evil-medium-raw{i}"
        with RpcClient.connect(host, port, secret, name=f"raw{i}") as c:
            c.call("join", {"name": f"raw{i}", "host": "elsewhere", "pid": 1, **join})
            with pytest.raises(SdbError, match="may not start backups"):
                c.call("backup", _hostile_backup(medium, marker), timeout=30)
        _assert_untouched(medium, marker)

    # 3. A node agent's control port does not relay backups to the coordinator.
    nhost, nport = node_control_address(cp.dir, "n1")
    medium = tmp_path / "evil-medium-relay"
    with RpcClient.connect(nhost, nport, secret, name="relay") as c:
        c.call("join", {"name": "relay"})
        with pytest.raises(SdbError, match="unknown request 'backup'"):
            c.call("backup", _hostile_backup(medium, marker), timeout=30)
    _assert_untouched(medium, marker)

    # 4. The CLI on a host with a copy of the cluster directory (config, secret, the
    #    coordinator's address) but not the owner token: one line, exit code 2.
    node_host = tmp_path / "node-host-copy"
    node_host.mkdir()
    for name in ("cluster.toml", "secret", "coordinator.addr"):
        shutil.copy2(cp.dir / name, node_host / name)
    medium = tmp_path / "evil-medium-cli"
    r = sdb("backup", str(node_host), "--medium", str(medium), "--pre-freeze",
            f"touch {marker}.pre", "--post-thaw", f"touch {marker}.post")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "may not start backups" in r.stderr
    _assert_untouched(medium, marker)

    # 5. The owner on the coordinator's host: the backup runs, hooks included.
    token = cp.dir / "owner.token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert len(token.read_text().strip()) == 64
    good = tmp_path / "medium"
    r = sdb("backup", str(cp.dir), "--medium", str(good), "--pre-freeze",
            f"touch {tmp_path / 'ok.pre'}", "--post-thaw", f"touch {tmp_path / 'ok.post'}",
            "--json", timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert (tmp_path / "ok.pre").exists() and (tmp_path / "ok.post").exists()
    gens = json.loads(sdb("generations", "--medium", str(good), "--json", check=True).stdout)
    assert [g["state"] for g in gens["generations"]] == ["committed"]

    # The token goes with the coordinator: a later coordinator makes a new one.
    assert cp.coordinator is not None
    for n in list(cp.nodes.values()):
        n.stop()
    cp.coordinator.stop()
    assert not token.exists()
    cp.assert_no_tracebacks()


# -- (b) floods --------------------------------------------------------------------------

def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


def _join_and_status(cp: ClusterProcs, name: str) -> dict[str, float]:
    """Start node ``name`` and run ``sdbackup status``; seconds each took."""
    _, t_node = _timed(lambda: cp.start_node(name))
    r, t_status = _timed(lambda: sdb("status", str(cp.dir), "--json", timeout=60))
    assert r.returncode == 0, f"sdbackup status failed during the flood: {r.stderr}"
    names = [n["name"] for n in json.loads(r.stdout)["nodes"]]
    assert name in names, names
    return {"node join": t_node, "status": t_status}


def test_burst_of_500_unauthenticated_connections_locks_nobody_out(cp: ClusterProcs) -> None:
    host, port = read_addr(cp.dir) or ("", 0)
    flood: list[socket.socket] = []
    try:
        for i in range(500):
            s = socket.create_connection((host, port), timeout=10)
            if i % 10 == 0:  # one in ten starts a handshake and stalls after HELLO
                s.sendall(hello(os.urandom(32)))
            flood.append(s)
        times = _join_and_status(cp, "n1")
        print(f"burst flood: {times}")
        assert max(times.values()) < 15, times
        # The joined node works.
        write_file_via(cp.dir, "n1", "/after-flood", b"x" * 5000)
    finally:
        for s in flood:
            s.close()
    assert cp.coordinator is not None and cp.coordinator.alive()
    cp.assert_no_tracebacks()


class Flooder:
    """Keeps ``n`` unauthenticated connections open from another loopback address
    (127.0.0.2), re-opening every one the server drops; one in ten sends a HELLO."""

    def __init__(self, addr: tuple[str, int], n: int = 500) -> None:
        self.addr = addr
        self.n = n
        self.opened = 0
        self.errors = 0
        self._stop = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._thread = threading.Thread(target=self._run, name="flooder", daemon=True)

    def __enter__(self) -> Flooder:
        self._thread.start()
        wait_for(lambda: self.opened >= self.n or not self._thread.is_alive(), 60,
                 "the flood to open its connections")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._sel.close()

    def _open(self) -> None:
        try:
            s = socket.create_connection(self.addr, timeout=5,
                                         source_address=("127.0.0.2", 0))
            if self.opened % 10 == 0:
                s.sendall(hello(os.urandom(32)))
            s.setblocking(False)
            self._sel.register(s, selectors.EVENT_READ)
            self.opened += 1
        except OSError:
            self.errors += 1
            time.sleep(0.01)

    def _run(self) -> None:
        while not self._stop.is_set():
            while len(self._sel.get_map()) < self.n and not self._stop.is_set():
                self._open()
            for key, _ in self._sel.select(timeout=0.05):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if not data:  # dropped by the server: open another one
                    self._sel.unregister(s)
                    s.close()


@pytest.mark.slow
def test_sustained_flood_of_500_connections_locks_nobody_out(cp: ClusterProcs) -> None:
    host, port = read_addr(cp.dir) or ("", 0)
    with Flooder((host, port)) as flood:
        t0, opened0 = time.monotonic(), flood.opened
        times = [_join_and_status(cp, f"n{i}") for i in range(1, 4)]
        rate = (flood.opened - opened0) / (time.monotonic() - t0)
        write_file_via(cp.dir, "n1", "/after-flood", b"y" * 5000)
    print(f"sustained flood: {rate:.0f} connections/s, {flood.opened} in all; {times}")
    assert all(max(t.values()) < 20 for t in times), (times, f"{rate:.0f} conn/s")
    assert flood.opened > flood.n + 100, "the flood did not keep re-opening connections"
    assert cp.coordinator is not None and cp.coordinator.alive()
    cp.assert_no_tracebacks()


# -- (c) the handshake ----------------------------------------------------------------------

def test_wrong_secret_never_receives_a_server_proof(cp: ClusterProcs) -> None:
    host, port = read_addr(cp.dir) or ("", 0)
    secret = load_secret(cp.dir / "secret")
    wrong = os.urandom(32).hex().encode()

    # Positive control: with the right secret the server's proof is in WELCOME, and
    # it is exactly what this test computes (so the search below is meaningful).
    with socket.create_connection((host, port), timeout=10) as s:
        cn = os.urandom(32)
        s.sendall(hello(cn))
        ftype, body, _ = recv_raw_frame(s)
        assert ftype is FrameType.CHALLENGE
        sn = bytes.fromhex(body["nonce"])
        s.sendall(raw_frame(FrameType.AUTH, {"proof": proof(secret, b"client", cn, sn).hex()}))
        ftype, body, _ = recv_raw_frame(s)
        assert ftype is FrameType.WELCOME
        assert body["proof"] == proof(secret, b"server", cn, sn).hex()

    # The wrong secret: everything the server sends, byte for byte.
    for _ in range(3):
        with socket.create_connection((host, port), timeout=10) as s:
            cn = os.urandom(32)
            s.sendall(hello(cn))
            ftype, body, raw = recv_raw_frame(s)
            assert ftype is FrameType.CHALLENGE
            assert set(body) == {"nonce"}, f"the CHALLENGE says more than a nonce: {body}"
            sn = bytes.fromhex(body["nonce"])
            s.sendall(raw_frame(FrameType.AUTH,
                                {"proof": proof(wrong, b"client", cn, sn).hex()}))
            received = raw
            ftype, body, raw = recv_raw_frame(s)
            received += raw
            assert ftype is FrameType.ERROR and AUTH_FAILED_MESSAGE in body["message"]
            # ...and then nothing more: the connection closes (no WELCOME).
            s.settimeout(5)
            rest = b""
            try:
                while chunk := s.recv(65536):
                    rest += chunk
            except ConnectionResetError:
                pass
            assert rest == b"", f"more frames after the refusal: {rest[:200]!r}"
            for secret_dependent in (proof(secret, b"server", cn, sn),
                                     proof(secret, b"client", cn, sn)):
                assert secret_dependent.hex().encode() not in received
                assert secret_dependent not in received

    # The library client with the wrong secret fails the same way.
    with pytest.raises(SdbError, match="authentication failed"):
        RpcClient.connect(host, port, wrong, timeout=10)
    assert "authentication failed from 127.0.0.1:" in cp.coordinator_log()


def test_idle_and_stalled_handshakes_are_dropped_at_their_deadlines(cp: ClusterProcs) -> None:
    host, port = read_addr(cp.dir) or ("", 0)
    idle = socket.create_connection((host, port), timeout=10)
    stalled = socket.create_connection((host, port), timeout=10)
    t0 = time.monotonic()
    stalled.sendall(hello(os.urandom(32)))
    ftype, _, _ = recv_raw_frame(stalled)
    assert ftype is FrameType.CHALLENGE
    try:
        assert closed_within(idle, 6), "an idle connection was kept beyond 6 s"
        t_idle = time.monotonic() - t0
        assert closed_within(stalled, 10), "a stalled handshake was kept beyond 10 s"
        t_stalled = time.monotonic() - t0
    finally:
        idle.close()
        stalled.close()
    # First frame within 2 s; the whole handshake within 5 s.
    assert 1.5 <= t_idle <= 4.0, t_idle
    assert 4.0 <= t_stalled <= 8.0, t_stalled


# -- (d) byte budgets -----------------------------------------------------------------------

class _Blocking(BaseHandler):
    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def rpc_block(self, conn: Connection, args: dict[str, Any], blob: bytes | None
                  ) -> HandlerResult:
        self.release.wait(60)
        return {"got": len(blob or b"")}

    def rpc_echo(self, conn: Connection, args: dict[str, Any], blob: bytes | None
                 ) -> HandlerResult:
        return args, blob


@pytest.fixture
def blocking_server() -> Iterator[tuple[RpcServer, threading.Event]]:
    """An RpcServer with one worker per connection whose ``block`` waits for an event."""
    release = threading.Event()
    srv = RpcServer(lambda conn: _Blocking(release), SECRET, "127.0.0.1", 0, max_workers=1)
    srv.start()
    try:
        yield srv, release
    finally:
        release.set()
        srv.stop()
    wait_for(lambda: rpc._queued_total == 0, 10, "every queued byte to be accounted back")


def _raw_session(srv: RpcServer) -> FrameStream:
    sock = socket.create_connection(srv.address, timeout=30)
    stream = FrameStream(sock, "abuser")
    client_handshake(stream, SECRET)
    stream.end_handshake()
    return stream


def _send_requests(stream: FrameStream, first_id: int, count: int, blob: bytes | None,
                   body_pad: int = 0) -> None:
    for rid in range(first_id, first_id + count):
        args = {"pad": "p" * body_pad} if body_pad else {}
        stream.send_bytes(stream.signed_frame(FrameType.REQUEST, rid,
                                              {"method": "block", "args": args}, blob))


def _still_serves(srv: RpcServer) -> None:
    with RpcClient.connect(*srv.address, SECRET) as c:
        assert c.call("echo", {"ok": 1}, timeout=10) == ({"ok": 1}, None)


JSON_SLACK = 64 << 10  # a queued request also counts its (small) JSON body


def _queued_about(n: int) -> bool:
    """The process-wide count holds ``n`` bytes of blobs plus their requests' JSON."""
    return n <= rpc._queued_total < n + JSON_SLACK


@pytest.mark.slow
def test_more_than_256_mib_of_queued_requests_closes_that_connection(
        blocking_server: tuple[RpcServer, threading.Event],
        caplog: pytest.LogCaptureFixture) -> None:
    """The real per-connection budget, with the largest blobs a frame may carry."""
    srv, release = blocking_server
    assert 256 * MiB == rpc.QUEUED_BYTES_PER_CONNECTION
    blob = os.urandom(64 * MiB)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        stream = _raw_session(srv)
        try:
            # 1 running + 3 queued = 256 MiB of blobs, less their JSON: fine
            _send_requests(stream, 1, 4, blob[: 64 * MiB - JSON_SLACK])
            wait_for(lambda: _queued_about(256 * MiB - 4 * JSON_SLACK), 30,
                     "4 requests queued")
            assert is_open(stream.sock)
            _send_requests(stream, 5, 1, blob)  # 64 MiB more: over the budget
            assert closed_within(stream.sock, 30), "the abuser's connection stayed open"
        finally:
            stream.close()
        wait_for(lambda: any("more than 256 MiB of requests queued" in r.getMessage()
                             for r in caplog.records), 10, "the log line")
        _still_serves(srv)  # while the abuser's first request is still running
    release.set()
    wait_for(lambda: rpc._queued_total == 0, 30, "the queued bytes to be released")


def test_the_process_wide_budget_closes_whoever_goes_over_it(
        blocking_server: tuple[RpcServer, threading.Event],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Budgets made small (6 MiB per connection, 10 MiB in all) to keep memory low."""
    srv, release = blocking_server
    monkeypatch.setattr(rpc, "QUEUED_BYTES_PER_CONNECTION", 6 * MiB + JSON_SLACK)
    monkeypatch.setattr(rpc, "QUEUED_BYTES_TOTAL", 10 * MiB + JSON_SLACK)
    blob = bytes(MiB)
    a, b = _raw_session(srv), _raw_session(srv)
    try:
        _send_requests(a, 1, 6, blob)  # A's whole budget (1 running + 5 queued)
        wait_for(lambda: _queued_about(6 * MiB), 10, "A's 6 MiB queued")
        _send_requests(b, 1, 4, blob)
        wait_for(lambda: _queued_about(10 * MiB), 10, "B's 4 MiB queued")
        _send_requests(b, 5, 1, blob)  # 11 MiB in all: B goes, A stays
        assert closed_within(b.sock, 10), "B went over the total and stayed open"
        assert is_open(a.sock)
        _still_serves(srv)  # requests without blobs need no budget
        release.set()
        answers = [a.recv() for _ in range(6)]
        assert [f.body for f in answers] == [{"got": MiB}] * 6
    finally:
        a.close()
        b.close()
    wait_for(lambda: rpc._queued_total == 0, 10, "every queued byte released")


def test_requests_dropped_with_a_closed_connection_leave_the_budget_at_once(
        blocking_server: tuple[RpcServer, threading.Event],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An abuser closed for going over its budget while one of its handlers still runs:
    its queued requests are dropped (their memory is free), so they must not keep
    counting against the process-wide budget, or every other peer's requests with a
    blob would be refused until that handler returns."""
    srv, release = blocking_server
    monkeypatch.setattr(rpc, "QUEUED_BYTES_PER_CONNECTION", 6 * MiB + JSON_SLACK)
    blob = bytes(MiB)
    a = _raw_session(srv)
    try:
        _send_requests(a, 1, 6, blob)
        wait_for(lambda: _queued_about(6 * MiB), 10, "A's 6 MiB queued")
        _send_requests(a, 7, 1, blob)
        assert closed_within(a.sock, 10), "A went over its budget and stayed open"
        # Only the running request's blob is still held.
        wait_for(lambda: _queued_about(MiB), 5,
                 f"A's 5 dropped requests to leave the budget (still counted: "
                 f"{rpc._queued_total / MiB:g} MiB)")
    finally:
        a.close()
        release.set()


def test_large_json_bodies_count_against_the_budget_too(
        blocking_server: tuple[RpcServer, threading.Event],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A queued request costs its JSON body as much as its blob: a frame may carry
    16 MiB of JSON, and 10,000 may be queued per connection (160 GB) otherwise."""
    srv, _ = blocking_server
    monkeypatch.setattr(rpc, "QUEUED_BYTES_PER_CONNECTION", 4 * MiB)
    stream = _raw_session(srv)
    try:
        try:
            _send_requests(stream, 1, 8, None, body_pad=MiB)  # 8 MiB of queued JSON
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: what is asserted below
        assert closed_within(stream.sock, 5), (
            "8 requests of 1 MiB JSON each were queued against a 4 MiB budget")
    finally:
        stream.close()
    _still_serves(srv)


# -- (e) secrets -------------------------------------------------------------------------

def test_init_writes_a_64_hex_secret_and_bad_secrets_are_refused_in_one_line(
        tmp_path: Path) -> None:
    secrets_seen = []
    for i in range(2):
        cdir = tmp_path / f"c{i}"
        sdb("init", str(cdir), "--disk", f"d0={tmp_path}/d{i}.img:16MiB", check=True)
        raw = (cdir / "secret").read_bytes()
        assert raw.endswith(b"\n") and len(raw.strip()) == 64
        int(raw.strip(), 16)  # hex
        assert stat.S_IMODE((cdir / "secret").stat().st_mode) == 0o600
        secrets_seen.append(raw)
    assert secrets_seen[0] != secrets_seen[1]
    assert load_secret(tmp_path / "c0" / "secret") == secrets_seen[0].strip()

    cdir = tmp_path / "c0"
    bad_secrets = {
        "short": b"s3cret\n",
        "31 hex": b"0123456789abcdef0123456789abcde\n",
        "non-hex": b"correct horse battery staple, correct horse battery staple!!\n",
        "empty": b"",
    }
    for what, content in bad_secrets.items():
        (cdir / "secret").write_bytes(content)
        for argv in (["coordinator", str(cdir)],
                     ["node", "--coordinator", "127.0.0.1:9", "--secret-file",
                      str(cdir / "secret"), "--name", "x"]):
            r = subprocess.run(sdb_cmd(*argv), capture_output=True, text=True, timeout=60,
                               cwd=tmp_path, stdin=subprocess.DEVNULL)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2, (what, argv[0], r.stderr)
            assert len(lines) == 1 and lines[0].startswith("sdbackup: error: "), \
                (what, argv[0], r.stderr)
            assert "secret" in lines[0] and "Traceback" not in r.stderr
        assert not (cdir / "coordinator.addr").exists()
    # The library refuses a short secret before it connects anywhere.
    with pytest.raises(SdbError, match="at least 32 hex characters"):
        RpcClient.connect("127.0.0.1", 9, b"s3cret", timeout=1)
    # The shortest accepted secret: 32 hex characters.
    (cdir / "secret").write_bytes(b"0123456789abcdef0123456789abcdef\n")
    assert load_secret(cdir / "secret") == b"0123456789abcdef0123456789abcdef"
