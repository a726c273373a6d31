"""Dispersed backups (seed a.12, Fig. 27; issue 17): one freeze, one T0, many copiers.

Real processes: the coordinator and two or three node agents; the nodes are the
copiers, each writing its parts to a medium directory of its own, while writer
processes keep overwriting, truncating, deleting and creating files through the nodes
(the copy is slowed by a test hook so that it overlaps the writes). A test hook in the
engine writes the exact T0 image while the cluster is frozen; the images restored from
the generation -- whose parts lie on three or four media -- must equal it, block for
block.

What is proven:

* two and three copiers with separate media: one generation, committed once, parts on
  every copier's medium, listed with their medium and checksums; verify, restore-image,
  restore and restore-cluster read it as one (``--medium A --medium B ...``, or through
  the paths the manifest recorded), and the images equal T0 in central and merged log
  modes;
* a medium missing at restore time is one line naming it, exit 4;
* a copier killed mid-copy: its unfinished part goes to another copier, the freeze is
  not repeated (one T0), and the generation restores T0; with ``--no-reassign`` the
  backup fails (exit 1) and nothing is committed;
* ``sdbackup status`` shows the copy's progress per copier while it runs;
* a dispersed generation goes to tape with ``tape write`` (parts gathered from every
  medium) and restores from it; ``--copy-nodes`` with ``--tape`` (a dispersed copy
  straight to tape) is refused in one line by the command and by the coordinator.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sdbackup.cluster.launch import Proc, start_coordinator, start_node

SDB = [sys.executable, "-m", "sdbackup.cli.main"]

from test_online_backup import WRITER, _stop  # noqa: E402  (the same writers)

BS = 1024


@dataclass
class Cluster:
    dir: Path
    coord: Proc
    nodes: dict[str, Proc]
    t0_dir: Path
    tmp: Path


def sdb(*args: str, check: bool = True, timeout: float = 180
        ) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*SDB, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"sdbackup {' '.join(args)} exited {r.returncode}:\n{r.stderr}")
    return r


def _make(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...],
          delay: str) -> Iterator[Cluster]:
    cdir = tmp_path / "c"
    sdb("init", str(cdir), "--block-size", str(BS),
        "--disk", f"d0={tmp_path}/d0.img:48MiB", "--disk", f"d1={tmp_path}/d1.img:48MiB")
    t0_dir = tmp_path / "t0"
    monkeypatch.setenv("SDBACKUP_TEST_T0_IMAGE_DIR", str(t0_dir))
    monkeypatch.setenv("SDBACKUP_TEST_COPY_DELAY", delay)
    coord = start_coordinator(cdir, lease=3.0)
    nodes: dict[str, Proc] = {}
    try:
        for n in names:
            nodes[n] = start_node(cdir, n, cache_size="8MiB", flush_delay=0.2)
        yield Cluster(cdir, coord, nodes, t0_dir, tmp_path)
    finally:
        for p in nodes.values():
            p.kill()
        coord.stop()


@pytest.fixture
def two(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    yield from _make(tmp_path, monkeypatch, ("n1", "n2"), "0.05")


@pytest.fixture
def three(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    yield from _make(tmp_path, monkeypatch, ("n1", "n2", "n3"), "0.05")


def _seed(c: Cluster, files: int = 12) -> None:
    data = c.tmp / "seed.bin"
    for i in range(files):
        data.write_bytes(os.urandom(3 << 20))
        sdb("fs", str(c.dir), "put", "--node", "n1", str(data), f"/f{i}")


def _writers(c: Cluster, stop: Path, names: tuple[str, ...] = ("n1", "n2")
             ) -> list[subprocess.Popen[str]]:
    return [subprocess.Popen([sys.executable, "-c", WRITER, str(c.dir), n, str(i), str(stop)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i, n in enumerate(names)]


def _media_args(c: Cluster, names: tuple[str, ...]) -> list[str]:
    args = ["--medium", str(c.tmp / "m0")]
    for n in names:
        args += ["--medium", f"{n}={c.tmp / ('m-' + n)}"]
    return args


def _check_restores_t0(c: Cluster, media: list[str], gen: str, tag: str = "") -> None:
    for disk in ("d0", "d1"):
        img = c.tmp / f"restored-{gen}-{disk}{tag}.img"
        sdb("restore-image", *media, gen, "--disk", disk, "--to", str(img))
        want = (c.t0_dir / gen / f"{disk}.img").read_bytes()
        got = img.read_bytes()
        assert len(got) == len(want)
        if got != want:
            bad = [i for i in range(0, len(want), BS) if got[i:i + BS] != want[i:i + BS]]
            raise AssertionError(f"{disk}: {len(bad)} blocks differ from T0, first "
                                 f"{[b // BS for b in bad[:10]]}")
        img.unlink()


def _backup(c: Cluster, names: tuple[str, ...], *extra: str, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
    return sdb("backup", str(c.dir), *_media_args(c, names), "--copy-nodes", ",".join(names),
               "--compress", "none", "--json", *extra, check=check)


def _manifest_media(parts: list[dict[str, str]]) -> list[tuple[str, str]]:
    """(medium id, node) of each part."""
    return [(p["medium"], p["node"]) for p in parts]


def _manifest(medium: Path, gen: str) -> dict[str, object]:
    data: dict[str, object] = json.loads(
        (medium / "generations" / gen / "manifest.json").read_text())
    return data


@pytest.mark.parametrize("mode", ["central", "merged"])
def test_two_copiers_separate_media_restore_t0_with_writers(two: Cluster, mode: str) -> None:
    c = two
    _seed(c)
    stop = c.tmp / "stop"
    ws = _writers(c, stop)
    time.sleep(1.0)  # the writers are busy and the caches dirty
    r = _backup(c, ("n1", "n2"), "--log-mode", mode, "--part-size", "4MiB")
    time.sleep(0.3)
    ops = _stop(ws, stop)
    s = json.loads(r.stdout)
    assert min(ops) > 20, f"writers barely ran: {ops}"
    assert s["log"]["blocks"] > 0, "no write needed a before image: the test proves nothing"
    gen = s["generation"]
    m = _manifest(c.tmp / "m0", gen)
    parts = m["parts"]
    assert isinstance(parts, list) and len(parts) >= 2
    # Every part is on its copier's own medium; the generation is committed once, on m0.
    by_node = {p["node"] for p in parts}
    assert by_node == {"n1", "n2"}, f"a copier did no part: {by_node}"
    for p in parts:
        label = json.loads((c.tmp / f"m-{p['node']}" / "sdbackup-medium.json").read_text())
        assert p["medium"] == label["medium_id"]
        assert (c.tmp / f"m-{p['node']}" / p["file"]).is_file()
        assert m["streams"][p["stream"]]["digest"]  # type: ignore[index]
    assert set(m["media"]) == {p["medium"] for p in parts}  # type: ignore[arg-type]
    assert not list((c.tmp / "m-n1").glob("generations/*")), "a part medium holds a generation"
    assert len(os.listdir(c.t0_dir)) == 1  # one T0
    media = [*_media_args(c, ()), "--medium", str(c.tmp / "m-n1"),
             "--medium", str(c.tmp / "m-n2")]
    assert "OK" in sdb("verify", *media, gen).stdout
    _check_restores_t0(c, media, gen)
    # Without the other media named: found where the manifest says the copiers wrote.
    assert "OK" in sdb("verify", "--medium", str(c.tmp / "m0"), gen).stdout


def test_three_copiers_whole_disks_and_restore_cluster(three: Cluster) -> None:
    c = three
    _seed(c, files=6)
    stop = c.tmp / "stop"
    ws = _writers(c, stop, ("n1", "n2", "n3"))
    time.sleep(0.8)
    r = _backup(c, ("n1", "n2", "n3"), "--log-mode", "central", "--part-size", "2MiB")
    ops = _stop(ws, stop)
    assert min(ops) > 5, ops
    s = json.loads(r.stdout)
    gen = s["generation"]
    parts = _manifest(c.tmp / "m0", gen)["parts"]
    assert isinstance(parts, list)
    assert {p["node"] for p in parts} == {"n1", "n2", "n3"}
    media = ["--medium", str(c.tmp / "m0"),
             *(x for n in ("n1", "n2", "n3") for x in ("--medium", str(c.tmp / f"m-{n}")))]
    _check_restores_t0(c, media, gen)
    # Whole disks (Fig. 27): one part per disk.
    r2 = _backup(c, ("n1", "n2", "n3"), "--split", "disks")
    g2 = json.loads(r2.stdout)["generation"]
    parts2 = _manifest(c.tmp / "m0", g2)["parts"]
    assert isinstance(parts2, list) and len(parts2) == 2
    new = c.tmp / "restored-cluster"
    sdb("restore-cluster", *media, g2, "--to", str(new))
    assert (new / "cluster.toml").exists()


def test_a_missing_medium_is_named_in_one_line(two: Cluster) -> None:
    c = two
    _seed(c, files=4)
    s = json.loads(_backup(c, ("n1", "n2"), "--part-size", "2MiB").stdout)
    gen = s["generation"]
    m = _manifest(c.tmp / "m0", gen)
    gone = c.tmp / "m-n2"
    mid = json.loads((gone / "sdbackup-medium.json").read_text())["medium_id"]
    gone.rename(c.tmp / "elsewhere")
    img = c.tmp / "x.img"
    for args in (["restore-image", "--medium", str(c.tmp / "m0"), gen, "--disk", "d0",
                  "--to", str(img)],
                 ["verify", "--medium", str(c.tmp / "m0"), "--medium", str(c.tmp / "m-n1"),
                  gen],
                 ["restore", "--medium", str(c.tmp / "m0"), gen, "--to", str(c.tmp / "r")]):
        r = sdb(*args, check=False)
        assert r.returncode == 4, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert mid in lines[0] and "n2" in lines[0] and str(gone) in lines[0], lines[0]
    assert isinstance(m["media"], dict) and mid in m["media"]
    # Given where it is now, the generation reads as one again.
    media = ["--medium", str(c.tmp / "m0"), "--medium", str(c.tmp / "elsewhere")]
    assert "OK" in sdb("verify", *media, gen).stdout
    shutil.rmtree(c.tmp / "r", ignore_errors=True)
    sdb("restore", *media, gen, "--to", str(c.tmp / "r"))
    assert (c.tmp / "r" / "f0").stat().st_size == 3 << 20
    # What 'sdbackup mount --medium A --medium B' serves (without FUSE here): the same
    # bytes as the restore, and without B the one-line error before anything is served.
    from sdbackup.errors import MediumMissing
    from sdbackup.restore.mount import open_generation

    src = open_generation([c.tmp / "m0", c.tmp / "elsewhere"], gen)
    try:
        for name in ("f0", "f3"):
            a = src.fs.resolve(f"/{name}")
            assert src.fs.read(a.ino, 0, a.size) == (c.tmp / "r" / name).read_bytes()
    finally:
        src.close()
    with pytest.raises(MediumMissing, match=mid):
        open_generation([c.tmp / "m0"], gen).close()
    if os.path.exists("/dev/fuse"):  # the command itself: the error before mounting
        (c.tmp / "mnt").mkdir()
        r = sdb("mount", "--medium", str(c.tmp / "m0"), gen, str(c.tmp / "mnt"), check=False)
        assert r.returncode == 4 and mid in r.stderr, r.stderr


@pytest.fixture
def slow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    yield from _make(tmp_path, monkeypatch, ("n1", "n2", "n3"), "0.4")


def _start_backup(c: Cluster, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*SDB, "backup", str(c.dir), *_media_args(c, ("n1", "n2")), "--copy-nodes", "n1,n2",
         "--compress", "none", "--json", "--log-mode", "central", "--part-size", "1MiB",
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_copying(c: Cluster, node: str) -> dict[str, object]:
    """The status of the running dispersed backup once ``node`` has finished a part
    and copies the next one (per-copier progress as 'sdbackup status' shows it)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = json.loads(sdb("status", str(c.dir), "--json").stdout)
        d = st.get("dispersed")
        if isinstance(d, dict):
            me = next((x for x in d["copiers"] if x["node"] == node), None)
            if me is not None and me["parts_done"] >= 1 and me["state"] == "copying":
                text = sdb("status", str(c.dir)).stdout
                assert f"copier {node}" in text and "parts done" in text, text
                return d
        time.sleep(0.2)
    raise AssertionError("the copier never got to its second part")


def test_a_copier_killed_mid_copy_loses_its_part_to_another(slow: Cluster) -> None:
    c = slow
    _seed(c, files=8)
    stop = c.tmp / "stop"
    ws = _writers(c, stop, ("n1", "n3"))  # n2 only copies: killing it stops no writer
    time.sleep(0.5)
    b = _start_backup(c)
    d = _wait_copying(c, "n2")
    assert d["bytes_done"] > 0 and d["parts"] >= 4  # type: ignore[operator]
    c.nodes["n2"].kill()
    out, err = b.communicate(timeout=240)
    ops = _stop(ws, stop)
    assert b.returncode == 0, err
    assert min(ops) > 5, ops
    s = json.loads(out)
    gen = s["generation"]
    assert len(os.listdir(c.t0_dir)) == 1, "the freeze was repeated"
    dis = s["dispersed"]
    assert "failed" in dis["copiers"]["n2"], dis
    assert dis["reassigned"] and all(r["from"] == "n2" for r in dis["reassigned"])
    parts = _manifest(c.tmp / "m0", gen)["parts"]
    assert isinstance(parts, list)
    redone = {r["stream"] for r in dis["reassigned"]}
    for p in parts:
        if p["stream"] in redone:
            assert p["node"] == "n1" and p["attempt"] >= 1 and ".try" in p["file"], p
    assert any(p["node"] == "n2" for p in parts), "n2's finished part was not kept"
    media = [*_media_args(c, ()), "--medium", str(c.tmp / "m-n1"),
             "--medium", str(c.tmp / "m-n2")]
    # n2's part in flight when it died is named by no manifest: gc removes that file
    # and nothing the generation reads.
    n2_dir = c.tmp / "m-n2" / "parts" / gen
    named = {p["file"].rpartition("/")[2] for p in parts if p["node"] == "n2"}
    stale = {f.name for f in n2_dir.glob("*.sdr")} - named
    assert stale, f"n2 left no unfinished part: {sorted(os.listdir(n2_dir))}"
    out_gc = sdb("gc", *media).stdout
    assert {f.name for f in n2_dir.glob("*.sdr")} == named, out_gc
    assert "a lost copier's attempt" in out_gc and all(f in out_gc for f in stale), out_gc
    assert "OK" in sdb("verify", *media, gen).stdout
    _check_restores_t0(c, media, gen)

    # Removing the generation (prune, after a newer one) removes its parts on the other
    # media given; a medium that is not here is one line, and the removal is complete
    # on the first medium all the same; gc removes those parts once that medium is back.
    sdb("backup", str(c.dir), "--medium", str(c.tmp / "m0"), "--compress", "none")
    away = c.tmp / "m-n2-away"
    (c.tmp / "m-n2").rename(away)
    r = sdb("prune", "--medium", str(c.tmp / "m0"), "--medium", str(c.tmp / "m-n1"),
            "--keep-last", "1")
    assert f"removed {gen}" in r.stdout, r.stdout
    warn = r.stderr.strip().splitlines()
    n2_medium = next(m for m, i in _manifest_media(parts) if i == "n2")
    assert len(warn) == 1 and n2_medium in warn[0] and "n2" in warn[0], r.stderr
    assert not (c.tmp / "m0" / "generations" / gen).exists()
    assert not (c.tmp / "m-n1" / "parts" / gen).exists()
    assert (away / "parts" / gen).is_dir()
    r = sdb("gc", "--medium", str(c.tmp / "m0"), "--medium", str(away))
    assert f"removed parts/{gen}/ on {away}" in r.stdout, r.stdout
    assert not (away / "parts" / gen).exists()


def test_no_reassign_fails_the_backup_cleanly(slow: Cluster) -> None:
    c = slow
    _seed(c, files=6)
    b = _start_backup(c, "--no-reassign")
    _wait_copying(c, "n2")
    c.nodes["n2"].kill()
    out, err = b.communicate(timeout=240)
    assert b.returncode == 1, (out, err)
    line = err.strip().splitlines()
    assert len(line) == 1 and "n2" in line[0] and "--no-reassign" in line[0], err
    assert "not committed" in line[0], line[0]
    gens = c.tmp / "m0" / "generations"
    (g,) = list(gens.iterdir())
    assert not (g / "manifest.json").exists() and (g / "FAILED").exists()
    assert "n2" in (g / "FAILED").read_text()
    # n1 removed what it wrote for the failed backup.
    assert not list((c.tmp / "m-n1").glob("parts/*/*.sdr"))
    r = sdb("generations", "--medium", str(c.tmp / "m0"), "--json", check=False)
    assert json.loads(r.stdout) == [] or "[]" in r.stdout
    # n2 died with its parts on its medium: they belong to no generation. gc of that
    # medium alone cannot tell and keeps them; with the first medium it removes them
    # (and the failed generation), and says so.
    left = c.tmp / "m-n2" / "parts" / g.name
    assert list(left.glob("*.sdr")), "n2 left no part: the test proves nothing"
    r = sdb("gc", "--medium", str(c.tmp / "m-n2"))
    assert left.is_dir() and "which was not given" in r.stdout, r.stdout
    r = sdb("gc", "--medium", str(c.tmp / "m0"), "--medium", str(c.tmp / "m-n1"),
            "--medium", str(c.tmp / "m-n2"))
    assert not left.exists() and not g.exists(), r.stdout
    assert f"removed parts/{g.name}/ on {c.tmp / 'm-n2'}" in r.stdout, r.stdout
    assert f"removed unfinished generation {g.name}" in r.stdout, r.stdout


# -- with the other features of the same release: file groups (issue 15), tape (issue 16)


def test_group_backup_copied_by_two_nodes(two: Cluster) -> None:
    """``backup --group G --copy-nodes ...``: the group's block list at T0 cut into parts;
    the generation is a group generation (own chain, ``NotInBackupError`` outside) whose
    parts lie on two media, and its incremental follows the group's chain."""
    from sdbackup.media.chain import ChainReader
    from sdbackup.media.generation import Generation
    from sdbackup.media.media_set import open_media
    from sdbackup.media.snapshot import SnapshotMeta

    c = two
    _seed(c, files=8)
    r = sdb("group", "add", str(c.dir), "g", "--include", "f?", "--exclude", "f7")
    assert "selects 7 file(s)" in r.stdout, r.stdout
    stop = c.tmp / "stop"
    ws = _writers(c, stop)
    time.sleep(0.8)
    r = _backup(c, ("n1", "n2"), "--group", "g", "--log-mode", "central",
                "--part-size", "2MiB")
    ops = _stop(ws, stop)
    assert min(ops) > 5, ops
    s = json.loads(r.stdout)
    gen = s["generation"]
    assert s["group"] == "g"
    m = _manifest(c.tmp / "m0", gen)
    parts = m["parts"]
    assert isinstance(parts, list) and {p["node"] for p in parts} == {"n1", "n2"}
    assert m["group"] == "g" and isinstance(m["group_spec"], dict)
    media = [*_media_args(c, ()), "--medium", str(c.tmp / "m-n1"),
             "--medium", str(c.tmp / "m-n2")]
    assert "OK" in sdb("verify", *media, gen).stdout
    med = open_media([c.tmp / "m0", c.tmp / "m-n1", c.tmp / "m-n2"])
    man = med.resolve(gen)
    g = Generation(med, man)
    with SnapshotMeta(g.meta_file(), "test") as snap, ChainReader(med, man) as reader:
        held = 0
        for d in man.disks:
            want = (c.t0_dir / gen / f"{d.name}.img").read_bytes()
            for start, count in snap.view_blocks(d.id, d.nblocks).runs():
                got = reader.read(d.id, start, count)
                assert got == want[start * BS:(start + count) * BS], (d.name, start, count)
                held += count
        assert held == man.blocks > 0
        # A regular file with blocks outside the group (an empty or sparse file or a
        # directory restores without reading a block, so it cannot be refused).
        # Outside the group: "f7" (excluded) and any name "f?" does not match (the
        # writers make files such as f9, which are in it, and f11, which is not).
        outside = [e.name.decode() for e in snap.readdir(1)
                   if (e.name == b"f7" or len(e.name) != 2)
                   and e.attr.is_reg and e.attr.blocks > 0]
    assert outside, "no file with data outside the group at T0: the test proves nothing"
    r = sdb("restore", *media, gen, f"/{outside[0]}", "--to", str(c.tmp / "r-out"),
            check=False)
    assert r.returncode == 4 and "outside group g" in r.stderr, r.stderr
    # An incremental of the group, copied dispersed too, follows the group's chain.
    sdb("fs", str(c.dir), "put", "--node", "n1", str(c.tmp / "seed.bin"), "/f3")
    s2 = json.loads(_backup(c, ("n1", "n2"), "--group", "g", "--incremental",
                            "--part-size", "2MiB").stdout)
    m2 = _manifest(c.tmp / "m0", s2["generation"])
    assert m2["parent"] == gen and m2["group"] == "g"
    sdb("restore", *media, s2["generation"], "/f3", "--to", str(c.tmp / "r-inc"))
    assert (c.tmp / "r-inc" / "f3").read_bytes() == (c.tmp / "seed.bin").read_bytes()


def test_dispersed_generation_to_tape_and_back(two: Cluster) -> None:
    """``tape write`` gathers a dispersed generation's parts from every medium given
    (each becomes the tape part stream-N.sdr); restores from tape read T0."""
    from sdbackup.media.tape.filetape import FileTape

    c = two
    _seed(c, files=4)
    s = json.loads(_backup(c, ("n1", "n2"), "--part-size", "2MiB").stdout)
    gen = s["generation"]
    parts = _manifest(c.tmp / "m0", gen)["parts"]
    assert isinstance(parts, list) and {p["node"] for p in parts} == {"n1", "n2"}
    tape = c.tmp / "t1.tape"
    FileTape.create(tape, 256 << 20)
    catalog = c.tmp / "catalog"
    media = [*_media_args(c, ()), "--medium", str(c.tmp / "m-n1"),
             "--medium", str(c.tmp / "m-n2")]
    r = sdb("tape", "write", *media, "--tape", f"file:{tape}", "--catalog", str(catalog),
            "--json")
    assert json.loads(r.stdout)["written"] == [gen]
    tape_args = ["--tape", f"file:{tape}", "--buffer", str(c.tmp / "buf"),
                 "--catalog", str(catalog)]
    for disk in ("d0", "d1"):
        img = c.tmp / f"from-tape-{disk}.img"
        sdb("restore-image", *tape_args, gen, "--disk", disk, "--to", str(img))
        assert img.read_bytes() == (c.t0_dir / gen / f"{disk}.img").read_bytes(), disk
    # --medium and --tape exclude each other; neither is one line, exit 2.
    r = sdb("restore", *media, *tape_args, gen, "--to", str(c.tmp / "x"), check=False)
    assert r.returncode == 2 and "not both" in r.stderr, r.stderr
    r = sdb("restore", gen, "--to", str(c.tmp / "x"), check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--medium DIR" in r.stderr
    # A dispersed copy straight to tape is refused in one line (the copiers write parts
    # to disk media): by the command, and by the coordinator for a request with both.
    r = sdb("backup", str(c.dir), "--copy-nodes", "n1,n2", "--tape", f"file:{tape}",
            "--catalog", str(catalog), check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--copy-nodes with --tape" in r.stderr and "tape write" in r.stderr
    from sdbackup.cluster.access import try_coordinator_client
    from sdbackup.errors import UsageError
    from sdbackup.net import messages as msg

    rc = try_coordinator_client(c.dir)
    assert rc is not None
    with rc, pytest.raises(UsageError, match="--copy-nodes with --tape"):
        msg.call(rc, msg.Backup("", copy_nodes=("n1", "n2"), tapes=(f"file:{tape}",),
                                catalog=str(catalog)), timeout=30)
    from sdbackup.media.tape.catalog import TapeCatalog

    cat = TapeCatalog(catalog)
    assert [cat.generation_ids(x) for x in cat.sets()] == [[gen]]  # nothing more made
