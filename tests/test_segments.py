"""Tests for asyncpgalloc.segments.SegmentSet: unit tests plus a model-based state machine."""

from __future__ import annotations

import bisect
import itertools
import os
import random
from collections.abc import Callable
from typing import ClassVar

import pytest
from helpers import max_examples
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from sortedcontainers import SortedList

from asyncpgalloc import segments as py_segments
from asyncpgalloc.core import SegmentSet, core_implementation, segments
from asyncpgalloc.ranges import KEY_MAX

P = 0x1000


def segs(s: SegmentSet[int]) -> list[tuple[int, int, int]]:
    return list(s)


def make(items: list[tuple[int, int, int]], *, merge: bool = True) -> SegmentSet[int]:
    s: SegmentSet[int] = SegmentSet(merge=merge)
    for a, b, v in items:
        s.insert_range(a, b, v)
    s.check_invariants()
    return s


# ----------------------------------------------------------------------
# Empty set and validation.


def test_empty_set() -> None:
    s: SegmentSet[int] = SegmentSet()
    s.check_invariants()
    assert len(s) == 0
    assert s.is_empty()
    assert list(s) == []
    assert s.find_segment(0) is None
    assert s.find_segment(KEY_MAX - 1) is None
    assert s.find_gap(0) == (0, KEY_MAX)
    assert s.find_gap(12345) == (0, KEY_MAX)
    assert list(s.gaps()) == [(0, KEY_MAX)]
    assert s.first_large_enough_gap(KEY_MAX) == (0, KEY_MAX)
    assert s.last_large_enough_gap(1) == (0, KEY_MAX)
    assert s.first_large_enough_gap(KEY_MAX + 1) is None
    assert not s.is_fully_covered(0, 1)
    assert list(s.visit_range(0, KEY_MAX)) == []
    assert str(s) == ""


@pytest.mark.parametrize(
    ("start", "end"), [(-1, 5), (5, 5), (6, 5), (0, KEY_MAX + 1), (KEY_MAX, KEY_MAX + 1)]
)
def test_insert_invalid_range(start: int, end: int) -> None:
    s = make([(10, 20, 1)])
    with pytest.raises(ValueError):
        s.insert_range(start, end, 2)
    assert segs(s) == [(10, 20, 1)]
    s.check_invariants()


@pytest.mark.parametrize(("start", "end"), [(-1, 5), (6, 5), (0, KEY_MAX + 1)])
def test_range_validation(start: int, end: int) -> None:
    s = make([(10, 20, 1)])
    with pytest.raises(ValueError):
        s.remove_range(start, end)
    with pytest.raises(ValueError):
        s.mutate_range(start, end, lambda a, b, v: v)
    with pytest.raises(ValueError):
        s.visit_range(start, end)
    with pytest.raises(ValueError):
        s.gaps(start, end)
    with pytest.raises(ValueError):
        s.is_fully_covered(start, end)
    assert segs(s) == [(10, 20, 1)]


def test_empty_ranges_are_noops() -> None:
    s = make([(10, 20, 1)])
    calls: list[tuple[int, int, int]] = []

    def fn(a: int, b: int, v: int) -> int:
        calls.append((a, b, v))
        return v + 1

    s.remove_range(15, 15)
    s.mutate_range(15, 15, fn)
    assert list(s.visit_range(15, 15)) == []
    assert list(s.gaps(5, 5)) == []
    assert calls == []
    assert segs(s) == [(10, 20, 1)]
    with pytest.raises(ValueError):
        s.is_fully_covered(15, 15)


@pytest.mark.parametrize("key", [-1, KEY_MAX])
def test_key_validation(key: int) -> None:
    s = make([(10, 20, 1)])
    with pytest.raises(ValueError):
        s.find_segment(key)
    with pytest.raises(ValueError):
        s.find_gap(key)


@pytest.mark.parametrize("n", [0, -5])
def test_gap_query_rejects_nonpositive(n: int) -> None:
    s: SegmentSet[int] = SegmentSet()
    with pytest.raises(ValueError):
        s.first_large_enough_gap(n)
    with pytest.raises(ValueError):
        s.last_large_enough_gap(n)


# ----------------------------------------------------------------------
# insert_range


def test_insert_and_find() -> None:
    s = make([(P, 3 * P, 7), (5 * P, 6 * P, 8)])
    assert len(s) == 2
    assert not s.is_empty()
    assert s.find_segment(P) == (P, 3 * P, 7)
    assert s.find_segment(3 * P - 1) == (P, 3 * P, 7)
    assert s.find_segment(3 * P) is None
    assert s.find_segment(P - 1) is None
    assert s.find_gap(0) == (0, P)
    assert s.find_gap(P - 1) == (0, P)
    assert s.find_gap(P) is None
    assert s.find_gap(2 * P) is None
    assert s.find_gap(3 * P) == (3 * P, 5 * P)
    assert s.find_gap(4 * P + 5) == (3 * P, 5 * P)
    assert s.find_gap(6 * P) == (6 * P, KEY_MAX)
    assert s.find_gap(KEY_MAX - 1) == (6 * P, KEY_MAX)


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (15, 25),  # overlaps the end of [10, 20)
        (5, 15),  # overlaps the start
        (12, 18),  # inside
        (5, 35),  # covers [10, 20) and reaches into [30, 40)
        (20, 31),  # starts in the gap, ends in the next segment
        (0, KEY_MAX),
        (10, 20),  # exactly the segment
        (19, 20),
        (39, 41),
        (0, 11),
    ],
)
def test_insert_overlap_raises_and_leaves_set_unchanged(start: int, end: int) -> None:
    s = make([(10, 20, 1), (30, 40, 2)])
    before = segs(s)
    gaps_before = list(s.gaps())
    with pytest.raises(ValueError):
        s.insert_range(start, end, 1)
    assert segs(s) == before
    assert list(s.gaps()) == gaps_before
    s.check_invariants()


def test_insert_fills_gap_exactly_and_merges_both_sides() -> None:
    s = make([(0, 10, 1), (20, 30, 1)])
    s.insert_range(10, 20, 1)
    s.check_invariants()
    assert segs(s) == [(0, 30, 1)]
    assert list(s.gaps()) == [(30, KEY_MAX)]


def test_insert_merges_left_only_and_right_only() -> None:
    s = make([(0, 10, 1), (20, 30, 2)])
    s.insert_range(10, 15, 1)
    assert segs(s) == [(0, 15, 1), (20, 30, 2)]
    s.insert_range(17, 20, 2)
    assert segs(s) == [(0, 15, 1), (17, 30, 2)]
    s.insert_range(15, 17, 3)
    assert segs(s) == [(0, 15, 1), (15, 17, 3), (17, 30, 2)]
    s.check_invariants()
    assert list(s.gaps()) == [(30, KEY_MAX)]


def test_insert_without_merge() -> None:
    s = make([(0, 10, 1), (20, 30, 1)], merge=False)
    s.insert_range(10, 20, 1)
    s.check_invariants()
    assert segs(s) == [(0, 10, 1), (10, 20, 1), (20, 30, 1)]
    assert len(s) == 3


def test_insert_in_middle_of_gap_splits_gap() -> None:
    s: SegmentSet[int] = SegmentSet()
    s.insert_range(100, 200, 1)
    s.check_invariants()
    assert list(s.gaps()) == [(0, 100), (200, KEY_MAX)]


def test_full_range_segment() -> None:
    s: SegmentSet[str] = SegmentSet()
    s.insert_range(0, KEY_MAX, "x")
    s.check_invariants()
    assert list(s) == [(0, KEY_MAX, "x")]
    assert list(s.gaps()) == []
    assert s.find_gap(0) is None
    assert s.find_gap(KEY_MAX - 1) is None
    assert s.find_segment(KEY_MAX - 1) == (0, KEY_MAX, "x")
    assert s.first_large_enough_gap(1) is None
    assert s.last_large_enough_gap(1) is None
    assert s.is_fully_covered(0, KEY_MAX)
    assert str(s) == "[0x0, 0x10000000000000000): x\n"
    # Splits at both edges of the removed range.
    s.remove_range(P, 2 * P)
    s.check_invariants()
    assert list(s) == [(0, P, "x"), (2 * P, KEY_MAX, "x")]
    assert list(s.gaps()) == [(P, 2 * P)]
    # Removing everything leaves the single initial gap.
    s.remove_range(0, KEY_MAX)
    s.check_invariants()
    assert list(s) == []
    assert list(s.gaps()) == [(0, KEY_MAX)]


def test_segments_touching_key_max() -> None:
    s = make([(KEY_MAX - 2 * P, KEY_MAX, 1)])
    assert s.find_segment(KEY_MAX - 1) == (KEY_MAX - 2 * P, KEY_MAX, 1)
    assert s.find_gap(KEY_MAX - 2 * P - 1) == (0, KEY_MAX - 2 * P)
    assert s.last_large_enough_gap(1) == (0, KEY_MAX - 2 * P)
    assert s.is_fully_covered(KEY_MAX - P, KEY_MAX)
    assert not s.is_fully_covered(KEY_MAX - 3 * P, KEY_MAX)
    s.insert_range(KEY_MAX - 3 * P, KEY_MAX - 2 * P, 1)
    assert segs(s) == [(KEY_MAX - 3 * P, KEY_MAX, 1)]
    s.mutate_range(KEY_MAX - P, KEY_MAX, lambda a, b, v: v + 1)
    s.check_invariants()
    assert segs(s) == [(KEY_MAX - 3 * P, KEY_MAX - P, 1), (KEY_MAX - P, KEY_MAX, 2)]
    s.remove_range(KEY_MAX - 1, KEY_MAX)
    s.check_invariants()
    assert segs(s) == [(KEY_MAX - 3 * P, KEY_MAX - P, 1), (KEY_MAX - P, KEY_MAX - 1, 2)]
    assert list(s.gaps(KEY_MAX - 4 * P)) == [
        (KEY_MAX - 4 * P, KEY_MAX - 3 * P),
        (KEY_MAX - 1, KEY_MAX),
    ]
    assert s.find_gap(KEY_MAX - 1) == (KEY_MAX - 1, KEY_MAX)
    assert s.last_large_enough_gap(1) == (KEY_MAX - 1, KEY_MAX)
    assert s.last_large_enough_gap(2) == (0, KEY_MAX - 3 * P)


# ----------------------------------------------------------------------
# remove_range


def test_remove_splits_at_both_edges() -> None:
    s = make([(0, 100, 1)])
    s.remove_range(10, 20)
    s.check_invariants()
    assert segs(s) == [(0, 10, 1), (20, 100, 1)]
    assert list(s.gaps()) == [(10, 20), (100, KEY_MAX)]


def test_remove_across_several_segments_and_gaps() -> None:
    s = make([(0, 10, 1), (10, 20, 2), (30, 40, 3), (50, 60, 4), (60, 70, 5)])
    s.remove_range(5, 65)
    s.check_invariants()
    assert segs(s) == [(0, 5, 1), (65, 70, 5)]
    assert list(s.gaps()) == [(5, 65), (70, KEY_MAX)]


def test_remove_joins_neighbouring_gaps() -> None:
    s = make([(10, 20, 1), (30, 40, 2), (50, 60, 3)])
    s.remove_range(30, 40)
    s.check_invariants()
    assert list(s.gaps()) == [(0, 10), (20, 50), (60, KEY_MAX)]
    s.remove_range(15, 55)
    s.check_invariants()
    assert segs(s) == [(10, 15, 1), (55, 60, 3)]
    assert list(s.gaps()) == [(0, 10), (15, 55), (60, KEY_MAX)]
    s.remove_range(0, KEY_MAX)
    s.check_invariants()
    assert segs(s) == []
    assert list(s.gaps()) == [(0, KEY_MAX)]


def test_remove_within_gap_is_noop() -> None:
    s = make([(10, 20, 1), (30, 40, 2)])
    s.remove_range(20, 30)
    s.remove_range(0, 10)
    s.remove_range(41, KEY_MAX)
    s.check_invariants()
    assert segs(s) == [(10, 20, 1), (30, 40, 2)]


def test_remove_front_and_back_of_segment() -> None:
    s = make([(10, 20, 1)])
    s.remove_range(5, 12)
    assert segs(s) == [(12, 20, 1)]
    s.remove_range(18, 25)
    assert segs(s) == [(12, 18, 1)]
    s.check_invariants()
    assert list(s.gaps()) == [(0, 12), (18, KEY_MAX)]


def test_remove_without_merge_keeps_segments_separate() -> None:
    s = make([(0, 10, 1), (10, 20, 1), (20, 30, 1)], merge=False)
    s.remove_range(5, 25)
    s.check_invariants()
    assert segs(s) == [(0, 5, 1), (25, 30, 1)]


# ----------------------------------------------------------------------
# mutate_range


def test_mutate_splits_at_both_edges() -> None:
    s = make([(0, 100, 1)])
    calls: list[tuple[int, int, int]] = []

    def fn(a: int, b: int, v: int) -> int:
        calls.append((a, b, v))
        return v + 1

    s.mutate_range(10, 20, fn)
    s.check_invariants()
    assert calls == [(10, 20, 1)]
    assert segs(s) == [(0, 10, 1), (10, 20, 2), (20, 100, 1)]


def test_mutate_skips_gaps_and_clips() -> None:
    s = make([(0, 10, 1), (20, 30, 2), (30, 40, 3), (50, 60, 4)])
    calls: list[tuple[int, int, int]] = []

    def fn(a: int, b: int, v: int) -> int:
        calls.append((a, b, v))
        return v * 10

    s.mutate_range(5, 55, fn)
    s.check_invariants()
    assert calls == [(5, 10, 1), (20, 30, 2), (30, 40, 3), (50, 55, 4)]
    assert segs(s) == [
        (0, 5, 1),
        (5, 10, 10),
        (20, 30, 20),
        (30, 40, 30),
        (50, 55, 40),
        (55, 60, 4),
    ]
    assert list(s.gaps(0, 100)) == [(10, 20), (40, 50), (60, 100)]


def test_mutate_merges_across_edges() -> None:
    s = make([(0, 10, 1), (10, 20, 2), (20, 30, 1)])
    s.mutate_range(10, 20, lambda a, b, v: 1)
    s.check_invariants()
    assert segs(s) == [(0, 30, 1)]


def test_mutate_merges_within_range() -> None:
    s = make([(0, 10, 1), (10, 20, 2), (20, 30, 3), (40, 50, 4)])
    s.mutate_range(5, 45, lambda a, b, v: 9)
    s.check_invariants()
    assert segs(s) == [(0, 5, 1), (5, 30, 9), (40, 45, 9), (45, 50, 4)]


def test_mutate_unchanged_value_does_not_split_with_merge() -> None:
    s = make([(0, 100, 1)])
    s.mutate_range(10, 20, lambda a, b, v: v)
    s.check_invariants()
    assert segs(s) == [(0, 100, 1)]


def test_mutate_without_merge_always_splits() -> None:
    s = make([(0, 100, 1)], merge=False)
    s.mutate_range(10, 20, lambda a, b, v: v)
    s.check_invariants()
    assert segs(s) == [(0, 10, 1), (10, 20, 1), (20, 100, 1)]
    s.mutate_range(0, 100, lambda a, b, v: 5)
    s.check_invariants()
    assert segs(s) == [(0, 10, 5), (10, 20, 5), (20, 100, 5)]
    s.merge_all()
    s.check_invariants()
    assert segs(s) == [(0, 100, 5)]


def test_mutate_partial_equal_split_rejoins() -> None:
    # The piece inside changes to the value of its right neighbour outside.
    s = make([(0, 10, 1), (10, 20, 2)])
    s.mutate_range(5, 10, lambda a, b, v: 2)
    s.check_invariants()
    assert segs(s) == [(0, 5, 1), (5, 20, 2)]


def test_mutate_fn_raising_keeps_set_consistent() -> None:
    s = make([(0, 10, 1), (10, 20, 2), (20, 30, 3)])

    def fn(a: int, b: int, v: int) -> int:
        if v == 3:
            raise RuntimeError("boom")
        return 3

    with pytest.raises(RuntimeError):
        s.mutate_range(0, 30, fn)
    s.check_invariants()
    assert segs(s) == [(0, 30, 3)]


# ----------------------------------------------------------------------
# merge_all, visit_range, is_fully_covered, gaps, __str__


def test_merge_all() -> None:
    s = make([(0, 10, 1), (10, 20, 1), (20, 30, 2), (30, 40, 2), (50, 60, 2)], merge=False)
    assert len(s) == 5
    s.merge_all()
    s.check_invariants()
    assert segs(s) == [(0, 20, 1), (20, 40, 2), (50, 60, 2)]
    s.merge_all()
    assert segs(s) == [(0, 20, 1), (20, 40, 2), (50, 60, 2)]


def test_merge_all_up_to_key_max() -> None:
    s = make([(0, 10, 1), (10, KEY_MAX, 1)], merge=False)
    s.merge_all()
    s.check_invariants()
    assert segs(s) == [(0, KEY_MAX, 1)]


def test_last_segment() -> None:
    s: SegmentSet[int] = SegmentSet()
    assert s.last_segment() is None
    s.insert_range(10, 20, 1)
    s.insert_range(30, 40, 2)
    assert s.last_segment() == (30, 40, 2)
    s.insert_range(40, KEY_MAX, 3)
    assert s.last_segment() == (40, KEY_MAX, 3)
    s.remove_range(35, KEY_MAX)
    assert s.last_segment() == (30, 35, 2)


def test_visit_range_clips() -> None:
    s = make([(0, 10, 1), (20, 30, 2), (30, 40, 3)])
    assert list(s.visit_range(5, 35)) == [(5, 10, 1), (20, 30, 2), (30, 35, 3)]
    assert list(s.visit_range(10, 20)) == []
    assert list(s.visit_range(25, 26)) == [(25, 26, 2)]
    assert list(s.visit_range(0, KEY_MAX)) == [(0, 10, 1), (20, 30, 2), (30, 40, 3)]


def test_is_fully_covered() -> None:
    s = make([(0, 10, 1), (10, 20, 2), (30, 40, 3)])
    assert s.is_fully_covered(0, 20)
    assert s.is_fully_covered(5, 15)
    assert s.is_fully_covered(30, 40)
    assert not s.is_fully_covered(0, 21)
    assert not s.is_fully_covered(19, 31)
    assert not s.is_fully_covered(20, 30)
    assert not s.is_fully_covered(25, 35)
    assert not s.is_fully_covered(39, 41)


def test_gaps_clipped() -> None:
    s = make([(10, 20, 1), (20, 30, 2), (40, 50, 3)])
    assert list(s.gaps()) == [(0, 10), (30, 40), (50, KEY_MAX)]
    assert list(s.gaps(5, 45)) == [(5, 10), (30, 40)]
    assert list(s.gaps(15, 35)) == [(30, 35)]
    assert list(s.gaps(12, 28)) == []
    assert list(s.gaps(35, 36)) == [(35, 36)]
    assert list(s.gaps(45, 100)) == [(50, 100)]


def test_str() -> None:
    s: SegmentSet[str] = SegmentSet()
    s.insert_range(0, 0x1000, "a")
    s.insert_range(0x2000, 0x3000, "b")
    assert str(s) == "[0x0, 0x1000): a\n[0x2000, 0x3000): b\n"
    assert "0x2000" in repr(s)


def test_check_invariants_detects_corruption() -> None:
    s = make([(0, 10, 1), (20, 30, 2)])
    t = make([(0, 10, 1), (10, 20, 2)])
    if core_implementation() == "compiled":
        # The compiled set's structure is C memory: it breaks itself on request.
        s._test_corrupt("gap")  # type: ignore[attr-defined]
        t._test_corrupt("value")  # type: ignore[attr-defined]
        u = make([(0, 10, 1), (20, 30, 2)])
        u._test_corrupt("summary")  # type: ignore[attr-defined]
        with pytest.raises(AssertionError):
            u.check_invariants()
    else:
        s._gap_start[99] = 98  # corrupt the gap index
        t._vals[10] = 1  # equal neighbours, unmerged
    with pytest.raises(AssertionError):
        s.check_invariants()
    with pytest.raises(AssertionError):
        t.check_invariants()


# ----------------------------------------------------------------------
# first/last_large_enough_gap


def test_first_and_last_gap_skip_undersized() -> None:
    # Gaps: [0,1P) [2P,4P) [5P,6P) [7P,10P) [11P,13P) [14P, KEY_MAX)
    s = make(
        [
            (P, 2 * P, 1),
            (4 * P, 5 * P, 1),
            (6 * P, 7 * P, 1),
            (10 * P, 11 * P, 1),
            (13 * P, 14 * P, 1),
        ]
    )
    assert s.first_large_enough_gap(1) == (0, P)
    assert s.first_large_enough_gap(P) == (0, P)
    assert s.first_large_enough_gap(P + 1) == (2 * P, 4 * P)
    assert s.first_large_enough_gap(2 * P + 1) == (7 * P, 10 * P)
    assert s.first_large_enough_gap(3 * P + 1) == (14 * P, KEY_MAX)
    assert s.first_large_enough_gap(KEY_MAX - 14 * P) == (14 * P, KEY_MAX)
    assert s.first_large_enough_gap(KEY_MAX - 14 * P + 1) is None
    s.insert_range(14 * P, KEY_MAX, 1)
    # Now the last gap is [11P, 13P).
    assert s.last_large_enough_gap(1) == (11 * P, 13 * P)
    assert s.last_large_enough_gap(2 * P) == (11 * P, 13 * P)
    assert s.last_large_enough_gap(2 * P + 1) == (7 * P, 10 * P)
    assert s.last_large_enough_gap(3 * P) == (7 * P, 10 * P)
    assert s.last_large_enough_gap(3 * P + 1) is None
    assert s.first_large_enough_gap(3 * P + 1) is None
    s.check_invariants()


def test_gap_queries_within_one_size_class() -> None:
    # Lengths 40..47 pages share one size class (8 sub-classes per power of
    # two), so the query has to look at lengths, not just classes.
    s: SegmentSet[int] = SegmentSet()
    pos = 0
    lengths = [45, 41, 47, 40, 46, 42]
    for n in lengths:
        pos += n * P
        s.insert_range(pos, pos + P, 0)
        pos += P
    s.insert_range(pos, KEY_MAX, 0)
    s.check_invariants()
    gaps = list(s.gaps())
    assert [(e - b) // P for b, e in gaps] == lengths
    for n in range(39, 49):
        want = [g for g in gaps if g[1] - g[0] >= n * P]
        assert s.first_large_enough_gap(n * P) == (want[0] if want else None)
        assert s.last_large_enough_gap(n * P) == (want[-1] if want else None)
        assert s.first_large_enough_gap(n * P - 1) == next(
            (g for g in gaps if g[1] - g[0] >= n * P - 1), None
        )


def _single_gap_set(lo: int, hi: int) -> SegmentSet[int]:
    s: SegmentSet[int] = SegmentSet()
    s.insert_range(0, KEY_MAX, 0)
    s.remove_range(lo, hi)
    return s


def test_single_gap_found_from_every_smaller_class() -> None:
    # One gap, of every length up to 300 pages; a query for any n up to its
    # length must find it whatever the two size classes (exact, sub-bucketed,
    # same group, last class of a group, next group...).
    for pages in range(1, 301):
        length = pages * P
        s = _single_gap_set(7 * P, 7 * P + length)
        for q in range(1, pages + 2):
            for n in (q * P - 1, q * P, q * P + 1):
                want = (7 * P, 7 * P + length) if n <= length else None
                assert s.first_large_enough_gap(n) == want, (pages, n)
                assert s.last_large_enough_gap(n) == want, (pages, n)


@pytest.mark.parametrize("bits", range(12, 64))
def test_single_large_gap(bits: int) -> None:
    for length in (1 << bits, (1 << bits) - 1, (1 << bits) + P, 3 << (bits - 1)):
        s = _single_gap_set(KEY_MAX - length - P, KEY_MAX - P)
        s.check_invariants()
        want = (KEY_MAX - length - P, KEY_MAX - P)
        for n in (1, length >> 3, length >> 1, length - 1, length, (length >> 1) * 3 - 1):
            n = max(n, 1)
            exp = want if n <= length else None
            assert s.first_large_enough_gap(n) == exp, (bits, length, n)
            assert s.last_large_enough_gap(n) == exp, (bits, length, n)
        assert s.first_large_enough_gap(length + 1) is None
        assert s.last_large_enough_gap(length + 1) is None


def test_gap_index_follows_removal_of_lowest_and_highest_gaps() -> None:
    # Many gaps per size class and per class group; filling and punching
    # holes moves the lowest/highest gap of a class, which the cached
    # per-class and per-group extremes must follow.
    rng = random.Random(11)
    s = _single_gap_set(0, 0 + P)  # the tail stays covered
    s.insert_range(0, P, 0)
    holes: set[tuple[int, int]] = set()
    slot = 64 * P
    for step in range(300):
        # Build up ~100 holes first, then fill and punch at random.
        if step >= 100 and rng.random() < 0.5:
            a, b = rng.choice(sorted(holes))
            holes.remove((a, b))
            s.insert_range(a, b, 0)
        else:
            i = rng.randrange(400)
            a = i * slot + P
            if any(h[0] == a for h in holes):
                continue
            b = a + rng.choice([1, 2, 3, 15, 16, 17, 31, 32, 33, 40]) * P
            holes.add((a, b))
            s.remove_range(a, b)
        gaps = sorted(holes)
        assert list(s.gaps()) == gaps
        for n in (1, P, 2 * P, 3 * P, 4 * P, 16 * P, 17 * P, 32 * P, 33 * P, 34 * P, 40 * P):
            big = [g for g in gaps if g[1] - g[0] >= n]
            assert s.first_large_enough_gap(n) == (big[0] if big else None)
            assert s.last_large_enough_gap(n) == (big[-1] if big else None)
    s.check_invariants()


def test_bottom_up_and_top_down_allocation_pattern() -> None:
    s: SegmentSet[int] = SegmentSet()
    s.insert_range(1 << 40, KEY_MAX, 0)  # only [0, 1 TiB) is free
    allocated: list[tuple[int, int]] = []
    for i in range(200):
        n = ((i * 7) % 13 + 1) * P
        g = s.first_large_enough_gap(n) if i % 2 else s.last_large_enough_gap(n)
        assert g is not None
        a, b = (g[0], g[0] + n) if i % 2 else (g[1] - n, g[1])
        s.insert_range(a, b, 1)
        allocated.append((a, b))
        if i % 3 == 0:
            a, b = allocated.pop(len(allocated) // 2)
            s.remove_range(a, b)
    s.check_invariants()
    covered = sum(e - b for b, e, v in s if v == 1)
    assert covered == sum(b - a for a, b in allocated)


# ----------------------------------------------------------------------
# Many segments: SortedList with several internal sublists, and both floor
# implementations.


def _floor_model(starts: list[int], key: int) -> int | None:
    i = bisect.bisect_right(starts, key)
    return starts[i - 1] if i else None


def test_floor_implementations_agree() -> None:
    rng = random.Random(7)
    values = sorted(rng.sample(range(10**6), 5000))
    sl = SortedList(values)
    keys = [*rng.sample(range(-5, 10**6 + 5), 3000), *values, *(v - 1 for v in values)]
    for k in keys:
        want = _floor_model(values, k)
        assert py_segments._floor_irange(sl, k) == want
        assert py_segments._floor_internal(sl, k) == want
    empty = SortedList()
    assert py_segments._floor_irange(empty, 5) is None
    assert py_segments._floor_internal(empty, 5) is None
    # The internal layout is present in the pinned sortedcontainers, so the
    # fast path is the one in use (by the pure-Python set).
    assert py_segments._floor is py_segments._floor_internal


@pytest.mark.parametrize("use_irange", [False, True])
def test_many_segments_against_model(use_irange: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # The irange fallback is the pure-Python set's own; the other run uses the core's set.
    impl = py_segments if use_irange else segments
    if use_irange:
        monkeypatch.setattr(py_segments, "_floor", py_segments._floor_irange)
    rng = random.Random(3)
    s: SegmentSet[int] = impl.SegmentSet()
    model: dict[int, tuple[int, int]] = {}  # start -> (end, value)
    pos = 0
    for i in range(4000):
        pos += rng.choice([0, 0, 1, 5, P])
        ln = rng.choice([1, 2, P])
        s.insert_range(pos, pos + ln, i)  # distinct values: never merged
        model[pos] = (pos + ln, i)
        pos += ln
    # Punch holes, then refill some of them, at random.
    for _ in range(500):
        a = rng.randrange(pos)
        s.remove_range(a, a + 1)
        st_ = _floor_model(sorted(model), a)
        if st_ is not None and model[st_][0] > a:
            e, v = model.pop(st_)
            if st_ < a:
                model[st_] = (a, v)
            if a + 1 < e:
                model[a + 1] = (e, v)
    s.check_invariants()
    starts = sorted(model)
    assert list(s) == [(b, *model[b]) for b in starts]
    for k in [*rng.sample(range(pos + 10), 2000), *starts]:
        b = _floor_model(starts, k)
        want = (b, *model[b]) if b is not None and model[b][0] > k else None
        assert s.find_segment(k) == want
        got_gap = s.find_gap(k)
        assert (got_gap is None) == (want is not None)
        if got_gap is not None:
            ga, gb = got_gap
            assert ga <= k < gb
            assert ga == 0 or ga in {e for e, _ in model.values()}
            assert gb == KEY_MAX or gb in model
    assert sum(1 for _ in s.gaps()) == len(list(s.gaps(0, KEY_MAX)))


# ----------------------------------------------------------------------
# Model-based testing.
#
# The model divides the key space into cells with fixed boundaries: a few
# dozen small cells at the bottom with assorted widths (page multiples and
# odd sizes, so gap lengths land in many size classes, some sharing a class),
# one huge cell, and a few cells at the top ending at KEY_MAX.  Every
# operation uses cell boundaries, so the model is just a per-cell list.


def _boundaries(widths: list[int], top: list[int]) -> list[int]:
    b = [0]
    for w in widths:
        b.append(b[-1] + w)
    top_start = KEY_MAX - sum(top)
    b.append(top_start)  # the huge middle cell
    for w in top:
        b.append(b[-1] + w)
    assert b[-1] == KEY_MAX
    return b


# fmt: off
_PAGE_WIDTHS = [P, P, 2 * P, P - 1, 1, P + 1, 3 * P, 5 * P, 8 * P, P, 40 * P, 3 * P, 7, P,
                33 * P, 2 * P, P, 4 * P, 9 * P - 3, P, 2 * P, P, 16 * P, 1, P, 3 * P, P, 2 * P]
_SMALL_WIDTHS = [1, 1, 2, 1, 3, 1, 1, 2, 5, 1, 1, 2, 1, 4, 1, 1, 2, 1, 1, 3]
# fmt: on

Cell = tuple[int, int] | None  # (value, segment id) or gap


def _runs(cells: list[Cell], by_id: bool) -> list[tuple[int, int, int]]:
    """Maximal runs (i, j, value) of cells forming one segment."""
    out: list[tuple[int, int, int]] = []
    i = 0
    while i < len(cells):
        c = cells[i]
        if c is None:
            i += 1
            continue
        j = i + 1
        while j < len(cells):
            d = cells[j]
            if d is None or (d != c if by_id else d[0] != c[0]):
                break
            j += 1
        out.append((i, j, c[0]))
        i = j
    return out


_FNS: list[tuple[str, Callable[[int], int]]] = [
    ("inc", lambda v: (v + 1) % 3),
    ("dec", lambda v: (v + 2) % 3),
    ("same", lambda v: v),
    ("zero", lambda v: 0),
    ("one", lambda v: 1),
]


class SegmentSetMachine(RuleBasedStateMachine):
    MERGE = True
    WIDTHS = _PAGE_WIDTHS
    TOP: ClassVar[list[int]] = [P, 2, P]

    def __init__(self) -> None:
        super().__init__()
        self.b = _boundaries(self.WIDTHS, self.TOP)
        self.ncells = len(self.b) - 1
        self.cells: list[Cell] = [None] * self.ncells
        self.s: SegmentSet[int] = SegmentSet(merge=self.MERGE)
        self.next_id = itertools.count()
        keys: set[int] = set()
        for x in self.b:
            for d in (-1, 0, 1):
                if 0 <= x + d < KEY_MAX:
                    keys.add(x + d)
        for i in range(self.ncells):
            keys.add((self.b[i] + self.b[i + 1]) // 2)
        self.keys = sorted(keys)

    @initialize(data=st.data())
    def init(self, data: st.DataObject) -> None:
        # Sometimes start from one big segment, as the allocator's sets do.
        if data.draw(st.booleans()):
            self.insert(0, self.ncells, 0)

    # -- operations ----------------------------------------------------

    def pair(self, data: st.DataObject) -> tuple[int, int]:
        i = data.draw(st.integers(0, self.ncells), label="i")
        j = data.draw(st.integers(0, self.ncells), label="j")
        return min(i, j), max(i, j)

    def insert(self, i: int, j: int, v: int) -> None:
        a, b = self.b[i], self.b[j]
        if i < j and all(c is None for c in self.cells[i:j]):
            self.s.insert_range(a, b, v)
            sid = next(self.next_id)
            self.cells[i:j] = [(v, sid)] * (j - i)
        else:
            before = list(self.s)
            with pytest.raises(ValueError):
                self.s.insert_range(a, b, v)
            assert list(self.s) == before

    @rule(data=st.data(), v=st.integers(0, 2))
    def insert_range(self, data: st.DataObject, v: int) -> None:
        i, j = self.pair(data)
        self.insert(i, j, v)

    @rule(data=st.data(), v=st.integers(0, 2))
    def insert_into_gap(self, data: st.DataObject, v: int) -> None:
        # Random pairs rarely hit a gap exactly; aim inside a model gap.
        gaps = _runs([(0, 0) if c is None else None for c in self.cells], by_id=False)
        if not gaps:
            return
        gi, gj, _ = data.draw(st.sampled_from(gaps), label="gap")
        i = data.draw(st.integers(gi, gj - 1), label="i")
        j = data.draw(st.integers(i + 1, gj), label="j")
        self.insert(i, j, v)

    @rule(data=st.data())
    def remove_range(self, data: st.DataObject) -> None:
        i, j = self.pair(data)
        self.s.remove_range(self.b[i], self.b[j])
        self.cells[i:j] = [None] * (j - i)

    @rule(data=st.data(), fn=st.sampled_from(_FNS))
    def mutate_range(self, data: st.DataObject, fn: tuple[str, Callable[[int], int]]) -> None:
        i, j = self.pair(data)
        f = fn[1]
        expected_calls = []
        for ri, rj, v in _runs(self.cells, by_id=not self.MERGE):
            lo, hi = max(ri, i), min(rj, j)
            if lo < hi:
                expected_calls.append((self.b[lo], self.b[hi], v))
                sid = next(self.next_id)
                self.cells[lo:hi] = [(f(v), sid)] * (hi - lo)
        calls: list[tuple[int, int, int]] = []

        def record(a: int, b: int, v: int) -> int:
            calls.append((a, b, v))
            return f(v)

        self.s.mutate_range(self.b[i], self.b[j], record)
        assert calls == expected_calls

    @rule()
    def merge_all(self) -> None:
        self.s.merge_all()
        for ri, rj, v in _runs(self.cells, by_id=False):
            sid = next(self.next_id)
            self.cells[ri:rj] = [(v, sid)] * (rj - ri)

    @rule(data=st.data())
    def check_ranges(self, data: st.DataObject) -> None:
        i, j = self.pair(data)
        if i == j:
            return
        a, b = self.b[i], self.b[j]
        want = [
            (self.b[max(ri, i)], self.b[min(rj, j)], v)
            for ri, rj, v in self.expected_runs()
            if ri < j and rj > i
        ]
        assert list(self.s.visit_range(a, b)) == want
        assert self.s.is_fully_covered(a, b) == all(c is not None for c in self.cells[i:j])
        want_gaps = [
            (max(ga, a), min(gb, b)) for ga, gb in self.expected_gaps() if ga < b and gb > a
        ]
        assert list(self.s.gaps(a, b)) == want_gaps
        # Clip at keys that are not cell boundaries too.
        a2 = a + (self.b[i + 1] - a) // 2
        b2 = max(a2 + 1, b - 1)
        want_gaps2 = [
            (max(ga, a2), min(gb, b2)) for ga, gb in self.expected_gaps() if ga < b2 and gb > a2
        ]
        assert list(self.s.gaps(a2, b2)) == want_gaps2

    # -- comparison ----------------------------------------------------

    def expected_runs(self) -> list[tuple[int, int, int]]:
        return _runs(self.cells, by_id=not self.MERGE)

    def expected_gaps(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for i, c in enumerate(self.cells):
            if c is not None:
                continue
            a, b = self.b[i], self.b[i + 1]
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
        return out

    @invariant()
    def matches_model(self) -> None:
        s = self.s
        s.check_invariants()
        runs = [(self.b[i], self.b[j], v) for i, j, v in self.expected_runs()]
        assert list(s) == runs
        assert len(s) == len(runs)
        assert s.is_empty() == (not runs)
        gaps = self.expected_gaps()
        assert list(s.gaps()) == gaps

        def seg_at(k: int) -> tuple[int, int, int] | None:
            return next((r for r in runs if r[0] <= k < r[1]), None)

        def gap_at(k: int) -> tuple[int, int] | None:
            return next((g for g in gaps if g[0] <= k < g[1]), None)

        for k in self.keys:
            assert s.find_segment(k) == seg_at(k), hex(k)
            assert s.find_gap(k) == gap_at(k), hex(k)

        lengths = {b - a for a, b in gaps}
        ns = {1, 2, P - 1, P, P + 1, 2 * P, 40 * P, 1 << 40, KEY_MAX}
        for n in lengths:
            ns.update((n - 1, n, n + 1))
        for n in ns:
            if n < 1:
                continue
            big = [g for g in gaps if g[1] - g[0] >= n]
            assert s.first_large_enough_gap(n) == (big[0] if big else None), n
            assert s.last_large_enough_gap(n) == (big[-1] if big else None), n

        for i in range(self.ncells):
            for j in (i + 1, i + 2, i + 5):
                if j <= self.ncells:
                    covered = all(c is not None for c in self.cells[i:j])
                    assert s.is_fully_covered(self.b[i], self.b[j]) == covered


class SegmentSetNoMergeMachine(SegmentSetMachine):
    MERGE = False


class SegmentSetSmallKeysMachine(SegmentSetMachine):
    # Unit-width cells: every gap falls into size class 0.
    WIDTHS = _SMALL_WIDTHS
    TOP: ClassVar[list[int]] = [1, 1]


class SegmentSetSmallKeysNoMergeMachine(SegmentSetSmallKeysMachine):
    MERGE = False


_SETTINGS = settings(max_examples=max_examples(60), stateful_step_count=30, deadline=None)

TestSegmentSetModel = SegmentSetMachine.TestCase
TestSegmentSetModel.settings = _SETTINGS
TestSegmentSetNoMergeModel = SegmentSetNoMergeMachine.TestCase
TestSegmentSetNoMergeModel.settings = _SETTINGS
TestSegmentSetSmallKeysModel = SegmentSetSmallKeysMachine.TestCase
TestSegmentSetSmallKeysModel.settings = _SETTINGS
TestSegmentSetSmallKeysNoMergeModel = SegmentSetSmallKeysNoMergeMachine.TestCase
TestSegmentSetSmallKeysNoMergeModel.settings = _SETTINGS


# ----------------------------------------------------------------------
# The allocator's fast-path primitives: get_exact, replace_value, pop_range,
# refine, take_first_gap / take_last_gap, gaps_descending, gap_index=False.


@pytest.mark.parametrize("merge", [True, False])
def test_get_exact_and_replace_value(merge: bool) -> None:
    s = make([(0, 10, 1), (10, 20, 2), (30, 40, 2)], merge=merge)
    assert s.get_exact(10, 20, None) == 2
    assert s.get_exact(10, 19, None) is None
    assert s.get_exact(11, 20, None) is None
    assert s.get_exact(20, 30, "gap") == "gap"
    s.replace_value(10, 1)
    s.check_invariants()
    if merge:
        assert segs(s) == [(0, 20, 1), (30, 40, 2)]
    else:
        assert segs(s) == [(0, 10, 1), (10, 20, 1), (30, 40, 2)]
        assert str(s) == "[0x0, 0x14): 1\n[0x1e, 0x28): 2\n"  # shown merged
    with pytest.raises(KeyError):
        s.replace_value(25, 3)
    s.check_invariants()


@pytest.mark.parametrize("merge", [True, False])
def test_pop_range_returns_clipped_pieces(merge: bool) -> None:
    s = make([(0, 10, 1), (10, 20, 2), (30, 40, 3)], merge=merge)
    assert s.pop_range(5, 35) == [(5, 10, 1), (10, 20, 2), (30, 35, 3)]
    assert segs(s) == [(0, 5, 1), (35, 40, 3)]
    assert s.pop_range(50, 60) == []
    assert s.pop_range(36, 38) == [(36, 38, 3)]
    s.check_invariants()
    assert list(s.gaps(0, 64)) == [(5, 35), (36, 38), (40, 64)]


@pytest.mark.parametrize("merge", [True, False])
def test_refine_splits_one_segment(merge: bool) -> None:
    s = make([(0, 100, 1), (100, 110, 2)], merge=merge)
    s.refine(0, [10, 20, 90], [2, 3, 2, 2])
    s.check_invariants()
    if merge:
        # [90, 100) now equals [100, 110) and merges across the edge.
        assert segs(s) == [(0, 10, 2), (10, 20, 3), (20, 110, 2)]
    else:
        assert segs(s) == [(0, 10, 2), (10, 20, 3), (20, 90, 2), (90, 100, 2), (100, 110, 2)]
    for bad_start, cuts, values in [(5, [10], [1, 2]), (0, [10, 10], [1, 2, 3]), (0, [10], [1])]:
        before = segs(s)
        with pytest.raises(ValueError):
            s.refine(bad_start, cuts, values)
        assert segs(s) == before
    big: SegmentSet[int] = SegmentSet(merge=False)
    big.insert_range(0, 1 << 40, 0)
    cuts = list(range(P, 1 << 30, 2 * P))
    big.refine(0, cuts, [i & 1 for i in range(len(cuts) + 1)])
    big.check_invariants()
    assert len(big) == len(cuts) + 1
    # Cuts at odd multiples of P: 2**29 (an even one) lies in [2**29 - P, 2**29 + P).
    assert big.find_segment((1 << 29) + 5) == ((1 << 29) - P, (1 << 29) + P, 0)


@pytest.mark.parametrize("merge", [True, False])
def test_take_first_and_last_gap_match_queries(merge: bool) -> None:
    rng = random.Random(11)
    a: SegmentSet[int] = SegmentSet(merge=merge)
    b: SegmentSet[int] = SegmentSet(merge=merge)
    for t in (a, b):
        t.insert_range(1 << 30, KEY_MAX, 0)
    live: list[tuple[int, int]] = []
    for i in range(600):
        n = rng.randint(1, 20) * P
        top = rng.random() < 0.2
        if top:
            gap = b.last_large_enough_gap(n)
            got = a.take_last_gap(n, 1)
        else:
            gap = b.first_large_enough_gap(n)
            got = a.take_first_gap(n, 1)
        assert gap is not None and got is not None
        start = gap[1] - n if top else gap[0]
        assert got == start
        b.insert_range(start, start + n, 1)
        live.append((start, start + n))
        if rng.random() < 0.45:
            fs, fe = live.pop(rng.randrange(len(live)))
            a.remove_range(fs, fe)
            b.remove_range(fs, fe)
        if i % 50 == 0:
            a.check_invariants()
    a.check_invariants()
    assert list(a) == list(b)
    assert a.take_first_gap(1 << 31, 1) is None
    assert a.take_last_gap(1 << 31, 1) is None


@pytest.mark.parametrize("merge", [True, False])
def test_gaps_descending_allows_filling_each_gap(merge: bool) -> None:
    s = make([(10, 20, 1), (30, 40, 1), (50, 60, 2)], merge=merge)
    want = list(reversed(list(s.gaps())))
    seen = []
    for gs, ge in s.gaps_descending():
        seen.append((gs, ge))
        s.insert_range(gs, ge, 1)
        s.check_invariants()
    assert seen == want
    assert list(s.gaps()) == []


def test_set_without_gap_index() -> None:
    s: SegmentSet[int] = SegmentSet(merge=False, gap_index=False)
    assert not s.has_gap_index and not s.merges
    s.insert_range(P, 2 * P, 1)
    s.insert_range(5 * P, 6 * P, 2)
    s.remove_range(P, 2 * P)
    s.check_invariants()
    assert list(s.gaps(0, 8 * P)) == [(0, 5 * P), (6 * P, 8 * P)]
    with pytest.raises(TypeError):
        s.first_large_enough_gap(P)
    with pytest.raises(TypeError):
        s.last_large_enough_gap(P)


def test_start_index_keeps_and_drops_empty_blocks() -> None:
    # The pure-Python set's start index (the compiled one has none: see test_tree_shapes).
    s: SegmentSet[int] = py_segments.SegmentSet(merge=False)
    block = 1 << py_segments._BLOCK_SHIFT
    for i in range(40):
        s.insert_range(i * block, i * block + P, i)
    for i in range(0, 40, 2):
        s.remove_range(i * block, i * block + P)
    s.check_invariants()
    # Lookups past empty blocks find the right segment (and drop those blocks).
    for i in range(1, 40, 2):
        assert s.find_segment(i * block + 5) == (i * block, i * block + P, i)
        want = (i * block + P, (i + 2) * block if i < 39 else KEY_MAX)
        assert s.find_gap((i + 1) * block + 5) == want
    s.check_invariants()
    assert s.last_segment() == (39 * block, 39 * block + P, 39)


# ----------------------------------------------------------------------
# The compiled set against the pure-Python one, on trees several levels deep.


def _compiled_set_class() -> type[SegmentSet[int]]:
    import importlib

    try:
        mod = importlib.import_module("asyncpgalloc._compiled.segments")
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("the compiled core is not built")
    cls: type[SegmentSet[int]] = mod.SegmentSet
    return cls


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("gap_index", [True, False])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tree_shapes(merge: bool, gap_index: bool, seed: int) -> None:
    """Thousands of random operations on both sets, grown past two tree levels (64 x 64
    segments) and shrunk back, every query compared; leaf splits, merges, node splits and
    root collapses all happen, and the compiled set's invariants are checked throughout."""
    compiled = _compiled_set_class()
    rng = random.Random(seed)
    a: SegmentSet[int] = compiled(merge=merge, gap_index=gap_index)
    b: SegmentSet[int] = py_segments.SegmentSet(merge=merge, gap_index=gap_index)
    span = 1 << 30
    nvals = 3 if merge else 1000
    sizes: list[int] = []

    def both(name: str, *args: object) -> object:
        ra: object
        rb: object
        try:
            ra = getattr(a, name)(*args)
        except Exception as exc:  # the same error from both
            ra = (type(exc), str(exc))
        try:
            rb = getattr(b, name)(*args)
        except Exception as exc:
            rb = (type(exc), str(exc))
        if isinstance(ra, type(iter(()))) or hasattr(ra, "__next__"):
            ra, rb = list(ra), list(rb)  # type: ignore[call-overload]
        assert ra == rb, (name, args)
        return ra

    def grow(n: int) -> None:
        for _ in range(n):
            k = rng.randrange(span)
            gap = b.find_gap(k)
            if gap is None:
                continue
            s = rng.randrange(gap[0], gap[1])
            e = min(gap[1], s + rng.randint(1, 4) * P)
            both("insert_range", s, e, rng.randrange(nvals))

    for phase in range(6):
        grow(9000 if phase % 2 == 0 else 500)
        for _ in range(1500):
            op = rng.randrange(9)
            s = rng.randrange(span)
            e = min(KEY_MAX, s + rng.choice([1, P, 16 * P, 1 << 20]))
            if op == 0:
                both("remove_range", s, e)
            elif op == 1:
                both("pop_range", s, e)
            elif op == 2:
                both("mutate_range", s, e, lambda _s, _e, v: (v + 1) % nvals)
            elif op == 3:
                seg = b.find_segment(s)
                if seg is not None:
                    both("replace_value", seg[0], rng.randrange(nvals))
            elif op == 4:
                seg = b.find_segment(s)
                if seg is not None and seg[1] - seg[0] > 2:
                    cuts = sorted(rng.sample(range(seg[0] + 1, seg[1]), 2))
                    both("refine", seg[0], cuts, [rng.randrange(nvals) for _ in range(3)])
            elif op == 5 and gap_index:
                n = rng.choice([1, P, 3 * P, 64 * P, 1 << 22])
                both("first_large_enough_gap", n)
                both("last_large_enough_gap", n)
                both(rng.choice(["take_first_gap", "take_last_gap"]), n, rng.randrange(nvals))
            elif op == 6:
                both("find_segment", s)
                both("find_gap", s)
                both("get_exact", s, e, None)
            elif op == 7:
                both("visit_range", s, e)
                both("gaps", s, e)
                both("is_fully_covered", s, e)
            else:
                both("insert_range", s, e, 0)
        if phase % 2 == 1:
            # Shrink: big removals empty whole leaves and collapse levels.
            for _ in range(40):
                s = rng.randrange(span)
                both("remove_range", s, min(span, s + span // 16))
        a.check_invariants()
        sizes.append(len(a))
        assert list(a) == list(b)
        assert list(a.gaps_descending()) == list(b.gaps_descending())
        assert len(a) == len(b) and a.last_segment() == b.last_segment()
    both("merge_all")
    assert list(a) == list(b)
    a.check_invariants()
    # Deep enough for node splits (over 64 leaves), shrunk back by the removals.
    assert max(sizes) > 64 * 64 * 2 and min(sizes[1::2]) < max(sizes) // 4, sizes
