"""An ordered set of disjoint, valued segments with an index of the gaps between them.

This is the Python counterpart of gVisor's ``segment.Set`` with gap tracking
(``trackGaps``), which ``pgalloc.MemoryFile`` uses for its ``unfree``,
``unwaste`` and ``memAcct`` sets.  Keys are Python ints in ``[0, KEY_MAX)``
and every range is half-open.

Representation (``n`` = number of segments, ``g`` = number of gaps):

* ``_seg_end`` (start -> end), ``_vals`` (start -> value), ``_gap_end`` (gap
  start -> gap end) and ``_gap_start`` (gap end -> gap start); with
  ``merge=True`` also ``_seg_start`` (end -> start), which only merging needs.
  Every boundary is the end of exactly one segment or gap and the start of
  exactly one segment or gap, so these dicts form a linked list: once one
  element is located, the next is an O(1) dict lookup.  Allocation-shaped
  calls (insert at a gap's start or end, remove/mutate starting at a segment
  boundary, :meth:`get_exact` / :meth:`replace_value` on a whole segment) never
  search an ordered structure for a key; iteration walks the linked list.
* The start index, for the rest: finding the segment at or before an
  arbitrary key (``_floor_key``).  Segment starts are grouped in blocks of
  ``2**_BLOCK_SHIFT`` keys (16 MiB: at most 4096 page-aligned starts), each a
  plain sorted ``list`` in ``_blocks`` (block -> list), plus one
  ``SortedList`` of the non-empty blocks (``_block_ids``).  Adding or
  removing a start is a dict lookup and a C-level ``insort``/``del`` on a
  short list (~0.2 us, against ~0.6 us for ``SortedList.add``); the
  ``SortedList`` changes only when a block becomes empty or non-empty.  Its
  positional API (``sl[i]`` beyond the first/last element, ``index``,
  ``bisect``, ``islice``) is deliberately never used: the first positional
  access builds an internal index that sortedcontainers then keeps up to
  date on every ``add``/``remove``.  ``_floor`` bisects SortedList's two
  internal lists directly (two C-level bisects, ~0.3 us), falling back to
  ``irange`` if a future sortedcontainers no longer has them.
* The gap index (only with ``gap_index=True``): one ``SortedList`` of gap
  *ends* per size class (``_gap_class``).  Gaps are keyed by their end
  because bottom-up allocation carves the front of a gap, which leaves its
  end -- and, unless the size class changes, its bucket -- untouched.
  Classes are exact per page for small gaps and 8 per power of two above
  that, so a ``first/last_large_enough_gap(n)`` query only scans the one
  bucket whose class contains ``n`` (where some gaps may be shorter than
  ``n``); every gap in a higher class is long enough, so for those only the
  lowest (or highest) end matters.  Those are cached per class in
  ``_bmin``/``_bmax`` and per group of 16 classes in ``_gmin``/``_gmax``, so
  the query takes the minimum of two short lists (at C speed) instead of
  probing every non-empty bucket above.
  The index is brought up to date lazily: a gap change only records, in
  ``_gdirty``, the end whose entry may be stale and the class it was indexed
  under (-1: none); queries (and ``check_invariants``) first apply those
  records.  A waste run that grows page by page between two release steps
  then costs one index update, not one per page; a gap that comes and goes
  between two queries costs none.  Once ``_gdirty`` holds ``_MAX_DIRTY`` ends,
  each change applies the oldest ``_FLUSH_BATCH`` of them, so it never grows
  without bound and no single change pays for many.

Costs quoted below: "O(log n)" means one ``SortedList`` search or update
(amortised, sortedcontainers' usual ~log with a large constant base) or one
short-list ``insort``; "O(1)" means a handful of dict operations.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from operator import lt
from typing import Generic, TypeVar

from sortedcontainers import SortedList

from asyncpgalloc.ranges import KEY_MAX, PAGE_SIZE

__all__ = ["SegmentSet"]

V = TypeVar("V")
D = TypeVar("D")

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

# Start-index blocks: 16 MiB of keys, so at most 4096 page-aligned starts each (a
# memmove of at most 32 KiB per insort) and a new block only every 8 huge pages.
_BLOCK_SHIFT: int = 24
# Pending gap-index updates: once this many ends are stale, a change applies the
# oldest _FLUSH_BATCH of them, so that no single change (and no query, which
# applies all) stalls the loop for long: ~3 µs per end.
_MAX_DIRTY: int = 256
_FLUSH_BATCH: int = 32
# Empty start-index blocks kept beyond the number of non-empty ones.
_MAX_EMPTY: int = 4096


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

    Keys not covered by any segment form gaps.  With ``gap_index=True`` (the
    default) gaps are indexed by length so that the first/last gap of at least
    a given length can be found without scanning; with ``gap_index=False``
    those two queries raise ``TypeError`` and every gap change is cheaper.

    With ``merge=True`` (the default) adjacent segments with equal (``==``)
    values are merged after every mutation, so segments are always maximal;
    with ``merge=False`` segments are only merged by :meth:`merge_all`, each
    insertion stays one segment (so :meth:`get_exact` finds it with one dict
    lookup), and the set keeps one dict fewer.

    Values are stored by reference, not copied: splitting a segment leaves
    both halves holding the same object, so values should be immutable (or
    treated as such) and changed only through :meth:`mutate_range`,
    :meth:`replace_value` or :meth:`refine` -- where gVisor copies a value
    struct, this shares it.

    Not thread-safe; iterators are invalidated by mutation.
    """

    __slots__ = (
        "_block_ids",
        "_blocks",
        "_bmax",
        "_bmin",
        "_buckets",
        "_cmask",
        "_gap_end",
        "_gap_start",
        "_gdirty",
        "_gmask",
        "_gmax",
        "_gmin",
        "_gver",
        "_merge",
        "_nempty",
        "_qfirst",
        "_qlast",
        "_seg_end",
        "_seg_start",
        "_vals",
    )

    def __init__(self, *, merge: bool = True, gap_index: bool = True) -> None:
        """Create an empty set: a single gap ``[0, KEY_MAX)``.  O(number of size classes), ~5 us."""
        self._merge: bool = merge
        self._seg_end: dict[int, int] = {}
        self._seg_start: dict[int, int] | None = {} if merge else None
        self._vals: dict[int, V] = {}
        self._gap_end: dict[int, int] = {0: KEY_MAX}
        self._gap_start: dict[int, int] = {KEY_MAX: 0}
        self._blocks: dict[int, list[int]] = {}
        self._block_ids: SortedList = SortedList()
        # Blocks whose list is empty but still indexed: a block that empties and
        # fills again (a 2 MiB allocation freed and made again) costs no
        # SortedList update.  Lookups drop the empty blocks they walk past;
        # all of them go once they outnumber the others (plus _MAX_EMPTY).
        self._nempty: int = 0
        # Buckets are created on first use (most classes never are) and then
        # kept even when empty, so a gap oscillating between two classes
        # never pays for SortedList creation again.
        n = _NUM_CLASSES if gap_index else 0
        self._buckets: list[SortedList | None] = [None] * n
        # Padded to whole groups, so that a slice to the end of a group is
        # never empty.
        self._bmin: list[int] = [_NO_MIN] * (_NUM_GROUPS << _GROUP_SHIFT if n else 0)
        self._bmax: list[int] = [_NO_MAX] * (_NUM_GROUPS << _GROUP_SHIFT if n else 0)
        # One extra (always-sentinel) group so that a slice from any group + 1
        # is non-empty.
        self._gmin: list[int] = [_NO_MIN] * (_NUM_GROUPS + 1 if n else 0)
        self._gmax: list[int] = [_NO_MAX] * (_NUM_GROUPS + 1 if n else 0)
        # Bit c of _cmask: class c holds a gap; bit g of _gmask: group g does.
        # Queries visit only the non-empty groups above n's, at most one
        # partial group of classes, and n's own class.
        self._cmask: int = 0
        self._gmask: int = 0
        # gap end -> class it is indexed under (-1: none), for stale ends.
        self._gdirty: dict[int, int] | None = {KEY_MAX: -1} if gap_index else None
        # Query caches: (n, gap version, gap end) of the last answer of each
        # query.  _gver counts the gap changes that can make a gap newly long
        # enough (a gap added or grown); shrinking or removing gaps cannot
        # make a better answer, so until _gver moves the cached answer stands
        # as long as its own gap still exists and is still long enough.
        self._gver: int = 0
        self._qfirst: tuple[int, int, int] = (0, -1, 0)
        self._qlast: tuple[int, int, int] = (0, -1, 0)

    @property
    def merges(self) -> bool:
        """True if adjacent equal segments are always merged (``merge=True``)."""
        return self._merge

    @property
    def has_gap_index(self) -> bool:
        """True if :meth:`first_large_enough_gap` and friends are available."""
        return self._gdirty is not None

    # ------------------------------------------------------------------
    # Start index primitives.

    def _ix_add(self, s: int) -> None:
        """Index segment start ``s``.  O(1) dict work plus a short insort."""
        b = s >> _BLOCK_SHIFT
        lst = self._blocks.get(b)
        if lst is None:
            self._blocks[b] = [s]
            self._block_ids.add(b)
        elif not lst:
            lst.append(s)
            self._nempty -= 1
        elif lst[-1] < s:
            lst.append(s)
        else:
            insort(lst, s)

    def _ix_del(self, s: int) -> None:
        """Unindex segment start ``s``.  O(1) dict work plus a short del."""
        lst = self._blocks[s >> _BLOCK_SHIFT]
        del lst[bisect_left(lst, s)]
        if not lst:
            self._block_emptied()

    def _block_emptied(self) -> None:
        self._nempty += 1
        if self._nempty > _MAX_EMPTY + (len(self._blocks) >> 1):
            blocks = self._blocks
            ids = self._block_ids
            for b in [b for b, lst in blocks.items() if not lst]:
                del blocks[b]
                ids.remove(b)
            self._nempty = 0

    def _drop_empty_block(self, b: int) -> None:
        del self._blocks[b]
        self._block_ids.remove(b)
        self._nempty -= 1

    def _ix_move(self, old: int, new: int) -> None:
        """Replace start ``old`` by ``new`` where no other start lies between them."""
        b = old >> _BLOCK_SHIFT
        if new >> _BLOCK_SHIFT == b:
            lst = self._blocks[b]
            lst[bisect_left(lst, old)] = new
        else:
            self._ix_del(old)
            self._ix_add(new)

    def _ix_del_sorted(self, keys: list[int]) -> None:
        """Unindex many starts, ascending, with no other start between them (a run of
        adjacent segments).  O(blocks touched) C-level list work."""
        blocks = self._blocks
        i = 0
        n = len(keys)
        while i < n:
            b = keys[i] >> _BLOCK_SHIFT
            j = bisect_left(keys, (b + 1) << _BLOCK_SHIFT, i)
            lst = blocks[b]
            k = bisect_left(lst, keys[i])
            del lst[k : k + j - i]
            if not lst:
                self._block_emptied()
            i = j

    def _ix_add_sorted(self, keys: Sequence[int]) -> None:
        """Index many new starts, ascending.  O(blocks touched) C-level list work."""
        blocks = self._blocks
        i = 0
        n = len(keys)
        while i < n:
            b = keys[i] >> _BLOCK_SHIFT
            j = bisect_left(keys, (b + 1) << _BLOCK_SHIFT, i)
            lst = blocks.get(b)
            if lst is None:
                blocks[b] = list(keys[i:j])
                self._block_ids.add(b)
            elif not lst:
                lst.extend(keys[i:j])
                self._nempty -= 1
            elif lst[-1] < keys[i]:
                lst.extend(keys[i:j])
            else:
                lst.extend(keys[i:j])
                lst.sort()
            i = j

    def _floor_key(self, key: int) -> int | None:
        """Return the greatest segment start ``<= key``, or None.  O(log n)."""
        b = key >> _BLOCK_SHIFT
        blocks = self._blocks
        lst = blocks.get(b)
        if lst and lst[0] <= key:
            return lst[bisect_right(lst, key) - 1]
        pb = _floor(self._block_ids, b - 1)
        while pb is not None:
            lst = blocks[pb]
            if lst:
                return lst[-1]
            self._drop_empty_block(pb)
            pb = _floor(self._block_ids, pb - 1)
        return None

    def _max_start(self) -> int | None:
        ids = self._block_ids
        while ids:
            # SortedList special-cases index -1: no positional index is built.
            b = ids[-1]
            lst = self._blocks[b]
            if lst:
                return lst[-1]
            self._drop_empty_block(b)
        return None

    # ------------------------------------------------------------------
    # Gap index primitives.  _gap_add/_gap_del/_gap_restart keep _gap_end and
    # _gap_start exact and record in _gdirty which index entries may be stale;
    # _gflush brings the buckets and the min/max caches up to date.

    def _bucket_add(self, c: int, ge: int) -> None:
        """Add gap end ``ge`` to class ``c``.  O(log g)."""
        b: SortedList = self._buckets[c]
        if b is None:
            b = self._buckets[c] = SortedList()
        b.add(ge)
        g = c >> _GROUP_SHIFT
        self._cmask |= 1 << c
        self._gmask |= 1 << g
        bmin = self._bmin
        if ge < bmin[c]:
            bmin[c] = ge
            if ge < self._gmin[g]:
                self._gmin[g] = ge
        bmax = self._bmax
        if ge > bmax[c]:
            bmax[c] = ge
            if ge > self._gmax[g]:
                self._gmax[g] = ge

    def _bucket_remove(self, c: int, ge: int) -> None:
        """Remove gap end ``ge`` from class ``c``.  O(log g)."""
        b: SortedList = self._buckets[c]
        b.remove(ge)
        if not b:
            self._cmask &= ~(1 << c)
            g = c >> _GROUP_SHIFT
            lo = g << _GROUP_SHIFT
            if not (self._cmask >> lo) & ((1 << _GROUP_SIZE) - 1):
                self._gmask &= ~(1 << g)
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

    def _gflush(self, limit: int = 0) -> None:
        """Apply the recorded gap changes to the buckets: all of them, or the oldest
        ``limit`` (each record stands alone).  O(log g) per stale end."""
        gd = self._gdirty
        assert gd is not None
        if 0 < limit < len(gd):
            items = list(islice(gd.items(), limit))
            for ge, _ in items:
                del gd[ge]
        else:
            items = list(gd.items())
            gd.clear()
        gap_start = self._gap_start
        for ge, oc in items:
            gs = gap_start.get(ge)
            nc = -1 if gs is None else _gap_class(ge - gs)
            if nc != oc:
                if oc >= 0:
                    self._bucket_remove(oc, ge)
                if nc >= 0:
                    self._bucket_add(nc, ge)

    def _gap_add(self, gs: int, ge: int) -> None:
        """Record the non-empty gap ``[gs, ge)``; no gap ends at ``ge`` yet.  O(1)."""
        self._gap_end[gs] = ge
        self._gap_start[ge] = gs
        self._gver += 1
        gd = self._gdirty
        if gd is not None and ge not in gd:
            # Untouched since the last flush, and no gap ended here: unindexed.
            gd[ge] = -1
            if len(gd) >= _MAX_DIRTY:
                self._gflush(_FLUSH_BATCH)

    def _gap_del(self, gs: int, ge: int) -> None:
        """Forget the gap ``[gs, ge)``.  O(1)."""
        gd = self._gdirty
        if gd is not None and ge not in gd:
            gd[ge] = _gap_class(ge - gs)
            if len(gd) >= _MAX_DIRTY:
                # Should this entry be flushed with the gap still present:
                # harmless, it is recorded again.
                self._gflush(_FLUSH_BATCH)
                gd[ge] = _gap_class(ge - gs)
        del self._gap_end[gs]
        del self._gap_start[ge]

    def _gap_restart(self, gs: int, ge: int, ngs: int) -> None:
        """Turn the gap ``[gs, ge)`` into ``[ngs, ge)`` (``ngs < ge``).  O(1)."""
        if ngs < gs:
            self._gver += 1
        gd = self._gdirty
        if gd is not None and ge not in gd:
            oc = _gap_class(ge - gs)
            if oc != _gap_class(ge - ngs):
                gd[ge] = oc
                if len(gd) >= _MAX_DIRTY:
                    self._gflush(_FLUSH_BATCH)
                    gd[ge] = oc
        gap_end = self._gap_end
        del gap_end[gs]
        gap_end[ngs] = ge
        self._gap_start[ge] = ngs

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
        s = self._floor_key(key)
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
        gap_end = self._gap_end
        vals = self._vals
        s = gap_end.get(0, 0)
        while s < KEY_MAX:
            e = seg_end[s]
            yield s, e, vals[s]
            s = gap_end.get(e, e)

    def is_empty(self) -> bool:
        """Return True if there are no segments.  O(1)."""
        return not self._seg_end

    def last_segment(self) -> tuple[int, int, V] | None:
        """The highest segment as ``(start, end, value)``, or None if empty.  O(1)."""
        s = self._max_start()
        if s is None:
            return None
        return s, self._seg_end[s], self._vals[s]

    def find_segment(self, key: int) -> tuple[int, int, V] | None:
        """Return the segment containing ``key``, or None.

        O(1) if ``key`` is a segment start, else O(log n).
        """
        _check_key(key)
        e = self._seg_end.get(key)
        if e is not None:
            return key, e, self._vals[key]
        s = self._floor_key(key)
        if s is None:
            return None
        e = self._seg_end[s]
        if e <= key:
            return None
        return s, e, self._vals[s]

    def segment_end(self, start: int) -> int:
        """The end of the segment that starts at ``start``; KeyError if none does.  O(1)."""
        return self._seg_end[start]

    def get_exact(self, start: int, end: int, default: D) -> V | D:
        """The value of the segment ``[start, end)`` if exactly that segment exists, else
        ``default``.  O(1): one dict lookup (two on a hit).

        With ``merge=False`` every inserted range stays one segment until something
        splits it, so this is how a caller finds "its" segment without a search.
        """
        if self._seg_end.get(start) == end:
            return self._vals[start]
        return default

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
        s = self._floor_key(key)
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
            s = self._floor_key(start)
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
            s = start if start in seg_end else self._floor_key(start)
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

    def gaps_descending(self) -> Iterator[tuple[int, int]]:
        """Yield every non-empty gap ``(start, end)``, highest first.

        O(1) per gap with ``merge=True`` (O(log n) without).  The caller may fill
        (:meth:`insert_range`) any part of the gap just yielded before asking for
        the next one; every other mutation invalidates the iterator.  The same
        sequence as repeated :meth:`last_large_enough_gap` ``(1)`` calls with the
        gap filled in between, without a gap-index query per gap.
        """
        gap_start = self._gap_start
        seg_start = self._seg_start
        b = KEY_MAX
        while b > 0:
            gs = gap_start.get(b)
            if gs is None:
                # A segment ends at b.
                if seg_start is not None:
                    b = seg_start[b]
                else:
                    fs = self._floor_key(b - 1)
                    assert fs is not None
                    b = fs
                continue
            # Where to go on from, found before the caller fills the gap (which
            # may merge the segments around it): the start of the segment below.
            if gs == 0:
                nb = 0
            elif seg_start is not None:
                nb = seg_start[gs]
            else:
                fs = self._floor_key(gs - 1)
                assert fs is not None
                nb = fs
            yield gs, b
            b = nb

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

    def _check_gap_index(self) -> None:
        gd = self._gdirty
        if gd is None:
            raise TypeError("this SegmentSet was created with gap_index=False")
        if gd:
            self._gflush()

    def first_large_enough_gap(self, n: int) -> tuple[int, int] | None:
        """Return the gap with the lowest start whose length is ``>= n``, or None.

        Never scans the segments.  Every gap in a class above ``n``'s is long
        enough, and disjoint gaps ordered by end are ordered by start, so the
        best of those is the minimum of the cached per-class/per-group lowest
        ends (O(number of classes / 16), at C speed).  Only ``n``'s own class
        is searched gap by gap, and only below that candidate: O(1) when its
        lowest gap is long enough (always, for page-multiple lengths below
        32 pages), else O(log g + k) for k too-short gaps passed over.  Plus
        O(log g) per gap changed since the last query; O(1) when no gap was
        added or grown since the last query for the same ``n`` (then the
        answer can only be the same gap, if it is still long enough).
        Raises ``TypeError`` with ``gap_index=False``.
        """
        q = self._qfirst
        if q[0] == n and q[1] == self._gver:
            ge = q[2]
            gs = self._gap_start.get(ge)
            if gs is not None and ge - gs >= n:
                return gs, ge
        if n < 1:
            raise ValueError(f"gap length must be >= 1, not {n}")
        self._check_gap_index()
        if n > KEY_MAX:
            return None
        c = _gap_class(n)
        bmin = self._bmin
        g = c >> _GROUP_SHIFT
        best = _NO_MIN
        # The non-empty groups above g (each lowest set bit in turn).
        m = self._gmask >> (g + 1)
        if m:
            gmin = self._gmin
            k = g + 1
            while m:
                low = (m & -m).bit_length() - 1
                k += low
                v = gmin[k]
                if v < best:
                    best = v
                m >>= low + 1
                k += 1
        hi = (g + 1) << _GROUP_SHIFT
        if (self._cmask >> (c + 1)) & ((1 << (hi - c - 1)) - 1):
            # The rest of c's own group (a slice is never empty here).
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
        self._qfirst = (n, self._gver, best)
        return self._gap_start[best], best

    def last_large_enough_gap(self, n: int) -> tuple[int, int] | None:
        """Return the gap with the highest start whose length is ``>= n``, or None.

        Same method and cost as :meth:`first_large_enough_gap`, mirrored.
        """
        q = self._qlast
        if q[0] == n and q[1] == self._gver:
            ge = q[2]
            gs = self._gap_start.get(ge)
            if gs is not None and ge - gs >= n:
                return gs, ge
        if n < 1:
            raise ValueError(f"gap length must be >= 1, not {n}")
        self._check_gap_index()
        if n > KEY_MAX:
            return None
        c = _gap_class(n)
        bmax = self._bmax
        g = c >> _GROUP_SHIFT
        best = _NO_MAX
        m = self._gmask >> (g + 1)
        if m:
            gmax = self._gmax
            k = g + 1
            while m:
                low = (m & -m).bit_length() - 1
                k += low
                v = gmax[k]
                if v > best:
                    best = v
                m >>= low + 1
                k += 1
        hi = (g + 1) << _GROUP_SHIFT
        if (self._cmask >> (c + 1)) & ((1 << (hi - c - 1)) - 1):
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
        self._qlast = (n, self._gver, best)
        return self._gap_start[best], best

    # ------------------------------------------------------------------
    # Mutations.

    def take_first_gap(self, n: int, value: V) -> int | None:
        """First fit: insert ``[gs, gs + n)`` with ``value`` at the start of the first gap
        of length ``>= n`` and return ``gs``; None (changing nothing) if there is none.

        The same as :meth:`first_large_enough_gap` then :meth:`insert_range`, fused
        for the allocator: O(1) when no gap was added or grown since the last
        query for the same ``n`` and the gap keeps its size class.
        """
        q = self._qfirst
        gs: int | None = None
        if q[0] == n and q[1] == self._gver:
            ge = q[2]
            gs = self._gap_start.get(ge)
            if gs is not None and ge - gs < n:
                gs = None
        if gs is None:
            gap = self.first_large_enough_gap(n)
            if gap is None:
                return None
            gs, ge = gap
        end = gs + n
        if end == ge or self._seg_start is not None:
            self.insert_range(gs, end, value)
            return gs
        # Inlined insert_range(gs, end, value) for end < ge without merging:
        # the gap keeps its end (and, unless its class changes, its index entry).
        gd = self._gdirty
        if gd is not None and ge not in gd:
            p = (ge - gs) >> _CLASS_SHIFT
            r = (ge - end) >> _CLASS_SHIFT
            if p < _EXACT_CLASSES:
                same = p == r
            else:
                sh = p.bit_length() - _SUB_SHIFT_BIAS
                same = p >> sh == r >> sh
            if not same:
                oc = _gap_class(ge - gs)
                gd[ge] = oc
                if len(gd) >= _MAX_DIRTY:
                    self._gflush(_FLUSH_BATCH)
                    gd[ge] = oc
        gap_end = self._gap_end
        del gap_end[gs]
        gap_end[end] = ge
        self._gap_start[ge] = end
        self._seg_end[gs] = end
        self._vals[gs] = value
        b = gs >> _BLOCK_SHIFT
        lst = self._blocks.get(b)
        if lst and lst[-1] < gs:
            lst.append(gs)
        else:
            self._ix_add(gs)
        return gs

    def take_last_gap(self, n: int, value: V) -> int | None:
        """Last fit: insert ``[ge - n, ge)`` with ``value`` at the end of the last gap of
        length ``>= n`` and return its start; None (changing nothing) if there is none.

        :meth:`last_large_enough_gap` then :meth:`insert_range`; same cost.
        """
        gap = self.last_large_enough_gap(n)
        if gap is None:
            return None
        start = gap[1] - n
        self.insert_range(start, gap[1], value)
        return start

    def insert_range(self, start: int, end: int, value: V) -> None:
        """Add the segment ``[start, end)`` with ``value``; it must lie within one gap.

        Raises ValueError, leaving the set unchanged, if ``[start, end)``
        overlaps any segment.  With ``merge=True`` the new segment is merged
        with equal-valued neighbours.  O(1) when ``start`` or ``end`` is the
        boundary of its gap (the allocator's case), else O(log n) to find the
        gap; plus a short insort for a new segment start.
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
                s = self._floor_key(start)
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
        # that gap's index entry when it survives.
        if end < ge:
            if gs == start:
                # Inlined _gap_restart(start, ge, end): the bottom-up allocation.
                gd = self._gdirty
                if gd is not None and ge not in gd:
                    # Same class iff the page counts agree below _EXACT_CLASSES,
                    # else iff their bit lengths and the 3 bits after the
                    # leading one agree.
                    p = (ge - start) >> _CLASS_SHIFT
                    q = (ge - end) >> _CLASS_SHIFT
                    if p < _EXACT_CLASSES:
                        same = p == q
                    else:
                        sh = p.bit_length() - _SUB_SHIFT_BIAS
                        same = p >> sh == q >> sh
                    if not same:
                        oc = _gap_class(ge - start)
                        gd[ge] = oc
                        if len(gd) >= _MAX_DIRTY:
                            self._gflush(_FLUSH_BATCH)
                            gd[ge] = oc
                del gap_end[start]
                gap_end[end] = ge
                self._gap_start[ge] = end
            else:
                self._gap_restart(gs, ge, end)
                self._gap_add(gs, start)
        else:
            self._gap_del(gs, ge)
            if gs < start:
                self._gap_add(gs, start)

        seg_end = self._seg_end
        vals = self._vals
        seg_start = self._seg_start
        if seg_start is None:
            seg_end[start] = end
            vals[start] = value
            # Inlined _ix_add(start).
            b = start >> _BLOCK_SHIFT
            lst = self._blocks.get(b)
            if lst and lst[-1] < start:
                lst.append(start)
            else:
                self._ix_add(start)
            return
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
                self._ix_del(end)
                del seg_end[end]
                del vals[end]
                seg_end[ls] = re
                seg_start[re] = ls
            else:
                seg_end[ls] = end
                seg_start[end] = ls
        elif re is not None:
            self._ix_del(end)
            self._ix_add(start)
            del seg_end[end]
            del vals[end]
            seg_end[start] = re
            seg_start[re] = start
            vals[start] = value
        else:
            self._ix_add(start)
            seg_end[start] = end
            seg_start[end] = start
            vals[start] = value

    def replace_value(self, start: int, value: V) -> None:
        """Set the value of the segment that starts at ``start`` (which must exist).

        O(1) with ``merge=False``.  With ``merge=True`` the segment is then merged
        with equal neighbours (O(1) dict work plus a short list update each).
        Raises KeyError, changing nothing, if no segment starts at ``start``.
        """
        vals = self._vals
        if start not in vals:
            raise KeyError(start)
        vals[start] = value
        seg_start = self._seg_start
        if seg_start is None:
            return
        seg_end = self._seg_end
        e = seg_end[start]
        ne = seg_end.get(e)
        if ne is not None and vals[e] == value:
            self._absorb(start, e, ne)
        ls = seg_start.get(start)
        if ls is not None and vals[ls] == value:
            self._absorb(ls, start, seg_end[start])

    def remove_range(self, start: int, end: int) -> None:
        """Remove every part of every segment inside ``[start, end)``.

        Segments straddling ``start`` or ``end`` are split; gaps inside the
        range are fine.  O(log n) to find the first segment (O(1) if ``start``
        is a boundary), then O(1) per segment removed.
        """
        self._remove(start, end, None)

    def pop_range(self, start: int, end: int) -> list[tuple[int, int, V]]:
        """As :meth:`remove_range`, returning the removed pieces ``(start, end, value)``
        (clipped to the range), ascending.  Same cost."""
        out: list[tuple[int, int, V]] = []
        self._remove(start, end, out)
        return out

    def _remove(self, start: int, end: int, out: list[tuple[int, int, V]] | None) -> None:
        if not 0 <= start <= end <= KEY_MAX:
            raise ValueError(f"invalid range [{start:#x}, {end:#x})")
        if start == end:
            return
        seg_end = self._seg_end
        e = seg_end.get(start)
        if e is not None:
            pos = start
        else:
            pos = self._first_overlapping(start)
            if pos >= end:
                return
            e = seg_end[pos]
        seg_start = self._seg_start
        vals = self._vals
        gap_end = self._gap_end
        gap_start = self._gap_start
        gd = self._gdirty
        dead: list[int] = []
        if pos < start:
            v = vals[pos]
            if e > end:
                # Punch a hole into the middle of one segment: a new gap [start, end).
                if out is not None:
                    out.append((start, end, v))
                seg_end[pos] = start
                seg_end[end] = e
                vals[end] = v
                if seg_start is not None:
                    seg_start[start] = pos
                    seg_start[e] = end
                self._ix_add(end)
                gap_end[start] = end
                gap_start[end] = start
                self._gver += 1
                if gd is not None and end not in gd:
                    gd[end] = -1
                    if len(gd) >= _MAX_DIRTY:
                        self._gflush(_FLUSH_BATCH)
                return
            # Trim the segment to [pos, start).
            if out is not None:
                out.append((start, e, v))
            seg_end[pos] = start
            if seg_start is not None:
                seg_start[start] = pos
                del seg_start[e]
            new_gs = start
        else:
            new_gs = gap_start.get(pos, pos)
            if e > end:
                # Cut the front off one segment, [pos, e) -> [end, e); the gap
                # before it, if any, now ends at end (the waste run that grows
                # page by page).
                v = vals.pop(pos)
                if out is not None:
                    out.append((pos, end, v))
                del seg_end[pos]
                seg_end[end] = e
                vals[end] = v
                if seg_start is not None:
                    seg_start[e] = end
                self._ix_move(pos, end)
                if new_gs < pos:
                    if gd is not None and pos not in gd:
                        gd[pos] = _gap_class(pos - new_gs)
                    del gap_start[pos]
                gap_end[new_gs] = end
                gap_start[end] = new_gs
                self._gver += 1
                if gd is not None:
                    if end not in gd:
                        gd[end] = -1
                    if len(gd) >= _MAX_DIRTY:
                        self._gflush(_FLUSH_BATCH)
                return
            if new_gs < pos:
                # The freed range joins the gap before it.
                self._gap_del(new_gs, pos)
            v = vals.pop(pos)
            if out is not None:
                out.append((pos, e, v))
            dead.append(pos)
            del seg_end[pos]
            if seg_start is not None:
                del seg_start[e]
        # Invariant here: the segment ending at e (<= end) is gone; [new_gs, e)
        # is about to become gap.  Walk forward over what follows e.  The starts
        # of whole segments removed are unindexed together at the end: nothing
        # lies between them in the index.
        while True:
            ge = gap_end.get(e)
            if ge is not None:
                if ge >= end:
                    # The gap after e extends past the range: it absorbs
                    # [new_gs, e) and keeps its end (and index entry).
                    if dead:
                        self._ix_del_sorted(dead)
                    self._gap_restart(e, ge, new_gs)
                    return
                self._gap_del(e, ge)
                e = ge
            elif e >= end:
                if dead:
                    self._ix_del_sorted(dead)
                self._gap_add(new_gs, e)
                return
            # A segment starts at e < end.
            s = e
            e = seg_end[s]
            if e > end:
                if out is not None:
                    out.append((s, end, vals[s]))
                if dead:
                    self._ix_del_sorted(dead)
                self._remove_front(s, e, end)
                self._gap_add(new_gs, end)
                return
            v = vals.pop(s)
            if out is not None:
                out.append((s, e, v))
            dead.append(s)
            del seg_end[s]
            if seg_start is not None:
                del seg_start[e]

    def _remove_front(self, s: int, e: int, end: int) -> None:
        """Turn segment ``[s, e)`` into ``[end, e)`` (``s < end < e``).  O(1)."""
        self._ix_move(s, end)
        del self._seg_end[s]
        self._seg_end[end] = e
        if self._seg_start is not None:
            self._seg_start[e] = end
        vals = self._vals
        vals[end] = vals.pop(s)

    def refine(self, start: int, cuts: Sequence[int], values: Sequence[V]) -> None:
        """Split the segment that starts at ``start`` at ``cuts`` and give the pieces ``values``.

        ``cuts`` must be strictly ascending and strictly inside the segment, and
        ``values`` one longer: piece ``i`` is ``[cuts[i-1], cuts[i])`` (from
        ``start``, to the segment's end).  With ``merge=True`` equal neighbours are
        then merged.  O(k) at C speed for k cuts (plus O(blocks touched) for the
        start index): the bulk form of many :meth:`mutate_range` calls, for marking
        a usage scan's result.  Raises ValueError, changing nothing, on bad input.
        """
        seg_end = self._seg_end
        e = seg_end.get(start)
        if e is None:
            raise ValueError(f"no segment starts at {start:#x}")
        if len(values) != len(cuts) + 1:
            raise ValueError(f"{len(cuts)} cuts need {len(cuts) + 1} values, not {len(values)}")
        if cuts:
            if not start < cuts[0] or not cuts[-1] < e:
                raise ValueError(f"cuts outside the segment [{start:#x}, {e:#x})")
            if not all(map(lt, cuts, islice(cuts, 1, None))):
                raise ValueError("cuts are not strictly ascending")
        starts = [start, *cuts]
        ends = [*cuts, e]
        seg_end.update(zip(starts, ends, strict=True))
        self._vals.update(zip(starts, values, strict=True))
        if cuts:
            self._ix_add_sorted(cuts)
        seg_start = self._seg_start
        if seg_start is not None:
            seg_start.update(zip(ends, starts, strict=True))
            # Merge equal neighbours from the segment before start to the one after e.
            ls = seg_start.get(start)
            self._merge_from(start if ls is None else ls, e)

    def _merge_from(self, s: int, stop: int) -> None:
        """Merge equal adjacent segments from the one starting at ``s`` up to the one
        starting at ``stop`` (inclusive, if adjacent).  O(1) per segment passed."""
        seg_end = self._seg_end
        vals = self._vals
        while True:
            e = seg_end[s]
            ne = seg_end.get(e)
            if ne is None:
                return
            if vals[e] == vals[s]:
                self._absorb(s, e, ne)
                if e >= stop:
                    return
                continue
            if e >= stop:
                return
            s = e

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
        then O(1) per segment, plus a short list update per split or merge.
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
                    self._ix_add(start)
                    vals[start] = nv
                    if seg_start is not None:
                        seg_start[start] = pos
                    if e > end:
                        seg_end[start] = end
                        self._ix_add(end)
                        seg_end[end] = e
                        vals[end] = v
                        if seg_start is not None:
                            seg_start[end] = start
                            seg_start[e] = end
                    else:
                        seg_end[start] = e
                        if seg_start is not None:
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
            elif seg_start is not None:
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
                        self._ix_add(end)
                        seg_end[end] = e
                        vals[end] = v
                        seg_end[pos] = end
                        if seg_start is not None:
                            seg_start[e] = end
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

        O(1) plus a short list update.
        """
        self._ix_del(s)
        del self._seg_end[s]
        del self._vals[s]
        self._seg_end[ls] = e
        seg_start = self._seg_start
        if seg_start is not None:
            del seg_start[s]
            seg_start[e] = ls

    def merge_all(self) -> None:
        """Merge every pair of adjacent segments with equal values.

        O(n) plus a short list update per merge.
        """
        seg_end = self._seg_end
        vals = self._vals
        gap_end = self._gap_end
        s = gap_end.get(0, 0)
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
        blocks = self._blocks
        if list(self._block_ids) != sorted(blocks):
            raise AssertionError("start index: block ids != blocks")
        starts: list[int] = []
        for b in self._block_ids:
            lst = blocks[b]
            if any(x >> _BLOCK_SHIFT != b for x in lst):
                raise AssertionError(f"start index: block {b:#x} holds strangers")
            starts.extend(lst)
        if sum(1 for lst in blocks.values() if not lst) != self._nempty:
            raise AssertionError("start index: wrong count of empty blocks")
        if starts != sorted(seg_end):
            raise AssertionError(f"start index {starts[:10]}... != segment dict keys")
        if len(set(starts)) != len(starts):
            raise AssertionError("duplicate segment starts")
        if set(vals) != set(seg_end):
            raise AssertionError("value dict keys != segment starts")
        if seg_start is not None and (
            {e: s for s, e in seg_end.items()} != seg_start or len(seg_start) != len(seg_end)
        ):
            raise AssertionError("end->start dict is not the inverse of start->end")
        if (seg_start is None) == self._merge:
            raise AssertionError("end->start dict kept without merging, or missing with it")
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
        if self._gdirty is None:
            if self._buckets or self._bmin or self._gmin:
                raise AssertionError("a set without a gap index has buckets")
            return
        self._gflush()
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
        cmask = sum(1 << c for c, b in enumerate(self._buckets) if b)
        if cmask != self._cmask:
            raise AssertionError("non-empty class mask is wrong")
        gmask = 0
        for c, b in enumerate(self._buckets):
            if b:
                gmask |= 1 << (c >> _GROUP_SHIFT)
        if gmask != self._gmask:
            raise AssertionError("non-empty group mask is wrong")
        if total != len(expected_gaps):
            raise AssertionError(f"buckets hold {total} entries for {len(expected_gaps)} gaps")

    def merged(self) -> Iterator[tuple[int, int, V]]:
        """Yield the maximal runs of equal values ``(start, end, value)``, ascending.  O(n).

        The same as iterating when ``merge=True``; with ``merge=False`` it shows the
        set as a merging set would hold it.
        """
        return merged_runs(self)

    def __str__(self) -> str:
        """One ``[start, end): value`` line per maximal run, like gVisor's ``Set.String``.

        O(n).  Runs of equal values are shown merged whether or not the set merges
        them, so the dump of a state does not depend on how it was reached.
        """
        return format_runs(self)

    def __repr__(self) -> str:
        body = ", ".join(f"[{s:#x}, {e:#x}): {v!r}" for s, e, v in self)
        return f"SegmentSet(merge={self._merge}, {{{body}}})"


def merged_runs(segments: Iterable[tuple[int, int, V]]) -> Iterator[tuple[int, int, V]]:
    """The maximal runs of equal values in ascending ``segments`` (a SegmentSet of either
    core): adjacent segments with equal values joined.  O(n)."""
    run: tuple[int, int, V] | None = None
    for s, e, v in segments:
        if run is not None:
            if run[1] == s and run[2] == v:
                run = (run[0], e, v)
                continue
            yield run
        run = (s, e, v)
    if run is not None:
        yield run


def format_runs(segments: Iterable[tuple[int, int, V]]) -> str:
    """One ``[start, end): value`` line per maximal run of ``segments`` (gVisor's
    ``Set.String``), shared by both cores' sets.  O(n)."""
    return "".join(f"[{s:#x}, {e:#x}): {v}\n" for s, e, v in merged_runs(segments))


def _check_key(key: int) -> None:
    if not 0 <= key < KEY_MAX:
        raise ValueError(f"key {key:#x} out of range [0, {KEY_MAX:#x})")


def _check_range(start: int, end: int) -> None:
    """Validate ``[start, end)``, allowing it to be empty (callers treat that as a no-op)."""
    if not 0 <= start <= end <= KEY_MAX:
        raise ValueError(f"invalid range [{start:#x}, {end:#x})")
