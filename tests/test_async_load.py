"""MemoryFile.load(..., async_pages=True): the loader task, wait_loaded, waste dropped from
the load, and every way a load can fail (each waiter told, nothing leaked)."""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiofiles
import pytest
from helpers import fill

import asyncpgalloc.checkpoint_io as cio
import asyncpgalloc.loader as loader_mod
from asyncpgalloc import (
    PAGE_SIZE,
    AllocationMode,
    AllocOpts,
    CheckpointError,
    FileRange,
    MemoryFile,
    PagesNotLoadedError,
)
from asyncpgalloc.checkpoint_format import Header, block_seed
from asyncpgalloc.checkpoint_format import crc as checkpoint_crc

P = PAGE_SIZE
MiB = 1 << 20
COMMIT = AllocOpts(mode=AllocationMode.COMMIT)
#: Allocations in the checkpoint: 12 of 1 MiB (one data block each, with 1 MiB blocks).
COUNT = 12


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def loader_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "asyncpgalloc-page-loader"]


def expect(mf: MemoryFile, fr: FileRange, byte: int) -> None:
    data = b"".join(v.tobytes() for v in mf.map_internal(fr))
    assert data == bytes([byte]) * fr.length, f"{fr} does not hold byte {byte}"


class Gate:
    """Wraps the loader's blocking job: records each batch's block numbers and wanted
    ranges; from the ``nth`` call on, each waits in its thread until ``release`` is set."""

    def __init__(self, fn: Callable[..., None], nth: int = 1) -> None:
        self.fn = fn
        self.nth = nth
        self.batches: list[list[int]] = []
        self.written: list[tuple[int, int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, *args: Any) -> None:
        batch = args[4]
        self.batches.append([block.number for block, _ in batch])
        for _, parts in batch:
            self.written += [(s, s + n) for s, n, wanted in parts if wanted]
        if len(self.batches) >= self.nth:
            self.entered.set()
            self.release.wait(10)
        self.fn(*args)

    async def wait_entered(self) -> None:
        while not self.entered.is_set():
            await asyncio.sleep(0.001)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    """One block per job, and a gate on the first job."""
    monkeypatch.setattr(cio, "BATCH_BLOCKS", 1)
    g = Gate(loader_mod._read_blocks_job)
    monkeypatch.setattr(loader_mod, "_read_blocks_job", g)
    return g


@pytest.fixture
async def saved(tmp_path: Path) -> tuple[Path, list[FileRange]]:
    """A checkpoint of COUNT committed 1 MiB allocations, allocation i filled with i + 1."""
    async with MemoryFile.open() as mf:
        frs = [mf.allocate(MiB, COMMIT) for _ in range(COUNT)]
        for i, fr in enumerate(frs):
            fill(mf, fr, i + 1)
        path = tmp_path / "ckpt"
        await mf.save(path)
    return path, frs


async def test_load_returns_before_the_pages_are_in(
    saved: tuple[Path, list[FileRange]],
) -> None:
    path, frs = saved
    mf = await MemoryFile.load(path, async_pages=True)
    try:
        # No await since load returned: the loader has not finished one block.
        progress = mf.load_progress()
        assert progress is not None and not progress.done
        assert progress.total_bytes == progress.pending_bytes == COUNT * MiB
        with pytest.raises(PagesNotLoadedError) as info:
            mf.map_internal(frs[3])
        assert info.value.range == frs[3]
        # The allocator is usable at once.
        fresh = mf.allocate(4 * P)
        assert mf.stats().used_bytes == COUNT * MiB + 4 * P
        mf.check_invariants()
        await mf.wait_loaded(frs[5])
        expect(mf, frs[5], 6)
        await mf.wait_loaded()
        for i, fr in enumerate(frs):
            expect(mf, fr, i + 1)
        progress = mf.load_progress()
        assert progress is not None and progress.done and progress.error is None
        assert progress.loaded_bytes == COUNT * MiB and progress.pending_bytes == 0
        assert not loader_tasks()
        mf.dec_ref(fresh)
        mf.check_invariants(check_zero_pages=True)
    finally:
        await mf.aclose()


async def test_synchronous_load_is_unchanged(saved: tuple[Path, list[FileRange]]) -> None:
    path, frs = saved
    async with await MemoryFile.load(path) as mf:
        assert mf.load_progress() is None
        await mf.wait_loaded()  # nothing to wait for
        for i, fr in enumerate(frs):
            expect(mf, fr, i + 1)


async def test_wait_loaded_moves_its_range_to_the_front(
    saved: tuple[Path, list[FileRange]], gate: Gate
) -> None:
    path, frs = saved
    async with await MemoryFile.load(path, async_pages=True) as mf:
        await gate.wait_entered()  # blocks 0 and 1 are being read
        while len(gate.batches) < 2:
            await asyncio.sleep(0.001)
        waiter = asyncio.create_task(mf.wait_loaded(frs[-1]))
        await asyncio.sleep(0)
        p = mf.load_progress()
        assert p is not None and p.waiters == 1 and p.waited_bytes == MiB
        gate.release.set()
        await waiter
        # The awaited block went right after the two in flight.
        assert gate.batches[:3] == [[0], [1], [COUNT - 1]]
        expect(mf, frs[-1], COUNT)
        await mf.wait_loaded()
        for i, fr in enumerate(frs):
            expect(mf, fr, i + 1)


async def test_waste_is_dropped_from_the_load(
    saved: tuple[Path, list[FileRange]], gate: Gate
) -> None:
    path, frs = saved
    gate.release.set()
    async with await MemoryFile.load(path, async_pages=True) as mf:
        dropped = frs[1::2]
        for fr in dropped:  # before the loader started a block
            mf.dec_ref(fr)
        await mf.wait_loaded()
        p = mf.load_progress()
        assert p is not None and p.dropped_bytes == len(dropped) * MiB
        assert p.loaded_bytes == (COUNT - len(dropped)) * MiB
        # Never written: no wanted range of any read touches a dropped page.
        for s, e in gate.written:
            assert not any(s < fr.end and fr.start < e for fr in dropped)
        for i, fr in enumerate(frs):
            if fr not in dropped:
                expect(mf, fr, i + 1)
        await mf.wait_released()
        mf.check_invariants(check_zero_pages=True)


async def test_pages_being_read_cannot_be_released_meanwhile(
    saved: tuple[Path, list[FileRange]], gate: Gate
) -> None:
    path, frs = saved
    async with await MemoryFile.load(path, async_pages=True) as mf:
        await gate.wait_entered()  # block 0 (frs[0]) is being read
        mf.dec_ref(frs[0])
        await mf.wait_released()  # the read holds a reference: nothing to release yet
        assert mf.stats().used_bytes == COUNT * MiB
        gate.release.set()
        await mf.wait_loaded()
        await mf.wait_released()
        assert mf.stats().used_bytes == (COUNT - 1) * MiB
        # Released after the read: the free pages read zero.
        mf.check_invariants(check_zero_pages=True)


def read_header(path: Path) -> Header:
    with open(path, "rb") as f:
        return Header.unpack(f.read(512))


def damage(path: Path, block: int) -> None:
    with open(path, "r+b") as f:
        header = Header.unpack(f.read(512))
        f.seek(header.data_offset + block * (header.block_size + 4) + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


async def test_a_damaged_block_fails_every_waiter(
    saved: tuple[Path, list[FileRange]], gate: Gate
) -> None:
    path, frs = saved
    damage(path, 6)
    before = fd_count()
    mf = await MemoryFile.load(path, async_pages=True)
    try:
        await gate.wait_entered()
        waiters = [
            asyncio.create_task(mf.wait_loaded()),
            asyncio.create_task(mf.wait_loaded(FileRange(frs[5].start, frs[7].end))),
            asyncio.create_task(mf.wait_loaded(frs[6])),
        ]
        await asyncio.sleep(0)
        gate.release.set()
        errors = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(e, CheckpointError) for e in errors)
        assert errors[0] is errors[1] is errors[2]
        assert "block 6 checksum mismatch" in str(errors[0])
        # Later waiters get it too; the bad block's pages are never readable.
        with pytest.raises(CheckpointError) as info:
            await mf.wait_loaded(frs[7])
        assert info.value is errors[0]
        with pytest.raises(CheckpointError):
            mf.map_internal(frs[6])
        with pytest.raises(CheckpointError):
            await mf.save(path.with_name("again"))
        expect(mf, frs[0], 1)  # loaded before the damage
        p = mf.load_progress()
        assert p is not None and p.done and p.error is not None
        assert not loader_tasks()
        mf.check_invariants()
        assert fd_count() == before + 1  # the memory file's own fd, no more
    finally:
        await mf.aclose()
    assert fd_count() == before


class Peek:
    """Wraps the loader's blocking job: after each job (passed or failed), reads one
    range of the memory file through the job's own fd (``pread``: what a guest mapping
    the file would see there, faulting or not) and keeps every distinct byte value."""

    def __init__(self, fn: Callable[..., None], fr: FileRange) -> None:
        self.fn = fn
        self.fr = fr
        self.seen: set[int] = set()
        self.jobs = 0

    def __call__(self, *args: Any) -> None:
        try:
            self.fn(*args)
        finally:
            self.jobs += 1
            self.seen |= set(os.pread(args[1], self.fr.length, self.fr.start))


async def test_a_damaged_blocks_bytes_never_reach_the_memory_file(
    saved: tuple[Path, list[FileRange]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19: a guest mapping the memfd takes no fault on a page once it is in the
    page cache, so the loader must write a block only after its CRC passed. The damaged
    block's range reads zeros (a hole) right after its job failed and, from a thread
    reading it in a tight loop, at every moment of the load; the load fails as before."""
    path, frs = saved
    damage(path, 6)
    monkeypatch.setattr(cio, "BATCH_BLOCKS", 1)
    peek = Peek(loader_mod._read_blocks_job, frs[6])
    monkeypatch.setattr(loader_mod, "_read_blocks_job", peek)
    async with await MemoryFile.load(path, async_pages=True) as mf:
        fd = cio.reopen(mf.fd, os.O_RDONLY)
        stop = threading.Event()
        spied: set[int] = set()
        reads = 0

        def spy() -> None:
            nonlocal reads
            while not stop.is_set():
                spied.update(os.pread(fd, frs[6].length, frs[6].start))
                reads += 1

        spy_thread = threading.Thread(target=spy)
        spy_thread.start()
        try:
            with pytest.raises(CheckpointError, match="block 6 checksum mismatch"):
                await mf.wait_loaded()
        finally:
            stop.set()
            spy_thread.join()
            os.close(fd)
        assert peek.jobs and reads
        assert peek.seen == {0}, "the damaged block's bytes were written before its CRC"
        assert spied == {0}, "a reader saw the damaged block's bytes"
        with pytest.raises(CheckpointError):
            mf.map_internal(frs[6])
        expect(mf, frs[0], 1)  # the blocks before it landed whole
        mf.check_invariants()


async def test_a_write_into_the_file_while_a_block_is_checked_does_not_fail_it(
    saved: tuple[Path, list[FileRange]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19: the CRC covers the checkpoint's bytes, not what the memory file holds
    while it is computed: a write into block 6's pages during its check (a guest
    writing a page it sees) cannot make the good block fail. The writer runs from the
    CRC itself, so it lands inside the check whatever the loader's order of work."""
    path, frs = saved
    monkeypatch.setattr(cio, "BATCH_BLOCKS", 1)
    real_crc = checkpoint_crc
    fds: list[int] = []
    hits = 0

    def crc(data: Any, seed: int) -> int:
        nonlocal hits
        if fds and seed == block_seed(header.crc, 6):
            hits += 1
            os.pwrite(fds[0], b"\xaa" * P, frs[6].start)
        return real_crc(data, seed)

    header = read_header(path)
    async with await MemoryFile.load(path, async_pages=True) as mf:
        fds.append(cio.reopen(mf.fd, os.O_WRONLY))
        monkeypatch.setattr(loader_mod, "crc32c", crc)
        try:
            await mf.wait_loaded()
        finally:
            os.close(fds.pop())
        assert hits
        expect(mf, frs[6], 7)  # the checkpoint's bytes: the loader's write came last
        expect(mf, frs[11], 12)


async def test_a_read_error_fails_every_waiter(
    saved: tuple[Path, list[FileRange]], gate: Gate
) -> None:
    path, frs = saved
    before = fd_count()
    async with await MemoryFile.load(path, async_pages=True) as mf:
        await gate.wait_entered()
        os.truncate(path, path.stat().st_size // 2)  # the source fails under the loader
        waiters = [asyncio.create_task(mf.wait_loaded(fr)) for fr in frs[-3:]]
        await asyncio.sleep(0)
        gate.release.set()
        errors = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(e, CheckpointError) for e in errors)
        assert errors[0] is errors[1] is errors[2]
        assert "truncated" in str(errors[0])
        with pytest.raises(CheckpointError):
            mf.map_internal(frs[-1])
        expect(mf, frs[0], 1)
        mf.check_invariants()
    assert fd_count() == before
    assert not loader_tasks()


async def test_aclose_mid_load_fails_waiters_and_leaks_nothing(
    saved: tuple[Path, list[FileRange]], gate: Gate
) -> None:
    path, _ = saved
    before = fd_count()
    mf = await MemoryFile.load(path, async_pages=True)
    await gate.wait_entered()
    waiter = asyncio.create_task(mf.wait_loaded())
    closing = asyncio.create_task(mf.aclose())
    await asyncio.sleep(0.01)
    assert not closing.done()  # it waits for the read in its thread
    gate.release.set()
    await closing
    with pytest.raises(CheckpointError, match="cancelled"):
        await waiter
    assert not loader_tasks()
    assert fd_count() == before


async def test_cancelling_a_waiter_leaves_the_load_running(
    saved: tuple[Path, list[FileRange]], gate: Gate
) -> None:
    path, frs = saved
    async with await MemoryFile.load(path, async_pages=True) as mf:
        await gate.wait_entered()
        waiter = asyncio.create_task(mf.wait_loaded(frs[4]))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        p = mf.load_progress()
        assert p is not None and p.waiters == 0
        gate.release.set()
        await mf.wait_loaded()
        for i, fr in enumerate(frs):
            expect(mf, fr, i + 1)


async def test_decommit_waits_for_its_pages(saved: tuple[Path, list[FileRange]]) -> None:
    path, frs = saved
    async with await MemoryFile.load(path, async_pages=True) as mf:
        await mf.decommit(frs[2])  # its block must not land after the punch
        await mf.wait_loaded()
        assert b"".join(v.tobytes() for v in mf.map_internal(frs[2])) == bytes(MiB)
        expect(mf, frs[3], 4)
        mf.check_invariants()


async def test_save_waits_for_the_load(saved: tuple[Path, list[FileRange]], tmp_path: Path) -> None:
    path, frs = saved
    async with await MemoryFile.load(path, async_pages=True) as mf:
        await mf.save(tmp_path / "again")
        p = mf.load_progress()
        assert p is not None and p.done
    async with await MemoryFile.load(tmp_path / "again") as again:
        for i, fr in enumerate(frs):
            expect(again, fr, i + 1)


async def test_a_stream_source_is_refused(saved: tuple[Path, list[FileRange]]) -> None:
    path, _ = saved
    async with aiofiles.open(path, "rb") as f:
        with pytest.raises(TypeError, match="must be a path"):
            await MemoryFile.load(f, async_pages=True)


async def test_a_callers_file_is_committed_before_it_is_written(
    saved: tuple[Path, list[FileRange]], tmp_path: Path
) -> None:
    path, frs = saved
    async with await MemoryFile.load(path, file=tmp_path / "backing", async_pages=True) as mf:
        await mf.wait_loaded()
        for i, fr in enumerate(frs):
            expect(mf, fr, i + 1)
        mf.check_invariants()


async def test_model_interleaves_loading_with_the_allocator(
    saved: tuple[Path, list[FileRange]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random allocate / dec_ref / inc_ref / wait_loaded / yields while pages stream in;
    every page still held reads its bytes once loaded, every fresh page reads zero."""
    monkeypatch.setattr(cio, "BATCH_BLOCKS", 1)
    path, frs = saved
    rng = random.Random(14)
    async with await MemoryFile.load(path, async_pages=True) as mf:
        held: dict[FileRange, int] = {fr: i + 1 for i, fr in enumerate(frs)}
        refs: dict[FileRange, int] = dict.fromkeys(frs, 1)
        fresh: list[FileRange] = []
        for _ in range(200):
            op = rng.random()
            if op < 0.2 and held:
                fr = rng.choice(list(held))
                refs[fr] -= 1
                mf.dec_ref(fr)
                if not refs[fr]:
                    del held[fr]
            elif op < 0.3 and held:
                fr = rng.choice(list(held))
                mf.inc_ref(fr)
                refs[fr] += 1
            elif op < 0.5:
                fresh.append(mf.allocate(rng.choice([1, 4, 64]) * P, COMMIT))
            elif op < 0.7 and held:
                fr = rng.choice(list(held))
                await mf.wait_loaded(fr)
                expect(mf, fr, held[fr])
            else:
                await asyncio.sleep(0)
            mf.check_invariants()
        await mf.wait_loaded()
        for fr, byte in held.items():
            expect(mf, fr, byte)
        for fr in fresh:
            assert b"".join(v.tobytes() for v in mf.map_internal(fr)) == bytes(fr.length)
        p = mf.load_progress()
        assert p is not None and p.loaded_bytes + p.dropped_bytes == p.total_bytes
        mf.check_invariants(check_zero_pages=True)


def test_cli_restore_loads_checks_and_summarizes(
    saved: tuple[Path, list[FileRange]], capsys: pytest.CaptureFixture[str]
) -> None:
    from asyncpgalloc import __main__ as cli

    path, _ = saved
    assert cli.main(["restore", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{COUNT} MiB used" in out and "checksums and invariants OK" in out
    damage(path, 3)
    assert cli.main(["restore", str(path), "--no-progress"]) == 1
    assert "block 3 checksum mismatch" in capsys.readouterr().err


def test_a_loop_that_ends_mid_load_leaks_no_fd(
    saved: tuple[Path, list[FileRange]], gate: Gate
) -> None:
    """asyncio.run() ending with the load still running (never closed): the file is
    abandoned with a ResourceWarning, and the loader's fds go with it."""
    path, _ = saved
    before = fd_count()
    kept: list[MemoryFile] = []

    async def main() -> None:
        kept.append(await MemoryFile.load(path, async_pages=True))
        await gate.wait_entered()
        gate.release.set()

    with pytest.warns(ResourceWarning, match="unclosed MemoryFile"):
        asyncio.run(main())
    assert kept[0].closed
    assert fd_count() == before
