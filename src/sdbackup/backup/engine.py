"""A full backup of a :class:`~sdbackup.backup.source.BackupSource` to a disk medium.

Steps (each a function, so that online backup can move them around):

1. **T0** (:func:`take_t0`, inside ``source.freeze``): the source flushes dirty caches,
   holds new writes and writes the metadata snapshot into the generation directory;
   the used blocks of every disk are listed from the allocation bitmap (the plan).
2. **Copy** (:class:`~sdbackup.backup.copy.Copier`): the planned blocks go into record
   stream ``stream-0.sdr``. For now this happens inside the freeze, so writes are held
   for the whole backup; issue 6 moves it after the thaw and adds before-image logs.
3. **Finish** (after the thaw): the snapshot is made self-contained (rollback journal,
   no WAL) and checksummed, the index is written, and finally the manifest
   (:meth:`~sdbackup.media.medium.PendingGeneration.commit`): only now does the
   generation exist. Any failure before that removes the generation directory
   (a crash leaves it for ``gc``), and nothing else on the medium is touched.

A tiny test hook, ``SDBACKUP_TEST_CRASH_AT=after-snapshot|mid-copy|before-manifest``,
kills the process with SIGKILL at that point (crash tests).
"""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sdbackup import __version__
from sdbackup.backup.copy import BATCH_BYTES, GAP_BYTES, RECORD_BYTES, Copier, CopyResult
from sdbackup.backup.plan import Plan, make_plan
from sdbackup.backup.source import BackupSource, Snapshot
from sdbackup.errors import CorruptError, NoSpaceError, UsageError
from sdbackup.media.index import make_entries, write_index
from sdbackup.media.medium import (
    INDEX,
    META,
    DiskEntry,
    DiskMedium,
    FileEntry,
    Manifest,
    PendingGeneration,
    file_digest,
    stream_name,
)
from sdbackup.media.records import Compression, Kind, RecordWriter
from sdbackup.media.snapshot import SnapshotMeta

CRASH_ENV = "SDBACKUP_TEST_CRASH_AT"
CRASH_POINTS = ("after-snapshot", "mid-copy", "before-manifest")


def _crash_point(name: str) -> None:
    """Test hook: die here, as ``kill -9`` would, when asked to."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def parse_compression(text: str) -> tuple[Compression, int]:
    """``none``, ``zstd`` or ``zstd:LEVEL`` (1..19) -> (compression, level)."""
    name, _, level = text.strip().lower().partition(":")
    if name == "none" and not level:
        return "none", 0
    if name == "zstd":
        if not level:
            return "zstd", 1
        if level.isdigit() and 1 <= int(level) <= 19:
            return "zstd", int(level)
    raise UsageError(f"bad compression {text!r}: use none, zstd or zstd:LEVEL with LEVEL "
                     "1 to 19 (e.g. zstd:1, the fastest)")


@dataclass
class BackupOptions:
    compression: Compression = "zstd"
    level: int = 1
    threads: int | None = None  # compression threads (default: CPUs, at most 8)
    batch_bytes: int = BATCH_BYTES
    record_bytes: int = RECORD_BYTES
    gap_bytes: int = GAP_BYTES

    @property
    def compression_text(self) -> str:
        return "none" if self.compression == "none" else f"zstd:{self.level}"


@dataclass
class BackupResult:
    manifest: Manifest
    medium: DiskMedium
    read_bytes: int
    records: int
    runs: int
    seconds: float

    @property
    def raw_bytes(self) -> int:
        return self.manifest.blocks * self.manifest.block_size

    def summary(self) -> dict[str, object]:
        m = self.manifest
        return {
            "generation": m.id, "medium": str(self.medium.root), "kind": m.kind,
            "cluster_id": m.cluster_id, "t0": m.to_dict()["t0"]["wall"],
            "blocks": m.blocks, "block_size": m.block_size, "raw_bytes": self.raw_bytes,
            "read_bytes": self.read_bytes, "stored_bytes": m.stored_bytes,
            "total_bytes": m.total_bytes, "records": self.records, "runs": self.runs,
            "compression": m.compression, "seconds": round(self.seconds, 3),
            "freeze_seconds": round(m.freeze_seconds, 3),
            "copy_seconds": round(m.copy_seconds, 3),
            "rate_bytes_per_second": round(self.raw_bytes / self.seconds) if self.seconds else 0,
            "disks": [{"name": d.name, "id": d.id, "nblocks": d.nblocks, "blocks": d.blocks}
                      for d in m.disks],
        }


def take_t0(source: BackupSource) -> Plan:
    """List the used blocks (inside the freeze, right after the snapshot)."""
    return make_plan(source)


def run_backup(
    source: BackupSource,
    medium_path: str | os.PathLike[str],
    options: BackupOptions | None = None,
    *,
    on_plan: Callable[[Plan], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> BackupResult:
    """Make a full backup of ``source`` as a new generation on the medium at
    ``medium_path`` (created when new). Returns the committed generation's result."""
    opts = options or BackupOptions()
    cfg = source.config
    medium = DiskMedium.open_for_backup(medium_path, cfg.cluster_id)
    started = time.monotonic()
    pending = medium.begin()
    try:
        return _backup(source, medium, pending, opts, started, on_plan, progress)
    except BaseException as e:
        pending.discard()
        if isinstance(e, NoSpaceError):
            raise NoSpaceError(f"{e.message}; generation {pending.id} was not committed and "
                               "has been removed (earlier generations are intact)") from None
        if _is_no_space(e, medium.root):
            raise _no_space(e, medium) from None
        raise


def _backup(source: BackupSource, medium: DiskMedium, pending: PendingGeneration,
            opts: BackupOptions, started: float, on_plan: Callable[[Plan], None] | None,
            progress: Callable[[int], None] | None) -> BackupResult:
    cfg = source.config
    gdir = pending.path
    label = {"kind": "data", "cluster": cfg.cluster_id, "generation": pending.id,
             "medium": medium.medium_id, "stream": 0, "block_size": cfg.block_size}
    t_freeze = time.monotonic()
    with source.freeze(gdir / META) as snap:
        # T0: the snapshot is written; list the used blocks at the same instant.
        plan = take_t0(source)
        _crash_point("after-snapshot")
        if on_plan is not None:
            on_plan(plan)
        # The copy. Writes are held for the whole backup until online backup lands.
        t_copy = time.monotonic()
        copied, stream = _copy(source, plan, gdir / stream_name(0), label, opts, progress)
        copy_s = time.monotonic() - t_copy
    freeze_s = time.monotonic() - t_freeze

    meta = _finish_snapshot(snap, cfg.cluster_id)
    _check_copied(plan, copied)
    entries = make_entries(copied.disk, copied.start, copied.count, copied.offset,
                           [0] * copied.records, [int(Kind.DATA)] * copied.records)
    isize, irecs, idigest = write_index(
        gdir / INDEX, entries, {"cluster": cfg.cluster_id, "generation": pending.id,
                                "medium": medium.medium_id})
    _crash_point("before-manifest")
    manifest = Manifest(
        id=pending.id, kind="full", parent=None, group=None, cluster_id=cfg.cluster_id,
        medium_id=medium.medium_id, block_size=cfg.block_size, t0_wall_ns=snap.wall_ns,
        t0_logical=snap.logical_time, committed_ns=time.time_ns(),
        disks=tuple(DiskEntry(d.id, d.name, d.nblocks, len(plan.disks[d.id]))
                    for d in cfg.disks),
        streams=(stream,), index=FileEntry(INDEX, isize, idigest, irecs),
        index_entries=int(entries.size), meta=meta, compression=opts.compression_text,
        freeze_seconds=freeze_s, copy_seconds=copy_s,
        extra={"writer": f"sdbackup {__version__}",
               "copy": {"read_bytes": copied.read_bytes, "records": copied.records,
                        "batches": copied.batches, "runs": plan.runs(),
                        "batch_bytes": opts.batch_bytes, "record_bytes": opts.record_bytes,
                        "gap_bytes": opts.gap_bytes}},
    )
    pending.commit(manifest)
    return BackupResult(manifest, medium, copied.read_bytes, copied.records, plan.runs(),
                        time.monotonic() - started)


def _copy(source: BackupSource, plan: Plan, path: Path, label: dict[str, object],
          opts: BackupOptions, progress: Callable[[int], None] | None
          ) -> tuple[CopyResult, FileEntry]:
    writer = RecordWriter.create(path, label=label, compress=opts.compression,
                                 level=max(opts.level, 1), threads=opts.threads)
    try:
        def after_batch(n: int) -> None:
            if n == 1 and os.environ.get(CRASH_ENV) == "mid-copy":
                writer.flush(fsync=True)
                _crash_point("mid-copy")

        copier = Copier(source.disks, source.config.block_size, writer,
                        batch_bytes=opts.batch_bytes, record_bytes=opts.record_bytes,
                        gap_bytes=opts.gap_bytes, progress=progress, after_batch=after_batch)
        copied = copier.copy(plan.disks)
        size = writer.close()  # END record, fsync
    except BaseException:
        writer.abort()
        raise
    return copied, FileEntry(path.name, size, writer.header_digest, writer.records_written)


def _finish_snapshot(snap: Snapshot, cluster_id: str) -> FileEntry:
    """Make the snapshot one self-contained file, check whose it is, fsync and checksum
    it.

    SQLite's backup API copies the source's header, which marks the copy as a WAL
    database: opening it would create ``-wal`` and ``-shm`` files next to it on the
    medium. The copy has no WAL, so switching it to rollback-journal mode is exactly
    setting header bytes 18-19 (file format write/read version) from 2 to 1, what
    ``PRAGMA journal_mode=DELETE`` does after a checkpoint; done directly, it writes
    nothing but those two bytes.
    """
    path = snap.path
    for extra in ("-wal", "-shm", "-journal"):
        Path(str(path) + extra).unlink(missing_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        head = os.pread(fd, 100, 0)
        if len(head) < 100 or not head.startswith(b"SQLite format 3\0"):
            raise CorruptError(f"the metadata snapshot {path} is not an SQLite database")
        if head[18:20] == b"\x02\x02":
            os.pwrite(fd, b"\x01\x01", 18)
        os.fsync(fd)
    finally:
        os.close(fd)
    with SnapshotMeta(path, "metadata snapshot at T0") as meta:
        got = meta.get_meta("cluster_id")
    if got != cluster_id:
        raise CorruptError(f"the metadata snapshot at T0 names cluster {got}, not "
                           f"{cluster_id}: the cluster's metadata store is inconsistent")
    size, digest = file_digest(path)
    return FileEntry(META, size, digest)


def _check_copied(plan: Plan, copied: CopyResult) -> None:
    """Every planned block is in exactly one record (a cheap count check)."""
    if copied.blocks != plan.blocks or sum(copied.count) != plan.blocks:
        raise RuntimeError(f"copier stored {copied.blocks} blocks, the plan has "
                           f"{plan.blocks} (a bug: please report it)")


def _is_no_space(e: BaseException, where: Path) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(e, sqlite3.DatabaseError):
        # SQLite reports ENOSPC as SQLITE_FULL, or as an I/O error of some kind.
        if "full" in str(e) or getattr(e, "sqlite_errorcode", 0) == sqlite3.SQLITE_FULL:
            return True
        if getattr(e, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_IOERR:
            try:
                st = os.statvfs(where)
            except OSError:
                return False
            return st.f_bavail * st.f_frsize < (1 << 20)
    return False


def _no_space(e: BaseException, medium: DiskMedium) -> NoSpaceError:
    return NoSpaceError(f"backup medium {medium.root} is full ({e}): the generation was not "
                        "committed and has been removed (earlier generations are intact); "
                        "free space there or use a larger medium, then run the backup again")
