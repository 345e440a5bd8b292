"""MemoryFile: gVisor's pgalloc.MemoryFile on one host file, owned by one event loop.

gVisor's lock ``f.mu`` becomes the event loop: every method that changes page
state is synchronous code with no ``await`` inside, so no other task sees half a
transition. Blocking syscalls over a range run in the executor while that range
sits in a state no other path touches (releasing pages, or pages only the
awaiting caller knows about), and their bookkeeping runs afterwards whatever
happens to the awaiting task.

The page sets and every transition between page states are the core's
(:class:`~asyncpgalloc.pages.PageSets`, synchronous and I/O-free); this class is
the asyncio shell around it: it owns the fd, the mappings, the executor and the
tasks (releaser, usage refresher, page loader, evictions), checks every call's
loop, thread and process, and does the I/O that the core's transitions return.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import errno
import logging
import os
import threading
import warnings
import weakref
from collections.abc import Coroutine, Generator, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import host
from .accounting import MemoryAccounting, MemoryKind
from .blocking import BlockingRunner, finish_uncancelled
from .chunks import Chunks
from .core import PageSets, PageView, format_segments
from .errors import (
    ClosedError,
    ExecutorDroppedError,
    ForkedError,
    InvalidLengthError,
    InvalidRangeError,
    InvariantError,
    OptionTypeError,
    PartialFillError,
    PoisonedError,
    UnsealableFileError,
    WrongLoopError,
    WrongThreadError,
    check_int_bounds,
)
from .eviction import EvictableMemoryUser, Evictions
from .lending import Lent
from .options import (
    AccessType,
    AllocationMode,
    AllocOpts,
    DelayedEviction,
    Direction,
    MemoryFileOpts,
    check_file_opts,
)
from .pressure import MemcgPressureWatcher
from .ranges import (
    HUGE_PAGE_SIZE,
    MAX_CHUNKS,
    PAGE_SIZE,
    EvictableRange,
    FileRange,
)
from .readers import AsyncByteSource, Progress, filler_for
from .releaser import Releaser
from .stats import MemoryFileCounters, MemoryFileStats, load_fields, working_set_fields
from .transitions import guarded, guarded_async, splits_state
from .usage import UsageScanner, run_usage_refresher
from .working_set import WorkingSet

if TYPE_CHECKING:
    from .checkpoint import CheckpointDestination, CheckpointSource, FileParts
    from .loader import PageLoader
    from .pages_file import PagesFile
    from .stats import LoadProgress

__all__ = ["ASYNC_PREPARE_MIN_BYTES", "MemoryFile"]

logger = logging.getLogger("asyncpgalloc")

_DEFAULT_ALLOC_OPTS = AllocOpts()
_DEFAULT_FILE_OPTS = MemoryFileOpts()
_SYSTEM = MemoryKind.SYSTEM
_UNCOMMITTED = AllocationMode.UNCOMMITTED
_COMMIT = AllocationMode.COMMIT
_WRITE_POPULATE = AllocationMode.WRITE_POPULATE
_BOTTOM_UP = Direction.BOTTOM_UP
_PAGE_MASK = PAGE_SIZE - 1
_get_ident = threading.get_ident
_get_running_loop = asyncio.events._get_running_loop
# What MemoryFile._gate holds once the file may no longer be used (closed, forked,
# poisoned): no running loop is ever this object, so every entry takes the slow check.
_SHUT = object()
# How long a teardown with no loop left to await on (a finalizer, a closed loop)
# waits for syscalls still running in executor threads before it gives up and
# leaks the fd and mappings rather than unmapping under them.
_BLOCKING_CLOSE_WAIT = 10.0
_new_tuple = tuple.__new__


FileLike = str | os.PathLike[str] | int


class MemoryFile:
    """A page allocator over one host file (a memfd unless told otherwise).

    Open one with ``async with MemoryFile.open() as mf`` (or ``mf = await
    MemoryFile.open()`` and ``await mf.aclose()``). It belongs to the running loop
    that opened it: calling it from another thread raises
    :class:`~asyncpgalloc.WrongThreadError` (hand work to the loop with
    ``loop.call_soon_threadsafe`` instead).
    """

    # Populated by _open(); declared here for mypy and for readers.
    _fd: int
    _releaser_task: asyncio.Task[None]
    # Until __init__ has run (a failed construction), __del__ has nothing to close.
    _gate: object = _SHUT
    _map: Chunks
    # True unless the file is a memfd this MemoryFile created (set by _open()): a file
    # from the caller may be on a filesystem that runs out of space, where writing an
    # unbacked page through the mapping is a SIGBUS, so writes are committed first.
    _commit_before_write = True

    def __init__(self, fd: int, opts: MemoryFileOpts, loop: asyncio.AbstractEventLoop) -> None:
        """Internal: use :meth:`MemoryFile.open`."""
        self._fd = fd
        self._opts = opts
        self._loop = loop
        self._thread_id = threading.get_ident()
        self._closed = False
        self._pid = os.getpid()
        self._forked = False
        self._poisoned: str | None = None
        self._close_task: asyncio.Task[None] | None = None
        _live_files.add(self)
        self._accounting = opts.accounting if opts.accounting is not None else MemoryAccounting()
        self._account = not opts.disable_memory_accounting
        self._max_chunks = MAX_CHUNKS if opts.max_chunks is None else opts.max_chunks
        self._own_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor: concurrent.futures.Executor
        if opts.executor is None:
            # One thread: release steps are serial anyway, and Linux serialises
            # fallocate on shmem.
            self._own_executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="asyncpgalloc"
            )
            self._executor = self._own_executor
        else:
            self._executor = opts.executor
        self._blocking = BlockingRunner(self._executor)

        # The page sets and their transitions (see pages.py).
        self._pages = PageSets(self._accounting, account=self._account)
        self._map = Chunks(
            fd,
            advise_hugepage=opts.advise_hugepage,
            advise_no_hugepage=opts.advise_no_hugepage,
        )
        self._release = Releaser(self._pages, self._blocking, self._decommit_or_zero)
        self._usage = UsageScanner(
            self._pages, self._blocking, fd, self._map.address, lambda: self._closed
        )

        self._evictions = Evictions(opts.delayed_eviction, self._release.wakeup.set)
        if opts.delayed_eviction is DelayedEviction.ENABLED and not opts.use_host_memcg_pressure:
            # Without pressure notifications, ENABLED evicts once release work runs out.
            self._release.on_idle = self._evictions.start
        self._pressure: MemcgPressureWatcher | None = None
        self._refresher: asyncio.Task[None] | None = None
        # Pages of allocate_from fills that a source may still write (see lending.py).
        self._lent = Lent(self.dec_ref)
        self._lent_tasks: list[asyncio.Task[None]] = []
        # The page loader of a load(async_pages=True), while it exists (see loader.py).
        self._loader: PageLoader | None = None
        # The ranges guests touched first since the last restore (see working_set.py).
        self._working_set = WorkingSet()
        # Saves in progress: update_usage does nothing meanwhile (see save).
        self._saves = 0
        # The entry check of every call: the loop while the file is usable from it,
        # _SHUT once it is not (see _check). One identity test on the hot paths.
        # Set last: until then __del__ leaves the fd to _open.
        self._gate = loop

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(
        cls, file: FileLike | None = None, opts: MemoryFileOpts = _DEFAULT_FILE_OPTS
    ) -> _Opener:
        """Open a MemoryFile; use as ``async with MemoryFile.open(...) as mf`` or ``await``.

        ``file`` is ``None`` for a new private memfd (close-on-exec), a path to a
        regular file (created 0600 if missing), or an open fd whose ownership passes
        to the MemoryFile. **An existing file is truncated to zero: its contents are
        lost** (as in gVisor; :meth:`load` refills one from a checkpoint). A path
        that is not a regular file that stores data (a directory, a FIFO, a device,
        ``/proc/...``) raises ``ValueError``. Cost: a few syscalls (memfd_create or
        open, ftruncate, the IMA work-around's map/unmap) on the loop.

        What it returns is also a coroutine, so ``asyncio.run(MemoryFile.open())``
        and ``asyncio.create_task(MemoryFile.open())`` work too. ``opts`` that is not
        a :class:`~asyncpgalloc.MemoryFileOpts` raises
        :class:`~asyncpgalloc.OptionTypeError` here, before anything is opened.
        """
        return _Opener(cls, _check_file(file), check_file_opts(opts))

    @classmethod
    async def _open(cls, file: FileLike | None, opts: MemoryFileOpts) -> MemoryFile:
        if opts.delayed_eviction is DelayedEviction.DEFAULT:
            # gVisor's DelayedEvictionDefault means Enabled.
            opts = _replace(opts, delayed_eviction=DelayedEviction.ENABLED)
        elif opts.delayed_eviction in (DelayedEviction.DISABLED, DelayedEviction.MANUAL):
            opts = _replace(opts, use_host_memcg_pressure=False)
        loop = asyncio.get_running_loop()
        if file is None:
            fd = host.create_memfd("asyncpgalloc")
        elif isinstance(file, int):
            fd = file
        else:
            fd = host.open_backing_file(file)
        mf: MemoryFile | None = None
        try:
            host.set_file_size(fd, 0)
            mf = cls(fd, opts, loop)
            mf._commit_before_write = file is not None
            if not opts.disable_ima_workaround:
                host.ima_workaround(fd)
        except BaseException:
            if mf is not None:
                mf._gate = _SHUT  # its fd is closed here, not by __del__
                _live_files.discard(mf)
            os.close(fd)
            raise
        mf._releaser_task = loop.create_task(mf._releaser(), name="asyncpgalloc-releaser")
        try:
            if opts.use_host_memcg_pressure:
                mf._pressure = MemcgPressureWatcher.start(
                    mf._on_memcg_pressure,
                    level=opts.memcg_pressure_level,
                    memcg_path=opts.memcg_path,
                    loop=loop,
                )
            if opts.usage_refresh_interval is not None:
                mf._refresher = loop.create_task(
                    run_usage_refresher(mf.update_usage, opts.usage_refresh_interval),
                    name="asyncpgalloc-usage-refresher",
                )
        except BaseException:
            await mf.aclose()
            raise
        return mf

    async def _releaser(self) -> None:
        """The releaser task (see :class:`~asyncpgalloc.releaser.Releaser`), and what
        its end means for the file.

        Cancelled by anyone but ``aclose()`` (``asyncio.run`` cancels every task when
        its main coroutine returns) or closed with its loop gone, it closes the file at
        once (with a ``ResourceWarning``: the file was never closed) rather than leave
        the fd and every committed page behind until the process exits. An interrupt
        delivered while it ran poisons the file and is raised again from the loop. Once
        the file is poisoned the releaser stops (see :meth:`Releaser.halt`); an error
        from the sets it was working on then is a consequence, logged, not a failure.
        """
        try:
            await self._release.run()
        except (asyncio.CancelledError, GeneratorExit):
            if not self._closed:
                self._abandon("its releaser task was cancelled (did the event loop shut down?)")
            raise
        except (KeyboardInterrupt, SystemExit) as e:
            # Possibly inside a transition: the file cannot trust its sets any more.
            # The interrupt is the program's, not ours: raise it again from the loop,
            # and end this task normally rather than let it die of it.
            self._poison(e)
            self._loop.call_soon(_raise, e)
        except Exception as e:
            if self._poisoned is None:
                raise
            logger.debug("the releaser of a poisoned MemoryFile stopped: %r", e)

    def _on_memcg_pressure(self) -> None:
        if not self._closed and self._evictions.start():
            logger.debug("MemoryFile performing evictions due to memcg pressure")

    async def aclose(self) -> None:
        """Close the file: gVisor's ``Destroy``.

        Stops the releaser (a release step in progress finishes first), cancels the
        eviction tasks and waits up to ``close_timeout`` for them, waits for every
        syscall still running in the executor, punches the whole file if
        ``decommit_on_destroy`` (in the executor), then closes the fd and drops the
        mappings (a mapping stays alive while a view from :meth:`map_internal` still
        references it). Succeeds with pages still referenced: everything goes back
        to the host. Idempotent; every other call afterwards raises
        :class:`~asyncpgalloc.ClosedError`.

        The teardown is a task of its own, shielded and ordered as asyncpg's
        ``close()``: cancelling ``aclose()`` stops the wait for eviction tasks (its
        ``terminate()``), but the fd and mappings are still released only after
        every executor job has finished; then ``CancelledError`` propagates. A
        second ``aclose()`` waits for the same teardown. Once the file's event loop
        is closed, ``aclose()`` from any loop of that thread closes at once. In a
        child process forked after ``open()``, it closes only the child's copies of
        the fd and mappings, at once (see :class:`~asyncpgalloc.ForkedError`).
        """
        if self._forked:
            self._close_in_child()
            return
        if self._close_task is not None:
            await asyncio.wait([self._close_task])
            return
        if self._closed:
            return  # closed without a loop (see _abandon)
        self._check_thread()
        if self._loop.is_closed():
            self._abandon("aclose() after its event loop closed", warn=False)
            return
        if _get_running_loop() is not self._loop:
            raise WrongLoopError(
                "aclose(): this MemoryFile belongs to another event loop, still open"
            )
        self._lent_tasks = self._begin_close()
        task = self._close_task = self._loop.create_task(
            self._teardown(), name="asyncpgalloc-close"
        )
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                # asyncpg's terminate(): stop waiting for eviction tasks; the drain
                # and the release of the fd and mappings still run in order.
                task.cancel()
                await asyncio.wait([task])
            raise
        releaser = self._releaser_task
        if not releaser.cancelled() and releaser.exception() is not None:
            raise InvariantError("the releaser task failed") from releaser.exception()

    def _begin_close(self) -> list[asyncio.Task[None]]:
        """Refuse every later call and stop the background work (synchronous); returns
        the lending task to await, if any (see lending.py)."""
        self._closed = True
        self._gate = _SHUT
        if self._pressure is not None:
            self._pressure.stop()
        if self._loop.is_closed():
            # Being discarded with its loop (see _abandon): no task can run again.
            self._lent.close()
            return []
        for t in self._background_tasks():
            t.cancel()
        return self._lent.close()

    def _background_tasks(self) -> list[asyncio.Task[None]]:
        tasks = [self._releaser_task]
        if self._refresher is not None:
            tasks.append(self._refresher)
        if self._loader is not None and self._loader.task is not None:
            tasks.append(self._loader.task)
        return tasks

    async def _teardown(self) -> None:
        """The body of aclose(), run as its own task (see aclose)."""
        try:
            await self._evictions.aclose(self._opts.close_timeout)
        finally:
            await finish_uncancelled(self._drain_and_release())

    async def _drain_and_release(self) -> None:
        """Wait for everything that may still use the fd or the mappings, then release them."""
        try:
            # A release step in progress finishes its punch and its bookkeeping.
            await asyncio.wait(self._background_tasks() + self._lent_tasks)
            await self._blocking.drain()
            if self._opts.decommit_on_destroy and self._map.count:
                try:
                    await self._blocking.run(host.decommit, self._fd, 0, self.total_size())
                except (OSError, ExecutorDroppedError, RuntimeError) as e:
                    logger.warning("decommit_on_destroy failed: %s", e)
        finally:
            if self._idle_blocking(_BLOCKING_CLOSE_WAIT):
                self._release_resources()
            else:
                logger.error(
                    "%r: a syscall is still running after %.0f s; leaving the fd and "
                    "mappings open rather than unmapping under it",
                    self,
                    _BLOCKING_CLOSE_WAIT,
                )

    def _abandon(self, why: str, *, warn: bool = True) -> None:
        """Close at once, without awaiting: the file's loop is gone or going.

        Waits (blocking, bounded) for executor jobs still running, then releases the
        fd and mappings. With ``warn``, a ``ResourceWarning`` says that the file was
        never closed, as an unclosed socket or transport does.
        """
        if self._forked:
            self._close_in_child()
            return
        if self._fd < 0:
            return
        if warn:
            warnings.warn(
                f"unclosed MemoryFile (fd {self._fd}, {self.total_size() >> 20} MiB): {why}",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )
        self._begin_close()  # its tasks are not awaited: the loop is gone or going
        if not self._idle_blocking(_BLOCKING_CLOSE_WAIT):
            logger.error("%r: a syscall is still running; leaking the fd and mappings", self)
            return
        self._release_resources()

    def _idle_blocking(self, timeout: float) -> bool:
        """Block until no executor job of the file (or of its page loader) runs."""
        loader = self._loader
        return self._blocking.wait_idle_blocking(timeout) and (
            loader is None or loader.wait_idle_blocking(timeout)
        )

    def _close_in_child(self) -> None:
        """In a forked child: close our copies of the fd and the mappings, nothing else."""
        self._closed = True
        self._gate = _SHUT
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._map.release()

    def _poison(self, cause: BaseException) -> None:
        """A transition was cut short by ``cause`` (see :mod:`asyncpgalloc.transitions`):
        refuse every later call but ``aclose()``."""
        if self._poisoned is None:
            self._poisoned = (
                f"a state transition was interrupted by {type(cause).__name__}"
                f"{': ' + str(cause) if str(cause) else ''}; its page sets may be "
                "inconsistent (aclose() still gives everything back)"
            )
            logger.error("MemoryFile poisoned: %s", self._poisoned)
        self._gate = _SHUT
        self._release.halt()

    @property
    def poisoned(self) -> bool:
        """True once a state transition was interrupted part-way (see
        :class:`~asyncpgalloc.PoisonedError`); only ``aclose()`` works then."""
        return self._poisoned is not None

    def _after_fork_in_child(self) -> None:
        """os.register_at_fork hook: this process is not the one that opened the file."""
        self._forked = True
        self._gate = _SHUT

    def __del__(self) -> None:
        # A file never closed: give its memory back to the host rather than keep
        # every committed page until the process exits (socket and subprocess do
        # the same). No loop call: the loop may be closed, or this may be another
        # thread's garbage collection.
        if self._forked:
            self._close_in_child()
        elif self._gate is not _SHUT:
            # (_SHUT: closed, or never fully opened: _open closes that fd itself.)
            self._abandon("it was garbage-collected without aclose()")

    def _release_resources(self) -> None:
        if self._fd < 0:
            return
        try:
            # The host gets everything back: so does a MemoryAccounting shared with
            # other files.
            self._pages.give_back_accounting()
        except Exception as e:
            # Only a poisoned file's sets can fail here; closing must not.
            logger.error("%r: its accounting could not be returned: %r", self, e)
        if self._loader is not None:
            self._loader.release()  # its fds, if its task could not (see _abandon)
        os.close(self._fd)
        self._fd = -1
        self._map.release()
        _live_files.discard(self)
        if self._own_executor is not None:
            # Nothing is queued any more: the releaser is done and calls are refused.
            self._own_executor.shutdown(wait=False)

    async def __aenter__(self) -> MemoryFile:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _check_thread(self) -> None:
        """Raise unless called from the thread that opened the file, in this process."""
        if self._forked:
            raise ForkedError(
                f"this MemoryFile was opened by process {self._pid}; a forked child may "
                "only aclose() it"
            )
        if _get_ident() != self._thread_id:
            raise WrongThreadError(
                "a MemoryFile may only be used from the thread of the event loop that opened it"
            )

    def _check(self) -> None:
        """The slow half of every entry check (the fast half: ``_gate`` is the running loop).

        Passes for a call from the file's thread while its loop runs, or while no
        loop runs there and its loop is not closed (synchronous use between runs);
        raises ForkedError, PoisonedError, ClosedError, WrongThreadError or
        WrongLoopError otherwise.
        """
        self._check_thread()
        if self._poisoned is not None:
            raise PoisonedError(f"the MemoryFile is unusable: {self._poisoned}")
        if self._closed:
            raise ClosedError("the MemoryFile is closed")
        running = _get_running_loop()
        if running is self._loop or (running is None and not self._loop.is_closed()):
            return
        raise WrongLoopError(
            "this MemoryFile belongs to the event loop that opened it"
            + (", which is closed: aclose() it" if self._loop.is_closed() else "")
        )

    # ----------------------------------------------------------------- allocation

    def allocate(self, length: int, opts: AllocOpts = _DEFAULT_ALLOC_OPTS) -> FileRange:
        """Allocate ``length`` bytes of zeroed pages with one reference each held by the caller.

        Synchronous, no executor hop. Cost: the bookkeeping is O(log n) in the
        number of segments; the file grows by whole chunks when needed (ftruncate +
        mmap). Committing modes then block inline, as gVisor does: COMMIT runs
        ``fallocate``; WRITE_POPULATE (and any recycled waste, which must be zeroed)
        prefaults and zeroes through the mapping. Prefer ``allocate_async`` for
        large committing allocations. Pages committed that way are known-committed
        and accounted to ``opts.kind`` and ``opts.memcg_id`` at once (unlike gVisor:
        see :meth:`~asyncpgalloc.pages.PageSets.mark_allocation_committed`).

        Raises :class:`~asyncpgalloc.InvalidLengthError` for a zero, unaligned or
        (huge) non-huge-aligned length and :class:`~asyncpgalloc.OutOfMemoryError`
        when the file cannot grow; an ``OSError`` from a syscall returns the pages
        and propagates.
        """
        try:
            if opts.mode is _UNCOMMITTED:
                # The fast path: uncommitted pages never recycle waste.
                if self._gate is not _get_running_loop():
                    self._check()
                if length <= 0 or length & _PAGE_MASK or (opts.huge and length % HUGE_PAGE_SIZE):
                    raise InvalidLengthError(f"invalid allocation length: {length:#x}")
                fr = self._pages.allocate_uncommitted(
                    length, opts, opts.huge and self._opts.expect_hugepages
                )
                if fr is None:
                    # No free gap is long enough: grow the file (the slow path).
                    return self._take_pages(length, opts)[0]
                return fr
            fr, huge, recycled = self._take_pages(length, opts)
            try:
                committed = self._prepare_pages(fr, opts.mode, huge, recycled)
            except BaseException:
                self.dec_ref(fr)
                raise
            if committed:
                self._pages.mark_allocation_committed(fr)
            return fr
        except BaseException as e:
            # A transition cut short (see asyncpgalloc.transitions), inlined: a
            # guard's extra call would cost this hot path 10-20%.
            if splits_state(e):
                self._poison(e)
            raise

    @guarded_async
    async def allocate_async(self, length: int, opts: AllocOpts = _DEFAULT_ALLOC_OPTS) -> FileRange:
        """Allocate as :meth:`allocate`, with the blocking work off the loop.

        The bookkeeping is the same synchronous step; the commit, populate,
        huge-touch and zeroing of recycled pages then run in the executor when the
        range is at least ``ASYNC_PREPARE_MIN_BYTES`` (below that an executor round
        trip costs more than the work, so it runs inline). What it committed is then
        accounted on the loop, as by :meth:`allocate`. Cancellation-safe: if the
        awaiting task is cancelled or the syscall fails, the executor work finishes,
        the pages go back unaccounted (gVisor's ``DecRef`` on failure) and the
        exception propagates.
        """
        fr, huge, recycled = self._take_pages(length, opts)
        if opts.mode is _UNCOMMITTED:
            return fr
        try:
            if length < ASYNC_PREPARE_MIN_BYTES:
                committed = self._prepare_pages(fr, opts.mode, huge, recycled)
            else:
                committed = await self._blocking.run(
                    self._prepare_pages, fr, opts.mode, huge, recycled
                )
        except BaseException:
            if not self._closed:
                self.dec_ref(fr)
            raise
        # Back on the loop: the bookkeeping of what the executor committed. (Once
        # closed, the accounting has been given back: there is nothing to mark.)
        if committed and not self._closed:
            self._pages.mark_allocation_committed(fr)
        return fr

    @guarded_async
    async def allocate_from(
        self, source: AsyncByteSource, length: int, opts: AllocOpts = _DEFAULT_ALLOC_OPTS
    ) -> FileRange:
        """Allocate ``length`` bytes and fill them from ``source`` (gVisor's ReaderFunc).

        ``source``: an ``aiofiles`` binary file or anything with an async
        ``readinto`` (bytes land straight in the mapped pages), an
        ``asyncio.StreamReader`` or anything with an async ``read(n)``, or an async
        callable ``f(n) -> bytes``. Pages are taken and prepared as by
        :meth:`allocate_async`. On a short read (EOF) the unfilled tail, from the
        first page not wholly filled, is released and the filled range is returned
        (empty if not even one page was filled), as in gVisor. If the source
        raises, that tail is released likewise and a :class:`PartialFillError`
        carries the filled range (still allocated: the caller owns it) with the
        source's error as its cause. If the awaiting task is cancelled, every page
        goes back. Raises ``TypeError`` for a source of none of these kinds (or a
        synchronous file object) before allocating anything.

        The source writes through a mapping of the range of its own
        (:class:`~asyncpgalloc.host.LentMapping`: a ``dup``, an ``mmap`` and a
        ``munmap``, a few µs). A ``readinto`` may still be writing from a thread when
        the call ends (aiofiles' thread goes on after a cancellation): then the pages
        the call gives back stay allocated until no view of that mapping is in use,
        and :meth:`wait_released` waits for them too. On a caller's file (which may
        fill up), the range is committed first (``COMMIT``), so a full file system is
        an ``OSError(ENOSPC)`` with nothing read from the source, never a SIGBUS.
        """
        fill = filler_for(source)
        if self._commit_before_write and opts.mode is _UNCOMMITTED:
            opts = dataclasses.replace(opts, mode=_COMMIT)
        fr = await self.allocate_async(length, opts)
        progress = Progress()
        try:
            # Pages already populated: map them all at once rather than fault each again.
            populated = opts.mode is _WRITE_POPULATE
            lent = host.LentMapping(self._fd, fr.start, fr.length, populated)
        except BaseException:
            self.dec_ref(fr)
            raise
        try:
            await fill(lent, progress)
        except BaseException as e:
            if self._closed:
                lent.try_unmap()
                raise
            if isinstance(e, Exception):
                filled = self._keep_filled(fr, progress.filled, lent)
                raise PartialFillError(
                    f"allocate_from: the source failed after {progress.filled} bytes", filled
                ) from e
            self._give_back_lent(fr, fr.start, lent)
            raise
        return self._keep_filled(fr, progress.filled, lent)

    def _keep_filled(self, fr: FileRange, filled: int, lent: host.LentMapping) -> FileRange:
        """Release the part of ``fr`` past its last wholly filled page; return the rest."""
        end = fr.start + filled - filled % PAGE_SIZE
        self._give_back_lent(fr, end, lent)
        return FileRange(fr.start, end)

    def _give_back_lent(self, fr: FileRange, keep_end: int, lent: host.LentMapping) -> None:
        """The caller keeps ``[fr.start, keep_end)`` of the filled ``fr``; the rest goes back.

        If ``lent`` cannot be unmapped yet (a view of it is still in use: a thread may
        write any page of ``fr``), every page of ``fr`` keeps one reference owned by
        ``_lent`` until it can: the caller's for the part given back, a new one for the
        part kept. Synchronous; O(log n).
        """
        if lent.try_unmap():
            if keep_end < fr.end:
                self.dec_ref(FileRange(keep_end, fr.end))
            return
        if keep_end > fr.start:
            self.inc_ref(FileRange(fr.start, keep_end))
        self._lent.add(lent, fr)

    def _take_pages(self, length: int, opts: AllocOpts) -> tuple[FileRange, bool, bool]:
        """Check the call, then mark pages used, growing the file as needed: (range,
        huge, recycled). The shared first step of every allocation but the fast path."""
        self._check()
        huge = opts.huge and self._opts.expect_hugepages
        while True:
            got = self._pages.allocate(length, opts, huge)
            if got is not None:
                return got[0], huge, got[1]
            self._grow(length, huge)

    def _grow(self, length: int, huge: bool) -> None:
        """Grow the file by whole chunks so that ``length`` bytes of ``huge`` pages fit:
        ftruncate, then one mmap (and madvise) per new chunk, on the loop."""
        chunks = self._map
        new_count = self._pages.plan_growth(length, huge, self._max_chunks, host.mappable_chunks())
        added = new_count - chunks.count
        chunks.grow([huge] * added)
        self._pages.add_chunks(added, huge)

    def _prepare_pages(
        self, fr: FileRange, mode: AllocationMode, huge: bool, recycled: bool
    ) -> bool:
        """Commit, populate, huge-touch or zero a new allocation as gVisor's Allocate does.

        Blocking (fallocate, madvise/mlock, memset): run inline by ``allocate``, in
        the executor by ``allocate_async``; it touches no bookkeeping. Returns True
        if every page of ``fr`` is now committed (fallocated, populated or zeroed):
        the caller then marks them known-committed, on the loop
        (:meth:`~asyncpgalloc.pages.PageSets.mark_allocation_committed`).
        """
        committed = False
        need_huge_touch = False
        if recycled:
            # Zeroing needs writable page table entries in our address space.
            mode = _WRITE_POPULATE
        elif mode is not _WRITE_POPULATE and (
            (huge and self._opts.advise_hugepage) or (not huge and self._opts.advise_no_hugepage)
        ):
            # The first touch must come through our (advised) mapping, or the
            # host picks the page size without the advice: see gVisor.
            mode = _WRITE_POPULATE
            need_huge_touch = True
        if mode is _COMMIT:
            host.commit(self._fd, fr.start, fr.length)
            committed = True
        elif mode is _WRITE_POPULATE:
            if self._commit_before_write:
                # ENOSPC surfaces here as an OSError, not as a SIGBUS on the next write.
                host.commit(self._fd, fr.start, fr.length)
                committed = True
            pieces = self._map.address_pieces(fr)
            if host.can_populate():
                for addr, n in pieces:
                    if not host.try_populate(addr, n):
                        break
                    if n == PAGE_SIZE:
                        # try_populate leaves a single page to fault in on first use:
                        # fault it in now (a zero page stays zero), so that it is as
                        # committed as the rest.
                        host.zero(addr, 1)
                else:
                    need_huge_touch = False
                    committed = True
            if recycled:
                # Recycled waste holds a previous user's data.
                for addr, n in pieces:
                    host.zero(addr, n)
                committed = True
            elif need_huge_touch:
                for view in self._map.views(fr.start, fr.end):
                    for i in range(0, len(view), HUGE_PAGE_SIZE):
                        view[i] = 0
        return committed

    # ------------------------------------------------------------------ references

    def inc_ref(self, fr: FileRange, memcg_id: int = 0) -> None:
        """Add one reference to every page of ``fr`` (any page-aligned part of allocations).

        Synchronous; O(k log n) for k segments in the range. Raises
        :class:`~asyncpgalloc.InvalidRangeError` for a bad range and
        :class:`~asyncpgalloc.ReferenceCountError` if any page holds no reference;
        either way nothing changes. ``memcg_id`` is accepted for gVisor's
        signature; accounting stays with the allocation's memcg.
        """
        try:
            if self._gate is not _get_running_loop():
                self._check()
            self._pages.inc_ref(fr)
        except BaseException as e:
            # A transition cut short (see asyncpgalloc.transitions), inlined: a
            # guard's extra call would cost this hot path 10-20%.
            if splits_state(e):
                self._poison(e)
            raise

    def dec_ref(self, fr: FileRange) -> None:
        """Drop one reference from every page of ``fr``; pages left with none become waste.

        Synchronous. A whole allocation costs two dict hits and, for its last
        reference, a list append: the waste transition is queued for the releaser
        (see :mod:`asyncpgalloc.pages`). Any other range is O(k log n). Waste is
        reclassified as SYSTEM memory until it is recycled or released, and wakes
        the releaser task. Raises as :meth:`inc_ref`
        (a reference-count underflow is a :class:`~asyncpgalloc.ReferenceCountError`)
        before changing anything.
        """
        try:
            if self._gate is not _get_running_loop():
                self._check()
            if self._pages.dec_ref(fr):
                self._release.waste_appeared()
        except BaseException as e:
            # A transition cut short (see asyncpgalloc.transitions), inlined: a
            # guard's extra call would cost this hot path 10-20%.
            if splits_state(e):
                self._poison(e)
            raise

    def has_unique_ref(self, fr: FileRange) -> bool:
        """True if every page of ``fr`` has exactly one reference.

        Synchronous; O(k log n). Unlike gVisor (docs/design.md §5), it looks at each
        chunk's own part of ``fr`` in that chunk's page-size set. Raises as
        :meth:`inc_ref` if a page holds no reference.
        """
        self._check()
        return self._pages.has_unique_ref(fr)

    # --------------------------------------------------------------------- mapping

    def map_internal(self, fr: FileRange, access: AccessType = AccessType.READ) -> list[memoryview]:
        """``memoryview``s (one per chunk touched) of the file's bytes in ``fr``: read-only
        for ``READ`` (writing raises ``TypeError``), writable with ``WRITE``.

        O(chunks touched + segments in ``fr``), no syscall. ``fr`` need not be
        page-aligned but must be non-empty and inside the file, and every page it
        touches must hold a reference: views of free or waste pages are refused with
        :class:`~asyncpgalloc.ReferenceCountError` (a store there would reach the next
        allocation), as is EXECUTE access with ``PermissionError``; either way nothing
        changes. A view keeps its chunk's mapping alive even after ``aclose()``: it
        never dangles, but after close it no longer reaches the file. Keep views only
        while holding the references: after ``dec_ref`` the pages may be handed out
        again.

        Disk-backed files: a store through a view into a page whose blocks do not exist
        yet (an ``UNCOMMITTED`` allocation never written) makes the file system allocate
        them at the fault; if it is full, the process gets SIGBUS and dies. On a caller's
        file that can fill up, commit first: allocate with ``COMMIT`` (or
        ``WRITE_POPULATE``), or fill with :meth:`allocate_from`, which commit with
        ``fallocate`` and report ENOSPC as an ``OSError`` instead.
        """
        self._check()
        if AccessType.EXECUTE in access:
            raise PermissionError("map_internal: EXECUTE access is never granted")
        start, end = fr
        check_int_bounds("map_internal", start, end)
        if not 0 <= start < end <= self._map.size:
            raise InvalidRangeError(f"map_internal: invalid range [{start:#x}, {end:#x})")
        aligned = FileRange(start & ~_PAGE_MASK, (end + _PAGE_MASK) & ~_PAGE_MASK)
        self._pages.referenced_pieces(aligned, "map_internal")
        if self._loader is not None:
            self._loader.check_loaded(aligned.start, aligned.end, "map_internal")
        views = self._map.views(start, end)
        if AccessType.WRITE in access:
            return views
        return [v.toreadonly() for v in views]

    # --------------------------------------------------------------------- release

    def _decommit_or_zero(self, fr: FileRange) -> None:
        """Punch ``fr``; if the host refuses, zero it by hand. Blocking; runs in the executor."""
        try:
            host.decommit(self._fd, fr.start, fr.length)
        except OSError as e:
            # Memory use does not drop, but the pages still read as zeros when reused.
            logger.warning("Failed to decommit %s: %s", fr, e)
            from .checkpoint_scan import data_ranges

            # Holes read as zeros already, and a store through the mapping into one
            # needs a new block: SIGBUS on a full file system. pwrite the data only;
            # an error there is an OSError like the punch's.
            for s, end in data_ranges(self._fd, fr.start, fr.end):
                host.pwrite_zeros(self._fd, s, end - s)

    async def wait_released(self) -> None:
        """Wait until no waste or releasing pages are left.

        Returns at once if there are none. Pages an ``allocate_from`` source may still
        write (see :meth:`allocate_from`) count as not released yet: this waits for
        them to come back, then for their release. Raises
        :class:`~asyncpgalloc.ClosedError` if the file closes meanwhile.
        """
        self._check()
        await self._lent.wait()
        released = self._release.released
        while not released.is_set():
            waiter = asyncio.ensure_future(released.wait())
            try:
                await asyncio.wait(
                    [waiter, self._releaser_task], return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                if not self._loop.is_closed():  # closed: this coroutine is being discarded
                    waiter.cancel()
            if self._releaser_task.done():
                if self._poisoned is not None:
                    raise PoisonedError(f"the MemoryFile is unusable: {self._poisoned}")
                if self._closed:
                    raise ClosedError("the MemoryFile was closed while waiting for release")
                raise InvariantError("the releaser task stopped") from (
                    None if self._releaser_task.cancelled() else self._releaser_task.exception()
                )

    # ---------------------------------------------------------- commitment and usage

    @guarded_async
    async def decommit(self, fr: FileRange) -> None:
        """Give the pages of ``fr`` back to the host; they read as zeros afterwards.

        The punch (``fallocate(PUNCH_HOLE)``) runs in the executor; if the host
        refuses, the pages are zeroed by hand instead. Accounting and the commit
        sequence are updated afterwards even if the awaiting task is cancelled, so
        that a usage scan racing with the punch never marks these pages committed.
        Every page must hold a reference, and the caller must keep its references
        until this returns. Raises as :meth:`inc_ref` before doing anything.
        """
        self._check()
        start, end = fr
        self._pages.referenced_pieces(fr, "decommit")
        if self._loader is not None and self._loader.loading:
            # A page loaded after the punch would undo it: wait for its block.
            await self.wait_loaded(fr)
            self._pages.referenced_pieces(fr, "decommit")
        try:
            await self._blocking.run(self._decommit_or_zero, FileRange(start, end))
        finally:
            if not self._closed:
                self._pages.decommitted(start, end)

    @guarded_async
    async def update_usage(
        self, memcg_ids: Iterable[int] | None = None, *, force: bool = False
    ) -> bool:
        """Bring :attr:`accounting` up to date with the pages the host really holds.

        Returns False if the call was throttled and did not scan (the accounting may be
        stale), True otherwise (a scan ran, or ``fstat`` showed nothing to find). gVisor's
        ``UpdateUsage``: returns at once when ``fstat`` shows every committed byte is
        already known, or when throttled: full scans run at most 100 times a second, and
        after any scan the next waits seven times its cost, so scanning never takes more
        than 1/8 of a CPU. ``force=True`` skips the throttle (and, if a scan is running,
        waits for it and runs a new one), for a caller that must see pages committed just
        now; don't call it in a loop. A call during a scan joins it. A scan runs ``mincore``
        over the used pages not yet known committed (of ``memcg_ids`` only, if given) in the
        executor, one hop per chunk (~11 ms per GiB), then marks what it found in slices of
        ~0.25 ms that yield to the loop; pages that a decommit, release or allocation
        touched since the scan began are not marked. Pages committed by ``fallocate`` but
        never touched are invisible to ``mincore`` and stay unknown (those of a ``COMMIT``
        allocation are known from the start). Raises ``OSError`` if
        mincore fails, leaving the accounting as it was for the pages not yet marked.

        While a :meth:`save` runs it does nothing and returns False, ``force`` or not,
        as gVisor's ``UpdateUsage`` during a save: the save marks committed pages itself.
        """
        self._check()
        if self._saves:
            return False
        return await self._usage.update(memcg_ids, force)

    # ------------------------------------------------------------------ checkpoint

    @guarded_async
    async def save(
        self,
        dst: CheckpointDestination,
        *,
        exclude_committed_zero_pages: bool = False,
        pages_file: PagesFile | None = None,
    ) -> None:
        """Write a checkpoint of the file to ``dst``: a path, or an ``aiofiles`` file
        opened ``"wb"`` (written at its position, flushed, neither fsynced nor closed).

        Raises :class:`~asyncpgalloc.CheckpointError` if evictions are pending or
        running. Never waits for the releaser: waste and releasing pages are recorded
        as released (never read again, not saved). Finds committed pages with
        SEEK_DATA/SEEK_HOLE in the executor (marking them known-committed, with
        their accounting, as gVisor's save does), snapshots
        the bookkeeping on the loop (O(segments), no ``await``), then writes the
        header, metadata and the contents of known-committed pages only, each 1 MiB
        CRC-32-checksummed, from a private two-thread executor: a checkpoint's size
        follows committed memory. With ``exclude_committed_zero_pages``, all-zero
        committed pages are decommitted in this file instead (as :meth:`decommit`)
        and not written. A path is written as a 0600 temporary in the same
        directory, fsynced, renamed and the directory fsynced (on the loop, with the
        rename: one journal commit); a failure or cancellation leaves neither the
        file nor the temporary. Writers should be quiesced: pages are copied after
        the snapshot. Pages freed meanwhile are still saved as they were: while a
        save runs, waste is neither released nor recycled (``wait_released`` waits
        for the save). See :mod:`asyncpgalloc.checkpoint`. While it runs,
        :meth:`update_usage` does nothing (returns False).

        With ``pages_file`` (a :class:`~asyncpgalloc.PagesFile` from
        :meth:`PagesFile.create <asyncpgalloc.PagesFile.create>`), ``dst`` gets the
        header, metadata and a reference to the pages, which go into the shared pages
        file at the next offset it hands out (fsynced before ``dst`` is committed);
        several saves of different files may share it at once. See
        :mod:`asyncpgalloc.pages_file`.
        """
        from .checkpoint import save_checkpoint

        self._saves += 1
        self._hold_waste(True)
        try:
            await save_checkpoint(
                self,
                self._checkpoint_parts(),
                dst,
                exclude_committed_zero_pages=exclude_committed_zero_pages,
                pages_file=pages_file,
            )
        finally:
            self._saves -= 1
            self._hold_waste(False)

    def _hold_waste(self, hold: bool) -> None:
        """While a save copies pages, waste keeps its bytes: pages freed after the
        snapshot are saved as they were, not as zeros or as their next user's data
        (gVisor saves with the file locked, so nothing is freed meanwhile)."""
        if hold:
            self._release.hold()
        else:
            # A save cut off by its loop's close (its coroutine closed) may not
            # touch the loop: waking the releaser would schedule a callback on it.
            self._release.unhold(wake=not self._loop.is_closed())
        self._pages.hold_waste = bool(self._saves)

    @classmethod
    async def load(
        cls,
        src: CheckpointSource,
        opts: MemoryFileOpts = _DEFAULT_FILE_OPTS,
        *,
        file: FileLike | None = None,
        async_pages: bool = False,
        pages_file: PagesFile | None = None,
    ) -> MemoryFile:
        """Open a new MemoryFile (on ``file``, a new memfd by default) holding the
        checkpoint ``src`` (a path, or an ``aiofiles`` file opened ``"rb"``, read from
        its position): the same allocations, reference counts, page contents and
        accounting (added to its :attr:`accounting`). Close it with :meth:`aclose`.

        The header and metadata are read and checked (CRCs, bounds, every relation
        the invariants need; off the loop) before anything is created or mapped;
        a damaged, truncated or foreign checkpoint raises
        :class:`~asyncpgalloc.CheckpointError`. Page data then goes into the file
        off the loop (``sendfile`` from a path, ``readinto`` the mapping from an
        aiofiles file), each block's CRC checked as it lands; a bad block, an
        error or a cancellation closes the half-built file and leaks nothing.
        Ends with :meth:`check_invariants` (O(segments) on the loop).

        With ``async_pages=True`` (``src`` must be a path: the loader reads at the
        offsets it needs), it returns once the metadata is in and the trailer
        checked, as gVisor's async page loading does: the file is usable at once
        (allocate, references, accounting, eviction) while a loader task owned by
        the file reads the page blocks in 32 MiB sequential batches in a private
        executor (each block's CRC checked before it is written into the file).
        :meth:`map_internal` of pages not loaded yet raises
        :class:`~asyncpgalloc.PagesNotLoadedError`; await :meth:`wait_loaded`
        first. Pages freed before their block is read are never read. A load that
        fails later fails every waiter with the same ``CheckpointError`` (see
        :mod:`asyncpgalloc.loader`); the file stays open, its unloaded pages
        unreadable.

        A checkpoint saved with ``pages_file`` needs the same pages file, opened with
        :meth:`PagesFile.open <asyncpgalloc.PagesFile.open>`; its identity and the
        segment at the recorded offset are checked before anything is mapped (the
        wrong pages file, a wrong offset or a truncated one raise ``CheckpointError``).
        ``src`` may then be an aiofiles file even with ``async_pages``: the pages are
        read from the pages file.
        """
        from .checkpoint import load_checkpoint

        opts = check_file_opts(opts)
        file = _check_file(file)

        async def open_for_load() -> tuple[MemoryFile, FileParts]:
            mf = await cls._open(file, opts)
            return mf, mf._checkpoint_parts()

        return await load_checkpoint(
            open_for_load, src, opts, async_pages=async_pages, pages_file=pages_file
        )

    def _checkpoint_parts(self) -> FileParts:
        """What save and load need beyond the public calls (see
        :class:`~asyncpgalloc.checkpoint.FileParts`)."""
        from .checkpoint import FileParts

        return FileParts(
            fd=self._fd,
            pages=self._pages,
            blocking=self._blocking,
            chunks=self._map,
            evictions=self._evictions,
            check=self._check,
            adopt_loader=self._adopt_loader,
            working_set=self._working_set,
        )

    def _adopt_loader(self, loader: PageLoader) -> None:
        """Internal (load): own ``loader`` and start its task, one of the file's background
        tasks from now on (aclose() cancels and awaits it)."""
        self._loader = loader
        # Pages still to load that become waste are never read (cancelWasteLoad).
        self._pages.on_committed_waste = loader.drop
        loader.task = self._loop.create_task(
            self._run_loader(loader), name="asyncpgalloc-page-loader"
        )

    async def _run_loader(self, loader: PageLoader) -> None:
        """The loader task: an interrupt delivered while it ran (possibly inside its
        bookkeeping) poisons the file and is raised again from the loop, as for the
        releaser (see :meth:`_releaser`)."""
        try:
            await loader.run()
        except (KeyboardInterrupt, SystemExit) as e:
            self._poison(e)
            self._loop.call_soon(_raise, e)

    async def wait_loaded(self, fr: FileRange | None = None) -> None:
        """Wait until every page of ``fr`` (of the whole file if None) is loaded.

        gVisor's ``awaitLoad``/``AwaitLoadAll``: the blocks holding ``fr``'s pending
        pages go to the front of the loader's queue. Returns at once for a file not
        loaded with ``async_pages=True``, or once loading is done; with ``fr`` None it
        also waits for the loader task's end. Raises the load's
        :class:`~asyncpgalloc.CheckpointError` if it failed (every waiter gets the
        same one), :class:`~asyncpgalloc.InvalidRangeError` for a bad ``fr``.
        Cancelling the wait leaves the load running.
        """
        self._check()
        loader = self._loader
        if fr is None:
            if loader is not None:
                await loader.wait_all()
            return
        start, end = self._pages.check_range(fr, "wait_loaded")
        if loader is not None:
            await loader.wait(start, end)

    def pending_load_bytes(self, fr: FileRange) -> int:
        """Bytes of ``fr`` an ``async_pages`` load has still to read in: 0 for a file
        not loaded that way or once they are in (a failed load's pages stay pending for
        good). O(log n + pending segments in ``fr``), never blocks. Raises
        :class:`~asyncpgalloc.InvalidRangeError` for a bad ``fr``."""
        self._check()
        start, end = self._pages.check_range(fr, "pending_load_bytes")
        return 0 if self._loader is None else self._loader.pending_in(start, end)

    def record_fault(self, offset: int) -> None:
        """A guest faulted at file ``offset`` (a :class:`~asyncpgalloc.uffd_server.
        FaultServer` reports each fault it serves): record its range in the working-set
        order if it is the first touch there, and count the fault as a hit or a miss of
        the order (see :mod:`asyncpgalloc.working_set`). O(log blocks), never blocks,
        never raises: an offset beyond the file or a closed file is ignored."""
        if self._closed or not 0 <= offset < self._map.size:
            return
        loader = self._loader
        self._working_set.record(offset, None if loader is None else loader.prefetched(offset))

    def record_touched(self, offsets: Iterable[int]) -> int:
        """Ranges at file ``offsets`` that a guest touched without a fault (found in its
        page table while the load runs and once it is done: :func:`~asyncpgalloc.
        working_set.touched_granules`): append the new ones to the working-set order. The number
        appended; O(offsets), never blocks, ignored (0) for a closed file."""
        if self._closed:
            return 0
        size = self._map.size
        return self._working_set.record_touched(o for o in offsets if 0 <= o < size)

    def working_set_order(self) -> tuple[int, ...]:
        """The working-set order ``save`` would write now: offsets of the 1 MiB ranges
        guests touched first (the loaded checkpoint's order first), in that order.
        O(entries), never blocks."""
        return self._working_set.order()

    def page_loader(self) -> PageLoader | None:
        """Internal (:mod:`asyncpgalloc.uffd_server`): the ``async_pages`` load, for fault
        copies straight from the checkpoint; None for a file not loaded that way. O(1)."""
        return self._loader

    def load_progress(self) -> LoadProgress | None:
        """How far an ``async_pages`` load has got (see
        :class:`~asyncpgalloc.LoadProgress`); None for a file not loaded that way.
        O(1), never blocks."""
        self._check()
        return None if self._loader is None else self._loader.progress()

    # -------------------------------------------------------------------- eviction

    @guarded
    def mark_evictable(self, user: EvictableMemoryUser, er: EvictableRange) -> None:
        """Allow the file to ask ``user`` to evict ``er`` (its own offsets) later.

        Synchronous, O(log n). With ``DelayedEviction.DISABLED`` eviction starts at
        once; with ENABLED and no pressure notifications, once the releaser runs out
        of work; with pressure notifications, on pressure; with MANUAL, only on
        :meth:`start_evictions`. Marking an evictable range again has no effect.

        Adjacent and overlapping ranges of one user merge, as in gVisor: marking
        ``[0, 1M)``, ``[1M, 2M)`` and ``[2M, 3M)`` leads to one ``evict([0, 3M))``,
        so ``evict`` must handle every range it marked that overlaps the one it
        gets (see :class:`~asyncpgalloc.EvictableMemoryUser`).
        """
        self._check()
        self._evictions.mark_evictable(user, er, self._opts.use_host_memcg_pressure)

    @guarded
    def mark_unevictable(self, user: EvictableMemoryUser, er: EvictableRange) -> None:
        """Stop asking ``user`` to evict ``er``; an eviction already under way may still
        call ``evict`` for it (users must tolerate that, as in gVisor)."""
        self._check()
        self._evictions.mark_unevictable(user, er)

    @guarded
    def mark_all_unevictable(self, user: EvictableMemoryUser) -> None:
        """As :meth:`mark_unevictable` for every range of ``user``."""
        self._check()
        self._evictions.mark_all_unevictable(user)

    @guarded
    def start_evictions(self) -> bool:
        """Start evicting every evictable user (one task each, last range first).

        Does not wait; returns True if any eviction task was started.
        """
        self._check()
        return self._evictions.start()

    async def wait_for_evictions(self) -> None:
        """Wait until no eviction task is running."""
        self._check()
        await self._evictions.wait()

    def should_cache_evictable(self) -> bool:
        """True if evictions are meaningfully delayed, so caching in evictable memory pays."""
        return (
            self._opts.delayed_eviction is DelayedEviction.MANUAL
            or self._opts.use_host_memcg_pressure
        )

    @property
    def pressure_events(self) -> int:
        """Memory-cgroup pressure notifications received (0 without a watcher)."""
        return 0 if self._pressure is None else self._pressure.events

    # ---------------------------------------------------------------- information

    @property
    def accounting(self) -> MemoryAccounting:
        """The :class:`MemoryAccounting` this file reports into."""
        return self._accounting

    @property
    def known_committed_bytes(self) -> int:
        """Bytes known to be committed (the span of known-committed accounting segments)."""
        return self._pages.known_committed_bytes

    @property
    def fd(self) -> int:
        """The backing file's descriptor (close-on-exec; -1 once closed)."""
        return self._fd

    def guest_fd(self) -> int:
        """A new close-on-exec duplicate of the backing memfd, safe to hand to another
        process (``socket.send_fds``), after sealing the file against shrinking.

        The first call seals the file with ``F_SEAL_SHRINK | F_SEAL_SEAL``, for good:
        no one, this file included, can shrink it again. Growth still works, so the
        file allocates as before. The caller owns the returned fd and closes it (once
        sent, the receiver has its own copy). Cost: three cheap fcntl/dup syscalls on
        the loop; never blocks.

        A holder of the fd **can**: ``mmap`` any range of the file, read and write any
        page (also pages not allocated to it, and free pages: the promise that an
        allocated page is all zeros holds only while no holder writes outside its own
        allocations, so give every sandbox its own file), grow the file with
        ``ftruncate`` or ``fallocate`` (the file then never shrinks back; its own
        growth never shrinks it either), commit pages with ``fallocate`` (charged to
        the holder's memory cgroup, and invisible to this file's accounting until
        :meth:`update_usage`) and punch holes (the pages read as zeros again here).
        It **cannot**: shrink the file (``ftruncate`` to a smaller size fails with
        ``EPERM``), so this process never takes a ``SIGBUS`` on its own mappings
        because of it; add seals (``F_SEAL_SEAL``: no ``F_SEAL_GROW`` or
        ``F_SEAL_FUTURE_WRITE`` that would make this file's next growth or mapping
        fail); or reach any other file. It keeps the file's memory alive after
        :meth:`aclose` for as long as it holds the fd or a mapping.

        Raises :class:`~asyncpgalloc.UnsealableFileError`, with nothing sealed or
        duplicated, if the file cannot be sealed: a disk-backed file
        (``disk_backed_file``), a file given by path or fd that is not a memfd made
        with ``MFD_ALLOW_SEALING``.
        """
        self._check()
        if self._opts.disk_backed_file:
            raise UnsealableFileError(
                "a disk-backed file cannot be sealed against shrinking: a process given "
                "its fd could truncate it under this file's mappings"
            )
        try:
            host.seal_against_shrinking(self._fd)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EPERM):
                raise
            raise UnsealableFileError(
                f"cannot seal the backing file against shrinking ({e.strerror}): it is not "
                "a memfd created with MFD_ALLOW_SEALING"
            ) from e
        return os.dup(self._fd)

    @property
    def is_disk_backed(self) -> bool:
        """True if the backing file lives on a disk filesystem (``disk_backed_file``)."""
        return self._opts.disk_backed_file

    @property
    def hugepages_enabled(self) -> bool:
        """True if ``huge=True`` allocations get huge-page-backed chunks (``expect_hugepages``)."""
        return self._opts.expect_hugepages

    @property
    def opts(self) -> MemoryFileOpts:
        """The options in force (DEFAULT eviction already resolved to ENABLED)."""
        return self._opts

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this file belongs to (hand work to it from other threads with
        ``loop.call_soon_threadsafe``)."""
        return self._loop

    def in_loop_thread(self) -> bool:
        """True if called from the thread of the loop this file belongs to (the only
        thread that may use it). O(1), callable from any thread."""
        return _get_ident() == self._thread_id

    @property
    def closed(self) -> bool:
        """True once ``aclose()`` has begun."""
        return self._closed

    def total_size(self) -> int:
        """The file's size in bytes (whole chunks): an upper bound on what is allocatable now."""
        return self._map.size

    def total_usage(self) -> int:
        """Bytes the host stores for the file (``fstat().st_blocks * 512``). One fstat."""
        self._check()
        return host.file_usage(self._fd)

    @guarded
    def stats(self) -> MemoryFileStats:
        """Bytes by page state, right now. O(1): running totals kept at every
        transition (``check_invariants`` compares them to a recount); no syscall."""
        self._check()
        return self._stats_now()

    def _stats_now(self) -> MemoryFileStats:
        st = self._pages.stats()
        loaded = {} if self._loader is None else load_fields(self._loader.progress())
        return dataclasses.replace(st, **loaded, **working_set_fields(self._working_set.stats()))

    def page_view(self) -> PageView:
        """A read-only look at the page sets (see :class:`~asyncpgalloc.pages.PageView`),
        for tools that read them whole: maps, checkpoints, invariant checks. The sets
        are the file's own, not copies: valid until the next call that changes state,
        and never to be changed. O(dead allocations) to settle them first; no syscall.
        """
        self._check()
        return self._pages.view()

    def counters(self) -> MemoryFileCounters:
        """What the file has done since it opened (monotonic counts). O(1); works after
        close, and from any thread (it only reads counters)."""
        ev = self._evictions
        return MemoryFileCounters(
            allocations=self._pages.allocations,
            allocated_bytes=self._pages.allocated_bytes,
            release_steps=self._release.steps,
            released_bytes=self._pages.released_bytes,
            evictions_started=ev.started,
            evict_calls=ev.calls,
            evict_failures=ev.failures,
            pressure_events=self.pressure_events,
            usage_scans=self._usage.scans,
        )

    def check_invariants(self, *, check_zero_pages: bool = False) -> None:
        """Check every invariant of docs/design.md §3; raise :class:`InvariantError` if one fails.

        O(segments + chunks); meant for tests and debugging. With ``check_zero_pages``,
        also check the zero-page promise: every free page and every sub-released page
        (punched, not yet free) reads zero. Waste and releasing pages may still hold
        their old bytes, and used pages anything, so they are not read. Blocks the loop:
        ``SEEK_DATA``/``SEEK_HOLE`` skip holes (two ``lseek`` per data extent, ~1 µs
        each), and only the committed promised pages are read (all of them on a file
        system without ``SEEK_DATA``), with ``pread`` (which commits nothing, as
        reading through the mapping would) into one 1 MiB buffer, at about 5-10 GB/s.
        Raises :class:`~asyncpgalloc.PoisonedError` for a poisoned file instead.
        """
        self._check_thread()
        if self._poisoned is not None:
            raise PoisonedError(f"the MemoryFile is unusable: {self._poisoned}")
        from . import invariants

        view = self._pages.view()
        own = self._opts.accounting is None and not self._opts.disable_memory_accounting
        try:
            invariants.check_invariants(
                view, self._pages.stats(), self._accounting if own else None
            )
            st = self._pages.stats()
            if (st.waste_bytes or st.releasing_bytes) and self._release.released.is_set():
                raise InvariantError(
                    "wait_released() would return with waste or releasing pages left"
                )
            if st.waste_bytes and not self._pages.has_waste:
                raise InvariantError("waste exists but the releaser was not woken")
            if self._loader is not None:
                invariants.check_pending_load(view, self._loader.pending_ranges())
            if check_zero_pages:
                invariants.check_zero_pages(self._fd, invariants.zero_promised(view))
        except InvariantError as e:
            raise InvariantError(f"{e}\n{self.dump_segments()}") from e.__cause__

    def render_map(self, path: str | os.PathLike[str], *, width: int = 1024) -> None:
        """Write an SVG picture of the file's chunks and page states to ``path``.

        See :mod:`asyncpgalloc.svgmap`. Runs on the loop: O(segments + chunks *
        width), ~5 ms for a few segments, 0.5-0.6 s for 100k live allocations;
        prefer :meth:`render_map_async` for big files on a busy loop.
        """
        from .svgmap import render_map

        render_map(self, path, width=width)

    async def render_map_async(self, path: str | os.PathLike[str], *, width: int = 1024) -> None:
        """As :meth:`render_map`; only the O(segments) snapshot runs on the loop."""
        from .svgmap import render_map_async

        await render_map_async(self, path, width=width)

    def dump_segments(self) -> str:
        """A dump of every segment of the page sets, like gVisor's ``String()``.

        O(segments) on the loop, and as long: about 180 bytes per live allocation
        (18 MB and seconds for 100k). For debugging; ``str``/``repr`` give a one-line
        summary instead. Works after close.
        """
        return format_segments(self._pages.view(), huge_sets=self._opts.expect_hugepages)

    def __repr__(self) -> str:
        """One line with the page-state totals, e.g. ``<MemoryFile fd=5 size=1GiB
        used=8MiB waste=0B releasing=0B free=1016MiB subreleased=0B committed=8MiB
        chunks=1 small/0 huge>``. O(1) (the running totals of :meth:`stats`); safe
        to log. The segments themselves: :meth:`dump_segments`."""
        if self._closed:
            return "<MemoryFile closed>"
        st = self._pages.stats()
        b = _short_bytes
        return (
            f"<MemoryFile fd={self._fd} size={b(st.total_size)} used={b(st.used_bytes)} "
            f"waste={b(st.waste_bytes)} releasing={b(st.releasing_bytes)} "
            f"free={b(st.free_bytes)} subreleased={b(st.subreleased_bytes)} "
            f"committed={b(st.known_committed_bytes)} "
            f"chunks={st.small_chunks} small/{st.huge_chunks} huge>"
        )

    __str__ = __repr__


#: Every MemoryFile still open in this process, for the fork hook.
_live_files: weakref.WeakSet[MemoryFile] = weakref.WeakSet()


def _mark_forked_files() -> None:
    for mf in list(_live_files):
        mf._after_fork_in_child()


os.register_at_fork(after_in_child=_mark_forked_files)


class _Opener(Coroutine[Any, Any, MemoryFile]):
    """What ``MemoryFile.open()`` returns: a coroutine (so ``await``, ``asyncio.run`` and
    ``create_task`` take it), or an async context manager.

    The coroutine of ``_open`` is made only when first driven, so that one used with
    ``async with`` (or never used) leaves no "never awaited" coroutine behind.
    """

    __slots__ = ("_cls", "_coro", "_file", "_mf", "_opts")

    def __init__(self, cls: type[MemoryFile], file: FileLike | None, opts: MemoryFileOpts) -> None:
        self._cls = cls
        self._file = file
        self._opts = opts
        self._mf: MemoryFile | None = None
        self._coro: Coroutine[Any, Any, MemoryFile] | None = None

    def _coroutine(self) -> Coroutine[Any, Any, MemoryFile]:
        if self._coro is None:
            self._coro = self._cls._open(self._file, self._opts)
        return self._coro

    def __await__(self) -> Generator[Any, None, MemoryFile]:
        return self._coroutine().__await__()

    def send(self, value: Any) -> Any:
        """Drive the opening coroutine (as a task does)."""
        return self._coroutine().send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        """Raise in the opening coroutine (as a task's cancellation does)."""
        if val is None and tb is None:
            return self._coroutine().throw(typ)
        return self._coroutine().throw(typ, val, tb)

    def close(self) -> None:
        """Close the opening coroutine, if it was ever made."""
        if self._coro is not None:
            self._coro.close()

    async def __aenter__(self) -> MemoryFile:
        self._mf = await self._cls._open(self._file, self._opts)
        return self._mf

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._mf is not None
        await self._mf.aclose()


#: Committing work on smaller allocate_async ranges runs inline. Measured here
#: (medians, asyncio loop): a shielded executor round trip adds 130-220 µs of
#: latency, while committing or populating 64 pages inline takes 77-173 µs and 16
#: pages 26-55 µs; so below 256 KiB inline is both faster and short on the loop.
ASYNC_PREPARE_MIN_BYTES = 256 << 10


def _check_file(file: Any) -> FileLike | None:
    """``file`` if it is something :meth:`MemoryFile.open` takes; else ``TypeError``."""
    if file is None or isinstance(file, str | os.PathLike) or type(file) is int:
        return file
    hint = " (pass options as opts=...)" if isinstance(file, MemoryFileOpts) else ""
    raise OptionTypeError(
        f"file must be None, a path or an fd (int), got {type(file).__name__}{hint}"
    )


def _short_bytes(n: int) -> str:
    """``n`` bytes in binary units without a space ("1.5MiB"), for :meth:`MemoryFile.__repr__`."""
    from .svgmap import format_bytes

    return format_bytes(n).replace(" ", "")


def _raise(e: BaseException) -> None:
    raise e


def _replace(opts: MemoryFileOpts, **changes: Any) -> MemoryFileOpts:
    import dataclasses

    return dataclasses.replace(opts, **changes)
