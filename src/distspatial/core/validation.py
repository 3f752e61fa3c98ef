"""Input validation with messages that say what is wrong and how to fix it (scikit-learn style)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_points", "check_queries", "check_ids", "check_k", "check_radius"]


def _as_float_array(x: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise ValueError(f"{name} could not be converted to a numeric array: {exc}") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}; convert it with np.asarray(..., float)")
    if np.iscomplexobj(arr):
        raise ValueError(f"{name} must be real-valued, got complex dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float64)


def _check_finite(arr: np.ndarray, name: str) -> None:
    finite = np.isfinite(arr)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.reshape(len(arr), -1).all(axis=1)) if arr.ndim > 1 else np.flatnonzero(~finite)
        shown = ", ".join(str(r) for r in bad_rows[:10])
        more = f" and {len(bad_rows) - 10} more" if len(bad_rows) > 10 else ""
        raise ValueError(
            f"{name} contains NaN or infinite values in rows [{shown}]{more} "
            f"({len(bad_rows)} rows in total); drop or impute them before calling"
        )


def check_points(points: Any, name: str = "points") -> np.ndarray:
    """A finite float64 ``(n, d)`` array with ``n >= 1`` and ``d >= 1``, or ``ValueError``."""
    arr = _as_float_array(points, name)
    if arr.ndim != 2:
        hint = " (for 1-D data use points.reshape(-1, 1))" if arr.ndim == 1 else ""
        raise ValueError(f"{name} must be a 2-D array of shape (n, d), got shape {arr.shape}{hint}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one point of at least one dimension, got shape {arr.shape}")
    _check_finite(arr, name)
    return arr


def check_queries(q: Any, dim: int, name: str = "query") -> tuple[np.ndarray, bool]:
    """``(queries (m, d), single)``: a point ``(d,)`` becomes ``(1, d)`` with ``single=True``."""
    arr = _as_float_array(q, name)
    single = arr.ndim == 1
    if single:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(
            f"{name} must have shape ({dim},) or (m, {dim}) to match the distributed data's dimension {dim}, "
            f"got shape {np.shape(q)}"
        )
    _check_finite(arr, name)
    return arr, single


def check_ids(ids: Any, n: int) -> np.ndarray:
    """Unique int64 ids, one per point."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"ids must be a 1-D array with one id per point ({n}), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if n > 1:
        s = np.sort(arr)
        dup = np.flatnonzero(s[1:] == s[:-1])
        if len(dup):
            raise ValueError(f"ids must be unique; id {int(s[dup[0]])} appears more than once ({len(dup)} duplicates)")
    return arr


def check_k(k: Any, n_points: int) -> int:
    """``1 <= k <= n_points``."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an int, got {type(k).__name__} {k!r}")
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n_points:
        raise ValueError(f"k={k} is larger than the number of distributed points ({n_points}); use k <= {n_points}")
    return int(k)


def check_radius(radius: Any, m: int) -> np.ndarray:
    """A finite, non-negative radius per query, shape ``(m,)`` (a scalar is broadcast)."""
    arr = np.asarray(radius, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(m, float(arr))
    if arr.shape != (m,):
        raise ValueError(f"radius must be a scalar or have one value per query ({m}), got shape {np.shape(radius)}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"radius must be finite and >= 0, got {radius!r}")
    return arr
