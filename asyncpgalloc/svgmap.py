"""A picture of a MemoryFile: an SVG map of its chunks and the state of every page.

Each 1 GiB chunk is a row ``width`` pixels wide, labelled small or huge. A row shows
the first ``span`` bytes of its chunk: by default the smallest power of two that
holds every page that is not free in any chunk (at least 2 MiB, and one page per
column), so a small file's activity fills the row instead of its first few pixels,
and fragmentation shows; past ``span`` every chunk is free (the legend's totals and
each row's figures still count the whole chunk). ``span=CHUNK_SIZE`` draws whole
chunks (1 MiB per column at the default width of 1024). Used, waste, releasing, sub-released and
free pages each have a colour; a column holding several states is drawn as a
stacked bar in proportion to their bytes, and every state present in a column
gets at least one pixel, so a single stray page still shows: fragmentation reads
as ragged, part-height bars. A thin strip under each row shows the pages known to
be committed. A legend gives the byte total of each state (from ``mf.stats()``).

Two steps, so that a map can be drawn from something other than a live file:

- :func:`snapshot` copies the file's page sets into a plain :class:`MapSnapshot`
  (O(segments), synchronous, on the loop: a consistent cut, since nothing else
  runs meanwhile);
- :func:`render_svg` turns a snapshot into SVG text: pure, O(segments + chunks *
  width), safe to run in a thread. Its output is bounded by the number of pixels,
  not of segments: a chunk with 100k tiny allocations costs no more room than
  one with 100.

:func:`render_map` does both and writes the file on the loop;
:func:`render_map_async` takes the snapshot on the loop and renders and writes in
the loop's default executor (not the file's, which the releaser uses).
"""

from __future__ import annotations

import asyncio
import enum
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol
from xml.sax.saxutils import escape, quoteattr

from .ranges import CHUNK_SHIFT, CHUNK_SIZE, HUGE_PAGE_SIZE, PAGE_SIZE
from .stats import MemoryFileStats, load_fields

if TYPE_CHECKING:
    from .pages import PageView
    from .segments import SegmentSet
    from .stats import LoadProgress

__all__ = [
    "DEFAULT_WIDTH",
    "MapSnapshot",
    "PageState",
    "auto_span",
    "format_bytes",
    "render_map",
    "render_map_async",
    "render_svg",
    "snapshot",
    "write_svg",
]


class Viewable(Protocol):
    """What a map is drawn from (:class:`~asyncpgalloc.MemoryFile` is one): anything
    that gives a read-only :class:`~asyncpgalloc.pages.PageView`."""

    def page_view(self) -> PageView: ...

    def load_progress(self) -> LoadProgress | None: ...


class PageState(enum.Enum):
    """The states a page of the file can be in, as drawn on the map."""

    USED = "used"
    WASTE = "waste"
    RELEASING = "releasing"
    SUBRELEASED = "sub-released"
    FREE = "free"


#: Stack order within a column, bottom up: what holds memory sits at the bottom.
_STATES: tuple[PageState, ...] = tuple(PageState)

#: Pixel columns per chunk row: 1 MiB per column.
DEFAULT_WIDTH = 1024


@dataclass(frozen=True, slots=True)
class MapSnapshot:
    """Everything the map shows, as plain data (no mapping, no file descriptor).

    Attributes:
        chunk_huge: one flag per 1 GiB chunk, in file order: True if the chunk is
            huge-page-backed.
        ranges: for each :class:`PageState`, its pages as sorted, disjoint
            ``(start, end)`` byte ranges (a :class:`~asyncpgalloc.FileRange` is one).
            Together they cover the file exactly once.
        known_committed: sorted, disjoint ranges of pages known to be committed.
        subreleased_counts: ``(huge page offset, small pages sub-released)`` for each
            huge page partly released (gVisor keeps only these counts; the pages'
            positions are the zero-reference pages that are neither waste nor
            releasing, which is how :func:`snapshot` finds them).
        stats: the file's own totals when the snapshot was taken, shown in the
            legend; ``None`` to total the ranges instead.
    """

    chunk_huge: tuple[bool, ...]
    ranges: Mapping[PageState, tuple[tuple[int, int], ...]]
    known_committed: tuple[tuple[int, int], ...] = ()
    subreleased_counts: tuple[tuple[int, int], ...] = ()
    stats: MemoryFileStats | None = field(default=None)

    @property
    def total_size(self) -> int:
        """Bytes in the file (whole chunks)."""
        return len(self.chunk_huge) * CHUNK_SIZE

    def totals(self) -> dict[PageState, int]:
        """Bytes per state: from :attr:`stats` if present, else summed over :attr:`ranges`."""
        st = self.stats
        if st is not None:
            return {
                PageState.USED: st.used_bytes,
                PageState.WASTE: st.waste_bytes,
                PageState.RELEASING: st.releasing_bytes,
                PageState.SUBRELEASED: st.subreleased_bytes,
                PageState.FREE: st.free_bytes,
            }
        return {s: _span(self.ranges.get(s, ())) for s in _STATES}

    def known_committed_bytes(self) -> int:
        """Bytes known to be committed."""
        if self.stats is not None:
            return self.stats.known_committed_bytes
        return _span(self.known_committed)


# ------------------------------------------------------------------ snapshot


def snapshot(mf: Viewable) -> MapSnapshot:
    """Copy ``mf``'s page states into a :class:`MapSnapshot`.

    Synchronous with no ``await``, so it is a consistent cut of the file. Cost: one
    pass over each page set, O(segments + chunks), no syscall: ~2 µs per segment
    here (0.2-0.3 s for 100k live allocations with holes between them). Raises
    :class:`~asyncpgalloc.ClosedError` once the file is closed.
    """
    view = mf.page_view()
    total = view.total_size
    chunk_huge = tuple(view.chunk_huge)
    runs = _chunk_runs(chunk_huge)
    # Whole-set iteration is ~3x cheaper than visit_range()/gaps() per segment, and
    # this is the cost paid on the loop; the void beyond the file is cut off.
    used_s, free_s, zero_s = _scan_unfree(view.unfree_small, total)
    used_h, free_h, zero_h = _scan_unfree(view.unfree_huge, total)
    waste = sorted([*view.unwaste_small.gaps(0, total), *view.unwaste_huge.gaps(0, total)])
    releasing = sorted((r.start, r.end) for r in view.releasing)
    # Every zero-reference page of a chunk's own size is waste, releasing or
    # sub-released (an invariant), so the sub-released pages are what is left once
    # those two, and the other size's chunks (void in this set), are taken out.
    busy = waste + releasing
    subreleased = sorted(
        _subtract(zero_s, sorted(busy + [(lo, hi) for lo, hi, h in runs if h]))
        + _subtract(zero_h, sorted(busy + [(lo, hi) for lo, hi, h in runs if not h]))
    )
    known: list[tuple[int, int]] = []
    # Nothing known committed (no usage scan yet): skip a pass over every allocation.
    for s, e, ma in view.mem_acct if view.known_committed_bytes else ():
        if ma.known_committed:
            if known and known[-1][1] == s:
                s = known.pop()[0]
            known.append((s, e))
    used = sorted(used_s + used_h)
    free = sorted(free_s + free_h)
    sub_counts = tuple(sorted(view.subreleased.items()))
    huge_chunks = sum(chunk_huge)
    # The same definitions as pages.count_states(), totalled from this pass rather than
    # paying for a second one (the tests hold the two equal).
    stats = MemoryFileStats(
        total_size=total,
        used_bytes=_span(used),
        waste_bytes=_span(waste),
        releasing_bytes=_span(releasing),
        free_bytes=_span(free),
        subreleased_bytes=sum(n for _, n in sub_counts) * PAGE_SIZE,
        known_committed_bytes=view.known_committed_bytes,
        huge_chunks=huge_chunks,
        small_chunks=len(chunk_huge) - huge_chunks,
        **load_fields(mf.load_progress()),
    )
    return MapSnapshot(
        chunk_huge=chunk_huge,
        ranges={
            PageState.USED: tuple(used),
            PageState.WASTE: tuple(waste),
            PageState.RELEASING: tuple(releasing),
            PageState.SUBRELEASED: tuple(subreleased),
            PageState.FREE: tuple(free),
        },
        known_committed=tuple(known),
        subreleased_counts=sub_counts,
        stats=stats,
    )


def _scan_unfree(
    unfree: SegmentSet[int], total: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]:
    """One pass over an unfree set: (used, free, zero-reference) ranges inside the file."""
    used: list[tuple[int, int]] = []
    free: list[tuple[int, int]] = []
    zero: list[tuple[int, int]] = []
    prev = 0
    for s, e, refs in unfree:
        if s >= total:
            break
        if s > prev:
            free.append((prev, s))
        prev = e
        if e > total:
            e = total
        (used if refs > 0 else zero).append((s, e))
    if prev < total:
        free.append((prev, total))
    return used, free, zero


def _span(ranges: Iterable[tuple[int, int]]) -> int:
    return sum(e - s for s, e in ranges)


def _chunk_runs(huge_flags: Iterable[bool]) -> list[tuple[int, int, bool]]:
    """Maximal runs of chunks of one page size, as ``(start, end, huge)`` byte ranges."""
    runs: list[tuple[int, int, bool]] = []
    for i, huge in enumerate(huge_flags):
        lo = i << CHUNK_SHIFT
        if runs and runs[-1][2] == huge:
            runs[-1] = (runs[-1][0], lo + CHUNK_SIZE, huge)
        else:
            runs.append((lo, lo + CHUNK_SIZE, huge))
    return runs


def _subtract(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` minus ``holes`` (each sorted and disjoint). O(len(ranges) + len(holes))."""
    out: list[tuple[int, int]] = []
    i = 0
    n = len(holes)
    for s, e in ranges:
        # Holes that end before this range can matter to no later range either.
        while i < n and holes[i][1] <= s:
            i += 1
        j = i
        while s < e:
            if j < n and holes[j][0] < e:
                hs, he = holes[j]
                if hs > s:
                    out.append((s, hs))
                s = max(s, he)
                j += 1
            else:
                out.append((s, e))
                break
    return out


# ------------------------------------------------------------------- drawing

_COLOURS: dict[PageState, str] = {
    PageState.USED: "#2f6db5",
    PageState.WASTE: "#f0a03c",
    PageState.RELEASING: "#d1382c",
    PageState.SUBRELEASED: "url(#subreleased)",
    PageState.FREE: "#e4e7eb",
}
_COMMITTED = "#1d9a5b"
_TEXT = "#1f2328"
_MUTED = "#656d76"

_MARGIN = 16
_LABEL_W = 120  # row labels, left of the rows
_SIDE_W = 190  # per-row figures, right of the rows
_ROW_H = 30
_STRIP_GAP = 2
_STRIP_H = 5
_ROW_PITCH = _ROW_H + _STRIP_GAP + _STRIP_H + 13
_HEADER_H = 118
_FONT = "DejaVu Sans, Verdana, Arial, sans-serif"


@dataclass(slots=True)
class _Row:
    """One chunk's drawing: run-length encoded column stacks and committed strip."""

    huge: bool
    first: int  # chunk index
    last: int  # the last chunk drawn by this row (rows of identical chunks merge)
    runs: list[tuple[int, int, tuple[int, ...]]]  # (x, width, heights per state)
    strip: list[tuple[int, int, int]]  # (x, width, quarters of the column committed)
    bytes: list[int]  # per state
    free_pieces: int
    uniform: bool  # every column holds a single state


def auto_span(snap: MapSnapshot, width: int = DEFAULT_WIDTH) -> int:
    """The default ``span`` of :func:`render_svg`: the smallest power of two, from
    ``max(width * PAGE_SIZE, HUGE_PAGE_SIZE)`` to 1 GiB, that reaches the last page
    that is not free in any chunk. O(ranges)."""
    need = 0
    for state in _STATES:
        if state is PageState.FREE:
            continue
        for s, e in snap.ranges.get(state, ()):
            if e <= s:
                continue
            if s >> CHUNK_SHIFT != (e - 1) >> CHUNK_SHIFT:
                return CHUNK_SIZE
            need = max(need, e - ((e - 1) >> CHUNK_SHIFT << CHUNK_SHIFT))
    span = max(width * PAGE_SIZE, HUGE_PAGE_SIZE)
    while span < need:
        span *= 2
    return min(span, CHUNK_SIZE)


def render_svg(
    snap: MapSnapshot,
    *,
    width: int = DEFAULT_WIDTH,
    title: str | None = None,
    span: int | None = None,
) -> str:
    """Draw ``snap`` as a standalone SVG document and return its text.

    ``width`` is the number of pixel columns per row (a power of two from 64 to
    8192); ``span`` the bytes of each chunk a row shows, from its start (a power of
    two from ``width`` pages to 1 GiB; ``None``: :func:`auto_span`, the part any
    chunk uses). Pages past ``span`` are left out of the drawing but not of the
    totals. Pure and thread-safe. Cost: O(segments + chunks * width) time;
    the output is O(chunks * width) bytes at worst, whatever the number of
    segments: columns are aggregated per pixel and runs of identical columns
    (and of identical chunks whose columns each hold one state) are drawn once.
    Raises ``ValueError`` for a bad width or span, or a range outside the file.
    """
    if width & (width - 1) or not 64 <= width <= 8192:
        raise ValueError(f"width must be a power of two in [64, 8192], got {width}")
    if span is None:
        span = auto_span(snap, width)
    elif span & (span - 1) or not width * PAGE_SIZE <= span <= CHUNK_SIZE:
        raise ValueError(
            f"span must be a power of two in [{width * PAGE_SIZE:#x}, {CHUNK_SIZE:#x}] "
            f"for width {width}, got {span:#x}"
        )
    n_chunks = len(snap.chunk_huge)
    px_bytes = span // width
    # Per chunk, per state, bytes per pixel column: O(chunks * width) memory; and the
    # bytes past the span, which count in the row's figures but are not drawn.
    cols = [[[0] * width for _ in _STATES] for _ in range(n_chunks)]
    beyond = [[0] * len(_STATES) for _ in range(n_chunks)]
    pieces = [[0] * len(_STATES) for _ in range(n_chunks)]
    for k, state in enumerate(_STATES):
        for fr in snap.ranges.get(state, ()):
            for ci, ls, le in _chunk_local(fr, n_chunks):
                if ls < span:
                    _add_bytes(cols[ci][k], ls, min(le, span), px_bytes)
                beyond[ci][k] += max(0, le - max(ls, span))
                pieces[ci][k] += 1
    committed = [[0] * width for _ in range(n_chunks)]
    for fr in snap.known_committed:
        for ci, ls, le in _chunk_local(fr, n_chunks):
            if ls < span:
                _add_bytes(committed[ci], ls, min(le, span), px_bytes)

    free_k = _STATES.index(PageState.FREE)
    rows: list[_Row] = []
    for ci in range(n_chunks):
        if snap.chunk_huge[ci] and px_bytes < HUGE_PAGE_SIZE:
            _per_huge_page(cols[ci], HUGE_PAGE_SIZE // px_bytes)
        runs, uniform = _column_runs(cols[ci], px_bytes)
        strip = _strip_runs(committed[ci], px_bytes)
        row_bytes = [sum(c) + b for c, b in zip(cols[ci], beyond[ci], strict=True)]
        prev = rows[-1] if rows else None
        if (
            prev is not None
            and uniform
            and prev.uniform
            and prev.huge == snap.chunk_huge[ci]
            and prev.runs == runs
            and prev.strip == strip
        ):
            # Identical plain chunks (typically a run of wholly free or wholly used
            # ones) share one row, which keeps a big file's map short.
            prev.last = ci
            prev.bytes = [a + b for a, b in zip(prev.bytes, row_bytes, strict=True)]
            prev.free_pieces += pieces[ci][free_k]
            continue
        rows.append(
            _Row(snap.chunk_huge[ci], ci, ci, runs, strip, row_bytes, pieces[ci][free_k], uniform)
        )
    return _document(snap, rows, width, title, span)


def _chunk_local(fr: tuple[int, int], n_chunks: int) -> Iterable[tuple[int, int, int]]:
    """``(chunk index, local start, local end)`` for each chunk that ``fr`` touches."""
    s, e = fr
    if not 0 <= s <= e <= n_chunks * CHUNK_SIZE:
        raise ValueError(f"range [{s:#x}, {e:#x}) lies outside the file ({n_chunks} chunks)")
    while s < e:
        ci = s >> CHUNK_SHIFT
        stop = min(e, (ci + 1) << CHUNK_SHIFT)
        base = ci << CHUNK_SHIFT
        yield ci, s - base, stop - base
        s = stop


def _add_bytes(col: list[int], ls: int, le: int, px_bytes: int) -> None:
    """Add the bytes of ``[ls, le)`` to the pixel columns they fall in.

    O(1) per range plus a slice assignment for the columns it covers wholly:
    ranges of one state are disjoint, so such columns held none of it before.
    """
    c0 = ls // px_bytes
    c1 = (le - 1) // px_bytes
    if c0 == c1:
        col[c0] += le - ls
        return
    col[c0] += (c0 + 1) * px_bytes - ls
    col[c1] += le - c1 * px_bytes
    if c1 - c0 > 1:
        col[c0 + 1 : c1] = [px_bytes] * (c1 - c0 - 1)


def _per_huge_page(by_state: list[list[int]], group: int) -> None:
    """Give each of a huge page's ``group`` columns the huge page's average composition.

    In a huge-page chunk the huge page is the unit that matters (and sub-released
    pages are, to gVisor, a count per huge page): drawing it as one stack keeps
    a huge page with a few pages released from looking like two unrelated columns.
    Bytes per column are preserved on average, so row totals stay exact.
    """
    for col in by_state:
        for x in range(0, len(col), group):
            total = sum(col[x : x + group])
            share, extra = divmod(total, group)
            # The remainder goes to the first columns: sums stay exact.
            col[x : x + group] = [share + (i < extra) for i in range(group)]


@lru_cache(maxsize=4096)
def _stack(composition: tuple[int, ...], px_bytes: int) -> tuple[int, ...]:
    """Pixel heights per state for one column: proportional, summing to the row height.

    Every state present gets at least one pixel, so that one stray page in a
    column of a thousand still shows. Largest remainders take the rest.
    """
    present = [k for k, b in enumerate(composition) if b]
    heights = [0] * len(composition)
    if not present:  # a hand-made snapshot need not cover every page
        return tuple(heights)
    if len(present) == 1:
        heights[present[0]] = _ROW_H
        return tuple(heights)
    exact = [b * _ROW_H / px_bytes for b in composition]
    for k in present:
        heights[k] = max(1, int(exact[k]))
    spare = _ROW_H - sum(heights)
    order = sorted(present, key=lambda k: exact[k] - int(exact[k]), reverse=True)
    i = 0
    while spare > 0:
        heights[order[i % len(order)]] += 1
        spare -= 1
        i += 1
    while spare < 0:  # the 1-pixel minimums overshot: take from the tallest
        tallest = max(present, key=lambda k: heights[k])
        heights[tallest] -= 1
        spare += 1
    return tuple(heights)


def _column_runs(
    by_state: list[list[int]], px_bytes: int
) -> tuple[list[tuple[int, int, tuple[int, ...]]], bool]:
    """Run-length encode a chunk's columns by their stacks; also: is every column one state?"""
    runs: list[tuple[int, int, tuple[int, ...]]] = []
    uniform = True
    prev: tuple[int, ...] | None = None
    start = 0
    for x, composition in enumerate(zip(*by_state, strict=True)):
        heights = _stack(composition, px_bytes)
        if heights != prev:
            if prev is not None:
                runs.append((start, x - start, prev))
            prev, start = heights, x
            uniform = uniform and heights.count(0) == len(heights) - 1
    if prev is not None:
        runs.append((start, len(by_state[0]) - start, prev))
    return runs, uniform


def _strip_runs(committed: list[int], px_bytes: int) -> list[tuple[int, int, int]]:
    """Run-length encode the known-committed strip in quarters of a column (0 = none)."""
    runs: list[tuple[int, int, int]] = []
    prev = -1
    start = 0
    for x, b in enumerate(committed):
        # Any committed byte shows (at least a quarter), as states do in the rows.
        q = 0 if b == 0 else max(1, round(4 * b / px_bytes))
        if q != prev:
            if prev > 0:
                runs.append((start, x - start, prev))
            prev, start = q, x
    if prev > 0:
        runs.append((start, len(committed) - start, prev))
    return runs


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units, three significant figures at most ("1.5 MiB")."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            text = f"{v:.0f}" if v >= 100 or v == int(v) else f"{v:.3g}"
            return f"{text} {unit}"
    return f"{n} B"


def _text(x: float, y: float, s: str, size: int = 12, **attrs: str) -> str:
    extra = "".join(f" {k.replace('_', '-')}={quoteattr(v)}" for k, v in attrs.items())
    return f'<text x="{x:g}" y="{y:g}" font-size="{size}"{extra}>{escape(s)}</text>'


def _document(snap: MapSnapshot, rows: list[_Row], width: int, title: str | None, span: int) -> str:
    n_chunks = len(snap.chunk_huge)
    huge_chunks = sum(snap.chunk_huge)
    x0 = _MARGIN + _LABEL_W
    doc_w = x0 + width + _SIDE_W + _MARGIN
    doc_h = _HEADER_H + max(1, len(rows)) * _ROW_PITCH + 40
    totals = snap.totals()
    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{doc_w}" height="{doc_h}" '
        f'viewBox="0 0 {doc_w} {doc_h}" font-family={quoteattr(_FONT)} fill="{_TEXT}">',
        "<defs>"
        # Sub-released pages: hatched, as the pages are gone from a huge page that
        # still holds used (or waste) ones.
        '<pattern id="subreleased" patternUnits="userSpaceOnUse" width="6" height="6">'
        '<rect width="6" height="6" fill="#c3aee6"/>'
        '<path d="M-1,1 l2,-2 M0,6 l6,-6 M5,7 l2,-2" stroke="#6a3fb0" stroke-width="1.6"/>'
        "</pattern>"
        "</defs>",
        f'<rect width="{doc_w}" height="{doc_h}" fill="#ffffff"/>',
        _text(_MARGIN, 26, title or "asyncpgalloc MemoryFile", 17, font_weight="bold"),
        _text(
            _MARGIN,
            46,
            f"{format_bytes(snap.total_size)} in {n_chunks} chunk{'s' * (n_chunks != 1)} of 1 GiB "
            f"({n_chunks - huge_chunks} of small pages, {huge_chunks} of huge pages) · "
            f"one pixel column = {format_bytes(span // width)}"
            + (
                ""
                if span == CHUNK_SIZE
                else f" · rows show the first {format_bytes(span)} of each chunk (the rest is free)"
            ),
            12,
            fill=_MUTED,
        ),
    ]
    # Legend: one swatch per state plus the committed strip, each with its total.
    lx = _MARGIN
    legend: list[tuple[str, str, int, str]] = [
        (s.value, _COLOURS[s], totals[s], s.value) for s in _STATES
    ]
    legend.append(("known-committed", _COMMITTED, snap.known_committed_bytes(), "known committed"))
    for key, colour, n, label in legend:
        out.append(
            f'<g class="legend-item" data-state="{key}" data-bytes="{n}">'
            f'<rect x="{lx}" y="60" width="14" height="14" fill="{colour}" stroke="#8c959f" '
            'stroke-width="0.5"/>'
            + _text(lx + 20, 72, label, 12, font_weight="bold")
            + _text(lx + 20, 88, format_bytes(n), 12, fill=_MUTED)
            + "</g>"
        )
        lx += 20 + max(96, 8 * len(label))
    # Offset ticks above the rows, with faint guides through them.
    rows_top = _HEADER_H
    rows_bottom = rows_top + len(rows) * _ROW_PITCH - 13
    for i in range(5):
        x = x0 + i * width // 4
        label = format_bytes(i * span // 4) if i else "0"
        anchor = "end" if i == 4 else "start" if i == 0 else "middle"
        out.append(_text(x, rows_top - 8, label, 11, fill=_MUTED, text_anchor=anchor))
        out.append(
            f'<line x1="{x}" y1="{rows_top - 4}" x2="{x}" y2="{rows_bottom}" '
            'stroke="#d0d7de" stroke-width="1"/>'
        )
    if not rows:
        out.append(_text(x0, rows_top + 20, "the file has no chunks yet", 13, fill=_MUTED))
    for i, row in enumerate(rows):
        out.append(_draw_row(row, x0, rows_top + i * _ROW_PITCH, width))
    out.append(
        _text(
            _MARGIN,
            doc_h - 14,
            "A column holding several states is a stacked bar in proportion (each state present "
            "gets at least 1 px); in huge-page chunks, per 2 MiB huge page. The strip under a "
            "row: pages known committed (darker = more).",
            11,
            fill=_MUTED,
        )
    )
    out.append("</svg>\n")
    return "\n".join(out)


def _draw_row(row: _Row, x0: int, y: int, width: int) -> str:
    span = f"chunks {row.first}-{row.last}" if row.last > row.first else f"chunk {row.first}"
    lo, hi = row.first * CHUNK_SIZE, (row.last + 1) * CHUNK_SIZE
    kind = "huge" if row.huge else "small"
    tooltip = f"{span} ({kind} pages) [{lo:#x}, {hi:#x}): " + ", ".join(
        f"{s.value} {format_bytes(b)}" for s, b in zip(_STATES, row.bytes, strict=True) if b
    )
    parts = [
        f'<g class="chunk" data-first="{row.first}" data-last="{row.last}" data-kind="{kind}" '
        'shape-rendering="crispEdges">',
        f"<title>{escape(tooltip)}</title>",
        _text(_MARGIN, y + 14, span, 12, font_weight="bold"),
        _text(
            _MARGIN,
            y + 29,
            f"{kind} pages",
            11,
            fill=_MUTED,
        ),
    ]
    # Bars grow upwards from the row's base line, used pages at the bottom.
    base = y + _ROW_H
    for x, w, heights in row.runs:
        top = base
        for k, h in enumerate(heights):
            if h:
                top -= h
                state = _STATES[k]
                parts.append(
                    f'<rect class="{_css(state)}" x="{x0 + x}" y="{top}" width="{w}" '
                    f'height="{h}" fill="{_COLOURS[state]}"/>'
                )
    sy = base + _STRIP_GAP
    parts.append(
        f'<rect class="strip" x="{x0}" y="{sy}" width="{width}" height="{_STRIP_H}" '
        'fill="#f3f4f6"/>'
    )
    for x, w, q in row.strip:
        parts.append(
            f'<rect class="committed" x="{x0 + x}" y="{sy}" width="{w}" height="{_STRIP_H}" '
            f'fill="{_COMMITTED}" fill-opacity="{q / 4:g}"/>'
        )
    parts.append(
        f'<rect x="{x0}" y="{y}" width="{width}" height="{_ROW_H}" fill="none" '
        'stroke="#afb8c1" stroke-width="1"/>'
    )
    total = sum(row.bytes)
    used = row.bytes[_STATES.index(PageState.USED)]
    pct = f"{100 * used / total:.1f}" if 0 < used < total else f"{100 * used // total}"
    sx = x0 + width + 10
    parts.append(_text(sx, y + 14, f"{pct}% used", 12))
    pieces = f"free in {row.free_pieces:,} piece{'s' * (row.free_pieces != 1)}"
    parts.append(_text(sx, y + 29, pieces, 11, fill=_MUTED))
    parts.append("</g>")
    return "".join(parts)


def _css(state: PageState) -> str:
    return "state-" + state.name.lower()


# ------------------------------------------------------------------- writing


def write_svg(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so no reader sees half a map.

    Blocking (a small write and a rename): call it off the loop for big maps.
    """
    directory = os.path.dirname(os.fspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=".svgmap-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def render_map(
    mf: Viewable,
    path: str | os.PathLike[str],
    *,
    width: int = DEFAULT_WIDTH,
    span: int | None = None,
) -> None:
    """Write an SVG map of ``mf`` to ``path``, all on the calling (loop) thread.

    Cost: :func:`snapshot` plus :func:`render_svg` plus a small write (tens to a
    few hundred KB), i.e. O(segments + chunks * width). Measured here: ~5 ms for
    a one-chunk file with a few segments, 0.5-0.6 s for 100k live allocations
    with holes between them; use :func:`render_map_async` for big files on a busy
    loop (it keeps only the snapshot, about half of that, on the loop).
    """
    write_svg(path, render_svg(snapshot(mf), width=width, span=span))


async def render_map_async(
    mf: Viewable,
    path: str | os.PathLike[str],
    *,
    width: int = DEFAULT_WIDTH,
    span: int | None = None,
) -> None:
    """As :func:`render_map`, with only the snapshot (O(segments)) on the loop.

    Rendering and writing run in the loop's default executor; they hold the GIL
    in turns of the interpreter's switch interval, so the loop keeps running.
    """
    snap = snapshot(mf)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(
        None, lambda: write_svg(path, render_svg(snap, width=width, span=span))
    )
