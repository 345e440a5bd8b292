"""MemoryFileStats: bytes by page state, in the shape of trio's ``statistics()``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .ranges import PAGE_SIZE

if TYPE_CHECKING:
    from .loader import LoadProgress
    from .memory_file import MemoryFile

__all__ = ["MemoryFileCounters", "MemoryFileStats", "compute_stats", "load_fields"]


@dataclass(frozen=True, slots=True)
class MemoryFileStats:
    """A snapshot of a MemoryFile's pages; every page is counted in exactly one state.

    ``MemoryFile.stats()`` reads it from running totals in O(1); :func:`compute_stats`
    recounts it from the page sets.

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


def compute_stats(mf: MemoryFile) -> MemoryFileStats:
    """Count ``mf``'s pages by state from the page sets. O(segments) on the loop; no syscall.

    The reference that ``check_invariants`` compares ``mf.stats()`` (running totals)
    to: it reads only the sets, never the totals (``known_committed_bytes`` aside,
    which the invariants check against the accounting set separately).
    """
    total = mf.total_size()
    unfree_sets = (mf._unfree_small, mf._unfree_huge)
    used = sum(e - s for u in unfree_sets for s, e, refs in u.visit_range(0, total) if refs > 0)
    free = sum(e - s for u in unfree_sets for s, e in u.gaps(0, total))
    waste = sum(e - s for u in (mf._unwaste_small, mf._unwaste_huge) for s, e in u.gaps(0, total))
    huge_chunks = sum(1 for c in mf._chunks if c.huge)
    # A small release is finished in parts, yielding in between: its finished part
    # is free already (a gap), the rest still releasing.
    releasing = sum(
        fr.length - sum(e - s for u in unfree_sets for s, e in u.gaps(fr.start, fr.end))
        for fr in mf._releasing
    )
    return MemoryFileStats(
        total_size=total,
        used_bytes=used,
        waste_bytes=waste,
        releasing_bytes=releasing,
        free_bytes=free,
        subreleased_bytes=sum(mf._subreleased.values()) * PAGE_SIZE,
        known_committed_bytes=mf._known_committed_bytes,
        huge_chunks=huge_chunks,
        small_chunks=len(mf._chunks) - huge_chunks,
        **load_fields(mf.load_progress()),
    )
