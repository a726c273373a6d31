"""``sdbackup tape ...``: blank, label, write, list and catalog tapes.

A tape is named ``file:PATH`` (a file-backed tape) or by the path of a Linux ``st``
device (``/dev/nst0``) wherever a tape is accepted. The disk catalog (where each
generation's blocks lie on which tape) is a directory, ``--catalog DIR``, by default
``$SDBACKUP_TAPE_CATALOG`` or ``~/.local/share/sdbackup/tape-catalog``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from sdbackup.errors import UsageError


def register(cli: click.Group) -> None:
    cli.add_command(tape)


@click.group()
def tape() -> None:
    """Tapes: blank (file-backed), label, write generations to, list, catalog."""


@tape.command("create")
@click.argument("spec", metavar="file:PATH")
@click.option("--capacity", required=True, metavar="SIZE",
              help="How much the tape holds (e.g. 12TB is LTO-8; 4GiB for a test).")
@click.option("--force", is_flag=True, help="Erase an existing file at PATH.")
def create(spec: str, capacity: str, force: bool) -> None:
    """Make a blank file-backed tape at PATH (its time model: an LTO-8-class drive)."""
    from sdbackup.cluster.config import parse_size
    from sdbackup.media.tape.device import FILE_PREFIX
    from sdbackup.media.tape.filetape import FileTape

    if not spec.startswith(FILE_PREFIX):
        raise UsageError(f"{spec}: only a file-backed tape (file:PATH) can be created; a "
                         "real tape is blank when it comes out of its box")
    path = Path(spec[len(FILE_PREFIX):])
    FileTape.create(path, parse_size(capacity.replace("TB", "T").replace("GB", "G")),
                    force=force)
    with FileTape.open(path) as t:
        click.echo(f"created a blank tape: {t.describe()}")


def _json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


# -- options shared with restore and mount -------------------------------------------------

TAPES = click.option("--tape", "tapes", multiple=True, metavar="DEV",
                     help="A tape drive: file:PATH or /dev/nstN (repeat for the tapes of a "
                          "set in several drives).")
CATALOG = click.option("--catalog", "catalog_dir", type=click.Path(path_type=Path),
                       default=None, metavar="DIR",
                       help="The tape catalog (default: $SDBACKUP_TAPE_CATALOG or "
                            "~/.local/share/sdbackup/tape-catalog).")


def tape_read_options(f: Any) -> Any:
    """--tape, --buffer, --buffer-size, --readahead, --catalog: reading a backup on
    tape through a disk buffer (restore, restore-image, mount); --tape-server,
    --secret-file: through the buffer of another host's tape server."""
    f = click.option("--secret-file", type=click.Path(path_type=Path), metavar="FILE",
                     help="With --tape-server: the cluster secret (a copy of "
                          "CLUSTER_DIR/secret).")(f)
    f = click.option("--tape-server", metavar="HOST:PORT",
                     help="Read the backup on tape through the tape server of the host "
                          "with the drive ('sdbackup tape serve'): no drive needed here.")(f)
    f = click.option("--readahead", type=int, default=32, show_default=True,
                     metavar="BLOCKS",
                     help="With --tape: tape blocks loaded after each missed one.")(f)
    f = click.option("--buffer-size", default="1GiB", show_default=True, metavar="SIZE",
                     help="With --tape: the most the buffer holds (least recently used "
                          "blocks go first).")(f)
    f = click.option("--buffer", "buffer_dir", type=click.Path(path_type=Path),
                     metavar="DIR",
                     help="With --tape: the disk buffer tape blocks are loaded into "
                          "(kept across runs).")(f)
    f = CATALOG(f)
    return TAPES(f)


def catalog_of(catalog_dir: Path | None) -> Any:
    from sdbackup.media.tape.catalog import TapeCatalog, default_catalog

    return TapeCatalog(catalog_dir or default_catalog())


def reads_tape(media: tuple[Path, ...], tapes: tuple[str, ...] = (),
               tape_server: str | None = None, buffer_dir: Path | None = None,
               secret_file: Path | None = None, **_: Any) -> bool:
    """Where restore, restore-image and mount read: True from tape (--tape DEV
    --buffer DIR, or --tape-server HOST:PORT --secret-file FILE), False from the disk
    media given (--medium DIR, repeatable). One line (exit 2) when none is given, or
    sources (or their options) that do not go together."""
    if tape_server is not None and (tapes or buffer_dir is not None):
        raise UsageError("--tape-server reads through the tape server's drives and "
                         "buffer: give no --tape and no --buffer")
    if media and (tapes or tape_server is not None):
        raise UsageError("give --medium DIR or --tape DEV (or --tape-server), not both")
    if not media and not tapes and tape_server is None:
        raise UsageError("give the backup medium: --medium DIR (repeat it for parts on "
                         "several media), --tape DEV --buffer DIR, or --tape-server "
                         "HOST:PORT --secret-file FILE")
    if secret_file is not None and tape_server is None:
        raise UsageError("--secret-file goes with --tape-server")
    if media and buffer_dir is not None:
        raise UsageError("--buffer goes with --tape (a backup on disk is read directly)")
    return bool(tapes) or tape_server is not None


def open_tape_set(tapes: tuple[str, ...], buffer_dir: Path | None, catalog_dir: Path | None,
                  buffer_size: str, readahead: int, tape_server: str | None = None,
                  secret_file: Path | None = None) -> Any:
    """The tape set opened for reading: in ``tapes`` through the disk buffer here (an
    OpenedSet), or through the tape server at ``tape_server`` (a RemoteSet). Both
    have ``medium`` (a TapeSetMedium) and ``close()``."""
    if tape_server is not None:
        from sdbackup.net.auth import load_secret
        from sdbackup.net.tape import open_remote_set

        if tapes or buffer_dir is not None:
            raise UsageError("--tape-server reads through the tape server's drives and "
                             "buffer: give no --tape and no --buffer")
        if secret_file is None:
            raise UsageError("--tape-server needs --secret-file FILE (a copy of the "
                             "cluster's CLUSTER_DIR/secret)")
        return open_remote_set(tape_server, load_secret(secret_file),
                               catalog_dir=catalog_dir)
    from sdbackup.cluster.config import parse_size
    from sdbackup.media.tape.library import open_set

    if secret_file is not None:
        raise UsageError("--secret-file goes with --tape-server")
    if buffer_dir is None:
        raise UsageError("reading from tape needs a disk buffer: give --buffer DIR")
    return open_set(tapes, buffer_dir, catalog=catalog_of(catalog_dir),
                    limit=parse_size(buffer_size), readahead=readahead)


# -- commands ----------------------------------------------------------------------------------


@tape.command("label")
@TAPES
@click.option("--cluster", "cluster_id", default=None, metavar="ID",
              help="The cluster id whose backups the tape will hold (default: taken from "
                   "--medium).")
@click.option("--medium", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="A backup medium of the cluster (for its id).")
@click.option("--set", "set_id", default=None, metavar="SET",
              help="Join this tape set (with --sequence) instead of starting a new one.")
@click.option("--sequence", type=int, default=1, show_default=True)
@click.option("--block-size", default="256KiB", show_default=True, metavar="SIZE")
@click.option("--force", is_flag=True, help="Relabel a labelled or foreign tape (erases it).")
@CATALOG
@click.option("--json", "as_json", is_flag=True)
def label_cmd(tapes: tuple[str, ...], cluster_id: str | None, medium: Path | None,
              set_id: str | None, sequence: int, block_size: str, force: bool,
              catalog_dir: Path | None, as_json: bool) -> None:
    """Label the tape in --tape DEV for a cluster: a new tape set, or --set SET."""
    from sdbackup.cluster.config import parse_size
    from sdbackup.media.medium import DiskMedium
    from sdbackup.media.tape.library import TapeLibrary, label_tape

    if cluster_id is None:
        if medium is None:
            raise UsageError("give --cluster ID or --medium DIR (the cluster's backups)")
        cluster_id = DiskMedium.open(medium).cluster_id
    if len(tapes) != 1:
        raise UsageError("give one --tape to label")
    with TapeLibrary.open(tapes, write=True, foreign_ok=True) as lib:
        lab = label_tape(lib, cluster_id, set_id=set_id, sequence=sequence,
                         block_size=parse_size(block_size), force=force)
    catalog_of(catalog_dir).record_tape(lab)
    if as_json:
        _json(lab.to_obj())
    else:
        click.echo(f"labelled {tapes[0]}: {lab.describe()}, cluster {lab.cluster}, "
                   f"blocks of {lab.block_size} bytes")


@tape.command("ls")
@TAPES
@click.option("--json", "as_json", is_flag=True)
def ls_cmd(tapes: tuple[str, ...], as_json: bool) -> None:
    """What is on a tape: its label and every part of every generation (from the tape
    alone: one block per tape file is read)."""
    from sdbackup.media.tape.format import scan_tape
    from sdbackup.media.tape.library import TapeLibrary

    out: list[dict[str, Any]] = []
    with TapeLibrary.open(tapes) as lib:
        for dev, lab in zip(lib.devices, lib.labels, strict=True):
            if lab is None:
                out.append({"drive": dev.name, "label": None})
                continue
            files = [{"generation": fp.generation, "part": fp.part,
                      "offset": fp.piece.offset, "bytes": fp.piece.length,
                      "part_bytes": fp.part_bytes, "file": fp.piece.file,
                      "block": fp.piece.block} for fp in scan_tape(dev, lab)]
            out.append({"drive": dev.name, "label": lab.to_obj(), "files": files})
    if as_json:
        _json(out)
        return
    for t in out:
        if t["label"] is None:
            click.echo(f"{t['drive']}: blank")
            continue
        lab = t["label"]
        click.echo(f"{t['drive']}: tape {lab['tape']} (set {lab['set']}, "
                   f"#{lab['sequence']}), cluster {lab['cluster']}")
        for f in t["files"]:
            cont = f" from byte {f['offset']}" if f["offset"] else ""
            # A part streamed to tape by a backup: its size is in the manifest.
            total = f["part_bytes"] if f["part_bytes"] is not None else "?"
            click.echo(f"  file {f['file']:4d} block {f['block']:8d}  {f['generation']}  "
                       f"{f['part']}{cont} ({f['bytes']} of {total} bytes)")


@tape.command("write")
@click.option("--medium", required=True, multiple=True, type=click.Path(path_type=Path),
              metavar="DIR",
              help="The disk medium holding the generations. Repeat it for generations "
                   "whose parts lie on several media (backup --copy-nodes): the first is "
                   "where they were committed.")
@click.argument("gens", nargs=-1, metavar="[GEN]...")
@TAPES
@click.option("--log-medium", type=click.Path(path_type=Path),
              help="Where separate before-image logs are: they are overlaid before the "
                   "generation goes to tape (Fig. 38).")
@click.option("--block-size", default="256KiB", show_default=True, metavar="SIZE",
              help="Tape block size of a new set.")
@click.option("--force", is_flag=True,
              help="Relabel tapes of another cluster, or foreign tapes, when needed.")
@CATALOG
@click.option("--json", "as_json", is_flag=True)
def write_cmd(medium: tuple[Path, ...], gens: tuple[str, ...], tapes: tuple[str, ...],
              log_medium: Path | None, block_size: str, force: bool,
              catalog_dir: Path | None, as_json: bool) -> None:
    """Copy committed generations (default: all not yet on the set) to tape, in one
    stream: the set's last tape first, then the blank tapes given after it."""
    from sdbackup.backup.overlay import overlay_generation
    from sdbackup.cluster.config import parse_size
    from sdbackup.media.generation import Generation, external_log
    from sdbackup.media.media_set import open_media
    from sdbackup.media.tape.library import TapeLibrary, write_generations

    med = open_media(medium)
    chosen = [med.resolve(g) for g in gens] if gens else med.committed()
    ready = []
    for m in chosen:
        gen = Generation(med, m)
        if external_log(gen, log_medium) is not None:
            overlay_generation(gen, log_medium)  # Fig. 38: the log goes onto the data first
            m = med.read_manifest(m.id)
        ready.append(m)
    ready.sort(key=lambda m: (m.t0_wall_ns, m.id))
    with TapeLibrary.open(tapes, write=True, foreign_ok=force) as lib:
        rep = write_generations(med, ready, lib, catalog_of(catalog_dir), force=force,
                                block_size=parse_size(block_size))
        stats = lib.stats()
    if as_json:
        _json({**rep.to_dict(), "drives": stats})
        return
    for g in rep.skipped:
        click.echo(f"generation {g} is on tape set {rep.set} already: skipped")
    click.echo(f"wrote {len(rep.written)} generation(s), {rep.bytes} bytes, to tape set "
               f"{rep.set} (tapes {', '.join(rep.tapes)}); drive time "
               f"{rep.drive_seconds:.1f} s")


@tape.command("catalog")
@CATALOG
@click.option("--rebuild", is_flag=True,
              help="Rebuild the catalog of the set in --tape DEV... from the tapes alone.")
@TAPES
@click.option("--json", "as_json", is_flag=True)
def catalog_cmd(catalog_dir: Path | None, rebuild: bool, tapes: tuple[str, ...],
                as_json: bool) -> None:
    """List the tape sets, tapes and generations the disk catalog knows (where each
    part lies: tape, file, block), or --rebuild it from the tapes."""
    from sdbackup.media.tape.library import TapeLibrary, rebuild_catalog

    cat = catalog_of(catalog_dir)
    if rebuild:
        with TapeLibrary.open(tapes) as lib:
            rep = rebuild_catalog(lib, cat)
        if as_json:
            _json(rep)
        else:
            click.echo(f"rebuilt the catalog of tape set {rep['set']} from "
                       f"{len(rep['tapes'])} tape(s): {len(rep['generations'])} "
                       f"generation(s)" + (f"; incomplete (not listed): "
                                           f"{', '.join(rep['incomplete'])}"
                                           if rep["incomplete"] else ""))
        return
    if tapes:
        raise UsageError("--tape goes with --rebuild")
    out = []
    for set_id in cat.sets():
        gens = []
        for gid in cat.generation_ids(set_id):
            parts = cat.placement(set_id, gid)
            gens.append({"id": gid, "parts": {k: [p.to_obj() for p in v]
                                              for k, v in parts.items()}})
        out.append({"set": set_id, "tapes": cat.tapes(set_id), "generations": gens})
    if as_json:
        _json(out)
        return
    if not out:
        click.echo(f"the tape catalog {cat.root} is empty")
    for s in out:
        click.echo(f"tape set {s['set']}:")
        for tid, t in sorted(s["tapes"].items(), key=lambda x: x[1]["sequence"]):
            click.echo(f"  tape #{t['sequence']} {tid}")
        for g in s["generations"]:
            first = g["parts"].get("stream-0.sdr", [{}])[0]
            click.echo(f"  {g['id']}  from tape {first.get('tape')} file "
                       f"{first.get('file')} block {first.get('block')}")


@tape.command("serve")
@TAPES
@click.option("--buffer", "buffer_dir", required=True, type=click.Path(path_type=Path),
              metavar="DIR", help="The disk buffer tape blocks are loaded into (kept "
                                  "across runs).")
@click.option("--buffer-size", default="1GiB", show_default=True, metavar="SIZE",
              help="The most the buffer holds (least recently used blocks go first).")
@click.option("--readahead", type=int, default=32, show_default=True, metavar="BLOCKS",
              help="Tape blocks loaded after each missed one.")
@click.option("--listen", default="127.0.0.1:0", show_default=True, metavar="HOST:PORT",
              help="Address to serve on (port 0: any free port; 0.0.0.0 for every "
                   "interface).")
@click.option("--secret-file", required=True, type=click.Path(path_type=Path),
              metavar="FILE", help="The cluster secret (CLUSTER_DIR/secret or a copy): "
                                   "only hosts that hold it may read.")
@click.option("--gather", type=click.FloatRange(0, 10), default=0.03, show_default=True,
              metavar="SECONDS",
              help="How long a miss waits for others to sweep them in one pass (longer: "
                   "better order for many readers, more latency for one).")
@CATALOG
def serve_cmd(tapes: tuple[str, ...], buffer_dir: Path, buffer_size: str, readahead: int,
              listen: str, secret_file: Path, gather: float,
              catalog_dir: Path | None) -> None:
    """Serve the tape set in --tape DEV... to hosts without a tape drive (until SIGTERM
    or Ctrl-C). Logs (connections, and the buffer's and drives' counters at the end)
    go to stderr.

    Other hosts read its generations with 'sdbackup mount|restore|restore-image
    --tape-server HOST:PORT --secret-file FILE': blocks come from this host's disk
    buffer, or are loaded from tape into it; the reads of every client are batched
    and sorted by tape position together.
    """
    import logging

    from sdbackup.cli.daemon_cmds import _wait_for_signal
    from sdbackup.net.auth import load_secret
    from sdbackup.net.tape import TapeServer, parse_address

    host, port = parse_address(listen, "--listen")
    secret = load_secret(secret_file)
    root = logging.getLogger()
    if root.level > logging.INFO:  # a server says who connects and when it stops
        root.setLevel(logging.INFO)
    opened = open_tape_set(tapes, buffer_dir, catalog_dir, buffer_size, readahead)
    server = TapeServer(opened, secret, host, port, gather=gather)
    try:
        h, p = server.start()
        click.echo(f"tape server for tape set {opened.medium.set_id} (tapes "
                   f"{', '.join(lab.tape for _, lab in opened.lib.labelled())}) listening "
                   f"on {h}:{p}", err=True)
        _wait_for_signal()
    finally:
        server.stop()
