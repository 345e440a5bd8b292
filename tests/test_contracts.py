"""Contracts and messages (issue 16, "should fix"): options checked at construction, clear
errors for bad ranges, evictable ranges merged, update_usage's answer, absurd allocations,
backing files that are not files, and ``open()`` as a coroutine."""

from __future__ import annotations

import asyncio
import gc
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import fill, load_example, snapshot

from asyncpgalloc import (
    CHUNK_SIZE,
    PAGE_SIZE,
    AllocationMode,
    AllocOpts,
    CheckpointError,
    DelayedEviction,
    EvictableRange,
    FileRange,
    InvalidOptionError,
    InvalidRangeError,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
    OptionTypeError,
    OutOfMemoryError,
    RangeTypeError,
    ReferenceCountError,
    checkpoint_inspect,
    usage,
)
from asyncpgalloc.checkpoint_format import HEADER_SIZE, Header

P = PAGE_SIZE
MiB = 1 << 20


# ------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("make", "error", "needle"),
    [
        (lambda: AllocOpts(mode="commit"), OptionTypeError, "AllocationMode.COMMIT"),  # type: ignore[arg-type]
        (lambda: AllocOpts(kind=99), InvalidOptionError, "MemoryKind.ANONYMOUS"),  # type: ignore[arg-type]
        (lambda: AllocOpts(kind="anon"), OptionTypeError, "MemoryKind"),  # type: ignore[arg-type]
        (lambda: AllocOpts(memcg_id=-1), InvalidOptionError, "memcg_id must be in [0,"),
        (lambda: AllocOpts(memcg_id=1.0), OptionTypeError, "memcg_id must be an int"),  # type: ignore[arg-type]
        (lambda: AllocOpts(huge=1), OptionTypeError, "huge must be a bool"),  # type: ignore[arg-type]
        (lambda: AllocOpts(direction=1), OptionTypeError, "Direction.TOP_DOWN"),  # type: ignore[arg-type]
        (lambda: MemoryFileOpts(close_timeout=-1), InvalidOptionError, "close_timeout"),
        (lambda: MemoryFileOpts(close_timeout=math.nan), InvalidOptionError, "close_timeout"),
        (lambda: MemoryFileOpts(close_timeout="5"), OptionTypeError, "number of seconds"),  # type: ignore[arg-type]
        (
            lambda: MemoryFileOpts(memcg_pressure_level="bogus"),
            InvalidOptionError,
            "'low', 'medium', 'critical'",
        ),
        (
            lambda: MemoryFileOpts(advise_hugepage=True),
            InvalidOptionError,
            "expect_hugepages",
        ),
        (lambda: MemoryFileOpts(usage_refresh_interval=0), InvalidOptionError, "> 0"),
        (lambda: MemoryFileOpts(max_chunks=-1), InvalidOptionError, "max_chunks"),
        (lambda: MemoryFileOpts(max_chunks=True), OptionTypeError, "max_chunks"),
        (lambda: MemoryFileOpts(delayed_eviction="manual"), OptionTypeError, "MANUAL"),  # type: ignore[arg-type]
        (lambda: MemoryFileOpts(expect_hugepages="yes"), OptionTypeError, "bool"),  # type: ignore[arg-type]
        (lambda: MemoryFileOpts(accounting={}), OptionTypeError, "MemoryAccounting"),  # type: ignore[arg-type]
    ],
)
def test_bad_options_are_refused_at_construction(
    make: Callable[[], object], error: type[Exception], needle: str
) -> None:
    with pytest.raises(error) as exc:
        make()
    assert needle in str(exc.value)
    # Both the library's error and the standard one.
    assert isinstance(exc.value, ValueError)
    if error is OptionTypeError:
        assert isinstance(exc.value, TypeError)


def test_good_options_are_kept_and_kinds_become_enum_members() -> None:
    opts = AllocOpts(kind=2, memcg_id=7)  # type: ignore[arg-type]
    assert opts.kind is MemoryKind.PAGE_CACHE
    # gVisor allows both: huge chunks get MADV_HUGEPAGE, small ones MADV_NOHUGEPAGE.
    both = MemoryFileOpts(expect_hugepages=True, advise_hugepage=True, advise_no_hugepage=True)
    assert both.advise_hugepage and both.advise_no_hugepage
    assert MemoryFileOpts(close_timeout=0, usage_refresh_interval=1).close_timeout == 0


async def test_an_int_kind_is_accounted_like_the_enum(mf: MemoryFile) -> None:
    fr = mf.allocate(2 * P, AllocOpts(kind=2, memcg_id=3))  # type: ignore[arg-type]
    fill(mf, fr, 1)
    assert await mf.update_usage()
    assert mf.accounting.by_memcg(3) == {MemoryKind.PAGE_CACHE: 2 * P}
    repr(mf.accounting)
    mf.dec_ref(fr)


async def test_open_refuses_opts_of_the_wrong_type() -> None:
    with pytest.raises(OptionTypeError, match="opts must be a MemoryFileOpts"):
        MemoryFile.open(opts={"max_chunks": 1})  # type: ignore[arg-type]
    with pytest.raises(OptionTypeError, match="pass options as opts="):
        MemoryFile.open(MemoryFileOpts())  # type: ignore[arg-type]
    with pytest.raises(OptionTypeError, match="opts must be a MemoryFileOpts"):
        await MemoryFile.load("/nonexistent", {})  # type: ignore[arg-type]


# --------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    "bad",
    [FileRange(0.0, 4096), FileRange(None, 4096), FileRange(0, 4096.0)],  # type: ignore[arg-type]
    ids=repr,
)
async def test_ranges_of_non_ints_get_a_clear_error(mf: MemoryFile, bad: FileRange) -> None:
    fr = mf.allocate(P)
    assert fr == (0, P)
    before = snapshot(mf)
    calls: list[Callable[[], Any]] = [
        lambda: mf.inc_ref(bad),
        lambda: mf.dec_ref(bad),
        lambda: mf.has_unique_ref(bad),
        lambda: mf.map_internal(bad),
        lambda: mf.mark_evictable(Evicting(), EvictableRange(*bad)),
    ]
    for call in calls:
        with pytest.raises(RangeTypeError, match="must be ints") as exc:
            call()
        assert isinstance(exc.value, InvalidRangeError) and isinstance(exc.value, TypeError)
    with pytest.raises(RangeTypeError, match="decommit"):
        await mf.decommit(bad)
    assert snapshot(mf) == before
    mf.dec_ref(fr)


async def test_reference_errors_name_the_pages_without_references(mf: MemoryFile) -> None:
    fr = mf.allocate(MiB)
    assert fr == (0, MiB)
    before = snapshot(mf)
    with pytest.raises(ReferenceCountError) as exc:
        mf.dec_ref(FileRange(0, 0x101000))
    message = str(exc.value)
    assert "[0x100000, 0x101000) (1 page)" in message
    assert "[0x0," not in message.split(":", 1)[1]  # the referenced pages are not named
    assert snapshot(mf) == before
    # Several holes: each is named, adjacent free and dead pages as one run.
    mf.dec_ref(FileRange(2 * P, 3 * P))
    mf.dec_ref(FileRange(5 * P, 7 * P))
    with pytest.raises(ReferenceCountError) as exc:
        mf.inc_ref(FileRange(0, MiB + P))
    assert "[0x2000, 0x3000), [0x5000, 0x7000), [0x100000, 0x101000) (4 pages)" in str(exc.value)


# ------------------------------------------------------------- evictions


class Evicting:
    """Records every evict call."""

    def __init__(self) -> None:
        self.calls: list[EvictableRange] = []

    async def evict(self, er: EvictableRange) -> None:
        self.calls.append(er)


async def test_adjacent_evictable_ranges_are_evicted_as_one() -> None:
    opts = MemoryFileOpts(delayed_eviction=DelayedEviction.MANUAL)
    async with MemoryFile.open(opts=opts) as mf:
        user = Evicting()
        for i in range(3):
            mf.mark_evictable(user, EvictableRange(i * MiB, (i + 1) * MiB))
        mf.mark_evictable(user, EvictableRange(8 * MiB, 9 * MiB))
        assert mf.start_evictions()
        await mf.wait_for_evictions()
        # As gVisor: one call for the merged run (last range first), none per mark.
        assert user.calls == [EvictableRange(8 * MiB, 9 * MiB), EvictableRange(0, 3 * MiB)]


async def test_the_supervisor_session_evicts_every_range_a_merged_range_covers() -> None:
    gp = load_example("guest_protocol")
    opts = MemoryFileOpts(delayed_eviction=DelayedEviction.MANUAL)
    async with MemoryFile.open(opts=opts) as mf:
        session = gp.GuestSession(mf, memcg_id=1)
        for i in range(3):  # adjacent cached ranges: one merged evictable range
            answer = session.handle({"op": "alloc", "id": i, "kind": "cache", "length": MiB})
            assert session.handle({"op": "evictable", "id": i, "offset": answer["offset"]})["ok"]
        assert mf.start_evictions()
        await mf.wait_for_evictions()
        assert session.ranges == {} and session.evicted_bytes == 3 * MiB
        await mf.wait_released()
        assert mf.stats().used_bytes == 0


# ----------------------------------------------------------------- usage


async def test_update_usage_says_whether_it_scanned_and_can_be_forced(
    mf: MemoryFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Throttle for an hour after each scan, so that "skipped" does not depend on timing.
    monkeypatch.setattr(usage, "MIN_SCAN_INTERVAL", 3600.0)
    a = mf.allocate(2 * P)
    fill(mf, a, 1)
    assert await mf.update_usage() is True
    assert mf.known_committed_bytes == 2 * P
    assert await mf.update_usage() is True  # nothing unknown: up to date without a scan
    b = mf.allocate(3 * P)
    fill(mf, b, 1)
    scans = mf.counters().usage_scans
    assert await mf.update_usage() is False  # throttled: skipped, and it says so
    assert mf.known_committed_bytes == 2 * P and mf.counters().usage_scans == scans
    assert await mf.update_usage(force=True) is True
    assert mf.known_committed_bytes == 5 * P and mf.counters().usage_scans == scans + 1
    mf.dec_ref(a)
    mf.dec_ref(b)


# ------------------------------------------------------- absurd allocations


async def test_an_allocation_beyond_the_address_space_fails_before_mapping(
    mf: MemoryFile,
) -> None:
    before = snapshot(mf)
    for length in (1 << 62, 129 << 40):
        with pytest.raises(OutOfMemoryError, match="address space holds at most"):
            mf.allocate(length)
        with pytest.raises(OutOfMemoryError):
            await mf.allocate_async(length, AllocOpts(mode=AllocationMode.COMMIT))
    assert snapshot(mf) == before
    assert os.fstat(mf.fd).st_size == 0 and mf.total_size() == 0
    # Still usable.
    mf.dec_ref(mf.allocate(P))


def test_running_out_of_address_space_is_out_of_memory(tmp_path: Path) -> None:
    # RLIMIT_AS in a child process: mmap then fails with ENOMEM part-way through the
    # chunks, which must come back as OutOfMemoryError with nothing left mapped.
    script = textwrap.dedent(
        f"""
        import asyncio, mmap, os, resource
        from asyncpgalloc import MemoryFile, OutOfMemoryError
        from asyncpgalloc.host import mappable_chunks

        # 8 GiB of address space taken (no memory): the limit below leaves 2.5 GiB,
        # so mappable_chunks() (limit // 1 GiB >= 10) lets the allocation through.
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000  # MAP_NORESERVE
        hog = mmap.mmap(-1, 8 << 30, flags=flags, prot=0)  # PROT_NONE

        async def main():
            async with MemoryFile.open() as mf:
                with open("/proc/self/status") as f:
                    vm = next(int(l.split()[1]) for l in f if l.startswith("VmSize:")) * 1024
                limit = vm + 5 * {CHUNK_SIZE} // 2
                resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
                n = mappable_chunks()
                try:
                    mf.allocate(n * {CHUNK_SIZE})
                except OutOfMemoryError as e:
                    assert "cannot map" in str(e), e
                    assert mf.total_size() == 0 and os.fstat(mf.fd).st_size == 0
                    mf.dec_ref(mf.allocate(4096))
                    print("ok")
                else:
                    print("no error")

        asyncio.run(main())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok", result.stdout


# ---------------------------------------------------------- backing files


@pytest.mark.parametrize("path", ["/proc/version", "/sys/kernel/mm/transparent_hugepage/enabled"])
async def test_a_pseudo_file_is_refused_as_backing_file(path: str) -> None:
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError, match="not a regular file"):
        await MemoryFile.open(path)
    assert set(os.listdir("/proc/self/fd")) == fds


async def test_opening_an_existing_file_truncates_it(tmp_path: Path) -> None:
    # Documented (README, MemoryFile.open): as gVisor, the contents are lost.
    path = tmp_path / "backing"
    path.write_bytes(b"x" * 3 * P)
    async with MemoryFile.open(path) as mf:
        assert os.fstat(mf.fd).st_size == 0
    assert path.read_bytes() == b""


# ----------------------------------------------------- open() as a coroutine


def test_open_runs_under_asyncio_runner_run() -> None:
    # asyncio.run() and Runner.run() both insist on a coroutine.
    with asyncio.Runner() as runner:
        mf = runner.run(MemoryFile.open())
        assert isinstance(mf, MemoryFile)
        runner.run(mf.aclose())


def test_asyncio_run_of_open_gives_a_file() -> None:
    # In a child: the file outlives its loop there, and the process exit closes it.
    script = (
        "import asyncio\n"
        "from asyncpgalloc import MemoryFile\n"
        "print(type(asyncio.run(MemoryFile.open())).__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "MemoryFile"


async def test_open_works_with_create_task_await_and_async_with() -> None:
    mf = await asyncio.create_task(MemoryFile.open())
    await mf.aclose()
    mf = await MemoryFile.open()
    await mf.aclose()
    async with MemoryFile.open() as mf:
        assert not mf.closed
    assert mf.closed


async def test_an_unused_opener_leaves_no_unawaited_coroutine() -> None:
    opener = MemoryFile.open()
    assert asyncio.iscoroutine(opener)
    del opener
    gc.collect()  # a "never awaited" RuntimeWarning would be an error here


async def test_cancelling_open_in_a_task_propagates() -> None:
    task = asyncio.create_task(MemoryFile.open())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ------------------------------------------------------------ checkpoints


async def _saved(tmp_path: Path) -> tuple[Path, int]:
    """A checkpoint with three data blocks; returns it and its data offset."""
    async with MemoryFile.open() as mf:
        fr = mf.allocate(3 * MiB)
        fill(mf, fr, 0xAB)
        path = tmp_path / "ck"
        await mf.save(path)
    header = Header.unpack(path.read_bytes()[:HEADER_SIZE])
    assert header.blocks == 3
    return path, header.data_offset


async def test_inspect_checks_the_page_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, data_offset = await _saved(tmp_path)
    assert "3 blocks of 1.00 MiB (checksums OK)" in checkpoint_inspect.describe_checkpoint(
        str(path)
    )
    data = bytearray(path.read_bytes())
    data[data_offset + MiB + 4 + 100] ^= 0x01  # one bit of block 1's pages
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="data block 1 checksum mismatch"):
        checkpoint_inspect.describe_checkpoint(str(bad))
    assert checkpoint_inspect.inspect_main([str(bad)]) == 1
    assert "data block 1 checksum mismatch" in capsys.readouterr().err
    # Asked not to read the data, it says that it did not.
    assert checkpoint_inspect.inspect_main([str(bad), "--no-data"]) == 0
    assert "(checksums not read)" in capsys.readouterr().out
    # A truncated file: the blocks present are checked, the rest reported missing.
    short = tmp_path / "short"
    short.write_bytes(bytes(data[: data_offset + MiB + 4 + 10]))
    text = checkpoint_inspect.describe_checkpoint(str(short))
    assert "TRUNCATED" in text and "checksums of the 1 blocks present OK, 2 missing" in text


def test_python_m_asyncpgalloc_inspect_exits_1_on_damaged_pages(tmp_path: Path) -> None:
    path, data_offset = asyncio.run(_saved(tmp_path))
    data = bytearray(path.read_bytes())
    data[data_offset] ^= 0xFF
    path.write_bytes(bytes(data))
    for extra, status in (([], 1), (["--no-data"], 0)):
        result = subprocess.run(
            [sys.executable, "-m", "asyncpgalloc", "inspect", str(path), *extra],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == status, (result.stdout, result.stderr)
    assert "checksums not read" in result.stdout


async def test_saving_into_a_missing_directory_names_the_destination(
    mf: MemoryFile, tmp_path: Path
) -> None:
    mf.dec_ref(mf.allocate(P))
    dest = tmp_path / "missing" / "ck"
    with pytest.raises(FileNotFoundError) as exc:
        await mf.save(dest)
    assert exc.value.filename == str(dest)
    assert "no directory" in str(exc.value) and ".tmp" not in str(exc.value)
    readonly = tmp_path / "file"
    readonly.write_bytes(b"")
    with pytest.raises(NotADirectoryError) as exc2:
        await mf.save(readonly / "ck")
    assert exc2.value.filename == str(readonly / "ck") and ".tmp" not in str(exc2.value)
