"""Typed requests (net/messages.py): every request is decoded and checked before a
handler sees it, so a malformed request from a peer is one line of UsageError for that
peer and nothing else.

What is proven:

(a) every request round-trips (to_wire, then decode, gives the same request), and every
    server handles exactly the requests of its set;
(b) to every coordinator method that has fields, over a real connection: each field
    missing, of a wrong type, out of range, a bad name, a list too long or holding a bad
    item -- each answered with one line of UsageError naming the request and the field;
    the connection stays open and keeps working, the coordinator logs no traceback and
    still serves a node that joins afterwards;
(c) the same for a node's control port (its own requests and those it passes on).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdbackup.cluster.coordinator import Coordinator
from sdbackup.cluster.local import DiskSpec, init_cluster
from sdbackup.cluster.node import ClusterClient, NodeAgent, node_control_address
from sdbackup.errors import UsageError
from sdbackup.net import messages as msg
from sdbackup.net.auth import load_secret
from sdbackup.net.rpc import RpcClient

Spec = msg.Spec


# -- values for each kind of field ---------------------------------------------------------

def good(spec: Spec) -> Any:
    """A valid wire value for ``spec``."""
    if isinstance(spec, msg.Int):
        return max(spec.lo, 0) if spec.lo <= 0 <= spec.hi else spec.lo
    if isinstance(spec, msg.Float):
        return spec.lo
    if isinstance(spec, msg.Bool):
        return False
    if isinstance(spec, msg.Text):
        return "x" * max(spec.min_len, 1)
    if isinstance(spec, msg.Choice):
        return spec.values[0]
    if isinstance(spec, msg.NameSpec):
        return "a\xff"
    if isinstance(spec, msg.Opt):
        return None
    if isinstance(spec, msg.ListOf):
        return [good(spec.item)] * max(spec.min_len, 1)
    if isinstance(spec, msg.Row):
        return [good(s) for s in spec.items]
    if isinstance(spec, msg.WriteRunSpec):
        return [0, 1, 1, 1, False]
    if isinstance(spec, msg.StrMap):
        return {"d0": "x"}
    raise AssertionError(f"no valid value for {spec!r}")


def bad(spec: Spec) -> list[Any]:
    """Wire values that ``spec`` must refuse: wrong types, out of range, too long."""
    if isinstance(spec, msg.Int):
        return ["1", 1.5, True, None, [1], spec.lo - 1, spec.hi + 1, 1 << 64]
    if isinstance(spec, msg.Float):
        return ["1", True, None, spec.lo - 1, spec.hi * 10]
    if isinstance(spec, msg.Bool):
        return [1, 0, "true", None]
    if isinstance(spec, msg.Text):
        return [5, None, ["x"], "x" * (spec.max_len + 1),
                *([""] if spec.min_len else [])]
    if isinstance(spec, msg.Choice):
        return ["nope", 3, None, spec.values[0].upper() + "!"]
    if isinstance(spec, msg.NameSpec):
        return [5, None, ["a"], "\u0100", "caf\u00e9\u20ac"]
    if isinstance(spec, msg.Opt):
        return [v for v in bad(spec.inner) if v is not None]
    if isinstance(spec, msg.ListOf):
        return ["x", {"a": 1}, None, [bad(spec.item)[0]], [good(spec.item), bad(spec.item)[1]],
                [0] * (spec.max_len + 1), *([[]] if spec.min_len else [])]
    if isinstance(spec, msg.Row):
        return ["x", [good(s) for s in spec.items[:-1]],
                [bad(spec.items[0])[0], *(good(s) for s in spec.items[1:])]]
    if isinstance(spec, msg.WriteRunSpec):
        return ["x", [0, 1, 1, 1], [0, 1, 1, 1, 1], [0, -1, 1, 1, False],
                [0, 1, 1, 1, False, "t"], [0, 1, 1, 1, False, 0, 0]]
    if isinstance(spec, msg.StrMap):
        return [[], "x", {"d0": 1}, {"d0": ["x"]}]
    raise AssertionError(f"no bad values for {spec!r}")


def good_args(cls: type[msg.Request]) -> dict[str, Any]:
    return {name: good(spec) for name, spec, _ in cls._FIELDS}


def malformed(cls: type[msg.Request]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(field, args) with exactly that field malformed (or missing, if it is required)."""
    base = good_args(cls)
    for name, spec, default in cls._FIELDS:
        if default is msg._REQUIRED:
            yield name, {k: v for k, v in base.items() if k != name}
        for v in bad(spec):
            yield name, {**base, name: v}


ALL_SETS = {"coordinator": msg.COORDINATOR_REQUESTS, "node callbacks": msg.NODE_CALLBACKS,
            "node control port": msg.NODE_CONTROL_REQUESTS,
            "tape server": msg.TAPE_SERVER_REQUESTS}


# -- (a) definitions ---------------------------------------------------------------------

@pytest.mark.parametrize("requests", ALL_SETS.values(), ids=ALL_SETS.keys())
def test_every_request_round_trips_and_refuses_what_is_malformed(
        requests: dict[str, type[msg.Request]]) -> None:
    for method, cls in requests.items():
        assert method == cls.METHOD
        req = cls.decode(good_args(cls))
        assert cls.decode(req.to_wire()) == req
        for field, args in malformed(cls):
            with pytest.raises(UsageError) as e:
                cls.decode(args)
            text = str(e.value)
            assert "\n" not in text and len(text) < 300, text
            assert text.startswith(f"bad {method} request: field {field!r} "), text


def test_names_travel_as_latin1_and_lists_as_lists() -> None:
    req = msg.Rename(1, b"\x00\xff/x", 2, "é".encode(), 0)
    wire = req.to_wire()
    assert wire == {"parent": 1, "name": "\x00\xff/x", "new_parent": 2, "new_name": "Ã©",
                    "flags": 0}
    assert msg.Rename.decode(wire) == req
    acq = msg.Acquire(5, (1, 2), "w", maps=True)
    assert acq.to_wire()["segs"] == [1, 2]
    assert msg.Acquire.decode({"ino": 5, "segs": [1, 2], "mode": "w", "unknown": 1}) == \
        msg.Acquire(5, (1, 2), "w")  # fields the receiver does not know are ignored


def test_every_handler_serves_exactly_its_requests() -> None:
    from sdbackup.cluster import coordinator

    handled = {n[4:] for n in dir(coordinator._Handler) if n.startswith("rpc_")}
    assert handled == set(msg.COORDINATOR_REQUESTS)
    with pytest.raises(TypeError, match="handles no getattr"):
        type("Incomplete", (msg.RequestHandler,), {"requests": {"getattr": msg.GetAttr}})


# -- (b) the coordinator ------------------------------------------------------------------

@pytest.fixture
def coord(tmp_path: Path) -> Iterator[Coordinator]:
    init_cluster(tmp_path / "c", [DiskSpec.parse(f"d0={tmp_path}/d0.img:4MiB")],
                 block_size=512)
    c = Coordinator(tmp_path / "c", lease=5.0)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def _connect(coord: Coordinator, name: str) -> RpcClient:
    host, port = coord.server.address
    return RpcClient.connect(host, port, load_secret(coord.dir / "secret"), name=name)


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad_records = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad_records, [r.getMessage() for r in bad_records]


def test_malformed_requests_to_every_coordinator_method_are_one_line_errors(
        coord: Coordinator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with _connect(coord, "hostile") as c:
        # Before joining: a malformed join is refused, and the connection can still join.
        for field, args in malformed(msg.Join):
            with pytest.raises(UsageError, match=f"^bad join request: field '{field}' "):
                c.call("join", args, timeout=10)
        assert not c.closed
        c.call("join", {"name": "hostile", "kind": "admin", "pid": os.getpid()}, timeout=10)
        ino = msg.Mknod(1, b"f", 0o100644, 0, 0)
        made = c.call(ino.METHOD, ino.to_wire(), timeout=10)[0]["attr"]["ino"]

        tried = 0
        for method, cls in msg.COORDINATOR_REQUESTS.items():
            for field, args in malformed(cls):
                with pytest.raises(UsageError) as e:
                    c.call(method, args, timeout=30)
                text = str(e.value)
                assert "\n" not in text, text
                assert text.startswith(f"bad {method} request: field {field!r} "), text
                assert not c.closed, f"{method} {field}: the connection closed"
                tried += 1
            # After each method's malformed requests, the session still works.
            assert c.call("getattr", {"ino": made}, timeout=10)[0]["attr"]["ino"] == made
        assert tried > 500
        assert len([m for m, cls in msg.COORDINATOR_REQUESTS.items() if cls._FIELDS]) >= 25

        # The connection and the coordinator keep working: a node joins, writes, reads.
        assert c.call("heartbeat", {}, timeout=10)[0]["epoch"] == coord.epoch
        with ClusterClient("n1", cluster_dir=coord.dir, cache_bytes=4 << 20) as n1:
            f = n1.fs.create(1, b"after")
            n1.fs.write(f.ino, 0, b"still serving")
            n1.fs.fsync(f.ino)
            assert n1.fs.read(f.ino, 0, 100) == b"still serving"
        assert c.call("statfs", {}, timeout=10)[0]["statfs"]["files"] >= 3
    _no_tracebacks(caplog)


def test_malformed_notifications_are_dropped_without_harm(
        coord: Coordinator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with _connect(coord, "noisy") as c:
        c.call("join", {"name": "noisy", "kind": "admin"}, timeout=10)
        for _field, args in malformed(msg.Dirty):
            c.notify("dirty", args)
        assert c.call("status", {}, timeout=10)[0]["epoch"] == coord.epoch
    assert "notify 'dirty'" in caplog.text and "bad dirty request" in caplog.text
    _no_tracebacks(caplog)


# -- (c) a node's control port ------------------------------------------------------------

def test_malformed_requests_to_a_node_control_port_are_one_line_errors(
        coord: Coordinator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    agent = NodeAgent("n1", cluster_dir=coord.dir, cache_bytes=4 << 20)
    agent.start()
    try:
        host, port = node_control_address(coord.dir, "n1")
        with RpcClient.connect(host, port, load_secret(coord.dir / "secret")) as c:
            c.call("join", {"name": "local"}, timeout=10)
            for method, cls in msg.NODE_CONTROL_REQUESTS.items():
                for field, args in malformed(cls):
                    with pytest.raises(UsageError) as e:
                        c.call(method, args, timeout=30)
                    assert str(e.value).startswith(f"bad {method} request: field {field!r} ")
                    assert not c.closed
            with pytest.raises(Exception, match="unknown request 'backup'"):
                c.call("backup", {"medium": "/tmp/x"}, timeout=10)
            assert c.call("getattr", {"ino": 1}, timeout=10)[0]["attr"]["ino"] == 1
            assert c.call("mkdir", msg.Mkdir(1, b"d", 0o755, 0, 0).to_wire(),
                          timeout=10)[0]["attr"]["ino"] > 1
    finally:
        agent.stop()
    _no_tracebacks(caplog)
