"""A sandbox supervisor: real guest processes, each on its own MemoryFile.

This is what asyncpgalloc is for. One asyncio supervisor (on uvloop when it is
installed) keeps ``--sandboxes`` sandboxes running, each a real process
(``examples/sandbox_guest.py``) with its own memfd-backed ``MemoryFile``, all of
them reporting into one ``MemoryAccounting`` (the host's view). For each sandbox it

* creates a child memory cgroup (cgroup v1 or v2, whichever the host has, inside a group
  of the supervisor's own; it says so and goes on without cgroups when it cannot) and
  starts the guest in it, optionally limited to ``--guest-limit`` MiB;
* hands the guest its file's sealed memfd (``MemoryFile.guest_fd``: the guest can read
  and write its pages but never shrink the file) over a Unix socket, then answers the
  guest's requests (``guest_protocol``): allocate anonymous or page-cache memory, free
  it, make cached memory evictable; the guest maps every range at its own address,
  fills it and reads it back, and the supervisor spot-checks it through ``map_internal``;
* under memory pressure evicts cached ranges and tells each guest which range is gone:
  past ``--budget`` MiB of host memory held by all files (``start_evictions``), or when
  the kernel reports pressure in the guest's own cgroup (each file watches its guest's
  cgroup: ``use_host_memcg_pressure``);
* when the guest exits (or dies, or the supervisor ends it) frees every page it held,
  closes its file and removes its cgroup; a new sandbox takes the slot.

At the end a checkpoint step: a guest fills ``--checkpoint-mib`` MiB, is stopped
(``SIGSTOP``), the supervisor takes over its pages and saves its file, the guest is
killed; the checkpoint is loaded into a new file with ``async_pages=True`` (its progress
shown from ``load_progress()``) and a new guest, started at once, verifies that its data
survived: it faults its pages in through a userfaultfd that the supervisor serves on its
loop (each fault's block goes first in the loader's queue), or, where the kernel has none
for shmem, it gets its fd once its ranges are loaded. The live view shows every guest's pid,
cgroup, bytes used / cached / evicted and requests per second: a ``rich`` table on a
terminal (``pip install 'asyncpgalloc[demo]'``), plain lines otherwise. It exits 0 only
if every page came back (``used_bytes == 0``, nothing committed or accounted, invariants
hold), no fd leaked, every cgroup was removed and the checkpoint verified.

Run: python examples/sandbox_supervisor.py [--duration 8] [--sandboxes 4]
     [--budget 96] [--guest-limit 0] [--checkpoint-mib 32] [--seed 1] [--map out.svg]
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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guest_protocol import GuestSession, fault_mode_here, start_guest

from asyncpgalloc import (
    PAGE_SIZE,
    DelayedEviction,
    FileRange,
    MemoryAccounting,
    MemoryFile,
    MemoryFileOpts,
    MemoryFileStats,
)
from asyncpgalloc.checkpoint_format import WORKING_SET_GRANULE
from asyncpgalloc.uffd import FaultMode

KiB = 1 << 10
MiB = 1 << 20

#: How often the supervisor refreshes usage, checks the budget and redraws.
USAGE_REFRESH = 0.2
PRESSURE_CHECK = 0.05
VIEW_REFRESH = 0.5  # a rich frame costs ~10 ms of loop time: it shows in the lag
PLAIN_VIEW_REFRESH = 1.0
#: The loop-lag ticker's period.
TICK = 0.01
#: Seconds a guest may run past its time before the supervisor kills it.
GUEST_GRACE = 10.0
#: How often the load's progress is shown during the checkpoint step.
PROGRESS_REFRESH = 0.05


# ------------------------------------------------------------------ cgroups


@dataclass
class Cgroups:
    """The supervisor's memory cgroups: a group of its own, with one child per guest.

    :meth:`detect` finds the memory controller (cgroup v1's memory hierarchy, else a
    cgroup2 mount whose root delegates ``memory``) and creates the supervisor's group
    there; when it cannot (no controller, not root, a read-only cgroupfs) ``parent`` is
    None, ``note`` says why and guests run without cgroups. Every group it made is
    removed by :meth:`remove` / :meth:`close`, killing what is left in it first (only
    our own guests can be in it). Each call is a few cgroupfs syscalls on the loop.
    """

    parent: str | None
    version: int
    note: str
    created: int = 0
    leftover: list[str] = field(default_factory=list)  # groups that could not be removed
    live: set[str] = field(default_factory=set)

    @classmethod
    def detect(cls, name: str) -> Cgroups:
        v1 = v2 = None
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                _dev, path, fstype, options, *_ = line.split()
                if fstype == "cgroup" and "memory" in options.split(","):
                    v1 = v1 or path
                elif fstype == "cgroup2":
                    v2 = v2 or path
        if v1 is not None:
            root, version = v1, 1
        elif v2 is not None and "memory" in _read(Path(v2, "cgroup.subtree_control")).split():
            root, version = v2, 2
        else:
            why = "no memory cgroup controller (v1 memory hierarchy or v2 memory delegation)"
            return cls(None, 0, f"{why}: guests run without cgroups")
        parent = os.path.join(root, name)
        try:
            os.mkdir(parent)
        except OSError as e:
            return cls(
                None,
                version,
                f"cannot create cgroups under {root} ({e.strerror}): guests run without cgroups",
            )
        if version == 2:
            try:  # children get the memory controller
                Path(parent, "cgroup.subtree_control").write_text("+memory")
            except OSError as e:
                os.rmdir(parent)
                return cls(
                    None,
                    version,
                    f"cannot enable memory in {parent} ({e.strerror}): guests run without cgroups",
                )
        return cls(
            parent, version, f"cgroup v{version}: a child memory cgroup per guest in {parent}"
        )

    def create(self, name: str, limit: int = 0) -> str | None:
        """A new child group for one guest (None without cgroups), limited to ``limit``
        bytes if not 0 (v1 ``memory.limit_in_bytes``; v2 ``memory.high``, which
        throttles and reclaims instead of OOM-killing)."""
        if self.parent is None:
            return None
        path = os.path.join(self.parent, name)
        os.mkdir(path)
        self.created += 1
        self.live.add(path)
        if limit:
            name = "memory.limit_in_bytes" if self.version == 1 else "memory.high"
            Path(path, name).write_text(str(limit))
        return path

    async def remove(self, path: str) -> bool:
        """Kill what is left in the group, then rmdir it, retrying for up to 2 s while
        its last task finishes exiting. False (and the group noted) if it stays."""
        for _ in range(100):
            with contextlib.suppress(OSError, ValueError):
                for pid in _read(Path(path, "cgroup.procs")).split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                await asyncio.sleep(0.02)
        else:
            self.leftover.append(path)
            print(f"note: could not remove cgroup {path}", file=sys.stderr)
            return False
        self.live.discard(path)
        return True

    async def close(self) -> bool:
        """Remove every group still there, then the supervisor's own; True if all went."""
        if self.parent is None:
            return True
        for path in sorted(self.live):
            await self.remove(path)
        self.live.add(self.parent)
        return await self.remove(self.parent) and not self.leftover


def oom_kills(path: str) -> int:
    """Tasks of the cgroup the kernel OOM-killed at its limit (v1 ``memory.oom_control``,
    v2 ``memory.events``: the ``oom_kill`` line)."""
    for name in ("memory.oom_control", "memory.events"):
        for line in _read(Path(path, name)).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    return 0


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def cgroup_memory(path: str) -> int:
    """Bytes charged to the cgroup now (v1 ``memory.usage_in_bytes``, v2 ``memory.current``)."""
    for name in ("memory.usage_in_bytes", "memory.current"):
        with contextlib.suppress(OSError, ValueError):
            return int(Path(path, name).read_text())
    return 0


# ------------------------------------------------------------------ sandboxes


@dataclass(eq=False)
class Sandbox:
    """One guest process and its own MemoryFile."""

    name: str
    memcg_id: int
    mf: MemoryFile
    session: GuestSession
    cgroup: str | None = None
    proc: asyncio.subprocess.Process | None = None
    serving: asyncio.Task[None] | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    rc: int | None = None
    killed: str = ""  # why the supervisor killed the guest ("" if it exited by itself)
    oom_killed: bool = False  # the kernel killed it at its cgroup's limit
    counted: bool = False  # in the Totals already

    @property
    def pid(self) -> int:
        return 0 if self.proc is None else self.proc.pid

    def req_per_s(self) -> float:
        age = (self.ended or time.monotonic()) - self.started
        return self.session.requests / age if age > 0 else 0.0

    async def start(self, *guest_args: str, fault_mode: FaultMode | None = None) -> None:
        """Start the guest in the sandbox's cgroup and serve it (a fork+exec); with
        ``fault_mode``, its faults on pages not loaded yet too (see ``start_guest``)."""
        self.proc, self.serving = await start_guest(
            self.mf,
            self.session,
            *guest_args,
            cgroup=self.cgroup,
            stdout=asyncio.subprocess.PIPE,
            fault_mode=fault_mode,
        )
        self.started = time.monotonic()

    async def run(self, seconds: float) -> None:
        """Wait for the guest to exit, then read its counts. A guest still there
        ``seconds`` (plus a grace period) from now is killed."""
        assert self.proc is not None and self.proc.stdout is not None
        try:
            async with asyncio.timeout(seconds + GUEST_GRACE):
                out = await self.proc.stdout.read()
                await self.proc.wait()
        except TimeoutError:
            await self.end("did not exit in time")
            return
        await self.end()
        with contextlib.suppress(ValueError, IndexError):
            self.counts = json.loads(out.splitlines()[-1])

    async def end(self, why: str = "") -> None:
        """Make sure the guest is gone (SIGKILL, which ends a stopped one too) and its
        session has freed every page it held. Idempotent."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            self.killed = self.killed or why or "ended by the supervisor"
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        if proc is not None:
            self.rc = await proc.wait()
            if self.rc == -signal.SIGKILL and not self.killed and self.cgroup is not None:
                self.oom_killed = oom_kills(self.cgroup) > 0
        if self.session.faults is not None:
            self.session.faults.close()  # the guest is gone: nothing left to serve
        if self.serving is not None:
            # The guest is gone: its socket's end is closed, so serve() returns.
            await self.serving
        if self.ended is None:
            self.ended = time.monotonic()


@dataclass
class Totals:
    """Figures over the whole run (sandboxes that exited included)."""

    sandboxes: int = 0
    requests: int = 0
    verified_bytes: int = 0
    bad_bytes: int = 0
    guest_errors: int = 0  # errors guests saw or exit statuses other than 0
    killed: int = 0  # guests the supervisor killed (the checkpointed one on purpose)
    oom_killed: int = 0  # guests the kernel killed at their cgroup's limit (--guest-limit)
    evicted_bytes: int = 0
    allocations: int = 0
    allocated_bytes: int = 0
    released_bytes: int = 0
    release_steps: int = 0
    evictions_started: int = 0
    evict_calls: int = 0
    evict_failures: int = 0
    pressure_events: int = 0
    usage_scans: int = 0
    leftover: int = 0  # used + waste + host bytes of closed files (must stay 0)
    pressure: int = 0  # times host usage went over the budget
    checkpoint: str = "not run"
    checkpoint_ok: bool = False
    lag_now: float = 0.0
    lag_max: float = 0.0
    lags: list[float] = field(default_factory=list)

    def lag_percentile(self, q: float) -> float:
        ordered = sorted(self.lags) or [0.0]
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def add(self, sb: Sandbox, killed_on_purpose: bool = False) -> None:
        """Count a finished sandbox (its file still open, every page back)."""
        sb.counted = True
        self.sandboxes += 1
        self.requests += sb.session.requests
        self.verified_bytes += sb.counts.get("verified_bytes", 0)
        self.bad_bytes += sb.counts.get("bad_bytes", 0)
        failed = sb.rc != 0 or sb.session.errors > 0 or bool(sb.killed)
        expected = killed_on_purpose or sb.oom_killed  # a limit the user set is no error
        self.guest_errors += sb.counts.get("errors", 0) + (failed and not expected)
        self.killed += bool(sb.killed)
        self.oom_killed += sb.oom_killed
        self.evicted_bytes += sb.session.evicted_bytes
        c = sb.mf.counters()
        self.allocations += c.allocations
        self.allocated_bytes += c.allocated_bytes
        self.released_bytes += c.released_bytes
        self.release_steps += c.release_steps
        self.evictions_started += c.evictions_started
        self.evict_calls += c.evict_calls
        self.evict_failures += c.evict_failures
        self.pressure_events += c.pressure_events
        self.usage_scans += c.usage_scans
        s = sb.mf.stats()
        self.leftover += s.used_bytes + s.waste_bytes + sb.mf.total_usage()


@dataclass
class Supervisor:
    """Runs the sandboxes, applies the budget, measures loop lag, draws the view."""

    args: argparse.Namespace
    rng: random.Random
    accounting: MemoryAccounting
    cgroups: Cgroups
    slots: list[Sandbox | None] = field(default_factory=list)
    totals: Totals = field(default_factory=Totals)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    next_memcg: int = 1
    t0: float = field(default_factory=time.monotonic)

    def opts(self, cgroup: str | None) -> MemoryFileOpts:
        if cgroup is None:
            # Cached memory is kept until the supervisor says otherwise (the budget).
            pressure: dict[str, Any] = {"delayed_eviction": DelayedEviction.MANUAL}
        else:
            # ... or until the kernel reports memory pressure in the guest's cgroup.
            pressure = {
                "delayed_eviction": DelayedEviction.ENABLED,
                "use_host_memcg_pressure": True,
                "memcg_path": cgroup,
            }
        return MemoryFileOpts(
            accounting=self.accounting,  # the host's view of every sandbox
            # Accounting by memcg stays fresh without anyone polling update_usage.
            usage_refresh_interval=USAGE_REFRESH,
            **pressure,
        )

    def files(self) -> list[MemoryFile]:
        return [sb.mf for sb in self.slots if sb is not None and not sb.mf.closed]

    @contextlib.asynccontextmanager
    async def sandbox(
        self,
        slot: int | None = None,
        *,
        memcg_id: int | None = None,
        load: str | None = None,
        killed_on_purpose: bool = False,
    ) -> AsyncIterator[Sandbox]:
        """A sandbox: its cgroup, its file (a new memfd, or the checkpoint ``load``
        loaded with ``async_pages``), its session; shown in ``slot``. On the way out,
        however it goes (an error, a cancellation), the guest is ended, every page it
        held is back, the sandbox counted, the file closed and the cgroup removed."""
        if memcg_id is None:
            memcg_id, self.next_memcg = self.next_memcg, self.next_memcg + 1
        name = f"sb-{memcg_id}" + ("r" if load else "")
        # The checkpoint's guests get no limit: the step must not depend on the OOM killer.
        limit = 0 if killed_on_purpose or load else self.args.guest_limit * MiB
        cgroup = self.cgroups.create(name, limit)
        try:
            opts = self.opts(cgroup)
            if load is None:
                mf = await MemoryFile.open(opts=opts)
            else:
                mf = await MemoryFile.load(load, opts, async_pages=True)
            async with mf:
                sb = Sandbox(name, memcg_id, mf, GuestSession(mf, memcg_id=memcg_id), cgroup)
                if slot is not None:
                    self.slots[slot] = sb
                try:
                    yield sb
                finally:
                    await sb.end("ended by the supervisor")
                    await mf.wait_for_evictions()
                    await mf.wait_released()
                    mf.check_invariants()
                    self.totals.add(sb, killed_on_purpose)
        finally:
            if cgroup is not None:
                await self.cgroups.remove(cgroup)

    async def run_slot(self, slot: int) -> None:
        """Run sandboxes in this slot one after another until the supervisor stops."""
        while not self.stop.is_set():
            lifetime = self.rng.uniform(1.5, 4.0)
            left = self.args.duration - (time.monotonic() - self.t0)
            seconds = max(0.2, min(lifetime, left))
            async with self.sandbox(slot) as sb:
                await sb.start("--seconds", f"{seconds:.2f}", "--seed", str(sb.memcg_id))
                await sb.run(seconds)

    async def checkpoint(self, live: bool) -> None:
        """Stop a guest, save its file, end it, load the checkpoint (async pages) into a
        new file, start a new guest on it and have it verify every range it had."""
        pages = self.args.checkpoint_mib * MiB // PAGE_SIZE
        with tempfile.TemporaryDirectory(prefix="asyncpgalloc-ckpt-") as tmp:
            path = str(Path(tmp) / "guest.ckpt")
            async with self.sandbox(killed_on_purpose=True) as sb:
                await sb.start("--keep", str(pages))
                assert sb.proc is not None and sb.proc.stdout is not None
                line = await sb.proc.stdout.readline()
                ranges = json.loads(line)["ranges"] if line else []
                sb.proc.send_signal(signal.SIGSTOP)
                # The supervisor holds the stopped guest's pages now: nothing it does
                # (or a kill) frees them under the save.
                held = sb.session.detach()
                await sb.mf.wait_for_evictions()
                t = time.perf_counter()
                await sb.mf.save(path)
                saved = time.perf_counter() - t
                for fr, _kind in held:
                    sb.mf.dec_ref(fr)
                await sb.end("checkpointed")
                stopped_pid = sb.pid
            t = time.perf_counter()
            async with self.sandbox(memcg_id=sb.memcg_id, load=path) as rsb:
                returned = time.perf_counter() - t
                # The restored file holds the old guest's ranges: the new guest owns them.
                kinds = {fr.start: kind for fr, kind in held}
                rsb.session.adopt([(FileRange(o, o + n), kinds[o]) for o, n, _t in ranges])
                await rsb.start(
                    *(f"--verify={o}:{n}:{tok}" for o, n, tok in ranges),
                    fault_mode=fault_mode_here(),
                )
                loading = asyncio.create_task(rsb.mf.wait_loaded())
                await show_load(rsb.mf, loading, live)
                all_in = time.perf_counter() - t
                progress = rsb.mf.load_progress()
                await loading
                await rsb.run(30.0)
        total = sum(n for _o, n, _t in ranges)
        faults = rsb.session.faults
        faulted = (
            f"its pages came in {rsb.session.fault_mode} mode"
            if faults is None
            else f"{faults.stats().faults} faults served through its userfaultfd"
            + (f" ({faults.stats().failure})" if faults.stats().failure else "")
        )
        good = (
            rsb.rc == 0
            and bool(ranges)
            and rsb.counts.get("verified_bytes") == total
            and progress is not None
            and progress.error is None
        )
        self.totals.checkpoint_ok = good
        self.totals.checkpoint = (
            f"{fmt(total)} in {len(ranges)} ranges of stopped pid {stopped_pid} saved in "
            f"{saved * 1e3:.0f} ms; load(async_pages=True) returned in {returned * 1e3:.0f} ms, "
            f"every page in after {all_in * 1e3:.0f} ms; verified by pid {rsb.pid}: "
            f"{'ok' if good else 'FAILED'}; {faulted}"
        )

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
                    "-" if sb.cgroup is None else os.path.basename(sb.cgroup),
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
        live_requests = sum(
            sb.session.requests for sb in self.slots if sb is not None and not sb.counted
        )
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
            working_set_phrase(stats),
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


def working_set_phrase(stats: list[MemoryFileStats]) -> str:
    """The files' working-set orders as a phrase: their size (of it, how much the
    restore prefetched first) and the hit rate of guests' faults."""
    hits = sum(s.working_set_hits for s in stats)
    misses = sum(s.working_set_misses for s in stats)
    rate = f"{hits / (hits + misses):.0%}" if hits + misses else "-"
    return (
        f"working set {fmt(sum(s.working_set_entries for s in stats) * WORKING_SET_GRANULE)} "
        f"({fmt(sum(s.working_set_inherited for s in stats) * WORKING_SET_GRANULE)} "
        "prefetched first), "
        f"fault hit rate {rate} ({hits} hits, {misses} misses)"
    )


async def show_load(mf: MemoryFile, loading: asyncio.Task[None], live: bool) -> None:
    """Show how far ``mf``'s async page load has got until ``loading`` ends: a rich
    progress bar on a terminal, a line every :data:`PROGRESS_REFRESH` s otherwise."""
    first = mf.load_progress()
    if first is None:
        return

    def line() -> str:
        p = mf.load_progress()
        assert p is not None
        return (
            f"restore: {fmt(p.loaded_bytes)} of {fmt(p.total_bytes)} loaded "
            f"({fmt(p.dropped_bytes)} dropped, {p.waiters} waiting) after "
            f"{p.elapsed_seconds * 1e3:.0f} ms; {working_set_phrase([mf.stats()])}"
            + (" - done" if p.done else "")
        )

    if not live:
        while not loading.done():
            print(line(), flush=True)
            await asyncio.wait([loading], timeout=PROGRESS_REFRESH)
        print(line(), flush=True)
        return
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    with Progress(
        *Progress.get_default_columns(), DownloadColumn(binary_units=True), TransferSpeedColumn()
    ) as bar:
        task = bar.add_task("restoring the guest's pages", total=first.total_bytes)
        while True:
            p = mf.load_progress()
            assert p is not None
            bar.update(task, completed=p.loaded_bytes + p.dropped_bytes)
            if loading.done():
                break
            await asyncio.wait([loading], timeout=PROGRESS_REFRESH)


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


async def supervise(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    accounting = MemoryAccounting()
    # uvloop opens /dev/null at its first subprocess and keeps it: not a leak of ours.
    warm = await asyncio.create_subprocess_exec("true", stdout=asyncio.subprocess.PIPE)
    await warm.communicate()
    fds_before = open_fds()
    cgroups = Cgroups.detect(f"asyncpgalloc-supervisor-{os.getpid()}")
    started = time.monotonic()
    print(
        f"running {args.sandboxes} guest processes for {args.duration:g} s, one memfd each "
        f"(budget {args.budget} MiB, seed {args.seed}); {cgroups.note}",
        flush=True,
    )
    sup = Supervisor(args, rng, accounting, cgroups, slots=[None] * args.sandboxes)
    live = args.view == "live"
    view = asyncio.create_task(sup.show(live))
    background = [asyncio.create_task(sup.watch_budget()), asyncio.create_task(sup.tick()), view]
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
        view.cancel()  # the last frame stays on screen; the load's progress comes next
        with contextlib.suppress(asyncio.CancelledError):
            await view
        await sup.checkpoint(live)
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        cgroups_gone = await cgroups.close()
    t = sup.totals
    accounted = accounting.total()
    leaked = {fd: _readlink(fd) for fd in open_fds() - fds_before}
    ok = (
        t.leftover == 0
        and accounted == 0
        and t.bad_bytes == 0
        and t.guest_errors == 0
        and t.checkpoint_ok
        and cgroups_gone
        and not leaked
    )
    cg = (
        "no cgroups"
        if cgroups.parent is None
        else f"{cgroups.created} cgroups created, "
        + ("all removed" if cgroups_gone else f"NOT removed: {cgroups.leftover}")
    )
    print(
        "\n".join(
            [
                "",
                f"summary: {t.sandboxes} guest processes in {args.sandboxes} slots over "
                f"{time.monotonic() - started:.1f} s (seed {args.seed})",
                f"  {t.requests} requests; {t.allocations} allocations, "
                f"{fmt(t.allocated_bytes)} allocated; {fmt(t.verified_bytes)} verified by "
                f"guests, {t.bad_bytes} bad bytes, {t.guest_errors} guest errors, "
                f"{t.killed} killed by the supervisor"
                + (f", {t.oom_killed} OOM-killed at their cgroup's limit" if t.oom_killed else ""),
                f"  released {fmt(t.released_bytes)} in {t.release_steps} steps; "
                f"{t.usage_scans} usage scans",
                f"  budget {args.budget} MiB gone over {times(t.pressure)}, "
                f"memory-cgroup pressure events {t.pressure_events}: "
                f"{t.evictions_started} evictions, {t.evict_calls} evict calls, "
                f"{t.evict_failures} failures, {fmt(t.evicted_bytes)} evicted from guests",
                f"  checkpoint: {t.checkpoint}",
                f"  event-loop lag: median {t.lag_percentile(0.5) * 1e3:.1f} ms, "
                f"p99 {t.lag_percentile(0.99) * 1e3:.1f} ms, max {t.lag_max * 1e3:.1f} ms",
                f"  at the end: used + waste + host usage {t.leftover} B over every file, "
                f"accounted {accounted} B; invariants hold; {cg}; "
                + (f"fds leaked: {leaked}" if leaked else "no fd leaked"),
                f"all pages returned: {ok}",
            ]
        )
    )
    return 0 if ok else 1


def _readlink(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


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
    p.add_argument(
        "--guest-limit",
        type=int,
        default=0,
        metavar="MiB",
        help="limit each guest's cgroup to this much memory (default 0: no limit); past "
        "it the kernel reports pressure and the supervisor evicts that guest's caches",
    )
    p.add_argument(
        "--checkpoint-mib",
        type=positive(int),
        default=32,
        help="MiB the checkpointed guest fills (default 32)",
    )
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
