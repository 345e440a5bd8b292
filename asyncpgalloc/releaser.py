"""Releasing waste: planning a release step and the task that runs them.

The planning and its bookkeeping are the page-state core's
(:meth:`~asyncpgalloc.pages.PageSets.begin_release`, ``finish_release``,
``abort_release``; the pure plan is :func:`~asyncpgalloc.pages.plan_release`);
this task applies them in httpcore's shape: a synchronous state change that
returns the I/O still to do, the I/O in the executor, then a finish that always
runs.

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
from collections.abc import Callable

from .blocking import SLICE_SECONDS, BlockingRunner, finish_uncancelled
from .core import MAX_RELEASING_BYTES, PageSets, ReleasePlan, plan_release
from .ranges import FileRange

__all__ = [
    "GATHER_TURNS",
    "MAX_RELEASING_BYTES",
    "MAX_RELEASING_RANGES",
    "PLAN_SLICE",
    "STEP_SECONDS",
    "ReleasePlan",
    "Releaser",
    "plan_release",
    "punch_all",
]

logger = logging.getLogger("asyncpgalloc")

# Many ranges share one executor hop, but planning a step stays short on the
# loop: it is O(ranges).
MAX_RELEASING_RANGES = 256
# Loop turns the releaser lets pass after waking, so that one hop serves the waste
# of several turns of a busy caller (an idle loop turns in microseconds).
GATHER_TURNS = 1
# Ranges planned per call (~3 µs each); calls go on until a loop slice is used up.
PLAN_SLICE = 32
# A hop starts no new punch after this much CPU time, so that released pages
# become free (allocatable) about this often while committed memory is punched.
STEP_SECONDS = 0.005

Punch = Callable[[FileRange], None]


def punch_all(punch: Punch, plans: list[ReleasePlan], punched: list[int]) -> None:
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
        punch(plan.decommit)
        punched[0] += 1


class Releaser:
    """The releaser task of one file (gVisor's releaserMain) and its two events.

    Built from the file's :class:`~asyncpgalloc.pages.PageSets`, its blocking
    runner and its punch (``decommit(range)``, blocking, run in the executor).
    ``wakeup`` is set when there may be waste to release; ``released`` is set
    exactly while no waste or releasing pages exist (``wait_released`` waits on
    it). ``on_idle``, if set, runs when release work runs out (evicting to make
    more, as gVisor's ENABLED delayed eviction does).
    """

    def __init__(self, pages: PageSets, blocking: BlockingRunner, punch: Punch) -> None:
        self._pages = pages
        self._blocking = blocking
        self._punch = punch
        self.on_idle: Callable[[], object] | None = None
        self._halted = False
        self._held = 0
        self.wakeup = asyncio.Event()
        self.released = asyncio.Event()
        self.released.set()
        #: Release steps run (one executor hop each).
        self.steps = 0

    def halt(self) -> None:
        """Stop for good, touching the sets no more (the file was poisoned: they may be
        inconsistent, and a plan made from them could punch pages still in use). A
        step in flight finishes its punch but not its bookkeeping; ``run`` returns."""
        self._halted = True
        self.wakeup.set()

    def hold(self) -> None:
        """Start no release step until as many :meth:`unhold` calls (a save copies
        pages: waste freed after its snapshot must keep its bytes). A step already
        under way finishes."""
        self._held += 1

    def unhold(self, *, wake: bool = True) -> None:
        """End a :meth:`hold`; the last one wakes the releaser for the waste that came
        meanwhile (``wake=False``: its loop is gone, nothing can run any more)."""
        self._held -= 1
        if not self._held and wake:
            self.wakeup.set()

    def waste_appeared(self) -> None:
        """The first waste since the releaser last ran out: wait_released() must wait,
        and the releaser must wake. While the core's ``has_waste`` stays set,
        ``released`` stays clear (it is set only after the core ran out of waste)."""
        self.released.clear()
        self.wakeup.set()

    async def run(self) -> None:
        """Release waste until cancelled.

        Sleeps on ``wakeup``; each step plans its ranges on the loop in slices, punches
        them in one executor hop while they are *releasing*, and the step's
        bookkeeping runs even if the task is cancelled during the punch. No await
        runs once the coroutine is being closed with its loop gone.
        """
        pages = self._pages
        while True:
            await self.wakeup.wait()
            for _ in range(GATHER_TURNS):
                await asyncio.sleep(0)
            if self._halted:
                return
            if self._held:
                self.wakeup.clear()  # unhold() sets it again
                continue
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
                    # The deadline is checked inside too: one call (up to DEAD_SLICE
                    # dead allocations, PLAN_SLICE ranges) may cost more than a slice.
                    new = pages.begin_release(PLAN_SLICE, pending, deadline)
                    plans += new
                    if not pages.has_dead() and (
                        not new or (len(new) < PLAN_SLICE and time.monotonic() <= deadline)
                    ):
                        break  # that was all the waste there is (not a cut at the deadline)
                if not plans:
                    self._out_of_waste()
                    continue
                self.steps += 1
                await self._blocking.run(punch_all, self._punch, plans, punched)
            except GeneratorExit:
                # The coroutine is being closed with its loop gone: nothing may await.
                plans = []
                raise
            finally:
                if plans and not self._halted:
                    # Unpunched plans (cancelled while planning) go back to waste.
                    await finish_uncancelled(self._finish_step(plans, punched[0]))
            # Let allocations in between release steps.
            await asyncio.sleep(0)

    def _out_of_waste(self) -> None:
        """No waste is left: sleep, and let wait_released() return once the releasing
        pages are done."""
        self.wakeup.clear()
        if self._pages.out_of_waste():
            self.released.set()
        if self.on_idle is not None:
            self.on_idle()

    async def _finish_step(self, plans: list[ReleasePlan], punched: int) -> None:
        """Finish the punched plans and abort the rest, yielding to the loop between slices."""
        pages = self._pages
        for plan in plans[punched:]:
            if pages.abort_release(plan):
                self.waste_appeared()
        deadline = time.monotonic() + SLICE_SECONDS
        for plan in plans[:punched]:
            start = plan.released.start
            while start < plan.released.end:
                stop = pages.release_part_end(plan, start)
                if pages.finish_release(plan, start, stop):
                    self.released.set()
                start = stop
                if time.monotonic() > deadline:
                    await asyncio.sleep(0)
                    deadline = time.monotonic() + SLICE_SECONDS
