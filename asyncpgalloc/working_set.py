"""The working-set order of a MemoryFile: which ranges guests touched first.

After a restore, guests fault in their memory (:class:`~asyncpgalloc.uffd_server.
FaultServer`); each fault's file offset is reported to the file
(:meth:`~asyncpgalloc.MemoryFile.record_fault`), which keeps here, once per
``WORKING_SET_GRANULE`` (1 MiB, the loader's block size) and in first-touch order, the
ranges touched, at most ``WORKING_SET_MAX_ENTRIES`` (65536) of them: faults in the
rest of a larger working set are not recorded (counted in ``dropped``). ``save`` writes the order
into the checkpoint (``FLAG_WORKING_SET``); a restore with ``async_pages=True`` reads
those blocks first, then the rest in file order.

Faults only show the ranges a guest touched before the loader got there: once the load
is done, the fault server refreshes the order from the guest's page table
(:func:`touched_granules`, ``/proc/PID/pagemap``: the pages the guest has mapped, which
it touched) and appends, in file order, the ranges it touched that never faulted. The
kernel's fault-around maps up to 15 pages of the page cache around a touch, so pages
mapped only within 15 pages of a range's edges do not count (they may be a neighbour's
touch): a range the guest touched only there is recorded only if it faulted.

A restored file starts from the order it was loaded with (``inherit``): ranges that
order prefetched are loaded before the guest touches them, so they no longer fault and
would otherwise drop out of the next checkpoint's order. New first touches come after
them. The counters say how well the order did: a fault on a block the loader had
already started or loaded (prefetched, or loaded in file order) is a hit; a fault on a
block still waiting in the queue is a miss; a fault on a page the checkpoint holds no
data for (a hole or a zero page) is neither.

Every call is O(1) (a dict and a list), on the loop; nothing blocks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from .checkpoint_format import WORKING_SET_GRANULE, WORKING_SET_MAX_ENTRIES
from .ranges import PAGE_SIZE

__all__ = ["WorkingSet", "WorkingSetStats", "touched_granules"]

#: Pages at each edge of a range that fault-around may have mapped for a neighbour's
#: touch (``fault_around_bytes`` is 64 KiB: 16 pages, the touched one included).
FAULT_AROUND_EDGE = 15
#: pagemap entries read at once: 2 MiB, the entries of 1 GiB of address space.
_PAGEMAP_READ = 1 << 21
# The present bit (63) is bit 7 of each little-endian entry's last byte.
_PRESENT = bytes(0x01 if b & 0x80 else 0x00 for b in range(256))


def touched_granules(pid: int, base: int, length: int, offset: int) -> list[int]:
    """The file offsets (granule-aligned, ascending) of the ranges of which process
    ``pid`` has a page mapped in ``[base, base + length)``, a mapping of the file from
    ``offset``, other than the FAULT_AROUND_EDGE pages at either edge: the ranges it
    touched. **Blocking**: reads 8 bytes of ``/proc/PID/pagemap`` per page (2 MiB per
    GiB mapped, ~2 ms per GiB here). Raises ``OSError`` if the process is gone (or not
    ours to read)."""
    per = WORKING_SET_GRANULE // PAGE_SIZE
    if base % PAGE_SIZE or offset % WORKING_SET_GRANULE or length % WORKING_SET_GRANULE:
        raise ValueError(f"unaligned mapping [{base:#x}, +{length:#x}) at {offset:#x}")
    found: list[int] = []
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        pos = base // PAGE_SIZE * 8
        done = 0
        while done < length:
            n = min(_PAGEMAP_READ, (length - done) // PAGE_SIZE * 8)
            raw = os.pread(f.fileno(), n, pos)
            if len(raw) != n:
                raise OSError(f"short read of /proc/{pid}/pagemap")
            present = raw[7::8].translate(_PRESENT)
            edge = FAULT_AROUND_EDGE
            for i in range(0, len(present), per):
                if 1 in present[i + edge : i + per - edge]:
                    found.append(offset + done + i * PAGE_SIZE)
            pos += n
            done += n // 8 * PAGE_SIZE
    return found


@dataclass(frozen=True, slots=True)
class WorkingSetStats:
    """The working-set order's figures (see :class:`WorkingSet`): ``entries`` in the
    order now (what ``save`` writes), ``inherited`` of them from the checkpoint loaded,
    ``dropped`` faults in ranges not recorded (the order was full), ``hits``/``misses``
    faults on blocks already prefetched or loaded / still queued."""

    entries: int
    inherited: int
    dropped: int
    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses); 0.0 before any such fault."""
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


class WorkingSet:
    """One file's working-set order and its counters. ``limit`` caps the entries."""

    def __init__(self, limit: int = WORKING_SET_MAX_ENTRIES) -> None:
        self._limit = limit
        self._seen: dict[int, None] = {}  # granule offset -> None, in first-touch order
        self._inherited = 0
        self._dropped = 0
        self._hits = 0
        self._misses = 0

    def inherit(self, offsets: Iterable[int]) -> None:
        """Start from a loaded checkpoint's order (before any touch is recorded). O(n)."""
        for off in offsets:
            self._add(off - off % WORKING_SET_GRANULE)
        self._inherited = len(self._seen)

    def record(self, offset: int, prefetched: bool | None) -> bool:
        """A fault at file ``offset``: count it (``prefetched``: its block was already
        started or loaded, None if the checkpoint holds no data there) and record its
        range if it is the first touch there. True if the range was new. O(1)."""
        if prefetched is not None:
            if prefetched:
                self._hits += 1
            else:
                self._misses += 1
        return self._add(offset - offset % WORKING_SET_GRANULE)

    def record_touched(self, offsets: Iterable[int]) -> int:
        """Ranges touched without a fault (see :func:`touched_granules`): append the new
        ones, in the given order; neither hits nor misses. The number appended."""
        return sum(self._add(off - off % WORKING_SET_GRANULE) for off in offsets)

    def _add(self, granule: int) -> bool:
        if granule in self._seen:
            return False
        if len(self._seen) >= self._limit:
            self._dropped += 1
            return False
        self._seen[granule] = None
        return True

    def order(self) -> tuple[int, ...]:
        """The recorded ranges' offsets, first touched first. O(entries)."""
        return tuple(self._seen)

    def stats(self) -> WorkingSetStats:
        """The figures (see :class:`WorkingSetStats`). O(1)."""
        return WorkingSetStats(
            len(self._seen), self._inherited, self._dropped, self._hits, self._misses
        )
