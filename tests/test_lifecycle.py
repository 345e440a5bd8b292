"""The file's life at its edges: a cancelled or repeated close, a dropped executor job,
another event loop, a file never closed, a loop closed under it, and fork.

Scenarios that would crash the interpreter on a regression (an unmap under a running
syscall is a SIGSEGV) or that need their own process (fork, interpreter-level warnings)
run in a subprocess on both loops; the test checks how it ended.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from helpers import RecordingExecutor, fill, is_zero

from asyncpgalloc import (
    PAGE_SIZE,
    AllocationMode,
    AllocOpts,
    ClosedError,
    ExecutorDroppedError,
    InvariantError,
    MemoryFile,
    MemoryFileOpts,
    WrongLoopError,
)

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
COMMIT = AllocOpts(mode=AllocationMode.COMMIT)
LOOPS = ["asyncio", "uvloop"]


def run_body(body: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``body`` (Python source) in a fresh interpreter; its loop is argv[1]."""
    return subprocess.run(
        [sys.executable, "-X", "dev", "-c", textwrap.dedent(body), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def memfd_is_open(fd: int) -> bool:
    """True if ``fd`` is (still) one of our memfds."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:asyncpgalloc")
    except OSError:
        return False


# Shared by the subprocess scenarios: run main() on the loop named by argv[1].
_PRELUDE = """
import asyncio, concurrent.futures, os, sys, threading
import uvloop
from asyncpgalloc import *

MiB = 1 << 20
COMMIT = AllocOpts(mode=AllocationMode.COMMIT)

def run(main):
    (uvloop.run if sys.argv[1] == "uvloop" else asyncio.run)(main())

class GatedExecutor(concurrent.futures.ThreadPoolExecutor):
    # Every job waits at the gate, so a punch can be held back in the queue.
    def __init__(self):
        super().__init__(max_workers=1)
        self.gate = threading.Event()
        self.submitted = 0
    def submit(self, fn, /, *args, **kwargs):
        self.submitted += 1
        def gated():
            self.gate.wait()
            return fn(*args, **kwargs)
        return super().submit(gated)

class StubbornUser:
    # An evict() that ignores its first cancellation.
    def __init__(self):
        self.calls = 0
    async def evict(self, er):
        self.calls += 1
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)
"""


# ------------------------------------------------------------------ cancelled close

_CANCELLED_CLOSE = (
    _PRELUDE
    + """
async def main():
    own = sys.argv[2] == "own"
    ex = None if own else GatedExecutor()
    opts = MemoryFileOpts(executor=ex, delayed_eviction=DelayedEviction.MANUAL, close_timeout=5)
    mf = await MemoryFile.open(opts=opts)
    held = mf.allocate(64 * MiB, COMMIT)
    if own:
        # Keep the file's own executor thread busy: a big commit in flight, and the
        # punch of a freed range queued behind it.
        big = asyncio.ensure_future(mf.allocate_async(1024 * MiB, COMMIT))
        await asyncio.sleep(0.01)
    mf.dec_ref(held)
    await asyncio.sleep(0.05)  # the releaser submits its punch; it is held back
    user = StubbornUser()
    mf.mark_evictable(user, EvictableRange(0, MiB))
    mf.start_evictions()
    await asyncio.sleep(0.01)
    fd = mf.fd
    closing = asyncio.ensure_future(mf.aclose())
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(mf.aclose())
    closing.cancel()
    await asyncio.sleep(0.1)
    # Cancelled, but the punch has not run: the fd and the mappings must still be there.
    assert not closing.done() or own, "aclose() returned before the executor drained"
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:") or own
    if ex is not None:
        ex.gate.set()
    try:
        await closing
    except asyncio.CancelledError:
        print("cancelled", flush=True)
    await asyncio.wait_for(second, 30)
    if own:
        with contextlib.suppress(ClosedError, asyncio.CancelledError):
            await big
    assert mf.closed and mf.fd == -1
    print("ok", flush=True)

import contextlib
run(main)
"""
)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("executor", ["caller", "own"])
def test_cancelling_aclose_never_unmaps_under_queued_work(executor: str, loop: str) -> None:
    """The user's crash: aclose() cancelled while evict() ignores its cancellation and a
    punch is still queued. The fd and mappings outlive the punch; a second aclose()
    waits for the same teardown; then CancelledError propagates. Before the fix the
    queued punch met a closed fd, fell back to zeroing through an unmapped chunk and
    killed the process with SIGSEGV."""
    r = run_body(_CANCELLED_CLOSE, loop, executor)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.split() == ["cancelled", "ok"], r.stdout


async def test_a_second_aclose_waits_for_the_first(mf: MemoryFile) -> None:
    with RecordingExecutor() as ex:
        f = await MemoryFile.open(opts=MemoryFileOpts(executor=ex))
        held = f.allocate(4 * MiB, COMMIT)
        ex.gate.clear()
        f.dec_ref(held)
        await asyncio.sleep(0.02)
        fd = f.fd
        first = asyncio.ensure_future(f.aclose())
        second = asyncio.ensure_future(f.aclose())
        await asyncio.sleep(0.05)
        assert not first.done() and not second.done()
        assert memfd_is_open(fd)
        ex.gate.set()
        await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert f.fd == -1 and not memfd_is_open(fd)


# ---------------------------------------------------------------- dropped executor


async def test_an_executor_shut_down_with_cancel_futures_fails_its_waiters() -> None:
    """Queued jobs cancelled by ``shutdown(cancel_futures=True)`` never run: their
    waiters end with ExecutorDroppedError (not a bare CancelledError, which
    TaskGroup and wait_for take for their own), and nothing stays pending."""
    ex = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    mf = await MemoryFile.open(opts=MemoryFileOpts(executor=ex))
    try:
        touched = mf.allocate(8 * MiB)
        fill(mf, touched, 3)  # committed but not known: update_usage must scan
        running = asyncio.ensure_future(mf.allocate_async(256 * MiB, COMMIT))
        await asyncio.sleep(0.001)
        queued = asyncio.ensure_future(mf.allocate_async(4 * MiB, COMMIT))
        scan = asyncio.ensure_future(mf.update_usage())
        await asyncio.sleep(0.001)
        ex.shutdown(wait=False, cancel_futures=True)
        _, pending = await asyncio.wait([running, queued, scan], timeout=30)
        assert not pending
        assert isinstance(queued.exception(), ExecutorDroppedError)
        assert not queued.cancelled()
        assert scan.cancelled() is False
        assert scan.exception() is None or isinstance(scan.exception(), ExecutorDroppedError)
        fr = running.result()
        # The dropped allocation gave its pages back.
        assert mf.stats().used_bytes == 8 * MiB + fr.length
        mf.check_invariants()
    finally:
        with contextlib.suppress(InvariantError):
            await mf.aclose()
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not [t for t in others if "asyncpgalloc" in (t.get_name() or "")]


# ------------------------------------------------------------------ other loops


def test_a_file_refuses_calls_from_another_loop_and_closes_once_its_loop_is_gone() -> None:
    loop1 = asyncio.new_event_loop()
    loop2 = uvloop.new_event_loop()
    try:
        mf = loop1.run_until_complete(MemoryFile.open())
        fd = mf.fd
        fr = mf.allocate(PAGE_SIZE)  # no loop running in this thread: still its own

        async def elsewhere() -> None:
            with pytest.raises(WrongLoopError):
                mf.allocate(PAGE_SIZE)
            with pytest.raises(WrongLoopError):
                mf.dec_ref(fr)
            with pytest.raises(WrongLoopError):
                await mf.wait_released()
            with pytest.raises(WrongLoopError):
                await mf.aclose()

        loop2.run_until_complete(elsewhere())
        assert not mf.closed and memfd_is_open(fd)
        loop1.close()

        async def close_it() -> None:
            with pytest.raises(WrongLoopError, match="closed"):
                mf.allocate(PAGE_SIZE)
            await mf.aclose()  # its loop is gone: closes at once

        loop2.run_until_complete(close_it())
        assert mf.closed and not memfd_is_open(fd)
        with pytest.raises(ClosedError):
            mf.allocate(PAGE_SIZE)
    finally:
        loop1.close()
        loop2.close()
        gc.collect()


# ------------------------------------------------------------- never closed


async def test_a_file_collected_unclosed_warns_and_gives_its_memory_back() -> None:
    mf = await MemoryFile.open()
    fr = mf.allocate(16 * MiB, COMMIT)
    fill(mf, fr, 1)
    fd = mf.fd
    await asyncio.sleep(0)  # the releaser has started: only the file references it
    with pytest.warns(ResourceWarning, match="unclosed MemoryFile"):
        del mf
        gc.collect()
    assert not memfd_is_open(fd)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_file_left_open_when_asyncio_run_returns_is_closed_with_a_warning(loop: str) -> None:
    run = uvloop.run if loop == "uvloop" else asyncio.run

    async def main() -> MemoryFile:
        mf = await MemoryFile.open()
        fill(mf, mf.allocate(128 * MiB, COMMIT), 2)
        return mf

    with pytest.warns(ResourceWarning, match="unclosed MemoryFile"):
        mf = run(main())
    assert mf.closed and mf.fd == -1
    with pytest.raises(ClosedError):
        mf.allocate(PAGE_SIZE)

    async def again() -> None:
        await mf.aclose()  # a no-op now, never "Event loop is closed"

    run(again())


def stop_and_close_under(
    loop: str, start: Callable[[MemoryFile, asyncio.AbstractEventLoop], None]
) -> tuple[int, list[warnings.WarningMessage]]:
    """Open a file on a new ``loop``, let ``start`` schedule work on it, stop the loop
    20 ms later mid-work, close it, drop the file and collect the pending tasks; no
    cleanup may await or touch the closed loop. Returns the file's fd and the warnings."""
    unraisable: list[Any] = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    lp = uvloop.new_event_loop() if loop == "uvloop" else asyncio.new_event_loop()
    try:
        mf = lp.run_until_complete(MemoryFile.open())
        fd = mf.fd
        start(mf, lp)
        lp.call_later(0.02, lp.stop)
        lp.run_forever()
        lp.close()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # A job still running in the file's executor (a commit, a save's write)
            # keeps the file alive until it ends: wait for the file itself to go, or
            # its ResourceWarning lands in whichever later test collects it.
            gone = weakref.ref(mf)
            del mf
            deadline = time.monotonic() + 30
            while gone() is not None and time.monotonic() < deadline:
                gc.collect()
                time.sleep(0.01)
            assert gone() is None, "the file outlived its loop and every job"
    finally:
        sys.unraisablehook = old_hook
        lp.close()
    for text in ("GeneratorExit", "Event loop is closed"):
        assert not [u for u in unraisable if text in repr(u.exc_value)], unraisable
    return fd, caught


@pytest.mark.parametrize("loop", LOOPS)
def test_a_loop_stopped_and_closed_under_the_file_never_awaits_in_cleanup(loop: str) -> None:
    """loop.stop() mid-work, then loop.close(): collecting the pending tasks closes
    their coroutines; none may await while being closed ("coroutine ignored
    GeneratorExit"), the releaser closes the file, and nothing reports an error."""

    async def churn(f: MemoryFile) -> None:
        for _ in range(200):
            f.dec_ref(f.allocate(MiB, COMMIT))
            await asyncio.sleep(0)

    def start(mf: MemoryFile, lp: asyncio.AbstractEventLoop) -> None:
        lp.create_task(churn(mf))
        lp.create_task(mf.wait_released())

    fd, caught = stop_and_close_under(loop, start)
    assert not memfd_is_open(fd)
    assert any(issubclass(w.category, ResourceWarning) for w in caught)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_save_cut_off_by_a_closed_loop_leaves_no_temporary(loop: str, tmp_path: Path) -> None:
    def start(mf: MemoryFile, lp: asyncio.AbstractEventLoop) -> None:
        fill(mf, mf.allocate(256 * MiB, COMMIT), 9)
        lp.create_task(mf.save(tmp_path / "ckpt"))

    stop_and_close_under(loop, start)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- fork

_FORK = (
    _PRELUDE
    + """
import multiprocessing

def child_sync(mf, held):
    for call in (lambda: mf.allocate(MiB), lambda: mf.dec_ref(held), lambda: mf.stats(),
                 lambda: mf.inc_ref(held), lambda: mf.map_internal(held)):
        try:
            call()
        except ForkedError:
            pass
        else:
            os._exit(3)
    # aclose() in the child completes without awaiting anything.
    coro = mf.aclose()
    try:
        coro.send(None)
    except StopIteration:
        pass
    else:
        os._exit(4)
    os._exit(0 if mf.fd == -1 else 5)

def child_mp(mf):
    asyncio.run(asyncio.wait_for(mf.aclose(), 3))
    sys.exit(0 if mf.fd == -1 else 6)

async def main():
    async with MemoryFile.open() as mf:
        held = mf.allocate(MiB, COMMIT)
        for v in mf.map_internal(held, AccessType.WRITE):
            v[:] = b"\\xaa" * len(v)
        pid = os.fork()
        if pid == 0:
            child_sync(mf, held)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status), flush=True)
        p = multiprocessing.get_context("fork").Process(target=child_mp, args=(mf,))
        p.start()
        p.join(20)
        print("mp", p.exitcode, flush=True)
        assert all(v.tobytes() == b"\\xaa" * len(v) for v in mf.map_internal(held))
        fr = mf.allocate(MiB, COMMIT)
        assert all(v.tobytes().count(0) == len(v) for v in mf.map_internal(fr))
        mf.dec_ref(fr)
        mf.check_invariants()
        await mf.wait_released()
    print("ok", flush=True)

run(main)
"""
)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_forked_child_cannot_use_the_parents_file(loop: str) -> None:
    """After fork the child shares the parent's memfd: every call there raises
    ForkedError, and aclose() closes only the child's copies, at once (also in a
    multiprocessing child under asyncio.wait_for). The parent's data and invariants
    are untouched."""
    r = run_body(_FORK, loop)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.split() == ["child", "0", "mp", "0", "ok"], (r.stdout, r.stderr)


def test_threads_are_still_refused() -> None:
    async def main() -> None:
        async with MemoryFile.open() as mf:
            errors: list[BaseException] = []

            def other() -> None:
                try:
                    mf.allocate(PAGE_SIZE)
                except BaseException as e:
                    errors.append(e)

            t = threading.Thread(target=other)
            t.start()
            t.join()
            assert errors and type(errors[0]).__name__ == "WrongThreadError"
            assert is_zero(mf, mf.allocate(PAGE_SIZE))

    asyncio.run(main())
