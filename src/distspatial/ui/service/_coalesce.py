"""Coalescing concurrent requests of one kind into batches (:class:`_Coalescer`), and cutting answers back."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from ._metrics import ServiceMetrics


# -- coalescing ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class _Item:
    """One validated request waiting for its share of a batch: ``n`` query points, ``args`` (kNN ``(q, k)``,
    range ``(q, radii)``, box ``(lo, hi)``), whether it was a single point and whether it wants Arrow back."""

    n: int
    args: tuple
    single: bool
    arrow: bool
    future: Any = None
    t_enq: float = 0.0


class _Coalescer:
    """Gathers concurrent requests of one kind into batches, as Ray Serve's ``@serve.batch`` does: the first
    request of a batch waits at most ``wait_s`` for others; a batch leaves earlier once it holds ``max_points``
    query points. At most ``max_concurrent`` batches run at once (in ``pool``; ``run(items)`` makes one cluster
    call for all of them and returns one answer per item, or an exception for an item that failed alone); while
    they run, the next batch fills. ``pool`` None: batches run on the event loop's thread itself (for a service
    whose answers are local to its process: no thread hand-off). Lives on the event loop's thread (no locks)."""

    def __init__(self, kind: str, run: Callable[[list[_Item]], list[Any]], pool: ThreadPoolExecutor | None,
                 metrics: ServiceMetrics, wait_s: float, max_points: int, max_concurrent: int) -> None:
        self.kind, self.run, self.pool, self.metrics = kind, run, pool, metrics
        self.wait_s, self.max_points, self.max_concurrent = wait_s, max_points, max(1, max_concurrent)
        self._queue: deque[_Item] = deque()
        self._points = 0
        self._running = 0
        self._timer: asyncio.TimerHandle | None = None

    def submit(self, item: _Item) -> asyncio.Future:
        """Queue ``item``; the future gets its answer (or the batch's exception)."""
        loop = asyncio.get_running_loop()
        item.future = loop.create_future()
        item.t_enq = loop.time()
        self._queue.append(item)
        self._points += item.n
        self._kick(loop)
        return item.future

    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._queue and self._running < self.max_concurrent:
            if self._points < self.max_points:
                due = self._queue[0].t_enq + self.wait_s
                if loop.time() < due:
                    if self._timer is None or self._timer.when() > due:
                        if self._timer is not None:
                            self._timer.cancel()
                        self._timer = loop.call_at(due, self._on_timer, loop)
                    return
            batch: list[_Item] = []
            points = 0
            while self._queue and (not batch or points + self._queue[0].n <= self.max_points):
                item = self._queue.popleft()
                self._points -= item.n
                if item.future.done():  # its request timed out (or its client left) while it waited
                    continue
                batch.append(item)
                points += item.n
            if not batch:
                continue
            self._running += 1
            self.metrics.record_batch(self.kind, len(batch), points)
            if self.pool is None:  # inline: answered on the event loop's thread (answers local to this process)
                fut = loop.create_future()
                try:
                    fut.set_result(self.run(batch))
                except Exception as exc:  # noqa: BLE001 - the batch's error, given to its requests
                    fut.set_exception(exc)
                self._done(loop, batch, fut)
                continue
            fut = loop.run_in_executor(self.pool, self.run, batch)
            fut.add_done_callback(functools.partial(self._done, loop, batch))

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._kick(loop)

    def _done(self, loop: asyncio.AbstractEventLoop, batch: list[_Item], fut: asyncio.Future) -> None:
        self._running -= 1
        exc = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        results = fut.result() if exc is None else [exc] * len(batch)
        for item, res in zip(batch, results):
            if item.future.done():
                continue
            if isinstance(res, BaseException):
                item.future.set_exception(res)
            else:
                item.future.set_result(res)
        self._kick(loop)


def _ties_by_id(dist: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """kNN rows with equal distances put in id order (only the rows holding a tie are touched), so an answer
    trimmed to fewer columns does not depend on which other requests shared its batch."""
    if dist.ndim != 2 or dist.shape[1] < 2:
        return dist, ids
    rows = np.flatnonzero((dist[:, 1:] == dist[:, :-1]).any(axis=1))
    if len(rows):
        dist, ids = dist.copy(), ids.copy()
        order = np.lexsort((ids[rows], dist[rows]))
        dist[rows] = np.take_along_axis(dist[rows], order, axis=1)
        ids[rows] = np.take_along_axis(ids[rows], order, axis=1)
    return dist, ids


def _splits(arrays: list[np.ndarray]) -> np.ndarray:
    """Where each of ``arrays`` ends in their concatenation (for ``np.split``)."""
    return np.cumsum(np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays)))[:-1]
