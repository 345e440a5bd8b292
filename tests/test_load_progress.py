"""Loading progress in stats() and in the Prometheus collector: bytes loaded / total,
waiters and the bytes they waited for, while an async load runs and after it."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import fill
from prometheus_client import CollectorRegistry

import asyncpgalloc.checkpoint_io as cio
import asyncpgalloc.loader as loader_mod
from asyncpgalloc import AllocationMode, AllocOpts, FileRange, MemoryFile
from asyncpgalloc.core import count_states
from asyncpgalloc.metrics import MemoryFileCollector
from asyncpgalloc.stats import load_fields

MiB = 1 << 20
COMMIT = AllocOpts(mode=AllocationMode.COMMIT)
COUNT = 6


class Held:
    """The loader's blocking job, held in its thread from the second call on."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self.calls = 0
        self.second = threading.Event()
        self.release = threading.Event()

    def __call__(self, *args: Any) -> None:
        self.calls += 1
        if self.calls >= 2:
            self.second.set()
            self.release.wait(10)
        self.fn(*args)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    got = registry.get_sample_value(name, labels)
    assert got is not None, (name, labels)
    return got


async def test_stats_and_metrics_show_the_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with MemoryFile.open() as mf:
        frs = [mf.allocate(MiB, COMMIT) for _ in range(COUNT)]
        for i, fr in enumerate(frs):
            fill(mf, fr, i + 1)
        await mf.save(tmp_path / "ckpt")
        st = mf.stats()
        assert (st.load_total_bytes, st.loaded_bytes, st.load_waiters) == (0, 0, 0)

    monkeypatch.setattr(cio, "BATCH_BLOCKS", 1)
    monkeypatch.setattr(cio, "WIDTH", 1)
    held = Held(loader_mod._read_blocks_job)
    monkeypatch.setattr(loader_mod, "_read_blocks_job", held)
    mf = await MemoryFile.load(tmp_path / "ckpt", async_pages=True)
    try:
        registry = CollectorRegistry()
        registry.register(MemoryFileCollector(mf))
        while not held.second.is_set():  # block 0 read, block 1 held in its thread
            await asyncio.sleep(0.001)
        waiter = asyncio.ensure_future(mf.wait_loaded(FileRange(frs[4].start, frs[5].end)))
        await asyncio.sleep(0)
        st = mf.stats()
        assert st.load_total_bytes == COUNT * MiB
        assert st.loaded_bytes == MiB and st.load_pending_bytes == (COUNT - 1) * MiB
        assert st.load_waiters == 1 and st.load_waited_bytes == 2 * MiB
        recount = count_states(mf.page_view())
        assert st == dataclasses.replace(recount, **load_fields(mf.load_progress()))
        mf.check_invariants()
        assert value(registry, "asyncpgalloc_load_bytes", state="total") == COUNT * MiB
        assert value(registry, "asyncpgalloc_load_bytes", state="loaded") == MiB
        assert value(registry, "asyncpgalloc_load_bytes", state="pending") == (COUNT - 1) * MiB
        assert value(registry, "asyncpgalloc_load_waiters") == 1
        assert value(registry, "asyncpgalloc_load_waited_bytes_total") == 2 * MiB
        # A page freed before its block is read: dropped.
        mf.dec_ref(frs[3])
        assert mf.stats().load_dropped_bytes == MiB
        assert value(registry, "asyncpgalloc_load_bytes", state="dropped") == MiB
        held.release.set()
        await waiter
        assert mf.stats().load_waited_bytes == 2 * MiB
        await mf.wait_loaded()
        st = mf.stats()
        assert (st.loaded_bytes, st.load_dropped_bytes, st.load_pending_bytes) == (
            (COUNT - 1) * MiB,
            MiB,
            0,
        )
        assert st.load_waiters == 0 and st.load_waited_bytes >= 2 * MiB
        assert value(registry, "asyncpgalloc_load_bytes", state="loaded") == (COUNT - 1) * MiB
        assert value(registry, "asyncpgalloc_load_waiters") == 0
        mf.check_invariants()
    finally:
        held.release.set()
        await mf.aclose()
