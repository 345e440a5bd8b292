"""Guest request benchmark: the round trip of a real guest process's request to the
supervisor (``examples/guest_protocol.py``) at 1 and 32 guests, against a baseline.

Each guest is a separate Python process on its own Unix socket. From one common start
time (so that all 32 run at once) for ``--seconds`` it sends requests one at a time and
times each round trip itself (send the frame, read the answer), alternating ``alloc``
of 4 KiB anonymous memory and ``free`` of it:

- ``alloc``: the supervisor is a ``GuestSession`` on the guest's own ``MemoryFile`` (one
  file per guest, one shared ``MemoryAccounting``, the sealed memfd handed over with the
  hello): every request is a real allocation or free.
- ``echo`` (the baseline, same run): the same guest, the same frames, read and decoded on
  the same asyncio streams and answered with a frame of the same shape, by a server with
  no allocator: what the framing, the socket and the loop cost by themselves.

Per repetition: p50 and p99 of every round trip of every guest (µs), and requests per
second over all guests. Figures are medians over ``--reps`` (>= 5) repetitions; the ratio
is the median of per-repetition ratios echo/alloc (times: ``alloc`` takes 1/ratio times the
echo's; rates: ``alloc`` reaches ratio times the echo's rate). One JSON object per figure
(``run.py``'s format), then a table.

Run: python benchmarks/bench_guests.py [--reps 5] [--seconds 1] [--guests 1,32]
     [--loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from guest_protocol import (
    _LEN,
    MAX_FRAME,
    GuestSession,
    ProtocolError,
    decode,
    encode,
    frame_length,
)
from run import Result, table

from asyncpgalloc import DelayedEviction, MemoryAccounting, MemoryFile, MemoryFileOpts

#: Seconds between starting the guests and their common start (32 Python startups).
LEAD = 0.4
LEAD_PER_GUEST = 0.06

# The guest: argv[1] is its socket's fd. The hello carries the start time (the system-wide
# CLOCK_MONOTONIC, which time.monotonic reads in every process) and the seconds to run.
CLIENT = r"""
import json, socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
data, _fds, _, _ = socket.recv_fds(sock, 8192, 1)
buf = bytearray(data)

def frame():
    global buf
    while True:
        if len(buf) >= 4:
            n = int.from_bytes(buf[:4], "big")
            if len(buf) >= 4 + n:
                body = bytes(buf[4:4 + n])
                del buf[:4 + n]
                return json.loads(body)
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("hung up")
        buf += chunk

def send(msg):
    body = json.dumps(msg, separators=(",", ":")).encode()
    sock.sendall(len(body).to_bytes(4, "big") + body)

hello = frame()
start, end = hello["start"], hello["start"] + hello["seconds"]
rid, offset, rtts = 0, None, []
while time.monotonic() < start:
    time.sleep(0.0005)
while True:
    rid += 1
    if offset is None:
        msg = {"op": "alloc", "id": rid, "kind": "anon", "length": 4096}
    else:
        msg = {"op": "free", "id": rid, "offset": offset}
    t = time.perf_counter()
    send(msg)
    answer = frame()
    done = time.perf_counter()
    if not answer["ok"]:
        raise SystemExit(f"refused: {answer}")
    offset = answer["offset"] if offset is None else None
    if done > end:
        break
    rtts.append(round((done - t) * 1e6, 1))
if offset is not None:
    send({"op": "free", "id": rid + 1, "offset": offset})
    frame()
send({"op": "bye", "id": rid + 2})
frame()
print(json.dumps(rtts))
"""


class EchoSession:
    """The baseline: the session's framing and streams, answers of the same shape, no
    allocator."""

    def __init__(self) -> None:
        self.requests = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    n = frame_length(await reader.readexactly(_LEN.size))
                    msg = decode(await reader.readexactly(n))
                except (asyncio.IncompleteReadError, ConnectionError, ProtocolError):
                    return
                self.requests += 1
                answer: dict[str, Any] = {"id": msg.get("id"), "ok": True}
                if msg.get("op") == "alloc":
                    answer.update(offset=self.requests << 12, length=msg.get("length"))
                writer.write(encode(answer))
                if msg.get("op") == "bye":
                    return
        finally:
            writer.close()


async def spawn(
    server: Any, start: float, seconds: float, fd: int | None
) -> tuple[asyncio.subprocess.Process, asyncio.Task[None]]:
    """Start one guest on a socketpair, send its hello (with ``fd`` attached, if any)
    and serve it with ``server.serve``."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLIENT,
            str(theirs.fileno()),
            pass_fds=(theirs.fileno(),),
            stdout=asyncio.subprocess.PIPE,
        )
    finally:
        theirs.close()
    hello = encode({"event": "hello", "start": start, "seconds": seconds})
    socket.send_fds(ours, [hello], [] if fd is None else [fd])
    reader, writer = await asyncio.open_unix_connection(sock=ours, limit=MAX_FRAME * 4)
    return proc, asyncio.create_task(server.serve(reader, writer))


async def one_run(mode: str, guests: int, seconds: float) -> tuple[float, float, float]:
    """One repetition: (p50 µs, p99 µs, requests/s over all guests)."""
    accounting = MemoryAccounting()
    opts = MemoryFileOpts(accounting=accounting, delayed_eviction=DelayedEviction.MANUAL)
    files: list[MemoryFile] = []
    procs: list[tuple[asyncio.subprocess.Process, asyncio.Task[None]]] = []
    start = time.monotonic() + LEAD + LEAD_PER_GUEST * guests
    try:
        for _ in range(guests):
            if mode == "alloc":
                mf = await MemoryFile.open(opts=opts)
                files.append(mf)
                gfd = mf.guest_fd()
                try:
                    procs.append(
                        await spawn(GuestSession(mf, memcg_id=len(files)), start, seconds, gfd)
                    )
                finally:
                    os.close(gfd)
            else:
                procs.append(await spawn(EchoSession(), start, seconds, None))
        if time.monotonic() > start:
            raise RuntimeError("the guests started too slowly for a common start: raise LEAD")
        rtts: list[float] = []
        for proc, task in procs:
            assert proc.stdout is not None
            out = await proc.stdout.read()
            if await proc.wait() != 0:
                raise RuntimeError(f"a guest failed (status {proc.returncode})")
            await task
            rtts += json.loads(out)
        for mf in files:
            if mf.stats().used_bytes:
                raise RuntimeError("pages left used after every guest freed its own")
    finally:
        for proc, task in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await task
        for mf in files:
            await mf.aclose()
    if accounting.total():
        raise RuntimeError("accounting not back to 0")
    rtts.sort()
    p50 = rtts[len(rtts) // 2]
    p99 = rtts[min(len(rtts) - 1, int(0.99 * len(rtts)))]
    return p50, p99, len(rtts) / seconds


async def run(
    guest_counts: Sequence[int], reps: int, seconds: float, emit: Callable[[Result], None]
) -> list[Result]:
    """Every figure at each guest count, as ``run.Result`` objects (each given to ``emit``)."""
    results: list[Result] = []
    for guests in guest_counts:
        figures: dict[str, dict[str, list[float]]] = {
            m: {"p50": [], "p99": [], "rps": []} for m in ("alloc", "echo")
        }
        for rep in range(reps):
            for mode in ("alloc", "echo"):  # back to back: machine noise mostly cancels
                p50, p99, rps = await one_run(mode, guests, seconds)
                for key, value in (("p50", p50), ("p99", p99), ("rps", rps)):
                    figures[mode][key].append(value)
            print(
                f"{guests} guests, rep {rep}: "
                + "; ".join(
                    f"{m} p50 {f['p50'][-1]:.0f} us p99 {f['p99'][-1]:.0f} us "
                    f"{f['rps'][-1]:.0f} req/s"
                    for m, f in figures.items()
                ),
                file=sys.stderr,
                flush=True,
            )
        for key, name, unit, sense in (
            ("p50", "rtt_p50", "us", "time"),
            ("p99", "rtt_p99", "us", "time"),
            ("rps", "req_per_s", "req/s", "rate"),
        ):
            ours, raw = figures["alloc"][key], figures["echo"][key]
            ratios = [(r / o if sense == "time" else o / r) for o, r in zip(ours, raw, strict=True)]
            result = Result(
                f"guests_{guests}_{name}",
                unit,
                ours,
                {"guests": guests, "seconds": seconds},
                sense=sense,
                raw_samples=raw,
                raw_what="echo: same framing and streams, no allocator",
                raw_ratios=ratios,
            )
            results.append(result)
            emit(result)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--reps", type=int, default=5, help="repetitions (>= 5)")
    p.add_argument("--seconds", type=float, default=1.0, help="each run's window (default 1)")
    p.add_argument("--guests", default="1,32", help="guest counts (default 1,32)")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = p.parse_args(argv)

    def emit(r: Result) -> None:
        print(json.dumps(r.to_json()), flush=True)

    if args.reps < 5:
        p.error("--reps must be >= 5 (medians of fewer are noise)")
    counts = [int(x) for x in args.guests.split(",") if x.strip()]
    factory = uvloop.new_event_loop if args.loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        results = runner.run(run(counts, args.reps, args.seconds, emit))
    print()
    print(table(results))
    print(f"\n(loop {args.loop}, {args.reps} reps of {args.seconds:g} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
