"""Low-latency one-hop calls (issue #15): small queries through Ray compiled graphs, one channel per node.

Real Ray runtimes, real compiled graphs. Answers are checked against scipy's cKDTree and NumPy brute force; the
client's counters and open channels show the path was taken. A compiled graph's loop keeps a core busy while it
is open, so the module keeps to two nodes and closes the channels as soon as each test is done."""

from __future__ import annotations

import numpy as np
import pytest
import ray
from scipy.spatial import cKDTree

from distspatial import DistributedSpatialCluster, NodeConfig
from distspatial.datasets import skewed_points

from .conftest import assert_knn_ids_match
from .test_one_hop import _border_queries, queries_during_ingest


def _points() -> np.ndarray:
    pts = skewed_points(30_000, 2, seed=21)
    return np.concatenate([pts, np.repeat(pts[:100], 15, axis=0)])  # 100 points 16 times each


@pytest.fixture
def cluster(ray_local):
    pts = _points()
    cfg = NodeConfig().with_node_count(2).with_partitions_per_node(3).with_fault_tolerance(True).replace(
        cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        c.progress = False
        meta = c.distribute_data(pts)
        c.set_low_latency(True)
        yield c, pts, meta
        c.set_low_latency(False)


def test_small_queries_through_channels_equal_references(cluster):
    c, pts, meta = cluster
    rng = np.random.default_rng(5)
    q = np.concatenate([_border_queries(meta, 40, 3), pts[:4] + 0.0, rng.random((10, 2)) * 1.4 - 0.2])
    calls0 = c._one_hop.calls
    for k in (1, 25):  # k=25 reaches past every duplicate group and into neighbour partitions
        dist = np.empty((len(q), k))
        ids = np.empty((len(q), k), dtype=np.int64)
        for i, x in enumerate(q):
            dist[i], ids[i] = c.distributed_knn_search(x, k)
        assert_knn_ids_match(pts, q, dist, ids, k, min_separated=0.5)
    assert c._one_hop.open_channels == [0, 1], "no compiled-graph channel was opened"
    assert c._one_hop.calls - calls0 == 2 * len(q) and c._one_hop.fallbacks == 0
    tree = cKDTree(pts)
    for x, r in zip(q[:20], np.resize([0.0, 1e-3, 0.02, 0.15], 20)):
        np.testing.assert_array_equal(c.range_search(x, r), np.sort(tree.query_ball_point(x, r)))
        lo, hi = x - r, x + 0.5 * r
        np.testing.assert_array_equal(c.box_search(lo, hi), np.flatnonzero(np.all((pts >= lo) & (pts <= hi), 1)))
    dist, ids = c.distributed_knn_search(q[:6], 7)  # a small batch, one or two calls
    assert_knn_ids_match(pts, q[:6], dist, ids, 7, min_separated=0.5)
    c.set_low_latency(False)
    assert c._one_hop.open_channels == []
    np.testing.assert_allclose(c.distributed_knn_search(q[0], 5)[0], tree.query(q[0], 5)[0], rtol=0, atol=1e-12)


def test_refusals_come_through_the_channel_and_answers_stay_exact_during_ingest(cluster):
    """Nodes refuse calls planned on an older version (each ingest is one): the refusal must reach the client
    through the compiled graph as through an actor call, so the call is sent again under the newer version.
    Points are ingested far from the queries (x in [3, 4]): answers must equal cKDTree over the base points."""
    c, pts, _ = cluster
    tree = cKDTree(pts)
    rng = np.random.default_rng(8)
    q = rng.random((300, 2))
    resent0 = c._one_hop.resent
    wrong, n_ingests = queries_during_ingest(c, q, tree, rng, min_ingests=3)
    assert not wrong, f"{len(wrong)} answers differ from cKDTree"
    assert n_ingests >= 3 and c._one_hop.open_channels
    assert c._one_hop.resent > resent0, "no refusal came back through a channel"


def test_a_node_killed_with_its_channel_open_answers_stay_exact(cluster):
    """The victim's channel breaks: that call goes as an actor call (a replica answers), the channel is closed,
    and every answer is exact."""
    c, pts, _ = cluster
    tree = cKDTree(pts)
    rng = np.random.default_rng(9)
    q = np.concatenate([pts[rng.choice(len(pts), 150)] + 1e-5, rng.random((150, 2))])
    for x in q[:40]:
        c.distributed_knn_search(x, 10)
    assert c._one_hop.open_channels == [0, 1]
    ray.kill(c._rt.actors[1], no_restart=True)
    wrong = [i for i, x in enumerate(q) if not np.allclose(c.distributed_knn_search(x, 10)[0],
                                                           tree.query(x, 10)[0], rtol=0, atol=1e-12)]
    assert not wrong, f"{len(wrong)} answers differ from cKDTree after a node was killed"
    assert 1 not in c._one_hop.open_channels


def test_the_service_answers_concurrent_requests_through_channels(cluster):
    """``distspatial serve --low-latency``: the service's gathered batches go through the channels; concurrent
    single-point requests (several threads) get cKDTree's answers."""
    import json
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    pytest.importorskip("fastapi")
    from distspatial.ui.service import BackgroundServer

    c, pts, _ = cluster
    tree = cKDTree(pts)
    q = np.random.default_rng(10).random((120, 2))
    calls0 = c._one_hop.calls

    def ask(url: str, x: np.ndarray) -> list[float]:
        body = json.dumps({"points": x.tolist(), "k": 6}).encode()
        req = urllib.request.Request(url + "/knn", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["distances"]

    with BackgroundServer(c, workers=4) as srv:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda x: ask(srv.url, x), q))
    np.testing.assert_allclose(np.array(got), tree.query(q, 6)[0], rtol=0, atol=1e-12)
    assert c._one_hop.calls > calls0 and c._one_hop.open_channels
