"""Shared test fixtures: one real local Ray runtime per test module (ray.init costs seconds)."""

from __future__ import annotations

import contextlib

import os

import numpy as np

# Every Ray runtime of the test session (embedded ones, `ray start --head` ones joined by subprocesses) runs
# without token authentication: Ray reads the mode once per process, and a process that joined a runtime of one
# mode cannot start one of the other (seen as "Failed to start GCS" in the modules after a `ray start` module).
os.environ["RAY_AUTH_MODE"] = "disabled"
import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray runtime for the module; DistributedSpatialCluster attaches to it and never stops it."""
    import ray

    import time

    if ray.is_initialized():
        ray.shutdown()
    for attempt in range(3):  # a runtime torn down just before may still hold ports for a moment
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
                     object_store_memory=300 * 1024 * 1024)
            break
        except Exception:
            if ray.is_initialized():
                ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(3)
    yield ray
    ray.shutdown()


def brute_knn(points: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Sorted k smallest Euclidean distances per query, by brute force with numpy."""
    out = np.empty((len(queries), k))
    step = max(1, 20_000_000 // max(1, points.size))  # bounded memory: a few hundred MB per block at most
    for a in range(0, len(queries), step):
        q = queries[a:a + step]
        d2 = ((q[:, None, :] - points[None, :, :]) ** 2).sum(axis=2)
        out[a:a + step] = np.sqrt(np.sort(np.partition(d2, k - 1, axis=1)[:, :k], axis=1))
    return out


def assert_knn_exact(points, queries, dist, ids, k, ids_map=None):
    """Distances equal the reference; every returned id is a real point at the reported distance; no repeats."""
    ref = brute_knn(points, queries, k)
    np.testing.assert_allclose(dist, ref, rtol=0, atol=1e-12)
    rows = ids if ids_map is None else ids_map(ids)
    own = np.sqrt(((points[rows] - queries[:, None, :]) ** 2).sum(axis=2))
    np.testing.assert_allclose(own, dist, rtol=0, atol=1e-12)
    srt = np.sort(ids, axis=1)
    assert not (srt[:, 1:] == srt[:, :-1]).any(), "an id appears twice in one answer"


def assert_knn_ids_match(points, queries, dist, ids, k, row_ids=None, self_rows=None, min_separated=0.99,
                         eps=1e-9):
    """kNN answers equal scipy's cKDTree over ``points``: distances everywhere; ids wherever the reference
    distance at that rank is separated by more than ``eps`` from the ranks before and after it (k + 1 are
    looked up), so ties may come back in any order. Elsewhere each id is a real point at the reported distance.

    ``row_ids``: the id of each row of ``points`` (user ids); default: the row number. ``self_rows``: query i is
    the point ``self_rows[i]`` (a self-join), which the reference excludes as the library does. Returns the
    fraction of compared (separated) positions, at least ``min_separated``.
    """
    from scipy.spatial import cKDTree

    dist, ids = np.asarray(dist), np.asarray(ids)
    m = len(queries)
    assert dist.shape == (m, k) and ids.shape == (m, k), (dist.shape, ids.shape, (m, k))
    extra = 1 if self_rows is None else 2
    rd, ri = cKDTree(points).query(queries, k + extra)
    rd, ri = rd.reshape(m, k + extra), ri.reshape(m, k + extra)
    if self_rows is not None:  # drop the query point itself (or the last, if duplicates crowd it out)
        hit = ri == np.asarray(self_rows)[:, None]
        pos = np.where(hit.any(axis=1), hit.argmax(axis=1), k + 1)
        keep = np.arange(k + 2)[None, :] != pos[:, None]
        rd, ri = rd[keep].reshape(m, k + 1), ri[keep].reshape(m, k + 1)
    np.testing.assert_allclose(dist, rd[:, :k], rtol=0, atol=1e-12)
    gaps = np.diff(rd, axis=1)  # (m, k): rank j to rank j + 1
    sep = gaps > eps
    sep[:, 1:] &= gaps[:, :-1] > eps
    want = ri[:, :k] if row_ids is None else np.asarray(row_ids)[ri[:, :k]]
    bad = np.argwhere(sep & (ids != want))
    assert len(bad) == 0, (f"{len(bad)} ids differ from cKDTree's at separated distances, first at (query, rank) "
                           f"{tuple(bad[0])}: got {ids[tuple(bad[0])]}, want {want[tuple(bad[0])]}")
    if row_ids is None:
        rows = ids
    else:
        order = np.argsort(row_ids)
        at = np.clip(np.searchsorted(np.asarray(row_ids)[order], ids), 0, len(order) - 1)
        assert np.array_equal(np.asarray(row_ids)[order][at], ids), "an id that is not in the data set"
        rows = order[at]
    own = np.sqrt(((points[rows] - queries[:, None, :]) ** 2).sum(axis=2))
    np.testing.assert_allclose(own, dist, rtol=0, atol=1e-12)
    srt = np.sort(ids, axis=1)
    assert not (srt[:, 1:] == srt[:, :-1]).any(), "an id appears twice in one answer"
    if self_rows is not None:
        self_ids = np.asarray(self_rows) if row_ids is None else np.asarray(row_ids)[self_rows]
        assert not (ids == self_ids[:, None]).any(), "a point is its own neighbour in a self-join"
    frac = float(sep.mean())
    assert frac >= min_separated, f"only {frac:.3f} of the positions are separated: too many ties to compare ids"
    return frac


@contextlib.contextmanager
def raylet_cluster(n_workers: int = 2, num_cpus: int = 1, store_bytes: int = 150 * 1024**2):
    """Several real raylets on this machine (``ray.cluster_utils.Cluster``: a head and ``n_workers`` more), the
    driver connected to it; yields ``(cluster, worker nodes)`` and tears everything down after."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": num_cpus, "object_store_memory": store_bytes})
    workers = [c.add_node(num_cpus=num_cpus, object_store_memory=store_bytes) for _ in range(n_workers)]
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="ERROR")
    try:
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()
