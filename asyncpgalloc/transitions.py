"""Transitions cut short: a MemoryFile whose state change did not finish refuses to go on.

Every state transition is plain synchronous Python, so nothing on the loop can see it
half done, but an exception raised *inside* one can still split it: a
``KeyboardInterrupt`` from Python's default SIGINT handler, a ``SystemExit`` raised by
a SIGTERM handler, or an :class:`~asyncpgalloc.InvariantError` (a bug). Python
delivers a signal between any two bytecodes, so the page sets may then be left out of
step with each other. A pure-Python core cannot make its transitions atomic; what it
can do is notice and refuse: the guards here wrap each public entry point that
changes state, and a splitting exception passing through one *poisons* the file,
after which every call raises :class:`~asyncpgalloc.PoisonedError` (``aclose()``
still gives everything back to the host). Errors that the library raises before it
changes anything (bad arguments, ``OSError`` from a syscall, whose callers undo their
step) pass through untouched, and so does cancellation, which can only arrive at an
``await``, between transitions.

Cost: a ``try`` is free in CPython 3.11 until something raises; a guard is one extra
Python call with ``*args`` (about 150 ns), so the hottest entry points (``allocate``,
``inc_ref``, ``dec_ref``) carry the same ``try`` in their own bodies instead, calling
:func:`splits_state` the same way.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from .errors import InvariantError

__all__ = ["guarded", "guarded_async", "splits_state"]

P = ParamSpec("P")
R = TypeVar("R")


class Poisonable(Protocol):
    def _poison(self, cause: BaseException) -> None: ...


S = TypeVar("S", bound=Poisonable)


def splits_state(e: BaseException) -> bool:
    """True if ``e`` escaping a transition may have left it half done."""
    if isinstance(e, InvariantError):
        return True
    return not isinstance(e, (Exception, asyncio.CancelledError, GeneratorExit))


def guarded(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    """Poison ``self`` if a splitting exception escapes the synchronous ``method``."""

    @functools.wraps(method)
    def guard(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except BaseException as e:
            if splits_state(e):
                self._poison(e)
            raise

    return guard


def guarded_async(
    method: Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
    """As :func:`guarded` for a coroutine method: its synchronous steps between awaits
    are transitions too. The guarded method still returns a coroutine (typed so:
    ``asyncio.run`` and ``create_task`` take it)."""

    @functools.wraps(method)
    async def guard(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(self, *args, **kwargs)
        except BaseException as e:
            if splits_state(e):
                self._poison(e)
            raise

    return guard
