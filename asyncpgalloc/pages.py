"""The page-state core: every page transition of gVisor's MemoryFile, and no I/O.

:class:`PageSets` is the state machine of gVisor's ``MemoryFile`` without its
file, mappings, executor or tasks: synchronous methods, no ``await``, nothing of
asyncio, mmap or the executor. The asyncio shell (:class:`~asyncpgalloc.MemoryFile`)
owns those and calls it; where a transition needs I/O it returns what to do (a
growth to map, the release plans to punch, a scan span to ``mincore``) and a
second call applies the result, in the shape of httpcore's pool and h11.

Page states (gVisor's long comment on MemoryFile is the reference)::

    void -> free -> used -> waste -> releasing -> free
                                                \\-> sub-released (small pages of a
                                                    huge page not yet wholly released)

The sets, per page size (small pages and huge-page-backed chunks are tracked
apart):

- ``unfree_*`` holds every non-free page with its reference count; its gaps are
  the free pages. Pages beyond the file are void: non-free with no reference.
- ``unwaste_*`` holds every non-waste page; its gaps are the waste pages.
- ``mem_acct`` holds the :class:`MemAcct` of every used, waste and releasing page;
  its gaps are pages known to be uncommitted.
- ``subreleased`` counts, per huge page, the small pages of it already released.
- ``releasing`` holds the ranges being punched right now.

Invariants (checked by :mod:`asyncpgalloc.invariants`, docs/design.md §3):

1. A chunk's pages live in its own page size's sets; the other size's sets hold
   them as void.
2. Used pages have references, are in ``unwaste`` and are accounted as used.
   Waste pages have none, are not releasing and are accounted as SYSTEM waste.
   Free pages have no accounting state.
3. The running totals behind :meth:`PageSets.stats` equal a recount of the sets;
   ``known_committed_bytes`` is the span of known-committed accounting segments,
   and the :class:`~asyncpgalloc.MemoryAccounting` holds exactly those bytes.
4. A known-committed segment has ``commit_seq`` 0; any other holds the commit
   sequence when it last stopped being known-committed, so that a usage scan that
   began before a decommit never marks its pages.

A ``dec_ref`` that drops an allocation's last reference updates the reference
counts at once but only queues the range as *dead*: its waste transition (out of
``unwaste_*``, accounting reclassified as SYSTEM) is applied before anything reads
those sets. :meth:`PageSets.settle` applies them; :meth:`PageSets.view` and every
transition that reads the sets settle first, and the hot paths touch only pages
that are not dead. Adjacent dead allocations then leave ``unwaste_*`` in one
step, and the releaser takes dead allocations straight to *releasing*.
"""

from __future__ import annotations

import math
import time
from collections import ChainMap
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from heapq import heapify, heappop, heappush
from typing import NamedTuple

# Absolute imports: this source is also compiled as asyncpgalloc._compiled.pages (see
# setup.py), where a relative import would look inside _compiled. Only .segments is
# relative, so the compiled copy uses the compiled segment sets and this one the Python ones.
from asyncpgalloc.accounting import MemoryAccounting, MemoryKind
from asyncpgalloc.errors import (
    InvalidLengthError,
    InvalidRangeError,
    InvariantError,
    OutOfMemoryError,
    ReferenceCountError,
    check_int_bounds,
)
from asyncpgalloc.options import AllocationMode, AllocOpts, Direction
from asyncpgalloc.ranges import (
    CHUNK_SHIFT,
    CHUNK_SIZE,
    HUGE_PAGE_SIZE,
    KEY_MAX,
    PAGE_SIZE,
    PAGES_PER_HUGE_PAGE,
    FileRange,
    huge_round_down,
)
from asyncpgalloc.stats import MemoryFileStats

from .segments import SegmentSet

__all__ = [
    "DEAD_SLICE",
    "MAX_RELEASING_BYTES",
    "MemAcct",
    "PageSets",
    "PageView",
    "ReleasePlan",
    "new_mem_acct_set",
    "new_unfree_set",
    "plan_release",
]

_SYSTEM = MemoryKind.SYSTEM
_UNCOMMITTED = AllocationMode.UNCOMMITTED
_BOTTOM_UP = Direction.BOTTOM_UP
_PAGE_MASK = PAGE_SIZE - 1
_new_tuple = tuple.__new__

# Linux serialises fallocate() on shmem files: punching in bounded ranges keeps
# a concurrent decommit or commit from starving behind one huge punch.
MAX_RELEASING_BYTES = 128 << 20
# Dead allocations taken per begin_release call (~0.5 µs each; adjacent ones make
# one range).
DEAD_SLICE = 256
# Accounting segments finished per part of a small release (~1-2 µs each).
FINISH_SLICE = 256


class MemAcct(NamedTuple):
    """Accounting state of a run of used, waste or releasing pages (gVisor's memAcctInfo).

    ``commit_seq`` is the file's commit sequence when ``known_committed`` last
    became False (0 while known-committed), so that a usage scan racing with a
    decommit never marks decommitted pages committed.
    """

    kind: MemoryKind
    memcg_id: int
    known_committed: bool
    waste_or_releasing: bool
    commit_seq: int


def new_unfree_set() -> SegmentSet[int]:
    """An empty reference-count set as the core keeps it (use it to rebuild one).

    Non-merging, so that each allocation stays one segment and a whole-allocation
    ``dec_ref``/``inc_ref`` finds its count with one dict lookup; gaps (free pages)
    are indexed by length for allocation.
    """
    return SegmentSet(merge=False)


def new_mem_acct_set() -> SegmentSet[MemAcct]:
    """An empty accounting set as the core keeps it (use it to rebuild one).

    Non-merging like :func:`new_unfree_set`, and without a gap index: nothing looks
    for unaccounted pages by length.
    """
    return SegmentSet(merge=False, gap_index=False)


# ---------------------------------------------------------------------- release plans


@dataclass(frozen=True, slots=True)
class ReleasePlan:
    """One range of a release step.

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


# ---------------------------------------------------------------------- views


class PageView(NamedTuple):
    """A read-only look at the core's state with every dead allocation settled, for
    the code that reads the sets whole (recounts, invariants, maps, checkpoints).

    The sets are the core's own (no copy): valid until the next transition, and
    never to be changed through the view.
    """

    unfree_small: SegmentSet[int]
    unfree_huge: SegmentSet[int]
    unwaste_small: SegmentSet[None]
    unwaste_huge: SegmentSet[None]
    mem_acct: SegmentSet[MemAcct]
    subreleased: Mapping[int, int]
    releasing: Sequence[FileRange]
    chunk_huge: Sequence[bool]
    commit_seq: int
    known_committed_bytes: int

    @property
    def total_size(self) -> int:
        return len(self.chunk_huge) * CHUNK_SIZE

    def unfree(self, huge: bool) -> SegmentSet[int]:
        return self.unfree_huge if huge else self.unfree_small

    def unwaste(self, huge: bool) -> SegmentSet[None]:
        return self.unwaste_huge if huge else self.unwaste_small


def count_states(view: PageView) -> MemoryFileStats:
    """Count pages by state from the sets of ``view``. O(segments); no syscall.

    The reference that the invariants compare :meth:`PageSets.stats` (running
    totals) to: it reads only the sets, never the totals (``known_committed_bytes``
    aside, which the invariants check against the accounting set separately).
    """
    total = view.total_size
    unfree_sets = (view.unfree_small, view.unfree_huge)
    used = sum(e - s for u in unfree_sets for s, e, refs in u.visit_range(0, total) if refs > 0)
    free = sum(e - s for u in unfree_sets for s, e in u.gaps(0, total))
    waste = sum(e - s for u in (view.unwaste_small, view.unwaste_huge) for s, e in u.gaps(0, total))
    huge_chunks = sum(1 for h in view.chunk_huge if h)
    # A small release is finished in parts, yielding in between: its finished part
    # is free already (a gap), the rest still releasing.
    releasing = sum(
        fr.length - sum(e - s for u in unfree_sets for s, e in u.gaps(fr.start, fr.end))
        for fr in view.releasing
    )
    return MemoryFileStats(
        total_size=total,
        used_bytes=used,
        waste_bytes=waste,
        releasing_bytes=releasing,
        free_bytes=free,
        subreleased_bytes=sum(view.subreleased.values()) * PAGE_SIZE,
        known_committed_bytes=view.known_committed_bytes,
        huge_chunks=huge_chunks,
        small_chunks=len(view.chunk_huge) - huge_chunks,
    )


def format_segments(view: PageView, *, huge_sets: bool) -> str:
    """Every segment of ``view``'s sets, as gVisor's ``String()`` (``huge_sets``:
    include the huge-page sets and sub-release counts). O(segments)."""
    parts = [f"unwaste_small:\n{view.unwaste_small}"]
    if huge_sets:
        parts.append(f"unwaste_huge:\n{view.unwaste_huge}")
    parts.append(f"unfree_small:\n{view.unfree_small}")
    if huge_sets:
        parts.append(f"unfree_huge:\n{view.unfree_huge}")
        parts.append(
            "subreleased:\n"
            + "".join(f"- {off:#x}: {n}\n" for off, n in sorted(view.subreleased.items()))
        )
    parts.append(f"mem_acct:\n{view.mem_acct}")
    return "".join(parts)


# ---------------------------------------------------------------------- the core


class PageSets:
    """The page sets of one memory file and every transition between page states.

    Synchronous and I/O-free: see the module docstring for the states, the sets and
    their invariants. Methods that validate their input raise before changing
    anything. The caller (one event loop's thread) serialises calls.

    ``accounting`` receives every change of known-committed bytes unless
    ``account`` is False. ``on_committed_waste(start, end)``, when set, is told of
    known-committed pages that become waste (the page loader drops them).
    """

    def __init__(self, accounting: MemoryAccounting, *, account: bool) -> None:
        self._accounting = accounting
        self._account = account
        # Initially every page is void: non-free and non-waste in both page sizes.
        self._unwaste_small: SegmentSet[None] = SegmentSet()
        self._unwaste_huge: SegmentSet[None] = SegmentSet()
        self._unfree_small: SegmentSet[int] = new_unfree_set()
        self._unfree_huge: SegmentSet[int] = new_unfree_set()
        for s in (self._unwaste_small, self._unwaste_huge):
            s.insert_range(0, KEY_MAX, None)
        for u in (self._unfree_small, self._unfree_huge):
            u.insert_range(0, KEY_MAX, 0)
        self._subreleased: dict[int, int] = {}
        self._mem_acct: SegmentSet[MemAcct] = new_mem_acct_set()
        # The page size of each chunk of the file (the shell holds the mappings).
        self._chunk_huge: list[bool] = []
        # Allocations whose last reference is gone, waste transition pending (see
        # the module docstring), per page size. Each is a start: the allocation
        # stays one segment of its unfree set (with no references) until taken, so
        # that set knows its end. Plain ints keep the lists cheap and out of the
        # cyclic GC's way. dec_ref appends to the new tail (_dead_*); _take_dead
        # moves it into the backlog (_dead_heap_*), a heap of negated starts, so that
        # taking the k highest costs O(k log n) instead of a sort of the whole queue.
        self._dead_small: list[int] = []
        self._dead_huge: list[int] = []
        self._dead_heap_small: list[int] = []
        self._dead_heap_huge: list[int] = []
        # An ordered set: a release step adds and removes hundreds of ranges.
        self._releasing: dict[FileRange, None] = {}
        # True from the first waste until the releaser finds none left.
        self._have_waste = False
        # Shared accounting values: one MemAcct object serves every allocation made
        # with the same options between two commit-sequence changes, instead of
        # ~100 bytes each; waste and known-committed values likewise.
        self._last_acct: tuple[AllocOpts | None, int, MemAcct | None] = (None, -1, None)
        self._waste_accts: dict[MemAcct, MemAcct] = {}
        self._committed_accts: dict[MemAcct, MemAcct] = {}
        self._known_committed_bytes = 0
        self._commit_seq = 0
        # Running totals of the page states, kept at every transition so that stats()
        # is O(1); count_states() is the O(segments) recount that the invariants
        # compare them to. Free bytes are the rest of the file. A dead allocation
        # counts as waste from its last dec_ref on: its bytes are in _dead_bytes
        # (one add on dec_ref's fast path) and stay in _used_bytes until
        # _take_dead moves them to _waste_bytes.
        self._used_bytes = 0
        self._waste_bytes = 0
        self._dead_bytes = 0
        self._releasing_bytes = 0
        self._subreleased_pages = 0
        self._huge_chunks = 0
        # Monotonic counts (see MemoryFileCounters).
        self.allocations = 0
        self.allocated_bytes = 0
        self.released_bytes = 0
        self.on_committed_waste: Callable[[int, int], None] | None = None
        #: While True, waste keeps its pages as they are: allocations do not recycle
        #: it (the shell holds the releaser too). Set while a save copies pages.
        self.hold_waste = False

    # ------------------------------------------------------------------ reading

    @property
    def known_committed_bytes(self) -> int:
        """Bytes known to be committed (the span of known-committed accounting segments)."""
        return self._known_committed_bytes

    @property
    def commit_seq(self) -> int:
        return self._commit_seq

    @property
    def chunk_count(self) -> int:
        return len(self._chunk_huge)

    @property
    def total_size(self) -> int:
        return len(self._chunk_huge) * CHUNK_SIZE

    @property
    def has_waste(self) -> bool:
        """True from the first waste until :meth:`out_of_waste` (the releaser's flag)."""
        return self._have_waste

    @property
    def releasing(self) -> bool:
        """True while any range is being released."""
        return bool(self._releasing)

    def has_dead(self) -> bool:
        """True if dead allocations wait for their waste transition."""
        return bool(
            self._dead_small or self._dead_huge or self._dead_heap_small or self._dead_heap_huge
        )

    def view(self) -> PageView:
        """The sets, dead allocations settled (see :class:`PageView`). O(dead)."""
        self.settle()
        return PageView(
            self._unfree_small,
            self._unfree_huge,
            self._unwaste_small,
            self._unwaste_huge,
            self._mem_acct,
            self._subreleased,
            tuple(self._releasing),
            tuple(self._chunk_huge),
            self._commit_seq,
            self._known_committed_bytes,
        )

    def stats(self) -> MemoryFileStats:
        """Bytes by page state from the running totals. O(1)."""
        n_chunks = len(self._chunk_huge)
        total = n_chunks * CHUNK_SIZE
        dead = self._dead_bytes
        used, waste = self._used_bytes - dead, self._waste_bytes + dead
        releasing = self._releasing_bytes
        subreleased = self._subreleased_pages * PAGE_SIZE
        return MemoryFileStats(
            total_size=total,
            used_bytes=used,
            waste_bytes=waste,
            releasing_bytes=releasing,
            free_bytes=total - used - waste - releasing - subreleased,
            subreleased_bytes=subreleased,
            known_committed_bytes=self._known_committed_bytes,
            huge_chunks=self._huge_chunks,
            small_chunks=n_chunks - self._huge_chunks,
        )

    def known_committed_runs(self) -> list[tuple[int, int]]:
        """Known-committed used pages, as merged ascending runs. O(segments)."""
        out: list[tuple[int, int]] = []
        for s, e, ma in self.view().mem_acct:
            if ma.known_committed and not ma.waste_or_releasing:
                if out and out[-1][1] == s:
                    out[-1] = (out[-1][0], e)
                else:
                    out.append((s, e))
        return out

    # ------------------------------------------------------------------ ranges

    def check_range(self, fr: FileRange, op: str) -> tuple[int, int]:
        """``fr`` as (start, end) if it is a non-empty page-aligned range inside the
        file; else :class:`~asyncpgalloc.InvalidRangeError` naming ``op``."""
        start, end = fr
        check_int_bounds(op, start, end)
        size = len(self._chunk_huge) * CHUNK_SIZE
        if not (0 <= start < end <= size) or (start | end) % PAGE_SIZE:
            raise InvalidRangeError(
                f"{op}: invalid range [{start:#x}, {end:#x}): it must be non-empty, "
                f"page-aligned and inside the file ({size:#x} bytes)"
            )
        return start, end

    def size_pieces(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        """Split ``[start, end)`` (inside the file) into maximal pieces of chunks of one
        page size: (start, end, huge)."""
        chunk_huge = self._chunk_huge
        first = start >> CHUNK_SHIFT
        last = (end - 1) >> CHUNK_SHIFT
        huge = chunk_huge[first]
        if first == last:
            return [(start, end, huge)]
        pieces: list[tuple[int, int, bool]] = []
        piece_start = start
        for i in range(first + 1, last + 1):
            if chunk_huge[i] != huge:
                pieces.append((piece_start, i << CHUNK_SHIFT, huge))
                piece_start, huge = i << CHUNK_SHIFT, chunk_huge[i]
        pieces.append((piece_start, end, huge))
        return pieces

    def referenced_pieces(self, fr: FileRange, op: str) -> list[tuple[int, int, bool]]:
        """Validate that every page of ``fr`` holds a reference (else
        :class:`~asyncpgalloc.ReferenceCountError`); return its per-page-size pieces."""
        start, end = self.check_range(fr, op)
        pieces = self.size_pieces(start, end)
        for s, e, huge in pieces:
            unfree = self._unfree_huge if huge else self._unfree_small
            if not unfree.is_fully_covered(s, e) or any(
                refs <= 0 for _, _, refs in unfree.visit_range(s, e)
            ):
                raise ReferenceCountError(
                    f"{op}({FileRange(start, end)}): pages that hold no reference: "
                    + _describe_ranges(_unreferenced(unfree, s, e))
                )
        return pieces

    # ------------------------------------------------------------------ growth

    def plan_growth(self, length: int, huge: bool, max_chunks: int, mappable: int) -> int:
        """The chunk count the file must grow to for ``length`` bytes of ``huge``
        pages (the free tail of the last chunk counts). Raises
        :class:`~asyncpgalloc.OutOfMemoryError` past ``max_chunks`` or ``mappable``
        (checked before anything is mapped: the mmaps would fail only after seconds
        of mapping chunk after chunk). Changes nothing."""
        unfree = self._unfree_huge if huge else self._unfree_small
        chunk_huge = self._chunk_huge
        old_size = len(chunk_huge) * CHUNK_SIZE
        tail = 0
        if chunk_huge and chunk_huge[-1] == huge:
            gap = unfree.find_gap(old_size - 1)
            if gap is not None:
                tail = gap[1] - gap[0]
        new_count = len(chunk_huge) + (length - tail + CHUNK_SIZE - 1) // CHUNK_SIZE
        if new_count > max_chunks:
            raise OutOfMemoryError(
                f"cannot grow the file to {new_count} chunks of 1 GiB (limit {max_chunks})"
            )
        if new_count > mappable:
            raise OutOfMemoryError(
                f"cannot grow the file to {new_count} chunks of 1 GiB: the address space "
                f"holds at most {mappable}"
            )
        return new_count

    def add_chunks(self, count: int, huge: bool) -> None:
        """``count`` new chunks of ``huge`` pages (mapped by the caller) become free."""
        unfree = self._unfree_huge if huge else self._unfree_small
        old_size = len(self._chunk_huge) * CHUNK_SIZE
        self._chunk_huge.extend([huge] * count)
        if huge:
            self._huge_chunks += count
        unfree.remove_range(old_size, old_size + count * CHUNK_SIZE)

    # ------------------------------------------------------------------ allocation

    def allocate_uncommitted(self, length: int, opts: AllocOpts, huge: bool) -> FileRange | None:
        """Mark free pages used for an UNCOMMITTED allocation (never recycles waste):
        gVisor's findAllocatableAndMarkUsed from its retryFree label. None if no free
        gap fits (grow the file, then :meth:`allocate`). O(log n). ``length`` must be
        valid (:meth:`allocate` checks it)."""
        unfree = self._unfree_huge if huge else self._unfree_small
        if opts.direction is _BOTTOM_UP:
            start_ = unfree.take_first_gap(length, 1)
        else:
            start_ = unfree.take_last_gap(length, 1)
        if start_ is None:
            return None
        start = start_
        end = start + length
        last = self._last_acct
        ma = last[2]
        if last[0] is not opts or last[1] != self._commit_seq or ma is None:
            ma = self._used_acct(opts)
        self._mem_acct.insert_range(start, end, ma)
        self.allocations += 1
        self.allocated_bytes += length
        self._used_bytes += length
        # FileRange(start, end) without NamedTuple's Python-level __new__.
        return _new_tuple(FileRange, (start, end))

    def allocate(self, length: int, opts: AllocOpts, huge: bool) -> tuple[FileRange, bool] | None:
        """Take pages for an allocation: (range, recycled waste?), or None if the file
        must grow first (:meth:`plan_growth`). Raises
        :class:`~asyncpgalloc.InvalidLengthError` for a zero, unaligned or (huge)
        non-huge-aligned length. Committing modes recycle waste first (it avoids
        decommitting and committing again); recycled pages hold old data and must
        be zeroed before use. O(log n)."""
        if length <= 0 or length & _PAGE_MASK or (opts.huge and length % HUGE_PAGE_SIZE):
            raise InvalidLengthError(f"invalid allocation length: {length:#x}")
        bottom_up = opts.direction is _BOTTOM_UP
        unfree = self._unfree_huge if huge else self._unfree_small
        if opts.mode is not _UNCOMMITTED and not self.hold_waste:
            self.settle()
            unwaste = self._unwaste_huge if huge else self._unwaste_small
            gap = (
                unwaste.first_large_enough_gap(length)
                if bottom_up
                else unwaste.last_large_enough_gap(length)
            )
            if gap is not None:
                start = gap[0] if bottom_up else gap[1] - length
                end = start + length
                unwaste.insert_range(start, end, None)
                unfree.mutate_range(start, end, _ref_recycled)
                self._waste_bytes -= length
                if not unfree.merges and unfree.get_exact(start, end, None) is None:
                    # One segment per allocation keeps dec_ref on its fast path.
                    unfree.remove_range(start, end)
                    unfree.insert_range(start, end, 1)
                kind, memcg_id = opts.kind, opts.memcg_id

                def recycle(s: int, e: int, ma: MemAcct) -> MemAcct:
                    commit_seq = ma.commit_seq
                    if ma.known_committed:
                        if ma.kind is not _SYSTEM:
                            raise InvariantError(
                                f"waste pages [{s:#x}, {e:#x}) have kind {ma.kind}"
                            )
                        commit_seq = 0
                        self._known_committed_bytes -= e - s
                        if self._account:
                            self._accounting.dec(e - s, _SYSTEM, ma.memcg_id)
                    return MemAcct(kind, memcg_id, False, False, commit_seq)

                self._mem_acct.mutate_range(start, end, recycle)
                self._count_allocation(length)
                return FileRange(start, end), True

        gap = (
            unfree.first_large_enough_gap(length)
            if bottom_up
            else unfree.last_large_enough_gap(length)
        )
        if gap is None:
            return None
        start = gap[0] if bottom_up else gap[1] - length
        end = start + length
        unfree.insert_range(start, end, 1)
        # Unknown commitment from now on: users may commit these pages at any time.
        self._mem_acct.insert_range(start, end, self._used_acct(opts))
        self._count_allocation(length)
        return FileRange(start, end), False

    def _count_allocation(self, length: int) -> None:
        self.allocations += 1
        self.allocated_bytes += length
        self._used_bytes += length

    def _used_acct(self, opts: AllocOpts) -> MemAcct:
        """The accounting value of newly used pages (unknown commitment), shared while
        ``opts`` and the commit sequence stay the same."""
        last = self._last_acct
        ma = last[2]
        if last[0] is opts and last[1] == self._commit_seq and ma is not None:
            return ma
        ma = MemAcct(opts.kind, opts.memcg_id, False, False, self._commit_seq)
        self._last_acct = (opts, self._commit_seq, ma)
        return ma

    def _waste_acct(self, ma: MemAcct) -> MemAcct:
        """``ma`` reclassified as SYSTEM waste, shared between equal values."""
        cache = self._waste_accts
        w = cache.get(ma)
        if w is None:
            if len(cache) >= 256:
                cache.clear()
            w = cache[ma] = MemAcct(_SYSTEM, ma.memcg_id, ma.known_committed, True, ma.commit_seq)
        return w

    def mark_allocation_committed(self, fr: FileRange) -> None:
        """Mark the pages of a new allocation that the caller committed (fallocated,
        populated or zeroed) known-committed, with the allocation's kind and memcg.
        After the I/O; O(log n) (O(k log n) for k accounting segments of recycled
        pages).

        A deliberate difference from gVisor: its ``Allocate`` leaves committed pages
        of unknown commitment until a usage scan finds them, but a scan cannot see
        pages committed by ``fallocate`` and never touched (COMMIT), so a budget
        enforced from the accounting would under-count them for good. Pages a usage
        scan marked while the I/O ran are already known and are skipped; the
        allocation is still the caller's alone (not yet returned), so no decommit or
        release can have raced with the commit.
        """
        start, end = fr
        mem_acct = self._mem_acct
        ma = mem_acct.get_exact(start, end, None)
        if ma is None:
            mem_acct.mutate_range(start, end, self._commit_known)
        elif not ma.known_committed:
            mem_acct.replace_value(start, self._commit_known(start, end, ma))

    def _commit_known(self, s: int, e: int, ma: MemAcct) -> MemAcct:
        """``ma`` of used pages ``[s, e)`` made known-committed, counted and accounted."""
        if ma.known_committed:
            return ma
        self._known_committed_bytes += e - s
        if self._account:
            self._accounting.inc(e - s, ma.kind, ma.memcg_id)
        return self._committed_value(ma)

    def _committed_value(self, ma: MemAcct) -> MemAcct:
        """``ma`` (of used pages) made known-committed, shared between equal values."""
        cache = self._committed_accts
        c = cache.get(ma)
        if c is None:
            if len(cache) >= 256:
                cache.clear()
            c = cache[ma] = MemAcct(ma.kind, ma.memcg_id, True, False, 0)
        return c

    # ------------------------------------------------------------------ references

    def inc_ref(self, fr: FileRange) -> None:
        """One more reference on every page of ``fr``. O(k log n); raises as
        :meth:`referenced_pieces` (and for a bad range) before changing anything."""
        start, end = fr
        hit = self._whole_allocation(start, end)
        if hit is not None:
            hit[0].replace_value(start, hit[1] + 1)
            return
        for start, end, huge in self.referenced_pieces(fr, "inc_ref"):
            unfree = self._unfree_huge if huge else self._unfree_small
            unfree.mutate_range(start, end, _ref_inc)

    def dec_ref(self, fr: FileRange) -> bool:
        """One reference fewer on every page of ``fr``; pages left with none become
        waste. Returns True if that made the first waste since the releaser last ran
        out (wake it). A whole allocation costs two dict hits and, for its last
        reference, a list append (see the module docstring); any other range
        O(k log n). Raises as :meth:`inc_ref` before changing anything."""
        start, end = fr
        # Inlined _whole_allocation(start, end): this is the hottest path there is.
        unfree = self._unfree_small
        refs = unfree.get_exact(start, end, 0)
        dead = self._dead_small
        if not refs:
            unfree = self._unfree_huge
            refs = unfree.get_exact(start, end, 0)
            dead = self._dead_huge
        if refs and type(start) is int is type(end):
            # Validating it was one dict hit; the update cannot fail halfway.
            unfree.replace_value(start, refs - 1)
            if refs == 1:
                if self._known_committed_bytes and self._settle_now(start, end):
                    # Known-committed pages move to SYSTEM in the accounting now:
                    # callers may read a shared MemoryAccounting at any time.
                    self._settle((start, end), dead is self._dead_huge)
                    self._count_waste(end - start)
                else:
                    dead.append(start)
                    self._dead_bytes += end - start
                if not self._have_waste:
                    self._have_waste = True
                    return True
            return False
        return self._dec_ref_slow(fr)

    def _dec_ref_slow(self, fr: FileRange) -> bool:
        """dec_ref of any range: validate every page, then mutate piece by piece."""
        pieces = self.referenced_pieces(fr, "dec_ref")
        dead: list[tuple[int, int]] = []

        def dec(s: int, e: int, refs: int) -> int:
            if refs == 1:
                dead.append((s, e))
            return refs - 1

        made_waste = False
        for start, end, huge in pieces:
            (self._unfree_huge if huge else self._unfree_small).mutate_range(start, end, dec)
            for piece in dead:
                self._settle(piece, huge)
                self._count_waste(piece[1] - piece[0])
            made_waste = made_waste or bool(dead)
            dead.clear()
        if made_waste and not self._have_waste:
            self._have_waste = True
            return True
        return False

    def has_unique_ref(self, fr: FileRange) -> bool:
        """True if every page of ``fr`` has exactly one reference. O(k log n); raises
        as :meth:`inc_ref` if a page holds no reference.

        Unlike gVisor (docs/design.md §5), it looks at each chunk's own part of
        ``fr`` in that chunk's page-size set."""
        start, end = fr
        hit = self._whole_allocation(start, end)
        if hit is not None:
            return hit[1] == 1
        for start, end, huge in self.referenced_pieces(fr, "has_unique_ref"):
            unfree = self._unfree_huge if huge else self._unfree_small
            for _, _, refs in unfree.visit_range(start, end):
                if refs != 1:
                    return False
        return True

    def _whole_allocation(self, start: int, end: int) -> tuple[SegmentSet[int], int] | None:
        """If ``[start, end)`` is exactly one segment with references (a whole
        allocation, or a range made one by an earlier slow-path call): its
        reference-count set and count. None for any other range (the slow path
        judges it). One or two dict hits.

        A set holds a referenced segment only over chunks of its own page size
        (elsewhere it holds void), so the hit also says which set it is.
        """
        if type(start) is int is type(end):
            for unfree in (self._unfree_small, self._unfree_huge):
                refs = unfree.get_exact(start, end, 0)
                if refs:
                    return unfree, refs
        return None

    # ------------------------------------------------------------------ waste

    def _count_waste(self, n: int) -> None:
        """``n`` used bytes became waste (settled: not in a dead queue)."""
        self._used_bytes -= n
        self._waste_bytes += n

    def _settle_now(self, start: int, end: int) -> bool:
        """True if any page of the dead allocation ``[start, end)`` is known committed."""
        mem_acct = self._mem_acct
        ma = mem_acct.get_exact(start, end, None)
        if ma is None:
            return any(ma.known_committed for _, _, ma in mem_acct.visit_range(start, end))
        return ma.known_committed

    def _settle(self, fr: tuple[int, int], huge: bool) -> None:
        """Apply the waste transition of the dead range ``fr``: it leaves the unwaste set
        and its accounting becomes SYSTEM waste. O(log n)."""
        start, end = fr
        (self._unwaste_huge if huge else self._unwaste_small).remove_range(start, end)
        mem_acct = self._mem_acct
        ma = mem_acct.get_exact(start, end, None)
        if ma is None:
            mem_acct.mutate_range(start, end, self._to_waste)
        else:
            mem_acct.replace_value(start, self._to_waste(start, end, ma))

    def _to_waste(self, s: int, e: int, ma: MemAcct) -> MemAcct:
        if ma.known_committed:
            if self._account:
                self._accounting.move(e - s, _SYSTEM, ma.kind, ma.memcg_id)
            if self.on_committed_waste is not None:
                self.on_committed_waste(s, e)
        return self._waste_acct(ma)

    def _dead_backlog(self, huge: bool) -> list[int]:
        """The dead queue of one page size as one heap of negated starts, its new tail
        moved in: O(t log n) for t new entries, or O(n + t) (a heapify) when the tail
        is the larger part; amortized O(log n) per dead allocation either way."""
        new = self._dead_huge if huge else self._dead_small
        heap = self._dead_heap_huge if huge else self._dead_heap_small
        if new:
            if len(new) >= len(heap):
                heap += [-s for s in new]
                heapify(heap)
            else:
                for s in new:
                    heappush(heap, -s)
            new.clear()
        return heap

    def _dead_descending(self, huge: bool, everything: bool) -> Iterator[int]:
        """Pop the dead allocations of one page size, highest start first. With
        ``everything`` the caller takes them all: one sort, O(n log n) at C speed;
        otherwise one heap pop each, O(log n). A caller that stops early loses the
        start it was last given (it pushes it back: :meth:`_undo_dead`)."""
        heap = self._dead_backlog(huge)
        if everything:
            # A sorted list is a heap too: it stays one until emptied.
            heap.sort()
            for neg in heap:
                yield -neg
            heap.clear()
            return
        while heap:
            yield -heappop(heap)

    def _take_dead(
        self, huge: bool, max_entries: int = -1, max_runs: int = -1, deadline: float = math.inf
    ) -> list[tuple[int, int]]:
        """Take pending dead allocations of one page size, highest first: all of them,
        or at most ``max_entries`` making at most ``max_runs`` runs of adjacent ones,
        stopping (after one at least) once ``time.monotonic()`` passes ``deadline``.
        Their accounting becomes SYSTEM waste. Returns the runs, descending, still in
        the unwaste set: the caller makes them waste (:meth:`settle`) or releases
        them directly (:meth:`begin_release`: no round trip through the unwaste set).

        O(k log n) for k taken of n queued (see :meth:`_dead_backlog`); all of them
        O(n log n) (one sort).
        """
        everything = max_entries < 0 and max_runs < 0 and deadline == math.inf
        if not (
            (self._dead_huge or self._dead_heap_huge)
            if huge
            else (self._dead_small or self._dead_heap_small)
        ):
            return []
        segment_end = (self._unfree_huge if huge else self._unfree_small).segment_end
        mem_acct = self._mem_acct
        to_waste = self._to_waste
        waste_accts = self._waste_accts
        monotonic = time.monotonic
        runs: list[tuple[int, int]] = []
        run_start = run_end = -1
        nruns = 0
        taken = 0
        # The last value made waste, by identity: allocations made alike share one MemAcct
        # object (see _used_acct), so most entries skip hashing it.
        last_ma: MemAcct | None = None
        last_w: MemAcct | None = None
        for count, s in enumerate(self._dead_descending(huge, everything), 1):
            e = segment_end(s)
            if e != run_start:
                # Not adjacent to the run below which the last one started.
                if nruns == max_runs:
                    self._undo_dead(s, huge)
                    break
                if run_end >= 0:
                    runs.append((run_start, run_end))
                run_end = e
                nruns += 1
            run_start = s
            taken += e - s
            ma = mem_acct.get_exact(s, e, None)
            if ma is None:
                mem_acct.mutate_range(s, e, to_waste)
            elif ma is last_ma and last_w is not None:
                mem_acct.replace_value(s, last_w)
            elif ma.known_committed:
                mem_acct.replace_value(s, to_waste(s, e, ma))
            else:
                # Inlined to_waste of the common case: nothing to account.
                w = waste_accts.get(ma)
                if w is None:
                    w = to_waste(s, e, ma)
                last_ma, last_w = ma, w
                mem_acct.replace_value(s, w)
            if count == max_entries or (count & 15 == 0 and monotonic() > deadline):
                break
        if run_end >= 0:
            runs.append((run_start, run_end))
        self._dead_bytes -= taken
        self._count_waste(taken)
        return runs

    def _undo_dead(self, start: int, huge: bool) -> None:
        """Queue ``start`` again: :meth:`_dead_descending` gave it to a caller that
        stopped before taking it. O(log n)."""
        heappush(self._dead_heap_huge if huge else self._dead_heap_small, -start)

    def settle(self) -> None:
        """Make every pending dead allocation waste (see the module docstring).

        O(k log k) for k dead allocations, plus one unwaste update per run of
        adjacent ones; nothing when none is pending.
        """
        if not self.has_dead():
            return
        for huge in (False, True):
            unwaste = self._unwaste_huge if huge else self._unwaste_small
            for start, end in self._take_dead(huge):
                unwaste.remove_range(start, end)

    # ------------------------------------------------------------------ release

    def begin_release(
        self, limit: int, pending: dict[int, int], deadline: float = math.inf
    ) -> list[ReleasePlan]:
        """Move the next waste ranges to *releasing* and plan their release.

        Small pages before huge, highest offsets first (huge pages at low offsets are
        older and more likely really huge), each range at most MAX_RELEASING_BYTES
        (gVisor's step), at most ``limit`` ranges from at most DEAD_SLICE dead
        allocations. Dead allocations come first and go straight to *releasing*.
        ``pending`` carries sub-release counts between calls that make up one step.
        Stops early, with one range planned at least, once ``time.monotonic()``
        passes ``deadline`` (checked every range and every 16 dead allocations), so
        that one call stays within the caller's slice of the loop. An empty list
        means that no waste is left (see :meth:`out_of_waste`). O(k log n) for k dead
        allocations and ranges planned.
        """
        plans: list[ReleasePlan] = []
        # Later plans of this step must see the sub-release counts of earlier ones.
        counts = ChainMap(pending, self._subreleased)
        releasing = self._releasing

        def plan(gap_start: int, end: int, huge: bool) -> None:
            """Plan ``[gap_start, end)`` from the top, in pieces of gVisor's step."""
            while end > gap_start:
                start = max(gap_start, end - MAX_RELEASING_BYTES)
                fr = FileRange(start, end)
                releasing[fr] = None
                self._waste_bytes -= end - start
                self._releasing_bytes += end - start
                p = plan_release(fr, huge, counts)
                pending.update(p.subreleased)
                plans.append(p)
                end = start

        monotonic = time.monotonic
        for huge, unwaste in ((False, self._unwaste_small), (True, self._unwaste_huge)):
            if plans and monotonic() > deadline:
                break
            # Dead allocations are released without becoming waste first: they are
            # not in a waste gap, just as releasing pages are not.
            if len(plans) < limit:
                runs = self._take_dead(huge, DEAD_SLICE, limit - len(plans), deadline)
                for start, end in runs:
                    plan(start, end, huge)
            # gVisor takes LastLargeEnoughGap(1) again and again; walking the gaps
            # down from the top visits the same ones without an index query each.
            for gap_start, end in unwaste.gaps_descending():
                if len(plans) >= limit or (plans and monotonic() > deadline):
                    break
                # At most the rest of this call's ranges from the top of the gap.
                start = max(gap_start, end - (limit - len(plans)) * MAX_RELEASING_BYTES)
                unwaste.insert_range(start, end, None)
                plan(start, end, huge)
        return plans

    def out_of_waste(self) -> bool:
        """No waste is left (the releaser found none): returns True if nothing is
        releasing either (everything is released)."""
        self._have_waste = False
        return not self._releasing

    def abort_release(self, plan: ReleasePlan) -> bool:
        """Return an unpunched plan's range to waste (the next step takes it again).
        Returns True if that made the first waste since :meth:`out_of_waste`."""
        fr = plan.released
        (self._unwaste_huge if plan.huge else self._unwaste_small).remove_range(fr.start, fr.end)
        del self._releasing[fr]
        self._releasing_bytes -= fr.length
        self._waste_bytes += fr.length
        if self._have_waste:
            return False
        # A later begin_release of this step may have found no waste left.
        self._have_waste = True
        return True

    def finish_release(self, plan: ReleasePlan, start: int, end: int) -> bool:
        """Apply the part ``[start, end)`` of a release whose punch is done: its pages
        become free or sub-released. A huge plan is finished whole; a small one may
        be finished in consecutive parts, the last ending at ``plan.released.end``
        (see :meth:`release_part_end`). Returns True if nothing is waste or
        releasing any more."""
        fr = plan.released
        if plan.huge:
            start, end = fr
            self._set_subreleased(plan.subreleased)
            if plan.free.length:
                self._unfree_huge.remove_range(plan.free.start, plan.free.end)
        else:
            self._unfree_small.remove_range(start, end)
        self._releasing_bytes -= end - start
        account = self._account
        # One pass: remove the accounting segments, then settle what they held.
        for s, e, ma in self._mem_acct.pop_range(start, end):
            if ma.kind is not _SYSTEM or not ma.waste_or_releasing:
                raise InvariantError(f"releasing pages [{s:#x}, {e:#x}) had state {ma}")
            if ma.known_committed:
                self._known_committed_bytes -= e - s
                if account:
                    self._accounting.dec(e - s, _SYSTEM, ma.memcg_id)
        if end < fr.end:
            return False
        del self._releasing[fr]
        self.released_bytes += fr.length
        return not self._releasing and not self._have_waste

    def release_part_end(self, plan: ReleasePlan, start: int) -> int:
        """Where the next part of ``plan`` from ``start`` ends: after FINISH_SLICE
        accounting segments for a small plan, so that finishing it can yield between
        parts; a huge plan is one part."""
        end = plan.released.end
        if plan.huge or end - start <= FINISH_SLICE * PAGE_SIZE:
            # Too few pages for more segments than a slice holds.
            return end
        for n, (_, e, _) in enumerate(self._mem_acct.visit_range(start, end), 1):
            if n == FINISH_SLICE:
                return min(e, end)
        return end

    def _set_subreleased(self, counts: Mapping[int, int]) -> None:
        """Store a release's new sub-release counts by huge page offset (0: the entry
        goes, the huge page being wholly free) and count the change. O(len(counts))."""
        subreleased = self._subreleased
        change = 0
        for offset, count in counts.items():
            change += count - subreleased.get(offset, 0)
            if count:
                subreleased[offset] = count
            else:
                subreleased.pop(offset, None)
        self._subreleased_pages += change

    # ------------------------------------------------------------------ commitment

    def decommitted(self, start: int, end: int) -> None:
        """The used pages ``[start, end)`` were punched: not known-committed any more,
        and a usage scan that began before the punch may not mark them."""
        self.settle()
        self._mem_acct.mutate_range(start, end, self._decommitted)

    def _decommitted(self, s: int, e: int, ma: MemAcct) -> MemAcct:
        if ma.known_committed:
            self._known_committed_bytes -= e - s
            if self._account:
                self._accounting.dec(e - s, ma.kind, ma.memcg_id)
        return ma._replace(known_committed=False, commit_seq=self._commit_seq)

    def begin_scan(self) -> int:
        """A usage scan (or save's data scan) begins: returns the commit sequence it
        must compare segments to. Pages decommitted, released or allocated from now
        on carry a later sequence and are never marked by it."""
        last = self._commit_seq
        self._commit_seq += 1
        return last

    def next_scan_span(
        self, pos: int, ids: frozenset[int] | None, max_runs: int
    ) -> tuple[int, int, list[tuple[int, int]] | None] | None:
        """The next range at or after ``pos``, within one chunk, that holds used pages
        of unknown commitment (of memcgs ``ids`` only, if given), with its runs of
        such pages (page indices from its start; None if more than ``max_runs``).
        None once there is none. O(segments visited)."""
        lo = hi = -1
        limit = KEY_MAX
        ranges: list[tuple[int, int]] | None = []
        self.settle()
        for s, e, ma in self._mem_acct.visit_range(pos, KEY_MAX):
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
                elif len(ranges) < max_runs:
                    ranges.append((a, b))
                else:
                    ranges = None
        return None if lo < 0 else (lo, hi, ranges)

    def scan_segment(self, pos: int, hi: int) -> tuple[int, int, int, int, MemAcct] | None:
        """The accounting segment at or after ``pos`` that starts before ``hi``: its part
        inside ``[pos, hi)``, its whole extent and its value; None if there is none."""
        self.settle()
        mem_acct = self._mem_acct
        item = next(mem_acct.visit_range(pos, hi), None)
        if item is None:
            return None
        s, e, ma = item
        seg = mem_acct.find_segment(s)
        if seg is None:
            raise InvariantError(f"accounting segment at {s:#x} vanished")
        return s, e, seg[0], seg[1], ma

    def mark_resident_runs(
        self, seg_start: int, cuts: list[int], ma: MemAcct, first_resident: bool
    ) -> int:
        """Cut the used accounting segment at ``seg_start`` (value ``ma``, of unknown
        commitment) at ``cuts`` into runs alternating resident and not (the first
        resident if ``first_resident``), marking the resident ones known-committed
        and accounted. Returns the bytes marked. One ``refine``: O(len(cuts))."""
        seg = self._mem_acct.find_segment(seg_start)
        if seg is None or seg[0] != seg_start or seg[2] != ma or ma.known_committed:
            raise InvariantError(f"no segment {ma} of unknown commitment at {seg_start:#x}")
        ma_c = self._committed_value(ma)
        n = len(cuts) + 1
        other = ma if first_resident else ma_c
        values = [ma_c if first_resident else ma, other] * ((n + 1) // 2)
        del values[n:]
        bounds = [seg_start, *cuts, seg[1]]
        marked = sum(bounds[k + 1] - bounds[k] for k in range(0 if first_resident else 1, n, 2))
        self._mem_acct.refine(seg_start, cuts, values)
        self._known_committed_bytes += marked
        if self._account:
            self._accounting.inc(marked, ma.kind, ma.memcg_id)
        return marked

    def mark_data_committed(self, start: int, end: int, last_seq: int) -> None:
        """The used pages of ``[start, end)`` hold data (save's SEEK_DATA scan that
        began at ``last_seq``): mark them known-committed, with their accounting,
        except pages waste, releasing or touched since the scan began."""

        def mark(s: int, e: int, ma: MemAcct) -> MemAcct:
            if ma.waste_or_releasing or ma.commit_seq > last_seq:
                return ma
            return self._commit_known(s, e, ma)

        self.settle()
        self._mem_acct.mutate_range(start, end, mark)

    # ------------------------------------------------------------------ wholesale

    def install(
        self,
        *,
        chunk_huge: Iterable[bool],
        unfree_small: SegmentSet[int],
        unfree_huge: SegmentSet[int],
        mem_acct: SegmentSet[MemAcct],
        subreleased: dict[int, int],
        commit_seq: int,
        known_committed: Iterable[tuple[MemoryKind, int, int]],
    ) -> None:
        """Replace the state of an empty core with a checked checkpoint's (its waste
        already released): the sets are taken as given, the running totals recounted
        and ``known_committed`` ((kind, memcg, bytes) sums) added to the accounting.
        O(segments)."""
        if self._chunk_huge or self.has_dead() or self._releasing:
            raise InvariantError("install() needs an empty core")
        self._chunk_huge = [bool(h) for h in chunk_huge]
        self._unfree_small = unfree_small
        self._unfree_huge = unfree_huge
        self._mem_acct = mem_acct
        self._subreleased = subreleased
        self._commit_seq = commit_seq
        known = list(known_committed)
        self._known_committed_bytes = sum(n for _, _, n in known)
        st = count_states(self.view())
        self._used_bytes = st.used_bytes
        self._waste_bytes = st.waste_bytes
        self._releasing_bytes = st.releasing_bytes
        self._subreleased_pages = st.subreleased_bytes // PAGE_SIZE
        self._huge_chunks = st.huge_chunks
        # With the sets, so that closing after a failed load gives exactly this back.
        if self._account:
            for kind, memcg_id, n in known:
                self._accounting.inc(n, kind, memcg_id)

    def give_back_accounting(self) -> None:
        """The file is closing: every known-committed byte leaves the accounting (the
        host gets everything back, as does a shared MemoryAccounting). O(segments)."""
        if not self._account:
            return
        for s, e, ma in self.view().mem_acct:
            if ma.known_committed:
                self._accounting.dec(e - s, ma.kind, ma.memcg_id)


def _unreferenced(unfree: SegmentSet[int], start: int, end: int) -> list[tuple[int, int]]:
    """The runs of pages in ``[start, end)`` with no reference (free, void or dead),
    merged, ascending. O(k log n) for k segments and gaps: the error path only."""
    runs = sorted(
        [(s, e) for s, e, refs in unfree.visit_range(start, end) if refs <= 0]
        + list(unfree.gaps(start, end))
    )
    merged: list[tuple[int, int]] = []
    for s, e in runs:
        if merged and merged[-1][1] == s:
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return merged


def _describe_ranges(runs: list[tuple[int, int]], most: int = 4) -> str:
    """``[a, b), [c, d)`` (the first ``most``, then how many more), with the total."""
    text = ", ".join(str(FileRange(s, e)) for s, e in runs[:most])
    if len(runs) > most:
        text += f" and {len(runs) - most} more runs"
    pages = sum(e - s for s, e in runs) // PAGE_SIZE
    return f"{text} ({pages} page{'s' if pages != 1 else ''})"


def _ref_inc(_s: int, _e: int, refs: int) -> int:
    return refs + 1


def _ref_recycled(s: int, e: int, refs: int) -> int:
    if refs != 0:
        raise InvariantError(f"waste pages [{s:#x}, {e:#x}) have refcount {refs} on recycling")
    return 1
