"""The query path on the client: plan on the cached view, send one message per node and round, merge.

**kNN** (:func:`knn`). Queries get curve keys and are sorted by them. Round 1: each query goes to its *home*
partition (the key range holding its key); sorted queries make each partition's share one contiguous run, in
curve order, which is also the order a KD-tree answers fastest. Round 2: with the k-th distance ``r`` from round
1, a query goes on only to partitions whose box is closer than ``r`` (MINDIST pruning), with ``r`` as a bound so
the nodes return only candidates within it. Candidates are merged row-wise into the running top-k; results go
back into the caller's order. **Range and box** (:func:`hits`) need one round over the partitions whose boxes
they reach; hits are sorted by (query, id) and split per query. Every partition is read from exactly one replica
per round, so no id is reported twice. Every call carries the plan's metadata version; a node that knows a newer
one refuses and the caller plans again (:meth:`~distspatial.client.runtime.ClusterRuntime.stable`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.curves import curve_keys
from ..kernels.local_index import merge_topk
from ..kernels.query_planning import Assignment, ball_pairs, box_pairs, knn_followups, knn_home
from .runtime import ClusterRuntime

__all__ = ["knn", "ball", "box", "hits"]


def knn(rt: ClusterRuntime, q: np.ndarray, k: int, missing: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``(distances (m, k), ids (m, k))`` of the batch ``q`` on the view cached now."""
    meta, routing, version = rt.snapshot()
    m = len(q)
    keys = curve_keys(q, meta.lo, meta.hi, meta.curve, meta.bits)
    order = np.argsort(keys, kind="stable")
    qs = np.take(q, order, axis=0)
    home = knn_home(keys[order], routing)
    dist = np.full((m, k), np.inf)  # rows whose home partition is lost (partial answers) keep these
    ids = np.full((m, k), -1, dtype=np.int64)

    # round 1: the k best in the home partition
    for rows, (d_, i_) in rt.run_assignment(
        home, "knn", lambda rows: (np.take(qs, rows, axis=0), None), missing, version, k=k
    ):
        dist[rows], ids[rows] = d_, i_

    kth = dist[:, k - 1]
    home_part = np.empty(m, dtype=np.int64)
    for p, a, b in zip(home.partitions, home.starts[:-1], home.starts[1:]):
        home_part[home.rows[a:b]] = p
    follow = knn_followups(qs, kth, home_part, routing)
    if follow.n_pairs:  # round 2: only candidates within the k-th distance
        results = rt.run_assignment(
            follow, "knn", lambda rows: (np.take(qs, rows, axis=0), kth[rows]), missing, version, later_round=True,
            k=k,
        )
        # Merge node by node; a node's rows may repeat a query (two partitions), so merge per segment.
        for rows, (d_, i_) in results:
            _merge_rows(dist, ids, rows, d_, i_, k)
    out_d = np.empty_like(dist)
    out_i = np.empty_like(ids)
    out_d[order] = dist
    out_i[order] = ids
    return out_d, out_i


def _merge_rows(dist, ids, rows, d_, i_, k) -> None:
    """Merge candidate rows into the running top-k; ``rows`` may repeat (handled by unique passes)."""
    pending = np.arange(len(rows))
    while len(pending):
        r = rows[pending]
        _, first = np.unique(r, return_index=True)
        take = pending[first]
        rr = rows[take]
        dist[rr], ids[rr] = merge_topk(dist[rr], ids[rr], d_[take], i_[take], k)
        pending = np.setdiff1d(pending, take, assume_unique=True)


def ball(rt: ClusterRuntime, c: np.ndarray, r: np.ndarray, return_points: bool,
         missing: list[int] | None = None) -> list:
    """Range search of the batch of centres ``c`` with radii ``r`` on the view cached now."""
    meta, routing, version = rt.snapshot()
    return hits(rt, ball_pairs(c, r, routing), "ball", lambda rows: (c[rows], r[rows]), meta.dim, return_points,
                missing, version)


def box(rt: ClusterRuntime, lo: np.ndarray, hi: np.ndarray, return_points: bool,
        missing: list[int] | None = None) -> list:
    """Box search of the batch of boxes ``[lo, hi]`` on the view cached now."""
    meta, routing, version = rt.snapshot()
    return hits(rt, box_pairs(lo, hi, routing), "box", lambda rows: (lo[rows], hi[rows]), meta.dim, return_points,
                missing, version)


def hits(
    rt: ClusterRuntime, assign: Assignment, method: str, row_args, d: int, return_points: bool,
    missing: list[int] | None = None, version: int | None = None,
) -> list[Any]:
    """Run a hit-list query (``ball``/``box``) and split the hits per query, sorted by id."""
    m = assign.n_queries
    q_parts, id_parts, pt_parts = [], [], []
    for rows, (counts, ids, pts) in rt.run_assignment(
        assign, method, row_args, missing, version, return_points=return_points
    ):
        q_parts.append(np.repeat(rows, counts))
        id_parts.append(ids)
        if return_points:
            pt_parts.append(pts)
    q_all = np.concatenate(q_parts) if q_parts else np.empty(0, np.int64)
    id_all = np.concatenate(id_parts) if id_parts else np.empty(0, np.int64)
    order = np.lexsort((id_all, q_all))
    id_all = id_all[order]
    splits = np.cumsum(np.bincount(q_all, minlength=m))[:-1]
    id_lists = np.split(id_all, splits)
    if not return_points:
        return id_lists
    pt_all = np.concatenate(pt_parts)[order] if pt_parts else np.empty((0, d))
    return list(zip(id_lists, np.split(pt_all, splits)))
