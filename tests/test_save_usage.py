"""While a save runs: update_usage is a no-op (as gVisor's UpdateUsage during SaveTo), and
the save's writes overlap finding and checksumming the next batch."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiofiles
import pytest
from helpers import fill

from asyncpgalloc import PAGE_SIZE, MemoryFile
from asyncpgalloc.checkpoint_format import Block

MiB = 1 << 20


class GatedWriter:
    """An aiofiles file whose first data write waits until ``release`` is set."""

    def __init__(self, f: object) -> None:
        self._f = f
        self.writes = 0
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def write(self, b: object, /) -> int:
        self.writes += 1
        if self.writes == 2:  # the header and metadata went first
            self.entered.set()
            await self.release.wait()
        n: int = await self._f.write(b)  # type: ignore[attr-defined]
        return n

    async def flush(self) -> None:
        await self._f.flush()  # type: ignore[attr-defined]


async def test_update_usage_is_a_no_op_while_a_save_runs(tmp_path: Path) -> None:
    async with MemoryFile.open() as mf:
        fr = mf.allocate(4 * MiB)
        fill(mf, fr, 7)  # committed by the writes, unknown to the accounting
        async with aiofiles.open(tmp_path / "ckpt", "wb") as f:
            writer = GatedWriter(f)
            save = asyncio.ensure_future(mf.save(writer))
            await writer.entered.wait()
            scans = mf.counters().usage_scans
            assert await mf.update_usage() is False
            assert await mf.update_usage(force=True) is False
            assert mf.counters().usage_scans == scans
            writer.release.set()
            await save
        # After the save, it scans again (the save marked the pages: nothing to find).
        fill(mf, mf.allocate(PAGE_SIZE), 1)
        assert await mf.update_usage(force=True) is True
        assert mf.counters().usage_scans == scans + 1
    async with await MemoryFile.load(tmp_path / "ckpt") as back:
        assert back.stats().used_bytes == 4 * MiB


async def test_a_failed_save_lets_update_usage_scan_again(tmp_path: Path) -> None:
    async with MemoryFile.open() as mf:
        fill(mf, mf.allocate(MiB), 3)
        with pytest.raises(FileNotFoundError):
            await mf.save(tmp_path / "missing" / "ckpt")
        fill(mf, mf.allocate(PAGE_SIZE), 1)
        assert await mf.update_usage(force=True) is True


def test_a_path_save_reads_the_next_batch_while_one_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one block per batch, the write of block 0 is held in its thread until block 1
    has been read and checksummed in the other: they overlap (else this times out)."""
    import threading

    import asyncpgalloc.checkpoint_io as cio

    monkeypatch.setattr(cio, "BATCH_BLOCKS", 1)
    filled: list[int] = []
    second = threading.Event()
    overlapped: list[bool] = []
    real_fill, real_write = cio._fill_block, cio.pwrite_all

    def fill_block(src_fd: int, block: Block, header_crc: int, mv: memoryview) -> int:
        filled.append(block.number)
        n = real_fill(src_fd, block, header_crc, mv)
        if block.number == 1:
            second.set()
        return n

    lock = threading.Lock()
    held: list[int] = []

    def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
        with lock:
            first = len(data) == MiB + 4 and not held  # the first block written
            if first:
                held.append(offset)
        if first:
            overlapped.append(second.wait(10))
        real_write(fd, data, offset)

    monkeypatch.setattr(cio, "_fill_block", fill_block)
    monkeypatch.setattr(cio, "pwrite_all", pwrite_all)

    async def main() -> None:
        async with MemoryFile.open() as mf:
            frs = [mf.allocate(MiB) for _ in range(4)]
            for i, fr in enumerate(frs):
                fill(mf, fr, i + 1)
            await mf.save(tmp_path / "ckpt")
        async with await MemoryFile.load(tmp_path / "ckpt") as back:
            for i, fr in enumerate(frs):
                assert b"".join(v.tobytes() for v in back.map_internal(fr)) == bytes([i + 1]) * MiB

    asyncio.run(main())
    assert overlapped == [True] and sorted(filled) == [0, 1, 2, 3]


async def test_a_stream_save_fills_the_next_batch_while_one_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An aiofiles save: the write of batch 0 awaits until batch 1 has been read and
    checksummed in the executor."""
    import threading

    import asyncpgalloc.checkpoint_io as cio

    monkeypatch.setattr(cio, "BATCH_BLOCKS", 1)
    second = threading.Event()
    real_fill = cio._fill_batch_job

    def fill_batch(src_fd: int, batch: list[Block], header_crc: int, buf: bytearray) -> int:
        n = real_fill(src_fd, batch, header_crc, buf)
        if batch[0].number == 1:
            second.set()
        return n

    monkeypatch.setattr(cio, "_fill_batch_job", fill_batch)
    overlapped: list[bool] = []

    class Writer:
        def __init__(self, f: Any) -> None:
            self.f = f

        async def write(self, b: Any, /) -> int:
            if len(b) == MiB + 4 and not overlapped:
                for _ in range(10_000):
                    if second.is_set():
                        break
                    await asyncio.sleep(0.001)
                overlapped.append(second.is_set())
            n: int = await self.f.write(b)
            return n

        async def flush(self) -> None:
            await self.f.flush()

    async with MemoryFile.open() as mf:
        for i in range(3):
            fill(mf, mf.allocate(MiB), i + 1)
        async with aiofiles.open(tmp_path / "ckpt", "wb") as f:
            await mf.save(Writer(f))
    assert overlapped == [True]
    async with await MemoryFile.load(tmp_path / "ckpt") as back:
        assert back.stats().used_bytes == 3 * MiB
