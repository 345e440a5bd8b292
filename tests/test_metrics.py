"""asyncpgalloc.metrics: the Prometheus collector reports exactly what the file says."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from asyncpgalloc import (
    AccessType,
    AllocationMode,
    AllocOpts,
    DelayedEviction,
    EvictableRange,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
)
from asyncpgalloc.metrics import PAGE_STATES, MemoryFileCollector, render_metrics

MiB = 1 << 20


class DroppingCache:
    """An evictable user that gives its range back when asked."""

    def __init__(self, mf: MemoryFile, fr: FileRange) -> None:
        self.mf = mf
        self.fr: FileRange | None = fr

    async def evict(self, er: EvictableRange) -> None:
        if self.fr is not None:
            self.mf.dec_ref(self.fr)
            self.fr = None


async def workload(mf: MemoryFile) -> list[FileRange]:
    """Allocations of several kinds and memcgs, writes, a release, an eviction, a scan.

    Returns what is still held.
    """
    anon = mf.allocate(4 * MiB, AllocOpts(kind=MemoryKind.ANONYMOUS, memcg_id=1))
    for view in mf.map_internal(anon, AccessType.WRITE):
        view[:] = b"\x01" * len(view)
    cache = await mf.allocate_async(
        2 * MiB,
        AllocOpts(kind=MemoryKind.PAGE_CACHE, memcg_id=2, mode=AllocationMode.WRITE_POPULATE),
    )
    tmpfs = mf.allocate(
        1 * MiB, AllocOpts(kind=MemoryKind.TMPFS, memcg_id=2, mode=AllocationMode.WRITE_POPULATE)
    )
    gone = mf.allocate(3 * MiB, AllocOpts(memcg_id=3, mode=AllocationMode.WRITE_POPULATE))
    evictable = await mf.allocate_async(
        1 * MiB, AllocOpts(kind=MemoryKind.PAGE_CACHE, memcg_id=3, mode=AllocationMode.COMMIT)
    )
    await mf.update_usage()
    mf.dec_ref(gone)
    # Half of the anonymous range goes too: waste, then released.
    mf.dec_ref(FileRange(anon.start + 2 * MiB, anon.end))
    await mf.wait_released()
    user = DroppingCache(mf, evictable)
    mf.mark_evictable(user, EvictableRange(evictable.start, evictable.end))
    assert mf.start_evictions()
    await mf.wait_for_evictions()
    await mf.wait_released()
    # Left as waste on purpose, so that the waste gauge is not zero.
    mf.dec_ref(FileRange(cache.start, cache.start + MiB))
    return [
        FileRange(anon.start, anon.start + 2 * MiB),
        FileRange(cache.start + MiB, cache.end),
        tmpfs,
    ]


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def check_registry_matches(registry: CollectorRegistry, mf: MemoryFile) -> None:
    stats, counters = mf.stats(), mf.counters()
    for state in PAGE_STATES:
        want = getattr(stats, f"{state}_bytes")
        assert sample(registry, "asyncpgalloc_bytes", state=state) == want, state
    assert sample(registry, "asyncpgalloc_committed_bytes") == stats.known_committed_bytes
    assert sample(registry, "asyncpgalloc_size_bytes") == stats.total_size
    assert sample(registry, "asyncpgalloc_host_usage_bytes") == mf.total_usage()
    assert sample(registry, "asyncpgalloc_chunks", page_size="small") == stats.small_chunks
    assert sample(registry, "asyncpgalloc_chunks", page_size="huge") == stats.huge_chunks
    for field in dataclasses.fields(counters):
        want = getattr(counters, field.name)
        assert sample(registry, f"asyncpgalloc_{field.name}_total") == want, field.name
    reported = {
        (s.labels["kind"], s.labels["memcg"]): s.value
        for family in registry.collect()
        if family.name == "asyncpgalloc_accounted_bytes"
        for s in family.samples
    }
    expected = {
        (kind.name.lower(), str(memcg)): n
        for memcg in mf.accounting.memcg_ids()
        for kind, n in mf.accounting.by_memcg(memcg).items()
    }
    assert reported == expected


async def test_collector_reports_stats_counters_and_accounting() -> None:
    opts = MemoryFileOpts(delayed_eviction=DelayedEviction.MANUAL)
    async with MemoryFile.open(opts=opts) as mf:
        held = await workload(mf)
        registry = CollectorRegistry()
        registry.register(MemoryFileCollector(mf))
        check_registry_matches(registry, mf)

        # The workload left something in every interesting place.
        c = mf.counters()
        assert c.allocations == 5 and c.released_bytes > 0 and c.evict_calls == 1
        assert c.usage_scans >= 1
        assert sample(registry, "asyncpgalloc_bytes", state="waste") == MiB
        assert sample(registry, "asyncpgalloc_accounted_bytes", kind="anonymous", memcg="1") == (
            2 * MiB
        )
        assert sample(registry, "asyncpgalloc_accounted_bytes", kind="tmpfs", memcg="2") == MiB
        # Freed pages are accounted as SYSTEM until the releaser punches them.
        assert sample(registry, "asyncpgalloc_accounted_bytes", kind="system", memcg="2") == MiB

        for fr in held:
            mf.dec_ref(fr)
        await mf.wait_released()
        check_registry_matches(registry, mf)
        assert sample(registry, "asyncpgalloc_bytes", state="used") == 0
        mf.check_invariants()


async def test_scrape_from_another_thread_goes_through_the_loop() -> None:
    async with MemoryFile.open() as mf:
        fr = mf.allocate(MiB, AllocOpts(memcg_id=4, mode=AllocationMode.WRITE_POPULATE))
        await mf.update_usage()
        registry = CollectorRegistry()
        registry.register(MemoryFileCollector(mf))
        # What prometheus_client.start_http_server does: collect in its own thread.
        text = (await asyncio.to_thread(generate_latest, registry)).decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        used = [s for s in families["asyncpgalloc_bytes"].samples if s.labels["state"] == "used"]
        assert used[0].value == MiB
        accounted = families["asyncpgalloc_accounted_bytes"].samples
        assert [(s.labels, s.value) for s in accounted] == [
            ({"kind": "anonymous", "memcg": "4"}, MiB)
        ]
        mf.dec_ref(fr)


async def test_scrape_from_another_thread_times_out_when_the_loop_is_blocked() -> None:
    async with MemoryFile.open() as mf:
        collector = MemoryFileCollector(mf, timeout=0.05)
        errors: list[BaseException] = []

        def scrape() -> None:
            try:
                list(collector.collect())
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=scrape)
        thread.start()
        time.sleep(0.3)  # noqa: ASYNC251 - blocking the loop is the point of this test
        thread.join()
        assert len(errors) == 1 and isinstance(errors[0], TimeoutError)
        await asyncio.sleep(0)  # let the late snapshot callback run harmlessly


async def test_describe_names_families_without_reading_the_file() -> None:
    async with MemoryFile.open() as mf:
        collector = MemoryFileCollector(mf, prefix="vm0")
        described = list(collector.describe())
        assert all(not family.samples for family in described)
        names = {family.name for family in described}
        assert {"vm0_bytes", "vm0_committed_bytes", "vm0_accounted_bytes"} <= names
        assert "vm0_allocations" in names  # a counter family's name has no _total
        registry = CollectorRegistry()
        registry.register(collector)
        # Two files in one registry need distinct prefixes.
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            registry.register(MemoryFileCollector(mf, prefix="vm0"))
        registry.register(MemoryFileCollector(mf, prefix="vm1"))
        assert sample(registry, "vm1_size_bytes") == 0


async def test_after_close_only_counters_and_accounting_are_reported() -> None:
    mf = await MemoryFile.open()
    mf.allocate(MiB)
    await mf.aclose()
    families = {f.name for f in text_string_to_metric_families(render_metrics(mf).decode())}
    assert "asyncpgalloc_bytes" not in families
    assert "asyncpgalloc_allocations" in families
    assert "asyncpgalloc_accounted_bytes" in families


async def test_render_metrics_is_prometheus_text(mf: MemoryFile) -> None:
    mf.allocate(8 * 4096)
    text = render_metrics(mf, prefix="pgalloc").decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["pgalloc_allocations"].type == "counter"
    assert families["pgalloc_allocations"].samples[0].value == 1
    assert families["pgalloc_bytes"].type == "gauge"


def test_asyncpgalloc_does_not_need_prometheus_client_and_metrics_names_the_extra() -> None:
    code = """
import sys
sys.modules["prometheus_client"] = None  # as if it were not installed
import asyncpgalloc
try:
    import asyncpgalloc.metrics
except ImportError as e:
    print("ImportError:", e)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "ImportError:" in result.stdout
    assert "asyncpgalloc[metrics]" in result.stdout
