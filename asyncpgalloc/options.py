"""Options and the small enums of the public API."""

from __future__ import annotations

import concurrent.futures
import enum
from dataclasses import dataclass

from .accounting import MemoryAccounting, MemoryKind

__all__ = [
    "AccessType",
    "AllocOpts",
    "AllocationMode",
    "DelayedEviction",
    "Direction",
    "MemoryFileOpts",
]


class AllocationMode(enum.Enum):
    """How committed the pages returned by an allocation must be (the seed's AllocationMode)."""

    #: The pages must be uncommitted; waste is never recycled.
    UNCOMMITTED = 0
    #: The caller will commit every page without using our mappings; pages may be committed.
    CALLER_INDIRECT_COMMIT = 1
    #: The pages must be committed (``fallocate`` before returning).
    COMMIT = 2
    #: The caller will write every page through ``map_internal``; prefault writable PTEs.
    WRITE_POPULATE = 3


class Direction(enum.Enum):
    """Which end of the file an allocation is taken from."""

    BOTTOM_UP = 0
    TOP_DOWN = 1


class AccessType(enum.Flag):
    """Access wanted from ``map_internal``; EXECUTE is always refused."""

    READ = enum.auto()
    WRITE = enum.auto()
    EXECUTE = enum.auto()


class DelayedEviction(enum.Enum):
    """How long evictable memory may be kept (the seed's DelayedEvictionType)."""

    DEFAULT = 0
    DISABLED = 1
    ENABLED = 2
    MANUAL = 3


@dataclass(frozen=True, slots=True)
class AllocOpts:
    """Options of one allocation.

    ``kind`` and ``memcg_id`` say whom its committed bytes are accounted to; ``huge``
    asks for a huge-page-backed range (only honoured when the file expects huge
    pages; the length must then be a multiple of 2 MiB).
    """

    kind: MemoryKind = MemoryKind.ANONYMOUS
    memcg_id: int = 0
    mode: AllocationMode = AllocationMode.UNCOMMITTED
    huge: bool = False
    direction: Direction = Direction.BOTTOM_UP


@dataclass(frozen=True, slots=True)
class MemoryFileOpts:
    """Options of a :class:`~asyncpgalloc.MemoryFile` (the seed's MemoryFileOpts, plus a few).

    Fields beyond the seed's:

    * ``disk_backed_file`` (as in the seed): the backing file passed to
      ``MemoryFile.open`` lives on a disk filesystem, not in memory.
    * ``accounting``: the :class:`MemoryAccounting` to report into (default: a new one).
    * ``executor``: where blocking syscalls run (default: a one-thread executor the
      file owns and shuts down on ``aclose()``).
    * ``max_chunks``: the most 1 GiB chunks the file may grow to; an allocation that
      needs more raises :class:`~asyncpgalloc.OutOfMemoryError`. ``None``: as large as
      ``off_t`` allows.
    * ``memcg_path`` / ``memcg_pressure_level``: with ``use_host_memcg_pressure``, the
      memory cgroup directory to watch (v1: under the memory hierarchy's mount, e.g.
      ``/sys/fs/cgroup/memory/<group>``; v2: ``<cgroup2 mount>/<group>``; ``None``: this
      process's own) and the pressure level that starts evictions (``"low"``,
      ``"medium"`` or ``"critical"``).
    * ``usage_refresh_interval``: if set, a task refreshes usage (``update_usage``)
      every that many seconds, so accounting stays fresh without polling.
    * ``close_timeout``: how long ``aclose()`` waits for cancelled eviction tasks.
    """

    delayed_eviction: DelayedEviction = DelayedEviction.DEFAULT
    use_host_memcg_pressure: bool = False
    memcg_path: str | None = None
    decommit_on_destroy: bool = False
    disable_ima_workaround: bool = False
    disk_backed_file: bool = False
    expect_hugepages: bool = False
    advise_hugepage: bool = False
    advise_no_hugepage: bool = False
    disable_memory_accounting: bool = False
    accounting: MemoryAccounting | None = None
    executor: concurrent.futures.Executor | None = None
    max_chunks: int | None = None
    memcg_pressure_level: str = "low"
    usage_refresh_interval: float | None = None
    close_timeout: float = 5.0
