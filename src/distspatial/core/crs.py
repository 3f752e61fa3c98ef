"""Coordinate reference systems of a data set: which CRS, and whether it is geographic (lon/lat on a sphere).

:func:`resolve_crs` turns what a user passes (``"EPSG:4326"``, ``"OGC:CRS84"``, ``4326``, a ``pyproj.CRS``, WKT,
PROJJSON) into a :class:`CRSInfo`: a canonical name (``"EPSG:4326"``), whether it is geographic and its units.
With pyproj installed (``pip install distspatial[geo]``) every CRS pyproj knows is accepted and described;
without it only the common lon/lat names are (``EPSG:4326``, ``OGC:CRS84``, ``WGS84``) and others are refused with
a message saying to install the extra.

A **geographic** data set is given and answered as longitude/latitude in degrees (always longitude first, as
GeoParquet, GeoPandas and shapely take them, whatever the CRS's official axis order) and stored on the nodes as
3-D unit vectors (:mod:`distspatial.core.geo`); every distance is the great-circle distance in metres on the
mean Earth radius. A **projected** CRS is only carried with the data: distances are Euclidean in its units.

:func:`to_unit` is the one conversion of user lon/lat input (validated, rows named) to the stored vectors.

Pure Python/NumPy; pyproj optional.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .geo import check_lonlat, lonlat_to_unit

__all__ = ["CRSInfo", "resolve_crs", "to_unit", "GEO_DIM"]

#: coordinates a user gives per point of a geographic data set (longitude, latitude); stored as 3-D unit vectors
GEO_DIM = 2

# names accepted without pyproj: canonical name of each (upper-cased key)
_KNOWN = {
    "EPSG:4326": "EPSG:4326", "4326": "EPSG:4326", "WGS84": "EPSG:4326", "WGS 84": "EPSG:4326",
    "URN:OGC:DEF:CRS:EPSG::4326": "EPSG:4326",
    "OGC:CRS84": "OGC:CRS84", "CRS84": "OGC:CRS84", "URN:OGC:DEF:CRS:OGC:1.3:CRS84": "OGC:CRS84",
    "URN:OGC:DEF:CRS:OGC::CRS84": "OGC:CRS84",
}


@dataclass(frozen=True)
class CRSInfo:
    """A resolved CRS: ``name`` (canonical, e.g. ``"EPSG:4326"``; what metadata and checkpoints keep),
    ``geographic`` (lon/lat in degrees: great-circle metres), ``units`` of its coordinates and a readable
    ``description`` (pyproj's name, e.g. ``"WGS 84"``)."""

    name: str
    geographic: bool
    units: str
    description: str

    @property
    def distance_units(self) -> str:
        """Units of every distance a query answers: metres for a geographic CRS, else the CRS's own units."""
        return "metre" if self.geographic else self.units


def _pyproj():
    try:
        import pyproj
    except ImportError:
        return None
    return pyproj


def resolve_crs(crs: Any) -> CRSInfo | None:
    """``crs`` (a name such as ``"EPSG:4326"``, an EPSG code, a ``pyproj.CRS``, WKT, PROJJSON, ...; ``None``: no
    CRS, plain Euclidean coordinates) -> a :class:`CRSInfo`. Raises ``ValueError`` saying what is accepted."""
    if crs is None:
        return None
    if isinstance(crs, CRSInfo):
        return crs
    if isinstance(crs, bool) or (not isinstance(crs, (str, int, np.integer)) and _pyproj() is None):
        raise ValueError(f"crs must be a name such as 'EPSG:4326' or an EPSG code, got {type(crs).__name__} "
                         f"{crs!r}")
    if isinstance(crs, str) and not crs.strip():
        raise ValueError("crs is an empty string; pass e.g. crs='EPSG:4326' for longitude/latitude, or None")
    pyproj = _pyproj()
    if pyproj is None:
        key = str(int(crs)) if isinstance(crs, (int, np.integer)) else crs.strip().upper()
        name = _KNOWN.get(key)
        if name is None:
            raise ValueError(f"crs {crs!r} is not one of the names known without pyproj (EPSG:4326, OGC:CRS84, "
                             f"WGS84); install pyproj to use any CRS: pip install 'distspatial[geo]'")
        return CRSInfo(name, True, "degree", "WGS 84" if name == "EPSG:4326" else "WGS 84 (CRS84)")
    try:
        c = pyproj.CRS.from_user_input(int(crs) if isinstance(crs, np.integer) else crs)
    except Exception as exc:  # pyproj.exceptions.CRSError and friends
        raise ValueError(f"crs {crs!r} is not a CRS pyproj recognises ({str(exc).splitlines()[0]}); pass e.g. "
                         f"'EPSG:4326' (longitude/latitude) or a projected CRS such as 'EPSG:3857'") from None
    auth = c.to_authority()
    name = f"{auth[0]}:{auth[1]}" if auth else c.to_string()
    axes = c.axis_info
    units = axes[0].unit_name if axes else "unknown"
    geographic = bool(c.is_geographic)
    if not geographic and not c.is_projected:
        raise ValueError(f"crs {name!r} ({c.name}) is neither geographic (longitude/latitude) nor projected; "
                         f"pass a geographic CRS such as 'EPSG:4326' or a projected one such as 'EPSG:3857'")
    return CRSInfo(name, geographic, "degree" if geographic else units, c.name)


def to_unit(lonlat: Any, what: str = "points", row0: int = 0) -> np.ndarray:
    """User longitude/latitude input ``(n, 2)`` (or one point ``(2,)``) in degrees -> ``(n, 3)`` unit vectors.

    Validated by :func:`~distspatial.core.geo.check_lonlat` (longitudes wrapped into [-180, 180]; |lat| > 90 or a
    non-finite value: ``ValueError`` naming the row, counted from ``row0``)."""
    try:
        a = np.asarray(lonlat, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be numeric longitude, latitude pairs in degrees") from None
    if a.ndim == 1 and a.shape[0] == GEO_DIM:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] != GEO_DIM:
        raise ValueError(f"{what} of a geographic data set are (n, 2) longitude, latitude in degrees; got shape "
                         f"{a.shape}")
    if row0:
        try:
            a = check_lonlat(a, what)
        except ValueError as exc:  # name the row in the whole input, not in this chunk
            msg = str(exc)
            import re

            m = re.match(rf"{re.escape(what)} row (\d+)(.*)", msg, re.S)
            if m is None:
                raise
            raise ValueError(f"{what} row {row0 + int(m.group(1))}{m.group(2)}") from None
    else:
        a = check_lonlat(a, what)
    return lonlat_to_unit(a)
