"""Distributed analytics beyond k-means on a real local Ray runtime, checked against scikit-learn and scipy."""

import numpy as np
import pytest
from scipy.cluster.hierarchy import dendrogram, fcluster, is_valid_linkage
from sklearn.cluster import AgglomerativeClustering
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from distspatial import DistributedSpatialCluster, NodeConfig


@pytest.fixture(scope="module")
def cluster(ray_local):
    cfg = NodeConfig().with_node_count(3).replace(cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        yield c


@pytest.mark.parametrize("d", [2, 3, 5])
def test_hierarchical_matches_sklearn_ward_on_separated_data(cluster, d):
    X, _ = make_blobs(30_000, n_features=d, centers=6, cluster_std=0.4, random_state=d, center_box=(-20, 20))
    cluster.distribute_data(X)
    res = cluster.distributed_hierarchical(n_clusters=6, n_micro_clusters=400, seed=1)
    labels, Z = res
    assert labels.shape == (len(X),) and set(np.unique(labels)) == set(range(6))
    assert is_valid_linkage(Z) and Z.shape == (len(res.micro_counts) - 1, 4)
    assert res.micro_counts.sum() == len(X) and res.point_counts[-1] == len(X)
    dendrogram(Z, no_plot=True)
    sub = np.random.default_rng(0).choice(len(X), 3000, replace=False)
    ref = AgglomerativeClustering(n_clusters=6, linkage="ward").fit_predict(X[sub])
    assert adjusted_rand_score(ref, labels[sub]) >= 0.9
    assert len(np.unique(fcluster(Z, 6, criterion="maxclust"))) == 6
    gap = Z[-6, 2] + 0.5 * (Z[-5, 2] - Z[-6, 2])  # inside the height gap above the 6-cluster level
    by_height = cluster.distributed_hierarchical(distance_threshold=gap, n_micro_clusters=400, seed=1)
    assert adjusted_rand_score(labels, by_height.labels) == 1.0


def test_hierarchical_with_ids_and_errors(cluster):
    X, _ = make_blobs(5_000, n_features=2, centers=3, cluster_std=0.3, random_state=4, center_box=(-10, 10))
    ids = np.arange(len(X))[::-1] * 7 + 3
    cluster.distribute_data(X, ids=ids)
    res = cluster.distributed_hierarchical(n_clusters=3, n_micro_clusters=100)
    ref = AgglomerativeClustering(n_clusters=3, linkage="ward").fit_predict(X)
    assert adjusted_rand_score(ref, res.labels) >= 0.99, "labels are in input-row order even with user ids"
    with pytest.raises(ValueError, match="Exactly one of n_clusters and distance_threshold"):
        cluster.distributed_hierarchical()
    with pytest.raises(ValueError, match="'ward' only"):
        cluster.distributed_hierarchical(n_clusters=2, linkage="single")
    with pytest.raises(ValueError, match="raise n_micro_clusters"):
        cluster.distributed_hierarchical(n_clusters=500, n_micro_clusters=50)
