"""Checkpoint and restore on a real local Ray runtime: round trip, corrupt and partial checkpoints, and partitions
lost on every replica coming back from the latest checkpoint."""

import os
import time

import numpy as np
import pytest
import ray
from scipy.spatial import cKDTree

from distspatial import DistributedSpatialCluster, NodeConfig, PartitionLostError
from distspatial.io.checkpoint_files import CheckpointError
from distspatial.io.datasets import skewed_points

from .conftest import assert_knn_exact, assert_knn_ids_match


def _cfg(n=3, **kw):
    return NodeConfig().with_node_count(n).replace(cpus_per_node=0.2, **kw)


def assert_answers_exact(c, pts, ids=None, seed=0, k=5):
    """kNN (distances and ids), batched range and box answers of cluster ``c`` equal cKDTree's / numpy's over
    ``pts`` (``ids``: the id of each row; default the row number); returns the kNN answer."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    n, d = pts.shape
    uid = np.arange(n) if ids is None else np.asarray(ids)
    near = pts[rng.choice(n, 150, replace=False)] + rng.normal(0, 1e-3, (150, d))
    q = np.concatenate([near, rng.random((50, d))])
    dist, got = c.distributed_knn_search(q, k)
    assert_knn_ids_match(pts, q, dist, got, k, row_ids=ids)
    r = 0.04
    want = cKDTree(pts).query_ball_point(q[::4], r)
    hits = c.range_search(q[::4], r)
    assert sum(len(w) for w in want) > 100, "the range queries must find something"
    for j, (h, w) in enumerate(zip(hits, want)):
        np.testing.assert_array_equal(h, np.sort(uid[w]), err_msg=f"range query {j}")
    lo, hi = q[::5] - 0.03, q[::5] + 0.06
    boxes = c.box_search(lo, hi)
    for j in range(len(lo)):
        inside = ((pts >= lo[j]) & (pts <= hi[j])).all(axis=1)
        np.testing.assert_array_equal(boxes[j], np.sort(uid[inside]), err_msg=f"box query {j}")
    return dist, got


def test_round_trip_with_user_ids_and_other_node_count(ray_local, tmp_path):
    rng = np.random.default_rng(1)
    pts = skewed_points(30_000, 3, n_hotspots=6, seed=41)
    user_ids = rng.choice(10**12, size=len(pts), replace=False)
    with DistributedSpatialCluster(_cfg(3)) as c:
        meta = c.distribute_data(pts, ids=user_ids)
        ckpt = c.checkpoint(str(tmp_path / "ck"))
        assert os.path.isfile(os.path.join(ckpt, "MANIFEST.json"))
        q = skewed_points(200, 3, n_hotspots=6, seed=41, sample_seed=2)
        before = c.distributed_knn_search(q, 7)
    with DistributedSpatialCluster.restore(str(tmp_path / "ck"), _cfg(2)) as r:
        assert r.n_points == len(pts) and r.metadata.n_partitions == meta.n_partitions
        after = r.distributed_knn_search(q, 7)
        np.testing.assert_array_equal(after[0], before[0])
        np.testing.assert_array_equal(after[1], before[1])
        pos = {v: i for i, v in enumerate(user_ids)}
        assert_knn_exact(pts, q, after[0], after[1], 7, ids_map=lambda a: np.vectorize(pos.get)(a))
        assert_knn_ids_match(pts, q, after[0], after[1], 7, row_ids=user_ids)
        assert_answers_exact(r, pts, user_ids, seed=1)
        from sklearn.cluster import KMeans

        res = r.distributed_kmeans(4, 10, init=pts[:4], tol=0)
        ref = KMeans(4, init=pts[:4], n_init=1, algorithm="lloyd", max_iter=10, tol=0).fit(pts)
        assert res.n_iter == ref.n_iter_
        np.testing.assert_allclose(res.centroids, ref.cluster_centers_, rtol=1e-7, atol=1e-9)
        assert (res.labels == ref.labels_).mean() > 0.999  # skewed data: a few points may sit on a tie


def test_corrupt_and_partial_checkpoints_leave_the_previous_one_usable(ray_local, tmp_path):
    pts = skewed_points(8_000, 2, seed=42)
    root = str(tmp_path / "ck")
    with DistributedSpatialCluster(_cfg(2)) as c:
        c.distribute_data(pts)
        first = c.checkpoint(root)
        c.distribute_data(pts[:5_000])
        second = c.checkpoint(root)
    # a crash in the middle of a third checkpoint: files without a manifest; LATEST still names the second
    os.makedirs(os.path.join(root, "ckpt-crashed"))
    open(os.path.join(root, "ckpt-crashed", "part-00000.dsz"), "wb").write(b"partial")
    with DistributedSpatialCluster.restore(root, _cfg(2)) as r:
        assert r.n_points == 5_000
        assert_answers_exact(r, pts[:5_000], seed=2)
    # corrupt one partition file of the latest checkpoint: a clear error naming it
    victim = os.path.join(second, "part-00001.dsz")
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch in .*part-00001"):
        DistributedSpatialCluster.restore(root, _cfg(2))
    # ... and the previous checkpoint is still there and good
    with DistributedSpatialCluster.restore(first, _cfg(2)) as r:
        assert r.n_points == 8_000
        d, i = r.distributed_knn_search(pts[:20], 3)
        assert np.all(d[:, 0] == 0)
        assert_answers_exact(r, pts, seed=3)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        DistributedSpatialCluster.restore(str(tmp_path / "nothing"), _cfg(1))
    os.remove(os.path.join(first, "MANIFEST.json"))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        DistributedSpatialCluster.restore(first, _cfg(1))


def test_partition_lost_on_every_replica_comes_back_from_checkpoint(ray_local, tmp_path):
    pts = skewed_points(12_000, 2, seed=43)
    q = skewed_points(300, 2, seed=43, sample_seed=5)
    with DistributedSpatialCluster(_cfg(3, max_retries=1)) as c:  # one replica: a dead node loses partitions
        meta = c.distribute_data(pts)
        c.checkpoint(str(tmp_path / "ck"))
        lost = meta.partitions_of(1)
        ray.kill(c.runtime.actors[1])
        dist, ids = c.distributed_knn_search(q, 5)  # fails over to the checkpoint
        assert_knn_exact(pts, q, dist, ids, 5)
        assert_knn_ids_match(pts, q, dist, ids, 5)
        assert all(1 not in c.metadata.partitions[p].owners for p in lost)
        assert c.n_points == len(pts)
        assert_answers_exact(c, pts, seed=4)  # range and box answers too, from the reloaded partitions
    with DistributedSpatialCluster(_cfg(3, max_retries=1)) as c:  # the same without a checkpoint
        meta = c.distribute_data(pts)
        lost = meta.partitions_of(1)
        lost_ids = np.concatenate([ray.get(c.runtime.actors[1].export_partition.options(num_returns=2).remote(p)[1])
                                   for p in lost])
        ray.kill(c.runtime.actors[1])
        with pytest.raises(PartitionLostError) as err:
            c.distributed_knn_search(q, 5)
        assert sorted(err.value.partitions) == sorted(lost)
        # single queries (the one-hop path): exact over all the points, or PartitionLostError; those whose home
        # partition is lost always raise
        tree = cKDTree(pts)
        home_lost = np.isin(np.arange(len(pts)), lost_ids)
        raised = 0
        for x in np.concatenate([q[:30], pts[lost_ids[:10]]]):
            try:
                d1, i1 = c.distributed_knn_search(x, 5)
            except PartitionLostError:
                raised += 1
                continue
            np.testing.assert_allclose(d1, tree.query(x, 5)[0], rtol=0, atol=1e-12)
            assert not home_lost[tree.query(x, 1)[1]], "a query inside a lost partition got an answer"
        assert raised >= 10
        # a partial answer only when asked for, flagged, and exact over the points still there
        (dist, ids), status = c.distributed_knn_search(q, 5, allow_partial=True)
        assert status.partial and list(status.missing_partitions) == sorted(lost)
        keep = np.setdiff1d(np.arange(len(pts)), lost_ids)
        assert_knn_exact(pts[keep], q, dist, np.searchsorted(keep, ids), 5)
        assert_knn_ids_match(pts[keep], q, dist, ids, 5, row_ids=keep)
        hits, status = c.range_search(q[0], 0.2, allow_partial=True)
        assert status.partial
        want = keep[((pts[keep] - q[0]) ** 2).sum(1) <= 0.04]
        np.testing.assert_array_equal(hits, want)
        # batches: every query answered over the points still there, its home partition lost or not
        found, status = c.range_search(q[:80], 0.05, allow_partial=True)
        assert status.partial and list(status.missing_partitions) == sorted(lost)
        near = ((pts[keep][None, :, :] - q[:80, None, :]) ** 2).sum(axis=2) <= 0.05 ** 2
        for i, got in enumerate(found):
            np.testing.assert_array_equal(got, keep[near[i]])
        boxes, status = c.box_search(q[:80] - 0.03, q[:80] + 0.03, allow_partial=True)
        inside = np.all(np.abs(pts[keep][None, :, :] - q[:80, None, :]) <= 0.03, axis=2)
        for i, got in enumerate(boxes):
            np.testing.assert_array_equal(got, keep[inside[i]])
        with pytest.raises(PartitionLostError):
            c.box_search(np.zeros(2), np.ones(2))


def test_partition_lost_after_changes_since_the_checkpoint_never_gives_stale_answers(ray_local, tmp_path):
    """Points ingested or moved after the last checkpoint are not in it: when a partition is lost on every
    replica, a query either fails (PartitionLostError, or a partial answer flagged as such) or is exact over
    the points as they are now; never a silent answer from the older checkpoint."""
    rng = np.random.default_rng(46)
    pts = rng.random((12_000, 2))
    with DistributedSpatialCluster(_cfg(3, max_retries=1)) as c:  # one replica: a dead node loses partitions
        c.distribute_data(pts)
        c.checkpoint(str(tmp_path / "ck"))
        new = rng.random((3_000, 2))
        c.ingest(new)
        allp = np.concatenate([pts, new])
        moved = rng.choice(len(allp), 500, replace=False)
        allp[moved] = rng.random((len(moved), 2))
        assert c.update(moved, allp[moved]) == len(moved)
        assert_answers_exact(c, allp, seed=8)
        lost = c.metadata.partitions_of(1)
        assert lost
        ray.kill(c.runtime.actors[1])
        deadline = time.monotonic() + 12  # recovery reloads lost partitions within a few seconds
        answered = 0
        while time.monotonic() < deadline and answered < 2:
            try:
                assert_answers_exact(c, allp, seed=9 + answered)  # raises PartitionLostError or checks the answer
                answered += 1
            except PartitionLostError:
                time.sleep(0.5)
        (dist, ids), status = c.distributed_knn_search(allp[:200] + 1e-4, 5, allow_partial=True)
        if not status.partial:
            assert_knn_ids_match(allp, allp[:200] + 1e-4, dist, ids, 5)


def _latest(root):
    try:
        return open(os.path.join(root, "LATEST")).read()
    except FileNotFoundError:
        return None


def _settled_checkpoint(root, before, interval, timeout=15.0):
    """Wait for ``LATEST`` to name a checkpoint other than ``before``, then until no newer one follows for a few
    intervals (a checkpoint that raced a change is followed by another); gives up after ``timeout``."""
    deadline = time.monotonic() + timeout
    while _latest(root) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = _latest(root)
    while time.monotonic() < deadline:
        time.sleep(4 * interval)
        now = _latest(root)
        if now == seen:
            break
        seen = now
    return seen


def test_periodic_checkpoints(ray_local, tmp_path):
    pts = skewed_points(5_000, 2, seed=44)
    root = str(tmp_path / "periodic")
    cfg = _cfg(2).with_periodic_checkpoints(root, 0.3)
    with DistributedSpatialCluster(cfg) as c:
        c.distribute_data(pts)
        deadline = time.monotonic() + 20
        while not os.path.exists(os.path.join(root, "LATEST")) and time.monotonic() < deadline:
            time.sleep(0.1)
    with DistributedSpatialCluster.restore(root, _cfg(1)) as r:
        assert r.n_points == len(pts)
        assert_answers_exact(r, pts, seed=5)
    with pytest.raises(ValueError, match="go together"):
        NodeConfig(checkpoint_path=root)


def test_periodic_checkpoints_follow_live_changes(ray_local, tmp_path):
    """A periodic checkpoint taken after ingest / update restores the data as it is now: answers over the points
    at their current positions, not at those of an older checkpoint."""
    rng = np.random.default_rng(45)
    pts = rng.random((6_000, 2))
    root = str(tmp_path / "periodic")
    interval = 0.3
    with DistributedSpatialCluster(_cfg(2).with_periodic_checkpoints(root, interval)) as c:
        c.distribute_data(pts)
        first = _settled_checkpoint(root, None, interval)
        assert first is not None
        new = rng.random((2_000, 2))
        assert np.array_equal(c.ingest(new), np.arange(6_000, 8_000))
        allp = np.concatenate([pts, new])
        second = _settled_checkpoint(root, first, interval)
        with DistributedSpatialCluster.restore(root, _cfg(1)) as r:
            assert r.n_points == len(allp)
            assert_answers_exact(r, allp, seed=6)
        # moving objects: the point count stays the same, the positions change
        moved = rng.choice(len(allp), 1_500, replace=False)
        allp[moved] = rng.random((len(moved), 2))
        assert c.update(moved, allp[moved]) == len(moved)
        assert_answers_exact(c, allp, seed=7)  # the live cluster has them
        _settled_checkpoint(root, second, interval, timeout=6.0)
    with DistributedSpatialCluster.restore(root, _cfg(1)) as r:
        assert r.n_points == len(allp)
        assert_answers_exact(r, allp, seed=7)
