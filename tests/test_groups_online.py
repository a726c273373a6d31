"""A group backup is online and consistent like every backup (b.1 with issue 6).

The coordinator (a real process) runs a group backup while two node processes keep
writing the group's files and others; every block of the group's block list, read
back from the generation, equals the T0 image the engine dumped while frozen, and the
before images logged are only those of the group's blocks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from test_online_backup import Cluster, _seed, _stop, _writers, cluster, sdb

from sdbackup.media.chain import ChainReader
from sdbackup.media.generation import Generation
from sdbackup.media.medium import DiskMedium
from sdbackup.media.snapshot import SnapshotMeta

__all__ = ["cluster"]  # the fixture


def test_online_group_backup_restores_t0(cluster: Cluster, tmp_path: Path) -> None:
    _seed(cluster)
    r = sdb("group", "add", str(cluster.dir), "g", "--include", "f?", "--exclude", "f9")
    assert "selects 9 file(s)" in r.stdout
    stop = tmp_path / "stop"
    ws = _writers(cluster, stop)
    time.sleep(1.0)
    medium = tmp_path / "m"
    r = sdb("backup", str(cluster.dir), "--medium", str(medium), "--group", "g",
            "--log-mode", "central", "--compress", "none", "--json")
    time.sleep(0.3)
    ops = _stop(ws, stop)
    s = json.loads(r.stdout)
    assert min(ops) > 20, f"writers barely ran: {ops}"
    assert s["group"] == "g" and s["log"]["blocks"] > 0
    gen = s["generation"]
    assert "OK" in sdb("verify", "--medium", str(medium), gen).stdout
    med = DiskMedium.open(medium)
    m = med.resolve(gen)
    g = Generation(med, m)
    with SnapshotMeta(g.meta_file(), "test") as snap, ChainReader(med, m) as reader:
        # (the writers delete and create files: what exists at T0 is in the snapshot)
        files = sorted(n.decode() for n in (e.name for e in snap.readdir(1)))
        group = [f for f in files if len(f) == 2 and f != "f9"]
        assert group and set(files) - set(group)  # --meta all lists the others too
        held = 0
        for d in m.disks:
            want = (cluster.t0_dir / gen / f"{d.name}.img").read_bytes()
            view = snap.view_blocks(d.id, d.nblocks)
            bs = m.block_size
            for start, count in view.runs():
                got = reader.read(d.id, start, count)
                assert got == want[start * bs:(start + count) * bs], (d.name, start, count)
                held += count
        assert held == m.blocks > 0
        # the group's block list is what the group's files mapped at T0
        wanted = 0
        for name in group:
            a = snap.lookup(1, name.encode())
            wanted += sum(e.length for e in snap.map_read(a.ino, 0, (a.size + bs - 1) // bs))
        assert wanted == m.blocks
