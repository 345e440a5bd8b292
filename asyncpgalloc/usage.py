"""Finding committed pages: the seed's UpdateUsage, made to share the loop.

A scan asks the host (``mincore``, in the executor, one hop per chunk) which
used pages are resident, then marks them known-committed in slices that yield to
the loop. The commit sequence protects the result: a page whose accounting
segment was decommitted, released or newly allocated after the scan started is
never marked.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from . import host
from .errors import ClosedError
from .ranges import CHUNK_SHIFT, CHUNK_SIZE, KEY_MAX, PAGE_SIZE

if TYPE_CHECKING:
    from .memory_file import MemAcct, MemoryFile

__all__ = [
    "MAX_SCAN_CPU_SHARE",
    "MIN_SCAN_INTERVAL",
    "SLICE_SECONDS",
    "run_usage_refresher",
    "update_usage",
]

logger = logging.getLogger("asyncpgalloc")

#: Linux updates usage at CONFIG_HZ; scanning more often than 100 Hz learns nothing.
MIN_SCAN_INTERVAL = 0.01
#: After a scan that cost t seconds, the next waits 7t: scanning never takes more
#: than 1/8 of a CPU however often callers ask (gVisor PR #13941: scans once ate
#: 78% of the sentry's CPU).
MAX_SCAN_CPU_SHARE = 1 / 8
#: Marking a scan's result yields to the loop after about this long.
SLICE_SECONDS = 0.0005

_LOW_BIT = bytes(b & 1 for b in range(256))
_RESIDENT_RUN = re.compile(rb"\x01+")


async def update_usage(mf: MemoryFile, memcg_ids: Iterable[int] | None) -> None:
    """See :meth:`MemoryFile.update_usage`."""
    if mf._scan is not None:
        # One scan at a time: join the one in progress rather than repeat it.
        await asyncio.shield(mf._scan)
        return
    if host.file_usage(mf._fd) == mf._known_committed_bytes:
        return
    loop = mf._loop
    now = loop.time()
    if now < mf._next_commit_scan:
        return
    ids = None if memcg_ids is None else frozenset(memcg_ids)
    if ids is None:
        mf._next_commit_scan = now + MIN_SCAN_INTERVAL
    scan = mf._scan = loop.create_future()
    mf._usage_scans += 1
    cost = 0.0
    try:
        cost = await _scan(mf, ids)
    finally:
        mf._scan = None
        scan.set_result(None)
        wait = cost * (1 - MAX_SCAN_CPU_SHARE) / MAX_SCAN_CPU_SHARE
        mf._next_commit_scan = max(mf._next_commit_scan, loop.time() + wait)


async def _scan(mf: MemoryFile, ids: frozenset[int] | None) -> float:
    """Scan and mark; returns the CPU-ish seconds spent (loop slices + mincore)."""
    cost = 0.0
    pos = 0
    while (span := _next_scan_span(mf, pos, ids)) is not None:
        lo, hi = span
        last_seq = mf._commit_seq
        mf._commit_seq += 1
        addr = mf._chunks[lo >> CHUNK_SHIFT].mapping.addr + (lo & (CHUNK_SIZE - 1))
        resident, seconds = await mf._blocking.run(_resident_pages, addr, hi - lo)
        cost += seconds
        if mf._closed:
            raise ClosedError("the MemoryFile was closed during a usage scan")
        cost += await _mark_committed(mf, lo, resident, last_seq)
        pos = hi
    return cost


def _next_scan_span(mf: MemoryFile, pos: int, ids: frozenset[int] | None) -> tuple[int, int] | None:
    """The next range at or after ``pos``, within one chunk, that holds pages to scan."""
    lo = hi = -1
    limit = KEY_MAX
    for s, e, ma in mf._mem_acct.visit_range(pos, KEY_MAX):
        if s >= limit:
            break
        skip = ma.waste_or_releasing or ma.known_committed
        if skip or (ids is not None and ma.memcg_id not in ids):
            # Waste is skipped as in the seed: it may have been committed since
            # the last scan, but it is accounted as SYSTEM until released anyway.
            continue
        if lo < 0:
            lo = s
            limit = ((s >> CHUNK_SHIFT) + 1) << CHUNK_SHIFT
        hi = min(e, limit)
    return None if lo < 0 else (lo, hi)


def _resident_pages(addr: int, length: int) -> tuple[bytes, float]:
    """mincore of a range, one byte per page (1 if resident), and its cost. Blocking."""
    t0 = time.perf_counter()
    out = bytearray(length // PAGE_SIZE)
    host.mincore(addr, length, out)
    return bytes(out).translate(_LOW_BIT), time.perf_counter() - t0


async def _mark_committed(mf: MemoryFile, lo: int, resident: bytes, last_seq: int) -> float:
    """Mark resident pages committed where no decommit raced with the scan.

    Yields to the loop every SLICE_SECONDS; every segment is judged as it is when
    its slice runs, so allocations, releases and decommits in between stay safe.
    """
    account = mf._account
    accounting = mf._accounting

    def mark(s: int, e: int, ma: MemAcct) -> MemAcct:
        # DESIGN.md §6: judge the race by the segment as it is now, not as it was
        # before the scan (the seed reads a stale segment here).
        if ma.waste_or_releasing or ma.known_committed or ma.commit_seq > last_seq:
            return ma
        mf._known_committed_bytes += e - s
        if account:
            accounting.inc(e - s, ma.kind, ma.memcg_id)
        return ma._replace(known_committed=True, commit_seq=0)

    cost = 0.0
    slice_start = time.perf_counter()
    for i, run in enumerate(_RESIDENT_RUN.finditer(resident)):
        mf._mem_acct.mutate_range(lo + run.start() * PAGE_SIZE, lo + run.end() * PAGE_SIZE, mark)
        if i & 7 == 7 and time.perf_counter() - slice_start > SLICE_SECONDS:
            cost += time.perf_counter() - slice_start
            await asyncio.sleep(0)
            if mf._closed:
                raise ClosedError("the MemoryFile was closed during a usage scan")
            slice_start = time.perf_counter()
    return cost + time.perf_counter() - slice_start


async def run_usage_refresher(mf: MemoryFile, interval: float) -> None:
    """Refresh usage every ``interval`` seconds (gVisor PR #12538), until cancelled."""
    while True:
        await asyncio.sleep(interval)
        try:
            await mf.update_usage()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("background usage refresh failed; trying again in %.3g s", interval)
