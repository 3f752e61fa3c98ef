"""Live updates of the distributed index: ingest, delete, update. Driven from the coordinator.

**Ingest** (:func:`ingest`). A batch is validated, each point gets its curve key (points outside the original
global bounds are accepted: their keys are those of the nearest point of the bounds, which keeps routing and
the planner's exact cell test correct), goes to the partition whose key range holds the key, and every live
replica of that partition appends it in one message per node (``SpatialNode.append``). Nodes keep a small
delta next to each partition's KD-tree, searched with it and merged in the background
(:class:`~distspatial.local_index.LocalPartition`). The batch is acknowledged (the call returns) only after
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

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from .curves import curve_keys
from .dispatch import NODE_FAILURES
from .errors import NodeFailureError
from .validation import check_ids, check_points

if TYPE_CHECKING:
    from .coordinator import DistributedSpatialCluster

log = logging.getLogger(__name__)

__all__ = ["ingest", "delete", "update"]


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
    cluster: DistributedSpatialCluster, points: Any, ids: Any = None, timestamps: Any = None,
    centers: np.ndarray | None = None,
) -> tuple[np.ndarray, Any]:
    """Append a batch; returns ``(ids, streaming k-means stats or None)``. See the module docstring."""
    meta = cluster._require_data()
    pts = check_points(points)
    n, d = pts.shape
    if d != meta.dim:
        raise ValueError(f"points have {d} columns but the distributed data set has {meta.dim}")
    _check_timestamps(timestamps, n)
    if ids is None:
        if cluster._has_user_ids:
            raise ValueError("this data set was distributed with user ids: pass ids for the new points")
    else:
        ids = check_ids(ids, n)
    with cluster._meta_lock:
        meta = cluster._require_data()
        if ids is None:
            ids = np.arange(cluster._next_id, cluster._next_id + n, dtype=np.int64)
        cluster._next_id = max(cluster._next_id, int(ids.max()) + 1)
        routing = cluster._routing
        keys = curve_keys(np.clip(pts, meta.lo, meta.hi), meta.lo, meta.hi, meta.curve, meta.bits)
        home = routing.home_partitions(keys)
        order = np.argsort(home, kind="stable")
        home_s = home[order]
        pts_s, ids_s, keys_s = np.take(pts, order, axis=0), ids[order], keys[order]
        parts, starts = np.unique(home_s, return_index=True)
        bounds = np.append(starts, n)
        seg_of = {int(p): (int(a), int(b)) for p, a, b in zip(parts, bounds[:-1], bounds[1:])}
        cluster._batch_counter += 1
        batch = cluster._batch_counter
        failed = cluster._dispatch.failed_nodes
        by_node: dict[int, list[int]] = {}
        for p in seg_of:
            for o in meta.partitions[p].owners:
                if o not in failed:
                    by_node.setdefault(o, []).append(p)
        stat_node = {}  # streaming k-means: each partition's new points are counted by one replica
        for node, pids in by_node.items():
            for p in pids:
                stat_node.setdefault(p, node)
        calls = []
        for node, pids in by_node.items():
            # one message per node: the rows of its partitions, re-packed so segments index the message
            rows = np.concatenate([np.arange(*seg_of[p]) for p in pids])
            lens = np.cumsum([0] + [seg_of[p][1] - seg_of[p][0] for p in pids])
            segments = [(p, int(lens[j]), int(lens[j + 1])) for j, p in enumerate(pids)]
            sub_pts = np.take(pts_s, rows, axis=0)
            mine = [p for p in pids if stat_node[p] == node] if centers is not None else None
            ref = cluster._send(node, "append", batch, sub_pts, ids_s[rows], segments, centers, mine)
            calls.append((node, pids, ref, len(rows)))
        applied: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
        stats = None
        timeout = max(30.0, cluster.config.communication_timeout_ms / 1000)
        for node, pids, ref, _ in calls:
            try:
                res, st = cluster._recv(node, ref, timeout=timeout)
            except NODE_FAILURES as exc:
                cluster._dispatch.mark_failed(node, f"ingest: {type(exc).__name__}")
                continue
            for pid, size, blo, bhi in res:
                applied[pid] = (size, blo, bhi)
            if st is not None:
                stats = st if stats is None else (stats[0] + st[0], stats[1] + st[1])
        lost = sorted(set(seg_of) - set(applied))
        if lost:
            raise NodeFailureError(f"ingest batch {batch} reached no replica of partitions {lost} (failed nodes: "
                                   f"{sorted(cluster._dispatch.failed_nodes)}); the batch is not acknowledged. "
                                   "Replicas that did take it ignore a retry of the same points only if "
                                   "retried with the same ids after recovery")
        new_parts = list(meta.partitions)
        for pid, (size, blo, bhi) in applied.items():
            a, b = seg_of[pid]
            p = meta.partitions[pid]
            new_parts[pid] = dataclasses.replace(
                p, size=int(size), nbytes=int(size) * (8 * d + 8), lo=np.minimum(p.lo, blo), hi=np.maximum(p.hi, bhi),
                key_lo=min(p.key_lo, int(keys_s[a:b].min())), key_hi=max(p.key_hi, int(keys_s[a:b].max())),
            )
        cluster._set_meta(dataclasses.replace(meta, partitions=tuple(new_parts), version=meta.version + 1))
        cluster._modified = True
        cluster._split_grown_partitions()
    return ids, stats


def delete(cluster: DistributedSpatialCluster, ids: Any) -> int:
    """Delete points by id from every replica; returns how many distinct points were deleted."""
    arr = np.unique(np.asarray(ids).astype(np.int64, copy=False).ravel())
    with cluster._meta_lock:
        meta = cluster._require_data()
        if len(arr) == 0:
            return 0
        refs = [(n, cluster._send(n, "delete", arr)) for n in cluster.live_node_ids]
        sizes: dict[int, int] = {}
        deleted: dict[int, int] = {}
        for node, ref in refs:
            try:
                res = cluster._recv(node, ref, timeout=max(30.0, cluster.config.communication_timeout_ms / 1000))
            except NODE_FAILURES as exc:
                cluster._dispatch.mark_failed(node, f"delete: {type(exc).__name__}")
                continue
            for pid, n_del, size in res:
                deleted[pid] = max(deleted.get(pid, 0), n_del)  # replicas report the same partition
                sizes[pid] = size
        if not deleted:
            return 0
        parts = [dataclasses.replace(p, size=sizes[p.partition_id], nbytes=sizes[p.partition_id] * (8 * meta.dim + 8))
                 if p.partition_id in sizes else p for p in meta.partitions]
        cluster._set_meta(dataclasses.replace(meta, partitions=tuple(parts), version=meta.version + 1))
        cluster._modified = True
        return int(sum(deleted.values()))


def update(cluster: DistributedSpatialCluster, ids: Any, points: Any, timestamps: Any = None) -> int:
    """Move points: delete ``ids`` and ingest them at ``points``; returns how many of the ids existed."""
    arr = check_ids(ids, len(np.asarray(ids)))
    pts = check_points(points)
    if len(pts) != len(arr):
        raise ValueError(f"update needs one point per id: {len(arr)} ids, {len(pts)} points")
    with cluster._meta_lock:
        existed = delete(cluster, arr)
        ingest(cluster, pts, arr, timestamps)
    return existed
