"""Event-loop lag while the file does heavy blocking work.

A ticker task sleeps 1 ms in a loop and records how late it wakes. Scenarios:

- ``release_4g``: the releaser punches 4 GiB of committed waste;
- ``commit_4g``: ``allocate_async`` commits 4 GiB (64 allocations of 64 MiB);
- ``scan_1g_every_other_page``: ``update_usage`` over 1 GiB with every other page touched.

Baseline, in the same run: the ticker alone on an idle loop. Each scenario runs
``--reps`` times (>= 5); the JSON lines give the median over repetitions of each
repetition's p99 and max lag (ms), then a table. Needs ~4 GiB of free memory.

Run: python benchmarks/bench_loop_lag.py [--quick] [--loop asyncio|uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import uvloop

from asyncpgalloc import CHUNK_SIZE, PAGE_SIZE, AllocationMode, AllocOpts, MemoryFile

MiB = 1 << 20
GiB = 1 << 30


class Ticker:
    def __init__(self) -> None:
        self.lags: list[float] = []
        self._stop = False
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            self.lags.append(time.perf_counter() - t0 - 0.001)

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.ensure_future(self._run())
        await asyncio.sleep(0.01)
        self.lags.clear()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop = True
        assert self._task is not None
        await self._task

    def p99_max_ms(self) -> tuple[float, float]:
        lags = sorted(self.lags) or [0.0]
        return lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1e3, lags[-1] * 1e3


Scenario = Callable[[MemoryFile, Ticker], Awaitable[None]]


def release(total: int) -> Scenario:
    async def run(mf: MemoryFile, ticker: Ticker) -> None:
        frs = [
            await mf.allocate_async(64 * MiB, AllocOpts(mode=AllocationMode.COMMIT))
            for _ in range(total // (64 * MiB))
        ]
        async with ticker:
            for fr in frs:
                mf.dec_ref(fr)
            await mf.wait_released()

    return run


def commit(total: int) -> Scenario:
    async def run(mf: MemoryFile, ticker: Ticker) -> None:
        async with ticker:
            frs = [
                await mf.allocate_async(64 * MiB, AllocOpts(mode=AllocationMode.COMMIT))
                for _ in range(total // (64 * MiB))
            ]
        for fr in frs:
            mf.dec_ref(fr)
        await mf.wait_released()

    return run


def scan(size: int) -> Scenario:
    async def run(mf: MemoryFile, ticker: Ticker) -> None:
        fr = mf.allocate(size)
        for view in mf.map_internal(fr):
            for off in range(0, len(view), 2 * PAGE_SIZE):
                view[off] = 1
            del view
        await asyncio.sleep(0.05)
        async with ticker:
            await mf.update_usage()
        assert mf.known_committed_bytes == size // 2
        mf.dec_ref(fr)
        await mf.wait_released()

    return run


async def idle(mf: MemoryFile, ticker: Ticker) -> None:
    async with ticker:
        await asyncio.sleep(0.5)


async def measure(name: str, fn: Scenario, reps: int) -> dict[str, object]:
    p99s, maxes, seconds = [], [], []
    for _ in range(reps):
        async with MemoryFile.open() as mf:
            ticker = Ticker()
            t0 = time.perf_counter()
            await fn(mf, ticker)
            seconds.append(time.perf_counter() - t0)
            p99, mx = ticker.p99_max_ms()
            p99s.append(p99)
            maxes.append(mx)
    return {
        "scenario": name,
        "reps": reps,
        "median_p99_lag_ms": round(statistics.median(p99s), 3),
        "median_max_lag_ms": round(statistics.median(maxes), 3),
        "worst_max_lag_ms": round(max(maxes), 3),
        "median_seconds": round(statistics.median(seconds), 3),
    }


async def main(quick: bool, reps: int) -> None:
    total = 1 * GiB if quick else 4 * GiB
    scan_size = CHUNK_SIZE // 4 if quick else CHUNK_SIZE
    scenarios: list[tuple[str, Scenario]] = [
        ("baseline_idle_loop", idle),
        (f"release_{total // GiB}g", release(total)),
        (f"commit_{total // GiB}g", commit(total)),
        (f"scan_{scan_size // MiB}m_every_other_page", scan(scan_size)),
    ]
    results = [await measure(name, fn, reps) for name, fn in scenarios]
    for r in results:
        print(json.dumps(r))
    print(f"\n{'scenario':34} {'p99 ms':>8} {'max ms':>8} {'worst max':>10} {'seconds':>8}")
    for r in results:
        print(
            f"{r['scenario']!s:34} {r['median_p99_lag_ms']!s:>8} {r['median_max_lag_ms']!s:>8} "
            f"{r['worst_max_lag_ms']!s:>10} {r['median_seconds']!s:>8}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 GiB and 256 MiB instead")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    args = parser.parse_args()
    if args.reps < 5:
        sys.exit("--reps must be at least 5: medians of fewer are noise here")
    runner = uvloop.run if args.loop == "uvloop" else asyncio.run
    runner(main(args.quick, args.reps))
