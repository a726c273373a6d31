"""The log manager of an online backup on a node agent (``backup --log-node NAME``,
seed Fig. 36): the coordinator coordinates (arms the window, splits write mappings,
aborts, ends the window); the before images of every node's overwrites go to this
node's :class:`NodeLogManager`, which writes the log to its medium.

It is the coordinator's central log manager moved: the same
:class:`~sdbackup.backup.window.BackupWindow` stores each block once (the first before
image to arrive is the oldest: a writer overwrites only after its put is acknowledged,
and the next writer reads the block after that overwrite), hands it to the operating
system before it answers, and fsyncs the log when the window ends. What differs is
who it must tell when it fails: the coordinator, before it answers the writer (see
:meth:`NodeLogManager.put`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sdbackup.backup.bilog import BiLog
from sdbackup.backup.window import BackupWindow
from sdbackup.errors import SdbError, UsageError
from sdbackup.media.bilog import read_entries
from sdbackup.media.sink import stream_file_entry

LOG_MEDIUM_LABEL = "sdbackup-logmedium.json"


def ensure_log_medium(root: Path, cluster_id: str) -> None:
    """A log medium directory (separate mode) with its label, created on first use."""
    root.mkdir(parents=True, exist_ok=True)
    label = root / LOG_MEDIUM_LABEL
    if not label.exists():
        label.write_text(json.dumps({"format": "sdbackup-log-medium", "version": 1,
                                     "cluster_id": cluster_id}) + "\n")


def before_images(items: Sequence[tuple[int, int, int, int]], data: bytes | None,
                  block_size: int) -> list[tuple[int, int, bytes, int]]:
    """A ``put_bi``'s items (disk, first block, count, logical time) with their blocks
    cut from the blob, in order."""
    view = memoryview(data or b"")
    out = []
    pos = 0
    for disk, start, count, ltime in items:
        n = count * block_size
        if pos + n > len(view):
            raise UsageError("put_bi: blob shorter than the items say")
        out.append((disk, start, bytes(view[pos : pos + n]), ltime))
        pos += n
    return out


class NodeLogManager:
    """The log of at most one backup, kept by this node for the whole cluster.

    ``tell_failed(gen, reason)`` reports a failure to the coordinator and returns once
    it has acknowledged (the backup is aborted there); it raises when the coordinator
    cannot be told.
    """

    def __init__(self, cluster_id: str, block_size: int,
                 tell_failed: Callable[[str, str], None]) -> None:
        self.cluster_id = cluster_id
        self.block_size = block_size
        self.tell_failed = tell_failed
        self._lock = threading.Lock()
        self._tell_lock = threading.Lock()
        self._told: str | None = None  # the backup whose failure the coordinator knows
        self.window: BackupWindow | None = None
        self._closed_stats: dict[str, Any] | None = None

    @property
    def gen(self) -> str | None:
        w = self.window
        return w.gen_id if w is not None else None

    def open(self, gen: str, mode: str, path: Path, log_medium: bool) -> None:
        if mode == "merged":
            raise UsageError("a log node keeps the log of central, inline or separate modes")
        with self._lock:
            self._drop_locked()
            if log_medium:
                ensure_log_medium(path.parent, self.cluster_id)
            elif not path.parent.is_dir():
                raise UsageError(f"{path.parent} is not a directory on this node's host: the "
                                 "log node must see the backup medium (same host or shared "
                                 "storage), or use --log-mode separate with a --log-medium "
                                 "on its host")
            label = {"cluster": self.cluster_id, "generation": gen, "stream": 1}
            log = BiLog(path, block_size=self.block_size, label=label, dedup=True)
            self.window = BackupWindow(gen, mode, {}, log)
            self._closed_stats = None

    def put(self, gen: str, items: Sequence[tuple[int, int, int, int]], data: bytes | None
            ) -> int:
        """Store before images from a node (or the coordinator); on return they are in
        the log (written to the operating system), or the backup is aborted at the
        coordinator. Returns the number of blocks stored."""
        w = self.window
        if w is None or gen != w.gen_id:
            # Not this node's backup (any more): the window closed after the copy, so
            # this overwrite needs no before image. Before it opened, nobody is told to
            # send here (log_open precedes every backup_begin).
            return 0
        stored = w.put(before_images(items, data, self.block_size))
        if w.failed is not None:
            # Not stored: the coordinator must abort the backup before any writer
            # overwrites unlogged (this put's, and every concurrent one that found the
            # window failed). If it cannot be told, this raises, and the writer asks
            # the coordinator itself.
            with self._tell_lock:
                if self._told != gen:
                    self.tell_failed(gen, w.failed)
                    self._told = gen
        return stored

    def close(self, gen: str, discard: bool) -> dict[str, Any]:
        """End of the window: fsync and describe the log, or throw it away."""
        with self._lock:
            w = self.window
            if w is None or gen != w.gen_id:
                if self._closed_stats is not None and self._closed_stats["gen"] == gen \
                        and not discard:
                    return self._closed_stats
                raise UsageError(f"this node keeps no before-image log of backup {gen}")
            if discard:
                w.fail("the backup was aborted")
                self.window = None
                return {"discarded": True}
            w.close()
            if w.failed is not None:
                self.window = None
                raise SdbError(w.failed)
            assert w.log is not None
            path = w.log.path
            try:
                entry = stream_file_entry(path)
                blocks = sum(e.count for e in read_entries(path))
            except (OSError, SdbError) as e:
                self.window = None
                raise SdbError(f"the before-image log {path} could not be read back ({e})"
                               ) from None
            self._closed_stats = {"gen": gen, "path": str(path), "bytes": entry.bytes,
                                  "records": entry.records, "digest": f"{entry.digest:016x}",
                                  "blocks": blocks, "log_bytes": w.log.bytes}
            self.window = None
            return self._closed_stats

    def holds(self, gen: str) -> bool:
        """Whether this node holds the closed log of ``gen``."""
        st = self._closed_stats
        return st is not None and st["gen"] == gen

    def read(self, gen: str, offset: int, size: int) -> tuple[bytes, bool]:
        """Bytes of the closed log of ``gen`` (the coordinator fetches a separate-mode
        log that lies on this node's host)."""
        st = self._closed_stats
        if st is None or st["gen"] != gen:
            raise UsageError(f"this node holds no closed before-image log of backup {gen}")
        with open(st["path"], "rb") as f:
            f.seek(offset)
            data = f.read(min(size, 32 << 20))
        return data, len(data) < size

    def end(self, gen: str) -> None:
        """The backup is over (committed or not): forget it. A log still open (the
        coordinator never closed it: it failed) is thrown away."""
        with self._lock:
            w = self.window
            if w is not None and w.gen_id == gen:
                w.fail("the backup window ended without closing the log")
                self.window = None
            if self._closed_stats is not None and self._closed_stats["gen"] == gen:
                self._closed_stats = None

    def _drop_locked(self) -> None:
        if self.window is not None:
            self.window.fail("a new backup started")
        self.window = None
        self._closed_stats = None
