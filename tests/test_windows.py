"""Event-time windows and per-window aggregations vs an event-by-event brute-force reference (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distspatial.core.curves import curve_keys
from distspatial.live.windows import (
    CurveCellCounts,
    GridCounts,
    HotSpots,
    WindowedAggregator,
    WindowKMeans,
    WindowSpec,
    find_hot_spots,
    kmeans_plus_plus,
    lloyd_kmeans,
)


# ----------------------------------------------------------------------------------------------------------------
# reference: one event at a time, plain Python, windows enumerated by their definition
# ----------------------------------------------------------------------------------------------------------------


def simulate(spec: WindowSpec, T: np.ndarray) -> tuple[list[dict], int, int]:
    """Process events in arrival order; return closed windows (in closing order), late total, unassigned."""
    step, size, L, ooo, origin = spec.step, spec.size, spec.allowed_lateness, spec.max_out_of_orderness, spec.origin
    wm = -math.inf
    open_: dict[int, dict] = {}
    out: list[dict] = []
    late = unassigned = 0

    def start(i):
        return origin + i * step

    def close(final):
        for i in sorted(open_):
            w = open_[i]
            if final or w["end"] + L <= wm:
                out.append(dict(w, late_dropped=late, watermark=wm, final=final))
                del open_[i]

    for j, t in enumerate(T.tolist()):
        i0 = math.floor((t - origin) / step)
        reach = int(math.ceil(size / step)) + 2
        cand = [i for i in range(i0 - reach, i0 + 3) if start(i) <= t < start(i) + size]
        if not cand:
            unassigned += 1
        else:
            still_open = [i for i in cand if not (start(i) + size + L <= wm)]  # watermark before this event
            if not still_open:
                late += 1
            for i in still_open:
                w = open_.setdefault(i, dict(index=i, start=start(i), end=start(i) + size, members=[], late_accepted=0))
                w["members"].append(j)
                if w["end"] <= wm:
                    w["late_accepted"] += 1
        wm = max(wm, t - ooo)
        close(False)
    close(True)
    return out, late, unassigned


def grid_reference(P: np.ndarray, lo, hi, shape) -> tuple[np.ndarray, int]:
    """Counts with numpy.histogramdd over linspace edges (last bin closed), overflow = points outside [lo, hi]."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    g = len(lo)
    x = P[:, :g]
    inside = ((x >= lo) & (x <= hi)).all(axis=1)
    edges = [np.linspace(lo[a], hi[a], shape[a] + 1) for a in range(g)]
    h, _ = np.histogramdd(x[inside], bins=edges) if inside.any() else (np.zeros(shape), None)
    return h.astype(np.int64), int((~inside).sum())


def split_batches(n: int, rng: np.random.Generator, max_batch: int) -> list[tuple[int, int]]:
    cuts = [0]
    while cuts[-1] < n:
        cuts.append(min(n, cuts[-1] + int(rng.integers(0, max_batch + 1))))  # empty batches included
    return list(zip(cuts[:-1], cuts[1:]))


def run_batches(agg: WindowedAggregator, P, I, T, bounds) -> list:
    out = []
    for s, e in bounds:
        out.extend(agg.add(P[s:e], I[s:e], T[s:e]))
    out.extend(agg.flush())
    return out


def make_stream(rng, n, duration, jitter, d=2):
    base = np.sort(rng.uniform(0, duration, n))
    u = rng.random(n)
    # 10 % of the events arrive delayed (event time earlier than their arrival position), a few too early
    T = base - rng.uniform(0, jitter, n) * (u < 0.1) + rng.uniform(0, jitter, n) * (u > 0.997)
    P = rng.uniform(-0.1, 1.1, (n, d))
    return P, np.arange(n, dtype=np.int64) + 1000, T


def assert_matches_reference(res, ref, P, grid: GridCounts | None = None):
    assert [(r.index, r.start, r.end) for r in res] == [(w["index"], w["start"], w["end"]) for w in ref]
    for r, w in zip(res, ref):
        assert r.count == len(w["members"])
        assert r.late_dropped == w["late_dropped"]
        assert r.late_accepted == w["late_accepted"]
        assert r.final == w["final"]
        if not w["final"]:
            assert r.watermark == w["watermark"]
        if grid is not None:
            counts, overflow = grid_reference(P[w["members"]], grid.lo, grid.hi, grid.shape)
            np.testing.assert_array_equal(r[grid.name].counts, counts)
            assert r[grid.name].overflow == overflow


# ----------------------------------------------------------------------------------------------------------------
# windows, watermark, lateness
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        WindowSpec(10.0),
        WindowSpec(10.0, allowed_lateness=4.0),
        WindowSpec(10.0, max_out_of_orderness=3.0),
        WindowSpec(10.0, slide=2.5, allowed_lateness=2.0, max_out_of_orderness=1.0),
        WindowSpec(7.0, slide=3.0, origin=1.5),
        WindowSpec(2.0, slide=5.0, allowed_lateness=1.0),  # hopping windows with gaps
    ],
    ids=["tumbling", "lateness", "out_of_orderness", "sliding", "sliding_uneven_origin", "hopping_gaps"],
)
def test_windows_match_event_by_event_reference(spec):
    rng = np.random.default_rng(0)
    P, I, T = make_stream(rng, 3000, 200.0, jitter=12.0)
    grid = GridCounts([0, 0], [1, 1], shape=(5, 4))
    agg = WindowedAggregator(spec, grid)
    res = run_batches(agg, P, I, T, split_batches(len(T), rng, 150))
    ref, late, unassigned = simulate(spec, T)
    assert late > 0 and len(ref) > 10
    if spec.allowed_lateness > 0:
        assert sum(w["late_accepted"] for w in ref) > 0
    assert_matches_reference(res, ref, P, grid)
    assert agg.late_dropped == late and agg.unassigned == unassigned
    # every event is accounted for exactly once
    assert agg.events_accepted + late + unassigned == len(T)


def test_results_do_not_depend_on_batching():
    rng = np.random.default_rng(1)
    P, I, T = make_stream(rng, 2000, 100.0, jitter=8.0)
    spec = WindowSpec(10.0, slide=5.0, allowed_lateness=3.0, max_out_of_orderness=1.0)

    def run(bounds):
        grid = GridCounts([0, 0], [1, 1], 3)
        aggs = (grid, HotSpots(grid, top_n=3), CurveCellCounts([0, 0], [1, 1], 3, "morton"),
                WindowKMeans(3, seed=7, max_points=60))
        return run_batches(WindowedAggregator(spec, *aggs), P, I, T, bounds)

    one = run([(0, len(T))])
    single = run([(i, i + 1) for i in range(len(T))])
    random = run(split_batches(len(T), rng, 97))
    for other in (single, random):
        assert len(other) == len(one)
        for a, b in zip(one, other):
            assert (a.index, a.count, a.late_dropped) == (b.index, b.count, b.late_dropped)
            assert a.late_accepted == b.late_accepted
            np.testing.assert_array_equal(a["grid"].counts, b["grid"].counts)
            assert [(h.index, h.count) for h in a["hotspots"]] == [(h.index, h.count) for h in b["hotspots"]]
            np.testing.assert_array_equal(a["curve_cells"].keys, b["curve_cells"].keys)
            np.testing.assert_array_equal(a["curve_cells"].counts, b["curve_cells"].counts)
            np.testing.assert_array_equal(a["kmeans"].centers, b["kmeans"].centers)


def test_window_boundaries_start_inclusive_end_exclusive():
    spec = WindowSpec(10.0, slide=5.0)
    first, last = spec.window_range(np.array([0.0, 5.0, 9.999, 10.0, -5.0, -0.001]))
    starts = [[spec.window_start(i) for i in range(f, l + 1)] for f, l in zip(first, last)]
    assert starts == [[-5.0, 0.0], [0.0, 5.0], [0.0, 5.0], [5.0, 10.0], [-10.0, -5.0], [-10.0, -5.0]]
    assert WindowSpec(10.0).windows_of(10.0) == [(10.0, 20.0)]
    ((s, e),) = WindowSpec(0.1).windows_of(0.3)      # 3 * 0.1 > 0.3 in floats: 0.3 is in window 2
    assert s <= 0.3 < e and s == 2 * 0.1
    # exact float check for awkward steps: start <= t < end for every reported window, and no other window
    rng = np.random.default_rng(2)
    for spec in (WindowSpec(0.1, slide=0.03, origin=-0.07), WindowSpec(1 / 3)):
        t = np.concatenate([rng.uniform(-5, 5, 2000), spec.window_start(np.arange(-40, 40))])
        first, last = spec.window_range(t)
        assert (spec.window_start(first) <= t).all() and (t < spec.window_end(last)).all()
        assert (spec.window_end(first - 1) <= t).all() and (spec.window_start(last + 1) > t).all()

    # a point exactly on a boundary goes to the window that starts there (tumbling)
    agg = WindowedAggregator(WindowSpec(10.0))
    pts = np.zeros((3, 2))
    res = agg.add(pts, np.arange(3), np.array([0.0, 10.0, 20.0]))   # t=10 closes [0,10); t=20 closes [10,20)
    assert [(r.start, r.end, r.count) for r in res] == [(0.0, 10.0, 1), (10.0, 20.0, 1)]
    assert [(r.start, r.count) for r in agg.flush()] == [(20.0, 1)]


def test_sliding_point_in_several_windows():
    agg = WindowedAggregator(WindowSpec(10.0, slide=2.0), GridCounts([0], [1], 1))
    agg.add(np.array([[0.5]]), np.array([1]), np.array([5.0]))
    res = agg.flush()
    assert [(r.start, r.end) for r in res] == [(-4.0, 6.0), (-2.0, 8.0), (0.0, 10.0), (2.0, 12.0), (4.0, 14.0)]
    assert all(r.count == 1 and r["grid"].counts.tolist() == [1] for r in res)
    assert all(r.final for r in res)


def test_lateness_zero_vs_positive():
    pts = np.zeros((4, 1))
    T = np.array([1.0, 12.0, 5.0, 16.0])   # 5.0 arrives after the watermark (12) passed the end of [0, 10)

    late_seen = []
    agg = WindowedAggregator(WindowSpec(10.0), on_late=late_seen.append)
    res = agg.add(pts, np.array([1, 2, 3, 4]), T)
    assert [(r.start, r.count, r.late_accepted, r.watermark) for r in res] == [(0.0, 1, 0, 12.0)]
    assert agg.late_dropped == 1 and len(late_seen) == 1
    assert late_seen[0].ids.tolist() == [3] and late_seen[0].timestamps.tolist() == [5.0]
    assert late_seen[0].points.shape == (1, 1)

    agg = WindowedAggregator(WindowSpec(10.0, allowed_lateness=5.0))
    res = agg.add(pts, np.array([1, 2, 3, 4]), T)   # closes at watermark 15: t=16 closes it, after 5.0 was added
    assert [(r.start, r.count, r.late_accepted, r.watermark, r.late_dropped) for r in res] == [(0.0, 2, 1, 16.0, 0)]
    assert agg.late_dropped == 0
    # now it is closed: another event for it is late
    assert agg.add(pts[:1], np.array([5]), np.array([9.0])) == [] and agg.late_dropped == 1
    assert [(r.start, r.count) for r in agg.flush()] == [(10.0, 2)]

    # out-of-orderness delays the watermark itself
    agg = WindowedAggregator(WindowSpec(10.0, max_out_of_orderness=3.0))
    assert agg.add(pts[:2], np.array([1, 2]), np.array([1.0, 12.0])) == []  # watermark 9 < 10
    assert agg.watermark == 9.0
    assert [r.count for r in agg.add(pts[:2], np.array([3, 4]), np.array([9.5, 13.0]))] == [2]


def test_batch_spanning_many_windows_and_empty_batches():
    agg = WindowedAggregator(WindowSpec(1.0), GridCounts([0, 0], [1, 1], 2))
    assert agg.add(np.empty((0, 2)), np.empty(0, np.int64), np.empty(0)) == []
    assert agg.add([], [], []) == []
    assert agg.watermark == -math.inf and agg.open_windows == []
    rng = np.random.default_rng(3)
    T = np.arange(0, 500, 0.25)
    P = rng.random((T.size, 2))
    res = agg.add(P, np.arange(T.size), T)
    assert [r.start for r in res] == [float(i) for i in range(499)]
    assert all(r.count == 4 for r in res)
    assert agg.add(np.empty((0, 2)), np.empty(0, np.int64), np.empty(0)) == []
    assert [r.start for r in agg.flush()] == [499.0]
    with pytest.raises(RuntimeError):
        agg.add(P[:1], [0], [600.0])


def test_hopping_windows_unassigned_and_callbacks_and_process():
    got = []
    agg = WindowedAggregator(WindowSpec(1.0, slide=3.0), on_window=got.append)
    batches = [(np.zeros((3, 2)), None, np.array([0.5, 1.5, 3.2])), (np.zeros((1, 2)), None, np.array([7.0]))]
    out = list(agg.process(batches))
    assert [(r.start, r.count) for r in out] == [(0.0, 1), (3.0, 1)]
    assert got == out and agg.unassigned == 2


def test_advance_watermark_closes_idle_windows():
    agg = WindowedAggregator(WindowSpec(10.0, allowed_lateness=2.0))
    agg.add(np.zeros((2, 2)), np.array([1, 2]), np.array([3.0, 4.0]))
    assert agg.advance_watermark(11.0) == [] and agg.watermark == 11.0
    res = agg.advance_watermark(12.0)
    assert [(r.start, r.count, r.watermark) for r in res] == [(0.0, 2, 12.0)]
    assert agg.advance_watermark(5.0) == [] and agg.watermark == 12.0
    agg.add(np.zeros((1, 2)), np.array([3]), np.array([8.0]))
    assert agg.late_dropped == 1


def test_validation():
    with pytest.raises(ValueError):
        WindowSpec(0.0)
    with pytest.raises(ValueError):
        WindowSpec(1.0, slide=-1.0)
    with pytest.raises(ValueError):
        WindowSpec(1.0, allowed_lateness=-1)
    g = GridCounts([0, 0], [1, 1], 2)
    with pytest.raises(ValueError, match="distinct"):
        WindowedAggregator(WindowSpec(1.0), g, GridCounts([0, 0], [1, 1], 3))
    agg = WindowedAggregator(WindowSpec(1.0), g)
    with pytest.raises(ValueError, match="timestamps must be finite"):
        agg.add(np.zeros((2, 2)), [1, 2], [0.0, np.nan])
    with pytest.raises(ValueError, match="rows"):
        agg.add(np.zeros((2, 2)), [1, 2], [0.0])
    with pytest.raises(ValueError, match="ids"):
        agg.add(np.zeros((2, 2)), [1], [0.0, 1.0])
    agg.add(np.zeros((2, 2)), [1, 2], [0.0, 1.0])
    with pytest.raises(ValueError, match="columns"):
        agg.add(np.zeros((2, 3)), [1, 2], [0.0, 1.0])
    with pytest.raises(ValueError):
        GridCounts([0, 0], [1, 1])
    with pytest.raises(ValueError):
        GridCounts([0, 0], [0, 1], 2)
    with pytest.raises(ValueError):
        HotSpots(g)
    with pytest.raises(ValueError):
        CurveCellCounts([0, 0], [1, 1], 40)


# ----------------------------------------------------------------------------------------------------------------
# aggregations
# ----------------------------------------------------------------------------------------------------------------


def test_grid_counts_3d_points_heat_map_and_full_grid_and_cell_size():
    rng = np.random.default_rng(4)
    P = rng.uniform(-0.2, 1.2, (4000, 3))
    T = np.sort(rng.uniform(0, 30, 4000))
    heat = GridCounts([0, 0], [1, 1], (8, 5), name="heat")                   # first two coordinates
    full = GridCounts([0, 0, 0], [1, 1, 1], 4, name="full")
    sized = GridCounts([0, 0], [1, 1], cell_size=0.3, name="sized")           # 4 x 4 cells, hi -> 1.2
    assert sized.shape == (4, 4) and np.allclose(sized.hi, 1.2)
    yz = GridCounts([0, 0], [1, 1], 3, dims=(1, 2), name="yz")
    res = WindowedAggregator(WindowSpec(10.0), heat, full, sized, yz).process([(P, None, T)])
    res = list(res)
    assert [r.start for r in res] == [0.0, 10.0, 20.0]
    for r in res:
        m = (T >= r.start) & (T < r.end)
        for agg, x in ((heat, P), (full, P), (sized, P), (yz, P[:, [1, 2]])):
            counts, overflow = grid_reference(x[m], agg.lo, agg.hi, agg.shape)
            np.testing.assert_array_equal(r[agg.name].counts, counts)
            assert r[agg.name].overflow == overflow and r[agg.name].total == m.sum()
    # the upper bound is closed; a cell's bounds
    s = heat.new_state(None)
    heat.update(s, np.array([[1.0, 1.0, 5.0], [0.0, 0.0, 0.0], [1.0000001, 0.5, 0.0]]))
    r = heat.result(s)
    assert r.counts[7, 4] == 1 and r.counts[0, 0] == 1 and r.overflow == 1
    lo, hi = r.cell_bounds((7, 4))
    np.testing.assert_allclose(lo, [0.875, 0.8])
    np.testing.assert_allclose(hi, [1.0, 1.0])


def test_hot_spots_threshold_and_top_n():
    rng = np.random.default_rng(5)
    centers = np.array([[0.2, 0.2], [0.7, 0.8], [0.55, 0.3]])
    P = np.concatenate([c + 0.03 * rng.standard_normal((n, 2)) for c, n in zip(centers, (500, 300, 200))]
                       + [rng.random((1000, 2))])
    T = rng.uniform(0, 10, len(P))
    grid = GridCounts([0, 0], [1, 1], 10)
    aggs = (grid, HotSpots(grid, top_n=3, name="top"), HotSpots(grid, threshold=40, name="thr"),
            HotSpots(grid, threshold=40, top_n=2, name="both"))
    (r,) = list(WindowedAggregator(WindowSpec(10.0), *aggs).process([(P, None, T)]))
    counts, _ = grid_reference(P, [0, 0], [1, 1], (10, 10))
    flat = counts.reshape(-1)
    ref = sorted(((-c, i) for i, c in enumerate(flat.tolist()) if c > 0))   # count desc, flat index asc
    assert [(h.flat_index, h.count) for h in r["top"]] == [(i, -c) for c, i in ref[:3]]
    assert [(h.flat_index, h.count) for h in r["thr"]] == [(i, -c) for c, i in ref if -c >= 40]
    assert [(h.flat_index, h.count) for h in r["both"]] == [(i, -c) for c, i in ref if -c >= 40][:2]
    top = r["top"][0]
    assert top.index == np.unravel_index(top.flat_index, (10, 10))
    assert (top.lo <= centers[0]).all() and (centers[0] <= top.hi).all()
    assert find_hot_spots(r["grid"], top_n=1)[0].count == top.count


def test_curve_cell_counts():
    rng = np.random.default_rng(6)
    P = rng.uniform(-0.1, 1.1, (3000, 2))
    T = np.sort(rng.uniform(0, 20, 3000))
    aggs = (CurveCellCounts([0, 0], [1, 1], 1, name="quad"), CurveCellCounts([0, 0], [1, 1], 4, "morton", name="m4"))
    res = list(WindowedAggregator(WindowSpec(10.0), *aggs).process(
        [(P[s:s + 500], None, T[s:s + 500]) for s in range(0, 3000, 500)]))
    assert [r.count for r in res] == [(T < 10).sum(), (T >= 10).sum()]
    for r in res:
        m = (T >= r.start) & (T < r.end)
        x = P[m]
        inside = ((x >= 0) & (x <= 1)).all(axis=1)
        # level 1 Hilbert, independent: quadrant (x<.5,y<.5)->0, (x<.5,y>=.5)->1, (>=,>=)->2, (>=,<)->3
        xi = x[inside]
        qx, qy = xi[:, 0] >= 0.5, xi[:, 1] >= 0.5
        quad = np.where(~qx, np.where(qy, 1, 0), np.where(qy, 2, 3))
        keys, counts = np.unique(quad, return_counts=True)
        assert r["quad"].as_dict() == dict(zip(keys.tolist(), counts.tolist()))
        assert r["quad"].overflow == (~inside).sum()
        k4, c4 = np.unique(curve_keys(xi, np.zeros(2), np.ones(2), "morton", 4), return_counts=True)
        np.testing.assert_array_equal(r["m4"].keys, k4)
        np.testing.assert_array_equal(r["m4"].counts, c4)


def test_window_kmeans_matches_sklearn_with_same_init():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(8)
    n = 3000
    T = np.sort(rng.uniform(0, 30, n))
    centers = rng.uniform(0, 10, (4, 2))
    P = centers[rng.integers(0, 4, n)] + 0.4 * rng.standard_normal((n, 2))
    km = WindowKMeans(4, seed=3, max_iter=300, tol=0.0, max_points=5000)
    res = list(WindowedAggregator(WindowSpec(10.0, slide=5.0), km).process(
        [(P[s:s + 400], np.arange(s, min(n, s + 400)), T[s:s + 400]) for s in range(0, n, 400)]))
    assert len(res) == 7
    for r in res:
        x = P[(T >= r.start) & (T < r.end)]
        out = r["kmeans"]
        assert out.sample_size == out.n_seen == len(x) == r.count
        ref = KMeans(4, init=out.init_centers, n_init=1, algorithm="lloyd", tol=0.0, max_iter=300).fit(x)
        np.testing.assert_allclose(out.centers, ref.cluster_centers_, rtol=0, atol=1e-9)
        assert out.inertia == pytest.approx(ref.inertia_, rel=1e-9)
        assert out.converged and out.counts.sum() == len(x)
        # the seeds are points of the window
        assert all((np.abs(x - c).sum(axis=1) == 0).any() for c in out.init_centers)


def test_window_kmeans_reservoir_bounds_memory():
    rng = np.random.default_rng(9)
    n = 20000
    P = rng.normal(size=(n, 2)) + np.where(rng.random(n) < 0.5, -3, 3)[:, None]
    T = rng.uniform(0, 1, n)
    km = WindowKMeans(2, seed=1, max_points=500)
    agg = WindowedAggregator(WindowSpec(10.0), km)
    for s in range(0, n, 3000):
        agg.add(P[s:s + 3000], None, T[s:s + 3000])
    state = agg._open[0].states[0]
    assert state.sample.shape == (500, 2)
    sample = km.sample(state)
    # the sample is made of window points, none twice, and about uniform (half the points in each blob)
    rows = {tuple(p) for p in P.tolist()}
    assert all(tuple(p) in rows for p in sample.tolist()) and len({tuple(p) for p in sample.tolist()}) == 500
    assert abs((sample[:, 0] > 0).mean() - (P[:, 0] > 0).mean()) < 0.1
    (r,) = agg.flush()
    out = r["kmeans"]
    assert out.sample_size == 500 and out.n_seen == n
    np.testing.assert_allclose(np.sort(out.centers[:, 0]), [-3, 3], atol=0.3)


def test_kmeans_helpers_degenerate_inputs():
    rng = np.random.default_rng(0)
    same = np.ones((5, 2))
    c = kmeans_plus_plus(same, 3, rng)
    assert c.shape == (3, 2) and (c == 1).all()
    C, lab, inertia, _, _ = lloyd_kmeans(same, c)
    assert inertia == 0 and lab.shape == (5,)
    # fewer points than k: k' = number of points
    km = WindowKMeans(5)
    agg = WindowedAggregator(WindowSpec(1.0), km)
    agg.add(np.array([[0.0, 0.0], [1.0, 1.0]]), None, np.array([0.1, 0.2]))
    (r,) = agg.flush()
    assert r["kmeans"].centers.shape == (2, 2) and r["kmeans"].inertia == 0


def test_custom_aggregation_without_prepare():
    from distspatial.live.windows import Aggregation

    class BoundingBox(Aggregation):
        name = "bbox"

        def new_state(self, window):
            return {"lo": np.full(2, np.inf), "hi": np.full(2, -np.inf), "ids": 0, "window": window}

        def update(self, state, points, ids, timestamps):
            assert (timestamps >= state["window"].start).all() and (timestamps < state["window"].end).all()
            state["lo"] = np.minimum(state["lo"], points.min(axis=0))
            state["hi"] = np.maximum(state["hi"], points.max(axis=0))
            state["ids"] += int(ids.sum())

        def result(self, state):
            return state["lo"], state["hi"], state["ids"]

    rng = np.random.default_rng(11)
    P, I, T = rng.random((1000, 2)), np.arange(1000), np.sort(rng.uniform(0, 20, 1000))
    res = list(WindowedAggregator(WindowSpec(6.0, slide=2.0), BoundingBox(), GridCounts([0, 0], [1, 1], 2)).process(
        [(P[s:s + 128], I[s:s + 128], T[s:s + 128]) for s in range(0, 1000, 128)]))
    assert len(res) == 12
    for r in res:
        m = (T >= r.start) & (T < r.end)
        lo, hi, idsum = r["bbox"]
        np.testing.assert_array_equal(lo, P[m].min(axis=0))
        np.testing.assert_array_equal(hi, P[m].max(axis=0))
        assert idsum == I[m].sum() and r["grid"].counts.sum() == m.sum() == r.count
