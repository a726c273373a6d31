"""An online backup with a separate before-image log, to tape (a.5, a.6, Fig. 38).

Writers on two node processes overwrite files during the whole copy, so the log
medium really holds before images; ``sdbackup tape write --log-medium`` overlays the
log onto the generation first and then writes it to tape. The images restored from
tape -- here and on another host's view through ``sdbackup tape serve`` -- equal the
exact T0 images the engine's test hook wrote while the cluster was frozen, with the
log medium gone."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from test_online_backup import Cluster, _seed, _stop, _writers, cluster, sdb  # noqa: F401
from test_tape_remote import start_server

from sdbackup.media.medium import DiskMedium


def _check_image(c: Cluster, gen: str, disk: str, img: Path) -> None:
    want = (c.t0_dir / gen / f"{disk}.img").read_bytes()
    got = img.read_bytes()
    assert len(got) == len(want)
    if got != want:
        bs = 1024
        bad = [i // bs for i in range(0, len(want), bs) if got[i:i + bs] != want[i:i + bs]]
        raise AssertionError(f"{disk} from tape: {len(bad)} blocks differ from T0, first "
                             f"{bad[:10]}")


def test_separate_log_generation_overlaid_then_on_tape_restores_t0(
        cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    _seed(cluster)
    stop = tmp_path / "stop"
    ws = _writers(cluster, stop)
    time.sleep(1.0)  # the writers are busy and the caches dirty
    medium, lm = tmp_path / "m", tmp_path / "lm"
    r = sdb("backup", str(cluster.dir), "--medium", str(medium), "--log-mode", "separate",
            "--log-medium", str(lm), "--compress", "none", "--json")
    ops = _stop(ws, stop)
    s = json.loads(r.stdout)
    assert min(ops) > 20, f"writers barely ran: {ops}"
    assert s["log"]["mode"] == "separate"
    assert s["log"]["blocks"] > 0, "no write needed a before image: the test proves nothing"
    gen = s["generation"]
    before = DiskMedium.open(medium).read_manifest(gen)
    assert before.extra["log"]["overlaid"] is False

    tape = tmp_path / "t.tape"
    catalog = tmp_path / "catalog"
    sdb("tape", "create", f"file:{tape}", "--capacity", "512MiB")
    w = json.loads(sdb("tape", "write", "--medium", str(medium), "--log-medium", str(lm),
                       "--tape", f"file:{tape}", "--catalog", str(catalog), "--json").stdout)
    assert w["written"] == [gen]
    # Overlaid first (Fig. 38): the generation on disk and on tape needs no log.
    after = DiskMedium.open(medium).read_manifest(gen)
    assert after.extra["log"]["overlaid"] is True
    assert after.index.name != before.index.name  # the overlay wrote a new index
    lm.rename(tmp_path / "lm-gone")

    for disk in ("d0", "d1"):
        img = tmp_path / f"tape-{disk}.img"
        sdb("restore-image", "--tape", f"file:{tape}", "--buffer", str(tmp_path / "buf"),
            "--catalog", str(catalog), gen, "--disk", disk, "--to", str(img))
        _check_image(cluster, gen, disk, img)

    # The same generation read on a host without the drive, through the tape server.
    secret = cluster.dir / "secret"
    srv = start_server([tape], tmp_path / "srv-buf", catalog, secret,
                       tmp_path / "server.log")
    try:
        img = tmp_path / "remote-d1.img"
        sdb("restore-image", "--tape-server", srv.addr, "--secret-file", str(secret), gen,
            "--disk", "d1", "--to", str(img))
        _check_image(cluster, gen, "d1", img)
    finally:
        assert srv.stop() == 0, srv.output()[-2000:]
    assert hashlib.sha256(img.read_bytes()).digest() == \
        hashlib.sha256((tmp_path / "tape-d1.img").read_bytes()).digest()


# -- a backup straight to tape (Fig. 36) ------------------------------------------------------


def test_online_backup_straight_to_tape_spans_two_tapes_and_restores_t0(
        cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    """``backup --tape --log-mode separate``: the copy streams to tape through the
    spool while the writers go on, the before images go to the log medium and are
    appended to the tape at the end; no disk medium exists. The first tape is too small:
    the set continues on the second. The catalog rebuilt from the two tapes alone
    finds the generation (the streamed part's size from the manifest), and both disks
    restored from tape equal the exact T0 images with the log medium gone."""
    _seed(cluster)
    t1, t2 = tmp_path / "t1.tape", tmp_path / "t2.tape"
    sdb("tape", "create", f"file:{t1}", "--capacity", "4MiB")  # 2 MiB before early warning
    sdb("tape", "create", f"file:{t2}", "--capacity", "512MiB")
    catalog, lm, spool = tmp_path / "catalog", tmp_path / "lm", tmp_path / "spool"
    stop = tmp_path / "stop"
    ws = _writers(cluster, stop)
    time.sleep(1.0)  # the writers are busy and the caches dirty
    r = sdb("backup", str(cluster.dir), "--tape", f"file:{t1}", "--tape", f"file:{t2}",
            "--catalog", str(catalog), "--spool", str(spool), "--spool-size", "2MiB",
            "--log-mode", "separate", "--log-medium", str(lm), "--compress", "none",
            "--json")
    ops = _stop(ws, stop)
    s = json.loads(r.stdout)
    assert min(ops) > 20, f"writers barely ran: {ops}"
    gen = s["generation"]
    assert s["log"]["mode"] == "separate" and s["log"]["overlaid"] is True
    assert s["log"]["blocks"] > 0, "no write needed a before image: the test proves nothing"
    assert (lm / f"{gen}.bilog").exists()  # the before images went to the log medium
    tape = s["tape"]
    assert len(tape["tapes"]) == 2, f"the set should span two tapes: {tape}"
    assert tape["spool"]["bytes"] == 2 << 20 and tape["spool"]["bursts"] >= 1
    assert list(spool.iterdir()) == []  # the spool is a temporary file, gone
    assert tape["bytes_written"] > s["stored_bytes"]

    # The generation as committed in the catalog: the log is its stream 1, named by the
    # index (overlaid at the commit), so nothing else is needed to restore T0.
    set_dir = catalog / tape["set"]
    m = DiskMedium.open(set_dir).read_manifest(gen)
    assert [x.name for x in m.streams] == ["stream-0.sdr", "stream-1.sdr"]
    assert m.streams[1].bytes == s["log"]["bytes"] and m.streams[1].records > 1
    assert not (set_dir / "generations" / gen / "stream-0.sdr").exists()
    placement = json.loads((set_dir / "generations" / gen / "tape.json").read_bytes())
    parts = placement["parts"]
    assert list(parts) == ["stream-0.sdr", "stream-1.sdr", "index", "meta.db",
                           "manifest.json"]
    assert {p["sequence"] for p in parts["stream-0.sdr"]} == {1, 2}  # spanned

    # On tape the streamed part's headers carry no size (it was not known yet).
    ls = json.loads(sdb("tape", "ls", "--tape", f"file:{t1}", "--tape", f"file:{t2}",
                        "--json").stdout)
    sizes = {(f["part"], f["part_bytes"]) for t in ls for f in t["files"]}
    assert ("stream-0.sdr", None) in sizes and ("manifest.json", None) not in sizes

    # The tapes alone: no catalog, no log medium, no disk medium.
    lm.rename(tmp_path / "lm-gone")
    catalog.rename(tmp_path / "catalog-gone")
    cat2 = tmp_path / "catalog2"
    rb = json.loads(sdb("tape", "catalog", "--rebuild", "--tape", f"file:{t1}", "--tape",
                        f"file:{t2}", "--catalog", str(cat2), "--json").stdout)
    assert rb["generations"] == [gen] and rb["incomplete"] == []
    again = json.loads((cat2 / tape["set"] / "generations" / gen / "tape.json").read_bytes())
    assert again == placement  # the pieces rebuilt exactly, sizes clipped by the manifest
    for disk in ("d0", "d1"):
        img = tmp_path / f"tape-{disk}.img"
        sdb("restore-image", "--tape", f"file:{t1}", "--tape", f"file:{t2}", "--buffer",
            str(tmp_path / "buf"), "--catalog", str(cat2), gen, "--disk", disk, "--to",
            str(img))
        _check_image(cluster, gen, disk, img)
