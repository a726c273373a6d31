"""Tape together with file groups and with the dispersed copy (merge of issues 15, 16
and 17): a group backup goes straight to tape (full, then an incremental in the
group's own chain) and restores from tape alone; a dispersed copy straight to tape is
refused in one line (its copiers write parts to disk media), by the command, the
coordinator's request check and the engine; restore, restore-image and mount name
the read source they need in one line when none, or ones that do not go together,
are given. (A dispersed generation copied to tape with ``tape write``:
tests/test_dispersed.py.)"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from test_backup_support import SMALL, cli
from test_groups import FIG21, build, content, live

from sdbackup.backup.engine import TAPE_COPY_NODES, check_options
from sdbackup.cluster.local import open_cluster
from sdbackup.errors import UsageError
from sdbackup.media.tape.catalog import TapeCatalog
from sdbackup.media.tape.filetape import FileTape
from sdbackup.media.tape.sink import TapeSpec

KiB, MiB = 1 << 10, 1 << 20
GROUP_FILES = ("file_a", "file_b", "file_c", "file_e", "file_f")


def _write(cdir: Path, path: str, data: bytes) -> None:
    with open_cluster(cdir) as c:
        ino = 1
        for part in path.strip("/").split("/"):
            ino = c.fs.meta.lookup(ino, part.encode()).ino
        c.fs.write(ino, 0, data)


def _restored(root: Path) -> dict[str, bytes]:
    return {"/" + str(p.relative_to(root)): p.read_bytes()
            for p in root.rglob("*") if p.is_file()}


def test_group_backup_straight_to_tape_full_then_incremental(tmp_path: Path) -> None:
    cdir = build(tmp_path / "c", FIG21)
    assert cli("group", "add", cdir, "fig22", "--include", "dir_A/*", "--include",
               "dir_C/*", "--exclude", "dir_D/file_d").code == 0
    t = tmp_path / "t.tape"
    FileTape.create(t, 64 * MiB, max_block=256 * KiB)
    cat = tmp_path / "catalog"
    common = ["--tape", f"file:{t}", "--catalog", cat, "--compress", "none", "-q", "--json"]
    r = cli("backup", cdir, "--group", "fig22", *common)
    assert r.code == 0, r.err
    s1 = json.loads(r.out)
    assert s1["group"] == "fig22" and s1["group_files"] == 5, s1
    set_id = s1["tape"]["set"]
    t0 = live(cdir)
    _write(cdir, "/dir_A/file_a", content("dir_A/file_a", v=1))
    _write(cdir, "/dir_E/file_g", content("dir_E/file_g", v=1))  # outside the group
    r = cli("backup", cdir, "--group", "fig22", "--incremental", *common)
    assert r.code == 0, r.err
    s2 = json.loads(r.out)
    assert s2["tape"]["set"] == set_id and s2["group"] == "fig22"
    med = TapeCatalog(cat).medium(set_id)
    m1, m2 = med.resolve(s1["generation"]), med.resolve(s2["generation"])
    assert m1.group == m2.group == "fig22" and m1.is_full
    assert m2.kind == "incremental" and m2.parent == m1.id and m2.chain == m1.chain
    # The incremental copies the changed group file only: not the changed file_g.
    assert m2.blocks < m1.blocks

    tape_args = ["--tape", f"file:{t}", "--buffer", tmp_path / "buf", "--catalog", cat]
    for gen, want in ((m1.id, t0), (m2.id, live(cdir))):
        out = tmp_path / f"r-{gen}"
        r = cli("restore", *tape_args, gen, "--to", out, "-q")
        assert r.code == 0, r.err
        assert "3 file(s) outside group fig22 not restored" in r.err, r.err
        assert _restored(out) == {p: v for p, v in want.items()
                                  if p.split("/")[-1] in GROUP_FILES}
    r = cli("restore", *tape_args, m2.id, "/dir_E/file_g", "--to", tmp_path / "r-out")
    assert r.code == 4 and "outside group fig22" in r.err, r.err


def test_copy_nodes_with_tape_is_refused_in_one_line(tmp_path: Path) -> None:
    cdir = build(tmp_path / "c", FIG21[:2])
    t = tmp_path / "t.tape"
    FileTape.create(t, 8 * MiB, max_block=256 * KiB)
    cat = tmp_path / "catalog"
    r = cli("backup", cdir, "--tape", f"file:{t}", "--catalog", cat, "--copy-nodes",
            "n1,n2")
    assert r.code == 2 and r.err.strip() == f"sdbackup: error: {TAPE_COPY_NODES}", r.err
    assert "tape write" in r.err
    assert not cat.exists()  # nothing opened, nothing made
    # The engine refuses it too (as the coordinator does for a request with both).
    spec = TapeSpec((f"file:{t}",), cat)
    with pytest.raises(UsageError, match="--copy-nodes with --tape"):
        check_options(replace(SMALL, tape=spec, copier=object()))  # type: ignore[arg-type]
    check_options(replace(SMALL, tape=spec))


def test_read_sources_none_or_conflicting_are_one_line(tmp_path: Path) -> None:
    med, mp = tmp_path / "m", tmp_path / "mp"
    mp.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("00" * 32)
    cases: list[tuple[list[object], str]] = [
        ([], "--tape-server HOST:PORT --secret-file FILE"),
        (["--medium", med, "--tape", "file:/nonexistent"], "not both"),
        (["--medium", med, "--tape-server", "127.0.0.1:1", "--secret-file", secret],
         "not both"),
        (["--tape", "file:/nonexistent", "--tape-server", "127.0.0.1:1"],
         "give no --tape and no --buffer"),
        (["--medium", med, "--secret-file", secret], "--secret-file goes with --tape-server"),
        (["--tape", "file:/nonexistent", "--buffer", tmp_path / "b", "--secret-file",
          secret], "--secret-file goes with --tape-server"),
        (["--medium", med, "--buffer", tmp_path / "b"], "--buffer goes with --tape"),
    ]
    for args, said in cases:
        for cmd in (["restore", "--to", tmp_path / "out"],
                    ["restore-image", "--disk", "d0", "--to", tmp_path / "img"],
                    ["mount", mp]):
            r = cli(*cmd[:1], *args, *cmd[1:])  # type: ignore[arg-type]
            assert r.code == 2, (cmd[0], args, r.code, r.err)
            assert len(r.err.strip().splitlines()) == 1 and said in r.err, \
                (cmd[0], args, r.err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "img").exists()
    r = cli("mount", "--tape", "file:/nonexistent", "--buffer", tmp_path / "b", "--all", mp)
    assert r.code == 2 and "give no --all" in r.err, r.err
