"""Releasing waste: planning a release step and the task that runs them.

The plan is pure (what to punch, what becomes free, which sub-release counts
change), so the seed's huge-page sub-release arithmetic can be tested on its own;
the task applies plans through the file in httpcore's shape: a synchronous state
change that returns the I/O still to do, the I/O in the executor, then a
synchronous finish that always runs.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .blocking import run_blocking
from .ranges import HUGE_PAGE_SIZE, PAGE_SIZE, PAGES_PER_HUGE_PAGE, FileRange, huge_round_down

if TYPE_CHECKING:
    from .memory_file import MemoryFile

__all__ = ["MAX_RELEASING_BYTES", "ReleasePlan", "plan_release", "run_releaser"]

logger = logging.getLogger("asyncpgalloc")

# Linux serialises fallocate() on shmem files: releasing in bounded steps keeps
# a concurrent decommit or commit from starving behind one huge punch.
MAX_RELEASING_BYTES = 128 << 20


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
    subreleased: dict[int, int], huge_start: int, pages: int, updates: dict[int, int]
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


def plan_release(fr: FileRange, huge: bool, subreleased: dict[int, int]) -> ReleasePlan:
    """Plan the release of waste ``fr`` (the seed's ``releaseLocked``), changing nothing.

    Differs from the seed where DESIGN.md §6 says it slips: when ``fr`` spans two or
    more huge pages and the first or last is still not wholly released, its new
    sub-release count is kept (the seed computes it and drops it, losing those
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


async def run_releaser(mf: MemoryFile) -> None:
    """The releaser task: release waste until the file closes (the seed's releaserMain).

    Sleeps on the file's wake-up event; each step punches at most
    ``MAX_RELEASING_BYTES`` in the executor while the range is *releasing*, and the
    step's bookkeeping runs even if the task is cancelled during the punch.
    """
    while True:
        await mf._release_wakeup.wait()
        plan = mf._begin_release()
        if plan is None:
            continue
        try:
            await run_blocking(mf._executor, mf._decommit_or_zero, plan.decommit)
        finally:
            mf._finish_release(plan)
        # One release step per loop turn: let allocations in between.
        await asyncio.sleep(0)
