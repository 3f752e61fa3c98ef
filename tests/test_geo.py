"""Geographic data sets (issue 16 part 1): longitude/latitude in, great-circle metres out, on a real Ray runtime.

References are independent of our code paths: scikit-learn's ``BallTree(metric="haversine")`` and
``DBSCAN(metric="haversine")`` on ``[lat, lon]`` radians (times the mean Earth radius), numpy for boxes, and
scikit-learn ``KMeans`` on the 3-D embedding for the k-means objective. The points have dense clusters at both
poles (some exactly on them) and on both sides of the antimeridian (Fiji, the Aleutians), plus a uniform
background; queries sit there too.
"""

from __future__ import annotations

import numpy as np
import pytest

from distspatial import DistributedSpatialCluster, NodeConfig
from distspatial.core.crs import resolve_crs
from distspatial.core.geo import EARTH_RADIUS_M, lonlat_to_unit

R = EARTH_RADIUS_M


def _sphere(rng, n):
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return np.column_stack([np.degrees(np.arctan2(v[:, 1], v[:, 0])), np.degrees(np.arcsin(v[:, 2]))])


def _blob(rng, n, lon, lat, spread_deg):
    lo = lon + rng.normal(0, spread_deg, n)
    la = np.clip(lat + rng.normal(0, spread_deg, n), -90, 90)
    return np.column_stack([np.mod(lo + 180.0, 360.0) - 180.0, la])


def make_points(seed=0, n_uniform=6000):
    rng = np.random.default_rng(seed)
    parts = [
        _sphere(rng, n_uniform),
        _blob(rng, 1500, 0, 89.7, 0.2),            # north pole
        _blob(rng, 1500, 120, -89.8, 0.15),        # south pole
        _blob(rng, 1500, 179.95, -17.5, 0.08),     # Fiji: both sides of the antimeridian
        _blob(rng, 1500, -179.95, 51.8, 0.1),      # Aleutians
        np.column_stack([rng.uniform(-180, 180, 20), np.full(20, 90.0)]),   # exactly on the poles
        np.column_stack([rng.uniform(-180, 180, 20), np.full(20, -90.0)]),
        np.column_stack([np.full(30, 180.0), rng.uniform(-60, 60, 30)]),     # on the antimeridian itself
        np.column_stack([np.full(30, -180.0), rng.uniform(-60, 60, 30)]),
    ]
    return np.concatenate(parts)


def make_queries(seed=1):
    rng = np.random.default_rng(seed)
    return np.concatenate([
        _sphere(rng, 150),
        _blob(rng, 60, 180.0, -17.5, 0.1),
        _blob(rng, 60, -180.0, 51.8, 0.1),
        _blob(rng, 40, 45.0, 89.9, 0.1),
        _blob(rng, 40, -100.0, -89.9, 0.1),
        np.array([[180.0, 0.0], [-180.0, 10.0], [0.0, 90.0], [33.0, -90.0]]),
    ])


def rad(lonlat):
    return np.radians(np.asarray(lonlat)[:, ::-1])  # sklearn's haversine: [lat, lon] radians


@pytest.fixture(scope="module")
def pts():
    return make_points()


@pytest.fixture(scope="module")
def tree(pts):
    from sklearn.neighbors import BallTree

    return BallTree(rad(pts), metric="haversine")


@pytest.fixture(scope="module")
def cluster(ray_local, pts):
    cfg = NodeConfig().with_node_count(3).with_partitions_per_node(3).replace(cpus_per_node=0.2).with_crs("EPSG:4326")
    c = DistributedSpatialCluster(cfg)
    c.progress = False
    c.distribute_data(pts)
    yield c
    c.shutdown()


def assert_knn_haversine(tree, pts, q, dist, ids, k, eps_m=1e-4):
    """Distances equal BallTree's haversine x R; ids equal wherever the reference distance at that rank is
    separated from its neighbours by more than ``eps_m`` (ties may come back in any order); every id is a
    real point at the reported distance; no repeats."""
    rd, ri = tree.query(rad(q), k + 1)
    rd = rd * R
    np.testing.assert_allclose(dist, rd[:, :k], rtol=1e-9, atol=1e-5)
    # the returned ids' own distances, by haversine (independent of our chord)
    lat1, lon1 = rad(q)[:, None, 0], rad(q)[:, None, 1]
    p = rad(pts)[ids]
    lat2, lon2 = p[..., 0], p[..., 1]
    h = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    own = 2 * R * np.arcsin(np.sqrt(np.minimum(h, 1.0)))
    np.testing.assert_allclose(own, dist, rtol=1e-9, atol=1e-5)
    gaps = np.diff(rd, axis=1)
    sep = np.ones_like(rd[:, :k], dtype=bool)
    sep[:, 1:] &= gaps[:, :k - 1] > eps_m
    sep &= gaps[:, :k] > eps_m
    assert sep.mean() > 0.75  # the points exactly on a pole are ties
    np.testing.assert_array_equal(ids[sep], ri[:, :k][sep])
    s = np.sort(ids, axis=1)
    assert not (s[:, 1:] == s[:, :-1]).any()


def test_knn_metres_against_balltree(cluster, pts, tree):
    q = make_queries()
    k = 10
    dist, ids = cluster.distributed_knn_search(q, k)
    assert_knn_haversine(tree, pts, q, dist, ids, k)
    # one query (the one-hop path) across the antimeridian
    d1, i1 = cluster.distributed_knn_search(np.array([179.99, -17.5]), 5)
    assert d1.shape == (5,)
    assert_knn_haversine(tree, pts, np.array([[179.99, -17.5]]), d1[None], i1[None], 5)
    # neighbours on both sides: a query at 180 finds points at lon < -179 and > 179
    _, ids_am = cluster.distributed_knn_search(np.array([180.0, -17.5]), 50)
    lons = pts[ids_am, 0]
    assert (lons > 179).any() and (lons < -179).any()
    assert cluster.crs == "EPSG:4326" and cluster.geographic and cluster.dim == 2
    m = cluster.metadata
    assert m.dim == 3 and m.user_dim == 2 and m.crs == "EPSG:4326" and m.geographic


def test_range_metres_against_balltree(cluster, pts, tree):
    q = make_queries(2)
    radii = np.random.default_rng(3).choice([500.0, 5_000.0, 50_000.0, 400_000.0], len(q))
    got = cluster.range_search(q, radii)
    ref = tree.query_radius(rad(q), radii / R)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, np.sort(r))
    # one centre, return_points: lon/lat back within ~1e-13 degrees (antimeridian may read as -180)
    ids, p = cluster.range_search(np.array([-179.999, -17.5]), 30_000.0, return_points=True)
    np.testing.assert_array_equal(ids, np.sort(tree.query_radius(rad(np.array([[-179.999, -17.5]])), 30_000 / R)[0]))
    dl = np.abs(p - pts[ids])
    dl[:, 0] = np.minimum(dl[:, 0], 360 - dl[:, 0])
    assert dl.max() < 1e-9
    # inclusive at the radius: the distance to a point (as we report it) includes that point
    d, i = cluster.distributed_knn_search(np.array([179.97, -17.4]), 3)
    assert i[2] in cluster.range_search(np.array([179.97, -17.4]), float(d[2]))


def test_knn_join_and_distance_matrix_in_metres(cluster, pts, tree):
    q = make_queries(4)[:100]
    d, i = cluster.knn_join(q, k=4)
    assert_knn_haversine(tree, pts, q, d, i, 4)
    a, b = q[:20], q[20:50]
    D = cluster.distance_matrix(a, b)
    from sklearn.metrics.pairwise import haversine_distances

    np.testing.assert_allclose(D, haversine_distances(rad(a), rad(b)) * R, rtol=1e-9, atol=1e-5)


def _box_ref(pts, lo, hi):
    lon, lat = pts[:, 0], pts[:, 1]
    ok_lat = (lat >= lo[1]) & (lat <= hi[1])
    if lo[0] <= hi[0]:
        ok_lon = ((lon >= lo[0]) & (lon <= hi[0])) | ((np.abs(lon) == 180) & (lo[0] <= -lon) & (-lon <= hi[0]))
    else:
        ok_lon = (lon >= lo[0]) | (lon <= hi[0])
    return np.flatnonzero(ok_lat & ok_lon)


def test_box_search_antimeridian_and_poles(cluster, pts):
    boxes = [
        ((179.9, -18.0), (-179.9, -17.0)),   # across the antimeridian (Fiji)
        ((170.0, 40.0), (-170.0, 60.0)),     # across it, Aleutians
        ((-10.0, 89.5), (100.0, 90.0)),      # touching the north pole
        ((-180.0, -90.0), (180.0, -89.8)),   # a cap around the south pole
        ((0.0, -90.0), (0.0, 90.0)),         # a meridian: only points exactly on it
        ((179.0, -60.0), (180.0, 60.0)),     # up to the antimeridian: -180 is the same meridian
        ((-30.0, -20.0), (60.0, 35.0)),
    ]
    lo = np.array([b[0] for b in boxes])
    hi = np.array([b[1] for b in boxes])
    got = cluster.box_search(lo, hi)
    for j, g in enumerate(got):
        np.testing.assert_array_equal(g, _box_ref(pts, lo[j], hi[j]), err_msg=f"box {boxes[j]}")
    assert len(got[0]) > 100 and len(got[3]) > 20
    ids, p = cluster.box_search(lo[0], hi[0], return_points=True)
    np.testing.assert_array_equal(ids, got[0])
    assert p.shape == (len(ids), 2) and (np.abs(p[:, 0]) >= 179.9 - 1e-9).all()
    # wrapped corners: (-190, 10) is (170, 10); a box 360 degrees wide holds every longitude
    np.testing.assert_array_equal(cluster.box_search([-190.0, 40.0], [-170.0, 60.0]), got[1])
    everything = cluster.box_search([-180.0, -90.0], [180.0, 90.0])
    assert len(everything) == len(pts)
    np.testing.assert_array_equal(cluster.box_search([0.0, -90.0], [360.0, 90.0]), everything)
    with pytest.raises(ValueError, match="lat_lo <= lat_hi"):
        cluster.box_search([0.0, 10.0], [1.0, 5.0])


def test_dbscan_metres_against_sklearn_haversine(cluster, pts):
    from sklearn.cluster import DBSCAN

    eps_m, ms = 15_000.0, 8
    res = cluster.distributed_dbscan(eps_m, ms)
    ref = DBSCAN(eps=eps_m / R, min_samples=ms, metric="haversine", algorithm="ball_tree").fit(rad(pts))
    assert np.array_equal(res.core_sample_indices, ref.core_sample_indices_), "same core points"
    assert np.array_equal(res.labels == -1, ref.labels_ == -1), "same noise"
    core = ref.core_sample_indices_
    assert np.array_equal(res.labels[core], ref.labels_[core]), "same clusters, numbered as sklearn"
    assert res.n_clusters == ref.labels_.max() + 1 >= 4


def test_kmeans_on_the_sphere(cluster, pts):
    from sklearn.cluster import KMeans

    k = 6
    res = cluster.distributed_kmeans(k, tol=0.0, seed=3)
    c = res.centroids
    assert c.shape == (k, 2) and (np.abs(c[:, 1]) <= 90).all() and (np.abs(c[:, 0]) <= 180).all()
    xyz = lonlat_to_unit(pts)
    # each centroid is the mean direction of its points (labels converged: tol=0)
    for j in range(k):
        mean = xyz[res.labels == j].mean(axis=0)
        np.testing.assert_allclose(lonlat_to_unit(c[j:j + 1])[0], mean / np.linalg.norm(mean), atol=1e-9)
    ours = sum(np.square(xyz[res.labels == j] - xyz[res.labels == j].mean(axis=0)).sum() for j in range(k))
    np.testing.assert_allclose(res.inertia, ours, rtol=1e-6)
    ref = KMeans(k, n_init=3, random_state=0).fit(xyz)
    assert ours <= ref.inertia_ * 1.05, (ours, ref.inertia_)
    # init as lon/lat
    res2 = cluster.distributed_kmeans(2, init=np.array([[0.0, 89.0], [0.0, -89.0]]), max_iterations=5)
    assert res2.centroids[0, 1] > 0 > res2.centroids[1, 1]


def test_hierarchical_geographic(cluster):
    labels, _ = cluster.distributed_hierarchical(n_clusters=4, n_micro_clusters=200)
    assert labels.max() + 1 == 4
    with pytest.raises(ValueError, match="n_clusters"):
        cluster.distributed_hierarchical(distance_threshold=0.1)


def test_bad_coordinates_name_the_row(cluster):
    bad = np.array([[0.0, 0.0], [10.0, 91.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match=r"row 1: latitude 91\.0 is outside \[-90, 90\]"):
        cluster.ingest(bad)
    with pytest.raises(ValueError, match=r"row 2 has a non-finite"):
        cluster.distributed_knn_search(np.array([[0.0, 0.0], [1.0, 1.0], [np.nan, 1.0]]), 1)
    with pytest.raises(ValueError, match="longitude, latitude"):
        cluster.distributed_knn_search(np.array([0.0, 0.0, 1.0]), 1)
    with pytest.raises(ValueError, match=r"row 0: latitude -95"):
        cluster.range_search(np.array([[0.0, -95.0]]), 10.0)
    with pytest.raises(ValueError, match="latitude"):
        cluster.box_search([0.0, 0.0], [1.0, 95.0])
    n = cluster.n_points
    # longitude 540 wraps to 180; -190 to 170
    new = cluster.ingest(np.array([[540.0, 3.0], [-190.0, -3.0]]), ids=np.array([10**6, 10**6 + 1]))
    d, i = cluster.distributed_knn_search(np.array([[-180.0, 3.0], [170.0, -3.0]]), 1)
    np.testing.assert_array_equal(i[:, 0], new)
    assert d.max() < 1e-6
    ids, p = cluster.range_search(np.array([180.0, 3.0]), 1.0, return_points=True)
    assert list(ids) == [10**6] and abs(abs(p[0, 0]) - 180) < 1e-9 and abs(p[0, 1] - 3) < 1e-9
    cluster.update(np.array([10**6]), np.array([[0.0, 0.5]]))
    d, i = cluster.distributed_knn_search(np.array([0.0, 0.5]), 1)
    assert i[0] == 10**6 and d[0] < 1e-6
    assert cluster.delete(new) == 2
    assert cluster.n_points == n


def test_crs_resolution_and_config():
    assert resolve_crs("epsg:4326").name == "EPSG:4326"
    assert resolve_crs("OGC:CRS84").geographic
    assert resolve_crs(4326).geographic
    merc = resolve_crs("EPSG:3857")
    assert not merc.geographic and merc.units == "metre"
    assert resolve_crs(None) is None
    with pytest.raises(ValueError, match="pyproj recognises"):
        resolve_crs("EPSG:99999999")
    assert NodeConfig().with_crs("WGS84").crs == "EPSG:4326"
    with pytest.raises(ValueError):
        NodeConfig().with_crs("not a crs")


def test_crs_survives_checkpoint_restore_and_attach(cluster, pts, tree, tmp_path):
    ck = cluster.checkpoint(str(tmp_path / "ck"))
    q = make_queries(5)[:50]
    cfg = NodeConfig().with_node_count(2).with_partitions_per_node(2).replace(cpus_per_node=0.2)  # no crs given
    restored = DistributedSpatialCluster.restore(ck, cfg)
    try:
        assert restored.crs == "EPSG:4326" and restored.geographic
        assert restored.statistics().crs == "EPSG:4326"
        pytest.importorskip("fastapi")
        from distspatial.ui.service import ServiceMetrics, StatusCollector

        status = StatusCollector(restored, ServiceMetrics()).get()["cluster"]
        assert status["crs"] == "EPSG:4326" and status["dim"] == 2
        d, i = restored.distributed_knn_search(q, 3)
        assert_knn_haversine(tree, pts, q, d, i, 3)
    finally:
        restored.shutdown()


def test_named_cluster_attach_and_projected_crs(ray_local):
    rng = np.random.default_rng(9)
    ll = np.column_stack([rng.uniform(-180, 180, 3000), rng.uniform(-90, 90, 3000)])
    cfg = NodeConfig().with_node_count(2).with_partitions_per_node(2).replace(cpus_per_node=0.2) \
        .with_name("geo-attach-test")
    c = DistributedSpatialCluster(cfg)
    other = None
    try:
        c.progress = False
        c.distribute_data(ll, crs="OGC:CRS84")
        other = DistributedSpatialCluster.attach("geo-attach-test")
        assert other.crs == "OGC:CRS84" and other.geographic
        info = [x for x in DistributedSpatialCluster.list_clusters() if x.get("name") == "geo-attach-test"][0]
        assert info["crs"] == "OGC:CRS84" and info["dim"] == 2
        from sklearn.neighbors import BallTree

        d, i = other.distributed_knn_search(ll[:20], 2)
        rd, ri = BallTree(rad(ll), metric="haversine").query(rad(ll[:20]), 2)
        np.testing.assert_allclose(d, rd * R, rtol=1e-9, atol=1e-5)
        # a projected CRS is only carried: Euclidean distances in its units
        xy = rng.random((500, 2)) * 1e5
        c.distribute_data(xy, crs="EPSG:3857")
        other.metadata  # the attached client sees the new data set
        assert other.crs == "EPSG:3857" and not other.geographic
        d, _ = other.distributed_knn_search(xy[:5] + 1.0, 1)
        np.testing.assert_allclose(d, np.sqrt(2.0), rtol=1e-9)
    finally:
        if other is not None:
            other.close()
        c.shutdown()


def test_distribute_chunks_and_files_geographic(cluster, pts, tree, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pts.parquet"
    pq.write_table(pa.table({"lon": pts[:, 0], "lat": pts[:, 1]}), path, row_group_size=4000)
    q = make_queries(6)[:60]
    cluster.distribute_files(str(path), columns="lon,lat", crs="EPSG:4326")
    assert cluster.geographic
    d, i = cluster.distributed_knn_search(q, 5)
    assert_knn_haversine(tree, pts, q, d, i, 5)
    cluster.distribute_chunks(str(path), columns="lon,lat", chunk_rows=5000)  # crs from the config
    d, i = cluster.distributed_knn_search(q, 5)
    assert_knn_haversine(tree, pts, q, d, i, 5)
    bad = pts.copy()
    bad[7000, 1] = 100.0
    pq.write_table(pa.table({"lon": bad[:, 0], "lat": bad[:, 1]}), tmp_path / "bad.parquet", row_group_size=4000)
    with pytest.raises(ValueError, match="row 7000"):
        cluster.distribute_chunks(str(tmp_path / "bad.parquet"), columns="lon,lat", chunk_rows=5000)
    with pytest.raises(ValueError, match="row 7000"):
        cluster.distribute_files(str(tmp_path / "bad.parquet"), columns="lon,lat")
    cluster.distribute_data(pts)  # as the other tests expect


def _read_parts(d):
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(glob.glob(str(d / "part-*.parquet")))
    assert files
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pandas()


def test_node_written_outputs_geographic(cluster, pts, tree, tmp_path):
    """kNN join and range search of a Parquet query file (lon/lat) written by the nodes into a directory:
    distances in metres against BallTree(haversine); range inclusive, by metres; a bad row named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    q = make_queries(7)
    rng = np.random.default_rng(8)
    radii = rng.choice([1_000.0, 20_000.0, 300_000.0], len(q))
    qf = tmp_path / "q.parquet"
    pq.write_table(pa.table({"lon": q[:, 0], "lat": q[:, 1], "r": radii}), qf, row_group_size=100)
    k = 4
    out = cluster.knn_join(str(qf), k=k, columns="lon,lat", output=str(tmp_path / "j") + "/")
    t = _read_parts(tmp_path / "j").sort_values(["query", "rank"])
    assert len(t) == len(q) * k and t["rank"].min() == 1 and t["rank"].max() == k
    assert out == str(tmp_path / "j")
    assert_knn_haversine(tree, pts, q, t["distance"].to_numpy().reshape(-1, k), t["id"].to_numpy().reshape(-1, k), k)

    def check_range(t, r):
        ref = tree.query_radius(rad(q), r / R)
        got = t.sort_values(["query", "id"])
        counts = np.bincount(got["query"].to_numpy(), minlength=len(q))
        np.testing.assert_array_equal(counts, [len(x) for x in ref])
        np.testing.assert_array_equal(got["id"].to_numpy(), np.concatenate([np.sort(x) for x in ref]))
        qi = got["query"].to_numpy()
        a, b = rad(q)[qi], rad(pts)[got["id"].to_numpy()]  # haversine of each hit, independent of our chord
        h = (np.sin((b[:, 0] - a[:, 0]) / 2) ** 2
             + np.cos(a[:, 0]) * np.cos(b[:, 0]) * np.sin((b[:, 1] - a[:, 1]) / 2) ** 2)
        own = 2 * R * np.arcsin(np.sqrt(np.minimum(h, 1.0)))
        np.testing.assert_allclose(got["distance"].to_numpy(), own, rtol=1e-9, atol=1e-5)
        assert (got["distance"].to_numpy() <= r[qi]).all()

    cluster.range_search(str(qf), 50_000.0, columns="lon,lat", output=str(tmp_path / "r1") + "/")
    check_range(_read_parts(tmp_path / "r1"), np.full(len(q), 50_000.0))
    cluster.range_search(str(qf), "r", columns="lon,lat", output=str(tmp_path / "r2") + "/")
    check_range(_read_parts(tmp_path / "r2"), radii)
    # an array of centres into one file: metres too
    f = cluster.range_search(q, 50_000.0, output=str(tmp_path / "r3.parquet"))
    check_range(pq.read_table(f).to_pandas(), np.full(len(q), 50_000.0))
    # inclusive at the radius: a point at exactly the reported kNN distance is found
    d = float(t["distance"].to_numpy()[2])
    pq.write_table(pa.table({"lon": q[:1, 0], "lat": q[:1, 1]}), tmp_path / "one.parquet")
    cluster.range_search(str(tmp_path / "one.parquet"), d, output=str(tmp_path / "r4") + "/")
    assert int(t["id"].to_numpy()[2]) in set(_read_parts(tmp_path / "r4")["id"])
    bad = q.copy()
    bad[150, 1] = 95.0
    pq.write_table(pa.table({"lon": bad[:, 0], "lat": bad[:, 1]}), tmp_path / "bad.parquet", row_group_size=100)
    with pytest.raises(ValueError, match=r"bad\.parquet.*row 150"):
        cluster.knn_join(str(tmp_path / "bad.parquet"), k=2, output=str(tmp_path / "jb") + "/")
