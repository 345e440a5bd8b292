"""The SVG map: what it shows matches the file's state, and its size is bounded by pixels."""

from __future__ import annotations

import asyncio
import random
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import RecordingExecutor, fill
from hypothesis import given
from hypothesis import strategies as st

from asyncpgalloc import (
    CHUNK_SIZE,
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    AllocationMode,
    AllocOpts,
    ClosedError,
    Direction,
    FileRange,
    MemoryFile,
    MemoryFileOpts,
)
from asyncpgalloc.svgmap import (
    _COLOURS,
    _ROW_H,
    MapSnapshot,
    PageState,
    _stack,
    auto_span,
    render_svg,
    snapshot,
)

P = PAGE_SIZE
H = HUGE_PAGE_SIZE
NS = "{http://www.w3.org/2000/svg}"
STATE_FIELDS = {
    PageState.USED: "used_bytes",
    PageState.WASTE: "waste_bytes",
    PageState.RELEASING: "releasing_bytes",
    PageState.SUBRELEASED: "subreleased_bytes",
    PageState.FREE: "free_bytes",
}


def legend(svg: str) -> dict[str, int]:
    """The legend's byte totals by state, read back from the SVG."""
    root = ET.fromstring(svg)
    return {
        g.attrib["data-state"]: int(g.attrib["data-bytes"])
        for g in root.iter(f"{NS}g")
        if g.attrib.get("class") == "legend-item"
    }


def rows(svg: str) -> list[ET.Element]:
    return [g for g in ET.fromstring(svg).iter(f"{NS}g") if g.attrib.get("class") == "chunk"]


def state_rects(row: ET.Element) -> dict[str, set[str]]:
    """Fill colours of each state's rectangles in one row."""
    out: dict[str, set[str]] = {}
    for r in row.iter(f"{NS}rect"):
        cls = r.attrib.get("class", "")
        if cls.startswith("state-"):
            out.setdefault(cls, set()).add(r.attrib["fill"])
    return out


def check_tiling(snap: MapSnapshot) -> None:
    """The ranges of all states are sorted, disjoint and cover the file exactly once."""
    pieces = sorted(r for rs in snap.ranges.values() for r in rs)
    pos = 0
    for s, e in pieces:
        assert s == pos and e > s, (s, e, pos)
        pos = e
    assert pos == snap.total_size


@contextmanager
def gated(ex: RecordingExecutor) -> Iterator[None]:
    """Hold every executor job (a release in flight stays in flight) until the block ends."""
    ex.gate.clear()
    try:
        yield
    finally:
        ex.gate.set()


async def test_map_shows_every_state_of_a_real_file(tmp_path: Path) -> None:
    with RecordingExecutor() as ex:
        opts = MemoryFileOpts(executor=ex, expect_hugepages=True)
        async with MemoryFile.open(opts=opts) as mf:
            # Chunk 0, small pages: a committed block and three neighbours.
            a = mf.allocate(64 * P, AllocOpts(mode=AllocationMode.WRITE_POPULATE))
            b, c, d = (mf.allocate(16 * P) for _ in range(3))
            # Chunk 1, huge pages: a quarter of the first huge page sub-released.
            h = mf.allocate(2 * H, AllocOpts(huge=True))
            mf.dec_ref(FileRange(h.start, h.start + H // 4))
            await mf.wait_released()
            # Chunk 2, small pages again: most of it used.
            big = mf.allocate(CHUNK_SIZE - 64 * P)  # more than chunk 0 has left
            fill(mf, a, 0x11)
            await mf.update_usage()  # a becomes known committed
            assert mf.known_committed_bytes == a.length
            with gated(ex):
                mf.dec_ref(b)  # taken by the releaser, held in flight: releasing
                while mf.stats().releasing_bytes == 0:
                    await asyncio.sleep(0.001)
                mf.dec_ref(d)  # the releaser is busy: waste

                snap = snapshot(mf)
                st_now = mf.stats()
                svg = render_svg(snap)
                mf.render_map(tmp_path / "sync.svg")
                mf.check_invariants()
            await mf.wait_released()
            await mf.render_map_async(tmp_path / "async.svg")
            mf.check_invariants()

    assert snap.stats == st_now
    assert snap.chunk_huge == (False, True, False)
    check_tiling(snap)
    for state, name in STATE_FIELDS.items():
        assert sum(e - s for s, e in snap.ranges[state]) == getattr(st_now, name), state
    assert snap.ranges[PageState.RELEASING] == (tuple(b),)
    assert snap.ranges[PageState.WASTE] == (tuple(d),)
    assert snap.ranges[PageState.SUBRELEASED] == ((h.start, h.start + H // 4),)
    assert snap.subreleased_counts == ((h.start, H // 4 // P),)
    assert snap.known_committed == (tuple(a),)
    used = snap.ranges[PageState.USED]
    assert (a.start, c.end) in used or {tuple(a), tuple(c)} <= set(used)
    assert (big.start, big.end) in used

    totals = legend(svg)
    assert totals == {
        **{s.value: getattr(st_now, f) for s, f in STATE_FIELDS.items()},
        "known-committed": st_now.known_committed_bytes,
    }
    assert all(totals[s.value] > 0 for s in PageState)
    drawn = rows(svg)
    assert [r.attrib["data-kind"] for r in drawn] == ["small", "huge", "small"]
    row0, row1 = state_rects(drawn[0]), state_rects(drawn[1])
    # Each state in its own colour, where it is.
    assert row0["state-releasing"] == {_COLOURS[PageState.RELEASING]}
    assert row0["state-waste"] == {_COLOURS[PageState.WASTE]}
    assert row0["state-used"] == {_COLOURS[PageState.USED]}
    assert row1["state-subreleased"] == {"url(#subreleased)"}
    assert "state-subreleased" not in row0 and "state-releasing" not in row1
    assert len(set(_COLOURS.values())) == len(PageState)
    committed = [r for r in drawn[0].iter(f"{NS}rect") if r.attrib.get("class") == "committed"]
    assert committed and not [
        r for r in drawn[2].iter(f"{NS}rect") if r.attrib.get("class") == "committed"
    ]

    # The files: the same picture of the in-flight state; afterwards no releasing left.
    assert legend((tmp_path / "sync.svg").read_text()) == totals
    after = legend((tmp_path / "async.svg").read_text())
    assert after["releasing"] == after["waste"] == 0
    assert after["free"] == totals["free"] + totals["waste"] + totals["releasing"]


async def test_fragmented_file_renders_in_bounded_size(mf: MemoryFile) -> None:
    rng = random.Random(5)
    frs = [mf.allocate(P) for _ in range(20_000)]
    holes = 0
    for fr in frs:
        if rng.random() < 0.5:
            mf.dec_ref(fr)
            holes += 1
    await mf.wait_released()
    snap = snapshot(mf)
    assert len(snap.ranges[PageState.USED]) > 4_000  # thousands of separate runs
    svg = render_svg(snap)
    # Per pixel, not per segment: one 1 GiB row of 1024 columns.
    assert len(svg) < 150_000
    assert len(ET.fromstring(svg).findall(f".//{NS}rect")) < 3 * 1024
    assert legend(svg)["used"] == mf.stats().used_bytes == (20_000 - holes) * P
    (row,) = rows(svg)
    texts = [t.text or "" for t in row.iter(f"{NS}text")]
    assert any(
        t.startswith("free in ") and int(t.split()[2].replace(",", "")) > 4_000 for t in texts
    )


async def test_identical_plain_chunks_share_a_row(mf: MemoryFile) -> None:
    mf.allocate(4 * CHUNK_SIZE)  # four wholly used chunks
    mf.allocate(P)  # and one with a page used
    svg = render_svg(snapshot(mf))
    spans = [(r.attrib["data-first"], r.attrib["data-last"]) for r in rows(svg)]
    assert spans == [("0", "3"), ("4", "4")]
    assert legend(svg)["used"] == 4 * CHUNK_SIZE + P


async def test_a_single_page_still_shows(mf: MemoryFile) -> None:
    a = mf.allocate(P)
    mf.allocate(CHUNK_SIZE // 2)
    mf.dec_ref(a)  # one page of waste at offset 0 ...
    await mf.wait_released()
    mf.allocate(P)  # ... released and reused: one used page among free
    svg = render_svg(snapshot(mf))
    (row,) = rows(svg)
    assert "state-used" in state_rects(row)


async def test_render_map_on_a_closed_file_raises(tmp_path: Path) -> None:
    async with MemoryFile.open() as mf:
        pass
    with pytest.raises(ClosedError):
        mf.render_map(tmp_path / "map.svg")
    assert not leftovers(tmp_path)  # neither the map nor a temporary


def leftovers(directory: Path) -> list[Path]:
    return list(directory.iterdir())


def test_render_svg_from_a_plain_snapshot() -> None:
    snap = MapSnapshot(
        chunk_huge=(False, True),
        ranges={
            PageState.USED: ((0, 1 << 20), (CHUNK_SIZE, CHUNK_SIZE + H - 8 * P)),
            PageState.SUBRELEASED: ((CHUNK_SIZE + H - 8 * P, CHUNK_SIZE + H),),
            PageState.FREE: ((1 << 20, CHUNK_SIZE), (CHUNK_SIZE + H, 2 * CHUNK_SIZE)),
        },
        known_committed=((0, 1 << 19),),
    )
    check_tiling(snap)
    svg = render_svg(snap, width=256, title="from a checkpoint <x>")
    root = ET.fromstring(svg)
    assert root.attrib["width"] == str(16 + 120 + 256 + 190 + 16)
    assert "from a checkpoint <x>" in [t.text for t in root.iter(f"{NS}text")]
    assert legend(svg) == {
        "used": (1 << 20) + H - 8 * P,
        "waste": 0,
        "releasing": 0,
        "sub-released": 8 * P,
        "free": 2 * CHUNK_SIZE - (1 << 20) - H,
        "known-committed": 1 << 19,
    }
    with pytest.raises(ValueError, match="outside the file"):
        render_svg(MapSnapshot((False,), {PageState.USED: ((0, 2 * CHUNK_SIZE),)}))
    with pytest.raises(ValueError, match="power of two"):
        render_svg(snap, width=1000)


def test_a_snapshot_that_leaves_pages_out_still_renders() -> None:
    # Pages in no state are left blank (the row's background) rather than guessed.
    svg = render_svg(MapSnapshot((False,), {PageState.USED: ((0, 1 << 20),)}))
    (row,) = rows(svg)
    assert set(state_rects(row)) == {"state-used"}


def test_an_empty_file_renders() -> None:
    svg = render_svg(MapSnapshot((), {}))
    assert rows(svg) == []
    assert "no chunks" in svg


@given(st.lists(st.integers(0, 1 << 20), min_size=5, max_size=5))
def test_column_stacks_fill_the_row_and_show_every_state(weights: list[int]) -> None:
    px = 1 << 20
    total = sum(weights)
    if total == 0:
        return
    # Scale to one column's bytes, page-aligned, the remainder going to free.
    parts = [w * (px // P) // total * P for w in weights[:4]]
    composition = (*parts, px - sum(parts))
    heights = _stack(composition, px)
    assert sum(heights) == _ROW_H
    for b, h in zip(composition, heights, strict=True):
        assert (h > 0) == (b > 0)


def used_columns(row: ET.Element) -> set[int]:
    """The pixel columns (x offsets) holding used pages in one row."""
    out: set[int] = set()
    for r in row.iter(f"{NS}rect"):
        if r.attrib.get("class") == "state-used":
            x, w = int(r.attrib["x"]), int(r.attrib["width"])
            out.update(range(x, x + w))
    return out


async def test_a_small_file_fills_the_row_so_fragmentation_shows(mf: MemoryFile) -> None:
    # 1 MiB of single pages, every other one freed: to scale, one 1 MiB column.
    frs = [mf.allocate(P) for _ in range(256)]
    for fr in frs[::2]:
        mf.dec_ref(fr)
    await mf.wait_released()
    snap = snapshot(mf)
    svg = render_svg(snap)
    (row,) = rows(svg)
    cols = used_columns(row)
    # The row shows the first 4 MiB (one page per column): each used page is a column.
    assert len(cols) == 128 and max(cols) - min(cols) == 2 * 127
    assert "rows show the first 4 MiB of each chunk" in svg
    # The figures still count the whole chunk.
    assert legend(svg)["free"] == CHUNK_SIZE - 128 * P
    texts = [t.text or "" for t in row.iter(f"{NS}text")]
    assert "0.0% used" in texts  # 512 KiB of 1 GiB
    # Whole chunks on request: all of it in one column, as before.
    full = render_svg(snap, span=CHUNK_SIZE)
    (full_row,) = rows(full)
    assert len(used_columns(full_row)) == 1
    assert "rows show the first" not in full
    with pytest.raises(ValueError, match="span must be a power of two"):
        render_svg(snap, span=3 << 20)


async def test_the_span_grows_to_the_last_page_in_use(mf: MemoryFile) -> None:
    mf.allocate(P)
    assert auto_span(snapshot(mf)) == 4 << 20  # at least one page per column
    mf.allocate(100 << 20)
    assert auto_span(snapshot(mf)) == 128 << 20
    mf.allocate(P, AllocOpts(direction=Direction.TOP_DOWN))  # the chunk's last page
    assert auto_span(snapshot(mf)) == CHUNK_SIZE
