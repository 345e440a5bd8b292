"""The request protocol between a sandbox supervisor and its guest processes.

One Unix stream socket per guest. Every message is a frame: a 4-byte big-endian length
and that many bytes of a JSON object (at most :data:`MAX_FRAME`). The supervisor's first
frame is ``{"event": "hello", ...}`` with the guest's memfd attached (``SCM_RIGHTS``,
from :meth:`~asyncpgalloc.MemoryFile.guest_fd`). Then the guest asks, the supervisor
answers, and it pushes eviction notices in between:

=========================================  =================================================
guest request                              supervisor answer
=========================================  =================================================
``{"op": "alloc", "id", "kind", "length"}``  ``{"id", "ok": true, "offset", "length"}``
``{"op": "free", "id", "offset"}``           ``{"id", "ok": true}``
``{"op": "evictable", "id", "offset"}``      ``{"id", "ok": true}`` (a cached range may go)
``{"op": "pin", "id", "offset"}``            ``{"id", "ok": true}``, or an error if evicted
``{"op": "check", "id", "offset", "token"}`` ``{"id", "ok": true}`` if the range holds token
``{"op": "wait", "id", "offset"}``           ``{"id", "ok": true}`` once the range is loaded
``{"op": "bye", "id"}``                      ``{"id", "ok": true}``, then the guest exits
=========================================  =================================================

A restored guest can fault its memory in instead of waiting: when the hello has
``"uffd": true``, the guest's first frame (before it touches its memory) is ``{"op":
"uffd", "id", "base", "length", "mode"}`` with its userfaultfd attached (``SCM_RIGHTS``):
it mapped the whole memfd at ``base`` and registered that mapping for missing-page
faults, which the supervisor then serves on its loop
(:class:`~asyncpgalloc.uffd_server.FaultServer`) until the file is loaded. A guest that
cannot make a uffd sends ``"mode": "wait"`` and no fd, and waits for its ranges as
above. Where the supervisor's kernel has no userfaultfd for shmem, the hello comes only
once the guest's ranges are loaded (``"uffd": false``). The answer is ``{"id", "ok":
true, "mode"}``.

``kind`` is ``"anon"`` or ``"cache"``; only cached ranges can be made evictable, and a
guest pins one (makes it unevictable again) before it touches it. ``wait`` is for a file
restored with ``MemoryFile.load(..., async_pages=True)``: until its pages are read in,
the guest's own mapping of the range would show holes, so it waits before touching it.
An error answer is
``{"id", "ok": false, "error"}``; with ``"fatal": true`` (garbage, a malformed or
oversized request) the supervisor then hangs up. A notice is ``{"event": "evicted",
"offset", "length"}``: the range is gone, the guest must unmap it and never touch it again.
Whatever way a guest goes (``bye``, a hang-up, ``SIGKILL`` mid-frame), every page it held
is freed. The supervisor never waits for a guest to read: answers and notices are
buffered up to :data:`MAX_UNREAD` bytes, and a guest that lets more pile up is cut off.

Both sides are here: :class:`GuestChannel` (blocking, for the guest program) and
:class:`GuestSession` (asyncio, one per guest in the supervisor), with :func:`start_guest`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncpgalloc import (
    PAGE_SIZE,
    AllocatorError,
    AllocOpts,
    EvictableRange,
    FileRange,
    MemoryFile,
    MemoryKind,
)
from asyncpgalloc.uffd import FaultMode, probe
from asyncpgalloc.uffd_server import FaultServer

#: Longest frame either side accepts (the JSON object, without the 4-byte length).
MAX_FRAME = 4096
#: Largest allocation one request may ask for; larger is a fatal "oversized" error.
MAX_ALLOC = 64 << 20
#: A guest's total allocated bytes; beyond it ``alloc`` is answered "over quota".
DEFAULT_QUOTA = 256 << 20
#: A guest that lets this many bytes of answers and notices pile up unread is cut off.
MAX_UNREAD = 1 << 20
#: Seconds a guest may take to finish a frame it has begun.
FRAME_TIMEOUT = 5.0
#: Requests a session answers from buffered frames before it lets other tasks run.
FAIR_BATCH = 32
KINDS = {"anon": MemoryKind.ANONYMOUS, "cache": MemoryKind.PAGE_CACHE}
GUEST_PROGRAM = Path(__file__).resolve().parent / "sandbox_guest.py"
_LEN = struct.Struct(">I")


class ProtocolError(Exception):
    """A peer broke the protocol (garbage, a malformed or oversized frame or request)."""


def encode(msg: dict[str, Any]) -> bytes:
    """One frame: the length, then the compact JSON."""
    body = json.dumps(msg, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes is over {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    """A frame's JSON object; anything else is a :class:`ProtocolError`."""
    try:
        msg = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a frame must hold a JSON object")
    return msg


def frame_length(header: bytes) -> int:
    """The body length a header announces; over :data:`MAX_FRAME` is a ProtocolError."""
    (n,) = _LEN.unpack(header)
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes is over {MAX_FRAME}")
    return int(n)


# ------------------------------------------------------------------- guest side


class GuestChannel:
    """The guest's end: blocking sends and receives over its socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def hello(self) -> tuple[dict[str, Any], int]:
        """Receive the hello frame and the memfd attached to it."""
        data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_FRAME + _LEN.size, 1)
        if not fds:
            raise ProtocolError("the hello frame carried no fd")
        self.buf += data
        return self.read(), fds[0]

    def send(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        """Send one frame (blocks), with ``fds`` attached (``SCM_RIGHTS``) if given."""
        if fds:
            socket.send_fds(self.sock, [encode(msg)], fds)
        else:
            self.sock.sendall(encode(msg))

    def read(self) -> dict[str, Any]:
        """The next frame (blocks); EOF is ConnectionError."""
        while True:
            if len(self.buf) >= _LEN.size:
                n = frame_length(bytes(self.buf[: _LEN.size]))
                if len(self.buf) >= _LEN.size + n:
                    body = bytes(self.buf[_LEN.size : _LEN.size + n])
                    del self.buf[: _LEN.size + n]
                    return decode(body)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the supervisor hung up")
            self.buf += data


# -------------------------------------------------------------- supervisor side


@dataclass(eq=False)
class GuestSession:
    """The supervisor's side of one guest on its own MemoryFile.

    An :class:`~asyncpgalloc.EvictableMemoryUser` (hashable by identity): ``evict``
    frees the guest's evictable cached ranges inside the range and pushes a notice for
    each. Every handler is synchronous (no await between a check and its state change),
    so eviction never races a request half-way.
    """

    mf: MemoryFile
    memcg_id: int = 0
    quota: int = DEFAULT_QUOTA
    # start -> (range, kind name); evictable: starts the file may evict.
    ranges: dict[int, tuple[FileRange, str]] = field(default_factory=dict)
    evictable: set[int] = field(default_factory=set)
    used_bytes: int = 0
    cached_bytes: int = 0
    evicted_bytes: int = 0
    requests: int = 0
    errors: int = 0
    closed_for: str = ""  # why the session ended ("" while it runs)
    writer: asyncio.StreamWriter | None = None
    #: How the guest gets pages not loaded yet: "" (it waits for its ranges, or its
    #: file is not being loaded), "uffd"/"uffd-user" (it faults them in through
    #: :attr:`faults`) or "wait" (no userfaultfd here: it was handed its fd late).
    fault_mode: str = ""
    faults: FaultServer | None = None
    # The range a "wait" request asked for, set by handle() for serve() to await, and
    # the answer to compute again once it is loaded (a "check" of pages in flight).
    _loading: FileRange | None = None
    _then: Callable[[], dict[str, Any]] | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer requests until the guest says bye, hangs up or breaks the protocol;
        then free every page it held. Never raises for anything the guest does.

        It never waits for the guest to read (no ``drain``): what the guest leaves
        unread is bounded by :data:`MAX_UNREAD` (see :meth:`_push`), so a guest that
        stops reading is cut off instead of stalling its session. Frames already
        buffered are answered :data:`FAIR_BATCH` at a time between yields to the loop.
        """
        self.writer = writer
        try:
            while True:
                try:
                    header = await reader.readexactly(_LEN.size)
                    n = frame_length(header)
                    body = await asyncio.wait_for(reader.readexactly(n), FRAME_TIMEOUT)
                    msg = decode(body)
                except ProtocolError as e:
                    self.errors += 1
                    self._push({"id": None, "ok": False, "error": str(e), "fatal": True})
                    self.closed_for = f"protocol error: {e}"
                    return
                except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                    self.closed_for = self.closed_for or "hung up"  # or cut off by _push
                    return
                if self.mf.closed:  # closed under a live guest: nothing left to serve
                    self.closed_for = "file closed"
                    return
                self.requests += 1
                answer = self.handle(msg)
                if self._loading is not None:
                    answer = await self._wait_loaded(answer)
                self._push(answer)
                if answer.get("fatal") or msg.get("op") == "bye":
                    ok = answer.get("ok")
                    self.closed_for = "bye" if ok else f"protocol error: {answer['error']}"
                    return
                if self.closed_for:  # cut off by _push
                    return
                if self.requests % FAIR_BATCH == 0:
                    await asyncio.sleep(0)
        except ConnectionError:
            self.closed_for = self.closed_for or "hung up"
        finally:
            self.release_all()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self.writer = None

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        """The answer to one request (state changes included); synchronous."""
        rid = msg.get("id")
        op = msg.get("op")
        try:
            if not isinstance(rid, int) or isinstance(rid, bool):
                raise ProtocolError("a request needs an integer id")
            if op == "alloc":
                return self._alloc(rid, msg)
            if op == "bye":
                return {"id": rid, "ok": True}
            start = msg.get("offset")
            if not isinstance(start, int) or isinstance(start, bool):
                raise ProtocolError(f"{op!r} needs an integer offset")
            if op not in ("free", "evictable", "pin", "check", "wait"):
                raise ProtocolError(f"unknown op {op!r}")
            if start not in self.ranges:
                if op == "pin":  # evicted: the guest has the notice by now
                    return {"id": rid, "ok": False, "error": "evicted"}
                self.errors += 1
                return {"id": rid, "ok": False, "error": f"no range at {start}"}
            return getattr(self, "_" + op)(rid, start, msg)  # type: ignore[no-any-return]
        except ProtocolError as e:
            self.errors += 1
            return {"id": rid, "ok": False, "error": str(e), "fatal": True}

    def _alloc(self, rid: int, msg: dict[str, Any]) -> dict[str, Any]:
        kind, length = msg.get("kind"), msg.get("length")
        if kind not in KINDS:
            raise ProtocolError(f"kind must be one of {sorted(KINDS)}, not {kind!r}")
        if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
            raise ProtocolError(f"length must be a positive integer, not {length!r}")
        if length > MAX_ALLOC:
            raise ProtocolError(f"oversized: {length} bytes asked, at most {MAX_ALLOC}")
        length = -(-length // PAGE_SIZE) * PAGE_SIZE
        if self.used_bytes + length > self.quota:
            self.errors += 1
            return {"id": rid, "ok": False, "error": f"over quota ({self.quota} bytes)"}
        try:
            fr = self.mf.allocate(length, AllocOpts(kind=KINDS[kind], memcg_id=self.memcg_id))
        except AllocatorError as e:
            self.errors += 1
            return {"id": rid, "ok": False, "error": f"{type(e).__name__}: {e}"}
        self.ranges[fr.start] = (fr, kind)
        self.used_bytes += fr.length
        if kind == "cache":
            self.cached_bytes += fr.length
        return {"id": rid, "ok": True, "offset": fr.start, "length": fr.length}

    def _free(self, rid: int, start: int, msg: dict[str, Any]) -> dict[str, Any]:
        self._drop(start)
        return {"id": rid, "ok": True}

    def _evictable(self, rid: int, start: int, msg: dict[str, Any]) -> dict[str, Any]:
        fr, kind = self.ranges[start]
        if kind != "cache":
            self.errors += 1
            return {"id": rid, "ok": False, "error": "only cached ranges can be evictable"}
        self.evictable.add(start)
        self.mf.mark_evictable(self, EvictableRange(fr.start, fr.end))
        return {"id": rid, "ok": True}

    def _pin(self, rid: int, start: int, msg: dict[str, Any]) -> dict[str, Any]:
        fr, _kind = self.ranges[start]
        if start in self.evictable:
            self.evictable.discard(start)
            self.mf.mark_unevictable(self, EvictableRange(fr.start, fr.end))
        return {"id": rid, "ok": True}

    def _check(self, rid: int, start: int, msg: dict[str, Any]) -> dict[str, Any]:
        token = msg.get("token")
        if not isinstance(token, int) or not 0 <= token < 1 << 64:
            raise ProtocolError("check needs a 64-bit token")
        fr, _kind = self.ranges[start]
        want = struct.pack("<Q", token)
        # Spot check: the first and the last 8 bytes, read through the file's own map.
        head = FileRange(fr.start, fr.start + PAGE_SIZE)
        tail = FileRange(fr.end - PAGE_SIZE, fr.end)
        if self._loading is None and (
            self.mf.pending_load_bytes(head) or self.mf.pending_load_bytes(tail)
        ):
            # Still in flight (being copied for another guest's fault, or loaded), though
            # this guest may see it already: check once it counts as loaded.
            self._loading, self._then = fr, lambda: self._check(rid, start, msg)
            return {"id": rid, "ok": True}
        got = bytes(self.mf.map_internal(head)[0][:8]) + bytes(self.mf.map_internal(tail)[0][-8:])
        if got != want * 2:
            self.errors += 1
            return {"id": rid, "ok": False, "error": f"range {start} does not hold {token:#x}"}
        return {"id": rid, "ok": True}

    def _wait(self, rid: int, start: int, msg: dict[str, Any]) -> dict[str, Any]:
        self._loading = self.ranges[start][0]
        return {"id": rid, "ok": True}

    async def _wait_loaded(self, answer: dict[str, Any]) -> dict[str, Any]:
        """Hold ``answer`` to a ``wait`` until its range's pages are loaded (at once
        unless the file is being loaded with ``async_pages``); a failed load is an
        error answer. Only this guest's session waits: it is blocked on the answer."""
        fr, self._loading = self._loading, None
        assert fr is not None
        then, self._then = self._then, None
        try:
            await self.mf.wait_loaded(fr)
        except AllocatorError as e:
            self.errors += 1
            return {"id": answer["id"], "ok": False, "error": f"{type(e).__name__}: {e}"}
        return answer if then is None else then()

    def detach(self) -> list[tuple[FileRange, str]]:
        """Take over every range the guest holds, with its reference: the session
        forgets them (none is evictable any more, and the guest's going frees none of
        them), and the caller now owns one reference on each (``dec_ref`` when done,
        or :meth:`adopt` them into another session). For a checkpoint of a stopped
        guest: its pages stay put whatever happens to the guest. O(ranges)."""
        self.mf.mark_all_unevictable(self)
        self.evictable.clear()
        taken = list(self.ranges.values())
        self.ranges.clear()
        self.used_bytes = self.cached_bytes = 0
        return taken

    def adopt(self, ranges: list[tuple[FileRange, str]]) -> None:
        """Hand the guest ranges (with one reference each) that it did not allocate,
        e.g. restored from a checkpoint; it frees them as its own. O(ranges)."""
        for fr, kind in ranges:
            self.ranges[fr.start] = (fr, kind)
            self.used_bytes += fr.length
            if kind == "cache":
                self.cached_bytes += fr.length

    def _drop(self, start: int) -> FileRange:
        fr, kind = self.ranges.pop(start)
        if start in self.evictable:
            self.evictable.discard(start)
            self.mf.mark_unevictable(self, EvictableRange(fr.start, fr.end))
        self.used_bytes -= fr.length
        if kind == "cache":
            self.cached_bytes -= fr.length
        self.mf.dec_ref(fr)
        return fr

    async def evict(self, er: EvictableRange) -> None:
        """Free every evictable cached range inside ``er`` and tell the guest."""
        for start in sorted(s for s in self.evictable if er.start <= s < er.end):
            fr = self._drop(start)
            self.evicted_bytes += fr.length
            self._push({"event": "evicted", "offset": fr.start, "length": fr.length})

    def release_all(self) -> None:
        """Free every page the guest holds (it is gone). Synchronous, O(ranges). Once the
        file is closed its pages are the host's again: the ranges are only forgotten."""
        if self.mf.closed:
            self.ranges.clear()
            self.evictable.clear()
            self.used_bytes = self.cached_bytes = 0
            return
        self.mf.mark_all_unevictable(self)
        self.evictable.clear()
        for start in list(self.ranges):
            self._drop(start)

    def _push(self, msg: dict[str, Any]) -> None:
        """Queue ``msg`` for the guest without waiting; past :data:`MAX_UNREAD` bytes
        queued (the guest is not reading), cut the guest off. O(1), never blocks."""
        w = self.writer
        if w is None or w.is_closing():
            return
        w.write(encode(msg))
        if w.transport.get_write_buffer_size() > MAX_UNREAD:
            self.closed_for = "stopped reading"
            w.transport.abort()


def fault_mode_here() -> FaultMode:
    """:attr:`FaultMode.UFFD` where this kernel serves shmem faults through a
    userfaultfd (the probe is logged once), else :attr:`FaultMode.WAIT`."""
    mode = probe().mode
    return FaultMode.WAIT if mode is FaultMode.WAIT else FaultMode.UFFD


def join_cgroup(cgroup: str, pid: int) -> None:
    """Move ``pid`` into the cgroup directory ``cgroup`` (v1 or v2). One cgroupfs write."""
    fd = os.open(os.path.join(cgroup, "cgroup.procs"), os.O_WRONLY)
    try:
        os.write(fd, str(pid).encode())
    finally:
        os.close(fd)


def _set_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def recv_frame_fds(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One frame and the fds attached to it from a peer that sends nothing more until it
    is answered, on the running loop (``sock`` non-blocking, not yet a stream). At most
    :data:`FRAME_TIMEOUT` seconds; the caller owns the fds. ProtocolError for garbage or
    bytes after the frame, ConnectionError at EOF."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    fds: list[int] = []
    try:
        async with asyncio.timeout(FRAME_TIMEOUT):
            while True:
                try:
                    data, got, _flags, _addr = socket.recv_fds(sock, MAX_FRAME + _LEN.size, 4)
                except BlockingIOError:
                    ready: asyncio.Future[None] = loop.create_future()
                    loop.add_reader(sock.fileno(), _set_once, ready)
                    try:
                        await ready
                    finally:
                        loop.remove_reader(sock.fileno())
                    continue
                fds += got
                if not data:
                    raise ConnectionError("the guest hung up")
                buf += data
                if len(buf) >= _LEN.size:
                    n = frame_length(bytes(buf[: _LEN.size]))
                    if len(buf) > _LEN.size + n:
                        raise ProtocolError("a frame arrived before its answer was sent")
                    if len(buf) == _LEN.size + n:
                        return decode(bytes(buf[_LEN.size :])), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


async def _serve_faults(
    mf: MemoryFile, session: GuestSession, ours: socket.socket, pid: int, ahead: int = 0
) -> None:
    """Receive the guest's ``uffd`` frame and start serving its faults (or note that it
    waits for its ranges instead); answer it. On the loop; at most FRAME_TIMEOUT."""
    msg, fds = await recv_frame_fds(ours)
    try:
        if msg.get("op") != "uffd" or not isinstance(msg.get("id"), int):
            raise ProtocolError(f"expected the uffd frame, got {msg!r}")
        mode = msg.get("mode")
        if mode == FaultMode.WAIT.value:
            if fds:
                raise ProtocolError("a uffd frame in wait mode carries no fd")
        else:
            base, length = msg.get("base"), msg.get("length")
            if len(fds) != 1 or not isinstance(base, int) or not isinstance(length, int):
                raise ProtocolError("a uffd frame needs one fd, a base and a length")
            session.faults = FaultServer(mf, fds.pop(), base, length, pid, ahead=ahead)
            session.faults.start()
        session.fault_mode = str(mode)
    finally:
        for fd in fds:
            os.close(fd)
    await asyncio.get_running_loop().sock_sendall(
        ours, encode({"id": msg["id"], "ok": True, "mode": session.fault_mode})
    )


async def start_guest(
    mf: MemoryFile,
    session: GuestSession,
    *args: str,
    cgroup: str | None = None,
    hello: dict[str, Any] | None = None,
    stdout: int | None = None,
    fault_mode: FaultMode | None = None,
    fault_ahead: int = 0,
) -> tuple[asyncio.subprocess.Process, asyncio.Task[None]]:
    """Start the guest program with ``args``, move it into ``cgroup`` (a directory
    with ``cgroup.procs``), hand it the sealed memfd and serve it with ``session``;
    ``stdout`` as for ``create_subprocess_exec`` (``asyncio.subprocess.PIPE``).

    ``fault_mode`` is for a file still being loaded (``async_pages``):
    :attr:`FaultMode.UFFD` (or ``UFFD_USER``: the same here, the guest picks) hands the
    fd at once and serves the guest's faults on pages not loaded yet;
    :attr:`FaultMode.WAIT` hands it only once the session's ranges are loaded; None (the
    default) leaves it to the guest to ``wait``. :func:`fault_mode_here` is the best
    this kernel offers. ``fault_ahead``: the :class:`FaultServer`'s ``ahead`` window (a
    fault copies the pending blocks of that aligned window around it, e.g. 2 MiB).

    The guest waits for its hello before touching memory, so its pages are charged to
    its cgroup from the first. Returns the process and the serving task (which ends,
    every page freed, when the guest goes). Costs a fork+exec and a few syscalls.
    :func:`spawn_guest` then :func:`hand_over` do the same in two steps (a guest
    started ahead, waiting for a restore).
    """
    proc, ours = await spawn_guest(*args, cgroup=cgroup, stdout=stdout)
    task = await hand_over(
        mf, session, proc, ours, hello=hello, fault_mode=fault_mode, fault_ahead=fault_ahead
    )
    return proc, task


async def spawn_guest(
    *args: str, cgroup: str | None = None, stdout: int | None = None
) -> tuple[asyncio.subprocess.Process, socket.socket]:
    """Start the guest program with ``args`` in ``cgroup``: it waits on the returned
    socket for its hello (see :func:`hand_over`) before it touches any memory. Costs a
    fork+exec. The caller owns the socket (``hand_over`` takes it)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(GUEST_PROGRAM),
            "--sock",
            str(theirs.fileno()),
            *args,
            pass_fds=(theirs.fileno(),),
            stdout=stdout,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    try:
        if cgroup is not None:
            join_cgroup(cgroup, proc.pid)
    except BaseException:
        ours.close()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return proc, ours


async def hand_over(
    mf: MemoryFile,
    session: GuestSession,
    proc: asyncio.subprocess.Process,
    ours: socket.socket,
    *,
    hello: dict[str, Any] | None = None,
    fault_mode: FaultMode | None = None,
    fault_ahead: int = 0,
) -> asyncio.Task[None]:
    """Hand a guest from :func:`spawn_guest` its hello and the sealed memfd, set up its
    fault service (see :func:`start_guest`) and serve it with ``session``; returns the
    serving task. On any error the guest is killed. A few syscalls and round trips."""
    try:
        faulting = fault_mode in (FaultMode.UFFD, FaultMode.UFFD_USER)
        if fault_mode is FaultMode.WAIT:
            session.fault_mode = fault_mode.value
            for fr, _kind in list(session.ranges.values()):
                await mf.wait_loaded(fr)
        gfd = mf.guest_fd()
        try:
            msg = {"event": "hello", "pid": proc.pid, "time": time.time(), **(hello or {})}
            if fault_mode is not None:
                msg["uffd"] = faulting
            socket.send_fds(ours, [encode(msg)], [gfd])
        finally:
            os.close(gfd)
        if faulting:
            ours.setblocking(False)
            await _serve_faults(mf, session, ours, proc.pid, fault_ahead)
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=MAX_FRAME * 4)
    except BaseException:
        ours.close()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return asyncio.create_task(session.serve(reader, writer), name=f"guest-{proc.pid}")
