"""File groups (issue 15): a group's backup against a full image backup, restic and borg.

On the common data set (``../shared/bench/gen_dataset.py``, about 2 GiB at scale 1:
four 256 MiB files, 40 medium files, 20,000 small files in ``small/dNN/eNN/fNN/``),
written into a cluster (one sparse disk image on a real disk, 4 KiB blocks), a group of
10 % of the files scattered over the whole tree:

    small/*/*/*/s03.dat     one small file in every leaf directory (2,000 of 20,000)
    medium/med?3.bin        4 of the 40 medium files

Timed, each with the page cache dropped first, as whole commands:

1. ``sdbackup backup --medium M1`` -- a full image backup of the cluster;
2. ``sdbackup backup --group g --medium M2`` -- the group's full backup (its block list
   at T0, copied as one batch);
3. ``restic backup --files-from LIST`` and ``borg create --patterns-from LIST`` -- the
   same include patterns, on the data set as a plain tree (fresh repositories);
4. then 1 % of the data set changes (``modify_dataset.py --blocks 5000``, the same
   change applied through the cluster's file system, as in bench/incremental.py), and
   ``sdbackup backup --group g --incremental``, restic's and borg's next backup with the
   same patterns are timed.

Target (issue 15): the group backup >= 3x faster than restic and borg.

    .venv/bin/python bench/groups.py               # scale 1 (about 2 GiB), ~6 minutes
    .venv/bin/python bench/groups.py --scale 0.25  # quicker
    .venv/bin/python bench/groups.py --json F      # table on stdout, JSON in F
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import MiB, bench_dir, emit_json, format_table, machine_info, median
from incremental import (
    SDB,
    Runner,
    apply_to_cluster,
    draw_change,
    du,
    gen_sizes,
    git_commit,
    log,
    modify_tree,
    put_tree,
    sh,
    shared_bench_dir,
)

BS = 4096
SEED = 20240601
PATTERNS = ["small/*/*/*/s03.dat", "medium/med?3.bin"]


class Peer:
    """restic or borg backing up the group's patterns of the tree, one repository."""

    def __init__(self, tool: str, work: Path, data: Path, runner: Runner) -> None:
        self.tool, self.work, self.data, self.runner = tool, work, data, runner
        self.repo = work / tool
        work.mkdir(parents=True, exist_ok=True)
        self.n = 0
        self.env = {**os.environ}
        pats = work / f"{tool}.list"
        if tool == "restic":
            self.env.update(RESTIC_PASSWORD="bench", RESTIC_CACHE_DIR=str(work / "rcache"))
            pats.write_text("".join(f"{data}/{p}\n" for p in PATTERNS))
            sh("restic", "init", "-q", "-r", str(self.repo), env=self.env)
            self.cmd = ["restic", "backup", "-q", "-r", str(self.repo), "--files-from",
                        str(pats)]
            self.version = sh("restic", "version").strip()
        else:
            self.env.update(BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                            BORG_BASE_DIR=str(work / "borg-base"))
            rel = str(data).lstrip("/")
            pats.write_text(f"R {data}\n" + "".join(f"+ sh:{rel}/{p}\n" for p in PATTERNS)
                            + f"- sh:{rel}/**\n")
            sh("borg", "init", "-e", "none", str(self.repo), env=self.env)
            self.cmd = ["borg", "create", "--compression", "zstd,1", "--patterns-from",
                        str(pats)]
            self.version = sh("borg", "--version").strip()

    def backup(self) -> dict[str, float]:
        self.n += 1
        before = du(self.repo)
        cmd = self.cmd + ([f"{self.repo}::b{self.n}"] if self.tool == "borg" else [])
        dt, _ = self.runner.timed(cmd, self.env)
        return {"seconds": dt, "added": du(self.repo) - before}


def count_group(data: Path) -> tuple[int, int, int, int]:
    """(files in the data set, bytes, files the patterns select, their bytes)."""
    n = b = gn = gb = 0
    for dirpath, _dirs, files in os.walk(data):
        for f in files:
            p = Path(dirpath) / f
            rel = str(p.relative_to(data))
            size = p.stat().st_size
            n += 1
            b += size
            if any(fnmatch.fnmatchcase(rel, pat) and rel.count("/") == pat.count("/")
                   for pat in PATTERNS):
                gn += 1
                gb += size
    return n, b, gn, gb


def one_round(args: argparse.Namespace, r: int, work: Path, data: Path, shared: Path,
              cdir: Path, runner: Runner) -> dict[str, Any]:
    rd: dict[str, Any] = {}
    comp = ["--compress", args.compress]
    m_full, m_group = work / f"m-full-{r}", work / f"m-group-{r}"
    dt, s = runner.sdb(["backup", str(cdir), "--medium", str(m_full), *comp])
    rd["image_full"] = {"seconds": dt, "engine_seconds": s["seconds"], "blocks": s["blocks"],
                        **gen_sizes(m_full, s["generation"])}
    dt, s = runner.sdb(["backup", str(cdir), "--group", "g", "--medium", str(m_group), *comp])
    rd["group_full"] = {"seconds": dt, "engine_seconds": s["seconds"], "blocks": s["blocks"],
                        "files": s["group_files"], "freeze_seconds": s["freeze_seconds"],
                        **gen_sizes(m_group, s["generation"])}
    peers = [Peer(t, work / f"peers-{r}", data, runner) for t in ("restic", "borg")
             if shutil.which(t) and not args.no_peers]
    rd["versions"] = {p.tool: p.version for p in peers}
    for p in peers:
        rd[f"{p.tool}_full"] = p.backup()
    log(f"round {r + 1}: image full {rd['image_full']['seconds']:.2f} s, group full "
        f"{rd['group_full']['seconds']:.2f} s"
        + "".join(f", {p.tool} {rd[p.tool + '_full']['seconds']:.2f} s" for p in peers))
    # 1 % change of the data set, the same in the tree and in the cluster
    seed = args.seed + r
    ch = draw_change(shared, data, seed, args.blocks)
    modify_tree(shared, data, seed, args.blocks)
    apply_to_cluster(cdir, "/" + data.name, data, ch)
    in_group = [a for a in ch.appends if any(
        fnmatch.fnmatchcase(a[0], p) for p in PATTERNS)]
    rd["change"] = {"bytes": ch.new_bytes, "group_appends": len(in_group),
                    "group_bytes": sum(len(d) for _, d in in_group)}
    dt, s = runner.sdb(["backup", str(cdir), "--group", "g", "--incremental",
                        "--medium", str(m_group), *comp])
    if s["kind"] != "incremental":
        raise RuntimeError(f"expected an incremental, got {s['kind']}")
    rd["group_incremental"] = {"seconds": dt, "engine_seconds": s["seconds"],
                               "blocks": s["blocks"], **gen_sizes(m_group, s["generation"])}
    for p in peers:
        rd[f"{p.tool}_incremental"] = p.backup()
    log(f"  after 1 %: group incremental {rd['group_incremental']['seconds']:.2f} s "
        f"({s['blocks']} blocks)"
        + "".join(f", {p.tool} {rd[p.tool + '_incremental']['seconds']:.2f} s"
                  for p in peers))
    # The group's files restored from the incremental equal the tree's.
    dest = work / "check"
    runner.timed([*SDB, "restore", "--medium", str(m_group), "-q", "--to", str(dest)],
                 runner.env)
    bad = []
    for dirpath, _d, files in os.walk(dest):
        for f in files:
            p = Path(dirpath) / f
            rel = p.relative_to(dest / data.name)
            if p.read_bytes() != (data / rel).read_bytes():
                bad.append(str(rel))
    shutil.rmtree(dest, ignore_errors=True)
    if bad:
        raise RuntimeError(f"restored group files differ from the tree: {bad[:5]}")
    rd["restore_check"] = "the group's files restored from the incremental = the tree"
    for d in [m_full, m_group, *(p.work for p in peers)]:
        shutil.rmtree(d, ignore_errors=True)
    return rd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=None,
                    help="modify_dataset.py --blocks (default: 5000 x scale, 1 %%)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--compress", default="zstd:1")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--shared-bench", type=Path)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE")
    args = ap.parse_args()
    args.blocks = args.blocks or max(10, int(5000 * args.scale))
    shared = shared_bench_dir(args.shared_bench)
    res: dict[str, Any] = {"machine": machine_info(), "commit": git_commit(),
                           "scale": args.scale, "patterns": PATTERNS}
    runner = Runner(None)
    from sdbackup.cluster.local import DiskSpec, init_cluster

    with bench_dir("sdbackup-groups-", keep=args.keep) as work:
        data = work / "data"
        log(f"generating the data set (scale {args.scale}) ...")
        sh(sys.executable, str(shared / "gen_dataset.py"), str(data), "--seed",
           str(args.seed), "--scale", str(args.scale))
        n, b, gn, gb = count_group(data)
        res.update(files=n, bytes=b, group_files=gn, group_bytes=gb)
        log(f"data set: {n} files, {b / MiB:,.0f} MiB; the group: {gn} files "
            f"({gn / n:.1%}), {gb / MiB:,.1f} MiB")
        cdir = work / "cluster"
        size = du(data)
        init_cluster(cdir, [DiskSpec("d0", work / "d0.img",
                                     max(256 * MiB, (int(size * 1.6) + 256 * MiB) // MiB * MiB))],
                     block_size=BS)
        res["fs_put_s"] = put_tree(cdir, data)
        incl = [a for p in PATTERNS for a in ("--include", f"{data.name}/{p}")]
        r = subprocess.run([*SDB, "group", "add", str(cdir), "g", *incl],
                           env=runner.env, capture_output=True, text=True, check=True)
        log(r.stdout.strip())
        t = time.perf_counter()
        subprocess.run([*SDB, "group", "show", str(cdir), "g", "--json", "--limit", "1"],
                       env=runner.env, capture_output=True, check=True)
        res["group_show_s"] = time.perf_counter() - t
        rounds = [one_round(args, i, work, data, shared, cdir, runner)
                  for i in range(args.rounds)]
        res["rounds"] = rounds
        res["cache_dropped"] = runner.dropped

    def med(path: str) -> float:
        a, k = path.split(".")
        vals = [rd[a][k] for rd in rounds if a in rd]
        return median(vals) if vals else float("nan")

    rows = []
    for label, key in [("image full (whole cluster)", "image_full"),
                       ("group full", "group_full"), ("restic, group patterns", "restic_full"),
                       ("borg, group patterns", "borg_full"),
                       ("group incremental after 1 %", "group_incremental"),
                       ("restic next backup", "restic_incremental"),
                       ("borg next backup", "borg_incremental")]:
        if key not in rounds[0]:
            continue
        secs = med(f"{key}.seconds")
        stored = rounds[0][key].get("data", rounds[0][key].get("added", 0))
        rows.append([label, round(secs, 2), f"{stored / MiB:,.1f} MiB"])
    ratios = {}
    g, gi = med("group_full.seconds"), med("group_incremental.seconds")
    ratios["image_full / group_full"] = med("image_full.seconds") / g
    for t in ("restic", "borg"):
        if f"{t}_full" in rounds[0]:
            ratios[f"{t} / group (full)"] = med(f"{t}_full.seconds") / g
            ratios[f"{t} / group (incremental)"] = med(f"{t}_incremental.seconds") / gi
    res["ratios"] = ratios
    table = format_table(["backup", "seconds", "stored"], rows)
    table += "\n" + "\n".join(f"{k}: {v:.1f}x" for k, v in ratios.items())
    table += (f"\n(data set {res['files']} files, {res['bytes'] / MiB:,.0f} MiB; group "
              f"{res['group_files']} files, {res['group_bytes'] / MiB:,.1f} MiB; "
              f"page cache dropped: {res['cache_dropped']})")
    if args.json == "-":
        print(table, file=sys.stderr)
        emit_json(res)
    else:
        print(table)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
