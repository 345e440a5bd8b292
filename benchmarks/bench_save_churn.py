"""Save under churn: how long ``await mf.save(path)`` takes while other tasks keep
allocating and freeing (issue 18, item 2).

Each churning task loops: allocate 16 KiB, write a byte through the mapping, wait
``--pause`` seconds (1 ms; 0 means one loop turn), ``dec_ref``, yield. Scenarios:
no churn (the baseline), 1 task with no pause (a free on every loop turn), and 1, 20
and 200 tasks with the pause. The file holds ``--mib`` MiB of written pages, so the
save has real data to copy. Each repetition opens a fresh file, starts the churn,
lets it run 50 ms, then times one save into ``--dir`` (a save that takes longer than
``--timeout`` s counts as that long and is flagged). The target is the issue's: with
churn, at most twice the baseline plus 0.1 s.

Output: one JSON object per scenario and loop (median, min, max seconds; the median's
ratio to the loop's baseline median; the target; whether the median meets it), then a
table. ``--json PATH`` also writes the list of objects to PATH.

Run: python benchmarks/bench_save_churn.py [--reps 7] [--mib 8] [--loop asyncio,uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from typing import Any

import uvloop

from asyncpgalloc import PAGE_SIZE, AccessType, MemoryFile

#: (name, tasks, pause between allocate and free)
SCENARIOS = [
    ("no churn", 0, 0.0),
    ("1 task, every turn", 1, 0.0),
    ("1 task, 1 ms", 1, 0.001),
    ("20 tasks, 1 ms", 20, 0.001),
    ("200 tasks, 1 ms", 200, 0.001),
]


async def churn(mf: MemoryFile, stop: asyncio.Event, pause: float) -> None:
    while not stop.is_set():
        fr = mf.allocate(4 * PAGE_SIZE)
        mf.map_internal(fr, AccessType.WRITE)[0][0] = 1
        if pause:
            await asyncio.sleep(pause)
        mf.dec_ref(fr)
        await asyncio.sleep(0)


async def one_save(directory: str, mib: int, tasks: int, pause: float, limit: float) -> float:
    async with MemoryFile.open() as mf:
        held = mf.allocate(mib << 20)
        for view in mf.map_internal(held, AccessType.WRITE):
            view[:] = b"\xab" * len(view)
        stop = asyncio.Event()
        churners = [asyncio.ensure_future(churn(mf, stop, pause)) for _ in range(tasks)]
        try:
            await asyncio.sleep(0.05)
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(mf.save(os.path.join(directory, "ck")), limit)
            except TimeoutError:
                return limit
            return time.perf_counter() - t0
        finally:
            stop.set()
            await asyncio.gather(*churners)


def run_loop(loop_name: str, args: argparse.Namespace, directory: str) -> list[dict[str, Any]]:
    new_loop = uvloop.new_event_loop if loop_name == "uvloop" else asyncio.new_event_loop
    out: list[dict[str, Any]] = []
    baseline = 0.0
    for name, tasks, pause in SCENARIOS:
        times = []
        for _ in range(args.reps):
            with asyncio.Runner(loop_factory=new_loop) as runner:
                times.append(runner.run(one_save(directory, args.mib, tasks, pause, args.timeout)))
        median = statistics.median(times)
        if not tasks:
            baseline = median
        target = 2 * baseline + 0.1
        rec = {
            "bench": "save_churn",
            "loop": loop_name,
            "scenario": name,
            "tasks": tasks,
            "pause_s": pause,
            "held_mib": args.mib,
            "reps": args.reps,
            "median_s": round(median, 5),
            "min_s": round(min(times), 5),
            "max_s": round(max(times), 5),
            "timed_out": sum(t >= args.timeout for t in times),
            "baseline_s": round(baseline, 5),
            "ratio_to_baseline": round(median / baseline, 2) if baseline else None,
            "target_s": round(target, 5),
            "meets_target": median <= target,
        }
        print(json.dumps(rec), flush=True)
        out.append(rec)
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        f"{'loop':<8} {'scenario':<20} {'median s':>9} {'min s':>8} {'max s':>8} "
        f"{'x base':>7} {'target s':>9}  ok"
    ]
    for r in results:
        ratio = "" if r["ratio_to_baseline"] is None else f"{r['ratio_to_baseline']:.2f}"
        lines.append(
            f"{r['loop']:<8} {r['scenario']:<20} {r['median_s']:>9.4f} {r['min_s']:>8.4f} "
            f"{r['max_s']:>8.4f} {ratio:>7} {r['target_s']:>9.4f}  "
            f"{'yes' if r['meets_target'] else 'NO'}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--mib", type=int, default=8, help="MiB of written pages held")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--loop", default="asyncio,uvloop")
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for loop_name in args.loop.split(","):
            results += run_loop(loop_name, args, directory)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
