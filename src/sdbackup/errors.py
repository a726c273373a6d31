"""One user-facing error type, and the exit codes of every command.

Every condition a user can act on (bad input, a cluster in use, a corrupt medium)
raises :class:`SdbError` with a message that says what is wrong and what to do.
The CLI prints that message as one line and exits with ``exit_code``; anything else
that escapes is a bug and is printed with its traceback.

Exit codes (also listed in README.md):

====  =============================================================
0     success
1     a check found problems (fsck, verify)
2     usage error or bad input (unknown disk, bad size, bad path...)
3     the cluster or medium is busy (locked by another process)
4     not found (cluster dir, generation, file inside the file system, a medium
      holding parts of a dispersed generation)
5     data on a disk or medium is corrupt or truncated
6     no space left (a cluster disk or a backup medium is full)
7     a remote peer failed (coordinator or node unreachable, refused)
====  =============================================================
"""

from __future__ import annotations

import errno as _errno

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_BUSY = 3
EXIT_NOT_FOUND = 4
EXIT_CORRUPT = 5
EXIT_NO_SPACE = 6
EXIT_REMOTE = 7


class SdbError(Exception):
    """An error the user can act on: ``message`` says what is wrong and what to do."""

    exit_code: int = EXIT_USAGE

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class UsageError(SdbError):
    exit_code = EXIT_USAGE


class BusyError(SdbError):
    exit_code = EXIT_BUSY


class NotFoundError(SdbError):
    exit_code = EXIT_NOT_FOUND


class NotInBackupError(NotFoundError):
    """Data a generation does not hold: a file outside the group of a group backup
    whose metadata lists every file (``--meta all``). A mount answers EIO."""


class MediumMissing(NotFoundError):
    """A generation has parts on a medium that was not given and cannot be found
    (dispersed backups): the message names the medium, its path and its nodes."""


class CorruptError(SdbError):
    exit_code = EXIT_CORRUPT


class NoSpaceError(SdbError):
    exit_code = EXIT_NO_SPACE


class RemoteError(SdbError):
    exit_code = EXIT_REMOTE


class FsError(OSError):
    """A POSIX error from a file system operation (carries an ``errno``).

    File system operations raise this so that the FUSE adapter can turn it into
    ``FUSEError(errno)`` and the ``sdbackup fs`` commands into a one-line message.
    """

    def __init__(self, err: int, what: str = "") -> None:
        super().__init__(err, f"{_errno.errorcode.get(err, err)}: {what}" if what else None)
        self.what = what


class FencedError(RemoteError):
    """The coordinator declared this session failed (fenced): every call it makes is
    refused, it must drop its cache and join again as a new session."""
