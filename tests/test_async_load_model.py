"""A model of async page loading: a seeded random walk per seed interleaves the loader
with allocate / inc_ref / dec_ref of whole and partial ranges / wait_loaded /
map_internal / decommit / evictions, and checks every page held against a per-page
model (its references and the byte it must read once loaded); the fault tests are in
test_async_load.py. Also: cancelling the loader task itself."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path
from typing import Any

import pytest
from helpers import fill

import asyncpgalloc.checkpoint_io as cio
from asyncpgalloc import (
    PAGE_SIZE,
    AllocationMode,
    AllocOpts,
    CheckpointError,
    DelayedEviction,
    EvictableRange,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    PagesNotLoadedError,
)

P = PAGE_SIZE
KiB = 1 << 10
COMMIT = AllocOpts(mode=AllocationMode.COMMIT)
MANUAL = MemoryFileOpts(delayed_eviction=DelayedEviction.MANUAL)
SEEDS = range(12)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def loader_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "asyncpgalloc-page-loader"]


class Model:
    """Per page: references held by the test, and the byte the page holds."""

    def __init__(self) -> None:
        self.refs: dict[int, int] = {}
        self.byte: dict[int, int] = {}

    def add(self, fr: FileRange, byte: int) -> None:
        for p in range(fr.start, fr.end, P):
            self.refs[p] = self.refs.get(p, 0) + 1
            self.byte[p] = byte

    def inc(self, fr: FileRange) -> None:
        for p in range(fr.start, fr.end, P):
            self.refs[p] += 1

    def dec(self, fr: FileRange) -> None:
        for p in range(fr.start, fr.end, P):
            self.refs[p] -= 1
            if not self.refs[p]:
                del self.refs[p]
                del self.byte[p]

    def held_runs(self) -> list[FileRange]:
        """Maximal runs of held pages with one byte."""
        runs: list[FileRange] = []
        for p in sorted(self.refs):
            if runs and runs[-1].end == p and self.byte[runs[-1].start] == self.byte[p]:
                runs[-1] = FileRange(runs[-1].start, p + P)
            else:
                runs.append(FileRange(p, p + P))
        return runs

    def check(self, mf: MemoryFile, fr: FileRange) -> None:
        data = b"".join(v.tobytes() for v in mf.map_internal(fr))
        for i, p in enumerate(range(fr.start, fr.end, P)):
            want = bytes([self.byte[p]]) * P
            assert data[i * P : (i + 1) * P] == want, f"page {p:#x}"


class Cache:
    """An evictable user holding its own reference on ranges; evict drops those inside."""

    def __init__(self, mf: MemoryFile, model: Model) -> None:
        self.mf = mf
        self.model = model
        self.ranges: list[FileRange] = []
        self.evicted = 0

    def hold(self, fr: FileRange) -> None:
        self.mf.inc_ref(fr)
        self.model.inc(fr)
        self.ranges.append(fr)
        self.mf.mark_evictable(self, EvictableRange(fr.start, fr.end))

    async def evict(self, er: EvictableRange) -> None:
        keep = []
        for fr in self.ranges:
            if er.start <= fr.start and fr.end <= er.end:
                self.mf.dec_ref(fr)
                self.model.dec(fr)
                self.evicted += 1
            else:
                keep.append(fr)
        self.ranges = keep


async def checkpoint(tmp_path: Path, rng: random.Random, model: Model) -> Path:
    """A checkpoint of allocations of mixed sizes (blocks span several), each its byte."""
    async with MemoryFile.open() as mf:
        for i in range(rng.randint(6, 14)):
            fr = mf.allocate(rng.choice([16, 64, 256, 700, 1024, 2048]) * KiB, COMMIT)
            fill(mf, fr, 1 + i)
            model.add(fr, 1 + i)
        path = tmp_path / "ckpt"
        await mf.save(path)
    return path


def sub_range(rng: random.Random, fr: FileRange) -> FileRange:
    pages = fr.length // P
    a = rng.randrange(pages)
    b = rng.randrange(a, pages) + 1
    return FileRange(fr.start + a * P, fr.start + b * P)


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_walk_while_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    rng = random.Random(seed)
    model = Model()
    path = await checkpoint(tmp_path, rng, model)
    monkeypatch.setattr(cio, "BATCH_BLOCKS", rng.choice([1, 2, 4]))
    before = fd_count()
    mf = await MemoryFile.load(path, MANUAL, async_pages=True)
    try:
        cache = Cache(mf, model)
        fresh = 100
        for _ in range(150):
            runs = model.held_runs()
            op = rng.random()
            if op < 0.15 and runs:
                fr = sub_range(rng, rng.choice(runs))
                mf.dec_ref(fr)
                model.dec(fr)
            elif op < 0.25 and runs:
                fr = sub_range(rng, rng.choice(runs))
                mf.inc_ref(fr)
                model.inc(fr)
            elif op < 0.35:
                fr = mf.allocate(rng.choice([1, 3, 64]) * P, COMMIT)
                fresh = fresh % 150 + 101
                assert b"".join(v.tobytes() for v in mf.map_internal(fr)) == bytes(fr.length)
                fill(mf, fr, fresh)
                model.add(fr, fresh)
            elif op < 0.55 and runs:
                fr = sub_range(rng, rng.choice(runs))
                await mf.wait_loaded(fr)
                model.check(mf, fr)
            elif op < 0.65 and runs:
                fr = sub_range(rng, rng.choice(runs))
                try:
                    model.check(mf, fr)  # loaded already: its bytes
                except PagesNotLoadedError as e:
                    assert fr.start <= e.range.start < e.range.end <= fr.end
            elif op < 0.72 and runs:
                cache.hold(sub_range(rng, rng.choice(runs)))
            elif op < 0.76:
                if mf.start_evictions():
                    await mf.wait_for_evictions()
            elif op < 0.8 and runs:
                fr = sub_range(rng, rng.choice(runs))
                await mf.decommit(fr)  # waits for its block: then zeros
                for p in range(fr.start, fr.end, P):
                    model.byte[p] = 0
            else:
                await asyncio.sleep(0)
            mf.check_invariants()
        await mf.wait_loaded()
        for fr in model.held_runs():
            model.check(mf, fr)
        progress = mf.load_progress()
        assert progress is not None and progress.done and progress.error is None
        assert progress.loaded_bytes + progress.dropped_bytes == progress.total_bytes
        assert progress.pending_bytes == 0
        assert not loader_tasks()
        mf.check_invariants(check_zero_pages=True)
    finally:
        await mf.aclose()
    assert fd_count() == before


async def test_cancelling_the_loader_task_fails_every_waiter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loader task cancelled by someone else (not aclose): every waiter gets the
    same CheckpointError, its fds and threads are gone, the file stays usable."""
    monkeypatch.setattr(cio, "BATCH_BLOCKS", 1)
    model = Model()
    path = await checkpoint(tmp_path, random.Random(99), model)
    before = fd_count()
    async with await MemoryFile.load(path, async_pages=True) as mf:
        runs = model.held_runs()
        waiters = [asyncio.ensure_future(mf.wait_loaded(fr)) for fr in runs[-3:]]
        waiters.append(asyncio.ensure_future(mf.wait_loaded()))
        await asyncio.sleep(0)
        (task,) = loader_tasks()
        task.cancel()
        errors = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(e, CheckpointError) for e in errors), errors
        assert len({id(e) for e in errors}) == 1 and "cancelled" in str(errors[0])
        assert not loader_tasks()
        assert fd_count() == before + 1  # the memory file's own fd
        with pytest.raises(CheckpointError):
            mf.map_internal(runs[-1])
        fr = mf.allocate(4 * P)
        assert b"".join(v.tobytes() for v in mf.map_internal(fr)) == bytes(4 * P)
        mf.check_invariants()
    assert fd_count() == before
