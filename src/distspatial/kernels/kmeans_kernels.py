"""Exact, single-threaded numpy kernels for distributed Lloyd k-means.

Every node of the cluster keeps one :class:`LloydState` per partition.  In each
Lloyd iteration the coordinator sends the current centres ``(k, d)``; each
state assigns its points to the nearest centre and returns only per-cluster
sums ``(k, d)``, counts ``(k,)``, the inertia and the number of changed labels;
the coordinator adds them up and divides.  The per-point state (labels,
distance bounds) never leaves the node.  :func:`squared_distances_min` is the
stateless full assignment (k-means|| initialisation, final assignment).

Exactness
---------
The "full computation" that everything here reproduces is: the squared distance
between a point ``x`` and a centre ``c`` is ``(x_0-c_0)**2 + (x_1-c_1)**2 + ...``
summed sequentially over the dimensions in float64, and a point gets the centre
with the smallest such value, the lowest centre index winning exact ties (as
``np.argmin``).  Labels and distances returned here are identical to that, and
sums/inertia are sums of those exact values.  All shortcuts are exact:

* :class:`LloydState` uses Hamerly's algorithm: per point a lower bound ``l``
  on the distance to every centre other than its own (decreased by the largest
  shift of the other centres at each step), plus half the distance from each
  centre to its nearest other centre.  The upper bound is the exact distance
  to the own centre, recomputed every step (the exact inertia needs it anyway).
  Every bound carries a relative slack (``_SLACK``) and an absolute rounding
  guard, so a point keeps its label without further work only when its centre
  is provably *strictly* nearer than all the others.  The other points
  ("candidates") are compared only with the centres ``j`` with
  ``cc(a, j) <= 2 u`` (any other centre is farther than the own centre ``a``),
  bucketed by how many such centres they need.
* The first step labels low-dimensional data (d <= 3) through a uniform grid:
  a cell whose box has a single possibly-nearest centre labels its points
  without distance computations; the rest use the full computation.
* For many centres or higher dimension the full computation uses the BLAS
  form ``||x||^2 - 2 x.c + ||c||^2`` (on coordinates shifted to the centres'
  mean) with a rigorous rounding-error bound, and re-evaluates with the exact
  form every centre that may be within that bound of the minimum.

Layout
------
A state stores its points column-major and sorted by label into contiguous
"segments", so that the per-step pass over all points works on contiguous
arrays with one scalar centre per segment (no gathers).  A point whose label
changes leaves a hole in its segment and moves to small "overflow" arrays; the
layout is re-sorted once the overflow has cost about as much as a re-sort.

The module uses numpy only (no Ray, no compiled code) and runs single-threaded
(BLAS is used only for large ``k * d``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["squared_distances_min", "LloydState"]

_EPS = float(np.finfo(np.float64).eps)
#: Relative slack applied to every distance bound: computed distances have a
#: relative error of a few ``d * eps``; 1e-9 dominates it for any d < ~1e6.
_SLACK = 1e-9
#: Rows per block of the elementwise passes (a few such blocks fit in L2).
_BLOCK = 32768
#: Re-sort a state once the overflow sizes summed over the steps since the last
#: re-sort exceed this fraction of its points (handling an overflow point costs
#: a few times more per step than a segment point; a re-sort costs a few passes).
_REBUILD_LOAD = 0.4
#: Label the first step through a grid filter (d <= 3) from this many points on.
_GRID_MIN_POINTS = 65536

# Note: np.take(..., out=...) is used with mode="clip" throughout (the indices
# are always valid): with the default mode="raise" numpy buffers the output,
# which makes it several times slower.

# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------


def _as_points(points: np.ndarray) -> np.ndarray:
    arr = np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise ValueError(f"points must be a 2-D array (n, d) with d >= 1, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float64)


def _as_centers(centers: np.ndarray, d: int) -> np.ndarray:
    arr = np.asarray(centers)
    if arr.ndim != 2 or arr.shape[1] != d or arr.shape[0] < 1:
        raise ValueError(f"centers must be a 2-D array (k, {d}) with k >= 1, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("centers must be finite")
    return arr


def _use_direct(k: int, d: int) -> bool:
    """Elementwise loop over centres (True) or BLAS form with refinement (False).

    Measured (single thread, float64): for d = 2 the elementwise loop wins up to
    k ~ 40-60; for d >= 8 the BLAS form wins from k ~ 10.
    """
    return k == 1 or k * (d + 1) <= 80


def _touched(n: int, dtype: type) -> np.ndarray:
    """A new array whose pages are already faulted in (np.zeros would map them lazily)."""
    arr = np.empty(n, dtype=dtype)
    arr.fill(0)
    return arr


def _max_finite(a: np.ndarray) -> float:
    """Largest finite value of ``a`` (0.0 if none)."""
    if a.size == 0:
        return 0.0
    m = float(a.max())
    if m == np.inf:
        f = a[np.isfinite(a)]
        m = float(f.max()) if f.size else 0.0
    return max(m, 0.0)


# cost model of the candidate search (seconds), measured on numpy 2.x: per
# centre per kernel call, per point-centre, per group, per point per group
_COST_CALL, _COST_PC, _COST_GROUP, _COST_POINT = 5e-6, 4e-9, 25e-6, 10e-9


def _merge_buckets(sizes: list[int], c_list: list[int]) -> list[tuple[int, int]]:
    """Partition the non-empty buckets into runs of consecutive buckets.

    Bucket q holds ``sizes[q]`` points needing at most ``c_list[q]`` centres
    besides their own; a run is searched with ``c_list[last] + 1`` centres in
    one kernel call.  Chooses the runs minimising the modelled time (many
    small buckets cost more in per-call overhead than the extra centres).
    Returns the runs as (first, last) bucket indices.
    """
    qs = [q for q, s in enumerate(sizes) if s]
    nq = len(qs)
    best = [0.0] + [np.inf] * nq
    prev = [0] * (nq + 1)
    for j in range(1, nq + 1):
        c = c_list[qs[j - 1]] + 1
        m = 0
        for i in range(j - 1, -1, -1):
            m += sizes[qs[i]]
            cost = best[i] + _COST_GROUP + c * (_COST_CALL + _COST_PC * m) + _COST_POINT * m
            if cost < best[j]:
                best[j], prev[j] = cost, i
    runs = []
    j = nq
    while j > 0:
        i = prev[j]
        runs.append((qs[i], qs[j - 1]))
        j = i
    return runs[::-1]


def _center_distances_lo(C: np.ndarray) -> np.ndarray:
    """(k, k) lower bounds (deflated by the slack) of the centre-centre distances, +inf diagonal."""
    k = C.shape[0]
    cc = np.empty((k, k))
    for j in range(k):
        cc[j] = _sqdist_rows(C, np.broadcast_to(C[j], C.shape))
    np.sqrt(cc, out=cc)
    cc *= 1.0 - _SLACK
    np.fill_diagonal(cc, np.inf)
    return cc


def _grid_labels(X: np.ndarray, C: np.ndarray, out: np.ndarray) -> bool:
    """Exact labels via a uniform grid filter, for low dimension (d <= 3).

    Each grid cell (box, slightly enlarged to contain every point that the
    rounding of the cell computation puts in it) gets the centres that can be
    nearest to some point of the box: ``mindist(c_j, box) <= min_i
    maxdist(c_i, box)``, with a relative slack.  Points of cells with a single
    such centre take it without any distance computation; the others go
    through the full computation.  Writes the labels into ``out`` and returns
    True, or returns False when the grid would not pay off.
    """
    n, d = X.shape
    k = C.shape[0]
    if d > 3 or k < 2 or n < _GRID_MIN_POINTS:
        return False
    n_cells = int(min(65536, n // 32, max(256, (1 << 20) // k)))
    G = max(1, int(n_cells ** (1.0 / d)))
    # The grid spans the bounding box of a sample of the points; the outer
    # cells extend to infinity, so every point lies in its cell's box (points
    # outside the sample's box just land in outer cells, which are never
    # single-candidate).  (Column-wise reductions: numpy's axis-0 reduction of
    # a (n, 2) array is very slow.)
    sample = X[:: max(1, n // 32768)]
    lo = np.array([sample[:, i].min() for i in range(d)])
    hi = np.array([sample[:, i].max() for i in range(d)])
    ext = hi - lo
    Gd = np.where(ext > 0, G, 1)
    w = np.where(ext > 0, ext / Gd, 1.0)
    inv_w = 1.0 / w
    # cell boxes (cells x d), enlarged by a margin covering the rounding of
    # the cell index and of the box corners
    grids = np.meshgrid(*[np.arange(g) for g in Gd.tolist()], indexing="ij")
    q = np.stack([g.ravel() for g in grids], axis=1)
    margin = 1e-7 * w + 64.0 * _EPS * (np.abs(lo) + np.abs(hi))
    blo = lo + q * w - margin
    bhi = lo + (q + 1) * w + margin
    blo[q == 0] = -np.inf
    bhi[q == Gd - 1] = np.inf
    owner = np.empty(q.shape[0], dtype=np.intp)
    cs = max(1, 32768 // k)  # cells per chunk: small temporaries (fresh memory is slow)
    for q0 in range(0, q.shape[0], cs):
        q1 = min(q0 + cs, q.shape[0])
        mind = np.zeros((q1 - q0, k))
        maxd = np.zeros((q1 - q0, k))
        for i in range(d):
            ci = C[:, i][None, :]
            below = blo[q0:q1, i][:, None] - ci  # > 0: centre left of the box
            above = ci - bhi[q0:q1, i][:, None]  # > 0: centre right of the box
            gap = np.maximum(below, above)
            np.maximum(gap, 0.0, out=gap)
            gap *= gap
            mind += gap
            np.abs(below, out=below)
            np.abs(above, out=above)
            np.maximum(below, above, out=below)
            below *= below
            maxd += below
        thr = maxd.min(axis=1)
        thr *= 1.0 + 1e-9
        mind *= 1.0 - 1e-9
        ncand = np.count_nonzero(mind <= thr[:, None], axis=1)
        owner[q0:q1] = np.where(ncand == 1, maxd.argmin(axis=1), -1)
    bs = 16384
    t = np.empty(bs)
    cf = np.empty(bs)
    cell = np.empty(bs, dtype=np.intp)
    multi = []
    for b0 in range(0, n, bs):
        b1 = min(b0 + bs, n)
        nb = b1 - b0
        tt, cff, cc = t[:nb], cf[:nb], cell[:nb]
        # cell index computed in float (exact: integers < 2**53), one cast
        for i in range(d):
            dst = cff if i == 0 else tt
            np.subtract(X[b0:b1, i], lo[i], out=dst)
            dst *= inv_w[i]
            np.floor(dst, out=dst)
            np.clip(dst, 0, Gd[i] - 1, out=dst)
            if i:
                cff *= Gd[i]
                cff += tt
        cc[...] = cff
        ob = out[b0:b1]
        np.take(owner, cc, out=ob, mode="clip")
        mi = (ob < 0).nonzero()[0]
        if mi.size:
            mi += b0
            multi.append(mi)
    if multi:
        idx = np.concatenate(multi)
        out[idx] = squared_distances_min(X[idx], C)[0]
    return True


def _label_dtype(k: int) -> type:
    # small unsigned keys make numpy's stable argsort a radix sort
    if k <= 256:
        return np.uint8
    if k <= 65536:
        return np.uint16
    return np.intp


# --------------------------------------------------------------------------
# exact distance kernels
# --------------------------------------------------------------------------


def _sqdist_to(cols: list[np.ndarray], C: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """Exact squared distance of every point (SoA ``cols``) to ``C[lab]``."""
    d = C.shape[1]
    out = cols[0] - C[lab, 0]
    np.multiply(out, out, out=out)
    if d > 1:
        tmp = np.empty_like(out)
        for i in range(1, d):
            np.subtract(cols[i], C[lab, i], out=tmp)
            np.multiply(tmp, tmp, out=tmp)
            out += tmp
    return out


def _sqdist_rows(X: np.ndarray, Crows: np.ndarray) -> np.ndarray:
    """Exact squared distance between matching rows of ``X`` and ``Crows`` (both (m, d))."""
    diff = X - Crows
    np.multiply(diff, diff, out=diff)
    out = diff[:, 0].copy()
    for i in range(1, X.shape[1]):
        out += diff[:, i]
    return out


def _nearest_direct(
    cols: list[np.ndarray],
    C: np.ndarray,
    js: np.ndarray | None,
    second: bool,
    known: tuple[int, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Nearest of the centres ``C[js]`` (ascending indices) by the exact elementwise form.

    ``cols`` are the d coordinate columns (contiguous 1-D arrays of equal length m).
    ``known = (j, Dj)`` supplies the already computed exact squared distances
    to centre ``j`` (which must be in ``js``).  Returns (labels intp (m,) as
    indices into C, best squared distance (m,), second-smallest squared
    distance among ``js`` (m,) or None).  Ties go to the lowest index.  With a
    single centre the second distance is +inf.
    """
    m = cols[0].shape[0]
    d = C.shape[1]
    if js is None:
        js = np.arange(C.shape[0])
    cvals = C[js].tolist()
    jlist = [int(j) for j in js]
    kj, kD = known if known is not None else (-1, None)
    lab = np.empty(m, dtype=np.intp)
    best = np.empty(m)
    sec = np.empty(m) if second else None
    bs = min(_BLOCK, max(m, 1))
    t = np.empty(bs)
    u = np.empty(bs)
    lt = np.empty(bs, dtype=bool)
    for b0 in range(0, m, bs):
        b1 = min(b0 + bs, m)
        nb = b1 - b0
        xc = [c[b0:b1] for c in cols]
        bb, lb = best[b0:b1], lab[b0:b1]
        tt, uu, ll = t[:nb], u[:nb], lt[:nb]
        for q, (j, c) in enumerate(zip(jlist, cvals)):
            if j == kj:
                if q == 0:
                    np.copyto(bb, kD[b0:b1])
                    target = bb
                else:
                    target = kD[b0:b1]
            else:
                target = bb if q == 0 else tt
                np.subtract(xc[0], c[0], out=target)
                np.multiply(target, target, out=target)
                for i in range(1, d):
                    np.subtract(xc[i], c[i], out=uu)
                    np.multiply(uu, uu, out=uu)
                    target += uu
            if q == 0:
                lb.fill(j)
                if second:
                    sec[b0:b1].fill(np.inf)
                continue
            if second:
                np.maximum(bb, target, out=uu)
                np.minimum(sec[b0:b1], uu, out=sec[b0:b1])
            np.less(target, bb, out=ll)
            np.minimum(bb, target, out=bb)
            np.copyto(lb, j, where=ll)
    return lab, best, sec


def _nearest_gemm(
    X: np.ndarray, C: np.ndarray, js: np.ndarray | None, second: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Same contract as :func:`_nearest_direct`, for AoS rows ``X`` (m, d), via BLAS.

    ``A = -2 x.c + ||c||^2`` (on coordinates shifted by the centres' mean) is
    within ``E = gamma (||x||^2 + max ||c||^2)`` of ``D - ||x||^2``; every centre
    with ``A <= min(A) + 2E`` is re-evaluated with the exact form, so the result
    equals the exact full computation.  The returned "second" value is a lower
    bound (not the exact value) of the second-smallest exact squared distance.
    """
    m, d = X.shape
    if js is None:
        js = np.arange(C.shape[0])
    js = np.asarray(js, dtype=np.intp)
    Cj = C[js]
    kk = Cj.shape[0]
    ref = Cj.mean(axis=0)
    Cc = Cj - ref
    cn = np.einsum("ij,ij->i", Cc, Cc)
    cmax = float(cn.max())
    C2 = np.ascontiguousarray(-2.0 * Cc.T)
    # rounding of the shift, the dot products and the norms: < (2d + 16) eps (...)
    gamma = (8.0 * d + 64.0) * _EPS
    lab = np.empty(m, dtype=np.intp)
    best = np.empty(m)
    sec = np.empty(m) if second else None
    bs = int(min(16384, max(256, 262144 // kk)))
    for b0 in range(0, m, bs):
        b1 = min(b0 + bs, m)
        xb = X[b0:b1]
        xc = xb - ref
        xn = np.einsum("ij,ij->i", xc, xc)
        A = xc @ C2
        A += cn
        am = A.argmin(axis=1)
        rows = np.arange(b1 - b0)
        amin = A[rows, am]
        E = gamma * (xn + cmax)
        near = A <= (amin + 2.0 * E)[:, None]
        cnt = np.count_nonzero(near, axis=1)
        lb = am
        multi = np.flatnonzero(cnt > 1)
        if multi.size:
            rr, jj = np.nonzero(near[multi])  # row-major: ascending centre index per row
            Dp = _sqdist_rows(xb[multi[rr]], Cj[jj])
            seg = np.flatnonzero(np.r_[True, rr[1:] != rr[:-1]])
            rowmin = np.minimum.reduceat(Dp, seg)
            hit = np.flatnonzero(Dp == np.repeat(rowmin, np.diff(np.r_[seg, rr.size])))
            first = hit[np.r_[True, rr[hit[1:]] != rr[hit[:-1]]]]
            lb = am.copy()
            lb[multi[rr[first]]] = jj[first]
        lab[b0:b1] = js[lb]
        best[b0:b1] = _sqdist_rows(xb, Cj[lb])
        if second:
            if kk == 1:
                sec[b0:b1] = np.inf
            else:
                A[rows, am] = np.inf
                s2 = A.min(axis=1)
                s2 += xn
                s2 -= 3.0 * E
                np.maximum(s2, 0.0, out=s2)
                sec[b0:b1] = s2
    return lab, best, sec


def _nearest(
    X: np.ndarray | None,
    cols: list[np.ndarray] | None,
    C: np.ndarray,
    js: np.ndarray | None,
    second: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Dispatch between the elementwise and the BLAS kernel.

    Pass the points as AoS ``X`` (m, d) and/or as SoA ``cols``; the missing
    layout is derived when needed.
    """
    k = C.shape[0] if js is None else len(js)
    d = C.shape[1]
    if _use_direct(k, d):
        if cols is None:
            cols = [np.ascontiguousarray(X[:, i]) for i in range(d)]
        return _nearest_direct(cols, C, js, second)
    if X is None:
        X = np.stack(cols, axis=1)
    return _nearest_gemm(X, C, js, second)


def squared_distances_min(points: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre and exact squared distance to it, for every point.

    Full blocked computation (no state), used for the k-means|| initialisation
    (distance to a candidate set of possibly hundreds of centres) and for the
    final assignment.  Small ``k * d`` uses an elementwise loop over the centres
    on column-major blocks; larger ones use the BLAS form with an exact
    refinement of near ties.  Either way the result equals
    ``D = ((points[:, None, :] - centers[None]) ** 2)`` summed sequentially over
    the last axis, ``labels = D.argmin(1)``, ``dmin = D.min(1)``.

    Parameters
    ----------
    points : (n, d) float array
    centers : (k, d) float array, k >= 1

    Returns
    -------
    labels : (n,) int32
    dmin : (n,) float64, exact squared distances to ``centers[labels]``

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[0.0, 0.0], [1.0, 1.0], [4.0, 0.0]])
    >>> lab, d2 = squared_distances_min(X, np.array([[0.0, 0.0], [4.0, 1.0]]))
    >>> lab.tolist(), d2.tolist()
    ([0, 0, 1], [0.0, 2.0, 1.0])
    """
    X = _as_points(points)
    n, d = X.shape
    C = _as_centers(centers, d)
    k = C.shape[0]
    if n == 0:
        return np.empty(0, dtype=np.int32), np.empty(0)
    labels = np.empty(n, dtype=np.int32)
    dmin = np.empty(n)
    direct = _use_direct(k, d)
    bs = 4 * _BLOCK if direct else 65536  # outer block (the kernels block again)
    for b0 in range(0, n, bs):
        b1 = min(b0 + bs, n)
        if direct:
            cols = [np.ascontiguousarray(X[b0:b1, i]) for i in range(d)]
            lab, best, _ = _nearest_direct(cols, C, None, False)
        else:
            lab, best, _ = _nearest_gemm(X[b0:b1], C, None, False)
        labels[b0:b1] = lab
        dmin[b0:b1] = best
    return labels, dmin


# --------------------------------------------------------------------------
# Lloyd state
# --------------------------------------------------------------------------


class LloydState:
    """Per-partition state kept on a node between Lloyd iterations.

    Call :meth:`step` once per Lloyd iteration with the current centres; it
    assigns every point to its nearest centre (exactly as a full distance
    computation would, see the module docstring) and returns the per-cluster
    partial sums needed by the coordinator.  The first call (or a call with a
    different number of centres) does a full computation; later calls use
    Hamerly's bounds and compute distances only for the points whose
    assignment may change, and only to the centres that may be nearer.

    The state keeps a reference to ``points`` (copied only if it is not a
    C-contiguous float64 array): do not modify it afterwards.  Memory: about
    ``8 * (d + 7) * n`` bytes besides the points, plus transient buffers.

    Attributes
    ----------
    labels : (n,) int32
        Current labels in the order of ``points`` (-1 before the first step).
    last_candidates : int
        Points that needed distance computations in the last step (diagnostic).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[0.0], [1.0], [9.0], [10.0]])
    >>> st = LloydState(X)
    >>> C = np.array([[0.0], [2.0]])
    >>> for _ in range(3):
    ...     sums, counts, inertia, changed = st.step(C)
    ...     C = sums / counts[:, None]
    >>> st.labels.tolist(), C.ravel().tolist(), inertia, changed
    ([0, 0, 1, 1], [0.5, 9.5], 1.0, 0)
    """

    labels: np.ndarray

    def __init__(self, points: np.ndarray) -> None:
        X = _as_points(points)
        self._X = X
        self.n, self.d = X.shape
        n, d = self.n, self.d
        self.labels = np.full(n, -1, dtype=np.int32)
        self._C: np.ndarray | None = None
        # Layout: the points sorted by label into contiguous "segments" (one
        # per centre, column-major), as of the last re-sort.  A point whose
        # label changes leaves a hole in its segment (stay = False) and goes to
        # the compact "overflow" arrays; the layout is re-sorted when the
        # overflow has cost more than a re-sort would.  All big buffers are
        # allocated and touched here once: fresh memory is slow to fault in.
        self._xs = [_touched(n, np.float64) for _ in range(d)]  # coordinates by position
        self._perm = _touched(n, np.intp)  # position -> original index
        self._D = _touched(n, np.float64)  # exact squared distance to the segment's centre
        self._l = _touched(n, np.float64)  # lower bound on the distance to every other centre
        self._stay = _touched(n, np.bool_)  # False for holes
        self._stayf = _touched(n, np.float64)  # stay as 1.0 / 0.0
        self._scratch = _touched(n, np.float64)  # spare buffers for re-sorting
        self._perm_scratch = _touched(n, np.intp)
        self._starts = np.zeros(1, dtype=np.intp)  # (k + 1,) segment boundaries
        self._seg_sums = np.zeros((0, d))  # per-segment sums of the staying points
        # candidate buffers (one segment's candidates at a time), grown on demand
        self._cand_P = np.empty(0, dtype=np.intp)
        self._cand_D = np.empty(0)
        self._cand_X = [np.empty(0) for _ in range(d)]
        self._holes = np.zeros(0, dtype=np.intp)  # (k,) holes per segment
        self._clear_overflow()
        self._lmax = 0.0  # upper bound of every positive lower bound
        self._D_stale = False  # D not valid for the segments (after a re-sort)
        self._inertia = 0.0  # of the last step
        self.last_candidates = 0

    # ------------------------------------------------------------------ API

    def step(self, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, int]:
        """Assign every point to its nearest centre and reduce per cluster.

        Parameters
        ----------
        centers : (k, d) float array
            The centres to assign to (empty clusters are the caller's business).

        Returns
        -------
        sums : (k, d) float64
            Sum of the points assigned to each centre.
        counts : (k,) int64
            Number of points assigned to each centre.
        inertia : float
            Sum of the exact squared distances of the points to their assigned
            centre in ``centers``.
        n_changed : int
            Labels that differ from the previous call (all n on the first call).
            A call with a different number of centres than the previous one
            starts over with a full computation.

        Examples
        --------
        >>> import numpy as np
        >>> st = LloydState(np.array([[0.0, 0.0], [0.0, 2.0], [5.0, 5.0]]))
        >>> sums, counts, inertia, changed = st.step(np.array([[0.0, 1.0], [5.0, 4.0]]))
        >>> sums.tolist(), counts.tolist(), inertia, changed
        ([[0.0, 2.0], [5.0, 5.0]], [2, 1], 3.0, 3)
        """
        C = _as_centers(centers, self.d)
        k = C.shape[0]
        if self.n == 0:
            self._C = C.copy()
            return np.zeros((k, self.d)), np.zeros(k, dtype=np.int64), 0.0, 0
        if self._C is None or self._C.shape[0] != k:
            changed = self._full_assign(C)
        else:
            changed = self._hamerly(C)
        self._C = C.copy()
        self._D_stale = False
        sums, counts = self._reduce(k)
        inertia = self._inertia
        if self._ov_load > _REBUILD_LOAD * self.n:
            self._rebuild()
        return sums, counts, inertia, int(changed)

    def farthest(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``m`` points farthest from their assigned centre (as of the last step).

        Used to re-seed empty clusters.  Returns ``(points (m', d), squared
        distances (m',))`` with ``m' = min(m, n)``, sorted by decreasing distance
        (ties by original index).  The distances are the exact squared distances
        to the centres passed to the last :meth:`step`.  See
        :meth:`farthest_indices` for the row indices instead of the points.

        Examples
        --------
        >>> import numpy as np
        >>> st = LloydState(np.array([[0.0], [1.0], [3.0]]))
        >>> _ = st.step(np.array([[0.0]]))
        >>> pts, d2 = st.farthest(2)
        >>> pts.ravel().tolist(), d2.tolist()
        ([3.0, 1.0], [9.0, 1.0])
        """
        rows, d2 = self.farthest_indices(m)
        return self._X[rows], d2

    def farthest_indices(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`farthest`, but returns ``(row indices into points (m',) int64,
        squared distances (m',))``; ``labels[rows]`` gives their clusters.

        Examples
        --------
        >>> import numpy as np
        >>> st = LloydState(np.array([[0.0], [1.0], [3.0]]))
        >>> _ = st.step(np.array([[0.0]]))
        >>> rows, d2 = st.farthest_indices(2)
        >>> rows.tolist(), d2.tolist()
        ([2, 1], [9.0, 1.0])
        """
        if self._C is None:
            raise RuntimeError("farthest() needs a previous step()")
        m = int(min(max(m, 0), self.n))
        if m == 0:
            return np.empty(0, dtype=np.int64), np.empty(0)
        if self._D_stale:
            self._segment_distances(self._C)
            self._D_stale = False
        if self._holes.any():
            pos = np.flatnonzero(self._stay)
            D = np.concatenate([self._D[pos], self._o_D])
            orig = np.concatenate([self._perm[pos], self._o_orig])
        else:
            D = np.concatenate([self._D, self._o_D]) if self._o_D.size else self._D
            orig = np.concatenate([self._perm, self._o_orig]) if self._o_D.size else self._perm
        if m < D.size:
            thr = D[np.argpartition(D, D.size - m)[D.size - m :]].min()
            top = np.flatnonzero(D >= thr)  # with every point tied with the m-th
        else:
            top = np.arange(D.size)
        order = np.lexsort((orig[top], -D[top]))[:m]
        top = top[order]
        return orig[top].astype(np.int64), D[top].copy()

    # ------------------------------------------------------------ internals

    def _grow_candidate_buffers(self, keep: int, need: int) -> None:
        cap = max(need, 2 * self._cand_P.size, 4096)

        def grow(arr: np.ndarray) -> np.ndarray:
            new = np.empty(cap, dtype=arr.dtype)
            new[:keep] = arr[:keep]
            return new

        self._cand_P = grow(self._cand_P)
        self._cand_D = grow(self._cand_D)
        self._cand_X = [grow(x) for x in self._cand_X]

    def _clear_overflow(self) -> None:
        d = self.d
        self._o_cols = [np.empty(0) for _ in range(d)]  # coordinates
        self._o_D = np.empty(0)  # exact squared distance to the current centre
        self._o_l = np.empty(0)  # lower bound on the distance to every other centre
        self._o_lab = np.empty(0, dtype=np.intp)  # current label
        self._o_orig = np.empty(0, dtype=np.intp)  # original index
        self._ov_load = 0  # sum of the overflow sizes over the steps since the last re-sort

    def _full_assign(self, C: np.ndarray) -> int:
        """First call: full computation of the labels, then sort into segments.

        The lower bounds start as ``cc(a, nearest other centre) - u`` (triangle
        inequality) rather than the exact second-nearest distance: tracking the
        second-nearest costs ~30 % more here and prunes hardly better on the
        next step, where the centres typically move a lot.
        """
        X, n, d = self._X, self.n, self.d
        k = C.shape[0]
        lab = self._perm_scratch  # labels in original order for now (buffers reused)
        if not _grid_labels(X, C, lab):
            lab[:] = squared_distances_min(X, C)[0]
        first = self._C is None
        changed = n if first else int(np.count_nonzero(lab != self.labels))
        np.copyto(self.labels, lab, casting="unsafe")
        counts = np.bincount(lab, minlength=k)
        order = np.argsort(lab.astype(_label_dtype(k)), kind="stable")
        np.copyto(self._perm, order)
        del order
        # gather whole rows (one cache miss per point), then split the columns
        bs = 65536
        rows = np.empty((min(bs, n), d))
        for b0 in range(0, n, bs):
            b1 = min(b0 + bs, n)
            rb = rows[: b1 - b0]
            np.take(X, self._perm[b0:b1], axis=0, out=rb, mode="clip")
            for i in range(d):
                self._xs[i][b0:b1] = rb[:, i]
        self._starts = np.zeros(k + 1, dtype=np.intp)
        np.cumsum(counts, out=self._starts[1:])
        self._segment_distances(C)
        self._inertia = float(np.sum(self._D))
        # lower bounds: d(x, c_j) >= cc(a, j) - d(x, c_a) >= r0(a) - u(x)
        if k == 1:
            self._l.fill(np.inf)
        else:
            cc = _center_distances_lo(C)
            r0 = cc.min(axis=1).tolist()
            L, D = self._l, self._D
            for a in range(k):
                s0, s1 = int(self._starts[a]), int(self._starts[a + 1])
                seg = L[s0:s1]
                np.sqrt(D[s0:s1], out=seg)
                seg *= 1.0 + _SLACK
                np.subtract(r0[a], seg, out=seg)
        self._stay.fill(True)
        self._stayf.fill(1.0)
        self._holes = np.zeros(k, dtype=np.intp)
        self._clear_overflow()
        self._seg_sums = np.zeros((0, d))  # recomputed by _reduce
        self._lmax = _max_finite(self._l) if k > 1 else 0.0
        self.last_candidates = n
        return changed

    def _segment_distances(self, C: np.ndarray) -> None:
        """D = exact squared distance of every position to its segment's centre."""
        xs, D, d = self._xs, self._D, self.d
        starts = self._starts
        cl = C.tolist()
        tmp = np.empty(_BLOCK)
        for a in range(C.shape[0]):
            s0, s1 = int(starts[a]), int(starts[a + 1])
            for b0 in range(s0, s1, _BLOCK):
                b1 = min(b0 + _BLOCK, s1)
                Db, t = D[b0:b1], tmp[: b1 - b0]
                np.subtract(xs[0][b0:b1], cl[a][0], out=Db)
                np.multiply(Db, Db, out=Db)
                for i in range(1, d):
                    np.subtract(xs[i][b0:b1], cl[a][i], out=t)
                    np.multiply(t, t, out=t)
                    Db += t

    def _rebuild(self) -> None:
        """Re-sort: per label, the staying points of its segment, then its overflow points.

        D is not carried over (the next step recomputes it for every segment
        point); it is marked stale until then.
        """
        k = self._starts.size - 1
        starts, holes = self._starts, self._holes
        o_lab = self._o_lab
        o_order = np.argsort(o_lab, kind="stable")
        o_counts = np.bincount(o_lab, minlength=k)
        o_starts = np.zeros(k + 1, dtype=np.intp)
        np.cumsum(o_counts, out=o_starts[1:])
        n_stay = np.diff(starts) - holes
        stay_starts = np.zeros(k + 1, dtype=np.intp)
        np.cumsum(n_stay, out=stay_starts[1:])
        new_starts = np.zeros(k + 1, dtype=np.intp)
        np.cumsum(n_stay + o_counts, out=new_starts[1:])
        stay_pos = np.flatnonzero(self._stay)  # ascending, so grouped by segment
        ss, ns_, os_ = stay_starts.tolist(), new_starts.tolist(), o_starts.tolist()

        def permute(src: np.ndarray, ov: np.ndarray, out: np.ndarray) -> None:
            ov_sorted = ov[o_order]
            for a in range(k):
                dst = ns_[a]
                n_a = ss[a + 1] - ss[a]
                np.take(src, stay_pos[ss[a] : ss[a + 1]], out=out[dst : dst + n_a], mode="clip")
                out[dst + n_a : ns_[a + 1]] = ov_sorted[os_[a] : os_[a + 1]]

        for i in range(self.d):
            permute(self._xs[i], self._o_cols[i], self._scratch)
            self._xs[i], self._scratch = self._scratch, self._xs[i]
        permute(self._l, self._o_l, self._scratch)
        self._l, self._scratch = self._scratch, self._l
        permute(self._perm, self._o_orig, self._perm_scratch)
        self._perm, self._perm_scratch = self._perm_scratch, self._perm
        self._starts = new_starts
        self._stay.fill(True)
        self._stayf.fill(1.0)
        self._holes = np.zeros(k, dtype=np.intp)
        self._clear_overflow()
        self._D_stale = True
        self._seg_sums = np.zeros((0, self.d))  # recomputed by the next main pass

    def _hamerly(self, C: np.ndarray) -> int:
        k, d = C.shape
        xs, D, L = self._xs, self._D, self._l
        starts, stay, holes = self._starts, self._stay, self._holes
        # ---- per-centre quantities (small) -----------------------------------
        shift = np.sqrt(_sqdist_rows(C, self._C)) * (1.0 + _SLACK)
        if k == 1:
            # a single centre: nothing can change
            self._segment_distances(C)
            self._inertia = float(np.sum(self._D))
            self.last_candidates = 0
            return 0
        i1 = int(np.argmax(shift))
        other_shift = np.full(k, shift[i1])
        other_shift[i1] = np.max(np.delete(shift, i1))
        # absolute guard for the rounding of l - shift (|l| <= lmax when l > 0)
        other_shift += 4.0 * _EPS * self._lmax + 1e-300
        cc = _center_distances_lo(C)
        half = 0.5 * cc.min(axis=1)
        cc_order = np.argsort(cc, axis=1, kind="stable")  # own index last (+inf)
        cc_sorted = np.take_along_axis(cc, cc_order, axis=1)
        osl, halfl, cl = other_shift.tolist(), half.tolist(), C.tolist()

        # ---- overflow points: labels vary, so use gathers -------------------
        o_lab, o_D, o_l = self._o_lab, self._o_D, self._o_l
        if o_D.size:
            o_l -= other_shift[o_lab]
            o_D[:] = _sqdist_to(self._o_cols, C, o_lab)
            thr = np.maximum(o_l, half[o_lab])
            thr *= thr
            o_cand = np.flatnonzero(o_D >= thr)
        else:
            o_cand = np.empty(0, dtype=np.intp)
        # overflow candidates by label: searched together with the segment's own
        ov_groups: dict[int, np.ndarray] = {}
        if o_cand.size:
            g_lab = o_lab[o_cand]
            o = np.argsort(g_lab, kind="stable")
            o_cand, g_lab = o_cand[o], g_lab[o]
            bounds = np.flatnonzero(np.r_[True, g_lab[1:] != g_lab[:-1], True]).tolist()
            for g0, g1 in zip(bounds[:-1], bounds[1:]):
                ov_groups[int(g_lab[g0])] = o_cand[g0:g1]

        # ---- segments: exact distance to the own centre, bound test ---------
        bs = _BLOCK
        tmp = np.empty(bs)
        tmp2 = np.empty(bs)
        msk = np.empty(bs, dtype=bool)
        stayf = self._stayf
        n_changed = 0
        n_cand = 0
        lmax = self._lmax
        new_ov: list[tuple] = []
        seg_sums = np.zeros((k, d))
        inertia = 0.0  # of the segment points (the overflow is added at the end)
        for a in range(k):
            s0, s1 = int(starts[a]), int(starts[a + 1])
            if s0 == s1 and a not in ov_groups:
                continue
            ca = cl[a]
            osa, ha = osl[a], halfl[a]
            has_holes = holes[a] > 0
            sa = [0.0] * d
            nc = 0  # candidates of this segment so far, in the candidate buffers
            for b0 in range(s0, s1, bs):
                b1 = min(b0 + bs, s1)
                nb = b1 - b0
                Db = D[b0:b1]
                t = tmp[:nb]
                xb = [x[b0:b1] for x in xs]
                np.subtract(xb[0], ca[0], out=Db)
                np.multiply(Db, Db, out=Db)
                for i in range(1, d):
                    np.subtract(xb[i], ca[i], out=t)
                    np.multiply(t, t, out=t)
                    Db += t
                # per-cluster sums and inertia while the block is in cache
                if has_holes:
                    wb = stayf[b0:b1]
                    for i in range(d):
                        sa[i] += float(np.dot(xb[i], wb))
                    inertia += float(np.dot(Db, wb))
                else:
                    for i in range(d):
                        sa[i] += float(np.sum(xb[i]))
                    inertia += float(np.sum(Db))
                Lb = L[b0:b1]
                Lb -= osa
                thr = tmp2[:nb]
                np.maximum(Lb, ha, out=thr)
                np.multiply(thr, thr, out=thr)
                mb = msk[:nb]
                np.greater_equal(Db, thr, out=mb)
                if has_holes:
                    mb &= stay[b0:b1]
                idx = mb.nonzero()[0]
                if idx.size:
                    # copy the candidates out while the block is in cache
                    nc1 = nc + idx.size
                    if nc1 > self._cand_P.size:
                        self._grow_candidate_buffers(nc, nc1)
                    np.take(Db, idx, out=self._cand_D[nc:nc1], mode="clip")
                    for i in range(d):
                        np.take(xb[i], idx, out=self._cand_X[i][nc:nc1], mode="clip")
                    np.add(idx, b0, out=self._cand_P[nc:nc1])
                    nc = nc1
            n_seg = nc
            g = ov_groups.get(a)
            if g is not None:
                nc1 = nc + g.size
                if nc1 > self._cand_P.size:
                    self._grow_candidate_buffers(nc, nc1)
                np.take(o_D, g, out=self._cand_D[nc:nc1], mode="clip")
                for i in range(d):
                    np.take(self._o_cols[i], g, out=self._cand_X[i][nc:nc1], mode="clip")
                nc = nc1
            if nc:
                Dc = self._cand_D[:nc]
                cols = [x[:nc] for x in self._cand_X]
                n_cand += nc
                lower, ch, nl, nb = self._search(a, cols, Dc, C, cc_sorted[a], cc_order[a])
                lmax = max(lmax, _max_finite(lower))
                if n_seg:
                    P = self._cand_P[:n_seg]
                    L[P] = lower[:n_seg]
                if g is not None:
                    o_l[g] = lower[n_seg:]
                if ch.size:
                    n_changed += ch.size
                    if g is not None:
                        in_ov = ch >= n_seg
                        if in_ov.any():
                            gch = g[ch[in_ov] - n_seg]
                            onl = nl[in_ov]
                            o_lab[gch] = onl
                            o_D[gch] = nb[in_ov]
                            self.labels[self._o_orig[gch]] = onl
                            in_seg = ~in_ov
                            ch, nl, nb = ch[in_seg], nl[in_seg], nb[in_seg]
                if ch.size:
                    pch = P[ch]
                    stay[pch] = False
                    stayf[pch] = 0.0
                    holes[a] += ch.size
                    orig = self._perm[pch]
                    self.labels[orig] = nl
                    xch = [c[ch] for c in cols]
                    for i in range(d):
                        sa[i] -= float(np.sum(xch[i]))
                    inertia -= float(np.sum(Dc[ch]))
                    new_ov.append((xch, nb, lower[ch], nl, orig))
            seg_sums[a] = sa
        self._seg_sums = seg_sums

        # ---- points that left their segment join the overflow ---------------
        if new_ov:
            self._o_cols = [
                np.concatenate([self._o_cols[i]] + [e[0][i] for e in new_ov]) for i in range(d)
            ]
            self._o_D = np.concatenate([self._o_D] + [e[1] for e in new_ov])
            self._o_l = np.concatenate([self._o_l] + [e[2] for e in new_ov])
            self._o_lab = np.concatenate([self._o_lab] + [e[3] for e in new_ov])
            self._o_orig = np.concatenate([self._o_orig] + [e[4] for e in new_ov])
        self._ov_load += self._o_D.size
        self._inertia = inertia + float(np.sum(self._o_D))
        self._lmax = lmax
        self.last_candidates = n_cand
        return n_changed

    def _search(
        self,
        a: int,
        cols: list[np.ndarray],
        Da: np.ndarray,
        C: np.ndarray,
        r: np.ndarray,
        r_order: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Exact nearest centre for candidate points currently labelled ``a``.

        ``cols``: their coordinates, ``Da``: their exact squared distances to
        ``c_a``.  A point x needs only the centres j with ``cc(a, j) <= 2 u(x)``
        (``u(x) >= d(x, c_a)``): any other centre is farther than ``c_a``.
        ``r`` are the (deflated) distances from ``c_a`` to the other centres in
        increasing order (``r_order`` their indices; ``a`` itself last, +inf).
        Points needing only the nearest other centre take a short path; the
        others are put in buckets by how many centres they need (2, 3-4,
        5-8, ...) so that each is compared with few centres.

        Returns (new lower bound on the distance to every centre other than the
        new label, for every point; indices of the points whose label changes;
        their new labels; their exact squared distances to them).
        """
        k, d = C.shape
        m = Da.size
        lower = np.empty(m)
        ch_idx, ch_lab, ch_best = [], [], []
        # Short path for the points whose only possible competitor is the
        # nearest other centre n1: 2 u < r[1], i.e. Da < (r[1] / (2 (1+S)^2))^2.
        if k > 2:
            lim = r[1] / (2.0 * (1.0 + _SLACK) ** 2)
            lim = lim * lim * (1.0 - 4.0 * _EPS)
            one = Da < lim
            sel1 = np.flatnonzero(one)
            if sel1.size == m:
                sel1, rest = None, None
            else:
                rest = np.flatnonzero(~one)
        else:
            sel1, rest = None, None
        if sel1 is None or sel1.size:
            n1 = int(r_order[0])
            c1 = C[n1].tolist()
            x = cols if sel1 is None else [c[sel1] for c in cols]
            D1 = Da if sel1 is None else Da[sel1]
            t = np.subtract(x[0], c1[0])
            np.multiply(t, t, out=t)
            if d > 1:
                w = np.empty_like(t)
                for i in range(1, d):
                    np.subtract(x[i], c1[i], out=w)
                    np.multiply(w, w, out=w)
                    t += w
            ch = (t < D1) if n1 > a else (t <= D1)  # ties go to the lower index
            sec = np.maximum(t, D1)
            np.sqrt(sec, out=sec)
            sec *= 1.0 - _SLACK
            if k > 2:
                # every other centre is at least r[1] - u away
                u = np.sqrt(D1)
                u *= 1.0 + _SLACK
                np.subtract(r[1], u, out=u)
                np.minimum(sec, u, out=sec)
            if sel1 is None:
                lower = sec
            else:
                lower[sel1] = sec
            chi = np.flatnonzero(ch)
            if chi.size:
                ch_idx.append(chi if sel1 is None else sel1[chi])
                ch_lab.append(np.full(chi.size, n1, dtype=np.intp))
                ch_best.append(t[chi])
        if rest is not None and rest.size:
            cols = [c[rest] for c in cols]
            Da = Da[rest]
            u = np.sqrt(Da)
            u *= 1.0 + _SLACK
            c_list = []
            c = 2
            while c < k - 1:
                c_list.append(c)
                c *= 2
            c_list.append(k - 1)
            # bucket q: the points needing more than c_list[q-1] (at least 2)
            # and at most c_list[q] other centres
            mr = Da.size
            if len(c_list) > 1:
                v = u * (2.0 * (1.0 + _SLACK))
                bucket = np.zeros(mr, dtype=np.uint8)
                cmp = np.empty(mr, dtype=bool)
                for c in c_list[:-1]:
                    np.greater_equal(v, r[c], out=cmp)
                    bucket += cmp
                sizes = np.bincount(bucket, minlength=len(c_list)).tolist()
            else:
                sizes = [mr]
            groups = _merge_buckets(sizes, c_list)
            for q_lo, q_hi in groups:
                if len(groups) == 1:
                    sel, cq, Dq, uq = rest, cols, Da, u
                else:
                    if q_lo == q_hi:
                        sq = np.flatnonzero(bucket == q_lo)
                    else:
                        sq = np.flatnonzero((bucket >= q_lo) & (bucket <= q_hi))
                    sel, cq, Dq, uq = rest[sq], [c[sq] for c in cols], Da[sq], u[sq]
                nl, b, lo = self._search_bucket(a, cq, Dq, uq, C, r, r_order, c_list[q_hi])
                lower[sel] = lo
                chi = np.flatnonzero(nl != a)
                if chi.size:
                    ch_idx.append(sel[chi])
                    ch_lab.append(nl[chi])
                    ch_best.append(b[chi])
        if not ch_idx:
            e = np.empty(0, dtype=np.intp)
            return lower, e, e, np.empty(0)
        if len(ch_idx) == 1:
            return lower, ch_idx[0], ch_lab[0], ch_best[0]
        return lower, np.concatenate(ch_idx), np.concatenate(ch_lab), np.concatenate(ch_best)

    @staticmethod
    def _search_bucket(
        a: int,
        cols: list[np.ndarray],
        Da: np.ndarray,
        u: np.ndarray,
        C: np.ndarray,
        r: np.ndarray,
        r_order: np.ndarray,
        c_hi: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k, d = C.shape
        js = np.sort(np.r_[a, r_order[:c_hi]])
        if _use_direct(js.size, d):
            new_lab, best, sec = _nearest_direct(cols, C, js, True, known=(a, Da))
        else:
            new_lab, best, sec = _nearest_gemm(np.stack(cols, axis=1), C, js, True)
        lower = sec
        np.sqrt(lower, out=lower)
        lower *= 1.0 - _SLACK
        if c_hi < k - 1:
            # every centre not computed is at least r[c_hi] - u away
            far = np.subtract(r[c_hi], u)
            np.minimum(lower, far, out=lower)
        return new_lab, best, lower

    def _reduce(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-cluster sums and counts: segment sums (recomputed every step by
        the main pass, or here after a full assignment) plus the overflow."""
        d = self.d
        starts, holes = self._starts, self._holes
        if self._seg_sums.shape[0] != k:
            self._seg_sums = np.zeros((k, d))
            for a in range(k):
                s0, s1 = int(starts[a]), int(starts[a + 1])
                for i in range(d):
                    self._seg_sums[a, i] = np.sum(self._xs[i][s0:s1])
        sums = self._seg_sums.copy()
        counts = (np.diff(starts) - holes).astype(np.int64)
        if self._o_lab.size:
            counts += np.bincount(self._o_lab, minlength=k)
            for i in range(d):
                sums[:, i] += np.bincount(self._o_lab, weights=self._o_cols[i], minlength=k)
        return sums, counts


def check_centers(centers: np.ndarray, d: int) -> np.ndarray:
    """``centers`` as a C-contiguous float64 ``(k, d)`` array with ``k >= 1`` and finite values, or ValueError."""
    C = np.ascontiguousarray(centers, dtype=np.float64)
    if C.ndim != 2 or C.shape[1] != d or C.shape[0] < 1:
        raise ValueError(f"centers must have shape (k, {d}) with k >= 1, got {C.shape}")
    if not np.isfinite(C).all():
        raise ValueError("centers must be finite")
    return C


def top_farthest(D: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the ``m`` largest values of ``D`` (ties: lower row first) and those values."""
    n = len(D)
    if m < n:
        thr = np.partition(D, n - m)[n - m]
        top = np.flatnonzero(D >= thr)
    else:
        top = np.arange(n)
    order = np.lexsort((top, -D[top]))[:m]
    rows = top[order].astype(np.int64)
    return rows, D[rows].copy()
