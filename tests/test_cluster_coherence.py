"""Coherence under concurrency: three node processes write overlapping ranges of the
same files with self-checking records while others read (issue 3, "Tests").

Every read record must be intact (never torn), really written, and never older than a
write acknowledged before the read began; afterwards every slot holds a write that no
acknowledged write followed, and no acknowledged write is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:  # tests/ as a plain directory of modules...
    from cluster_helpers import (
        RECORD,
        ClusterProcs,
        check_final,
        check_reads,
        embedded_file,
        initial_content,
        read_file_via,
        read_log,
        start_worker,
        write_file_via,
        writes_by_slot,
    )
except ModuleNotFoundError:  # ...or as a package (with tests/__init__.py)
    from tests.cluster_helpers import (
        RECORD,
        ClusterProcs,
        check_final,
        check_reads,
        embedded_file,
        initial_content,
        read_file_via,
        read_log,
        start_worker,
        write_file_via,
        writes_by_slot,
    )

SEG_RECORDS = (1 << 20) // RECORD


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ClusterProcs]:
    c = ClusterProcs(tmp_path)
    try:
        yield c
    finally:
        c.cleanup()


def _run(cp: ClusterProcs, tmp_path: Path, *, nfiles: int, nslots: int, slots: list[int],
         writers: list[tuple[str, list[int]]], readers: list[str], duration: float,
         run: int) -> dict[str, Any]:
    files = [f"/f{i}" for i in range(nfiles)]
    for i, f in enumerate(files):
        write_file_via(cp.dir, "n1", f, initial_content(i, nslots), fsync=True)
    procs = []
    logs: list[Path] = []
    for k, (node, wslots) in enumerate(writers, start=1):
        out = tmp_path / f"w{k}.jsonl"
        logs.append(out)
        procs.append(start_worker(cp, f"writer{k}", {
            "cluster": str(cp.dir), "node": node, "role": "writer", "id": k, "files": files,
            "slots": wslots, "nslots": nslots, "run": run, "duration": duration, "seed": k,
            "fsync_every": 7, "out": str(out)}))
    for k, node in enumerate(readers, start=101):
        out = tmp_path / f"r{k}.jsonl"
        logs.append(out)
        procs.append(start_worker(cp, f"reader{k}", {
            "cluster": str(cp.dir), "node": node, "role": "reader", "id": k, "files": files,
            "slots": slots, "nslots": nslots, "run": run, "duration": duration, "seed": k,
            "out": str(out)}))
    for p in procs:
        rc = p.wait(duration + 60)
        assert rc == 0, f"{p.name} failed:\n{p.output()[-3000:]}"
    entries = [e for path in logs for e in read_log(path)]
    errors = [e for e in entries if e["op"] == "err"]
    assert not errors, f"workers saw errors: {errors[:5]}"
    writes = writes_by_slot(entries)
    nwrites = sum(1 for e in entries if e["op"] == "w")
    nreads = check_reads(writes, [e for e in entries if e["op"] == "r"])
    # Final state through every node (before any flush), then on disk.
    for node in sorted({n for n, _ in writers} | set(readers)):
        content = {i: read_file_via(cp.dir, node, f) for i, f in enumerate(files)}
        check_final(writes, content, nslots)
    cp.flush()
    assert not [r for r in cp.cache_table() if r["dirty"]]
    for p in cp.nodes.values():
        assert p.stop() == 0
    assert cp.coordinator is not None and cp.coordinator.stop() == 0
    content = {i: embedded_file(cp.dir, f) for i, f in enumerate(files)}
    written = check_final(writes, content, nslots)
    cp.assert_no_tracebacks()
    return {"writes": nwrites, "reads": nreads, "slots_written": written}


def test_overlapping_writers_and_readers_on_three_nodes(cp: ClusterProcs,
                                                       tmp_path: Path) -> None:
    """Hot spots around segment boundaries; writes of 1-3 records (some across blocks
    and segments), fsync now and then; one writer and one reader on every node."""
    cp.start_coordinator(lease=3.0)
    for n in ("n1", "n2", "n3"):
        cp.start_node(n, flush_delay=0.5)
    nslots = 3 * SEG_RECORDS + 64
    hot = sorted({b + d for b in (0, SEG_RECORDS, 2 * SEG_RECORDS, 3 * SEG_RECORDS)
                  for d in range(-6, 7) if 0 <= b + d < nslots - 3}
                 | {SEG_RECORDS // 2 + d for d in range(8)})
    # Writer k skips every third hot slot, so each pair of writers shares two thirds.
    writers = [(n, [s for j, s in enumerate(hot) if j % 3 != k])
               for k, n in enumerate(("n1", "n2", "n3"))]
    res = _run(cp, tmp_path, nfiles=2, nslots=nslots, slots=hot, writers=writers,
               readers=["n1", "n2", "n3"], duration=6.0, run=3)
    assert res["writes"] > 100 and res["reads"] > 100, res
    assert res["slots_written"] > len(hot), res


def test_coherence_under_cache_pressure(cp: ClusterProcs, tmp_path: Path) -> None:
    """The smallest cache (4 MiB) over 8 segments: evictions give rights back while
    two writers on the same node and writers on other nodes take them again."""
    cp.start_coordinator(lease=3.0)
    for n in ("n1", "n2", "n3"):
        cp.start_node(n, flush_delay=1.0, cache_size="4MiB")
    nslots = 4 * SEG_RECORDS
    slots = list(range(0, nslots - 2, 509))  # spread over every segment
    writers = [(n, slots) for n in ("n1", "n1", "n2", "n2", "n3")]
    res = _run(cp, tmp_path, nfiles=2, nslots=nslots, slots=slots, writers=writers,
               readers=["n1", "n3"], duration=6.0, run=2)
    assert res["writes"] > 100 and res["reads"] > 50, res
