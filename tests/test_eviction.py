"""Evictable users: the four DelayedEviction modes, races with mark_unevictable, failures."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from asyncpgalloc import (
    DelayedEviction,
    EvictableRange,
    InvalidRangeError,
    MemoryFile,
    MemoryFileOpts,
)
from asyncpgalloc.pressure import PressureWatcherError


class Cache:
    """A page-cache-like user that records what it was asked to evict."""

    def __init__(self, gate: asyncio.Event | None = None, fail: bool = False) -> None:
        self.evicted: list[EvictableRange] = []
        self.gate = gate
        self.fail = fail

    async def evict(self, er: EvictableRange) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.evicted.append(er)
        if self.fail:
            raise RuntimeError("evict failed on purpose")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_disabled_evicts_at_once_from_the_end() -> None:
    opts = MemoryFileOpts(delayed_eviction=DelayedEviction.DISABLED)
    async with MemoryFile.open(opts=opts) as mf:
        user = Cache()
        mf.mark_evictable(user, EvictableRange(0, 10))
        mf.mark_evictable(user, EvictableRange(20, 30))
        assert not mf.should_cache_evictable()
        await mf.wait_for_evictions()
        assert user.evicted == [EvictableRange(20, 30), EvictableRange(0, 10)]


@pytest.mark.parametrize("mode", [DelayedEviction.DEFAULT, DelayedEviction.ENABLED])
async def test_enabled_without_pressure_evicts_when_the_releaser_runs_out(
    mode: DelayedEviction,
) -> None:
    async with MemoryFile.open(opts=MemoryFileOpts(delayed_eviction=mode)) as mf:
        user = Cache()
        fr = mf.allocate(4096 * 64)
        mf.dec_ref(fr)  # release work first
        mf.mark_evictable(user, EvictableRange(0, 4096))
        assert user.evicted == []  # nothing synchronous
        await mf.wait_released()
        await settle()
        await mf.wait_for_evictions()
        assert user.evicted == [EvictableRange(0, 4096)]
        assert not mf.should_cache_evictable()


async def test_manual_evicts_only_when_asked() -> None:
    async with MemoryFile.open(opts=MemoryFileOpts(delayed_eviction=DelayedEviction.MANUAL)) as mf:
        user = Cache()
        mf.mark_evictable(user, EvictableRange(0, 100))
        mf.dec_ref(mf.allocate(4096))
        await mf.wait_released()
        await settle()
        assert user.evicted == [] and mf.should_cache_evictable()
        assert mf.start_evictions() is True
        assert mf.start_evictions() is False  # one task per user
        await mf.wait_for_evictions()
        assert user.evicted == [EvictableRange(0, 100)]
        assert mf.start_evictions() is False  # nothing left


async def test_marking_merges_and_unmarking_splits() -> None:
    async with MemoryFile.open(opts=MemoryFileOpts(delayed_eviction=DelayedEviction.MANUAL)) as mf:
        user = Cache()
        mf.mark_evictable(user, EvictableRange(0, 50))
        mf.mark_evictable(user, EvictableRange(25, 100))  # overlap: no effect on the part held
        mf.mark_unevictable(user, EvictableRange(40, 60))
        mf.start_evictions()
        await mf.wait_for_evictions()
        assert user.evicted == [EvictableRange(60, 100), EvictableRange(0, 40)]
        other = Cache()
        mf.mark_evictable(other, EvictableRange(0, 10))
        mf.mark_all_unevictable(other)
        assert mf.start_evictions() is False


async def test_mark_unevictable_racing_an_eviction() -> None:
    gate = asyncio.Event()
    async with MemoryFile.open(opts=MemoryFileOpts(delayed_eviction=DelayedEviction.MANUAL)) as mf:
        user = Cache(gate)
        for start in (0, 100, 200):
            mf.mark_evictable(user, EvictableRange(start, start + 10))
        mf.start_evictions()
        await settle()  # the task is inside evict([200, 210))
        mf.mark_unevictable(user, EvictableRange(0, 150))
        gate.set()
        await mf.wait_for_evictions()
        assert user.evicted == [EvictableRange(200, 210)]
        # The user's state is gone: marking again starts afresh.
        mf.mark_evictable(user, EvictableRange(5, 6))
        mf.start_evictions()
        await mf.wait_for_evictions()
        assert user.evicted[-1] == EvictableRange(5, 6)


async def test_an_evict_that_raises_is_logged_and_eviction_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with MemoryFile.open(opts=MemoryFileOpts(delayed_eviction=DelayedEviction.MANUAL)) as mf:
        user = Cache(fail=True)
        mf.mark_evictable(user, EvictableRange(0, 1))
        mf.mark_evictable(user, EvictableRange(2, 3))
        with caplog.at_level(logging.ERROR, logger="asyncpgalloc"):
            mf.start_evictions()
            await mf.wait_for_evictions()
        assert user.evicted == [EvictableRange(2, 3), EvictableRange(0, 1)]
        assert sum("evict(" in r.getMessage() for r in caplog.records) == 2
        fr = mf.allocate(4096)  # the file still works
        mf.dec_ref(fr)


async def test_a_hanging_evict_is_cancelled_on_close() -> None:
    never = asyncio.Event()
    mf = await MemoryFile.open(
        opts=MemoryFileOpts(delayed_eviction=DelayedEviction.DISABLED, close_timeout=1.0)
    )
    user = Cache(never)
    mf.mark_evictable(user, EvictableRange(0, 1))
    await settle()
    await asyncio.wait_for(mf.aclose(), timeout=5)


async def test_bad_evictable_ranges() -> None:
    async with MemoryFile.open() as mf:
        for bad in (EvictableRange(5, 5), EvictableRange(6, 5), EvictableRange(-1, 5)):
            with pytest.raises(InvalidRangeError):
                mf.mark_evictable(Cache(), bad)


async def test_host_memcg_pressure_starts_evictions() -> None:
    # A real child memory cgroup with a small limit, and a subprocess inside it that
    # allocates past the limit (tests/cgroups.py); removed afterwards, even on failure.
    from cgroups import OOM, make_cgroup, set_v1_limit, spawn, v1_parent, wait_until

    user = Cache()
    with make_cgroup(v1_parent(), set_v1_limit) as group:
        opts = MemoryFileOpts(use_host_memcg_pressure=True, memcg_path=group)
        async with MemoryFile.open(opts=opts) as mf:
            assert mf.should_cache_evictable()
            mf.mark_evictable(user, EvictableRange(0, 4096))
            mf.dec_ref(mf.allocate(4096))
            await mf.wait_released()
            await settle()
            assert user.evicted == []  # no pressure yet: eviction is delayed
            with spawn(OOM, [group]):
                await wait_until(lambda: bool(user.evicted), 20, "evictions started by pressure")
            assert mf.pressure_events >= 1
            assert user.evicted == [EvictableRange(0, 4096)]


async def test_pressure_without_any_mechanism_fails_to_open(tmp_path: Path) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    opts = MemoryFileOpts(use_host_memcg_pressure=True, memcg_path=str(tmp_path))
    with pytest.raises(PressureWatcherError, match=r"memory\.pressure"):
        await MemoryFile.open(opts=opts)
    assert len(os.listdir("/proc/self/fd")) == fds  # the memfd was closed too
