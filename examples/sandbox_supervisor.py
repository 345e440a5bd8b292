"""A sandbox supervisor: real guest processes, each on its own MemoryFile.

This is what asyncpgalloc is for. One asyncio supervisor (on uvloop when it is
installed) keeps ``--sandboxes`` sandboxes running, each a real process
(``examples/sandbox_guest.py``) with its own memfd-backed ``MemoryFile``, all of
them reporting into one ``MemoryAccounting`` (the host's view). For each sandbox it

* creates a child memory cgroup (cgroup v1 or v2, whichever the host has; it says so
  and goes on without one when it cannot) and starts the guest in it;
* hands the guest its file's sealed memfd (``MemoryFile.guest_fd``: the guest can read
  and write its pages but never shrink the file) over a Unix socket, then answers the
  guest's requests (``guest_protocol``): allocate anonymous or page-cache memory, free
  it, make cached memory evictable; the guest maps every range at its own address,
  fills it and reads it back, and the supervisor spot-checks it through ``map_internal``;
* past ``--budget`` MiB of host memory held by all files, evicts cached ranges
  (``start_evictions``) and tells each guest which range is gone;
* when the guest exits (or dies) frees every page it held and removes its cgroup;
  a new sandbox takes the slot.

At the end a checkpoint step: a guest fills pages, is stopped (``SIGSTOP``), its file
is saved and the guest killed; the checkpoint is loaded into a new file and a new guest
verifies that its data survived. The live view shows every guest's pid, cgroup, bytes
used / cached / evicted and requests per second: a ``rich`` table on a terminal (``pip
install 'asyncpgalloc[demo]'``), plain lines otherwise. Every page must come back:
``used_bytes == 0``, nothing committed or accounted, invariants hold; it exits 0 if so.

Run: python examples/sandbox_supervisor.py [--duration 8] [--sandboxes 4]
     [--budget 96] [--seed 1] [--map out.svg]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guest_protocol import GuestSession, start_guest

from asyncpgalloc import (
    DelayedEviction,
    FileRange,
    MemoryAccounting,
    MemoryFile,
    MemoryFileOpts,
)

KiB = 1 << 10
MiB = 1 << 20

#: How often the supervisor refreshes usage, checks the budget and redraws.
USAGE_REFRESH = 0.2
PRESSURE_CHECK = 0.05
VIEW_REFRESH = 0.5  # a rich frame costs ~10 ms of loop time: it shows in the lag
PLAIN_VIEW_REFRESH = 1.0
#: The loop-lag ticker's period.
TICK = 0.01
#: Pages the checkpointed guest fills.
CHECKPOINT_PAGES = 256


# ------------------------------------------------------------------ cgroups


def cgroup_parent() -> tuple[str | None, str]:
    """Where to create the guests' memory cgroups, and a note on what was found.

    cgroup v1's memory hierarchy if mounted, else cgroup v2 with the memory controller
    enabled; ``None`` (and why) if neither is there or writable.
    """
    v1 = v2 = None
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _dev, path, fstype, options, *_ = line.split()
            if fstype == "cgroup" and "memory" in options.split(","):
                v1 = path
            elif fstype == "cgroup2":
                v2 = path
    if v1 is not None:
        parent, version = v1, "v1"
    elif v2 is not None and "memory" in Path(v2, "cgroup.subtree_control").read_text():
        parent, version = v2, "v2"
    else:
        return None, "no memory cgroup hierarchy: guests run without cgroups"
    if not os.access(parent, os.W_OK):
        return None, f"{parent} is not writable: guests run without cgroups"
    return parent, f"cgroup {version} at {parent}"


def cgroup_memory(path: str) -> int:
    """Bytes charged to the cgroup now (v1 ``memory.usage_in_bytes``, v2 ``memory.current``)."""
    for name in ("memory.usage_in_bytes", "memory.current"):
        with contextlib.suppress(OSError):
            return int(Path(path, name).read_text())
    return 0


async def remove_cgroup(path: str) -> None:
    """rmdir the (now empty) cgroup, retrying while its last task finishes exiting."""
    for _ in range(100):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            await asyncio.sleep(0.02)
    print(f"note: could not remove cgroup {path}", file=sys.stderr)


# ------------------------------------------------------------------ sandboxes


@dataclass(eq=False)
class Sandbox:
    """One guest process and its own MemoryFile."""

    name: str
    memcg_id: int
    mf: MemoryFile
    session: GuestSession
    cgroup: str | None = None
    pid: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    rc: int | None = None

    def req_per_s(self) -> float:
        age = (self.ended or time.monotonic()) - self.started
        return self.session.requests / age if age > 0 else 0.0


@dataclass
class Totals:
    """Figures over the whole run (sandboxes that exited included)."""

    sandboxes: int = 0
    requests: int = 0
    verified_bytes: int = 0
    bad_bytes: int = 0
    guest_errors: int = 0  # errors guests saw or exit statuses other than 0
    evicted_bytes: int = 0
    allocations: int = 0
    allocated_bytes: int = 0
    released_bytes: int = 0
    release_steps: int = 0
    evictions_started: int = 0
    evict_calls: int = 0
    evict_failures: int = 0
    usage_scans: int = 0
    leftover: int = 0  # used + waste + host bytes of closed files (must stay 0)
    pressure: int = 0  # times host usage went over the budget
    checkpoint: str = "not run"
    lag_now: float = 0.0
    lag_max: float = 0.0
    lags: list[float] = field(default_factory=list)

    def lag_percentile(self, q: float) -> float:
        ordered = sorted(self.lags) or [0.0]
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def add(self, sb: Sandbox) -> None:
        """Count a finished sandbox (its file still open, every page back)."""
        self.sandboxes += 1
        self.requests += sb.session.requests
        self.verified_bytes += sb.counts.get("verified_bytes", 0)
        self.bad_bytes += sb.counts.get("bad_bytes", 0)
        self.guest_errors += sb.counts.get("errors", 0) + (sb.rc != 0)
        self.evicted_bytes += sb.session.evicted_bytes
        c = sb.mf.counters()
        self.allocations += c.allocations
        self.allocated_bytes += c.allocated_bytes
        self.released_bytes += c.released_bytes
        self.release_steps += c.release_steps
        self.evictions_started += c.evictions_started
        self.evict_calls += c.evict_calls
        self.evict_failures += c.evict_failures
        self.usage_scans += c.usage_scans
        s = sb.mf.stats()
        self.leftover += s.used_bytes + s.waste_bytes + sb.mf.total_usage()


@dataclass
class Supervisor:
    """Runs the sandboxes, applies the budget, measures loop lag, draws the view."""

    args: argparse.Namespace
    rng: random.Random
    accounting: MemoryAccounting
    cgroups: str | None
    slots: list[Sandbox | None] = field(default_factory=list)
    totals: Totals = field(default_factory=Totals)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    next_memcg: int = 1
    t0: float = field(default_factory=time.monotonic)

    def opts(self) -> MemoryFileOpts:
        return MemoryFileOpts(
            accounting=self.accounting,  # the host's view of every sandbox
            # Cached memory is kept until the supervisor says otherwise (the budget).
            delayed_eviction=DelayedEviction.MANUAL,
            # Accounting by memcg stays fresh without anyone polling update_usage.
            usage_refresh_interval=USAGE_REFRESH,
        )

    def files(self) -> list[MemoryFile]:
        return [sb.mf for sb in self.slots if sb is not None and not sb.mf.closed]

    async def new_sandbox(self, mf: MemoryFile) -> Sandbox:
        memcg = self.next_memcg
        self.next_memcg += 1
        name = f"sb-{memcg}"
        cgroup = None
        if self.cgroups is not None:
            cgroup = os.path.join(self.cgroups, f"asyncpgalloc-{os.getpid()}-{name}")
            try:
                os.mkdir(cgroup)
            except OSError as e:
                print(f"note: cannot create cgroup {cgroup} ({e}): no more cgroups", flush=True)
                self.cgroups = cgroup = None
        return Sandbox(name, memcg, mf, GuestSession(mf, memcg_id=memcg), cgroup)

    async def run_guest(self, sb: Sandbox, *guest_args: str) -> None:
        """Start the guest, serve it until it is gone, collect what it printed."""
        proc, serving = await start_guest(
            sb.mf, sb.session, *guest_args, cgroup=sb.cgroup, stdout=asyncio.subprocess.PIPE
        )
        sb.pid = proc.pid
        try:
            assert proc.stdout is not None
            out = await proc.stdout.read()
            sb.rc = await proc.wait()
            await serving
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
        sb.ended = time.monotonic()
        with contextlib.suppress(ValueError, IndexError):
            sb.counts = json.loads(out.splitlines()[-1])

    async def finish(self, sb: Sandbox) -> None:
        """Wait for every page of the sandbox to be back; count it; close its file."""
        if sb.cgroup is not None:
            await remove_cgroup(sb.cgroup)
        await sb.mf.wait_for_evictions()
        await sb.mf.wait_released()
        sb.mf.check_invariants()
        self.totals.add(sb)

    async def run_slot(self, slot: int) -> None:
        """Run sandboxes in this slot one after another until the supervisor stops."""
        while not self.stop.is_set():
            lifetime = self.rng.uniform(1.5, 4.0)
            left = self.args.duration - (time.monotonic() - self.t0)
            async with MemoryFile.open(opts=self.opts()) as mf:
                sb = await self.new_sandbox(mf)
                self.slots[slot] = sb
                seconds = max(0.2, min(lifetime, left))
                await self.run_guest(sb, "--seconds", f"{seconds:.2f}", "--seed", str(sb.memcg_id))
                await self.finish(sb)

    async def checkpoint(self) -> None:
        """Stop a guest, save its file, kill it, load the checkpoint, verify with a new guest."""
        async with MemoryFile.open(opts=self.opts()) as mf:
            sb = await self.new_sandbox(mf)
            proc, serving = await start_guest(
                mf,
                sb.session,
                "--keep",
                str(CHECKPOINT_PAGES),
                cgroup=sb.cgroup,
                stdout=asyncio.subprocess.PIPE,
            )
            assert proc.stdout is not None
            offset, length, token = (int(x) for x in (await proc.stdout.readline()).split())
            proc.send_signal(signal.SIGSTOP)
            with tempfile.TemporaryDirectory(prefix="asyncpgalloc-ckpt-") as tmp:
                path = Path(tmp) / "guest.ckpt"
                await mf.save(path)
                proc.kill()
                await proc.wait()
                await serving  # the guest is gone: the session frees its pages
                sb.rc = 0  # killed on purpose
                await self.finish(sb)
                async with await MemoryFile.load(path, self.opts()) as restored:
                    kept = FileRange(offset, offset + length)  # the checkpoint's reference
                    rsb = await self.new_sandbox(restored)
                    await self.run_guest(rsb, "--verify", f"{offset}:{length}:{token}")
                    restored.dec_ref(kept)
                    await self.finish(rsb)
        good = rsb.rc == 0 and rsb.counts.get("verified_bytes") == length
        self.totals.checkpoint = (
            f"{length // KiB} KiB saved from stopped pid {proc.pid}, "
            f"verified by pid {rsb.pid}: {'ok' if good else 'FAILED'}"
        )
        self.totals.guest_errors += not good

    async def watch_budget(self) -> None:
        """The demo's memory pressure: past the budget, ask caches to give memory back."""
        budget = self.args.budget * MiB
        over = False
        while True:
            await asyncio.sleep(PRESSURE_CHECK)
            files = self.files()
            # One fstat a file: what the host really holds for it, waste included.
            was_over, over = over, sum(mf.total_usage() for mf in files) > budget
            if over:
                self.totals.pressure += not was_over
                # Every guest's evictable cached ranges go; each guest is told which.
                for mf in files:
                    mf.start_evictions()

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
    #: "used": what the guest holds (anonymous and cached); "cached" the cached part;
    #: "evicted": cached memory taken back under pressure (the guest was told).
    #: "commit": what the shared accounting holds for the sandbox's memcg (kept fresh
    #: by each file's usage refresher); "cgroup": what the kernel charges its cgroup.
    COLUMNS = (
        ("guest", ""),
        ("pid", ""),
        ("cgroup", ""),
        ("age", "s"),
        ("used", ""),
        ("cached", ""),
        ("evicted", ""),
        ("commit", ""),
        ("cgroup", "mem"),
        ("req/s", ""),
    )

    def rows(self) -> list[list[str]]:
        """Per guest: its process, what it holds, what is accounted and charged to it."""
        rows = []
        for sb in self.slots:
            if sb is None:
                continue
            committed = sum(self.accounting.by_memcg(sb.memcg_id).values())
            ses = sb.session
            rows.append(
                [
                    sb.name + (" done" if sb.ended else ""),
                    str(sb.pid),
                    "-" if sb.cgroup is None else os.path.basename(sb.cgroup)[-8:],
                    f"{(sb.ended or time.monotonic()) - sb.started:.1f}",
                    mib(ses.used_bytes),
                    mib(ses.cached_bytes),
                    mib(ses.evicted_bytes),
                    mib(committed),
                    "-" if sb.cgroup is None or sb.ended else mib(cgroup_memory(sb.cgroup)),
                    f"{sb.req_per_s():.0f}",
                ]
            )
        return rows

    def status(self) -> list[str]:
        """The files as a whole, as phrases: stats(), host usage, budget, accounting, lag."""
        files, t = self.files(), self.totals
        stats = [mf.stats() for mf in files]
        live_requests = sum(sb.session.requests for sb in self.slots if sb is not None)
        elapsed = time.monotonic() - self.t0
        return [
            f"t={elapsed:.1f}s",
            f"{len(files)} files: used {fmt(sum(s.used_bytes for s in stats))}, "
            f"waste {fmt(sum(s.waste_bytes for s in stats))}, "
            f"releasing {fmt(sum(s.releasing_bytes for s in stats))}",
            f"host holds {fmt(sum(mf.total_usage() for mf in files))} "
            f"(budget {self.args.budget} MiB, gone over {times(t.pressure)})",
            f"accounted {fmt(self.accounting.total())}",
            f"{t.sandboxes} guests done, {t.requests + live_requests} requests",
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

        table = Table(title="asyncpgalloc sandbox supervisor: real guests (MiB)")
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
    """ "once", "twice", "3 times": how often an event happened, not a ratio."""
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
    accounting = MemoryAccounting()
    cgroups, note = cgroup_parent()
    started = time.monotonic()
    print(
        f"running {args.sandboxes} guest processes for {args.duration:g} s, one memfd each "
        f"(budget {args.budget} MiB, seed {args.seed}; {note})",
        flush=True,
    )
    sup = Supervisor(args, rng, accounting, cgroups, slots=[None] * args.sandboxes)
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
                files = sup.files()
                if files:
                    await render_map(files[0], args.map)  # while its guest holds memory
            sup.stop.set()  # each guest runs out its time, returns everything and exits
        await sup.checkpoint()
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
    t = sup.totals
    accounted = accounting.total()
    ok = t.leftover == 0 and accounted == 0 and t.bad_bytes == 0 and t.guest_errors == 0
    print(
        "\n".join(
            [
                "",
                f"summary: {t.sandboxes} guest processes in {args.sandboxes} slots over "
                f"{time.monotonic() - started:.1f} s (seed {args.seed})",
                f"  {t.requests} requests; {t.allocations} allocations, "
                f"{fmt(t.allocated_bytes)} allocated; {fmt(t.verified_bytes)} verified by "
                f"guests, {t.bad_bytes} bad bytes, {t.guest_errors} guest errors",
                f"  released {fmt(t.released_bytes)} in {t.release_steps} steps; "
                f"{t.usage_scans} usage scans",
                f"  budget {args.budget} MiB gone over {times(t.pressure)}: "
                f"{t.evictions_started} evictions, {t.evict_calls} evict calls, "
                f"{t.evict_failures} failures, {fmt(t.evicted_bytes)} evicted from guests",
                f"  checkpoint: {t.checkpoint}",
                f"  event-loop lag: median {t.lag_percentile(0.5) * 1e3:.1f} ms, "
                f"p99 {t.lag_percentile(0.99) * 1e3:.1f} ms, max {t.lag_max * 1e3:.1f} ms",
                f"  at the end: used + waste + host usage {t.leftover} B over every file, "
                f"accounted {accounted} B; invariants hold",
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
