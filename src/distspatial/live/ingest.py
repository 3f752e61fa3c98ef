"""Live updates of the distributed index: ingest, delete, update. Driven from the coordinator.

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

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.curves import curve_keys
from ..client.dispatch import NODE_FAILURES
from ..core.errors import NodeFailureError
from ..core.validation import check_ids, check_points

if TYPE_CHECKING:
    from ..cluster import DistributedSpatialCluster

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


def update(
    cluster: DistributedSpatialCluster, ids: Any, points: Any, timestamps: Any = None,
    centers: np.ndarray | None = None,
) -> tuple[int, np.ndarray, Any]:
    """Move points: delete ``ids`` and ingest them at ``points`` under one lock; returns ``(how many of the ids
    existed, ids, streaming k-means stats or None)``."""
    arr = check_ids(ids, len(np.asarray(ids)))
    pts = check_points(points)
    if len(pts) != len(arr):
        raise ValueError(f"update needs one point per id: {len(arr)} ids, {len(pts)} points")
    with cluster._meta_lock:
        existed = delete(cluster, arr)
        new_ids, stats = ingest(cluster, pts, arr, timestamps, centers)
    return existed, new_ids, stats


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
    cluster: DistributedSpatialCluster, source: Any, columns: Any = None, id_column: str | None = None,
    chunk_rows: int = 1 << 20, sample_size: int = 200_000, seed: int = 0,
):
    """Distribute a data set too large for the driver, one chunk at a time (two passes over the source).

    Pass 1 reads every chunk once for the global bounds, the variance and a uniform sample of ``sample_size``
    points; the partitions' curve-key ranges are cut at the sample's key quantiles and created empty on the
    nodes. Pass 2 ingests chunk by chunk (each acknowledged by every replica). The driver holds one chunk and
    the sample at a time.
    """
    import numpy as np

    from ..core.curves import default_bits
    from ..control.metadata import GlobalIndexMetadata, PartitionInfo
    from ..control.placement import place_partitions

    chunks = _chunk_source(source, columns, id_column, chunk_rows)
    rng = np.random.default_rng(seed)
    lo = hi = None
    n, s1, s2 = 0, 0.0, 0.0
    sample, prio = None, None
    for pts, _ in chunks():
        pts = check_points(pts)
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
    cfg = cluster.config
    bits = default_bits(d)
    keys = np.sort(curve_keys(sample, lo, hi, cfg.curve, bits))
    n_parts = max(1, min(cfg.partition_count, n))
    bounds = keys[(np.arange(1, n_parts) * len(keys)) // n_parts] if n_parts > 1 else np.empty(0, np.uint64)
    key_lo = np.concatenate([[0], bounds]).astype(np.uint64)
    key_hi = np.concatenate([bounds.astype(np.int64) - 1, [np.iinfo(np.int64).max]])
    with cluster._meta_lock:
        live = cluster.live_node_ids
        owners = place_partitions(n_parts, live, min(cfg.replication_factor, len(live)), cluster._machines())
        cluster._dataset_counter += 1
        dataset = cluster._dataset_counter
        empty_pts, empty_ids = np.empty((0, d)), np.empty(0, np.int64)
        loads = []
        for node in live:
            pids = [p for p in range(n_parts) if node in owners[p]]
            loads.append((node, cluster._send(node, "load_partitions", dataset, pids,
                                              *[a for _ in pids for a in (empty_pts, empty_ids)])))
        for node, ref in loads:
            cluster._recv(node, ref)
        parts = tuple(PartitionInfo(p, int(key_lo[p]), int(max(key_lo[p], key_hi[p])), np.full(d, np.inf),
                                    np.full(d, -np.inf), 0, 0, owners[p]) for p in range(n_parts))
        version = (cluster._meta.version + 1) if cluster._meta else 1
        cluster._set_meta(GlobalIndexMetadata(dim=d, lo=lo, hi=hi, curve=cfg.curve, bits=bits, partitions=parts,
                                              version=version, dataset_id=dataset))
        cluster._id_sorted = cluster._id_rows = None
        cluster._has_user_ids = id_column is not None
        cluster._next_id, cluster._live_ids = 0, None
        cluster._mean_variance = float(np.mean(s2 / n - (s1 / n) ** 2))
        from ..core.progress import progress_bar

        row, user_ids = 0, False
        with progress_bar(n, "ingest", cluster.progress, unit="pts") as bar:
            for pts, ids in chunks():
                m = len(pts)
                user_ids |= ids is not None
                ingest(cluster, pts, np.arange(row, row + m, dtype=np.int64) if ids is None else ids)
                row += m
                bar.update(m)
        # without user ids the ids are the rows of the source, exactly as distribute_data would number them;
        # with them, algorithm labels follow point_ids() (ascending ids), as after any ingest
        cluster._has_user_ids = cluster._modified = user_ids
        if not user_ids:
            cluster._next_id = row
    return cluster._meta
