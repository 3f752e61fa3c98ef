"""Event-time windows over a stream of point batches, with pluggable per-window spatial aggregations.

Pure NumPy logic (no Ray): the cluster's stream processor feeds it batches of ``(points (n, d) float64,
ids (n,) int64, timestamps (n,) float64 seconds)``; every operation on the points of a batch is vectorized.

Semantics
---------
* **Windows.** :class:`WindowSpec` describes tumbling (``size``) or sliding (``size``, ``slide``) windows aligned to
  ``origin``: window ``i`` is ``[origin + i * step, origin + i * step + size)`` with ``step = slide or size``
  (start inclusive, end exclusive).  With sliding windows an event belongs to every window that contains it
  (``size / slide`` of them); with ``slide > size`` (hopping windows with gaps) it may belong to none (such
  events are counted in :attr:`WindowedAggregator.unassigned` and otherwise ignored).
* **Watermark.** ``watermark = max event time seen - max_out_of_orderness`` (``-inf`` before the first event;
  :meth:`WindowedAggregator.advance_watermark` can raise it when the stream is idle).  Events are processed in
  arrival order, one at a time *as if* the watermark moved after each event: the watermark an event is judged
  against includes every event before it, in this batch and earlier ones.  Hence results do not depend on how
  the stream is cut into batches, only on the order of events.
* **Closing.** A window closes when ``watermark >= end + allowed_lateness``.  An event whose windows are all
  closed when it arrives is **late**: it is dropped, counted (:attr:`WindowedAggregator.late_dropped`) and handed
  to ``on_late``.  An event that arrives after the watermark passed a window's end, but before the window closed
  (within ``allowed_lateness``), still updates it (counted in :attr:`WindowResult.late_accepted`).  With sliding
  windows an event can be too late for its older windows but on time for newer ones: it then updates only the
  open ones and is not counted as late.
* **Results.** Only windows that accepted at least one event produce a :class:`WindowResult`; results come out
  in window order (by end).  :meth:`WindowedAggregator.add` returns the results its batch closed (and passes each
  to ``on_window``); :meth:`WindowedAggregator.flush` closes everything at the end of the stream.

Example
-------
>>> import numpy as np
>>> spec = WindowSpec(size=10.0)                       # tumbling 10 s windows
>>> grid = GridCounts(lo=[0, 0], hi=[1, 1], shape=(2, 2))
>>> agg = WindowedAggregator(spec, grid, HotSpots(grid, top_n=1))
>>> pts = np.array([[0.1, 0.1], [0.2, 0.3], [0.9, 0.9], [0.7, 0.2]])
>>> agg.add(pts, np.arange(4), np.array([1.0, 2.0, 3.0, 12.0]))   # t=12 closes [0, 10)
[WindowResult(start=0.0, end=10.0, count=3, ...)]
>>> [r.count for r in agg.flush()]
[1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..core.curves import CURVES, curve_keys
from ..kernels.kmeans_kernels import squared_distances_min

__all__ = [
    "WindowSpec",
    "WindowKey",
    "WindowResult",
    "LateEvents",
    "WindowedAggregator",
    "Aggregation",
    "GridCounts",
    "GridCountsResult",
    "CurveCellCounts",
    "CurveCellCountsResult",
    "HotSpots",
    "HotSpot",
    "find_hot_spots",
    "WindowKMeans",
    "KMeansWindowResult",
    "kmeans_plus_plus",
    "lloyd_kmeans",
]

_U64_MASK = (1 << 64) - 1
_MAX_WINDOW_INDEX = float(1 << 62)


# ---------------------------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------------------------


def _check_batch(
    points: Any, ids: Any, timestamps: Any, dim: int | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``(points (n, d) float64, ids (n,) int64 or None, timestamps (n,) float64)``; ValueError on bad input."""
    t = np.asarray(timestamps, dtype=np.float64)
    if t.size == 0:
        t = t.reshape(0)
    if t.ndim != 1:
        raise ValueError(f"timestamps must have shape (n,), got {t.shape}")
    n = t.shape[0]
    p = np.asarray(points, dtype=np.float64)
    if p.size == 0 and n == 0:
        p = p.reshape(0, dim if dim is not None else (p.shape[-1] if p.ndim == 2 else 0))
    if p.ndim != 2:
        raise ValueError(f"points must have shape (n, d), got {p.shape}")
    if p.shape[0] != n:
        raise ValueError(f"points has {p.shape[0]} rows but timestamps has {n}")
    if dim is not None and n > 0 and p.shape[1] != dim:
        raise ValueError(f"points must have {dim} columns (as in earlier batches), got {p.shape[1]}")
    if n and not np.isfinite(t).all():
        bad = int(np.flatnonzero(~np.isfinite(t))[0])
        raise ValueError(f"timestamps must be finite; row {bad} is {t[bad]}")
    if n and not np.isfinite(p).all():
        bad = int(np.flatnonzero(~np.isfinite(p).all(axis=1))[0])
        raise ValueError(f"points must be finite; row {bad} holds a non-finite value")
    if ids is None:
        return p, None, t
    i = np.asarray(ids)
    if i.size == 0 and n == 0:
        i = i.reshape(0)
    if i.ndim != 1 or i.shape[0] != n:
        raise ValueError(f"ids must have shape ({n},), got {i.shape}")
    if n and i.dtype.kind not in "iu":
        raise ValueError(f"ids must be integers, got {i.dtype}")
    return p, i.astype(np.int64, copy=False), t


def _as_vector(x: Any, name: str, length: int | None = None) -> np.ndarray:
    v = np.atleast_1d(np.asarray(x, dtype=np.float64))
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {v.shape}")
    if length is not None and v.size != length:
        if v.size == 1:
            v = np.full(length, v[0])
        else:
            raise ValueError(f"{name} must have {length} entries, got {v.size}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _check_dims(dims: Any, g: int) -> tuple[int, ...]:
    if dims is None:
        return tuple(range(g))
    dims = tuple(int(x) for x in np.atleast_1d(dims))
    if len(dims) != g:
        raise ValueError(f"dims must name {g} point columns (one per entry of lo/hi), got {dims}")
    if min(dims) < 0 or len(set(dims)) != g:
        raise ValueError(f"dims must be distinct non-negative column numbers, got {dims}")
    return dims


def _columns(points: np.ndarray, dims: tuple[int, ...]) -> np.ndarray:
    if points.shape[1] <= max(dims):
        raise ValueError(f"points have {points.shape[1]} columns but the aggregation uses columns {dims}")
    if dims == tuple(range(points.shape[1])):
        return points
    return points[:, list(dims)]


# ---------------------------------------------------------------------------------------------------------------
# window specification
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowSpec:
    """Event-time windows: tumbling (``slide=None``) or sliding (``slide`` seconds apart).

    Window ``i`` covers ``[origin + i * step, origin + i * step + size)``, ``step = slide or size``.  It closes
    once ``watermark >= end + allowed_lateness`` where ``watermark = max event time - max_out_of_orderness``.

    >>> WindowSpec(10.0).windows_of(25.0)
    [(20.0, 30.0)]
    >>> WindowSpec(10.0, slide=5.0).windows_of(25.0)
    [(20.0, 30.0), (25.0, 35.0)]
    """

    size: float
    slide: float | None = None
    allowed_lateness: float = 0.0
    max_out_of_orderness: float = 0.0
    origin: float = 0.0

    def __post_init__(self) -> None:
        def num(name: str, v: Any, positive: bool) -> float:
            if isinstance(v, bool):
                raise TypeError(f"{name} must be a number, got {v!r}")
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise TypeError(f"{name} must be a number, got {v!r}") from None
            if not math.isfinite(f) or (f <= 0 if positive else f < 0):
                raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {v!r}")
            return f

        object.__setattr__(self, "size", num("size", self.size, True))
        if self.slide is not None:
            object.__setattr__(self, "slide", num("slide", self.slide, True))
        object.__setattr__(self, "allowed_lateness", num("allowed_lateness", self.allowed_lateness, False))
        object.__setattr__(self, "max_out_of_orderness", num("max_out_of_orderness", self.max_out_of_orderness, False))
        if isinstance(self.origin, bool) or not math.isfinite(float(self.origin)):
            raise ValueError(f"origin must be a finite number, got {self.origin!r}")
        object.__setattr__(self, "origin", float(self.origin))

    @classmethod
    def tumbling(cls, size: float, **kwargs: Any) -> "WindowSpec":
        """``[origin + i*size, origin + (i+1)*size)``, each event in exactly one window."""
        return cls(size, None, **kwargs)

    @classmethod
    def sliding(cls, size: float, slide: float, **kwargs: Any) -> "WindowSpec":
        """Windows of ``size`` seconds starting every ``slide`` seconds."""
        return cls(size, slide, **kwargs)

    @property
    def step(self) -> float:
        """Distance between the starts of consecutive windows (``slide``, or ``size`` for tumbling windows)."""
        return self.size if self.slide is None else self.slide

    def window_start(self, index: Any) -> Any:
        """Start of window ``index`` (scalar or array): ``origin + index * step``."""
        return self.origin + np.asarray(index, dtype=np.float64) * self.step if np.ndim(index) else (
            self.origin + float(index) * self.step)

    def window_end(self, index: Any) -> Any:
        """End (exclusive) of window ``index``: ``window_start(index) + size``."""
        return self.window_start(index) + self.size

    def window_range(self, timestamps: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(first, last)`` int64 window indices holding each timestamp (``last < first``: in no window).

        Computed with the same float expressions as :meth:`window_start`/:meth:`window_end`, so
        ``window_start(i) <= t < window_end(i)`` holds exactly for ``first <= i <= last``.
        """
        t = np.asarray(timestamps, dtype=np.float64)
        step, size, origin = self.step, self.size, self.origin
        rel = (t - origin) / step
        if rel.size and np.abs(rel).max() > _MAX_WINDOW_INDEX:
            raise ValueError(f"timestamps too far from origin={origin} for windows of step {step}")
        last = np.floor(rel).astype(np.int64)
        last -= (origin + last * step > t).astype(np.int64)
        last += (origin + (last + 1) * step <= t).astype(np.int64)
        first = np.floor((t - origin - size) / step).astype(np.int64) + 1
        first += (origin + first * step + size <= t).astype(np.int64)
        first -= (origin + (first - 1) * step + size > t).astype(np.int64)
        return first, last

    def windows_of(self, timestamp: float) -> list[tuple[float, float]]:
        """The ``(start, end)`` of every window holding ``timestamp``."""
        first, last = self.window_range(np.array([timestamp]))
        idx = range(int(first[0]), int(last[0]) + 1)
        return [(float(self.window_start(i)), float(self.window_end(i))) for i in idx]


@dataclass(frozen=True)
class WindowKey:
    """Identity of one window: its index (see :class:`WindowSpec`), start (inclusive) and end (exclusive)."""

    index: int
    start: float
    end: float


# ---------------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class WindowResult:
    """Aggregates of one closed window.

    Attributes
    ----------
    start, end : the window ``[start, end)`` in event time.
    count : events accepted into the window.
    aggregates : ``{aggregation name: result}`` (see each aggregation's ``result``); ``result["grid"]`` works too.
    late_dropped : running total of late events the aggregator had dropped when this window closed
        (differences between consecutive results give the drops in between; :attr:`WindowedAggregator.late_dropped`
        is the current total).
    late_accepted : events added after the watermark had passed ``end`` (within ``allowed_lateness``).
    watermark : the watermark that closed the window (the current one for windows closed by ``flush``).
    final : True when closed by :meth:`WindowedAggregator.flush` (end of stream) rather than by the watermark.
    index : the window's index (``start = origin + index * step``).
    """

    start: float
    end: float
    count: int
    aggregates: dict[str, Any]
    late_dropped: int
    late_accepted: int = 0
    watermark: float = -math.inf
    final: bool = False
    index: int = 0

    def __getitem__(self, name: str) -> Any:
        return self.aggregates[name]

    def __repr__(self) -> str:
        return f"WindowResult(start={self.start!r}, end={self.end!r}, count={self.count}, ...)"


@dataclass(frozen=True)
class LateEvents:
    """The late events of one batch (all their windows were closed), as handed to ``on_late``."""

    points: np.ndarray
    ids: np.ndarray
    timestamps: np.ndarray
    watermark: float


# ---------------------------------------------------------------------------------------------------------------
# aggregations
# ---------------------------------------------------------------------------------------------------------------


class Aggregation:
    """Base class of per-window aggregations.

    An aggregation object is a stateless description; the aggregator keeps one *state* per open window:

    * ``new_state(window: WindowKey) -> state`` creates the empty state of a window,
    * ``update(state, points, ids, timestamps) -> None`` adds a batch of the window's events (in arrival order;
      ``points`` is ``(m, d)`` float64, ``ids`` int64, ``timestamps`` float64) to it,
    * ``result(state) -> Any`` is what appears in :attr:`WindowResult.aggregates` under ``name``.

    Optional fast path, for work per event that does not depend on the window (with sliding windows an event
    goes to ``size / slide`` windows): ``prepare(points, ids, timestamps)`` is called once per batch and returns
    per-event data (or None: then ``update`` is used), and ``update_prepared(state, prepared, rows)`` adds the
    batch rows ``rows`` (int array) to a window.

    States should stay bounded (counters, samples), not hold the raw points.
    """

    name: str = "aggregation"

    def new_state(self, window: WindowKey) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def update(self, state: Any, points: np.ndarray, ids: np.ndarray,
               timestamps: np.ndarray) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def prepare(self, points: np.ndarray, ids: np.ndarray, timestamps: np.ndarray) -> Any:
        return None

    def update_prepared(self, state: Any, prepared: Any, rows: np.ndarray) -> None:  # pragma: no cover
        raise NotImplementedError

    def result(self, state: Any) -> Any:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class _Counts:
    counts: np.ndarray
    overflow: int = 0


@dataclass(frozen=True)
class GridCountsResult:
    """Counts on a regular grid: ``counts`` (``shape``, int64), points outside ``[lo, hi]`` in ``overflow``."""

    counts: np.ndarray
    overflow: int
    lo: np.ndarray
    hi: np.ndarray
    dims: tuple[int, ...]

    @property
    def total(self) -> int:
        """Points counted, inside the grid and overflow."""
        return int(self.counts.sum()) + self.overflow

    def cell_bounds(self, index: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(lo, hi)`` corners of the cell with multi-index ``index``."""
        return _cell_bounds(self.lo, self.hi, self.counts.shape, index)


def _cell_bounds(lo: np.ndarray, hi: np.ndarray, shape: tuple[int, ...],
                 index: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    idx = np.asarray(index, dtype=np.float64)
    width = (hi - lo) / np.asarray(shape, dtype=np.float64)
    return lo + idx * width, lo + (idx + 1) * width


class GridCounts(Aggregation):
    """Counts of points per cell of a regular grid over ``[lo, hi]`` (a heat map for 2-D ``lo``/``hi``).

    The grid has ``len(lo)`` dimensions and uses point columns ``dims`` (default: the first ``len(lo)``): pass
    2-D ``lo``/``hi`` to get a heat map of the first two coordinates of 3-D points, or ``d`` entries for a full
    d-dimensional grid.  Give either ``shape`` (cells per dimension, an int for all) or ``cell_size`` (then
    ``shape = ceil((hi - lo) / cell_size)`` and ``hi`` is moved up to ``lo + shape * cell_size``).

    Cell ``j`` along a dimension holds ``lo + j * w <= x < lo + (j + 1) * w`` with ``w = (hi - lo) / shape``,
    computed as ``floor((x - lo) * (shape / (hi - lo)))``; the grid is closed at ``hi`` (``x == hi`` is in the last
    cell).  Points outside ``[lo, hi]`` in any grid dimension are counted in ``overflow``.  State: the count array.

    >>> g = GridCounts([0, 0], [1, 1], shape=(2, 2))
    >>> s = g.new_state(WindowKey(0, 0.0, 1.0))
    >>> g.update(s, np.array([[0.2, 0.2], [0.8, 0.3], [1.0, 1.0], [2.0, 0.0]]), None, None)
    >>> r = g.result(s); r.counts.tolist(), r.overflow
    ([[1, 0], [1, 1]], 1)
    """

    def __init__(
        self,
        lo: Any,
        hi: Any,
        shape: int | Sequence[int] | None = None,
        *,
        cell_size: float | Sequence[float] | None = None,
        dims: Sequence[int] | None = None,
        name: str = "grid",
    ) -> None:
        lo = _as_vector(lo, "lo")
        hi = _as_vector(hi, "hi", lo.size)
        if not (hi > lo).all():
            raise ValueError(f"hi must be > lo in every dimension, got lo={lo}, hi={hi}")
        g = lo.size
        if (shape is None) == (cell_size is None):
            raise ValueError("give exactly one of shape and cell_size")
        if cell_size is not None:
            cs = _as_vector(cell_size, "cell_size", g)
            if not (cs > 0).all():
                raise ValueError(f"cell_size must be > 0, got {cell_size}")
            shp = np.maximum(1, np.ceil((hi - lo) / cs - 1e-9)).astype(np.int64)
            hi = lo + shp * cs
        else:
            shp = np.atleast_1d(np.asarray(shape))
            if shp.dtype.kind not in "iu" or shp.ndim != 1:
                raise ValueError(f"shape must be an int or a sequence of ints, got {shape!r}")
            if shp.size == 1:
                shp = np.full(g, int(shp[0]))
            if shp.size != g or (shp < 1).any():
                raise ValueError(f"shape must have {g} entries >= 1, got {shape!r}")
        self.lo, self.hi = lo, hi
        self.shape: tuple[int, ...] = tuple(int(s) for s in shp)
        self.dims = _check_dims(dims, g)
        self.name = str(name)
        self._scale = np.asarray(self.shape, dtype=np.float64) / (hi - lo)
        self._ncells = int(np.prod(self.shape))

    def cell_index(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(flat cell index (n,) int64, inside (n,) bool)``; flat indices (C order) are valid where inside."""
        x = _columns(np.asarray(points, dtype=np.float64), self.dims)
        inside = ((x >= self.lo) & (x <= self.hi)).all(axis=1)
        f = np.floor((x - self.lo) * self._scale)
        cell = np.clip(f, 0, np.asarray(self.shape) - 1).astype(np.int64)
        flat = np.ravel_multi_index(tuple(cell.T), self.shape) if x.shape[0] else np.empty(0, np.int64)
        return np.asarray(flat, dtype=np.int64), inside

    def cell_bounds(self, index: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(lo, hi)`` corners of the cell with multi-index ``index``."""
        return _cell_bounds(self.lo, self.hi, self.shape, index)

    def new_state(self, window: WindowKey) -> _Counts:
        return _Counts(np.zeros(self._ncells, dtype=np.int64))

    def update(self, state: _Counts, points: np.ndarray, ids: Any = None, timestamps: Any = None) -> None:
        if len(points) == 0:
            return
        self.update_prepared(state, self.prepare(points), None)

    def prepare(self, points: np.ndarray, ids: Any = None, timestamps: Any = None) -> np.ndarray:
        """Flat cell index per point, -1 outside the grid."""
        flat, inside = self.cell_index(points)
        flat[~inside] = -1
        return flat

    def update_prepared(self, state: _Counts, prepared: np.ndarray, rows: np.ndarray | None) -> None:
        cells = prepared if rows is None else prepared[rows]
        inside = cells >= 0
        state.counts += np.bincount(cells[inside], minlength=self._ncells)
        state.overflow += int(inside.size - np.count_nonzero(inside))

    def result(self, state: _Counts) -> GridCountsResult:
        return GridCountsResult(state.counts.reshape(self.shape).copy(), state.overflow, self.lo, self.hi, self.dims)


@dataclass(frozen=True)
class HotSpot:
    """A grid cell reported by :class:`HotSpots`: multi-index, flat (C order) index, corners, count."""

    index: tuple[int, ...]
    flat_index: int
    lo: np.ndarray
    hi: np.ndarray
    count: int


def find_hot_spots(
    grid: GridCountsResult, threshold: float | None = None, top_n: int | None = None
) -> list[HotSpot]:
    """Cells of ``grid`` with ``count >= threshold`` (and ``count > 0``), the ``top_n`` largest of them if given.

    Sorted by count descending, then flat index ascending.

    >>> r = GridCountsResult(np.array([[3, 0], [5, 1]]), 0, np.zeros(2), np.ones(2), (0, 1))
    >>> [(h.index, h.count) for h in find_hot_spots(r, threshold=2)]
    [((1, 0), 5), ((0, 0), 3)]
    """
    if threshold is None and top_n is None:
        raise ValueError("give threshold, top_n or both")
    flat_counts = grid.counts.reshape(-1)
    sel = flat_counts > 0
    if threshold is not None:
        sel &= flat_counts >= threshold
    cells = np.flatnonzero(sel)
    counts = flat_counts[cells]
    order = np.lexsort((cells, -counts))
    if top_n is not None:
        order = order[: int(top_n)]
    cells, counts = cells[order], counts[order]
    shape = grid.counts.shape
    multi = np.stack(np.unravel_index(cells, shape), axis=1) if cells.size else np.empty((0, len(shape)), np.int64)
    width = (grid.hi - grid.lo) / np.asarray(shape, dtype=np.float64)
    los = grid.lo + multi * width
    his = grid.lo + (multi + 1) * width
    return [
        HotSpot(tuple(m), int(c), l, h, int(n))
        for m, c, l, h, n in zip(multi.tolist(), cells.tolist(), los, his, counts.tolist())
    ]


class HotSpots(Aggregation):
    """Hot cells of a :class:`GridCounts` grid: ``count >= threshold``, and/or the ``top_n`` largest.

    The result is a list of :class:`HotSpot` (see :func:`find_hot_spots`).  The aggregation counts on its own
    copy of the grid (a bincount per batch), so it can be used with or without the ``GridCounts`` itself.

    >>> hs = HotSpots(GridCounts([0, 0], [1, 1], 4), top_n=2)
    """

    def __init__(self, grid: GridCounts, threshold: float | None = None, top_n: int | None = None,
                 *, name: str = "hotspots") -> None:
        if not isinstance(grid, GridCounts):
            raise TypeError(f"grid must be a GridCounts, got {type(grid).__name__}")
        if threshold is None and top_n is None:
            raise ValueError("give threshold, top_n or both")
        if top_n is not None and int(top_n) < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}")
        self.grid, self.threshold, self.top_n = grid, threshold, None if top_n is None else int(top_n)
        self.name = str(name)

    def new_state(self, window: WindowKey) -> _Counts:
        return self.grid.new_state(window)

    def update(self, state: _Counts, points: np.ndarray, ids: Any = None, timestamps: Any = None) -> None:
        self.grid.update(state, points)

    def prepare(self, points: np.ndarray, ids: Any = None, timestamps: Any = None) -> np.ndarray:
        return self.grid.prepare(points)

    def update_prepared(self, state: _Counts, prepared: np.ndarray, rows: np.ndarray | None) -> None:
        self.grid.update_prepared(state, prepared, rows)

    def result(self, state: _Counts) -> list[HotSpot]:
        return find_hot_spots(self.grid.result(state), self.threshold, self.top_n)


@dataclass
class _SparseCounts:
    keys: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    counts: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    overflow: int = 0


@dataclass(frozen=True)
class CurveCellCountsResult:
    """Counts per space-filling-curve cell: sorted unique uint64 ``keys`` and their ``counts`` (cells with points)."""

    keys: np.ndarray
    counts: np.ndarray
    overflow: int
    level: int
    curve: str

    def as_dict(self) -> dict[int, int]:
        return dict(zip(self.keys.tolist(), self.counts.tolist()))


class CurveCellCounts(Aggregation):
    """Counts per cell of a Hilbert/Morton curve at ``level`` bits per dimension over the box ``[lo, hi]``.

    Keys are :func:`distspatial.core.curves.curve_keys` of the points with ``bits=level`` (so ``len(lo) * level <= 64``);
    a key names one of the ``2**level`` per dimension grid cells, and consecutive keys are neighbouring cells.
    ``dims`` picks the point columns as in :class:`GridCounts`.  Points outside ``[lo, hi]`` go to ``overflow``.
    State: the sorted keys seen and their counts (at most one entry per occupied cell).

    >>> c = CurveCellCounts([0, 0], [1, 1], level=1)
    >>> s = c.new_state(WindowKey(0, 0.0, 1.0))
    >>> c.update(s, np.array([[0.1, 0.1], [0.2, 0.1], [0.9, 0.1]]), None, None)
    >>> c.result(s).as_dict()
    {0: 2, 3: 1}
    """

    def __init__(self, lo: Any, hi: Any, level: int, curve: str = "hilbert", *,
                 dims: Sequence[int] | None = None, name: str = "curve_cells") -> None:
        lo = _as_vector(lo, "lo")
        hi = _as_vector(hi, "hi", lo.size)
        if not (hi > lo).all():
            raise ValueError(f"hi must be > lo in every dimension, got lo={lo}, hi={hi}")
        if curve not in CURVES:
            raise ValueError(f"unknown curve {curve!r}; allowed values: {', '.join(map(repr, CURVES))}")
        if isinstance(level, bool) or int(level) != level or level < 1 or lo.size * int(level) > 64:
            raise ValueError(f"level must be an int >= 1 with len(lo) * level <= 64, got {level}")
        self.lo, self.hi, self.level, self.curve = lo, hi, int(level), curve
        self.dims = _check_dims(dims, lo.size)
        self.name = str(name)

    def keys(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(keys of the inside points (m,) uint64, inside (n,) bool)``."""
        x = _columns(np.asarray(points, dtype=np.float64), self.dims)
        inside = ((x >= self.lo) & (x <= self.hi)).all(axis=1)
        xin = x[inside]
        if xin.shape[0] == 0:
            return np.empty(0, dtype=np.uint64), inside
        return curve_keys(np.ascontiguousarray(xin), self.lo, self.hi, self.curve, self.level), inside

    def new_state(self, window: WindowKey) -> _SparseCounts:
        return _SparseCounts()

    def update(self, state: _SparseCounts, points: np.ndarray, ids: Any = None, timestamps: Any = None) -> None:
        if len(points) == 0:
            return
        self.update_prepared(state, self.prepare(points), None)

    def prepare(self, points: np.ndarray, ids: Any = None, timestamps: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """``(key per point (0 outside), inside mask)``."""
        keys, inside = self.keys(points)
        full = np.zeros(inside.size, dtype=np.uint64)
        full[inside] = keys
        return full, inside

    def update_prepared(self, state: _SparseCounts, prepared: tuple[np.ndarray, np.ndarray],
                        rows: np.ndarray | None) -> None:
        full, inside = prepared
        if rows is not None:
            full, inside = full[rows], inside[rows]
        state.overflow += int(inside.size - np.count_nonzero(inside))
        keys = full[inside]
        if keys.size == 0:
            return
        u, c = np.unique(keys, return_counts=True)
        allk = np.concatenate([state.keys, u])
        allc = np.concatenate([state.counts, c.astype(np.int64)])
        uk, inv = np.unique(allk, return_inverse=True)
        counts = np.zeros(uk.size, dtype=np.int64)
        np.add.at(counts, inv.reshape(-1), allc)
        state.keys, state.counts = uk, counts

    def result(self, state: _SparseCounts) -> CurveCellCountsResult:
        return CurveCellCountsResult(state.keys.copy(), state.counts.copy(), state.overflow, self.level, self.curve)


# ----- k-means --------------------------------------------------------------------------------------------------


def kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (one candidate per step): ``(k, d)`` centres drawn from ``points`` (needs ``k <= n``).

    The first centre is uniform; each next one is drawn with probability proportional to the squared distance to
    the nearest centre so far (uniformly if all those distances are 0).
    """
    X = np.asarray(points, dtype=np.float64)
    n = X.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    centers = np.empty((k, X.shape[1]))
    centers[0] = X[rng.integers(n)]
    d2 = ((X - centers[0]) ** 2).sum(axis=1)
    for c in range(1, k):
        total = d2.sum()
        if total > 0:
            j = int(np.searchsorted(np.cumsum(d2), rng.random() * total, side="right"))
            j = min(j, n - 1)
        else:
            j = int(rng.integers(n))
        centers[c] = X[j]
        np.minimum(d2, ((X - centers[c]) ** 2).sum(axis=1), out=d2)
    return centers


def lloyd_kmeans(points: np.ndarray, init: np.ndarray, max_iter: int = 100, tol: float = 1e-4
                 ) -> tuple[np.ndarray, np.ndarray, float, int, bool]:
    """Lloyd iterations from ``init``: ``(centers, labels, inertia, n_iter, converged)``.

    Same iteration as ``sklearn.cluster.KMeans(init=init, n_init=1, algorithm="lloyd")``: stop when the labels
    do not change or the total squared centre shift is ``<= tol * mean(var(points, axis=0))``.  An empty cluster
    keeps its centre.
    """
    X = np.asarray(points, dtype=np.float64)
    C = np.array(init, dtype=np.float64, copy=True)
    k, d = C.shape
    tol_abs = float(tol) * float(np.mean(np.var(X, axis=0))) if X.shape[0] else 0.0
    prev = None
    n_iter, converged = 0, False
    for it in range(1, max(1, int(max_iter)) + 1):
        n_iter = it
        lab, _ = squared_distances_min(X, C)
        counts = np.bincount(lab, minlength=k)
        sums = np.stack([np.bincount(lab, weights=X[:, j], minlength=k) for j in range(d)], axis=1)
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], C)
        if prev is not None and np.array_equal(lab, prev):
            C, converged = new, True
            break
        shift = float(((new - C) ** 2).sum())
        C, prev = new, lab
        if shift <= tol_abs:
            converged = True
            break
    lab, d2 = squared_distances_min(X, C)
    return C, lab.astype(np.int64), float(d2.sum()), n_iter, converged


@dataclass(frozen=True)
class KMeansWindowResult:
    """k-means of a window's (sampled) points.

    ``centers (k', d)`` with ``k' = min(k, sample_size)``, ``counts`` of sample points per centre, ``inertia``
    (sum of squared distances of the sample to its centres), ``n_iter``, ``converged``, ``sample_size`` (points
    clustered), ``n_seen`` (points in the window), ``init_centers`` (the k-means++ seeds).
    """

    centers: np.ndarray
    counts: np.ndarray
    inertia: float
    n_iter: int
    converged: bool
    sample_size: int
    n_seen: int
    init_centers: np.ndarray


@dataclass
class _Reservoir:
    rng: np.random.Generator
    init_rng: np.random.Generator
    capacity: int
    sample: np.ndarray | None = None
    n_seen: int = 0


class WindowKMeans(Aggregation):
    """k-means (k-means++ seeding, Lloyd iterations) of each window's points.

    Memory is bounded by a uniform reservoir sample (Algorithm R) of at most ``max_points`` points per window:
    windows with ``<= max_points`` points are clustered exactly; larger ones are clustered on the sample.  Random
    draws come from generators seeded by ``(seed, window index)``, so results are reproducible and do not depend
    on how the stream is batched.  ``dims`` picks point columns (default all).  ``tol`` is relative as in
    scikit-learn (see :func:`lloyd_kmeans`).

    >>> km = WindowKMeans(k=2, seed=0)
    """

    def __init__(self, k: int, seed: int = 0, max_iter: int = 100, *, max_points: int = 10_000, tol: float = 1e-4,
                 dims: Sequence[int] | None = None, name: str = "kmeans") -> None:
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if int(max_points) < int(k):
            raise ValueError(f"max_points must be >= k, got {max_points} < {k}")
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.k, self.seed, self.max_iter = int(k), int(seed), int(max_iter)
        self.max_points, self.tol = int(max_points), float(tol)
        self.dims = None if dims is None else tuple(int(x) for x in np.atleast_1d(dims))
        self.name = str(name)

    def new_state(self, window: WindowKey) -> _Reservoir:
        key = int(window.index) & _U64_MASK
        return _Reservoir(np.random.default_rng([self.seed, key, 0]), np.random.default_rng([self.seed, key, 1]),
                          self.max_points)

    def update(self, state: _Reservoir, points: np.ndarray, ids: Any = None, timestamps: Any = None) -> None:
        x = np.asarray(points, dtype=np.float64)
        if self.dims is not None:
            x = _columns(x, self.dims)
        n = x.shape[0]
        if n == 0:
            return
        if state.sample is None:
            state.sample = np.empty((state.capacity, x.shape[1]))
        m = state.capacity
        t = state.n_seen + np.arange(n, dtype=np.int64)  # position of each point in the window's stream
        fill = t < m
        state.sample[t[fill]] = x[fill]
        rest = np.flatnonzero(~fill)
        if rest.size:
            # Algorithm R: item t replaces slot r ~ U{0..t} when r < m; later items win (sequential order)
            r = np.floor(state.rng.random(rest.size) * (t[rest] + 1)).astype(np.int64)
            hit = r < m
            slots, items = r[hit], rest[hit]
            if slots.size:
                _, first_in_rev = np.unique(slots[::-1], return_index=True)
                last = slots.size - 1 - first_in_rev
                state.sample[slots[last]] = x[items[last]]
        state.n_seen += n

    def sample(self, state: _Reservoir) -> np.ndarray:
        """The window's current sample ``(min(n_seen, max_points), d)`` (arrival order until it is full)."""
        if state.sample is None:
            return np.empty((0, 0))
        return state.sample[: min(state.n_seen, state.capacity)]

    def result(self, state: _Reservoir) -> KMeansWindowResult | None:
        X = self.sample(state)
        if X.shape[0] == 0:
            return None
        k = min(self.k, X.shape[0])
        init = kmeans_plus_plus(X, k, state.init_rng)
        C, lab, inertia, n_iter, conv = lloyd_kmeans(X, init, self.max_iter, self.tol)
        return KMeansWindowResult(C, np.bincount(lab, minlength=k), inertia, n_iter, conv, X.shape[0],
                                  state.n_seen, init)


# ---------------------------------------------------------------------------------------------------------------
# the aggregator
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _OpenWindow:
    key: WindowKey
    states: list[Any]
    count: int = 0
    late_accepted: int = 0


class WindowedAggregator:
    """Runs aggregations over event-time windows of a stream of point batches (see the module docstring).

    Parameters
    ----------
    spec : the windows, lateness and watermark delay.
    *aggregations : :class:`Aggregation` objects (names must be distinct; results are keyed by name).
    on_window : called with each :class:`WindowResult` as it closes (also returned by ``add``/``flush``).
    on_late : called once per batch that has late events, with a :class:`LateEvents`.

    >>> agg = WindowedAggregator(WindowSpec(5.0), GridCounts([0], [1], 2))
    >>> _ = agg.add(np.array([[0.2], [0.7]]), np.array([1, 2]), np.array([1.0, 2.0]))
    >>> _ = agg.add(np.array([[0.2]]), np.array([3]), np.array([9.0]))   # closes [0, 5)
    >>> agg.add(np.array([[0.3]]), np.array([4]), np.array([4.0])), agg.late_dropped    # too late for [0, 5)
    ([], 1)
    >>> [(r.start, r.count, r["grid"].counts.tolist()) for r in agg.flush()]
    [(5.0, 1, [1, 0])]
    """

    def __init__(
        self,
        spec: WindowSpec,
        *aggregations: Aggregation,
        on_window: Callable[[WindowResult], Any] | None = None,
        on_late: Callable[[LateEvents], Any] | None = None,
    ) -> None:
        if not isinstance(spec, WindowSpec):
            raise TypeError(f"spec must be a WindowSpec, got {type(spec).__name__}")
        names = [a.name for a in aggregations]
        for a in aggregations:
            if not isinstance(a, Aggregation):
                raise TypeError(f"aggregations must be Aggregation objects, got {type(a).__name__}")
        if len(set(names)) != len(names):
            raise ValueError(f"aggregation names must be distinct (pass name=...), got {names}")
        self.spec = spec
        self.aggregations: tuple[Aggregation, ...] = tuple(aggregations)
        self.on_window, self.on_late = on_window, on_late
        self._open: dict[int, _OpenWindow] = {}
        self._max_ts = -math.inf
        self._wm_floor = -math.inf
        self._dim: int | None = None
        self._next_id = 0
        self._finished = False
        #: late events dropped so far (all their windows were closed on arrival)
        self.late_dropped = 0
        #: events that fell in no window (gaps of hopping windows with ``slide > size``)
        self.unassigned = 0
        #: events accepted (each counted once, however many windows it went to)
        self.events_accepted = 0

    # ----- state -------------------------------------------------------------------------------------------
    @property
    def watermark(self) -> float:
        """``max event time seen - max_out_of_orderness`` (or the value given to ``advance_watermark``, if larger)."""
        return max(self._max_ts - self.spec.max_out_of_orderness, self._wm_floor)

    @property
    def open_windows(self) -> list[tuple[float, float, int]]:
        """``(start, end, count)`` of the windows still open, by end."""
        return [(w.key.start, w.key.end, w.count) for _, w in sorted(self._open.items())]

    # ----- stream operations ----------------------------------------------------------------------------
    def add(self, points: Any, ids: Any, timestamps: Any) -> list[WindowResult]:
        """Add a batch (in arrival order); return the windows it closed (by end), also passed to ``on_window``.

        ``ids`` may be None (then running sequence numbers are used).  An empty batch does nothing.
        """
        if self._finished:
            raise RuntimeError("the aggregator was flushed (end of stream); create a new one")
        P, I, T = _check_batch(points, ids, timestamps, self._dim)
        n = T.shape[0]
        if n == 0:
            return []
        if self._dim is None:
            self._dim = P.shape[1]
        if I is None:
            I = self._next_id + np.arange(n, dtype=np.int64)
        self._next_id += n
        spec, L = self.spec, self.spec.allowed_lateness
        late_before = self.late_dropped
        wm_prev = self.watermark
        wm = np.maximum(np.maximum.accumulate(T) - spec.max_out_of_orderness, wm_prev)  # after each event

        first, last = spec.window_range(T)
        has = last >= first
        late = has & (spec.window_end(last) + L <= wm)  # the newest window of the event is closed: all are
        self.unassigned += int(n - np.count_nonzero(has))
        ok = np.flatnonzero(has & ~late)
        self.events_accepted += int(ok.size)

        # (event, window) pairs of the accepted events, kept only where the window is still open at that event
        cnt = (last - first + 1)[ok]
        rep = np.repeat(ok, cnt)
        win = first[rep] + (np.arange(rep.size, dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt))
        wend = spec.window_end(win)
        keep = wend + L > wm[rep]
        rep, win, passed = rep[keep], win[keep], (wend <= wm[rep])[keep]
        order = np.argsort(win, kind="stable")  # by window, arrival order within
        rep, win, passed = rep[order], win[order], passed[order]
        uwin, starts = np.unique(win, return_index=True)
        stops = np.append(starts[1:], win.size)
        prepared = [a.prepare(P, I, T) for a in self.aggregations] if uwin.size else []
        for w, s, e in zip(uwin.tolist(), starts.tolist(), stops.tolist()):
            ow = self._open.get(w)
            if ow is None:
                key = WindowKey(w, float(spec.window_start(w)), float(spec.window_end(w)))
                ow = self._open[w] = _OpenWindow(key, [a.new_state(key) for a in self.aggregations])
            sel = rep[s:e]
            raw = None
            for a, st, prep in zip(self.aggregations, ow.states, prepared):
                if prep is not None:
                    a.update_prepared(st, prep, sel)
                else:
                    if raw is None:
                        raw = P[sel], I[sel], T[sel]
                    a.update(st, *raw)
            ow.count += e - s
            ow.late_accepted += int(np.count_nonzero(passed[s:e]))

        self.late_dropped += int(np.count_nonzero(late))
        self._max_ts = max(self._max_ts, float(T.max()))
        if late.any() and self.on_late is not None:
            self.on_late(LateEvents(P[late], I[late], T[late], float(wm[-1])))
        late_cum = late_before + np.cumsum(late)
        return self._close(self.watermark, wm, late_cum)

    def advance_watermark(self, watermark: float) -> list[WindowResult]:
        """Raise the watermark to ``watermark`` (e.g. wall clock minus a delay while the stream is idle); return
        the windows this closes.  A lower value than the current watermark does nothing."""
        if self._finished:
            raise RuntimeError("the aggregator was flushed (end of stream); create a new one")
        w = float(watermark)
        if math.isnan(w):
            raise ValueError("watermark must not be NaN")
        self._wm_floor = max(self._wm_floor, w)
        return self._close(self.watermark, None, None)

    def flush(self) -> list[WindowResult]:
        """End of stream: close every open window (``final=True``) and return them; no ``add`` afterwards."""
        if self._finished:
            return []
        self._finished = True
        return self._close(math.inf, None, None, final=True)

    def process(self, batches: Iterable[tuple[Any, Any, Any]], flush: bool = True) -> Iterator[WindowResult]:
        """Generator: feed ``(points, ids, timestamps)`` batches and yield closed windows as they close
        (then, with ``flush``, the rest at the end)."""
        for points, ids, timestamps in batches:
            yield from self.add(points, ids, timestamps)
        if flush:
            yield from self.flush()

    def _close(self, watermark: float, wm: np.ndarray | None, late_cum: np.ndarray | None,
               final: bool = False) -> list[WindowResult]:
        L = self.spec.allowed_lateness
        closing = sorted(w for w, ow in self._open.items() if final or ow.key.end + L <= watermark)
        out: list[WindowResult] = []
        for w in closing:
            ow = self._open.pop(w)
            thr = ow.key.end + L
            if wm is not None and late_cum is not None:
                j = int(np.searchsorted(wm, thr, side="left"))  # the event whose watermark closed it
                at_wm, dropped = float(wm[j]), int(late_cum[j])
            else:
                at_wm, dropped = self.watermark, self.late_dropped
            res = WindowResult(
                ow.key.start, ow.key.end, ow.count,
                {a.name: a.result(st) for a, st in zip(self.aggregations, ow.states)},
                dropped, ow.late_accepted, at_wm, final, w,
            )
            out.append(res)
            if self.on_window is not None:
                self.on_window(res)
        return out
