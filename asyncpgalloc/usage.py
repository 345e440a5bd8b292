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
import time
from collections.abc import Iterable
from itertools import accumulate, chain, compress
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
        lo, hi, ranges = span
        # Stop early once every committed byte is known: the host's count
        # (st_blocks) then equals ours, so no page left unscanned is committed.
        # (The seed scans everything; this finds the same pages.)
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
            # Waste is skipped as in the seed: it may have been committed since
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


#: Marking splits mixed stretches of a scan's result window by window, this many pages
#: each (about 0.1 ms of work at most); uniform runs of at least UNIFORM_RUN_PAGES
#: pages are taken whole.
MARK_WINDOW_PAGES = 512
UNIFORM_RUN_PAGES = 64


def _pieces(
    r: bytes, base: int, ma: MemAcct, ma_c: MemAcct
) -> tuple[list[int], list[MemAcct], int]:
    """Split ``[base, base + len(r) pages)`` by residency ``r`` (0/1 per page): the cuts
    strictly inside, each piece's value (``ma_c`` where resident) and the resident
    page count. C-level work (split, accumulate, compress) but for two list builds.
    """
    n = len(r)
    parts = r.split(b"\x00")
    lens = list(map(len, parts))
    acc = list(accumulate(map((1).__add__, lens)))
    starts = list(compress(chain((0,), acc), lens))
    if not starts:
        return [], [ma], 0
    ends = list(compress(map((-1).__add__, acc), lens))
    bounds = list(chain.from_iterable(zip(starts, ends, strict=True)))
    first, second = ma, ma_c
    if bounds[0] == 0:
        del bounds[0]
        first, second = ma_c, ma
    if bounds and bounds[-1] == n:
        bounds.pop()
    k = len(bounds) + 1
    values = [first, second] * ((k + 1) // 2)
    del values[k:]
    return list(map(base.__add__, map(PAGE_SIZE.__mul__, bounds))), values, sum(lens)


def _append_pieces(
    cuts: list[int], values: list[MemAcct], at: int, wcuts: list[int], wvalues: list[MemAcct]
) -> None:
    """Append pieces starting at ``at`` to pieces ending there (if any), cutting only
    between different values."""
    if not values:
        values.extend(wvalues)
    elif values[-1] is wvalues[0]:
        values.extend(wvalues[1:])
    else:
        cuts.append(at)
        values.extend(wvalues)
    cuts.extend(wcuts)


async def _mark_committed(mf: MemoryFile, lo: int, resident: bytes, last_seq: int) -> float:
    """Mark resident pages committed where no decommit raced with the scan.

    Segment by segment: each eligible accounting segment (used, not known
    committed, not touched since the scan began) is split by residency in one
    :meth:`~asyncpgalloc.segments.SegmentSet.refine` per slice, C-level bulk work
    rather than one ``mutate_range`` per resident run. Yields to the loop every
    SLICE_SECONDS; every segment is judged as it is when its slice runs, so
    allocations, releases and decommits in between stay safe.
    """
    account = mf._account
    accounting = mf._accounting
    mem_acct = mf._mem_acct
    hi = lo + len(resident) * PAGE_SIZE
    committed_of: dict[MemAcct, MemAcct] = {}
    cost = 0.0
    slice_start = time.perf_counter()
    pos = lo
    while pos < hi:
        item = next(mem_acct.visit_range(pos, hi), None)
        if item is None:
            break
        s, _, ma = item
        seg = mem_acct.find_segment(s)
        assert seg is not None
        seg_s, seg_e = seg[0], seg[1]
        stop = min(seg_e, hi)
        i = (s - lo) // PAGE_SIZE
        istop = (stop - lo) // PAGE_SIZE
        # DESIGN.md §6: judge the race by the segment as it is now, not as it was
        # before the scan (the seed reads a stale segment here).
        if (
            ma.waste_or_releasing
            or ma.known_committed
            or ma.commit_seq > last_seq
            or resident.find(1, i, istop) < 0
        ):
            pos = stop
        else:
            ma_c = committed_of.get(ma)
            if ma_c is None:
                ma_c = committed_of[ma] = ma._replace(known_committed=True, commit_seq=0)
            cuts: list[int] = []
            # The piece [seg_s, s), if any, keeps its value.
            values: list[MemAcct] = [ma] if s > seg_s else []
            committed = 0
            cur = s
            while i < istop:
                # A long uniform run is one piece; otherwise split a window.
                bit = resident[i]
                j = resident.find(1 - bit, i, istop)
                if j < 0:
                    j = istop
                if j - i >= UNIFORM_RUN_PAGES:
                    _append_pieces(cuts, values, cur, [], [ma_c if bit else ma])
                    if bit:
                        committed += j - i
                else:
                    j = min(istop, i + MARK_WINDOW_PAGES)
                    wcuts, wvalues, n = _pieces(resident[i:j], cur, ma, ma_c)
                    _append_pieces(cuts, values, cur, wcuts, wvalues)
                    committed += n
                i = j
                cur = lo + j * PAGE_SIZE
                if time.perf_counter() - slice_start > SLICE_SECONDS:
                    break
            if cur < seg_e:
                _append_pieces(cuts, values, cur, [], [ma])
            if committed:
                mem_acct.refine(seg_s, cuts, values)
                nbytes = committed * PAGE_SIZE
                mf._known_committed_bytes += nbytes
                if account:
                    accounting.inc(nbytes, ma.kind, ma.memcg_id)
            pos = cur
        if time.perf_counter() - slice_start > SLICE_SECONDS:
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
