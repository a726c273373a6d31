"""The CLI starts without its heavy dependencies (issue 11).

``sdbackup --help``, every command's ``--help``, and ``generations`` and ``gc`` on a
medium must not import numpy, zstandard, rich, pyroaring, trio or pyfuse3: the
commands import what they run on when they run. Checked in a fresh interpreter (the
test process has imported everything already) by looking at ``sys.modules`` after the
commands ran; a guard on what is imported, not a timing test (bench/startup.py times).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
from test_backup_support import backup, make_cluster, make_tree, put_tree

import sdbackup
from sdbackup.cli.main import cli

HEAVY = ("numpy", "zstandard", "rich", "pyroaring", "trio", "pyfuse3")

# Runs each argv through the entry point in one new interpreter, output swallowed;
# prints the exit codes, the last command's stdout and the modules imported.
PROBE = r"""
import contextlib, io, json, sys
from sdbackup.cli.main import main
codes, out = [], ""
for argv in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit as e:
            codes.append(e.code)
    out = buf.getvalue()
print(json.dumps({"codes": codes, "out": out, "modules": sorted(sys.modules)}))
"""


def probe(*argvs: list[str]) -> dict[str, Any]:
    src = str(Path(sdbackup.__file__).resolve().parents[1])  # the code under test
    env = {**os.environ, "PYTHONPATH": src}
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def heavy(modules: list[str]) -> list[str]:
    return sorted({h for h in HEAVY for m in modules if m == h or m.startswith(h + ".")})


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[list[str]]:
    """Every command and subcommand of the CLI, as argv prefixes."""
    out: list[list[str]] = []
    for name, cmd in sorted(group.commands.items()):
        path = (*prefix, name)
        out.append(list(path))
        if isinstance(cmd, click.Group):
            # 'fs' takes CLUSTER_DIR before its subcommand; --help stops before using it
            out += command_paths(cmd, (*path, "CLUSTER_DIR") if cmd.params else path)
    return out


def test_help_imports_nothing_heavy() -> None:
    r = probe(["--help"])
    assert r["codes"] == [0]
    assert "Commands:" in r["out"] and "generations" in r["out"]
    assert heavy(r["modules"]) == []
    # the rule behind it (sdbackup.cli.main): command modules load no other package
    ours = {m for m in r["modules"] if m == "sdbackup" or m.startswith("sdbackup.")}
    assert {m for m in ours if not m.startswith("sdbackup.cli")} == {"sdbackup",
                                                                     "sdbackup.errors"}


def test_every_command_help_imports_nothing_heavy() -> None:
    paths = command_paths(cli)
    assert ["generations"] in paths and ["fs", "CLUSTER_DIR", "ls"] in paths
    assert ["log", "apply"] in paths and ["cache", "ls"] in paths
    r = probe(*[[*p, "--help"] for p in paths])
    assert r["codes"] == [0] * len(paths)
    assert heavy(r["modules"]) == []


def test_generations_and_gc_read_the_medium_without_heavy_imports(tmp_path: Path) -> None:
    cdir = make_cluster(tmp_path / "c")
    put_tree(cdir, make_tree(tmp_path / "tree", files=4))
    medium = tmp_path / "medium"
    gen = backup(cdir, medium).manifest.id
    r = probe(["generations", "--medium", str(medium)],
              ["gc", "--medium", str(medium), "--dry-run"],
              ["generations", "--medium", str(medium), "--json"])
    assert r["codes"] == [0, 0, 0]
    listed = json.loads(r["out"])["generations"]
    assert [g["id"] for g in listed] == [gen]
    assert heavy(r["modules"]) == []
