"""Elastic scaling on a real local Ray runtime: nodes added and removed while queries run."""

import threading

import numpy as np
import pytest

from distspatial import DistributedSpatialCluster, NodeConfig
from distspatial.io.datasets import skewed_points

from .conftest import brute_knn


def test_add_and_remove_nodes_under_query_load(ray_local):
    pts = skewed_points(30_000, 2, seed=51)
    q = skewed_points(2_000, 2, seed=51, sample_seed=6)
    ref = brute_knn(pts, q[:200], 5)
    cfg = NodeConfig().with_node_count(2).with_fault_tolerance(True).replace(cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        c.distribute_data(pts)
        stop = threading.Event()
        errors, answers = [], []

        def load():
            while not stop.is_set():
                try:
                    d, _ = c.distributed_knn_search(q, 5)
                    answers.append(np.allclose(d[:200], ref, rtol=0, atol=1e-12))
                except Exception as exc:  # any failed call fails the test
                    errors.append(exc)

        t = threading.Thread(target=load)
        t.start()
        try:
            new = c.add_nodes(2)
            assert new == [2, 3]
            counts = [len(c.metadata.partitions_of(n)) for n in c.live_node_ids]
            assert max(counts) - min(counts) <= 1, counts
            assert all(counts[n] > 0 for n in (2, 3)), "the new nodes got partitions"
            c.remove_node(0)
            assert 0 not in c.live_node_ids
        finally:
            stop.set()
            t.join(timeout=60)
        assert not errors, errors
        assert answers and all(answers), "every answer during scaling was exact"
        meta = c.metadata
        assert all(len(set(p.owners)) == 2 and 0 not in p.owners for p in meta.partitions)
        d, i = c.distributed_knn_search(q[:200], 5)
        np.testing.assert_allclose(d, ref, rtol=0, atol=1e-12)
        everything = c.range_search(np.full(2, 0.5), 2.0)
        assert np.array_equal(everything, np.arange(len(pts))), "no point lost or duplicated"
        with pytest.raises(ValueError, match="no node 0"):
            c.remove_node(0)
        with pytest.raises(ValueError, match="n must be an int >= 1"):
            c.add_nodes(0)


def test_partial_failure_and_memory_pressure_are_repaired(ray_local):
    import ray

    from distspatial.control.fault import FailureType, RecoveryStrategy

    pts = skewed_points(12_000, 2, seed=52)
    q = skewed_points(300, 2, seed=52, sample_seed=3)
    ref = brute_knn(pts, q, 4)
    # heartbeats driven by hand (a long interval keeps the background thread out of the way)
    cfg = NodeConfig().with_node_count(3).with_fault_tolerance(True).replace(
        cpus_per_node=0.2, heartbeat_interval_ms=600_000)
    with DistributedSpatialCluster(cfg) as c:
        meta = c.distribute_data(pts)
        pid = meta.partitions_of(1)[0]
        ray.get(c.runtime.actors[1].drop_partitions.remote([pid]))  # node 1 silently loses a partition
        plan = c.check_health()
        assert any(a.failure is FailureType.PARTIAL_FAILURE and a.strategy is RecoveryStrategy.REPLICATE
                   and a.node_id == 1 and pid in a.partitions for a in plan.actions), plan
        assert pid in ray.get(c.runtime.actors[1].ping.remote())["partitions"], "re-replicated onto node 1"
        assert not c.check_health(), "healthy again"
        # memory pressure (threshold below the machine's real reading): each node migrates a partition away
        c.runtime.call_controller("set_options", memory_threshold=0.0)
        version = c.metadata.version
        plan = c.check_health()
        assert {a.node_id for a in plan.actions if a.failure is FailureType.RESOURCE_EXHAUSTION
                and a.strategy is RecoveryStrategy.MIGRATE} == {0, 1, 2}
        assert c.metadata.version > version
        c.runtime.call_controller("set_options", memory_threshold=0.95)
        d, _ = c.distributed_knn_search(q, 4)
        np.testing.assert_allclose(d, ref, rtol=0, atol=1e-12)
        assert all(len(set(p.owners)) == 2 for p in c.metadata.partitions)
        assert np.array_equal(c.range_search(np.full(2, 0.5), 2.0), np.arange(len(pts)))
        h = c.health()
        assert all(0.0 < n["health_score"] <= 1.0 for n in h["nodes"].values())


def test_a_call_planned_before_remove_node_is_replanned(ray_local):
    """A round planned on the routing from before ``remove_node`` names the removed node; the dispatcher plans
    those partitions again on the current routing instead of failing (KeyError seen under query load)."""
    pts = skewed_points(8_000, 2, seed=52)
    cfg = NodeConfig().with_node_count(3).with_fault_tolerance(True).replace(cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        c.distribute_data(pts)
        stale = c.runtime.routing
        pids = sorted(p.partition_id for p in c.metadata.partitions)
        assert any(0 in stale.owners[p] for p in pids)
        c.remove_node(0)

        def build(node, part_ids):
            return c.runtime.actor(node).partition_ids.remote(part_ids), node, 0

        results = c.runtime.dispatch.run(pids, stale, build, lambda: c.runtime.routing, balance=False)
        assert 0 not in {node for node, _ in results}
        got = np.sort(np.concatenate([ids for _, res in results for _, ids in res]))
        np.testing.assert_array_equal(got, np.arange(len(pts)))
