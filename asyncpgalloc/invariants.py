"""The invariants of docs/design.md §3, checked over the page-state core (for tests).

Everything here reads a :class:`~asyncpgalloc.pages.PageView` (the core's sets,
dead allocations settled) and changes nothing; ``check_zero_pages`` also reads the
file (blocking).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from .accounting import MemoryAccounting, MemoryKind
from .checkpoint_scan import zero_ranges_job
from .core import PageView, count_states
from .errors import InvariantError
from .ranges import CHUNK_SIZE, HUGE_PAGE_SIZE, KEY_MAX, PAGES_PER_HUGE_PAGE
from .stats import MemoryFileStats

if TYPE_CHECKING:
    from .segments import SegmentSet

__all__ = ["check_invariants", "check_pending_load", "check_zero_pages", "zero_promised"]


def _covered_with(s: SegmentSet[int], start: int, end: int, refs: int) -> bool:
    return s.is_fully_covered(start, end) and all(
        v == refs for _, _, v in s.visit_range(start, end)
    )


def check_invariants(
    view: PageView, running: MemoryFileStats, accounting: MemoryAccounting | None
) -> None:
    """Raise InvariantError naming the first broken invariant. O(segments + chunks).

    ``running`` is the core's O(1) stats (running totals), compared field by field to
    a recount; ``accounting``, if given, must hold exactly the known-committed bytes
    of ``view`` (pass it only when no other file reports into it)."""
    sets: dict[str, SegmentSet[Any]] = {
        "unwaste_small": view.unwaste_small,
        "unwaste_huge": view.unwaste_huge,
        "unfree_small": view.unfree_small,
        "unfree_huge": view.unfree_huge,
        "mem_acct": view.mem_acct,
    }
    for name, seg_set in sets.items():
        try:
            seg_set.check_invariants()
        except AssertionError as err:
            raise InvariantError(f"{name}: {err}") from err

    total = view.total_size
    mem_acct = view.mem_acct
    # Beyond the file every page is void: non-free and non-waste in both sizes.
    for u in (view.unfree_small, view.unfree_huge):
        if not _covered_with(u, total, KEY_MAX, 0):
            raise InvariantError("void pages beyond the file are free or referenced")
    for w in (view.unwaste_small, view.unwaste_huge):
        if not w.is_fully_covered(total, KEY_MAX):
            raise InvariantError("void pages beyond the file are waste")

    zero_ref_own = 0
    for i, huge in enumerate(view.chunk_huge):
        lo, hi = i * CHUNK_SIZE, (i + 1) * CHUNK_SIZE
        own, other = view.unfree(huge), view.unfree(not huge)
        other_waste = view.unwaste(not huge)
        if not _covered_with(other, lo, hi, 0) or not other_waste.is_fully_covered(lo, hi):
            raise InvariantError(f"chunk {i} has pages in the other page size's sets")
        zero_ref_own += sum(e - s for s, e, refs in own.visit_range(lo, hi) if refs == 0)
        if any(refs < 0 for _, _, refs in own.visit_range(lo, hi)):
            raise InvariantError(f"chunk {i} has a negative reference count")

    st = count_states(view)
    # The running totals behind stats() must agree with the recount, field by field.
    if running != st:
        diffs = ", ".join(
            f"{f.name}: running {getattr(running, f.name)}, recount {getattr(st, f.name)}"
            for f in fields(st)
            if getattr(running, f.name) != getattr(st, f.name)
        )
        raise InvariantError(f"stats() running totals differ from a recount ({diffs})")
    if zero_ref_own != st.waste_bytes + st.releasing_bytes + st.subreleased_bytes:
        raise InvariantError(
            f"unreferenced non-free pages ({zero_ref_own}) != waste + releasing + sub-released "
            f"({st.waste_bytes} + {st.releasing_bytes} + {st.subreleased_bytes})",
        )
    parts = st.used_bytes + st.waste_bytes + st.releasing_bytes + st.free_bytes
    if parts + st.subreleased_bytes != total:
        raise InvariantError(f"page states sum to {parts + st.subreleased_bytes}, file has {total}")

    # Waste: unreferenced, not releasing, accounted as SYSTEM waste.
    for huge in (False, True):
        w, u = view.unwaste(huge), view.unfree(huge)
        for s, e in w.gaps(0, total):
            if not _covered_with(u, s, e, 0):
                raise InvariantError(f"waste [{s:#x}, {e:#x}) is free or referenced")
            if any(r.start < e and s < r.end for r in view.releasing):
                raise InvariantError(f"waste [{s:#x}, {e:#x}) overlaps a releasing range")
            if not mem_acct.is_fully_covered(s, e) or any(
                not ma.waste_or_releasing or ma.kind is not MemoryKind.SYSTEM
                for _, _, ma in mem_acct.visit_range(s, e)
            ):
                raise InvariantError(f"waste [{s:#x}, {e:#x}) is not accounted as SYSTEM waste")
    # Used pages are accounted as used; free pages are not accounted at all.
    for u in (view.unfree_small, view.unfree_huge):
        for s, e, refs in u.visit_range(0, total):
            if refs > 0 and (
                not mem_acct.is_fully_covered(s, e)
                or any(ma.waste_or_releasing for _, _, ma in mem_acct.visit_range(s, e))
            ):
                raise InvariantError(f"used [{s:#x}, {e:#x}) is not accounted as used")
        for s, e in u.gaps(0, total):
            if any(True for _ in mem_acct.visit_range(s, e)):
                raise InvariantError(f"free [{s:#x}, {e:#x}) has accounting state")
    acct_span = sum(e - s for s, e, _ in mem_acct)
    if acct_span != st.used_bytes + st.waste_bytes + st.releasing_bytes:
        raise InvariantError(f"accounting spans {acct_span} bytes, not used + waste + releasing")

    for off, n in view.subreleased.items():
        in_huge_chunk = off < total and view.chunk_huge[off // CHUNK_SIZE]
        if off % HUGE_PAGE_SIZE or not in_huge_chunk or not 0 < n < PAGES_PER_HUGE_PAGE:
            raise InvariantError(f"bad sub-release entry {off:#x}: {n}")

    committed: defaultdict[tuple[int, MemoryKind], int] = defaultdict(int)
    for s, e, ma in mem_acct:
        if ma.known_committed:
            if ma.commit_seq != 0:
                raise InvariantError(
                    f"known-committed [{s:#x}, {e:#x}) has commit_seq {ma.commit_seq}"
                )
            committed[(ma.memcg_id, ma.kind)] += e - s
    if sum(committed.values()) != view.known_committed_bytes:
        raise InvariantError(f"known_committed_bytes {view.known_committed_bytes} != segment span")
    if accounting is not None:
        for memcg_id in {m for m, _ in committed} | set(accounting.memcg_ids()):
            want = {k: n for (m, k), n in committed.items() if m == memcg_id}
            if accounting.by_memcg(memcg_id) != want:
                raise InvariantError(
                    f"accounting of memcg {memcg_id}: {accounting.by_memcg(memcg_id)} != {want}"
                )


def check_pending_load(view: PageView, pending: list[tuple[int, int]]) -> None:
    """Pages still to load (``pending``) are used (referenced) and known-committed: a
    page that became waste was dropped from the load, and none is decommitted while
    pending. O(segments in ``pending``)."""
    for s, e in pending:
        lo = s
        while lo < e:
            huge = view.chunk_huge[lo // CHUNK_SIZE]
            hi = min(e, (lo // CHUNK_SIZE + 1) * CHUNK_SIZE)
            unfree = view.unfree(huge)
            if not unfree.is_fully_covered(lo, hi) or any(
                refs <= 0 for _, _, refs in unfree.visit_range(lo, hi)
            ):
                raise InvariantError(f"pages [{lo:#x}, {hi:#x}) to load hold no reference")
            lo = hi
        for ms, me, ma in view.mem_acct.visit_range(s, e):
            if not ma.known_committed or ma.waste_or_releasing:
                raise InvariantError(
                    f"pages [{ms:#x}, {me:#x}) to load are not known-committed used pages"
                )


def zero_promised(view: PageView) -> list[tuple[int, int]]:
    """The page ranges that must read zero, merged and sorted: free pages (the gaps
    of each chunk's own unfree set) and sub-released ones (unreferenced pages of
    huge chunks with no accounting state). O(segments)."""
    out: list[tuple[int, int]] = []

    def add(s: int, e: int) -> None:
        if out and out[-1][1] >= s:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))

    mem_acct = view.mem_acct
    for i, huge in enumerate(view.chunk_huge):
        lo, hi = i * CHUNK_SIZE, (i + 1) * CHUNK_SIZE
        unfree = view.unfree(huge)
        pieces = list(unfree.gaps(lo, hi))
        if huge:
            for s, e, refs in unfree.visit_range(lo, hi):
                if refs:
                    continue
                for ms, me, _ in mem_acct.visit_range(s, e):
                    if s < ms:
                        pieces.append((s, ms))
                    s = max(s, me)
                if s < e:
                    pieces.append((s, e))
        for s, e in sorted(pieces):
            add(max(s, lo), min(e, hi))
    return out


def check_zero_pages(fd: int, promised: list[tuple[int, int]]) -> None:
    """Raise InvariantError if a page of ``promised`` (sorted, merged page ranges that
    the allocator promises read zero) does not. **Blocking**: holes are skipped with
    SEEK_DATA/SEEK_HOLE, data is read with ``pread`` into a 1 MiB buffer."""
    zeros = zero_ranges_job(fd, promised)
    if zeros == promised:
        return
    # The first promised page not found zero.
    at = 0
    for s, e in promised:
        while at < len(zeros) and zeros[at][1] <= s:
            at += 1
        pos = s
        while at < len(zeros) and zeros[at][0] <= pos < e:
            pos = zeros[at][1]
            at += 1
        if pos < e:
            raise InvariantError(f"page {pos:#x} is free or sub-released but does not read zero")
    raise InvariantError(f"zero-page check: zero ranges {zeros} do not match {promised}")
