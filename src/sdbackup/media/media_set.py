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

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdbackup.errors import CorruptError, MediumMissing, SdbError, UsageError
from sdbackup.media.medium import DiskMedium, Manifest, stream_name

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


def parts_of(m: Manifest) -> list[dict[str, Any]]:
    """The manifest's parts (empty for a generation copied by one copier)."""
    parts = m.extra.get("parts")
    return [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []


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
    for c in medium.companions:
        if c.medium_id == medium_id:
            return c
    info = m.extra.get("media", {}).get(medium_id) if isinstance(m.extra.get("media"), dict) \
        else None
    hint = str(info.get("path")) if isinstance(info, dict) and info.get("path") else None
    if hint is not None:
        try:
            found = DiskMedium.open(hint)
        except (SdbError, OSError):
            found = None
        if found is not None and found.medium_id == medium_id \
                and found.cluster_id == medium.cluster_id:
            medium.companions.append(found)
            return found
    nodes = ", ".join(info.get("nodes", [])) if isinstance(info, dict) else "?"
    streams = [str(p.get("stream")) for p in parts_of(m) if p.get("medium") == medium_id]
    raise MediumMissing(
        f"generation {m.id} has parts (streams {', '.join(streams)}) on medium {medium_id}, "
        f"written by node(s) {nodes or '?'} to {hint or '?'}, and that medium is not here: "
        "give it with another --medium DIR (after --medium "
        f"{medium.root})")
