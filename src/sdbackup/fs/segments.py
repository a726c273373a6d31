"""The unit in which nodes cache file data and hold rights on it: a segment.

A segment is ``SEGMENT_BYTES`` of one file (1 MiB). A node caches, and the coordinator
grants read or write rights on, whole segments (seed a.1: the cluster cache table's
areas); see :mod:`sdbackup.fs.cached` and :mod:`sdbackup.cluster.rights`.
"""

from __future__ import annotations

SEGMENT_BYTES = 1 << 20
