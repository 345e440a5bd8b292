"""Prometheus metrics for a MemoryFile: a ``prometheus_client`` custom collector.

Needs the optional extra ``asyncpgalloc[metrics]`` (``prometheus_client``)::

    from prometheus_client import CollectorRegistry, generate_latest
    from asyncpgalloc.metrics import MemoryFileCollector

    registry = CollectorRegistry()
    registry.register(MemoryFileCollector(mf))
    body = generate_latest(registry)          # or render_metrics(mf)

Every scrape takes one consistent snapshot of ``mf.stats()``, ``mf.counters()``
and ``mf.accounting`` in a single synchronous step on the file's loop: a scrape
from the loop's own thread (an asyncio server) reads directly; a scrape from
another thread (``prometheus_client.start_http_server``, a WSGI app) hands the
read to the loop with ``call_soon_threadsafe`` and waits for it, because a
MemoryFile may only be touched from its loop's thread.

Names (with the default prefix ``asyncpgalloc``):

=========================================  =======  ========================================
metric                                     type     source
=========================================  =======  ========================================
``asyncpgalloc_bytes{state}``              gauge    ``stats()``: used, waste, releasing,
                                                    free, subreleased
``asyncpgalloc_committed_bytes``           gauge    ``stats().known_committed_bytes``
``asyncpgalloc_size_bytes``                gauge    ``stats().total_size``
``asyncpgalloc_host_usage_bytes``          gauge    ``total_usage()`` (one ``fstat``)
``asyncpgalloc_chunks{page_size}``         gauge    ``stats()``: huge, small chunks
``asyncpgalloc_accounted_bytes{kind,       gauge    ``accounting``: bytes by memory kind
memcg}``                                            (``anonymous``, ``page_cache``, ...)
                                                    and memcg id
``asyncpgalloc_allocations_total``         counter  ``counters().allocations``
``asyncpgalloc_allocated_bytes_total``     counter  ``counters().allocated_bytes``
``asyncpgalloc_release_steps_total``       counter  ``counters().release_steps``
``asyncpgalloc_released_bytes_total``      counter  ``counters().released_bytes``
``asyncpgalloc_evictions_started_total``   counter  ``counters().evictions_started``
``asyncpgalloc_evict_calls_total``         counter  ``counters().evict_calls``
``asyncpgalloc_evict_failures_total``      counter  ``counters().evict_failures``
``asyncpgalloc_pressure_events_total``     counter  ``counters().pressure_events``
``asyncpgalloc_usage_scans_total``         counter  ``counters().usage_scans``
``asyncpgalloc_load_bytes{state}``         gauge    ``stats()`` of an async page load:
                                                    total, loaded, dropped, pending
``asyncpgalloc_load_waiters``              gauge    ``stats().load_waiters``
``asyncpgalloc_load_waited_bytes_total``   counter  ``stats().load_waited_bytes``
``asyncpgalloc_working_set_entries``       gauge    ``stats().working_set_entries``
``asyncpgalloc_working_set_faults_total    counter  ``stats()``: working_set_hits,
{result}``                                          working_set_misses (hit, miss)
``asyncpgalloc_working_set_hit_ratio``     gauge    ``stats().working_set_hit_rate``
=========================================  =======  ========================================

Once the file is closed only the counters and the accounting are reported (the
page-state gauges describe a file that no longer exists). A registry refuses two
collectors with the same names: give each file its own ``prefix`` (or registry).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

try:
    from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE_LATEST
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "asyncpgalloc.metrics needs prometheus_client: "
        "pip install 'asyncpgalloc[metrics]' (or 'prometheus_client>=0.20')"
    ) from e

from .accounting import MemoryKind
from .stats import MemoryFileCounters, MemoryFileStats

if TYPE_CHECKING:
    from .memory_file import MemoryFile

__all__ = ["CONTENT_TYPE_LATEST", "MemoryFileCollector", "render_metrics"]

#: The page states of ``asyncpgalloc_bytes{state=...}``, each a MemoryFileStats field.
PAGE_STATES = ("used", "waste", "releasing", "free", "subreleased")

#: Counter name (without prefix and ``_total``) -> (MemoryFileCounters field, help text).
_COUNTERS: dict[str, tuple[str, str]] = {
    "allocations": ("allocations", "Allocations made (allocate, allocate_async, allocate_from)."),
    "allocated_bytes": ("allocated_bytes", "Bytes allocated."),
    "release_steps": ("release_steps", "Releaser steps (one executor hop each)."),
    "released_bytes": ("released_bytes", "Waste bytes the releaser gave back to the host."),
    "evictions_started": ("evictions_started", "Eviction tasks started (one per user)."),
    "evict_calls": ("evict_calls", "evict() calls made on evictable users."),
    "evict_failures": ("evict_failures", "evict() calls that raised."),
    "pressure_events": ("pressure_events", "Memory-cgroup pressure notifications received."),
    "usage_scans": ("usage_scans", "update_usage scans run."),
}


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """Everything one scrape reports, read in one synchronous step on the loop."""

    stats: MemoryFileStats | None  # None once the file is closed
    host_usage: int | None
    counters: MemoryFileCounters
    accounting: dict[int, dict[MemoryKind, int]]


def _snapshot(mf: MemoryFile) -> _Snapshot:
    """Read the file's figures; must run on the file's loop thread."""
    acct = mf.accounting
    accounting = {memcg: acct.by_memcg(memcg) for memcg in acct.memcg_ids()}
    if mf.closed:
        return _Snapshot(None, None, mf.counters(), accounting)
    return _Snapshot(mf.stats(), mf.total_usage(), mf.counters(), accounting)


class MemoryFileCollector:
    """A ``prometheus_client`` collector of one :class:`~asyncpgalloc.MemoryFile`'s figures.

    Register it in a ``CollectorRegistry``; each ``collect()`` (each scrape) takes a
    fresh snapshot, O(memcgs x kinds) on the loop plus one ``fstat``
    (``mf.stats()`` is O(1)). ``collect()`` may be called from any thread: off the loop's
    thread it waits up to ``timeout`` seconds for the loop to take the snapshot and
    raises ``TimeoutError`` if the loop does not answer (it is blocked or stopped).
    """

    def __init__(
        self, mf: MemoryFile, prefix: str = "asyncpgalloc", *, timeout: float = 1.0
    ) -> None:
        self._mf = mf
        self._prefix = prefix
        self._timeout = timeout

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples: lets a registry check names at register
        time without taking a snapshot (which may be on another thread)."""
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        """The metric families with their current values."""
        return self._families(self._take_snapshot())

    def _take_snapshot(self) -> _Snapshot:
        mf = self._mf
        if mf.in_loop_thread():
            return _snapshot(mf)
        # Another thread: a MemoryFile is only touched from its loop's thread.
        loop = mf.loop
        result: concurrent.futures.Future[_Snapshot] = concurrent.futures.Future()

        def take() -> None:
            try:
                result.set_result(_snapshot(mf))
            except BaseException as e:
                result.set_exception(e)

        try:
            loop.call_soon_threadsafe(take)
        except RuntimeError as e:  # the loop is closed
            raise RuntimeError("the MemoryFile's event loop is closed: nothing to scrape") from e
        try:
            return result.result(timeout=self._timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(
                f"the MemoryFile's event loop did not answer a metrics scrape in {self._timeout} s"
            ) from None

    def _families(self, snap: _Snapshot | None) -> Iterator[Metric]:
        """Build every family; without a snapshot, empty ones (for ``describe``)."""
        p = self._prefix
        stats = None if snap is None else snap.stats
        if snap is None or stats is not None:
            by_state = GaugeMetricFamily(
                f"{p}_bytes", "Bytes of the file by page state.", labels=["state"]
            )
            committed = GaugeMetricFamily(
                f"{p}_committed_bytes", "Bytes known to be committed (known_committed_bytes)."
            )
            size = GaugeMetricFamily(f"{p}_size_bytes", "Size of the file (whole 1 GiB chunks).")
            host_usage = GaugeMetricFamily(
                f"{p}_host_usage_bytes", "Bytes the host stores for the file (fstat st_blocks)."
            )
            chunks = GaugeMetricFamily(
                f"{p}_chunks", "Chunks of the file by page size.", labels=["page_size"]
            )
            load = GaugeMetricFamily(
                f"{p}_load_bytes",
                "Page bytes of an async page load by state (all 0 without one).",
                labels=["state"],
            )
            waiters = GaugeMetricFamily(f"{p}_load_waiters", "wait_loaded() calls waiting now.")
            waited = CounterMetricFamily(
                f"{p}_load_waited_bytes", "Pending page bytes that wait_loaded() calls asked for."
            )
            ws_entries = GaugeMetricFamily(
                f"{p}_working_set_entries",
                "Ranges (1 MiB) in the working-set order a save writes now.",
            )
            ws_faults = CounterMetricFamily(
                f"{p}_working_set_faults",
                "Guest faults on blocks already prefetched or loaded (hit) or still queued (miss).",
                labels=["result"],
            )
            ws_ratio = GaugeMetricFamily(
                f"{p}_working_set_hit_ratio", "Working-set hits / (hits + misses); 0 before any."
            )
            if stats is not None:
                for state in PAGE_STATES:
                    by_state.add_metric([state], getattr(stats, f"{state}_bytes"))
                committed.add_metric([], stats.known_committed_bytes)
                size.add_metric([], stats.total_size)
                chunks.add_metric(["huge"], stats.huge_chunks)
                chunks.add_metric(["small"], stats.small_chunks)
                for state, value in (
                    ("total", stats.load_total_bytes),
                    ("loaded", stats.loaded_bytes),
                    ("dropped", stats.load_dropped_bytes),
                    ("pending", stats.load_pending_bytes),
                ):
                    load.add_metric([state], value)
                waiters.add_metric([], stats.load_waiters)
                waited.add_metric([], stats.load_waited_bytes)
                ws_entries.add_metric([], stats.working_set_entries)
                ws_faults.add_metric(["hit"], stats.working_set_hits)
                ws_faults.add_metric(["miss"], stats.working_set_misses)
                ws_ratio.add_metric([], stats.working_set_hit_rate)
            if snap is not None and snap.host_usage is not None:
                host_usage.add_metric([], snap.host_usage)
            yield from (by_state, committed, size, host_usage, chunks, load, waiters, waited)
            yield from (ws_entries, ws_faults, ws_ratio)

        accounted = GaugeMetricFamily(
            f"{p}_accounted_bytes",
            "Committed bytes accounted by memory kind and memcg id.",
            labels=["kind", "memcg"],
        )
        if snap is not None:
            for memcg, kinds in sorted(snap.accounting.items()):
                for kind, n in sorted(kinds.items()):
                    accounted.add_metric([kind.name.lower(), str(memcg)], n)
        yield accounted

        for name, (field, help_text) in _COUNTERS.items():
            counter = CounterMetricFamily(f"{p}_{name}", help_text)
            if snap is not None:
                counter.add_metric([], getattr(snap.counters, field))
            yield counter


def render_metrics(mf: MemoryFile, prefix: str = "asyncpgalloc") -> bytes:
    """The Prometheus text exposition of ``mf``'s metrics (serve with ``CONTENT_TYPE_LATEST``).

    A fresh registry with one :class:`MemoryFileCollector` each call: convenient for
    a hand-written ``/metrics`` handler. Call it from the file's loop thread.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MemoryFileCollector(mf, prefix))
    return generate_latest(registry)
