"""Shared fixtures: every async test runs on both the default asyncio loop and uvloop."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Mapping

import pytest
import uvloop
from hypothesis import settings

from asyncpgalloc import MemoryFile, MemoryFileOpts


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture
async def mf() -> AsyncIterator[MemoryFile]:
    """A MemoryFile on a fresh memfd whose invariants are checked once the test is done."""
    async with MemoryFile.open(opts=MemoryFileOpts()) as f:
        yield f
        if not f.closed:
            f.check_invariants()


@pytest.fixture
async def huge_mf() -> AsyncIterator[MemoryFile]:
    """A MemoryFile that keeps huge=True allocations in huge-page chunks."""
    async with MemoryFile.open(opts=MemoryFileOpts(expect_hugepages=True)) as f:
        yield f
        if not f.closed:
            f.check_invariants()


# CI runs hypothesis with a fixed seed (derandomize) so a red run is reproducible;
# locally each run explores new examples.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
