"""Fault service benchmark: one 4 KiB userfaultfd fault of a real guest, touch to resumed.

Per repetition a checkpoint (``--data-mib`` MiB committed and filled, saved in 4 KiB
blocks so that one fault loads exactly one page, plus a ``--hole-mib`` MiB range never
committed) is loaded with ``async_pages=True`` and a real guest process
(``examples/sandbox_guest.py``'s uffd attach) is handed the memfd at once. The guest
times, in itself, each touch of a page through its registered mapping:

- ``hole``: pages of the never-committed range: every touch is a fault the supervisor
  resolves at once with ``UFFDIO_ZEROPAGE`` (the pure round trip guest -> loop -> guest);
- ``load``: one page in 16 of the data, from the end backwards (away from the loader's
  sequential front), each touched only if ``mincore`` says it is not in yet: the fault
  waits for its block (moved to the front of the loader's queue, read, CRC-checked),
  then ``UFFDIO_WAKE``;
- ``pread``: the raw ``pread`` of 4 KiB of the checkpoint (in the page cache), in the
  same guest and run: what reading the page costs by itself.

Figures: per repetition the p50 and p99 of each kind (µs, at least ``--faults`` faults
per kind and repetition where the sizes allow), then medians over ``--reps``. One JSON
object per figure (``run.py``'s format), then a table.

Run: python benchmarks/bench_uffd.py [--reps 5] [--loop uvloop|asyncio|both]
     [--data-mib 256] [--hole-mib 48]
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import guest_protocol as gp
from run import Result, table

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
# the checkpoint's page data begins, and what to touch ("hole" or "load").
GUEST = r"""
import ctypes, json, os, random, socket, sys, time
sys.path.insert(0, sys.argv[3])
from guest_protocol import GuestChannel
from sandbox_guest import Guest
ckpt = sys.argv[4]
d_off, d_len, h_off, h_len, data_at = map(int, sys.argv[5:10])
phase = sys.argv[10]
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
for off in range(d_off + d_len - P, d_off - 1 if phase == "load" else d_off + d_len, -16 * P):
    libc.mincore(ctypes.c_void_p(base + off), P, vec)
    if vec[0] & 1:
        continue  # the loader got there first
    t = clock(); w[off]; load.append(clock() - t)
fd = os.open(ckpt, os.O_RDONLY)
buf = bytearray(P)
pread = []
for i in range(len(hole) + len(load)):
    t = clock(); os.preadv(fd, [buf], data_at + (i % 4096) * P); pread.append(clock() - t)
print(json.dumps({"mode": mode, **{f"{k}_{q}": p(v, x) for k, v in
    (("hole", hole), ("load", load), ("pread", pread)) for q, x in (("p50", .5), ("p99", .99))},
    "hole_n": len(hole), "load_n": len(load)}), flush=True)
g.request("bye")
"""


def data_offset(path: Path) -> int:
    """Where the checkpoint's page data begins. One 512-byte read (page cache)."""
    with path.open("rb") as f:
        return cf.Header.unpack(f.read(512)).data_offset


async def make_checkpoint(path: Path, data_mib: int, hole_mib: int) -> tuple[FileRange, ...]:
    saved = cf.BLOCK_SIZE
    cf.BLOCK_SIZE = PAGE_SIZE  # one fault loads one page
    try:
        async with MemoryFile.open(opts=OPTS) as mf:
            data = mf.allocate(data_mib * MiB, AllocOpts(mode=AllocationMode.COMMIT))
            for v in mf.map_internal(data, AccessType.WRITE):
                v[:] = b"\x5a" * len(v)
            hole = mf.allocate(hole_mib * MiB)
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


async def one_rep(path: Path, data: FileRange, hole: FileRange, phase: str) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        held = stack.enter_context(HeldLoader()) if phase == "hole" else None
        return await _rep(path, data, hole, phase, held)


async def _rep(
    path: Path, data: FileRange, hole: FileRange, phase: str, held: HeldLoader | None
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
            phase,
            fault_mode=FaultMode.UFFD,
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
        out.update(served=st.faults, zeroed=st.zeroed, waited=st.waited, failure=st.failure)
    return out


async def bench(reps: int, data_mib: int, hole_mib: int, loop_name: str) -> list[Result]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.ckpt"
        gp.GUEST_PROGRAM = Path(d) / "guest.py"  # start_guest runs this guest instead
        gp.GUEST_PROGRAM.write_text(GUEST)
        data, hole = await make_checkpoint(path, data_mib, hole_mib)
        await one_rep(path, data, hole, "load")  # warm-up: page cache, imports
        runs: dict[str, list[dict[str, Any]]] = {"hole": [], "load": []}
        for _ in range(reps):
            for phase in ("hole", "load"):
                runs[phase].append(await one_rep(path, data, hole, phase))
    params = {"loop": loop_name, "data_mib": data_mib, "hole_mib": hole_mib}
    out = []
    for kind, what, target in (
        ("hole", "zero-page fault", 100.0),
        ("load", "fault loading its 4 KiB block", 100.0),
    ):
        for q, limit in (("p50", target), ("p99", 1000.0)):
            samples = [r[f"{kind}_{q}"] for r in runs[kind] if r[f"{kind}_{q}"] is not None]
            if not samples:
                continue
            med = statistics.median(samples)
            out.append(
                Result(
                    f"uffd {what} {q} [{loop_name}]",
                    "µs",
                    samples,
                    {**params, "faults_per_rep": min(r[f"{kind}_n"] for r in runs[kind])},
                    raw_samples=[r[f"pread_{q}"] for r in runs[kind]],
                    raw_what="pread 4 KiB (page cache)",
                    target=f"{q} <= {limit:g} µs",
                    target_met=med <= limit,
                    extra={
                        "mode": runs[kind][0]["mode"],
                        "served_by_uffd": min(r["served"] for r in runs[kind]),
                    },
                )
            )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--loop", choices=("uvloop", "asyncio", "both"), default="both")
    p.add_argument("--data-mib", type=int, default=256)
    p.add_argument("--hole-mib", type=int, default=48)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results: list[Result] = []
    loops = ("asyncio", "uvloop") if args.loop == "both" else (args.loop,)
    for name in loops:
        run = uvloop.run if name == "uvloop" else asyncio.run
        rs = run(bench(args.reps, args.data_mib, args.hole_mib, name))
        for r in rs:
            print(json.dumps(r.to_json()), flush=True)
        results += rs
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
