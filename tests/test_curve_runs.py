"""Curve runs (the delta structure of a partition) against brute force and cKDTree; no Ray."""

import threading
import time

import numpy as np
import pytest
from scipy.spatial import cKDTree

from distspatial.kernels.curve_runs import BLOCK, GROUP, CurveRun, morton_frame
from distspatial.kernels.local_index import LocalPartition


def _data(n, d, seed, dup=False):
    rng = np.random.default_rng(seed)
    pts = rng.random((n, d))
    if dup:  # many exact duplicates and points on a lattice (distance ties)
        pts[: n // 2] = np.round(pts[: n // 2] * 4) / 4
    return pts


@pytest.mark.parametrize("d", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [1, 31, BLOCK * GROUP + 7, 3 * BLOCK * GROUP * GROUP + 5])
def test_knn_radius_box_match_brute_force(d, n):
    rng = np.random.default_rng(n + d)
    pts = _data(n, d, n, dup=True)
    ids = rng.permutation(n) + 100
    run = CurveRun.build(pts, ids, morton_frame(pts))
    assert np.all(run.keys[1:] >= run.keys[:-1])
    assert sorted(run.ids.tolist()) == sorted(ids.tolist())
    q = np.concatenate([rng.random((60, d)), rng.random((5, d)) * 10 - 5, pts[:5]])  # inside, far away, on points
    k = min(12, n + 3)
    dist, rows = run.knn(q, k)
    full = np.sqrt(((q[:, None, :] - pts[None]) ** 2).sum(-1))
    ref = np.sort(full, axis=1)[:, :k]
    if k > n:
        ref = np.concatenate([ref, np.full((len(q), k - n), np.inf)], axis=1)
    np.testing.assert_allclose(dist, ref, rtol=0, atol=1e-12)
    if d <= 3:  # same additions in the same order as numpy's: equal to the last bit
        np.testing.assert_array_equal(dist, ref)
    got = np.where(rows >= 0, rows, 0)
    dist_of_rows = np.sqrt(((run.points[got] - q[:, None]) ** 2).sum(-1))
    np.testing.assert_allclose(np.where(rows >= 0, dist_of_rows, np.inf), dist, rtol=0, atol=1e-12)
    # bounded: only neighbours with distance <= the bound, the bound itself included (ties)
    bound = ref[:, min(2, k - 1)]
    dist_b, rowsb = run.knn(q, k, bound)
    want = np.where(ref <= bound[:, None], ref, np.inf)
    np.testing.assert_allclose((dist_b), want, rtol=0, atol=1e-12)
    assert np.all((rowsb >= 0) == np.isfinite(dist_b))
    # radius (inclusive) and box (inclusive), as cKDTree / numpy say
    r = np.full(len(q), 0.2 if d <= 3 else 0.5)
    off, hits = run.radius(q, r)
    tree = cKDTree(pts)
    for i, want_rows in enumerate(tree.query_ball_point(q, r)):
        assert sorted(run.ids[hits[off[i]:off[i + 1]]].tolist()) == sorted(ids[want_rows].tolist())
    lo, hi = np.full(d, 0.25), np.full(d, 0.75)
    assert sorted(run.ids[run.box(lo, hi)].tolist()) == sorted(ids[((pts >= lo) & (pts <= hi)).all(1)].tolist())


def test_dead_rows_are_skipped_everywhere():
    pts = _data(5_000, 2, 1, dup=True)
    run = CurveRun.build(pts, np.arange(5_000), morton_frame(pts))
    dead = np.zeros(5_000, bool)
    dead[::3] = True
    live = ~dead
    q = np.random.default_rng(2).random((50, 2))
    dist, rows = run.knn(q, 7, dead=dead)
    assert not dead[rows].any()
    ref = np.sort(np.sqrt(((q[:, None] - run.points[live][None]) ** 2).sum(-1)), axis=1)[:, :7]
    np.testing.assert_allclose(dist, ref, rtol=0, atol=1e-12)
    off, hits = run.radius(q, np.full(50, 0.1), dead=dead)
    assert not dead[hits].any()
    want = sum(int((np.sqrt(((run.points[live] - c) ** 2).sum(1)) <= 0.1).sum()) for c in q)
    assert off[-1] == want
    assert not dead[run.box(np.zeros(2), np.ones(2), dead=dead)].any()
    assert len(run.box(np.zeros(2), np.ones(2), dead=dead)) == live.sum()


def test_merge_keeps_live_rows_in_key_order():
    pts = _data(9_000, 3, 3)
    frame = morton_frame(pts)
    a = CurveRun.build(pts[:6_000], np.arange(6_000), frame)
    b = CurveRun.build(pts[6_000:], np.arange(6_000, 9_000), frame)
    dead_a = np.zeros(6_000, bool)
    dead_a[:100] = True
    m = CurveRun.merge(a, b, dead_a, None)
    assert len(m) == 8_900 and np.all(m.keys[1:] >= m.keys[:-1])
    assert sorted(m.ids.tolist()) == sorted(a.ids[100:].tolist() + b.ids.tolist())
    np.testing.assert_array_equal(m.points, pts[m.ids])
    q = np.random.default_rng(4).random((30, 3))
    dist, rows = m.knn(q, 5)
    live = np.setdiff1d(np.arange(9_000), a.ids[:100])
    np.testing.assert_allclose(dist, np.sort(cKDTree(pts[live]).query(q, 5)[0], axis=1), rtol=0, atol=1e-12)


def test_partition_keeps_few_runs_and_rebuilds_rarely():
    """Many small appends: the runs stay few (log-structured merges), points far outside the first frame are
    found, every answer exact."""
    rng = np.random.default_rng(5)
    pts = rng.random((20_000, 2))
    part = LocalPartition(pts, np.arange(20_000))
    all_pts = [pts]
    nid = 20_000
    for step in range(120):
        new = rng.random((500, 2)) * (1 if step % 7 else 50)  # some batches far outside the base's box
        part.append(new, np.arange(nid, nid + 500))
        nid += 500
        all_pts.append(new)
        assert part.n_runs <= 8
    allp = np.concatenate(all_pts)
    q = rng.random((100, 2)) * 2
    d, i = part.knn(q, 10)
    rd, ri = cKDTree(allp).query(q, 10)
    np.testing.assert_allclose(d, rd, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.sort(part.ids), np.arange(nid))
    part.flush()
    assert part.n_runs == 0 and part.size == nid
    np.testing.assert_allclose(part.knn(q, 10)[0], rd, rtol=0, atol=1e-12)


def _start_writer(part, batches):
    """A thread appending ``batches`` with ids after the partition's; ``acked[-1]``: ids below it are appended."""
    acked = [part.size]

    def writer():
        nid = acked[0]
        for b in batches:
            part.append(b, np.arange(nid, nid + len(b)))
            nid += len(b)
            acked.append(nid)

    th = threading.Thread(target=writer)
    th.start()
    return th, acked


def test_queries_during_appends_see_every_acknowledged_point():
    """A writer thread appends (runs are merged in it, outside the lock) while a reader queries: each answer is
    exact over the points acknowledged before the query started, at least, and never holds an unknown id."""
    rng = np.random.default_rng(6)
    base = rng.random((30_000, 2))
    batches = [rng.random((2_000, 2)) for _ in range(60)]
    part = LocalPartition(base, np.arange(30_000))
    th, acked = _start_writer(part, batches)
    errors = []
    allp = np.concatenate([base] + batches)
    q = rng.random((50, 2))
    queries = 0
    while True:
        writing = th.is_alive()
        n0 = acked[-1]
        d, i = part.knn(q, 5)
        queries += 1
        if i.max() >= len(allp) or i.min() < 0:
            errors.append("unknown id")
        # every point acknowledged before the query counts: the answer is at most as far as the exact kNN there
        ref, _ = cKDTree(allp[:n0]).query(q, 5)
        if not np.all(d <= ref + 1e-12):
            errors.append("missed an acknowledged point")
        np.testing.assert_allclose(d, np.sqrt(((allp[i] - q[:, None]) ** 2).sum(-1)), rtol=0, atol=1e-12)
        if not writing:
            break
    th.join()
    assert not errors, errors[:3]
    assert queries > 1
    np.testing.assert_allclose(part.knn(q, 5)[0], cKDTree(allp).query(q, 5)[0], rtol=0, atol=1e-12)


def test_base_rebuild_waits_for_a_pause_in_appends(monkeypatch):
    """The KD-tree rebuild (the expensive step) starts only once appends paused for IDLE_S, then folds every
    run into the base; answers stay exact throughout."""
    monkeypatch.setattr(LocalPartition, "MIN_DELTA", 1_000)
    monkeypatch.setattr(LocalPartition, "IDLE_S", 0.3)
    rng = np.random.default_rng(7)
    pts = rng.random((2_000, 2))
    part = LocalPartition(pts, np.arange(2_000))
    for j in range(5):
        new = rng.random((1_000, 2))
        part.append(new, np.arange(2_000 + 1_000 * j, 3_000 + 1_000 * j))
        pts = np.concatenate([pts, new])
    assert part.merges == 0 and part.delta_size == 5_000, "no rebuild while appends keep coming"
    q = rng.random((20, 2))
    np.testing.assert_allclose(part.knn(q, 4)[0], cKDTree(pts).query(q, 4)[0], rtol=0, atol=1e-12)
    deadline = time.monotonic() + 10
    while part.n_runs and time.monotonic() < deadline:
        time.sleep(0.05)
        part.knn(q, 4)  # a call swaps a finished rebuild in
    assert part.merges == 1 and part.n_runs == 0 and part.size == 7_000
    np.testing.assert_allclose(part.knn(q, 4)[0], cKDTree(pts).query(q, 4)[0], rtol=0, atol=1e-12)


def test_deletes_racing_appends_and_run_merges_lose_nothing():
    """Deletes from another thread while appends merge runs (outside the lock): every delete sticks, every
    append stays, answers exact over what is left."""
    rng = np.random.default_rng(8)
    base = rng.random((5_000, 2))
    batches = [rng.random((700, 2)) for _ in range(80)]
    part = LocalPartition(base, np.arange(5_000))
    th, acked = _start_writer(part, batches)
    deleted: list[np.ndarray] = []
    drng = np.random.default_rng(9)
    while th.is_alive():
        gone = drng.choice(acked[-1], size=50, replace=False)
        part.delete(gone)
        deleted.append(gone)
    th.join()
    allp = np.concatenate([base] + batches)
    keep = np.ones(len(allp), bool)
    keep[np.concatenate(deleted)] = False
    np.testing.assert_array_equal(np.sort(part.ids), np.flatnonzero(keep))
    q = rng.random((40, 2))
    np.testing.assert_allclose(part.knn(q, 5)[0], cKDTree(allp[keep]).query(q, 5)[0], rtol=0, atol=1e-12)
    part.flush()
    np.testing.assert_array_equal(np.sort(part.ids), np.flatnonzero(keep))
