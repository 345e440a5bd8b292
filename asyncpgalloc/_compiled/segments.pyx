# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The compiled segment set: gVisor's ``segment.Set`` with gap tracking, as a B+ tree in C memory.

Built as ``asyncpgalloc._compiled.segments`` (setup.py); ``asyncpgalloc/segments.py`` is the
pure-Python reference with the same API, and ``tests/test_segments.py`` and the differential
test in ``tests/test_core.py`` run against both.

Representation
--------------
Segments live in the leaves of a B+ tree, at most ``CAP`` per leaf, as three parallel C arrays:
``start``, ``last`` (the inclusive last key: keys run up to ``KEY_MAX`` = 2**64, which a
``uint64_t`` end could not hold) and ``val`` (a strong reference to the value object). With a
gap index each leaf also has ``gap``: the length of the gap *before* each segment (from the end
of the previous segment, or from 0). Every internal node holds, per child, the child's lowest
start (to descend by key) and its largest gap (to descend to the first or last gap of a given
length): gVisor's ``trackGaps``. The gap after the last segment is the tail gap, found from the
last leaf. Leaves are linked in order for iteration and neighbours.

Per segment that is 24 bytes (32 with the gap index) in arrays, no Python object: values are
shared objects (small ints, ``None``, the core's shared ``MemAcct`` values).

Memory safety
-------------
Bounds checks are off in this module; every array index is justified by the structure's
invariants, which :meth:`SegmentSet.check_invariants` verifies and the tests check after every
step of a model-based test:

* a leaf holds ``0 <= n <= CAP`` entries, ``n >= 1`` unless it is the (only) root leaf; a node
  holds ``1 <= n <= CAP`` children, ``n >= 2`` at the root; indices into a leaf or node are
  always in ``[0, n)`` (inserting at ``n`` only after a split made room: ``n < CAP``);
* every child's ``parent`` points to the node that lists it, so ``_index_of`` always finds it
  (it raises ``InvariantError``-free: a miss is impossible by this invariant, and would stop
  at ``n``);
* no C pointer is kept across a call that may run Python code that changes the set:
  iterators keep keys, and their cached leaf pointer only while the set's modification
  count is unchanged; ``mutate_range`` refuses a callback that changed the set;
* allocation happens before any change: a public mutation first tops up a reserve of free
  leaves and nodes (one per tree level, plus one), so a split never fails half-way and a
  ``MemoryError`` leaves the set as it was.

Values are compared with ``==`` (merging sets) and released with ``Py_DECREF``: their
``__eq__`` and ``__del__`` must not touch the set (the core's values are ints, ``None`` and
``MemAcct`` named tuples). Values are not traversed by the cyclic GC: a value that refers
back to its set would keep both alive.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport Py_EQ, PyObject, PyObject_RichCompareBool
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport uint64_t
from libc.string cimport memmove

from asyncpgalloc.ranges import KEY_MAX
from asyncpgalloc.segments import format_runs, merged_runs

__all__ = ["SegmentSet"]


cdef extern from "Python.h":
    # noexcept (Cython 3's default for extern functions): errors are checked by hand.
    unsigned long long PyLong_AsUnsignedLongLong(object)
    object PyLong_FromUnsignedLongLong(unsigned long long)
    bint PyLong_Check(object)
    PyObject* PyErr_Occurred()
    void PyErr_Clear()


# CAP (segments.pxd), entries per leaf and children per node, is 64: a node's arrays
# stay in a few cache lines, a 1M-segment tree 4 levels deep, a leaf memmove under 2 KiB.
cdef enum:
    HALF = 32
    # A leaf under CAP / 4 entries merges with a sibling when both fit in 3/4 of a leaf.
    LOW = 16
    MERGED_MAX = 48
    # Leaves and nodes kept for reuse beyond what the reserve needs.
    SPARE_MAX = 8
    # A full leaf spreads entries into a sibling with at least this many free slots.
    SPREAD_MIN = 8


cdef uint64_t U64MAX = 0xFFFFFFFFFFFFFFFF



# ------------------------------------------------------------------ key conversion


cdef inline bint _u64(object x, uint64_t* out):
    """``x`` as a key in [0, 2**64) into ``out``; False (no exception set) if it is none."""
    cdef unsigned long long v
    if not PyLong_Check(x):
        return False
    v = PyLong_AsUnsignedLongLong(x)
    if v == <unsigned long long>-1 and PyErr_Occurred() != NULL:
        PyErr_Clear()
        return False
    out[0] = v
    return True


cdef inline bint _end_last(object end, uint64_t* last):
    """An exclusive end in [1, KEY_MAX] as its inclusive last key; False if it is none."""
    cdef uint64_t e
    if _u64(end, &e):
        if e == 0:
            return False
        last[0] = e - 1
        return True
    if PyLong_Check(end) and end == KEY_MAX:
        last[0] = U64MAX
        return True
    return False


cdef inline object _end(uint64_t last):
    """The exclusive end (a Python int) of a segment whose last key is ``last``."""
    if last == U64MAX:
        return KEY_MAX
    return PyLong_FromUnsignedLongLong(last + 1)


cdef inline object _key(uint64_t k):
    return PyLong_FromUnsignedLongLong(k)


def _check_key(key):
    if not 0 <= key < KEY_MAX:
        raise ValueError(f"key {key:#x} out of range [0, {KEY_MAX:#x})")


def _check_range(start, end):
    if not 0 <= start <= end <= KEY_MAX:
        raise ValueError(f"invalid range [{start:#x}, {end:#x})")


cdef int _need_key(object key, uint64_t* out) except -1:
    """``key`` as a key, or the ValueError of the Python set (TypeError for a non-int)."""
    if _u64(key, out):
        return 0
    _check_key(key)
    raise TypeError(f"keys must be ints, not {type(key).__name__}")


cdef int _need_range(object start, object end, uint64_t* s, uint64_t* l) except -1:
    """A non-empty ``[start, end)`` (checked by the caller) as its first and last keys."""
    if _u64(start, s) and _end_last(end, l):
        return 0
    raise TypeError(f"keys must be ints, not {type(start).__name__} and {type(end).__name__}")


cdef class SegmentSet:
    """Disjoint, non-empty segments ``[start, end)`` with values, over ``[0, KEY_MAX)``.

    The compiled twin of :class:`asyncpgalloc.segments.SegmentSet` (see that class for the
    semantics of every method; this one keeps them exactly, and ``tests/test_core.py``
    compares the two). Costs: O(log n) per located key (a descent of a B+ tree of fanout 64,
    about 4 levels at a million segments), O(1) per segment passed when iterating, O(log n)
    per gap query with ``gap_index=True``. Nothing here blocks or releases the GIL.

    Not thread-safe; iterators see a consistent set but are invalidated (they resume from
    the last key they yielded) by mutation.
    """


    def __cinit__(self, *, merge=True, gap_index=True):
        self._merge = bool(merge)
        self._indexed = bool(gap_index)
        self._spare_leaves = NULL
        self._spare_nodes = NULL
        self._n_spare_leaves = 0
        self._n_spare_nodes = 0
        self._root = NULL
        cdef Leaf* lf = self._alloc_leaf()
        self._root = lf
        self._height = 0
        self._first = lf
        self._lastleaf = lf
        self._count = 0
        self._mod = 0

    def __dealloc__(self):
        if self._root != NULL:
            self._free_tree(self._root, self._height)
            self._root = NULL
        cdef Leaf* lf
        cdef Node* nd
        while self._spare_leaves != NULL:
            lf = self._spare_leaves
            self._spare_leaves = lf.next
            self._free_leaf_mem(lf)
        while self._spare_nodes != NULL:
            nd = self._spare_nodes
            self._spare_nodes = nd.parent
            PyMem_Free(nd)

    @classmethod
    def __class_getitem__(cls, item):
        # SegmentSet[int] in annotations evaluated at run time, as for the Python class.
        return cls

    # ------------------------------------------------------------ memory

    cdef Leaf* _alloc_leaf(self) except NULL:
        cdef Leaf* lf = <Leaf*>PyMem_Malloc(sizeof(Leaf))
        if lf == NULL:
            raise MemoryError()
        lf.gap = NULL
        if self._indexed:
            lf.gap = <uint64_t*>PyMem_Malloc(CAP * sizeof(uint64_t))
            if lf.gap == NULL:
                PyMem_Free(lf)
                raise MemoryError()
        lf.n = 0
        lf.parent = NULL
        lf.prev = NULL
        lf.next = NULL
        lf.kmin = 0
        lf.maxg = 0
        lf.wmax = 0
        lf.stale = False
        return lf

    cdef void _free_leaf_mem(self, Leaf* lf) noexcept:
        if lf.gap != NULL:
            PyMem_Free(lf.gap)
        PyMem_Free(lf)

    cdef void _free_tree(self, void* x, int h) noexcept:
        cdef Node* nd
        cdef Leaf* lf
        cdef int i
        if h == 0:
            lf = <Leaf*>x
            for i in range(lf.n):
                Py_DECREF(<object>lf.val[i])
            self._free_leaf_mem(lf)
            return
        nd = <Node*>x
        for i in range(nd.n):
            self._free_tree(nd.kid[i], h - 1)
        PyMem_Free(nd)

    cdef int _reserve(self) except -1:
        """Top up the spare leaves and nodes so that one insertion cannot fail half-way:
        a leaf split needs one leaf, and each level may split a node or add a root."""
        cdef Leaf* lf
        cdef Node* nd
        while self._n_spare_leaves < 1:
            lf = self._alloc_leaf()
            lf.next = self._spare_leaves
            self._spare_leaves = lf
            self._n_spare_leaves += 1
        while self._n_spare_nodes < self._height + 1:
            nd = <Node*>PyMem_Malloc(sizeof(Node))
            if nd == NULL:
                raise MemoryError()
            nd.parent = self._spare_nodes
            self._spare_nodes = nd
            self._n_spare_nodes += 1
        return 0

    cdef Leaf* _take_leaf(self) noexcept:
        # Invariant: _reserve ran since the last take (the caller's public method did).
        cdef Leaf* lf = self._spare_leaves
        self._spare_leaves = lf.next
        self._n_spare_leaves -= 1
        lf.n = 0
        lf.parent = NULL
        lf.prev = NULL
        lf.next = NULL
        lf.kmin = 0
        lf.maxg = 0
        lf.wmax = 0
        lf.stale = False
        return lf

    cdef void _give_leaf(self, Leaf* lf) noexcept:
        if self._n_spare_leaves >= SPARE_MAX:
            self._free_leaf_mem(lf)
            return
        lf.next = self._spare_leaves
        self._spare_leaves = lf
        self._n_spare_leaves += 1

    cdef Node* _take_node(self) noexcept:
        cdef Node* nd = self._spare_nodes
        self._spare_nodes = nd.parent
        self._n_spare_nodes -= 1
        nd.n = 0
        nd.parent = NULL
        nd.kmin = 0
        nd.maxg = 0
        return nd

    cdef void _give_node(self, Node* nd) noexcept:
        if self._n_spare_nodes >= SPARE_MAX:
            PyMem_Free(nd)
            return
        nd.parent = self._spare_nodes
        self._spare_nodes = nd
        self._n_spare_nodes += 1

    # ------------------------------------------------------------ summaries

    cdef void _set_parent(self, void* kid, bint leaf, Node* p) noexcept:
        if leaf:
            (<Leaf*>kid).parent = p
        else:
            (<Node*>kid).parent = p

    cdef int _index_of(self, Node* nd, void* kid) noexcept:
        # Invariant: kid's parent is nd, so kid is among nd.kid[0:n].
        cdef int i = 0
        while i < nd.n and nd.kid[i] != kid:
            i += 1
        return i

    cdef void _push_up(self, Node* nd, void* kid, uint64_t k, uint64_t g) noexcept:
        """Store a child's new summary in its parent and on up while summaries change."""
        cdef int i
        cdef uint64_t nk, ng, old
        while nd != NULL:
            i = self._index_of(nd, kid)
            nd.key[i] = k
            old = nd.mgap[i]
            nd.mgap[i] = g
            nk = nd.key[0]
            # nd.maxg is the exact largest entry before this change (every structural
            # change rescans): rescan only when the largest entry shrank.
            if g >= nd.maxg:
                ng = g
            elif old == nd.maxg:
                ng = 0
                for i in range(nd.n):
                    if nd.mgap[i] > ng:
                        ng = nd.mgap[i]
            else:
                ng = nd.maxg
            if nk == nd.kmin and ng == nd.maxg:
                return
            nd.kmin = nk
            nd.maxg = ng
            kid = nd
            k = nk
            g = ng
            nd = nd.parent

    cdef void _leaf_summary(self, Leaf* lf, uint64_t* k, uint64_t* g) noexcept:
        """The leaf's summary by a full scan (also makes its working max exact)."""
        cdef int i
        cdef uint64_t m = 0
        k[0] = lf.start[0] if lf.n else 0
        if lf.gap != NULL:
            for i in range(lf.n):
                if lf.gap[i] > m:
                    m = lf.gap[i]
        g[0] = m

    cdef void _refresh_leaf(self, Leaf* lf) noexcept:
        cdef uint64_t k, g
        if lf.stale or lf.gap == NULL:
            self._leaf_summary(lf, &k, &g)
            lf.wmax = g
            lf.stale = False
        else:
            k = lf.start[0] if lf.n else 0
            g = lf.wmax
        if k == lf.kmin and g == lf.maxg:
            return
        lf.kmin = k
        lf.maxg = g
        self._push_up(lf.parent, lf, k, g)

    cdef void _node_summary(self, Node* nd, uint64_t* k, uint64_t* g) noexcept:
        cdef int i
        cdef uint64_t m = 0
        for i in range(nd.n):
            if nd.mgap[i] > m:
                m = nd.mgap[i]
        k[0] = nd.key[0]
        g[0] = m

    cdef void _refresh_node(self, Node* nd) noexcept:
        cdef uint64_t k, g
        self._node_summary(nd, &k, &g)
        if k == nd.kmin and g == nd.maxg:
            return
        nd.kmin = k
        nd.maxg = g
        self._push_up(nd.parent, nd, k, g)

    cdef void _regap(self, Leaf* lf, int j) noexcept:
        """Recompute the gap before entry ``j`` of ``lf`` (no summary update)."""
        cdef uint64_t p, old, new
        if lf.gap == NULL:
            return
        if j > 0:
            p = lf.last[j - 1] + 1
        elif lf.prev != NULL:
            # Invariant: every non-root leaf is non-empty, and a leaf with a prev is not root.
            p = lf.prev.last[lf.prev.n - 1] + 1
        else:
            p = 0
        old = lf.gap[j]
        new = lf.start[j] - p
        lf.gap[j] = new
        if new > lf.wmax:
            lf.wmax = new
        elif old == lf.wmax and new < old:
            lf.stale = True

    cdef void _regap_next(self, Leaf* lf, int j) noexcept:
        """Recompute the gap before the successor of entry ``j`` of ``lf``, if any, and
        refresh the successor's leaf if it is another one."""
        if j + 1 < lf.n:
            self._regap(lf, j + 1)
        elif lf.next != NULL:
            self._regap(lf.next, 0)
            self._refresh_leaf(lf.next)

    # ------------------------------------------------------------ structure

    cdef int _find(self, uint64_t key, Leaf** out) noexcept:
        """The index of the last segment starting at or before ``key`` in ``*out``; -1 (with
        ``*out`` the first leaf) if there is none."""
        cdef void* x = self._root
        cdef int h = self._height
        cdef int lo, hi, mid
        cdef Node* nd
        cdef Leaf* lf
        while h > 0:
            nd = <Node*>x
            lo = 0
            hi = nd.n
            while lo < hi:
                mid = (lo + hi) >> 1
                if nd.key[mid] <= key:
                    lo = mid + 1
                else:
                    hi = mid
            # lo == 0 only on the leftmost path (key below every start): go left.
            x = nd.kid[lo - 1 if lo > 0 else 0]
            h -= 1
        lf = <Leaf*>x
        lo = 0
        hi = lf.n
        while lo < hi:
            mid = (lo + hi) >> 1
            if lf.start[mid] <= key:
                lo = mid + 1
            else:
                hi = mid
        out[0] = lf
        return lo - 1

    cdef void _node_insert_after(self, Node* nd, void* left, void* right, bint leaf) noexcept:
        """Make ``right`` (summary cached) the child after ``left`` of ``nd`` (NULL: left is
        the root, and a new root takes both). Splits full nodes; never fails (reserve)."""
        cdef Node* r
        cdef Node* nn
        cdef int i, m
        cdef uint64_t k, g
        if nd == NULL:
            r = self._take_node()
            r.n = 2
            r.leaves = leaf
            r.kid[0] = left
            r.kid[1] = right
            if leaf:
                r.key[0] = (<Leaf*>left).kmin
                r.mgap[0] = (<Leaf*>left).maxg
                r.key[1] = (<Leaf*>right).kmin
                r.mgap[1] = (<Leaf*>right).maxg
            else:
                r.key[0] = (<Node*>left).kmin
                r.mgap[0] = (<Node*>left).maxg
                r.key[1] = (<Node*>right).kmin
                r.mgap[1] = (<Node*>right).maxg
            self._set_parent(left, leaf, r)
            self._set_parent(right, leaf, r)
            self._node_summary(r, &k, &g)
            r.kmin = k
            r.maxg = g
            self._root = r
            self._height += 1
            return
        i = self._index_of(nd, left)
        if nd.n == CAP and i == CAP - 1:
            # Appending to a full node: a new node of just ``right`` keeps nodes full
            # under sequential growth.
            nn = self._take_node()
            nn.leaves = nd.leaves
            nn.n = 1
            nn.kid[0] = right
            if leaf:
                nn.key[0] = (<Leaf*>right).kmin
                nn.mgap[0] = (<Leaf*>right).maxg
            else:
                nn.key[0] = (<Node*>right).kmin
                nn.mgap[0] = (<Node*>right).maxg
            self._set_parent(right, leaf, nn)
            nn.kmin = nn.key[0]
            nn.maxg = nn.mgap[0]
            self._node_insert_after(nd.parent, nd, nn, False)
            return
        if nd.n == CAP:
            nn = self._take_node()
            nn.leaves = nd.leaves
            nn.n = CAP - HALF
            memmove(&nn.key[0], &nd.key[HALF], (CAP - HALF) * sizeof(uint64_t))
            memmove(&nn.mgap[0], &nd.mgap[HALF], (CAP - HALF) * sizeof(uint64_t))
            memmove(&nn.kid[0], &nd.kid[HALF], (CAP - HALF) * sizeof(void*))
            nd.n = HALF
            for m in range(nn.n):
                self._set_parent(nn.kid[m], nn.leaves, nn)
            self._node_summary(nn, &k, &g)
            nn.kmin = k
            nn.maxg = g
            self._node_insert_after(nd.parent, nd, nn, False)
            self._refresh_node(nd)
            if i >= HALF:
                nd = nn
                i -= HALF
        # Room now: nd.n < CAP.
        m = nd.n - (i + 1)
        if m > 0:
            memmove(&nd.key[i + 2], &nd.key[i + 1], m * sizeof(uint64_t))
            memmove(&nd.mgap[i + 2], &nd.mgap[i + 1], m * sizeof(uint64_t))
            memmove(&nd.kid[i + 2], &nd.kid[i + 1], m * sizeof(void*))
        nd.kid[i + 1] = right
        if leaf:
            nd.key[i + 1] = (<Leaf*>right).kmin
            nd.mgap[i + 1] = (<Leaf*>right).maxg
        else:
            nd.key[i + 1] = (<Node*>right).kmin
            nd.mgap[i + 1] = (<Node*>right).maxg
        nd.n += 1
        self._set_parent(right, leaf, nd)
        self._refresh_node(nd)

    cdef void _node_remove(self, Node* nd, void* kid) noexcept:
        """Drop child ``kid`` from ``nd``: empty nodes go, a root of one child collapses."""
        cdef int i = self._index_of(nd, kid)
        cdef int m = nd.n - i - 1
        cdef Node* p
        if m > 0:
            memmove(&nd.key[i], &nd.key[i + 1], m * sizeof(uint64_t))
            memmove(&nd.mgap[i], &nd.mgap[i + 1], m * sizeof(uint64_t))
            memmove(&nd.kid[i], &nd.kid[i + 1], m * sizeof(void*))
        nd.n -= 1
        if nd.n == 0:
            # Not the root: a root keeps at least two children (it collapses at one).
            p = nd.parent
            self._give_node(nd)
            if p != NULL:
                self._node_remove(p, nd)
            return
        if nd.parent == NULL and nd.n == 1:
            self._collapse()
            return
        self._refresh_node(nd)

    cdef void _collapse(self) noexcept:
        """While the root is a node of one child, that child becomes the root."""
        cdef Node* nd
        cdef void* only
        while self._height > 0 and (<Node*>self._root).n == 1:
            nd = <Node*>self._root
            only = nd.kid[0]
            self._set_parent(only, nd.leaves, NULL)
            self._root = only
            self._height -= 1
            self._give_node(nd)

    cdef void _unlink_leaf(self, Leaf* lf) noexcept:
        if lf.prev != NULL:
            lf.prev.next = lf.next
        else:
            self._first = lf.next
        if lf.next != NULL:
            lf.next.prev = lf.prev
        else:
            self._lastleaf = lf.prev

    cdef void _move_entries(self, Leaf* dst, int di, Leaf* src, int si, int k) noexcept:
        """Move entries between leaves: both rescan their largest gap on refresh."""
        dst.stale = True
        src.stale = True
        self._shift(dst, di, src, si, k)

    cdef void _shift(self, Leaf* dst, int di, Leaf* src, int si, int k) noexcept:
        # Invariant (callers): 0 <= di, si and di + k, si + k <= CAP.
        memmove(&dst.start[di], &src.start[si], k * sizeof(uint64_t))
        memmove(&dst.last[di], &src.last[si], k * sizeof(uint64_t))
        memmove(&dst.val[di], &src.val[si], k * sizeof(PyObject*))
        if dst.gap != NULL:
            memmove(&dst.gap[di], &src.gap[si], k * sizeof(uint64_t))

    cdef void _ins(self, Leaf* lf, int idx, uint64_t s, uint64_t l, object v) noexcept:
        """Insert segment [s, l] with value ``v`` before entry ``idx`` of ``lf`` (0..n), where
        it belongs in order. Needs the reserve (the caller's public method ran _reserve)."""
        cdef Leaf* nl
        cdef uint64_t k, g
        cdef int m, sp, moved
        if lf.n == CAP and 0 < idx < CAP:
            # A full leaf first hands entries to a sibling with room (as a B*-tree does),
            # so that inserts in the middle keep leaves mostly full instead of halving them.
            nl = lf.next
            if nl != NULL and nl.parent == lf.parent and nl.n <= CAP - SPREAD_MIN:
                moved = (CAP - nl.n) >> 1
                self._shift(nl, moved, nl, 0, nl.n)
                self._move_entries(nl, 0, lf, CAP - moved, moved)
                nl.n += moved
                lf.n -= moved
                self._refresh_leaf(nl)
                self._refresh_leaf(lf)
                if idx > lf.n:
                    idx -= lf.n
                    lf = nl
            else:
                nl = lf.prev
                if nl != NULL and nl.parent == lf.parent and nl.n <= CAP - SPREAD_MIN:
                    moved = (CAP - nl.n) >> 1
                    self._move_entries(nl, nl.n, lf, 0, moved)
                    self._shift(lf, 0, lf, moved, CAP - moved)
                    nl.n += moved
                    lf.n -= moved
                    self._refresh_leaf(lf)
                    self._refresh_leaf(nl)
                    if idx < moved:
                        idx += nl.n - moved
                        lf = nl
                    else:
                        idx -= moved
        if lf.n == CAP:
            # Split in half, but keep leaves full under sequential growth: an append moves
            # nothing (the new leaf holds just the new entry), a prepend moves everything.
            sp = CAP if idx == CAP else (0 if idx == 0 else HALF)
            nl = self._take_leaf()
            self._move_entries(nl, 0, lf, sp, CAP - sp)
            nl.n = CAP - sp
            lf.n = sp
            nl.prev = lf
            nl.next = lf.next
            if lf.next != NULL:
                lf.next.prev = nl
            else:
                self._lastleaf = nl
            lf.next = nl
            self._leaf_summary(nl, &k, &g)
            nl.kmin = k
            nl.maxg = g
            self._node_insert_after(lf.parent, lf, nl, True)
            self._refresh_leaf(lf)
            # (An empty half's summary is refreshed below, once it holds the new entry.)
            if idx > sp or sp == CAP:
                lf = nl
                idx -= sp
        m = lf.n - idx
        if m > 0:
            # Shifted entries keep their gaps: the leaf's largest gap stands.
            self._shift(lf, idx + 1, lf, idx, m)
        if lf.gap != NULL:
            lf.gap[idx] = 0
        lf.start[idx] = s
        lf.last[idx] = l
        Py_INCREF(v)
        lf.val[idx] = <PyObject*>v
        lf.n += 1
        self._count += 1
        self._regap(lf, idx)
        self._regap_next(lf, idx)
        self._refresh_leaf(lf)
        self._at_leaf = lf
        self._at_idx = idx

    cdef int _rm_n(self, Leaf* lf, int i, int k, list out) except -1:
        """Remove entries ``i .. i + k - 1`` of ``lf`` (``1 <= k <= lf.n - i``), appending
        them to ``out`` (if not None) as ``(start, end, value)`` first: that can fail, and
        then nothing has changed. Values are released once the set is consistent."""
        cdef PyObject* vals[CAP]
        cdef bint has_next = i + k < lf.n or lf.next != NULL
        cdef uint64_t nxt = 0
        cdef Leaf* sib
        cdef Leaf* keep = lf
        cdef bint moved = False
        cdef int j, m
        if out is not None:
            for j in range(i, i + k):
                out.append((_key(lf.start[j]), _end(lf.last[j]), <object>lf.val[j]))
        for j in range(k):
            vals[j] = lf.val[i + j]
            if lf.gap != NULL and lf.gap[i + j] == lf.wmax:
                lf.stale = True
        if has_next:
            nxt = lf.start[i + k] if i + k < lf.n else lf.next.start[0]
        m = lf.n - i - k
        if m > 0:
            self._shift(lf, i, lf, i + k, m)
        lf.n -= k
        self._count -= k
        if lf.parent != NULL:
            if lf.n == 0:
                self._unlink_leaf(lf)
                self._node_remove(lf.parent, lf)
                self._give_leaf(lf)
                keep = NULL
                moved = True
            elif lf.n < LOW:
                sib = lf.next
                if sib != NULL and sib.parent == lf.parent and lf.n + sib.n <= MERGED_MAX:
                    self._move_entries(lf, lf.n, sib, 0, sib.n)
                    lf.n += sib.n
                    self._unlink_leaf(sib)
                    self._node_remove(sib.parent, sib)
                    self._give_leaf(sib)
                    moved = True
                else:
                    sib = lf.prev
                    if sib != NULL and sib.parent == lf.parent and lf.n + sib.n <= MERGED_MAX:
                        self._move_entries(sib, sib.n, lf, 0, lf.n)
                        sib.n += lf.n
                        self._unlink_leaf(lf)
                        self._node_remove(lf.parent, lf)
                        self._give_leaf(lf)
                        keep = sib
                        moved = True
        if keep != NULL:
            self._refresh_leaf(keep)
        if has_next:
            # The successor's gap now starts at the removed entries' predecessor.
            if moved:
                j = self._find(nxt, &sib)
            elif i < lf.n:
                sib = lf
                j = i
            else:
                sib = lf.next
                j = 0
            self._regap(sib, j)
            self._refresh_leaf(sib)
        for j in range(k):
            Py_DECREF(<object>vals[j])
        return 0

    cdef void _set_last(self, Leaf* lf, int i, uint64_t l) noexcept:
        lf.last[i] = l
        self._regap_next(lf, i)
        self._refresh_leaf(lf)

    cdef void _set_start(self, Leaf* lf, int i, uint64_t s) noexcept:
        lf.start[i] = s
        self._regap(lf, i)
        self._refresh_leaf(lf)

    cdef void _set_val(self, Leaf* lf, int i, object v, PyObject** old) noexcept:
        Py_INCREF(v)
        old[0] = lf.val[i]
        lf.val[i] = <PyObject*>v

    cdef bint _next_pos(self, Leaf** lf, int* i) noexcept:
        if i[0] + 1 < lf[0].n:
            i[0] += 1
            return True
        if lf[0].next != NULL:
            lf[0] = lf[0].next
            i[0] = 0
            return True
        return False

    cdef bint _prev_pos(self, Leaf** lf, int* i) noexcept:
        if i[0] > 0:
            i[0] -= 1
            return True
        if lf[0].prev != NULL:
            lf[0] = lf[0].prev
            i[0] = lf[0].n - 1
            return True
        return False

    cdef int _split_at(self, uint64_t key) except -1:
        """Make ``key`` a segment boundary if it lies strictly inside a segment (both parts
        keep the value). Needs the reserve."""
        cdef Leaf* lf
        cdef int i = self._find(key, &lf)
        cdef uint64_t l
        if i < 0 or lf.start[i] == key or lf.last[i] < key:
            return 0
        l = lf.last[i]
        self._set_last(lf, i, key - 1)
        self._ins(lf, i + 1, key, l, <object>lf.val[i])
        return 0

    cdef int _first_at_or_after(self, uint64_t key, Leaf** lf) noexcept:
        """The first segment that ends after ``key`` (containing it, or after it): its
        index in ``*lf``, or -1 if none."""
        cdef int i = self._find(key, lf)
        if i >= 0 and lf[0].last[i] >= key:
            return i
        if i < 0:
            # lf is the first leaf.
            return 0 if lf[0].n else -1
        if self._next_pos(lf, &i):
            return i
        return -1

    cdef int _eq(self, PyObject* a, PyObject* b) except -1:
        if a == b:
            return 1
        return PyObject_RichCompareBool(<object>a, <object>b, Py_EQ)

    cdef int _merge_span(self, uint64_t lo, uint64_t hi) except -1:
        """Merge adjacent equal segments from the one containing or before ``lo`` through
        the one starting at or before ``hi`` (merging sets only)."""
        cdef Leaf* lf
        cdef Leaf* nl
        cdef int i, j, r
        cdef uint64_t cur, l
        cdef PyObject* old
        i = self._find(lo, &lf)
        if i < 0:
            if lf.n == 0:
                return 0
            i = 0
        while True:
            nl = lf
            j = i
            if not self._next_pos(&nl, &j):
                return 0
            if nl.start[j] == lf.last[i] + 1:
                r = self._eq(lf.val[i], nl.val[j])
                if r:
                    cur = lf.start[i]
                    l = nl.last[j]
                    self._mod += 1
                    self._rm_n(nl, j, 1, None)
                    i = self._find(cur, &lf)
                    self._set_last(lf, i, l)
                    continue
            if nl.start[j] > hi:
                return 0
            lf = nl
            i = j

    # ------------------------------------------------------------ queries

    @property
    def merges(self):
        """True if adjacent equal segments are always merged (``merge=True``)."""
        return self._merge

    @property
    def has_gap_index(self):
        """True if :meth:`first_large_enough_gap` and friends are available."""
        return self._indexed

    def __len__(self):
        """The number of segments. O(1)."""
        return self._count

    def is_empty(self):
        """True if there are no segments. O(1)."""
        return self._count == 0

    def __iter__(self):
        """Every segment as ``(start, end, value)``, ascending. O(1) per segment."""
        return self._visit(0, U64MAX, False)

    def _visit(self, uint64_t start, uint64_t hi, bint clip):
        # Segments overlapping [start, hi] (inclusive), clipped if asked.
        cdef Leaf* lf
        cdef int i = self._first_at_or_after(start, &lf)
        cdef unsigned long long mod
        cdef uint64_t s, l, resume
        if i < 0:
            return
        while True:
            s = lf.start[i]
            if s > hi:
                return
            l = lf.last[i]
            v = <object>lf.val[i]
            mod = self._mod
            if clip:
                yield (_key(s if s > start else start), _end(l if l < hi else hi), v)
            else:
                yield (_key(s), _end(l), v)
            if l >= hi or l == U64MAX:
                return
            if mod != self._mod:
                # Changed while suspended: our leaf may be gone; resume by key.
                resume = l + 1
                i = self._first_at_or_after(resume, &lf)
                if i < 0:
                    return
                continue
            if not self._next_pos(&lf, &i):
                return

    def last_segment(self):
        """The highest segment as ``(start, end, value)``, or None if empty. O(1)."""
        cdef Leaf* lf = self._lastleaf
        if lf.n == 0:
            return None
        return (_key(lf.start[lf.n - 1]), _end(lf.last[lf.n - 1]), <object>lf.val[lf.n - 1])

    cpdef find_segment(self, key):
        """The segment containing ``key``, or None. O(log n)."""
        cdef uint64_t k
        cdef Leaf* lf
        cdef int i
        _need_key(key, &k)
        i = self._find(k, &lf)
        if i < 0 or lf.last[i] < k:
            return None
        return (_key(lf.start[i]), _end(lf.last[i]), <object>lf.val[i])

    cpdef segment_end(self, start):
        """The end of the segment that starts at ``start``; KeyError if none does. O(log n)."""
        cdef uint64_t k
        cdef Leaf* lf
        cdef int i
        if _u64(start, &k):
            i = self._find(k, &lf)
            if i >= 0 and lf.start[i] == k:
                return _end(lf.last[i])
        raise KeyError(start)

    cpdef get_exact(self, start, end, default):
        """The value of the segment ``[start, end)`` if exactly that segment exists, else
        ``default``. O(log n)."""
        cdef uint64_t k, l
        cdef Leaf* lf
        cdef int i
        if _u64(start, &k) and _end_last(end, &l):
            i = self._find(k, &lf)
            if i >= 0 and lf.start[i] == k and lf.last[i] == l:
                return <object>lf.val[i]
        return default

    cpdef find_gap(self, key):
        """The maximal gap ``(start, end)`` containing ``key``, or None if ``key`` is in a
        segment. O(log n)."""
        cdef uint64_t k
        cdef Leaf* lf
        cdef int i
        _need_key(key, &k)
        i = self._find(k, &lf)
        if i >= 0 and lf.last[i] >= k:
            return None
        return self._gap_around(lf, i)

    cdef tuple _gap_around(self, Leaf* lf, int i):
        """The gap after entry ``i`` of ``lf`` (-1: the gap before the first segment)."""
        cdef object gs
        if i < 0:
            if lf.n == 0:
                return (0, KEY_MAX)
            return (0, _key(lf.start[0]))
        gs = _end(lf.last[i])
        if self._next_pos(&lf, &i):
            return (gs, _key(lf.start[i]))
        return (gs, KEY_MAX)

    cpdef visit_range(self, start, end):
        """The segments overlapping ``[start, end)``, clipped to it, ascending. O(log n) to
        start, then O(1) per segment."""
        cdef uint64_t s, l
        _check_range(start, end)
        if start == end:
            return iter(())
        _need_range(start, end, &s, &l)
        return self._visit(s, l, True)

    cpdef is_fully_covered(self, start, end):
        """True if every key in ``[start, end)`` lies in some segment. O(log n + k)."""
        cdef uint64_t s, l
        cdef Leaf* lf
        cdef int i
        _check_range(start, end)
        if start == end:
            raise ValueError(f"empty range [{start:#x}, {end:#x})")
        _need_range(start, end, &s, &l)
        i = self._find(s, &lf)
        if i < 0 or lf.last[i] < s:
            return False
        while lf.last[i] < l:
            # Covered on only if the next segment starts right after this one.
            if not self._next_pos(&lf, &i) or not self._contiguous_prev(lf, i):
                return False
        return True

    cdef bint _contiguous_prev(self, Leaf* lf, int i) noexcept:
        if i > 0:
            return lf.last[i - 1] + 1 == lf.start[i]
        return lf.prev != NULL and lf.prev.last[lf.prev.n - 1] + 1 == lf.start[i]

    def gaps(self, start=0, end=KEY_MAX):
        """The non-empty gaps overlapping ``[start, end)``, clipped to it, ascending. O(log n)
        per gap."""
        cdef uint64_t s, l
        _check_range(start, end)
        if start == end:
            return iter(())
        _need_range(start, end, &s, &l)
        return self._gaps(s, l)

    def _gaps(self, uint64_t start, uint64_t hi):
        # Gaps overlapping [start, hi] (inclusive), clipped. Keys only across yields.
        cdef Leaf* lf
        cdef int i
        cdef uint64_t p = start, gs, ge_last
        cdef bint tail
        while True:
            i = self._find(p, &lf)
            if i >= 0 and lf.last[i] >= p:
                # p is in a segment: the gap (if any) starts after it.
                if lf.last[i] >= hi or lf.last[i] == U64MAX:
                    return
                p = lf.last[i] + 1
                continue
            gs = lf.last[i] + 1 if i >= 0 else 0
            tail = True
            if i < 0:
                if lf.n:
                    tail = False
                    ge_last = lf.start[0] - 1
                    i = 0
            elif self._next_pos(&lf, &i):
                tail = False
                ge_last = lf.start[i] - 1
            if tail:
                ge_last = U64MAX
            yield (_key(gs if gs > start else start), _end(ge_last if ge_last < hi else hi))
            if ge_last >= hi or tail:
                return
            p = ge_last + 1

    def gaps_descending(self):
        """Every non-empty gap ``(start, end)``, highest first. O(log n) per gap. The caller
        may fill any part of the gap just yielded before asking for the next one."""
        cdef Leaf* lf
        cdef int i
        cdef uint64_t u_last       # the last key below the boundary u
        cdef bint top = True        # u is KEY_MAX
        cdef uint64_t u = 0
        cdef uint64_t seg_end_last, nb
        while True:
            if top:
                u_last = U64MAX
            elif u == 0:
                return
            else:
                u_last = u - 1
            i = self._find(u_last, &lf)
            if i < 0:
                yield (0, KEY_MAX if top else _key(u))
                return
            seg_end_last = lf.last[i]
            nb = lf.start[i]
            if seg_end_last < u_last:
                yield (_end(seg_end_last), KEY_MAX if top else _key(u))
            top = False
            u = nb

    cdef bint _edge_gap(self, uint64_t n, bint first, Leaf** out, int* oi) noexcept:
        """The leftmost (``first``) or rightmost segment with a gap of at least ``n``
        before it: one descent, taking at each node the first child from that side whose
        largest gap is long enough."""
        cdef void* x = self._root
        cdef int h = self._height
        cdef Node* nd
        cdef Leaf* lf
        cdef int i, last, step = 1 if first else -1
        if h == 0:
            if (<Leaf*>x).maxg < n:
                return False
        elif (<Node*>x).maxg < n:
            return False
        while h > 0:
            nd = <Node*>x
            # Invariant: some child's mgap >= n (the parent's summary said so), so the
            # scan stops on it, inside [0, n).
            i, last = (0, nd.n - 1) if first else (nd.n - 1, 0)
            while i != last and nd.mgap[i] < n:
                i += step
            x = nd.kid[i]
            h -= 1
        lf = <Leaf*>x
        i, last = (0, lf.n - 1) if first else (lf.n - 1, 0)
        while i != last and lf.gap[i] < n:
            i += step
        out[0] = lf
        oi[0] = i
        return True

    cdef int _gap_query(self, object n, bint first, Leaf** lf, int* i, uint64_t* gs,
                        uint64_t* glen) except -2:
        """Find the first/last gap of at least ``n``: 1 with its start and length (``*lf``,
        ``*i``: the segment after it, ``*i == lf.n`` for the tail gap), 0 if none, 2 for
        the whole empty key space."""
        cdef uint64_t m, tail_len
        cdef Leaf* ll
        cdef bint have_tail
        if not (_u64(n, &m) and m >= 1):
            # The slow path: errors, and lengths past 2**64 - 1.
            if n < 1:
                raise ValueError(f"gap length must be >= 1, not {n}")
            if not self._indexed:
                raise TypeError("this SegmentSet was created with gap_index=False")
            return 2 if self._count == 0 and n <= KEY_MAX else 0
        if not self._indexed:
            raise TypeError("this SegmentSet was created with gap_index=False")
        if self._count == 0:
            return 2
        ll = self._lastleaf
        tail_len = U64MAX - ll.last[ll.n - 1]
        have_tail = tail_len >= m
        if first:
            if self._edge_gap(m, True, lf, i):
                glen[0] = lf[0].gap[i[0]]
                gs[0] = lf[0].start[i[0]] - glen[0]
                return 1
        elif not have_tail and self._edge_gap(m, False, lf, i):
            glen[0] = lf[0].gap[i[0]]
            gs[0] = lf[0].start[i[0]] - glen[0]
            return 1
        if have_tail:
            lf[0] = ll
            i[0] = ll.n
            gs[0] = ll.last[ll.n - 1] + 1
            glen[0] = tail_len
            return 1
        return 0

    cpdef first_large_enough_gap(self, n):
        """The gap with the lowest start whose length is ``>= n``, or None. O(log n).
        Raises ``TypeError`` with ``gap_index=False``."""
        cdef Leaf* lf
        cdef int i
        cdef uint64_t gs, glen
        r = self._gap_query(n, True, &lf, &i, &gs, &glen)
        if r == 0:
            return None
        if r == 2:
            return (0, KEY_MAX)
        return (_key(gs), _end(gs + (glen - 1)))

    cpdef last_large_enough_gap(self, n):
        """The gap with the highest start whose length is ``>= n``, or None. O(log n)."""
        cdef Leaf* lf
        cdef int i
        cdef uint64_t gs, glen
        r = self._gap_query(n, False, &lf, &i, &gs, &glen)
        if r == 0:
            return None
        if r == 2:
            return (0, KEY_MAX)
        return (_key(gs), _end(gs + (glen - 1)))

    # ------------------------------------------------------------ mutations

    cpdef take_first_gap(self, n, value):
        """First fit: insert ``[gs, gs + n)`` with ``value`` at the start of the first gap of
        length ``>= n`` and return ``gs``; None (changing nothing) if there is none.
        O(log n)."""
        return self._take_gap(n, value, True)

    cpdef take_last_gap(self, n, value):
        """Last fit: insert ``[ge - n, ge)`` at the end of the last gap of length ``>= n`` and
        return its start; None (changing nothing) if there is none. O(log n)."""
        return self._take_gap(n, value, False)

    cdef object _take_gap(self, object n, object value, bint first):
        cdef Leaf* lf
        cdef int i
        cdef uint64_t gs, glen, m, s
        self._reserve()
        r = self._gap_query(n, first, &lf, &i, &gs, &glen)
        if r == 0:
            return None
        if r == 2:
            # The empty set's one gap, [0, KEY_MAX).
            s = 0 if first else <uint64_t>(KEY_MAX - n)
            self.insert_range(_key(s), _key(s) + n, value)
            return _key(s)
        m = <uint64_t>n
        s = gs if first else gs + (glen - m)
        if self._merge:
            self.insert_range(_key(s), _end(s + (m - 1)), value)
            return _key(s)
        self._mod += 1
        self._ins(lf, i, s, s + (m - 1), value)
        return _key(s)

    cpdef insert_range(self, start, end, value):
        """Add the segment ``[start, end)`` with ``value``; it must lie within one gap.
        Raises ValueError, changing nothing, if it overlaps a segment. O(log n)."""
        cdef uint64_t s, l, ge_last
        cdef Leaf* lf
        cdef Leaf* nl
        cdef int i, j
        cdef bint has_next
        if not (_u64(start, &s) and _end_last(end, &l) and s <= l):
            raise ValueError(f"invalid range [{start:#x}, {end:#x})")
        i = self._find(s, &lf)
        if i >= 0 and lf.last[i] >= s:
            raise ValueError(
                f"[{start:#x}, {end:#x}) overlaps segment "
                f"[{_key(lf.start[i]):#x}, {_end(lf.last[i]):#x})"
            )
        nl = lf
        j = i
        if i < 0:
            has_next = lf.n > 0
            j = 0
        else:
            has_next = self._next_pos(&nl, &j)
        if has_next and nl.start[j] <= l:
            gs = _end(lf.last[i]) if i >= 0 else 0
            raise ValueError(
                f"[{start:#x}, {end:#x}) is not within a gap "
                f"(the gap at {max(start, gs):#x} is [{gs:#x}, {_key(nl.start[j]):#x}))"
            )
        self._reserve()
        self._mod += 1
        self._ins(lf, i + 1, s, l, value)
        if self._merge:
            self._merge_span(s - 1 if s else 0, l)

    cpdef replace_value(self, start, value):
        """Set the value of the segment that starts at ``start`` (KeyError if none does,
        changing nothing); a merging set then merges it with equal neighbours. O(log n)."""
        cdef uint64_t k
        cdef Leaf* lf
        cdef int i
        cdef PyObject* old
        if _u64(start, &k):
            i = self._find(k, &lf)
            if i >= 0 and lf.start[i] == k:
                self._mod += 1
                self._set_val(lf, i, value, &old)
                try:
                    if self._merge:
                        self._merge_span(k - 1 if k else 0, lf.last[i])
                finally:
                    Py_DECREF(<object>old)
                return
        raise KeyError(start)

    cpdef remove_range(self, start, end):
        """Remove every part of every segment inside ``[start, end)``; straddling segments
        are split. O(log n) per segment removed."""
        self._remove(start, end, None)

    cpdef pop_range(self, start, end):
        """As :meth:`remove_range`, returning the removed pieces ``(start, end, value)``
        (clipped to the range), ascending. Same cost."""
        out = []
        self._remove(start, end, out)
        return out

    cdef int _remove(self, object start, object end, list out) except -1:
        cdef uint64_t s, l
        cdef Leaf* lf
        cdef int i, j
        _check_range(start, end)
        if start == end:
            return 0
        _need_range(start, end, &s, &l)
        i = self._first_at_or_after(s, &lf)
        if i < 0 or lf.start[i] > l:
            return 0
        self._reserve()
        self._mod += 1
        self._split_at(s)
        if l != U64MAX:
            self._reserve()
            self._split_at(l + 1)
        while True:
            # After the splits every segment starting in [s, l] lies inside it: remove a
            # leaf's run of them at a time.
            i = self._first_at_or_after(s, &lf)
            if i < 0 or lf.start[i] > l:
                return 0
            j = i + 1
            while j < lf.n and lf.start[j] <= l:
                j += 1
            self._rm_n(lf, i, j - i, out)

    cpdef refine(self, start, cuts, values):
        """Split the segment that starts at ``start`` at ``cuts`` and give the pieces
        ``values`` (one more than cuts; merging sets then merge). Raises ValueError,
        changing nothing, on bad input. O(k log n) for k cuts."""
        cdef uint64_t k, seg_last, c
        cdef Leaf* lf
        cdef int i, x
        cdef PyObject* old
        cdef Py_ssize_t ncuts
        i = -1
        if _u64(start, &k):
            i = self._find(k, &lf)
            if i >= 0 and lf.start[i] != k:
                i = -1
        if i < 0:
            raise ValueError(f"no segment starts at {start:#x}")
        cuts = list(cuts)
        values = list(values)
        ncuts = len(cuts)
        if len(values) != ncuts + 1:
            raise ValueError(f"{ncuts} cuts need {ncuts + 1} values, not {len(values)}")
        seg_last = lf.last[i]
        end = _end(seg_last)
        if ncuts:
            if not start < cuts[0] or not cuts[ncuts - 1] < end:
                raise ValueError(f"cuts outside the segment [{start:#x}, {end:#x})")
            for x in range(ncuts):
                if not PyLong_Check(cuts[x]):
                    raise TypeError(f"cuts must be ints, not {type(cuts[x]).__name__}")
                if x + 1 < ncuts and not cuts[x] < cuts[x + 1]:
                    raise ValueError("cuts are not strictly ascending")
        # Every cut is now an int strictly inside the segment, hence a valid key.
        self._mod += 1
        self._set_val(lf, i, values[0], &old)
        Py_DECREF(<object>old)
        for x in range(ncuts):
            _u64(cuts[x], &c)
            self._reserve()
            # Trim the last piece made to end before the cut; the next starts there.
            self._set_last(lf, i, c - 1)
            self._ins(lf, i + 1, c, seg_last, values[x + 1])
            lf = self._at_leaf
            i = self._at_idx
        if self._merge:
            self._merge_span(k - 1 if k else 0, seg_last)

    cpdef mutate_range(self, start, end, fn):
        """Set each segment ``(s, e, v)`` overlapping ``[start, end)`` to ``fn(s, e, v)``
        (straddling segments split so that ``fn`` sees only the range's part), ascending.
        Merging sets then merge, across the edges too. If ``fn`` raises, the segments
        already visited keep their new values and the set stays consistent. ``fn`` must
        not change the set (RuntimeError). O(log n) per segment."""
        cdef uint64_t s, l, cs, cl, segs, segl, pos
        cdef Leaf* lf
        cdef int i
        cdef unsigned long long mod
        cdef PyObject* old
        _check_range(start, end)
        if start == end:
            return
        _need_range(start, end, &s, &l)
        pos = s
        try:
            while True:
                i = self._first_at_or_after(pos, &lf)
                if i < 0 or lf.start[i] > l:
                    return
                segs = lf.start[i]
                segl = lf.last[i]
                cs = segs if segs > s else s
                cl = segl if segl < l else l
                v = <object>lf.val[i]
                mod = self._mod
                nv = fn(_key(cs), _end(cl), v)
                if mod != self._mod:
                    raise RuntimeError("mutate_range: the callback changed the set")
                if not (self._merge and (nv is v or nv == v)):
                    self._reserve()
                    self._mod += 1
                    if cs > segs:
                        self._split_at(cs)
                    if cl < segl:
                        self._reserve()
                        self._split_at(cl + 1)
                    i = self._find(cs, &lf)
                    self._set_val(lf, i, nv, &old)
                    Py_DECREF(<object>old)
                if cl >= l or cl == U64MAX:
                    return
                pos = cl + 1
        finally:
            if self._merge:
                self._merge_span(s - 1 if s else 0, l)

    def merge_all(self):
        """Merge every pair of adjacent segments with equal values. O(n log n) worst case."""
        self._merge_span(0, U64MAX)

    # ------------------------------------------------------------ checking

    def check_invariants(self):
        """Raise AssertionError if the structure is inconsistent: the tree's shape, parent
        pointers, cached summaries, leaf links, order, gaps and (merging sets) maximality.
        O(n)."""
        cdef Leaf* lf
        cdef Leaf* prevleaf = NULL
        cdef int i, j
        cdef Py_ssize_t total = 0
        cdef uint64_t prev_end = 0
        cdef bint have_prev = False
        leaves = []
        self._check_node(self._root, self._height, NULL, leaves)
        lf = self._first
        i = 0
        while lf != NULL:
            if i >= len(leaves) or <size_t>lf != leaves[i]:
                raise AssertionError("leaf list does not follow the tree's order")
            if lf.prev != prevleaf:
                raise AssertionError("leaf prev link is wrong")
            if lf.n == 0 and (self._height > 0 or self._count):
                raise AssertionError("an empty leaf outside an empty root")
            for j in range(lf.n):
                if lf.last[j] < lf.start[j]:
                    raise AssertionError(f"bad segment at {lf.start[j]:#x}")
                if have_prev and lf.start[j] < prev_end:
                    raise AssertionError(f"segment at {lf.start[j]:#x} overlaps its predecessor")
                if self._merge and have_prev and lf.start[j] == prev_end:
                    pv = <object>lf.val[j - 1] if j > 0 else <object>lf.prev.val[lf.prev.n - 1]
                    if pv == <object>lf.val[j]:
                        raise AssertionError(
                            f"adjacent segments with equal values at {lf.start[j]:#x} were "
                            "not merged"
                        )
                if self._indexed:
                    want = lf.start[j] - (prev_end if have_prev else 0)
                    if lf.gap[j] != want:
                        raise AssertionError(f"wrong gap before {lf.start[j]:#x}")
                total += 1
                have_prev = True
                prev_end = lf.last[j] + 1 if lf.last[j] != U64MAX else U64MAX
            if lf.next == NULL and self._lastleaf != lf:
                raise AssertionError("last leaf pointer is wrong")
            prevleaf = lf
            lf = lf.next
            i += 1
        if i != len(leaves):
            raise AssertionError("leaf list is shorter than the tree")
        if total != self._count:
            raise AssertionError(f"count {self._count} != {total} segments")

    cdef _check_node(self, void* x, int h, Node* parent, list leaves):
        """Check a subtree; returns its (kmin, maxg)."""
        cdef Node* nd
        cdef Leaf* lf
        cdef uint64_t k, g
        cdef int i
        if h == 0:
            lf = <Leaf*>x
            if lf.parent != parent:
                raise AssertionError("leaf parent pointer is wrong")
            if not 0 <= lf.n <= CAP or (parent != NULL and lf.n == 0):
                raise AssertionError(f"leaf holds {lf.n} entries")
            self._leaf_summary(lf, &k, &g)
            if k != lf.kmin or g != lf.maxg or (not lf.stale and lf.gap != NULL and g != lf.wmax):
                raise AssertionError("stale leaf summary")
            leaves.append(<size_t>lf)
            return (k, g)
        nd = <Node*>x
        if nd.parent != parent:
            raise AssertionError("node parent pointer is wrong")
        if not 1 <= nd.n <= CAP or (parent == NULL and nd.n < 2):
            raise AssertionError(f"node holds {nd.n} children")
        if bool(nd.leaves) != (h == 1):
            raise AssertionError("node's leaf flag is wrong")
        for i in range(nd.n):
            ck, cg = self._check_node(nd.kid[i], h - 1, nd, leaves)
            if nd.key[i] != ck or nd.mgap[i] != cg:
                raise AssertionError("node entry disagrees with its child")
        self._node_summary(nd, &k, &g)
        if k != nd.kmin or g != nd.maxg:
            raise AssertionError("stale node summary")
        return (k, g)

    def _test_corrupt(self, what):
        """Break one invariant on purpose (tests of :meth:`check_invariants` only)."""
        cdef Leaf* lf = self._first
        if lf.n == 0:
            raise ValueError("nothing to corrupt in an empty set")
        if what == "gap":
            if lf.gap == NULL:
                raise ValueError("no gap index")
            lf.gap[0] += 1
        elif what == "summary":
            lf.maxg += 1
        elif what == "value" and lf.n >= 2:
            # Make two adjacent segments equal without merging them.
            Py_DECREF(<object>lf.val[1])
            Py_INCREF(<object>lf.val[0])
            lf.val[1] = lf.val[0]
        else:
            raise ValueError(f"cannot corrupt {what!r} here")

    # ------------------------------------------------------------ display

    def merged(self):
        """The maximal runs of equal values ``(start, end, value)``, ascending. O(n)."""
        return merged_runs(self)

    def __str__(self):
        """One ``[start, end): value`` line per maximal run, like gVisor's ``Set.String``."""
        return format_runs(self)

    def __repr__(self):
        body = ", ".join(f"[{s:#x}, {e:#x}): {v!r}" for s, e, v in self)
        return f"SegmentSet(merge={self._merge}, {{{body}}})"
