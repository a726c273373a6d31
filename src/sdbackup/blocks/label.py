"""The label in block 0 of every shared disk: which cluster and which disk it is.

A disk carries ``SDBDISK1``, a length, then JSON (cluster id, disk name and id, block
size, block count), in a block of its own that no file ever gets, so that a disk cannot
silently be used by two clusters, or in place of another disk of the same cluster.
"""

from __future__ import annotations

import json
import os

from sdbackup.errors import CorruptError

DISK_MAGIC = b"SDBDISK1"
LABEL_BLOCKS = 1  # blocks reserved at the start of every disk for its label


def make_label(cluster_id: str, disk_name: str, disk_id: int, block_size: int,
               nblocks: int) -> bytes:
    body = json.dumps({"cluster_id": cluster_id, "disk": disk_name, "disk_id": disk_id,
                       "block_size": block_size, "nblocks": nblocks}).encode()
    label = DISK_MAGIC + len(body).to_bytes(4, "little") + body
    return label + bytes(block_size - len(label))


def read_label(path: str | os.PathLike[str]) -> dict[str, object] | None:
    """The label of a disk, or None when it carries none."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except FileNotFoundError:
        return None
    if not head.startswith(DISK_MAGIC):
        return None
    n = int.from_bytes(head[8:12], "little")
    try:
        label: dict[str, object] = json.loads(head[12 : 12 + n])
    except ValueError:
        raise CorruptError(f"disk {path} has a damaged sdbackup label") from None
    return label
