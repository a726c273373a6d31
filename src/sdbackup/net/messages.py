"""The requests of the cluster protocol, defined once.

Every request is a small frozen dataclass-like class (a subclass of :class:`Request`
that names its method); each field's annotation carries how it travels and what it may
hold::

    class Lookup(Request, method="lookup"):
        parent: Ino          # an int from 0 to 2**63-1
        name: Name           # bytes; a latin-1 string on the wire (see wire.py)

The sender builds the dataclass and sends :meth:`Request.to_wire`; the receiver gets
the dataclass back from :meth:`Request.decode`, which checks every field -- ints are
ints (not bools, not floats) within their range, names are latin-1 strings, lists are
lists of bounded length, booleans are booleans -- and raises one :class:`UsageError`
naming the request and the field otherwise. So a malformed request from a peer is a
one-line error for that peer, never a traceback in the server. Fields the receiver
does not know are ignored (an older peer's extra fields); a missing field takes its
default, or is an error if it has none; ``null`` is accepted only by fields that may
be None.

The checks are those of the wire: types, and ranges that keep values inside what the
metadata store holds (SQLite's 64-bit integers) and lists within what a handler
should loop over. What a value means (an inode that exists, a valid file name) is
still checked where it always was, with the same errors (``ENOENT``, ``EINVAL``...).

Four sets of requests, one per kind of server (:data:`COORDINATOR_REQUESTS`,
:data:`NODE_CALLBACKS`, :data:`NODE_CONTROL_REQUESTS`, :data:`TAPE_SERVER_REQUESTS`);
:class:`RequestHandler` dispatches a server's requests to ``rpc_<method>(conn,
request, blob)`` and checks, when the handler class is defined, that every request of
its set has a handler.
"""

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import FrozenInstanceError
from typing import (
    Annotated,
    Any,
    ClassVar,
    Literal,
    Protocol,
    Self,
    dataclass_transform,
)

from sdbackup.backup.window import LOG_MODES
from sdbackup.errors import RemoteError, UsageError
from sdbackup.fs.segments import SEGMENT_BYTES
from sdbackup.meta.types import WriteRun
from sdbackup.net import wire
from sdbackup.net.protocol import MAX_BLOB, Blob
from sdbackup.net.rpc import Args, BaseHandler, Connection, HandlerResult, Result
from sdbackup.types import DiskId

I64_MAX = (1 << 63) - 1
I64_MIN = -(1 << 63)
U32_MAX = (1 << 32) - 1
BLOCK_MAX = (1 << 62) - 1
"""Block numbers and counts: ``fblock + count`` stays a 64-bit integer."""
SEG_MAX = I64_MAX // SEGMENT_BYTES
"""Segment numbers: the segment's byte offset stays a 64-bit integer."""
MAX_ACQUIRE_SEGS = 1 << 16
"""Segments in one acquire (a node asks for the segments of one operation)."""
MAX_SEGS = 1 << 20
"""Segments in one release, dirty report or recall (a node's cache of one file)."""
MAX_PATHS = 10_000
"""Inodes in one ``paths`` request."""
MAX_RUNS = 1 << 20
"""Write runs in one commit or abort, before-image items in one ``put_bi``."""
MAX_TEXT = 4096
"""Other strings (node names, hosts, tokens, reasons, paths on the coordinator)."""


class _Bad(Exception):
    """A field's value is not what its spec allows (the message says what it must be)."""


def _show(v: Any) -> str:
    """A short description of a bad value (cheap for a 16 MiB string or list)."""
    if type(v) is list:
        return f"a list of {len(v)} items"
    if type(v) is dict:
        return f"an object of {len(v)} entries"
    text = repr(v[:41] if type(v) is str else v)
    return text if len(text) <= 40 else text[:37] + "..."


# -- field specs ------------------------------------------------------------------------

class Spec:
    """How one field travels: ``decode`` checks a JSON value and converts it, ``encode``
    turns the Python value back into JSON."""

    def decode(self, v: Any) -> Any:
        raise NotImplementedError

    def encode(self, v: Any) -> Any:
        return v


class Int(Spec):
    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def decode(self, v: Any) -> int:
        if type(v) is not int or not self.lo <= v <= self.hi:
            raise _Bad(f"must be an integer from {self.lo} to {self.hi}, not {_show(v)}")
        return v


class Float(Spec):
    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def decode(self, v: Any) -> float:
        if type(v) not in (int, float) or not math.isfinite(v) or not self.lo <= v <= self.hi:
            raise _Bad(f"must be a number from {self.lo:g} to {self.hi:g}, not {_show(v)}")
        return float(v)


class Bool(Spec):
    def decode(self, v: Any) -> bool:
        if type(v) is not bool:
            raise _Bad(f"must be true or false, not {_show(v)}")
        return v


class Text(Spec):
    def __init__(self, max_len: int = MAX_TEXT, min_len: int = 0) -> None:
        self.min_len, self.max_len = min_len, max_len

    def decode(self, v: Any) -> str:
        if type(v) is not str or not self.min_len <= len(v) <= self.max_len:
            raise _Bad(f"must be a string of {self.min_len} to {self.max_len} characters, "
                       f"not {_show(v)}")
        return v


class Choice(Spec):
    def __init__(self, *values: str) -> None:
        self.values = values

    def decode(self, v: Any) -> str:
        if type(v) is not str or v not in self.values:
            raise _Bad(f"must be one of {', '.join(map(repr, self.values))}, not {_show(v)}")
        return v


class NameSpec(Spec):
    """A file name or symlink target: bytes, travelling as a latin-1 string (wire.py).
    Whether it is a valid name for the operation is the metadata service's check."""

    def decode(self, v: Any) -> bytes:
        try:
            return wire.dec_name(v)
        except (TypeError, UnicodeEncodeError):
            raise _Bad(f"must be a name (a string of code points 0-255), not {_show(v)}"
                       ) from None

    def encode(self, v: Any) -> str:
        return wire.enc_name(v)


class Opt(Spec):
    """The inner spec, or None (``null``)."""

    def __init__(self, inner: Spec) -> None:
        self.inner = inner

    def decode(self, v: Any) -> Any:
        return None if v is None else self.inner.decode(v)

    def encode(self, v: Any) -> Any:
        return None if v is None else self.inner.encode(v)


class ListOf(Spec):
    """A list of at most ``max_len`` items (a tuple in Python)."""

    def __init__(self, item: Spec, max_len: int, min_len: int = 0) -> None:
        self.item, self.min_len, self.max_len = item, min_len, max_len

    def decode(self, v: Any) -> tuple[Any, ...]:
        if type(v) is not list or not self.min_len <= len(v) <= self.max_len:
            raise _Bad(f"must be a list of {self.min_len} to {self.max_len} items, not "
                       f"{_show(v)}")
        dec = self.item.decode
        try:
            return tuple(map(dec, v))
        except _Bad as e:
            i = next(i for i, x in enumerate(v) if not _ok(dec, x))
            raise _Bad(f"item {i}: {e}") from None

    def encode(self, v: Any) -> list[Any]:
        enc = self.item.encode
        return [enc(x) for x in v]


def _ok(dec: Callable[[Any], Any], x: Any) -> bool:
    try:
        dec(x)
    except _Bad:
        return False
    return True


class Row(Spec):
    """A fixed list of values of different kinds (a tuple in Python)."""

    def __init__(self, *items: Spec) -> None:
        self.items = items

    def decode(self, v: Any) -> tuple[Any, ...]:
        if type(v) is not list or len(v) != len(self.items):
            raise _Bad(f"must be a list of {len(self.items)} values, not {_show(v)}")
        return tuple(s.decode(x) for s, x in zip(self.items, v, strict=True))

    def encode(self, v: Any) -> list[Any]:
        return [s.encode(x) for s, x in zip(self.items, v, strict=True)]


_BLOCK = Int(0, BLOCK_MAX)
_ID = Int(0, I64_MAX)


class WriteRunSpec(Spec):
    """A write run: [fblock, count, disk, dblock, new] plus bi_time when it is not 0."""

    def decode(self, v: Any) -> WriteRun:
        if type(v) is not list or len(v) not in (5, 6):
            raise _Bad(f"must be a write run [fblock, count, disk, dblock, new, bi_time], "
                       f"not {_show(v)}")
        return WriteRun(_BLOCK.decode(v[0]), _BLOCK.decode(v[1]), DiskId(_ID.decode(v[2])),
                        _BLOCK.decode(v[3]), _BOOL.decode(v[4]),
                        _ID.decode(v[5]) if len(v) > 5 else 0)

    def encode(self, v: Any) -> list[Any]:
        return list(v)


class StrMap(Spec):
    """A JSON object of strings to strings (at most ``max_len`` entries)."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len

    def decode(self, v: Any) -> dict[str, str]:
        if (type(v) is not dict or len(v) > self.max_len
                or not all(type(k) is str and type(x) is str and len(x) <= MAX_TEXT
                           for k, x in v.items())):
            raise _Bad(f"must be an object of at most {self.max_len} strings, not {_show(v)}")
        return dict(v)


_BOOL = Bool()

# Field types: what the fields are in Python, and (the spec) how they travel.
Ino = Annotated[int, _ID]
Block = Annotated[int, _BLOCK]
Offset = Annotated[int, Int(0, I64_MAX)]
"""A byte offset or size (or a counter): not negative."""
SignedI64 = Annotated[int, Int(I64_MIN, I64_MAX)]
"""Times (before 1970 too), and a truncate's size (a negative one is EINVAL there)."""
U32 = Annotated[int, Int(0, U32_MAX)]
Name = Annotated[bytes, NameSpec()]
Flag = Annotated[bool, _BOOL]
Gen = Annotated[str, Text(256)]
"""A generation (backup) id."""
Segs = Annotated[tuple[int, ...], ListOf(Int(0, SEG_MAX), MAX_SEGS)]
WriteRuns = Annotated[tuple[WriteRun, ...], ListOf(WriteRunSpec(), MAX_RUNS)]
LogMode = Annotated[str, Choice(*LOG_MODES)]
Stream = Annotated[int, Int(0, 65535)]
"""A record stream's number in its generation (u16 in the index)."""
Attempt = Annotated[int, Int(0, 1 << 16)]
"""How often a part was given to a copier before (0: the first copier)."""
MAX_COPIERS = 4096
"""Copier nodes of one dispersed backup."""


# -- requests -----------------------------------------------------------------------------

_REQUIRED: Any = object()


@dataclass_transform(frozen_default=True)
class Request:
    """One request of the protocol (see the module docstring).

    A subclass names its method (``class GetAttr(Request, method="getattr")``) and lists
    its fields as annotated class attributes, with defaults as in a dataclass; it gets
    what a frozen dataclass has (``__init__``, ``__eq__``, ``__hash__``, ``__repr__``,
    ``__match_args__``, no assignment), built here in one step per class because
    :func:`dataclasses.dataclass` costs about a millisecond per class at import. A
    request does not inherit fields from another request.
    """

    METHOD: ClassVar[str]
    _FIELDS: ClassVar[tuple[tuple[str, Spec, Any], ...]] = ()
    _NAMES: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, *, method: str, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        specs: list[tuple[str, Spec, Any]] = []
        for name, hint in inspect.get_annotations(cls).items():
            spec = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Spec)),
                        None)
            if spec is None:
                raise TypeError(f"{cls.__name__}.{name}: the annotation must carry a Spec")
            default = cls.__dict__.get(name, _REQUIRED)
            if default is _REQUIRED and specs and specs[-1][2] is not _REQUIRED:
                raise TypeError(f"{cls.__name__}.{name}: a field without a default follows "
                                "one with a default")
            specs.append((name, spec, default))
        cls.METHOD = method
        cls._FIELDS = tuple(specs)
        cls._NAMES = tuple(name for name, _, _ in specs)
        type.__setattr__(cls, "__match_args__", cls._NAMES)
        cls.__init__ = _make_init(cls, specs)  # type: ignore[method-assign]

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r} of a request")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r} of a request")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._NAMES)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Request)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._NAMES)
        return f"{type(self).__name__}({args})"

    @classmethod
    def decode(cls, args: Any) -> Self:
        """The request from a JSON body, checked; UsageError names what is wrong."""
        if type(args) is not dict:
            raise UsageError(f"bad {cls.METHOD} request: the arguments must be an object")
        values = []
        for name, spec, default in cls._FIELDS:
            v = args.get(name, _REQUIRED)
            if v is _REQUIRED:
                if default is _REQUIRED:
                    raise UsageError(f"bad {cls.METHOD} request: field {name!r} is missing")
                values.append(default)
                continue
            try:
                values.append(spec.decode(v))
            except _Bad as e:
                raise UsageError(f"bad {cls.METHOD} request: field {name!r} {e}") from None
        return cls(*values)

    def to_wire(self) -> dict[str, Any]:
        """The JSON body of this request."""
        return {name: spec.encode(getattr(self, name)) for name, spec, _ in self._FIELDS}


def _make_init(cls: type, specs: list[tuple[str, Spec, Any]]) -> Callable[..., None]:
    """``__init__(self, field, ..., field=default)`` setting each field (as dataclasses
    make it: generated source, so that building a request costs no loop)."""
    ns: dict[str, Any] = {"_set": object.__setattr__}
    params = ["self"]
    body = []
    for name, _, default in specs:
        if default is _REQUIRED:
            params.append(name)
        else:
            ns[f"_d_{name}"] = default
            params.append(f"{name}=_d_{name}")
        body.append(f"    _set(self, {name!r}, {name})")
    source = "\n".join([f"def __init__({', '.join(params)}):", *(body or ["    pass"])])
    exec(source, ns)
    init: Callable[..., None] = ns["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    return init


def registry(*classes: type[Request]) -> Mapping[str, type[Request]]:
    out: dict[str, type[Request]] = {}
    for c in classes:
        if c.METHOD in out:
            raise TypeError(f"two requests named {c.METHOD!r}")
        out[c.METHOD] = c
    return out


# membership
class ClusterInfo(Request, method="cluster_info"):
    pass


class Join(Request, method="join"):
    name: Annotated[str, Text(255, min_len=1)]
    kind: Annotated[str, Choice("node", "client", "admin")] = "node"
    host: Annotated[str, Text()] = "?"
    pid: Offset = 0
    owner_token: Annotated[str | None, Opt(Text())] = None
    disks: Annotated[dict[str, str] | None, Opt(StrMap(1024))] = None
    """Single-host disks: the identity of the file this node sees, by disk name."""


class Heartbeat(Request, method="heartbeat"):
    pass


class Goodbye(Request, method="goodbye"):
    pass


class Paths(Request, method="paths"):
    inos: Annotated[tuple[int, ...], ListOf(_ID, MAX_PATHS)]


# coherence
class Acquire(Request, method="acquire"):
    ino: Ino
    segs: Annotated[tuple[int, ...], ListOf(Int(0, SEG_MAX), MAX_ACQUIRE_SEGS, min_len=1)]
    mode: Annotated[str, Choice("r", "w")]
    reclaim: Flag = False
    maps: Flag = False


class ReleaseRights(Request, method="release_rights"):
    ino: Ino
    segs: Segs
    more: Annotated[tuple[int, ...], ListOf(_ID, MAX_PATHS)] = ()
    """Further inodes, each released whole-segment-list in ``more_segs`` (an eviction
    gives back many files' segments in one round trip)."""
    more_segs: Annotated[tuple[tuple[int, ...], ...], ListOf(ListOf(Int(0, SEG_MAX), MAX_SEGS),
                                                             MAX_PATHS)] = ()


class Dirty(Request, method="dirty"):
    ino: Ino
    segs: Segs
    dirty: Flag
    n: Offset


# metadata
class GetAttr(Request, method="getattr"):
    ino: Ino
    cap: Flag = False
    """Ask for the inode's capability too (the answer says whether it was granted)."""


class Lookup(Request, method="lookup"):
    """With ``cap``: a name that does not exist answers ``absent`` instead of ENOENT,
    and the answer says whether the node may cache it (cluster/caps.py)."""

    parent: Ino
    name: Name
    cap: Flag = False


class Mknod(Request, method="mknod"):
    parent: Ino
    name: Name
    mode: U32
    uid: U32
    gid: U32
    rdev: Offset = 0
    open: Flag = False
    """Open the new file too (one round trip for a program's create)."""
    write: Flag = False
    """And grant the write right on its first segment (its first write needs no
    round trip); the answer carries the grant's ``seq``."""


class Mkdir(Request, method="mkdir"):
    parent: Ino
    name: Name
    mode: U32
    uid: U32
    gid: U32


class Symlink(Request, method="symlink"):
    parent: Ino
    name: Name
    target: Name
    uid: U32
    gid: U32


class Readlink(Request, method="readlink"):
    ino: Ino


class Link(Request, method="link"):
    ino: Ino
    new_parent: Ino
    new_name: Name


class Unlink(Request, method="unlink"):
    parent: Ino
    name: Name


class Rmdir(Request, method="rmdir"):
    parent: Ino
    name: Name


class Rename(Request, method="rename"):
    parent: Ino
    name: Name
    new_parent: Ino
    new_name: Name
    flags: U32 = 0


class Readdir(Request, method="readdir"):
    ino: Ino
    after: Offset = 0
    limit: Offset = 1000


class Setattr(Request, method="setattr"):
    ino: Ino
    mode: Annotated[int | None, Opt(Int(0, U32_MAX))] = None
    uid: Annotated[int | None, Opt(Int(0, U32_MAX))] = None
    gid: Annotated[int | None, Opt(Int(0, U32_MAX))] = None
    atime_ns: Annotated[int | None, Opt(Int(I64_MIN, I64_MAX))] = None
    mtime_ns: Annotated[int | None, Opt(Int(I64_MIN, I64_MAX))] = None


class Statfs(Request, method="statfs"):
    pass


class Open(Request, method="open"):
    ino: Ino


class Release(Request, method="release"):
    ino: Ino


class MapRead(Request, method="map_read"):
    ino: Ino
    fblock: Block
    count: Block


class MapWrite(Request, method="map_write"):
    ino: Ino
    fblock: Block
    count: Block


class AbortWrite(Request, method="abort_write"):
    runs: WriteRuns


class CommitWrite(Request, method="commit_write"):
    ino: Ino
    runs: WriteRuns
    end: Offset
    mtime_ns: Annotated[int | None, Opt(Int(I64_MIN, I64_MAX))] = None


class Truncate(Request, method="truncate"):
    ino: Ino
    size: SignedI64


class Sync(Request, method="sync"):
    pass


# online backup: before images from the nodes
BiItem = tuple[int, int, int, int]


class PutBi(Request, method="put_bi"):
    """Before images; the blob holds their blocks, in the order of ``items``."""

    gen: Gen
    items: Annotated[tuple[BiItem, ...],
                     ListOf(Row(_ID, _BLOCK, _BLOCK, _ID), MAX_RUNS)]
    """(disk, first block, block count, logical time) per run of blocks."""


class BiFailed(Request, method="bi_failed"):
    gen: Gen
    reason: Annotated[str, Text()] = ""


# administration
class CacheTable(Request, method="cache_table"):
    pass


class FlushAll(Request, method="flush"):
    """Cluster-wide flush (to the coordinator)."""

    timeout: Annotated[float, Float(0.0, 1e7)] = 60.0


class Status(Request, method="status"):
    pass


class Backup(Request, method="backup"):
    medium: Annotated[str, Text()]
    """The medium directory; empty for a backup straight to tape (``tapes``)."""
    compression: Annotated[Literal["none", "zstd"], Choice("none", "zstd")] = "zstd"
    level: Annotated[int, Int(0, 22)] = 1
    log_mode: Annotated[str | None, Opt(Choice(*LOG_MODES))] = None
    log_medium: Annotated[str | None, Opt(Text())] = None
    overlay: Flag = False
    pre_freeze: Annotated[str | None, Opt(Text())] = None
    post_thaw: Annotated[str | None, Opt(Text())] = None
    incremental: Flag = False
    full_if_needed: Flag = False
    bwlimit: Annotated[int, Int(0, I64_MAX)] = 0
    pace: Annotated[str, Choice("off", "adaptive")] = "off"
    # A group backup (b.1-b.5): the group's name and list (the lines of Fig. 22, one
    # text), and what the generation's metadata lists.
    group: Annotated[str | None, Opt(Text(64, min_len=1))] = None
    group_list: Annotated[str | None, Opt(Text(1 << 22))] = None
    meta: Annotated[str, Choice("all", "group")] = "all"
    # A dispersed copy (a.12, issue 17): these nodes copy the plan as parts, each to
    # its medium in ``node_media`` (its name -> a directory on its host) or to
    # ``medium`` (shared); see cluster/dispersed.py.
    copy_nodes: Annotated[tuple[str, ...], ListOf(Text(255, min_len=1), MAX_COPIERS)] = ()
    node_media: Annotated[dict[str, str] | None, Opt(StrMap(MAX_COPIERS))] = None
    no_reassign: Flag = False
    split: Annotated[str, Choice("ranges", "disks")] = "ranges"
    part_bytes: Annotated[int, Int(0, I64_MAX)] = 0
    # A backup straight to tape (issue 16): the tapes, the catalog, the disk spool.
    tapes: Annotated[tuple[str, ...], ListOf(Text(min_len=1), 64)] = ()
    catalog: Annotated[str | None, Opt(Text(min_len=1))] = None
    spool: Annotated[str | None, Opt(Text(min_len=1))] = None
    spool_bytes: Annotated[int, Int(0, I64_MAX)] = 0
    # The log manager on a node (Fig. 36): before images go to this node agent, which
    # writes the log; None: the coordinator is the log manager.
    log_node: Annotated[str | None, Opt(Text(255, min_len=1))] = None


class PartProgress(Request, method="part_progress"):
    """A copier's progress on a part (a one-way notification, about twice a second)."""

    gen: Gen
    stream: Stream
    attempt: Attempt
    bytes: Offset


class PartDone(Request, method="part_done"):
    """A copier finished a part: its stream is closed (END) and fsynced on its medium,
    or ``error`` says why not. The blob holds one index row per DATA record
    (backup/parts.py: ROW_DTYPE)."""

    gen: Gen
    stream: Stream
    attempt: Attempt
    medium_id: Annotated[str, Text(256)]
    primary: Flag
    bytes: Offset
    records: Offset
    digest: Annotated[str, Text(16)]
    blocks: Offset
    read_bytes: Offset
    batches: Offset
    seconds: Annotated[float, Float(0, 1e9)]
    error: Annotated[str | None, Opt(Text())] = None


class UsedRuns(Request, method="used_runs"):
    disk: Annotated[str, Text()]


class Fsck(Request, method="fsck"):
    pass


class Info(Request, method="info"):
    pass


class SetMark(Request, method="mark"):
    name: Annotated[str, Text(200, min_len=1)]


class Marks(Request, method="marks"):
    pass


COORDINATOR_REQUESTS = registry(
    ClusterInfo, Join, Heartbeat, Goodbye, Paths, Acquire, ReleaseRights, Dirty, GetAttr,
    Lookup, Mknod, Mkdir, Symlink, Readlink, Link, Unlink, Rmdir, Rename, Readdir, Setattr,
    Statfs, Open, Release, MapRead, MapWrite, PutBi, BiFailed, AbortWrite, CommitWrite,
    Truncate, Sync, CacheTable, FlushAll, Status, Backup, UsedRuns, Fsck, Info, SetMark,
    Marks, PartProgress, PartDone)
"""What nodes, clients and commands ask the coordinator."""


# -- the coordinator's calls to a node ------------------------------------------------------

class Recall(Request, method="recall"):
    """Write the segments back and keep right ``keep`` ("r"), nothing (None), or drop
    the data unwritten ("discard": the file is gone)."""

    ino: Ino
    segs: Segs
    keep: Annotated[str | None, Opt(Choice("r", "discard"))] = None


class FlushInode(Request, method="flush_inode"):
    ino: Ino


class DropCaps(Request, method="drop_caps"):
    """Forget the cached metadata of these inodes (their capabilities are taken back)."""

    inos: Annotated[tuple[int, ...], ListOf(_ID, MAX_PATHS)]


class NodeFlush(Request, method="flush"):
    """Write everything back (the node's part of a cluster-wide flush)."""


class Report(Request, method="report"):
    pass


class BackupBegin(Request, method="backup_begin"):
    gen: Gen
    mode: LogMode
    log_node: Annotated[str | None, Opt(Text(255, min_len=1))] = None
    """The node whose log manager stores the before images (central, inline, separate);
    None: the coordinator's."""
    log_addr: Annotated[str | None, Opt(Text(300, min_len=3))] = None
    """HOST:PORT of that node's control port, where ``put_bi`` goes."""


class LogOpen(Request, method="log_open"):
    """Be the log manager of backup ``gen`` (Fig. 36): open the before-image log at
    ``path`` (on this node's host); ``log_medium``: ``path`` is on a log medium (separate
    mode), whose directory and label this node creates. Answers the control port's
    address, where the nodes send ``put_bi``."""

    gen: Gen
    mode: LogMode
    path: Annotated[str, Text(min_len=1)]
    log_medium: Flag = False


class LogClose(Request, method="log_close"):
    """The window is over: close (fsync) the log of ``gen`` and describe it, or, with
    ``discard``, throw it away (the backup was aborted)."""

    gen: Gen
    discard: Flag = False


class BiFetch(Request, method="bi_fetch"):
    gen: Gen
    offset: Offset
    size: Offset


class BackupEnd(Request, method="backup_end"):
    gen: Gen


class CopyPart(Request, method="copy_part"):
    """Copy one part of a dispersed backup (a.12, Fig. 27): the blocks in the blob
    (``sets``: disk id and byte length of each disk's serialized BlockSet, in blob
    order) from the shared disks into stream ``stream`` on the medium ``medium`` (a
    directory on the node's host). Answered at once; the node reports with
    ``part_progress`` and ``part_done``."""

    gen: Gen
    stream: Stream
    attempt: Attempt
    medium: Annotated[str, Text(min_len=1)]
    primary_medium: Annotated[str, Text(256)]
    """The id of the medium that commits the generation: a part there goes into the
    generation's directory."""
    sets: Annotated[tuple[tuple[int, int], ...],
                    ListOf(Row(Int(0, U32_MAX), Int(0, MAX_BLOB)), 1 << 16)]
    compression: Annotated[Literal["none", "zstd"], Choice("none", "zstd")] = "zstd"
    level: Annotated[int, Int(0, 22)] = 1
    bwlimit: Annotated[int, Int(0, I64_MAX)] = 0
    batch_bytes: Annotated[int, Int(1, 1 << 30)] = 8 << 20
    record_bytes: Annotated[int, Int(1, 1 << 28)] = 1 << 20
    gap_bytes: Annotated[int, Int(0, 1 << 30)] = 128 << 10


class PartCancel(Request, method="part_cancel"):
    """Stop copying parts of ``gen``; ``discard``: remove what was written for it."""

    gen: Gen
    discard: Flag = False


NODE_CALLBACKS = registry(Recall, FlushInode, DropCaps, NodeFlush, Report, BackupBegin, BiFetch,
                          BackupEnd, CopyPart, PartCancel, LogOpen, LogClose, PutBi)
"""What the coordinator asks a node."""


# -- a local program's requests to a node's control port ------------------------------------

class ControlJoin(Request, method="join"):
    name: Annotated[str, Text()] = ""


class Read(Request, method="read"):
    ino: Ino
    offset: Offset
    size: Annotated[int, Int(0, MAX_BLOB)]


class Write(Request, method="write"):
    """The data is the blob."""

    ino: Ino
    offset: Offset


class Fsync(Request, method="fsync"):
    ino: Annotated[int | None, Opt(_ID)] = None
    """None: every file."""


NODE_PASS_THROUGH = registry(Mknod, Mkdir, Symlink, Readlink, Link, Unlink, Rmdir, Rename,
                             Readdir, Setattr, Statfs, Open, Sync, MapRead)
"""Control-port requests that the node sends on to the coordinator as they are."""

NODE_CONTROL_REQUESTS = registry(ControlJoin, Read, Write, Fsync, FlushInode, GetAttr, Lookup,
                                 Truncate, Release, Report, PutBi, *NODE_PASS_THROUGH.values())
"""What a local program asks a node through its control port."""


# -- a host without a tape drive to a tape server (c.4, Fig. 37, 39) ----------------------

MAX_TAPE_READ = 32 << 20
"""Bytes of tape blocks in one ``tape_read`` answer (half the largest blob)."""


class TapeInfo(Request, method="tape_info"):
    """The served tape set: id, cluster, block size, its tapes, which are in drives,
    and its committed generations."""


class TapeFile(Request, method="tape_file"):
    """Bytes of a file of the served set's disk catalog: the set's label (``gen``
    None) or a generation's manifest, placement, index or snapshot."""

    gen: Annotated[str | None, Opt(Text(64, min_len=1))]
    name: Annotated[str, Text(64, min_len=1)]
    offset: Offset = 0
    size: Annotated[int, Int(0, MAX_TAPE_READ)] = MAX_TAPE_READ


class TapeRead(Request, method="tape_read"):
    """Tape blocks ``first .. first+count-1`` of ``tape`` through the server's disk
    buffer (``end``: the first block past the tape file, where read-ahead stops)."""

    tape: Annotated[str, Text(64, min_len=1)]
    first: Block
    count: Annotated[int, Int(1, MAX_TAPE_READ // 512)]
    end: Block


TAPE_SERVER_REQUESTS = registry(TapeInfo, TapeFile, TapeRead)
"""What a host without a tape drive asks ``sdbackup tape serve``."""


# -- sending and dispatching ---------------------------------------------------------------

class Caller(Protocol):
    """Anything that sends requests: an RpcClient, a Connection, or a reconnecting
    wrapper of one."""

    def call(self, method: str, args: Args | None = None, blob: Blob | None = None,
             timeout: float | None = None) -> Result: ...

    def notify(self, method: str, args: Args | None = None, blob: Blob | None = None
               ) -> None: ...


def call(peer: Caller, request: Request, blob: Blob | None = None,
         timeout: float | None = None) -> Result:
    """Send ``request`` and wait for its answer."""
    return peer.call(request.METHOD, request.to_wire(), blob, timeout)


def notify(peer: Caller, request: Request) -> None:
    """Send ``request`` one way."""
    peer.notify(request.METHOD, request.to_wire())


def decode(requests: Mapping[str, type[Request]], method: str, args: Args) -> Request | None:
    """The request ``method`` of this set, checked; None when the set has no such method."""
    cls = requests.get(method)
    return None if cls is None else cls.decode(args)


class RequestHandler(BaseHandler):
    """Dispatches each request of ``requests`` to ``rpc_<method>(conn, request, blob)``
    with the decoded request; a subclass must handle every request of its set."""

    requests: ClassVar[Mapping[str, type[Request]]] = {}
    _dispatch: ClassVar[dict[str, tuple[type[Request], str]]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        missing = [m for m in cls.requests if not callable(getattr(cls, "rpc_" + m, None))]
        if missing:
            raise TypeError(f"{cls.__name__} handles no {', '.join(missing)}")
        cls._dispatch = {m: (c, "rpc_" + m) for m, c in cls.requests.items()}

    def handle(self, conn: Connection, method: str, args: Args,
               blob: bytes | None) -> HandlerResult:
        entry = self._dispatch.get(method)
        if entry is None:
            raise RemoteError(f"{conn.peer} asked for unknown method {method!r}; "
                              "is this the same sdbackup release on both sides?")
        cls, fn = entry
        result: HandlerResult = getattr(self, fn)(conn, cls.decode(args), blob)
        return result
