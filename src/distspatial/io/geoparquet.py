"""GeoParquet point columns in and out, GeoPandas objects in and out.

Reading: a Parquet file with a ``geo`` key in its metadata (GeoParquet 1.0 / 1.1) is read through its primary
geometry column: the points' coordinates become the columns ``x, y`` (``x, y, z`` for ``Point Z``), so the
chunked readers of :mod:`distspatial.io.files` and the parallel loader (:func:`distspatial.io.shares.read_share`,
nodes reading row groups) take GeoParquet like any Parquet file. Two encodings are read:

* ``WKB`` (GeoParquet 1.0 and 1.1): decoded with NumPy straight from the Arrow buffers (a 2-D point is 21 bytes:
  byte order, type, x, y; ``Point Z`` 29 bytes, ISO (type 1001) or EWKB (flag 0x80000000)), little- and
  big-endian; no shapely needed;
* ``point`` (GeoParquet 1.1 native GeoArrow encoding): a struct of ``x, y[, z]`` double fields (the interleaved
  ``fixed_size_list<double>`` layout of GeoArrow is accepted too).

A geometry that is not a point (a LineString in a point column), an empty point (``POINT EMPTY``) or a missing
geometry raises :class:`~distspatial.io.files.DataFileError` naming the 0-based row and the geometry type.
:class:`GeoColumn` carries the column's CRS (PROJJSON, as stored; GeoParquet's default, OGC:CRS84, when the key is
absent; ``None`` when the file says the CRS is unknown) and its ``bbox``.

Writing: :func:`write_geoparquet` writes a result table with a WKB (or ``point``) geometry column and correct
``geo`` metadata (version 1.1.0, ``Point`` / ``Point Z``, bbox, CRS as PROJJSON via pyproj when given), readable by
``geopandas.read_parquet``. :func:`to_geodataframe` turns a result table plus coordinates into a
``geopandas.GeoDataFrame``; :func:`points_from_geopandas` turns a GeoDataFrame / GeoSeries of points into
coordinates (what ``DistributedSpatialCluster.distribute_data`` does with one).

Only pyarrow and NumPy at import time; geopandas, shapely and pyproj are imported inside the functions that need
them (``pip install 'distspatial[geo]'``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .common import write_atomically

__all__ = ["GeoColumn", "geo_column", "decode_points", "encode_wkb_points", "write_geoparquet", "to_geodataframe",
           "points_from_geopandas", "GEO_HINT", "WKB_TYPES"]

GEO_HINT = "install the optional extra: pip install 'distspatial[geo]' (shapely, geopandas, pyproj)"
#: WKB geometry type codes (ISO, without the Z/M thousands)
WKB_TYPES = {0: "Geometry", 1: "Point", 2: "LineString", 3: "Polygon", 4: "MultiPoint", 5: "MultiLineString",
             6: "MultiPolygon", 7: "GeometryCollection", 15: "PolyhedralSurface", 16: "TIN", 17: "Triangle"}
_CRS84 = "OGC:CRS84"  # GeoParquet's CRS when the column's metadata has no "crs" key


def _geo_error(path: Any, problem: str, fix: str, row: int | None = None, column: str | None = None):
    from .common import DataFileError

    return DataFileError(path, problem, fix, row=row, column=column)


@dataclass(frozen=True)
class GeoColumn:
    """The point geometry column of a GeoParquet file (from its ``geo`` metadata).

    Attributes: ``name``; ``encoding`` (``"WKB"`` or ``"point"``); ``dim`` (2, or 3 for ``Point Z``);
    ``crs`` (the PROJJSON dict or string as stored, ``"OGC:CRS84"`` when the key is absent (GeoParquet's
    default), ``None`` when the file says unknown); ``bbox`` (``[xmin, ymin, xmax, ymax]`` or with z, or ``None``);
    ``geometry_types`` as listed; ``edges`` (``"planar"`` or ``"spherical"``).
    """

    name: str
    encoding: str
    dim: int
    crs: Any
    bbox: tuple[float, ...] | None
    geometry_types: tuple[str, ...]
    edges: str = "planar"

    @property
    def coordinate_names(self) -> list[str]:
        """The coordinate columns the readers report: ``x, y`` or ``x, y, z``."""
        return ["x", "y", "z"][: self.dim]

    @property
    def crs_name(self) -> str | None:
        """A short name of the CRS: ``"EPSG:4326"`` from PROJJSON's id, ``"OGC:CRS84"``, or ``None``."""
        c = self.crs
        if c is None or isinstance(c, str):
            return c
        ident = c.get("id") if isinstance(c, dict) else None
        if isinstance(ident, dict) and "authority" in ident and "code" in ident:
            return f"{ident['authority']}:{ident['code']}"
        return c.get("name") if isinstance(c, dict) else None

    @property
    def crs_input(self) -> Any:
        """The CRS as a data set takes it (``distribute_data(crs=...)``): ``"EPSG:4326"``-like where the PROJJSON
        has an id, else the PROJJSON as a JSON string; ``None`` when unknown."""
        if self.crs is None:
            return None
        name = self.crs_name
        if name is not None and ":" in name:
            return name
        return self.crs if isinstance(self.crs, str) else json.dumps(self.crs)


def geo_column(path: Any, schema: pa.Schema, column: str | None = None) -> GeoColumn | None:
    """The point column of a GeoParquet file's ``schema`` (its ``geo`` metadata): the primary column, or
    ``column``. ``None`` for a plain Parquet file. Raises DataFileError for a geometry column that cannot hold
    points (its ``geometry_types`` list only other types, or a native encoding other than ``point``)."""
    md = schema.metadata or {}
    raw = md.get(b"geo")
    if raw is None:
        return None
    try:
        geo = json.loads(raw)
        cols = geo["columns"]
        name = column if column is not None else geo.get("primary_column") or next(iter(cols))
    except (ValueError, KeyError, TypeError, StopIteration) as exc:
        raise _geo_error(path, f"its 'geo' metadata is not valid GeoParquet metadata ({exc})",
                         "write the file with geopandas.GeoDataFrame.to_parquet or a GeoParquet writer") from None
    if name not in cols:
        return None
    meta = cols[name]
    encoding = str(meta.get("encoding", "WKB"))
    types = tuple(str(t) for t in meta.get("geometry_types", []) or [])
    if schema.get_field_index(name) < 0:
        raise _geo_error(path, f"its 'geo' metadata names the geometry column {name!r} that the file does not have",
                         "the file's metadata is inconsistent: rewrite it with a GeoParquet writer", column=name)
    base = {t.split(" ")[0] for t in types}
    if types and "Point" not in base:  # a column with some points besides others is read: rows are named then
        others = sorted(base)
        raise _geo_error(path, f"the geometry column {name!r} holds {', '.join(others)} geometries (geometry_types "
                         f"{list(types)}), not points",
                         "a point data set needs a column of Point geometries: use the polygons with "
                         "cluster.points_in_polygons / polygon_search, or convert them to points (e.g. centroids)",
                         column=name)
    ftype = schema.field(name).type
    if encoding.upper() == "WKB":
        if not (pa.types.is_binary(ftype) or pa.types.is_large_binary(ftype) or pa.types.is_binary_view(ftype)):
            raise _geo_error(path, f"geometry column {name!r} is declared WKB but its type is {ftype}",
                             "rewrite the file with a GeoParquet writer", column=name)
        dim = 3 if any(t.endswith(" Z") or t.endswith(" ZM") for t in types) else 2
        encoding = "WKB"
    elif encoding == "point":
        fields = _point_fields(path, name, ftype)
        dim = len(fields)
    else:
        raise _geo_error(path, f"the geometry column {name!r} has the encoding {encoding!r}, not points",
                         "a point data set needs a 'WKB' or 'point' encoded column of points", column=name)
    crs = meta["crs"] if "crs" in meta else _CRS84
    bbox = meta.get("bbox")
    return GeoColumn(name, encoding, dim, crs, tuple(float(v) for v in bbox) if bbox else None, types,
                     str(meta.get("edges", "planar")))


def _point_fields(path: Any, name: str, ftype: pa.DataType) -> list[str]:
    if pa.types.is_struct(ftype):
        names = [ftype.field(i).name for i in range(ftype.num_fields)]
        if names[:2] != ["x", "y"] or len(names) > 3 or (len(names) == 3 and names[2] != "z"):
            raise _geo_error(path, f"point column {name!r} is a struct of {names}, expected x, y[, z]",
                             "write the points with the GeoArrow 'point' encoding (fields x, y and optionally z)",
                             column=name)
        return names
    if pa.types.is_fixed_size_list(ftype) and ftype.list_size in (2, 3):  # GeoArrow interleaved
        return ["x", "y", "z"][: ftype.list_size]
    raise _geo_error(path, f"point column {name!r} has the type {ftype}, not a GeoArrow point",
                     "write the points with the GeoArrow 'point' encoding (a struct of x, y[, z])", column=name)


# -- decoding ---------------------------------------------------------------------------------------------------
def decode_points(path: Any, col: GeoColumn, arr: pa.Array | pa.ChunkedArray, offset: int = 0) -> np.ndarray:
    """``(n, col.dim)`` float64 coordinates of a chunk of the geometry column (rows ``offset + i`` of the file).

    Raises DataFileError naming the row for a missing geometry, a geometry that is not a point (with its type),
    an empty point, or a ``Point M`` / ``ZM``.
    """
    if isinstance(arr, pa.ChunkedArray):
        parts = [decode_points(path, col, c, offset + sum(len(x) for x in arr.chunks[:i]))
                 for i, c in enumerate(arr.chunks)]
        return np.concatenate(parts) if parts else np.empty((0, col.dim))
    if arr.null_count:
        import pyarrow.compute as pc

        r = int(np.flatnonzero(pc.is_null(arr).to_numpy(zero_copy_only=False))[0])
        raise _geo_error(path, f"row {offset + r} (0-based) has no geometry (null) in column {col.name!r}",
                         "every point needs a geometry: drop those rows", row=offset + r, column=col.name)
    if col.encoding == "WKB":
        pts = _decode_wkb(path, col, arr, offset)
    else:
        pts = _decode_native(col, arr)
    bad = np.flatnonzero(np.isnan(pts).all(axis=1)) if len(pts) else []
    if len(bad):
        r = int(bad[0])
        raise _geo_error(path, f"row {offset + r} (0-based) of column {col.name!r} is an empty point (POINT EMPTY)",
                         "every point needs coordinates: drop the empty geometries", row=offset + r, column=col.name)
    return pts


def _decode_native(col: GeoColumn, arr: pa.Array) -> np.ndarray:
    n = len(arr)
    out = np.empty((n, col.dim))
    if pa.types.is_struct(arr.type):
        for j, child in enumerate(arr.flatten()[: col.dim]):  # flatten: children with the slice's offset
            out[:, j] = child.cast(pa.float64()).to_numpy(zero_copy_only=False)
        return out
    flat = arr.flatten().cast(pa.float64()).to_numpy(zero_copy_only=False)  # interleaved fixed-size list
    return flat.reshape(n, arr.type.list_size)[:, : col.dim].copy()


def _wkb_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets (n+1,) int64, data uint8)`` of a binary / large binary Arrow array (slices respected)."""
    if pa.types.is_binary_view(arr.type):
        arr = arr.cast(pa.large_binary())
    bufs = arr.buffers()
    odt = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offs = np.frombuffer(bufs[1], dtype=odt, count=len(arr) + 1, offset=arr.offset * np.dtype(odt).itemsize)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.empty(0, np.uint8)
    return offs.astype(np.int64), data


def _type_name(code: int) -> str:
    base = code & 0x0FFFFFFF if code & 0xE0000000 else code
    suffix = ""
    if code & 0x80000000 or 1000 <= base % 10000 < 2000:
        suffix = " Z"
    if code & 0x40000000 or 2000 <= base < 3000:
        suffix = " M"
    if (code & 0xC0000000) == 0xC0000000 or 3000 <= base < 4000:
        suffix = " ZM"
    return WKB_TYPES.get(base % 1000, f"unknown WKB type {code}") + suffix


def _decode_wkb(path: Any, col: GeoColumn, arr: pa.Array, offset: int) -> np.ndarray:
    """WKB points with NumPy: the rows of a column of points all have the same length (21 bytes for 2-D, 29 for
    ``Point Z``), so the data buffer is an ``(n, size)`` byte matrix; byte order, type code and doubles are
    read from its columns. Anything else is located and reported by row."""
    n = len(arr)
    offs, data = _wkb_buffers(arr)
    if n == 0:
        return np.empty((0, col.dim))
    size = 5 + 8 * col.dim
    lengths = np.diff(offs)
    if (lengths == size).all():
        rows = data[offs[0]: offs[0] + n * size].reshape(n, size)
        little = rows[:, 0] == 1
        tb = rows[:, 1:5].astype(np.uint32)
        if not (little | (rows[:, 0] == 0)).all():
            _wkb_problem(path, col, offs, data, lengths, offset)
    else:
        _wkb_problem(path, col, offs, data, lengths, offset)
    code = np.where(little, tb[:, 0] | tb[:, 1] << 8 | tb[:, 2] << 16 | tb[:, 3] << 24,
                    tb[:, 3] | tb[:, 2] << 8 | tb[:, 1] << 16 | tb[:, 0] << 24).astype(np.int64)
    ok = (code == 1) if col.dim == 2 else ((code == 1001) | (code == 0x80000001))
    if not ok.all():
        _wkb_problem(path, col, offs, data, lengths, offset)
    raw = np.ascontiguousarray(rows[:, 5:])
    if not little.all():
        big = ~little
        raw[big] = raw[big].reshape(-1, col.dim, 8)[:, :, ::-1].reshape(-1, 8 * col.dim)
    return raw.view("<f8").reshape(n, col.dim)


def _wkb_problem(path: Any, col: GeoColumn, offs: np.ndarray, data: np.ndarray, lengths: np.ndarray,
                 offset: int):
    """Raise DataFileError for the first row of a WKB chunk that is not a point of the column's dimensions."""
    starts = offs[:-1]
    n = len(starts)
    head = np.zeros((n, 5), dtype=np.uint8)
    have = np.minimum(lengths, 5)
    for j in range(5):  # the first five bytes of every row (fewer for a row too short)
        m = have > j
        head[m, j] = data[starts[m] + j]
    little = head[:, 0] == 1
    tb = head[:, 1:5].astype(np.uint32)
    code = np.where(little, tb[:, 0] | tb[:, 1] << 8 | tb[:, 2] << 16 | tb[:, 3] << 24,
                    tb[:, 3] | tb[:, 2] << 8 | tb[:, 1] << 16 | tb[:, 0] << 24).astype(np.int64)
    want = (code == 1) if col.dim == 2 else ((code == 1001) | (code == 0x80000001))
    good = (lengths >= 5) & (head[:, 0] <= 1) & want & (lengths == 5 + 8 * col.dim)
    r = int(np.flatnonzero(~good)[0]) if not good.all() else 0
    if lengths[r] < 5 or head[r, 0] > 1:
        problem = f"is not valid WKB ({int(lengths[r])} bytes)"
        fix = "rewrite the file with a GeoParquet writer"
    else:
        name = _type_name(int(code[r]))
        if name in ("Point", "Point Z"):
            expect = "Point Z (3-D)" if col.dim == 3 else "Point (2-D)"
            problem = (f"is a {name} but the file's geometry_types say {expect}" if name != expect.split(" (")[0]
                       else f"is a malformed WKB point ({int(lengths[r])} bytes)")
            fix = "write every point with the same dimensions and list them in geometry_types ('Point' or 'Point Z')"
        elif name.startswith("Point"):
            problem = f"is a {name} (with a measure), which is not supported"
            fix = "write the points as 2-D or 3-D (x, y[, z]) without M values"
        else:
            problem = f"is a {name}, not a Point"
            fix = ("a point data set needs a Point in every row: drop or convert those rows (e.g. to their "
                   "centroids); polygons are queried with cluster.points_in_polygons / polygon_search")
    raise _geo_error(path, f"row {offset + r} (0-based) of geometry column {col.name!r} {problem}", fix,
                     row=offset + r, column=col.name)


# -- writing ----------------------------------------------------------------------------------------------------
def encode_wkb_points(points: np.ndarray) -> pa.Array:
    """Little-endian WKB of ``(n, 2)`` / ``(n, 3)`` points (``Point`` / ISO ``Point Z``) as an Arrow binary array,
    built with NumPy (no per-row Python)."""
    pts = np.ascontiguousarray(points, dtype=np.float64)
    n, d = pts.shape
    if d not in (2, 3):
        raise ValueError(f"WKB points are 2-D or 3-D, got {d} coordinates")
    size = 5 + 8 * d
    buf = np.empty((n, size), dtype=np.uint8)
    buf[:, 0] = 1
    buf[:, 1:5] = np.frombuffer(np.uint32(1 if d == 2 else 1001).tobytes(), dtype=np.uint8)
    buf[:, 5:] = pts.view(np.uint8).reshape(n, 8 * d)
    total = n * size
    offs = np.arange(n + 1, dtype=np.int64) * size
    if total < 2**31 - 1:
        return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offs.astype(np.int32)),
                                                       pa.py_buffer(buf.reshape(-1))])
    return pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offs), pa.py_buffer(buf.reshape(-1))])


def _projjson(crs: Any) -> Any:
    """A CRS as GeoParquet stores it: PROJJSON (dict) via pyproj; a dict is taken as PROJJSON already."""
    if crs is None or isinstance(crs, dict):
        return crs
    try:
        import pyproj
    except ImportError:
        raise ImportError(f"writing the CRS {crs!r} into GeoParquet needs pyproj; {GEO_HINT}") from None
    return json.loads(pyproj.CRS.from_user_input(crs).to_json())


def _geo_metadata(name: str, pts: np.ndarray, crs: Any, encoding: str) -> bytes:
    d = pts.shape[1]
    bbox = (list(pts.min(axis=0)) + list(pts.max(axis=0))) if len(pts) else None
    if bbox is not None and d == 3:
        bbox = [bbox[0], bbox[1], bbox[2], bbox[3], bbox[4], bbox[5]]
    col: dict = {"encoding": encoding, "geometry_types": ["Point" if d == 2 else "Point Z"]}
    if not (isinstance(crs, str) and crs.upper() in ("OGC:CRS84", "CRS84")):  # CRS84: the key left out (default)
        col["crs"] = _projjson(crs)
    if bbox is not None:
        col["bbox"] = [float(v) for v in bbox]
    return json.dumps({"version": "1.1.0", "primary_column": name, "columns": {name: col}}).encode()


def geoparquet_table(table_like: Any, points: Any, crs: Any = None, geometry: str = "geometry",
                     encoding: str = "WKB") -> pa.Table:
    """``table_like`` (as :func:`distspatial.io.files.write_results` takes) plus a point geometry column
    ``geometry`` of ``points`` (one per row) and the ``geo`` metadata. ``crs``: anything pyproj takes, a PROJJSON
    dict, or ``None`` (written as unknown: ``"crs": null``)."""
    from .common import _to_table

    table = _to_table("GeoParquet", table_like)
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] not in (2, 3):
        raise ValueError(f"points for a GeoParquet geometry column are (n, 2) or (n, 3), got shape {pts.shape}")
    if len(pts) != table.num_rows:
        raise ValueError(f"{len(pts)} points for a table of {table.num_rows} rows: give one point per row")
    if geometry in table.column_names:
        raise ValueError(f"the table already has a column {geometry!r}: choose another geometry column name")
    if encoding == "WKB":
        geom = encode_wkb_points(pts)
    elif encoding == "point":
        names = ["x", "y", "z"][: pts.shape[1]]
        geom = pa.StructArray.from_arrays([pa.array(pts[:, j]) for j in range(pts.shape[1])], names=names)
    else:
        raise ValueError(f"encoding must be 'WKB' or 'point', got {encoding!r}")
    table = table.append_column(geometry, geom)
    md = dict(table.schema.metadata or {})
    md[b"geo"] = _geo_metadata(geometry, pts, crs, encoding)
    return table.replace_schema_metadata(md)


def write_geoparquet(path: Any, table_like: Any, points: Any, crs: Any = None, geometry: str = "geometry",
                     encoding: str = "WKB") -> str:
    """Write ``table_like`` with a point geometry column as a GeoParquet 1.1 file (``geo`` metadata: encoding,
    ``Point``/``Point Z``, bbox, CRS as PROJJSON); readable by ``geopandas.read_parquet``. Written next to the
    destination and renamed into place. Returns the path.

    >>> write_geoparquet("hits.parquet", {"id": ids}, points, crs="EPSG:4326")   # doctest: +SKIP
    """
    import pyarrow.parquet as pq

    p = os.fspath(path)
    table = geoparquet_table(table_like, points, crs, geometry, encoding)
    return write_atomically(p, lambda tmp: pq.write_table(table, tmp, compression="zstd"), _geo_error)


# -- GeoPandas ---------------------------------------------------------------------------------------------------
def to_geodataframe(table_like: Any, points: Any, crs: Any = None, geometry: str = "geometry") -> Any:
    """A ``geopandas.GeoDataFrame`` of a result table (a mapping of column -> 1-D array, a ``pyarrow.Table``, a
    DataFrame) with a point ``geometry`` of ``points`` (one ``(x, y[, z])`` per row) in ``crs``.

    >>> ids, pts = cluster.box_search(lo, hi, return_points=True)            # doctest: +SKIP
    >>> gdf = to_geodataframe({"id": ids}, pts, crs=cluster.crs)               # doctest: +SKIP
    """
    try:
        import geopandas as gpd
    except ImportError:
        raise ImportError(f"to_geodataframe needs geopandas; {GEO_HINT}") from None
    from .common import _to_table

    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] not in (2, 3):
        raise ValueError(f"points are (n, 2) or (n, 3), got shape {pts.shape}")
    df = table_like if hasattr(table_like, "iloc") else _to_table("GeoDataFrame", table_like).to_pandas()
    if len(df) != len(pts):
        raise ValueError(f"{len(pts)} points for a table of {len(df)} rows: give one point per row")
    geom = gpd.points_from_xy(pts[:, 0], pts[:, 1], pts[:, 2] if pts.shape[1] == 3 else None, crs=crs)
    return gpd.GeoDataFrame(df, geometry=geom, crs=crs).rename_geometry(geometry) if geometry != "geometry" \
        else gpd.GeoDataFrame(df, geometry=geom, crs=crs)


def is_geopandas(obj: Any) -> bool:
    """Whether ``obj`` is a GeoDataFrame or GeoSeries (without importing geopandas)."""
    mod = type(obj).__module__ or ""
    return mod.startswith("geopandas") and type(obj).__name__ in ("GeoDataFrame", "GeoSeries")


def points_from_geopandas(obj: Any, what: str = "points") -> tuple[np.ndarray, Any]:
    """``(coordinates (n, 2|3) float64, crs)`` of a GeoDataFrame (its active geometry) or GeoSeries of points.

    Raises ValueError naming the row (position and index label) for a missing geometry, a geometry that is not a
    Point (with its type), an empty point or a non-finite coordinate. ``crs``: the object's ``pyproj.CRS`` (or
    ``None``).
    """
    import shapely

    geo = obj.geometry if type(obj).__name__ == "GeoDataFrame" else obj
    arr = np.asarray(geo.values, dtype=object) if not hasattr(geo, "array") else np.asarray(geo.array, dtype=object)
    if len(arr) == 0:
        raise ValueError(f"the {what} GeoDataFrame/GeoSeries is empty: give at least one point")
    tid = shapely.get_type_id(arr)

    def label(r: int) -> str:
        try:
            lab = obj.index[r]
            lab = lab.item() if hasattr(lab, "item") else lab
        except Exception:  # pragma: no cover
            return f"row {r}"
        return f"row {r} (index {lab!r})" if lab != r else f"row {r}"

    bad = np.flatnonzero(tid != 0)
    if len(bad):
        r = int(bad[0])
        if tid[r] == -1:
            raise ValueError(f"{what}: {label(r)} has no geometry (None); drop the rows without geometry")
        kind = arr[r].geom_type
        raise ValueError(f"{what}: {label(r)} is a {kind}, not a Point ({int(len(bad))} such row(s)); a point "
                         "data set needs a Point in every row (convert, e.g. geometry.centroid, or drop them); "
                         "polygons are queried with cluster.points_in_polygons / polygon_search")
    empty = np.flatnonzero(shapely.is_empty(arr))
    if len(empty):
        r = int(empty[0])
        raise ValueError(f"{what}: {label(r)} is an empty point (POINT EMPTY); drop the empty geometries")
    has_z = bool(shapely.has_z(arr).any())
    pts = shapely.get_coordinates(arr, include_z=has_z)
    fin = np.isfinite(pts).all(axis=1)
    if not fin.all():
        r = int(np.flatnonzero(~fin)[0])
        raise ValueError(f"{what}: {label(r)} has the non-finite coordinates {pts[r].tolist()}; coordinates must "
                         "be finite numbers")
    return np.ascontiguousarray(pts), getattr(obj, "crs", None)
