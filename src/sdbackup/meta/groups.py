"""File groups (seed b.1-b.3, Fig. 21-24): which files a group holds, and their blocks.

A group is a **group list** in the seed's syntax (Fig. 22, 23), one entry per line:

* ``dir_A/*`` -- a path pattern, from the root of the cluster (a leading ``/`` is
  optional). Its components may use ``*`` (any characters but ``/``), ``?`` (one
  character but ``/``) and ``**`` as a whole component (any number of directories,
  none included); ``\\`` takes the next character literally. A pattern selects the
  files it names, and **a directory it names brings every file below it, at any
  depth** (b.2): so ``dir_A/*`` is every file below ``dir_A`` at any depth, as in the
  seed, and ``dir_A`` alone says the same.
* ``X PATTERN`` -- an exclusion (b.3): the files and directories it names, and
  everything below such a directory, leave the group. Without a leading ``/`` it names
  a path at any depth (Fig. 22's ``X dir_D/file_d`` removes ``file_d`` of a ``dir_D``
  below ``dir_C``); with one, from the root only.
* blank lines and lines starting with ``#`` are ignored.

A file belongs to the group when an inclusion names it (or a directory above it) and
no exclusion names it (or a directory above it): exclusions win. A file may belong to
several groups (b.5): membership is a function of the group list and the namespace.

**Membership cost.** :func:`evaluate` walks only the directories an inclusion can
reach: a component without wildcards is looked up by name, a directory is listed only
when a wildcard must be matched against its entries or when it lies below a selected
directory. So the cost is the number of entries in the group's directories, never a
walk of the whole namespace (``tests/test_groups.py`` counts the directories read). It
runs against any metadata source: the live cluster (``group show``) or a backup's T0
snapshot (the membership a group backup copies, taken inside the freeze).

**The group block list** (Fig. 24) is the blocks of the member files, one
:class:`~sdbackup.blocks.blockset.BlockSet` per disk, shown as runs of contiguous
blocks. A generation of a group stores it in its snapshot (:data:`GROUP_TABLES`), so
that readers know which blocks the generation answers for, and the next incremental
of the group knows which blocks it already holds.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sqlite3
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdbackup.blocks.blockset import BlockSet
from sdbackup.errors import FsError, UsageError
from sdbackup.meta.alloc import CHUNK_BITS
from sdbackup.meta.api import MetaSource
from sdbackup.meta.types import Attr
from sdbackup.types import ROOT_INODE

GROUP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
META_SCOPES = ("all", "group")
"""What a group generation's metadata snapshot lists: ``all`` the files (those outside
the group are visible and fail to read), or only the ``group``'s (seed, after Fig. 24)."""

MAX_LINES = 10_000
MAX_LINE = 4096


class GroupListError(UsageError):
    """A group list line that cannot be parsed (the message names the line)."""


def check_group_name(name: str) -> str:
    if not GROUP_NAME_RE.match(name):
        raise UsageError(f"bad group name {name!r}: use 1 to 64 letters, digits, '.', '_' "
                         "or '-', starting with a letter or digit")
    return name


# -- patterns ----------------------------------------------------------------------------

_DOUBLESTAR = None  # a token matching any number of whole components


@dataclass(frozen=True)
class Pattern:
    """One line of a group list, compiled: component tokens, each a compiled regex
    over one name or ``None`` for ``**``; ``literal`` is the name for a token without
    wildcards (looked up instead of listing the directory)."""

    text: str
    exclude: bool
    line: int
    tokens: tuple[re.Pattern[bytes] | None, ...]
    literals: tuple[bytes | None, ...]

    @property
    def size(self) -> int:
        return len(self.tokens)


def _component(comp: str, line: int, text: str) -> tuple[re.Pattern[bytes] | None,
                                                          bytes | None]:
    if comp == "**":
        return _DOUBLESTAR, None
    if comp in (".", ".."):
        raise GroupListError(f"line {line}: {text!r}: '.' and '..' are not allowed in a "
                             "pattern (write the path from the root of the cluster)")
    out: list[bytes] = []
    lit: list[bytes] = []
    wild = False
    i = 0
    raw = os.fsencode(comp)
    while i < len(raw):
        c = raw[i : i + 1]
        if c == b"\\":
            if i + 1 >= len(raw):
                raise GroupListError(f"line {line}: {text!r}: a '\\' at the end of a "
                                     "component escapes nothing")
            nxt = raw[i + 1 : i + 2]
            out.append(re.escape(nxt))
            lit.append(nxt)
            i += 2
            continue
        if c == b"*":
            wild = True
            out.append(b"[^/]*")
            while raw[i + 1 : i + 2] == b"*":  # a** or **b: the same as a single *
                i += 1
        elif c == b"?":
            wild = True
            out.append(b"[^/]")
        else:
            out.append(re.escape(c))
            lit.append(c)
        i += 1
    name = b"".join(lit)
    if not wild and len(name) > 255:
        raise GroupListError(f"line {line}: {text!r}: a component is longer than 255 bytes")
    return re.compile(b"".join(out), re.DOTALL), (None if wild else name)


def parse_pattern(text: str, *, exclude: bool = False, line: int = 0) -> Pattern:
    """One pattern (without the ``X`` of an exclusion)."""
    body = text.strip()
    if not body:
        raise GroupListError(f"line {line}: an {'exclusion' if exclude else 'entry'} "
                             "names no path")
    if "\0" in body:
        raise GroupListError(f"line {line}: {text!r}: a NUL byte in a pattern")
    anchored = body.startswith("/")
    comps = [c for c in body.strip("/").split("/") if c != ""]
    if not comps:
        raise GroupListError(f"line {line}: {text!r}: the root itself is not a pattern "
                             "(write '*' or '**' to select every file)")
    if "//" in body.strip("/"):
        raise GroupListError(f"line {line}: {text!r}: empty path component ('//')")
    toks: list[re.Pattern[bytes] | None] = []
    lits: list[bytes | None] = []
    if exclude and not anchored:
        toks.append(_DOUBLESTAR)  # an unanchored exclusion names a path at any depth
        lits.append(None)
    for comp in comps:
        t, lit = _component(comp, line, text)
        if t is _DOUBLESTAR and toks and toks[-1] is _DOUBLESTAR:
            continue  # **/** is **
        toks.append(t)
        lits.append(lit)
    return Pattern(text=("X " if exclude else "") + body, exclude=exclude, line=line,
                   tokens=tuple(toks), literals=tuple(lits))


@dataclass(frozen=True)
class GroupList:
    """A parsed group list: its inclusions and exclusions, and its canonical lines
    (what is stored and recorded in a generation's manifest)."""

    includes: tuple[Pattern, ...]
    excludes: tuple[Pattern, ...]

    @property
    def lines(self) -> list[str]:
        return [p.text for p in sorted((*self.includes, *self.excludes),
                                       key=lambda p: p.line)]

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines)


_EXCL_RE = re.compile(r"^X\s+(.*)$")


def parse_group_list(text: str, *, where: str = "group list") -> GroupList:
    """Parse a group list (Fig. 22). Errors name the line: ``GroupListError``."""
    lines = text.splitlines()
    if len(lines) > MAX_LINES:
        raise GroupListError(f"{where} has {len(lines)} lines; at most {MAX_LINES} are "
                             "allowed")
    inc: list[Pattern] = []
    exc: list[Pattern] = []
    for n, raw in enumerate(lines, 1):
        try:
            if len(raw) > MAX_LINE:
                raise GroupListError(f"line {n}: longer than {MAX_LINE} characters")
            s = raw.strip()
            if not s or s.startswith("#"):
                continue
            if s == "X" or s.startswith(("X\t", "X ")):
                m = _EXCL_RE.match(s)
                exc.append(parse_pattern(m.group(1) if m else "", exclude=True, line=n))
            else:
                inc.append(parse_pattern(s, line=n))
        except GroupListError as e:
            raise GroupListError(f"{where}: {e.message}") from None
    if not inc:
        raise GroupListError(f"{where} includes nothing: give at least one path pattern "
                             "(e.g. 'dir_A/*'); lines starting with 'X ' only exclude")
    return GroupList(tuple(inc), tuple(exc))


def group_list_from(includes: Sequence[str], excludes: Sequence[str] = (),
                    text: str | None = None, *, where: str = "group list") -> GroupList:
    """A group list from command-line inclusions and exclusions, after the lines of
    ``text`` (a ``--from-file`` list) when given."""
    lines = (text.splitlines() if text is not None else [])
    for p in includes:
        if p.strip().startswith(("X ", "X\t")) or "\n" in p:
            raise GroupListError(f"--include {p!r}: one path pattern, without 'X ' (use "
                                 "--exclude for exclusions)")
        lines.append(p)
    for p in excludes:
        if "\n" in p:
            raise GroupListError(f"--exclude {p!r}: one path pattern")
        lines.append("X " + p)
    return parse_group_list("\n".join(lines), where=where)


# -- matching ----------------------------------------------------------------------------

State = frozenset[tuple[int, int]]  # (pattern index, position in its tokens)


def _closure(pats: Sequence[Pattern], states: Iterable[tuple[int, int]]) -> State:
    out = set()
    todo = list(states)
    while todo:
        p, i = todo.pop()
        if (p, i) in out:
            continue
        out.add((p, i))
        toks = pats[p].tokens
        if i < len(toks) and toks[i] is _DOUBLESTAR:
            todo.append((p, i + 1))
    return frozenset(out)


def start_state(pats: Sequence[Pattern]) -> State:
    return _closure(pats, ((p, 0) for p in range(len(pats))))


def step(pats: Sequence[Pattern], states: State, name: bytes) -> tuple[State, list[int]]:
    """Move every state over one path component ``name``: the new states, and the
    patterns that now match the whole path."""
    nxt: list[tuple[int, int]] = []
    for p, i in states:
        toks = pats[p].tokens
        if i >= len(toks):
            continue
        t = toks[i]
        if t is _DOUBLESTAR:
            nxt.append((p, i))
        elif t.fullmatch(name):
            nxt.append((p, i + 1))
    new = _closure(pats, nxt)
    done = sorted({p for p, i in new if i == len(pats[p].tokens)})
    return new, done


def matches(pat: Pattern, path: Sequence[bytes]) -> bool:
    """Whether ``pat`` names exactly the path ``path`` (components)."""
    s = start_state([pat])
    done: list[int] = []
    for comp in path:
        s, done = step([pat], s, comp)
        if not s:
            return False
    return bool(done)


# -- membership ----------------------------------------------------------------------------

@dataclass
class Member:
    path: bytes  # "/dir_A/file_a"
    attr: Attr


@dataclass
class Membership:
    """The files of a group in one namespace, and what reaching them cost."""

    files: list[Member] = field(default_factory=list)
    dirs: set[int] = field(default_factory=set)  # directories above members (root too)
    edges: set[tuple[int, bytes, int]] = field(default_factory=set)  # (parent, name, ino)
    hits: list[int] = field(default_factory=list)  # files selected per inclusion
    dirs_listed: int = 0  # readdir'ed directories (the cost)
    lookups: int = 0

    @property
    def inodes(self) -> set[int]:
        return {m.attr.ino for m in self.files}

    def blocks(self, meta: MetaSource) -> dict[int, BlockSet]:
        """The group block list (Fig. 24): the blocks of the member files, per disk
        (O(extents of the group's files))."""
        bs = meta.block_size
        per: dict[int, list[tuple[int, int]]] = {}
        seen: set[int] = set()
        for m in self.files:
            a = m.attr
            if a.ino in seen or not stat.S_ISREG(a.mode) or a.size <= 0:
                continue
            seen.add(a.ino)
            for e in meta.map_read(a.ino, 0, (a.size + bs - 1) // bs):
                per.setdefault(int(e.disk), []).append((e.dblock, e.length))
        return {d: BlockSet.from_runs(np.asarray(r, dtype=np.int64).reshape(-1, 2))
                for d, r in per.items()}


def _join(parent: bytes, name: bytes) -> bytes:
    return (parent if parent != b"/" else b"") + b"/" + name


def evaluate(meta: MetaSource, gl: GroupList) -> Membership:
    """The files of group list ``gl`` in the namespace of ``meta`` (see the module
    docstring for the rules and the cost)."""
    inc, exc = list(gl.includes), list(gl.excludes)
    out = Membership(hits=[0] * len(inc))
    # Each frame: directory inode, its path, the inodes above it (for the ancestors of
    # members), include states, exclude states, and whether a directory above it (or
    # it) was selected. Depth first, in name order, so the listing is deterministic.
    stack: list[tuple[int, bytes, tuple[tuple[int, bytes, int], ...], State, State,
                      int | None]] = [(ROOT_INODE, b"/", (), start_state(inc),
                                       start_state(exc), None)]
    seen_dirs: set[int] = set()
    while stack:
        ino, path, above, si, se, selected_by = stack.pop()
        if ino in seen_dirs:
            continue  # directories have one name; a loop is a damaged namespace
        seen_dirs.add(ino)
        entries: list[tuple[bytes, Attr]] = []
        lits = {pats_lit for p, i in si
                if i < inc[p].size and (pats_lit := inc[p].literals[i]) is not None}
        only_literals = selected_by is None and all(
            i < inc[p].size and inc[p].literals[i] is not None for p, i in si)
        if only_literals:
            for name in sorted(lits):
                out.lookups += 1
                try:
                    entries.append((name, meta.lookup(ino, name)))
                except FsError as e:
                    if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                        raise
        else:
            out.dirs_listed += 1
            after = 0
            while True:
                batch = meta.readdir(ino, after)
                if not batch:
                    break
                for ent in batch:
                    if ent.name not in (b".", b".."):
                        entries.append((ent.name, ent.attr))
                after = batch[-1].cookie
            entries.sort(key=lambda t: t[0])
        push = []
        for name, attr in entries:
            ni, done_i = (frozenset(), []) if selected_by is not None else step(inc, si, name)
            ne, done_e = step(exc, se, name) if exc else (frozenset(), [])
            if done_e:
                continue  # excluded, with everything below it
            sel = selected_by if selected_by is not None else (done_i[0] if done_i else None)
            cpath = _join(path, name)
            edge = (ino, name, attr.ino)
            if stat.S_ISDIR(attr.mode):
                if sel is not None or ni:
                    push.append((attr.ino, cpath, (*above, edge), ni, ne, sel))
                continue
            if sel is None:
                continue
            out.files.append(Member(cpath, attr))
            out.hits[sel] += 1
            out.edges.update(above)
            out.edges.add(edge)
            out.dirs.update(c for _p, _n, c in above)
            out.dirs.add(ROOT_INODE)
        stack.extend(reversed(push))
    out.files.sort(key=lambda m: m.path)
    return out


def format_runs(blocks: BlockSet, limit: int | None = None) -> list[str]:
    """A block list as runs of contiguous blocks (Fig. 24): ``120-135`` or ``200``."""
    out = []
    for start, count in blocks.runs():
        out.append(f"{start}" if count == 1 else f"{start}-{start + count - 1}")
        if limit is not None and len(out) >= limit:
            break
    return out


# -- a group generation's snapshot ---------------------------------------------------------

GROUP_TABLES = """
CREATE TABLE IF NOT EXISTS sdb_group (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sdb_group_blocks (
    disk INTEGER PRIMARY KEY,
    data BLOB NOT NULL
);
"""
"""Written into a group generation's T0 snapshot (docs/FORMAT.md): the group's name,
list and meta scope (``sdb_group``), and its block list at T0 per disk, a serialized
roaring bitmap (``sdb_group_blocks``): the blocks the generation answers for."""


def write_group_tables(path: Path, name: str, gl: GroupList, scope: str,
                       blocks: dict[int, BlockSet], files: int) -> None:
    """Record the group in the snapshot file at ``path`` (a rollback-journal SQLite
    file the caller then checksums)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN")
        for stmt in GROUP_TABLES.split(";"):
            if stmt.strip():
                db.execute(stmt)
        db.executemany("INSERT OR REPLACE INTO sdb_group(key, value) VALUES (?,?)", [
            ("name", name), ("list", json.dumps(gl.lines)), ("meta", scope),
            ("files", str(files))])
        db.executemany("INSERT OR REPLACE INTO sdb_group_blocks(disk, data) VALUES (?,?)",
                       [(d, b.serialize()) for d, b in sorted(blocks.items())])
        db.execute("COMMIT")
    finally:
        db.close()


def keep_only_group(path: Path, mem: Membership, blocks: dict[int, BlockSet]) -> None:
    """``--meta group``: rewrite the snapshot at ``path`` so that it holds only the
    group's files and the directories above them (names outside the group are gone
    from the file, not only hidden), with link counts and the allocation bitmap made
    to match, so that it is a consistent file system of its own (fsck-clean). Cost:
    O(files of the group), by copying what is kept into a new file."""
    tmp = path.with_name(path.name + ".group")
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(tmp, isolation_level=None)
    try:
        db.execute("ATTACH DATABASE ? AS src", (f"file:{path}?mode=ro",))
        schema = db.execute("SELECT type, name, sql FROM src.sqlite_master WHERE sql IS NOT "
                            "NULL AND name NOT LIKE 'sqlite_%' ORDER BY type='index'").fetchall()
        db.execute("BEGIN")
        for _t, _n, sql in schema:
            db.execute(sql)
        keep = {ROOT_INODE} | set(mem.dirs) | mem.inodes
        db.execute("CREATE TEMP TABLE keep(ino INTEGER PRIMARY KEY)")
        db.executemany("INSERT OR IGNORE INTO keep(ino) VALUES (?)", [(i,) for i in keep])
        tables = {n for t, n, _s in schema if t == "table"}
        for t in ("meta", "disks"):
            db.execute(f"INSERT INTO main.{t} SELECT * FROM src.{t}")
        for t in tables - {"meta", "disks", "inodes", "dirents", "extents", "alloc"}:
            if t.startswith(("track_", "sdb_")):
                db.execute(f"INSERT INTO main.{t} SELECT * FROM src.{t}")
        db.execute("INSERT INTO main.inodes SELECT i.* FROM keep k JOIN src.inodes i "
                   "ON i.id = k.ino")
        db.execute("INSERT INTO main.extents SELECT e.* FROM keep k JOIN src.extents e "
                   "ON e.ino = k.ino")
        rows = []
        for parent, name, ino in sorted(mem.edges):
            r = db.execute("SELECT id, parent, name, ino FROM src.dirents WHERE parent=? "
                           "AND name=?", (parent, name)).fetchone()
            if r is not None and r[3] == ino:
                rows.append(r)
        db.executemany("INSERT INTO main.dirents(id, parent, name, ino) VALUES (?,?,?,?)",
                       rows)
        # Link counts as the kept names make them.
        names: dict[int, int] = {}
        subdirs: dict[int, int] = {}
        for _id, parent, _name, ino in rows:
            names[ino] = names.get(ino, 0) + 1
            if ino in mem.dirs:
                subdirs[parent] = subdirs.get(parent, 0) + 1
        for d in {ROOT_INODE, *mem.dirs}:
            db.execute("UPDATE main.inodes SET nlink=? WHERE id=?",
                       (2 + subdirs.get(d, 0), d))
        for ino in mem.inodes:
            db.execute("UPDATE main.inodes SET nlink=? WHERE id=?", (names.get(ino, 1), ino))
        # The allocation bitmap: the group's blocks and each disk's reserved blocks.
        for did, nblocks, reserved in db.execute(
                "SELECT id, nblocks, reserved FROM main.disks").fetchall():
            s = blocks.get(int(did), BlockSet()).copy()
            if reserved:
                s.add_run(0, int(reserved))
            flags = np.zeros(int(nblocks), dtype=bool)
            for start, count in s.runs():
                flags[start : start + count] = True
            bits = np.packbits(flags, bitorder="little")
            cb = CHUNK_BITS // 8
            for c in range(0, bits.size, cb):
                chunk = bits[c : c + cb]
                if chunk.any():
                    db.execute("INSERT INTO main.alloc(disk, chunk, bits) VALUES (?,?,?)",
                               (did, c // cb, chunk.tobytes()))
        db.execute("COMMIT")
        db.execute("DETACH DATABASE src")
    finally:
        db.close()
    os.replace(tmp, path)
