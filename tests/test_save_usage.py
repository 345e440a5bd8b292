"""While a save runs: update_usage is a no-op (as gVisor's UpdateUsage during SaveTo), and
the save's writes overlap finding and checksumming the next batch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiofiles
import pytest
from helpers import fill

from asyncpgalloc import PAGE_SIZE, MemoryFile

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
