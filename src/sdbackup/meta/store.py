"""The coordinator's metadata store: one SQLite database in WAL mode.

Why SQLite: one file, transactions, and an online backup API that copies one
consistent snapshot while writers go on (the freeze at T0 needs exactly that).
Only the coordinator opens the store; nodes reach it through the coordinator.

Pragmas, and why:

- ``journal_mode=WAL``: readers (fsck, the backup snapshot) never block the writer
  and see one consistent state.
- ``synchronous=NORMAL``: a commit is not fsynced one by one (20,000 file creates
  would otherwise wait for 20,000 fsyncs); the database stays consistent after a
  power loss and loses at most the last commits. :meth:`MetaStore.sync` makes
  everything committed so far durable, and the file system calls it on ``fsync``.
- ``foreign_keys=OFF``: the invariants are checked by ``sdbackup fsck`` per table,
  where a violation can be reported precisely instead of aborting a transaction.

**Group commit** (:meth:`MetaStore.group_commits`, the embedded default): transactions
run as savepoints inside one longer transaction that is committed every
``GROUP_OPS`` transactions or ``GROUP_SECONDS``, on :meth:`sync` and before a
snapshot, and always after ``before_commit`` (the shared disks' ``fdatasync``). So a
metadata change can reach stable storage only after the file data it points at (the
guarantee ext4 calls data=ordered), and a burst of small writes pays one disk flush
per group, not one per write. Uncommitted changes are invisible to other connections
and are simply lost in a crash, exactly like data that was never fsynced.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sdbackup.errors import CorruptError

SCHEMA_VERSION = 1
GROUP_OPS = 2000  # transactions per group commit
GROUP_SECONDS = 0.5  # and at most this old

Param = int | str | bytes | float | None


def create_tables(db: sqlite3.Connection) -> None:
    """Create the whole schema. Each table's comment names its invariants."""
    db.executescript(
        """
        -- Key/value facts about the cluster: schema_version, cluster_id, block_size.
        CREATE TABLE IF NOT EXISTS meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );

        -- The shared disks. id is stable for the cluster's life and is what media
        -- records carry. Blocks [0, reserved) hold the disk label and belong to no
        -- file; they are always marked used in the allocation bitmap.
        CREATE TABLE IF NOT EXISTS disks (
            id       INTEGER PRIMARY KEY,
            name     TEXT NOT NULL UNIQUE,
            nblocks  INTEGER NOT NULL,
            reserved INTEGER NOT NULL
        );

        -- One row per file, directory or symlink. mode carries the S_IFMT type bits.
        -- nlink = number of dirents naming the inode (+1 for '.' and +1 per child
        -- directory for directories). An inode with nlink 0 lives only while open.
        -- size is in bytes; for directories it is informational.
        -- Inode 1 is the root directory.
        CREATE TABLE IF NOT EXISTS inodes (
            id       INTEGER PRIMARY KEY,
            mode     INTEGER NOT NULL,
            uid      INTEGER NOT NULL,
            gid      INTEGER NOT NULL,
            size     INTEGER NOT NULL DEFAULT 0,
            atime_ns INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            ctime_ns INTEGER NOT NULL,
            nlink    INTEGER NOT NULL,
            rdev     INTEGER NOT NULL DEFAULT 0,
            target   BLOB                    -- symlink target, NULL otherwise
        );

        -- Directory entries. (parent, name) is unique; name never contains b'/' or
        -- b'\\0' and is 1..255 bytes; '.' and '..' are not stored. id orders entries
        -- for readdir offsets (stable across inserts). A directory inode has exactly
        -- one entry naming it (the root has none).
        CREATE TABLE IF NOT EXISTS dirents (
            id     INTEGER PRIMARY KEY,
            parent INTEGER NOT NULL,
            name   BLOB NOT NULL,
            ino    INTEGER NOT NULL,
            UNIQUE (parent, name)
        );
        CREATE INDEX IF NOT EXISTS dirents_ino ON dirents (ino);

        -- File block run -> disk block run. Runs of one inode never overlap in file
        -- blocks; no disk block belongs to two runs (of any inode); every disk block
        -- of a run is marked used in alloc; no run lies wholly at or beyond the
        -- file's size (ceil(size / block_size) blocks). A hole is the absence of a run.
        CREATE TABLE IF NOT EXISTS extents (
            ino    INTEGER NOT NULL,
            fblock INTEGER NOT NULL,
            count  INTEGER NOT NULL CHECK (count > 0),
            disk   INTEGER NOT NULL,
            dblock INTEGER NOT NULL,
            PRIMARY KEY (ino, fblock)
        ) WITHOUT ROWID;

        -- The allocation bitmap (the seed's empty-area control table, Fig. 18), in
        -- chunks: bit i of byte j of chunk c of disk d is block
        -- c * CHUNK_BITS + j * 8 + i (little-endian bit order). Set = used.
        -- A missing chunk is all free. Exactly the blocks of extents plus the
        -- reserved blocks are set.
        CREATE TABLE IF NOT EXISTS alloc (
            disk  INTEGER NOT NULL,
            chunk INTEGER NOT NULL,
            bits  BLOB NOT NULL,
            PRIMARY KEY (disk, chunk)
        ) WITHOUT ROWID;
        """
    )


def damaged_store(path: Path, e: Exception) -> CorruptError:
    """The one-line error for a metadata store SQLite cannot read."""
    return CorruptError(f"metadata store {path} is damaged ({e}): restore the cluster from "
                        "a backup with 'sdbackup restore-cluster'")


class MetaStore:
    """A thin wrapper around one SQLite connection, shared by the coordinator's threads.

    All access is serialised by ``self.lock`` (SQLite allows one writer anyway, and
    the coordinator's metadata operations are short). ``transaction()`` is the only
    way to change data: it commits everything or nothing.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False,
                 read_only: bool = False) -> None:
        """``read_only``: an immutable store (a backup generation's metadata snapshot,
        checksummed before it is opened): SQLite's ``immutable`` read-only mode writes
        nothing next to it (no journal, no WAL, no lock file)."""
        self.path = Path(path)
        self.read_only = read_only
        if not create and not self.path.exists():
            from sdbackup.errors import NotFoundError

            raise NotFoundError(f"metadata store {self.path} is missing")
        if read_only:
            self.db = sqlite3.connect(self.path.absolute().as_uri() + "?mode=ro&immutable=1",
                                      uri=True, isolation_level=None, check_same_thread=False)
        else:
            self.db = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False, timeout=30
            )
        try:
            if not create:  # reads the schema first (a truncated or foreign file fails
                # here, before anything is written to it)
                self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if read_only:
                self.db.execute("PRAGMA cache_size=-65536")
            else:
                self._set_pragmas()
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise damaged_store(self.path, e) from None
        self.lock = threading.RLock()
        self._depth = 0
        # Group fsync (see sync): one fsync at a time; ``_synced`` is the connection's
        # change count that the last finished fsync covered.
        self._sync_mu = threading.Lock()
        self._synced = -1
        self._before_commit: Callable[[], None] | None = None
        self._group_open = False
        self._group_ops = 0
        self._group_started = 0.0
        if create:
            create_tables(self.db)

    def _set_pragmas(self) -> None:
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=OFF")
        # A big page cache: the metadata of 100,000 files fits in memory.
        self.db.execute("PRAGMA cache_size=-65536")

    def group_commits(self, before_commit: Callable[[], None]) -> None:
        """From now on, commit transactions in groups, each after ``before_commit()``
        returned (see the module docstring). A ``before_commit`` that raises leaves the
        group uncommitted (and retried at the next commit point)."""
        with self.lock:
            self._before_commit = before_commit

    def checkpoint(self) -> None:
        """Commit the open group and move the whole WAL into the database file."""
        with self.lock:
            self.commit_group()
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def in_transaction(self) -> bool:
        """A transaction of this connection is running (its changes are not committed)."""
        return self._depth > 0

    def commit_group(self) -> None:
        """Commit the open group, if any: first ``before_commit()``, then COMMIT."""
        with self.lock:
            if not self._group_open or self._depth:
                return
            assert self._before_commit is not None
            self._before_commit()
            self.db.execute("COMMIT")
            self._group_open = False

    def close(self) -> None:
        with self.lock:
            self.commit_group()
            self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the body in one transaction (nested calls join the outer one)."""
        with self.lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            if self._before_commit is not None:
                yield from self._grouped()
                return
            self.db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._depth = 0
                self.db.execute("ROLLBACK")
                raise
            self._depth = 0
            self.db.execute("COMMIT")

    def _grouped(self) -> Iterator[None]:
        """One transaction as a savepoint of the open group (caller holds the lock)."""
        if not self._group_open:
            self.db.execute("BEGIN IMMEDIATE")
            self._group_open = True
            self._group_ops = 0
            self._group_started = time.monotonic()
        self.db.execute("SAVEPOINT tx")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            self.db.execute("ROLLBACK TO tx")
            self.db.execute("RELEASE tx")
            raise
        self._depth = 0
        self.db.execute("RELEASE tx")
        self._group_ops += 1
        if self._group_ops >= GROUP_OPS or \
                time.monotonic() - self._group_started >= GROUP_SECONDS:
            self.commit_group()

    def query(self, sql: str, params: Sequence[Param] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            return self.db.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Sequence[Param] = ()) -> sqlite3.Cursor:
        with self.lock:
            return self.db.execute(sql, params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Param]]) -> None:
        with self.lock:
            self.db.executemany(sql, rows)

    def get_row(self, sql: str, params: Sequence[Param] = ()) -> tuple[Any, ...] | None:
        with self.lock:
            row: tuple[Any, ...] | None = self.db.execute(sql, params).fetchone()
            return row

    def get_val(self, sql: str, params: Sequence[Param] = ()) -> Any:
        row = self.get_row(sql, params)
        if row is None:
            raise KeyError(sql)
        return row[0]

    def has_val(self, sql: str, params: Sequence[Param] = ()) -> bool:
        return self.get_row(sql, params) is not None

    def get_meta(self, key: str) -> str | None:
        row = self.get_row("SELECT value FROM meta WHERE key=?", (key,))
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def sync(self) -> None:
        """Make every committed transaction durable (fsync the write-ahead log).

        Not under ``self.lock``: an fsync takes milliseconds, and every metadata call of
        every node would queue behind it; fsync covers whatever was committed before
        it started, which is all a caller needs. An open group is committed first.

        Group fsync: callers that arrive while an fsync runs wait for it, and the first
        of them then starts one fsync for all of them; a caller whose changes an fsync
        that *started* after them already covered returns at once. Changes are counted
        with SQLite's ``total_changes``, read under the lock with no transaction open,
        so every change counted is committed (autocommitted statements included)."""
        mark = self._committed_mark()
        # Never take ``self.lock`` under ``_sync_mu``: a caller may hold the store lock
        # while it syncs (a truncate's zeroing maps blocks under it), and the fsync in
        # progress would wait for it while it waits for the fsync -- a deadlock found
        # by tests/test_backup_never_fails_writers.py under load. The fsync below began
        # after ``mark`` was read, so it covers at least ``mark`` changes.
        with self._sync_mu:
            if mark is not None and self._synced >= mark:
                return  # an fsync that started after our commit has finished
            # Cover the callers that committed while we waited too (one fsync for the
            # group) when the store lock is free; never wait for it here.
            if mark is not None and self.lock.acquire(blocking=False):
                try:
                    if not self._depth:
                        self.commit_group()
                        mark = int(self.db.total_changes)
                finally:
                    self.lock.release()
            wal = Path(str(self.path) + "-wal")
            target = wal if wal.exists() else self.path
            fd = os.open(target, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if mark is not None:
                self._synced = max(self._synced, mark)

    def _committed_mark(self) -> int | None:
        """The number of changes committed so far (after committing an open group), or
        None inside a transaction of the calling thread (changes not committed yet)."""
        with self.lock:
            if self._depth:
                return None
            self.commit_group()
            return int(self.db.total_changes)

    def snapshot_to(self, dest: str | os.PathLike[str]) -> None:
        """Copy one consistent snapshot of the store to ``dest`` (SQLite backup API).

        Done in one step (``pages=-1``) under the store lock, so that the copy is the
        state at one instant: the freeze at T0 uses it.
        """
        with self.lock:
            self.commit_group()
            target = sqlite3.connect(str(dest))
            try:
                self.db.backup(target, pages=-1)
            finally:
                target.close()
