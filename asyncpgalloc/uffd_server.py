"""Serving a guest's page faults on the event loop, from a file still being loaded.

A guest process maps the sandbox's memfd, registers the mapping with a userfaultfd
for missing-page faults and hands the uffd to its supervisor (see
:mod:`asyncpgalloc.uffd`). While the file is loaded with ``async_pages=True``, a page
the loader has not written yet is a hole in the memfd: the guest's touch of it
faults, and :class:`FaultServer` resolves the fault on the loop:

- the page is still pending in the load and its block not being read: the server
  takes the block from the loader (:meth:`PageLoader.claim
  <asyncpgalloc.loader.PageLoader.claim>`: with the other pending blocks of the
  ``ahead`` window around the fault), reads it with its CRC-32C from the checkpoint,
  checks it and ``UFFDIO_COPY``s the guest's pages of it straight into its mapping
  (for shmem: into the memfd's page cache, so they count as loaded and the loader never
  writes them again). A copy of at most ``INLINE_COPY_BYTES`` runs on the loop (~10 µs
  for a 4 KiB block), a larger one in the loader's fault thread;
- the page's block is being read already (by the loader, or for another fault), or
  its copy failed (a damaged block, a read error): ``await mf.wait_loaded(page)``
  (its block goes to the front of the loader's queue), then ``UFFDIO_WAKE``: the
  loader wrote it into the memfd's page cache, so the retried fault finds it;
- the page is not pending (the checkpoint holds it as zero or free, or it is a
  fresh allocation's hole): ``UFFDIO_ZEROPAGE``, a zeroed page in the page cache
  (``EEXIST``, someone filled it first: ``UFFDIO_WAKE``).

Once the whole file is loaded, the range is unregistered (later touches cost
nothing) and the server closes. A page that cannot be loaded (a damaged block, a
read error, the file's ``aclose()``) kills the guest waiting for it (``SIGKILL``
through a pidfd, the reason logged and kept in :attr:`FaultServer.failure`): it never
sees zeros or wrong bytes. The guest's exit (its pidfd becomes readable) closes the
server with nothing left behind: its reader, its waits, its fds.

Each fault's file offset goes to the file's working-set order
(:meth:`~asyncpgalloc.MemoryFile.record_fault`); while the load runs, and once it is
done, the ranges the guest touched without a fault are added from its page table
(:func:`~asyncpgalloc.working_set.touched_granules`, every ``WORKING_SET_REFRESH`` s).

The guest keeps its own copy of the uffd open, so that closing the supervisor's copy
never wakes a faulting thread into a hole; a guest should also ask for
``PR_SET_PDEATHSIG`` so that a supervisor's crash does not leave it in a fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import loader, uffd
from .blocking import finish_uncancelled, hold_lending
from .checkpoint_format import WORKING_SET_GRANULE
from .errors import AllocatorError, CheckpointError, ClosedError
from .ranges import PAGE_SIZE, FileRange
from .working_set import touched_granules

if TYPE_CHECKING:
    from .memory_file import MemoryFile

__all__ = ["FaultServer", "FaultStats"]

logger = logging.getLogger("asyncpgalloc")

#: Fault messages read in one ``read`` of the uffd.
READ_BATCH = 64
#: Reads per wake-up before the loop gets a turn (the rest on the next wake-up).
READS_PER_WAKEUP = 4
#: Seconds between two looks at the guest's page table for the working-set order, while
#: the load runs (one executor hop each, ~2 ms of a thread per GiB mapped).
WORKING_SET_REFRESH = 0.25
#: After a fault, executor jobs stop lending the GIL for this long (see hold_lending):
#: a lending turn blocks the loop up to 0.2 ms, the next fault's wait.
QUIET_SECONDS = 0.05
# The guest's mm is gone (it is exiting): nothing left to resolve.
_GONE = (errno.ESRCH, errno.ENOENT)


@dataclass(frozen=True)
class FaultStats:
    """A :class:`FaultServer`'s counters.

    ``faults``: fault messages read; ``waited``: faults that waited for the loader;
    ``waiting``: pages whose wait (or copy in the executor) is still on;
    ``woken``: resolved with ``UFFDIO_WAKE`` (the page was loaded); ``zeroed``:
    resolved with ``UFFDIO_ZEROPAGE`` (a hole); ``unregistered``: the whole file was
    loaded and the range unregistered; ``failure``: why the guest was killed ("" if
    not); ``closed``: the server is done (its fds closed); ``copied``: faults resolved
    with ``UFFDIO_COPY`` from the checkpoint; ``copied_bytes``: the bytes those copies
    loaded (the fault's block, and the ``ahead`` window's).
    """

    faults: int
    waited: int
    waiting: int
    woken: int
    zeroed: int
    unregistered: bool
    failure: str
    closed: bool
    copied: int = 0
    copied_bytes: int = 0


class FaultServer:
    """Serves the missing-page faults of one guest's mapping of ``mf``.

    ``fd`` is the guest's userfaultfd (non-blocking; the server owns this copy and
    closes it), ``base``/``length`` the registered mapping in the guest, which maps
    the file from ``offset``; ``pid`` the guest process (killed if a page it waits
    for cannot be loaded). ``ahead`` (a power of two, 0 for none): a fault copies also
    the pending blocks of the ``ahead``-aligned window around it (e.g. 2 MiB for a huge
    allocation), in the same executor job. Construct and :meth:`start` on the file's
    loop; a bad mapping is ``ValueError``, a guest already gone ``ProcessLookupError``
    (``fd`` is closed either way).
    """

    def __init__(
        self,
        mf: MemoryFile,
        fd: int,
        base: int,
        length: int,
        pid: int,
        *,
        offset: int = 0,
        ahead: int = 0,
    ) -> None:
        try:
            if base % PAGE_SIZE or length <= 0 or length % PAGE_SIZE or offset % PAGE_SIZE:
                raise ValueError(f"unaligned mapping [{base:#x}, +{length:#x}) at {offset:#x}")
            if ahead < 0 or ahead & (ahead - 1):
                raise ValueError(f"ahead must be 0 or a power of two, not {ahead}")
            self._pidfd = os.pidfd_open(pid)  # ProcessLookupError: the guest is gone
        except BaseException:
            os.close(fd)  # ours from the call on, whatever happens
            raise
        self._mf = mf
        self._fd = fd
        self._base = base
        self._length = length
        self._offset = offset
        self._pid = pid
        self._ahead = ahead
        self._loop = asyncio.get_running_loop()
        self._waits: dict[int, asyncio.Task[None]] = {}  # page address -> its wait
        # Those of _waits that copy: never cancelled, they end with their copy.
        self._copies: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._done = self._loop.create_future()
        self._faults = self._waited = self._woken = self._zeroed = 0
        self._copied = self._copied_bytes = 0
        self._unregistered = False
        self._closed = False
        self.failure = ""

    def start(self) -> None:
        """Watch the uffd and the guest's exit; unregister once the file is loaded.
        Two ``add_reader`` calls and a task, on the loop."""
        self._loop.add_reader(self._fd, self._readable)
        self._loop.add_reader(self._pidfd, self.close)
        self._watch = self._loop.create_task(
            self._unregister_when_loaded(), name=f"asyncpgalloc-uffd-{self._pid}"
        )
        self._sampler = self._loop.create_task(
            self._sample_working_set(), name=f"asyncpgalloc-uffd-ws-{self._pid}"
        )

    def stats(self) -> FaultStats:
        """The counters (see :class:`FaultStats`). O(1)."""
        return FaultStats(
            self._faults,
            self._waited,
            len(self._waits),
            self._woken,
            self._zeroed,
            self._unregistered,
            self.failure,
            self._closed,
            self._copied,
            self._copied_bytes,
        )

    async def wait_closed(self) -> None:
        """Wait until the server is done: the guest exited, was killed, or its range
        was unregistered (and no look at its page table is still running)."""
        await asyncio.shield(self._done)
        tasks = [t for t in (self._watch, self._sampler) if t is not None]
        if tasks and asyncio.current_task() not in tasks:
            await asyncio.wait(tasks)

    def close(self) -> None:
        """Stop serving: readers removed, waits cancelled, the fds closed. Idempotent,
        synchronous. Does not kill the guest: called while the range is still
        registered and the guest alive, its next fault on a hole waits until the guest
        is killed or exits (its own uffd copy keeps the fault pending)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing watches
            self._loop.remove_reader(self._fd)
            self._loop.remove_reader(self._pidfd)
        for task in self._waits.values():
            if task not in self._copies:
                task.cancel()
        self._waits.clear()
        for t in (self._watch, self._sampler):
            if t is not None and t is not asyncio.current_task():
                t.cancel()
        os.close(self._fd)
        os.close(self._pidfd)
        if not self._done.done():
            self._done.set_result(None)

    # ---------------------------------------------------------------- the faults

    def _readable(self) -> None:
        hold_lending(QUIET_SECONDS)
        for _ in range(READS_PER_WAKEUP):
            try:
                faults = uffd.read_faults(self._fd, READ_BATCH)
            except uffd.UffdError as e:
                self._fail(f"reading its userfaultfd failed: {e}")
                return
            for f in faults:
                self._fault(f.address)
                if self._closed:
                    return
            if len(faults) < READ_BATCH:
                return

    def _fault(self, address: int) -> None:
        """One fault: resolve a hole at once, or start a wait for a pending page."""
        self._faults += 1
        page = address & ~(PAGE_SIZE - 1)
        if page in self._waits:
            return  # another thread on the same page: its wake-up wakes both
        if not self._base <= page < self._base + self._length:
            self._resolve(page, hole=False)  # not ours: let it retry
            return
        if self._mf.closed:
            self._fail("its file was closed before its pages were loaded")
            return
        off = page - self._base + self._offset
        self._mf.record_fault(off)  # the working-set order (see working_set.py)
        fr = FileRange(off, off + PAGE_SIZE)
        try:
            pending = self._mf.pending_load_bytes(fr)
        except AllocatorError as e:  # poisoned, forked, a page beyond the file
            self._fail(f"its fault at file offset {off:#x} cannot be served: {e}")
            return
        if not pending:
            self._resolve(page, hole=True)
            return
        pl = self._mf.page_loader()
        claim = None if pl is None else pl.claim(off, self._window(off), self._mapped())
        if pl is None or claim is None:
            self._wait(page, fr)
        elif claim.nbytes <= loader.INLINE_COPY_BYTES:
            pl.copy_inline(claim, self._fd, self._base - self._offset)
            self._copy_done(page, fr, claim)
        else:
            # A dup of our uffd for the copy (close() does not wait for it).
            copy = self._copy(pl, page, fr, claim, os.dup(self._fd))
            task = self._waits[page] = self._loop.create_task(copy)
            self._copies.add(task)
            task.add_done_callback(self._copies.discard)

    def _mapped(self) -> tuple[int, int]:
        """The guest's mapping, in file offsets."""
        return self._offset, self._offset + self._length

    def _window(self, off: int) -> tuple[int, int]:
        """The ``ahead`` window around file offset ``off``, within the mapping."""
        if not self._ahead:
            return off, off + PAGE_SIZE
        start = off & ~(self._ahead - 1)
        lo, hi = self._mapped()
        return max(start, lo), min(start + self._ahead, hi)

    async def _copy(
        self, pl: loader.PageLoader, page: int, fr: FileRange, claim: loader.FaultCopy, fd: int
    ) -> None:
        await pl.copy(claim, fd, self._base - self._offset)
        if self._waits.get(page) is asyncio.current_task():
            del self._waits[page]
        self._copy_done(page, fr, claim)

    def _copy_done(self, page: int, fr: FileRange, claim: loader.FaultCopy) -> None:
        """After a fault's copy: resolved (the copy woke the guest), or the page waits
        for the loader (the block went back to it), or the guest is killed."""
        err = claim.error
        if err is None or claim.guest_gone:
            self._copied += 1
            self._copied_bytes += sum(e - s for s, e in claim.copied)
            return  # (a guest gone: its pidfd closes the server)
        if self._closed:
            return
        if isinstance(err, uffd.UffdError):
            self._fail(f"copying its page at {page:#x} failed: {err}")
        elif not isinstance(err, (CheckpointError, OSError)):
            self._fail(f"copying its page at {page:#x} failed: {err!r}")
        elif self._mf.pending_load_bytes(fr):
            self._wait(page, fr)  # the loader reads the block again: it fails the load
        else:
            self._resolve(page, hole=False)  # the page landed, a later block failed

    def _wait(self, page: int, fr: FileRange) -> None:
        self._waited += 1
        self._waits[page] = self._loop.create_task(self._serve(page, fr))

    async def _serve(self, page: int, fr: FileRange) -> None:
        try:
            await self._mf.wait_loaded(fr)
        except (CheckpointError, ClosedError) as e:
            self._waits.pop(page, None)
            self._fail(f"page {fr.start:#x} of its file cannot be loaded: {e}")
            return
        self._waits.pop(page, None)
        # In the page cache now (or dropped as waste: the retried fault finds a hole
        # and comes back, no longer pending, for a zero page).
        self._resolve(page, hole=False)

    def _resolve(self, page: int, *, hole: bool) -> None:
        """A zero page for a hole, else a wake-up; a dead guest's mm is no error."""
        try:
            if hole:
                try:
                    uffd.zeropage(self._fd, page, PAGE_SIZE)
                    self._zeroed += 1
                    return
                except uffd.UffdError as e:
                    if e.errno not in (errno.EEXIST, errno.EAGAIN):
                        raise
            uffd.wake(self._fd, page, PAGE_SIZE)  # EAGAIN: the mm changed; it refaults
            self._woken += 1
        except uffd.UffdError as e:
            if e.errno not in _GONE:
                self._fail(f"resolving its fault at {page:#x} failed: {e}")

    def _exited(self) -> bool:
        """The guest has exited (its pidfd is readable). One ``poll``, never blocks."""
        p = select.poll()
        p.register(self._pidfd, select.POLLIN)
        return bool(p.poll(0))

    def _fail(self, reason: str) -> None:
        """Kill the guest (its faulting thread must never see the hole) and close."""
        if self._closed:
            return
        self.failure = reason
        logger.warning("guest %d killed: %s", self._pid, reason)
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        self.close()

    async def _refresh_working_set(self) -> None:
        """Add to the file's working-set order the ranges the guest touched without a
        fault (loaded before it got there), from its page table: one executor hop."""
        granule = WORKING_SET_GRANULE
        start = -(-self._offset // granule) * granule
        end = (self._offset + self._length) // granule * granule
        if end <= start:
            return
        base = self._base + start - self._offset
        with contextlib.suppress(OSError):  # the guest is gone, or not ours to read
            # Uncancelled: close() never leaves a read (and its open pagemap) behind.
            touched = await finish_uncancelled(
                self._loop.run_in_executor(
                    None, touched_granules, self._pid, base, end - start, start
                )
            )
            self._mf.record_touched(touched)

    async def _sample_working_set(self) -> None:
        """While the load runs, look at the guest's page table every
        WORKING_SET_REFRESH s: the order then keeps the ranges it touched before it
        exits, even if it exits before the load is done."""
        while not self._closed:
            await asyncio.sleep(WORKING_SET_REFRESH)
            if self._closed:
                return
            await self._refresh_working_set()

    async def _unregister_when_loaded(self) -> None:
        try:
            await self._mf.wait_loaded()
        except (CheckpointError, ClosedError):
            return  # a fault on a page not loaded will end the guest
        if self._closed:
            return
        await self._refresh_working_set()
        if self._closed:
            return
        try:
            uffd.unregister(self._fd, self._base, self._length)
        except uffd.UffdError as e:
            # ENOMEM: the guest's mm is gone (the kernel's answer when it cannot take a
            # reference on it: exiting, its pidfd not readable yet); EINVAL: it unmapped
            # or remapped its window, exiting. No fault of it can wait on us any more.
            gone = (*_GONE, errno.ENOMEM, errno.EINVAL)
            if e.errno not in gone and not self._exited():
                self._fail(f"unregistering its mapping failed: {e}")
                return
        self._unregistered = True
        logger.debug("guest %d: its file is loaded, userfaultfd unregistered", self._pid)
        self.close()
