"""Options and the small enums of the public API."""

from __future__ import annotations

import concurrent.futures
import enum
from dataclasses import dataclass
from typing import Any

from .accounting import MemoryAccounting, MemoryKind
from .errors import InvalidOptionError, OptionTypeError
from .pressure import PRESSURE_LEVELS
from .ranges import MAX_CHUNKS

__all__ = [
    "AccessType",
    "AllocOpts",
    "AllocationMode",
    "DelayedEviction",
    "Direction",
    "MemoryFileOpts",
]


class AllocationMode(enum.Enum):
    """How committed the pages returned by an allocation must be (gVisor's AllocationMode)."""

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
    """How long evictable memory may be kept (gVisor's DelayedEvictionType)."""

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

    Checked once, here, so that the allocation paths need not: ``kind`` must be a
    :class:`MemoryKind` (a plain ``int`` that is one is converted), ``memcg_id`` an
    ``int`` in ``[0, 2**63)``, ``mode`` an :class:`AllocationMode`, ``huge`` a
    ``bool`` and ``direction`` a :class:`Direction`. A wrong type raises
    :class:`~asyncpgalloc.OptionTypeError`, a bad value
    :class:`~asyncpgalloc.InvalidOptionError` (both also the standard
    ``TypeError``/``ValueError``). O(1); reuse one ``AllocOpts`` on hot paths.
    """

    kind: MemoryKind = MemoryKind.ANONYMOUS
    memcg_id: int = 0
    mode: AllocationMode = AllocationMode.UNCOMMITTED
    huge: bool = False
    direction: Direction = Direction.BOTTOM_UP

    def __post_init__(self) -> None:
        kind = self.kind
        if type(kind) is not MemoryKind:
            if type(kind) is not int:
                raise OptionTypeError(
                    f"AllocOpts.kind must be a MemoryKind (e.g. MemoryKind.ANONYMOUS), got {kind!r}"
                )
            try:
                kind = MemoryKind(kind)
            except ValueError:
                raise InvalidOptionError(
                    f"AllocOpts.kind must be one of {_names(MemoryKind)}, got {kind!r}"
                ) from None
            # The allocator compares kinds by identity: keep the enum member.
            object.__setattr__(self, "kind", kind)
        _check_int("AllocOpts.memcg_id", self.memcg_id, 0, 2**63 - 1)
        _check_enum("AllocOpts.mode", self.mode, AllocationMode)
        _check_type("AllocOpts.huge", self.huge, bool)
        _check_enum("AllocOpts.direction", self.direction, Direction)


@dataclass(frozen=True, slots=True)
class MemoryFileOpts:
    """Options of a :class:`~asyncpgalloc.MemoryFile` (gVisor's MemoryFileOpts, plus a few).

    Fields beyond gVisor's:

    * ``disk_backed_file`` (as in gVisor): the backing file passed to
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

    Checked once, here: each field's type (a wrong one raises
    :class:`~asyncpgalloc.OptionTypeError`) and value (``max_chunks`` in
    ``[0, MAX_CHUNKS]``, ``usage_refresh_interval > 0``, ``close_timeout >= 0``,
    ``memcg_pressure_level`` one of ``"low"``, ``"medium"``, ``"critical"`` whether
    or not pressure is used, ``advise_hugepage`` only with ``expect_hugepages``: else
    :class:`~asyncpgalloc.InvalidOptionError`). ``advise_hugepage`` and
    ``advise_no_hugepage`` together are valid, as in gVisor: the first applies to
    huge-page chunks, the second to small-page ones.
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

    def __post_init__(self) -> None:
        _check_enum("MemoryFileOpts.delayed_eviction", self.delayed_eviction, DelayedEviction)
        for name in _BOOL_FIELDS:
            _check_type(f"MemoryFileOpts.{name}", getattr(self, name), bool)
        if self.memcg_path is not None:
            _check_type("MemoryFileOpts.memcg_path", self.memcg_path, str)
        if self.accounting is not None:
            _check_type("MemoryFileOpts.accounting", self.accounting, MemoryAccounting)
        if self.executor is not None:
            _check_type("MemoryFileOpts.executor", self.executor, concurrent.futures.Executor)
        if self.max_chunks is not None:
            _check_int("MemoryFileOpts.max_chunks", self.max_chunks, 0, MAX_CHUNKS)
        if self.memcg_pressure_level not in PRESSURE_LEVELS:
            raise InvalidOptionError(
                f"MemoryFileOpts.memcg_pressure_level must be one of {PRESSURE_LEVELS}, "
                f"got {self.memcg_pressure_level!r}"
            )
        interval = self.usage_refresh_interval
        if interval is not None and not _number("usage_refresh_interval", interval) > 0:
            raise InvalidOptionError(
                f"MemoryFileOpts.usage_refresh_interval must be > 0 seconds or None, "
                f"got {interval!r}"
            )
        if not _number("close_timeout", self.close_timeout) >= 0:
            raise InvalidOptionError(
                f"MemoryFileOpts.close_timeout must be >= 0 seconds, got {self.close_timeout!r}"
            )
        if self.advise_hugepage and not self.expect_hugepages:
            raise InvalidOptionError(
                "MemoryFileOpts.advise_hugepage applies to huge-page chunks, which exist "
                "only with expect_hugepages=True"
            )


_BOOL_FIELDS = (
    "use_host_memcg_pressure",
    "decommit_on_destroy",
    "disable_ima_workaround",
    "disk_backed_file",
    "expect_hugepages",
    "advise_hugepage",
    "advise_no_hugepage",
    "disable_memory_accounting",
)


def _names(enum_type: type[enum.Enum]) -> str:
    return ", ".join(f"{enum_type.__name__}.{m.name}" for m in enum_type)


def _check_type(name: str, value: Any, expected: type) -> None:
    if not isinstance(value, expected):
        raise OptionTypeError(
            f"{name} must be a {expected.__name__}, got {type(value).__name__} {value!r}"
        )


def _check_enum(name: str, value: Any, enum_type: type[enum.Enum]) -> None:
    if type(value) is not enum_type:
        raise OptionTypeError(f"{name} must be one of {_names(enum_type)}, got {value!r}")


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    # bool is an int subclass, but True is no memcg id or chunk count.
    if type(value) is not int:
        raise OptionTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        raise InvalidOptionError(f"{name} must be in [{lo}, {hi}], got {value}")


def _number(name: str, value: Any) -> float:
    if type(value) not in (int, float):
        raise OptionTypeError(
            f"MemoryFileOpts.{name} must be a number of seconds, got {type(value).__name__} "
            f"{value!r}"
        )
    return float(value)


def check_file_opts(opts: Any) -> MemoryFileOpts:
    """``opts`` if it is a :class:`MemoryFileOpts`; else :class:`OptionTypeError`."""
    if not isinstance(opts, MemoryFileOpts):
        raise OptionTypeError(
            f"opts must be a MemoryFileOpts (e.g. MemoryFileOpts(max_chunks=4)), got "
            f"{type(opts).__name__} {opts!r}"
        )
    return opts
