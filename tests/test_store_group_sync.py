"""MetaStore.sync is a group fsync: concurrent callers share fsyncs, and none returns
before an fsync that started after its own commit has finished (the guarantee the
change tracking and the ordered write protocol stand on)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdbackup.meta import store as store_mod
from sdbackup.meta.store import MetaStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetaStore]:
    s = MetaStore(tmp_path / "meta.db", create=True)
    s.execute("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v INTEGER)")
    yield s
    s.close()


def _slow_fsync(monkeypatch: pytest.MonkeyPatch, log: list[tuple[str, float]],
                delay: float = 0.05) -> None:
    real = os.fsync

    def fsync(fd: int) -> None:
        log.append(("start", time.monotonic()))
        time.sleep(delay)
        real(fd)
        log.append(("end", time.monotonic()))

    monkeypatch.setattr(store_mod.os, "fsync", fsync)


def test_concurrent_syncs_share_fsyncs_and_each_waits_for_one_after_its_commit(
        store: MetaStore, monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[tuple[str, float]] = []
    _slow_fsync(monkeypatch, log)
    committed: dict[int, float] = {}
    returned: dict[int, float] = {}

    def writer(i: int) -> None:
        with store.transaction():
            store.execute("INSERT INTO t(k, v) VALUES (?, ?)", (i, i))
        committed[i] = time.monotonic()
        store.sync()
        returned[i] = time.monotonic()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    starts = [t for what, t in log if what == "start"]
    ends = [t for what, t in log if what == "end"]
    assert len(starts) < 16, "no fsync was shared"
    for i in range(16):
        # some fsync started after this commit and ended before sync returned
        assert any(s >= committed[i] and e <= returned[i]
                   for s, e in zip(starts, ends, strict=True)), i


def test_a_sync_with_nothing_new_committed_costs_no_fsync(
        store: MetaStore, monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[tuple[str, float]] = []
    store.execute("INSERT INTO t(k, v) VALUES (1, 1)")  # autocommitted
    _slow_fsync(monkeypatch, log, 0)
    store.sync()
    assert len(log) == 2  # the autocommitted change is synced
    store.sync()
    assert len(log) == 2  # nothing new: no fsync
    store.execute("UPDATE t SET v=2 WHERE k=1")
    store.sync()
    assert len(log) == 4


def test_a_sync_under_the_store_lock_does_not_deadlock_with_one_in_progress(
        store: MetaStore) -> None:
    """A caller that holds the store lock (a truncate zeroing a tail maps blocks under
    it, and mapping syncs the change tracking) syncs while another thread's sync holds
    the fsync turn: both return. (The sync holding the turn once took the store lock to
    read its mark, and waited for the caller, which waited for the turn.)"""
    store.execute("INSERT INTO t(k, v) VALUES (1, 1)")
    entered, x_holds, done = threading.Event(), threading.Event(), threading.Event()
    inner = store._sync_mu

    class Gate:
        """The fsync turn; the first thread to take it waits until X holds the lock."""

        first = True

        def __enter__(self) -> None:
            inner.acquire()
            if Gate.first and threading.current_thread().name == "other":
                Gate.first = False
                entered.set()
                x_holds.wait(5)

        def __exit__(self, *exc: object) -> None:
            inner.release()

    store._sync_mu = Gate()  # type: ignore[assignment]

    def x() -> None:
        entered.wait(5)
        with store.lock:
            x_holds.set()
            store.execute("INSERT INTO t(k, v) VALUES (2, 2)")
            store.sync()
        done.set()

    threads = [threading.Thread(target=store.sync, name="other", daemon=True),
               threading.Thread(target=x, daemon=True)]
    for t in threads:
        t.start()
    assert done.wait(10), "sync under the store lock deadlocked with a sync in progress"
    for t in threads:
        t.join(10)
        assert not t.is_alive()
