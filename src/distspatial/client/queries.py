"""The query path on the client: plan on the cached view, send one message per node and round, merge.

**kNN** (:func:`knn`). Queries get curve keys; each goes to a node holding its *home* partition (the key range
holding its key), one message per node. That node sorts its share in curve order, answers it in the home
partitions, plans the second round from the k-th distances (MINDIST and cell tests), asks the other nodes
directly, merges, and returns final answers (:mod:`distspatial.node.query_rounds`): the client's work is O(m). **Range and box** (:func:`hits`) need one round over the partitions whose boxes
they reach; hits are sorted by (query, id) and split per query. Every partition is read from exactly one replica
per round, so no id is reported twice. Every call carries the plan's metadata version; a node that knows a newer
one refuses and the caller plans again (:meth:`~distspatial.client.runtime.ClusterRuntime.stable`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.curves import curve_keys
from ..kernels.query_planning import Assignment, ball_pairs, box_pairs
from .runtime import ClusterRuntime

__all__ = ["knn", "ball", "box", "hits"]


def knn(rt: ClusterRuntime, q: np.ndarray, k: int, missing: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``(distances (m, k), ids (m, k))`` of the batch ``q`` on the view cached now: each query goes to a
    node holding its home partition, which plans and merges the rest (:meth:`~distspatial.node.query_rounds.
    QueryRoundsMixin.knn_batch`); here only keys, the split by partition and the answers put in place."""
    meta, routing, version = rt.snapshot()
    m = len(q)
    keys = curve_keys(q, meta.lo, meta.hi, meta.curve, meta.bits)
    home = Assignment.from_pairs(np.arange(m, dtype=np.int64), routing.home_partitions(keys), m)
    dist = np.full((m, k), np.inf)  # rows whose home partition is lost (partial answers) keep these
    ids = np.full((m, k), -1, dtype=np.int64)
    left_out: set[int] = set()
    for rows, (d_, i_, miss) in rt.run_assignment(
        home, "knn_batch", lambda rows: (np.take(q, rows, axis=0),), missing, version, k=k,
        allow_partial=missing is not None,
    ):
        dist[rows], ids[rows] = d_, i_
        left_out.update(miss)
    if missing is not None:
        missing.extend(sorted(left_out - set(missing)))
    return dist, ids


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
