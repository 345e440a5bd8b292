"""Issue 16 items 2, 4 and 5: accounting of committed allocations, O(1) stats(), a short repr.

* Pages an allocation commits (COMMIT's fallocate, WRITE_POPULATE's populate, the zeroing
  of recycled waste) are known-committed and accounted to the allocation's kind and memcg
  at once, from ``allocate``, ``allocate_async`` and ``allocate_from`` alike; a failed or
  cancelled allocation leaves no accounting behind.
* ``stats()``, the metrics collector and ``repr`` read running totals: they touch no
  segment, and ``check_invariants`` compares the totals to a recount of the sets.
* ``str``/``repr`` are one short line; ``dump_segments()`` is the full dump.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from helpers import RecordingExecutor, fill, is_zero, job_of
from prometheus_client import CollectorRegistry

from asyncpgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    AllocationMode,
    AllocOpts,
    FileRange,
    InvariantError,
    MemoryAccounting,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
)
from asyncpgalloc.core import SegmentSet, core_implementation, count_states
from asyncpgalloc.metrics import MemoryFileCollector, render_metrics
from asyncpgalloc.releaser import punch_all

T = TypeVar("T")
P = PAGE_SIZE
MiB = 1 << 20
MEMCG = 2
KIND = MemoryKind.ANONYMOUS

Allocator = Callable[[MemoryFile, int, AllocOpts], Awaitable[FileRange]]


async def via_allocate(mf: MemoryFile, length: int, opts: AllocOpts) -> FileRange:
    return mf.allocate(length, opts)


async def via_allocate_async(mf: MemoryFile, length: int, opts: AllocOpts) -> FileRange:
    return await mf.allocate_async(length, opts)


async def via_allocate_from(mf: MemoryFile, length: int, opts: AllocOpts) -> FileRange:
    async def source(n: int) -> bytes:
        return bytes(n)

    return await mf.allocate_from(source, length, opts)


ALLOCATORS = {
    "allocate": via_allocate,
    "allocate_async": via_allocate_async,
    "allocate_from": via_allocate_from,
}
# 64 KiB is prepared inline by allocate_async, 1 MiB in the executor.
LENGTHS = [64 << 10, 1 * MiB]
COMMITTING = [AllocationMode.COMMIT, AllocationMode.WRITE_POPULATE]


def assert_accounted(mf: MemoryFile, committed: dict[int, int]) -> None:
    """The accounting holds exactly ``committed`` (memcg -> bytes of KIND)."""
    got = {m: mf.accounting.by_memcg(m) for m in mf.accounting.memcg_ids()}
    assert got == {m: {KIND: n} for m, n in committed.items() if n}
    assert mf.known_committed_bytes == sum(committed.values())
    mf.check_invariants()


async def assert_all_given_back(mf: MemoryFile, *frs: FileRange) -> None:
    for fr in frs:
        mf.dec_ref(fr)
    await mf.wait_released()
    if mf.opts.accounting is None:
        assert mf.accounting.memcg_ids() == []
    assert mf.known_committed_bytes == 0
    st = mf.stats()
    assert st.used_bytes == st.waste_bytes == st.releasing_bytes == 0
    mf.check_invariants()


# ------------------------------------------------------------------ item 2: accounting


async def test_commit_8mib_is_accounted_as_the_issue_describes(mf: MemoryFile) -> None:
    fr = mf.allocate(8 * MiB, AllocOpts(mode=AllocationMode.COMMIT, memcg_id=MEMCG))
    assert mf.total_usage() == 8 * MiB
    assert mf.accounting.by_memcg(MEMCG) == {KIND: 8 * MiB}
    assert mf.known_committed_bytes == 8 * MiB
    await mf.update_usage()  # finds nothing more, counts nothing twice
    assert_accounted(mf, {MEMCG: 8 * MiB})
    await assert_all_given_back(mf, fr)


@pytest.mark.parametrize("length", LENGTHS, ids=lambda n: f"{n >> 10}k")
@pytest.mark.parametrize("mode", COMMITTING, ids=lambda m: m.name)
@pytest.mark.parametrize("how", list(ALLOCATORS))
async def test_committing_modes_are_accounted_at_once(
    mf: MemoryFile, how: str, mode: AllocationMode, length: int
) -> None:
    fr = await ALLOCATORS[how](mf, length, AllocOpts(kind=KIND, mode=mode, memcg_id=MEMCG))
    assert fr.length == length
    assert is_zero(mf, fr)
    assert mf.total_usage() >= length
    assert_accounted(mf, {MEMCG: length})
    await assert_all_given_back(mf, fr)


@pytest.mark.parametrize("length", LENGTHS, ids=lambda n: f"{n >> 10}k")
@pytest.mark.parametrize("mode", list(AllocationMode), ids=lambda m: m.name)
@pytest.mark.parametrize("how", list(ALLOCATORS))
async def test_recycled_waste_is_zeroed_and_accounted(
    mf: MemoryFile, how: str, mode: AllocationMode, length: int
) -> None:
    """Waste recycled by any committing mode (CALLER_INDIRECT_COMMIT too: the pages are
    zeroed, so committed) is accounted; UNCOMMITTED never recycles and stays unknown."""
    old = mf.allocate(length, AllocOpts(mode=AllocationMode.COMMIT, memcg_id=1))
    fill(mf, old, 0xAB)
    mf.dec_ref(old)  # waste, accounted as SYSTEM of memcg 1 until recycled or released
    fr = await ALLOCATORS[how](mf, length, AllocOpts(kind=KIND, mode=mode, memcg_id=MEMCG))
    assert is_zero(mf, fr)
    if mode is AllocationMode.UNCOMMITTED:
        assert fr != old
        assert mf.accounting.by_memcg(MEMCG) == {}
    else:
        assert fr == old, "the waste was not recycled"
        assert mf.accounting.by_memcg(1) == {}
        assert_accounted(mf, {MEMCG: length})
    await assert_all_given_back(mf, fr)


@pytest.mark.parametrize("how", list(ALLOCATORS))
async def test_caller_indirect_commit_stays_unknown_until_a_scan_finds_it(
    mf: MemoryFile, how: str
) -> None:
    """Fresh CALLER_INDIRECT_COMMIT and UNCOMMITTED pages are the caller's to commit:
    unknown until ``update_usage`` sees them touched."""
    opts = AllocOpts(kind=KIND, mode=AllocationMode.CALLER_INDIRECT_COMMIT, memcg_id=MEMCG)
    fr = await ALLOCATORS[how](mf, MiB, opts)
    unknown = mf.allocate(MiB, AllocOpts(kind=KIND, memcg_id=MEMCG))
    if how != "allocate_from":  # allocate_from has written its pages already
        assert_accounted(mf, {})
        fill(mf, fr, 1)
    await mf.update_usage()
    assert_accounted(mf, {MEMCG: MiB})
    await assert_all_given_back(mf, fr, unknown)


async def test_a_short_fill_keeps_the_accounting_of_the_filled_part(mf: MemoryFile) -> None:
    data = [b"\x01" * (3 * P + 100), b""]

    async def source(n: int) -> bytes:
        return data.pop(0)

    opts = AllocOpts(kind=KIND, mode=AllocationMode.COMMIT, memcg_id=MEMCG)
    fr = await mf.allocate_from(source, MiB, opts)
    assert fr.length == 3 * P
    # The released tail is SYSTEM waste until the releaser gives it back.
    await mf.wait_released()
    assert_accounted(mf, {MEMCG: 3 * P})
    await assert_all_given_back(mf, fr)


async def test_a_shared_accounting_sums_files_and_returns_to_zero() -> None:
    shared = MemoryAccounting()
    opts = MemoryFileOpts(accounting=shared)
    commit = AllocOpts(kind=KIND, mode=AllocationMode.COMMIT, memcg_id=MEMCG)
    populate = AllocOpts(kind=KIND, mode=AllocationMode.WRITE_POPULATE, memcg_id=MEMCG + 1)
    async with MemoryFile.open(opts=opts) as a, MemoryFile.open(opts=opts) as b:
        fa = await a.allocate_async(MiB, commit)
        fb = b.allocate(2 * MiB, commit)
        fp = await b.allocate_async(MiB, populate)
        assert shared.by_memcg(MEMCG) == {KIND: 3 * MiB}
        assert shared.by_memcg(MEMCG + 1) == {KIND: MiB}
        assert (a.known_committed_bytes, b.known_committed_bytes) == (MiB, 3 * MiB)
        a.check_invariants()
        b.check_invariants()
        await assert_all_given_back(a, fa)
        assert shared.by_memcg(MEMCG) == {KIND: 2 * MiB}
        await assert_all_given_back(b, fb, fp)
        assert shared.memcg_ids() == []
        # Closing with pages still committed gives the shared accounting everything back.
        b.allocate(MiB, commit)
        assert shared.total() == MiB
    assert shared.total() == 0


@pytest.mark.parametrize("mode", COMMITTING, ids=lambda m: m.name)
async def test_a_cancelled_allocate_async_leaves_no_accounting(mode: AllocationMode) -> None:
    with RecordingExecutor() as ex:
        async with MemoryFile.open(opts=MemoryFileOpts(executor=ex)) as mf:
            ex.gate.clear()
            task = asyncio.ensure_future(
                mf.allocate_async(MiB, AllocOpts(kind=KIND, mode=mode, memcg_id=MEMCG))
            )
            await asyncio.get_running_loop().run_in_executor(None, ex.started.wait)
            task.cancel()
            await asyncio.sleep(0.01)
            assert not task.done(), "cancellation did not wait for the executor work"
            ex.gate.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The pages went back unaccounted; committed or not, they are released.
            assert_accounted(mf, {})
            await mf.wait_released()
            st = mf.stats()
            assert st.used_bytes == st.waste_bytes == 0
            assert mf.total_usage() == 0
            mf.check_invariants()


@pytest.fixture
def full_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs: fallocate beyond it fails with ENOSPC."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.mark.parametrize("how", ["allocate", "allocate_async"])
async def test_a_failed_commit_returns_the_pages_unaccounted(full_fs: Path, how: str) -> None:
    async with MemoryFile.open(full_fs / "backing") as mf:
        with pytest.raises(OSError) as err:
            await ALLOCATORS[how](
                mf, 8 * MiB, AllocOpts(kind=KIND, mode=AllocationMode.COMMIT, memcg_id=MEMCG)
            )
        assert err.value.errno == 28  # ENOSPC
        assert_accounted(mf, {})
        await mf.wait_released()
        st = mf.stats()
        assert st.used_bytes == st.waste_bytes == st.releasing_bytes == 0
        fr = mf.allocate(64 << 10, AllocOpts(kind=KIND, mode=AllocationMode.COMMIT, memcg_id=3))
        assert_accounted(mf, {3: 64 << 10})
        await assert_all_given_back(mf, fr)


class HoldPrepareExecutor(concurrent.futures.ThreadPoolExecutor):
    """Two threads; an allocation's prepare job does its work, then waits at ``gate``
    before returning, so that a usage scan can run while its bookkeeping is pending."""

    def __init__(self) -> None:
        super().__init__(max_workers=2, thread_name_prefix="test-hold")
        self.gate = threading.Event()
        self.prepared = threading.Event()

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        job, _ = job_of(fn, args)
        if getattr(job, "__name__", "") != "_prepare_pages":
            return super().submit(fn, *args, **kwargs)

        def held() -> T:
            result = fn(*args, **kwargs)
            self.prepared.set()
            self.gate.wait()
            return result

        return super().submit(held)


async def test_a_usage_scan_during_the_commit_counts_nothing_twice() -> None:
    ex = HoldPrepareExecutor()
    try:
        async with MemoryFile.open(opts=MemoryFileOpts(executor=ex)) as mf:
            opts = AllocOpts(kind=KIND, mode=AllocationMode.WRITE_POPULATE, memcg_id=MEMCG)
            task = asyncio.ensure_future(mf.allocate_async(MiB, opts))
            await asyncio.get_running_loop().run_in_executor(None, ex.prepared.wait)
            # The pages are populated (mincore sees them) but not yet known: the scan
            # marks them, and the allocation's bookkeeping must then skip them.
            await mf.update_usage()
            assert mf.known_committed_bytes == MiB
            ex.gate.set()
            fr = await task
            assert_accounted(mf, {MEMCG: MiB})
            await assert_all_given_back(mf, fr)
    finally:
        ex.gate.set()
        ex.shutdown()


# -------------------------------------------------------------- item 4: running totals


_SEGMENT_READS = (
    "visit_range",
    "gaps",
    "gaps_descending",
    "__iter__",
    "segment_end",
    "mutate_range",
    "remove_range",
)


@pytest.fixture
def no_segment_reads(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call the result to make every way of walking or changing a SegmentSet raise.

    On the compiled core the set is a C type with nothing to patch: arming does nothing
    there, and the callers' other checks (dead allocations left unsettled) still run. The
    code under test is the same source on both cores, and CI runs this on the pure one too.
    """

    def arm() -> None:
        if core_implementation() == "compiled":
            return
        for name in _SEGMENT_READS:

            def refuse(*args: object, _name: str = name, **kwargs: object) -> Any:
                raise AssertionError(f"SegmentSet.{_name} called")

            monkeypatch.setattr(SegmentSet, name, refuse)

    return arm


async def test_stats_and_the_collector_read_no_segment(
    mf: MemoryFile, no_segment_reads: Callable[[], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    frs = [mf.allocate(P * (1 + i % 3)) for i in range(20_000)]
    for fr in frs[::2]:
        mf.dec_ref(fr)  # dead allocations, waiting for the releaser: never settled by stats()
    expected = count_states(mf.page_view())
    for fr in frs[1::4]:
        mf.dec_ref(fr)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MemoryFileCollector(mf))
    no_segment_reads()
    st = mf.stats()
    text = render_metrics(mf)
    families = list(registry.collect())
    line = repr(mf)
    assert str(mf) == line
    assert mf._pages.has_dead()  # nothing above settled the dead allocations
    monkeypatch.undo()
    assert st == count_states(mf.page_view())
    assert st.used_bytes == expected.used_bytes - sum(fr.length for fr in frs[1::4])
    assert b'asyncpgalloc_bytes{state="waste"}' in text and families
    mf.check_invariants()
    await mf.wait_released()
    mf.check_invariants()


async def test_check_invariants_catches_running_totals_that_drift(mf: MemoryFile) -> None:
    frs = [mf.allocate(P) for _ in range(10)]
    mf.dec_ref(frs[0])
    mf.check_invariants()
    mf._pages._used_bytes += P  # what a transition that forgot its totals would leave
    with pytest.raises(InvariantError, match="used_bytes: running 40960, recount 36864"):
        mf.check_invariants()
    mf._pages._used_bytes -= P
    mf._pages._waste_bytes -= P
    mf._pages._releasing_bytes += P
    with pytest.raises(InvariantError, match=r"waste_bytes.*releasing_bytes"):
        mf.check_invariants()
    mf._pages._waste_bytes += P
    mf._pages._releasing_bytes -= P
    mf.check_invariants()


async def test_a_small_release_finished_in_parts_counts_each_page_once(
    mf: MemoryFile,
) -> None:
    """The releaser finishes a small range in parts, yielding between them: in between,
    the finished part is free and the rest releasing (the recount agrees)."""
    frs = [mf.allocate(P) for _ in range(200)]
    for fr in frs:
        mf.dec_ref(fr)
    # What the releaser task does, one call at a time and with no await in between.
    plans = mf._pages.begin_release(1, {})
    assert len(plans) == 1 and plans[0].released == FileRange(frs[0].start, frs[-1].end)
    plan = plans[0]
    assert mf.stats().releasing_bytes == 200 * P
    mf.check_invariants()
    punch_all(mf._decommit_or_zero, plans, [0])
    start, end = plan.released
    mid = start + 120 * P
    mf._pages.finish_release(plan, start, mid)
    st = mf.stats()
    assert (st.releasing_bytes, st.used_bytes, st.waste_bytes) == (80 * P, 0, 0)
    mf.check_invariants()
    mf._pages.finish_release(plan, mid, end)
    assert mf.stats().releasing_bytes == 0
    assert mf.stats().free_bytes == mf.total_size()
    mf.check_invariants()
    await mf.wait_released()
    mf.check_invariants()


async def test_sub_released_pages_are_counted(huge_mf: MemoryFile) -> None:
    mf = huge_mf
    fr = mf.allocate(HUGE_PAGE_SIZE, AllocOpts(huge=True))
    assert mf.stats().huge_chunks == 1
    part = FileRange(fr.start + 4 * P, fr.start + 8 * P)
    mf.dec_ref(part)
    await mf.wait_released()
    st = mf.stats()
    assert (st.used_bytes, st.subreleased_bytes) == (HUGE_PAGE_SIZE - 4 * P, 4 * P)
    mf.check_invariants()
    mf.dec_ref(FileRange(fr.start, part.start))
    mf.dec_ref(FileRange(part.end, fr.end))
    await mf.wait_released()
    st = mf.stats()
    assert st.subreleased_bytes == st.used_bytes == 0
    assert st.free_bytes == st.total_size
    mf.check_invariants()


async def test_a_loaded_checkpoint_has_its_totals(mf: MemoryFile, tmp_path: Path) -> None:
    frs = [mf.allocate(P * (1 + i % 5)) for i in range(300)]
    committed = mf.allocate(MiB, AllocOpts(mode=AllocationMode.COMMIT, memcg_id=MEMCG))
    for fr in frs[::3]:
        mf.dec_ref(fr)
    await mf.wait_released()
    await mf.save(tmp_path / "ck")
    async with await MemoryFile.load(tmp_path / "ck") as loaded:
        assert loaded.stats() == mf.stats()
        loaded.check_invariants()
    mf.dec_ref(committed)


# --------------------------------------------------------------------- item 5: repr


async def test_repr_is_one_short_line_with_the_counts(mf: MemoryFile) -> None:
    committed = mf.allocate(MiB, AllocOpts(mode=AllocationMode.COMMIT))
    frs = [mf.allocate(P) for _ in range(10_000)]
    for fr in frs[:1000]:
        mf.dec_ref(fr)
    line = repr(mf)
    assert str(mf) == line
    assert len(line) < 200 and "\n" not in line
    assert line.startswith(f"<MemoryFile fd={mf.fd} size=1GiB used=")
    for part in ("used=36.2MiB", "waste=3.91MiB", "releasing=0B", "free=984MiB", "committed=1MiB"):
        assert part in line
    assert line.endswith(" chunks=1 small/0 huge>")
    dump = mf.dump_segments()
    assert "unfree_small:" in dump and "mem_acct:" in dump
    assert "[0x0, 0x100000): 1" in dump  # the committed allocation's references
    mf.dec_ref(committed)


async def test_a_closed_file_says_closed() -> None:
    mf = await MemoryFile.open()
    mf.allocate(P)
    await mf.aclose()
    assert repr(mf) == str(mf) == "<MemoryFile closed>"


def test_repr_works_from_another_thread_and_loop() -> None:
    async def main() -> MemoryFile:
        mf = await MemoryFile.open()
        mf.allocate(2 * P)
        return mf

    loop = asyncio.new_event_loop()
    try:
        mf = loop.run_until_complete(main())
        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(repr(mf)))
        t.start()
        t.join()
        assert "used=8KiB" in out[0]
        loop.run_until_complete(mf.aclose())
    finally:
        loop.close()
