"""GeoParquet and GeoPandas in and out: files written by geopandas / pyarrow read by ours (chunks, shares, the
parallel loader), files written by ours read by geopandas, GeoDataFrames in and out, bad geometries and bad
coordinates named by row, polygon queries on a geographic (lon/lat) data set against geopandas.sjoin. One cluster
for the module."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

shapely = pytest.importorskip("shapely")
gpd = pytest.importorskip("geopandas")

from distspatial import DistributedSpatialCluster, NodeConfig  # noqa: E402
from distspatial.io import (  # noqa: E402
    DataFileError,
    iter_point_chunks,
    open_points,
    read_points,
    to_geodataframe,
    write_geoparquet,
    write_results,
)
from distspatial.io.shares import plan_shares, read_share  # noqa: E402


def _gdf(n=2000, seed=1, crs="EPSG:4326"):
    rng = np.random.default_rng(seed)
    xy = np.column_stack([rng.uniform(-179, 179, n), rng.uniform(-80, 80, n)])
    ids = np.arange(n, dtype=np.int64) * 7 + 1
    return xy, ids, gpd.GeoDataFrame({"id": ids}, geometry=gpd.points_from_xy(xy[:, 0], xy[:, 1]), crs=crs)


def _raw_geoparquet(path, wkb: list, types=("Point",), extra: dict | None = None):
    geo = {"version": "1.0.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": list(types)}}}
    cols = {"geometry": pa.array(wkb, pa.binary()), **(extra or {})}
    pq.write_table(pa.table(cols).replace_schema_metadata({b"geo": json.dumps(geo)}), path)


@pytest.fixture(scope="module")
def cluster(ray_local):
    cfg = NodeConfig().with_node_count(2).with_partitions_per_node(2).replace(cpus_per_node=0.5)
    c = DistributedSpatialCluster(cfg)
    yield c
    c.shutdown()


@pytest.mark.parametrize("encoding", ["WKB", "geoarrow"])
def test_geopandas_files_read_in_chunks_and_shares(tmp_path, encoding):
    xy, ids, g = _gdf()
    path = tmp_path / "pts.parquet"
    g.to_parquet(path, geometry_encoding=encoding, row_group_size=300)
    src = open_points(path, id_column="id")
    assert src.columns == ["x", "y"] and src.geo.encoding == ("WKB" if encoding == "WKB" else "point")
    assert src.geo.crs_name == "EPSG:4326"
    assert np.allclose(src.geo.bbox, [xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max()])
    chunks = list(iter_point_chunks(path, chunk_rows=256, id_column="id"))
    assert np.array_equal(np.concatenate([c[0] for c in chunks]), xy)
    assert np.array_equal(np.concatenate([c[1] for c in chunks]), ids)
    shares = plan_shares(str(path), 3)
    assert np.array_equal(np.concatenate([read_share(s)[0] for s in shares]), xy)


def test_wkb_big_endian_point_z_and_our_writer_read_by_geopandas(tmp_path):
    rng = np.random.default_rng(2)
    xyz = rng.random((50, 3)) * 100
    path = tmp_path / "z.parquet"
    _raw_geoparquet(path, list(shapely.to_wkb(shapely.points(xyz), byte_order=0)), ("Point Z",))
    assert np.array_equal(read_points(path), xyz)
    xy, ids, _ = _gdf(300)
    for enc in ("WKB", "point"):
        out = write_geoparquet(tmp_path / f"ours-{enc}.parquet", {"id": ids}, xy, crs="EPSG:4326", encoding=enc)
        back = gpd.read_parquet(out)
        assert back.crs.to_epsg() == 4326
        assert np.array_equal(shapely.get_coordinates(back.geometry.values), xy)
        assert np.array_equal(back["id"].to_numpy(), ids)
        assert np.array_equal(read_points(out), xy)
    out = write_results(tmp_path / "r.geoparquet", {"id": ids}, points=xy)  # unknown CRS: crs null
    assert gpd.read_parquet(out).crs is None
    with pytest.raises(DataFileError, match="needs the points"):
        write_results(tmp_path / "r2.geoparquet", {"id": ids})


def test_bad_geometries_and_coordinates_are_named(tmp_path):
    p = tmp_path / "line.parquet"
    gpd.GeoDataFrame(geometry=[shapely.Point(0, 0), shapely.Point(1, 1),
                               shapely.LineString([(0, 0), (1, 1)])]).to_parquet(p)
    with pytest.raises(DataFileError, match=r"row 2 \(0-based\) of geometry column 'geometry' is a LineString") as e:
        read_points(p)
    assert e.value.row == 2
    p = tmp_path / "polys.parquet"
    gpd.GeoDataFrame(geometry=[shapely.box(0, 0, 1, 1)]).to_parquet(p)
    with pytest.raises(DataFileError, match="holds Polygon geometries"):
        open_points(p)
    p = tmp_path / "empty.parquet"
    _raw_geoparquet(p, [shapely.to_wkb(shapely.Point(1, 2)), shapely.to_wkb(shapely.from_wkt("POINT EMPTY"))])
    with pytest.raises(DataFileError, match=r"row 1 .* empty point"):
        read_points(p)
    p = tmp_path / "null.parquet"
    _raw_geoparquet(p, [shapely.to_wkb(shapely.Point(1, 2)), None])
    with pytest.raises(DataFileError, match=r"row 1 .* no geometry"):
        read_points(p)
    p = tmp_path / "nan.parquet"
    _raw_geoparquet(p, [shapely.to_wkb(shapely.Point(1, 2)), shapely.to_wkb(shapely.Point(3, 4)),
                        shapely.to_wkb(shapely.Point(np.inf, 4))])
    with pytest.raises(DataFileError, match=r"row 2 .*non-finite"):
        read_points(p)
    bad = gpd.GeoDataFrame(geometry=[shapely.Point(0, 0), shapely.box(0, 0, 1, 1)], index=[10, 11])
    from distspatial.io import points_from_geopandas

    with pytest.raises(ValueError, match=r"row 1 \(index 11\) is a Polygon, not a Point"):
        points_from_geopandas(bad)


def test_geodataframe_in_and_out_and_parallel_load(cluster, tmp_path):
    xy, ids, g = _gdf(3000, seed=4, crs=None)
    xy = xy / 10  # planar coordinates
    g = gpd.GeoDataFrame({"id": ids}, geometry=gpd.points_from_xy(xy[:, 0], xy[:, 1]))
    cluster.distribute_data(g, ids=ids)
    assert not cluster.geographic
    lo, hi = np.array([-5.0, -3.0]), np.array([6.0, 4.0])
    got, pts = cluster.box_search(lo, hi, return_points=True)
    inside = np.all((xy >= lo) & (xy <= hi), axis=1)
    assert np.array_equal(got, np.sort(ids[inside]))
    out = to_geodataframe({"id": got}, pts)
    assert isinstance(out, gpd.GeoDataFrame) and len(out) == inside.sum()
    assert np.array_equal(shapely.get_coordinates(out.geometry.values), pts)
    # the parallel loader on GeoParquet row groups: the nodes decode the geometry column
    path = tmp_path / "planar.parquet"
    g.to_parquet(path, row_group_size=500)
    cluster.distribute_files(str(path), id_column="id")
    assert cluster.n_points == len(xy) and not cluster.geographic
    assert np.array_equal(cluster.box_search(lo, hi), np.sort(ids[inside]))


def test_geographic_geodataframe_and_polygons_against_sjoin(cluster, tmp_path):
    xy, ids, g = _gdf(4000, seed=5)  # EPSG:4326: the data set becomes geographic
    # and points exactly on the polygons' edges and vertices (a 2.5-degree grid, the triangle's vertices): a
    # geographic data set stores unit vectors, and these must come back exactly to be classified as sjoin does
    grid = np.stack(np.meshgrid(np.arange(-180.0, 180.0, 2.5), np.arange(-80.0, 80.5, 2.5)), -1).reshape(-1, 2)
    grid = np.concatenate([grid, [[170.0, -10.0], [179.5, 0.0], [170.0, 10.0], [174.75, -5.0]]])
    xy = np.concatenate([xy, grid])
    ids = np.concatenate([ids, 100_000 + np.arange(len(grid))])
    g = gpd.GeoDataFrame({"id": ids}, geometry=gpd.points_from_xy(xy[:, 0], xy[:, 1]), crs="EPSG:4326")
    cluster.distribute_data(g, ids=ids)
    assert cluster.geographic
    polys = [shapely.box(-20, -10, 40, 30),
             shapely.Polygon([(170, -10), (179.5, 0), (170, 10)]),
             shapely.box(-60, 50, 60, 80).difference(shapely.box(-10, 60, 10, 70)),
             shapely.MultiPolygon([shapely.box(-179, -80, -150, -60), shapely.box(100, -5, 120, 5)])]
    gp = gpd.GeoDataFrame(geometry=polys, crs="EPSG:4326")
    for predicate in ("within", "intersects"):
        j = gpd.sjoin(g, gp, predicate=predicate)
        ref = np.stack([j["id"].to_numpy(), j["index_right"].to_numpy()], 1)
        ref = ref[np.lexsort((ref[:, 1], ref[:, 0]))]
        res = cluster.points_in_polygons(gp, predicate=predicate)
        assert np.array_equal(np.stack([res.id, res.polygon], 1), ref)
        assert np.array_equal(cluster.polygon_search(polys[2], predicate=predicate), ref[ref[:, 1] == 2, 0])
    # GeoParquet in the parallel loader: the file's CRS (EPSG:4326) makes the data set geographic
    path = tmp_path / "lonlat.parquet"
    g.to_parquet(path, geometry_encoding="geoarrow")
    cluster.distribute_files(str(path), id_column="id")
    assert cluster.geographic and cluster.n_points == len(xy)
    got = cluster.points_in_polygons(gp, aggregate="count")
    assert np.array_equal(got, np.bincount(gpd.sjoin(g, gp, predicate="within")["index_right"], minlength=4))
    bad = g.copy()
    bad.loc[bad.index[7], "geometry"] = shapely.Point(10, 95)
    with pytest.raises(ValueError, match="row 7"):
        cluster.distribute_data(bad)


def test_cli_knn_geoparquet_in_and_out(ray_local, tmp_path, capsys):
    from scipy.spatial import cKDTree

    from distspatial.ui.cli import main

    rng = np.random.default_rng(6)
    xy = rng.random((400, 2)) * 1000
    ids = np.arange(400, dtype=np.int64) + 50
    gpd.GeoDataFrame({"id": ids}, geometry=gpd.points_from_xy(xy[:, 0], xy[:, 1]),
                     crs="EPSG:3857").to_parquet(tmp_path / "in.parquet")
    out = tmp_path / "nn.geoparquet"
    rc = main(["knn", str(tmp_path / "in.parquet"), "--id-column", "id", "-k", "2", "--queries",
               str(tmp_path / "in.parquet"), "--nodes", "2", "--no-progress", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    g = gpd.read_parquet(out)
    assert g.crs.to_epsg() == 3857  # the input's CRS, carried by the cluster
    _, nn = cKDTree(xy).query(xy, 2)
    assert np.array_equal(g["id"].to_numpy(), ids[nn.ravel()])
    assert np.array_equal(shapely.get_coordinates(g.geometry.values), xy[nn.ravel()])
