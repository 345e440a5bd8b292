"""Real faults, and injected ones where the kernel cannot be made to fail on demand.

* ENOSPC: a disk-backed file on a small tmpfs mounted by the test (root only). A
  committing allocation that does not fit must fail with ``OSError(ENOSPC)``, give its
  pages back and leave the file working — never SIGBUS the interpreter, so the body
  runs in a subprocess and the test checks how it ended.
* MADV_POPULATE_WRITE failing with EFAULT (what a full filesystem gives) must not
  disable populating for the whole process.
* An executor that raises or was shut down underneath the file.
* Cancellation of every public coroutine at each of its suspension points.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import os
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from helpers import fill, is_zero, small_tmpfs

from asyncpgalloc import (
    PAGE_SIZE,
    AllocationMode,
    AllocOpts,
    DelayedEviction,
    EvictableRange,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
)

P = PAGE_SIZE
MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# Runs in a subprocess: a write through a mapping of an unbacked page of a full tmpfs
# raises SIGBUS, which would kill pytest. Prints one line per step.
_ENOSPC_BODY = textwrap.dedent(
    """
    import asyncio, errno, os, sys
    from asyncpgalloc import AccessType, AllocOpts, AllocationMode, MemoryFile, MemoryFileOpts, host

    MiB = 1 << 20
    path, mode_name, how = sys.argv[1], sys.argv[2], sys.argv[3]
    mode = AllocationMode[mode_name]

    async def main() -> None:
        opts = MemoryFileOpts(disk_backed_file=True)
        async with MemoryFile.open(os.path.join(path, "backing"), opts) as mf:
            held = mf.allocate(4 * MiB, AllocOpts(mode=AllocationMode.COMMIT))
            for v in mf.map_internal(held, AccessType.WRITE):
                v[:] = b"\\x5a" * len(v)
            before = mf.stats().used_bytes
            try:
                if how == "sync":
                    mf.allocate(16 * MiB, AllocOpts(mode=mode))
                else:
                    await mf.allocate_async(16 * MiB, AllocOpts(mode=mode))
            except OSError as e:
                print("raised", errno.errorcode.get(e.errno or 0), flush=True)
            else:
                print("allocated", flush=True)
            assert mf.stats().used_bytes == before, mf.stats()
            mf.check_invariants()
            await mf.wait_released()
            # The file keeps working: a smaller allocation fits, and reads as zeros.
            fr = mf.allocate(2 * MiB, AllocOpts(mode=mode))
            views = mf.map_internal(fr, AccessType.WRITE)
            assert all(v.tobytes().count(0) == len(v) for v in views)
            for v in views:
                v[:] = b"\\x01" * len(v)
            assert all(v.tobytes() == b"\\x5a" * len(v) for v in mf.map_internal(held))
            mf.check_invariants()
            print("populate", host.populate_state, flush=True)
            print("ok", flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("how", ["sync", "async"])
@pytest.mark.parametrize("mode", [AllocationMode.COMMIT, AllocationMode.WRITE_POPULATE])
def test_enospc_on_a_full_tmpfs_fails_cleanly(mode: AllocationMode, how: str) -> None:
    """A real ENOSPC: the allocation raises it, gives its pages back, the file goes on.

    Without committing (fallocate) before writing through the mapping, WRITE_POPULATE
    on a full filesystem either hands out unbacked pages (the next touch is a SIGBUS)
    or, when zeroing recycled pages, dies of SIGBUS itself.
    """
    with small_tmpfs() as d:
        r = subprocess.run(
            [sys.executable, "-c", _ENOSPC_BODY, str(d), mode.name, how],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    lines = r.stdout.splitlines()
    assert lines[0] == "raised ENOSPC", r.stdout
    assert lines[-1] == "ok"
    # A full filesystem is no reason to stop populating for the whole process.
    assert "madv_disabled=False" in lines[-2], r.stdout + r.stderr


_RECYCLE_BODY = textwrap.dedent(
    """
    import asyncio, os, sys
    from asyncpgalloc import AllocOpts, AllocationMode, DelayedEviction, MemoryFile
    from asyncpgalloc import MemoryFileOpts

    MiB = 1 << 20

    async def main() -> None:
        opts = MemoryFileOpts(disk_backed_file=True, delayed_eviction=DelayedEviction.%s)
        async with MemoryFile.open(os.path.join(sys.argv[1], "backing"), opts) as mf:
            # Uncommitted pages become waste without ever being backed ...
            fr = mf.allocate(16 * MiB)
            mf.dec_ref(fr)
            # ... and the filesystem fills up meanwhile.
            with open(os.path.join(sys.argv[1], "filler"), "wb") as f:
                try:
                    f.write(b"x" * (8 * MiB))
                except OSError:
                    pass
            try:
                mf.allocate(16 * MiB, AllocOpts(mode=AllocationMode.COMMIT))
            except OSError as e:
                print("raised", e.errno, flush=True)
            mf.check_invariants()
            print("ok", flush=True)

    asyncio.run(main())
    """
)


def test_zeroing_recycled_waste_on_a_full_tmpfs_does_not_sigbus() -> None:
    """Recycled waste is zeroed through the mapping: on a full filesystem with the waste
    never backed, that write would be a SIGBUS without the commit in front of it."""
    with small_tmpfs() as d:
        r = subprocess.run(
            [sys.executable, "-c", _RECYCLE_BODY % "MANUAL", str(d)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    assert r.stdout.splitlines() == [f"raised {errno.ENOSPC}", "ok"], r.stdout


# ------------------------------------------------------------ a failing executor


class BrokenExecutor(concurrent.futures.ThreadPoolExecutor):
    """An executor whose submit raises once ``broken`` is set."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.broken = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if self.broken:
            raise RuntimeError("executor broken on purpose")
        return super().submit(fn, *args, **kwargs)


@pytest.mark.parametrize("shut_down", [False, True])
async def test_an_executor_that_fails_leaves_the_file_consistent(shut_down: bool) -> None:
    """submit raising (or the executor shut down underneath the file): the operation
    fails with that error, the pages go back, invariants hold, aclose still closes."""
    ex = BrokenExecutor()
    fds = fd_count()
    mf = await MemoryFile.open(opts=MemoryFileOpts(executor=ex))
    try:
        held = mf.allocate(MiB, AllocOpts(mode=AllocationMode.COMMIT))
        fill(mf, held, 7)
        if shut_down:
            ex.shutdown()
        else:
            ex.broken = True
        before = mf.stats()
        with pytest.raises(RuntimeError):
            await mf.allocate_async(4 * MiB, AllocOpts(mode=AllocationMode.COMMIT))
        st = mf.stats()
        assert st.used_bytes == before.used_bytes  # the pages went back
        mf.check_invariants()
        with pytest.raises(RuntimeError):
            await mf.decommit(held)
        mf.check_invariants()
        # Synchronous work needs no executor and still works.
        fr = mf.allocate(2 * P, AllocOpts(mode=AllocationMode.COMMIT))
        assert is_zero(mf, fr)
        assert all(v.tobytes() == b"\x07" * len(v) for v in mf.map_internal(held))
        mf.dec_ref(fr)
        mf.check_invariants()
    finally:
        # The releaser may have died on the broken executor: aclose says so, but closes.
        with contextlib.suppress(Exception):
            await mf.aclose()
        ex.shutdown()
    assert mf.closed
    assert fd_count() == fds


# -------------------------------------------------------- cancellation, everywhere


class _Source:
    """An async reader that yields to the loop before every read."""

    def __init__(self, n: int) -> None:
        self.left = n

    async def read(self, n: int = -1, /) -> bytes:
        await asyncio.sleep(0)
        k = min(n, self.left, 64 * 1024)
        self.left -= k
        return b"\xab" * k


class _User:
    """Gives its range back (dec_ref, and out of the test's list) when asked to evict."""

    def __init__(self, mf: MemoryFile, fr: FileRange, held: list[FileRange]) -> None:
        self.mf, self.fr, self.held = mf, fr, held

    async def evict(self, er: EvictableRange) -> None:
        await asyncio.sleep(0)
        if self.fr in self.held:
            self.held.remove(self.fr)
            self.mf.dec_ref(self.fr)


Scenario = Callable[[MemoryFile, list[FileRange], Path], Coroutine[Any, Any, Any]]


async def _alloc_async(mf: MemoryFile, held: list[FileRange], d: Path) -> None:
    held.append(await mf.allocate_async(MiB, AllocOpts(mode=AllocationMode.WRITE_POPULATE)))


async def _alloc_async_recycled(mf: MemoryFile, held: list[FileRange], d: Path) -> None:
    held.append(await mf.allocate_async(MiB, AllocOpts(mode=AllocationMode.COMMIT)))


async def _alloc_from(mf: MemoryFile, held: list[FileRange], d: Path) -> None:
    held.append(await mf.allocate_from(_Source(MiB), MiB))


async def _decommit(mf: MemoryFile, held: list[FileRange], d: Path) -> None:
    await mf.decommit(held[0])


async def _update_usage(mf: MemoryFile, held: list[FileRange], d: Path) -> None:
    mf._usage.next_scan = 0.0  # not throttled
    await mf.update_usage()


async def _wait_released(mf: MemoryFile, held: list[FileRange], d: Path) -> None:
    mf.dec_ref(held.pop())
    await mf.wait_released()


async def _wait_for_evictions(mf: MemoryFile, held: list[FileRange], d: Path) -> None:
    fr = held[-1]
    mf.mark_evictable(_User(mf, fr, held), EvictableRange(0, fr.length))
    mf.start_evictions()
    await mf.wait_for_evictions()


async def _save(mf: MemoryFile, held: list[FileRange], d: Path) -> None:
    await mf.save(d / "ckpt")


SCENARIOS: dict[str, Scenario] = {
    "allocate_async": _alloc_async,
    "allocate_async_recycled": _alloc_async_recycled,
    "allocate_from": _alloc_from,
    "decommit": _decommit,
    "update_usage": _update_usage,
    "wait_released": _wait_released,
    "wait_for_evictions": _wait_for_evictions,
    "save": _save,
}


SPIN = 100


async def _step(task: asyncio.Future[Any], n: int) -> None:
    """Let ``task`` run for ``n`` loop iterations; beyond ``SPIN`` (executor hops take
    real time, not iterations) for ``SPIN`` iterations plus ``(n - SPIN) / 2`` ms."""
    for _ in range(min(n, SPIN)):
        if task.done():
            return
        await asyncio.sleep(0)
    if n > SPIN and not task.done():
        await asyncio.wait([task], timeout=(n - SPIN) / 2000)


async def _cancel_after(coro: Awaitable[Any], n: int) -> bool:
    """Run ``coro`` in a task, cancel it after ``n`` steps (see ``_step``); True if it
    finished before the cancellation could land."""
    task = asyncio.ensure_future(coro)
    await _step(task, n)
    done_before = task.done()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return False
    return done_before


MAX_STEPS = 400


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_cancel_every_public_coroutine_at_every_suspension_point(
    name: str, tmp_path: Path
) -> None:
    """For N = 0, 1, 2, ...: cancel the coroutine after N loop iterations, until it
    completes uncancelled. Every time: no page leaked (after wait_released, used bytes
    are what the test holds), invariants clean, no fd leaked, no temporary left."""
    scenario = SCENARIOS[name]
    for n in range(MAX_STEPS):
        fds = fd_count()
        opts = MemoryFileOpts(delayed_eviction=DelayedEviction.MANUAL)
        async with MemoryFile.open(opts=opts) as mf:
            held = [mf.allocate(MiB, AllocOpts(mode=AllocationMode.COMMIT))]
            fill(mf, held[0], 3)
            # Waste to recycle for the committing allocations.
            mf.dec_ref(mf.allocate(MiB, AllocOpts(mode=AllocationMode.COMMIT)))
            finished = await _cancel_after(scenario(mf, held, tmp_path), n)
            # Evictions go on when their waiter is cancelled (as in gVisor).
            await mf.wait_for_evictions()
            await mf.wait_released()
            mf.check_invariants()
            assert mf.stats().used_bytes == sum(fr.length for fr in held), (n, mf.stats())
            for fr in held[:1]:
                want = 0 if name == "decommit" and not finished else 3
                view = mf.map_internal(fr)[0]
                assert view[0] in (0, 3) and (name == "decommit" or view[0] == want)
            leftovers = [n for n in os.listdir(tmp_path) if n != "ckpt"]
            assert leftovers == [], leftovers
        assert fd_count() == fds, f"{name}: fd leaked when cancelled after {n} steps"
        if finished:
            break
    else:
        pytest.fail(f"{name} never finished within {MAX_STEPS} loop iterations")


async def test_cancel_load_and_aclose_at_every_suspension_point(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    async with MemoryFile.open() as src:
        fr = src.allocate(2 * MiB, AllocOpts(mode=AllocationMode.COMMIT))
        fill(src, fr, 9)
        await src.save(path)
    for n in range(MAX_STEPS):
        fds = fd_count()
        task = asyncio.ensure_future(MemoryFile.load(path))
        await _step(task, n)
        task.cancel()
        try:
            mf = await task
        except asyncio.CancelledError:
            assert fd_count() == fds, f"load cancelled after {n} steps leaked an fd"
            continue
        # It finished: now cancel aclose at each step instead.
        assert all(v.tobytes() == b"\x09" * len(v) for v in mf.map_internal(fr))
        for m in range(MAX_STEPS):
            mf2 = await MemoryFile.load(path)
            fds2 = fd_count()
            closing = asyncio.ensure_future(mf2.aclose())
            await _step(closing, m)
            was_done = closing.done()
            closing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await closing
            await mf2.aclose()  # idempotent; finishes what a cancelled close left
            assert mf2.closed and fd_count() == fds2 - 1
            if was_done:
                break
        await mf.aclose()
        assert fd_count() == fds
        return
    pytest.fail("load never finished")
