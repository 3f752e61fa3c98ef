"""Live updates of the distributed index from a client: ingest, delete, update, chunked loads.

The client validates a batch and hands it to the controller, which orders every write
(:mod:`distspatial.control.writes` says what happens there); the answer carries the new cluster view, which the
client takes at once, so its own next query sees the batch. Each call carries a fresh token, so a call that Ray
retries after a controller restart is applied once.

**Ingest** (:func:`ingest`). A batch is validated, each point gets its curve key (points outside the original
global bounds are accepted: their keys are those of the nearest point of the bounds, which keeps routing and
the planner's exact cell test correct), goes to the partition whose key range holds the key, and every live
replica of that partition appends it in one message per node (``SpatialNode.append``). Nodes keep a small
delta next to each partition's KD-tree, searched with it and merged in the background
(:class:`~distspatial.kernels.local_index.LocalPartition`). The batch is acknowledged (the call returns) only after
every replica has it; then the metadata switches to a version whose partition sizes, boxes and key ranges
include the new points, so every query started after the call returns sees them and stays exact. A node that
fails during the call is marked failed (its partitions are re-replicated by recovery); the batch still succeeds
if every partition kept one replica. Batches carry an id and a replayed batch is a no-op on a node, so a retry
never duplicates points. Ingest holds the metadata lock: recovery and migrations never copy a partition while a
batch is half applied.

**Delete / update.** ``delete(ids)`` goes to every live node (each drops the ids it holds; deleted points are
masked until the next merge). ``update(ids, points)`` is a delete followed by an ingest under the same lock
(moving objects).

After any of these, algorithm labels follow :meth:`DistributedSpatialCluster.point_ids` (ascending ids), since
input rows no longer describe the data set.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..client.runtime import ClusterRuntime
from ..core.crs import to_unit
from ..core.curves import curve_keys, default_bits
from ..core.progress import progress_bar
from ..core.validation import check_ids, check_points

log = logging.getLogger(__name__)

__all__ = ["ingest", "delete", "update", "distribute_chunks"]


def _check_timestamps(timestamps: Any, n: int) -> np.ndarray | None:
    if timestamps is None:
        return None
    ts = np.asarray(timestamps, dtype=np.float64)
    if ts.shape != (n,):
        raise ValueError(f"timestamps must be a 1-D array with one value per point ({n}), got shape {ts.shape}")
    bad = np.flatnonzero(~np.isfinite(ts))
    if len(bad):
        raise ValueError(f"timestamps must be finite; row {int(bad[0])} is {ts[bad[0]]}")
    return ts


def ingest(
    rt: ClusterRuntime, points: Any, ids: Any = None, timestamps: Any = None, centers: np.ndarray | None = None,
    stored: bool = False,
) -> tuple[np.ndarray, Any]:
    """Append a batch; returns ``(ids, streaming k-means stats or None)``. See the module docstring.
    ``stored``: the points are already as the nodes store them (a geographic data set's unit vectors)."""
    meta = rt.require_data()
    pts = check_points(points) if stored else _user_points(meta, points)
    n, d = pts.shape
    if d != meta.dim:
        raise ValueError(f"points have {d} columns but the distributed data set has {meta.dim}")
    _check_timestamps(timestamps, n)
    if ids is not None:
        ids = check_ids(ids, n)
    new_ids, stats, view = rt.call_controller("ingest", pts, ids, None, centers, rt.new_token())
    rt.install(view)
    return new_ids, stats


def delete(rt: ClusterRuntime, ids: Any) -> int:
    """Delete points by id from every replica; returns how many distinct points were deleted."""
    rt.require_data()
    n, view = rt.call_controller("delete", np.asarray(ids), rt.new_token())
    rt.install(view)
    return n


def update(
    rt: ClusterRuntime, ids: Any, points: Any, timestamps: Any = None, centers: np.ndarray | None = None,
) -> tuple[int, np.ndarray, Any]:
    """Move points: delete ``ids`` and ingest them at ``points`` as one write; returns ``(how many of the ids
    existed, ids, streaming k-means stats or None)``."""
    meta = rt.require_data()
    arr = check_ids(ids, len(np.asarray(ids)))
    pts = _user_points(meta, points)
    if len(pts) != len(arr):
        raise ValueError(f"update needs one point per id: {len(arr)} ids, {len(pts)} points")
    _check_timestamps(timestamps, len(pts))
    existed, new_ids, stats, view = rt.call_controller("update", arr, pts, None, centers, rt.new_token())
    rt.install(view)
    return existed, new_ids, stats


def _user_points(meta: Any, points: Any, row0: int = 0) -> np.ndarray:
    """Points as the user gives them -> as the nodes store them: a geographic data set's longitude/latitude
    (validated, rows named) become 3-D unit vectors (:func:`distspatial.core.crs.to_unit`)."""
    if meta is not None and meta.geographic:
        return to_unit(points, "points", row0)
    return check_points(points)


def _chunk_source(source: Any, columns: Any, id_column: str | None, chunk_rows: int):
    """A function returning a fresh iterator of ``(points, ids or None)`` chunks (the source is read twice)."""
    import os

    if isinstance(source, (str, os.PathLike)):
        from ..io.files import iter_point_chunks

        def from_file():
            it = iter_point_chunks(source, columns, chunk_rows, id_column)
            return ((c, None) if id_column is None else c for c in it)
        return from_file
    if callable(source):
        def from_callable():
            for c in source():
                yield (c, None) if not isinstance(c, tuple) else c
        return from_callable
    raise TypeError("source must be a file path or a callable returning an iterator of (n, d) chunks (or "
                    "(points, ids) pairs); a plain iterator cannot be read twice")


def distribute_chunks(
    rt: ClusterRuntime, source: Any, columns: Any = None, id_column: str | None = None,
    chunk_rows: int = 1 << 20, sample_size: int = 200_000, seed: int = 0, progress: bool = False,
    crs: Any = None,
):
    """Distribute a data set too large for the driver, one chunk at a time (two passes over the source).

    Pass 1 reads every chunk once for the global bounds, the variance and a uniform sample of ``sample_size``
    points; the partitions' curve-key ranges are cut at the sample's key quantiles and created empty on the
    nodes. Pass 2 ingests chunk by chunk (each acknowledged by every replica). The driver holds one chunk and
    the sample at a time. ``crs``: a resolved :class:`~distspatial.core.crs.CRSInfo` or ``None``; a geographic one
    makes the chunks longitude/latitude, converted to unit vectors as they are read.
    """
    chunks = _chunk_source(source, columns, id_column, chunk_rows)
    geographic = crs is not None and crs.geographic
    rng = np.random.default_rng(seed)
    lo = hi = None
    n, s1, s2 = 0, 0.0, 0.0
    sample, prio = None, None
    for pts, _ in chunks():
        pts = to_unit(pts, "points", n) if geographic else check_points(pts)
        clo, chi = pts.min(axis=0), pts.max(axis=0)
        lo = clo if lo is None else np.minimum(lo, clo)
        hi = chi if hi is None else np.maximum(hi, chi)
        n += len(pts)
        s1 = s1 + pts.sum(axis=0)
        s2 = s2 + (pts * pts).sum(axis=0)
        pr = rng.random(len(pts))  # a uniform sample: the smallest random priorities seen
        sample = pts if sample is None else np.concatenate([sample, pts])
        prio = pr if prio is None else np.concatenate([prio, pr])
        if len(prio) > sample_size:
            keep = np.argpartition(prio, sample_size)[:sample_size]
            sample, prio = sample[keep], prio[keep]
    if n == 0:
        raise ValueError("the source holds no points")
    d = len(lo)
    cfg = rt.config
    bits = default_bits(d)
    keys = np.sort(curve_keys(sample, lo, hi, cfg.curve, bits))
    n_parts = max(1, min(cfg.partition_count, n))
    bounds = keys[(np.arange(1, n_parts) * len(keys)) // n_parts] if n_parts > 1 else np.empty(0, np.uint64)
    key_lo = np.concatenate([[0], bounds]).astype(np.uint64)
    key_hi = np.concatenate([bounds.astype(np.int64) - 1, [np.iinfo(np.int64).max]])
    variance = float(np.mean(s2 / n - (s1 / n) ** 2))
    rt.install(rt.call_controller("begin_chunked", d, lo, hi, bits, key_lo, key_hi, variance, id_column is not None,
                                  None if crs is None else crs.name, geographic))
    row, user_ids = 0, False
    with progress_bar(n, "ingest", progress, unit="pts") as bar:
        for pts, ids in chunks():
            m = len(pts)
            user_ids |= ids is not None
            if geographic:  # converted here (rows named in the whole source), stored as they are
                ingest(rt, to_unit(pts, "points", row), np.arange(row, row + m, dtype=np.int64)
                       if ids is None else ids, stored=True)
            else:
                ingest(rt, pts, np.arange(row, row + m, dtype=np.int64) if ids is None else ids)
            row += m
            bar.update(m)
    # without user ids the ids are the rows of the source, exactly as distribute_data would number them;
    # with them, algorithm labels follow point_ids() (ascending ids), as after any ingest
    rt.install(rt.call_controller("end_chunked", user_ids, row))
    return rt.meta
