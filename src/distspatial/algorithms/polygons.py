"""Polygon queries: which points lie in a polygon (``polygon_search``), in which polygons each point lies
(``points_in_polygons``, a point-in-polygon join).

Semantics are those of ``geopandas.sjoin(points, polygons, predicate=...)`` (shapely's predicates):
``"within"``: the point is in the polygon's interior, a point on an edge or a vertex is *not* within;
``"intersects"``: interior or boundary. Holes and multipolygons included. For a geographic data set (lon/lat),
polygons are in longitude/latitude degrees with edges straight in lon/lat (as GeoPandas and shapely treat them),
not great circles.

How: the polygons (shapely geometries, WKT, GeoJSON mappings, a GeoDataFrame / GeoSeries or a GeoParquet file:
:func:`as_polygons`) go into Ray's object store once per call as WKB; partitions whose box meets no polygon are
left out (planar: a ``shapely.STRtree`` of the polygons queried with the partition boxes; geographic: the 3-D
bounds of each polygon's lon/lat bounding box, :func:`~distspatial.core.geo.lonlat_box_to_unit_bounds`); one
replica of each remaining partition tests its points on its node
(:meth:`~distspatial.node.polygon_rounds.PolygonRoundsMixin.polygon_join`, vectorized shapely predicates on
prepared polygons, :mod:`~distspatial.kernels.polygon_kernels`). Only ids and polygon indices (or counts) come
back. Runs under :meth:`~distspatial.client.runtime.ClusterRuntime.stable`: a node that saw a newer layout
refuses, the query is planned again.

shapely is imported inside the functions (``pip install 'distspatial[geo]'``).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np
import ray

from ..core.codec import message_bytes
from ..core.geo import lonlat_box_to_unit_bounds
from ..kernels.polygon_kernels import PREDICATES, polygon_bounds, polygons_to_wkb, sort_pairs

__all__ = ["PolygonJoin", "as_polygons", "polygon_search", "points_in_polygons", "AGGREGATES"]

AGGREGATES = (None, "count")
_GEO_HINT = "polygon queries need shapely >= 2: pip install 'distspatial[geo]'"


class PolygonJoin(NamedTuple):
    """Result of ``points_in_polygons``: one row per (point, polygon) pair, sorted by ``id`` then ``polygon``.

    ``id``: the point's id (int64); ``polygon``: the polygon's 0-based row in the input (int64; for a
    GeoDataFrame its position, not its index label); ``points``: the points' coordinates when asked for
    (``return_points=True``; lon/lat for geographic data). Unpacks as ``ids, polygons = ...`` only without points.
    """

    id: np.ndarray
    polygon: np.ndarray

    def table(self) -> dict[str, np.ndarray]:
        """``{"id": ..., "polygon": ...}``: for :func:`distspatial.io.write_results` or ``pandas.DataFrame``."""
        return {"id": self.id, "polygon": self.polygon}


def _shapely():
    try:
        import shapely
    except ImportError:
        raise ImportError(_GEO_HINT) from None
    return shapely


def _read_polygon_file(path: str) -> np.ndarray:
    """The geometries of a GeoParquet file's primary column (WKB via shapely; other encodings via geopandas)."""
    import json

    import pyarrow.parquet as pq

    from ..io.files import DataFileError

    shapely = _shapely()
    if not os.path.exists(path):
        raise DataFileError(path, "no such file", "give a GeoParquet file of polygons, a WKT string or geometries")
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise DataFileError(path, f"not a valid Parquet file ({exc})", "give a GeoParquet file of polygons") from None
    md = pf.schema_arrow.metadata or {}
    if b"geo" not in md:
        raise DataFileError(path, "has no GeoParquet 'geo' metadata (no geometry column)",
                            "write the polygons with geopandas.GeoDataFrame.to_parquet")
    geo = json.loads(md[b"geo"])
    name = geo.get("primary_column") or next(iter(geo["columns"]))
    enc = str(geo["columns"][name].get("encoding", "WKB"))
    if enc.upper() == "WKB":
        col = pf.read(columns=[name]).column(name)
        return shapely.from_wkb(np.asarray(col.to_numpy(zero_copy_only=False), dtype=object))
    try:
        import geopandas as gpd
    except ImportError:
        raise ImportError(f"reading {enc!r}-encoded GeoParquet polygons needs geopandas: pip install "
                          "'distspatial[geo]'") from None
    return np.asarray(gpd.read_parquet(path, columns=[name]).geometry.array, dtype=object)


def _one(obj: Any, shapely: Any, row: int | None) -> Any:
    where = "the polygon" if row is None else f"polygon row {row}"
    if obj is None:
        return None
    if isinstance(obj, shapely.Geometry):
        return obj
    if isinstance(obj, (bytes, bytearray)):
        return shapely.from_wkb(bytes(obj))
    if isinstance(obj, str):
        try:
            return shapely.from_wkt(obj)
        except Exception as exc:
            raise ValueError(f"{where}: {obj[:60]!r} is not valid WKT ({exc}); give e.g. "
                             "'POLYGON ((0 0, 1 0, 1 1, 0 0))', a shapely geometry or a GeoJSON mapping") from None
    if isinstance(obj, dict) or hasattr(obj, "__geo_interface__"):
        m = obj.__geo_interface__ if hasattr(obj, "__geo_interface__") else obj
        if m.get("type") == "Feature":
            m = m.get("geometry")
            if m is None:
                return None
        try:
            return shapely.geometry.shape(m)
        except Exception as exc:
            raise ValueError(f"{where}: not a GeoJSON geometry ({exc}); give a mapping like "
                             "{'type': 'Polygon', 'coordinates': [[[0, 0], [1, 0], [1, 1], [0, 0]]]}") from None
    raise TypeError(f"{where}: cannot use a {type(obj).__name__} as a polygon; give a shapely geometry, WKT, "
                    "WKB or a GeoJSON mapping")


def as_polygons(polygons: Any, single: bool = False) -> np.ndarray:
    """A 1-D object array of shapely Polygons / MultiPolygons from what a user passes.

    Accepted: a shapely geometry; WKT; WKB bytes; a GeoJSON mapping (geometry, Feature or FeatureCollection) or
    an object with ``__geo_interface__``; a GeoDataFrame / GeoSeries (its geometry, in row order); a GeoParquet
    file path (``.parquet`` / ``.geoparquet``: its primary geometry column); a list or array of any of these.
    ``single``: exactly one polygon is expected (``polygon_search``).

    Raises ValueError naming the row for a missing geometry or one that is not a (Multi)Polygon (with its type).
    """
    shapely = _shapely()
    what = "the polygon" if single else "polygons"
    if isinstance(polygons, (str, os.PathLike)) and os.fspath(polygons).lower().endswith((".parquet", ".geoparquet",
                                                                                           ".pq")):
        geoms = _read_polygon_file(os.fspath(polygons))
    elif type(polygons).__name__ in ("GeoDataFrame", "GeoSeries"):
        geo = polygons.geometry if type(polygons).__name__ == "GeoDataFrame" else polygons
        geoms = np.asarray(geo.array, dtype=object)
    elif isinstance(polygons, dict) and polygons.get("type") == "FeatureCollection":
        geoms = np.array([_one(f, shapely, i) for i, f in enumerate(polygons.get("features", []))], dtype=object)
    elif isinstance(polygons, (list, tuple, np.ndarray)):
        geoms = np.empty(len(polygons), dtype=object)
        geoms[:] = [_one(p, shapely, i) for i, p in enumerate(polygons)]
    else:
        geoms = np.empty(1, dtype=object)
        geoms[0] = _one(polygons, shapely, None)
    if single and len(geoms) != 1:
        raise ValueError(f"polygon_search takes one polygon (a Polygon or MultiPolygon), got {len(geoms)}; use "
                         "points_in_polygons for several")
    if len(geoms) == 0:
        raise ValueError("no polygons given: pass at least one polygon")
    tid = shapely.get_type_id(geoms)
    bad = np.flatnonzero((tid != 3) & (tid != 6))
    if len(bad):
        r = int(bad[0])
        at = what if single else f"polygon row {r}"
        if tid[r] == -1:
            raise ValueError(f"{at} is missing (None); every row needs a Polygon or MultiPolygon: drop or fill it")
        raise ValueError(f"{at} is a {geoms[r].geom_type}, not a Polygon or MultiPolygon "
                         f"({len(bad)} such row(s)); polygon queries take areas: buffer lines/points first "
                         "(e.g. geometry.buffer(d)) or drop them")
    return geoms


def check_polygon_crs(polygons: Any, crs: Any) -> None:
    """A GeoDataFrame / GeoSeries of polygons in another CRS than the points': ValueError saying to reproject
    (``polygons.to_crs(crs)``). Nothing is checked when either CRS is unknown."""
    pcrs = getattr(polygons, "crs", None) if type(polygons).__name__ in ("GeoDataFrame", "GeoSeries") else None
    if pcrs is None or crs is None:
        return
    try:
        import pyproj

        same = pyproj.CRS.from_user_input(crs) == pyproj.CRS.from_user_input(pcrs)
    except Exception:  # an unknown CRS name: nothing to compare
        return
    if not same:
        raise ValueError(f"the polygons are in {pcrs.to_string() if hasattr(pcrs, 'to_string') else pcrs}, the "
                         f"points in {crs}: reproject them first, e.g. polygons.to_crs({str(crs)!r})")


def _check(predicate: str, aggregate: Any = None) -> None:
    if predicate not in PREDICATES:
        raise ValueError(f"predicate must be 'within' (interior; boundary points excluded) or 'intersects' "
                         f"(interior or boundary), got {predicate!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be None (one row per point and polygon) or 'count' (points per polygon), "
                         f"got {aggregate!r}")


def _partitions(routing: Any, geoms: np.ndarray, bounds: np.ndarray, geographic: bool) -> list[int]:
    """Partitions whose box meets a polygon (planar: the polygon itself; geographic: its lon/lat box's 3-D
    bounds)."""
    shapely = _shapely()
    blo, bhi = routing.box_lo, routing.box_hi
    ok = np.isfinite(blo).all(axis=1) & np.isfinite(bhi).all(axis=1) & (blo <= bhi).all(axis=1)
    fin = np.isfinite(bounds).all(axis=1)
    if not fin.any():
        return []
    if geographic:  # GEOGRAPHIC BRANCH: partitions hold unit vectors; prune by each polygon's lon/lat box in 3-D
        b = bounds[fin]
        if len(b) > 4096:  # many polygons: their overall box
            b = np.array([[b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]])
        boxes = [lonlat_box_to_unit_bounds(r[:2], r[2:]) for r in b]
        lo3 = np.array([x[0] for x in boxes])
        hi3 = np.array([x[1] for x in boxes])
        meet = np.zeros(len(blo), dtype=bool)
        for a in range(0, len(lo3), 256):
            meet |= np.all((blo[None] <= hi3[a:a + 256, None]) & (bhi[None] >= lo3[a:a + 256, None]), axis=2).any(0)
        return [int(p) for p in np.flatnonzero(meet & ok)]
    if blo.shape[1] != 2:
        raise ValueError(f"polygon queries take 2-D points (x, y) or a geographic (lon/lat) data set; this data set "
                         f"has {blo.shape[1]} dimensions")
    idx = np.flatnonzero(ok)
    if len(idx) == 0:
        return []
    boxes = shapely.box(blo[idx, 0], blo[idx, 1], bhi[idx, 0], bhi[idx, 1])
    tree = shapely.STRtree(geoms[fin])
    hit = np.unique(tree.query(boxes, predicate="intersects")[0])
    return [int(p) for p in idx[hit]]


def _run(rt: Any, geoms: np.ndarray, predicate: str, aggregate: str | None, geographic: bool,
         return_points: bool) -> list[Any]:
    """The nodes' answers (one per message) of one polygon query, planned under ``rt.stable``."""
    offsets, blob = polygons_to_wkb(geoms)
    bounds = polygon_bounds(geoms)
    refs = (ray.put(offsets), ray.put(blob))  # once per call; every node reads them from the object store

    def plan_and_run() -> list[Any]:
        meta, routing, version = rt.snapshot()
        pids = _partitions(routing, geoms, bounds, geographic)
        if not pids:
            return []

        def build(node: int, part_ids: list[int]):
            ref = rt.actor(node).polygon_join.options(concurrency_group="reads").remote(
                *refs, predicate, aggregate, geographic, return_points, part_ids, version=version)
            return ref, part_ids, message_bytes(predicate, aggregate, part_ids)

        return [res for _, res in rt.run_partitions(pids, build)]

    return rt.stable(plan_and_run)


def points_in_polygons(rt: Any, polygons: Any, predicate: str = "within", aggregate: str | None = None,
                       geographic: bool = False, return_points: bool = False, crs: Any = None) -> Any:
    """See ``DistributedSpatialCluster.points_in_polygons``; ``crs``: the points' (checked against a
    GeoDataFrame's)."""
    _check(predicate, aggregate)
    check_polygon_crs(polygons, crs)
    geoms = as_polygons(polygons)
    rt.require_data()
    answers = _run(rt, geoms, predicate, aggregate, geographic, return_points and aggregate is None)
    if aggregate == "count":
        out = np.zeros(len(geoms), dtype=np.int64)
        for c in answers:
            out += c
        return out
    if not answers:
        ids = poly = np.empty(0, np.int64)
        pts = np.empty((0, 2))
    else:
        ids = np.concatenate([a[0] for a in answers])
        poly = np.concatenate([a[1] for a in answers])
        pts = np.concatenate([a[2] for a in answers]) if return_points else None
    ids, poly, order = sort_pairs(ids, poly, len(geoms), permutation=return_points)  # by id, then polygon
    res = PolygonJoin(ids, poly)
    return (res, pts[order]) if return_points else res


def polygon_search(rt: Any, polygon: Any, predicate: str = "within", geographic: bool = False,
                   return_points: bool = False, crs: Any = None) -> Any:
    """See ``DistributedSpatialCluster.polygon_search``."""
    _check(predicate)
    check_polygon_crs(polygon, crs)
    geoms = as_polygons(polygon, single=True)
    rt.require_data()
    answers = _run(rt, geoms, predicate, None, geographic, return_points)
    if not answers:
        return (np.empty(0, np.int64), np.empty((0, 2))) if return_points else np.empty(0, np.int64)
    ids = np.concatenate([a[0] for a in answers])
    order = np.argsort(ids, kind="stable")
    if return_points:
        return ids[order], np.concatenate([a[2] for a in answers])[order]
    return ids[order]
