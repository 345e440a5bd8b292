"""Checking a checkpoint's metadata against every invariant, and building the page sets.

A malicious checkpoint may carry valid CRCs: :func:`build_state` therefore checks every
bound and every relation between the page sets a MemoryFile needs before anything is
created or mapped. Pure computation, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

from .accounting import MemoryKind
from .checkpoint_format import (
    KIND_MASK,
    KINDS,
    KNOWN_BIT,
    Header,
    Snapshot,
    committed_extents,
    merged,
)
from .core import MemAcct, SegmentSet, new_mem_acct_set, new_unfree_set
from .errors import CheckpointError
from .ranges import CHUNK_SIZE, HUGE_PAGE_SIZE, KEY_MAX, PAGE_SIZE, PAGES_PER_HUGE_PAGE

__all__ = ["LoadedState", "build_state"]

_MAX_COMMIT_SEQ = 2**63


@dataclass(slots=True)
class LoadedState:
    """A checkpoint's bookkeeping, checked and built into the sets a MemoryFile holds."""

    chunk_huge: bytes
    unfree_small: SegmentSet[int]
    unfree_huge: SegmentSet[int]
    mem_acct: SegmentSet[MemAcct]
    subreleased: dict[int, int]
    commit_seq: int
    known_committed_bytes: int
    #: (kind, memcg_id, bytes) of every known-committed segment, for MemoryAccounting.
    committed: list[tuple[MemoryKind, int, int]]
    extents: list[tuple[int, int]]


def _bad(what: str) -> CheckpointError:
    return CheckpointError(f"inconsistent checkpoint metadata: {what}")


def _check_ranges(name: str, ranges: Sequence[tuple[int, ...]], size: int) -> None:
    """Sorted, disjoint, non-empty, page-aligned, inside ``[0, size)``."""
    prev = 0
    for r in ranges:
        s, e = r[0], r[1]
        if not prev <= s < e <= size or (s | e) % PAGE_SIZE:
            raise _bad(f"{name} segment [{s:#x}, {e:#x}) is unaligned, unordered or out of file")
        prev = e


def _build_unfree(entries: list[tuple[int, int, int]], size: int) -> SegmentSet[int]:
    # The same kind of set the file keeps, so that its fast paths apply at once.
    out = new_unfree_set()
    for s, e, refs in entries:
        out.insert_range(s, e, refs)
    if size < KEY_MAX:
        # Beyond the file every page is void: non-free with no references.
        out.insert_range(size, KEY_MAX, 0)
    return out


def build_state(header: Header, snap: Snapshot) -> LoadedState:
    """Check every relation a MemoryFile's invariants need, and build its sets.

    Pure computation, O(segments log segments + chunks): run it off the loop. Raises
    :class:`CheckpointError` if the metadata could not have come from a MemoryFile
    with no waste (a checkpoint never holds waste: ``save`` records it as released).
    """
    size = snap.file_size
    for name, lst in zip(
        ("unwaste_small", "unwaste_huge", "unfree_small", "unfree_huge", "mem_acct"),
        snap.segment_lists(),
        strict=False,
    ):
        _check_ranges(name, lst, size)
    full = [(0, size)] if size else []
    if snap.unwaste_small != full or snap.unwaste_huge != full:
        raise _bad("the checkpoint holds waste pages")
    if snap.commit_seq >= _MAX_COMMIT_SEQ:
        # The file advances it by one per scan or decommit: 2**63 is never reached,
        # and a save of a file loaded near 2**64 would fail to encode it.
        raise _bad(f"commit sequence {snap.commit_seq} out of range")
    for _, _, refs in chain(snap.unfree_small, snap.unfree_huge):
        if refs >= 2**63:
            raise _bad(f"reference count {refs} out of range")

    unfree_small = _build_unfree(snap.unfree_small, size)
    unfree_huge = _build_unfree(snap.unfree_huge, size)
    used: list[tuple[int, int]] = []
    subrel: dict[int, int] = {}
    for i, huge in enumerate(snap.chunk_huge):
        lo, hi = i * CHUNK_SIZE, (i + 1) * CHUNK_SIZE
        own, other = (unfree_huge, unfree_small) if huge else (unfree_small, unfree_huge)
        if not other.is_fully_covered(lo, hi) or any(
            refs for _, _, refs in other.visit_range(lo, hi)
        ):
            raise _bad(f"chunk {i} has pages in the other page size's set")
        for s, e, refs in own.visit_range(lo, hi):
            if refs:
                used.append((s, e))
            elif not huge:
                raise _bad(f"unreferenced non-free pages [{s:#x}, {e:#x}) in a small chunk")
            else:
                # Sub-released pages: count them per huge page.
                while s < e:
                    hp = s - s % HUGE_PAGE_SIZE
                    stop = min(e, hp + HUGE_PAGE_SIZE)
                    subrel[hp] = subrel.get(hp, 0) + (stop - s) // PAGE_SIZE
                    s = stop
    if dict(snap.subreleased) != subrel or len(snap.subreleased) != len(subrel):
        raise _bad("sub-released counts do not match the unreferenced pages of huge chunks")
    if any(n >= PAGES_PER_HUGE_PAGE for n in subrel.values()):
        raise _bad("a wholly sub-released huge page is not free")

    if merged(iter(used)) != merged((s, e) for s, e, *_ in snap.mem_acct):
        raise _bad("accounting does not cover exactly the used pages")
    mem_acct = new_mem_acct_set()
    committed: list[tuple[MemoryKind, int, int]] = []
    known_bytes = 0
    for s, e, memcg, seq, info in snap.mem_acct:
        kind = info & KIND_MASK
        known = bool(info & KNOWN_BIT)
        if info & ~(KIND_MASK | KNOWN_BIT) or kind not in KINDS:
            raise _bad(f"bad accounting state {info:#x} at {s:#x}")
        if (seq != 0) if known else (seq > snap.commit_seq):
            raise _bad(f"bad commit sequence {seq} at {s:#x}")
        mk = MemoryKind(kind)
        mem_acct.insert_range(s, e, MemAcct(mk, memcg, known, False, seq))
        if known:
            committed.append((mk, memcg, e - s))
            known_bytes += e - s
    if known_bytes != snap.known_committed_bytes or known_bytes != header.data_length:
        raise _bad(
            f"known-committed pages span {known_bytes} bytes; metadata says "
            f"{snap.known_committed_bytes}, data holds {header.data_length}"
        )
    return LoadedState(
        chunk_huge=snap.chunk_huge,
        unfree_small=unfree_small,
        unfree_huge=unfree_huge,
        mem_acct=mem_acct,
        subreleased=subrel,
        commit_seq=snap.commit_seq,
        known_committed_bytes=known_bytes,
        committed=committed,
        extents=committed_extents(snap.mem_acct),
    )
