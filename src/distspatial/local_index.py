"""The local index of one partition: its points, their global ids and a KD-tree over them.

These are the node-level query kernels. They import no Ray, so they can be tested and benchmarked on their own
(and later swapped for a GPU backend)::

    >>> import numpy as np
    >>> part = LocalPartition(np.array([[0.0, 0.0], [1.0, 1.0], [3.0, 3.0]]), np.array([10, 11, 12]))
    >>> d, i = part.knn(np.array([[0.9, 0.9]]), 2)
    >>> i.tolist()
    [[11, 10]]
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["LocalPartition", "merge_topk"]

#: id used for "no neighbour" slots (fewer than k points within the bound); distances there are ``inf``.
MISSING_ID = -1


def _kdtree(points: np.ndarray, leafsize: int) -> cKDTree | None:
    """The KD-tree of ``points`` (None when there are none)."""
    if not len(points):
        return None
    # balanced_tree=False (sliding midpoint) builds about 2x faster than median splits and queries as fast.
    return cKDTree(points, leafsize=leafsize, balanced_tree=False, compact_nodes=False)


class _Segment:
    """Points with a KD-tree and a deletion mask (``dead``); rows never move while the segment lives."""

    __slots__ = ("points", "ids", "tree", "dead", "n_dead", "_cum")

    def __init__(self, points: np.ndarray, ids: np.ndarray, leafsize: int = 16, tree: cKDTree | None = None) -> None:
        self.points = points
        self.ids = ids
        self.tree = tree if tree is not None else _kdtree(points, leafsize)
        self.dead: np.ndarray | None = None
        self.n_dead = 0
        self._cum: np.ndarray | None = None  # dead rows before each row (for live positions)

    @property
    def n(self) -> int:
        return len(self.points)

    @property
    def n_live(self) -> int:
        return len(self.points) - self.n_dead

    def kill(self, ids: np.ndarray) -> int:
        """Mark the rows holding ``ids`` dead; returns how many live rows died."""
        if self.n_live == 0 or len(ids) == 0:
            return 0
        hit = np.isin(self.ids, ids)
        if self.dead is not None:
            hit &= ~self.dead
        n = int(np.count_nonzero(hit))
        if n:
            self.dead = hit if self.dead is None else (self.dead | hit)
            self.n_dead += n
            self._cum = None
        return n

    def live_rows(self, rows: np.ndarray) -> np.ndarray:
        """Keep live ``rows`` and turn them into positions among the live rows."""
        if self.dead is None:
            return rows
        rows = rows[~self.dead[rows]]
        if self._cum is None:
            self._cum = np.cumsum(self.dead) - self.dead
        return rows - self._cum[rows]

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        if self.dead is None:
            return self.points, self.ids
        keep = ~self.dead
        return self.points[keep], self.ids[keep]

    def knn(self, queries: np.ndarray, k: int, ub: np.ndarray | None, workers: int) -> tuple[np.ndarray, np.ndarray]:
        """``(dist (m, k), ids (m, k))`` over the live rows, ``inf`` / ``MISSING_ID`` where there are fewer."""
        m = len(queries)
        if m == 0 or self.n_live == 0:
            return np.full((m, k), np.inf), np.full((m, k), MISSING_ID, dtype=np.int64)
        kk = min(k + self.n_dead, self.n)  # dead rows can take slots: ask for that many more
        if ub is None:
            dist, idx = self.tree.query(queries, k=kk, workers=workers)
        else:
            # cKDTree takes one scalar bound: use the largest and filter each query by its own afterwards.
            dist, idx = self.tree.query(queries, k=kk, workers=workers, distance_upper_bound=float(ub.max()))
        dist = np.asarray(dist, dtype=np.float64).reshape(m, kk)
        idx = np.asarray(idx).reshape(m, kk)
        valid = idx < self.n
        if ub is not None:
            valid &= dist <= ub[:, None]
        if self.dead is not None:
            valid &= ~self.dead[np.minimum(idx, self.n - 1)]
        ids = np.where(valid, self.ids[np.minimum(idx, self.n - 1)], MISSING_ID).astype(np.int64, copy=False)
        dist = np.where(valid, dist, np.inf)
        if self.n_dead:  # move the live answers to the front (stable: distance order is kept)
            order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
            dist, ids = np.take_along_axis(dist, order, axis=1), np.take_along_axis(ids, order, axis=1)
        if dist.shape[1] < k:
            dist = np.concatenate([dist, np.full((m, k - dist.shape[1]), np.inf)], axis=1)
            ids = np.concatenate([ids, np.full((m, k - ids.shape[1]), MISSING_ID, dtype=np.int64)], axis=1)
        return dist[:, :k], ids[:, :k]

    def radius(self, centers: np.ndarray, radius: np.ndarray, workers: int) -> list[np.ndarray]:
        if self.n_live == 0:
            return [np.empty(0, dtype=np.int64) for _ in range(len(centers))]
        hits = self.tree.query_ball_point(centers, radius, workers=workers, return_sorted=False)
        return [self.live_rows(np.asarray(h, dtype=np.int64)) for h in hits]

    def box(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        if self.n_live == 0:
            return np.empty(0, dtype=np.int64)
        center = (lo + hi) / 2.0
        half = (hi - lo) / 2.0
        # Chebyshev ball around the box centre = the box; filter exactly afterwards against rounding.
        cand = np.asarray(
            self.tree.query_ball_point(center, float(half.max()) * (1 + 1e-12) + 1e-300, p=np.inf), dtype=np.int64
        )
        if len(cand):
            pts = self.points[cand]
            cand = cand[np.all((pts >= lo) & (pts <= hi), axis=1)]
        return self.live_rows(cand)


def _lower_thread_priority() -> None:
    """Lowest CPU priority for the calling thread (Linux: a thread's nice value is its own); no-op elsewhere."""
    import os
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def _locked(fn):
    """Run the method holding the partition's lock (see ``LocalPartition.__init__``)."""
    @functools.wraps(fn)
    def method(self, *args, **kwargs):
        with self._lock:
            return fn(self, *args, **kwargs)

    return method


class LocalPartition:
    """Points of one partition, searchable while points are appended and deleted; results speak global ids.

    The points live in a *base* segment (a KD-tree) and a list of small *delta* segments, one per append, each
    with its own KD-tree built at append time (so a query after an append pays nothing extra); all segments are
    searched, and deleted points are masked in any of them. Merges run in a background thread from a snapshot
    and are swapped in on a later call (appends and deletes made meanwhile are carried over): when the deltas
    hold more than ``max(MIN_DELTA, DELTA_FRACTION * base)`` points they merge into a new base; when there are
    more than ``MAX_SEGMENTS`` of them, they merge into one delta. Every call sees every point appended before it
    and none deleted before it. ``points`` / ``ids`` are the live points in a fixed order (base, then deltas in
    append order; cached until the next change); row positions from :meth:`radius` and :meth:`box` index them.
    """

    #: merge the deltas into the base when they hold more than max(MIN_DELTA, DELTA_FRACTION * base) points
    MIN_DELTA = 65_536
    DELTA_FRACTION = 0.25
    #: merge the delta segments into one when there are more than this many
    MAX_SEGMENTS = 8

    def __init__(self, points: np.ndarray, ids: np.ndarray, leafsize: int = 16) -> None:
        points = np.ascontiguousarray(points, dtype=np.float64)
        ids = np.ascontiguousarray(ids)
        if points.ndim != 2 or len(points) != len(ids):
            raise ValueError("points must be (n, d) and ids (n,)")
        self.leafsize = leafsize
        self.dim = points.shape[1]
        self._id_dtype = ids.dtype
        self._base = _Segment(points, ids, leafsize)
        self._deltas: list[_Segment] = []
        self._live: tuple[np.ndarray, np.ndarray] | None = (points, ids)
        self._merge: dict | None = None  # a background merge in progress
        self.merges = 0
        self.version = 0  # bumped whenever the live points change
        import threading

        # queries and changes may come from two threads of a node (queries have their own concurrency group):
        # every public method holds this lock; an append builds its segment's KD-tree before taking it
        self._lock = threading.RLock()

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def points(self) -> np.ndarray:
        return self._live_arrays()[0]

    @property
    def ids(self) -> np.ndarray:
        return self._live_arrays()[1]

    @property
    def tree(self) -> cKDTree | None:
        """The base segment's KD-tree (each delta has its own)."""
        return self._base.tree

    def _segments(self) -> list[_Segment]:
        return [self._base, *self._deltas]

    @_locked
    def _live_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        self._swap_if_merged()
        if self._live is None:
            parts = [seg.live() for seg in self._segments()]
            self._live = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        return self._live

    @property
    def size(self) -> int:
        return sum(seg.n_live for seg in self._segments())

    @property
    def nbytes(self) -> int:
        return int(self.size * (self.dim * 8 + 8))

    @property
    def delta_size(self) -> int:
        return sum(seg.n_live for seg in self._deltas)

    # -- changes --------------------------------------------------------------------------------------------
    def append(self, points: np.ndarray, ids: np.ndarray) -> None:
        """Add points (searchable on return). The new segment's KD-tree is built before taking the lock."""
        if len(points) == 0:
            return
        pts = np.ascontiguousarray(points, dtype=np.float64).reshape(-1, self.dim)
        seg = _Segment(pts, np.asarray(ids).astype(self._id_dtype, copy=False), self.leafsize)
        with self._lock:
            self._add_segment(seg)

    def _add_segment(self, seg: _Segment) -> None:
        self._swap_if_merged()
        self._deltas.append(seg)
        self._live = None
        self.version += 1
        if self._merge is None:
            n_delta = sum(seg.n for seg in self._deltas)
            if n_delta > max(self.MIN_DELTA, self.DELTA_FRACTION * self._base.n_live):
                self._start_merge(full=True)
            elif len(self._deltas) > self.MAX_SEGMENTS:
                self._start_merge(full=False)

    @_locked
    def delete(self, ids: np.ndarray) -> int:
        """Remove the points with these ids; returns how many were here."""
        self._swap_if_merged()
        n = sum(seg.kill(ids) for seg in self._segments())
        if n:
            self._live = None
            self.version += 1
            if self._merge is not None:
                self._merge["deleted"].append(np.asarray(ids))
        return n

    def _start_merge(self, full: bool) -> None:
        import threading

        segs = self._segments() if full else list(self._deltas)
        parts = [seg.live() for seg in segs]
        snap_pts = np.concatenate([p[0] for p in parts])
        snap_ids = np.concatenate([p[1] for p in parts])
        job: dict = {"pts": snap_pts, "ids": snap_ids, "n_deltas": len(self._deltas), "full": full,
                     "deleted": [], "tree": None}

        def build() -> None:
            _lower_thread_priority()  # queries on this node come first; the merge uses what CPU is left
            job["tree"] = _kdtree(snap_pts, self.leafsize)

        job["thread"] = threading.Thread(target=build, daemon=True, name="distspatial-merge")
        job["thread"].start()
        self._merge = job

    def _swap_if_merged(self, wait: bool = False) -> None:
        job = self._merge
        if job is None or (not wait and job["thread"].is_alive()):
            return
        job["thread"].join()
        self._merge = None
        merged = _Segment(job["pts"], job["ids"], self.leafsize, tree=job["tree"])
        if job["deleted"]:  # deleted while the merge ran: the snapshot still holds them
            merged.kill(np.concatenate(job["deleted"]))
        rest = self._deltas[job["n_deltas"]:]  # appended while the merge ran
        if job["full"]:
            self._base, self._deltas = merged, rest
        else:
            self._deltas = [merged, *rest]
        self._live = None
        self.merges += 1

    @_locked
    def flush(self) -> None:
        """Merge everything into the base now (waits for a merge in progress)."""
        self._swap_if_merged(wait=True)
        if self._deltas or self._base.n_dead:
            self._start_merge(full=True)
            self._swap_if_merged(wait=True)

    # -- queries --------------------------------------------------------------------------------------------
    @_locked
    def knn(
        self, queries: np.ndarray, k: int, bound: np.ndarray | None = None, workers: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest neighbours of each query: ``(distances (m, k), ids (m, k))``, sorted by distance.

        With ``bound`` (per query), only neighbours with distance <= bound are returned; other slots hold
        ``inf`` and ``MISSING_ID``. Fewer than ``k`` points also leave ``inf``/``MISSING_ID`` slots.
        """
        self._swap_if_merged()
        ub = None if bound is None else np.nextafter(bound, np.inf)  # keep points exactly at the bound (ties)
        dist, ids = self._base.knn(queries, k, ub, workers)
        for seg in self._deltas:
            if seg.n_live:
                d2, i2 = seg.knn(queries, k, ub, workers)
                dist, ids = merge_topk(dist, ids, d2, i2, k)
        return dist, ids

    @_locked
    def radius(self, centers: np.ndarray, radius: np.ndarray, workers: int = 1) -> list[np.ndarray]:
        """Positions in :attr:`points` of the points within ``radius[i]`` of ``centers[i]`` (inclusive)."""
        self._swap_if_merged()
        hits = self._base.radius(centers, radius, workers)
        off = self._base.n_live
        for seg in self._deltas:
            if seg.n_live:
                hits = [np.concatenate([a, b + off]) for a, b in zip(hits, seg.radius(centers, radius, workers))]
            off += seg.n_live
        return hits

    @_locked
    def box(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Positions in :attr:`points` of the points with ``lo <= p <= hi`` in every dimension."""
        self._swap_if_merged()
        rows = [self._base.box(lo, hi)]
        off = self._base.n_live
        for seg in self._deltas:
            if seg.n_live:
                rows.append(seg.box(lo, hi) + off)
            off += seg.n_live
        return np.concatenate(rows) if len(rows) > 1 else rows[0]


def merge_topk(
    dist_a: np.ndarray, ids_a: np.ndarray, dist_b: np.ndarray, ids_b: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise merge of two sorted candidate lists into the k best: ``(m, ka) + (m, kb) -> (m, k)``."""
    dist = np.concatenate([dist_a, dist_b], axis=1)
    ids = np.concatenate([ids_a, ids_b], axis=1)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, axis=1), np.take_along_axis(ids, order, axis=1)
