"""MemoryFile.guest_fd(): a sealed duplicate of the memfd that a real child process holds.

Every child here is a real Python process given the fd (inherited with ``pass_fds`` or
sent over a Unix socket with ``socket.send_fds``); the supervisor side is the test.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import sys
from pathlib import Path

import pytest

from asyncpgalloc import (
    CHUNK_SIZE,
    PAGE_SIZE,
    AccessType,
    ClosedError,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    UnsealableFileError,
)

# A child that tries to shrink and then grow the fd it was given and prints both errnos
# (0 for success), then writes its pid's low byte over the page at argv[2].
_CHILD_TRUNCATE = r"""
import mmap, os, sys
fd, off = int(sys.argv[1]), int(sys.argv[2])
out = []
for size in (0, int(sys.argv[3])):
    try:
        os.ftruncate(fd, size)
        out.append(0)
    except OSError as e:
        out.append(e.errno)
m = mmap.mmap(fd, 4096, offset=off)
m[:] = bytes([0x5A]) * 4096
m.close()
print(*out)
"""

# A child that receives one fd over the socket at argv[1], maps the range named in the
# message, fills it with the byte named there and answers with the sum of what it read.
_CHILD_RECV = r"""
import mmap, socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
msg, fds, _, _ = socket.recv_fds(sock, 64, 1)
off, length, byte = (int(x) for x in msg.split())
m = mmap.mmap(fds[0], length, offset=off)
m[:] = bytes([byte]) * length
sock.sendall(str(sum(m[:])).encode())
m.close()
"""


async def _run(*args: str, pass_fds: tuple[int, ...]) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", *args, pass_fds=pass_fds, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    return out.decode().strip()


def _read(mf: MemoryFile, start: int, length: int) -> bytes:
    return b"".join(bytes(v) for v in mf.map_internal(FileRange(start, start + length)))


async def test_guest_fd_is_a_sealed_close_on_exec_duplicate(mf: MemoryFile) -> None:
    gfd = mf.guest_fd()
    try:
        assert gfd != mf.fd
        assert not os.get_inheritable(gfd)
        assert os.fstat(gfd).st_ino == os.fstat(mf.fd).st_ino
        seals = fcntl.fcntl(gfd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
        assert not seals & (fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
        # A second call seals nothing new and hands out another duplicate.
        gfd2 = mf.guest_fd()
        assert gfd2 not in (gfd, mf.fd)
        os.close(gfd2)
    finally:
        os.close(gfd)


async def test_a_child_cannot_shrink_the_file_and_the_supervisor_keeps_reading(
    mf: MemoryFile,
) -> None:
    fr = mf.allocate(4 * PAGE_SIZE)
    mf.map_internal(fr, AccessType.WRITE)[0][:] = b"\xa5" * fr.length
    gfd = mf.guest_fd()
    try:
        out = await _run(
            _CHILD_TRUNCATE, str(gfd), str(fr.start), str(2 * CHUNK_SIZE), pass_fds=(gfd,)
        )
    finally:
        os.close(gfd)
    shrink, grow = (int(x) for x in out.split())
    # Checked before any read: unsealed, the shrink would make the next read a SIGBUS.
    assert shrink == errno.EPERM
    assert grow == 0  # growth stays allowed
    assert os.fstat(mf.fd).st_size == 2 * CHUNK_SIZE
    data = _read(mf, fr.start, fr.length)
    assert data[:PAGE_SIZE] == b"\x5a" * PAGE_SIZE  # the child's write
    assert data[PAGE_SIZE:] == b"\xa5" * (3 * PAGE_SIZE)
    mf.dec_ref(fr)


async def test_growth_after_a_guest_grew_the_file_never_shrinks_it(mf: MemoryFile) -> None:
    first = mf.allocate(PAGE_SIZE)
    gfd = mf.guest_fd()
    try:
        os.ftruncate(gfd, 3 * CHUNK_SIZE)  # as a guest may
        # The file needs a second chunk: it must not try to shrink 3 GiB to 2 GiB.
        second = mf.allocate(CHUNK_SIZE)
        assert mf.total_size() == 2 * CHUNK_SIZE
        assert os.fstat(gfd).st_size == 3 * CHUNK_SIZE
        third = mf.allocate(2 * CHUNK_SIZE)
        assert mf.total_size() == 4 * CHUNK_SIZE
        assert os.fstat(gfd).st_size == 4 * CHUNK_SIZE
        assert _read(mf, third.end - PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)
    finally:
        os.close(gfd)
    for fr in (first, second, third):
        mf.dec_ref(fr)


async def test_the_fd_passes_over_a_unix_socket_to_a_child(mf: MemoryFile) -> None:
    fr = mf.allocate(8 * PAGE_SIZE)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD_RECV, str(theirs.fileno()), pass_fds=(theirs.fileno(),)
    )
    theirs.close()
    gfd = mf.guest_fd()
    try:
        socket.send_fds(ours, [f"{fr.start} {fr.length} 7".encode()], [gfd])
    finally:
        os.close(gfd)  # the child has its own copy now
    loop = asyncio.get_running_loop()
    ours.setblocking(False)
    answer = await loop.sock_recv(ours, 64)
    ours.close()
    assert await proc.wait() == 0
    assert int(answer) == 7 * fr.length
    assert _read(mf, fr.start, fr.length) == b"\x07" * fr.length
    mf.dec_ref(fr)


async def test_a_disk_backed_file_cannot_be_handed_out(tmp_path: Path) -> None:
    opts = MemoryFileOpts(disk_backed_file=True)
    async with MemoryFile.open(tmp_path / "backing", opts) as mf:
        with pytest.raises(UnsealableFileError, match="disk-backed"):
            mf.guest_fd()


@pytest.mark.parametrize("where", ["ext4", "tmpfs", "memfd"])
async def test_a_file_that_cannot_be_sealed_raises_and_dups_nothing(
    tmp_path: Path, where: str
) -> None:
    if where == "memfd":
        file: int | Path = os.memfd_create("no-sealing", os.MFD_CLOEXEC)
    elif where == "tmpfs":
        file = Path("/dev/shm") / f"asyncpgalloc-test-{os.getpid()}-{id(tmp_path)}"
    else:
        file = tmp_path / "backing"
    before = set(os.listdir("/proc/self/fd"))
    try:
        async with MemoryFile.open(file) as mf:
            before = set(os.listdir("/proc/self/fd"))
            with pytest.raises(UnsealableFileError, match="MFD_ALLOW_SEALING"):
                mf.guest_fd()
            assert set(os.listdir("/proc/self/fd")) == before
            # The file still works (nothing half-done).
            mf.dec_ref(mf.allocate(PAGE_SIZE))
    finally:
        if isinstance(file, Path) and file.exists():
            file.unlink()


async def test_a_closed_file_hands_out_nothing() -> None:
    mf = await MemoryFile.open()
    await mf.aclose()
    with pytest.raises(ClosedError):
        mf.guest_fd()
