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
