"""examples/sandbox_supervisor.py: the project's main demo runs real guests, and gives
every page, fd and cgroup back.

The guests are real processes in real child memory cgroups (cgroup v1 here); every
test removes what a failing supervisor may have left (its group, its guests).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cgroups import fds, remove_cgroup, v1_memory_mount, v2_mount
from helpers import load_example

from asyncpgalloc import MemoryAccounting

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "examples/sandbox_supervisor.py"

supervisor = load_example("sandbox_supervisor")


def _cgroup_root() -> str | None:
    """Where the supervisor makes its group: the v1 memory hierarchy, else cgroup2."""
    return v1_memory_mount() or v2_mount()


def _groups_of(pid: int) -> list[str]:
    """The cgroups a supervisor with this pid made (its own group and its children)."""
    root = _cgroup_root()
    if root is None:
        return []
    return [os.path.join(root, d) for d in os.listdir(root) if re.search(rf"\b{pid}\b", d)]


def _remove_groups_of(pid: int) -> None:
    for group in _groups_of(pid):
        for child in os.scandir(group):
            if child.is_dir():
                remove_cgroup(child.path)
        remove_cgroup(group)


@contextlib.contextmanager
def _supervisor_process(
    *argv: str, prefix: tuple[str, ...] = ()
) -> Iterator[subprocess.Popen[str]]:
    """The supervisor as a user runs it (default loop: uvloop); on the way out, however
    the test went, it is killed and every cgroup it made removed."""
    proc = subprocess.Popen(
        [*prefix, sys.executable, SCRIPT, *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        _remove_groups_of(proc.pid)


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _live_rows(out: str) -> list[list[str]]:
    """The plain view's guest rows: ``sb-N pid cgroup age used cached evicted ...``."""
    return [line.split() for line in out.splitlines() if re.match(r"\s+sb-\d+\s+\d+", line)]


def test_supervisor_script_runs_real_guests_in_cgroups_and_returns_everything() -> None:
    if os.geteuid() != 0 or _cgroup_root() is None:
        pytest.skip("needs root and a memory cgroup hierarchy")
    with _supervisor_process("--duration", "2", "--seed", "3") as proc:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (out[-3000:], err[-3000:])
        # Checked before the context removes anything: the supervisor removed them.
        assert _groups_of(proc.pid) == []
    assert "running 4 guest processes for 2 s, one memfd each" in out
    group = f"asyncpgalloc-supervisor-{proc.pid}"
    assert re.search(rf"cgroup v[12]: a child memory cgroup per guest in \S+/{group}\n", out)
    # Plain live view (stdout is not a terminal): per guest its pid, its own cgroup and
    # what the kernel charged to that cgroup (read from the real group while it ran).
    rows = _live_rows(out)
    assert rows and all(row[2] == row[0] for row in rows)  # cgroup sb-N for guest sb-N
    assert any(float(row[8]) > 0 for row in rows)  # "cgroup mem" MiB
    pids = {int(row[1]) for row in rows}
    assert len(pids) >= 4 and os.getpid() not in pids
    assert "host holds" in out and "event-loop lag" in out
    assert re.search(r"checkpoint: 32\.0 MiB in 8 ranges of stopped pid \d+ saved", out)
    assert "restore: 32.0 MiB of 32.0 MiB loaded" in out  # load_progress(), plain lines
    assert re.search(r"verified by pid \d+: ok", out)
    assert "used + waste + host usage 0 B over every file, accounted 0 B" in out
    assert re.search(r"\d+ cgroups created, all removed; no fd leaked", out)
    assert out.rstrip().endswith("all pages returned: True")
    assert err == ""


def test_supervisor_says_so_and_runs_without_cgroups_on_a_read_only_cgroupfs() -> None:
    root = _cgroup_root()
    if os.geteuid() != 0 or root is None or shutil.which("unshare") is None:
        pytest.skip("needs root, unshare (a mount namespace) and a memory cgroup hierarchy")
    # In a mount namespace of its own the hierarchy is read-only: mkdir fails (EROFS).
    wrap = ("unshare", "-m", "sh", "-c", f'mount -o remount,bind,ro {root} && exec "$@"', "sh")
    with _supervisor_process("--duration", "1", "--sandboxes", "2", prefix=wrap) as proc:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (out[-3000:], err[-3000:])
    assert f"cannot create cgroups under {root} (Read-only file system)" in out
    assert "guests run without cgroups" in out
    assert all(row[2] == "-" for row in _live_rows(out))
    assert "invariants hold; no cgroups; no fd leaked" in out
    assert out.rstrip().endswith("all pages returned: True")


def test_a_stopped_guest_at_ctrl_c_is_killed_and_its_cgroup_removed() -> None:
    if os.geteuid() != 0 or _cgroup_root() is None:
        pytest.skip("needs root and a memory cgroup hierarchy")
    with _supervisor_process("--duration", "60", "--sandboxes", "2") as proc:
        deadline = time.monotonic() + 30
        guest = 0
        while not guest:  # a guest in one of the supervisor's child cgroups
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
            for group in _groups_of(proc.pid):
                for procs in [*Path(group).glob("*/cgroup.procs"), Path(group, "cgroup.procs")]:
                    with contextlib.suppress(OSError, ValueError, IndexError):
                        guest = guest or int(procs.read_text().split()[0])
        os.kill(guest, signal.SIGSTOP)
        time.sleep(0.3)  # it stays stopped, holding its memory
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, (out[-3000:], err[-3000:])
        assert _groups_of(proc.pid) == []  # removed by the supervisor, not by us
    with pytest.raises(ProcessLookupError):
        os.kill(guest, 0)  # killed and reaped
    assert "interrupted" in err


def test_real_memory_cgroup_pressure_evicts_guests_caches(
    capsys: pytest.CaptureFixture[str],
) -> None:
    if os.geteuid() != 0 or _cgroup_root() is None:
        pytest.skip("needs root and a memory cgroup hierarchy")
    # A budget never reached: what evicts is the kernel's pressure in each guest's own
    # cgroup, limited to 40 MiB. Without swap a guest may be OOM-killed there before its
    # caches go (its pages are freed all the same), or have none evictable just then;
    # test_guests.py shows the eviction itself with the OOM killer disabled.
    argv = ["--duration", "3", "--budget", "100000", "--guest-limit", "40", "--view", "plain"]
    assert supervisor.main([*argv, "--checkpoint-mib", "4", "--loop", "asyncio"]) == 0
    out = capsys.readouterr().out
    summary = out[out.index("summary:") :]
    assert "budget 100000 MiB gone over 0 times" in summary
    events = re.search(r"memory-cgroup pressure events (\d+):", summary)
    assert events is not None and int(events[1]) > 0  # the real watcher, per guest cgroup
    assert "0 bad bytes, 0 guest errors" in summary
    assert out.rstrip().endswith("all pages returned: True")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_supervisor_main_in_process_with_a_tiny_budget(
    loop: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A tiny budget: caches are evicted under "pressure" over and over.
    argv = ["--duration", "1", "--sandboxes", "2", "--budget", "1", "--loop", loop]
    assert supervisor.main([*argv, "--view", "plain", "--checkpoint-mib", "4"]) == 0
    out = capsys.readouterr().out
    assert "all pages returned: True" in out
    assert "budget 1 MiB gone over " in out  # a count of events, not a ratio
    summary = out[out.index("summary:") :]
    assert " 0 evictions" not in summary  # the budget was exceeded: caches were evicted
    assert " 0 B evicted from guests" not in summary  # and guests were told
    assert "0 bad bytes, 0 guest errors, 1 killed by the supervisor" in summary


def test_supervisor_rich_view_and_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    svg = tmp_path / "map.svg"
    argv = ["--duration", "1", "--sandboxes", "2", "--view", "live", "--map", str(svg)]
    assert supervisor.main(argv) == 0
    out = capsys.readouterr().out
    assert "asyncpgalloc sandbox supervisor" in out  # the rich table's title
    assert "restoring the guest's pages" in out  # the load's rich progress bar
    assert "all pages returned: True" in out
    # render_map is optional: either a map was drawn or a note says why not.
    if svg.exists():
        assert svg.read_text().lstrip().startswith(("<svg", "<?xml"))
        assert f"page map written to {svg}" in out
    else:
        assert "has no MemoryFile.render_map" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--duration", "0"],
        ["--sandboxes", "-1"],
        ["--budget", "x"],
        ["--view", "fancy"],
        ["--checkpoint-mib", "0"],
    ],
)
def test_supervisor_rejects_bad_options(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        supervisor.main(argv)
    assert exc.value.code == 2


def _supervisor() -> object:
    ns = supervisor.parse_args(["--duration", "1", "--checkpoint-mib", "4", "--view", "plain"])
    cgroups = supervisor.Cgroups.detect(f"asyncpgalloc-supervisor-{os.getpid()}")
    return supervisor.Supervisor(ns, random.Random(1), MemoryAccounting(), cgroups)


async def test_no_fd_or_cgroup_is_left_after_many_guests() -> None:
    # uvloop opens /dev/null once, at its first subprocess, and keeps it: not ours.
    warm = await asyncio.create_subprocess_exec("true", stdout=asyncio.subprocess.PIPE)
    await warm.communicate()
    before = fds()
    sup = _supervisor()
    try:

        async def guest(i: int) -> None:
            async with sup.sandbox() as sb:  # type: ignore[attr-defined]
                await sb.start("--seconds", "0.05", "--seed", str(i))
                await sb.run(0.05)

        for batch in range(10):
            await asyncio.gather(*(guest(4 * batch + i) for i in range(4)))
    finally:
        assert await sup.cgroups.close()  # type: ignore[attr-defined]
    t = sup.totals  # type: ignore[attr-defined]
    assert t.sandboxes == 40
    assert t.guest_errors == t.bad_bytes == t.leftover == t.killed == 0
    assert t.verified_bytes > 0
    assert sup.accounting.total() == 0  # type: ignore[attr-defined]
    assert _groups_of(os.getpid()) == []
    extra = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in fds() - before}
    assert not extra


async def test_a_sandbox_ended_by_an_error_kills_its_stopped_guest_and_removes_its_cgroup() -> None:
    sup = _supervisor()
    cgroup = proc = None
    try:
        with pytest.raises(RuntimeError, match="supervisor bug"):
            async with sup.sandbox() as sb:  # type: ignore[attr-defined]
                await sb.start("--keep", "256")
                proc, cgroup = sb.proc, sb.cgroup
                await sb.proc.stdout.readline()  # it holds 1 MiB
                sb.proc.send_signal(signal.SIGSTOP)
                raise RuntimeError("supervisor bug")
        assert cgroup is None or not _exists(cgroup)  # removed by the sandbox itself
    finally:
        assert await sup.cgroups.close()  # type: ignore[attr-defined]
    assert proc is not None and proc.returncode == -signal.SIGKILL
    t = sup.totals  # type: ignore[attr-defined]
    assert t.sandboxes == 1 and t.killed == 1 and t.leftover == 0
    assert sup.accounting.total() == 0  # type: ignore[attr-defined]


async def test_supervisor_status_uses_the_whole_width_and_says_what_it_counts() -> None:
    from rich.console import Console

    sup = _supervisor()
    try:
        sup.totals.pressure = 11  # type: ignore[attr-defined]
        items = sup.status()  # type: ignore[attr-defined]
        assert any("gone over 11 times" in item for item in items)
        assert not any("11x" in item for item in items)
        # A wide terminal: every phrase on one line; a narrow one: broken between them.
        assert sup.file_lines(width=400) == "; ".join(items)  # type: ignore[attr-defined]
        narrow = sup.file_lines(width=60).splitlines()  # type: ignore[attr-defined]
        assert "; ".join(narrow) == "; ".join(items) and len(narrow) > 2
        assert all(len(line) <= 60 or line in items for line in narrow)
        # The rich view prints the lines below the table at the console's width.
        console = Console(width=300, record=True, color_system=None)
        console.print(sup.live_view(console.width))  # type: ignore[attr-defined]
        text = console.export_text()
        assert "; ".join(items[:4]) in text
        headers = [f"{top} {bottom}".strip() for top, bottom in sup.COLUMNS]  # type: ignore[attr-defined]
        for column in ("pid", "cgroup", "used", "cached", "evicted", "req/s"):
            assert column in headers
    finally:
        assert await sup.cgroups.close()  # type: ignore[attr-defined]
    assert supervisor.times(1) == "once" and supervisor.times(3) == "3 times"
