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
import threading
import time
import weakref

import numpy as np
from scipy.spatial import cKDTree

from .curve_runs import FANOUT, CurveRun, morton_frame

__all__ = ["LocalPartition", "build_kdtree", "compact_ids", "fits_int32", "merge_topk", "wide_ids"]

#: points per KD-tree leaf (at most). cKDTree keeps a 72-byte node per ~5 points at 16 (13 B per point), per
#: ~8 at 24 (9 B); k = 10 queries in 2-D and 3-D ran within 1-2% of 16, ball queries as fast (issue #14's memory
#: per point)
LEAFSIZE = 24

_I32 = np.iinfo(np.int32)


def fits_int32(ids: np.ndarray) -> bool:
    """Every value of the (non-empty) integer array ``ids`` fits int32."""
    return len(ids) > 0 and _I32.min <= int(ids.min()) and int(ids.max()) <= _I32.max


def compact_ids(ids: np.ndarray) -> np.ndarray:
    """``ids`` as int32 when every value fits (4 bytes per point instead of 8), else as they are. A partition
    stores its ids this way; whatever leaves a node goes through :func:`wide_ids`."""
    ids = np.asarray(ids)
    if ids.dtype == np.int64 and fits_int32(ids):
        return ids.astype(np.int32)
    return ids


def wide_ids(ids: np.ndarray) -> np.ndarray:
    """Stored ids as int64, the dtype every answer speaks (no copy when they already are)."""
    return ids.astype(np.int64, copy=False)


#: id used for "no neighbour" slots (fewer than k points within the bound); distances there are ``inf``.
MISSING_ID = -1


def build_kdtree(points: np.ndarray, leafsize: int = LEAFSIZE) -> cKDTree | None:
    """The KD-tree of ``points`` as partitions build it (None when there are none): every KD-tree over a
    partition's points is built here, so all share one leaf size and construction."""
    if not len(points):
        return None
    # balanced_tree=False (sliding midpoint) builds about 2x faster than median splits and queries as fast.
    return cKDTree(points, leafsize=leafsize, balanced_tree=False, compact_nodes=False)


class _Segment:
    """Rows of a partition with a deletion mask (``dead``); rows never move while the segment lives.

    Subclasses answer queries over their live rows: :class:`_TreeSegment` (a KD-tree: the base) and
    :class:`_RunSegment` (a curve run: recent appends). Query results speak live positions (``live_rows``).
    """

    __slots__ = ("points", "ids", "dead", "n_dead", "_cum")

    def __init__(self, points: np.ndarray, ids: np.ndarray) -> None:
        self.points = points
        self.ids = ids
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


class _TreeSegment(_Segment):
    """A segment searched through its ``cKDTree``."""

    __slots__ = ("tree",)

    def __init__(self, points: np.ndarray, ids: np.ndarray, leafsize: int = LEAFSIZE,
                 tree: cKDTree | None = None) -> None:
        super().__init__(points, ids)
        self.tree = tree if tree is not None else build_kdtree(points, leafsize)

    def knn(self, queries: np.ndarray, k: int, ub: np.ndarray | None, workers: int) -> tuple[np.ndarray, np.ndarray]:
        """``(dist (m, k), ids (m, k))`` over the live rows, ``inf`` / ``MISSING_ID`` where there are fewer."""
        m = len(queries)
        if m == 0 or self.n_live == 0:
            return np.full((m, k), np.inf), np.full((m, k), MISSING_ID, dtype=np.int64)
        kk = min(k + self.n_dead, self.n)  # dead rows can take slots: ask for that many more
        if ub is None and self.dead is None and kk == k:  # every slot is a live row: no masks (batched kNN)
            dist, idx = self.tree.query(queries, k=k, workers=workers)
            return dist.reshape(m, k), self.ids[idx.reshape(m, k)].astype(np.int64, copy=False)
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


class _RunSegment(_Segment):
    """A segment kept as a :class:`~distspatial.kernels.curve_runs.CurveRun` (cheap to build and to merge)."""

    __slots__ = ("run",)

    def __init__(self, run: CurveRun) -> None:
        super().__init__(run.points, run.ids)
        self.run = run

    def knn(self, queries: np.ndarray, k: int, ub: np.ndarray | None, workers: int) -> tuple[np.ndarray, np.ndarray]:
        dist, rows = _in_chunks(lambda q, u: self.run.knn(q, k, u, self.dead), queries, ub, workers)
        return dist, np.where(rows >= 0, self.ids[np.maximum(rows, 0)], MISSING_ID).astype(np.int64, copy=False)

    def radius(self, centers: np.ndarray, radius: np.ndarray, workers: int) -> list[np.ndarray]:
        off, rows = self.run.radius(centers, radius, self.dead)
        return [self.live_rows(rows[a:b]) for a, b in zip(off[:-1], off[1:])]

    def box(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        return self.live_rows(self.run.box(lo, hi, self.dead))


def _in_chunks(fn, queries: np.ndarray, ub: np.ndarray | None, workers: int):
    """``fn(queries, ub)`` (a kernel that releases the GIL) over ``workers`` threads for large batches."""
    m = len(queries)
    if workers <= 1 or m < 4096:
        return fn(queries, ub)
    from concurrent.futures import ThreadPoolExecutor

    cuts = np.linspace(0, m, workers + 1).astype(int)
    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(lambda ab: fn(queries[ab[0]:ab[1]], None if ub is None else ub[ab[0]:ab[1]]),
                              zip(cuts[:-1], cuts[1:])))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


#: held by the thread rebuilding a partition's KD-tree (the partitions of a node rebuild one after the other)
_REBUILD_SLOT = threading.Lock()


def _locked(fn):
    """Run the method holding the partition's lock (see ``LocalPartition.__init__``)."""
    @functools.wraps(fn)
    def method(self, *args, **kwargs):
        with self.lock:
            return fn(self, *args, **kwargs)

    return method


class LocalPartition:
    """Points of one partition, searchable while points are appended and deleted; results speak global ids.

    The points live in a *base* segment (a KD-tree) and a few *delta* runs
    (:class:`~distspatial.kernels.curve_runs.CurveRun`: points sorted by Morton key with block boxes). An append sorts
    its points into a new run (about as cheap as a small KD-tree, and searchable on return); runs are then
    merged like sorted lists (linear time, in the appending thread, outside the lock) so that their sizes
    shrink by at least ``FANOUT`` from the oldest to the newest -- a log-structured merge that keeps a handful of
    runs. When the runs hold more than ``max(MIN_DELTA, DELTA_FRACTION * base)`` points and appends have paused
    for ``IDLE_S`` seconds, a background thread builds a new base KD-tree from a snapshot of everything, swapped
    in on a later call (appends and deletes made meanwhile are carried over). That rebuild is the one expensive
    step (a core for ~0.2 s per million points), so it waits for a pause in the feed instead of competing with
    queries during one; while a feed runs, the runs answer (a kNN search over a run costs ~1.5x one over a
    KD-tree). All segments are searched, deleted points are masked in any of them. Every call sees every point
    appended before it and none deleted before it.

    ``points`` / ``ids`` are the live points in a fixed order (base, then runs; cached until the next change,
    and a run merge reorders them, so :attr:`version` changes). Row positions from :meth:`radius` and
    :meth:`box` index them: a caller that reads ``points``/``ids`` after one of those holds :attr:`lock`
    around both (another thread may append meanwhile).
    """

    #: rebuild the base KD-tree when the runs hold more than max(MIN_DELTA, DELTA_FRACTION * base) points
    MIN_DELTA = 65_536
    DELTA_FRACTION = 1.0
    #: ... once no append came for this many seconds (0: at once)
    IDLE_S = 1.0
    #: runs shrink by at least this factor from the oldest to the newest
    FANOUT = FANOUT

    def __init__(self, points: np.ndarray, ids: np.ndarray, leafsize: int = LEAFSIZE) -> None:
        points = np.ascontiguousarray(points, dtype=np.float64)
        ids = compact_ids(np.ascontiguousarray(ids))
        if points.ndim != 2 or len(points) != len(ids):
            raise ValueError("points must be (n, d) and ids (n,)")
        self.leafsize = leafsize
        self.dim = points.shape[1]
        self._id_dtype = ids.dtype
        self._base: _Segment = _TreeSegment(points, ids, leafsize)
        self._deltas: list[_RunSegment] = []
        # the box the runs' curve keys are computed in (reset to all points' box at each base rebuild)
        self._frame = morton_frame(points) if len(points) else None
        self._live: tuple[np.ndarray, np.ndarray] | None = (points, ids)
        self._merge: dict | None = None  # a background base rebuild in progress
        self._frozen = 0  # runs captured by that rebuild (the first ones): run merges leave them alone
        self._last_append = 0.0
        self._idle_timer: threading.Timer | None = None  # waits for a pause in appends to start a rebuild
        self.merges = 0
        self.version = 0  # bumped whenever the live points change
        # queries and changes may come from two threads of a node (queries have their own concurrency group):
        # every public method holds this (reentrant) lock; appends build and merge runs before taking it
        self.lock = threading.RLock()

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def points(self) -> np.ndarray:
        return self._live_arrays()[0]

    @property
    def ids(self) -> np.ndarray:
        return self._live_arrays()[1]

    @property
    def tree(self) -> cKDTree | None:
        """The base segment's KD-tree (the runs have none)."""
        return self._base.tree

    @property
    def n_runs(self) -> int:
        return len(self._deltas)

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
        """Add points (searchable on return). The new run is sorted, and runs merged, outside the lock."""
        if len(points) == 0:
            return
        pts = np.ascontiguousarray(points, dtype=np.float64).reshape(-1, self.dim)
        frame = self._frame if self._frame is not None else morton_frame(pts)
        ids = np.asarray(ids)
        if self._id_dtype == np.int32 and len(ids) and not fits_int32(ids):
            self._id_dtype = np.dtype(np.int64)  # ids past int32 arrive: the runs (and the next base) widen
        seg = _RunSegment(CurveRun.build(pts, ids.astype(self._id_dtype, copy=False), frame))
        with self.lock:
            if self._frame is None:
                self._frame = frame
            self._add_segment(seg)
        self._merge_runs()

    def _add_segment(self, seg: _RunSegment) -> None:
        self._swap_if_merged()
        self._deltas.append(seg)
        self._changed()
        self._last_append = time.monotonic()
        self._maybe_rebuild()

    def _maybe_rebuild(self) -> None:
        """Start the base rebuild when the runs are large enough and appends paused (else arm a timer)."""
        if self._merge is not None or self.delta_size <= max(self.MIN_DELTA, self.DELTA_FRACTION * self._base.n_live):
            return
        wait = self._last_append + self.IDLE_S - time.monotonic()
        if wait <= 0:
            self._start_merge()
        elif self._idle_timer is None:
            ref = weakref.ref(self)  # a dropped partition is not kept alive (nor rebuilt) by its timer

            def fire() -> None:
                part = ref()
                if part is not None:
                    with part.lock:
                        part._idle_timer = None
                        part._maybe_rebuild()

            self._idle_timer = threading.Timer(wait, fire)
            self._idle_timer.daemon = True
            self._idle_timer.start()

    def _changed(self) -> None:
        self._live = None
        self.version += 1

    def _merge_runs(self) -> None:
        """Merge the newest two runs while the older is less than ``FANOUT`` times the newer (the merge itself
        runs outside the lock; it is redone if a delete or a base rebuild touched either run meanwhile)."""
        while True:
            with self.lock:
                runs = self._deltas[self._frozen:]
                if len(runs) < 2 or runs[-2].n_live >= self.FANOUT * runs[-1].n_live:
                    return
                a, b = runs[-2], runs[-1]
                state = (a.n_dead, b.n_dead)  # a delete replaces ``dead`` and raises ``n_dead``
            rb = b.run if b.run.frame is a.run.frame else CurveRun.build(*b.live(), a.run.frame)
            merged = _RunSegment(CurveRun.merge(a.run, rb, a.dead, b.dead if rb is b.run else None))
            with self.lock:
                tail = self._deltas[self._frozen:]
                if (a.n_dead, b.n_dead) != state or not any(x is a for x in tail):
                    continue  # changed meanwhile: look again
                i = next(j for j, x in enumerate(self._deltas) if x is a)
                if i + 1 >= len(self._deltas) or self._deltas[i + 1] is not b:
                    continue
                self._deltas[i:i + 2] = [merged]
                self._changed()

    @_locked
    def delete(self, ids: np.ndarray) -> int:
        """Remove the points with these ids; returns how many were here."""
        self._swap_if_merged()
        n = sum(seg.kill(ids) for seg in self._segments())
        if n:
            self._changed()
            if self._merge is not None:
                self._merge["deleted"].append(np.asarray(ids))
        return n

    def _start_merge(self) -> None:
        # the snapshot: each segment's rows and deletion mask (arrays that are replaced, never written to),
        # cut to the live rows and concatenated in the background
        parts = [(seg.points, seg.ids, seg.dead) for seg in self._segments()]
        job: dict = {"n_deltas": len(self._deltas), "deleted": [], "tree": None}
        self._frozen = len(self._deltas)

        def build() -> None:
            # Normal thread priority: a lowered one lets the OS park this thread while it holds the GIL (it does
            # for the copies around the tree build), which stalled the node's queries behind it (measured).
            with _REBUILD_SLOT:  # one rebuild at a time per process: at most one core of a node's machine
                live = [(p, i) if dead is None else (p[~dead], i[~dead]) for p, i, dead in parts]
                job["pts"] = np.concatenate([p for p, _ in live])
                job["ids"] = np.concatenate([i for _, i in live])
                job["tree"] = build_kdtree(job["pts"], self.leafsize)
                job["frame"] = morton_frame(job["pts"]) if len(job["pts"]) else None

        job["thread"] = threading.Thread(target=build, daemon=True, name="distspatial-merge")
        job["thread"].start()
        self._merge = job

    def _swap_if_merged(self, wait: bool = False) -> None:
        job = self._merge
        if job is None or (not wait and job["thread"].is_alive()):
            return
        job["thread"].join()
        self._merge = None
        if "frame" not in job:  # the rebuild failed (out of memory?): keep the runs; the next append retries
            self._frozen = 0
            return
        merged = _TreeSegment(job["pts"], job["ids"], self.leafsize, tree=job["tree"])
        if job["deleted"]:  # deleted while the merge ran: the snapshot still holds them
            merged.kill(np.concatenate(job["deleted"]))
        # appended while the rebuild ran; the snapshot kept the live order (base, then runs), so positions stay
        self._base, self._deltas, self._frozen = merged, self._deltas[job["n_deltas"]:], 0
        if not self._deltas and job["frame"] is not None:
            self._frame = job["frame"]  # the next runs' keys in the box of all points
        self._live = None
        self.merges += 1

    @_locked
    def flush(self) -> None:
        """Merge everything into the base now (waits for a merge in progress)."""
        self._swap_if_merged(wait=True)
        if self._deltas or self._base.n_dead:
            self._start_merge()
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
