"""Running blocking syscalls off the loop, shielded from cancellation.

A punch-hole or commit over a range runs while that range sits in a state no one
else may touch; the bookkeeping after it must run whatever happens to the task
that awaited it (anyio's ``to_thread.run_sync(cancellable=False)`` is the model).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .errors import ExecutorDroppedError

__all__ = [
    "IDLE_TURN_SECONDS",
    "LEND_SECONDS",
    "SLICE_SECONDS",
    "BlockingRunner",
    "finish_uncancelled",
    "hold_lending",
    "lend_gil_until",
    "run_signalling",
]

T = TypeVar("T")

#: Work that runs on the loop in slices (usage marking, release finishing,
#: checkpoint scanning) yields after about this long, so a 1 kHz timer stays
#: within 1 ms even with a few such tasks running at once.
SLICE_SECONDS = 0.00025
#: While a job runs in the executor, each busy loop turn lends it the GIL this long.
LEND_SECONDS = 0.0002
#: A loop turn this short means nothing else is running: no need to lend.
IDLE_TURN_SECONDS = 0.00005


def run_signalling(done: threading.Event, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)``, then set ``done`` however it ends (in the executor thread)."""
    try:
        return fn(*args)
    finally:
        done.set()


async def lend_gil_until(done: threading.Event, fut: asyncio.Future[Any] | None = None) -> None:
    """Let an executor thread make progress while the loop is busy, until ``done``
    (or until ``fut``, the job's future, is done without it: an executor shut down
    with ``cancel_futures=True`` cancels queued jobs that never run, so ``done``
    would never be set).

    A loop that keeps running callbacks releases the GIL only for an instant (its
    zero-timeout poll) and takes it straight back, so a thread waiting for the GIL
    never gets it: CPython forces a switch only when none happened for 5 ms, and
    every poll counts as one. A job needing the GIL between its syscalls would then
    wait until the loop goes idle (measured here: 30-170 ms behind a busy loop). So
    each loop turn blocks for up to LEND_SECONDS with the GIL released, and lending
    stops once a turn comes back at once: the loop is idle, its poll sleeps, and the
    thread gets the GIL anyway. Costs the loop at most LEND_SECONDS per turn. The time
    other lenders of this thread blocked in a turn does not make it busy: two jobs in
    flight would otherwise keep each other lending on an idle loop for as long as they
    run (each turn 2 x LEND_SECONDS late, I/O noticed that much later).
    """
    while True:
        if time.monotonic() < _hold.until:
            return  # latency-critical I/O on this loop: no turn may block
        began = time.perf_counter()
        finished = done.wait(LEND_SECONDS)
        _lent.seconds += time.perf_counter() - began
        if finished or (fut is not None and fut.done()):
            return
        turn, lent = time.perf_counter(), _lent.seconds
        await asyncio.sleep(0)
        if time.perf_counter() - turn - (_lent.seconds - lent) < IDLE_TURN_SECONDS:
            return


class _Hold(threading.local):
    until = 0.0  # no lending on this thread's loop until then (time.monotonic)


_hold = _Hold()


def hold_lending(seconds: float) -> None:
    """Stop :func:`lend_gil_until` blocking this thread's loop for the next ``seconds``:
    its jobs in flight stop lending, new ones do not start (the loop serves
    latency-critical I/O, e.g. guests' page faults, whose every turn would otherwise
    wait up to LEND_SECONDS behind a lender; between such events the loop idles, and a
    job gets the GIL anyway). O(1), on the loop."""
    _hold.until = max(_hold.until, time.monotonic() + seconds)


class _Lent(threading.local):
    seconds = 0.0  # time this thread's lenders have blocked, in total


_lent = _Lent()


def _cancelling() -> int:
    """Cancellation requests pending on the current task (0 outside a task)."""
    task = asyncio.current_task()
    return 0 if task is None else task.cancelling()


async def finish_uncancelled(aw: Awaitable[T]) -> T:
    """Await ``aw`` to completion even if the awaiting task is cancelled meanwhile.

    Returns its result or raises its error; if the task was cancelled while
    waiting, raises ``CancelledError`` afterwards (``aw``'s own error first, as it
    is what the caller must undo for).
    """
    if asyncio.iscoroutine(aw):
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            aw.close()  # no loop to run it on (its loop is gone): never leave it unawaited
            raise
        # Named, so that code cancelling "every task but the library's" (shutdown
        # handlers, this project's interrupt test) can tell it is ours.
        fut: asyncio.Future[T] = loop.create_task(
            aw, name=f"asyncpgalloc-{getattr(aw, '__qualname__', 'work')}"
        )
    else:
        fut = asyncio.ensure_future(aw)
    pending: BaseException | None = None
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            if fut.cancelled():
                raise
            pending = pending or asyncio.CancelledError()
        except GeneratorExit:
            raise  # the coroutine is being closed: nothing may await any more
        except BaseException as e:
            if fut.done():
                raise  # aw's own error
            # An interrupt (KeyboardInterrupt, SystemExit) while waiting: aw still
            # runs and still uses what it was given, so wait for it, then re-raise.
            pending = pending or e
    result = fut.result()
    if pending is not None:
        raise pending
    return result


class BlockingRunner:
    """Runs a file's blocking syscalls in its executor and knows which are in flight.

    A file must not close its fd or unmap while a syscall on them is still running
    in a thread (the fd number could be reused underneath it): ``aclose`` drains
    this runner first.
    """

    __slots__ = ("_executor", "_inflight", "_running")

    def __init__(self, executor: concurrent.futures.Executor) -> None:
        self._executor = executor
        self._inflight: set[asyncio.Future[Any]] = set()
        # The done events of jobs submitted and not yet finished, for a teardown
        # that can no longer await (its loop is gone): see wait_idle_blocking().
        self._running: set[threading.Event] = set()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` in the executor, shielded: see :func:`finish_uncancelled`.

        Costs one executor round trip (130-220 µs of latency here) plus ``fn`` itself;
        while the loop is busy, up to LEND_SECONDS of each loop turn go to the job
        (see :func:`lend_gil_until`). Raises :class:`ExecutorDroppedError` if the
        executor cancelled the job before running it (a shutdown with
        ``cancel_futures=True``): that is not a cancellation of the caller.
        """
        done = threading.Event()
        self._running.add(done)
        try:
            cf = self._executor.submit(run_signalling, done, fn, *args)
        except BaseException:
            self._running.discard(done)
            raise
        # Runs in whichever thread ends the job, or cancels it unrun.
        cf.add_done_callback(lambda _: self._running.discard(done))
        fut = asyncio.wrap_future(cf, loop=asyncio.get_running_loop())
        self._inflight.add(fut)
        fut.add_done_callback(self._inflight.discard)
        try:
            await lend_gil_until(done, fut)
            return await finish_uncancelled(fut)
        except GeneratorExit:
            raise  # closed with its loop gone: the owner waits for the thread (blocking)
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError) and fut.cancelled() and not _cancelling():
                raise ExecutorDroppedError(
                    f"the executor dropped {getattr(fn, '__name__', fn)!s} before running it "
                    "(was it shut down with cancel_futures=True?)"
                ) from None
            # Cancelled, or interrupted: the job still uses its arguments (ranges,
            # mappings), so the caller may not undo anything before it ends.
            if not fut.done():
                await finish_uncancelled(fut)
            raise

    def wait_idle_blocking(self, timeout: float) -> bool:
        """Block until no job of this runner runs in a thread, for at most ``timeout``
        seconds; True if none does. For teardown without a loop to await on (the
        loop closed, or a finalizer): the fd and mappings must outlive every job."""
        deadline = time.monotonic() + timeout
        return all(done.wait(max(0.0, deadline - time.monotonic())) for done in list(self._running))

    async def drain(self) -> None:
        """Wait (uncancellably) until nothing runs in the executor on our behalf."""
        while self._inflight:
            await finish_uncancelled(asyncio.wait(list(self._inflight)))
