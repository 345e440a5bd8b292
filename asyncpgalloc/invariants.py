"""The invariants of docs/design.md §3, checked over a MemoryFile's whole state (for tests)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from .accounting import MemoryKind
from .checkpoint_scan import zero_ranges_job
from .errors import InvariantError
from .ranges import CHUNK_SIZE, HUGE_PAGE_SIZE, KEY_MAX, PAGES_PER_HUGE_PAGE
from .stats import compute_stats

if TYPE_CHECKING:
    from .memory_file import MemoryFile
    from .segments import SegmentSet

__all__ = ["check_invariants", "check_zero_pages"]


def _fail(mf: MemoryFile, what: str) -> InvariantError:
    return InvariantError(f"{what}\n{mf.dump_segments()}")


def _covered_with(s: SegmentSet[int], start: int, end: int, refs: int) -> bool:
    return s.is_fully_covered(start, end) and all(
        v == refs for _, _, v in s.visit_range(start, end)
    )


def check_invariants(mf: MemoryFile) -> None:
    """Raise InvariantError naming the first broken invariant. O(segments + chunks)."""
    sets: dict[str, SegmentSet[Any]] = {
        "unwaste_small": mf._unwaste_small,
        "unwaste_huge": mf._unwaste_huge,
        "unfree_small": mf._unfree_small,
        "unfree_huge": mf._unfree_huge,
        "mem_acct": mf._mem_acct,
    }
    for name, seg_set in sets.items():
        try:
            seg_set.check_invariants()
        except AssertionError as err:
            raise _fail(mf, f"{name}: {err}") from err

    total = mf.total_size()
    # Beyond the file every page is void: non-free and non-waste in both sizes.
    for u in (mf._unfree_small, mf._unfree_huge):
        if not _covered_with(u, total, KEY_MAX, 0):
            raise _fail(mf, "void pages beyond the file are free or referenced")
    for w in (mf._unwaste_small, mf._unwaste_huge):
        if not w.is_fully_covered(total, KEY_MAX):
            raise _fail(mf, "void pages beyond the file are waste")

    zero_ref_own = 0
    for i, chunk in enumerate(mf._chunks):
        lo, hi = i * CHUNK_SIZE, (i + 1) * CHUNK_SIZE
        own, other = (
            (mf._unfree_huge, mf._unfree_small)
            if chunk.huge
            else (mf._unfree_small, mf._unfree_huge)
        )
        other_waste = mf._unwaste_small if chunk.huge else mf._unwaste_huge
        if not _covered_with(other, lo, hi, 0) or not other_waste.is_fully_covered(lo, hi):
            raise _fail(mf, f"chunk {i} has pages in the other page size's sets")
        zero_ref_own += sum(e - s for s, e, refs in own.visit_range(lo, hi) if refs == 0)
        if any(refs < 0 for _, _, refs in own.visit_range(lo, hi)):
            raise _fail(mf, f"chunk {i} has a negative reference count")

    st = compute_stats(mf)
    # The running totals behind mf.stats() must agree with the recount, field by field.
    running = mf.stats()
    if running != st:
        diffs = ", ".join(
            f"{f.name}: running {getattr(running, f.name)}, recount {getattr(st, f.name)}"
            for f in fields(st)
            if getattr(running, f.name) != getattr(st, f.name)
        )
        raise _fail(mf, f"stats() running totals differ from a recount ({diffs})")
    if zero_ref_own != st.waste_bytes + st.releasing_bytes + st.subreleased_bytes:
        raise _fail(
            mf,
            f"unreferenced non-free pages ({zero_ref_own}) != waste + releasing + sub-released "
            f"({st.waste_bytes} + {st.releasing_bytes} + {st.subreleased_bytes})",
        )
    parts = st.used_bytes + st.waste_bytes + st.releasing_bytes + st.free_bytes
    if parts + st.subreleased_bytes != total:
        raise _fail(mf, f"page states sum to {parts + st.subreleased_bytes}, file has {total}")

    # Waste: unreferenced, not releasing, accounted as SYSTEM waste.
    for w, u in ((mf._unwaste_small, mf._unfree_small), (mf._unwaste_huge, mf._unfree_huge)):
        for s, e in w.gaps(0, total):
            if not _covered_with(u, s, e, 0):
                raise _fail(mf, f"waste [{s:#x}, {e:#x}) is free or referenced")
            if any(r.start < e and s < r.end for r in mf._releasing):
                raise _fail(mf, f"waste [{s:#x}, {e:#x}) overlaps a releasing range")
            if not mf._mem_acct.is_fully_covered(s, e) or any(
                not ma.waste_or_releasing or ma.kind is not MemoryKind.SYSTEM
                for _, _, ma in mf._mem_acct.visit_range(s, e)
            ):
                raise _fail(mf, f"waste [{s:#x}, {e:#x}) is not accounted as SYSTEM waste")
    # Used pages are accounted as used; free pages are not accounted at all.
    for u in (mf._unfree_small, mf._unfree_huge):
        for s, e, refs in u.visit_range(0, total):
            if refs > 0 and (
                not mf._mem_acct.is_fully_covered(s, e)
                or any(ma.waste_or_releasing for _, _, ma in mf._mem_acct.visit_range(s, e))
            ):
                raise _fail(mf, f"used [{s:#x}, {e:#x}) is not accounted as used")
        for s, e in u.gaps(0, total):
            if any(True for _ in mf._mem_acct.visit_range(s, e)):
                raise _fail(mf, f"free [{s:#x}, {e:#x}) has accounting state")
    acct_span = sum(e - s for s, e, _ in mf._mem_acct)
    if acct_span != st.used_bytes + st.waste_bytes + st.releasing_bytes:
        raise _fail(mf, f"accounting spans {acct_span} bytes, not used + waste + releasing")

    for off, n in mf._subreleased.items():
        in_huge_chunk = off < total and mf._chunks[off // CHUNK_SIZE].huge
        if off % HUGE_PAGE_SIZE or not in_huge_chunk or not 0 < n < PAGES_PER_HUGE_PAGE:
            raise _fail(mf, f"bad sub-release entry {off:#x}: {n}")

    committed: defaultdict[tuple[int, MemoryKind], int] = defaultdict(int)
    for s, e, ma in mf._mem_acct:
        if ma.known_committed:
            if ma.commit_seq != 0:
                raise _fail(mf, f"known-committed [{s:#x}, {e:#x}) has commit_seq {ma.commit_seq}")
            committed[(ma.memcg_id, ma.kind)] += e - s
    if sum(committed.values()) != mf._known_committed_bytes:
        raise _fail(mf, f"known_committed_bytes {mf._known_committed_bytes} != segment span")
    if mf._opts.accounting is None and not mf._opts.disable_memory_accounting:
        acct = mf._accounting
        for memcg_id in {m for m, _ in committed} | set(acct.memcg_ids()):
            want = {k: n for (m, k), n in committed.items() if m == memcg_id}
            if acct.by_memcg(memcg_id) != want:
                raise _fail(
                    mf, f"accounting of memcg {memcg_id}: {acct.by_memcg(memcg_id)} != {want}"
                )

    if (st.waste_bytes or st.releasing_bytes) and mf._released.is_set():
        raise _fail(mf, "wait_released() would return with waste or releasing pages left")
    if st.waste_bytes and not mf._have_waste:
        raise _fail(mf, "waste exists but the releaser was not woken")


def check_zero_pages(mf: MemoryFile, promised: list[tuple[int, int]]) -> None:
    """Raise InvariantError if a page of ``promised`` (sorted, merged page ranges that
    the allocator promises read zero) does not. **Blocking**: holes are skipped with
    SEEK_DATA/SEEK_HOLE, data is read with ``pread`` into a 1 MiB buffer."""
    zeros = zero_ranges_job(mf.fd, promised)
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
            raise _fail(mf, f"page {pos:#x} is free or sub-released but does not read zero")
    raise _fail(mf, f"zero-page check: zero ranges {zeros} do not match {promised}")
