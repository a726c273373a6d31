"""Bad input and faults against a running coordinator process (issue 3, "Bad input and
faults"): a node with the wrong secret, garbage bytes, frames cut off mid-way,
oversized lengths, an unknown protocol version, two nodes with the same name, a node
pointed at a cluster it cannot use. Each gets a clear refusal or error, and after each
the rest of the cluster (two node agents) still works.

One cluster serves the whole module, so each test also checks that the faults before
it left nothing behind.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:  # tests/ as a plain directory of modules...
    from cluster_helpers import ClusterProcs, read_file_via, sdb, wait_for, write_file_via
except ModuleNotFoundError:  # ...or as a package (with tests/__init__.py)
    from tests.cluster_helpers import ClusterProcs, read_file_via, sdb, wait_for, write_file_via

from sdbackup.errors import EXIT_REMOTE
from sdbackup.net.auth import client_handshake
from sdbackup.net.protocol import (
    FLAG_BLOB,
    HEADER,
    MAGIC,
    ZERO_MAC,
    FrameStream,
    FrameType,
    pack_header,
)

_names = itertools.count()


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcs]:
    c = ClusterProcs(tmp_path_factory.mktemp("faults"))
    try:
        c.start_coordinator(lease=3.0)
        c.start_node("n1", flush_delay=0.5)
        c.start_node("n2", flush_delay=0.5)
        yield c
    finally:
        c.cleanup()


def still_works(cp: ClusterProcs) -> None:
    """n1 writes, n2 reads (and the other way round); both nodes are still up."""
    k = next(_names)
    data = os.urandom(70_000 + k)
    write_file_via(cp.dir, "n1", f"/ok{k}", data, fsync=False)
    assert read_file_via(cp.dir, "n2", f"/ok{k}") == data
    write_file_via(cp.dir, "n2", f"/ok{k}", data[::-1], fsync=True)
    assert read_file_via(cp.dir, "n1", f"/ok{k}") == data[::-1]
    up = {n["name"] for n in cp.status()["nodes"] if n["kind"] == "node" and n["state"] == "up"}
    assert up == {"n1", "n2"}
    assert cp.coordinator is not None and cp.coordinator.alive()


def coord_addr(cp: ClusterProcs) -> tuple[str, int]:
    host, _, port = (cp.dir / "coordinator.addr").read_text().split()[0].rpartition(":")
    return host, int(port)


def raw(cp: ClusterProcs) -> socket.socket:
    return socket.create_connection(coord_addr(cp), timeout=5)


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def authenticated(cp: ClusterProcs) -> FrameStream:
    stream = FrameStream(raw(cp), "coordinator")
    client_handshake(stream, (cp.dir / "secret").read_bytes().strip(), name="raw-test")
    return stream


def log_count(cp: ClusterProcs, needle: str) -> int:
    return cp.coordinator_log().count(needle)


def wait_logged(cp: ClusterProcs, needle: str, before: int) -> None:
    wait_for(lambda: log_count(cp, needle) > before, 10, f"{needle!r} in the coordinator log")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- authentication ---------------------------------------------------------------------------

def test_node_with_another_clusters_secret_is_refused(cp: ClusterProcs,
                                                      tmp_path: Path) -> None:
    other = ClusterProcs(tmp_path / "other")  # a second cluster: its own secret
    host, port = coord_addr(cp)
    before = log_count(cp, "authentication failed from")
    r = sdb("node", "--coordinator", f"{host}:{port}", "--secret-file",
            str(other.dir / "secret"), "--name", "intruder", timeout=30, cwd=tmp_path)
    assert r.returncode == EXIT_REMOTE, r.stderr
    assert "authentication failed: the cluster secret does not match" in r.stderr
    assert "Traceback" not in r.stderr
    wait_logged(cp, "authentication failed from", before)
    assert "(intruder): it does not know the cluster secret" in cp.coordinator_log()
    # The same with the other cluster's directory, whose coordinator address file
    # points at ours (a copied file, say).
    shutil.copy(cp.dir / "coordinator.addr", other.dir / "coordinator.addr")
    r = sdb("node", str(other.dir), "--name", "intruder2", timeout=30)
    assert r.returncode == EXIT_REMOTE and "authentication failed" in r.stderr
    still_works(cp)


@pytest.mark.parametrize("content", [b"short\n", None, b"z" * 64, b"ab" * 32],
                         ids=["short", "dir", "garbage", "wrong"])
def test_node_with_a_corrupt_or_unreadable_secret_file(cp: ClusterProcs, tmp_path: Path,
                                                       content: bytes | None) -> None:
    secret = tmp_path / "secret"
    if content is None:
        secret.mkdir()  # root can read any file; a directory it cannot read as one
    else:
        secret.write_bytes(content)
    host, port = coord_addr(cp)
    r = sdb("node", "--coordinator", f"{host}:{port}", "--secret-file", str(secret),
            "--name", "badsecret", timeout=30, cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    msg = r.stderr.strip().splitlines()[-1]
    if content is None:
        assert f"cannot read secret file {secret}" in msg
    elif content.startswith((b"short", b"z")):  # not a secret 'init' could have made
        assert "is not a cluster secret" in msg
    else:
        assert "authentication failed" in msg
    still_works(cp)


def test_node_pointed_at_a_cluster_dir_it_cannot_use(cp: ClusterProcs, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-cluster"
    r = sdb("node", str(missing), "--name", "lost", timeout=30, cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert str(missing) in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = sdb("node", str(empty), "--name", "lost", timeout=30)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert str(empty) in r.stderr
    # A copy of the cluster directory whose secret file was damaged.
    bad = tmp_path / "bad"
    shutil.copytree(cp.dir, bad, ignore=shutil.ignore_patterns("meta.db*", "logs", "lock"))
    (bad / "secret").write_bytes(b"\x00\x01")
    r = sdb("node", str(bad), "--name", "lost", timeout=30)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "is not a cluster secret" in r.stderr
    # A bad --coordinator address is a usage error, not a crash.
    r = sdb("node", "--coordinator", "nowhere", "--secret-file", str(cp.dir / "secret"),
            "--name", "lost", timeout=30, cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "HOST:PORT" in r.stderr
    still_works(cp)


def test_second_node_with_the_same_name_is_refused(cp: ClusterProcs) -> None:
    r = sdb("node", str(cp.dir), "--name", "n1", timeout=30)
    assert r.returncode != 0
    assert "a node named 'n1' is already connected" in r.stderr
    assert "choose another --name" in r.stderr
    assert "Traceback" not in r.stderr
    # Its failed start did not take over or remove the first n1's control address.
    assert f"pid={cp.nodes['n1'].pid}" in (cp.dir / "nodes" / "n1.addr").read_text()
    still_works(cp)


# -- malformed frames -------------------------------------------------------------------

def test_garbage_bytes(cp: ClusterProcs) -> None:
    before = log_count(cp, "not an sdbackup peer")
    with raw(cp) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(1000))
        assert read_until_closed(s) == b""
    wait_logged(cp, "not an sdbackup peer", before)
    # Garbage after a correct handshake closes that connection too.
    before = log_count(cp, "closing connection")
    stream = authenticated(cp)
    stream.send_bytes(os.urandom(4096))
    assert read_until_closed(stream.sock) == b""
    stream.close()
    wait_logged(cp, "closing connection", before)
    still_works(cp)


def test_frames_cut_off_midway(cp: ClusterProcs) -> None:
    needle = "in the middle of a frame"
    # During the handshake: a HELLO that announces 100 bytes of body, then 10.
    before = log_count(cp, needle)
    with raw(cp) as s:
        s.sendall(pack_header(FrameType.HELLO, 0, 0, 100, 0) + ZERO_MAC + b"{" * 10)
        s.shutdown(socket.SHUT_WR)
        assert read_until_closed(s) == b""
    wait_logged(cp, needle, before)
    # A header cut off after 20 of its 40 bytes.
    before = log_count(cp, needle)
    with raw(cp) as s:
        s.sendall((pack_header(FrameType.HELLO, 0, 0, 10, 0) + ZERO_MAC)[:20])
        s.shutdown(socket.SHUT_WR)
        assert read_until_closed(s) == b""
    wait_logged(cp, needle, before)
    # After authenticating: half a request with a blob.
    before = log_count(cp, needle)
    stream = authenticated(cp)
    frame = stream.signed_frame(FrameType.REQUEST, 1, {"method": "status", "args": {}},
                                b"x" * 10000)
    stream.send_bytes(frame[: len(frame) // 2])
    stream.sock.shutdown(socket.SHUT_WR)
    assert read_until_closed(stream.sock) == b""
    stream.close()
    wait_logged(cp, needle, before)
    still_works(cp)


def test_oversized_lengths_are_refused_before_allocating(cp: ClusterProcs) -> None:
    assert cp.coordinator is not None
    rss0 = rss_kib(cp.coordinator.pid)
    # Before authentication: a 4 GiB body.
    before = log_count(cp, "the limit is 4096")
    with raw(cp) as s:
        s.sendall(pack_header(FrameType.HELLO, 0, 0, 0xFFFFFFFF, 0) + ZERO_MAC)
        assert read_until_closed(s) == b""
    wait_logged(cp, "the limit is 4096", before)
    # After authentication: a body and a blob over their limits (16 and 64 MiB).
    for jlen, blen, limit in ((0xFFFFFFFF, 0, 16 << 20), (0, 0xFFFFFFFF, 64 << 20),
                              (0, (64 << 20) + 1, 64 << 20)):
        before = log_count(cp, f"the limit is {limit}")
        stream = authenticated(cp)
        flags = FLAG_BLOB if blen else 0
        stream.send_bytes(pack_header(FrameType.REQUEST, flags, 1, jlen, blen) + ZERO_MAC)
        assert read_until_closed(stream.sock) == b""
        stream.close()
        wait_logged(cp, f"the limit is {limit}", before)
    assert rss_kib(cp.coordinator.pid) - rss0 < 50 << 10, "the coordinator allocated"
    still_works(cp)


def test_unknown_protocol_version_gets_a_clear_answer(cp: ClusterProcs) -> None:
    before = log_count(cp, "speaks protocol version 99")
    with raw(cp) as s:
        hdr = bytearray(pack_header(FrameType.HELLO, 0, 0, 0, 0) + ZERO_MAC)
        struct.pack_into(">H", hdr, 4, 99)
        s.sendall(bytes(hdr))
        answer = read_until_closed(s)
    magic, version, ftype, _flags, _rid, jlen, _blen, _mac = HEADER.unpack(answer[:40])
    assert magic == MAGIC and ftype == FrameType.ERROR
    body = answer[40 : 40 + jlen].decode()
    assert "protocol version 99 is not supported" in body
    assert f"speaks sdbackup protocol version {version}" in body
    wait_logged(cp, "speaks protocol version 99", before)
    still_works(cp)


def test_silent_and_half_open_connections_do_not_block_others(cp: ClusterProcs) -> None:
    """Twenty connections that never finish their handshake, held open meanwhile."""
    socks = [raw(cp) for _ in range(20)]
    try:
        for i, s in enumerate(socks):
            if i % 2:
                s.sendall(MAGIC)  # four bytes of a frame, then nothing
        t0 = time.monotonic()
        still_works(cp)
        assert time.monotonic() - t0 < 20
    finally:
        for s in socks:
            s.close()
    still_works(cp)
