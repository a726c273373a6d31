"""The cluster directory: its readable config file, secret and lock.

Layout of CLUSTER_DIR::

    cluster.toml   readable config: cluster id, block size, the disks and their paths
    meta.db        the metadata store (SQLite, WAL) -- coordinator only
    secret         32 random bytes (hex), mode 0600: authenticates nodes
    lock           flock'ed by whoever runs the coordinator (embedded or not)
    logs/          coordinator and node logs

The disks' labels are in :mod:`sdbackup.blocks.label`.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from sdbackup.errors import NotFoundError, UsageError

CONFIG_NAME = "cluster.toml"
ADDR_FILE = "coordinator.addr"  # "HOST:PORT pid=... epoch=..." while one runs

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)?\s*$", re.IGNORECASE)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def parse_size(text: str) -> int:
    """Parse '4GiB', '512M', '1048576' into bytes (binary units: K=1024)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"cannot parse size {text!r}: use a number with an optional unit, "
                         "e.g. 4GiB, 512MiB, 65536")
    num, unit = float(m.group(1)), m.group(2).lower()
    mult = 1024 ** " kmgtp".index(unit) if unit else 1
    return int(num * mult)


def check_disk_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise UsageError(f"invalid disk name {name!r}: use letters, digits, '_', '.', '-' "
                         "(up to 64 characters, starting with a letter or digit)")


def check_block_size(bs: int) -> None:
    if bs < 512 or bs & (bs - 1) or bs > 1 << 20:
        raise UsageError(f"block size {bs} is not a power of two between 512 and 1 MiB")


@dataclass
class DiskConfig:
    name: str
    path: str
    id: int
    # True: opened with O_DIRECT, shareable between hosts. False: a single-host disk
    # (its file system refuses O_DIRECT). None: not recorded (older clusters): probed.
    direct: bool | None = None


@dataclass
class ClusterConfig:
    cluster_id: str
    block_size: int
    disks: list[DiskConfig] = field(default_factory=list)

    def disk(self, name: str) -> DiskConfig:
        for d in self.disks:
            if d.name == name:
                return d
        known = ", ".join(d.name for d in self.disks) or "none"
        raise UsageError(f"unknown disk {name!r}: this cluster has {known}")

    def to_toml(self) -> str:
        lines = [
            "# sdbackup cluster configuration. Disk paths may be edited if a disk moves;",
            "# ids and the block size must not change.",
            f'cluster_id = "{self.cluster_id}"',
            f"block_size = {self.block_size}",
            "",
        ]
        for d in self.disks:
            lines += ["[[disk]]", f'name = "{d.name}"', f"id = {d.id}",
                      f"path = {json.dumps(d.path)}"]
            if d.direct is not None:
                if not d.direct:
                    lines.append("# single-host disk: its file system refuses O_DIRECT, so "
                                 "nodes on other hosts cannot use it")
                lines.append(f"direct = {'true' if d.direct else 'false'}")
            lines.append("")
        return "\n".join(lines)


def cluster_path(cluster_dir: str | os.PathLike[str], name: str) -> Path:
    return Path(cluster_dir) / name


def load_config(cluster_dir: str | os.PathLike[str]) -> ClusterConfig:
    path = Path(cluster_dir) / CONFIG_NAME
    if Path(cluster_dir).exists() and not Path(cluster_dir).is_dir():
        raise UsageError(f"{cluster_dir} is a file, not a cluster directory: give the "
                         "directory made by 'sdbackup init'")
    if not Path(cluster_dir).is_dir():
        raise NotFoundError(f"cluster directory {cluster_dir} does not exist: create it with "
                            "'sdbackup init'")
    if not path.exists():
        raise NotFoundError(f"{cluster_dir} is not an sdbackup cluster (no {CONFIG_NAME}): "
                            "create one with 'sdbackup init'")
    try:
        raw = tomllib.loads(path.read_text())
        disks = [DiskConfig(str(d["name"]), str(d["path"]), int(d["id"]),
                            None if d.get("direct") is None else bool(d["direct"]))
                 for d in raw.get("disk", [])]
        cfg = ClusterConfig(str(raw["cluster_id"]), int(raw["block_size"]), disks)
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"malformed {path}: {e}; fix the file or re-create the cluster") from None
    check_block_size(cfg.block_size)
    return cfg


def read_addr(cluster_dir: str | os.PathLike[str]) -> tuple[str, int] | None:
    """The running coordinator's address from CLUSTER_DIR, or None."""
    p = Path(cluster_dir) / ADDR_FILE
    try:
        text = p.read_text().split()
    except OSError:  # none there (or CLUSTER_DIR is not a directory: said elsewhere)
        return None
    if len(text) < 2:
        return None
    host, _, port = text[0].rpartition(":")
    try:
        return host, int(port)
    except ValueError:
        return None
