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
import contextlib
import dataclasses
import os
import random
import resource
import struct
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiofiles
import pytest
from helpers import checkpoint_bytes, checkpoint_parts, fill

import asyncpgalloc.checkpoint as checkpoint
import asyncpgalloc.checkpoint_inspect as checkpoint_inspect
from asyncpgalloc import (
    CHUNK_SIZE,
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    AccessType,
    AllocOpts,
    CheckpointError,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
)
from asyncpgalloc.checkpoint_format import (
    MAX_CHUNKS_LOADABLE,
    TRAILER_SIZE,
    Header,
    Snapshot,
    decode_metadata,
    encode_metadata,
    released,
)
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
        mf.map_internal(fr, AccessType.WRITE)[0][0] = 0xEE
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
        for view in mf.map_internal(keep, AccessType.WRITE):
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
            loaded.check_invariants(check_zero_pages=True)
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


# ------------------------------------------------------------------ checkpoint fuzz

U32_VALUES = (0, 1, 2, P - 1, P, P + 1, 2**31, 2**32 - 1)
U64_VALUES = (*U32_VALUES, 2**32, H, 1 << 30, 2**63 - 1, 2**63, 2**64 - P, 2**64 - 1)
#: Fewer per metadata word (there are dozens), with the word's neighbours added.
WORD_VALUES = (0, 1, P - 1, 2**32 - 1, 2**32, 2**63, 2**64 - P, 2**64 - 1)
#: Header fields a forger may set (the magic and header size are checked before the CRC).
HEADER_FIELDS = {
    "version": U32_VALUES,
    "flags": U32_VALUES,
    "page_size": U32_VALUES,
    "huge_page_size": U32_VALUES,
    "block_size": U32_VALUES,
    "chunk_size": U64_VALUES,
    "file_size": U64_VALUES,
    "metadata_length": U64_VALUES,
    "data_length": U64_VALUES,
    "metadata_crc": U32_VALUES,
}
#: Python heap a load may use whatever the file says: the 16 MiB read pieces, a batch
#: of small objects. A forged length of up to 2**64 - 1 must never be allocated.
HEAP_BOUND = 48 << 20


class Loads:
    """Loads checkpoint bytes from one source and checks how each load ends.

    Every load either raises CheckpointError or gives a sound file (its invariants,
    free pages zero), within a generous hang-catching timeout; afterwards no fd is
    open that was not before, and no task is left pending.
    """

    def __init__(self, path: Path, source: str, *, inspect: bool = True) -> None:
        self.path = path
        self.source = source
        self.inspect = inspect and source == "path"
        self.refused = 0
        self.loaded = 0

    async def __call__(self, raw: bytes) -> bool:
        """True if ``raw`` loaded."""
        self.path.write_bytes(raw)
        fds = sorted(os.listdir("/proc/self/fd"))
        if self.inspect:
            # The other parser of the same bytes (``python -m asyncpgalloc inspect``).
            with contextlib.suppress(CheckpointError):
                checkpoint_inspect.describe_checkpoint(str(self.path))
        tasks = asyncio.all_tasks()
        mf: MemoryFile | None = None
        try:
            if self.source == "path":
                mf = await asyncio.wait_for(MemoryFile.load(self.path), 10)
            else:
                async with aiofiles.open(self.path, "rb") as f:
                    mf = await asyncio.wait_for(MemoryFile.load(f), 10)
        except CheckpointError:
            self.refused += 1
        if mf is not None:
            self.loaded += 1
            try:
                mf.check_invariants(check_zero_pages=True)
                # What loads can be used and saved (and the save is as sound).
                fr = mf.allocate(P)
                assert os.pread(mf.fd, P, fr.start) == bytes(P)
                await mf.save(self.path.with_suffix(".again"))
                with contextlib.suppress(CheckpointError):
                    # A forged commit sequence just under the bound is past it now.
                    again = await MemoryFile.load(self.path.with_suffix(".again"))
                    again.check_invariants(check_zero_pages=True)
                    await again.aclose()
            finally:
                await mf.aclose()
        assert sorted(os.listdir("/proc/self/fd")) == fds, "a load leaked an fd"
        assert asyncio.all_tasks() == tasks, "a load left a task pending"
        return mf is not None


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small checkpoint with something in every list: a small and a huge chunk, shared
    and untouched pages, several kinds and memcgs, sub-released pages; one page of data."""
    directory = tmp_path_factory.mktemp("fuzz")

    async def make() -> bytes:
        async with MemoryFile.open(opts=MemoryFileOpts(expect_hugepages=True)) as mf:
            a = mf.allocate(3 * P, AllocOpts(kind=MemoryKind.ANONYMOUS, memcg_id=1))
            mf.inc_ref(FileRange(a.start + P, a.start + 2 * P))
            mf.allocate(2 * P, AllocOpts(kind=MemoryKind.PAGE_CACHE, memcg_id=2))
            h = mf.allocate(2 * H, AllocOpts(huge=True, kind=MemoryKind.TMPFS))
            mf.dec_ref(FileRange(h.start + 4 * P, h.start + 6 * P))
            await mf.wait_released()
            (view,) = mf.map_internal(FileRange(a.start, a.start + P), AccessType.WRITE)
            view[:] = b"fuzz" * (P // 4)
            await mf.save(directory / "small")
        return (directory / "small").read_bytes()

    raw = asyncio.run(make())
    header, _, _ = checkpoint_parts(raw)
    snap = parse(raw)
    assert header.data_length == P and snap.subreleased and snap.unfree_huge
    return raw


def parse(raw: bytes) -> Snapshot:
    header, meta, _ = checkpoint_parts(raw)
    return decode_metadata(header, meta)


SOURCES = ["path", "aiofiles"]


@pytest.mark.parametrize("source", SOURCES)
async def test_truncation_at_every_offset(
    small_checkpoint: bytes, tmp_path: Path, source: str
) -> None:
    raw = small_checkpoint
    header, _, _ = checkpoint_parts(raw)
    # describe_checkpoint's truncation checks are cheap and tested in test_checkpoint.
    load = Loads(tmp_path / "cut", source, inspect=False)
    cuts: Sequence[int] = range(len(raw))
    if source == "aiofiles":
        # Each cut inside the page data builds a file and takes the same path (a short
        # readinto); every 64th of them keeps this test's time reasonable.
        data = range(header.data_offset + 1, len(raw) - TRAILER_SIZE - 4)
        cuts = [c for c in cuts if c not in data or c % 64 == 0]
    for cut in cuts:
        assert not await load(raw[:cut])
    if source == "path":  # a stream is read up to the checkpoint's end, no further
        assert not await load(raw + b"\0")
    assert await load(raw)


@pytest.mark.parametrize("source", SOURCES)
async def test_random_bit_flips(small_checkpoint: bytes, tmp_path: Path, source: str) -> None:
    raw = small_checkpoint
    load = Loads(tmp_path / "flip", source)
    rng = random.Random(18)
    for _ in range(400):
        bad = bytearray(raw)
        for _ in range(rng.choice((1, 1, 1, 2, 8))):
            bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        # Only a CRC-32C collision could load (odds ~2**-32 per try).
        assert bytes(bad) == raw or not await load(bytes(bad))


@pytest.mark.parametrize("source", SOURCES)
async def test_forged_header_fields_with_valid_checksums(
    small_checkpoint: bytes, tmp_path: Path, source: str
) -> None:
    header, meta, data = checkpoint_parts(small_checkpoint)
    load = Loads(tmp_path / "forged", source)
    loaded = set()
    tracemalloc.start()
    try:
        for name, values in HEADER_FIELDS.items():
            for value in values:
                if value == getattr(header, name):
                    continue
                tracemalloc.reset_peak()
                if await load(checkpoint_bytes(header, meta, data, **{name: value})):
                    loaded.add((name, value))
                peak = tracemalloc.get_traced_memory()[1]
                assert peak < HEAP_BOUND, f"{name}={value:#x}: {peak} bytes of heap"
    finally:
        tracemalloc.stop()
    # The only other valid values: the zero-pages-excluded flag, a one-page block.
    assert loaded == {("flags", 1), ("block_size", P)}


#: Words at the start of the metadata: commit sequence, known bytes, chunk and list counts.
COUNT_WORDS = 9


def maxrss() -> int:
    """This process's peak resident set so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _words(meta: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(meta) // 8}Q", meta))


def _pack(words: list[int]) -> bytes:
    return struct.pack(f"<{len(words)}Q", *words)


@pytest.mark.parametrize("source", SOURCES)
async def test_forged_metadata_words_with_valid_checksums(
    small_checkpoint: bytes, tmp_path: Path, source: str
) -> None:
    """Every metadata word (counts, segment bounds, reference counts, memcg ids,
    commit sequences, accounting states, sub-release entries, chunk flags) set to
    values up to 2**64 - 1: refused, or (a memcg id, say) loaded as a sound file."""
    header, meta, data = checkpoint_parts(small_checkpoint)
    words = _words(meta)
    load = Loads(tmp_path / "forged", source)
    rss = maxrss()
    for i, orig in enumerate(words):
        values = {*WORD_VALUES, orig + P, max(orig - P, 0), orig ^ 1, orig ^ (1 << 9)}
        # The first words are the sequence, byte and list counts: those could make
        # a parser allocate, so their heap is traced (tracing all costs ~10x the time).
        traced = i < COUNT_WORDS
        if traced:
            tracemalloc.start()
        try:
            for value in sorted(values - {orig}):
                if value >= 2**64:
                    continue
                forged = [*words[:i], value, *words[i + 1 :]]
                if traced:
                    tracemalloc.reset_peak()
                await load(checkpoint_bytes(header, _pack(forged), data))
                if traced:
                    peak = tracemalloc.get_traced_memory()[1]
                    assert peak < HEAP_BOUND, f"word {i}={value:#x}: {peak} bytes of heap"
        finally:
            if traced:
                tracemalloc.stop()
    assert maxrss() - rss < HEAP_BOUND
    assert load.refused > load.loaded


def _lists(snap: Snapshot) -> dict[str, list[Any]]:
    names = ("unwaste_small", "unwaste_huge", "unfree_small", "unfree_huge", "mem_acct")
    return {n: list(getattr(snap, n)) for n in (*names, "subreleased")}


def _with(snap: Snapshot, name: str, value: Any) -> Snapshot:
    """``snap`` with its field ``name`` replaced (any value: these are forgeries)."""
    return dataclasses.replace(snap, **{name: value})


def _structural_forgeries(snap: Snapshot) -> Iterator[tuple[str, Snapshot]]:
    """Whole-entry changes that keep the counts and the metadata length consistent."""
    for name, entries in _lists(snap).items():
        if entries:
            yield f"{name}: reversed", _with(snap, name, entries[::-1])
            yield f"{name}: doubled", _with(snap, name, entries + entries)
            yield f"{name}: emptied", _with(snap, name, [])
            first = entries[0]
            empty = (first[0], first[0], *first[2:])
            yield f"{name}: empty entry", _with(snap, name, [empty, *entries])
            inverted = (first[1], first[0], *first[2:])
            yield f"{name}: inverted", _with(snap, name, [inverted, *entries[1:]])
            wide = (first[0], first[1] + P, *first[2:])
            yield f"{name}: overlapping", _with(snap, name, [wide, *entries[1:]])
            top = (2**64 - 2 * P, 2**64 - P, *first[2:])
            yield f"{name}: at 2**64", _with(snap, name, [*entries, top])
    for refs in (0, 2**63 - 1, 2**63, 2**64 - 1):
        for name in ("unfree_small", "unfree_huge"):
            entries = [(s, e, refs) for s, e, _ in getattr(snap, name)]
            yield f"{name}: refs {refs}", _with(snap, name, entries)
    for info in (0x7, 0xFF, 0x1FF, 1 << 9, 1 << 10, 2**64 - 1):
        entries = [(s, e, m, q, info) for s, e, m, q, _ in snap.mem_acct]
        yield f"mem_acct: info {info:#x}", dataclasses.replace(snap, mem_acct=entries)
    for n in (0, 1, 511, 512, 2**64 - 1):
        offsets = [o for o, _ in snap.subreleased] + [0, 2**64 - H]
        for off in offsets:
            yield f"subreleased {off:#x}: {n}", dataclasses.replace(snap, subreleased=[(off, n)])
    for flags in (b"", b"\x01", b"\x00" * 3, b"\x02\x00", b"\xff\xff"):
        yield f"chunk flags {flags!r}", dataclasses.replace(snap, chunk_huge=flags)


@pytest.mark.parametrize("source", SOURCES)
async def test_forged_segments_with_valid_checksums(
    small_checkpoint: bytes, tmp_path: Path, source: str
) -> None:
    """Unsorted, overlapping, empty, inverted and out-of-file segments, reference counts
    0 or huge, bad accounting states and sub-release entries, in metadata whose counts
    and length are consistent, so only the relations between the sets can refuse it."""
    header, _, data = checkpoint_parts(small_checkpoint)
    snap = parse(small_checkpoint)
    load = Loads(tmp_path / "forged", source)
    rss = maxrss()
    for what, forged in _structural_forgeries(snap):
        if forged == snap:
            continue  # e.g. a one-entry list reversed
        size = dataclasses.replace(header, file_size=forged.file_size)
        assert not await load(checkpoint_bytes(size, encode_metadata(forged), data)), what
    assert maxrss() - rss < HEAP_BOUND


@pytest.mark.parametrize("seq", [2**63, 2**64 - 1])
async def test_a_commit_sequence_that_could_not_advance_is_refused(
    small_checkpoint: bytes, tmp_path: Path, seq: int
) -> None:
    """Found by the fuzz: a file loaded with commit sequence 2**64 - 1 could never be
    saved (the save's scan advances the sequence past what a u64 holds). A real file
    adds one per scan or decommit and never gets near 2**63."""
    header, meta, data = checkpoint_parts(small_checkpoint)
    words = _words(meta)
    words[0] = seq
    (tmp_path / "ck").write_bytes(checkpoint_bytes(header, _pack(words), data))
    with pytest.raises(CheckpointError, match="commit sequence"):
        await MemoryFile.load(tmp_path / "ck")


def max_map_count() -> int:
    return int(Path("/proc/sys/vm/max_map_count").read_text())


async def test_more_chunks_than_this_process_can_map_is_a_checkpoint_error(
    small_checkpoint: bytes, tmp_path: Path
) -> None:
    """Found by the fuzz: consistent metadata for more chunks than vm.max_map_count (or
    the address space) lets this process map made load raise OSError(ENOMEM)."""
    chunks = min(max_map_count() + 1, MAX_CHUNKS_LOADABLE)
    header, _, data = checkpoint_parts(small_checkpoint)
    snap = parse(small_checkpoint)
    size = chunks * CHUNK_SIZE
    big = dataclasses.replace(
        snap,
        chunk_huge=snap.chunk_huge + bytes(chunks - len(snap.chunk_huge)),
        unwaste_small=[(0, size)],
        unwaste_huge=[(0, size)],
        # The new small chunks are void in the huge set, free in the small one.
        unfree_huge=[*snap.unfree_huge, (snap.file_size, size, 0)],
    )
    forged = checkpoint_bytes(
        dataclasses.replace(header, file_size=size), encode_metadata(big), data
    )
    load = Loads(tmp_path / "big", "path")
    assert not await load(forged)
