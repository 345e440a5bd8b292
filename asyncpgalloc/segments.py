"""An ordered set of disjoint, valued segments with an index of the gaps between them.

This is the Python counterpart of gVisor's ``segment.Set`` with gap tracking
(``trackGaps``), which ``pgalloc.MemoryFile`` uses for its ``unfree``,
``unwaste`` and ``memAcct`` sets.  Keys are Python ints in ``[0, KEY_MAX)``
and every range is half-open.

Representation (``n`` = number of segments, ``g`` = number of gaps):

* ``_starts``: a ``SortedList`` of segment starts.  It is only used to find the
  segment at or before an arbitrary key (``_floor``).  The positional API
  (``sl[i]`` beyond the first/last element, ``index``, ``bisect``,
  ``islice``) is deliberately never used: the first positional access builds
  an internal index that sortedcontainers then keeps up to date on every
  ``add``/``remove``, making them ~1.7x slower.  ``irange`` would do, but
  costs ~2 us per call (it builds a chain of slice iterators), more than an
  ``add`` plus a ``remove``; so ``_floor`` bisects SortedList's two internal
  lists directly (two C-level bisects, ~0.3 us), falling back to ``irange``
  if a future sortedcontainers no longer has them.
* ``_seg_end`` (start -> end), ``_seg_start`` (end -> start), ``_vals``
  (start -> value), ``_gap_end`` (gap start -> gap end) and ``_gap_start`` (gap
  end -> gap start).  Every boundary is the end of exactly one segment or gap
  and the start of exactly one segment or gap, so these dicts form a doubly
  linked list: once one element is located, its neighbours are O(1) dict
  lookups and no further ``SortedList`` search is needed.  Allocation-shaped
  calls (insert at a gap's start or end, remove/mutate starting at a segment
  boundary) do not search the ``SortedList`` at all.
* The gap index: one ``SortedList`` of gap *ends* per size class
  (``_gap_class``).  Gaps are keyed by their end because bottom-up allocation
  carves the front of a gap, which leaves its end -- and, unless the size
  class changes, its bucket -- untouched.  Classes are exact per page for
  small gaps and 8 per power of two above that, so a
  ``first/last_large_enough_gap(n)`` query only scans the one bucket whose
  class contains ``n`` (where some gaps may be shorter than ``n``); every
  gap in a higher class is long enough, so for those only the lowest (or
  highest) end matters.  Those are cached per class in ``_bmin``/``_bmax``
  and per group of 16 classes in ``_gmin``/``_gmax``, so the query takes the
  minimum of two short lists (at C speed) instead of probing every non-empty
  bucket above: with fragmented memory dozens of classes are non-empty, and
  probing each cost ~40 us per query in an allocation benchmark.

Costs quoted below: "O(log n)" means one ``SortedList`` search or update
(amortised, sortedcontainers' usual ~log with a large constant base); "O(1)"
means a handful of dict operations.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from sortedcontainers import SortedList

from asyncpgalloc.ranges import KEY_MAX, PAGE_SIZE

__all__ = ["SegmentSet"]

V = TypeVar("V")

# Gap lengths are, in practice, multiples of the page size; classes are
# counted in pages so that each small page count gets a class of its own.
_CLASS_SHIFT: int = PAGE_SIZE.bit_length() - 1
# Page counts below this get one exact class each.  It must be a power of two
# >= 2**_SUB_BITS so that the sub-bucketed classes continue where these stop.
_EXACT_CLASSES: int = 32
# Above _EXACT_CLASSES pages, each power of two is split into 2**_SUB_BITS
# classes by the bits just below the leading one.
_SUB_BITS: int = 3
_EXACT_BITS: int = _EXACT_CLASSES.bit_length()  # bit_length of the first sub-bucketed count
_SUB_MASK: int = (1 << _SUB_BITS) - 1
_SUB_SHIFT_BIAS: int = _SUB_BITS + 1
_CLASS_BIAS: int = _EXACT_CLASSES - _EXACT_BITS * (1 << _SUB_BITS)


def _gap_class(length: int) -> int:
    """Return the size class of a gap of ``length`` keys.  O(1).

    Monotonic in ``length``: a gap in a higher class than ``n``'s is strictly
    longer than ``n``.
    """
    p = length >> _CLASS_SHIFT
    if p < _EXACT_CLASSES:
        return p
    b = p.bit_length()
    return (b << _SUB_BITS) + _CLASS_BIAS + ((p >> (b - _SUB_SHIFT_BIAS)) & _SUB_MASK)


_NUM_CLASSES: int = _gap_class(KEY_MAX) + 1
# Classes are grouped so that the per-class min/max caches can be summarised
# per group: a query then takes min() over at most one partial group and the
# list of group minima.
_GROUP_SHIFT: int = 4
_GROUP_SIZE: int = 1 << _GROUP_SHIFT
_NUM_GROUPS: int = (_NUM_CLASSES + _GROUP_SIZE - 1) >> _GROUP_SHIFT
# Sentinels for empty classes/groups: above every gap end / below every one.
_NO_MIN: int = KEY_MAX + 1
_NO_MAX: int = -1


def _floor_irange(sl: SortedList, key: int) -> int | None:
    """Return the greatest element of ``sl`` that is ``<= key``, or None.  Public API only."""
    s: int | None = next(sl.irange(maximum=key, reverse=True), None)
    return s


def _floor_internal(sl: SortedList, key: int) -> int | None:
    """Same as :func:`_floor_irange`, ~7x faster, using SortedList's internal layout.

    A SortedList is a list of sorted sublists (``_lists``) plus the list of
    their maxima (``_maxes``); neither touches the positional index.
    """
    maxes: list[int] = sl._maxes
    pos = bisect_right(maxes, key)
    if pos == len(maxes):
        return maxes[-1] if maxes else None
    sub: list[int] = sl._lists[pos]
    idx = bisect_right(sub, key)
    if idx:
        return sub[idx - 1]
    return maxes[pos - 1] if pos else None


def _has_internal_layout() -> bool:
    try:
        probe = SortedList([1, 3])
        ok: bool = probe._maxes == [3] and probe._lists == [[1, 3]]
    except AttributeError:
        return False
    return ok


_floor: Callable[[SortedList, int], int | None] = (
    _floor_internal if _has_internal_layout() else _floor_irange
)


class SegmentSet(Generic[V]):
    """Disjoint, non-empty segments ``[start, end)`` with values, over ``[0, KEY_MAX)``.

    Keys not covered by any segment form gaps; gaps are tracked so that the
    first/last gap of at least a given length can be found without scanning
    the segments.  With ``merge=True`` (the default) adjacent segments with
    equal (``==``) values are merged after every mutation, so segments are
    always maximal; with ``merge=False`` segments are only merged by
    :meth:`merge_all`.

    Values are stored by reference, not copied: splitting a segment leaves
    both halves holding the same object, so values should be immutable (or
    treated as such) and changed only through :meth:`mutate_range` -- where
    gVisor copies a value struct, this shares it.

    Not thread-safe; iterators are invalidated by mutation.
    """

    __slots__ = (
        "_bmax",
        "_bmin",
        "_buckets",
        "_gap_end",
        "_gap_start",
        "_gmax",
        "_gmin",
        "_merge",
        "_seg_end",
        "_seg_start",
        "_starts",
        "_vals",
    )

    def __init__(self, *, merge: bool = True) -> None:
        """Create an empty set: a single gap ``[0, KEY_MAX)``.  O(number of size classes), ~5 us."""
        self._merge: bool = merge
        self._starts: SortedList = SortedList()
        self._seg_end: dict[int, int] = {}
        self._seg_start: dict[int, int] = {}
        self._vals: dict[int, V] = {}
        self._gap_end: dict[int, int] = {}
        self._gap_start: dict[int, int] = {}
        # Buckets are created on first use (most classes never are) and then
        # kept even when empty, so a gap oscillating between two classes
        # never pays for SortedList creation again.
        self._buckets: list[SortedList | None] = [None] * _NUM_CLASSES
        # Padded to whole groups, so that a slice to the end of a group is
        # never empty.
        self._bmin: list[int] = [_NO_MIN] * (_NUM_GROUPS << _GROUP_SHIFT)
        self._bmax: list[int] = [_NO_MAX] * (_NUM_GROUPS << _GROUP_SHIFT)
        # One extra (always-sentinel) group so that a slice from any group + 1
        # is non-empty.
        self._gmin: list[int] = [_NO_MIN] * (_NUM_GROUPS + 1)
        self._gmax: list[int] = [_NO_MAX] * (_NUM_GROUPS + 1)
        self._gap_add(0, KEY_MAX)

    # ------------------------------------------------------------------
    # Gap index primitives.  Each keeps _gap_end, _gap_start, the buckets and
    # the min/max caches consistent for one gap.

    def _bucket_add(self, c: int, ge: int) -> None:
        """Add gap end ``ge`` to class ``c``.  O(log g)."""
        b: SortedList = self._buckets[c]
        if b is None:
            b = self._buckets[c] = SortedList()
        b.add(ge)
        bmin = self._bmin
        if ge < bmin[c]:
            bmin[c] = ge
            g = c >> _GROUP_SHIFT
            if ge < self._gmin[g]:
                self._gmin[g] = ge
        bmax = self._bmax
        if ge > bmax[c]:
            bmax[c] = ge
            g = c >> _GROUP_SHIFT
            if ge > self._gmax[g]:
                self._gmax[g] = ge

    def _bucket_remove(self, c: int, ge: int) -> None:
        """Remove gap end ``ge`` from class ``c``.  O(log g)."""
        b: SortedList = self._buckets[c]
        b.remove(ge)
        bmin = self._bmin
        if ge == bmin[c]:
            # b[0] / b[-1] take SortedList's fast path, which (unlike other
            # indices) never builds the positional index.
            bmin[c] = b[0] if b else _NO_MIN
            g = c >> _GROUP_SHIFT
            gmin = self._gmin
            if gmin[g] == ge:
                lo = g << _GROUP_SHIFT
                gmin[g] = min(bmin[lo : lo + _GROUP_SIZE])
        bmax = self._bmax
        if ge == bmax[c]:
            bmax[c] = b[-1] if b else _NO_MAX
            g = c >> _GROUP_SHIFT
            gmax = self._gmax
            if gmax[g] == ge:
                lo = g << _GROUP_SHIFT
                gmax[g] = max(bmax[lo : lo + _GROUP_SIZE])

    def _gap_add(self, gs: int, ge: int) -> None:
        """Record the non-empty gap ``[gs, ge)``.  O(log g)."""
        self._gap_end[gs] = ge
        self._gap_start[ge] = gs
        self._bucket_add(_gap_class(ge - gs), ge)

    def _gap_del(self, gs: int, ge: int) -> None:
        """Forget the gap ``[gs, ge)``.  O(log g)."""
        del self._gap_end[gs]
        del self._gap_start[ge]
        self._bucket_remove(_gap_class(ge - gs), ge)

    def _gap_restart(self, gs: int, ge: int, ngs: int) -> None:
        """Turn the gap ``[gs, ge)`` into ``[ngs, ge)`` (``ngs < ge``).

        O(1) when the size class is unchanged, which is the common case of
        carving a small allocation off the front of a large gap; O(log g)
        otherwise.
        """
        del self._gap_end[gs]
        self._gap_end[ngs] = ge
        self._gap_start[ge] = ngs
        oc = _gap_class(ge - gs)
        nc = _gap_class(ge - ngs)
        if oc != nc:
            self._bucket_remove(oc, ge)
            self._bucket_add(nc, ge)

    # ------------------------------------------------------------------
    # Lookup primitives.

    def _first_overlapping(self, key: int) -> int:
        """Return the start of the first segment that ends after ``key``, or KEY_MAX if none.

        That is the segment containing ``key`` if there is one, else the first
        segment after it.  O(1) if ``key`` is a segment or gap start, else O(log n).
        """
        if key in self._seg_end:
            return key
        ge = self._gap_end.get(key)
        if ge is not None:
            return ge
        s = _floor(self._starts, key)
        if s is None:
            # No segment starts at or before key, so a gap starts at 0.
            return self._gap_end[0]
        e = self._seg_end[s]
        if e > key:
            return s
        # key lies in the gap that follows segment s.
        return self._gap_end[e]

    # ------------------------------------------------------------------
    # Queries.

    def __len__(self) -> int:
        """Return the number of segments.  O(1)."""
        return len(self._seg_end)

    def __iter__(self) -> Iterator[tuple[int, int, V]]:
        """Yield every segment as ``(start, end, value)`` in ascending order.  O(n) in total."""
        seg_end = self._seg_end
        vals = self._vals
        for s in self._starts:
            yield s, seg_end[s], vals[s]

    def is_empty(self) -> bool:
        """Return True if there are no segments.  O(1)."""
        return not self._seg_end

    def last_segment(self) -> tuple[int, int, V] | None:
        """The highest segment as ``(start, end, value)``, or None if empty.  O(1)."""
        starts = self._starts
        if not starts:
            return None
        # SortedList special-cases index -1: no positional index is built.
        s: int = starts[-1]
        return s, self._seg_end[s], self._vals[s]

    def find_segment(self, key: int) -> tuple[int, int, V] | None:
        """Return the segment containing ``key``, or None.

        O(1) if ``key`` is a segment start, else O(log n).
        """
        _check_key(key)
        e = self._seg_end.get(key)
        if e is not None:
            return key, e, self._vals[key]
        s = _floor(self._starts, key)
        if s is None:
            return None
        e = self._seg_end[s]
        if e <= key:
            return None
        return s, e, self._vals[s]

    def find_gap(self, key: int) -> tuple[int, int] | None:
        """Return the maximal gap ``(start, end)`` containing ``key``, or None if ``key`` is
        in a segment.

        O(1) if ``key`` is a segment or gap start, else O(log n).
        """
        _check_key(key)
        gap_end = self._gap_end
        ge = gap_end.get(key)
        if ge is not None:
            return key, ge
        if key in self._seg_end:
            return None
        s = _floor(self._starts, key)
        if s is None:
            return 0, gap_end[0]
        e = self._seg_end[s]
        if e > key:
            return None
        return e, gap_end[e]

    def visit_range(self, start: int, end: int) -> Iterator[tuple[int, int, V]]:
        """Yield the segments overlapping ``[start, end)``, clipped to it, ascending.

        O(log n) to find the first segment (O(1) if ``start`` is a boundary),
        then O(1) per segment.  The set must not be mutated while iterating.
        """
        _check_range(start, end)
        if start == end:
            return iter(())
        return self._visit(start, end)

    def _visit(self, start: int, end: int) -> Iterator[tuple[int, int, V]]:
        seg_end = self._seg_end
        gap_end = self._gap_end
        vals = self._vals
        s = self._first_overlapping(start)
        while s < end:
            e = seg_end[s]
            yield (s if s > start else start), (e if e < end else end), vals[s]
            if e >= end:
                return
            s = gap_end.get(e, e)

    def is_fully_covered(self, start: int, end: int) -> bool:
        """Return True if every key in ``[start, end)`` lies in some segment.

        O(log n + k) for k segments in the range (O(1 + k) if ``start`` is a
        segment start).
        """
        _check_range(start, end)
        if start == end:
            raise ValueError(f"empty range [{start:#x}, {end:#x})")
        seg_end = self._seg_end
        e = seg_end.get(start)
        if e is None:
            s = _floor(self._starts, start)
            if s is None:
                return False
            e = seg_end[s]
            if e <= start:
                return False
        while e < end:
            # A boundary that starts no segment starts a gap.
            ne = seg_end.get(e)
            if ne is None:
                return False
            e = ne
        return True

    def gaps(self, start: int = 0, end: int = KEY_MAX) -> Iterator[tuple[int, int]]:
        """Yield the non-empty gaps overlapping ``[start, end)``, clipped to it, ascending.

        O(log n) to start, then O(1) per segment or gap passed.
        """
        _check_range(start, end)
        if start == end:
            return iter(())
        return self._gaps(start, end)

    def _gaps(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        seg_end = self._seg_end
        gap_end = self._gap_end
        # gs: the start of the gap containing start, else of the first gap
        # after it, else KEY_MAX.
        gs = start
        if start not in gap_end:
            s = start if start in seg_end else _floor(self._starts, start)
            if s is None:
                gs = 0
            else:
                e = seg_end[s]
                gs = e if e <= start else self._skip_segments(e)
        while gs < end:
            ge = gap_end[gs]
            yield (gs if gs > start else start), (ge if ge < end else end)
            if ge >= end:
                return
            gs = self._skip_segments(ge)

    def _skip_segments(self, b: int) -> int:
        """Return the first gap start at or after boundary ``b``, or KEY_MAX.  O(1) per
        adjacent segment skipped.
        """
        seg_end = self._seg_end
        e = seg_end.get(b)
        while e is not None:
            b = e
            e = seg_end.get(b)
        return b

    def first_large_enough_gap(self, n: int) -> tuple[int, int] | None:
        """Return the gap with the lowest start whose length is ``>= n``, or None.

        Never scans the segments.  Every gap in a class above ``n``'s is long
        enough, and disjoint gaps ordered by end are ordered by start, so the
        best of those is the minimum of the cached per-class/per-group lowest
        ends (O(number of classes / 16), at C speed).  Only ``n``'s own class
        is searched gap by gap, and only below that candidate: O(1) when its
        lowest gap is long enough (always, for page-multiple lengths below
        32 pages), else O(log g + k) for k too-short gaps passed over.
        """
        if n < 1:
            raise ValueError(f"gap length must be >= 1, not {n}")
        if n > KEY_MAX:
            return None
        c = _gap_class(n)
        bmin = self._bmin
        g = c >> _GROUP_SHIFT
        # _gmin ends with a sentinel, so the slice is never empty (min()'s
        # default= keyword costs more than the rest of the query).
        best = min(self._gmin[g + 1 :])
        hi = (g + 1) << _GROUP_SHIFT
        if c + 1 < hi:
            # The rest of c's own group.
            cbest = min(bmin[c + 1 : hi])
            if cbest < best:
                best = cbest
        ge = bmin[c]
        if ge < best:
            gap_start = self._gap_start
            if ge - gap_start[ge] >= n:
                best = ge
            else:
                b: SortedList = self._buckets[c]
                for cand in b.irange(ge, best, inclusive=(False, False)):
                    if cand - gap_start[cand] >= n:
                        best = cand
                        break
        if best == _NO_MIN:
            return None
        return self._gap_start[best], best

    def last_large_enough_gap(self, n: int) -> tuple[int, int] | None:
        """Return the gap with the highest start whose length is ``>= n``, or None.

        Same method and cost as :meth:`first_large_enough_gap`, mirrored.
        """
        if n < 1:
            raise ValueError(f"gap length must be >= 1, not {n}")
        if n > KEY_MAX:
            return None
        c = _gap_class(n)
        bmax = self._bmax
        g = c >> _GROUP_SHIFT
        best = max(self._gmax[g + 1 :])
        hi = (g + 1) << _GROUP_SHIFT
        if c + 1 < hi:
            cbest = max(bmax[c + 1 : hi])
            if cbest > best:
                best = cbest
        ge = bmax[c]
        if ge > best:
            gap_start = self._gap_start
            if ge - gap_start[ge] >= n:
                best = ge
            else:
                b: SortedList = self._buckets[c]
                for cand in b.irange(best, ge, inclusive=(False, False), reverse=True):
                    if cand - gap_start[cand] >= n:
                        best = cand
                        break
        if best == _NO_MAX:
            return None
        return self._gap_start[best], best

    # ------------------------------------------------------------------
    # Mutations.

    def insert_range(self, start: int, end: int, value: V) -> None:
        """Add the segment ``[start, end)`` with ``value``; it must lie within one gap.

        Raises ValueError, leaving the set unchanged, if ``[start, end)``
        overlaps any segment.  With ``merge=True`` the new segment is merged
        with equal-valued neighbours.  O(1) dict work plus at most two
        ``SortedList`` updates; O(1) in total when ``start`` or ``end`` is the
        boundary of its gap (the allocator's case), the gap's size class is
        unchanged, and the new segment merges into its left neighbour.
        Otherwise O(log n).
        """
        if not 0 <= start < end <= KEY_MAX:
            raise ValueError(f"invalid range [{start:#x}, {end:#x})")
        gap_end = self._gap_end
        # Fast paths: the range is carved from the front or back of a gap.
        ge = gap_end.get(start)
        if ge is not None:
            gs = start
        else:
            gs_ = self._gap_start.get(end)
            if gs_ is not None:
                gs = gs_
                ge = end
            else:
                s = _floor(self._starts, start)
                if s is None:
                    gs = 0
                else:
                    gs = self._seg_end[s]
                    if gs > start:
                        raise ValueError(
                            f"[{start:#x}, {end:#x}) overlaps segment [{s:#x}, {gs:#x})"
                        )
                ge = gap_end[gs]
        if gs > start or end > ge:
            raise ValueError(
                f"[{start:#x}, {end:#x}) is not within a gap "
                f"(the gap at {max(start, gs):#x} is [{gs:#x}, {ge:#x}))"
            )

        # Gap bookkeeping.  The piece [end, ge) keeps the gap's end, so reuse
        # that gap's bucket entry when it survives.
        if end < ge:
            self._gap_restart(gs, ge, end)
        else:
            self._gap_del(gs, ge)
        if gs < start:
            self._gap_add(gs, start)

        seg_end = self._seg_end
        seg_start = self._seg_start
        vals = self._vals
        ls: int | None = None
        re: int | None = None
        if self._merge:
            # A segment ending at start / starting at end is adjacent.
            ls = seg_start.get(start)
            if ls is not None and vals[ls] != value:
                ls = None
            re = seg_end.get(end)
            if re is not None and vals[end] != value:
                re = None
        if ls is not None:
            del seg_start[start]
            if re is not None:
                self._starts.remove(end)
                del seg_end[end]
                del vals[end]
                seg_end[ls] = re
                seg_start[re] = ls
            else:
                seg_end[ls] = end
                seg_start[end] = ls
        elif re is not None:
            starts = self._starts
            starts.remove(end)
            starts.add(start)
            del seg_end[end]
            del vals[end]
            seg_end[start] = re
            seg_start[re] = start
            vals[start] = value
        else:
            self._starts.add(start)
            seg_end[start] = end
            seg_start[end] = start
            vals[start] = value

    def remove_range(self, start: int, end: int) -> None:
        """Remove every part of every segment inside ``[start, end)``.

        Segments straddling ``start`` or ``end`` are split; gaps inside the
        range are fine.  O(log n) to find the first segment (O(1) if ``start``
        is a boundary), then O(log n) per segment removed.
        """
        _check_range(start, end)
        if start == end:
            return
        pos = self._first_overlapping(start)
        if pos >= end:
            return
        seg_end = self._seg_end
        seg_start = self._seg_start
        vals = self._vals
        gap_end = self._gap_end
        starts = self._starts

        e = seg_end[pos]
        if pos < start:
            if e > end:
                # Punch a hole into the middle of one segment.
                seg_end[pos] = start
                seg_start[start] = pos
                seg_end[end] = e
                seg_start[e] = end
                vals[end] = vals[pos]
                starts.add(end)
                self._gap_add(start, end)
                return
            # Trim the segment to [pos, start).
            seg_end[pos] = start
            seg_start[start] = pos
            del seg_start[e]
            new_gs = start
        else:
            new_gs = self._gap_start.get(pos, pos)
            if new_gs < pos:
                # The freed range joins the gap before it.
                self._gap_del(new_gs, pos)
            if e > end:
                self._remove_front(pos, e, end)
                self._gap_add(new_gs, end)
                return
            starts.remove(pos)
            del seg_end[pos]
            del seg_start[e]
            del vals[pos]
        # Invariant here: the segment ending at e (<= end) is gone; [new_gs, e)
        # is about to become gap.  Walk forward over what follows e.
        while True:
            ge = gap_end.get(e)
            if ge is not None:
                if ge >= end:
                    # The gap after e extends past the range: it absorbs
                    # [new_gs, e) and keeps its end (and bucket key).
                    self._gap_restart(e, ge, new_gs)
                    return
                self._gap_del(e, ge)
                e = ge
            elif e >= end:
                self._gap_add(new_gs, e)
                return
            # A segment starts at e < end.
            s = e
            e = seg_end[s]
            if e > end:
                self._remove_front(s, e, end)
                self._gap_add(new_gs, end)
                return
            starts.remove(s)
            del seg_end[s]
            del seg_start[e]
            del vals[s]

    def _remove_front(self, s: int, e: int, end: int) -> None:
        """Turn segment ``[s, e)`` into ``[end, e)`` (``s < end < e``).  O(log n)."""
        starts = self._starts
        starts.remove(s)
        starts.add(end)
        del self._seg_end[s]
        self._seg_end[end] = e
        self._seg_start[e] = end
        vals = self._vals
        vals[end] = vals.pop(s)

    def mutate_range(self, start: int, end: int, fn: Callable[[int, int, V], V]) -> None:
        """Set each segment ``(s, e, v)`` overlapping ``[start, end)`` to ``fn(s, e, v)``.

        Segments straddling ``start`` or ``end`` are split first so that ``fn``
        only sees ``(s, e)`` inside the range; ``fn`` is called once per
        segment, in ascending order.  Gaps are untouched.  With
        ``merge=True`` equal neighbours are then merged, including across the
        range's edges; a split whose two sides end up equal is never made.
        If ``fn`` raises, the segments already visited keep their new values
        and the set stays consistent (and maximal, with ``merge=True``).

        O(log n) to find the first segment (O(1) if ``start`` is a boundary),
        then O(1) per segment, plus O(log n) per split or merge.
        """
        _check_range(start, end)
        if start == end:
            return
        pos = self._first_overlapping(start)
        if pos >= end:
            return
        merge = self._merge
        seg_end = self._seg_end
        seg_start = self._seg_start
        vals = self._vals
        gap_end = self._gap_end
        starts = self._starts

        # prev: the finished segment that ends exactly where the next piece
        # starts, i.e. the merge candidate for that piece; None after a gap.
        prev: int | None = None
        try:
            e = seg_end[pos]
            if pos < start:
                v = vals[pos]
                nv = fn(start, e if e < end else end, v)
                if merge and nv == v:
                    # Unchanged and, by maximality, unequal to both outside
                    # neighbours: no split needed at either edge.
                    prev = pos
                else:
                    seg_end[pos] = start
                    seg_start[start] = pos
                    starts.add(start)
                    vals[start] = nv
                    if e > end:
                        seg_end[start] = end
                        seg_start[end] = start
                        starts.add(end)
                        seg_end[end] = e
                        seg_start[e] = end
                        vals[end] = v
                    else:
                        seg_end[start] = e
                        seg_start[e] = start
                    prev = start
                if e >= end:
                    return
                ge = gap_end.get(e)
                if ge is not None:
                    prev = None
                    if ge >= end:
                        return
                    pos = ge
                else:
                    pos = e
            elif merge:
                # The segment just before the range, if adjacent, may merge.
                prev = seg_start.get(pos)

            while True:
                # pos starts a segment with start <= pos < end.
                e = seg_end[pos]
                v = vals[pos]
                nv = fn(pos, e if e < end else end, v)
                if merge and nv == v:
                    if prev is not None and vals[prev] == v:
                        self._absorb(prev, pos, e)
                    else:
                        prev = pos
                else:
                    if e > end:
                        # Split off [end, e), which keeps v.
                        starts.add(end)
                        seg_end[end] = e
                        seg_start[e] = end
                        vals[end] = v
                        seg_end[pos] = end
                        seg_start[end] = pos
                        e2 = end
                    else:
                        e2 = e
                    if merge and prev is not None and vals[prev] == nv:
                        self._absorb(prev, pos, e2)
                    else:
                        vals[pos] = nv
                        prev = pos
                if e >= end:
                    return
                ge = gap_end.get(e)
                if ge is not None:
                    prev = None
                    if ge >= end:
                        return
                    pos = ge
                else:
                    pos = e
        finally:
            if merge and prev is not None:
                # Merge across the range's end (or, if fn raised, with the
                # not-yet-visited segment).
                r = seg_end[prev]
                re = seg_end.get(r)
                if re is not None and vals[r] == vals[prev]:
                    self._absorb(prev, r, re)

    def _absorb(self, ls: int, s: int, e: int) -> None:
        """Merge segment ``[s, e)`` into the adjacent segment starting at ``ls`` (ending at s).

        O(log n).
        """
        self._starts.remove(s)
        seg_end = self._seg_end
        seg_start = self._seg_start
        del seg_end[s]
        del self._vals[s]
        del seg_start[s]
        seg_end[ls] = e
        seg_start[e] = ls

    def merge_all(self) -> None:
        """Merge every pair of adjacent segments with equal values.

        O(n) plus O(log n) per merge.
        """
        seg_end = self._seg_end
        vals = self._vals
        gap_end = self._gap_end
        s = 0 if 0 in seg_end else gap_end[0]
        while s < KEY_MAX:
            e = seg_end[s]
            v = vals[s]
            ne = seg_end.get(e)
            while ne is not None and vals[e] == v:
                self._absorb(s, e, ne)
                e = ne
                ne = seg_end.get(e)
            s = gap_end.get(e, e)

    # ------------------------------------------------------------------
    # Debugging.

    def check_invariants(self) -> None:
        """Raise AssertionError if the internal structure is inconsistent.  O(n + g + C)."""
        seg_end = self._seg_end
        seg_start = self._seg_start
        vals = self._vals
        gap_end = self._gap_end
        gap_start = self._gap_start
        starts: list[int] = list(self._starts)
        if starts != sorted(seg_end):
            raise AssertionError(f"SortedList of starts {starts[:10]}... != segment dict keys")
        if len(set(starts)) != len(starts):
            raise AssertionError("duplicate segment starts")
        if set(vals) != set(seg_end):
            raise AssertionError("value dict keys != segment starts")
        if {e: s for s, e in seg_end.items()} != seg_start or len(seg_start) != len(seg_end):
            raise AssertionError("end->start dict is not the inverse of start->end")
        expected_gaps: list[tuple[int, int]] = []
        prev_end = 0
        prev_val: tuple[V] | None = None
        for s in starts:
            e = seg_end[s]
            if not 0 <= s < e <= KEY_MAX:
                raise AssertionError(f"bad segment [{s:#x}, {e:#x})")
            if s < prev_end:
                raise AssertionError(f"segment [{s:#x}, {e:#x}) overlaps its predecessor")
            if s > prev_end:
                expected_gaps.append((prev_end, s))
                prev_val = None
            elif self._merge and prev_val is not None and prev_val[0] == vals[s]:
                raise AssertionError(
                    f"adjacent segments with equal values at {s:#x} were not merged"
                )
            prev_end = e
            prev_val = (vals[s],)
        if prev_end < KEY_MAX:
            expected_gaps.append((prev_end, KEY_MAX))
        actual_gaps = sorted(gap_end.items())
        if actual_gaps != expected_gaps:
            raise AssertionError(f"gap dict {actual_gaps[:10]} != gaps {expected_gaps[:10]}")
        if {e: s for s, e in gap_end.items()} != gap_start or len(gap_start) != len(gap_end):
            raise AssertionError("gap end->start dict is not the inverse of start->end")
        total = 0
        for c, bucket in enumerate(self._buckets):
            ends: list[int] = [] if bucket is None else list(bucket)
            total += len(ends)
            if len(set(ends)) != len(ends):
                raise AssertionError(f"bucket {c} holds duplicates")
            for ge in ends:
                gs = gap_start.get(ge)
                if gs is None:
                    raise AssertionError(f"bucket {c} holds {ge:#x}, which ends no gap")
                if _gap_class(ge - gs) != c:
                    raise AssertionError(f"gap [{gs:#x}, {ge:#x}) is in bucket {c}")
            if self._bmin[c] != min(ends, default=_NO_MIN):
                raise AssertionError(f"cached lowest end of class {c} is wrong")
            if self._bmax[c] != max(ends, default=_NO_MAX):
                raise AssertionError(f"cached highest end of class {c} is wrong")
        if self._gmin[_NUM_GROUPS] != _NO_MIN or self._gmax[_NUM_GROUPS] != _NO_MAX:
            raise AssertionError("sentinel class group is not empty")
        if set(self._bmin[_NUM_CLASSES:]) - {_NO_MIN} or set(self._bmax[_NUM_CLASSES:]) - {_NO_MAX}:
            raise AssertionError("padding classes are not empty")
        for g in range(_NUM_GROUPS):
            lo = g << _GROUP_SHIFT
            if self._gmin[g] != min(self._bmin[lo : lo + _GROUP_SIZE]):
                raise AssertionError(f"cached lowest end of class group {g} is wrong")
            if self._gmax[g] != max(self._bmax[lo : lo + _GROUP_SIZE]):
                raise AssertionError(f"cached highest end of class group {g} is wrong")
        if total != len(expected_gaps):
            raise AssertionError(f"buckets hold {total} entries for {len(expected_gaps)} gaps")

    def __str__(self) -> str:
        """One ``[start, end): value`` line per segment, like gVisor's ``Set.String``.  O(n)."""
        return "".join(f"[{s:#x}, {e:#x}): {v}\n" for s, e, v in self)

    def __repr__(self) -> str:
        body = ", ".join(f"[{s:#x}, {e:#x}): {v!r}" for s, e, v in self)
        return f"SegmentSet(merge={self._merge}, {{{body}}})"


def _check_key(key: int) -> None:
    if not 0 <= key < KEY_MAX:
        raise ValueError(f"key {key:#x} out of range [0, {KEY_MAX:#x})")


def _check_range(start: int, end: int) -> None:
    """Validate ``[start, end)``, allowing it to be empty (callers treat that as a no-op)."""
    if not 0 <= start <= end <= KEY_MAX:
        raise ValueError(f"invalid range [{start:#x}, {end:#x})")
