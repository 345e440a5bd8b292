"""examples/sandbox_supervisor.py: the project's main demo runs, and gives every page back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_example

ROOT = Path(__file__).resolve().parent.parent




supervisor = load_example("sandbox_supervisor")


def test_supervisor_script_runs_and_returns_every_page() -> None:
    # As a user runs it (default loop: uvloop), with a short duration.
    result = subprocess.run(
        [sys.executable, "examples/sandbox_supervisor.py", "--duration", "2", "--seed", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "running 4 sandboxes for 2 s on one memfd" in out
    # Plain live view (stdout is not a terminal): the file's lines and a table.
    assert "host holds" in out and "event-loop lag" in out
    assert "sb-1" in out
    assert "summary:" in out
    assert "used 0 B, waste 0 B, host usage 0 B, accounted 0 B; invariants hold" in out
    assert out.rstrip().endswith("all pages returned: True")
    assert result.stderr == ""


def test_supervisor_main_in_process_on_asyncio(capsys: pytest.CaptureFixture[str]) -> None:
    # A tiny budget: caches are evicted under "pressure" over and over.
    argv = ["--duration", "1", "--sandboxes", "2", "--budget", "1", "--loop", "asyncio"]
    assert supervisor.main([*argv, "--view", "plain"]) == 0
    out = capsys.readouterr().out
    assert "all pages returned: True" in out
    assert "budget 1 MiB gone over " in out  # a count of events, not a ratio
    summary = out[out.index("summary:") :]
    assert " 0 evictions" not in summary  # the budget was exceeded: caches were evicted


def test_supervisor_rich_view_and_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    svg = tmp_path / "map.svg"
    argv = ["--duration", "1", "--sandboxes", "2", "--view", "live", "--map", str(svg)]
    assert supervisor.main(argv) == 0
    out = capsys.readouterr().out
    assert "asyncpgalloc sandbox supervisor" in out  # the rich table's title
    assert "all pages returned: True" in out
    # render_map is optional: either a map was drawn or a note says why not.
    if svg.exists():
        assert svg.read_text().lstrip().startswith(("<svg", "<?xml"))
        assert f"page map written to {svg}" in out
    else:
        assert "has no MemoryFile.render_map" in out


@pytest.mark.parametrize(
    "argv",
    [["--duration", "0"], ["--sandboxes", "-1"], ["--budget", "x"], ["--view", "fancy"]],
)
def test_supervisor_rejects_bad_options(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        supervisor.main(argv)
    assert exc.value.code == 2


async def test_supervisor_status_uses_the_whole_width_and_says_what_it_counts() -> None:
    import argparse
    import random

    from rich.console import Console

    from asyncpgalloc import MemoryFile

    async with MemoryFile.open() as mf:
        sup = supervisor.Supervisor(mf, argparse.Namespace(budget=96), [], random.Random(1))
        sup.totals.pressure = 11
        items = sup.status()
        assert any("gone over 11 times" in item for item in items)
        assert not any("11x" in item for item in items)
        # A wide terminal: every phrase on one line; a narrow one: broken between them.
        assert sup.file_lines(width=400) == "; ".join(items)
        narrow = sup.file_lines(width=60).splitlines()
        assert "; ".join(narrow) == "; ".join(items) and len(narrow) > 2
        assert all(len(line) <= 60 or line in items for line in narrow)
        # The rich view prints the lines below the table at the console's width (a
        # table caption wrapped them at the table's ~72 columns).
        console = Console(width=300, record=True, color_system=None)
        console.print(sup.live_view(console.width))
        text = console.export_text()
        assert "; ".join(items[:4]) in text
        headers = [f"{top} {bottom}" for top, bottom in sup.COLUMNS]
        assert "cache hits" in headers and "cache evicted" in headers
        assert not any("/" in h for h in headers)
    assert supervisor.times(1) == "once" and supervisor.times(3) == "3 times"
