"""Sending a data set cut on the client to the nodes (``distribute_data``).

A small data set goes in one controller call (one object per partition array in Ray's object store). A large
one goes in **waves of pieces**: the controller first places the partitions (``begin_distribute``), then each
wave holds a slice of about :data:`WAVE_BYTES` of partition rows, one piece per owner node so that every node
copies (and, on a partition's last piece, builds) at once, and at most two waves are in the object store at a
time (one being loaded, the next already put). The store keeps the pages it touched after its objects are
freed, so bounding the waves bounds what the load leaves behind there (about 24 bytes per 2-D point when
everything went at once).

    >>> waves = plan_waves(np.array([0, 4, 8]), {0: (0,), 1: (1,)}, rows_per_wave=4)
    >>> [[tuple(int(v) for v in p) for p in w] for w in waves]
    [[(0, 0, 2, 4), (1, 0, 2, 4)], [(0, 2, 4, 4), (1, 2, 4, 4)]]
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray

from ..core.codec import encode, wire_and_raw
from ..core.progress import make_bar
from ..kernels.local_index import fits_int32

__all__ = ["WAVE_BYTES", "plan_waves", "upload_partitions"]

#: partition bytes (points and ids) per wave of a large ``distribute_data``; two waves at most are in the
#: object store at once
WAVE_BYTES = 8 << 20

Piece = tuple[int, int, int, int]  # (partition id, first row, end row, rows of the partition)


def plan_waves(cuts: np.ndarray, owners: dict[int, tuple[int, ...]], rows_per_wave: int) -> list[list[Piece]]:
    """Waves of pieces over partitions ``p`` = rows ``cuts[p]:cuts[p+1]``: each wave takes the next piece of
    every primary owner's queue (its partitions in order), pieces of ``rows_per_wave / nodes`` rows at least 1,
    so each wave carries about ``rows_per_wave`` rows spread over the nodes. Every row is in exactly one
    piece; empty partitions get one empty piece."""
    queues: dict[int, collections.deque] = collections.defaultdict(collections.deque)
    n_parts = len(cuts) - 1
    primaries = {owners[p][0] for p in range(n_parts)}
    piece_rows = max(1, int(rows_per_wave) // max(1, len(primaries)))
    for p in range(n_parts):
        total = int(cuts[p + 1] - cuts[p])
        starts = range(0, total, piece_rows) if total else [0]
        for s in starts:
            queues[owners[p][0]].append((p, s, min(s + piece_rows, total), total))
    waves = []
    while any(queues.values()):
        waves.append([q.popleft() for _, q in sorted(queues.items()) if q])
    return waves


def upload_partitions(rt: Any, plan: Any, layout: dict, id_map: Any, mean_variance: float, *,
                      compression: bool = False, progress: bool = False, wave_bytes: int | None = None) -> Any:
    """Load the partitions of ``plan`` (a :class:`~distspatial.kernels.partitioning.PartitionPlan`) onto the
    nodes through the controller of runtime ``rt`` and publish them with ``layout``; returns the new view.
    ``wave_bytes``: bytes per wave (default :data:`WAVE_BYTES`, read at each call)."""
    wave_bytes = WAVE_BYTES if wave_bytes is None else int(wave_bytes)

    def put(arrays):
        arrays = (arrays[0], arrays[1].astype(ids_dtype, copy=False))
        objs = [encode(a) if compression else a for a in arrays]
        return tuple(ray.put(o) for o in objs), tuple(np.sum([wire_and_raw(o) for o in objs], axis=0))

    token = rt.new_token()
    n, n_parts = len(plan.points), plan.n_partitions
    # ids travel (and are stored) as int32 when they all fit: the nodes keep them so anyway
    ids_dtype = np.dtype(np.int32) if fits_int32(plan.ids) else plan.ids.dtype
    row_bytes = plan.points.shape[1] * plan.points.itemsize + ids_dtype.itemsize
    bar = make_bar(n, "distribute", progress, unit="pt")
    try:
        if n * row_bytes <= 2 * wave_bytes:  # small: every partition in one call
            refs, sizes = zip(*(put(plan.part(p)) for p in range(n_parts))) if n_parts else ((), ())
            view = rt.call_controller("distribute", layout, list(refs), list(sizes), id_map, mean_variance, token)
            bar.update(n)
            return view
        owners = rt.call_controller("begin_distribute", n_parts, token)
        waves = plan_waves(plan.cuts, owners, max(1, wave_bytes // row_bytes))
        in_flight: collections.deque = collections.deque()
        with ThreadPoolExecutor(1, thread_name_prefix="distspatial-upload") as pool:
            try:
                for i, wave in enumerate(waves):
                    while len(in_flight) >= 2:  # the store holds this wave and the one being loaded
                        in_flight.popleft().result()
                    refs, sizes = zip(*(put(tuple(arr[a:b] for arr in plan.part(p))) for p, a, b, _ in wave))
                    rows = sum(b - a for _, a, b, _ in wave)
                    if i < len(waves) - 1:
                        fut = pool.submit(rt.call_controller, "stage_partitions", token, wave, list(refs),
                                          list(sizes))
                    else:
                        fut = pool.submit(rt.call_controller, "distribute", layout, list(refs), list(sizes), id_map,
                                          mean_variance, token, wave)
                    fut.add_done_callback(lambda f, rows=rows: bar.update(rows) if not f.exception() else None)
                    in_flight.append(fut)
                    del refs
                view = None
                while in_flight:
                    view = in_flight.popleft().result()
                return view
            except BaseException:
                for f in in_flight:
                    f.cancel()
                raise
    finally:
        bar.close()
