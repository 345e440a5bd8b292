"""examples/stats_server.py: a real HTTP client against the server on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import load_example
from prometheus_client.parser import text_string_to_metric_families

from asyncpgalloc import PAGE_SIZE, MemoryFile, MemoryFileOpts

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"  # loopback only
MiB = 1 << 20


stats_server = load_example("stats_server")


class Client:
    """http.client in a worker thread: a real, independent HTTP/1.1 client."""

    def __init__(self, port: int) -> None:
        self.port = port

    def _request(self, method: str, target: str) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        try:
            conn.request(method, target)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    async def request(self, method: str, target: str) -> tuple[int, dict[str, str], bytes]:
        return await asyncio.to_thread(self._request, method, target)

    async def json(self, method: str, target: str, status: int = 200) -> Any:
        got, headers, body = await self.request(method, target)
        assert got == status, body
        assert headers["Content-Type"] == "application/json"
        return json.loads(body)


@contextlib.asynccontextmanager
async def running(mf: MemoryFile) -> AsyncIterator[Client]:
    """The server as a task of this loop, on an ephemeral loopback port."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[int] = loop.create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(stats_server.serve(HOST, 0, mf=mf, ready=ready, stop=stop))
    try:
        yield Client(await asyncio.wait_for(ready, 10))
    finally:
        stop.set()
        await task


async def test_alloc_free_and_stats(mf: MemoryFile) -> None:
    async with running(mf) as client:
        a = await client.json("POST", "/alloc?bytes=1048576&memcg=7&mode=populate")
        assert a["length"] == MiB and a["end"] - a["start"] == MiB
        assert (a["memcg"], a["kind"], a["mode"]) == (7, "anonymous", "populate")
        # Rounded up to whole pages.
        b = await client.json("POST", "/alloc?bytes=5000&kind=page_cache&memcg=8")
        assert b["length"] == 2 * PAGE_SIZE
        assert mf.stats().used_bytes == MiB + 2 * PAGE_SIZE

        stats = await client.json("GET", "/stats")
        assert stats["stats"] == {
            k: getattr(mf.stats(), k) for k in stats["stats"]
        }  # the same snapshot fields
        assert stats["counters"]["allocations"] == 2
        assert stats["outstanding_allocations"] == 2
        # /stats refreshes usage first: the populated pages are accounted.
        assert stats["accounting"]["7"] == {"anonymous": MiB}

        # Free one page out of the middle: references are per page.
        mid = a["start"] + 4 * PAGE_SIZE
        freed = await client.json("POST", f"/free?start={mid}&end={mid + PAGE_SIZE}")
        assert freed["freed"] == PAGE_SIZE
        assert freed["remaining"] == [[a["start"], mid], [mid + PAGE_SIZE, a["end"]]]
        await client.json("POST", f"/free?start={b['start']}&end={b['end']}")
        await mf.wait_released()
        assert mf.stats().used_bytes == MiB - PAGE_SIZE
        # The freed page is no longer this server's to free.
        err = await client.json("POST", f"/free?start={mid}&end={mid + PAGE_SIZE}", 400)
        assert "not part of an allocation" in err["error"]
    # Stopping the server gave back what was still handed out.
    await mf.wait_released()
    assert mf.stats().used_bytes == 0


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("POST", "/alloc", 400),  # bytes missing
        ("POST", "/alloc?bytes=abc", 400),
        ("POST", "/alloc?bytes=-4096", 400),
        ("POST", "/alloc?bytes=0", 400),
        ("POST", f"/alloc?bytes={(1 << 30) + 1}", 400),  # over the per-request cap
        ("POST", "/alloc?bytes=4096&memcg=x", 400),
        ("POST", "/alloc?bytes=4096&kind=heap", 400),
        ("POST", "/alloc?bytes=4096&mode=fast", 400),
        ("POST", "/alloc?bytes=4096&colour=blue", 400),  # unknown parameter
        ("POST", "/alloc?bytes=4096&bytes=8192", 400),  # repeated parameter
        ("POST", "/free?start=0", 400),
        ("POST", "/free?start=0&end=100", 400),  # unaligned
        ("POST", "/free?start=8192&end=4096", 400),  # empty
        ("POST", "/free?start=0&end=4096", 400),  # never allocated here
        ("GET", "/stats?verbose=1", 400),
        ("GET", "/alloc?bytes=4096", 405),
        ("POST", "/stats", 405),
        ("GET", "/", 404),
        ("GET", "/metrics/extra", 404),
    ],
)
async def test_bad_requests_change_nothing(
    mf: MemoryFile, method: str, target: str, status: int
) -> None:
    async with running(mf) as client:
        got, headers, body = await client.request(method, target)
        assert got == status, body
        assert "error" in json.loads(body)
        if status == 405:
            assert headers["Allow"] in ("GET", "POST")
        assert mf.counters().allocations == 0
        assert mf.stats().used_bytes == 0


async def test_out_of_memory_is_507() -> None:
    async with MemoryFile.open(opts=MemoryFileOpts(max_chunks=1)) as mf, running(mf) as client:
        await client.json("POST", f"/alloc?bytes={1 << 30}")
        err = await client.json("POST", "/alloc?bytes=4096", 507)
        assert "cannot grow" in err["error"]


async def test_metrics_endpoint_is_prometheus_text(mf: MemoryFile) -> None:
    async with running(mf) as client:
        await client.json("POST", "/alloc?bytes=65536&memcg=3&mode=populate")
        status, headers, body = await client.request("GET", "/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        used = {s.labels["state"]: s.value for s in families["asyncpgalloc_bytes"].samples}
        assert used["used"] == 65536 == mf.stats().used_bytes
        assert families["asyncpgalloc_allocations"].samples[0].value == 1
        accounted = families["asyncpgalloc_accounted_bytes"].samples
        assert [(s.labels, s.value) for s in accounted] == [
            ({"kind": "anonymous", "memcg": "3"}, 65536)
        ]


async def raw_exchange(port: int, data: bytes, hang_up: bool = False) -> bytes:
    """Send raw bytes (then half-close if ``hang_up``), read until the server closes."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        await writer.drain()
        if hang_up:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_keep_alive_serves_several_requests_on_one_connection(mf: MemoryFile) -> None:
    async with running(mf) as client:
        requests = (
            b"POST /alloc?bytes=4096 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        answer = await raw_exchange(client.port, requests)
        assert answer.count(b"HTTP/1.1 200 OK\r\n") == 3
        assert answer.count(b"Connection: keep-alive\r\n") == 2
        assert answer.count(b"Connection: close\r\n") == 1


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"NONSENSE\r\n\r\n", b"400"),
        (b"GET /stats HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
        (b"GET /stats HTTP/1.1\r\nContent-Length: lots\r\n\r\n", b"400"),
        (b"POST /alloc?bytes=1 HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n", b"413"),
        (b"POST /alloc?bytes=1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"501"),
        (b"GET /" + b"x" * 20000 + b" HTTP/1.1\r\n\r\n", b"400"),
    ],
)
async def test_malformed_requests_are_answered_and_closed(
    mf: MemoryFile, data: bytes, status: bytes
) -> None:
    async with running(mf) as client:
        answer = await raw_exchange(client.port, data)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:100]
        assert b"Connection: close\r\n" in answer
        assert mf.counters().allocations == 0


async def test_a_client_that_hangs_up_mid_request_is_harmless(mf: MemoryFile) -> None:
    async with running(mf) as client:
        partial = b"POST /alloc?bytes=4096 HTTP/1.1\r\nHo"
        assert await raw_exchange(client.port, partial, hang_up=True) == b""
        assert mf.counters().allocations == 0
        await client.json("GET", "/stats")  # still serving


def test_script_prints_its_port_serves_and_stops_cleanly_on_sigint() -> None:
    proc = subprocess.Popen(
        [sys.executable, "examples/stats_server.py", "--host", HOST, "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(f"serving on http://{HOST}:"), line
        port = int(line.split(":")[2].split()[0])
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        conn.request("POST", "/alloc?bytes=8192&memcg=1")
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["length"] == 8192
        conn.close()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "every range handed out was given back" in out
