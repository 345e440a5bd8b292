"""Builds the compiled page-state core: asyncpgalloc/segments.py and pages.py, compiled by
Cython ("pure Python mode") as asyncpgalloc._compiled.segments and ._compiled.pages.

The .py files stay the source of truth (and the pure-Python implementation). The build is
optional: without a C compiler or Cython the package installs pure Python, and the import says
so in one warning. ``ASYNCPGALLOC_NO_EXTENSIONS=1`` at build time skips it; with ``CI=true``
(or ``ASYNCPGALLOC_REQUIRE_EXTENSIONS=1``) a failed build fails the install.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Module of asyncpgalloc._compiled -> its source. The segment set is hand-written Cython (a
# B+ tree in C memory); the page-state core is pages.py itself, compiled in pure Python mode.
# (asyncpgalloc/_compiled/pages.pxd types the latter's attributes and calls.)
_SOURCES = {"segments": "asyncpgalloc/_compiled/segments.pyx", "pages": "asyncpgalloc/pages.py"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() not in ("", "0", "false", "no")


_REQUIRED = _flag("CI") or _flag("ASYNCPGALLOC_REQUIRE_EXTENSIONS")


class _OptionalBuildExt(build_ext):
    """build_ext that warns and carries on (pure Python) when compiling fails, unless required."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            if _REQUIRED:
                raise
            print(f"asyncpgalloc: compiled core not built ({exc}); pure Python", file=sys.stderr)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            if _REQUIRED:
                raise
            print(f"asyncpgalloc: {ext.name} not built ({exc})", file=sys.stderr)


def _extensions() -> list[Extension]:
    if _flag("ASYNCPGALLOC_NO_EXTENSIONS"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        if _REQUIRED:
            raise
        print("asyncpgalloc: Cython missing, compiled core not built", file=sys.stderr)
        return []
    exts = [
        Extension(f"asyncpgalloc._compiled.{name}", [source]) for name, source in _SOURCES.items()
    ]
    return list(
        cythonize(
            exts,
            build_dir="build/cython",
            language_level=3,
            # annotation_typing off: the annotations are for mypy; Cython must not turn them into
            # type checks or conversions of its own (behaviour stays that of the .py source).
            compiler_directives={"binding": True, "annotation_typing": False},
            quiet=True,
            # cythonize compares only file times: a changed directive must recompile too.
            force=True,
        )
    )


setup(ext_modules=_extensions(), cmdclass={"build_ext": _OptionalBuildExt})
