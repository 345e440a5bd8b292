"""Pages lent to code the library does not control, held until nothing can write them.

``allocate_from`` lends views of a :class:`~asyncpgalloc.host.LentMapping` to a
source's ``readinto``. Cancelling the fill does not stop a thread that is inside that
``readinto`` (aiofiles runs it in one): it goes on writing the pages. So such pages go
back to the allocator only once the mapping could be unmapped, which proves that no
view or buffer on it is left. Until then one reference on the range belongs to a
:class:`Lent` of the file, and a small task of its own retries the unmap (there is no
notification when a buffer export ends), backing off from 1 ms to 20 ms.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from . import host
from .errors import ClosedError, InvariantError
from .ranges import FileRange

__all__ = ["Lent"]

_FIRST_POLL = 0.001
_MAX_POLL = 0.02


class Lent:
    """The ranges still lent out, each with its mapping; owned by one MemoryFile."""

    __slots__ = ("_dec_ref", "_idle", "_pending", "_task")

    def __init__(self, dec_ref: Callable[[FileRange], None]) -> None:
        self._dec_ref = dec_ref
        self._pending: list[tuple[host.LentMapping, FileRange]] = []
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self, mapping: host.LentMapping, fr: FileRange) -> None:
        """Hold the reference the caller gives up on ``fr`` until ``mapping`` unmaps, then
        ``dec_ref(fr)``. Synchronous; starts the retry task if none runs."""
        self._pending.append((mapping, fr))
        self._idle.clear()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._retry(), name="asyncpgalloc-lent-pages"
            )

    async def _retry(self) -> None:
        delay = _FIRST_POLL
        while self._pending:
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_POLL)
            still: list[tuple[host.LentMapping, FileRange]] = []
            for mapping, fr in self._pending:
                if mapping.try_unmap():
                    self._dec_ref(fr)
                else:
                    still.append((mapping, fr))
            self._pending = still
        self._idle.set()

    async def wait(self) -> None:
        """Wait until nothing is lent. Raises :class:`~asyncpgalloc.ClosedError` if the
        file closes meanwhile."""
        while not self._idle.is_set():
            task = self._task
            if task is not None:
                await asyncio.wait([task])
            if task is None or task.cancelled():
                raise ClosedError("the MemoryFile was closed while pages were lent out")
            if task.exception() is not None:
                raise InvariantError("the lent-pages task failed") from task.exception()

    def close(self) -> list[asyncio.Task[None]]:
        """Stop retrying (the file is closing); returns the task to await, if any.

        Mappings still in use stay mapped until their last view goes (they unmap when
        collected), so a thread never writes into unmapped memory; the pages are the
        host's again once the file and those mappings are gone. Synchronous.
        """
        task, self._task = self._task, None
        for mapping, _ in self._pending:
            mapping.try_unmap()
        if task is None or task.done() or task.get_loop().is_closed():
            return []
        task.cancel()
        return [task]
