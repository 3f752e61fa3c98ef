"""Real failures on several real Ray nodes (ray.cluster_utils.Cluster): a raylet is killed while queries and
k-means run; answers stay exact, no point is lost, redundancy comes back by itself."""

import threading
import time

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster
from sklearn.cluster import KMeans

from distspatial import DistributedSpatialCluster, NodeConfig, PartitionLostError
from distspatial.io.datasets import skewed_points

from .conftest import assert_knn_exact

MB = 1024**2


@pytest.fixture()
def ray_cluster():
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 120 * MB,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4},
    })
    workers = [c.add_node(num_cpus=1, object_store_memory=120 * MB) for _ in range(3)]
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="ERROR")
    yield c, workers
    ray.shutdown()
    c.shutdown()


def _config(**kw):
    return NodeConfig().with_node_count(4).with_fault_tolerance(True).replace(
        cpus_per_node=0.25, heartbeat_interval_ms=200, communication_timeout_ms=5_000, **kw)


def _victim(cluster, workers):
    """A worker Ray node hosting a node actor that is the primary of some partitions."""
    hosts = {info["ray_node_id"]: i for i, info in cluster._node_info.items()}
    for w in workers:
        if w.node_id in hosts:
            return w, hosts[w.node_id]
    raise AssertionError("no node actor on a worker node")


def _all_ids(cluster, pts):
    """Every id in the index, via a range query that covers all the data."""
    c = pts.mean(axis=0)
    r = float(np.sqrt(((pts - c) ** 2).sum(axis=1)).max()) + 1.0
    return cluster.range_search(c, r)


def _wait_redundant(cluster, timeout=60.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not cluster.health()["under_replicated"] and cluster._dispatch.failed_nodes:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"redundancy not restored within {timeout} s: {cluster.health()}")


def test_node_killed_during_queries_and_kmeans(ray_cluster):
    c, workers = ray_cluster
    pts = skewed_points(40_000, 2, n_hotspots=8, seed=31)
    q = skewed_points(20_000, 2, n_hotspots=8, seed=31, sample_seed=4)
    init = pts[np.random.default_rng(0).choice(len(pts), 6, replace=False)]
    ref = KMeans(6, init=init, n_init=1, algorithm="lloyd", max_iter=60, tol=0).fit(pts)
    with DistributedSpatialCluster(_config()) as cluster:
        cluster.distribute_data(pts)
        victim, dead = _victim(cluster, workers)
        out = {}

        def queries():
            res = []
            for _ in range(6):
                res.append(cluster.distributed_knn_search(q, 10))
            out["knn"] = res

        def kmeans():
            out["km"] = cluster.distributed_kmeans(6, 60, tol=0, init=init)

        threads = [threading.Thread(target=queries), threading.Thread(target=kmeans)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        c.remove_node(victim, allow_graceful=False)
        for t in threads:
            t.join(timeout=240)
        assert "knn" in out and "km" in out, "a call failed instead of failing over"
        for dist, ids in out["knn"]:
            assert_knn_exact(pts, q[:300], dist[:300], ids[:300], 10)
            assert np.all(np.isfinite(dist)) and (ids >= 0).all()
        assert out["km"].inertia == pytest.approx(ref.inertia_, rel=1e-6)
        np.testing.assert_allclose(out["km"].centroids, ref.cluster_centers_, rtol=1e-7, atol=1e-9)

        took = _wait_redundant(cluster)
        assert took < 60
        meta = cluster.metadata
        assert all(dead not in p.owners for p in meta.partitions)
        assert all(len(set(p.owners)) == 2 for p in meta.partitions), "every partition back at 2 replicas"
        ids = _all_ids(cluster, pts)
        assert len(ids) == len(pts) and np.array_equal(ids, np.arange(len(pts))), "no point lost or duplicated"
        # a killed raylet may first look like a network partition (silent while Ray still lists its node); once
        # Ray reports the node dead the classification must settle on a node death
        deadline = time.monotonic() + 30
        while cluster.health()["nodes"][dead]["status"] != "failed" and time.monotonic() < deadline:
            time.sleep(0.2)
        h = cluster.health()
        assert h["nodes"][dead]["status"] == "failed", h["nodes"][dead]
        assert any(a[0] == "Replicate" and a[1] == dead for r in h["recoveries"] for a in r["actions"])
        st = cluster.statistics()
        assert [n.status for n in st.nodes].count("failed") == 1
        assert len(cluster.live_node_ids) == 4, "a replacement node was started (the Ray cluster had room)"
        assert any(a[0] == "Restart" and a[1] == dead for r in h["recoveries"] for a in r["actions"])


def test_node_killed_during_ingest_loses_and_duplicates_nothing(ray_cluster):
    c, workers = ray_cluster
    pts = skewed_points(20_000, 2, n_hotspots=6, seed=35)
    batches = [skewed_points(3_000, 2, n_hotspots=6, seed=35, sample_seed=20 + b) for b in range(16)]
    with DistributedSpatialCluster(_config()) as cluster:
        cluster.distribute_data(pts)
        victim, dead = _victim(cluster, workers)
        acked, errors = [], []

        def writer():
            for b in batches:  # a live feed: a batch every 0.1 s
                try:
                    acked.append((cluster.ingest(b), time.monotonic()))
                except Exception as exc:
                    errors.append(exc)
                time.sleep(0.1)

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(0.5)
        killed_at = time.monotonic()
        c.remove_node(victim, allow_graceful=False)
        t.join(timeout=240)
        assert not errors, f"an ingest failed although every partition kept a replica: {errors}"
        assert len(acked) == len(batches)
        assert sum(at > killed_at for _, at in acked) >= 5, "batches were ingested after the kill"
        _wait_redundant(cluster)
        allp = np.concatenate([pts] + batches)
        ids = _all_ids(cluster, allp)
        assert np.array_equal(ids, np.arange(len(allp))), "every acknowledged point exactly once"
        assert cluster.metadata.n_points == len(allp)
        q = allp[::500] + 1e-3
        dist, i = cluster.distributed_knn_search(q, 5)
        assert_knn_exact(allp, q, dist, i, 5)


def test_node_killed_during_dbscan_still_equals_sklearn(ray_cluster):
    from sklearn.cluster import DBSCAN

    c, workers = ray_cluster
    pts = skewed_points(30_000, 2, n_hotspots=8, seed=36)
    ref = DBSCAN(eps=0.004, min_samples=10).fit(pts)
    with DistributedSpatialCluster(_config()) as cluster:
        cluster.distribute_data(pts)
        victim, dead = _victim(cluster, workers)
        results, errors, stop = [], [], threading.Event()

        def run():
            while not stop.is_set():
                try:
                    results.append((bool(cluster._dispatch.failed_nodes), cluster.distributed_dbscan(0.004, 10)))
                except Exception as exc:
                    errors.append(exc)
                    return

        t = threading.Thread(target=run)
        t.start()
        time.sleep(1.0)
        c.remove_node(victim, allow_graceful=False)
        deadline = time.monotonic() + 60
        while not cluster._dispatch.failed_nodes and time.monotonic() < deadline:
            time.sleep(0.1)
        n_before = len(results)
        while len(results) < n_before + 2 and time.monotonic() < deadline and not errors:
            time.sleep(0.1)
        stop.set()
        t.join(timeout=120)
        assert not errors, errors
        assert any(failed for failed, _ in results), "runs finished after the failure was seen"
        for _, res in results:
            assert np.array_equal(res.core_sample_indices, ref.core_sample_indices_)
            assert np.array_equal(res.labels, ref.labels_)


def test_all_replicas_lost_raises_naming_partitions(ray_cluster):
    c, workers = ray_cluster
    pts = skewed_points(10_000, 2, seed=32)
    cfg = NodeConfig().with_node_count(4).replace(cpus_per_node=0.25, heartbeat_interval_ms=200,
                                                  communication_timeout_ms=5_000, max_retries=1)
    with DistributedSpatialCluster(cfg) as cluster:  # replication 1: a dead node loses its partitions
        meta = cluster.distribute_data(pts)
        victim, dead = _victim(cluster, workers)
        lost = sorted(meta.partitions_of(dead))
        c.remove_node(victim, allow_graceful=False)
        time.sleep(1.0)
        with pytest.raises(PartitionLostError) as err:
            for _ in range(3):
                cluster.distributed_knn_search(pts[:100], 5)
        assert sorted(err.value.partitions) == lost
        assert str(lost[0]) in str(err.value)


def test_auto_scale_follows_ray_nodes_joining(ray_cluster):
    c, workers = ray_cluster
    pts = skewed_points(20_000, 2, seed=33)
    q = skewed_points(300, 2, seed=33, sample_seed=2)
    cfg = NodeConfig().with_node_count(2).with_fault_tolerance(True).with_auto_scale(True).replace(
        cpus_per_node=0.25, heartbeat_interval_ms=200, communication_timeout_ms=5_000)
    with DistributedSpatialCluster(cfg) as cluster:
        cluster.distribute_data(pts)
        before = set(cluster.live_node_ids)
        deadline = time.monotonic() + 30  # the 4 Ray nodes each get a node of ours
        while len(cluster.live_node_ids) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(cluster.live_node_ids) == 4, cluster.live_node_ids
        machines = {cluster._node_info[n]["ray_node_id"] for n in cluster.live_node_ids}
        assert len(machines) == 4
        new = c.add_node(num_cpus=1, object_store_memory=120 * MB)  # a machine joins later
        deadline = time.monotonic() + 60
        while new.node_id not in {cluster._node_info[n]["ray_node_id"] for n in cluster.live_node_ids}:
            assert time.monotonic() < deadline, "no node started on the Ray node that joined"
            time.sleep(0.2)
        time.sleep(1.0)
        counts = [len(cluster.metadata.partitions_of(n)) for n in cluster.live_node_ids]
        assert max(counts) - min(counts) <= 1 and min(counts) > 0, counts
        assert set(cluster.live_node_ids) > before
        dist, ids = cluster.distributed_knn_search(q, 5)
        assert_knn_exact(pts, q, dist, ids, 5)
