"""Where a backup puts the generation it writes: a *medium writer* for the engine.

The engine (:mod:`sdbackup.backup.engine`) makes a generation in a
:class:`~sdbackup.media.medium.PendingGeneration` directory: the metadata snapshot and
the index are written there; the record streams, and the commit, go through a sink:

* :class:`DiskSink` (this module): stream ``n`` is the file ``stream-N.sdr`` of the
  directory; the commit is the manifest written last into it.
* :class:`~sdbackup.media.tape.sink.TapeSink`: the directory is the generation's entry
  in a tape catalog; record streams go straight to tape as they are written, spooled
  through a disk buffer; the commit puts the index, the snapshot and the manifest on
  tape, then the manifest into the catalog (Fig. 36).

So there is one engine and two media writers, and nothing in the engine knows which.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdbackup.blocks.durable import fsync_path
from sdbackup.media.medium import FileEntry, Manifest, PendingGeneration, stream_name

if TYPE_CHECKING:
    from sdbackup.media.record_writer import RecordWriter


class DiskSink:
    """A generation's streams as files of its directory on a disk medium."""

    def __init__(self, pending: PendingGeneration) -> None:
        self.pending = pending
        self.path = pending.path

    def describe(self) -> dict[str, Any]:
        """What the backup's summary says about where the generation went."""
        return {}

    def stream_writer(self, n: int, **kwargs: Any) -> RecordWriter:
        """A writer for record stream ``n`` (closed by the caller, then
        :meth:`stream_done`)."""
        from sdbackup.media.record_writer import RecordWriter

        return RecordWriter.create(self.path / stream_name(n), **kwargs)

    def stream_done(self, n: int) -> None:
        """Stream ``n``'s writer is closed (its END record written and fsynced)."""

    def add_stream(self, n: int, src: Path) -> FileEntry:
        """The finished record stream file ``src`` (a separate before-image log) becomes
        stream ``n``; its entry, from the copy as stored."""
        target = self.path / stream_name(n)
        shutil.copyfile(src, target)
        fsync_path(target)
        return stream_file_entry(target)

    def commit(self, manifest: Manifest) -> None:
        """Everything but the manifest is durable: write it (the commit)."""
        self.pending.commit(manifest)

    def abort(self) -> None:
        """The backup failed before its commit (the caller removes the directory)."""


def stream_file_entry(path: Path) -> FileEntry:
    """Size, record count and header digest of a finished record stream (every record
    header is read and checked)."""
    from sdbackup.media.record_reader import RecordReader
    from sdbackup.media.record_scan import StreamDigest

    digest = StreamDigest()
    n = 0
    end = 0
    with RecordReader(path) as r:
        for rec in r.scan(payloads=False):
            digest.update(rec.header)
            n += 1
            end = rec.offset + rec.header.record_len
    return FileEntry(path.name, end, digest.intdigest(), n)


def renamed(entry: FileEntry, n: int) -> FileEntry:
    """``entry`` as stream ``n`` of a generation."""
    return replace(entry, name=stream_name(n))
