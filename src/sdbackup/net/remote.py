"""The node's view of the coordinator: metadata and rights calls over the protocol.

:class:`RemoteMeta` implements :class:`~sdbackup.fs.filesystem.MetaApi` and
:class:`RemoteRights` implements :class:`~sdbackup.fs.cached.RightsApi`, so the file
system code is the same in-process and across processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sdbackup.meta.types import Attr, DirEntry, Extent, StatFs, WriteRun
from sdbackup.net import messages as msg
from sdbackup.net import wire
from sdbackup.net.messages import Caller

__all__ = ["Caller", "RemoteMeta", "RemoteRights"]


class RemoteMeta:
    """MetaApi over the protocol (to the coordinator, or to a node's control port)."""

    def __init__(self, client: Caller, block_size: int) -> None:
        self.client = client
        self.block_size = block_size

    def _call(self, request: msg.Request) -> dict[str, Any]:
        body, _ = msg.call(self.client, request)
        return body

    def forward(self, request: msg.Request) -> dict[str, Any]:
        """Send any metadata request and return the answer's body as it is."""
        return self._call(request)

    def _attr(self, request: msg.Request) -> Attr:
        return wire.dec_attr(self._call(request)["attr"])

    def getattr(self, ino: int) -> Attr:
        return self._attr(msg.GetAttr(ino))

    def lookup(self, parent: int, name: bytes) -> Attr:
        return self._attr(msg.Lookup(parent, name))

    def mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
              rdev: int = 0) -> Attr:
        return self._attr(msg.Mknod(parent, name, mode, uid, gid, rdev))

    def mknod_open(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        """mknod, then open the new file, in one round trip."""
        return self._attr(msg.Mknod(parent, name, mode, uid, gid, 0, True))

    def mknod_open_writing(self, parent: int, name: bytes, mode: int, uid: int, gid: int
                           ) -> tuple[Attr, int | None]:
        """mknod, open, and the write right on the first segment (its grant seq), in one
        round trip."""
        body = self._call(msg.Mknod(parent, name, mode, uid, gid, 0, True, True))
        seq = body.get("seq")
        return wire.dec_attr(body["attr"]), None if seq is None else int(seq)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        return self._attr(msg.Mkdir(parent, name, mode, uid, gid))

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        return self._attr(msg.Symlink(parent, name, target, uid, gid))

    def readlink(self, ino: int) -> bytes:
        return wire.dec_name(self._call(msg.Readlink(ino))["target"])

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        return self._attr(msg.Link(ino, new_parent, new_name))

    def unlink(self, parent: int, name: bytes) -> None:
        self._call(msg.Unlink(parent, name))

    def rmdir(self, parent: int, name: bytes) -> None:
        self._call(msg.Rmdir(parent, name))

    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0) -> None:
        self._call(msg.Rename(parent, name, new_parent, new_name, flags))

    def readdir(self, ino: int, after: int = 0, limit: int = 1000) -> list[DirEntry]:
        return wire.dec_dirents(self._call(msg.Readdir(ino, after, limit))["entries"])

    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None) -> Attr:
        return self._attr(msg.Setattr(ino, mode, uid, gid, atime_ns, mtime_ns))

    def statfs(self) -> StatFs:
        return wire.dec_statfs(self._call(msg.Statfs())["statfs"])

    def open(self, ino: int) -> None:
        self._call(msg.Open(ino))

    def release(self, ino: int) -> None:
        self._call(msg.Release(ino))

    def map_read(self, ino: int, fblock: int, count: int) -> list[Extent]:
        return wire.dec_extents(self._call(msg.MapRead(ino, fblock, count))["runs"])

    def map_write(self, ino: int, fblock: int, count: int) -> list[WriteRun]:
        return wire.dec_write_runs(self._call(msg.MapWrite(ino, fblock, count))["runs"])

    def abort_write(self, runs: Sequence[WriteRun]) -> None:
        self._call(msg.AbortWrite(tuple(runs)))

    def commit_write(self, ino: int, runs: Sequence[WriteRun], end: int,
                     mtime_ns: int | None = None) -> Attr:
        return self._attr(msg.CommitWrite(ino, tuple(runs), end, mtime_ns))

    def truncate(self, ino: int, size: int) -> Attr:
        return self._attr(msg.Truncate(ino, size))

    def sync(self) -> None:
        self._call(msg.Sync())


class RemoteRights:
    """RightsApi over the protocol."""

    def __init__(self, client: Caller) -> None:
        self.client = client
        self._counter = 0

    def acquire(self, ino: int, segs: list[int], mode: str, reclaim: bool = False) -> int:
        body, _ = msg.call(self.client, msg.Acquire(ino, tuple(segs), mode, reclaim))
        return int(body["seq"])

    def acquire_mapped(self, ino: int, segs: list[int], mode: str
                       ) -> tuple[int, dict[int, list[Extent]]]:
        """Acquire, and get each segment's block map in the same round trip."""
        body, _ = msg.call(self.client, msg.Acquire(ino, tuple(segs), mode, maps=True))
        maps = {int(k): wire.dec_extents(v) for k, v in (body.get("maps") or {}).items()}
        return int(body["seq"]), maps

    def release(self, ino: int, segs: list[int]) -> None:
        msg.call(self.client, msg.ReleaseRights(ino, tuple(segs)))

    def release_many(self, items: list[tuple[int, list[int]]]) -> None:
        """Several files' segments in one round trip."""
        (ino, segs), rest = items[0], items[1:]
        msg.call(self.client, msg.ReleaseRights(ino, tuple(segs), tuple(i for i, _ in rest),
                                                tuple(tuple(s) for _, s in rest)))

    def set_dirty(self, ino: int, segs: list[int], dirty: bool) -> None:
        # Sent in order with a counter: the coordinator ignores an older report that
        # a worker thread happens to apply after a newer one.
        self._counter += 1
        msg.notify(self.client, msg.Dirty(ino, tuple(segs), dirty, self._counter))
