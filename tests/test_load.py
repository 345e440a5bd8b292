"""A bounded stress test: 500 tasks mixing every operation for LOAD_SECONDS per loop.

CI runs 10 s per loop (asyncio and uvloop); ``ASYNCPGALLOC_LOAD_SECONDS`` lengthens it.
The releaser, evictions (DelayedEviction.ENABLED: whenever the releaser runs out of
work) and the usage refresher run meanwhile. Each task verifies its own data.
Afterwards no task failed, the invariants hold, and once everything is dropped and
released, usage and accounting are zero. Prints operations per second.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

from asyncpgalloc import (
    PAGE_SIZE,
    AccessType,
    AllocationMode,
    AllocOpts,
    EvictableRange,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
)

P = PAGE_SIZE
LOAD_SECONDS = float(os.environ.get("ASYNCPGALLOC_LOAD_SECONDS", "10"))
TASKS = 500


class _Source:
    def __init__(self, byte: int, n: int) -> None:
        self.byte, self.left = byte, n

    async def read(self, n: int = -1, /) -> bytes:
        k = min(n, self.left)
        self.left -= k
        return bytes([self.byte]) * k


class _Evictable:
    def __init__(self, mf: MemoryFile, fr: FileRange) -> None:
        self.mf, self.fr, self.done = mf, fr, False

    async def evict(self, er: EvictableRange) -> None:
        if not self.done:
            self.done = True
            self.mf.dec_ref(self.fr)


async def _worker(mf: MemoryFile, seed: int, deadline: float, ops: list[int]) -> None:
    rng = random.Random(seed)
    byte = seed % 255 + 1
    mine: list[FileRange] = []
    users: list[_Evictable] = []

    def check(fr: FileRange) -> None:
        for v in mf.map_internal(fr):
            assert v.tobytes().count(byte) == len(v), f"task {seed}: {fr} lost its data"

    def write(fr: FileRange) -> None:
        for v in mf.map_internal(fr, AccessType.WRITE):
            v[:] = bytes([byte]) * len(v)

    while time.monotonic() < deadline:
        op = rng.randrange(12)
        n = rng.randint(1, 16) * P
        mode = rng.choice(list(AllocationMode))
        if op == 0:
            fr = mf.allocate(n, AllocOpts(mode=mode, memcg_id=seed % 3))
        elif op == 1:
            fr = await mf.allocate_async(rng.choice([n, 64 * P]), AllocOpts(mode=mode))
        elif op == 2:
            fr = await mf.allocate_from(_Source(byte, n), n)
            check(fr)
            mine.append(fr)
            continue
        elif op in (3, 4) and mine:
            fr = mine.pop(rng.randrange(len(mine)))
            check(fr)
            if op == 3:
                mf.inc_ref(fr)
                mf.dec_ref(fr)
            mf.dec_ref(fr)
            ops[0] += 1
            continue
        elif op == 5 and mine:
            fr = rng.choice(mine)
            await mf.decommit(fr)
            assert all(v.tobytes().count(0) == len(v) for v in mf.map_internal(fr))
            write(fr)
            ops[0] += 1
            continue
        elif op == 6:
            await mf.update_usage()
            ops[0] += 1
            continue
        elif op == 7:
            fr = mf.allocate(n)
            write(fr)
            u = _Evictable(mf, fr)
            users.append(u)
            mf.mark_evictable(u, EvictableRange(0, n))
            ops[0] += 1
            continue
        elif op == 8:
            mf.start_evictions()
            await mf.wait_for_evictions()
            ops[0] += 1
            continue
        elif op == 9:
            await mf.wait_released()
            ops[0] += 1
            continue
        elif op == 10 and mine:
            check(rng.choice(mine))
            ops[0] += 1
            continue
        else:
            await asyncio.sleep(0)
            continue
        assert all(v.tobytes().count(0) == len(v) for v in mf.map_internal(fr))
        write(fr)
        mine.append(fr)
        ops[0] += 1
        if len(mine) > 8:
            old = mine.pop(0)
            check(old)
            mf.dec_ref(old)
    for fr in mine:
        check(fr)
        mf.dec_ref(fr)
    for u in users:
        mf.mark_all_unevictable(u)
    await mf.wait_for_evictions()
    for u in users:
        if not u.done:
            u.done = True
            mf.dec_ref(u.fr)


async def test_500_tasks_mixing_every_operation() -> None:
    opts = MemoryFileOpts(usage_refresh_interval=0.05)
    async with MemoryFile.open(opts=opts) as mf:
        ops = [0]
        start = time.monotonic()
        deadline = start + LOAD_SECONDS
        results = await asyncio.gather(
            *(_worker(mf, i, deadline, ops) for i in range(TASKS)), return_exceptions=True
        )
        elapsed = time.monotonic() - start
        failed = [r for r in results if isinstance(r, BaseException)]
        assert failed == [], failed[:3]
        mf.check_invariants()
        await mf.wait_released()
        mf.check_invariants()
        st = mf.stats()
        assert st.used_bytes == 0, st
        assert mf.total_usage() == 0
        assert mf.accounting.total() == 0
        print(
            f"\nload: {TASKS} tasks, {ops[0]} operations in {elapsed:.1f} s "
            f"= {ops[0] / elapsed:.0f} ops/s"
        )
