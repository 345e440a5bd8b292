"""Tests of the host layer against the real kernel: real memfds, real syscalls, no mocks."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import json
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncpgalloc import host
from asyncpgalloc.ranges import HUGE_PAGE_SIZE, PAGE_SIZE, huge_round_down, huge_round_up

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture(autouse=True)
def _restore_populate_state() -> Iterator[None]:
    saved = (host.populate_state.madv_disabled, host.populate_state.mlock_disabled)
    host.populate_state.madv_disabled = False
    host.populate_state.mlock_disabled = False
    try:
        yield
    finally:
        host.populate_state.madv_disabled, host.populate_state.mlock_disabled = saved


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = host.create_memfd("asyncpgalloc-test")
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def mappings() -> Iterator[list[host.ChunkMapping]]:
    """Mappings to release after the test, even if it fails."""
    made: list[host.ChunkMapping] = []
    try:
        yield made
    finally:
        for m in made:
            m.release()


def _map(mappings: list[host.ChunkMapping], fd: int, offset: int, length: int) -> host.ChunkMapping:
    m = host.ChunkMapping(fd, offset, length)
    mappings.append(m)
    return m


def _resident(addr: int, length: int) -> list[int]:
    """Indexes of the pages of the range that mincore reports resident."""
    out = bytearray(length // PAGE_SIZE)
    host.mincore(addr, length, out)
    return [i for i, b in enumerate(out) if b & 1]


def _pages(start: int, end: int, base: int) -> list[int]:
    return list(range((start - base) // PAGE_SIZE, (end - base) // PAGE_SIZE))


# Huge-aligned, just above the 47-bit user address space that mmap hands out unless asked for
# more, so nothing is ever mapped there: madvise and mlock fail on it with ENOMEM.
_UNMAPPED = 1 << 47


def _vmlck_kib() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmLck:")).split()[1])


def _maps_lines(name: str) -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if name in line]


# --- files -----------------------------------------------------------------------------------


def test_memfd_is_cloexec_and_empty(memfd: int) -> None:
    assert fcntl.fcntl(memfd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    st = os.fstat(memfd)
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == 0
    assert host.file_usage(memfd) == 0


def test_open_backing_file_creates_0600_cloexec(tmp_path: Path) -> None:
    path = tmp_path / "backing"
    old_umask = os.umask(0o022)
    try:
        fd = host.open_backing_file(path)
    finally:
        os.umask(old_umask)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
        assert os.fstat(fd).st_ino == path.stat().st_ino
        # Opened read-write.
        assert os.pwrite(fd, b"abc", 0) == 3
        assert os.pread(fd, 3, 0) == b"abc"
    finally:
        os.close(fd)


def test_open_backing_file_keeps_existing_file_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "existing"
    path.write_bytes(b"keep me")
    path.chmod(0o640)
    fd = host.open_backing_file(str(path))
    try:
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o640
        assert os.pread(fd, 100, 0) == b"keep me"
    finally:
        os.close(fd)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_open_backing_file_rejects_directory(tmp_path: Path) -> None:
    before = _open_fds()
    with pytest.raises(ValueError, match="directory"):
        host.open_backing_file(tmp_path)
    assert _open_fds() == before


def test_open_backing_file_rejects_fifo_without_leaking_fd(tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    before = _open_fds()
    with pytest.raises(ValueError, match="regular file"):
        host.open_backing_file(path)
    assert _open_fds() == before


def test_set_file_size(memfd: int) -> None:
    host.set_file_size(memfd, 3 * GiB)
    assert os.fstat(memfd).st_size == 3 * GiB
    # Growing makes a hole, not memory.
    assert host.file_usage(memfd) == 0


# --- fallocate -------------------------------------------------------------------------------


def test_write_through_view_reads_back_with_pread(
    memfd: int, mappings: list[host.ChunkMapping]
) -> None:
    host.set_file_size(memfd, 4 * MiB)
    m = _map(mappings, memfd, 0, 4 * MiB)
    v = m.view(PAGE_SIZE + 10, 5)
    v[:] = b"hello"
    assert os.pread(memfd, 5, PAGE_SIZE + 10) == b"hello"
    os.pwrite(memfd, b"world", 3 * MiB)
    assert bytes(m.view(3 * MiB, 5)) == b"world"
    v.release()


def test_commit_raises_usage_by_length(memfd: int) -> None:
    host.set_file_size(memfd, 8 * MiB)
    host.commit(memfd, MiB, 3 * MiB)
    assert host.file_usage(memfd) == 3 * MiB
    # Committing committed pages is free and idempotent.
    host.commit(memfd, 2 * MiB, 2 * MiB)
    assert host.file_usage(memfd) == 4 * MiB - MiB
    assert os.fstat(memfd).st_size == 8 * MiB
    assert os.pread(memfd, 16, MiB) == bytes(16)


def test_decommit_zeroes_and_frees(memfd: int, mappings: list[host.ChunkMapping]) -> None:
    host.set_file_size(memfd, 16 * PAGE_SIZE)
    m = _map(mappings, memfd, 0, 16 * PAGE_SIZE)
    v = m.view(0, 8 * PAGE_SIZE)
    v[:] = b"\xaa" * (8 * PAGE_SIZE)
    del v
    assert host.file_usage(memfd) == 8 * PAGE_SIZE
    host.decommit(memfd, 2 * PAGE_SIZE, 3 * PAGE_SIZE)
    assert host.file_usage(memfd) == 5 * PAGE_SIZE
    data = os.pread(memfd, 8 * PAGE_SIZE, 0)
    assert data[: 2 * PAGE_SIZE] == b"\xaa" * (2 * PAGE_SIZE)
    assert data[2 * PAGE_SIZE : 5 * PAGE_SIZE] == bytes(3 * PAGE_SIZE)
    assert data[5 * PAGE_SIZE :] == b"\xaa" * (3 * PAGE_SIZE)
    # The hole punched the pages out of the live mapping too.
    assert bytes(m.view(2 * PAGE_SIZE, 16)) == bytes(16)
    # The size is kept.
    assert os.fstat(memfd).st_size == 16 * PAGE_SIZE


def test_fallocate_bad_fd_raises_ebadf() -> None:
    with pytest.raises(OSError) as info:
        host.fallocate(-1, 0, 0, PAGE_SIZE)
    assert info.value.errno == errno.EBADF
    with pytest.raises(OSError) as info:
        host.decommit(-1, 0, PAGE_SIZE)
    assert info.value.errno == errno.EBADF


def test_fallocate_bad_mode_raises_with_errno(memfd: int) -> None:
    host.set_file_size(memfd, MiB)
    # PUNCH_HOLE without KEEP_SIZE is invalid.
    with pytest.raises(OSError) as info:
        host.fallocate(memfd, host.FALLOC_FL_PUNCH_HOLE, 0, PAGE_SIZE)
    assert info.value.errno == errno.EOPNOTSUPP


def test_negative_arguments_are_rejected_before_the_syscall(memfd: int) -> None:
    with pytest.raises(ValueError):
        host.commit(memfd, -PAGE_SIZE, PAGE_SIZE)
    with pytest.raises(ValueError):
        host.commit(memfd, 0, -PAGE_SIZE)
    with pytest.raises(ValueError):
        host.commit(memfd, 2**63, PAGE_SIZE)
    with pytest.raises(ValueError):
        host.madvise(0, -1, host.MADV_NOHUGEPAGE)
    with pytest.raises(ValueError):
        host.ChunkMapping(memfd, 0, 0)
    with pytest.raises(ValueError):
        host.ChunkMapping(memfd, -PAGE_SIZE, PAGE_SIZE)
    assert host.file_usage(memfd) == 0


def test_offsets_above_4gib(memfd: int, mappings: list[host.ChunkMapping]) -> None:
    host.set_file_size(memfd, 6 * GiB)
    host.commit(memfd, 5 * GiB, MiB)
    assert host.file_usage(memfd) == MiB
    # mmap's off_t is 64-bit too.
    m = _map(mappings, memfd, 5 * GiB, MiB)
    m.view(123, 3)[:] = b"xyz"
    assert os.pread(memfd, 3, 5 * GiB + 123) == b"xyz"
    # Nothing landed at the offset truncated to 32 bits.
    assert os.pread(memfd, 3, GiB + 123) == bytes(3)
    host.decommit(memfd, 5 * GiB, MiB)
    assert host.file_usage(memfd) == 0
    assert os.pread(memfd, 3, 5 * GiB + 123) == bytes(3)


# --- mincore ---------------------------------------------------------------------------------


def test_mincore_reports_exactly_the_touched_pages(
    memfd: int, mappings: list[host.ChunkMapping]
) -> None:
    npages = 32
    host.set_file_size(memfd, npages * PAGE_SIZE)
    m = _map(mappings, memfd, 0, npages * PAGE_SIZE)
    assert _resident(m.addr, npages * PAGE_SIZE) == []
    touched = [1, 5, 6, 31]
    for p in touched:
        m.view(p * PAGE_SIZE + 7, 1)[0] = 1
    assert _resident(m.addr, npages * PAGE_SIZE) == touched
    # Committed but untouched pages are counted by st_blocks, not by mincore.
    host.commit(memfd, 10 * PAGE_SIZE, 4 * PAGE_SIZE)
    assert _resident(m.addr, npages * PAGE_SIZE) == touched
    assert host.file_usage(memfd) == (len(touched) + 4) * PAGE_SIZE


def test_mincore_does_not_copy_and_checks_buffer(
    memfd: int, mappings: list[host.ChunkMapping]
) -> None:
    host.set_file_size(memfd, 4 * PAGE_SIZE)
    m = _map(mappings, memfd, 0, 4 * PAGE_SIZE)
    m.view(2 * PAGE_SIZE, 1)[0] = 1
    out = bytearray(b"\xfe" * 6)
    host.mincore(m.addr, 4 * PAGE_SIZE, out)
    assert [b & 1 for b in out[:4]] == [0, 0, 1, 0]
    # Bytes beyond the range are left alone, and `out` is free again (no export left).
    assert out[4:] == b"\xfe\xfe"
    out.extend(b"x")
    # A partial last page counts as a page.
    out2 = bytearray(3)
    host.mincore(m.addr, 2 * PAGE_SIZE + 1, out2)
    assert [b & 1 for b in out2] == [0, 0, 1]
    with pytest.raises(ValueError):
        host.mincore(m.addr, 4 * PAGE_SIZE, bytearray(3))


def test_mincore_errors_come_from_the_kernel(memfd: int) -> None:
    with pytest.raises(OSError) as info:
        host.mincore(PAGE_SIZE + 1, PAGE_SIZE, bytearray(2))
    assert info.value.errno == errno.EINVAL


# --- populate --------------------------------------------------------------------------------


def test_try_populate_madvise_populates_whole_range(
    memfd: int, mappings: list[host.ChunkMapping]
) -> None:
    size = 6 * MiB
    host.set_file_size(memfd, size)
    m = _map(mappings, memfd, 0, size)
    # Unaligned on purpose: MADV_POPULATE_WRITE must populate all of it, not just an interior.
    start = m.addr + PAGE_SIZE
    end = start + 4 * MiB
    assert host.try_populate(start, end - start)
    assert host.populate_state.madv_disabled is False
    assert _resident(m.addr, size) == _pages(start, end, m.addr)
    assert host.file_usage(memfd) == 4 * MiB


def test_try_populate_single_page_makes_no_syscall(
    memfd: int, mappings: list[host.ChunkMapping]
) -> None:
    host.set_file_size(memfd, 4 * PAGE_SIZE)
    m = _map(mappings, memfd, 0, 4 * PAGE_SIZE)
    assert host.try_populate(m.addr, PAGE_SIZE)
    assert _resident(m.addr, 4 * PAGE_SIZE) == []
    assert host.populate_state.madv_disabled is False


def test_try_populate_mlock_fallback_populates_huge_interior(
    memfd: int, mappings: list[host.ChunkMapping]
) -> None:
    host.populate_state.madv_disabled = True
    size = 8 * MiB
    host.set_file_size(memfd, size)
    m = _map(mappings, memfd, 0, size)
    locked_before = _vmlck_kib()
    start = m.addr + PAGE_SIZE
    end = m.addr + size - PAGE_SIZE
    interior_start, interior_end = huge_round_up(start), huge_round_down(end)
    assert interior_end - interior_start >= 2 * HUGE_PAGE_SIZE
    assert host.try_populate(start, end - start)
    assert host.populate_state.mlock_disabled is False
    assert _resident(m.addr, size) == _pages(interior_start, interior_end, m.addr)
    # munlock undid the lock: nothing stays locked.
    assert _vmlck_kib() == locked_before


def test_try_populate_mlock_empty_interior_makes_no_syscall(
    memfd: int, mappings: list[host.ChunkMapping]
) -> None:
    host.populate_state.madv_disabled = True
    host.set_file_size(memfd, 4 * MiB)
    m = _map(mappings, memfd, 0, 4 * MiB)
    start = huge_round_up(m.addr) + PAGE_SIZE
    assert host.try_populate(start, HUGE_PAGE_SIZE - 2 * PAGE_SIZE)
    assert _resident(m.addr, 4 * MiB) == []


def test_madvise_failure_disables_it_for_good(
    memfd: int, mappings: list[host.ChunkMapping], caplog: pytest.LogCaptureFixture
) -> None:
    hole = _UNMAPPED
    with caplog.at_level(logging.INFO, logger="asyncpgalloc"):
        # Two pages never span a huge-aligned interior, so the mlock fallback has nothing to
        # do and succeeds without a syscall: only madvise fails.
        assert host.try_populate(hole, 2 * PAGE_SIZE)
    assert host.populate_state.madv_disabled is True
    assert host.populate_state.mlock_disabled is False
    assert host.can_populate()
    records = [r for r in caplog.records if "MADV_POPULATE_WRITE" in r.getMessage()]
    assert len(records) == 1
    # ENOMEM (unmapped) is unexpected, unlike EINVAL (old kernel), so it is a warning.
    assert records[0].levelno == logging.WARNING
    assert "ENOMEM" in records[0].getMessage()

    # The next call goes straight to mlock, which populates only the huge-aligned interior.
    size = 8 * MiB
    host.set_file_size(memfd, size)
    m = _map(mappings, memfd, 0, size)
    start, end = m.addr + PAGE_SIZE, m.addr + size - PAGE_SIZE
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="asyncpgalloc"):
        assert host.try_populate(start, end - start)
    assert caplog.records == []
    assert host.populate_state.madv_disabled is True
    assert _resident(m.addr, size) == _pages(huge_round_up(start), huge_round_down(end), m.addr)


def test_mlock_failure_disables_it_and_populate_gives_up(
    memfd: int, mappings: list[host.ChunkMapping], caplog: pytest.LogCaptureFixture
) -> None:
    host.populate_state.madv_disabled = True
    hole = _UNMAPPED
    with caplog.at_level(logging.INFO, logger="asyncpgalloc"):
        # An unmapped range: mlock fails with ENOMEM.
        assert not host.try_populate(hole, 8 * MiB)
    assert host.populate_state.mlock_disabled is True
    assert not host.can_populate()
    assert any(
        "mlock failed" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records
    )
    # Both methods disabled: nothing is populated any more.
    host.set_file_size(memfd, 4 * MiB)
    m = _map(mappings, memfd, 0, 4 * MiB)
    assert not host.try_populate(m.addr, 4 * MiB)
    assert _resident(m.addr, 4 * MiB) == []


def test_can_populate() -> None:
    state = host.populate_state
    for madv in (False, True):
        for mlock in (False, True):
            state.madv_disabled, state.mlock_disabled = madv, mlock
            assert host.can_populate() == (not (madv and mlock))


# The subprocess lowers RLIMIT_MEMLOCK and drops CAP_IPC_LOCK (effective and permitted), so
# mlock's limit applies to it even when the tests run as root.
_MLOCK_CHILD = r"""
import ctypes, errno, json, logging, resource, sys
from asyncpgalloc import host
from asyncpgalloc.ranges import PAGE_SIZE, huge_round_down, huge_round_up

limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))

class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]

CAP_IPC_LOCK = 14
libc = ctypes.CDLL(None, use_errno=True)
hdr = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
data = (Data * 2)()
if libc.capget(ctypes.byref(hdr), data) != 0:
    raise OSError(ctypes.get_errno(), "capget")
data[0].effective &= ~(1 << CAP_IPC_LOCK)
data[0].permitted &= ~(1 << CAP_IPC_LOCK)
if libc.capset(ctypes.byref(hdr), data) != 0:
    raise OSError(ctypes.get_errno(), "capset")
with open("/proc/self/status") as f:
    capeff = int(next(l for l in f if l.startswith("CapEff:")).split()[1], 16)

records = []
class Collect(logging.Handler):
    def emit(self, record):
        records.append([record.levelname, record.getMessage()])
host.logger.addHandler(Collect())
host.logger.setLevel(logging.DEBUG)

size = 12 << 20
fd = host.create_memfd()
host.set_file_size(fd, size)
m = host.ChunkMapping(fd, 0, size)
start, end = huge_round_up(m.addr), huge_round_down(m.addr + size)
# What a single mlock of the whole range gets: proves the limit really applies.
libc.mlock.argtypes = libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
raw = libc.mlock(start, end - start)
raw_errno = ctypes.get_errno() if raw else 0
libc.munlock(start, end - start)

host.populate_state.madv_disabled = True
ok = host.try_populate(m.addr, size)
out = bytearray(size // PAGE_SIZE)
host.mincore(m.addr, size, out)
print(json.dumps({
    "cap_ipc_lock": bool(capeff & (1 << CAP_IPC_LOCK)),
    "raw_errno": raw_errno,
    "interior": end - start,
    "ok": ok,
    "mlock_disabled": host.populate_state.mlock_disabled,
    "resident": sum(b & 1 for b in out) * PAGE_SIZE,
    "records": records,
}))
"""


def _run_mlock_child(limit: int) -> dict[str, object]:
    # The child imports the very package this process imported.
    package_root = str(Path(host.__file__).parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _MLOCK_CHILD, str(limit)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=package_root,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    assert result["cap_ipc_lock"] is False
    return result


def test_mlock_fallback_works_in_pieces_under_rlimit() -> None:
    r = _run_mlock_child(HUGE_PAGE_SIZE)
    assert isinstance(r["interior"], int)
    assert r["interior"] >= 4 * HUGE_PAGE_SIZE
    # One mlock of the whole interior is over the limit...
    assert r["raw_errno"] == errno.ENOMEM
    # ...but try_populate's pieces are not.
    assert r["ok"] is True
    assert r["mlock_disabled"] is False
    assert r["resident"] == r["interior"]
    assert r["records"] == []


def test_mlock_without_cap_ipc_lock_and_zero_rlimit_disables_mlock() -> None:
    r = _run_mlock_child(0)
    assert r["raw_errno"] == errno.EPERM
    assert r["ok"] is False
    assert r["mlock_disabled"] is True
    assert r["resident"] == 0
    assert isinstance(r["records"], list)
    assert len(r["records"]) == 1
    level, message = r["records"][0]
    assert level == "INFO"
    assert "mlock failed" in message and "EPERM" in message


# --- madvise, IMA ----------------------------------------------------------------------------


def _vmflags(addr: int) -> list[str]:
    with open("/proc/self/smaps") as f:
        in_vma = False
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                in_vma = int(head.split("-")[0], 16) == addr
            elif in_vma and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no VMA at {addr:#x}")


@pytest.mark.parametrize(
    ("advice", "flag"), [(host.MADV_HUGEPAGE, "hg"), (host.MADV_NOHUGEPAGE, "nh")]
)
def test_madvise_hugepage_flags(
    memfd: int, mappings: list[host.ChunkMapping], advice: int, flag: str
) -> None:
    host.set_file_size(memfd, 4 * MiB)
    m = _map(mappings, memfd, 0, 4 * MiB)
    try:
        host.madvise(m.addr, 4 * MiB, advice)
    except OSError as e:
        # A kernel without THP refuses; it must say so with an errno.
        assert e.errno == errno.EINVAL
        return
    assert flag in _vmflags(m.addr)


def test_madvise_errors_carry_errno(memfd: int, mappings: list[host.ChunkMapping]) -> None:
    host.set_file_size(memfd, MiB)
    m = _map(mappings, memfd, 0, MiB)
    with pytest.raises(OSError) as info:
        host.madvise(m.addr, MiB, 12345)
    assert info.value.errno == errno.EINVAL


def test_ima_workaround_on_empty_memfd(memfd: int, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="asyncpgalloc"):
        host.ima_workaround(memfd)
    assert caplog.records == []
    assert host.file_usage(memfd) == 0
    assert os.fstat(memfd).st_size == 0
    # The temporary mapping is gone.
    assert not _maps_lines("memfd:asyncpgalloc-test")


def test_ima_workaround_failure_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    # MFD_NOEXEC_SEAL does not stop PROT_EXEC mappings and nothing here is mounted noexec, so
    # the kernel is made to refuse with a bad fd.
    with caplog.at_level(logging.DEBUG, logger="asyncpgalloc"):
        host.ima_workaround(-1)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "EBADF" in caplog.records[0].getMessage()


# --- ChunkMapping ----------------------------------------------------------------------------


def test_chunk_mapping_view_shape(memfd: int, mappings: list[host.ChunkMapping]) -> None:
    host.set_file_size(memfd, MiB)
    m = _map(mappings, memfd, 0, MiB)
    assert m.length == MiB
    assert m.addr % PAGE_SIZE == 0
    assert not m.released
    v = m.view(100, 200)
    assert (v.format, v.ndim, v.itemsize, v.nbytes, v.readonly) == ("B", 1, 1, 200, False)
    assert m.view(MiB, 0).nbytes == 0
    assert m.view(0, MiB).nbytes == MiB
    # The view is exactly where addr says.
    v[0] = 0x5A
    assert ctypes.c_ubyte.from_address(m.addr + 100).value == 0x5A


@pytest.mark.parametrize(("offset", "length"), [(-1, 10), (0, -1), (MiB - 5, 6), (MiB + 1, 0)])
def test_chunk_mapping_view_out_of_bounds(
    memfd: int, mappings: list[host.ChunkMapping], offset: int, length: int
) -> None:
    host.set_file_size(memfd, MiB)
    m = _map(mappings, memfd, 0, MiB)
    with pytest.raises(ValueError):
        m.view(offset, length)


def test_chunk_mapping_bad_fd_raises_oserror() -> None:
    with pytest.raises(OSError) as info:
        host.ChunkMapping(-1, 0, PAGE_SIZE)
    assert info.value.errno == errno.EBADF


def test_chunk_mapping_outlives_release_while_viewed() -> None:
    name = "asyncpgalloc-test-lifetime"
    fd = host.create_memfd(name)
    try:
        host.set_file_size(fd, 4 * PAGE_SIZE)
        m = host.ChunkMapping(fd, PAGE_SIZE, 2 * PAGE_SIZE)
        v = m.view(PAGE_SIZE, 8)
        sub = v[2:4]
        assert len(_maps_lines(name)) == 1
        m.release()
        # Checked before touching the views, so a premature munmap fails here, not by SIGSEGV.
        assert len(_maps_lines(name)) == 1
        assert m.released
        m.release()  # idempotent
        with pytest.raises(ValueError):
            m.view(0, 1)
        # The owner is done, but the views still point at live memory.
        v[:] = b"12345678"
        assert os.pread(fd, 8, 2 * PAGE_SIZE) == b"12345678"
        os.pwrite(fd, b"ab", 2 * PAGE_SIZE + 2)
        assert bytes(sub) == b"ab"
        assert len(_maps_lines(name)) == 1
        del v
        gc.collect()
        # `sub` alone still keeps it mapped.
        assert len(_maps_lines(name)) == 1
        assert bytes(sub) == b"ab"
        del sub
        gc.collect()
        assert _maps_lines(name) == []
    finally:
        os.close(fd)


def test_chunk_mapping_release_unmaps_at_once_without_views() -> None:
    name = "asyncpgalloc-test-unmap"
    fd = host.create_memfd(name)
    try:
        host.set_file_size(fd, PAGE_SIZE)
        m = host.ChunkMapping(fd, 0, PAGE_SIZE)
        m.view(0, 1)[0] = 1  # a view that is already gone
        assert len(_maps_lines(name)) == 1
        m.release()
        assert _maps_lines(name) == []
    finally:
        os.close(fd)


def test_chunk_mapping_survives_closing_fd(mappings: list[host.ChunkMapping]) -> None:
    fd = host.create_memfd("asyncpgalloc-test")
    host.set_file_size(fd, PAGE_SIZE)
    m = _map(mappings, fd, 0, PAGE_SIZE)
    os.close(fd)
    m.view(0, 3)[:] = b"abc"
    assert bytes(m.view(0, 3)) == b"abc"


# --- zero ------------------------------------------------------------------------------------


def test_zero_exactly_the_range(memfd: int, mappings: list[host.ChunkMapping]) -> None:
    size = 3 * PAGE_SIZE
    host.set_file_size(memfd, size)
    m = _map(mappings, memfd, 0, size)
    m.view(0, size)[:] = b"\xaa" * size
    host.zero(m.addr + 100, 5000)
    data = os.pread(memfd, size, 0)
    assert data[:100] == b"\xaa" * 100
    assert data[100:5100] == bytes(5000)
    assert data[5100:] == b"\xaa" * (size - 5100)
    host.zero(m.addr, 0)
    assert os.pread(memfd, 1, 0) == b"\xaa"
