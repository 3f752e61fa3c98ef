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

from ._workers import start, wait_until
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
    hosts = {info["ray_node_id"]: i for i, info in cluster.node_info.items()}
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
        if not cluster.health()["under_replicated"] and set(cluster.failed_node_ids):
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"redundancy not restored within {timeout} s: {cluster.health()}")


def _kill(c, victim):
    """Kill the Ray node ``victim`` (its raylet and every process on it); wall-clock times before and after."""
    t0 = time.time()
    c.remove_node(victim, allow_graceful=False)
    return t0, time.time()


def _failed(cluster, dead):
    """The node is failed in the cluster's own (controller's) view."""
    return dead in cluster.health()["failed_nodes"]


class _Calls:
    """Runs ``call`` back to back in a thread until ``stop``; keeps ``(start, end, failure already seen at start,
    result)`` per call and the start of the call in flight, so the kill can be timed to land inside a call."""

    def __init__(self, cluster, dead, call, name):
        self.cluster, self.dead, self.call = cluster, dead, call
        self.calls, self.started, self.stop = [], None, threading.Event()
        self.worker = start(self._run, name=name)

    def _run(self):
        while not self.stop.is_set():
            seen = _failed(self.cluster, self.dead)
            t0 = self.started = time.time()
            res = self.call()
            self.started = None
            self.calls.append((t0, time.time(), seen, res))

    def early_in_a_call(self) -> bool:
        """A call is running and is less than half as old as the shortest call so far: the node can be killed
        (in ~10 ms) well before that call returns."""
        t0 = self.started
        if t0 is None or not self.calls:
            return False
        return time.time() - t0 < 0.5 * min(b - a for a, b, *_ in self.calls)

    def seen_failed(self) -> bool:
        """A call began after the failure was seen."""
        return any(seen for _, _, seen, _ in self.calls)


def _in_flight_at(calls, t):
    """The calls running at wall-clock time ``t``: started before it, returned after it."""
    return [c for c in calls if c[0] < t < c[1]]


def test_node_killed_during_queries_and_kmeans(ray_cluster):
    c, workers = ray_cluster
    pts = skewed_points(40_000, 2, n_hotspots=8, seed=31)
    # batches long enough (~0.4-0.8 s once warm) for the kill (~20 ms, after a poll that a loaded machine can
    # delay) to land inside one: with 20K queries (~0.15 s a batch) it once landed just after a batch ended
    q = skewed_points(60_000, 2, n_hotspots=8, seed=31, sample_seed=4)
    init = pts[np.random.default_rng(0).choice(len(pts), 6, replace=False)]
    ref = KMeans(6, init=init, n_init=1, algorithm="lloyd", max_iter=60, tol=0).fit(pts)
    with DistributedSpatialCluster(_config()) as cluster:
        cluster.distribute_data(pts)
        victim, dead = _victim(cluster, workers)
        knn = _Calls(cluster, dead, lambda: cluster.distributed_knn_search(q, 10), "knn")
        km = _Calls(cluster, dead, lambda: cluster.distributed_kmeans(6, 60, tol=0, init=init), "kmeans")
        loops = (knn.worker, km.worker)
        try:
            # kill while a kNN batch and a k-means run are both in their first half
            wait_until(lambda: knn.early_in_a_call() and km.early_in_a_call(), 240,
                       "a kNN batch and a k-means run both just started", poll=0.002, workers=loops)
            killed = _kill(c, victim)
            wait_until(lambda: _failed(cluster, dead), 60, f"node {dead} seen failed", workers=loops)
            # then a call of each kind that began after the failure was seen
            wait_until(lambda: knn.seen_failed() and km.seen_failed(), 240,
                       "a kNN batch and a k-means run after the failure was seen", workers=loops)
        finally:
            knn.stop.set()
            km.stop.set()
        for w in loops:
            w.finish(timeout=240)  # a call that raised instead of failing over fails here, with its traceback
        knn_calls, km_calls = knn.calls, km.calls
        # the kill really landed during a kNN batch and during a k-means run (not between or after them)
        assert _in_flight_at(knn_calls, killed[1]), ("no kNN batch in flight when the node died", killed, knn_calls)
        assert _in_flight_at(km_calls, killed[1]), ("no k-means run in flight when the node died", killed, km_calls)
        for *_, (dist, ids) in knn_calls:
            assert_knn_exact(pts, q[:300], dist[:300], ids[:300], 10)
            assert np.all(np.isfinite(dist)) and (ids >= 0).all()
        for *_, res in km_calls:
            assert res.inertia == pytest.approx(ref.inertia_, rel=1e-6)
            np.testing.assert_allclose(res.centroids, ref.cluster_centers_, rtol=1e-7, atol=1e-9)

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
    with DistributedSpatialCluster(_config()) as cluster:
        cluster.distribute_data(pts)
        victim, dead = _victim(cluster, workers)
        batches = []

        def next_batch():  # a live feed: batches back to back, for as long as the test wants
            batches.append(skewed_points(3_000, 2, n_hotspots=6, seed=35, sample_seed=20 + len(batches)))
            return cluster.ingest(batches[-1])

        feed = _Calls(cluster, dead, next_batch, "writer")
        calls = feed.calls
        try:
            wait_until(lambda: len(calls) >= 2 and feed.early_in_a_call(), 120, "an ingest just started",
                       poll=0.002, workers=(feed.worker,))
            killed = _kill(c, victim)
            wait_until(lambda: _failed(cluster, dead), 60, f"node {dead} seen failed", workers=(feed.worker,))
            wait_until(lambda: sum(t0 > killed[1] for t0, *_ in calls) >= 5, 120, "5 batches after the kill",
                       workers=(feed.worker,))
        finally:
            feed.stop.set()
        # an ingest that raised (although every partition kept a replica) fails here, with its traceback
        feed.worker.finish(timeout=240)
        assert len(calls) == len(batches), "every batch was acknowledged"
        assert _in_flight_at(calls, killed[1]), ("no ingest in flight when the node died", killed, calls)
        acked_ids = np.concatenate([ids for *_, ids in calls])
        assert np.array_equal(acked_ids, np.arange(len(pts), len(pts) + 3_000 * len(batches))), "ids: next, once"
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
        runs = _Calls(cluster, dead, lambda: cluster.distributed_dbscan(0.004, 10), "dbscan")
        calls = runs.calls
        try:
            wait_until(runs.early_in_a_call, 240, "a DBSCAN run just started", poll=0.002, workers=(runs.worker,))
            killed = _kill(c, victim)
            wait_until(lambda: _failed(cluster, dead), 60, f"node {dead} seen failed", workers=(runs.worker,))
            wait_until(runs.seen_failed, 240, "a run begun after the failure was seen", workers=(runs.worker,))
        finally:
            runs.stop.set()
        runs.worker.finish(timeout=240)  # a run that raised instead of failing over fails here, with its traceback
        assert _in_flight_at(calls, killed[1]), ("no DBSCAN run in flight when the node died", killed, calls)
        for *_, res in calls:
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
        _kill(c, victim)
        wait_until(lambda: any(n["NodeID"] == victim.node_id and not n["Alive"] for n in ray.nodes()), 60,
                   "Ray reporting the killed node dead")
        with pytest.raises(PartitionLostError) as err:  # the first query after the death already says so
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

        def layout():
            """One metadata snapshot (synced with the controller), then the live nodes and where they run."""
            meta = cluster.metadata
            live = cluster.live_node_ids
            return meta, live, {n: cluster.node_info[n]["ray_node_id"] for n in live}

        # the 4 Ray nodes each get a node of ours
        def four():
            lay = layout()
            return lay if len(lay[1]) >= 4 else None

        _, live, machine = wait_until(four, 30, "a node on each of the 4 Ray nodes")
        assert len(live) == 4 and len(set(machine.values())) == 4, machine
        new = c.add_node(num_cpus=1, object_store_memory=120 * MB)  # a machine joins later

        def balanced():
            meta, live, machine = layout()
            if new.node_id not in machine.values():
                return None
            counts = [len(meta.partitions_of(n)) for n in live]
            # a migration copies a replica before it drops the old one: settled means two owners again, all live
            settled = all(set(p.owners) <= set(live) and len(set(p.owners)) == 2 for p in meta.partitions)
            return (meta, live, counts) if settled and max(counts) - min(counts) <= 1 and min(counts) > 0 else None

        # the counts come from one snapshot, once the new node is there and the rebalance has settled on it
        meta, live, counts = wait_until(balanced, 60, "a node on the Ray node that joined, replicas balanced")
        assert len(live) == 5 and set(live) > before, live
        assert all(set(p.owners) <= set(live) and len(set(p.owners)) == 2 for p in meta.partitions), meta.partitions
        assert sum(counts) == 2 * meta.n_partitions and meta.n_points == len(pts)
        dist, ids = cluster.distributed_knn_search(q, 5)
        assert_knn_exact(pts, q, dist, ids, 5)


def _controller_host():
    """The Ray node the cluster's controller actor runs on, from Ray's actor table (None if not found)."""
    from ray._private import state

    hosts = [a["Address"]["NodeID"] for a in state.actors().values()
             if "ClusterController" in a.get("ActorClassName", "") and a.get("State") == "ALIVE"]
    return hosts[0] if len(hosts) == 1 else None


def test_the_machine_of_the_controller_dying_keeps_the_cluster(ray_cluster):
    """Any worker machine may die, the one the cluster's controller actor runs on included: with two replicas
    the cluster keeps answering exactly and restores redundancy (the controller must live where the client is,
    or come back)."""
    c, workers = ray_cluster
    pts = skewed_points(20_000, 2, seed=37)
    q = skewed_points(300, 2, seed=37, sample_seed=2)
    with DistributedSpatialCluster(_config()) as cluster:
        cluster.distribute_data(pts)
        host = _controller_host()
        assert host is not None, "the controller actor was not found in Ray's actor table"
        victim = next((w for w in workers if w.node_id == host), None)
        if victim is None:  # the controller runs on the driver's machine, which this test cannot kill
            victim, _ = _victim(cluster, workers)
        _kill(c, victim)
        wait_until(lambda: any(n["NodeID"] == victim.node_id and not n["Alive"] for n in ray.nodes()), 60,
                   "Ray reporting the killed node dead")
        dist, ids = cluster.distributed_knn_search(q, 5)
        assert_knn_exact(pts, q, dist, ids, 5)
        _wait_redundant(cluster)
        assert np.array_equal(_all_ids(cluster, pts), np.arange(len(pts))), "no point lost or duplicated"
