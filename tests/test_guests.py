"""Real guests: separate processes served over Unix sockets from their own MemoryFiles.

Every guest is a real process (``examples/sandbox_guest.py`` or a small bad one) that
receives its sandbox's sealed memfd and maps its ranges from it.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from cgroups import fds
from helpers import load_example

from asyncpgalloc import (
    PAGE_SIZE,
    DelayedEviction,
    FileRange,
    MemoryAccounting,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
)

gp = load_example("guest_protocol")

LOAD_SECONDS = float(os.environ.get("ASYNCPGALLOC_LOAD_SECONDS", "3"))


def _opts(accounting: MemoryAccounting | None = None) -> MemoryFileOpts:
    return MemoryFileOpts(delayed_eviction=DelayedEviction.MANUAL, accounting=accounting)


@pytest.fixture
async def gmf() -> AsyncIterator[MemoryFile]:
    async with MemoryFile.open(opts=_opts()) as f:
        yield f
        f.check_invariants()


async def _good_guest(
    mf: MemoryFile, seconds: float, seed: int, memcg_id: int = 1, evict_every: float = 0.0
) -> tuple[dict[str, int], Any]:
    session = gp.GuestSession(mf, memcg_id=memcg_id)
    proc, task = await gp.start_guest(
        mf, session, "--seconds", str(seconds), "--seed", str(seed), stdout=asyncio.subprocess.PIPE
    )

    async def pressure() -> None:
        while not task.done():
            await asyncio.sleep(evict_every)
            mf.start_evictions()

    presser = asyncio.create_task(pressure()) if evict_every else None
    assert proc.stdout is not None
    out = await proc.stdout.read()
    assert await proc.wait() == 0, out
    await task
    if presser is not None:
        await presser
    return json.loads(out), session


async def test_a_guest_allocates_maps_verifies_and_frees_through_the_socket(
    gmf: MemoryFile,
) -> None:
    counts, session = await _good_guest(gmf, 1.0, seed=5)
    assert counts["requests"] > 100
    assert counts["verified_bytes"] > 0
    assert counts["bad_bytes"] == counts["errors"] == 0
    assert session.closed_for == "bye" and session.errors == 0
    assert session.used_bytes == 0 and not session.ranges
    assert gmf.stats().used_bytes == 0


async def test_eviction_notices_reach_the_guest_and_it_stops_using_the_range(
    gmf: MemoryFile,
) -> None:
    counts, session = await _good_guest(gmf, 1.5, seed=6, evict_every=0.05)
    assert counts["evicted"] > 0  # notices the guest received and acted on
    assert session.evicted_bytes > 0
    assert counts["bad_bytes"] == counts["errors"] == 0
    assert gmf.stats().used_bytes == 0


# A guest that sends argv[2] (hex) as raw bytes after its hello, then prints what it got.
_BAD_GUEST = r"""
import socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
socket.recv_fds(sock, 8192, 1)
sock.sendall(bytes.fromhex(sys.argv[2]))
data = b""
while chunk := sock.recv(65536):
    data += chunk
sys.stdout.write(data[4:].decode())
"""


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"\x00\x00\x00\x05hello", "not JSON"),
        (b"\xff\xff\xff\xff", "over 4096"),
        (_frame(b"[1, 2]"), "JSON object"),
        (_frame(b'{"op": "alloc", "id": 1, "kind": "anon", "length": 1073741824}'), "oversized"),
        (_frame(b'{"op": "alloc", "id": 1, "kind": "heap", "length": 4096}'), "kind"),
        (_frame(b'{"op": "mmap", "id": 1, "offset": 0}'), "unknown op"),
        (_frame(b'{"op": "free", "offset": 0}'), "integer id"),
    ],
)
async def test_a_bad_guest_gets_an_error_and_is_cut_off_while_a_good_one_goes_on(
    gmf: MemoryFile, payload: bytes, error: str
) -> None:
    async with MemoryFile.open(opts=_opts()) as other:
        good = asyncio.create_task(_good_guest(other, 1.0, seed=7))
        session = gp.GuestSession(gmf, memcg_id=2)
        ours, theirs = socket.socketpair()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _BAD_GUEST,
            str(theirs.fileno()),
            payload.hex(),
            pass_fds=(theirs.fileno(),),
            stdout=asyncio.subprocess.PIPE,
        )
        theirs.close()
        gfd = gmf.guest_fd()
        socket.send_fds(ours, [gp.encode({"event": "hello"})], [gfd])
        os.close(gfd)
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        await session.serve(reader, writer)
        out, _ = await proc.communicate()
        answer = json.loads(out)
        assert answer["ok"] is False and answer["fatal"] is True
        assert error in answer["error"]
        assert session.closed_for.startswith("protocol error")
        assert gmf.stats().used_bytes == 0
        counts, good_session = await good
        assert counts["bad_bytes"] == counts["errors"] == 0
        assert good_session.closed_for == "bye"


async def test_a_guest_killed_mid_request_has_every_page_freed() -> None:
    accounting = MemoryAccounting()
    async with MemoryFile.open(opts=_opts(accounting)) as mf:
        before = accounting.by_kind()
        session = gp.GuestSession(mf, memcg_id=3)
        proc, task = await gp.start_guest(
            mf, session, "--keep", "64", stdout=asyncio.subprocess.PIPE
        )
        assert proc.stdout is not None
        line = await proc.stdout.readline()  # it holds 64 filled pages now
        [[offset, length, token]] = json.loads(line)["ranges"]
        assert length == 64 * PAGE_SIZE
        # What the guest wrote through its own mapping, read through the supervisor's.
        view = mf.map_internal(FileRange(offset, offset + length))[0]
        assert bytes(view[-8:]) == token.to_bytes(8, "little")
        del view
        assert session.used_bytes == mf.stats().used_bytes == length
        await mf.update_usage()
        assert accounting.by_memcg(3).get(MemoryKind.ANONYMOUS, 0) == length
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        await task
        assert session.closed_for == "hung up"
        assert session.used_bytes == mf.stats().used_bytes == 0
        await mf.wait_released()
        assert accounting.by_kind() == before
        assert accounting.by_memcg(3).get(MemoryKind.ANONYMOUS, 0) == 0
        mf.check_invariants()


# A guest that allocates 8 pages, fills them, sends half of its next request and
# SIGKILLs itself.
_DYING_GUEST = r"""
import json, mmap, os, signal, socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
_, fds, _, _ = socket.recv_fds(sock, 8192, 1)
req = json.dumps({"op": "alloc", "id": 1, "kind": "anon", "length": 8 * 4096}).encode()
sock.sendall(len(req).to_bytes(4, "big") + req)
data = b""
while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
    data += sock.recv(65536)
answer = json.loads(data[4:])
m = mmap.mmap(fds[0], answer["length"], offset=answer["offset"])
m[:] = b"x" * answer["length"]
sock.sendall(b"\x00\x00\x00\x40" + b'{"op":"fr')
os.kill(os.getpid(), signal.SIGKILL)
"""


async def test_a_guest_killed_in_the_middle_of_a_frame_has_every_page_freed(
    gmf: MemoryFile,
) -> None:
    session = gp.GuestSession(gmf, memcg_id=4)
    ours, theirs = socket.socketpair()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _DYING_GUEST, str(theirs.fileno()), pass_fds=(theirs.fileno(),)
    )
    theirs.close()
    gfd = gmf.guest_fd()
    socket.send_fds(ours, [gp.encode({"event": "hello"})], [gfd])
    os.close(gfd)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    await session.serve(reader, writer)
    assert await proc.wait() == -signal.SIGKILL
    assert session.requests == 1  # the allocation; the half frame was never a request
    assert session.closed_for == "hung up"
    assert session.used_bytes == gmf.stats().used_bytes == 0


async def test_load_32_guests_random_requests_no_errors_no_leaks() -> None:
    accounting = MemoryAccounting()
    # uvloop opens /dev/null once, at its first subprocess, and keeps it: not ours.
    warm = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "", pass_fds=(0,), stdout=asyncio.subprocess.PIPE
    )
    await warm.communicate()
    await warm.wait()
    fds_before = fds()
    files = [await MemoryFile.open(opts=_opts(accounting)) for _ in range(32)]
    try:

        async def one(i: int) -> tuple[dict[str, int], Any]:
            return await _good_guest(files[i], LOAD_SECONDS, seed=100 + i, memcg_id=i + 1)

        async def pressure() -> None:
            for _ in range(int(LOAD_SECONDS / 0.2)):
                await asyncio.sleep(0.2)
                for mf in files:
                    mf.start_evictions()

        results = await asyncio.gather(*(one(i) for i in range(32)), pressure())
        guests = cast(list[tuple[dict[str, int], Any]], results[:32])
        assert all(c["bad_bytes"] == 0 and c["errors"] == 0 for c, _ in guests)
        assert sum(c["verified_bytes"] for c, _ in guests) > 0
        assert all(s.closed_for == "bye" and s.errors == 0 for _, s in guests)
        for mf in files:
            assert mf.stats().used_bytes == 0
            await mf.wait_released()
            mf.check_invariants()
    finally:
        for mf in files:
            await mf.aclose()
    assert accounting.total() == 0
    extra = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in fds() - fds_before}
    assert not extra


async def _serve_raw(
    mf: MemoryFile, session: object, code: str, *args: str
) -> tuple[asyncio.subprocess.Process, asyncio.Task[None]]:
    """Start ``python -c code SOCK_FD *args``, hand it the sealed memfd with a hello and
    serve it with ``session`` (a GuestSession)."""
    ours, theirs = socket.socketpair()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        str(theirs.fileno()),
        *args,
        pass_fds=(theirs.fileno(),),
        stdout=asyncio.subprocess.PIPE,
    )
    theirs.close()
    gfd = mf.guest_fd()
    socket.send_fds(ours, [gp.encode({"event": "hello"})], [gfd])
    os.close(gfd)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    return proc, asyncio.create_task(session.serve(reader, writer))  # type: ignore[attr-defined]


# A guest that holds 16 pages, then pipelines argv[2] requests and never reads an answer;
# it prints "sent" once it has sent them all, then waits for the supervisor to hang up.
_DEAF_GUEST = r"""
import json, socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
socket.recv_fds(sock, 8192, 1)
def frame(msg):
    body = json.dumps(msg).encode()
    return len(body).to_bytes(4, "big") + body
sock.sendall(frame({"op": "alloc", "id": 0, "kind": "anon", "length": 16 * 4096}))
try:
    for i in range(1, int(sys.argv[2])):
        sock.sendall(frame({"op": "pin", "id": i, "offset": 1 << 40}))
    print("sent", flush=True)
except (BrokenPipeError, ConnectionResetError):
    print("cut off", flush=True)
sock.settimeout(30)
try:
    while sock.recv(65536):
        pass
except OSError:
    pass
"""


async def test_a_guest_that_never_reads_its_answers_is_cut_off_and_others_go_on(
    gmf: MemoryFile,
) -> None:
    session = gp.GuestSession(gmf, memcg_id=5)
    # 200k answers of ~40 bytes: far more than MAX_UNREAD plus the socket's buffers.
    proc, task = await _serve_raw(gmf, session, _DEAF_GUEST, "200000")
    async with MemoryFile.open(opts=_opts()) as other:
        counts, good = await _good_guest(other, 1.0, seed=8)
        assert counts["bad_bytes"] == counts["errors"] == 0
        assert good.closed_for == "bye"
    # Bounded: the deaf guest's session ends by itself (it never stalls in a drain).
    done, _ = await asyncio.wait([task], timeout=60)
    if not done:
        proc.kill()  # lets the stalled session go, so that the test fails and ends
        await task
    assert done
    assert session.closed_for == "stopped reading"
    assert session.used_bytes == gmf.stats().used_bytes == 0
    out, _ = await asyncio.wait_for(proc.communicate(), 30)  # hung up on: it exits
    assert out.strip() in (b"sent", b"cut off")


async def test_a_guest_cannot_shrink_its_fd_and_the_supervisor_keeps_reading(
    gmf: MemoryFile,
) -> None:
    session = gp.GuestSession(gmf, memcg_id=6)
    proc, task = await gp.start_guest(
        gmf, session, "--shrink", "--seconds", "0.5", "--seed", "9", stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    counts = json.loads(await proc.stdout.read())
    assert await proc.wait() == 0
    await task
    assert counts["shrink_errno"] == errno.EPERM
    # After the attempt the guest went on; every "check" was the supervisor reading the
    # guest's bytes through map_internal (a shrunk file would have been a SIGBUS here).
    assert counts["requests"] > 20 and counts["errors"] == counts["bad_bytes"] == 0
    assert counts["verified_bytes"] > 0
    assert os.fstat(gmf.fd).st_size == gmf.total_size() > 0
    fr = gmf.allocate(PAGE_SIZE)
    assert bytes(gmf.map_internal(fr)[0]) == bytes(PAGE_SIZE)
    gmf.dec_ref(fr)


async def _keeping_guest(
    mf: MemoryFile, session: object, pages: int
) -> tuple[asyncio.subprocess.Process, asyncio.Task[None], list[list[int]]]:
    proc, task = await gp.start_guest(
        mf, session, "--keep", str(pages), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    ranges = json.loads(await proc.stdout.readline())["ranges"]
    return proc, task, ranges


async def _restore_and_verify(
    path: Path, memcg_id: int, held: list[tuple[FileRange, str]], ranges: list[list[int]]
) -> tuple[dict[str, int], object]:
    """Load the checkpoint with async pages, give its ranges to a new guest and have it
    verify them (it waits for each range to be loaded first)."""
    async with await MemoryFile.load(path, _opts(), async_pages=True) as restored:
        assert restored.load_progress() is not None
        session = gp.GuestSession(restored, memcg_id=memcg_id)
        session.adopt(held)
        specs = [f"--verify={o}:{n}:{t}" for o, n, t in ranges]
        proc, task = await gp.start_guest(restored, session, *specs, stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        counts = json.loads(await proc.stdout.read())
        assert await proc.wait() == 0
        await task
        progress = restored.load_progress()
        assert progress is not None and progress.error is None
        assert session.used_bytes == restored.stats().used_bytes == 0
        await restored.wait_released()
        restored.check_invariants()
    return counts, session


async def test_a_stopped_guest_checkpointed_and_restored_with_async_pages_finds_its_data(
    gmf: MemoryFile, tmp_path: Path
) -> None:
    session = gp.GuestSession(gmf, memcg_id=7)
    proc, task, ranges = await _keeping_guest(gmf, session, 4096)  # 16 MiB in 4 ranges
    assert len(ranges) == 4
    proc.send_signal(signal.SIGSTOP)
    held = session.detach()
    assert sorted(fr.start for fr, _ in held) == sorted(o for o, _n, _t in ranges)
    assert {kind for _, kind in held} == {"anon", "cache"}
    path = tmp_path / "guest.ckpt"
    await gmf.save(path)
    for fr, _kind in held:
        gmf.dec_ref(fr)
    proc.kill()
    await proc.wait()
    await task
    assert gmf.stats().used_bytes == 0
    counts, rsession = await _restore_and_verify(path, 7, held, ranges)
    assert counts["verified_bytes"] == 16 << 20
    assert counts["bad_bytes"] == counts["errors"] == 0
    assert rsession.closed_for == "bye"  # type: ignore[attr-defined]


async def test_a_guest_killed_while_its_file_is_saved_keeps_its_pages_in_the_checkpoint(
    gmf: MemoryFile, tmp_path: Path
) -> None:
    session = gp.GuestSession(gmf, memcg_id=8)
    proc, task, ranges = await _keeping_guest(gmf, session, 16384)  # 64 MiB
    proc.send_signal(signal.SIGSTOP)
    held = session.detach()
    path = tmp_path / "guest.ckpt"
    saving = asyncio.create_task(gmf.save(path))
    await asyncio.sleep(0)  # the save has begun
    proc.kill()  # while the save runs: its session ends and frees what it still holds
    await proc.wait()
    await task
    assert session.closed_for == "hung up"
    assert not saving.done()
    await saving
    assert gmf.stats().used_bytes == 64 << 20  # the supervisor's references
    for fr, _kind in held:
        gmf.dec_ref(fr)
    await gmf.wait_released()
    assert gmf.stats().used_bytes == 0
    counts, _ = await _restore_and_verify(path, 8, held, ranges)
    assert counts["verified_bytes"] == 64 << 20
    assert counts["bad_bytes"] == counts["errors"] == 0


async def test_a_stopped_guest_outlives_its_files_aclose_and_its_session_ends_quietly() -> None:
    mf = await MemoryFile.open(opts=_opts())
    session = gp.GuestSession(mf, memcg_id=9)
    proc, task, ranges = await _keeping_guest(mf, session, 256)
    proc.send_signal(signal.SIGSTOP)
    # The file closes under a stopped guest that still maps it: aclose() does not wait
    # for the guest (it cannot know of it), and the guest's pages stay its own mapping's.
    await asyncio.wait_for(mf.aclose(), 30)
    assert not task.done()
    proc.kill()
    assert await proc.wait() == -signal.SIGKILL
    await task  # the session ends without raising, though its file is closed
    assert session.closed_for == "hung up"
    assert session.used_bytes == 0 and not session.ranges
    assert ranges


# A guest that fills an evictable cached range, then grows its anonymous memory 1 MiB at a
# time past its cgroup's limit; it unmaps the cached range when told it is gone.
_GROWING_GUEST = r"""
import json, mmap, socket, sys, time
sys.path.insert(0, sys.argv[2])
from guest_protocol import GuestChannel
ch = GuestChannel(socket.socket(fileno=int(sys.argv[1])))
_hello, fd = ch.hello()
rid, notices, maps = 0, [], []
def req(op, **kw):
    global rid
    rid += 1
    ch.send({"op": op, "id": rid, **kw})
    while True:
        msg = ch.read()
        if msg.get("event") == "evicted":
            notices.append([msg["offset"], msg["length"]])
            cache.close()  # gone: never touched again
            continue
        if msg.get("id") == rid:
            assert msg["ok"], msg
            return msg
a = req("alloc", kind="cache", length=int(sys.argv[3]) << 20)
cache = mmap.mmap(fd, a["length"], offset=a["offset"])
for off in range(0, a["length"], 1 << 20):  # in pieces: no temporary as big as the range
    cache[off:off + (1 << 20)] = b"c" * (1 << 20)
req("evictable", offset=a["offset"])
for _ in range(int(sys.argv[4])):
    r = req("alloc", kind="anon", length=1 << 20)
    m = mmap.mmap(fd, r["length"], offset=r["offset"])
    m[:] = b"a" * r["length"]
    maps.append(m)
    time.sleep(0.005)
req("bye")
print(json.dumps({"notices": notices, "cache": [a["offset"], a["length"]]}))
"""


async def test_memory_pressure_in_a_guests_cgroup_evicts_its_cache_and_tells_it() -> None:
    cg = pytest.importorskip("cgroups")
    parent = cg.v1_parent()  # skips without root or a v1 memory hierarchy

    def limit(path: str) -> None:
        Path(path, "memory.limit_in_bytes").write_text(str(80 << 20))
        # At the limit the guest waits (instead of being OOM-killed) until memory is
        # freed in its group: whether the eviction beats the OOM killer is no question.
        Path(path, "memory.oom_control").write_text("1")

    with cg.make_cgroup(parent, limit) as cgroup:
        opts = MemoryFileOpts(
            delayed_eviction=DelayedEviction.ENABLED,
            use_host_memcg_pressure=True,
            memcg_path=cgroup,
        )
        async with MemoryFile.open(opts=opts) as mf:
            session = gp.GuestSession(mf, memcg_id=10)
            ours, theirs = socket.socketpair()
            examples = str(Path(str(gp.__file__)).parent)
            # The interpreter (~20 MiB) + 32 MiB cached + 40 MiB anonymous: past the
            # 80 MiB limit, and under it again once the cache is gone.
            args = (str(theirs.fileno()), examples, "32", "40")
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _GROWING_GUEST,
                *args,
                pass_fds=(theirs.fileno(),),
                stdout=asyncio.subprocess.PIPE,
            )
            theirs.close()
            gp.join_cgroup(cgroup, proc.pid)
            gfd = mf.guest_fd()
            socket.send_fds(ours, [gp.encode({"event": "hello"})], [gfd])
            os.close(gfd)
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            try:
                await asyncio.wait_for(session.serve(reader, writer), 60)
            finally:
                if proc.returncode is None and session.closed_for != "bye":
                    proc.kill()  # stuck at the limit: nothing was evicted
            out, _ = await proc.communicate()
            assert proc.returncode == 0
            result = json.loads(out)
            assert mf.pressure_events > 0
            assert result["notices"] == [result["cache"]]  # told exactly which range went
            assert session.evicted_bytes == 32 << 20
            assert session.used_bytes == mf.stats().used_bytes == 0
