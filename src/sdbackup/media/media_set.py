"""Generations whose parts lie on several media read as one (dispersed backups, a.12).

A dispersed backup commits its generation on one medium (the *first*: manifest,
metadata snapshot, index, before-image log) while its data streams -- the *parts* --
were written by copier nodes, each to a medium of its own or to the first one. The
manifest lists every part (stream number, medium id, file relative to that medium's
root) and every other medium (id, the path its copier wrote to, the copier nodes);
see docs/FORMAT.md, "Dispersed generations".

Readers find a part's file through :func:`part_path`, which :meth:`Generation.stream_path`
calls, so verify, restores, the chain reader and mounts all read a dispersed
generation as one:

* a part on the first medium is under the generation's directory;
* a part on another medium is looked for among the media given with the first one
  (``--medium A --medium B``: :func:`open_media` attaches them as *companions*), then
  at the path the manifest recorded (the copier's directory, when this host sees it),
  always checked by the medium's label (its id and cluster);
* a medium found nowhere is :class:`~sdbackup.errors.MediumMissing` (exit 4), one line
  naming the medium id, the path and nodes that wrote it, and the parts it holds.

What is guaranteed: a part is only ever read from a medium whose label carries the id
the manifest names, and only from a file name a dispersed backup makes for that
generation and stream; everything read is then checked as any stream is (label, record
checksums, size and digest against the manifest).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sdbackup.blocks.durable import sync_dir
from sdbackup.errors import CorruptError, MediumMissing, UsageError
from sdbackup.media.medium import (
    GEN_ID_RE,
    PARTS_DIR,
    PARTS_ORIGIN,
    DiskMedium,
    Manifest,
    generation_state,
    parts_of,
    remove_parts_dir,
    stream_name,
)

PART_FILE_RE = re.compile(
    r"^(generations|parts)/(\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8})/stream-(\d+)(\.try\d+)?\.sdr$")
"""Where a part may lie, relative to its medium's root (see backup/parts.py: part_file)."""


MediaPaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
"""One medium's directory, or several (the first is where generations are committed)."""


def open_media(media: MediaPaths) -> DiskMedium:
    """The first medium (where generations are committed), with the others attached
    as its companions (where parts of its dispersed generations may lie). Every medium
    must hold backups of the same cluster."""
    paths = [media] if isinstance(media, (str, os.PathLike)) else list(media)
    if not paths:
        raise UsageError("give --medium DIR")
    first = DiskMedium.open(paths[0])
    for p in paths[1:]:
        other = DiskMedium.open(p)
        if other.cluster_id != first.cluster_id:
            raise UsageError(f"medium {other.root} holds backups of cluster {other.cluster_id}, "
                             f"medium {first.root} of cluster {first.cluster_id}: give media "
                             "of one cluster together")
        if other.medium_id != first.medium_id and all(
                c.medium_id != other.medium_id for c in first.companions):
            first.companions.append(other)
    return first


def part_path(medium: DiskMedium, m: Manifest, n: int) -> Path:
    """The file of stream ``n`` of generation ``m`` committed on ``medium``."""
    entry = next((p for p in parts_of(m) if p.get("stream") == n), None)
    if entry is None:
        return medium.generations_dir / m.id / stream_name(n)
    name = entry.get("file")
    if not isinstance(name, str):
        raise CorruptError(f"generation {m.id}: part {n} names no file: the manifest is "
                           "damaged")
    check_part_file(name, m.id, n)
    mid = entry.get("medium")
    if mid == m.medium_id:
        return medium.root / name
    if not isinstance(mid, str):
        raise CorruptError(f"generation {m.id}: part {n} names no medium: the manifest is "
                           "damaged")
    return find_medium(medium, m, mid).root / name


def check_part_file(name: str, gen_id: str, stream: int) -> None:
    """A part file named by a manifest must be one a dispersed backup makes for that
    generation and stream: a damaged or forged manifest never sends a reader
    elsewhere."""
    hit = PART_FILE_RE.match(name)
    if hit is None or hit.group(2) != gen_id or int(hit.group(3)) != stream:
        raise CorruptError(f"generation {gen_id}: part file {name!r} of stream {stream} is "
                           "not a part file of this generation: the manifest is damaged")


def find_medium(medium: DiskMedium, m: Manifest, medium_id: str) -> DiskMedium:
    """The medium ``medium_id`` that holds parts of ``m``: a companion of ``medium``,
    else the directory the manifest recorded (if its label has that id), else
    :class:`MediumMissing`."""
    info = m.extra.get("media", {}).get(medium_id) if isinstance(m.extra.get("media"), dict) \
        else None
    hint = str(info.get("path")) if isinstance(info, dict) and info.get("path") else None
    found = medium.companion(medium_id, hint)
    if found is not None:
        return found
    nodes = ", ".join(info.get("nodes", [])) if isinstance(info, dict) else "?"
    streams = [str(p.get("stream")) for p in parts_of(m) if p.get("medium") == medium_id]
    raise MediumMissing(
        f"generation {m.id} has parts (streams {', '.join(streams)}) on medium {medium_id}, "
        f"written by node(s) {nodes or '?'} to {hint or '?'}, and that medium is not here: "
        "give it with another --medium DIR (after --medium "
        f"{medium.root})")


@dataclass
class PartsSweep:
    """What ``gc`` did with one ``parts/<generation>/`` directory of a medium."""

    medium: Path
    generation: str
    removed: list[str] = field(default_factory=list)
    """Files removed (relative to the medium's root); the directory itself last when
    it belonged to no committed generation."""
    why: str = ""
    """Why it was removed, or why it (or some of it) was kept."""


def gc_parts(first: DiskMedium, *, dry_run: bool = False) -> list[PartsSweep]:
    """Remove, on ``first`` and its companions, the ``parts/<gen>/`` directories that
    belong to no committed generation (a copier of a failed, crashed or aborted
    dispersed backup left them; or the generation was removed while their medium was
    not there), and the part files of a committed generation that its manifest does
    not name (a lost copier's attempt).

    Whether the generation is committed, still being written or gone is read where
    it is committed: the medium named by the directory's origin (written by the
    copier), or, for a directory without one, whichever medium given holds the
    generation. When that medium is not given, nothing is removed (a sweep says so):
    a directory is never removed on a guess. A backup still running holds its
    generation's lock, and its parts are kept."""
    given = [first, *first.companions]
    by_id = {m.medium_id: m for m in given}
    out: list[PartsSweep] = []
    for med in given:
        pdir = med.root / PARTS_DIR
        if not pdir.is_dir():
            continue
        for name in sorted(os.listdir(pdir)):
            d = pdir / name
            if not GEN_ID_RE.match(name) or d.is_symlink() or not d.is_dir():
                continue
            sweep = PartsSweep(med.root, name)
            out.append(sweep)
            home_id = _origin(d, name, med.cluster_id)
            home: DiskMedium | None = None
            if home_id is not None:
                home = by_id.get(home_id)
                if home is None:
                    sweep.why = (f"kept: generation {name} is committed, if at all, on medium "
                                 f"{home_id}, which was not given (add it with --medium)")
                    continue
            else:
                home = next((m for m in given
                             if generation_state(m, name) != "absent"), None)
                if home is None:
                    sweep.why = (f"kept: generation {name} is on none of the media given, "
                                 "and its parts do not say where it is committed (add that "
                                 "medium with --medium)")
                    continue
            state = generation_state(home, name)
            if state == "running":
                sweep.why = f"kept: a backup is writing generation {name} on {home.root}"
                continue
            if state == "damaged":
                sweep.why = (f"kept: the manifest of generation {name} on {home.root} is "
                             "damaged (see 'sdbackup verify')")
                continue
            files = sorted(f for f in os.listdir(d) if f != PARTS_ORIGIN)
            if state == "committed":
                m = home.read_manifest(name)
                named = {str(p.get("file", "")).rpartition("/")[2] for p in parts_of(m)
                         if p.get("medium") == med.medium_id}
                if named:
                    stale = [f for f in files if f not in named]
                    sweep.why = (f"parts of committed generation {name} that its manifest "
                                 "does not name (a lost copier's attempt)" if stale else "")
                    for f in stale:
                        if not dry_run:
                            p = d / f
                            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() \
                                else p.unlink(missing_ok=True)
                        sweep.removed.append(f"{PARTS_DIR}/{name}/{f}")
                    if stale and not dry_run:
                        sync_dir(d)
                    continue
                sweep.why = f"committed generation {name} has no part on this medium"
            elif state == "unfinished":
                sweep.why = f"generation {name} failed or was never committed"
            else:
                sweep.why = f"generation {name} is no longer on {home.root}"
            sweep.removed = [f"{PARTS_DIR}/{name}/{f}" for f in files] + [f"{PARTS_DIR}/{name}/"]
            if not dry_run:
                remove_parts_dir(med, name)
    return out


def _origin(d: Path, gen_id: str, cluster_id: str) -> str | None:
    """The id of the medium a parts directory's generation is committed on (its
    origin file), or None when it has none (or a damaged or foreign one)."""
    try:
        o = json.loads((d / PARTS_ORIGIN).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(o, dict) or o.get("generation") != gen_id \
            or o.get("cluster") != cluster_id or not isinstance(o.get("medium"), str):
        return None
    return str(o["medium"])
