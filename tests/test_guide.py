"""Runs every ``python`` block of docs/guide.md in order, in one namespace, on a real local Ray runtime, and
checks what each block computed against independent references: scipy cKDTree / numpy for queries, joins and
the live index (a model of ids and points kept by the test), numpy Lloyd conditions for k-means, cKDTree core
points and eps-connectivity for DBSCAN, numpy histograms for the stream's windows, PNG files for the plots, a
restored checkpoint for the last block."""

import contextlib
import io
import pathlib
import re

import numpy as np
import pytest
from scipy.spatial import cKDTree

GUIDE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "guide.md"


def guide_blocks() -> list[tuple[str, str]]:
    """``(section title, code)`` of every python block, in order."""
    text = GUIDE.read_text()
    out = []
    for title, body in re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M):
        out += [(title.strip(), code) for code in re.findall(r"```python\n(.*?)```", body, flags=re.S)]
    assert len(out) == len(re.findall(r"```python\n", text)), "every python block sits under a ## section"
    return out


class Model:
    """What the index should hold: point ids and their coordinates, kept independently of the library."""

    def __init__(self, ids, pts):
        self.pos = dict(zip(np.asarray(ids).tolist(), np.asarray(pts)))

    def add(self, ids, pts):
        for i, p in zip(np.asarray(ids).tolist(), np.asarray(pts)):
            assert i not in self.pos, f"id {i} given twice"
            self.pos[i] = p

    def arrays(self):
        ids = np.array(sorted(self.pos))
        return ids, np.array([self.pos[i] for i in ids.tolist()])

    def assert_knn(self, queries, dist, ids, k):
        """Distances equal cKDTree's over the model; every id is a model point at its reported distance."""
        mids, mpts = self.arrays()
        rd, _ = cKDTree(mpts).query(queries, k)
        dist, ids = np.asarray(dist).reshape(len(queries), k), np.asarray(ids).reshape(len(queries), k)
        np.testing.assert_allclose(dist, np.asarray(rd).reshape(len(queries), k), rtol=0, atol=1e-12)
        own = np.linalg.norm(np.array([[self.pos[i] for i in row] for row in ids.tolist()]) - queries[:, None], axis=2)
        np.testing.assert_allclose(own, dist, rtol=0, atol=1e-12)
        assert all(len(set(row)) == k for row in ids.tolist()), "an id twice in one answer"


def check_start(ns, out, st):
    points, meta, cluster = ns["points"], ns["meta"], ns["cluster"]
    assert points.shape == (200_000, 2) and np.isfinite(points).all()
    assert meta.n_points == len(points) and sum(p.size for p in meta.partitions) == len(points)
    live = set(cluster.live_node_ids)
    assert len(live) == 3
    assert all(len(set(p.owners)) == 2 and set(p.owners) <= live for p in meta.partitions), "2 replicas each"
    for p in meta.partitions:  # bounding boxes inside the data's bounds
        assert np.all(p.lo >= points.min(0)) and np.all(p.hi <= points.max(0)) and np.all(p.lo <= p.hi)
    assert np.array_equal(cluster.point_ids(), np.arange(len(points)))
    assert f"points={len(points)}" in out.replace(",", "").replace("_", ""), out
    st["model"] = Model(np.arange(len(points)), points)
    st["tree"] = cKDTree(points)


def check_queries(ns, out, st):
    points, tree = ns["points"], st["tree"]
    queries, dist, ids = ns["queries"], ns["dist"], ns["ids"]
    assert dist.shape == ids.shape == (5_000, 10)
    st["model"].assert_knn(queries, dist, ids, 10)
    np.testing.assert_array_equal(ns["inside"], np.sort(tree.query_ball_point([0.5, 0.5], 0.05)))
    in_box = np.flatnonzero(((points >= [0.1, 0.1]) & (points <= [0.3, 0.2])).all(1))
    np.testing.assert_array_equal(ns["box"], in_box)
    assert out.split() == [str(len(ns["inside"])), str(len(in_box))]


def check_clustering(ns, out, st):
    points, km = ns["points"], ns["km"]
    # k-means: labels are the nearest centroids, inertia is theirs, centroids are (nearly, tol) their means
    assert km.centroids.shape == (8, 2) and km.labels.shape == (len(points),) and 1 <= km.n_iter <= 50
    d2 = ((points[:, None, :] - km.centroids[None]) ** 2).sum(-1)
    assert np.array_equal(km.labels, d2.argmin(1)), "labels are the nearest centroids"
    assert km.inertia == pytest.approx(d2.min(1).sum(), rel=1e-9)
    means = np.array([points[km.labels == j].mean(0) for j in range(8)])
    np.testing.assert_allclose(km.centroids, means, atol=5e-3)  # converged within tol (n_iter < 50 here)
    # hierarchical (Ward over micro-clusters): a valid scipy linkage, 8 flat clusters, and a clustering about as
    # tight as k-means' (scrambled labels would be ~8 times worse)
    from scipy.cluster.hierarchy import fcluster, is_monotonic, is_valid_linkage

    labels, Z = ns["labels"], ns["Z"]
    assert is_valid_linkage(Z) and is_monotonic(Z)
    assert Z[-1, 3] == Z.shape[0] + 1, "the root holds every micro-cluster"
    assert len(np.unique(fcluster(Z, 8, "maxclust"))) == 8
    assert labels.shape == (len(points),) and np.array_equal(np.unique(labels), np.arange(8))
    wss = sum(((points[labels == j] - points[labels == j].mean(0)) ** 2).sum() for j in range(8))
    assert wss < 1.5 * km.inertia, (wss, km.inertia)
    check_dbscan(points, ns["db"], eps=0.004, min_samples=20)
    assert f"{ns['db'].n_clusters} clusters, {ns['db'].n_noise} noise points" in out


def check_dbscan(points, db, eps, min_samples):
    """DBSCAN as sklearn defines it, checked with cKDTree: core points (at least ``min_samples`` points within
    ``eps``, itself included), clusters = eps-connected components of core points, numbered by their first core
    point, border points in the cluster of a core point within eps, the rest noise."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    tree = cKDTree(points)
    core = np.flatnonzero(tree.query_ball_point(points, eps, return_length=True) >= min_samples)
    np.testing.assert_array_equal(np.sort(db.core_sample_indices), core)
    lab, cl = db.labels, db.labels[core]
    assert (cl >= 0).all() and db.n_clusters == len(np.unique(cl)) and np.array_equal(np.unique(cl), np.arange(db.n_clusters))
    # no two core points within eps in different clusters
    cpts = points[core]
    for j in range(db.n_clusters):
        mine = cl == j
        lo, hi = cpts[mine].min(0) - eps, cpts[mine].max(0) + eps
        other = np.flatnonzero(~mine & ((cpts >= lo) & (cpts <= hi)).all(1))
        if len(other):
            d, _ = cKDTree(cpts[mine]).query(cpts[other], 1, distance_upper_bound=eps * (1 + 1e-9))
            assert np.all(d > eps), f"cluster {j} has a core point within eps of another cluster's"
    # each cluster connected: its core points' nearest core neighbours within eps connect it (a subgraph of the
    # eps-graph, so enough)
    d, nb = cKDTree(cpts).query(cpts, min_samples, distance_upper_bound=eps * (1 + 1e-9))
    rows = np.repeat(np.arange(len(core)), min_samples)
    ok = (d <= eps).reshape(-1)
    g = coo_matrix((np.ones(ok.sum(), bool), (rows[ok], nb.reshape(-1)[ok])), shape=(len(core),) * 2)
    n_comp, comp = connected_components(g, directed=False)
    assert n_comp == db.n_clusters and len(set(zip(comp.tolist(), cl.tolist()))) == n_comp, "clusters connected"
    first = np.array([core[cl == j].min() for j in range(db.n_clusters)])
    assert np.all(np.diff(first) > 0), "clusters numbered in the order of their first core point (as sklearn)"
    # border points and noise
    rest = np.setdiff1d(np.arange(len(points)), core)
    near = cKDTree(cpts).query_ball_point(points[rest], eps)
    for i, nbrs in zip(rest.tolist(), near):
        assert lab[i] == -1 if not nbrs else lab[i] in set(cl[nbrs].tolist()), (i, lab[i])
    assert db.n_noise == int((lab == -1).sum()) == sum(1 for n in near if not n)


def check_join(ns, out, st):
    points, tree, other = ns["points"], st["tree"], ns["other"]
    jd, ji, sd, si, D = ns["jd"], ns["ji"], ns["sd"], ns["si"], ns["D"]
    assert jd.shape == ji.shape == (len(other), 3)
    st["model"].assert_knn(other, jd, ji, 3)
    assert sd.shape == si.shape == (len(points), 1)
    rd, _ = tree.query(points, 2)
    np.testing.assert_allclose(sd[:, 0], rd[:, 1], rtol=0, atol=1e-12)  # the nearest point other than itself
    assert not np.any(si[:, 0] == np.arange(len(points)))
    np.testing.assert_allclose(np.linalg.norm(points[si[:, 0]] - points, axis=1), sd[:, 0], rtol=0, atol=1e-12)
    from scipy.spatial.distance import cdist

    assert D.shape == (500, 300)
    np.testing.assert_allclose(D, cdist(other[:500], other[:300]), rtol=0, atol=1e-12)


def check_nodes_write(ns, out, st):
    """The part files' union against cKDTree: every query's k nearest (rank from 1), every (query, id) pair
    within its radius once, with its distance."""
    tree, qs, radii = st["tree"], ns["qs"], ns["radii"]
    knn, hits = ns["knn"], ns["hits"]
    q, rank, dist = (knn[c].to_numpy() for c in ("query", "rank", "distance"))
    o = np.lexsort((rank, q))
    np.testing.assert_array_equal(q[o], np.repeat(np.arange(len(qs)), 3))
    np.testing.assert_array_equal(rank[o], np.tile([1, 2, 3], len(qs)))
    np.testing.assert_allclose(dist[o].reshape(-1, 3), tree.query(qs, 3)[0], rtol=0, atol=1e-12)
    found = tree.query_ball_point(qs, radii)
    ref_q = np.repeat(np.arange(len(qs)), [len(f) for f in found])
    ref_id = np.concatenate([np.sort(f) for f in found]).astype(np.int64)
    hq, hid, hd = (hits[c].to_numpy() for c in ("query", "id", "distance"))
    o = np.lexsort((hid, hq))
    np.testing.assert_array_equal(hq[o], ref_q)
    np.testing.assert_array_equal(hid[o], ref_id)
    np.testing.assert_allclose(hd[o], np.linalg.norm(ns["points"][ref_id] - qs[ref_q], axis=1), rtol=0, atol=1e-12)
    assert f"{len(ref_q)} points in range" in out


def check_typed(ns, out, st):
    res = ns["res"]
    assert res.distances.shape == res.ids.shape == (3, 2)
    st["model"].assert_knn(ns["queries"][:3], res.distances, res.ids, 2)


def check_live(ns, out, st):
    cluster, model, n0 = ns["cluster"], st["model"], len(ns["points"])
    new_ids = ns["new_ids"]
    assert np.array_equal(new_ids, np.arange(n0, n0 + 10_000)), "automatic ids continue after the data set's"
    # the block's inputs, drawn again: ingested, 100 moved, 100 deleted
    model.add(new_ids, np.random.default_rng(0).random((10_000, 2)))
    for i, p in zip(new_ids[:100].tolist(), np.random.default_rng(1).random((100, 2))):
        model.pos[i] = p
    for i in new_ids[100:200].tolist():
        del model.pos[i]
    ids, _ = model.arrays()
    assert cluster.metadata.n_points == len(ids) == n0 + 9_900
    assert f"points now: {len(ids)}" in out
    assert np.array_equal(cluster.point_ids(), ids)
    q = np.concatenate([np.random.default_rng(2).random((300, 2)), ns["points"][:50] + 1e-4,
                        np.array([model.pos[i] for i in new_ids[:50].tolist()])])  # moved points
    d, i = cluster.distributed_knn_search(q, 4)
    model.assert_knn(q, d, i, 4)


def check_stream(ns, out, st):
    cluster, model, feed, handle, events = ns["cluster"], st["model"], ns["feed"], ns["handle"], ns["events"]
    pts = np.concatenate([p for p, _ in feed])
    ts = np.concatenate([t for _, t in feed])
    assert handle.stats.points == len(pts) == 12_000 and handle.stats.batches == 6 and not handle.stats.errors
    first = max(model.pos) + 1
    stream_ids = np.arange(first, first + len(pts))  # streamed points get the next ids, in feed order
    model.add(stream_ids, pts)
    ids, _ = model.arrays()
    assert cluster.metadata.n_points == len(ids) and np.array_equal(cluster.point_ids(), ids)
    # windows: tumbling 20 s over event times 0..60; counts and 16x16 grid counts per window, top-3 hot spots
    wins = [e for e in events if hasattr(e, "aggregates")]
    assert [(w.start, w.end) for w in wins] == [(0.0, 20.0), (20.0, 40.0), (40.0, 60.0)]
    for w in wins:
        sel = (ts >= w.start) & (ts < w.end)
        assert w.count == sel.sum() and w.late_dropped == 0
        ref, _, _ = np.histogram2d(pts[sel, 0], pts[sel, 1], bins=16, range=[[0, 1], [0, 1]])
        grid = w.aggregates["grid"]
        assert grid.counts.shape == (16, 16) and grid.overflow == 0
        np.testing.assert_array_equal(grid.counts, ref.astype(grid.counts.dtype))
        flat = ref.reshape(-1)
        top = np.lexsort((np.arange(flat.size), -flat))[:3]  # count descending, then flat index
        assert [(h.flat_index, h.count) for h in w.aggregates["hotspots"]] == [(int(c), int(flat[c])) for c in top]
    assert wins[-1].final
    # geofence: every streamed point is a new object; those inside the box enter it, once, where they are
    inside = ((pts >= 0.45) & (pts <= 0.55)).all(1)
    fence = [e for e in events if type(e).__name__ == "GeofenceEvent"]
    assert all(e.fence_id == "centre" and e.kind == "enter" for e in fence)
    assert sorted(e.object_id for e in fence) == stream_ids[inside].tolist()
    for e in fence:
        np.testing.assert_array_equal(e.point, model.pos[e.object_id])
        assert e.timestamp == ts[e.object_id - first]
    # kNN watch: its answer is the exact 3-NN of [0.5, 0.5] over the index after the stream
    w_ids, w_d = ns["watch"].answer("hq")
    model.assert_knn(np.array([[0.5, 0.5]]), w_d[None], w_ids[None], 3)
    changes = [e for e in events if type(e).__name__ == "KnnChange"]
    assert changes and changes[0].initial and np.array_equal(changes[-1].new_ids, w_ids)
    assert len(fence) + len(wins) + len(changes) == len(events) == handle.stats.events
    c = ns["skm"].centroids
    assert c.shape == (4, 2) and np.all((c >= 0) & (c <= 1)) and len(np.unique(c.round(6), axis=0)) == 4


def check_plots(ns, out, st):
    import matplotlib.image

    for name in ("partitions.png", "kmeans.png", "heatmap.png"):
        f = pathlib.Path(ns["out"]) / name
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        img = matplotlib.image.imread(f)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0, (name, img.shape)
    assert ns["window"] is next(e for e in ns["events"] if hasattr(e, "aggregates"))


def check_service(ns, out, st):
    answer = ns["answer"]
    assert np.shape(answer["ids"]) == np.shape(answer["distances"]) == (1, 3)
    st["model"].assert_knn(np.array([[0.5, 0.5]]), answer["distances"], answer["ids"], 3)


def check_balance_checkpoint_stats(ns, out, st):
    from distspatial import DistributedSpatialCluster, NodeConfig

    plan, cluster, model = ns["plan"], ns["cluster"], st["model"]
    assert type(plan).__name__ == "RebalancePlan" and str(plan).splitlines()[0] in out
    ids, pts = model.arrays()
    head = re.search(r"distspatial cluster: (\d+) nodes, ([\d,]+) points", out)
    assert head and int(head[2].replace(",", "")) == len(ids), out
    rows = re.findall(r"^\s*\d+\s+alive\s+\d+\s+([\d,]+)\s", out, flags=re.M)
    assert len(rows) == int(head[1]) and sum(int(r.replace(",", "")) for r in rows) == 2 * len(ids), "2 replicas"
    with pytest.raises(RuntimeError, match="shut down"):
        cluster.distributed_knn_search(np.zeros(2), 1)
    # the checkpoint holds the index as it was: every id, at its place
    with DistributedSpatialCluster.restore(ns["ckpt"], NodeConfig().with_node_count(2)) as r:
        assert np.array_equal(r.point_ids(), ids)
        q = np.concatenate([np.random.default_rng(3).random((200, 2)), pts[::997] + 1e-4])
        d, i = r.distributed_knn_search(q, 5)
        model.assert_knn(q, d, i, 5)


def check_geo(ns, out, st):
    from sklearn.cluster import DBSCAN
    from sklearn.neighbors import BallTree

    from distspatial.core.geo import EARTH_RADIUS_M as R

    ll = ns["lonlat"]
    rad = np.radians(ll[:, ::-1])  # sklearn's haversine: [lat, lon] radians
    tree = BallTree(rad, metric="haversine")
    q = np.radians(ns["suva"][::-1])[None]
    rd, ri = tree.query(q, 5)
    assert np.allclose(ns["geo_d"], rd[0] * R, rtol=1e-9) and np.array_equal(ns["geo_i"], ri[0])
    assert np.array_equal(ns["geo_near"], np.sort(tree.query_radius(q, 250_000.0 / R)[0]))
    lon, lat = ll[:, 0], ll[:, 1]
    box = np.flatnonzero(((lon >= 177.0) | (lon <= -178.0)) & (lat >= -21.0) & (lat <= -15.0))
    assert np.array_equal(ns["geo_box"], box) and len(box) > 0
    c = ns["geo_km"].centroids
    assert c.shape == (4, 2) and np.all(np.abs(c[:, 1]) <= 90)
    ref = DBSCAN(eps=150_000.0 / R, min_samples=4, metric="haversine", algorithm="ball_tree").fit(rad)
    assert np.array_equal(ns["geo_db"].core_sample_indices, ref.core_sample_indices_)
    assert ns["geo_db"].n_clusters == ref.labels_.max() + 1
    assert out.startswith("EPSG:4326")


def check_geoparquet(ns, out, st):
    import geopandas as gpd
    import shapely

    town, ids = ns["town"], ns["town_gdf"]["id"].to_numpy()
    assert np.array_equal(ns["town_xy"], town)
    lo, hi = np.array([2000.0, 2000.0]), np.array([3000.0, 2600.0])
    inside = np.flatnonzero(np.all((town >= lo) & (town <= hi), axis=1))
    assert len(inside) and np.array_equal(ns["town_ids"], ids[inside])  # ids ascend with the rows here
    assert np.array_equal(ns["town_pts"], town[inside])
    hits = ns["town_hits"]
    assert isinstance(hits, gpd.GeoDataFrame) and np.array_equal(shapely.get_coordinates(hits.geometry.values),
                                                                  town[inside])
    back = gpd.read_parquet(ns["town_out"])
    assert back.crs.to_epsg() == 3857 and np.array_equal(shapely.get_coordinates(back.geometry.values), town[inside])
    assert out.startswith("EPSG:3857")


def check_polygons(ns, out, st):
    import geopandas as gpd

    g, d = ns["town_gdf"], ns["districts"]
    for predicate, res in (("within", ns["pip"]), ("intersects", ns["pip_border"])):
        j = gpd.sjoin(g, d, predicate=predicate)
        ref = np.stack([j["id"].to_numpy(), j["index_right"].to_numpy()], 1)
        ref = ref[np.lexsort((ref[:, 1], ref[:, 0]))]
        assert np.array_equal(np.stack([res.id, res.polygon], 1), ref)
        if predicate == "within":
            assert np.array_equal(ns["pip_counts"], np.bincount(ref[:, 1], minlength=len(d)))
            assert np.array_equal(ns["hole_ids"], ref[ref[:, 1] == 0, 0])


CHECKS = {
    "Start a cluster and distribute points": check_start,
    "Exact queries": check_queries,
    "k-means, hierarchical clustering, DBSCAN": check_clustering,
    "kNN join and distance matrix": check_join,
    "Results written by the nodes": check_nodes_write,
    "Typed queries": check_typed,
    "Live updates": check_live,
    "Streaming analytics": check_stream,
    "Plots (needs `distspatial[plots]`)": check_plots,
    "HTTP service and status page (needs `distspatial[serve]`)": check_service,
    "Load balancing, checkpoints, statistics": check_balance_checkpoint_stats,
    "Geographic data (longitude/latitude, metres)": check_geo,
    "GeoParquet and GeoPandas": check_geoparquet,
    "Polygon queries": check_polygons,
}


def test_guide_examples_run(ray_local):
    blocks = guide_blocks()
    assert len(blocks) >= 8, "the guide has one example per capability"
    assert [t for t, _ in blocks] == list(CHECKS), "each guide block has its check here (add one for a new block)"
    ns: dict = {}
    state: dict = {}
    try:
        for i, (title, code) in enumerate(blocks):
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    exec(compile(code, f"{GUIDE.name}[block {i}]", "exec"), ns)
            except Exception as exc:
                raise AssertionError(f"docs/guide.md block {i} ({title}) failed: {exc!r}\n{code}") from exc
            print(buf.getvalue(), end="")
            CHECKS[title](ns, buf.getvalue(), state)
    finally:
        if "cluster" in ns:
            ns["cluster"].shutdown()
