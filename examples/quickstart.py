"""Allocate, write, share, free and watch the pages go back to the host.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import uvloop

from asyncpgalloc import (
    AccessType,
    AllocationMode,
    AllocOpts,
    FileRange,
    MemoryFile,
    MemoryKind,
)

MiB = 1 << 20


async def main() -> None:
    async with MemoryFile.open() as mf:  # a private memfd, mapped in 1 GiB chunks
        # The synchronous fast path: no await, no executor hop.
        heap = mf.allocate(4 * MiB, AllocOpts(kind=MemoryKind.ANONYMOUS, memcg_id=1))
        cache = mf.allocate(
            8 * MiB,
            AllocOpts(kind=MemoryKind.PAGE_CACHE, memcg_id=2, mode=AllocationMode.COMMIT),
        )
        print("allocated", heap, "and", cache)

        # Write through the file's own mapping (one memoryview per 1 GiB chunk).
        for view in mf.map_internal(heap, AccessType.WRITE):
            view[:5] = b"hello"
        print("usage after commit:", mf.total_usage() // MiB, "MiB")

        # References are per page: share the first page, then drop the allocation.
        first_page = FileRange(heap.start, heap.start + 4096)
        mf.inc_ref(first_page)
        mf.dec_ref(heap)
        mf.dec_ref(cache)
        print("before release:", mf.stats())

        # The releaser task punches the waste back to the host in the executor.
        await mf.wait_released()
        print("after release: ", mf.stats())
        print("usage after release:", mf.total_usage(), "bytes")

        mf.dec_ref(first_page)
        await mf.wait_released()
        mf.check_invariants()
        print("all pages returned:", mf.stats().used_bytes == 0)


if __name__ == "__main__":
    uvloop.run(main())
