"""A pages file shared by several checkpoints: saves of several files (also at once) into
one pages file and back, sync and async; the wrong pages file, a wrong offset, a
truncated or damaged pages file, each refused or failing every waiter, nothing leaked."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path
from typing import Any

import aiofiles
import pytest
from helpers import fill

import asyncpgalloc.checkpoint_io as cio
from asyncpgalloc import (
    PAGE_SIZE,
    AllocationMode,
    AllocOpts,
    CheckpointError,
    FileRange,
    MemoryFile,
    PagesFile,
)
from asyncpgalloc.checkpoint_format import (
    HEADER_SIZE,
    PAGES_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    Header,
    PagesRef,
)

MiB = 1 << 20
COMMIT = AllocOpts(mode=AllocationMode.COMMIT)
FILES = 3


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def loader_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "asyncpgalloc-page-loader"]


def contents(mf: MemoryFile, fr: FileRange) -> bytes:
    return b"".join(v.tobytes() for v in mf.map_internal(fr))


def byte_of(f: int, i: int) -> int:
    return 1 + f * 16 + i


async def make_files() -> tuple[list[MemoryFile], list[list[FileRange]]]:
    """FILES memory files; file f holds f + 2 allocations of 1 MiB, each its own byte."""
    mfs: list[MemoryFile] = []
    frs: list[list[FileRange]] = []
    for f in range(FILES):
        mf = await MemoryFile.open()
        mfs.append(mf)
        ranges = [mf.allocate(MiB, COMMIT) for _ in range(f + 2)]
        for i, fr in enumerate(ranges):
            fill(mf, fr, byte_of(f, i))
        frs.append(ranges)
    return mfs, frs


@pytest.fixture
async def shared(tmp_path: Path) -> tuple[Path, list[Path], list[list[FileRange]]]:
    """FILES checkpoints saved one after another into one pages file."""
    mfs, frs = await make_files()
    pages_path = tmp_path / "pages"
    metas = [tmp_path / f"meta{f}" for f in range(FILES)]
    try:
        async with await PagesFile.create(pages_path) as pages:
            for mf, meta in zip(mfs, metas, strict=True):
                await mf.save(meta, pages_file=pages)
    finally:
        for mf in mfs:
            await mf.aclose()
    return pages_path, metas, frs


def ref_of(meta: Path) -> PagesRef:
    raw = meta.read_bytes()
    header = Header.unpack(raw[:HEADER_SIZE])
    at = header.data_offset
    return PagesRef.unpack(header, raw[at : at + 40])


def check(mf: MemoryFile, f: int, frs: list[FileRange]) -> None:
    for i, fr in enumerate(frs):
        assert contents(mf, fr) == bytes([byte_of(f, i)]) * MiB
    mf.check_invariants(check_zero_pages=True)


@pytest.mark.parametrize("async_pages", [False, True])
async def test_several_files_share_one_pages_file(
    shared: tuple[Path, list[Path], list[list[FileRange]]], async_pages: bool
) -> None:
    pages_path, metas, frs = shared
    # The metadata streams are small: the pages are all in the pages file.
    assert all(m.stat().st_size < 8192 for m in metas)
    offsets = [ref_of(m).offset for m in metas]
    assert offsets == sorted(offsets) and offsets[0] == PAGES_HEADER_SIZE
    assert pages_path.stat().st_size >= offsets[-1] + (FILES + 1) * MiB
    before = fd_count()
    async with await PagesFile.open(pages_path) as pages:
        for f, meta in enumerate(metas):
            async with await MemoryFile.load(meta, pages_file=pages, async_pages=async_pages) as mf:
                await mf.wait_loaded()
                check(mf, f, frs[f])
    assert fd_count() == before and not loader_tasks()


async def test_concurrent_saves_interleave_and_load_back(tmp_path: Path) -> None:
    """Saves of FILES files run at once (one block per executor job, so their batches
    interleave on the loop), each in its own segment; an aiofiles metadata stream too."""
    mp = pytest.MonkeyPatch()
    mp.setattr(cio, "BATCH_BLOCKS", 1)
    mfs, frs = await make_files()
    metas = [tmp_path / f"meta{f}" for f in range(FILES)]
    try:
        async with await PagesFile.create(tmp_path / "pages") as pages:

            async def save(f: int) -> None:
                if f == 0:
                    async with aiofiles.open(metas[f], "wb") as out:
                        await mfs[f].save(out, pages_file=pages)
                else:
                    await mfs[f].save(metas[f], pages_file=pages)

            await asyncio.gather(*(save(f) for f in range(FILES)))
    finally:
        mp.undo()
        for mf in mfs:
            await mf.aclose()
    offsets = sorted(ref_of(m).offset for m in metas)
    assert len(set(offsets)) == FILES
    async with await PagesFile.open(tmp_path / "pages") as pages:
        loaded = []
        for f in range(FILES):
            if f == 0:
                async with aiofiles.open(metas[f], "rb") as src:
                    loaded.append(await MemoryFile.load(src, pages_file=pages, async_pages=True))
            else:
                loaded.append(await MemoryFile.load(metas[f], pages_file=pages, async_pages=True))
        try:
            # Waiting for one file's pages while the others stream in too.
            await asyncio.gather(*(mf.wait_loaded() for mf in reversed(loaded)))
            for f, mf in enumerate(loaded):
                check(mf, f, frs[f])
        finally:
            for mf in loaded:
                await mf.aclose()


async def test_the_wrong_pages_file_is_refused(
    shared: tuple[Path, list[Path], list[list[FileRange]]], tmp_path: Path
) -> None:
    _, metas, _ = shared
    async with await PagesFile.create(tmp_path / "other") as other, await MemoryFile.open() as mf:
        mf.allocate(MiB, COMMIT)
        await mf.save(tmp_path / "x", pages_file=other)
    before = fd_count()
    async with await PagesFile.open(tmp_path / "other") as other:
        with pytest.raises(CheckpointError, match="not in this one"):
            await MemoryFile.load(metas[0], pages_file=other, async_pages=True)
    assert fd_count() == before and not loader_tasks()


async def test_a_checkpoint_with_a_pages_file_needs_it(
    shared: tuple[Path, list[Path], list[list[FileRange]]],
) -> None:
    _, metas, _ = shared
    with pytest.raises(CheckpointError, match="load it with pages_file"):
        await MemoryFile.load(metas[0])


async def test_a_plain_checkpoint_refuses_a_pages_file(
    shared: tuple[Path, list[Path], list[list[FileRange]]], tmp_path: Path
) -> None:
    pages_path, _, _ = shared
    async with await MemoryFile.open() as mf:
        mf.allocate(MiB, COMMIT)
        await mf.save(tmp_path / "plain")
    async with await PagesFile.open(pages_path) as pages:
        with pytest.raises(CheckpointError, match="load it without pages_file"):
            await MemoryFile.load(tmp_path / "plain", pages_file=pages)


def swap_offsets(a: Path, b: Path) -> None:
    """Give ``a``'s metadata stream ``b``'s offset, its CRC recomputed (a forged or
    mixed-up stream with valid checksums)."""
    ra, rb = ref_of(a), ref_of(b)
    raw = bytearray(a.read_bytes())
    header = Header.unpack(bytes(raw[:HEADER_SIZE]))
    at = header.data_offset
    raw[at : at + 40] = PagesRef(ra.identity, rb.offset).pack(header)
    a.write_bytes(bytes(raw))


@pytest.mark.parametrize("async_pages", [False, True])
async def test_a_wrong_offset_is_refused_before_mapping(
    shared: tuple[Path, list[Path], list[list[FileRange]]], async_pages: bool
) -> None:
    pages_path, metas, _ = shared
    swap_offsets(metas[0], metas[1])
    before = fd_count()
    async with await PagesFile.open(pages_path) as pages:
        with pytest.raises(CheckpointError, match="belong to another checkpoint"):
            await MemoryFile.load(metas[0], pages_file=pages, async_pages=async_pages)
    # An offset inside a segment: no segment header there.
    raw = bytearray(metas[1].read_bytes())
    header = Header.unpack(bytes(raw[:HEADER_SIZE]))
    ref = ref_of(metas[1])
    at = header.data_offset
    raw[at : at + 40] = PagesRef(ref.identity, ref.offset + 4096).pack(header)
    metas[1].write_bytes(bytes(raw))
    async with await PagesFile.open(pages_path) as pages:
        with pytest.raises(CheckpointError, match="no checkpoint's pages at offset"):
            await MemoryFile.load(metas[1], pages_file=pages, async_pages=async_pages)
    assert fd_count() == before and not loader_tasks()


async def test_a_truncated_pages_file_is_refused(
    shared: tuple[Path, list[Path], list[list[FileRange]]],
) -> None:
    pages_path, metas, _ = shared
    last = ref_of(metas[-1]).offset
    os.truncate(pages_path, last + SEGMENT_HEADER_SIZE + MiB)
    before = fd_count()
    async with await PagesFile.open(pages_path) as pages:
        with pytest.raises(CheckpointError, match="truncated pages file"):
            await MemoryFile.load(metas[-1], pages_file=pages, async_pages=True)
        # The others are whole.
        async with await MemoryFile.load(metas[0], pages_file=pages, async_pages=True) as mf:
            await mf.wait_loaded()
    assert fd_count() == before


async def test_not_a_pages_file(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"x" * 8192)
    with pytest.raises(CheckpointError, match="not an asyncpgalloc pages file"):
        await PagesFile.open(tmp_path / "junk")
    async with await PagesFile.create(tmp_path / "p"):
        pass
    raw = bytearray((tmp_path / "p").read_bytes())
    raw[20] ^= 1  # the identity
    (tmp_path / "p").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="header checksum mismatch"):
        await PagesFile.open(tmp_path / "p")


async def test_a_corrupt_block_in_a_shared_file_fails_only_its_files_waiters(
    shared: tuple[Path, list[Path], list[list[FileRange]]],
) -> None:
    """Block 1 of file 1 damaged: file 1's waiters all get the same CheckpointError and
    its loader leaves nothing behind; files 0 and 2 in the same pages file load whole."""
    pages_path, metas, frs = shared
    ref = ref_of(metas[1])
    pos = ref.offset + SEGMENT_HEADER_SIZE + (MiB + 4) + 100
    fd = os.open(pages_path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, pos)[0] ^ 0xFF]), pos)
    finally:
        os.close(fd)
    before = fd_count()
    async with await PagesFile.open(pages_path) as pages:
        # The synchronous load fails whole.
        with pytest.raises(CheckpointError, match="block 1 checksum mismatch"):
            await MemoryFile.load(metas[1], pages_file=pages)
        mfs = [await MemoryFile.load(m, pages_file=pages, async_pages=True) for m in metas]
        try:
            bad = mfs[1]
            waits = [asyncio.ensure_future(bad.wait_loaded(fr)) for fr in frs[1]]
            waits.append(asyncio.ensure_future(bad.wait_loaded()))
            results = await asyncio.gather(*waits, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            assert errors and all(isinstance(e, CheckpointError) for e in errors)
            assert len({id(e) for e in errors}) == 1
            assert "block 1 checksum mismatch" in str(errors[0])
            p = bad.load_progress()
            assert p is not None and p.done and p.error is not None
            for f in (0, 2):
                await mfs[f].wait_loaded()
                check(mfs[f], f, frs[f])
        finally:
            for mf in mfs:
                await mf.aclose()
    assert fd_count() == before and not loader_tasks()


async def test_save_refuses_a_pages_file_open_for_reading(
    shared: tuple[Path, list[Path], list[list[FileRange]]], tmp_path: Path
) -> None:
    pages_path, _, _ = shared
    async with await PagesFile.open(pages_path) as pages, await MemoryFile.open() as mf:
        with pytest.raises(CheckpointError, match="not open for saving"):
            await mf.save(tmp_path / "m", pages_file=pages)
    assert not (tmp_path / "m").exists()


def test_reserve_hands_out_increasing_aligned_ranges(tmp_path: Path) -> None:
    async def main() -> list[int]:
        async with await PagesFile.create(tmp_path / "p") as pages:
            out = [pages.reserve(n) for n in (4096, 3 * 4096, 4096)]
            with pytest.raises(ValueError):
                pages.reserve(100)
            return out

    assert asyncio.run(main()) == [4096, 2 * 4096, 5 * 4096]
    assert struct.unpack_from("<8s", (tmp_path / "p").read_bytes())[0] == b"APGAPAGS"
    assert PAGE_SIZE == 4096


def test_cli_inspect_and_restore_take_a_pages_file(
    shared: tuple[Path, list[Path], list[list[FileRange]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from asyncpgalloc import __main__ as cli

    pages_path, metas, _ = shared
    assert cli.main(["inspect", str(metas[1]), "--pages-file", str(pages_path)]) == 0
    out = capsys.readouterr().out
    assert "pages in a pages file" in out and "checksums OK" in out
    assert cli.main(["restore", str(metas[2]), "--pages-file", str(pages_path)]) == 0
    out = capsys.readouterr().out
    assert "4 MiB used" in out and "checksums and invariants OK" in out
    # Without it, or with a damaged block there: refused, exit status 1.
    assert cli.main(["inspect", str(metas[1])]) == 1
    assert "--pages-file" in capsys.readouterr().err
    pos = ref_of(metas[1]).offset + SEGMENT_HEADER_SIZE + 10
    fd = os.open(pages_path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, pos)[0] ^ 1]), pos)
    finally:
        os.close(fd)
    assert cli.main(["inspect", str(metas[1]), "--pages-file", str(pages_path)]) == 1
    assert "block 0 checksum mismatch" in capsys.readouterr().err
    assert cli.main(["restore", str(metas[1]), "--pages-file", str(pages_path)]) == 1
    assert "block 0 checksum mismatch" in capsys.readouterr().err
    assert cli.main(["inspect", str(metas[0]), "--pages-file", str(pages_path), "--no-data"]) == 0


async def test_closing_the_pages_file_mid_save_is_harmless(tmp_path: Path) -> None:
    """The save writes through a description of its own: closing the PagesFile while
    it runs neither breaks it nor lets its threads write to a reused fd number."""
    mfs, frs = await make_files()
    try:
        pages = await PagesFile.create(tmp_path / "pages")
        save = asyncio.ensure_future(mfs[2].save(tmp_path / "meta", pages_file=pages))
        while pages.next_offset == PAGES_HEADER_SIZE:  # until the save reserved its segment
            await asyncio.sleep(0)
        await pages.aclose()
        await save
    finally:
        for mf in mfs:
            await mf.aclose()
    pages = await PagesFile.open(tmp_path / "pages")
    async with pages, await MemoryFile.load(tmp_path / "meta", pages_file=pages) as mf:
        check(mf, 2, frs[2])
