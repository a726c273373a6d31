"""How a command reaches a cluster: through a node, a running coordinator, or embedded.

- ``--node NAME``: through that node agent's control port, so reads and writes go
  through the node's cache (what a program on that node would see);
- a coordinator is running: join it as a short-lived client with a small coherent
  cache, written back before the command exits;
- otherwise: open the cluster in this process (the embedded default), holding the lock.

The node client (:mod:`sdbackup.cluster.node`: the cache, before-image logs, zstandard,
pyroaring) is imported only when a coordinator is running or a node is named, so that
a command on a cluster without a coordinator starts fast (issue 11).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdbackup.blocks.diskset import DiskSet
from sdbackup.cluster.config import load_config, read_addr
from sdbackup.cluster.local import open_cluster
from sdbackup.errors import RemoteError
from sdbackup.fs.filesystem import FileSystem
from sdbackup.net import messages as msg
from sdbackup.net.auth import load_secret
from sdbackup.net.remote import RemoteMeta
from sdbackup.net.rpc import ConnectFailed, RpcClient

if TYPE_CHECKING:
    from sdbackup.cluster.node import ClusterClient


class NodeFileSystem(FileSystem):
    """A node's file system, used from another process through its control port."""

    def __init__(self, client: RpcClient, block_size: int) -> None:
        super().__init__(RemoteMeta(client, block_size), DiskSet(block_size, []))
        self.client = client

    def read(self, ino: int, offset: int, size: int) -> bytes:
        _, data = msg.call(self.client, msg.Read(ino, offset, size))
        return bytes(data or b"")

    def write(self, ino: int, offset: int, data: bytes | bytearray | memoryview) -> int:
        body, _ = msg.call(self.client, msg.Write(ino, offset), data)
        return int(body["written"])

    def truncate(self, ino: int, size: int) -> Any:
        return self.meta.truncate(ino, size)

    def fsync(self, ino: int | None = None) -> None:
        msg.call(self.client, msg.Fsync(ino))

    def flush_inode(self, ino: int) -> None:
        """The node writes the file's dirty data back now (errors come back here)."""
        msg.call(self.client, msg.FlushInode(ino))


@contextmanager
def open_fs(cluster_dir: str | os.PathLike[str], *, node: str | None = None,
            wait: float = 10.0) -> Iterator[FileSystem]:
    """The cluster's file system for one command (see the module docstring)."""
    if node is not None:
        from sdbackup.cluster.node import node_control_address

        host, port = node_control_address(cluster_dir, node)
        secret = load_secret(Path(cluster_dir) / "secret")
        client = RpcClient.connect(host, port, secret, timeout=wait)
        try:
            info, _ = msg.call(client, msg.ControlJoin(f"cli-{os.getpid()}"))
            yield NodeFileSystem(client, int(info["block_size"]))
        finally:
            client.close()
        return
    cc = _try_client(cluster_dir)
    if cc is not None:
        with cc:
            yield cc.fs
            cc.fs.flush_all()
        return
    with open_cluster(cluster_dir, wait=wait) as c:
        yield c.fs


def _try_client(cluster_dir: str | os.PathLike[str]) -> ClusterClient | None:
    """Join the running coordinator; None when none is running (stale address file)."""
    if read_addr(cluster_dir) is None:
        return None
    from sdbackup.cluster.node import ClusterClient

    try:
        return ClusterClient(f"cli-{os.getpid()}", cluster_dir=cluster_dir)
    except ConnectFailed:
        return None


def try_coordinator_client(cluster_dir: str | os.PathLike[str]) -> RpcClient | None:
    """A joined admin connection to the running coordinator, or None if none runs."""
    load_config(cluster_dir)  # a clear error for a missing or wrong cluster directory
    addr = read_addr(cluster_dir)
    if addr is None:
        return None
    secret = load_secret(Path(cluster_dir) / "secret")
    try:
        client = RpcClient.connect(addr[0], addr[1], secret, name=f"admin-{os.getpid()}")
    except ConnectFailed:
        return None
    try:
        token = _owner_token(cluster_dir)
        msg.call(client, msg.Join(f"admin-{os.getpid()}", "admin", "localhost", os.getpid(),
                                  token or None))
    except BaseException:
        client.close()
        raise
    return client


def _owner_token(cluster_dir: str | os.PathLike[str]) -> str | None:
    """The running coordinator's owner token, if this user on this host can read it."""
    from sdbackup.cluster.coordinator import OWNER_TOKEN_FILE

    try:
        return (Path(cluster_dir) / OWNER_TOKEN_FILE).read_text().strip()
    except OSError:
        return None


@contextmanager
def coordinator_client(cluster_dir: str | os.PathLike[str]) -> Iterator[RpcClient]:
    """A joined admin connection to the running coordinator (for status, flush...)."""
    client = try_coordinator_client(cluster_dir)
    if client is None:
        raise RemoteError(f"no coordinator is running for {cluster_dir}: start one with "
                          f"'sdbackup coordinator {cluster_dir}'")
    try:
        yield client
    finally:
        client.close()
