"""The model test of test_stateful.py, extended with the awaiting operations.

A subclass of :class:`tests.test_stateful.MemoryFileMachine` (every rule and the
invariant of the base machine still run) that adds:

* ``decommit`` of referenced ranges: the pages read as zeros afterwards, and the model
  expects zeros there;
* ``update_usage`` (throttle reset): the accounting total equals
  ``known_committed_bytes``, and ``check_invariants`` checks it by kind and memcg;
* ``allocate_async`` in every mode (the same checks as ``allocate``: zero on allocate);
* evictable users: a user takes its own reference on an allocation, marks it evictable,
  and when asked to evict (``start_evictions``, or on its own: the file's delayed
  eviction is ENABLED, so eviction starts whenever the releaser runs out of work) it
  drops the references it still holds; the model drops them too.

Budget: CI (``CI=true``, derandomized) runs 20 sequences of up to 50 steps per loop.
``ASYNCPGALLOC_SOAK=1`` raises it to 500 sequences of up to 200 steps (and the base
machine's too, see below) for a long local or nightly run.
"""

from __future__ import annotations

import os

import test_stateful as base
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule
from test_stateful import MemoryFileMachine, P, _pages, directions, kinds, memcg_ids, modes

from asyncpgalloc import (
    AllocationMode,
    AllocOpts,
    Direction,
    EvictableRange,
    FileRange,
    MemoryKind,
    ReferenceCountError,
)

SOAK = os.environ.get("ASYNCPGALLOC_SOAK") == "1"


class ModelUser:
    """An evictable user holding one reference on ``fr`` (in the model too)."""

    def __init__(self, machine: ExtendedMachine, fr: FileRange) -> None:
        self.machine = machine
        self.fr: FileRange | None = fr
        self.evictions = 0

    async def evict(self, er: EvictableRange) -> None:
        self.evictions += 1
        fr = self.fr
        if fr is None:
            # Already given back; an eviction under way may still ask (as in gVisor).
            return
        s, e = fr.start + er.start, fr.start + er.end
        m = self.machine
        # Drop our reference wherever the model says one is still held (other rules
        # may have dropped the allocation's references meanwhile).
        for ps, pe, _ in list(m.refs.clipped(s // P, e // P)):
            m._ref_op("dec_ref", FileRange(ps * P, pe * P))
        event("evict: a user gave its range back")
        if er.start == 0 and er.end == fr.length:
            self.fr = None
        m.mf.mark_unevictable(self, er)


class ExtendedMachine(MemoryFileMachine):
    def __init__(self) -> None:
        super().__init__()
        self.users: list[ModelUser] = []

    # ---------------------------------------------------------------- decommit

    @precondition(lambda self: bool(self.refs.runs))
    @rule(data=st.data())
    def decommit(self, data: st.DataObject) -> None:
        fr = self._draw_referenced_range(data)
        self._events_for_range("decommit", fr)
        ps, pe = _pages(fr)
        try:
            self.runner.run(self.mf.decommit(fr))
        except ReferenceCountError:
            # An eviction task that ran first in this loop run dropped a user's
            # references (and the model's): the range is no longer wholly held, and
            # decommit refused before doing anything.
            assert not self.refs.covers(ps, pe), f"decommit({fr}) refused held pages"
            event("decommit: refused, an eviction dropped the references first")
            return
        # Contents are gone: zeros are what the pages must read now. Only where the
        # references are still held: an eviction during the await may have dropped some.
        for s, e, _ in list(self.refs.clipped(ps, pe)):
            self.content.assign(s, e, 0)
            self._check_bytes(s * P, e * P, 0, f"decommitted {fr}")

    # ------------------------------------------------------------- update_usage

    @rule()
    def update_usage(self) -> None:
        mf = self.mf
        mf._usage.next_scan = 0.0
        self.runner.run(mf.update_usage())
        assert mf.accounting.total() == mf.known_committed_bytes, (
            mf.accounting.total(),
            mf.known_committed_bytes,
        )
        if mf.known_committed_bytes:
            event("update_usage: some pages known committed")

    # ----------------------------------------------------------- allocate_async

    def _allocate_async(self, length: int, opts: AllocOpts) -> None:
        mf = self.mf
        sync = mf.allocate

        def via_async(n: int, o: AllocOpts = opts) -> FileRange:
            return self.runner.run(mf.allocate_async(n, o))

        mf.allocate = via_async  # type: ignore[method-assign,assignment]
        try:
            self._allocate(length, opts, large=False)
        finally:
            del mf.allocate
        assert mf.allocate == sync

    @rule(pages=st.integers(1, 256), mode=modes, direction=directions, kind=kinds, memcg=memcg_ids)
    def allocate_async(
        self,
        pages: int,
        mode: AllocationMode,
        direction: Direction,
        kind: MemoryKind,
        memcg: int,
    ) -> None:
        opts = AllocOpts(kind=kind, memcg_id=memcg, mode=mode, direction=direction)
        self._allocate_async(pages * P, opts)

    # ---------------------------------------------------------------- evictions

    @precondition(lambda self: bool(self._whole_allocs()))
    @rule(data=st.data())
    def mark_evictable(self, data: st.DataObject) -> None:
        fr = data.draw(st.sampled_from(self._whole_allocs()), label="allocation")
        self._ref_op("inc_ref", fr)
        user = ModelUser(self, fr)
        self.users.append(user)
        mf = self.mf

        async def mark() -> None:
            mf.mark_evictable(user, EvictableRange(0, fr.length))

        self.runner.run(mark())

    @precondition(lambda self: any(u.fr is not None for u in self.users))
    @rule(data=st.data())
    def mark_unevictable(self, data: st.DataObject) -> None:
        user = data.draw(st.sampled_from([u for u in self.users if u.fr is not None]))
        self.mf.mark_all_unevictable(user)
        # The user keeps its reference; it is now an ordinary holder of it.
        user.fr = None

    @rule()
    def start_evictions(self) -> None:
        mf = self.mf

        async def go() -> bool:
            # start_evictions creates tasks: it needs the running loop.
            started = mf.start_evictions()
            await mf.wait_for_evictions()
            return started

        started = self.runner.run(go())
        if started:
            event("start_evictions: some users evicted")
        for u in self.users:
            if u.fr is not None:
                # Still marked: only possible if it was not evictable at start time.
                assert not started or u.evictions == 0 or u.fr is None

    def wait_released(self) -> None:
        # Delayed eviction is ENABLED: once the releaser runs out of work it starts
        # evictions, and a user's evict() may drop its references in the very loop
        # turn in which wait_released() returns. Wait until the evictions are done
        # and what they freed is released too (each user gives back once).
        mf = self.mf

        async def settle() -> None:
            for _ in range(len(self.users) + 1):
                await mf.wait_released()
                await mf.wait_for_evictions()
                st_ = mf.stats()
                if not (st_.waste_bytes or st_.releasing_bytes):
                    return

        self.runner.run(settle())
        super().wait_released()

    wait_released = rule()(wait_released)

    def release_everything(self) -> None:
        # Users' references go with everything else: they must not drop them again.
        for u in self.users:
            self.mf.mark_all_unevictable(u)
            u.fr = None
        self.runner.run(self.mf.wait_for_evictions())
        super().release_everything()

    release_everything = precondition(lambda self: bool(self.refs.runs))(rule()(release_everything))


class ExtDefaultLoopMachine(ExtendedMachine):
    use_uvloop = False


class ExtUvloopMachine(ExtendedMachine):
    use_uvloop = True


SETTINGS = settings(
    max_examples=500 if SOAK else 20,
    stateful_step_count=200 if SOAK else 50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
ExtDefaultLoopMachine.TestCase.settings = SETTINGS
ExtUvloopMachine.TestCase.settings = SETTINGS
if SOAK:
    base.DefaultLoopMachine.TestCase.settings = SETTINGS
    base.UvloopMachine.TestCase.settings = SETTINGS

TestExtDefaultLoop = ExtDefaultLoopMachine.TestCase
TestExtUvloop = ExtUvloopMachine.TestCase
