"""Geofence events and kNN watches vs brute-force per-event simulations (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distspatial.live.continuous import GeofenceMonitor, KnnWatch, points_in_polygon


# ----------------------------------------------------------------------------------------------------------------
# geofences: independent predicates and a per-event reference
# ----------------------------------------------------------------------------------------------------------------


def in_box(p, lo, hi):
    return all(l <= x <= h for x, l, h in zip(p, lo, hi))


def in_triangle(p, a, b, c):
    def cross(o, u, v):
        return (u[0] - o[0]) * (v[1] - o[1]) - (u[1] - o[1]) * (v[0] - o[0])

    s1, s2, s3 = cross(a, b, p), cross(b, c, p), cross(c, a, p)
    return (s1 >= 0 and s2 >= 0 and s3 >= 0) or (s1 <= 0 and s2 <= 0 and s3 <= 0)


# (fence id, how to register it, independent predicate on a 2-D point)
FENCES = [
    ("disc", lambda m: m.add_range("disc", [1.0, 1.0], 0.8),
     lambda p: math.hypot(p[0] - 1.0, p[1] - 1.0) <= 0.8),
    ("box", lambda m: m.add_box("box", [2.0, 0.5], [3.5, 2.0]), lambda p: in_box(p, [2.0, 0.5], [3.5, 2.0])),
    # concave L: [0,3]x[2.5,3] union [0,0.5]x[2.5,4.5]
    ("L", lambda m: m.add_polygon("L", [[0, 2.5], [3, 2.5], [3, 3], [0.5, 3], [0.5, 4.5], [0, 4.5]]),
     lambda p: in_box(p, [0, 2.5], [3, 3]) or in_box(p, [0, 2.5], [0.5, 4.5])),
    # self-intersecting bowtie (even-odd): two triangles touching at (3.5, 3.5)
    (7, lambda m: m.add_polygon(7, [[2.5, 2.5], [4.5, 4.5], [4.5, 2.5], [2.5, 4.5]]),
     lambda p: (in_triangle(p, (2.5, 2.5), (2.5, 4.5), (3.5, 3.5))
                or in_triangle(p, (4.5, 2.5), (4.5, 4.5), (3.5, 3.5)))),
]


def simulate_fences(batches, removals=None):
    """Per event, in (timestamp, arrival) order within each batch; stale events (older than the object's latest)
    skipped. ``removals``: {batch index: (ids, timestamp)} applied after that batch."""
    removals = removals or {}
    state: dict[int, tuple[float, tuple, dict]] = {}
    events = []
    for b, (P, I, T) in enumerate(batches):
        for j in sorted(range(len(T)), key=lambda j: (T[j], j)):
            oid, t, p = int(I[j]), float(T[j]), tuple(P[j].tolist())
            if oid in state and t < state[oid][0]:
                continue
            prev = state[oid][2] if oid in state else {fid: False for fid, _, _ in FENCES}
            now = {fid: bool(pred(p)) for fid, _, pred in FENCES}
            for fid, _, _ in FENCES:
                if now[fid] != prev[fid]:
                    events.append((fid, oid, "enter" if now[fid] else "leave", t, p))
            state[oid] = (t, p, now)
        if b in removals:
            ids, ts = removals[b]
            for oid in sorted(set(ids)):
                if oid in state:
                    t, p, now = state.pop(oid)
                    events.extend((fid, oid, "leave", ts, p) for fid, _, _ in FENCES if now[fid])
    return events


def as_tuples(events):
    return [(e.fence_id, e.object_id, e.kind, e.timestamp, tuple(e.point.tolist())) for e in events]


def moving_objects(rng, n_obj=40, n_batches=25, per_batch=150):
    """Random walks in [0, 5]^2; several positions per object per batch, shuffled arrival, some stale ones."""
    pos = rng.uniform(0, 5, (n_obj, 2))
    t = 0.0
    batches = []
    for _ in range(n_batches):
        I = rng.integers(0, n_obj, per_batch)
        steps = rng.normal(0, 0.35, (per_batch, 2))
        P = np.empty((per_batch, 2))
        for j in range(per_batch):               # the walk itself (test data), not the code under test
            pos[I[j]] = np.clip(pos[I[j]] + steps[j], 0, 5)
            P[j] = pos[I[j]]
        T = t + np.sort(rng.uniform(0, 1, per_batch))
        T[rng.random(per_batch) < 0.03] -= 1.5   # some events delayed into the previous batch's time: stale
        perm = rng.permutation(per_batch)        # arrival order is not time order
        batches.append((P[perm], I[perm].astype(np.int64) + 100, T[perm]))
        t += 1.0
    return batches


def register_all(mon):
    for _, reg, _ in FENCES:
        reg(mon)


def test_points_in_polygon_vs_independent_predicates():
    rng = np.random.default_rng(0)
    X = rng.uniform(-0.5, 5.5, (20000, 2))
    for fid, reg, pred in FENCES[2:]:
        mon = GeofenceMonitor()
        reg(mon)
        got = mon.contains(X)[:, 0]
        ref = np.array([pred(p) for p in X.tolist()])
        np.testing.assert_array_equal(got, ref)
        assert 100 < got.sum() < 19000
    # a triangle, a square given closed (last vertex == first)
    sq = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]], float)
    inside = points_in_polygon(X, sq)
    np.testing.assert_array_equal(inside, ((X > 0) & (X < 1)).all(axis=1))


def test_geofence_events_match_per_event_simulation():
    rng = np.random.default_rng(1)
    batches = moving_objects(rng)
    got = []
    mon = GeofenceMonitor(on_event=got.append)
    register_all(mon)
    returned = []
    for P, I, T in batches:
        returned.extend(mon.update(P, I, T))
    ref = simulate_fences(batches)
    assert len(ref) > 100
    assert as_tuples(returned) == ref
    assert got == returned
    assert mon.stale_dropped > 0
    # the final state agrees with the last position of every object
    for oid in mon.tracked.tolist():
        p, _ = mon.position(oid)
        assert mon.fences_of(oid) == [fid for fid, _, pred in FENCES if pred(tuple(p))]
    assert sorted(mon.objects_in("box").tolist()) == sorted(
        o for o in mon.tracked.tolist() if FENCES[1][2](tuple(mon.position(o)[0])))


def test_geofence_removals_and_batching_invariance():
    rng = np.random.default_rng(2)
    batches = moving_objects(rng, n_obj=20, n_batches=12)
    removals = {3: ([100, 101, 102, 999], 3.5), 7: (list(range(100, 110)), 7.5)}
    mon = GeofenceMonitor()
    register_all(mon)
    events = []
    for b, (P, I, T) in enumerate(batches):
        events.extend(mon.update(P, I, T))
        if b in removals:
            events.extend(mon.remove(*removals[b]))
    assert as_tuples(events) == simulate_fences(batches, removals)
    assert any(e.kind == "leave" and e.timestamp == 7.5 for e in events)

    # one event per batch (in the batch's time order) gives the same events
    mon2 = GeofenceMonitor()
    register_all(mon2)
    single = []
    for P, I, T in batches[:3]:
        for j in np.lexsort((np.arange(len(T)), T)):
            single.extend(mon2.update(P[j : j + 1], I[j : j + 1], T[j : j + 1]))
    mon3 = GeofenceMonitor()
    register_all(mon3)
    assert as_tuples(single) == as_tuples(list(mon3.process(batches[:3])))


def test_object_in_and_out_within_one_batch_and_first_seen_inside():
    mon = GeofenceMonitor()
    mon.add_box("b", [0, 0], [1, 1])
    mon.add_range("r", [0.5, 0.5], 0.1)
    P = np.array([[2.0, 2.0], [0.5, 0.5], [0.9, 0.9], [3.0, 3.0], [0.2, 0.2]])
    I = np.array([1, 1, 1, 1, 2])
    T = np.array([4.0, 1.0, 2.0, 3.0, 2.0])   # arrival order differs from time order
    ev = mon.update(P, I, T)
    assert [(e.fence_id, e.object_id, e.kind, e.timestamp) for e in ev] == [
        ("b", 1, "enter", 1.0), ("r", 1, "enter", 1.0),
        ("r", 1, "leave", 2.0), ("b", 2, "enter", 2.0),   # same time: arrival order (row 2 before row 4)
        ("b", 1, "leave", 3.0),
    ]
    assert ev[0].point.tolist() == [0.5, 0.5]
    assert mon.position(1)[1] == 4.0 and mon.fences_of(1) == [] and mon.fences_of(2) == ["b"]
    # an older position of object 1 is stale; equal time is applied
    assert mon.update(np.array([[0.5, 0.5]]), np.array([1]), np.array([3.5])) == []
    assert mon.stale_dropped == 1
    assert [e.kind for e in mon.update(np.array([[0.5, 0.5]]), np.array([1]), np.array([4.0]))] == ["enter", "enter"]
    # empty batches
    assert mon.update(np.empty((0, 2)), np.empty(0, np.int64), np.empty(0)) == []
    assert mon.update([], [], []) == []


def test_fence_added_later_and_removed():
    mon = GeofenceMonitor()
    mon.add_box("a", [0, 0], [1, 1])
    mon.update(np.array([[0.5, 0.5]]), np.array([1]), np.array([0.0]))
    mon.add_range("late", [0.5, 0.5], 1.0)
    assert mon.fences_of(1) == ["a"]
    ev = mon.update(np.array([[0.6, 0.6]]), np.array([1]), np.array([1.0]))
    assert [(e.fence_id, e.kind) for e in ev] == [("late", "enter")]
    mon.remove_fence("a")
    assert [f.fence_id for f in mon.fences] == ["late"] and mon.fences_of(1) == ["late"]
    ev = mon.update(np.array([[5.0, 5.0]]), np.array([1]), np.array([2.0]))
    assert [(e.fence_id, e.kind) for e in ev] == [("late", "leave")]
    with pytest.raises(ValueError):
        mon.add_range("late", [0, 0], 1.0)
    with pytest.raises(ValueError):
        mon.add_polygon("p", [[0, 0], [1, 1]])
    with pytest.raises(ValueError):
        mon.update(np.zeros((2, 3)), [1, 2], [0.0, 0.0])
    with pytest.raises(ValueError):
        mon.update(np.zeros((2, 2)), [1, 2], [0.0])


def test_geofences_on_3d_points():
    mon = GeofenceMonitor()
    mon.add_range("ball", [0, 0, 0], 1.0)
    mon.add_polygon("footprint", [[0, 0], [2, 0], [2, 2], [0, 2]])      # on x, y
    mon.add_box("slab", [0.5], [1.0], dims=[2])                          # 0.5 <= z <= 1
    ev = mon.update(np.array([[0.5, 0.5, 0.6], [0.5, 0.5, 3.0]]), np.array([1, 1]), np.array([1.0, 2.0]))
    assert [(e.fence_id, e.kind, e.timestamp) for e in ev] == [
        ("ball", "enter", 1.0), ("footprint", "enter", 1.0), ("slab", "enter", 1.0),
        ("ball", "leave", 2.0), ("slab", "leave", 2.0)]


# ----------------------------------------------------------------------------------------------------------------
# kNN watches
# ----------------------------------------------------------------------------------------------------------------


def brute_knn(data: dict[int, np.ndarray], q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if not data:
        return np.empty(0, np.int64), np.empty(0)
    ids = np.fromiter(data.keys(), dtype=np.int64)
    pts = np.stack(list(data.values()))
    d = np.sqrt(((pts - q) ** 2).sum(axis=1))
    o = np.lexsort((ids, d))[:k]
    return ids[o], d[o]


def cluster_answer(data, qs, K):
    """What the cluster's exact kNN returns: (m, K) sorted by distance, -1/inf padded."""
    ids = np.full((len(qs), K), -1, np.int64)
    dist = np.full((len(qs), K), np.inf)
    for r, q in enumerate(qs):
        i, d = brute_knn(data, q, K)
        ids[r, : i.size], dist[r, : d.size] = i, d
    return ids, dist


def test_knn_watch_check_only():
    w = KnnWatch()
    w.add_query("a", [0, 0], 2)
    w.add_query("b", [1, 1], 3)
    assert w.needs_refresh() == ["a", "b"] and w.max_k == 3
    assert w.points().tolist() == [[0, 0], [1, 1]] and w.ks().tolist() == [2, 3]
    ids = np.array([[4, 5, 6], [7, 8, -1]])
    dist = np.array([[0.1, 0.2, 0.3], [0.1, 0.4, np.inf]])
    ch = w.check(ids, dist, timestamp=1.0)
    assert [(c.query_id, c.initial, c.new_ids.tolist(), c.old_ids.tolist()) for c in ch] == [
        ("a", True, [4, 5], []), ("b", True, [7, 8], [])]
    assert w.needs_refresh() == []
    # same sets in another order, and a change outside a's first k: no event
    assert w.check(np.array([[5, 4, 9], [8, 7, -1]]), np.array([[0.1, 0.1, 0.2], [0.3, 0.3, np.inf]])) == []
    ch = w.check(np.array([[5, 4, 9], [8, 7, 1]]), np.array([[0.1, 0.1, 0.2], [0.3, 0.3, 0.5]]), timestamp=2.0)
    assert len(ch) == 1 and ch[0].query_id == "b" and ch[0].added.tolist() == [1] and ch[0].removed.tolist() == []
    assert ch[0].timestamp == 2.0 and not ch[0].initial
    # a subset of the queries
    ch = w.check(np.array([[6, 7]]), np.array([[0.0, 0.1]]), query_ids=["a"])
    assert ch[0].removed.tolist() == [4, 5] and w.answer("a")[0].tolist() == [6, 7]
    with pytest.raises(ValueError):
        w.check(np.array([[1, 2]]), np.array([[0.0, 0.1]]))
    with pytest.raises(ValueError):
        w.add_query("c", [0, 0, 0], 1)


def pick(rng, items, n):
    return [int(x) for x in rng.choice(items, size=min(len(items), n), replace=False)] if items else []


def test_knn_watch_incremental_matches_brute_force():
    rng = np.random.default_rng(5)
    changes = []
    w = KnnWatch(on_change=changes.append)
    queries = rng.uniform(0, 1, (12, 2))
    ks = rng.integers(1, 8, 12)
    for i, (q, k) in enumerate(zip(queries, ks)):
        w.add_query(i, q, int(k))
    data: dict[int, np.ndarray] = {}
    next_id = 0
    prev_sets = {i: None for i in range(12)}
    refreshed = observed = 0
    for step in range(60):
        # inserts, moves of existing ids, deletes
        n_new = int(rng.integers(0, 6 if step < 3 else 15))
        new_ids = list(range(next_id, next_id + n_new))
        next_id += n_new
        existing = list(data)
        moved = pick(rng, existing, int(rng.integers(0, 4)))
        rest = [x for x in existing if x not in moved]
        deleted = pick(rng, rest, int(rng.integers(0, 4)))
        ins_ids = np.array(new_ids + moved, dtype=np.int64)
        ins_pts = rng.uniform(0, 1, (ins_ids.size, 2))
        for x in deleted:
            del data[x]
        for x, p in zip(ins_ids.tolist(), ins_pts):
            data[x] = p
        t = float(step)
        before = len(changes)
        got = w.observe(ins_pts, ins_ids, deleted, timestamp=t)
        observed += len(got)
        stale = w.needs_refresh()
        if stale:
            refreshed += len(stale)
            ids, dist = cluster_answer(data, w.points(stale), w.max_k)
            got += w.check(ids, dist, timestamp=t, query_ids=stale)
        assert changes[before:] == got
        assert w.needs_refresh() == []
        by_q = {c.query_id: c for c in got}
        assert len(by_q) == len(got)   # at most one change per query per batch
        for i in range(12):
            ref_ids, ref_d = brute_knn(data, queries[i], int(ks[i]))
            cur_ids, cur_d = w.answer(i)
            np.testing.assert_array_equal(cur_ids, ref_ids)
            np.testing.assert_allclose(cur_d, ref_d, rtol=0, atol=1e-12)
            ref_set = set(ref_ids.tolist())
            if prev_sets[i] is None or ref_set != prev_sets[i]:
                c = by_q[i]
                assert set(c.new_ids.tolist()) == ref_set and c.timestamp == t
                assert c.initial == (prev_sets[i] is None)
                if prev_sets[i] is not None:
                    assert set(c.old_ids.tolist()) == prev_sets[i]
            else:
                assert i not in by_q
            prev_sets[i] = ref_set
    # both paths were exercised: changes proven incrementally, and refreshes after deletions of answer points
    assert observed > 20 and refreshed > 12


def test_knn_watch_observe_before_any_answer_and_empty():
    w = KnnWatch()
    assert w.observe(np.zeros((1, 2)), [1]) == []        # no query
    w.add_query("q", [0, 0], 2)
    assert w.observe(np.zeros((1, 2)), [1]) == []        # not answered yet: nothing to merge
    assert w.needs_refresh() == ["q"]
    ch = w.check(np.array([[-1, -1]]), np.array([[np.inf, np.inf]]))   # empty index
    assert ch[0].initial and ch[0].new_ids.size == 0
    ch = w.observe(np.array([[3.0, 0.0], [1.0, 0.0], [2.0, 0.0]]), np.array([10, 11, 12]))
    assert ch[0].new_ids.tolist() == [11, 12] and ch[0].new_dists.tolist() == [1.0, 2.0]
    assert w.observe(None, None, deleted_ids=[10]) == []  # not in the answer
    assert w.observe() == []
    ch = w.observe(None, None, deleted_ids=[11])          # answer point deleted, 10 was deleted: unknown
    assert ch == [] and w.needs_refresh() == ["q"]
