"""Geographic data on the command line, in the HTTP service and in the plots (issue 16 part 4), on a real Ray runtime.

References are independent of our code paths: scikit-learn's ``BallTree(metric="haversine")`` (times the mean
Earth radius) for kNN and radius, ``geopandas.sjoin`` / GeoSeries predicates for polygons, numpy for boxes across
the antimeridian. One geographic cluster and one server serve the service and plot tests; each CLI command starts
its own small cluster in the module's runtime.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.csv as pv
import pyarrow.parquet as pq
import pytest

gpd = pytest.importorskip("geopandas", reason="geodata needs the 'geo' extra: pip install 'distspatial[geo]'")
shapely = pytest.importorskip("shapely")
pytest.importorskip("fastapi", reason="the service needs the 'serve' extra")
requests = pytest.importorskip("requests", reason="the tests' HTTP client")
pytest.importorskip("matplotlib", reason="plots need the 'plots' extra")

from shapely.geometry import MultiPolygon, Polygon, box  # noqa: E402
from sklearn.neighbors import BallTree  # noqa: E402

from distspatial import DistributedSpatialCluster, NodeConfig  # noqa: E402
from distspatial.core.access import TokenSet  # noqa: E402
from distspatial.core.geo import EARTH_RADIUS_M  # noqa: E402
from distspatial.ui.cli import main  # noqa: E402
from distspatial.ui.service import BackgroundServer  # noqa: E402

R = EARTH_RADIUS_M
TIMEOUT = 30


def _tree(lonlat):
    return BallTree(np.radians(lonlat[:, ::-1]), metric="haversine")  # haversine takes [lat, lon] radians


def ref_knn(pts, q, k):
    d, i = _tree(pts).query(np.radians(np.atleast_2d(q)[:, ::-1]), k)
    return d * R, i


def ref_range(pts, q, r_m):
    ind, dist = _tree(pts).query_radius(np.radians(np.atleast_2d(q)[:, ::-1]), r_m / R, return_distance=True,
                                        sort_results=False)
    out = []
    for i, d in zip(ind, dist):
        o = np.argsort(i)
        out.append((i[o], d[o] * R))
    return out


def make_points(seed=0):
    rng = np.random.default_rng(seed)
    parts = [
        np.column_stack([rng.uniform(-180, 180, 1500), np.degrees(np.arcsin(rng.uniform(-1, 1, 1500)))]),
        np.column_stack([np.mod(179.9 + rng.normal(0, 0.3, 600) + 180, 360) - 180, rng.normal(-17.5, 0.3, 600)]),
        np.column_stack([rng.uniform(-180, 180, 300), rng.uniform(85, 90, 300)]),   # near the north pole
        np.column_stack([rng.normal(10, 3, 600), rng.normal(50, 2, 600)]),        # Europe, inside the polygons
    ]
    return np.concatenate(parts)


def make_polygons():
    """Boxes, a polygon with a hole, a multipolygon, polygons spanning several partitions (the whole northern
    mid-latitudes), and their vertices/edges also used as points."""
    hole = Polygon([(4, 44), (16, 44), (16, 56), (4, 56)], [[(8, 48), (12, 48), (12, 52), (8, 52)]])
    multi = MultiPolygon([box(170, -20, 179.5, -15), box(-179.5, -20, -170, -15)])
    return [hole, multi, box(9, 49, 11, 51), box(-180, 20, 180, 60),
            Polygon([(0, 80), (120, 80), (-120, 85), (0, 80)]), box(-50, -50, -40, -40)]


@pytest.fixture(scope="module")
def geo(ray_local, tmp_path_factory):
    d = tmp_path_factory.mktemp("geo_ui")
    pts = make_points()
    # points exactly on polygon vertices and edges: within excludes them, intersects includes them. Only those
    # whose lon/lat survive the stored unit vectors bit for bit: the nodes test the round-tripped coordinates
    # (exact to ~1e-14 degrees), which can move a point exactly on an edge to either side of it
    on = np.array([[4, 44], [16, 50], [10, 44], [8, 50], [12, 48], [9, 49], [10, 51], [170, -17.5], [-170, -20],
                   [16, 44], [4, 56], [10, 56], [12, 50], [11, 49], [-175, -15], [-180, 40]], dtype=float)
    from distspatial.core.geo import lonlat_to_unit, unit_to_lonlat

    on = on[(unit_to_lonlat(lonlat_to_unit(on)) == on).all(axis=1)]
    assert len(on) >= 8
    pts = np.concatenate([pts, on])
    ids = np.arange(len(pts), dtype=np.int64) * 3 + 11
    rng = np.random.default_rng(5)
    q = np.concatenate([np.column_stack([rng.uniform(-180, 180, 30), rng.uniform(-80, 80, 30)]),
                        [[179.95, -17.5], [-179.95, -17.4], [0.0, 89.9], [10.0, 50.0]]])
    pv.write_csv(pa.table({"id": ids, "lon": pts[:, 0], "lat": pts[:, 1]}), d / "pts.csv")
    pv.write_csv(pa.table({"lon": q[:, 0], "lat": q[:, 1]}), d / "q.csv")
    polys = make_polygons()
    gdf = gpd.GeoDataFrame({"name": [f"p{i}" for i in range(len(polys))]}, geometry=polys, crs="EPSG:4326")
    (d / "polys.geojson").write_text(gdf.to_json())
    gdf.to_parquet(d / "polys.parquet")
    (d / "polys.wkt").write_text("\n".join(p.wkt for p in polys) + "\n")
    (d / "lines.wkt").write_text("POLYGON ((0 0, 1 0, 1 1, 0 0))\nLINESTRING (0 0, 1 1)\n")
    points_gdf = gpd.GeoDataFrame({"id": ids}, geometry=gpd.points_from_xy(pts[:, 0], pts[:, 1]), crs="EPSG:4326")
    return SimpleNamespace(dir=d, pts=pts, ids=ids, q=q, polys=polys, gdf=gdf, points_gdf=points_gdf)


def _sjoin_pairs(geo, predicate):
    j = gpd.sjoin(geo.points_gdf, geo.gdf, predicate=predicate)
    pairs = np.column_stack([j["id"].to_numpy(), j["index_right"].to_numpy()]).astype(np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


# -- command line -------------------------------------------------------------------------------------------------
def test_cli_knn_and_range_on_lonlat_csv_with_crs(geo, capsys):
    d = geo.dir
    rc = main(["knn", str(d / "pts.csv"), "--columns", "lon,lat", "--id-column", "id", "--crs", "EPSG:4326",
               "--queries", str(d / "q.csv"), "-k", "5", "--nodes", "1", "--no-progress", "-o", str(d / "knn.parquet")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "longitude, latitude in degrees (EPSG:4326); distances in metres" in out.out
    t = pq.read_table(d / "knn.parquet").to_pydict()
    ref_d, ref_i = ref_knn(geo.pts, geo.q, 5)
    np.testing.assert_allclose(np.reshape(t["distance"], (-1, 5)), ref_d, rtol=1e-9, atol=1e-6)
    np.testing.assert_array_equal(np.reshape(t["id"], (-1, 5)), geo.ids[ref_i])

    radius = 300_000.0  # metres
    rc = main(["range", str(d / "pts.csv"), "--columns", "lon,lat", "--id-column", "id", "--crs", "EPSG:4326",
               "--queries", str(d / "q.csv"), "--radius", str(radius), "--nodes", "1", "--no-progress",
               "-o", str(d / "range.parquet")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "radius 300000 m" in out.out
    t = pq.read_table(d / "range.parquet").to_pydict()
    query, got_ids, dist = np.asarray(t["query"]), np.asarray(t["id"]), np.asarray(t["distance"])
    want = ref_range(geo.pts, geo.q, radius)
    assert sum(len(w[0]) for w in want) > 100
    for j, (wi, wd) in enumerate(want):
        rows = query == j
        np.testing.assert_array_equal(got_ids[rows], np.sort(geo.ids[wi]))
        np.testing.assert_allclose(dist[rows], wd, rtol=1e-9, atol=1e-6)  # great-circle metres, not degrees


def test_cli_polygons_against_geopandas_sjoin(geo, capsys):
    d = geo.dir
    rc = main(["polygons", str(d / "pts.csv"), str(d / "polys.geojson"), "--columns", "lon,lat", "--id-column", "id",
               "--crs", "EPSG:4326", "--nodes", "1", "--no-progress", "-o", str(d / "in.geoparquet")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"read {len(geo.polys)} polygons" in out.out
    got = gpd.read_parquet(d / "in.geoparquet")
    assert list(got.columns) == ["id", "polygon", "geometry"] and got.crs.to_epsg() == 4326
    pairs = np.column_stack([got["id"].to_numpy(), got["polygon"].to_numpy()])
    want = _sjoin_pairs(geo, "within")
    np.testing.assert_array_equal(pairs, want)
    rows = np.searchsorted(geo.ids, got["id"].to_numpy())
    np.testing.assert_allclose(np.column_stack([got.geometry.x, got.geometry.y]), geo.pts[rows], atol=1e-12)

    rc = main(["polygons", str(d / "pts.csv"), str(d / "polys.parquet"), "--columns", "lon,lat", "--id-column", "id",
               "--crs", "EPSG:4326", "--predicate", "intersects", "--nodes", "1", "--no-progress", "--count",
               "-o", str(d / "counts.csv")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    t = pv.read_csv(d / "counts.csv").to_pydict()
    want = np.bincount(_sjoin_pairs(geo, "intersects")[:, 1], minlength=len(geo.polys))
    np.testing.assert_array_equal(t["polygon"], np.arange(len(geo.polys)))
    np.testing.assert_array_equal(t["count"], want)
    assert want[0] != np.bincount(_sjoin_pairs(geo, "within")[:, 1], minlength=len(geo.polys))[0]  # edges differ


@pytest.mark.parametrize("args, says", [
    (["polygons", "{d}/pts.csv", "{d}/lines.wkt", "--columns", "lon,lat"], "polygon row 1 is a LineString"),
    (["polygons", "{d}/pts.csv", "{d}/q.csv", "--columns", "lon,lat"], "not a polygon file format"),
    (["polygons", "{d}/pts.csv", "{d}/missing.geojson", "--columns", "lon,lat"], "no such file"),
    (["polygons", "{d}/pts.csv", "{d}/polys.wkt", "--columns", "lon,lat", "--count", "-o", "{d}/c.geoparquet"],
     "--count writes one row per polygon"),
    (["knn", "{d}/pts.csv", "--crs", "EPSG:4326", "--queries", "{d}/q.csv"], "takes two coordinate columns"),
    (["knn", "{d}/pts.csv", "--crs", "EPSG:999999", "--queries", "{d}/q.csv"], "EPSG:999999"),
])
def test_cli_geo_input_errors_exit_2_with_one_line(geo, args, says, capsys):
    rc = main([a.format(d=geo.dir) for a in args] + ["--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert says in err and len(err.strip().splitlines()) == 1, err


# -- HTTP service ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def svc(geo):
    cfg = dataclasses.replace(NodeConfig().with_node_count(2).with_crs("EPSG:4326"), cpus_per_node=0.2)
    cluster = DistributedSpatialCluster(cfg)
    server = None
    try:
        cluster.distribute_data(geo.pts, geo.ids)
        server = BackgroundServer(cluster, workers=8, batch_wait_ms=20.0).start()
        yield SimpleNamespace(url=server.url, cluster=cluster)
    finally:
        if server is not None:
            server.stop()
        cluster.shutdown()


def post(s, path, **kw):
    return requests.post(s.url + path, timeout=TIMEOUT, **kw)


def test_service_knn_takes_lonlat_answers_metres_coalesced(svc, geo):
    r = post(svc, "/knn", json={"points": geo.q.tolist(), "k": 6})
    assert r.status_code == 200, r.text
    ref_d, ref_i = ref_knn(geo.pts, geo.q, 6)
    np.testing.assert_allclose(r.json()["distances"], ref_d, rtol=1e-9, atol=1e-6)
    np.testing.assert_array_equal(r.json()["ids"], geo.ids[ref_i])
    # concurrent single-point requests with different k share batches (batch_wait_ms=20): each answer exact
    answers = [None] * len(geo.q)

    def ask(j):
        answers[j] = post(svc, "/knn", json={"points": geo.q[j].tolist(), "k": 1 + j % 4})

    threads = [threading.Thread(target=ask, args=(j,)) for j in range(len(geo.q))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for j, a in enumerate(answers):
        assert a.status_code == 200, a.text
        k = 1 + j % 4
        np.testing.assert_allclose(a.json()["distances"], ref_d[j, :k], rtol=1e-9, atol=1e-6)
        np.testing.assert_array_equal(a.json()["ids"], geo.ids[ref_i[j, :k]])
    batches = requests.get(svc.url + "/stats", timeout=TIMEOUT).json()["service"]["batches"]["knn"]
    assert batches["max_requests"] > 1  # some requests were answered together


def test_service_range_radius_in_metres(svc, geo):
    radii = np.full(len(geo.q), 250_000.0)
    radii[:5] = [0.0, 1_000.0, 50_000.0, 2_000_000.0, 20_100_000.0]  # the last: the whole sphere
    r = post(svc, "/range", json={"points": geo.q.tolist(), "radius": radii.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    n = 0
    for j, (got, dist) in enumerate(zip(body["ids"], body["distances"])):
        wi, wd = ref_range(geo.pts, geo.q[j], radii[j])[0]
        order = np.argsort(geo.ids[wi])
        np.testing.assert_array_equal(got, geo.ids[wi][order])
        np.testing.assert_allclose(dist, wd[order], rtol=1e-9, atol=1e-6)
        n += len(got)
    assert n > len(geo.pts)  # the whole-sphere ball found every point
    r = post(svc, "/range", json={"points": [10.0, 50.0], "radius": 100_000})  # one point: one answer
    wi, _ = ref_range(geo.pts, np.array([10.0, 50.0]), 100_000.0)[0]
    np.testing.assert_array_equal(r.json()["ids"], np.sort(geo.ids[wi]))


def test_service_box_across_the_antimeridian(svc, geo):
    lo = np.array([[179.0, -19.0], [-10.0, 40.0], [170.0, 80.0]])
    hi = np.array([[-179.0, -16.0], [20.0, 60.0], [-170.0, 90.0]])
    r = post(svc, "/box", json={"lo": lo.tolist(), "hi": hi.tolist()})
    assert r.status_code == 200, r.text
    lon, lat = geo.pts[:, 0], geo.pts[:, 1]
    for got, a, b in zip(r.json()["ids"], lo, hi):
        in_lon = (lon >= a[0]) | (lon <= b[0]) if a[0] > b[0] else (lon >= a[0]) & (lon <= b[0])
        want = np.sort(geo.ids[in_lon & (lat >= a[1]) & (lat <= b[1])])
        np.testing.assert_array_equal(got, want)
    assert len(r.json()["ids"][0]) > 100  # both sides of the antimeridian
    r = post(svc, "/box", json={"lo": [0.0, 10.0], "hi": [1.0, 5.0]})
    assert r.status_code == 422 and "lat_lo <= lat_hi" in r.json()["detail"]
    r = post(svc, "/knn", json={"points": [10.0, 95.0], "k": 1})
    assert r.status_code == 422 and "latitude 95.0 outside [-90, 90]" in r.json()["detail"]
    r = post(svc, "/knn", json={"points": [10.0, 50.0, 0.0], "k": 1})
    assert r.status_code == 422 and "needs 2 coordinates" in r.json()["detail"]


def test_service_polygon_endpoint_against_geopandas(svc, geo):
    pts = gpd.GeoSeries(gpd.points_from_xy(geo.pts[:, 0], geo.pts[:, 1]), crs="EPSG:4326")
    for poly, predicate in [(geo.polys[0], "within"), (geo.polys[0], "intersects"), (geo.polys[1], "within")]:
        want = np.sort(geo.ids[(pts.within(poly) if predicate == "within" else pts.intersects(poly)).to_numpy()])
        gj = shapely.geometry.mapping(poly)
        r = post(svc, f"/polygon?predicate={predicate}", data=json.dumps(gj),
                 headers={"Content-Type": "application/geo+json"})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(r.json()["ids"], want)
        assert r.json()["count"] == len(want) > 0
        feature = {"type": "Feature", "properties": {"name": "x"}, "geometry": gj, "predicate": predicate}
        r = post(svc, "/polygon", json=feature)
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(r.json()["ids"], want)
    for body, says in [({"type": "FeatureCollection", "features": []}, "one polygon per request"),
                       ({"type": "Point", "coordinates": [0, 0]}, "Polygon or MultiPolygon"),
                       ({**shapely.geometry.mapping(geo.polys[2]), "predicate": "contains"}, "predicate must be"),
                       ({"type": "Polygon", "coordinates": "nope"}, "")]:
        r = post(svc, "/polygon", json=body)
        assert r.status_code == 422 and says in r.json()["detail"], r.text
    spec = requests.get(svc.url + "/openapi.json", timeout=TIMEOUT).json()
    content = spec["paths"]["/polygon"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/geo+json"} <= set(content)


def test_service_status_says_crs_units_and_polygon_needs_read_token(svc, geo):
    c = requests.get(svc.url + "/status.json", timeout=TIMEOUT).json()["cluster"]
    assert c["crs"] == "EPSG:4326" and c["geographic"] is True and c["dim"] == 2
    assert c["distance_units"].startswith("metre") and "longitude" in c["coordinate_units"]
    tokens = TokenSet.from_tokens([("viewer", "read", "r" * 32)])
    with BackgroundServer(svc.cluster, tokens=tokens) as guarded:
        body = shapely.geometry.mapping(geo.polys[2])
        r = requests.post(guarded.url + "/polygon", json=body, timeout=TIMEOUT)
        assert r.status_code == 401
        r = requests.post(guarded.url + "/polygon", json=body, timeout=TIMEOUT,
                          headers={"Authorization": "Bearer " + "r" * 32})
        assert r.status_code == 200 and r.json()["count"] > 0


# -- plots ----------------------------------------------------------------------------------------------------------
def test_plots_draw_lonlat_with_a_true_aspect(svc, geo, tmp_path):
    from distspatial.ui.plots import plot_clusters, plot_partitions

    europe = geo.pts[(np.abs(geo.pts[:, 0] - 10) < 10) & (np.abs(geo.pts[:, 1] - 50) < 8)]
    fig = plot_clusters(europe, np.zeros(len(europe), dtype=int), geographic=True)
    ax = fig.axes[0]
    mid = (europe[:, 1].min() + europe[:, 1].max()) / 2
    assert ax.get_aspect() == pytest.approx(1 / np.cos(np.radians(mid)))
    assert "longitude" in ax.get_xlabel() and "equirectangular" in ax.get_title()
    fig.savefig(tmp_path / "c.png")
    fig = plot_partitions(svc.cluster, max_points=2000)  # the whole globe: plate carree
    ax = fig.axes[0]
    assert ax.get_aspect() == 1.0 and "plate carree" in ax.get_title() and "latitude" in ax.get_ylabel()
    fig.savefig(tmp_path / "p.png")
