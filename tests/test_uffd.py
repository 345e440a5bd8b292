"""Restored guests fault in their own memory through a userfaultfd served on the loop.

Real guest processes (``examples/sandbox_guest.py``) get the memfd of a file loaded with
``async_pages=True`` at once, register their mapping of it with a userfaultfd and read
their ranges through it while the loader is held back (the real loader job behind a
gate): a fault on a block the loader has not started is copied straight from the
checkpoint (``UFFDIO_COPY``); one on a block the loader is reading waits for it. Tests
that need a guest stuck in a copy hold the copy job too (``held_copies``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import errno
import json
import mmap
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import load_example
from test_async_load import Gate, damage

import asyncpgalloc.checkpoint_io as cio
import asyncpgalloc.loader as loader_mod
from asyncpgalloc import (
    PAGE_SIZE,
    AccessType,
    AllocationMode,
    AllocOpts,
    CheckpointError,
    DelayedEviction,
    FileRange,
    LoadProgress,
    MemoryFile,
    MemoryFileOpts,
    PagesNotLoadedError,
)
from asyncpgalloc import uffd as U
from asyncpgalloc.blocking import LEND_SECONDS, BlockingRunner, hold_lending
from asyncpgalloc.uffd import FaultMode
from asyncpgalloc.uffd_server import FaultServer

gp = load_example("guest_protocol")
HERE = Path(__file__).resolve().parent

MiB = 1 << 20
#: Ranges in the checkpoint: RANGES of RANGE bytes filled with a token each, then one
#: committed but never written (zero pages) and one never committed (holes).
RANGES = 4
RANGE = 4 * MiB
COMMIT = AllocOpts(mode=AllocationMode.COMMIT)

needs_uffd = pytest.mark.skipif(
    U.probe().mode is FaultMode.WAIT, reason=f"no userfaultfd for shmem: {U.probe().reason}"
)


def _opts() -> MemoryFileOpts:
    return MemoryFileOpts(delayed_eviction=DelayedEviction.MANUAL)


def fds() -> set[str]:
    """This process's fds and what they are, but /dev/null (uvloop keeps one open for
    its children once it has started one)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link != "/dev/null":
                out.add(f"{fd}: {link}")
    return out


@pytest.fixture
async def ckpt(tmp_path: Path) -> tuple[Path, list[tuple[int, int, int]]]:
    """A checkpoint of RANGES filled ranges, a zero one and a hole: (offset, length,
    token) each."""
    rng = random.Random(19)
    specs: list[tuple[int, int, int]] = []
    async with MemoryFile.open(opts=_opts()) as mf:
        for _ in range(RANGES):
            fr = mf.allocate(RANGE, COMMIT)
            token = rng.getrandbits(64)
            pattern = struct.pack("<Q", token) * (RANGE // 8)
            pos = 0
            for v in mf.map_internal(fr, AccessType.WRITE):
                v[:] = pattern[pos : pos + len(v)]
                pos += len(v)
            specs.append((fr.start, fr.length, token))
        fr = mf.allocate(RANGE, COMMIT)
        specs.append((fr.start, fr.length, 0))
        fr = mf.allocate(RANGE)  # never committed: holes in the memfd, after a load too
        specs.append((fr.start, fr.length, 0))
        path = tmp_path / "guest.ckpt"
        await mf.save(path)
    return path, specs


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    """One 1 MiB block per loader job, every job held in its thread until released."""
    monkeypatch.setattr(cio, "BATCH_BLOCKS", 1)
    g = Gate(loader_mod._read_blocks_job)
    monkeypatch.setattr(loader_mod, "_read_blocks_job", g)
    return g


class HeldCopies:
    """Wraps the fault copy's blocking job: each waits in its thread until ``release``
    (the loader gate's) is set; ``entered`` counts the copies that started."""

    def __init__(self, fn: Any, release: threading.Event) -> None:
        self.fn = fn
        self.release = release
        self.entered = 0

    def __call__(self, *args: Any) -> None:
        self.entered += 1
        self.release.wait(10)
        self.fn(*args)

    async def wait_entered(self, n: int = 1) -> None:
        deadline = time.monotonic() + 20
        while self.entered < n:
            assert time.monotonic() < deadline, "no fault copy started"
            await asyncio.sleep(0.001)


@pytest.fixture
def held_copies(monkeypatch: pytest.MonkeyPatch, gate: Gate) -> HeldCopies:
    """Every fault copy held in its thread (none inline) until ``gate.release``."""
    monkeypatch.setattr(loader_mod, "INLINE_COPY_BYTES", 0)
    h = HeldCopies(loader_mod._copy_blocks_job, gate.release)
    monkeypatch.setattr(loader_mod, "_copy_blocks_job", h)
    return h


class Restored:
    """A restored file, a session holding the checkpoint's ranges, and its guest."""

    def __init__(self, mf: MemoryFile, specs: list[tuple[int, int, int]]) -> None:
        self.mf = mf
        self.specs = specs
        self.session = gp.GuestSession(mf, memcg_id=1)
        self.session.adopt([(FileRange(o, o + n), "anon") for o, n, _t in specs])
        self.proc: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(
        self, order: list[int], mode: FaultMode | None = FaultMode.UFFD, *extra: str
    ) -> None:
        args = [f"--verify={o}:{n}:{t}" for o, n, t in (self.specs[i] for i in order)]
        args += extra
        self.proc, self.task = await gp.start_guest(
            self.mf, self.session, *args, stdout=asyncio.subprocess.PIPE, fault_mode=mode
        )

    async def first_wait(self, waiters: int = 2) -> None:
        """Until the guest is in a fault that waits for the loader (a hang guard only);
        ``waiters=1`` for one held in its copy."""
        deadline = time.monotonic() + 20
        # The fault's wait and the server's own one for the whole file are both on.
        while self.server.stats().waiting == 0 or self.progress().waiters < waiters:
            assert time.monotonic() < deadline, "the guest never faulted on a pending page"
            await asyncio.sleep(0.002)

    def progress(self) -> LoadProgress:
        progress = self.mf.load_progress()
        assert progress is not None
        return progress

    @property
    def server(self) -> Any:
        assert self.session.faults is not None
        return self.session.faults

    async def result(self) -> tuple[int, dict[str, int]]:
        assert self.proc is not None and self.proc.stdout is not None and self.task
        out = await self.proc.stdout.read()
        rc = await self.proc.wait()
        await self.task
        return rc, (json.loads(out) if out else {})


@pytest.fixture
async def restored(
    ckpt: tuple[Path, list[tuple[int, int, int]]], gate: Gate
) -> AsyncIterator[Restored]:
    """The checkpoint loaded with async pages, its loader held by ``gate`` from the first."""
    path, specs = ckpt
    mf = await MemoryFile.load(path, _opts(), async_pages=True)
    try:
        yield Restored(mf, specs)
    finally:
        await mf.aclose()


def test_the_probe_finds_userfaultfd_for_shmem_here() -> None:
    found = U.probe()
    assert found.mode is not FaultMode.WAIT, found.reason
    assert found.features & U.FEATURE_MISSING_SHMEM
    assert U.probe() is found  # probed (and logged) once


def test_the_ioctls_fail_with_a_clear_error() -> None:
    fd = U.open_uffd()
    try:
        U.api(fd)
        m = mmap.mmap(-1, PAGE_SIZE)
        with pytest.raises(U.UffdError) as info:
            U.api(fd)  # a second handshake
        assert info.value.errno == errno.EINVAL and "UFFDIO_API" in str(info.value)
        with pytest.raises(U.UffdError) as info:
            U.wake(fd, 12345, PAGE_SIZE)  # unaligned
        assert info.value.errno == errno.EINVAL and "UFFDIO_WAKE [0x3039" in str(info.value)
        m.close()
    finally:
        os.close(fd)


@needs_uffd
async def test_a_restored_guest_faults_in_exactly_the_checkpoints_bytes(
    restored: Restored, gate: Gate
) -> None:
    # The hole and the zero range first, then the filled ones from the last: none is
    # loaded yet.
    await restored.start([RANGES + 1, RANGES, *range(RANGES - 1, -1, -1)])
    assert restored.session.fault_mode == "uffd"
    # Blocks the loader has not started are copied for its faults (a fault on a page
    # of a block still being copied waits for it, as for one the loader holds).
    await restored.first_wait()
    copied = restored.server.stats().copied_bytes
    loaded = restored.progress().loaded_bytes  # all by fault copies: the loader is held
    assert 0 < copied <= loaded  # (a copy's bytes count once its server sees it end)
    assert restored.progress().pending_bytes == (RANGES + 1) * RANGE - loaded
    gate.release.set()
    rc, counts = await restored.result()
    assert rc == 0, counts
    total = (RANGES + 2) * RANGE
    assert counts["verified_bytes"] == counts["faulted_bytes"] == total  # every byte compared
    assert counts["bad_bytes"] == counts["errors"] == 0
    await restored.mf.wait_loaded()
    await restored.server.wait_closed()
    st = restored.server.stats()
    assert st.waited >= 1 and st.woken >= 1 and st.failure == ""
    assert st.copied * MiB == st.copied_bytes >= copied  # one 1 MiB block per copy
    assert st.zeroed >= RANGE // PAGE_SIZE  # the hole's pages, one zero page each
    assert st.unregistered and st.closed and st.waiting == 0
    assert restored.session.closed_for == "bye"


@needs_uffd
async def test_an_unprivileged_guest_faults_in_with_user_mode_only(
    restored: Restored, gate: Gate
) -> None:
    await restored.start([RANGES - 1, 0], FaultMode.UFFD, "--uid", "65534")
    assert restored.session.fault_mode == "uffd-user"
    await restored.first_wait()
    gate.release.set()
    rc, counts = await restored.result()
    assert rc == 0, counts
    assert counts["verified_bytes"] == counts["faulted_bytes"] == 2 * RANGE
    assert counts["bad_bytes"] == counts["errors"] == 0


@needs_uffd
async def test_a_guest_killed_mid_fault_leaves_nothing_behind(
    restored: Restored, gate: Gate
) -> None:
    before = fds()
    await restored.start([0])  # its first block is one the loader holds
    await restored.first_wait()
    progress = restored.mf.load_progress()
    # The guest's fault and the server's wait for the whole file (to unregister then).
    assert progress is not None and progress.waiters == 2
    assert restored.proc is not None
    restored.proc.kill()
    rc, _ = await restored.result()
    assert rc == -signal.SIGKILL
    await restored.server.wait_closed()
    await asyncio.sleep(0)  # the cancelled wait leaves the loader
    st = restored.server.stats()
    assert st.closed and st.waiting == 0 and st.failure == "" and not st.unregistered
    progress = restored.mf.load_progress()
    assert progress is not None and progress.waiters == 0
    assert fds() == before  # its uffd and pidfd closed, its socket gone
    assert restored.session.used_bytes == 0  # every page it held freed
    gate.release.set()
    await restored.mf.wait_loaded()  # the load goes on
    restored.mf.check_invariants()


@needs_uffd
async def test_a_damaged_block_under_a_waiting_guest_kills_it_and_the_supervisor_goes_on(
    ckpt: tuple[Path, list[tuple[int, int, int]]], gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    path, specs = ckpt
    last = RANGES - 1
    damage(path, specs[last][0] // MiB)  # the first block the guest touches
    async with await MemoryFile.load(path, _opts(), async_pages=True) as mf:
        r = Restored(mf, specs)
        await r.start([last])
        await r.first_wait()
        gate.release.set()
        rc, counts = await r.result()
        assert rc == -signal.SIGKILL and counts == {}  # killed before it read a byte
        assert "checksum mismatch" in r.server.stats().failure
        assert any("killed" in m and "checksum mismatch" in m for m in caplog.messages)
        assert r.session.closed_for == "hung up" and r.session.used_bytes == 0
    # The supervisor goes on: another guest on a fresh file runs as ever.
    async with MemoryFile.open(opts=_opts()) as fresh:
        session = gp.GuestSession(fresh, memcg_id=2)
        proc, task = await gp.start_guest(
            fresh, session, "--seconds", "0.2", stdout=asyncio.subprocess.PIPE
        )
        assert proc.stdout is not None
        out = await proc.stdout.read()
        assert await proc.wait() == 0
        await task
        assert json.loads(out)["bad_bytes"] == 0


@needs_uffd
async def test_aclose_with_a_guest_waiting_kills_the_guest(restored: Restored, gate: Gate) -> None:
    await restored.start([0])
    await restored.first_wait()
    closing = asyncio.create_task(restored.mf.aclose())
    await asyncio.sleep(0)
    gate.release.set()  # the two jobs in flight finish; the guest's next block never starts
    await closing
    rc, counts = await restored.result()
    assert rc == -signal.SIGKILL and counts == {}
    await restored.server.wait_closed()
    st = restored.server.stats()
    # Its wait ended with the block's job; its next fault found the file closed (or,
    # had it come first, the load's end).
    assert st.woken == 1 and st.copied == 0 and st.closed and st.waiting == 0
    assert "closed before its pages were loaded" in st.failure or "cannot be" in st.failure


@needs_uffd
async def test_aclose_with_a_guest_in_a_copy_waits_for_it_then_kills_the_guest(
    restored: Restored, held_copies: HeldCopies
) -> None:
    await restored.start([RANGES - 1])
    await restored.first_wait(waiters=1)  # held in the copy of its first block
    await held_copies.wait_entered()
    closing = asyncio.create_task(restored.mf.aclose())
    await asyncio.sleep(0.05)
    assert not closing.done()  # the copy reads the checkpoint: its fd stays open
    held_copies.release.set()
    await closing
    rc, counts = await restored.result()
    assert rc == -signal.SIGKILL and counts == {}  # the next block's fault: no load left
    await restored.server.wait_closed()
    st = restored.server.stats()
    assert st.copied == 1 and st.waiting == 0
    # Woken by the copy, its next fault found the file closed (or, after it, no load).
    assert "closed before its pages were loaded" in st.failure or "cannot be" in st.failure


@needs_uffd
async def test_cancelling_the_load_with_guests_waiting_and_copying_kills_them(
    ckpt: tuple[Path, list[tuple[int, int, int]]], held_copies: HeldCopies
) -> None:
    path, specs = ckpt
    before = fds()
    async with await MemoryFile.load(path, _opts(), async_pages=True) as mf:
        waiting, copying = Restored(mf, specs[:1]), Restored(mf, specs[RANGES - 1 : RANGES])
        await waiting.start([0])  # on a block the loader holds
        await copying.start([0])  # on one it copies
        await waiting.first_wait(waiters=3)
        await copying.first_wait(waiters=3)
        await held_copies.wait_entered()
        pl = mf.page_loader()
        assert pl is not None and pl.task is not None
        pl.task.cancel()
        await asyncio.sleep(0.05)
        assert not pl.task.done()  # the jobs and the copy in their threads hold it
        held_copies.release.set()
        for r in (waiting, copying):
            rc, counts = await r.result()
            assert rc == -signal.SIGKILL and counts == {}
            await r.server.wait_closed()
            st = r.server.stats()
            assert "cancelled" in st.failure and st.closed and st.waiting == 0
        assert copying.server.stats().copied == 1  # its first block landed, then the end
        progress = mf.load_progress()
        assert progress is not None and progress.waiters == 0 and progress.done
        assert "cancelled" in (progress.error or "")
        mf.check_invariants()
    assert fds() == before


@needs_uffd
async def test_a_guest_killed_in_a_copy_leaves_nothing_behind(
    restored: Restored, held_copies: HeldCopies
) -> None:
    before = fds()
    await restored.start([RANGES - 1])
    await restored.first_wait(waiters=1)
    await held_copies.wait_entered()
    assert restored.proc is not None
    restored.proc.kill()
    rc, _ = await restored.result()
    assert rc == -signal.SIGKILL
    await restored.server.wait_closed()
    st = restored.server.stats()
    assert st.closed and st.waiting == 0 and st.failure == ""
    held_copies.release.set()  # the copy finds the guest's mm gone
    await restored.mf.wait_loaded()  # the block goes back to the loader: the load goes on
    assert fds() - before == set()  # the copy's dup of the uffd closed too (and the load's fds)
    progress = restored.progress()  # the copy landed nothing; its pages were freed since
    assert progress.loaded_bytes + progress.dropped_bytes == progress.total_bytes
    assert restored.server.stats().copied_bytes == 0  # its mm was gone: nothing landed
    restored.mf.check_invariants()


async def test_without_userfaultfd_the_fd_is_handed_only_once_the_guests_ranges_are_in(
    restored: Restored, gate: Gate
) -> None:
    starting = asyncio.create_task(restored.start([0, RANGES], mode=FaultMode.WAIT))
    done, _ = await asyncio.wait([starting], timeout=0.5)
    assert not done  # the hello waits for the loader
    gate.release.set()
    await starting
    for fr, _kind in restored.session.ranges.values():
        assert restored.mf.pending_load_bytes(fr) == 0
    assert restored.session.fault_mode == "wait" and restored.session.faults is None
    rc, counts = await restored.result()
    assert rc == 0 and counts["verified_bytes"] == 2 * RANGE and counts["faulted_bytes"] == 0


async def test_two_jobs_in_flight_do_not_keep_an_idle_loop_busy_lending_the_gil() -> None:
    """Each job's lender blocks the loop LEND_SECONDS per turn while the turns look busy;
    two lenders made each other's turns look busy, for as long as both jobs ran: a loop
    with nothing else to do turned over and over, each turn 2 x LEND_SECONDS late (a
    fault server noticed each fault ~0.6 ms late while two load jobs were in flight)."""
    release = threading.Event()
    runner = BlockingRunner(concurrent.futures.ThreadPoolExecutor(2))
    jobs = [asyncio.ensure_future(runner.run(release.wait, 5)) for _ in range(2)]
    await asyncio.sleep(0.01)  # both jobs in flight, their lenders done or not
    lends = 0
    wait = threading.Event.wait

    def counting_wait(self: threading.Event, timeout: float | None = None) -> bool:
        nonlocal lends
        if timeout == LEND_SECONDS:
            lends += 1
        return wait(self, timeout)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(threading.Event, "wait", counting_wait)
        await asyncio.sleep(0.1)  # an idle loop: its poll sleeps
    release.set()
    await asyncio.gather(*jobs)
    assert lends <= 2, f"{lends} lends of the GIL on an idle loop in 0.1 s"


@pytest.mark.parametrize("held", [False, True])
async def test_a_fault_s_hold_keeps_executor_jobs_from_blocking_a_busy_loop(held: bool) -> None:
    """A job's lender blocks each busy loop turn up to LEND_SECONDS: the next fault's
    wait (a 4 KiB fault copy was 127 µs p50 beside two held loader jobs). While a fault
    server holds lending off (a fault arrived), no turn blocks."""
    release = threading.Event()
    runner = BlockingRunner(concurrent.futures.ThreadPoolExecutor(1))
    lends = 0
    wait = threading.Event.wait

    def counting_wait(self: threading.Event, timeout: float | None = None) -> bool:
        nonlocal lends
        if timeout == LEND_SECONDS:
            lends += 1
        return wait(self, timeout)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(threading.Event, "wait", counting_wait)
        if held:
            hold_lending(0.2)
        job = asyncio.ensure_future(runner.run(release.wait, 5))
        for _ in range(50):  # a busy loop: 0.3 ms of work per turn
            began = time.perf_counter()
            while time.perf_counter() - began < 0.0003:
                pass
            await asyncio.sleep(0)
        release.set()
        await job
    assert (lends == 0) if held else (lends > 0)
    await asyncio.sleep(0.2)  # the hold is over: later tests lend as ever


def _set_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


#: A supervisor in its own process: restores the checkpoint with its loader held for
#: good, starts a guest that faults, prints the guest's pid once it waits, then idles.
SUPERVISOR = r"""
import asyncio, json, sys, threading
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import asyncpgalloc.checkpoint_io as cio
import asyncpgalloc.loader as loader_mod
from test_uffd import Restored, _opts
from asyncpgalloc import MemoryFile
cio.BATCH_BLOCKS = 1
never = threading.Event()
loader_mod._read_blocks_job = lambda *args: never.wait()
async def main():
    mf = await MemoryFile.load(sys.argv[3], _opts(), async_pages=True)
    r = Restored(mf, [tuple(s) for s in json.loads(sys.argv[4])])
    await r.start([0])
    await r.first_wait()
    print(r.proc.pid, flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


@needs_uffd
async def test_a_supervisor_crash_leaves_no_guest_stuck_in_a_fault(
    ckpt: tuple[Path, list[tuple[int, int, int]]],
) -> None:
    path, specs = ckpt
    sup = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SUPERVISOR,
        str(HERE),
        str(HERE.parent / "examples"),
        str(path),
        json.dumps(specs),
        stdout=asyncio.subprocess.PIPE,
    )
    assert sup.stdout is not None
    line = await asyncio.wait_for(sup.stdout.readline(), 60)
    guest = int(line)
    pidfd = os.pidfd_open(guest)  # the guest is not our child: watch it through a pidfd
    try:
        sup.kill()  # the supervisor crashes with the guest in a fault
        await sup.wait()
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()
        loop.add_reader(pidfd, _set_once, exited)
        try:
            await asyncio.wait_for(exited, 20)  # else the guest is stuck in its fault
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)


async def test_a_fault_server_for_a_guest_already_gone_closes_its_uffd(mf: MemoryFile) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await proc.wait()
    fd = U.open_uffd()
    with pytest.raises(ProcessLookupError):
        FaultServer(mf, fd, 0, PAGE_SIZE, proc.pid)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by the server, which owned it


# ------------------------------------------------------------- fault copies, in-process
#
# This process registers its own mapping of the restored memfd with a userfaultfd and
# drives the loader's fault copies itself: no page of it that is not loaded yet is ever
# touched (the thread would wait for ever), only pages a copy filled.


class Window:
    """This process's mapping of ``mf``'s memfd, registered with a uffd of its own."""

    def __init__(self, mf: MemoryFile) -> None:
        self.size = os.fstat(mf.fd).st_size
        self.map = mmap.mmap(mf.fd, self.size)
        pin = (ctypes.c_char * self.size).from_buffer(self.map)
        self.base = ctypes.addressof(pin)
        del pin  # the address stays valid while the mapping is open
        self.uffd = U.open_uffd()
        U.api(self.uffd)
        U.register(self.uffd, self.base, self.size)

    def present(self, off: int, length: int) -> int:
        """Pages of ``[off, off + length)`` in the memfd's page cache (``mincore``)."""
        n = length // PAGE_SIZE
        vec = (ctypes.c_ubyte * n)()
        assert _libc.mincore(ctypes.c_void_p(self.base + off), length, vec) == 0
        return sum(v & 1 for v in vec)

    def close(self) -> None:
        U.unregister(self.uffd, self.base, self.size)
        os.close(self.uffd)
        self.map.close()


_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
async def window(
    ckpt: tuple[Path, list[tuple[int, int, int]]], gate: Gate
) -> AsyncIterator[tuple[MemoryFile, Window]]:
    path, _specs = ckpt
    mf = await MemoryFile.load(path, _opts(), async_pages=True)
    w = Window(mf)
    try:
        yield mf, w
    finally:
        gate.release.set()
        w.close()
        await mf.aclose()


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def _claim(mf: MemoryFile, off: int, window: tuple[int, int], size: int) -> Any:
    pl = mf.page_loader()
    assert pl is not None
    return pl, pl.claim(off, window, (0, size))


@needs_uffd
async def test_a_copied_page_counts_as_loaded_and_the_loader_never_writes_it_again(
    ckpt: tuple[Path, list[tuple[int, int, int]]],
    window: tuple[MemoryFile, Window],
    gate: Gate,
) -> None:
    _path, specs = ckpt
    mf, w = window
    off, _length, token = specs[RANGES - 1]  # its blocks are not in the loader's jobs
    pl, claim = _claim(mf, off + 5 * PAGE_SIZE, (off, off + PAGE_SIZE), w.size)
    assert claim is not None and claim.nbytes == MiB  # the page's whole block
    assert pl.claim(off + 9 * PAGE_SIZE, (off, off + PAGE_SIZE), (0, w.size)) is None  # taken
    with pytest.raises(PagesNotLoadedError):
        mf.map_internal(FileRange(off, off + PAGE_SIZE))  # pending until the copy is done
    pl.copy_inline(claim, w.uffd, w.base)
    assert claim.error is None and _merged(claim.copied) == [(off, off + MiB)]
    assert claim.copied[0] == (off + 5 * PAGE_SIZE, off + 6 * PAGE_SIZE)  # its page first
    assert w.present(off, MiB) == MiB // PAGE_SIZE
    assert mf.pending_load_bytes(FileRange(off, off + MiB)) == 0
    progress = mf.load_progress()
    assert progress is not None and progress.loaded_bytes == MiB
    want = struct.pack("<Q", token) * (MiB // 8)
    assert w.map[off : off + MiB] == want  # exactly the checkpoint's bytes
    # The guest writes its page once resumed; the loader then loads everything else.
    w.map[off : off + 5] = b"guest"
    gate.release.set()
    await mf.wait_loaded()
    assert w.map[off : off + 5] == b"guest"  # never overwritten with the checkpoint's
    assert w.map[off + 5 : off + MiB] == want[5:]
    assert all(not (s < off + MiB and off < e) for s, e in gate.written)  # never re-read
    progress = mf.load_progress()
    assert progress is not None and progress.loaded_bytes == progress.total_bytes
    mf.check_invariants()


@needs_uffd
async def test_a_copy_takes_the_pending_blocks_of_its_window_in_one_job(
    ckpt: tuple[Path, list[tuple[int, int, int]]], window: tuple[MemoryFile, Window]
) -> None:
    _path, specs = ckpt
    mf, w = window
    off, _length, token = specs[RANGES - 2]
    pl, claim = _claim(mf, off + MiB + PAGE_SIZE, (off, off + 2 * MiB), w.size)
    assert claim is not None and claim.nbytes == 2 * MiB
    assert [b.number for b, _ in claim.batch] == [(off + MiB) // MiB, off // MiB]  # its own first
    await pl.copy(claim, os.dup(w.uffd), w.base)  # takes the fd
    assert claim.error is None and _merged(claim.copied) == [(off, off + 2 * MiB)]
    assert w.present(off, 2 * MiB) == 2 * MiB // PAGE_SIZE
    assert w.map[off : off + 2 * MiB] == struct.pack("<Q", token) * (2 * MiB // 8)
    assert mf.pending_load_bytes(FileRange(off, off + 2 * MiB)) == 0


@needs_uffd
async def test_a_damaged_block_is_never_copied_and_goes_back_to_the_loader(
    ckpt: tuple[Path, list[tuple[int, int, int]]], gate: Gate
) -> None:
    path, specs = ckpt
    off = specs[RANGES - 1][0]
    damage(path, off // MiB)
    async with await MemoryFile.load(path, _opts(), async_pages=True) as mf:
        w = Window(mf)
        try:
            pl, claim = _claim(mf, off, (off, off + PAGE_SIZE), w.size)
            pl.copy_inline(claim, w.uffd, w.base)
            assert isinstance(claim.error, CheckpointError) and "mismatch" in str(claim.error)
            assert claim.copied == [] and w.present(off, MiB) == 0  # not one byte
            assert mf.pending_load_bytes(FileRange(off, off + MiB)) == MiB
            waiter = asyncio.create_task(mf.wait_loaded(FileRange(off, off + PAGE_SIZE)))
            gate.release.set()
            with pytest.raises(CheckpointError, match="mismatch"):
                await waiter  # the loader read it next (at the front of its queue)
            assert pl.claim(off + MiB, (off, off + PAGE_SIZE), (0, w.size)) is None  # ended
        finally:
            gate.release.set()
            w.close()


@needs_uffd
async def test_32_guests_fault_at_once_over_overlapping_prefetches(
    ckpt: tuple[Path, list[tuple[int, int, int]]], gate: Gate
) -> None:
    """32 real guests on one restored file, each reading every range in its own order,
    half of them copying 2 MiB windows: each block is copied (or loaded) exactly once,
    every guest reads exactly the checkpoint's bytes."""
    path, specs = ckpt
    n = 32
    async with await MemoryFile.load(path, _opts(), async_pages=True) as mf:
        guests = []
        for k in range(n):
            r = Restored(mf, specs)
            if k:
                for o, length, _t in specs:
                    mf.inc_ref(FileRange(o, o + length))  # each session frees its own
            order = [(i + k) % len(specs) for i in range(len(specs))]
            args = [f"--verify={o}:{ln}:{t}" for o, ln, t in (specs[i] for i in order)]
            r.proc, r.task = await gp.start_guest(
                mf,
                r.session,
                *args,
                stdout=asyncio.subprocess.PIPE,
                fault_mode=FaultMode.UFFD,
                fault_ahead=(2 * MiB) if k % 2 else 0,
            )
            guests.append(r)
        gate.release.set()  # the loader's two jobs go on: guests waiting on them resume
        total = len(specs) * RANGE
        for r in guests:
            rc, counts = await r.result()
            assert rc == 0, counts
            assert counts["verified_bytes"] == counts["faulted_bytes"] == total
            assert counts["bad_bytes"] == counts["errors"] == 0
        await mf.wait_loaded()
        stats = [r.server.stats() for r in guests]
        assert all(st.failure == "" and st.waiting == 0 for st in stats)
        assert sum(st.copied for st in stats) >= 1
        progress = mf.load_progress()
        assert progress is not None and progress.loaded_bytes == progress.total_bytes
        # No block twice: what the copies landed and what the loader wrote are disjoint
        # and make up the whole load.
        copied = sum(st.copied_bytes for st in stats)
        written = sum(e - s for s, e in gate.written)
        assert copied + written == progress.total_bytes
        mf.check_invariants()


#: A guest that registers an anonymous mapping with a uffd, hands the uffd over and exits.
EXITING_GUEST = r"""
import mmap, socket, sys, ctypes
from asyncpgalloc import uffd as U
sock = socket.socket(fileno=int(sys.argv[1]))
fd = U.open_uffd()
U.api(fd)
m = mmap.mmap(-1, 1 << 20)
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
U.register(fd, base, 1 << 20)
socket.send_fds(sock, [f"{base}".encode()], [fd])
"""


@needs_uffd
async def test_a_guest_gone_when_its_range_is_unregistered_is_not_a_failure(
    mf: MemoryFile, caplog: pytest.LogCaptureFixture
) -> None:
    """Its mm is torn down before its pidfd is readable: UFFDIO_UNREGISTER says ENOMEM
    (the kernel cannot take a reference on the mm). The server killed it (an exiting
    process) and recorded a failure."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proc = subprocess.Popen(  # noqa: ASYNC220 - not asyncio.s: its watcher would reap it
            [sys.executable, "-c", EXITING_GUEST, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
        )
        msg, fds, _flags, _addr = socket.recv_fds(ours, 64, 1)
    try:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # noqa: ASYNC222 - exited, not reaped
        server = FaultServer(mf, fds[0], int(msg), 1 << 20, proc.pid)
        server.start()  # the file is loaded: it unregisters at once
        await server.wait_closed()
        st = server.stats()
        assert st.failure == "" and st.closed, st
        assert not any("killed" in m for m in caplog.messages)
    finally:
        assert proc.wait() == 0
