"""Filling pages from an async source: the seed's ``ReaderFunc`` for asyncio.

A source is an ``aiofiles`` binary file (or anything with an async ``readinto``),
something with an async ``read(n)`` (``asyncio.StreamReader``, an aiofiles file
opened without ``readinto``), or an async callable ``f(n) -> bytes``. Bytes go
straight into the mapped pages where the source can ``readinto``; otherwise each
chunk read is copied in once.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "AsyncByteSource",
    "AsyncReadIntoable",
    "AsyncReadable",
    "Filler",
    "Progress",
    "filler_for",
]

#: Largest single read from a source: bounds the copy of read()-style sources and
#: lets a StreamReader hand over what it has without waiting for more.
READ_CHUNK = 1 << 20


@runtime_checkable
class AsyncReadIntoable(Protocol):
    def readinto(self, b: Any, /) -> Awaitable[int | None]: ...


@runtime_checkable
class AsyncReadable(Protocol):
    def read(self, n: int = -1, /) -> Awaitable[bytes]: ...


AsyncByteSource = AsyncReadIntoable | AsyncReadable | Callable[[int], Awaitable[bytes]]


class Progress:
    """How many bytes have landed so far (readable after an exception)."""

    __slots__ = ("filled",)

    def __init__(self) -> None:
        self.filled = 0


Filler = Callable[[list[memoryview], Progress], Awaitable[None]]


def filler_for(source: AsyncByteSource) -> Filler:
    """How to fill pages from ``source``; raises TypeError (before any allocation) if it
    is none of the supported kinds."""
    readinto = getattr(source, "readinto", None)
    if readinto is not None and inspect.iscoroutinefunction(readinto):
        return lambda views, progress: _fill_by_readinto(readinto, views, progress)
    if isinstance(source, AsyncReadable):
        return lambda views, progress: _fill_by_read(source.read, views, progress)
    if callable(source):
        return lambda views, progress: _fill_by_read(source, views, progress)
    raise TypeError(
        f"allocate_from: {type(source).__name__} has no async readinto() or read() "
        "and is not an async callable"
    )


async def _fill_by_readinto(
    readinto: Callable[[memoryview], Awaitable[int | None]],
    views: list[memoryview],
    progress: Progress,
) -> None:
    """Fill ``views`` in order until full or EOF (an empty read), counting in ``progress``."""
    for view in views:
        off = 0
        while off < len(view):
            n = await readinto(view[off : off + READ_CHUNK])
            if not n:
                return
            off += n
            progress.filled += n


async def _fill_by_read(
    read: Callable[[int], Awaitable[bytes]], views: list[memoryview], progress: Progress
) -> None:
    """As :func:`_fill_by_readinto`, copying each chunk read into the pages once."""
    for view in views:
        off = 0
        while off < len(view):
            data = await read(min(READ_CHUNK, len(view) - off))
            if not data:
                return
            if len(data) > len(view) - off:
                raise ValueError(
                    f"allocate_from: the source returned {len(data)} bytes, more than asked"
                )
            view[off : off + len(data)] = data
            off += len(data)
            progress.filled += len(data)
