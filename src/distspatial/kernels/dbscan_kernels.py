"""Exact, Ray-free kernels for distributed DBSCAN (same result as ``sklearn.cluster.DBSCAN``).

Distributed protocol
--------------------
The points are split into partitions (disjoint sets of points with int64 global ids and a bounding box).
The *halo* of a partition is every point of the other partitions inside its box expanded by ``eps`` on
every side (bounds included), so every ``eps``-neighbour of an owned point is owned or in the halo.
Extra halo points are harmless, so expanding by slightly more, e.g. ``eps * (1 + 1e-9)``, is
recommended against rounding in the box test.

1. Round 1, on the nodes: :func:`core_flags` ``(owned, halo) -> core flag of every owned point``.
2. Round 2, on the nodes, with the halo fetched again together with the halo points' core flags (computed
   by their owners in round 1): :func:`local_clusters` ``-> (labels, link_comp, link_halo_rows)``.
   ``labels`` are local component ids (or -1) of the owned points; ``link_comp[k]`` is the local
   component of the halo core point in row ``link_halo_rows[k]`` of ``halo``.
3. On the coordinator: :func:`merge_labels` joins, for each halo core point, the component of the
   partition that saw it in its halo with the component of its owner, and returns the final labels.

:func:`dbscan` runs the three steps for one partition (a single-node DBSCAN).

Exactness
---------
"``x`` and ``y`` are within ``eps``" means exactly what sklearn's KD-tree (the algorithm
``DBSCAN`` uses for Euclidean data with at most 15 dimensions) tests: the squared differences
``(x_0-y_0)**2 + (x_1-y_1)**2 + ...`` summed sequentially over the dimensions in float64 are
``<= eps * eps``.  Every decision here ends with that test on the actual pair of points; the KD-tree
(scipy's ``cKDTree``) and the grid only select candidates (with a radius enlarged by a relative
``1e-12``), so ties at exactly ``eps`` (lattice data) come out as in sklearn.  Core points, noise
points and the clusters restricted to core points are then identical to sklearn's; a border point (a
non-core point within ``eps`` of core points of several clusters) gets the cluster of one of them, as
in sklearn (which picks by processing order).  (sklearn uses brute force, with a differently rounded
distance, for fewer than 10 points or more than 15 dimensions: ties at exactly ``eps`` may differ there.)

Bounded memory
--------------
No function materialises all pairs within ``eps``.  Identical points are merged first (with a
multiplicity).  A uniform grid with cell side slightly below ``eps / sqrt(d)`` is used: the points of a
cell are pairwise within ``eps`` (so a cell holding ``min_samples`` points makes them all core, and the
core points of a cell are one clique).  Pairs are enumerated only between points of "sparse" cells
(fewer than ``_DENSE_CELL`` distinct core points), in chunks of at most ``max_pairs``: either proven
by the grid (a sparse point has at most ``(_DENSE_CELL - 1) * stencil`` sparse neighbours) or counted
beforehand with ``cKDTree.count_neighbors``.  "Dense" cells are linked cell to cell: first by testing
one representative point of each (a cheap positive witness), then, only for pairs of cells not yet in
one component, by nearest-neighbour queries or small brute-force blocks.  Core flags of points in
cells with fewer than ``min_samples`` points come from a ``min_samples``-nearest-neighbour query.
Peak extra memory is ``O(n * d)`` plus up to about 90 bytes per unit of ``max_pairs`` (default
``2**20``).

Cost: dense and duplicate-heavy data cost ``O(n log n)`` whatever the number of pairs within eps.
Sparse regions cost about the number of pairs within eps, like sklearn (in 4+ dimensions with many
neighbours per point, the grid helps little and the pair counting about doubles that cost).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple, Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

__all__ = [
    "DEFAULT_MAX_PAIRS",
    "core_flags",
    "local_clusters",
    "PartLabels",
    "merge_labels",
    "dbscan",
]

#: Default budget of candidate pairs held in memory at once (up to about 90 bytes each at the peak).
DEFAULT_MAX_PAIRS = 1 << 20

_U = float(np.finfo(np.float64).eps)
#: A cell with at least this many distinct core points is linked cell-to-cell ("dense"), a
#: smaller one through its point pairs.
_DENSE_CELL = 16
#: Resolve (query point, dense cell) items by brute force while items * cell size stays below this;
#: larger groups query a KD-tree of the cell.
_BRUTE_WORK = 1 << 15
#: ... provided the cell has more than this many points.
_TREE_MIN_CELL = 64


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------


def _as_points(points, name: str, d: int | None = None) -> np.ndarray:
    if points is None and d is not None:
        return np.zeros((0, d))
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim == 1 and arr.size == 0 and d is not None:
        arr = arr.reshape(0, d)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-D array (n, d) with d >= 1, got shape {arr.shape}")
    if d is not None and arr.shape[1] != d:
        raise ValueError(f"{name} has {arr.shape[1]} dimensions, expected {d}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    # x + 0.0 turns -0.0 into 0.0 (identical points then have identical bytes)
    return np.ascontiguousarray(arr) + 0.0


def _as_flags(flags, n: int, name: str) -> np.ndarray:
    arr = np.asarray(flags)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    if arr.dtype != np.bool_:
        if not np.all((arr == 0) | (arr == 1)):
            raise ValueError(f"{name} must be boolean")
        arr = arr.astype(bool)
    return arr


def _check_eps(eps) -> float:
    eps = float(eps)
    if not (eps > 0.0 and math.isfinite(eps)) or eps * eps == 0.0 or not math.isfinite(eps * eps):
        raise ValueError(f"eps must be a positive finite number (with eps*eps finite and > 0), got {eps}")
    return eps


def _check_max_pairs(max_pairs) -> int:
    max_pairs = int(max_pairs)
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    return max_pairs


def _radius(eps: float, d: int) -> float:
    """Candidate radius: every pair within ``eps`` (exact test) has cKDTree distance below it."""
    return eps * (1.0 + 1e-12 + 8.0 * (d + 3) * _U)


def _unique_int(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer array (sort-based; faster than np.unique here)."""
    a = np.sort(a)
    if a.size > 1:
        keep = np.empty(a.size, dtype=bool)
        keep[0] = True
        np.not_equal(a[1:], a[:-1], out=keep[1:])
        a = a[keep]
    return a


# --------------------------------------------------------------------------
# exact distance test, dedup, grid
# --------------------------------------------------------------------------


def _sqdist(A: np.ndarray, ia: np.ndarray, B: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """``|A[ia] - B[ib]|**2`` row-wise, summed sequentially over the dimensions (as sklearn's KD-tree)."""
    diff = A[ia, 0] - B[ib, 0]
    s = diff * diff
    for j in range(1, A.shape[1]):
        diff = A[ia, j] - B[ib, j]
        diff *= diff
        s += diff
    return s


def _dedup(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct rows of ``X``: ``(U, inv, mult)`` with ``X == U[inv]`` and ``mult`` the multiplicities.

    Rows are grouped by a 64-bit hash of their bytes, then compared exactly (a hash collision only
    splits a group of identical rows, it never merges different rows).
    """
    n = X.shape[0]
    if n == 0:
        return X.copy(), np.zeros(0, np.intp), np.zeros(0, np.intp)
    b = X.view(np.uint64)
    h = b[:, 0] * np.uint64(0x9E3779B97F4A7C15)
    for j in range(1, X.shape[1]):
        h ^= h >> np.uint64(29)
        h += b[:, j]
        h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(32)
    order = np.argsort(h)
    hs = h[order]
    Xs = X[order]
    new = np.ones(n, dtype=bool)
    new[1:] = (hs[1:] != hs[:-1]) | np.any(Xs[1:] != Xs[:-1], axis=1)
    gid = np.cumsum(new) - 1
    inv = np.empty(n, dtype=np.intp)
    inv[order] = gid
    return Xs[new], inv, np.bincount(gid)


def _grid_cells(X: np.ndarray, eps: float) -> tuple[np.ndarray, int, bool]:
    """``(cell, K, is_grid)``: cell id (0..K-1) of every row of ``X``; any two rows of one cell are within
    ``eps`` (exact test).  ``is_grid`` tells whether the cells are those of the grid (else singletons).

    The cell side is ``eps / sqrt(d)`` reduced by a relative 1e-9 and by a bound on the rounding of
    the cell computation, so the guarantee holds for the computed cells.  When ``eps`` is far too
    small for the coordinate range every row is its own cell.
    """
    n, d = X.shape
    if n == 0:
        return np.zeros(0, np.intp), 0, False
    lo = X.min(axis=0)
    span = X.max(axis=0) - lo
    side = eps / math.sqrt(d) * (1.0 - 1e-9) - 16.0 * _U * float(span.max())
    if not side > 0.25 * eps / math.sqrt(d) or float(span.max()) / side > 2.0**50:
        return np.arange(n, dtype=np.intp), n, False
    t = np.floor((X - lo) / side).astype(np.int64)
    dims = [int(v) + 1 for v in t.max(axis=0)]
    if math.prod(dims) < 2**62:
        key = t[:, 0].copy()
        for j in range(1, d):
            key *= dims[j]
            key += t[:, j]
        _, cell = np.unique(key, return_inverse=True)
    else:
        _, cell = np.unique(t, axis=0, return_inverse=True)
    cell = cell.reshape(-1).astype(np.intp, copy=False)
    return cell, int(cell.max()) + 1, True


# --------------------------------------------------------------------------
# candidate pairs, chunked
# --------------------------------------------------------------------------


def _cross_pairs(Q: np.ndarray, tree: cKDTree, r: float, max_pairs: int):
    """Yield ``(qi, tj)`` covering every (row of ``Q``, point of ``tree``) at cKDTree distance <= ``r``.

    Chunks hold at most ``max_pairs`` pairs (unless one query row alone has more); each chunk is a
    contiguous range of the leaf order of a KD-tree of ``Q`` (spatially compact), sized with
    ``count_neighbors``.
    """
    if Q.shape[0] == 0 or tree.n == 0:
        return
    tq = cKDTree(Q)
    total = int(tq.count_neighbors(tree, r))
    if total == 0:
        return
    if total <= max_pairs:
        m = tq.sparse_distance_matrix(tree, r, output_type="ndarray")
        yield m["i"].astype(np.intp, copy=False), m["j"].astype(np.intp, copy=False)
        return
    order = tq.indices
    n = Q.shape[0]
    step = max(1, int(n * (max_pairs / total)))
    stack = [(a, min(a + step, n)) for a in range(0, n, step)][::-1]
    while stack:
        a, b = stack.pop()
        sel = order[a:b]
        sub = cKDTree(Q[sel])
        c = int(sub.count_neighbors(tree, r))
        if c == 0:
            continue
        if c > max_pairs and b - a > 1:
            mid = (a + b) // 2
            stack.append((mid, b))
            stack.append((a, mid))
            continue
        m = sub.sparse_distance_matrix(tree, r, output_type="ndarray")
        yield sel[m["i"]], m["j"].astype(np.intp, copy=False)


def _self_pairs(S: np.ndarray, r: float, max_pairs: int, bound: int | None = None):
    """Yield ``(i, j)`` covering every unordered pair of rows of ``S`` at cKDTree distance <= ``r`` once.

    ``bound``, when given, is a proven upper bound on the number of rows within ``r`` of any row
    (itself included).  Chunks hold at most ``max_pairs`` pairs.  The rows are cut into blocks
    (contiguous ranges of a KD-tree's leaf order, so spatially compact), sized from a sampled density;
    every block is paired with itself (``query_pairs``) and with each later block whose box is within
    ``r`` (``sparse_distance_matrix``), so every pair is produced once.  A block pair whose size is not
    covered by ``bound`` is counted first (``count_neighbors``) and split while over the budget.
    """
    n = S.shape[0]
    if n < 2:
        return
    tree = cKDTree(S)
    if bound is not None and n * bound <= 2 * max_pairs:
        p = tree.query_pairs(r, output_type="ndarray")
        if p.shape[0]:
            yield p[:, 0].astype(np.intp, copy=False), p[:, 1].astype(np.intp, copy=False)
        return
    order = tree.indices.astype(np.intp, copy=False)
    sample = order[np.linspace(0, n - 1, min(n, 256)).astype(np.intp)]
    avg = max(1.0, float(np.mean(tree.query_ball_point(S[sample], r, return_length=True))))
    size = max(1, int(max_pairs / avg))
    if size >= n:
        blocks = [_Block(S, np.arange(n, dtype=np.intp), tree)]
    else:
        blocks = [_Block(S, order[a:a + size]) for a in range(0, n, size)]
    lo = np.array([b.lo for b in blocks])
    hi = np.array([b.hi for b in blocks])
    for i, bi in enumerate(blocks):
        yield from _block_pairs(S, bi, bi, r, max_pairs, bound)
        if i + 1 < len(blocks):
            gap = np.maximum(np.maximum(lo[i + 1:] - hi[i], lo[i] - hi[i + 1:]), 0.0)
            near = np.flatnonzero(np.sqrt(np.sum(gap * gap, axis=1)) <= r * (1.0 + 1e-9))
            for j in near:
                yield from _block_pairs(S, bi, blocks[i + 1 + j], r, max_pairs, bound)


class _Block:
    """Rows of a point set (spatially compact), with their KD-tree and bounding box."""

    def __init__(self, S: np.ndarray, rows: np.ndarray, tree: cKDTree | None = None):
        self.rows = rows
        pts = S[rows]
        self.tree = cKDTree(pts) if tree is None else tree
        self.lo = pts.min(axis=0)
        self.hi = pts.max(axis=0)

    def halves(self, S: np.ndarray) -> tuple["_Block", "_Block"]:
        # the tree's leaf order is spatially coherent: split it in two contiguous halves
        o = self.rows[self.tree.indices]
        mid = o.size // 2
        return _Block(S, o[:mid]), _Block(S, o[mid:])


def _block_pairs(S: np.ndarray, a: _Block, b: _Block, r: float, max_pairs: int, bound: int | None):
    """Pairs of rows (one of ``a``, one of ``b``; unordered pairs within ``a`` when ``a is b``)."""
    same = a is b
    if bound is None or a.rows.size * bound > max_pairs:
        c = int(a.tree.count_neighbors(b.tree, r))
        if same:
            c = (c - a.rows.size) // 2
        if c == 0:
            return
        if c > max_pairs and a.rows.size > 1:
            h1, h2 = a.halves(S)
            if same:
                yield from _block_pairs(S, h1, h1, r, max_pairs, bound)
                yield from _block_pairs(S, h2, h2, r, max_pairs, bound)
                yield from _block_pairs(S, h1, h2, r, max_pairs, bound)
            else:
                yield from _block_pairs(S, h1, b, r, max_pairs, bound)
                yield from _block_pairs(S, h2, b, r, max_pairs, bound)
            return
    if same:
        p = a.tree.query_pairs(r, output_type="ndarray")
        if p.shape[0]:
            yield a.rows[p[:, 0]], a.rows[p[:, 1]]
    else:
        m = a.tree.sparse_distance_matrix(b.tree, r, output_type="ndarray")
        if m.shape[0]:
            yield a.rows[m["i"]], b.rows[m["j"]]


def _stencil_size(d: int) -> int:
    """Number of grid cells (side ``eps / sqrt(d)``) whose box is within ``eps`` of a given cell's box.

    Offsets ``o`` with ``sum(max(|o_j| - 1, 0) ** 2) <= d``; per dimension ``v = max(|o_j| - 1, 0)`` is
    0 for three offsets and ``v >= 1`` for two.
    """
    ways = [1] + [0] * d  # ways[s]: offsets of the dimensions so far with sum of v**2 == s
    vmax = math.isqrt(d)
    for _ in range(d):
        nxt = [0] * (d + 1)
        for sq, w in enumerate(ways):
            if w:
                for v in range(vmax + 1):
                    t = sq + v * v
                    if t > d:
                        break
                    nxt[t] += w * (3 if v == 0 else 2)
        ways = nxt
    return sum(ways)


def _ball_hits(tree: cKDTree, T: np.ndarray, Q: np.ndarray, rows: np.ndarray, r: float, eps2: float,
               max_pairs: int):
    """Yield ``(k, tj)``: ``Q[rows[k]]`` and ``T[tj]`` within eps (exact test), every such pair once.

    Used for the rare rows whose nearest-neighbour answer is ambiguous (a candidate at cKDTree distance
    between ``eps`` and ``r`` that fails the exact test).
    """
    if rows.size == 0:
        return
    lens = np.asarray(tree.query_ball_point(Q[rows], r, return_length=True), dtype=np.intp)
    csum = np.cumsum(lens)
    a = 0
    while a < rows.size:
        base = int(csum[a - 1]) if a else 0
        b = max(a + 1, int(np.searchsorted(csum, base + max_pairs, side="right")))
        lists = tree.query_ball_point(Q[rows[a:b]], r, return_sorted=False)
        cnt = lens[a:b]
        tj = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.intp, count=int(cnt.sum()))
        k = np.repeat(np.arange(a, b, dtype=np.intp), cnt)
        ok = _sqdist(Q, rows[k], T, tj) <= eps2
        yield k[ok], tj[ok]
        a = b


def _nearest_within(tree: cKDTree, T: np.ndarray, Q: np.ndarray, rows: np.ndarray, r: float, eps2: float,
                    max_pairs: int, workers: int) -> np.ndarray:
    """For each ``Q[rows[k]]`` the index of one point of ``T`` within eps (exact test), or -1."""
    out = np.full(rows.size, -1, dtype=np.intp)
    if rows.size == 0 or T.shape[0] == 0:
        return out
    step = max(1, max_pairs)
    for a in range(0, rows.size, step):
        qr = rows[a:a + step]
        _, idx = tree.query(Q[qr], k=1, distance_upper_bound=r, workers=workers)
        fin = np.flatnonzero(idx < T.shape[0])
        ok = _sqdist(Q, qr[fin], T, idx[fin]) <= eps2
        out[a + fin[ok]] = idx[fin[ok]]
        amb = fin[~ok]
        for k, tj in _ball_hits(tree, T, Q, qr[amb], r, eps2, max_pairs):
            out[a + amb[k[::-1]]] = tj[::-1]  # any hit will do
    return out


# --------------------------------------------------------------------------
# union-find over cells (vectorised)
# --------------------------------------------------------------------------


class _UnionFind:
    """Union-find on ``0..n-1``; a root is the smallest index of its set (parent[x] <= x always)."""

    def __init__(self, n: int):
        self.n = n
        self.parent = np.arange(n, dtype=np.intp)

    def find(self, v: np.ndarray) -> np.ndarray:
        p = self.parent
        r = p[v]
        while True:
            rr = p[r]
            if np.array_equal(rr, r):
                break
            r = rr
        p[v] = r
        return r

    def flatten(self) -> np.ndarray:
        p = self.parent
        while True:
            pp = p[p]
            if np.array_equal(pp, p):
                break
            p = pp
        self.parent = p
        return p

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.size == 0:
            return
        ra, rb = self.find(a), self.find(b)
        m = ra != rb
        if not m.any():
            return
        ra, rb = ra[m], rb[m]
        n = self.n
        if ra.size > 256:
            key = _unique_int(np.minimum(ra, rb) * n + np.maximum(ra, rb))
            ra, rb = key // n, key % n
        if ra.size > max(4096, n >> 6):
            # many links: one connected_components over all nodes, O(n + links)
            p = self.flatten()
            g = coo_matrix((np.ones(ra.size, dtype=np.int8), (ra, rb)), shape=(n, n)).tocsr()
            _, lab = connected_components(g, directed=False)
            rep = np.full(int(lab.max()) + 1, n, dtype=np.intp)
            np.minimum.at(rep, lab, np.arange(n, dtype=np.intp))
            self.parent = rep[lab[p]]
            return
        while True:
            np.minimum.at(self.parent, np.maximum(ra, rb), np.minimum(ra, rb))
            ra, rb = self.find(ra), self.find(rb)
            m = ra != rb
            if not m.any():
                return
            ra, rb = ra[m], rb[m]


# --------------------------------------------------------------------------
# connected components of the core graph
# --------------------------------------------------------------------------


def _box_sqdist(lo: np.ndarray, hi: np.ndarray, ia: np.ndarray, P: np.ndarray, ip: np.ndarray) -> np.ndarray:
    """Squared distance from ``P[ip]`` to the box ``[lo[ia], hi[ia]]`` (<= its distance to any point in it)."""
    s = np.zeros(ia.size)
    for j in range(P.shape[1]):
        x = P[ip, j]
        g = np.maximum(np.maximum(lo[ia, j] - x, x - hi[ia, j]), 0.0)
        s += g * g
    return s


def _box_box_sqdist(lo: np.ndarray, hi: np.ndarray, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    s = np.zeros(ia.size)
    for j in range(lo.shape[1]):
        g = np.maximum(np.maximum(lo[ib, j] - hi[ia, j], lo[ia, j] - hi[ib, j]), 0.0)
        s += g * g
    return s


class _CoreGraph:
    """Components of the graph over distinct core points ``P`` (edges: pairs within eps)."""

    def __init__(self, P: np.ndarray, eps: float, max_pairs: int, workers: int):
        self.eps2 = eps * eps
        self.r = _radius(eps, P.shape[1])
        self.box_tol = self.eps2 * (1.0 + 1e-9)
        self.max_pairs = max_pairs
        self.workers = workers
        cell, K, self.is_grid = _grid_cells(P, eps)
        order = np.argsort(cell, kind="stable")
        self.order = order
        self.P = P[order]  # sorted by cell
        self.cell = cell[order]
        self.K = K
        self.count = np.bincount(self.cell, minlength=K)
        self.start = np.zeros(K, dtype=np.intp)
        np.cumsum(self.count[:-1], out=self.start[1:])
        self.uf = _UnionFind(K)

    # -- the phases ---------------------------------------------------------

    def components(self) -> tuple[np.ndarray, int]:
        """Component id (0..C-1) of every row of ``P`` (in the caller's order) and C."""
        if self.K == 0:
            return np.zeros(0, np.intp), 0
        dense = self.count >= _DENSE_CELL
        sparse_rows = np.flatnonzero(~dense[self.cell])
        self._sparse_pairs(sparse_rows)
        dense_cells = np.flatnonzero(dense)
        if dense_cells.size:
            self._dense_links(dense_cells, sparse_rows)
        root = self.uf.flatten()
        _, comp_cell = np.unique(root, return_inverse=True)
        comp_cell = comp_cell.reshape(-1)
        comp = np.empty(self.P.shape[0], dtype=np.intp)
        comp[self.order] = comp_cell[self.cell]
        return comp, int(comp_cell.max()) + 1

    def _sparse_pairs(self, rows: np.ndarray) -> None:
        """Link the cells of all pairs of sparse-cell points within eps."""
        if rows.size == 0:
            return
        S = self.P[rows]
        cs = self.cell[rows]
        # every sparse neighbour of a sparse point lies in one of the stencil cells around its cell
        bound = (_DENSE_CELL - 1) * _stencil_size(S.shape[1]) if self.is_grid else None
        for i, j in _self_pairs(S, self.r, self.max_pairs, bound=bound):
            keep = np.flatnonzero(cs[i] != cs[j])
            i, j = i[keep], j[keep]
            ok = _sqdist(S, i, S, j) <= self.eps2
            self.uf.union(cs[i[ok]], cs[j[ok]])

    def _dense_links(self, D: np.ndarray, sparse_rows: np.ndarray) -> None:
        P, cell, start = self.P, self.cell, self.start
        lo = np.minimum.reduceat(P, start, axis=0)
        hi = np.maximum.reduceat(P, start, axis=0)
        centre = 0.5 * (lo + hi)
        half = 0.5 * np.sqrt(np.sum((hi - lo) ** 2, axis=1))
        pad = 1e-9 * self.r + 64.0 * _U * float(np.abs(P).max())
        # representative of each dense cell: its point nearest its box centre
        is_dense = np.zeros(self.K, dtype=bool)
        is_dense[D] = True
        drows = np.flatnonzero(is_dense[cell])
        dc = cell[drows]
        dd = np.sum((P[drows] - centre[dc]) ** 2, axis=1)
        o = np.lexsort((dd, dc))
        first = np.ones(o.size, dtype=bool)
        first[1:] = dc[o[1:]] != dc[o[:-1]]
        rep = np.full(self.K, -1, dtype=np.intp)
        rep[dc[o[first]]] = drows[o[first]]
        self.lo, self.hi, self.rep = lo, hi, rep

        pend_q: list[np.ndarray] = []  # pending (query row, dense cell) items
        pend_b: list[np.ndarray] = []
        pend_pairs: list[np.ndarray] = []  # pending (dense cell, dense cell) pairs
        n_pend = 0
        hmax = float(half[D].max())
        Cd = centre[D]
        # sparse point <-> dense cell
        if sparse_rows.size:
            tree_s = cKDTree(P[sparse_rows])
            for bi, xj in _cross_pairs(Cd, tree_s, self.r + hmax + pad, self.max_pairs):
                B, x = D[bi], sparse_rows[xj]
                keep = _box_sqdist(lo, hi, B, P, x) <= self.box_tol
                B, x = B[keep], x[keep]
                w = _sqdist(P, x, P, rep[B]) <= self.eps2
                self.uf.union(cell[x[w]], B[w])
                pend_q.append(x[~w])
                pend_b.append(B[~w])
                n_pend += int((~w).sum())
                if n_pend > self.max_pairs:
                    self._resolve_items(pend_q, pend_b)
                    n_pend = 0
        # dense cell <-> dense cell
        if D.size > 1:
            for ia, ib in _self_pairs(Cd, self.r + 2.0 * hmax + pad, self.max_pairs):
                A, B = D[ia], D[ib]
                keep = _box_box_sqdist(lo, hi, A, B) <= self.box_tol
                A, B = A[keep], B[keep]
                w = _sqdist(P, rep[A], P, rep[B]) <= self.eps2
                self.uf.union(A[w], B[w])
                pend_pairs.append(np.stack([A[~w], B[~w]], axis=1))
                n_pend += int((~w).sum())
                if n_pend > self.max_pairs:
                    self._resolve_pairs(pend_pairs)
                    n_pend = 0
        self.uf.flatten()
        self._resolve_items(pend_q, pend_b)
        self._resolve_pairs(pend_pairs)

    def _resolve_pairs(self, pend: list[np.ndarray]) -> None:
        """Turn pending (dense A, dense B) pairs into items: points of the smaller cell near the other's box."""
        if not pend:
            return
        pairs = np.concatenate(pend)
        pend.clear()
        if pairs.shape[0] == 0:
            return
        uf, count, start = self.uf, self.count, self.start
        A, B = pairs[:, 0], pairs[:, 1]
        keep = uf.find(A) != uf.find(B)
        A, B = A[keep], B[keep]
        swap = count[A] > count[B]
        A, B = np.where(swap, B, A), np.where(swap, A, B)
        # process in slices whose expansion (sum of |A|) stays within the budget
        csum = np.cumsum(count[A])
        a = 0
        while a < A.size:
            base = int(csum[a - 1]) if a else 0
            b = max(a + 1, int(np.searchsorted(csum, base + self.max_pairs, side="right")))
            As, Bs = A[a:b], B[a:b]
            live = uf.find(As) != uf.find(Bs)
            As, Bs = As[live], Bs[live]
            if As.size:
                ln = count[As]
                k = np.repeat(np.arange(As.size), ln)
                q = np.arange(k.size) - np.repeat(np.cumsum(ln) - ln, ln) + np.repeat(start[As], ln)
                Bk = Bs[k]
                near = _box_sqdist(self.lo, self.hi, Bk, self.P, q) <= self.box_tol
                self._resolve_items([q[near]], [Bk[near]])
            a = b

    def _resolve_items(self, pend_q: list[np.ndarray], pend_b: list[np.ndarray]) -> None:
        """Decide pending items (query row q, dense cell B): link cell(q) and B if a point of B is within eps."""
        if not pend_q:
            return
        q = np.concatenate(pend_q)
        B = np.concatenate(pend_b)
        pend_q.clear()
        pend_b.clear()
        if q.size == 0:
            return
        uf, cell, count, start, P = self.uf, self.cell, self.count, self.start, self.P
        live = uf.find(cell[q]) != uf.find(B)
        q, B = q[live], B[live]
        if q.size == 0:
            return
        o = np.lexsort((q, B))
        q, B = q[o], B[o]
        ub, gs, gc = np.unique(B, return_index=True, return_counts=True)
        big = (gc * count[ub] > _BRUTE_WORK) & (count[ub] > _TREE_MIN_CELL)
        # small groups: brute force, in batches of at most max_pairs point pairs
        small = ~big[np.repeat(np.arange(ub.size), gc)]
        qs, Bs = q[small], B[small]
        csum = np.cumsum(count[Bs])
        a = 0
        while a < qs.size:
            base = int(csum[a - 1]) if a else 0
            b = max(a + 1, int(np.searchsorted(csum, base + self.max_pairs, side="right")))
            qq, BB = qs[a:b], Bs[a:b]
            live = uf.find(cell[qq]) != uf.find(BB)
            qq, BB = qq[live], BB[live]
            if qq.size:
                ln = count[BB]
                k = np.repeat(np.arange(qq.size), ln)
                t = np.arange(k.size) - np.repeat(np.cumsum(ln) - ln, ln) + np.repeat(start[BB], ln)
                ok = _sqdist(P, qq[k], P, t) <= self.eps2
                hit = np.bincount(k[ok], minlength=qq.size) > 0
                uf.union(cell[qq[hit]], BB[hit])
            a = b
        # big groups: nearest neighbour in a KD-tree of the cell
        for g in np.flatnonzero(big):
            Bc = int(ub[g])
            qq = q[gs[g]:gs[g] + gc[g]]
            qq = qq[uf.find(cell[qq]) != uf.find(np.array([Bc]))[0]]
            if qq.size == 0:
                continue
            T = P[start[Bc]:start[Bc] + count[Bc]]
            tree = cKDTree(T)
            nn = _nearest_within(tree, T, P, qq, self.r, self.eps2, self.max_pairs, self.workers)
            hit = nn >= 0
            uf.union(cell[qq[hit]], np.full(int(hit.sum()), Bc, dtype=np.intp))


# --------------------------------------------------------------------------
# public kernels
# --------------------------------------------------------------------------


def core_flags(owned: np.ndarray, halo: np.ndarray, eps: float, min_samples: int, *,
               max_pairs: int = DEFAULT_MAX_PAIRS, workers: int = 1) -> np.ndarray:
    """Core flags of the owned points (round 1).

    A point is core iff at least ``min_samples`` points of ``owned`` and ``halo`` together (counting
    itself and every duplicate) are within ``eps`` of it (exact test, see the module docstring) --
    sklearn's rule.  The halo must hold every eps-neighbour of the owned points that is not owned.

    Parameters
    ----------
    owned : (n, d) float array, the partition's own points.
    halo : (m, d) float array (m may be 0; an empty 1-D array is accepted), points of other partitions.
    eps : float > 0.
    min_samples : int >= 1.
    max_pairs : budget of candidate pairs held at once (memory bound).
    workers : threads for the KD-tree queries (scipy ``workers``; -1 = all cores).

    Returns
    -------
    (n,) bool array.

    Example
    -------
    >>> import numpy as np
    >>> owned = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]])
    >>> halo = np.array([[0.0, 0.1]])
    >>> core_flags(owned, halo, eps=0.2, min_samples=3).tolist()
    [True, True, False]

    Identical points are merged; cells of a grid of side ~``eps / sqrt(d)`` holding ``min_samples``
    points make their points core without any distance computation; the others are decided with a
    ``min_samples``-nearest-neighbour query (O(min_samples) per point however dense the data).
    """
    owned = _as_points(owned, "owned")
    n, d = owned.shape
    halo = _as_points(halo, "halo", d)
    eps = _check_eps(eps)
    ms = int(min_samples)
    if ms < 1:
        raise ValueError(f"min_samples must be >= 1, got {min_samples}")
    max_pairs = _check_max_pairs(max_pairs)
    if n == 0:
        return np.zeros(0, dtype=bool)
    if ms == 1:
        return np.ones(n, dtype=bool)
    X = np.concatenate([owned, halo]) if halo.shape[0] else owned
    if X.shape[0] < ms:
        return np.zeros(n, dtype=bool)
    U, inv, mult = _dedup(X)
    nu = U.shape[0]
    cell, K, _ = _grid_cells(U, eps)
    cell_count = np.bincount(cell, weights=mult, minlength=K)
    core_u = cell_count[cell] >= ms
    need = np.zeros(nu, dtype=bool)
    need[inv[:n]] = True
    und = np.flatnonzero(need & ~core_u)
    if und.size:
        eps2 = eps * eps
        r = _radius(eps, d)
        tree = cKDTree(U)
        # query in the tree's leaf order (much better cache behaviour than random order)
        rank = np.empty(nu, dtype=np.intp)
        rank[tree.indices] = np.arange(nu, dtype=np.intp)
        und = und[np.argsort(rank[und])]
        k = min(ms, nu)
        step = max(1, max_pairs // k)
        for a in range(0, und.size, step):
            qi = und[a:a + step]
            m = qi.size
            _, idx = tree.query(U[qi], k=k, distance_upper_bound=r, workers=workers)
            idx = np.asarray(idx).reshape(m, k)
            valid = idx < nu
            idc = np.where(valid, idx, 0)
            ok = valid & (_sqdist(U, np.repeat(qi, k), U, idc.reshape(-1)) <= eps2).reshape(m, k)
            tot = np.where(ok, mult[idc], 0).sum(axis=1)
            res = tot >= ms
            # a full answer with a candidate failing the exact test may hide another point within eps
            amb = np.flatnonzero(~res & valid[:, -1] & ~ok.all(axis=1))
            if amb.size:
                w = np.zeros(amb.size)
                for kk, tj in _ball_hits(tree, U, U, qi[amb], r, eps2, max_pairs):
                    w += np.bincount(kk, weights=mult[tj], minlength=amb.size)
                res[amb] = w >= ms
            core_u[qi] = res
    return core_u[inv[:n]]


def local_clusters(owned: np.ndarray, owned_core: np.ndarray, halo: np.ndarray, halo_core: np.ndarray,
                   eps: float, *, max_pairs: int = DEFAULT_MAX_PAIRS, workers: int = 1,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local clusters of one partition (round 2).

    The graph has a node per core point of ``owned`` and ``halo`` and an edge per pair within ``eps``;
    its connected components get local ids ``0..C-1``.

    Parameters
    ----------
    owned, owned_core : (n, d) points and their core flags (from :func:`core_flags`).
    halo, halo_core : (m, d) halo points and their core flags (computed by their owners).
    eps : float > 0, as in round 1.
    max_pairs : budget of candidate pairs held at once (memory bound).
    workers : threads for the KD-tree queries.

    Returns
    -------
    labels : (n,) int64. Owned core point: its component.  Owned non-core point within eps of some
        core point (owned or halo): the component of one such core point (border point).  Else -1.
    link_comp : (h,) int64, the component of each halo core point, ...
    link_halo_rows : (h,) int64, ... whose row in ``halo`` is this (ascending; h = halo_core.sum()).

    Example
    -------
    >>> import numpy as np
    >>> owned = np.array([[0.0, 0.0], [0.1, 0.0], [0.3, 0.0], [5.0, 5.0]])
    >>> halo = np.array([[-0.1, 0.0], [9.0, 9.0]])
    >>> labels, link_comp, rows = local_clusters(
    ...     owned, np.array([True, True, False, False]), halo, np.array([True, True]), eps=0.2)
    >>> labels.tolist(), link_comp.tolist(), rows.tolist()
    ([0, 0, 0, -1], [0, 1], [0, 1])
    """
    owned = _as_points(owned, "owned")
    n, d = owned.shape
    halo = _as_points(halo, "halo", d)
    owned_core = _as_flags(owned_core, n, "owned_core")
    halo_core = _as_flags(halo_core, halo.shape[0], "halo_core")
    eps = _check_eps(eps)
    max_pairs = _check_max_pairs(max_pairs)
    oc = np.flatnonzero(owned_core)
    hc = np.flatnonzero(halo_core)
    labels = np.full(n, -1, dtype=np.int64)
    if oc.size + hc.size == 0:
        return labels, np.zeros(0, np.int64), np.zeros(0, np.int64)
    C = np.concatenate([owned[oc], halo[hc]])
    U, inv, _ = _dedup(C)
    graph = _CoreGraph(U, eps, max_pairs, workers)
    comp_u, _ = graph.components()
    comp = comp_u[inv]
    labels[oc] = comp[:oc.size]
    nb = np.flatnonzero(~owned_core)
    if nb.size:
        Ps = graph.P  # distinct core points sorted by cell; comp of row i is comp_u[graph.order[i]]
        tree = cKDTree(Ps)
        nn = _nearest_within(tree, Ps, owned, nb, _radius(eps, d), eps * eps, max_pairs, workers)
        hit = nn >= 0
        labels[nb[hit]] = comp_u[graph.order[nn[hit]]]
    return labels, comp[oc.size:].astype(np.int64), hc.astype(np.int64)


class PartLabels(NamedTuple):
    """What :func:`merge_labels` needs from one partition (a plain 4- or 5-tuple works too).

    ids : (n,) int64 global ids of the owned points.
    labels : (n,) local labels from :func:`local_clusters`.
    link_comp : (h,) ``link_comp`` from :func:`local_clusters`.
    link_ids : (h,) int64 global ids of the linked halo core points, i.e. ``halo_ids[link_halo_rows]``.
    core : optional (n,) bool core flags of the owned points; when given for every partition, clusters
        are numbered like sklearn (see :func:`merge_labels`).
    """

    ids: np.ndarray
    labels: np.ndarray
    link_comp: np.ndarray
    link_ids: np.ndarray
    core: np.ndarray | None = None


def merge_labels(parts: Sequence[PartLabels | tuple], ids: np.ndarray | None = None) -> np.ndarray:
    """Final DBSCAN labels from the partitions' local results (coordinator side, no Ray).

    Node ``(p, c)`` is local component ``c`` of partition ``p``.  Every link ``(link_comp[k],
    link_ids[k])`` of partition ``p`` joins ``(p, link_comp[k])`` with ``(q, labels_q[point])``, where
    ``q`` owns the point ``link_ids[k]``; ``scipy.sparse.csgraph.connected_components`` over these
    nodes gives the clusters.

    Parameters
    ----------
    parts : one :class:`PartLabels` (or tuple ``(ids, labels, link_comp, link_ids[, core])``) per
        partition; the ids of all partitions together must be distinct.
    ids : the order of the output: a permutation of all owned ids.  Default: ascending global id.

    Returns
    -------
    (N,) int64 labels aligned with ``ids``: -1 for noise, clusters numbered ``0..K-1`` in the order
    of their first point in the output -- their first core point if ``core`` is given for every
    partition, which is sklearn's numbering when ``ids`` is the data order.

    Raises ``ValueError`` on duplicate ids, on ``ids`` not a permutation of the owned ids, and on a
    link to an id that no partition owns or that its owner did not label as a cluster member.

    Example
    -------
    >>> import numpy as np
    >>> p0 = PartLabels(ids=np.array([0, 1]), labels=np.array([0, -1]),
    ...                 link_comp=np.array([0]), link_ids=np.array([2]))
    >>> p1 = PartLabels(ids=np.array([2, 3]), labels=np.array([0, 1]),
    ...                 link_comp=np.array([0]), link_ids=np.array([0]))
    >>> merge_labels([p0, p1]).tolist()
    [0, -1, 0, 1]
    """
    parts = [PartLabels(*p) for p in parts]
    all_ids, all_node, all_core, edges_a, edges_b = [], [], [], [], []
    offset = 0
    offsets = []
    have_core = bool(parts) and all(p.core is not None for p in parts)
    for i, p in enumerate(parts):
        pid = np.asarray(p.ids, dtype=np.int64).reshape(-1)
        lab = np.asarray(p.labels, dtype=np.int64).reshape(-1)
        lc = np.asarray(p.link_comp, dtype=np.int64).reshape(-1)
        lid = np.asarray(p.link_ids, dtype=np.int64).reshape(-1)
        if lab.shape != pid.shape or lc.shape != lid.shape:
            raise ValueError(f"partition {i}: ids/labels or link_comp/link_ids lengths differ")
        if (lab.size and lab.min() < -1) or (lc.size and lc.min() < 0):
            raise ValueError(f"partition {i}: invalid local labels")
        nc = max(int(lab.max()) + 1 if lab.size else 0, int(lc.max()) + 1 if lc.size else 0)
        offsets.append(offset)
        all_ids.append(pid)
        all_node.append(np.where(lab >= 0, lab + offset, -1))
        if have_core:
            core = np.asarray(p.core, dtype=bool).reshape(-1)
            if core.shape != pid.shape:
                raise ValueError(f"partition {i}: core flags length differs from ids")
            all_core.append(core)
        edges_a.append(lc + offset)
        edges_b.append(lid)
        offset += nc
    if not parts:
        return np.zeros(0, dtype=np.int64)
    gid = np.concatenate(all_ids)
    node = np.concatenate(all_node)
    srt = np.argsort(gid, kind="stable")
    gid_s = gid[srt]
    if gid_s.size > 1 and np.any(gid_s[1:] == gid_s[:-1]):
        raise ValueError("global ids are not distinct across partitions")
    # links: halo point id -> its owner's node
    ea = np.concatenate(edges_a)
    lid = np.concatenate(edges_b)
    pos = np.searchsorted(gid_s, lid)
    if lid.size:
        pos_c = np.minimum(pos, gid_s.size - 1)
        if gid_s.size == 0 or np.any(gid_s[pos_c] != lid):
            raise ValueError("a link refers to an id that no partition owns")
        eb = node[srt[pos_c]]
        if np.any(eb < 0):
            raise ValueError("a linked halo core point is not labelled as a cluster member by its owner")
    else:
        eb = np.zeros(0, dtype=np.int64)
    if offset:
        g = coo_matrix((np.ones(ea.size, dtype=np.int8), (ea, eb)), shape=(offset, offset)).tocsr()
        _, comp = connected_components(g, directed=False)
    else:
        comp = np.zeros(0, dtype=np.int64)
    raw = np.where(node >= 0, comp[np.maximum(node, 0)] if offset else -1, -1)
    # output order
    if ids is None:
        out_idx = srt
    else:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size != gid.size:
            raise ValueError(f"ids has {ids.size} entries, the partitions own {gid.size} points")
        p = np.searchsorted(gid_s, ids)
        p = np.minimum(p, max(gid_s.size - 1, 0))
        if ids.size and (np.any(gid_s[p] != ids) or np.unique(ids).size != ids.size):
            raise ValueError("ids is not a permutation of the owned ids")
        out_idx = srt[p]
    out = raw[out_idx]
    # renumber: by first (core) occurrence in the output order
    mask = out >= 0
    if have_core:
        mask &= np.concatenate(all_core)[out_idx]
    vals, first = np.unique(out[mask], return_index=True)
    new = np.full(offset, -1, dtype=np.int64)
    new[vals[np.argsort(first, kind="stable")]] = np.arange(vals.size)
    res = np.full(out.size, -1, dtype=np.int64)
    res[out >= 0] = new[out[out >= 0]]
    return res


def dbscan(X: np.ndarray, eps: float, min_samples: int = 5, *, max_pairs: int = DEFAULT_MAX_PAIRS,
           workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Single-partition DBSCAN with the kernels above: ``(labels, core)``, as ``sklearn.cluster.DBSCAN``.

    ``labels`` (int64) equal sklearn's ``labels_`` on core and noise points (same numbering);
    ``core`` is the core-sample mask.

    Example
    -------
    >>> import numpy as np
    >>> X = np.array([[0.0], [0.1], [0.2], [3.0], [3.1], [3.2], [9.0]])
    >>> labels, core = dbscan(X, eps=0.15, min_samples=2)
    >>> labels.tolist()
    [0, 0, 0, 1, 1, 1, -1]
    """
    X = _as_points(X, "X")
    n, d = X.shape
    empty = np.zeros((0, d))
    core = core_flags(X, empty, eps, min_samples, max_pairs=max_pairs, workers=workers)
    labels, _, _ = local_clusters(X, core, empty, np.zeros(0, bool), eps, max_pairs=max_pairs, workers=workers)
    ids = np.arange(n, dtype=np.int64)
    part = PartLabels(ids, labels, np.zeros(0, np.int64), np.zeros(0, np.int64), core)
    return merge_labels([part], ids), core
