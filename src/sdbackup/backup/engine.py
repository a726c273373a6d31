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
from sdbackup.backup.parts import PartCopier, PartsResult, stream_numbers
from sdbackup.backup.plan import Plan, make_plan
from sdbackup.backup.source import BackupSource, Snapshot, SourceConfig
from sdbackup.backup.window import LOG_MODES
from sdbackup.blocks.blockset import BlockSet
from sdbackup.blocks.durable import fsync_path
from sdbackup.blocks.source import Buffer, read_blocks
from sdbackup.errors import CorruptError, NoSpaceError, SdbError, UsageError
from sdbackup.media.bilog import BiEntry, read_entries
from sdbackup.media.generation import Generation
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
from sdbackup.meta.groups import (
    META_SCOPES,
    GroupList,
    Membership,
    evaluate,
    keep_only_group,
    write_group_tables,
)
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
    # File groups (b.1-b.5): copy only the blocks of the group's files at T0, in a
    # chain of the group's own; ``meta_scope`` "all" lists every file in the
    # generation's metadata, "group" only the group's.
    group: str | None = None
    group_list: GroupList | None = None
    meta_scope: str = "all"
    # Dispersed copy (a.12, issue 17): the plan is copied as parts by several copiers
    # (backup/parts.py); None: this process copies it into stream 0.
    copier: PartCopier | None = None
    # Straight to tape (issue 16, Fig. 36): the copy goes to the tape set in these
    # drives through a disk spool; a separate log is appended to it at the end.
    tape: TapeSpec | None = None
    # The log manager on a node (Fig. 36): the name of the node agent that stores the
    # before images (the source arms it); in separate mode ``log_medium`` is a
    # directory on that node's host.
    log_node: str | None = None

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
            **({"group": m.group, "group_files": m.extra["group_spec"]["files"],
                "meta": m.extra["group_spec"]["meta"]} if m.group is not None else {}),
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
    check_options(opts)
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


TAPE_COPY_NODES = ("--copy-nodes with --tape: a dispersed copy writes its parts to disk "
                   "media, not to tape; back up with --copy-nodes to --medium DIR, then "
                   "copy it with 'sdbackup tape write --medium DIR [--medium OTHER...]'")
"""The refusal of a dispersed copy straight to tape (the CLI, the coordinator and the
engine say the same line)."""


def check_options(opts: BackupOptions) -> None:
    """Refuse options that do not go together, before anything is made."""
    if (opts.group is None) != (opts.group_list is None):
        raise UsageError("a group backup needs the group's name and its list")
    if opts.meta_scope not in META_SCOPES:
        raise UsageError(f"--meta {opts.meta_scope!r}: use one of {', '.join(META_SCOPES)}")
    if opts.group is None and opts.meta_scope != "all":
        raise UsageError("--meta group goes with --group NAME")
    if opts.tape is not None and opts.copier is not None:
        raise UsageError(TAPE_COPY_NODES)
    if opts.log_node is not None:
        check_log_node_options(opts.log_mode)


def check_log_node_options(log_mode: str | None) -> None:
    """``--log-node`` needs a log that a log manager keeps (the CLI, the coordinator and
    the engine say the same line)."""
    if log_mode not in ("central", "inline", "separate"):
        raise UsageError("--log-node goes with --log-mode central, inline or separate (the "
                         "log node is their log manager; in merged mode every node keeps "
                         "its own log, and an offline backup logs nothing)")


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
    head = medium.catalog().head(opts.group)
    why: str | None = None
    if head is None:
        why = (f"backup medium {medium.root} holds no backup of this cluster yet"
               if opts.group is None else
               f"backup medium {medium.root} holds no backup of group {opts.group} yet")
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
            # Only this group's chains (or the whole-cluster ones): another group's
            # chain on the same medium goes on (b.5).
            for old in {g.chain for g in medium.catalog().current
                        if g.group == m.group} - {m.chain, None}:
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
        if opts.log_mode == "separate" and opts.log_node is not None:
            # On the log node's host: the log node makes the directory and its label.
            if opts.log_medium is None:
                raise UsageError("--log-mode separate needs --log-medium DIR (with "
                                 "--log-node: a directory on the log node's host)")
            log_path = opts.log_medium / f"{pending.id}.bilog"
        elif opts.log_mode == "separate":
            log_path = _log_medium_file(opts.log_medium, pending.id, cfg)
        else:
            log_path = gdir / stream_name(1)
        work.mkdir()
    # The blocks the parent of a group incremental holds (its group block list at its
    # T0): read before the freeze, which must stay short.
    parent_view: dict[int, BlockSet] | None = None
    if opts.group is not None and parent is not None:
        parent_view = _view_blocks(medium, parent)
    _run_hook("pre-freeze", opts.pre_freeze)
    t_freeze = time.monotonic()
    chain = parent.chain if parent is not None and parent.chain else uuid.uuid4().hex
    parts: PartsResult | None = None
    with source.freeze(gdir / META) as snap:
        # T0: the snapshot is written; list the used blocks at the same instant, and
        # (for an incremental) the blocks changed since the parent; a new era starts.
        used = take_t0(source)
        group: GroupAtT0 | None = None
        if opts.group is not None:
            assert opts.group_list is not None
            group = group_at_t0(snap.path, opts.group, opts.group_list, used)
        track = t0_tracking(source.tracker, pending.id, chain, parent)
        plan = _plan(used, track, group, parent_view)
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
            if opts.copier is not None:
                parts = _copy_parts(opts.copier, source, pending.id, gdir, medium.medium_id,
                                    plan.disks, online, progress)
                copied = parts.copy
            else:
                copied, stream = _copy(source, plan.disks, sink, label, opts, progress)
            copy_s = time.monotonic() - t_copy
    freeze_s = time.monotonic() - t_freeze
    _run_hook("post-thaw", opts.post_thaw)
    streams: list[FileEntry] = []
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
            if opts.copier is not None:
                parts = _copy_parts(opts.copier, source, pending.id, gdir, medium.medium_id,
                                    to_copy, online, progress)
                copied = parts.copy
            else:
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
        if stats.get("log_node"):
            log_info["node"] = stats["log_node"]
        # A separate log kept by a log node lies on that node's host: the engine reads
        # (and overlays) the copy fetched when the window closed; the manifest names
        # where the log node keeps it.
        log_here = Path(str(stats["log_copy"])) if stats.get("log_copy") else log_path
        if log_here.exists():
            bi_entries = read_entries(log_here)
            log_file = stream_file_entry(log_here)
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
                    log_stream = sink.add_stream(1, log_here)
                log_info.update(overlaid=True)
            if bi_entries:
                streams.append(log_stream or stream_file_entry(gdir / stream_name(1)))
        else:
            log_info.update(records=0, bytes=0, blocks=0)
        shutil.rmtree(work, ignore_errors=True)
    if parts is not None:
        streams = _part_streams(parts, streams, sink, cfg.cluster_id, pending.id)
    else:
        streams.insert(0, stream)
    log_info["freeze_flush_seconds"] = round(getattr(source, "freeze_flush_seconds", 0.0), 6)

    edit = None
    if group is not None:
        assert opts.group is not None and opts.group_list is not None
        g_name, g_list, g_at = opts.group, opts.group_list, group

        def edit(path: Path) -> None:
            if opts.meta_scope == "group":
                keep_only_group(path, g_at.members, g_at.blocks)
            write_group_tables(path, g_name, g_list, opts.meta_scope, g_at.blocks,
                               len(g_at.members.files))

    meta = _finish_snapshot(snap, cfg.cluster_id, edit)
    _check_copied(to_copy, copied)
    nb = len(bi_entries)
    entries = make_entries(copied.disk + [e.disk for e in bi_entries],
                           copied.start + [e.start for e in bi_entries],
                           copied.count + [e.count for e in bi_entries],
                           copied.offset + [e.offset for e in bi_entries],
                           (parts.streams if parts is not None else [0] * copied.records)
                           + [1] * nb,
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
        parent=None if parent is None else parent.id, group=opts.group,
        cluster_id=cfg.cluster_id,
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
               **({"log": log_info} if online else {}),
               **({"group_spec": group.manifest_entry(opts)} if group is not None else {}),
               **(parts.manifest_keys(medium.medium_id) if parts is not None else {})},
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


def _copy_parts(copier: PartCopier, source: BackupSource, gen_id: str, gdir: Path,
                medium_id: str, disks: dict[int, BlockSet], online: bool,
                progress: Callable[[int], None] | None) -> PartsResult:
    """A dispersed copy (backup/parts.py): the plan as parts, each written by a copier
    of its own; an abort of the before-image window stops every copier."""
    aborted = getattr(source, "aborted", None)

    def why() -> str | None:
        return aborted() if aborted is not None else None

    return copier.copy(gen_id, gdir, medium_id, disks,
                       lambda n: stream_numbers(n, online=online), progress, why)


def _part_streams(parts: PartsResult, log_streams: list[FileEntry], sink: Sink,
                  cluster_id: str, gen_id: str) -> list[FileEntry]:
    """The generation's streams: every part at its number, the before-image log at 1.
    Parts skip number 1 in an online backup; when that backup has no log stream in the
    generation (nothing was overwritten, or the log stays on a separate log medium),
    stream 1 is an empty record stream (LABEL and END), so that numbers stay dense."""
    by_number = parts.file_entries()
    for e in log_streams:
        by_number[1] = e
    if by_number and 1 not in by_number and max(by_number) > 1:
        w = sink.stream_writer(1, label={"kind": "bi", "cluster": cluster_id,
                                         "generation": gen_id, "stream": 1, "empty": True})
        try:
            size = w.close()
            sink.stream_done(1)
        except BaseException:
            w.abort()
            raise
        by_number[1] = FileEntry(stream_name(1), size, w.header_digest, w.records_written)
    if sorted(by_number) != list(range(len(by_number))):
        raise RuntimeError(f"part streams {sorted(by_number)} are not numbered 0..n-1 (a bug:"
                           " please report it)")
    return [by_number[n] for n in range(len(by_number))]


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


def _finish_snapshot(snap: Snapshot, cluster_id: str,
                     edit: Callable[[Path], None] | None = None) -> FileEntry:
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
    _rollback_header(path, sync=edit is None)
    if edit is not None:
        edit(path)  # a group generation's tables (and --meta group's pruning)
        for extra in ("-wal", "-shm", "-journal"):
            Path(str(path) + extra).unlink(missing_ok=True)
        fsync_path(path)
    with SnapshotMeta(path, "metadata snapshot at T0") as meta:
        got = meta.get_meta("cluster_id")
    if got != cluster_id:
        raise CorruptError(f"the metadata snapshot at T0 names cluster {got}, not "
                           f"{cluster_id}: the cluster's metadata store is inconsistent")
    size, digest = file_digest(path)
    return FileEntry(META, size, digest)


def _rollback_header(path: Path, *, sync: bool) -> None:
    """See :func:`_finish_snapshot`: the snapshot as a rollback-journal database."""
    for extra in ("-wal", "-shm", "-journal"):
        Path(str(path) + extra).unlink(missing_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        head = os.pread(fd, 100, 0)
        if len(head) < 100 or not head.startswith(b"SQLite format 3\0"):
            raise CorruptError(f"the metadata snapshot {path} is not an SQLite database")
        if head[18:20] == b"\x02\x02":
            os.pwrite(fd, b"\x01\x01", 18)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class GroupAtT0:
    """A group's files and block list in the T0 snapshot (b.1)."""

    members: Membership
    blocks: dict[int, BlockSet]
    seconds: float

    def manifest_entry(self, opts: BackupOptions) -> dict[str, object]:
        assert opts.group_list is not None
        return {"name": opts.group, "list": opts.group_list.lines, "meta": opts.meta_scope,
                "files": len(self.members.files),
                "blocks": sum(len(b) for b in self.blocks.values()),
                "dirs_listed": self.members.dirs_listed,
                "evaluate_seconds": round(self.seconds, 6)}


def group_at_t0(snapshot: Path, name: str, gl: GroupList, used: Plan) -> GroupAtT0:
    """Inside the freeze: the group's members in the T0 snapshot just written, and
    their blocks (O(files in the group's directories)). A group that selects no file
    is refused: never a silent empty backup."""
    t = time.monotonic()
    _rollback_header(snapshot, sync=False)  # readable as an immutable file
    with SnapshotMeta(snapshot, "metadata snapshot at T0") as snap:
        members = evaluate(snap, gl)
        blocks = members.blocks(snap)
    if not members.files:
        raise UsageError(f"group {name} selects no file at T0 (its list: "
                         f"{'; '.join(gl.lines)}): nothing was backed up")
    view = {d: blocks.get(d, BlockSet()) & u for d, u in used.disks.items()}
    if sum(len(b) for b in view.values()) != sum(len(b) for b in blocks.values()):
        raise CorruptError("the group's files map blocks the allocation bitmap does not "
                           "mark used at T0: run 'sdbackup fsck'")
    return GroupAtT0(members, view, time.monotonic() - t)


def _plan(used: Plan, track: T0Tracking, group: GroupAtT0 | None,
          parent_view: dict[int, BlockSet] | None) -> Plan:
    """What the backup copies. Whole cluster: the used blocks (full) or those changed
    since the parent (incremental). A group: its block list (full), or the blocks of
    its list that changed since the parent or that the parent does not hold (files
    created, renamed or moved into the group's directories since: a rename changes no
    block, yet the parent never held them)."""
    if group is None:
        if track.changed is None:
            return used
        return Plan({d: b & track.changed.get(d, BlockSet()) for d, b in used.disks.items()},
                    used.info)
    if track.changed is None or parent_view is None:
        return Plan(dict(group.blocks), used.info)
    return Plan({d: (g & track.changed.get(d, BlockSet())) | (g - parent_view.get(d, BlockSet()))
                 for d, g in group.blocks.items()}, used.info)


def _view_blocks(medium: DiskMedium, m: Manifest) -> dict[int, BlockSet]:
    """The blocks generation ``m`` answers for, per disk (a group's block list)."""
    g = Generation(medium, m)
    with SnapshotMeta(g.meta_file(), f"metadata snapshot of {g.where()}") as snap:
        return {d.id: snap.view_blocks(d.id, d.nblocks) for d in m.disks}


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
