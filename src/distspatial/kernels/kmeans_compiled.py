"""Compiled (Numba) Lloyd kernel: one fused pass per iteration with Hamerly's bounds. No Ray.

Same contract as :class:`distspatial.kernels.kmeans_kernels.LloydState` (the NumPy implementation, used when Numba is
missing): the squared distance of ``x`` to ``c`` is ``sum_j (x_j - c_j)**2`` summed in dimension order in
float64, a point takes the centre with the smallest one, and the lowest index wins exact ties. Labels are
identical to that full computation; sums and inertia are built from the exact squared distances.

Per point the state keeps its label, the exact squared distance to its centre and a lower bound ``l`` on the
distance to every other centre (Hamerly, SDM 2010). Each step recomputes the own distance ``u`` exactly (the
inertia needs it anyway), decreases ``l`` by the largest shift of the other centres, and scans all ``k`` centres
only when ``u`` is not provably smaller than ``max(l, s(a))``, with ``s(a)`` half the distance from the own
centre to its nearest other centre. Bounds carry a relative and an absolute slack, so a point skips the scan
only when its own centre is strictly nearer than all others despite rounding.

>>> import numpy as np
>>> st = CompiledLloydState(np.array([[0.0], [1.0], [9.0], [10.0]]))
>>> sums, counts, inertia, changed = st.step(np.array([[0.0], [2.0]]))
>>> counts.tolist(), changed
([1, 3], 4)
"""

from __future__ import annotations

import numpy as np

from .kmeans_kernels import LloydState as NumpyLloydState, check_centers, top_farthest

try:  # Numba is a dependency, but keep a working fallback on platforms without a wheel
    from numba import njit

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False

__all__ = ["HAVE_NUMBA", "CompiledLloydState", "new_lloyd_state"]

_REL_SLACK = 1e-9


if HAVE_NUMBA:

    @njit(cache=True, nogil=True)
    def _centre_geometry(C, Cold, first):  # pragma: no cover - compiled
        """Centre-to-centre distances sorted per centre, half separations and centre shifts."""
        k, d = C.shape
        cc = np.empty((k, k))
        for j in range(k):
            for j2 in range(k):
                s = 0.0
                for t in range(d):
                    diff = C[j, t] - C[j2, t]
                    s += diff * diff
                cc[j, j2] = np.sqrt(s)
        order = np.empty((k, k), dtype=np.int64)
        cc_sorted = np.empty((k, k))
        half_sep = np.empty(k)
        for j in range(k):
            row = cc[j].copy()
            row[j] = -1.0  # the centre itself first
            o = np.argsort(row, kind="mergesort")
            order[j] = o
            for q in range(k):
                cc_sorted[j, q] = cc[j, o[q]]
            half_sep[j] = 0.5 * cc_sorted[j, 1] if k > 1 else np.inf
        shift = np.zeros(k)
        if not first:
            for j in range(k):
                s = 0.0
                for t in range(d):
                    diff = C[j, t] - Cold[j, t]
                    s += diff * diff
                shift[j] = np.sqrt(s)
        return order, cc_sorted, half_sep, shift

    @njit(cache=True, nogil=True)
    def _lloyd_pass(X, C, Cold, first, labels, lower, d2own, guard):  # pragma: no cover - compiled
        n, d = X.shape
        k = C.shape[0]
        order, cc_sorted, half_sep, shift = _centre_geometry(C, Cold, first)
        # largest and second-largest shift: the largest shift among the *other* centres of any point
        m1, m2, j1 = 0.0, 0.0, -1
        for j in range(k):
            if shift[j] > m1:
                m2 = m1
                m1 = shift[j]
                j1 = j
            elif shift[j] > m2:
                m2 = shift[j]
        sums = np.zeros((k, d))
        counts = np.zeros(k, dtype=np.int64)
        inertia = 0.0
        changed = 0
        scanned = 0
        CT = np.ascontiguousarray(C.T)
        dist = np.empty(k)
        up = 1.0 + _REL_SLACK
        down = 1.0 - _REL_SLACK
        for i in range(n):
            a = labels[i]
            if not first:
                s = 0.0
                for t in range(d):
                    diff = X[i, t] - C[a, t]
                    s += diff * diff
                ms = m2 if a == j1 else m1
                lo = lower[i] - ms * up - guard
                lower[i] = lo
                bound = half_sep[a] if half_sep[a] > lo else lo
                u = np.sqrt(s)
                if u * up + guard < bound * down:  # provably strictly nearest: keep the label
                    d2own[i] = s
                    inertia += s
                    counts[a] += 1
                    for t in range(d):
                        sums[a, t] += X[i, t]
                    continue
                scanned += 1
                # Pruned scan: centres in order of distance from the old centre a; a centre j with
                # cc(a, j) > 2u is strictly farther than a (triangle inequality), and so is every later one.
                best, bj = s, a
                second = np.inf
                cut = 2.0 * u * up + guard
                stop_cc = np.inf
                for q in range(1, k):
                    ccq = cc_sorted[a, q]
                    if ccq > cut:
                        stop_cc = ccq
                        break
                    j = order[a, q]
                    sj = 0.0
                    for t in range(d):
                        diff = X[i, t] - C[j, t]
                        sj += diff * diff
                    if sj < best or (sj == best and j < bj):
                        second = best
                        best, bj = sj, j
                    elif sj < second:
                        second = sj
                # unscanned centres are at least stop_cc - u away
                lb = np.sqrt(second)
                rest = stop_cc - u
                lower[i] = (lb if lb < rest else rest) * down - guard
            else:
                scanned += 1
                # full scan, vectorized over the centres: dist[j] accumulates dimension by dimension (same order
                # of additions as sum_j (x_j - c_j)**2)
                for j in range(k):
                    dist[j] = 0.0
                for t in range(d):
                    xt = X[i, t]
                    for j in range(k):
                        diff = xt - CT[t, j]
                        dist[j] += diff * diff
                best = dist[0]
                bj = 0
                for j in range(1, k):  # lowest index wins exact ties, as np.argmin
                    if dist[j] < best:
                        best = dist[j]
                        bj = j
                dist[bj] = np.inf  # second best, branch-free (tracking it in the loop above is 2x slower)
                second = np.inf
                for j in range(k):
                    v = dist[j]
                    second = v if v < second else second
                lower[i] = np.sqrt(second) * down - guard
            if bj != a:
                changed += 1
                labels[i] = bj
            d2own[i] = best
            inertia += best
            counts[bj] += 1
            for t in range(d):
                sums[bj, t] += X[i, t]
        return sums, counts, inertia, changed, scanned


class CompiledLloydState:
    """Per-partition Lloyd state with a compiled Hamerly pass (see module docstring).

    Same API as :class:`distspatial.kernels.kmeans_kernels.LloydState`: ``step``, ``labels``, ``farthest``,
    ``farthest_indices``.
    """

    def __init__(self, points: np.ndarray) -> None:
        if not HAVE_NUMBA:  # pragma: no cover
            raise ImportError("CompiledLloydState needs numba; use new_lloyd_state() for a fallback")
        X = np.ascontiguousarray(points, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"points must be (n, d), got shape {X.shape}")
        self.points = X
        self.n, self.d = X.shape
        self.labels = np.full(self.n, -1, dtype=np.int32)
        self._lower = np.zeros(self.n)
        self._d2 = np.zeros(self.n)
        self._C: np.ndarray | None = None
        self.last_candidates = 0  # points that needed a scan of all centres in the last step (diagnostic)
        scale = float(np.abs(X).max()) if self.n else 0.0
        self._scale = scale

    def step(self, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, int]:
        """Assign every point to its nearest centre: ``(sums (k, d), counts (k,), inertia, n_changed)``."""
        C = check_centers(centers, self.d)
        k = C.shape[0]
        if self.n == 0:
            self._C = C.copy()
            return np.zeros((k, self.d)), np.zeros(k, dtype=np.int64), 0.0, 0
        first = self._C is None or self._C.shape[0] != k  # a full pass; labels start at -1, so all count
        guard = 1e-12 * max(self._scale, float(np.abs(C).max()), 1e-300)
        Cold = C if first else self._C
        sums, counts, inertia, changed, self.last_candidates = _lloyd_pass(
            self.points, C, Cold, first, self.labels, self._lower, self._d2, guard
        )
        self._C = C.copy()
        return sums, counts, float(inertia), int(changed)

    def farthest_indices(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the ``m`` points farthest from their centre and their squared distances, farthest first
        (ties by row)."""
        if self._C is None:
            raise RuntimeError("farthest_indices() needs a previous step()")
        m = int(min(max(m, 0), self.n))
        if m == 0:
            return np.empty(0, dtype=np.int64), np.empty(0)
        D = self._d2
        return top_farthest(D, m)

    def farthest(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """``(points, squared distances)`` of the ``m`` points farthest from their centre."""
        rows, d2 = self.farthest_indices(m)
        return self.points[rows].copy(), d2


def new_lloyd_state(points: np.ndarray) -> CompiledLloydState | NumpyLloydState:
    """The fastest available Lloyd state for ``points``: compiled when Numba is installed, else NumPy."""
    return CompiledLloydState(points) if HAVE_NUMBA else NumpyLloydState(points)
