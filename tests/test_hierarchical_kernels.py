"""Ray-free tests of the two-level hierarchical clustering kernels (micro-clusters + weighted Ward)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster.hierarchy import dendrogram, fcluster, is_valid_linkage, linkage
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import adjusted_rand_score

from distspatial.kernels.hierarchical_kernels import (
    MicroClusters,
    cluster_sse,
    cut_tree,
    merge_micro_clusters,
    micro_clusters,
    node_point_counts,
    point_labels,
    ward_linkage,
)


def same_partition(a, b) -> bool:
    return adjusted_rand_score(np.asarray(a), np.asarray(b)) == 1.0


def separated_centers(k: int, d: int, min_sep: float, rng) -> np.ndarray:
    centers = []
    while len(centers) < k:
        c = rng.uniform(-25, 25, size=d)
        if all(np.linalg.norm(c - o) >= min_sep for o in centers):
            centers.append(c)
    return np.array(centers)


def blobs(n: int, centers: np.ndarray, std: float, rng) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(len(centers), size=n)
    return centers[y] + std * rng.normal(size=(n, centers.shape[1])), y


# --------------------------------------------------------------------------
# ward_linkage vs scipy
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n,d,seed", [(2, 1, 0), (3, 2, 1), (40, 1, 2), (300, 2, 3), (500, 3, 4), (400, 7, 5), (200, 25, 6)])
def test_ward_unit_counts_matches_scipy(n, d, seed):
    X = np.random.default_rng(seed).normal(size=(n, d)) * 3.0 + 1.0
    ones = np.ones(n, dtype=np.int64)
    Z = ward_linkage(ones, X, np.einsum("ij,ij->i", X, X))
    Zs = linkage(X, "ward")
    assert Z.shape == (n - 1, 4) and Z.dtype == np.float64
    assert is_valid_linkage(Z)
    np.testing.assert_allclose(Z[:, 2], Zs[:, 2], rtol=1e-9, atol=1e-12)
    assert np.array_equal(Z[:, [0, 1, 3]], Zs[:, [0, 1, 3]])  # same tree and labelling (no ties)
    assert np.all(np.diff(Z[:, 2]) >= 0)
    for K in (1, 2, 3, 5, 10):
        if K > n:
            continue
        ours = cut_tree(Z, ones, n_clusters=K)
        assert ours.max() + 1 == K
        assert same_partition(ours, fcluster(Zs, K, "maxclust"))
        assert same_partition(ours, fcluster(Z, K, "maxclust"))
    dendrogram(Z, no_plot=True)


def test_ward_ties_follow_scipy_conventions():
    g = np.stack(np.meshgrid(np.arange(6), np.arange(5)), -1).reshape(-1, 2).astype(float)
    ones = np.ones(len(g), dtype=np.int64)
    Z = ward_linkage(ones, g)
    Zs = linkage(g, "ward")
    assert np.array_equal(Z[:, [0, 1, 3]], Zs[:, [0, 1, 3]])
    np.testing.assert_allclose(Z[:, 2], Zs[:, 2], rtol=1e-9)
    assert np.array_equal(Z, ward_linkage(ones, g))  # deterministic
    # duplicates: zero-height merges first, valid linkage
    D = np.repeat(np.array([[0.0, 0.0], [1.0, 0.0]]), 4, axis=0)
    Zd = ward_linkage(np.ones(8, dtype=np.int64), D)
    assert is_valid_linkage(Zd)
    assert Zd.shape == (7, 4) and np.all(Zd[:6, 2] == 0.0) and Zd[6, 2] > 0
    np.testing.assert_allclose(Zd[:, 2], linkage(D, "ward")[:, 2], atol=1e-12)


def test_weighted_ward_equals_expanded_duplicates():
    rng = np.random.default_rng(7)
    m, d = 80, 3
    P = rng.normal(size=(m, d)) * 2.0
    counts = rng.integers(1, 6, size=m)
    E = np.repeat(P, counts, axis=0)  # every micro-cluster = counts[i] copies of one point
    mc = micro_clusters(E, 1000, seed=0)  # n <= n_micro: exact, one per distinct point
    assert mc.m == m and np.array_equal(mc.counts, counts)
    np.testing.assert_allclose(mc.sums, P * counts[:, None], rtol=1e-12)
    Z = ward_linkage(mc.counts, mc.sums, mc.sqsums)
    assert is_valid_linkage(Z)
    Zs = linkage(E, "ward")
    top = Zs[-(m - 1):]
    assert np.all(Zs[: len(E) - m, 2] == 0.0)
    np.testing.assert_allclose(Z[:, 2], top[:, 2], rtol=1e-9, atol=1e-12)
    # original-point counts of the nodes equal scipy's counts on the expanded points
    Zp = ward_linkage(mc.counts, mc.sums, count_column="points")
    assert np.array_equal(Zp[:, 3], top[:, 3])
    assert np.array_equal(node_point_counts(Z, mc.counts), top[:, 3].astype(np.int64))
    assert np.array_equal(Zp[:, :3], Z[:, :3])
    assert np.array_equal(Z[:, 3], node_point_counts(Z, np.ones(m, dtype=np.int64)))
    for K in (2, 3, 4, 7, 12):
        flat = cut_tree(Z, mc.counts, n_clusters=K)
        assert same_partition(point_labels(mc.labels, flat), fcluster(Zs, K, "maxclust"))
    # within-cluster sum of squares from the features equals the direct one
    flat = cut_tree(Z, mc.counts, n_clusters=4)
    pl = point_labels(mc.labels, flat)
    direct = [((E[pl == c] - E[pl == c].mean(0)) ** 2).sum() for c in range(4)]
    np.testing.assert_allclose(cluster_sse(mc, flat), direct, rtol=1e-9, atol=1e-9)


def test_distance_threshold_matches_sklearn_and_n_clusters():
    X = np.random.default_rng(8).normal(size=(400, 2))
    ones = np.ones(len(X), dtype=np.int64)
    Z = ward_linkage(ones, X)
    h = Z[:, 2]
    for j in (len(h) - 1, len(h) - 4, len(h) - 20, 200):
        t = 0.5 * (h[j - 1] + h[j])  # between two heights: merges 0..j-1 applied
        ours = cut_tree(Z, ones, distance_threshold=t)
        ref = AgglomerativeClustering(n_clusters=None, distance_threshold=t, linkage="ward").fit(X).labels_
        assert ours.max() + 1 == len(X) - j
        assert same_partition(ours, ref)
        assert np.array_equal(ours, cut_tree(Z, ones, n_clusters=len(X) - j))
    # a merge exactly at the threshold is not applied (sklearn: "at or above which ... not merged")
    assert cut_tree(Z, ones, distance_threshold=h[-1]).max() + 1 == 2
    assert cut_tree(Z, ones, distance_threshold=np.nextafter(h[-1], np.inf)).max() + 1 == 1
    assert np.array_equal(cut_tree(Z, ones, distance_threshold=0.0), np.arange(len(X)))
    assert np.array_equal(cut_tree(Z, ones, distance_threshold=np.inf), np.zeros(len(X)))


def test_cut_tree_label_numbering():
    X = np.array([[10.0], [0.0], [10.5], [0.2], [20.0]])
    ones = np.ones(5, dtype=np.int64)
    Z = ward_linkage(ones, X)
    assert cut_tree(Z, ones, n_clusters=3).tolist() == [0, 1, 0, 1, 2]
    assert cut_tree(Z, ones, n_clusters=5).tolist() == [0, 1, 2, 3, 4]
    assert cut_tree(Z, ones, n_clusters=1).tolist() == [0, 0, 0, 0, 0]
    assert cut_tree(Z, ones, n_clusters=3).dtype == np.int64


# --------------------------------------------------------------------------
# micro_clusters
# --------------------------------------------------------------------------


def check_features(mc: MicroClusters, X: np.ndarray, n_micro: int) -> None:
    n = len(X)
    assert mc.labels.shape == (n,) and mc.labels.dtype == np.int32
    assert mc.counts.dtype == np.int64 and mc.sums.dtype == np.float64 and mc.sqsums.dtype == np.float64
    assert 1 <= mc.m <= min(n, n_micro)
    assert mc.sums.shape == (mc.m, X.shape[1]) and mc.sqsums.shape == (mc.m,)
    assert np.all(mc.counts >= 1) and mc.counts.sum() == n and mc.n_points == n
    assert mc.labels.min() >= 0 and mc.labels.max() < mc.m
    assert np.array_equal(np.bincount(mc.labels, minlength=mc.m), mc.counts)
    sums = np.zeros_like(mc.sums)
    np.add.at(sums, mc.labels, X)
    np.testing.assert_allclose(mc.sums, sums, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(mc.sqsums, np.bincount(mc.labels, (X**2).sum(1), minlength=mc.m), rtol=1e-9)
    sse = np.array([((X[mc.labels == i] - X[mc.labels == i].mean(0)) ** 2).sum() for i in range(mc.m)])
    np.testing.assert_allclose(mc.sse, sse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n,d,n_micro", [(5000, 2, 50), (3000, 5, 100), (800, 3, 200), (300, 2, 300)])
def test_micro_clusters_features_and_determinism(n, d, n_micro):
    X = np.random.default_rng(n + d).normal(size=(n, d))
    mc = micro_clusters(X, n_micro, seed=3)
    check_features(mc, X, n_micro)
    if n > n_micro:
        assert mc.m == n_micro  # continuous data: every seed keeps points
    again = micro_clusters(X, n_micro, seed=3)
    for a, b in zip(mc, again):
        assert np.array_equal(a, b)
    # a small sample and no Lloyd iteration still give valid features
    check_features(micro_clusters(X, n_micro, seed=4, n_iter=0, sample_size=n_micro), X, n_micro)


def test_micro_clusters_k_means_quality():
    from sklearn.cluster import KMeans

    X = np.random.default_rng(1).normal(size=(20000, 2))
    ref = KMeans(100, n_init=1, random_state=0).fit(X[:5000])
    # within 30% of a full k-means inertia (scaled to the number of points), also when the
    # partition's points come in spatial order (the sample must be random, not a prefix)
    for Y in (X, X[np.argsort(X[:, 0])]):
        mc = micro_clusters(Y, 100, seed=0, sample_size=8000)
        assert mc.sse.sum() <= 1.3 * ref.inertia_ * 4


def test_micro_clusters_small_inputs_and_duplicates():
    X = np.array([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [0.0, -0.0], [-0.0, 0.0]])
    mc = micro_clusters(X, 5, seed=0)  # n <= n_micro: one per distinct point, first occurrence order
    assert mc.labels.tolist() == [0, 1, 0, 2, 2]
    assert mc.counts.tolist() == [2, 1, 2]
    check_features(mc, X, 5)
    # one point
    one = micro_clusters(np.array([[7.0, 8.0, 9.0]]), 10, seed=1)
    assert one.counts.tolist() == [1] and one.labels.tolist() == [0] and one.sqsums.tolist() == [194.0]
    # all duplicates with n > n_micro -> a single micro-cluster
    dup = micro_clusters(np.full((5000, 3), 2.5), 20, seed=2)
    assert dup.m == 1 and dup.counts.tolist() == [5000] and np.all(dup.labels == 0)
    np.testing.assert_allclose(dup.sums, [[12500.0] * 3])
    # few distinct values, n > n_micro: each value its own micro-cluster
    vals = np.random.default_rng(0).normal(size=(7, 2))
    Y = vals[np.random.default_rng(1).integers(7, size=3000)]
    few = micro_clusters(Y, 20, seed=3)
    assert few.m == 7 and np.allclose(few.sse, 0.0)
    check_features(few, Y, 20)
    # empty input
    empty = micro_clusters(np.zeros((0, 4)), 10, seed=0)
    assert empty.m == 0 and empty.sums.shape == (0, 4) and empty.labels.shape == (0,)
    assert empty.counts.dtype == np.int64


def test_micro_clusters_invalid_args():
    X = np.zeros((10, 2))
    with pytest.raises(ValueError, match="n_micro"):
        micro_clusters(X, 0, seed=0)
    with pytest.raises(TypeError, match="n_micro"):
        micro_clusters(X, 2.5, seed=0)
    with pytest.raises(ValueError, match="2-D"):
        micro_clusters(np.zeros(10), 3, seed=0)
    with pytest.raises(ValueError, match="finite"):
        micro_clusters(np.array([[0.0, np.nan]]), 3, seed=0)
    with pytest.raises(ValueError, match="sample_size"):
        micro_clusters(X, 3, seed=0, sample_size=0)
    with pytest.raises(TypeError):
        micro_clusters(X, 3)  # seed is required (keyword-only)


# --------------------------------------------------------------------------
# edge cases and argument checks of the level-2 functions
# --------------------------------------------------------------------------


def test_single_micro_cluster_and_two():
    Z = ward_linkage(np.array([5]), np.array([[1.0, 2.0]]), np.array([3.0]))
    assert Z.shape == (0, 4) and Z.dtype == np.float64
    assert cut_tree(Z, np.array([5]), n_clusters=1).tolist() == [0]
    assert cut_tree(Z, np.array([5]), distance_threshold=1.0).tolist() == [0]
    Z2 = ward_linkage(np.array([1, 3]), np.array([[0.0], [6.0]]))  # centroids 0 and 2
    np.testing.assert_allclose(Z2, [[0, 1, np.sqrt(2 * 3 / 4) * 2.0, 2]])
    assert is_valid_linkage(Z2)
    assert cut_tree(Z2, np.array([1, 3]), n_clusters=2).tolist() == [0, 1]


def test_invalid_arguments():
    c = np.array([1, 2, 3])
    S = np.arange(6, dtype=float).reshape(3, 2)
    Z = ward_linkage(c, S)
    with pytest.raises(ValueError, match="Exactly one of n_clusters and distance_threshold"):
        cut_tree(Z, c)
    with pytest.raises(ValueError, match="Exactly one of n_clusters and distance_threshold"):
        cut_tree(Z, c, n_clusters=2, distance_threshold=1.0)
    with pytest.raises(ValueError, match="exceeds the number of micro-clusters"):
        cut_tree(Z, c, n_clusters=4)
    with pytest.raises(ValueError, match="n_clusters"):
        cut_tree(Z, c, n_clusters=0)
    with pytest.raises(TypeError, match="n_clusters"):
        cut_tree(Z, c, n_clusters=2.0)
    with pytest.raises(ValueError, match="distance_threshold"):
        cut_tree(Z, c, distance_threshold=-1.0)
    with pytest.raises(ValueError, match="shape"):
        cut_tree(Z[:1], c, n_clusters=2)
    bad = Z.copy()
    bad[0, 1] = 4  # uses cluster 4 before it is formed
    with pytest.raises(ValueError, match="valid linkage"):
        cut_tree(bad, c, n_clusters=2)
    with pytest.raises(ValueError, match=">= 1"):
        ward_linkage(np.array([1, 0, 3]), S)
    with pytest.raises(ValueError, match="at least one"):
        ward_linkage(np.zeros(0, dtype=np.int64), np.zeros((0, 2)))
    with pytest.raises(ValueError, match="sums must have shape"):
        ward_linkage(c, S[:2])
    with pytest.raises(ValueError, match="sqsums"):
        ward_linkage(c, S, np.zeros(2))
    with pytest.raises(ValueError, match="finite"):
        ward_linkage(c, np.array([[0.0, np.inf], [1, 1], [2, 2]]))
    with pytest.raises(ValueError, match="count_column"):
        ward_linkage(c, S, count_column="nodes")
    with pytest.raises(ValueError, match="whole numbers"):
        ward_linkage(np.array([1.5, 2, 3]), S)


def test_merge_micro_clusters_and_point_labels():
    rng = np.random.default_rng(11)
    parts_X = [rng.normal(size=(n, 3)) for n in (500, 0, 40, 1200)]
    parts = [micro_clusters(X, 30, seed=i) for i, X in enumerate(parts_X)]
    merged, offsets = merge_micro_clusters(parts)
    assert offsets.tolist() == [0, 30, 30, 60, 90]
    assert merged.m == 90 and merged.n_points == 1740
    assert merged.labels.shape == (1740,) and merged.labels.dtype == np.int64
    check_features(merged._replace(labels=merged.labels.astype(np.int32)), np.concatenate(parts_X), 90)
    summaries, off2 = merge_micro_clusters([p.summary() for p in parts])
    assert summaries.labels is None and np.array_equal(off2, offsets)
    assert np.array_equal(summaries.sums, merged.sums)
    Z = ward_linkage(merged.counts, merged.sums, merged.sqsums)
    flat = cut_tree(Z, merged.counts, n_clusters=5)
    per_part = np.concatenate([point_labels(p.labels, flat, int(o)) for p, o in zip(parts, offsets[:-1])])
    assert np.array_equal(per_part, point_labels(merged.labels, flat))
    with pytest.raises(ValueError, match="different dimensions"):
        merge_micro_clusters([parts[0], micro_clusters(np.zeros((3, 2)), 2, seed=0)])
    with pytest.raises(ValueError, match="at least one"):
        merge_micro_clusters([])
    with pytest.raises(ValueError, match="out of range"):
        point_labels(np.array([0, 5]), np.array([0, 1]))


# --------------------------------------------------------------------------
# end to end: partitions -> micro-clusters -> Ward -> flat labels
# --------------------------------------------------------------------------


def two_level(X: np.ndarray, n_parts: int, n_micro: int, spatial: bool):
    """Simulate the distributed pipeline; returns (cut, Z, merged), cut(**kw) -> point labels in X's order."""
    order = np.argsort(X[:, 0], kind="stable") if spatial else np.random.default_rng(0).permutation(len(X))
    chunks = np.array_split(order, n_parts)
    full = [micro_clusters(X[idx], n_micro, seed=p) for p, idx in enumerate(chunks)]  # on the nodes
    merged, offsets = merge_micro_clusters([mc.summary() for mc in full])  # on the coordinator
    Z = ward_linkage(merged.counts, merged.sums, merged.sqsums)

    def cut(**kw):
        flat = cut_tree(Z, merged.counts, **kw)
        labels = np.empty(len(X), dtype=np.int64)
        for p, idx in enumerate(chunks):
            labels[idx] = point_labels(full[p].labels, flat, int(offsets[p]))
        return labels

    return cut, Z, merged


@pytest.mark.parametrize("d,k,spatial", [(2, 6, True), (3, 8, False), (5, 5, True)])
def test_end_to_end_separated_blobs(d, k, spatial):
    rng = np.random.default_rng(100 + d)
    centers = separated_centers(k, d, 10.0, rng)
    X, y = blobs(30000, centers, 0.6, rng)
    cut, Z, merged = two_level(X, 4, 100, spatial)
    labels = cut(n_clusters=k)
    assert is_valid_linkage(Z) and merged.n_points == len(X)
    sub = rng.choice(len(X), 2500, replace=False)
    ref = AgglomerativeClustering(n_clusters=k, linkage="ward").fit(X[sub]).labels_
    ari_ref = adjusted_rand_score(ref, labels[sub])
    ari_true = adjusted_rand_score(y, labels)
    gap = Z[-(k - 1), 2] / Z[-k, 2]
    print(f"\nseparated d={d} k={k} spatial={spatial}: ARI vs sklearn ward (2500 subsample) = {ari_ref:.4f}, "
          f"vs truth = {ari_true:.4f}, height gap at k = {gap:.1f}x")
    assert ari_ref >= 0.9 and ari_true >= 0.9
    # distance threshold inside the gap gives the same clusters
    t = float(np.sqrt(Z[-k, 2] * Z[-(k - 1), 2]))
    assert np.array_equal(cut(distance_threshold=t), labels)


@pytest.mark.parametrize("d,std", [(2, 3.0), (2, 4.5), (3, 4.5), (5, 3.0)])
def test_end_to_end_overlapping_blobs_recorded(d, std):
    rng = np.random.default_rng(200 + d)
    k = 6
    centers = separated_centers(k, d, 6.0, rng)
    X, y = blobs(30000, centers, std, rng)
    cut, Z, _ = two_level(X, 4, 100, True)
    labels = cut(n_clusters=k)
    sub = rng.choice(len(X), 2500, replace=False)
    ref = AgglomerativeClustering(n_clusters=k, linkage="ward").fit(X[sub]).labels_
    ari_ref = adjusted_rand_score(ref, labels[sub])
    ari_true = adjusted_rand_score(y, labels)
    ari_ref_true = adjusted_rand_score(y[sub], ref)
    print(f"\noverlapping d={d} std={std}: ARI vs sklearn ward (2500 subsample) = {ari_ref:.4f}, vs truth = {ari_true:.4f} "
          f"(sklearn subsample vs truth = {ari_ref_true:.4f})")
    assert ari_ref >= 0.3
