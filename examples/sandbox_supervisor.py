"""A sandbox supervisor: several simulated sandboxes sharing one MemoryFile.

This is what asyncpgalloc is for. One asyncio supervisor (on uvloop when it is
installed) runs ``--sandboxes`` sandboxes at once on one memfd-backed
``MemoryFile``. Each sandbox has its own memory-cgroup id and does what a guest
does to its memory:

* its anonymous memory grows and shrinks: small allocations on the synchronous
  fast path (``allocate``), large and huge-page ones with ``allocate_async``,
  writes through ``map_internal``, parts shared and unshared with
  ``inc_ref``/``dec_ref`` of page-aligned sub-ranges, tails given back;
* its page cache reads real files with ``allocate_from`` (an ``aiofiles`` file)
  and keeps them as evictable memory (``mark_evictable``); ``evict`` drops them;
* after a while it exits and returns everything; a new sandbox takes its slot.

The supervisor keeps usage accounting live (``usage_refresh_interval``), watches
the host's usage of the file and, past ``--budget`` MiB, calls
``start_evictions()`` (the demo's memory pressure), and shows a live view: a
``rich`` table on a terminal (``pip install 'asyncpgalloc[demo]'``), plain lines
otherwise. At the end every page must be back: ``stats().used_bytes == 0``,
nothing committed, and ``check_invariants()`` passes; it exits 0 if so.

Run: python examples/sandbox_supervisor.py [--duration 8] [--sandboxes 4]
     [--budget 96] [--seed 1] [--map out.svg]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles

from asyncpgalloc import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    AccessType,
    AllocationMode,
    AllocOpts,
    DelayedEviction,
    EvictableRange,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
)

KiB = 1 << 10
MiB = 1 << 20

#: Sizes of the data files the page caches read (page-aligned, so that a cached
#: copy is exactly the file: allocate_from keeps only whole pages it filled).
DATA_FILE_SIZES = (256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB, 3 * MiB, 4 * MiB)
#: A sandbox's anonymous memory stops growing here (it shrinks instead).
ANON_CAP = 16 * MiB
#: How often the supervisor refreshes usage, checks the budget and redraws.
USAGE_REFRESH = 0.2
PRESSURE_CHECK = 0.05
VIEW_REFRESH = 0.5  # a rich frame costs ~10 ms of loop time: it shows in the lag
PLAIN_VIEW_REFRESH = 1.0
#: The loop-lag ticker's period.
TICK = 0.01
#: Header of every data file, so that a cached copy can be checked cheaply.
HEADER_LEN = 16


# --------------------------------------------------------------- data files


@dataclass(frozen=True)
class DataFile:
    """A real file the sandboxes read through their page caches."""

    path: Path
    size: int
    head: bytes  # first HEADER_LEN bytes
    tail: bytes  # last HEADER_LEN bytes


async def make_data_files(directory: Path, rng: random.Random) -> list[DataFile]:
    """Write the data files (random bytes behind a named header) with aiofiles."""
    files = []
    for i, size in enumerate(DATA_FILE_SIZES):
        head = f"data-file-{i:02d}".encode().ljust(HEADER_LEN, b".")
        body = head + rng.randbytes(size - HEADER_LEN)
        path = directory / f"data-{i:02d}.bin"
        async with aiofiles.open(path, "wb") as f:
            await f.write(body)
        files.append(DataFile(path, size, head, body[-HEADER_LEN:]))
    return files


# --------------------------------------------------------------- page cache


class PageCache:
    """A sandbox's page cache: file data in the MemoryFile, evictable under pressure.

    An ``EvictableMemoryUser``: the file calls ``evict`` from its own eviction task,
    so every method here must tolerate the others having run in between. It is
    hashable by identity (the file keys evictable ranges by user), so it must not
    be a dataclass with ``eq``.
    """

    def __init__(self, mf: MemoryFile, memcg_id: int) -> None:
        self.mf = mf
        self.opts = AllocOpts(kind=MemoryKind.PAGE_CACHE, memcg_id=memcg_id)
        self.entries: dict[Path, FileRange] = {}
        # Entries in use right now: evict() leaves them alone. A racing evict may
        # still be called for a range we have just marked unevictable (the file
        # allows it), so this check is what makes that race harmless.
        self.pinned: set[Path] = set()
        self.hits = self.misses = self.evictions = 0

    def held_bytes(self) -> int:
        return sum(fr.length for fr in self.entries.values())

    async def read(self, data: DataFile) -> None:
        """Read ``data`` through the cache: a hit checks the cached copy, a miss loads it."""
        mf = self.mf
        fr = self.entries.get(data.path)
        if fr is not None:
            self.hits += 1
            # Pin while in use: the sandbox reads it across an await.
            self.pinned.add(data.path)
            mf.mark_unevictable(self, EvictableRange(fr.start, fr.end))
            try:
                await asyncio.sleep(0)
                check_copy(mf, fr, data)
            finally:
                self.pinned.discard(data.path)
                if not mf.closed:
                    mf.mark_evictable(self, EvictableRange(fr.start, fr.end))
            return
        self.misses += 1
        # The file's bytes go straight into the allocated pages (readinto).
        async with aiofiles.open(data.path, "rb") as f:
            fr = await mf.allocate_from(f, data.size, self.opts)
        if fr.length < data.size:
            # The file shrank under us: keep nothing rather than a partial copy.
            if fr.length:
                mf.dec_ref(fr)
            return
        check_copy(mf, fr, data)
        self.entries[data.path] = fr
        if mf.should_cache_evictable():
            mf.mark_evictable(self, EvictableRange(fr.start, fr.end))

    async def evict(self, er: EvictableRange) -> None:
        """Drop the unpinned entries that overlap ``er`` (the file's offsets are our keys).

        The file merges a user's adjacent evictable ranges (as gVisor does): after
        marking three neighbouring entries, one ``evict`` covers all three. So look
        for every entry overlapping ``er``; looking up ``er.start`` alone would drop
        the first and leak the others. Entries already dropped (the sandbox exited,
        or an earlier evict got them) are simply not found.
        """
        for path, fr in list(self.entries.items()):
            if fr.start < er.end and er.start < fr.end and path not in self.pinned:
                del self.entries[path]
                self.mf.dec_ref(fr)
                self.evictions += 1

    def drop_all(self) -> None:
        """Give every cached page back (the sandbox is exiting)."""
        self.mf.mark_all_unevictable(self)
        for fr in self.entries.values():
            self.mf.dec_ref(fr)
        self.entries.clear()


def check_copy(mf: MemoryFile, fr: FileRange, data: DataFile) -> None:
    """A cached copy must still hold the file's bytes (first and last few)."""
    (first,) = mf.map_internal(FileRange(fr.start, fr.start + HEADER_LEN))
    (last,) = mf.map_internal(FileRange(fr.end - HEADER_LEN, fr.end))
    if first != data.head or last != data.tail:
        raise AssertionError(f"cached copy of {data.path.name} at {fr} is corrupt")


# ------------------------------------------------------------------ sandbox


@dataclass
class Sandbox:
    """One simulated guest: anonymous memory, a page cache, a lifetime."""

    name: str
    memcg_id: int
    mf: MemoryFile
    rng: random.Random
    data: list[DataFile]
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    heap: list[FileRange] = field(default_factory=list)  # one reference each
    shared: list[FileRange] = field(default_factory=list)  # extra references
    zero_checks: int = 0
    steps: int = 0
    exited: bool = False
    cache: PageCache = field(init=False)

    def __post_init__(self) -> None:
        self.cache = PageCache(self.mf, self.memcg_id)

    def anon_bytes(self) -> int:
        return sum(fr.length for fr in self.heap)

    def shared_bytes(self) -> int:
        return sum(fr.length for fr in self.shared)

    async def run(self, lifetime: float, stop: asyncio.Event) -> None:
        """Work until ``lifetime`` seconds pass or ``stop`` is set, then exit."""
        deadline = time.monotonic() + lifetime
        try:
            while time.monotonic() < deadline and not stop.is_set():
                await self.step()
                self.steps += 1
                await asyncio.sleep(self.rng.uniform(0.002, 0.02))
        finally:
            # Whatever happened (even cancellation), a sandbox returns everything.
            self.exit()

    async def step(self) -> None:
        r = self.rng.random()
        if r < 0.35 and self.anon_bytes() < ANON_CAP:
            await self.grow()
        elif r < 0.55:
            self.shrink()
        elif r < 0.65:
            self.share_or_unshare()
        else:
            weights = [1 / (i + 1) for i in range(len(self.data))]  # small files are hot
            await self.cache.read(self.rng.choices(self.data, weights)[0])

    async def grow(self) -> None:
        """Allocate anonymous memory: small (sync), large or huge (async)."""
        mf, rng = self.mf, self.rng
        kind = rng.random()
        if kind < 0.6:
            # Small: the synchronous fast path; uncommitted, we write every byte.
            fr = mf.allocate(
                rng.randint(1, 64) * PAGE_SIZE,
                AllocOpts(kind=MemoryKind.ANONYMOUS, memcg_id=self.memcg_id),
            )
            self.check_zero(fr)
            for view in mf.map_internal(fr, AccessType.WRITE):
                view[:] = bytes([self.memcg_id & 0xFF]) * len(view)
        else:
            # Large (1-6 MiB) or huge-page-backed (2-8 MiB, 2 MiB multiples): the
            # populate runs in the executor, so the loop keeps ticking.
            huge = kind >= 0.85
            length = rng.randint(1, 4) * HUGE_PAGE_SIZE if huge else rng.randint(1, 6) * MiB
            fr = await mf.allocate_async(
                length,
                AllocOpts(
                    kind=MemoryKind.ANONYMOUS,
                    memcg_id=self.memcg_id,
                    mode=AllocationMode.WRITE_POPULATE,
                    huge=huge,
                ),
            )
            self.check_zero(fr)
            for view in mf.map_internal(fr, AccessType.WRITE):
                view[:8] = self.name.encode().ljust(8)[:8]
        self.heap.append(fr)

    def check_zero(self, fr: FileRange) -> None:
        """A page handed out reads as zeros, whatever its history (recycled, released...)."""
        for page in (fr.start, fr.end - PAGE_SIZE):
            (view,) = self.mf.map_internal(FileRange(page, page + PAGE_SIZE))
            if view.tobytes().count(0) != PAGE_SIZE:
                raise AssertionError(f"{self.name}: new page {page:#x} is not zero")
        self.zero_checks += 1

    def shrink(self) -> None:
        """Give back a whole region, or the tail of one (per-page references)."""
        if not self.heap:
            return
        i = self.rng.randrange(len(self.heap))
        fr = self.heap[i]
        pages = fr.length // PAGE_SIZE
        if pages == 1 or self.rng.random() < 0.4:
            self.mf.dec_ref(self.heap.pop(i))
            return
        # A tail at any page boundary: in a huge-page-backed region this leaves
        # partly released huge pages (the sub-release path).
        keep = fr.start + self.rng.randint(1, pages - 1) * PAGE_SIZE
        self.mf.dec_ref(FileRange(keep, fr.end))
        self.heap[i] = FileRange(fr.start, keep)

    def share_or_unshare(self) -> None:
        """Take an extra reference on part of a region (think fork + copy-on-write)."""
        if self.shared and (self.rng.random() < 0.5 or not self.heap):
            self.mf.dec_ref(self.shared.pop(self.rng.randrange(len(self.shared))))
            return
        if not self.heap:
            return
        fr = self.rng.choice(self.heap)
        pages = fr.length // PAGE_SIZE
        first = self.rng.randrange(pages)
        count = self.rng.randint(1, min(16, pages - first))
        part = FileRange(fr.start + first * PAGE_SIZE, fr.start + (first + count) * PAGE_SIZE)
        self.mf.inc_ref(part)
        self.shared.append(part)

    def exit(self) -> None:
        """Return every page this sandbox holds."""
        if self.exited or self.mf.closed:
            return
        self.exited = True
        self.ended = time.monotonic()
        for fr in self.heap + self.shared:
            self.mf.dec_ref(fr)
        self.heap.clear()
        self.shared.clear()
        self.cache.drop_all()


# --------------------------------------------------------------- supervisor


@dataclass
class Totals:
    """Figures over the whole run (sandboxes that exited included)."""

    sandboxes: int = 0
    steps: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_evictions: int = 0
    zero_checks: int = 0
    pressure: int = 0  # times host usage went over the budget
    lag_now: float = 0.0
    lag_max: float = 0.0
    lags: list[float] = field(default_factory=list)

    def lag_percentile(self, q: float) -> float:
        ordered = sorted(self.lags) or [0.0]
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def add(self, sb: Sandbox) -> None:
        self.sandboxes += 1
        self.steps += sb.steps
        self.cache_hits += sb.cache.hits
        self.cache_misses += sb.cache.misses
        self.cache_evictions += sb.cache.evictions
        self.zero_checks += sb.zero_checks


@dataclass
class Supervisor:
    """Runs the sandboxes, applies the budget, measures loop lag, draws the view."""

    mf: MemoryFile
    args: argparse.Namespace
    data: list[DataFile]
    rng: random.Random
    slots: list[Sandbox | None] = field(default_factory=list)
    totals: Totals = field(default_factory=Totals)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    next_memcg: int = 1
    t0: float = field(default_factory=time.monotonic)

    async def run_slot(self, slot: int) -> None:
        """Run sandboxes in this slot one after another until the supervisor stops."""
        while not self.stop.is_set():
            memcg = self.next_memcg
            self.next_memcg += 1
            sb = Sandbox(f"sb-{memcg}", memcg, self.mf, random.Random(self.rng.random()), self.data)
            self.slots[slot] = sb
            await sb.run(self.rng.uniform(1.5, 4.0), self.stop)
            self.totals.add(sb)

    async def watch_budget(self) -> None:
        """The demo's memory pressure: past the budget, ask caches to give memory back."""
        budget = self.args.budget * MiB
        over = False
        while True:
            await asyncio.sleep(PRESSURE_CHECK)
            # One fstat: what the host really holds for the file, waste included.
            was_over, over = over, self.mf.total_usage() > budget
            if over:
                self.totals.pressure += not was_over
                # Starts a task for each cache not already being evicted; the
                # freed pages become waste, and the releaser punches them.
                self.mf.start_evictions()

    async def tick(self) -> None:
        """Measure event-loop lag: how late a short sleep wakes up."""
        while True:
            # perf_counter, not loop.time(): uvloop's clock has 1 ms steps.
            before = time.perf_counter()
            await asyncio.sleep(TICK)
            lag = max(0.0, time.perf_counter() - before - TICK)
            self.totals.lag_now = lag
            self.totals.lags.append(lag)
            self.totals.lag_max = max(self.totals.lag_max, lag)

    async def show(self, live: bool) -> None:
        """Redraw the view until cancelled: a rich Live table, or plain lines."""
        if not live:
            while True:
                await asyncio.sleep(PLAIN_VIEW_REFRESH)
                print(self.lines(), flush=True)
        from rich.live import Live  # imported already by have_rich(): no stall here

        # auto_refresh=False: redraw from this task, not from rich's own thread,
        # which would take the GIL (and the loop's time) whenever it liked.
        with Live(self.table(), auto_refresh=False) as view:
            try:
                while True:
                    await asyncio.sleep(VIEW_REFRESH)
                    view.update(self.live_view(view.console.width), refresh=True)
            finally:
                # Leave the last state on screen.
                view.update(self.live_view(view.console.width), refresh=True)

    # -- what the view shows -------------------------------------------------

    #: Column headers (two lines each, to fit 80 columns); figures are MiB.
    #: "held": what the sandbox holds references on (anon includes extra shared
    #: references). "commit": what the file's accounting holds for the sandbox's
    #: memcg (mf.accounting.by_memcg), kept fresh by the usage refresher. "freed":
    #: its pages that became waste (accounted as SYSTEM) and wait for the releaser.
    #: "hits", "misses", "evicted": the page cache's reads and entries evicted.
    COLUMNS = (
        ("sandbox", ""),
        ("age", "s"),
        ("anon", "held"),
        ("cache", "held"),
        ("anon", "commit"),
        ("cache", "commit"),
        ("freed", "pending"),
        ("cache", "hits"),
        ("cache", "misses"),
        ("cache", "evicted"),
    )

    def rows(self) -> list[list[str]]:
        """Per sandbox: what it holds, what is accounted to its memcg, its cache."""
        rows = []
        for sb in self.slots:
            if sb is None:
                continue
            committed = self.mf.accounting.by_memcg(sb.memcg_id)
            c = sb.cache
            rows.append(
                [
                    sb.name + (" done" if sb.exited else ""),
                    f"{(sb.ended or time.monotonic()) - sb.started:.1f}",
                    mib(sb.anon_bytes() + sb.shared_bytes()),
                    mib(c.held_bytes()),
                    mib(committed.get(MemoryKind.ANONYMOUS, 0)),
                    mib(committed.get(MemoryKind.PAGE_CACHE, 0)),
                    mib(committed.get(MemoryKind.SYSTEM, 0)),
                    str(c.hits),
                    str(c.misses),
                    str(c.evictions),
                ]
            )
        return rows

    def status(self) -> list[str]:
        """The file as a whole, as phrases: stats(), counters(), host usage, budget, lag."""
        s, c, t = self.mf.stats(), self.mf.counters(), self.totals
        return [
            f"t={time.monotonic() - self.t0:.1f}s",
            f"file {fmt(s.total_size)}: used {fmt(s.used_bytes)}, waste {fmt(s.waste_bytes)}, "
            f"releasing {fmt(s.releasing_bytes)}, sub-released {fmt(s.subreleased_bytes)}",
            f"host holds {fmt(self.mf.total_usage())} (budget {self.args.budget} MiB, "
            f"gone over {times(t.pressure)})",
            f"released {fmt(c.released_bytes)} in {c.release_steps} steps",
            f"{c.evictions_started} evictions, {c.evict_calls} evict calls",
            f"event-loop lag {t.lag_now * 1e3:.1f} ms (max {t.lag_max * 1e3:.1f} ms)",
        ]

    def file_lines(self, width: int | None = None) -> str:
        """:meth:`status` in lines of at most ``width`` columns (default: the terminal's),
        broken between phrases, never inside one."""
        if width is None:
            width = shutil.get_terminal_size().columns
        lines: list[str] = []
        for item in self.status():
            if lines and len(lines[-1]) + 2 + len(item) <= width:
                lines[-1] += "; " + item
            else:
                lines.append(item)
        return "\n".join(lines)

    def table(self) -> Any:
        """The rich table (typed Any: rich is an optional dependency)."""
        from rich.table import Table

        table = Table(title="asyncpgalloc sandbox supervisor (MiB)")
        for i, (top, bottom) in enumerate(self.COLUMNS):
            table.add_column(f"{top}\n{bottom}", justify="left" if i == 0 else "right")
        for row in self.rows():
            table.add_row(*row)
        return table

    def live_view(self, width: int) -> Any:
        """The table, then the file's lines at the console's full ``width`` (a table
        caption would wrap them at the table's width)."""
        from rich.console import Group
        from rich.text import Text

        return Group(self.table(), Text(self.file_lines(width)))

    def lines(self) -> str:
        """The plain view: the file's lines, then the table as aligned text (MiB)."""
        headers = [f"{top} {bottom}".strip() for top, bottom in self.COLUMNS]
        rows = [headers, *self.rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
        out = [self.file_lines()]
        for row in rows:
            cells = [
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ]
            out.append("  " + "  ".join(cells))
        return "\n".join(out)


def times(n: int) -> str:
    """"once", "twice", "3 times": how often an event happened, not a ratio."""
    return {0: "0 times", 1: "once", 2: "twice"}.get(n, f"{n} times")


def mib(n: int) -> str:
    return f"{n / MiB:.1f}"


def fmt(n: int) -> str:
    """Bytes, human-sized."""
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    if n >= KiB:
        return f"{n / KiB:.0f} KiB"
    return f"{n} B"


async def render_map(mf: MemoryFile, path: str) -> None:
    """Draw the file's page map, if this version of asyncpgalloc can."""
    render: Callable[..., Awaitable[None] | None] | None = getattr(
        mf, "render_map_async", None
    ) or getattr(mf, "render_map", None)
    if render is None:
        print(f"note: --map {path}: this asyncpgalloc has no MemoryFile.render_map; skipped")
        return
    result = render(path)
    if inspect.isawaitable(result):
        await result
    print(f"page map written to {path}")


async def supervise(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    opts = MemoryFileOpts(
        expect_hugepages=True,  # huge=True allocations get their own 2 MiB-page chunks
        # Cached file data is kept until the supervisor says otherwise (the budget).
        delayed_eviction=DelayedEviction.MANUAL,
        # Accounting by memcg stays fresh without anyone polling update_usage.
        usage_refresh_interval=USAGE_REFRESH,
    )
    started = time.monotonic()
    print(
        f"running {args.sandboxes} sandboxes for {args.duration:g} s on one memfd "
        f"(budget {args.budget} MiB, seed {args.seed})",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="asyncpgalloc-demo-") as tmp:
        data = await make_data_files(Path(tmp), rng)
        async with MemoryFile.open(opts=opts) as mf:
            sup = Supervisor(mf, args, data, rng, slots=[None] * args.sandboxes)
            background = [
                asyncio.create_task(sup.watch_budget()),
                asyncio.create_task(sup.tick()),
                asyncio.create_task(sup.show(args.view == "live")),
            ]
            try:
                async with asyncio.TaskGroup() as tg:
                    for slot in range(args.sandboxes):
                        tg.create_task(sup.run_slot(slot))
                    await asyncio.sleep(args.duration)
                    if args.map:
                        await render_map(mf, args.map)  # while the sandboxes still hold memory
                    sup.stop.set()  # each sandbox exits and returns everything
            finally:
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)

            # Every page is back: wait for the releaser (and any eviction) to finish.
            await mf.wait_for_evictions()
            await mf.wait_released()
            stats, counters = mf.stats(), mf.counters()
            host_usage = mf.total_usage()
            accounted = mf.accounting.total()
            mf.check_invariants()
    ok = stats.used_bytes == 0 and host_usage == 0 and accounted == 0
    t = sup.totals
    print(
        "\n".join(
            [
                "",
                f"summary: {t.sandboxes} sandbox runs in {args.sandboxes} slots over "
                f"{time.monotonic() - started:.1f} s (seed {args.seed})",
                f"  {counters.allocations} allocations, {fmt(counters.allocated_bytes)} allocated; "
                f"{t.zero_checks} new ranges checked zero",
                f"  released {fmt(counters.released_bytes)} in {counters.release_steps} steps; "
                f"{counters.usage_scans} usage scans",
                f"  page cache: {t.cache_hits} hits, {t.cache_misses} misses, "
                f"{t.cache_evictions} entries evicted",
                f"  budget {args.budget} MiB gone over {times(t.pressure)}: "
                f"{counters.evictions_started} evictions, {counters.evict_calls} evict calls, "
                f"{counters.evict_failures} failures",
                f"  event-loop lag: median {t.lag_percentile(0.5) * 1e3:.1f} ms, "
                f"p99 {t.lag_percentile(0.99) * 1e3:.1f} ms, max {t.lag_max * 1e3:.1f} ms",
                f"  at the end: used {stats.used_bytes} B, waste {stats.waste_bytes} B, "
                f"host usage {host_usage} B, accounted {accounted} B; invariants hold",
                f"all pages returned: {ok}",
            ]
        )
    )
    return 0 if ok else 1


def have_rich() -> bool:
    """True if rich is installed; imports what the live view needs (before the loop runs)."""
    try:
        for module in ("rich.console", "rich.live", "rich.table", "rich.text"):
            importlib.import_module(module)
    except ImportError:
        return False
    return True


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--duration", type=positive(float), default=8.0, help="seconds (default 8)")
    p.add_argument("--sandboxes", type=positive(int), default=4, help="at once (default 4)")
    p.add_argument(
        "--budget",
        type=positive(int),
        default=96,
        help="MiB the host may hold for the file before caches are evicted (default 96)",
    )
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--map", metavar="OUT.svg", help="write the file's page map at the end")
    p.add_argument(
        "--view",
        choices=("auto", "live", "plain"),
        default="auto",
        help="live: rich table; plain: lines; auto: live on a terminal when rich is installed",
    )
    p.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop (auto: uvloop when installed)",
    )
    args = p.parse_args(argv)
    # Decide here, before the loop runs: importing rich takes ~50 ms.
    if args.view == "auto":
        args.view = "live" if sys.stdout.isatty() and have_rich() else "plain"
    elif args.view == "live" and not have_rich():
        p.error("--view live needs rich: pip install 'asyncpgalloc[demo]'")
    return args


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    """Run the supervisor; returns the exit status (0: every page came back)."""
    args = parse_args(argv)
    try:
        with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
            return runner.run(supervise(args))
    except KeyboardInterrupt:
        # The sandboxes were cancelled, returned their pages and the file closed.
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
