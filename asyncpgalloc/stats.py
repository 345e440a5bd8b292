"""MemoryFileStats: bytes by page state, in the shape of trio's ``statistics()``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .working_set import WorkingSetStats

__all__ = [
    "LoadProgress",
    "MemoryFileCounters",
    "MemoryFileStats",
    "load_fields",
    "working_set_fields",
]


@dataclass(frozen=True, slots=True)
class MemoryFileStats:
    """A snapshot of a MemoryFile's pages; every page is counted in exactly one state.

    ``MemoryFile.stats()`` reads it from running totals in O(1);
    :func:`~asyncpgalloc.pages.count_states` recounts it from the page sets.

    Attributes:
        total_size: bytes in the file (whole 1 GiB chunks).
        used_bytes: allocated pages (reference count >= 1).
        waste_bytes: pages with no references waiting to be released or recycled.
        releasing_bytes: pages the releaser is punching right now.
        free_bytes: pages ready to allocate (uncommitted and zero).
        subreleased_bytes: released small pages inside huge pages not yet wholly free.
        known_committed_bytes: bytes known to be committed (a subset of used, waste
            and releasing; grows through ``update_usage``, ``save`` and allocations
            that commit their pages).
        huge_chunks: chunks backed by huge pages.
        small_chunks: chunks backed by small pages.
        load_total_bytes: page bytes a ``load(async_pages=True)`` has to read (0 for a
            file not loaded that way; see :class:`~asyncpgalloc.LoadProgress`).
        loaded_bytes: of those, read and checked so far.
        load_dropped_bytes: of those, never read (their pages became waste first).
        load_pending_bytes: of those, neither loaded nor dropped yet (unreadable).
        load_waiters: ``wait_loaded`` calls waiting now.
        load_waited_bytes: pending bytes waiters asked for, summed over every call.
        working_set_entries: ranges (1 MiB) in the working-set order ``save`` writes
            now (see :mod:`asyncpgalloc.working_set`).
        working_set_inherited: of those, from the checkpoint the file was loaded from
            (the order its loader prefetched).
        working_set_hits: guest faults on a block the loader had already started or
            loaded (prefetched, or reached in file order).
        working_set_misses: guest faults on a block still waiting in the loader's
            queue. ``working_set_hit_rate`` is hits / (hits + misses).
    """

    total_size: int
    used_bytes: int
    waste_bytes: int
    releasing_bytes: int
    free_bytes: int
    subreleased_bytes: int
    known_committed_bytes: int
    huge_chunks: int
    small_chunks: int
    load_total_bytes: int = 0
    loaded_bytes: int = 0
    load_dropped_bytes: int = 0
    load_pending_bytes: int = 0
    load_waiters: int = 0
    load_waited_bytes: int = 0
    working_set_entries: int = 0
    working_set_inherited: int = 0
    working_set_hits: int = 0
    working_set_misses: int = 0

    @property
    def working_set_hit_rate(self) -> float:
        """working_set_hits / (hits + misses); 0.0 before any such fault."""
        n = self.working_set_hits + self.working_set_misses
        return self.working_set_hits / n if n else 0.0


@dataclass(frozen=True, slots=True)
class LoadProgress:
    """Where an asynchronous page load stands (:meth:`MemoryFile.load_progress`).

    - ``total_bytes``: page bytes the checkpoint holds.
    - ``loaded_bytes``: bytes read into the file and checked so far.
    - ``dropped_bytes``: bytes never read because their pages became waste first.
    - ``pending_bytes``: bytes neither loaded nor dropped (still unreadable).
    - ``waiters``: ``wait_loaded`` calls waiting now.
    - ``waited_bytes``: pending bytes that waiters asked for, summed over every call.
    - ``wait_seconds``: time spent waiting, summed over every ``wait_loaded`` call.
    - ``elapsed_seconds``: since the load began, until it ended if it has.
    - ``done``: the loader has ended (successfully if ``error`` is None).
    - ``error``: the reason the load failed, or None.
    """

    total_bytes: int
    loaded_bytes: int
    dropped_bytes: int
    pending_bytes: int
    waiters: int
    waited_bytes: int
    wait_seconds: float
    elapsed_seconds: float
    done: bool
    error: str | None


def load_fields(progress: LoadProgress | None) -> dict[str, int]:
    """The ``load_*`` fields of :class:`MemoryFileStats` from a load's progress (zeros
    without one). O(1)."""
    if progress is None:
        return {}
    return {
        "load_total_bytes": progress.total_bytes,
        "loaded_bytes": progress.loaded_bytes,
        "load_dropped_bytes": progress.dropped_bytes,
        "load_pending_bytes": progress.pending_bytes,
        "load_waiters": progress.waiters,
        "load_waited_bytes": progress.waited_bytes,
    }


def working_set_fields(ws: WorkingSetStats) -> dict[str, int]:
    """The ``working_set_*`` fields of :class:`MemoryFileStats`. O(1)."""
    return {
        "working_set_entries": ws.entries,
        "working_set_inherited": ws.inherited,
        "working_set_hits": ws.hits,
        "working_set_misses": ws.misses,
    }


@dataclass(frozen=True, slots=True)
class MemoryFileCounters:
    """What a MemoryFile has done since it opened (monotonic counts, for metrics).

    Attributes:
        allocations: successful page takes by ``allocate``, ``allocate_async`` and
            ``allocate_from`` (including ones whose commit then failed and returned
            the pages).
        allocated_bytes: bytes of those allocations.
        release_steps: releaser steps (one executor hop each).
        released_bytes: waste bytes the releaser gave back to the host.
        evictions_started: eviction tasks started (one per user per start).
        evict_calls: ``evict`` calls made.
        evict_failures: ``evict`` calls that raised.
        pressure_events: memory-cgroup pressure notifications received.
        usage_scans: ``update_usage`` scans run (calls answered by the fast path,
            the throttle or by joining another scan are not counted).
    """

    allocations: int
    allocated_bytes: int
    release_steps: int
    released_bytes: int
    evictions_started: int
    evict_calls: int
    evict_failures: int
    pressure_events: int
    usage_scans: int
