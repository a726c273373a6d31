"""Durable files: what must survive a crash is fsynced, and replaced atomically.

Every small file whose loss or tearing would hurt (configs, manifests, secrets, address
files) is written with :func:`write_atomic`: a temporary file, ``fsync``, ``rename``
over the old one, ``fsync`` of the directory (so the rename itself survives).
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Crash-safe write: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    sync_dir(path.parent)


def fsync_path(path: Path) -> None:
    """fsync a file that was written and closed (by name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
