"""Allocator core benchmark: allocate + dec_ref, and churn at 1k / 100k live allocations.

Each scenario runs ``--reps`` times (>= 5) and reports the median, min and max in µs per
operation, as JSON lines followed by a table. Release work counts: every timed loop gives
the loop a turn every 64 operations and ends with ``await mf.wait_released()``.

Baseline, measured in the same run: a bump allocator over a dict (one dict insert and
one pop per allocation), the floor of any pure-Python bookkeeping.

Run: python benchmarks/bench_core.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import uvloop

from asyncpgalloc import PAGE_SIZE, FileRange, MemoryFile

P = PAGE_SIZE


async def alloc_free(mf: MemoryFile, ops: int) -> float:
    t0 = time.perf_counter()
    for i in range(ops):
        mf.dec_ref(mf.allocate(P))
        if i % 64 == 63:
            await asyncio.sleep(0)
    await mf.wait_released()
    return time.perf_counter() - t0


def _churn(live: int, ops: int) -> Callable[[MemoryFile], Awaitable[float]]:
    async def run(mf: MemoryFile) -> float:
        rng = random.Random(live)
        frs: list[FileRange] = [mf.allocate(rng.randint(1, 16) * P) for _ in range(live)]
        await mf.wait_released()
        t0 = time.perf_counter()
        for i in range(ops):
            j = rng.randrange(live)
            mf.dec_ref(frs[j])
            frs[j] = mf.allocate(rng.randint(1, 16) * P)
            if i % 64 == 63:
                await asyncio.sleep(0)
        await mf.wait_released()
        return time.perf_counter() - t0

    return run


async def baseline_dict_bump(ops: int) -> float:
    owned: dict[int, int] = {}
    top = 0
    t0 = time.perf_counter()
    for i in range(ops):
        owned[top] = P
        owned.pop(top)
        top += P
        if i % 64 == 63:
            await asyncio.sleep(0)
    return time.perf_counter() - t0


async def measure(
    name: str, ops: int, reps: int, fn: Callable[[MemoryFile], Awaitable[float]] | None
) -> dict[str, object]:
    samples = []
    for _ in range(reps):
        if fn is None:
            seconds = await baseline_dict_bump(ops)
        else:
            async with MemoryFile.open() as mf:
                seconds = await fn(mf)
        samples.append(seconds / ops * 1e6)
    return {
        "scenario": name,
        "ops": ops,
        "reps": reps,
        "median_us_per_op": round(statistics.median(samples), 3),
        "min_us_per_op": round(min(samples), 3),
        "max_us_per_op": round(max(samples), 3),
    }


async def main(quick: bool, reps: int) -> None:
    ops = 5_000 if quick else 50_000
    big_live = 20_000 if quick else 100_000
    scenarios: list[tuple[str, Callable[[MemoryFile], Awaitable[float]] | None]] = [
        ("baseline_dict_bump", None),
        ("a_allocate_4k_dec_ref", lambda mf: alloc_free(mf, ops)),
        ("b_churn_1k_live", _churn(1_000, ops)),
        (f"b_churn_{big_live // 1000}k_live", _churn(big_live, ops)),
    ]
    results = [await measure(name, ops, reps, fn) for name, fn in scenarios]
    base = results[0]["median_us_per_op"]
    assert isinstance(base, float)
    for r in results:
        median = r["median_us_per_op"]
        assert isinstance(median, float)
        r["ratio_to_baseline"] = round(median / base, 1)
        print(json.dumps(r))
    print(f"\n{'scenario':28} {'median µs/op':>13} {'min':>8} {'max':>8} {'x baseline':>11}")
    for r in results:
        print(
            f"{r['scenario']!s:28} {r['median_us_per_op']!s:>13} {r['min_us_per_op']!s:>8} "
            f"{r['max_us_per_op']!s:>8} {r['ratio_to_baseline']!s:>11}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer operations (~20 s)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (>= 5)")
    args = parser.parse_args()
    if args.reps < 5:
        sys.exit("--reps must be at least 5: medians of fewer are noise here")
    uvloop.run(main(args.quick, args.reps))
