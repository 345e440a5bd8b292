"""The zero-page promise as an invariant: ``check_invariants(check_zero_pages=True)``.

Free pages and sub-released pages must read zero; waste and releasing pages may hold
their old bytes until they are recycled (zeroed) or released (punched). The checker
reads with ``pread``, which commits nothing, so checking does not change what it
checks.
"""

from __future__ import annotations

import os

import pytest

from asyncpgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    AccessType,
    AllocOpts,
    FileRange,
    InvariantError,
    MemoryFile,
)
from asyncpgalloc.host import file_usage

P = PAGE_SIZE
H = HUGE_PAGE_SIZE


async def test_a_free_page_written_behind_the_allocators_back_is_caught(mf: MemoryFile) -> None:
    used = mf.allocate(4 * P)
    for view in mf.map_internal(used, AccessType.WRITE):
        view[:] = b"u" * len(view)
    mf.check_invariants(check_zero_pages=True)
    # A free page right after the used ones: one data extent covers both.
    os.pwrite(mf.fd, b"\x01", used.end + 100)
    mf.check_invariants()  # the bookkeeping is fine ...
    with pytest.raises(InvariantError, match=f"page {used.end:#x} .*does not read zero"):
        mf.check_invariants(check_zero_pages=True)  # ... the promise is not
    os.pwrite(mf.fd, b"\x00", used.end + 100)
    mf.check_invariants(check_zero_pages=True)
    # Far away, in the middle of the chunk.
    os.pwrite(mf.fd, b"\xff" * 10, 512 * 1024 * 1024 - 5)
    with pytest.raises(InvariantError, match=f"page {512 * 1024 * 1024 - P:#x} "):
        mf.check_invariants(check_zero_pages=True)
    os.pwrite(mf.fd, bytes(10), 512 * 1024 * 1024 - 5)
    mf.dec_ref(used)


async def test_waste_may_hold_old_bytes_and_reads_commit_nothing(mf: MemoryFile) -> None:
    fr = mf.allocate(16 * P)
    for view in mf.map_internal(fr, AccessType.WRITE):
        view[:] = b"w" * len(view)
    mf.dec_ref(fr)
    # No await since: the pages are waste (or dead), their bytes still there.
    assert os.pread(mf.fd, 1, fr.start) == b"w"
    mf.check_invariants(check_zero_pages=True)
    await mf.wait_released()
    before = file_usage(mf.fd)
    mf.check_invariants(check_zero_pages=True)
    assert file_usage(mf.fd) == before == 0


async def test_a_sub_released_page_that_is_not_zero_is_caught(huge_mf: MemoryFile) -> None:
    mf = huge_mf
    fr = mf.allocate(2 * H, AllocOpts(huge=True))
    for view in mf.map_internal(fr, AccessType.WRITE):
        view[:] = b"h" * len(view)
    mf.dec_ref(FileRange(fr.start + 8 * P, fr.start + 9 * P))
    await mf.wait_released()
    assert mf.stats().subreleased_bytes == P
    mf.check_invariants(check_zero_pages=True)
    os.pwrite(mf.fd, b"\x02", fr.start + 8 * P + 7)
    with pytest.raises(InvariantError, match=f"page {fr.start + 8 * P:#x} "):
        mf.check_invariants(check_zero_pages=True)
    os.pwrite(mf.fd, b"\x00", fr.start + 8 * P + 7)
    mf.dec_ref(FileRange(fr.start, fr.start + 8 * P))
    mf.dec_ref(FileRange(fr.start + 9 * P, fr.end))
    await mf.wait_released()
    mf.check_invariants(check_zero_pages=True)
