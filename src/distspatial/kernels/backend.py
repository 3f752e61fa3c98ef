"""Kernel backends: the one seam between a node and the hardware its kernels run on. No Ray.

A node asks :func:`~distspatial.kernels.backend_choice.get_backend` for a :class:`KernelBackend` once (from ``NodeConfig.device``) and runs every
per-partition kernel through it:

* ``prepare(points, tree=None)``: per-partition structure, built once when a partition is loaded (CPU: the
  partition's ``cKDTree``, reused when given; GPU: the points on the device plus a sorted-cell grid for d <= 3).
  Every method below takes either such a :class:`PreparedPoints` or a plain ``(n, d)`` array (which is then
  prepared for that one call).
* ``kmeans_assign_sums(points, centers) -> (labels (n,) int32, sums (k, d) float64, counts (k,) int64,
  inertia float)``: one stateless Lloyd pass.
* ``nearest_center(points, centers) -> (labels (n,) int32, d2 (n,) float64)``: k-means|| bookkeeping.
* ``lloyd_state(points)``: per-partition state with ``step(centers) -> (sums, counts, inertia, n_changed)``,
  ``labels`` and ``farthest_indices(m)`` (the contract of :class:`~distspatial.kernels.kmeans_kernels.LloydState`).
* ``knn(points, queries, k, bound=None) -> (dist (m, k) float64, rows (m, k) int64)``: rows into ``points``,
  sorted by distance; slots without a neighbour (fewer than k points, or none within ``bound[i]``) hold
  ``inf`` / ``-1``.
* ``radius(points, centers, radii) -> (offsets (m + 1,) int64, rows int64)`` (CSR: query i's rows are
  ``rows[offsets[i]:offsets[i + 1]]``, ascending); a point is in the ball iff its distance is ``<= radii[i]``.
* ``box(points, lo, hi) -> (offsets, rows)``: same CSR layout, ``lo[i] <= p <= hi[i]`` in every dimension;
  ``lo``/``hi`` are ``(m, d)`` (or ``(d,)`` for one box).
* ``distance_tile(a, b) -> (ma, mb) float64``: squared Euclidean distances.

Exactness (all backends in float64): the squared distance of ``x`` to ``y`` is ``sum_t (x_t - y_t)**2`` added
in dimension order in float64 (what :mod:`~distspatial.kernels.kmeans_kernels` and, for d <= 3, ``cKDTree`` compute);
k-means labels are the nearest centre with the lowest index winning exact ties; kNN answers equal the brute-force
ones up to the order of equal distances. Sums and inertia are sums of exact values (the order of the additions
differs between backends, so they agree to rounding). A GPU backend in float32 is documented in
:mod:`distspatial.kernels.gpu_kernels`.

CPU kernels (:class:`CpuBackend`):

* k-means: a Numba pass over blocks of ``_KM_BLOCK`` consecutive points. A block's bounding box selects the
  centres that can be nearest to some point in it (``mindist(c_j, box) <= min_i maxdist(c_i, box)``, with a
  relative slack); a block with a single such centre takes it with one distance per point (for the inertia),
  the others compare the candidates only. Partitions are stored in curve order, so blocks are compact and
  most have one candidate: the pass runs near memory bandwidth (``benchmarks/bench_kernels.py`` measures it
  against ``np.copyto``). Blocks run in parallel over ``threads``. Large ``k * d`` falls back to the BLAS form
  of :func:`~distspatial.kernels.kmeans_kernels.squared_distances_min`.
* kNN: ``cKDTree`` (the partition's own, when passed to ``prepare``), queries visited in Morton order unless
  the caller says they are already curve-sorted (the planner sorts them).
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from ..core.config import DEVICES
from ..core.curves import curve_keys
from .kmeans_compiled import HAVE_NUMBA, new_lloyd_state
from .kmeans_kernels import squared_distances_min, check_centers, top_farthest
from .local_index import build_kdtree

__all__ = [
    "DEVICES",
    "KernelBackend",
    "PreparedPoints",
    "CpuBackend",
    "AssignLloydState",
    "cuda_available",
    "csr_to_lists",
    "exact_sqdist",
    "GpuUnavailableError",
]

#: Points per block of the CPU k-means pass (a block's bounding box filters the centres).
_KM_BLOCK = 256
#: Points per sub-block of a block whose box straddles a Voronoi boundary.
_KM_SUB = 32
#: Relative slack of the centre filter (distance rounding is a few ``d * eps``).
_SLACK = 1e-9
#: The CPU k-means pass handles ``k * d`` up to this with its own loop; beyond it the BLAS form is faster.
_KM_DIRECT_MAX_KD = 512
#: Sort kNN queries along a Morton curve from this many queries on.
_MORTON_MIN_QUERIES = 2048


class GpuUnavailableError(RuntimeError):
    """``device="cuda"`` was asked for but no usable CUDA device (or no PyTorch with CUDA) is present."""


def exact_sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(ma, mb)`` squared distances by the exact form (float64, dimension order), NumPy."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    out = np.subtract.outer(a[:, 0], b[:, 0])
    out *= out
    if a.shape[1] > 1:
        tmp = np.empty_like(out)
        for t in range(1, a.shape[1]):
            np.subtract.outer(a[:, t], b[:, t], out=tmp)
            tmp *= tmp
            out += tmp
    return out


def csr_to_lists(offsets: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
    """``(offsets, rows)`` to one array per query (views into ``rows``)."""
    return [rows[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def _empty_csr(m: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(m + 1, dtype=np.int64), np.empty(0, dtype=np.int64)


def _as_boxes(lo: np.ndarray, hi: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    lo = np.atleast_2d(np.asarray(lo, dtype=np.float64))
    hi = np.atleast_2d(np.asarray(hi, dtype=np.float64))
    if lo.shape != hi.shape or lo.shape[1] != d:
        raise ValueError(f"lo and hi must both be (m, {d}) or ({d},), got {lo.shape} and {hi.shape}")
    return lo, hi


class PreparedPoints:
    """A partition's points as a backend keeps them between calls (``backend.prepare(points)``)."""

    backend_name = "base"

    def __init__(self, points: np.ndarray) -> None:
        X = np.asarray(points)
        if X.ndim != 2 or X.shape[1] < 1:
            raise ValueError(f"points must be (n, d) with d >= 1, got shape {X.shape}")
        self.points = X
        self.n, self.d = X.shape


class KernelBackend(abc.ABC):
    """Per-partition kernels of a node (see the module docstring for the contracts)."""

    #: ``"cpu"`` or ``"torch"``.
    name: str = "base"
    #: The device the kernels run on (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
    device: str = "cpu"

    @abc.abstractmethod
    def prepare(self, points: np.ndarray, tree: Any = None) -> PreparedPoints:
        """Structure for repeated calls on one partition; ``tree`` is an existing ``cKDTree`` over ``points``."""

    def _prep(self, points: Any) -> PreparedPoints:
        return points if isinstance(points, PreparedPoints) else self.prepare(points)

    @abc.abstractmethod
    def kmeans_assign_sums(
        self, points: Any, centers: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """One Lloyd pass: ``(labels (n,) int32, sums (k, d) float64, counts (k,) int64, inertia)``."""

    @abc.abstractmethod
    def nearest_center(self, points: Any, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(labels (n,) int32, exact squared distance to the nearest centre (n,) float64)``."""

    def lloyd_state(self, points: Any) -> Any:
        """Per-partition Lloyd state (``step``, ``labels``, ``farthest_indices``) running on this backend."""
        return AssignLloydState(self, self._prep(points))

    @abc.abstractmethod
    def knn(
        self, points: Any, queries: np.ndarray, k: int, bound: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(dist (m, k) float64, rows (m, k) int64)``, sorted; ``inf`` / ``-1`` where no neighbour."""

    @abc.abstractmethod
    def radius(self, points: Any, centers: np.ndarray, radii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CSR ``(offsets (m + 1,), rows)`` of the points within ``radii[i]`` of ``centers[i]`` (inclusive)."""

    @abc.abstractmethod
    def box(self, points: Any, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CSR ``(offsets (m + 1,), rows)`` of the points with ``lo[i] <= p <= hi[i]``."""

    @abc.abstractmethod
    def distance_tile(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``(ma, mb)`` float64 squared distances."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device!r})"


class AssignLloydState:
    """Lloyd state built on ``backend.kmeans_assign_sums``: no bounds, one full pass per step.

    Same API as :class:`~distspatial.kernels.kmeans_kernels.LloydState` (``step``, ``labels``, ``farthest``,
    ``farthest_indices``, ``last_candidates``); the squared distances for ``farthest_indices`` are computed on
    demand (only empty clusters need them).
    """

    def __init__(self, backend: KernelBackend, prepared: PreparedPoints) -> None:
        self.backend = backend
        self.prepared = prepared
        self.n, self.d = prepared.n, prepared.d
        self.labels = np.full(self.n, -1, dtype=np.int32)
        self._C: np.ndarray | None = None
        self.last_candidates = self.n

    @property
    def points(self) -> np.ndarray:
        return self.prepared.points

    def step(self, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, int]:
        C = check_centers(centers, self.d)
        labels, sums, counts, inertia = self.backend.kmeans_assign_sums(self.prepared, C)
        if self._C is None or self._C.shape[0] != C.shape[0]:
            changed = self.n
        else:
            changed = int(np.count_nonzero(labels != self.labels))
        self.labels = labels
        self._C = C.copy()
        return sums, counts, float(inertia), changed

    def farthest_indices(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        if self._C is None:
            raise RuntimeError("farthest_indices() needs a previous step()")
        m = int(min(max(m, 0), self.n))
        if m == 0:
            return np.empty(0, dtype=np.int64), np.empty(0)
        X = np.asarray(self.points, dtype=np.float64)
        diff = X - self._C[self.labels]
        diff *= diff
        D = diff[:, 0].copy()
        for t in range(1, self.d):
            D += diff[:, t]
        return top_farthest(D, m)

    def farthest(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        rows, d2 = self.farthest_indices(m)
        return np.asarray(self.points)[rows].copy(), d2


# --------------------------------------------------------------------------------------------------------------
# CPU: compiled k-means pass
# --------------------------------------------------------------------------------------------------------------

if HAVE_NUMBA:
    import numba
    from numba import njit, prange

    @njit(cache=True, nogil=True, fastmath={"reassoc", "nsz", "arcp"})
    def _block_sums(X, i0, i1, j, C, sums):  # pragma: no cover - compiled
        """Single-candidate block: add the points to ``sums[j]``; return the sum of their squared distances to
        ``C[j]``. Reassociation only reorders the sums over points (vectorized); no decision depends on them.
        Sums are accumulated relative to the centre (``sum (x - c) + count * c``)."""
        d = X.shape[1]
        inertia = 0.0
        if d == 2:
            c0, c1 = C[j, 0], C[j, 1]
            s0 = 0.0
            s1 = 0.0
            for i in range(i0, i1):
                a = np.float64(X[i, 0]) - c0
                b = np.float64(X[i, 1]) - c1
                s0 += a
                s1 += b
                inertia += a * a + b * b
            m = i1 - i0
            sums[j, 0] += s0 + m * c0
            sums[j, 1] += s1 + m * c1
        else:
            for i in range(i0, i1):
                s = 0.0
                for t in range(d):
                    x = np.float64(X[i, t])
                    sums[j, t] += x
                    diff = x - C[j, t]
                    s += diff * diff
                inertia += s
        return inertia

    @njit(cache=True, nogil=True, fastmath={"nnan", "ninf", "nsz"})
    def _block_bbox(X, i0, i1, lo, hi):  # pragma: no cover - compiled
        """Bounding box of rows i0:i1 (finite points; min/max are exact whatever the order)."""
        d = X.shape[1]
        if d == 2:
            a0 = np.float64(X[i0, 0])
            b0 = a0
            a1 = np.float64(X[i0, 1])
            b1 = a1
            for i in range(i0 + 1, i1):
                v = np.float64(X[i, 0])
                w = np.float64(X[i, 1])
                a0 = min(a0, v)
                b0 = max(b0, v)
                a1 = min(a1, w)
                b1 = max(b1, w)
            lo[0], hi[0], lo[1], hi[1] = a0, b0, a1, b1
        else:
            for t in range(d):
                a = np.float64(X[i0, t])
                b = a
                for i in range(i0 + 1, i1):
                    v = np.float64(X[i, t])
                    a = min(a, v)
                    b = max(b, v)
                lo[t] = a
                hi[t] = b

    @njit(cache=True, nogil=True, fastmath={"reassoc", "nsz", "arcp", "nnan", "ninf"})
    def _fused2(X, i0, i1, c0, c1):  # pragma: no cover - compiled
        """d = 2, one read of rows i0:i1: bounding box, and sums / squared distances relative to (c0, c1)."""
        a0 = np.float64(X[i0, 0])
        b0 = a0
        a1 = np.float64(X[i0, 1])
        b1 = a1
        s0 = 0.0
        s1 = 0.0
        inertia = 0.0
        for i in range(i0, i1):
            v = np.float64(X[i, 0])
            w = np.float64(X[i, 1])
            a0 = min(a0, v)
            b0 = max(b0, v)
            a1 = min(a1, w)
            b1 = max(b1, w)
            p = v - c0
            q = w - c1
            s0 += p
            s1 += q
            inertia += p * p + q * q
        return a0, b0, a1, b1, s0, s1, inertia

    @njit(cache=True, nogil=True, inline="always")
    def _box_min2(C, j, lo, hi):  # pragma: no cover - compiled
        """Squared distance from centre j to the nearest point of the box [lo, hi]."""
        mn = 0.0
        for t in range(C.shape[1]):
            g = lo[t] - C[j, t]
            g2 = C[j, t] - hi[t]
            if g2 > g:
                g = g2
            if g > 0.0:
                mn += g * g
        return mn

    @njit(cache=True, nogil=True, inline="always")
    def _box_max2(C, j, lo, hi):  # pragma: no cover - compiled
        """Squared distance from centre j to the farthest corner of the box [lo, hi]."""
        mx = 0.0
        for t in range(C.shape[1]):
            a = abs(lo[t] - C[j, t])
            b = abs(hi[t] - C[j, t])
            m = a if a > b else b
            mx += m * m
        return mx

    @njit(cache=True, nogil=True)
    def _only_candidate(C, g, lo, hi):  # pragma: no cover - compiled
        """True when centre g is provably the nearest centre of every point in the box [lo, hi]: every other
        centre's distance to the box exceeds g's largest distance to it (both with a relative slack)."""
        k, d = C.shape
        thr = _box_max2(C, g, lo, hi) * (1.0 + _SLACK)
        for j in range(k):
            if j == g:
                continue
            if _box_min2(C, j, lo, hi) * (1.0 - _SLACK) <= thr:
                return False
        return True

    @njit(cache=True, nogil=True)
    def _block_candidates(X, i0, i1, C, lo, hi, cand):  # pragma: no cover - compiled
        """Centres that can be nearest to some point of rows i0:i1 (written to ``cand``, ascending); count."""
        _block_bbox(X, i0, i1, lo, hi)
        return _box_candidates(C, lo, hi, cand)

    @njit(cache=True, nogil=True)
    def _box_candidates(C, lo, hi, cand):  # pragma: no cover - compiled
        """Centres that can be nearest to some point of the box [lo, hi] (into ``cand``, ascending); count."""
        k, d = C.shape
        thr = np.inf
        for j in range(k):
            mx = _box_max2(C, j, lo, hi)
            if mx < thr:
                thr = mx
        thr *= 1.0 + _SLACK
        nc = 0
        for j in range(k):
            if _box_min2(C, j, lo, hi) * (1.0 - _SLACK) <= thr:
                cand[nc] = j
                nc += 1
        return nc

    @njit(cache=True, nogil=True, parallel=True)
    def _assign_sums_kernel(X, C, labels, block, nchunks):  # pragma: no cover - compiled
        n, d = X.shape
        k = C.shape[0]
        nblocks = (n + block - 1) // block
        psums = np.zeros((nchunks, k, d))
        pcounts = np.zeros((nchunks, k), dtype=np.int64)
        pinertia = np.zeros(nchunks)
        pmulti = np.zeros(nchunks, dtype=np.int64)
        for ch in prange(nchunks):
            b0 = ch * nblocks // nchunks
            b1 = (ch + 1) * nblocks // nchunks
            sums = psums[ch]
            counts = pcounts[ch]
            lo = np.empty(d)
            hi = np.empty(d)
            cand = np.empty(k, dtype=np.int64)
            CTc = np.empty((d, k))
            dist = np.empty(k)
            inertia = 0.0
            multi = 0
            guess = 0  # the previous block's centre: curve-ordered blocks mostly share it
            for b in range(b0, b1):
                i0 = b * block
                i1 = min(i0 + block, n)
                if d == 2:  # one fused read: box and sums relative to the guess
                    lo[0], hi[0], lo[1], hi[1], s0, s1, inn = _fused2(X, i0, i1, C[guess, 0], C[guess, 1])
                    if _only_candidate(C, guess, lo, hi):
                        m = i1 - i0
                        sums[guess, 0] += s0 + m * C[guess, 0]
                        sums[guess, 1] += s1 + m * C[guess, 1]
                        inertia += inn
                        counts[guess] += m
                        labels[i0:i1] = guess
                        continue
                    nc = _box_candidates(C, lo, hi, cand)
                else:
                    nc = _block_candidates(X, i0, i1, C, lo, hi, cand)
                if nc == 1:
                    j = cand[0]
                    guess = j
                    inertia += _block_sums(X, i0, i1, j, C, sums)
                    counts[j] += i1 - i0
                    labels[i0:i1] = j
                    continue
                # straddling block: sub-blocks with their own (smaller) boxes, then point by point; a block that
                # keeps most centres (points not in curve order) goes point by point at once
                sub = _KM_SUB if 2 * nc <= k else block
                for u0 in range(i0, i1, sub):
                    u1 = min(u0 + sub, i1)
                    if sub != block:
                        nc = _block_candidates(X, u0, u1, C, lo, hi, cand)
                    if nc == 1:
                        j = cand[0]
                        guess = j
                        inertia += _block_sums(X, u0, u1, j, C, sums)
                        counts[j] += u1 - u0
                        labels[u0:u1] = j
                        continue
                    multi += u1 - u0
                    for q in range(nc):  # candidate centres, column-major: the scan below vectorizes
                        for t in range(d):
                            CTc[t, q] = C[cand[q], t]
                    for i in range(u0, u1):
                        for q in range(nc):
                            dist[q] = 0.0
                        for t in range(d):  # dimension order, as the exact form
                            xt = np.float64(X[i, t])
                            for q in range(nc):
                                diff = xt - CTc[t, q]
                                dist[q] += diff * diff
                        best = dist[0]
                        bq = 0
                        for q in range(1, nc):  # ascending centre index: strict < keeps the lowest on ties
                            if dist[q] < best:
                                best = dist[q]
                                bq = q
                        bj = cand[bq]
                        labels[i] = bj
                        guess = bj
                        counts[bj] += 1
                        inertia += best
                        for t in range(d):
                            sums[bj, t] += np.float64(X[i, t])
            pinertia[ch] = inertia
            pmulti[ch] = multi
        return psums.sum(axis=0), pcounts.sum(axis=0), pinertia.sum(), pmulti.sum()


def cpu_assign_sums(
    points: np.ndarray,
    centers: np.ndarray,
    threads: int = 1,
    block: int = _KM_BLOCK,
    labels_out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The CPU k-means pass (see module docstring): ``(labels int32, sums, counts, inertia)``.

    ``points`` may be float32 or float64 (float32 coordinates are widened exactly; distances are float64).
    ``labels_out``: an (n,) int32 array to write the labels into (saves faulting in fresh memory per call).
    """
    X = np.asarray(points)
    if X.dtype not in (np.float32, np.float64) or not X.flags.c_contiguous:
        X = np.ascontiguousarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"points must be (n, d), got shape {X.shape}")
    n, d = X.shape
    C = np.ascontiguousarray(centers, dtype=np.float64)
    if C.ndim != 2 or C.shape[1] != d or C.shape[0] < 1:
        raise ValueError(f"centers must have shape (k, {d}) with k >= 1, got {C.shape}")
    k = C.shape[0]
    if n == 0:
        return np.empty(0, dtype=np.int32), np.zeros((k, d)), np.zeros(k, dtype=np.int64), 0.0
    if not HAVE_NUMBA or k * d > _KM_DIRECT_MAX_KD:  # BLAS form with exact refinement
        labels, d2 = squared_distances_min(X, C)
        counts = np.bincount(labels, minlength=k).astype(np.int64)
        sums = np.stack([np.bincount(labels, weights=X[:, t], minlength=k) for t in range(d)], axis=1)
        return labels, sums, counts, float(d2.sum())
    if labels_out is not None and labels_out.shape == (n,) and labels_out.dtype == np.int32:
        labels = labels_out
    else:
        labels = np.empty(n, dtype=np.int32)
    threads = max(1, int(threads))
    nblocks = -(-n // block)
    nchunks = int(min(nblocks, 8 * threads))
    prev = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        sums, counts, inertia, _ = _assign_sums_kernel(X, C, labels, block, nchunks)
    finally:
        numba.set_num_threads(prev)
    return labels, sums, counts, float(inertia)


# --------------------------------------------------------------------------------------------------------------
# CPU backend
# --------------------------------------------------------------------------------------------------------------


class CpuPrepared(PreparedPoints):
    backend_name = "cpu"

    def __init__(self, points: np.ndarray, tree: cKDTree | None = None) -> None:
        super().__init__(np.ascontiguousarray(points, dtype=np.float64))
        self._tree = tree

    @property
    def tree(self) -> cKDTree:
        if self._tree is None:
            self._tree = build_kdtree(self.points) if len(self.points) else cKDTree(self.points)
        return self._tree


def morton_order(queries: np.ndarray) -> np.ndarray:
    """Permutation visiting ``queries`` along a Morton curve over their bounding box."""
    q = np.asarray(queries, dtype=np.float64)
    lo = q.min(axis=0)
    hi = q.max(axis=0)
    keys = curve_keys(q, lo, np.where(hi > lo, hi, lo + 1.0), curve="morton")
    return np.argsort(keys, kind="stable")


class CpuBackend(KernelBackend):
    """NumPy / SciPy / Numba kernels (see module docstring).

    Args:
        threads: compute threads per call (cKDTree ``workers``, Numba threads of the k-means pass).
        presorted_queries: the caller passes kNN queries already in curve order (the planner does), so
            ``knn`` does not reorder them.
        hamerly: ``lloyd_state`` returns the stateful Hamerly kernel (``kmeans_compiled``) instead of an
            :class:`AssignLloydState` over the blocked pass.
    """

    name = "cpu"
    device = "cpu"

    def __init__(self, threads: int = 1, presorted_queries: bool = False, hamerly: bool = True) -> None:
        self.threads = max(1, int(threads))
        self.presorted_queries = bool(presorted_queries)
        self.hamerly = bool(hamerly)

    def prepare(self, points: np.ndarray, tree: cKDTree | None = None) -> CpuPrepared:
        return CpuPrepared(points, tree)

    # -- k-means -------------------------------------------------------------------------------------------
    def kmeans_assign_sums(
        self, points: Any, centers: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        X = points.points if isinstance(points, PreparedPoints) else points
        return cpu_assign_sums(X, centers, self.threads)

    def nearest_center(self, points: Any, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X = points.points if isinstance(points, PreparedPoints) else points
        return squared_distances_min(X, centers)

    def lloyd_state(self, points: Any) -> Any:
        if self.hamerly:
            X = points.points if isinstance(points, PreparedPoints) else points
            return new_lloyd_state(X)
        return super().lloyd_state(points)

    # -- queries ------------------------------------------------------------------------------------------
    def knn(
        self, points: Any, queries: np.ndarray, k: int, bound: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        P = self._prep(points)
        Q = np.ascontiguousarray(queries, dtype=np.float64)
        m = len(Q)
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if m == 0 or P.n == 0:
            return np.full((m, k), np.inf), np.full((m, k), -1, dtype=np.int64)
        order = None
        if not self.presorted_queries and m >= _MORTON_MIN_QUERIES:
            order = morton_order(Q)
            Q = Q[order]
            if bound is not None:
                bound = np.asarray(bound, dtype=np.float64)[order]
        kk = min(k, P.n)
        if bound is None:
            dist, idx = P.tree.query(Q, k=kk, workers=self.threads)
        else:
            ub = np.nextafter(np.asarray(bound, dtype=np.float64), np.inf)
            dist, idx = P.tree.query(Q, k=kk, workers=self.threads, distance_upper_bound=float(ub.max()))
            dist = np.asarray(dist, dtype=np.float64).reshape(m, kk)
            idx = np.asarray(idx).reshape(m, kk)
            outside = dist > ub[:, None]
            if outside.any():
                dist[outside] = np.inf
                idx[outside] = P.n
        dist = np.asarray(dist, dtype=np.float64).reshape(m, kk)
        idx = np.asarray(idx, dtype=np.int64).reshape(m, kk)
        idx[idx >= P.n] = -1
        if kk < k:
            dist = np.concatenate([dist, np.full((m, k - kk), np.inf)], axis=1)
            idx = np.concatenate([idx, np.full((m, k - kk), -1, dtype=np.int64)], axis=1)
        if order is not None:
            d_out = np.empty_like(dist)
            i_out = np.empty_like(idx)
            d_out[order] = dist
            i_out[order] = idx
            dist, idx = d_out, i_out
        return dist, idx

    def radius(self, points: Any, centers: np.ndarray, radii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        P = self._prep(points)
        Cq = np.atleast_2d(np.asarray(centers, dtype=np.float64))
        m = len(Cq)
        r = np.broadcast_to(np.asarray(radii, dtype=np.float64), (m,))
        if m == 0 or P.n == 0:
            return _empty_csr(m)
        hits = P.tree.query_ball_point(Cq, r, workers=self.threads, return_sorted=True)
        counts = np.fromiter((len(h) for h in hits), dtype=np.int64, count=m)
        offsets = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        rows = np.fromiter((i for h in hits for i in h), dtype=np.int64, count=int(offsets[-1]))
        return offsets, rows

    def box(self, points: Any, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        P = self._prep(points)
        lo, hi = _as_boxes(lo, hi, P.d)
        m = len(lo)
        if m == 0 or P.n == 0:
            return _empty_csr(m)
        # a Chebyshev ball around each box centre covers the box; filter exactly afterwards
        center = (lo + hi) / 2.0
        half = ((hi - lo) / 2.0).max(axis=1) * (1 + 1e-12) + 1e-300
        hits = P.tree.query_ball_point(center, half, p=np.inf, workers=self.threads, return_sorted=True)
        counts = np.fromiter((len(h) for h in hits), dtype=np.int64, count=m)
        cand = np.fromiter((i for h in hits for i in h), dtype=np.int64, count=int(counts.sum()))
        q = np.repeat(np.arange(m), counts)
        pts = P.points[cand]
        keep = np.all((pts >= lo[q]) & (pts <= hi[q]), axis=1)
        offsets = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(np.bincount(q[keep], minlength=m), out=offsets[1:])
        return offsets, cand[keep]

    def distance_tile(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return exact_sqdist(np.atleast_2d(a), np.atleast_2d(b))


# --------------------------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------------------------


def cuda_available() -> bool:
    """Whether PyTorch is installed and sees a CUDA device (never raises)."""
    try:
        import torch
    except Exception:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - broken driver
        return False
