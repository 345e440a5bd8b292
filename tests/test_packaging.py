"""Packaging: the license file the metadata promises, extras for what the library does not
import, and ``python -m asyncpgalloc --version``."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import asyncpgalloc

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def test_license_is_spdx_and_the_file_exists() -> None:
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    # setuptools takes the SPDX string form (PEP 639) from 77 on.
    assert any(r.startswith("setuptools>=77") for r in PYPROJECT["build-system"]["requires"])


def test_classifiers_and_urls() -> None:
    assert "Typing :: Typed" in PROJECT["classifiers"]
    assert "Framework :: AsyncIO" in PROJECT["classifiers"]
    # PEP 639: the license is the expression, not a classifier.
    assert not any(c.startswith("License ::") for c in PROJECT["classifiers"])
    assert all(url.startswith("https://") for url in PROJECT["urls"].values())


def test_uvloop_and_aiofiles_are_extras_the_library_does_not_import() -> None:
    deps = " ".join(PROJECT["dependencies"])
    assert "uvloop" not in deps and "aiofiles" not in deps
    extras = PROJECT["optional-dependencies"]
    for extra in ("test", "demo"):
        assert any(r.startswith("uvloop") for r in extras[extra]), extra
        assert any(r.startswith("aiofiles") for r in extras[extra]), extra
    assert extras["uvloop"] and extras["aiofiles"]
    modules = ", ".join(
        f"asyncpgalloc.{p.stem}" for p in (ROOT / "asyncpgalloc").glob("*.py") if p.stem[0] != "_"
    )
    code = (
        f"import sys, asyncpgalloc, {modules}\n"
        "print(sorted(m for m in ('uvloop', 'aiofiles') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_python_m_asyncpgalloc_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "asyncpgalloc", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"asyncpgalloc {asyncpgalloc.__version__}"
    assert asyncpgalloc.__version__ == PROJECT["version"]
    assert importlib.metadata.version("asyncpgalloc") == PROJECT["version"]
