"""Load balancing: plans on synthetic placements (no Ray), and online rebalancing on a real local runtime."""

import threading

import numpy as np
import ray
import pytest

from distspatial import DistributedSpatialCluster, NodeConfig
from distspatial.control.balancing import LoadBalancer, Strategy, TuningPolicy
from distspatial.io.datasets import skewed_points
from distspatial.core.metadata import GlobalIndexMetadata, PartitionInfo

from .conftest import brute_knn


def _meta(owners, sizes=None):
    sizes = sizes or [100] * len(owners)
    parts = tuple(PartitionInfo(i, i, i, np.zeros(2), np.ones(2), s, s * 24, tuple(o))
                  for i, (o, s) in enumerate(zip(owners, sizes)))
    return GlobalIndexMetadata(2, np.zeros(2), np.ones(2), "hilbert", 32, parts)


def test_least_loaded_plan_evens_points():
    meta = _meta([(0,)] * 10 + [(1,), (2,)])  # node 0 holds 10 of 12 partitions
    plan = LoadBalancer(Strategy.LEAST_LOADED, threshold=1.2).plan(meta, [0, 1, 2])
    assert plan.imbalance_before == pytest.approx(2.5)
    assert plan.imbalance_after <= 1.2 and plan.expected_improvement > 1.0
    assert all(m.source == 0 for m in plan.migrations)
    assert plan.migration_bytes == sum(m.nbytes for m in plan.migrations) > 0
    assert "RebalancePlan(LeastLoaded)" in str(plan)


def test_proportional_load_follows_capacity():
    meta = _meta([(n,) for n in [0, 1, 2] * 6])
    plan = LoadBalancer(Strategy.PROPORTIONAL_LOAD, threshold=1.05, capacity={0: 2.0}).plan(meta, [0, 1, 2])
    after = {n: 0 for n in range(3)}
    moved = {m.partition: m.target for m in plan.migrations}
    for p in meta.partitions:
        after[moved.get(p.partition_id, p.owners[0])] += 1
    assert after[0] == 9 and after[1] + after[2] == 9  # twice the share of the others


def test_adaptive_load_weighs_queries_and_round_robin_counts():
    meta = _meta([(0,), (0,), (1,), (1,)])
    hot = {0: 1000, 1: 1000, 2: 0, 3: 0}  # node 0's partitions get all the queries
    plan = LoadBalancer(Strategy.ADAPTIVE_LOAD, threshold=1.1).plan(meta, [0, 1], hot)
    assert plan.imbalance_before == pytest.approx(1.5)  # equal points, but node 0 gets every query
    assert plan.migrations[0].partition in (0, 1) and plan.migrations[0].source == 0
    assert plan.imbalance_after <= 1.1
    assert LoadBalancer(Strategy.LEAST_LOADED, threshold=1.1).plan(meta, [0, 1], hot).migrations == []
    assert LoadBalancer(Strategy.ROUND_ROBIN).plan(meta, [0, 1], hot).migrations == []
    with pytest.raises(ValueError, match="threshold"):
        LoadBalancer(threshold=0.5)


def test_online_rebalance_of_a_hot_node_under_queries(ray_local):
    pts = skewed_points(40_000, 2, seed=71)
    q = skewed_points(1_000, 2, seed=71, sample_seed=2)
    ref = brute_knn(pts, q[:150], 6)
    cfg = NodeConfig().with_node_count(4).replace(cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        meta = c.distribute_data(pts)
        for p in meta.partitions:  # pile 70% of the partitions onto node 0
            if p.owners[0] != 0 and p.partition_id % 10 < 7:
                c.move_partition(p.partition_id, p.owners[0], 0)
        pts_per_node = lambda: [sum(p.size for p in c.metadata.partitions if n in p.owners) for n in c.live_node_ids]
        counts = pts_per_node()
        assert max(counts) / np.mean(counts) > 2.0
        version = c.metadata.version
        plan = c.rebalance(dry_run=True, strategy="LeastLoaded")
        assert plan.migrations and c.metadata.version == version, "a dry run changes nothing"
        stop, errors, answers = threading.Event(), [], []

        def load():
            while not stop.is_set():
                try:
                    d, _ = c.distributed_knn_search(q, 6)
                    answers.append(np.allclose(d[:150], ref, rtol=0, atol=1e-12))
                except Exception as exc:
                    errors.append(exc)

        t = threading.Thread(target=load)
        t.start()
        try:
            done = c.rebalance(strategy="LeastLoaded", threshold=1.15)
        finally:
            stop.set()
            t.join(timeout=60)
        assert not errors and answers and all(answers)
        counts = pts_per_node()
        assert max(counts) / np.mean(counts) <= 1.15 + 1e-9, counts
        assert done.imbalance_after <= 1.15 + 1e-9
        assert np.array_equal(c.range_search(np.full(2, 0.5), 2.0), np.arange(len(pts)))
        lm = c.load_metrics()
        assert set(lm) == set(c.live_node_ids) and sum(m.points for m in lm.values()) == len(pts)
        assert all(m.operations > 0 for m in lm.values())


def test_automatic_rebalance_when_load_balancing_is_on(ray_local):
    import time

    pts = skewed_points(20_000, 2, seed=72)
    cfg = NodeConfig().with_node_count(3).with_load_balancing(True).replace(cpus_per_node=0.2,
                                                                            heartbeat_interval_ms=100)
    with DistributedSpatialCluster(cfg) as c:
        meta = c.distribute_data(pts)
        c.runtime.call_controller("set_options", rebalance_every=10**9)  # no automatic round while piling up
        for p in meta.partitions:  # pile everything onto node 0
            if p.owners[0] != 0:
                c.move_partition(p.partition_id, p.owners[0], 0)
        counts = [len(c.metadata.partitions_of(n)) for n in c.live_node_ids]
        assert max(counts) / np.mean(counts) > c.balance_threshold, counts
        c.runtime.call_controller("set_options", rebalance_every=1)  # heartbeats rebalance from now on
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # equal-size partitions: load is the partition count
            counts = [len(c.metadata.partitions_of(n)) for n in c.live_node_ids]
            if max(counts) / np.mean(counts) <= c.balance_threshold:
                break
            time.sleep(0.2)
        assert max(counts) / np.mean(counts) <= c.balance_threshold, counts
        assert min(counts) > 0
        d, i = c.distributed_knn_search(pts[:50], 1)
        assert np.all(d[:, 0] == 0)


def test_split_partition_at_curve_median_stays_exact(ray_local):
    pts = skewed_points(30_000, 2, seed=73)
    q = skewed_points(400, 2, seed=73, sample_seed=9)
    ref = brute_knn(pts, q, 7)
    cfg = NodeConfig().with_node_count(2).with_fault_tolerance(True).replace(cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        meta = c.distribute_data(pts)
        big = meta.partitions[3]
        new = c.split_partition(3)
        m2 = c.metadata
        a, b = m2.partitions[3], m2.partitions[new]
        assert a.size + b.size == big.size and abs(a.size - b.size) <= 1
        assert a.key_hi <= b.key_lo and a.key_lo >= big.key_lo and b.key_hi <= big.key_hi
        assert a.owners == b.owners == big.owners and m2.n_points == len(pts)
        for _ in range(2):  # split the new half again: ids are appended, routing stays in curve order
            new = c.split_partition(new)
        d, i = c.distributed_knn_search(q, 7)
        np.testing.assert_allclose(d, ref, rtol=0, atol=1e-12)
        assert np.array_equal(c.range_search(np.full(2, 0.5), 2.0), np.arange(len(pts)))
        res = c.distributed_kmeans(5, 20, init=pts[:5], tol=0)
        assert float(((pts - res.centroids[res.labels]) ** 2).sum()) == pytest.approx(res.inertia, rel=1e-9)
        c.rebalance(strategy="LeastLoaded", threshold=1.05)
        d, i = c.distributed_knn_search(q, 7)
        np.testing.assert_allclose(d, ref, rtol=0, atol=1e-12)
        with pytest.raises(ValueError, match="partition_id must be in"):
            c.split_partition(999)


def test_extra_read_replica_for_a_hot_partition(ray_local):
    pts = skewed_points(20_000, 2, seed=74)
    cfg = NodeConfig().with_node_count(3).replace(cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        meta = c.distribute_data(pts)
        hot = meta.partitions[0]
        target = c.add_read_replica(0)
        assert target not in hot.owners and c.metadata.partitions[0].owners == hot.owners + (target,)
        # a query batch that lands only in partition 0 now spreads its reads over both replicas
        box_lo, box_hi = hot.lo, hot.hi
        q = pts[(pts >= box_lo).all(1) & (pts <= box_hi).all(1)][:200]
        before = {n: s.queries_served for n, s in ((x.node_id, x) for x in c.statistics().nodes)}
        big = np.tile(q, (20, 1))  # long calls, so that concurrent ones overlap
        threads = [threading.Thread(target=c.distributed_knn_search, args=(big, 3)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = {x.node_id: x.queries_served for x in c.statistics().nodes}
        c.load_metrics()
        served = {n: ray.get(c.runtime.actors[n].stats.remote())["part_queries"].get(0, 0)
                  for n in c.metadata.partitions[0].owners}
        assert all(v > 0 for v in served.values()), f"both replicas of the hot partition served reads: {served}"
        d, i = c.distributed_knn_search(q, 3)
        np.testing.assert_allclose(d, brute_knn(pts, q, 3), rtol=0, atol=1e-12)
        with pytest.raises(ValueError, match="not a live node without"):
            c.add_read_replica(0, node=target)
        assert sum(after.values()) > sum(before.values())


def test_tuning_policy_splits_large_and_replicates_hot_partitions():
    meta = _meta([(0,), (1,), (2,), (0,)], sizes=[60_000, 5_000, 5_000, 5_000])
    acts = LoadBalancer.tune(meta, {}, n_live=3, replication=1)
    assert [(a.partition, a.kind) for a in acts] == [(0, "split")] and "3.2x" in acts[0].reason
    even = _meta([(0,), (1,), (2,), (0,), (1,), (2,), (0,), (1,)], sizes=[5_000] * 8)
    hot = {1: 9_000, 0: 100, 2: 100, 3: 100}
    acts = LoadBalancer.tune(even, hot, n_live=3, replication=1)
    assert [(a.partition, a.kind) for a in acts] == [(1, "read_replica")]
    full = _meta([(0,), (1, 2), (2,), (0,), (1,), (2,), (0,), (1,)], sizes=[5_000] * 8)  # 1 has its extra replica
    assert [(a.partition, a.kind) for a in LoadBalancer.tune(full, hot, 3, 1)] == [(1, "split")]
    assert LoadBalancer.tune(even, {1: 500}, 3, 1) == [], "too few queries to call anything hot"
    small = _meta([(0,), (1,)], sizes=[3_000, 10])
    assert LoadBalancer.tune(small, {}, 2, 1) == [], "below min_split_points"
    many = _meta([(0,)] * 3 + [(1,)] * 20, sizes=[90_000] * 3 + [100] * 20)
    assert len(LoadBalancer.tune(many, {}, 2, 1, TuningPolicy(max_actions=2))) == 2, "bounded per round"
    with pytest.raises(ValueError, match="multiples of the mean"):
        TuningPolicy(hot_query_factor=0.5)


def test_rebalance_replicates_then_splits_a_query_hot_partition(ray_local):
    pts = skewed_points(40_000, 2, seed=75)
    cfg = NodeConfig().with_node_count(3).replace(cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        c.tuning_policy = TuningPolicy(min_split_points=100)
        meta = c.distribute_data(pts)
        hot = meta.partitions[5]
        inside = pts[(pts >= hot.lo).all(1) & (pts <= hot.hi).all(1)][:400]
        q = np.tile(inside, (10, 1))  # a skewed query load: every query lands in partition 5
        c.distributed_knn_search(q, 1)
        plan = c.rebalance()
        assert [(a.partition, a.kind) for a in plan.actions] == [(5, "read_replica")], str(plan)
        assert len(c.metadata.partitions[5].owners) == 2
        c.distributed_knn_search(q, 1)
        plan = c.rebalance()
        assert [(a.partition, a.kind) for a in plan.actions] == [(5, "split")], str(plan)
        meta2 = c.metadata
        assert meta2.n_partitions == meta.n_partitions + 1 and meta2.n_points == len(pts)
        assert plan.imbalance_after <= c.balance_threshold + 1e-9
        d, i = c.distributed_knn_search(q[:300], 4)
        np.testing.assert_allclose(d, brute_knn(pts, q[:300], 4), rtol=0, atol=1e-12)
        assert c.rebalance().actions == [], "no new queries since the last round: nothing is hot"
