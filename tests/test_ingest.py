"""Live ingest, delete and update on a real local Ray runtime, checked against brute force / cKDTree."""

import threading
import time

import numpy as np
import pytest
from scipy.spatial import cKDTree

from distspatial import DistributedSpatialCluster, NodeConfig
from distspatial.io.datasets import skewed_points

from ._workers import start, wait_until
from .conftest import brute_knn


def _cfg(nodes=3, **kw):
    return NodeConfig().with_node_count(nodes).with_fault_tolerance(True).replace(cpus_per_node=0.2, **kw)


def test_ingest_then_query_is_exact_including_points_outside_the_bounds(ray_local):
    pts = skewed_points(30_000, 2, seed=41)
    with DistributedSpatialCluster(_cfg()) as c:
        c.distribute_data(pts)
        rng = np.random.default_rng(1)
        new = np.concatenate([rng.random((5_000, 2)), rng.random((300, 2)) * 4 - 1.5])  # some far outside [0, 1]
        ids = c.ingest(new)
        assert np.array_equal(ids, np.arange(30_000, 35_300))
        allp = np.concatenate([pts, new])
        assert c.metadata.n_points == len(allp)
        # the new points sit in curve runs next to the partitions' KD-trees (replication 2: held twice)
        nodes = c.statistics().nodes
        assert sum(n.delta_points for n in nodes) == 2 * len(new) and sum(n.runs for n in nodes) >= 1
        q = np.concatenate([rng.random((300, 2)), rng.random((100, 2)) * 4 - 1.5])
        d, i = c.distributed_knn_search(q, 6)
        np.testing.assert_allclose(d, brute_knn(allp, q, 6), rtol=0, atol=1e-12)
        own = np.sqrt(((allp[i] - q[:, None]) ** 2).sum(-1))
        np.testing.assert_allclose(own, d, rtol=0, atol=1e-12)
        tree = cKDTree(allp)
        for center in q[::40]:
            assert np.array_equal(c.range_search(center, 0.3), np.sort(tree.query_ball_point(center, 0.3)))
        lo, hi = np.array([-1.0, -1.0]), np.array([0.1, 2.0])
        inside = np.flatnonzero(((allp >= lo) & (allp <= hi)).all(1))
        assert np.array_equal(c.box_search(lo, hi), inside)
        # algorithms see the new points; labels follow point_ids() (ascending ids)
        assert np.array_equal(c.point_ids(), np.arange(len(allp)))
        res = c.distributed_kmeans(4, 30, init=allp[:4], tol=0)
        assert res.labels.shape == (len(allp),)
        assert float(((allp - res.centroids[res.labels]) ** 2).sum()) == pytest.approx(res.inertia, rel=1e-9)
        with pytest.raises(ValueError, match="columns"):
            c.ingest(np.zeros((3, 3)))
        with pytest.raises(ValueError, match=r"rows \[1\]"):
            c.ingest(np.array([[0.0, 0.0], [np.nan, 1.0]]))


def test_delete_and_update_moving_objects(ray_local):
    rng = np.random.default_rng(2)
    pts = rng.random((20_000, 3))
    ids = np.arange(20_000) * 3 + 100  # user ids
    with DistributedSpatialCluster(_cfg()) as c:
        c.distribute_data(pts, ids=ids)
        with pytest.raises(ValueError, match="pass ids"):
            c.ingest(rng.random((5, 3)))
        gone = rng.choice(ids, 3_000, replace=False)
        assert c.delete(gone) == 3_000
        assert c.delete(gone[:10]) == 0, "deleting twice finds nothing"
        keep = ~np.isin(ids, gone)
        cur_pts, cur_ids = pts[keep], ids[keep]
        moving = rng.choice(cur_ids, 2_000, replace=False)
        newpos = rng.random((2_000, 3)) + 0.5  # some leave the original bounds
        assert c.update(moving, newpos) == 2_000
        pos = {int(v): j for j, v in enumerate(cur_ids)}
        rows = np.array([pos[int(v)] for v in moving])
        cur_pts = cur_pts.copy()
        cur_pts[rows] = newpos
        q = rng.random((200, 3)) * 1.5
        d, i = c.distributed_knn_search(q, 5)
        tree = cKDTree(cur_pts)
        rd, ri = tree.query(q, 5)
        np.testing.assert_allclose(d, rd, rtol=0, atol=1e-12)
        assert np.array_equal(np.sort(i, axis=1), np.sort(cur_ids[ri], axis=1))
        assert c.metadata.n_points == len(cur_ids)
        assert np.array_equal(c.point_ids(), np.sort(cur_ids))


def test_queries_during_ingest_see_every_acknowledged_point(ray_local):
    pts = skewed_points(20_000, 2, seed=43)
    batches = [skewed_points(4_000, 2, seed=43, sample_seed=10 + b) for b in range(10)]
    q = skewed_points(300, 2, seed=43, sample_seed=99)
    with DistributedSpatialCluster(_cfg(nodes=2)) as c:
        c.distribute_data(pts)
        acked = [0]  # batches acknowledged so far
        go = threading.Event()  # set by the reader as it starts a query: the writer's next batch starts then
        ingest_spans, query_spans = [], []

        def writer():
            for b in batches:
                assert go.wait(60), "the reader stopped querying"
                go.clear()
                t0 = time.perf_counter()
                c.ingest(b)
                ingest_spans.append((t0, time.perf_counter()))
                acked[0] += 1

        t = start(writer)  # an exception in the writer fails the test (t.finish)
        while True:
            writing = t.is_alive()
            before = acked[0]
            go.set()
            t0 = time.perf_counter()
            d, i = c.distributed_knn_search(q, 4)
            query_spans.append((t0, time.perf_counter()))
            after = acked[0] + (1 if t.is_alive() else 0)  # a batch in flight may already be visible
            lo_set = np.concatenate([pts] + batches[:before])
            hi_set = np.concatenate([pts] + batches[:min(after, len(batches))])
            # exact for some set between "acknowledged before" and "acknowledged after": never misses an
            # acknowledged point, never invents one
            assert np.all(d <= brute_knn(lo_set, q, 4) + 1e-12)
            assert np.all(d >= brute_knn(hi_set, q, 4) - 1e-12)
            own = np.sqrt(((hi_set[i] - q[:, None]) ** 2).sum(-1))
            np.testing.assert_allclose(own, d, rtol=0, atol=1e-12)
            if not writing:
                break
        t.finish(timeout=120)
        assert acked[0] == len(batches)
        # the queries really ran while batches were being ingested (not all before or after the writer)
        overlapping = sum(any(qa < ib and ia < qb for ia, ib in ingest_spans) for qa, qb in query_spans)
        print(f"{overlapping} of {len(query_spans)} queries overlapped one of {len(ingest_spans)} ingests")
        assert overlapping >= len(batches) // 2, (overlapping, len(query_spans))
        allp = np.concatenate([pts] + batches)
        d, _ = c.distributed_knn_search(q, 4)
        np.testing.assert_allclose(d, brute_knn(allp, q, 4), rtol=0, atol=1e-12)


def test_hot_region_ingest_splits_grown_partitions_and_checkpoints(ray_local, tmp_path):
    rng = np.random.default_rng(5)
    pts = rng.random((16_000, 2))
    with DistributedSpatialCluster(_cfg(nodes=2)) as c:
        meta = c.distribute_data(pts)
        n0 = meta.n_partitions
        hot = np.full(2, 0.31) + rng.random((30_000, 2)) * 0.02  # a hot spot: one or two partitions grow
        for chunk in np.array_split(hot, 6):
            c.ingest(chunk)
        m2 = c.metadata
        assert m2.n_partitions > n0, "grown partitions were split"
        mean = m2.n_points / m2.n_partitions
        assert max(p.size for p in m2.partitions) <= c.tuning_policy.split_size_factor * mean * 1.5
        allp = np.concatenate([pts, hot])
        q = np.concatenate([hot[:200] + 1e-4, rng.random((100, 2))])
        d, _ = c.distributed_knn_search(q, 8)
        np.testing.assert_allclose(d, brute_knn(allp, q, 8), rtol=0, atol=1e-12)
        c.checkpoint(str(tmp_path / "ck"))
    with DistributedSpatialCluster.restore(str(tmp_path / "ck"), _cfg(nodes=2)) as r:
        d2, _ = r.distributed_knn_search(q, 8)
        np.testing.assert_allclose(d2, d, rtol=0, atol=1e-12)
        new_ids = r.ingest(rng.random((10, 2)))
        assert new_ids.min() == len(allp), "automatic ids continue after a restore"


def test_distribute_chunks_from_a_file_never_holding_it_whole(ray_local, tmp_path):
    from distspatial.io import write_results

    pts = skewed_points(60_000, 3, seed=44)
    path = tmp_path / "pts.parquet"
    write_results(str(path), {"x": pts[:, 0], "y": pts[:, 1], "z": pts[:, 2], "label": np.arange(len(pts)) % 7})
    with DistributedSpatialCluster(_cfg()) as c:
        meta = c.distribute_chunks(str(path), columns="x,y,z", chunk_rows=7_000, sample_size=5_000)
        assert meta.n_points == len(pts) and c.metadata.n_points == len(pts)
        sizes = [p.size for p in c.metadata.partitions]
        assert max(sizes) <= 3.5 * np.mean(sizes), f"sample-cut partitions stay balanced: {sizes}"
        q = skewed_points(300, 3, seed=44, sample_seed=8)
        d, i = c.distributed_knn_search(q, 5)
        np.testing.assert_allclose(d, brute_knn(pts, q, 5), rtol=0, atol=1e-12)
        own = np.sqrt(((pts[i] - q[:, None]) ** 2).sum(-1))
        np.testing.assert_allclose(own, d, rtol=0, atol=1e-12), "ids are the file's row numbers"
        res = c.distributed_kmeans(3, 10, init=pts[:3], tol=0)
        assert float(((pts - res.centroids[res.labels]) ** 2).sum()) == pytest.approx(res.inertia, rel=1e-9)
        # a callable source of (points, ids) chunks
        ids = np.arange(len(pts)) * 2 + 1
        c.distribute_chunks(lambda: ((pts[a:a + 10_000], ids[a:a + 10_000]) for a in range(0, len(pts), 10_000)))
        d2, i2 = c.distributed_knn_search(q, 5)
        np.testing.assert_allclose(d2, d, rtol=0, atol=1e-12)
        assert np.all(i2 % 2 == 1)
        res = c.distributed_kmeans(3, 10, init=pts[:3], tol=0)
        assert np.array_equal(c.point_ids(), ids) and res.labels.shape == (len(pts),)
        assert float(((pts - res.centroids[res.labels]) ** 2).sum()) == pytest.approx(res.inertia, rel=1e-9)
        with pytest.raises(TypeError, match="read twice"):
            c.distribute_chunks(iter([pts]))


def test_a_query_planned_before_a_split_is_planned_again(ray_local):
    """Nodes split a partition before the controller publishes the halves, and a client may hold the layout
    from before: its plan would miss the upper half, so the nodes refuse a plan older than the version they were
    told of, and the client plans again on the new layout (deterministic: the split lands between a client's
    view and its query)."""
    rng = np.random.default_rng(8)
    pts = rng.random((12_000, 2))
    with DistributedSpatialCluster(_cfg(nodes=2)) as c:
        meta = c.distribute_data(pts)
        big = max(meta.partitions, key=lambda p: p.size).partition_id
        q = pts[rng.choice(len(pts), 400, replace=False)] + 1e-6
        ref = brute_knn(pts, q, 6)
        rt = c.runtime
        stale = rt.view
        # the split goes straight to the controller: this client's cached view stays the one from before
        new_id = rt.call_controller("split_partition", big)
        assert rt.view is stale and stale.meta.n_partitions == new_id, "the client still plans on the old layout"
        replans = rt.replans
        d, _ = c.distributed_knn_search(q, 6)
        assert rt.replans == replans + 1, "a node refused the stale plan and the query was planned again"
        assert rt.view.meta.n_partitions == new_id + 1
        np.testing.assert_allclose(d, ref, rtol=0, atol=1e-12)
        # the upper half holds some true neighbours: a plan on the old layout could not have found them
        upper = set(np.concatenate([ids for _, parts in rt.partitions_call("partition_ids", partitions=[new_id])
                                    for _, ids in parts]).tolist())
        assert upper & set(cKDTree(pts).query(q, 6)[1].ravel().tolist())


def test_queries_stay_exact_while_partitions_split(ray_local):
    rng = np.random.default_rng(9)
    pts = rng.random((20_000, 2))
    with DistributedSpatialCluster(_cfg(nodes=2)) as c:
        c.distribute_data(pts)
        q = pts[rng.choice(len(pts), 300, replace=False)] + 1e-6
        ref = brute_knn(pts, q, 5)
        tree = cKDTree(pts)
        lo, hi = np.array([0.2, 0.3]), np.array([0.6, 0.5])
        in_box = np.flatnonzero(((pts >= lo) & (pts <= hi)).all(1))
        errors, done, n = [], threading.Event(), [0]

        def reader():
            while not done.is_set():
                d, _ = c.distributed_knn_search(q, 5)
                if not np.allclose(d, ref, rtol=0, atol=1e-12):
                    errors.append("knn")
                if not np.array_equal(c.range_search(q[0], 0.05), np.sort(tree.query_ball_point(q[0], 0.05))):
                    errors.append("range")
                if not np.array_equal(c.box_search(lo, hi), in_box):
                    errors.append("box")
                n[0] += 1

        th = start(reader)  # a query that raises fails the test (th.finish), not only a wrong answer
        try:
            wait_until(lambda: n[0] >= 1, 60, "the reader's first round", workers=(th,))
            for _ in range(12):
                c.split_partition(max(c.metadata.partitions, key=lambda p: p.size).partition_id)
                seen = n[0]
                # every layout is queried: the reader finishes a round that began after this split was published
                wait_until(lambda: n[0] >= seen + 2, 60, "a reader round on the new layout", workers=(th,))
        finally:
            done.set()
            th.finish(timeout=60)
        assert c.metadata.n_partitions >= 12 and n[0] >= 25
        assert not errors, errors[:5]
