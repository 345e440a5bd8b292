"""A pages file shared by several checkpoints (gVisor's ``SaveOpts.PagesFile``).

Several MemoryFiles (one per sandbox) each save their metadata to a stream of their
own and their page contents into one pages file, at increasing offsets::

    async with await PagesFile.create("pages.bin") as pages:
        await asyncio.gather(*(mf.save(f"meta{i}", pages_file=pages)
                               for i, mf in enumerate(files)))

    async with await PagesFile.open("pages.bin") as pages:
        mfs = [await MemoryFile.load(f"meta{i}", pages_file=pages, async_pages=True)
               for i in range(len(files))]

The format (see :mod:`asyncpgalloc.checkpoint_format`): a 4096-byte header with a
magic, a version and a random 16-byte identity, then one segment per save, each at
a 4096-aligned offset handed out by :meth:`PagesFile.reserve` when that save has
taken its snapshot, so saves running at once on one loop write disjoint ranges.
A segment starts with a header naming its checkpoint (the checkpoint header's CRC,
block count, data length, offset), then holds the data blocks exactly as a
self-contained checkpoint does, each with its CRC-32C. The checkpoint's metadata
stream records the identity and the offset: a load refuses, with
:class:`~asyncpgalloc.CheckpointError` and before anything is mapped, the wrong
pages file, the wrong offset, another checkpoint's segment, or a pages file cut
short. A save that fails leaves its reserved range unused (zeros or a partial
segment that no metadata stream names).

A ``PagesFile`` belongs to one event loop; several saves or loads may use it at once.
Each save fsyncs the pages file before it commits its metadata stream, so a
metadata stream that exists names pages that are on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from types import TracebackType

from .checkpoint_format import (
    PAGES_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    Header,
    PagesRef,
    Segment,
    pack_pages_header,
    unpack_pages_header,
)
from .errors import CheckpointError, ClosedError

__all__ = ["PagesFile", "check_segment", "read_identity"]


def read_identity(fd: int) -> bytes:
    """Read and check a pages file's header; its identity. **Blocking** (one pread)."""
    return unpack_pages_header(os.pread(fd, PAGES_HEADER_SIZE, 0))


def check_segment(fd: int, identity: bytes, header: Header, ref: PagesRef) -> int:
    """Check that the pages file ``fd`` (of ``identity``) holds ``header``'s checkpoint at
    ``ref``, whole; the offset of its first data block. **Blocking**: one fstat and one
    pread. Raises :class:`CheckpointError` naming the first problem."""
    if ref.identity != identity:
        raise CheckpointError(
            f"the checkpoint's pages are in pages file {ref.identity.hex()}, "
            f"not in this one ({identity.hex()})"
        )
    size = os.fstat(fd).st_size
    need = ref.offset + SEGMENT_HEADER_SIZE + header.data_bytes
    if size < need:
        raise CheckpointError(
            f"truncated pages file: {size} bytes, the checkpoint's pages end at {need}"
        )
    raw = os.pread(fd, SEGMENT_HEADER_SIZE, ref.offset)
    Segment.of(header, ref.offset).check(identity, raw)
    return ref.offset + SEGMENT_HEADER_SIZE


class PagesFile:
    """One pages file, open for writing (:meth:`create`) or reading (:meth:`open`).

    Close it with :meth:`aclose` (or ``async with``); a reader may be closed while
    loads it started still run: each load reads through a file description of its own.
    """

    def __init__(self, fd: int, identity: bytes, writable: bool, path: str) -> None:
        self._fd = fd
        self._identity = identity
        self._writable = writable
        self._path = path
        self._next = PAGES_HEADER_SIZE

    @classmethod
    async def create(cls, path: str | os.PathLike[str]) -> PagesFile:
        """Create (or truncate) the pages file at ``path`` (mode 0600) with a fresh
        identity, for saves. One open and one 4 KiB write in the default executor."""
        path = os.fspath(path)
        identity = secrets.token_bytes(16)
        fd = await asyncio.to_thread(_create, path, identity)
        return cls(fd, identity, True, path)

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> PagesFile:
        """Open the pages file at ``path`` for loads and check its header. One open and
        one pread in the default executor. Raises :class:`CheckpointError` if it is not
        a pages file (or not of this version), ``OSError`` if it cannot be opened."""
        path = os.fspath(path)
        fd, identity = await asyncio.to_thread(_open, path)
        return cls(fd, identity, False, path)

    @property
    def identity(self) -> bytes:
        """The 16 random bytes that name this pages file in the metadata streams."""
        return self._identity

    @property
    def path(self) -> str:
        return self._path

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def next_offset(self) -> int:
        """The offset the next :meth:`reserve` hands out (the end of what is reserved)."""
        return self._next

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        """The pages file's fd (owned by this object). Raises ClosedError once closed."""
        if self._fd < 0:
            raise ClosedError(f"pages file {self._path} is closed")
        return self._fd

    def reserve(self, length: int) -> int:
        """Hand out the next ``length`` bytes (a multiple of 4096) of a writable pages
        file: their offset. O(1), on the loop, no I/O: saves that reserve in turn get
        disjoint, increasing ranges."""
        self.fileno()
        if not self._writable:
            raise CheckpointError(f"pages file {self._path} is open for reading, not saving")
        if length <= 0 or length % 4096:
            raise ValueError(f"reserve: bad length {length}")
        offset = self._next
        self._next += length
        return offset

    async def aclose(self) -> None:
        """fsync a writable pages file (in the default executor), then close it.
        Idempotent."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            if self._writable:
                await asyncio.to_thread(os.fsync, fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close at once, without fsync (each save already fsynced its pages)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    async def __aenter__(self) -> PagesFile:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        mode = "w" if self._writable else "r"
        return f"<PagesFile {self._path!r} {mode} {self._identity.hex()}>"


def _create(path: str, identity: bytes) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, pack_pages_header(identity), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open(path: str) -> tuple[int, bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        identity = read_identity(fd)
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except BaseException:
        os.close(fd)
        raise
    return fd, identity
