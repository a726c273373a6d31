"""Node agents as separate hosts: each in its own network namespace, joined to the root
namespace by a veth pair (addresses 10.200.x.y/30 that exist only on this machine's
veth pairs), reaching the coordinator over them with ``--coordinator HOST:PORT
--secret-file`` and no cluster directory of the coordinator's (issue 3, "Tests").

Each "host" has a directory of its own holding only a copy of the secret; its node
records its control address there, and programs on that host (``ip netns exec``) use
it. The second test cuts one host's link (a real partition, not a stopped process).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

try:  # tests/ as a plain directory of modules...
    from cluster_helpers import PY, ClusterProcs, sdb, wait_for
except ModuleNotFoundError:  # ...or as a package (with tests/__init__.py)
    from tests.cluster_helpers import PY, ClusterProcs, sdb, wait_for

MiB = 1 << 20


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=30)


@dataclass
class Host:
    ns: str
    veth: str  # root side
    peer: str  # inside the namespace
    addr: str  # inside the namespace
    gateway: str  # root side
    dir: Path

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def link(self, up: bool) -> None:
        ip("-n", self.ns, "link", "set", self.peer, "up" if up else "down")
        if up:  # the route through the link went with it
            self.route()

    def route(self) -> None:
        # The coordinator listens on host 1's gateway; every host reaches it through
        # its own link (the root namespace delivers to its own addresses).
        ip("-n", self.ns, "route", "replace", "10.200.0.0/16", "via", self.gateway)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[list[Host]]:
    tag = f"{os.getpid() % 100000}"
    made: list[Host] = []
    try:
        for i in (1, 2):
            h = Host(ns=f"sdbt{tag}h{i}", veth=f"sdv{tag}h{i}", peer=f"sdv{tag}n{i}",
                     addr=f"10.200.{i}.2", gateway=f"10.200.{i}.1", dir=tmp_path / f"host{i}")
            ip("netns", "add", h.ns)
            made.append(h)
            ip("link", "add", h.veth, "type", "veth", "peer", "name", h.peer, "netns", h.ns)
            ip("addr", "add", f"{h.gateway}/30", "dev", h.veth)
            ip("link", "set", h.veth, "up")
            ip("-n", h.ns, "addr", "add", f"{h.addr}/30", "dev", h.peer)
            ip("-n", h.ns, "link", "set", h.peer, "up")
            ip("-n", h.ns, "link", "set", "lo", "up")
            h.route()
            h.dir.mkdir()
        yield made
    finally:
        for h in made:
            pids = ip("netns", "pids", h.ns, check=False).stdout.split()
            for pid in pids:  # only our own processes live in our namespaces
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
            ip("link", "del", h.veth, check=False)
            ip("netns", "del", h.ns, check=False)


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ClusterProcs]:
    c = ClusterProcs(tmp_path / "coord-host", block_size=4096)
    try:
        yield c
    finally:
        c.cleanup()


def start(cp: ClusterProcs, hosts: list[Host], flush_delay: float = 60) -> str:
    cp.start_coordinator(lease=2.0, listen=f"{hosts[0].gateway}:0")
    coord = (cp.dir / "coordinator.addr").read_text().split()[0]
    assert coord.startswith(hosts[0].gateway + ":")
    for i, h in enumerate(hosts):
        shutil.copy(cp.dir / "secret", h.dir / "secret")  # all a host gets
        cp.start_node(f"h{i + 1}", cluster_dir=h.dir, flush_delay=flush_delay,
                      extra=["--coordinator", coord, "--secret-file", str(h.dir / "secret")],
                      prefix=h.prefix())
    log = cp.coordinator_log()
    for h in hosts:  # the nodes really came over their veth links
        assert f"connection from {h.addr}:" in log, log[-2000:]
    return coord


def write_dirty(h: Host, node: str, path: str, src: Path) -> None:
    """Write ``src`` into cluster ``path`` through ``node``, run on that host, and leave
    it dirty in the node's cache (a program that has not closed the file yet; ``fs put``
    writes each file back when it is done, as cp's close does)."""
    script = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
              "from cluster_helpers import write_file_via; "
              "write_file_via(Path(sys.argv[2]), sys.argv[3], sys.argv[4], "
              "Path(sys.argv[5]).read_bytes(), fsync=False)")
    subprocess.run([*h.prefix(), PY, "-c", script, str(Path(__file__).parent), str(h.dir),
                    node, path, str(src)], check=True, cwd=h.dir, timeout=60)


def fs(h: Host, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``sdbackup fs --node NODE HOSTDIR ...`` run on that host (in its namespace)."""
    return sdb("fs", "--node", node, str(h.dir), *args, prefix=h.prefix(), check=True,
               cwd=h.dir)


def test_nodes_on_two_network_namespaces(cp: ClusterProcs, hosts: list[Host],
                                         tmp_path: Path) -> None:
    start(cp, hosts)
    h1, h2 = hosts
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(2 * MiB + 999))
    write_dirty(h1, "h1", "/data.bin", src)
    dirty = [r for r in cp.cache_table() if r["dirty"]]
    assert {(r["node"], r["path"]) for r in dirty} == {("h1", "/data.bin")}
    out = tmp_path / "back.bin"
    fs(h2, "h2", "get", "-q", "/data.bin", str(out))
    assert out.read_bytes() == src.read_bytes()
    # And back the other way, then a cluster-wide flush from the coordinator's host.
    (tmp_path / "small").write_bytes(b"from host 2\n" * 100)
    write_dirty(h2, "h2", "/small", tmp_path / "small")
    write_dirty(h1, "h1", "/small1", tmp_path / "small")
    assert {r["node"] for r in cp.cache_table() if r["dirty"]} == {"h1", "h2"}
    assert fs(h1, "h1", "cat", "/small").stdout == "from host 2\n" * 100
    cp.flush()
    assert not [r for r in cp.cache_table() if r["dirty"]]
    st = cp.status()
    assert {n["name"] for n in st["nodes"] if n["kind"] == "node"} == {"h1", "h2"}
    for p in cp.nodes.values():
        assert p.stop() == 0
    cp.assert_no_tracebacks()


def test_partitioned_host_is_dropped_and_cannot_overwrite_newer_data(
        cp: ClusterProcs, hosts: list[Host], tmp_path: Path) -> None:
    start(cp, hosts, flush_delay=1.0)
    h1, h2 = hosts
    base = tmp_path / "base"
    base.write_bytes(b"b" * MiB)
    fs(h1, "h1", "put", "-q", str(base), "/f")
    fs(h1, "h1", "cat", "/f")  # (and read back through h1)
    stale = tmp_path / "stale"
    stale.write_bytes(b"S" * 300_000)
    # h2 writes, and before its flush delay is over, its link goes down.
    write_dirty(h2, "h2", "/f", stale)
    h2.link(False)
    try:
        cp.wait_log("LOST unwritten data of node h2: /f bytes 0-1048576", timeout=15)
        newer = tmp_path / "newer"
        newer.write_bytes(b"N" * 200_000)
        fs(h1, "h1", "put", "-q", str(newer), "/f")
        assert fs(h1, "h1", "cat", "/f").stdout == "N" * 200_000
    finally:
        h2.link(True)
    # h2 comes back, rejoins, and drops what it had (logging it), never writing it.
    wait_for(lambda: "cache dropped" in
             (h2.dir / "logs" / "node-h2.log").read_text(), 20, "h2 to rejoin")
    node_log = (h2.dir / "logs" / "node-h2.log").read_text()
    # /f was replaced meanwhile (fs put renames a new file over it), so h2's stale data
    # belongs to a removed inode: logged with its inode number.
    assert re.search(r"LOST unwritten data of (/f|<inode \d+, no name>) bytes 0-", node_log)
    out = fs(h2, "h2", "cat", "/f").stdout
    assert out == "N" * 200_000
    cp.flush()
    assert fs(h1, "h1", "cat", "/f").stdout == "N" * 200_000
    for p in cp.nodes.values():
        assert p.stop() == 0
    assert cp.coordinator is not None and cp.coordinator.stop() == 0
    r = sdb("fsck", str(cp.dir))
    assert r.returncode == 0, r.stdout + r.stderr


_WRITER = r"""
import os, random, sys
from sdbackup.cluster.access import open_fs
from sdbackup.errors import FsError
hdir, node, seed, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
n = 0
with open_fs(hdir, node=node) as fs:
    while not os.path.exists(stop):
        name = f"/f{rng.randrange(8)}".encode()
        try:
            a = fs.resolve(name)
            if rng.random() < 0.85:
                off = rng.randrange(0, 3 << 20)
                fs.write(a.ino, off, rng.randbytes(rng.choice([4096, 65536, 300000])))
            else:
                fs.fsync(a.ino)
            n += 1
        except FsError:
            pass
print(n)
"""

_PROBE = r"""
import sys
from pathlib import Path
from sdbackup.errors import SdbError
from sdbackup.net.auth import load_secret
from sdbackup.net.rpc import RpcClient
host, port, secret_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    RpcClient.connect(host, port, b"f" * 64, name="wrong").call("join", {"name": "x"})
    print("wrong secret: served")
except SdbError as e:
    print("wrong secret:", type(e).__name__)
with RpcClient.connect(host, port, load_secret(secret_file), name="probe") as c:
    c.call("join", {"name": "probe"})
    try:
        c.call("backup", {"medium": "/tmp/nowhere"}, timeout=30)
        print("backup: served")
    except SdbError as e:
        print("backup:", e)
"""


def test_log_node_on_another_host(cp: ClusterProcs, hosts: list[Host], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``backup --log-node h1`` with the writer on h2, another network namespace: h2's
    before images reach h1's control port over the link between the two hosts (h1
    listens on its link address, h2 on every address with an advertised one), and the
    restored image equals T0 block for block. Before ``--control-listen`` the log
    node's control port was on 127.0.0.1 of its own host, and h2's first before image
    aborted the backup."""
    t0 = tmp_path / "t0"
    monkeypatch.setenv("SDBACKUP_TEST_T0_IMAGE_DIR", str(t0))
    monkeypatch.setenv("SDBACKUP_TEST_COPY_DELAY", "0.4")
    h1, h2 = hosts
    # A direct link between the two hosts (the root namespace does not forward).
    a1, a2 = "10.200.12.1", "10.200.12.2"
    l1, l2 = f"{h1.peer}x", f"{h2.peer}x"
    ip("-n", h1.ns, "link", "add", l1, "type", "veth", "peer", "name", l2, "netns", h2.ns)
    ip("-n", h1.ns, "addr", "add", f"{a1}/30", "dev", l1)
    ip("-n", h2.ns, "addr", "add", f"{a2}/30", "dev", l2)
    ip("-n", h1.ns, "link", "set", l1, "up")
    ip("-n", h2.ns, "link", "set", l2, "up")
    listen = {"h1": ["--control-listen", f"{a1}:0"],
              "h2": ["--control-listen", "0.0.0.0:0", "--control-advertise", a2]}
    cp.start_coordinator(lease=3.0, listen=f"{h1.gateway}:0")
    coord = (cp.dir / "coordinator.addr").read_text().split()[0]
    for i, h in enumerate(hosts):
        name = f"h{i + 1}"
        shutil.copy(cp.dir / "secret", h.dir / "secret")
        cp.start_node(name, cluster_dir=h.dir, flush_delay=0.2,
                      extra=["--coordinator", coord, "--secret-file", str(h.dir / "secret"),
                             *listen[name]], prefix=h.prefix())
    addr1 = (h1.dir / "nodes" / "h1.addr").read_text().split()[0]
    assert addr1.startswith(f"{a1}:"), addr1
    assert (h2.dir / "nodes" / "h2.addr").read_text().startswith("127.0.0.1:")
    seed = tmp_path / "seed.bin"
    for i in range(8):
        seed.write_bytes(os.urandom(3 * MiB))
        fs(h1, "h1", "put", "-q", str(seed), f"/f{i}")

    # Only the cluster secret gets a peer anything on the port, and no more than a node.
    probe = subprocess.run([*h2.prefix(), PY, "-c", _PROBE, a1, addr1.rpartition(":")[2],
                            str(h2.dir / "secret")], capture_output=True, text=True,
                           timeout=60, check=True).stdout
    assert "wrong secret: AuthenticationFailed" in probe, probe
    assert "backup: unknown request 'backup'" in probe, probe

    stop = tmp_path / "stop"
    writer = subprocess.Popen([*h2.prefix(), PY, "-c", _WRITER, str(h2.dir), "h2", "1",
                               str(stop)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=h2.dir)
    try:
        time.sleep(1.0)  # busy, and its cache dirty
        r = sdb("backup", str(cp.dir), "--medium", str(tmp_path / "m0"), "--log-mode",
                "central", "--log-node", "h1", "--compress", "none", "--json", timeout=180)
        time.sleep(0.3)
    finally:
        stop.touch()
        so, se = writer.communicate(timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert writer.returncode == 0, se
    assert int(so) > 20, f"the writer barely ran: {so}"
    s = json.loads(r.stdout)
    assert s["log"]["blocks"] > 0, "no write needed a before image: the test proves nothing"
    gen = s["generation"]
    m = json.loads((tmp_path / "m0" / "generations" / gen / "manifest.json").read_text())
    assert m["log"]["node"] == "h1", m["log"]
    h1_log = (h1.dir / "logs" / "node-h1.log").read_text()
    assert f"backup {gen}: this node is the log manager" in h1_log
    assert f"connection from {a2}:" in h1_log, h1_log[-2000:]  # h2's puts, over the link
    img = tmp_path / "restored.img"
    sdb("restore-image", "--medium", str(tmp_path / "m0"), gen, "--disk", "d0", "--to",
        str(img), check=True, timeout=120)
    want = (t0 / gen / "d0.img").read_bytes()
    got = img.read_bytes()
    assert len(got) == len(want)
    bad = [i // 4096 for i in range(0, len(want), 4096)
           if got[i:i + 4096] != want[i:i + 4096]]
    assert not bad, f"{len(bad)} blocks differ from T0, first {bad[:10]}"
    for p in cp.nodes.values():
        assert p.stop() == 0
    cp.assert_no_tracebacks()


def test_control_listen_on_every_address_needs_an_advertised_one(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("ab" * 32)
    secret.chmod(0o600)
    for listen in ("0.0.0.0:0", "[::]:0"):
        r = sdb("node", "--name", "x", "--coordinator", "127.0.0.1:1", "--secret-file",
                str(secret), "--control-listen", listen, cwd=tmp_path)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert r.stderr.strip().splitlines()[-1:] == [r.stderr.strip()], r.stderr
        assert "needs --control-advertise HOST[:PORT]" in r.stderr
    r = sdb("node", "--name", "x", "--coordinator", "127.0.0.1:1", "--secret-file",
            str(secret), "--control-listen", "0.0.0.0:0", "--control-advertise", "0.0.0.0",
            cwd=tmp_path)
    assert r.returncode == 2 and "not a wildcard" in r.stderr, r.stderr
