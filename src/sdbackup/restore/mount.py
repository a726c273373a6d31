"""A backup as a mounted, read-only file system (seed c.1, c.2, c.5; Fig. 28-29, 34-35).

No restore step: the same :class:`~sdbackup.fs.readonly.ReadOnlyFileSystem` and FUSE
adapter as the live cluster, over another pair of sources: a generation's T0 metadata
snapshot and its chain's block source (each block from the newest generation of the
chain that holds it; a separate before-image log that was not overlaid is read first),
or, for ``--all``, every generation of the medium as one tree
(:class:`~sdbackup.media.medium_view.MediumView`). Nothing but the medium is needed:
no cluster directory, no coordinator, no network.

The FUSE adapter mounts it ``ro`` and lets the kernel keep names, attributes and pages
for as long as it likes (a backup never changes), with 1 MiB readahead. A record that
fails its checksum makes reads of the blocks it holds fail with ``EIO``, and the log
line names the generation, the disk, the blocks and the medium offset; every other
file stays readable.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sdbackup.fs.readonly import ReadOnlyFileSystem
from sdbackup.media.chain import open_chain
from sdbackup.media.media_set import MediaPaths, open_media
from sdbackup.media.medium import DiskMedium, Manifest
from sdbackup.media.medium_view import MediumView


@dataclass
class MountSource:
    """What a mount serves, and what to close once it is unmounted."""

    fs: ReadOnlyFileSystem
    label: str  # shown as the mount's source in mount(8) and df
    close: Callable[[], None]
    manifest: Manifest | None = None  # the generation, when one is mounted


def resolve(medium_path: MediaPaths, gen: str | None) -> Manifest:
    """The generation ``gen`` names (None: the newest); raises with a one-line reason."""
    return open_media(medium_path).resolve(gen)


def open_generation(medium_path: MediaPaths, gen: str | None, *,
                    log_medium: str | os.PathLike[str] | None = None) -> MountSource:
    """One generation as a read-only file system, read through its chain (its parts
    from every medium given: media/media_set.py)."""
    med = open_media(medium_path)
    m = med.resolve(gen)
    snap, reader = open_chain(med, m, log_medium=log_medium)

    def close() -> None:
        reader.close()
        snap.close()

    return MountSource(ReadOnlyFileSystem(snap, reader), f"backup-{m.id}", close, m)


class OpenTapeSet(Protocol):
    """A tape set opened for reading: here through the drives and a disk buffer
    (``OpenedSet``), or through another host's tape server (``net.tape.RemoteSet``)."""

    @property
    def medium(self) -> DiskMedium: ...

    def close(self) -> None: ...


def open_tape_generation(open_set: Callable[[], OpenTapeSet], gen: str | None) -> MountSource:
    """One generation of a tape set, read through a disk buffer (c.3): each block the
    file system reads is looked up in the catalog, served from the buffer, or loaded
    (with read-ahead) from tape; the buffer is this host's or a tape server's (c.4)."""
    opened = open_set()
    try:
        m = opened.medium.resolve(gen)
        snap, reader = open_chain(opened.medium, m)
    except BaseException:
        opened.close()
        raise

    def close() -> None:
        try:
            reader.close()
            snap.close()
        finally:
            opened.close()

    return MountSource(ReadOnlyFileSystem(snap, reader), f"backup-{m.id}", close, m)


def open_all(medium_path: MediaPaths, *,
             log_medium: str | os.PathLike[str] | None = None) -> MountSource:
    """Every generation of the medium, one directory each (see :class:`MediumView`)."""
    view = MediumView(medium_path, log_medium=log_medium)
    return MountSource(ReadOnlyFileSystem(view, view), "backup-all", view.close)


def serve(src: MountSource, mountpoint: str | os.PathLike[str], *,
          on_ready: Callable[[str], None] | None = None) -> str:
    """Serve ``src`` at ``mountpoint`` until it is unmounted or a signal comes; closes
    ``src`` at the end. Returns why it stopped (``unmounted`` or ``signal``)."""
    from sdbackup.fs import fuse_mount

    try:
        return fuse_mount.serve(src.fs, mountpoint, name=src.label, on_ready=on_ready)
    finally:
        src.close()
