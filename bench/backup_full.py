"""Full backup against the physical and CPU limits and against other tools (issue 5).

All in one run, on the same data: the common data set (``../shared/bench/gen_dataset.py``:
about 2 GiB, four 256 MiB half-compressible files, 40 medium files, 20,000 small files
in a three-level tree) written into a cluster disk of 4 GiB (4 KiB blocks); then

* ``sdbackup backup --compress none`` and ``--compress zstd:1`` (in-process, same code
  as the command), and ``restore-image`` of the ``none`` generation;
* the physical limits: copying the same used blocks with large ``os.pread``/``os.pwrite``
  (runs merged, 8 MiB per call) into one file, and writing them back to their places
  in a sparse file (the raw write rate that restore-image is held against);
  ``dd`` of the whole disk;
* the CPU limit: ``zstd -1 -T0`` compressing the same used bytes alone (from the page
  cache);
* restic and borg (``--compression zstd,1``) backing up the data set from local disk,
  and partclone.extfs imaging an ext4 file system holding the same tree.

Page caches are dropped before every timed phase except the zstd CLI one (root
needed; the output says whether it worked). Targets (ratios in this run):
none >= 0.8 x raw copy rate and faster than partclone; zstd:1 <= 1.3 x zstd CLI time
and >= 4x faster than restic and borg; restore-image >= 0.8 x raw write rate.

    .venv/bin/python bench/backup_full.py [--scale 1.0] [--dir DIR] [--keep] [--json FILE]
                                          [--dataset DIR] [--no-peers]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO / "src") not in sys.path:
    sys.path.insert(0, str(_REPO / "src"))

from common import drop_caches  # noqa: E402 - bench/ is the script's directory

from sdbackup.backup.engine import BackupOptions, run_backup  # noqa: E402
from sdbackup.blocks.blockset import BlockSet  # noqa: E402
from sdbackup.cluster.backup_source import LocalClusterSource  # noqa: E402
from sdbackup.cluster.local import DiskSpec, init_cluster, open_cluster  # noqa: E402
from sdbackup.fs import transfer  # noqa: E402
from sdbackup.media.generation import Generation, GenerationReader  # noqa: E402
from sdbackup.restore.image import restore_image  # noqa: E402

MiB = 1 << 20
GEN_DATASET = _REPO.parent / "shared" / "bench" / "gen_dataset.py"
BS = 4096


def timed(fn: Callable[[], Any], *, cold: bool = True) -> float:
    if cold:
        drop_caches()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def sh(*cmd: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, env={**os.environ, **(env or {})}, cwd=cwd,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr[-2000:]}")


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*"))


def raw_copy(disk: Path, runs: list[tuple[int, int]], out: Path) -> None:
    """The physical limit of the copy: the same blocks, large pread, one sequential file."""
    src = os.open(disk, os.O_RDONLY)
    dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for s, c in runs:
            data = os.pread(src, c * BS, s * BS)
            mv = memoryview(data)
            while mv:
                mv = mv[os.write(dst, mv):]
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)


def raw_write(raw: Path, runs: list[tuple[int, int]], out: Path, size: int) -> None:
    """The physical limit of restore-image: the same bytes read sequentially and written
    at their block positions into a sparse file."""
    src = os.open(raw, os.O_RDONLY)
    dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(dst, size)
        pos = 0
        for s, c in runs:
            data = os.pread(src, c * BS, pos)
            pos += len(data)
            mv = memoryview(data)
            off = s * BS
            while mv:
                n = os.pwrite(dst, mv, off)
                mv, off = mv[n:], off + n
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="data set scale (1.0: ~2 GiB)")
    ap.add_argument("--dir", type=Path, help="scratch directory (default: under /var/tmp)")
    ap.add_argument("--dataset", type=Path, help="use this data set instead of generating one")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--no-peers", action="store_true", help="skip restic, borg, partclone")
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each sdbackup and limit phase (the median is reported)")
    args = ap.parse_args()

    parent = args.dir or Path("/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sdbackup-bench-full-", dir=parent))
    res: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                                       "python": platform.python_version()},
                           "caches_dropped": drop_caches(), "times": {}, "bytes": {}}
    T: dict[str, float] = res["times"]
    mounted: Path | None = None

    runs: dict[str, list[float]] = res.setdefault("runs", {})

    def phase(name: str, fn: Callable[[], Any], *, cold: bool = True, repeat: int = 1,
              cleanup: Callable[[], Any] | None = None) -> None:
        print(f"  {name} ...", end="", flush=True, file=sys.stderr)
        for i in range(repeat):
            if i and cleanup is not None:
                cleanup()
            runs.setdefault(name, []).append(timed(fn, cold=cold))
            print(f" {runs[name][-1]:.2f} s", end="", flush=True, file=sys.stderr)
        T[name] = statistics.median(runs[name])
        print(f"  (median {T[name]:.2f} s)", file=sys.stderr)

    try:
        data = args.dataset
        if data is None:
            data = work / "dataset"
            print(f"generating the data set (scale {args.scale}) in {data}", file=sys.stderr)
            sh(sys.executable, str(GEN_DATASET), str(data), "--scale", str(args.scale))
        res["bytes"]["dataset"] = du(data)

        disk = work / "d0.img"
        cdir = work / "cluster"
        init_cluster(cdir, [DiskSpec("d0", disk, 4 << 30)], block_size=BS)
        print("writing the data set into the cluster", file=sys.stderr)
        t0 = time.perf_counter()
        with open_cluster(cdir) as c:
            transfer.put(c.fs, data, "/")
            c.fs.fsync()
            used = BlockSet.from_runs(c.meta.used_runs(1))
        res["times"]["fs_put"] = time.perf_counter() - t0
        used_bytes = len(used) * BS
        res["bytes"]["used"] = used_bytes
        res["used_runs"] = used.num_runs()
        big_runs = used.coalesced_runs(0, (8 * MiB) // BS)

        print("timing", file=sys.stderr)
        for comp, level in (("none", 0), ("zstd", 1)):
            name = f"sdbackup_{comp}{level or ''}"
            medium = work / f"medium-{name}"

            def run(medium: Path = medium, comp: str = comp, level: int = level,
                    name: str = name) -> None:
                opts = BackupOptions(compression=comp, level=max(level, 1))  # type: ignore[arg-type]
                with open_cluster(cdir) as c:
                    r = run_backup(LocalClusterSource(c), medium, opts)
                    res[f"{name}_freeze_s"] = r.manifest.freeze_seconds

            phase(name, run, repeat=args.repeat,
                  cleanup=lambda medium=medium: shutil.rmtree(medium))
            res["bytes"][name] = du(medium)

        phase("raw_copy", lambda: raw_copy(disk, big_runs, work / "raw.bin"), repeat=args.repeat)
        phase("dd_whole_disk", lambda: sh("dd", f"if={disk}", f"of={work / 'dd.img'}", "bs=8M",
                                          "conv=fsync", "status=none"))
        (work / "dd.img").unlink()
        # the CPU limit: compress the same bytes alone, input in the page cache
        with open(work / "raw.bin", "rb") as f:
            while f.read(64 * MiB):
                pass
        phase("zstd_cli_T0_null", lambda: sh("zstd", "-1", "-T0", "-q", "-f",
                                             str(work / "raw.bin"), "-o", "/dev/null"),
              cold=False, repeat=args.repeat)

        def zstd_file() -> None:  # the same work as a backup: read, compress, write, sync
            sh("zstd", "-1", "-T0", "-q", "-f", str(work / "raw.bin"), "-o",
               str(work / "raw.zst"))
            os.sync()

        phase("zstd_cli_T0_file", zstd_file, repeat=args.repeat)
        res["bytes"]["zstd_cli"] = (work / "raw.zst").stat().st_size
        (work / "raw.zst").unlink()

        g = Generation.open(work / "medium-sdbackup_none")

        def restore() -> None:
            with GenerationReader(g) as reader:
                restore_image(reader, "d0", work / "restored.img")

        phase("restore_image", restore, repeat=args.repeat,
              cleanup=lambda: (work / "restored.img").unlink())
        same = subprocess.run(["cmp", "-s", str(disk), str(work / "restored.img")]).returncode
        res["restore_image_identical"] = same == 0
        (work / "restored.img").unlink()
        phase("raw_write", lambda: raw_write(work / "raw.bin", big_runs, work / "rw.img",
                                             4 << 30), repeat=args.repeat)
        (work / "rw.img").unlink()
        (work / "raw.bin").unlink()

        if not args.no_peers:
            env = {"RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(work / "restic-cache")}
            if shutil.which("restic"):
                sh("restic", "init", "-q", "-r", str(work / "restic"), env=env)
                phase("restic", lambda: sh("restic", "backup", "-q", "-r",
                                           str(work / "restic"), str(data), env=env))
                res["bytes"]["restic"] = du(work / "restic")
                shutil.rmtree(work / "restic", ignore_errors=True)
            if shutil.which("borg"):
                benv = {"BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                        "BORG_BASE_DIR": str(work / "borg-base")}
                sh("borg", "init", "-e", "none", str(work / "borg"), env=benv)
                phase("borg_zstd1", lambda: sh("borg", "create", "--compression", "zstd,1",
                                               f"{work / 'borg'}::a", str(data), env=benv))
                res["bytes"]["borg"] = du(work / "borg")
                shutil.rmtree(work / "borg", ignore_errors=True)
            if shutil.which("partclone.extfs") and os.geteuid() == 0:
                img = work / "ext4.img"
                sh("truncate", "-s", "4G", str(img))
                sh("mkfs.ext4", "-q", "-F", str(img))
                mnt = work / "mnt"
                mnt.mkdir()
                sh("mount", "-o", "loop", str(img), str(mnt))
                mounted = mnt
                sh("cp", "-a", f"{data}/.", str(mnt))
                sh("umount", str(mnt))
                mounted = None
                phase("partclone_extfs", lambda: sh("partclone.extfs", "-c", "-q", "-s",
                                                    str(img), "-O", str(work / "pc.img")))
                os.sync()
                res["bytes"]["partclone"] = du(work / "pc.img")
                (work / "pc.img").unlink()
    finally:
        if mounted is not None:
            subprocess.run(["umount", "-l", str(mounted)], check=False)
        if args.keep:
            print(f"scratch files kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    ub = res["bytes"]["used"]

    def rate(name: str) -> float:
        return ub / T[name] / MiB if T.get(name) else 0.0

    ratios: dict[str, Any] = {
        "none_vs_raw_copy_rate": T["raw_copy"] / T["sdbackup_none"],
        "zstd1_time_vs_zstd_cli_file": T["sdbackup_zstd1"] / T["zstd_cli_T0_file"],
        "zstd1_time_vs_zstd_cli_null": T["sdbackup_zstd1"] / T["zstd_cli_T0_null"],
        "restore_image_vs_raw_write_rate": T["raw_write"] / T["restore_image"],
    }
    targets = {
        "none >= 0.8 x raw copy rate": ratios["none_vs_raw_copy_rate"] >= 0.8,
        "zstd:1 <= 1.3 x zstd -1 -T0 time (to a file, synced)":
            ratios["zstd1_time_vs_zstd_cli_file"] <= 1.3,
        "zstd:1 <= 1.3 x zstd -1 -T0 time (to /dev/null)":
            ratios["zstd1_time_vs_zstd_cli_null"] <= 1.3,
        "restore-image >= 0.8 x raw write rate": ratios["restore_image_vs_raw_write_rate"] >= 0.8,
    }
    for peer, key in (("partclone", "partclone_extfs"), ("restic", "restic"),
                      ("borg", "borg_zstd1")):
        if key in T:
            mine = "sdbackup_none" if peer == "partclone" else "sdbackup_zstd1"
            ratios[f"{peer}_time_vs_{mine}"] = T[key] / T[mine]
            need = 1.0 if peer == "partclone" else 4.0
            targets[f"{mine} >= {need:g}x faster than {peer}"] = T[key] / T[mine] >= need
    res["ratios"] = ratios
    res["targets"] = targets

    print(f"\ndata set {res['bytes']['dataset'] / MiB:,.0f} MiB on disk, used blocks "
          f"{ub / MiB:,.0f} MiB in {res['used_runs']} runs; caches dropped: "
          f"{res['caches_dropped']}")
    print(f"{'phase':<18} {'seconds':>8} {'MiB/s (used)':>13} {'stored MiB':>11}")
    sizes = {"sdbackup_none": "sdbackup_none", "sdbackup_zstd1": "sdbackup_zstd1",
             "zstd_cli_T0_file": "zstd_cli", "restic": "restic", "borg_zstd1": "borg",
             "partclone_extfs": "partclone"}
    for k, v in T.items():
        stored = res["bytes"].get(sizes.get(k, ""), None)
        st = f"{stored / MiB:,.0f}" if stored else ""
        print(f"{k:<18} {v:>8.2f} {rate(k) if k != 'fs_put' else 0:>13,.0f} {st:>11}")
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    for k, ok in targets.items():
        print(f"  [{'ok' if ok else 'MISSED'}] {k}")
    print(f"restore-image identical to the disk: {res.get('restore_image_identical')}")
    try:
        res["load_average_after"] = os.getloadavg()
        print(f"load average at the end: {res['load_average_after']}")
    except OSError:
        pass
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
