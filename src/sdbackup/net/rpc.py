"""Thread-based, bidirectional RPC over authenticated frames.

The coordinator runs an :class:`RpcServer` (one thread per connection, which reads
frames, plus a small elastic pool of worker threads per connection that run the
handler); a node agent holds an :class:`RpcClient` (one reader thread plus a worker
pool for callbacks). Blocking sockets and threads are deliberate: simple to reason
about, handlers stay ordinary blocking code, and the GIL is released for every socket
operation and for hashing large blobs (measured: ~60 us per small round trip on
loopback, see the commit that added this module).

Both directions are symmetric once connected: each side may ``call`` (REQUEST, wait
for RESPONSE/ERROR with the same request id) and ``notify`` (one-way). Requests are
multiplexed by request id, so any number of threads may call concurrently, and the
server may call the client back (recall, flush, freeze) while the client's own calls
are in flight; a callback may call the server again.

Guarantees:

* a response is delivered to exactly the caller that sent the request; a response
  that arrives after its caller timed out is dropped;
* when the connection ends, every pending call raises :class:`ConnectionLost`
  (a :class:`RemoteError`) at once, later calls raise it immediately, and then
  ``on_lost`` (client) or ``Handler.on_disconnect`` (server) runs exactly once --
  on the server, only after every handler call of that connection has returned;
* handler errors travel to the caller: an :class:`SdbError` is raised there as the
  same class (by name) with the same message and exit code, an ``OSError`` with an
  errno as :class:`FsError` with that errno, anything else as :class:`RemoteError`
  (and is logged with its traceback on the side where it happened);
* requests from one peer run concurrently (up to ``max_workers`` handler threads per
  connection, more are queued); notifications from one peer run one at a time in the
  order sent, and every notification received in full is handled even if the
  connection ends right after it. There is no order between a notification and a
  later request: if a request must see a notification's effect, make it a call;
* a malformed, oversized, unauthenticated or forged frame closes that one connection
  (logged with the peer address); the server keeps serving the others; a handshake
  that does not finish within ``handshake_timeout`` is dropped.

Nested calls hold threads: a handler that calls the peer back, whose callback calls
this side again, uses two workers here. With every worker of a connection blocked
that way, new requests queue and the calls end only at their timeouts; give such
calls a timeout, and keep ``max_workers`` above the nesting you use.

Developer note -- steps that must stay adjacent:

* ``Connection.call``: checking ``_closed`` and registering the waiter happen under
  ``_lock`` in one block, and the reader marks the connection closed and takes the
  whole pending table in one block under the same lock. Split either, and a call can
  register after the final sweep and wait forever.
* the waiter is registered *before* the request is sent: the response can arrive
  before ``send`` returns.
* the reader never blocks on anything but the socket (it queues requests, never runs
  them): a handler that calls the peer back waits for a response that only this reader
  can deliver. That is also why an over-full request queue closes the connection
  instead of making the reader wait.
"""

from __future__ import annotations

import collections
import errno as _errno
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeAlias

import sdbackup.errors as _errors
from sdbackup.errors import BusyError, FsError, RemoteError, SdbError, UsageError
from sdbackup.net.auth import (
    HANDSHAKE_TIMEOUT,
    AuthenticationFailed,
    check_secret,
    client_handshake,
    server_handshake,
)
from sdbackup.net.protocol import (
    Blob,
    ConnectionLost,
    Frame,
    FrameStream,
    FrameType,
    ProtocolError,
    VersionMismatch,
)

log = logging.getLogger("sdbackup.cluster")

Args: TypeAlias = dict[str, Any]
Result: TypeAlias = tuple[dict[str, Any], bytes | None]
HandlerResult: TypeAlias = dict[str, Any] | tuple[dict[str, Any], Blob | None] | None
"""What a handler returns: a result dict, (dict, blob), or None for {}."""
CallbackHandler: TypeAlias = Callable[[str, Args, bytes | None], HandlerResult]

MAX_METHOD = 128
QUEUED_BYTES_PER_CONNECTION = 256 << 20  # request blobs waiting for a worker, per peer
QUEUED_BYTES_TOTAL = 1 << 30  # and over all connections of this process
_queued_total = 0
_queued_lock = threading.Lock()
SOCKET_BUFFER = 4 << 20
"""Requested SO_SNDBUF/SO_RCVBUF for socketpairs (TCP keeps kernel autotuning)."""
SEND_TIMEOUT = 60.0
"""A peer that reads nothing for this long while we send is considered dead."""
WORKER_IDLE_EXIT = 30.0


class RpcTimeout(RemoteError):
    """A call got no answer within its timeout (the connection stays open)."""


class ConnectFailed(RemoteError):
    """No connection could be opened (nothing listening, host unreachable)."""


# -- errors on the wire -------------------------------------------------------------

_error_classes: dict[str, type[SdbError]] = {}


def register_error(cls: type[SdbError]) -> type[SdbError]:
    """Make an SdbError subclass travel by name (decorator). sdbackup.errors is built in."""
    _error_classes[cls.__name__] = cls
    return cls


for _obj in list(vars(_errors).values()):
    if isinstance(_obj, type) and issubclass(_obj, SdbError):
        register_error(_obj)


def error_to_body(exc: BaseException) -> dict[str, Any]:
    """The ERROR frame body for an exception raised by a handler."""
    if isinstance(exc, SdbError):
        name = type(exc).__name__
        if isinstance(exc, ProtocolError | ConnectionLost | RpcTimeout):
            # The handler's own call to a third party failed: to our caller that is a
            # remote failure, not a problem of its own connection.
            name = "RemoteError"
        return {"kind": "sdb", "type": name, "message": exc.message,
                "exit_code": exc.exit_code}
    if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
        if isinstance(exc, FsError):
            what = exc.what
        else:
            what = exc.strerror or _errno.errorcode.get(exc.errno, "")
            if exc.filename is not None:
                what = f"{what}: {exc.filename}"
        return {"kind": "fs", "errno": exc.errno, "what": what}
    return {"kind": "internal", "type": type(exc).__name__, "message": str(exc)[:4000]}


def error_from_body(body: dict[str, Any], peer: str, method: str) -> Exception:
    """Rebuild the exception described by an ERROR frame body."""
    kind = body.get("kind")
    exc: Exception
    if kind == "fs" and isinstance(body.get("errno"), int):
        what = body.get("what")
        exc = FsError(body["errno"], what if isinstance(what, str) else "")
    elif kind == "sdb":
        message = str(body.get("message", ""))
        code = body.get("exit_code")
        cls = _error_classes.get(str(body.get("type")), SdbError)
        exc = cls.__new__(cls)  # subclasses may have other __init__ signatures
        SdbError.__init__(exc, message, code if isinstance(code, int) else None)
    else:
        exc = RemoteError(f"{peer} failed on {method}: {body.get('type', 'error')}: "
                          f"{body.get('message', '')}")
    exc.add_note(f"(raised by {peer} in {method!r})")
    return exc


# -- handlers -----------------------------------------------------------------------


class Handler(Protocol):
    """What a server runs for one connection (made by the handler factory)."""

    def handle(self, conn: Connection, method: str, args: Args,
               blob: bytes | None) -> HandlerResult: ...

    def on_disconnect(self, conn: Connection) -> None: ...


HandlerFactory: TypeAlias = Callable[["Connection"], Handler]


class BaseHandler:
    """Dispatches ``method`` to ``self.rpc_<method>(conn, args, blob)``."""

    def handle(self, conn: Connection, method: str, args: Args,
               blob: bytes | None) -> HandlerResult:
        fn = getattr(self, "rpc_" + method, None) if method.isidentifier() else None
        if fn is None:
            raise RemoteError(f"{conn.peer} asked for unknown method {method!r}; "
                              "is this the same sdbackup release on both sides?")
        result: HandlerResult = fn(conn, args, blob)
        return result

    def on_disconnect(self, conn: Connection) -> None:
        pass


class _CallbackAdapter:
    def __init__(self, fn: CallbackHandler | None) -> None:
        self.fn = fn

    def handle(self, conn: Connection, method: str, args: Args,
               blob: bytes | None) -> HandlerResult:
        if self.fn is None:
            raise RemoteError(f"this client takes no callbacks (got {method!r})")
        return self.fn(method, args, blob)

    def on_disconnect(self, conn: Connection) -> None:
        pass


def _normalize(result: object) -> tuple[dict[str, Any], Blob | None]:
    if result is None:
        return {}, None
    if isinstance(result, dict):
        return result, None
    if (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], dict)
            and (result[1] is None or isinstance(result[1], bytes | bytearray | memoryview))):
        return result[0], result[1]
    raise TypeError(f"handler returned {type(result).__name__}; expected a dict, "
                    "(dict, blob) or None")


# -- worker pool --------------------------------------------------------------------


class _Workers:
    """An elastic pool: threads start on demand (up to max), exit when idle.

    ``submit`` never blocks (the reader must not); it refuses when the queue is full.
    """

    def __init__(self, name: str, max_workers: int, max_queued: int) -> None:
        self._name = name
        self._max_workers = max_workers
        self._max_queued = max_queued
        self._cond = threading.Condition()
        self._queue: deque[Callable[[], None]] = deque()
        self._threads: set[threading.Thread] = set()
        self._idle = 0
        self._closed = False

    def submit(self, fn: Callable[[], None]) -> bool:
        with self._cond:
            if self._closed or len(self._queue) >= self._max_queued:
                return False
            self._queue.append(fn)
            if len(self._queue) > self._idle and len(self._threads) < self._max_workers:
                t = threading.Thread(target=self._run, daemon=True,
                                     name=f"{self._name}-w{len(self._threads)}")
                self._threads.add(t)
                t.start()
            else:
                self._cond.notify()
        return True

    def _run(self) -> None:
        # A thread leaves ``_threads`` in the same lock hold in which it sees the queue
        # empty and decides to exit; otherwise ``submit`` could count it as a live worker
        # and leave a new item with no thread to run it.
        me = threading.current_thread()
        try:
            while True:
                with self._cond:
                    while not self._queue:
                        if not self._closed:
                            self._idle += 1
                            try:
                                woken = self._cond.wait(WORKER_IDLE_EXIT)
                            finally:
                                self._idle -= 1
                            if woken or self._queue:
                                continue
                        self._threads.discard(me)
                        self._cond.notify_all()
                        return
                    fn = self._queue.popleft()
                try:
                    fn()
                except Exception:  # handlers report their own errors: this is a bug
                    log.exception("RPC worker job failed")
        except BaseException:
            with self._cond:
                self._threads.discard(me)
                self._cond.notify_all()
            raise

    def drop_queued(self) -> list[Callable[[], None]]:
        """Drop every job not started yet (without waiting for the running ones)."""
        with self._cond:
            dropped = list(self._queue)
            self._queue.clear()
            return dropped

    def is_worker(self) -> bool:
        with self._cond:
            return threading.current_thread() in self._threads

    @property
    def max_queued(self) -> int:
        return self._max_queued

    def close(self, *, drain: bool, timeout: float | None = None) -> bool:
        """Stop taking work; run (drain) or drop what is queued; wait for the threads.

        Returns False if work was still running at ``timeout``.
        """
        me = threading.current_thread()
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._closed = True
            if not drain:
                self._queue.clear()
            elif self._queue and not self._threads:
                t = threading.Thread(target=self._run, daemon=True, name=f"{self._name}-w0")
                self._threads.add(t)
                t.start()
            self._cond.notify_all()
            while self._threads - {me}:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True


# -- one connection -----------------------------------------------------------------


class _Waiter:
    __slots__ = ("blob", "body", "error", "event", "method")

    def __init__(self, method: str) -> None:
        self.method = method
        self.event = threading.Event()
        self.body: dict[str, Any] = {}
        self.blob: bytes | None = None
        self.error: Exception | None = None


def _check_method(method: str) -> None:
    if not isinstance(method, str) or not method or len(method) > MAX_METHOD:
        raise TypeError(f"invalid method name {method!r}")


class Connection:
    """One authenticated connection, either end; calls go both ways.

    Made by :class:`RpcServer` (server side) and :class:`RpcClient` (client side);
    not constructed by users. ``peer`` is "host:port" (or "socketpair");
    ``peer_name`` is the name the client announced, if any.
    """

    def __init__(self, stream: FrameStream, peer_name: str | None, *, side: str,
                 max_workers: int = 16, max_queued: int = 10000) -> None:
        self.peer = stream.peer
        self.peer_name = peer_name
        self.side = side
        self.handler: Handler | None = None
        self._stream = stream
        self._lock = threading.Lock()
        self._pending: dict[int, _Waiter] = {}
        self._next_id = 1
        self._closed = False
        self._closing_reason: str | None = None
        self._peer_reason: str | None = None
        self._workers = _Workers(f"sdb-rpc-{side}", max_workers, max_queued)
        self._notify_lane = _Workers(f"sdb-rpc-{side}-notify", 1, max_queued)
        self._queued_bytes = 0  # blobs of requests not yet handled (see _dispatch)
        self._reader: threading.Thread | None = None
        self._done = threading.Event()
        self._on_end: list[Callable[[RemoteError | None], None]] = []
        self._warned = False

    def __repr__(self) -> str:
        who = f"{self.peer} ({self.peer_name})" if self.peer_name else self.peer
        return f"<Connection {self.side} {who}{' closed' if self._closed else ''}>"

    @property
    def closed(self) -> bool:
        return self._closed

    # -- calls out ----------------------------------------------------------------

    def call(self, method: str, args: Args | None = None, blob: Blob | None = None,
             timeout: float | None = None) -> Result:
        """Call ``method`` on the peer; return (result dict, blob or None).

        Thread-safe. Raises what the peer's handler raised (see module doc),
        :class:`RpcTimeout` after ``timeout`` seconds (None: wait until the answer or
        the end of the connection), :class:`ConnectionLost` if the connection ends.
        """
        _check_method(method)
        if self._closed:
            raise self._lost_error(method)
        if threading.current_thread() is self._reader:
            raise RuntimeError("Connection.call from the connection's reader thread would "
                               "deadlock (on_lost/on_disconnect/handler factory); use a "
                               "worker thread")
        waiter = _Waiter(method)
        with self._lock:
            if self._closed:
                raise self._lost_error(method)
            rid = self._next_id
            self._next_id += 1
            self._pending[rid] = waiter
        try:
            self._stream.send(FrameType.REQUEST, rid, {"method": method, "args": args or {}},
                              blob)
        except BaseException:
            with self._lock:
                self._pending.pop(rid, None)
            raise
        if not waiter.event.wait(timeout):
            with self._lock:
                self._pending.pop(rid, None)
            if not waiter.event.is_set():
                raise RpcTimeout(f"{self.peer} did not answer {method!r} within {timeout} s")
        if waiter.error is not None:
            raise waiter.error
        return waiter.body, waiter.blob

    def notify(self, method: str, args: Args | None = None, blob: Blob | None = None) -> None:
        """Send a one-way message; returns once it is handed to the kernel."""
        _check_method(method)
        if self._closed:
            raise self._lost_error(method)
        self._stream.send(FrameType.NOTIFY, 0, {"method": method, "args": args or {}}, blob)

    def _lost_error(self, method: str | None = None) -> ConnectionLost:
        why = self._closing_reason or self._peer_reason or "connection lost"
        what = f" ({method!r} not answered)" if method else ""
        return ConnectionLost(f"connection to {self.peer} ended{what}: {why}")

    # -- reading ------------------------------------------------------------------

    def _start_reader(self) -> None:
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name=f"sdb-rpc-{self.side}-reader")
        self._reader.start()

    def _read_loop(self) -> None:
        """Read frames until the connection ends, then clean up (runs once)."""
        self._reader = threading.current_thread()
        error: RemoteError | None = None
        try:
            while True:
                self._dispatch(self._stream.recv())
        except ConnectionLost as e:
            if not self._closing_reason:
                self._peer_reason = self._peer_reason or str(e)
                error = self._lost_error()
        except ProtocolError as e:
            log.warning("closing connection %s: %s", self.peer, e)
            self._warned = True
            self._peer_reason = str(e)
            error = self._lost_error()
        except Exception as e:
            log.exception("reader of connection %s failed", self.peer)
            self._warned = True
            self._peer_reason = f"internal error: {e}"
            error = self._lost_error()
        finally:
            self._finish(error)

    def _dispatch(self, frame: Frame) -> None:
        ftype = frame.type
        if ftype is FrameType.RESPONSE or ftype is FrameType.ERROR:
            if frame.request_id == 0 and ftype is FrameType.ERROR:
                msg = frame.body.get("message")
                self._peer_reason = f"closed by the peer: {msg}" if msg else None
                return
            with self._lock:
                waiter = self._pending.pop(frame.request_id, None)
            if waiter is None:
                log.debug("late or unknown answer %d from %s dropped", frame.request_id,
                          self.peer)
                return
            if ftype is FrameType.RESPONSE:
                waiter.body, waiter.blob = frame.body, frame.blob
            else:
                waiter.error = error_from_body(frame.body, self.peer, waiter.method)
            waiter.event.set()
        elif ftype is FrameType.REQUEST or ftype is FrameType.NOTIFY:
            method, args = frame.body.get("method"), frame.body.get("args", {})
            if not isinstance(method, str) or not method or len(method) > MAX_METHOD \
                    or not isinstance(args, dict):
                raise ProtocolError(f"{self.peer} sent a {ftype.name} without a valid "
                                    "method name and args object")
            if ftype is FrameType.REQUEST and frame.request_id == 0:
                raise ProtocolError(f"{self.peer} sent a REQUEST with request id 0")
            rid, blob = frame.request_id, frame.blob
            size = (len(blob) if blob else 0) + frame.json_len
            self._reserve_bytes(size)

            def job() -> None:
                try:
                    self._serve(ftype, rid, method, args, blob)
                finally:  # the budget counts a request until it was handled
                    self._release_bytes(size)

            job.size = size  # type: ignore[attr-defined]  # released if it is dropped

            pool = self._workers if ftype is FrameType.REQUEST else self._notify_lane
            if not pool.submit(job):
                self._release_bytes(size)
                raise ProtocolError(f"{self.peer} has more than {pool.max_queued} "
                                    f"{ftype.name.lower()} messages queued; closing the "
                                    "connection")
        else:
            raise ProtocolError(f"unexpected {ftype.name} frame from {self.peer} after the "
                                "handshake")

    def _reserve_bytes(self, n: int) -> None:
        """Count a queued request's blob against this connection's budget and the
        process's; a peer that would exceed either loses its connection (a real node
        queues a few MiB at most)."""
        global _queued_total
        if not n:
            return
        with _queued_lock:
            if self._queued_bytes + n > QUEUED_BYTES_PER_CONNECTION:
                raise ProtocolError(f"{self.peer} has more than "
                                    f"{QUEUED_BYTES_PER_CONNECTION >> 20} MiB of requests "
                                    "queued; closing the connection")
            if _queued_total + n > QUEUED_BYTES_TOTAL:
                raise ProtocolError(f"more than {QUEUED_BYTES_TOTAL >> 20} MiB of requests "
                                    f"are queued in all; closing the connection of {self.peer}")
            self._queued_bytes += n
            _queued_total += n

    def _release_bytes(self, n: int) -> None:
        global _queued_total
        if n:
            with _queued_lock:
                self._queued_bytes -= n
                _queued_total -= n

    def _serve(self, ftype: FrameType, rid: int, method: str, args: Args,
               blob: bytes | None) -> None:
        """Run the handler for one request or notification (on a worker thread)."""
        exc: Exception
        try:
            if self.handler is None:
                raise RemoteError("connection is not ready")
            body, out_blob = _normalize(self.handler.handle(self, method, args, blob))
        except Exception as e:
            exc = e
        else:
            if ftype is not FrameType.REQUEST:
                return
            try:
                self._stream.send(FrameType.RESPONSE, rid, body, out_blob)
                return
            except ConnectionLost:
                return  # the answer has nowhere to go; the caller sees the loss
            except (ProtocolError, TypeError) as e:  # not JSON, or beyond the limits
                exc = e
        expected = isinstance(exc, SdbError) or (isinstance(exc, OSError) and exc.errno)
        if not expected:
            log.error("%s %r from %s failed", ftype.name.lower(), method, self.peer,
                      exc_info=exc)
        if ftype is not FrameType.REQUEST:
            if expected:
                log.warning("notify %r from %s failed: %s", method, self.peer, exc)
            return
        try:
            self._stream.send(FrameType.ERROR, rid, error_to_body(exc))
        except ConnectionLost:
            pass

    def _finish(self, error: RemoteError | None) -> None:
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, {}
        for waiter in pending.values():
            waiter.error = self._lost_error(waiter.method)
            waiter.event.set()
        self._stream.close()
        # Wait for running handlers (on_disconnect comes after them). Requests not yet
        # started are dropped: their callers already got ConnectionLost. Notifications
        # received in full are still handled: they have no caller to tell.
        dropped = self._workers.drop_queued()  # they leave the budget at once
        self._release_bytes(sum(getattr(j, "size", 0) for j in dropped))
        self._workers.close(drain=False)
        self._notify_lane.close(drain=True)
        try:
            for fn in self._on_end:
                try:
                    fn(error)
                except Exception:
                    log.exception("disconnect hook of %s failed", self.peer)
        finally:
            self._done.set()

    # -- closing ------------------------------------------------------------------

    def close(self, reason: str | None = None, timeout: float | None = 10.0) -> None:
        """Close the connection; with ``reason``, tell the peer why first (best effort).

        Pending calls (both ways) end with ConnectionLost. Waits up to ``timeout`` for
        the reader and handler threads, unless called from one of them.
        """
        with self._lock:
            first = not self._closing_reason and not self._closed
            if first:
                self._closing_reason = reason or "closed by this side"
        if first and reason:
            try:
                self._stream.send(FrameType.ERROR, 0, {"message": reason[:1000]},
                                  lock_timeout=0.2)
            except RemoteError:
                pass
        self._stream.shutdown()
        if self._reader is None:  # never started (handshake-time failure)
            self._stream.close()
            return
        if (threading.current_thread() is not self._reader and not self._workers.is_worker()
                and not self._notify_lane.is_worker()):
            self._done.wait(timeout)

    def wait_closed(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


# -- sockets ------------------------------------------------------------------------


def _format_addr(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr) or "socketpair"


def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY, keepalive, buffers and a send timeout (see module constants).

    For TCP the buffer sizes are left to the kernel: setting SO_RCVBUF switches off
    Linux receive-buffer autotuning (which grows to tcp_rmem[2], often beyond
    net.core.rmem_max), and measured slower on loopback. Unix socketpairs have no
    autotuning, so they get SOCKET_BUFFER.
    """
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # A dead peer host is noticed after about 10 + 3 * 5 s of silence.
        for opt_name, val in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
            opt: int | None = getattr(socket, opt_name, None)
            if opt is not None:
                sock.setsockopt(socket.IPPROTO_TCP, opt, val)
    else:
        for buf_opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, buf_opt, SOCKET_BUFFER)
            except OSError:
                pass
    _set_send_timeout(sock, SEND_TIMEOUT)


def _set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """Kernel-level SO_SNDTIMEO: a blocked sendmsg fails instead of hanging forever.

    (Python's own socket timeout would apply to the reader's recv too, and an idle
    connection is fine.)
    """
    import struct

    sec = int(seconds)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", sec, int((seconds - sec) * 1e6)))
    except OSError:
        pass


# -- server -------------------------------------------------------------------------


class RpcServer:
    """Accepts authenticated connections and runs a handler per connection.

    ``handler_factory(conn)`` is called once per connection after the handshake (on
    that connection's thread, before any request is read; it must not ``conn.call``)
    and returns the :class:`Handler` for it.
    """

    def __init__(self, handler_factory: HandlerFactory, secret: bytes,
                 host: str = "127.0.0.1", port: int = 0, *,
                 name: str = "coordinator",
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 max_connections: int = 1024, max_handshakes: int = 64,
                 max_workers: int = 16, max_queued: int = 10000) -> None:
        self._factory = handler_factory
        self._secret = check_secret(secret)
        self._host, self._port = host, port
        self.name = name
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.max_handshakes = max_handshakes
        self.max_workers = max_workers
        self.max_queued = max_queued
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        # Handshakes in progress, oldest first: when they fill up, the oldest goes.
        self._handshaking: dict[FrameStream, float] = {}
        self._conns: set[Connection] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = False
        self._address: tuple[str, int] | None = None

    def __enter__(self) -> RpcServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound (port 0 resolved); valid after start()."""
        if self._address is None:
            raise RuntimeError("RpcServer.address before start()")
        return self._address

    def connections(self) -> list[Connection]:
        with self._lock:
            return list(self._conns)

    def start(self) -> None:
        """Bind and listen (port 0: any free port, see ``address``), accept in a thread."""
        if self._listener is not None or self._stopping:
            raise RuntimeError("RpcServer.start() called twice")
        try:
            infos = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, _, _, _, sockaddr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(sockaddr)
                sock.listen(128)
            except OSError:
                sock.close()
                raise
        except OSError as e:
            where = f"cannot listen on {self._host}:{self._port}: {e.strerror or e}"
            if e.errno == _errno.EADDRINUSE:
                raise BusyError(f"{where}: another process (another coordinator?) uses "
                                "that port; choose another with --listen") from None
            raise UsageError(f"{where}: give an address of this host with --listen "
                             "HOST:PORT") from None
        host, port = sock.getsockname()[:2]
        self._address = (host, port)
        self._listener = sock
        self._accept_thread = threading.Thread(target=self._accept_loop, args=(sock,),
                                               daemon=True, name="sdb-rpc-accept")
        self._accept_thread.start()
        log.info("%s listening on %s", self.name, _format_addr(self._address))

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, addr = listener.accept()
            except OSError as e:
                if self._stopping:
                    return
                if e.errno in (_errno.EMFILE, _errno.ENFILE, _errno.ENOBUFS, _errno.ENOMEM):
                    log.error("cannot accept connections: %s; retrying", e.strerror)
                    time.sleep(0.1)
                    continue
                if e.errno in (_errno.ECONNABORTED, _errno.EPROTO, _errno.EINTR):
                    continue
                log.error("accept failed: %s; the server stops accepting", e)
                return
            peer = _format_addr(addr)
            evicted: FrameStream | None = None
            with self._lock:
                too_many = len(self._conns) + len(self._handshaking) >= self.max_connections
                if self._stopping or too_many:
                    sock.close()
                    if too_many:
                        log.warning("refused %s: too many connections", peer)
                    continue
                if len(self._handshaking) >= self.max_handshakes:
                    # Unauthenticated connections cannot lock others out: of the address
                    # with the most handshakes in progress, the one that has been at it
                    # longest goes (a real client takes milliseconds; an idle or slow one
                    # would wait for its deadline), so a flood from one address costs
                    # only that address's slots.
                    per_addr = collections.Counter(_host_of(s.peer)
                                                   for s in self._handshaking)
                    worst = per_addr.most_common(1)[0][0]
                    evicted = next(s for s in self._handshaking if _host_of(s.peer) == worst)
                    del self._handshaking[evicted]
                stream = FrameStream(sock, peer)
                t = threading.Thread(target=self._serve_socket, args=(stream,),
                                     daemon=True, name="sdb-rpc-conn")
                self._threads.add(t)
                self._handshaking[stream] = time.monotonic()
            if evicted is not None:
                log.info("dropped the unauthenticated connection from %s: %d handshakes "
                         "at once", evicted.peer, self.max_handshakes)
                evicted.shutdown()
            t.start()

    def _serve_socket(self, stream: FrameStream) -> None:
        me = threading.current_thread()
        try:
            serve_stream(stream, self._factory, self._secret, server_name=self.name,
                         handshake_timeout=self.handshake_timeout,
                         max_workers=self.max_workers, max_queued=self.max_queued,
                         registered=self._register)
        finally:
            with self._lock:
                self._handshaking.pop(stream, None)
                self._threads.discard(me)

    def _register(self, stream: FrameStream, conn: Connection | None) -> bool:
        """Move a stream from handshaking to connected (or drop it: conn None)."""
        with self._lock:
            self._handshaking.pop(stream, None)
            if conn is None:
                return True
            if self._stopping:
                return False
            self._conns.add(conn)
            conn._on_end.append(lambda _e: self._unregister(conn))
            return True

    def _unregister(self, conn: Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, close every connection (telling clients why), join threads."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            started = self._listener is not None
            listener, self._listener = self._listener, None
            streams = list(self._handshaking)
            conns = list(self._conns)
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
            except OSError:
                pass
            listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        for s in streams:
            s.shutdown()
        for c in conns:
            c.close(f"the {self.name} is shutting down", timeout=0)
        end = time.monotonic() + timeout
        for c in conns:
            c.wait_closed(max(0.0, end - time.monotonic()))
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
        alive = [t for t in threads if t.is_alive()]
        if not started:
            return  # never listened: nothing to say
        if alive:
            log.warning("%s stopped with %d connection threads still running (handlers "
                        "that did not return)", self.name, len(alive))
        else:
            log.info("%s stopped", self.name)


def _host_of(peer: str) -> str:
    """The address part of a peer name ("HOST:PORT" or "[V6]:PORT")."""
    return peer.rpartition(":")[0] or peer


def serve_stream(stream: FrameStream, factory: HandlerFactory, secret: bytes, *,
                 server_name: str = "coordinator",
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 max_workers: int = 16, max_queued: int = 10000,
                 registered: Callable[[FrameStream, Connection | None], bool] | None = None,
                 ) -> None:
    """Server side of one connection, on the calling thread: handshake, then read.

    Returns when the connection has ended and ``on_disconnect`` has run.
    """
    peer = stream.peer
    try:
        tune_socket(stream.sock)
        info = server_handshake(stream, secret, server_name=server_name,
                                timeout=handshake_timeout)
    except (AuthenticationFailed, VersionMismatch) as e:
        log.warning("refused connection: %s", e)
        stream.close()
        return
    except RemoteError as e:  # ProtocolError, ConnectionLost (handshake timeout)
        log.warning("dropped connection from %s during the handshake: %s", peer, e)
        stream.close()
        return
    except Exception:
        log.exception("handshake with %s failed", peer)
        stream.close()
        return
    conn = Connection(stream, info.name, side="server", max_workers=max_workers,
                      max_queued=max_queued)
    if registered is not None and not registered(stream, conn):
        stream.close()
        return
    conn._reader = threading.current_thread()
    try:
        handler = factory(conn)
    except Exception as e:
        log.exception("handler factory failed for %s", peer)
        try:
            stream.send(FrameType.ERROR, 0, {"message": f"server error: {e}"[:1000]})
        except RemoteError:
            pass
        conn._finish(None)
        return
    conn.handler = handler

    def disconnected(_error: RemoteError | None) -> None:
        handler.on_disconnect(conn)

    conn._on_end.insert(0, disconnected)
    log.info("connection from %s%s authenticated", peer,
             f" ({info.name})" if info.name else "")
    conn._read_loop()
    if not conn._warned:
        log.info("connection from %s closed: %s", peer,
                 conn._closing_reason or conn._peer_reason or "closed by the peer")


# -- client -------------------------------------------------------------------------


class RpcClient:
    """A node's connection to the coordinator (or any RpcServer).

    ``call`` is thread-safe; server-initiated requests run ``callback_handler(method,
    args, blob)`` on a worker thread (so a callback may call the server). When the
    connection is lost (not by ``close``), pending calls raise ConnectionLost and
    ``on_lost(error)`` runs once, on the reader thread: it should hand reconnection
    to another thread rather than block.
    """

    def __init__(self, conn: Connection, on_lost: Callable[[RemoteError], None] | None,
                 server_name: str | None) -> None:
        self.connection = conn
        self.server_name = server_name
        self._on_lost = on_lost
        self._user_closed = False
        conn._on_end.append(self._ended)

    @classmethod
    def connect(cls, host: str, port: int, secret: bytes,
                callback_handler: CallbackHandler | None = None, *,
                timeout: float = 10.0, on_lost: Callable[[RemoteError], None] | None = None,
                name: str | None = None, max_workers: int = 16) -> RpcClient:
        """Connect and authenticate within ``timeout`` seconds."""
        check_secret(secret)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise ConnectFailed(f"cannot connect to {host}:{port}: {e.strerror or e}; is the "
                              "coordinator running and is the address right?") from None
        return cls._over_socket(sock, _format_addr((host, port)), secret, callback_handler,
                                timeout=timeout, on_lost=on_lost, name=name,
                                max_workers=max_workers)

    @classmethod
    def _over_socket(cls, sock: socket.socket, peer: str, secret: bytes,
                     callback_handler: CallbackHandler | None, *, timeout: float,
                     on_lost: Callable[[RemoteError], None] | None, name: str | None,
                     max_workers: int) -> RpcClient:
        stream = FrameStream(sock, peer)
        try:
            tune_socket(sock)
            info = client_handshake(stream, secret, name=name, timeout=timeout)
        except BaseException:
            stream.close()
            raise
        conn = Connection(stream, info.name, side="client", max_workers=max_workers)
        conn.handler = _CallbackAdapter(callback_handler)
        client = cls(conn, on_lost, info.name)
        conn._start_reader()
        return client

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def peer(self) -> str:
        return self.connection.peer

    @property
    def closed(self) -> bool:
        return self.connection.closed

    def call(self, method: str, args: Args | None = None, blob: Blob | None = None,
             timeout: float | None = None) -> Result:
        """See :meth:`Connection.call`."""
        return self.connection.call(method, args, blob, timeout)

    def notify(self, method: str, args: Args | None = None, blob: Blob | None = None) -> None:
        self.connection.notify(method, args, blob)

    def close(self, timeout: float | None = 10.0) -> None:
        self._user_closed = True
        self.connection.close(timeout=timeout)

    def _ended(self, error: RemoteError | None) -> None:
        if self._user_closed or self._on_lost is None:
            return
        self._on_lost(error or self.connection._lost_error())


def connect_pair(handler_factory: HandlerFactory, secret: bytes,
                 callback_handler: CallbackHandler | None = None, *,
                 on_lost: Callable[[RemoteError], None] | None = None,
                 name: str | None = None, timeout: float = 10.0) -> RpcClient:
    """An in-process client/server pair over ``socket.socketpair()``.

    Runs exactly the same framing, handshake and threads as TCP; the server side runs
    on a daemon thread and ends when the client closes.
    """
    a, b = socket.socketpair()
    stream = FrameStream(b, "socketpair")
    t = threading.Thread(target=serve_stream, args=(stream, handler_factory, secret),
                         kwargs={"handshake_timeout": timeout}, daemon=True,
                         name="sdb-rpc-pair")
    t.start()
    try:
        return RpcClient._over_socket(a, "socketpair", secret, callback_handler,
                                      timeout=timeout, on_lost=on_lost, name=name,
                                      max_workers=16)
    except BaseException:
        stream.shutdown()
        raise
