"""The query path on the client: plan on the cached view, send one message per node and round, merge.

**kNN** (:func:`knn`). Queries get curve keys; each goes to a node holding its *home* partition (the key range
holding its key), one message per node, each partition's rows in curve order (one radix sort here saves every
node a sort and a scatter back). That node answers them in the home partitions, plans the second round from the k-th distances (MINDIST and cell tests), asks the other nodes
directly, merges, and returns final answers (:mod:`distspatial.node.query_rounds`): the client's work is O(m). **Range and box** (:func:`hits`) need one round over the partitions whose boxes
they reach; hits are sorted by (query, id) and split per query. Every partition is read from exactly one replica
per round, so no id is reported twice. Every call carries the plan's metadata version; a node that knows a newer
one refuses and the caller plans again (:meth:`~distspatial.client.runtime.ClusterRuntime.stable`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.curves import curve_keys
from ..kernels.query_planning import Assignment, home_in_curve_order, put_rows
from .fast_path import MAX_QUERIES, OneHop
from .runtime import ClusterRuntime

__all__ = ["knn", "ball", "box"]


def knn(rt: ClusterRuntime, q: np.ndarray, k: int, missing: list[int] | None = None,
        one_hop: OneHop | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``(distances (m, k), ids (m, k))`` of the batch ``q`` on the view cached now: each query goes to a
    node holding its home partition, which plans and merges the rest (:meth:`~distspatial.node.query_rounds.
    QueryRoundsMixin.knn_batch`); here only keys, the split by partition and the answers put in place. Small
    batches go through ``one_hop`` (:class:`~distspatial.client.fast_path.OneHop`) when it can take them."""
    if one_hop is not None and missing is None and len(q) <= MAX_QUERIES:
        out = one_hop.knn(q, k)
        if out is not None:
            return out
    meta, routing, version = rt.snapshot()
    m = len(q)
    keys = curve_keys(q, meta.lo, meta.hi, meta.curve, meta.bits)
    home = home_in_curve_order(keys, routing)  # the nodes answer each partition's rows as they come
    dist = np.full((m, k), np.inf)  # rows whose home partition is lost (partial answers) keep these
    ids = np.full((m, k), -1, dtype=np.int64)
    left_out: set[int] = set()
    for rows, (d_, i_, miss) in rt.run_assignment(
        home, "knn_batch", lambda rows: (np.take(q, rows, axis=0),), missing, version, k=k,
        allow_partial=missing is not None, presorted=True,
    ):
        put_rows(dist, rows, d_)
        put_rows(ids, rows, i_)
        left_out.update(miss)
    if missing:  # a partial answer: queries whose home partition is lost search every partition still there
        groups = home.groups()
        rows = np.concatenate([groups[p] for p in missing if p in groups] or [np.empty(0, np.int64)])
        if len(rows):
            node = rt.live_node_ids[0]
            d_, i_, miss = rt.recv(node, rt.send(node, "knn_batch", np.take(q, rows, axis=0), [], k=k,
                                                 version=version, allow_partial=True, homeless=True))
            dist[rows], ids[rows] = d_, i_
            left_out.update(miss)
    if missing is not None:
        missing.extend(sorted(left_out - set(missing)))
    return dist, ids


def ball(rt: ClusterRuntime, c: np.ndarray, r: np.ndarray, return_points: bool,
         missing: list[int] | None = None, one_hop: OneHop | None = None) -> list:
    """Range search of the batch of centres ``c`` with radii ``r`` on the view cached now: each ball goes to a
    node of its centre's home partition, which plans and gathers its hits
    (:meth:`~distspatial.node.query_rounds.QueryRoundsMixin.ball_batch`); a small batch in one call
    (``one_hop``)."""
    if one_hop is not None and missing is None and len(c) <= MAX_QUERIES:
        out = one_hop.hits("ball", c, (c, r), return_points)
        if out is not None:
            return _split_hits(*out, return_points)
    meta, routing, version = rt.snapshot()
    return _batch_hits(rt, routing, c, (c, r), "ball_batch", meta.dim, return_points, missing, version)


def box(rt: ClusterRuntime, lo: np.ndarray, hi: np.ndarray, return_points: bool,
        missing: list[int] | None = None, one_hop: OneHop | None = None) -> list:
    """Box search of the batch of boxes ``[lo, hi]`` on the view cached now (a node of the home partition of
    each box's centre plans and gathers it; a small batch in one call)."""
    meta, routing, version = rt.snapshot()
    centre = np.clip((lo + hi) / 2, meta.lo, meta.hi)
    if one_hop is not None and missing is None and len(lo) <= MAX_QUERIES:
        out = one_hop.hits("box", centre, (lo, hi), return_points)
        if out is not None:
            return _split_hits(*out, return_points)
    return _batch_hits(rt, routing, centre, (lo, hi), "box_batch", meta.dim, return_points, missing, version)


def _split_hits(counts: np.ndarray, ids: np.ndarray, pts: np.ndarray | None, return_points: bool) -> list:
    """One node's hits of a whole batch (each query's after those before it) as one array per query."""
    cuts = np.cumsum(counts)[:-1]
    id_lists = np.split(ids, cuts)
    return list(zip(id_lists, np.split(pts, cuts))) if return_points else id_lists


def _batch_hits(rt: ClusterRuntime, routing: Any, anchor: np.ndarray, arrays: tuple[np.ndarray, ...], method: str,
                d: int, return_points: bool, missing: list[int] | None, version: int) -> list[Any]:
    """Split a hit-list batch by the home partition of ``anchor`` (one point per query), run ``method`` on those
    nodes, and return one id array (or ``(ids, points)``) per query, sorted by id."""
    m = len(anchor)
    keys = curve_keys(anchor, routing.lo, routing.hi, routing.curve, routing.bits)
    home = Assignment.from_pairs(np.arange(m, dtype=np.int64), routing.home_partitions(keys), m)
    counts = np.zeros(m, dtype=np.int64)
    per_rows, id_parts, pt_parts, left_out = [], [], [], set()
    for rows, (cnt, ids, pts, miss) in rt.run_assignment(
        home, method, lambda rows: tuple(np.take(a, rows, axis=0) for a in arrays), missing, version,
        return_points=return_points, allow_partial=missing is not None,
    ):
        counts[rows] = cnt
        per_rows.append((rows, cnt))
        id_parts.append(ids)
        pt_parts.append(pts)
        left_out.update(miss)
    if missing:  # a partial answer: queries whose home partition is lost are gathered by any live node
        groups = home.groups()
        rows = np.concatenate([groups[p] for p in missing if p in groups] or [np.empty(0, np.int64)])
        if len(rows):
            node = rt.live_node_ids[0]
            cnt, ids, pts, miss = rt.recv(node, rt.send(node, method, *(np.take(a, rows, axis=0) for a in arrays), [],
                                                        return_points=return_points, version=version,
                                                        allow_partial=True))
            counts[rows] = cnt
            per_rows.append((rows, cnt))
            id_parts.append(ids)
            pt_parts.append(pts)
            left_out.update(miss)
    if missing is not None:
        missing.extend(sorted(left_out - set(missing)))
    # each node's hits come grouped by its rows in order, sorted by id within a row: place the groups
    starts = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    total = int(starts[-1])
    id_all = np.empty(total, dtype=np.int64)
    pt_all = np.empty((total, d)) if return_points else None
    for (rows, cnt), ids, pts in zip(per_rows, id_parts, pt_parts):
        dest = _positions(starts[rows], cnt)
        id_all[dest] = ids
        if return_points:
            pt_all[dest] = pts
    id_lists = np.split(id_all, starts[1:-1])
    if not return_points:
        return id_lists
    return list(zip(id_lists, np.split(pt_all, starts[1:-1])))


def _positions(first: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    """``first[i] + 0 .. first[i] + cnt[i] - 1`` for every i, concatenated (vectorized)."""
    total = int(cnt.sum())
    offs = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    return np.repeat(first, cnt) + offs
