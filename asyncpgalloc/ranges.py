"""Page geometry and the half-open ranges every other module speaks in."""

from __future__ import annotations

import mmap
from typing import NamedTuple

__all__ = [
    "CHUNK_MASK",
    "CHUNK_SHIFT",
    "CHUNK_SIZE",
    "HUGE_PAGE_SIZE",
    "KEY_MAX",
    "MAX_CHUNKS",
    "MAX_MAPPABLE_CHUNKS",
    "PAGES_PER_HUGE_PAGE",
    "PAGE_SIZE",
    "EvictableRange",
    "FileRange",
    "huge_round_down",
    "huge_round_up",
    "is_huge_aligned",
    "is_page_aligned",
    "page_round_down",
    "page_round_up",
]

PAGE_SIZE: int = mmap.PAGESIZE
# x86-64 and arm64 (4 KiB granule) both use 2 MiB PMD-sized huge pages.
HUGE_PAGE_SIZE: int = 2 << 20
PAGES_PER_HUGE_PAGE: int = HUGE_PAGE_SIZE // PAGE_SIZE

CHUNK_SHIFT: int = 30
CHUNK_SIZE: int = 1 << CHUNK_SHIFT
CHUNK_MASK: int = CHUNK_SIZE - 1
# The file size is an off_t (int64), as in gVisor.
MAX_CHUNKS: int = (2**63 - 1) // CHUNK_SIZE
#: x86-64 gives a process 128 TiB of address space (47 bits): no more 1 GiB chunks
#: can ever be mapped at once, whatever ``max_chunks`` says.
MAX_MAPPABLE_CHUNKS: int = 1 << 17
# Segment sets span the whole uint64 key space, as gVisor's do.
KEY_MAX: int = 2**64


def is_page_aligned(x: int) -> bool:
    return x % PAGE_SIZE == 0


def is_huge_aligned(x: int) -> bool:
    return x % HUGE_PAGE_SIZE == 0


def page_round_down(x: int) -> int:
    return x - x % PAGE_SIZE


def page_round_up(x: int) -> int:
    return -(-x // PAGE_SIZE) * PAGE_SIZE


def huge_round_down(x: int) -> int:
    return x - x % HUGE_PAGE_SIZE


def huge_round_up(x: int) -> int:
    return -(-x // HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE


class FileRange(NamedTuple):
    """A half-open byte range ``[start, end)`` of the backing file.

    A tuple, so it is cheap to make on the allocation fast path and hashable.
    """

    start: int
    end: int

    @property
    def length(self) -> int:
        """``end - start``."""
        return self.end - self.start

    def well_formed(self) -> bool:
        """True if ``0 <= start <= end``."""
        return 0 <= self.start <= self.end

    def intersect(self, other: tuple[int, int]) -> FileRange:
        """The part of this range inside ``other`` (empty, at a bound, if none)."""
        start = max(self.start, other[0])
        end = min(self.end, other[1])
        if end < start:
            end = start
        return FileRange(start, end)

    def __str__(self) -> str:
        return f"[{self.start:#x}, {self.end:#x})"


class EvictableRange(NamedTuple):
    """A half-open range ``[start, end)`` of an evictable user's own offsets."""

    start: int
    end: int

    @property
    def length(self) -> int:
        """``end - start``."""
        return self.end - self.start

    def __str__(self) -> str:
        return f"[{self.start:#x}, {self.end:#x})"
