"""The checkpoint file format: its binary layout, and checking what a file says (no I/O).

A checkpoint is, in order (every integer little-endian)::

    header      72 bytes: magic, version, flags, page/huge-page/block/chunk sizes,
                file size, metadata length, data length, metadata CRC, header CRC
    metadata    ``metadata_length`` bytes, all u64 words (see :class:`Snapshot`),
                followed by nothing: its CRC is in the header
    data        the contents of the known-committed pages, in file order, cut into
                blocks of ``block_size`` bytes (the last may be shorter), each
                followed by a u32 CRC seeded with the block index and the header CRC
    trailer     24 bytes: magic, block count, CRC

With the flag ``FLAG_PAGES_FILE`` (``save(dst, pages_file=...)``) the data is not in
the checkpoint but in a shared *pages file* (:mod:`asyncpgalloc.pages_file`), and a
40-byte pages reference takes its place: magic ``APGAPREF``, the pages file's 16-byte
identity, the offset of this checkpoint's segment in it (u64), and a u32 CRC seeded
with the header CRC, then 4 zero bytes. A pages file is::

    file header 4096 bytes: magic ``APGAPAGS``, version (u32), header size (u32),
                identity (16 random bytes), u32 CRC of what precedes it, zeros
    segments    one per saved checkpoint, each at a 4096-aligned offset handed out
                in turn: a 40-byte segment header (magic ``APGASEGM``, the
                checkpoint header's CRC (u32), its block count (u32), its data
                length (u64), the segment's own offset (u64), a u32 CRC seeded with
                the identity's CRC, 4 zero bytes), then the data blocks exactly as
                in a checkpoint (each with its CRC seeded by block index and header
                CRC), then zeros up to the next 4096 boundary

With the flag ``FLAG_WORKING_SET`` the metadata ends with a *working-set order*
section (:class:`WorkingSetOrder`): the file offsets, ``WORKING_SET_GRANULE``-aligned,
of the ranges guests first touched after the previous restore, in that order, as u64
words, then a 24-byte footer: magic ``APGAWSET``, the section's version (u32), its
granule (u32), its entry count (u32) and a u32 CRC of the entries and the footer before
it. The header's metadata CRC covers the section too; a section that fails its own CRC
(or has a bad magic, version or entry) is an error naming it. A checkpoint without the
flag (every one written before the section existed, and any saved with an empty
order) loads as before.

So a checkpoint loaded with the wrong pages file (identity), at the wrong offset or
against another checkpoint's segment (segment header), or with a pages file cut
short (its size), is refused before anything is mapped; a damaged block fails its
CRC as in a self-contained checkpoint.

So a checkpoint's size follows committed memory, not the sparse file, and every byte
is covered by a CRC-32C (the ``crc32c`` package: SSE4.2/ARMv8 instructions, ~12.8
GB/s here against zlib.crc32's ~3.2, with the GIL released; it detects corruption, not
tampering). A block's CRC is seeded with its index and the header's
CRC, so blocks swapped within a file, or spliced in from another checkpoint, fail
too. A malicious file may carry valid CRCs:
:func:`~asyncpgalloc.checkpoint_state.build_state` therefore checks every bound and
every relation between the page sets before anything is mapped.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, NamedTuple

from crc32c import crc32c

from .accounting import MemoryKind
from .core import plan_release
from .errors import CheckpointError
from .ranges import CHUNK_SIZE, HUGE_PAGE_SIZE, MAX_MAPPABLE_CHUNKS, PAGE_SIZE, FileRange

if TYPE_CHECKING:
    pass

__all__ = [
    "BLOCK_SIZE",
    "FLAG_PAGES_FILE",
    "FLAG_WORKING_SET",
    "FLAG_ZERO_PAGES_EXCLUDED",
    "HEADER_SIZE",
    "KINDS",
    "KIND_MASK",
    "KNOWN_BIT",
    "MAGIC",
    "MAX_CHUNKS_LOADABLE",
    "MAX_METADATA_BYTES",
    "PAGES_HEADER_SIZE",
    "PAGES_REF_SIZE",
    "SEGMENT_HEADER_SIZE",
    "TRAILER_SIZE",
    "VERSION",
    "WORKING_SET_GRANULE",
    "WORKING_SET_MAX_ENTRIES",
    "WORKING_SET_VERSION",
    "Block",
    "Header",
    "PagesRef",
    "Segment",
    "Snapshot",
    "WorkingSetOrder",
    "block_seed",
    "committed_extents",
    "crc",
    "decode_metadata",
    "encode_metadata",
    "merged",
    "pack_pages_header",
    "pack_trailer",
    "plan_blocks",
    "released",
    "unpack_pages_header",
    "unpack_trailer",
]

MAGIC = b"APGACKPT"
TRAILER_MAGIC = b"APGAEND\x00"
VERSION = 1
#: Data blocks written by this version (any power of two from a page to 64 MiB loads).
BLOCK_SIZE = 1 << 20
_MAX_BLOCK_SIZE = 64 << 20
FLAG_ZERO_PAGES_EXCLUDED = 1
#: The page data is in a shared pages file; a pages reference replaces it.
FLAG_PAGES_FILE = 2
#: The metadata ends with a working-set order section (see :class:`WorkingSetOrder`).
FLAG_WORKING_SET = 4
_KNOWN_FLAGS = FLAG_ZERO_PAGES_EXCLUDED | FLAG_PAGES_FILE | FLAG_WORKING_SET
#: Metadata is read whole into memory: about 40 bytes per segment, so this allows
#: tens of millions of segments while bounding what a forged length can make us read.
MAX_METADATA_BYTES = 1 << 30
#: No more 1 GiB chunks can be mapped (128 TiB of address space on x86-64).
#: ``vm.max_map_count`` (65530 by default) usually binds first: ``load`` turns the
#: mapping's ENOMEM into a CheckpointError.
MAX_CHUNKS_LOADABLE = MAX_MAPPABLE_CHUNKS

_HEADER = struct.Struct("<8sIIIIIIQQQQI")
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size + _CRC.size
_TRAILER = struct.Struct("<8sQ")
TRAILER_SIZE = _TRAILER.size + _CRC.size + 4
_SEED = struct.Struct("<QI")
_U64_MAX = 2**64 - 1
_LITTLE = sys.byteorder == "little"

# mem_acct's info word: kind in bits 0-7, known_committed bit 8, waste_or_releasing bit 9.
KNOWN_BIT = 1 << 8
_WASTE_BIT = 1 << 9
KIND_MASK = 0xFF
KINDS = {int(k) for k in MemoryKind}
_COUNT_WORDS = 9
# Words per entry of each list, in file order.
_WIDTHS = (2, 2, 3, 3, 5, 2)


def crc(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC-32C of ``data``, continuing from ``value``. Releases the GIL; ~0.08 ms per MiB."""
    return crc32c(data, value)


_crc = crc


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed-size header. ``crc`` covers every byte before it."""

    version: int
    flags: int
    page_size: int
    huge_page_size: int
    block_size: int
    chunk_size: int
    file_size: int
    metadata_length: int
    data_length: int
    metadata_crc: int
    crc: int = 0

    @classmethod
    def make(cls, *, flags: int, file_size: int, metadata: bytes, data_length: int) -> Header:
        """The header of a checkpoint made on this host, its CRC computed."""
        h = cls(
            VERSION,
            flags,
            PAGE_SIZE,
            HUGE_PAGE_SIZE,
            BLOCK_SIZE,
            CHUNK_SIZE,
            file_size,
            len(metadata),
            data_length,
            _crc(metadata),
        )
        return _replace_crc(h, _crc(h._body()))

    def _body(self) -> bytes:
        return _HEADER.pack(
            MAGIC,
            self.version,
            HEADER_SIZE,
            self.flags,
            self.page_size,
            self.huge_page_size,
            self.block_size,
            self.chunk_size,
            self.file_size,
            self.metadata_length,
            self.data_length,
            self.metadata_crc,
        )

    def pack(self) -> bytes:
        return self._body() + _CRC.pack(self.crc)

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        """Parse and check a header: magic, version, CRC, this host's geometry, bounds.

        Raises :class:`CheckpointError` naming the first problem.
        """
        if len(raw) < HEADER_SIZE:
            raise CheckpointError(f"truncated checkpoint: {len(raw)}-byte header")
        if raw[:8] != MAGIC:
            raise CheckpointError(f"not an asyncpgalloc checkpoint (magic {raw[:8]!r})")
        fields = _HEADER.unpack_from(raw)
        (
            _,
            version,
            header_size,
            flags,
            page,
            huge,
            block,
            chunk,
            size,
            meta_len,
            data_len,
            meta_crc,
        ) = fields
        (crc,) = _CRC.unpack_from(raw, _HEADER.size)
        if version != VERSION:
            raise CheckpointError(
                f"checkpoint format version {version} is not supported (this is {VERSION})"
            )
        if _crc(raw[: _HEADER.size]) != crc:
            raise CheckpointError("checkpoint header checksum mismatch")
        h = cls(version, flags, page, huge, block, chunk, size, meta_len, data_len, meta_crc, crc)
        h._check(header_size)
        return h

    def _check(self, header_size: int) -> None:
        if header_size != HEADER_SIZE:
            raise CheckpointError(f"header size {header_size} != {HEADER_SIZE}")
        if self.flags & ~_KNOWN_FLAGS:
            raise CheckpointError(f"unknown checkpoint flags {self.flags:#x}")
        geometry = (self.page_size, self.huge_page_size, self.chunk_size)
        if geometry != (PAGE_SIZE, HUGE_PAGE_SIZE, CHUNK_SIZE):
            raise CheckpointError(
                f"checkpoint page/huge-page/chunk sizes {geometry} differ from this host's "
                f"{(PAGE_SIZE, HUGE_PAGE_SIZE, CHUNK_SIZE)}"
            )
        b = self.block_size
        if not PAGE_SIZE <= b <= _MAX_BLOCK_SIZE or b & (b - 1):
            raise CheckpointError(f"bad data block size {b}")
        if self.file_size % CHUNK_SIZE or self.num_chunks > MAX_CHUNKS_LOADABLE:
            raise CheckpointError(f"bad file size {self.file_size:#x}")
        m = self.metadata_length
        least = _COUNT_WORDS * 8 + (_WS_FOOTER_SIZE if self.flags & FLAG_WORKING_SET else 0)
        if m % 8 or not least <= m <= MAX_METADATA_BYTES:
            raise CheckpointError(f"bad metadata length {m}")
        if self.data_length % PAGE_SIZE or self.data_length > self.file_size:
            raise CheckpointError(
                f"data length {self.data_length:#x} is unaligned or exceeds the file size"
            )

    @property
    def num_chunks(self) -> int:
        return self.file_size // CHUNK_SIZE

    @property
    def blocks(self) -> int:
        """Number of data blocks."""
        return -(-self.data_length // self.block_size)

    @property
    def data_offset(self) -> int:
        """Offset of the first data block in the checkpoint (of the pages reference, for
        one whose data is in a pages file)."""
        return HEADER_SIZE + self.metadata_length

    @property
    def pages_file(self) -> bool:
        """True if the page data is in a shared pages file (``FLAG_PAGES_FILE``)."""
        return bool(self.flags & FLAG_PAGES_FILE)

    @property
    def data_bytes(self) -> int:
        """Bytes of the data blocks with their CRCs, wherever they are."""
        return self.data_length + _CRC.size * self.blocks

    @property
    def total_length(self) -> int:
        """Bytes of the whole checkpoint, trailer included."""
        body = PAGES_REF_SIZE if self.pages_file else self.data_bytes
        return self.data_offset + body + TRAILER_SIZE

    def check_metadata(self, metadata: bytes | memoryview) -> None:
        if len(metadata) != self.metadata_length:
            raise CheckpointError(
                f"truncated checkpoint: {len(metadata)} of {self.metadata_length} metadata bytes"
            )
        if _crc(metadata) != self.metadata_crc:
            if self.flags & FLAG_WORKING_SET:
                # Name the working-set order section if it is what is damaged.
                WorkingSetOrder.unpack(self, metadata)
            raise CheckpointError("checkpoint metadata checksum mismatch")


def _replace_crc(h: Header, crc: int) -> Header:
    import dataclasses

    return dataclasses.replace(h, crc=crc)


def pack_trailer(header: Header) -> bytes:
    body = _TRAILER.pack(TRAILER_MAGIC, header.blocks)
    return body + _CRC.pack(_crc(body, header.crc)) + bytes(4)


def unpack_trailer(header: Header, raw: bytes) -> None:
    """Check the trailer; raises :class:`CheckpointError` if it is not this header's."""
    if len(raw) != TRAILER_SIZE:
        raise CheckpointError("truncated checkpoint: no trailer")
    body = raw[: _TRAILER.size]
    magic, blocks = _TRAILER.unpack(body)
    (crc,) = _CRC.unpack_from(raw, _TRAILER.size)
    if magic != TRAILER_MAGIC or blocks != header.blocks or crc != _crc(body, header.crc):
        raise CheckpointError("checkpoint trailer is corrupt")
    if raw[_TRAILER.size + _CRC.size :] != bytes(4):
        raise CheckpointError("checkpoint trailer is corrupt")


# ------------------------------------------------------------------------ pages files

PAGES_MAGIC = b"APGAPAGS"
PAGES_VERSION = 1
#: The pages file's header, padded so that the first segment is page-aligned.
PAGES_HEADER_SIZE = 4096
SEGMENT_ALIGN = 4096
_PAGES_HEADER = struct.Struct("<8sII16s")
_REF_MAGIC = b"APGAPREF"
_REF = struct.Struct("<8s16sQ")
PAGES_REF_SIZE = _REF.size + _CRC.size + 4
_SEGMENT_MAGIC = b"APGASEGM"
_SEGMENT = struct.Struct("<8sIIQQ")
SEGMENT_HEADER_SIZE = _SEGMENT.size + _CRC.size + 4


def pack_pages_header(identity: bytes) -> bytes:
    """The 4096-byte header of a new pages file with ``identity`` (16 bytes)."""
    body = _PAGES_HEADER.pack(PAGES_MAGIC, PAGES_VERSION, PAGES_HEADER_SIZE, identity)
    raw = body + _CRC.pack(_crc(body))
    return raw + bytes(PAGES_HEADER_SIZE - len(raw))


def unpack_pages_header(raw: bytes) -> bytes:
    """Check a pages file's header; its identity. Raises :class:`CheckpointError`."""
    if len(raw) < _PAGES_HEADER.size + _CRC.size:
        raise CheckpointError(f"truncated pages file: {len(raw)}-byte header")
    magic, version, size, identity = _PAGES_HEADER.unpack_from(raw)
    if magic != PAGES_MAGIC:
        raise CheckpointError(f"not an asyncpgalloc pages file (magic {magic!r})")
    if version != PAGES_VERSION:
        raise CheckpointError(
            f"pages file format version {version} is not supported (this is {PAGES_VERSION})"
        )
    (value,) = _CRC.unpack_from(raw, _PAGES_HEADER.size)
    if value != _crc(raw[: _PAGES_HEADER.size]) or size != PAGES_HEADER_SIZE:
        raise CheckpointError("pages file header checksum mismatch")
    ident: bytes = identity
    return ident


class PagesRef(NamedTuple):
    """Where a checkpoint's data is: the pages file's identity and the segment's offset."""

    identity: bytes
    offset: int

    def pack(self, header: Header) -> bytes:
        body = _REF.pack(_REF_MAGIC, self.identity, self.offset)
        return body + _CRC.pack(_crc(body, header.crc)) + bytes(4)

    @classmethod
    def unpack(cls, header: Header, raw: bytes) -> PagesRef:
        """Check the pages reference of ``header``'s checkpoint. Raises CheckpointError."""
        if len(raw) != PAGES_REF_SIZE:
            raise CheckpointError("truncated checkpoint: no pages reference")
        magic, identity, offset = _REF.unpack_from(raw)
        (value,) = _CRC.unpack_from(raw, _REF.size)
        if magic != _REF_MAGIC or value != _crc(raw[: _REF.size], header.crc) or any(raw[-4:]):
            raise CheckpointError("checkpoint pages reference is corrupt")
        if offset < PAGES_HEADER_SIZE or offset % SEGMENT_ALIGN:
            raise CheckpointError(f"bad pages file offset {offset:#x}")
        return cls(identity, offset)


class Segment(NamedTuple):
    """One checkpoint's data in a pages file: its header's fields."""

    header_crc: int
    blocks: int
    data_length: int
    offset: int

    @classmethod
    def of(cls, header: Header, offset: int) -> Segment:
        return cls(header.crc, header.blocks, header.data_length, offset)

    @staticmethod
    def length(header: Header) -> int:
        """Bytes a segment of ``header``'s checkpoint takes, padding included."""
        n = SEGMENT_HEADER_SIZE + header.data_bytes
        return -(-n // SEGMENT_ALIGN) * SEGMENT_ALIGN

    def pack(self, identity: bytes) -> bytes:
        body = _SEGMENT.pack(_SEGMENT_MAGIC, *self)
        return body + _CRC.pack(_crc(body, _crc(identity))) + bytes(4)

    def check(self, identity: bytes, raw: bytes) -> None:
        """Check that ``raw`` is this segment's header in the pages file of ``identity``;
        raises :class:`CheckpointError` naming what differs."""
        if len(raw) != SEGMENT_HEADER_SIZE:
            raise CheckpointError(f"truncated pages file: no segment at {self.offset:#x}")
        body = raw[: _SEGMENT.size]
        magic, *fields = _SEGMENT.unpack(body)
        (value,) = _CRC.unpack_from(raw, _SEGMENT.size)
        if magic != _SEGMENT_MAGIC or value != _crc(body, _crc(identity)):
            raise CheckpointError(
                f"no checkpoint's pages at offset {self.offset:#x} of the pages file"
            )
        if tuple(fields) != tuple(self):
            raise CheckpointError(
                f"the pages at offset {self.offset:#x} of the pages file belong to another "
                "checkpoint"
            )


def block_seed(header_crc: int, index: int) -> int:
    """The CRC seed of data block ``index``: ties each block to its place and its file."""
    return _crc(_SEED.pack(index, header_crc))


def pack_crc(value: int) -> bytes:
    return _CRC.pack(value)


def unpack_crc(raw: bytes | bytearray | memoryview) -> int:
    value: int = _CRC.unpack(raw)[0]
    return value


# ------------------------------------------------------------------------ metadata


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A MemoryFile's bookkeeping at one instant, clipped to ``[0, file_size)``.

    Metadata words, in order: ``commit_seq``, ``known_committed_bytes``, the number
    of chunks, the six list lengths; one byte per chunk (1: huge), zero-padded to 8;
    then the lists, flattened: ``unwaste_small`` and ``unwaste_huge`` as (start, end),
    ``unfree_small`` and ``unfree_huge`` as (start, end, refs), ``mem_acct`` as
    (start, end, memcg_id, commit_seq, info) with info = kind | known_committed << 8
    | waste_or_releasing << 9, and ``subreleased`` as (huge page offset, pages).
    ``working_set`` (not part of the words above) is the working-set order the
    checkpoint carries, if any (see :class:`WorkingSetOrder`).
    """

    commit_seq: int
    known_committed_bytes: int
    chunk_huge: bytes
    unwaste_small: list[tuple[int, int]]
    unwaste_huge: list[tuple[int, int]]
    unfree_small: list[tuple[int, int, int]]
    unfree_huge: list[tuple[int, int, int]]
    mem_acct: list[tuple[int, int, int, int, int]]
    subreleased: list[tuple[int, int]]
    working_set: tuple[int, ...] = ()

    @property
    def file_size(self) -> int:
        return len(self.chunk_huge) * CHUNK_SIZE

    def segment_lists(self) -> tuple[Sequence[tuple[int, ...]], ...]:
        """The five segment lists, in the order the metadata holds them."""
        return (
            self.unwaste_small,
            self.unwaste_huge,
            self.unfree_small,
            self.unfree_huge,
            self.mem_acct,
            self.subreleased,
        )


#: Working-set order entries are file offsets aligned to this (the data block size:
#: the loader reads whole blocks), one per range first touched.
WORKING_SET_GRANULE = BLOCK_SIZE
#: At most this many entries are recorded and saved (64 GiB of ranges at 1 MiB, a
#: 512 KiB section); a checkpoint that holds more is refused.
WORKING_SET_MAX_ENTRIES = 1 << 16
WORKING_SET_VERSION = 1
_WS_MAGIC = b"APGAWSET"
_WS_FOOTER = struct.Struct("<8sIII")
_WS_FOOTER_SIZE = _WS_FOOTER.size + _CRC.size  # 24: the metadata stays u64 words
_WS_NAME = "checkpoint working-set order section"


class WorkingSetOrder(NamedTuple):
    """The working-set order section at the end of a checkpoint's metadata (with
    ``FLAG_WORKING_SET``): ``offsets``, in first-touch order, and its length in bytes."""

    offsets: tuple[int, ...]
    length: int

    @staticmethod
    def pack(offsets: Sequence[int]) -> bytes:
        """The section of ``offsets`` (distinct, granule-aligned). O(entries)."""
        try:
            words = array("Q", offsets)
        except OverflowError as e:
            raise CheckpointError(f"{_WS_NAME}: an offset does not fit in a u64: {e}") from e
        if not _LITTLE:
            words.byteswap()
        body = words.tobytes() + _WS_FOOTER.pack(
            _WS_MAGIC, WORKING_SET_VERSION, WORKING_SET_GRANULE, len(words)
        )
        return body + _CRC.pack(_crc(body))

    @classmethod
    def unpack(cls, header: Header, metadata: bytes | memoryview) -> WorkingSetOrder:
        """Check and parse the section at the end of ``metadata`` (``header`` has
        ``FLAG_WORKING_SET``). Raises :class:`CheckpointError` naming the section: a
        bad footer, version, granule or count, a CRC mismatch, an offset unaligned,
        beyond the file or repeated. O(entries)."""
        n = len(metadata)
        if n < _COUNT_WORDS * 8 + _WS_FOOTER_SIZE:
            raise CheckpointError(f"{_WS_NAME} is missing (metadata of {n} bytes)")
        foot = n - _WS_FOOTER_SIZE
        magic, version, granule, count = _WS_FOOTER.unpack_from(metadata, foot)
        (value,) = _CRC.unpack_from(metadata, foot + _WS_FOOTER.size)
        if magic != _WS_MAGIC:
            raise CheckpointError(f"{_WS_NAME} is corrupt (no footer)")
        start = foot - 8 * count
        if count > WORKING_SET_MAX_ENTRIES or start < _COUNT_WORDS * 8:
            raise CheckpointError(f"{_WS_NAME} is corrupt ({count} entries)")
        if _crc(metadata[start : foot + _WS_FOOTER.size]) != value:
            raise CheckpointError(f"{_WS_NAME} checksum mismatch")
        if version != WORKING_SET_VERSION:
            raise CheckpointError(
                f"{_WS_NAME} version {version} is not supported (this is {WORKING_SET_VERSION})"
            )
        if granule != WORKING_SET_GRANULE:
            raise CheckpointError(f"{_WS_NAME}: granule {granule} is not {WORKING_SET_GRANULE}")
        words = array("Q")
        words.frombytes(metadata[start:foot])
        if not _LITTLE:
            words.byteswap()
        offsets = tuple(words)
        bad = [o for o in offsets if o % granule or o >= header.file_size]
        if bad or len(set(offsets)) != count:
            what = f"offset {bad[0]:#x} unaligned or beyond the file" if bad else "repeated"
            raise CheckpointError(f"{_WS_NAME} is inconsistent: {what}")
        return cls(offsets, n - start)


def mem_acct_info(kind: MemoryKind, known_committed: bool, waste_or_releasing: bool) -> int:
    known = KNOWN_BIT if known_committed else 0
    return int(kind) | known | (_WASTE_BIT if waste_or_releasing else 0)


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


def encode_metadata(snap: Snapshot) -> bytes:
    """The metadata bytes of ``snap``. O(segments), C speed; runs anywhere.

    Raises :class:`CheckpointError` if a value does not fit in a u64 (a negative or
    huge memcg id).
    """
    lists = snap.segment_lists()
    counts = [len(lst) for lst in lists]
    chunks = snap.chunk_huge
    try:
        head = array("Q", [snap.commit_seq, snap.known_committed_bytes, len(chunks), *counts])
        body = array("Q", chain.from_iterable(chain.from_iterable(lists)))
    except OverflowError as e:
        raise CheckpointError(f"a value does not fit in a checkpoint (u64): {e}") from e
    if not _LITTLE:
        head.byteswap()
        body.byteswap()
    order = WorkingSetOrder.pack(snap.working_set) if snap.working_set else b""
    pad = bytes(_pad8(len(chunks)) - len(chunks))
    return head.tobytes() + chunks + pad + body.tobytes() + order


def decode_metadata(header: Header, metadata: bytes) -> Snapshot:
    """Parse checked metadata bytes (see :meth:`Header.check_metadata`) into a Snapshot.

    Checks only the shape: every count against the length, the chunk bytes, and the
    working-set order section if the header's flags say there is one. O(segments).
    """
    order: tuple[int, ...] = ()
    if header.flags & FLAG_WORKING_SET:
        section = WorkingSetOrder.unpack(header, metadata)
        order = section.offsets
        metadata = metadata[: len(metadata) - section.length]
    words = array("Q")
    words.frombytes(metadata[: _COUNT_WORDS * 8])
    if not _LITTLE:
        words.byteswap()
    commit_seq, known, num_chunks, *counts = words
    if num_chunks != header.num_chunks:
        raise CheckpointError(
            f"metadata has {num_chunks} chunks, the header's file size {header.num_chunks}"
        )
    flags_len = _pad8(num_chunks)
    expected = (
        _COUNT_WORDS * 8 + flags_len + 8 * sum(c * w for c, w in zip(counts, _WIDTHS, strict=True))
    )
    if expected != len(metadata):
        raise CheckpointError(
            f"metadata counts need {expected} bytes, the metadata holds {len(metadata)}"
        )
    pos = _COUNT_WORDS * 8
    chunk_huge = metadata[pos : pos + num_chunks]
    if chunk_huge.strip(b"\x00\x01") or any(metadata[pos + num_chunks : pos + flags_len]):
        raise CheckpointError("bad chunk page-size flags")
    pos += flags_len
    body = array("Q")
    body.frombytes(metadata[pos:])
    if not _LITTLE:
        body.byteswap()
    lists: list[list[tuple[int, ...]]] = []
    at = 0
    for count, width in zip(counts, _WIDTHS, strict=True):
        flat = body[at : at + count * width]
        at += count * width
        lists.append(list(zip(*[iter(flat)] * width, strict=True)))
    return Snapshot(commit_seq, known, bytes(chunk_huge), *lists, order)  # type: ignore[arg-type, call-arg]


def _cut(
    entries: list[tuple[int, int, int]], holes: list[tuple[int, int]]
) -> list[tuple[int, int, int]]:
    """``entries`` (sorted, disjoint) with the sorted, disjoint ``holes`` taken out. O(n)."""
    out: list[tuple[int, int, int]] = []
    i = 0
    for s, e, v in entries:
        while i < len(holes) and holes[i][1] <= s:
            i += 1
        j = i
        while j < len(holes) and holes[j][0] < e:
            hs, he = holes[j]
            if s < hs:
                out.append((s, hs, v))
            s = max(s, he)
            j += 1
        if s < e:
            out.append((s, e, v))
    return out


def released(snap: Snapshot) -> Snapshot:
    """``snap`` as it will be once the releaser has released every waste and releasing
    page (dead allocations are waste: read the snapshot through the settled sets).

    Waste bytes are never read again, so a checkpoint may record them as released:
    small-chunk waste becomes free, huge-chunk waste sub-released or, where a huge
    page is then wholly released, free (the releaser's own arithmetic,
    :func:`~asyncpgalloc.pages.plan_release`). Its contents are not saved, and the
    restored file reads zeros there, as a released page does. This is what lets
    ``save`` take its snapshot at once instead of waiting for a moment with no waste
    at all, which steady churn never gives. Pure computation, O(segments).
    """
    size = snap.file_size
    full = [(0, size)] if size else []
    waste: list[tuple[int, int]] = []
    for s, e, _, _, info in snap.mem_acct:
        if info & _WASTE_BIT:
            if waste and waste[-1][1] == s and s % CHUNK_SIZE:
                waste[-1] = (waste[-1][0], e)
            else:
                waste.append((s, e))
    if not waste and snap.unwaste_small == full and snap.unwaste_huge == full:
        return snap
    counts = dict(snap.subreleased)
    free: tuple[list[tuple[int, int]], list[tuple[int, int]]] = ([], [])
    for s, e in waste:
        while s < e:
            stop = min(e, s - s % CHUNK_SIZE + CHUNK_SIZE)
            huge = bool(snap.chunk_huge[s // CHUNK_SIZE])
            plan = plan_release(FileRange(s, stop), huge, counts)
            for offset, n in plan.subreleased.items():
                if n:
                    counts[offset] = n
                else:
                    counts.pop(offset, None)
            if plan.free.length:
                frees = free[huge]
                if frees and frees[-1][1] >= plan.free.start:
                    frees[-1] = (frees[-1][0], max(frees[-1][1], plan.free.end))
                else:
                    frees.append(plan.free)
            s = stop
    known_waste = _WASTE_BIT | KNOWN_BIT
    gone = sum(e - s for s, e, _, _, i in snap.mem_acct if i & known_waste == known_waste)
    return Snapshot(
        commit_seq=snap.commit_seq,
        known_committed_bytes=snap.known_committed_bytes - gone,
        chunk_huge=snap.chunk_huge,
        unwaste_small=full,
        unwaste_huge=full,
        unfree_small=_cut(snap.unfree_small, free[False]),
        unfree_huge=_cut(snap.unfree_huge, free[True]),
        mem_acct=[m for m in snap.mem_acct if not m[4] & _WASTE_BIT],
        subreleased=sorted(counts.items()),
        working_set=snap.working_set,
    )


# ------------------------------------------------------------------------ data blocks


def merged(ranges: Iterator[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in ranges:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def committed_extents(mem_acct: Sequence[tuple[int, int, int, int, int]]) -> list[tuple[int, int]]:
    """The file ranges whose contents a checkpoint holds: known-committed, merged, in order."""
    return merged((s, e) for s, e, _, _, info in mem_acct if info & KNOWN_BIT)


class Block(NamedTuple):
    """One data block: its number, its pieces of the file (offset, length), its length."""

    number: int
    pieces: tuple[tuple[int, int], ...]
    length: int


def plan_blocks(extents: Sequence[tuple[int, int]], block_size: int) -> Iterator[Block]:
    """Cut the concatenation of ``extents`` into blocks of ``block_size`` bytes."""
    index = 0
    pieces: list[tuple[int, int]] = []
    have = 0
    for s, e in extents:
        while s < e:
            n = min(e - s, block_size - have)
            pieces.append((s, n))
            have += n
            s += n
            if have == block_size:
                yield Block(index, tuple(pieces), have)
                index += 1
                pieces.clear()
                have = 0
    if have:
        yield Block(index, tuple(pieces), have)
