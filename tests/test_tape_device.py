"""The tape device layer: the ``st`` ioctl encoding against the kernel's headers, and
the file-backed tape's semantics (against a simple model, by a state machine)."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sdbackup.errors import BusyError, UsageError
from sdbackup.media.tape import st as stdrv
from sdbackup.media.tape.device import (
    EarlyWarning,
    EndOfData,
    EndOfTape,
    TapeError,
    open_tape,
)
from sdbackup.media.tape.filetape import FileTape, TapeModel

PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/mtio.h>
int main(void) {
  printf("MTIOCTOP %lu\nMTIOCGET %lu\nMTIOCPOS %lu\n", (unsigned long)MTIOCTOP,
         (unsigned long)MTIOCGET, (unsigned long)MTIOCPOS);
  printf("sizeof_mtop %zu\nsizeof_mtget %zu\nsizeof_mtpos %zu\n", sizeof(struct mtop),
         sizeof(struct mtget), sizeof(struct mtpos));
  printf("off_mt_count %zu\noff_mt_gstat %zu\noff_mt_fileno %zu\noff_mt_blkno %zu\n",
         offsetof(struct mtop, mt_count), offsetof(struct mtget, mt_gstat),
         offsetof(struct mtget, mt_fileno), offsetof(struct mtget, mt_blkno));
  printf("MTFSF %d\nMTBSF %d\nMTFSR %d\nMTBSR %d\nMTWEOF %d\nMTREW %d\nMTEOM %d\n"
         "MTSETBLK %d\nMTSEEK %d\n", MTFSF, MTBSF, MTFSR, MTBSR, MTWEOF, MTREW, MTEOM,
         MTSETBLK, MTSEEK);
  printf("GMT_EOD %lu\nGMT_EOT %lu\nGMT_BOT %lu\nGMT_WR_PROT %lu\n",
         (unsigned long)GMT_EOD(~0UL), (unsigned long)GMT_EOT(~0UL),
         (unsigned long)GMT_BOT(~0UL), (unsigned long)GMT_WR_PROT(~0UL));
  return 0;
}
"""


def _kernel_layout(tmp: Path) -> dict[str, int]:
    """The numbers as the C compiler sees them in <sys/mtio.h>.

    Decision: a compiler is the authority (it lays out the structures exactly as the
    driver's callers do). Without one, the header is read instead: the operation
    numbers are parsed from it and the structure sizes computed from its declared
    member types with ctypes' own C layout rules, an independent derivation that still
    fails when the code disagrees with the header. Without either the test fails.
    """
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is not None:
        (tmp / "probe.c").write_text(PROBE)
        subprocess.run([cc, "-o", str(tmp / "probe"), str(tmp / "probe.c")], check=True)
        out = subprocess.run([str(tmp / "probe")], check=True, capture_output=True,
                             text=True).stdout
        return {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    hdr = next((p for p in (Path("/usr/include/x86_64-linux-gnu/sys/mtio.h"),
                            Path("/usr/include/sys/mtio.h"), Path("/usr/include/linux/mtio.h"))
                if p.exists()), None)
    if hdr is None:
        pytest.fail("neither a C compiler nor <sys/mtio.h>: the st encoding cannot be "
                    "checked on this machine", pytrace=False)
    text = hdr.read_text()
    got = {m.group(1): int(m.group(2)) for m in re.finditer(
        r"#define\s+(MT[A-Z]+)\s+(\d+)\b", text)}

    class Op(ctypes.Structure):
        _fields_ = [("a", ctypes.c_short), ("b", ctypes.c_int)]

    class Get(ctypes.Structure):
        _fields_ = [(f"l{i}", ctypes.c_long) for i in range(5)] + \
            [("f", ctypes.c_int), ("b", ctypes.c_int)]

    sizes = {"sizeof_mtop": ctypes.sizeof(Op), "sizeof_mtget": ctypes.sizeof(Get),
             "sizeof_mtpos": ctypes.sizeof(ctypes.c_long)}
    got.update(sizes)
    got["MTIOCTOP"] = (1 << 30) | (sizes["sizeof_mtop"] << 16) | (ord("m") << 8) | 1
    got["MTIOCGET"] = (2 << 30) | (sizes["sizeof_mtget"] << 16) | (ord("m") << 8) | 2
    got["MTIOCPOS"] = (2 << 30) | (sizes["sizeof_mtpos"] << 16) | (ord("m") << 8) | 3
    return got


def test_st_ioctl_encoding_matches_kernel_headers(tmp_path: Path) -> None:
    k = _kernel_layout(tmp_path)
    assert k["MTIOCTOP"] == stdrv.MTIOCTOP
    assert k["MTIOCGET"] == stdrv.MTIOCGET
    assert k["MTIOCPOS"] == stdrv.MTIOCPOS
    assert ctypes.sizeof(stdrv.MtOp) == k["sizeof_mtop"]
    assert ctypes.sizeof(stdrv.MtGet) == k["sizeof_mtget"]
    assert ctypes.sizeof(stdrv.MtPos) == k["sizeof_mtpos"]
    for name, value in stdrv.OPS.items():
        assert value == k[name], name
    if "off_mt_count" in k:
        assert stdrv.MtOp.mt_count.offset == k["off_mt_count"]
        assert stdrv.MtGet.mt_gstat.offset == k["off_mt_gstat"]
        assert stdrv.MtGet.mt_fileno.offset == k["off_mt_fileno"]
        assert stdrv.MtGet.mt_blkno.offset == k["off_mt_blkno"]
        assert k["GMT_EOD"] == stdrv.GMT_EOD and k["GMT_EOT"] == stdrv.GMT_EOT
        assert k["GMT_BOT"] == stdrv.GMT_BOT and k["GMT_WR_PROT"] == stdrv.GMT_WR_PROT


def test_st_refuses_what_is_not_a_tape_drive(tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"x")
    with pytest.raises(UsageError, match="not a tape device"):
        open_tape(str(tmp_path / "plain"))
    with pytest.raises(TapeError, match="not a tape drive"):
        open_tape("/dev/null")


# -- the file-backed tape ---------------------------------------------------------------


def _tape(tmp_path: Path, capacity: int = 4 << 20, **kw: int) -> FileTape:
    FileTape.create(tmp_path / "t", capacity, max_block=64 << 10, **kw)
    t = open_tape(f"file:{tmp_path / 't'}")
    assert isinstance(t, FileTape)
    return t


def test_write_truncates_everything_after_it(tmp_path: Path) -> None:
    t = _tape(tmp_path)
    for b in (b"a", b"b", b"c"):
        t.write(b)
    t.write_filemarks(1)
    t.write(b"d")
    t.seek(1)
    t.write(b"B")
    assert t.tell() == 2
    with pytest.raises(EndOfData):
        t.read(100)
    t.rewind()
    assert [t.read(100), t.read(100)] == [b"a", b"B"]
    t.close()
    t = open_tape(f"file:{tmp_path / 't'}")  # what survived is on the file too
    assert [t.read(100), t.read(100)] == [b"a", b"B"]
    with pytest.raises(EndOfData):
        t.read(100)


def test_filemarks_spacing_and_status(tmp_path: Path) -> None:
    t = _tape(tmp_path)
    t.write(b"h0")
    t.write_filemarks()
    t.write(b"f1a")
    t.write(b"f1b")
    t.write_filemarks()
    t.write(b"f2")
    t.write_filemarks()
    t.rewind()
    assert t.status().bot
    t.space_files(1)
    assert (t.tell(), t.status().file_number, t.status().block_number) == (2, 1, 0)
    assert t.read(10) == b"f1a"
    t.space_files(1)
    assert t.read(10) == b"f2"
    assert t.read(10) == b""  # the filemark, passed
    with pytest.raises(EndOfData):
        t.read(10)
    assert t.status().eod
    t.space_files(-2)  # back before the filemark ending file 1
    assert t.tell() == 4 and t.read(10) == b""
    t.seek(2)
    t.space_blocks(1)
    assert t.read(10) == b"f1b"
    with pytest.raises(TapeError, match="filemark"):
        t.space_blocks(1)
    with pytest.raises(TapeError, match="end of data is at block 7"):
        t.seek(8)
    t.rewind()
    with pytest.raises(TapeError, match="more than the 1 asked for"):
        t.read(1)


def test_fixed_blocks(tmp_path: Path) -> None:
    t = _tape(tmp_path)
    t.set_block_size(4)
    t.write(b"aaaabbbbcccc")
    t.write_filemarks()
    t.rewind()
    assert t.read(8) == b"aaaabbbb" and t.tell() == 2
    assert t.read(8) == b"cccc"
    with pytest.raises(UsageError):
        t.write(b"abc")


def test_capacity_and_early_warning(tmp_path: Path) -> None:
    t = _tape(tmp_path, capacity=1 << 20, early_warning=256 << 10)
    block = bytes(64 << 10)
    written = 0
    with pytest.raises(EarlyWarning):
        while True:
            t.write(block)
            written += len(block)
    assert written == (1 << 20) - (256 << 10)
    assert t.status().early_warning
    t.write_filemarks()  # allowed past early warning
    for _ in range(4):
        t.write(block)  # ... and writes too, up to the physical end
    with pytest.raises(EndOfTape):
        t.write(block)
    t.rewind()
    t.space_files(1)
    assert t.read(1 << 20) == block


def test_one_process_per_tape_and_write_protect(tmp_path: Path) -> None:
    t = _tape(tmp_path)
    with pytest.raises(BusyError):
        open_tape(f"file:{tmp_path / 't'}")
    t.close()
    (tmp_path / "t").chmod(0o444)
    ro = open_tape(f"file:{tmp_path / 't'}")
    assert ro.status().write_protected
    with pytest.raises(UsageError, match="write-protected"):
        ro.write(b"x")


def test_time_model_locate_and_stream(tmp_path: Path) -> None:
    m = TapeModel(speed=100e6, wraps=4, native_capacity=400 << 20, eot_to_bot=100.0,
                  change_direction=2.0, change_track=0.5, load=10.0)
    FileTape.create(tmp_path / "t", 400 << 20, model=m, max_block=8 << 20)
    t = open_tape(f"file:{tmp_path / 't'}")
    assert t.clock == 10.0  # loading
    blk = bytes(5 << 20)
    for _ in range(30):  # 150 MiB: 1.5 wraps of 100 MiB
        t.write(blk)
    assert t.stats.wrap_changes == 1
    assert abs(t.clock - 10.0 - (150 * 2**20 / 100e6 + 0.5)) < 1e-6
    c = t.clock
    t.rewind()  # from the middle of wrap 1 (moving backwards) to BOT: half the tape
    assert abs((t.clock - c) - (0.5 * 100 + 0.5 + 2.0)) < 0.01
    c = t.clock
    t.seek(29)  # to the last block: along wrap 1, backwards from EOT
    assert t.last_cost > 2.0  # a direction change at least
    t.read(8 << 20)
    assert abs(t.last_cost - (5 << 20) / 100e6) < 1e-9
    assert "100 MB/s, 4 wraps of 0.105 GB" in t.describe()


# -- the state machine: the file tape against a list ------------------------------------------


class FileTapeMachine(RuleBasedStateMachine):
    """Objects are ``bytes`` (a block) or ``None`` (a filemark)."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="sdb-tape-sm."))
        FileTape.create(self.dir / "t", 1 << 20, early_warning=64 << 10, max_block=4096)
        self.t = open_tape(f"file:{self.dir / 't'}")
        self.model: list[bytes | None] = []
        self.pos = 0
        self.reopened = 0

    def teardown(self) -> None:
        self.t.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _used(self) -> int:
        return sum(len(x) for x in self.model[: self.pos] if x)

    @rule(data=st.binary(min_size=1, max_size=4096))
    def write(self, data: bytes) -> None:
        try:
            self.t.write(data)
        except EarlyWarning:
            assert self._used() >= (1 << 20) - (64 << 10)
            return
        except EndOfTape:
            assert self._used() + len(data) > 1 << 20
            return
        del self.model[self.pos :]
        self.model.append(data)
        self.pos += 1

    @rule(n=st.integers(1, 2))
    def filemarks(self, n: int) -> None:
        self.t.write_filemarks(n)
        del self.model[self.pos :]
        self.model += [None] * n
        self.pos += n

    @rule()
    def read(self) -> None:
        if self.pos == len(self.model):
            with pytest.raises(EndOfData):
                self.t.read(4096)
            return
        got = self.t.read(4096)
        assert got == (self.model[self.pos] or b"")
        self.pos += 1

    @rule(data=st.data())
    def seek(self, data: st.DataObject) -> None:
        b = data.draw(st.integers(0, len(self.model)))
        self.t.seek(b)
        self.pos = b

    @rule(n=st.integers(-2, 2))
    def space_files(self, n: int) -> None:
        marks = [i for i, x in enumerate(self.model) if x is None]
        try:
            self.t.space_files(n)
        except (EndOfData, TapeError):
            if n > 0:
                assert len([m for m in marks if m >= self.pos]) < n
                self.pos = len(self.model)
            else:
                assert len([m for m in marks if m < self.pos]) < -n
                self.pos = 0
            return
        if n > 0:
            self.pos = [m for m in marks if m >= self.pos][n - 1] + 1
        elif n < 0:
            self.pos = [m for m in marks if m < self.pos][n]

    @rule()
    def to_eod(self) -> None:
        self.t.to_eod()
        self.pos = len(self.model)

    @precondition(lambda self: self.reopened < 3)
    @rule()
    def reopen(self) -> None:
        self.t.close()
        self.t = open_tape(f"file:{self.dir / 't'}")
        self.pos = 0
        self.reopened += 1

    @invariant()
    def position(self) -> None:
        assert self.t.tell() == self.pos
        s = self.t.status()
        assert s.eod == (self.pos == len(self.model))
        assert s.file_number == sum(1 for x in self.model[: self.pos] if x is None)


TestFileTapeMachine = FileTapeMachine.TestCase
TestFileTapeMachine.settings = settings(max_examples=40, stateful_step_count=40, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])
