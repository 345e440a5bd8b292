"""map_internal: views only of referenced pages, read-only unless WRITE is asked for
(issue 16 item 3)."""

from __future__ import annotations

import pytest
from helpers import is_zero, snapshot

from asyncpgalloc import (
    CHUNK_SIZE,
    PAGE_SIZE,
    AccessType,
    FileRange,
    MemoryFile,
    ReferenceCountError,
)

P = PAGE_SIZE


async def test_free_pages_are_never_mapped(mf: MemoryFile) -> None:
    """A writable view of a free page would reach the next allocation."""
    fr = mf.allocate(P)
    mf.dec_ref(fr)
    await mf.wait_released()
    before = snapshot(mf)
    for access in (AccessType.READ, AccessType.WRITE):
        with pytest.raises(ReferenceCountError, match="hold no reference"):
            mf.map_internal(fr, access)
    assert snapshot(mf) == before
    again = mf.allocate(P)
    assert again == fr and is_zero(mf, again)


async def test_waste_and_partly_referenced_ranges_are_refused(mf: MemoryFile) -> None:
    held = mf.allocate(4 * P)
    gone = mf.allocate(4 * P)
    mf.dec_ref(gone)  # waste until the releaser punches it
    with pytest.raises(ReferenceCountError):
        mf.map_internal(gone, AccessType.WRITE)
    # One byte into the next (unreferenced) page is enough to refuse the whole range.
    with pytest.raises(ReferenceCountError):
        mf.map_internal(FileRange(held.start + 10, held.end + 1), AccessType.WRITE)
    with pytest.raises(ReferenceCountError):
        mf.map_internal(FileRange(held.end, CHUNK_SIZE))
    # Unaligned ranges inside referenced pages are fine.
    (view,) = mf.map_internal(FileRange(held.start + 10, held.end - 10), AccessType.WRITE)
    assert len(view) == 4 * P - 20
    mf.dec_ref(held)


async def test_read_views_are_read_only(mf: MemoryFile) -> None:
    fr = mf.allocate(2 * P)
    (ro,) = mf.map_internal(fr)
    (ro2,) = mf.map_internal(fr, AccessType.READ)
    assert ro.readonly and ro2.readonly
    with pytest.raises(TypeError):
        ro[0] = 1
    with pytest.raises(TypeError):
        ro2[:4] = b"evil"
    (rw,) = mf.map_internal(fr, AccessType.READ | AccessType.WRITE)
    assert not rw.readonly
    rw[:4] = b"good"
    assert bytes(ro[:4]) == b"good"
    mf.dec_ref(fr)
