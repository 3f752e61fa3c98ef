"""One hop for small queries: a few online kNN queries go in one call to one node, with no planning here.

The regular path (:mod:`distspatial.client.queries`) is built for batches: it splits the batch by home partition
through the dispatcher (failover, read balancing, counting), which costs about a millisecond of the client's time
per call whatever the batch size. A single query, or a handful, whose home partitions one node holds needs none
of that: :class:`OneHop` keeps, per metadata version, what the split needs (the quantization for curve keys, the
partitions' key ranges and live owners), computes the keys, picks a replica of the home partition (rotating
among the live ones), and sends the queries to it (:meth:`~distspatial.node.query_rounds.QueryRoundsMixin.
knn_batch`, called with one argument: :meth:`~distspatial.node.query_rounds.QueryRoundsMixin.knn_one_hop`). That node answers in its home partition and, only when the k-th distance reaches past it, asks its
peers (node-side planning, so the answer is exact).

What it does not handle it leaves to the regular path, by returning ``None``: queries whose home partitions lie
on different nodes, a node that fails or does not answer within the communication timeout (the regular path
then fails over to a replica), partial answers. A node that knows a newer metadata version refuses the call
(:class:`~distspatial.core.errors.StaleMetadataError`), which propagates, so the caller's
:meth:`~distspatial.client.runtime.ClusterRuntime.stable` fetches the new view and plans again, as for any query.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import numpy as np
from ray.exceptions import GetTimeoutError, RayActorError

from ..core.codec import message_bytes
from ..core.curves import small_batch_keys, warm_compiled_kernels
from ..core.errors import PartitionLostError, PartitionMovedError
from .runtime import ClusterRuntime

__all__ = ["OneHop", "MAX_QUERIES"]

#: batches up to this many queries take the one-hop path when one node holds all their home partitions
MAX_QUERIES = 64

_warmed = threading.Event()


def _warm_in_background() -> None:
    """Load the compiled curve-key kernels once per process, off the query's path."""
    if not _warmed.is_set():
        _warmed.set()
        threading.Thread(target=warm_compiled_kernels, daemon=True, name="warm-curve-kernels").start()


@dataclass(frozen=True)
class _Plan:
    """What a one-hop call needs of one metadata version."""

    version: int
    keys: Callable[[np.ndarray], np.ndarray]
    key_lo: np.ndarray  # partitions' first keys, in curve order
    by_key: np.ndarray  # partition index of each position in curve order
    owners: tuple[tuple[int, ...], ...]  # live owners of each partition (empty: none live)
    failed: frozenset[int]


class OneHop:
    """The one-hop path of one client (see module docstring). ``calls`` / ``fallbacks`` count its use."""

    def __init__(self, rt: ClusterRuntime) -> None:
        self._rt = rt
        self._plan: _Plan | None = None
        self._turn = itertools.count()
        self._methods: dict[int, Any] = {}  # node -> its knn_batch handle in the "reads" group
        self._members = -1  # the node set those handles belong to
        self.calls = 0
        self.fallbacks = 0

    def _plan_now(self) -> _Plan:
        meta, routing, version = self._rt.snapshot()
        failed = frozenset(self._rt.failed_nodes)
        plan = self._plan
        if plan is not None and plan.version == version and plan.failed == failed:
            return plan
        _warm_in_background()
        if plan is None or plan.failed != failed or self._members != self._rt.view.members:
            self._methods = {}
            self._members = self._rt.view.members
        owners = tuple(tuple(n for n in o if n not in failed) for o in routing.owners)
        plan = _Plan(version, small_batch_keys(meta.lo, meta.hi, meta.curve, meta.bits), routing.key_lo,
                     routing.by_key, owners, failed)
        self._plan = plan
        return plan

    def knn(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Exact ``(distances (m, k), ids (m, k))`` of a small batch in one call to one node, or ``None`` when
        the batch is not for this path (see module docstring)."""
        m = len(q)
        if m == 0 or m > MAX_QUERIES:
            return None
        plan = self._plan_now()
        pos = np.searchsorted(plan.key_lo, plan.keys(q), side="right") - 1
        np.clip(pos, 0, len(plan.key_lo) - 1, out=pos)
        home = plan.by_key[pos]
        if m == 1:
            order = None
            segments = [(int(home[0]), 0, 1)]
            parts = [int(home[0])]
        else:
            order = np.argsort(home, kind="stable")
            home = home[order]
            q = q[order]
            parts_a, starts = np.unique(home, return_index=True)
            parts = parts_a.tolist()
            bounds = starts.tolist() + [m]
            segments = [(p, bounds[i], bounds[i + 1]) for i, p in enumerate(parts)]
        node = self._node_for(plan, parts)
        if node is None:
            return None
        out = self._call(node, ("knn", q, segments, k, plan.version))
        if out is None:
            return None
        dist, ids, _ = out
        if order is None:
            return dist, ids
        out_d, out_i = np.empty_like(dist), np.empty_like(ids)
        out_d[order], out_i[order] = dist, ids
        return out_d, out_i

    def hits(self, kind: str, anchor: np.ndarray, arrays: tuple[np.ndarray, np.ndarray],
             return_points: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """A small range (``kind`` "ball", ``arrays`` = centres, radii) or box ("box", lo, hi) batch in one call
        to a node holding the home partition of ``anchor[0]`` (the first query's centre), which plans the
        partitions to visit and asks its peers: ``(counts (m,), ids, points or None)``, each query's hits after
        those of the queries before it, sorted by id; ``None`` when not for this path."""
        m = len(anchor)
        if m == 0 or m > MAX_QUERIES:
            return None
        plan = self._plan_now()
        pos = np.searchsorted(plan.key_lo, plan.keys(anchor[:1]), side="right") - 1
        home = int(plan.by_key[min(max(int(pos[0]), 0), len(plan.key_lo) - 1)])
        node = self._node_for(plan, [home])
        if node is None:
            return None
        out = self._call(node, (kind, *arrays, return_points, plan.version))
        return None if out is None else out[:3]

    def _call(self, node: int, request: tuple) -> Any:
        """``node.one_hop(request)`` in its "reads" group, counted; ``None`` when the node fails, does not
        answer within the communication timeout, or no longer holds a partition (the regular path handles
        those: failover, re-routing, recovery)."""
        rt = self._rt
        try:
            method = self._methods.get(node)
            if method is None:  # the handle with its options, made once per node set (``options`` costs ~50 us)
                method = self._methods[node] = rt.actor(node).one_hop.options(concurrency_group="reads")
            rt.comm.sent(node, message_bytes(request))
            out = rt.recv(node, method.remote(request), timeout=rt.dispatch.timeout_s)
        except (RayActorError, GetTimeoutError, PartitionMovedError, PartitionLostError):
            self.fallbacks += 1
            return None
        self.calls += 1
        return out

    def _node_for(self, plan: _Plan, parts: list[int]) -> int | None:
        """A live node holding every partition of ``parts`` (rotating among replicas), or ``None``."""
        common: Any = plan.owners[parts[0]]
        for p in parts[1:]:
            common = [n for n in common if n in plan.owners[p]]
        if not common:
            return None
        return common[next(self._turn) % len(common)]
