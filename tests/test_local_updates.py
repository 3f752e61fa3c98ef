"""LocalPartition under appends, deletes and background merges, checked against brute force (no Ray)."""

import numpy as np
import pytest

from distspatial.kernels.local_index import LocalPartition


def _brute(points, ids, queries, k):
    d = np.sqrt(((queries[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), ids[order]


def _check(part, pts, ids, rng, k=5):
    q = rng.random((40, pts.shape[1]))
    d, i = part.knn(q, k)
    rd, _ = _brute(pts, ids, q, k)
    np.testing.assert_allclose(d, rd, rtol=0, atol=1e-12)
    assert set(np.asarray(part.ids).tolist()) == set(ids.tolist()) and part.size == len(ids)
    # the ids returned are live and at the distances claimed
    pos = {int(v): j for j, v in enumerate(ids)}
    got = pts[[pos[int(v)] for v in i.ravel()]].reshape(len(q), k, -1)
    np.testing.assert_allclose(np.sqrt(((got - q[:, None]) ** 2).sum(-1)), d, rtol=0, atol=1e-12)
    r = np.full(len(q), 0.15)
    for c, hits in zip(q, part.radius(q, r)):
        want = np.sort(ids[np.sqrt(((pts - c) ** 2).sum(1)) <= 0.15])
        assert np.array_equal(np.sort(part.ids[hits]), want)
    lo, hi = np.full(pts.shape[1], 0.2), np.full(pts.shape[1], 0.6)
    want = np.sort(ids[((pts >= lo) & (pts <= hi)).all(1)])
    assert np.array_equal(np.sort(part.ids[part.box(lo, hi)]), want)
    # bounded kNN keeps only candidates within each query's bound
    bound = rd[:, 2]
    d2, i2 = part.knn(q, k, bound)
    assert np.all((d2 <= bound[:, None]) | np.isinf(d2))
    np.testing.assert_allclose(d2[:, :3], rd[:, :3], rtol=0, atol=1e-12)


@pytest.mark.parametrize("d", [2, 3])
def test_appends_and_deletes_stay_exact_through_merges(d, monkeypatch):
    monkeypatch.setattr(LocalPartition, "MIN_DELTA", 300)  # force background base rebuilds in a small test
    monkeypatch.setattr(LocalPartition, "IDLE_S", 0.0)  # ... without waiting for a pause in the appends
    rng = np.random.default_rng(d)
    pts = rng.random((2_000, d))
    ids = np.arange(2_000)
    part = LocalPartition(pts, ids)
    next_id = 2_000
    for step in range(12):
        new = rng.random((int(rng.integers(50, 400)), d))
        new_ids = np.arange(next_id, next_id + len(new))
        next_id += len(new)
        part.append(new, new_ids)
        pts, ids = np.concatenate([pts, new]), np.concatenate([ids, new_ids])
        gone = rng.choice(ids, size=int(rng.integers(0, 150)), replace=False)
        assert part.delete(gone) == len(gone)
        keep = ~np.isin(ids, gone)
        pts, ids = pts[keep], ids[keep]
        # move some objects: delete and re-insert under the same id
        moved = rng.choice(ids, size=30, replace=False)
        part.delete(moved)
        newpos = rng.random((30, d))
        part.append(newpos, moved)
        keep = ~np.isin(ids, moved)
        pts, ids = np.concatenate([pts[keep], newpos]), np.concatenate([ids[keep], moved])
        _check(part, pts, ids, rng)
        assert part.n_runs <= 1 + int(np.log(max(2, part.delta_size)) / np.log(LocalPartition.FANOUT)) + 2
    assert part.merges >= 1, "the delta was merged into the base at least once"
    part.flush()
    assert part.delta_size == 0
    _check(part, pts, ids, rng)
    assert part.delete(np.array([10**9])) == 0


def test_empty_partition_gains_points():
    part = LocalPartition(np.empty((0, 2)), np.empty(0, dtype=np.int64))
    d, i = part.knn(np.zeros((1, 2)), 2)
    assert np.all(np.isinf(d)) and np.all(i == -1)
    part.append(np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([7, 8]))
    d, i = part.knn(np.zeros((1, 2)), 3)
    assert i.tolist() == [[7, 8, -1]] and d[0, :2].tolist() == [1.0, 2.0]
    part.delete(np.array([7]))
    assert part.knn(np.zeros((1, 2)), 1)[1].tolist() == [[8]]
