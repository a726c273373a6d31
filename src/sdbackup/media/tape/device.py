"""One interface for every tape drive, and how a tape is named on the command line.

A tape is a sequence of *objects*: data blocks and filemarks, numbered from 0 at the
beginning of tape (BOT) as SCSI sequential-access devices number them (a filemark takes
a logical block address too, which is what ``MTSEEK`` and ``MTIOCPOS`` use). After the
last object comes end of data (EOD). The interface is the Linux ``st`` driver's model
(``read``/``write`` move over one block, ``MTWEOF``, ``MTFSF``/``MTBSF``,
``MTFSR``/``MTBSR``, ``MTSEEK``, ``MTEOM``, ``MTIOCPOS``, ``MTIOCGET``), so that the
real driver (:mod:`.st`) is a thin layer and the file-backed tape (:mod:`.filetape`)
behaves the same way. What every implementation guarantees:

* ``write`` appends one block at the current position and **discards everything after
  it** (a tape cannot be rewritten in the middle); so does ``write_filemarks``.
* ``read`` returns the next block and moves past it; at a filemark it returns ``b""``
  and moves past the filemark; at EOD it raises :class:`EndOfData`.
* Near the physical end the drive signals *early warning*: the first write that
  starts past it writes nothing and raises :class:`EarlyWarning` (``ENOSPC`` from
  ``st``); later writes succeed until the physical end (:class:`EndOfTape`), so a
  writer can close what it is doing (a filemark) and continue on the next tape.
* ``clock`` is the time the drive has spent, in seconds: measured for a real drive,
  emulated by the time model for a file-backed tape; ``last_cost`` is what the last
  operation took. Benchmarks read these; nothing else can tell the two apart.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from sdbackup.errors import CorruptError, NoSpaceError, SdbError, UsageError

FILE_PREFIX = "file:"


class TapeError(SdbError):
    """A drive or medium error (exit 5: what is on the tape cannot be read or trusted)."""

    exit_code = CorruptError.exit_code


class EndOfData(TapeError):
    """A read at end of data: nothing was ever written here."""


class EarlyWarning(NoSpaceError):
    """The tape is nearly full: nothing was written; a filemark may still follow."""


class EndOfTape(NoSpaceError):
    """The physical end of the tape: nothing more can be written on it."""


@dataclass
class TapeStatus:
    """What ``MTIOCGET`` reports (and ``MTIOCPOS`` as ``block``)."""

    file_number: int  # filemarks passed since BOT (-1 when unknown)
    block_number: int  # blocks since the last filemark (-1 when unknown)
    block: int  # logical object address from BOT (MTIOCPOS)
    block_size: int  # 0: variable
    bot: bool
    eod: bool
    early_warning: bool
    write_protected: bool
    online: bool = True


@dataclass
class TapeStats:
    """Counters of what a drive did (for benchmarks and tests)."""

    locates: int = 0
    locate_seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    blocks_read: int = 0
    blocks_written: int = 0
    direction_changes: int = 0
    wrap_changes: int = 0
    backhitches: int = 0
    seeks: list[int] = field(default_factory=list)  # targets of seek(), in order


class TapeDevice(abc.ABC):
    """A tape drive with a tape in it (see the module docstring for the contract)."""

    name: str
    clock: float = 0.0
    last_cost: float = 0.0

    def __init__(self) -> None:
        self.stats = TapeStats()

    @property
    @abc.abstractmethod
    def block_size(self) -> int:
        """The fixed block size, or 0 for variable blocks."""

    @abc.abstractmethod
    def set_block_size(self, size: int) -> None:
        """``MTSETBLK``: fixed blocks of ``size`` bytes, or variable blocks with 0."""

    @property
    @abc.abstractmethod
    def max_block(self) -> int:
        """The largest block the drive reads or writes."""

    @abc.abstractmethod
    def rewind(self) -> None: ...

    @abc.abstractmethod
    def read(self, size: int) -> bytes:
        """The next block (fixed mode: up to ``size // block_size`` blocks up to the
        next filemark). ``b""`` at a filemark (passed); :class:`EndOfData` at EOD. A
        variable block longer than ``size`` is an error."""

    @abc.abstractmethod
    def write(self, data: bytes | memoryview) -> None:
        """One block (fixed mode: whole blocks) at the current position; everything
        after it is gone. :class:`EarlyWarning` once near the end (nothing written)."""

    @abc.abstractmethod
    def write_filemarks(self, count: int = 1) -> None:
        """``MTWEOF``: filemarks at the current position (and EOD after them); data
        written before is on the tape when this returns."""

    @abc.abstractmethod
    def space_files(self, count: int) -> None:
        """``MTFSF`` (count > 0): past the next ``count`` filemarks; ``MTBSF``
        (count < 0): back before the ``-count``-th filemark behind."""

    @abc.abstractmethod
    def space_blocks(self, count: int) -> None:
        """``MTFSR``/``MTBSR``: over ``count`` blocks (stops with an error at a
        filemark)."""

    @abc.abstractmethod
    def seek(self, block: int) -> None:
        """``MTSEEK``: to logical object ``block`` (counted from BOT, filemarks too)."""

    @abc.abstractmethod
    def tell(self) -> int:
        """``MTIOCPOS``: the logical object address of the current position."""

    @abc.abstractmethod
    def to_eod(self) -> None:
        """``MTEOM``: to end of data, ready to append."""

    @abc.abstractmethod
    def status(self) -> TapeStatus: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def describe(self) -> str:
        """Parameters worth printing with benchmark figures."""
        return self.name

    def __enter__(self) -> TapeDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __str__(self) -> str:
        return self.name


def open_tape(spec: str, *, write: bool = True) -> TapeDevice:
    """The drive named ``spec``: ``file:PATH`` for a file-backed tape, else the path of
    a Linux ``st`` device (use the non-rewinding ``/dev/nstN``)."""
    if spec.startswith(FILE_PREFIX):
        from sdbackup.media.tape.filetape import FileTape

        return FileTape.open(spec[len(FILE_PREFIX):], write=write)
    if not spec:
        raise UsageError("give a tape: file:PATH or a device such as /dev/nst0")
    from sdbackup.media.tape.st import StTape

    return StTape.open(spec, write=write)
