"""Moving checkpoint bytes: where they go (a path or an aiofiles file) and the blocking work.

Everything named ``_..._job`` blocks and runs in a worker thread of the save's or
load's private two-thread executor, through a
:class:`~asyncpgalloc.blocking.BlockingRunner`: cancelling the awaiting task waits
for the jobs in flight (at most two batches of ``BATCH_BLOCKS`` 1 MiB data blocks)
before the cleanup runs and ``CancelledError`` propagates.

Page contents are read from the backing file with ``pread`` on a file description of
our own, never through the mapping: ``pread`` of a hole (a page freed and punched
while the save runs) reads zeros without committing it again, the CRC is computed
over exactly the bytes written, and closing the MemoryFile meanwhile cannot hand our
fd number to someone else's file. Loading writes pages with ``sendfile`` (the kernel
copies from the checkpoint's page cache into the memory file's pages: no bounce
buffer, and no page is zeroed first as a fault through the mapping would), then
checks the block's CRC through the mapping while it is still in the CPU cache.

With a path, every batch is a self-contained job (positioned reads and writes), and
two run at once: the work (copying at ~2 GB/s, CRC-32C at ~12 GB/s) is spread over two CPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import queue
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import Any, Protocol, TypeVar, runtime_checkable

from . import host
from .blocking import BlockingRunner, finish_uncancelled
from .checkpoint_format import Block, Header, block_seed, pack_crc, unpack_crc
from .checkpoint_format import crc as crc32c
from .checkpoint_scan import pread_into
from .errors import CheckpointError

__all__ = [
    "BATCH_BLOCKS",
    "AsyncBinaryReader",
    "AsyncBinaryWriter",
    "FdSource",
    "PathSink",
    "Sink",
    "Source",
    "StreamSink",
    "StreamSource",
    "batches",
    "pwrite_all",
    "reopen",
    "run_pipelined",
    "sendfile_piece",
    "together",
    "write_blocks",
]

T = TypeVar("T")

#: Data blocks per executor hop (32 MiB with 1 MiB blocks): hops cost ~20-200 µs, so
#: they vanish, and cancellation waits at most for the batches in flight.
BATCH_BLOCKS = 32
#: Batches in flight at once (the private executor's threads).
WIDTH = 2
_READ_PIECE = 16 << 20


@runtime_checkable
class AsyncBinaryWriter(Protocol):
    """What ``save`` writes to besides a path: an ``aiofiles`` file opened ``"wb"``."""

    def write(self, b: Any, /) -> Awaitable[int]: ...
    def flush(self) -> Awaitable[None]: ...


@runtime_checkable
class AsyncBinaryReader(Protocol):
    """What ``load`` reads from besides a path: an ``aiofiles`` file opened ``"rb"``."""

    def read(self, n: int = -1, /) -> Awaitable[bytes]: ...


def batches(blocks: Iterable[Block], n: int = 0) -> Iterator[list[Block]]:
    """Group ``blocks`` by ``n`` (default ``BATCH_BLOCKS``): one executor job each."""
    n = n or BATCH_BLOCKS
    batch: list[Block] = []
    for block in blocks:
        batch.append(block)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


async def _settle(tasks: list[asyncio.Future[Any]]) -> None:
    """Wait for every task, even if cancelled meanwhile (then raise CancelledError)."""
    if tasks:
        await finish_uncancelled(asyncio.wait(tasks))


async def together(first: Awaitable[T], second: Awaitable[Any] | None) -> T:
    """Run two awaitables at once and wait for both, whatever happens; return the first's
    result. The first error (the first's before the second's) propagates once both are
    done, so no job is left running in a thread when the caller cleans up."""
    tasks: list[asyncio.Future[Any]] = [asyncio.ensure_future(first)]
    if second is not None:
        tasks.append(asyncio.ensure_future(second))
    try:
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        await _settle(tasks)
        raise
    errors = [t.exception() for t in tasks if not t.cancelled()]
    for err in errors:
        if err is not None:
            raise err
    result: T = tasks[0].result()
    return result


async def run_pipelined(jobs: Iterable[Callable[[], Awaitable[None]]], width: int = 0) -> None:
    """Run the awaitables ``jobs`` make, ``width`` at a time, in order of start.

    On the first error or a cancellation the others are cancelled and awaited (a job
    in a thread finishes first), then the error propagates: nothing is left running.
    """
    width = width or WIDTH
    inflight: list[asyncio.Future[None]] = []
    try:
        for make in jobs:
            if len(inflight) >= width:
                done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    inflight.remove(t)
                    t.result()
            inflight.append(asyncio.ensure_future(make()))
        while inflight:
            t = inflight.pop(0)
            await t
    except GeneratorExit:
        raise  # closed with its loop gone: nothing may await (the owner waits for threads)
    except BaseException:
        for t in inflight:
            t.cancel()
        await _settle(list(inflight))
        for t in inflight:
            if not t.cancelled():
                t.exception()  # retrieved: the first error is the one that propagates
        raise


# ------------------------------------------------------------------ blocking helpers


def reopen(fd: int, flags: int) -> int:
    """A new file description of ``fd``'s file: its own offset, and it keeps the file alive.

    One cheap ``open`` of ``/proc/self/fd/N``. Raises ``OSError`` without ``/proc``.
    """
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


def _fsync(fd: int) -> None:
    """fsync: **blocking**, as long as the disk takes to write what is dirty."""
    os.fsync(fd)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``pwrite`` all of ``data`` at ``offset`` of ``fd``. **Blocking**, linear in bytes."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _fill_block(src_fd: int, block: Block, header_crc: int, mv: memoryview) -> int:
    """Read ``block``'s pages into ``mv`` followed by their CRC; returns the bytes used."""
    pos = 0
    for off, n in block.pieces:
        pread_into(src_fd, mv[pos : pos + n], off)
        pos += n
    value = crc32c(mv[:pos], block_seed(header_crc, block.number))
    mv[pos : pos + 4] = pack_crc(value)
    return pos + 4


def _fill_batch_job(src_fd: int, batch: list[Block], header_crc: int, buf: bytearray) -> int:
    """Read ``batch``'s pages into ``buf`` as blocks, each followed by its CRC. **Blocking**."""
    mv = memoryview(buf)
    pos = 0
    for block in batch:
        pos += _fill_block(src_fd, block, header_crc, mv[pos:])
    return pos


Views = Callable[[int, int], list[memoryview]]


async def write_blocks(
    runner: BlockingRunner,
    dst_fd: int,
    src_fd: int,
    blocks: Iterable[Block],
    header: Header,
    base: int,
) -> None:
    """Write ``blocks`` (each followed by its CRC) at ``base`` of ``dst_fd`` with
    positioned writes, ``WIDTH`` batches at once in ``runner``'s threads. Each job reads
    a block's pages from ``src_fd``, checksums and writes it from one 1 MiB buffer of
    its thread (it stays in the CPU cache), then the next: one thread's write overlaps
    the other's read. Returns when every batch is written; not fsynced."""
    bufs: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    for _ in range(WIDTH):
        bufs.put(bytearray(header.block_size + 4))
    stride = header.block_size + 4

    def batch_job(batch: list[Block]) -> None:
        buf = bufs.get_nowait()
        try:
            mv = memoryview(buf)
            for block in batch:
                n = _fill_block(src_fd, block, header.crc, mv)
                pwrite_all(dst_fd, mv[:n], base + block.number * stride)
        finally:
            bufs.put(buf)

    def job(batch: list[Block]) -> Callable[[], Awaitable[None]]:
        return lambda: runner.run(batch_job, batch)

    await run_pipelined(job(b) for b in batches(blocks))


# ------------------------------------------------------------------------ sinks


class Sink:
    """Where ``save`` writes: bytes (header, metadata, trailer), the data, then commit."""

    def __init__(self, runner: BlockingRunner) -> None:
        self._run = runner

    async def write(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    async def write_data(self, src_fd: int, blocks: Iterable[Block], header: Header) -> None:
        raise NotImplementedError

    async def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Undo what can be undone after a failure. Synchronous, never raises."""


class PathSink(Sink):
    """A new file at ``path``, written under a private temporary name and renamed at the end.

    The temporary (``.NAME.RANDOM.tmp`` in the same directory, mode 0600, ``O_EXCL``)
    is fsynced, renamed over ``path`` and the directory fsynced. Until the rename
    nothing exists under ``path``; on failure or cancellation the temporary is
    removed. Creating it is one ``open`` on the loop; if that fails (a missing
    directory, no permission) the ``OSError`` names ``path``, not the temporary.
    """

    def __init__(self, path: str | os.PathLike[str], runner: BlockingRunner) -> None:
        super().__init__(runner)
        self._path = os.fspath(path)
        directory, name = os.path.split(os.path.abspath(self._path))
        if not name:
            raise IsADirectoryError(errno.EISDIR, "not a file name", self._path)
        self._dir = directory
        self._tmp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
        try:
            self._fd = os.open(
                self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
        except OSError as e:
            # Name what the caller asked for, not our private temporary.
            reason = (
                f"no directory {directory!r}"
                if isinstance(e, FileNotFoundError)
                else f"cannot create a file in {directory!r}: {e.strerror}"
            )
            raise type(e)(e.errno, f"cannot save the checkpoint: {reason}", self._path) from e
        try:
            os.fchmod(self._fd, 0o600)  # whatever the umask
        except BaseException:
            self.abort()
            raise
        self._pos = 0

    async def write(self, data: bytes | memoryview) -> None:
        await self._run.run(pwrite_all, self._fd, data, self._pos)
        self._pos += len(data)

    async def write_data(self, src_fd: int, blocks: Iterable[Block], header: Header) -> None:
        await write_blocks(self._run, self._fd, src_fd, blocks, header, self._pos)
        self._pos += header.data_bytes

    async def commit(self) -> None:
        """fsync (in the executor), then rename and fsync the directory on the loop.

        The rename and the directory fsync (one journal commit: ~0.2 ms here, since
        the data is already on disk) run on the loop with no ``await`` between them,
        so a cancellation lands either before the rename (and nothing is left) or
        not at all.
        """
        await self._run.run(_fsync, self._fd)
        fd, self._fd = self._fd, -1
        os.close(fd)
        os.rename(self._tmp, self._path)
        self._tmp = ""
        dir_fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def abort(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        if self._tmp:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = ""


class StreamSink(Sink):
    """An ``aiofiles`` file (or any :class:`AsyncBinaryWriter`): written at its position.

    Pages are read and checksummed in the executor into one of two 32 MiB buffers
    while the other is handed to ``await f.write``; ``commit`` flushes. The caller
    owns the file: it is neither fsynced nor closed, and after a failure it holds a
    partial checkpoint that ``load`` rejects.
    """

    def __init__(self, f: AsyncBinaryWriter, runner: BlockingRunner) -> None:
        super().__init__(runner)
        self._f = f

    async def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            # A buffered file takes everything; a raw one (buffering=0) may take less.
            n = await self._f.write(view)
            view = view[len(view) if n is None else n :]

    async def write_data(self, src_fd: int, blocks: Iterable[Block], header: Header) -> None:
        size = BATCH_BLOCKS * (header.block_size + 4)
        bufs = [bytearray(size), bytearray(size)]
        writing: Awaitable[Any] | None = None
        try:
            for i, batch in enumerate(batches(blocks)):
                buf = bufs[i % 2]
                # Fill one buffer while the other is written; both done before going on.
                aw, writing = writing, None
                n = await together(
                    self._run.run(_fill_batch_job, src_fd, batch, header.crc, buf), aw
                )
                writing = self.write(memoryview(buf)[:n])
            if writing is not None:
                aw, writing = writing, None
                await aw
        finally:
            if isinstance(writing, Coroutine):
                writing.close()  # never started

    async def commit(self) -> None:
        await self._f.flush()


# ------------------------------------------------------------------------ sources


class Source:
    """Where ``load`` reads: exact byte counts, then data straight into the memory file."""

    def __init__(self, runner: BlockingRunner) -> None:
        self._run = runner

    def remaining(self) -> int | None:
        """Bytes left to read, if known (a path), so truncation is caught before mapping."""
        return None

    async def read_exact(self, n: int) -> bytes:
        raise NotImplementedError

    async def load_data(
        self, header: Header, blocks: Iterable[Block], dst_fd: int, views: Views
    ) -> None:
        raise NotImplementedError

    async def finish(self, trailer_len: int) -> bytes:
        """The trailer; a path source must then be at its end."""
        return await self.read_exact(trailer_len)

    def close(self) -> None:
        """Release what the source opened. Synchronous, never raises."""


class FdSource(Source):
    """A checkpoint file opened by path: ``pread``/``sendfile`` at known offsets."""

    def __init__(self, path: str | os.PathLike[str] | int, runner: BlockingRunner) -> None:
        """Open ``path``, or take ownership of the fd ``path``."""
        super().__init__(runner)
        self._fd = path if isinstance(path, int) else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._size = os.fstat(self._fd).st_size
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except BaseException:
            os.close(self._fd)
            raise
        self._pos = 0

    def remaining(self) -> int:
        return self._size - self._pos

    def seek(self, pos: int) -> None:
        """Read from ``pos`` on (a segment of a pages file)."""
        self._pos = pos

    async def read_exact(self, n: int) -> bytes:
        if n > self.remaining():
            raise CheckpointError(
                f"truncated checkpoint: {n} bytes wanted at {self._pos}, {self.remaining()} left"
            )
        data = await self._run.run(_pread_exact, self._fd, n, self._pos)
        self._pos += n
        return data

    async def load_data(
        self, header: Header, blocks: Iterable[Block], dst_fd: int, views: Views
    ) -> None:
        base = self._pos

        def job(batch: list[Block]) -> Callable[[], Awaitable[None]]:
            return lambda: self._run.run(
                _load_batch_job, self._fd, dst_fd, batch, header, base, views
            )

        await run_pipelined(job(b) for b in batches(blocks))
        self._pos += header.data_bytes

    async def read_trailer(self, header: Header, trailer_len: int) -> bytes:
        """The trailer, read where ``header`` puts it (the position does not move)."""
        return await self._run.run(
            _pread_exact, self._fd, trailer_len, header.total_length - trailer_len
        )

    def detach(self) -> int:
        """Hand the checkpoint's fd to the caller, who closes it from now on."""
        fd, self._fd = self._fd, -1
        return fd

    async def finish(self, trailer_len: int) -> bytes:
        raw = await self.read_exact(trailer_len)
        if self.remaining():
            raise CheckpointError(f"{self.remaining()} bytes of garbage after the checkpoint")
        return raw

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def check_block_crc(src_fd: int, pos: int, crc: int, number: int) -> None:
    """Compare ``crc`` (computed over block ``number`` as it landed) with the u32 stored
    at ``pos`` of ``src_fd``; raise :class:`CheckpointError` if it is missing or differs.
    **Blocking**: one 4-byte ``pread``."""
    check_crc(crc, os.pread(src_fd, 4, pos), number)


def check_crc(crc: int, raw: bytes | memoryview, number: int) -> None:
    """Compare ``crc`` (computed over block ``number``) with ``raw``, the block's stored
    u32 as read (short: the checkpoint ends early); raise :class:`CheckpointError` if it
    is missing or differs. O(1)."""
    if len(raw) != 4:
        raise CheckpointError("truncated checkpoint: data ends early")
    if crc != unpack_crc(raw):
        raise CheckpointError(f"checkpoint data block {number} checksum mismatch")


def sendfile_piece(out: int, src_fd: int, pos: int, off: int, n: int) -> int:
    """Copy ``n`` bytes at ``pos`` of ``src_fd`` to ``off`` of ``out`` (a file description
    of the caller's own: its offset moves) with ``sendfile``: the kernel copies from the
    source's page cache into the memory file's pages, none zeroed first as a fault
    through the mapping would. **Blocking**. Returns the position after them; raises
    CheckpointError at EOF."""
    os.lseek(out, off, os.SEEK_SET)
    while n:
        sent = os.sendfile(out, src_fd, pos, n)
        if sent == 0:
            raise CheckpointError("truncated checkpoint: data ends early")
        pos += sent
        n -= sent
    return pos


def _load_batch_job(
    src_fd: int, dst_fd: int, batch: list[Block], header: Header, base: int, views: Views
) -> None:
    """sendfile each block of ``batch`` into the memory file, then check its CRC through
    the mapping. **Blocking**. Raises CheckpointError on EOF or a CRC mismatch."""
    # sendfile writes at the output's file offset: a description of our own per job.
    out = reopen(dst_fd, os.O_WRONLY)
    try:
        for block in batch:
            pos = base + block.number * (header.block_size + 4)
            crc = block_seed(header.crc, block.number)
            for off, n in block.pieces:
                pos = sendfile_piece(out, src_fd, pos, off, n)
                for v in views(off, off + n):
                    crc = crc32c(v, crc)
            check_block_crc(src_fd, pos, crc, block.number)
    finally:
        os.close(out)


def _pread_exact(fd: int, n: int, pos: int) -> bytes:
    parts: list[bytes] = []
    while n:
        data = os.pread(fd, min(n, _READ_PIECE), pos)
        if not data:
            raise CheckpointError("truncated checkpoint")
        parts.append(data)
        n -= len(data)
        pos += len(data)
    return b"".join(parts)


def _commit_batch_job(dst_fd: int, batch: list[Block]) -> None:
    """fallocate every piece of ``batch`` in the memory file. **Blocking**, linear in bytes."""
    for block in batch:
        for off, n in block.pieces:
            host.commit(dst_fd, off, n)


def _verify_batch_job(views: Views, batch: list[Block], crcs: list[int], header_crc: int) -> None:
    """Check each block's CRC against the pages now in the memory file. **Blocking**."""
    for block, want in zip(batch, crcs, strict=True):
        crc = block_seed(header_crc, block.number)
        for off, n in block.pieces:
            for v in views(off, off + n):
                crc = crc32c(v, crc)
        if crc != want:
            raise CheckpointError(f"checkpoint data block {block.number} checksum mismatch")


class StreamSource(Source):
    """An ``aiofiles`` file (or any :class:`AsyncBinaryReader`), read from its position.

    Data goes straight into the mapped pages with ``await f.readinto(view)`` where the
    file has it (``read`` and a copy otherwise); each batch's CRCs are then checked
    in the executor. The file is left just after the checkpoint.
    """

    def __init__(self, f: AsyncBinaryReader, runner: BlockingRunner) -> None:
        super().__init__(runner)
        self._f = f
        readinto = getattr(f, "readinto", None)
        self._readinto: Callable[[memoryview], Awaitable[int | None]] | None = (
            readinto if callable(readinto) else None
        )

    async def read_exact(self, n: int) -> bytes:
        parts: list[bytes] = []
        while n:
            # Pieces bound what a forged length makes us hold before EOF shows.
            data = await self._f.read(min(n, _READ_PIECE))
            if not data:
                raise CheckpointError("truncated checkpoint")
            parts.append(data)
            n -= len(data)
        return b"".join(parts)

    async def _fill(self, view: memoryview) -> None:
        while view:
            if self._readinto is not None:
                got = await self._readinto(view[:_READ_PIECE])
            else:
                data = await self._f.read(min(len(view), _READ_PIECE))
                got = len(data)
                view[:got] = data
            if not got:
                raise CheckpointError("truncated checkpoint: data ends early")
            view = view[got:]

    async def load_data(
        self, header: Header, blocks: Iterable[Block], dst_fd: int, views: Views
    ) -> None:
        for batch in batches(blocks):
            # The pages are written through the mapping: a page whose block the file
            # system cannot allocate (a disk-backed file on a full one) would be a
            # SIGBUS there, so allocate them first, where it is an OSError(ENOSPC).
            # On shmem this only moves the zeroing from the first touch to fallocate.
            await self._run.run(_commit_batch_job, dst_fd, batch)
            crcs: list[int] = []
            for block in batch:
                for off, n in block.pieces:
                    for v in views(off, off + n):
                        await self._fill(v)
                crcs.append(unpack_crc(await self.read_exact(4)))
            await self._run.run(_verify_batch_job, views, batch, crcs, header.crc)
