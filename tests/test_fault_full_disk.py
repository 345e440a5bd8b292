"""A full backing file system: every path that writes the memory file's pages must fail
with ``OSError(ENOSPC)`` (or not fail at all), never SIGBUS (issue 18 item 3).

A disk-backed file lives on a small tmpfs mounted by the test. A store through a
mapping into a page whose block the file system cannot allocate is a SIGBUS, which
would kill pytest: each scenario runs in a subprocess, and the test checks how it ended
(a SIGBUS shows as exit status -7).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import small_tmpfs

ROOT = Path(__file__).resolve().parent.parent

_BODY = textwrap.dedent(
    """
    import asyncio, errno, os, sys
    import aiofiles
    from asyncpgalloc import (
        AccessType, AllocOpts, AllocationMode, FileRange, MemoryFile, MemoryFileOpts, host,
    )

    MiB = 1 << 20
    DIR, SCRATCH, SCENARIO = sys.argv[1], sys.argv[2], sys.argv[3]
    OPTS = MemoryFileOpts(disk_backed_file=True)
    COMMIT = AllocOpts(mode=AllocationMode.COMMIT)

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def enospc(e: BaseException) -> None:
        assert isinstance(e, OSError) and e.errno == errno.ENOSPC, repr(e)
        print("raised ENOSPC", flush=True)

    async def held_file(mf: MemoryFile) -> FileRange:
        held = mf.allocate(2 * MiB, COMMIT)
        for v in mf.map_internal(held, AccessType.WRITE):
            v[:] = b"\\x5a" * len(v)
        return held

    async def still_works(mf: MemoryFile, held: FileRange) -> None:
        mf.check_invariants()
        await mf.wait_released()
        mf.check_invariants()
        fr = mf.allocate(MiB, COMMIT)
        assert all(v.tobytes().count(0) == len(v) for v in mf.map_internal(fr))
        assert all(v.tobytes() == b"\\x5a" * len(v) for v in mf.map_internal(held))

    async def load(how: str) -> None:
        ckpt = os.path.join(SCRATCH, "ckpt")
        async with MemoryFile.open() as src:
            fr = src.allocate(16 * MiB, COMMIT)
            for v in src.map_internal(fr, AccessType.WRITE):
                v[:] = b"\\x33" * len(v)
            await src.save(ckpt)
        before = fds()
        try:
            if how == "path":
                await MemoryFile.load(ckpt, OPTS, file=os.path.join(DIR, "mem"))
            else:
                async with aiofiles.open(ckpt, "rb") as f:
                    await MemoryFile.load(f, OPTS, file=os.path.join(DIR, "mem"))
        except Exception as e:
            enospc(e)
        else:
            raise AssertionError("loaded 16 MiB into an 8 MiB file system")
        assert fds() == before, "load leaked an fd"
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not pending, pending

    async def fill(how: str) -> None:
        async with MemoryFile.open(os.path.join(DIR, "mem"), OPTS) as mf:
            held = await held_file(mf)
            before = mf.stats()

            async def read(n: int) -> bytes:
                return b"\\x77" * n

            data = os.path.join(SCRATCH, "data")
            with open(data, "wb") as f:
                f.write(b"\\x77" * (16 * MiB))
            try:
                if how == "callable":
                    await mf.allocate_from(read, 16 * MiB)
                else:
                    async with aiofiles.open(data, "rb") as src:
                        await mf.allocate_from(src, 16 * MiB)
            except Exception as e:
                enospc(e)
            else:
                raise AssertionError("filled 16 MiB on an 8 MiB file system")
            assert mf.stats().used_bytes == before.used_bytes, mf.stats()
            await still_works(mf, held)
            # A fill that fits still works, and lands.
            fr = await mf.allocate_from(read, MiB)
            assert all(v.tobytes() == b"\\x77" * len(v) for v in mf.map_internal(fr))

    async def zero_fallback() -> None:
        # The host refuses to punch (injected: tmpfs always punches), so released pages
        # are zeroed by hand, while the file system is full.
        def refuse(fd: int, offset: int, length: int) -> None:
            raise OSError(errno.EOPNOTSUPP, "punching refused (injected)")

        host.decommit = refuse
        async with MemoryFile.open(os.path.join(DIR, "mem"), OPTS) as mf:
            data = await held_file(mf)      # backed pages holding data
            holes = mf.allocate(16 * MiB)   # never backed
            with open(os.path.join(DIR, "filler"), "wb") as f:
                try:
                    f.write(b"x" * (8 * MiB))
                except OSError:
                    pass
            mf.dec_ref(data)
            mf.dec_ref(holes)
            await mf.wait_released()
            mf.check_invariants()
            for fr in (data, holes):
                got = os.pread(mf.fd, fr.length, fr.start)
                assert got.count(0) == len(got), "released pages do not read zero"
            fr = mf.allocate(2 * MiB)
            assert fr.start == data.start
            assert all(v.tobytes().count(0) == len(v) for v in mf.map_internal(fr))
            print("zeroed", flush=True)

    async def main() -> None:
        if SCENARIO.startswith("load_"):
            await load(SCENARIO[5:])
        elif SCENARIO.startswith("fill_"):
            await fill(SCENARIO[5:])
        else:
            await zero_fallback()
        print("ok", flush=True)

    asyncio.run(main())
    """
)

EXPECTED = {
    "load_path": ["raised ENOSPC", "ok"],
    "load_aiofiles": ["raised ENOSPC", "ok"],
    "fill_callable": ["raised ENOSPC", "ok"],
    "fill_aiofiles": ["raised ENOSPC", "ok"],
    "zero_fallback": ["zeroed", "ok"],
}


@pytest.mark.parametrize("scenario", sorted(EXPECTED))
def test_a_full_file_system_is_an_error_not_a_sigbus(scenario: str, tmp_path: Path) -> None:
    with small_tmpfs() as d:
        r = subprocess.run(
            [sys.executable, "-c", _BODY, str(d), str(tmp_path), scenario],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
    assert r.returncode == 0, f"{scenario}: rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    assert r.stdout.splitlines() == EXPECTED[scenario], r.stdout + r.stderr
