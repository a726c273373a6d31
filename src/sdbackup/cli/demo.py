"""``sdbackup demo``: the whole product working on a throw-away cluster.

Each feature adds its step here, so that the demo always shows everything that
works, end to end, through the same code paths as the real commands. The steps import
what they use when they run (see :mod:`sdbackup.cli.main`).
"""

from __future__ import annotations

import filecmp
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sdbackup.errors import FsError, SdbError

if TYPE_CHECKING:
    from sdbackup.media.chain import GenerationSource


def register(cli: click.Group) -> None:
    cli.add_command(demo)


def make_sample_tree(root: Path, seed: int = 7) -> int:
    """A small, varied tree: text, binary, sparse, empty files, symlinks, a hard link."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    total = 0
    for d in ("docs", "src/pkg", "data/raw", "empty-dir"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(40):
        text = "".join(rng.choice("abcdefghij \n") for _ in range(rng.randint(0, 9000)))
        p = root / ("docs" if i % 2 else "src/pkg") / f"file{i:02d}.txt"
        p.write_text(text)
        total += len(text)
    blob = rng.randbytes(3 << 20)
    (root / "data/raw/blob.bin").write_bytes(blob)
    total += len(blob)
    with open(root / "data/sparse.img", "wb") as f:
        f.seek(5 << 20)
        f.write(b"end of a sparse file\n")
    (root / "data/empty").write_bytes(b"")
    os.symlink("raw/blob.bin", root / "data/blob-link")
    os.symlink("/nonexistent/target", root / "data/dangling")
    os.link(root / "docs/file01.txt", root / "docs/hardlink-to-01.txt")
    os.chmod(root / "src/pkg/file00.txt", 0o600)
    return total


@click.command()
@click.option("--dir", "workdir", type=click.Path(path_type=Path),
              help="Where to create the demo cluster (default: a temporary directory, "
                   "removed at the end).")
@click.option("--keep", is_flag=True, help="Keep the demo directory afterwards.")
def demo(workdir: Path | None, keep: bool) -> None:
    """Run the main job on the embedded default: a local cluster on sparse-file disks.

    Creates a cluster with two 256 MiB sparse disks, copies a sample tree in, shows
    what the cluster holds and which blocks are used, checks it with fsck, and copies
    everything back out comparing it byte for byte.
    """
    base = Path(tempfile.mkdtemp(prefix="sdbackup-demo-")) if workdir is None else workdir
    base.mkdir(parents=True, exist_ok=True)
    try:
        _run(base)
    finally:
        if workdir is None and not keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            click.echo(f"demo files kept in {base}")


def _step(msg: str) -> None:
    click.secho(f"==> {msg}", bold=True)


def _run(base: Path) -> None:
    from sdbackup.cluster.local import DiskSpec, init_cluster, open_cluster
    from sdbackup.fs import transfer
    from sdbackup.meta import fsck as fsck_mod

    cdir = base / "cluster"
    _step(f"init a cluster in {cdir} with two sparse 256 MiB disks")
    init_cluster(cdir, [DiskSpec.parse(f"d0={base}/disk0.img:256MiB"),
                        DiskSpec.parse(f"d1={base}/disk1.img:256MiB")])
    sample = base / "sample"
    nbytes = make_sample_tree(sample)
    _step(f"write a sample tree ({nbytes / 1e6:.1f} MB) into the cluster")
    with open_cluster(cdir) as c:
        c.fs.mkdir(1, b"home")
        transfer.put(c.fs, sample, "/home")
        st = c.fs.statfs()
        _step("what the cluster holds")
        for d in c.config.disks:
            bm = c.meta.bitmaps[d.id]
            runs = c.meta.used_runs(d.id)
            click.echo(f"  disk {d.name}: {bm.used_blocks()} of {bm.nblocks} blocks used, "
                       f"in {len(runs)} runs; first runs: {runs[:4]}")
        click.echo(f"  {st.files} inodes, {st.free} free blocks of {st.blocks}")
        for ent in c.fs.listdir(c.fs.resolve("/home/sample").ino):
            kind = "dir " if ent.attr.is_dir else "link" if ent.attr.is_link else "file"
            click.echo(f"  {kind} /home/sample/{os.fsdecode(ent.name)}")
        _step("fsck")
        problems = fsck_mod.check_all(c.store)
        for p in problems:
            click.echo(f"  {p.check}: {p.message}")
        if problems:
            raise SdbError("demo: fsck found problems (a bug: please report it)", 1)
        click.echo(f"  consistent ({len(fsck_mod.CHECKS)} checks)")
        _step("copy the tree back out and compare")
        out = base / "out"
        out.mkdir()
        transfer.get(c.fs, "/home/sample", out)
    diff = _diff(sample, out / "sample")
    if diff:
        raise SdbError(f"demo: copied-out tree differs: {diff[:5]}", 1)
    click.echo("  identical (contents, symlinks, hard links, modes)")
    _cluster_step(cdir)
    _fuse_step(base)
    _backup_step(base, cdir, sample)
    _online_step(base, cdir)
    _incremental_step(base, cdir)
    _group_step(base, cdir)
    _mount_step(base)
    _step("demo finished")


def _cluster_step(cdir: Path) -> None:
    """A coordinator and two node agents as processes, writing through their caches."""
    from sdbackup.cluster.access import coordinator_client, open_fs
    from sdbackup.cluster.launch import start_coordinator, start_node
    from sdbackup.net import messages as msg

    _step("start a coordinator and two node agents (n1, n2) as processes")
    coord = start_coordinator(cdir)
    nodes = []
    try:
        nodes = [start_node(cdir, n, flush_delay=60) for n in ("n1", "n2")]
        rng = random.Random(11)
        payload = {n: rng.randbytes(3 << 20) for n in ("n1", "n2")}
        for n in ("n1", "n2"):
            with open_fs(cdir, node=n) as f:
                ino = f.create(1, f"from-{n}.bin".encode()).ino
                f.write(ino, 0, payload[n])
        with coordinator_client(cdir) as c:
            rows = msg.call(c, msg.CacheTable())[0]["entries"]
        _step("the cluster cache table (node, right, dirty, file area): writes sit dirty "
              "in each node's write-back cache")
        for r in rows:
            click.echo(f"  {r['node']:<4} {r['mode']} dirty={'yes' if r['dirty'] else 'no ':<3}"
                       f" {r['path']} bytes {r['offset']}-{r['offset'] + r['size']}")
        _step("n2 reads what n1 wrote (n1 is asked to write its area back first), and "
              "the other way round")
        for reader, writer in (("n2", "n1"), ("n1", "n2")):
            with open_fs(cdir, node=reader) as f:
                a = f.resolve(f"/from-{writer}.bin")
                same = f.read(a.ino, 0, a.size) == payload[writer]
            click.echo(f"  {reader} reads /from-{writer}.bin: "
                       f"{'identical' if same else 'DIFFERENT'}")
            if not same:
                raise SdbError("demo: a node read stale data (a bug: please report it)", 1)
        _step("cluster-wide flush: every node writes its dirty areas back")
        with coordinator_client(cdir) as c:
            r = msg.call(c, msg.FlushAll(30))[0]
            dirty = [e for e in msg.call(c, msg.CacheTable())[0]["entries"] if e["dirty"]]
        click.echo(f"  {r['nodes']} nodes flushed in {r['seconds'] * 1000:.1f} ms; "
                   f"dirty areas left: {len(dirty)}")
    finally:
        for p in nodes:
            p.stop()
        coord.stop()


def _fuse_step(base: Path) -> None:
    """Two node agents mounted with FUSE; ordinary programs on one, read on the other."""
    import subprocess

    from sdbackup.cluster.launch import start_coordinator, start_node
    from sdbackup.fs import fuse_mount

    try:
        fuse_mount.check_fuse()
    except SdbError as e:
        _step(f"FUSE mounts: skipped ({e})")
        return
    cdir = base / "cluster"
    mps = {n: base / f"mnt-{n}" for n in ("n1", "n2")}
    _step(f"mount the file system on two node agents (sdbackup node --mount): "
          f"{mps['n1']}, {mps['n2']}")

    def run(*args: object, cwd: Path | None = None) -> str:
        r = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                           timeout=120, check=False)
        if r.returncode != 0:
            raise SdbError(f"demo: {' '.join(map(str, args))} failed: {r.stderr.strip()}", 1)
        return r.stdout

    coord = start_coordinator(cdir)
    nodes = []
    try:
        for n, mp in mps.items():
            mp.mkdir(exist_ok=True)
            nodes.append(start_node(cdir, n, extra=["--mount", str(mp)]))
        for p, mp in zip(nodes, mps.values(), strict=True):
            deadline = time.monotonic() + 30
            while not (fuse_mount.is_mounted(mp) and os.stat(mp).st_dev != os.stat(base).st_dev):
                if not p.alive() or time.monotonic() > deadline:
                    raise SdbError(f"demo: node did not mount {mp}:\n{p.tail()}", 1)
                time.sleep(0.05)
        m1, m2 = mps["n1"] / "fuse-demo", mps["n2"] / "fuse-demo"
        m1.mkdir()
        click.echo("  n1$ cp -a sample fuse-demo/    (symlinks, hard links, modes, times)")
        run("cp", "-a", base / "sample", m1 / "sample")
        diff = _diff(base / "sample", m2 / "sample")
        a, b = (os.stat(m2 / "sample" / "docs" / f)
                for f in ("file01.txt", "hardlink-to-01.txt"))
        if diff or a.st_ino != b.st_ino:
            raise SdbError(f"demo: the other mount sees a different tree: {diff[:3]}", 1)
        click.echo(f"  n2 sees an identical tree; hard link kept: inode {a.st_ino} = "
                   f"{b.st_ino}, {a.st_nlink} links")
        click.echo("  n2$ tar -cf fuse-demo/sample.tar sample;  n1$ tar -tf ... | wc -l")
        run("tar", "-C", m2, "-cf", m2 / "sample.tar", "sample")
        click.echo(f"  n1 lists {len(run('tar', '-tf', m1 / 'sample.tar').splitlines())} "
                   "entries in the archive n2 wrote")
        if shutil.which("sqlite3"):
            click.echo("  n1$ sqlite3 fuse-demo/app.db 'CREATE TABLE ...; INSERT ...'   "
                       "n2$ sqlite3 fuse-demo/app.db 'INSERT ...'")
            run("sqlite3", m1 / "app.db", "CREATE TABLE notes(node TEXT, n INTEGER);"
                "INSERT INTO notes VALUES ('n1', 1), ('n1', 2);")
            run("sqlite3", m2 / "app.db", "INSERT INTO notes VALUES ('n2', 3);")
            rows = run("sqlite3", m1 / "app.db", "SELECT group_concat(node || ':' || n, ' ') "
                       "FROM notes; PRAGMA integrity_check;").split()
            click.echo(f"  n1 reads rows {' '.join(rows[:-1])}; integrity_check: {rows[-1]}")
        (m2 / "note.txt").write_text("written on n2, read on n1\n")
        click.echo(f"  n1$ cat fuse-demo/note.txt -> {run('cat', m1 / 'note.txt').strip()}")
        (m1 / "note.txt").rename(m1 / "renamed.txt")
        click.echo(f"  n1$ mv note.txt renamed.txt;  n2$ ls -> "
                   f"{' '.join(sorted(os.listdir(m2)))}")
        click.echo("  " + run("df", "-h", mps["n1"]).splitlines()[-1])
    finally:
        for p in nodes:
            p.stop()
        coord.stop()
    click.echo("  node agents stopped (SIGTERM): each unmounted itself; still mounted: "
               f"{[str(mp) for mp in mps.values() if fuse_mount.is_mounted(mp)] or 'none'}")


def _backup_step(base: Path, cdir: Path, sample: Path) -> None:
    """Full backup to a disk medium, verify, restore files, restore the whole cluster."""
    from sdbackup.backup.engine import BackupOptions, run_backup
    from sdbackup.backup.verify import verify_generation
    from sdbackup.cluster.backup_source import LocalClusterSource
    from sdbackup.cluster.local import open_cluster
    from sdbackup.fs import transfer
    from sdbackup.media.generation import Generation, GenerationReader
    from sdbackup.media.medium import DiskMedium
    from sdbackup.restore.files import restore_files
    from sdbackup.restore.image import restore_cluster

    medium = base / "medium"
    _step(f"full backup to the disk medium {medium}: only the used blocks, read in large "
          "batches that span many files (sdbackup backup)")
    with open_cluster(cdir) as c:
        res = run_backup(LocalClusterSource(c), medium, BackupOptions())
    s = res.summary()
    click.echo(f"  generation {s['generation']}: {s['blocks']} blocks in {s['runs']} runs "
               f"({int(str(s['raw_bytes'])) / 1e6:.1f} MB) -> {s['records']} records, "
               f"{int(str(s['stored_bytes'])) / 1e6:.1f} MB stored ({s['compression']}), "
               f"{float(str(s['seconds'])):.2f} s")
    _step("generations on the medium, and verify: every record re-read and checked")
    med = DiskMedium.open(medium)
    for m in med.committed():
        click.echo(f"  {m.id}  {m.kind}  {m.blocks} blocks  {m.state}")
    gen = Generation(med, med.resolve(None))
    rep = verify_generation(gen)
    if not rep.ok:
        raise SdbError(f"demo: verify found problems: {rep.problems[:3]}", 1)
    click.echo(f"  OK: {rep.records} records, {rep.blocks} blocks")
    _step("restore the files from the backup and compare with the originals")
    restored = base / "restored"
    with GenerationReader(gen) as reader:
        st = restore_files(gen, reader, restored, ["/home/sample"])
        diff = _diff(sample, restored / "home" / "sample")
        if diff:
            raise SdbError(f"demo: restored tree differs: {diff[:5]}", 1)
        click.echo(f"  {st.files} files, {st.symlinks} symlinks, {st.hardlinks} hard link(s): "
                   "identical")
        _step("disaster recovery: restore the whole cluster into a new directory, fsck it")
        new = base / "recovered-cluster"
        rc = restore_cluster(gen, reader, new)
    click.echo(f"  new cluster {rc.cluster_id} with disks "
               f"{', '.join(d.disk for d in rc.disks)}: fsck consistent "
               f"({rc.fsck_checks} checks)")
    out = base / "out-recovered"
    out.mkdir()
    with open_cluster(new) as c:
        transfer.get(c.fs, "/home/sample", out)
    diff = _diff(sample, out / "sample")
    if diff:
        raise SdbError(f"demo: recovered cluster differs: {diff[:5]}", 1)
    click.echo("  its files are identical to the originals")


@contextmanager
def _busy_cluster(base: Path, cdir: Path, copy_delay: str) -> Iterator[dict[str, int]]:
    """A coordinator (with the engine's T0-image test hook, so that the demo can prove
    a restore equals the image at T0) and two node agents whose writers keep writing
    64 KiB blocks at random places of a file each, with an fsync every 8 writes. Yields
    the count of writes each node had acknowledged; the writers stop at the end."""
    import threading

    from sdbackup.cluster.access import open_fs
    from sdbackup.cluster.launch import start_coordinator, start_node

    # The slow copy makes the writes overlap the copy even on this small cluster.
    env = {"SDBACKUP_TEST_T0_IMAGE_DIR": str(base / "t0-images"),
           "SDBACKUP_TEST_COPY_DELAY": copy_delay}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        coord = start_coordinator(cdir)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    nodes = []
    stop = threading.Event()
    acked = {"n1": 0, "n2": 0}
    errors: list[BaseException] = []

    def writer(node: str) -> None:
        rng = random.Random(node)
        try:
            with open_fs(cdir, node=node) as f:
                name = f"busy-{node}.bin".encode()
                try:
                    ino = f.lookup(1, name).ino
                except FsError:  # the first run: create it
                    ino = f.create(1, name).ino
                    f.write(ino, 0, rng.randbytes(8 << 20))
                while not stop.is_set():
                    f.write(ino, rng.randrange(0, 8 << 20), rng.randbytes(64 << 10))
                    acked[node] += 1
                    if acked[node] % 8 == 0:
                        f.fsync(ino)
        except BaseException as e:  # shown below
            errors.append(e)

    threads: list[threading.Thread] = []
    try:
        nodes = [start_node(cdir, n, cache_size="16MiB", flush_delay=0.2)
                 for n in ("n1", "n2")]
        threads = [threading.Thread(target=writer, args=(n,)) for n in ("n1", "n2")]
        for t in threads:
            t.start()
        time.sleep(1.0)
        yield acked
        stop.set()
        for t in threads:
            t.join()
        if errors:
            raise SdbError(f"demo: a writer failed: {errors[0]}", 1)
    finally:
        stop.set()
        for t in threads:
            t.join()
        for p in nodes:
            p.stop()
        coord.stop()


def _same_as_t0(base: Path, reader: GenerationSource, gen_id: str,
                disks: list[str]) -> None:
    """Restore every disk image of ``gen_id`` and compare it with the image at T0."""
    from sdbackup.restore.image import restore_image

    for name in disks:
        img = base / f"restored-{name}.img"
        img.unlink(missing_ok=True)
        restore_image(reader, name, img)
        same = img.read_bytes() == (base / "t0-images" / gen_id / f"{name}.img").read_bytes()
        img.unlink()
        click.echo(f"  restore-image {name}: "
                   f"{'identical to the image at T0' if same else 'DIFFERS from T0'}")
        if not same:
            raise SdbError("demo: a backup differs from its T0 (a bug: please report it)", 1)


def _online_step(base: Path, cdir: Path) -> None:
    """Online backup while two nodes keep writing; the restore equals the image at T0."""
    from sdbackup.cluster.access import coordinator_client
    from sdbackup.media.generation import Generation, GenerationReader
    from sdbackup.net import messages as msg

    _step("online backup: two nodes keep writing while the coordinator backs up "
          "(--log-mode central: before images go to the coordinator's log manager)")
    with _busy_cluster(base, cdir, "0.2") as acked:
        before = sum(acked.values())
        with coordinator_client(cdir) as c:
            s = msg.call(c, msg.Backup(str(base / "medium"), "zstd", 1, "central"),
                         timeout=None)[0]
        during = sum(acked.values()) - before
    lg = s["log"]
    click.echo(f"  generation {s['generation']}: writes held {float(s['freeze_seconds']):.3f} s "
               f"at T0; {during} writes of 64 KiB acknowledged during the "
               f"{float(s['copy_seconds']):.1f} s copy")
    click.echo(f"  {lg['blocks']} before-image blocks logged ({lg['records']} records, "
               f"{lg['bi_runs']} overwritten runs needed them)")
    gen = Generation.open(base / "medium", s["generation"])
    with GenerationReader(gen) as reader:
        _same_as_t0(base, reader, gen.id, [d.name for d in gen.manifest.disks])


def _incremental_step(base: Path, cdir: Path) -> None:
    """Online incrementals while the nodes write; merge; prune; restore the newest."""
    from sdbackup.backup.merge import merge
    from sdbackup.backup.prune import Retention, prune
    from sdbackup.backup.verify import verify_generation
    from sdbackup.cluster.access import coordinator_client
    from sdbackup.media.chain import ChainReader
    from sdbackup.media.generation import Generation
    from sdbackup.media.medium import DiskMedium
    from sdbackup.net import messages as msg

    medium = base / "medium"
    _step("incremental backups while the two nodes keep writing (sdbackup backup "
          "--incremental): only the blocks changed since the previous backup, known from "
          "the coordinator's changed-block tracking, with no scan")
    with _busy_cluster(base, cdir, "0.02"), coordinator_client(cdir) as c:
        for _ in range(3):
            time.sleep(0.5)
            s = msg.call(c, msg.Backup(str(medium), "zstd", 1, "central", incremental=True),
                         timeout=None)[0]
            click.echo(f"  incremental {s['generation']}: {s['blocks']} changed blocks "
                       f"({int(s['raw_bytes']) / 1e6:.1f} MB), writes held "
                       f"{float(s['freeze_seconds']):.3f} s")
    med = DiskMedium.open(medium)
    _step("the generations on the medium: each incremental names its parent (a chain)")
    for m in med.committed():
        click.echo(f"  {m.id}  {m.kind:<11}  parent {m.parent or '-':<32}  {m.blocks} blocks")
    newest = med.resolve(None)
    disks = [d.name for d in newest.disks]
    _step("restore the newest incremental as disk images: each block read from the newest "
          "generation of the chain that holds it")
    with ChainReader(med, newest) as reader:
        _same_as_t0(base, reader, newest.id, disks)
    cur = med.committed()
    first_inc = next(m for m in cur if m.kind == "incremental")
    _step("merge the first incremental into its full: one synthetic full in their place "
          "(sdbackup merge)")
    assert first_inc.parent is not None
    r = merge(med, first_inc.parent, first_inc.id)
    click.echo(f"  {r.manifest.kind} generation {r.manifest.id}: {r.blocks} blocks in "
               f"{r.seconds:.2f} s; removed {len(r.removed)} generations")
    _step("prune to the last 2 generations (sdbackup prune --keep-last 2): older ones are "
          "merged forward where a kept generation needs their blocks, else removed")
    p = prune(DiskMedium.open(medium), Retention(last=2))
    for st in p.steps:
        click.echo(f"  {st.action} {' + '.join(st.gens)}: {st.why}")
    med = DiskMedium.open(medium)
    for m in med.committed():
        rep = verify_generation(Generation(med, m))
        if not rep.ok:
            raise SdbError(f"demo: verify found problems: {rep.problems[:3]}", 1)
        click.echo(f"  {m.id}  {m.kind:<11}  verify OK ({rep.records} records)")
    with ChainReader(med, med.resolve(None)) as reader:
        _same_as_t0(base, reader, newest.id, disks)


def _group_step(base: Path, cdir: Path) -> None:
    """Two overlapping file groups (b.1-b.5), each backed up in a chain of its own."""
    from sdbackup.backup.engine import BackupOptions, run_backup
    from sdbackup.cluster.backup_source import LocalClusterSource
    from sdbackup.cluster.groups import GroupStore, new_group
    from sdbackup.cluster.local import open_cluster
    from sdbackup.media.chain import ChainReader
    from sdbackup.media.medium import DiskMedium
    from sdbackup.meta.groups import evaluate, format_runs, parse_group_list

    lists = {"code": "home/sample/src/*\nhome/sample/docs/*\nX hardlink-to-01.txt\n",
             "docs-data": "home/sample/docs/file0?.txt\nhome/sample/data/*\n"
                          "X /home/sample/data/sparse.img\n"}
    _step("file groups (sdbackup group add): two overlapping lists, in the seed's syntax "
          "('X' excludes)")
    store = GroupStore(cdir)
    medium = base / "group-medium"
    for name, text in lists.items():
        store.add(new_group(name, parse_group_list(text), None))
        with open_cluster(cdir) as c:
            mem = evaluate(c.meta, parse_group_list(text))
            blocks = mem.blocks(c.meta)
        runs = [f"disk {d}: {r}" for d, b in sorted(blocks.items()) for r in format_runs(b, 3)]
        click.echo(f"  {name}: {'; '.join(text.strip().splitlines())}")
        click.echo(f"    {len(mem.files)} files, {sum(len(b) for b in blocks.values())} "
                   f"blocks in {sum(b.num_runs() for b in blocks.values())} runs "
                   f"(group block list: {', '.join(runs)} ...)")
    with open_cluster(cdir) as c:
        a = {n: {m.path for m in evaluate(c.meta, parse_group_list(t)).files}
             for n, t in lists.items()}
    both = sorted(a["code"] & a["docs-data"])
    shared = both[0].decode()
    click.echo(f"  {len(both)} files belong to both groups (b.5)")
    _step(f"back up each group (sdbackup backup --group NAME --medium {medium}), change a "
          "file of both, then an incremental of each")
    gens: dict[str, str] = {}
    for incremental in (False, True):
        if incremental:
            with open_cluster(cdir) as c:
                ino = c.fs.resolve(shared).ino
                c.fs.write(ino, 0, b"changed by the demo\n")
                c.fs.fsync()
            click.echo(f"  changed {shared}")
        for name, text in lists.items():
            with open_cluster(cdir) as c:
                r = run_backup(LocalClusterSource(c), medium, BackupOptions(
                    group=name, group_list=parse_group_list(text), incremental=incremental))
            m = r.manifest
            gens[name] = m.id
            click.echo(f"  {name}: {m.kind} {m.id}, {m.blocks} blocks, chain "
                       f"{str(m.chain)[:8]}" + (f", parent {m.parent}" if m.parent else ""))
    med = DiskMedium.open(medium)
    with open_cluster(cdir) as c:
        want = c.fs.read(c.fs.resolve(shared).ino, 0, 1 << 20)
    for name, gid in gens.items():
        with ChainReader.open(medium, gid) as reader:
            from sdbackup.fs.readonly import ReadOnlyFileSystem
            from sdbackup.media.snapshot import SnapshotMeta

            with SnapshotMeta(reader.gen.meta_file(), "demo") as snap:
                fs = ReadOnlyFileSystem(snap, reader)
                got = fs.read(fs.resolve(shared).ino, 0, 1 << 20)
        click.echo(f"  {shared} read through group {name}'s chain: "
                   f"{'as changed' if got == want else 'DIFFERS'}")
        if got != want:
            raise SdbError("demo: a group backup differs (a bug: please report it)", 1)
    click.echo(f"  chains on the medium: {len({m.chain for m in med.committed()})} (one per "
               "group)")


def _mount_step(base: Path) -> None:
    """Mount the newest generation with FUSE and compare every file with the T0 data."""
    import subprocess
    import sys

    from sdbackup.backup.engine import T0Images
    from sdbackup.fs import fuse_mount
    from sdbackup.fs.readonly import ReadOnlyFileSystem
    from sdbackup.media.generation import Generation
    from sdbackup.media.medium import DiskMedium
    from sdbackup.media.snapshot import SnapshotMeta

    try:
        fuse_mount.check_fuse()
    except SdbError as e:
        _step(f"mount a backup: skipped ({e})")
        return
    medium = base / "medium"
    med = DiskMedium.open(medium)
    m = med.resolve(None)
    mp = base / "mnt-backup"
    mp.mkdir()
    _step(f"mount the newest generation ({m.kind}) read-only, no restore step "
          f"(sdbackup mount --medium {medium} {m.id[:15]} {mp} --background)")
    r = subprocess.run([sys.executable, "-m", "sdbackup", "mount", "--medium", str(medium),
                        m.id, str(mp), "--background", "--log-file",
                        str(base / "mount.log")], capture_output=True, text=True,
                       timeout=120, check=False)
    if r.returncode != 0:
        raise SdbError(f"demo: sdbackup mount failed: {r.stderr.strip()}", 1)
    t0 = base / "t0-images" / m.id
    gen = Generation(med, m)
    images = T0Images({d.id: t0 / f"{d.name}.img" for d in m.disks}, m.block_size)
    files = nbytes = 0
    try:
        with SnapshotMeta(gen.meta_file(), "snapshot") as snap:
            at_t0 = ReadOnlyFileSystem(snap, images)
            for dirpath, _dirs, names in os.walk(mp):
                for name in names:
                    p = Path(dirpath) / name
                    if p.is_symlink():
                        continue
                    rel = "/" + str(p.relative_to(mp))
                    a = at_t0.resolve(rel)
                    want = at_t0.read(a.ino, 0, a.size)
                    if p.read_bytes() != want:
                        raise SdbError(f"demo: {rel} in the mounted backup differs from the "
                                       "data at T0 (a bug: please report it)", 1)
                    files += 1
                    nbytes += len(want)
        click.echo(f"  {files} files ({nbytes / 1e6:.1f} MB) read through the mount: "
                   "identical to the data at T0 (the disks' image taken while frozen)")
        try:
            (mp / "new-file").write_text("x")
            raise SdbError("demo: a write to the mounted backup worked", 1)
        except OSError as e:
            click.echo(f"  a write fails: {e.strerror}")
    finally:
        images.close()
        subprocess.run([sys.executable, "-m", "sdbackup", "umount", str(mp)],
                       capture_output=True, timeout=120, check=False)
    click.echo(f"  unmounted (sdbackup umount {mp})")


def _diff(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b)
    out = [*cmp.left_only, *cmp.right_only, *cmp.funny_files]
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    out += mismatch + errors
    for sub in cmp.common_dirs:
        out += [f"{sub}/{x}" for x in _diff(a / sub, b / sub)]
    return out
