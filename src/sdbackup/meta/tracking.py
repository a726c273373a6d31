"""Changed-block tracking: which blocks may differ from what a generation holds
(seed a.9, Fig. 20; marks a.11, Fig. 26).

Time is cut into **eras**. An era starts at a backup's T0 (inside the freeze) or at a
mark, and lasts until the next one. Every block that may be written during an era is
recorded in that era's set, per disk. An incremental backup whose parent's T0 started
era ``p`` copies ``(union of eras >= p) & (used blocks at T0)``: exactly the blocks that may have
changed since the parent, never a disk or namespace scan.

What is recorded, and when it is durable (the guarantee incrementals stand on: **a
block is durably recorded before a write to it can reach the disk**, as dm-era does):

* An **overwrite in place** (``map_write`` answering an existing extent, the
  coordinator's tail zeroing): the rows are committed *and* the store is synced before
  ``map_write`` returns, so before any node may write. The first write to a block in
  an era pays one sync; later ones find the block recorded in memory and pay nothing.
  The in-memory set holds only recorded blocks that are durable, or that become
  durable no later than the extent that makes them reachable (next point), so the
  "already recorded" shortcut never skips a needed sync.
* A **newly allocated** block: recorded in the same transaction as the
  ``commit_write`` that makes it part of a file. Its data reaches the disk before
  that commit, but until the commit is durable the block is free, and an incremental
  copies only blocks in use at T0; SQLite's write-ahead log makes a later commit
  durable only with every earlier one, so the extent is never durable without its
  record.
* **Frees** (truncate, unlink): recorded in the transaction that frees them. They
  cannot change what any generation restores (a freed block is unused, and using it
  again is an allocation), but they keep the change list the seed describes.

Nothing else writes file data to the shared disks.

An era set is kept in memory as a :class:`~sdbackup.blocks.blockset.BlockSet` per disk
and in the store as rows appended since the last compaction (``track_runs``) plus one
serialized set per era and disk (``track_sets``). :meth:`ChangeTracker.compact` (after
each backup, outside the freeze) folds the rows into the sets and merges eras that no
chain or mark can ask for separately, and drops eras older than every chain's base.
So the number of eras kept is at most the number of chains plus marks plus one, and
the cost per TiB written is that of a roaring bitmap of the changed blocks (at 4 KiB
blocks: about 64 KiB for sequential writes, at most 32 MiB when every other block
changed), in memory and in the store alike.

The **token** names one tracking history. A generation records the token and its era;
an incremental is allowed only when the cluster's token is the same and the parent's
era is still kept. Restoring a cluster from a backup starts a new token
(:meth:`ChangeTracker.reset`), so that an incremental can never be taken against disks
that were rolled back.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from sdbackup.blocks.blockset import BlockSet
from sdbackup.errors import SdbError
from sdbackup.meta.store import MetaStore

Run = tuple[int, int, int]  # (disk, start, count)

TABLES = """
-- Changed-block tracking (meta/tracking.py). One row per era: an era starts at a
-- backup's T0 or at a mark, and the highest era is the current one.
CREATE TABLE IF NOT EXISTS track_eras (
    era        INTEGER PRIMARY KEY,
    started_ns INTEGER NOT NULL,
    why        TEXT NOT NULL
);
-- Blocks recorded during an era since the last compaction (runs, may overlap).
CREATE TABLE IF NOT EXISTS track_runs (
    era   INTEGER NOT NULL,
    disk  INTEGER NOT NULL,
    start INTEGER NOT NULL,
    count INTEGER NOT NULL CHECK (count > 0)
);
-- Blocks recorded during an era up to the last compaction (a serialized BlockSet).
CREATE TABLE IF NOT EXISTS track_sets (
    era  INTEGER NOT NULL,
    disk INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (era, disk)
) WITHOUT ROWID;
-- Marks (a.11): the next incremental of every chain starts at the newest mark
-- made after its parent.
CREATE TABLE IF NOT EXISTS track_marks (
    name       TEXT PRIMARY KEY,
    era        INTEGER NOT NULL,
    created_ns INTEGER NOT NULL
);
-- The eras a chain may still ask changes since (its last generations' T0 eras).
CREATE TABLE IF NOT EXISTS track_chains (
    chain TEXT NOT NULL,
    era   INTEGER NOT NULL,
    PRIMARY KEY (chain, era)
) WITHOUT ROWID;
"""

TOKEN_KEY = "tracking_token"


class TrackingLost(SdbError):
    """The changes since a generation are no longer known (another tracking history,
    or eras dropped): an incremental cannot be made from it."""

    exit_code = 2


@dataclass(frozen=True)
class Mark:
    name: str
    era: int
    created_ns: int

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "era": self.era, "created_ns": self.created_ns}


class ChangeTracker:
    """The cluster's changed-block tracking (see the module docstring).

    Every method that changes the store must run inside the caller's store
    transaction, except :meth:`record_overwrites`, which commits and syncs itself.
    Thread-safe: the in-memory sets are guarded by ``self._lock``; store work by the
    store's lock.
    """

    def __init__(self, store: MetaStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        with store.lock:
            for stmt in TABLES.split(";"):  # not executescript: it would COMMIT an open group
                if stmt.strip():
                    store.execute(stmt)
            token = store.get_meta(TOKEN_KEY)
            if token is None or not store.has_val("SELECT era FROM track_eras"):
                with store.transaction():
                    self._start_history("start")
                token = store.get_meta(TOKEN_KEY)
            assert token is not None
            self.token = token
            self._eras: dict[int, dict[int, BlockSet]] = {}
            for (era,) in store.query("SELECT era FROM track_eras ORDER BY era"):
                self._eras[int(era)] = {}
            self.era = max(self._eras)
            for era, disk, data in store.query("SELECT era, disk, data FROM track_sets"):
                self._set(int(era), int(disk)).__ior__(BlockSet.deserialize(data))
            rows = np.asarray(store.query(
                "SELECT era, disk, start, count FROM track_runs ORDER BY era, disk"),
                dtype=np.int64).reshape(-1, 4)
            if rows.size:
                keys, first = np.unique(rows[:, :2], axis=0, return_index=True)
                bounds = [*first.tolist(), len(rows)]
                for i, (era, disk) in enumerate(keys.tolist()):
                    part = rows[bounds[i]:bounds[i + 1], 2:]
                    self._set(era, disk).__ior__(BlockSet.from_runs(part))

    def _start_history(self, why: str) -> None:
        for t in ("track_eras", "track_runs", "track_sets", "track_marks", "track_chains"):
            self.store.execute(f"DELETE FROM {t}")
        self.store.set_meta(TOKEN_KEY, uuid.uuid4().hex)
        self.store.execute("INSERT INTO track_eras(era, started_ns, why) VALUES (1, ?, ?)",
                           (time.time_ns(), why))

    def _set(self, era: int, disk: int) -> BlockSet:
        sets = self._eras.setdefault(era, {})
        s = sets.get(disk)
        if s is None:
            s = sets[disk] = BlockSet()
        return s

    # -- recording ------------------------------------------------------------------------
    def unrecorded(self, runs: Iterable[Run]) -> list[Run]:
        """The runs not all recorded in the current era yet (whole runs: a superset)."""
        with self._lock:
            cur = self._eras[self.era]
            out = []
            for disk, start, count in runs:
                s = cur.get(disk)
                if s is None or not s.contains_run(start, count):
                    out.append((disk, start, count))
            return out

    def insert(self, runs: Sequence[Run]) -> int:
        """Add rows for ``runs`` to the current era (inside the caller's transaction);
        returns that era, for :meth:`confirm`."""
        era = self.era
        if runs:
            self.store.executemany(
                "INSERT INTO track_runs(era, disk, start, count) VALUES (?,?,?,?)",
                [(era, d, s, c) for d, s, c in runs])
        return era

    def confirm(self, era: int, runs: Iterable[Run]) -> None:
        """The rows of ``runs`` are committed: remember them in memory."""
        with self._lock:
            for disk, start, count in runs:
                self._set(era, disk).add_run(start, count)

    def record_overwrites(self, runs: Sequence[Run]) -> None:
        """Durably record blocks that are about to be overwritten in place: returns
        only when the records are on stable storage (or all were already)."""
        need = self.unrecorded(runs)
        if not need:
            return
        with self.store.lock, self.store.transaction():
            era = self.insert(need)
        self.store.sync()
        self.confirm(era, need)

    # -- eras, marks, chains ------------------------------------------------------------------
    def new_era(self, why: str) -> int:
        """Start a new era (inside the caller's transaction, under the freeze when a
        backup takes its T0). Returns its number."""
        with self._lock:
            era = self.era + 1
            self.store.execute("INSERT INTO track_eras(era, started_ns, why) VALUES (?,?,?)",
                               (era, time.time_ns(), why))
            self._eras[era] = {}
            self.era = era
            return era

    def changed_since(self, era: int) -> dict[int, BlockSet]:
        """Every block recorded in ``era`` or later, per disk (a superset when ``era``
        was merged into an earlier one by :meth:`compact`)."""
        with self._lock:
            first = min(self._eras)
            if era < first:
                raise TrackingLost(
                    f"the changes since era {era} are no longer tracked (the oldest kept "
                    f"is {first})")
            if era > self.era:
                raise TrackingLost(f"era {era} has not started (the current one is "
                                   f"{self.era}): the tracking history was replaced")
            since = max(e for e in self._eras if e <= era)
            out: dict[int, BlockSet] = {}
            for e, sets in self._eras.items():
                if e >= since:
                    for disk, s in sets.items():
                        have = out.get(disk)
                        out[disk] = s.copy() if have is None else have.__ior__(s)
            return out

    def base_for(self, parent_era: int) -> tuple[int, Mark | None]:
        """Where the changes of an incremental after a parent of era ``parent_era``
        start: that era, or the newest mark made after the parent's T0 (a.11)."""
        marks = [m for m in self.marks() if m.era > parent_era]
        if not marks:
            return parent_era, None
        m = max(marks, key=lambda m: m.era)
        return m.era, m

    def add_mark(self, name: str) -> Mark:
        """A mark now: a new era, remembered by name (inside the caller's transaction)."""
        if self.store.has_val("SELECT 1 FROM track_marks WHERE name=?", (name,)):
            from sdbackup.errors import UsageError

            raise UsageError(f"a mark named {name!r} exists already; pick another name")
        era = self.new_era(f"mark {name}")
        now = time.time_ns()
        self.store.execute("INSERT INTO track_marks(name, era, created_ns) VALUES (?,?,?)",
                           (name, era, now))
        return Mark(name, era, now)

    def mark_now(self, name: str) -> Mark:
        """Set a mark, durably: the next incremental of every chain holds only the
        changes recorded after this instant (a.11)."""
        with self.store.lock, self.store.transaction():
            m = self.add_mark(name)
        self.store.sync()
        return m

    def marks(self) -> list[Mark]:
        return [Mark(str(n), int(e), int(t)) for n, e, t in self.store.query(
            "SELECT name, era, created_ns FROM track_marks ORDER BY era")]

    def chain_at(self, chain: str, era: int) -> None:
        """Chain ``chain`` took a generation whose T0 started ``era``: keep the changes
        since then (inside the caller's transaction)."""
        self.store.execute("INSERT OR IGNORE INTO track_chains(chain, era) VALUES (?,?)",
                           (chain, era))

    def chain_committed(self, chain: str, era: int) -> None:
        """The generation of ``chain`` at ``era`` is committed: the chain needs no older
        era (its earlier generations are covered)."""
        with self.store.transaction():
            self.store.execute("DELETE FROM track_chains WHERE chain=? AND era<?", (chain, era))

    def forget_chain(self, chain: str) -> None:
        with self.store.transaction():
            self.store.execute("DELETE FROM track_chains WHERE chain=?", (chain,))

    def chains(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for chain, era in self.store.query("SELECT chain, era FROM track_chains ORDER BY era"):
            out.setdefault(str(chain), []).append(int(era))
        return out

    # -- upkeep -------------------------------------------------------------------------------
    def compact(self) -> None:
        """Fold the rows into one set per era and disk; merge eras no chain or mark
        starts at; drop eras older than every chain's base. Cost: the size of the
        changed sets, not of the disks. Call outside the freeze."""
        with self.store.lock, self.store.transaction():
            starts = {e for eras in self.chains().values() for e in eras}
            oldest_base = min(starts) if starts else self.era
            starts |= {m.era for m in self.marks() if m.era >= oldest_base}
            starts.add(self.era)
            keep_from = min(starts)
            with self._lock:
                merged: dict[int, dict[int, BlockSet]] = {}
                bounds = sorted(starts)
                for e in sorted(self._eras):
                    if e < keep_from:
                        continue
                    base = max(b for b in bounds if b <= e)
                    tgt = merged.setdefault(base, {})
                    for disk, s in self._eras[e].items():
                        have = tgt.get(disk)
                        tgt[disk] = s.copy() if have is None else have.__ior__(s)
                for e in bounds:
                    merged.setdefault(e, {})
                self.store.execute("DELETE FROM track_runs")
                self.store.execute("DELETE FROM track_sets")
                keep = ",".join(str(int(e)) for e in bounds)
                self.store.execute(f"DELETE FROM track_eras WHERE era NOT IN ({keep})")
                self.store.executemany(
                    "INSERT INTO track_sets(era, disk, data) VALUES (?,?,?)",
                    [(e, d, s.serialize()) for e, sets in merged.items()
                     for d, s in sets.items() if s])
                self._eras = merged

    def reset(self, why: str) -> None:
        """Start a new tracking history (a new token): no incremental can follow a
        generation of the old one. Inside the caller's transaction."""
        with self._lock:
            self._start_history(why)
            token = self.store.get_meta(TOKEN_KEY)
            assert token is not None
            self.token = token
            self._eras = {1: {}}
            self.era = 1

    def stats(self) -> dict[str, object]:
        """Eras kept, blocks recorded and bytes of memory, for ``status`` and the docs."""
        with self._lock:
            blocks = sum(len(s) for sets in self._eras.values() for s in sets.values())
            mem = sum(len(s.serialize()) for sets in self._eras.values() for s in sets.values())
            return {"token": self.token, "era": self.era, "eras": len(self._eras),
                    "blocks": blocks, "bytes": mem}
