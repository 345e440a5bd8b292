"""The two page-state cores: which one runs, and that both behave the same.

``asyncpgalloc.core`` picks the compiled core (``asyncpgalloc._compiled``, Cython builds of
segments.py and pages.py) or the pure-Python one. The whole suite runs against whichever is
selected (CI runs it twice); the differential test here imports both explicitly and drives
them with the same operations, comparing every result and every set after every step.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import max_examples
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncpgalloc
from asyncpgalloc import (
    AllocationMode,
    AllocOpts,
    Direction,
    FileRange,
    MemoryAccounting,
    MemoryKind,
    core,
)
from asyncpgalloc import pages as py_pages
from asyncpgalloc import segments as py_segments
from asyncpgalloc.ranges import HUGE_PAGE_SIZE, KEY_MAX, PAGE_SIZE

P = PAGE_SIZE
ROOT = Path(__file__).resolve().parent.parent


def compiled_pages() -> ModuleType:
    """The compiled core's pages module; skips (fails in CI) where it was not built."""
    try:
        return importlib.import_module("asyncpgalloc._compiled.pages")
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("the compiled core was not built")


def run_python(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter (the core is chosen once, at import)."""
    full = {k: v for k, v in os.environ.items() if k != "ASYNCPGALLOC_NO_EXTENSIONS"}
    full.update(env)
    out = subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


WHICH = "import asyncpgalloc as a; print(a.core_implementation(), a.core.PageSets.__module__)"


def test_the_environment_variable_selects_the_python_core() -> None:
    assert run_python(WHICH, ASYNCPGALLOC_NO_EXTENSIONS="1") == "python asyncpgalloc.pages"


def test_the_compiled_core_is_the_default_where_it_was_built() -> None:
    compiled_pages()
    assert run_python(WHICH) == "compiled asyncpgalloc._compiled.pages"
    assert run_python(WHICH, ASYNCPGALLOC_NO_EXTENSIONS="0").startswith("compiled ")


def test_a_missing_build_falls_back_with_one_warning() -> None:
    # A module set to None in sys.modules cannot be imported: what a failed build leaves.
    code = (
        "import sys, warnings\n"
        "sys.modules['asyncpgalloc._compiled.pages'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import asyncpgalloc as a\n"
        "print(a.core_implementation(), len(w), w[0].category.__name__)\n"
        "print(w[0].message)\n"
    )
    first, message = run_python(code).splitlines()
    assert first == "python 1 RuntimeWarning"
    assert "ASYNCPGALLOC_NO_EXTENSIONS" in message


def test_the_build_needs_cython_and_ships_the_compiled_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert any(r.startswith("Cython>=3") for r in pyproject["build-system"]["requires"])
    assert "asyncpgalloc._compiled" in pyproject["tool"]["setuptools"]["packages"]
    assert (ROOT / "setup.py").is_file()


def test_this_process_runs_the_core_the_environment_asks_for() -> None:
    """In CI the compiled core must have been built (the suite runs once with each)."""
    if core.extensions_disabled():
        assert asyncpgalloc.core_implementation() == "python"
        assert core.pages is py_pages
    elif os.environ.get("CI"):
        assert asyncpgalloc.core_implementation() == "compiled"
    assert core.PageSets is core.pages.PageSets
    assert core.SegmentSet is core.segments.SegmentSet


def test_the_compiled_modules_are_compiled_and_use_each_other() -> None:
    cp = compiled_pages()
    cs = importlib.import_module("asyncpgalloc._compiled.segments")
    assert cp.__file__ is not None and cp.__file__.endswith(".so")
    assert cs.__file__ is not None and cs.__file__.endswith(".so")
    # The compiled core's sets are the compiled segment sets (typed C calls, pages.pxd).
    assert type(cp.new_unfree_set()) is cs.SegmentSet
    assert type(cp.new_mem_acct_set()) is cs.SegmentSet
    assert py_segments.SegmentSet is not cs.SegmentSet
    # Both cores raise the package's one set of errors.
    assert cp.ReferenceCountError is asyncpgalloc.ReferenceCountError


def test_both_cores_refuse_a_float_bound() -> None:
    """Cython's default annotation typing took ``start: int`` as a C-level conversion and let
    0.0 through the compiled inc_ref; the build turns it off (setup.py)."""
    for module in (py_pages, compiled_pages()):
        pages = module.PageSets(MemoryAccounting(), account=True)
        pages.add_chunks(1, False)
        pages.allocate_uncommitted(P, AllocOpts(), False)
        for op in ("inc_ref", "dec_ref", "has_unique_ref"):
            with pytest.raises(asyncpgalloc.RangeTypeError):
                getattr(pages, op)(FileRange(0.0, P))  # type: ignore[arg-type]


# ---------------------------------------------------------------- differential

OPTS = {
    "alloc": AllocOpts(),
    "alloc_commit": AllocOpts(mode=AllocationMode.COMMIT),
    "alloc_top": AllocOpts(direction=Direction.TOP_DOWN, kind=MemoryKind.ANONYMOUS),
    "alloc_huge": AllocOpts(huge=True),
}

ops = st.lists(
    st.tuples(
        st.sampled_from([*OPTS, "inc", "dec", "step", "settle", "decommit", "scan"]),
        st.integers(0, 2**16),
        st.integers(1, 64),
    ),
    max_size=60,
)


def plain(value: Any) -> Any:
    """A value both cores' results compare by: their classes differ, their contents must not."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__, dataclasses.astuple(value))
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def state(pages: Any) -> tuple[Any, ...]:
    """Every page's state: each set's segments, the huge pages' counts, the totals."""
    view = pages.view()
    sets = (view.unfree_small, view.unfree_huge, view.unwaste_small, view.unwaste_huge)
    return (
        [list(s.visit_range(0, KEY_MAX)) for s in (*sets, view.mem_acct)],
        dict(view.subreleased),
        list(view.releasing),
        list(view.chunk_huge),
        view.commit_seq,
        view.known_committed_bytes,
        pages.stats(),
        pages.has_waste,
        pages.has_dead(),
        pages.releasing,
    )


class Driven:
    """One core driven by the operations; each step returns what it returned or raised."""

    def __init__(self, module: ModuleType) -> None:
        self.acct = MemoryAccounting()
        self.pages: Any = module.PageSets(self.acct, account=True)

    def step(self, op: str, pick: int, n: int, allocs: list[FileRange]) -> Any:
        pages = self.pages
        try:
            if op in OPTS:
                opts = OPTS[op]
                length = (n % 4 + 1) * HUGE_PAGE_SIZE if opts.huge else n * P
                while (got := pages.allocate(length, opts, opts.huge)) is None:
                    grow = pages.plan_growth(length, opts.huge, 64, 64)
                    pages.add_chunks(grow - pages.chunk_count, opts.huge)
                if opts.mode is AllocationMode.COMMIT:
                    pages.mark_allocation_committed(got[0])
                return plain(got)
            if op in ("inc", "dec", "decommit"):
                if not allocs:
                    return None
                fr = allocs[pick % len(allocs)]
                first = fr.start // P + pick % (fr.length // P)
                sub = FileRange(first * P, min(fr.end // P, first + n) * P)
                if op == "decommit":
                    return pages.decommitted(sub.start, sub.end)
                return getattr(pages, f"{op}_ref")(sub)
            if op == "step":
                plans = pages.begin_release(n % 8 + 1, {})
                done = [
                    pages.abort_release(plan)
                    if pick % 5 == 0
                    else pages.finish_release(plan, *plan.released)
                    for plan in plans
                ]
                if not pages.stats().waste_bytes:
                    done.append(pages.out_of_waste())
                return plain([plans, done])
            if op == "scan":
                seq = pages.begin_scan()
                pages.mark_data_committed(0, pages.total_size, seq)
                return seq
            return pages.settle()
        except Exception as exc:  # both cores must raise the same error for the same step
            return ("raised", type(exc), str(exc))


@settings(max_examples=max_examples(200), deadline=None)
@given(ops=ops)
def test_both_cores_agree_after_every_step(ops: list[tuple[str, int, int]]) -> None:
    py, compiled = Driven(py_pages), Driven(compiled_pages())
    allocs: list[FileRange] = []
    for op, pick, n in ops:
        got = py.step(op, pick, n, allocs)
        assert compiled.step(op, pick, n, allocs) == got, op
        assert state(compiled.pages) == state(py.pages), op
        assert compiled.acct.by_kind() == py.acct.by_kind()
        if op in OPTS and got[0] != "raised":
            allocs.append(got[0])
