"""Polygon queries (polygon_search, points_in_polygons) on a real Ray runtime, against geopandas.sjoin on the same
points and polygons: holes, multipolygons, points exactly on edges and vertices, polygons spanning several
partitions, both predicates, counts. One cluster for the module."""

from __future__ import annotations

import numpy as np
import pytest

shapely = pytest.importorskip("shapely")
gpd = pytest.importorskip("geopandas")

from distspatial import DistributedSpatialCluster, NodeConfig  # noqa: E402


def _points(seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    on_grid = rng.integers(0, 41, (6000, 2)).astype(float) / 2  # half-unit grid: on edges and vertices
    spread = rng.random((6000, 2)) * 20
    return np.vstack([on_grid, spread])


def _polygons() -> list:
    rng = np.random.default_rng(3)
    out = []
    for i in range(60):
        x, y = rng.integers(0, 20, 2).astype(float)
        w, h = rng.integers(1, 9, 2).astype(float)
        p = shapely.box(x, y, x + w, y + h)
        if i % 3 == 0 and min(w, h) >= 3:  # a hole whose edges lie on the grid
            p = p.difference(shapely.box(x + 1, y + 1, x + w - 1, y + h - 1))
        if i % 4 == 1:  # a triangle with a sloped edge through grid points
            p = shapely.Polygon([(x, y), (x + w, y), (x, y + 2 * h)])
        if i % 5 == 2:
            p = shapely.MultiPolygon([p, shapely.box(x + 10, y + 1, x + 12.5, y + 3.5)])
        out.append(p)
    out.append(shapely.box(0, 0, 20, 20))  # spans every partition
    out.append(shapely.Polygon([(2, 2), (18, 3), (10, 18), (2, 2)],
                               holes=[[(8, 6), (12, 6), (10, 10), (8, 6)]]))
    out.append(shapely.box(100, 100, 101, 101))  # meets no point
    return out


@pytest.fixture(scope="module")
def setup(ray_local):
    pts = _points()
    ids = np.arange(len(pts), dtype=np.int64) * 3 + 5  # ids that are not row numbers
    cfg = NodeConfig().with_node_count(2).with_partitions_per_node(4).replace(cpus_per_node=0.5)
    cluster = DistributedSpatialCluster(cfg)
    cluster.distribute_data(pts, ids=ids)
    polys = _polygons()
    gpts = gpd.GeoDataFrame({"pid": ids}, geometry=gpd.points_from_xy(pts[:, 0], pts[:, 1]))
    gpolys = gpd.GeoDataFrame({"name": [f"p{i}" for i in range(len(polys))]}, geometry=polys)
    yield cluster, pts, ids, gpts, gpolys
    cluster.shutdown()


def _sjoin(gpts, gpolys, predicate):
    j = gpd.sjoin(gpts, gpolys, predicate=predicate)
    pairs = np.stack([j["pid"].to_numpy(), j["index_right"].to_numpy()], axis=1).astype(np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


@pytest.mark.parametrize("predicate", ["within", "intersects"])
def test_points_in_polygons_equals_sjoin(setup, predicate):
    cluster, pts, ids, gpts, gpolys = setup
    ref = _sjoin(gpts, gpolys, predicate)
    res = cluster.points_in_polygons(gpolys, predicate=predicate)
    got = np.stack([res.id, res.polygon], axis=1)
    assert got.shape == ref.shape and np.array_equal(got, ref)
    # boundaries matter here: the grid points on edges/vertices make the two predicates differ
    if predicate == "intersects":
        within = cluster.points_in_polygons(gpolys, predicate="within")
        assert len(within.id) < len(res.id)
    counts = cluster.points_in_polygons(list(gpolys.geometry), predicate=predicate, aggregate="count")
    assert np.array_equal(counts, np.bincount(ref[:, 1], minlength=len(gpolys)))


@pytest.mark.parametrize("predicate", ["within", "intersects"])
def test_polygon_search_equals_sjoin(setup, predicate):
    cluster, pts, ids, gpts, gpolys = setup
    ref = _sjoin(gpts, gpolys, predicate)
    for i in (0, 2, 7, len(gpolys) - 3, len(gpolys) - 2, len(gpolys) - 1):  # hole, multipolygon, big, none
        poly = gpolys.geometry.iloc[i]
        want = ref[ref[:, 1] == i, 0]
        assert np.array_equal(cluster.polygon_search(poly, predicate=predicate), want)
    # WKT and GeoJSON mapping of a polygon with a hole; points returned
    poly = gpolys.geometry.iloc[len(gpolys) - 2]
    want = ref[ref[:, 1] == len(gpolys) - 2, 0]
    assert np.array_equal(cluster.polygon_search(poly.wkt, predicate=predicate), want)
    got, got_pts = cluster.polygon_search(shapely.geometry.mapping(poly), predicate=predicate, return_points=True)
    assert np.array_equal(got, want)
    assert np.array_equal(got_pts, pts[(want - 5) // 3])


def test_polygon_inputs_and_errors(setup, tmp_path):
    cluster, pts, ids, gpts, gpolys = setup
    ref = _sjoin(gpts, gpolys, "within")
    path = tmp_path / "polys.parquet"
    gpolys.to_parquet(path)
    res = cluster.points_in_polygons(str(path))
    assert np.array_equal(np.stack([res.id, res.polygon], 1), ref)
    wkts = [g.wkt for g in gpolys.geometry]
    assert np.array_equal(cluster.points_in_polygons(wkts, aggregate="count"),
                          np.bincount(ref[:, 1], minlength=len(gpolys)))
    with pytest.raises(ValueError, match=r"polygon row 1 is a LineString"):
        cluster.points_in_polygons([shapely.box(0, 0, 1, 1), shapely.LineString([(0, 0), (1, 1)])])
    with pytest.raises(ValueError, match="predicate"):
        cluster.polygon_search(shapely.box(0, 0, 1, 1), predicate="contains")
    with pytest.raises(ValueError, match="aggregate"):
        cluster.points_in_polygons([shapely.box(0, 0, 1, 1)], aggregate="sum")
    with pytest.raises(ValueError, match="not valid WKT"):
        cluster.polygon_search("POLYGON ((0 0, 1")
    with pytest.raises(ValueError, match="one polygon"):
        cluster.polygon_search([shapely.box(0, 0, 1, 1), shapely.box(1, 1, 2, 2)])


def test_polygons_in_another_crs_are_refused(ray_local):
    cfg = NodeConfig().with_node_count(1).with_partitions_per_node(1).replace(cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        c.distribute_data(np.array([[1000.0, 1000.0], [5000.0, 5000.0]]), crs="EPSG:3857")
        polys = gpd.GeoDataFrame(geometry=[shapely.box(0, 0, 2000, 2000)], crs="EPSG:3857")
        assert np.array_equal(c.polygon_search(polys.geometry), [0])
        with pytest.raises(ValueError, match=r"reproject them first, e.g. polygons.to_crs\('EPSG:3857'\)"):
            c.points_in_polygons(polys.set_crs("EPSG:4326", allow_override=True))
