"""Overlay (a.6, Fig. 15): bring a generation's separate before-image log into it.

A generation made with ``--log-mode separate`` keeps its before images on a log medium,
so that the backup medium itself is only ever written sequentially. Until the log is
overlaid, every reader reads the log first and the backup data after (c.5). Overlaying
copies the log into the generation as its stream 1 and adds its BI records to the
index, where they win over DATA records for the same blocks: afterwards the generation
needs no other medium to restore the data at T0.

Crash safety: the new stream and a new index file (``index.N``) are written and
fsynced first; the manifest that names them replaces the old one in one atomic rename
(the commit); the old index is removed last. A crash before the commit leaves the
generation as it was.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import replace

import numpy as np

from sdbackup.blocks.durable import fsync_path, sync_dir, write_atomic
from sdbackup.errors import CorruptError, NoSpaceError, UsageError
from sdbackup.media.bilog import read_entries
from sdbackup.media.generation import Generation, external_log
from sdbackup.media.index import make_entries, read_index, write_index
from sdbackup.media.medium import MANIFEST, FileEntry, stream_name
from sdbackup.media.record_format import Kind


def overlay_generation(gen: Generation, log_medium: str | os.PathLike[str] | None = None
                       ) -> dict[str, object]:
    """Overlay the generation's separate log; returns what was done."""
    m = gen.manifest
    log = m.extra.get("log")
    if not isinstance(log, dict):
        raise UsageError(f"generation {gen.id} was not an online backup: it has no "
                         "before-image log to overlay")
    ext = external_log(gen, log_medium)
    if ext is None:
        return {"generation": gen.id, "overlaid": False,
                "why": "its before-image log is in the generation already"}
    from sdbackup.backup.engine import stream_file_entry

    n = len(m.streams)
    if n != 1:
        raise CorruptError(f"generation {gen.id} has {n} streams; expected 1 before overlay")
    entry = stream_file_entry(ext)
    if (entry.bytes, f"{entry.digest:016x}") != (log.get("bytes"), log.get("digest")):
        raise CorruptError(f"before-image log {ext} does not match generation {gen.id}'s "
                           "manifest (size or digest): it is damaged or another log")
    # Every record is checked, in the log and again in its copy, before the generation
    # may name it: a damaged log, or a failed copy, leaves the generation as it was.
    from sdbackup.backup.verify import VerifyReport, verify_log_file

    rep = VerifyReport(gen.id)
    verify_log_file(gen, ext, rep)
    if rep.problems:
        raise CorruptError(f"not overlaid, generation {gen.id} is unchanged: "
                           f"{rep.problems[0]}")
    target = gen.dir / stream_name(n)
    try:
        shutil.copyfile(ext, target)
        fsync_path(target)
        rep = VerifyReport(gen.id)
        verify_log_file(gen, target, rep)
        if rep.problems:
            raise CorruptError(f"not overlaid, generation {gen.id} is unchanged: the copy "
                               f"of the log on the backup medium reads back damaged: "
                               f"{rep.problems[0]}")
    except BaseException as e:
        target.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpaceError(f"not overlaid, generation {gen.id} is unchanged: the backup "
                               f"medium {gen.dir.parent.parent} is full") from None
        if isinstance(e, OSError):
            raise CorruptError(f"not overlaid, generation {gen.id} is unchanged: copying "
                               f"the log failed: {e.strerror or e}") from None
        raise
    bi = read_entries(target)
    old, _, _, _ = read_index(gen.index_path, where=gen.where())
    new = make_entries(
        np.concatenate([old["disk"], [e.disk for e in bi]]),
        np.concatenate([old["start"], [e.start for e in bi]]),
        np.concatenate([old["count"], [e.count for e in bi]]),
        np.concatenate([old["offset"], [e.offset for e in bi]]),
        np.concatenate([old["stream"], [n] * len(bi)]),
        np.concatenate([old["kind"], [int(Kind.BI)] * len(bi)]))
    k = 1
    while (gen.dir / f"index.{k}").exists() and f"index.{k}" != m.index.name:
        k += 1
    iname = f"index.{k}" if m.index.name != f"index.{k}" else f"index.{k + 1}"
    isize, irecs, idigest = write_index(gen.dir / iname, new,
                                        {"cluster": m.cluster_id, "generation": gen.id,
                                         "medium": m.medium_id})
    fsync_path(gen.dir / iname)
    sync_dir(gen.dir)
    new_log = {**log, "overlaid": True}
    manifest = replace(m, streams=(*m.streams, FileEntry(target.name, entry.bytes,
                                                         entry.digest, entry.records)),
                       index=FileEntry(iname, isize, idigest, irecs),
                       index_entries=int(new.size), extra={**m.extra, "log": new_log})
    write_atomic(gen.dir / MANIFEST, manifest.to_json())
    old_index = gen.dir / m.index.name
    if old_index.name != iname:
        old_index.unlink(missing_ok=True)
    return {"generation": gen.id, "overlaid": True, "bi_records": len(bi),
            "bi_blocks": sum(e.count for e in bi), "from": str(ext)}

