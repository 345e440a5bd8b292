"""The page-state core on its own: no memfd, no loop, no executor.

Table tests of each transition of :class:`~asyncpgalloc.pages.PageSets` and the I/O
it returns, then a hypothesis model test that drives the core directly (many more
examples than the MemoryFile model test can afford: nothing here does a syscall).
"""

from __future__ import annotations

import os
import sys
import time

import pytest
from helpers import max_examples
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncpgalloc import (
    AllocationMode,
    AllocOpts,
    Direction,
    FileRange,
    InvalidLengthError,
    InvalidRangeError,
    MemoryAccounting,
    MemoryKind,
    OutOfMemoryError,
    ReferenceCountError,
)
from asyncpgalloc.core import (
    DEAD_SLICE,
    MAX_RELEASING_BYTES,
    PageSets,
    count_states,
    format_segments,
)
from asyncpgalloc.invariants import check_invariants
from asyncpgalloc.ranges import CHUNK_SIZE, HUGE_PAGE_SIZE, PAGE_SIZE

P = PAGE_SIZE
UNCOMMITTED = AllocOpts()
COMMIT = AllocOpts(mode=AllocationMode.COMMIT)
TOP_DOWN = AllocOpts(direction=Direction.TOP_DOWN)
HUGE = AllocOpts(huge=True)


def core(chunks: int = 1, huge: bool = False) -> tuple[PageSets, MemoryAccounting]:
    acct = MemoryAccounting()
    pages = PageSets(acct, account=True)
    if chunks:
        pages.add_chunks(chunks, huge)
    return pages, acct


def check(pages: PageSets, acct: MemoryAccounting | None = None) -> None:
    check_invariants(pages.view(), pages.stats(), acct)


def dump(pages: PageSets) -> str:
    return format_segments(pages.view(), huge_sets=True)


def release_all(pages: PageSets) -> int:
    """What the releaser does, with the punches taken as done: returns the plans run."""
    n = 0
    while plans := pages.begin_release(32, {}):
        for plan in plans:
            pages.finish_release(plan, plan.released.start, plan.released.end)
        n += len(plans)
    pages.out_of_waste()
    return n


# ---------------------------------------------------------------------- growth


def test_an_empty_core_needs_growth_and_plans_whole_chunks() -> None:
    pages, _ = core(0)
    assert pages.allocate_uncommitted(P, UNCOMMITTED, False) is None
    assert pages.allocate(P, UNCOMMITTED, False) is None
    assert pages.plan_growth(P, False, 8, 8) == 1
    assert pages.plan_growth(CHUNK_SIZE + P, False, 8, 8) == 2
    pages.add_chunks(1, False)
    assert pages.allocate_uncommitted(P, UNCOMMITTED, False) == FileRange(0, P)
    check(pages)


def test_growth_counts_the_free_tail_of_the_last_chunk_of_the_same_size() -> None:
    pages, _ = core(1)
    pages.allocate_uncommitted(CHUNK_SIZE - 4 * P, UNCOMMITTED, False)
    # 4 free pages at the end of chunk 0 count towards an allocation of 1 GiB.
    assert pages.plan_growth(CHUNK_SIZE, False, 8, 8) == 2
    assert pages.plan_growth(CHUNK_SIZE + 4 * P, False, 8, 8) == 2
    assert pages.plan_growth(CHUNK_SIZE + 5 * P, False, 8, 8) == 3
    # The tail of a small-page chunk does not count for huge pages.
    assert pages.plan_growth(CHUNK_SIZE, True, 8, 8) == 2


@pytest.mark.parametrize(("max_chunks", "mappable"), [(1, 8), (8, 1)])
def test_growth_past_a_limit_is_out_of_memory_and_changes_nothing(
    max_chunks: int, mappable: int
) -> None:
    pages, _ = core(1)
    before = dump(pages)
    with pytest.raises(OutOfMemoryError):
        pages.plan_growth(2 * CHUNK_SIZE, False, max_chunks, mappable)
    assert dump(pages) == before


# ---------------------------------------------------------------------- allocation


def test_allocations_go_bottom_up_or_top_down() -> None:
    pages, _ = core(1)
    assert pages.allocate_uncommitted(2 * P, UNCOMMITTED, False) == FileRange(0, 2 * P)
    assert pages.allocate_uncommitted(P, TOP_DOWN, False) == FileRange(CHUNK_SIZE - P, CHUNK_SIZE)
    assert pages.allocate(P, UNCOMMITTED, False) == (FileRange(2 * P, 3 * P), False)
    st_ = pages.stats()
    assert (st_.used_bytes, st_.free_bytes) == (4 * P, CHUNK_SIZE - 4 * P)
    assert (pages.allocations, pages.allocated_bytes) == (3, 4 * P)
    check(pages)


@pytest.mark.parametrize(("length", "opts"), [(0, UNCOMMITTED), (P + 1, UNCOMMITTED), (P, HUGE)])
def test_bad_lengths_are_refused_before_anything_changes(length: int, opts: AllocOpts) -> None:
    pages, _ = core(1, huge=True)
    before = dump(pages)
    with pytest.raises(InvalidLengthError):
        pages.allocate(length, opts, opts.huge)
    assert dump(pages) == before


def test_huge_allocations_use_huge_chunks_only() -> None:
    pages, _ = core(1, huge=False)
    assert pages.allocate(HUGE_PAGE_SIZE, HUGE, True) is None  # no huge chunk yet
    pages.add_chunks(1, True)
    fr, recycled = pages.allocate(HUGE_PAGE_SIZE, HUGE, True) or (None, None)
    assert fr == FileRange(CHUNK_SIZE, CHUNK_SIZE + HUGE_PAGE_SIZE) and not recycled
    assert pages.stats().huge_chunks == 1
    check(pages)


def test_committing_allocations_recycle_waste_and_its_accounting() -> None:
    pages, acct = core(1)
    fr, _ = pages.allocate(4 * P, COMMIT, False) or (None, None)
    assert fr is not None
    pages.mark_allocation_committed(fr)
    assert acct.total() == pages.known_committed_bytes == 4 * P
    assert pages.dec_ref(fr)  # the first waste
    # Known-committed waste is SYSTEM memory at once.
    assert acct.by_memcg(0) == {MemoryKind.SYSTEM: 4 * P}
    check(pages, acct)
    again = pages.allocate(4 * P, COMMIT, False)
    assert again == (fr, True)  # recycled: the caller zeroes it
    # Recycled pages are of unknown commitment again until the caller commits them.
    assert acct.total() == pages.known_committed_bytes == 0
    pages.mark_allocation_committed(fr)
    assert acct.by_memcg(0) == {MemoryKind.ANONYMOUS: 4 * P}
    check(pages, acct)


def test_uncommitted_allocations_never_recycle_waste() -> None:
    pages, _ = core(1)
    fr = pages.allocate_uncommitted(P, UNCOMMITTED, False)
    assert fr is not None
    pages.dec_ref(fr)
    assert pages.allocate(P, UNCOMMITTED, False) == (FileRange(P, 2 * P), False)


# ---------------------------------------------------------------------- references


def test_dec_ref_reports_only_the_first_waste_until_the_releaser_runs_out() -> None:
    pages, _ = core(1)
    a, b, c = (pages.allocate_uncommitted(P, UNCOMMITTED, False) for _ in range(3))
    assert a and b and c
    assert pages.dec_ref(a) is True
    assert pages.dec_ref(b) is False
    assert pages.has_waste
    assert release_all(pages) == 1  # adjacent dead allocations: one range
    assert not pages.has_waste
    assert pages.dec_ref(c) is True
    check(pages)


def test_references_count_per_page_and_slow_paths_split_allocations() -> None:
    pages, _ = core(1)
    fr = pages.allocate_uncommitted(4 * P, UNCOMMITTED, False)
    assert fr is not None
    assert pages.has_unique_ref(fr)
    pages.inc_ref(FileRange(P, 2 * P))
    assert not pages.has_unique_ref(fr)
    assert pages.has_unique_ref(FileRange(0, P))
    assert pages.dec_ref(FileRange(0, 4 * P)) is True  # pages 0, 2, 3 become waste
    st_ = pages.stats()
    assert (st_.used_bytes, st_.waste_bytes) == (P, 3 * P)
    check(pages)


@pytest.mark.parametrize("op", ["inc_ref", "dec_ref", "has_unique_ref"])
def test_reference_errors_change_nothing(op: str) -> None:
    pages, _ = core(1)
    fr = pages.allocate_uncommitted(2 * P, UNCOMMITTED, False)
    assert fr is not None
    before = dump(pages)
    with pytest.raises(ReferenceCountError, match=r"\[0x2000, 0x3000\)"):
        getattr(pages, op)(FileRange(0, 3 * P))
    with pytest.raises(InvalidRangeError):
        getattr(pages, op)(FileRange(0, CHUNK_SIZE + P))
    assert dump(pages) == before


# ---------------------------------------------------------------------- release


def test_dead_allocations_are_released_straight_from_the_queue() -> None:
    pages, _ = core(1)
    frs = [pages.allocate_uncommitted(P, UNCOMMITTED, False) for _ in range(DEAD_SLICE + 10)]
    for fr in reversed(frs):
        assert fr is not None
        pages.dec_ref(fr)
    assert pages.has_dead()
    plans = pages.begin_release(32, {})
    # At most DEAD_SLICE dead allocations per call, highest first, in one run.
    assert [p.released for p in plans] == [FileRange(10 * P, (DEAD_SLICE + 10) * P)]
    assert pages.stats().releasing_bytes == DEAD_SLICE * P
    check(pages)
    for plan in plans:
        pages.finish_release(plan, plan.released.start, plan.released.end)
    assert release_all(pages) == 1
    assert pages.stats().free_bytes == CHUNK_SIZE
    assert pages.released_bytes == (DEAD_SLICE + 10) * P
    check(pages)


def _every_other_dead(pages: PageSets, count: int) -> list[FileRange]:
    """``count`` one-page dead allocations with a live one between each two (so each is
    a run of its own); returns the dead ones."""
    frs = [pages.allocate_uncommitted(P, UNCOMMITTED, False) for _ in range(2 * count)]
    dead = [fr for fr in frs[::2] if fr is not None]
    for fr in reversed(dead):
        pages.dec_ref(fr)
    return dead


def test_begin_release_stops_at_its_deadline_inside_a_call() -> None:
    # A call past its deadline still plans (progress), but stops early: after 16 dead
    # allocations, and after one waste range.
    pages, _ = core(1)
    dead = _every_other_dead(pages, 100)
    plans = pages.begin_release(32, {}, time.monotonic() - 1)
    assert 1 <= len(plans) < 32
    assert [p.released for p in plans] == [FileRange(fr.start, fr.end) for fr in dead[::-1]][
        : len(plans)
    ]
    check(pages)
    # Without a deadline, the same call plans all it may.
    assert len(pages.begin_release(32, {})) == 32
    # Settled waste: one range per call past the deadline.
    pages.settle()
    check(pages)
    assert len(pages.begin_release(32, {}, time.monotonic() - 1)) == 1
    assert len(pages.begin_release(32, {})) == 32
    check(pages)


def test_taking_dead_allocations_does_not_sort_the_whole_queue() -> None:
    # The releaser takes DEAD_SLICE dead allocations per call, highest first. Sorting
    # the whole queue each time cost O(n) per call (~14 µs per allocation at 100k
    # live); the queue must not be re-sorted per take. Counted, not timed: every
    # list.sort the pure-Python core runs while the queue drains (a profile hook sees
    # each C call made from Python code; the compiled core's are invisible to it).
    from asyncpgalloc import pages as py_pages

    pages = py_pages.PageSets(MemoryAccounting(), account=True)
    pages.add_chunks(1, False)
    n = 20 * DEAD_SLICE
    _every_other_dead(pages, n)
    sorted_items = 0
    taken = 0

    def profile(frame: object, event: str, arg: object) -> None:
        nonlocal sorted_items
        if event == "c_call" and getattr(arg, "__name__", "") == "sort":
            owner = getattr(arg, "__self__", None)
            if isinstance(owner, list):
                sorted_items += len(owner)

    sys.setprofile(profile)
    try:
        while plans := pages.begin_release(DEAD_SLICE, {}):
            taken += len(plans)
            for plan in plans:
                pages.finish_release(plan, plan.released.start, plan.released.end)
    finally:
        sys.setprofile(None)
    assert taken == n
    # One sort of the whole queue at most, not one per take of DEAD_SLICE (~n²/512).
    assert sorted_items <= n


def test_a_release_step_is_cut_into_gvisors_steps() -> None:
    pages, _ = core(1)
    fr = pages.allocate_uncommitted(3 * MAX_RELEASING_BYTES, UNCOMMITTED, False)
    assert fr is not None
    pages.dec_ref(fr)
    pages.settle()  # waste in the unwaste set's gap, not in the dead queue
    plans = pages.begin_release(2, {})
    assert [p.released.length for p in plans] == [MAX_RELEASING_BYTES] * 2
    assert plans[0].released.end == fr.end  # from the top
    check(pages)


def test_an_aborted_release_is_waste_again_and_wakes_the_releaser() -> None:
    pages, _ = core(1)
    fr = pages.allocate_uncommitted(4 * P, UNCOMMITTED, False)
    assert fr is not None
    pages.dec_ref(fr)
    plans = pages.begin_release(32, {})
    assert not pages.begin_release(32, {})
    assert pages.out_of_waste() is False  # a range is still releasing
    assert pages.abort_release(plans[0]) is True  # waste again, with no releaser awake
    st_ = pages.stats()
    assert (st_.waste_bytes, st_.releasing_bytes) == (4 * P, 0)
    check(pages)
    assert release_all(pages) == 1


def test_a_small_release_finished_in_parts() -> None:
    pages, _ = core(1)
    # One accounting segment per allocation: more than a part finishes at once.
    frs = [pages.allocate_uncommitted(P, UNCOMMITTED, False) for _ in range(600)]
    for fr in frs:
        assert fr is not None
        pages.dec_ref(fr)
    pages.settle()  # one waste gap: one plan (the dead queue gives DEAD_SLICE at a time)
    (plan,) = pages.begin_release(1, {})
    start = plan.released.start
    parts = 0
    while start < plan.released.end:
        stop = pages.release_part_end(plan, start)
        assert start < stop <= plan.released.end
        # Not "all released" yet: the releaser has not found the waste gone.
        assert pages.finish_release(plan, start, stop) is False
        check(pages)
        start, parts = stop, parts + 1
    assert parts > 1
    assert pages.stats().free_bytes == CHUNK_SIZE
    assert pages.begin_release(1, {}) == []
    assert pages.out_of_waste() is True  # nothing releasing: wait_released() may return


def test_huge_pages_are_sub_released_then_freed_whole() -> None:
    pages, _ = core(1, huge=True)
    got = pages.allocate(HUGE_PAGE_SIZE, HUGE, True)
    assert got is not None
    fr = got[0]
    pages.dec_ref(FileRange(fr.start, fr.start + 4 * P))
    release_all(pages)
    st_ = pages.stats()
    assert st_.subreleased_bytes == 4 * P
    assert pages.view().subreleased == {fr.start: 4}
    check(pages)
    pages.dec_ref(FileRange(fr.start + 4 * P, fr.end))
    (plan,) = pages.begin_release(32, {})
    assert plan.decommit == plan.free == fr  # the whole huge page is punched and freed
    pages.finish_release(plan, *plan.released)
    assert pages.stats().free_bytes == CHUNK_SIZE
    check(pages)


# ---------------------------------------------------------------------- commitment


def test_decommit_and_a_scan_that_began_before_it() -> None:
    pages, acct = core(1)
    fr = pages.allocate_uncommitted(8 * P, UNCOMMITTED, False)
    assert fr is not None
    last_seq = pages.begin_scan()
    span = pages.next_scan_span(0, None, 64)
    assert span == (0, 8 * P, [(0, 8)])
    pages.decommitted(0, 4 * P)  # after the scan began: its pages must not be marked
    pages.mark_data_committed(0, 8 * P, last_seq)
    assert pages.known_committed_bytes == 4 * P
    assert acct.total() == 4 * P
    check(pages, acct)


def test_marking_resident_runs_cuts_one_segment() -> None:
    pages, acct = core(1)
    fr = pages.allocate_uncommitted(8 * P, UNCOMMITTED, False)
    assert fr is not None
    _, _, seg_s, seg_e, ma = pages.scan_segment(0, 8 * P) or (0, 0, 0, 0, None)
    assert (seg_s, seg_e) == (0, 8 * P) and ma is not None
    # Not resident, resident, not resident.
    assert pages.mark_resident_runs(0, [2 * P, 5 * P], ma, False) == 3 * P
    assert pages.known_committed_bytes == acct.total() == 3 * P
    with pytest.raises(Exception, match="unknown commitment"):
        pages.mark_resident_runs(2 * P, [], ma, True)  # that segment is known now
    check(pages, acct)


def test_memcg_filtered_scan_spans_and_chunk_bounds() -> None:
    pages, _ = core(2)
    pages.allocate_uncommitted(P, AllocOpts(memcg_id=1), False)
    pages.allocate_uncommitted(CHUNK_SIZE, AllocOpts(memcg_id=2), False)
    assert pages.next_scan_span(0, frozenset({2}), 64) == (P, CHUNK_SIZE, [(0, 262143)])
    # A span ends at its chunk's end.
    assert pages.next_scan_span(CHUNK_SIZE, frozenset({2}), 64) == (
        CHUNK_SIZE,
        CHUNK_SIZE + P,
        [(0, 1)],
    )
    assert pages.next_scan_span(CHUNK_SIZE + P, None, 64) is None


# ---------------------------------------------------------------------- wholesale


def test_install_takes_sets_and_accounts_them_and_closing_gives_it_back() -> None:
    src, _ = core(1)
    fr = src.allocate_uncommitted(4 * P, AllocOpts(kind=MemoryKind.MAPPED, memcg_id=5), False)
    assert fr is not None
    src.mark_allocation_committed(fr)
    view = src.view()
    acct = MemoryAccounting()
    dst = PageSets(acct, account=True)
    dst.install(
        chunk_huge=view.chunk_huge,
        unfree_small=view.unfree_small,
        unfree_huge=view.unfree_huge,
        mem_acct=view.mem_acct,
        subreleased=dict(view.subreleased),
        commit_seq=view.commit_seq,
        known_committed=[(MemoryKind.MAPPED, 5, 4 * P)],
    )
    assert dst.stats() == src.stats() == count_states(dst.view())
    assert acct.by_memcg(5) == {MemoryKind.MAPPED: 4 * P}
    check(dst, acct)
    with pytest.raises(Exception, match="empty core"):
        dst.install(
            chunk_huge=[],
            unfree_small=view.unfree_small,
            unfree_huge=view.unfree_huge,
            mem_acct=view.mem_acct,
            subreleased={},
            commit_seq=0,
            known_committed=[],
        )
    dst.give_back_accounting()
    assert acct.total() == 0


def test_committed_pages_that_become_waste_are_reported() -> None:
    pages, _ = core(1)
    seen: list[tuple[int, int]] = []
    pages.on_committed_waste = lambda s, e: seen.append((s, e))
    a = pages.allocate_uncommitted(P, UNCOMMITTED, False)
    b = pages.allocate_uncommitted(P, UNCOMMITTED, False)
    assert a and b
    pages.mark_allocation_committed(b)
    pages.dec_ref(a)
    pages.dec_ref(b)
    pages.settle()
    assert seen == [(b.start, b.end)]


# ---------------------------------------------------------------------- model


# CI runs far more examples here than the MemoryFile model test: no syscall at all.
MODEL_EXAMPLES = 3000 if os.environ.get("ASYNCPGALLOC_SOAK") == "1" else 300

ops = st.lists(
    st.tuples(
        st.sampled_from(["alloc", "alloc_commit", "alloc_huge", "inc", "dec", "step", "settle"]),
        st.integers(0, 2**16),
        st.integers(1, 64),
    ),
    max_size=60,
)


@settings(max_examples=max_examples(MODEL_EXAMPLES), deadline=None)
@given(ops=ops)
def test_the_core_against_a_page_model(ops: list[tuple[str, int, int]]) -> None:
    """Random transitions, each checked against a per-page reference model and the
    invariants (running totals against a recount, accounting against the sets)."""
    acct = MemoryAccounting()
    pages = PageSets(acct, account=True)
    refs: dict[int, int] = {}  # page -> references
    allocs: list[FileRange] = []
    for op, pick, n in ops:
        if op.startswith("alloc"):
            huge = op == "alloc_huge"
            opts = {"alloc": UNCOMMITTED, "alloc_commit": COMMIT, "alloc_huge": HUGE}[op]
            length = (n % 4 + 1) * HUGE_PAGE_SIZE if huge else n * P
            while (got := pages.allocate(length, opts, huge)) is None:
                pages.add_chunks(pages.plan_growth(length, huge, 64, 64) - pages.chunk_count, huge)
            fr, recycled = got
            assert all(refs.get(p, 0) == 0 for p in range(fr.start // P, fr.end // P))
            assert not recycled or opts.mode is not AllocationMode.UNCOMMITTED
            if opts.mode is AllocationMode.COMMIT:
                pages.mark_allocation_committed(fr)
            for p in range(fr.start // P, fr.end // P):
                refs[p] = 1
            allocs.append(fr)
        elif op in ("inc", "dec") and allocs:
            fr = allocs[pick % len(allocs)]
            first = fr.start // P + pick % (fr.length // P)
            last = min(fr.end // P, first + n)
            sub = FileRange(first * P, last * P)
            held = all(refs.get(p, 0) > 0 for p in range(first, last))
            if not held:
                with pytest.raises(ReferenceCountError):
                    getattr(pages, f"{op}_ref")(sub)
                continue
            getattr(pages, f"{op}_ref")(sub)
            for p in range(first, last):
                refs[p] += 1 if op == "inc" else -1
            if op == "dec":
                allocs = [
                    a for a in allocs if any(refs[p] for p in range(a.start // P, a.end // P))
                ]
        elif op == "step":
            for plan in pages.begin_release(n % 8 + 1, {}):
                if pick % 5 == 0:
                    pages.abort_release(plan)  # a punch that did not happen
                else:
                    pages.finish_release(plan, *plan.released)
            if not pages.stats().waste_bytes:
                pages.out_of_waste()  # what the releaser does once it finds none
        elif op == "settle":
            pages.settle()
        check(pages, acct)
        assert pages.stats().used_bytes == sum(1 for r in refs.values() if r > 0) * P
    release_all(pages)
    check(pages, acct)
    st_ = pages.stats()
    assert st_.waste_bytes == st_.releasing_bytes == 0


def test_held_waste_is_not_recycled() -> None:
    pages, _ = core(1)
    fr, _ = pages.allocate(4 * P, COMMIT, False) or (None, None)
    assert fr is not None
    pages.dec_ref(fr)
    pages.hold_waste = True  # a save copies pages: waste keeps its bytes
    assert pages.allocate(4 * P, COMMIT, False) == (FileRange(4 * P, 8 * P), False)
    pages.hold_waste = False
    assert pages.allocate(4 * P, COMMIT, False) == (fr, True)
    check(pages)
