"""The working-set order: recorded from guests' faults after a restore, saved in the
checkpoint (a versioned, checksummed metadata section), read first by the next restore's
loader, and exposed in stats(), the metrics and ``inspect``.

The guest tests run real guest processes (``examples/sandbox_guest.py --touches``) whose
touches fault through a userfaultfd the file's FaultServer serves, with the real loader
job behind a :class:`Stepper` that lets its reads through one at a time."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import checkpoint_bytes, checkpoint_parts, fill, load_example
from test_async_load import Gate
from test_uffd import Restored, _opts, ckpt, needs_uffd

import asyncpgalloc.checkpoint_io as cio
import asyncpgalloc.loader as loader_mod
from asyncpgalloc import (
    AllocationMode,
    AllocOpts,
    CheckpointError,
    FileRange,
    MemoryFile,
)
from asyncpgalloc.checkpoint_format import (
    FLAG_WORKING_SET,
    HEADER_SIZE,
    WORKING_SET_GRANULE,
    Header,
    crc,
)
from asyncpgalloc.checkpoint_inspect import describe_checkpoint
from asyncpgalloc.metrics import render_metrics
from asyncpgalloc.working_set import WorkingSet, touched_granules

__all__ = ["ckpt"]  # the fixture, imported for its name

gp = load_example("guest_protocol")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MiB = 1 << 20
COMMIT = AllocOpts(mode=AllocationMode.COMMIT)
#: 1 MiB allocations in the small checkpoint: one data block each.
COUNT = 12


class Stepper:
    """Wraps the loader's blocking job: records each batch's block numbers; the n-th
    job (from 1) waits in its thread until ``allow(n)`` (or ``allow_all``)."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self.batches: list[list[int]] = []
        self.allowed = 0
        self.cond = threading.Condition()

    def __call__(self, *args: Any) -> None:
        with self.cond:
            self.batches.append([block.number for block, _ in args[4]])
            ticket = len(self.batches)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.allowed >= ticket, timeout=20)
        self.fn(*args)

    def allow(self, n: int) -> None:
        with self.cond:
            self.allowed = max(self.allowed, n)
            self.cond.notify_all()

    def allow_all(self) -> None:
        self.allow(1 << 30)

    def started(self) -> int:
        with self.cond:
            return len(self.batches)


@pytest.fixture
def stepper(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stepper]:
    """One 1 MiB block per loader job, each held until the test allows it."""
    monkeypatch.setattr(cio, "BATCH_BLOCKS", 1)
    s = Stepper(loader_mod._read_blocks_job)
    monkeypatch.setattr(loader_mod, "_read_blocks_job", s)
    yield s
    s.allow_all()  # nothing left waiting in a thread


@pytest.fixture
def waiting_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Faults wait for the loader instead of copying from the checkpoint (no claim is
    ever granted), so that the loader's order shows each fault and a guest stays in its
    fault until the test lets the block through. The order is recorded before the claim
    either way (FaultServer._fault)."""
    monkeypatch.setattr(loader_mod.PageLoader, "claim", lambda *_args: None)


@pytest.fixture
async def small(tmp_path: Path) -> tuple[Path, list[FileRange]]:
    """A checkpoint of COUNT committed 1 MiB allocations, allocation i filled with i + 1
    (data block i), with no working-set order."""
    async with MemoryFile.open() as mf:
        frs = [mf.allocate(MiB, COMMIT) for _ in range(COUNT)]
        for i, fr in enumerate(frs):
            fill(mf, fr, i + 1)
        path = tmp_path / "small.ckpt"
        await mf.save(path)
    return path, frs


async def save_with_order(src: Path, dst: Path, offsets: list[int]) -> tuple[int, ...]:
    """Load ``src``, record faults at ``offsets`` (through the file's public hook), save
    to ``dst``; the order saved."""
    async with await MemoryFile.load(src) as mf:
        for off in offsets:
            mf.record_fault(off)
        order = mf.working_set_order()
        await mf.save(dst)
    return order


def test_the_recorder_dedupes_by_granule_and_keeps_to_its_limit() -> None:
    ws = WorkingSet(limit=3)
    g = WORKING_SET_GRANULE
    assert ws.record(5 * g + 4096, prefetched=False)
    assert not ws.record(5 * g, prefetched=True)  # the same range: counted, not recorded
    assert ws.record(2 * g, prefetched=None)  # no data there: neither hit nor miss
    assert ws.record(9 * g + 1, prefetched=True)
    assert not ws.record(7 * g, prefetched=False)  # full
    assert ws.order() == (5 * g, 2 * g, 9 * g)
    st = ws.stats()
    assert (st.entries, st.dropped, st.hits, st.misses) == (3, 1, 2, 2)
    assert st.hit_rate == 0.5


async def test_the_order_survives_a_save_load_round_trip(
    small: tuple[Path, list[FileRange]], tmp_path: Path
) -> None:
    path, frs = small
    dst = tmp_path / "ordered.ckpt"
    touches = [frs[9].start + 4096, frs[3].start, frs[9].start, frs[7].start + MiB - 1]
    order = await save_with_order(path, dst, touches)
    assert order == (frs[9].start, frs[3].start, frs[7].start)
    with dst.open("rb") as f:
        assert Header.unpack(f.read(HEADER_SIZE)).flags & FLAG_WORKING_SET
    for async_pages in (False, True):
        async with await MemoryFile.load(dst, async_pages=async_pages) as mf:
            assert mf.working_set_order() == order
            st = mf.stats()
            assert st.working_set_entries == st.working_set_inherited == 3
            await mf.wait_loaded()
            for i, fr in enumerate(frs):  # the pages are the checkpoint's, whatever the order
                assert bytes(mf.map_internal(fr)[0][:1]) == bytes([i + 1])
            mf.record_fault(frs[1].start)  # a new first touch comes after the inherited
            assert mf.working_set_order() == (*order, frs[1].start)
    text = describe_checkpoint(str(dst))
    assert "working-set order:  3 ranges of 1.00 MiB read first" in text
    assert f"{frs[9].start:#x}, {frs[3].start:#x}, {frs[7].start:#x}" in text
    assert "working-set order:  none" in describe_checkpoint(str(path))


async def test_a_checkpoint_without_an_order_is_the_old_format_and_loads(
    small: tuple[Path, list[FileRange]],
) -> None:
    path, _ = small
    header, _metadata, _data = checkpoint_parts(path.read_bytes())
    assert not header.flags & FLAG_WORKING_SET  # nothing recorded: no section, no flag
    async with await MemoryFile.load(path, async_pages=True) as mf:
        assert mf.working_set_order() == ()
        assert mf.stats().working_set_inherited == 0
        await mf.wait_loaded()


async def test_the_recorded_order_changes_the_loaders_order(
    small: tuple[Path, list[FileRange]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, frs = small
    dst = tmp_path / "ordered.ckpt"
    await save_with_order(path, dst, [frs[9].start, frs[3].start, frs[10].start])
    monkeypatch.setattr(cio, "BATCH_BLOCKS", 1)
    for src, first in ((path, [0, 1, 2, 3]), (dst, [9, 3, 10, 0])):
        gate = Gate(loader_mod._read_blocks_job, nth=1 << 30)  # records, never holds
        monkeypatch.setattr(loader_mod, "_read_blocks_job", gate)
        async with await MemoryFile.load(src, async_pages=True) as mf:
            await mf.wait_loaded()
            assert [b for batch in gate.batches for b in batch][:4] == first
            assert sorted(b for batch in gate.batches for b in batch) == list(range(COUNT))
            for i, fr in enumerate(frs):
                assert bytes(mf.map_internal(fr)[0][:1]) == bytes([i + 1])


def _section(raw: bytes) -> tuple[Header, bytes, bytes, int]:
    """A checkpoint's header, metadata, data, and where its order section's footer is
    in the metadata."""
    header, metadata, data = checkpoint_parts(raw)
    return header, metadata, data, len(metadata) - 24


async def test_a_damaged_order_section_is_an_error_naming_it(
    small: tuple[Path, list[FileRange]], tmp_path: Path
) -> None:
    path, frs = small
    dst = tmp_path / "ordered.ckpt"
    await save_with_order(path, dst, [frs[5].start, frs[2].start])
    raw = dst.read_bytes()
    header, metadata, data, foot = _section(raw)
    damaged = tmp_path / "damaged.ckpt"

    # One flipped bit in an entry, and in the footer: the section's own CRC fails.
    for at in (foot - 8, foot + 12):
        bad = bytearray(raw)
        bad[HEADER_SIZE + at] ^= 0x10
        damaged.write_bytes(bad)
        for async_pages in (False, True):
            with pytest.raises(CheckpointError, match="working-set order section checksum"):
                await MemoryFile.load(damaged, async_pages=async_pages)
        with pytest.raises(CheckpointError, match="working-set order section checksum"):
            describe_checkpoint(str(damaged))

    # Damage outside it is still the metadata's.
    bad = bytearray(raw)
    bad[HEADER_SIZE + 3] ^= 1
    damaged.write_bytes(bad)
    with pytest.raises(CheckpointError, match="metadata checksum mismatch"):
        await MemoryFile.load(damaged)

    def forged(edit: Callable[[bytearray], None]) -> bytes:
        """The section edited, with its CRC and every other checksum made valid."""
        meta = bytearray(metadata)
        edit(meta)
        count = struct.unpack_from("<I", meta, foot + 16)[0]
        body = bytes(meta[foot - 8 * count : foot + 20])
        struct.pack_into("<I", meta, foot + 20, crc(body))
        return checkpoint_bytes(header, bytes(meta), data)

    cases: list[tuple[Callable[[bytearray], None], str]] = [
        (lambda m: struct.pack_into("<I", m, foot + 8, 2), "version 2 is not supported"),
        (lambda m: struct.pack_into("<Q", m, foot - 8, frs[2].start + 4096), "unaligned"),
        (lambda m: struct.pack_into("<Q", m, foot - 8, frs[5].start), "repeated"),
        (lambda m: struct.pack_into("<Q", m, foot - 8, 1 << 40), "beyond the file"),
        (lambda m: struct.pack_into("<I", m, foot + 16, 1 << 20), "corrupt"),
        (lambda m: m.__setitem__(slice(foot, foot + 8), b"APGAXXXX"), "corrupt"),
    ]
    for edit, match in cases:
        damaged.write_bytes(forged(edit))
        with pytest.raises(CheckpointError, match=f"working-set order section.*{match}"):
            await MemoryFile.load(damaged, async_pages=True)


async def test_the_order_and_its_hit_rate_are_in_stats_and_metrics(
    small: tuple[Path, list[FileRange]], tmp_path: Path, stepper: Stepper
) -> None:
    path, frs = small
    dst = tmp_path / "ordered.ckpt"
    await save_with_order(path, dst, [frs[8].start, frs[4].start])
    async with await MemoryFile.load(dst, async_pages=True) as mf:
        while stepper.started() < 2:  # blocks 8 and 4 are being read (held)
            await asyncio.sleep(0.001)
        mf.record_fault(frs[8].start)  # started: a hit
        mf.record_fault(frs[4].start + 4096)  # started: a hit
        mf.record_fault(frs[11].start)  # still queued: a miss
        mf.record_fault(mf.total_size() - 4096)  # no data there: neither
        mf.record_fault(mf.total_size())  # beyond the file: ignored
        st = mf.stats()
        assert (st.working_set_hits, st.working_set_misses) == (2, 1)
        assert st.working_set_entries == 4 and st.working_set_inherited == 2
        assert st.working_set_hit_rate == pytest.approx(2 / 3)
        text = render_metrics(mf).decode()
        assert "asyncpgalloc_working_set_entries 4.0" in text
        assert 'asyncpgalloc_working_set_faults_total{result="hit"} 2.0' in text
        assert 'asyncpgalloc_working_set_faults_total{result="miss"} 1.0' in text
        assert "asyncpgalloc_working_set_hit_ratio 0.666" in text
        stepper.allow_all()
        await mf.wait_loaded()


# ---------------------------------------------------------------- real guests


async def wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.002)


def faulted(r: Restored, n: int) -> bool:
    """The guest's ``n``-th fault is in and waits for the loader."""
    st = r.server.stats()
    return bool(st.faults >= n and st.waiting == 1)


async def start_toucher(r: Restored, tmp_path: Path, touches: list[tuple[int, int, float]]) -> None:
    spec = tmp_path / f"touches-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps(touches))
    r.proc, r.task = await gp.start_guest(
        r.mf,
        r.session,
        "--touches",
        str(spec),
        stdout=asyncio.subprocess.PIPE,
        fault_mode=gp.FaultMode.UFFD,
    )


@needs_uffd
async def test_a_guests_first_touches_are_saved_and_read_first_on_the_next_restore(
    ckpt: tuple[Path, list[tuple[int, int, int]]],
    tmp_path: Path,
    stepper: Stepper,
    waiting_faults: None,
) -> None:
    path, specs = ckpt
    data = [(o, n) for o, n, _t in specs[:-1]]  # the hole holds no data
    assert data[0][0] == 0 and all(a + n == b for (a, n), (b, _) in itertools.pairwise(data))
    # One page in each of three blocks (block i holds file offset i MiB here), none of
    # them among the first the loader reads in file order.
    blocks = [13, 9, 6]
    touches = [(b * MiB + 4096, 4096, 0.0) for b in blocks]

    # The first restore, with no order: each touch faults on a block still queued.
    async with await MemoryFile.load(path, _opts(), async_pages=True) as mf:
        r = Restored(mf, specs)
        kept = [FileRange(o, o + n) for o, n, _t in specs]
        for fr in kept:  # the guest's pages outlive it, for the next save
            mf.inc_ref(fr)
        await start_toucher(r, tmp_path, touches)
        for k in range(len(blocks)):
            # Two reads in flight, held; the guest faults on its block, which goes
            # next: let those two and it through.
            await wait_for(functools.partial(faulted, r, k + 1), f"fault {k} not seen")
            stepper.allow(3 * (k + 1))
        rc, counts = await r.result()
        assert rc == 0 and counts["touched_bytes"] == 3 * 4096, counts
        flat = [b for batch in stepper.batches for b in batch]
        assert flat[:3] == [0, 1, 13] and flat.index(9) < flat.index(6) < 9, flat
        assert mf.working_set_order() == tuple(b * MiB for b in blocks)
        st = mf.stats()
        assert (st.working_set_hits, st.working_set_misses) == (0, 3)
        assert st.working_set_entries == 3 and st.working_set_inherited == 0
        stepper.allow_all()
        await mf.wait_loaded()
        second = tmp_path / "second.ckpt"
        await mf.save(second)
        for fr in kept:
            mf.dec_ref(fr)

    # The next restore reads those blocks first, in that order, with a guest attached
    # (its fault server waits for the whole file without reordering it); the guest's
    # touches land in blocks already being read: hits.
    stepper.batches.clear()
    stepper.allowed = 0
    async with await MemoryFile.load(second, _opts(), async_pages=True) as mf:
        assert mf.working_set_order() == tuple(b * MiB for b in blocks)
        r = Restored(mf, specs)
        await wait_for(lambda: stepper.started() == 2, "the loader did not start")
        await start_toucher(r, tmp_path, touches[:2])
        await wait_for(lambda: faulted(r, 1), "the guest did not fault on block 13")
        stepper.allow(1)  # block 13 in: the guest goes on to block 9, still being read
        await wait_for(lambda: faulted(r, 2), "the guest did not fault on block 9")
        stepper.allow_all()
        rc, counts = await r.result()
        assert rc == 0 and counts["touched_bytes"] == 2 * 4096, counts
        await mf.wait_loaded()
        flat = [b for batch in stepper.batches for b in batch]
        assert flat[:4] == [13, 9, 6, 0], flat
        st = mf.stats()
        assert st.working_set_hits == 2 and st.working_set_misses == 0
        assert st.working_set_hit_rate == 1.0
        assert st.working_set_inherited == 3
        assert r.server.stats().failure == ""


#: A guest that attaches its uffd, says so, then execs ``sleep``: its old mm (the one
#: the uffd serves) is gone while the process lives on, pidfd not readable.
EXEC_GUEST = r"""
import os, random, socket, sys
sys.path.insert(0, EXAMPLES)
from guest_protocol import GuestChannel
from sandbox_guest import Guest
ch = GuestChannel(socket.socket(fileno=int(sys.argv[2])))
hello, memfd = ch.hello()
Guest(ch, memfd, random.Random(0)).attach_uffd()
print("attached", flush=True)
os.execv("/bin/sleep", ["sleep", "60"])
"""


@needs_uffd
async def test_a_guest_whose_mm_is_gone_when_the_load_ends_is_not_killed(
    ckpt: tuple[Path, list[tuple[int, int, int]]],
    tmp_path: Path,
    stepper: Stepper,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """UFFDIO_UNREGISTER fails with ENOMEM once the guest's mm is gone (an exit racing
    with the end of the load, or an exec); the server killed the guest for it."""
    program = tmp_path / "exec_guest.py"
    examples = EXAMPLES
    program.write_text(EXEC_GUEST.replace("EXAMPLES", repr(str(examples))))
    monkeypatch.setattr(gp, "GUEST_PROGRAM", program)
    path, _specs = ckpt
    async with await MemoryFile.load(path, _opts(), async_pages=True) as mf:
        session = gp.GuestSession(mf, memcg_id=1)
        proc, task = await gp.start_guest(
            mf, session, stdout=asyncio.subprocess.PIPE, fault_mode=gp.FaultMode.UFFD
        )
        try:
            assert proc.stdout is not None
            assert await asyncio.wait_for(proc.stdout.readline(), 20) == b"attached\n"
            comm = Path(f"/proc/{proc.pid}/comm")
            await wait_for(lambda: comm.read_text() == "sleep\n", "the guest did not exec")
            server = session.faults
            assert server is not None
            stepper.allow_all()
            await mf.wait_loaded()
            await asyncio.wait_for(server.wait_closed(), 20)
            assert server.stats().failure == ""
            assert proc.returncode is None  # not killed
        finally:
            proc.kill()
            await proc.wait()
            await task


@needs_uffd
async def test_ranges_a_guest_touched_without_a_fault_join_the_order_once_loaded(
    ckpt: tuple[Path, list[tuple[int, int, int]]],
    tmp_path: Path,
    stepper: Stepper,
    waiting_faults: None,
) -> None:
    """A range loaded before the guest touched it never faults: the server finds it in
    the guest's page table when the load is done."""
    path, specs = ckpt
    async with await MemoryFile.load(path, _opts(), async_pages=True) as mf:
        r = Restored(mf, specs)
        stepper.allow(2)  # blocks 0 and 1
        await mf.wait_loaded(FileRange(0, 2 * MiB))
        # Away from block 1's edges: the kernel's fault-around maps up to 15 pages of
        # the page cache around a touch, which may spill into a neighbouring range.
        touches = [(MiB + 256 * 1024, 4096, 0.0), (13 * MiB + 256 * 1024, 4096, 0.0)]
        await start_toucher(r, tmp_path, touches)
        await wait_for(lambda: faulted(r, 1), "the guest did not fault on block 13")
        assert mf.working_set_order() == (13 * MiB,)  # block 1 took no fault
        assert r.proc is not None
        r.proc.send_signal(signal.SIGSTOP)  # alive (its page table too) until the end
        try:
            stepper.allow_all()
            await mf.wait_loaded()
            await asyncio.wait_for(r.server.wait_closed(), 20)
            assert r.server.stats().unregistered
            assert mf.working_set_order() == (13 * MiB, MiB)
            st = mf.stats()
            assert (st.working_set_hits, st.working_set_misses) == (0, 1)
        finally:
            r.proc.send_signal(signal.SIGCONT)
        rc, counts = await r.result()
        assert rc == 0 and counts["touched_bytes"] == 2 * 4096, counts


@needs_uffd
async def test_a_guest_that_ends_before_the_load_still_leaves_its_touches_in_the_order(
    ckpt: tuple[Path, list[tuple[int, int, int]]],
    tmp_path: Path,
    stepper: Stepper,
    waiting_faults: None,
) -> None:
    """While the load runs the server looks at the guest's page table now and then: a
    guest killed before the load is done has its touches recorded all the same."""
    path, specs = ckpt
    async with await MemoryFile.load(path, _opts(), async_pages=True) as mf:
        r = Restored(mf, specs)
        stepper.allow(2)  # blocks 0 and 1
        await mf.wait_loaded(FileRange(0, 2 * MiB))
        touches = [(MiB + 256 * 1024, 4096, 0.0), (13 * MiB + 256 * 1024, 4096, 0.0)]
        await start_toucher(r, tmp_path, touches)
        await wait_for(lambda: faulted(r, 1), "the guest did not fault on block 13")
        await wait_for(lambda: MiB in mf.working_set_order(), "block 1 was never sampled")
        assert r.proc is not None
        r.proc.kill()  # mid-fault, the load still held
        rc, _ = await r.result()
        assert rc == -signal.SIGKILL
        await asyncio.wait_for(r.server.wait_closed(), 20)
        stepper.allow_all()
        await mf.wait_loaded()
        assert mf.working_set_order() == (13 * MiB, MiB)


#: Maps the memfd (fd argv[1]) and reads one byte at each offset of argv[2:], prints the
#: mapping's address, then waits for its stdin to close.
TOUCHER = r"""
import ctypes, mmap, os, sys
m = mmap.mmap(int(sys.argv[1]), os.fstat(int(sys.argv[1])).st_size)
for off in sys.argv[2:]:
    m[int(off)]
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
sys.stdin.read()
"""


async def test_the_page_table_shows_the_ranges_touched_not_fault_arounds_neighbours() -> None:
    """Pages in the page cache around a touch are mapped too (fault-around, up to 15):
    a neighbouring range's edge pages do not make it touched."""
    fd = os.memfd_create("ws")
    try:
        os.ftruncate(fd, 8 * MiB)
        for off in range(0, 8 * MiB, 4096):  # all in the page cache
            os.pwrite(fd, b"x", off)
        # Range 1 at its first page, range 3 in its middle, range 5 at its last page;
        # fault-around spills into ranges 0, 4 and 6 at most.
        touches = [MiB, 3 * MiB + MiB // 2, 6 * MiB - 4096]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            TOUCHER,
            str(fd),
            *map(str, touches),
            pass_fds=(fd,),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdin is not None
        base = int(await proc.stdout.readline())
        mapped = touched_granules(proc.pid, base - base % 4096, 8 * MiB, 0)
        proc.stdin.close()
        assert await proc.wait() == 0
    finally:
        os.close(fd)
    # Range 3, and never 0 or 6, which only fault-around reached; 1 and 5 (touched at
    # an edge) are counted if their own fault-around reached 15 pages in.
    assert 3 * MiB in mapped and set(mapped) <= {MiB, 3 * MiB, 5 * MiB}, mapped
