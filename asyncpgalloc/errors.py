"""The exceptions asyncpgalloc raises.

Every error is an :class:`AllocatorError`. Bad arguments are also ``ValueError``
(as asyncpg's ``DataError`` is both its own and the standard error), so callers
may catch whichever they think in. Where gVisor panics, these are raised
before any state changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .ranges import FileRange

__all__ = [
    "AllocatorError",
    "CheckpointError",
    "ClosedError",
    "ExecutorDroppedError",
    "ForkedError",
    "InvalidLengthError",
    "InvalidOptionError",
    "InvalidRangeError",
    "InvariantError",
    "OptionTypeError",
    "OutOfMemoryError",
    "PagesNotLoadedError",
    "PartialFillError",
    "PoisonedError",
    "RangeTypeError",
    "ReferenceCountError",
    "UnsealableFileError",
    "WrongLoopError",
    "WrongThreadError",
    "check_int_bounds",
]


class AllocatorError(Exception):
    """Base class of every error raised by asyncpgalloc."""


class InvalidLengthError(AllocatorError, ValueError):
    """An allocation length is zero, not page-aligned, or (huge) not huge-aligned."""


class InvalidRangeError(AllocatorError, ValueError):
    """A file range is empty, unaligned, malformed or reaches beyond the file."""


class RangeTypeError(InvalidRangeError, TypeError):
    """A file range's bounds are not ``int`` (a float, ``None``, ...): also a ``TypeError``."""


class InvalidOptionError(AllocatorError, ValueError):
    """An :class:`~asyncpgalloc.AllocOpts` or :class:`~asyncpgalloc.MemoryFileOpts` field
    (or a combination of them) has a value the option does not accept. Raised when the
    options object is constructed, so nothing else has happened yet."""


class OptionTypeError(InvalidOptionError, TypeError):
    """An option (or the options argument itself) has the wrong type, e.g. the string
    ``"commit"`` for an :class:`~asyncpgalloc.AllocationMode`: also a ``TypeError``."""


class ReferenceCountError(AllocatorError):
    """A reference operation names pages that hold no references (not allocated)."""


class OutOfMemoryError(AllocatorError, MemoryError):
    """The file cannot grow any further to satisfy an allocation."""


class ClosedError(AllocatorError):
    """The MemoryFile has been closed (``aclose()``); no call is valid any more."""


class WrongThreadError(AllocatorError, RuntimeError):
    """A MemoryFile was called from a thread other than its event loop's."""


class WrongLoopError(AllocatorError, RuntimeError):
    """A MemoryFile was called from an event loop other than the one that opened it
    (in the same thread: a second ``asyncio.run``, say). Once the opening loop is
    closed, ``aclose()`` still works from anywhere in that thread."""


class ForkedError(AllocatorError, RuntimeError):
    """A MemoryFile was used in a child process forked after it was opened.

    The child shares the parent's file (the same open file description): any
    allocation, release or write there would corrupt the parent's memory. In the
    child only ``aclose()`` works, and it closes just the child's own copies of the
    descriptor and mappings.
    """


class PoisonedError(AllocatorError, RuntimeError):
    """A state transition of the MemoryFile was interrupted part-way (a
    ``KeyboardInterrupt`` or ``SystemExit`` raised inside it, or an internal
    invariant failing), so its page sets can no longer be trusted. Every later call
    raises this; ``aclose()`` still gives everything back to the host."""


class ExecutorDroppedError(AllocatorError, RuntimeError):
    """The executor cancelled work of this file before running it (it was shut down
    with ``cancel_futures=True``). The operation that needed the work failed; its
    pages went back as if a syscall had failed."""


class PartialFillError(AllocatorError):
    """``allocate_from``'s source failed part-way; ``filled`` is the range kept (owned by
    the caller, possibly empty) and ``__cause__`` the source's error."""

    def __init__(self, message: str, filled: FileRange) -> None:
        super().__init__(message)
        self.filled = filled


class CheckpointError(AllocatorError):
    """A checkpoint cannot be saved (e.g. evictions are pending) or loaded: it is truncated,
    corrupt (a checksum does not match), of another format version or page geometry, or its
    metadata is inconsistent. Nothing is left allocated or mapped when ``load`` raises it."""


class UnsealableFileError(AllocatorError):
    """:meth:`~asyncpgalloc.MemoryFile.guest_fd` cannot seal the backing file against
    shrinking (a disk-backed file, a tmpfs file, or a memfd made without
    ``MFD_ALLOW_SEALING``), so handing it to another process would let that process
    truncate it under the file's mappings. Nothing was sealed or duplicated."""


class InvariantError(AllocatorError):
    """An internal invariant is violated: a bug in asyncpgalloc, not in the caller."""


class PagesNotLoadedError(AllocatorError):
    """Pages of a file loaded with ``async_pages=True`` are not loaded yet: await
    :meth:`~asyncpgalloc.MemoryFile.wait_loaded` first. ``range`` is the first such
    range of pages."""

    def __init__(self, message: str, fr: FileRange) -> None:
        super().__init__(message)
        self.range = fr


def check_int_bounds(op: str, start: object, end: object) -> None:
    """Raise :class:`~asyncpgalloc.RangeTypeError` unless both bounds are ``int``
    (not ``bool``). O(1); for the slow paths: the hot paths test ``type(x) is int``
    inline and come here only when that fails."""
    if type(start) is not int or type(end) is not int:
        raise RangeTypeError(
            f"{op}: a range's start and end must be ints (byte offsets), got "
            f"({type(start).__name__} {start!r}, {type(end).__name__} {end!r})"
        )
