"""Geographic coordinates: longitude/latitude in degrees on a sphere, embedded as 3-D unit vectors.

A geographic data set (CRS such as EPSG:4326 / OGC:CRS84, longitude first) is stored and indexed as unit vectors
``(x, y, z)``: the chord between two unit vectors grows monotonically with the great-circle angle between them,
so every exact Euclidean kernel and pruning rule (KD-trees, curve runs, partition boxes, MINDIST) answers
great-circle kNN and radius queries exactly. The facade converts at the edges: lon/lat in, metres out
(``chord_to_metres``), radii in metres to chords (``metres_to_chord``), points back to lon/lat
(``unit_to_lonlat``).

Conventions: the sphere's radius is :data:`EARTH_RADIUS_M` (the mean Earth radius, 6,371,008.8 m), as
scikit-learn's ``haversine`` metric times that radius. Longitudes outside [-180, 180] are wrapped into it (540 ->
180, -190 -> 170); |latitude| > 90 or a non-finite coordinate is an error naming the row. Converting a point to a
unit vector and back gives the input within ~1e-13 degrees (~1e-8 m); longitude 180 may come back as -180 (the
same meridian).

    >>> import numpy as np
    >>> xyz = lonlat_to_unit(np.array([[0.0, 0.0], [90.0, 0.0]]))
    >>> round(float(chord_to_metres(np.linalg.norm(xyz[0] - xyz[1]))))  # a quarter of the equator
    10007557
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "EARTH_RADIUS_M",
    "check_lonlat",
    "chord_to_metres",
    "great_circle_metres",
    "lonlat_box_to_unit_bounds",
    "lonlat_to_unit",
    "metres_to_chord",
    "unit_to_lonlat",
]

#: mean Earth radius in metres (IUGG): great-circle distances are central angles times this
EARTH_RADIUS_M = 6_371_008.8


def check_lonlat(lonlat: np.ndarray, what: str = "points") -> np.ndarray:
    """``(n, 2)`` longitude/latitude in degrees, validated, longitudes wrapped into [-180, 180] (a new array).

    Raises ``ValueError`` naming the first bad row: a non-finite coordinate or |latitude| > 90.
    """
    a = np.array(lonlat, dtype=np.float64, copy=True)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{what} of a geographic data set are (n, 2) longitude, latitude in degrees; got shape "
                         f"{a.shape}")
    bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{what} row {i} has a non-finite coordinate {a[i].tolist()}; longitude/latitude must be "
                         f"finite numbers")
    bad = np.flatnonzero(np.abs(a[:, 1]) > 90.0)
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{what} row {i}: latitude {float(a[i, 1])!r} is outside [-90, 90] (columns are longitude, "
                         f"latitude: were they swapped?)")
    out = np.abs(a[:, 0]) > 180.0
    if out.any():  # wrap: 190 -> -170, -190 -> 170, 540 -> 180
        lon = a[out, 0]
        w = np.mod(lon + 180.0, 360.0) - 180.0
        w[(w == -180.0) & (lon > 0)] = 180.0
        a[out, 0] = w
    return a


def lonlat_to_unit(lonlat: np.ndarray) -> np.ndarray:
    """``(n, 2)`` lon/lat degrees (valid: see :func:`check_lonlat`) -> ``(n, 3)`` unit vectors."""
    lon = np.radians(lonlat[:, 0])
    lat = np.radians(lonlat[:, 1])
    c = np.cos(lat)
    out = np.empty((len(lonlat), 3))
    out[:, 0] = c * np.cos(lon)
    out[:, 1] = c * np.sin(lon)
    out[:, 2] = np.sin(lat)
    return out


#: recovered coordinates are snapped to this many decimals when that reproduces the stored vector exactly
SNAP_DECIMALS = 10


def unit_to_lonlat(xyz: np.ndarray) -> np.ndarray:
    """``(n, 3)`` unit vectors -> ``(n, 2)`` lon/lat degrees (atan2 both ways: accurate near the poles too).

    The inverse is exact to ~1e-14 degrees; on top of that, a coordinate whose value rounded to
    :data:`SNAP_DECIMALS` decimals converts (:func:`lonlat_to_unit`) to the stored vector (to an ulp of each
    component) is returned rounded: among the inputs the stored vector cannot tell apart, the one with at most 10
    decimals. So inputs as
    people write them (8, 50.25, 4.3517) come back exactly, and a point given exactly on a polygon or box edge is
    tested exactly there.

        >>> unit_to_lonlat(lonlat_to_unit(np.array([[8.0, 50.0], [4.3517, 50.8503]]))).tolist()
        [[8.0, 50.0], [4.3517, 50.8503]]
    """
    x, y, z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    out = np.empty((len(xyz), 2))
    out[:, 0] = np.degrees(np.arctan2(y, x))
    out[:, 1] = np.degrees(np.arctan2(z, np.hypot(x, y)))
    rounded = np.round(out, SNAP_DECIMALS)
    near = np.abs(rounded - out) <= 1e-11  # the inverse is off by ~1e-14: farther ones are not such inputs
    rows = np.flatnonzero(near.any(axis=1))
    if len(rows):
        o, r, nr, x = out[rows], rounded[rows], near[rows], xyz[rows]
        ulp = np.spacing(np.abs(x))  # NumPy's vectorized sin/cos may differ by an ulp between array positions
        done = np.zeros(len(rows), dtype=bool)
        for use in ((True, True), (True, False), (False, True)):
            cand = np.where(nr & np.array(use), r, o)
            same = ~done & (np.abs(lonlat_to_unit(cand) - x) <= ulp).all(axis=1) & (cand != o).any(axis=1)
            out[rows[same]] = cand[same]
            done |= same
    return out


def chord_to_metres(chord: np.ndarray | float) -> np.ndarray:
    """Great-circle distance in metres of unit-sphere chords (``inf`` stays ``inf``)."""
    c = np.asarray(chord, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return 2.0 * EARTH_RADIUS_M * np.arcsin(np.minimum(c, 2.0) / 2.0)


def great_circle_metres(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Great-circle distances in metres between rows of ``a`` and ``b`` (``(n, 2)`` longitude/latitude degrees,
    valid; broadcast like NumPy), computed as the index computes them: the chord of their unit vectors
    (:func:`lonlat_to_unit`), then :func:`chord_to_metres`. Equal to scikit-learn's ``haversine`` metric times
    :data:`EARTH_RADIUS_M` within ~1e-8 m."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 2)
    chord = np.sqrt(np.square(lonlat_to_unit(a) - lonlat_to_unit(b)).sum(axis=1))
    return chord_to_metres(chord)


def metres_to_chord(metres: np.ndarray | float) -> np.ndarray:
    """Unit-sphere chord of great-circle distances in metres (>= half the circumference: 2, the whole sphere).

    Rounded up by a few ulps, so that a point at exactly the radius (in metres, as
    :func:`chord_to_metres` computes it) is never left out; callers filter by metres afterwards."""
    m = np.asarray(metres, dtype=np.float64)
    angle = np.minimum(m / EARTH_RADIUS_M, np.pi)
    chord = 2.0 * np.sin(angle / 2.0)
    return np.where(angle >= np.pi, 2.0, chord * (1.0 + 4e-16) + 1e-300)


def lonlat_box_to_unit_bounds(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 3-D box ``(lo3, hi3)`` holding the unit vectors of every point of the lon/lat box ``[lo, hi]``
    (degrees, ``lo = (lon_lo, lat_lo)``; ``lon_lo > lon_hi`` crosses the antimeridian). Used to prune; the exact
    test is done on lon/lat afterwards. Slightly padded against rounding."""
    lon_lo, lat_lo = float(lo[0]), float(lo[1])
    lon_hi, lat_hi = float(hi[0]), float(hi[1])
    if lon_lo > lon_hi:
        lon_hi += 360.0
    # candidate longitudes: the ends and every multiple of 90 degrees inside (extrema of cos and sin)
    lons = [lon_lo, lon_hi] + [m for m in np.arange(np.ceil(lon_lo / 90.0) * 90.0, lon_hi, 90.0)]
    lats = [lat_lo, lat_hi] + ([0.0] if lat_lo < 0.0 < lat_hi else [])
    grid = np.array([[a, b] for a in lons for b in lats])
    xyz = lonlat_to_unit(grid)
    lo3, hi3 = xyz.min(axis=0), xyz.max(axis=0)
    pad = 1e-12
    return lo3 - pad, hi3 + pad
