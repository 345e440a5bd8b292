# Declarations that make the compiled copy of asyncpgalloc/pages.py (pure Python mode, see
# setup.py) an extension type: its attributes are C fields, not a __dict__, and its calls
# into the compiled segment sets are C calls (segments.pxd). pages.py is unchanged by this
# file: it is the pure-Python core as it stands. Every attribute stays public, so code and
# tests that read one see the same names on both cores; counts are C long long (byte
# counts of a file of at most 2**47 bytes, never near 2**63).
from asyncpgalloc._compiled.segments cimport SegmentSet


cdef class PageSets:
    cdef public object _accounting
    cdef public bint _account
    cdef public SegmentSet _unwaste_small
    cdef public SegmentSet _unwaste_huge
    cdef public SegmentSet _unfree_small
    cdef public SegmentSet _unfree_huge
    cdef public SegmentSet _mem_acct
    cdef public dict _subreleased
    cdef public list _chunk_huge
    cdef public list _dead_small
    cdef public list _dead_huge
    cdef public list _dead_heap_small
    cdef public list _dead_heap_huge
    cdef public dict _releasing
    cdef public bint _have_waste
    cdef public tuple _last_acct
    cdef public dict _waste_accts
    cdef public dict _committed_accts
    cdef public long long _known_committed_bytes
    cdef public long long _commit_seq
    cdef public long long _used_bytes
    cdef public long long _waste_bytes
    cdef public long long _dead_bytes
    cdef public long long _releasing_bytes
    cdef public long long _subreleased_pages
    cdef public long long _huge_chunks
    cdef public long long allocations
    cdef public long long allocated_bytes
    cdef public long long released_bytes
    cdef public object on_committed_waste
    cdef public bint hold_waste
