"""How file system values travel in protocol bodies (JSON).

File names and symlink targets are bytes; JSON has no bytes, so they travel as
latin-1 strings (a lossless one-to-one mapping of bytes 0-255 to code points).
Attributes travel as dicts, extents and write runs as lists.
"""

from __future__ import annotations

from typing import Any

from sdbackup.meta.types import Attr, DirEntry, Extent, StatFs, WriteRun
from sdbackup.types import DiskId


def enc_name(name: bytes) -> str:
    return name.decode("latin-1")


def dec_name(text: Any) -> bytes:
    if not isinstance(text, str):
        raise TypeError("a name must travel as a string")
    return text.encode("latin-1")


def enc_attr(a: Attr) -> dict[str, Any]:
    return a.to_dict()


def dec_attr(d: Any) -> Attr:
    return Attr.from_dict(d)


def enc_runs(runs: list[WriteRun] | list[Extent]) -> list[list[Any]]:
    return [list(r) for r in runs]


def dec_extents(rows: Any) -> list[Extent]:
    return [Extent(int(r[0]), int(r[1]), DiskId(int(r[2])), int(r[3])) for r in rows]


def dec_write_runs(rows: Any) -> list[WriteRun]:
    return [WriteRun(int(r[0]), int(r[1]), DiskId(int(r[2])), int(r[3]), bool(r[4]),
                     int(r[5]) if len(r) > 5 else 0) for r in rows]


def enc_dirents(ents: list[DirEntry]) -> list[list[Any]]:
    return [[e.cookie, enc_name(e.name), enc_attr(e.attr)] for e in ents]


def dec_dirents(rows: Any) -> list[DirEntry]:
    return [DirEntry(int(r[0]), dec_name(r[1]), dec_attr(r[2])) for r in rows]


def enc_statfs(s: StatFs) -> dict[str, Any]:
    return {"block_size": s.block_size, "blocks": s.blocks, "free": s.free, "files": s.files,
            "name_max": s.name_max}


def dec_statfs(d: Any) -> StatFs:
    return StatFs(**d)
