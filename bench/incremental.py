"""Incremental backups against the full, restic and borg (issue 12).

All in one run, on the common data set (``../shared/bench/gen_dataset.py``: about
2 GiB, four 256 MiB half-compressible files, 40 medium files, 20,000 small files),
written into a cluster (one sparse disk image on a real disk, 4 KiB blocks) with the
file-system code of ``sdbackup fs put`` and, as a plain tree, backed up by restic and
borg:

1. **Change, then back up** — for each of ``--rounds`` rounds (a fresh backup medium
   each, starting with a timed ``sdbackup backup`` full), change 1 %, 0.1 % and 10 % of
   the data in turn with ``modify_dataset.py --blocks 5000|500|50000`` (rewrite random
   4 KiB blocks of the four large files in place, append to 100 small files, touch 100
   others); the seed is the data set's for round 0's 1 % and one more per change after
   it. The same change goes to the cluster: this script draws exactly the changes
   ``modify_dataset.py`` draws (the same seeded streams, the same order) and applies
   them through the cluster's file system (``open_cluster(DIR).fs``: ``write`` in
   place, appends, ``setattr`` for the touches), so changed-block tracking sees exactly
   those writes; then it checks every changed byte range and every appended file of the
   cluster against the tree ``modify_dataset.py`` changed. After each change, timed with
   the page cache dropped before each: ``sdbackup backup --incremental``, ``restic
   backup`` and ``borg create --compression zstd,1`` (each tool's next backup, with the
   previous one as its parent). Right after round 1 % 's incremental, ``sdbackup merge``
   of that incremental into its full (a synthetic full, which later incrementals
   follow) is timed too.
2. **Reading through a chain** — a second cluster holds one file made of the data set's
   four large files (1 GiB); a full backup, then ``--chain - 1`` incrementals, each after
   ``--chain-blocks`` random 4 KiB blocks of the file were rewritten through the file
   system. Then ``sdbackup restore --medium M GEN /one.bin --to DIR`` of generation 1
   (the full) and of generation ``--chain`` (read through the whole chain), alternating,
   page cache dropped before each; the restored files are checked against the cluster.
   Then the block seam alone, in this process: every block in use at each of the two
   generations' T0 through ``ChainReader.readinto`` (8 MiB at a time), alternating too.

Every sdbackup figure is the whole command (``python -m sdbackup.cli.main ...``, the
code of this checkout, with bytecode caches as an installed package has them), timed
from its start to its exit, as a user runs it; the backup's own ``seconds`` (from
``--json``) is kept too. Medians over the rounds (and over ``--restore-runs`` runs for
the chain). Targets (issue 12), checked on the 1 % change: the incremental takes
<= 5 % of the full's time, is >= 10x faster than restic's and borg's backup of the same
change, and stores <= 1.2 x the changed bytes plus metadata; generation 30 reads within
1.2 x of generation 1.

    .venv/bin/python bench/incremental.py            # full run, about 15 minutes on 2 CPUs
    .venv/bin/python bench/incremental.py --quick    # smoke run (about 1.5 minutes)
    .venv/bin/python bench/incremental.py --json     # JSON on stdout, table on stderr
    .venv/bin/python bench/incremental.py --json F   # table on stdout, JSON in F
    .venv/bin/python bench/incremental.py --profile DIR  # py-spy every sdbackup command

Root is needed to drop the page cache (the output says whether it worked).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    MiB,
    bench_dir,
    drop_caches,
    emit_json,
    format_table,
    machine_info,
    median,
    runs_summary,
)

_REPO = Path(__file__).resolve().parent.parent
_SRC = _REPO / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

BS = 4096
SEED = 20240601
# (label, share of the data set, modify_dataset.py --blocks at scale 1); the 1 % change
# comes first in a round, so that the merge takes it with its full.
LEVELS = (("1%", 0.01, 5000), ("0.1%", 0.001, 500), ("10%", 0.10, 50000))
TARGET_LEVEL = "1%"
SDB = [sys.executable, "-m", "sdbackup.cli.main"]
CHAIN_FILE = "one.bin"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def git_commit() -> str:
    r = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain",
                            "--untracked-files=no", "--", "src"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return (r.stdout.strip() or "?") + ("+dirty src" if dirty else "")


def shared_bench_dir(given: Path | None) -> Path:
    """``../shared/bench`` of the repository (of the main checkout for a worktree)."""
    cands = [given] if given else []
    cands.append(_REPO.parent / "shared" / "bench")
    r = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "--path-format=absolute",
                        "--git-common-dir"], capture_output=True, text=True, check=False)
    if r.returncode == 0 and r.stdout.strip():
        cands.append(Path(r.stdout.strip()).parent.parent / "shared" / "bench")
    for c in cands:
        if c is not None and (c / "gen_dataset.py").exists():
            return c
    raise SystemExit("cannot find ../shared/bench/gen_dataset.py: give --shared-bench DIR")


def sdb_env() -> dict[str, str]:
    """The environment of the timed sdbackup commands: this checkout's code, and
    bytecode caches on (as for an installed package: compiling every module at every
    start would add ~0.5 s to each command)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if _SRC.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(
            [str(_SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def du(path: Path) -> int:
    """Bytes allocated under ``path`` (st_blocks)."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*"))


def sh(*cmd: str, env: dict[str, str] | None = None) -> str:
    r = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True,
                       text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r.stdout


# -- running and timing commands -----------------------------------------------------------
class Runner:
    """Runs the timed commands: page cache dropped first, wall time of the process;
    with a profile directory, sdbackup commands run under ``py-spy record --idle``."""

    def __init__(self, profile: Path | None) -> None:
        self.profile = profile
        self.profiled: list[str] = []
        self.dropped = True
        self.env = sdb_env()
        self.spy = None
        if profile is not None:
            p = Path(sys.executable).parent / "py-spy"
            self.spy = str(p) if p.exists() else shutil.which("py-spy")
            if self.spy is None:
                log("py-spy is not installed (pip install py-spy): not profiling")
            else:
                profile.mkdir(parents=True, exist_ok=True)

    def cold(self) -> None:
        self.dropped = drop_caches() and self.dropped
        time.sleep(0.5)  # let the writeback of the drop settle

    def timed(self, cmd: Sequence[str], env: dict[str, str] | None = None,
              profile_as: str | None = None) -> tuple[float, str]:
        self.cold()
        cmd = list(cmd)
        if self.spy is not None and profile_as is not None:
            out = self.profile / f"{profile_as}.txt"  # type: ignore[operator]
            cmd = [self.spy, "record", "--idle", "--rate", "500", "--format", "raw",
                   "--output", str(out), "--", *cmd]
            self.profiled.append(str(out))
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        dt = time.perf_counter() - t0
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): "
                               f"{r.stderr[-3000:]}")
        return dt, r.stdout

    def sdb(self, args: Sequence[str], profile_as: str | None = None
            ) -> tuple[float, dict[str, Any]]:
        """One sdbackup command with --json: (wall seconds, its JSON summary)."""
        dt, out = self.timed([*SDB, *args, "--json", "-q"], self.env, profile_as)
        return dt, json.JSONDecoder().raw_decode(out[out.index("{"):])[0]


# -- the change: modify_dataset.py's draws, reproduced -------------------------------------
@dataclass
class Change:
    """What ``modify_dataset.py ROOT --seed S --blocks N`` changes, path by path."""

    seed: int
    blocks: int
    writes: list[tuple[str, int, bytes]] = field(default_factory=list)  # (rel, off, data)
    appends: list[tuple[str, bytes]] = field(default_factory=list)
    touches: list[str] = field(default_factory=list)

    @property
    def new_bytes(self) -> int:
        return sum(len(d) for _, _, d in self.writes) + sum(len(d) for _, d in self.appends)


def draw_change(shared: Path, root: Path, seed: int, blocks: int) -> Change:
    """The changes ``modify_dataset.py`` makes, drawn from the same seeded streams in the
    same order (it cannot report byte ranges itself). Call before it runs or after: the
    draws depend only on the large files' sizes and the small files' names."""
    if str(shared) not in sys.path:
        sys.path.insert(0, str(shared))
    from gen_dataset import BLOCK, SemiGen, Stream, make_text_pool

    pool = make_text_pool(seed)
    rs = Stream(seed, "modify-choice")
    newdata = SemiGen(seed, "modify-data", pool)
    bigs = [f"big/big{i}.bin" for i in range(4)]
    nblocks_per = [os.path.getsize(root / p) // BLOCK for p in bigs]
    if blocks > sum(nblocks_per):
        raise SystemExit(f"--blocks {blocks} is more than the large files hold "
                         f"({sum(nblocks_per)} blocks): use a larger --scale")
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < blocks:
        f = rs.randint(0, 3)
        chosen.add((f, rs.randint(0, nblocks_per[f] - 1)))
    ch = Change(seed, blocks)
    for f, b in sorted(chosen):
        ch.writes.append((bigs[f], b * BLOCK, newdata.read(BLOCK)))
    smalls = []
    for dirpath, _, files in os.walk(root / "small"):
        for fn in files:
            smalls.append(os.path.join(dirpath, fn))
    smalls.sort()
    picked: list[str] = []
    while len(picked) < 200:
        p = smalls[rs.randint(0, len(smalls) - 1)]
        if p not in picked:
            picked.append(p)
    for i, p in enumerate(picked):
        rel = os.path.relpath(p, root)
        if i < 100:
            n = rs.randint(512, 4096)
            ch.appends.append((rel, newdata.read(n)))
        else:
            ch.touches.append(rel)
    return ch


def modify_tree(shared: Path, root: Path, seed: int, blocks: int) -> dict[str, int]:
    """Run ``modify_dataset.py`` on the tree; its summary as numbers."""
    out = sh(sys.executable, str(shared / "modify_dataset.py"), str(root), "--seed",
             str(seed), "--blocks", str(blocks))
    res: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.replace(":", " ").split()
        for k, v in zip(parts[::2], parts[1::2], strict=False):
            if v.isdigit():
                res[k] = int(v)
    return res


def apply_to_cluster(cdir: Path, prefix: str, tree: Path, ch: Change) -> float:
    """Apply the change through the cluster's file system, then check every changed
    range and every appended file against the tree. Returns the seconds of applying."""
    from sdbackup.cluster.local import open_cluster

    t0 = time.perf_counter()
    with open_cluster(cdir) as c:
        fs = c.fs
        inos: dict[str, int] = {}

        def ino(rel: str) -> int:
            if rel not in inos:
                inos[rel] = fs.resolve(f"{prefix}/{rel}").ino
            return inos[rel]

        for rel, off, data in ch.writes:
            fs.write(ino(rel), off, data)
        for rel, data in ch.appends:
            i = ino(rel)
            fs.write(i, fs.getattr(i).size, data)
        for rel in ch.touches:  # the tree's new times (modify_dataset.py ran first)
            st = (tree / rel).stat()
            fs.setattr(ino(rel), atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns)
        fs.fsync()
        took = time.perf_counter() - t0
        # The same bytes as the tree, i.e. the draws above are modify_dataset.py's.
        fds: dict[str, int] = {}
        try:
            for rel, off, data in ch.writes:
                if rel not in fds:
                    fds[rel] = os.open(tree / rel, os.O_RDONLY)
                if os.pread(fds[rel], len(data), off) != data or \
                        fs.read(ino(rel), off, len(data)) != data:
                    raise RuntimeError(f"{rel} at {off}: the cluster, the tree and the "
                                       "drawn change differ (modify_dataset.py changed?)")
        finally:
            for fd in fds.values():
                os.close(fd)
        for rel, _ in ch.appends:
            want = (tree / rel).read_bytes()
            if fs.read(ino(rel), 0, len(want) + 1) != want:
                raise RuntimeError(f"{rel}: the cluster's file differs from the tree's "
                                   "after the append")
    return took


def compare_tree(cdir: Path, prefix: str, tree: Path, rels: Sequence[str]) -> None:
    """Whole-file comparison of cluster and tree (at the end of the run)."""
    from sdbackup.cluster.local import open_cluster

    with open_cluster(cdir) as c:
        for rel in rels:
            a = c.fs.resolve(f"{prefix}/{rel}")
            h = hashlib.sha256()
            for off in range(0, a.size, 8 * MiB):
                h.update(c.fs.read(a.ino, off, min(8 * MiB, a.size - off)))
            if h.hexdigest() != sha_file(tree / rel):
                raise RuntimeError(f"{rel}: the cluster's file differs from the tree's")


# -- the medium ----------------------------------------------------------------------------
def gen_sizes(medium: Path, gen_id: str) -> dict[str, int]:
    """Bytes of a generation on the medium: data (record streams), metadata (the T0
    snapshot, the index, the manifest)."""
    d = medium / "generations" / gen_id
    data = meta = 0
    for p in d.iterdir():
        if p.name.startswith("stream-"):
            data += p.stat().st_size
        else:
            meta += p.stat().st_size
    return {"data": data, "meta": meta, "snapshot": (d / "meta.db").stat().st_size}


# -- restic and borg -----------------------------------------------------------------------
class Peers:
    """restic and borg backing up the data set's tree, one repository each."""

    def __init__(self, work: Path, data: Path, runner: Runner, enabled: bool) -> None:
        self.work, self.data, self.runner = work, data, runner
        self.restic = shutil.which("restic") if enabled else None
        self.borg = shutil.which("borg") if enabled else None
        self.renv = {**os.environ, "RESTIC_PASSWORD": "bench",
                     "RESTIC_CACHE_DIR": str(work / "restic-cache")}
        self.benv = {**os.environ, "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                     "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
                     "BORG_BASE_DIR": str(work / "borg-base")}
        self.n = 0
        self.versions: dict[str, str] = {}
        if self.restic:
            sh(self.restic, "init", "-q", "-r", str(work / "restic"), env=self.renv)
            self.versions["restic"] = sh(self.restic, "version").strip()
        if self.borg:
            sh(self.borg, "init", "-e", "none", str(work / "borg"), env=self.benv)
            self.versions["borg"] = sh(self.borg, "--version").strip()
        if enabled and not (self.restic and self.borg):
            log("restic or borg is missing (apt-get install restic borgbackup): "
                "skipping it")

    def backup(self) -> dict[str, dict[str, float]]:
        """Each tool's next backup of the tree: seconds and bytes added to its repo."""
        out: dict[str, dict[str, float]] = {}
        self.n += 1
        if self.restic:
            before = du(self.work / "restic")
            dt, _ = self.runner.timed([self.restic, "backup", "-q", "-r",
                                       str(self.work / "restic"), str(self.data)], self.renv)
            out["restic"] = {"seconds": dt, "added": du(self.work / "restic") - before}
        if self.borg:
            before = du(self.work / "borg")
            dt, _ = self.runner.timed([self.borg, "create", "--compression", "zstd,1",
                                       f"{self.work / 'borg'}::b{self.n}", str(self.data)],
                                      self.benv)
            out["borg"] = {"seconds": dt, "added": du(self.work / "borg") - before}
        return out


# -- part 1: change, then back up ----------------------------------------------------------
def put_tree(cdir: Path, data: Path) -> float:
    from sdbackup.cluster.local import open_cluster
    from sdbackup.fs import transfer

    t0 = time.perf_counter()
    with open_cluster(cdir) as c:
        transfer.put(c.fs, data, "/")
        c.fs.fsync()
    return time.perf_counter() - t0


def part_changes(args: argparse.Namespace, work: Path, data: Path, shared: Path,
                 runner: Runner, res: dict[str, Any]) -> None:
    from sdbackup.cluster.local import DiskSpec, init_cluster

    cdir = work / "cluster"
    size = du(data)
    disk_size = max(256 * MiB, (int(size * 1.6) + 256 * MiB) // MiB * MiB)
    init_cluster(cdir, [DiskSpec("d0", work / "d0.img", disk_size)], block_size=BS)
    log(f"writing the data set ({size / MiB:,.0f} MiB) into the cluster")
    res["dataset_bytes"] = size
    res["fs_put_s"] = put_tree(cdir, data)
    prefix = "/" + data.name
    peers = Peers(work, data, runner, not args.no_peers)
    res["peer_versions"] = peers.versions
    if peers.restic or peers.borg:
        log("restic and borg: first (full) backups ...")
        res["peers_full"] = peers.backup()
        log("  " + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in res["peers_full"].items()))
    comp = ["--compress", args.compress]
    rounds: list[dict[str, Any]] = []
    res["rounds"] = rounds
    touched: set[str] = set()
    for r in range(args.rounds):
        medium = work / f"medium-{r}"
        rd: dict[str, Any] = {"load_before": loadavg(), "levels": {}}
        rounds.append(rd)
        dt, s = runner.sdb(["backup", str(cdir), "--medium", str(medium), *comp],
                           profile_as=f"r{r}-full")
        full_id = s["generation"]
        rd["full"] = {"seconds": dt, "engine_seconds": s["seconds"], "blocks": s["blocks"],
                      **gen_sizes(medium, full_id)}
        log(f"round {r + 1}/{args.rounds}: full {dt:.2f} s (engine {s['seconds']:.2f} s, "
            f"{s['blocks'] * BS / MiB:,.0f} MiB), load {loadavg()}")
        for li, (name, _share, _b) in enumerate(LEVELS):
            seed = args.seed + len(LEVELS) * r + li
            nblocks = args.level_blocks[name]
            ch = draw_change(shared, data, seed, nblocks)
            tree_s = modify_tree(shared, data, seed, nblocks)
            if tree_s.get("total_new_bytes") != ch.new_bytes:
                raise RuntimeError(f"modify_dataset.py reports {tree_s} but the drawn "
                                   f"change has {ch.new_bytes} new bytes")
            apply_s = apply_to_cluster(cdir, prefix, data, ch)
            touched |= {w[0] for w in ch.writes} | {a[0] for a in ch.appends}
            lv: dict[str, Any] = {"seed": seed, "blocks": nblocks,
                                  "changed_bytes": ch.new_bytes, "apply_s": apply_s}
            dt, s = runner.sdb(["backup", str(cdir), "--medium", str(medium),
                                "--incremental", *comp], profile_as=f"r{r}-inc-{name}")
            if s["kind"] != "incremental":
                raise RuntimeError(f"expected an incremental, got {s['kind']}")
            lv["sdbackup"] = {"seconds": dt, "engine_seconds": s["seconds"],
                              "blocks": s["blocks"], "runs": s["runs"],
                              "read_bytes": s["read_bytes"],
                              "freeze_seconds": s["freeze_seconds"],
                              **gen_sizes(medium, s["generation"])}
            lv.update(peers.backup())
            if name == TARGET_LEVEL:
                dt_m, sm = runner.sdb(["merge", "--medium", str(medium), full_id,
                                       s["generation"]], profile_as=f"r{r}-merge")
                lv["merge"] = {"seconds": dt_m, "engine_seconds": sm["seconds"],
                               "blocks": sm["blocks"], "kind": sm["kind"]}
            rd["levels"][name] = lv
            peer_txt = ", ".join(f"{k} {lv[k]['seconds']:.2f} s" for k in ("restic", "borg")
                                 if k in lv)
            log(f"  {name}: {ch.new_bytes / MiB:,.1f} MiB changed (applied in {apply_s:.1f} "
                f"s); incremental {lv['sdbackup']['seconds']:.2f} s (engine "
                f"{lv['sdbackup']['engine_seconds']:.2f} s, {s['blocks']} blocks)"
                + (f"; {peer_txt}" if peer_txt else "")
                + (f"; merge {lv['merge']['seconds']:.2f} s" if "merge" in lv else ""))
        if r == args.rounds - 1:
            # The newest incremental, read through its chain, against the tree.
            dest = work / "check-restore"
            runner.timed([*SDB, "restore", "--medium", str(medium), "-q", "--to", str(dest),
                          f"{prefix}/big/big0.bin"], runner.env)
            same = (dest / prefix.lstrip("/") / "big" / "big0.bin").read_bytes() == \
                (data / "big" / "big0.bin").read_bytes()
            shutil.rmtree(dest, ignore_errors=True)
            if not same:
                raise RuntimeError("big0.bin restored from the newest incremental differs "
                                   "from the tree")
            res["restore_check"] = "big/big0.bin from the newest incremental = the tree"
        shutil.rmtree(medium, ignore_errors=True)
    compare_tree(cdir, prefix, data, sorted(touched))
    res["tree_check"] = f"{len(touched)} changed files: cluster = tree"


# -- part 2: reading through a chain -------------------------------------------------------
def sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 * MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def part_chain(args: argparse.Namespace, work: Path, data: Path, shared: Path,
               runner: Runner, res: dict[str, Any]) -> None:
    from sdbackup.cluster.local import DiskSpec, init_cluster, open_cluster

    if str(shared) not in sys.path:
        sys.path.insert(0, str(shared))
    from gen_dataset import SemiGen, Stream, make_text_pool

    parts = [data / "big" / f"big{i}.bin" for i in range(4)]
    fsize = sum(p.stat().st_size for p in parts)
    cdir = work / "chain-cluster"
    medium = work / "chain-medium"
    init_cluster(cdir, [DiskSpec("d0", work / "chain-d0.img",
                                 (fsize * 3 // 2 + 64 * MiB) // MiB * MiB)], block_size=BS)
    h_full = hashlib.sha256()
    with open_cluster(cdir) as c:
        a = c.fs.create(1, CHAIN_FILE.encode())
        off = 0
        for p in parts:
            with open(p, "rb") as f:
                for chunk in iter(lambda f=f: f.read(8 * MiB), b""):  # type: ignore[misc]
                    c.fs.write(a.ino, off, chunk)
                    h_full.update(chunk)
                    off += len(chunk)
        c.fs.fsync()
        ino = a.ino
    nblocks = fsize // BS
    ch: dict[str, Any] = {"file_bytes": fsize, "generations": args.chain,
                          "blocks_per_incremental": args.chain_blocks, "incrementals": []}
    res["chain"] = ch
    log(f"chain: one {fsize / MiB:,.0f} MiB file, a full and {args.chain - 1} incrementals "
        f"of {args.chain_blocks} rewritten blocks each")
    comp = ["--compress", args.compress]
    dt, s = runner.sdb(["backup", str(cdir), "--medium", str(medium), *comp])
    gens = [s["generation"]]
    ch["full_seconds"] = dt
    pool = make_text_pool(args.seed)
    rewritten: set[int] = set()
    for g in range(2, args.chain + 1):
        rs = Stream(args.seed, f"chain-choice-{g}")
        newdata = SemiGen(args.seed, f"chain-data-{g}", pool)
        chosen = sorted({rs.randint(0, nblocks - 1) for _ in range(args.chain_blocks)})
        rewritten.update(chosen)
        with open_cluster(cdir) as c:
            for b in chosen:
                c.fs.write(ino, b * BS, newdata.read(BS))
            c.fs.fsync()
        dt, s = runner.sdb(["backup", str(cdir), "--medium", str(medium), "--incremental",
                            *comp])
        if s["kind"] != "incremental":
            raise RuntimeError(f"expected an incremental, got {s['kind']}")
        gens.append(s["generation"])
        ch["incrementals"].append({"seconds": dt, "engine_seconds": s["seconds"],
                                   "blocks": s["blocks"]})
    ch["rewritten_blocks"] = len(rewritten)
    h_last = hashlib.sha256()
    with open_cluster(cdir) as c:
        for off in range(0, fsize, 8 * MiB):
            h_last.update(c.fs.read(ino, off, min(8 * MiB, fsize - off)))
    want = {1: h_full.hexdigest(), args.chain: h_last.hexdigest()}
    runs: dict[int, list[float]] = {1: [], args.chain: []}
    order = [1, args.chain]
    for k in range(args.restore_runs):
        for g in (order if k % 2 == 0 else order[::-1]):
            dest = work / "chain-restore"
            dt, _ = runner.timed([*SDB, "restore", "--medium", str(medium), gens[g - 1],
                                  f"/{CHAIN_FILE}", "--to", str(dest), "-q"], runner.env,
                                 profile_as=f"chain-restore-gen{g}-{k}")
            runs[g].append(dt)
            if k < 2 and sha_file(dest / CHAIN_FILE) != want[g]:
                raise RuntimeError(f"generation {g}'s {CHAIN_FILE} restored differs from "
                                   "the cluster's file at that generation")
            shutil.rmtree(dest)
            log(f"  restore of generation {g}: {dt:.2f} s")
    ch["restore_seconds"] = {str(g): v for g, v in runs.items()}
    ch["chain_bytes"] = du(medium)
    # The block seam alone, in this process: every block in use at the generation's T0
    # (the file's) through ChainReader.readinto, 8 MiB at a time.
    reads: dict[int, list[float]] = {1: [], args.chain: []}
    for k in range(args.restore_runs):
        for g in (order if k % 2 == 0 else order[::-1]):
            runner.cold()
            dt, nbytes = chain_read(medium, gens[g - 1])
            reads[g].append(dt)
            log(f"  ChainReader read of generation {g}: {dt:.2f} s "
                f"({nbytes / MiB / dt:,.0f} MiB/s)")
    ch["chainreader_seconds"] = {str(g): v for g, v in reads.items()}
    ch["chainreader_bytes"] = nbytes


def chain_read(medium: Path, gen: str) -> tuple[float, int]:
    """Seconds to read every block in use at ``gen``'s T0 of disk d0 through
    :class:`ChainReader` (opening it and building its lookup included), and the bytes."""
    from sdbackup.media.chain import ChainReader

    t0 = time.perf_counter()
    total = 0
    with ChainReader.open(medium, gen) as r:
        did = r.disk_id("d0")
        used = r.used_blocks(did)
        per = (8 * MiB) // r.block_size
        buf = bytearray(8 * MiB)
        mv = memoryview(buf)
        for s, c in used.coalesced_runs(0, per):
            r.readinto(did, s, mv[: c * r.block_size])
            total += c * r.block_size
    return time.perf_counter() - t0, total


# -- report --------------------------------------------------------------------------------
def summarize(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    rounds = res.get("rounds", [])
    out: dict[str, Any] = {}
    if rounds:
        full = [r["full"]["seconds"] for r in rounds]
        out["full"] = {"seconds": runs_summary(full),
                       "engine_seconds": runs_summary([r["full"]["engine_seconds"]
                                                      for r in rounds]),
                       "data_bytes": median([r["full"]["data"] for r in rounds]),
                       "meta_bytes": median([r["full"]["meta"] for r in rounds]),
                       "blocks": median([r["full"]["blocks"] for r in rounds])}
        for name, *_ in LEVELS:
            lvs = [r["levels"][name] for r in rounds if name in r["levels"]]
            if not lvs:
                continue
            o: dict[str, Any] = {
                "changed_bytes": median([x["changed_bytes"] for x in lvs]),
                "apply_s": median([x["apply_s"] for x in lvs]),
                "sdbackup": {k: median([x["sdbackup"][k] for x in lvs]) for k in
                             ("seconds", "engine_seconds", "blocks", "runs", "read_bytes",
                              "data", "meta", "snapshot", "freeze_seconds")},
                "sdbackup_runs": [x["sdbackup"]["seconds"] for x in lvs],
            }
            o["copied_bytes"] = o["sdbackup"]["blocks"] * BS
            for peer in ("restic", "borg"):
                if all(peer in x for x in lvs):
                    o[peer] = {"seconds": median([x[peer]["seconds"] for x in lvs]),
                               "added": median([x[peer]["added"] for x in lvs]),
                               "runs": [x[peer]["seconds"] for x in lvs]}
            if all("merge" in x for x in lvs):
                o["merge"] = {"seconds": median([x["merge"]["seconds"] for x in lvs]),
                              "engine_seconds": median([x["merge"]["engine_seconds"]
                                                        for x in lvs]),
                              "runs": [x["merge"]["seconds"] for x in lvs]}
            out[name] = o
    if "chain" in res:
        c = res["chain"]
        r1 = c["restore_seconds"]["1"]
        rn = c["restore_seconds"][str(args.chain)]
        out["chain"] = {"gen1": runs_summary(r1), "genN": runs_summary(rn),
                        "incremental_seconds": median([x["seconds"]
                                                       for x in c["incrementals"]])}
        if "chainreader_seconds" in c:
            out["chain"]["reader_gen1"] = runs_summary(c["chainreader_seconds"]["1"])
            out["chain"]["reader_genN"] = runs_summary(
                c["chainreader_seconds"][str(args.chain)])
    return out


def targets(summ: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    t: list[dict[str, Any]] = []
    lv = summ.get(TARGET_LEVEL)
    if lv is not None:
        inc = lv["sdbackup"]["seconds"]
        full = summ["full"]["seconds"]["median"]
        t.append({"target": "1 % incremental <= 5 % of the full's time",
                  "value": f"{inc / full:.1%} ({inc:.2f} s / {full:.2f} s)",
                  "met": inc / full <= 0.05})
        eng_inc, eng_full = lv["sdbackup"]["engine_seconds"], \
            summ["full"]["engine_seconds"]["median"]
        t.append({"target": "  (the same, backup engine only, without process start)",
                  "value": f"{eng_inc / eng_full:.1%} ({eng_inc:.2f} s / {eng_full:.2f} s)",
                  "met": eng_inc / eng_full <= 0.05})
        for peer in ("restic", "borg"):
            if peer in lv:
                x = lv[peer]["seconds"] / inc
                t.append({"target": f"1 % incremental >= 10x faster than {peer}",
                          "value": f"{x:.1f}x ({lv[peer]['seconds']:.2f} s)",
                          "met": x >= 10})
            else:
                t.append({"target": f"1 % incremental >= 10x faster than {peer}",
                          "value": "n/a (not run)", "met": None})
        changed = lv["changed_bytes"]
        data = lv["sdbackup"]["data"]
        copied = lv["copied_bytes"]
        t.append({"target": "1 % incremental stores <= 1.2 x changed bytes + metadata",
                  "value": f"data {data / changed:.2f}x ({data / MiB:.1f} MiB stored, "
                           f"{args.compress}) + metadata {lv['sdbackup']['meta'] / MiB:.1f}"
                           f" MiB, of {changed / MiB:.1f} MiB changed",
                  "met": data <= 1.2 * changed})
        t.append({"target": "  (the same, uncompressed: blocks copied x 4 KiB)",
                  "value": f"{copied / changed:.2f}x ({copied / MiB:.1f} MiB)",
                  "met": copied <= 1.2 * changed})
    if "chain" in summ:
        g1 = summ["chain"]["gen1"]["median"]
        gn = summ["chain"]["genN"]["median"]
        t.append({"target": f"generation {args.chain} reads within 1.2 x of generation 1",
                  "value": f"{gn / g1:.2f}x ({gn:.2f} s / {g1:.2f} s)", "met": gn / g1 <= 1.2})
        if "reader_gen1" in summ["chain"]:
            g1 = summ["chain"]["reader_gen1"]["median"]
            gn = summ["chain"]["reader_genN"]["median"]
            t.append({"target": "  (the same, ChainReader alone, in process)",
                      "value": f"{gn / g1:.2f}x ({gn:.2f} s / {g1:.2f} s)",
                      "met": gn / g1 <= 1.2})
    return t


COMMANDS = (
    ("change", "modify_dataset.py DATASET --seed S --blocks N, and the same writes "
               "through open_cluster(CLUSTER).fs"),
    ("full", "S backup CLUSTER --medium M --compress {compress} --json -q"),
    ("incr", "S backup CLUSTER --medium M --incremental --compress {compress} --json -q"),
    ("restic", "restic backup -q -r REPO DATASET  (next snapshot, same repo)"),
    ("borg", "borg create --compression zstd,1 REPO::bN DATASET  (next archive)"),
    ("merge", "S merge --medium M FULL INCR_1% --json -q"),
    ("restore (chain)", "S restore --medium M GEN /one.bin --to DIR -q  (GEN 1, {chain})"),
    ("ChainReader (chain)", "ChainReader.open(M, GEN).readinto(d0, ...), 8 MiB at a time, "
                            "every block in use at T0"),
)


def report(res: dict[str, Any], args: argparse.Namespace, file: Any) -> None:
    summ = res["summary"]

    def p(*a: Any) -> None:
        print(*a, file=file)

    p(f"data set {res.get('dataset_bytes', 0) / MiB:,.0f} MiB (scale {args.scale}); "
      f"{args.rounds} round(s); sdbackup --compress {args.compress}; caches dropped: "
      f"{res['caches_dropped']}; load {res['load_before']} -> {res['load_after']}")
    if "full" in summ:
        f = summ["full"]
        p(f"\nsdbackup full: {f['seconds']['median']:.2f} s (runs "
          + ", ".join(f"{x:.2f}" for x in f["seconds"]["runs"])
          + f"; engine {f['engine_seconds']['median']:.2f} s), {f['blocks'] * BS / MiB:,.0f} "
          f"MiB of blocks, stored {f['data_bytes'] / MiB:,.0f} MiB + "
          f"{f['meta_bytes'] / MiB:.1f} MiB metadata")
        pf = res.get("peers_full", {})
        if pf:
            p("first backups: " + ", ".join(
                f"{k} {v['seconds']:.1f} s ({v['added'] / MiB:,.0f} MiB)" for k, v in pf.items()))
        rows = []
        for name, *_ in LEVELS:
            lv = summ.get(name)
            if lv is None:
                continue
            s = lv["sdbackup"]
            row = [name, lv["changed_bytes"] / MiB, s["seconds"], s["engine_seconds"],
                   s["seconds"] / f["seconds"]["median"], lv["copied_bytes"] / MiB,
                   s["data"] / MiB, s["meta"] / MiB]
            for peer in ("restic", "borg"):
                if peer in lv:
                    row += [lv[peer]["seconds"], lv[peer]["seconds"] / s["seconds"],
                            lv[peer]["added"] / MiB]
                else:
                    row += ["n/a", "n/a", "n/a"]
            rows.append(row)
        p("\n" + format_table(
            ["change", "changed MiB", "incr s", "engine s", "incr/full", "copied MiB",
             "stored MiB", "meta MiB", "restic s", "restic/incr", "restic +MiB", "borg s",
             "borg/incr", "borg +MiB"], rows))
        missing = [peer for peer in ("restic", "borg") if peer not in res.get("peer_versions",
                                                                              {})]
        if missing:
            p(f"n/a: {' and '.join(missing)} not run ("
              + ("--no-peers" if args.no_peers else "not installed") + ")")
        if args.rounds > 1:
            p("every run (seconds, round by round):")
            for name, *_ in LEVELS:
                lv = summ.get(name)
                if lv is None:
                    continue
                parts = [f"incremental {', '.join(f'{x:.2f}' for x in lv['sdbackup_runs'])}"]
                parts += [f"{peer} {', '.join(f'{x:.2f}' for x in lv[peer]['runs'])}"
                          for peer in ("restic", "borg") if peer in lv]
                if "merge" in lv:
                    parts.append(f"merge {', '.join(f'{x:.2f}' for x in lv['merge']['runs'])}")
                p(f"  {name}: " + "; ".join(parts))
        lv = summ.get(TARGET_LEVEL, {})
        if "merge" in lv:
            m = lv["merge"]
            p(f"\nmerge of the {TARGET_LEVEL} incremental into its full: "
              f"{m['seconds']:.2f} s (engine {m['engine_seconds']:.2f} s) = "
              f"{m['seconds'] / lv['sdbackup']['seconds']:.1f}x the incremental's "
              f"{lv['sdbackup']['seconds']:.2f} s")
    if "chain" in summ:
        c = summ["chain"]
        ch = res["chain"]
        p(f"\nchain: {ch['file_bytes'] / MiB:,.0f} MiB file, {args.chain} generations "
          f"({args.chain_blocks} blocks rewritten before each incremental, "
          f"{ch['rewritten_blocks']} distinct); incremental {c['incremental_seconds']:.2f} s "
          "(median)")
        fb = ch["file_bytes"]
        rows = [["restore of the file, generation 1 (full)", c["gen1"]],
                [f"restore of the file, generation {args.chain}", c["genN"]]]
        if "reader_gen1" in c:
            fb_r = ch["chainreader_bytes"]
            rows += [["ChainReader, generation 1 (full)", c["reader_gen1"]],
                     [f"ChainReader, generation {args.chain}", c["reader_genN"]]]
        p(format_table(["read", "median s", "MiB/s", "runs"],
                       [[name, x["median"],
                         (fb if name.startswith("restore") else fb_r) / MiB / x["median"],
                         ", ".join(f"{v:.2f}" for v in x["runs"])] for name, x in rows]))
    p("\ncommands (S = python -m sdbackup.cli.main, this checkout's src; page cache "
      "dropped before each):")
    for what, cmd in COMMANDS:
        p(f"  {what:<22} {cmd.format(compress=args.compress, chain=args.chain)}")
    p("")
    if args.scale < 1:
        p(f"  (scale {args.scale}: a smoke run; the targets are meant for the full data set, "
          "where process start and fixed costs weigh less)")
    for t in res["targets"]:
        mark = "n/a" if t["met"] is None else "ok" if t["met"] else "MISSED"
        p(f"  [{mark}] {t['target']}: {t['value']}")
    if res.get("profiled"):
        p("\nprofiled run (py-spy): the figures above are slowed by the profiler; "
          f"profiles in {args.profile}")


# -- profiles ------------------------------------------------------------------------------
def summarize_profile(path: Path, top: int = 12) -> str:
    """A raw py-spy file (``--idle``: waiting counts too) as where the time goes, thread
    by thread: the main thread's samples by their innermost three frames of interest
    (``sdbackup`` code, and the call it waits in); the other threads' the same way, a
    pool worker waiting for work counted apart as idle. Import time is one line."""
    total = 0
    main_t: collections.Counter[str] = collections.Counter()
    other: collections.Counter[str] = collections.Counter()
    idle = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        k = int(n)
        total += k
        frames = stack.split(";")
        is_main = frames[0].startswith("_run_module_as_main")
        if any("importlib._bootstrap" in f for f in frames):
            (main_t if is_main else other)["(importing modules)"] += k
            continue
        if not is_main and frames[-1].startswith("_worker (concurrent/futures/thread.py"):
            idle += k  # a pool thread waiting for work
            continue
        names = [f.split(" (")[0] for f in frames]
        ours = [i for i, f in enumerate(frames) if "sdbackup/" in f]
        if ours:
            last = ours[-1]
            key = names[max(0, last - 2): last + 1]
            if last + 1 < len(names):
                key.append(names[-1])  # what our innermost frame is in: the wait, the C call
        else:
            key = names[-2:]
        (main_t if is_main else other)[" > ".join(key)] += k
    out = [f"{path.name}: {total} samples (rate 500/s, idle included); main thread "
           f"{sum(main_t.values())}, other threads {sum(other.values())} busy or waiting "
           f"on I/O + {idle} idle in a pool"]
    for title, c in (("main thread", main_t), ("other threads", other)):
        out.append(f"  {title}:")
        n = max(sum(c.values()), 1)
        out += [f"    {100 * v / n:5.1f}%  {k}" for k, v in c.most_common(top)]
    return "\n".join(out)


# -- main ----------------------------------------------------------------------------------
def dataset(args: argparse.Namespace, work: Path, shared: Path) -> Path:
    data = work / "dataset"
    if args.dataset is not None:
        log(f"copying the data set {args.dataset} (it is modified)")
        sh("cp", "-a", str(args.dataset), str(data))
    else:
        log(f"generating the data set (scale {args.scale})")
        sh(sys.executable, str(shared / "gen_dataset.py"), str(data), "--scale",
           str(args.scale))
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: scale 0.05, one round, a small chain (< 2 minutes)")
    ap.add_argument("--scale", type=float, help="data set scale (default 1.0: ~2 GiB)")
    ap.add_argument("--dataset", type=Path, help="copy this data set instead of generating")
    ap.add_argument("--rounds", type=int, help="rounds of full + changes (default 3)")
    ap.add_argument("--blocks", help="modify_dataset.py --blocks of the 1 %%, 0.1 %% and "
                    "10 %% changes (default 5000,500,50000 times the scale)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--compress", default="zstd:1", help="sdbackup's compression")
    ap.add_argument("--chain", type=int, default=30,
                    help="generations in the chain; the last is read against the first")
    ap.add_argument("--chain-blocks", type=int, help="blocks rewritten before each "
                    "incremental of the chain (default 500 times the scale)")
    ap.add_argument("--restore-runs", type=int, default=3,
                    help="restores of each of the two generations (alternating)")
    ap.add_argument("--parts", default="changes,chain", help="what to run")
    ap.add_argument("--no-peers", action="store_true", help="skip restic and borg")
    ap.add_argument("--shared-bench", type=Path, help="where gen_dataset.py and "
                    "modify_dataset.py are (default ../shared/bench)")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="run every timed sdbackup command under py-spy (--idle), raw "
                         "profiles and DIR/summary.txt there (slows the figures)")
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE",
                    help="JSON on stdout (the table goes to stderr); with FILE, the table "
                         "on stdout and the JSON in FILE")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--report", type=Path, metavar="FILE",
                    help="run nothing: print the table of an earlier run's --json FILE")
    args = ap.parse_args()
    if args.report is not None:
        res = json.loads(args.report.read_text())
        old = argparse.Namespace(**{**res["config"], "report": args.report})
        res["summary"] = summarize(res, old)
        res["targets"] = targets(res["summary"], old)
        report(res, old, sys.stdout)
        print(f"\ntotal {res['total_s']:.0f} s")
        return

    if args.quick:
        args.scale = args.scale or 0.05
        args.rounds = args.rounds or 1
    args.scale = args.scale or 1.0
    args.rounds = args.rounds if args.rounds is not None else 3
    if args.blocks:
        vals = [int(x) for x in args.blocks.split(",")]
    else:
        vals = [max(1, round(b * args.scale)) for _, _, b in LEVELS]
    args.level_blocks = {name: v for (name, _, _), v in zip(LEVELS, vals, strict=True)}
    args.chain_blocks = args.chain_blocks or max(1, round(500 * args.scale))
    parts = set(args.parts.split(","))
    shared = shared_bench_dir(args.shared_bench)
    runner = Runner(args.profile)
    started = time.monotonic()
    res: dict[str, Any] = {"commit": git_commit(), "machine": machine_info(),
                           "load_before": loadavg(), "caches_dropped": drop_caches(),
                           "config": {k: str(v) if isinstance(v, Path) else v
                                      for k, v in vars(args).items()}}
    with bench_dir("sdbackup-bench-incr-", keep=args.keep) as work:
        data = dataset(args, work, shared)
        if "chain" in parts:  # first: the chain's file is the data set's, unchanged
            part_chain(args, work, data, shared, runner, res)
        if "changes" in parts:
            part_changes(args, work, data, shared, runner, res)
    res["caches_dropped"] = res["caches_dropped"] and runner.dropped
    res["load_after"] = loadavg()
    res["total_s"] = time.monotonic() - started
    res["summary"] = summarize(res, args)
    res["targets"] = targets(res["summary"], args)
    if runner.profiled:
        res["profiled"] = runner.profiled
        text = "\n\n".join(summarize_profile(Path(f)) for f in runner.profiled
                           if Path(f).exists())
        (args.profile / "summary.txt").write_text(text + "\n")
    if args.json == "-":
        report(res, args, sys.stderr)
        emit_json(res)
        return
    report(res, args, sys.stdout)
    print(f"\ntotal {res['total_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
