"""``sdbackup gc`` and parts of dispersed backups left on copiers' media (issue 17).

A copier writes its parts to ``MEDIUM/parts/<GEN>/`` with an origin file naming the
medium that commits the generation. ``gc --medium FIRST --medium COPIER ...`` judges
each such directory where its generation is committed: removed when the generation
failed, crashed or is gone; kept while a backup writes it (its generation's lock),
when it is committed, and whenever the medium that could tell is not given. The
process tests with real copiers are in tests/test_dispersed.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sdbackup.media.media_set import gc_parts, open_media
from sdbackup.media.medium import DiskMedium, new_generation_id

CID = "c0ffee00-0000-4000-8000-000000000001"


def _gc(*media: Path) -> subprocess.CompletedProcess[str]:
    args = [a for m in media for a in ("--medium", str(m))]
    return subprocess.run([sys.executable, "-m", "sdbackup.cli.main", "gc", *args],
                          capture_output=True, text=True, timeout=60)


def test_gc_keeps_parts_of_a_running_backup_and_removes_them_once_it_failed(
        tmp_path: Path) -> None:
    m0 = DiskMedium.open_for_backup(tmp_path / "m0", CID)
    m1 = DiskMedium.open_for_backup(tmp_path / "m1", CID)
    pending = m0.begin()  # a backup writing its generation (holds its lock)
    d = m1.parts_dir(pending.id, m0.medium_id)
    (d / "stream-2.sdr").write_bytes(b"part")
    # Another generation's parts, from a medium that is not given: kept, and said so.
    other = m1.parts_dir(new_generation_id(), "5e1f0000-0000-4000-8000-00000000beef")
    (other / "stream-3.sdr").write_bytes(b"part")

    r = _gc(m0.root, m1.root)
    assert r.returncode == 0, r.stderr
    assert (d / "stream-2.sdr").exists() and (other / "stream-3.sdr").exists()
    assert f"a backup is writing generation {pending.id}" in r.stdout, r.stdout
    assert "5e1f0000-0000-4000-8000-00000000beef, which was not given" in r.stdout
    # The copier's medium alone cannot tell: nothing is removed.
    r = _gc(m1.root)
    assert r.returncode == 0 and (d / "stream-2.sdr").exists(), r.stdout
    assert f"on medium {m0.medium_id}, which was not given" in r.stdout

    pending.fail("a copier died")  # the backup is over, never committed
    r = _gc(m1.root, m0.root)  # any order: the origin names the first medium
    assert r.returncode == 0, r.stderr
    assert not d.exists() and (other / "stream-3.sdr").exists()
    assert f"removed parts/{pending.id}/ on {m1.root} (generation {pending.id} failed " \
           "or was never committed)" in r.stdout, r.stdout
    # Generations are collected on the first medium given.
    assert (m0.generations_dir / pending.id).exists()
    assert f"removed unfinished generation {pending.id}" in _gc(m0.root).stdout
    assert not (m0.generations_dir / pending.id).exists()


def test_gc_dry_run_and_a_directory_without_origin(tmp_path: Path) -> None:
    m0 = DiskMedium.open_for_backup(tmp_path / "m0", CID)
    m1 = DiskMedium.open_for_backup(tmp_path / "m1", CID)
    pending = m0.begin()
    pending.fail("aborted")
    gid = pending.id
    bare = m1.root / "parts" / gid  # as a copier before origins wrote it
    bare.mkdir(parents=True)
    (bare / "stream-0.sdr").write_bytes(b"x")
    unknown = m1.root / "parts" / new_generation_id()
    unknown.mkdir()
    med = open_media([m0.root, m1.root])
    sweeps = {w.generation: w for w in gc_parts(med, dry_run=True)}
    assert sweeps[gid].removed == [f"parts/{gid}/stream-0.sdr", f"parts/{gid}/"]
    assert bare.exists()  # dry run
    assert "on none of the media given" in sweeps[unknown.name].why
    r = subprocess.run([sys.executable, "-m", "sdbackup.cli.main", "gc", "--medium",
                        str(m0.root), "--medium", str(m1.root), "--json"],
                       capture_output=True, text=True, timeout=60, check=True)
    out = json.loads(r.stdout)
    assert out["removed"] == [gid]
    assert [p["generation"] for p in out["parts"] if p["removed"]] == [gid]
    assert not bare.exists() and unknown.exists()
