"""Distributed k-means on a real local Ray runtime, checked against scikit-learn."""

import numpy as np
import pytest
from sklearn.cluster import KMeans

from distspatial import DistributedSpatialCluster, NodeConfig
from distspatial.io.datasets import skewed_points


@pytest.fixture(scope="module")
def cluster(ray_local):
    with DistributedSpatialCluster(NodeConfig().with_node_count(3).with_partitions_per_node(2).replace(cpus_per_node=0.2)) as c:
        yield c


@pytest.mark.parametrize("d, k, iters", [(2, 16, 20), (3, 5, 50), (1, 4, 10), (8, 6, 15)])
def test_lloyd_matches_sklearn_with_same_init(cluster, d, k, iters):
    pts = skewed_points(20_000, d, n_hotspots=10, seed=d)
    cluster.distribute_data(pts)
    init = pts[np.random.default_rng(d).choice(len(pts), k, replace=False)]
    res = cluster.distributed_kmeans(k, iters, tol=0, init=init)
    ref = KMeans(k, init=init, n_init=1, algorithm="lloyd", max_iter=iters, tol=0).fit(pts)
    assert res.inertia == pytest.approx(ref.inertia_, rel=1e-6)
    assert res.n_iter == ref.n_iter_
    np.testing.assert_allclose(res.centroids, ref.cluster_centers_, rtol=1e-7, atol=1e-9)
    assert (res.labels == ref.labels_).mean() > 0.999
    # labels and centroids are consistent with the reported inertia
    assert float(((pts - res.centroids[res.labels]) ** 2).sum()) == pytest.approx(res.inertia, rel=1e-9)
    centroids, labels = res  # unpacks to the pair
    assert centroids.shape == (k, d) and labels.shape == (len(pts),)


def test_empty_cluster_is_reseeded(cluster):
    rng = np.random.default_rng(1)
    pts = np.concatenate([rng.normal(0, 0.1, (3000, 2)), rng.normal(5, 0.1, (3000, 2))])
    cluster.distribute_data(pts)
    init = np.array([[0.0, 0.0], [5.0, 5.0], [100.0, 100.0]])  # the third centre attracts nothing
    res = cluster.distributed_kmeans(3, 10, tol=0, init=init)
    ref = KMeans(3, init=init, n_init=1, algorithm="lloyd", max_iter=10, tol=0).fit(pts)
    assert np.bincount(res.labels, minlength=3).min() > 0
    assert res.inertia == pytest.approx(ref.inertia_, rel=1e-6)


def test_kmeans_parallel_init_quality_and_determinism(cluster):
    pts = skewed_points(30_000, 2, n_hotspots=12, seed=11)
    cluster.distribute_data(pts)
    a = cluster.distributed_kmeans(12, 100, seed=42)
    b = cluster.distributed_kmeans(12, 100, seed=42)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.labels, b.labels)
    # k-means|| + Lloyd is at least as good as scikit-learn's k-means++ + Lloyd, seed for seed (medians of 5)
    ours = [cluster.distributed_kmeans(12, 100, seed=s).inertia for s in range(5)]
    ref = [KMeans(12, n_init=1, random_state=s).fit(pts).inertia_ for s in range(5)]
    assert np.median(ours) <= 1.05 * np.median(ref), (ours, ref)
    r = cluster.distributed_kmeans(12, 100, init="random", seed=1)
    assert r.inertia <= 1.5 * np.median(ref)
    assert len(np.unique(r.labels)) == 12


def test_labels_follow_user_ids(cluster):
    rng = np.random.default_rng(3)
    pts = np.concatenate([rng.normal(0, 0.1, (500, 2)), rng.normal(10, 0.1, (500, 2))])
    ids = rng.permutation(10_000)[:1000] * 7
    cluster.distribute_data(pts, ids=ids)
    res = cluster.distributed_kmeans(2, 20, init=np.array([[0.0, 0.0], [10.0, 10.0]]))
    assert (res.labels[:500] == 0).all() and (res.labels[500:] == 1).all()


def test_kmeans_bad_input(cluster):
    cluster.distribute_data(np.random.default_rng(0).random((50, 2)))
    with pytest.raises(ValueError, match="k must be >= 1"):
        cluster.distributed_kmeans(0)
    with pytest.raises(ValueError, match="larger than the number"):
        cluster.distributed_kmeans(51)
    with pytest.raises(ValueError, match="max_iterations"):
        cluster.distributed_kmeans(2, 0)
    with pytest.raises(ValueError, match="tol"):
        cluster.distributed_kmeans(2, tol=-1)
    with pytest.raises(ValueError, match="init must be"):
        cluster.distributed_kmeans(2, init="kmeans++")
    with pytest.raises(ValueError, match=r"shape \(k, d\) = \(2, 2\)"):
        cluster.distributed_kmeans(2, init=np.zeros((3, 2)))
