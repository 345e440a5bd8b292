"""Accounting against the truth: update_usage (real mincore), decommit, and their race."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from helpers import RecordingExecutor, fill, job_of
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncpgalloc import (
    PAGE_SIZE,
    AccessType,
    AllocationMode,
    AllocOpts,
    FileRange,
    MemoryAccounting,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
)
from asyncpgalloc.blocking import run_signalling
from asyncpgalloc.core import MemAcct

P = PAGE_SIZE
T = TypeVar("T")
ANON, CACHE, SYSTEM = MemoryKind.ANONYMOUS, MemoryKind.PAGE_CACHE, MemoryKind.SYSTEM


def touched(mf: MemoryFile, pages: int, kind: MemoryKind = ANON, memcg_id: int = 0) -> FileRange:
    """An allocation whose pages are all written through the mapping (so mincore sees them)."""
    fr = mf.allocate(pages * P, AllocOpts(kind=kind, memcg_id=memcg_id))
    fill(mf, fr, 0xCD)
    return fr


async def test_scan_counts_touched_pages_by_kind_and_memcg(mf: MemoryFile) -> None:
    a = touched(mf, 8, ANON, memcg_id=1)
    touched(mf, 3, CACHE, memcg_id=2)
    mf.allocate(5 * P)  # never touched: not committed
    half = FileRange(a.start, a.start + 4 * P)
    mf.dec_ref(half)  # waste is not scanned
    await mf.update_usage()
    assert mf.accounting.by_memcg(1) == {ANON: 4 * P}
    assert mf.accounting.by_memcg(2) == {CACHE: 3 * P}
    assert mf.known_committed_bytes == 7 * P == mf.accounting.total()
    assert mf.total_usage() >= 7 * P
    mf.check_invariants()
    # Waste moves to SYSTEM (same memcg) until released, then leaves.
    mf.dec_ref(FileRange(a.start + 4 * P, a.start + 6 * P))
    assert mf.accounting.by_memcg(1) == {ANON: 2 * P, SYSTEM: 2 * P}
    await mf.wait_released()
    assert mf.accounting.by_memcg(1) == {ANON: 2 * P}
    assert mf.known_committed_bytes == 5 * P
    mf.check_invariants()


async def test_scan_of_some_memcgs_only(mf: MemoryFile) -> None:
    touched(mf, 2, memcg_id=1)
    touched(mf, 5, memcg_id=2)
    await mf.update_usage(memcg_ids=[2])
    assert mf.accounting.by_memcg(1) == {}
    assert mf.accounting.by_memcg(2) == {ANON: 5 * P}
    # Past the throttle the first scan armed (7x its cost: longer on a loaded machine).
    for _ in range(500):
        await asyncio.sleep(0.01)
        if await mf.update_usage():
            break
    assert mf.accounting.by_memcg(1) == {ANON: 2 * P}


async def test_full_scans_are_throttled_to_100_hz(mf: MemoryFile) -> None:
    touched(mf, 2)
    await mf.update_usage()
    touched(mf, 3)
    await mf.update_usage()  # within 10 ms of the last full scan: skipped
    assert mf.known_committed_bytes == 2 * P
    # Past the throttle (10 ms, or 7x the last scan's cost: longer on a loaded machine).
    for _ in range(500):
        await asyncio.sleep(0.01)
        if await mf.update_usage():
            break
    assert mf.known_committed_bytes == 5 * P


async def test_recycled_committed_waste_leaves_system_accounting(mf: MemoryFile) -> None:
    a = touched(mf, 4, memcg_id=9)
    await mf.update_usage()
    mf.dec_ref(a)
    assert mf.accounting.by_memcg(9) == {SYSTEM: 4 * P}
    b = mf.allocate(4 * P, AllocOpts(mode=AllocationMode.COMMIT, kind=CACHE, memcg_id=3))
    assert b == a  # recycled: no longer SYSTEM; zeroed, so committed, to its new owner
    assert mf.accounting.by_memcg(9) == {}
    assert mf.accounting.by_memcg(3) == {CACHE: 4 * P} and mf.known_committed_bytes == 4 * P
    await asyncio.sleep(0.02)
    await mf.update_usage()
    assert mf.accounting.by_memcg(3) == {CACHE: 4 * P} and mf.known_committed_bytes == 4 * P


async def test_decommit_drops_accounting_and_memory(mf: MemoryFile) -> None:
    fr = touched(mf, 16)
    await mf.update_usage()
    assert mf.known_committed_bytes == 16 * P
    await mf.decommit(FileRange(fr.start, fr.start + 8 * P))
    assert mf.known_committed_bytes == 8 * P == mf.accounting.total()
    assert mf.total_usage() == 8 * P
    assert mf.stats().used_bytes == 16 * P  # still allocated, now zero
    (view,) = mf.map_internal(FileRange(fr.start, fr.start + 8 * P))
    assert bytes(view) == bytes(8 * P)


async def test_disabled_accounting_still_tracks_commitment() -> None:
    acct = MemoryAccounting()
    opts = MemoryFileOpts(disable_memory_accounting=True, accounting=acct)
    async with MemoryFile.open(opts=opts) as mf:
        touched(mf, 4)
        await mf.update_usage()
        assert mf.known_committed_bytes == 4 * P
        assert acct.total() == 0
        mf.check_invariants()


async def test_shared_accounting_sums_two_files() -> None:
    acct = MemoryAccounting()
    async with (
        MemoryFile.open(opts=MemoryFileOpts(accounting=acct)) as f1,
        MemoryFile.open(opts=MemoryFileOpts(accounting=acct)) as f2,
    ):
        touched(f1, 2, memcg_id=5)
        touched(f2, 3, memcg_id=5)
        await f1.update_usage()
        await f2.update_usage()
        assert acct.by_memcg(5) == {ANON: 5 * P}


class _HoldScanResult(concurrent.futures.ThreadPoolExecutor):
    """Runs mincore at once but holds its result at a gate, so a decommit can overtake it."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.gate = threading.Event()
        self.scanned = threading.Event()

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        job, job_args = job_of(fn, args)
        if getattr(job, "__name__", "") != "_resident_pages":
            return super().submit(fn, *args, **kwargs)

        def held() -> T:
            result: T = job(*job_args, **kwargs)
            self.scanned.set()
            self.gate.wait()
            return result

        if fn is run_signalling:
            return super().submit(run_signalling, args[0], held)
        return super().submit(held)


async def test_decommit_during_a_scan_is_never_marked_committed() -> None:
    # docs/design.md §5: gVisor judges the race by the segment read before the scan
    # dropped its lock; pages decommitted meanwhile would be marked committed.
    ex = _HoldScanResult()
    try:
        async with MemoryFile.open(opts=MemoryFileOpts(executor=ex)) as mf:
            fr = touched(mf, 8)
            scan = asyncio.ensure_future(mf.update_usage())
            while not ex.scanned.is_set():
                await asyncio.sleep(0.001)
            await mf.decommit(fr)  # punches after mincore saw the pages resident
            ex.gate.set()
            await scan
            assert mf.known_committed_bytes == 0 and mf.accounting.total() == 0
            assert mf.total_usage() == 0
            mf.check_invariants()
    finally:
        ex.gate.set()
        ex.shutdown()


async def test_decommit_cancelled_mid_punch_still_updates_accounting() -> None:

    with RecordingExecutor() as ex:
        async with MemoryFile.open(opts=MemoryFileOpts(executor=ex)) as mf:
            fr = touched(mf, 8)
            await mf.update_usage()
            assert mf.known_committed_bytes == 8 * P
            ex.gate.clear()
            ex.started.clear()
            task = asyncio.ensure_future(mf.decommit(fr))
            while not ex.started.is_set():
                await asyncio.sleep(0.001)
            task.cancel()
            ex.gate.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert mf.known_committed_bytes == 0 and mf.accounting.total() == 0
            assert mf.total_usage() == 0
            mf.check_invariants()


async def test_any_scan_arms_the_throttle_by_its_cost() -> None:
    with RecordingExecutor() as ex:
        async with MemoryFile.open(opts=MemoryFileOpts(executor=ex)) as mf:
            touched(mf, 4, memcg_id=1)
            loop = asyncio.get_running_loop()
            await mf.update_usage(memcg_ids=[1])
            scan_end = loop.time()
            scans = sum(name == "_resident_pages" for name, _ in ex.calls)
            assert scans == 1 and mf.known_committed_bytes == 4 * P
            # A filtered scan arms the throttle too (by 7x its cost), however often
            # callers ask until then.
            armed_until = mf._usage.next_scan
            assert armed_until > scan_end
            touched(mf, 4, memcg_id=1)
            # (A margin: uvloop's clock has 1 ms steps and moves between this check
            # and the call's own.)
            while loop.time() < armed_until - 0.002:
                t = loop.time()
                await mf.update_usage(memcg_ids=[1])
                assert sum(name == "_resident_pages" for name, _ in ex.calls) == 1, (
                    t - scan_end,
                    armed_until - scan_end,
                    [n for n, _ in ex.calls],
                )
                await asyncio.sleep(0)


async def test_concurrent_callers_join_one_scan() -> None:
    with RecordingExecutor() as ex:
        async with MemoryFile.open(opts=MemoryFileOpts(executor=ex)) as mf:
            touched(mf, 4)
            await asyncio.gather(*(mf.update_usage() for _ in range(5)))
            assert sum(name == "_resident_pages" for name, _ in ex.calls) == 1
            assert mf.known_committed_bytes == 4 * P


async def test_background_refresh_keeps_accounting_fresh() -> None:
    async with MemoryFile.open(opts=MemoryFileOpts(usage_refresh_interval=0.02)) as mf:
        touched(mf, 6, memcg_id=4)
        for _ in range(200):
            if mf.accounting.by_memcg(4) == {ANON: 6 * P}:
                break
            await asyncio.sleep(0.01)
        assert mf.accounting.by_memcg(4) == {ANON: 6 * P}


async def test_a_long_scan_yields_and_stays_right_while_the_file_changes(mf: MemoryFile) -> None:
    # 64 MiB with every other page touched: 8192 runs to mark, in many slices.
    big = mf.allocate(64 << 20, AllocOpts(memcg_id=1))
    (view,) = mf.map_internal(big, AccessType.WRITE)
    for off in range(0, big.length, 2 * P):
        view[off] = 1
    del view
    ticks = 0
    scanning = True

    async def churn() -> None:
        nonlocal ticks
        live: list[FileRange] = []
        while scanning:
            ticks += 1
            live.append(touched(mf, 1, memcg_id=2))  # new pages: must not be marked
            if len(live) > 8:
                mf.dec_ref(live.pop(0))
            await asyncio.sleep(0)
        for fr in live:
            mf.dec_ref(fr)

    churner = asyncio.ensure_future(churn())
    await mf.update_usage(memcg_ids=[1])
    scanning = False
    await churner
    assert ticks > 2  # the loop ran other tasks during the scan
    assert mf.accounting.by_memcg(1) == {ANON: big.length // 2}
    assert mf.accounting.by_memcg(2) == {}
    await mf.wait_released()
    mf.check_invariants()


async def test_mincore_failure_raises_and_leaves_accounting(
    mf: MemoryFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asyncpgalloc import host

    def fail(addr: int, length: int, out: bytearray) -> None:
        raise OSError(12, "Cannot allocate memory")

    touched(mf, 3)
    monkeypatch.setattr(host, "mincore", fail)
    with pytest.raises(OSError):
        await mf.update_usage()
    assert mf.known_committed_bytes == 0 and mf.accounting.total() == 0
    mf.check_invariants()


async def test_closing_a_file_takes_its_bytes_out_of_shared_accounting() -> None:
    acct = MemoryAccounting()
    async with MemoryFile.open(opts=MemoryFileOpts(accounting=acct)) as keep:
        touched(keep, 2, memcg_id=1)
        await keep.update_usage()
        mf = await MemoryFile.open(opts=MemoryFileOpts(accounting=acct))
        touched(mf, 3, memcg_id=1)
        waste = touched(mf, 4, memcg_id=1)
        await mf.update_usage()
        mf.dec_ref(waste)  # SYSTEM until released; close before the releaser runs
        assert acct.by_memcg(1) == {ANON: 5 * P, SYSTEM: 4 * P}
        await mf.aclose()  # still referenced and still waste: all given back
        assert acct.by_memcg(1) == {ANON: 2 * P}


# ------------------------------------------------- marking against a page-by-page model

_HOW = ("plain", "memcg", "commit", "decommit", "free")


def _pages(mf: MemoryFile, end: int) -> tuple[list[MemAcct | None], set[int]]:
    """The accounting value of every page below ``end`` (None: no segment), and the
    segment starts."""
    vals: list[MemAcct | None] = [None] * (end // P)
    starts = set()
    for s, e, ma in mf.page_view().mem_acct.visit_range(0, end):
        vals[s // P : e // P] = [ma] * ((e - s) // P)
        starts.add(s)
    return vals, starts


async def _check_marking(
    allocs: list[tuple[int, str]], runs: list[tuple[bool, int]], skip: int, cut: int
) -> None:
    async with MemoryFile.open() as mf:
        made = []
        for i, (pages, how) in enumerate(allocs):
            mode = AllocationMode.COMMIT if how == "commit" else AllocationMode.UNCOMMITTED
            opts = AllocOpts(mode=mode, memcg_id=i if how == "memcg" else 0)
            made.append((mf.allocate(pages * P, opts), how))
        # As a scan does: the sequence before its mincore, then the races.
        last_seq = mf._pages.begin_scan()
        for fr, how in made:
            if how == "decommit":
                await mf.decommit(fr)  # after the scan began: must not be marked
            elif how == "free":
                mf.dec_ref(fr)  # waste, then released, while marking runs
        end = max(fr.end for fr, _ in made)
        lo = min(skip, end // P - 1) * P
        bits = b"".join(bytes([bit]) * n for bit, n in runs)
        resident = (bits * (end // P // len(bits) + 1))[: max(1, end // P - lo // P - cut)]
        hi = lo + len(resident) * P
        before, starts_before = _pages(mf, end)
        known_before = mf.known_committed_bytes
        await mf._usage._mark_committed(lo, resident, last_seq)
        after, starts_after = _pages(mf, end)
        want_known = known_before
        changes = set()
        for p, (b, a) in enumerate(zip(before, after, strict=True)):
            if b is None or b.waste_or_releasing:
                assert a is None or a == b, p  # never marked; may be released meanwhile
                if a is None and b is not None and b.known_committed:
                    want_known -= P
                continue
            want = b
            eligible = not b.known_committed and b.commit_seq <= last_seq
            if lo <= p * P < hi and resident[p - lo // P] and eligible:
                want = b._replace(known_committed=True, commit_seq=0)
                want_known += P
            assert a == want, p
            if p and after[p - 1] != a and before[p - 1] is b:
                changes.add(p * P)
        assert mf.known_committed_bytes == want_known
        # Cuts only where the value changes: a run is one segment however windows fall.
        live_before = {s for s in starts_before if before[s // P] is not None}
        assert starts_after == (live_before & starts_after) | changes
        await mf.wait_released()
        mf.check_invariants()


@settings(max_examples=60)
@given(
    allocs=st.lists(st.tuples(st.integers(1, 1500), st.sampled_from(_HOW)), min_size=1, max_size=6),
    runs=st.lists(
        st.tuples(st.integers(0, 1), st.one_of(st.integers(1, 3), st.integers(1000, 2600))),
        min_size=1,
        max_size=30,
    ),
    skip=st.integers(0, 50),
    cut=st.integers(0, 50),
)
def test_marking_matches_a_page_by_page_model(
    allocs: list[tuple[int, str]], runs: list[tuple[int, int]], skip: int, cut: int
) -> None:
    # Mixed short and long runs around MARK_WINDOW_PAGES, over allocations in every
    # state a scan meets, starting and ending inside segments.
    asyncio.run(_check_marking(allocs, [(bool(b), n) for b, n in runs], skip, cut))


async def test_marking_windows_follow_the_measured_cost_per_cut(
    mf: MemoryFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A window's cut budget follows the measured cost per cut so that it costs about
    # half a slice on any CPU. A slice far shorter than any window stands for a CPU
    # far slower than this one: windows then shrink to MIN_MARK_CUTS cuts, one per
    # loop turn. (With fixed 1024-page windows, 2048 pages of every other page
    # resident were marked in 2 windows, each 5x the slice on a slower CPU.)
    from asyncpgalloc import usage

    monkeypatch.setattr(usage, "SLICE_SECONDS", 1e-9)
    pages = 2048
    fr = mf.allocate(pages * P)
    for view in mf.map_internal(fr, AccessType.WRITE):
        for off in range(0, len(view), 2 * P):
            view[off] = 1
        view.release()
    turns = 0
    done = False

    async def count_turns() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.ensure_future(count_turns())
    await mf.update_usage()
    done = True
    await counter
    assert mf.known_committed_bytes == pages // 2 * P
    mf.check_invariants()
    # ~2048 cuts: one window of MARK_WINDOW_CUTS (128), then windows of MIN_MARK_CUTS
    # (16), a loop turn before each: ~120 turns (half of that asserted).
    assert turns >= (pages - 128) // 16 // 2, turns
