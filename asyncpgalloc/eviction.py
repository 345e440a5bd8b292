"""Evictable memory users and the tasks that ask them to give memory back.

gVisor keeps, per EvictableMemoryUser, the set of its evictable ranges and at most
one goroutine evicting them, last range first. Here each of those goroutines is an
asyncio task owned by the file, and ``evict`` is a coroutine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from .core import SegmentSet
from .errors import InvalidRangeError, check_int_bounds
from .options import DelayedEviction
from .ranges import KEY_MAX, EvictableRange

__all__ = ["EvictableMemoryUser", "Evictions"]

logger = logging.getLogger("asyncpgalloc")


@runtime_checkable
class EvictableMemoryUser(Protocol):
    """A user of allocated memory that may be asked to free some of it under pressure.

    ``evict`` is not required to free anything. It may be called for a range that a
    racing :meth:`~asyncpgalloc.MemoryFile.mark_unevictable` has just made
    unevictable, and must then do nothing to it. After ``evict(er)`` the file
    considers ``er`` unevictable until it is marked evictable again. The object
    must be hashable (identity is fine): it is the key of its evictable ranges.

    **Ranges are merged.** A user's evictable ranges form one set, and adjacent or
    overlapping ranges merge (as in gVisor, whose per-user set merges too): after
    marking ``[0, 1M)``, ``[1M, 2M)`` and ``[2M, 3M)``, ``evict`` is called once,
    with ``[0, 3M)``. So ``er`` need not be a range that was marked: a user that
    keeps entries keyed by the range it marked must evict every entry that
    *overlaps* ``er`` (and only the part inside it, if entries can be split), not
    look ``er.start`` up. ``examples/sandbox_supervisor.py`` shows one way.
    """

    async def evict(self, er: EvictableRange) -> None:
        """Free (some of) the memory backing ``er``; may do nothing."""
        ...


class _UserState:
    __slots__ = ("ranges", "task")

    def __init__(self) -> None:
        self.ranges: SegmentSet[None] = SegmentSet()
        # The user's eviction task, while one runs; only that task removes the
        # user's state once it is running (as in gVisor).
        self.task: asyncio.Task[None] | None = None


class Evictions:
    """The evictable ranges of every user of one file, and their eviction tasks.

    Every method runs on the file's loop and is O(log n) in the user's ranges,
    except :meth:`start` (O(users)).
    """

    def __init__(self, mode: DelayedEviction, wake_releaser: Callable[[], None]) -> None:
        self._mode = mode
        self._wake_releaser = wake_releaser
        self._users: dict[EvictableMemoryUser, _UserState] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Evictions started (one per user per start), evict() calls, and those that raised.
        self.started = 0
        self.calls = 0
        self.failures = 0

    def mark_evictable(
        self, user: EvictableMemoryUser, er: EvictableRange, pressure_driven: bool
    ) -> None:
        start, end = _check(er)
        state = self._users.get(user)
        if state is None:
            state = self._users[user] = _UserState()
        for gap_start, gap_end in list(state.ranges.gaps(start, end)):
            state.ranges.insert_range(gap_start, gap_end, None)
        if state.task is None:
            if self._mode is DelayedEviction.DISABLED:
                self._start_user(user, state)
            elif self._mode is DelayedEviction.ENABLED and not pressure_driven:
                # The releaser evicts once it runs out of waste to release.
                self._wake_releaser()

    def mark_unevictable(self, user: EvictableMemoryUser, er: EvictableRange) -> None:
        start, end = _check(er)
        state = self._users.get(user)
        if state is None:
            return
        state.ranges.remove_range(start, end)
        if state.task is None and state.ranges.is_empty():
            del self._users[user]

    def mark_all_unevictable(self, user: EvictableMemoryUser) -> None:
        state = self._users.get(user)
        if state is None:
            return
        state.ranges = SegmentSet()
        if state.task is None:
            del self._users[user]

    def start(self) -> bool:
        """Start an eviction task for every user not being evicted; True if any started."""
        started_any = False
        for user, state in self._users.items():
            if state.task is None:
                self._start_user(user, state)
                started_any = True
        return started_any

    def _start_user(self, user: EvictableMemoryUser, state: _UserState) -> None:
        task = asyncio.get_running_loop().create_task(
            self._evict_user(user, state), name="asyncpgalloc-evict"
        )
        state.task = task
        self.started += 1
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _evict_user(self, user: EvictableMemoryUser, state: _UserState) -> None:
        try:
            while True:
                last = state.ranges.last_segment()
                if last is None:
                    return
                start, end, _ = last
                # Evict from the end: uses of a user's memory that start again (and
                # mark it unevictable) tend to start from the beginning.
                state.ranges.remove_range(start, end)
                self.calls += 1
                try:
                    await user.evict(EvictableRange(start, end))
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.failures += 1
                    logger.exception(
                        "evict(%s) of %r raised; going on", EvictableRange(start, end), user
                    )
        finally:
            state.task = None
            if self._users.get(user) is state and state.ranges.is_empty():
                del self._users[user]

    def evicting(self) -> bool:
        return bool(self._tasks)

    async def wait(self) -> None:
        """Until no eviction task is running (including ones started meanwhile)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def aclose(self, grace: float) -> None:
        """Cancel every eviction task and wait up to ``grace`` s for them to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            if pending:
                logger.warning(
                    "%d eviction task(s) did not stop within %.1f s of close", len(pending), grace
                )
        self._users.clear()

    def evictable_bytes(self) -> int:
        return sum(e - s for state in self._users.values() for s, e, _ in state.ranges)


def _check(er: EvictableRange) -> tuple[int, int]:
    start, end = er
    check_int_bounds("evictable range", start, end)
    if not 0 <= start < end <= KEY_MAX:
        raise InvalidRangeError(f"invalid evictable range [{start:#x}, {end:#x})")
    return start, end
