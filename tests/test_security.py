"""Security: descriptors never leak into children, other threads cannot corrupt state.

Zero-on-allocate across random histories is checked by the model tests
(tests/test_stateful.py and tests/test_stateful_ext.py: every new allocation reads as
zero, whatever its pages' history). Modes 0600 are checked in test_host.py
(open_backing_file), test_memory_file.py (disk-backed file) and test_checkpoint.py
(checkpoints); damaged checkpoints in test_checkpoint.py (flips and cuts); random
bytes below.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from asyncpgalloc import (
    PAGE_SIZE,
    AllocationMode,
    AllocOpts,
    CheckpointError,
    EvictableRange,
    MemoryFile,
    MemoryFileOpts,
    WrongThreadError,
)

P = PAGE_SIZE


def _targets(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


async def test_no_descriptor_of_ours_reaches_a_child(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    async with MemoryFile.open() as a:
        fr = a.allocate(4 * P, AllocOpts(mode=AllocationMode.COMMIT))
        await a.save(ckpt)
        async with MemoryFile.open(tmp_path / "backing") as b, await MemoryFile.load(ckpt) as c:
            ours = {os.readlink(f"/proc/self/fd/{f.fd}") for f in (a, b, c)}
            child = subprocess.Popen(["sleep", "5"], close_fds=False)  # noqa: ASYNC220
            try:
                leaked = _targets(child.pid) & (ours | {str(ckpt)})
            finally:
                child.kill()
                child.wait()
            assert leaked == set()
        a.dec_ref(fr)


async def test_every_sync_method_refuses_other_threads(tmp_path: Path) -> None:
    async with MemoryFile.open() as mf:
        fr = mf.allocate(4 * P, AllocOpts(mode=AllocationMode.COMMIT))
        mf.dec_ref(mf.allocate(4 * P))

        class User:
            async def evict(self, er: EvictableRange) -> None:
                pass

        user = User()
        calls: dict[str, Callable[[], object]] = {
            "allocate": lambda: mf.allocate(P),
            "allocate_commit": lambda: mf.allocate(P, AllocOpts(mode=AllocationMode.COMMIT)),
            "inc_ref": lambda: mf.inc_ref(fr),
            "dec_ref": lambda: mf.dec_ref(fr),
            "has_unique_ref": lambda: mf.has_unique_ref(fr),
            "map_internal": lambda: mf.map_internal(fr),
            "mark_evictable": lambda: mf.mark_evictable(user, EvictableRange(0, P)),
            "mark_unevictable": lambda: mf.mark_unevictable(user, EvictableRange(0, P)),
            "mark_all_unevictable": lambda: mf.mark_all_unevictable(user),
            "start_evictions": lambda: mf.start_evictions(),
            "stats": lambda: mf.stats(),
            "total_usage": lambda: mf.total_usage(),
            "check_invariants": lambda: mf.check_invariants(),
        }
        before = (mf.dump_segments(), mf.stats())
        results: dict[str, BaseException | None] = {}

        def other() -> None:
            for name, call in calls.items():
                try:
                    call()
                except BaseException as e:
                    results[name] = e
                else:
                    results[name] = None

        t = threading.Thread(target=other)
        t.start()
        t.join()
        bad = {n: r for n, r in results.items() if not isinstance(r, WrongThreadError)}
        assert bad == {}, bad
        assert (mf.dump_segments(), mf.stats()) == before
        mf.check_invariants()


@pytest.mark.parametrize("seed", range(20))
async def test_random_bytes_are_only_ever_a_checkpoint_error(tmp_path: Path, seed: int) -> None:
    import random

    rng = random.Random(seed)
    path = tmp_path / "junk"
    path.write_bytes(rng.randbytes(rng.choice([0, 1, 7, 64, 4096, 1 << 16])))
    with pytest.raises(CheckpointError):
        await MemoryFile.load(path)


def _fd_targets(pid: str | int) -> dict[str, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd is gone already
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return out


async def test_pressure_watcher_descriptors_do_not_reach_a_child() -> None:
    from cgroups import make_cgroup, set_v1_limit, v1_parent

    with make_cgroup(v1_parent(), set_v1_limit) as group:
        before = _fd_targets("self")
        opts = MemoryFileOpts(use_host_memcg_pressure=True, memcg_path=group)
        async with MemoryFile.open(opts=opts):
            ours = {fd: t for fd, t in _fd_targets("self").items() if before.get(fd) != t}
            assert any("eventfd" in target for target in ours.values())  # the v1 watcher
            child = subprocess.Popen(["sleep", "5"], close_fds=False)  # noqa: ASYNC220
            try:
                theirs = _fd_targets(child.pid)
            finally:
                child.kill()
                child.wait()
            inherited = {fd for fd, target in ours.items() if theirs.get(fd) == target}
            assert inherited == set()
