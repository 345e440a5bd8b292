"""Filling pages from an async source: gVisor's ``ReaderFunc`` for asyncio.

A source is an ``aiofiles`` binary file (or anything with an async ``readinto``),
something with an async ``read(n)`` (``asyncio.StreamReader``, an aiofiles file
opened without ``readinto``), or an async callable ``f(n) -> bytes``. Bytes go
straight into the mapped pages where the source can ``readinto``; otherwise each
chunk read is copied in once.

The pages are reached through a :class:`FillTarget` (a
:class:`~asyncpgalloc.host.LentMapping` of the allocation): a ``readinto`` may pass
the view it is lent to a thread that goes on writing after the fill was cancelled,
and the target is what can tell when nothing can write the pages any more.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "AsyncByteSource",
    "AsyncReadIntoable",
    "AsyncReadable",
    "FillTarget",
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


class FillTarget(Protocol):
    """The pages being filled (:class:`~asyncpgalloc.host.LentMapping` is one)."""

    @property
    def length(self) -> int: ...
    def view(self, offset: int, length: int, /) -> memoryview: ...
    def release(self, view: memoryview, /) -> None: ...
    def write(self, offset: int, data: bytes | bytearray | memoryview, /) -> None: ...


Filler = Callable[[FillTarget, Progress], Awaitable[None]]


def filler_for(source: AsyncByteSource) -> Filler:
    """How to fill pages from ``source``; raises TypeError (before any allocation) if it
    is none of the supported kinds, or a synchronous file object (an ``io`` file, or
    one whose ``read``/``readinto`` is a builtin: awaiting what they return fails)."""
    readinto = getattr(source, "readinto", None)
    if readinto is not None and inspect.iscoroutinefunction(readinto):
        return lambda target, progress: _fill_by_readinto(readinto, target, progress)
    if isinstance(source, io.IOBase) or any(
        inspect.isbuiltin(getattr(source, name, None)) for name in ("read", "readinto")
    ):
        raise TypeError(
            f"allocate_from: {type(source).__name__} is a synchronous file object; "
            "pass an aiofiles file (aiofiles.open(...)) or another async source"
        )
    if isinstance(source, AsyncReadable):
        return lambda target, progress: _fill_by_read(source.read, target, progress)
    if callable(source):
        return lambda target, progress: _fill_by_read(source, target, progress)
    raise TypeError(
        f"allocate_from: {type(source).__name__} has no async readinto() or read() "
        "and is not an async callable"
    )


async def _fill_by_readinto(
    readinto: Callable[[memoryview], Awaitable[int | None]],
    target: FillTarget,
    progress: Progress,
) -> None:
    """Fill ``target`` in order until full or EOF (an empty read), counting in ``progress``.

    Each view lent to ``readinto`` is released once it returns; one still in use by a
    thread (the await was cancelled) stays with the target, which retries.
    """
    off = 0
    length = target.length
    while off < length:
        view = target.view(off, min(READ_CHUNK, length - off))
        try:
            n = await readinto(view)
        finally:
            target.release(view)
        if not n:
            return
        off += n
        progress.filled += n


async def _fill_by_read(
    read: Callable[[int], Awaitable[bytes]], target: FillTarget, progress: Progress
) -> None:
    """As :func:`_fill_by_readinto`, copying each chunk read into the pages once (on the
    loop: the source never sees the pages)."""
    off = 0
    length = target.length
    while off < length:
        data = await read(min(READ_CHUNK, length - off))
        if not data:
            return
        if len(data) > length - off:
            raise ValueError(
                f"allocate_from: the source returned {len(data)} bytes, more than asked"
            )
        target.write(off, data)
        off += len(data)
        progress.filled += len(data)
