"""Working-set benchmark: the faults a restored guest takes with the recorded order vs. without.

Per repetition: a checkpoint of ``--data-mib`` MiB committed and filled is loaded with
``async_pages=True`` and a real guest process (``examples/sandbox_guest.py
--touches``) is handed the memfd at once; it replays the touches of "its first second
after a restore": ``--ranges`` 1 MiB ranges picked at random across the data (seeded
per repetition), one every ``1 / ranges`` s, each read at ``--pages`` pages. Every
touch of a page not loaded yet is a userfaultfd fault served by the file's
FaultServer (its block goes first in the loader's queue).

- ``without``: the checkpoint has no working-set order; the loader reads in file order
  and the guest faults wherever it gets ahead of it. The faults recorded make the file's
  working-set order, which a save writes into a new checkpoint.
- ``with``: that checkpoint is loaded the same way and the same guest replays the same
  touches; the loader reads the recorded ranges first, then the rest in file order.

Figures, medians over ``--reps``: the faults the guest took in each run (served by the
FaultServer), their ratio (target: ``with`` at most 10% of ``without``), and the
order's hits and misses in each run (faults on blocks already being read or loaded,
faults on blocks still queued). One JSON object per figure (``run.py``'s
format), then a table.

Run: python benchmarks/bench_working_set.py [--reps 5] [--loop uvloop|asyncio|both]
     [--data-mib 1024] [--ranges 128] [--pages 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import guest_protocol as gp
from run import Result, table

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


async def make_checkpoint(path: Path, data_mib: int) -> FileRange:
    """``data_mib`` MiB committed, each page holding a byte of its own."""
    async with MemoryFile.open(opts=OPTS) as mf:
        data = mf.allocate(data_mib * MiB, AllocOpts(mode=AllocationMode.COMMIT))
        for v in mf.map_internal(data, AccessType.WRITE):
            v[:] = b"\x5a" * len(v)
        await mf.save(path)
    return data


def touches(data: FileRange, ranges: int, pages: int, seed: int) -> list[list[float]]:
    """``ranges`` distinct 1 MiB ranges of ``data`` in random order, one every
    1/ranges s, each read at ``pages`` pages spread over it."""
    rng = random.Random(seed)
    picked = rng.sample(range(data.length // MiB), ranges)
    stride = max(1, MiB // PAGE_SIZE // pages) * PAGE_SIZE
    out: list[list[float]] = []
    for i, r in enumerate(picked):
        base = data.start + r * MiB
        at = i / ranges
        out += [[base + k * stride, PAGE_SIZE, at] for k in range(pages)]
    return out


async def run_once(src: Path, data: FileRange, spec: Path, save_to: Path | None) -> dict[str, Any]:
    """Restore ``src``, let a guest replay ``spec``; save to ``save_to`` if given. The
    faults it took and the file's working-set figures."""
    async with await MemoryFile.load(src, OPTS, async_pages=True) as mf:
        mf.inc_ref(data)  # the guest's pages outlive it, for the save
        session = gp.GuestSession(mf)
        session.adopt([(data, "anon")])
        proc, task = await gp.start_guest(
            mf,
            session,
            "--touches",
            str(spec),
            fault_mode=FaultMode.UFFD,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        out = json.loads(await proc.stdout.read() or b"{}")
        rc = await proc.wait()
        await task
        assert session.faults is not None
        fs = session.faults.stats()
        st = mf.stats()
        await mf.wait_loaded()
        progress = mf.load_progress()
        assert progress is not None
        if save_to is not None:
            await mf.save(save_to)
        mf.dec_ref(data)
    if rc != 0 or fs.failure:
        raise RuntimeError(f"the guest failed: rc {rc}, {fs.failure!r}, {out}")
    return {
        "faults": fs.faults,
        "waited": fs.waited,
        "entries": st.working_set_entries,
        "inherited": st.working_set_inherited,
        "hits": st.working_set_hits,
        "misses": st.working_set_misses,
        "hit_rate": st.working_set_hit_rate,
        "touched_bytes": out.get("touched_bytes", 0),
        "load_seconds": progress.elapsed_seconds,
    }


async def bench(reps: int, data_mib: int, ranges: int, pages: int, loop_name: str) -> list[Result]:
    runs: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / "base.ckpt"
        ordered = Path(d) / "ordered.ckpt"
        spec = Path(d) / "touches.json"
        data = await make_checkpoint(base, data_mib)
        for rep in range(reps + 1):  # the first a warm-up: page cache, imports
            spec.write_text(json.dumps(touches(data, ranges, pages, rep)))
            without = await run_once(base, data, spec, ordered)
            with_ = await run_once(ordered, data, spec, None)
            if rep:
                runs["without"].append(without)
                runs["with"].append(with_)
    params = {"loop": loop_name, "data_mib": data_mib, "ranges": ranges, "pages": pages}
    pairs = zip(runs["with"], runs["without"], strict=True)
    ratios = [w["faults"] / max(1, wo["faults"]) for w, wo in pairs]
    ratio = statistics.median(ratios)
    extra = {
        "order_entries": statistics.median(r["entries"] for r in runs["with"]),
        # Hits / misses summed over the repetitions (no fault at all: 0 / 0).
        "hits_misses_with": [sum(r[k] for r in runs["with"]) for k in ("hits", "misses")],
        "hits_misses_without": [sum(r[k] for r in runs["without"]) for k in ("hits", "misses")],
        "load_seconds_without": statistics.median(r["load_seconds"] for r in runs["without"]),
        "faults_with": [r["faults"] for r in runs["with"]],
        "faults_without": [r["faults"] for r in runs["without"]],
    }
    return [
        Result(
            f"ws faults without the order [{loop_name}]",
            "faults",
            [float(r["faults"]) for r in runs["without"]],
            params,
            extra=extra,
        ),
        Result(
            f"ws faults with the order [{loop_name}]",
            "faults",
            [float(r["faults"]) for r in runs["with"]],
            params,
            target="<= 10% of without",
            target_met=ratio <= 0.10,
            extra={**extra, "ratio_median": ratio, "ratios": ratios},
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--loop", choices=("uvloop", "asyncio", "both"), default="both")
    p.add_argument("--data-mib", type=int, default=1024)
    p.add_argument("--ranges", type=int, default=128)
    p.add_argument("--pages", type=int, default=64)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results: list[Result] = []
    loops = ("asyncio", "uvloop") if args.loop == "both" else (args.loop,)
    for name in loops:
        run = uvloop.run if name == "uvloop" else asyncio.run
        rs = run(bench(args.reps, args.data_mib, args.ranges, args.pages, name))
        for r in rs:
            print(json.dumps(r.to_json()), flush=True)
        results += rs
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
