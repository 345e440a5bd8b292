"""asyncpgalloc benchmark suite: gVisor's pgalloc figures, the raw syscalls, and the event loop.

Scenarios (the names are stable; ``--only`` takes their letters or full names):

- ``a``  allocate 4 KiB + dec_ref, repeated;
- ``b``  churn: dec_ref a random live allocation, allocate a random 4-64 KiB one, with
  1k / 100k / 1M allocations live;
- ``c``  allocate 2 MiB huge + dec_ref, repeated (a file expecting huge pages);
- ``d``  commit 64 MiB (``allocate_async`` COMMIT), release 64 MiB (``dec_ref`` until
  ``wait_released``), populate 64 MiB (``allocate_async`` WRITE_POPULATE), each against
  the raw syscall (``fallocate``, punch hole, ``MADV_POPULATE_WRITE``) timed in the same
  repetition;
- ``e``  ``update_usage`` over 1 GiB, first half touched / every other page touched,
  against a raw ``mincore`` of the same mapping;
- ``lag`` event-loop lag (a 1 ms ticker) while the file releases, commits and scans;
- ``scrape`` event-loop lag while the Prometheus metrics are rendered at 10 Hz
  (``render_metrics``) with 100k allocations live, against the idle loop's lag measured
  in the same repetition (also run by ``lag``);
- ``heap`` Python heap bytes per live allocation (``tracemalloc``) at 100k and 1M live;
- ``restore`` async restore (``bench_async_load.py``): a 4 GiB file with 1 GiB committed
  (1 GiB with ``--quick``), page cache dropped: load to the first allocation and to a
  chosen 2 MiB range, total throughput against a cold sequential read, loop lag while
  loading against the idle loop's, and save against an fsynced sequential write, all in
  the same repetitions (asyncio loop).
- ``guests`` a real guest process's request round trip (p50, p99) and requests per second
  at 1 and 32 guests, against an echo server of the same framing (``bench_guests.py``).

Rules every timed loop follows: the event loop gets a turn at least every 64 operations,
and a scenario that frees ends with ``await mf.wait_released()`` inside the timing, so
release work counts. Each scenario runs ``--reps`` (>= 5) timed repetitions after one
untimed warm-up where that matters, and reports the median, min and max. Throughputs
(GB/s) are medians of per-repetition figures; ratios against the raw syscall are medians
of per-repetition ratios (the two are timed back to back, so machine noise mostly
cancels).

Both page-state cores run in the same invocation: this process runs every scenario on the
core it imported (the compiled one unless ``ASYNCPGALLOC_NO_EXTENSIONS=1``), then a child
process with ``ASYNCPGALLOC_NO_EXTENSIONS=1`` runs the bookkeeping scenarios (a, b, c, e,
heap, lag and scrape) on the pure-Python core (``--cores current`` skips it).

The Go baseline is gVisor's own pgalloc run in the same invocation: ``--go auto`` (the
default) builds it with ``../shared/gobench/build.sh`` (Debian's Go and gVisor packages; the
script installs them when missing; ``GOBENCH_BUILD`` names another script) and runs it
``--reps`` times with this run's operation counts; a, b, c and e are compared with the
medians of those runs. When it cannot be built or run (or with ``--go fixed``), the fixed
GO_REF table (gVisor on a machine of this kind, issue 6) is used instead; every result's
JSON says which (``go_source``). The d scenarios always use GO_REF.

Output: one JSON object per scenario and core on stdout as it finishes, then a table with,
per scenario, the compiled and the pure-Python core's medians, Go's figure, each core's
ratio to it and issue 13's target (judged on the compiled core). ``--json PATH`` also
writes the list of objects to PATH. ``--quick`` uses fewer operations, skips the 1M live
sizes and measures the heap at 30k live.

Run: python benchmarks/run.py [--quick] [--json out.json] [--reps N] [--only a,b,...]
     [--cores both|current] [--go auto|fixed]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from asyncpgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    AccessType,
    AllocationMode,
    AllocOpts,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    core_implementation,
    host,
)

P = PAGE_SIZE
MiB = 1 << 20
GiB = 1 << 30

#: gVisor's Go pgalloc on a 2-core machine of this kind (the brief of issue 6).
GO_REF: dict[str, float] = {
    "a": 0.29,  # µs/op
    "b_1k": 1.0,
    "b_100k": 2.1,
    "b_1m": 2.5,
    "c": 0.26,
    "d_commit": 15.0,  # GB/s
    "d_release": 12.8,
    "e_first_half": 1.4,  # ms
    "e_every_other": 41.0,
}

#: The Go figures this run compares with: GO_REF, or (see :func:`measure_go`) the medians
#: of gVisor's pgalloc run in this invocation for the keys it measured.
GO: dict[str, float] = dict(GO_REF)
#: Per key of GO: "same-run" or "GO_REF".
GO_SOURCE: dict[str, str] = dict.fromkeys(GO_REF, "GO_REF")

COMMIT = AllocOpts(mode=AllocationMode.COMMIT)
POPULATE = AllocOpts(mode=AllocationMode.WRITE_POPULATE)
HUGE = AllocOpts(huge=True)


@dataclass
class Result:
    """One scenario's figures; ``to_json`` gives the object printed and saved."""

    scenario: str
    unit: str
    samples: list[float]
    params: dict[str, Any] = field(default_factory=dict)
    go: float | None = None
    #: The key of GO that ``go`` came from (its source is GO_SOURCE[go_key]).
    go_key: str | None = None
    #: "time" (lower is better) or "rate" (higher is better): how ratios are taken.
    sense: str = "time"
    raw_samples: list[float] | None = None
    raw_what: str | None = None
    #: Per-repetition ours/raw throughput ratios (or raw/ours time ratios).
    raw_ratios: list[float] | None = None
    target: str | None = None
    target_met: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def ratio_to_go(self) -> float | None:
        """How many times slower than gVisor (>1 = slower)."""
        if self.go is None:
            return None
        return self.median / self.go if self.sense == "time" else self.go / self.median

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "scenario": self.scenario,
            # Which page-state core ran (ASYNCPGALLOC_NO_EXTENSIONS=1 selects "python").
            "core": core_implementation(),
            "unit": self.unit,
            "reps": len(self.samples),
            "median": _r(self.median),
            "min": _r(min(self.samples)),
            "max": _r(max(self.samples)),
            "params": self.params,
        }
        if self.go is not None:
            out["go_reference"] = _r(self.go)
            out["go_source"] = GO_SOURCE.get(self.go_key or "", "GO_REF")
            out["x_slower_than_go"] = _r(self.ratio_to_go())
        if self.raw_samples is not None:
            out["raw"] = {
                "what": self.raw_what,
                "median": _r(statistics.median(self.raw_samples)),
                "min": _r(min(self.raw_samples)),
                "max": _r(max(self.raw_samples)),
            }
        if self.raw_ratios is not None:
            out["fraction_of_raw"] = _r(statistics.median(self.raw_ratios))
        if self.target is not None:
            out["target"] = self.target
            out["target_met"] = self.target_met
        out.update(self.extra)
        return out


def _r(x: float | None) -> float | None:
    if x is None:
        return None
    return float(f"{x:.4g}")


# --------------------------------------------------------------------------- helpers


async def _yielding_ops(n: int, op: Callable[[], None]) -> None:
    """Run ``op`` n times, giving the loop a turn every 64 operations."""
    sleep = asyncio.sleep
    for i in range(n):
        op()
        if i & 63 == 63:
            await sleep(0)


def _hygiene() -> None:
    gc.collect()


def _against_go(r: Result, key: str, limit: float) -> Result:
    """Give ``r`` the Go figure GO[key] and issue 13's target: at most ``limit`` times Go."""
    r.go, r.go_key = GO[key], key
    r.target = f"<= {limit:g}x Go"
    ratio = r.ratio_to_go()
    r.target_met = ratio is not None and ratio <= limit
    return r


# -------------------------------------------------------------------- a, b, c: bookkeeping


async def scenario_alloc_free(
    name: str, ops: int, reps: int, length: int, opts: AllocOpts, file_opts: MemoryFileOpts
) -> list[float]:
    """µs per allocate + dec_ref, release included; one warm-up repetition."""
    samples: list[float] = []
    async with MemoryFile.open(opts=file_opts) as mf:
        allocate, dec_ref = mf.allocate, mf.dec_ref
        for rep in range(reps + 1):
            _hygiene()
            t0 = time.perf_counter()
            for i in range(ops):
                dec_ref(allocate(length, opts))
                if i & 63 == 63:
                    await asyncio.sleep(0)
            await mf.wait_released()
            dt = time.perf_counter() - t0
            if rep:
                samples.append(dt / ops * 1e6)
    return samples


async def scenario_churn(live: int, ops: int, reps: int) -> tuple[list[float], dict[str, Any]]:
    """µs per (dec_ref a random live allocation + allocate 1-16 pages), release included."""
    rng = random.Random(live)
    samples: list[float] = []
    async with MemoryFile.open() as mf:
        allocate, dec_ref = mf.allocate, mf.dec_ref
        t0 = time.perf_counter()
        frs: list[FileRange] = []
        for i in range(live):
            frs.append(allocate(rng.randint(1, 16) * P))
            if i & 63 == 63:
                await asyncio.sleep(0)
        await mf.wait_released()
        setup = time.perf_counter() - t0
        randrange, randint = rng.randrange, rng.randint
        for rep in range(reps + 1):
            _hygiene()
            t0 = time.perf_counter()
            for i in range(ops):
                j = randrange(live)
                dec_ref(frs[j])
                frs[j] = allocate(randint(1, 16) * P)
                if i & 63 == 63:
                    await asyncio.sleep(0)
            await mf.wait_released()
            dt = time.perf_counter() - t0
            if rep:
                samples.append(dt / ops * 1e6)
        extra = {
            "setup_us_per_alloc": _r(setup / live * 1e6),
            "file_gib": mf.total_size() // GiB,
            "segments_unfree": len(mf.page_view().unfree_small),
        }
    return samples, extra


# ------------------------------------------------------------------- d: bytes moved


@dataclass
class RawFile:
    """A second memfd with one mapping, for the raw syscall baselines."""

    fd: int
    mapping: host.ChunkMapping

    @classmethod
    def open(cls, size: int) -> RawFile:
        fd = host.create_memfd("asyncpgalloc-bench-raw")
        host.set_file_size(fd, size)
        return cls(fd, host.ChunkMapping(fd, 0, size))

    def close(self) -> None:
        self.mapping.release()
        os.close(self.fd)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


async def _timed_async(aw: Callable[[], Awaitable[object]]) -> float:
    t0 = time.perf_counter()
    await aw()
    return time.perf_counter() - t0


async def scenario_bytes(reps: int, size: int) -> list[Result]:
    """Commit, release and populate ``size`` bytes, each against the raw syscall."""
    gbs = size / 1e9
    commit_s: list[float] = []
    raw_commit_s: list[float] = []
    release_s: list[float] = []
    raw_punch_s: list[float] = []
    populate_s: list[float] = []
    raw_populate_s: list[float] = []
    raw = RawFile.open(size)
    try:
        async with MemoryFile.open() as mf:
            # Warm up: grow the file and map it once.
            mf.dec_ref(await mf.allocate_async(size))
            await mf.wait_released()
            for rep in range(reps + 1):
                _hygiene()
                # Commit: ours, then raw, on uncommitted pages.
                fr: FileRange | None = None

                async def commit() -> None:
                    nonlocal fr
                    fr = await mf.allocate_async(size, COMMIT)

                c = await _timed_async(commit)
                rc = _timed(lambda: host.commit(raw.fd, 0, size))
                assert fr is not None

                # Release: dec_ref until the releaser has punched it; then raw punch.
                async def release(done: FileRange = fr) -> None:
                    mf.dec_ref(done)
                    await mf.wait_released()

                r = await _timed_async(release)
                rp = _timed(lambda: host.decommit(raw.fd, 0, size))
                # Populate (MADV_POPULATE_WRITE through our mapping), then raw.
                fr = None

                async def populate() -> None:
                    nonlocal fr
                    fr = await mf.allocate_async(size, POPULATE)

                p = await _timed_async(populate)
                rpop = _timed(
                    lambda: host.madvise(raw.mapping.addr, size, host.MADV_POPULATE_WRITE)
                )
                assert fr is not None
                mf.dec_ref(fr)
                await mf.wait_released()
                host.decommit(raw.fd, 0, size)
                if rep:
                    commit_s.append(c)
                    raw_commit_s.append(rc)
                    release_s.append(r)
                    raw_punch_s.append(rp)
                    populate_s.append(p)
                    raw_populate_s.append(rpop)
    finally:
        raw.close()

    def rate(xs: list[float]) -> list[float]:
        return [gbs / x for x in xs]

    def ratios(ours: list[float], raw_: list[float]) -> list[float]:
        return [r / o for o, r in zip(ours, raw_, strict=True)]

    mib = size // MiB
    out = []
    for name, ours, raw_, what, go in (
        (f"d_commit_{mib}m", commit_s, raw_commit_s, "fallocate", GO_REF["d_commit"]),
        (f"d_release_{mib}m", release_s, raw_punch_s, "fallocate PUNCH_HOLE", GO_REF["d_release"]),
        (f"d_populate_{mib}m", populate_s, raw_populate_s, "MADV_POPULATE_WRITE", None),
    ):
        res = Result(
            name,
            "GB/s",
            rate(ours),
            {"bytes": size},
            go=go,
            sense="rate",
            raw_samples=rate(raw_),
            raw_what=what,
            raw_ratios=ratios(ours, raw_),
            target=">= 0.9 of raw",
        )
        res.target_met = statistics.median(res.raw_ratios or [0.0]) >= 0.9
        out.append(res)
    return out


# ---------------------------------------------------------------------- e: usage scan


def _touch(mf: MemoryFile, fr: FileRange, pattern: str) -> None:
    if pattern == "first_half":
        for addr, n in mf._map.address_pieces(FileRange(fr.start, fr.start + fr.length // 2)):
            host.madvise(addr, n, host.MADV_POPULATE_WRITE)
        return
    for view in mf.map_internal(fr, AccessType.WRITE):
        for off in range(0, len(view), 2 * P):
            view[off] = 1
        view.release()


async def scenario_scan(reps: int, size: int, pattern: str) -> Result:
    samples: list[float] = []
    raw_samples: list[float] = []
    ratios: list[float] = []
    for rep in range(reps + 1):
        _hygiene()
        async with MemoryFile.open() as mf:
            fr = mf.allocate(size)
            _touch(mf, fr, pattern)
            t = await _timed_async(mf.update_usage)
            want = size // 2
            if mf.known_committed_bytes != want:
                raise AssertionError(f"scan found {mf.known_committed_bytes}, want {want}")
            addr = mf._map.address(fr.start)
            buf = bytearray(size // P)
            rt = _timed(lambda: host.mincore(addr, size, buf))  # noqa: B023
            if rep:
                samples.append(t * 1e3)
                raw_samples.append(rt * 1e3)
                ratios.append(rt / t)
            mf.dec_ref(fr)
            await mf.wait_released()
    key = "e_first_half" if pattern == "first_half" else "e_every_other"
    res = Result(
        f"e_update_usage_{size // MiB}m_{pattern}",
        "ms",
        samples,
        {"bytes": size},
        raw_samples=raw_samples,
        raw_what="mincore",
        raw_ratios=ratios,
    )
    return _against_go(res, key, 1.5)


# -------------------------------------------------------------------- event-loop lag


class Ticker:
    """Sleeps 1 ms in a loop and records how late it wakes."""

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
        await asyncio.sleep(0.005)
        self.lags.clear()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop = True
        assert self._task is not None
        await self._task

    def p99_max_ms(self) -> tuple[float, float]:
        lags = sorted(self.lags) or [0.0]
        return lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1e3, lags[-1] * 1e3


LagScenario = Callable[[MemoryFile, Ticker], Awaitable[None]]


def lag_release(total: int) -> LagScenario:
    async def run(mf: MemoryFile, ticker: Ticker) -> None:
        frs = [await mf.allocate_async(64 * MiB, COMMIT) for _ in range(total // (64 * MiB))]
        async with ticker:
            for fr in frs:
                mf.dec_ref(fr)
            await mf.wait_released()

    return run


def lag_commit(total: int) -> LagScenario:
    async def run(mf: MemoryFile, ticker: Ticker) -> None:
        async with ticker:
            frs = [await mf.allocate_async(64 * MiB, COMMIT) for _ in range(total // (64 * MiB))]
        for fr in frs:
            mf.dec_ref(fr)
        await mf.wait_released()

    return run


def lag_scan(size: int) -> LagScenario:
    async def run(mf: MemoryFile, ticker: Ticker) -> None:
        fr = mf.allocate(size)
        _touch(mf, fr, "every_other")
        async with ticker:
            await mf.update_usage()
        assert mf.known_committed_bytes == size // 2
        mf.dec_ref(fr)
        await mf.wait_released()

    return run


def lag_release_small(count: int) -> LagScenario:
    """Many small committed allocations freed 64 at a time: bookkeeping-heavy release."""

    async def run(mf: MemoryFile, ticker: Ticker) -> None:
        rng = random.Random(count)
        frs = [mf.allocate(rng.randint(1, 4) * P) for _ in range(count)]
        rng.shuffle(frs)
        async with ticker:
            await _yielding_ops(len(frs), lambda: mf.dec_ref(frs.pop()))
            await mf.wait_released()

    return run


async def lag_idle(mf: MemoryFile, ticker: Ticker) -> None:
    async with ticker:
        await asyncio.sleep(0.3)


async def scenario_lag(name: str, fn: LagScenario, reps: int) -> list[Result]:
    p99s: list[float] = []
    maxes: list[float] = []
    seconds: list[float] = []
    for _ in range(reps):
        _hygiene()
        async with MemoryFile.open() as mf:
            ticker = Ticker()
            t0 = time.perf_counter()
            await fn(mf, ticker)
            seconds.append(time.perf_counter() - t0)
            p99, mx = ticker.p99_max_ms()
            p99s.append(p99)
            maxes.append(mx)
    r99 = Result(f"lag_{name}_p99", "ms", p99s, target="< 1 ms")
    r99.target_met = r99.median < 1.0
    rmax = Result(
        f"lag_{name}_max",
        "ms",
        maxes,
        target="< 5 ms",
        extra={"scenario_seconds_median": _r(statistics.median(seconds))},
    )
    rmax.target_met = rmax.median < 5.0
    if name == "idle":
        r99.target = rmax.target = None
        r99.target_met = rmax.target_met = None
    return [r99, rmax]


async def scenario_scrape_lag(live: int, seconds: float, reps: int) -> list[Result]:
    """Loop lag while ``render_metrics`` runs at 10 Hz with ``live`` allocations of 1-16
    pages live, and the idle loop's lag with the same file, measured just before."""
    from asyncpgalloc.metrics import render_metrics

    figures: dict[str, list[float]] = {k: [] for k in ("p99", "max", "idle_p99", "idle_max")}
    scrape_ms: list[float] = []
    scrapes = max(1, round(seconds * 10))
    for rep in range(reps):
        rng = random.Random(rep)
        async with MemoryFile.open() as mf:
            frs = [mf.allocate(rng.randint(1, 16) * P) for _ in range(live)]
            # Some waste released and some free gaps, as a live file has.
            for j in rng.sample(range(live), live // 10):
                mf.dec_ref(frs[j])
            await mf.wait_released()
            _hygiene()
            idle = Ticker()
            async with idle:
                await asyncio.sleep(seconds)
            ticker = Ticker()
            async with ticker:
                for _ in range(scrapes):
                    t0 = time.perf_counter()
                    body = render_metrics(mf)
                    scrape_ms.append((time.perf_counter() - t0) * 1e3)
                    await asyncio.sleep(0.1)
            assert b"asyncpgalloc_bytes" in body
        for key, t in (("", ticker), ("idle_", idle)):
            p99, mx = t.p99_max_ms()
            figures[f"{key}p99"].append(p99)
            figures[f"{key}max"].append(mx)
    name = f"lag_scrape_10hz_{_k(live)}_live"
    params = {"live": live, "scrapes_per_rep": scrapes}
    extra = {
        "scrape_ms_median": _r(statistics.median(scrape_ms)),
        "scrape_ms_max": _r(max(scrape_ms)),
        "idle_p99_ms_median": _r(statistics.median(figures["idle_p99"])),
        "idle_max_ms_median": _r(statistics.median(figures["idle_max"])),
    }
    r99 = Result(f"{name}_p99", "ms", figures["p99"], params, target="< 1 ms", extra=extra)
    r99.target_met = r99.median < 1.0
    rmax = Result(f"{name}_max", "ms", figures["max"], params, target="< 5 ms", extra=extra)
    rmax.target_met = rmax.median < 5.0
    idle99 = Result(f"{name}_idle_baseline_p99", "ms", figures["idle_p99"], params)
    idlemax = Result(f"{name}_idle_baseline_max", "ms", figures["idle_max"], params)
    return [r99, rmax, idle99, idlemax]


# ------------------------------------------------------------------------ heap use


def _caller_bytes(frs: list[FileRange]) -> int:
    """The bytes of the caller's ranges: the list, the FileRange tuples and their ints, but
    an int only where the range alone holds it (the pure-Python core keys its dicts with
    the same int objects: those bytes are the allocator's too, and stay counted)."""
    total = sys.getsizeof(frs)
    getrefcount, getsizeof = sys.getrefcount, sys.getsizeof
    for fr in frs:
        total += getsizeof(fr)
        for x in fr:
            # Three references: the tuple's, the loop variable's and getrefcount's argument.
            if getrefcount(x) == 3:
                total += getsizeof(x)
    return total


async def scenario_heap(live: int, reps: int) -> Result:
    """Python heap bytes per live allocation: tracemalloc's traced memory grown by ``live``
    allocations of 1-16 pages (the churn workload's shape), after their release work."""
    samples: list[float] = []
    for rep in range(reps):
        rng = random.Random(rep)
        sizes = [rng.randint(1, 16) * P for _ in range(live)]
        frs: list[FileRange] = []
        frs_append = frs.append
        async with MemoryFile.open() as mf:
            _hygiene()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            # The caller's list of ranges is the caller's memory: measured apart.
            for i, n in enumerate(sizes):
                frs_append(mf.allocate(n))
                if i & 63 == 63:
                    await asyncio.sleep(0)
            # Churn a little so that the sets hold waste, free gaps and releases too.
            for i in range(live // 10):
                j = rng.randrange(live)
                mf.dec_ref(frs[j])
                frs[j] = mf.allocate(sizes[j])
                if i & 63 == 63:
                    await asyncio.sleep(0)
            await mf.wait_released()
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
            caller = _caller_bytes(frs)
            tracemalloc.stop()
            samples.append((after - before - caller) / live)
            del frs
    res = Result(
        f"heap_{_k(live)}_live",
        "bytes/alloc",
        samples,
        {"live": live},
        target="<= 100",
    )
    res.target_met = res.median <= 100
    return res


def _k(n: int) -> str:
    return f"{n // 1_000_000}m" if n >= 1_000_000 else f"{n // 1000}k"


# ---------------------------------------------------------------------------- driver


@dataclass
class Plan:
    quick: bool
    reps: int
    only: set[str] | None

    def wants(self, *names: str) -> bool:
        return self.only is None or any(n in self.only for n in names)

    @property
    def ops(self) -> dict[str, int]:
        """Timed operations per repetition of a, b and c (the Go baseline runs as many)."""
        if self.quick:
            return {"a": 20_000, "b": 10_000, "c": 20_000}
        return {"a": 200_000, "b": 100_000, "c": 200_000}

    @property
    def live(self) -> list[int]:
        """The live-allocation counts of b."""
        return [1_000, 100_000] if self.quick else [1_000, 100_000, 1_000_000]


# ------------------------------------------------------------------ the Go baseline

#: gVisor's benchmark names (pgbench-debian's JSON) onto GO's keys, with the figure taken.
_GO_NAMES: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(r"a: alloc4K\+DecRef\b"), "a", "ns_per_op"),
    (re.compile(r"b: steady L=(\d+) DecRef\+Allocate$"), "b_{}", "ns_per_op"),
    (re.compile(r"c: alloc2M\b.*\+DecRef$"), "c", "ns_per_op"),
    (
        re.compile(r"e: UpdateUsage\(\) 1GiB, half touched \(contig\) first scan$"),
        "e_first_half",
        "median_ms",
    ),
    (
        re.compile(r"e: UpdateUsage\(\) 1GiB, half touched \(alternate\) first scan$"),
        "e_every_other",
        "median_ms",
    ),
]


def go_figures(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """GO's keys from one run of pgbench-debian's ``-json`` results: µs per operation for
    a, b_<live> and c, ms for e_first_half ("contig": the first half touched) and
    e_every_other ("alternate"), each e the first scan of a fresh file as ours is."""
    out: dict[str, float] = {}
    for item in results:
        name = str(item.get("name", ""))
        for pattern, key, figure in _GO_NAMES:
            m = pattern.match(name)
            if m is None:
                continue
            if m.groups():
                key = key.format(_k(int(m.group(1))))
            if figure == "ns_per_op":
                out[key] = float(item["ns_per_op"]) / 1000
            else:
                out[key] = float(item["extra"][figure])
    return out


def measure_go(plan: Plan) -> str:
    """Build and run gVisor's pgalloc benchmark ``plan.reps`` times with this run's operation
    counts, and put the medians into GO (GO_SOURCE "same-run"). Returns what happened, for
    the log. Blocking (a build, then a few seconds per run); leaves GO_REF's figures where
    Go cannot be had."""
    letters = [x for x in "abce" if plan.wants(x)]
    if not letters:
        return "Go baseline not needed"
    script = os.environ.get("GOBENCH_BUILD") or str(
        Path(__file__).resolve().parents[1].parent / "shared" / "gobench" / "build.sh"
    )
    try:
        built = subprocess.run(
            ["sh", script], capture_output=True, text=True, timeout=900, check=True
        )
        binary = built.stdout.strip().splitlines()[-1]
        args = [
            binary,
            f"-bench={','.join(letters)}",
            f"-na={plan.ops['a']}",
            f"-nb={plan.ops['b']}",
            f"-nc={plan.ops['c']}",
            f"-ne={plan.reps}",
            f"-live={','.join(str(n) for n in plan.live)}",
        ]
        runs: list[dict[str, float]] = []
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "go.json")
            for _ in range(plan.reps):
                subprocess.run(
                    [*args, f"-json={out}"], capture_output=True, timeout=900, check=True
                )
                with open(out) as f:
                    runs.append(go_figures(json.load(f)["results"]))
    except (OSError, IndexError, KeyError, ValueError, subprocess.SubprocessError) as exc:
        return f"Go baseline not available ({exc!r}): GO_REF's fixed figures used"
    for key in runs[0]:
        GO[key] = statistics.median(r[key] for r in runs if key in r)
        GO_SOURCE[key] = "same-run"
    return f"Go baseline: {binary}, {len(runs)} runs, same-run medians for {sorted(runs[0])}"


async def run_all(plan: Plan, emit: Callable[[Result], None]) -> list[Result]:
    reps, quick = plan.reps, plan.quick
    results: list[Result] = []

    def add(r: Result) -> None:
        results.append(r)
        emit(r)

    small = MemoryFileOpts()
    if plan.wants("a"):
        ops = plan.ops["a"]
        s = await scenario_alloc_free("a", ops, reps, P, AllocOpts(), small)
        add(_against_go(Result("a_alloc_4k_dec_ref", "us/op", s, {"ops": ops}), "a", 3))
    if plan.wants("b"):
        ops = plan.ops["b"]
        first: float | None = None
        for live in plan.live:
            s, extra = await scenario_churn(live, ops, reps)
            r = Result(f"b_churn_{_k(live)}_live", "us/op", s, {"ops": ops, "live": live})
            r.extra.update(extra)
            _against_go(r, f"b_{_k(live)}", 3)
            if first is None:
                first = r.median
            elif live >= 1_000_000:
                r.extra["x_1k_live_cost"] = _r(r.median / first)
                r.target = f"{r.target}, <= 2.5x the 1k-live cost"
                r.target_met = bool(r.target_met) and r.median <= 2.5 * first
            add(r)
    if plan.wants("c"):
        ops = plan.ops["c"]
        huge_file = MemoryFileOpts(expect_hugepages=True)
        s = await scenario_alloc_free("c", ops, reps, HUGE_PAGE_SIZE, HUGE, huge_file)
        add(_against_go(Result("c_alloc_2m_huge_dec_ref", "us/op", s, {"ops": ops}), "c", 3))
    if plan.wants("d"):
        for r in await scenario_bytes(reps, 64 * MiB):
            add(r)
    if plan.wants("e"):
        for pattern in ("first_half", "every_other"):
            add(await scenario_scan(reps, GiB, pattern))
    if plan.wants("heap"):
        # tracemalloc slows allocation ~20x: the quick run measures a smaller heap.
        for live in [30_000] if quick else [100_000, 1_000_000]:
            add(await scenario_heap(live, 1 if live >= 1_000_000 else reps))
    return results


async def scenario_restore(reps: int, gib: int) -> list[Result]:
    """bench_async_load's figures as Results with the targets of issue 14."""
    import bench_async_load

    args = argparse.Namespace(dir="/tmp", reps=reps, gib=gib, loop="asyncio")
    m = await bench_async_load.measure(args)
    t, vs = m["times"], m["vs_read"]
    params = {"file_gib": gib, "committed_gib": gib / 4, "page_cache_dropped": m["dropped"]}
    ms = [x * 1e3 for x in t["first_alloc"]]
    first = Result("restore_first_alloc", "ms", ms, params, target="<= 10")
    first.target_met = first.median <= 10
    rng = Result(
        "restore_2mib_range", "ms", [x * 1e3 for x in t["range_2mib"]], params, target="<= 50"
    )
    rng.target_met = rng.median <= 50
    total = Result(
        "restore_total",
        "s",
        t["async_total"],
        params,
        raw_samples=t["read"],
        raw_what="cold sequential read (cat)",
        raw_ratios=vs["async_total"],
        target=">= 0.9 of raw",
    )
    total.target_met = statistics.median(vs["async_total"]) >= 0.9
    idle = {"idle_p99_ms": _r(statistics.median(m["idle_p99"]))}
    p99 = Result("restore_lag_p99", "ms", m["lag_p99"], params, target="< 1", extra=idle)
    p99.target_met = p99.median < 1
    idle_max = {"idle_max_ms": _r(statistics.median(m["idle_max"]))}
    mx = Result("restore_lag_max", "ms", m["lag_max"], params, target="< 5", extra=idle_max)
    mx.target_met = mx.median < 5
    save = Result(
        "save_vs_fsync_write",
        "s",
        t["save"],
        params,
        raw_samples=t["fsync_write"],
        raw_what="fsynced sequential write (cp)",
        raw_ratios=vs["save"],
        target=">= 0.9 of raw",
    )
    save.target_met = statistics.median(vs["save"]) >= 0.9
    return [first, rng, total, p99, mx, save]


async def run_lag(plan: Plan, emit: Callable[[Result], None]) -> list[Result]:
    """The event-loop lag scenarios.

    Always on the stdlib asyncio loop: uvloop (libuv) rounds timers to whole
    milliseconds, which would hide lag below 1 ms behind ~1 ms of its own.
    """
    reps, quick = plan.reps, plan.quick
    results: list[Result] = []

    def add(r: Result) -> None:
        results.append(r)
        emit(r)

    if plan.wants("lag"):
        total = 1 * GiB if quick else 4 * GiB
        scan_size = GiB // 4 if quick else GiB
        small_count = 20_000 if quick else 100_000
        lags: list[tuple[str, LagScenario]] = [
            ("idle", lag_idle),
            (f"release_{total // GiB}g", lag_release(total)),
            (f"commit_{total // GiB}g", lag_commit(total)),
            (f"scan_{scan_size // MiB}m_every_other", lag_scan(scan_size)),
            (f"release_{_k(small_count)}_small", lag_release_small(small_count)),
        ]
        for name, fn in lags:
            for r in await scenario_lag(name, fn, reps):
                add(r)
    if plan.wants("lag", "scrape"):
        for r in await scenario_scrape_lag(100_000, 1.0 if quick else 3.0, reps):
            add(r)
    if plan.wants("restore"):
        for r in await scenario_restore(reps, 1 if quick else 4):
            add(r)
    return results


async def run_guests(plan: Plan, emit: Callable[[Result], None]) -> list[Result]:
    """The guest scenarios (``bench_guests.py``), on the suite's loop."""
    if not plan.wants("guests"):
        return []
    import bench_guests

    return await bench_guests.run([1, 32], plan.reps, 0.25 if plan.quick else 1.0, emit)


#: The scenarios that exercise the page-state core, run on both cores (``--only`` names).
BOOKKEEPING = ("a", "b", "c", "e", "heap", "lag", "scrape")


def table(results: Sequence[dict[str, Any]]) -> str:
    """One row per scenario: each core's median, Go's figure, each core's ratio to it, the
    raw syscall's, and the target, judged on the compiled core (the only one that ran, if
    only one did)."""
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for j in results:
        rows.setdefault(j["scenario"], {})[j["core"]] = j
    head = (
        f"{'scenario':44} {'unit':>11} {'compiled':>9} {'python':>9} {'Go':>7} "
        f"{'c/Go':>6} {'py/Go':>6} {'raw':>8} {'of raw':>7}  target"
    )
    lines = [head, "-" * len(head)]
    for name, by_core in rows.items():
        c, py = by_core.get("compiled", {}), by_core.get("python", {})
        j = c or py
        raw = j.get("raw", {}).get("median", "")
        target = j.get("target")
        lines.append(
            f"{name:44} {j['unit']:>11} {c.get('median', '')!s:>9} {py.get('median', '')!s:>9} "
            f"{j.get('go_reference', '')!s:>7} {c.get('x_slower_than_go', '')!s:>6} "
            f"{py.get('x_slower_than_go', '')!s:>6} {raw!s:>8} "
            f"{j.get('fraction_of_raw', '')!s:>7}  "
            + ("" if target is None else f"{target} {'MET' if j['target_met'] else 'NOT MET'}")
        )
    return "\n".join(lines)


def run_python_core(args: argparse.Namespace, plan: Plan, go_file: str) -> list[dict[str, Any]]:
    """Run the bookkeeping scenarios of ``plan`` on the pure-Python core in a child process
    (``ASYNCPGALLOC_NO_EXTENSIONS=1``), with this run's Go figures; its JSON lines go to
    this process's stdout as they come. Blocking, as long as those scenarios take."""
    wanted = [n for n in BOOKKEEPING if plan.wants(n)]
    if not wanted:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "python.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--cores", "current"]
        cmd += ["--only", ",".join(wanted), "--reps", str(args.reps), "--loop", args.loop]
        cmd += ["--go-figures", go_file, "--json", out, "--no-table"]
        if args.quick:
            cmd.append("--quick")
        env = dict(os.environ, ASYNCPGALLOC_NO_EXTENSIONS="1")
        subprocess.run(cmd, env=env, check=True)
        with open(out) as f:
            got: list[dict[str, Any]] = json.load(f)
    return got


def main(argv: Sequence[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer operations (a few minutes with both cores and Go)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (>= 5)")
    parser.add_argument(
        "--only",
        metavar="LIST",
        help="comma-separated: a,b,c,d,e,lag,scrape,heap,restore,guests (default: all)",
    )
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument(
        "--cores",
        choices=["both", "current"],
        default="both",
        help="also run the bookkeeping scenarios on the pure-Python core (default), or not",
    )
    parser.add_argument(
        "--go",
        choices=["auto", "fixed"],
        default="auto",
        help="build and run gVisor's pgalloc for a same-run baseline (default), or use GO_REF",
    )
    parser.add_argument("--go-figures", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reps < 5:
        parser.error("--reps must be at least 5: medians of fewer are noise here")
    only = None if args.only is None else {s.strip() for s in args.only.split(",") if s.strip()}
    plan = Plan(args.quick, args.reps, only)

    t0 = time.perf_counter()
    if args.go_figures:
        with open(args.go_figures) as f:
            figures = json.load(f)
        GO.update(figures["go"])
        GO_SOURCE.update(figures["source"])
    elif args.go == "auto":
        print(measure_go(plan), file=sys.stderr, flush=True)

    def emit(r: Result) -> None:
        print(json.dumps(r.to_json()), flush=True)

    runner: Callable[[Awaitable[list[Result]]], list[Result]]
    runner = uvloop.run if args.loop == "uvloop" else asyncio.run  # type: ignore[assignment]
    results = runner(run_all(plan, emit))
    results += asyncio.run(run_lag(plan, emit))
    results += runner(run_guests(plan, emit))
    out = [r.to_json() for r in results]
    if args.cores == "both" and core_implementation() == "compiled":
        with tempfile.NamedTemporaryFile("w", suffix=".json") as go_file:
            json.dump({"go": GO, "source": GO_SOURCE}, go_file)
            go_file.flush()
            out += run_python_core(args, plan, go_file.name)
    if not args.no_table:
        print()
        print(table(out))
        cores = sorted({j["core"] for j in out})
        print(
            f"\n{len(out)} results in {time.perf_counter() - t0:.0f} s "
            f"(loop {args.loop}, lag on asyncio, {args.reps} reps"
            f"{', quick' if args.quick else ''}, cores: {', '.join(cores)}; "
            f"Go same-run: {', '.join(sorted(k for k, v in GO_SOURCE.items() if v != 'GO_REF'))}"
            " (the rest GO_REF's))"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
