"""Checkpoint and restore on a real local Ray runtime: round trip, corrupt and partial checkpoints, and partitions
lost on every replica coming back from the latest checkpoint."""

import os
import time

import numpy as np
import pytest
import ray

from distspatial import DistributedSpatialCluster, NodeConfig, PartitionLostError
from distspatial.control.checkpoint import CheckpointError
from distspatial.io.datasets import skewed_points

from .conftest import assert_knn_exact


def _cfg(n=3, **kw):
    return NodeConfig().with_node_count(n).replace(cpus_per_node=0.2, **kw)


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
        res = r.distributed_kmeans(4, 10, init=pts[:4], tol=0)
        assert float(((pts - res.centroids[res.labels]) ** 2).sum()) == pytest.approx(res.inertia, rel=1e-9)


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
        ray.kill(c._actors[1])
        dist, ids = c.distributed_knn_search(q, 5)  # fails over to the checkpoint
        assert_knn_exact(pts, q, dist, ids, 5)
        assert all(1 not in c.metadata.partitions[p].owners for p in lost)
    with DistributedSpatialCluster(_cfg(3, max_retries=1)) as c:  # the same without a checkpoint
        meta = c.distribute_data(pts)
        lost = meta.partitions_of(1)
        lost_ids = np.concatenate([ray.get(c._actors[1].export_partition.options(num_returns=2).remote(p)[1])
                                   for p in lost])
        ray.kill(c._actors[1])
        with pytest.raises(PartitionLostError) as err:
            c.distributed_knn_search(q, 5)
        assert sorted(err.value.partitions) == sorted(lost)
        # a partial answer only when asked for, flagged, and exact over the points still there
        (dist, ids), status = c.distributed_knn_search(q, 5, allow_partial=True)
        assert status.partial and list(status.missing_partitions) == sorted(lost)
        keep = np.setdiff1d(np.arange(len(pts)), lost_ids)
        assert_knn_exact(pts[keep], q, dist, np.searchsorted(keep, ids), 5)
        hits, status = c.range_search(q[0], 0.2, allow_partial=True)
        assert status.partial
        want = keep[((pts[keep] - q[0]) ** 2).sum(1) <= 0.04]
        np.testing.assert_array_equal(hits, want)
        with pytest.raises(PartitionLostError):
            c.box_search(np.zeros(2), np.ones(2))


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
    with pytest.raises(ValueError, match="go together"):
        NodeConfig(checkpoint_path=root)
