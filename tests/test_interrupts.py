"""An interrupt that the program survives: a KeyboardInterrupt from Python's default
SIGINT handler, or a SystemExit raised by a SIGTERM handler, landing at a random
moment while thousands of allocations and frees are processed.

What must hold after each one: the file is either consistent (``check_invariants``
passes, the releaser still runs) or poisoned (every call raises PoisonedError), never
silently inconsistent; a poisoned file still closes. Each scenario runs in its own
interpreter (it replaces the signal handlers) on both loops.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import RecordingExecutor

import asyncpgalloc.memory_file
from asyncpgalloc import MemoryFile, MemoryFileOpts
from asyncpgalloc.ranges import PAGE_SIZE as P

ROOT = Path(__file__).resolve().parent.parent

_BODY = textwrap.dedent(
    """
    import asyncio, os, random, signal, sys, threading, time
    import uvloop
    from asyncpgalloc import AccessType, AllocOpts, AllocationMode, MemoryFile, PoisonedError

    loop_name, sig_name, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(seed)
    sig = getattr(signal, sig_name)
    exc_type = KeyboardInterrupt if sig == signal.SIGINT else SystemExit

    def on_term(signum, frame):
        raise SystemExit(143)

    signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else on_term)
    loop = uvloop.new_event_loop() if loop_name == "uvloop" else asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    mf = loop.run_until_complete(MemoryFile.open())
    COMMIT = AllocOpts(mode=AllocationMode.COMMIT)
    held = mf.allocate(1 << 20, COMMIT)
    for v in mf.map_internal(held, AccessType.WRITE):
        v[:] = b"\\x5a" * len(v)

    async def work():
        frs = [mf.allocate(16 << 10) for _ in range(2000)]
        for i, fr in enumerate(frs):
            if i % 2:
                mf.dec_ref(fr)
            else:
                # Part of an allocation at a time: the slow path, with more steps to split.
                mf.dec_ref(type(fr)(fr.start, fr.start + 8192))
                mf.dec_ref(type(fr)(fr.start + 8192, fr.end))
            if i % 200 == 0:
                mf.stats()  # settles the dead queue: a transition too
                await asyncio.sleep(0)
        frs = [mf.allocate(64 << 10, COMMIT) for _ in range(50)]
        for fr in frs:
            mf.dec_ref(fr)
        await mf.wait_released()

    def shoot(delay):
        time.sleep(delay)
        os.kill(os.getpid(), sig)

    interrupts = consistent = 0
    poisoned = False

    def settle(seconds):
        # Run the loop for a while; an interrupt or a stale stop() just ends the run.
        global interrupts
        try:
            loop.run_until_complete(asyncio.sleep(seconds))
        except exc_type:
            interrupts += 1
        except RuntimeError:
            pass  # a task of an interrupted run finished and stopped the loop

    for _ in range(20):
        t = threading.Thread(target=shoot, args=(rng.uniform(0, 0.02),))
        try:
            t.start()
            loop.run_until_complete(work())
        except exc_type:
            interrupts += 1
        except (PoisonedError, RuntimeError):
            pass
        while t.is_alive():
            try:
                t.join()
            except exc_type:
                interrupts += 1
        # The signal has been sent: let its handler run, then settle what is left.
        try:
            time.sleep(0.005)
        except exc_type:
            interrupts += 1
        settle(0.02)
        for task in asyncio.all_tasks(loop):
            if not task.get_name().startswith("asyncpgalloc"):
                task.cancel()
        settle(0.01)
        settle(0.01)
        if mf.poisoned:
            poisoned = True
            break
        mf.check_invariants()  # must hold whenever the file is not poisoned
        assert not mf._releaser_task.done(), "the releaser died of an interrupt"
        assert all(v.tobytes() == b"\\x5a" * len(v) for v in mf.map_internal(held))
        consistent += 1
    if poisoned:
        for call in (lambda: mf.allocate(4096), lambda: mf.dec_ref(held), mf.check_invariants,
                     mf.stats):
            try:
                call()
            except PoisonedError:
                pass
            else:
                raise AssertionError("a poisoned file accepted a call")
    else:
        loop.run_until_complete(mf.wait_released())
        mf.check_invariants()
    loop.run_until_complete(mf.aclose())
    assert mf.fd == -1
    loop.close()
    print("interrupts", interrupts, "consistent", consistent, "poisoned", poisoned, flush=True)
    print("ok", flush=True)
    """
)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_an_interrupt_never_leaves_the_file_silently_inconsistent(
    loop: str, sig: str, seed: int
) -> None:
    r = subprocess.run(
        [sys.executable, "-c", _BODY, loop, sig, str(seed)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
    assert r.stdout.splitlines()[-1] == "ok", r.stdout
    words = r.stdout.split()
    assert int(words[words.index("interrupts") + 1]) >= 1, r.stdout


async def test_a_poisoned_file_releases_nothing_more_and_still_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once a transition is cut short the releaser stops at once: a plan made from sets
    that may be inconsistent could punch pages still in use, and an error it met there
    used to fail aclose() ("the releaser task failed") instead of closing."""
    with RecordingExecutor() as ex:
        mf = await MemoryFile.open(opts=MemoryFileOpts(executor=ex))
        waste, other = mf.allocate(16 * P), mf.allocate(16 * P)
        mf.dec_ref(waste)  # the releaser is woken, but has not run yet (no await)

        def interrupted(*args: object) -> None:
            raise KeyboardInterrupt

        # Inside the public call (the compiled core's types have no attribute to patch).
        monkeypatch.setattr(asyncpgalloc.memory_file, "_get_running_loop", interrupted)
        with pytest.raises(KeyboardInterrupt):
            mf.dec_ref(other)  # an interrupt inside the transition
        monkeypatch.undo()
        assert mf.poisoned
        for _ in range(10):
            await asyncio.sleep(0.005)
        assert ex.release_steps() == []
        await mf.aclose()
        assert mf.fd == -1
