"""Tests of the Ray-free distributed DBSCAN kernels (distspatial.kernels.dbscan_kernels).

A pure-numpy harness simulates the distributed protocol: the data are split into partitions (slabs
along the first coordinate, random boxes, ...), each partition's halo is computed by brute force (the
points of the other partitions inside its bounding box expanded by eps), round 1 (core_flags) and
round 2 (local_clusters) run per partition, and merge_labels joins the results.  The reference is
sklearn.cluster.DBSCAN itself: identical core samples and noise, identical clusters on the core
points (checked as a bijection and also as sklearn's exact numbering), and every border point labelled
like some core point within eps of it.  Cases too dense for sklearn use an analytic reference.
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
from sklearn.cluster import DBSCAN
from sklearn.neighbors import KDTree

from distspatial.kernels import dbscan_kernels as dk
from distspatial.kernels.dbscan_kernels import PartLabels, core_flags, dbscan, local_clusters, merge_labels

# --------------------------------------------------------------------------
# harness
# --------------------------------------------------------------------------


def split_slabs(X: np.ndarray, P: int) -> list[np.ndarray]:
    return np.array_split(np.argsort(X[:, 0], kind="stable"), P)


def split_boxes(X: np.ndarray, P: int, seed: int) -> list[np.ndarray]:
    """Random axis-aligned box split: repeatedly cut the largest part at a random quantile of a random dimension."""
    rng = np.random.default_rng(seed)
    parts = [np.arange(X.shape[0])]
    while len(parts) < P:
        k = max(range(len(parts)), key=lambda i: parts[i].size)
        idx = parts.pop(k)
        dim = int(rng.integers(X.shape[1]))
        cut = np.quantile(X[idx, dim], rng.uniform(0.2, 0.8))
        left = X[idx, dim] <= cut
        parts += [idx[left], idx[~left]]
    return parts


def run_distributed(X, eps, min_samples, parts, *, max_pairs=dk.DEFAULT_MAX_PAIRS, halo_pad=0.0, seed=0):
    """Simulate the coordinator: returns (labels in data order, core flags)."""
    n = X.shape[0]
    rng = np.random.default_rng(seed)
    gid = rng.permutation(n).astype(np.int64) * 7 + 1000  # arbitrary distinct global ids
    owner = np.full(n, -1)
    for p, idx in enumerate(parts):
        owner[idx] = p
    assert np.all(owner >= 0)
    halos = []
    for p, idx in enumerate(parts):
        if idx.size == 0:
            halos.append(np.zeros(0, dtype=np.intp))
            continue
        lo = X[idx].min(axis=0) - eps - halo_pad
        hi = X[idx].max(axis=0) + eps + halo_pad
        inside = np.all((X >= lo) & (X <= hi), axis=1) & (owner != p)
        halos.append(np.flatnonzero(inside))
    core = np.zeros(n, dtype=bool)
    for idx, h in zip(parts, halos):  # round 1
        core[idx] = core_flags(X[idx], X[h], eps, min_samples, max_pairs=max_pairs)
    results = []
    for idx, h in zip(parts, halos):  # round 2
        labels, link_comp, rows = local_clusters(X[idx], core[idx], X[h], core[h], eps, max_pairs=max_pairs)
        assert labels.dtype == np.int64 and labels.shape == (idx.size,)
        assert link_comp.dtype == np.int64 and rows.dtype == np.int64
        np.testing.assert_array_equal(rows, np.flatnonzero(core[h]))
        assert np.all(labels[core[idx]] >= 0)
        ncomp = max(labels.max(initial=-1), link_comp.max(initial=-1)) + 1
        used = np.zeros(ncomp, dtype=bool)
        used[labels[core[idx]]] = True
        used[link_comp] = True
        assert used.all(), "local component ids are not 0..C-1 (each with a core point)"
        results.append(PartLabels(gid[idx], labels, link_comp, gid[h[rows]], core[idx]))
    labels = merge_labels(results, gid)
    return labels, core


def check_against_sklearn(X, eps, min_samples, labels, core):
    sk = DBSCAN(eps=eps, min_samples=min_samples).fit(X)
    sk_core = np.zeros(X.shape[0], dtype=bool)
    sk_core[sk.core_sample_indices_] = True
    np.testing.assert_array_equal(core, sk_core, err_msg="core samples differ from sklearn")
    np.testing.assert_array_equal(labels == -1, sk.labels_ == -1, err_msg="noise differs from sklearn")
    # clusters on core points: a bijection between our labels and sklearn's
    pairs = np.unique(np.stack([labels[core], sk.labels_[core]], axis=1), axis=0)
    assert np.unique(pairs[:, 0]).size == pairs.shape[0] == np.unique(pairs[:, 1]).size, "clusters differ"
    # consecutive ids 0..K-1, numbered as sklearn does (first core point in data order)
    k = labels.max() + 1
    np.testing.assert_array_equal(np.unique(labels[labels >= 0]), np.arange(k))
    np.testing.assert_array_equal(labels[core], sk.labels_[core])
    # border points: the label of some core point within eps (sklearn's own neighbour test)
    border = np.flatnonzero(~core & (labels >= 0))
    if border.size:
        cidx = np.flatnonzero(core)
        nbrs = KDTree(X[cidx]).query_radius(X[border], eps)
        for b, nb in zip(border, nbrs):
            assert labels[b] in set(labels[cidx[nb]].tolist()), f"border point {b} has no adjacent core of its cluster"
    return sk


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------


def skewed_blobs(rng, d, n=2400):
    sizes = [n // 2, n // 4, n // 8, n // 16]
    stds = [1.0, 0.4, 0.15, 0.05]
    centers = rng.uniform(-6, 6, (len(sizes), d))
    X = [rng.normal(c, s, (m, d)) for c, s, m in zip(centers, stds, sizes)]
    X.append(rng.uniform(-8, 8, (n - sum(sizes), d)))
    return np.concatenate(X)


def duplicates(rng, d, n=2000):
    base = rng.uniform(0, 5, (n // 20, d))
    X = np.concatenate([np.repeat(base, rng.integers(1, 40, base.shape[0]), axis=0), rng.uniform(0, 5, (n // 4, d))])
    return X[rng.permutation(X.shape[0])]


def lattice(rng, d, n=1500, size=14):
    """Integer points with repeats: many pairs at distance exactly 1, sqrt(2), ... (ties at eps)."""
    return rng.integers(0, size, (n, d)).astype(np.float64)


DATA = {
    "blobs2": (lambda rng: skewed_blobs(rng, 2), [(0.1, 5), (0.3, 10), (0.6, 4)]),
    "blobs3": (lambda rng: skewed_blobs(rng, 3), [(0.3, 5), (0.8, 8)]),
    "blobs5": (lambda rng: skewed_blobs(rng, 5, n=1600), [(0.6, 5), (1.5, 10)]),
    "uniform2": (lambda rng: rng.uniform(0, 30, (2500, 2)), [(0.5, 3), (0.9, 6)]),
    "uniform3": (lambda rng: rng.uniform(0, 10, (2500, 3)), [(0.7, 4), (0.9, 10)]),
    "dups2": (lambda rng: duplicates(rng, 2), [(0.05, 5), (0.2, 12)]),
    "dups5": (lambda rng: duplicates(rng, 5), [(0.3, 5), (1.0, 20)]),
    "lattice2": (lambda rng: lattice(rng, 2, n=900, size=40), [(1.0, 4), (np.sqrt(2.0), 5), (1.0 - 1e-13, 2)]),
    "lattice3": (lambda rng: lattice(rng, 3), [(1.0, 4), (np.sqrt(2.0), 9), (np.sqrt(3.0), 12)]),
}

SPLITS = ["one", "slabs4", "boxes5", "boxes3_pad"]


def make_parts(X, split):
    if split == "one":
        return [np.arange(X.shape[0])], 0.0
    if split == "slabs4":
        return split_slabs(X, 4), 0.0
    if split == "boxes5":
        return split_boxes(X, 5, seed=1), 0.0
    if split == "boxes3_pad":  # larger halos than needed: must not change anything
        return split_boxes(X, 3, seed=2), 0.37
    raise ValueError(split)


# --------------------------------------------------------------------------
# comparison with sklearn
# --------------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("name", sorted(DATA))
def test_matches_sklearn(name, split):
    make, params = DATA[name]
    X = make(np.random.default_rng(sum(map(ord, name))))
    parts, pad = make_parts(X, split)
    n_clusters = []
    for eps, ms in params:
        labels, core = run_distributed(X, eps, ms, parts, halo_pad=pad * eps)
        sk = check_against_sklearn(X, eps, ms, labels, core)
        n_clusters.append(sk.labels_.max() + 1)
    assert max(n_clusters) >= 2  # non-trivial clusterings


@pytest.mark.parametrize("name", ["blobs2", "blobs5", "dups2", "lattice2", "uniform3"])
def test_small_budgets_and_thresholds(name, monkeypatch):
    """Every cell dense, tiny brute-force limit and pair budget: exercises all bounded code paths."""
    monkeypatch.setattr(dk, "_DENSE_CELL", 2)
    monkeypatch.setattr(dk, "_BRUTE_WORK", 8)
    monkeypatch.setattr(dk, "_TREE_MIN_CELL", 2)
    make, params = DATA[name]
    X = make(np.random.default_rng(7))
    for split in ["one", "slabs4"]:
        parts, _ = make_parts(X, split)
        for eps, ms in params:
            labels, core = run_distributed(X, eps, ms, parts, max_pairs=300)
            check_against_sklearn(X, eps, ms, labels, core)


def test_small_budget_sparse_only(monkeypatch):
    """No dense cells at all: only the chunked point-pair enumeration (blocks split by count)."""
    monkeypatch.setattr(dk, "_DENSE_CELL", 10**9)
    X = skewed_blobs(np.random.default_rng(3), 3)
    for eps, ms in [(0.3, 4), (0.8, 8)]:
        labels, core = run_distributed(X, eps, ms, split_slabs(X, 3), max_pairs=20_000)
        check_against_sklearn(X, eps, ms, labels, core)


def _brute_pairs(A, B, r):
    d2 = ((A[:, None, :] - B[None, :, :]) ** 2).sum(axis=2)
    return {(int(i), int(j)) for i, j in zip(*np.nonzero(d2 <= r * r))}


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("bound", [None, 40])
def test_pair_enumeration_is_complete_and_chunked(d, bound):
    """_self_pairs / _cross_pairs: every pair within r exactly once, chunks within the budget."""
    rng = np.random.default_rng(d)
    S = np.concatenate([rng.normal(0, 0.02, (300, d)), rng.uniform(-1, 1, (500, d))])
    r, max_pairs = 0.06, 500
    got, sizes = [], []
    for i, j in dk._self_pairs(S, r, max_pairs, bound=bound):
        sizes.append(i.size)
        got += [(min(a, b), max(a, b)) for a, b in zip(i.tolist(), j.tolist())]
    assert all(a != b for a, b in got)
    assert len(got) == len(set(got)) and set(got) == {p for p in _brute_pairs(S, S, r) if p[0] < p[1]}
    if bound is None:  # the dense blob alone has ~45k pairs: it must have been split
        assert len(sizes) > 1 and max(sizes) <= max_pairs
    Q = rng.normal(0, 0.04, (200, d))
    tree = dk.cKDTree(S)
    got, sizes = [], []
    for qi, tj in dk._cross_pairs(Q, tree, r, max_pairs):
        sizes.append(qi.size)
        got += list(zip(qi.tolist(), tj.tolist()))
    assert len(got) == len(set(got)) and set(got) == _brute_pairs(Q, S, r)
    assert len(sizes) > 1 and max(sizes) <= max_pairs


# Two unit vectors in 8-D for which scipy's cKDTree (which sums the squares in another order than
# sklearn from d = 8 on) finds V1 strictly nearer the origin than V2, while sklearn's sequential sum
# puts V2 within EPS_8D of the origin and V1 not.  Whatever the scipy build, the results must match
# sklearn; with this build they exercise the exact re-check behind every KD-tree answer.
EPS_8D = 0.9999999999999999
V1 = np.array([-0.2949468563642691, 0.4464206209229707, -0.5683419513083502, -0.188079359266091,
               0.3911350899893441, -0.11239642209603569, 0.01163979538640917, -0.43540034793171445])
V2 = np.array([0.35072334672116745, -0.7009609020658762, -0.01096969341997187, 0.32595302125201453,
               -0.023144873634487455, -0.4349198000184085, -0.20796734633738256, -0.21526705933893026])


def test_kdtree_rounding_differs_from_sklearn():
    # core test: the origin's 2nd nearest point by the KD-tree (V1) is not within eps, V2 is
    X = np.stack([np.zeros(8), V1, V2])
    labels, core = run_distributed(X, EPS_8D, 2, [np.arange(3)])
    check_against_sklearn(X, EPS_8D, 2, labels, core)
    assert core.tolist() == [True, False, True]
    # border test: the origin is not core; its nearest core point by the KD-tree (V1) is not within eps
    X = np.stack([np.zeros(8), V1, 1.3 * V1, 1.6 * V1, V2, 1.3 * V2, 1.6 * V2])
    for parts in ([np.arange(7)], [np.array([0, 1, 2, 3]), np.array([4, 5, 6])]):
        labels, core = run_distributed(X, EPS_8D, 3, parts)
        check_against_sklearn(X, EPS_8D, 3, labels, core)
        assert not core[0] and labels[0] == labels[4] != labels[1]


@pytest.mark.parametrize("d", [2, 3, 5])
def test_grid_cell_diagonal(d):
    """Points a relative 1e-12 farther apart than eps along a grid cell's diagonal are not neighbours
    (a grid cell holds only points pairwise within eps, however the cell boundaries fall)."""
    eps = 0.7
    a = eps / np.sqrt(d) * (1 + 1e-12)
    rng = np.random.default_rng(d)
    shifts = rng.uniform(0, 6, (40, d))
    # the first pair spans the diagonal of the cell at the data's minimum corner (the grid's origin)
    X = np.concatenate([np.zeros((1, d)), np.full((1, d), a)] + [np.stack([s, s + a]) for s in shifts])
    for ms in (2, 1):
        labels, core = run_distributed(X, eps, ms, [np.arange(X.shape[0])])
        check_against_sklearn(X, eps, ms, labels, core)
    X2 = np.repeat(X, 2, axis=0)  # every point core through its duplicate, pairs must stay apart
    labels, core = run_distributed(X2, eps, 2, [np.arange(X2.shape[0])])
    check_against_sklearn(X2, eps, 2, labels, core)


def test_union_find_matches_connected_components():
    """The vectorised union-find (small batches: linking loop; big batches: connected_components)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(0)
    n = 6000
    uf = dk._UnionFind(n)
    ea, eb = [], []
    for size in [3, 50, 5000, 1, 200, 9000, 7, 3000, 20]:
        a = rng.integers(0, n, size)
        b = np.where(rng.random(size) < 0.5, rng.integers(0, n, size), (a + rng.integers(1, 4, size)) % n)
        uf.union(a, b)
        ea.append(a)
        eb.append(b)
        A, B = np.concatenate(ea), np.concatenate(eb)
        _, ref = connected_components(coo_matrix((np.ones(A.size), (A, B)), shape=(n, n)), directed=False)
        root = uf.flatten()
        assert np.all(root <= np.arange(n)) and np.all(root[root] == root)
        pairs = np.unique(np.stack([root, ref], axis=1), axis=0)
        assert pairs.shape[0] == np.unique(root).size == np.unique(ref).size


def test_eps_tiny_relative_to_coordinates():
    """eps far below the coordinate resolution of the grid: every distinct point is its own cell."""
    rng = np.random.default_rng(8)
    base = rng.uniform(-1e6, 1e6, (300, 2))
    X = np.repeat(base, rng.integers(1, 5, 300), axis=0)
    X = np.concatenate([X, base[:50] + 1e-10])
    for ms in (2, 3):
        labels, core = run_distributed(X, 1e-9, ms, split_slabs(X, 2))
        check_against_sklearn(X, 1e-9, ms, labels, core)


def test_code_paths_are_exercised(monkeypatch):
    """The dense-cell, tree, and ambiguity-fallback paths really run in the sklearn comparisons above."""
    calls = {}

    def spy(fname):
        orig = getattr(dk, fname)

        def wrapper(*a, **k):
            calls[fname] = calls.get(fname, 0) + 1
            return orig(*a, **k)

        monkeypatch.setattr(dk, fname, wrapper)

    for f in ["_ball_hits", "_nearest_within", "_block_pairs", "_cross_pairs"]:
        spy(f)
    monkeypatch.setattr(dk, "_TREE_MIN_CELL", 2)
    # lattice with eps just below 1: pairs at distance 1 fail the exact test but pass the KD-tree radius
    X = lattice(np.random.default_rng(5), 2, n=600, size=30)
    labels, core = run_distributed(X, 1.0 - 1e-13, 2, split_slabs(X, 2))
    check_against_sklearn(X, 1.0 - 1e-13, 2, labels, core)
    assert calls.get("_ball_hits", 0) > 0
    # dense cells next to sparse points, dense-dense pairs without witness, big groups resolved by trees
    rng = np.random.default_rng(6)
    X = np.concatenate([rng.normal(0, 0.3, (3000, 2)), rng.uniform(-2, 2, (400, 2)),
                        rng.normal([3.0, 0.0], 0.01, (200, 2))])
    monkeypatch.setattr(dk, "_BRUTE_WORK", 64)
    labels, core = run_distributed(X, 0.08, 6, split_boxes(X, 3, seed=4), max_pairs=3000)
    check_against_sklearn(X, 0.08, 6, labels, core)
    # more nearest-neighbour calls than the 3 border assignments: some dense cells were queried by tree
    assert calls.get("_cross_pairs", 0) > 0 and calls.get("_nearest_within", 0) > 3
    assert calls.get("_block_pairs", 0) > 0


def test_moderately_dense_default_settings():
    """Many dense cells (about 100 points per grid cell) with default thresholds, against sklearn."""
    rng = np.random.default_rng(11)
    X = np.concatenate([rng.uniform(0, 6, (5000, 2)), rng.uniform(7.05, 9, (1500, 2)), rng.uniform(-3, 12, (300, 2))])
    for eps, ms in [(0.5, 30), (1.0, 400)]:
        labels, core = run_distributed(X, eps, ms, split_slabs(X, 3))
        check_against_sklearn(X, eps, ms, labels, core)


# --------------------------------------------------------------------------
# edge cases
# --------------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 3, 5])
def test_edge_parameters(d):
    X = skewed_blobs(np.random.default_rng(d), d, n=800)
    parts = split_slabs(X, 3)
    # eps so small that every point is noise
    labels, core = run_distributed(X, 1e-9, 2, parts)
    assert not core.any() and np.all(labels == -1)
    check_against_sklearn(X, 1e-9, 2, labels, core)
    # eps so large that everything is one cluster
    labels, core = run_distributed(X, 1e3, 5, parts)
    assert core.all() and np.all(labels == 0)
    # min_samples = 1: every point is core (isolated points are singleton clusters)
    for eps in (1e-9, 0.3):
        labels, core = run_distributed(X, eps, 1, parts)
        assert core.all()
        check_against_sklearn(X, eps, 1, labels, core)
    # min_samples above the number of points: all noise
    labels, core = run_distributed(X, 1e3, X.shape[0] + 1, parts)
    assert not core.any() and np.all(labels == -1)


def test_empty_partitions_and_halos():
    X = skewed_blobs(np.random.default_rng(2), 2, n=1000)
    far = np.array([[100.0, 100.0], [100.05, 100.0], [100.1, 100.0]])  # a partition with no halo
    Y = np.concatenate([X, far])
    parts = split_slabs(X, 3) + [np.arange(X.shape[0], Y.shape[0]), np.zeros(0, dtype=np.intp)]
    for eps, ms in [(0.3, 5), (0.06, 3)]:
        labels, core = run_distributed(Y, eps, ms, parts)
        check_against_sklearn(Y, eps, ms, labels, core)
    # the kernels directly
    empty = np.zeros((0, 2))
    assert core_flags(empty, X, 0.3, 5).shape == (0,)
    assert core_flags(far, None, 0.06, 2).tolist() == [True, True, True]
    lab, lc, rows = local_clusters(empty, np.zeros(0, bool), X[:5], np.ones(5, bool), 0.3)
    assert lab.shape == (0,) and lc.shape == (5,) and rows.tolist() == [0, 1, 2, 3, 4]
    lab, lc, rows = local_clusters(far, np.array([False, True, False]), empty, np.zeros(0, bool), 0.06)
    assert lab.tolist() == [0, 0, 0] and lc.size == 0 and rows.size == 0
    lab, lc, rows = local_clusters(far, np.zeros(3, bool), empty, np.zeros(0, bool), 0.06)
    assert lab.tolist() == [-1, -1, -1]
    assert merge_labels([]).shape == (0,)


def test_single_node_dbscan_matches_sklearn():
    X = skewed_blobs(np.random.default_rng(9), 2)
    labels, core = dbscan(X, 0.3, 10)
    sk = check_against_sklearn(X, 0.3, 10, labels, core)
    np.testing.assert_array_equal(labels[core], sk.labels_[core])


def test_merge_labels_order_and_validation():
    p0 = PartLabels(np.array([10, 11, 12]), np.array([0, -1, 1]), np.array([0]), np.array([20]))
    p1 = PartLabels(np.array([20, 21]), np.array([0, 0]), np.array([0]), np.array([10]))
    assert merge_labels([p0, p1]).tolist() == [0, -1, 1, 0, 0]  # ascending ids 10, 11, 12, 20, 21
    assert merge_labels([p0, p1], np.array([12, 21, 11, 20, 10])).tolist() == [0, 1, -1, 1, 1]
    assert merge_labels([tuple(p1), tuple(p0)], np.array([12, 21, 11, 20, 10])).tolist() == [0, 1, -1, 1, 1]
    with pytest.raises(ValueError):  # link to an unknown id
        merge_labels([p0, p1._replace(link_ids=np.array([99]))])
    with pytest.raises(ValueError):  # link to a point its owner calls noise
        merge_labels([p0, p1._replace(link_ids=np.array([11]))])
    with pytest.raises(ValueError):  # duplicate ids
        merge_labels([p0, p1._replace(ids=np.array([20, 10]))])
    with pytest.raises(ValueError):  # ids not a permutation
        merge_labels([p0, p1], np.array([10, 11, 12, 20, 20]))


def test_input_validation():
    X = np.zeros((3, 2))
    with pytest.raises(ValueError):
        core_flags(X, np.zeros((2, 3)), 0.1, 2)
    with pytest.raises(ValueError):
        core_flags(X, None, 0.0, 2)
    with pytest.raises(ValueError):
        core_flags(X, None, 0.1, 0)
    with pytest.raises(ValueError):
        core_flags(np.array([[np.nan, 0.0]]), None, 0.1, 2)
    with pytest.raises(ValueError):
        local_clusters(X, np.ones(2, bool), None, np.zeros(0, bool), 0.1)


# --------------------------------------------------------------------------
# dense data: bounded memory and time
# --------------------------------------------------------------------------


def tiny_balls(rng, n, d, eps):
    """Three balls of radius eps/20 (n points each third) on a line: the first two are 0.8 eps apart
    (one cluster), the third 2.5 eps from the second (another cluster); plus 30 isolated points."""
    centers = np.zeros((3, d))
    centers[1, 0] = 0.8 * eps
    centers[2, 0] = 3.3 * eps
    m = n // 3
    balls = []
    for c in centers:
        v = rng.normal(size=(m, d))
        v *= (eps / 20) * rng.uniform(0, 1, (m, 1)) ** (1 / d) / np.linalg.norm(v, axis=1, keepdims=True)
        balls.append(c + v)
    iso = np.zeros((30, d))
    iso[:, 0] = 10 * eps + 3 * eps * np.arange(30)
    X = np.concatenate(balls + [iso])
    truth = np.concatenate([np.zeros(2 * m, np.int64), np.ones(m, np.int64), np.full(30, -1, np.int64)])
    return X, truth


@pytest.mark.parametrize("d", [2, 5])
def test_dense_bounded(d):
    """100k points, every ball point within eps of 2/3 of the data (~7e9 pairs): tiny max_pairs, bounded memory."""
    eps = 1.0
    X, truth = tiny_balls(np.random.default_rng(d), 100_000, d, eps)
    tracemalloc.start()
    t0 = time.perf_counter()
    labels, core = run_distributed(X, eps, 50, split_slabs(X, 3), max_pairs=10_000)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    np.testing.assert_array_equal(core, truth >= 0)
    np.testing.assert_array_equal(labels, truth)
    assert peak < 150 * 2**20, f"peak traced memory {peak / 2**20:.0f} MiB"
    assert elapsed < 20, elapsed


def test_dense_duplicates_fast():
    """200k points at 500 distinct positions (heavy duplication), one partition and four."""
    rng = np.random.default_rng(4)
    base = rng.uniform(0, 10, (500, 2))
    X = np.repeat(base, 400, axis=0)
    t0 = time.perf_counter()
    labels, core = dbscan(X, 0.3, 5, max_pairs=50_000)
    assert time.perf_counter() - t0 < 10
    ref_labels, ref_core = dbscan(base, 0.3, 1)  # the distinct positions: every position is core
    np.testing.assert_array_equal(core, np.ones(X.shape[0], bool))
    np.testing.assert_array_equal(labels, np.repeat(ref_labels, 400))
    check_against_sklearn(base, 0.3, 1, ref_labels, ref_core)
    labels4, core4 = run_distributed(X, 0.3, 5, split_boxes(X, 4, seed=0), max_pairs=50_000)
    np.testing.assert_array_equal(core4, core)
    np.testing.assert_array_equal(labels4, labels)
