"""Checkpoint and restore: ``MemoryFile.save`` / ``MemoryFile.load`` (gVisor's SaveTo/LoadFrom).

``save`` refuses while evictions are pending, finds the committed pages
(known-committed ones, plus a SEEK_DATA/SEEK_HOLE scan of the file under the
commit-sequence protocol, as ``update_usage`` does with ``mincore``), takes a
snapshot of the bookkeeping with no ``await`` inside, records the waste and
releasing pages in it as released (their bytes are never read again; see
:func:`~asyncpgalloc.checkpoint_format.released`), and writes a header, the
metadata and the contents of the known-committed pages only (see
:mod:`~asyncpgalloc.checkpoint_format`). It never waits for the releaser: under
allocations and frees that never stop, there is always some waste. ``load`` reads
and checks the header and the metadata before it creates or maps anything, then
has the file open a new MemoryFile as any other (so its releaser and options
work), installs the checked state through the parts the file hands over
(:class:`FileParts`: this module reads no private state of the file) and copies the
pages in off the loop. With a shared pages file
(:mod:`asyncpgalloc.pages_file`), the pages go to (and come from) the segment the
pages file handed out, and the checkpoint keeps a reference to it instead.

What a save sees: the snapshot is one instant, after which pages are copied. Pages
freed, decommitted or reused meanwhile never corrupt the live file nor make the
checkpoint unloadable (every byte written is the byte checksummed), but may be saved
with either content: quiesce writers first, as gVisor pauses the sandbox.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from .blocking import SLICE_SECONDS, BlockingRunner, finish_uncancelled
from .checkpoint_format import (
    FLAG_PAGES_FILE,
    FLAG_WORKING_SET,
    FLAG_ZERO_PAGES_EXCLUDED,
    HEADER_SIZE,
    PAGES_REF_SIZE,
    SEGMENT_HEADER_SIZE,
    TRAILER_SIZE,
    WORKING_SET_GRANULE,
    Block,
    Header,
    PagesRef,
    Segment,
    Snapshot,
    committed_extents,
    decode_metadata,
    encode_metadata,
    mem_acct_info,
    pack_trailer,
    plan_blocks,
    released,
    unpack_trailer,
)
from .checkpoint_io import (
    AsyncBinaryReader,
    AsyncBinaryWriter,
    FdSource,
    PathSink,
    Sink,
    Source,
    StreamSink,
    StreamSource,
    reopen,
    write_blocks,
)
from .checkpoint_scan import data_extents, punch_job, zero_ranges_job
from .checkpoint_state import LoadedState, build_state
from .errors import CheckpointError, ClosedError, InvariantError, OutOfMemoryError
from .loader import PageLoader
from .options import MemoryFileOpts
from .pages_file import PagesFile, check_segment
from .ranges import FileRange

if TYPE_CHECKING:
    from .chunks import Chunks
    from .eviction import Evictions
    from .pages import PageSets, PageView
    from .working_set import WorkingSet

__all__ = [
    "CheckpointDestination",
    "CheckpointSource",
    "load_checkpoint",
    "save_checkpoint",
]


CheckpointDestination = str | os.PathLike[str] | AsyncBinaryWriter
CheckpointSource = str | os.PathLike[str] | AsyncBinaryReader


class CheckpointedFile(Protocol):
    """The public calls of a :class:`~asyncpgalloc.MemoryFile` that save and load use."""

    @property
    def closed(self) -> bool: ...

    def page_view(self) -> PageView: ...

    def inc_ref(self, fr: FileRange, memcg_id: int = 0) -> None: ...

    def dec_ref(self, fr: FileRange) -> None: ...

    def check_invariants(self, *, check_zero_pages: bool = False) -> None: ...

    async def wait_loaded(self, fr: FileRange | None = None) -> None: ...

    async def aclose(self) -> None: ...


F = TypeVar("F", bound=CheckpointedFile)


@dataclass(frozen=True, slots=True)
class FileParts:
    """What save and load need of a file beyond its public calls, handed over by the
    file itself (this module never reads another object's private state).

    ``check()`` raises unless the file may be used now; ``adopt_loader`` makes a
    :class:`~asyncpgalloc.loader.PageLoader` the file's (it starts its task);
    ``working_set`` is the file's working-set order (saved, and inherited on load)."""

    fd: int
    pages: PageSets
    blocking: BlockingRunner
    chunks: Chunks
    evictions: Evictions
    check: Callable[[], None]
    adopt_loader: Callable[[PageLoader], None]
    working_set: WorkingSet


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    # Two threads: copying one batch while the previous one is checksummed.
    return concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="asyncpgalloc-checkpoint")


# ------------------------------------------------------------------------ save


async def save_checkpoint(
    mf: CheckpointedFile,
    parts: FileParts,
    dst: CheckpointDestination,
    *,
    exclude_committed_zero_pages: bool = False,
    pages_file: PagesFile | None = None,
) -> None:
    """See :meth:`MemoryFile.save`."""
    parts.check()
    if not isinstance(dst, str | os.PathLike | AsyncBinaryWriter):
        raise TypeError(f"save: {type(dst).__name__} is neither a path nor an async binary file")
    if pages_file is not None:
        if not isinstance(pages_file, PagesFile):
            kind = type(pages_file).__name__
            raise TypeError(f"save: pages_file must be a PagesFile, not {kind}")
        if not pages_file.writable or pages_file.closed:
            raise CheckpointError(f"save: {pages_file!r} is not open for saving")
    # As gVisor's SaveTo: a load still running finishes first (or its error is ours).
    await mf.wait_loaded()
    _check_evictions(parts)
    ex = _executor()
    runner = BlockingRunner(ex)
    sink: Sink
    try:
        sink = (
            PathSink(dst, runner) if isinstance(dst, str | os.PathLike) else StreamSink(dst, runner)
        )
    except BaseException:
        ex.shutdown()
        raise
    src_fd = pages_fd = -1
    try:
        src_fd = reopen(parts.fd, os.O_RDWR)
        await _mark_data_committed(mf, parts, src_fd)
        if exclude_committed_zero_pages:
            await _exclude_zero_pages(mf, parts, src_fd)
        _live(mf)
        _check_evictions(parts)
        snap = dataclasses.replace(_snapshot(mf), working_set=parts.working_set.order())
        snap, metadata = await runner.run(_encode_released, snap)
        flags = FLAG_ZERO_PAGES_EXCLUDED if exclude_committed_zero_pages else 0
        flags |= FLAG_WORKING_SET if snap.working_set else 0
        header = Header.make(
            flags=flags | (FLAG_PAGES_FILE if pages_file is not None else 0),
            file_size=snap.file_size,
            metadata=metadata,
            data_length=snap.known_committed_bytes,
        )
        blocks = plan_blocks(committed_extents(snap.mem_acct), header.block_size)
        if pages_file is None:
            await sink.write(header.pack() + metadata)
            del metadata
            await sink.write_data(src_fd, blocks, header)
        else:
            # Reserved in turn, on the loop: concurrent saves write disjoint segments,
            # each through a description of its own (closing the PagesFile meanwhile
            # cannot hand the fd number its threads write to to someone else).
            offset = pages_file.reserve(Segment.length(header))
            pages_fd = reopen(pages_file.fileno(), os.O_WRONLY)
            identity = pages_file.identity
            ref = PagesRef(identity, offset)
            await sink.write(header.pack() + metadata + ref.pack(header))
            del metadata
            await _write_segment(runner, pages_fd, identity, src_fd, blocks, header, offset)
        await sink.write(pack_trailer(header))
        await sink.commit()
    except BaseException as e:
        if isinstance(e, GeneratorExit):
            # Closed with its loop gone: nothing may await, but the save's threads
            # may still use the temporary and the source fd, so wait for them here.
            runner.wait_idle_blocking(10.0)
        sink.abort()
        raise
    finally:
        for fd in (src_fd, pages_fd):
            if fd >= 0:
                os.close(fd)
        ex.shutdown(wait=False)


async def _write_segment(
    runner: BlockingRunner,
    fd: int,
    identity: bytes,
    src_fd: int,
    blocks: Iterable[Block],
    header: Header,
    offset: int,
) -> None:
    """Write a checkpoint's segment at ``offset`` of the pages file ``fd`` (of
    ``identity``) and fsync it, in the save's executor: its header, then the blocks as
    :func:`write_blocks` does."""
    head = Segment.of(header, offset).pack(identity)
    await runner.run(os.pwrite, fd, head, offset)
    await write_blocks(runner, fd, src_fd, blocks, header, offset + SEGMENT_HEADER_SIZE)
    await runner.run(os.fsync, fd)


def _check_evictions(parts: FileParts) -> None:
    ev = parts.evictions
    pending = ev.evictable_bytes()
    if pending or ev.evicting():
        raise CheckpointError(
            f"save: evictions are pending ({pending} evictable bytes) or running; call "
            "start_evictions() and wait_for_evictions() before save(), as gVisor requires"
        )


def _live(mf: CheckpointedFile) -> None:
    if mf.closed:
        raise ClosedError("the MemoryFile was closed during save()")


async def _mark_data_committed(mf: CheckpointedFile, parts: FileParts, fd: int) -> None:
    """Mark every used page that holds data known-committed, with its accounting.

    gVisor's save runs updateUsage first for the same reason: only known-committed
    pages are written. The scan is SEEK_DATA/SEEK_HOLE in the file's executor; a
    page decommitted, released or allocated since the scan began is not marked.
    """
    pages = parts.pages
    last_seq = pages.begin_scan()
    extents = await parts.blocking.run(data_extents, fd, pages.total_size)
    _live(mf)
    slice_start = time.perf_counter()
    for i, (s, e) in enumerate(extents):
        pages.mark_data_committed(s, e, last_seq)
        if i & 63 == 63 and time.perf_counter() - slice_start > SLICE_SECONDS:
            await asyncio.sleep(0)
            _live(mf)
            slice_start = time.perf_counter()


async def _exclude_zero_pages(mf: CheckpointedFile, parts: FileParts, fd: int) -> None:
    """Decommit the known-committed pages that are all zeros (gVisor's
    ExcludeCommittedZeroPages), with the accounting and commit-sequence update of
    :meth:`MemoryFile.decommit`.

    The candidates hold an extra reference while the scan and the punch run, so
    none can be freed and reallocated to someone who writes it before the punch.
    """
    pages = parts.pages
    candidates = pages.known_committed_runs()
    if not candidates:
        return
    for s, e in candidates:
        mf.inc_ref(FileRange(s, e))
    try:
        zeros = await parts.blocking.run(zero_ranges_job, fd, candidates)
        if zeros:
            try:
                await parts.blocking.run(punch_job, fd, zeros)
            finally:
                if not mf.closed:
                    for s, e in zeros:
                        pages.decommitted(s, e)
    finally:
        if not mf.closed:
            for s, e in candidates:
                mf.dec_ref(FileRange(s, e))


def _encode_released(snap: Snapshot) -> tuple[Snapshot, bytes]:
    """The snapshot with its waste released, and its metadata. Pure; O(segments)."""
    snap = released(snap)
    return snap, encode_metadata(snap)


def _snapshot(mf: CheckpointedFile) -> Snapshot:
    """The file's bookkeeping at this instant, waste included (no await: O(segments)
    on the loop, ~0.3 µs per segment)."""
    view = mf.page_view()
    size = view.total_size
    return Snapshot(
        commit_seq=view.commit_seq,
        known_committed_bytes=view.known_committed_bytes,
        chunk_huge=bytes(view.chunk_huge),
        unwaste_small=[(s, e) for s, e, _ in view.unwaste_small.visit_range(0, size)],
        unwaste_huge=[(s, e) for s, e, _ in view.unwaste_huge.visit_range(0, size)],
        unfree_small=list(view.unfree_small.visit_range(0, size)),
        unfree_huge=list(view.unfree_huge.visit_range(0, size)),
        mem_acct=[
            (
                s,
                e,
                ma.memcg_id,
                ma.commit_seq,
                mem_acct_info(ma.kind, ma.known_committed, ma.waste_or_releasing),
            )
            for s, e, ma in view.mem_acct.visit_range(0, size)
        ],
        subreleased=sorted(view.subreleased.items()),
    )


# ------------------------------------------------------------------------ load


async def load_checkpoint(
    open_file: Callable[[], Awaitable[tuple[F, FileParts]]],
    src: CheckpointSource,
    opts: MemoryFileOpts,
    *,
    async_pages: bool = False,
    pages_file: PagesFile | None = None,
) -> F:
    """See :meth:`MemoryFile.load`. ``open_file()`` opens the new, empty file once the
    checkpoint is checked."""
    if not isinstance(src, str | os.PathLike | AsyncBinaryReader):
        raise TypeError(f"load: {type(src).__name__} is neither a path nor an async binary file")
    if pages_file is not None and not isinstance(pages_file, PagesFile):
        raise TypeError(f"load: pages_file must be a PagesFile, not {type(pages_file).__name__}")
    if async_pages and pages_file is None and not isinstance(src, str | os.PathLike):
        raise TypeError(
            "load(async_pages=True) reads page blocks in any order: src must be a path "
            f"(or its pages in a pages file), not {type(src).__name__}"
        )
    ex = _executor()
    keep_ex = False  # handed to the page loader
    runner = BlockingRunner(ex)
    source: Source
    try:
        source = (
            FdSource(src, runner)
            if isinstance(src, str | os.PathLike)
            else StreamSource(src, runner)
        )
    except BaseException:
        ex.shutdown()
        raise
    mf: F | None = None
    dst_fd = -1
    src_fd = -1
    pages: Source | None = None  # the pages file's data, for a checkpoint that has one
    try:
        header = Header.unpack(await source.read_exact(HEADER_SIZE))
        if header.pages_file != (pages_file is not None):
            raise CheckpointError(
                "the checkpoint's pages are in a pages file: load it with pages_file="
                if header.pages_file
                else "the checkpoint holds its own pages: load it without pages_file"
            )
        left = source.remaining()
        if left is not None and left != header.total_length - HEADER_SIZE:
            raise CheckpointError(
                f"checkpoint is {HEADER_SIZE + left} bytes, its header says {header.total_length}"
                + (" (truncated)" if HEADER_SIZE + left < header.total_length else "")
            )
        if opts.max_chunks is not None and header.num_chunks > opts.max_chunks:
            raise CheckpointError(
                f"checkpoint needs {header.num_chunks} chunks; opts.max_chunks is {opts.max_chunks}"
            )
        metadata = await source.read_exact(header.metadata_length)
        header.check_metadata(metadata)
        state, order = await runner.run(_parse, header, metadata)
        del metadata
        data_offset = header.data_offset
        if pages_file is not None:
            ref = PagesRef.unpack(header, await source.read_exact(PAGES_REF_SIZE))
            unpack_trailer(header, await source.finish(TRAILER_SIZE))
            # A description of the load's own: the PagesFile may be closed meanwhile.
            pages_fd = reopen(pages_file.fileno(), os.O_RDONLY)
            pages = FdSource(pages_fd, runner)
            data_offset = await runner.run(
                check_segment, pages_fd, pages_file.identity, header, ref
            )
            pages.seek(data_offset)
        elif async_pages:
            assert isinstance(source, FdSource)
            # The trailer first: a truncated checkpoint fails here, not in the loader.
            unpack_trailer(header, await source.read_trailer(header, TRAILER_SIZE))
        data = pages if pages is not None else source

        # Everything is checked: from here on, build.
        mf, parts = await open_file()
        _install(parts, state)
        parts.working_set.inherit(order)
        dst_fd = reopen(parts.fd, os.O_RDWR)
        if async_pages:
            assert isinstance(data, FdSource)
            _check_loaded(mf)
            if state.extents:
                blocks = list(plan_blocks(state.extents, header.block_size))
                src_fd = data.detach()
                loader_fd, dst_fd = dst_fd, -1
                loader = PageLoader(
                    header=header,
                    blocks=blocks,
                    data_offset=data_offset,
                    src_fd=src_fd,
                    dst_fd=loader_fd,
                    executor=ex,
                    inc_ref=mf.inc_ref,
                    dec_ref=mf.dec_ref,
                    order=order,
                    granule=WORKING_SET_GRANULE,
                )
                src_fd, keep_ex = -1, True  # the loader's now
                parts.adopt_loader(loader)
            return mf
        await data.load_data(
            header, plan_blocks(state.extents, header.block_size), dst_fd, parts.chunks.views
        )
        if pages is None:
            unpack_trailer(header, await source.finish(TRAILER_SIZE))
        _check_loaded(mf)
        return mf
    except BaseException:
        if mf is not None:
            await finish_uncancelled(mf.aclose())
        raise
    finally:
        for fd in (dst_fd, src_fd):
            if fd >= 0:
                os.close(fd)
        source.close()
        if pages is not None:
            pages.close()
        if not keep_ex:
            ex.shutdown(wait=False)


def _check_loaded(mf: CheckpointedFile) -> None:
    """The last step of a load: the file is open and its state consistent."""
    if mf.closed:
        raise ClosedError("the MemoryFile was closed during load()")
    try:
        mf.check_invariants()
    except InvariantError as e:
        raise CheckpointError(f"loaded state is inconsistent: {e}") from e


def _parse(header: Header, metadata: bytes) -> tuple[LoadedState, tuple[int, ...]]:
    """The state to install and the working-set order. Pure; O(segments)."""
    snap = decode_metadata(header, metadata)
    return build_state(header, snap), snap.working_set


def _install(parts: FileParts, state: LoadedState) -> None:
    """Give a fresh, empty MemoryFile the checkpoint's chunks, page sets and accounting.

    On the loop: one ftruncate plus one mmap (and madvise) per chunk, and O(segments)
    to add the known-committed bytes to the file's MemoryAccounting; the sets are
    handed over as built. Raises :class:`CheckpointError` if the chunks cannot all be
    mapped (ENOMEM: more than ``vm.max_map_count`` or the address space allows).
    """
    if state.chunk_huge:
        try:
            parts.chunks.grow([bool(h) for h in state.chunk_huge])
        except OutOfMemoryError as e:
            # Past vm.max_map_count or the address space: this checkpoint cannot
            # be loaded here, whatever memory is free.
            raise CheckpointError(
                f"checkpoint's {len(state.chunk_huge)} chunks of 1 GiB cannot all be "
                f"mapped in this process: {e}"
            ) from e
    # With the accounting, so that aclose() after a failed load gives exactly this back.
    parts.pages.install(
        chunk_huge=(bool(h) for h in state.chunk_huge),
        unfree_small=state.unfree_small,
        unfree_huge=state.unfree_huge,
        mem_acct=state.mem_acct,
        subreleased=state.subreleased,
        commit_seq=state.commit_seq,
        known_committed=state.committed,
    )
