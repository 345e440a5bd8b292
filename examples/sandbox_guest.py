"""A sandbox guest: a separate process that uses memory its supervisor hands it.

Started by ``examples/sandbox_supervisor.py`` (through ``guest_protocol.start_guest``)
with one end of a Unix socket. It receives its sandbox's memfd with the hello frame,
then for ``--seconds`` allocates anonymous and cached ranges, maps each one at its own
address with ``mmap`` on that fd, fills it with a token, reads it back, has the
supervisor spot-check it, frees some, and makes cached ones evictable (pinning them again
before it reads them). An eviction notice makes it unmap the range for good. At the end it
frees everything, prints one JSON line of counts and exits 0 if every byte it read back
was right.

``--keep N`` instead allocates N pages (anonymous and cached ranges of up to
``KEEP_RANGE`` bytes), fills them, prints them as one JSON line (``{"ranges": [[offset,
length, token], ...]}``) and waits to be stopped (the checkpoint step). ``--verify
OFFSET:LENGTH:TOKEN`` (repeated) is for a guest on a restored file that already holds
those ranges: for each it waits until the range is loaded, maps it, checks every byte,
has the supervisor spot-check it and frees it. When the hello asks for it (``"uffd":
true``), the guest first maps the whole memfd, registers that mapping with a
userfaultfd for missing-page faults and hands the uffd to the supervisor; ``--verify``
then reads each range through that mapping at once, without waiting (a page not
loaded yet faults, and the supervisor resolves the fault once the page is in).
``--touches FILE`` replays touches: FILE holds a JSON list of ``[offset, length,
seconds]``, and at each ``seconds`` after its uffd is attached the guest reads one byte
of every page of that range through its registered mapping (the touches of a guest's
first second after a restore, for the working-set benchmark and tests); it counts the
bytes in ``touched_bytes``. ``--uid N`` drops to that uid once the memfd is in.
``--shrink`` first allocates a page, then tries to ``ftruncate`` the memfd to 0 and
records the errno (``EPERM``: it is sealed).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import mmap
import os
import random
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guest_protocol import GuestChannel

from asyncpgalloc import uffd

PAGE = mmap.PAGESIZE
#: ``--keep`` fills ranges of at most this many bytes.
KEEP_RANGE = 4 << 20


class Guest:
    """The guest's memory: ranges it holds, each mapped from the sandbox's memfd."""

    def __init__(self, channel: GuestChannel, memfd: int, rng: random.Random) -> None:
        self.ch = channel
        self.memfd = memfd
        self.rng = rng
        self.next_id = 0
        # offset -> (mapping, kind, token)
        self.held: dict[int, tuple[mmap.mmap, str, int]] = {}
        self.evictable: set[int] = set()
        self.counts = {
            "requests": 0,
            "verified_bytes": 0,
            "bad_bytes": 0,
            "evicted": 0,
            "errors": 0,
            "refused": 0,
            "faulted_bytes": 0,
        }
        # The whole memfd mapped and registered with a userfaultfd (attach_uffd).
        self.window: mmap.mmap | None = None
        self.uffd = -1

    def attach_uffd(self) -> str:
        """Map the whole memfd, register the mapping for missing-page faults and hand
        the uffd and the mapping's base to the supervisor; returns the mode in use. A
        guest that cannot make a uffd says so and waits for its ranges instead. The
        guest keeps its own copy of the uffd (closing the supervisor's then never lets a
        fault through to a hole) and dies with its supervisor (``PR_SET_PDEATHSIG``),
        so neither side's end leaves it stuck in a fault."""
        self.next_id += 1
        msg: dict[str, Any] = {"op": "uffd", "id": self.next_id}
        try:
            try:
                fd, mode = uffd.open_uffd(), uffd.FaultMode.UFFD
            except uffd.UffdError as e:
                if e.errno != errno.EPERM:
                    raise
                fd, mode = uffd.open_uffd(user_mode_only=True), uffd.FaultMode.UFFD_USER
            uffd.api(fd)
        except uffd.UffdError as e:
            self.ch.send({**msg, "mode": uffd.FaultMode.WAIT.value, "reason": str(e)})
            return str(self.ch.read()["mode"])
        size = os.fstat(self.memfd).st_size
        window = mmap.mmap(self.memfd, size)
        base = ctypes.addressof(ctypes.c_char.from_buffer(window))  # pins it: never closed
        uffd.register(fd, base, size)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        self.window, self.uffd = window, fd
        self.ch.send({**msg, "base": base, "length": size, "mode": mode.value}, [fd])
        return str(self.ch.read()["mode"])

    def request(self, op: str, **kw: Any) -> dict[str, Any]:
        """Send one request and wait for its answer, handling notices that come first."""
        self.next_id += 1
        self.ch.send({"op": op, "id": self.next_id, **kw})
        self.counts["requests"] += 1
        while True:
            msg = self.ch.read()
            if msg.get("event") == "evicted":
                self.evicted(int(msg["offset"]))
                continue
            if msg.get("id") == self.next_id or msg.get("fatal"):
                return msg

    def evicted(self, offset: int) -> None:
        entry = self.held.pop(offset, None)
        if entry is not None:
            entry[0].close()
            self.evictable.discard(offset)
            self.counts["evicted"] += 1

    def alloc(self, kind: str, length: int) -> int | None:
        answer = self.request("alloc", kind=kind, length=length)
        if not answer["ok"]:
            self.counts["refused"] += 1
            return None
        offset, length = int(answer["offset"]), int(answer["length"])
        m = mmap.mmap(self.memfd, length, offset=offset)
        if m[:] != bytes(length):  # a page handed out is all zeros
            self.counts["bad_bytes"] += length
        token = self.rng.getrandbits(64)
        m[:] = struct.pack("<Q", token) * (length // 8)
        self.held[offset] = (m, kind, token)
        self.verify(offset)
        if not self.request("check", offset=offset, token=token)["ok"]:
            self.counts["errors"] += 1
        return offset

    def verify(self, offset: int) -> None:
        m, _kind, token = self.held[offset]
        if m[:] == struct.pack("<Q", token) * (len(m) // 8):
            self.counts["verified_bytes"] += len(m)
        else:
            self.counts["bad_bytes"] += len(m)

    def free(self, offset: int) -> None:
        if offset in self.evictable:
            self.request("pin", offset=offset)  # else it may be evicted under the free
            if offset not in self.held:
                return  # it was: the notice came before the answer
            self.evictable.discard(offset)
        m, _kind, _token = self.held.pop(offset)
        m.close()
        if not self.request("free", offset=offset)["ok"]:
            self.counts["errors"] += 1

    def step(self) -> None:
        roll = self.rng.random()
        if roll < 0.45 or not self.held:
            kind = "cache" if self.rng.random() < 0.4 else "anon"
            self.alloc(kind, self.rng.randint(1, 64) * PAGE)
        elif roll < 0.75:
            self.free(self.rng.choice(list(self.held)))
        elif roll < 0.9:
            cached = [o for o, (_m, k, _t) in self.held.items() if k == "cache"]
            idle = [o for o in cached if o not in self.evictable]
            if idle:
                offset = self.rng.choice(idle)
                if self.request("evictable", offset=offset)["ok"]:
                    self.evictable.add(offset)
        elif self.evictable:
            offset = self.rng.choice(sorted(self.evictable))
            answer = self.request("pin", offset=offset)  # an eviction notice may come first
            if offset in self.held and answer["ok"]:
                self.evictable.discard(offset)
                self.verify(offset)

    def keep(self, pages: int) -> list[list[int]]:
        """Allocate and fill ``pages`` pages in ranges, anonymous and cached in turn;
        returns ``[offset, length, token]`` for each."""
        kept: list[list[int]] = []
        left = pages * PAGE
        while left:
            length = min(left, KEEP_RANGE)
            offset = self.alloc("cache" if len(kept) % 2 else "anon", length)
            if offset is None:
                raise SystemExit(f"--keep: allocation of {length} bytes refused")
            kept.append([offset, length, self.held[offset][2]])
            left -= length
        return kept

    def verify_restored(self, offset: int, length: int, token: int) -> None:
        """Check a range a restored file holds for us, then free it."""
        if self.window is not None:  # faulted in through the registered mapping
            data = self.window[offset : offset + length]
            good = data == struct.pack("<Q", token) * (length // 8)
            self.counts["verified_bytes" if good else "bad_bytes"] += length
            self.counts["faulted_bytes"] += length
            if not self.request("check", offset=offset, token=token)["ok"]:
                self.counts["errors"] += 1
            if not self.request("free", offset=offset)["ok"]:
                self.counts["errors"] += 1
            return
        if not self.request("wait", offset=offset)["ok"]:  # until its pages are in
            self.counts["errors"] += 1
            return
        m = mmap.mmap(self.memfd, length, offset=offset)
        self.held[offset] = (m, "anon", token)
        self.verify(offset)
        if not self.request("check", offset=offset, token=token)["ok"]:
            self.counts["errors"] += 1
        self.free(offset)

    def replay(self, touches: list[list[int | float]]) -> None:
        """Read a byte of every page of each ``[offset, length, seconds]`` range through
        the registered mapping, each no earlier than ``seconds`` from now."""
        if self.window is None:
            self.counts["errors"] += 1  # touches need the uffd mapping
            return
        t0 = time.monotonic()
        w = self.window
        for offset, length, at in touches:
            delay = t0 + float(at) - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            off, end = int(offset), int(offset) + int(length)
            for page in range(off, end, PAGE):
                w[page]
            self.counts["touched_bytes"] = self.counts.get("touched_bytes", 0) + end - off

    def finish(self) -> None:
        while self.held:  # a notice may take any of them while one is freed
            self.free(next(iter(self.held)))
        self.request("bye")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sock", type=int, required=True, help="fd of the socket to the supervisor")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=int, default=0, help="allocate N pages and wait (checkpoint)")
    p.add_argument("--verify", action="append", default=[], metavar="OFFSET:LENGTH:TOKEN")
    p.add_argument("--shrink", action="store_true", help="try to ftruncate the memfd to 0")
    p.add_argument("--uid", type=int, help="drop to this uid (and gid) once the fd is in")
    p.add_argument("--touches", help="a JSON file of [offset, length, seconds] to touch")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ch = GuestChannel(socket.socket(fileno=args.sock))
    hello, memfd = ch.hello()
    guest = Guest(ch, memfd, random.Random(args.seed))
    if args.uid is not None:  # an unprivileged guest: its uffd is user-mode only
        os.setgid(args.uid)
        os.setuid(args.uid)
    if hello.get("uffd"):
        guest.attach_uffd()
    if args.shrink:  # once the file holds something of ours
        guest.alloc("anon", PAGE)
        try:
            os.ftruncate(memfd, 0)
            guest.counts["shrink_errno"] = 0
        except OSError as e:
            guest.counts["shrink_errno"] = e.errno or errno.EIO
    if args.keep:
        print(json.dumps({"ranges": guest.keep(args.keep)}), flush=True)
        time.sleep(3600)  # until the supervisor stops and kills it
        return 0
    if args.touches:
        guest.replay(json.loads(Path(args.touches).read_text()))
    for spec in args.verify:
        guest.verify_restored(*(int(x) for x in spec.split(":")))
    deadline = time.monotonic() + (0 if args.verify or args.touches else args.seconds)
    while time.monotonic() < deadline:
        guest.step()
    guest.finish()
    print(json.dumps(guest.counts), flush=True)
    bad = guest.counts["bad_bytes"] or guest.counts["errors"]
    if guest.window is not None:
        # Not through the interpreter's teardown, which unmaps the registered window
        # while the process lives on: a supervisor unregistering it then (its load just
        # done) gets EINVAL and must kill us. _exit drops the whole mm at once.
        os._exit(0 if not bad else 1)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
