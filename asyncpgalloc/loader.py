"""Asynchronous page loading: ``MemoryFile.load(..., async_pages=True)``.

gVisor's ``LoadFrom`` with async page loading returns once the metadata is in and
keeps reading page contents in the background; anything that touches a page not
yet loaded waits for exactly that range (``awaitLoad``), and pages that become
waste before they were read are dropped from the load (``cancelWasteLoad``). This
module is that loader for one MemoryFile and one checkpoint file.

What is still to load is a set of file ranges (``pending``), always a subset of the
used, known-committed pages. Its state changes on the loop only, with no ``await``
inside: a batch of blocks is taken (its pages get one temporary reference each, as
gVisor's ``tempRef``, so none can become waste, be released and be handed out again
while a thread writes it), read in the loader's executor, then removed from
``pending`` and the references dropped. A block read in the executor is read with
its CRC-32C into a buffer, checked, and only then written into the memory file (its
pages still wanted): no byte is in the memory file, where a guest's mapping would
see it without a fault, before its block's CRC passed. Pages dropped before their
block was started are never written. Blocks are read in this order: those a waiter
awaits, those of the checkpoint's working-set order (the ranges guests touched first
last time), the rest in file order.

A failure (a CRC mismatch, a read error, a cancellation, the file's ``aclose()``)
ends the loader: every waiter, present and future, gets the same
:class:`~asyncpgalloc.CheckpointError`; the pages not loaded stay in ``pending``
forever, so :meth:`~asyncpgalloc.MemoryFile.map_internal` keeps refusing them
(never a view of wrong bytes); the checkpoint fd and the executor are released.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import contextlib
import ctypes
import errno
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import checkpoint_io, uffd
from .blocking import BlockingRunner, finish_uncancelled
from .checkpoint_format import Block, Header, block_seed
from .checkpoint_format import crc as crc32c
from .core import SegmentSet
from .errors import CheckpointError, ClosedError, PagesNotLoadedError, PoisonedError
from .ranges import PAGE_SIZE, FileRange
from .stats import LoadProgress

__all__ = ["FaultCopy", "LoadProgress", "PageLoader"]

logger = logging.getLogger("asyncpgalloc")

RefFn = Callable[[FileRange], None]

# Block states (_PREFERRED only while the constructor dedupes the order's blocks).
_PENDING, _STARTED, _DONE, _PREFERRED = 0, 1, 2, 3
#: A fault copy reading at most this many checkpoint bytes runs on the loop (a page
#: cache ``pread``, a CRC and a ``UFFDIO_COPY``: ~10 µs per 4 KiB block, less than the
#: executor's hop); a larger one goes to the loader's fault thread.
INLINE_COPY_BYTES = 256 << 10
#: Guests whose mm is gone: the pages not copied stay pending, nothing is wrong.
_GONE = (errno.ESRCH, errno.ENOENT)
Batch = list[tuple[Block, list[tuple[int, int, bool]]]]


@dataclass
class FaultCopy:
    """Blocks claimed for one fault (:meth:`PageLoader.claim`): read from the checkpoint,
    CRC-checked and copied into a guest with ``UFFDIO_COPY`` by the fault's server instead
    of the loader. ``nbytes``: checkpoint bytes to read; ``copied``: the file ranges that
    landed in the memory file (copied, or found there), filled in by the copy; ``error``:
    what stopped it (a CRC mismatch, a read error, the guest's ``UFFDIO_COPY`` error)."""

    batch: Batch
    nbytes: int
    #: The faulting page (a file offset): copied first, so that its guest resumes
    #: before the rest of the window is in.
    page: int = -1
    copied: list[tuple[int, int]] = field(default_factory=list)
    error: BaseException | None = None

    @property
    def guest_gone(self) -> bool:
        """The copy stopped because the guest's mm is gone (nothing to resolve)."""
        return isinstance(self.error, uffd.UffdError) and self.error.errno in _GONE


class _Cancelled(CheckpointError):
    """The load's error when its task was cancelled (by ``aclose()``, most often)."""


class PageLoader:
    """Reads one checkpoint's page blocks into a MemoryFile in the background.

    Built by :func:`~asyncpgalloc.checkpoint.load_checkpoint` after the metadata is
    installed; owns ``src_fd`` (the checkpoint), ``dst_fd`` (a writable description of
    the memory file, which the read jobs ``pwrite``) and ``executor`` from then on, and
    closes them when its task ends. ``inc_ref``/``dec_ref`` are the file's (temporary
    references while a block is read). ``order`` is the checkpoint's working-set order
    (offsets of ranges of ``granule`` bytes, see :mod:`asyncpgalloc.working_set`): their
    blocks are read first, in that order, after any a waiter asks for; then the rest in
    file order.
    """

    def __init__(
        self,
        *,
        header: Header,
        blocks: Sequence[Block],
        data_offset: int,
        src_fd: int,
        dst_fd: int,
        executor: concurrent.futures.ThreadPoolExecutor,
        inc_ref: RefFn,
        dec_ref: RefFn,
        order: Sequence[int] = (),
        granule: int = 1,
    ) -> None:
        self._header = header
        self._blocks = list(blocks)
        self._starts = [b.pieces[0][0] for b in self._blocks]
        self._state = bytearray(len(self._blocks))
        self._base = data_offset
        self._src_fd = src_fd
        self._dst_fd = dst_fd
        self._executor = executor
        self._runner = BlockingRunner(executor)
        # Fault copies too large for the loop: a thread of their own, never queued
        # behind the loader's batches; one buffer for it, one for copies on the loop.
        self._fault_executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="asyncpgalloc-fault-copy"
        )
        self._fault_runner = BlockingRunner(self._fault_executor)
        self._copies: set[asyncio.Task[None]] = set()
        self._bufs: dict[bool, ctypes.Array[ctypes.c_char]] = {}
        self._stopping = False
        self._inc_ref = inc_ref
        self._dec_ref = dec_ref
        self._pending: SegmentSet[None] = SegmentSet()
        total = 0
        # One insert per run of contiguous pieces (an extent), not one per block.
        run_start = run_end = -1
        for b in self._blocks:
            for off, n in b.pieces:
                if off != run_end:
                    if run_end > run_start:
                        self._pending.insert_range(run_start, run_end, None)
                    run_start = off
                run_end = off + n
                total += n
        if run_end > run_start:
            self._pending.insert_range(run_start, run_end, None)
        self._total = total
        self._pending_bytes = total
        self._loaded = 0
        self._dropped = 0
        self._cursor = 0
        self._urgent: collections.deque[int] = collections.deque()
        # The working-set order's blocks (ranges of ``granule`` bytes at ``order``'s
        # offsets), read after awaited ones and before the rest in file order.
        self._preferred: collections.deque[int] = collections.deque()
        for off in order:
            for i in self._blocks_in(off, off + granule):
                if self._state[i] == _PENDING:
                    self._state[i] = _PREFERRED
                    self._preferred.append(i)
        for i in self._preferred:
            self._state[i] = _PENDING
        self._wakeup = asyncio.Event()
        self._progress: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters = 0
        self._waited_bytes = 0
        self._wait_seconds = 0.0
        self._started_at = time.monotonic()
        self._ended_at: float | None = None
        self._error: CheckpointError | None = None
        self._done = False
        #: The task running :meth:`run`, set by the file that owns the loader.
        self.task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def loading(self) -> bool:
        """True while pages are still to be loaded (or can never be: a failed load)."""
        return bool(self._pending_bytes)

    def wait_idle_blocking(self, timeout: float) -> bool:
        """Block until no read of this loader runs in a thread (see BlockingRunner)."""
        return self._runner.wait_idle_blocking(timeout) and self._fault_runner.wait_idle_blocking(
            timeout
        )

    async def run(self) -> None:
        """The loader: read every pending block, awaited ones first, two batches at a
        time; then release the fds and tell the waiters. Never raises an ``Exception``
        (a failure is the load's error, see the module docstring); cancellation and
        interrupts propagate after the cleanup."""
        inflight: set[asyncio.Task[None]] = set()
        error: CheckpointError | None = None
        closing = False
        try:
            while True:
                # A batch is chosen only when a thread is free for it, so that a
                # waiter's blocks go next, not after a batch chosen ahead of time.
                while len(inflight) < checkpoint_io.WIDTH:
                    batch = self._next_batch()
                    if batch is None:
                        break
                    inflight.add(asyncio.ensure_future(self._load(batch)))
                if inflight:
                    done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                    for t in done:
                        inflight.discard(t)
                        t.result()
                    continue
                if not self._pending_bytes:
                    break
                # Nothing to start until a waiter or a drop changes the picture.
                self._wakeup.clear()
                await self._wakeup.wait()
        except asyncio.CancelledError:
            error = _Cancelled("the page load was cancelled (the file closed?)")
            raise
        except CheckpointError as e:
            error = e
        except OSError as e:
            error = CheckpointError(f"reading the checkpoint's pages failed: {e}")
            error.__cause__ = e
        except GeneratorExit:
            # Discarded with its loop: nothing may await, and a read may still run in a
            # thread; the file's teardown waits for it and then calls release().
            closing = True
            error = _Cancelled("the page load was discarded with its event loop")
            raise
        except BaseException as e:
            error = CheckpointError(f"the page load failed: {e!r}")
            error.__cause__ = e
            if not isinstance(e, Exception):
                raise
        finally:
            self._stopping = True  # no new fault copy; those in flight finish first
            inflight |= self._copies
            try:
                if inflight and not closing:
                    # The other batch's thread still writes its pages: let it finish, with
                    # its bookkeeping (pages that landed and passed their CRC are loaded),
                    # as cancelling it would only wait for its thread too; then release.
                    await finish_uncancelled(asyncio.wait(inflight))
                    for t in inflight:
                        if not t.cancelled():
                            t.exception()  # retrieved: the first error is the one reported
            finally:
                # Waiters are told last: by then no thread, task or fd of the load is left.
                if not closing:
                    self.release()
                self._finish(error)

    def _finish(self, error: CheckpointError | None) -> None:
        self._done = True
        self._error = error
        self._ended_at = time.monotonic()
        if isinstance(error, _Cancelled):
            logger.debug("async page loading stopped: %s", error)
        elif error is not None:
            logger.warning("async page loading failed: %s", error)
        else:
            logger.debug(
                "async page loading completed: %d bytes loaded, %d dropped in %.3f s",
                self._loaded,
                self._dropped,
                self._ended_at - self._started_at,
            )
        self._pulse()

    def release(self) -> None:
        """Close the checkpoint fds and shut the executor down. Idempotent; call it only
        once no read runs (the loader's task has ended, or :meth:`wait_idle_blocking`)."""
        for fd in (self._src_fd, self._dst_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._src_fd = self._dst_fd = -1
        self._executor.shutdown(wait=False)
        self._fault_executor.shutdown(wait=False)

    def _pulse(self) -> None:
        """Wake every waiter (they look at the state again)."""
        fut = self._progress
        if fut.get_loop().is_closed():
            return  # being discarded with its loop: no waiter can run again
        self._progress = fut.get_loop().create_future()
        fut.set_result(None)

    # ------------------------------------------------------------------ the batches

    def _next_batch(self) -> list[tuple[Block, list[tuple[int, int, bool]]]] | None:
        """Take the next blocks to read: awaited ones first, then the working-set
        order's, then in file order. On the loop,
        no await: marks them started and takes their temporary references. None if no
        block is left to start."""
        state = self._state
        n = len(self._blocks)
        while True:
            indices = self._take(self._urgent) or self._take(self._preferred)
            if not indices:
                while self._cursor < n and len(indices) < checkpoint_io.BATCH_BLOCKS:
                    i = self._cursor
                    self._cursor += 1
                    if state[i] == _PENDING:
                        indices.append(i)
                        state[i] = _STARTED
            if not indices:
                return None
            out: list[tuple[Block, list[tuple[int, int, bool]]]] = []
            for i in indices:
                block = self._blocks[i]
                parts = self._wanted_parts(block)
                if not any(wanted for _, _, wanted in parts):
                    # Every page of it became waste before it started: never read.
                    state[i] = _DONE
                    continue
                for s, length, wanted in parts:
                    if wanted:
                        self._inc_ref(FileRange(s, s + length))
                out.append((block, parts))
            if out:
                return out

    def _take(self, queue: collections.deque[int]) -> list[int]:
        """Up to a batch of ``queue``'s blocks still pending, marked started."""
        indices: list[int] = []
        state = self._state
        while queue and len(indices) < checkpoint_io.BATCH_BLOCKS:
            i = queue.popleft()
            if state[i] == _PENDING:
                indices.append(i)
                state[i] = _STARTED
        return indices

    def _wanted_parts(
        self, block: Block, lo: int = 0, hi: int = 2**63
    ) -> list[tuple[int, int, bool]]:
        """``block``'s pieces cut into (offset, length, still wanted), in order; only
        pages of ``[lo, hi)`` are wanted."""
        parts: list[tuple[int, int, bool]] = []
        for off, n in block.pieces:
            pos, end = off, off + n
            for s, e, _ in self._pending.visit_range(max(off, lo), min(end, hi)):
                if s > pos:
                    parts.append((pos, s - pos, False))
                parts.append((s, e - s, True))
                pos = e
            if pos < end:
                parts.append((pos, end - pos, False))
        return parts

    async def _load(self, batch: list[tuple[Block, list[tuple[int, int, bool]]]]) -> None:
        try:
            await self._runner.run(
                _read_blocks_job,
                self._src_fd,
                self._dst_fd,
                self._base,
                self._header,
                batch,
            )
        except BaseException:
            # The references go (unless the file is closing: then its sets are being
            # given back wholesale); the pages stay pending: never readable.
            self._drop_refs(batch)
            raise
        for block, parts in batch:
            self._state[block.number] = _DONE
            for s, n, wanted in parts:
                if wanted:
                    self._pending.remove_range(s, s + n)
                    self._pending_bytes -= n
                    self._loaded += n
        self._pulse()
        self._drop_refs(batch)

    def _drop_refs(self, batch: list[tuple[Block, list[tuple[int, int, bool]]]]) -> None:
        for _, parts in batch:
            for s, n, wanted in parts:
                if wanted:
                    with contextlib.suppress(ClosedError, PoisonedError):
                        # A closed file refuses: its accounting went back wholesale.
                        self._dec_ref(FileRange(s, s + n))

    # ------------------------------------------------------------------ the file's hooks

    def drop(self, start: int, end: int) -> None:
        """Pages ``[start, end)`` became waste: never load them (gVisor's
        cancelWasteLoad). On the loop, O(log n + segments in the range). Pages being
        read hold a temporary reference, so they cannot become waste."""
        if not self._pending_bytes:
            return
        for s, e, _ in self._pending.pop_range(start, end):
            self._pending_bytes -= e - s
            self._dropped += e - s
        if not self._pending_bytes:
            self._wakeup.set()  # the loader may be idle: let it see it is done

    def check_loaded(self, start: int, end: int, op: str) -> None:
        """Raise if any page of ``[start, end)`` is not loaded: the load's
        :class:`~asyncpgalloc.CheckpointError` if it failed, else
        :class:`~asyncpgalloc.PagesNotLoadedError` naming the first such range."""
        if not self._pending_bytes:
            return
        for s, e, _ in self._pending.visit_range(start, end):
            if self._error is not None:
                raise self._error
            raise PagesNotLoadedError(
                f"{op}: pages [{s:#x}, {e:#x}) of [{start:#x}, {end:#x}) are not loaded yet "
                "(await wait_loaded(fr) first)",
                FileRange(s, e),
            )

    def prefetched(self, offset: int) -> bool | None:
        """Whether the block holding the page at ``offset`` was started or loaded
        already (a fault there is a working-set hit); None if no block holds it (the
        checkpoint has no data for that page). On the loop, O(log blocks)."""
        blocks = self._blocks_in(offset, offset + 1)
        if not blocks:
            return None
        block = self._blocks[blocks[0]]
        if not any(off <= offset < off + n for off, n in block.pieces):
            return None
        return self._state[blocks[0]] != _PENDING

    def pending_in(self, start: int, end: int) -> int:
        """Bytes of ``[start, end)`` still to load (a failed load's stay pending for
        good). On the loop, O(log n + pending segments in the range)."""
        if not self._pending_bytes:
            return 0
        return sum(e - s for s, e, _ in self._pending.visit_range(start, end))

    def _blocks_in(self, start: int, end: int) -> list[int]:
        """The indices of the blocks whose span reaches into ``[start, end)``, ascending.
        O(log blocks + those blocks)."""
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        found: list[int] = []
        while i < len(self._blocks) and self._starts[i] < end:
            last_off, last_n = self._blocks[i].pieces[-1]
            if last_off + last_n > start:
                found.append(i)
            i += 1
        return found

    def _any_pending(self, start: int, end: int) -> bool:
        """Whether any page of ``[start, end)`` is pending. O(log n), whatever the number
        of pending segments in the range (fault copies leave many)."""
        if not self._pending_bytes:
            return False
        return next(iter(self._pending.visit_range(start, end)), None) is not None

    def _pending_blocks(self, start: int, end: int) -> list[int]:
        """The pending blocks whose span meets ``[start, end)``, ascending. O(log n + k)."""
        return [i for i in self._blocks_in(start, end) if self._state[i] == _PENDING]

    def _prioritize(self, start: int, end: int) -> None:
        """Put the blocks holding pending pages of ``[start, end)`` first in the queue."""
        front = self._pending_blocks(start, end)
        self._urgent.extendleft(reversed(front))
        if front:
            self._wakeup.set()

    # ------------------------------------------------------------------ fault copies

    def claim(
        self, page: int, window: tuple[int, int], mapped: tuple[int, int]
    ) -> FaultCopy | None:
        """Take the blocks of a fault on ``page`` (a file offset) away from the loader:
        the one holding it, then every other pending block meeting ``window``; their
        pages of ``mapped`` (the guest's mapping, file offsets) are to be copied. On the
        loop, no await, O(log n + blocks): marks them started and takes their temporary
        references, as a loader batch. None if the page's block is being read already
        (by the loader or another fault: wait for it) or the loader has stopped.
        Follow with :meth:`copy_inline` or :meth:`copy`, which always finish the claim."""
        if self._stopping or self._done or self._src_fd < 0:
            return None
        i = bisect.bisect_right(self._starts, page) - 1
        if i < 0 or self._state[i] != _PENDING:
            return None
        indices = [i] + [j for j in self._pending_blocks(*window) if j != i]
        batch: Batch = []
        nbytes = 0
        for j in indices:
            block = self._blocks[j]
            parts = self._wanted_parts(block, *mapped)
            if not any(wanted for _, _, wanted in parts):
                continue  # nothing of the guest's in it: the loader's
            self._state[j] = _STARTED
            for s, length, wanted in parts:
                if wanted:
                    self._inc_ref(FileRange(s, s + length))
            batch.append((block, parts))
            nbytes += sum(n for _, n in block.pieces)
        return FaultCopy(batch, nbytes, page) if batch else None

    def copy_inline(self, claim: FaultCopy, fd: int, delta: int) -> None:
        """Do ``claim``'s copy on the loop, into the guest of userfaultfd ``fd`` (file
        offset + ``delta`` = guest address), and finish it. **Blocks** the loop for the
        read, CRC and copy: only for ``claim.nbytes <= INLINE_COPY_BYTES``."""
        try:
            _copy_blocks_job(
                self._src_fd, self._base, self._header, claim, self._buffer(inline=True), fd, delta
            )
        except Exception:  # kept in claim.error for the caller
            pass
        finally:
            self._finish_copy(claim)

    async def copy(self, claim: FaultCopy, fd: int, delta: int) -> None:
        """Do ``claim``'s copy in the loader's fault thread and finish it. Takes ``fd``
        (a dup of the guest's uffd, made when the claim was: the copy closes it, so the
        caller may close its own at any time). Costs an executor hop (~20-200 µs) plus
        the read, CRC and copy. Cancelling the await does not stop the copy: the load
        waits for it to end."""
        task = asyncio.get_running_loop().create_task(self._copy_task(claim, fd, delta))
        self._copies.add(task)
        task.add_done_callback(self._copies.discard)
        await asyncio.shield(task)

    async def _copy_task(self, claim: FaultCopy, fd: int, delta: int) -> None:
        try:
            await self._fault_runner.run(
                _copy_blocks_job,
                self._src_fd,
                self._base,
                self._header,
                claim,
                self._buffer(inline=False),
                fd,
                delta,
            )
        except BaseException as e:
            if claim.error is None:
                claim.error = e
            if not isinstance(e, Exception):
                raise
        finally:
            os.close(fd)
            self._finish_copy(claim)

    def _buffer(self, *, inline: bool) -> ctypes.Array[ctypes.c_char]:
        """The copy buffer of the loop (``inline``) or of the fault thread: one block and
        its CRC. Allocated once."""
        buf = self._bufs.get(inline)
        if buf is None:
            buf = self._bufs[inline] = ctypes.create_string_buffer(self._header.block_size + 4)
        return buf

    def _finish_copy(self, claim: FaultCopy) -> None:
        """The claim's bookkeeping, on the loop, no await: what landed is loaded (the
        loader never writes it again); a block with pages still pending (not the guest's,
        or not copied) goes back to the front of the loader's queue; waiters are told."""
        for s, e in claim.copied:
            n = self.pending_in(s, e)
            self._pending.remove_range(s, e)
            self._pending_bytes -= n
            self._loaded += n
        back: list[int] = []
        for block, _parts in claim.batch:
            i = block.number
            if any(self.pending_in(off, off + n) for off, n in block.pieces):
                self._state[i] = _PENDING
                back.append(i)
            else:
                self._state[i] = _DONE
        self._urgent.extendleft(reversed(back))
        self._drop_refs(claim.batch)
        if back or not self._pending_bytes:
            self._wakeup.set()
        self._pulse()

    async def wait(self, start: int, end: int, *, prioritize: bool = True) -> None:
        """Wait until no page of ``[start, end)`` is pending; its blocks go first
        (unless not ``prioritize``).

        Raises the load's :class:`~asyncpgalloc.CheckpointError` if it failed (before
        or while waiting). Cancelling the wait does not stop the load.
        """
        if self._error is not None:
            raise self._error
        need = self.pending_in(start, end)
        if not need:
            return
        self._waited_bytes += need
        self._waiters += 1
        began = time.monotonic()
        try:
            if prioritize:
                self._prioritize(start, end)
            while True:
                await asyncio.shield(self._progress)
                if self._error is not None:
                    raise self._error
                if not self._any_pending(start, end):
                    return
        finally:
            self._waiters -= 1
            self._wait_seconds += time.monotonic() - began

    async def wait_all(self) -> None:
        """Wait for every page and for the loader task's end (its fds closed). Raises
        as :meth:`wait`. Changes no block's place in the queue: waiting for all of them
        says nothing about which comes first (the working-set order keeps its place)."""
        await self.wait(0, 2**63, prioritize=False)
        task = self.task
        if task is not None and not task.done():
            await asyncio.wait([task])
        if self._error is not None:
            raise self._error

    def progress(self) -> LoadProgress:
        """A snapshot of the load's progress. O(1), on the loop."""
        end = self._ended_at if self._ended_at is not None else time.monotonic()
        return LoadProgress(
            total_bytes=self._total,
            loaded_bytes=self._loaded,
            dropped_bytes=self._dropped,
            pending_bytes=self._pending_bytes,
            waiters=self._waiters,
            waited_bytes=self._waited_bytes,
            wait_seconds=self._wait_seconds,
            elapsed_seconds=end - self._started_at,
            done=self._done,
            error=None if self._error is None else str(self._error),
        )

    def pending_ranges(self) -> list[tuple[int, int]]:
        """The ranges still pending, ascending (for invariant checks)."""
        return [(s, e) for s, e, _ in self._pending.visit_range(0, 2**63)]


def _preadv_all(fd: int, bufs: list[memoryview], pos: int) -> None:
    """``preadv`` until every buffer is full. **Blocking**. Raises CheckpointError at EOF."""
    while bufs:
        got = os.preadv(fd, bufs, pos)
        if got == 0:
            raise CheckpointError("truncated checkpoint: data ends early")
        pos += got
        while bufs and got >= len(bufs[0]):
            got -= len(bufs[0])
            bufs = bufs[1:]
        if got:
            bufs = [bufs[0][got:], *bufs[1:]]


def _copy_blocks_job(
    src_fd: int,
    base: int,
    header: Header,
    claim: FaultCopy,
    buf: ctypes.Array[ctypes.c_char],
    fd: int,
    delta: int,
) -> None:
    """Read each block of ``claim`` with its CRC-32C in one ``pread``, check it, then
    ``UFFDIO_COPY`` its wanted pages into the guest of userfaultfd ``fd`` (file offset
    + ``delta``). **Blocking**: ~the block bytes twice at memory speed. Records what
    landed in ``claim.copied`` as it goes and what stopped it in ``claim.error`` (a
    read error or CRC mismatch raises after recording it): never a byte before its
    block's CRC passed."""
    view = memoryview(buf).cast("B")
    addr = ctypes.addressof(buf)
    try:
        for block, parts in claim.batch:
            _read_checked_block(src_fd, base, header, block, view)
            pos = 0
            for s, length, wanted in parts:
                if wanted:
                    for s2, n2 in _page_first(s, length, claim.page):
                        done, err = uffd.copy_range(fd, s2 + delta, addr + pos + s2 - s, n2)
                        if done:
                            claim.copied.append((s2, s2 + done))
                        if err is not None:
                            claim.error = err
                            return
                pos += length
    except BaseException as e:
        claim.error = e
        raise


def _page_first(s: int, n: int, page: int) -> list[tuple[int, int]]:
    """``[s, s + n)`` as (start, length) pieces, the page at ``page`` first if in it."""
    if not s <= page < s + n:
        return [(s, n)]
    out = [(page, PAGE_SIZE), (s, page - s), (page + PAGE_SIZE, s + n - page - PAGE_SIZE)]
    return [(a, b) for a, b in out if b > 0]


def _read_blocks_job(
    src_fd: int,
    dst_fd: int,
    base: int,
    header: Header,
    batch: list[tuple[Block, list[tuple[int, int, bool]]]],
) -> None:
    """Copy each block of ``batch`` into the memory file ``dst_fd``, CRC-32C first.
    **Blocking**: ~the block bytes twice at memory speed (plus the disk's read).

    Each block and its stored CRC are read into a buffer of this job's own with one
    ``pread``, checked (:func:`_read_checked_block`), and only then its wanted pages are
    written with ``pwrite``: no byte of a block is in the memory file before its CRC
    passed, so a guest mapping the file (which takes no fault on a page once it is in
    the page cache) never sees an unchecked byte, and a guest write cannot make a good
    block fail its check. Pages no longer wanted are not written. Writing through the
    file rather than the mapping means no page is zeroed before it is filled, and a
    file system that cannot allocate a page (a caller's disk-backed file, full) fails
    the write with ``OSError`` instead of a SIGBUS."""
    view = memoryview(bytearray(header.block_size + 4))
    for block, parts in batch:
        _read_checked_block(src_fd, base, header, block, view)
        pos = 0
        for s, n, wanted in parts:
            if wanted:
                checkpoint_io.pwrite_all(dst_fd, view[pos : pos + n], s)
            pos += n


def _read_checked_block(
    src_fd: int, base: int, header: Header, block: Block, view: memoryview
) -> int:
    """Read ``block`` and its stored CRC-32C into ``view`` with one ``pread`` and check
    it (raises :class:`~asyncpgalloc.CheckpointError` on a mismatch or a short file).
    **Blocking**: the block's bytes read, then checksummed. Returns the block's length."""
    n = sum(length for _, length in block.pieces)
    _preadv_all(src_fd, [view[: n + 4]], base + block.number * (header.block_size + 4))
    crc = crc32c(view[:n], block_seed(header.crc, block.number))
    checkpoint_io.check_crc(crc, view[n : n + 4], block.number)
    return n
