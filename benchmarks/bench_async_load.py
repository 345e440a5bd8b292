"""Async page loading benchmark: ``MemoryFile.load(..., async_pages=True)`` against the
synchronous load and a cold sequential read of the same checkpoint.

The checkpoint: a ``--gib`` GiB memory file (default 4) of 64 MiB allocations, one in four
written with random bytes: ``--gib / 4`` GiB committed, saved once. Per repetition, each
after dropping the page cache (root only; otherwise warm, and the output says so):

- ``read``:        ``cat > /dev/null`` of the checkpoint (1 MiB reads): the disk's speed.
- ``sync_load``:   ``await MemoryFile.load(path)`` until it returns (every page in).
- ``async_return``: ``await MemoryFile.load(path, async_pages=True)`` until it returns.
- ``first_alloc``: from the load call to the first ``allocate`` served after it returns.
- ``range_2mib``:  from the load call to a chosen 2 MiB range (the last committed one)
  readable: ``await mf.wait_loaded(fr)``, the range jumping the queue.
- ``async_total``: from the load call to ``await mf.wait_loaded()`` (every page in).
- loop lag while the async load streams pages in: a task sleeping 1 ms records how late it
  wakes; p99 and max over the whole load, and the same over as long an idle loop just
  before (``idle_lag``: what the machine itself does to the loop; it is shared).
- ``save``: ``await mf.save(path)`` of the file (1/4 committed) against ``fsync_write``,
  a ``cp``-style write of as many bytes from a memfd to a new file on the same disk,
  fsynced, in the same repetition.

Each figure is the median of ``--reps`` (>= 5) repetitions; throughput ratios are medians of
per-repetition ratios against the read in the same repetition. One JSON line per figure,
then a table.

Run: python benchmarks/bench_async_load.py [--dir /tmp] [--reps 5] [--gib 4] [--loop uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Any

import uvloop
from bench_checkpoint import cat_read, cp_write, drop_caches

from asyncpgalloc import PAGE_SIZE, AccessType, AllocationMode, AllocOpts, FileRange, MemoryFile

MiB = 1 << 20
PIECE = 64 * MiB


async def build(path: str, gib: int) -> tuple[FileRange, bytes]:
    """Save the checkpoint; returns the chosen 2 MiB range and its expected bytes."""
    pattern = os.urandom(PIECE)
    last = FileRange(0, 0)
    async with MemoryFile.open() as mf:
        for i in range(gib * 1024 * MiB // PIECE):
            if i % 4:
                mf.allocate(PIECE)
                continue
            fr = await mf.allocate_async(PIECE, AllocOpts(mode=AllocationMode.WRITE_POPULATE))
            for view in mf.map_internal(fr, AccessType.WRITE):
                view[:] = pattern[: len(view)]
            last = fr
        await mf.save(path)
    chosen = FileRange(last.end - 2 * MiB, last.end)
    return chosen, pattern[PIECE - 2 * MiB :]


def fsync_write(size: int, path: str) -> float:
    """Seconds to write ``size`` bytes from a memfd's page cache to a new file at ``path``
    and fsync it, as ``cp`` would (1 MiB writes)."""
    fd = os.memfd_create("bench", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, os.urandom(MiB), 0)  # not all holes
        return cp_write(fd, size, path, True)
    finally:
        os.close(fd)


class Lag:
    """A task sleeping 1 ms in a loop, recording how late it wakes."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._stop = False
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while not self._stop:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            self.lags.append(time.perf_counter() - t0 - 0.001)

    async def stop(self) -> tuple[float, float]:
        self._stop = True
        await self._task
        lags = sorted(self.lags) or [0.0]
        return lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1e3, lags[-1] * 1e3


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every repetition's figures: ``times`` (seconds by op), ``vs_read`` (per-repetition
    ratios), ``lag_p99``/``lag_max``/``idle_p99``/``idle_max`` (ms), ``size``,
    ``dropped`` (whether the page cache could be dropped)."""
    path = os.path.join(args.dir, "bench_async_load.ckpt")
    times: dict[str, list[float]] = {
        k: []
        for k in (
            "read",
            "sync_load",
            "async_return",
            "first_alloc",
            "range_2mib",
            "async_total",
            "fsync_write",
            "save",
        )
    }
    lag_p99: list[float] = []
    lag_max: list[float] = []
    idle_p99: list[float] = []
    idle_max: list[float] = []
    vs_read: dict[str, list[float]] = {"sync_load": [], "async_total": [], "save": []}
    dropped = True
    chosen, expected = await build(path, args.gib)
    size = os.stat(path).st_size
    try:
        for rep in range(args.reps):
            dropped = drop_caches() and dropped
            r = cat_read(path)
            dropped = drop_caches() and dropped
            t0 = time.perf_counter()
            mf = await MemoryFile.load(path)
            sync = time.perf_counter() - t0
            await mf.aclose()
            dropped = drop_caches() and dropped
            lag = Lag()
            await asyncio.sleep(max(sync, 0.2))  # the idle loop, as long as a load
            ip99, imx = await lag.stop()
            lag = Lag()
            await asyncio.sleep(0.005)
            lag.lags.clear()
            t0 = time.perf_counter()
            mf = await MemoryFile.load(path, async_pages=True)
            ret = time.perf_counter() - t0
            mf.dec_ref(mf.allocate(PAGE_SIZE))
            alloc = time.perf_counter() - t0
            await mf.wait_loaded(chosen)
            rng = time.perf_counter() - t0
            got = b"".join(v.tobytes() for v in mf.map_internal(chosen))
            await mf.wait_loaded()
            total = time.perf_counter() - t0
            p99, mx = await lag.stop()
            assert got == expected, "the chosen range holds the wrong bytes"
            # Saving it back, against an fsynced sequential write of as many bytes.
            out = os.path.join(args.dir, "bench_async_load.out")
            w = fsync_write(size, out)
            os.unlink(out)
            t0 = time.perf_counter()
            await mf.save(out)
            saved = time.perf_counter() - t0
            os.unlink(out)
            await mf.aclose()
            for k, v in (
                ("read", r),
                ("sync_load", sync),
                ("async_return", ret),
                ("first_alloc", alloc),
                ("range_2mib", rng),
                ("async_total", total),
                ("fsync_write", w),
                ("save", saved),
            ):
                times[k].append(v)
            vs_read["sync_load"].append(r / sync)
            vs_read["async_total"].append(r / total)
            vs_read["save"].append(w / saved)
            lag_p99.append(p99)
            lag_max.append(mx)
            idle_p99.append(ip99)
            idle_max.append(imx)
            print(
                f"rep {rep}: read {r:.3f}s sync {sync:.3f}s async return {ret * 1e3:.2f}ms "
                f"alloc {alloc * 1e3:.2f}ms range {rng * 1e3:.1f}ms total {total:.3f}s "
                f"lag p99 {p99:.2f}ms max {mx:.2f}ms (idle {ip99:.2f} / {imx:.2f}ms) "
                f"write {w:.3f}s save {saved:.3f}s",
                file=sys.stderr,
                flush=True,
            )
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return {
        "times": times,
        "vs_read": vs_read,
        "lag_p99": lag_p99,
        "lag_max": lag_max,
        "idle_p99": idle_p99,
        "idle_max": idle_max,
        "size": size,
        "dropped": dropped,
    }


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    m = await measure(args)
    times: dict[str, list[float]] = m["times"]
    vs_read: dict[str, list[float]] = m["vs_read"]
    lag_p99, lag_max = m["lag_p99"], m["lag_max"]
    idle_p99, idle_max = m["idle_p99"], m["idle_max"]
    size, dropped = m["size"], m["dropped"]
    out: list[dict[str, Any]] = []
    for op, ts in times.items():
        med = statistics.median(ts)
        rec: dict[str, Any] = {
            "bench": "async_load",
            "op": op,
            "checkpoint_bytes": size,
            "file_gib": args.gib,
            "reps": len(ts),
            "median_ms": round(med * 1e3, 3),
            "min_ms": round(min(ts) * 1e3, 3),
            "max_ms": round(max(ts) * 1e3, 3),
            "page_cache_dropped": dropped,
            "loop": args.loop,
        }
        if op in vs_read:
            rec["vs_read"] = round(statistics.median(vs_read[op]), 3)
        out.append(rec)
    out.append(
        {
            "bench": "async_load",
            "op": "loop_lag",
            "p99_ms": round(statistics.median(lag_p99), 3),
            "max_ms": round(statistics.median(lag_max), 3),
            "worst_max_ms": round(max(lag_max), 3),
            "idle_p99_ms": round(statistics.median(idle_p99), 3),
            "idle_max_ms": round(statistics.median(idle_max), 3),
            "loop": args.loop,
        }
    )
    for rec in out:
        print(json.dumps(rec), flush=True)
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'op':<13} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'vs read':>8}"]
    for r in results[:-1]:
        ratio = f"{r['vs_read']:.2f}" if "vs_read" in r else ""
        lines.append(
            f"{r['op']:<13} {r['median_ms']:>10.2f} {r['min_ms']:>9.2f} {r['max_ms']:>9.2f} "
            f"{ratio:>8}"
        )
    lag = results[-1]
    lines.append(
        f"loop lag during the async load: p99 {lag['p99_ms']:.2f} ms, max {lag['max_ms']:.2f} ms "
        f"(median of reps; worst {lag['worst_max_ms']:.2f} ms); idle loop in the same reps: "
        f"p99 {lag['idle_p99_ms']:.2f} ms, max {lag['idle_max_ms']:.2f} ms"
    )
    if not results[0]["page_cache_dropped"]:
        lines.append("(page cache NOT dropped: reads and loads were warm)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp", help="where the checkpoint goes")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--gib", type=int, default=4, help="memory file size (1/4 committed)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    if args.reps < 5:
        parser.error("--reps must be >= 5 (medians of fewer are noise)")
    if args.gib < 1:
        parser.error("--gib must be >= 1")
    factory = uvloop.new_event_loop if args.loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        results = runner.run(run(args))
    print(table(results))


if __name__ == "__main__":
    main()
