"""The backing file's address space: its 1 GiB chunk mappings, and views into them.

Owned by the asyncio shell (:class:`~asyncpgalloc.MemoryFile`); the page-state core
(:mod:`asyncpgalloc.pages`) knows only each chunk's page size. The chunk list is
replaced whole when the file grows, so an executor thread reading it sees the old
list or the new one: every reader here is safe off the loop.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from typing import NamedTuple

from . import host
from .errors import OutOfMemoryError
from .ranges import CHUNK_SHIFT, CHUNK_SIZE, FileRange

__all__ = ["Chunk", "Chunks"]

logger = logging.getLogger("asyncpgalloc")

_OFFSET_MASK = CHUNK_SIZE - 1


class Chunk(NamedTuple):
    """One 1 GiB chunk of the file: its mapping and whether it is huge-page-backed."""

    mapping: host.ChunkMapping
    huge: bool


class Chunks:
    """The chunk mappings of one backing file (``fd``, which the caller owns).

    ``advise_hugepage``/``advise_no_hugepage``: ``madvise`` each new chunk of that
    page size as gVisor does (a failure is logged: the mapping still works).
    """

    def __init__(self, fd: int, *, advise_hugepage: bool, advise_no_hugepage: bool) -> None:
        self._fd = fd
        self._advise_huge = advise_hugepage
        self._advise_small = advise_no_hugepage
        self._chunks: list[Chunk] = []

    @property
    def count(self) -> int:
        return len(self._chunks)

    @property
    def size(self) -> int:
        """Bytes mapped: whole chunks."""
        return len(self._chunks) * CHUNK_SIZE

    def grow(self, huge: Sequence[bool]) -> None:
        """Map ``len(huge)`` more chunks, the i-th of page size ``huge[i]``, growing the
        file to hold them (it never shrinks: see :func:`host.grow_file`). On the
        loop: an fstat/ftruncate plus one mmap (and madvise) per chunk.

        On failure nothing changes: the new mappings are released, the file's size
        goes back (unless a guest's seal keeps it), and the error propagates, ENOMEM
        (past ``vm.max_map_count`` or the address space) as
        :class:`~asyncpgalloc.OutOfMemoryError`.
        """
        old = self._chunks
        old_size = len(old) * CHUNK_SIZE
        host.grow_file(self._fd, old_size + len(huge) * CHUNK_SIZE)
        mappings: list[host.ChunkMapping] = []
        try:
            for i, h in enumerate(huge, len(old)):
                mapping = host.ChunkMapping(self._fd, i * CHUNK_SIZE, CHUNK_SIZE)
                mappings.append(mapping)
                self._advise(mapping, h)
        except BaseException as e:
            for mapping in mappings:
                mapping.release()
            host.undo_growth(self._fd, old_size)
            if isinstance(e, OSError) and e.errno == errno.ENOMEM:
                raise OutOfMemoryError(
                    f"cannot map {len(huge)} more chunks of 1 GiB ({len(mappings)} were): {e}"
                ) from e
            raise
        # Readers (executor threads) see either the old list or the new one.
        self._chunks = old + [Chunk(m, h) for m, h in zip(mappings, huge, strict=True)]

    def _advise(self, mapping: host.ChunkMapping, huge: bool) -> None:
        if huge and self._advise_huge:
            advice, name = host.MADV_HUGEPAGE, "MADV_HUGEPAGE"
        elif not huge and self._advise_small:
            advice, name = host.MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE"
        else:
            return
        try:
            host.madvise(mapping.addr, mapping.length, advice)
        except OSError as e:
            # As gVisor: the mapping still works, only the page size may differ.
            logger.warning("madvise(%#x, %d, %s) failed: %s", mapping.addr, mapping.length, name, e)

    def views(self, start: int, end: int) -> list[memoryview]:
        """Writable views of ``[start, end)``, one per chunk (no checks)."""
        chunks = self._chunks
        return [
            chunks[s >> CHUNK_SHIFT].mapping.view(s & _OFFSET_MASK, e - s)
            for s, e in chunk_pieces(start, end)
        ]

    def address(self, offset: int) -> int:
        """Where the mapping holds ``offset``."""
        return self._chunks[offset >> CHUNK_SHIFT].mapping.addr + (offset & _OFFSET_MASK)

    def address_pieces(self, fr: FileRange) -> list[tuple[int, int]]:
        """(address, length) of the mapping of ``fr``, one per chunk."""
        chunks = self._chunks
        return [
            (chunks[s >> CHUNK_SHIFT].mapping.addr + (s & _OFFSET_MASK), e - s)
            for s, e in chunk_pieces(fr.start, fr.end)
        ]

    def release(self) -> None:
        """Drop every mapping (one a view still uses lives until the view goes)."""
        chunks, self._chunks = self._chunks, []
        for chunk in chunks:
            chunk.mapping.release()


def chunk_pieces(start: int, end: int) -> list[tuple[int, int]]:
    """Split ``[start, end)`` at chunk boundaries."""
    if start >> CHUNK_SHIFT == (end - 1) >> CHUNK_SHIFT:
        return [(start, end)]
    pieces = []
    while start < end:
        stop = min(end, ((start >> CHUNK_SHIFT) + 1) << CHUNK_SHIFT)
        pieces.append((start, stop))
        start = stop
    return pieces
