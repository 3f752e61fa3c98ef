"""The exactness suite on several real Ray nodes (ray.cluster_utils.Cluster: separate raylets)."""

import time

import numpy as np
import pytest
import ray
from scipy.spatial import cKDTree
from sklearn.cluster import KMeans

from distspatial import DistributedSpatialCluster, NodeConfig
from distspatial.io.datasets import skewed_points

from .conftest import assert_knn_exact, raylet_cluster


@pytest.fixture(scope="module")
def ray_cluster():
    with raylet_cluster(num_cpus=1) as cw:
        yield cw


def test_nodes_spread_and_exact_on_three_raylets(ray_cluster):
    cfg = NodeConfig().with_node_count(3).with_fault_tolerance(True).replace(cpus_per_node=0.5)
    pts = skewed_points(30_000, 3, n_hotspots=6, seed=21)
    with DistributedSpatialCluster(cfg) as cluster:
        machines = {info["ray_node_id"] for info in cluster.node_info.values()}
        assert len(machines) == 3, "one node actor per Ray node (SPREAD)"
        meta = cluster.distribute_data(pts)
        for p in meta.partitions:
            owner_machines = {cluster.node_info[n]["ray_node_id"] for n in p.owners}
            assert len(owner_machines) == 2, "replicas on distinct Ray nodes"
        for d_kind in ("batch", "single"):
            q = skewed_points(300, 3, n_hotspots=6, seed=21, sample_seed=5)
            if d_kind == "single":
                dist, ids = cluster.distributed_knn_search(q[0], 20)
                assert_knn_exact(pts, q[:1], dist[None], ids[None], 20)
            else:
                for k in (1, 100):
                    dist, ids = cluster.distributed_knn_search(q, k)
                    assert_knn_exact(pts, q, dist, ids, k)
        got = cluster.range_search(q[:10], 0.05)
        tree = cKDTree(pts)
        for g, c in zip(got, q[:10]):
            np.testing.assert_array_equal(g, np.sort(tree.query_ball_point(c, 0.05)))
        init = pts[:5]
        res = cluster.distributed_kmeans(5, 30, tol=0, init=init)
        ref = KMeans(5, init=init, n_init=1, algorithm="lloyd", max_iter=30, tol=0).fit(pts)
        assert res.inertia == pytest.approx(ref.inertia_, rel=1e-6)
        assert ray.is_initialized(), "an external cluster is never shut down by us"
    assert ray.is_initialized()


def test_query_survives_killed_raylet(ray_cluster):
    """With replicas, a Ray node killed before a query costs a failover, not a wrong answer."""
    c, workers = ray_cluster
    cfg = NodeConfig().with_node_count(3).with_fault_tolerance(True).replace(
        cpus_per_node=0.5, communication_timeout_ms=20_000)
    pts = skewed_points(20_000, 2, seed=22)
    with DistributedSpatialCluster(cfg) as cluster:
        meta = cluster.distribute_data(pts)
        hosts = {info["ray_node_id"]: i for i, info in cluster.node_info.items()}
        victim = next(w for w in workers if w.node_id in hosts)
        dead_node = hosts[victim.node_id]
        assert any(p.owners[0] == dead_node for p in meta.partitions), "the victim is the primary of some partitions"
        c.remove_node(victim, allow_graceful=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until the actor is really gone (its raylet is killed)
            try:
                ray.get(cluster.runtime.actors[dead_node].ping.remote(), timeout=5)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the actor on the removed Ray node still answers after 60 s")
        q = skewed_points(400, 2, seed=22, sample_seed=3)
        dist, ids = cluster.distributed_knn_search(q, 10)
        assert_knn_exact(pts, q, dist, ids, 10)
        assert set(cluster.failed_node_ids) == {dead_node}, "the dead node was detected"
        st = cluster.statistics()
        assert sum(n.status == "failed" for n in st.nodes) == 1
