"""A node's cache of metadata it holds capabilities on (cluster/caps.py).

:class:`CachingMeta` is :class:`~sdbackup.net.remote.RemoteMeta` that keeps the
attributes of inodes, and the names looked up in directories (found or not), for as
long as the coordinator lets it: it asks for a capability with every ``lookup`` and
``getattr`` and caches the answer only when the coordinator granted one. The
coordinator takes capabilities back (``drop_caps``) before any other node changes
those inodes, so a cached answer is as fresh as the coordinator's own.

Guarantees:

- an answer is cached only if no drop reached this node while it was on its way
  (``_epoch``): a drop that overtakes the answer it invalidates wins;
- the answer of a change made by this node names the inodes it changed
  (``touched``), which are dropped here before the change returns;
- nothing is answered from the cache unless ``trusted()`` (the node's lease holds):
  a node cut off from the coordinator cannot be asked to drop anything, and its
  capabilities end with its lease (the coordinator fences before it changes them);
- a new session starts with an empty cache (``drop_all``).

``peek_lookup``/``peek_getattr`` never block and never call the coordinator: the FUSE
adapter uses them in its event loop thread, which saves the hop to a worker thread.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterable
from typing import Any

from sdbackup.errors import FsError
from sdbackup.meta.types import Attr
from sdbackup.net import messages as msg
from sdbackup.net import wire
from sdbackup.net.remote import Caller, RemoteMeta

MAX_INODES = 200_000
"""Cached inodes at most; beyond, the cache starts again empty (cheap, and rare)."""

_MISS = object()


class CachingMeta(RemoteMeta):
    """RemoteMeta with a capability-guarded cache of attributes and names."""

    def __init__(self, client: Caller, block_size: int,
                 trusted: Callable[[], bool] = lambda: True) -> None:
        super().__init__(client, block_size)
        self.trusted = trusted
        self._mu = threading.Lock()
        self._attrs: dict[int, Attr] = {}
        self._names: dict[int, dict[bytes, int | None]] = {}
        # Directories whose every name is in _names: any other name is absent. Only
        # a directory this node made (empty, with its capability) starts complete;
        # this node's own changes keep it so, anyone else's drop it.
        self._complete: set[int] = set()
        self._epoch = 0
        self.stats = {"hits": 0, "misses": 0, "drops": 0}

    # -- answers from the cache -------------------------------------------------------------
    def peek_getattr(self, ino: int) -> Attr | None:
        """The cached attributes, or None (never blocks)."""
        attr = self._attrs.get(ino)
        if attr is None or not self.trusted():
            return None
        self.stats["hits"] += 1
        return attr

    def peek_lookup(self, parent: int, name: bytes) -> Attr | None:
        """The cached answer of a lookup, None if not cached; raises FsError(ENOENT) for
        a name cached as absent (never blocks)."""
        names = self._names.get(parent)
        if names is None:
            return None
        ino = names.get(name, _MISS)
        if ino is _MISS:
            if parent not in self._complete:
                return None
            ino = None
        if not self.trusted():
            return None
        if ino is None:
            self.stats["hits"] += 1
            raise FsError(errno.ENOENT, f"{name.decode(errors='replace')} not found")
        assert isinstance(ino, int)
        attr = self._attrs.get(ino)
        if attr is None:
            return None
        self.stats["hits"] += 1
        return attr

    # -- calls that fill it -----------------------------------------------------------------
    def getattr(self, ino: int) -> Attr:
        hit = self.peek_getattr(ino)
        if hit is not None:
            return hit
        epoch = self._epoch
        self.stats["misses"] += 1
        body = self._call(msg.GetAttr(ino, cap=True))
        attr = wire.dec_attr(body["attr"])
        if body.get("cap"):
            self._insert(epoch, attr)
        return attr

    def lookup(self, parent: int, name: bytes) -> Attr:
        hit = self.peek_lookup(parent, name)
        if hit is not None:
            return hit
        epoch = self._epoch
        self.stats["misses"] += 1
        body = self._call(msg.Lookup(parent, name, cap=True))
        if body.get("absent"):
            if body.get("cap"):
                self._insert(epoch, None, parent, name)
            raise FsError(errno.ENOENT, f"{name.decode(errors='replace')} not found")
        attr = wire.dec_attr(body["attr"])
        if body.get("cap"):
            self._insert(epoch, attr, parent, name)
        return attr

    def _insert(self, epoch: int, attr: Attr | None, parent: int | None = None,
                name: bytes | None = None) -> None:
        with self._mu:
            if epoch != self._epoch:
                return  # a drop overtook this answer: it may be stale
            if len(self._attrs) >= MAX_INODES:
                self._attrs.clear()
                self._names.clear()
                self._complete.clear()
            if attr is not None:
                self._attrs[attr.ino] = attr
            if parent is not None and name is not None:
                self._names.setdefault(parent, {})[name] = None if attr is None else attr.ino

    def _call(self, request: msg.Request) -> dict[str, Any]:
        epoch = self._epoch
        body = super()._call(request)
        if body.get("touched"):
            self._after_change(epoch, request, body)
        return body

    def _after_change(self, epoch: int, request: msg.Request, body: dict[str, Any]) -> None:
        """This node changed the inodes ``touched``: cache what the change left when the
        coordinator let this node keep their capabilities and no drop came meanwhile,
        else forget them. Either way answers still on their way may predate the change:
        the epoch moves on."""
        touched = [int(i) for i in body["touched"]]
        names = _name_changes(request, body) if body.get("cap") else None
        attrs = {a.ino: a for a in map(wire.dec_attr, body.get("attrs", ()))}
        with self._mu:
            keep = names is not None and epoch == self._epoch
            self._epoch += 1
            for ino in touched:
                if keep and ino in attrs:
                    self._attrs[ino] = attrs[ino]
                else:
                    self._attrs.pop(ino, None)
                    self._names.pop(ino, None)
                    self._complete.discard(ino)
            if keep and names:
                for parent, name, child in names:
                    if parent in self._attrs:
                        self._names.setdefault(parent, {})[name] = child
            if keep and body.get("child_cap") and "attr" in body:
                new = wire.dec_attr(body["attr"])
                self._attrs[new.ino] = new
                if new.is_dir:
                    self._names[new.ino] = {}
                    self._complete.add(new.ino)

    # -- dropping ---------------------------------------------------------------------------
    def drop(self, inos: Iterable[int]) -> None:
        """Forget the inodes' attributes and, for directories, the names in them."""
        with self._mu:
            self._epoch += 1
            self.stats["drops"] += 1
            for ino in inos:
                self._attrs.pop(ino, None)
                self._names.pop(ino, None)
                self._complete.discard(ino)

    def drop_all(self) -> None:
        with self._mu:
            self._epoch += 1
            self._attrs.clear()
            self._names.clear()
            self._complete.clear()

    def cached(self) -> tuple[set[int], set[int]]:
        """(inodes with cached attributes, directories with cached names): for tests."""
        with self._mu:
            return set(self._attrs), {p for p, n in self._names.items() if n}


def _name_changes(request: msg.Request, body: dict[str, Any]
                  ) -> list[tuple[int, bytes, int | None]] | None:
    """The names a change made or removed, as (directory, name, inode or None); None
    when this cache cannot tell (then the touched inodes are forgotten instead)."""
    match request:
        case msg.Mknod(parent, name) | msg.Mkdir(parent, name) | msg.Symlink(parent, name):
            return [(parent, name, int(body["attr"]["ino"]))]
        case msg.Link(ino, new_parent, new_name):
            return [(new_parent, new_name, ino)]
        case msg.Unlink(parent, name) | msg.Rmdir(parent, name):
            return [(parent, name, None)]
        case msg.Setattr() | msg.Truncate() | msg.CommitWrite() | msg.Release():
            return []
    return None
