"""Instructions per operation, counted by valgrind (callgrind): noise-free per-operation cost.

Timings on a shared 2-core machine move by 2-3x from run to run; instruction counts do not.
Each figure is (instructions of a run doing N operations - those of the same run doing 0)
/ N, for both page-state cores (the pure one with ``ASYNCPGALLOC_NO_EXTENSIONS=1``), each
in its own process under ``valgrind --tool=callgrind``:

- ``core``: ``PageSets.allocate_uncommitted`` of 4 KiB + ``dec_ref``, no release (the
  core's own cost per call pair);
- ``shell``: ``MemoryFile.allocate`` of 4 KiB + ``dec_ref``, no release (adds the asyncio
  shell's checks);
- ``a``: scenario a of ``run.py``, release included (the loop yields every 64
  operations and ends with ``wait_released``): what one allocation's whole life costs;
- ``loop``: the Python loop with two trivial calls, the floor any Python caller pays.

Go's pgalloc cannot run under valgrind here (its runtime aborts), so there is no Go count;
``run.py`` times it instead. Output: one JSON object per figure, then a table.

Run: python benchmarks/bench_instructions.py [--ops N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import asyncio, os, sys
from asyncpgalloc import PAGE_SIZE as P, AllocOpts, MemoryFile

N, what = int(sys.argv[1]), sys.argv[2]


async def main() -> None:
    async with MemoryFile.open() as mf:
        mf.dec_ref(mf.allocate(P))
        await mf.wait_released()
        opts = AllocOpts()
        if what == "core":
            core = mf._pages
            au, dr = core.allocate_uncommitted, core.dec_ref
            for _ in range(N):
                dr(au(P, opts, False))
        elif what == "shell":
            a, d = mf.allocate, mf.dec_ref
            for _ in range(N):
                d(a(P))
        elif what == "a":
            a, d = mf.allocate, mf.dec_ref
            for i in range(N):
                d(a(P))
                if i & 63 == 63:
                    await asyncio.sleep(0)
            await mf.wait_released()
        else:
            f = lambda x: x  # noqa: E731
            for _ in range(N):
                f(f(P))
        # Skip closing: what it costs does not depend on N only.
        os._exit(0)


asyncio.run(main())
"""

FIGURES = ("loop", "core", "shell", "a")


def count(python: str, what: str, n: int, pure: bool, workdir: Path) -> int:
    """Instructions of one child run (valgrind callgrind's total)."""
    script = workdir / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ)
    env.pop("ASYNCPGALLOC_NO_EXTENSIONS", None)
    if pure:
        env["ASYNCPGALLOC_NO_EXTENSIONS"] = "1"
    out = workdir / f"cg.{what}.{n}.{pure}"
    r = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            python,
            str(script),
            str(n),
            what,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    m = re.search(r"Collected : (\d+)", r.stderr)
    if r.returncode != 0 or m is None:
        raise RuntimeError(f"callgrind run failed ({r.returncode}): {r.stderr[-2000:]}")
    return int(m.group(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=20_000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for pure in (False, True):
            for what in FIGURES:
                base = count(sys.executable, what, 0, pure, Path(tmp))
                full = count(sys.executable, what, args.ops, pure, Path(tmp))
                res = {
                    "figure": what,
                    "core": "python" if pure else "compiled",
                    "ops": args.ops,
                    "instructions_per_op": round((full - base) / args.ops),
                }
                print(json.dumps(res), flush=True)
                results.append(res)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    by = {(r["figure"], r["core"]): r["instructions_per_op"] for r in results}
    print(f"\n{'figure':8} {'compiled':>10} {'python':>10} {'ratio':>7}")
    for what in FIGURES:
        c, p = by[(what, "compiled")], by[(what, "python")]
        print(f"{what:8} {c:>10} {p:>10} {p / c:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
