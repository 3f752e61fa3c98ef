"""Curve runs: points sorted by a space-filling-curve key, searched through block bounding boxes. No Ray.

A *run* is the structure :class:`~distspatial.kernels.local_index.LocalPartition` keeps for freshly ingested points
(its delta), next to the partition's KD-tree. What makes it the right structure for a live feed is that it
costs almost nothing to build and to merge:

* **Build**: sort the new points by their Morton key and take the bounding box of every block of :data:`BLOCK`
  consecutive points, of every group of :data:`GROUP` blocks and of every super-group of :data:`GROUP` groups
  (one compiled pass each).
* **Merge**: two runs are merged like sorted lists (a stable sort of the concatenated keys, which finds the two
  sorted stretches and merges them in linear time) and their boxes recomputed. A partition keeps its runs as
  a log-structured merge: sizes shrinking by at least :data:`FANOUT` from the oldest to the newest, so each
  point is rewritten ``log_FANOUT(n / batch)`` times and a query visits a handful of runs.

Points next on the curve are close in space, so the blocks are small boxes and a search prunes most of them.
The kNN kernel visits the query's own group first (found by the query's key), then the other groups walking
outwards along the curve, skipping every group and block whose box is farther than the current k-th distance.

Exactness: a point's squared distance is ``sum_t (x_t - q_t)**2`` added in dimension order in float64 (what
``cKDTree`` computes for d <= 3); a box's distance is computed the same way from the box faces, which rounds
to at most any of its points' distances, so pruning never drops a point that belongs in the answer (ties at the
k-th distance aside, as with any kNN). Radius search includes points with ``d**2 <= r**2``, as ``cKDTree`` does.

    >>> import numpy as np
    >>> pts = np.array([[0.0, 0.0], [1.0, 1.0], [3.0, 3.0]])
    >>> run = CurveRun.build(pts, np.array([10, 11, 12]), morton_frame(pts))
    >>> dist, rows = run.knn(np.array([[0.9, 0.9]]), 2)
    >>> run.ids[rows].tolist()
    [[11, 10]]
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..core.curves import curve_keys

__all__ = ["BLOCK", "GROUP", "FANOUT", "CurveRun", "morton_frame"]

#: points per block (the unit a search scans) and blocks per group (the unit it skips first)
BLOCK = 32
GROUP = 32
#: a partition's runs shrink by at least this factor from the oldest to the newest (see LocalPartition)
FANOUT = 4


def morton_frame(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The box ``(lo, hi)`` that curve keys of a partition's runs are computed in (the points' bounding box).

    Points outside it get the key of the nearest point of the box: runs stay correct, only less compact.
    """
    if not len(points):
        raise ValueError("a frame needs at least one point")
    pts = np.ascontiguousarray(points, dtype=np.float64)
    lo, hi = _boxes(pts, pts, len(pts))  # one compiled pass (numpy's axis-0 min/max is slow on (n, 2))
    return lo[0], hi[0]


def _keys(points: np.ndarray, frame: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return curve_keys(points, frame[0], frame[1], "morton")  # quantization clips points outside the frame


@njit(cache=True, nogil=True)
def _boxes(lo_in, hi_in, size):  # pragma: no cover - compiled
    """Bounding boxes of consecutive groups of ``size`` rows of the boxes ``[lo_in, hi_in]`` (points: both)."""
    n, d = lo_in.shape
    nb = (n + size - 1) // size
    lo = np.empty((nb, d))
    hi = np.empty((nb, d))
    for b in range(nb):
        for t in range(d):
            lo[b, t] = lo_in[b * size, t]
            hi[b, t] = hi_in[b * size, t]
        for i in range(b * size + 1, min(n, (b + 1) * size)):
            for t in range(d):
                if lo_in[i, t] < lo[b, t]:
                    lo[b, t] = lo_in[i, t]
                if hi_in[i, t] > hi[b, t]:
                    hi[b, t] = hi_in[i, t]
    return lo, hi


class CurveRun:
    """Points sorted by curve key with block and group boxes; ``ids`` and ``keys`` in the same order.

    Rows never move while the run lives (a merge makes a new run). ``dead`` (a bool mask or None) marks rows
    to skip; their points stay in the boxes, which only makes the boxes larger than needed.
    """

    __slots__ = ("points", "ids", "keys", "blo", "bhi", "glo", "ghi", "slo", "shi", "frame")

    def __init__(self, points: np.ndarray, ids: np.ndarray, keys: np.ndarray,
                 frame: tuple[np.ndarray, np.ndarray]) -> None:
        self.points, self.ids, self.keys, self.frame = points, ids, keys, frame
        if len(points):
            self.blo, self.bhi = _boxes(points, points, BLOCK)
            self.glo, self.ghi = _boxes(self.blo, self.bhi, GROUP)
            self.slo, self.shi = _boxes(self.glo, self.ghi, GROUP)
        else:
            d = points.shape[1]
            self.blo = self.bhi = self.glo = self.ghi = self.slo = self.shi = np.empty((0, d))

    @classmethod
    def build(cls, points: np.ndarray, ids: np.ndarray, frame: tuple[np.ndarray, np.ndarray]) -> CurveRun:
        """Sort ``points`` (``(n, d)`` float64) and ``ids`` by the Morton key of the points in ``frame``."""
        points = np.ascontiguousarray(points, dtype=np.float64)
        keys = _keys(points, frame)
        order = np.argsort(keys)  # equal keys are one grid cell: their order does not matter (5x a stable sort)
        return cls(np.take(points, order, axis=0), np.take(ids, order), np.take(keys, order), frame)

    @classmethod
    def merge(cls, a: CurveRun, b: CurveRun, dead_a: np.ndarray | None = None,
              dead_b: np.ndarray | None = None) -> CurveRun:
        """One run holding the live rows of runs ``a`` and ``b`` (same frame), in one linear pass."""
        na = len(a) - (0 if dead_a is None else int(np.count_nonzero(dead_a)))
        nb = len(b) - (0 if dead_b is None else int(np.count_nonzero(dead_b)))
        keys = np.empty(na + nb, dtype=a.keys.dtype)
        pts = np.empty((na + nb, a.points.shape[1]))
        dtype = np.result_type(a.ids, b.ids)  # never narrow: a newer run may hold ids past int32
        ids = np.empty(na + nb, dtype=dtype)
        _merge_two(a.keys, a.points, a.ids.astype(dtype, copy=False), _mask(dead_a, len(a)), b.keys, b.points,
                   b.ids.astype(dtype, copy=False),
                   _mask(dead_b, len(b)), keys, pts, ids)
        return cls(pts, ids, keys, a.frame)

    def __len__(self) -> int:
        return len(self.points)

    def _start_rows(self, queries: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.keys, _keys(queries, self.frame)).astype(np.int64)

    def knn(self, queries: np.ndarray, k: int, ub: np.ndarray | None = None,
            dead: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(distances (m, k), rows (m, k))`` of the k nearest live rows, ascending; only rows at distance
        ``<= ub[i]`` when ``ub`` is given. Empty slots hold ``inf`` / ``-1``."""
        q = np.ascontiguousarray(queries, dtype=np.float64)
        m = len(q)
        d2 = np.full((m, k), np.inf)
        rows = np.full((m, k), -1, dtype=np.int64)
        if m == 0 or len(self.points) == 0:
            return d2, rows
        # prune with the bound rounded up (squaring rounds), then keep exactly the rows within it
        ub2 = np.full(m, np.inf) if ub is None else np.square(np.asarray(ub, dtype=np.float64) * (1 + 1e-12))
        _knn_kernel(self.points, self.blo, self.bhi, self.glo, self.ghi, self.slo, self.shi,
                    _mask(dead, len(self.points)), q, self._start_rows(q), ub2, d2, rows)
        dist = np.sqrt(d2, out=d2)
        if ub is not None:
            out = dist > np.asarray(ub, dtype=np.float64)[:, None]  # sorted: these are a tail of each row
            dist[out] = np.inf
            rows[out] = -1
        return dist, rows

    def radius(self, centers: np.ndarray, radii: np.ndarray,
               dead: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """CSR ``(offsets (m + 1,), rows)`` of the live rows with ``d**2 <= r**2``, ascending per center."""
        c = np.ascontiguousarray(centers, dtype=np.float64)
        r2 = np.square(np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(c),)))
        if len(self.points) == 0:
            return np.zeros(len(c) + 1, dtype=np.int64), np.empty(0, dtype=np.int64)
        return _radius_kernel(self.points, self.blo, self.bhi, self.glo, self.ghi, self.slo, self.shi,
                              _mask(dead, len(self.points)), c, np.ascontiguousarray(r2))

    def box(self, lo: np.ndarray, hi: np.ndarray, dead: np.ndarray | None = None) -> np.ndarray:
        """Live rows with ``lo <= p <= hi`` in every dimension, ascending."""
        if len(self.points) == 0:
            return np.empty(0, dtype=np.int64)
        hit = np.flatnonzero(np.all((self.bhi >= lo) & (self.blo <= hi), axis=1))
        if not len(hit):
            return np.empty(0, dtype=np.int64)
        cand = (hit[:, None] * BLOCK + np.arange(BLOCK)).ravel()
        cand = cand[cand < len(self.points)]
        pts = self.points[cand]
        keep = np.all((pts >= lo) & (pts <= hi), axis=1)
        if dead is not None:
            keep &= ~dead[cand]
        return cand[keep]


def _mask(dead: np.ndarray | None, n: int) -> np.ndarray:
    return np.zeros(n, dtype=np.bool_) if dead is None else dead


@njit(cache=True, nogil=True)
def _merge_two(ka, pa, ia, da, kb, pb, ib, db, keys, pts, ids):  # pragma: no cover - compiled
    """Merge two key-sorted runs, skipping dead rows (``a`` first among equal keys)."""
    na, nb, d = ka.shape[0], kb.shape[0], pa.shape[1]
    i = j = c = 0
    while True:
        while i < na and da[i]:
            i += 1
        while j < nb and db[j]:
            j += 1
        if i < na and (j >= nb or ka[i] <= kb[j]):
            keys[c] = ka[i]
            ids[c] = ia[i]
            for t in range(d):
                pts[c, t] = pa[i, t]
            i += 1
        elif j < nb:
            keys[c] = kb[j]
            ids[c] = ib[j]
            for t in range(d):
                pts[c, t] = pb[j, t]
            j += 1
        else:
            break
        c += 1


@njit(cache=True, nogil=True, inline="always")
def _box_d2(q, lo, hi, i):  # pragma: no cover - compiled
    """Squared distance from ``q`` to box ``i`` (0 inside), in dimension order like a point distance."""
    s = 0.0
    for t in range(q.shape[0]):
        g = lo[i, t] - q[t]
        if g <= 0.0:
            g = q[t] - hi[i, t]
            if g < 0.0:
                g = 0.0
        s += g * g
    return s


@njit(cache=True, nogil=True, inline="always")
def _point_d2(q, pts, i):  # pragma: no cover - compiled
    """Squared distance from ``q`` to point ``i``, added in dimension order."""
    s = 0.0
    for t in range(q.shape[0]):
        x = pts[i, t] - q[t]
        s += x * x
    return s


@njit(cache=True, nogil=True)
def _scan_group(pts, blo, bhi, dead, q, g, ub2, hd, hr):  # pragma: no cover - compiled
    """Scan the blocks of group ``g`` into the sorted top-k ``(hd, hr)``."""
    n = pts.shape[0]
    k = hd.shape[0]
    nb = blo.shape[0]
    for b in range(g * GROUP, min(nb, (g + 1) * GROUP)):
        mb = _box_d2(q, blo, bhi, b)
        if mb > ub2 or mb >= hd[k - 1]:
            continue
        for i in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
            if dead[i]:
                continue
            s = _point_d2(q, pts, i)
            if s < hd[k - 1] and s <= ub2:
                j = k - 1
                while j > 0 and hd[j - 1] > s:
                    hd[j] = hd[j - 1]
                    hr[j] = hr[j - 1]
                    j -= 1
                hd[j] = s
                hr[j] = i


@njit(cache=True, nogil=True)
def _knn_kernel(pts, blo, bhi, glo, ghi, slo, shi, dead, queries, starts, ub2, out_d2, out_rows):  # pragma: no cover
    """Per query: its own group (by curve position) first, then the super-groups walking outwards along the
    curve from its own, each group and block skipped when its box is farther than the current k-th distance."""
    n = pts.shape[0]
    ng = glo.shape[0]
    ns = slo.shape[0]
    k = out_d2.shape[1]
    for qi in range(queries.shape[0]):
        q = queries[qi]
        hd = out_d2[qi]
        hr = out_rows[qi]
        u = ub2[qi]
        g0 = min(starts[qi], n - 1) // (BLOCK * GROUP)
        s0 = g0 // GROUP
        _scan_group(pts, blo, bhi, dead, q, g0, u, hd, hr)
        for step in range(2 * ns):  # s0, s0 + 1, s0 - 1, s0 + 2, ...
            off = (step + 1) // 2
            sg = s0 + off if step % 2 == 1 else s0 - off
            if sg < 0 or sg >= ns:
                if off > s0 and off >= ns - s0:
                    break
                continue
            ms = _box_d2(q, slo, shi, sg)
            if ms > u or ms >= hd[k - 1]:
                continue
            for g in range(sg * GROUP, min(ng, (sg + 1) * GROUP)):
                if g == g0:
                    continue
                mg = _box_d2(q, glo, ghi, g)
                if mg > u or mg >= hd[k - 1]:
                    continue
                _scan_group(pts, blo, bhi, dead, q, g, u, hd, hr)


@njit(cache=True, nogil=True)
def _radius_kernel(pts, blo, bhi, glo, ghi, slo, shi, dead, centers, r2):  # pragma: no cover - compiled
    n = pts.shape[0]
    nb = blo.shape[0]
    ng = glo.shape[0]
    ns = slo.shape[0]
    m = centers.shape[0]
    offsets = np.zeros(m + 1, dtype=np.int64)
    out = np.empty(max(16, 4 * m), dtype=np.int64)
    c = 0
    for qi in range(m):
        q = centers[qi]
        rr = r2[qi]
        for sg in range(ns):
            if _box_d2(q, slo, shi, sg) > rr:
                continue
            for g in range(sg * GROUP, min(ng, (sg + 1) * GROUP)):
                if _box_d2(q, glo, ghi, g) > rr:
                    continue
                for b in range(g * GROUP, min(nb, (g + 1) * GROUP)):
                    if _box_d2(q, blo, bhi, b) > rr:
                        continue
                    for i in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
                        if dead[i]:
                            continue
                        s = _point_d2(q, pts, i)
                        if s <= rr:
                            if c == out.shape[0]:
                                grown = np.empty(2 * c, dtype=np.int64)
                                grown[:c] = out
                                out = grown
                            out[c] = i
                            c += 1
        offsets[qi + 1] = c
    return offsets, out[:c]

def warm_up() -> None:
    """Compile (or load from Numba's cache) every kernel here on tiny inputs, so that the first ingest into a
    live index does not stall a query for the compile (a node calls this in a background thread at start)."""
    pts = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.5]])
    ids = np.arange(3, dtype=np.int64)
    run = CurveRun.build(pts, ids, morton_frame(pts))
    run = CurveRun.merge(run, run, np.array([True, False, False]), None)
    run.knn(pts, 2, np.ones(3))
    run.radius(pts, np.ones(3))
