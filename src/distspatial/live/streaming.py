"""Stream processing over the live index: ``cluster.stream(source, ...)``, streaming k-means.

A stream is any Python iterable or async iterator of batches. A batch is ``(points, timestamps)``,
``(points, timestamps, ids)`` or a mapping with those keys (``ids`` optional: new ids are assigned; for
moving objects pass ``ids`` and ``update=True`` so each batch moves the objects it names). Each batch is
ingested into the distributed index (:meth:`~distspatial.cluster.DistributedSpatialCluster.ingest`:
acknowledged by every replica before the next step), then handed to the *operators*:

* a :class:`~distspatial.live.windows.WindowedAggregator` (event-time windows: heat maps, hot spots, windowed k-means;
  results as each window closes),
* a :class:`~distspatial.live.continuous.GeofenceMonitor` (enter/leave events),
* a :class:`~distspatial.live.continuous.KnnWatch` (registered kNN queries re-run exactly on the cluster after each
  batch; an event when an answer changes),
* a :class:`StreamingKMeans` (mini-batch k-means with decay; the nodes that take a batch also assign it to the
  current centroids and return per-cluster sums and counts, so the points never come back to the driver).

Backpressure: a reader thread pulls from the source into a queue of at most ``max_in_flight`` batches, so a
fast source waits for the cluster instead of filling memory. :class:`StreamHandle` exposes live counters
(batches, points, points/s, events), an iterator over events, ``stop()`` and ``join()``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..client import queries
from . import ingest as _ingest


__all__ = ["StreamingKMeans", "StreamStats", "StreamHandle", "run_stream"]

_END = object()


class StreamingKMeans:
    """Mini-batch k-means with exponential decay, updated from per-cluster sums and counts of each batch.

    After a batch with per-cluster sums ``S`` and counts ``c``: ``w <- decay * w + c`` and
    ``centroid <- (decay * w_old * centroid + S) / w`` for clusters that got points (``decay=1``: every point
    weighs the same forever; smaller values forget old batches, as in Spark's ``StreamingKMeans``). Centroids
    start from ``init`` or from k-means++ on the first batch with at least ``k`` points. Thread-safe: read
    :attr:`centroids` at any time.

    >>> skm = StreamingKMeans(k=8, decay=0.9, seed=0)
    >>> handle = cluster.stream(batches, kmeans=skm)  # doctest: +SKIP
    >>> skm.centroids  # doctest: +SKIP
    """

    def __init__(self, k: int, decay: float = 1.0, seed: int | None = 0, init: Any = None) -> None:
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.k, self.decay, self.seed = int(k), float(decay), seed
        self._lock = threading.Lock()
        self._centroids = None if init is None else np.array(init, dtype=np.float64)
        if self._centroids is not None and self._centroids.shape[0] != self.k:
            raise ValueError(f"init must have k={self.k} rows, got {self._centroids.shape}")
        self._weights = np.zeros(self.k)
        self.batches = 0

    @property
    def centroids(self) -> np.ndarray | None:
        with self._lock:
            return None if self._centroids is None else self._centroids.copy()

    @property
    def weights(self) -> np.ndarray:
        with self._lock:
            return self._weights.copy()

    def _seed_from(self, points: np.ndarray) -> bool:
        """Pick initial centroids from a batch (k-means++); False when the batch is too small."""
        from .windows import kmeans_plus_plus

        if len(points) < self.k:
            return False
        with self._lock:
            self._centroids = kmeans_plus_plus(points, self.k, np.random.default_rng(self.seed))
        return True

    def update(self, sums: np.ndarray, counts: np.ndarray) -> None:
        """Fold one batch's per-cluster ``sums (k, d)`` and ``counts (k,)`` into the centroids."""
        with self._lock:
            old = self.decay * self._weights
            new_w = old + counts
            got = counts > 0
            c = self._centroids
            c[got] = (old[got, None] * c[got] + sums[got]) / new_w[got, None]
            self._weights = new_w
            self.batches += 1


@dataclass
class StreamStats:
    """Live counters of a stream."""

    batches: int = 0
    points: int = 0
    events: int = 0
    seconds: float = 0.0
    ingest_seconds: float = 0.0
    errors: list = field(default_factory=list)

    @property
    def points_per_s(self) -> float:
        return self.points / self.seconds if self.seconds > 0 else 0.0


class StreamHandle:
    """A running (or finished) stream: counters, events, stop and join."""

    def __init__(self) -> None:
        self.stats = StreamStats()
        self._events: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def stop(self) -> None:
        """Stop after the batch in progress (windows still open are flushed)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> StreamStats:
        """Wait for the end of the stream; re-raises the first error a batch met."""
        self._done.wait(timeout)
        if self.stats.errors:
            raise self.stats.errors[0]
        return self.stats

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def events(self, timeout: float | None = None):
        """Yield events as they come (window results, geofence events, kNN changes) until the stream ends."""
        while True:
            try:
                ev = self._events.get(timeout=0.05 if timeout is None else timeout)
            except queue.Empty:
                if self._done.is_set() and self._events.empty():
                    return
                continue
            yield ev

    def drain(self) -> list:
        """Every event delivered so far (non-blocking)."""
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out


def _parse_batch(batch: Any) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    if isinstance(batch, dict):
        return batch["points"], batch.get("timestamps"), batch.get("ids")
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        pts, ts = batch[0], batch[1]
        return pts, ts, batch[2] if len(batch) == 3 else None
    if isinstance(batch, np.ndarray):
        return batch, None, None
    raise TypeError("a stream batch must be (points, timestamps), (points, timestamps, ids), a dict with those "
                    f"keys, or a points array; got {type(batch).__name__}")


def _reader(source: Any, q: queue.Queue, stop: threading.Event) -> None:
    """Pull batches into ``q`` (bounded: blocks while the cluster is behind)."""
    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        if hasattr(source, "__aiter__"):
            async def drain() -> None:
                async for b in source:
                    if not put(b):
                        return

            asyncio.run(drain())
        else:
            for b in source:
                if not put(b):
                    break
    except BaseException as exc:  # the source failed: hand the error to the processor
        put(exc)
    put(_END)


def run_stream(
    cluster: Any,  # the DistributedSpatialCluster: writes and queries go through its runtime; user operators get it
    source: Iterable | Any,
    operators: list,
    kmeans: StreamingKMeans | None,
    update: bool,
    max_in_flight: int,
    on_event: Callable[[Any], None] | None,
    background: bool,
) -> StreamHandle:
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    meta = cluster.runtime.meta
    if meta is not None and meta.geographic:
        raise ValueError(f"streaming into a geographic data set ({meta.crs}, longitude/latitude) is not supported "
                         "yet: its operators and streaming k-means work in planar coordinates. Ingest the batches "
                         "with cluster.ingest(lonlat, ids) / cluster.update(ids, lonlat), which convert them")
    handle = StreamHandle()
    q: queue.Queue = queue.Queue(maxsize=max_in_flight)
    reader = threading.Thread(target=_reader, args=(source, q, handle._stop), daemon=True, name="distspatial-read")

    def emit(events) -> None:
        for ev in events or ():
            handle.stats.events += 1
            handle._events.put(ev)
            if on_event is not None:
                on_event(ev)

    def process() -> None:
        from ..core.progress import make_bar

        t0 = time.perf_counter()
        st = handle.stats
        bar = make_bar(None, "stream", cluster.progress, unit="pts")
        try:
            reader.start()
            while not handle._stop.is_set():
                item = q.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                pts, ts, ids = _parse_batch(item)
                pts = np.asarray(pts, dtype=np.float64)
                if pts.size == 0:
                    continue
                n = len(pts)
                ts = np.full(n, time.time()) if ts is None else np.asarray(ts, dtype=np.float64)
                centers = None
                if kmeans is not None:
                    if kmeans.centroids is None:
                        kmeans._seed_from(pts)
                    centers = kmeans.centroids
                t1 = time.perf_counter()
                if update and ids is not None:
                    _, ids_out, km = _ingest.update(cluster.runtime, ids, pts, ts, centers)
                else:
                    ids_out, km = _ingest.ingest(cluster.runtime, pts, ids, ts, centers)
                st.ingest_seconds += time.perf_counter() - t1
                if kmeans is not None and km is not None:
                    kmeans.update(*km)
                for op in operators:
                    emit(_apply(op, cluster, pts, ids_out, ts))
                st.batches += 1
                st.points += n
                st.seconds = time.perf_counter() - t0
                bar.update(n)
                bar.set_postfix(batches=st.batches, events=st.events)
            from .windows import WindowedAggregator

            for op in operators:  # end of stream: close the windows still open
                if isinstance(op, WindowedAggregator):
                    emit(op.flush())
        except BaseException as exc:
            st.errors.append(exc)
        finally:
            bar.close()
            handle._stop.set()
            st.seconds = time.perf_counter() - t0
            handle._done.set()

    if background:
        handle._thread = threading.Thread(target=process, daemon=True, name="distspatial-stream")
        handle._thread.start()
    else:
        process()
        if handle.stats.errors:
            raise handle.stats.errors[0]
    return handle


def _apply(op: Any, cluster: Any, pts: np.ndarray, ids: np.ndarray, ts: np.ndarray):
    """Feed one batch to an operator; returns its events."""
    from .continuous import KnnWatch

    if isinstance(op, KnnWatch):
        # answers the watch can prove from the batch alone are updated there; the others are re-run exactly on
        # the cluster (which already holds the batch)
        now = float(ts.max())
        events = list(op.observe(pts, ids, timestamp=now))
        stale = op.needs_refresh()
        rt = cluster.runtime
        if stale and rt.meta.n_points:
            k = min(op.max_k, rt.meta.n_points)
            q = np.ascontiguousarray(op.points(stale), dtype=np.float64)
            d, nn = rt.stable(lambda: queries.knn(rt, q, k))
            events += op.check(nn, d, timestamp=now, query_ids=stale)
        return events
    if hasattr(op, "on_batch"):  # user operators that query the cluster
        return op.on_batch(cluster, pts, ids, ts)
    if hasattr(op, "add"):  # windowed aggregators
        return op.add(pts, ids, ts)
    if hasattr(op, "update"):  # geofence monitors
        return op.update(pts, ids, ts)
    raise TypeError(f"unknown stream operator {type(op).__name__}: it needs add(), update() or on_batch()")
