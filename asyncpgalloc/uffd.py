"""The kernel's userfaultfd, through ``fcntl.ioctl``: struct layouts, ioctls and a probe.

A guest process creates a userfaultfd (:func:`open_uffd`), checks the API
(:func:`api`), registers its mapping of the sandbox's memfd for missing-page faults
(:func:`register`) and hands the fd to its supervisor, which reads fault messages
(:func:`read_faults`, non-blocking) and resolves them from its own process:
:func:`wake` (the page is in the file's page cache by now: the retried fault finds
it), :func:`zeropage` (a page the file holds as a hole gets a zeroed page in the
page cache) or :func:`copy`; :func:`unregister` once nothing is left to serve.
These ioctls act on the mm of the process that created the fd, whoever calls them.

Every call here is one syscall that never waits for another process: on a
non-blocking fd a read with nothing queued is ``[]``; the resolving ioctls copy or
map at most what they are asked to (microseconds for a page). Errors are
:class:`UffdError` naming the call and the range, with the kernel's ``errno``.
:func:`probe` says once per process which mode this kernel and process allow.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import logging
import os
import struct
from dataclasses import dataclass

from .errors import AllocatorError
from .ranges import PAGE_SIZE

__all__ = [
    "FEATURE_MINOR_SHMEM",
    "FEATURE_MISSING_SHMEM",
    "FaultMode",
    "PageFault",
    "UffdError",
    "UffdProbe",
    "api",
    "copy",
    "copy_range",
    "open_uffd",
    "probe",
    "read_faults",
    "register",
    "unregister",
    "wake",
    "zeropage",
]

logger = logging.getLogger("asyncpgalloc")

# <linux/userfaultfd.h>, x86-64.
_NR_USERFAULTFD = 323
UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
FEATURE_MISSING_SHMEM = 1 << 5
FEATURE_MINOR_SHMEM = 1 << 10
FEATURE_EXACT_ADDRESS = 1 << 11
REGISTER_MODE_MISSING = 1
EVENT_PAGEFAULT = 0x12
PAGEFAULT_FLAG_WRITE = 1
MODE_DONTWAKE = 1

_API = struct.Struct("=QQQ")  # api, features, ioctls
_RANGE = struct.Struct("=QQ")  # start, len
_REGISTER = struct.Struct("=QQQQ")  # range, mode, ioctls
_COPY = struct.Struct("=QQQQq")  # dst, src, len, mode, copy
_ZEROPAGE = struct.Struct("=QQQq")  # range, mode, zeropage
#: ``struct uffd_msg``: event, 7 reserved bytes, then for a page fault flags, address,
#: thread id (and padding): 32 bytes.
MSG = struct.Struct("=B3xI QQ I4x")
MSG_SIZE = MSG.size


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (UFFD_API << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (UFFD_API << 8) | nr


UFFDIO_API = _iowr(0x3F, _API.size)
UFFDIO_REGISTER = _iowr(0x00, _REGISTER.size)
UFFDIO_UNREGISTER = _ior(0x01, _RANGE.size)
UFFDIO_WAKE = _ior(0x02, _RANGE.size)
UFFDIO_COPY = _iowr(0x03, _COPY.size)
UFFDIO_ZEROPAGE = _iowr(0x04, _ZEROPAGE.size)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class UffdError(AllocatorError):
    """A userfaultfd call failed: ``errno`` is the kernel's, the message names the call
    and the range. ``EEXIST`` from :func:`copy`/:func:`zeropage` means the page is
    there already (someone else filled it): wake the faulting thread instead."""

    def __init__(self, message: str, err: int) -> None:
        super().__init__(f"{message}: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})")
        self.errno = err


class FaultMode(enum.Enum):
    """How a restored guest gets its pages (see :func:`probe`)."""

    #: Kernel and user faults through a userfaultfd (root, or
    #: ``vm.unprivileged_userfaultfd=1``).
    UFFD = "uffd"
    #: User-mode faults only (``UFFD_USER_MODE_ONLY``): an unprivileged process's choice;
    #: a syscall that reads a page not yet loaded (e.g. ``write`` from the mapping) fails
    #: with ``EFAULT`` instead of waiting.
    UFFD_USER = "uffd-user"
    #: No userfaultfd for shmem here: the guest waits for its ranges before it
    #: touches them (or is handed the fd only once they are loaded).
    WAIT = "wait"


@dataclass(frozen=True)
class UffdProbe:
    """What :func:`probe` found: the mode, the kernel's feature bits (0 without a
    userfaultfd) and, for :attr:`FaultMode.WAIT`, why."""

    mode: FaultMode
    features: int
    reason: str = ""


@dataclass(frozen=True)
class PageFault:
    """One page-fault message: the faulting address (page-aligned), whether it was a
    write, and the faulting thread's id (0 unless the feature was asked for)."""

    address: int
    write: bool
    tid: int


def open_uffd(*, user_mode_only: bool = False, nonblock: bool = True) -> int:
    """A new close-on-exec userfaultfd (non-blocking by default): the caller owns it.
    One syscall. Raises :class:`UffdError` (``EPERM`` unprivileged without
    ``user_mode_only``, ``ENOSYS`` without the feature)."""
    flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblock else 0)
    if user_mode_only:
        flags |= UFFD_USER_MODE_ONLY
    fd = _libc.syscall(_NR_USERFAULTFD, flags)
    if fd < 0:
        raise UffdError("userfaultfd()", ctypes.get_errno())
    return int(fd)


def _ioctl(fd: int, request: int, buf: bytearray, what: str) -> None:
    try:
        fcntl.ioctl(fd, request, buf, True)
    except OSError as e:
        raise UffdError(what, e.errno or errno.EIO) from None


def api(fd: int, features: int = 0) -> tuple[int, int]:
    """The ``UFFDIO_API`` handshake (once per fd, before anything else), asking for
    ``features``; returns ``(features the kernel supports, ioctls bitmask)``. One ioctl."""
    buf = bytearray(_API.pack(UFFD_API, features, 0))
    _ioctl(fd, UFFDIO_API, buf, f"UFFDIO_API (features {features:#x})")
    _api, got, ioctls = _API.unpack(buf)
    return got, ioctls


def register(fd: int, start: int, length: int) -> int:
    """Register ``[start, start + length)`` of the calling process's address space (a
    mapping, page-aligned) for missing-page faults; returns the ioctls it allows. One
    ioctl, taking the mm's lock for writing. ``EINVAL``: not a mapping uffd supports."""
    buf = bytearray(_REGISTER.pack(start, length, REGISTER_MODE_MISSING, 0))
    _ioctl(fd, UFFDIO_REGISTER, buf, f"UFFDIO_REGISTER [{start:#x}, +{length:#x})")
    return int(_REGISTER.unpack(buf)[3])


def unregister(fd: int, start: int, length: int) -> None:
    """Stop handling faults in ``[start, start + length)``; threads waiting in a fault
    there are woken (and retry without the uffd). One ioctl on the fd's mm."""
    buf = bytearray(_RANGE.pack(start, length))
    _ioctl(fd, UFFDIO_UNREGISTER, buf, f"UFFDIO_UNREGISTER [{start:#x}, +{length:#x})")


def wake(fd: int, start: int, length: int) -> None:
    """Wake the threads faulting in ``[start, start + length)``: they retry the fault
    (for shmem they find the page if the file's page cache holds it now). One ioctl."""
    buf = bytearray(_RANGE.pack(start, length))
    _ioctl(fd, UFFDIO_WAKE, buf, f"UFFDIO_WAKE [{start:#x}, +{length:#x})")


def zeropage(fd: int, start: int, length: int, *, wake_up: bool = True) -> int:
    """Fill the missing pages of ``[start, start + length)`` with zeros (for shmem a
    zeroed page in the file's page cache: every mapping of the file sees it) and wake
    the faulting threads. Returns the bytes filled. One ioctl. ``EEXIST`` (a
    :class:`UffdError`): a page is there already."""
    buf = bytearray(_ZEROPAGE.pack(start, length, 0 if wake_up else MODE_DONTWAKE, 0))
    _ioctl(fd, UFFDIO_ZEROPAGE, buf, f"UFFDIO_ZEROPAGE [{start:#x}, +{length:#x})")
    return int(_ZEROPAGE.unpack(buf)[3])


def copy(fd: int, dst: int, src: int, length: int, *, wake_up: bool = True) -> int:
    """Copy ``length`` bytes from ``src`` (an address in the *calling* process) into the
    missing pages at ``dst`` (in the fd's mm) and wake the faulting threads; returns
    the bytes copied. One ioctl; costs the copy (~1 µs per 4 KiB). ``EEXIST``: a page
    is there already."""
    buf = bytearray(_COPY.pack(dst, src, length, 0 if wake_up else MODE_DONTWAKE, 0))
    _ioctl(fd, UFFDIO_COPY, buf, f"UFFDIO_COPY [{dst:#x}, +{length:#x})")
    return int(_COPY.unpack(buf)[4])


def copy_range(fd: int, dst: int, src: int, length: int) -> tuple[int, UffdError | None]:
    """:func:`copy` of the whole range, around pages already there (``EEXIST``: that
    page is woken instead, its bytes left as they are). Returns the bytes done from
    ``dst`` on (copied or found there) and the error that stopped it early, if any
    (``ESRCH``/``ENOENT``: the mm is gone). One ioctl when no page is there already,
    one more per such page; costs the copy (~1 µs per 4 KiB). **Blocks** for that long."""
    done = 0
    while done < length:
        buf = bytearray(_COPY.pack(dst + done, src + done, length - done, 0, 0))
        try:
            fcntl.ioctl(fd, UFFDIO_COPY, buf, True)
            done = length
            continue
        except OSError as e:
            err = e.errno or errno.EIO
        got = int(_COPY.unpack(buf)[4])  # the kernel's count, even when it failed
        if got > 0:
            done += got  # a partial copy (-EAGAIN): go on from there
            continue
        if got < 0:
            err = -got
        if err == errno.EEXIST:
            try:
                wake(fd, dst + done, PAGE_SIZE)
            except UffdError as w:
                return done, w
            done += PAGE_SIZE
            continue
        return done, UffdError(f"UFFDIO_COPY [{dst + done:#x}, +{length - done:#x})", err)
    return done, None


def read_faults(fd: int, most: int = 64) -> list[PageFault]:
    """The page faults queued on a non-blocking uffd, at most ``most`` in one
    ``read``; ``[]`` if none. Other events (none are asked for) are skipped. One
    syscall, never blocks. Raises :class:`UffdError` for anything but ``EAGAIN``."""
    try:
        data = os.read(fd, MSG_SIZE * most)
    except BlockingIOError:
        return []
    except OSError as e:
        raise UffdError("read(uffd)", e.errno or errno.EIO) from None
    out: list[PageFault] = []
    for i in range(0, len(data) - MSG_SIZE + 1, MSG_SIZE):
        event, _r, flags, address, tid = MSG.unpack_from(data, i)
        if event == EVENT_PAGEFAULT:
            out.append(PageFault(address, bool(flags & PAGEFAULT_FLAG_WRITE), tid))
    return out


_probed: UffdProbe | None = None


def probe() -> UffdProbe:
    """Which :class:`FaultMode` this process can use: a userfaultfd (with or without
    ``UFFD_USER_MODE_ONLY``) whose ``UFFDIO_API`` reports ``MISSING_SHMEM``, else
    :attr:`FaultMode.WAIT`. The first call opens and closes one uffd (a few syscalls)
    and logs the result once; later calls return it at once."""
    global _probed
    if _probed is not None:
        return _probed
    found = UffdProbe(FaultMode.WAIT, 0, "no userfaultfd")
    for user_only, mode in ((False, FaultMode.UFFD), (True, FaultMode.UFFD_USER)):
        try:
            fd = open_uffd(user_mode_only=user_only)
        except UffdError as e:
            found = UffdProbe(FaultMode.WAIT, 0, str(e))
            continue
        try:
            features, _ioctls = api(fd)
        except UffdError as e:
            found = UffdProbe(FaultMode.WAIT, 0, str(e))
            continue
        finally:
            os.close(fd)
        if features & FEATURE_MISSING_SHMEM:
            found = UffdProbe(mode, features)
        else:
            found = UffdProbe(FaultMode.WAIT, features, "the kernel has no MISSING_SHMEM")
        break
    _probed = found
    if found.mode is FaultMode.WAIT:
        logger.info("userfaultfd: not usable (%s); guests wait for their pages", found.reason)
    else:
        logger.info("userfaultfd: mode %s, features %#x", found.mode.value, found.features)
    return found
