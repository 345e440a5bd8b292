"""A hypothesis state machine: a real MemoryFile (real memfd) against a page-level model.

Every rule performs one operation on both the file and a deliberately simple model
(per page: reference count, expected content, ever written), and after every step
the invariant checks that ``mf.check_invariants(check_zero_pages=True)`` is clean
(every free and sub-released page reads zero), that the file's
per-page reference counts equal the model's exactly, and that ``mf.stats()`` agrees
with the model. Rules cover allocation (every mode, both directions, small and huge,
an occasional 300 MiB-plus allocation that grows the file and spans chunks, until the
4-chunk limit makes it run out of memory), references on whole allocations and on
page-aligned sub-ranges (across neighbouring allocations and chunk boundaries),
``has_unique_ref``, invalid calls that must change nothing, writes through
``map_internal``, and single releaser steps / ``wait_released()``.

Security: every byte of every newly allocated range must read as zero whatever the
pages' history, and referenced pages must keep what was written into them (a
releaser punching a used page, or a page handed out twice, is caught).

hypothesis has no async rules: each machine owns an ``asyncio.Runner`` (the default
loop or uvloop) and runs coroutines with ``runner.run(...)``. Between two rules the
loop is stopped, so a punch started in the executor may finish while a later rule's
synchronous calls run: that interleaving is part of what is tested.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable, Iterator
from typing import ClassVar

import pytest
import uvloop
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from asyncpgalloc import (
    CHUNK_SIZE,
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    AccessType,
    AllocationMode,
    AllocOpts,
    Direction,
    FileRange,
    InvalidLengthError,
    InvalidRangeError,
    MemoryFile,
    MemoryFileOpts,
    MemoryFileStats,
    MemoryKind,
    OutOfMemoryError,
    ReferenceCountError,
)

P = PAGE_SIZE
H = HUGE_PAGE_SIZE
C = CHUNK_SIZE
MiB = 1 << 20
MAX_CHUNKS = 4
FILE_OPTS = MemoryFileOpts(expect_hugepages=True, max_chunks=MAX_CHUNKS)
# Large allocations: UNCOMMITTED, multiples of 2 MiB so that they may be huge too.
LARGE_LENGTHS = (300 * MiB, 700 * MiB, C + H)
# Zero checks and content checks read at most this much at once.
READ_CHUNK = 1 * MiB
LARGE_SAMPLE_PAGES = 16
REF_OPS = ("inc_ref", "dec_ref", "has_unique_ref")

modes = st.sampled_from(list(AllocationMode))
directions = st.sampled_from(list(Direction))
kinds = st.sampled_from(list(MemoryKind))
memcg_ids = st.integers(0, 2)
ref_ops = st.sampled_from(REF_OPS)

Snapshot = tuple[str, MemoryFileStats]


class PageMap:
    """A value per page number, stored as sorted, disjoint, maximal runs ``(start, end, value)``.

    Absent pages have no value (``None``). Every update rebuilds the run list from
    scratch: slow, but too simple to be wrong.
    """

    def __init__(self) -> None:
        self.runs: list[tuple[int, int, int]] = []

    def update(self, start: int, end: int, fn: Callable[[int | None], int | None]) -> None:
        """Replace the value ``v`` of every page in ``[start, end)`` by ``fn(v)``."""
        assert start < end
        out: list[tuple[int, int, int | None]] = []
        pos = start
        for s, e, v in self.runs:
            if e <= start or s >= end:
                out.append((s, e, v))
                continue
            if s < start:
                out.append((s, start, v))
            lo, hi = max(s, start), min(e, end)
            if pos < lo:
                out.append((pos, lo, fn(None)))
            out.append((lo, hi, fn(v)))
            pos = hi
            if e > end:
                out.append((end, e, v))
        if pos < end:
            out.append((pos, end, fn(None)))
        runs: list[tuple[int, int, int]] = []
        for s, e, nv in sorted((s, e, v) for s, e, v in out if v is not None):
            if runs and runs[-1][1] == s and runs[-1][2] == nv:
                runs[-1] = (runs[-1][0], e, nv)
            else:
                runs.append((s, e, nv))
        self.runs = runs

    def assign(self, start: int, end: int, value: int | None) -> None:
        self.update(start, end, lambda _: value)

    def clipped(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        for s, e, v in self.runs:
            if s < end and start < e:
                yield max(s, start), min(e, end), v

    def covers(self, start: int, end: int) -> bool:
        """True if every page of ``[start, end)`` has a value."""
        return sum(e - s for s, e, _ in self.clipped(start, end)) == end - start

    def touches(self, start: int, end: int) -> bool:
        return next(self.clipped(start, end), None) is not None

    def count(self) -> int:
        return sum(e - s for s, e, _ in self.runs)

    def spans(self) -> list[tuple[int, int]]:
        """Maximal runs of pages that have a value, whatever it is."""
        spans: list[tuple[int, int]] = []
        for s, e, _ in self.runs:
            if spans and spans[-1][1] == s:
                spans[-1] = (spans[-1][0], e)
            else:
                spans.append((s, e))
        return spans


def _pages(fr: FileRange) -> tuple[int, int]:
    return fr.start // P, fr.end // P


def _chunk_pieces(start: int, end: int) -> Iterator[tuple[int, int]]:
    """Split the byte range ``[start, end)`` at chunk boundaries."""
    while start < end:
        stop = min(end, (start // C + 1) * C)
        yield start, stop
        start = stop


def _dec(v: int | None) -> int | None:
    assert v is not None and v > 0
    return v - 1 if v > 1 else None


def _inc(v: int | None) -> int | None:
    assert v is not None and v > 0
    return v + 1


class MemoryFileMachine(RuleBasedStateMachine):
    """Drives one MemoryFile and the model with the same operations."""

    use_uvloop: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner(
            loop_factory=uvloop.new_event_loop if self.use_uvloop else None
        )
        try:
            self.mf: MemoryFile = self.runner.run(self._open())
        except BaseException:
            self.runner.close()
            raise
        # Page number -> reference count, for referenced pages only.
        self.refs = PageMap()
        # Page number -> the byte every byte of a referenced page must hold (when known).
        self.content = PageMap()
        # Pages that were ever written non-zero (value 1): a new allocation over
        # them must read zero.
        self.written = PageMap()
        # Ranges handed out by allocate(), for whole-allocation reference operations.
        self.allocs: list[FileRange] = []
        self.tag = 0
        self.max_total_size = 0

    @staticmethod
    async def _open() -> MemoryFile:
        return await MemoryFile.open(opts=FILE_OPTS)

    def teardown(self) -> None:
        try:
            self.runner.run(self.mf.aclose())
        finally:
            self.runner.close()

    # ------------------------------------------------------------------ helpers

    def _next_tag(self) -> int:
        self.tag = self.tag % 255 + 1
        return self.tag

    def _snapshot(self) -> Snapshot:
        return str(self.mf), self.mf.stats()

    def _assert_unchanged(self, before: Snapshot, what: str) -> None:
        after = self._snapshot()
        assert after[1] == before[1], f"{what} changed the stats: {before[1]} -> {after[1]}"
        assert after[0] == before[0], f"{what} changed the page sets"

    def _check_bytes(self, start: int, end: int, byte: int, what: str) -> None:
        """Every byte of ``[start, end)`` (page-aligned) reads as ``byte``.

        Read with ``pread``, not ``map_internal``: an eviction running during an await
        of the rule may already have dropped the range's references (and map_internal
        refuses unreferenced pages), and ``pread`` of a hole commits nothing.
        """
        for i in range(0, end - start, READ_CHUNK):
            piece = os.pread(self.mf.fd, min(READ_CHUNK, end - start - i), start + i)
            if piece.count(byte) == len(piece):
                continue
            for j in range(0, len(piece), P):
                page = piece[j : j + P]
                if page.count(byte) != P:
                    bad = next(b for b in page if b != byte)
                    raise AssertionError(
                        f"{what}: page at {start + i + j:#x} holds {bad:#04x}, "
                        f"expected every byte {byte:#04x}"
                    )

    def _fill(self, start: int, end: int, byte: int) -> None:
        """Write ``byte`` over the page-aligned byte range ``[start, end)``; record it."""
        for (s, e), view in zip(
            _chunk_pieces(start, end),
            self.mf.map_internal(FileRange(start, end), AccessType.WRITE),
            strict=True,
        ):
            assert len(view) == e - s
            for i in range(0, len(view), READ_CHUNK):
                n = min(READ_CHUNK, len(view) - i)
                view[i : i + n] = bytes([byte]) * n
        self.content.assign(start // P, end // P, byte)
        self.written.assign(start // P, end // P, 1)

    def _ref_spans(self) -> list[tuple[int, int]]:
        return self.refs.spans()

    def _whole_allocs(self) -> list[FileRange]:
        return [fr for fr in self.allocs if self.refs.covers(*_pages(fr))]

    def _releasing_pages(self) -> list[tuple[FileRange, list[tuple[int, int]]]]:
        """Each releasing range with its pages not yet released (a small range is
        finished in parts: its finished part is free already)."""
        mf = self.mf
        out = []
        view = mf.page_view()
        for r in view.releasing:
            unfree = view.unfree(view.chunk_huge[r.start // C])
            out.append((r, [(s, e) for s, e, _ in unfree.visit_range(r.start, r.end)]))
        return out

    def _waste(self) -> list[tuple[int, int]]:
        """The file's waste ranges (gaps in the unwaste sets), read from its internals."""
        mf = self.mf
        total = mf.total_size()
        if not total:
            return []
        view = mf.page_view()
        return [g for w in (view.unwaste_small, view.unwaste_huge) for g in w.gaps(0, total)]

    def _draw_referenced_range(
        self, data: st.DataObject, max_pages: int | None = None
    ) -> FileRange:
        """A page-aligned range of referenced pages.

        A maximal run of referenced pages may cover neighbouring allocations and
        chunk boundaries; half of the time the range is drawn around a chunk
        boundary inside a run, when there is one.
        """
        spans = self._ref_spans()
        cp = C // P
        boundaries = [
            (s, e, c * cp) for s, e in spans for c in range(s // cp + 1, (e - 1) // cp + 1)
        ]
        near = bool(boundaries) and data.draw(st.booleans(), label="around a chunk boundary")
        if near:
            s, e, b = data.draw(st.sampled_from(boundaries), label="run and boundary")
            first = data.draw(st.integers(max(s, b - 3), b - 1), label="first page")
            end = data.draw(st.integers(b + 1, min(e, b + 3)), label="end page")
        else:
            s, e = data.draw(st.sampled_from(spans), label="referenced run")
            first = data.draw(st.integers(s, e - 1), label="first page")
            end = data.draw(st.integers(first + 1, e), label="end page")
        if max_pages is not None:
            end = min(end, first + max_pages)
        return FileRange(first * P, end * P)

    def _events_for_range(self, what: str, fr: FileRange) -> None:
        first, last = fr.start // C, (fr.end - 1) // C
        if first != last:
            event(f"{what}: range crosses a chunk boundary")
            if len({self.mf.page_view().chunk_huge[i] for i in range(first, last + 1)}) > 1:
                event(f"{what}: range spans small and huge chunks")
        if sum(1 for a in self.allocs if a.start < fr.end and fr.start < a.end) > 1:
            event(f"{what}: range spans several allocations")

    # --------------------------------------------------------------- allocation

    def _allocate(self, length: int, opts: AllocOpts, large: bool) -> None:
        mf = self.mf
        before = self._snapshot()
        chunks_before = len(mf.page_view().chunk_huge)
        waste_before = self._waste()
        releasing_before = self._releasing_pages()
        try:
            fr = mf.allocate(length, opts)
        except OutOfMemoryError:
            event("allocate: out of memory")
            self._assert_unchanged(before, "an allocation that ran out of memory")
            assert chunks_before + -(-length // C) > MAX_CHUNKS, (
                f"out of memory for {length:#x} bytes with only {chunks_before} chunks"
            )
            return
        event(f"allocate: {opts.mode.name} huge={opts.huge} large={large}")
        if len(mf.page_view().chunk_huge) > chunks_before:
            event("allocate: the file grew")
        if fr.start // C != (fr.end - 1) // C:
            event("allocate: range crosses a chunk boundary")
        assert fr.length == length and fr.start % P == 0, f"allocate({length:#x}) -> {fr}"
        assert fr.start >= 0 and fr.end <= mf.total_size(), f"{fr} is outside the file"
        recycled = any(s < fr.end and fr.start < e for s, e in waste_before)
        if recycled:
            event("allocate: recycled waste")
        if opts.huge and not recycled:
            # Free huge pages are whole huge pages. Recycled waste need not be
            # huge-aligned: gVisor takes the waste gap's end (TOP_DOWN) or start
            # as is, so neither does the port.
            assert fr.start % H == 0, f"huge allocation {fr} is not huge-aligned"
        chunk_huge = mf.page_view().chunk_huge
        for i in range(fr.start // C, (fr.end - 1) // C + 1):
            assert chunk_huge[i] == opts.huge, f"{fr} (huge={opts.huge}) uses chunk {i}"
        # A release step that finished meanwhile (allocate_async runs the loop) freed
        # its pages, which may then be taken: only steps still releasing must not be.
        still = set(mf.page_view().releasing)
        for r, pieces in releasing_before:
            for s, e in pieces if r in still else ():
                overlap = s < fr.end and fr.start < e
                assert not overlap, f"{fr} overlaps releasing [{s:#x}, {e:#x})"
        if opts.mode is AllocationMode.UNCOMMITTED:
            for s, e in waste_before:
                assert not (s < fr.end and fr.start < e), (
                    f"UNCOMMITTED allocation {fr} recycles waste [{s:#x}, {e:#x})"
                )
        ps, pe = _pages(fr)
        assert not self.refs.touches(ps, pe), f"{fr} overlaps pages that hold references"

        # Security: every byte handed out reads as zero, whatever the pages' history.
        tag = self._next_tag()
        if not large:
            self._check_bytes(fr.start, fr.end, 0, f"new allocation {fr}")
            self._fill(fr.start, fr.end, tag)
        else:
            rng = random.Random(fr.start * 31 + length)
            sample = {ps, pe - 1}
            sample.update(rng.randrange(ps, pe) for _ in range(LARGE_SAMPLE_PAGES))
            sample.update(
                p
                for c in range(fr.start // C + 1, fr.end // C + 1)
                for p in (c * C // P - 1, c * C // P)
                if ps <= p < pe
            )
            for s, e, _ in list(self.written.clipped(ps, pe)):
                self._check_bytes(s * P, e * P, 0, f"new allocation {fr} (written before)")
            for p in sorted(sample):
                self._check_bytes(p * P, (p + 1) * P, 0, f"new allocation {fr} (sample)")
            for p in sorted(sample):
                self._fill(p * P, (p + 1) * P, tag)
        self.refs.assign(ps, pe, 1)
        self.allocs.append(fr)

    @initialize(layout=st.sampled_from(["empty", "small then huge", "huge then small"]))
    def start_layout(self, layout: str) -> None:
        """Optionally start with a small and a huge chunk whose common edge is referenced.

        Reference ranges across such an edge exercise the per-page-size pieces of
        inc_ref/dec_ref/has_unique_ref (docs/design.md §5: gVisor's HasUniqueRef slip).
        """
        small_top = AllocOpts(direction=Direction.TOP_DOWN)
        huge_top = AllocOpts(huge=True, direction=Direction.TOP_DOWN)
        if layout == "small then huge":
            self._allocate(4 * P, small_top, large=False)
            self._allocate(H, AllocOpts(huge=True), large=False)
        elif layout == "huge then small":
            self._allocate(H, huge_top, large=False)
            self._allocate(4 * P, AllocOpts(), large=False)

    @rule(pages=st.integers(1, 64), mode=modes, direction=directions, kind=kinds, memcg=memcg_ids)
    def allocate_small(
        self, pages: int, mode: AllocationMode, direction: Direction, kind: MemoryKind, memcg: int
    ) -> None:
        opts = AllocOpts(kind=kind, memcg_id=memcg, mode=mode, huge=False, direction=direction)
        self._allocate(pages * P, opts, large=False)

    @rule(hpages=st.integers(1, 3), mode=modes, direction=directions, kind=kinds, memcg=memcg_ids)
    def allocate_huge(
        self, hpages: int, mode: AllocationMode, direction: Direction, kind: MemoryKind, memcg: int
    ) -> None:
        opts = AllocOpts(kind=kind, memcg_id=memcg, mode=mode, huge=True, direction=direction)
        self._allocate(hpages * H, opts, large=False)

    @rule(length=st.sampled_from(LARGE_LENGTHS), huge=st.booleans(), direction=directions)
    def allocate_large(self, length: int, huge: bool, direction: Direction) -> None:
        opts = AllocOpts(mode=AllocationMode.UNCOMMITTED, huge=huge, direction=direction)
        self._allocate(length, opts, large=True)

    # --------------------------------------------------------------- references

    def _ref_op(self, op: str, fr: FileRange) -> None:
        """A reference operation the model says is valid; apply it to both."""
        mf = self.mf
        ps, pe = _pages(fr)
        assert self.refs.covers(ps, pe)
        event(f"{op}: valid")
        self._events_for_range(op, fr)
        if op == "inc_ref":
            mf.inc_ref(fr)
            self.refs.update(ps, pe, _inc)
        elif op == "dec_ref":
            mf.dec_ref(fr)
            self.refs.update(ps, pe, _dec)
            # Pages left without references no longer have content to keep.
            kept = list(self.content.clipped(ps, pe))
            self.content.assign(ps, pe, None)
            for s, e, byte in kept:
                for rs, re_, _ in self.refs.clipped(s, e):
                    self.content.assign(rs, re_, byte)
            self.allocs = [a for a in self.allocs if self.refs.touches(*_pages(a))]
        else:
            before = self._snapshot()
            want = all(v == 1 for _, _, v in self.refs.clipped(ps, pe))
            assert mf.has_unique_ref(fr) is want, f"has_unique_ref({fr}) != {want}"
            event(f"has_unique_ref: {want}")
            self._assert_unchanged(before, "has_unique_ref")

    @precondition(lambda self: bool(self._whole_allocs()))
    @rule(data=st.data(), op=ref_ops)
    def ref_op_on_allocation(self, data: st.DataObject, op: str) -> None:
        fr = data.draw(st.sampled_from(self._whole_allocs()), label="allocation")
        self._ref_op(op, fr)

    @precondition(lambda self: bool(self.refs.runs))
    @rule(data=st.data(), op=ref_ops)
    def ref_op_on_sub_range(self, data: st.DataObject, op: str) -> None:
        self._ref_op(op, self._draw_referenced_range(data))

    @rule(data=st.data(), op=ref_ops)
    def ref_op_on_any_range(self, data: st.DataObject, op: str) -> None:
        """Any range, mostly invalid: the model predicts the error, which must change nothing."""
        mf = self.mf
        total = mf.total_size()
        spans = self._ref_spans()
        hows = ["pages", "bytes", "empty", "reversed"] + (["straddle"] if spans else [])
        how = data.draw(st.sampled_from(hows), label="how")
        if how == "pages":
            # Page-aligned, mostly inside the file: mostly unreferenced pages.
            start = data.draw(st.integers(-1, total // P), label="start page") * P
            end = start + data.draw(st.integers(1, 64), label="pages") * P
        elif how == "reversed":
            end = data.draw(st.integers(0, total // P), label="end page") * P
            start = end + data.draw(st.integers(1, 4), label="pages") * P
        elif how == "bytes":
            start = data.draw(st.integers(-P, total + P), label="start")
            end = data.draw(st.integers(-P, total + 2 * P), label="end")
        elif how == "straddle":
            # From inside a referenced run to beyond its end (or before its start).
            s, e = data.draw(st.sampled_from(spans), label="referenced run")
            if data.draw(st.booleans(), label="past the end"):
                start = data.draw(st.integers(s, e - 1), label="start page") * P
                end = data.draw(st.integers(e + 1, e + 3), label="end page") * P
            else:
                first = data.draw(st.integers(max(0, s - 3), max(0, s - 1)), label="start page")
                start = first * P
                end = data.draw(st.integers(s + 1, e), label="end page") * P
        else:
            start = end = data.draw(st.integers(0, total // P), label="page") * P
        fr = FileRange(start, end)
        expected: type[Exception] | None
        if not (0 <= start < end <= total) or start % P or end % P:
            expected = InvalidRangeError
        elif not self.refs.covers(start // P, end // P):
            expected = ReferenceCountError
        else:
            expected = None
        if expected is None:
            event(f"{op} on any range: valid")
            self._ref_op(op, fr)
            return
        event(f"{op} on any range: {expected.__name__}")
        before = self._snapshot()
        with pytest.raises(expected):
            getattr(mf, op)(fr)
        self._assert_unchanged(before, f"a failed {op}({fr})")

    @rule(
        length=st.one_of(
            st.sampled_from([0, -P, -H, 1, P - 1, P + 1, H - P, H + P, C + 1]),
            st.integers(-4 * H, 4 * H),
        ),
        huge=st.booleans(),
        mode=modes,
    )
    def allocate_bad_length(self, length: int, huge: bool, mode: AllocationMode) -> None:
        if not (length <= 0 or length % P or (huge and length % H)):
            # A valid length after all: nothing to test here.
            return
        before = self._snapshot()
        with pytest.raises(InvalidLengthError):
            self.mf.allocate(length, AllocOpts(mode=mode, huge=huge))
        self._assert_unchanged(before, f"allocate({length:#x}, huge={huge})")

    # ---------------------------------------------------------------- contents

    @precondition(lambda self: bool(self.refs.runs))
    @rule(data=st.data())
    def write_pattern(self, data: st.DataObject) -> None:
        fr = self._draw_referenced_range(data, max_pages=2 * H // P)
        self._fill(fr.start, fr.end, self._next_tag())

    @rule()
    def verify_contents(self) -> None:
        """Referenced pages still hold what was last written into them."""
        for s, e, byte in self.content.runs:
            assert self.refs.covers(s, e)
            self._check_bytes(s * P, e * P, byte, "referenced pages")

    # ------------------------------------------------------------------ release

    @rule(turns=st.integers(1, 3))
    def releaser_step(self, turns: int) -> None:
        for _ in range(turns):
            self.runner.run(asyncio.sleep(0))

    @rule()
    def wait_released(self) -> None:
        self.runner.run(self.mf.wait_released())
        st_ = self.mf.stats()
        assert st_.waste_bytes == 0 and st_.releasing_bytes == 0, st_
        assert st_.free_bytes + st_.subreleased_bytes == st_.total_size - st_.used_bytes, st_
        self.verify_contents()

    @precondition(lambda self: bool(self.refs.runs))
    @rule()
    def release_everything(self) -> None:
        """Drop every reference; once released the whole file must be free again."""
        for s, e, refs in list(self.refs.runs):
            for _ in range(refs):
                self.mf.dec_ref(FileRange(s * P, e * P))
        self.refs = PageMap()
        self.content = PageMap()
        self.allocs = []
        self.runner.run(self.mf.wait_released())
        st_ = self.mf.stats()
        assert st_.used_bytes == st_.waste_bytes == st_.releasing_bytes == 0, st_
        assert st_.subreleased_bytes == 0, f"sub-released pages lost for good: {st_}"
        assert st_.free_bytes == st_.total_size, st_

    # --------------------------------------------------------------- invariant

    @invariant()
    def model_agrees(self) -> None:
        mf = self.mf
        # The zero-page promise too: every free and sub-released page reads zero
        # (pread over SEEK_DATA extents only, so it costs little on this sparse file).
        mf.check_invariants(check_zero_pages=True)
        st_ = mf.stats()
        total = mf.total_size()
        view = mf.page_view()
        chunks = view.chunk_huge
        assert st_.total_size == total == len(chunks) * C == os.fstat(mf.fd).st_size
        assert st_.small_chunks + st_.huge_chunks == len(chunks) <= MAX_CHUNKS
        assert st_.huge_chunks == sum(1 for huge in chunks if huge)
        assert total >= self.max_total_size, "the file shrank"
        self.max_total_size = total
        assert st_.used_bytes == self.refs.count() * P, (
            f"used_bytes {st_.used_bytes} != {self.refs.count()} referenced pages"
        )
        parts = st_.used_bytes + st_.waste_bytes + st_.releasing_bytes + st_.free_bytes
        assert parts + st_.subreleased_bytes == total, st_
        assert st_.known_committed_bytes <= st_.used_bytes + st_.waste_bytes + st_.releasing_bytes
        if st_.subreleased_bytes:
            event("state: sub-released small pages in a huge page")
        if st_.releasing_bytes:
            event("state: a release step in flight between two rules")

        # Every page the model says is referenced has exactly the model's count in
        # its chunk's page-size set ...
        matched = 0
        for s, e, refs in self.refs.runs:
            assert e * P <= total, f"model page run [{s}, {e}) is beyond the file"
            for cs, ce in _chunk_pieces(s * P, e * P):
                unfree = view.unfree(chunks[cs // C])
                got = list(unfree.visit_range(cs, ce))
                assert sum(ge - gs for gs, ge, _ in got) == ce - cs and all(
                    r == refs for _, _, r in got
                ), f"pages [{cs:#x}, {ce:#x}): model refs {refs}, file {got}"
                matched += ce - cs
        # ... and no other page holds a reference.
        held = 0
        for i, huge in enumerate(chunks):
            unfree = view.unfree(huge)
            held += sum(e - s for s, e, r in unfree.visit_range(i * C, (i + 1) * C) if r > 0)
        assert held == matched, f"the file holds references on {held - matched} unmodelled bytes"


class DefaultLoopMachine(MemoryFileMachine):
    use_uvloop = False


class UvloopMachine(MemoryFileMachine):
    use_uvloop = True


# About 12-20 s per loop on a 2-core machine (most of it in mf.check_invariants()
# after every step): 40 sequences of up to 60 steps each. gVisor and shrinking
# come from the conftest profile (CI=true: derandomized).
SETTINGS = settings(
    max_examples=40,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
DefaultLoopMachine.TestCase.settings = SETTINGS
UvloopMachine.TestCase.settings = SETTINGS

TestDefaultLoop = DefaultLoopMachine.TestCase
TestUvloop = UvloopMachine.TestCase
