"""Ids that must never be mixed up get their own type (checked by mypy)."""

from __future__ import annotations

from typing import NewType

InodeId = NewType("InodeId", int)
"""An inode number in the metadata store; the root directory is ``ROOT_INODE``."""

DiskId = NewType("DiskId", int)
"""A disk's small integer id inside one cluster (stable, stored on media records)."""

BlockNo = NewType("BlockNo", int)
"""A block number on one disk (in units of the cluster's block size)."""

GenerationId = NewType("GenerationId", str)
"""A backup generation id on a medium."""

ROOT_INODE = InodeId(1)
