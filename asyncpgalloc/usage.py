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
from collections.abc import Awaitable, Callable, Iterable
from itertools import compress

from . import host
from .blocking import SLICE_SECONDS, BlockingRunner
from .core import PageSets
from .errors import ClosedError
from .ranges import PAGE_SIZE

__all__ = [
    "MAX_SCAN_CPU_SHARE",
    "MIN_SCAN_INTERVAL",
    "UsageScanner",
    "run_usage_refresher",
]

logger = logging.getLogger("asyncpgalloc")

#: Linux updates usage at CONFIG_HZ; scanning more often than 100 Hz learns nothing.
MIN_SCAN_INTERVAL = 0.01
#: After a scan that cost t seconds, the next waits 7t: scanning never takes more
#: than 1/8 of a CPU however often callers ask (gVisor PR #13941: scans once ate
#: 78% of the sentry's CPU).
MAX_SCAN_CPU_SHARE = 1 / 8

_LOW_BIT = bytes(b & 1 for b in range(256))


#: Early stopping counts found pages only in spans with at most this many runs of
#: scannable pages (counting is O(runs) per piece, off the loop but under the GIL).
MAX_COUNTED_RANGES = 64
#: mincore works through a span in pieces of this many pages when it may stop early.
SCAN_PIECE_PAGES = 4096


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
#: spans at most this many pages from its first resident page, plus the rest of the
#: run it ends in, and makes at most a scan's current cut budget of new segments.
MARK_WINDOW_PAGES = 1024
#: The cut budget starts here and follows the measured cost per cut so that a window
#: costs about MARK_WINDOW_SHARE of a slice (a cut costs ~0.5 µs here, up to ~3 µs on
#: slower CPUs, where 1024 pages of every other page resident took 1.2-1.6 ms, 5x the
#: slice), never below MIN_MARK_CUTS (so that a window always makes progress).
MARK_WINDOW_CUTS = 128
MIN_MARK_CUTS = 16
MARK_WINDOW_SHARE = 0.5


def _edges(resident: bytes, i: int, j: int) -> bytes:
    """``e`` with ``e[k] != 0`` iff page ``i + k`` differs from page ``i + k - 1``
    (``e[0]`` is page ``i`` itself), for ``k < j - i``: big-int XOR, C speed."""
    x = int.from_bytes(resident[i:j], "big")
    return (x ^ (x >> 8)).to_bytes(j - i, "big")


class UsageScanner:
    """gVisor's UpdateUsage for one file: one scan at a time, throttled.

    Built from the file's :class:`~asyncpgalloc.pages.PageSets`, its blocking runner,
    its fd, ``address(offset)`` (where the file's mapping holds ``offset``) and
    ``closed()`` (the file closed: stop).
    """

    def __init__(
        self,
        pages: PageSets,
        blocking: BlockingRunner,
        fd: int,
        address: Callable[[int], int],
        closed: Callable[[], bool],
    ) -> None:
        self._pages = pages
        self._blocking = blocking
        self._fd = fd
        self._address = address
        self._closed = closed
        self._scan: asyncio.Future[None] | None = None
        #: The loop time before which an unforced full scan is throttled.
        self.next_scan = 0.0
        #: Scans run (calls answered by the fast path, the throttle or by joining
        #: another scan are not counted).
        self.scans = 0

    async def update(self, memcg_ids: Iterable[int] | None, force: bool = False) -> bool:
        """See :meth:`MemoryFile.update_usage`."""
        if self._scan is not None:
            # One scan at a time: join the one in progress rather than repeat it.
            await asyncio.shield(self._scan)
            if not force:
                return True
            # Forced: that scan may have begun before the caller's pages were
            # committed; run one that begins now (unless another caller beat us to it).
            while self._scan is not None:
                await asyncio.shield(self._scan)
            if self._closed():
                raise ClosedError("the MemoryFile was closed during a usage scan")
        if host.file_usage(self._fd) == self._pages.known_committed_bytes:
            return True
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now < self.next_scan and not force:
            return False
        ids = None if memcg_ids is None else frozenset(memcg_ids)
        if ids is None:
            self.next_scan = now + MIN_SCAN_INTERVAL
        scan = self._scan = loop.create_future()
        self.scans += 1
        cost = 0.0
        try:
            cost = await self._run(ids)
        finally:
            self._scan = None
            scan.set_result(None)
            wait = cost * (1 - MAX_SCAN_CPU_SHARE) / MAX_SCAN_CPU_SHARE
            self.next_scan = max(self.next_scan, loop.time() + wait)
        return True

    async def _run(self, ids: frozenset[int] | None) -> float:
        """Scan and mark; returns the CPU-ish seconds spent (loop slices + mincore)."""
        pages = self._pages
        cost = 0.0
        pos = 0
        while (span := pages.next_scan_span(pos, ids, MAX_COUNTED_RANGES)) is not None:
            lo, hi, ranges = span
            # Stop early once every committed byte is known: the host's count
            # (st_blocks) then equals ours, so no page left unscanned is committed.
            # (gVisor scans everything; this finds the same pages.)
            need = host.file_usage(self._fd) - pages.known_committed_bytes
            if need <= 0:
                break
            last_seq = pages.begin_scan()
            resident, seconds = await self._blocking.run(
                _resident_pages, self._address(lo), hi - lo, need // PAGE_SIZE, ranges
            )
            cost += seconds
            if self._closed():
                raise ClosedError("the MemoryFile was closed during a usage scan")
            cost += await self._mark_committed(lo, resident, last_seq)
            pos = lo + len(resident) * PAGE_SIZE
        return cost

    async def _mark_committed(self, lo: int, resident: bytes, last_seq: int) -> float:
        """Mark resident pages committed where no decommit raced with the scan.

        Window by window: each eligible accounting segment (used, not known committed,
        not touched since the scan began) is cut at the edges of its resident runs,
        found at C speed (:func:`_edges`, ``compress``, ``bytes.find``), by one
        :meth:`~asyncpgalloc.pages.PageSets.mark_resident_runs` per window; a window
        makes at most a budget of cuts that follows the measured cost per cut, so that
        it costs about half a slice on any CPU (see MARK_WINDOW_CUTS). Yields to
        the loop before a window that would take the slice past SLICE_SECONDS; every
        segment is judged as it is when its window runs, so allocations, releases and
        decommits in between stay safe. (The window in which the accounting set's
        dicts outgrow their tables, at ~44k, 87k, 175k... segments, takes a few ms
        longer: a CPython dict rehashes all its entries, into freshly faulted memory,
        in one step.)
        """
        pages = self._pages
        hi = lo + len(resident) * PAGE_SIZE
        cost = 0.0
        # What the coming step may cost: right after a marking window, that window's
        # cost (the next is likely alike, so yield first if it would overrun the
        # slice); after a yield or a skipped segment, nothing (skips are cheap, and
        # each turn of the loop makes progress, so a costly window never makes every
        # step yield).
        step_cost = 0.0
        max_cuts = MARK_WINDOW_CUTS
        slice_start = time.perf_counter()
        pos = lo
        while pos < hi:
            t0 = time.perf_counter()
            if t0 - slice_start + step_cost > SLICE_SECONDS:
                cost += t0 - slice_start
                await asyncio.sleep(0)
                if self._closed():
                    raise ClosedError("the MemoryFile was closed during a usage scan")
                slice_start = t0 = time.perf_counter()
            step_cost = 0.0
            item = pages.scan_segment(pos, hi)
            if item is None:
                break
            s, stop, seg_s, seg_e, ma = item
            i = (s - lo) // PAGE_SIZE
            istop = (stop - lo) // PAGE_SIZE
            # docs/design.md §5: judge the race by the segment as it is now, not as it
            # was before the scan (gVisor reads a stale segment here).
            if ma.waste_or_releasing or ma.known_committed or ma.commit_seq > last_seq:
                pos = stop
                continue
            # Start the window at the first resident page: what lies before keeps ma.
            i = resident.find(1, i, istop)
            if i < 0:
                pos = stop
                continue
            s = lo + i * PAGE_SIZE
            # Edges strictly inside the window [i, jw) cut it into runs, the first
            # resident.
            jw = min(istop, i + MARK_WINDOW_PAGES)
            if resident.find(0, i, jw) < 0:
                cuts: list[int] = []  # one resident run fills the window
            else:
                edges = _edges(resident, i, jw)
                cuts = list(
                    compress(range(s + PAGE_SIZE, lo + jw * PAGE_SIZE, PAGE_SIZE), edges[1:])
                )
                if len(cuts) > max_cuts:
                    # End the window at the next edge: its runs stay whole, and the
                    # carry below finds that edge at once.
                    jw = (cuts[max_cuts] - lo) // PAGE_SIZE
                    del cuts[max_cuts:]
            # Carry the window on to the end of the run it ends in, so that a long run
            # is one piece however the windows fall.
            last = (len(cuts) + 1) & 1  # 1 if the last run is resident
            j = jw
            if j < istop:
                k = resident.find(1 - last, j, istop)
                j = istop if k < 0 else k
            end = lo + j * PAGE_SIZE
            # Runs alternate resident/not; [seg_s, s) and [end, seg_e) keep ma.
            first_resident = True
            if s > seg_s:
                cuts.insert(0, s)
                first_resident = False
            if last and end < seg_e:
                cuts.append(end)
            pages.mark_resident_runs(seg_s, cuts, ma, first_resident)
            pos = end
            step_cost = time.perf_counter() - t0
            if len(cuts) >= MIN_MARK_CUTS:
                # Cost per cut as measured on this CPU, now: the next budget.
                per_cut = step_cost / len(cuts)
                budget = (
                    int(SLICE_SECONDS * MARK_WINDOW_SHARE / per_cut)
                    if per_cut > 0
                    else MARK_WINDOW_PAGES
                )
                max_cuts = max(MIN_MARK_CUTS, min(MARK_WINDOW_PAGES, budget))
        return cost + time.perf_counter() - slice_start


async def run_usage_refresher(update: Callable[[], Awaitable[object]], interval: float) -> None:
    """Call ``update`` (the file's ``update_usage``) every ``interval`` seconds (gVisor
    PR #12538), until cancelled."""
    while True:
        await asyncio.sleep(interval)
        try:
            await update()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("background usage refresh failed; trying again in %.3g s", interval)
