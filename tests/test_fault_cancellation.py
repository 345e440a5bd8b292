"""Cancellation fuzz (issue 18's standing fault suite): thousands of public async calls,
each under a random 0-2 ms timeout, with sources that write late (aiofiles on a pipe fed
later, so its thread writes after the cancellation; async callables that sleep;
StreamReaders fed later). Afterwards every fresh allocation reads zero, the data the
test holds is intact, the invariants hold and ``aclose()`` completes.

Seeded: ``ASYNCPGALLOC_FUZZ_SEED`` picks another run, ``ASYNCPGALLOC_FUZZ_CALLS`` a
longer one.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.threadpool
from helpers import fill

from asyncpgalloc import (
    PAGE_SIZE,
    AccessType,
    AllocationMode,
    AllocOpts,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    PartialFillError,
)

P = PAGE_SIZE
SEED = int(os.environ.get("ASYNCPGALLOC_FUZZ_SEED", "18"))
CALLS = int(os.environ.get("ASYNCPGALLOC_FUZZ_CALLS", "3000"))
MAX_HELD = 24 << 20
FILLED = 0xAB
MODES = [AllocationMode.UNCOMMITTED, AllocationMode.COMMIT, AllocationMode.WRITE_POPULATE]


def reads_byte(mf: MemoryFile, fr: FileRange, byte: int) -> bool:
    return all(v.tobytes().count(byte) == len(v) for v in mf.map_internal(fr))


class Fuzz:
    def __init__(self, mf: MemoryFile, rng: random.Random, tmp: Path) -> None:
        self.mf, self.rng, self.tmp = mf, rng, tmp
        self.loop = asyncio.get_running_loop()
        self.held: dict[FileRange, int] = {}
        self.pipes: list[Any] = []  # aiofiles read ends, closed once their writer fired
        self.calls = self.cancelled = self.fills = 0
        self.bad: list[str] = []

    def size(self) -> int:
        return self.rng.choice([1, 1, 2, 4, 16, 64, 128]) * P

    def hold(self, fr: FileRange, fresh: bool, what: str) -> None:
        if fresh and not reads_byte(self.mf, fr, 0):
            self.bad.append(f"{what} handed out {fr} not zero")
        byte = self.rng.randrange(1, 256)
        fill(self.mf, fr, byte)
        self.held[fr] = byte

    def drop_some(self) -> None:
        while self.held and (
            sum(fr.length for fr in self.held) > MAX_HELD or self.rng.random() < 0.3
        ):
            fr = self.rng.choice(list(self.held))
            if not reads_byte(self.mf, fr, self.held.pop(fr)):
                self.bad.append(f"held {fr} lost its data")
            self.mf.dec_ref(fr)

    # -------------------------------------------------------------- late sources

    def late_callable(self) -> Callable[[int], Awaitable[bytes]]:
        async def read(n: int) -> bytes:
            await asyncio.sleep(self.rng.uniform(0, 0.001))
            return bytes([FILLED]) * min(n, 16 * P)

        return read

    def late_stream(self, n: int) -> asyncio.StreamReader:
        reader = asyncio.StreamReader()
        self.loop.call_later(self.rng.uniform(0, 0.003), reader.feed_data, bytes([FILLED]) * n)
        self.loop.call_later(0.003, reader.feed_eof)
        return reader

    def late_pipe(self, n: int) -> Any:
        """An aiofiles file on a pipe that gets ``n`` bytes and EOF 0-3 ms from now: its
        thread blocks in readinto until then, cancelled or not."""
        r, w = os.pipe()
        n = min(n, 64 << 10)  # fits the pipe's buffer: the write never blocks the loop

        def feed() -> None:
            try:
                os.write(w, bytes([FILLED]) * n)
            finally:
                os.close(w)

        self.loop.call_later(self.rng.uniform(0, 0.003), feed)
        # Wrapped on the loop (no await): a cancelled aiofiles.open would leave the
        # read end to the garbage collector.
        f = aiofiles.threadpool.wrap(os.fdopen(r, "rb", buffering=0), loop=self.loop)
        self.pipes.append(f)
        return f

    async def close_pipes(self) -> None:
        await asyncio.sleep(0.005)  # every feed has fired
        for f in self.pipes:
            await f.close()
        self.pipes.clear()

    # ----------------------------------------------------------------- the calls

    async def allocate_async(self) -> None:
        opts = AllocOpts(mode=self.rng.choice(MODES))
        n = self.rng.choice([self.size(), 64 * P, 256 * P])
        self.hold(await self.mf.allocate_async(n, opts), True, "allocate_async")

    async def allocate_from(self) -> None:
        n = self.size()
        kind = self.rng.randrange(3)
        src: Any
        if kind == 0:
            src = self.late_callable()
        elif kind == 1:
            src = self.late_stream(n)
        else:
            src = self.late_pipe(n)
        try:
            fr = await self.mf.allocate_from(src, n)
        except PartialFillError as e:
            fr = e.filled
        if fr.length:
            self.fills += 1
            if not reads_byte(self.mf, fr, FILLED):
                self.bad.append(f"allocate_from {fr} holds other bytes")
            self.hold(fr, False, "allocate_from")

    async def decommit(self) -> None:
        if not self.held:
            return
        fr = self.rng.choice(list(self.held))
        byte = self.held.pop(fr)  # zero or still ``byte`` if cancelled: rewritten below
        try:
            await self.mf.decommit(fr)
        finally:
            view = self.mf.map_internal(fr)[0]
            if view[0] not in (0, byte):
                self.bad.append(f"decommit left {fr} holding {view[0]}")
            self.hold(fr, False, "decommit")

    async def update_usage(self) -> None:
        await self.mf.update_usage()

    async def wait_released(self) -> None:
        await self.mf.wait_released()

    async def save(self) -> None:
        await self.mf.save(self.tmp / "ckpt")

    async def run(self) -> None:
        ops = [
            (self.allocate_async, 4),
            (self.allocate_from, 6),
            (self.decommit, 2),
            (self.update_usage, 1),
            (self.wait_released, 2),
            (self.save, 1),
        ]
        names = [op for op, _ in ops]
        weights = [w for _, w in ops]
        for i in range(CALLS):
            op = self.rng.choices(names, weights)[0]
            self.calls += 1
            try:
                await asyncio.wait_for(op(), self.rng.uniform(0, 0.002))
            except TimeoutError:
                self.cancelled += 1
            self.drop_some()
            if i % 64 == 63:
                await self.close_pipes()
        await self.close_pipes()


async def test_cancellation_fuzz(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    fds = len(os.listdir("/proc/self/fd"))
    mf = await MemoryFile.open(opts=MemoryFileOpts())
    fuzz = Fuzz(mf, rng, tmp_path)
    try:
        await fuzz.run()
        await asyncio.wait_for(mf.wait_released(), 30)
        mf.check_invariants()
        assert not fuzz.bad, fuzz.bad[:10]
        for fr, byte in fuzz.held.items():
            assert reads_byte(mf, fr, byte), f"held {fr} lost its data"
        st = mf.stats()
        assert st.used_bytes == sum(fr.length for fr in fuzz.held), st
        # Every page that is not held reads zero when handed out again.
        fresh: list[FileRange] = []
        while st.free_bytes and len(fresh) < 64:
            fr = mf.allocate(min(st.free_bytes, 16 << 20), AllocOpts(mode=AllocationMode.COMMIT))
            assert reads_byte(mf, fr, 0), f"fresh {fr} not zero"
            fresh.append(fr)
            st = mf.stats()
        for v in mf.map_internal(next(iter(fuzz.held), fresh[0]), AccessType.READ):
            assert v.readonly
        mf.check_invariants()
        print(
            f"cancellation fuzz seed={SEED}: {fuzz.calls} calls, {fuzz.cancelled} cancelled, "
            f"{fuzz.fills} fills landed"
        )
        assert fuzz.cancelled > fuzz.calls // 10, "the timeouts cancelled almost nothing"
    finally:
        await asyncio.wait_for(mf.aclose(), 10)
    assert mf.closed
    assert len(os.listdir("/proc/self/fd")) == fds
