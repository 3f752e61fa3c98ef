"""Shared test fixtures: one real local Ray runtime per test module (ray.init costs seconds)."""

from __future__ import annotations

import numpy as np
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
            ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
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
