"""``python -m asyncpgalloc``: help, exit statuses, and each subcommand doing its work."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from asyncpgalloc import PAGE_SIZE, AccessType, AllocationMode, AllocOpts, FileRange, MemoryFile
from asyncpgalloc import __main__ as cli

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["demo", "bench", "map", "inspect"]
HAVE_CHECKPOINTS = importlib.util.find_spec("asyncpgalloc.checkpoint") is not None
needs_checkpoints = pytest.mark.skipif(
    not HAVE_CHECKPOINTS, reason="asyncpgalloc.checkpoint is not importable yet"
)


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asyncpgalloc", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_every_command_and_the_exit_statuses() -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout
    assert "exit status:" in result.stdout
    for status in ("0  success", "1  the work failed", "2  bad usage"):
        assert status in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command: str) -> None:
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m asyncpgalloc {command}")
    assert "exit status:" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["map", "x.ckpt"],  # no -o
        ["map", "x.ckpt", "-o", "x.svg", "--width", "1000"],
        ["map", "x.ckpt", "-o", "x.svg", "--bogus"],
        ["inspect"],
        ["inspect", "a", "b"],
        ["bench", "--script", "no-such-benchmark"],
    ],
    ids=lambda a: " ".join(a) or "nothing",
)
def test_bad_usage_exits_2(args: list[str]) -> None:
    result = run(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.strip()


def test_missing_examples_and_benchmarks_exit_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An installed package has no examples/ or benchmarks/ next to it.
    monkeypatch.setattr(cli, "_REPO", tmp_path)
    assert cli.main(["demo", "--duration", "1"]) == 2
    assert "sandbox_supervisor.py not found" in capsys.readouterr().err
    assert cli.main(["bench", "--quick"]) == 2
    assert "no benchmark scripts" in capsys.readouterr().err


def test_bench_passes_arguments_and_exit_status_through(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "bench_ok.py").write_text("import sys\nprint('ok got', sys.argv[1:])\n")
    (bench / "bench_zfail.py").write_text(
        "import sys\nprint('fail got', sys.argv[1:])\nsys.exit(3)\n"
    )
    monkeypatch.setattr(cli, "_REPO", tmp_path)
    assert cli.main(["bench", "--quick", "--reps", "5"]) == 3
    out = capfd.readouterr().out
    assert "ok got ['--quick', '--reps', '5']" in out
    assert "fail got ['--quick', '--reps', '5']" in out  # the others still run
    assert cli.main(["bench", "--script", "ok", "--", "--list"]) == 0
    assert "ok got ['--list']" in capfd.readouterr().out
    assert cli.main(["bench", "--list"]) == 0
    assert "benchmarks/bench_zfail.py" in capfd.readouterr().out


def test_bench_lists_the_real_scripts() -> None:
    result = run("bench", "--list")
    assert result.returncode == 0, result.stderr
    assert "benchmarks/" in result.stdout


def test_demo_passes_arguments_and_status_through(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "sandbox_supervisor.py").write_text(
        "import sys\n"
        "def main(argv):\n"
        "    print('demo got', list(argv), sys.argv[0])\n"
        "    return 1\n"
    )
    monkeypatch.setattr(cli, "_REPO", tmp_path)
    assert cli.main(["demo", "--duration", "1", "--seed=3"]) == 1
    assert "demo got ['--duration', '1', '--seed=3'] python -m asyncpgalloc demo" in (
        capsys.readouterr().out
    )


@pytest.mark.skipif(
    not (ROOT / "examples" / "sandbox_supervisor.py").is_file(),
    reason="examples/sandbox_supervisor.py is not there",
)
def test_demo_runs_the_supervisor() -> None:
    result = run("demo", "--duration", "1", timeout=180)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A checkpoint of a file with used, shared and freed pages in two chunks."""
    path = tmp_path / "file.ckpt"

    async def make() -> None:
        async with MemoryFile.open() as mf:
            a = mf.allocate(256 * PAGE_SIZE, AllocOpts(mode=AllocationMode.WRITE_POPULATE))
            for view in mf.map_internal(a, AccessType.WRITE):
                view[:] = b"\x42" * len(view)
            mf.dec_ref(FileRange(a.start + 64 * PAGE_SIZE, a.start + 128 * PAGE_SIZE))
            mf.allocate(1 << 30)  # a second chunk
            await mf.wait_released()
            await mf.save(path)

    asyncio.run(make())
    return path


@needs_checkpoints
def test_map_draws_a_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "map.svg"
    result = run("map", str(checkpoint), "-o", str(out), "--width", "512")
    assert result.returncode == 0, result.stderr
    root = ET.fromstring(out.read_text())
    ns = "{http://www.w3.org/2000/svg}"
    totals = {
        g.attrib["data-state"]: int(g.attrib["data-bytes"])
        for g in root.iter(f"{ns}g")
        if g.attrib.get("class") == "legend-item"
    }
    assert totals["used"] == (256 - 64) * PAGE_SIZE + (1 << 30)
    assert totals["waste"] == totals["releasing"] == 0
    assert any("file.ckpt" in (t.text or "") for t in root.iter(f"{ns}text"))
    # To stdout as well.
    result = run("map", str(checkpoint), "-o", "-")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("<svg")


@needs_checkpoints
def test_inspect_describes_a_checkpoint(checkpoint: Path) -> None:
    result = run("inspect", str(checkpoint))
    assert result.returncode == 0, result.stderr
    assert str(checkpoint) in result.stdout


@needs_checkpoints
@pytest.mark.parametrize("command", ["map", "inspect"])
def test_a_damaged_checkpoint_exits_1(command: str, checkpoint: Path, tmp_path: Path) -> None:
    data = bytearray(checkpoint.read_bytes())
    data[100] ^= 0xFF
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(bytes(data))
    args = [command, str(bad)] + (["-o", str(tmp_path / "bad.svg")] if command == "map" else [])
    result = run(*args)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "bad.ckpt" in result.stderr
    assert not (tmp_path / "bad.svg").exists()
