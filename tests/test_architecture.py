"""The package's structure: no import cycle, and no module reads another object's
private state (the page-state core and the asyncio shell talk through methods)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "asyncpgalloc"


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, anywhere in it (functions and
    ``TYPE_CHECKING`` blocks included: a cycle there is a cycle still)."""
    names = {p.stem for p in PACKAGE.glob("*.py")}
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
    return out & names


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that ends where it began), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*path[path.index(n) :], n]
            if n not in state and (found := visit(n)) is not None:
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)) is not None:
            return found
    return None


def test_the_modules_import_one_another_without_a_cycle() -> None:
    assert (PACKAGE / "memory_file.py").exists()
    graph = {p.stem: _imports(p) - {p.stem} for p in PACKAGE.glob("*.py")}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_reads_a_memory_files_private_state() -> None:
    # The reviewer's measure of issue 12: a MemoryFile's private attributes are read
    # only inside memory_file.py (by the class that owns them).
    assert (PACKAGE / "memory_file.py").exists()
    reach = re.compile(r"\b(mf|self\._mf|file)\._[a-z]")
    found = [
        f"{p.name}:{i}: {line.strip()}"
        for p in sorted(PACKAGE.glob("*.py"))
        if p.name != "memory_file.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if reach.search(line)
    ]
    assert found == []
