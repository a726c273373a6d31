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
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdbackup import __version__
from sdbackup.backup.copy import BATCH_BYTES, GAP_BYTES, RECORD_BYTES, Copier, CopyResult
from sdbackup.backup.plan import Plan, make_plan
from sdbackup.backup.source import BackupSource, Snapshot, SourceConfig
from sdbackup.backup.window import LOG_MODES
from sdbackup.blocks.blockset import BlockSet
from sdbackup.blocks.source import Buffer, read_blocks
from sdbackup.errors import CorruptError, NoSpaceError, SdbError, UsageError
from sdbackup.media.bilog import BiEntry, read_entries
from sdbackup.media.index import make_entries, write_index
from sdbackup.media.medium import (
    INDEX,
    MEDIUM_LABEL,
    META,
    DiskEntry,
    DiskMedium,
    FileEntry,
    Manifest,
    PendingGeneration,
    file_digest,
    stream_name,
)
from sdbackup.media.record_format import Compression, Kind
from sdbackup.media.sink import DiskSink, stream_file_entry
from sdbackup.media.snapshot import SnapshotMeta
from sdbackup.meta.tracking import ChangeTracker, TrackingLost
from sdbackup.types import DiskId

if TYPE_CHECKING:
    from sdbackup.media.tape.sink import TapeSink, TapeSpec

    Sink = DiskSink | TapeSink

__all__ = ["BackupOptions", "BackupResult", "run_backup", "stream_file_entry"]

log = logging.getLogger("sdbackup.backup")

CRASH_ENV = "SDBACKUP_TEST_CRASH_AT"
CRASH_POINTS = ("after-snapshot", "mid-copy", "before-manifest")
COPY_DELAY_ENV = "SDBACKUP_TEST_COPY_DELAY"


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
    # Online backup (issue 6): None holds writes for the whole copy; a log mode freezes
    # only at T0 and logs before images (see backup/window.py).
    log_mode: str | None = None
    log_medium: Path | None = None  # separate mode: where the log goes
    overlay: bool = False  # bring a separate log into the generation at the end
    pre_freeze: str | None = None  # shell command run right before the freeze
    post_thaw: str | None = None  # shell command run right after the thaw
    threads: int | None = None  # compression threads (default: CPUs, at most 8)
    batch_bytes: int = BATCH_BYTES
    record_bytes: int = RECORD_BYTES
    gap_bytes: int = GAP_BYTES
    bwlimit: int = 0  # the copy reads at most this many bytes per second (0: no limit)
    pace: str = "off"  # "adaptive": the copy rests while applications write
    # Incrementals (issue 12): copy only the blocks changed since the newest generation
    # of the chain (or since a mark); with no usable parent, fail, or take a full.
    incremental: bool = False
    full_if_needed: bool = False
    # Straight to tape (issue 16, Fig. 36): the copy goes to the tape set in these
    # drives through a disk spool; a separate log is appended to it at the end.
    tape: TapeSpec | None = None

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
    where: dict[str, Any] | None = None  # the sink's description (a tape: set, tapes)

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
            **({"log": m.extra["log"]} if "log" in m.extra else {}),
            **(self.where or {}),
        }


def take_t0(source: BackupSource) -> Plan:
    """List the used blocks (inside the freeze, right after the snapshot)."""
    return make_plan(source)


@dataclass(frozen=True)
class T0Tracking:
    """What the change tracking said at T0: the changed blocks since ``base`` (None for
    a full), and the era that T0 started."""

    token: str
    era: int
    base: int | None
    mark: str | None
    changed: dict[int, BlockSet] | None


def t0_tracking(tracker: ChangeTracker, gen_id: str, chain: str, parent: Manifest | None
                ) -> T0Tracking:
    """Inside the freeze: the blocks changed since the parent's T0 (or since the newest
    mark after it, a.11), then a new era, kept for this chain until a newer generation
    of it commits. Cost: the size of the change sets (set algebra in C), not of the
    disks."""
    with tracker.store.lock, tracker.store.transaction():
        changed = None
        base: int | None = None
        mark: str | None = None
        if parent is not None:
            assert parent.tracking is not None
            base, m = tracker.base_for(parent.tracking[1])
            mark = m.name if m is not None else None
            changed = tracker.changed_since(base)
        era = tracker.new_era(f"backup {gen_id}")
        tracker.chain_at(chain, era)
        return T0Tracking(tracker.token, era, base, mark, changed)


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
    if opts.tape is not None:
        return _run_backup_to_tape(source, opts.tape, opts, on_plan, progress)
    cfg = source.config
    root = Path(medium_path).absolute()
    if opts.incremental and not opts.full_if_needed and _new_medium(root):
        # Refused before the medium is made: a refused backup leaves nothing behind.
        raise _no_incremental(f"backup medium {root} holds no backup of this cluster yet")
    medium = DiskMedium.open_for_backup(medium_path, cfg.cluster_id)
    started = time.monotonic()
    with medium.chain_lock():
        parent = choose_parent(medium, source.tracker, opts)
        pending = medium.begin()
        result = _run(source, medium, pending, DiskSink(pending), parent, opts, started,
                      on_plan, progress)
    _after_commit(source.tracker, medium, result.manifest)
    return result


def _run_backup_to_tape(source: BackupSource, spec: TapeSpec, opts: BackupOptions,
                        on_plan: Callable[[Plan], None] | None,
                        progress: Callable[[int], None] | None) -> BackupResult:
    """The backup straight to tape (Fig. 36): the same engine, the generation made in
    the tape set's catalog entry and written through a :class:`TapeSink`."""
    from sdbackup.media.tape.sink import TapeTarget

    if opts.log_mode not in (None, "separate"):
        raise UsageError(f"--log-mode {opts.log_mode} keeps before images beside the data "
                         "while it is written, which a tape cannot take: a backup to tape "
                         "is offline (no --log-mode) or --log-mode separate with "
                         "--log-medium DIR (a.5)")
    started = time.monotonic()
    with TapeTarget(spec, source.config.cluster_id) as target:
        medium = target.medium
        with medium.chain_lock():
            parent = choose_parent(medium, source.tracker, opts)
            pending = medium.begin()
            result = _run(source, medium, pending, target.sink(pending), parent, opts,
                          started, on_plan, progress)
    _after_commit(source.tracker, medium, result.manifest)
    return result


def choose_parent(medium: DiskMedium, tracker: ChangeTracker, opts: BackupOptions
                  ) -> Manifest | None:
    """The generation an incremental is relative to: the newest whole-cluster
    generation on the medium, when the cluster's changed-block tracking still knows
    what changed since its T0. None for a full (asked for, or ``--full-if-needed``)."""
    if not opts.incremental:
        return None
    head = medium.catalog().head(None)
    why: str | None = None
    if head is None:
        why = f"backup medium {medium.root} holds no backup of this cluster yet"
    elif head.tracking is None or head.chain is None:
        why = (f"the newest generation {head.id} was made before changed-block tracking "
               "existed")
    elif head.tracking[0] != tracker.token:
        why = (f"the cluster's changed-block tracking started anew after generation "
               f"{head.id} (the cluster was restored from a backup, or its tracking was "
               "reset), so what changed since then is not known")
    else:
        try:
            tracker.changed_since(head.tracking[1])
        except TrackingLost as e:
            why = f"after generation {head.id}, {e.message}"
    if why is None:
        return head
    if opts.full_if_needed:
        log.warning("%s: taking a full backup (--full-if-needed)", why)
        return None
    raise _no_incremental(why)


def _no_incremental(why: str) -> TrackingLost:
    return TrackingLost(f"no incremental possible: {why}; take a full backup first (without "
                        "--incremental), or add --full-if-needed")


def _new_medium(root: Path) -> bool:
    """A backup to ``root`` would create a new medium there (a new or empty directory)."""
    if root.exists():
        return root.is_dir() and not (root / MEDIUM_LABEL).exists() and not any(root.iterdir())
    return root.parent.is_dir()


def _after_commit(tracker: ChangeTracker, medium: DiskMedium, m: Manifest) -> None:
    """The chain no longer needs eras before this generation's; fold the tracking.
    A full also ends the older chains of its medium: incrementals follow the newest
    generation of a medium, so none of those can grow again. A failure here costs only
    memory (eras kept longer): the generation is committed."""
    if m.chain is None or m.tracking is None:
        return
    try:
        tracker.chain_committed(m.chain, m.tracking[1])
        if m.is_full:
            for old in {g.chain for g in medium.catalog().current} - {m.chain, None}:
                tracker.forget_chain(str(old))
        tracker.compact()
    except (SdbError, OSError, sqlite3.Error) as e:
        log.warning("generation %s is committed, but the change tracking could not be "
                    "compacted: %s", m.id, e)


def _run(source: BackupSource, medium: DiskMedium, pending: PendingGeneration,
         sink: Sink, parent: Manifest | None, opts: BackupOptions, started: float,
         on_plan: Callable[[Plan], None] | None, progress: Callable[[int], None] | None
         ) -> BackupResult:
    try:
        return _backup(source, medium, pending, sink, parent, opts, started, on_plan,
                       progress)
    except BackupFailed as e:
        sink.abort()
        pending.fail(e.message)
        if pending.id in e.message:
            raise
        raise BackupFailed(f"{e.message}; generation {pending.id} was not committed (it "
                           "is marked failed; 'sdbackup gc' removes it)") from None
    except BaseException as e:
        sink.abort()
        pending.discard()
        if isinstance(e, NoSpaceError):
            raise NoSpaceError(f"{e.message}; generation {pending.id} was not committed and "
                               "has been removed (earlier generations are intact)") from None
        if _is_no_space(e, medium.root):
            raise _no_space(e, medium) from None
        raise


def _backup(source: BackupSource, medium: DiskMedium, pending: PendingGeneration,
            sink: Sink, parent: Manifest | None, opts: BackupOptions, started: float,
            on_plan: Callable[[Plan], None] | None,
            progress: Callable[[int], None] | None) -> BackupResult:
    cfg = source.config
    gdir = pending.path
    label = {"kind": "data", "cluster": cfg.cluster_id, "generation": pending.id,
             "medium": medium.medium_id, "stream": 0, "block_size": cfg.block_size}
    online = opts.log_mode is not None
    arm = getattr(source, "arm", None)
    log_path: Path | None = None
    work = gdir / "bilog-work"
    if online:
        if opts.log_mode not in LOG_MODES:
            raise UsageError(f"unknown log mode {opts.log_mode!r}: use one of "
                             f"{', '.join(LOG_MODES)}")
        if opts.log_mode == "separate":
            log_path = _log_medium_file(opts.log_medium, pending.id, cfg)
        else:
            log_path = gdir / stream_name(1)
        work.mkdir()
    _run_hook("pre-freeze", opts.pre_freeze)
    t_freeze = time.monotonic()
    chain = parent.chain if parent is not None and parent.chain else uuid.uuid4().hex
    with source.freeze(gdir / META) as snap:
        # T0: the snapshot is written; list the used blocks at the same instant, and
        # (for an incremental) the blocks changed since the parent; a new era starts.
        used = take_t0(source)
        track = t0_tracking(source.tracker, pending.id, chain, parent)
        plan = used if track.changed is None else Plan(
            {d: b & track.changed.get(d, BlockSet()) for d, b in used.disks.items()},
            used.info)
        _crash_point("after-snapshot")
        if on_plan is not None:
            on_plan(plan)
        _dump_t0_image(source, used, pending.id)
        if online and arm is not None:
            assert log_path is not None and opts.log_mode is not None
            arm(pending.id, opts.log_mode, plan.disks, log_path, work)
        if not online:
            # Offline: writes are held for the whole copy.
            t_copy = time.monotonic()
            copied, stream = _copy(source, plan.disks, sink, label, opts, progress)
            copy_s = time.monotonic() - t_copy
    freeze_s = time.monotonic() - t_freeze
    _run_hook("post-thaw", opts.post_thaw)
    streams = []
    log_stream: FileEntry | None = None
    log_info: dict[str, object] = {}
    bi_entries: list[BiEntry] = []
    to_copy = plan.disks
    if online:
        logged = getattr(source, "logged", None)
        if opts.log_mode == "inline" and logged is not None:
            # a.4: the copy skips the addresses already in the log control file.
            to_copy = {d: b - logged(d) for d, b in plan.disks.items()}
        t_copy = time.monotonic()
        try:
            copied, stream = _copy(source, to_copy, sink, label, opts, progress)
        finally:
            disarm = getattr(source, "disarm", None)
            stats = disarm(log_path if opts.log_mode == "merged" else None, work) \
                if disarm is not None and arm is not None else {"failed": None}
        copy_s = time.monotonic() - t_copy
        if stats.get("failed"):
            raise BackupFailed(f"backup {pending.id} failed and was not committed: "
                               f"{stats['failed']}")
        assert log_path is not None
        log_info = {"mode": opts.log_mode, "bi_runs": stats.get("bi_runs", 0)}
        if log_path.exists():
            bi_entries = read_entries(log_path)
            log_file = stream_file_entry(log_path)
            log_info.update(records=log_file.records, bytes=log_file.bytes,
                            blocks=sum(e.count for e in bi_entries))
            # To tape, the log always goes into the generation (appended as its stream
            # 1, overlaid at the commit): the tape alone restores T0 (a.6, Fig. 36).
            if opts.log_mode == "separate" and not opts.overlay and opts.tape is None:
                log_info.update(medium=str(log_path.parent), file=log_path.name,
                                digest=f"{log_file.digest:016x}", overlaid=False)
                bi_entries = []
            elif opts.log_mode == "separate":
                if bi_entries:
                    log_stream = sink.add_stream(1, log_path)
                log_info.update(overlaid=True)
            if bi_entries:
                streams.append(log_stream or stream_file_entry(gdir / stream_name(1)))
        else:
            log_info.update(records=0, bytes=0, blocks=0)
        shutil.rmtree(work, ignore_errors=True)
    streams.insert(0, stream)
    log_info["freeze_flush_seconds"] = round(getattr(source, "freeze_flush_seconds", 0.0), 6)

    meta = _finish_snapshot(snap, cfg.cluster_id)
    _check_copied(to_copy, copied)
    nb = len(bi_entries)
    entries = make_entries(copied.disk + [e.disk for e in bi_entries],
                           copied.start + [e.start for e in bi_entries],
                           copied.count + [e.count for e in bi_entries],
                           copied.offset + [e.offset for e in bi_entries],
                           [0] * copied.records + [1] * nb,
                           [int(Kind.DATA)] * copied.records + [int(Kind.BI)] * nb)
    isize, irecs, idigest = write_index(
        gdir / INDEX, entries, {"cluster": cfg.cluster_id, "generation": pending.id,
                                "medium": medium.medium_id})
    _crash_point("before-manifest")
    tracking: dict[str, object] = {"token": track.token, "era": track.era}
    if parent is not None:
        tracking.update(base=track.base, parent_era=parent.tracking[1] if parent.tracking
                        else None, mark=track.mark)
    manifest = Manifest(
        id=pending.id, kind="full" if parent is None else "incremental",
        parent=None if parent is None else parent.id, group=None, cluster_id=cfg.cluster_id,
        medium_id=medium.medium_id, block_size=cfg.block_size, t0_wall_ns=snap.wall_ns,
        t0_logical=snap.logical_time, committed_ns=time.time_ns(),
        disks=tuple(DiskEntry(d.id, d.name, d.nblocks, len(plan.disks[d.id]))
                    for d in cfg.disks),
        streams=tuple(streams), index=FileEntry(INDEX, isize, idigest, irecs),
        index_entries=int(entries.size), meta=meta, compression=opts.compression_text,
        freeze_seconds=freeze_s, copy_seconds=copy_s,
        extra={"chain": chain, "tracking": tracking,
               "used": {str(d): len(b) for d, b in used.disks.items()},
               "writer": f"sdbackup {__version__}",
               "copy": {"read_bytes": copied.read_bytes, "records": copied.records,
                        "batches": copied.batches, "runs": plan.runs(),
                        "batch_bytes": opts.batch_bytes, "record_bytes": opts.record_bytes,
                        "gap_bytes": opts.gap_bytes},
               **({"log": log_info} if online else {})},
    )
    sink.commit(manifest)
    return BackupResult(manifest, medium, copied.read_bytes, copied.records, plan.runs(),
                        time.monotonic() - started, sink.describe())


def _copy(source: BackupSource, disks: dict[int, BlockSet], sink: Sink,
          label: dict[str, object],
          opts: BackupOptions, progress: Callable[[int], None] | None
          ) -> tuple[CopyResult, FileEntry]:
    writer = sink.stream_writer(0, label=label, compress=opts.compression,
                                level=max(opts.level, 1), threads=opts.threads)
    try:
        delay = float(os.environ.get(COPY_DELAY_ENV, "0") or 0)

        aborted = getattr(source, "aborted", None)

        def after_batch(n: int) -> None:
            if delay:
                time.sleep(delay)  # test hook: a slow copy, so writers overlap it
            why = aborted() if aborted is not None else None
            if why:  # before-image logging failed: stop now, the writers went on
                raise BackupFailed(why)
            if n == 1 and os.environ.get(CRASH_ENV) == "mid-copy":
                writer.flush(fsync=True)
                _crash_point("mid-copy")

        copier = Copier(source.disks, source.config.block_size, writer,
                        batch_bytes=opts.batch_bytes, record_bytes=opts.record_bytes,
                        gap_bytes=opts.gap_bytes, progress=progress, after_batch=after_batch,
                        bwlimit=opts.bwlimit,
                        pace=_adaptive_pace(source) if opts.pace == "adaptive" else None)
        copied = copier.copy(disks)
        size = writer.close()  # END record, fsync
        sink.stream_done(0)
    except BaseException:
        writer.abort()
        raise
    return copied, FileEntry(stream_name(0), size, writer.header_digest,
                             writer.records_written)


PACE_RATIO = 6.0
"""Adaptive pacing: while applications write, the copy rests this many times as long as
each batch took to read, so that it takes at most a seventh of the disks' time
(bench/online.py: writers' ratio 0.16-0.20 -> 0.33-0.36 at 6, 0.25-0.27 at 2; with no
writers the copy runs at full speed)."""


def _adaptive_pace(source: BackupSource) -> Callable[[float], float]:
    """``--pace adaptive``: rest after a batch when applications wrote since the last
    one (the cluster's write mappings grew), run at full speed when they did not."""
    last = source.write_activity()

    def pace(read_seconds: float) -> float:
        nonlocal last
        now = source.write_activity()
        busy, last = now != last, now
        return PACE_RATIO * read_seconds if busy else 0.0

    return pace


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


def _check_copied(disks: dict[int, BlockSet], copied: CopyResult) -> None:
    """Every planned block is in exactly one record (a cheap count check)."""
    want = sum(len(b) for b in disks.values())
    if copied.blocks != want or sum(copied.count) != want:
        raise RuntimeError(f"copier stored {copied.blocks} blocks, the plan has "
                           f"{want} (a bug: please report it)")


class BackupFailed(SdbError):
    """The backup could not be made consistent (e.g. a node took its log with it)."""

    exit_code = 1


T0_IMAGE_ENV = "SDBACKUP_TEST_T0_IMAGE_DIR"


def _dump_t0_image(source: BackupSource, plan: Plan, gen_id: str) -> None:
    """Test hook: while frozen, write the used blocks of every disk to
    ``$SDBACKUP_TEST_T0_IMAGE_DIR/<generation>/<disk>.img`` (the exact T0 image that a
    restore must reproduce)."""
    root = os.environ.get(T0_IMAGE_ENV)
    if not root:
        return
    out = Path(root) / gen_id
    out.mkdir(parents=True, exist_ok=True)
    bs = source.config.block_size
    for d in source.config.disks:
        with open(out / f"{d.name}.img", "wb") as f:
            f.truncate(d.nblocks * bs)
            for start, count in plan.disks[d.id].runs():
                f.seek(start * bs)
                f.write(read_blocks(source.disks, DiskId(d.id), start, count))


class T0Images:
    """The disk images :func:`_dump_t0_image` wrote at T0, as a block source: the data
    at T0 read from nothing the backup wrote (the demo and the tests compare backups
    with it)."""

    def __init__(self, files: dict[int, Path], block_size: int) -> None:
        self.block_size = block_size
        self._fds = {d: os.open(p, os.O_RDONLY) for d, p in files.items()}

    def readinto(self, disk: DiskId, block: int, buf: Buffer) -> None:
        view = memoryview(buf).cast("B")
        got = os.preadv(self._fds[disk], [view], block * self.block_size)
        view[got:] = bytes(len(view) - got)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)


def _run_hook(name: str, cmd: str | None) -> None:
    """Run a --pre-freeze/--post-thaw command; a failing pre-freeze aborts the backup."""
    if not cmd:
        return
    r = subprocess.run(cmd, shell=True, check=False)
    if r.returncode != 0:
        raise UsageError(f"the {name} hook {cmd!r} failed with status {r.returncode}; "
                         + ("the backup was aborted before the freeze" if name == "pre-freeze"
                            else "the backup went on"))


def _log_medium_file(log_medium: Path | None, gen_id: str, cfg: SourceConfig) -> Path:
    """Where a separate-mode log goes: LOG_MEDIUM/<generation>.bilog."""
    if log_medium is None:
        raise UsageError("--log-mode separate needs --log-medium DIR (a directory on "
                         "another medium than the backup)")
    log_medium.mkdir(parents=True, exist_ok=True)
    label = log_medium / "sdbackup-logmedium.json"
    if not label.exists():
        label.write_text(json.dumps({"format": "sdbackup-log-medium", "version": 1,
                                     "cluster_id": cfg.cluster_id}) + "\n")
    return log_medium / f"{gen_id}.bilog"


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
