"""allocate_from: filling pages from aiofiles files, StreamReaders and async callables."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import BinaryIO

import aiofiles
import pytest
from helpers import RecordingExecutor

from asyncpgalloc import (
    PAGE_SIZE,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    PartialFillError,
)

P = PAGE_SIZE


def pattern(n: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(n))


def open_sync(path: Path, buffering: int) -> BinaryIO:
    """A plain (blocking) file object: what a caller may wrongly pass to allocate_from."""
    return open(path, "rb", buffering=buffering)


def content(mf: MemoryFile, fr: FileRange) -> bytes:
    return b"".join(bytes(v) for v in mf.map_internal(fr))


async def test_from_an_aiofiles_file_straight_into_the_pages(
    mf: MemoryFile, tmp_path: Path
) -> None:
    data = pattern(5 * P)
    (tmp_path / "f").write_bytes(data)
    async with aiofiles.open(tmp_path / "f", "rb") as f:
        fr = await mf.allocate_from(f, 5 * P)
    assert fr.length == 5 * P and content(mf, fr) == data


async def test_short_read_keeps_whole_pages_and_releases_the_tail(
    mf: MemoryFile, tmp_path: Path
) -> None:
    data = pattern(2 * P + 100)
    (tmp_path / "f").write_bytes(data)
    async with aiofiles.open(tmp_path / "f", "rb") as f:
        fr = await mf.allocate_from(f, 8 * P)
    assert fr.length == 2 * P and content(mf, fr) == data[: 2 * P]
    st = mf.stats()
    assert st.used_bytes == 2 * P and st.waste_bytes + st.releasing_bytes + st.free_bytes > 0
    await mf.wait_released()
    mf.dec_ref(fr)


async def test_from_a_stream_reader(mf: MemoryFile) -> None:
    reader = asyncio.StreamReader()
    data = pattern(3 * P)
    reader.feed_data(data[:1000])

    async def feed_rest() -> None:
        await asyncio.sleep(0.01)
        reader.feed_data(data[1000:])
        reader.feed_eof()

    feeder = asyncio.ensure_future(feed_rest())
    fr = await mf.allocate_from(reader, 3 * P)
    await feeder
    assert content(mf, fr) == data


async def test_from_an_async_callable(mf: MemoryFile) -> None:
    data = pattern(4 * P)
    pos = 0

    async def read(n: int) -> bytes:
        nonlocal pos
        chunk = data[pos : pos + min(n, 3000)]
        pos += len(chunk)
        return chunk

    fr = await mf.allocate_from(read, 4 * P)
    assert content(mf, fr) == data


async def test_a_failing_source_keeps_the_filled_pages(mf: MemoryFile) -> None:
    sent = 0

    async def read(n: int) -> bytes:
        nonlocal sent
        if sent >= P + 10:
            raise ConnectionResetError("peer went away")
        chunk = b"\x01" * min(n, P + 10 - sent)
        sent += len(chunk)
        return chunk

    with pytest.raises(PartialFillError) as info:
        await mf.allocate_from(read, 4 * P)
    assert isinstance(info.value.__cause__, ConnectionResetError)
    filled = info.value.filled
    assert filled.length == P and content(mf, filled) == b"\x01" * P
    assert mf.has_unique_ref(filled)
    mf.dec_ref(filled)
    await mf.wait_released()
    assert mf.stats().used_bytes == 0


async def test_cancelled_while_reading_returns_every_page(mf: MemoryFile) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"x" * (P + 5))
    task = asyncio.ensure_future(mf.allocate_from(reader, 4 * P))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await mf.wait_released()
    assert mf.stats().used_bytes == 0
    mf.check_invariants()


async def test_cancelled_during_the_commit_hop_returns_every_page() -> None:
    with RecordingExecutor() as ex:
        async with MemoryFile.open(opts=MemoryFileOpts(executor=ex)) as mf:
            from asyncpgalloc import AllocationMode, AllocOpts

            reader = asyncio.StreamReader()
            ex.gate.clear()
            task = asyncio.ensure_future(
                mf.allocate_from(reader, 1 << 20, AllocOpts(mode=AllocationMode.COMMIT))
            )
            while not ex.started.is_set():
                await asyncio.sleep(0.001)
            task.cancel()
            ex.gate.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            await mf.wait_released()
            assert mf.stats().used_bytes == 0


async def test_a_source_of_the_wrong_kind(mf: MemoryFile) -> None:
    before = mf.stats()
    with pytest.raises(TypeError):
        await mf.allocate_from(object(), P)  # type: ignore[arg-type]
    assert mf.stats() == before


async def test_a_synchronous_file_object_is_refused_up_front(
    mf: MemoryFile, tmp_path: Path
) -> None:
    """An ``open()`` file has read/readinto, but they are not awaitable: TypeError before
    anything is allocated, not a PartialFillError(TypeError) after."""
    (tmp_path / "f").write_bytes(pattern(2 * P))
    before = mf.stats()
    for buffering in (0, -1):
        with open_sync(tmp_path / "f", buffering) as f, pytest.raises(TypeError, match="synchr"):
            await mf.allocate_from(f, 2 * P)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="synchronous file"):
        await mf.allocate_from(io.BytesIO(b"x" * P), P)  # type: ignore[arg-type]
    assert mf.stats() == before
