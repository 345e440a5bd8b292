"""Fault service benchmarks: real guests faulting in a restored file through a userfaultfd.

Fault phases: per repetition a checkpoint (``--data-mib`` MiB committed and filled,
saved in 4 KiB blocks so that one fault reads exactly its page, plus a ``--hole-mib``
MiB range never committed) is loaded with ``async_pages=True`` and a real guest process
(``examples/sandbox_guest.py``'s uffd attach) is handed the memfd at once. The guest
times, in itself, each touch of a page through its registered mapping (touch to
resumed):

- ``hole``: pages of the never-committed range (loader held): ``UFFDIO_ZEROPAGE`` at
  once, the pure round trip guest -> loop -> guest;
- ``copy``: every other page of the data's upper half, from the end (loader held, so
  every touch is a fault): the page's 4 KiB block read with its CRC, checked and
  ``UFFDIO_COPY``-ed on the loop;
- ``load``: one page in 16 of the data, from the end, with the loader running, each
  touched only if ``mincore`` says it is not in yet;
- ``copy2m``: a checkpoint of ``--data-2m-mib`` MiB in 1 MiB blocks, the server's
  ``ahead`` window 2 MiB: one touch per 2 MiB of the upper half, each copying its
  window's two blocks in the fault thread; against the guest's raw ``pread`` of 2 MiB of
  the checkpoint (page cache) and the hole round trip of the same run: target p50 <= 2 x
  pread + round trip.

For the 4 KiB phases the raw ``pread`` of 4 KiB in the same guest and run is given too.
Figures: per repetition the p50 and p99 (µs), then medians over ``--reps``.

``restore``: a guest started and waiting on its socket (``spawn_guest``); from
``MemoryFile.load`` called (a checkpoint of ``--restore-mib`` MiB committed, 1 MiB
blocks) to the guest reading its first byte (the middle of the data: a fault copy) (ms,
both processes' ``CLOCK_MONOTONIC``). ``lag``: run.py's 1 ms ticker on the supervisor's
loop from ``load`` until ``--guests`` guests (started beforehand) have each touched every
one of its own ``--lag-pages`` pages (from the end; each checked to be the checkpoint's
byte) with the loader held, so that every touch is a fault served on the loop by
``UFFDIO_COPY`` of its 4 KiB block (a ``--lag-data-mib`` MiB checkpoint, the slices in
its upper half): lag p50/p99/max (ms) beside the idle loop's in the same repetition (0.5
s before ``load``, the guests waiting), the fault count and faults/s (guest clocks, first
touch to last).

One JSON object per figure (``run.py``'s format; ``--json`` writes them all to a file),
then a table.

Run: python benchmarks/bench_uffd.py [--reps 5] [--loop uvloop|asyncio|both]
     [--data-mib 256] [--hole-mib 48] [--data-2m-mib 1024] [--restore-mib 1024]
     [--guests 32] [--lag-pages 512] [--lag-data-mib 160] [--only faults restore lag]
     [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import guest_protocol as gp
from run import Result, Ticker, table

import asyncpgalloc.checkpoint_format as cf
import asyncpgalloc.loader as loader_mod
from asyncpgalloc import (
    PAGE_SIZE,
    AccessType,
    AllocationMode,
    AllocOpts,
    DelayedEviction,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
)
from asyncpgalloc.uffd import FaultMode

MiB = 1 << 20
OPTS = MemoryFileOpts(delayed_eviction=DelayedEviction.MANUAL)

# The guest, run by start_guest as ``GUEST --sock FD EXAMPLES CKPT D_OFF D_LEN H_OFF H_LEN
# DATA_AT PHASE``: the examples directory, the checkpoint, the data and hole ranges, where
# the checkpoint's page data begins, and what to touch ("hole", "copy", "load", "copy2m",
# or "lag": every page of the data range, with no ``pread`` timed after).
GUEST = r"""
import ctypes, json, os, random, socket, sys, time
sys.path.insert(0, sys.argv[3])
from guest_protocol import GuestChannel
from sandbox_guest import Guest
ckpt = sys.argv[4]
d_off, d_len, h_off, h_len, data_at = map(int, sys.argv[5:10])
phase = sys.argv[10]
stride, raw_size = int(sys.argv[11]), int(sys.argv[12])
ch = GuestChannel(socket.socket(fileno=int(sys.argv[2])))
hello, memfd = ch.hello()
g = Guest(ch, memfd, random.Random(0))
mode = g.attach_uffd()
w = g.window
libc = ctypes.CDLL(None, use_errno=True)
base = ctypes.addressof(ctypes.c_char.from_buffer(w))
vec = (ctypes.c_ubyte * 1)()
P = 4096
clock = time.perf_counter_ns

def p(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] / 1000 if xs else None

hole = []
for off in range(h_off, h_off + h_len if phase == "hole" else h_off, P):
    t = clock(); w[off]; hole.append(clock() - t)
load = []
win = []
bad = 0
# With the loader held, its first jobs (the start of the data) never finish: the upper half.
low = d_off + d_len // 2 if phase in ("copy", "copy2m") else d_off
t_first = time.monotonic_ns()
for off in range(d_off + d_len - stride, low - 1 if phase != "hole" else d_off + d_len, -stride):
    libc.mincore(ctypes.c_void_p(base + off), P, vec)
    if vec[0] & 1:
        continue  # the loader (or the window of an earlier copy) got there first
    t = clock(); byte = w[off]; load.append(clock() - t)
    bad += byte != 0x5a
    if phase == "copy2m":  # the whole window: every page of it read once
        for page in range(off + P, off + stride, P):
            w[page]
        win.append(clock() - t)
t_last = time.monotonic_ns()
fd = os.open(ckpt, os.O_RDONLY)
buf = bytearray(raw_size)
span = max(1, min(4096, (os.fstat(fd).st_size - data_at) // raw_size))
pread = []
for i in range(0 if phase == "lag" else min(len(hole) + len(load), 20000) or 1):
    t = clock(); os.preadv(fd, [buf], data_at + (i % span) * raw_size); pread.append(clock() - t)
print(json.dumps({"mode": mode, **{f"{k}_{q}": p(v, x) for k, v in
    (("hole", hole), ("load", load), ("win", win), ("pread", pread))
    for q, x in (("p50", .5), ("p99", .99))}, "win_n": len(win),
    "hole_n": len(hole), "load_n": len(load), "t_first": t_first, "t_last": t_last, "bad": bad}),
    flush=True)
g.request("bye")
"""

#: A guest started before the restore (``spawn_guest``): says "ready" once imported,
#: waits for its hello, attaches its uffd, reads one byte at ``TOUCH`` and prints when
#: (``time.monotonic_ns``, the supervisor's clock too).
RESTORE_GUEST = r"""
import json, random, socket, sys, time
sys.path.insert(0, sys.argv[3])
from guest_protocol import GuestChannel
from sandbox_guest import Guest
touch = int(sys.argv[4])
print("ready", flush=True)
ch = GuestChannel(socket.socket(fileno=int(sys.argv[2])))
hello, memfd = ch.hello()
t_hello = time.monotonic_ns()
g = Guest(ch, memfd, random.Random(0))
mode = g.attach_uffd()
t_attached = time.monotonic_ns()
byte = g.window[touch]
t = time.monotonic_ns()
print(json.dumps({"mode": mode, "t_hello": t_hello, "t_attached": t_attached, "t_byte": t,
    "byte": byte}), flush=True)
g.request("bye")
"""


def data_offset(path: Path) -> int:
    """Where the checkpoint's page data begins. One 512-byte read (page cache)."""
    with path.open("rb") as f:
        return cf.Header.unpack(f.read(512)).data_offset


async def make_checkpoint(
    path: Path, data_mib: int, hole_mib: int, block_size: int = PAGE_SIZE
) -> tuple[FileRange, FileRange]:
    """A checkpoint of ``data_mib`` MiB committed and filled (0x5a) in ``block_size``
    blocks, then ``hole_mib`` MiB never committed."""
    saved = cf.BLOCK_SIZE
    cf.BLOCK_SIZE = block_size
    try:
        async with MemoryFile.open(opts=OPTS) as mf:
            data = mf.allocate(data_mib * MiB, AllocOpts(mode=AllocationMode.COMMIT))
            for v in mf.map_internal(data, AccessType.WRITE):
                v[:] = b"\x5a" * len(v)
            hole = mf.allocate(max(1, hole_mib) * MiB)
            await mf.save(path)
    finally:
        cf.BLOCK_SIZE = saved
    return data, hole


class HeldLoader:
    """Holds the loader's reads back (the real job, started only once released), so
    that the file stays loading and the guest's range registered while it touches holes."""

    def __init__(self) -> None:
        self.job = loader_mod._read_blocks_job
        self.release = threading.Event()

    def __call__(self, *args: Any) -> None:
        self.release.wait()
        self.job(*args)

    def __enter__(self) -> HeldLoader:
        loader_mod._read_blocks_job = self  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        loader_mod._read_blocks_job = self.job


@dataclass(frozen=True)
class Phase:
    """What a fault phase's guest touches: ``kind`` "hole" or data; one page every
    ``stride`` bytes, from the end; the raw ``pread`` of ``raw`` bytes timed beside it;
    the server's ``ahead`` window; whether the loader is held (faults only)."""

    kind: str
    stride: int
    raw: int
    ahead: int
    held: bool


PHASES = {
    "hole": Phase("hole", PAGE_SIZE, PAGE_SIZE, 0, True),
    "copy": Phase("copy", 2 * PAGE_SIZE, PAGE_SIZE, 0, True),
    "load": Phase("load", 16 * PAGE_SIZE, PAGE_SIZE, 0, False),
    "copy2m": Phase("copy2m", 2 * MiB, 2 * MiB, 2 * MiB, True),
}


async def one_rep(path: Path, data: FileRange, hole: FileRange, phase: Phase) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        held = stack.enter_context(HeldLoader()) if phase.held else None
        return await _rep(path, data, hole, phase, held)


async def _rep(
    path: Path, data: FileRange, hole: FileRange, phase: Phase, held: HeldLoader | None
) -> dict[str, Any]:
    async with await MemoryFile.load(path, OPTS, async_pages=True) as mf:
        session = gp.GuestSession(mf)
        session.adopt([(data, "anon"), (hole, "anon")])
        proc, task = await gp.start_guest(
            mf,
            session,
            str(Path(gp.__file__).parent),
            str(path),
            str(data.start),
            str(data.length),
            str(hole.start),
            str(hole.length),
            str(data_offset(path)),
            phase.kind,
            str(phase.stride),
            str(phase.raw),
            fault_mode=FaultMode.UFFD,
            fault_ahead=phase.ahead,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        out = json.loads(await proc.stdout.readline())
        await proc.wait()
        await task
        if held is not None:
            held.release.set()  # before the file's aclose, which waits for its reads
        assert session.faults is not None
        st = session.faults.stats()
        out.update(
            served=st.faults,
            zeroed=st.zeroed,
            waited=st.waited,
            copied=st.copied,
            failure=st.failure,
        )
    return out


def _q(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def restore_rep(path: Path, data: FileRange, hole: FileRange) -> dict[str, float]:
    """A guest started and waiting on its socket; then ``load`` is called: ms from that
    call to the guest reading its first byte (the middle of the data, not the loader's
    front), with the load running as ever."""
    touch = data.start + data.length // 2
    proc, ours = await gp.spawn_guest(
        str(Path(gp.__file__).parent), str(touch), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    assert (await proc.stdout.readline()).strip() == b"ready"
    await asyncio.sleep(0.05)  # in its recv by now
    t0 = time.monotonic_ns()
    mf = await MemoryFile.load(path, OPTS, async_pages=True)
    try:
        t_loaded = time.monotonic_ns()
        session = gp.GuestSession(mf)
        session.adopt([(data, "anon"), (hole, "anon")])
        task = await gp.hand_over(mf, session, proc, ours, fault_mode=FaultMode.UFFD)
        out = json.loads(await proc.stdout.readline())
        await proc.wait()
        await task
        assert out["byte"] == 0x5A and out["mode"] == "uffd", out
    finally:
        await mf.aclose()
    ms = 1e-6
    return {
        "first_byte": (out["t_byte"] - t0) * ms,
        "load_returned": (t_loaded - t0) * ms,
        "hello": (out["t_hello"] - t0) * ms,
        "attached": (out["t_attached"] - t0) * ms,
    }


def proc_stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command. One small read."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


async def settled(pid: int) -> None:
    """Until process ``pid`` sleeps with its CPU time unchanged for 0.1 s (done importing,
    blocked in its first read). A few /proc reads."""
    last = None
    while True:
        fields = proc_stat(pid)
        now = (fields[0], fields[11], fields[12])  # state, utime, stime
        if now == last and now[0] == "S":
            return
        last = now
        await asyncio.sleep(0.1)


async def lag_rep(path: Path, data: FileRange, guests: int, pages: int) -> dict[str, Any]:
    """Loop lag (a 1 ms ticker on the supervisor's loop) while ``guests`` guests, started
    beforehand, each touch every one of its own ``pages`` pages (a slice of the data's
    upper half, from the end) with the loader held: every touch is a fault served on
    this loop by ``UFFDIO_COPY`` of its 4 KiB block. The idle loop's lag is measured
    first, in the same repetition (0.5 s, the guests spawned and waiting)."""
    slice_len = pages * PAGE_SIZE
    low = data.start + data.length // 2
    assert low + guests * slice_len <= data.end, "--lag-data-mib too small for the guests"
    slices = [FileRange(low + k * slice_len, low + (k + 1) * slice_len) for k in range(guests)]
    at = str(data_offset(path))
    spawned = []
    for fr in slices:
        spawned.append(
            await gp.spawn_guest(
                str(Path(gp.__file__).parent),
                str(path),
                str(fr.start),
                str(fr.length),
                "0",
                "0",
                at,
                "lag",
                str(PAGE_SIZE),
                str(PAGE_SIZE),
                stdout=asyncio.subprocess.PIPE,
            )
        )
    for proc, _ours in spawned:
        await settled(proc.pid)  # all waiting for their hello
    async with Ticker() as idle:
        await asyncio.sleep(0.5)
    with HeldLoader() as held:
        async with Ticker() as ticker:
            mf = await MemoryFile.load(path, OPTS, async_pages=True)
            try:
                served = []
                for fr, (proc, ours) in zip(slices, spawned, strict=True):
                    session = gp.GuestSession(mf)
                    session.adopt([(fr, "anon")])
                    task = await gp.hand_over(mf, session, proc, ours, fault_mode=FaultMode.UFFD)
                    served.append((proc, task, session))
                outs = []
                for proc, task, _session in served:
                    assert proc.stdout is not None
                    outs.append(json.loads(await proc.stdout.readline()))
                    assert await proc.wait() == 0
                    await task
                held.release.set()  # before the file's aclose, which waits for its reads
                stats = [s.faults.stats() for _p, _t, s in served if s.faults is not None]
            finally:
                held.release.set()
                await mf.aclose()
    ms = 1e3
    span_ns = max(o["t_last"] for o in outs) - min(o["t_first"] for o in outs)
    faults = sum(st.faults for st in stats)
    return {
        "lag_p50": _q(ticker.lags, 0.5) * ms,
        "lag_p99": _q(ticker.lags, 0.99) * ms,
        "lag_max": max(ticker.lags) * ms,
        "ticks": len(ticker.lags),
        "idle_lag_p50": _q(idle.lags, 0.5) * ms,
        "idle_lag_p99": _q(idle.lags, 0.99) * ms,
        "idle_lag_max": max(idle.lags) * ms,
        "faults": faults,
        "touches": sum(o["load_n"] for o in outs),
        "bad": sum(o["bad"] for o in outs),
        "copied": sum(st.copied for st in stats),
        "waited": sum(st.waited for st in stats),
        "failures": sum(bool(st.failure) for st in stats),
        # Guest clocks (CLOCK_MONOTONIC): first guest's first touch to last guest's last.
        "fault_span_ms": span_ns / 1e6,
        "faults_per_s": faults / (span_ns / 1e9),
        # How long all guests were faulting at once: last first touch to first last touch.
        "all_at_once_ms": max(0, min(o["t_last"] for o in outs) - max(o["t_first"] for o in outs))
        / 1e6,
        "fault_p50_us": statistics.median(o["load_p50"] for o in outs),
        "fault_p99_us": statistics.median(o["load_p99"] for o in outs),
    }


async def bench(args: argparse.Namespace, loop_name: str) -> list[Result]:
    out: list[Result] = []
    params = {"loop": loop_name}
    program = gp.GUEST_PROGRAM
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        try:
            if "faults" in args.only:
                out += await bench_faults(Path(d), args, params)
            if "restore" in args.only:
                gp.GUEST_PROGRAM = Path(d) / "restore_guest.py"
                gp.GUEST_PROGRAM.write_text(RESTORE_GUEST)
                out += await bench_restore(Path(d), args, params)
            if "lag" in args.only:
                out += await bench_lag(Path(d), args, params)
        finally:
            gp.GUEST_PROGRAM = program
    return out


async def bench_faults(d: Path, args: argparse.Namespace, params: dict[str, Any]) -> list[Result]:
    small, large = d / "small.ckpt", d / "large.ckpt"
    gp.GUEST_PROGRAM = d / "guest.py"  # start_guest runs this guest instead
    gp.GUEST_PROGRAM.write_text(GUEST)
    # One page per 4 KiB block (a fault loads exactly its page); 1 MiB blocks for 2 MiB.
    data, hole = await make_checkpoint(small, args.data_mib, args.hole_mib)
    data2, hole2 = await make_checkpoint(large, args.data_2m_mib, 0, cf.BLOCK_SIZE)
    await one_rep(small, data, hole, PHASES["copy"])  # warm-up: page cache, imports
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in PHASES}
    for _ in range(args.reps):
        for name, phase in PHASES.items():
            if name == "copy2m":
                runs[name].append(await one_rep(large, data2, hole2, phase))
            else:
                runs[name].append(await one_rep(small, data, hole, phase))
    out = []
    hole_p50 = statistics.median(r["hole_p50"] for r in runs["hole"])
    raw2m = statistics.median(r["pread_p50"] for r in runs["copy2m"])
    for name, what, kind, p50_limit in (
        ("hole", "zero-page fault", "hole", 100.0),
        ("copy", "fault copying its 4 KiB page (loader held)", "load", 100.0),
        ("load", "fault on a 4 KiB page, loader running", "load", 100.0),
        ("copy2m", "fault copying its 2 MiB window (loader held)", "load", None),
        ("copy2m", "2 MiB window, first touch to every page read", "win", 2 * raw2m + hole_p50),
    ):
        rs = runs[name]
        for q, limit in (("p50", p50_limit), ("p99", 1000.0 if name != "copy2m" else None)):
            samples = [r[f"{kind}_{q}"] for r in rs if r[f"{kind}_{q}"] is not None]
            if not samples:
                continue
            med = statistics.median(samples)
            out.append(
                Result(
                    f"uffd {what} {q} [{params['loop']}]",
                    "µs",
                    samples,
                    {
                        **params,
                        "faults_per_rep": min(r[f"{kind}_n"] for r in rs),
                        "block": "1 MiB" if name == "copy2m" else "4 KiB",
                    },
                    raw_samples=[r[f"pread_{q}"] for r in rs],
                    raw_what=f"pread {'2 MiB' if name == 'copy2m' else '4 KiB'} (page cache)",
                    target=None if limit is None else f"{q} <= {limit:g} µs",
                    target_met=None if limit is None else med <= limit,
                    extra={
                        "mode": rs[0]["mode"],
                        "served_by_uffd": min(r["served"] for r in rs),
                        "copied": min(r["copied"] for r in rs),
                    },
                )
            )
    return out


async def bench_restore(d: Path, args: argparse.Namespace, params: dict[str, Any]) -> list[Result]:
    path = d / "restore.ckpt"
    data, hole = await make_checkpoint(path, args.restore_mib, 0, cf.BLOCK_SIZE)
    await restore_rep(path, data, hole)  # warm-up
    reps = [await restore_rep(path, data, hole) for _ in range(args.reps)]
    p = {**params, "committed_mib": args.restore_mib}
    return [
        Result(
            f"restore: load() to the guest's first byte [{params['loop']}]",
            "ms",
            [r["first_byte"] for r in reps],
            p,
            target="<= 20 ms",
            target_met=statistics.median(r["first_byte"] for r in reps) <= 20,
            extra={
                k: round(statistics.median(r[k] for r in reps), 3)
                for k in ("load_returned", "hello", "attached")
            },
        )
    ]


async def bench_lag(d: Path, args: argparse.Namespace, params: dict[str, Any]) -> list[Result]:
    path = d / "lag.ckpt"
    gp.GUEST_PROGRAM = d / "guest.py"
    gp.GUEST_PROGRAM.write_text(GUEST)
    # 4 KiB blocks (a fault copies exactly its page); the guests' slices in the upper half.
    data, _hole = await make_checkpoint(path, args.lag_data_mib, 0)
    reps = [await lag_rep(path, data, args.guests, args.lag_pages) for _ in range(args.reps)]
    assert all(r["failures"] == r["bad"] == 0 and r["faults"] >= r["touches"] for r in reps), reps
    p = {**params, "guests": args.guests, "pages_each": args.lag_pages, "block": "4 KiB"}
    # Each figure's median over the repetitions (the lag rows' samples are per repetition).
    med = {f"median_{k}": round(statistics.median(r[k] for r in reps), 3) for k in reps[0]}
    return [
        Result(
            f"loop lag {q}, {args.guests} guests faulting (loader held) [{params['loop']}]",
            "ms",
            [r[f"lag_{q}"] for r in reps],
            p,
            raw_samples=[r[f"idle_lag_{q}"] for r in reps],
            raw_what=f"idle loop's lag {q}, same repetition",
            target="< 1 ms" if q == "p99" else None,
            target_met=statistics.median(r["lag_p99"] for r in reps) < 1 if q == "p99" else None,
            extra={"faults_per_rep": min(r["faults"] for r in reps), **med},
        )
        for q in ("p50", "p99", "max")
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--loop", choices=("uvloop", "asyncio", "both"), default="both")
    p.add_argument("--data-mib", type=int, default=256)
    p.add_argument("--hole-mib", type=int, default=48)
    p.add_argument("--data-2m-mib", type=int, default=1024)
    p.add_argument("--restore-mib", type=int, default=1024)
    p.add_argument("--guests", type=int, default=32)
    p.add_argument("--lag-pages", type=int, default=512, help="pages each lag guest touches")
    p.add_argument("--lag-data-mib", type=int, default=160)
    p.add_argument(
        "--only",
        nargs="+",
        choices=("faults", "restore", "lag"),
        default=("faults", "restore", "lag"),
        help="run only these scenarios",
    )
    p.add_argument("--tmp", default=None, help="directory for the checkpoints")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results: list[Result] = []
    loops = ("asyncio", "uvloop") if args.loop == "both" else (args.loop,)
    for name in loops:
        run = uvloop.run if name == "uvloop" else asyncio.run
        rs = run(bench(args, name))
        for r in rs:
            print(json.dumps(r.to_json()), flush=True)
        results += rs
    if args.json is not None:
        args.json.write_text(json.dumps([r.to_json() for r in results], indent=1) + "\n")
    print(table([r.to_json() for r in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
