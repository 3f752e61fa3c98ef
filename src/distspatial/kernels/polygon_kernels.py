"""Point-in-polygon kernels (no Ray): which points of a partition lie in which polygons.

Semantics are shapely's (hence ``geopandas.sjoin``'s): ``"within"``: the point is in the polygon's interior (a
point on the boundary, an edge or a vertex, is *not* within); ``"intersects"``: interior or boundary. Holes and
multipolygons as shapely evaluates them. Edges are straight lines in the coordinates given (for geographic data:
straight in longitude/latitude, as in GeoPandas).

How (:func:`polygon_pairs`), all vectorized, polygons prepared (GEOS prepared geometries):

1. a grid over the points' bounding box; each point's cell from its coordinates (NumPy);
2. *dense* data (tens of points per cell): the occupied cells' boxes are matched with the polygons by a
   ``shapely.STRtree`` (``intersects``); a cell inside a polygon (``contains_properly`` for within, ``covers`` for
   intersects; boxes padded against rounding) gives all its points without testing them; only the points of cells
   a polygon's boundary crosses are tested, pairwise, with ``shapely.contains_xy`` / ``intersects_xy``;
3. *sparse* data (many small polygons): every polygon's bounding box is rasterized onto the grid (NumPy), each
   point meets the polygons listed in its cell, the pairs are cut to bounding-box hits and tested pairwise.

No Python loop runs per point or per polygon. shapely is imported inside the functions (optional extra ``geo``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["PREDICATES", "polygon_bounds", "polygon_pairs", "polygons_from_wkb", "polygons_to_wkb", "sort_pairs"]

PREDICATES = ("within", "intersects")
_PTS_PER_CELL = 48  # dense path: about this many points per grid cell
_MAX_CELLS = 1 << 20


def polygons_to_wkb(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets (k+1,) int64, blob uint8)``: the polygons' WKB back to back (one object for Ray to move)."""
    import shapely

    wkb = shapely.to_wkb(geoms, byte_order=1)
    lens = np.fromiter((len(b) for b in wkb), dtype=np.int64, count=len(wkb))
    offs = np.zeros(len(wkb) + 1, dtype=np.int64)
    np.cumsum(lens, out=offs[1:])
    blob = np.frombuffer(b"".join(wkb), dtype=np.uint8) if len(wkb) else np.empty(0, np.uint8)
    return offs, blob


def polygons_from_wkb(offsets: np.ndarray, blob: np.ndarray) -> np.ndarray:
    """The prepared shapely geometries of :func:`polygons_to_wkb`'s output."""
    import shapely

    raw = blob.tobytes()
    parts = [raw[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    geoms = shapely.from_wkb(np.array(parts, dtype=object)) if parts else np.empty(0, dtype=object)
    shapely.prepare(geoms)
    return geoms


def polygon_bounds(geoms: np.ndarray) -> np.ndarray:
    """``(k, 4)`` ``xmin, ymin, xmax, ymax`` (NaN for an empty geometry)."""
    import shapely

    return shapely.bounds(geoms).reshape(len(geoms), 4)


def polygon_pairs(xy: np.ndarray, geoms: np.ndarray, bounds: np.ndarray | None = None,
                  predicate: str = "within") -> tuple[np.ndarray, np.ndarray]:
    """``(point rows, polygon indices)`` of every (point, polygon) pair with ``point <predicate> polygon``, in no
    particular order (callers sort what they return: :func:`sort_pairs`). ``xy``: ``(n, 2)`` coordinates;
    ``geoms``: prepared shapely geometries (see :func:`polygons_from_wkb`); ``bounds``: their
    :func:`polygon_bounds` (computed when ``None``)."""
    import shapely

    if predicate not in PREDICATES:
        raise ValueError(f"predicate must be one of {PREDICATES}, got {predicate!r}")
    empty = (np.empty(0, np.int64), np.empty(0, np.int64))
    n = len(xy)
    if n == 0 or len(geoms) == 0:
        return empty
    b = polygon_bounds(geoms) if bounds is None else bounds
    lo = xy.min(axis=0)
    hi = xy.max(axis=0)
    # polygons whose bounding box meets the points' (NaN bounds of empty geometries compare False)
    keep = np.flatnonzero((b[:, 0] <= hi[0]) & (b[:, 2] >= lo[0]) & (b[:, 1] <= hi[1]) & (b[:, 3] >= lo[1]))
    if len(keep) == 0:
        return empty
    g, bk = geoms[keep], b[keep]
    ext = np.maximum(hi - lo, 0.0)
    size = np.maximum(bk[:, 2] - bk[:, 0], bk[:, 3] - bk[:, 1])
    med = float(np.median(size)) if len(size) else 0.0
    area = max(ext[0], 1e-300) * max(ext[1], 1e-300) if ext.min() > 0 else max(ext.max(), 1e-300) ** 2
    cs_density = np.sqrt(area * _PTS_PER_CELL / n)  # ~_PTS_PER_CELL points per cell if spread evenly
    dense = med > 0 and cs_density <= med / 2
    cs = cs_density if dense else (med / 2 if med > 0 else max(ext.max(), 1e-300))
    cs = max(cs, float(ext.max()) / 1024, 1e-300)  # at most ~1M cells
    gx = int(min(max(1, np.ceil(ext[0] / cs)), 1024))
    gy = int(min(max(1, np.ceil(ext[1] / cs)), 1024))
    csx = ext[0] / gx if ext[0] > 0 else 1.0
    csy = ext[1] / gy if ext[1] > 0 else 1.0
    cx = np.minimum(((xy[:, 0] - lo[0]) / csx).astype(np.int64), gx - 1)
    cy = np.minimum(((xy[:, 1] - lo[1]) / csy).astype(np.int64), gy - 1)
    cell = cy * gx + cx
    if dense:
        rows, poly = _dense(xy, g, cell, gx, gy, lo, csx, csy, predicate, shapely)
    else:
        rows, poly = _sparse(xy, g, bk, cell, gx, gy, lo, csx, csy, predicate, shapely)
    return rows, keep[poly]


def sort_pairs(ids: np.ndarray, poly: np.ndarray, n_polygons: int,
               permutation: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(ids, poly)`` sorted by id then polygon, and the permutation applied when ``permutation``. Non-negative
    ids small enough are packed with the polygon into one int64 key (``id * n_polygons + polygon``) and sorted
    once (NumPy's vectorized quicksort: 10M keys in ~0.3 s, faster than merging sorted runs); else a lexsort."""
    if len(ids) == 0:
        return ids, poly, (np.empty(0, np.int64) if permutation else None)
    k = max(int(n_polygons), 1)
    if int(ids.min()) >= 0 and int(ids.max()) < (1 << 62) // k:
        key = ids.astype(np.int64) * k + poly
        if permutation:
            o = np.argsort(key)
            key = key[o]
        else:
            o = None
            key.sort()
        return key // k, key % k, o
    o = np.lexsort((poly, ids))
    return ids[o], poly[o], (o if permutation else None)


def _expand(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For groups ``i`` of ``counts[i]`` consecutive positions from ``starts[i]``: ``(group of each position,
    position)``."""
    total = int(counts.sum())
    grp = np.repeat(np.arange(len(counts)), counts)
    pos = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts) + starts[grp]
    return grp, pos


def _test(g: np.ndarray, pi: np.ndarray, xy: np.ndarray, pts: np.ndarray, predicate: str, shapely: Any) -> np.ndarray:
    """``predicate(point pts[i], polygon pi[i])`` for every pair, evaluated in polygon order: consecutive tests on
    the same prepared polygon keep its index in cache (7x faster than in point order for 50K small polygons)."""
    fn = shapely.contains_xy if predicate == "within" else shapely.intersects_xy
    if len(pi) == 0:
        return np.zeros(0, dtype=bool)
    o = np.argsort(pi)
    p = pts[o]
    out = np.empty(len(pi), dtype=bool)
    out[o] = fn(g[pi[o]], xy[p, 0], xy[p, 1])
    return out


def _dense(xy, g, cell, gx, gy, lo, csx, csy, predicate, shapely):
    order = np.argsort(cell)  # points cell by cell (order within a cell does not matter)
    counts = np.bincount(cell, minlength=gx * gy)
    starts = np.cumsum(counts) - counts
    occ = np.flatnonzero(counts)
    ox, oy = occ % gx, occ // gx
    # cell boxes, padded: a point whose cell rounding put it just outside its box is still inside the padded one
    pad_x = csx * 1e-6 + 1e-12 * max(abs(lo[0]), abs(lo[0] + gx * csx))
    pad_y = csy * 1e-6 + 1e-12 * max(abs(lo[1]), abs(lo[1] + gy * csy))
    boxes = shapely.box(lo[0] + ox * csx - pad_x, lo[1] + oy * csy - pad_y,
                        lo[0] + (ox + 1) * csx + pad_x, lo[1] + (oy + 1) * csy + pad_y)
    tree = shapely.STRtree(g)
    ci, pi = tree.query(boxes, predicate="intersects")
    inside_fn = shapely.contains_properly if predicate == "within" else shapely.covers
    inside = inside_fn(g[pi], boxes[ci])
    rows_out, poly_out = [], []
    for sel, test in ((inside, False), (~inside, True)):
        c, p = occ[ci[sel]], pi[sel]
        grp, pos = _expand(starts[c], counts[c])
        pts = order[pos]
        pp = p[grp]
        if test:
            ok = _test(g, pp, xy, pts, predicate, shapely)
            pts, pp = pts[ok], pp[ok]
        rows_out.append(pts)
        poly_out.append(pp)
    return np.concatenate(rows_out), np.concatenate(poly_out)


def _sparse(xy, g, bk, cell, gx, gy, lo, csx, csy, predicate, shapely):
    def cidx(v, o, c, gmax):
        return np.clip(np.floor((v - o) / c), 0, gmax - 1).astype(np.int64)

    x0, x1 = cidx(bk[:, 0], lo[0], csx, gx), cidx(bk[:, 2], lo[0], csx, gx)
    y0, y1 = cidx(bk[:, 1], lo[1], csy, gy), cidx(bk[:, 3], lo[1], csy, gy)
    nx, ny = x1 - x0 + 1, y1 - y0 + 1
    per = nx * ny
    pgrp, k = _expand(np.zeros(len(per), np.int64), per)  # (polygon, k-th cell of its box)
    pc = (y0[pgrp] + k // nx[pgrp]) * gx + x0[pgrp] + k % nx[pgrp]
    order = np.argsort(pc)
    cnt = np.bincount(pc, minlength=gx * gy)
    start = np.cumsum(cnt) - cnt
    plist = pgrp[order]  # polygons listed cell by cell
    pts, pos = _expand(start[cell], cnt[cell])  # each point with each polygon of its cell
    poly = plist[pos]
    x, y = xy[pts, 0], xy[pts, 1]
    hit = (x >= bk[poly, 0]) & (x <= bk[poly, 2]) & (y >= bk[poly, 1]) & (y <= bk[poly, 3])
    pts, poly = pts[hit], poly[hit]
    ok = _test(g, poly, xy, pts, predicate, shapely)
    return pts[ok], poly[ok]
