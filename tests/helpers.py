"""Test helpers: executors that gate or record the file's blocking work, and state snapshots."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib.util
import os
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest

from asyncpgalloc import AccessType, FileRange, MemoryFile
from asyncpgalloc.blocking import run_signalling
from asyncpgalloc.checkpoint_format import (
    HEADER_SIZE,
    TRAILER_SIZE,
    Header,
    block_seed,
    crc,
    pack_trailer,
)
from asyncpgalloc.releaser import ReleasePlan

T = TypeVar("T")


def job_of(
    fn: Callable[..., Any], args: tuple[Any, ...]
) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The file's own job in an executor submission: BlockingRunner submits
    ``run_signalling(done, job, *job_args)``."""
    return (args[1], args[2:]) if fn is run_signalling else (fn, args)


class RecordingExecutor(concurrent.futures.ThreadPoolExecutor):
    """A one-thread executor that records each job and can hold jobs at a gate.

    While ``gate`` is clear, every submitted job waits (in its thread) until it is
    set, so a test can look at the file while a punch or commit is in flight.
    """

    def __init__(self) -> None:
        super().__init__(max_workers=1, thread_name_prefix="test-executor")
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        job, job_args = job_of(fn, args)
        self.calls.append((getattr(job, "__name__", repr(job)), job_args))

        def gated() -> T:
            self.started.set()
            self.gate.wait()
            return fn(*args, **kwargs)

        return super().submit(gated)

    def __exit__(self, *exc: object) -> None:
        # Open the gate first: a held job would otherwise block shutdown forever.
        self.gate.set()
        self.shutdown()

    def released_ranges(self) -> list[FileRange]:
        """Every range the releaser punched, in order."""
        return [plan.decommit for step in self.release_steps() for plan in step]

    def release_steps(self) -> list[list[ReleasePlan]]:
        """The plans each release step punched (a step may stop before its last plans)."""
        return [args[1][: args[2][0]] for name, args in self.calls if name == "punch_all"]


def load_example(name: str) -> ModuleType:
    """Import examples/<name>.py as a module (examples are scripts, not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def snapshot(mf: MemoryFile) -> tuple[str, object, int]:
    """Everything a failed call must leave unchanged."""
    return (mf.dump_segments(), mf.stats(), mf.total_size())


def fill(mf: MemoryFile, fr: FileRange, byte: int) -> None:
    for view in mf.map_internal(fr, AccessType.WRITE):
        view[:] = bytes([byte]) * len(view)


def is_zero(mf: MemoryFile, fr: FileRange) -> bool:
    return all(view.tobytes().count(0) == len(view) for view in mf.map_internal(fr))


def checkpoint_parts(raw: bytes) -> tuple[Header, bytes, bytes]:
    """A checkpoint's header, metadata bytes and concatenated page data (CRCs dropped)."""
    header = Header.unpack(raw[:HEADER_SIZE])
    data = bytearray()
    pos = header.data_offset
    left = header.data_length
    while left:
        n = min(left, header.block_size)
        data += raw[pos : pos + n]
        pos += n + 4
        left -= n
    return header, raw[HEADER_SIZE : header.data_offset], bytes(data)


def checkpoint_bytes(header: Header, metadata: bytes, data: bytes, **fields: Any) -> bytes:
    """A checkpoint made of these parts with every checksum valid: the metadata length and
    CRC (unless ``fields`` forges them), the header CRC, each block's CRC, the trailer."""
    fields = {"metadata_length": len(metadata), "metadata_crc": crc(metadata), **fields}
    h = dataclasses.replace(header, crc=0, **fields)
    h = dataclasses.replace(h, crc=crc(h.pack()[: HEADER_SIZE - 4]))
    out = bytearray(h.pack() + metadata)
    step = max(h.block_size, 1)
    for i in range(0, len(data), step):
        block = data[i : i + step]
        out += block + struct.pack("<I", crc(block, block_seed(h.crc, i // step)))
    # A forged block size of 0 has no trailer (the loader refuses it before one).
    return bytes(out + (pack_trailer(h) if h.block_size else bytes(TRAILER_SIZE)))


def reads_zero(mf: MemoryFile, fr: FileRange) -> bool:
    """Whether ``fr`` reads as zeros in the file, held or not (``pread``: no view of free
    pages is handed out, and reading a hole this way commits nothing)."""
    data = os.pread(mf.fd, fr.length, fr.start)
    return len(data) == fr.length and data.count(0) == fr.length


@contextlib.contextmanager
def small_tmpfs(size: str = "8m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted for the test, always unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = Path(tempfile.mkdtemp(prefix="asyncpgalloc-enospc-"))
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
        try:
            yield d
        finally:
            subprocess.run(["umount", "-l", str(d)], check=False)
    finally:
        with contextlib.suppress(OSError):
            d.rmdir()


def max_examples(n: int) -> int:
    """``n`` hypothesis examples, or fewer where ``ASYNCPGALLOC_MAX_EXAMPLES`` caps them (the
    valgrind job, ``.ci/valgrind``, runs ~50x slower)."""
    cap = os.environ.get("ASYNCPGALLOC_MAX_EXAMPLES")
    return min(n, int(cap)) if cap else n
