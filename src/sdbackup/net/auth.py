"""Mutual challenge-response authentication with the cluster secret.

Both sides know the cluster secret (the contents of ``CLUSTER_DIR/secret``); the
secret itself never goes on the wire. The handshake, four frames::

    client -> server  HELLO      {nonce: Nc (32 random bytes, hex), name?}
                                 header version = the client's protocol version
    server -> client  CHALLENGE  {nonce: Ns}
    client -> server  AUTH       {proof: P_client}
    server -> client  WELCOME    {server: name, proof: P_server}
                                 (every later frame carries a MAC, keyed as below)

    P_role = HMAC-SHA256(secret, CONTEXT || version u16 || Nc || Ns || role)
             role = b"server" or b"client"
    K_c2s  = HMAC-SHA256(secret, KEY_CONTEXT || version u16 || Nc || Ns || b"c2s")
    K_s2c  = HMAC-SHA256(secret, KEY_CONTEXT || version u16 || Nc || Ns || b"s2c")

What this guarantees:

* each side proves knowledge of the secret over nonces that include one of its peer's
  choosing, so a recorded handshake cannot be replayed; the role label keeps one
  side's proof from being reflected as the other's;
* **the client proves first**: the server says nothing that depends on the secret to a
  peer that has not proved it knows it, so nobody can collect server proofs to guess a
  weak secret offline (version 3; version 2 sent the server's proof in CHALLENGE);
* the session keys depend on the secret and on both nonces: fresh per connection,
  unknown to an observer; one key per direction, so no frame can be reflected back;
* the client checks the server's proof (in WELCOME) before trusting anything it says,
  and the server checks the client's proof before it calls any handler;
* a peer with another protocol version gets an ERROR frame naming both versions
  before the connection closes; a wrong secret gives the client
  :data:`AUTH_FAILED_MESSAGE` and the server a log line naming the peer address;
* an unauthenticated peer has little time: its first frame within
  ``FIRST_FRAME_TIMEOUT``, the whole handshake within ``HANDSHAKE_TIMEOUT``.

What it does not do: encrypt. Block data travels in clear text (integrity-protected);
run the cluster network on a trusted segment or under a VPN/IPsec if that matters.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdbackup.errors import NotFoundError, RemoteError, UsageError
from sdbackup.net.protocol import (
    PROTOCOL_VERSION,
    ConnectionLost,
    Frame,
    FrameStream,
    FrameType,
    ProtocolError,
    VersionMismatch,
)

CONTEXT = b"sdbackup cluster auth\x00"
KEY_CONTEXT = b"sdbackup cluster session key\x00"
NONCE_SIZE = 32
MIN_SECRET = 32
"""Shortest secret accepted: 32 hex characters (128 random bits); ``sdbackup init``
writes 64. Only hex is accepted, so a human password is refused, not weakly used."""
HANDSHAKE_TIMEOUT = 5.0
FIRST_FRAME_TIMEOUT = 2.0  # an idle unauthenticated connection goes after this

AUTH_FAILED_MESSAGE = (
    "authentication failed: the cluster secret does not match; copy CLUSTER_DIR/secret "
    "from the coordinator's cluster directory to this host (mode 0600) and pass it with "
    "--secret-file"
)


class AuthenticationFailed(RemoteError):
    """The peer does not know the cluster secret (or we do not): never retry blindly."""


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What the handshake learnt about the peer."""

    name: str | None
    version: int


def check_secret(secret: bytes) -> bytes:
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET or not _is_hex(secret):
        raise UsageError(f"the cluster secret must be at least {MIN_SECRET} hex characters "
                         "as 'sdbackup init' generates them; copy CLUSTER_DIR/secret")
    return secret


def _is_hex(data: bytes) -> bool:
    return bool(data) and all(c in b"0123456789abcdefABCDEF" for c in data)


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """Read a cluster secret file (surrounding whitespace ignored)."""
    p = Path(path)
    try:
        data = p.read_bytes().strip()
    except FileNotFoundError:
        raise NotFoundError(f"secret file {p} does not exist: copy CLUSTER_DIR/secret from "
                            "the coordinator's cluster directory") from None
    except OSError as e:
        raise UsageError(f"cannot read secret file {p}: {e.strerror}") from None
    if len(data) < MIN_SECRET or not _is_hex(data):
        raise UsageError(f"secret file {p} is not a cluster secret ({MIN_SECRET} or more hex "
                         "characters, as 'sdbackup init' writes): copy CLUSTER_DIR/secret "
                         "from the coordinator's cluster directory")
    return data


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"".join(parts), hashlib.sha256).digest()


def proof(secret: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes,
          version: int = PROTOCOL_VERSION) -> bytes:
    return _mac(secret, CONTEXT, version.to_bytes(2, "big"), client_nonce, server_nonce, role)


def session_keys(secret: bytes, client_nonce: bytes, server_nonce: bytes,
                 version: int = PROTOCOL_VERSION) -> tuple[bytes, bytes]:
    """(client-to-server key, server-to-client key)."""
    v = version.to_bytes(2, "big")
    return (_mac(secret, KEY_CONTEXT, v, client_nonce, server_nonce, b"c2s"),
            _mac(secret, KEY_CONTEXT, v, client_nonce, server_nonce, b"s2c"))


def _hex_field(frame: Frame, key: str, size: int) -> bytes:
    value = frame.body.get(key)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise ProtocolError(f"handshake {frame.type.name} frame has no valid {key!r}")
    return raw


def _error_from_frame(frame: Frame, peer: str) -> RemoteError:
    """An ERROR frame received during the handshake (unauthenticated: message only)."""
    msg = frame.body.get("message")
    text = msg if isinstance(msg, str) else "no reason given"
    if frame.body.get("type") == "ProtocolError":
        return ProtocolError(f"{peer} refused the connection: {text}")
    return RemoteError(f"{peer} refused the connection: {text}")


def _expect(stream: FrameStream, ftype: FrameType) -> Frame:
    frame = stream.recv()
    if frame.type is FrameType.ERROR:
        raise _error_from_frame(frame, stream.peer)
    if frame.type is not ftype:
        raise ProtocolError(f"{stream.peer} sent {frame.type.name} during the handshake, "
                            f"expected {ftype.name}")
    return frame


def client_handshake(stream: FrameStream, secret: bytes, *, name: str | None = None,
                     timeout: float = HANDSHAKE_TIMEOUT) -> PeerInfo:
    """Authenticate the server and ourselves; on success the stream is keyed."""
    check_secret(secret)
    stream.set_deadline(timeout)
    cn = secrets.token_bytes(NONCE_SIZE)
    hello: dict[str, Any] = {"nonce": cn.hex()}
    if name:
        hello["name"] = name
    try:
        stream.send(FrameType.HELLO, 0, hello)
        ch = _expect(stream, FrameType.CHALLENGE)
    except VersionMismatch as e:
        raise ProtocolError(
            f"{stream.peer} speaks sdbackup protocol version {e.peer_version}, this program "
            f"speaks version {PROTOCOL_VERSION}; run the same sdbackup release on the "
            "coordinator and every node") from None
    except ConnectionLost as e:
        raise ConnectionLost(f"handshake with {stream.peer} failed: {e}; it may be busy or "
                             "not an sdbackup coordinator, see its log") from None
    sn = _hex_field(ch, "nonce", NONCE_SIZE)
    stream.send(FrameType.AUTH, 0, {"proof": proof(secret, b"client", cn, sn).hex()})
    try:
        welcome = _expect(stream, FrameType.WELCOME)
    except ConnectionLost as e:
        raise ConnectionLost(f"handshake with {stream.peer} failed after authentication: "
                             f"{e}; see its log") from None
    except RemoteError as e:
        if AUTH_FAILED_MESSAGE in str(e):
            raise AuthenticationFailed(f"{AUTH_FAILED_MESSAGE} (peer {stream.peer})"
                                       ) from None
        raise
    if not hmac.compare_digest(_hex_field(welcome, "proof", 32),
                               proof(secret, b"server", cn, sn)):
        raise AuthenticationFailed(f"{AUTH_FAILED_MESSAGE} (peer {stream.peer})")
    c2s, s2c = session_keys(secret, cn, sn)
    stream.set_keys(tx_key=c2s, rx_key=s2c)
    server = welcome.body.get("server")
    stream.end_handshake()
    return PeerInfo(server if isinstance(server, str) else None, PROTOCOL_VERSION)


def server_handshake(stream: FrameStream, secret: bytes, *, server_name: str = "sdbackup",
                     timeout: float = HANDSHAKE_TIMEOUT) -> PeerInfo:
    """Authenticate a connecting client; on success the stream is keyed.

    Every failure raises (ProtocolError, AuthenticationFailed, ConnectionLost) with a
    message naming the peer address; the caller logs it and closes the stream. A
    version mismatch and a wrong secret are answered with an ERROR frame first.
    """
    check_secret(secret)
    stream.set_deadline(min(timeout, FIRST_FRAME_TIMEOUT))
    try:
        hello = _expect(stream, FrameType.HELLO)
    except VersionMismatch as e:
        msg = (f"protocol version {e.peer_version} is not supported: this {server_name} "
               f"speaks sdbackup protocol version {PROTOCOL_VERSION}; run the same sdbackup "
               "release on the coordinator and every node")
        _send_refusal(stream, "ProtocolError", msg)
        raise VersionMismatch(f"{stream.peer} speaks protocol version {e.peer_version}, "
                              f"we speak version {PROTOCOL_VERSION}", e.peer_version) from None
    cn = _hex_field(hello, "nonce", NONCE_SIZE)
    name = hello.body.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > 256):
        raise ProtocolError(f"{stream.peer} sent an invalid peer name")
    stream.set_deadline(timeout)
    sn = secrets.token_bytes(NONCE_SIZE)
    stream.send(FrameType.CHALLENGE, 0, {"nonce": sn.hex()})
    try:
        auth = _expect(stream, FrameType.AUTH)
    except ConnectionLost:
        # A client with the wrong secret may hang up before sending AUTH.
        raise ConnectionLost(f"{stream.peer} hung up during authentication") from None
    if not hmac.compare_digest(_hex_field(auth, "proof", 32),
                               proof(secret, b"client", cn, sn)):
        who = f"{stream.peer} ({name})" if name else stream.peer
        _send_refusal(stream, "RemoteError", AUTH_FAILED_MESSAGE)
        raise AuthenticationFailed(f"authentication failed from {who}: it does not know "
                                   "the cluster secret")
    stream.send(FrameType.WELCOME, 0, {"server": server_name,
                                       "proof": proof(secret, b"server", cn, sn).hex()})
    c2s, s2c = session_keys(secret, cn, sn)
    stream.set_keys(tx_key=s2c, rx_key=c2s)
    stream.end_handshake()
    return PeerInfo(name, PROTOCOL_VERSION)


def _send_refusal(stream: FrameStream, type_name: str, message: str) -> None:
    try:
        stream.send(FrameType.ERROR, 0, {"type": type_name, "message": message[:1000]})
    except (RemoteError, OSError):
        pass
    stream.close_after_error()
