"""Checkpoint benchmark: save and load of 1 GiB of committed pages against a cp-style copy.

Per repetition, back to back on the same disk (files in ``--dir``):

- ``write``:  cp-style sequential write of the same 1 GiB (read from the memory file into a
  1 MiB buffer, ``write`` to a new file) then ``fsync``: what ``save`` must at least do to
  make a durable file. ``write_nosync`` (no fsync) is reported for reference.
- ``save``:   ``await mf.save(path)``: scan, snapshot, header + metadata, every page read and
  CRC-checked, fsync, rename, directory fsync.
- ``read``:   sequential read of a 1 GiB file into a reused 1 MiB buffer (``cat > /dev/null``)
  after dropping the page cache: the disk's read speed.
- ``load``:   ``await MemoryFile.load(path)`` after dropping the page cache: read and check
  header and metadata, build the file, every page copied in and its CRC checked.

The page cache is dropped (``sync; echo 1 > /proc/sys/vm/drop_caches``) before each read and
each load when the process may (root); otherwise reads are warm, and the output says so.
Each figure is the median of ``--reps`` (>= 5) repetitions; ratios are medians of
per-repetition ratios (an operation and its baseline run back to back, so machine noise
mostly cancels). Output: one JSON line per operation, then a table.

Run: python benchmarks/bench_checkpoint.py [--dir /tmp] [--reps 5] [--mib 1024] [--loop uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Any

import uvloop

from asyncpgalloc import AccessType, AllocationMode, AllocOpts, MemoryFile

BUF = 1 << 20


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError:
        return False
    return True


def cp_write(src_fd: int, size: int, path: str, fsync: bool) -> float:
    buf = memoryview(bytearray(BUF))
    t0 = time.perf_counter()
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for off in range(0, size, BUF):
            n = os.preadv(src_fd, [buf], off)
            view = buf[:n]
            while view:
                view = view[os.write(out, view) :]
        if fsync:
            os.fsync(out)
    finally:
        os.close(out)
    return time.perf_counter() - t0


def cat_read(path: str) -> float:
    buf = memoryview(bytearray(BUF))
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)
    return time.perf_counter() - t0


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    size = args.mib << 20
    ck = os.path.join(args.dir, "bench_checkpoint.ckpt")
    plain = os.path.join(args.dir, "bench_checkpoint.plain")
    times: dict[str, list[float]] = {
        k: [] for k in ("write", "write_nosync", "save", "read", "load", "dir_fsync")
    }
    ratios: dict[str, list[float]] = {"save": [], "load": []}
    dropped = True
    async with MemoryFile.open() as mf:
        fr = await mf.allocate_async(size, AllocOpts(mode=AllocationMode.WRITE_POPULATE))
        pattern = os.urandom(64 << 20)
        for view in mf.map_internal(fr, AccessType.WRITE):
            for off in range(0, len(view), len(pattern)):
                n = min(len(pattern), len(view) - off)
                view[off : off + n] = pattern[:n]
        src_fd = os.open(f"/proc/self/fd/{mf.fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            await mf.save(ck)  # warm-up: the first save marks the pages known-committed
            for rep in range(args.reps):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(plain)
                drop_caches()
                times["write_nosync"].append(cp_write(src_fd, size, plain, fsync=False))
                os.unlink(plain)
                drop_caches()
                w = cp_write(src_fd, size, plain, fsync=True)
                os.unlink(ck)  # both write a new file: deleting the old one is not timed
                drop_caches()
                t0 = time.perf_counter()
                await mf.save(ck)
                s = time.perf_counter() - t0
                t0 = time.perf_counter()
                dfd = os.open(args.dir, os.O_RDONLY | os.O_DIRECTORY)
                os.fsync(dfd)
                os.close(dfd)
                times["dir_fsync"].append(time.perf_counter() - t0)
                dropped = drop_caches() and dropped
                r = cat_read(plain)
                dropped = drop_caches() and dropped
                t0 = time.perf_counter()
                loaded = await MemoryFile.load(ck)
                ld = time.perf_counter() - t0
                if rep == 0:
                    got = loaded.map_internal(fr)[0][: 1 << 20].tobytes()
                    assert got == pattern[: 1 << 20], "loaded pages differ"
                await loaded.aclose()
                times["write"].append(w)
                times["save"].append(s)
                times["read"].append(r)
                times["load"].append(ld)
                ratios["save"].append(w / s)
                ratios["load"].append(r / ld)
                print(
                    f"rep {rep}: write {w:.2f}s save {s:.2f}s read {r:.2f}s load {ld:.2f}s",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            os.close(src_fd)
            for p in (ck, plain):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
    ck_size = size  # data; header, metadata and CRCs add ~4 KiB per GiB
    out = []
    for op, ts in times.items():
        med = statistics.median(ts)
        rec: dict[str, Any] = {
            "bench": "checkpoint",
            "op": op,
            "bytes": ck_size,
            "reps": len(ts),
            "median_s": round(med, 4),
            "min_s": round(min(ts), 4),
            "max_s": round(max(ts), 4),
            "median_mib_s": round(size / med / 2**20, 1) if op != "dir_fsync" else None,
            "page_cache_dropped": dropped,
            "loop": args.loop,
            "dir": args.dir,
        }
        if op in ratios:
            rec["vs_baseline"] = round(statistics.median(ratios[op]), 3)
            rec["target"] = 0.7
        out.append(rec)
        print(json.dumps(rec), flush=True)
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        f"{'op':<13} {'median s':>9} {'min s':>7} {'max s':>7} {'MiB/s':>7} {'vs cp':>6} target",
    ]
    for r in results:
        mib = "" if r["median_mib_s"] is None else f"{r['median_mib_s']:.0f}"
        ratio = f"{r['vs_baseline']:.2f}" if "vs_baseline" in r else ""
        target = ">= 0.70" if "target" in r else ""
        lines.append(
            f"{r['op']:<13} {r['median_s']:>9.3f} {r['min_s']:>7.3f} {r['max_s']:>7.3f} "
            f"{mib:>7} {ratio:>6} {target}"
        )
    if not results[0]["page_cache_dropped"]:
        lines.append("(page cache NOT dropped: reads and loads were warm)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp", help="where the files go (the disk measured)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--mib", type=int, default=1024, help="committed MiB to save")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    if args.reps < 5:
        parser.error("--reps must be >= 5 (medians of fewer are noise)")
    factory = uvloop.new_event_loop if args.loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        results = runner.run(run(args))
    print(table(results))


if __name__ == "__main__":
    main()
