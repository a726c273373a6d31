"""Cluster transport: framing, authentication and RPC over real TCP on 127.0.0.1.

Every fault test also checks that the server keeps serving a good client afterwards.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sdbackup.errors import EXIT_NOT_FOUND, FsError, NotFoundError, RemoteError, SdbError
from sdbackup.net.auth import AUTH_FAILED_MESSAGE, client_handshake, load_secret
from sdbackup.net.protocol import (
    HEADER,
    MAGIC,
    MAX_BLOB,
    MAX_JSON,
    PROTOCOL_VERSION,
    ZERO_MAC,
    ConnectionLost,
    FrameStream,
    FrameType,
    ProtocolError,
    pack_header,
)
from sdbackup.net.rpc import (
    BaseHandler,
    Connection,
    HandlerResult,
    RpcClient,
    RpcServer,
    RpcTimeout,
    connect_pair,
    register_error,
)

SECRET = b"7f3c0a9e5b2d4c6f8a1e3b5d7c9f0a2b"
WRONG = b"00000000000000000000000000000000"
LOGGER = "sdbackup.cluster"
A = dict[str, Any]
B = bytes | None


@register_error
class QuotaError(SdbError):
    """An error class with its own constructor signature: travels by name anyway."""

    def __init__(self, user: str, used: int) -> None:
        super().__init__(f"user {user} is over quota ({used} bytes)", exit_code=6)


class State:
    def __init__(self) -> None:
        self.notes: list[dict[str, Any]] = []
        self.disconnected: list[Connection] = []
        self.release = threading.Event()


class Handler(BaseHandler):
    def __init__(self, conn: Connection, state: State) -> None:
        self.conn = conn
        self.state = state

    def rpc_echo(self, conn: Connection, args: A, blob: B) -> HandlerResult:
        return args, blob

    def rpc_fail(self, conn: Connection, args: A, blob: B) -> HandlerResult:
        kind = args["kind"]
        if kind == "notfound":
            raise NotFoundError("no such generation 'g7': list them with 'sdbackup ls'")
        if kind == "quota":
            raise QuotaError("ann", 42)
        if kind == "fs":
            raise FsError(errno.ENOENT, "/dir/file")
        if kind == "os":
            raise PermissionError(errno.EACCES, "Permission denied", "/secret")
        if kind == "bug":
            raise ValueError("internal oops")
        if kind == "nojson":
            return {"x": object()}
        raise AssertionError(kind)

    def rpc_ask_client(self, conn: Connection, args: A, blob: B) -> HandlerResult:
        # The server calls the client back while the client's call is in flight.
        result, back = conn.call("cb", {"n": args["n"]}, blob, timeout=5)
        return {"client_said": result}, back

    def rpc_sleep(self, conn: Connection, args: A, blob: B) -> HandlerResult:
        time.sleep(args["s"])
        return {"slept": args["s"]}

    def rpc_wait_closed(self, conn: Connection, args: A, blob: B) -> HandlerResult:
        while not conn.closed:
            time.sleep(0.01)
        return {}

    def rpc_block(self, conn: Connection, args: A, blob: B) -> HandlerResult:
        self.state.release.wait(5)
        return {}

    def rpc_drop(self, conn: Connection, args: A, blob: B) -> HandlerResult:
        conn.close()  # no goodbye: looks like a crash to the client
        return {}

    def rpc_note(self, conn: Connection, args: A, blob: B) -> HandlerResult:
        self.state.notes.append(args)
        return None

    def rpc_notify_client(self, conn: Connection, args: A, blob: B) -> HandlerResult:
        conn.notify("pushed", args)
        return {}

    def on_disconnect(self, conn: Connection) -> None:
        self.state.disconnected.append(conn)


@pytest.fixture
def state() -> State:
    return State()


def make_server(state: State, **kw: Any) -> RpcServer:
    srv = RpcServer(lambda conn: Handler(conn, state), SECRET, "127.0.0.1", 0, **kw)
    srv.start()
    return srv


@pytest.fixture
def server(state: State) -> Iterator[RpcServer]:
    srv = make_server(state)
    yield srv
    srv.stop()


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def logged(caplog: pytest.LogCaptureFixture, *words: str, level: int = logging.WARNING) -> bool:
    return any(r.name == LOGGER and r.levelno >= level
               and all(w in r.getMessage() for w in words) for r in caplog.records)


def still_serves(srv: RpcServer) -> None:
    with RpcClient.connect(*srv.address, SECRET) as c:
        assert c.call("echo", {"ok": 1}, b"abc") == ({"ok": 1}, b"abc")


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the peer sends until it closes (a reset counts as closed)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def raw_authenticated(srv: RpcServer) -> FrameStream:
    """A hand-driven stream that did a correct handshake (to send frames made by hand)."""
    sock = socket.create_connection(srv.address, timeout=5)
    stream = FrameStream(sock, "test")
    client_handshake(stream, SECRET)
    return stream


# -- normal operation ---------------------------------------------------------------


@pytest.mark.parametrize("blob", [None, b"", b"x", os.urandom(65537), os.urandom(8 << 20)])
def test_round_trip(server: RpcServer, blob: bytes | None) -> None:
    with RpcClient.connect(*server.address, SECRET, name="node1") as c:
        args = {"s": "é", "n": [1, 2.5, None], "d": {"k": True}}
        result, back = c.call("echo", args, blob)
        assert result == args
        assert back == blob
        assert c.server_name == "coordinator"
        assert [x.peer_name for x in server.connections()] == ["node1"]


def test_blob_may_be_bytearray_or_memoryview(server: RpcServer) -> None:
    data = os.urandom(100_000)
    with RpcClient.connect(*server.address, SECRET) as c:
        assert c.call("echo", {}, bytearray(data))[1] == data
        assert c.call("echo", {}, memoryview(data)[10:20])[1] == data[10:20]


def test_concurrent_calls_from_8_threads(server: RpcServer) -> None:
    errors: list[BaseException] = []
    with RpcClient.connect(*server.address, SECRET) as c:
        def worker(k: int) -> None:
            try:
                for i in range(150):
                    blob = bytes([k]) * (i % 7) * 1000 if i % 3 else None
                    assert c.call("echo", {"k": k, "i": i}, blob) == ({"k": k, "i": i}, blob)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_server_calls_client_back_during_a_call(server: RpcServer) -> None:
    client: RpcClient | None = None

    def callback(method: str, args: A, blob: B) -> HandlerResult:
        assert method == "cb"
        assert client is not None
        # A callback may itself call the server (nested, other direction).
        inner, _ = client.call("echo", {"inner": args["n"]})
        return {"got": args["n"], "inner": inner}, (blob or b"") + b"!"

    client = RpcClient.connect(*server.address, SECRET, callback)
    with client:
        result, blob = client.call("ask_client", {"n": 7}, b"data")
        assert result == {"client_said": {"got": 7, "inner": {"inner": 7}}}
        assert blob == b"data!"

        # Many at once: callbacks run on worker threads, not on the reader.
        results: list[int] = []

        def one(n: int) -> None:
            assert client is not None
            results.append(client.call("ask_client", {"n": n})[0]["client_said"]["got"])

        threads = [threading.Thread(target=one, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == list(range(6))


def test_notify_both_ways(server: RpcServer, state: State) -> None:
    pushed: list[dict[str, Any]] = []
    with RpcClient.connect(
            *server.address, SECRET,
            lambda m, a, b: pushed.append({"m": m, **a})) as c:
        c.notify("note", {"x": 1})
        c.call("notify_client", {"y": 2})
        assert wait_for(lambda: state.notes == [{"x": 1}])
        assert wait_for(lambda: pushed == [{"m": "pushed", "y": 2}])


def test_client_without_callback_handler_answers_with_an_error(server: RpcServer) -> None:
    with RpcClient.connect(*server.address, SECRET) as c, \
            pytest.raises(RemoteError, match="takes no callbacks"):
        c.call("ask_client", {"n": 1})


def test_errors_travel_as_the_same_kind(server: RpcServer,
                                        caplog: pytest.LogCaptureFixture) -> None:
    with RpcClient.connect(*server.address, SECRET) as c:
        with pytest.raises(NotFoundError) as nf:
            c.call("fail", {"kind": "notfound"})
        assert str(nf.value) == "no such generation 'g7': list them with 'sdbackup ls'"
        assert nf.value.exit_code == EXIT_NOT_FOUND

        with pytest.raises(QuotaError) as q:
            c.call("fail", {"kind": "quota"})
        assert str(q.value) == "user ann is over quota (42 bytes)"
        assert q.value.exit_code == 6

        with pytest.raises(FsError) as fs:
            c.call("fail", {"kind": "fs"})
        assert fs.value.errno == errno.ENOENT and fs.value.what == "/dir/file"

        with pytest.raises(FsError) as os_err:
            c.call("fail", {"kind": "os"})
        assert os_err.value.errno == errno.EACCES and "/secret" in os_err.value.what

        with caplog.at_level(logging.ERROR, logger=LOGGER):
            with pytest.raises(RemoteError, match="ValueError: internal oops"):
                c.call("fail", {"kind": "bug"})
            rec = [r for r in caplog.records if "'fail'" in r.getMessage()]
            assert rec and rec[0].exc_info is not None  # logged with its traceback

            with pytest.raises(RemoteError, match="not plain JSON"):
                c.call("fail", {"kind": "nojson"})

        with pytest.raises(RemoteError, match="unknown method 'nope'"):
            c.call("nope")
        # The connection survived all of it.
        assert c.call("echo", {"a": 1}) == ({"a": 1}, None)


def test_call_timeout_keeps_the_connection(server: RpcServer) -> None:
    with RpcClient.connect(*server.address, SECRET) as c:
        with pytest.raises(RpcTimeout):
            c.call("sleep", {"s": 0.3}, timeout=0.05)
        assert c.call("echo", {"b": 2}) == ({"b": 2}, None)  # the late answer is dropped


def test_connect_pair_runs_the_same_protocol(state: State) -> None:
    def callback(method: str, args: A, blob: B) -> HandlerResult:
        return {"cb": args["n"]}, blob

    c = connect_pair(lambda conn: Handler(conn, state), SECRET, callback)
    with c:
        assert c.call("echo", {"p": 1}, b"z" * 100_000) == ({"p": 1}, b"z" * 100_000)
        assert c.call("ask_client", {"n": 3}, b"q") == ({"client_said": {"cb": 3}}, b"q")
    assert wait_for(lambda: len(state.disconnected) == 1)


def test_on_disconnect_after_client_close(server: RpcServer, state: State) -> None:
    c = RpcClient.connect(*server.address, SECRET)
    c.call("echo")
    c.close()
    assert wait_for(lambda: len(state.disconnected) == 1)
    assert wait_for(lambda: server.connections() == [])
    with pytest.raises(ConnectionLost):
        c.call("echo")


def test_load_secret(tmp_path: Any) -> None:
    p = tmp_path / "secret"
    p.write_bytes(SECRET + b"\n")
    assert load_secret(p) == SECRET
    p.write_bytes(b"short\n")
    with pytest.raises(SdbError, match="is not a cluster secret"):
        load_secret(p)
    with pytest.raises(SdbError, match="does not exist"):
        load_secret(tmp_path / "missing")


# -- faults ---------------------------------------------------------------------------


def test_wrong_secret_is_refused_and_logged(server: RpcServer,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with pytest.raises(RemoteError) as e:
            RpcClient.connect(*server.address, WRONG, name="intruder")
        assert str(e.value).startswith(
            "authentication failed: the cluster secret does not match; copy "
            "CLUSTER_DIR/secret")
        assert AUTH_FAILED_MESSAGE in str(e.value)
        assert wait_for(lambda: logged(caplog, "authentication failed from 127.0.0.1:",
                                       "intruder"))
    still_serves(server)


def test_garbage_bytes_close_that_connection_only(server: RpcServer,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    with RpcClient.connect(*server.address, SECRET) as good, \
            caplog.at_level(logging.WARNING, logger=LOGGER):
        for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(4096)):
            s = socket.create_connection(server.address)
            s.sendall(junk)
            assert read_until_closed(s) == b""
            s.close()
        assert wait_for(lambda: logged(caplog, "127.0.0.1:", "not an sdbackup peer"))
        assert good.call("echo", {"still": True}) == ({"still": True}, None)


def test_frame_cut_off_midway(server: RpcServer, state: State,
                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        # Before authentication: half a HELLO, then close.
        s = socket.create_connection(server.address)
        s.sendall(pack_header(FrameType.HELLO, 0, 0, 100, 0)[:20])
        s.close()
        # After authentication: half a request with a blob, then close.
        stream = raw_authenticated(server)
        frame = stream.signed_frame(FrameType.REQUEST, 1, {"method": "echo"}, b"x" * 5000)
        stream.send_bytes(frame[: len(frame) // 2])
        stream.close()
        assert wait_for(lambda: logged(caplog, "in the middle of a frame", "blob"))
        assert wait_for(lambda: len(state.disconnected) == 1)
    still_serves(server)


def test_oversized_length_fields(server: RpcServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        # Unauthenticated: a HELLO claiming 1 MiB of JSON.
        s = socket.create_connection(server.address)
        s.sendall(pack_header(FrameType.HELLO, 0, 0, 1 << 20, 0) + ZERO_MAC)
        assert read_until_closed(s) == b""
        s.close()
        # Authenticated: JSON and blob lengths just beyond the limits (never allocated).
        for jlen, blen, flags in ((MAX_JSON + 1, 0, 0), (10, MAX_BLOB + 1, 1),
                                  (0xFFFFFFFF, 0xFFFFFFFF, 1), (0, 5, 0)):
            stream = raw_authenticated(server)
            stream.send_bytes(pack_header(FrameType.REQUEST, flags, 1, jlen, blen) + ZERO_MAC)
            assert read_until_closed(stream.sock) == b""
            stream.close()
        assert wait_for(lambda: logged(caplog, "announced a frame body of 16777217 bytes"))
        assert wait_for(lambda: logged(caplog, "announced a blob of 67108865 bytes"))
    still_serves(server)


def test_unknown_protocol_version(server: RpcServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s = socket.create_connection(server.address)
        # A future client: its own header layout after the stable 6-byte prefix.
        s.sendall(MAGIC + struct.pack(">H", 99) + b"\x10\x00future-hello-of-any-length")
        reply = read_until_closed(s)
        s.close()
        _, version, ftype, _, rid, jlen, blen, _ = HEADER.unpack(reply[:HEADER.size])
        assert (version, ftype, rid, blen) == (PROTOCOL_VERSION, FrameType.ERROR, 0, 0)
        message = reply[HEADER.size:HEADER.size + jlen].decode()
        assert "protocol version 99" in message and f"version {PROTOCOL_VERSION}" in message
        assert wait_for(lambda: logged(caplog, "refused connection: 127.0.0.1:",
                                       f"version 99, we speak version {PROTOCOL_VERSION}"))
    still_serves(server)


def test_client_refuses_a_server_of_another_version() -> None:
    listener = socket.create_server(("127.0.0.1", 0))

    def fake_server() -> None:
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(MAGIC + struct.pack(">H", PROTOCOL_VERSION + 1) + bytes(34))
        conn.recv(4096)
        conn.close()

    t = threading.Thread(target=fake_server)
    t.start()
    with pytest.raises(ProtocolError,
                       match=f"speaks sdbackup protocol version {PROTOCOL_VERSION + 1}, this "
                             f"program speaks version {PROTOCOL_VERSION}"):
        host, port = listener.getsockname()[:2]
        RpcClient.connect(host, port, SECRET, timeout=5)
    t.join()
    listener.close()


def test_bad_mac_closes_the_connection(server: RpcServer, state: State,
                                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        stream = raw_authenticated(server)
        stream.end_handshake()
        # The helper makes valid frames: one goes through...
        stream.send_bytes(stream.signed_frame(FrameType.REQUEST, 1, {"method": "echo",
                                                                     "args": {"v": 1}}))
        answer = stream.recv()
        assert (answer.type, answer.request_id, answer.body) == (FrameType.RESPONSE, 1,
                                                                 {"v": 1})
        # ...and the next one, with one byte flipped in flight, is rejected.
        frame = bytearray(stream.signed_frame(FrameType.REQUEST, 2, {"method": "echo",
                                                                     "args": {"v": 2}},
                                              b"block data"))
        frame[-3] ^= 0x01
        stream.send_bytes(bytes(frame))
        assert read_until_closed(stream.sock) == b""
        stream.close()
        assert wait_for(lambda: logged(caplog, "failed authentication (bad MAC)"))
        assert wait_for(lambda: len(state.disconnected) == 1)
    still_serves(server)


def test_replayed_frame_is_rejected(server: RpcServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        stream = raw_authenticated(server)
        stream.end_handshake()
        frame = stream.signed_frame(FrameType.REQUEST, 1, {"method": "echo"})
        stream.send_bytes(frame)
        assert stream.recv().type is FrameType.RESPONSE
        stream.send_bytes(frame)  # same bytes again: the implicit counter moved on
        assert read_until_closed(stream.sock) == b""
        stream.close()
        assert wait_for(lambda: logged(caplog, "bad MAC"))


def test_unauthenticated_request_is_refused(server: RpcServer,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s = socket.create_connection(server.address)
        s.sendall(pack_header(FrameType.REQUEST, 0, 1, 2, 0) + ZERO_MAC + b"{}")
        assert read_until_closed(s) == b""
        s.close()
        assert wait_for(lambda: logged(caplog, "before authenticating"))
    still_serves(server)


def test_handshake_timeout_drops_silent_and_slow_peers(
        state: State, caplog: pytest.LogCaptureFixture) -> None:
    srv = make_server(state, handshake_timeout=0.4)
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            silent = socket.create_connection(srv.address)
            slow = socket.create_connection(srv.address)
            t0 = time.monotonic()
            hello = pack_header(FrameType.HELLO, 0, 0, 200, 0) + ZERO_MAC
            for i in range(6):  # slowloris: one byte every 0.1 s would take 24 s
                try:
                    slow.sendall(hello[i:i + 1])
                except OSError:
                    break
                time.sleep(0.1)
            assert read_until_closed(silent) == b""
            assert read_until_closed(slow) == b""
            assert time.monotonic() - t0 < 3
            silent.close()
            slow.close()
            assert wait_for(lambda: logged(caplog, "handshake timeout"))
        still_serves(srv)
    finally:
        srv.stop()


def test_client_handshake_timeout() -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (backlog), never answers
    host, port = listener.getsockname()[:2]
    t0 = time.monotonic()
    with pytest.raises(ConnectionLost, match="handshake timeout"):
        RpcClient.connect(host, port, SECRET, timeout=0.3)
    assert time.monotonic() - t0 < 2
    listener.close()


def test_server_stop_with_connected_clients(state: State) -> None:
    srv = make_server(state)
    lost: list[RemoteError] = []
    clients = [RpcClient.connect(*srv.address, SECRET, on_lost=lost.append) for _ in range(3)]
    for c in clients:
        c.call("echo")
    errors: list[BaseException] = []

    def pending() -> None:
        try:
            clients[0].call("wait_closed")
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=pending)
    t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 3
    t.join(5)
    assert len(errors) == 1 and isinstance(errors[0], ConnectionLost)
    assert "shutting down" in str(errors[0])
    assert wait_for(lambda: len(lost) == 3)
    assert wait_for(lambda: len(state.disconnected) == 3)
    for c in clients:
        with pytest.raises(ConnectionLost):
            c.call("echo")
        c.close()
    assert not [th for th in threading.enumerate()
                if th.name.startswith(("sdb-rpc-server", "sdb-rpc-conn", "sdb-rpc-accept"))]
    with pytest.raises(RemoteError, match="cannot connect"):
        RpcClient.connect(*srv.address, SECRET, timeout=1)


def test_client_sees_connection_loss(server: RpcServer, state: State) -> None:
    lost: list[RemoteError] = []
    c = RpcClient.connect(*server.address, SECRET, on_lost=lost.append)
    errors: list[BaseException] = []

    def pending() -> None:
        try:
            c.call("block")
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=pending)
    t.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    with pytest.raises(ConnectionLost):
        c.call("drop")  # the server closes the connection without a word
    t.join(5)
    assert time.monotonic() - t0 < 1
    assert len(errors) == 1 and isinstance(errors[0], ConnectionLost)
    assert wait_for(lambda: len(lost) == 1)
    assert isinstance(lost[0], RemoteError)
    assert c.closed
    with pytest.raises(ConnectionLost):
        c.call("echo")
    c.close()
    state.release.set()
    time.sleep(0.05)
    assert len(lost) == 1  # exactly once


def test_too_many_queued_requests_close_the_connection(
        state: State, caplog: pytest.LogCaptureFixture) -> None:
    srv = make_server(state, max_workers=1, max_queued=2)
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            c = RpcClient.connect(*srv.address, SECRET)
            errors: list[BaseException] = []

            def blocked_call() -> None:
                try:
                    c.call("block")
                except BaseException as e:
                    errors.append(e)

            # 1 running + 2 queued are fine; the 4th request is one too many.
            threads = [threading.Thread(target=blocked_call) for _ in range(4)]
            for t in threads:
                t.start()
            assert wait_for(lambda: c.closed)
            assert wait_for(lambda: logged(caplog, "more than 2 request messages queued"))
            state.release.set()
            for t in threads:
                t.join(5)
            assert len(errors) == 4 and all(isinstance(e, ConnectionLost) for e in errors)
            c.close()
        still_serves(srv)
    finally:
        state.release.set()
        srv.stop()


def test_notifications_are_handled_in_order_even_after_close(
        server: RpcServer, state: State) -> None:
    c = RpcClient.connect(*server.address, SECRET)
    for i in range(300):
        c.notify("note", {"i": i})
    c.close()  # everything sent before the close is still handled, in order
    assert wait_for(lambda: len(state.disconnected) == 1)
    assert [n["i"] for n in state.notes] == list(range(300))
