"""Finding committed pages: gVisor's UpdateUsage, made to share the loop.

A scan asks the host (``mincore``, in the executor, one hop per chunk) which
used pages are resident, then marks them known-committed in slices that yield to
the loop. The commit sequence protects the result: a page whose accounting
segment was decommitted, released or newly allocated after the scan started is
never marked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from itertools import compress
from typing import TYPE_CHECKING

from . import host
from .blocking import SLICE_SECONDS
from .errors import ClosedError
from .ranges import CHUNK_SHIFT, CHUNK_SIZE, KEY_MAX, PAGE_SIZE

if TYPE_CHECKING:
    from .memory_file import MemAcct, MemoryFile

__all__ = [
    "MAX_SCAN_CPU_SHARE",
    "MIN_SCAN_INTERVAL",
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

_LOW_BIT = bytes(b & 1 for b in range(256))


async def update_usage(
    mf: MemoryFile, memcg_ids: Iterable[int] | None, force: bool = False
) -> bool:
    """See :meth:`MemoryFile.update_usage`."""
    if mf._scan is not None:
        # One scan at a time: join the one in progress rather than repeat it.
        await asyncio.shield(mf._scan)
        if not force:
            return True
        # Forced: that scan may have begun before the caller's pages were
        # committed; run one that begins now (unless another caller beat us to it).
        while mf._scan is not None:
            await asyncio.shield(mf._scan)
        if mf._closed:
            raise ClosedError("the MemoryFile was closed during a usage scan")
    if host.file_usage(mf._fd) == mf._known_committed_bytes:
        return True
    loop = mf._loop
    now = loop.time()
    if now < mf._next_commit_scan and not force:
        return False
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
    return True


async def _scan(mf: MemoryFile, ids: frozenset[int] | None) -> float:
    """Scan and mark; returns the CPU-ish seconds spent (loop slices + mincore)."""
    cost = 0.0
    pos = 0
    while (span := _next_scan_span(mf, pos, ids)) is not None:
        lo, hi, ranges = span
        # Stop early once every committed byte is known: the host's count
        # (st_blocks) then equals ours, so no page left unscanned is committed.
        # (gVisor scans everything; this finds the same pages.)
        need = host.file_usage(mf._fd) - mf._known_committed_bytes
        if need <= 0:
            break
        last_seq = mf._commit_seq
        mf._commit_seq += 1
        addr = mf._chunks[lo >> CHUNK_SHIFT].mapping.addr + (lo & (CHUNK_SIZE - 1))
        resident, seconds = await mf._blocking.run(
            _resident_pages, addr, hi - lo, need // PAGE_SIZE, ranges
        )
        cost += seconds
        if mf._closed:
            raise ClosedError("the MemoryFile was closed during a usage scan")
        cost += await _mark_committed(mf, lo, resident, last_seq)
        pos = lo + len(resident) * PAGE_SIZE
    return cost


#: Early stopping counts found pages only in spans with at most this many runs of
#: scannable pages (counting is O(runs) per piece, off the loop but under the GIL).
MAX_COUNTED_RANGES = 64
#: mincore works through a span in pieces of this many pages when it may stop early.
SCAN_PIECE_PAGES = 4096


def _next_scan_span(
    mf: MemoryFile, pos: int, ids: frozenset[int] | None
) -> tuple[int, int, list[tuple[int, int]] | None] | None:
    """The next range at or after ``pos``, within one chunk, that holds pages to scan,
    with its runs of scannable pages (page indices from its start; None if there
    are more than MAX_COUNTED_RANGES)."""
    lo = hi = -1
    limit = KEY_MAX
    ranges: list[tuple[int, int]] | None = []
    for s, e, ma in mf._mem_acct.visit_range(pos, KEY_MAX):
        if s >= limit:
            break
        skip = ma.waste_or_releasing or ma.known_committed
        if skip or (ids is not None and ma.memcg_id not in ids):
            # Waste is skipped as in gVisor: it may have been committed since
            # the last scan, but it is accounted as SYSTEM until released anyway.
            continue
        if lo < 0:
            lo = s
            limit = ((s >> CHUNK_SHIFT) + 1) << CHUNK_SHIFT
        hi = min(e, limit)
        if ranges is not None:
            a, b = (s - lo) // PAGE_SIZE, (hi - lo) // PAGE_SIZE
            if ranges and ranges[-1][1] == a:
                ranges[-1] = (ranges[-1][0], b)
            elif len(ranges) < MAX_COUNTED_RANGES:
                ranges.append((a, b))
            else:
                ranges = None
    return None if lo < 0 else (lo, hi, ranges)


def _resident_pages(
    addr: int, length: int, need: int | None = None, ranges: list[tuple[int, int]] | None = None
) -> tuple[bytes, float]:
    """mincore of a range, one byte per page (1 if resident), and its cost. Blocking.

    With ``need`` and ``ranges`` (the scannable runs, page indices), works in
    pieces of SCAN_PIECE_PAGES and stops after the piece in which ``need`` resident
    pages have been found within ``ranges``: the result then covers a prefix.
    """
    t0 = time.perf_counter()
    pages = length // PAGE_SIZE
    if need is None or ranges is None:
        out = bytearray(pages)
        host.mincore(addr, length, out)
        return bytes(out).translate(_LOW_BIT), time.perf_counter() - t0
    parts: list[bytes] = []
    found = 0
    done = 0
    while done < pages:
        n = min(SCAN_PIECE_PAGES, pages - done)
        buf = bytearray(n)
        host.mincore(addr + done * PAGE_SIZE, n * PAGE_SIZE, buf)
        piece = bytes(buf).translate(_LOW_BIT)
        parts.append(piece)
        for a, b in ranges:
            if a < done + n and b > done:
                found += piece.count(1, max(a - done, 0), min(b - done, n))
        done += n
        if found >= need:
            break
    return b"".join(parts), time.perf_counter() - t0


#: Marking cuts a segment at its resident runs' edges window by window: a window
#: spans at most this many pages from its first resident page (so it makes at most
#: that many new segments, ~0.4 ms of dict work), plus the rest of the run it ends in.
MARK_WINDOW_PAGES = 1024


def _edges(resident: bytes, i: int, j: int) -> bytes:
    """``e`` with ``e[k] != 0`` iff page ``i + k`` differs from page ``i + k - 1``
    (``e[0]`` is page ``i`` itself), for ``k < j - i``: big-int XOR, C speed."""
    x = int.from_bytes(resident[i:j], "big")
    return (x ^ (x >> 8)).to_bytes(j - i, "big")


async def _mark_committed(mf: MemoryFile, lo: int, resident: bytes, last_seq: int) -> float:
    """Mark resident pages committed where no decommit raced with the scan.

    Window by window: each eligible accounting segment (used, not known committed,
    not touched since the scan began) is cut at the edges of its resident runs, found
    at C speed (:func:`_edges`, ``compress``, ``bytes.find``), by one
    :meth:`~asyncpgalloc.segments.SegmentSet.refine` per window. Yields to the loop
    before a window that would take the slice past SLICE_SECONDS; every segment is
    judged as it is when its window runs, so allocations, releases and decommits in
    between stay safe. (The window in which the accounting set's dicts outgrow their
    tables, at ~44k, 87k, 175k... segments, takes a few ms longer: a CPython dict
    rehashes all its entries, into freshly faulted memory, in one step.)
    """
    account = mf._account
    accounting = mf._accounting
    mem_acct = mf._mem_acct
    hi = lo + len(resident) * PAGE_SIZE
    committed_of: dict[MemAcct, MemAcct] = {}
    cost = 0.0
    # What the coming step may cost: right after a marking window, that window's cost
    # (the next is likely alike, so yield first if it would overrun the slice); after
    # a yield or a skipped segment, nothing (skips are cheap, and each turn of the
    # loop makes progress, so a costly window never makes every step yield).
    step_cost = 0.0
    slice_start = time.perf_counter()
    pos = lo
    while pos < hi:
        t0 = time.perf_counter()
        if t0 - slice_start + step_cost > SLICE_SECONDS:
            cost += t0 - slice_start
            await asyncio.sleep(0)
            if mf._closed:
                raise ClosedError("the MemoryFile was closed during a usage scan")
            slice_start = t0 = time.perf_counter()
        step_cost = 0.0
        item = next(mem_acct.visit_range(pos, hi), None)
        if item is None:
            break
        s, stop, ma = item
        i = (s - lo) // PAGE_SIZE
        istop = (stop - lo) // PAGE_SIZE
        # docs/design.md §5: judge the race by the segment as it is now, not as it was
        # before the scan (gVisor reads a stale segment here).
        if ma.waste_or_releasing or ma.known_committed or ma.commit_seq > last_seq:
            pos = stop
            continue
        # Start the window at the first resident page: what lies before keeps ma.
        i = resident.find(1, i, istop)
        if i < 0:
            pos = stop
            continue
        s = lo + i * PAGE_SIZE
        seg = mem_acct.find_segment(s)
        assert seg is not None
        seg_s, seg_e = seg[0], seg[1]
        # Edges strictly inside the window [i, jw) cut it into runs, the first resident.
        jw = min(istop, i + MARK_WINDOW_PAGES)
        if resident.find(0, i, jw) < 0:
            cuts: list[int] = []  # one resident run fills the window
        else:
            edges = _edges(resident, i, jw)
            cuts = list(compress(range(s + PAGE_SIZE, lo + jw * PAGE_SIZE, PAGE_SIZE), edges[1:]))
        # Carry the window on to the end of the run it ends in, so that a long run is
        # one piece however the windows fall.
        last = (len(cuts) + 1) & 1  # 1 if the last run is resident
        j = jw
        if j < istop:
            k = resident.find(1 - last, j, istop)
            j = istop if k < 0 else k
        end = lo + j * PAGE_SIZE
        ma_c = committed_of.get(ma)
        if ma_c is None:
            ma_c = committed_of[ma] = ma._replace(known_committed=True, commit_seq=0)
        # Runs alternate resident/not; [seg_s, s) and [end, seg_e) keep ma.
        first = ma_c
        if s > seg_s:
            cuts.insert(0, s)
            first = ma
        if last and end < seg_e:
            cuts.append(end)
        n = len(cuts) + 1
        values = [first, ma if first is ma_c else ma_c] * ((n + 1) // 2)
        del values[n:]
        mem_acct.refine(seg_s, cuts, values)
        nbytes = (resident.count(1, i, jw) + (j - jw if last else 0)) * PAGE_SIZE
        mf._known_committed_bytes += nbytes
        if account:
            accounting.inc(nbytes, ma.kind, ma.memcg_id)
        pos = end
        step_cost = time.perf_counter() - t0
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
