"""The README and the examples stay true: the README's Python runs, the examples run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_quick_start_has_exactly_two_commands() -> None:
    section = README.split("## Quick start", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    commands = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(commands) == 2
    assert "examples/sandbox_supervisor.py" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize(
    "code", re.findall(r"```python\n(.*?)```", README, re.S), ids=lambda c: c.splitlines()[0]
)
def test_readme_python_blocks_run(code: str) -> None:
    result = _run(["-c", code])
    assert result.returncode == 0, result.stderr


def test_quickstart_example_runs() -> None:
    result = _run(["examples/quickstart.py"])
    assert result.returncode == 0, result.stderr
    assert "all pages returned: True" in result.stdout


def test_the_design_document_exists_and_the_readme_links_it() -> None:
    design = ROOT / "docs" / "design.md"
    text = design.read_text()
    for heading in ("Page states", "Invariants", "Concurrency model", "deviations from gVisor"):
        assert heading in text, heading
    assert "(docs/design.md)" in README
    # Nothing cites the design card that is not in the repository.
    for path in [ROOT / "README.md", *ROOT.glob("asyncpgalloc/*.py"), *ROOT.glob("tests/*.py")]:
        if path.name != "test_docs.py":
            assert "DESIGN.md" not in path.read_text(), path
