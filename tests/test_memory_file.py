"""MemoryFile on a real memfd: placement, zeroing, references, release, errors, lifecycle."""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import os
import random
import threading
import time
from pathlib import Path

import pytest
from helpers import RecordingExecutor, fill, is_zero, reads_zero, snapshot

from asyncpgalloc import (
    CHUNK_SIZE,
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    AccessType,
    AllocationMode,
    AllocOpts,
    ClosedError,
    Direction,
    FileRange,
    InvalidLengthError,
    InvalidRangeError,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
    OutOfMemoryError,
    ReferenceCountError,
    WrongThreadError,
    pages,
    releaser,
)
from asyncpgalloc.releaser import MAX_RELEASING_BYTES, MAX_RELEASING_RANGES

P = PAGE_SIZE
H = HUGE_PAGE_SIZE
MiB = 1 << 20
DOWN = AllocOpts(direction=Direction.TOP_DOWN)
ALL_MODES = list(AllocationMode)


# ----------------------------------------------------------------- placement


async def test_bottom_up_takes_the_first_gap_and_grows_by_a_chunk(mf: MemoryFile) -> None:
    assert mf.total_size() == 0
    a = mf.allocate(P)
    b = mf.allocate(2 * P)
    assert (a, b) == (FileRange(0, P), FileRange(P, 3 * P))
    assert mf.total_size() == CHUNK_SIZE


async def test_top_down_takes_the_last_gap(mf: MemoryFile) -> None:
    a = mf.allocate(P, DOWN)
    b = mf.allocate(3 * P, DOWN)
    assert a == FileRange(CHUNK_SIZE - P, CHUNK_SIZE)
    assert b == FileRange(CHUNK_SIZE - 4 * P, CHUNK_SIZE - P)


async def test_undersized_gaps_are_skipped_in_both_directions(mf: MemoryFile) -> None:
    frs = [mf.allocate(P) for _ in range(5)]  # pages 0..4
    mf.dec_ref(frs[1])
    mf.dec_ref(frs[3])
    await mf.wait_released()
    # Two one-page holes at pages 1 and 3: a two-page allocation fits in neither.
    assert mf.allocate(2 * P) == FileRange(5 * P, 7 * P)
    assert mf.allocate(P) == frs[1]
    top = mf.allocate(P, DOWN)
    assert top == FileRange(CHUNK_SIZE - P, CHUNK_SIZE)
    # Top-down, the last gap large enough for 2 pages is below `top`, not page 3.
    assert mf.allocate(2 * P, DOWN) == FileRange(CHUNK_SIZE - 3 * P, CHUNK_SIZE - P)
    assert mf.allocate(P, DOWN) == FileRange(CHUNK_SIZE - 4 * P, CHUNK_SIZE - 3 * P)


async def test_small_and_huge_chunks_never_serve_each_other(huge_mf: MemoryFile) -> None:
    mf = huge_mf
    small = mf.allocate(P)
    huge = mf.allocate(H, AllocOpts(huge=True))
    small2 = mf.allocate(H)  # a huge-sized small allocation stays in the small chunk
    assert small == FileRange(0, P)
    assert huge == FileRange(CHUNK_SIZE, CHUNK_SIZE + H)
    assert small2.end <= CHUNK_SIZE
    st = mf.stats()
    assert (st.small_chunks, st.huge_chunks) == (1, 1)
    # Fill the small chunk: the next small allocation needs a new small chunk,
    # even though the huge chunk is nearly all free.
    mf.allocate(CHUNK_SIZE - small2.end, AllocOpts(direction=Direction.BOTTOM_UP))
    nxt = mf.allocate(P)
    assert nxt.start == 2 * CHUNK_SIZE
    assert mf.stats().small_chunks == 2


async def test_huge_allocation_without_expect_hugepages_uses_small_chunks(mf: MemoryFile) -> None:
    fr = mf.allocate(H, AllocOpts(huge=True))
    assert fr == FileRange(0, H)
    assert mf.stats().huge_chunks == 0 and not mf.hugepages_enabled


async def test_growth_reuses_the_free_tail_and_spans_chunks(mf: MemoryFile) -> None:
    mf.allocate(512 * MiB)
    big = mf.allocate(CHUNK_SIZE)
    # 512 MiB of the last chunk's free tail plus one new chunk, not two new chunks.
    assert big == FileRange(512 * MiB, CHUNK_SIZE + 512 * MiB)
    assert mf.total_size() == 2 * CHUNK_SIZE
    views = mf.map_internal(FileRange(big.end - 2 * P - CHUNK_SIZE // 2, big.end - CHUNK_SIZE // 2))
    assert [len(v) for v in views] == [2 * P]
    views = mf.map_internal(FileRange(CHUNK_SIZE - P, CHUNK_SIZE + P), AccessType.WRITE)
    assert [len(v) for v in views] == [P, P]
    views[0][:] = b"\x01" * P
    views[1][:] = b"\x02" * P
    assert os.pread(mf.fd, 2, CHUNK_SIZE - 1) == b"\x01\x02"


async def test_committing_modes_recycle_waste_and_others_never_do(mf: MemoryFile) -> None:
    a = mf.allocate(4 * P, AllocOpts(mode=AllocationMode.COMMIT))
    fill(mf, a, 0xAB)
    mf.dec_ref(a)
    # The releaser has not run yet (no await): `a` is waste.
    assert mf.stats().waste_bytes == 4 * P
    u = mf.allocate(4 * P, AllocOpts(mode=AllocationMode.UNCOMMITTED))
    assert u.start >= a.end
    r = mf.allocate(4 * P, AllocOpts(mode=AllocationMode.CALLER_INDIRECT_COMMIT))
    assert r == a
    assert is_zero(mf, r)
    assert mf.stats().waste_bytes == 0


async def test_recycling_never_takes_used_or_releasing_pages() -> None:
    with RecordingExecutor() as ex:
        async with MemoryFile.open(opts=MemoryFileOpts(executor=ex)) as mf:
            a = mf.allocate(8 * P, AllocOpts(mode=AllocationMode.COMMIT))
            used = mf.allocate(8 * P, AllocOpts(mode=AllocationMode.COMMIT))
            ex.gate.clear()
            mf.dec_ref(a)
            while mf.stats().releasing_bytes == 0:
                await asyncio.sleep(0.001)
            assert mf.stats().releasing_bytes == 8 * P
            mf.check_invariants()
            b = mf.allocate(8 * P, AllocOpts(mode=AllocationMode.COMMIT))
            assert b.start >= used.end and b != a
            ex.gate.set()
            await mf.wait_released()
            assert mf.allocate(8 * P, AllocOpts(mode=AllocationMode.COMMIT)) == a
            mf.check_invariants()


# -------------------------------------------------------------------- zeroing


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.name)
async def test_every_page_handed_out_is_zero_after_every_history(
    mf: MemoryFile, mode: AllocationMode
) -> None:
    opts = AllocOpts(mode=mode)
    fresh = mf.allocate(16 * P, opts)
    assert is_zero(mf, fresh)
    fill(mf, fresh, 0x5A)
    mf.dec_ref(fresh)
    again = mf.allocate(16 * P, opts)  # recycled waste for committing modes
    assert is_zero(mf, again)
    fill(mf, again, 0x5A)
    mf.dec_ref(again)
    await mf.wait_released()
    released = mf.allocate(16 * P, opts)  # released (punched) pages
    assert released.start == fresh.start or mode is AllocationMode.UNCOMMITTED
    assert is_zero(mf, released)


async def test_sub_released_huge_page_comes_back_zero(huge_mf: MemoryFile) -> None:
    mf = huge_mf
    huge = AllocOpts(huge=True, mode=AllocationMode.WRITE_POPULATE)
    fr = mf.allocate(H, huge)
    fill(mf, fr, 0xEE)
    mf.dec_ref(FileRange(fr.start, fr.start + H // 2))
    await mf.wait_released()
    st = mf.stats()
    assert (
        st.subreleased_bytes == H // 2
        and st.used_bytes == H // 2
        and st.free_bytes == CHUNK_SIZE - H
    )
    assert reads_zero(mf, FileRange(fr.start, fr.start + H // 2))  # punched, not forgotten
    mf.dec_ref(FileRange(fr.start + H // 2, fr.end))
    await mf.wait_released()
    assert mf.stats().subreleased_bytes == 0 and mf.stats().free_bytes == CHUNK_SIZE
    again = mf.allocate(H, huge)
    assert again == fr and is_zero(mf, again)


# ----------------------------------------------------------------- references


async def test_references_are_per_page(mf: MemoryFile) -> None:
    fr = mf.allocate(4 * P)
    mid = FileRange(fr.start + P, fr.start + 3 * P)
    assert mf.has_unique_ref(fr)
    mf.inc_ref(mid)
    assert not mf.has_unique_ref(fr)
    assert mf.has_unique_ref(FileRange(fr.start, fr.start + P))
    mf.dec_ref(fr)  # pages 0 and 3 become waste, 1-2 keep one reference
    st = mf.stats()
    assert (st.used_bytes, st.waste_bytes) == (2 * P, 2 * P)
    assert mf.has_unique_ref(mid)
    with pytest.raises(ReferenceCountError):
        mf.has_unique_ref(fr)
    mf.dec_ref(mid)
    await mf.wait_released()
    assert mf.stats().used_bytes == 0


async def test_references_span_neighbouring_allocations(mf: MemoryFile) -> None:
    a = mf.allocate(2 * P)
    b = mf.allocate(2 * P)
    both = FileRange(a.start, b.end)
    mf.inc_ref(both)
    mf.dec_ref(both)
    assert mf.stats().used_bytes == 4 * P
    mf.dec_ref(both)
    assert mf.stats().waste_bytes == 4 * P


async def test_has_unique_ref_across_a_small_and_a_huge_chunk(huge_mf: MemoryFile) -> None:
    # docs/design.md §5: gVisor visits `fr` instead of the chunk's part of it, so a
    # range spanning a small and a huge chunk reads the other size's zero counts.
    mf = huge_mf
    mf.allocate(CHUNK_SIZE)  # the whole small chunk 0
    mf.allocate(H, AllocOpts(huge=True))  # chunk 1, huge
    span = FileRange(CHUNK_SIZE - P, CHUNK_SIZE + P)
    assert mf.has_unique_ref(span)
    mf.inc_ref(span)
    assert not mf.has_unique_ref(span)


# --------------------------------------------------------------------- release


async def test_release_spanning_huge_pages_keeps_sub_release_counts(huge_mf: MemoryFile) -> None:
    # docs/design.md §5: gVisor drops the new count of a partly released first/last
    # huge page when a release spans two or more huge pages; those pages would
    # then never become free again.
    mf = huge_mf
    fr = mf.allocate(3 * H, AllocOpts(huge=True))
    mf.dec_ref(FileRange(fr.start + H // 2, fr.end - H // 2))
    await mf.wait_released()
    st = mf.stats()
    assert st.subreleased_bytes == H  # half of the first and half of the last huge page
    assert st.used_bytes == H
    mf.dec_ref(FileRange(fr.start, fr.start + H // 2))
    mf.dec_ref(FileRange(fr.end - H // 2, fr.end))
    await mf.wait_released()
    st = mf.stats()
    assert st.subreleased_bytes == 0
    assert st.free_bytes == CHUNK_SIZE
    assert mf.allocate(3 * H, AllocOpts(huge=True)) == fr


async def test_releaser_order_and_step_size() -> None:
    with RecordingExecutor() as ex:
        opts = MemoryFileOpts(executor=ex, expect_hugepages=True)
        async with MemoryFile.open(opts=opts) as mf:
            big = mf.allocate(200 * MiB)
            small_hi = mf.allocate(P, DOWN)
            huge = mf.allocate(H, AllocOpts(huge=True))
            for fr in (huge, big, small_hi):
                mf.dec_ref(fr)
            await mf.wait_released()
            # Small before huge, highest offsets first, at most 128 MiB per punch,
            # all in one step (punching holes is quick: no step runs out of time).
            first = MAX_RELEASING_BYTES
            assert ex.released_ranges() == [
                small_hi,
                FileRange(big.end - first, big.end),
                FileRange(big.start, big.end - first),
                huge,
            ]
            assert [[p.released for p in step] for step in ex.release_steps()] == [
                [
                    small_hi,
                    FileRange(big.end - first, big.end),
                    FileRange(big.start, big.end - first),
                    huge,
                ],
            ]


async def test_adjacent_dead_allocations_are_released_together_whatever_the_order() -> None:
    # dec_ref queues allocations; the releaser takes the queue sorted, highest
    # first, so adjacent allocations freed in any order make one range per slice.
    with RecordingExecutor() as ex:
        async with MemoryFile.open(opts=MemoryFileOpts(executor=ex)) as mf:
            frs = [mf.allocate(P) for _ in range(1000)]
            for fr in random.Random(1).sample(frs, len(frs)):
                mf.dec_ref(fr)
            await mf.wait_released()
            # From the top, each range at most DEAD_SLICE allocations: as many as fit
            # in one call, or in the releaser's slice of the loop (begin_release
            # checks its deadline every 16 allocations), but never fewer than 16.
            ranges = ex.released_ranges()
            assert ranges[0].end == frs[-1].end and ranges[-1].start == frs[0].start
            assert all(a.start == b.end for a, b in itertools.pairwise(ranges))
            assert all(r.length <= pages.DEAD_SLICE * P for r in ranges)
            assert all(r.length >= 16 * P for r in ranges[:-1])
            assert mf.stats().free_bytes == CHUNK_SIZE


async def test_release_progresses_while_the_loop_is_busy() -> None:
    # A loop that never idles still lets its executor punch (the releaser lends it
    # the GIL): the pages are free again long before the busy task ends.
    async with MemoryFile.open() as mf:
        frs = [mf.allocate(P) for _ in range(64)]
        for fr in frs[::2]:
            mf.dec_ref(fr)
        deadline = time.monotonic() + 2.0
        while mf.stats().waste_bytes or mf.stats().releasing_bytes:
            assert time.monotonic() < deadline, "nothing was released while the loop was busy"
            end = time.perf_counter() + 0.0005
            while time.perf_counter() < end:
                pass
            await asyncio.sleep(0)
        assert mf.counters().released_bytes == 32 * P


async def test_many_small_ranges_share_one_executor_hop() -> None:
    with RecordingExecutor() as ex:
        async with MemoryFile.open(opts=MemoryFileOpts(executor=ex)) as mf:
            frs = [mf.allocate(P) for _ in range(2 * MAX_RELEASING_RANGES)]
            for fr in frs[::2]:  # every other page: MAX_RELEASING_RANGES separate ranges
                mf.dec_ref(fr)
            await mf.wait_released()
            assert [len(step) for step in ex.release_steps()] == [MAX_RELEASING_RANGES]
            assert ex.released_ranges() == frs[::2][::-1]


async def test_a_step_out_of_time_returns_its_unpunched_ranges_to_waste(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every hop punches one range only: the rest of each step goes back to waste
    # and later steps release it; wait_released() must wait for all of it.
    monkeypatch.setattr(releaser, "STEP_SECONDS", 0.0)
    with RecordingExecutor() as ex:
        async with MemoryFile.open(opts=MemoryFileOpts(executor=ex)) as mf:
            frs = [mf.allocate(P) for _ in range(20)]
            for fr in frs[::2]:
                mf.dec_ref(fr)
            await mf.wait_released()
            mf.check_invariants()
            st = mf.stats()
            assert (st.waste_bytes, st.releasing_bytes) == (0, 0)
            assert [len(step) for step in ex.release_steps()] == [1] * 10
            assert ex.released_ranges() == frs[::2][::-1]
            assert len([c for c in ex.calls if c[0] == "punch_all"]) == 10


async def test_one_step_releasing_two_pieces_of_one_huge_page(huge_mf: MemoryFile) -> None:
    # Two waste pieces of the same huge page in one step: the second piece's
    # sub-release count must build on the first's.
    mf = huge_mf
    fr = mf.allocate(H, AllocOpts(huge=True))
    mf.dec_ref(FileRange(fr.start, fr.start + P))
    mf.dec_ref(FileRange(fr.start + 2 * P, fr.end))
    await mf.wait_released()
    assert mf.stats().subreleased_bytes == H - P
    mf.dec_ref(FileRange(fr.start + P, fr.start + 2 * P))
    await mf.wait_released()
    assert mf.stats().subreleased_bytes == 0 and mf.stats().free_bytes == CHUNK_SIZE


async def test_stats_count_each_page_once_during_a_huge_release() -> None:
    with RecordingExecutor() as ex:
        async with MemoryFile.open(opts=MemoryFileOpts(executor=ex, expect_hugepages=True)) as mf:
            fr = mf.allocate(H, AllocOpts(huge=True))
            mf.dec_ref(FileRange(fr.start, fr.start + 3 * P))
            await mf.wait_released()
            ex.gate.clear()
            mf.dec_ref(FileRange(fr.start + 3 * P, fr.end))
            while mf.stats().releasing_bytes == 0:
                await asyncio.sleep(0.001)
            st = mf.stats()
            assert st.releasing_bytes == H - 3 * P
            assert st.subreleased_bytes == 3 * P  # not yet also counted as free
            mf.check_invariants()
            ex.gate.set()
            await mf.wait_released()
            assert mf.stats().free_bytes == CHUNK_SIZE


async def test_release_gives_memory_back_to_the_host(mf: MemoryFile) -> None:
    fr = mf.allocate(8 * MiB, AllocOpts(mode=AllocationMode.COMMIT))
    assert mf.total_usage() >= 8 * MiB
    mf.dec_ref(fr)
    await mf.wait_released()
    assert mf.total_usage() == 0


async def test_failed_punch_zeroes_by_hand(mf: MemoryFile, monkeypatch: pytest.MonkeyPatch) -> None:
    from asyncpgalloc import host

    def refuse(fd: int, offset: int, length: int) -> None:
        raise OSError(5, "Input/output error")

    fr = mf.allocate(4 * P, AllocOpts(mode=AllocationMode.COMMIT))
    fill(mf, fr, 0x77)
    monkeypatch.setattr(host, "decommit", refuse)
    mf.dec_ref(fr)
    await mf.wait_released()
    # Not punched (usage stays), but the pages are free and read as zeros.
    assert mf.total_usage() >= 4 * P
    assert os.pread(mf.fd, 4 * P, fr.start) == bytes(4 * P)
    assert mf.stats().free_bytes == CHUNK_SIZE


# ------------------------------------------------------------------ accounting


async def test_waste_is_accounted_as_system_until_released(mf: MemoryFile) -> None:
    fr = mf.allocate(2 * P, AllocOpts(kind=MemoryKind.PAGE_CACHE, memcg_id=7))
    assert [(s, e, ma.kind, ma.memcg_id) for s, e, ma in mf.page_view().mem_acct] == [
        (fr.start, fr.end, MemoryKind.PAGE_CACHE, 7)
    ]
    mf.dec_ref(FileRange(fr.start, fr.start + P))
    assert [(ma.kind, ma.waste_or_releasing) for _, _, ma in mf.page_view().mem_acct] == [
        (MemoryKind.SYSTEM, True),
        (MemoryKind.PAGE_CACHE, False),
    ]
    await mf.wait_released()
    assert [(s, e) for s, e, _ in mf.page_view().mem_acct] == [(fr.start + P, fr.end)]


# ------------------------------------------------------------------- bad input


async def test_bad_lengths_raise_before_any_change(huge_mf: MemoryFile) -> None:
    mf = huge_mf
    mf.allocate(P)
    before = snapshot(mf)
    for length, opts in [
        (0, AllocOpts()),
        (-P, AllocOpts()),
        (P + 1, AllocOpts()),
        (P, AllocOpts(huge=True)),
        (H + P, AllocOpts(huge=True)),
    ]:
        with pytest.raises(InvalidLengthError) as info:
            mf.allocate(length, opts)
        assert isinstance(info.value, ValueError)
        assert snapshot(mf) == before


async def test_bad_ranges_and_reference_errors_change_nothing(mf: MemoryFile) -> None:
    fr = mf.allocate(2 * P)
    waste = mf.allocate(P)
    mf.dec_ref(waste)
    before = snapshot(mf)
    bad_ranges = [
        FileRange(0, 0),
        FileRange(P, 0),
        FileRange(1, P),
        FileRange(0, P + 1),
        FileRange(-P, P),
        FileRange(0, CHUNK_SIZE + P),
    ]
    for op in (mf.inc_ref, mf.dec_ref, mf.has_unique_ref):
        for bad in bad_ranges:
            with pytest.raises(InvalidRangeError):
                op(bad)
            assert snapshot(mf) == before
        for unreferenced in [
            waste,  # waste
            FileRange(fr.end + P, fr.end + 2 * P),  # free
            FileRange(fr.start, waste.end),  # used, then waste
        ]:
            with pytest.raises(ReferenceCountError):
                op(unreferenced)
            assert snapshot(mf) == before
    with pytest.raises(InvalidRangeError):
        mf.map_internal(FileRange(CHUNK_SIZE - P, CHUNK_SIZE + P))
    with pytest.raises(PermissionError):
        mf.map_internal(fr, AccessType.READ | AccessType.EXECUTE)
    assert snapshot(mf) == before


async def test_running_out_of_chunks_raises_out_of_memory() -> None:
    async with MemoryFile.open(opts=MemoryFileOpts(max_chunks=1)) as mf:
        mf.allocate(CHUNK_SIZE - P)
        before = snapshot(mf)
        with pytest.raises(OutOfMemoryError):
            mf.allocate(2 * P)
        assert snapshot(mf) == before
        assert os.fstat(mf.fd).st_size == CHUNK_SIZE
        assert mf.allocate(P) == FileRange(CHUNK_SIZE - P, CHUNK_SIZE)
        mf.check_invariants()


async def test_failed_commit_returns_the_pages(
    mf: MemoryFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asyncpgalloc import host

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    mf.allocate(P)
    monkeypatch.setattr(host, "commit", no_space)
    with pytest.raises(OSError) as info:
        mf.allocate(4 * P, AllocOpts(mode=AllocationMode.COMMIT))
    assert info.value.errno == 28
    st = mf.stats()
    assert st.used_bytes == P and st.waste_bytes == 4 * P  # returned, as gVisor's DecRef
    mf.check_invariants()


async def test_calls_from_another_thread_are_refused(mf: MemoryFile) -> None:
    fr = mf.allocate(P)
    errors: list[BaseException] = []

    def other() -> None:
        for call in (lambda: mf.allocate(P), lambda: mf.dec_ref(fr), lambda: mf.stats()):
            try:
                call()
            except BaseException as e:
                errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errors) == 3 and all(isinstance(e, WrongThreadError) for e in errors)
    assert mf.stats().used_bytes == P


# ------------------------------------------------------------------- lifecycle


async def test_memfd_is_close_on_exec_and_closed_on_aclose() -> None:
    mf = await MemoryFile.open()
    fd = mf.fd
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:asyncpgalloc")
    mf.allocate(P)  # still referenced at close: aclose gives it all back anyway
    await mf.aclose()
    await mf.aclose()  # idempotent
    assert mf.closed and mf.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    for call in (lambda: mf.allocate(P), lambda: mf.stats(), lambda: mf.total_usage()):
        with pytest.raises(ClosedError):
            call()
    with pytest.raises(ClosedError):
        await mf.wait_released()


async def test_views_never_dangle_after_aclose() -> None:
    mf = await MemoryFile.open()
    fr = mf.allocate(2 * P)
    (view,) = mf.map_internal(fr, AccessType.WRITE)
    await mf.aclose()
    view[0] = 0x42  # the mapping is kept alive by the view: no crash
    assert view[0] == 0x42
    del view


async def test_wait_released_wakes_up_when_the_file_closes() -> None:
    with RecordingExecutor() as ex:
        mf = await MemoryFile.open(opts=MemoryFileOpts(executor=ex))
        fr = mf.allocate(P)
        ex.gate.clear()
        mf.dec_ref(fr)
        waiter = asyncio.ensure_future(mf.wait_released())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        closing = asyncio.ensure_future(mf.aclose())
        await asyncio.sleep(0.01)
        assert not closing.done()  # the punch in flight must finish before the fd closes
        ex.gate.set()
        await closing
        with pytest.raises(ClosedError):
            await waiter


@pytest.mark.parametrize("decommit_on_destroy", [False, True])
async def test_disk_backed_file(tmp_path: Path, decommit_on_destroy: bool) -> None:
    path = tmp_path / "backing"
    opts = MemoryFileOpts(disk_backed_file=True, decommit_on_destroy=decommit_on_destroy)
    async with MemoryFile.open(path, opts) as mf:
        assert mf.is_disk_backed
        assert os.stat(path).st_mode & 0o777 == 0o600
        fr = mf.allocate(MiB, AllocOpts(mode=AllocationMode.COMMIT))
        fill(mf, fr, 1)
    blocks = os.stat(path).st_blocks
    assert (blocks == 0) == decommit_on_destroy


async def test_dump_segments_dumps_the_sets(huge_mf: MemoryFile) -> None:
    huge_mf.allocate(P)
    text = huge_mf.dump_segments()
    for name in ("unwaste_small:", "unwaste_huge:", "unfree_small:", "unfree_huge:", "mem_acct:"):
        assert name in text
    assert "[0x0, 0x1000)" in text


# ---------------------------------------------------------------- allocate_async

ASYNC_LEN = 1 * MiB  # above ASYNC_PREPARE_MIN_BYTES: the work runs in the executor


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.name)
async def test_allocate_async_gives_zeroed_pages_in_every_mode(mode: AllocationMode) -> None:
    with RecordingExecutor() as ex:
        async with MemoryFile.open(opts=MemoryFileOpts(executor=ex)) as mf:
            fr = await mf.allocate_async(ASYNC_LEN, AllocOpts(mode=mode))
            assert is_zero(mf, fr)
            fill(mf, fr, 0x33)
            mf.dec_ref(fr)
            again = await mf.allocate_async(ASYNC_LEN, AllocOpts(mode=mode))
            assert is_zero(mf, again)
            hops = [name for name, _ in ex.calls if name == "_prepare_pages"]
            assert len(hops) == (0 if mode is AllocationMode.UNCOMMITTED else 2)
            if mode is AllocationMode.COMMIT:
                assert mf.total_usage() >= ASYNC_LEN
            mf.check_invariants()


async def test_allocate_async_small_ranges_stay_inline() -> None:
    with RecordingExecutor() as ex:
        async with MemoryFile.open(opts=MemoryFileOpts(executor=ex)) as mf:
            await mf.allocate_async(4 * P, AllocOpts(mode=AllocationMode.COMMIT))
            assert not [name for name, _ in ex.calls if name == "_prepare_pages"]


async def test_allocate_async_cancelled_mid_commit_returns_the_pages() -> None:
    with RecordingExecutor() as ex:
        async with MemoryFile.open(opts=MemoryFileOpts(executor=ex)) as mf:
            keep = mf.allocate(P)
            ex.gate.clear()
            task = asyncio.ensure_future(
                mf.allocate_async(ASYNC_LEN, AllocOpts(mode=AllocationMode.COMMIT))
            )
            while not ex.started.is_set():
                await asyncio.sleep(0.001)
            task.cancel()
            await asyncio.sleep(0.01)
            assert not task.done()  # waits for the commit in flight before undoing it
            ex.gate.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            await mf.wait_released()
            st = mf.stats()
            assert st.used_bytes == P and st.waste_bytes == 0
            assert mf.has_unique_ref(keep)
            mf.check_invariants()


async def test_allocate_async_failure_returns_the_pages(
    mf: MemoryFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asyncpgalloc import host

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(host, "commit", no_space)
    with pytest.raises(OSError):
        await mf.allocate_async(ASYNC_LEN, AllocOpts(mode=AllocationMode.COMMIT))
    await mf.wait_released()
    assert mf.stats().used_bytes == 0


async def test_counters_count_what_happened(mf: MemoryFile) -> None:
    a = mf.allocate(4 * P)
    b = await mf.allocate_async(2 * P)
    mf.dec_ref(a)
    mf.dec_ref(b)
    await mf.wait_released()
    c = mf.counters()
    assert (c.allocations, c.allocated_bytes) == (2, 6 * P)
    assert c.released_bytes == 6 * P and c.release_steps >= 1
    assert (c.evictions_started, c.evict_calls, c.pressure_events) == (0, 0, 0)


async def test_aclose_waits_for_every_syscall_in_flight() -> None:
    with RecordingExecutor() as ex:
        mf = await MemoryFile.open(opts=MemoryFileOpts(executor=ex))
        fd = mf.fd
        ex.gate.clear()
        alloc = asyncio.ensure_future(
            mf.allocate_async(ASYNC_LEN, AllocOpts(mode=AllocationMode.COMMIT))
        )
        while not ex.started.is_set():
            await asyncio.sleep(0.001)
        closing = asyncio.ensure_future(mf.aclose())
        await asyncio.sleep(0.02)
        assert not closing.done()
        os.fstat(fd)  # still open: the commit in flight is using it
        ex.gate.set()
        await closing
        fr = await alloc  # the commit finished; the file closed after it
        assert fr.length == ASYNC_LEN
        with pytest.raises(OSError):
            os.fstat(fd)
