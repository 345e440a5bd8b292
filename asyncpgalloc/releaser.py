"""Releasing waste: planning a release step and the task that runs them.

The plan is pure (what to punch, what becomes free, which sub-release counts
change), so gVisor's huge-page sub-release arithmetic can be tested on its own;
the task applies plans through the file in httpcore's shape: a synchronous state
change that returns the I/O still to do, the I/O in the executor, then a finish
that always runs.

A step is shaped by two costs measured here: an executor round trip (100-200 µs
of latency on these VMs, far more than punching a hole in untouched pages, ~4
µs) and the loop's share (~1-2 µs per segment). So one step punches up to
MAX_RELEASING_RANGES ranges in one hop, each at most gVisor's 128 MiB, and
stops starting new punches after STEP_SECONDS (punching committed pages runs at
~5-15 GB/s); ranges it did not reach go back to waste for the next step.
Finishing a step runs in slices of about SLICE_SECONDS with a loop turn between
them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .accounting import MemoryKind
from .blocking import SLICE_SECONDS, finish_uncancelled
from .errors import InvariantError
from .ranges import HUGE_PAGE_SIZE, PAGE_SIZE, PAGES_PER_HUGE_PAGE, FileRange, huge_round_down

if TYPE_CHECKING:
    from .memory_file import MemoryFile

__all__ = [
    "DEAD_SLICE",
    "GATHER_TURNS",
    "MAX_RELEASING_BYTES",
    "MAX_RELEASING_RANGES",
    "PLAN_SLICE",
    "STEP_SECONDS",
    "ReleasePlan",
    "abort_release",
    "begin_release",
    "finish_release",
    "out_of_waste",
    "plan_release",
    "punch_all",
    "run_releaser",
]

logger = logging.getLogger("asyncpgalloc")

_SYSTEM = MemoryKind.SYSTEM

# Linux serialises fallocate() on shmem files: punching in bounded ranges keeps
# a concurrent decommit or commit from starving behind one huge punch.
MAX_RELEASING_BYTES = 128 << 20
# Many ranges share one executor hop, but planning a step stays short on the
# loop: it is O(ranges).
MAX_RELEASING_RANGES = 256
# Loop turns the releaser lets pass after waking, so that one hop serves the waste
# of several turns of a busy caller (an idle loop turns in microseconds).
GATHER_TURNS = 1
# Ranges planned per call (~3 µs each), from at most DEAD_SLICE dead
# allocations (~0.5 µs each; adjacent ones make one range); calls go on until
# a loop slice is used up.
PLAN_SLICE = 32
DEAD_SLICE = 256
# A hop starts no new punch after this much CPU time, so that released pages
# become free (allocatable) about this often while committed memory is punched.
STEP_SECONDS = 0.005
# Accounting segments finished per slice (~1-2 µs each).
FINISH_SLICE = 256


@dataclass(frozen=True, slots=True)
class ReleasePlan:
    """One release step.

    ``released`` leaves waste-tracking (it is *releasing* until the step ends);
    ``decommit`` is punched (it may be wider than ``released`` when a huge page
    becomes wholly free); ``free`` becomes free afterwards (possibly empty);
    ``subreleased`` holds the new sub-release count of each huge page touched,
    0 meaning the entry goes away.
    """

    released: FileRange
    huge: bool
    decommit: FileRange
    free: FileRange
    subreleased: dict[int, int]


def _subrelease(
    subreleased: Mapping[int, int], huge_start: int, pages: int, updates: dict[int, int]
) -> bool:
    """Add ``pages`` sub-released pages to the huge page at ``huge_start``.

    Records the new count in ``updates`` and returns True if the huge page is now
    wholly released (and so becomes free).
    """
    new = subreleased.get(huge_start, 0) + pages
    if new == PAGES_PER_HUGE_PAGE:
        updates[huge_start] = 0
        return True
    updates[huge_start] = new
    return False


def plan_release(fr: FileRange, huge: bool, subreleased: Mapping[int, int]) -> ReleasePlan:
    """Plan the release of waste ``fr`` (gVisor's ``releaseLocked``), changing nothing.

    Differs from gVisor where docs/design.md §5 says it slips: when ``fr`` spans two or
    more huge pages and the first or last is still not wholly released, its new
    sub-release count is kept (gVisor computes it and drops it, losing those
    small pages for good).
    """
    updates: dict[int, int] = {}
    if not huge:
        return ReleasePlan(fr, False, fr, fr, updates)

    first_huge = huge_round_down(fr.start)
    last_huge = huge_round_down(fr.end - 1)
    first_end = first_huge + HUGE_PAGE_SIZE
    last_end = last_huge + HUGE_PAGE_SIZE
    if first_huge == last_huge:
        if _subrelease(subreleased, first_huge, fr.length // PAGE_SIZE, updates):
            # Punch the whole huge page, not just the last small pages, so that
            # khugepaged re-collapsing it cannot leave small pages committed.
            whole = FileRange(first_huge, first_end)
            return ReleasePlan(fr, True, whole, whole, updates)
        return ReleasePlan(fr, True, fr, FileRange(fr.start, fr.start), updates)

    if fr.start == first_huge or _subrelease(
        subreleased, first_huge, (first_end - fr.start) // PAGE_SIZE, updates
    ):
        decommit_start = free_start = first_huge
    else:
        decommit_start, free_start = fr.start, first_end
    if fr.end == last_end or _subrelease(
        subreleased, last_huge, (fr.end - last_huge) // PAGE_SIZE, updates
    ):
        decommit_end = free_end = last_end
    else:
        decommit_end, free_end = fr.end, last_huge
    free = FileRange(free_start, max(free_start, free_end))
    return ReleasePlan(fr, True, FileRange(decommit_start, decommit_end), free, updates)


def begin_release(
    mf: MemoryFile, limit: int = PLAN_SLICE, pending: dict[int, int] | None = None
) -> list[ReleasePlan]:
    """Move the next waste ranges to *releasing* and plan their release (on the loop).

    Small pages before huge, highest offsets first (huge pages at low offsets are
    older and more likely really huge), each range at most MAX_RELEASING_BYTES
    (gVisor's step), at most ``limit`` ranges from at most ``limit`` dead
    allocations. Dead allocations (whose waste transition ``dec_ref`` deferred)
    come first and go straight to *releasing*. ``pending`` carries sub-release
    counts between calls that make up one step. An empty list means that no waste
    is left (see :func:`out_of_waste`).
    """
    plans: list[ReleasePlan] = []
    # Later plans of this step must see the sub-release counts of earlier ones.
    if pending is None:
        pending = {}
    counts = ChainMap(pending, mf._subreleased)

    def plan(gap_start: int, end: int, huge: bool) -> None:
        """Plan ``[gap_start, end)`` from the top, in pieces of gVisor's step."""
        while end > gap_start:
            start = max(gap_start, end - MAX_RELEASING_BYTES)
            fr = FileRange(start, end)
            mf._releasing[fr] = None
            mf._count_release_begun(end - start)
            p = plan_release(fr, huge, counts)
            pending.update(p.subreleased)
            plans.append(p)
            end = start

    for huge, unwaste in ((False, mf._raw_unwaste_small), (True, mf._raw_unwaste_huge)):
        # Dead allocations (see memory_file) are released without becoming waste
        # first: they are not in a waste gap, just as releasing pages are not.
        if len(plans) < limit:
            for start, end in mf._take_dead(huge, DEAD_SLICE, limit - len(plans)):
                plan(start, end, huge)
        # gVisor takes LastLargeEnoughGap(1) again and again; walking the gaps
        # down from the top visits the same ones without an index query each.
        for gap_start, end in unwaste.gaps_descending():
            if len(plans) >= limit:
                break
            # At most the rest of this call's ranges from the top of the gap.
            start = max(gap_start, end - (limit - len(plans)) * MAX_RELEASING_BYTES)
            unwaste.insert_range(start, end, None)
            plan(start, end, huge)
    return plans


def out_of_waste(mf: MemoryFile) -> None:
    """No waste is left: the releaser sleeps, and wait_released() returns once the
    releasing pages are done."""
    mf._have_waste = False
    mf._release_wakeup.clear()
    if not mf._releasing:
        mf._released.set()


def punch_all(mf: MemoryFile, plans: list[ReleasePlan], punched: list[int]) -> None:
    """Punch the plans' ranges in order (blocking; one executor hop for the whole step).

    Starts no new punch once the thread has spent STEP_SECONDS of CPU time on it
    (freeing committed pages is the kernel's CPU work; time spent waiting for the
    GIL while the loop is busy, up to 5 ms per punch, must not count, or a busy
    loop would cut every step to one range). ``punched[0]`` counts the plans done
    so far, so that the caller knows even if this raises.
    """
    deadline = time.thread_time() + STEP_SECONDS
    for plan in plans:
        if punched[0] and time.thread_time() > deadline:
            return
        mf._decommit_or_zero(plan.decommit)
        punched[0] += 1


def abort_release(mf: MemoryFile, plan: ReleasePlan) -> None:
    """Return an unpunched plan's range to waste (the next step takes it again)."""
    fr = plan.released
    (mf._raw_unwaste_huge if plan.huge else mf._raw_unwaste_small).remove_range(fr.start, fr.end)
    del mf._releasing[fr]
    mf._count_release_aborted(fr.length)
    if not mf._have_waste:
        # A later begin_release of this step may have found no waste left.
        mf._made_waste()


def finish_release(mf: MemoryFile, plan: ReleasePlan, start: int, end: int) -> None:
    """Apply the part ``[start, end)`` of a release whose punch is done: its pages
    become free or sub-released. A huge plan is finished whole; a small one may be
    finished in consecutive parts, the last ending at ``plan.released.end``."""
    fr = plan.released
    if plan.huge:
        start, end = fr
        mf._set_subreleased(plan.subreleased)
        if plan.free.length:
            mf._unfree_huge.remove_range(plan.free.start, plan.free.end)
    else:
        mf._unfree_small.remove_range(start, end)
    mf._count_release_finished(end - start)
    account = mf._account
    # One pass: remove the accounting segments, then settle what they held.
    for s, e, ma in mf._raw_mem_acct.pop_range(start, end):
        if ma.kind is not _SYSTEM or not ma.waste_or_releasing:
            raise InvariantError(f"releasing pages [{s:#x}, {e:#x}) had state {ma}")
        if ma.known_committed:
            mf._known_committed_bytes -= e - s
            if account:
                mf._accounting.dec(e - s, _SYSTEM, ma.memcg_id)
    if end < fr.end:
        return
    del mf._releasing[fr]
    mf._released_bytes += fr.length
    if not mf._releasing and not mf._have_waste:
        mf._released.set()


def _part_end(mf: MemoryFile, plan: ReleasePlan, start: int) -> int:
    """Where the next part of ``plan`` from ``start`` ends: after FINISH_SLICE
    accounting segments for a small plan, so that finishing it can yield between
    parts; a huge plan is one part."""
    end = plan.released.end
    if plan.huge or end - start <= FINISH_SLICE * PAGE_SIZE:
        # Too few pages for more segments than a slice holds.
        return end
    for n, (_, e, _) in enumerate(mf._raw_mem_acct.visit_range(start, end), 1):
        if n == FINISH_SLICE:
            return min(e, end)
    return end


async def _finish_step(mf: MemoryFile, plans: list[ReleasePlan], punched: int) -> None:
    """Finish the punched plans and abort the rest, yielding to the loop between slices."""
    for plan in plans[punched:]:
        abort_release(mf, plan)
    deadline = time.monotonic() + SLICE_SECONDS
    for plan in plans[:punched]:
        start = plan.released.start
        while start < plan.released.end:
            stop = _part_end(mf, plan, start)
            finish_release(mf, plan, start, stop)
            start = stop
            if time.monotonic() > deadline:
                await asyncio.sleep(0)
                deadline = time.monotonic() + SLICE_SECONDS


async def run_releaser(mf: MemoryFile) -> None:
    """The releaser task's body: release waste until the file closes (gVisor's
    releaserMain).

    Sleeps on the file's wake-up event; each step punches its ranges in one
    executor hop while they are *releasing*, and the step's bookkeeping runs even
    if the task is cancelled during the punch. When the task ends other than by
    ``aclose()`` is the file's business (``MemoryFile._releaser``); no await runs
    once the coroutine is being closed with its loop gone.
    """
    while True:
        await mf._release_wakeup.wait()
        for _ in range(GATHER_TURNS):
            await asyncio.sleep(0)
        plans: list[ReleasePlan] = []
        punched = [0]
        try:
            # Planned PLAN_SLICE ranges at a time, in slices of the loop's time,
            # punched in one hop.
            pending: dict[int, int] = {}
            deadline = time.monotonic() + SLICE_SECONDS
            while len(plans) < MAX_RELEASING_RANGES:
                if time.monotonic() > deadline:
                    await asyncio.sleep(0)
                    deadline = time.monotonic() + SLICE_SECONDS
                new = begin_release(mf, PLAN_SLICE, pending)
                plans += new
                if len(new) < PLAN_SLICE and not (mf._dead_small or mf._dead_huge):
                    break  # that was all the waste there is
            if not plans:
                out_of_waste(mf)
                if mf._evict_when_idle:
                    # Out of release work: evict to make more (gVisor's releaserMain).
                    mf._evictions.start()
                continue
            mf._release_steps += 1
            await mf._blocking.run(punch_all, mf, plans, punched)
        except GeneratorExit:
            # The coroutine is being closed with its loop gone: nothing may await.
            plans = []
            raise
        finally:
            if plans:
                # Unpunched plans (cancelled while planning) go back to waste.
                await finish_uncancelled(_finish_step(mf, plans, punched[0]))
        # Let allocations in between release steps.
        await asyncio.sleep(0)
