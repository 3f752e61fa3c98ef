"""Continuous queries over a stream of moving objects: geofences and watched kNN answers.

Pure NumPy/SciPy logic (no Ray): the cluster's stream processor feeds batches of ``(points (n, d) float64,
ids (n,) int64, timestamps (n,) float64)``; the work on the points of a batch is vectorized.

* :class:`GeofenceMonitor` keeps the latest position of every object (id) and emits a :class:`GeofenceEvent`
  ``"enter"``/``"leave"`` whenever an object's inside-state of a registered fence (ball, box or 2-D polygon)
  changes.
* :class:`KnnWatch` keeps the current answer of registered kNN queries and emits a :class:`KnnChange` when the
  answer *set* changes, from answers the cluster computes (:meth:`KnnWatch.check`) or, where that is provably
  exact, by itself from the inserted/deleted points (:meth:`KnnWatch.observe`).

Both deliver events as return values and to an optional callback (``on_event`` / ``on_change``).

>>> import numpy as np
>>> mon = GeofenceMonitor()
>>> mon.add_box("depot", lo=[0, 0], hi=[1, 1])
>>> ev = mon.update(np.array([[0.5, 0.5], [2.0, 2.0]]), np.array([7, 7]), np.array([1.0, 2.0]))
>>> [(e.fence_id, e.object_id, e.kind, e.timestamp) for e in ev]
[('depot', 7, 'enter', 1.0), ('depot', 7, 'leave', 2.0)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

import numpy as np

__all__ = ["Geofence", "GeofenceEvent", "GeofenceMonitor", "points_in_polygon", "KnnChange", "KnnWatch"]

#: id used by the cluster's kNN answers for "no neighbour" slots (fewer than k points); ignored by KnnWatch
MISSING_ID = -1

_PIP_CHUNK = 1 << 22  # point x edge pairs per block of the crossing-number test


def _check_batch(points: Any, ids: Any, timestamps: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids_a = np.asarray(ids)
    if ids_a.size == 0:
        ids_a = ids_a.reshape(0)
    if ids_a.ndim != 1:
        raise ValueError(f"ids must have shape (n,), got {ids_a.shape}")
    n = ids_a.shape[0]
    if n and ids_a.dtype.kind not in "iu":
        raise ValueError(f"ids must be integers, got {ids_a.dtype}")
    p = np.asarray(points, dtype=np.float64)
    if p.size == 0 and n == 0:
        p = p.reshape(0, p.shape[-1] if p.ndim == 2 else 0)
    if p.ndim != 2 or p.shape[0] != n:
        raise ValueError(f"points must have shape ({n}, d) to match ids, got {p.shape}")
    if timestamps is None:
        t = np.zeros(n)
    else:
        t = np.asarray(timestamps, dtype=np.float64)
        if t.size == 0:
            t = t.reshape(0)
        if t.shape != (n,):
            raise ValueError(f"timestamps must have shape ({n},), got {t.shape}")
    if n and not (np.isfinite(t).all() and np.isfinite(p).all()):
        raise ValueError("points and timestamps must be finite")
    return p, ids_a.astype(np.int64, copy=False), t


# ---------------------------------------------------------------------------------------------------------------
# geofences
# ---------------------------------------------------------------------------------------------------------------


def points_in_polygon(points: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Crossing-number (even-odd) test: ``(n,)`` bool, True where the 2-D point is inside the polygon.

    ``vertices`` is ``(V, 2)``, V >= 3, the closing edge implied.  Vectorized over points x edges in blocks.
    Points exactly on the boundary may be reported either way (half-open rule: an edge counts where
    ``min(y_a, y_b) < y <= max(y_a, y_b)`` and the point is strictly left of it).

    >>> sq = np.array([[0, 0], [2, 0], [2, 2], [0, 2]], float)
    >>> points_in_polygon(np.array([[1.0, 1.0], [3.0, 1.0]]), sq).tolist()
    [True, False]
    """
    P = np.asarray(points, dtype=np.float64)
    V = np.asarray(vertices, dtype=np.float64)
    xa, ya = V[:, 0], V[:, 1]
    xb, yb = np.roll(xa, -1), np.roll(ya, -1)
    dy = yb - ya
    slope = np.divide(xb - xa, dy, out=np.zeros_like(dy), where=dy != 0)
    n = P.shape[0]
    out = np.empty(n, dtype=bool)
    step = max(1, _PIP_CHUNK // max(1, V.shape[0]))
    for s in range(0, n, step):
        x = P[s : s + step, 0:1]
        y = P[s : s + step, 1:2]
        spans = (ya > y) != (yb > y)
        xint = xa + (y - ya) * slope
        out[s : s + step] = (np.count_nonzero(spans & (x < xint), axis=1) & 1).astype(bool)
    return out


@dataclass(frozen=True)
class Geofence:
    """A registered fence: ``kind`` is ``"range"`` (``center``, ``radius``: closed ball), ``"box"`` (``lo``,
    ``hi``: closed box) or ``"polygon"`` (``vertices`` (V, 2) on point columns ``dims``)."""

    fence_id: Hashable
    kind: str
    params: dict[str, Any]
    dims: tuple[int, ...]

    def contains(self, points: np.ndarray) -> np.ndarray:
        """``(n,)`` bool: which points are inside."""
        P = np.asarray(points, dtype=np.float64)
        if P.ndim != 2 or P.shape[1] <= max(self.dims):
            raise ValueError(f"fence {self.fence_id!r} uses point columns {self.dims}, points have shape {P.shape}")
        x = P if self.dims == tuple(range(P.shape[1])) else P[:, list(self.dims)]
        if self.kind == "range":
            c, r = self.params["center"], self.params["radius"]
            return ((x - c) ** 2).sum(axis=1) <= r * r
        if self.kind == "box":
            return ((x >= self.params["lo"]) & (x <= self.params["hi"])).all(axis=1)
        return points_in_polygon(x, self.params["vertices"])


@dataclass(frozen=True, eq=False)
class GeofenceEvent:
    """Object ``object_id`` entered or left fence ``fence_id`` at ``timestamp``, at ``point``."""

    fence_id: Hashable
    object_id: int
    kind: str  # "enter" | "leave"
    timestamp: float
    point: np.ndarray

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GeofenceEvent):
            return NotImplemented
        return (self.fence_id, self.object_id, self.kind, self.timestamp) == (
            other.fence_id, other.object_id, other.kind, other.timestamp) and np.array_equal(self.point, other.point)

    __hash__ = None  # type: ignore[assignment]


class GeofenceMonitor:
    """Enter/leave events of moving objects against registered geofences.

    * Each object (id) has a latest position; :meth:`update` applies a batch of positions in timestamp order
      (ties: arrival order), so an object may appear several times in a batch and may enter and leave within it.
      An event older than the object's latest applied timestamp (from an earlier batch) is stale: ignored and
      counted in :attr:`stale_dropped`.
    * An event is emitted for each (position update, fence) where the object's inside-state changes; an object
      seen for the first time inside a fence emits ``"enter"``.  Events come out sorted by
      ``(timestamp, arrival order in the batch, fence registration order)``.
    * :meth:`remove` deletes objects and emits ``"leave"`` for every fence they were in.
    * A fence registered while objects are tracked starts with every object outside: an object inside it
      emits ``"enter"`` at its next update.  :meth:`remove_fence` emits nothing.

    ``on_event`` is called with each event (after the batch is applied), in the order above.

    >>> mon = GeofenceMonitor()
    >>> mon.add_range("r", center=[0, 0], radius=1.0)
    >>> mon.add_polygon("tri", [[0, 0], [4, 0], [0, 4]])
    >>> ev = mon.update(np.array([[0.5, 0.5], [3.0, 3.0]]), np.array([1, 2]), np.array([10.0, 10.0]))
    >>> [(e.fence_id, e.object_id, e.kind) for e in ev]
    [('r', 1, 'enter'), ('tri', 1, 'enter')]
    >>> [(e.fence_id, e.kind) for e in mon.remove([1], timestamp=11.0)]
    [('r', 'leave'), ('tri', 'leave')]
    """

    def __init__(self, on_event: Callable[[GeofenceEvent], Any] | None = None) -> None:
        self.on_event = on_event
        self._fences: list[Geofence] = []
        self._col: dict[Hashable, int] = {}
        self._dim: int | None = None
        self._ids = np.empty(0, dtype=np.int64)  # sorted object ids
        self._pos = np.empty((0, 0))
        self._ts = np.empty(0)
        self._inside = np.empty((0, 0), dtype=bool)
        #: position updates ignored because they were older than the object's latest one
        self.stale_dropped = 0

    # ----- fences -------------------------------------------------------------------------------------------
    def _register(self, fence: Geofence) -> None:
        if fence.fence_id in self._col:
            raise ValueError(f"a fence with id {fence.fence_id!r} is already registered")
        if self._dim is not None and self._dim <= max(fence.dims):
            raise ValueError(f"fence {fence.fence_id!r} uses point columns {fence.dims}; points have {self._dim}")
        self._col[fence.fence_id] = len(self._fences)
        self._fences.append(fence)
        self._inside = np.concatenate([self._inside, np.zeros((self._inside.shape[0], 1), dtype=bool)], axis=1)

    def add_range(self, fence_id: Hashable, center: Sequence[float], radius: float,
                  dims: Sequence[int] | None = None) -> None:
        """Closed ball ``||x - center|| <= radius`` over point columns ``dims`` (default: the first len(center))."""
        c = np.atleast_1d(np.asarray(center, dtype=np.float64))
        r = float(radius)
        if c.ndim != 1 or not np.isfinite(c).all() or not (math.isfinite(r) and r >= 0):
            raise ValueError(f"range fence needs a finite 1-D center and a radius >= 0, got {center!r}, {radius!r}")
        self._register(Geofence(fence_id, "range", {"center": c, "radius": r}, _dims(dims, c.size)))

    def add_box(self, fence_id: Hashable, lo: Sequence[float], hi: Sequence[float],
                dims: Sequence[int] | None = None) -> None:
        """Closed box ``lo <= x <= hi`` over point columns ``dims`` (default: the first len(lo))."""
        lo_a = np.atleast_1d(np.asarray(lo, dtype=np.float64))
        hi_a = np.atleast_1d(np.asarray(hi, dtype=np.float64))
        if lo_a.ndim != 1 or lo_a.shape != hi_a.shape or not (np.isfinite(lo_a).all() and np.isfinite(hi_a).all()):
            raise ValueError(f"box fence needs finite lo and hi of the same length, got {lo!r}, {hi!r}")
        if (hi_a < lo_a).any():
            raise ValueError(f"box fence needs hi >= lo, got {lo!r}, {hi!r}")
        self._register(Geofence(fence_id, "box", {"lo": lo_a, "hi": hi_a}, _dims(dims, lo_a.size)))

    def add_polygon(self, fence_id: Hashable, vertices: Sequence[Sequence[float]],
                    dims: Sequence[int] = (0, 1)) -> None:
        """Simple or self-intersecting polygon (even-odd rule) of ``(V, 2)`` vertices over point columns ``dims``."""
        v = np.asarray(vertices, dtype=np.float64)
        if v.ndim != 2 or v.shape[1] != 2 or v.shape[0] < 3 or not np.isfinite(v).all():
            raise ValueError(f"polygon fence needs finite (V, 2) vertices with V >= 3, got shape {v.shape}")
        self._register(Geofence(fence_id, "polygon", {"vertices": v}, _dims(dims, 2)))

    def remove_fence(self, fence_id: Hashable) -> None:
        """Unregister a fence (no events)."""
        col = self._col.pop(fence_id)
        del self._fences[col]
        self._col = {f.fence_id: i for i, f in enumerate(self._fences)}
        self._inside = np.delete(self._inside, col, axis=1)

    @property
    def fences(self) -> list[Geofence]:
        """Registered fences in registration order."""
        return list(self._fences)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """``(n, n_fences)`` bool: which point is in which fence (columns in registration order)."""
        P = np.asarray(points, dtype=np.float64)
        out = np.empty((P.shape[0], len(self._fences)), dtype=bool)
        for j, f in enumerate(self._fences):
            out[:, j] = f.contains(P)
        return out

    # ----- objects --------------------------------------------------------------------------------------------
    @property
    def tracked(self) -> np.ndarray:
        """Ids of the tracked objects, sorted."""
        return self._ids.copy()

    def position(self, object_id: int) -> tuple[np.ndarray, float] | None:
        """``(latest position, its timestamp)`` of an object, or None if not tracked."""
        row = self._row(object_id)
        return None if row is None else (self._pos[row].copy(), float(self._ts[row]))

    def fences_of(self, object_id: int) -> list[Hashable]:
        """Ids of the fences the object is in now."""
        row = self._row(object_id)
        return [] if row is None else [self._fences[j].fence_id for j in np.flatnonzero(self._inside[row])]

    def objects_in(self, fence_id: Hashable) -> np.ndarray:
        """Sorted ids of the objects in the fence now."""
        return self._ids[self._inside[:, self._col[fence_id]]]

    def _row(self, object_id: int) -> int | None:
        r = int(np.searchsorted(self._ids, object_id))
        return r if r < self._ids.size and self._ids[r] == object_id else None

    def _lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(row (n,), known (n,))`` of ids in the state arrays (row valid where known)."""
        if self._ids.size == 0:
            return np.zeros(ids.size, dtype=np.int64), np.zeros(ids.size, dtype=bool)
        row = np.minimum(np.searchsorted(self._ids, ids), self._ids.size - 1)
        return row, self._ids[row] == ids

    def update(self, points: Any, ids: Any, timestamps: Any) -> list[GeofenceEvent]:
        """Apply a batch of object positions; return the enter/leave events it causes (also sent to ``on_event``)."""
        P, I, T = _check_batch(points, ids, timestamps)
        if I.size == 0:
            return []
        if self._dim is None:
            if self._fences and P.shape[1] <= max(max(f.dims) for f in self._fences):
                raise ValueError(f"points have {P.shape[1]} columns; the fences use more")
            self._dim = P.shape[1]
            self._pos = np.empty((0, self._dim))
        elif P.shape[1] != self._dim:
            raise ValueError(f"points must have {self._dim} columns (as before), got {P.shape[1]}")
        row, known = self._lookup(I)
        stale = known & (T < self._ts[row]) if self._ids.size else np.zeros(I.size, dtype=bool)
        if stale.any():
            self.stale_dropped += int(np.count_nonzero(stale))
            keep = ~stale
            P, I, T, row, known = P[keep], I[keep], T[keep], row[keep], known[keep]
        n = I.size
        if n == 0:
            return []
        inside = self.contains(P)
        F = inside.shape[1]
        o = np.lexsort((np.arange(n), T, I))  # by object, then time, then arrival
        Io = I[o]
        first = np.empty(n, dtype=bool)
        first[0] = True
        np.not_equal(Io[1:], Io[:-1], out=first[1:])
        ins_o = inside[o]
        prev = np.empty_like(ins_o)
        prev[1:] = ins_o[:-1]
        frows = np.flatnonzero(first)
        fev = o[frows]
        prev_first = np.zeros((frows.size, F), dtype=bool)
        kf = known[fev]
        prev_first[kf] = self._inside[row[fev][kf]]
        prev[frows] = prev_first
        r, f = np.nonzero(ins_o != prev)
        ev = o[r]
        order = np.lexsort((f, ev, T[ev]))
        ev, f = ev[order], f[order]
        fence_ids = [fc.fence_id for fc in self._fences]
        cols = zip(ev.tolist(), f.tolist(), I[ev].tolist(), inside[ev, f].tolist(), T[ev].tolist())
        events = [
            GeofenceEvent(fence_ids[j], oid, "enter" if inn else "leave", t, P[e].copy())
            for e, j, oid, inn, t in cols
        ]

        # latest position per object: the last of its run in (object, time, arrival) order
        last = np.empty(n, dtype=bool)
        last[-1] = True
        np.not_equal(Io[1:], Io[:-1], out=last[:-1])
        lev = o[last]
        self._store(I[lev], P[lev], T[lev], inside[lev])
        if self.on_event is not None:
            for e in events:
                self.on_event(e)
        return events

    def _store(self, ids: np.ndarray, pos: np.ndarray, ts: np.ndarray, inside: np.ndarray) -> None:
        """Upsert state rows (``ids`` unique)."""
        all_ids = np.union1d(self._ids, ids)
        if all_ids.size != self._ids.size:
            m, F = all_ids.size, self._inside.shape[1]
            old = np.searchsorted(all_ids, self._ids)
            new_pos, new_ts, new_in = np.empty((m, pos.shape[1])), np.empty(m), np.zeros((m, F), dtype=bool)
            new_pos[old], new_ts[old], new_in[old] = self._pos, self._ts, self._inside
            self._ids, self._pos, self._ts, self._inside = all_ids, new_pos, new_ts, new_in
        at = np.searchsorted(self._ids, ids)
        self._pos[at], self._ts[at], self._inside[at] = pos, ts, inside

    def remove(self, ids: Any, timestamp: float | None = None) -> list[GeofenceEvent]:
        """Stop tracking objects; emit ``"leave"`` for each fence they are in (at ``timestamp``, default their
        latest timestamp; at their latest position), sorted by (object id, fence order).  Unknown ids are ignored."""
        I = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        row, known = self._lookup(I)
        rows = row[known]
        if rows.size == 0:
            return []
        r, f = np.nonzero(self._inside[rows])
        fence_ids = [fc.fence_id for fc in self._fences]
        at = rows[r]
        events = [
            GeofenceEvent(fence_ids[j], oid, "leave", float(timestamp) if timestamp is not None else t, p.copy())
            for oid, j, t, p in zip(self._ids[at].tolist(), f.tolist(), self._ts[at].tolist(), self._pos[at])
        ]
        keep = np.ones(self._ids.size, dtype=bool)
        keep[rows] = False
        self._ids, self._pos, self._ts = self._ids[keep], self._pos[keep], self._ts[keep]
        self._inside = self._inside[keep]
        if self.on_event is not None:
            for e in events:
                self.on_event(e)
        return events

    def process(self, batches: Iterable[tuple[Any, Any, Any]]) -> Iterator[GeofenceEvent]:
        """Generator: apply ``(points, ids, timestamps)`` batches and yield their events."""
        for points, ids, timestamps in batches:
            yield from self.update(points, ids, timestamps)


def _dims(dims: Sequence[int] | None, g: int) -> tuple[int, ...]:
    if dims is None:
        return tuple(range(g))
    out = tuple(int(x) for x in np.atleast_1d(dims))
    if len(out) != g or min(out) < 0 or len(set(out)) != g:
        raise ValueError(f"dims must be {g} distinct non-negative column numbers, got {dims!r}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# kNN watches
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnnChange:
    """The answer set of watched query ``query_id`` changed: ``old_ids``/``new_ids`` sorted by distance (with
    their distances).  ``initial`` is True for the first answer of a query (``old_ids`` empty)."""

    query_id: Hashable
    old_ids: np.ndarray
    new_ids: np.ndarray
    timestamp: float | None
    old_dists: np.ndarray
    new_dists: np.ndarray
    initial: bool = False

    @property
    def added(self) -> np.ndarray:
        """Ids in the new answer but not in the old one (sorted)."""
        return np.setdiff1d(self.new_ids, self.old_ids)

    @property
    def removed(self) -> np.ndarray:
        """Ids in the old answer but not in the new one (sorted)."""
        return np.setdiff1d(self.old_ids, self.new_ids)


@dataclass
class _Watched:
    query_id: Hashable
    point: np.ndarray
    k: int
    ids: np.ndarray
    dists: np.ndarray
    answered: bool = False  # has had an answer at all
    exact: bool = False  # the stored answer is the current exact answer


class KnnWatch:
    """Registered kNN queries ``(query_id, point, k)``; emits a :class:`KnnChange` when an answer set changes.

    Two ways to keep answers current, which can be mixed:

    * **From the cluster** (always exact): compute the exact kNN of :meth:`points` with ``k = max_k`` and call
      :meth:`check` ``(answer_ids, answer_dists)``; ``MISSING_ID`` (-1) slots are ignored.
    * **By itself** (:meth:`observe`, after a first ``check``): given the points inserted into the index (an id
      already present counts as moved) and the ids deleted, it merges the new points into each answer.  That is
      exact unless a point of the answer was deleted or moved and the merged answer cannot prove it still has the
      k nearest; such queries are listed by :meth:`needs_refresh` until the next ``check``.

    Queries never answered are in :meth:`needs_refresh` too.  So a stream processor does, per batch::

        changes = watch.observe(points, ids, deleted_ids, timestamp=t)
        stale = watch.needs_refresh()
        if stale:
            dist, nn = cluster.distributed_knn_search(watch.points(stale), watch.max_k)
            changes += watch.check(nn, dist, timestamp=t, query_ids=stale)

    Exact distance ties at the k-th place can make the set differ between ways of computing it; ``observe``
    breaks ties by id.

    >>> w = KnnWatch()
    >>> w.add_query("q", [0.0, 0.0], k=2)
    >>> [c.initial for c in w.check(np.array([[5, 6]]), np.array([[1.0, 2.0]]))]
    [True]
    >>> [c.new_ids.tolist() for c in w.observe(np.array([[0.5, 0.0]]), np.array([9]))]
    [[9, 5]]
    """

    def __init__(self, on_change: Callable[[KnnChange], Any] | None = None) -> None:
        self.on_change = on_change
        self._queries: dict[Hashable, _Watched] = {}
        self._dim: int | None = None

    # ----- queries --------------------------------------------------------------------------------------------
    def add_query(self, query_id: Hashable, point: Sequence[float], k: int) -> None:
        """Watch the ``k`` nearest neighbours of ``point``; its first answer comes from :meth:`check`."""
        if query_id in self._queries:
            raise ValueError(f"a query with id {query_id!r} is already registered")
        p = np.atleast_1d(np.asarray(point, dtype=np.float64))
        if p.ndim != 1 or not np.isfinite(p).all():
            raise ValueError(f"point must be a finite 1-D array, got {point!r}")
        if self._dim is not None and p.size != self._dim:
            raise ValueError(f"point must have {self._dim} coordinates like the other queries, got {p.size}")
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        self._dim = p.size
        self._queries[query_id] = _Watched(query_id, p, int(k), np.empty(0, np.int64), np.empty(0))

    def remove_query(self, query_id: Hashable) -> None:
        del self._queries[query_id]
        if not self._queries:
            self._dim = None

    @property
    def query_ids(self) -> list[Hashable]:
        """Registered query ids, in registration order."""
        return list(self._queries)

    @property
    def max_k(self) -> int:
        return max((q.k for q in self._queries.values()), default=0)

    def points(self, query_ids: Sequence[Hashable] | None = None) -> np.ndarray:
        """``(m, d)`` query points of ``query_ids`` (default: all, registration order)."""
        qs = self._select(query_ids)
        return np.stack([q.point for q in qs]) if qs else np.empty((0, self._dim or 0))

    def ks(self, query_ids: Sequence[Hashable] | None = None) -> np.ndarray:
        return np.array([q.k for q in self._select(query_ids)], dtype=np.int64)

    def answer(self, query_id: Hashable) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, dists)`` of the current answer, sorted by distance."""
        q = self._queries[query_id]
        return q.ids.copy(), q.dists.copy()

    def needs_refresh(self) -> list[Hashable]:
        """Queries whose current exact answer is unknown (never checked, or an answer point deleted/moved)."""
        return [q.query_id for q in self._queries.values() if not q.exact]

    def _select(self, query_ids: Sequence[Hashable] | None) -> list[_Watched]:
        if query_ids is None:
            return list(self._queries.values())
        return [self._queries[i] for i in query_ids]

    def _emit(self, q: _Watched, ids: np.ndarray, dists: np.ndarray, timestamp: float | None,
              out: list[KnnChange]) -> None:
        initial = not q.answered
        if initial or not np.array_equal(np.sort(q.ids), np.sort(ids)):
            out.append(KnnChange(q.query_id, q.ids, ids, timestamp, q.dists, dists, initial))
        q.ids, q.dists, q.answered, q.exact = ids, dists, True, True

    def _deliver(self, out: list[KnnChange]) -> list[KnnChange]:
        if self.on_change is not None:
            for c in out:
                self.on_change(c)
        return out

    # ----- updates --------------------------------------------------------------------------------------------
    def check(self, answer_ids: Any, answer_dists: Any, timestamp: float | None = None,
              query_ids: Sequence[Hashable] | None = None) -> list[KnnChange]:
        """Give the exact current answers (rows sorted by distance, as the cluster's kNN returns them) of
        ``query_ids`` (default: all, registration order); return the changes (also sent to ``on_change``).

        ``answer_ids``/``answer_dists`` are ``(m, K)`` with ``K >= k`` of each query (only the first ``k``
        columns of a row are used), or ``(K,)`` for one query.
        """
        qs = self._select(query_ids)
        ids = np.asarray(answer_ids)
        dists = np.asarray(answer_dists, dtype=np.float64)
        if ids.ndim == 1:
            ids, dists = ids.reshape(1, -1), dists.reshape(1, -1)
        if ids.shape != dists.shape or ids.ndim != 2 or ids.shape[0] != len(qs):
            raise ValueError(f"answers must be ({len(qs)}, K) ids and distances, got {ids.shape} and {dists.shape}")
        if len(qs) and ids.shape[1] < max(q.k for q in qs):
            raise ValueError(f"answers have {ids.shape[1]} columns, fewer than k={max(q.k for q in qs)}")
        ids = ids.astype(np.int64, copy=False)
        out: list[KnnChange] = []
        for q, row_i, row_d in zip(qs, ids, dists):
            row_i, row_d = row_i[: q.k], row_d[: q.k]
            valid = row_i != MISSING_ID
            self._emit(q, row_i[valid].copy(), row_d[valid].copy(), timestamp, out)
        return self._deliver(out)

    def observe(self, points: Any = None, ids: Any = None, deleted_ids: Any = None,
                timestamp: float | None = None) -> list[KnnChange]:
        """Apply points inserted into the index (``ids`` already there count as moved: deleted, then inserted
        at the new position; within the batch the last row of an id wins) and ids deleted from it (applied
        first); return the changes of the answers this proves (others: :meth:`needs_refresh`).

        For a query with exact answer ``A`` (k-th distance ``D``), let ``A'`` be ``A`` without its deleted or
        moved ids and ``N`` the k nearest of the inserted points: the new answer is the k nearest of ``A' + N``
        when nothing was removed from ``A``, when ``A`` held all the points (fewer than k), or when that result
        has k points within ``D`` (every point outside ``A`` is at least ``D`` away).
        """
        from scipy.spatial import cKDTree

        if points is None:
            P, I = np.empty((0, self._dim or 0)), np.empty(0, np.int64)
        else:
            P, I, _ = _check_batch(points, ids, None)
        D = np.empty(0, np.int64) if deleted_ids is None else np.asarray(deleted_ids, dtype=np.int64).reshape(-1)
        if I.size > 1:  # last row per id wins
            _, last_rev = np.unique(I[::-1], return_index=True)
            keep = np.sort(I.size - 1 - last_rev)
            P, I = P[keep], I[keep]
        qs = [q for q in self._queries.values() if q.exact]
        if not qs or (I.size == 0 and D.size == 0):
            return []
        if I.size and P.shape[1] != self._dim:
            raise ValueError(f"points must have {self._dim} columns like the queries, got {P.shape[1]}")
        touched = np.union1d(I, D)
        kk = min(self.max_k, I.size)
        if kk:
            nd, ni = cKDTree(P).query(np.stack([q.point for q in qs]), k=kk)
            nd, ni = nd.reshape(len(qs), kk), ni.reshape(len(qs), kk)
            new_ids_all = I[ni]
        out: list[KnnChange] = []
        for row, q in enumerate(qs):
            gone = np.isin(q.ids, touched)
            if kk == 0 and not gone.any():
                continue
            cand_i, cand_d = q.ids[~gone], q.dists[~gone]
            if kk:
                cand_i = np.concatenate([cand_i, new_ids_all[row, : q.k]])
                cand_d = np.concatenate([cand_d, nd[row, : q.k]])
            order = np.lexsort((cand_i, cand_d))[: q.k]
            new_i, new_d = cand_i[order], cand_d[order]
            provable = (not gone.any() or q.ids.size < q.k
                        or (new_i.size == q.k and new_d[-1] <= q.dists[-1]))
            if provable:
                self._emit(q, new_i, new_d, timestamp, out)
            else:
                q.exact = False
        return self._deliver(out)
