"""Inspecting a checkpoint without loading it: ``python -m asyncpgalloc inspect``.

Reads the header, the metadata and (unless told not to) every data block, checking
each CRC, and prints a summary; nothing is mapped or created. **Blocking**: meant for
the command line, not for an event loop.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

from .accounting import MemoryKind
from .checkpoint_format import (
    FLAG_PAGES_FILE,
    FLAG_WORKING_SET,
    FLAG_ZERO_PAGES_EXCLUDED,
    HEADER_SIZE,
    PAGES_REF_SIZE,
    TRAILER_SIZE,
    WORKING_SET_GRANULE,
    WORKING_SET_VERSION,
    Header,
    PagesRef,
    block_seed,
    committed_extents,
    crc,
    decode_metadata,
    unpack_crc,
    unpack_trailer,
)
from .checkpoint_state import build_state
from .errors import CheckpointError
from .pages_file import check_segment, read_identity
from .ranges import PAGE_SIZE

__all__ = ["describe_checkpoint", "inspect_main"]


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.2f} {unit}"
    return f"{n} B"


def _verify_blocks(f: io.BufferedReader, header: Header, offset: int) -> int:
    """Check the CRC of every data block present in ``f`` from ``offset`` on: the number
    checked (fewer than ``header.blocks`` if ``f`` ends early). Raises
    :class:`CheckpointError` at the first mismatch. Blocking; reads the data once,
    sequentially, one block (1 MiB) at a time."""
    f.seek(offset)
    buf = bytearray(header.block_size + 4)
    checked = 0
    for index in range(header.blocks):
        n = min(header.block_size, header.data_length - index * header.block_size)
        view = memoryview(buf)[: n + 4]
        if f.readinto(view) != n + 4:
            return checked  # truncated: the rest is missing
        if crc(view[:n], block_seed(header.crc, index)) != unpack_crc(view[n:]):
            raise CheckpointError(f"checkpoint data block {index} checksum mismatch")
        checked += 1
    return checked


def _verify_data(f: io.BufferedReader, header: Header, on_disk: int) -> tuple[int, bool]:
    """Check every data block present in ``f`` and, if the file is whole, its trailer:
    returns (blocks checked, trailer checked). Blocking, as :func:`_verify_blocks`."""
    checked = _verify_blocks(f, header, header.data_offset)
    if checked < header.blocks or on_disk != header.total_length:
        return checked, False
    unpack_trailer(header, f.read(TRAILER_SIZE))
    return checked, True


def _verify_pages_file(
    f: io.BufferedReader, header: Header, on_disk: int, pages_path: str, verify_data: bool
) -> str:
    """Check a checkpoint's pages reference and trailer in ``f``, then its segment in the
    pages file ``pages_path`` (and with ``verify_data`` every block's CRC there): the
    data check's summary. Raises :class:`CheckpointError`; blocking."""
    f.seek(header.data_offset)
    ref = PagesRef.unpack(header, f.read(PAGES_REF_SIZE))
    if on_disk != header.total_length:
        raise CheckpointError(
            f"checkpoint is {on_disk} bytes, its header says {header.total_length}"
        )
    unpack_trailer(header, f.read(TRAILER_SIZE))
    with open(pages_path, "rb") as pf:
        start = check_segment(pf.fileno(), read_identity(pf.fileno()), header, ref)
        where = f"pages file {pages_path} at offset {ref.offset:#x}"
        if not verify_data:
            return f"in {where}, checksums not read"
        _verify_blocks(pf, header, start)  # check_segment saw every block there
    return f"in {where}, checksums OK"


def _working_set(order: tuple[int, ...]) -> str:
    """The working-set order line: its size, version and first entries."""
    if not order:
        return "none (the loader reads in file order)"
    head = ", ".join(f"{o:#x}" for o in order[:4]) + (", ..." if len(order) > 4 else "")
    return (
        f"{len(order)} ranges of {_size(WORKING_SET_GRANULE)} read first "
        f"({_size(len(order) * WORKING_SET_GRANULE)}; section version {WORKING_SET_VERSION}, "
        f"checksum OK): {head}"
    )


def describe_checkpoint(
    path: str, *, verify_data: bool = True, pages_file: str | None = None
) -> str:
    """A human-readable summary of the checkpoint at ``path``: header and metadata.

    Synchronous and blocking: reads the header and the metadata and checks their
    CRCs and consistency, O(metadata); with ``verify_data`` (the default) it then
    reads the page data too and checks every block's CRC and the trailer, O(data):
    about the speed of a sequential read of the file. Raises
    :class:`CheckpointError` for a damaged file (a data block that does not match
    its CRC included), ``OSError`` if it cannot be read. A truncated file is not an
    error: the summary says so, and how many blocks it could check. A checkpoint
    whose pages are in a pages file needs its path as ``pages_file``: its identity,
    segment and (with ``verify_data``) blocks are checked there; a truncated pages
    file is an error.
    """
    with open(path, "rb") as f:
        on_disk = os.fstat(f.fileno()).st_size
        header = Header.unpack(f.read(HEADER_SIZE))
        if header.metadata_length > on_disk - HEADER_SIZE:
            raise CheckpointError(f"truncated checkpoint: {on_disk} bytes")
        metadata = f.read(header.metadata_length)
        header.check_metadata(metadata)
        snap = decode_metadata(header, metadata)
        build_state(header, snap)
        if header.pages_file != (pages_file is not None):
            raise CheckpointError(
                "its pages are in a pages file: give its path (--pages-file)"
                if header.pages_file
                else "it holds its own pages: no pages file is needed"
            )
        if pages_file is not None:
            data_check = _verify_pages_file(f, header, on_disk, pages_file, verify_data)
        elif verify_data:
            checked, trailer = _verify_data(f, header, on_disk)
            data_check = (
                "checksums OK"
                if checked == header.blocks
                else f"checksums of the {checked} blocks present OK, "
                f"{header.blocks - checked} missing"
            ) + ("" if trailer else ", no trailer")
        else:
            data_check = "checksums not read"

    huge = sum(snap.chunk_huge)
    used = sum(e - s for s, e, refs in snap.unfree_small + snap.unfree_huge if refs)
    shared = sum(e - s for s, e, refs in snap.unfree_small + snap.unfree_huge if refs > 1)
    subrel = sum(n for _, n in snap.subreleased) * PAGE_SIZE
    extents = committed_extents(snap.mem_acct)
    by: dict[tuple[int, str], list[int]] = {}
    for s, e, memcg, _, info in snap.mem_acct:
        row = by.setdefault((memcg, MemoryKind(info & 0xFF).name), [0, 0])
        row[0] += e - s
        if info & 0x100:
            row[1] += e - s
    status = (
        "complete"
        if on_disk == header.total_length
        else (
            f"TRUNCATED (expected {header.total_length} bytes)"
            if on_disk < header.total_length
            else f"{on_disk - header.total_length} bytes of trailing data"
        )
    )
    flags = (
        ", ".join(
            name
            for flag, name in (
                (FLAG_ZERO_PAGES_EXCLUDED, "zero pages excluded"),
                (FLAG_PAGES_FILE, "pages in a pages file"),
                (FLAG_WORKING_SET, "working-set order"),
            )
            if header.flags & flag
        )
        or "none"
    )
    lines = [
        f"asyncpgalloc checkpoint {path}",
        f"  format version:     {header.version} (flags: {flags})",
        f"  geometry:           page {header.page_size} B, "
        f"huge page {_size(header.huge_page_size)}, chunk {_size(header.chunk_size)}",
        f"  memory file size:   {_size(header.file_size)} in {header.num_chunks} chunks "
        f"({header.num_chunks - huge} small, {huge} huge)",
        f"  checkpoint size:    {_size(on_disk)} ({on_disk} bytes): {status}",
        f"  metadata:           {_size(header.metadata_length)}, checksum and consistency OK",
        f"  page data:          {_size(header.data_length)} ({header.data_length} bytes) in "
        f"{len(extents)} extents, "
        f"{header.blocks} blocks of {_size(header.block_size)} ({data_check})",
        f"  used:               {_size(used)} ({_size(shared)} shared by more than one reference)",
        f"  sub-released:       {_size(subrel)} in {len(snap.subreleased)} huge pages",
        f"  commit sequence:    {snap.commit_seq}",
        f"  working-set order:  {_working_set(snap.working_set)}",
        "  segments:           "
        + ", ".join(
            f"{name} {len(lst)}"
            for name, lst in (
                ("unfree_small", snap.unfree_small),
                ("unfree_huge", snap.unfree_huge),
                ("mem_acct", snap.mem_acct),
            )
        ),
        "  by memcg and kind:  used / known committed",
    ]
    for (memcg, kind), (n, committed) in sorted(by.items()):
        lines.append(f"    memcg {memcg:<6} {kind:<10} {_size(n)} / {_size(committed)}")
    return "\n".join(lines) + "\n"


def inspect_main(argv: list[str]) -> int:
    """``python -m asyncpgalloc inspect FILE``: print :func:`describe_checkpoint`.

    Returns the exit status: 0, or 1 (with the reason on stderr) if the file is
    not a sound checkpoint (a page data block that fails its CRC included, unless
    ``--no-data``) or cannot be read.
    """
    parser = argparse.ArgumentParser(
        prog="python -m asyncpgalloc inspect",
        description="Print a MemoryFile checkpoint's header and a summary of its contents.",
    )
    parser.add_argument("file", help="a checkpoint written by MemoryFile.save()")
    parser.add_argument(
        "--no-data",
        action="store_true",
        help="check only the header and metadata, not the page data's checksums",
    )
    parser.add_argument(
        "--pages-file", metavar="PAGES", help="the pages file holding the checkpoint's pages"
    )
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(
            describe_checkpoint(args.file, verify_data=not args.no_data, pages_file=args.pages_file)
        )
    except (CheckpointError, OSError) as e:
        print(f"inspect: {args.file}: {e}", file=sys.stderr)
        return 1
    return 0
