"""Stream processing on a real local Ray runtime: ingest, windows, streaming k-means, backpressure."""

import asyncio

import numpy as np
import pytest

from distspatial import DistributedSpatialCluster, NodeConfig
from distspatial.live.streaming import StreamingKMeans
from distspatial.live.windows import GridCounts, WindowedAggregator, WindowSpec

from .conftest import brute_knn


@pytest.fixture(scope="module")
def cluster(ray_local):
    cfg = NodeConfig().with_node_count(2).with_fault_tolerance(True).replace(cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        yield c


def _feed(n_batches=12, size=2_000, seed=0, d=2):
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n_batches):
        centres = np.array([[0.2, 0.3], [0.7, 0.8], [0.8, 0.2]])[:, :d]
        pts = centres[rng.integers(0, 3, size)] + rng.normal(0, 0.05, (size, d))
        ts = b * 5.0 + rng.random(size) * 5.0  # 5 s of events per batch, slightly out of order within it
        out.append((pts, ts))
    return out


def test_stream_ingests_and_windows_match_a_numpy_reference(cluster):
    base = np.random.default_rng(1).random((10_000, 2))
    cluster.distribute_data(base)
    feed = _feed()
    grid = GridCounts([0, 0], [1, 1], shape=(8, 8))
    agg = WindowedAggregator(WindowSpec.tumbling(20.0), grid)
    seen = []
    handle = cluster.stream(iter(feed), agg, on_event=seen.append)
    st = handle.stats
    assert st.batches == len(feed) and st.points == sum(len(p) for p, _ in feed) and st.points_per_s > 0
    # every point is in the index, queries exact
    allp = np.concatenate([base] + [p for p, _ in feed])
    q = np.random.default_rng(2).random((100, 2))
    d, _ = cluster.distributed_knn_search(q, 5)
    np.testing.assert_allclose(d, brute_knn(allp, q, 5), rtol=0, atol=1e-12)
    # windows against numpy: counts per 20 s window on an 8x8 grid
    pts = np.concatenate([p for p, _ in feed])
    ts = np.concatenate([t for _, t in feed])
    assert [r.start for r in seen] == [0.0, 20.0, 40.0]
    for r in seen:
        sel = (ts >= r.start) & (ts < r.end)
        inside = sel & (pts >= 0).all(1) & (pts <= 1).all(1)
        ref, _, _ = np.histogram2d(pts[inside, 0], pts[inside, 1], bins=8, range=[[0, 1], [0, 1]])
        assert r.count == sel.sum()
        np.testing.assert_array_equal(r["grid"].counts, ref.astype(np.int64))
        assert r["grid"].overflow == sel.sum() - inside.sum()
    assert handle.drain() == seen, "the handle delivers the same events"


def test_streaming_kmeans_on_the_nodes_equals_a_numpy_minibatch_reference(cluster):
    cluster.distribute_data(np.random.default_rng(3).random((5_000, 2)))
    feed = _feed(n_batches=8, seed=4)
    init = np.array([[0.1, 0.1], [0.5, 0.5], [0.9, 0.9]])
    skm = StreamingKMeans(3, decay=0.8, init=init)
    cluster.stream(feed, kmeans=skm)
    c, w = init.copy(), np.zeros(3)
    for pts, _ in feed:  # the same rule, computed here from the raw points
        lab = np.argmin(((pts[:, None] - c[None]) ** 2).sum(-1), axis=1)
        cnt = np.bincount(lab, minlength=3)
        sums = np.stack([np.bincount(lab, pts[:, j], minlength=3) for j in range(2)], 1)
        old = 0.8 * w
        w = old + cnt
        got = cnt > 0
        c[got] = (old[got, None] * c[got] + sums[got]) / w[got, None]
    np.testing.assert_allclose(skm.centroids, c, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(skm.weights, w)
    assert skm.batches == 8
    # the centroids find the three blobs
    truth = np.array([[0.2, 0.3], [0.7, 0.8], [0.8, 0.2]])
    assert np.abs(np.sort(skm.centroids, 0) - np.sort(truth, 0)).max() < 0.05
    with pytest.raises(ValueError, match="decay"):
        StreamingKMeans(3, decay=1.5)


def test_async_source_backpressure_background_and_moving_objects(cluster):
    cluster.distribute_data(np.random.default_rng(5).random((4_000, 2)), ids=np.arange(4_000))
    produced, lag = [0], []
    objects = np.arange(100_000, 100_500)
    rng = np.random.default_rng(6)
    positions = {}

    async def source():
        for b in range(15):
            pts = rng.random((500, 2))
            positions[b] = pts
            produced[0] += 1
            lag.append(produced[0] - handle_stats().batches)
            await asyncio.sleep(0)
            yield {"points": pts, "timestamps": np.full(500, float(b)), "ids": objects}

    handle = None

    def handle_stats():
        return handle.stats if handle is not None else type("S", (), {"batches": 0})()

    handle = cluster.stream(source(), update=True, max_in_flight=2, background=True)
    st = handle.join(timeout=120)
    assert st.batches == 15 and handle.done
    assert max(lag) <= 2 + 2, f"the reader ran ahead of the cluster by {max(lag)} batches"
    # moving objects: only their latest positions are in the index
    assert cluster.metadata.n_points == 4_000 + 500
    hits = cluster.box_search(np.zeros(2), np.ones(2))
    assert np.isin(objects, hits).all() and len(hits) == 4_500
    q = positions[14][:50]
    d, i = cluster.distributed_knn_search(q, 1)
    assert np.all(d[:, 0] == 0) and np.array_equal(i[:, 0], objects[:50])


def test_stream_errors_are_reported(cluster):
    cluster.distribute_data(np.random.default_rng(7).random((1_000, 2)))

    def bad():
        yield (np.random.random((10, 2)), np.zeros(10))
        raise RuntimeError("the feed broke")

    with pytest.raises(RuntimeError, match="the feed broke"):
        cluster.stream(bad())
    with pytest.raises(TypeError, match="stream batch"):
        cluster.stream(["not a batch"])


def test_geofences_and_knn_watches_on_a_live_stream(cluster):
    from distspatial.live.continuous import GeofenceMonitor, KnnWatch

    rng = np.random.default_rng(9)
    base = rng.random((3_000, 2))
    cluster.distribute_data(base)
    objects = np.arange(50_000, 50_200)
    fences = GeofenceMonitor()
    fences.add_box("centre", [0.4, 0.4], [0.6, 0.6])
    watch = KnnWatch()
    qpts = rng.random((5, 2))
    for j, p in enumerate(qpts):
        watch.add_query(j, p, 3)
    feed, inside_prev, expected = [], np.zeros(len(objects), bool), []
    for b in range(10):
        pos = rng.random((len(objects), 2))
        feed.append({"points": pos, "timestamps": np.full(len(objects), float(b)), "ids": objects})
        inside = ((pos >= 0.4) & (pos <= 0.6)).all(1)
        expected += [("enter", int(o)) for o in objects[inside & ~inside_prev]]
        expected += [("leave", int(o)) for o in objects[~inside & inside_prev]]
        inside_prev = inside
    events = []
    cluster.stream(feed, fences, watch, update=True, on_event=events.append)
    geo = sorted((e.kind, int(e.object_id)) for e in events if hasattr(e, "fence_id"))
    assert geo == sorted(expected)
    changes = [e for e in events if hasattr(e, "new_ids")]
    assert len(changes) >= 5, "every query reported its first answer, and some changed"
    current = np.concatenate([base, feed[-1]["points"]])
    current_ids = np.concatenate([np.arange(3_000), objects])
    for j, p in enumerate(qpts):
        d = np.sqrt(((current - p) ** 2).sum(1))
        want = set(current_ids[np.argsort(d)[:3]].tolist())
        last = [e for e in changes if e.query_id == j][-1]
        assert set(np.asarray(last.new_ids).tolist()) == want, "the last reported answer is the exact current one"
