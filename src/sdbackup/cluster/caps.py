"""Metadata capabilities: which nodes may answer ``lookup`` and ``getattr`` themselves.

A node that holds the capability of an inode keeps that inode's attributes (and, for a
directory, the names it looked up in it, found or not) and answers the kernel from
them without asking the coordinator, as NFSv4 delegations and CephFS capabilities do.
The coordinator keeps the table of holders and takes the capability back
(``drop_caps``) from every holder but the actor *before* it changes the inode, and
once more after, so that a node's cache is never older than the coordinator's
metadata:

- ``stamp()`` is read before the coordinator reads what it sends with a grant;
  ``grant(node, inos, since)`` refuses if any of the inodes was broken after
  ``since`` (the answer may be stale) or if ``ok()`` says no (another node holds a
  write right on the file: its size and times change in that node's cache);
- ``break_(inos, actor)`` marks the inodes changed, removes every holder but the
  actor and waits until each of them has dropped them; a holder that does not answer
  is fenced (which returns only once its lease ran out: it can no longer answer from
  its cache either, because a node trusts its cache only while its lease holds);
- the actor keeps its capability and drops its own entries of the inodes it changed
  when the answer names them (``touched``); a node drops what it learnt from any
  answer that raced a drop (see :class:`~sdbackup.net.cached_meta.CachingMeta`).

Invariant (checked by tests/test_meta_caps.py): an inode in a node's cache has a
capability for that node in this table, and no mutation of the inode has completed
since that node read it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("sdbackup.cluster")

DropFn = Callable[[str, list[int]], None]
"""drop(node, inos): the node forgets the inodes; raises when it cannot answer."""
FenceFn = Callable[[str, str], None]

MAX_STAMPS = 200_000
"""Change stamps kept per inode; older ones fold into one floor (grants older than the
floor are refused: only a lookup slower than 200,000 changes is affected)."""


class CapTable:
    """Holders of metadata capabilities, and breaking them before a change."""

    def __init__(self, drop: DropFn, fence: FenceFn) -> None:
        self._drop = drop
        self._fence = fence
        self._mu = threading.Lock()
        self._holders: dict[int, set[str]] = {}
        self._by_node: dict[str, set[int]] = {}
        self._changed: OrderedDict[int, int] = OrderedDict()
        self._floor = 0
        self._clock = 0
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sdb-caps")
        self.stats = {"grants": 0, "refused": 0, "drops": 0}

    def stamp(self) -> int:
        """The change clock now: read it before reading what a grant will carry."""
        with self._mu:
            return self._clock

    def grant(self, node: str, inos: Iterable[int], since: int,
              ok: Callable[[], bool] = lambda: True) -> bool:
        """Register ``node`` as holder of ``inos`` unless one changed after ``since``."""
        inos = list(inos)
        with self._mu:
            if since < self._floor or any(self._changed.get(i, 0) > since for i in inos) \
                    or not ok():
                self.stats["refused"] += 1
                return False
            mine = self._by_node.setdefault(node, set())
            for i in inos:
                self._holders.setdefault(i, set()).add(node)
                mine.add(i)
            self.stats["grants"] += 1
            return True

    def break_(self, inos: Iterable[int], actor: str | None, *, since: int | None = None,
               ok: Callable[[], bool] = lambda: True) -> bool:
        return self._break(inos, actor, since, ok)[0]

    def _break(self, inos: Iterable[int], actor: str | None, since: int | None,
               ok: Callable[[], bool]) -> tuple[bool, int]:
        """Take the inodes' capabilities back from every holder but ``actor``.

        Returns once every such holder has dropped them (or was fenced). With
        ``since`` (the stamp this change's first break returned, see
        :meth:`begin`): True when nothing else changed the inodes since, and
        ``ok()``: the actor is then registered for all of them, and may cache what
        the change left (the state after it is exactly what it read)."""
        inos = list(inos)
        todo: dict[str, list[int]] = {}
        kept = False
        with self._mu:
            if since is not None and actor is not None and since >= self._floor and \
                    all(self._changed.get(i, 0) == since for i in inos) and ok():
                kept = True
                mine = self._by_node.setdefault(actor, set())
                for i in inos:
                    self._holders.setdefault(i, set()).add(actor)
                    mine.add(i)
            self._clock += 1
            clock = self._clock
            for i in inos:
                self._changed[i] = clock
                self._changed.move_to_end(i)
                holders = self._holders.get(i)
                if not holders:
                    continue
                for node in list(holders):
                    if node == actor:
                        continue
                    holders.discard(node)
                    self._by_node.get(node, set()).discard(i)
                    todo.setdefault(node, []).append(i)
                if not holders:
                    del self._holders[i]
            while len(self._changed) > MAX_STAMPS:
                _, old = self._changed.popitem(last=False)
                self._floor = max(self._floor, old)
        if todo:
            self.stats["drops"] += len(todo)
            if len(todo) == 1:
                (node, lst), = todo.items()
                self._drop_one(node, lst)
            else:
                for f in [self._pool.submit(self._drop_one, n, lst)
                          for n, lst in todo.items()]:
                    f.result()
        return kept, clock

    def begin(self, inos: Iterable[int], actor: str) -> int:
        """The first break of a change; returns its stamp (for the last break's
        ``since``)."""
        return self._break(inos, actor, None, lambda: True)[1]

    def _drop_one(self, node: str, inos: list[int]) -> None:
        try:
            self._drop(node, inos)
        except Exception as e:  # no answer: it may still serve its cache until fenced
            self._fence(node, f"did not answer a capability recall of inodes {inos[:8]}: {e}")
            self.forget(node)

    def forget(self, node: str) -> None:
        """The node's session ended (left or fenced): it holds nothing any more."""
        with self._mu:
            for i in self._by_node.pop(node, set()):
                holders = self._holders.get(i)
                if holders is not None:
                    holders.discard(node)
                    if not holders:
                        del self._holders[i]

    def holders(self, ino: int) -> set[str]:
        with self._mu:
            return set(self._holders.get(ino, ()))

    def held_by(self, node: str) -> set[int]:
        with self._mu:
            return set(self._by_node.get(node, ()))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
