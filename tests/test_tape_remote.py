"""Reading backups on tape from a host without a tape drive (c.4, Fig. 37, 39): the host
with the drives runs ``sdbackup tape serve`` (a separate process holding the file
tapes and the disk buffer), and restores, image restores and mounts elsewhere read
through it with ``--tape-server HOST:PORT --secret-file F``; the mount runs on a
"host" of its own (a network namespace reaching the server over a veth link)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster_helpers import PY, sdb_cmd
from test_backup_support import cli, diff_trees, require_fuse
from test_cluster_netns import Host, ip
from test_tape import World, world  # noqa: F401  (the module's fixture)

from sdbackup.net import messages as msg
from sdbackup.net.auth import load_secret
from sdbackup.net.tape import open_remote_set


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    addr: str
    log: Path
    secret: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def info(self) -> dict[str, object]:
        with open_remote_set(self.addr, load_secret(self.secret)) as rs:
            body, _ = rs.peer.call(msg.TapeInfo())
        return body

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError("the tape server did not stop on SIGTERM:\n" +
                                 self.output()[-3000:]) from None


def start_server(tapes: list[Path], buffer: Path, catalog: Path, secret: Path,
                 log: Path, listen: str = "127.0.0.1:0") -> Server:
    args = [a for t in tapes for a in ("--tape", f"file:{t}")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            sdb_cmd("tape", "serve", *args, "--buffer", str(buffer), "--catalog",
                    str(catalog), "--secret-file", str(secret), "--listen", listen),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = re.search(r"listening on (\S+)\n", log.read_text(errors="replace"))
        if m:
            return Server(proc, m.group(1), log, secret)
        if proc.poll() is not None:
            raise AssertionError("the tape server ended:\n" + log.read_text())
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the tape server did not start:\n" + log.read_text())


def _secret(base: Path) -> Path:
    p = base / "secret"
    if not p.exists():
        p.write_text(os.urandom(32).hex() + "\n")
        p.chmod(0o600)
    return p


@pytest.fixture
def server(world: World) -> Iterator[Server]:  # noqa: F811
    s = start_server(world.tapes, world.base / "server-buf", world.catalog,
                     _secret(world.base), world.base / "server.log")
    try:
        yield s
    finally:
        assert s.stop() == 0, s.output()[-3000:]
    assert "Traceback" not in s.output(), s.output()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_restores_through_the_tape_server(world: World, server: Server,  # noqa: F811
                                         tmp_path: Path) -> None:
    remote = ["--tape-server", server.addr, "--secret-file", server.secret]
    # Every generation (a full and two incrementals: chains through the server).
    for i, g in enumerate(world.gens):
        out = tmp_path / f"r{i}"
        r = cli("restore", *remote, g, "--to", out, "-q")
        assert r.code == 0, r.err
        assert diff_trees(world.trees[g], out / "tree") == [], g
    loaded = server.info()["stats"]["buffer"]["blocks_loaded"]  # type: ignore[index]
    assert loaded > 0
    # An image restore equals the disk medium's; the newest generation's blocks are in
    # the server's buffer now: a second client costs the drives nothing.
    g = world.gens[-1]
    r = cli("restore-image", "--medium", world.medium, g, "--disk", "d0", "--to",
            tmp_path / "disk.img", "-q")
    assert r.code == 0, r.err
    r = cli("restore-image", *remote, g, "--disk", "d0", "--to", tmp_path / "tape.img", "-q")
    assert r.code == 0, r.err
    assert _sha(tmp_path / "disk.img") == _sha(tmp_path / "tape.img")
    out = tmp_path / "again"
    r = cli("restore", *remote, "--catalog", tmp_path / "mirror", g, "--to", out, "-q")
    assert r.code == 0, r.err
    assert diff_trees(world.trees[g], out / "tree") == []
    stats = server.info()["stats"]
    assert stats["buffer"]["blocks_loaded"] == loaded, stats  # type: ignore[index]
    assert stats["buffer"]["hits"] > 0, stats  # type: ignore[index]
    # The mirrored catalog was kept (--catalog) and serves the next run.
    mirrored = list((tmp_path / "mirror").glob("*/generations/*/meta.db"))
    assert mirrored


def test_tape_server_errors_are_one_line(world: World, server: Server,  # noqa: F811
                                         tmp_path: Path) -> None:
    g = world.gens[0]
    wrong = tmp_path / "wrong-secret"
    wrong.write_text(os.urandom(32).hex())
    r = cli("restore", "--tape-server", server.addr, "--secret-file", wrong, g, "--to",
            tmp_path / "o1", "-q")
    assert r.code == 7 and "authentication failed" in r.err, r.err
    r = cli("restore", "--tape-server", server.addr, g, "--to", tmp_path / "o2")
    assert r.code == 2 and "--secret-file" in r.err
    r = cli("restore", "--tape-server", server.addr, "--secret-file", server.secret,
            "--buffer", tmp_path / "b", g, "--to", tmp_path / "o3")
    assert r.code == 2 and "give no --tape and no --buffer" in r.err
    r = cli("restore", "--tape-server", "127.0.0.1:1", "--secret-file", server.secret, g,
            "--to", tmp_path / "o4")
    assert r.code == 7 and "sdbackup tape serve' running there" in r.err, r.err
    r = cli("restore", "--tape-server", server.addr, "--secret-file", server.secret,
            "20990101T000000", "--to", tmp_path / "o5")
    assert r.code == 4 and "is not on medium" in r.err, r.err
    # Only the catalog's files of a served generation can be read, nothing else there.
    with open_remote_set(server.addr, load_secret(server.secret)) as rs:
        for gen, name in ((g, "../../../secret"), (g, "stream-0.sdr"), (None, "tapes.json"),
                          ("../..", "manifest.json")):
            with pytest.raises(Exception) as e:
                rs.peer.call(msg.TapeFile(gen, name))
            assert e.value.exit_code in (2, 4), e.value  # type: ignore[attr-defined]
        body, data = rs.peer.call(msg.TapeFile(g, "manifest.json"))
        assert data and body["size"] == len(data)


def test_a_tape_missing_from_the_servers_drives_is_named(world: World,  # noqa: F811
                                                         tmp_path: Path) -> None:
    only2 = tmp_path / "t2.tape"
    shutil.copyfile(world.tapes[1], only2)
    s = start_server([only2], tmp_path / "buf", world.catalog, _secret(world.base),
                     tmp_path / "server.log")
    try:
        r = cli("restore", "--tape-server", s.addr, "--secret-file", s.secret,
                world.gens[0], "--to", tmp_path / "out", "-q")
    finally:
        assert s.stop() == 0
    assert r.code == 4, r.err
    assert "is in none of the drives of tape server" in r.err and s.addr in r.err


# -- a host without a drive, on a network of its own ---------------------------------------


@pytest.fixture
def tapeless_host(tmp_path: Path) -> Iterator[Host]:
    tag = f"{os.getpid() % 100000}"
    h = Host(ns=f"sdbt{tag}tl", veth=f"sdv{tag}tl", peer=f"sdv{tag}tn", addr="10.200.9.2",
             gateway="10.200.9.1", dir=tmp_path / "tapeless")
    made = False
    try:
        ip("netns", "add", h.ns)
        made = True
        ip("link", "add", h.veth, "type", "veth", "peer", "name", h.peer, "netns", h.ns)
        ip("addr", "add", f"{h.gateway}/30", "dev", h.veth)
        ip("link", "set", h.veth, "up")
        ip("-n", h.ns, "addr", "add", f"{h.addr}/30", "dev", h.peer)
        ip("-n", h.ns, "link", "set", h.peer, "up")
        ip("-n", h.ns, "link", "set", "lo", "up")
        h.dir.mkdir()
        yield h
    finally:
        if made:
            for pid in ip("netns", "pids", h.ns, check=False).stdout.split():
                try:  # only our own processes live in our namespace
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
            ip("link", "del", h.veth, check=False)
            ip("netns", "del", h.ns, check=False)


def test_mount_on_a_host_without_a_drive(world: World, tapeless_host: Host,  # noqa: F811
                                         tmp_path: Path) -> None:
    require_fuse("mounting a backup through a tape server", "diff")
    h = tapeless_host
    s = start_server(world.tapes, tmp_path / "buf", world.catalog, _secret(world.base),
                     tmp_path / "server.log", listen=f"{h.gateway}:0")
    try:
        shutil.copy(s.secret, h.dir / "secret")  # all the host gets
        g = world.gens[-1]  # an incremental: its chain is read through the server
        mp = h.dir / "mnt"
        mp.mkdir()
        # One shell on the host: ip netns exec gives each command its own mount
        # namespace, so the mount, the diff and the unmount run in one.
        script = (
            f'{" ".join(sdb_cmd("mount"))} --tape-server {s.addr} --secret-file '
            f'{h.dir / "secret"} {g} {mp} --background --log-file {h.dir / "mount.log"} '
            f'|| exit 90; diff -r --no-dereference {world.trees[g]} {mp / "tree"}; rc=$?; '
            f'{" ".join(sdb_cmd("umount"))} {mp} >/dev/null || exit 91; exit $rc')
        r = subprocess.run([*h.prefix(), "sh", "-c", script], capture_output=True,
                           text=True, timeout=120, cwd=h.dir,
                           env={**os.environ, "PYTHON": PY})
        assert r.returncode == 0, (r.stdout + r.stderr + (h.dir / "mount.log").read_text(
            errors="replace"))
        # It really came over the link, as a host of its own.
        assert f"connection from {h.addr}:" in s.output(), s.output()[-2000:]
        assert s.info()["stats"]["buffer"]["blocks_loaded"] > 0  # type: ignore[index]
    finally:
        assert s.stop() == 0, s.output()[-3000:]
    assert "Traceback" not in s.output(), s.output()
