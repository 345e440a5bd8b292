"""Embedding asyncpgalloc in an asyncio server: allocate and free over HTTP, serve stats.

A small HTTP/1.1 server on ``asyncio.start_server`` streams (no framework) that owns
one ``MemoryFile`` and hands out its memory on request:

=================================================  =========================================
``POST /alloc?bytes=N[&memcg=M][&kind=K][&mode=X]``  allocate N bytes (rounded up to pages) for
                                                    memcg M (default 0), kind K (``anonymous``,
                                                    ``page_cache``, ...), mode X
                                                    (``uncommitted``, ``commit``, ``populate``);
                                                    answers ``{"start", "end", "length", ...}``
``POST /free?start=S&end=E``                        drop the reference on ``[S, E)``: any
                                                    page-aligned part of an allocation made here
``GET /stats``                                      JSON: ``stats()``, ``counters()``, accounting
                                                    by memcg and kind, host usage
``GET /metrics``                                    Prometheus text format (needs
                                                    ``asyncpgalloc[metrics]``)
=================================================  =========================================

Bad input gets 400, an unknown path 404, a wrong method 405, a full file 507. The
handlers never block the loop: allocation bookkeeping is synchronous and O(log n);
committing work for large allocations runs in the file's executor
(``allocate_async``). Only ranges this server handed out can be freed, so a client
can never drop someone else's reference.

Run: python examples/stats_server.py [--host 127.0.0.1] [--port 0]
then e.g. curl -X POST 'http://127.0.0.1:PORT/alloc?bytes=1048576&memcg=1'
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import json
import re
import signal
import sys
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from asyncpgalloc import (
    PAGE_SIZE,
    AllocationMode,
    AllocOpts,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
    MemoryKind,
    OutOfMemoryError,
)

#: The largest allocation one request may ask for (a guard for the host).
MAX_ALLOC = 1 << 30
#: Requests have no use for a body; a larger one is refused.
MAX_BODY = 64 << 10
#: A request line or header line longer than this is refused (StreamReader limit).
MAX_LINE = 8 << 10
MAX_HEADERS = 100
#: A keep-alive connection idle this long is closed.
IDLE_TIMEOUT = 30.0

MODES = {
    "uncommitted": AllocationMode.UNCOMMITTED,
    "commit": AllocationMode.COMMIT,
    "populate": AllocationMode.WRITE_POPULATE,
}
MODE_NAMES = {mode: name for name, mode in MODES.items()}
KINDS = {kind.name.lower(): kind for kind in MemoryKind}
#: How often the file refreshes its usage accounting in the background.
USAGE_REFRESH = 1.0
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    501: "Not Implemented",
    507: "Insufficient Storage",
}
_DECIMAL = re.compile(r"[0-9]{1,19}")
T = TypeVar("T")


class HTTPError(Exception):
    """An error answer: status code and message (sent as JSON ``{"error": ...}``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    keep_alive: bool


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, obj: Any, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Response:
        """A JSON response."""
        return cls(status, json.dumps(obj).encode() + b"\n", headers=headers)


class AllocatorService:
    """The server's state: the file, the ranges it handed out, the metrics registry."""

    def __init__(self, mf: MemoryFile, *, max_alloc: int = MAX_ALLOC) -> None:
        self.mf = mf
        self.max_alloc = max_alloc
        # Ranges handed out and not yet freed, sorted by start, never overlapping:
        # each holds the one reference this server took for it.
        self.starts: list[int] = []
        self.ranges: list[FileRange] = []
        self.connections: set[asyncio.Task[None]] = set()
        self._metrics: Callable[[], bytes] | None = None

    # -- HTTP plumbing ---------------------------------------------------------

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve requests on one connection until it closes (HTTP/1.1 keep-alive)."""
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            while True:
                try:
                    request = await read_request(reader)
                except HTTPError as e:
                    # We may have lost the request framing: answer, then close.
                    writer.write(encode(Response.of({"error": str(e)}, e.status), False))
                    await writer.drain()
                    return
                if request is None:
                    return
                response = await self.respond(request)
                writer.write(encode(response, request.keep_alive))
                await writer.drain()
                if not request.keep_alive:
                    return
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or idled out: nothing to answer
        finally:
            self.connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def respond(self, request: Request) -> Response:
        routes: dict[str, tuple[str, Callable[[dict[str, str]], Any]]] = {
            "/alloc": ("POST", self.alloc),
            "/free": ("POST", self.free),
            "/stats": ("GET", self.stats),
            "/metrics": ("GET", self.metrics),
        }
        route = routes.get(request.path)
        try:
            if route is None:
                raise HTTPError(404, f"no such path: {request.path}")
            method, handler = route
            if request.method != method:
                return Response.of({"error": f"use {method}"}, 405, (("Allow", method),))
            result = handler(request.query)
            if asyncio.iscoroutine(result):
                result = await result
            assert isinstance(result, Response)
            return result
        except HTTPError as e:
            return Response.of({"error": str(e)}, e.status)

    # -- the endpoints ---------------------------------------------------------

    async def alloc(self, query: dict[str, str]) -> Response:
        check_params(query, required={"bytes"}, optional={"memcg", "kind", "mode"})
        n = parse_int(query, "bytes")
        if not 0 < n <= self.max_alloc:
            raise HTTPError(400, f"bytes must be in [1, {self.max_alloc}]")
        length = -(-n // PAGE_SIZE) * PAGE_SIZE
        memcg = parse_int(query, "memcg", 0)
        kind = parse_choice(query, "kind", KINDS, MemoryKind.ANONYMOUS)
        mode = parse_choice(query, "mode", MODES, AllocationMode.UNCOMMITTED)
        try:
            # Large committing allocations do their syscalls in the file's executor.
            fr = await self.mf.allocate_async(
                length, AllocOpts(kind=kind, memcg_id=memcg, mode=mode)
            )
        except OutOfMemoryError as e:
            raise HTTPError(507, str(e)) from e
        i = bisect.bisect(self.starts, fr.start)
        self.starts.insert(i, fr.start)
        self.ranges.insert(i, fr)
        return Response.of(
            {
                "start": fr.start,
                "end": fr.end,
                "length": fr.length,
                "memcg": memcg,
                "kind": kind.name.lower(),
                "mode": MODE_NAMES[mode],
            }
        )

    def free(self, query: dict[str, str]) -> Response:
        check_params(query, required={"start", "end"})
        start, end = parse_int(query, "start"), parse_int(query, "end")
        if not start < end or (start | end) % PAGE_SIZE:
            raise HTTPError(400, f"[start, end) must be non-empty and {PAGE_SIZE}-byte aligned")
        i = bisect.bisect(self.starts, start) - 1
        if i < 0 or end > self.ranges[i].end:
            raise HTTPError(400, f"[{start}, {end}) is not part of an allocation made here")
        whole = self.ranges[i]
        # Bookkeeping first, then the reference: dec_ref is synchronous, so no
        # other request sees the range half-freed.
        rest = [r for r in (FileRange(whole.start, start), FileRange(end, whole.end)) if r.length]
        self.starts[i : i + 1] = [r.start for r in rest]
        self.ranges[i : i + 1] = rest
        self.mf.dec_ref(FileRange(start, end))
        return Response.of({"freed": end - start, "remaining": [list(r) for r in rest]})

    async def stats(self, query: dict[str, str]) -> Response:
        check_params(query)
        mf = self.mf
        # Fresh accounting: cheap when nothing changed, throttled, and a scan in
        # progress is joined rather than repeated.
        await mf.update_usage()
        acct = mf.accounting
        return Response.of(
            {
                "stats": dataclasses.asdict(mf.stats()),
                "counters": dataclasses.asdict(mf.counters()),
                "accounting": {
                    str(memcg): {kind.name.lower(): n for kind, n in acct.by_memcg(memcg).items()}
                    for memcg in acct.memcg_ids()
                },
                "host_usage_bytes": mf.total_usage(),
                "outstanding_allocations": len(self.ranges),
            }
        )

    async def metrics(self, query: dict[str, str]) -> Response:
        check_params(query)
        await self.mf.update_usage()
        if self._metrics is None:
            try:
                from prometheus_client import CollectorRegistry, generate_latest

                from asyncpgalloc.metrics import MemoryFileCollector
            except ImportError as e:
                raise HTTPError(501, str(e)) from e
            registry = CollectorRegistry()
            registry.register(MemoryFileCollector(self.mf))
            self._metrics = lambda: generate_latest(registry)
        from prometheus_client import CONTENT_TYPE_LATEST

        # On the loop thread: the collector reads the file directly, O(segments).
        return Response(200, self._metrics(), CONTENT_TYPE_LATEST)

    # -- lifecycle -------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop serving connections and give back every range still handed out."""
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)
        if not self.mf.closed:
            for fr in self.ranges:
                self.mf.dec_ref(fr)
        self.starts.clear()
        self.ranges.clear()


# ---------------------------------------------------------------- HTTP/1.1


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """Read one request (line, headers, discarded body); None at a clean EOF."""
    line = await read_line(reader)
    if not line:
        return None
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    while header := await read_line(reader):
        name, sep, value = header.partition(":")
        if not sep or len(headers) >= MAX_HEADERS:
            raise HTTPError(400, "malformed or too many headers")
        headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise HTTPError(501, "request bodies with Transfer-Encoding are not supported")
    length_text = headers.get("content-length", "0")
    if not _DECIMAL.fullmatch(length_text):
        raise HTTPError(400, "bad Content-Length")
    if int(length_text) > MAX_BODY:
        raise HTTPError(413, f"request bodies are limited to {MAX_BODY} bytes")
    await reader.readexactly(int(length_text))  # no endpoint takes a body
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
    url = urlsplit(target)
    pairs = parse_qsl(url.query, keep_blank_values=True)
    query = dict(pairs)
    if len(query) != len(pairs):
        raise HTTPError(400, "a query parameter is repeated")
    return Request(method, url.path, query, keep_alive)


async def read_line(reader: asyncio.StreamReader) -> str:
    """One CRLF-terminated line without its end ('' at EOF)."""
    try:
        raw = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
    except ValueError as e:  # longer than the reader's limit
        raise HTTPError(400, "line too long") from e
    if raw and not raw.endswith(b"\n"):
        raise asyncio.IncompleteReadError(raw, None)  # EOF mid-line: the client hung up
    try:
        return raw.decode("ascii").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise HTTPError(400, "non-ASCII request head") from e


def encode(response: Response, keep_alive: bool) -> bytes:
    head = [
        f"HTTP/1.1 {response.status} {REASONS.get(response.status, '')}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + response.body


def check_params(
    query: dict[str, str],
    required: AbstractSet[str] = frozenset(),
    optional: AbstractSet[str] = frozenset(),
) -> None:
    """Refuse requests with missing or unknown parameters (typos fail loudly)."""
    missing = required - query.keys()
    unknown = query.keys() - required - optional
    if missing or unknown:
        raise HTTPError(
            400, f"missing parameters {sorted(missing)}, unknown parameters {sorted(unknown)}"
        )


def parse_int(query: dict[str, str], name: str, default: int | None = None) -> int:
    text = query.get(name)
    if text is None and default is not None:
        return default
    if text is None or not _DECIMAL.fullmatch(text):
        raise HTTPError(400, f"{name} must be a non-negative decimal integer")
    return int(text)


def parse_choice(query: dict[str, str], name: str, choices: dict[str, T], default: T) -> T:
    text = query.get(name)
    if text is None:
        return default
    if text not in choices:
        raise HTTPError(400, f"{name} must be one of {sorted(choices)}")
    return choices[text]


# ------------------------------------------------------------------ running


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    mf: MemoryFile | None = None,
    ready: asyncio.Future[int] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (or the task is cancelled), then clean up.

    ``mf``: the file to serve (default: a new memfd-backed one, closed at the end).
    ``ready`` receives the bound port once the server listens (``port=0`` picks a
    free one). Every range still handed out is given back at the end.
    """
    async with contextlib.AsyncExitStack() as stack:
        if mf is None:
            opts = MemoryFileOpts(usage_refresh_interval=USAGE_REFRESH)
            mf = await stack.enter_async_context(MemoryFile.open(opts=opts))
        service = AllocatorService(mf)
        stack.push_async_callback(service.aclose)
        server = await asyncio.start_server(service.handle_connection, host, port, limit=MAX_LINE)
        stack.push_async_callback(server.wait_closed)
        stack.callback(server.close)
        bound = server.sockets[0].getsockname()[1]
        if ready is not None:
            ready.set_result(bound)
        await (stop or asyncio.Event()).wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    args = p.parse_args(argv)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        ready: asyncio.Future[int] = loop.create_future()
        server = asyncio.create_task(serve(args.host, args.port, ready=ready, stop=stop))
        # If serving fails before it listens (say, the port is taken), that error wins.
        waiters: list[asyncio.Future[Any]] = [ready, server]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            print(f"serving on http://{args.host}:{ready.result()}  (Ctrl-C stops)", flush=True)
        await server
        print("stopped; every range handed out was given back", flush=True)

    try:
        import uvloop
    except ImportError:
        asyncio.run(run())
    else:
        uvloop.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
