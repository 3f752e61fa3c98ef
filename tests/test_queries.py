"""Exact queries on a real local Ray runtime, checked against scipy cKDTree and numpy brute force."""

import numpy as np
import pytest
from scipy.spatial import cKDTree

from distspatial import DistributedSpatialCluster, NodeConfig, NotDistributedError
from distspatial.io.datasets import skewed_points

from .conftest import assert_knn_exact


@pytest.fixture(scope="module")
def cluster(ray_local):
    cfg = NodeConfig().with_node_count(4).with_partitions_per_node(3).replace(cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        yield c


def _data(kind: str, n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return rng.random((n, d))
    if kind == "skewed":
        return skewed_points(n, d, n_hotspots=8, seed=seed)
    if kind == "duplicates":  # many identical points: 30 distinct locations
        return rng.random((30, d))[rng.integers(0, 30, n)]
    raise AssertionError(kind)


@pytest.mark.parametrize("d", [1, 2, 3, 8])
@pytest.mark.parametrize("kind", ["uniform", "skewed", "duplicates"])
def test_knn_batch_exact(cluster, d, kind):
    pts = _data(kind, 6000, d, seed=d)
    cluster.distribute_data(pts)
    queries = np.concatenate([_data(kind, 150, d, seed=100 + d), np.random.default_rng(d).uniform(-0.5, 1.5, (50, d))])
    for k in (1, 10, 100):
        dist, ids = cluster.distributed_knn_search(queries, k)
        assert dist.shape == ids.shape == (len(queries), k)
        assert_knn_exact(pts, queries, dist, ids, k)
        rd, _ = cKDTree(pts).query(queries, k)
        np.testing.assert_allclose(dist, rd.reshape(len(queries), k), rtol=0, atol=1e-12)


def test_single_query_shapes_and_ties(cluster):
    pts = _data("skewed", 5000, 2)
    cluster.distribute_data(pts)
    q = np.array([0.5, 0.5])
    dist, ids = cluster.distributed_knn_search(q, 10)
    assert dist.shape == ids.shape == (10,)
    assert np.all(np.diff(dist) >= 0)
    assert_knn_exact(pts, q[None], dist[None], ids[None], 10)
    # a query sitting exactly on a data point finds it at distance 0
    dist, ids = cluster.distributed_knn_search(pts[123], 1)
    assert dist[0] == 0.0 and np.array_equal(pts[ids[0]], pts[123])
    # k equal to the whole data set
    dist, ids = cluster.distributed_knn_search(q, len(pts))
    assert sorted(ids.tolist()) == list(range(len(pts)))


def test_user_ids_and_morton(ray_local):
    rng = np.random.default_rng(7)
    pts = rng.random((3000, 3))
    user_ids = rng.choice(10**12, size=3000, replace=False)
    cfg = NodeConfig().with_node_count(2).with_curve("morton")
    with DistributedSpatialCluster(cfg) as c:
        c.distribute_data(pts, ids=user_ids)
        q = rng.random((40, 3))
        dist, ids = c.distributed_knn_search(q, 5)
        pos = {v: i for i, v in enumerate(user_ids)}
        assert_knn_exact(pts, q, dist, ids, 5, ids_map=lambda a: np.vectorize(pos.get)(a))
        hits = c.range_search(q[0], 0.2)
        want = np.sort(user_ids[np.flatnonzero(((pts - q[0]) ** 2).sum(1) <= 0.04)])
        np.testing.assert_array_equal(hits, want)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_range_search_exact(cluster, d):
    pts = _data("skewed", 8000, d, seed=3)
    cluster.distribute_data(pts)
    rng = np.random.default_rng(5)
    centers = np.concatenate([pts[rng.choice(len(pts), 20)], rng.uniform(-1, 2, (5, d))])
    radii = rng.uniform(0, 0.2, len(centers))
    radii[0] = 0.0  # a zero radius finds exactly the points at the centre
    got = cluster.range_search(centers, radii)
    assert isinstance(got, list) and len(got) == len(centers)
    tree = cKDTree(pts)
    for g, c, r in zip(got, centers, radii):
        np.testing.assert_array_equal(g, np.sort(tree.query_ball_point(c, r)))
    assert len(got[0]) >= 1
    # empty result: a ball far outside the data
    far = cluster.range_search(np.full(d, 10.0), 0.5)
    assert isinstance(far, np.ndarray) and far.size == 0
    # return_points gives the matching coordinates
    ids, p = cluster.range_search(centers[1], 0.1, return_points=True)
    np.testing.assert_array_equal(p, pts[ids])


def test_box_search_exact(cluster):
    pts = _data("skewed", 8000, 3, seed=4)
    cluster.distribute_data(pts)
    rng = np.random.default_rng(6)
    lo = rng.uniform(0, 0.8, (15, 3))
    hi = lo + rng.uniform(0, 0.4, (15, 3))
    got = cluster.box_search(lo, hi)
    for g, a, b in zip(got, lo, hi):
        np.testing.assert_array_equal(g, np.flatnonzero(np.all((pts >= a) & (pts <= b), axis=1)))
    assert cluster.box_search(np.full(3, 5.0), np.full(3, 6.0)).size == 0
    ids, p = cluster.box_search(lo[0], hi[0], return_points=True)
    np.testing.assert_array_equal(p, pts[ids])


def test_redistribute_replaces_data(cluster):
    cluster.distribute_data(np.zeros((10, 2)))
    meta = cluster.distribute_data(np.ones((20, 2)) * 3)
    assert meta.n_points == 20 and cluster.n_points == 20
    dist, ids = cluster.distributed_knn_search(np.array([3.0, 3.0]), 20)
    assert np.all(dist == 0) and sorted(ids) == list(range(20))
    assert "points=20" in repr(cluster)


def test_bad_input_errors(cluster):
    pts = np.random.default_rng(0).random((100, 2))
    cluster.distribute_data(pts)
    before = cluster.metadata.version
    bad = pts.copy()
    bad[[7, 42]] = np.nan
    with pytest.raises(ValueError, match=r"rows \[7, 42\]"):
        cluster.distribute_data(bad)
    bad[7] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        cluster.distribute_data(bad)
    with pytest.raises(ValueError, match="2-D"):
        cluster.distribute_data(np.zeros(5))
    with pytest.raises(ValueError, match="numeric"):
        cluster.distribute_data([["a", "b"]])
    with pytest.raises(ValueError, match="at least one point"):
        cluster.distribute_data(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="unique"):
        cluster.distribute_data(pts, ids=np.zeros(100, dtype=int))
    with pytest.raises(ValueError, match="one id per point"):
        cluster.distribute_data(pts, ids=np.arange(5))
    # nothing was half-distributed: the old data set still answers
    assert cluster.metadata.version == before and cluster.n_points == 100
    with pytest.raises(ValueError, match="larger than the number of distributed points"):
        cluster.distributed_knn_search(pts[0], 101)
    with pytest.raises(ValueError, match="k must be >= 1"):
        cluster.distributed_knn_search(pts[0], 0)
    with pytest.raises(ValueError, match="k must be an int"):
        cluster.distributed_knn_search(pts[0], 2.5)
    with pytest.raises(ValueError, match=r"shape \(2,\) or \(m, 2\)"):
        cluster.distributed_knn_search(np.zeros(3), 1)
    with pytest.raises(ValueError, match="NaN"):
        cluster.distributed_knn_search(np.array([np.nan, 0.0]), 1)
    with pytest.raises(ValueError, match="radius must be finite and >= 0"):
        cluster.range_search(pts[0], -1.0)
    with pytest.raises(ValueError, match="lo <= hi"):
        cluster.box_search(np.ones(2), np.zeros(2))


def test_query_before_distribute(ray_local):
    with DistributedSpatialCluster(NodeConfig().with_node_count(1)) as c:
        with pytest.raises(NotDistributedError, match="distribute_data"):
            c.distributed_knn_search(np.zeros(2), 1)
        with pytest.raises(NotDistributedError):
            c.range_search(np.zeros(2), 1.0)
        with pytest.raises(NotDistributedError):
            c.distributed_kmeans(2)
    with pytest.raises(RuntimeError, match="shut down"):
        c.distribute_data(np.zeros((3, 2)))


def test_statistics_and_replicas(ray_local):
    pts = skewed_points(20_000, 2, seed=9)
    cfg = NodeConfig().with_node_count(3).with_fault_tolerance(True)
    with DistributedSpatialCluster(cfg) as c:
        meta = c.distribute_data(pts)
        assert all(len(set(p.owners)) == 2 for p in meta.partitions)
        n_parts = meta.n_partitions
        box_lo = np.array([p.lo for p in meta.partitions])
        box_hi = np.array([p.hi for p in meta.partitions])

        def served():
            return sum(n.queries_served for n in c.statistics().nodes)

        q = skewed_points(500, 2, seed=9, sample_seed=1)
        s0 = served()
        dist, ids = c.distributed_knn_search(q, 5)
        s1 = served()
        assert_knn_exact(pts, q, dist, ids, 5)
        (d2, i2), status = c.distributed_knn_search(q, 5, allow_partial=True)
        s2 = served()
        assert not status.partial and status.missing_partitions == ()
        np.testing.assert_array_equal(i2, ids)
        # (query, partition) pairs searched by the 500 kNN queries: each query at least its home partition, at
        # most every partition once; the same batch again is planned and read the same way
        assert len(q) <= s1 - s0 <= len(q) * n_parts, (s1 - s0, n_parts)
        assert s2 - s1 == s1 - s0
        st = c.statistics()
        assert len(st.nodes) == 3 and all(n.status == "alive" for n in st.nodes)
        assert sum(n.points for n in st.nodes) == 2 * len(pts), "each point is held by two replicas"
        assert st.n_points == len(pts) and st.queries == 1000
        assert st.messages_sent >= 3 and st.bytes_sent > 0 and st.bytes_received > 0
        assert st.latency_p99_s >= st.latency_p50_s > 0
        assert 1.0 <= st.load_balance_score < 1.5
        assert "points" in str(st)
        assert sum(n.queries_served for n in st.nodes) == s2 - s0
        # every partition is read from exactly one replica: no point is counted twice. Exact counts where the
        # partitions a query must search are known from the metadata alone:
        lo = np.random.default_rng(3).uniform(-0.1, 0.9, (200, 2))
        hi = lo + np.random.default_rng(4).uniform(0, 0.4, (200, 2))
        meets = ((box_lo[None] <= hi[:, None]) & (box_hi[None] >= lo[:, None])).all(-1)  # closed boxes meet
        before = served()
        got = c.box_search(lo, hi)
        assert served() - before == int(meets.sum()), "each box reads each partition it meets once"
        for g, a, b in zip(got, lo, hi):
            np.testing.assert_array_equal(g, np.flatnonzero(((pts >= a) & (pts <= b)).all(1)))
        centres = pts[::400]  # 50 balls, each covering all the data: every partition searched once per ball
        radius = float(np.sqrt(((pts.max(0) - pts.min(0)) ** 2).sum())) + 1.0
        before = served()
        hits = c.range_search(centres, np.full(len(centres), radius))
        assert served() - before == len(centres) * n_parts
        assert all(np.array_equal(h, np.arange(len(pts))) for h in hits), "every point exactly once per ball"
        before = served()
        d_all, i_all = c.distributed_knn_search(q[:3], len(pts))  # k = n: every partition, once per query
        assert served() - before == 3 * n_parts
        assert all(np.array_equal(np.sort(r), np.arange(len(pts))) for r in i_all), "every point exactly once"


def test_compressed_transfers_stay_exact(ray_local):
    pts = skewed_points(200_000, 2, seed=12)
    q = skewed_points(300, 2, seed=12, sample_seed=1)
    cfg = NodeConfig().with_node_count(2).with_compression(True).with_fault_tolerance(True).replace(
        cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        c.distribute_data(pts)
        st = c.statistics()
        assert st.compression_ratio > 1.1, st.compression_ratio
        assert st.raw_bytes_sent >= 2 * pts.nbytes  # two replicas of every point, counted before compression
        dist, ids = c.distributed_knn_search(q, 8)
        assert_knn_exact(pts, q, dist, ids, 8)
        c.add_nodes(1)  # partitions copied node to node, compressed
        dist, ids = c.distributed_knn_search(q, 8)
        assert_knn_exact(pts, q, dist, ids, 8)
        assert len(c.metadata.partitions_of(2)) > 0


@pytest.mark.parametrize("compress", [False, True])
def test_communication_totals_add_up(ray_local, compress):
    """Every party counts what it sends and receives (coordinator and nodes, node-to-node copies included):
    the bytes sent by all equal the bytes received by all."""
    pts = skewed_points(150_000, 2, seed=21)
    q = skewed_points(6_000, 2, seed=21, sample_seed=3)  # 96 KB of queries: above the codec's threshold
    cfg = NodeConfig().with_node_count(2).with_compression(compress).with_fault_tolerance(True).replace(
        cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        c.distribute_data(pts)
        dist, ids = c.distributed_knn_search(q, 6)
        assert_knn_exact(pts, q[:300], dist[:300], ids[:300], 6)
        c.range_search(q[:500], 0.01)
        c.distributed_kmeans(4, max_iterations=3, seed=1)
        c.add_nodes(1)  # partitions copied node to node
        c.distributed_knn_search(q, 3)
        st = c.statistics()
        coord = st.coordinator
        assert coord["bytes_sent"] > 0 and coord["bytes_received"] > 0
        assert sum(n.bytes_received for n in st.nodes) > coord["bytes_sent"], "node-to-node copies are counted"
        assert st.bytes_sent == st.bytes_received, (st.bytes_sent, st.bytes_received)
        if compress:
            assert st.raw_bytes_sent > 1.2 * st.bytes_sent, (st.raw_bytes_sent, st.bytes_sent)
            assert sum(n.raw_bytes_sent for n in st.nodes) > sum(n.bytes_sent for n in st.nodes)
        else:
            assert st.raw_bytes_sent == st.bytes_sent


def test_device_auto_runs_on_cpu_and_cuda_without_gpu_says_how_to_fix(ray_local):
    import ray as _ray

    pts = np.random.default_rng(4).random((5_000, 2))
    cfg = NodeConfig().with_node_count(2).with_device("auto").replace(cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        c.distribute_data(pts)
        d, _ = c.distributed_knn_search(pts[:20] + 1e-3, 3)
        np.testing.assert_allclose(d, cKDTree(pts).query(pts[:20] + 1e-3, 3)[0], rtol=0, atol=1e-12)
    if _ray.cluster_resources().get("GPU", 0) == 0:
        with pytest.raises(RuntimeError, match="with_device\\('auto'\\)"):
            DistributedSpatialCluster(NodeConfig().with_node_count(2).with_device("cuda"))
