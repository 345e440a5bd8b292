"""asyncpgalloc: gVisor's page allocator (pgalloc.MemoryFile) as an asyncio-native library."""

from __future__ import annotations

from .accounting import MemoryAccounting as MemoryAccounting
from .accounting import MemoryKind as MemoryKind
from .core import core_implementation as core_implementation
from .errors import AllocatorError as AllocatorError
from .errors import CheckpointError as CheckpointError
from .errors import ClosedError as ClosedError
from .errors import ExecutorDroppedError as ExecutorDroppedError
from .errors import ForkedError as ForkedError
from .errors import InvalidLengthError as InvalidLengthError
from .errors import InvalidOptionError as InvalidOptionError
from .errors import InvalidRangeError as InvalidRangeError
from .errors import InvariantError as InvariantError
from .errors import OptionTypeError as OptionTypeError
from .errors import OutOfMemoryError as OutOfMemoryError
from .errors import PagesNotLoadedError as PagesNotLoadedError
from .errors import PartialFillError as PartialFillError
from .errors import PoisonedError as PoisonedError
from .errors import RangeTypeError as RangeTypeError
from .errors import ReferenceCountError as ReferenceCountError
from .errors import UnsealableFileError as UnsealableFileError
from .errors import WrongLoopError as WrongLoopError
from .errors import WrongThreadError as WrongThreadError
from .eviction import EvictableMemoryUser as EvictableMemoryUser
from .memory_file import MemoryFile as MemoryFile
from .options import AccessType as AccessType
from .options import AllocationMode as AllocationMode
from .options import AllocOpts as AllocOpts
from .options import DelayedEviction as DelayedEviction
from .options import Direction as Direction
from .options import MemoryFileOpts as MemoryFileOpts
from .pages_file import PagesFile as PagesFile
from .pressure import MemcgPressureWatcher as MemcgPressureWatcher
from .pressure import PressureWatcherError as PressureWatcherError
from .ranges import CHUNK_SIZE as CHUNK_SIZE
from .ranges import HUGE_PAGE_SIZE as HUGE_PAGE_SIZE
from .ranges import PAGE_SIZE as PAGE_SIZE
from .ranges import EvictableRange as EvictableRange
from .ranges import FileRange as FileRange
from .stats import LoadProgress as LoadProgress
from .stats import MemoryFileCounters as MemoryFileCounters
from .stats import MemoryFileStats as MemoryFileStats

__version__ = "0.1.0"

__all__ = (
    "CHUNK_SIZE",
    "HUGE_PAGE_SIZE",
    "PAGE_SIZE",
    "AccessType",
    "AllocOpts",
    "AllocationMode",
    "AllocatorError",
    "CheckpointError",
    "ClosedError",
    "DelayedEviction",
    "Direction",
    "EvictableMemoryUser",
    "EvictableRange",
    "ExecutorDroppedError",
    "FileRange",
    "ForkedError",
    "InvalidLengthError",
    "InvalidOptionError",
    "InvalidRangeError",
    "InvariantError",
    "LoadProgress",
    "MemcgPressureWatcher",
    "MemoryAccounting",
    "MemoryFile",
    "MemoryFileCounters",
    "MemoryFileOpts",
    "MemoryFileStats",
    "MemoryKind",
    "OptionTypeError",
    "OutOfMemoryError",
    "PagesFile",
    "PagesNotLoadedError",
    "PartialFillError",
    "PoisonedError",
    "PressureWatcherError",
    "RangeTypeError",
    "ReferenceCountError",
    "UnsealableFileError",
    "WrongLoopError",
    "WrongThreadError",
    "core_implementation",
)
