"""Reading one committed generation of a disk medium.

:class:`Generation` is a generation opened for reading: its manifest, its index, its
streams and its metadata snapshot, each checked against the manifest before use.
:class:`GenerationReader` is the generation as a block source (the block seam,
:mod:`sdbackup.blocks.source`): ``readinto(disk, block, buf)`` finds the records
holding those blocks in the index
(O(log n)), reads and verifies them (``RecordReader.read_at``) and returns the blocks;
blocks the generation does not hold (unused at T0) read as zeros; a damaged record
raises :class:`~sdbackup.errors.CorruptError` naming the generation, the disk, the
blocks and the medium offset. It never returns wrong data.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from sdbackup.blocks.source import Buffer
from sdbackup.errors import CorruptError, SdbError, UsageError
from sdbackup.media.index import BlockIndex, Entries, read_index
from sdbackup.media.medium import META, DiskMedium, Manifest, file_digest
from sdbackup.media.record_format import Kind
from sdbackup.media.record_reader import RecordReader
from sdbackup.types import DiskId


class Generation:
    """A committed generation opened for reading (files checked lazily, once)."""

    def __init__(self, medium: DiskMedium, manifest: Manifest) -> None:
        self.medium = medium
        self.manifest = manifest
        self.id = manifest.id
        self.dir = medium.generations_dir / manifest.id
        self._index: BlockIndex | None = None
        self._meta_ok = False
        self._lock = threading.Lock()

    @classmethod
    def open(cls, medium_path: str | os.PathLike[str], gen: str | None = None) -> Generation:
        medium = DiskMedium.open(medium_path)
        return cls(medium, medium.resolve(gen))

    @property
    def block_size(self) -> int:
        return self.manifest.block_size

    def stream_path(self, n: int) -> Path:
        """Stream ``n``: in the generation's directory, or, for a part of a dispersed
        generation, on the medium its copier wrote (media/media_set.py)."""
        from sdbackup.media.media_set import part_path

        return part_path(self.medium, self.manifest, n)

    @property
    def index_path(self) -> Path:
        return self.dir / self.manifest.index.name

    @property
    def meta_path(self) -> Path:
        return self.dir / META

    def where(self) -> str:
        return f"generation {self.id} on medium {self.medium.root}"

    def index(self) -> BlockIndex:
        """The index, read and checked once (stream checks, manifest size/digest, entry
        bounds against the manifest's disks)."""
        with self._lock:
            if self._index is None:
                from sdbackup.media.index import check_entries

                m = self.manifest
                entries, size, records, digest = read_index(self.index_path, where=self.where())
                if (size, records, digest) != (m.index.bytes, m.index.records, m.index.digest):
                    raise CorruptError(
                        f"{self.where()}: index {self.index_path} does not match the "
                        f"manifest ({size} bytes, {records} records, digest {digest:016x}; "
                        f"manifest: {m.index.bytes}, {m.index.records}, {m.index.digest:016x})")
                problems = check_entries(entries, {d.id: d.nblocks for d in m.disks},
                                         len(m.streams),
                                         {i: s.bytes for i, s in enumerate(m.streams)})
                if problems:
                    raise CorruptError(f"{self.where()}: index is damaged: {problems[0]}")
                self._index = BlockIndex(entries)
            return self._index

    def check_streams_present(self) -> None:
        """Every stream exists with the size the manifest lists (a cheap stat): a
        truncated stream is reported at once, naming the first blocks it lost."""
        if not self.medium.streams_local:
            self.medium.check_streams(self.manifest)
            return
        for n, s in enumerate(self.manifest.streams):
            p = self.stream_path(n)
            try:
                size = os.stat(p).st_size
            except FileNotFoundError:
                raise CorruptError(f"{self.where()}: stream {p} is missing") from None
            if size != s.bytes:
                what = "truncated" if size < s.bytes else "longer than written"
                lost = ""
                if size < s.bytes:
                    first = self._first_cut(n, p, size)
                    if first is not None:
                        lost = (f"; from disk {self.disk_name(int(first['disk']))} block "
                                f"{int(first['start'])} (offset {int(first['offset'])}) on, "
                                "blocks are missing")
                raise CorruptError(f"{self.where()}: stream {p} is {what}: {size} bytes, the "
                                   f"manifest says {s.bytes}{lost}")

    def _first_cut(self, n: int, path: Path, size: int) -> np.void | None:
        """The index entry of the first record of stream ``n`` that a truncation to
        ``size`` bytes cut off or removed."""
        e = self.index().entries
        sel = e[e["stream"] == n]
        sel = sel[np.argsort(sel["offset"], kind="stable")]
        offs = sel["offset"].astype(np.int64)
        i = int(np.searchsorted(offs, size, side="left")) - 1
        if i >= 0:
            try:
                with RecordReader(path) as rd:
                    whole = int(offs[i]) + rd.read_header(int(offs[i])).record_len <= size
            except SdbError:
                whole = False
            if whole:
                i += 1
        i = max(i, 0)
        return sel[i] if i < sel.size else None

    def meta_file(self) -> Path:
        """The metadata snapshot, after checking its size and checksum."""
        with self._lock:
            if not self._meta_ok:
                m = self.manifest.meta
                try:
                    size, digest = file_digest(self.meta_path)
                except FileNotFoundError:
                    raise CorruptError(f"{self.where()}: metadata snapshot {self.meta_path} is "
                                       "missing") from None
                if (size, digest) != (m.bytes, m.digest):
                    raise CorruptError(
                        f"{self.where()}: metadata snapshot {self.meta_path} is damaged "
                        f"({size} bytes, xxh3 {digest:016x}; the manifest says {m.bytes} "
                        f"bytes, xxh3 {m.digest:016x})")
                self._meta_ok = True
            return self.meta_path

    def disk_name(self, disk_id: int) -> str:
        return self.manifest.disk_by_id(disk_id).name


class GenerationReader:
    """A generation as a block source: ``readinto(disk_id, block, buf)``.

    Decoded records are kept in a small LRU cache (``cache_records``), so reading a
    file block by block does not decode the same 1 MiB record again for every block.
    Thread-safe.
    """

    def __init__(self, gen: Generation, *, cache_records: int = 16,
                 log_medium: str | os.PathLike[str] | None = None) -> None:
        self.gen = gen
        self.manifest = gen.manifest
        self._index = gen.index()
        gen.check_streams_present()
        self._ids = {d.name: d.id for d in self.manifest.disks}
        self._nblocks = {d.id: d.nblocks for d in self.manifest.disks}
        self._readers = [gen.medium.open_stream(gen.manifest, n)
                         for n in range(len(self.manifest.streams))]
        ext = external_log(gen, log_medium)
        if ext is not None:
            # c.5: a before-image log that was not overlaid is read first (BI entries
            # win over DATA), from its own medium.
            from sdbackup.media.bilog import read_entries
            from sdbackup.media.index import make_entries

            ents = read_entries(ext)
            n = len(self._readers)
            self._readers.append(RecordReader(ext, medium=str(ext)))
            e = self._index.entries
            self._index = BlockIndex(make_entries(
                np.concatenate([e["disk"], [x.disk for x in ents]]),
                np.concatenate([e["start"], [x.start for x in ents]]),
                np.concatenate([e["count"], [x.count for x in ents]]),
                np.concatenate([e["offset"], [x.offset for x in ents]]),
                np.concatenate([e["stream"], [n] * len(ents)]),
                np.concatenate([e["kind"], [int(Kind.BI)] * len(ents)])))
        self._cache: collections.OrderedDict[tuple[int, int], bytes] = collections.OrderedDict()
        self._cache_max = cache_records
        self._lock = threading.Lock()

    @classmethod
    def open(cls, medium_path: str | os.PathLike[str], gen: str | None = None) -> GenerationReader:
        return cls(Generation.open(medium_path, gen))

    def close(self) -> None:
        for r in self._readers:
            r.close()

    def __enter__(self) -> GenerationReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def block_size(self) -> int:
        return self.manifest.block_size

    @property
    def index(self) -> BlockIndex:
        return self._index

    def disk_id(self, disk: str | int) -> DiskId:
        if isinstance(disk, int):
            if disk not in self._nblocks:
                raise UsageError(f"generation {self.gen.id} has no disk id {disk}")
            return DiskId(disk)
        try:
            return DiskId(self._ids[disk])
        except KeyError:
            known = ", ".join(sorted(self._ids)) or "none"
            raise UsageError(f"generation {self.gen.id} has no disk {disk!r} "
                             f"(disks: {known})") from None

    # -- records -------------------------------------------------------------------------

    def record(self, entry: np.void) -> bytes:
        """The verified payload of the record an index entry names (cached)."""
        stream, offset = int(entry["stream"]), int(entry["offset"])
        key = (stream, offset)
        with self._lock:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
                return data
        data = self._load(entry)
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self._cache_max:
                self._cache.popitem(last=False)
        return data

    def _load(self, entry: np.void) -> bytes:
        disk, start, count = int(entry["disk"]), int(entry["start"]), int(entry["count"])
        stream, offset, kind = int(entry["stream"]), int(entry["offset"]), int(entry["kind"])
        name = self.gen.disk_name(disk)
        where = (f"generation {self.gen.id}: disk {name} blocks {start}..{start + count - 1} "
                 f"(stream {stream}, medium offset {offset})")
        try:
            rec = self._readers[stream].read_at(offset)
        except SdbError as e:
            raise CorruptError(f"{where}: {e.message}") from None
        h = rec.header
        if (h.kind, h.disk_id, h.start_block, h.block_count) != (kind, disk, start, count):
            raise CorruptError(
                f"{where}: the record there is {h.describe()}, not what the index says: the "
                "index or the stream is damaged")
        if h.raw_len != count * self.block_size:
            raise CorruptError(f"{where}: the record holds blocks of {h.block_size} bytes, the "
                               f"generation's block size is {self.block_size}")
        return rec.data

    # -- the block seam (BlockSource) -------------------------------------------------------

    def readinto(self, disk: DiskId, block: int, buf: Buffer) -> None:
        """Fill ``buf`` with blocks of ``disk`` from ``block``: zeros where the generation
        holds nothing (blocks unused at T0); before images win over copied data."""
        bs = self.block_size
        with memoryview(buf) as mv:
            out = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
            if out.nbytes % bs:
                raise ValueError("buffer is not a whole number of blocks")
            count = out.nbytes // bs
            did = self._check_range(disk, block, count)
            out[:] = _zeros(out.nbytes)
            end = block + count
            for kind in (int(Kind.DATA), int(Kind.BI)):  # BI wins over DATA: applied last
                for e in self._index.find(did, kind, block, count):
                    s, c = int(e["start"]), int(e["count"])
                    lo, hi = max(s, block), min(s + c, end)
                    data = self.record(e)
                    out[(lo - block) * bs : (hi - block) * bs] = \
                        data[(lo - s) * bs : (hi - s) * bs]

    def read(self, disk: str | int, block: int, count: int) -> bytes:
        """``count`` blocks of ``disk`` (by id or name) from ``block``, as bytes."""
        did = self._check_range(disk, block, count)
        buf = bytearray(count * self.block_size)
        self.readinto(did, block, buf)
        return bytes(buf)

    def _check_range(self, disk: str | int, block: int, count: int) -> DiskId:
        did = self.disk_id(disk)
        nb = self._nblocks[did]
        if block < 0 or count < 0 or block + count > nb:
            raise UsageError(f"block range {block}+{count} is outside disk "
                             f"{self.gen.disk_name(did)} ({nb} blocks)")
        return did

    def records(self, disk: str | int, *, threads: int = 2, ahead: int = 8,
                kind: int = int(Kind.DATA)) -> Iterator[tuple[int, int, bytes]]:
        """Every record of ``kind`` (DATA by default) of a disk as (start, count, data),
        in medium order, read and verified ``ahead`` records in advance by ``threads``
        threads (for images: write DATA first, then BI, which wins)."""
        did = self.disk_id(disk)
        if not self.gen.medium.streams_local:
            threads = 1  # tape: records are asked for strictly in tape order
        entries: Entries = self._index.for_disk(did, kind)
        entries = entries[np.lexsort((entries["offset"], entries["stream"]))]
        if entries.size == 0:
            return
        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="sdb-genread") as pool:
            pending: collections.deque[tuple[int, int, Future[bytes]]] = collections.deque()
            it = iter(entries)
            try:
                for e in it:
                    pending.append((int(e["start"]), int(e["count"]), pool.submit(self._load, e)))
                    if len(pending) >= ahead:
                        s, c, f = pending.popleft()
                        yield s, c, f.result()
                while pending:
                    s, c, f = pending.popleft()
                    yield s, c, f.result()
            finally:
                for _, _, f in pending:
                    f.cancel()


_ZEROS = memoryview(bytes(8 << 20))


def _zeros(n: int) -> memoryview:
    """``n`` zero bytes without allocating them (most reads are ≤ 8 MiB)."""
    return _ZEROS[:n] if n <= len(_ZEROS) else memoryview(bytes(n))


def external_log(gen: Generation, log_medium: str | os.PathLike[str] | None = None
                 ) -> Path | None:
    """The separate before-image log a generation still needs (not overlaid), checked
    against the manifest; None when the generation needs no other medium."""
    log = gen.manifest.extra.get("log")
    if not isinstance(log, dict) or not log.get("medium") or log.get("overlaid", True):
        return None
    from sdbackup.errors import NotFoundError

    path = Path(log_medium or str(log["medium"])) / str(log["file"])
    if not path.exists():
        raise NotFoundError(
            f"generation {gen.id} was backed up with its before-image log on a separate "
            f"log medium, and the log is not overlaid yet; {path} does not exist: give "
            "--log-medium DIR, or run 'sdbackup overlay' while the log medium is there")
    size = path.stat().st_size
    if size != int(log.get("bytes", -1)):
        raise CorruptError(f"generation {gen.id}: before-image log {path} has {size} bytes, "
                           f"the manifest says {log.get('bytes')}")
    return path
