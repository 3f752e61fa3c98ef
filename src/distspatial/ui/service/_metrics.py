"""Counters of the HTTP service (:class:`ServiceMetrics`) and the status it serves (:class:`StatusCollector`)."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from ...core.errors import NotDistributedError
from ._requests import NODE_COLORS, _jsonable

# -- service metrics ----------------------------------------------------------------------------------------------
#: why access control refused a request (``GET /stats``: ``service.access.refused``): no token (401), a token
#: that is not configured or a malformed Authorization header (401), a read token on a write (403), a write to a
#: ``--read-only`` service (405), a write from another web origin (403: a page elsewhere in the user's browser)
REFUSAL_REASONS = ("missing_token", "invalid_token", "insufficient_scope", "read_only", "cross_origin")
#: labels of the batch-size histogram: requests per coalesced batch
BATCH_SIZE_BUCKETS = ("1", "2-3", "4-7", "8-15", "16-31", "32-63", "64+")


class ServiceMetrics:
    """Requests, queries and errors per endpoint, and their rates over the last ``window_s`` seconds (kept in
    one-second buckets, so the cost does not grow with the request rate); coalesced batches per kind (how many,
    requests and queries in them, a histogram of requests per batch); admission: requests refused when the queue
    was full (503), body-read timeouts (408) and request timeouts (504)."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self.started = time.time()
        self._lock = threading.Lock()
        self._totals: dict[str, dict[str, float]] = {}
        self._buckets: deque[tuple[int, dict[str, list[int]]]] = deque()  # (second, {endpoint: [requests, queries]})
        self._events = {"refused": 0, "body_timeouts": 0, "request_timeouts": 0}
        self._batches: dict[str, dict[str, Any]] = {}
        #: requests refused by access control, per reason (see :data:`REFUSAL_REASONS`), and writes let through
        self._access = {reason: 0 for reason in REFUSAL_REASONS}
        self._writes = 0
        #: set by the app: how it controls access (``auth``: "token" or "none", ``read_only``, ``cors``)
        self.access_mode: dict[str, Any] = {"auth": "none", "read_only": False, "cors": []}
        #: set by the app: its admission limit and a function giving the requests admitted now
        self.max_queue: int | None = None
        self.admitted: Callable[[], int] = lambda: 0

    def count(self, event: str) -> None:
        """One more ``refused``, ``body_timeouts`` or ``request_timeouts``."""
        with self._lock:
            self._events[event] = self._events.get(event, 0) + 1

    def refuse(self, reason: str) -> None:
        """One more request refused by access control for ``reason`` (one of :data:`REFUSAL_REASONS`)."""
        with self._lock:
            self._access[reason] = self._access.get(reason, 0) + 1

    def write_accepted(self) -> None:
        with self._lock:
            self._writes += 1

    def record_batch(self, kind: str, requests: int, queries: int, coalesced: bool = True) -> None:
        """A batch of ``requests`` requests (``queries`` query points) sent to the cluster in one call
        (``coalesced=False``: a large request that went alone, bypassing coalescing)."""
        with self._lock:
            b = self._batches.setdefault(kind, {"batches": 0, "requests": 0, "queries": 0, "max_requests": 0,
                                                "bypassed": 0, "sizes": [0] * len(BATCH_SIZE_BUCKETS)})
            if not coalesced:
                b["bypassed"] += 1
                return
            b["batches"] += 1
            b["requests"] += requests
            b["queries"] += queries
            b["max_requests"] = max(b["max_requests"], requests)
            b["sizes"][min(len(BATCH_SIZE_BUCKETS) - 1, requests.bit_length() - 1)] += 1

    def record(self, endpoint: str, queries: int, seconds: float, ok: bool) -> None:
        now = time.time()
        sec = int(now)
        with self._lock:
            t = self._totals.setdefault(endpoint, {"requests": 0, "queries": 0, "errors": 0, "seconds": 0.0})
            t["requests"] += 1
            t["queries"] += queries if ok else 0
            t["errors"] += 0 if ok else 1
            t["seconds"] += seconds
            if not self._buckets or self._buckets[-1][0] != sec:
                self._buckets.append((sec, {}))
            b = self._buckets[-1][1].setdefault(endpoint, [0, 0])
            b[0] += 1
            b[1] += queries if ok else 0
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] < now - self.window_s - 1:
            self._buckets.popleft()

    def snapshot(self, rate_window_s: float = 10.0) -> dict[str, Any]:
        """Totals per endpoint, requests/s and queries/s over the last ``rate_window_s`` seconds, and the queries
        answered in each of the last ``window_s`` seconds (oldest first)."""
        now = time.time()
        with self._lock:
            self._trim(now)
            buckets = [(sec, {k: list(v) for k, v in b.items()}) for sec, b in self._buckets]
            totals = {k: dict(v) for k, v in self._totals.items()}
        window = min(rate_window_s, max(1e-9, now - self.started))
        recent: dict[str, list[int]] = {}
        for sec, b in buckets:
            if sec + 1 > now - rate_window_s:
                for name, (req, q) in b.items():
                    acc = recent.setdefault(name, [0, 0])
                    acc[0] += req
                    acc[1] += q
        endpoints = []
        for name in sorted(totals):
            t = totals[name]
            req, q = recent.get(name, (0, 0))
            endpoints.append({
                "endpoint": name,
                "requests": int(t["requests"]),
                "queries": int(t["queries"]),
                "errors": int(t["errors"]),
                "mean_ms": 1e3 * t["seconds"] / max(1, t["requests"]),
                "requests_per_s": req / window,
                "queries_per_s": q / window,
            })
        n = int(self.window_s)
        timeline = [0.0] * n
        for sec, b in buckets:
            age = int(now) - sec
            if 0 <= age < n:
                timeline[n - 1 - age] += sum(v[1] for v in b.values())
        with self._lock:
            events = dict(self._events)
            access = {**self.access_mode, "refused": dict(self._access), "writes_accepted": self._writes}
            batches = {}
            for kind, b in sorted(self._batches.items()):
                batches[kind] = {k: v for k, v in b.items() if k != "sizes"}
                batches[kind]["mean_requests"] = b["requests"] / max(1, b["batches"])
                batches[kind]["sizes"] = dict(zip(BATCH_SIZE_BUCKETS, b["sizes"]))
        return {
            "uptime_s": now - self.started,
            "endpoints": endpoints,
            "requests": sum(int(t["requests"]) for t in totals.values()),
            "errors": sum(int(t["errors"]) for t in totals.values()),
            "queries_per_s": sum(e["queries_per_s"] for e in endpoints),
            "timeline_queries_per_s": timeline,
            "admission": {"max_queue": self.max_queue, "admitted": int(self.admitted()), **events},
            "batches": batches,
            "access": access,
        }


def _current_meta(cluster: Any) -> tuple[Any, str]:
    """``(metadata, "")``, or ``(None, why not)`` before ``distribute_data`` or after ``shutdown``."""
    try:
        return cluster.metadata, ""
    except (NotDistributedError, RuntimeError) as exc:
        return None, " ".join(str(exc).split())


def _units(meta: Any) -> dict[str, Any]:
    """What ``/status.json`` says about coordinates and distances: ``geographic``, ``coordinate_units`` (e.g.
    ``"degree (longitude, latitude)"``), ``distance_units`` (``"metre"`` for geographic data; ``None``: as the
    coordinates, no CRS)."""
    if meta is None:
        return {"geographic": None, "coordinate_units": None, "distance_units": None}
    if meta.geographic:
        return {"geographic": True, "coordinate_units": "degree (longitude, latitude)",
                "distance_units": "metre (great circle)"}
    units = None
    if meta.crs:
        try:
            from ...core.crs import resolve_crs

            units = resolve_crs(meta.crs).units
        except ValueError:
            units = None
    return {"geographic": False, "coordinate_units": units, "distance_units": units}


# -- status snapshot ------------------------------------------------------------------------------------------------
class StatusCollector:
    """Builds what ``/status.json`` returns, at most once per ``min_interval_s`` (viewers share a snapshot).

    Reads ``cluster.statistics()`` (one ``stats`` call per node), ``cluster.health()`` and the metadata; node
    rates (queries/s, busy fraction) are differences between consecutive snapshots. It does not call
    ``cluster.load_metrics()``, whose rates belong to the load balancer.
    """

    def __init__(self, cluster: Any, metrics: ServiceMetrics, min_interval_s: float = 0.5) -> None:
        self.cluster = cluster
        self.metrics = metrics
        self.min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._cached: tuple[float, dict] | None = None
        self._prev: tuple[float, dict[int, tuple[int, float]], int] | None = None

    def get(self) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self.min_interval_s:
                return self._cached[1]
            snap = self._collect(now)
            self._cached = (now, snap)
            return snap

    def _collect(self, now: float) -> dict[str, Any]:
        c = self.cluster
        st = c.statistics()
        try:
            health = c.health()
        except Exception:  # a closed cluster, a detector hiccup: the page still shows the statistics
            health = {"nodes": {}, "failed_nodes": [], "under_replicated": [], "recoveries": []}
        meta, _ = _current_meta(c)
        prev = self._prev
        dt = now - prev[0] if prev else 0.0
        per_node = {n.node_id: (n.queries_served, n.busy_seconds) for n in st.nodes}
        nodes = []
        total_points = max(1, sum(n.points for n in st.nodes))
        for n in st.nodes:
            h = health.get("nodes", {}).get(n.node_id, {})
            q0, b0 = prev[1].get(n.node_id, (n.queries_served, n.busy_seconds)) if prev else (n.queries_served,
                                                                                             n.busy_seconds)
            qps = (n.queries_served - q0) / dt if dt > 0 else 0.0
            busy = min(1.0, max(0.0, (n.busy_seconds - b0) / dt)) if dt > 0 else 0.0
            status = n.status
            if status == "alive" and h.get("status") not in (None, "alive"):
                status = str(h.get("status"))
            nodes.append({
                "node_id": n.node_id, "status": status, "host": n.host,
                "health_score": h.get("health_score"), "memory_fraction": h.get("memory_fraction"),
                "median_response_ms": h.get("median_response_ms"),
                "partitions": n.partitions, "points": n.points, "points_share": n.points / total_points,
                "bytes_held": n.bytes_held, "queries_served": n.queries_served, "calls_served": n.calls_served,
                "queries_per_s": max(0.0, qps), "busy_fraction": busy, "mean_call_ms": n.mean_call_ms,
                "color": NODE_COLORS[n.node_id % len(NODE_COLORS)],
            })
        cluster_qps = (st.queries - prev[2]) / dt if prev and dt > 0 else 0.0
        self._prev = (now, per_node, st.queries)
        partitions, bounds = [], None
        if meta is not None:
            order = np.argsort([p.key_lo for p in meta.partitions], kind="stable")
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(len(order))
            failed = set(health.get("failed_nodes", []))
            for p in meta.partitions:
                live = [o for o in p.owners if o not in failed]
                partitions.append({
                    "id": p.partition_id, "lo": [float(v) for v in p.lo], "hi": [float(v) for v in p.hi],
                    "size": int(p.size), "owners": [int(o) for o in p.owners],
                    "serving": int(live[0]) if live else None, "curve_rank": int(rank[p.partition_id]),
                })
            bounds = {"lo": [float(v) for v in meta.lo], "hi": [float(v) for v in meta.hi]}
        failed_nodes = list(health.get("failed_nodes", []))
        lost = [p["id"] for p in partitions if p["serving"] is None]
        state = "unavailable" if lost or meta is None else ("degraded" if failed_nodes or
                                                            health.get("under_replicated") else "ok")
        return _jsonable({
            "time": time.time(),
            "state": state,
            "cluster": {
                "description": repr(c), "nodes": len(st.nodes),
                "alive_nodes": sum(1 for n in nodes if n["status"] == "alive"),
                "points": st.n_points, "partitions": st.n_partitions, "metadata_version": st.metadata_version,
                "dim": meta.user_dim if meta is not None else None, "curve": c.config.curve,
                "crs": meta.crs if meta is not None else None,
                **_units(meta),
                "replication": c.config.replication_factor, "bounds": bounds,
                "load_balance_score": st.load_balance_score,
            },
            "queries": {
                "total": st.queries, "per_s": max(0.0, cluster_qps), "latency_mean_ms": st.latency_mean_s * 1e3,
                "latency_p50_ms": st.latency_p50_s * 1e3, "latency_p99_ms": st.latency_p99_s * 1e3,
            },
            "nodes": nodes,
            "partitions": partitions,
            "lost_partitions": lost,
            "failed_nodes": failed_nodes,
            "under_replicated": health.get("under_replicated", []),
            "service": self.metrics.snapshot(),
        })
