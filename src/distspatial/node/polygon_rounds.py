"""A node's share of a polygon query: the points of its partitions tested against the polygons.

The client (:mod:`distspatial.algorithms.polygons`) puts the polygons into Ray's object store once per call, as
WKB back to back (``offsets``, ``blob``), and asks one replica of every partition whose box meets a polygon;
the node parses them (prepared geometries), tests the points of each partition it was asked for with
:func:`~distspatial.kernels.polygon_kernels.polygon_pairs` and returns ids and polygon indices, or counts per
polygon. A geographic data set (stored as unit vectors) is tested in longitude/latitude (edges straight in lon/lat,
as GeoPandas does): its points are converted back with :func:`~distspatial.core.geo.unit_to_lonlat` first.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.geo import unit_to_lonlat
from ..kernels.local_index import wide_ids
from .messages import data_message

__all__ = ["PolygonRoundsMixin", "partition_lonlat"]


def partition_lonlat(points: np.ndarray) -> np.ndarray:
    """GEOGRAPHIC BRANCH: the lon/lat (degrees) of a geographic partition's stored unit vectors, for polygon tests
    in lon/lat."""
    return unit_to_lonlat(points)


class PolygonRoundsMixin:
    """Polygon queries on the partitions of a :class:`~distspatial.node.spatial_node.SpatialNode`."""

    @data_message(compress_result=True)
    def polygon_join(
        self, offsets: np.ndarray, blob: np.ndarray, predicate: str, aggregate: str | None, geographic: bool,
        return_points: bool, partition_ids: list[int], version: int | None = None,
    ) -> Any:
        """Points of ``partition_ids`` in the polygons (WKB ``blob`` cut at ``offsets``), by ``predicate``
        (``"within"`` / ``"intersects"``). Returns ``(ids, polygon indices, points or None)``, partition by
        partition (unsorted), or with ``aggregate="count"`` an int64 count per polygon."""
        from ..kernels.polygon_kernels import polygon_bounds, polygon_pairs, polygons_from_wkb

        self._check_version(version)
        geoms = polygons_from_wkb(offsets, blob)
        bounds = polygon_bounds(geoms)
        counts = np.zeros(len(geoms), dtype=np.int64) if aggregate == "count" else None
        ids_out, poly_out, pts_out = [], [], []
        for pid in partition_ids:
            part = self._part(pid)
            with part.lock:
                pts, ids = part.points, part.ids
            self._count(pid, 1)
            if len(pts) == 0:
                continue
            xy = partition_lonlat(pts) if geographic else pts
            rows, poly = polygon_pairs(xy, geoms, bounds, predicate)
            if counts is not None:
                counts += np.bincount(poly, minlength=len(geoms))
                continue
            ids_out.append(wide_ids(ids[rows]))
            poly_out.append(poly)
            if return_points:
                pts_out.append(xy[rows])
        if counts is not None:
            return counts
        if not ids_out:
            return np.empty(0, np.int64), np.empty(0, np.int64), (np.empty((0, 2)) if return_points else None)
        # not sorted here: the client sorts all answers once (a packed int64 key, one vectorized sort)
        return (np.concatenate(ids_out), np.concatenate(poly_out),
                np.concatenate(pts_out) if return_points else None)
