"""Real memory cgroups for tests: make, limit, fill with a workload, and always remove.

Pressure comes from a *subprocess* placed in a child cgroup with a small limit (at the
limit, with no swap, the kernel OOM-kills instead of failing allocations, so the test
process must never be inside the limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from asyncpgalloc.pressure import current_memcg_path

MiB = 1 << 20
LIMIT = 64 * MiB
THRASH_FILE_SIZE = 2 * LIMIT
SYSTEM_PSI = "/proc/pressure/memory"

# argv: cgroup.procs files to join first, then the workload's own arguments. Joining
# from inside the child (rather than a preexec_fn) works the same on every loop.
JOIN = (
    "import os, sys\nfor p in sys.argv[1].split(','):\n    open(p, 'w').write(str(os.getpid()))\n"
)
OOM = JOIN + (
    "chunks = []\n"
    "for _ in range(200):\n"
    "    b = bytearray(1 << 20)\n"
    "    b[::4096] = b'x' * 256\n"  # touch every page: untouched pages cost nothing
    "    chunks.append(b)\n"
)
THRASH = JOIN + (
    "import mmap, time\n"
    "f = open(sys.argv[2], 'rb')\n"
    "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
    "deadline = time.monotonic() + float(sys.argv[3])\n"
    "while time.monotonic() < deadline:\n"
    "    for off in range(0, len(m), 4096):\n"
    "        m[off]\n"
)


# -- helpers ---------------------------------------------------------------------------


def fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def fd_count() -> int:
    return len(fds())


def mounts(fstype: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [
            line.split(" ")[4]
            for line in f
            if " - " in line and line.split(" - ", 1)[1].split(" ")[0] == fstype
        ]


def v1_memory_mount() -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.rstrip("\n").partition(" - ")
            tail = post.split(" ")
            if tail[0] == "cgroup" and "memory" in tail[2].split(","):
                return pre.split(" ")[4]
    return None


def v2_mount() -> str | None:
    found = mounts("cgroup2")
    return found[0] if found else None


def fstype_of(path: str) -> str:
    best, fstype = "", ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.rstrip("\n").partition(" - ")
            mountpoint = pre.split(" ")[4]
            inside = path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")
            if inside and len(mountpoint) >= len(best):
                best, fstype = mountpoint, post.split(" ")[0]
    return fstype


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("creating cgroups needs root")


def v1_parent() -> str:
    """A writable v1 memory cgroup to create test groups in: our own if possible."""
    require_root()
    mount = v1_memory_mount()
    if mount is None:
        pytest.skip("no cgroup v1 memory hierarchy is mounted")
    own, version = current_memcg_path()
    # Under our own group the workload stays inside whatever accounts for this process.
    return own if version == 1 and os.access(own, os.W_OK) else mount


def remove_cgroup(path: str) -> None:
    """Kill whatever is left in the group, then rmdir it (retrying while tasks exit)."""
    if not os.path.isdir(path):
        return
    deadline = time.monotonic() + 5.0
    while True:
        with contextlib.suppress(OSError):
            for pid in Path(path, "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def make_cgroup(parent: str, setup: Callable[[str], None] | None = None) -> Iterator[str]:
    path = os.path.join(parent, f"asyncpgalloc-test-{secrets.token_hex(4)}")
    try:
        os.mkdir(path)
    except PermissionError as e:
        pytest.skip(f"cannot create a cgroup under {parent}: {e}")
    try:
        if setup is not None:
            setup(path)
        yield path
    finally:
        remove_cgroup(path)


def set_v1_limit(path: str) -> None:
    Path(path, "memory.limit_in_bytes").write_text(str(LIMIT))


@contextlib.contextmanager
def hybrid_cgroup() -> Iterator[tuple[str, str]]:
    """(v1 memory group with LIMIT, v2 group) - PSI of a v1-limited workload, as here.

    PSI accounting is part of cgroup v2 itself and works with no v2 memory controller:
    a task's memory stall is charged to its v2 group whichever hierarchy's limit
    caused it.
    """
    v2 = v2_mount()
    if v2 is None:
        pytest.skip("no cgroup2 hierarchy is mounted")
    if not os.path.exists(os.path.join(v2, "memory.pressure")):
        pytest.skip(f"{v2} has no memory.pressure: the kernel has PSI disabled")
    with make_cgroup(v1_parent(), set_v1_limit) as v1g, make_cgroup(v2) as v2g:
        yield v1g, v2g


@contextlib.contextmanager
def spawn(code: str, cgroups: list[str], *args: str) -> Iterator[subprocess.Popen[bytes]]:
    procs = ",".join(os.path.join(g, "cgroup.procs") for g in cgroups)
    p = subprocess.Popen([sys.executable, "-c", code, procs, *args])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


async def wait_until(cond: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.01)
