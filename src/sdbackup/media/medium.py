"""A disk medium: a directory holding backup generations of one cluster.

Layout (``docs/FORMAT.md``, "Generation layout on a disk medium")::

    MEDIUM/sdbackup-medium.json             the medium's label (format, id, cluster)
    MEDIUM/generations/<GEN_ID>/meta.db      metadata snapshot at T0 (SQLite)
    MEDIUM/generations/<GEN_ID>/stream-0.sdr record stream(s), one per copier
    MEDIUM/generations/<GEN_ID>/index        (disk, block run) -> (stream, offset, kind)
    MEDIUM/generations/<GEN_ID>/manifest.json written and fsynced LAST: the commit

A generation is committed exactly when its ``manifest.json`` exists; anything else in
``generations/`` is an unfinished backup (crashed, killed, medium full) that listing
ignores and :meth:`DiskMedium.gc` removes. While a backup writes a generation it holds
an ``flock`` on the generation's ``.lock`` file, so ``gc`` never removes a generation
that is still being written.

Nothing read from a medium is trusted: the label and every manifest are checked
(format, version, checksum, the cluster they belong to) before use.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from sdbackup.blocks.durable import sync_dir, write_atomic
from sdbackup.errors import CorruptError, NoSpaceError, NotFoundError, SdbError, UsageError

if TYPE_CHECKING:  # the record reader pulls in zstandard: not for 'generations' (issue 11)
    from sdbackup.media.record_reader import RecordReader

MEDIUM_LABEL = "sdbackup-medium.json"
MEDIUM_FORMAT = "sdbackup-medium"
MEDIUM_VERSION = 1
GENERATIONS = "generations"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "sdbackup-generation"
MANIFEST_VERSION = 1
META = "meta.db"
INDEX = "index"
INDEX_NAME_RE = re.compile(r"^index(\.\d+)?$")
"""The index file: ``index``, or ``index.N`` after N rewrites (overlay): a rewrite
writes a new file and then the manifest, so the commit stays one atomic rename."""
LOCK = ".lock"
FAILED = "FAILED"

GEN_ID_RE = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8}$")
"""Generation ids: UTC time of the backup's start to the microsecond, then 32 random
bits, e.g. ``20261124T202353.481923Z-3f9a1c2b``. They sort in time order as strings."""
_GEN_PREFIX_RE = re.compile(r"^\d{8}T[0-9a-fTZ.\-]*$")

KINDS = ("full", "incremental", "synthetic")
"""``full``: every block in use at T0. ``incremental``: the blocks that changed since
its parent's T0 (or since a mark), read through its chain. ``synthetic``: a full made
by merging a chain's generations (a.10), not by reading the disks."""
FULL_KINDS = ("full", "synthetic")
CHAIN_LOCK = "chains.lock"
PARTS_DIR = "parts"
"""On a medium that holds parts of a generation committed on another medium:
``MEDIUM/parts/<GEN_ID>/stream-N.sdr`` (not under ``generations/``, so that listing and
``gc`` of that medium never take it for an unfinished generation)."""
PARTS_ORIGIN = "ORIGIN.json"
"""In ``parts/<GEN_ID>/``: the id of the medium that commits the generation (written
by the copier before its first part there), so that ``gc`` can tell whether the
generation is committed, still running or gone."""


def stream_name(n: int) -> str:
    """File name of record stream ``n`` of a generation (one per copier)."""
    return f"stream-{n}.sdr"


def new_generation_id(now_ns: int | None = None) -> str:
    ns = time.time_ns() if now_ns is None else now_ns
    secs, rest = divmod(ns, 1_000_000_000)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(secs))
    return f"{stamp}.{rest // 1000:06d}Z-{secrets.token_hex(4)}"


def looks_like_generation(text: str) -> bool:
    """True for a generation id or a prefix of one (``20261124T...``)."""
    return bool(_GEN_PREFIX_RE.match(text)) and len(text) >= 9


def iso_utc(ns: int) -> str:
    secs, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{rest // 1000:06d}Z"


def file_digest(path: Path, chunk: int = 8 << 20) -> tuple[int, int]:
    """(size, XXH3-64) of a file's bytes."""
    h = xxhash.xxh3_64()
    size = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while True:
            b = os.read(fd, chunk)
            if not b:
                break
            h.update(b)
            size += len(b)
    finally:
        os.close(fd)
    return size, int(h.intdigest())


# ---------------------------------------------------------------------------------------
# manifest


@dataclass(frozen=True)
class DiskEntry:
    """A disk of the backed-up cluster as the generation knows it."""

    id: int
    name: str
    nblocks: int
    blocks: int  # used blocks stored in this generation


@dataclass(frozen=True)
class FileEntry:
    """A file of the generation with its size and checksum.

    For record streams (and the index, a record stream too) ``digest`` is the stream's
    header digest (:class:`~sdbackup.media.record_scan.StreamDigest`); for ``meta.db`` it
    is XXH3-64 of the file's bytes.
    """

    name: str
    bytes: int
    digest: int
    records: int = 0


@dataclass(frozen=True)
class Manifest:
    """A generation's manifest: what it is, and what its files must look like."""

    id: str
    kind: str
    parent: str | None
    group: str | None
    cluster_id: str
    medium_id: str
    block_size: int
    t0_wall_ns: int
    t0_logical: int
    committed_ns: int
    disks: tuple[DiskEntry, ...]
    streams: tuple[FileEntry, ...]
    index: FileEntry
    index_entries: int
    meta: FileEntry
    compression: str
    freeze_seconds: float
    copy_seconds: float
    state: str = "committed"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def blocks(self) -> int:
        return sum(d.blocks for d in self.disks)

    @property
    def is_full(self) -> bool:
        return self.kind in FULL_KINDS

    @property
    def chain(self) -> str | None:
        """The chain this generation belongs to (a full starts one; None for
        generations written before chains existed, each a chain of its own)."""
        c = self.extra.get("chain")
        return c if isinstance(c, str) else None

    @property
    def tracking(self) -> tuple[str, int] | None:
        """(token, era) of the changed-block tracking at this generation's T0: an
        incremental may follow it only while the cluster's tracking has that token."""
        t = self.extra.get("tracking")
        if isinstance(t, dict) and isinstance(t.get("token"), str) \
                and isinstance(t.get("era"), int):
            return str(t["token"]), int(t["era"])
        return None

    @property
    def replaces(self) -> tuple[str, ...]:
        """The generations a merge made this one from (they are superseded by it)."""
        r = self.extra.get("replaces")
        return tuple(str(x) for x in r) if isinstance(r, list) else ()

    @property
    def stored_bytes(self) -> int:
        return sum(s.bytes for s in self.streams)

    @property
    def total_bytes(self) -> int:
        """Everything the generation takes on the medium (streams, index, snapshot)."""
        return self.stored_bytes + self.index.bytes + self.meta.bytes

    def disk(self, name: str) -> DiskEntry:
        for d in self.disks:
            if d.name == name:
                return d
        known = ", ".join(d.name for d in self.disks) or "none"
        raise UsageError(f"generation {self.id} has no disk {name!r} (disks: {known})")

    def disk_by_id(self, disk_id: int) -> DiskEntry:
        for d in self.disks:
            if d.id == disk_id:
                return d
        raise CorruptError(f"generation {self.id} refers to disk id {disk_id}, which its "
                           "manifest does not list")

    def to_dict(self) -> dict[str, Any]:
        def fe(f: FileEntry, with_records: bool) -> dict[str, Any]:
            d: dict[str, Any] = {"name": f.name, "bytes": f.bytes, "digest": f"{f.digest:016x}"}
            if with_records:
                d["records"] = f.records
            return d

        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "id": self.id,
            "kind": self.kind,
            "parent": self.parent,
            "group": self.group,
            "state": self.state,
            "cluster_id": self.cluster_id,
            "medium_id": self.medium_id,
            "block_size": self.block_size,
            "t0": {"wall_ns": self.t0_wall_ns, "wall": iso_utc(self.t0_wall_ns),
                   "logical": self.t0_logical},
            "committed": {"wall_ns": self.committed_ns, "wall": iso_utc(self.committed_ns)},
            "disks": [{"id": d.id, "name": d.name, "nblocks": d.nblocks, "blocks": d.blocks}
                      for d in self.disks],
            "sizes": {"blocks": self.blocks, "raw_bytes": self.blocks * self.block_size,
                      "stored_bytes": self.stored_bytes, "total_bytes": self.total_bytes},
            "streams": [fe(s, True) for s in self.streams],
            "index": {**fe(self.index, True), "entries": self.index_entries},
            "meta": fe(self.meta, False),
            "compression": self.compression,
            "timing": {"freeze_seconds": round(self.freeze_seconds, 6),
                       "copy_seconds": round(self.copy_seconds, 6)},
            **dict(self.extra),
        }

    def to_json(self) -> bytes:
        """The manifest file's bytes: readable JSON with a checksum of its content."""
        body = self.to_dict()
        body["checksum"] = _manifest_checksum(body)
        return (json.dumps(body, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Manifest:
        """Parse and check a manifest; CorruptError naming ``where`` on any problem."""
        def bad(what: str) -> CorruptError:
            return CorruptError(f"manifest {where} is damaged: {what}")

        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"not JSON ({e})") from None
        if not isinstance(d, dict):
            raise bad("not a JSON object")
        if d.get("format") != MANIFEST_FORMAT:
            raise bad(f"format is {d.get('format')!r}, not {MANIFEST_FORMAT!r}")
        if d.get("version") != MANIFEST_VERSION:
            raise CorruptError(f"manifest {where} has version {d.get('version')!r}; this "
                               f"sdbackup reads version {MANIFEST_VERSION} (written by a "
                               "newer sdbackup?)")
        want = d.pop("checksum", None)
        if want != _manifest_checksum(d):
            raise bad(f"checksum mismatch (stored {want!r}, computed "
                      f"{_manifest_checksum(d)!r})")
        try:
            disks = tuple(DiskEntry(_int(x["id"]), _str(x["name"]), _int(x["nblocks"]),
                                    _int(x["blocks"])) for x in d["disks"])
            streams = tuple(_file(x, True) for x in d["streams"])
            m = cls(
                id=_str(d["id"]), kind=_str(d["kind"]), parent=_opt_str(d["parent"]),
                group=_opt_str(d["group"]), cluster_id=_str(d["cluster_id"]),
                medium_id=_str(d["medium_id"]), block_size=_int(d["block_size"]),
                t0_wall_ns=_int(d["t0"]["wall_ns"]), t0_logical=_int(d["t0"]["logical"]),
                committed_ns=_int(d["committed"]["wall_ns"]), disks=disks, streams=streams,
                index=_file(d["index"], True), index_entries=_int(d["index"]["entries"]),
                meta=_file(d["meta"], False), compression=_str(d["compression"]),
                freeze_seconds=float(d["timing"]["freeze_seconds"]),
                copy_seconds=float(d["timing"]["copy_seconds"]), state=_str(d["state"]),
                extra={k: v for k, v in d.items() if k not in _KNOWN_KEYS},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"missing or malformed field ({type(e).__name__}: {e})") from None
        if not GEN_ID_RE.match(m.id):
            raise bad(f"bad generation id {m.id!r}")
        if m.kind not in KINDS:
            raise bad(f"unknown generation kind {m.kind!r} (known: {', '.join(KINDS)})")
        if (m.parent is None) != m.is_full:
            raise bad(f"a {m.kind} generation {'needs' if m.parent is None else 'has no'} "
                      "parent")
        if m.parent is not None and not GEN_ID_RE.match(m.parent):
            raise bad(f"bad parent generation id {m.parent!r}")
        if not m.is_full and m.chain is None:
            raise bad("an incremental generation names no chain")
        if m.state != "committed":
            raise bad(f"state is {m.state!r}, not 'committed'")
        bs = m.block_size
        if bs < 512 or bs & (bs - 1):
            raise bad(f"block size {bs} is not a power of two >= 512")
        if not m.streams:
            raise bad("it lists no record stream")
        names = [s.name for s in m.streams]
        if names != [stream_name(i) for i in range(len(names))]:
            raise bad(f"stream names {names} are not stream-0.sdr, stream-1.sdr, ...")
        if not INDEX_NAME_RE.match(m.index.name) or m.meta.name != META:
            raise bad("unexpected index or snapshot file name")
        ids = [x.id for x in m.disks]
        if len(set(ids)) != len(ids) or len({x.name for x in m.disks}) != len(ids):
            raise bad("two disks share an id or a name")
        for x in m.disks:
            if not 0 <= x.id < 1 << 32 or x.nblocks < 1 or not 0 <= x.blocks <= x.nblocks:
                raise bad(f"impossible disk entry {x}")
        return m


_KNOWN_KEYS = frozenset({
    "format", "version", "id", "kind", "parent", "group", "state", "cluster_id", "medium_id",
    "block_size", "t0", "committed", "disks", "sizes", "streams", "index", "meta",
    "compression", "timing", "checksum"})


def _manifest_checksum(body: Mapping[str, Any]) -> str:
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return f"xxh3-64:{xxhash.xxh3_64_intdigest(canon):016x}"


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{v!r} is not a non-negative integer")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{v!r} is not a string")
    return v


def _opt_str(v: Any) -> str | None:
    return None if v is None else _str(v)


def _file(x: Mapping[str, Any], with_records: bool) -> FileEntry:
    return FileEntry(_str(x["name"]), _int(x["bytes"]), int(_str(x["digest"]), 16),
                     _int(x["records"]) if with_records else 0)


# ---------------------------------------------------------------------------------------
# chains


class Catalog:
    """The committed generations of a medium and how they chain (c.2).

    A full (or synthetic full) starts a chain; each incremental names its parent, the
    generation its changes are relative to. A merge (a.10) commits one generation that
    ``replaces`` two adjacent ones; until ``gc`` removes them they stay on the medium
    but are not *current*, and a parent id naming one of them resolves to the
    generation that replaced it (a merge keeps the newer one's T0 and view).
    """

    def __init__(self, manifests: list[Manifest]) -> None:
        self.all = {m.id: m for m in manifests}
        self.replaced_by: dict[str, str] = {}
        for m in manifests:
            for r in m.replaces:
                if r != m.id:
                    self.replaced_by[r] = m.id
        self.current = [m for m in manifests if m.id not in self.replaced_by]

    def replaced(self) -> list[Manifest]:
        return [m for m in self.all.values() if m.id in self.replaced_by]

    def get(self, gen_id: str) -> Manifest | None:
        """The current generation standing for ``gen_id`` (itself, or what replaced it)."""
        seen = set()
        while gen_id in self.replaced_by and gen_id not in seen:
            seen.add(gen_id)
            gen_id = self.replaced_by[gen_id]
        return self.all.get(gen_id)

    def parent(self, m: Manifest) -> Manifest | None:
        if m.parent is None:
            return None
        p = self.get(m.parent)
        if p is None:
            raise CorruptError(f"generation {m.id} is an incremental of {m.parent}, which is "
                               "not on the medium (removed by hand?): its chain is broken "
                               "and it cannot be read; take a new full backup")
        return p

    def chain(self, m: Manifest) -> list[Manifest]:
        """``m`` and its ancestors, newest first, ending with the chain's full."""
        out = [m]
        while not out[-1].is_full:
            p = self.parent(out[-1])
            assert p is not None
            if p in out or len(out) > len(self.all):
                raise CorruptError(f"generation {m.id}: its chain loops through {p.id}")
            if p.chain != m.chain:
                raise CorruptError(f"generation {out[-1].id} names parent {p.id} of another "
                                   f"chain ({p.chain}, not {m.chain})")
            if p.t0_wall_ns > out[-1].t0_wall_ns or p.block_size != m.block_size:
                raise CorruptError(f"generation {out[-1].id} names parent {p.id}, which is "
                                   "newer or of another block size")
            out.append(p)
        return out

    def children(self, m: Manifest) -> list[Manifest]:
        """Current generations whose parent is ``m`` (or what ``m`` replaced)."""
        return [c for c in self.current
                if c.parent is not None and self.get(c.parent) is m]

    def head(self, group: str | None = None) -> Manifest | None:
        """The newest current generation of ``group`` (None: whole-cluster backups)."""
        mine = [m for m in self.current if m.group == group]
        return max(mine, key=lambda m: (m.t0_wall_ns, m.id)) if mine else None


# ---------------------------------------------------------------------------------------
# the medium


@dataclass
class GenerationEntry:
    """One directory under ``generations/``: committed (valid manifest), damaged or
    foreign (a manifest that fails its checks: ``problem``), or unfinished (none)."""

    id: str
    path: Path
    manifest: Manifest | None
    problem: str | None = None

    @property
    def committed(self) -> bool:
        return self.manifest is not None

    @property
    def unfinished(self) -> bool:
        return self.manifest is None and self.problem is None


class DiskMedium:
    """A directory that holds the backup generations of one cluster.

    ``streams_local``: the generations' record streams are files in their directories
    (a tape set's catalog holds everything of a generation but its streams, which are
    read from tape: :class:`~sdbackup.media.tape.catalog.TapeSetMedium`)."""

    streams_local = True

    def __init__(self, root: Path, label: Mapping[str, Any]) -> None:
        self.root = root
        self.label = dict(label)
        self.medium_id: str = str(label["medium_id"])
        self.cluster_id: str = str(label["cluster_id"])
        # Other media given with this one, where parts of its dispersed generations may
        # lie (media/media_set.py).
        self.companions: list[DiskMedium] = []
        # Lines about parts of removed generations that could not be removed (one per
        # medium; see remove_generation), for the command to print.
        self.unreached: list[str] = []

    @property
    def generations_dir(self) -> Path:
        return self.root / GENERATIONS

    def __str__(self) -> str:
        return str(self.root)

    def open_stream(self, manifest: Manifest, n: int) -> RecordReader:
        """A reader of record stream ``n`` of generation ``manifest``: in the
        generation's directory, or, for a part of a dispersed generation, on the medium
        its copier wrote (media/media_set.py)."""
        from sdbackup.media.media_set import part_path
        from sdbackup.media.record_reader import RecordReader

        path = part_path(self, manifest, n)
        return RecordReader(path, medium=str(path))

    def read_position(self, manifest: Manifest, stream: int, offset: int) -> tuple[int, ...]:
        """A sort key of where a record lies: reading in this order reads each medium
        front to back (here: generations oldest first, then stream and offset)."""
        return (manifest.t0_wall_ns, stream, offset)

    def check_streams(self, manifest: Manifest) -> None:
        """Where streams are not local files: check that every stream can be read
        whole (``Generation.check_streams_present`` checks local files)."""

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> DiskMedium:
        """An existing medium; NotFoundError / UsageError / CorruptError otherwise."""
        root = Path(path).absolute()
        if not root.exists():
            raise NotFoundError(f"backup medium {root} does not exist: give the directory "
                                "that 'sdbackup backup --medium' wrote to")
        if not root.is_dir():
            raise UsageError(f"backup medium {root} is not a directory")
        label_path = root / MEDIUM_LABEL
        if not label_path.exists():
            raise UsageError(f"{root} is not an sdbackup medium (it has no {MEDIUM_LABEL}): "
                             "give the directory that 'sdbackup backup --medium' wrote to")
        try:
            raw = label_path.read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read {label_path}: {e.strerror or e}") from None
        return cls(root, _parse_label(raw, label_path))

    @classmethod
    def open_for_backup(cls, path: str | os.PathLike[str], cluster_id: str) -> DiskMedium:
        """The medium at ``path`` for a backup of ``cluster_id``, created when ``path``
        does not exist or is an empty directory."""
        root = Path(path).absolute()
        if root.exists() and (root / MEDIUM_LABEL).exists():
            medium = cls.open(root)
            if medium.cluster_id != cluster_id:
                raise UsageError(f"backup medium {root} holds backups of cluster "
                                 f"{medium.cluster_id}, not of cluster {cluster_id}: give "
                                 "each cluster a medium directory of its own")
            medium.generations_dir.mkdir(exist_ok=True)
            return medium
        if root.exists():
            if not root.is_dir():
                raise UsageError(f"backup medium {root} is not a directory")
            if any(root.iterdir()):
                raise UsageError(f"{root} is not an sdbackup medium (no {MEDIUM_LABEL}) and "
                                 "not empty: give a new or empty directory for a new medium")
        made_root = False
        if not root.exists():
            if not root.parent.is_dir():
                raise NotFoundError(f"cannot create backup medium {root}: directory "
                                    f"{root.parent} does not exist")
            try:
                root.mkdir()
                made_root = True
            except FileExistsError:
                pass
            except OSError as e:
                raise _os_error(e, f"cannot create backup medium {root}") from None
        label = {"format": MEDIUM_FORMAT, "version": MEDIUM_VERSION,
                 "medium_id": str(uuid.uuid4()), "cluster_id": cluster_id,
                 "created": iso_utc(time.time_ns())}
        try:
            write_atomic(root / MEDIUM_LABEL, (json.dumps(label, indent=2) + "\n").encode())
            (root / GENERATIONS).mkdir(exist_ok=True)
        except OSError as e:
            # Leave the directory as it was, so that the next try starts afresh.
            for p in (root / GENERATIONS, root / (MEDIUM_LABEL + ".tmp"), root / MEDIUM_LABEL):
                try:
                    p.rmdir() if p.is_dir() else p.unlink()
                except OSError:
                    pass
            if made_root:
                shutil.rmtree(root, ignore_errors=True)
            raise _os_error(e, f"cannot create backup medium {root}") from None
        return cls(root, label)

    # -- generations -----------------------------------------------------------------

    def scan(self) -> list[GenerationEntry]:
        """Every generation directory, oldest first, with its manifest checked."""
        out: list[GenerationEntry] = []
        gdir = self.generations_dir
        if not gdir.is_dir():
            return out
        for name in sorted(os.listdir(gdir)):
            path = gdir / name
            if not GEN_ID_RE.match(name) or path.is_symlink() or not path.is_dir():
                continue  # not a generation (a symlink is never followed, nor removed)
            mpath = path / MANIFEST
            if not mpath.exists():
                out.append(GenerationEntry(name, path, None))
                continue
            try:
                out.append(GenerationEntry(name, path, self.read_manifest(name)))
            except CorruptError as e:
                out.append(GenerationEntry(name, path, None, e.message))
        return out

    def read_manifest(self, gen_id: str) -> Manifest:
        """The checked manifest of generation ``gen_id`` (CorruptError when it is damaged,
        from another cluster, or names another generation)."""
        mpath = self.generations_dir / gen_id / MANIFEST
        try:
            raw = mpath.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"generation {gen_id} on medium {self.root} was never "
                                "committed (no manifest: the backup did not finish); "
                                "'sdbackup gc' removes it") from None
        m = Manifest.from_json(raw, str(mpath))
        if m.id != gen_id:
            raise CorruptError(f"manifest {mpath} describes generation {m.id}, not {gen_id}: "
                               "the directory was renamed or copied over")
        if m.cluster_id != self.cluster_id:
            raise CorruptError(
                f"generation {gen_id} on medium {self.root} belongs to cluster "
                f"{m.cluster_id}, but this medium holds backups of cluster {self.cluster_id}"
                ": it was copied in from another medium; move it to a medium of its own")
        return m

    def committed(self) -> list[Manifest]:
        """Committed, valid generations, oldest T0 first, without those a committed
        merge replaced (they wait for ``gc``)."""
        return sorted(self.catalog().current, key=lambda m: (m.t0_wall_ns, m.id))

    def catalog(self) -> Catalog:
        """The committed generations and how they chain (see :class:`Catalog`)."""
        return Catalog([e.manifest for e in self.scan() if e.manifest is not None])

    @contextmanager
    def chain_lock(self) -> Iterator[None]:
        """Held by whatever adds to or rewrites chains (backup, merge, prune, gc), so that
        two of them never pick the same parent or remove what the other reads."""
        path = self.root / CHAIN_LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def remove_generation(self, gen_id: str, *,
                          uncommitted: Callable[[], None] | None = None) -> list[str]:
        """Remove a committed generation so that a crash at any point leaves it either
        committed and whole or unfinished (which ``gc`` removes): the manifest, its
        commit point, goes first and durably, then the rest. ``uncommitted`` runs
        between the two (a test's crash point).

        A dispersed generation's parts on other media go last (from the companions,
        else from the directory the manifest recorded, checked by its label): returns
        one line per medium whose parts could not be removed (also kept in
        ``self.unreached``); they belong to no generation from then on, and ``gc`` of
        that medium with this one removes them."""
        path = self.generations_dir / gen_id
        elsewhere: dict[str, list[dict[str, Any]]] = {}
        media: Mapping[str, Any] = {}
        if self.streams_local:
            try:
                m = self.read_manifest(gen_id)
            except (NotFoundError, CorruptError):
                m = None  # already uncommitted, or damaged: no parts to find from it
            if m is not None:
                for p in parts_of(m):
                    if p.get("medium") != self.medium_id and isinstance(p.get("medium"), str):
                        elsewhere.setdefault(str(p["medium"]), []).append(p)
                raw_media = m.extra.get("media")
                media = raw_media if isinstance(raw_media, Mapping) else {}
        try:
            (path / MANIFEST).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _os_error(e, f"cannot remove generation {gen_id} from medium {self.root}"
                            ) from None
        if path.exists():
            sync_dir(path)
            if uncommitted is not None:
                uncommitted()
            try:
                shutil.rmtree(path)
            except OSError as e:
                raise _os_error(e, f"generation {gen_id} on medium {self.root} is no longer "
                                "committed but cannot be removed ('sdbackup gc' retries)"
                                ) from None
        sync_dir(self.generations_dir)
        notes: list[str] = []
        for mid, parts in elsewhere.items():
            info = media.get(mid)
            hint = str(info["path"]) if isinstance(info, Mapping) and info.get("path") \
                else None
            other = self.companion(mid, hint)
            streams = ", ".join(str(p.get("stream")) for p in parts)
            why = "that medium is not here"
            if other is not None:
                try:
                    remove_parts_dir(other, gen_id)
                    continue
                except OSError as e:
                    why = f"{e.strerror or e}"
            nodes = ", ".join(info.get("nodes", [])) if isinstance(info, Mapping) else "?"
            notes.append(f"generation {gen_id}: its parts (streams {streams}) on medium "
                         f"{mid}, written by node(s) {nodes or '?'} to {hint or '?'}, were "
                         f"not removed ({why}): 'sdbackup gc --medium {self.root} --medium "
                         "DIR' removes them where that medium is")
        self.unreached.extend(notes)
        return notes

    def companion(self, medium_id: str, hint: str | None) -> DiskMedium | None:
        """The medium ``medium_id`` given with this one (a companion), else the one at
        ``hint`` when its label has that id and this cluster (then it becomes a
        companion); None when it is not here."""
        for c in self.companions:
            if c.medium_id == medium_id:
                return c
        if hint is None:
            return None
        try:
            found = DiskMedium.open(hint)
        except (SdbError, OSError):
            return None
        if found.medium_id != medium_id or found.cluster_id != self.cluster_id:
            return None
        self.companions.append(found)
        return found

    def parts_dir(self, gen_id: str, first_medium_id: str) -> Path:
        """``parts/<gen_id>/`` on this medium, made (durably) with its origin: where a
        copier writes parts of generation ``gen_id`` committed on ``first_medium_id``."""
        if not GEN_ID_RE.match(gen_id):
            raise UsageError(f"{gen_id!r} is not a generation id")
        d = self.root / PARTS_DIR / gen_id
        if not (d / PARTS_ORIGIN).exists():
            d.mkdir(parents=True, exist_ok=True)
            write_atomic(d / PARTS_ORIGIN, (json.dumps(
                {"generation": gen_id, "medium": first_medium_id,
                 "cluster": self.cluster_id}) + "\n").encode())
            sync_dir(d.parent)
            sync_dir(self.root)
        return d

    def resolve(self, gen: str | None) -> Manifest:
        """The generation named ``gen`` (an id or a unique prefix), or the newest
        committed one when ``gen`` is None."""
        entries = self.scan()
        if gen is None or gen == "latest":
            good = Catalog([e.manifest for e in entries if e.manifest is not None]).current
            good.sort(key=lambda m: (m.t0_wall_ns, m.id))  # a merge's id is newer than its T0
            if not good:
                bad = [e.problem for e in entries if e.problem is not None]
                if bad:  # say why rather than "nothing there"
                    raise CorruptError(f"backup medium {self.root} holds no usable "
                                       f"generation: {bad[-1]}")
                raise NotFoundError(f"backup medium {self.root} holds no committed generation")
            return good[-1]
        hits = [e for e in entries if e.id == gen] or [e for e in entries if e.id.startswith(gen)]
        if not hits:
            known = ", ".join(e.id for e in entries if e.committed) or "none"
            raise NotFoundError(f"generation {gen} is not on medium {self.root} (committed "
                                f"generations: {known})")
        if len(hits) > 1:
            raise UsageError(f"generation {gen} is ambiguous on medium {self.root}: "
                             f"{', '.join(e.id for e in hits)}")
        e = hits[0]
        if e.manifest is not None:
            return e.manifest
        if e.problem is not None:
            raise CorruptError(e.problem)
        return self.read_manifest(e.id)  # raises: never committed

    def begin(self, gen_id: str | None = None) -> PendingGeneration:
        """Create a new generation directory, locked against ``gc`` while written."""
        gid = gen_id or new_generation_id()
        path = self.generations_dir / gid
        fd = -1
        try:
            self.generations_dir.mkdir(exist_ok=True)
            path.mkdir()
            fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
            sync_dir(self.generations_dir)
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            shutil.rmtree(path, ignore_errors=True)
            raise _os_error(e, f"cannot create generation {gid} on medium {self.root}") from None
        return PendingGeneration(self, gid, path, fd)

    def gc(self, *, dry_run: bool = False) -> list[GenerationEntry]:
        """Remove unfinished generations (no manifest) that no backup is writing.

        Damaged or foreign generations are left alone (they are reported by
        ``generations`` and ``verify``): deciding about them is the operator's job.
        """
        removed: list[GenerationEntry] = []
        for e in self.scan():
            if not e.unfinished:
                continue
            fd = _try_lock(e.path / LOCK)
            if fd == -1:
                continue  # a backup is writing it right now
            try:
                if (e.path / MANIFEST).exists():
                    continue  # committed meanwhile
                if not dry_run:
                    shutil.rmtree(e.path)
                removed.append(e)
            finally:
                if fd is not None:
                    os.close(fd)
        if removed and not dry_run:
            sync_dir(self.generations_dir)
        return removed


def parts_of(m: Manifest) -> list[dict[str, Any]]:
    """The manifest's parts (empty for a generation copied by one copier)."""
    parts = m.extra.get("parts")
    return [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []


def remove_parts_dir(medium: DiskMedium, gen_id: str) -> bool:
    """Remove ``parts/<gen_id>/`` of ``medium`` (durably); False if there was none."""
    if not GEN_ID_RE.match(gen_id):
        raise UsageError(f"{gen_id!r} is not a generation id")
    d = medium.root / PARTS_DIR / gen_id
    if d.is_symlink() or not d.is_dir():
        return False
    shutil.rmtree(d)
    sync_dir(d.parent)
    return True


def generation_state(medium: DiskMedium, gen_id: str) -> str:
    """``running`` (a backup holds its lock), ``committed``, ``damaged`` (a manifest that
    fails its checks), ``unfinished`` (no manifest, nobody writing it: failed or
    crashed) or ``absent``."""
    path = medium.generations_dir / gen_id
    if path.is_symlink() or not path.is_dir():
        return "absent"
    fd = _try_lock(path / LOCK)
    if fd == -1:
        return "running"
    try:
        if not (path / MANIFEST).exists():
            return "unfinished"
        try:
            medium.read_manifest(gen_id)
        except (CorruptError, NotFoundError):
            return "damaged"
        return "committed"
    finally:
        if fd is not None:
            os.close(fd)


def _try_lock(path: Path) -> int | None:
    """An fd holding the flock of ``path``; None when there is no lock file; -1 when
    another process holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return -1
    return fd


def _parse_label(raw: bytes, where: Path) -> dict[str, Any]:
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CorruptError(f"medium label {where} is damaged (not JSON)") from None
    if not isinstance(d, dict) or d.get("format") != MEDIUM_FORMAT:
        raise UsageError(f"{where.parent} is not an sdbackup medium ({where.name} is not "
                         "an sdbackup medium label)")
    if d.get("version") != MEDIUM_VERSION:
        raise CorruptError(f"medium {where.parent} has label version {d.get('version')!r}; "
                           f"this sdbackup reads version {MEDIUM_VERSION}")
    for k in ("medium_id", "cluster_id"):
        if not isinstance(d.get(k), str) or not d[k]:
            raise CorruptError(f"medium label {where} is damaged: no {k}")
    return d


def _os_error(e: OSError, what: str) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpaceError(f"{what}: the medium is full ({e.strerror}); free space there")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UsageError(f"{what}: {e.strerror}")
    return e


class PendingGeneration:
    """A generation being written: its directory and the lock that keeps ``gc`` off."""

    def __init__(self, medium: DiskMedium, gen_id: str, path: Path, lock_fd: int) -> None:
        self.medium = medium
        self.id = gen_id
        self.path = path
        self._lock_fd = lock_fd

    def commit(self, manifest: Manifest) -> None:
        """Write the manifest (fsynced, renamed into place, directory fsynced): from
        here on the generation exists. Everything else must be durable before."""
        try:
            sync_dir(self.path)
            write_atomic(self.path / MANIFEST, manifest.to_json())
        except OSError as e:
            raise _os_error(e, f"cannot commit generation {self.id} on medium "
                               f"{self.medium.root}") from None
        try:
            os.unlink(self.path / LOCK)
        except OSError:
            pass
        self.release()

    def fail(self, reason: str) -> None:
        """Keep the generation's directory as a record that this backup failed (with
        ``FAILED`` holding the reason) but none of its data: it is never committed,
        never listed as a generation, and ``gc`` removes it."""
        for child in self.path.iterdir():
            if child.name != LOCK:
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() \
                    else child.unlink(missing_ok=True)
        write_atomic(self.path / FAILED, (reason + "\n").encode())
        self.release()

    def discard(self) -> None:
        """Remove the unfinished generation (best effort: ``gc`` does it otherwise)."""
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            sync_dir(self.medium.generations_dir)
        except OSError:
            pass
        self.release()

    def release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
