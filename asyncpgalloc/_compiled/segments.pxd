# The compiled segment set's declarations, so that the compiled page-state core
# (asyncpgalloc/_compiled/pages.pxd) calls its methods in C. See segments.pyx.
cimport cython
from cpython.object cimport PyObject
from libc.stdint cimport uint64_t

cdef enum:
    # Entries per leaf and children per node (see segments.pyx).
    CAP = 64

cdef struct Node:
    int n
    bint leaves          # children are Leaf*, else Node*
    Node* parent
    uint64_t kmin        # cached summary: lowest start and largest gap in this subtree
    uint64_t maxg
    uint64_t key[CAP]    # per child: its lowest start
    uint64_t mgap[CAP]   # per child: its largest gap before a segment
    void* kid[CAP]

cdef struct Leaf:
    int n
    Node* parent
    Leaf* prev
    Leaf* next
    uint64_t kmin        # cached summary, equal to the parent's entry for this leaf
    uint64_t maxg
    uint64_t wmax        # the largest gap now, unless stale (then rescanned on refresh)
    bint stale
    uint64_t* gap        # NULL without a gap index
    uint64_t start[CAP]
    uint64_t last[CAP]
    PyObject* val[CAP]


@cython.final
cdef class SegmentSet:
    cdef void* _root
    cdef int _height             # 0: the root is a leaf
    cdef Py_ssize_t _count
    cdef bint _merge
    cdef bint _indexed
    cdef Leaf* _first
    cdef Leaf* _lastleaf
    # Bumped by every mutation: iterators trust their cached leaf only while it is unchanged.
    cdef unsigned long long _mod
    cdef Leaf* _spare_leaves
    cdef Node* _spare_nodes
    cdef int _n_spare_leaves
    cdef int _n_spare_nodes
    # Where the last _ins put its entry (valid until the next change).
    cdef Leaf* _at_leaf
    cdef int _at_idx

    cdef Leaf* _alloc_leaf(self) except NULL
    cdef void _free_leaf_mem(self, Leaf* lf) noexcept
    cdef void _free_tree(self, void* x, int h) noexcept
    cdef int _reserve(self) except -1
    cdef Leaf* _take_leaf(self) noexcept
    cdef void _give_leaf(self, Leaf* lf) noexcept
    cdef Node* _take_node(self) noexcept
    cdef void _give_node(self, Node* nd) noexcept
    cdef void _set_parent(self, void* kid, bint leaf, Node* p) noexcept
    cdef int _index_of(self, Node* nd, void* kid) noexcept
    cdef void _push_up(self, Node* nd, void* kid, uint64_t k, uint64_t g) noexcept
    cdef void _leaf_summary(self, Leaf* lf, uint64_t* k, uint64_t* g) noexcept
    cdef void _refresh_leaf(self, Leaf* lf) noexcept
    cdef void _node_summary(self, Node* nd, uint64_t* k, uint64_t* g) noexcept
    cdef void _refresh_node(self, Node* nd) noexcept
    cdef void _regap(self, Leaf* lf, int j) noexcept
    cdef void _regap_next(self, Leaf* lf, int j) noexcept
    cdef int _find(self, uint64_t key, Leaf** out) noexcept
    cdef void _node_insert_after(self, Node* nd, void* left, void* right, bint leaf) noexcept
    cdef void _node_remove(self, Node* nd, void* kid) noexcept
    cdef void _collapse(self) noexcept
    cdef void _unlink_leaf(self, Leaf* lf) noexcept
    cdef void _move_entries(self, Leaf* dst, int di, Leaf* src, int si, int k) noexcept
    cdef void _shift(self, Leaf* dst, int di, Leaf* src, int si, int k) noexcept
    cdef void _ins(self, Leaf* lf, int idx, uint64_t s, uint64_t l, object v) noexcept
    cdef int _rm_n(self, Leaf* lf, int i, int k, list out) except -1
    cdef void _set_last(self, Leaf* lf, int i, uint64_t l) noexcept
    cdef void _set_start(self, Leaf* lf, int i, uint64_t s) noexcept
    cdef void _set_val(self, Leaf* lf, int i, object v, PyObject** old) noexcept
    cdef bint _next_pos(self, Leaf** lf, int* i) noexcept
    cdef bint _prev_pos(self, Leaf** lf, int* i) noexcept
    cdef int _split_at(self, uint64_t key) except -1
    cdef int _first_at_or_after(self, uint64_t key, Leaf** lf) noexcept
    cdef int _eq(self, PyObject* a, PyObject* b) except -1
    cdef int _merge_span(self, uint64_t lo, uint64_t hi) except -1
    cdef tuple _gap_around(self, Leaf* lf, int i)
    cdef bint _contiguous_prev(self, Leaf* lf, int i) noexcept
    cdef bint _edge_gap(self, uint64_t n, bint first, Leaf** out, int* oi) noexcept
    cdef object _take_gap(self, object n, object value, bint first)
    cdef int _remove(self, object start, object end, list out) except -1
    cdef _check_node(self, void* x, int h, Node* parent, list leaves)
    cdef int _gap_query(self, object n, bint first, Leaf** lf, int* i, uint64_t* gs, uint64_t* glen) except -2

    cpdef find_segment(self, key)
    cpdef segment_end(self, start)
    cpdef get_exact(self, start, end, default)
    cpdef find_gap(self, key)
    cpdef visit_range(self, start, end)
    cpdef is_fully_covered(self, start, end)
    cpdef first_large_enough_gap(self, n)
    cpdef last_large_enough_gap(self, n)
    cpdef take_first_gap(self, n, value)
    cpdef take_last_gap(self, n, value)
    cpdef insert_range(self, start, end, value)
    cpdef replace_value(self, start, value)
    cpdef remove_range(self, start, end)
    cpdef pop_range(self, start, end)
    cpdef refine(self, start, cuts, values)
    cpdef mutate_range(self, start, end, fn)
