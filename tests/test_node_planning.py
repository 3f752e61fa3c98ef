"""Queries planned and merged on the nodes (issue #14): the client sends one message per node and gets final
answers; the nodes plan the later rounds and ask each other. Answers are checked against scipy's cKDTree and
NumPy brute force."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import ray
from scipy.spatial import cKDTree

from distspatial import DistributedSpatialCluster, NodeConfig
from distspatial.datasets import skewed_points

from .conftest import assert_knn_ids_match


def _data(kind: str, n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return rng.random((n, d))
    if kind == "skewed":
        return skewed_points(n, d, seed=seed)
    base = rng.random((n // 50, d))  # duplicate-heavy: every point 50 times
    return np.repeat(base, 50, axis=0)


def _ball_ref(pts: np.ndarray, c: np.ndarray, r: float) -> list[np.ndarray]:
    tree = cKDTree(pts)
    return [np.sort(np.asarray(h, dtype=np.int64)) for h in tree.query_ball_point(c, r)]


@pytest.mark.parametrize("d", [2, 3, 5])
@pytest.mark.parametrize("kind", ["skewed", "uniform", "duplicates"])
def test_node_planned_answers_equal_references(ray_local, kind, d):
    pts = _data(kind, 30_000, d, seed=d)
    rng = np.random.default_rng(7 + d)
    q = np.concatenate([pts[rng.choice(len(pts), 300)], rng.random((200, d))])  # on points and anywhere
    cfg = NodeConfig().with_node_count(3).with_partitions_per_node(4).with_fault_tolerance(True).replace(
        cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        c.distribute_data(pts)
        before = c._rt.comm.totals()["messages_sent"]
        dist, ids = c.distributed_knn_search(q, 8)
        sent = c._rt.comm.totals()["messages_sent"] - before
        assert sent <= 3, f"the client sent {sent} messages for one batch: more than one per node"
        assert_knn_ids_match(pts, q, dist, ids, 8, min_separated=0.0 if kind == "duplicates" else 0.99)
        r = 0.08 if d <= 3 else 0.25
        got = c.range_search(q[:150], r)
        for g, ref in zip(got, _ball_ref(pts, q[:150], r)):
            np.testing.assert_array_equal(g, ref)
        lo, hi = q[:100] - r, q[:100] + r
        got = c.box_search(lo, hi)
        for i, g in enumerate(got):
            ref = np.flatnonzero(np.all((pts >= lo[i]) & (pts <= hi[i]), axis=1))
            np.testing.assert_array_equal(g, ref)


def test_a_peer_dead_before_round_two_fails_over_to_a_replica(ray_local):
    """All queries have their home on one node; the node that the follow-ups would reach first is killed after
    the client's view was taken: the home node's own dispatcher fails over to the other replica."""
    pts = skewed_points(40_000, 2, seed=5)
    cfg = NodeConfig().with_node_count(3).with_partitions_per_node(3).with_fault_tolerance(True).replace(
        cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        meta = c.distribute_data(pts)
        ids0 = c._rt.partitions_call("partition_ids", partitions=[0])[0][1][0][1]
        q = pts[ids0[:400]] + 1e-4  # home: partition 0 (or its neighbours)
        c.distributed_knn_search(q, 50)  # the home nodes now hold this version's routing, the victim alive in it
        victim = next(n for n in c._rt.live_node_ids if n not in meta.partitions[0].owners)
        actor = c._rt.actors[victim]
        ray.kill(actor, no_restart=True)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.ping.remote(), timeout=60)  # the event: the actor is dead
        dist, ids = c.distributed_knn_search(q, 50)  # k large enough to reach other partitions
        assert_knn_ids_match(pts, q, dist, ids, 50)
        got = c.range_search(q[:50], 0.05)
        for g, ref in zip(got, _ball_ref(pts, q[:50], 0.05)):
            np.testing.assert_array_equal(g, ref)


def test_splits_while_batches_run_stay_exact(ray_local):
    """Partitions split (a layout change) while kNN and range batches run: a round planned on an older layout
    is refused and planned again; every answer stays exact."""
    pts = skewed_points(60_000, 2, seed=9)
    q = skewed_points(3_000, 2, seed=9, sample_seed=4)
    tree = cKDTree(pts)
    ref_d, _ = tree.query(q, 10)
    ref_ball = _ball_ref(pts, q[:200], 0.03)
    cfg = NodeConfig().with_node_count(2).with_partitions_per_node(2).replace(cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        c.distribute_data(pts)
        stop = threading.Event()
        errors: list[BaseException] = []
        splits = []

        def split_loop() -> None:
            try:
                while not stop.is_set() and len(splits) < 6:
                    meta = c.metadata
                    big = max(meta.partitions, key=lambda p: p.size).partition_id
                    splits.append(c.split_partition(big))
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        t = threading.Thread(target=split_loop)
        t.start()
        try:
            rounds = 0
            while t.is_alive() or rounds < 3:
                dist, _ = c.distributed_knn_search(q, 10)
                np.testing.assert_allclose(dist, ref_d, rtol=0, atol=1e-12)
                for g, ref in zip(c.range_search(q[:200], 0.03), ref_ball):
                    np.testing.assert_array_equal(g, ref)
                rounds += 1
        finally:
            stop.set()
            t.join(timeout=120)
        assert not errors, errors
        assert len(splits) == 6 and c.metadata.n_partitions == 10
