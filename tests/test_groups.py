"""File groups (seed b.1-b.5): group lists, membership, group backups and restores.

The seed's two examples are named tests (Fig. 21/22 and Fig. 23); the pattern matcher
is checked against a simple recursive model with hypothesis; group backups are made
with the real engine on small clusters and read back through restore and a FUSE mount.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_backup_support import SMALL, cli, make_cluster

from sdbackup.backup.engine import BackupOptions, BackupResult, run_backup
from sdbackup.cluster.backup_source import LocalClusterSource
from sdbackup.cluster.config import load_config
from sdbackup.cluster.local import open_cluster
from sdbackup.errors import FsError
from sdbackup.media.chain import ChainReader
from sdbackup.media.medium import DiskMedium
from sdbackup.meta.groups import (
    GroupListError,
    evaluate,
    format_runs,
    parse_group_list,
)
from sdbackup.meta.types import Attr, DirEntry

# -- the seed's examples -----------------------------------------------------------------

FIG21 = ["dir_A/file_a", "dir_A/dir_B/file_b", "dir_A/dir_B/file_c",
         "dir_C/dir_D/file_d", "dir_C/dir_D/file_e", "dir_C/file_f",
         "dir_E/file_g", "file_h"]
"""Fig. 21: directories A, B, C, D with files a-f (B below A, D below C), plus files
outside both selected directories."""
FIG22 = "dir_A/*\ndir_C/*\nX dir_D/file_d\n"

FIG23_TREE = ["dir_X/file_a", "dir_X/file_x", "dir_Y/file_b", "dir_Y/file_y",
              "dir_Z/file_c", "dir_Z/file_z", "dir_Z/sub/file_w", "dir_W/file_c"]
FIG23 = "dir_X/file_a\ndir_Y/file_b\ndir_Z/*\nX dir_Z/file_c\n"


def build(base: Path, paths: list[str], *, size: int = 3000) -> Path:
    """A cluster holding ``paths`` (each file's bytes name it)."""
    cdir = make_cluster(base)
    with open_cluster(cdir) as c:
        for p in paths:
            parent = 1
            parts = p.split("/")
            for d in parts[:-1]:
                try:
                    parent = c.fs.meta.lookup(parent, d.encode()).ino
                except FsError:
                    parent = c.fs.mkdir(parent, d.encode(), 0o755).ino
            a = c.fs.create(parent, parts[-1].encode(), 0o644)
            c.fs.write(a.ino, 0, content(p, size))
    return cdir


def content(p: str, size: int = 3000, v: int = 0) -> bytes:
    return (f"{p}:{v};" * size).encode()[:size]


def members(cdir: Path, text: str) -> list[str]:
    with open_cluster(cdir) as c:
        return [m.path.decode() for m in evaluate(c.meta, parse_group_list(text)).files]


def test_fig21_22_selects_a_b_c_e_f_not_d(tmp_path: Path) -> None:
    cdir = build(tmp_path, FIG21)
    got = members(cdir, FIG22)
    assert sorted(Path(p).name for p in got) == ["file_a", "file_b", "file_c", "file_e",
                                                  "file_f"]
    # The same through the command line, with the block list as runs (Fig. 24).
    assert cli("group", "add", cdir, "fig22", "--include", "dir_A/*", "--include",
               "dir_C/*", "--exclude", "dir_D/file_d").code == 0
    r = cli("group", "show", cdir, "fig22", "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert d["files"] == sorted(got)
    with open_cluster(cdir) as c:
        mem = evaluate(c.meta, parse_group_list(FIG22))
        blocks = mem.blocks(c.meta)
        want = sum(-(-c.meta.getattr(m.attr.ino).size // c.meta.block_size)
                   for m in mem.files)
    assert sum(v["count"] for v in d["blocks"].values()) == want
    ids = {d.name: d.id for d in load_config(cdir).disks}
    assert {ids[n] for n in d["blocks"]} == set(blocks)
    for dname, v in d["blocks"].items():
        assert v["runs"] == format_runs(blocks[ids[dname]])
        assert all("-" in r or r.isdigit() for r in v["runs"])


def test_fig23_file_a_of_x_b_of_y_all_of_z_but_c(tmp_path: Path) -> None:
    cdir = build(tmp_path, FIG23_TREE)
    assert members(cdir, FIG23) == ["/dir_X/file_a", "/dir_Y/file_b", "/dir_Z/file_z",
                                    "/dir_Z/sub/file_w"]


def test_group_list_syntax_errors_name_the_line() -> None:
    for text, line, what in [("a/*\n\nX\n", 3, "names no path"),
                             ("# only\nX a\n", None, "includes nothing"),
                             ("a/../b\n", 1, "'.' and '..'"),
                             ("ok\n  a\\\n", 2, "escapes nothing"),
                             ("/\n", 1, "the root itself")]:
        with pytest.raises(GroupListError) as e:
            parse_group_list(text)
        if line is not None:
            assert f"line {line}:" in e.value.message
        assert what in e.value.message
    gl = parse_group_list("  # comment\n/dir_A/\n\nX\tdir_D/file_d\nd\\*x\n")
    assert gl.lines == ["/dir_A/", "X dir_D/file_d", "d\\*x"]
    assert [len(p.tokens) for p in gl.excludes] == [3]  # '**', dir_D, file_d


# -- the matcher against a model ----------------------------------------------------------

class FakeMeta:
    """An in-memory namespace with the metadata seam's read calls, counting listings."""

    block_size = 512

    def __init__(self, files: set[tuple[str, ...]]) -> None:
        self.children: dict[int, dict[bytes, int]] = {1: {}}
        self.kind: dict[int, int] = {1: stat.S_IFDIR}
        self.listed: list[int] = []
        nxt = 2
        for f in sorted(files):
            cur = 1
            for i, comp in enumerate(f):
                last = i == len(f) - 1
                kids = self.children.setdefault(cur, {})
                name = comp.encode()
                if name not in kids:
                    kids[name] = nxt
                    self.kind[nxt] = stat.S_IFREG if last else stat.S_IFDIR
                    if not last:
                        self.children[nxt] = {}
                    nxt += 1
                cur = kids[name]

    def _attr(self, ino: int) -> Attr:
        return Attr(ino, self.kind[ino] | 0o644, 1, 0, 0, 0, 0, 0, 0, 0, 0)

    def lookup(self, parent: int, name: bytes) -> Attr:
        ino = self.children.get(parent, {}).get(name)
        if ino is None:
            raise FsError(errno.ENOENT, "no such name")
        return self._attr(ino)

    def readdir(self, ino: int, after: int = 0, limit: int = 1000) -> list[DirEntry]:
        if after:
            return []
        self.listed.append(ino)
        return [DirEntry(i + 1, n, self._attr(c))
                for i, (n, c) in enumerate(sorted(self.children[ino].items()))]


def model_match(pat: list[str], path: tuple[str, ...]) -> bool:
    """Whole-path match, recursively: '**' takes any number of components."""
    if not pat:
        return not path
    if pat[0] == "**":
        return any(model_match(pat[1:], path[i:]) for i in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatchcase(path[0], pat[0]) and \
        model_match(pat[1:], path[1:])


def model_members(files: set[tuple[str, ...]], inc: list[str], exc: list[str]
                  ) -> list[str]:
    def named(pats: list[list[str]], path: tuple[str, ...]) -> bool:
        # a pattern names the path or a directory above it
        return any(model_match(p, path[:k]) for p in pats for k in range(1, len(path) + 1))

    incs = [p.strip("/").split("/") for p in inc]
    excs = [(p.strip("/").split("/") if p.startswith("/") else ["**", *p.split("/")])
            for p in exc]
    return sorted("/" + "/".join(f) for f in files
                  if named(incs, f) and not named(excs, f))


NAMES = ["a", "b", "ab", "ba", "c.txt"]
COMPS = ["a", "b", "ab", "*", "?", "a*", "*b", "**", "c.*", "?b"]
paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=4).map(tuple)
pattern = st.lists(st.sampled_from(COMPS), min_size=1, max_size=4).map("/".join)


@settings(max_examples=300, deadline=None)
@given(files=st.sets(paths, min_size=1, max_size=25),
       inc=st.lists(pattern, min_size=1, max_size=3),
       exc=st.lists(st.tuples(st.booleans(), pattern).map(
           lambda t: ("/" if t[0] else "") + t[1]), max_size=2))
def test_matcher_against_model(files: set[tuple[str, ...]], inc: list[str],
                               exc: list[str]) -> None:
    # A file name cannot also be a directory: drop paths that extend a file.
    files = {f for f in files if not any(g != f and g[:len(f)] == f for g in files)}
    meta = FakeMeta(files)
    gl = parse_group_list("\n".join(inc + ["X " + e for e in exc]))
    got = sorted(m.path.decode() for m in evaluate(meta, gl).files)  # type: ignore[arg-type]
    assert got == model_members(files, inc, exc)


def test_evaluation_reads_only_the_groups_directories() -> None:
    files = {(f"top{i}", f"sub{j}", f"f{k}") for i in range(20) for j in range(5)
             for k in range(3)}
    files |= {("data", "proj", f"p{j}", f"f{k}.c") for j in range(4) for k in range(3)}
    meta = FakeMeta(files)
    mem = evaluate(meta, parse_group_list("data/proj/*\nX p1\n"))  # type: ignore[arg-type]
    assert len(mem.files) == 9
    # Literal components are looked up; only proj and what is below it are listed.
    assert mem.lookups == 2 and mem.dirs_listed == 1 + 3
    meta.listed.clear()
    mem = evaluate(meta, parse_group_list("data/*/p2/*.c\n"))  # type: ignore[arg-type]
    assert len(mem.files) == 3 and len(meta.listed) == 2  # data (wildcard), then p2


# -- group backups ------------------------------------------------------------------------

def group_opts(name: str, text: str, **kw: object) -> BackupOptions:
    return replace(SMALL, group=name, group_list=parse_group_list(text), **kw)  # type: ignore[arg-type]


def gbackup(cdir: Path, medium: Path, name: str, text: str, **kw: object) -> BackupResult:
    with open_cluster(cdir) as c:
        return run_backup(LocalClusterSource(c), medium, group_opts(name, text, **kw))


def read_gen(medium: Path, gen: str) -> dict[str, bytes | Exception]:
    """Every file of a generation: its bytes, or the error reading it raised."""
    med = DiskMedium.open(medium)
    m = med.resolve(gen)
    from sdbackup.fs.readonly import ReadOnlyFileSystem
    from sdbackup.media.chain import open_chain

    snap, reader = open_chain(med, m)
    out: dict[str, bytes | Exception] = {}
    try:
        fs = ReadOnlyFileSystem(snap, reader)

        def walk(ino: int, path: str) -> None:
            for e in snap.readdir(ino):
                p = f"{path}/{e.name.decode()}"
                if e.attr.is_dir:
                    walk(e.attr.ino, p)
                else:
                    try:
                        out[p] = fs.read(e.attr.ino, 0, e.attr.size + 1)
                    except Exception as err:
                        out[p] = err
        walk(1, "")
    finally:
        reader.close()
        snap.close()
    return out


def live(cdir: Path) -> dict[str, bytes]:
    out = {}
    with open_cluster(cdir) as c:
        def walk(ino: int, path: str) -> None:
            for e in c.meta.readdir(ino):
                p = f"{path}/{e.name.decode()}"
                if e.attr.is_dir:
                    walk(e.attr.ino, p)
                else:
                    out[p] = c.fs.read(e.attr.ino, 0, e.attr.size + 1)
        walk(1, "")
    return out


def test_group_full_holds_exactly_the_group_and_fails_outside(tmp_path: Path) -> None:
    cdir = build(tmp_path, FIG21)
    t0 = live(cdir)
    group = {p for p in t0 if p.split("/")[-1] in ("file_a", "file_b", "file_c", "file_e",
                                                  "file_f")}
    all_med, grp_med = tmp_path / "m-all", tmp_path / "m-group"
    r = gbackup(cdir, all_med, "fig22", FIG22)
    with open_cluster(cdir) as c:
        mem = evaluate(c.meta, parse_group_list(FIG22))
        want = mem.blocks(c.meta)
    assert r.manifest.group == "fig22" and r.manifest.is_full
    assert {d.id: d.blocks for d in r.manifest.disks} == {
        d.id: len(want.get(d.id, [])) for d in r.manifest.disks}
    assert r.manifest.extra["group_spec"]["list"] == ["dir_A/*", "dir_C/*",
                                                      "X dir_D/file_d"]
    # --meta all: every name is listed, the group's files read as at T0, the others fail
    got = read_gen(all_med, r.manifest.id)
    assert set(got) == set(t0)
    for p, v in got.items():
        if p in group:
            assert v == t0[p]
        else:
            assert isinstance(v, Exception) and "outside group fig22" in str(v), p
    # --meta group: only the group's files (and the directories above them) exist
    r2 = gbackup(cdir, grp_med, "fig22", FIG22, meta_scope="group")
    got = read_gen(grp_med, r2.manifest.id)
    assert got == {p: t0[p] for p in group}
    assert cli("verify", "--medium", grp_med).code == 0
    assert cli("verify", "--medium", all_med).code == 0
    # a --meta group snapshot is a consistent file system of its own
    from sdbackup.media.generation import Generation
    from sdbackup.media.snapshot import SnapshotMeta
    from sdbackup.meta.fsck import check_all

    g = Generation(DiskMedium.open(grp_med), r2.manifest)
    with SnapshotMeta(g.meta_file(), "test") as snap:
        assert check_all(snap.store) == []


def test_restore_of_group_generations(tmp_path: Path) -> None:
    cdir = build(tmp_path, FIG21)
    t0 = live(cdir)
    med = tmp_path / "m"
    gen = gbackup(cdir, med, "fig22", FIG22).manifest.id
    r = cli("restore", "--medium", med, gen, "--to", tmp_path / "all")
    assert r.code == 0, r.err
    assert "3 file(s) outside group fig22 not restored" in r.err
    restored = {"/" + str(p.relative_to(tmp_path / "all")): p.read_bytes()
                for p in (tmp_path / "all").rglob("*") if p.is_file()}
    assert restored == {p: v for p, v in t0.items()
                        if p.split("/")[-1] not in ("file_d", "file_g", "file_h")}
    # asking for a file outside the group: one clear line, exit 4
    r = cli("restore", "--medium", med, gen, "/dir_C/dir_D/file_d", "--to", tmp_path / "d")
    assert r.code == 4 and "outside group fig22" in r.err and "file_d" in r.err
    # no disk image or cluster from a group generation
    r = cli("restore-image", "--medium", med, gen, "--disk", "d0", "--to", tmp_path / "i")
    assert r.code == 2 and "backup of group fig22" in r.err
    assert not (tmp_path / "i").exists()


def ino_of(c, path: str) -> int:  # type: ignore[no-untyped-def]
    ino = 1
    for part in path.strip("/").split("/"):
        ino = c.meta.lookup(ino, part.encode()).ino
    return ino


def test_group_incremental_after_files_move_in_and_out(tmp_path: Path) -> None:
    cdir = build(tmp_path, [*FIG21, "elsewhere/moved_in", "elsewhere/untouched"])
    med = tmp_path / "m"
    full = gbackup(cdir, med, "fig22", FIG22)
    with open_cluster(cdir) as c:
        # moved in (a rename: no block changes), moved out, created, changed, and
        # a change outside the group
        c.fs.meta.rename(ino_of(c, "elsewhere"), b"moved_in", ino_of(c, "dir_A"), b"moved_in")
        c.fs.meta.rename(ino_of(c, "dir_A/dir_B"), b"file_c", ino_of(c, "elsewhere"),
                         b"file_c")
        a = c.fs.create(ino_of(c, "dir_C/dir_D"), b"new_file", 0o644)
        c.fs.write(a.ino, 0, content("new", 2000))
        c.fs.write(ino_of(c, "dir_C/file_f"), 512, b"F" * 700)
        c.fs.write(ino_of(c, "dir_E/file_g"), 0, b"G" * 3000)
        moved = c.meta.getattr(ino_of(c, "dir_A/moved_in")).size
        mem = evaluate(c.meta, parse_group_list(FIG22))
        ext = {e.disk: e for e in c.meta.map_read(ino_of(c, "dir_A/moved_in"), 0, 100)}
        assert ext
    t1 = live(cdir)
    inc = gbackup(cdir, med, "fig22", FIG22, incremental=True)
    m = inc.manifest
    assert m.kind == "incremental" and m.parent == full.manifest.id
    assert m.chain == full.manifest.chain
    bs = 512
    # copied: moved_in whole, the new file whole, the two changed blocks of file_f
    # (700 bytes at 512 touch blocks 1 and 2); not file_g (outside), not file_c (left)
    want = -(-moved // bs) + -(-2000 // bs) + 2
    assert m.blocks == want, (m.blocks, want)
    got = read_gen(med, m.id)
    names = {p.split("/")[-1] for p in mem.files for p in [p.path.decode()]}
    assert names == {"file_a", "file_b", "file_e", "file_f", "moved_in", "new_file"}
    for p in (x.path.decode() for x in mem.files):
        assert got[p] == t1[p], p
    assert isinstance(got["/elsewhere/file_c"], Exception)  # moved out: not held now
    assert isinstance(got["/dir_E/file_g"], Exception)
    # the chain reads like T1 through a mount-equivalent reader and verifies
    assert cli("verify", "--medium", med, m.id).code == 0


def test_overlapping_groups_keep_their_own_chains(tmp_path: Path) -> None:
    """b.5: file_f is in both groups; each group's incremental holds its change, and a
    new full of one group never ends the other's chain or the whole-cluster one."""
    cdir = build(tmp_path, FIG21)
    med = tmp_path / "m"
    g1, g2 = FIG22, "dir_C/file_f\ndir_E/*\n"
    whole = run_backup_whole(cdir, med)
    f1 = gbackup(cdir, med, "g1", g1)
    f2 = gbackup(cdir, med, "g2", g2)
    assert len({whole.manifest.chain, f1.manifest.chain, f2.manifest.chain}) == 3
    with open_cluster(cdir) as c:
        c.fs.write(ino_of(c, "dir_C/file_f"), 0, b"X" * 600)
    i1 = gbackup(cdir, med, "g1", g1, incremental=True)
    assert i1.manifest.blocks == 2 and i1.manifest.parent == f1.manifest.id
    # g1's backup started a new era: g2's incremental must still see the change
    i2 = gbackup(cdir, med, "g2", g2, incremental=True)
    assert i2.manifest.blocks == 2 and i2.manifest.parent == f2.manifest.id
    # a new full of g1 ends only g1's old chain
    gbackup(cdir, med, "g1", g1)
    with open_cluster(cdir) as c:
        c.fs.write(ino_of(c, "dir_E/file_g"), 0, b"Y" * 10)
        chains = c.meta.tracker.chains()
    assert f2.manifest.chain in chains and whole.manifest.chain in chains
    assert f1.manifest.chain not in chains
    i3 = gbackup(cdir, med, "g2", g2, incremental=True)
    assert i3.manifest.parent == i2.manifest.id and i3.manifest.blocks == 1
    with open_cluster(cdir) as c:
        w = run_backup(LocalClusterSource(c), med, replace(SMALL, incremental=True))
    assert w.manifest.parent == whole.manifest.id and w.manifest.group is None
    assert w.manifest.blocks >= 3  # file_f's and file_g's changes, for the whole chain
    assert read_gen(med, i3.manifest.id)["/dir_C/file_f"] == live(cdir)["/dir_C/file_f"]
    # prune --group touches only that group's generations
    before = {m.id for m in DiskMedium.open(med).committed()}
    r = cli("prune", "--medium", med, "--group", "g2", "--keep-last", "1")
    assert r.code == 0, r.err
    after = {m.id for m in DiskMedium.open(med).committed()}
    gone = before - after
    assert gone and all(DiskMedium.open(med).catalog().get(g) is not None
                        and DiskMedium.open(med).catalog().get(g).group == "g2"  # type: ignore[union-attr]
                        for g in gone)
    cat = DiskMedium.open(med).catalog()
    assert [m.group for m in cat.current].count("g1") == 3
    assert read_gen(med, cat.head("g2").id)["/dir_E/file_g"] == live(cdir)["/dir_E/file_g"]  # type: ignore[union-attr]


def run_backup_whole(cdir: Path, med: Path) -> BackupResult:
    with open_cluster(cdir) as c:
        return run_backup(LocalClusterSource(c), med, SMALL)


def test_group_chain_reader_owner_map_matches_live(tmp_path: Path) -> None:
    """Three group incrementals read through the chain equal the live group files."""
    cdir = build(tmp_path, FIG21)
    med = tmp_path / "m"
    gbackup(cdir, med, "g", FIG22)
    for v in range(3):
        with open_cluster(cdir) as c:
            c.fs.write(ino_of(c, "dir_A/file_a"), 512 * v, b"%d" % v * 100)
            a = c.fs.create(ino_of(c, "dir_A"), f"n{v}".encode(), 0o644)
            c.fs.write(a.ino, 0, content(f"n{v}", 1500))
        m = gbackup(cdir, med, "g", FIG22, incremental=True).manifest
    now = live(cdir)
    got = read_gen(med, m.id)
    with ChainReader.open(med, m.id) as r:
        assert r.length == 4
    for p, v in got.items():
        if p.startswith(("/dir_A", "/dir_C/file_f", "/dir_C/dir_D/file_e")):
            assert v == now[p], p


# -- bad input ------------------------------------------------------------------------------

def test_bad_input_is_one_line_exit_2_and_changes_nothing(tmp_path: Path) -> None:
    cdir = build(tmp_path, FIG21)
    assert cli("group", "add", cdir, "g", "--include", "dir_A/*").code == 0
    before = (cdir / "groups.json").read_bytes()
    lst = tmp_path / "list"
    lst.write_text("dir_A/*\n# fine\nX\n")
    cases = [
        (["group", "add", cdir, "h", "--from-file", lst], "line 3: an exclusion names no path"),
        (["group", "add", cdir, "h", "--include", "a/../b"], "line 1:"),
        (["group", "add", cdir, "bad name", "--include", "a"], "bad group name"),
        (["group", "add", cdir, "g", "--include", "a"], "exists already"),
        (["group", "add", cdir, "h"], "--include PATTERN"),
        (["group", "add", cdir, "h", "--include", "a", "--schedule", "61 * * * *",
          "--medium", tmp_path / "m"], "invalid cron expression '61 * * * *'"),
        (["group", "add", cdir, "h", "--include", "a", "--schedule", "0 * * * *",
          "--medium", tmp_path / "m", "--tz", "Mars/Olympus"], "unknown time zone"),
        (["group", "add", cdir, "h", "--include", "a", "--schedule", "0 * * * *"],
         "needs --medium"),
        (["group", "add", cdir, "h", "--include", "a", "--level", "full"],
         "add --schedule CRON"),
        (["group", "show", cdir, "nope"], "unknown group 'nope'"),
        (["group", "rm", cdir, "nope"], "unknown group 'nope'"),
        (["group", "edit", cdir, "g"], "nothing to change"),
        (["group", "edit", cdir, "nope", "--include", "x"], "unknown group 'nope'"),
        (["backup", cdir, "--group", "nope", "--medium", tmp_path / "m"], "unknown group"),
        (["backup", cdir, "--meta", "group", "--medium", tmp_path / "m"], "--meta goes with"),
    ]
    for args, want in cases:
        r = cli(*args)
        assert r.code == 2, (args, r.code, r.err)
        assert want in r.err, (args, r.err)
        assert len(r.err.strip().splitlines()) == 1, r.err
    assert (cdir / "groups.json").read_bytes() == before
    assert not (tmp_path / "m").exists()
    # a group selecting nothing: a warning when defined, a refusal when backed up
    r = cli("group", "add", cdir, "empty", "--include", "no/such/*")
    assert r.code == 0 and "selects no file now" in r.err
    r = cli("backup", cdir, "--group", "empty", "--medium", tmp_path / "m")
    assert r.code == 2 and "selects no file at T0" in r.err
    assert DiskMedium.open(tmp_path / "m").committed() == []
    with open_cluster(cdir) as c:
        assert c.meta.tracker.chains() == {}  # refused before T0's era was taken


# -- a mount of a --meta all group generation ----------------------------------------------

@pytest.mark.fuse
def test_mount_group_generation_eio_outside(tmp_path: Path) -> None:
    from test_backup_mount import mount_bg, require_fuse

    require_fuse()
    cdir = build(tmp_path, FIG21)
    t0 = live(cdir)
    med = tmp_path / "m"
    (tmp_path / "list").write_text(FIG22)
    assert cli("group", "add", cdir, "g", "--from-file", tmp_path / "list").code == 0
    assert cli("backup", cdir, "--group", "g", "--medium", med, "--json").code == 0
    with mount_bg(med, tmp_path / "mp") as mnt:
        names = sorted(str(p.relative_to(mnt.mp)) for p in mnt.mp.rglob("*")
                       if p.is_file())
        assert names == sorted(p.lstrip("/") for p in t0)
        assert (mnt.mp / "dir_A/dir_B/file_b").read_bytes() == t0["/dir_A/dir_B/file_b"]
        with pytest.raises(OSError) as e:
            (mnt.mp / "dir_C/dir_D/file_d").read_bytes()
        assert e.value.errno == errno.EIO
        assert "outside group g" in mnt.log_text()
    assert cli("backup", cdir, "--group", "g", "--medium", tmp_path / "m2", "--meta",
               "group").code == 0
    with mount_bg(tmp_path / "m2", tmp_path / "mp2") as mnt:
        names = sorted(str(p.relative_to(mnt.mp)) for p in mnt.mp.rglob("*")
                       if p.is_file())
        assert names == ["dir_A/dir_B/file_b", "dir_A/dir_B/file_c", "dir_A/file_a",
                         "dir_C/dir_D/file_e", "dir_C/file_f"]
        for n in names:
            assert (mnt.mp / n).read_bytes() == t0["/" + n]

