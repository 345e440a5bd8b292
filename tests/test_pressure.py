"""Memory cgroup pressure notifications against the real kernel: real cgroups, real pressure.

Pressure comes from a *subprocess* placed in a child cgroup with a small limit (at the
limit, with no swap, the kernel OOM-kills instead of failing allocations, so the test
process must never be inside the limit). Two workloads:

- ``OOM``: allocate anonymous memory past the limit. Reclaim runs for a few ms before
  the kill: plenty for cgroup v1's vmpressure "low" events, far too little stall for a
  PSI threshold.
- ``THRASH``: scan a disk-backed file twice the limit through a mapping. Every pass
  evicts and refaults the page cache, which PSI counts as memory stall (~30% here).

Every cgroup made here is removed afterwards, even on failure (its processes killed
first). Tests skip, saying why, only where cgroups cannot be created.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop
from cgroups import (
    LIMIT,
    OOM,
    SYSTEM_PSI,
    THRASH,
    THRASH_FILE_SIZE,
    MiB,
    fd_count,
    fds,
    fstype_of,
    hybrid_cgroup,
    make_cgroup,
    require_root,
    set_v1_limit,
    spawn,
    v1_memory_mount,
    v1_parent,
    v2_mount,
    wait_until,
)

from asyncpgalloc.errors import AllocatorError
from asyncpgalloc.pressure import (
    PSI_TRIGGERS,
    InvalidPressureLevelError,
    MemcgPressureWatcher,
    PressureWatcherError,
    current_memcg_path,
)


@pytest.fixture(scope="module")
def thrash_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A disk-backed file twice LIMIT: page cache that must be evicted and refaulted."""
    path = tmp_path_factory.mktemp("pressure") / "thrash.bin"
    fstype = fstype_of(str(path))
    if fstype in ("tmpfs", "ramfs"):
        pytest.skip(f"{path.parent} is on {fstype}: its pages cannot be evicted without swap")
    with open(path, "wb") as f:
        block = os.urandom(MiB)
        for _ in range(THRASH_FILE_SIZE // MiB):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    yield path
    path.unlink()  # pytest keeps recent tmp dirs: don't leave 128 MiB behind in each


def _drop_cache(path: Path) -> None:
    # The previous workload's pages stay cached (charged to our group once its group is
    # removed); a cached page costs the next workload nothing, so drop them.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _psi_total(path: str, state: str = "some") -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(state + " "):
            return int(line.rsplit("total=", 1)[1])
    raise AssertionError(f"no {state} line in {path}")


# -- finding the cgroup ------------------------------------------------------------------


def test_current_memcg_path_names_this_process_cgroup() -> None:
    path, version = current_memcg_path()
    assert version in (1, 2)
    assert os.path.isdir(path)
    with open("/proc/self/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    if version == 1:
        assert os.path.exists(os.path.join(path, "memory.pressure_level"))
        (cgroup,) = [c for _, ctl, c in lines if "memory" in ctl.split(",")]
        assert Path(path, "cgroup.procs").read_text().split().count(str(os.getpid())) == 1
    else:
        (cgroup,) = [c for h, ctl, c in lines if h == "0" and ctl == ""]
    assert path.rstrip("/").endswith(cgroup.rstrip("/"))


# -- cgroup v1 ---------------------------------------------------------------------------


async def test_v1_child_cgroup_over_its_limit_reports_pressure() -> None:
    calls: list[float] = []
    with (
        make_cgroup(v1_parent(), set_v1_limit) as group,
        MemcgPressureWatcher.start(lambda: calls.append(time.monotonic()), memcg_path=group) as w,
    ):
        assert (w.version, w.path, w.level, w.events) == (1, group, "low", 0)
        with spawn(OOM, [group]) as child:
            await wait_until(lambda: w.events >= 1, 20, "a v1 pressure event")
            # Over the limit with no swap the child is killed, not refused memory.
            await wait_until(lambda: child.poll() is not None, 20, "the child to end")
        assert child.returncode == -signal.SIGKILL
        assert w.events == len(calls) >= 1
        assert w.active


async def test_raising_callback_is_logged_and_watcher_keeps_delivering(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def callback() -> None:
        raise RuntimeError("evictions failed")

    caplog.set_level(logging.ERROR, logger="asyncpgalloc")
    with (
        make_cgroup(v1_parent(), set_v1_limit) as group,
        MemcgPressureWatcher.start(callback, memcg_path=group) as w,
    ):
        # Two workloads, each awaited: two deliveries even if the kernel's notifications
        # were coalesced into one eventfd read.
        for n in (1, 2):
            with spawn(OOM, [group]):
                # The lambda is awaited within its iteration: capturing n is safe.
                await wait_until(lambda: w.events >= n, 20, f"pressure event {n}")  # noqa: B023
        assert w.active
    errors = [r for r in caplog.records if r.name == "asyncpgalloc" and r.exc_info]
    assert len(errors) == w.events >= 2
    assert all("evictions failed" in str(r.exc_info[1]) for r in errors if r.exc_info)


async def test_v1_cgroup_removal_stops_the_watcher(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[None] = []
    with make_cgroup(v1_parent()) as group:
        w = MemcgPressureWatcher.start(lambda: calls.append(None), memcg_path=group)
        os.rmdir(group)
        # The kernel signals the eventfd once on removal: that is no pressure.
        await wait_until(lambda: not w.active, 5, "the watcher to notice the removal")
    assert calls == [] and w.events == 0
    assert any("was removed" in r.getMessage() for r in caplog.records)
    w.stop()


# -- cgroup v2 / PSI ---------------------------------------------------------------------


async def test_v2_psi_child_cgroup_reports_pressure(thrash_file: Path) -> None:
    calls: list[None] = []
    with hybrid_cgroup() as (v1g, v2g):
        _drop_cache(thrash_file)
        with MemcgPressureWatcher.start(lambda: calls.append(None), memcg_path=v2g) as w:
            assert (w.version, w.path) == (2, v2g)
            with spawn(THRASH, [v1g, v2g], str(thrash_file), "30"):
                # Unprivileged triggers are evaluated every 2 s: expect 2-4 s.
                await wait_until(lambda: w.events >= 1, 20, "a PSI event")
            assert w.events == len(calls) >= 1
            assert _psi_total(os.path.join(v2g, "memory.pressure")) >= PSI_TRIGGERS["low"].stall_us


@contextlib.contextmanager
def _v2_memory_cgroup() -> Iterator[str]:
    """A v2 child group with memory.max = LIMIT, enabling the controller if need be."""
    require_root()
    v2 = v2_mount()
    if v2 is None:
        pytest.skip("no cgroup2 hierarchy is mounted")
    controllers = Path(v2, "cgroup.controllers").read_text().split()
    if "memory" not in controllers:
        owner = v1_memory_mount()
        pytest.skip(
            f"the cgroup v2 hierarchy at {v2} has no memory controller (cgroup.controllers: "
            f"{' '.join(controllers) or 'empty'}"
            + (f"; memory is bound to the v1 hierarchy at {owner}" if owner else "")
            + "), so a v2 child has no memory.max; v2 PSI is tested with a v1 limit instead"
        )
    subtree = Path(v2, "cgroup.subtree_control")
    enabled = "memory" in subtree.read_text().split()
    if not enabled:
        try:
            subtree.write_text("+memory")
        except OSError as e:
            pytest.skip(f"cannot enable the memory controller in {subtree}: {e}")
    try:
        with make_cgroup(v2, _set_v2_limit) as group:
            yield group
    finally:
        if not enabled:  # leave the hierarchy as we found it
            subtree.write_text("-memory")


def _set_v2_limit(path: str) -> None:
    Path(path, "memory.max").write_text(str(LIMIT))


async def test_v2_child_cgroup_with_memory_max_reports_pressure(thrash_file: Path) -> None:
    with (
        _v2_memory_cgroup() as group,
        MemcgPressureWatcher.start(lambda: None, memcg_path=group) as w,
    ):
        _drop_cache(thrash_file)
        with spawn(THRASH, [group], str(thrash_file), "30"):
            await wait_until(lambda: w.events >= 1, 20, "a PSI event")


def _require_psi(path: str) -> None:
    if not os.path.exists(path):
        pytest.skip(f"{path} does not exist: the kernel has PSI disabled")


async def test_system_psi_trigger_arms_and_stops() -> None:
    _require_psi(SYSTEM_PSI)
    before = fd_count()
    for level in ("low", "medium", "critical"):
        w = MemcgPressureWatcher.start(lambda: None, level=level, memcg_path=SYSTEM_PSI)
        assert (w.version, w.path, w.level, w.active) == (2, SYSTEM_PSI, level, True)
        assert fd_count() == before + 2  # the trigger fd and its epoll
        await asyncio.sleep(0.01)  # a loop iteration with the fd registered
        w.stop()
        assert fd_count() == before and not w.active


def test_spurious_first_event_of_a_group_with_history_is_not_delivered(
    thrash_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The kernel's first-window event on a group with stall history is suppressed.

    Kernel behaviour, not loop behaviour: runs once, on asyncio. A trigger armed on a
    group whose stall history exceeds the threshold fires at the first stall of any size
    afterwards (this is the case of /proc/pressure/memory on any machine that ever
    stalled); the watcher checks the stall counter and drops it. A real event follows.
    """
    caplog.set_level(logging.DEBUG, logger="asyncpgalloc")
    calls: list[None] = []

    async def main() -> None:
        with hybrid_cgroup() as (v1g, v2g):
            psi = os.path.join(v2g, "memory.pressure")
            # 1. History: stall well past the threshold, with nobody watching.
            _drop_cache(thrash_file)
            with spawn(THRASH, [v1g, v2g], str(thrash_file), "30"):
                await wait_until(
                    lambda: _psi_total(psi) > 2 * PSI_TRIGGERS["low"].stall_us, 20, "stall"
                )
            # 2. Arm, then a stall far below the threshold (an OOM-killed child; with
            # no page cache left to reclaim first, it stalls for a few ms).
            _drop_cache(thrash_file)
            with MemcgPressureWatcher.start(lambda: calls.append(None), memcg_path=v2g) as w:
                with spawn(OOM, [v1g, v2g]) as child:
                    await wait_until(lambda: child.poll() is not None, 20, "the OOM kill")

                def suppressed() -> bool:
                    return any("ignoring PSI event" in r.getMessage() for r in caplog.records)

                with contextlib.suppress(AssertionError):
                    await wait_until(suppressed, 6, "the kernel's spurious event")
                assert w.events == 0, "a below-threshold stall was reported as pressure"
                if not suppressed():
                    pytest.skip("this kernel sent no spurious first event (fixed kernel?)")
                # 3. Real pressure after the suppressed event is delivered.
                _drop_cache(thrash_file)
                with spawn(THRASH, [v1g, v2g], str(thrash_file), "30"):
                    await wait_until(lambda: w.events >= 1, 20, "a real PSI event")
                assert w.events == len(calls) >= 1

    asyncio.run(main())


async def test_v2_cgroup_removal_stops_the_watcher(caplog: pytest.LogCaptureFixture) -> None:
    require_root()
    v2 = v2_mount()
    if v2 is None:
        pytest.skip("no cgroup2 hierarchy is mounted")
    _require_psi(os.path.join(v2, "memory.pressure"))
    with make_cgroup(v2) as group:
        w = MemcgPressureWatcher.start(lambda: None, memcg_path=group)
        before = fd_count()
        os.rmdir(group)
        # The trigger fd is left in EPOLLERR for good: without handling, a level-
        # triggered loop would spin on it.
        await wait_until(lambda: not w.active, 5, "the watcher to notice the removal")
    assert w.events == 0
    assert fd_count() == before - 2
    assert any("reports an error" in r.getMessage() for r in caplog.records)


# -- lifecycle and errors -----------------------------------------------------------------


async def test_stop_closes_every_fd_and_is_idempotent() -> None:
    before = fds()
    w = MemcgPressureWatcher.start(lambda: None)  # this process's own memory cgroup
    own, version = current_memcg_path()
    assert (w.path, w.version) == (own, version)
    held = fds() - before
    assert held  # v1: the eventfd; v2: the trigger fd and its epoll
    w.stop()
    assert fds() == before
    for fd in held:
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)
    w.stop()
    assert not w.active and "stopped" in repr(w)


def test_directory_with_neither_file_raises(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    try:
        before = fd_count()
        with pytest.raises(PressureWatcherError, match=r"memory\.pressure_level.*memory\.pressure"):
            MemcgPressureWatcher.start(lambda: None, memcg_path=str(tmp_path), loop=loop)
        with pytest.raises(PressureWatcherError, match="does not exist"):
            MemcgPressureWatcher.start(lambda: None, memcg_path=str(tmp_path / "x"), loop=loop)
        assert fd_count() == before
    finally:
        loop.close()


def test_unknown_level_is_a_value_error() -> None:
    with pytest.raises(InvalidPressureLevelError, match="'high'") as info:
        MemcgPressureWatcher.start(lambda: None, level="high")
    assert isinstance(info.value, ValueError) and isinstance(info.value, AllocatorError)


@pytest.mark.parametrize(
    ("files", "error"),
    [
        # v1: memory.pressure_level opens, cgroup.event_control is missing.
        (["memory.pressure_level"], "event_control"),
        # v2: the file opens and takes the write, but epoll refuses a regular file.
        (["memory.pressure"], "cannot arm PSI trigger"),
    ],
)
def test_setup_failure_closes_what_it_opened(tmp_path: Path, files: list[str], error: str) -> None:
    for name in files:
        (tmp_path / name).write_text("")
    loop = asyncio.new_event_loop()
    try:
        before = fd_count()
        with pytest.raises(PressureWatcherError, match=error) as info:
            MemcgPressureWatcher.start(lambda: None, memcg_path=str(tmp_path), loop=loop)
        assert isinstance(info.value.__cause__, OSError)
        assert fd_count() == before
    finally:
        loop.close()


@pytest.mark.parametrize("closed_loop", ["asyncio", "uvloop"])
def test_registration_failure_on_a_closed_loop_closes_fds(closed_loop: str) -> None:
    loop = uvloop.new_event_loop() if closed_loop == "uvloop" else asyncio.new_event_loop()
    loop.close()
    before = fd_count()
    with pytest.raises(RuntimeError):
        MemcgPressureWatcher.start(lambda: None, loop=loop)
    assert fd_count() == before
