"""Memory accounting by kind and memory cgroup: gVisor's ``usage.MemoryAccounting``."""

from __future__ import annotations

import enum
from collections import defaultdict

__all__ = ["MemoryAccounting", "MemoryKind"]


class MemoryKind(enum.IntEnum):
    """What a range of memory is used for, as in gVisor's ``usage.MemoryKind``."""

    SYSTEM = 0
    ANONYMOUS = 1
    PAGE_CACHE = 2
    TMPFS = 3
    RAMDISKFS = 4
    MAPPED = 5


class MemoryAccounting:
    """Committed bytes by :class:`MemoryKind` and memory cgroup id.

    A :class:`~asyncpgalloc.MemoryFile` reports into one of these: its own, or one
    passed in ``MemoryFileOpts.accounting`` and shared by several files. Every call
    is O(1) and never blocks; it is not thread-safe (use it from the loop that owns
    the files reporting into it).
    """

    __slots__ = ("_by_memcg",)

    def __init__(self) -> None:
        # memcg id -> kind -> bytes; entries are dropped when they fall to zero so
        # that by_memcg() of a finished cgroup is empty again.
        self._by_memcg: defaultdict[int, dict[MemoryKind, int]] = defaultdict(dict)

    def inc(self, n: int, kind: MemoryKind, memcg_id: int = 0) -> None:
        """Account ``n`` more bytes of ``kind`` to ``memcg_id``."""
        kinds = self._by_memcg[memcg_id]
        kinds[kind] = kinds.get(kind, 0) + n

    def dec(self, n: int, kind: MemoryKind, memcg_id: int = 0) -> None:
        """Account ``n`` fewer bytes of ``kind`` to ``memcg_id``.

        Raises ``ValueError`` (and changes nothing) if that would go below zero.
        """
        kinds = self._by_memcg.get(memcg_id)
        have = kinds.get(kind, 0) if kinds is not None else 0
        if n > have:
            raise ValueError(
                f"accounting underflow: dec({n}, {kind.name}, memcg {memcg_id}) with {have} bytes"
            )
        assert kinds is not None
        if n == have:
            del kinds[kind]
            if not kinds:
                del self._by_memcg[memcg_id]
        else:
            kinds[kind] = have - n

    def move(self, n: int, to: MemoryKind, from_: MemoryKind, memcg_id: int = 0) -> None:
        """Move ``n`` bytes of ``memcg_id`` from kind ``from_`` to kind ``to``."""
        self.dec(n, from_, memcg_id)
        self.inc(n, to, memcg_id)

    def total(self) -> int:
        """All accounted bytes, over every kind and memcg. O(memcgs x kinds)."""
        return sum(sum(kinds.values()) for kinds in self._by_memcg.values())

    def by_kind(self) -> dict[MemoryKind, int]:
        """Bytes per kind summed over every memcg (kinds with no bytes are omitted)."""
        out: dict[MemoryKind, int] = {}
        for kinds in self._by_memcg.values():
            for kind, n in kinds.items():
                out[kind] = out.get(kind, 0) + n
        return out

    def by_memcg(self, memcg_id: int) -> dict[MemoryKind, int]:
        """Bytes per kind accounted to one memcg (a copy)."""
        return dict(self._by_memcg.get(memcg_id, {}))

    def memcg_ids(self) -> list[int]:
        """The memcg ids that currently have accounted bytes."""
        return sorted(self._by_memcg)

    def __repr__(self) -> str:
        parts = ", ".join(
            f"memcg {m}: " + " ".join(f"{k.name}={n}" for k, n in sorted(kinds.items()))
            for m, kinds in sorted(self._by_memcg.items())
        )
        return f"<MemoryAccounting {parts or 'empty'}>"
