"""allocate_from with a source that writes late: a thread inside ``readinto`` goes on
writing after the call was cancelled or failed, so its pages must not be handed out
again until it has returned (issue 18 item 1)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiofiles
import pytest
from helpers import RecordingExecutor, is_zero

from asyncpgalloc import PAGE_SIZE, FileRange, MemoryFile, PartialFillError

P = PAGE_SIZE
K64 = 64 << 10
SECRET = b"SECRET!!" * (K64 // 8)


@pytest.fixture
async def fifo(tmp_path: Path) -> AsyncIterator[tuple[Path, int]]:
    """A FIFO and its write end (opened O_RDWR, so that opening the read end never blocks)."""
    path = tmp_path / "fifo"
    os.mkfifo(path)
    w = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        yield path, w
    finally:
        os.close(w)


def open_raw(path: Path) -> io.FileIO:
    """The FIFO's read end as a raw (unbuffered, blocking) file, for a source's thread."""
    return open(path, "rb", buffering=0)


async def _started(ex: RecordingExecutor) -> None:
    """Wait until the executor's thread has started its job (the FIFO's readinto)."""
    while not ex.started.is_set():
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)


async def _drained(ex: RecordingExecutor) -> None:
    """Wait until every job of ``ex`` has returned."""
    await asyncio.get_running_loop().run_in_executor(None, ex.shutdown, True)


async def test_a_cancelled_fill_never_lends_its_pages_to_the_next_tenant(
    mf: MemoryFile, fifo: tuple[Path, int]
) -> None:
    path, w = fifo
    ex = RecordingExecutor()
    async with aiofiles.open(path, "rb", buffering=0, executor=ex) as src:
        task = asyncio.ensure_future(mf.allocate_from(src, K64))
        await _started(ex)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The thread still waits in readinto: wait_released() must wait for it.
        waiter = asyncio.ensure_future(mf.wait_released())
        await asyncio.sleep(0.05)
        waited = not waiter.done()
        os.write(w, SECRET)
        await _drained(ex)
        await waiter
        frs = [mf.allocate(K64) for _ in range(4)]
        assert all(is_zero(mf, fr) for fr in frs), "a fresh allocation read another's bytes"
        assert waited, "wait_released() returned while a thread could still write the pages"
        for fr in frs:
            mf.dec_ref(fr)
    await mf.wait_released()
    assert mf.stats().used_bytes == 0


async def test_a_failing_readinto_keeps_its_tail_until_its_thread_returns(
    mf: MemoryFile, fifo: tuple[Path, int]
) -> None:
    """A source that raises while its thread still writes: PartialFillError at once, the
    kept pages are the caller's, the tail comes back only after the thread is done."""
    path, w = fifo
    ex = RecordingExecutor()
    loop = asyncio.get_running_loop()
    calls = 0

    with open_raw(path) as raw:

        async def readinto(b: memoryview) -> int:
            nonlocal calls
            calls += 1
            if calls == 1:
                b[: P + 10] = b"\x01" * (P + 10)
                return P + 10
            fut = loop.run_in_executor(ex, raw.readinto, b)
            await asyncio.sleep(0.01)
            fut.cancel()  # gives up waiting; the thread does not stop
            raise TimeoutError("source timed out")

        class Source:
            pass

        src = Source()
        src.readinto = readinto  # type: ignore[attr-defined]
        with pytest.raises(PartialFillError) as info:
            await mf.allocate_from(src, 4 * P)  # type: ignore[arg-type]
        filled = info.value.filled
        assert filled == FileRange(filled.start, filled.start + P)
        del info
        waiter = asyncio.ensure_future(mf.wait_released())
        await asyncio.sleep(0.05)
        waited = not waiter.done()
        os.write(w, SECRET[: 3 * P])
        await _drained(ex)
        await waiter
        frs = [mf.allocate(P) for _ in range(8)]
        assert all(is_zero(mf, fr) for fr in frs)
        assert waited
        assert bytes(mf.map_internal(filled)[0]) == b"\x01" * P
        for fr in [*frs, filled]:
            mf.dec_ref(fr)
    await mf.wait_released()
    assert mf.stats().used_bytes == 0


async def test_a_cancelled_fill_still_raises_at_once_and_aclose_never_unmaps_under_the_thread(
    fifo: tuple[Path, int],
) -> None:
    path, w = fifo
    ex = RecordingExecutor()
    mf = await MemoryFile.open()
    async with aiofiles.open(path, "rb", buffering=0, executor=ex) as src:
        task = asyncio.ensure_future(mf.allocate_from(src, K64))
        await _started(ex)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert mf.stats().used_bytes == K64  # held while the thread may write
        await mf.aclose()
        # The thread writes after the close: into a mapping still alive, no crash.
        os.write(w, SECRET)
        await _drained(ex)


async def test_a_view_the_source_derives_from_its_own_holds_the_pages_too(
    mf: MemoryFile, fifo: tuple[Path, int]
) -> None:
    """The source hands its thread a slice of the view it got: releasing our view alone
    would prove nothing, the mapping's own export count does."""
    path, w = fifo
    ex = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    started = threading.Event()
    loop = asyncio.get_running_loop()
    with open_raw(path) as raw:

        def read_half(b: memoryview) -> int | None:
            started.set()
            return raw.readinto(b)

        class Source:
            async def readinto(self, b: memoryview) -> int | None:
                return await loop.run_in_executor(ex, read_half, b[: len(b) // 2])

        task = asyncio.ensure_future(mf.allocate_from(Source(), K64))
        while not started.is_set():
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        waiter = asyncio.ensure_future(mf.wait_released())
        await asyncio.sleep(0.05)
        waited = not waiter.done()
        os.write(w, SECRET)
        await loop.run_in_executor(None, ex.shutdown, True)
        await waiter
        frs = [mf.allocate(K64) for _ in range(4)]
        assert all(is_zero(mf, fr) for fr in frs)
        assert waited
