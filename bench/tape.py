"""Reading backups on tape through the disk buffer (issue 16), in emulated drive time.

Builds a cluster, takes a 30-generation chain (a full holding one 256 MiB file, then
29 incrementals that each change 8 MiB of filler and some hold one of ten 1 MiB
files, so those lie scattered along the tape), writes it to a file-backed tape with
an LTO-8-class time model (parameters printed), and measures the drive's emulated
time for:

* mounting the newest generation (labels read, snapshot and chain opened);
* reading the 256 MiB file from the mounted generation, against the ideal: one
  locate from where the head was plus its bytes at streaming speed (target <= 1.2x);
* reading the ten 1 MiB files in the order given (one after another) and all at once
  (ten readers: the buffer batches the misses and sweeps them in tape order);
* a whole-image restore of the disk, against one streaming pass over the tape from
  the first block it needs to the last (target <= 1.1x);
* restore-everything-first (what Proxmox Backup Server and Bareos do): read every
  generation of the chain from tape to disk, then read the files from disk;
* a full backup straight to tape (Fig. 36) with the copy limited to 150 MB/s (slower
  than the drive): the drive's time through the 256 MiB spool and through a spool of
  two tape blocks (write-through: the drive shoe-shines), against one start and
  streaming the bytes;
* from a host without the drive (c.4): the big file and the ten small ones (read at
  once) through ``sdbackup tape serve`` in another process, over loopback: the same
  drive time as next to the drive, and the wall time the network path adds.

    python bench/tape.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MiB, bench_dir, emit_json, print_table

from sdbackup.backup.engine import BackupOptions, run_backup
from sdbackup.cluster.backup_source import LocalClusterSource
from sdbackup.cluster.local import DiskSpec, init_cluster, open_cluster
from sdbackup.fs.readonly import ReadOnlyFileSystem
from sdbackup.media.chain import open_chain
from sdbackup.media.medium import DiskMedium
from sdbackup.media.tape.catalog import TapeCatalog
from sdbackup.media.tape.filetape import FileTape, TapeModel
from sdbackup.media.tape.library import TapeLibrary, open_set, write_generations
from sdbackup.net import messages as msg
from sdbackup.net.tape import open_remote_set
from sdbackup.restore.image import restore_image
from sdbackup.types import ROOT_INODE

BACKUP_RATE = 150_000_000
"""The copy's read rate for the backups straight to tape: slower than the drive."""


def build(base: Path, gens: int, big: int) -> tuple[Path, Path]:
    cdir = base / "cluster"
    init_cluster(cdir, [DiskSpec("d0", base / "d0.img", big + 512 * MiB)], block_size=4096)
    medium = base / "medium"
    opts = BackupOptions(compression="none")
    with open_cluster(cdir) as c:
        fs = c.fs
        big_ino = fs.create(ROOT_INODE, b"big").ino
        for off in range(0, big, 8 * MiB):
            fs.write(big_ino, off, os.urandom(8 * MiB))
        filler = fs.create(ROOT_INODE, b"filler").ino
        fs.write(filler, 0, os.urandom(64 * MiB))
        run_backup(LocalClusterSource(c), medium, opts)
        for g in range(1, gens):
            fs.write(filler, (g % 8) * 8 * MiB, os.urandom(8 * MiB))
            for i in range(10):
                if 1 + i * (gens - 1) // 10 == g:
                    ino = fs.create(ROOT_INODE, f"small{i}".encode()).ino
                    fs.write(ino, 0, os.urandom(MiB))
            run_backup(LocalClusterSource(c), medium,
                       dataclasses.replace(opts, incremental=True))
    return cdir, medium


def file_bytes_on_tape(fs: ReadOnlyFileSystem, ino: int) -> int:
    return fs.getattr(ino).size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 generations, a 64 MiB file")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    gens = 10 if args.quick else 30
    big = 64 * MiB if args.quick else 256 * MiB
    model = TapeModel()
    out: dict[str, Any] = {"generations": gens, "big_file": big, "model": model.describe()}
    with bench_dir("sdbackup-bench-tape-") as base:
        t = time.monotonic()
        _cdir, medium = build(base, gens, big)
        out["build_seconds"] = round(time.monotonic() - t, 1)
        tape = base / "t1.tape"
        FileTape.create(tape, 12 * 10**12 // 1000, model=model)  # 12 GB: LTO-8 / 1000
        cat = TapeCatalog(base / "catalog")
        med = DiskMedium.open(medium)
        with TapeLibrary.open([f"file:{tape}"], write=True) as lib:
            rep = write_generations(med, med.committed(), lib, cat)
            out["write"] = {"bytes": rep.bytes, "drive_seconds": round(rep.drive_seconds, 1),
                            "wall_seconds": round(rep.wall_seconds, 1),
                            "backhitches": lib.devices[0].stats.backhitches}
            out["tape"] = lib.devices[0].describe()
        rows = []

        def run(name: str, fn: Any) -> dict[str, Any]:
            s = open_set([f"file:{tape}"], base / f"buf-{name}", catalog=cat, limit=2 << 30)
            dev = s.lib.devices[0]
            try:
                r: dict[str, Any] = fn(s, dev)
            finally:
                s.close()
            return r

        def mount_and(s: Any, dev: Any, body: Any) -> dict[str, Any]:
            c0 = dev.clock
            snap, reader = open_chain(s.medium, s.medium.resolve(None))
            fs = ReadOnlyFileSystem(snap, reader)
            mount_s = dev.clock  # from loading the cartridge (the clock starts at open)
            del c0
            try:
                res: dict[str, Any] = body(fs, dev)
            finally:
                reader.close()
                snap.close()
            return {"mount": mount_s, **res}

        def read_file(fs: ReadOnlyFileSystem, ino: int) -> None:
            size = fs.getattr(ino).size
            for off in range(0, size, MiB):
                fs.read(ino, off, MiB)

        def big_file(fs: ReadOnlyFileSystem, dev: Any) -> dict[str, Any]:
            ino = fs.lookup(ROOT_INODE, b"big").ino
            # the ideal: one locate from where the head is to the file, then streaming
            first = fs.lookup(ROOT_INODE, b"big")
            del first
            pos0 = dev.tell()
            c0, l0 = dev.clock, dev.stats.locates
            w0 = time.monotonic()
            read_file(fs, ino)
            wall = time.monotonic() - w0
            took = dev.clock - c0
            seeks = dev.stats.seeks[-(dev.stats.locates - l0):] if dev.stats.locates > l0 \
                else []
            target = seeks[0] if seeks else pos0
            motion = type(dev._motion)(dev.model, dev.capacity)
            motion.direction = 1
            from sdbackup.media.tape.device import TapeStats

            locate = motion.locate(dev._tape[pos0], dev._tape[target], TapeStats())
            ideal = locate + big / dev.model.speed
            return {"read": took, "ideal": ideal, "ratio": took / ideal, "wall": wall,
                    "locates": dev.stats.locates - l0, "seeks": seeks[:20],
                    "locate_s": dev.stats.locate_seconds, "dirs": dev.stats.direction_changes}

        r = run("big", lambda s, dev: mount_and(s, dev, big_file))
        out["one_file"] = r
        rows.append(["mount newest generation", f"{r['mount']:.1f}", "", ""])
        rows.append([f"read one {big >> 20} MiB file", f"{r['read']:.1f}",
                     f"{r['ideal']:.1f}", f"{r['ratio']:.2f}"])

        def smalls(fs: ReadOnlyFileSystem, dev: Any, together: bool) -> dict[str, Any]:
            inos = [fs.lookup(ROOT_INODE, f"small{i}".encode()).ino for i in range(10)]
            c0, l0 = dev.clock, dev.stats.locates
            if together:
                ths = [threading.Thread(target=read_file, args=(fs, i)) for i in inos]
                for th in ths:
                    th.start()
                for th in ths:
                    th.join()
            else:
                for i in reversed(inos):  # the order given: newest first
                    read_file(fs, i)
            return {"read": dev.clock - c0, "locates": dev.stats.locates - l0,
                    "seeks": dev.stats.seeks[len(dev.stats.seeks) - (dev.stats.locates - l0):],
                    "dirs": dev.stats.direction_changes}

        r1 = run("s1", lambda s, dev: mount_and(s, dev, lambda fs, d: smalls(fs, d, False)))
        r2 = run("s2", lambda s, dev: mount_and(s, dev, lambda fs, d: smalls(fs, d, True)))
        out["ten_files"] = {"in_order_given": r1, "sorted_by_buffer": r2}
        rows.append(["ten 1 MiB files, order given", f"{r1['read']:.1f}", "",
                     f"{r1['locates']} locates"])
        rows.append(["ten 1 MiB files, sorted by buffer", f"{r2['read']:.1f}", "",
                     f"{r2['locates']} locates"])

        def image(s: Any, dev: Any) -> dict[str, Any]:
            from sdbackup.media.chain import ChainReader

            c0 = dev.clock
            with ChainReader(s.medium, s.medium.resolve(None)) as rd:
                restore_image(rd, "d0", base / "image")
            took = dev.clock - c0
            order = s.buffer.stats.order
            lo, hi = min(b for _, b in order), max(b for _, b in order)
            span = dev._tape[hi + 1] - dev._tape[lo]
            motion = type(dev._motion)(dev.model, dev.capacity)
            from sdbackup.media.tape.device import TapeStats

            ideal = motion.locate(0, dev._tape[lo], TapeStats()) + span / dev.model.speed
            return {"restore": took, "one_pass": ideal, "ratio": took / ideal,
                    "locates": dev.stats.locates}

        r = run("img", image)
        out["image"] = r
        os.unlink(base / "image")
        rows.append(["whole-image restore", f"{r['restore']:.1f}", f"{r['one_pass']:.1f}",
                     f"{r['ratio']:.2f}"])

        def everything_first(s: Any, dev: Any) -> dict[str, Any]:
            # read every block of the chain's generations from the tape to disk first
            c0 = dev.clock
            dev.rewind()
            dev.space_files(1)
            n = 0
            from sdbackup.media.tape.device import EndOfData

            with open(base / "staging", "wb") as f:
                while True:
                    try:
                        b = dev.read(dev.max_block)
                    except EndOfData:
                        break
                    f.write(b)
                    n += len(b)
            os.unlink(base / "staging")
            return {"stage": dev.clock - c0, "bytes": n}

        r = run("all", everything_first)
        out["restore_everything_first"] = r
        rows.append(["restore everything first (then any file)", f"{r['stage']:.1f}", "", ""])
        def remote(name: str, body: Any, gather: float = 0.03) -> dict[str, Any]:
            """``body(fs)`` on a generation read through a tape server (another process)."""
            secret = base / "secret"
            secret.write_text(os.urandom(32).hex())
            log = base / f"server-{name}.log"
            with open(log, "wb") as lf:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "sdbackup.cli.main", "tape", "serve", "--tape",
                     f"file:{tape}", "--buffer", str(base / f"buf-remote-{name}"),
                     "--buffer-size", "2GiB", "--catalog", str(cat.root), "--secret-file",
                     str(secret), "--gather", str(gather)], stdout=lf,
                    stderr=subprocess.STDOUT)
            try:
                while not (m := re.search(r"listening on (\S+)\n", log.read_text())):
                    if proc.poll() is not None:
                        raise SystemExit(log.read_text())
                    time.sleep(0.05)
                with open_remote_set(m.group(1), secret.read_bytes().strip()) as rs:
                    def drive() -> dict[str, Any]:
                        body_, _ = rs.peer.call(msg.TapeInfo())
                        d: dict[str, Any] = next(iter(body_["stats"]["drives"].values()))
                        return d

                    snap, reader = open_chain(rs.medium, rs.medium.resolve(None))
                    try:
                        fs = ReadOnlyFileSystem(snap, reader)
                        d0, w0 = drive(), time.monotonic()
                        body(fs)
                        wall = time.monotonic() - w0
                        d1 = drive()
                    finally:
                        reader.close()
                        snap.close()
                    return {"read": d1["seconds"] - d0["seconds"], "wall": wall,
                            "locates": d1["locates"] - d0["locates"],
                            "requests": rs.blocks.requests, "bytes": rs.blocks.bytes}
            finally:
                proc.terminate()
                proc.wait(30)

        def big_remote(fs: ReadOnlyFileSystem) -> None:
            read_file(fs, fs.lookup(ROOT_INODE, b"big").ino)

        def smalls_remote(fs: ReadOnlyFileSystem) -> None:
            inos = [fs.lookup(ROOT_INODE, f"small{i}".encode()).ino for i in range(10)]
            ths = [threading.Thread(target=read_file, args=(fs, i)) for i in inos]
            for th in ths:
                th.start()
            for th in ths:
                th.join()

        rb = remote("big", big_remote)
        rs10 = remote("s", smalls_remote)
        rs10g = remote("sg", smalls_remote, gather=0.2)
        rbg = remote("bigg", big_remote, gather=0.2)
        out["tape_server"] = {"one_file": rb, "ten_files_at_once": rs10,
                              "gather_0.2": {"one_file": rbg, "ten_files_at_once": rs10g},
                              "local_one_file_wall": out["one_file"]["wall"]}
        rows.append([f"tape server: one {big >> 20} MiB file", f"{rb['read']:.1f}",
                     f"{out['one_file']['read']:.1f}",
                     f"wall {rb['wall']:.2f} s ({big / MiB / rb['wall']:.0f} MiB/s), "
                     f"here {out['one_file']['wall']:.2f} s"])
        rows.append(["tape server: ten 1 MiB files at once", f"{rs10['read']:.1f}",
                     f"{r2['read']:.1f}", f"{rs10['locates']} locates"])
        rows.append([f"  --gather 0.2: one {big >> 20} MiB file", f"{rbg['read']:.1f}",
                     f"{out['one_file']['read']:.1f}",
                     f"wall {rbg['wall']:.2f} s ({big / MiB / rbg['wall']:.0f} MiB/s)"])
        rows.append(["  --gather 0.2: ten 1 MiB files at once", f"{rs10g['read']:.1f}",
                     f"{r2['read']:.1f}", f"{rs10g['locates']} locates"])

        def to_tape(name: str, spool: int) -> dict[str, Any]:
            """A full backup straight to tape (Fig. 36) with a copy slower than the drive
            (--bwlimit): the drive's time against streaming the same bytes."""
            from sdbackup.media.tape.sink import TapeSpec

            t = base / f"bk-{name}.tape"
            FileTape.create(t, 12 * 10**12 // 1000, model=model)
            spec = TapeSpec((f"file:{t}",), base / f"cat-{name}", base / "spool", spool)
            opts = BackupOptions(compression="none", tape=spec, bwlimit=BACKUP_RATE)
            with open_cluster(_cdir) as c:
                res = run_backup(LocalClusterSource(c), "", opts)
            info = res.summary()["tape"]
            assert isinstance(info, dict)
            # the ideal: the drive starts once (it idled since the label) and streams
            ideal = 2 * model.change_direction + info["bytes_written"] / model.speed
            t.unlink()
            return {"drive": info["drive_seconds"], "ideal": ideal,
                    "ratio": info["drive_seconds"] / ideal,
                    "backhitches": info["backhitches"], "spool": info["spool"],
                    "wall": res.seconds, "bytes": info["bytes_written"]}

        bk = {"spool_256MiB": to_tape("spool", 256 * MiB),
              "spool_2_blocks": to_tape("nospool", 512 << 10)}
        out["backup_to_tape"] = {"copy_rate": BACKUP_RATE, **bk}
        for label, k in (("256 MiB spool", "spool_256MiB"), ("2-block spool", "spool_2_blocks")):
            r = bk[k]
            rows.append([f"backup to tape, copy {BACKUP_RATE / 1e6:.0f} MB/s, {label}",
                         f"{r['drive']:.1f}", f"{r['ideal']:.1f}",
                         f"{r['ratio']:.2f}, {r['backhitches']} backhitches"])
        print(out["tape"])
        print(f"{gens} generations; write to tape: {out['write']}")
        print_table(["operation", "emulated s", "ideal s", "ratio / note"], rows)
        if args.json:
            emit_json(out)


if __name__ == "__main__":
    main()
