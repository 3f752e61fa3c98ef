"""Ray-free kernels for two-level (micro-cluster + Ward) hierarchical clustering.

Design
------
*Level 1* runs on each node, once per partition: :func:`micro_clusters`
summarises the partition's points into at most ``n_micro`` micro-clusters by a
short local k-means (k-means++ seeding and Lloyd iterations on a random sample,
then one exact assignment of every point with
:func:`distspatial.kernels.kmeans_kernels.squared_distances_min`).  Each micro-cluster
is described by its clustering feature ``(count, linear sum, sum of squared
norms)``; the per-point micro-cluster labels stay on the node.

*Level 2* runs on the coordinator: the per-partition summaries are concatenated
(:func:`merge_micro_clusters`), :func:`ward_linkage` builds a weighted Ward
dendrogram over the micro-clusters (each one a leaf with the weight of its
point count), and :func:`cut_tree` cuts it into flat clusters.  A point's final
label is the flat label of its micro-cluster (:func:`point_labels`).

Weighted Ward
-------------
The merge cost between clusters ``A`` and ``B`` (weights ``nA``, ``nB``,
centroids ``cA``, ``cB``) is::

    d(A, B) = sqrt(2 * nA * nB / (nA + nB)) * ||cA - cB||

which is scipy's ``'ward'`` height when all leaves are single points
(``d^2 / 2`` is the increase of the total within-cluster sum of squares), and
which, for a micro-cluster made of ``c`` identical points, equals the height
scipy gives to the merges above the ``c`` duplicates.  The micro-clusters'
internal spread (``sqsums``) does not enter the merge costs (Ward's criterion
depends only on sizes and centroids); it is kept for the within-cluster sum of
squares of any flat cluster (:func:`cluster_sse`).

The linkage is built by the nearest-neighbour-chain algorithm, with the same
conventions as scipy's ``linkage(X, 'ward')`` (chain restarts at the lowest
active cluster, the previous chain element wins ties, otherwise the lowest
index; the merged cluster takes the larger slot), but the distances from a new
cluster are recomputed from its centroid (``O(m d)`` per nearest-neighbour
search, vectorised over the active clusters) instead of the Lance-Williams
update on a distance matrix: memory is ``O(m d)`` and there is no cancellation.
Rows are then sorted by height (stable) and relabelled exactly as scipy does.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Sequence

import numpy as np

from .kmeans_kernels import squared_distances_min

__all__ = [
    "MicroClusters",
    "micro_clusters",
    "merge_micro_clusters",
    "ward_linkage",
    "node_point_counts",
    "cut_tree",
    "point_labels",
    "cluster_sse",
]

#: Default number of sample points per requested micro-cluster for the local k-means.
_SAMPLE_PER_MICRO = 100
#: Default minimum sample size for the local k-means.
_SAMPLE_MIN = 20000
#: k-means++ seeding runs on the first ``max(_SEED_MIN, _SEED_PER_MICRO * n_micro)`` sample points
#: (its cost is ``n_micro`` passes over them; Lloyd on the whole sample refines the seeds).
_SEED_PER_MICRO = 20
_SEED_MIN = 5000
#: Above this dimension the nearest-neighbour search of :func:`ward_linkage` uses einsum on
#: row-major centroids instead of a Python loop over column-major coordinates.
_COLUMN_LOOP_MAX_D = 16


# --------------------------------------------------------------------------
# level 1: micro-clusters of one partition
# --------------------------------------------------------------------------


class MicroClusters(NamedTuple):
    """Clustering features of ``m`` micro-clusters (unpacks to a 4-tuple).

    Attributes
    ----------
    counts : (m,) int64
        Number of points in each micro-cluster (all >= 1).
    sums : (m, d) float64
        Linear sum of the points of each micro-cluster.
    sqsums : (m,) float64
        Sum of the squared Euclidean norms ``||x||^2`` of the points.
    labels : (n,) int32 or None
        Micro-cluster of every input point (``0 <= labels < m``); ``None`` in a
        summary that is shipped without the per-point labels
        (:meth:`summary`).
    """

    counts: np.ndarray
    sums: np.ndarray
    sqsums: np.ndarray
    labels: np.ndarray | None

    @property
    def m(self) -> int:
        """Number of micro-clusters."""
        return int(self.counts.shape[0])

    @property
    def d(self) -> int:
        """Dimension."""
        return int(self.sums.shape[1])

    @property
    def n_points(self) -> int:
        """Number of points summarised (``counts.sum()``)."""
        return int(self.counts.sum())

    @property
    def centroids(self) -> np.ndarray:
        """(m, d) centroids ``sums / counts``."""
        return self.sums / self.counts[:, None]

    @property
    def sse(self) -> np.ndarray:
        """(m,) within-micro-cluster sum of squared distances to the centroid (clipped at 0)."""
        if self.m == 0:
            return np.zeros(0)
        sse = self.sqsums - np.einsum("ij,ij->i", self.sums, self.sums) / self.counts
        return np.maximum(sse, 0.0)

    def summary(self) -> "MicroClusters":
        """The same clustering features without the per-point labels (what a node ships)."""
        return self._replace(labels=None)


def _as_points(points: np.ndarray) -> np.ndarray:
    arr = np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise ValueError(f"points must be a 2-D array (n, d) with d >= 1, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise TypeError(f"points must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if arr.size and not np.all(np.isfinite(arr)):
        raise ValueError("points must be finite (no NaN or inf)")
    return arr


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _features(X: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """counts (k,) int64, sums (k, d), sqsums (k,) of the points grouped by ``labels``."""
    d = X.shape[1]
    counts = np.bincount(labels, minlength=k).astype(np.int64, copy=False)
    sums = np.empty((k, d))
    for j in range(d):
        sums[:, j] = np.bincount(labels, weights=X[:, j], minlength=k)
    sqsums = np.bincount(labels, weights=np.einsum("ij,ij->i", X, X), minlength=k)
    return counts, sums, sqsums


def _exact_micro(X: np.ndarray) -> MicroClusters:
    """One micro-cluster per distinct point, numbered by first occurrence."""
    _, first, inverse = np.unique(X, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(first, kind="stable")  # unique rows by first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    labels = rank[inverse].astype(np.int32)
    counts, sums, sqsums = _features(X, labels, order.size)
    return MicroClusters(counts, sums, sqsums, labels)


def _kmeans_pp(S: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of up to ``k`` k-means++ seeds among the rows of ``S``.

    Stops early when every row coincides with a seed (fewer distinct rows than ``k``),
    so a seed is never a duplicate of another.
    """
    s, d = S.shape
    cols = [np.ascontiguousarray(S[:, j]) for j in range(d)]
    idx = [int(rng.integers(s))]
    d2 = np.full(s, np.inf)
    tmp = np.empty(s)
    for _ in range(1, k):
        c = S[idx[-1]]
        np.subtract(cols[0], c[0], out=tmp)
        dist = tmp * tmp
        for j in range(1, d):
            np.subtract(cols[j], c[j], out=tmp)
            tmp *= tmp
            dist += tmp
        np.minimum(d2, dist, out=d2)
        cum = np.cumsum(d2)
        total = float(cum[-1])
        if not total > 0.0:
            break
        r = float(rng.random()) * total
        i = int(np.searchsorted(cum, r, side="right"))
        if i >= s or d2[i] <= 0.0:  # rounding guard: never pick a point already covered
            i = int(np.argmax(d2))
        idx.append(i)
    return np.asarray(idx, dtype=np.int64)


def micro_clusters(
    points: np.ndarray,
    n_micro: int,
    *,
    seed: int,
    n_iter: int = 10,
    sample_size: int | None = None,
) -> MicroClusters:
    """Summarise one partition's points into at most ``n_micro`` micro-clusters.

    * ``n == 0``: ``m = 0`` (``sums`` has shape ``(0, d)``, ``labels`` shape ``(0,)``).
    * ``n <= n_micro``: one micro-cluster per *distinct* point (exact), numbered by
      first occurrence (duplicates share a micro-cluster).
    * otherwise: a random sample of ``sample_size`` points (default
      ``max(20000, 100 * n_micro)``, all points if fewer); k-means++ seeding on a
      random ``max(5000, 20 * n_micro)`` of them, at most ``n_iter`` Lloyd
      iterations on the sample, then one exact nearest-centre assignment of every
      point; empty micro-clusters are dropped.  If the seeding points have fewer
      than ``n_micro`` distinct values, the seeding stops there (e.g. all points
      identical -> one micro-cluster); a distinct value that they missed joins
      its nearest micro-cluster.

    Vectorised (no Python loop over points; loops over seeds, iterations and
    dimensions only) and deterministic for a given ``seed``.  Cost: about one
    exact assignment of the ``n`` points to ``n_micro`` centres plus the sample
    k-means (1M 2-D points, 200 micro-clusters: ~0.7 s single-threaded).

    Parameters
    ----------
    points : (n, d) array of finite numbers
    n_micro : int >= 1
    seed : int, seed of :func:`numpy.random.default_rng`
    n_iter : int >= 0, Lloyd iterations on the sample (stops earlier when no label changes)
    sample_size : int >= 1 or None

    Returns
    -------
    MicroClusters
        ``counts`` (m,) int64, ``sums`` (m, d), ``sqsums`` (m,), ``labels`` (n,) int32,
        with ``m <= min(n, n_micro)``.

    Examples
    --------
    >>> mc = micro_clusters(np.array([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]]), 5, seed=0)
    >>> mc.counts.tolist(), mc.labels.tolist(), mc.sqsums.tolist()
    ([2, 1], [0, 0, 1], [0.0, 25.0])
    """
    X = _as_points(points)
    n_micro = _check_int("n_micro", n_micro, 1)
    n_iter = _check_int("n_iter", n_iter, 0)
    if sample_size is not None:
        sample_size = _check_int("sample_size", sample_size, 1)
    rng = np.random.default_rng(seed)
    n, d = X.shape
    if n == 0:
        return MicroClusters(np.zeros(0, np.int64), np.zeros((0, d)), np.zeros(0), np.zeros(0, np.int32))
    X = X + 0.0  # -0.0 -> 0.0, so that equal points are equal bit patterns (np.unique)
    if n <= n_micro:
        return _exact_micro(X)

    s = min(n, sample_size if sample_size is not None else max(_SAMPLE_MIN, _SAMPLE_PER_MICRO * n_micro))
    S = X if s == n else X[rng.choice(n, size=s, replace=False)]
    n_seed = min(s, max(_SEED_MIN, _SEED_PER_MICRO * n_micro))
    P = S if n_seed == s else S[rng.choice(s, size=n_seed, replace=False)]
    C = P[_kmeans_pp(P, n_micro, rng)]
    k = C.shape[0]
    prev = None
    for _ in range(n_iter):
        lab, _ = squared_distances_min(S, C)
        if prev is not None and np.array_equal(lab, prev):
            break
        prev = lab
        cnt = np.bincount(lab, minlength=k)
        nz = cnt > 0
        for j in range(d):
            sj = np.bincount(lab, weights=S[:, j], minlength=k)
            C[nz, j] = sj[nz] / cnt[nz]  # an empty centre keeps its position
    labels, _ = squared_distances_min(X, C)
    counts, sums, sqsums = _features(X, labels, k)
    keep = counts > 0
    if not np.all(keep):
        remap = np.cumsum(keep, dtype=np.int32) - 1
        labels = remap[labels]
        counts, sums, sqsums = counts[keep], sums[keep], sqsums[keep]
    return MicroClusters(counts, np.ascontiguousarray(sums), sqsums, labels.astype(np.int32, copy=False))


def merge_micro_clusters(parts: Sequence[MicroClusters]) -> tuple[MicroClusters, np.ndarray]:
    """Concatenate per-partition micro-clusters (in the given order).

    Returns ``(merged, offsets)``: ``offsets`` is an int64 array of length
    ``len(parts) + 1``; micro-cluster ``j`` of part ``i`` is row ``offsets[i] + j``
    of ``merged``.  ``merged.labels`` is the concatenation of the parts' labels
    shifted by their offsets (int64) when every part carries labels, else ``None``.
    All parts must have the same dimension (an empty part with ``sums`` of shape
    ``(0, d)`` is fine).

    >>> a = MicroClusters(np.array([2]), np.array([[2.0]]), np.array([2.0]), None)
    >>> merged, off = merge_micro_clusters([a, a])
    >>> merged.counts.tolist(), off.tolist()
    ([2, 2], [0, 1, 2])
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_micro_clusters needs at least one part")
    ds = set()
    for i, p in enumerate(parts):
        sums = np.asarray(p.sums)
        if sums.ndim != 2:
            raise ValueError(f"part {i}: sums must be 2-D (m, d), got shape {sums.shape}")
        ds.add(sums.shape[1])
        m = sums.shape[0]
        if np.shape(p.counts) != (m,) or np.shape(p.sqsums) != (m,):
            raise ValueError(f"part {i}: counts and sqsums must have shape ({m},)")
    if len(ds) != 1:
        raise ValueError(f"parts have different dimensions: {sorted(ds)}")
    sizes = np.array([np.shape(p.counts)[0] for p in parts], dtype=np.int64)
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    counts = np.concatenate([np.asarray(p.counts, dtype=np.int64) for p in parts])
    sums = np.concatenate([np.asarray(p.sums, dtype=np.float64) for p in parts], axis=0)
    sqsums = np.concatenate([np.asarray(p.sqsums, dtype=np.float64) for p in parts])
    labels = None
    if all(p.labels is not None for p in parts):
        labels = np.concatenate(
            [np.asarray(p.labels, dtype=np.int64) + off for p, off in zip(parts, offsets[:-1])]
        )
    return MicroClusters(counts, sums, sqsums, labels), offsets


# --------------------------------------------------------------------------
# level 2: weighted Ward linkage over micro-clusters
# --------------------------------------------------------------------------


def _as_counts(counts) -> np.ndarray:
    c = np.asarray(counts)
    if c.ndim != 1:
        raise ValueError(f"counts must be 1-D, got shape {c.shape}")
    if c.size and not (np.issubdtype(c.dtype, np.integer) or np.issubdtype(c.dtype, np.floating)):
        raise TypeError(f"counts must be integers, got dtype {c.dtype}")
    if np.issubdtype(c.dtype, np.floating):
        if not np.all(np.isfinite(c)) or np.any(c != np.round(c)):
            raise ValueError("counts must be whole numbers")
    c = c.astype(np.int64)
    if np.any(c < 1):
        raise ValueError("counts must all be >= 1 (drop empty micro-clusters)")
    return c


def _relabel(Z: np.ndarray, m: int) -> None:
    """scipy's ``label``: rename the clusters of a height-sorted Z in row order, min index first."""
    parent = np.arange(2 * m - 1)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for i in range(m - 1):
        a, b = find(int(Z[i, 0])), find(int(Z[i, 1]))
        if a > b:
            a, b = b, a
        Z[i, 0], Z[i, 1] = a, b
        parent[a] = parent[b] = m + i


def ward_linkage(
    counts: np.ndarray,
    sums: np.ndarray,
    sqsums: np.ndarray | None = None,
    *,
    count_column: str = "leaves",
) -> np.ndarray:
    """Weighted Ward linkage over ``m`` micro-clusters, in scipy's linkage format.

    Leaf ``i`` is micro-cluster ``i`` with weight ``counts[i]`` and centroid
    ``sums[i] / counts[i]``; the merge cost is
    ``sqrt(2 nA nB / (nA + nB)) * ||cA - cB||`` (see the module docstring).  With
    all counts 1 the heights equal ``scipy.cluster.hierarchy.linkage(X, 'ward')``
    (to rounding) and the tree is the same up to ties.

    Parameters
    ----------
    counts : (m,) positive integers
    sums : (m, d) float, linear sums (``counts[i] * centroid``)
    sqsums : (m,) float or None
        Accepted for symmetry with :class:`MicroClusters` and shape-checked; it
        does not influence Ward merge costs.
    count_column : ``"leaves"`` (default) or ``"points"``
        What ``Z[:, 3]`` holds.  ``"leaves"``: the number of micro-clusters under
        the node, scipy's convention, which ``is_valid_linkage``, ``fcluster`` and
        ``dendrogram`` require (scipy rejects a count above ``m``).  ``"points"``:
        the number of original points under the node (``sum of counts``) -- not
        accepted by those scipy functions once any count exceeds 1; the same
        numbers are available with the default layout from
        :func:`node_point_counts`.

    Returns
    -------
    Z : (m-1, 4) float64
        Row ``i`` merges clusters ``Z[i, 0] < Z[i, 1]`` (leaves ``0..m-1``, the
        cluster formed by row ``j`` is ``m + j``) at height ``Z[i, 2]``; heights
        are non-decreasing.  ``m == 1`` gives shape ``(0, 4)``.

    Notes
    -----
    Nearest-neighbour chain with scipy's tie conventions; ``O(m d)`` memory and
    ``O(m^2 d)`` time, each nearest-neighbour search vectorised over the active
    clusters (m = 4000, d = 2: ~0.2 s).  Heights are made monotone along the tree
    (a parent is never reported below a child because of rounding).

    Examples
    --------
    >>> Z = ward_linkage(np.array([1, 1, 2]), np.array([[0.0], [1.0], [20.0]]))
    >>> Z[:, :2].tolist(), Z[:, 3].tolist()
    ([[0.0, 1.0], [2.0, 3.0]], [2.0, 3.0])
    """
    if count_column not in ("leaves", "points"):
        raise ValueError(f"count_column must be 'leaves' or 'points', got {count_column!r}")
    w_int = _as_counts(counts)
    m = w_int.shape[0]
    if m == 0:
        raise ValueError("ward_linkage needs at least one micro-cluster")
    S = np.asarray(sums)
    if S.ndim != 2 or S.shape[0] != m or S.shape[1] < 1:
        raise ValueError(f"sums must have shape ({m}, d) with d >= 1, got {S.shape}")
    S = np.array(S, dtype=np.float64)  # private copy, updated in place
    if not np.all(np.isfinite(S)):
        raise ValueError("sums must be finite")
    if sqsums is not None:
        q = np.asarray(sqsums)
        if q.shape != (m,):
            raise ValueError(f"sqsums must have shape ({m},), got {q.shape}")
    if m == 1:
        return np.zeros((0, 4))
    d = S.shape[1]
    w = w_int.astype(np.float64)
    cent = S / w[:, None]

    # Active clusters live in compacted arrays (slot ids ascending, so argmin picks the
    # lowest slot on ties); a dead entry gets +inf coordinates (distance inf) and the
    # arrays are compacted when half of them are dead.
    column = d <= _COLUMN_LOOP_MAX_D
    slot = np.arange(m)
    pos = np.arange(m)  # slot -> position in the compacted arrays
    CA = np.ascontiguousarray(cent.T) if column else cent.copy()
    WA = w.copy()
    n_dead = 0
    tmp = np.empty(m)

    def sqdist(c: np.ndarray) -> np.ndarray:
        k = WA.shape[0]
        if column:
            t = tmp[:k]
            np.subtract(CA[0], c[0], out=t)
            out = t * t
            for j in range(1, d):
                np.subtract(CA[j], c[j], out=t)
                t *= t
                out += t
            return out
        diff = CA - c
        return np.einsum("ij,ij->i", diff, diff)

    size = w.copy()  # weight per slot (0 when dead)
    height = np.zeros(m)  # height of the cluster held by each slot (for monotonicity)
    rows_a = np.empty(m - 1, dtype=np.int64)
    rows_b = np.empty(m - 1, dtype=np.int64)
    rows_v = np.empty(m - 1)
    chain: list[int] = []
    for k in range(m - 1):
        if not chain:
            chain.append(int(slot[np.argmax(size[slot] > 0)]))  # lowest active slot
        while True:
            x = chain[-1]
            px = pos[x]
            wx = size[x]
            v = sqdist(CA[:, px] if column else CA[px])
            v *= WA * wx / (WA + wx)
            v[px] = np.inf
            i = int(np.argmin(v))
            vmin = float(v[i])
            if vmin == np.inf:
                raise ValueError("Ward distances overflow float64 (coordinates too large); rescale the data")
            if len(chain) > 1:
                yprev = chain[-2]
                vprev = float(v[pos[yprev]])
                if not vmin < vprev:
                    y, vmin = yprev, vprev
                    break
            chain.append(int(slot[i]))
        chain.pop()
        chain.pop()
        a, b = (x, y) if x < y else (y, x)
        rows_a[k], rows_b[k], rows_v[k] = a, b, vmin
        # merged cluster -> slot b; slot a dies
        nb = size[a] + size[b]
        S[b] += S[a]
        size[b], size[a] = nb, 0.0
        h = max(np.sqrt(2.0 * vmin), height[a], height[b])
        height[b] = h
        rows_v[k] = h
        c_new = S[b] / nb
        pa, pb = pos[a], pos[b]
        if column:
            CA[:, pb] = c_new
            CA[:, pa] = np.inf
        else:
            CA[pb] = c_new
            CA[pa] = np.inf
        WA[pb] = nb
        WA[pa] = 1.0  # finite weight: the distance is inf through the coordinates
        n_dead += 1
        if n_dead * 2 >= WA.shape[0] and WA.shape[0] > 64:
            keep = np.flatnonzero(size[slot] > 0)
            slot = slot[keep]
            CA = np.ascontiguousarray(CA[:, keep]) if column else np.ascontiguousarray(CA[keep])
            WA = WA[keep]
            pos[slot] = np.arange(slot.shape[0])
            n_dead = 0

    order = np.argsort(rows_v, kind="stable")
    Z = np.empty((m - 1, 4))
    Z[:, 0] = rows_a[order]
    Z[:, 1] = rows_b[order]
    Z[:, 2] = rows_v[order]
    _relabel(Z, m)
    leaf_weight = np.ones(m, dtype=np.int64) if count_column == "leaves" else w_int
    Z[:, 3] = _node_counts(Z, leaf_weight)
    return Z


def _node_counts(Z: np.ndarray, leaf_weight: np.ndarray) -> np.ndarray:
    m = leaf_weight.shape[0]
    tot = np.zeros(2 * m - 1, dtype=np.int64)
    tot[:m] = leaf_weight
    a = Z[:, 0].astype(np.int64)
    b = Z[:, 1].astype(np.int64)
    for i in range(m - 1):
        tot[m + i] = tot[a[i]] + tot[b[i]]
    return tot[m:].copy()


def node_point_counts(Z: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Number of original points under each node of ``Z`` ((m-1,) int64), given the leaves' counts."""
    c = _as_counts(counts)
    Z = _check_linkage(Z, c.shape[0])
    return _node_counts(Z, c)


# --------------------------------------------------------------------------
# flat clusters
# --------------------------------------------------------------------------


def _check_linkage(Z, m: int) -> np.ndarray:
    Z = np.asarray(Z, dtype=np.float64)
    if Z.shape != (max(m - 1, 0), 4):
        raise ValueError(f"Z must have shape ({max(m - 1, 0)}, 4) for {m} leaves, got {Z.shape}")
    if m > 1:
        idx = Z[:, :2]
        lim = m + np.arange(m - 1)
        if (np.any(idx < 0) or np.any(idx != np.round(idx)) or np.any(idx.max(axis=1) >= lim)
                or np.unique(idx).size != 2 * (m - 1)):
            raise ValueError("Z is not a valid linkage matrix for these leaves")
    return Z


def cut_tree(
    Z: np.ndarray,
    counts: np.ndarray,
    n_clusters: int | None = None,
    distance_threshold: float | None = None,
) -> np.ndarray:
    """Flat cluster label of every micro-cluster (leaf) of ``Z``.

    Exactly one of ``n_clusters`` / ``distance_threshold`` must be given
    (scikit-learn's ``AgglomerativeClustering`` semantics):

    * ``n_clusters=K`` (``1 <= K <= m``): undo the last ``K - 1`` merges.
    * ``distance_threshold=t`` (``t >= 0``): apply the merges with height
      ``< t`` (clusters at or above ``t`` are not merged); ``Z``'s heights must
      be non-decreasing (as :func:`ward_linkage` returns them).

    ``counts`` gives the number of leaves ``m`` (needed when ``m == 1``, where
    ``Z`` is empty) and is validated like :func:`ward_linkage`'s.  Labels are
    ``0..K-1`` numbered by first occurrence over the leaves (leaf 0 gets label 0,
    the first leaf outside its cluster label 1, ...).  Not the same function as
    ``scipy.cluster.hierarchy.cut_tree``.

    Returns
    -------
    (m,) int64

    >>> Z = ward_linkage(np.array([1, 1, 1]), np.array([[5.0], [0.0], [5.5]]))
    >>> cut_tree(Z, np.array([1, 1, 1]), n_clusters=2).tolist()
    [0, 1, 0]
    """
    if (n_clusters is None) == (distance_threshold is None):
        raise ValueError(
            "Exactly one of n_clusters and distance_threshold has to be set, and the other needs to be None."
        )
    c = _as_counts(counts)
    m = c.shape[0]
    if m == 0:
        raise ValueError("cut_tree needs at least one micro-cluster")
    Z = _check_linkage(Z, m)
    heights = Z[:, 2]
    if n_clusters is not None:
        K = _check_int("n_clusters", n_clusters, 1)
        if K > m:
            raise ValueError(
                f"n_clusters={K} exceeds the number of micro-clusters ({m}); use more micro-clusters"
            )
        r = m - K
    else:
        if isinstance(distance_threshold, (bool, np.bool_)) or not isinstance(distance_threshold, numbers.Real):
            raise TypeError(f"distance_threshold must be a real number, got {distance_threshold!r}")
        t = float(distance_threshold)
        if not (t >= 0.0) or np.isnan(t):
            raise ValueError(f"distance_threshold must be >= 0, got {distance_threshold!r}")
        if np.any(np.diff(heights) < 0):
            raise ValueError("distance_threshold needs a linkage with non-decreasing heights")
        r = int(np.searchsorted(heights, t, side="left"))
    # parent pointers for the first r merges, then pointer jumping (vectorised)
    parent = np.arange(2 * m - 1, dtype=np.int64)
    if r:
        kids = Z[:r, :2].astype(np.int64)
        parent[kids[:, 0]] = m + np.arange(r)
        parent[kids[:, 1]] = m + np.arange(r)
    root = parent[:m]
    while True:
        nxt = parent[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    _, first, inverse = np.unique(root, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    return rank[inverse.reshape(-1)]


def point_labels(micro_labels: np.ndarray, flat_labels: np.ndarray, offset: int = 0) -> np.ndarray:
    """Flat label of every point: ``flat_labels[offset + micro_labels]``.

    ``micro_labels`` are a partition's :attr:`MicroClusters.labels`, ``flat_labels``
    the output of :func:`cut_tree` over the merged micro-clusters and ``offset``
    the partition's entry of :func:`merge_micro_clusters`' offsets.
    """
    ml = np.asarray(micro_labels)
    fl = np.asarray(flat_labels)
    if ml.size and (ml.min() + offset < 0 or ml.max() + offset >= fl.shape[0]):
        raise ValueError("micro_labels + offset out of range of flat_labels")
    return fl[ml.astype(np.int64) + offset]


def cluster_sse(mc: MicroClusters, flat_labels: np.ndarray) -> np.ndarray:
    """Exact within-cluster sum of squares of each flat cluster ((K,) float64), from the features.

    ``sum ||x||^2 - ||sum x||^2 / n`` per cluster (clipped at 0); ``K = flat_labels.max() + 1``.
    """
    fl = np.asarray(flat_labels, dtype=np.int64)
    if fl.shape != (mc.m,):
        raise ValueError(f"flat_labels must have shape ({mc.m},), got {fl.shape}")
    K = int(fl.max()) + 1 if fl.size else 0
    n = np.bincount(fl, weights=mc.counts, minlength=K)
    q = np.bincount(fl, weights=mc.sqsums, minlength=K)
    s2 = np.zeros(K)
    for j in range(mc.d):
        sj = np.bincount(fl, weights=mc.sums[:, j], minlength=K)
        s2 += sj * sj
    return np.maximum(q - s2 / np.maximum(n, 1), 0.0)
