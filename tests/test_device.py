"""BlockDevice on sparse files: buffered and O_DIRECT I/O, bounds, holes, holds_data."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdbackup.blocks.device import (
    BlockDevice,
    create_sparse,
    device_size,
    holds_data,
    is_block_device,
)
from sdbackup.errors import CorruptError, UsageError

BS = 4096
NBLOCKS = 256


def pattern(block: int, count: int = 1) -> bytes:
    """Distinct, non-zero contents for each block."""
    return b"".join(bytes([(block + i) % 251 + 1]) * BS for i in range(count))


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    p = tmp_path / "disk0.img"
    create_sparse(p, NBLOCKS * BS)
    return p


@pytest.fixture
def direct_dir() -> Iterator[Path]:
    """A directory on a file system that accepts O_DIRECT (tmpfs may not), or skip."""
    import tempfile

    for root in ("/var/tmp", tempfile.gettempdir()):
        try:
            d = Path(tempfile.mkdtemp(prefix="sdb-odirect-", dir=root))
        except OSError:
            continue
        probe = d / "probe"
        try:
            fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            probe.unlink(missing_ok=True)
            d.rmdir()
            continue
        os.close(fd)
        probe.unlink()
        try:
            yield d
        finally:
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
        return
    pytest.skip("no file system here accepts O_DIRECT")


def test_create_sparse(disk: Path) -> None:
    assert device_size(disk) == NBLOCKS * BS
    assert allocated_bytes(disk) < NBLOCKS * BS  # sparse: (almost) nothing allocated
    assert not is_block_device(disk)
    assert not is_block_device(disk.parent / "missing")
    with pytest.raises(FileExistsError):
        create_sparse(disk, BS)  # refuses to overwrite


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        BlockDevice(tmp_path / "nope.img", BS)


def test_direct_unsupported_is_usage_error(
    disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that refuses O_DIRECT (EINVAL, e.g. old tmpfs) gets a clear message."""
    real_open = os.open

    def no_direct(path: str, flags: int, *args: int, **kw: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", no_direct)
    with pytest.raises(UsageError, match="O_DIRECT"):
        BlockDevice(disk, BS, direct=True)
    with BlockDevice(disk, BS) as dev:  # buffered I/O still works
        assert dev.read(0, 1) == bytes(BS)


def test_write_read_roundtrip(disk: Path) -> None:
    with BlockDevice(disk, BS) as dev:
        assert dev.nblocks == NBLOCKS and dev.size == NBLOCKS * BS
        dev.write(3, pattern(3, 4))
        dev.write(NBLOCKS - 1, bytearray(pattern(NBLOCKS - 1)))
        dev.write(100, memoryview(pattern(100, 2)))
        dev.fsync()
        assert dev.read(3, 4) == pattern(3, 4)
        assert dev.read(4, 1) == pattern(4)
        assert dev.read(NBLOCKS - 1, 1) == pattern(NBLOCKS - 1)
        assert dev.read(100, 2) == pattern(100, 2)
        assert dev.read(0, 0) == b""
        dev.write(0, b"")  # nothing to do
    with BlockDevice(disk, BS, writable=False) as ro:
        assert ro.read(3, 4) == pattern(3, 4)
        with pytest.raises(OSError):
            ro.write(0, pattern(0))


def test_unwritten_blocks_read_as_zeros(disk: Path) -> None:
    with BlockDevice(disk, BS) as dev:
        dev.write(10, pattern(10))
        assert dev.read(0, 10) == bytes(10 * BS)
        assert dev.read(11, NBLOCKS - 11) == bytes((NBLOCKS - 11) * BS)
        assert dev.read(9, 3) == bytes(BS) + pattern(10) + bytes(BS)


def test_out_of_range_is_usage_error(disk: Path) -> None:
    with BlockDevice(disk, BS) as dev:
        for block, count in ((NBLOCKS, 1), (NBLOCKS - 1, 2), (-1, 1), (0, -1)):
            with pytest.raises(UsageError, match="outside disk"):
                dev.read(block, count)
        with pytest.raises(UsageError):
            dev.write(NBLOCKS, pattern(0))
        with pytest.raises(UsageError):
            dev.readinto(NBLOCKS - 1, bytearray(2 * BS))
        with pytest.raises(UsageError):
            dev.punch(NBLOCKS - 1, 2)
        with pytest.raises(ValueError):
            dev.write(0, b"x" * (BS - 1))
        with pytest.raises(ValueError):
            dev.readinto(0, bytearray(BS + 1))


def test_readinto(disk: Path) -> None:
    with BlockDevice(disk, BS) as dev:
        dev.write(7, pattern(7, 3))
        buf = bytearray(3 * BS)
        dev.readinto(7, buf)
        assert buf == pattern(7, 3)
        big = bytearray(5 * BS)
        dev.readinto(6, memoryview(big)[BS : 4 * BS])  # a slice of a larger buffer
        assert big[:BS] == bytes(BS) and big[BS:] == bytes(BS) + pattern(7, 2) + bytes(BS)


def test_short_reads_are_continued(disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel returns at most ~2 GiB per call; big reads must go on, not fail."""
    with BlockDevice(disk, BS) as dev:
        dev.write(0, pattern(0, 8))
        real_pread, real_preadv = os.pread, os.preadv

        def short_pread(fd: int, n: int, off: int) -> bytes:
            return real_pread(fd, min(n, 3000), off)

        def short_preadv(fd: int, bufs: list[memoryview], off: int) -> int:
            return real_preadv(fd, [memoryview(bufs[0]).cast("B")[:3000]], off)

        monkeypatch.setattr(os, "pread", short_pread)
        monkeypatch.setattr(os, "preadv", short_preadv)
        assert dev.read(0, 8) == pattern(0, 8)
        buf = bytearray(8 * BS)
        dev.readinto(0, buf)
        assert buf == pattern(0, 8)


def test_truncated_device_is_corrupt(disk: Path) -> None:
    with BlockDevice(disk, BS) as dev:
        os.truncate(disk, 10 * BS)  # shrunk behind the device's back
        with pytest.raises(CorruptError, match="short read"):
            dev.read(8, 4)
        with pytest.raises(CorruptError):
            dev.readinto(8, bytearray(4 * BS))


def test_direct_io(direct_dir: Path) -> None:
    p = direct_dir / "disk.img"
    create_sparse(p, 64 * BS)
    with BlockDevice(p, BS, direct=True) as dev:
        assert dev.direct
        dev.write(0, b"")  # nothing to do (used to fail on the alignment probe)
        dev.write(2, pattern(2, 3))  # bytes: not aligned, goes through a bounce buffer
        aligned = mmap.mmap(-1, 2 * BS)
        aligned[:] = pattern(20, 2)
        dev.write(20, memoryview(aligned))  # page-aligned: written as is
        assert dev.read(2, 3) == pattern(2, 3)
        assert dev.read(20, 2) == pattern(20, 2)
        assert dev.read(0, 2) == bytes(2 * BS)
        plain = bytearray(BS + 1)
        view = memoryview(plain)[1:]  # almost surely not page-aligned
        dev.readinto(3, view)
        assert view == pattern(3)
        view.release()
        target = mmap.mmap(-1, 3 * BS)
        dev.readinto(2, memoryview(target))
        assert target[:] == pattern(2, 3)
        target.close()
        aligned.close()
        dev.punch(2, 1)
        assert dev.read(2, 2) == bytes(BS) + pattern(3)
    with BlockDevice(p, BS) as buffered:  # the data is on disk, not in a private cache
        assert buffered.read(3, 2) == pattern(3, 2)


def test_holds_data(tmp_path: Path) -> None:
    empty = tmp_path / "empty.img"
    create_sparse(empty, 4 << 20)
    assert not holds_data(empty)
    zero_len = tmp_path / "zero.img"
    zero_len.touch()
    assert not holds_data(zero_len)

    used = tmp_path / "used.img"
    create_sparse(used, 4 << 20)
    with BlockDevice(used, BS) as dev:
        dev.write(5, pattern(5))
    assert holds_data(used)

    zeros_written = tmp_path / "zeros.img"
    zeros_written.write_bytes(bytes(1 << 20))  # allocated, but only zeros
    assert not holds_data(zeros_written)


def test_holds_data_looks_past_leading_zeros(tmp_path: Path) -> None:
    """Data behind an allocated all-zero first extent must still be seen."""
    p = tmp_path / "late.img"
    create_sparse(p, 64 << 20)
    with BlockDevice(p, BS) as dev:
        dev.write(0, bytes(512 * BS))  # 2 MiB of written zeros first
        dev.write(8192, pattern(1))  # data at 32 MiB
    assert holds_data(p)
    q = tmp_path / "tail.img"
    with open(q, "wb") as f:
        f.write(bytes(3 << 20) + b"label")  # one extent, data only near its end
    assert holds_data(q)


def test_punch(disk: Path) -> None:
    with BlockDevice(disk, BS) as dev:
        dev.write(0, pattern(0, 64))
        dev.fsync()
        before = allocated_bytes(disk)
        dev.punch(16, 32)
        dev.punch(0, 0)
        assert dev.read(16, 32) == bytes(32 * BS)
        assert dev.read(0, 16) == pattern(0, 16)
        assert dev.read(48, 16) == pattern(48, 16)
        assert device_size(disk) == NBLOCKS * BS  # the size is kept
        assert allocated_bytes(disk) <= before - 32 * BS  # space went back to the host
