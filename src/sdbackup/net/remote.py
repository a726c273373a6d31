"""The node's view of the coordinator: metadata and rights calls over the protocol.

:class:`RemoteMeta` implements :class:`~sdbackup.fs.filesystem.MetaApi` and
:class:`RemoteRights` implements :class:`~sdbackup.fs.cached.RightsApi`, so the file
system code is the same in-process and across processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sdbackup.meta.types import Attr, DirEntry, Extent, StatFs, WriteRun
from sdbackup.net import wire
from sdbackup.net.protocol import Blob
from sdbackup.net.rpc import Args, Result


class Caller(Protocol):
    """Anything that sends requests: an RpcClient, or a reconnecting wrapper of one."""

    def call(self, method: str, args: Args | None = None, blob: Blob | None = None,
             timeout: float | None = None) -> Result: ...

    def notify(self, method: str, args: Args | None = None, blob: Blob | None = None
               ) -> None: ...


class RemoteMeta:
    """MetaApi over the protocol (to the coordinator, or to a node's control port)."""

    def __init__(self, client: Caller, block_size: int) -> None:
        self.client = client
        self.block_size = block_size

    def _call(self, method: str, **args: Any) -> dict[str, Any]:
        body, _ = self.client.call(method, args)
        return body

    def _attr(self, method: str, **args: Any) -> Attr:
        return wire.dec_attr(self._call(method, **args)["attr"])

    def getattr(self, ino: int) -> Attr:
        return self._attr("getattr", ino=ino)

    def lookup(self, parent: int, name: bytes) -> Attr:
        return self._attr("lookup", parent=parent, name=wire.enc_name(name))

    def mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
              rdev: int = 0) -> Attr:
        return self._attr("mknod", parent=parent, name=wire.enc_name(name), mode=mode, uid=uid,
                          gid=gid, rdev=rdev)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        return self._attr("mkdir", parent=parent, name=wire.enc_name(name), mode=mode, uid=uid,
                          gid=gid)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        return self._attr("symlink", parent=parent, name=wire.enc_name(name),
                          target=wire.enc_name(target), uid=uid, gid=gid)

    def readlink(self, ino: int) -> bytes:
        return wire.dec_name(self._call("readlink", ino=ino)["target"])

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        return self._attr("link", ino=ino, new_parent=new_parent,
                          new_name=wire.enc_name(new_name))

    def unlink(self, parent: int, name: bytes) -> None:
        self._call("unlink", parent=parent, name=wire.enc_name(name))

    def rmdir(self, parent: int, name: bytes) -> None:
        self._call("rmdir", parent=parent, name=wire.enc_name(name))

    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0) -> None:
        self._call("rename", parent=parent, name=wire.enc_name(name), new_parent=new_parent,
                   new_name=wire.enc_name(new_name), flags=flags)

    def readdir(self, ino: int, after: int = 0, limit: int = 1000) -> list[DirEntry]:
        return wire.dec_dirents(self._call("readdir", ino=ino, after=after, limit=limit)["entries"])

    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None) -> Attr:
        return self._attr("setattr", ino=ino, mode=mode, uid=uid, gid=gid, atime_ns=atime_ns,
                          mtime_ns=mtime_ns)

    def statfs(self) -> StatFs:
        return wire.dec_statfs(self._call("statfs")["statfs"])

    def open(self, ino: int) -> None:
        self._call("open", ino=ino)

    def release(self, ino: int) -> None:
        self._call("release", ino=ino)

    def map_read(self, ino: int, fblock: int, count: int) -> list[Extent]:
        return wire.dec_extents(self._call("map_read", ino=ino, fblock=fblock, count=count)["runs"])

    def map_write(self, ino: int, fblock: int, count: int) -> list[WriteRun]:
        return wire.dec_write_runs(
            self._call("map_write", ino=ino, fblock=fblock, count=count)["runs"])

    def abort_write(self, runs: Sequence[WriteRun]) -> None:
        self._call("abort_write", runs=wire.enc_runs(list(runs)))

    def commit_write(self, ino: int, runs: Sequence[WriteRun], end: int,
                     mtime_ns: int | None = None) -> Attr:
        return self._attr("commit_write", ino=ino, runs=wire.enc_runs(list(runs)), end=end,
                          mtime_ns=mtime_ns)

    def truncate(self, ino: int, size: int) -> Attr:
        return self._attr("truncate", ino=ino, size=size)

    def sync(self) -> None:
        self._call("sync")


class RemoteRights:
    """RightsApi over the protocol."""

    def __init__(self, client: Caller) -> None:
        self.client = client
        self._counter = 0

    def acquire(self, ino: int, segs: list[int], mode: str, reclaim: bool = False) -> int:
        body, _ = self.client.call("acquire", {"ino": ino, "segs": segs, "mode": mode,
                                               "reclaim": reclaim})
        return int(body["seq"])

    def acquire_mapped(self, ino: int, segs: list[int], mode: str
                       ) -> tuple[int, dict[int, list[Extent]]]:
        """Acquire, and get each segment's block map in the same round trip."""
        body, _ = self.client.call("acquire", {"ino": ino, "segs": segs, "mode": mode,
                                               "maps": True})
        maps = {int(k): wire.dec_extents(v) for k, v in (body.get("maps") or {}).items()}
        return int(body["seq"]), maps

    def release(self, ino: int, segs: list[int]) -> None:
        self.client.call("release_rights", {"ino": ino, "segs": segs})

    def set_dirty(self, ino: int, segs: list[int], dirty: bool) -> None:
        # Sent in order with a counter: the coordinator ignores an older report that
        # a worker thread happens to apply after a newer one.
        self._counter += 1
        self.client.notify("dirty", {"ino": ino, "segs": segs, "dirty": dirty,
                                     "n": self._counter})
