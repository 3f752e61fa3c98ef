"""``distribute_data`` in bounded waves of partition pieces (``distspatial.client.upload``), on a real local Ray
runtime: answers equal scipy's cKDTree / brute force with the data sent in many small waves (user ids,
replicas, compression), and an interrupted or incomplete staged load publishes nothing. ``plan_waves`` is
checked on its own (every row exactly once, every wave spread over the nodes)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from distspatial import DistributedSpatialCluster, NodeConfig
from distspatial.client import upload
from distspatial.client.upload import plan_waves
from distspatial.io.datasets import skewed_points

from .conftest import assert_knn_exact


@pytest.fixture
def small_waves(monkeypatch):
    """Waves of 64 KB (a few hundred rows): a few thousand points already take dozens of waves."""
    monkeypatch.setattr(upload, "WAVE_BYTES", 64 * 1024)


@pytest.fixture(scope="module")
def cluster(ray_local):
    c = DistributedSpatialCluster(NodeConfig().with_node_count(3).with_replication_factor(2)
                                  .replace(partitions_per_node=3))
    c.progress = False
    yield c
    c.shutdown()


def test_plan_waves_covers_every_row_once_and_spreads_each_wave():
    rng = np.random.default_rng(0)
    cuts = np.concatenate([[0], np.cumsum(rng.integers(0, 50, size=9))])
    owners = {p: ((p % 3), (p + 1) % 3) for p in range(9)}
    waves = plan_waves(cuts, owners, rows_per_wave=12)
    seen = {p: np.zeros(cuts[p + 1] - cuts[p], dtype=int) for p in range(9)}
    for wave in waves:
        primaries = [owners[p][0] for p, *_ in wave]
        assert len(primaries) == len(set(primaries))  # at most one piece per node and wave
        for p, a, b, total in wave:
            assert total == cuts[p + 1] - cuts[p] and 0 <= a <= b <= total and b - a <= 4
            seen[p][a:b] += 1
    assert all((s == 1).all() for s in seen.values())
    # the first waves carry a piece for every node
    assert len(waves[0]) == 3


def test_waves_answer_exactly_with_user_ids_and_replicas(cluster, small_waves):
    pts = skewed_points(6000, 3, seed=4)
    ids = np.random.default_rng(1).permutation(6000).astype(np.int64) * 7919 + 10**11  # not row numbers
    meta = cluster.distribute_data(pts, ids=ids)
    assert meta.n_points == 6000 and len(meta.partitions) == 9
    assert all(len(p.owners) == 2 for p in meta.partitions)
    q = skewed_points(300, 3, seed=5)
    dist, got = cluster.distributed_knn_search(q, 7)
    row_of = {int(v): r for r, v in enumerate(ids)}
    assert_knn_exact(pts, q, dist, got, 7, ids_map=lambda a: np.vectorize(row_of.__getitem__)(a))
    # range search: every id within the radius, from the cKDTree reference
    ref = cKDTree(pts).query_ball_point(q[:50], 0.05)
    res = cluster.range_search(q[:50], 0.05)
    for r, hits in zip(ref, res):
        assert sorted(ids[r].tolist()) == hits.tolist()


def test_waves_with_compression_and_a_second_load(ray_local, small_waves):
    cluster = DistributedSpatialCluster(NodeConfig().with_node_count(2).replace(compression=True))
    cluster.progress = False
    pts = np.random.default_rng(2).random((5000, 2))
    cluster.distribute_data(pts)
    pts2 = np.random.default_rng(3).random((4000, 2))
    meta = cluster.distribute_data(pts2)  # replaces the first: nothing of it answers
    assert meta.n_points == 4000
    q = np.random.default_rng(4).random((200, 2))
    dist, got = cluster.distributed_knn_search(q, 5)
    assert_knn_exact(pts2, q, dist, got, 5)
    cluster.shutdown()


def test_an_interrupted_or_incomplete_staged_load_publishes_nothing(cluster):
    rt = cluster._rt
    pts = np.random.default_rng(6).random((3000, 2))
    cluster.distribute_data(pts)
    n_parts = 9
    rt.call_controller("begin_distribute", n_parts, 111)
    # the data set is gone from the moment a load begins; nothing is published until it ends
    with pytest.raises(Exception):
        cluster.distributed_knn_search(pts[:3], 2)
    rt.call_controller("begin_distribute", n_parts, 222)  # another load begins: the first is superseded
    with pytest.raises(RuntimeError, match="interrupted"):
        rt.call_controller("stage_partitions", 111, [], [], [])
    # the last wave arrives without the partitions' rows: refused, nothing published
    layout = {"dim": 2, "lo": np.zeros(2), "hi": np.ones(2), "curve": "hilbert", "bits": 31,
              "key_lo": np.zeros(n_parts, np.uint64), "key_hi": np.zeros(n_parts, np.uint64),
              "box_lo": np.zeros((n_parts, 2)), "box_hi": np.ones((n_parts, 2)), "counts": np.full(n_parts, 10),
              "next_id": 90}
    with pytest.raises(RuntimeError, match="did not arrive whole"):
        rt.call_controller("distribute", layout, [], [], None, 0.1, 222, [])
    assert rt.call_controller("view").meta is None
    # and a new distribute_data works after all of this
    meta = cluster.distribute_data(pts)
    assert meta.n_points == 3000
    dist, got = cluster.distributed_knn_search(pts[:20], 1)
    assert (dist[:, 0] == 0).all()


def test_ids_past_int32_ingested_into_compact_partitions(cluster):
    """Nodes store ids that fit as int32; ids past int32 ingested later come back whole (int64) from kNN,
    range and point_ids, checked against cKDTree over all points."""
    rng = np.random.default_rng(8)
    pts = rng.random((4000, 2))
    ids = np.arange(4000, dtype=np.int64) * 3
    cluster.distribute_data(pts, ids=ids)
    new = rng.random((600, 2))
    new_ids = np.arange(600, dtype=np.int64) + 2**40
    cluster.ingest(new, ids=new_ids)
    all_pts, all_ids = np.vstack([pts, new]), np.concatenate([ids, new_ids])
    q = rng.random((150, 2))
    dist, got = cluster.distributed_knn_search(q, 5)
    ref_d, ref_i = cKDTree(all_pts).query(q, 5)
    assert got.dtype == np.int64
    np.testing.assert_allclose(dist, ref_d, rtol=0, atol=1e-12)
    assert (got == all_ids[ref_i]).mean() > 0.999
    hits = cluster.range_search(q[:30], 0.04)
    for h, r in zip(hits, cKDTree(all_pts).query_ball_point(q[:30], 0.04)):
        assert h.dtype == np.int64 and h.tolist() == sorted(all_ids[r].tolist())
    ids_now = cluster.point_ids()
    assert ids_now.dtype == np.int64 and np.array_equal(np.sort(ids_now), np.sort(all_ids))
