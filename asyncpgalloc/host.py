"""The host layer: every syscall asyncpgalloc makes, and host feature detection.

This module is the only one that talks to the kernel. Everything here is a thin, synchronous
wrapper over one or a few syscalls; nothing here knows about allocation state.

Costs and blocking: calls documented as *blocking* may take milliseconds to seconds, in
proportion to the bytes they touch (they fault, zero or free pages, or walk page tables), and
must be run in an executor by async callers. The rest cost one cheap syscall (a few µs) or
none. All ctypes calls release the GIL while in the kernel.

Errors from the kernel are raised as :class:`OSError` carrying ``errno``. Arguments that ctypes
would silently truncate (negative sizes, offsets beyond ``off_t``) are rejected with
:class:`ValueError` before any syscall, so a bad argument never turns into a wrong syscall.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import resource
import stat
import weakref
from typing import NoReturn

from .ranges import (
    CHUNK_SIZE,
    HUGE_PAGE_SIZE,
    MAX_MAPPABLE_CHUNKS,
    PAGE_SIZE,
    huge_round_down,
    huge_round_up,
)

__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "GUEST_SEALS",
    "MADV_HUGEPAGE",
    "MADV_NOHUGEPAGE",
    "MADV_POPULATE_WRITE",
    "ChunkMapping",
    "LentMapping",
    "PopulateState",
    "can_populate",
    "commit",
    "create_memfd",
    "decommit",
    "fallocate",
    "file_usage",
    "fs_type",
    "grow_file",
    "ima_workaround",
    "madvise",
    "mappable_chunks",
    "mincore",
    "open_backing_file",
    "populate_state",
    "pwrite_zeros",
    "seal_against_shrinking",
    "set_file_size",
    "try_populate",
    "undo_growth",
    "zero",
]

logger = logging.getLogger("asyncpgalloc")

MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
# Python 3.11's mmap module has no MADV_POPULATE_WRITE (Linux 5.14+).
MADV_POPULATE_WRITE = 23

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2

_PROT_READ = 0x1
_PROT_WRITE = 0x2
_PROT_EXEC = 0x4
_MAP_SHARED = 0x01

# Bounds of the C types the arguments are passed as; ctypes truncates silently beyond them.
_OFF_MAX = 2**63 - 1
_SIZE_MAX = 2**64 - 1

# One handle for the whole process; use_errno makes ctypes save errno right after each call,
# before anything else in the interpreter can clobber it.
_libc = ctypes.CDLL(None, use_errno=True)

_mmap = _libc.mmap
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
]
_mmap.restype = ctypes.c_void_p

_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_munmap.restype = ctypes.c_int

_madvise = _libc.madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise.restype = ctypes.c_int

_mlock = _libc.mlock
_mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_mlock.restype = ctypes.c_int

_munlock = _libc.munlock
_munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_munlock.restype = ctypes.c_int

_mincore = _libc.mincore
_mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_mincore.restype = ctypes.c_int

# fallocate64 takes off_t as int64 on every ABI, so 5 GiB offsets are safe even where plain
# fallocate's off_t would be 32 bits.
_fallocate64 = _libc.fallocate64
_fallocate64.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate64.restype = ctypes.c_int

# ctypes turns a c_void_p result of NULL into None and (void *)-1 into this.
_MAP_FAILED: int = ctypes.c_void_p(-1).value or 0


def _raise_errno() -> NoReturn:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


def _errno_str(err: int) -> str:
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"


def _check_range(what: str, value: int, maximum: int) -> None:
    if not 0 <= value <= maximum:
        raise ValueError(f"{what} {value} out of range [0, {maximum}]")


def create_memfd(name: str = "asyncpgalloc") -> int:
    """Create an anonymous, close-on-exec, size-0 memory file (one cheap syscall).

    It allows sealing (``MFD_ALLOW_SEALING``) so that :func:`seal_against_shrinking`
    can make it safe to hand to another process; no seal is set until then.
    """
    return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


#: The seals :func:`seal_against_shrinking` sets: no shrinking, and no further seals
#: (a holder could otherwise add ``F_SEAL_GROW`` or ``F_SEAL_FUTURE_WRITE`` and make
#: the owner's next growth or writable mapping fail).
GUEST_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


def seal_against_shrinking(fd: int) -> None:
    """Seal ``fd`` with :data:`GUEST_SEALS`, or check that it already is. Two cheap fcntls.

    Raises :class:`OSError` (``EINVAL``: not a shmem file, e.g. on a disk file system;
    ``EPERM``: a memfd made without ``MFD_ALLOW_SEALING`` or a tmpfs file, or one
    already sealed with ``F_SEAL_SEAL`` but not ``F_SEAL_SHRINK``). The seals are
    permanent: the file can still grow and have holes punched, never shrink.
    """
    if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & GUEST_SEALS == GUEST_SEALS:
        return
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, GUEST_SEALS)


def open_backing_file(path: str | os.PathLike[str]) -> int:
    """Open (creating with mode 0o600 if needed) a regular file to back memory.

    An existing file keeps its mode: changing a file someone else made is not ours to do.
    Anything but a regular file (a directory, a FIFO, a device, or a file of a
    pseudo file system such as ``/proc/version``, which ``fstat`` calls regular) is
    rejected with :class:`ValueError`, since fallocate and shared mappings mean
    something else there. One cheap open plus fstat and fstatfs; may block on a slow
    filesystem.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except IsADirectoryError as e:
        raise ValueError(f"backing file {os.fspath(path)!r} is a directory") from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"backing file {os.fspath(path)!r} is not a regular file")
        fs = _PSEUDO_FILESYSTEMS.get(fs_type(fd))
        if fs is not None:
            # procfs and sysfs files look regular to fstat, but hold no pages:
            # ftruncate does nothing and mapping them fails (EIO) or worse.
            raise ValueError(
                f"backing file {os.fspath(path)!r} is on {fs}, not a file system that "
                "stores data: it is not a regular file"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def mappable_chunks() -> int:
    """How many 1 GiB chunks this process could map at most: the address space
    (:data:`~asyncpgalloc.ranges.MAX_MAPPABLE_CHUNKS`), or ``RLIMIT_AS`` if lower.
    One getrlimit; an upper bound (other mappings share the space)."""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return MAX_MAPPABLE_CHUNKS
    return min(MAX_MAPPABLE_CHUNKS, limit // CHUNK_SIZE)


# struct statfs: f_type is its first field, a long (__fsword_t) on 64-bit Linux;
# 120 bytes on x86-64 and arm64 (the buffer leaves room).
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_fstatfs.restype = ctypes.c_int

#: statfs f_type of pseudo file systems whose "regular" files hold no pages (linux/magic.h).
_PSEUDO_FILESYSTEMS = {
    0x9FA0: "procfs",
    0x62656572: "sysfs",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0x27E0EB: "cgroupfs",
    0x63677270: "cgroup2fs",
    0xCAFE4A11: "bpffs",
    0x62656570: "configfs",
    0x6165676C: "pstore",
    0xDE5E81E4: "efivarfs",
    0x42494E4D: "binfmt_misc",
    0xF97CFF8C: "selinuxfs",
}


def fs_type(fd: int) -> int:
    """The ``f_type`` (file system magic) of the file system holding ``fd``. One fstatfs."""
    buf = (ctypes.c_long * 32)()
    if _fstatfs(fd, buf) != 0:
        _raise_errno()
    return int(buf[0]) & 0xFFFFFFFF


def set_file_size(fd: int, size: int) -> None:
    """Set the file's size (ftruncate). Cheap when growing (the new tail is a hole).

    Shrinking frees the pages cut off and so costs in proportion to them.
    """
    os.ftruncate(fd, size)


def grow_file(fd: int, size: int) -> None:
    """Make the file at least ``size`` bytes long (an fstat, and an ftruncate if shorter).

    Never shrinks: a process holding a sealed duplicate (:func:`seal_against_shrinking`)
    may have grown the file past ``size``, and shrinking it back would fail with
    ``EPERM`` (and cut off what that process wrote there). Cheap: the new tail is a hole.
    """
    if os.fstat(fd).st_size < size:
        os.ftruncate(fd, size)


def undo_growth(fd: int, size: int) -> None:
    """Shrink the file back to ``size`` after a failed growth, unless it is sealed
    against shrinking (then the grown tail stays: a hole, no memory). Frees what was
    cut off (nothing, right after a growth)."""
    if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
        return
    os.ftruncate(fd, size)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with 64-bit offsets. **Blocking**: cost is linear in ``length``.

    Committing (mode 0) on shmem allocates and zeroes every page in the range; punching frees
    them. EINTR (shmem gives up on a pending signal and undoes the partial work) is retried,
    as Python's own ``os`` calls do.
    """
    _check_range("offset", offset, _OFF_MAX)
    _check_range("length", length, _OFF_MAX)
    while _fallocate64(fd, mode, offset, length) != 0:
        if ctypes.get_errno() != errno.EINTR:
            _raise_errno()


def commit(fd: int, offset: int, length: int) -> None:
    """Allocate backing pages for the range (fallocate mode 0). **Blocking**, linear in length.

    gVisor's commitFile. The pages read as zeros; ``st_blocks`` counts them at once, but
    mincore does not see them until something touches them. Measured here: about 20 ms per
    64 MiB, and still about 9 ms per 64 MiB when the range is already committed.
    """
    fallocate(fd, 0, offset, length)


def decommit(fd: int, offset: int, length: int) -> None:
    """Free the range's pages (punch a hole, keeping the size). **Blocking**, linear in length.

    gVisor's decommitFile. Afterwards the range reads as zeros, through mappings too.
    Measured here: about 10 ms per 64 MiB of pages freed; punching an existing hole is free.
    """
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def file_usage(fd: int) -> int:
    """Bytes of memory (or disk) the file holds: ``st_blocks * 512``. One cheap fstat.

    gVisor's TotalUsage: counts committed pages, whether touched or only fallocated, and
    pages swapped out.
    """
    return os.fstat(fd).st_blocks * 512


def ima_workaround(fd: int) -> None:
    """Map and unmap the file's first page PROT_EXEC once (gVisor's IMAWorkAroundForMemFile).

    With the kernel's Integrity Measurement Architecture enabled, the first PROT_EXEC mapping
    of a file makes IMA checksum the whole file, faulting in every page: for a huge sparse
    memory file that would exhaust memory. Done while the file is still empty (call it right
    after creating or truncating the file), the measurement is cheap and IMA ignores later
    mappings. mmap does not check the file size, so this works on a size-0 file; nothing
    is touched. Failure (e.g. EPERM for a file on a noexec mount or a noexec-sealed memfd)
    is logged, not raised: IMA may not be in use at all. Two cheap syscalls.
    """
    addr = _mmap(None, PAGE_SIZE, _PROT_EXEC, _MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        logger.warning("Failed to pre-map MemoryFile PROT_EXEC: %s", _errno_str(ctypes.get_errno()))
        return
    if _munmap(addr, PAGE_SIZE) != 0:
        # gVisor panics here: the address space is in a state we do not understand.
        _raise_errno()


def madvise(addr: int, length: int, advice: int) -> None:
    """madvise(2). Cheap for HUGEPAGE/NOHUGEPAGE (they only flag the VMA).

    Advice that touches pages (MADV_POPULATE_WRITE) is **blocking** and linear in length.
    EINTR is retried.
    """
    _check_range("length", length, _SIZE_MAX)
    while _madvise(addr, length, advice) != 0:
        if ctypes.get_errno() != errno.EINTR:
            _raise_errno()


class PopulateState:
    """Process-wide switches, set when a populate method fails and never cleared.

    They live in one object so tests can save and restore them. Writes are single attribute
    stores, atomic under the GIL, so concurrent executor threads need no lock; a race only
    means one extra failing syscall.
    """

    __slots__ = ("madv_disabled", "mlock_disabled")

    def __init__(self) -> None:
        self.madv_disabled = False
        self.mlock_disabled = False

    def __repr__(self) -> str:
        return (
            f"PopulateState(madv_disabled={self.madv_disabled}, "
            f"mlock_disabled={self.mlock_disabled})"
        )


populate_state = PopulateState()


def can_populate() -> bool:
    """Whether try_populate may still do anything. No syscall."""
    return not (populate_state.madv_disabled and populate_state.mlock_disabled)


def _try_populate_madv(addr: int, length: int) -> bool:
    if populate_state.madv_disabled:
        return False
    # One syscall costs at least as much as one page fault (seccomp and audit make syscalls
    # dearer), so a single page is left to fault in on first use.
    if length <= PAGE_SIZE:
        return True
    try:
        madvise(addr, length, MADV_POPULATE_WRITE)
    except OSError as e:
        # EINVAL is what a kernel older than 5.14 answers; anything else is a surprise.
        log = logger.info if e.errno == errno.EINVAL else logger.warning
        log(
            "Disabling asyncpgalloc allocate-and-fill pre-population: "
            "madvise(MADV_POPULATE_WRITE) failed: %s",
            _errno_str(e.errno or 0),
        )
        populate_state.madv_disabled = True
        return False
    return True


def _try_populate_mlock(addr: int, length: int) -> bool:
    if populate_state.mlock_disabled:
        return False
    # Only the huge-aligned interior: mlock splits the VMA at its bounds, and a split in the
    # middle of a huge page would split the huge page too. Two syscalls plus mlock's VMA work
    # beat HUGE_PAGE_SIZE / PAGE_SIZE page faults, but not fewer.
    start = huge_round_up(addr)
    end = huge_round_down(addr + length)
    if start >= end:
        return True
    # Without CAP_IPC_LOCK, mlock fails with ENOMEM for any range larger than the soft
    # RLIMIT_MEMLOCK; each piece is unlocked before the next is locked, so pieces of that
    # size never exceed it. With the capability the limit does not apply, but pieces cost
    # little. Read every call: the limit may change at run time.
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        piece = end - start
    else:
        piece = max(HUGE_PAGE_SIZE, huge_round_down(soft))
    for pstart in range(start, end, piece):
        plen = min(piece, end - pstart)
        rc = _mlock(pstart, plen)
        err = ctypes.get_errno()
        # munlock even on failure: a failed mlock may have locked part of the range. munlock
        # keeps the pages populated, and only fails for ranges that are not mapped.
        _munlock(pstart, plen)
        if rc != 0:
            # ENOMEM: over a non-zero RLIMIT_MEMLOCK (or the range is not fully mapped);
            # EPERM: RLIMIT_MEMLOCK is zero and we lack CAP_IPC_LOCK.
            log = logger.info if err in (errno.ENOMEM, errno.EPERM) else logger.warning
            log(
                "Disabling asyncpgalloc allocate-and-fill pre-population: mlock failed: %s",
                _errno_str(err),
            )
            populate_state.mlock_disabled = True
            return False
    return True


def try_populate(addr: int, length: int) -> bool:
    """Fault in writable pages for the mapped range ``[addr, addr+length)`` ahead of use.

    gVisor's tryPopulate. Returns False if the range could not be populated; the method
    that failed is then disabled for the whole process. **Blocking**: allocates and zeroes
    every page not yet present, linear in length (about 50-70 ms per 64 MiB here, either way).

    The range must lie within the file: beyond EOF, madvise fails with EFAULT and mlock with
    ENOMEM, and either failure disables that method for good.

    MADV_POPULATE_WRITE is preferred: one syscall, no VMA changes, and it works on
    disk-backed files. The mlock+munlock fallback populates only the huge-aligned interior,
    and only correctly for shmem, where the read fault mlock emulates still maps pages
    writable.
    """
    _check_range("length", length, _SIZE_MAX)
    if _try_populate_madv(addr, length):
        return True
    return _try_populate_mlock(addr, length)


def mincore(addr: int, length: int, out: bytearray) -> None:
    """mincore(2) of ``[addr, addr+length)`` into ``out``, one byte per page, without copying.

    For a shared file mapping, bit 0 of a byte says whether the page is in the page cache
    (touched), whether or not this process has it mapped; fallocated but untouched shmem
    pages are not. **Blocking** for large ranges: looks up every page, linear in length
    (about 10 ms per GiB here).
    """
    _check_range("length", length, _SIZE_MAX)
    pages = -(-length // PAGE_SIZE)
    if len(out) < pages:
        raise ValueError(f"mincore of {pages} pages into a buffer of {len(out)}")
    if pages == 0:
        return
    buf = (ctypes.c_ubyte * pages).from_buffer(out)
    try:
        if _mincore(addr, length, buf) != 0:
            _raise_errno()
    finally:
        # Drop the export now so the caller may resize `out` straight away.
        del buf


def zero(addr: int, length: int) -> None:
    """Write zeros over ``[addr, addr+length)`` (gVisor's manuallyZero fallback).

    **Blocking**: linear in length (about 70-80 ms per 64 MiB of uncommitted pages here), and
    it commits every page it touches. The range must be mapped writable: unmapped memory kills
    the process with SIGSEGV, and a mapping beyond EOF with SIGBUS.
    """
    _check_range("length", length, _SIZE_MAX)
    ctypes.memset(addr, 0, length)


_ZEROS = bytes(1 << 20)


def pwrite_zeros(fd: int, offset: int, length: int) -> None:
    """Write zeros over ``[offset, offset+length)`` of ``fd`` with ``pwrite``, 1 MiB at a time.

    **Blocking**: linear in length, and it commits every block it writes, as :func:`zero`;
    unlike a store through a mapping, a block the file system cannot allocate (it is
    full) is an ``OSError(ENOSPC)``, not a SIGBUS.
    """
    _check_range("offset", offset, _OFF_MAX)
    _check_range("length", length, _OFF_MAX)
    zeros = memoryview(_ZEROS)
    end = offset + length
    while offset < end:
        offset += os.pwrite(fd, zeros[: min(len(zeros), end - offset)], offset)


def _unmap(addr: int, length: int) -> None:
    if _munmap(addr, length) != 0:
        # Like gVisor's destroy path: nothing to do about it but say so.
        logger.warning(
            "Failed to unmap mapping %#x (%d bytes): %s",
            addr,
            length,
            _errno_str(ctypes.get_errno()),
        )


class ChunkMapping:
    """One ``mmap(MAP_SHARED, PROT_READ|PROT_WRITE)`` of ``length`` bytes of ``fd`` at ``offset``.

    Mapped with libc mmap through ctypes rather than the ``mmap`` module: in Python 3.11
    ``mmap.mmap`` keeps a dup of the fd per mapping, and a ctypes pointer into one makes its
    ``close()`` fail.

    Lifetime: the mapping is unmapped only once the owner has called :meth:`release` *and*
    every memoryview handed out by :meth:`view` is gone, so a view never dangles. All views
    are slices of one memoryview over one ctypes array placed on the mapping; a finalizer on
    that array munmaps, and each view keeps the array alive through its buffer.

    Dropping the ChunkMapping without release() also unmaps once no view is left.
    The mapping does not keep ``fd`` open: closing the fd leaves the mapping (and the file's
    pages) in place. ``addr`` is only page-aligned: with ``shmem_enabled=never`` the kernel
    does not huge-align shmem mappings.
    """

    __slots__ = ("__weakref__", "_array", "_finalizer", "_mv", "addr", "length")

    addr: int
    length: int

    def __init__(self, fd: int, offset: int, length: int) -> None:
        """Map the range: one cheap syscall. Pages are faulted in on first touch."""
        _check_range("offset", offset, _OFF_MAX)
        if not 0 < length <= _OFF_MAX:
            raise ValueError(f"length {length} out of range [1, {_OFF_MAX}]")
        addr = _mmap(None, length, _PROT_READ | _PROT_WRITE, _MAP_SHARED, fd, offset)
        if addr is None or addr == _MAP_FAILED:
            _raise_errno()
        self.addr = addr
        self.length = length
        array = (ctypes.c_ubyte * length).from_address(addr)
        self._finalizer = weakref.finalize(array, _unmap, addr, length)
        # At interpreter exit the process is about to drop its address space anyway, and a
        # thread that outlives the atexit hooks may still be reading through a view.
        self._finalizer.atexit = False
        self._array: ctypes.Array[ctypes.c_ubyte] | None = array
        self._mv: memoryview | None = memoryview(array).cast("B")

    def view(self, offset: int, length: int) -> memoryview:
        """A writable, 1-D, format ``'B'`` memoryview of ``[offset, offset+length)``. No syscall.

        The view keeps the mapping alive past :meth:`release`; release it (or drop it) when
        done. Touching it faults pages in.
        """
        mv = self._mv
        if mv is None:
            raise ValueError("view() of a released ChunkMapping")
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(
                f"view [{offset:#x}, {offset + length:#x}) out of bounds of a "
                f"{self.length:#x}-byte mapping"
            )
        return mv[offset : offset + length]

    def release(self) -> None:
        """Drop the owner's hold on the mapping. Idempotent; no syscall unless it unmaps.

        Unmaps now (one munmap, whose cost is linear in the pages mapped) if no view is
        alive, else when the last view goes.
        """
        mv, self._mv = self._mv, None
        self._array = None
        if mv is not None:
            mv.release()

    @property
    def released(self) -> bool:
        return self._mv is None

    def __repr__(self) -> str:
        state = "released" if self.released else "live"
        return f"<ChunkMapping {self.addr:#x}+{self.length:#x} {state}>"


class LentMapping:
    """A mapping of one range of a file of its own, for code the library does not control.

    Views of it are what ``allocate_from`` lends to a source's ``readinto``, which may
    write through them from a thread long after the awaiting task was cancelled
    (cancelling an await does not stop a thread). It is an ``mmap.mmap`` object because
    those count buffer exports: every memoryview on it, however derived, and every C
    buffer a thread holds (``readinto`` takes one for as long as it runs) keeps it
    mapped, and :meth:`try_unmap` succeeds only once none is left. A mapping that is
    gone can never be written again: that proves nothing can write the pages any more.

    Costs: mapping it is a few cheap syscalls (``dup``, ``mmap``; Python's ``mmap``
    keeps a dup of the fd, so the file stays open while the mapping lives), and its
    pages fault in again on first touch (a minor fault for a page already present).
    """

    __slots__ = ("_m", "_views", "length")

    length: int

    def __init__(self, fd: int, offset: int, length: int, populate: bool = False) -> None:
        """Map ``[offset, offset+length)`` of ``fd`` shared and writable. ``offset`` must be
        page-aligned; raises ``OSError`` as mmap does. ``populate`` (``MAP_POPULATE``) maps
        every page present in one go instead of one fault each: **blocking**, linear in
        length; worth it only where the pages are already there."""
        _check_range("offset", offset, _OFF_MAX)
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        self._m = mmap.mmap(fd, length, flags, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self.length = length
        self._views: list[memoryview] = []

    def view(self, offset: int, length: int) -> memoryview:
        """A writable view of ``[offset, offset+length)`` of the range, to lend; recorded so
        that :meth:`release` and :meth:`try_unmap` can release it. No syscall."""
        mv = memoryview(self._m)[offset : offset + length]
        self._views.append(mv)
        return mv

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` in at ``offset`` (no view is lent). Touching a page faults it in."""
        self._m[offset : offset + len(data)] = data

    def release(self, view: memoryview) -> None:
        """Release ``view`` if nothing uses it any more (else :meth:`try_unmap` retries)."""
        try:
            view.release()
        except BufferError:
            return
        views = self._views
        # By identity: memoryviews compare by content. The view is nearly always the last.
        for i in range(len(views) - 1, -1, -1):
            if views[i] is view:
                del views[i]
                return

    def try_unmap(self) -> bool:
        """Release every view handed out and unmap; False (and still mapped) while any
        view or buffer on the mapping is in use. Idempotent; one munmap when it unmaps."""
        views = self._views
        while views:
            try:
                views[-1].release()
            except BufferError:
                return False
            views.pop()
        try:
            self._m.close()
        except BufferError:
            # A view the borrower derived from ours is still alive.
            return False
        return True

    @property
    def closed(self) -> bool:
        return self._m.closed
