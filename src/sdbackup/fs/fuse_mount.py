"""Mount a node's file system with FUSE; unmount it, also after the node crashed.

:func:`serve` is what ``sdbackup node CLUSTER_DIR --name NAME --mount MOUNTPOINT``
runs in its main thread after the node agent has joined: it mounts the node's
:class:`~sdbackup.fs.cached.CachedFileSystem` with pyfuse3 (handlers in
:mod:`sdbackup.fs.fuse_ops`; what the kernel may cache, and why, is explained there),
runs the trio main loop until the file system is unmounted (``sdbackup umount``,
``fusermount3 -u``) or the process gets SIGTERM, SIGINT or SIGHUP (then it unmounts
itself), and returns; the caller then writes the cache back and leaves the cluster.

Mount options: ``default_permissions`` (the kernel checks modes and owners against
the attributes, so the adapter needs no ``access`` handler), ``allow_other`` when
running as root (a shared file system is for every user of the host), ``fsname``
``sdbackup-NAME`` and type ``fuse.sdbackup`` (shown by ``mount`` and ``df``). The
kernel's ``writeback_cache`` is never enabled.

:func:`unmount` is ``sdbackup umount MOUNTPOINT``: ``fusermount3 -u``; when the mount
is dead (its agent was killed: every access fails with ``ENOTCONN``), hangs, or the
caller asks for it, a lazy unmount (``fusermount3 -uz``, then ``umount -l``). It then waits
for the agent that served the mount point to finish writing its cache back and exit.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sdbackup.errors import BusyError, NotFoundError, SdbError, UsageError

if TYPE_CHECKING:
    from sdbackup.fs.fuse_ops import FuseOperations
    from sdbackup.fs.readonly import ReadOnlyFileSystem

log = logging.getLogger("sdbackup.fuse")

FSTYPE = "fuse.sdbackup"
# Readahead window of a mount (KiB): four maximal FUSE requests (max_pages = 256), so
# that a sequential reader keeps several requests in flight.
READAHEAD_KIB = 4096
_DEAD = (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)


class _QuietInterrupted(logging.Filter):
    """pyfuse3 logs an ERROR when the kernel no longer waits for a reply (ENOENT): the
    request was interrupted, or the mount is going away with a release still queued.
    Nothing is lost (the handler ran); keep it at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "fuse_reply_" in msg and "No such file or directory" in msg:
            log.debug("pyfuse3: %s", msg)
            return False
        return True


def check_fuse() -> None:
    """Raise a clear error when this host cannot mount FUSE file systems."""
    if not os.path.exists("/dev/fuse"):
        raise UsageError("cannot mount: /dev/fuse does not exist (load the fuse kernel "
                         "module: modprobe fuse; in a container, pass --device /dev/fuse)")
    try:
        import pyfuse3  # noqa: F401
    except ImportError as e:
        raise UsageError(f"cannot mount: pyfuse3 is not installed ({e}); install the "
                         "'fuse' extra: pip install 'sdbackup[fuse]' (needs Debian's "
                         "fuse3 and libfuse3-dev)") from None
    if shutil.which("fusermount3") is None and os.getuid() != 0:
        raise UsageError("cannot mount: fusermount3 is missing (apt-get install fuse3)")


def _norm(path: str | os.PathLike[str]) -> str:
    # No stat: the mount point may be dead (ENOTCONN).
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def _unescape(field: str) -> str:
    """Mount points in /proc/self/mountinfo escape space, tab, newline, backslash."""
    out = []
    i = 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> dict[str, tuple[str, str]]:
    """Mount point -> (file system type, source) of this mount namespace (last wins)."""
    out: dict[str, tuple[str, str]] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) >= 5 and len(rfields) >= 2:
                out[_unescape(fields[4])] = (rfields[0], _unescape(rfields[1]))
    return out


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    return _norm(mountpoint) in mounts()


def is_dead(mountpoint: str | os.PathLike[str], timeout: float = 5.0) -> bool:
    """True when the mount point's FUSE connection is gone (its agent died) or its
    agent does not answer a ``stat`` within ``timeout`` seconds (it hangs)."""
    result: list[int] = []

    def probe() -> None:
        try:
            os.stat(_norm(mountpoint))
            result.append(0)
        except OSError as e:
            result.append(e.errno or 0)

    # A hung agent blocks the stat in the kernel: ask from a thread, wait a while.
    t = threading.Thread(target=probe, name="sdb-umount-probe", daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        log.warning("%s does not answer (its node agent hangs?)", mountpoint)
        return True
    return result[0] in _DEAD


def agent_pids(mountpoint: str | os.PathLike[str]) -> list[int]:
    """Processes serving this mount point: ``sdbackup node ... --mount MOUNTPOINT`` or
    ``sdbackup mount ... MOUNTPOINT``."""
    mp = _norm(mountpoint)
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            args = (d / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(d / "cwd")
        except OSError:
            continue
        argv = [os.fsdecode(a) for a in args]
        if "mount" in argv:  # sdbackup mount [--medium DIR ...] [GEN] MOUNTPOINT
            rest = argv[argv.index("mount") + 1:]
            if any(os.path.normpath(os.path.join(cwd, a)) == mp for a in rest if a):
                found.append(int(d.name))
            continue
        if "node" not in argv:
            continue
        for i, a in enumerate(argv):
            target = None
            if a == "--mount" and i + 1 < len(argv):
                target = argv[i + 1]
            elif a.startswith("--mount="):
                target = a.split("=", 1)[1]
            if target and os.path.normpath(os.path.join(cwd, target)) == mp:
                found.append(int(d.name))
                break
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def check_mountpoint(mountpoint: str | os.PathLike[str]) -> str:
    """The absolute mount point, or a UsageError saying what is wrong with it."""
    mp = _norm(mountpoint)
    if is_dead(mp):
        raise UsageError(f"{mp} is a dead mount (its node agent stopped without "
                         f"unmounting): clear it with 'sdbackup umount {mp}'")
    if not os.path.isdir(mp):
        raise UsageError(f"mount point {mp} is not a directory: create it first")
    kind = mounts().get(mp)
    if kind is not None and kind[0] == FSTYPE:
        raise BusyError(f"{mp} is already mounted ({kind[1]}): unmount it first "
                        f"('sdbackup umount {mp}')")
    return mp


def serve(fs: ReadOnlyFileSystem, mountpoint: str | os.PathLike[str], *, name: str = "node",
          on_ready: Callable[[str], None] | None = None) -> str:
    """Mount ``fs`` at ``mountpoint`` and serve it until unmounted or signalled.

    A :class:`FileSystem` is mounted read-write; any other :class:`ReadOnlyFileSystem`
    (a backup generation) read-only (``ro``: the kernel refuses changes with
    ``EROFS``, and the adapter refuses them too).

    Returns ``"unmounted"`` (someone unmounted it) or ``"signal"`` (SIGTERM, SIGINT or
    SIGHUP: this function unmounted it). Blocks the calling thread, which must be the
    main thread (signals). The kernel's cache is hooked to the node's cache, when
    ``fs`` has the hook (``on_drop``), for as long as the mount lives.
    """
    check_fuse()
    import pyfuse3
    import trio

    from sdbackup.fs.fuse_ops import MAX_WORKERS, FuseOperations

    mp = check_mountpoint(mountpoint)
    logging.getLogger("pyfuse3").addFilter(_QuietInterrupted())
    ops = FuseOperations(fs)
    label = re.sub(r"[^A-Za-z0-9._@-]", "_", name)  # no commas or spaces in the options
    options = {"default_permissions", f"fsname=sdbackup-{label}", "subtype=sdbackup"}
    if ops.read_only:
        options.add("ro")
    if os.getuid() == 0:
        options.add("allow_other")
    try:
        pyfuse3.init(ops, mp, options)
    except RuntimeError as e:
        raise UsageError(f"cannot mount {mp}: {e}") from None
    hooked = hasattr(fs, "on_drop")
    if hooked:
        fs.on_drop = ops.segment_dropped  # type: ignore[attr-defined]
    ops.start_notifier()
    reason = "error"
    try:
        reason = trio.run(_main, ops, mp, on_ready, MAX_WORKERS)
    finally:
        if hooked:
            fs.on_drop = None  # type: ignore[attr-defined]
        ops.stop_notifier()
        # After an external unmount the kernel has closed the connection: unmounting
        # again could hit whatever is mounted there by now.
        pyfuse3.close(unmount=reason != "unmounted")
        left = ops.release_all()
        if left:
            log.info("%s: closed %d file(s) that were still open at the unmount", mp, left)
    log.info("%s: %s", mp, "unmounted" if reason == "unmounted" else f"stopped ({reason})")
    return reason


def _tune_readahead(mp: str, kib: int = READAHEAD_KIB) -> None:
    """Raise the mount's readahead from the kernel's 128 KiB to ``kib`` (1 MiB requests).

    FUSE mounts get their own backing device (``/sys/class/bdi/0:MINOR``); with the
    default window a sequential read arrives as 128 KiB requests, each paying the
    node's per-request costs. Root only; without it reads still work, in smaller
    requests. Called after INIT: the kernel sets the window from INIT's answer.
    """
    dev = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == mp:
                dev = fields[2]  # MAJOR:MINOR, the last mount there wins
    if dev is None:
        return
    path = Path("/sys/class/bdi") / dev / "read_ahead_kb"
    try:
        path.write_text(f"{kib}\n")
    except OSError as e:
        log.debug("could not raise the readahead of %s (%s): %s", mp, path, e)


async def _main(ops: FuseOperations, mp: str, on_ready: Callable[[str], None] | None,
                max_tasks: int) -> str:
    import pyfuse3
    import trio

    reason = "unmounted"

    async def watch_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                            ) -> None:
        nonlocal reason
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            task_status.started()
            async for signum in sigs:
                reason = "signal"
                log.info("%s: %s, unmounting", mp, signal.Signals(signum).name)
                pyfuse3.terminate()
                return

    async def when_served() -> None:
        # A stat of the mount point returns once the kernel's INIT has been answered
        # (by the loop below): the mount is usable, and INIT has set the readahead,
        # which may be raised now.
        try:
            await trio.to_thread.run_sync(os.stat, mp)
        except OSError as e:
            log.warning("%s: the new mount does not answer: %s", mp, e)
            return
        _tune_readahead(mp)
        if on_ready is not None:
            on_ready(mp)

    async with trio.open_nursery() as nursery:
        await nursery.start(watch_signals)
        nursery.start_soon(when_served)
        await pyfuse3.main(min_tasks=2, max_tasks=max_tasks)
        nursery.cancel_scope.cancel()
    return reason


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: not installed")


def unmount(mountpoint: str | os.PathLike[str], *, lazy: bool = False,
            timeout: float = 60.0) -> dict[str, object]:
    """Unmount a node's mount point (see the module docstring); returns what happened.

    Raises NotFoundError when nothing is mounted there, BusyError when programs still
    use a live mount (and ``lazy`` is not set).
    """
    mp = _norm(mountpoint)
    if not is_mounted(mp):
        raise NotFoundError(f"nothing is mounted at {mp}")
    pids = agent_pids(mp)
    dead = is_dead(mp)
    how = ""
    errors: list[str] = []
    if not lazy:
        r = _run(["fusermount3", "-u", mp])
        if r.returncode == 0:
            how = "unmounted"
        else:
            errors.append(r.stderr.strip())
            if not dead:
                raise BusyError(f"cannot unmount {mp}: {r.stderr.strip() or 'busy'}; close "
                                "the programs that use it (fuser -vm MOUNTPOINT), or unmount "
                                "lazily with --lazy")
    if not how:
        for cmd in (["fusermount3", "-uz", mp], ["umount", "-l", mp]):
            r = _run(cmd)
            if r.returncode == 0 or not is_mounted(mp):
                how = "lazily unmounted"
                break
            errors.append(r.stderr.strip())
    if not how or is_mounted(mp):
        raise SdbError(f"could not unmount {mp}: {'; '.join(e for e in errors if e)}")
    if dead and "dead" not in how:
        how += " (the mount was dead: its node agent had stopped without unmounting)"
    # Wait for the agent to write its cache back and leave the cluster.
    deadline = time.monotonic() + timeout
    waiting = [p for p in pids if _alive(p)]
    while waiting and time.monotonic() < deadline:
        time.sleep(0.05)
        waiting = [p for p in waiting if _alive(p)]
    return {"mountpoint": mp, "how": how, "dead": dead, "agents": pids,
            "still_running": waiting}
