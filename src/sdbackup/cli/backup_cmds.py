"""Backup and restore commands: backup, generations, verify, gc, restore, restore-image,
restore-cluster, overlay, log apply.

Each command imports what it runs on when it runs (see :mod:`sdbackup.cli.main`);
``generations`` and ``gc`` need only :mod:`sdbackup.media.medium` (the medium's JSON
label and manifests), which imports nothing heavy.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sdbackup.cli.progress import ByteProgress
from sdbackup.cli.tape_cmds import reads_tape, tape_read_options
from sdbackup.errors import EXIT_CHECK_FAILED, EXIT_CORRUPT, CorruptError, SdbError, UsageError

if TYPE_CHECKING:
    from sdbackup.backup.plan import Plan
    from sdbackup.media.chain import ChainReader
    from sdbackup.media.generation import Generation
    from sdbackup.media.medium import Catalog, Manifest

MEDIUM = click.option("--medium", "medium", required=True, metavar="DIR",
                      type=click.Path(path_type=Path),
                      help="The backup medium: a directory (created by the first backup).")
MEDIA = click.option("--medium", "medium", required=True, multiple=True, metavar="DIR",
                     type=click.Path(path_type=Path),
                     help="The backup medium: a directory. Repeat it for a generation whose "
                          "parts lie on several media (backup --copy-nodes): the first is "
                          "where it was committed.")
MEDIA_OR_TAPE = click.option(
    "--medium", "medium", multiple=True, metavar="DIR", type=click.Path(path_type=Path),
    help="The backup medium: a directory (or read a backup on tape: --tape DEV --buffer "
         "DIR, or through a tape server: --tape-server HOST:PORT --secret-file FILE). "
         "Repeat it for a generation whose parts lie on several media (backup "
         "--copy-nodes): the first is where it was committed.")
JSON = click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
QUIET = click.option("-q", "--quiet", is_flag=True, help="No progress display.")


def register(cli: click.Group) -> None:
    cli.add_command(overlay)
    cli.add_command(log)
    for cmd in (backup, generations, verify, gc, restore, restore_image_cmd,
                restore_cluster_cmd, mark, marks, merge_cmd, prune_cmd):
        cli.add_command(cmd)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class _LazyProgress:
    """A progress bar that starts once the total is known."""

    def __init__(self, label: str, quiet: bool, stack: ExitStack) -> None:
        self.label = label
        self.quiet = quiet
        self.stack = stack
        self.bar: ByteProgress | None = None

    def start(self, total: int) -> None:
        self.bar = self.stack.enter_context(ByteProgress(self.label, total, quiet=self.quiet))

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(n)


@contextmanager
def _progress(label: str, quiet: bool) -> Iterator[_LazyProgress]:
    with ExitStack() as stack:
        yield _LazyProgress(label, quiet, stack)


# -- backup --------------------------------------------------------------------------------

@click.command()
@click.argument("cluster_dir", type=click.Path(path_type=Path))
@click.option("--medium", "media", multiple=True, metavar="DIR|NODE=DIR",
              help="The backup medium: a directory (created by the first backup); or "
                   "straight to tape with --tape. With --copy-nodes, NODE=DIR gives copy "
                   "node NODE a medium of its own (a directory on its host); repeat. Copy "
                   "nodes without one write to DIR.")
@click.option("--tape", "tapes", multiple=True, metavar="DEV",
              help="Back up straight to tape (Fig. 36): the tape set's last tape (or a "
                   "blank one to start a set), then blank tapes to continue on when it "
                   "fills (file:PATH or /dev/nstN; repeat). Offline, or with --log-mode "
                   "separate --log-medium DIR: the log is appended to the tape at the end.")
@click.option("--catalog", "catalog_dir", type=click.Path(path_type=Path), default=None,
              metavar="DIR",
              help="With --tape: the tape catalog (default: $SDBACKUP_TAPE_CATALOG or "
                   "~/.local/share/sdbackup/tape-catalog).")
@click.option("--spool", "spool_dir", type=click.Path(path_type=Path), default=None,
              metavar="DIR",
              help="With --tape: the disk spool between the copy and the drive (default: "
                   "CATALOG/spool).")
@click.option("--spool-size", default="256MiB", show_default=True, metavar="SIZE",
              help="With --tape: the spool's size; the drive writes a burst each time it "
                   "is full, so that it streams.")
@click.option("--full", is_flag=True,
              help="A full backup: every block in use at T0 (the default). It starts a "
                   "new chain.")
@click.option("--incremental", is_flag=True,
              help="Copy only the blocks changed since the newest generation on the medium "
                   "(its parent), or since the newest mark made after it: the cluster "
                   "tracks changed blocks as they are written, so nothing is scanned. Fails "
                   "(exit 2) when the medium holds no generation it can follow.")
@click.option("--full-if-needed", is_flag=True,
              help="With --incremental: take a full backup instead of failing when no "
                   "incremental is possible.")
@click.option("--compress", "compress", default="zstd:1", show_default=True,
              metavar="none|zstd[:LEVEL]", help="Compression of the copied blocks.")
@click.option("--wait", default=10.0, show_default=True,
              help="Seconds to wait while another sdbackup command holds the cluster.")
@click.option("--log-mode", type=click.Choice(["merged", "central", "inline", "separate"]),
              help="Online backup: freeze only at T0 and let writes go on, logging before "
                   "images: merged (each node's own log, merged by logical time), central "
                   "(sent to the coordinator at once), inline (into the backup medium; the "
                   "copy skips logged blocks), separate (on --log-medium; the backup medium "
                   "is written sequentially only).")
@click.option("--log-medium", type=click.Path(path_type=Path),
              help="Directory of the separate log medium (with --log-mode separate).")
@click.option("--overlay", is_flag=True,
              help="With --log-mode separate: bring the log into the generation at the end.")
@click.option("--pre-freeze", metavar="CMD",
              help="Shell command run right before the freeze; if it fails, no backup.")
@click.option("--post-thaw", metavar="CMD", help="Shell command run right after the thaw.")
@click.option("--bwlimit", metavar="RATE", default="0",
              help="Read the disks at most this fast (e.g. 100MiB, per second; 0: no "
                   "limit): an online backup then leaves the rest of the disks' bandwidth "
                   "to the applications, and takes longer.")
@click.option("--pace", type=click.Choice(["off", "adaptive"]), default="off",
              show_default=True,
              help="adaptive: while applications write (during an online backup), the "
                   "copy rests six times as long as each batch takes to read; when they "
                   "do not, it runs at full speed.")
@click.option("--group", "group_name", metavar="NAME",
              help="Back up only the files of group NAME ('sdbackup group add'): the blocks "
                   "of its files at T0, copied as one batch, in a chain of the group's own "
                   "(--incremental follows the group's newest generation on the medium).")
@click.option("--meta", "meta_scope", type=click.Choice(["all", "group"]), default=None,
              help="With --group: the generation's metadata lists every file (all, the "
                   "default; reading a file outside the group fails) or only the group's "
                   "(group).")
@click.option("--copy-nodes", metavar="N1,N2,...",
              help="Copy dispersed over these nodes (a.12): one freeze and one T0 for the "
                   "whole cluster; each node copies parts of the disks to its --medium "
                   "NODE=DIR (or to DIR), and the generation is committed once, on DIR, "
                   "when every part is durable. Needs a running coordinator. --bwlimit "
                   "then limits each copier.")
@click.option("--no-reassign", is_flag=True,
              help="With --copy-nodes: when a copy node fails, fail the backup (never "
                   "committed) instead of giving its unfinished parts to another.")
@click.option("--split", type=click.Choice(["ranges", "disks"]), default="ranges",
              show_default=True,
              help="With --copy-nodes: cut the disks into ranges balanced by used bytes, "
                   "or copy whole disks.")
@click.option("--part-size", metavar="SIZE", default="256MiB", show_default=True,
              help="With --copy-nodes and --split ranges: used bytes per part at most "
                   "(about); a failed copier loses at most the part it was copying.")
@click.option("--log-node", metavar="NAME",
              help="The log manager runs on node agent NAME instead of the coordinator "
                   "(Fig. 36): every node sends the before images of its overwrites "
                   "there, and NAME writes the log (the generation's stream 1 on the "
                   "medium, which it must see; with --log-mode separate, --log-medium is "
                   "a directory on NAME's host). If NAME fails, the backup is aborted, "
                   "never the writes. With --log-mode central, inline or separate; needs "
                   "a running coordinator.")
@JSON
@QUIET
def backup(cluster_dir: Path, media: tuple[str, ...], tapes: tuple[str, ...],
           catalog_dir: Path | None, spool_dir: Path | None, spool_size: str,
           full: bool, incremental: bool,
           full_if_needed: bool, compress: str, wait: float,
           log_mode: str | None, log_medium: Path | None, overlay: bool,
           pre_freeze: str | None, post_thaw: str | None, bwlimit: str, pace: str,
           group_name: str | None, meta_scope: str | None,
           copy_nodes: str | None, no_reassign: bool, split: str, part_size: str,
           log_node: str | None, as_json: bool, quiet: bool) -> None:
    """Back up the cluster's disks to a new generation on the medium DIR.

    Copies the blocks in use at one instant T0 (from the allocation bitmap), in large
    sequential batches that take blocks of many files at once, with the metadata
    snapshot taken at T0, an index, and a manifest written last (the commit).

    Without --log-mode, writes are held for the whole backup. With --log-mode, the
    cluster is frozen only for the instant T0 (every node's dirty cache is written back,
    the metadata is snapshotted) and writes go on during the copy: whoever overwrites a
    block the backup still needs saves its before image first, and the generation holds
    exactly the data at T0. With a coordinator running, the coordinator runs the backup.

    With --tape, the generation goes straight to tape, spooled through a disk buffer
    (--spool) so that the drive streams while the copy reads the cluster; with
    --log-mode separate the before images go to --log-medium meanwhile and are appended
    to the tape at the end (the tape alone restores T0); the index, the snapshot and
    the manifest follow, then the generation enters the tape catalog.
    """
    from sdbackup.backup.engine import BackupOptions, parse_compression, run_backup
    from sdbackup.cluster.access import try_coordinator_client
    from sdbackup.cluster.backup_source import LocalClusterSource
    from sdbackup.cluster.local import open_cluster

    comp, level = parse_compression(compress)
    from sdbackup.cli.dispersed import parse_backup_media
    from sdbackup.cluster.config import parse_size

    if tapes and copy_nodes is not None:
        from sdbackup.backup.engine import TAPE_COPY_NODES

        raise UsageError(TAPE_COPY_NODES)
    if tapes and media:
        raise UsageError("give --medium DIR or --tape DEV, not both (a generation on disk "
                         "goes to tape later with 'sdbackup tape write')")
    if not tapes and not media:
        raise UsageError("give the backup medium: --medium DIR (or --tape DEV)")
    medium: Path | None = None
    node_media: dict[str, str] = {}
    copiers: list[str] | None = None
    if media:
        medium, node_media, copiers = parse_backup_media(media, copy_nodes)
    if copiers is None and (no_reassign or split != "ranges"):
        raise UsageError("--no-reassign and --split go with --copy-nodes")

    try:
        limit = parse_size(bwlimit)
    except (ValueError, SdbError) as e:
        raise UsageError(f"--bwlimit {bwlimit!r}: {e}") from None
    if full and incremental:
        raise UsageError("--full and --incremental exclude each other")
    if full_if_needed and not incremental:
        raise UsageError("--full-if-needed goes with --incremental")
    if log_medium is not None and log_mode != "separate":
        raise UsageError("--log-medium goes with --log-mode separate")
    tape_spec = _tape_spec(medium, tapes, catalog_dir, spool_dir, spool_size)
    if log_medium is not None and medium is not None:
        lm, bm = log_medium.resolve(), medium.resolve()
        if lm == bm or bm in lm.parents or lm in bm.parents:
            raise UsageError(f"--log-medium {log_medium} is (inside) the backup medium "
                             f"{medium}: the log medium must be another directory, on "
                             "another device ideally")
    if log_node is not None:
        from sdbackup.backup.engine import check_log_node_options

        if not log_node or "," in log_node or len(log_node) > 255:
            raise UsageError(f"--log-node {log_node!r}: give one node's name")
        check_log_node_options(log_mode)
    if overlay and log_mode != "separate":
        raise UsageError("--overlay goes with --log-mode separate (other modes keep the log "
                         "in the generation already)")
    if meta_scope is not None and group_name is None:
        raise UsageError("--meta goes with --group NAME")
    group_list = None
    if group_name is not None:
        from sdbackup.cluster.groups import GroupStore

        group_list = GroupStore(cluster_dir).get(group_name).group_list()
    opts = BackupOptions(compression=comp, level=level or 1, log_mode=log_mode,
                         log_medium=log_medium.absolute() if log_medium else None,
                         overlay=overlay, pre_freeze=pre_freeze, post_thaw=post_thaw,
                         incremental=incremental, full_if_needed=full_if_needed,
                         bwlimit=limit, pace=pace, group=group_name, group_list=group_list,
                         meta_scope=meta_scope or "all", tape=tape_spec)
    where = str(medium) if medium is not None else "tape"
    rc = try_coordinator_client(cluster_dir)
    if rc is not None:
        with rc:
            from sdbackup.net import messages as msg

            request = msg.Backup(str(medium.absolute()) if medium else "", comp, opts.level,
                                 log_mode,
                                 str(opts.log_medium) if opts.log_medium else None, overlay,
                                 pre_freeze, post_thaw, incremental, full_if_needed, limit,
                                 pace, group_name,
                                 group_list.text() if group_list is not None else None,
                                 opts.meta_scope, **_tape_fields(tape_spec),
                                 log_node=log_node)
            if copiers is not None:
                from sdbackup.cli.dispersed import run_dispersed

                s = run_dispersed(rc, request, copiers, node_media, no_reassign, split,
                                  part_size, quiet=quiet or as_json)
            else:
                s = msg.call(rc, request, timeout=None)[0]
        _print_backup(s, where, as_json)
        return
    if log_node is not None:
        raise UsageError(f"--log-node needs a running coordinator of {cluster_dir} (the log "
                         "node is one of its node agents): start it with 'sdbackup "
                         f"coordinator {cluster_dir}' and the node with 'sdbackup node'")
    if copiers is not None:
        raise UsageError(f"--copy-nodes needs a running coordinator of {cluster_dir} (the "
                         "copy nodes are its node agents): start it with 'sdbackup "
                         f"coordinator {cluster_dir}' and the nodes with 'sdbackup node'")
    cluster = open_cluster(cluster_dir, wait=wait)
    with cluster, _progress("backup", quiet) as prog:
        source = LocalClusterSource(cluster)

        def on_plan(plan: Plan) -> None:
            prog.start(plan.blocks * source.config.block_size)

        result = run_backup(source, medium or "", opts, on_plan=on_plan,
                            progress=prog.advance)
    _print_backup(result.summary(), where, as_json)


def _tape_spec(medium: Path | None, tapes: tuple[str, ...], catalog_dir: Path | None,
               spool_dir: Path | None, spool_size: str) -> Any:
    """The tape a backup goes to (a TapeSpec, absolute paths: the coordinator may run
    it), or None for a backup to --medium."""
    if not tapes:
        if catalog_dir is not None or spool_dir is not None:
            raise UsageError("--catalog and --spool go with --tape")
        return None
    if medium is not None:
        raise UsageError("give --medium DIR or --tape DEV, not both (a generation on disk "
                         "goes to tape later with 'sdbackup tape write')")
    from sdbackup.cluster.config import parse_size
    from sdbackup.media.tape.catalog import default_catalog
    from sdbackup.media.tape.sink import TapeSpec, absolute_spec

    try:
        size = parse_size(spool_size)
    except (ValueError, SdbError) as e:
        raise UsageError(f"--spool-size {spool_size!r}: {e}") from None
    return TapeSpec(tuple(absolute_spec(t) for t in tapes),
                    (catalog_dir or default_catalog()).absolute(),
                    spool_dir.absolute() if spool_dir else None, size)


def _tape_fields(spec: Any) -> dict[str, Any]:
    """The Backup request's tape fields: tapes, catalog, spool, spool_bytes."""
    if spec is None:
        return {}
    return {"tapes": spec.tapes, "catalog": str(spec.catalog),
            "spool": str(spec.spool) if spec.spool else None,
            "spool_bytes": spec.spool_bytes}


def _print_backup(s: dict[str, Any], medium: Path | str, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    raw = int(str(s["raw_bytes"]))
    stored = int(str(s["stored_bytes"]))
    secs = float(str(s["seconds"]))
    tape = s.get("tape")
    group = (f" (group {s['group']}: {s['group_files']} files)" if s.get("group") else "")
    if isinstance(tape, dict):
        click.echo(f"generation {s['generation']} committed on tape set {tape['set']} "
                   f"(tapes {', '.join(tape['tapes'])}; catalog {tape['catalog']})" + group)
    else:
        click.echo(f"generation {s['generation']} committed on {medium}" + group)
    click.echo(f"  {s['blocks']} blocks ({_human(raw)}) in {s['runs']} runs, "
               f"{s['records']} records; stored {_human(stored)}"
               + (f" ({stored / raw:.0%} of raw, {s['compression']})" if raw else ""))
    click.echo(f"  {secs:.2f} s, {_human(raw / secs if secs else 0)}/s; writes held "
               f"{float(str(s['freeze_seconds'])):.3f} s")
    log = s.get("log")
    if isinstance(log, dict):
        click.echo(f"  online ({log['mode']}): {log.get('blocks', 0)} before-image blocks "
                   f"logged in {log.get('records', 0)} records"
                   + (f" on {log['medium']}" if log.get("medium") else ""))
    dispersed = s.get("dispersed")
    if isinstance(dispersed, dict):
        for name, c in dispersed.get("copiers", {}).items():
            click.echo(f"  copier {name}: {c.get('parts', 0)} part(s), "
                       f"{_human(int(c.get('bytes', 0)))} in {float(c.get('seconds', 0)):.2f} "
                       f"s to {c.get('medium')}"
                       + (f"; FAILED: {c['failed']}" if c.get("failed") else ""))
        for r in dispersed.get("reassigned", []):
            click.echo(f"  part {r['stream']} reassigned from {r['from']}: {r['why']}")


# -- marks (a.11) ----------------------------------------------------------------------------

@click.command()
@click.argument("cluster_dir", type=click.Path(path_type=Path))
@click.argument("name", required=False)
@JSON
def mark(cluster_dir: Path, name: str | None, as_json: bool) -> None:
    """Set a mark: the next incremental backup starts its difference here.

    The next 'sdbackup backup --incremental' copies only the blocks changed after this
    instant, not those changed between the previous backup and the mark (seed a.11,
    Fig. 26). What that means for a restore: the incremental, and every generation
    after it in its chain, shows the blocks changed between the previous backup and the
    mark as they were at the previous backup (or as zeros, for blocks first used in
    that interval). Use it when those changes are not worth keeping (a scratch area
    rewritten, a bulk load to be redone). A full backup ignores marks. NAME defaults to
    the current UTC time.
    """
    import time as _time

    from sdbackup.cluster.access import try_coordinator_client
    from sdbackup.cluster.local import open_cluster

    name = name or _time.strftime("mark-%Y%m%dT%H%M%SZ", _time.gmtime())
    rc = try_coordinator_client(cluster_dir)
    if rc is not None:
        from sdbackup.net import messages as msg

        with rc:
            d = msg.call(rc, msg.SetMark(name))[0]
    else:
        with open_cluster(cluster_dir) as c:
            d = c.meta.tracker.mark_now(name).to_dict()
    if as_json:
        click.echo(json.dumps(d))
    else:
        click.echo(f"mark {d['name']} set: the next incremental backup holds only changes "
                   "made from now on")


@click.command()
@click.argument("cluster_dir", type=click.Path(path_type=Path))
@JSON
def marks(cluster_dir: Path, as_json: bool) -> None:
    """List the marks, oldest first, and the state of the changed-block tracking."""
    from sdbackup.cluster.access import try_coordinator_client
    from sdbackup.cluster.local import open_cluster
    from sdbackup.media.medium import iso_utc

    rc = try_coordinator_client(cluster_dir)
    if rc is not None:
        from sdbackup.net import messages as msg

        with rc:
            d = msg.call(rc, msg.Marks())[0]
    else:
        with open_cluster(cluster_dir) as c:
            t = c.meta.tracker
            d = {"marks": [m.to_dict() for m in t.marks()], "tracking": t.stats()}
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    for m in d["marks"]:
        click.echo(f"{m['name']:<32} {iso_utc(int(m['created_ns']))}  era {m['era']}")
    tr = d["tracking"]
    click.echo(f"({len(d['marks'])} mark(s); change tracking: era {tr['era']}, {tr['eras']} "
               f"era(s) kept, {tr['blocks']} changed blocks recorded, {_human(tr['bytes'])})")


# -- generations -----------------------------------------------------------------------------

def _gen_row(m: Manifest, cat: Catalog) -> dict[str, Any]:
    from sdbackup.media.medium import iso_utc

    tr = m.extra.get("tracking")
    t: dict[str, Any] = tr if isinstance(tr, dict) else {}
    # The parent as it stands now: a merge may have replaced the one the manifest names.
    p = cat.get(m.parent) if m.parent is not None else None
    parent = p.id if p is not None else m.parent
    return {"id": m.id, "kind": m.kind, "parent": parent, "chain": m.chain,
            "t0": iso_utc(m.t0_wall_ns), "group": m.group, "blocks": m.blocks,
            "stored_bytes": m.stored_bytes, "total_bytes": m.total_bytes,
            "compression": m.compression, "state": m.state, "cluster_id": m.cluster_id,
            "mark": t.get("mark"), "replaces": list(m.replaces),
            "disks": [{"name": d.name, "blocks": d.blocks} for d in m.disks]}


@click.command()
@MEDIUM
@JSON
def generations(medium: Path, as_json: bool) -> None:
    """List the committed generations on the medium, oldest T0 first.

    KIND is full (every block in use at T0), incremental (the blocks changed since its
    PARENT; read through its chain back to the full) or synthetic (a full made by
    'sdbackup merge'). CHAIN names the chain (its first 8 hex digits). Generations
    without a manifest (unfinished backups) and those a merge replaced are not listed:
    'sdbackup gc' removes them. A damaged manifest, or one of another cluster, is
    reported and makes the exit code non-zero.
    """
    from sdbackup.media.medium import FAILED, Catalog, DiskMedium

    med = DiskMedium.open(medium)
    entries = med.scan()
    cat = Catalog([e.manifest for e in entries if e.manifest is not None])
    current = sorted(cat.current, key=lambda m: (m.t0_wall_ns, m.id))
    rows = [_gen_row(m, cat) for m in current]
    replaced = len(cat.replaced())
    bad = [e for e in entries if e.problem is not None]
    unfinished = sum(1 for e in entries if e.unfinished)
    if as_json:
        click.echo(json.dumps({
            "medium": str(med.root), "cluster_id": med.cluster_id, "generations": rows,
            "invalid": [{"id": e.id, "problem": e.problem} for e in bad],
            "unfinished": unfinished, "replaced": replaced}, indent=2))
    else:
        click.echo(f"{'generation':<33} {'kind':<11} {'parent':<33} {'chain':<8} "
                   f"{'T0':<27} {'group':<6} {'blocks':>9} {'stored':>10}")
        for r in rows:
            parent = r["parent"] or "-"
            click.echo(f"{r['id']:<33} {r['kind']:<11} {parent:<33} "
                       f"{(r['chain'] or '-')[:8]:<8} {r['t0']:<27} {r['group'] or '-':<6} "
                       f"{r['blocks']:>9} {_human(r['stored_bytes']):>10}"
                       + (f"  (after mark {r['mark']})" if r["mark"] else ""))
        for e in bad:
            click.echo(f"sdbackup: warning: {e.problem}", err=True)
        for e in entries:
            if e.unfinished and (e.path / FAILED).exists():
                reason = (e.path / FAILED).read_text().strip()
                click.echo(f"failed generation {e.id} (not committed): {reason}", err=True)
        if unfinished or replaced:
            click.echo(f"({unfinished} unfinished or failed and {replaced} merged-away "
                       f"generation(s) not listed: run 'sdbackup gc --medium {medium}' to "
                       "remove them)", err=True)
    if bad:
        sys.exit(EXIT_CORRUPT)


# -- verify ---------------------------------------------------------------------------------

@click.command()
@MEDIA
@click.argument("gen", required=False)
@click.option("--all", "all_gens", is_flag=True, help="Verify every committed generation.")
@click.option("--log-medium", type=click.Path(path_type=Path),
              help="Where the separate before-image log of a generation made with "
                   "--log-mode separate (and not overlaid) is, if it moved.")
@JSON
@QUIET
def verify(medium: tuple[Path, ...], gen: str | None, all_gens: bool, log_medium: Path | None,
           as_json: bool, quiet: bool) -> None:
    """Read every record of generation GEN (default: the newest) and check everything.

    Checks every header and payload checksum, the stream structure, the index against
    the records, the metadata snapshot, and that the generation holds exactly the
    blocks used at T0; a separate before-image log that was not overlaid is read and
    checked too (a missing one is a problem). Each problem names the generation, the
    disk, the blocks and the medium offset. Exit code 1 when a problem is found.
    """
    from sdbackup.backup.verify import verify_generation
    from sdbackup.media.generation import Generation
    from sdbackup.media.media_set import open_media

    med = open_media(medium)
    if all_gens:
        if gen is not None:
            raise UsageError("give a generation or --all, not both")
        manifests = med.committed()
    else:
        manifests = [med.resolve(gen)]
    reports = []
    for m in manifests:
        g = Generation(med, m)
        with ByteProgress(f"verify {m.id}", sum(s.bytes for s in m.streams),
                          quiet=quiet) as prog:
            reports.append(verify_generation(g, prog.advance, log_medium))
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        for r in reports:
            for p in r.problems:
                click.echo(f"verify: {p}")
            state = "OK" if r.ok else f"{len(r.problems)} problem(s)"
            click.echo(f"generation {r.generation}: {state} ({r.records} records, "
                       f"{r.blocks} blocks, {_human(r.bytes)} read)")
    if any(not r.ok for r in reports):
        sys.exit(EXIT_CHECK_FAILED)


# -- gc -----------------------------------------------------------------------------------

@click.command()
@MEDIA
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@JSON
def gc(medium: tuple[Path, ...], dry_run: bool, as_json: bool) -> None:
    """Remove unfinished generations (no manifest: crashed, killed or out of space),
    generations a committed merge replaced (left by a crash during merge or prune),
    and parts of dispersed backups that belong to no committed generation.

    Never touches current committed generations, nor a generation a running backup is
    writing, nor its parts. Parts (MEDIUM/parts/GEN/, written by copier nodes) are
    judged where their generation is committed: give that medium first and the
    copiers' media after it (--medium FIRST --medium COPIER_MEDIUM ...); parts whose
    generation is on no medium given are kept, and gc says so.
    """
    from sdbackup.media.media_set import gc_parts, open_media

    med = open_media(medium)
    with med.chain_lock():
        # Parts first: an unfinished generation still tells where its parts came from.
        sweeps = gc_parts(med, dry_run=dry_run)
        removed = med.gc(dry_run=dry_run)
        merged = [m.id for m in med.catalog().replaced()]
        if not dry_run and merged:
            from sdbackup.backup.merge import remove_replaced

            merged = remove_replaced(med)
    if as_json:
        parts = [{"medium": str(w.medium), "generation": w.generation,
                  "removed": w.removed, "why": w.why} for w in sweeps if w.why]
        click.echo(json.dumps({  # the parts keys only when there were parts to judge
            "removed": [e.id for e in removed], "merged_away": merged,
            **({"parts": parts} if parts else {}),
            **({"parts_not_removed": med.unreached} if med.unreached else {}),
            "dry_run": dry_run}))
        return
    verb = "would remove" if dry_run else "removed"
    for e in removed:
        click.echo(f"{verb} unfinished generation {e.id}")
    for g in merged:
        click.echo(f"{verb} generation {g} (a committed merge replaced it)")
    nparts = 0
    for w in sweeps:
        if w.removed:
            nparts += 1
            whole = w.removed[-1].endswith("/")
            what = w.removed[-1] if whole else ", ".join(w.removed)
            click.echo(f"{verb} {what} on {w.medium} ({w.why})")
        elif w.why:
            click.echo(f"{w.medium / 'parts' / w.generation}: {w.why}")
    _warn_unreached(med.unreached)
    click.echo(f"gc: {len(removed)} unfinished and {len(merged)} merged-away generation(s), "
               f"parts of {nparts} generation(s) {'to remove (dry run)' if dry_run else 'removed'}")


def _warn_unreached(lines: list[str]) -> None:
    """Parts of removed generations that could not be removed: one line per medium."""
    for line in lines:
        click.echo(f"sdbackup: warning: {line}", err=True)


# -- merge and prune (a.10) ------------------------------------------------------------------

@click.command("merge")
@MEDIA
@click.argument("older")
@click.argument("newer")
@click.option("--compress", default=None, metavar="none|zstd[:LEVEL]",
              help="Compression of the merged generation (default: the newer one's).")
@click.option("--log-medium", type=click.Path(path_type=Path),
              help="Where the separate before-image logs of the two are, if not overlaid.")
@JSON
@QUIET
def merge_cmd(medium: tuple[Path, ...], older: str, newer: str, compress: str | None,
              log_medium: Path | None, as_json: bool, quiet: bool) -> None:
    """Merge two adjacent generations of a chain into one (seed a.10, Fig. 25).

    NEWER must be an incremental whose parent is OLDER. The result reads exactly as
    NEWER did (per block, NEWER's data wins), with NEWER's T0: OLDER a full gives a
    synthetic full, OLDER an incremental gives one incremental. It is verified and
    committed before OLDER and NEWER are removed; a crash at any point leaves a readable
    chain ('sdbackup gc' cleans up). Later incrementals of NEWER follow the result.
    """
    from sdbackup.backup.engine import parse_compression
    from sdbackup.backup.merge import merge
    from sdbackup.media.media_set import open_media

    comp = parse_compression(compress) if compress else None
    med = open_media(medium)
    with _progress("merge", quiet) as prog:
        r = merge(med, older, newer, compression=comp, log_medium=log_medium,
                  progress=prog.advance)
    d = r.to_dict()
    _warn_unreached(med.unreached)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    if r.already:
        click.echo(f"{older} and {newer} were merged already, into {d['kind']} generation "
                   f"{d['generation']}; removed {len(r.removed)} leftover generation(s)")
        return
    click.echo(f"merged {older} and {newer} into {d['kind']} generation {d['generation']}: "
               f"{d['blocks']} blocks, {_human(int(str(d['stored_bytes'])))} stored, "
               f"in {d['seconds']} s; removed {len(r.removed)} generation(s)")


@click.command("prune")
@MEDIA
@click.option("--keep-last", type=int, default=1, show_default=True,
              help="Keep the N newest generations (at least 1).")
@click.option("--keep-daily", type=int, default=0,
              help="Keep the newest of each of the last N days.")
@click.option("--keep-weekly", type=int, default=0,
              help="Keep the newest of each of the last N ISO weeks.")
@click.option("--keep-monthly", type=int, default=0,
              help="Keep the newest of each of the last N months.")
@click.option("--dry-run", is_flag=True, help="Only print what would be done.")
@click.option("--log-medium", type=click.Path(path_type=Path),
              help="Where separate before-image logs are, if some were not overlaid.")
@click.option("--group", "group_name", metavar="NAME",
              help="Prune only the generations of group NAME (default: every group, "
                   "and the whole-cluster backups, each on its own).")
@JSON
def prune_cmd(medium: tuple[Path, ...], keep_last: int, keep_daily: int, keep_weekly: int,
              keep_monthly: int, dry_run: bool, log_medium: Path | None,
              group_name: str | None, as_json: bool) -> None:
    """Keep the generations the rules select and drop the others (days, weeks and
    months by T0, in UTC; the newest generation is always kept).

    A dropped generation that a kept one needs (its incrementals read blocks from it)
    is merged into its child instead of deleted: a full merged into its incremental
    becomes a synthetic full. Prints the plan, then each step as it is done; every step
    is crash-safe, and running prune again finishes an interrupted one.
    """
    from sdbackup.backup.prune import Retention, Step, prune
    from sdbackup.media.media_set import open_media

    med = open_media(medium)
    r = Retention(keep_last, keep_daily, keep_weekly, keep_monthly,
                  only_group=group_name)

    def show(step: Step) -> None:
        if not as_json:
            verb = "merged" if step.action == "merge" else "removed"
            click.echo(f"{verb} {' '.join(step.gens)}")

    from sdbackup.backup.prune import plan as make_plan

    with med.chain_lock():
        todo = make_plan(med.catalog(), r)
    if not as_json:
        for g, why in todo.keep.items():
            click.echo(f"keep   {g}  ({why})")
        for st in todo.steps:
            what = "merge " if st.action == "merge" else "remove"
            click.echo(f"{what} {' + '.join(st.gens)}  ({st.why})"
                       + ("  [dry run]" if dry_run else ""))
        if not todo.steps:
            click.echo("nothing to prune")
    if dry_run:
        if as_json:
            click.echo(json.dumps({**todo.to_dict(), "dry_run": True}, indent=2))
        return
    done = prune(med, r, log_medium=log_medium, on_step=show)
    _warn_unreached(med.unreached)
    if as_json:
        click.echo(json.dumps({**done.to_dict(), "dry_run": False}, indent=2))


# -- restores -------------------------------------------------------------------------------

@contextmanager
def _open_gen(medium: tuple[Path, ...], gen: str | None, log_medium: Path | None = None,
              tape: dict[str, Any] | None = None
              ) -> Iterator[tuple[Generation, ChainReader]]:
    """The generation, read through its chain (a full is a chain of one), its parts
    from every medium given (media/media_set.py); from tape through a disk buffer when
    ``tape`` names drives (``--tape``)."""
    from sdbackup.media.chain import ChainReader
    from sdbackup.media.media_set import open_media

    if tape is not None and reads_tape(medium, **tape):
        from sdbackup.cli.tape_cmds import open_tape_set

        opened = open_tape_set(**tape)
        try:
            with ChainReader(opened.medium, opened.medium.resolve(gen)) as reader:
                yield reader.gen, reader
        finally:
            opened.close()
        return
    if not medium:
        raise UsageError("give the backup medium: --medium DIR (repeat it for parts on "
                         "several media)")
    med = open_media(medium)
    with ChainReader(med, med.resolve(gen), log_medium=log_medium) as reader:
        yield reader.gen, reader


LOG_MEDIUM = click.option(
    "--log-medium", type=click.Path(path_type=Path),
    help="Where a separate before-image log is (default: where the backup wrote it); "
         "needed only for a generation made with --log-mode separate and not overlaid.")


def _echo_json_or(as_json: bool, data: dict[str, Any], lines: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        lines()


@click.command()
@MEDIA_OR_TAPE
@click.argument("args", nargs=-1, metavar="[GEN] [PATTERN]...")
@click.option("--to", "dest", required=True, type=click.Path(path_type=Path),
              help="A new or empty directory to restore into.")
@LOG_MEDIUM
@tape_read_options
@JSON
@QUIET
def restore(medium: tuple[Path, ...], args: tuple[str, ...], dest: Path,
            log_medium: Path | None, as_json: bool, quiet: bool, **tape: Any) -> None:
    """Restore files of generation GEN (default: the newest) under --to DIR.

    PATTERNs are paths inside the cluster, with shell wildcards per component
    (/home/*/docs, /etc/*.conf); each selects what it names and everything below.
    Without a pattern, everything is restored. Files land under DIR at their cluster
    path. Contents, modes, owners (as root), times, symlinks and hard links are
    restored; nothing is written outside DIR, whatever the medium says. GEN is told
    apart from a PATTERN by its form (20261124T...).
    """
    from sdbackup.media.medium import looks_like_generation
    from sdbackup.restore.files import restore_files

    gen: str | None = None
    patterns = list(args)
    if patterns and (looks_like_generation(patterns[0]) or patterns[0] == "latest"):
        gen = patterns.pop(0)
    with _open_gen(medium, gen, log_medium, tape) as (g, reader), \
            _progress("restore", quiet) as prog:
        stats = restore_files(g, reader, dest, patterns, on_total=prog.start,
                              progress=prog.advance)
    for w in stats.warnings:
        click.echo(f"sdbackup: warning: {w}", err=True)
    _echo_json_or(as_json, {"generation": g.id, "to": str(dest), **stats.to_dict()},
                  lambda: click.echo(
                      f"restored {stats.files} files ({_human(stats.bytes)}), "
                      f"{stats.directories} directories, {stats.symlinks} symlinks, "
                      f"{stats.hardlinks} hard links from generation {g.id} to {dest}"))
    if stats.outside:
        grp = g.manifest.group
        shown = ", ".join(stats.outside[:5]) + (" ..." if len(stats.outside) > 5 else "")
        why = (f"{len(stats.outside)} file(s) outside group {grp} not restored: generation "
               f"{g.id} is a backup of group {grp} and holds only its files' data ({shown})")
        if patterns:
            from sdbackup.errors import NotInBackupError

            raise NotInBackupError(why)
        click.echo(f"sdbackup: warning: {why}", err=True)
    if stats.damaged:
        for d in stats.damaged:
            click.echo(f"sdbackup: not restored (damaged on the medium): {d}", err=True)
        raise CorruptError(f"{len(stats.damaged)} file(s) could not be restored because "
                           "their data is damaged on the medium (listed above); every "
                           "other file was restored")


@click.command("restore-image")
@MEDIA_OR_TAPE
@click.argument("gen", required=False)
@click.option("--disk", "disk", required=True, metavar="NAME", help="The disk to restore.")
@click.option("--to", "dest", required=True, type=click.Path(path_type=Path),
              help="Image file to create (or an empty file, or a device with --force).")
@click.option("--force", is_flag=True, help="Overwrite a file or device that holds data.")
@LOG_MEDIUM
@tape_read_options
@JSON
@QUIET
def restore_image_cmd(medium: tuple[Path, ...], gen: str | None, disk: str, dest: Path,
                      force: bool, log_medium: Path | None, as_json: bool, quiet: bool,
                      **tape: Any) -> None:
    """Rebuild disk NAME of generation GEN (default: the newest) as an image at PATH.

    Blocks unused at T0 are holes in a new image file. The image is the disk as it was
    at T0, its label included.
    """
    from sdbackup.restore.image import restore_image

    with _open_gen(medium, gen, log_medium, tape) as (g, reader):
        d = g.manifest.disk(disk)
        with ByteProgress("restore-image", d.blocks * g.block_size, quiet=quiet) as prog:
            stats = restore_image(reader, disk, dest, force=force, progress=prog.advance)
    _echo_json_or(as_json, {"generation": g.id, **stats.to_dict()},
                  lambda: click.echo(
                      f"restored disk {disk} of generation {g.id} to {dest}: "
                      f"{stats.blocks} blocks written, {_human(stats.size)} image"))


@click.command("restore-cluster")
@MEDIA
@click.argument("gen", required=False)
@click.option("--to", "dest", required=True, type=click.Path(path_type=Path),
              help="The new cluster directory (must not exist, or be empty).")
@click.option("--disk", "disks", multiple=True, metavar="NAME=PATH",
              help="Where to put disk NAME (default: NEW_CLUSTER_DIR/NAME.img). Repeat.")
@click.option("--force", is_flag=True, help="Overwrite disk files or devices that hold data.")
@LOG_MEDIUM
@JSON
@QUIET
def restore_cluster_cmd(medium: tuple[Path, ...], gen: str | None, dest: Path,
                        disks: tuple[str, ...], force: bool, log_medium: Path | None, as_json: bool,
                        quiet: bool) -> None:
    """Disaster recovery: a new cluster from generation GEN (default: the newest).

    Its disks and metadata equal the backup at T0. It gets a new cluster id (disk labels
    are rewritten; the metadata records where it was restored from), so that it never
    gets mixed up with the original cluster or its backups. The restored cluster is
    checked with fsck before the command succeeds.
    """
    from sdbackup.restore.image import parse_disk_paths, restore_cluster

    paths = parse_disk_paths(disks)
    with _open_gen(medium, gen, log_medium) as (g, reader):
        total = g.manifest.blocks * g.block_size
        with ByteProgress("restore-cluster", total, quiet=quiet) as prog:
            res = restore_cluster(g, reader, dest, paths, force=force, progress=prog.advance)

    def lines() -> None:
        click.echo(f"restored cluster {res.cluster_id} in {dest} from generation "
                   f"{g.id} of cluster {res.from_cluster}")
        for d in res.disks:
            click.echo(f"  disk {d.disk}: {d.path} ({d.blocks} blocks)")
        click.echo(f"  fsck: consistent ({res.fsck_checks} checks passed)")

    _echo_json_or(as_json, res.to_dict(), lines)


# -- before-image logs (issue 6) --------------------------------------------------------------

@click.command()
@MEDIUM
@click.argument("gen", required=False)
@click.option("--log-medium", type=click.Path(path_type=Path),
              help="Where the separate log is (default: where the backup wrote it).")
@JSON
def overlay(medium: Path, gen: str | None, log_medium: Path | None, as_json: bool) -> None:
    """Write a generation's separate before-image log into it (a.6).

    Afterwards the generation needs no log medium: its before images are part of it and
    win over the copied data, so every reader gets the data at T0 from one medium.
    """
    from sdbackup.backup.overlay import overlay_generation
    from sdbackup.media.generation import Generation

    g = Generation.open(medium, gen)
    r = overlay_generation(g, log_medium)
    _echo_json_or(as_json, r, lambda: click.echo(
        f"generation {g.id}: overlaid {r['bi_blocks']} before-image blocks from {r['from']}"
        if r["overlaid"] else f"generation {g.id}: nothing to overlay ({r['why']})"))


@click.group()
def log() -> None:
    """Before-image logs of online backups."""


@log.command("apply")
@click.option("--log-medium", required=True, type=click.Path(path_type=Path),
              help="The log medium directory (or one log file).")
@click.option("--to", "image", required=True, type=click.Path(path_type=Path),
              help="A restored disk image to bring back to T0.")
@click.option("--generation", "gen", help="Which generation's log (default: the only one).")
@click.option("--disk-id", type=int,
              help="The disk id the image is (default: the only disk in the log).")
def log_apply(log_medium: Path, image: Path, gen: str | None, disk_id: int | None) -> None:
    """Apply a before-image log onto a disk image, with no other file (a.7).

    Each record of the log says which disk, where and how many blocks; the oldest
    before image of each block is written over the image.
    """
    from sdbackup.backup.bilog import apply_log
    from sdbackup.media.bilog import read_entries

    if log_medium.is_dir():
        logs = sorted(log_medium.glob("*.bilog"))
        if gen is not None:
            logs = [p for p in logs if p.stem.startswith(gen)]
        if len(logs) != 1:
            raise UsageError(f"{log_medium} holds {len(logs)} matching logs "
                             f"({', '.join(p.stem for p in logs) or 'none'}): name one with "
                             "--generation GEN")
        path = logs[0]
    elif log_medium.exists():
        path = log_medium
    else:
        raise UsageError(f"log medium {log_medium} does not exist")
    if not image.is_file():
        raise UsageError(f"--to {image} is not an image file")
    disks = sorted({e.disk for e in read_entries(path)})
    if disk_id is None:
        if len(disks) > 1:
            raise UsageError(f"the log holds disks {disks}: say which one the image is with "
                             "--disk-id")
        disk_id = disks[0] if disks else 0
    n = apply_log(path, image, disk_id=disk_id)
    click.echo(f"applied {n} before-image blocks of disk {disk_id} from {path} to {image}")
