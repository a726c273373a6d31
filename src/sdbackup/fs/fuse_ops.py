"""The FUSE request handlers: a thin adapter from pyfuse3 to :class:`FileSystem`.

Every handler translates its arguments, runs one or two blocking file system calls in
a worker thread (``trio.to_thread.run_sync``, so that many requests proceed at once
while the trio loop keeps reading ``/dev/fuse``), and translates the answer. Handlers
raise only :class:`pyfuse3.FUSEError`: an :class:`~sdbackup.errors.FsError` keeps its
errno; a lost coordinator, a disk error or a bug becomes ``EIO`` and one log line
naming the operation and the inode, and everything else keeps working.

Kernel caches (DESIGN.md, "the kernel caches too") -- what this adapter lets the
kernel keep, and why:

- **Data of files opened for writing: nothing** (``direct_io``). Every write goes
  straight to the node's coherent write-back cache, whose rights the coordinator
  controls. The kernel therefore never holds file data that the coordinator cannot
  see or recall, and the kernel's ``writeback_cache`` stays off (pyfuse3's default).
  ``O_APPEND`` needs this too: with ``direct_io`` the kernel passes each write
  through unchanged, and the node decides the end of the file while it holds the
  write right on it (:meth:`CachedFileSystem.append`), so appends from two nodes
  never overwrite each other. Large requests: libfuse 3 negotiates
  ``max_write``/``max_pages`` of 1 MiB, so ``dd bs=1M`` arrives as 1 MiB writes.
- **Data of files opened read-only: the page cache**, without ``keep_cache``: the
  kernel drops the file's pages at every open, so an open after another node's close
  reads the latest data (close-to-open, as NFS). Read-only opens keep the page cache
  because the kernel refuses shared ``mmap`` of ``direct_io`` files (``ENODEV``) unless
  ``FUSE_DIRECT_IO_ALLOW_MMAP`` is negotiated, which the kernel (6.6+) would allow but
  libfuse 3.14 cannot ask for; with the page cache, ``mmap`` reads work. Pages of a
  file that stays open are dropped whenever this node loses a right on any of the
  file's segments (recall by another node, eviction, truncate): the cache calls
  :meth:`FuseOperations.segment_dropped`, which queues ``invalidate_inode`` for a
  helper thread. It is queued, not done in the recall: the kernel may wait for a page
  lock held by a read of this very node that itself waits for the coordinator, which
  waits for the recall -- a deadlock. So a descriptor kept open across another
  node's write can see the old data for the few milliseconds the helper needs.
  Writable shared mappings (``MAP_SHARED`` + ``PROT_WRITE``) need a file opened for
  writing, hence ``direct_io``, hence ``ENODEV``: such a mapping would be a dirty
  cache in the kernel that the coordinator cannot see or freeze. (So SQLite's WAL
  mode, which maps its ``-shm`` file, fails with "disk I/O error", as on network file
  systems; the default rollback journal works, from several nodes in turn.)
- **Names: not cached by the kernel** (entry timeout 0). Another node may create,
  rename or unlink a name at any moment and the kernel's name cache cannot be told
  in time without deadlocks (a kernel invalidation takes the directory's lock, which
  a local request on that directory may hold while it waits for the coordinator), so
  every path walk asks this adapter again (one ``lookup`` per component, negative
  answers included). The node answers from its own metadata cache when it holds the
  capability (net/cached_meta.py, cluster/caps.py: the coordinator takes it back
  before any other node changes the inode), in this event-loop thread with no hop to
  a worker; otherwise the coordinator's ``lookup`` first makes other writers of the
  file write back, and the kernel takes the attributes in the answer, so a ``stat``,
  ``open`` or ``ls -l`` by path always sees the cluster's names, sizes and modes.
- **Attributes: 1 s** (``ATTR_TIMEOUT``). Every path walk refreshes them (above), so
  the timeout only matters for a descriptor kept open while another node changes the
  file: its ``fstat`` (and a read past the end it knows) may be up to 1 s old, as on
  NFS. With 0, every ``stat`` would cost three round trips instead of one (the
  parent's attributes for the permission check, the lookup, the target's
  attributes).

``close()`` of a file opened for writing writes this node's dirty data back to the
shared disks before it returns (FUSE ``flush``): a write-back error such as ENOSPC
(blocks are allocated at write-back) reaches the program, and a node killed after a
close loses nothing that was closed. Other nodes do not need it: their reads recall
the data anyway. Files still open when the mount goes away are closed at the
coordinator by :meth:`FuseOperations.release_all`.

Developer notes (steps that must stay adjacent):

- ``readdir_reply`` and every other pyfuse3 call run in the trio thread; only the
  :class:`FileSystem` calls go to worker threads. ``pyfuse3.invalidate_inode`` runs in
  :class:`KernelNotifier`'s own thread, never in a handler or under a cache lock.
- The notifier must be stopped before ``pyfuse3.close()``: a notification sent after
  the session is gone would use a freed session.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3
import trio

from sdbackup.errors import FsError, SdbError
from sdbackup.fs.filesystem import FileSystem
from sdbackup.fs.readonly import ReadOnlyFileSystem
from sdbackup.meta.types import Attr, DirEntry
from sdbackup.types import ROOT_INODE

log = logging.getLogger("sdbackup.fuse")

T = TypeVar("T")

# Kernel cache lifetimes (seconds); see the module docstring for why.
ENTRY_TIMEOUT = 0.0
ATTR_TIMEOUT = 1.0
# A backup never changes: the kernel may keep names, attributes and pages for as long
# as it likes. Names directly under the root stay short-lived, because a view of every
# generation of a medium adds and removes directories there.
STATIC_TIMEOUT = 24 * 3600.0
ROOT_ENTRY_TIMEOUT = 1.0
# The same error is logged at most once in this many seconds (see _log_error).
ERROR_REPEAT_SECONDS = 10.0
# st_blksize: programs (cp, stdio, dd without bs=) size their I/O by it; one segment
# per request is what the node's cache and the coordinator's rights are made of.
IO_BLOCK = 1 << 20
# Worker threads for blocking file system calls (and pyfuse3 tasks reading requests).
MAX_WORKERS = 48

_WRITE_ACCESS = os.O_WRONLY | os.O_RDWR


@dataclass(eq=False)
class OpenFile:
    ino: int
    flags: int
    cached: bool  # page cache (read-only open) rather than direct_io
    # The opener lacks CAP_FSETID: its writes clear set-user-ID and set-group-ID as
    # every Linux file system does (with direct_io the kernel leaves it to the file
    # system). ``kill_priv`` is armed at open and again when the mode changes here.
    no_fsetid: bool = False
    groups: frozenset[int] = frozenset()
    kill_priv: bool = False
    # errseq: the newest write-back error of the file this descriptor has been told of
    # (a program learns of each error once per descriptor, at write, fsync or close).
    err_seen: int = 0

    @property
    def writable(self) -> bool:
        return bool(self.flags & _WRITE_ACCESS)

    @property
    def append(self) -> bool:
        return bool(self.flags & os.O_APPEND)


@dataclass(eq=False)
class OpenDir:
    ino: int
    after: int = 0  # the batch below holds the entries with cookies after this one
    batch: list[DirEntry] = field(default_factory=list)


class KernelNotifier:
    """A helper thread that tells the kernel to drop an inode's pages and attributes."""

    def __init__(self, invalidate: Callable[[int], None]) -> None:
        self._invalidate = invalidate
        self._cond = threading.Condition()
        self._pending: dict[int, None] = {}  # ordered set
        self._stopped = False
        self.sent = 0
        self._thread = threading.Thread(target=self._loop, name="sdb-fuse-inval", daemon=True)
        self._thread.start()

    def queue(self, ino: int) -> None:
        with self._cond:
            if self._stopped:
                return
            self._pending[ino] = None
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                ino = next(iter(self._pending))
                del self._pending[ino]
            try:
                self._invalidate(ino)
                self.sent += 1
            except OSError as e:
                # ENOENT: the kernel has forgotten the inode already (nothing cached).
                if e.errno not in (errno.ENOENT, errno.ENOTCONN, errno.EBADF):
                    log.warning("could not drop the kernel's cache of inode %d: %s", ino, e)
            except Exception:  # never let the helper die
                log.exception("could not drop the kernel's cache of inode %d", ino)

    def stop(self) -> None:
        """Drop what is queued and end the thread (before the session is closed)."""
        with self._cond:
            self._stopped = True
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join(timeout=10)


def _entry(attr: Attr, block_size: int, entry_timeout: float = ENTRY_TIMEOUT,
           attr_timeout: float = ATTR_TIMEOUT) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = attr.ino
    e.generation = 0
    e.entry_timeout = entry_timeout
    e.attr_timeout = attr_timeout
    e.st_mode = attr.mode
    e.st_nlink = attr.nlink
    e.st_uid = attr.uid
    e.st_gid = attr.gid
    e.st_rdev = attr.rdev
    e.st_size = attr.size
    e.st_blksize = max(IO_BLOCK, block_size)
    e.st_blocks = attr.blocks
    e.st_atime_ns = attr.atime_ns
    e.st_mtime_ns = attr.mtime_ns
    e.st_ctime_ns = attr.ctime_ns
    return e


class FuseOperations(pyfuse3.Operations):
    """pyfuse3 request handlers over one file system: a :class:`FileSystem` (usually a
    node's cache), or a :class:`ReadOnlyFileSystem` (a backup generation), which is
    served read-only: every change fails with ``EROFS``, and the kernel keeps names,
    attributes and pages (``keep_cache``) because nothing under it ever changes."""

    enable_writeback_cache = False  # never: see the module docstring
    enable_acl = False

    def __init__(self, fs: ReadOnlyFileSystem, *, workers: int = MAX_WORKERS) -> None:
        super().__init__()
        self.fs = fs
        self._wfs = fs if isinstance(fs, FileSystem) else None
        self.read_only = self._wfs is None
        self.bs = fs.bs
        self.limiter = trio.CapacityLimiter(workers)
        self._mu = threading.Lock()
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, OpenDir] = {}
        self._next_fh = 1
        self._cached_opens: dict[int, int] = {}  # ino -> read-only opens using the page cache
        self._append_locks = [threading.Lock() for _ in range(64)]
        self.notifier: KernelNotifier | None = None
        self.stats = {"errors": 0}
        self._logged: dict[str, tuple[float, int]] = {}  # error text -> (logged at, skipped)

    @property
    def wfs(self) -> FileSystem:
        """The writable file system; ``EROFS`` when serving a read-only one."""
        if self._wfs is None:
            raise pyfuse3.FUSEError(errno.EROFS)
        return self._wfs

    # -- wiring ---------------------------------------------------------------------------
    def start_notifier(self) -> None:
        """Start dropping kernel pages when the node loses a right (after the mount)."""
        self.notifier = KernelNotifier(lambda ino: pyfuse3.invalidate_inode(ino))

    def stop_notifier(self) -> None:
        n, self.notifier = self.notifier, None
        if n is not None:
            n.stop()

    def release_all(self) -> int:
        """Close what the kernel left open (the mount went away with files open).

        Without this the coordinator would count those files open for good, and an
        unlinked one would never be freed. Returns how many were closed.
        """
        with self._mu:
            files = list(self._files.values())
            self._files.clear()
            self._cached_opens.clear()
        if self._wfs is None:
            return len(files)  # a read-only file system counts no opens
        for of in files:
            try:
                self._wfs.release(of.ino)
            except Exception as e:  # the others still get closed
                log.warning("closing inode %d after the unmount failed: %s", of.ino, e)
        return len(files)

    def segment_dropped(self, ino: int) -> None:
        """Hook for the node's cache: it no longer holds a right on a segment of ``ino``.

        Called from any thread, possibly under a cache lock: only queues. Only files
        that are open read-only on this node can have pages in the kernel that matter
        (every other open drops them, and writers use direct_io).
        """
        n = self.notifier
        if n is not None and self._cached_opens.get(ino):
            n.queue(ino)

    # -- plumbing ---------------------------------------------------------------------------
    async def _run(self, what: str, ino: int, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        except pyfuse3.FUSEError:
            raise
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except SdbError as e:
            self.stats["errors"] += 1
            self._log_error(f"{what} of inode {ino} failed: {e}")
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as e:  # a disk's I/O error
            self.stats["errors"] += 1
            log.error("%s of inode %d failed: %s", what, ino, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            self.stats["errors"] += 1
            log.exception("%s of inode %d failed (a bug)", what, ino)
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _log_error(self, text: str) -> None:
        """Log an error once per :data:`ERROR_REPEAT_SECONDS` per text: the kernel
        retries a failed read several times (readahead, then the read itself), and a
        damaged record would otherwise fill the log with the same line."""
        now = time.monotonic()
        with self._mu:
            last, skipped = self._logged.get(text, (-ERROR_REPEAT_SECONDS, 0))
            if now - last < ERROR_REPEAT_SECONDS:
                self._logged[text] = (last, skipped + 1)
                return
            if len(self._logged) > 1000:
                self._logged.clear()
            self._logged[text] = (now, 0)
        log.error("%s%s", text, f" (and {skipped} more times)" if skipped else "")

    def _e(self, attr: Attr, parent: int = 0) -> pyfuse3.EntryAttributes:
        if not self.read_only:
            return _entry(attr, self.bs)
        t = ROOT_ENTRY_TIMEOUT if ROOT_INODE in (parent, attr.ino) else STATIC_TIMEOUT
        return _entry(attr, self.bs, t, t)

    def _file(self, fh: int) -> OpenFile:
        try:
            return self._files[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def _new_fh(self, ino: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        cached = not flags & _WRITE_ACCESS
        kill = not cached and ctx is not None and not _has_cap_fsetid(ctx)
        seq = getattr(self.fs, "error_seq", lambda: 0)()
        with self._mu:
            fh = self._next_fh
            self._next_fh += 1
            self._files[fh] = OpenFile(ino, flags, cached, no_fsetid=kill,
                                       groups=_caller_groups(ctx) if kill else frozenset(),
                                       kill_priv=kill, err_seen=seq)
            if cached:
                self._cached_opens[ino] = self._cached_opens.get(ino, 0) + 1
        # A backup never changes: its pages stay valid across opens.
        return pyfuse3.FileInfo(fh=fh, direct_io=not cached, keep_cache=self.read_only)

    def _forget_fh(self, fh: int) -> OpenFile | None:
        with self._mu:
            of = self._files.pop(fh, None)
            if of is not None and of.cached:
                n = self._cached_opens.get(of.ino, 0) - 1
                if n > 0:
                    self._cached_opens[of.ino] = n
                else:
                    self._cached_opens.pop(of.ino, None)
        return of

    # -- names and attributes ------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        peek = getattr(self.fs, "peek_lookup", None)
        if peek is not None:
            # Answered from the node's cached metadata in this thread: the hop to a
            # worker thread and back costs more than the rest of a cached lookup.
            try:
                hit = peek(parent_inode, name)
            except FsError as e:
                raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
            if hit is not None:
                return self._e(hit, parent_inode)
        return self._e(await self._run("lookup", parent_inode, self.fs.lookup, parent_inode,
                                       name), parent_inode)

    async def forget(self, inode_list: Any) -> None:
        return None  # no per-inode state: unlinked open files are kept by open counts

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        peek = getattr(self.fs, "peek_getattr", None)
        hit = peek(inode) if peek is not None else None
        if hit is not None:
            return self._e(hit)
        return self._e(await self._run("getattr", inode, self.fs.getattr, inode))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        kw: dict[str, int] = {}
        if fields.update_mode:
            kw["mode"] = attr.st_mode
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_size:
            kw["size"] = attr.st_size
        if fields.update_atime:
            kw["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime_ns"] = attr.st_mtime_ns

        def do() -> Attr:
            if "mtime_ns" in kw or "atime_ns" in kw:
                # Dirty data written back later would stamp its own mtime over the one
                # set here (cp -a, touch -d): write it back first.
                self._flush(inode)
            if "size" in kw and "mode" not in kw and ctx is not None \
                    and not _has_cap_fsetid(ctx):
                # truncate(2): the kernel turns its kill-privilege request into a mode
                # change only when group execute is set; the rest is ours.
                cur = self.wfs.getattr(inode)
                killed = _killed_mode(cur.mode, cur.gid, _caller_groups(ctx))
                if killed is not None:
                    kw["mode"] = killed
            return self.wfs.setattr(inode, **kw)

        attr = self._e(await self._run("setattr", inode, do))
        if "mode" in kw:  # a privilege bit set again: the next write clears it again
            with self._mu:
                for of in self._files.values():
                    if of.ino == inode and of.no_fsetid:
                        of.kill_priv = True
        return attr

    def _flush(self, ino: int) -> None:
        flush = getattr(self.fs, "flush_inode", None)
        if flush is not None:
            flush(ino)

    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        return await self._run("readlink", inode, self.fs.readlink, inode)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        if stat.S_ISREG(mode):
            return self._e(await self._run("mknod", parent_inode, self.wfs.create, parent_inode,
                                           name, mode, ctx.uid, ctx.gid))
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self._e(await self._run("mknod", parent_inode, self.wfs.meta.mknod, parent_inode,
                                       name, mode, ctx.uid, ctx.gid, rdev))

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        return self._e(await self._run("mkdir", parent_inode, self.wfs.mkdir, parent_inode, name,
                                       mode, ctx.uid, ctx.gid))

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        return self._e(await self._run("symlink", parent_inode, self.wfs.symlink, parent_inode,
                                       name, target, ctx.uid, ctx.gid))

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
                   ) -> pyfuse3.EntryAttributes:
        return self._e(await self._run("link", inode, self.wfs.link, inode, new_parent_inode,
                                       new_name))

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._run("unlink", parent_inode, self.wfs.unlink, parent_inode, name)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._run("rmdir", parent_inode, self.wfs.rmdir, parent_inode, name)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_EXCHANGE (and unknown flags)
        # MetaApi's RENAME_NOREPLACE has the kernel's value (1), like pyfuse3's.
        await self._run("rename", parent_inode_old, self.wfs.rename, parent_inode_old, name_old,
                        parent_inode_new, name_new, flags)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = await self._run("statfs", 1, self.fs.statfs)
        if self.read_only:  # a backup cannot grow: nothing is free (as on squashfs, iso9660)
            st = dataclasses.replace(st, free=0)
        s = pyfuse3.StatvfsData()
        s.f_bsize = st.block_size
        s.f_frsize = st.block_size
        s.f_blocks = st.blocks
        s.f_bfree = st.free
        s.f_bavail = st.free
        # Inodes are rows, not a fixed table: report the used ones plus a free count
        # that never runs out before the blocks do.
        s.f_files = st.files + st.free
        s.f_ffree = st.free
        s.f_favail = st.free
        s.f_namemax = st.name_max
        return s

    # -- directories -----------------------------------------------------------------------------
    async def opendir(self, inode: int, ctx: Any) -> int:
        attr = await self._run("opendir", inode, self.fs.getattr, inode)
        if not attr.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        with self._mu:
            fh = self._next_fh
            self._next_fh += 1
            self._dirs[fh] = OpenDir(inode)
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self._dirs.get(fh)
        if d is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        after = start_id
        while True:
            # The kernel asks for one page of entries at a time; the coordinator
            # answers in batches of many pages. Keep the rest of a batch for the next
            # call (cookies are increasing), instead of fetching it again.
            if d.batch and d.after < after < d.batch[-1].cookie:
                batch = [e for e in d.batch if e.cookie > after]
            else:
                batch = await self._run("readdir", d.ino, self.fs.readdir, d.ino, after)
                d.after, d.batch = after, batch
            if not batch:
                return
            for ent in batch:
                if not pyfuse3.readdir_reply(token, ent.name, self._e(ent.attr, d.ino),
                                             ent.cookie):
                    return
                after = ent.cookie

    async def releasedir(self, fh: int) -> None:
        with self._mu:
            self._dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        if self.read_only:
            return  # nothing to make durable
        d = self._dirs.get(fh)
        ino = d.ino if d is not None else fh
        await self._run("fsyncdir", ino, self.wfs.fsync, ino)

    # -- files -----------------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if self.read_only:
            if flags & (_WRITE_ACCESS | os.O_TRUNC):
                raise pyfuse3.FUSEError(errno.EROFS)
            attr = await self._run("open", inode, self.fs.getattr, inode)
            if attr.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            return self._new_fh(inode, flags, ctx)

        def do() -> None:
            attr = self.wfs.getattr(inode)
            if attr.is_dir:
                raise FsError(errno.EISDIR, "is a directory")
            if flags & os.O_TRUNC and flags & _WRITE_ACCESS:
                # libfuse 3 asks for atomic O_TRUNC: the kernel leaves it to open
                # (and so the clearing of set-user-ID/set-group-ID bits, too).
                self.wfs.setattr(inode, size=0, mode=_killed_mode(
                    attr.mode, attr.gid, _caller_groups(ctx))
                                if not _has_cap_fsetid(ctx) else None)
            self.wfs.open(inode)

        await self._run("open", inode, do)
        return self._new_fh(inode, flags, ctx)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        def do() -> Attr:
            try:
                return self.wfs.create_open(parent_inode, name, mode, ctx.uid, ctx.gid)
            except FsError as e:
                # Another node created the name after our lookup said it was missing:
                # without O_EXCL, open that file as the program asked.
                if e.errno != errno.EEXIST or flags & os.O_EXCL:
                    raise
                attr = self.wfs.lookup(parent_inode, name)
                if attr.is_dir:
                    raise FsError(errno.EISDIR, "is a directory") from None
                if flags & os.O_TRUNC and attr.size:
                    attr = self.wfs.setattr(attr.ino, size=0)
            self.wfs.open(attr.ino)
            return attr

        attr = await self._run("create", parent_inode, do)
        return self._new_fh(attr.ino, flags, ctx), self._e(attr)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        of = self._file(fh)
        return await self._run("read", of.ino, self.fs.read, of.ino, off, size)

    def _report_error(self, of: OpenFile) -> None:
        """Raise a write-back error of the file this descriptor was not told of yet."""
        since = getattr(self.fs, "error_since", None)
        if since is None:
            return
        got = since(of.ino, of.err_seen)
        if got is not None:
            of.err_seen = self.fs.error_seq()  # type: ignore[attr-defined]
            log.warning("reporting a write-back error of inode %d to a program: %s",
                        of.ino, got[1])
            raise pyfuse3.FUSEError(got[0])

    async def _run_reporting(self, what: str, of: OpenFile, fn: Callable[..., T],
                             *args: Any) -> T:
        """Run ``fn``; a write-back error it raises counts as told to this descriptor."""
        try:
            return await self._run(what, of.ino, fn, *args)
        except pyfuse3.FUSEError:
            seq = getattr(self.fs, "error_seq", None)
            if seq is not None:
                of.err_seen = seq()
            raise

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        of = self._file(fh)
        self._report_error(of)
        if of.kill_priv:
            of.kill_priv = False
            await self._run("write", of.ino, self._kill_priv, of.ino, of.groups)
        if of.append:
            await self._run_reporting("append", of, self._append, of.ino, buf)
        else:
            await self._run_reporting("write", of, self.wfs.write, of.ino, off, buf)
        n = len(buf)
        if self._cached_opens.get(of.ino) and self.notifier is not None:
            # A read-only descriptor of this node may hold the old pages (direct_io
            # writes do not drop them).
            self.notifier.queue(of.ino)
        return n

    def _kill_priv(self, ino: int, groups: frozenset[int]) -> None:
        """A write by a process without CAP_FSETID clears S_ISUID, and S_ISGID when the
        group may execute or the writer is not in the file's group, as Linux does."""
        attr = self.wfs.getattr(ino)
        killed = _killed_mode(attr.mode, attr.gid, groups)
        if killed is not None:
            self.wfs.setattr(ino, mode=killed)

    def _append(self, ino: int, data: bytes) -> int:
        append = getattr(self.fs, "append", None)
        if append is not None:
            return int(append(ino, data))
        # A plain FileSystem (no other node caches anything): one appender at a time.
        with self._append_locks[ino % 64]:
            end = self.wfs.getattr(ino).size
            self.wfs.write(ino, end, data)
            return end

    async def flush(self, fh: int) -> None:
        # close(2): what this node wrote reaches the shared disks before close returns
        # (not fsynced), so a node crash after a close loses nothing that was closed.
        of = self._file(fh)
        if of.writable:
            await self._run_reporting("flush", of, self._flush, of.ino)
            self._report_error(of)

    async def release(self, fh: int) -> None:
        of = self._forget_fh(fh)
        if of is not None and not self.read_only:
            await self._run("release", of.ino, self.wfs.release, of.ino)

    async def fsync(self, fh: int, datasync: bool) -> None:
        of = self._file(fh)
        if self.read_only:
            return  # nothing to make durable
        await self._run_reporting("fsync", of, self.wfs.fsync, of.ino)
        self._report_error(of)


_CAP_FSETID = 1 << 4


def _has_cap_fsetid(ctx: Any) -> bool:
    """Whether the calling process may keep set-user-ID bits when it writes."""
    pid = getattr(ctx, "pid", 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & _CAP_FSETID)
    except (OSError, ValueError):
        pass
    return getattr(ctx, "uid", 0) == 0


def _caller_groups(ctx: Any) -> frozenset[int]:
    """The calling process's groups (its gid and supplementary groups)."""
    groups = {int(getattr(ctx, "gid", -1))}
    try:
        with open(f"/proc/{getattr(ctx, 'pid', 0)}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
                    break
    except (OSError, ValueError):
        pass
    return frozenset(groups)


def _killed_mode(mode: int, file_gid: int, groups: frozenset[int]) -> int | None:
    """The mode after the privilege bits that a write (or truncate) by a process
    without CAP_FSETID clears, or None when none is set: S_ISUID always; S_ISGID when
    the group may execute or the writer is not in the file's group (Linux's
    setattr_should_drop_sgid)."""
    kill = stat.S_ISUID if mode & stat.S_ISUID else 0
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or file_gid not in groups):
        kill |= stat.S_ISGID
    return None if not kill else (mode & ~kill) & 0o7777
