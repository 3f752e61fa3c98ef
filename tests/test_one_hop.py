"""The one-hop path for small queries (issue #15): a few kNN, range or box queries go in one call to one node.
Answers are checked against scipy's cKDTree and NumPy brute force; the path's own counters show it was taken."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import ray
from scipy.spatial import cKDTree

from distspatial import DistributedSpatialCluster, NodeConfig
from distspatial.datasets import skewed_points

from .conftest import assert_knn_ids_match


def _points() -> np.ndarray:
    pts = skewed_points(60_000, 2, seed=11)
    return np.concatenate([pts, np.repeat(pts[:200], 20, axis=0)])  # 200 points 21 times each


def _border_queries(meta, n: int, seed: int) -> np.ndarray:
    """Points on and just around the partitions' box edges (where a kNN reaches into neighbours)."""
    rng = np.random.default_rng(seed)
    boxes = [(np.asarray(p.lo), np.asarray(p.hi)) for p in meta.partitions]
    out = []
    for i in range(n):
        lo, hi = boxes[i % len(boxes)]
        q = rng.uniform(lo, hi)
        q[i % 2] = (lo if i % 4 < 2 else hi)[i % 2] + rng.normal(0, 1e-4)
        out.append(q)
    return np.array(out)


@pytest.fixture(scope="module")
def one_hop_cluster(ray_local):
    pts = _points()
    cfg = NodeConfig().with_node_count(3).with_partitions_per_node(4).with_fault_tolerance(True).replace(
        cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        c.progress = False
        meta = c.distribute_data(pts)
        yield c, pts, meta


def test_single_and_small_knn_queries_take_one_hop_and_equal_ckdtree(one_hop_cluster):
    c, pts, meta = one_hop_cluster
    rng = np.random.default_rng(3)
    q = np.concatenate([_border_queries(meta, 60, 1), pts[rng.choice(len(pts), 40)], pts[:5] + 0.0,
                        rng.random((20, 2)) * 1.4 - 0.2])  # borders, on points, duplicates, outside the data
    calls0 = c._one_hop.calls
    sent0 = c._rt.comm.totals()["messages_sent"]
    for k in (1, 10, 60):  # k=60 reaches past every duplicate group and into neighbour partitions
        dist = np.empty((len(q), k))
        ids = np.empty((len(q), k), dtype=np.int64)
        for i, x in enumerate(q):
            dist[i], ids[i] = c.distributed_knn_search(x, k)
        assert_knn_ids_match(pts, q, dist, ids, k, min_separated=0.5)
    assert c._one_hop.calls - calls0 == 3 * len(q), "single queries did not take the one-hop path"
    assert c._rt.comm.totals()["messages_sent"] - sent0 == 3 * len(q), "more than one client message per query"
    # small batches whose home partitions one node holds: one hop; others: the regular path; all exact
    for a in range(0, 60, 6):
        dist, ids = c.distributed_knn_search(q[a:a + 6], 12)
        assert_knn_ids_match(pts, q[a:a + 6], dist, ids, 12, min_separated=0.5)
    tree = cKDTree(pts)
    for x in q[::7]:  # mixed k: each answer is exactly cKDTree's distances
        for k in (3, 17):
            np.testing.assert_allclose(c.distributed_knn_search(x, k)[0], tree.query(x, k)[0], rtol=0, atol=1e-12)


def test_single_range_and_box_queries_take_one_hop_and_equal_references(one_hop_cluster):
    c, pts, meta = one_hop_cluster
    q = _border_queries(meta, 40, 2)
    tree = cKDTree(pts)
    calls0 = c._one_hop.calls
    for x, r in zip(q, np.resize([0.0, 1e-3, 0.02, 0.15], len(q))):
        np.testing.assert_array_equal(c.range_search(x, r), np.sort(tree.query_ball_point(x, r)))
        got_ids, got_pts = c.range_search(x, r, return_points=True)
        np.testing.assert_array_equal(got_pts, pts[got_ids])
        lo, hi = x - r, x + 0.5 * r
        np.testing.assert_array_equal(c.box_search(lo, hi), np.flatnonzero(np.all((pts >= lo) & (pts <= hi), 1)))
    assert c._one_hop.calls - calls0 == 3 * len(q)
    got = c.range_search(q[:10], 0.03)  # a small batch: one call, split per query
    for g, x in zip(got, q[:10]):
        np.testing.assert_array_equal(g, np.sort(tree.query_ball_point(x, 0.03)))


def queries_during_ingest(c, q: np.ndarray, tree: cKDTree, rng, min_ingests: int) -> tuple[list[int], int]:
    """Single kNN queries (k=5) over ``q`` in a thread, in whole passes, while this thread ingests points far
    from them (x in [3, 4]), until at least ``min_ingests`` ingests overlapped the queries: ``(indices of answers
    that differ from cKDTree's, ingests)``."""
    stop = threading.Event()
    ingested = threading.Event()
    wrong: list[int] = []

    def query() -> None:
        try:
            while True:  # whole passes until the ingests (slow on a busy machine) have overlapped them
                for i, x in enumerate(q):
                    if not np.allclose(c.distributed_knn_search(x, 5)[0], tree.query(x, 5)[0], rtol=0, atol=1e-12):
                        wrong.append(i)
                if ingested.is_set():
                    return
        finally:
            stop.set()

    t = threading.Thread(target=query)
    t.start()
    n_ingests = 0
    while not stop.is_set():
        c.ingest(np.column_stack([rng.uniform(3, 4, 20), rng.random(20)]))
        n_ingests += 1
        if n_ingests >= min_ingests:
            ingested.set()
    t.join(120)
    return wrong, n_ingests


def test_one_hop_queries_during_ingest_resend_without_a_view_fetch_and_stay_exact(one_hop_cluster):
    """Every ingest is a new metadata version, and nodes refuse calls planned on an older one. With the layout
    unchanged, the one-hop path sends the same plan again under the node's version instead of fetching the view.
    Points are ingested far from the queries (x in [3, 4]), so every answer must equal cKDTree over the base
    points. (Runs after the other tests of the module's cluster: it adds points.)"""
    c, pts, _ = one_hop_cluster
    tree = cKDTree(pts)
    rng = np.random.default_rng(12)
    q = rng.random((400, 2))
    resent0, replans0 = c._one_hop.resent, c._rt.replans
    wrong, n_ingests = queries_during_ingest(c, q, tree, rng, min_ingests=5)
    assert not wrong, f"{len(wrong)} answers differ from cKDTree"
    assert n_ingests >= 5
    resent = c._one_hop.resent - resent0
    assert resent > 0, "no refused call was resent under the newer version"
    assert c._rt.replans - replans0 <= resent, "refused one-hop calls fetched the view instead of resending"


def test_a_node_killed_under_one_hop_queries_answers_stay_exact(ray_local):
    """Single queries run in a thread while a node is killed: each answer is exact (a replica serves it) or an
    error; never a silently partial one. With two replicas every answer must be exact."""
    pts = skewed_points(40_000, 2, seed=9)
    tree = cKDTree(pts)
    cfg = NodeConfig().with_node_count(3).with_partitions_per_node(3).with_fault_tolerance(True).replace(
        cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        c.progress = False
        c.distribute_data(pts)
        rng = np.random.default_rng(4)
        q = np.concatenate([pts[rng.choice(len(pts), 300)] + 1e-5, rng.random((300, 2))])
        warm = threading.Event()
        killed = threading.Event()
        wrong: list[int] = []
        errors: list[BaseException] = []
        done = [0]

        def run() -> None:
            try:
                for i, x in enumerate(q):
                    d, ids = c.distributed_knn_search(x, 20)
                    if not np.allclose(d, tree.query(x, 20)[0], rtol=0, atol=1e-12):
                        wrong.append(i)
                    done[0] = i + 1
                    if i == 100:
                        warm.set()
                        killed.wait(60)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                warm.set()

        t = threading.Thread(target=run)
        t.start()
        assert warm.wait(120)
        victim = c._rt.live_node_ids[1]
        actor = c._rt.actors[victim]
        ray.kill(actor, no_restart=True)
        killed.set()
        t.join(300)
        assert not t.is_alive()
        assert not errors, errors
        assert done[0] == len(q)
        assert not wrong, f"{len(wrong)} answers differ from cKDTree after a node was killed"
        assert c._one_hop.calls > 150  # the path stayed in use after the failure
