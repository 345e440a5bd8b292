"""Which page-state core runs: the compiled one or the pure-Python reference.

``asyncpgalloc/segments.py`` and ``asyncpgalloc/pages.py`` are the source of truth and the
pure-Python core. The package's build compiles the same two files with Cython ("pure Python
mode", see setup.py) into ``asyncpgalloc._compiled.segments`` and ``._compiled.pages``: same
source, so the same behaviour, at compiled speed. This module picks one, once, at import (as
multidict and yarl do): the compiled core unless ``ASYNCPGALLOC_NO_EXTENSIONS`` is set to a
non-empty value other than ``0``, or the compiled modules cannot be imported (the build failed or
was skipped), in which case one :class:`RuntimeWarning` says so. Every module of the package
takes the core's names from here, so one process never mixes the two.

Under type checking the names are the pure-Python ones: the compiled modules have no stubs of
their own, and their types are those of the .py sources by construction.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Literal

__all__ = [
    "DEAD_SLICE",
    "MAX_RELEASING_BYTES",
    "MemAcct",
    "PageSets",
    "PageView",
    "ReleasePlan",
    "SegmentSet",
    "core_implementation",
    "count_states",
    "format_segments",
    "new_mem_acct_set",
    "new_unfree_set",
    "pages",
    "plan_release",
    "segments",
]

Implementation = Literal["compiled", "python"]


def extensions_disabled() -> bool:
    """Whether ``ASYNCPGALLOC_NO_EXTENSIONS`` asks for the pure-Python core (cheap, no I/O)."""
    return os.environ.get("ASYNCPGALLOC_NO_EXTENSIONS", "") not in ("", "0")


def _select() -> tuple[ModuleType, ModuleType, Implementation]:
    from . import pages as py_pages
    from . import segments as py_segments

    if extensions_disabled():
        return py_pages, py_segments, "python"
    try:
        # By name: the compiled modules have no .py (nor stubs) for the type checker to read.
        c_segments = importlib.import_module("asyncpgalloc._compiled.segments")
        c_pages = importlib.import_module("asyncpgalloc._compiled.pages")
    except ImportError as exc:
        warnings.warn(
            f"asyncpgalloc: the compiled core is not available ({exc}); using the pure-Python "
            "core (set ASYNCPGALLOC_NO_EXTENSIONS=1 to choose it and silence this warning)",
            RuntimeWarning,
            stacklevel=2,
        )
        return py_pages, py_segments, "python"
    return c_pages, c_segments, "compiled"


if TYPE_CHECKING:
    from . import pages, segments

    _IMPLEMENTATION: Implementation
else:
    pages, segments, _IMPLEMENTATION = _select()


def core_implementation() -> Implementation:
    """``"compiled"`` or ``"python"``: the page-state core this process runs (no cost)."""
    return _IMPLEMENTATION


DEAD_SLICE = pages.DEAD_SLICE
MAX_RELEASING_BYTES = pages.MAX_RELEASING_BYTES
MemAcct = pages.MemAcct
PageSets = pages.PageSets
PageView = pages.PageView
ReleasePlan = pages.ReleasePlan
count_states = pages.count_states
format_segments = pages.format_segments
new_mem_acct_set = pages.new_mem_acct_set
new_unfree_set = pages.new_unfree_set
plan_release = pages.plan_release
SegmentSet = segments.SegmentSet
