"""Checkpoint and restore: MemoryFile.save / MemoryFile.load, the format's defences, the CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiofiles
import pytest
from helpers import checkpoint_bytes, checkpoint_parts, fill, is_zero
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncpgalloc.checkpoint_inspect as checkpoint_inspect
import asyncpgalloc.checkpoint_io as cio
from asyncpgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    AccessType,
    AllocationMode,
    AllocOpts,
    CheckpointError,
    ClosedError,
    DelayedEviction,
    EvictableRange,
    FileRange,
    MemoryAccounting,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
)
from asyncpgalloc.checkpoint_format import (
    HEADER_SIZE,
    MAX_CHUNKS_LOADABLE,
    TRAILER_SIZE,
    Header,
    Snapshot,
    committed_extents,
    decode_metadata,
    encode_metadata,
)
from asyncpgalloc.checkpoint_scan import data_extents

P = PAGE_SIZE
H = HUGE_PAGE_SIZE
HUGE_OPTS = MemoryFileOpts(expect_hugepages=True)


# ------------------------------------------------------------------------ helpers


def recording_open(built: list[MemoryFile]) -> Callable[..., Any]:
    """MemoryFile._open that also records the files it opens (load opens the file it
    fills this way)."""
    open_ = MemoryFile._open

    async def record(file: Any, opts: MemoryFileOpts) -> MemoryFile:
        mf = await open_(file, opts)
        built.append(mf)
        return mf

    return record


def fsize(path: Path) -> int:
    return os.stat(path).st_size


def put(path: Path, raw: bytes) -> None:
    path.write_bytes(raw)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def used_ranges(mf: MemoryFile) -> list[tuple[int, int]]:
    out = []
    for s, e, _ in mf.page_view().mem_acct:
        out.append((s, e))
    return out


def contents(mf: MemoryFile) -> dict[tuple[int, int], bytes]:
    """The bytes of every used page, read with pread (so reading commits nothing)."""
    out = {}
    for s, e in used_ranges(mf):
        out[(s, e)] = os.pread(mf.fd, e - s, s)
    return out


def acct(mf: MemoryFile) -> dict[int, dict[MemoryKind, int]]:
    return {m: mf.accounting.by_memcg(m) for m in mf.accounting.memcg_ids()}


def same_state(a: MemoryFile, b: MemoryFile) -> None:
    assert a.dump_segments() == b.dump_segments()
    assert a.stats() == b.stats()
    assert a.page_view().commit_seq == b.page_view().commit_seq
    assert acct(a) == acct(b)
    assert contents(a) == contents(b)
    b.check_invariants()


def write(mf: MemoryFile, fr: FileRange, seed: int) -> None:
    """Distinct non-zero bytes on every page of ``fr``."""
    for i, view in enumerate(mf.map_internal(fr, AccessType.WRITE)):
        view[:] = bytes([(seed + i) % 255 + 1]) * len(view)
        for off in range(0, len(view), P):
            view[off : off + 8] = struct.pack("<Q", seed * 1_000_003 + off)


async def populated(mf: MemoryFile) -> dict[str, FileRange]:
    """Small allocations of several kinds and memcgs, written, shared and scanned."""
    frs = {
        "anon1": mf.allocate(16 * P, AllocOpts(kind=MemoryKind.ANONYMOUS, memcg_id=1)),
        "cache2": mf.allocate(8 * P, AllocOpts(kind=MemoryKind.PAGE_CACHE, memcg_id=2)),
        "tmpfs3": mf.allocate(
            32 * P, AllocOpts(kind=MemoryKind.TMPFS, memcg_id=3, mode=AllocationMode.COMMIT)
        ),
        "untouched": mf.allocate(64 * P, AllocOpts(memcg_id=1)),
        "late": mf.allocate(4 * P, AllocOpts(kind=MemoryKind.MAPPED, memcg_id=7)),
    }
    write(mf, frs["anon1"], 1)
    write(mf, frs["cache2"], 2)
    write(mf, FileRange(frs["tmpfs3"].start, frs["tmpfs3"].start + 8 * P), 3)
    # Shared references on sub-ranges.
    a = frs["anon1"]
    mf.inc_ref(FileRange(a.start + 2 * P, a.start + 6 * P))
    mf.inc_ref(FileRange(a.start + 4 * P, a.start + 5 * P))
    await mf.update_usage()
    # Written after the scan: only save's own scan finds it.
    write(mf, frs["late"], 4)
    return frs


async def save_load(
    mf: MemoryFile, path: Path, opts: MemoryFileOpts | None = None, **kw: Any
) -> MemoryFile:
    await mf.save(path, **kw)
    return await MemoryFile.load(path, opts or MemoryFileOpts())


# ------------------------------------------------------------------------ round trips


async def test_round_trip_small_chunks(mf: MemoryFile, tmp_path: Path) -> None:
    frs = await populated(mf)
    known_before = mf.known_committed_bytes
    path = tmp_path / "ck"
    loaded = await save_load(mf, path)
    try:
        # save found the page written after the last scan and accounted it.
        assert mf.known_committed_bytes == known_before + frs["late"].length
        assert mf.accounting.by_memcg(7) == {MemoryKind.MAPPED: frs["late"].length}
        same_state(mf, loaded)
        assert loaded.known_committed_bytes == mf.known_committed_bytes > 0
        a = frs["anon1"]
        assert not loaded.has_unique_ref(FileRange(a.start + 2 * P, a.start + 6 * P))
        assert loaded.has_unique_ref(FileRange(a.start, a.start + 2 * P))
        # The loaded file works: references drop, the releaser runs, pages are reused.
        loaded.dec_ref(FileRange(a.start + 2 * P, a.start + 6 * P))
        loaded.dec_ref(FileRange(a.start + 4 * P, a.start + 5 * P))
        loaded.dec_ref(a)
        await loaded.wait_released()
        again = loaded.allocate(16 * P, AllocOpts(mode=AllocationMode.WRITE_POPULATE))
        assert is_zero(loaded, again)
        loaded.check_invariants()
    finally:
        await loaded.aclose()
    # A checkpoint's size follows committed memory, not the 1 GiB sparse file.
    assert fsize(path) < mf.known_committed_bytes + 64 * 1024


async def test_round_trip_huge_chunks_and_subreleased_pages(
    huge_mf: MemoryFile, tmp_path: Path
) -> None:
    mf = huge_mf
    small = mf.allocate(8 * P, AllocOpts(memcg_id=5))
    huge = mf.allocate(4 * H, AllocOpts(huge=True, kind=MemoryKind.PAGE_CACHE, memcg_id=6))
    write(mf, small, 9)
    write(mf, huge, 10)
    # Sub-release small pages of two huge pages (one range spanning both).
    mf.dec_ref(FileRange(huge.start + H - 4 * P, huge.start + H + 3 * P))
    mf.inc_ref(FileRange(huge.start + 2 * H, huge.start + 3 * H))
    await mf.wait_released()
    assert mf.stats().subreleased_bytes == 7 * P
    await mf.update_usage()
    loaded = await save_load(mf, tmp_path / "ck", HUGE_OPTS)
    try:
        same_state(mf, loaded)
        assert loaded.stats().huge_chunks == 1 and loaded.stats().small_chunks == 1
        assert loaded.page_view().subreleased == mf.page_view().subreleased
        # Releasing the rest of the first huge page frees it whole.
        loaded.dec_ref(FileRange(huge.start, huge.start + H - 4 * P))
        await loaded.wait_released()
        assert loaded.stats().subreleased_bytes == 3 * P
        loaded.check_invariants()
    finally:
        await loaded.aclose()


async def test_empty_file_round_trip(mf: MemoryFile, tmp_path: Path) -> None:
    loaded = await save_load(mf, tmp_path / "ck")
    try:
        same_state(mf, loaded)
        assert loaded.total_size() == 0
    finally:
        await loaded.aclose()


async def test_accounting_is_added_to_a_shared_accounting(mf: MemoryFile, tmp_path: Path) -> None:
    await populated(mf)
    await mf.save(tmp_path / "ck")
    shared = MemoryAccounting()
    shared.inc(100, MemoryKind.ANONYMOUS, 1)
    loaded = await MemoryFile.load(tmp_path / "ck", MemoryFileOpts(accounting=shared))
    try:
        for memcg in (1, 2, 3, 7):
            want = dict(mf.accounting.by_memcg(memcg))
            if memcg == 1:
                want[MemoryKind.ANONYMOUS] += 100
            assert shared.by_memcg(memcg) == want
        assert mf.accounting.by_memcg(3)  # known-committed accounting is non-zero
    finally:
        await loaded.aclose()
    # Closing gives it all back.
    assert shared.total() == 100


async def test_fallocated_untouched_pages_are_not_saved(mf: MemoryFile, tmp_path: Path) -> None:
    # Committed by the caller, never touched, so never known committed. (COMMIT pages
    # are known-committed at once, and saved as such.)
    fr = mf.allocate(8 << 20, AllocOpts(mode=AllocationMode.CALLER_INDIRECT_COMMIT))
    os.posix_fallocate(mf.fd, fr.start, fr.length)
    assert mf.total_usage() >= 8 << 20
    assert mf.known_committed_bytes == 0
    await mf.save(tmp_path / "ck")
    assert fsize(tmp_path / "ck") < 64 * 1024
    loaded = await MemoryFile.load(tmp_path / "ck")
    try:
        assert is_zero(loaded, fr)
        assert loaded.has_unique_ref(fr)
    finally:
        await loaded.aclose()


def test_seek_data_sees_written_pages_not_fallocated_ones() -> None:
    """The kernel behaviour save relies on (verified on Linux 6.18 shmem)."""
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 64 * P)
        os.posix_fallocate(fd, 0, 8 * P)
        os.pwrite(fd, b"x", 10 * P)
        os.pwrite(fd, b"y", 11 * P)
        os.pwrite(fd, b"z", 20 * P)
        assert data_extents(fd, 64 * P) == [(10 * P, 12 * P), (20 * P, 21 * P)]
    finally:
        os.close(fd)


async def test_save_and_load_again(mf: MemoryFile, tmp_path: Path) -> None:
    await populated(mf)
    first = await save_load(mf, tmp_path / "a")
    try:
        second = await save_load(first, tmp_path / "b")
        try:
            same_state(first, second)
        finally:
            await second.aclose()
    finally:
        await first.aclose()


async def test_load_onto_a_disk_backed_file(mf: MemoryFile, tmp_path: Path) -> None:
    await populated(mf)
    await mf.save(tmp_path / "ck")
    loaded = await MemoryFile.load(
        tmp_path / "ck", MemoryFileOpts(disk_backed_file=True), file=tmp_path / "backing"
    )
    try:
        assert loaded.is_disk_backed
        assert contents(loaded) == contents(mf)
    finally:
        await loaded.aclose()


# ------------------------------------------------------------------- zero pages


async def test_exclude_committed_zero_pages(mf: MemoryFile, tmp_path: Path) -> None:
    data = mf.allocate(16 * P, AllocOpts(memcg_id=1))
    zeros = mf.allocate(32 * P, AllocOpts(memcg_id=1))
    mixed = mf.allocate(8 * P, AllocOpts(memcg_id=2, kind=MemoryKind.TMPFS))
    write(mf, data, 1)
    for view in mf.map_internal(zeros, AccessType.WRITE):
        view[:] = bytes(len(view))  # committed, but all zeros
    for view in mf.map_internal(mixed, AccessType.WRITE):
        view[:] = bytes(len(view))
    write(mf, FileRange(mixed.start + 2 * P, mixed.start + 3 * P), 5)
    await mf.update_usage()
    assert mf.known_committed_bytes == (16 + 32 + 8) * P
    usage_before = mf.total_usage()

    await mf.save(tmp_path / "all")
    seq_before = mf.page_view().commit_seq
    await mf.save(tmp_path / "nz", exclude_committed_zero_pages=True)

    # The live file decommitted its zero pages, as decommit() does.
    assert mf.known_committed_bytes == (16 + 1) * P
    assert mf.accounting.by_memcg(1) == {MemoryKind.ANONYMOUS: 16 * P}
    assert mf.accounting.by_memcg(2) == {MemoryKind.TMPFS: P}
    assert mf.total_usage() == usage_before - 39 * P
    for _, _, ma in mf.page_view().mem_acct.visit_range(zeros.start, zeros.end):
        assert not ma.known_committed and ma.commit_seq > seq_before
    mf.check_invariants()
    # (Less 39 pages of data; the metadata grows by a few segments.)
    assert fsize(tmp_path / "nz") <= fsize(tmp_path / "all") - 39 * P + 1024
    assert "zero pages excluded" in checkpoint_inspect.describe_checkpoint(str(tmp_path / "nz"))

    loaded = await MemoryFile.load(tmp_path / "nz")
    try:
        same_state(mf, loaded)
        assert is_zero(loaded, zeros)
    finally:
        await loaded.aclose()


# ------------------------------------------------------------- paths and files


@pytest.mark.parametrize("buffering", [-1, 0], ids=["buffered", "raw"])
async def test_aiofiles_destination_and_source(
    mf: MemoryFile, tmp_path: Path, buffering: int
) -> None:
    await populated(mf)
    path = tmp_path / "stream"
    async with aiofiles.open(path, "wb", buffering=buffering) as f:
        await f.write(b"prefix")
        await mf.save(f)
        await f.write(b"suffix")
    async with aiofiles.open(path, "rb", buffering=buffering) as f:
        assert await f.read(6) == b"prefix"
        loaded = await MemoryFile.load(f)
        assert await f.read() == b"suffix"
    try:
        same_state(mf, loaded)
    finally:
        await loaded.aclose()
    # The same bytes as a path checkpoint: the stream holds one whole checkpoint.
    await mf.save(tmp_path / "path")
    loaded = await MemoryFile.load(tmp_path / "path")
    try:
        same_state(mf, loaded)
    finally:
        await loaded.aclose()


async def test_path_checkpoint_is_private_and_replaces_atomically(
    mf: MemoryFile, tmp_path: Path
) -> None:
    await populated(mf)
    path = tmp_path / "ck"
    put(path, b"old")
    old_umask = os.umask(0)
    try:
        await mf.save(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert path.read_bytes()[:8] == b"APGACKPT"


async def test_bad_arguments(mf: MemoryFile, tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        await mf.save(123)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await MemoryFile.load(123)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        await mf.save(tmp_path / "no" / "such" / "dir")
    with pytest.raises(FileNotFoundError):
        await MemoryFile.load(tmp_path / "missing")
    assert os.listdir(tmp_path) == []


async def test_save_of_a_closed_file_raises(tmp_path: Path) -> None:
    mf = await MemoryFile.open()
    await mf.aclose()
    with pytest.raises(ClosedError):
        await mf.save(tmp_path / "ck")
    assert os.listdir(tmp_path) == []


async def test_load_respects_max_chunks(mf: MemoryFile, tmp_path: Path) -> None:
    mf.allocate(P)
    await mf.save(tmp_path / "ck")
    before = fd_count()
    with pytest.raises(CheckpointError, match="max_chunks"):
        await MemoryFile.load(tmp_path / "ck", MemoryFileOpts(max_chunks=0))
    assert fd_count() == before


# ------------------------------------------------------- waste and evictions


async def test_waste_at_save_time_is_saved_as_released(tmp_path: Path) -> None:
    """save does not wait for the releaser (steady churn would starve it): waste is
    recorded as released, and its bytes are not saved."""
    async with MemoryFile.open() as mf:
        keep = mf.allocate(4 * P)
        gone = mf.allocate(8 * P)
        write(mf, keep, 1)
        write(mf, gone, 2)
        await mf.update_usage()
        mf.dec_ref(gone)
        assert mf.stats().waste_bytes + mf.stats().releasing_bytes == 8 * P
        await mf.save(tmp_path / "ck")
        header = Header.unpack((tmp_path / "ck").read_bytes()[:HEADER_SIZE])
        assert header.data_length == 4 * P
        loaded = await MemoryFile.load(tmp_path / "ck")
        try:
            st = loaded.stats()
            assert st.waste_bytes == st.releasing_bytes == 0
            assert st.used_bytes == 4 * P
            k = (keep.start, keep.end)
            assert contents(loaded) == {k: contents(mf)[k]}
            assert os.pread(loaded.fd, gone.length, gone.start) == bytes(gone.length)
            loaded.check_invariants()
        finally:
            await loaded.aclose()


class Evictee:
    def __init__(self) -> None:
        self.evicted: list[EvictableRange] = []

    async def evict(self, er: EvictableRange) -> None:
        self.evicted.append(er)


async def test_pending_evictions_refuse_save(tmp_path: Path) -> None:
    opts = MemoryFileOpts(delayed_eviction=DelayedEviction.MANUAL)
    async with MemoryFile.open(opts=opts) as mf:
        mf.allocate(P)
        user = Evictee()
        mf.mark_evictable(user, EvictableRange(0, 4 * P))
        with pytest.raises(CheckpointError, match="evictions"):
            await mf.save(tmp_path / "ck")
        assert os.listdir(tmp_path) == []
        mf.start_evictions()
        with pytest.raises(CheckpointError, match="evictions"):
            await mf.save(tmp_path / "ck")  # running
        await mf.wait_for_evictions()
        assert user.evicted == [EvictableRange(0, 4 * P)]
        await mf.save(tmp_path / "ck")
    assert os.listdir(tmp_path) == ["ck"]


# ---------------------------------------------------------------- cancellation


class Gate:
    """Wraps a blocking job function: the ``nth`` call waits until released."""

    def __init__(self, fn: Callable[..., Any], nth: int = 1) -> None:
        self.fn = fn
        self.nth = nth
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, *args: Any) -> Any:
        with self.lock:
            self.calls += 1
            wait = self.calls == self.nth
        if wait:
            self.entered.set()
            self.release.wait(10)
        return self.fn(*args)

    async def wait_entered(self) -> None:
        while not self.entered.is_set():
            await asyncio.sleep(0.001)


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """One data block per job, so that a few MiB make many jobs."""
    monkeypatch.setattr(cio, "BATCH_BLOCKS", 1)


async def big(mf: MemoryFile) -> FileRange:
    fr = mf.allocate(6 << 20, AllocOpts(mode=AllocationMode.WRITE_POPULATE))
    write(mf, fr, 3)
    return fr


@pytest.mark.usefixtures("small_batches")
@pytest.mark.parametrize("stage", ["data", "fsync"])
async def test_cancel_during_save_leaves_nothing(
    mf: MemoryFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    await big(mf)
    if stage == "data":
        gate = Gate(cio._fill_block, nth=3)
        monkeypatch.setattr(cio, "_fill_block", gate)
    else:
        gate = Gate(cio._fsync)
        monkeypatch.setattr(cio, "_fsync", gate)
    before = fd_count()
    task = asyncio.ensure_future(mf.save(tmp_path / "ck"))
    await gate.wait_entered()
    task.cancel()
    await asyncio.sleep(0.01)
    assert not task.done()  # the job in its thread finishes first
    gate.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert os.listdir(tmp_path) == []
    assert fd_count() == before
    mf.check_invariants()


@pytest.mark.usefixtures("small_batches")
@pytest.mark.parametrize("source", ["path", "aiofiles"])
async def test_cancel_during_load_leaks_nothing(
    mf: MemoryFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    await big(mf)
    await mf.update_usage()
    await mf.save(tmp_path / "ck")
    built: list[MemoryFile] = []
    monkeypatch.setattr(MemoryFile, "_open", recording_open(built))
    name = "_load_batch_job" if source == "path" else "_verify_batch_job"
    gate = Gate(getattr(cio, name), nth=2)
    monkeypatch.setattr(cio, name, gate)
    shared = MemoryAccounting()
    before = fd_count()

    async def load() -> MemoryFile:
        opts = MemoryFileOpts(accounting=shared)
        if source == "path":
            return await MemoryFile.load(tmp_path / "ck", opts)
        async with aiofiles.open(tmp_path / "ck", "rb") as f:
            return await MemoryFile.load(f, opts)

    task = asyncio.ensure_future(load())
    await gate.wait_entered()
    assert shared.total() > 0  # the half-built file holds accounting
    task.cancel()
    gate.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(built) == 1 and built[0].closed
    assert shared.total() == 0
    assert fd_count() == before


# ------------------------------------------------------------------- corruption


@pytest.fixture
async def good(mf: MemoryFile, tmp_path: Path) -> bytes:
    """A small checkpoint (one chunk; its page data fills three blocks)."""
    await populated(mf)
    fr = mf.allocate(600 * P, AllocOpts(memcg_id=9))
    write(mf, fr, 7)
    await mf.save(tmp_path / "good")
    return (tmp_path / "good").read_bytes()


def parse(raw: bytes) -> tuple[Header, Snapshot, bytes]:
    """Header, snapshot and the concatenated page data of a checkpoint."""
    header, meta, data = checkpoint_parts(raw)
    return header, decode_metadata(header, meta), data


def forge(
    raw: bytes, change_snapshot: Callable[[Snapshot], Snapshot] | None = None, **header: Any
) -> bytes:
    """Rebuild a checkpoint with a changed snapshot or header, every checksum valid."""
    h, snap, data = parse(raw)
    if change_snapshot is not None:
        snap = change_snapshot(snap)
    meta = header.pop("metadata", None)
    if meta is None:
        meta = encode_metadata(snap)
    return checkpoint_bytes(h, meta, data, **header)


async def load_fails(path: Path, raw: bytes, match: str | None = None) -> None:
    """Loading ``raw`` raises CheckpointError, leaks no fd and builds no MemoryFile,
    unless the damage is in the page data (then the half-built file is closed)."""
    put(path, raw)
    before = fd_count()
    with pytest.raises(CheckpointError, match=match):
        await MemoryFile.load(path)
    assert fd_count() == before


@pytest.fixture
def no_open(monkeypatch: pytest.MonkeyPatch) -> list[MemoryFile]:
    """Records every MemoryFile built by load (none, for damaged headers or metadata)."""
    built: list[MemoryFile] = []
    monkeypatch.setattr(MemoryFile, "_open", recording_open(built))
    return built


def _with(snap: Snapshot, **changes: Any) -> Snapshot:
    return dataclasses.replace(snap, **changes)


def _bump(lst: list[Any], i: int, j: int, delta: int) -> list[Any]:
    out = list(lst)
    row = list(out[i])
    row[j] += delta
    out[i] = tuple(row)
    return out


SEMANTIC: dict[str, Callable[[Snapshot], Snapshot]] = {
    "segment beyond the file": lambda s: _with(
        s, unfree_small=_bump(s.unfree_small, -1, 1, 1 << 40)
    ),
    "unaligned segment": lambda s: _with(s, unfree_small=_bump(s.unfree_small, 0, 1, 1)),
    "overlapping segments": lambda s: _with(s, unfree_small=_bump(s.unfree_small, 1, 0, -P)),
    "waste": lambda s: _with(s, unwaste_small=[(0, P), (2 * P, s.file_size)]),
    "refcount zero in a small chunk": lambda s: _with(
        s, unfree_small=[(a, b, 0 if i == 0 else r) for i, (a, b, r) in enumerate(s.unfree_small)]
    ),
    "huge refcount": lambda s: _with(s, unfree_small=_bump(s.unfree_small, 0, 2, 2**63)),
    "accounting not covering used pages": lambda s: _with(s, mem_acct=s.mem_acct[1:]),
    "accounting of free pages": lambda s: _with(
        s, mem_acct=[*s.mem_acct, (s.file_size - P, s.file_size, 0, 0, 1)]
    ),
    "bad kind": lambda s: _with(s, mem_acct=_bump(s.mem_acct, 0, 4, 99)),
    "waste in accounting": lambda s: _with(s, mem_acct=_bump(s.mem_acct, 0, 4, 1 << 9)),
    "known-committed with a commit sequence": lambda s: _with(
        s, mem_acct=[(a, b, m, 5 if i & 256 else q, i) for a, b, m, q, i in s.mem_acct]
    ),
    "commit sequence from the future": lambda s: _with(
        s, mem_acct=[(a, b, m, 10**9 if not i & 256 else q, i) for a, b, m, q, i in s.mem_acct]
    ),
    "known bytes": lambda s: _with(s, known_committed_bytes=s.known_committed_bytes + P),
    "sub-released pages that are not": lambda s: _with(s, subreleased=[(0, 3)]),
    "chunk flag": lambda s: _with(s, chunk_huge=b"\x02"),
    "chunk count": lambda s: _with(s, chunk_huge=b"\x00\x00"),
}


@pytest.mark.parametrize("name", list(SEMANTIC))
async def test_inconsistent_metadata_with_valid_checksums_is_refused(
    good: bytes, tmp_path: Path, no_open: list[MemoryFile], name: str
) -> None:
    await load_fails(tmp_path / "bad", forge(good, SEMANTIC[name]))
    assert no_open == []


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"version": 2}, "version"),
        ({"page_size": 2 * P}, "sizes"),
        ({"chunk_size": 1 << 31}, "sizes"),
        ({"block_size": 3 << 20}, "block size"),
        ({"block_size": 1 << 31}, "block size"),
        ({"block_size": 512}, "block size"),
        ({"file_size": MAX_CHUNKS_LOADABLE * (1 << 31)}, "file size"),
        ({"file_size": (1 << 30) + P}, "file size"),
        ({"data_length": 1 << 41}, "data length"),
        ({"flags": 8}, "flags"),
        ({"metadata": bytes(16)}, "metadata length"),
        ({"metadata": bytes(1 << 10)}, "chunks|counts"),
    ],
    ids=lambda v: str(v)[:40],
)
async def test_bad_header_fields_are_refused(
    good: bytes, tmp_path: Path, no_open: list[MemoryFile], changes: Any, match: str
) -> None:
    await load_fails(tmp_path / "bad", forge(good, **changes), match=match)
    assert no_open == []


def regions(raw: bytes) -> dict[str, tuple[int, int]]:
    h = Header.unpack(raw[:HEADER_SIZE])
    return {
        "magic": (0, 8),
        "header": (8, HEADER_SIZE),
        "metadata": (HEADER_SIZE, h.data_offset),
        "data": (h.data_offset, h.data_offset + 100),
        "second block": (h.data_offset + h.block_size + 4, h.data_offset + h.block_size + 50),
        "block crc": (h.data_offset + h.block_size, h.data_offset + h.block_size + 4),
        "trailer": (len(raw) - TRAILER_SIZE, len(raw)),
    }


@pytest.mark.parametrize(
    "where", ["magic", "header", "metadata", "data", "second block", "block crc", "trailer"]
)
async def test_a_flipped_byte_anywhere_is_caught(
    good: bytes, tmp_path: Path, no_open: list[MemoryFile], where: str
) -> None:
    lo, hi = regions(good)[where]
    for pos in (lo, (lo + hi) // 2, hi - 1):
        bad = bytearray(good)
        bad[pos] ^= 0x40
        await load_fails(tmp_path / "bad", bytes(bad))
    if where in ("magic", "header", "metadata"):
        assert no_open == []
    else:
        assert no_open and all(m.closed for m in no_open)


async def test_wrong_magic_and_version(good: bytes, tmp_path: Path) -> None:
    await load_fails(tmp_path / "bad", b"NOTACKPT" + good[8:], match="not an asyncpgalloc")
    await load_fails(tmp_path / "bad", forge(good, version=7), match="version 7")


async def test_swapped_blocks_are_caught(good: bytes, tmp_path: Path) -> None:
    h = Header.unpack(good[:HEADER_SIZE])
    b = h.block_size + 4
    first = good[h.data_offset : h.data_offset + b]
    second = good[h.data_offset + b : h.data_offset + 2 * b]
    assert len(second) == b  # the fixture has at least two full blocks
    bad = good[: h.data_offset] + second + first + good[h.data_offset + 2 * b :]
    await load_fails(tmp_path / "bad", bad, match="checksum")


@pytest.mark.parametrize("source", ["path", "aiofiles"])
async def test_truncation_anywhere_is_caught(good: bytes, tmp_path: Path, source: str) -> None:
    h = Header.unpack(good[:HEADER_SIZE])
    path = tmp_path / "bad"
    for cut in (
        0,
        5,
        HEADER_SIZE - 1,
        HEADER_SIZE + 3,
        h.data_offset,
        h.data_offset + 10,
        len(good) - TRAILER_SIZE,
        len(good) - 1,
    ):
        put(path, good[:cut])
        before = fd_count()
        with pytest.raises(CheckpointError):
            if source == "path":
                await MemoryFile.load(path)
            else:
                async with aiofiles.open(path, "rb") as f:
                    await MemoryFile.load(f)
        assert fd_count() == before
    put(path, good + b"x")
    with pytest.raises(CheckpointError):
        await MemoryFile.load(path)


async def test_forged_lengths_never_write_outside_the_mapping(good: bytes, tmp_path: Path) -> None:
    """Extents come only from checked accounting segments inside the file: a forged
    known-committed segment beyond the file is refused before anything is mapped."""

    def beyond(s: Snapshot) -> Snapshot:
        a, _, m, q, i = s.mem_acct[-1]
        return _with(s, mem_acct=[*s.mem_acct[:-1], (a, s.file_size + (1 << 30), m, q, i)])

    await load_fails(tmp_path / "bad", forge(good, beyond))
    _, snap, _ = parse(good)
    for s, e in committed_extents(snap.mem_acct):
        assert 0 <= s < e <= snap.file_size


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), stream=st.booleans())
def test_random_damage_only_ever_raises_checkpoint_error(
    damage_target: tuple[bytes, Path], data: st.DataObject, stream: bool
) -> None:
    good, path = damage_target
    h = Header.unpack(good[:HEADER_SIZE])
    # Half the damage lands in the header, metadata, first block CRC or trailer, which
    # are a sliver of the file; the rest anywhere.
    hot = st.sampled_from([*range(h.data_offset + 8), *range(len(good) - TRAILER_SIZE, len(good))])
    position = hot | st.integers(0, len(good) - 1)
    bad = bytearray(good)
    for where, xor in data.draw(
        st.lists(st.tuples(position, st.integers(1, 255)), min_size=0, max_size=4), "flips"
    ):
        bad[where] ^= xor
    cut = data.draw(st.none() | position, "cut")
    if cut is not None:
        bad = bad[:cut]
    if bad == good:
        return
    put(path, bytes(bad))

    async def attempt() -> None:
        before = fd_count()
        try:
            if stream:
                async with aiofiles.open(path, "rb") as f:
                    mf = await MemoryFile.load(f)
            else:
                mf = await MemoryFile.load(path)
        except CheckpointError:
            pass
        else:  # only a CRC-32 collision could get here (odds ~2**-32)
            await mf.aclose()
            pytest.fail("a damaged checkpoint loaded")
        assert fd_count() == before

    asyncio.run(attempt())


@pytest.fixture(scope="module")
def damage_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[bytes, Path]]:
    """A checkpoint with two data blocks, for the hypothesis test (made once)."""
    directory = tmp_path_factory.mktemp("damage")

    async def make() -> bytes:
        async with MemoryFile.open() as mf:
            await populated(mf)
            fr = mf.allocate(300 * P, AllocOpts(memcg_id=9))
            write(mf, fr, 7)
            await mf.save(directory / "good")
        return (directory / "good").read_bytes()

    yield asyncio.run(make()), directory / "bad"


# ------------------------------------------------------------ concurrency


@pytest.mark.usefixtures("small_batches")
async def test_allocations_and_frees_during_save_are_safe(
    mf: MemoryFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fr = await big(mf)
    other = mf.allocate(16 * P)
    write(mf, other, 8)
    await mf.update_usage()
    before = {r: os.pread(mf.fd, r.length, r.start) for r in (fr, other)}
    sets_before = mf.dump_segments().split("mem_acct")[0]
    gate = Gate(cio._fill_block, nth=2)
    monkeypatch.setattr(cio, "_fill_block", gate)
    task = asyncio.ensure_future(mf.save(tmp_path / "ck"))
    await gate.wait_entered()
    # The snapshot is taken: churn the live file while its pages are being copied.
    # (An allocation that recycled the freed pages could have its new bytes saved
    # instead: writers must be quiesced, as documented. UNCOMMITTED never recycles.)
    mf.dec_ref(other)
    new = mf.allocate(4 * P, AllocOpts(mode=AllocationMode.UNCOMMITTED))
    fill(mf, new, 0x5A)
    gate.release.set()
    await task
    await mf.wait_released()
    mf.check_invariants()
    loaded = await MemoryFile.load(tmp_path / "ck")
    try:
        # The checkpoint holds the allocations as they were at the snapshot.
        assert loaded.dump_segments().split("mem_acct")[0] == sets_before
        assert os.pread(loaded.fd, fr.length, fr.start) == before[fr]
        # The freed range was copied before or after its punch: old bytes or zeros,
        # page by page, never anything else.
        got = os.pread(loaded.fd, other.length, other.start)
        for off in range(0, other.length, P):
            page = got[off : off + P]
            assert page in (before[other][off : off + P], bytes(P))
        loaded.check_invariants()
    finally:
        await loaded.aclose()


# ------------------------------------------------------------------ inspect


async def test_describe_and_inspect(good: bytes, tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "good"
    text = checkpoint_inspect.describe_checkpoint(str(path))
    for needle in (
        "format version:     1",
        "chunk 1.00 GiB",
        "complete",
        "memcg 9",
        "ANONYMOUS",
        "shared by more than one reference",
    ):
        assert needle in text
    assert checkpoint_inspect.inspect_main([str(path)]) == 0
    assert capsys.readouterr().out == text
    put((tmp_path / "bad"), good[:100])
    assert checkpoint_inspect.inspect_main([str(tmp_path / "bad")]) == 1
    assert "truncated" in capsys.readouterr().err
    put((tmp_path / "short"), good[: len(good) - 10])
    assert "TRUNCATED" in checkpoint_inspect.describe_checkpoint(str(tmp_path / "short"))


def test_python_m_asyncpgalloc_inspect(tmp_path: Path) -> None:
    async def make() -> None:
        async with MemoryFile.open() as mf:
            write(mf, mf.allocate(4 * P), 1)
            await mf.save(tmp_path / "ck")

    asyncio.run(make())
    result = subprocess.run(
        [sys.executable, "-m", "asyncpgalloc", "inspect", str(tmp_path / "ck")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "asyncpgalloc checkpoint" in result.stdout


@pytest.mark.usefixtures("small_batches")
async def test_pages_freed_and_reused_during_a_save_are_saved_as_they_were(
    mf: MemoryFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest killed while its file is saved: its pages are freed after the snapshot,
    and a committing allocation would recycle (zero) them and the releaser punch them.
    The checkpoint records them as used, so it must hold their bytes, not zeros and
    not the next user's data."""
    fr = await big(mf)
    await mf.update_usage()
    before = os.pread(mf.fd, fr.length, fr.start)
    assert before != bytes(fr.length)
    gate = Gate(cio._fill_block, nth=1)
    monkeypatch.setattr(cio, "_fill_block", gate)
    task = asyncio.ensure_future(mf.save(tmp_path / "ck"))
    await gate.wait_entered()  # the snapshot is taken, no page copied yet
    mf.dec_ref(fr)
    again = mf.allocate(fr.length, AllocOpts(mode=AllocationMode.COMMIT))
    fill(mf, again, 0xEE)
    for _ in range(20):
        await asyncio.sleep(0.001)  # the releaser's chance to punch
    gate.release.set()
    await task
    loaded = await MemoryFile.load(tmp_path / "ck")
    try:
        assert os.pread(loaded.fd, fr.length, fr.start) == before
        loaded.check_invariants()
    finally:
        await loaded.aclose()
    mf.dec_ref(again)
    await mf.wait_released()
    mf.check_invariants()
