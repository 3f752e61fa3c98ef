"""HTTP query service and live status page over a running :class:`~distspatial.DistributedSpatialCluster`.

Built on FastAPI and uvicorn (``pip install 'distspatial[serve]'``). ``distspatial serve INPUT`` distributes a
point file and serves it; in Python::

    >>> from distspatial.ui.service import create_app, run_server, BackgroundServer
    >>> app = create_app(cluster)              # an ASGI app: mount it, or run it with any ASGI server  # doctest: +SKIP
    >>> run_server(cluster, "0.0.0.0", 8000)   # blocks until Ctrl-C / SIGTERM                           # doctest: +SKIP
    >>> with BackgroundServer(cluster) as srv:   # uvicorn in a thread on a free port (notebooks, tests)  # doctest: +SKIP
    ...     print(srv.url)

Endpoints (the OpenAPI spec is at ``/openapi.json``, an interactive page at ``/docs``):

==========================  ==========================================================================
``POST /knn``               ``{"points": [[x, y], ...], "k": 5}`` -> ``{"distances": [[...]], "ids": [[...]]}``
``POST /range``             ``{"points": [[x, y], ...], "radius": r}`` (or one radius per point) ->
                            ``{"ids": [[...]], "distances": [[...]]}``, hits sorted by id
``POST /box``               ``{"lo": [x0, y0], "hi": [x1, y1]}`` (or lists of boxes) -> ``{"ids": [...]}``
``POST /polygon``           a GeoJSON Polygon / MultiPolygon geometry or Feature (``?predicate=within`` or
                            ``intersects``, or a ``"predicate"`` member) -> ``{"ids": [...], "count": n}``
``POST /ingest``            ``{"points": [[x, y], ...], "ids": [...]}`` (ids optional) -> ``{"ids": [...]}``
``POST /delete``            ``{"ids": [...]}`` -> ``{"deleted": n}``
``GET /stats``              the cluster's :class:`~distspatial.core.stats.ClusterStatistics` as JSON
``GET /health``             node health; 200 when queries can be answered, 503 when not
``GET /status.json``        what the status page shows (nodes, partitions, load, query rates)
``GET /``                   the live status page (HTML; polls ``/status.json`` every second)
==========================  ==========================================================================

Geographic data sets (a geographic CRS such as EPSG:4326, :mod:`distspatial.core.crs`) are served in
longitude/latitude degrees: points ``[lon, lat]``, radii and every distance in metres (great circle on the mean
Earth radius, as the cluster answers them), boxes ``lo = [lon_lo, lat_lo]``, ``hi = [lon_hi, lat_hi]`` where
``lon_lo > lon_hi`` is a box across the antimeridian, polygons in lon/lat with edges straight in lon/lat (as in
GeoPandas). Arrow bodies may name the coordinates ``lon, lat`` (or ``x, y``). ``/status.json`` and the status
page say the CRS and the units.

A single point (``"points": [x, y]``) gets a single answer (``"ids": [...]``); a list of points gets a list of
answers, in order. Batches can also travel as Arrow IPC streams (``Content-Type:
application/vnd.apache.arrow.stream``): a table with columns ``x, y[, z]`` (``x0, x1, ...`` above 3
dimensions; ``?columns=lon,lat`` picks others), parameters in the query string (``/knn?k=5``,
``/range?radius=0.1`` or a ``radius`` column, ``/box``: columns ``lo_x, lo_y, hi_x, hi_y``, ``/ingest``: optional
``id`` and ``timestamp`` columns). The answer is then an Arrow stream too, in long format as the command line
writes it: ``query, rank, id, distance`` for kNN, ``query, id, distance`` for range, ``query, id`` for box.
``Accept: application/json`` or ``Accept: application/vnd.apache.arrow.stream`` chooses the answer's format
for either kind of request.

Bad requests get a 4xx answer ``{"detail": "what is wrong and how to fix it"}``: 400 malformed JSON or Arrow,
413 body larger than ``max_body_bytes``, 415 unsupported content type, 422 a well-formed request that cannot
be answered (wrong shape or dimension, non-finite coordinates, ``k`` larger than the number of points, unknown
fields); 503 while no data is distributed or partitions are lost. The cluster's methods block, so they run in a
thread pool (``workers`` threads): concurrent clients are served concurrently, the event loop never waits.

Concurrent ``/knn`` requests (and, separately, ``/range`` and ``/box``) are coalesced like Ray Serve's
``@serve.batch``: the first request of a batch waits at most ``batch_wait_ms`` for others, a batch holds at most
``max_batch`` query points (a larger request goes alone), and one cluster call answers it; kNN requests with
different ``k`` share a batch answered with the largest ``k`` and cut back per request (equal distances in id
order). Requests are validated before they join a batch, so a bad one never fails the others. Admission: at most
``max_queue`` requests are queued or being answered at once; one more gets 503 with ``Retry-After`` right away.
A body not received ``body_timeout_s`` after the headers gets 408 (connection closed); a request not answered
within ``request_timeout_s`` gets 504. ``GET /stats`` counts batches (sizes), refusals and timeouts under
``service``.

Access control (``create_app(tokens=..., read_only=..., cors_origins=...)``, in front of every route and the direct
query path): with tokens (:mod:`distspatial.core.access`: ``read`` for queries, statistics and the status page,
``write`` also for ``/ingest`` and ``/delete``) a request needs ``Authorization: Bearer <token>``: 401 without a
valid one, 403 with a read token on a write, both with ``{"detail": ...}`` and ``WWW-Authenticate``. ``/``,
``/docs``, ``/openapi.json`` and ``/health`` (status and reason only) need none. ``read_only``: 405 on writes.
A write from a web page of another origin gets 403 unless ``cors_origins`` allows it; there are no CORS headers
otherwise. Every answer carries ``X-Content-Type-Options: nosniff`` and a restrictive Content-Security-Policy.
Writes let through are logged to ``distspatial.audit``; ``GET /stats`` counts refusals per reason under
``service.access``. :func:`run_server` and :class:`BackgroundServer` refuse a non-loopback host without tokens
unless ``read_only`` or ``insecure_no_auth`` (:func:`check_exposure`).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import functools
import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Callable

import numpy as np

try:
    import uvicorn
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, Response
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the HTTP service needs FastAPI and uvicorn ({_exc}); install them with: pip install 'distspatial[serve]'"
    ) from _exc

try:  # a faster JSON library (the 'serve' extra); the standard json module otherwise, with the same answers
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

from ..core.access import TokenSet, load_token_file
from ..core.errors import AccessDeniedError, DistSpatialError, NotDistributedError

__all__ = [
    "create_app", "run_server", "BackgroundServer", "RequestError", "ServiceMetrics", "StatusCollector",
    "coordinate_names", "listen", "ARROW_STREAM", "NODE_COLORS", "check_exposure", "is_loopback", "REFUSAL_REASONS",
    "GEOJSON_TYPE",
]

#: every write the service lets through is logged here (INFO): time, client, token name, endpoint, points
audit_log = logging.getLogger("distspatial.audit")

ARROW_STREAM = "application/vnd.apache.arrow.stream"
JSON_TYPE = "application/json"
GEOJSON_TYPE = "application/geo+json"
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
DEFAULT_MAX_RESULTS = 20_000_000  # neighbours (m * k) one kNN answer may hold
DEFAULT_BATCH_WAIT_MS = 1.0  # how long the first request of a coalesced batch waits for others
DEFAULT_MAX_BATCH = 256  # most query points in one coalesced batch; larger requests go to the cluster alone
DEFAULT_MAX_CONCURRENT_BATCHES = 2  # coalesced batches of one kind running at once; the next one fills meanwhile
DEFAULT_MAX_QUEUE = 256  # requests admitted at once (queued + in flight); more get 503 with Retry-After
DEFAULT_BODY_TIMEOUT_S = 10.0  # a request body must have arrived this long after its headers (else 408)
DEFAULT_REQUEST_TIMEOUT_S = 30.0  # a request not answered this long after its body arrived gets 504
#: node colours of the status page and :mod:`distspatial.ui.plots` (matplotlib's tab10), node id modulo 10.
NODE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
               "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


class RequestError(Exception):
    """A request the service refuses: ``status`` (4xx/503) and a message saying what is wrong (``headers``: extra
    response headers, e.g. ``Retry-After``)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def coordinate_names(dim: int) -> list[str]:
    """Arrow column names of the coordinates: ``x, y, z`` up to 3 dimensions, else ``x0, x1, ...``."""
    return ["x", "y", "z"][:dim] if dim <= 3 else [f"x{j}" for j in range(dim)]


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays, tuples, dataclasses, int keys; NaN and infinities -> None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def _plain(obj: Any) -> Any:
    """``obj`` with numpy arrays as lists (non-finite floats as None): what the json module can write."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "f" and not np.isfinite(obj).all():
            return _jsonable(obj)
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return _jsonable(obj) if isinstance(obj, (np.generic, float)) else obj


def _dumps(obj: Any) -> bytes:
    """Compact JSON of plain types and numpy arrays (written whole by orjson, no Python object per number; NaN
    and infinities as null either way)."""
    if _orjson is not None:
        try:
            return _orjson.dumps(obj, option=_orjson.OPT_SERIALIZE_NUMPY)
        except TypeError:  # e.g. a non-contiguous array or an unusual dtype: the portable path below
            pass
    return json.dumps(_plain(obj), separators=(",", ":"), allow_nan=False).encode()


def _json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_dumps(obj), status_code=status, media_type=JSON_TYPE, headers=headers)


def _error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json_response({"detail": message}, status, headers)


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
            from ..core.crs import resolve_crs

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


# -- request parsing -----------------------------------------------------------------------------------------------
def _media_type(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 when it is larger than ``limit`` (the rest is drained a little, so the client reads the
    answer instead of a reset connection)."""
    declared = request.headers.get("content-length")
    too_big = None
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise RequestError(400, f"Content-Length {declared!r} is not an integer") from None
        if n > limit:
            too_big = n
    chunks, total = [], 0
    drain_limit = limit + 16 * 2**20
    async for chunk in request.stream():
        total += len(chunk)
        if too_big is None and total > limit:
            too_big = total
        if too_big is not None:
            if total > drain_limit:
                break
            continue
        chunks.append(chunk)
    if too_big is not None:
        raise RequestError(413, f"the request body is {'at least ' if declared is None else ''}{too_big:,} bytes, "
                                f"more than this service's limit of {limit:,} bytes; send the batch in smaller parts "
                                f"(or start the service with a larger --max-body-mb)")
    return b"".join(chunks)


def _body_kind(request: Request) -> str:
    ctype = _media_type(request.headers.get("content-type"))
    if ctype in ("", JSON_TYPE) or ctype.endswith("+json"):
        return "json"
    if ctype == ARROW_STREAM:
        return "arrow"
    raise RequestError(415, f"unsupported Content-Type {ctype!r}: send {JSON_TYPE} (a JSON object) or {ARROW_STREAM} "
                            f"(an Arrow IPC stream)")


def _wants_arrow(request: Request, body_kind: str) -> bool:
    accept = (request.headers.get("accept") or "").lower()
    a, j = accept.find(ARROW_STREAM), accept.find(JSON_TYPE)
    if a >= 0 and (j < 0 or a < j):
        return True
    if j >= 0:
        return False
    return body_kind == "arrow"


def _parse_json(body: bytes, example: str) -> dict[str, Any]:
    if _orjson is not None:  # the fast path; anything it refuses (NaN, huge integers, bad UTF-8, malformed JSON)
        try:               # is read again below, so the answer and its message are the json module's
            obj = _orjson.loads(body)
        except (_orjson.JSONDecodeError, RecursionError):
            pass
        else:
            if isinstance(obj, dict):
                return obj
    if not body.strip():
        raise RequestError(400, f"the request body is empty; send a JSON object such as {example}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"the request body is not UTF-8 text ({exc}); send a JSON object such as "
                                f"{example}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}; send a JSON "
                                f"object such as {example}") from None
    except RecursionError:
        raise RequestError(400, "malformed JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise RequestError(422, f"the JSON body must be an object such as {example}, got a "
                                f"{type(obj).__name__}")
    return obj


def _check_fields(obj: dict, allowed: tuple[str, ...]) -> None:
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        raise RequestError(422, f"unknown field(s) {', '.join(map(repr, unknown))}; this endpoint takes "
                                f"{', '.join(map(repr, allowed))}")


def _check_finite(arr: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        row = int(np.flatnonzero(bad.reshape(len(arr), -1).any(axis=1))[0])
        n_bad = int(bad.reshape(len(arr), -1).any(axis=1).sum())
        raise RequestError(422, f"{name}: row {row} holds a non-finite value ({arr[row].tolist()}); coordinates must "
                                f"be finite numbers ({n_bad} row(s) are not)")


def _json_coords(obj: dict, name: str, dim: int) -> tuple[np.ndarray, bool]:
    """``(array (m, dim), single)`` from a JSON field holding a point or a list of points."""
    if name not in obj or obj[name] is None:
        raise RequestError(422, f"missing field {name!r}: a point [{', '.join(['x', 'y', 'z'][:dim] or ['x'])}] or a "
                                f"list of points")
    value = obj[name]
    shape_hint = f"a point with {dim} coordinates or a list of such points, e.g. [[{', '.join(['0.5'] * dim)}]]"
    if not isinstance(value, list):
        raise RequestError(422, f"{name} must be {shape_hint}; got a {type(value).__name__}")
    try:
        arr = np.array(value)
    except (ValueError, OverflowError, TypeError):
        raise RequestError(422, f"{name} is ragged or not numeric: it must be {shape_hint}, every point with the same "
                                f"number of coordinates") from None
    if arr.dtype.kind not in "iuf" or arr.dtype == bool:
        what = "strings" if arr.dtype.kind in "US" else ("booleans" if arr.dtype == bool else "nested lists of "
                                                                                           "different lengths or non-numbers")
        raise RequestError(422, f"{name} must hold numbers only, got {what}; it must be {shape_hint}")
    if arr.size == 0:
        raise RequestError(422, f"{name} is empty; it must be {shape_hint}")
    single = arr.ndim == 1
    if single:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        raise RequestError(422, f"{name} has shape {list(arr.shape)} (nested {arr.ndim} deep); it must be {shape_hint}")
    if arr.shape[1] != dim:
        raise RequestError(422, f"{name}: each point needs {dim} coordinates (the index holds {dim}-D points), got "
                                f"{arr.shape[1]}" + (" (a single point)" if single else f" (shape {list(arr.shape)})"))
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    _check_finite(arr, name)
    return arr, single


def _check_lonlat(arr: np.ndarray, name: str, geographic: bool) -> np.ndarray:
    """A geographic data set's coordinates ``(m, 2)``: longitude, latitude in degrees, |latitude| <= 90 (422
    naming the row otherwise); longitudes outside [-180, 180] are wrapped by the cluster."""
    if geographic:
        bad = np.flatnonzero(np.abs(arr[:, 1]) > 90.0)
        if len(bad):
            i = int(bad[0])
            raise RequestError(422, f"{name}: row {i} has latitude {float(arr[i, 1])!r} outside [-90, 90]; this data "
                                    f"set is longitude, latitude in degrees (longitude first: were they swapped?)")
    return arr


def _param(obj: dict, request: Request, name: str) -> Any:
    """A parameter from the JSON body, else from the query string (``None`` when absent)."""
    if name in obj:
        return obj[name]
    return request.query_params.get(name)


def _as_k(value: Any, n_points: int) -> int:
    if value is None:
        raise RequestError(422, "missing k: the number of neighbours per point (JSON field \"k\" or ?k=)")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise RequestError(422, f"k must be a positive integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float)
                                                                          and not value.is_integer()):
        raise RequestError(422, f"k must be a positive integer, got {json.dumps(value)}")
    k = int(value)
    if k < 1:
        raise RequestError(422, f"k must be >= 1, got {k}")
    if k > n_points:
        raise RequestError(422, f"k={k} is larger than the number of points in the index ({n_points:,}); use "
                                f"k <= {n_points:,}")
    return k


def _as_radius(value: Any, m: int) -> np.ndarray:
    if value is None:
        raise RequestError(422, "missing radius: a number >= 0, or one per point (JSON field \"radius\" or ?radius=)")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise RequestError(422, f"radius must be a number >= 0, got {value!r}") from None
    if isinstance(value, bool):
        raise RequestError(422, "radius must be a number >= 0, got a boolean")
    try:
        r = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise RequestError(422, f"radius must be a number >= 0 or a list of one per point, got "
                                f"{json.dumps(value)[:80]}") from None
    if r.ndim == 0:
        r = np.full(m, float(r))
    if r.shape != (m,):
        raise RequestError(422, f"radius must be one number or one per point ({m}), got shape {list(r.shape)}")
    if not np.isfinite(r).all() or (r < 0).any():
        raise RequestError(422, f"radius must be finite and >= 0, got {r[~(np.isfinite(r) & (r >= 0))][0]}")
    return r


def _as_ids(value: Any, n: int, name: str = "ids") -> np.ndarray:
    if not isinstance(value, list):
        raise RequestError(422, f"{name} must be a list of integers, got a {type(value).__name__}")
    if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise RequestError(422, f"{name} must hold integers only")
    try:
        ids = np.array(value, dtype=np.int64).reshape(-1)
    except OverflowError:
        raise RequestError(422, f"{name} must fit in 64-bit signed integers") from None
    if n >= 0 and len(ids) != n:
        raise RequestError(422, f"{name} needs one id per point ({n}), got {len(ids)}")
    return ids


def _as_numbers(value: Any, n: int, name: str) -> np.ndarray:
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise RequestError(422, f"{name} must be a list of numbers, one per point")
    arr = np.array(value, dtype=np.float64).reshape(-1)
    if len(arr) != n:
        raise RequestError(422, f"{name} needs one value per point ({n}), got {len(arr)}")
    if not np.isfinite(arr).all():
        raise RequestError(422, f"{name} must be finite numbers")
    return arr


# -- Arrow --------------------------------------------------------------------------------------------------------
def _arrow_table(body: bytes) -> Any:
    import pyarrow as pa

    if not body:
        raise RequestError(400, "the request body is empty; send an Arrow IPC stream (pyarrow.ipc.new_stream)")
    try:
        with pa.ipc.open_stream(pa.BufferReader(body)) as reader:
            return reader.read_all()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise RequestError(400, f"the body is not a valid Arrow IPC stream ({' '.join(str(exc).split())[:200]}); write "
                                f"the table with pyarrow.ipc.new_stream") from None


def _arrow_column(table: Any, name: str, kind: str = "number") -> np.ndarray:
    import pyarrow as pa

    col = table.column(name)
    t = col.type
    ok = pa.types.is_integer(t) or (kind == "number" and pa.types.is_floating(t))
    if not ok:
        raise RequestError(422, f"Arrow column {name!r} has type {t}; it must hold "
                                f"{'numbers' if kind == 'number' else 'integers'}")
    if col.null_count:
        rows = np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))
        raise RequestError(422, f"Arrow column {name!r} holds {col.null_count} null value(s) (first in row "
                                f"{int(rows[0])}); every row needs a value")
    return col.to_numpy()


def _arrow_coords(table: Any, names: list[str], what: str = "points") -> np.ndarray:
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise RequestError(422, f"the Arrow table needs columns {', '.join(names)} ({len(names)}-D {what}); missing "
                                f"{', '.join(missing)}; it has {', '.join(table.column_names) or 'no columns'} "
                                f"(?columns=a,b picks other coordinate columns)")
    if table.num_rows == 0:
        raise RequestError(422, f"the Arrow table has no rows; send at least one of the {what}")
    arr = np.column_stack([_arrow_column(table, n).astype(np.float64) for n in names])
    _check_finite(arr, what)
    return np.ascontiguousarray(arr)


def _column_names(request: Request, dim: int, table: Any = None, geographic: bool = False,
                  prefix: str = "") -> list[str]:
    """Coordinate columns of an Arrow body: ``?columns=``, else ``x, y[, z]`` (a geographic data set's table may
    name them ``lon, lat`` instead; ``prefix``: ``lo_`` / ``hi_`` of box corners)."""
    given = request.query_params.get("columns")
    if not given:
        if geographic and table is not None and all(f"{prefix}{n}" in table.column_names for n in ("lon", "lat")):
            return ["lon", "lat"]
        return coordinate_names(dim)
    names = [c.strip() for c in given.split(",") if c.strip()]
    if len(names) != dim:
        raise RequestError(422, f"?columns= names {len(names)} column(s) ({', '.join(names)}) but the index holds "
                                f"{dim}-D points; name {dim}")
    return names


def _arrow_response(columns: dict[str, np.ndarray]) -> Response:
    import pyarrow as pa

    table = pa.table({k: pa.array(v) for k, v in columns.items()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return Response(sink.getvalue().to_pybytes(), media_type=ARROW_STREAM)


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
    they run, the next batch fills. Lives on the event loop's thread (no locks)."""

    def __init__(self, kind: str, run: Callable[[list[_Item]], list[Any]], pool: ThreadPoolExecutor,
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


class _Expired(Exception):
    """The time given to a request (or to its body) ran out."""


_HAS_TIMEOUT = hasattr(asyncio, "timeout")  # Python 3.11+


async def _within(seconds: float | None, aw: Any) -> Any:
    """``await aw``, raising :class:`_Expired` after ``seconds`` (``None`` or 0: no limit)."""
    if not seconds:
        return await aw
    if _HAS_TIMEOUT:
        cm = asyncio.timeout(seconds)
        try:
            async with cm:
                return await aw
        except TimeoutError:
            if cm.expired():
                raise _Expired() from None
            raise
    try:  # pragma: no cover - Python 3.10
        return await asyncio.wait_for(aw, seconds)
    except asyncio.TimeoutError:  # pragma: no cover
        raise _Expired() from None


def _request_error(exc: BaseException) -> BaseException:
    """The answer a cluster call's exception gets: a :class:`RequestError` (422 for a request the cluster finds
    invalid, 503 while it cannot answer), or ``exc`` itself for a bug (500)."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, NotDistributedError):
        return RequestError(503, f"{exc}")
    if isinstance(exc, AccessDeniedError):  # the named cluster behind the service wants its token
        return RequestError(403, f"the cluster refused the write: {' '.join(str(exc).split())}")
    if isinstance(exc, ValueError):
        return RequestError(422, " ".join(str(exc).split()))
    if isinstance(exc, DistSpatialError):
        return RequestError(503, f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    if isinstance(exc, RuntimeError) and "shut down" in str(exc):
        return RequestError(503, str(exc))
    return exc


# -- OpenAPI descriptions ------------------------------------------------------------------------------------------
_POINTS_SCHEMA = {
    "description": "a point [x, y, ...] or a list of points [[x, y, ...], ...]; finite numbers",
    "oneOf": [{"type": "array", "items": {"type": "number"}},
              {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}],
}
_ARROW_BODY = {"schema": {"type": "string", "format": "binary",
                          "description": "an Arrow IPC stream: a table with columns x, y[, z] (x0, x1, ... above 3-D; "
                                         "?columns= names others)"}}
_ERRORS = {
    400: {"description": "malformed JSON or Arrow body", "content": {JSON_TYPE: {"example": {"detail": "malformed "
                                                                                                      "JSON: ..."}}}},
    413: {"description": "body larger than the service's limit"},
    415: {"description": "unsupported Content-Type"},
    408: {"description": "the request body did not arrive within the body timeout (the connection is closed)"},
    422: {"description": "wrong shape, dimension or values; the detail says which"},
    503: {"description": "busy: the admission queue is full (retry after the Retry-After header's seconds); or no "
                         "data distributed yet, or partitions lost"},
    504: {"description": "not answered within the request timeout"},
}


def _doc(json_schema: dict, json_out: dict, arrow_out: str) -> dict:
    return {
        "openapi_extra": {"requestBody": {"required": True, "content": {JSON_TYPE: {"schema": json_schema},
                                                                        ARROW_STREAM: _ARROW_BODY}}},
        "responses": {200: {"description": "the answer", "content": {
            JSON_TYPE: {"schema": json_out},
            ARROW_STREAM: {"schema": {"type": "string", "format": "binary", "description": arrow_out}}}},
            **_ERRORS},
    }


_KNN_DOC = _doc(
    {"type": "object", "required": ["points", "k"], "properties": {
        "points": _POINTS_SCHEMA, "k": {"type": "integer", "minimum": 1, "description": "neighbours per point"}},
     "example": {"points": [[0.5, 0.5], [0.1, 0.2]], "k": 5}},
    {"type": "object", "properties": {"distances": {"type": "array"}, "ids": {"type": "array"}}},
    "columns query, rank (1 = nearest), id, distance",
)
_RANGE_DOC = _doc(
    {"type": "object", "required": ["points", "radius"], "properties": {
        "points": _POINTS_SCHEMA,
        "radius": {"oneOf": [{"type": "number", "minimum": 0}, {"type": "array", "items": {"type": "number"}}]}},
     "example": {"points": [[0.5, 0.5]], "radius": 0.05}},
    {"type": "object", "properties": {"ids": {"type": "array"}, "distances": {"type": "array"}}},
    "columns query, id, distance",
)
_BOX_DOC = _doc(
    {"type": "object", "required": ["lo", "hi"], "properties": {"lo": _POINTS_SCHEMA, "hi": _POINTS_SCHEMA},
     "example": {"lo": [0.1, 0.1], "hi": [0.2, 0.3]}},
    {"type": "object", "properties": {"ids": {"type": "array"}}},
    "columns query, id (request columns lo_x, lo_y, hi_x, hi_y)",
)
_POLYGON_SCHEMA = {
    "type": "object", "required": ["type"],
    "description": "a GeoJSON Polygon or MultiPolygon geometry (holes allowed), or a Feature holding one; longitude/"
                   "latitude degrees for a geographic data set (edges straight in lon/lat, as in GeoPandas). "
                   "Optional member predicate (or ?predicate=): 'within' (interior: points on an edge or vertex "
                   "are not in it; default) or 'intersects' (interior or boundary), as geopandas.sjoin",
    "properties": {"type": {"type": "string", "enum": ["Polygon", "MultiPolygon", "Feature"]},
                   "coordinates": {"type": "array"}, "geometry": {"type": "object"},
                   "properties": {"type": "object"},
                   "predicate": {"type": "string", "enum": ["within", "intersects"]}},
    "example": {"type": "Polygon", "coordinates": [[[0.1, 0.1], [0.4, 0.1], [0.4, 0.3], [0.1, 0.1]]]},
}
_POLYGON_DOC = {
    "openapi_extra": {"requestBody": {"required": True, "content": {JSON_TYPE: {"schema": _POLYGON_SCHEMA},
                                                                    GEOJSON_TYPE: {"schema": _POLYGON_SCHEMA}}}},
    "responses": {200: {"description": "the ids of the points in the polygon, sorted", "content": {
        JSON_TYPE: {"schema": {"type": "object", "properties": {
            "ids": {"type": "array", "items": {"type": "integer"}}, "count": {"type": "integer"}}}},
        ARROW_STREAM: {"schema": {"type": "string", "format": "binary", "description": "column id"}}}},
        **{k: v for k, v in _ERRORS.items() if k != 415},
        415: {"description": "a body that is not JSON (application/json or application/geo+json)"},
        501: {"description": "the service lacks shapely (pip install 'distspatial[geo]')"}},
}
#: GeoJSON members /polygon reads (collections' members too, so that their type gets the message)
_POLYGON_FIELDS = ("type", "coordinates", "geometry", "properties", "id", "bbox", "predicate", "features",
                   "geometries")
_INGEST_DOC = _doc(
    {"type": "object", "required": ["points"], "properties": {
        "points": _POINTS_SCHEMA, "ids": {"type": "array", "items": {"type": "integer"}},
        "timestamps": {"type": "array", "items": {"type": "number"}}},
     "example": {"points": [[0.5, 0.5]], "ids": [1000001]}},
    {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer"}},
                                      "n_points": {"type": "integer"}}},
    "column id (request: optional id and timestamp columns)",
)


# -- the app -------------------------------------------------------------------------------------------------------
#: endpoints that change the data: the write scope, 405 on a read-only service (every path not listed here or in
#: PUBLIC_PATHS needs the read scope: a new endpoint that changes the data must be added here)
WRITE_PATHS = frozenset(("/ingest", "/delete", "/update"))
#: answered without a token: the status page's HTML (it holds no data; it asks for a token), the API docs and
#: the OpenAPI spec, and /health (status and reason only, the details with a read token)
PUBLIC_PATHS = frozenset(("/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/health"))
_DOC_PAGES = frozenset(("/docs", "/docs/oauth2-redirect", "/redoc"))
#: the interactive API pages load Swagger UI / ReDoc from their CDN and run an inline script
_DOCS_CSP = ("default-src 'none'; script-src 'unsafe-inline' https://cdn.jsdelivr.net; style-src 'unsafe-inline' "
             "https://cdn.jsdelivr.net https://fonts.googleapis.com; font-src https://fonts.gstatic.com; img-src "
             "'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; connect-src 'self'; worker-src blob:; "
             "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def _page_csp(page: str) -> str:
    """The Content-Security-Policy of every answer but the API docs: nothing may load or run but the status
    page's own inline script and style (allowed by their SHA-256, so an injected one would not run), fetches
    to this origin only, no framing, no form submission, no plugins."""
    scripts = " ".join(_csp_hash(t) for t in re.findall(r"<script>(.*?)</script>", page, re.S)) or "'none'"
    styles = " ".join(_csp_hash(t) for t in re.findall(r"<style>(.*?)</style>", page, re.S)) or "'none'"
    return (f"default-src 'none'; script-src {scripts}; style-src {styles}; connect-src 'self'; img-src 'self' "
            f"data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _header(scope: Any, name: bytes) -> str | None:
    for k, v in scope.get("headers") or ():
        if k == name:
            return v.decode("latin-1")
    return None


class _AccessGuard:
    """Access control in front of every route (the FastAPI ones and the direct query path): tokens and their
    scopes, read-only mode, writes from other web origins, CORS; and the security headers of every answer.

    ``check(scope, path)`` returns ``None`` for a request that may go on (its token, a :class:`Token` or
    ``None``, is left in ``scope["distspatial.principal"]``), else the response to send instead (401, 403, 405,
    or a CORS preflight answer). Refusals are counted in ``metrics`` per reason."""

    def __init__(self, tokens: TokenSet | None, read_only: bool, cors_origins: tuple[str, ...],
                 metrics: ServiceMetrics, page_csp: str) -> None:
        self.tokens, self.read_only, self.metrics = tokens, read_only, metrics
        self.cors = tuple(o.rstrip("/") for o in cors_origins)
        self.cors_any = "*" in self.cors
        common = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                  (b"referrer-policy", b"no-referrer")]
        self.headers = common + [(b"content-security-policy", page_csp.encode())]
        self.doc_headers = common + [(b"content-security-policy", _DOCS_CSP.encode())]

    def allowed_origin(self, origin: str) -> bool:
        return self.cors_any or origin.rstrip("/") in self.cors

    def sender(self, send: Callable, path: str, origin: str | None) -> Callable:
        """``send`` adding the security headers (and CORS ones for an allowed origin) to the response start."""
        extra = self.doc_headers if path in _DOC_PAGES else self.headers
        if origin is not None and self.cors and self.allowed_origin(origin):
            extra = extra + [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                             (b"access-control-expose-headers", b"Retry-After, WWW-Authenticate")]

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        return send_with_headers

    def refuse(self, reason: str, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        self.metrics.refuse(reason)
        return _error_response(status, message, headers)

    def check(self, scope: Any, path: str, origin: str | None) -> Response | None:
        method = scope["method"]
        if method == "OPTIONS" and origin is not None and _header(scope, b"access-control-request-method"):
            return self.preflight(origin)
        write = path in WRITE_PATHS
        if write and self.read_only:
            return self.refuse("read_only", 405, f"this service is read-only (--read-only): {method} {path} changes "
                                                 f"the data; send writes to a service that is not read-only",
                               {"Allow": ""})
        if (write and origin is not None and method not in ("GET", "HEAD")
                and not self.same_origin(scope, origin) and not (self.cors and self.allowed_origin(origin))):
            shown = origin if len(origin) <= 80 else origin[:80] + "..."
            return self.refuse("cross_origin", 403, f"a {method} {path} from a web page at another origin ({shown}) "
                                                    f"may not change the data here; start the service with "
                                                    f"--cors-origin ORIGIN to allow a page's origin")
        principal = None
        auth = _header(scope, b"authorization") if self.tokens is not None else None
        if auth is not None:
            scheme, _, presented = auth.strip().partition(" ")
            presented = presented.strip()
            if scheme.lower() != "bearer" or not presented:
                if path not in PUBLIC_PATHS:
                    return self.refuse("invalid_token", 401, "the Authorization header must be 'Bearer <token>'",
                                       {"WWW-Authenticate": 'Bearer realm="distspatial", error="invalid_request"'})
            else:
                principal = self.tokens.check(presented)
                if principal is None and path not in PUBLIC_PATHS:
                    return self.refuse("invalid_token", 401, "the token sent is not one this service accepts; check "
                                                             "the token (a new token file needs a restart)",
                                       {"WWW-Authenticate": 'Bearer realm="distspatial", error="invalid_token"'})
        scope["distspatial.principal"] = principal
        if self.tokens is None or path in PUBLIC_PATHS:
            return None
        if principal is None:
            return self.refuse("missing_token", 401, "this service needs a token: send the header 'Authorization: "
                                                     "Bearer <token>'",
                               {"WWW-Authenticate": 'Bearer realm="distspatial"'})
        if write and not principal.allows("write"):
            return self.refuse("insufficient_scope", 403, f"token {principal.name!r} has the {principal.scope} "
                                                          f"scope; {method} {path} changes the data and needs a "
                                                          f"token with the write scope",
                               {"WWW-Authenticate": 'Bearer realm="distspatial", error="insufficient_scope", '
                                                    'scope="write"'})
        return None

    @staticmethod
    def same_origin(scope: Any, origin: str) -> bool:
        """The page that sent the request was served from here (its origin's host:port is the request's Host;
        behind a proxy that keeps the Host header, the public name)."""
        host = _header(scope, b"host")
        if host is None:
            return False
        netloc = origin.split("://", 1)[-1].rstrip("/")
        if netloc == host:
            return True
        defaults = {"http": "80", "https": "443"}
        scheme = origin.split("://", 1)[0].lower()
        return ":" not in netloc.rsplit("]", 1)[-1] and f"{netloc}:{defaults.get(scheme, '')}" == host

    def preflight(self, origin: str) -> Response:
        if not self.cors or not self.allowed_origin(origin):
            return self.refuse("cross_origin", 403, "cross-origin requests are not allowed here (start the service "
                                                    "with --cors-origin ORIGIN to allow a web page's origin)")
        return Response(status_code=204, headers={
            "Access-Control-Allow-Methods": "GET, POST", "Access-Control-Max-Age": "600",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, Accept"})


class _ServiceApp(FastAPI):
    """FastAPI with a short path for the query endpoints: ``POST /knn``, ``/range`` and ``/box`` go straight to
    their handlers (the same code the FastAPI routes run; the routes stay for the OpenAPI spec), skipping the
    middleware stack, routing and parameter injection, which cost more than the handler itself. Every HTTP
    request, on either path, first passes :class:`_AccessGuard`."""

    _direct: dict[str, Callable[[Request], Any]]
    _guard: _AccessGuard

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # lifespan
            await super().__call__(scope, receive, send)
            return
        path = scope["path"]
        root = scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root):]
        origin = _header(scope, b"origin")
        send = self._guard.sender(send, path, origin)
        refused = self._guard.check(scope, path, origin)
        if refused is not None:
            await refused(scope, receive, send)
            return
        if scope["method"] == "POST":
            direct = self._direct.get(path)
            if direct is not None:
                response = await direct(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _status_page() -> str:
    return resources.files("distspatial").joinpath("ui/static/status.html").read_text(encoding="utf-8")


def create_app(
    cluster: Any,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    workers: int = 8,
    max_results: int = DEFAULT_MAX_RESULTS,
    status_interval_s: float = 0.5,
    coalesce: bool = True,
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_concurrent_batches: int = DEFAULT_MAX_CONCURRENT_BATCHES,
    max_queue: int = DEFAULT_MAX_QUEUE,
    retry_after_s: int = 1,
    body_timeout_s: float | None = DEFAULT_BODY_TIMEOUT_S,
    request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S,
    tokens: TokenSet | str | os.PathLike | None = None,
    read_only: bool = False,
    cors_origins: tuple[str, ...] | list[str] = (),
) -> FastAPI:
    """The ASGI app serving ``cluster`` (see the module docstring for the endpoints).

    Args:
        cluster: a running :class:`~distspatial.DistributedSpatialCluster` (data may be distributed later).
        max_body_bytes: larger request bodies get 413.
        workers: threads running the cluster's (blocking) calls; more concurrent batches wait for one.
        max_results: most neighbours (points x k) one kNN request may ask for (422 above).
        status_interval_s: ``/status.json`` is recomputed at most this often, however many viewers poll it.
        coalesce: gather concurrent ``/knn`` (and, separately, ``/range``, ``/box``) requests into one cluster
            call each; ``False``: one call per request.
        batch_wait_ms: how long the first request of a coalesced batch waits for others (0: none; requests
            arriving while ``max_concurrent_batches`` batches run still gather).
        max_batch: most query points in one coalesced batch; a request with more goes to the cluster alone.
        max_concurrent_batches: coalesced batches of one kind running at once.
        max_queue: requests admitted at once (``/knn``, ``/range``, ``/box``, ``/ingest``, ``/delete``, queued
            or being answered, counted once their body arrived); more get 503 with ``Retry-After`` at once.
        retry_after_s: the ``Retry-After`` header of those 503 answers (seconds).
        body_timeout_s: a request whose body has not arrived this long after its headers gets 408 and its
            connection is closed (``None``: no limit).
        request_timeout_s: a request not answered this long after its headers arrived gets 504 (408 if its
            body was still arriving; ``None``: no limit). A cluster call already under way finishes; its answer
            is dropped.
        tokens: the tokens requests must carry (``Authorization: Bearer <token>``): a :class:`TokenSet` or the
            path of a token file (:mod:`distspatial.core.access`). ``read`` tokens may query, ``write`` tokens
            may also ingest and delete; 401 without a valid token, 403 for a read token on a write. ``None``:
            no tokens (see :func:`check_exposure` before listening beyond this machine).
        read_only: answer 405 to every write endpoint (a query replica).
        cors_origins: web origins (``https://app.example.com``; ``*``: any) whose pages may call this service
            from a browser (CORS). Default: none; writes from pages of other origins get 403.

    Every answer carries ``X-Content-Type-Options: nosniff`` and a restrictive Content-Security-Policy; every
    write let through is logged to the ``distspatial.audit`` logger (time, client address, token name,
    endpoint, status, points affected), and ``GET /stats`` counts refused requests per reason under
    ``service.access``.

    The app's ``state`` holds ``cluster``, ``metrics`` (:class:`ServiceMetrics`) and ``pool`` (the executor).
    """
    for name, v in (("max_queue", max_queue), ("max_batch", max_batch), ("workers", workers),
                    ("max_concurrent_batches", max_concurrent_batches)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if batch_wait_ms < 0:
        raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="distspatial-http")
    metrics = ServiceMetrics()
    status = StatusCollector(cluster, metrics, status_interval_s)
    page = _status_page()
    if tokens is not None and not isinstance(tokens, TokenSet):
        tokens = load_token_file(tokens)
    cors = tuple(str(o) for o in cors_origins)
    metrics.access_mode = {"auth": "token" if tokens is not None else "none", "read_only": bool(read_only),
                           "cors": list(cors), "tokens": tokens.scopes() if tokens is not None else {}}
    admitted = 0  # requests admitted now (the event loop's thread alone changes it)
    metrics.max_queue = max_queue
    metrics.admitted = lambda: admitted
    retry_header = {"Retry-After": str(int(retry_after_s))}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    app = _ServiceApp(
        title="distspatial query service",
        version=_version(),
        description="Exact kNN, range, box and polygon queries, live ingest, statistics and health of a distributed "
                    "spatial index. JSON or Arrow IPC stream bodies (Content-Type application/vnd.apache.arrow.stream)"
                    ". A geographic data set takes longitude/latitude degrees and answers distances in metres.",
        lifespan=lifespan,
    )
    app.state.cluster, app.state.metrics, app.state.pool, app.state.status = cluster, metrics, pool, status
    app._guard = _AccessGuard(tokens, bool(read_only), cors, metrics, _page_csp(page))
    if tokens is not None:  # the API docs page gets an "Authorize" button for the token
        def openapi() -> dict[str, Any]:
            if app.openapi_schema is None:
                schema = FastAPI.openapi(app)
                schema.setdefault("components", {})["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer",
                               "description": "a read token (queries) or a write token (also ingest, delete)"}}
                schema["security"] = [{"bearer": []}]
            return app.openapi_schema

        app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(RequestError)
    async def _request_error_handler(request: Request, exc: RequestError) -> Response:
        return _error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for e in exc.errors():
            loc = " ".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body"))
            parts.append(f"{e.get('loc', ['?'])[0]} parameter {loc}: {e.get('msg', 'invalid')}")
        return _error_response(422, "; ".join(parts) or "invalid request")

    async def blocking(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(pool, functools.partial(fn, *args, **kwargs))
        except Exception as exc:
            mapped = _request_error(exc)
            if mapped is exc:
                raise
            raise mapped from None

    def meta() -> Any:
        """The metadata of this client's view (no call to the controller: the query is planned on the same
        view, and a node refuses a stale one); the controller is asked only while the view has no data."""
        rt = cluster.runtime
        m = None if rt.closed else rt.meta
        if m is not None:
            return m
        try:
            return cluster.metadata
        except NotDistributedError as exc:
            raise RequestError(503, str(exc)) from None
        except RuntimeError as exc:
            raise RequestError(503, str(exc)) from None

    async def handle(request: Request, endpoint: str, work: Callable[[Request], Any]) -> Response:
        """Run ``work`` (a coroutine function returning ``(response, n_queries)``) within the request timeout,
        count and time it; errors become their JSON answers."""
        nonlocal admitted
        t0 = time.perf_counter()
        scope = request.scope
        try:
            response, n = await _within(request_timeout_s, work(request))
        except RequestError as exc:
            metrics.record(endpoint, 0, time.perf_counter() - t0, False)
            return _error_response(exc.status, exc.message, exc.headers)
        except _Expired:
            metrics.record(endpoint, 0, time.perf_counter() - t0, False)
            if not scope.get("distspatial.body"):
                metrics.count("body_timeouts")
                return _error_response(408, f"the request body did not arrive within the request timeout "
                                            f"({request_timeout_s:g} s)", {"Connection": "close"})
            metrics.count("request_timeouts")
            return _error_response(504, f"the request was not answered within {request_timeout_s:g} s (the "
                                        f"service's request timeout); the cluster may be overloaded or "
                                        f"recovering: retry later, or send smaller batches")
        except Exception as exc:  # a bug: say what, never hang the client
            metrics.record(endpoint, 0, time.perf_counter() - t0, False)
            return _error_response(500, f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:500]}")
        finally:
            if scope.get("distspatial.admitted"):
                admitted -= 1
        metrics.record(endpoint, n, time.perf_counter() - t0, True)
        return response

    def admit(request: Request) -> None:
        """Count the request in, or refuse it at once (503, ``Retry-After``) when ``max_queue`` are in."""
        nonlocal admitted
        if admitted >= max_queue:
            metrics.count("refused")
            raise RequestError(503, f"the service is busy: {max_queue} requests are already queued or being answered "
                                    f"(its admission limit, --max-queue); retry after {int(retry_after_s)} s",
                               retry_header)
        admitted += 1
        request.scope["distspatial.admitted"] = True

    async def read(request: Request, example: str, fields: tuple[str, ...],
                   admission: bool = True) -> tuple[str, dict, Any]:
        try:
            body = await _within(body_timeout_s, _read_body(request, max_body_bytes))
        except _Expired:
            metrics.count("body_timeouts")
            raise RequestError(408, f"the request body did not arrive within {body_timeout_s:g} s of its headers "
                                    f"(the service's body timeout, --body-timeout-s); the connection is closed",
                               {"Connection": "close"}) from None
        request.scope["distspatial.body"] = True
        if admission:
            admit(request)
        kind = _body_kind(request)
        parse = functools.partial(_parse_json, body, example) if kind == "json" else functools.partial(_arrow_table,
                                                                                                        body)
        # large bodies are decoded in the pool, so the event loop keeps serving other clients meanwhile
        parsed = parse() if len(body) < 256 * 1024 else await asyncio.get_running_loop().run_in_executor(pool, parse)
        if kind == "json":
            _check_fields(parsed, fields)
            return kind, parsed, None
        return kind, {}, parsed

    # -- batches: one cluster call for many requests, answers cut back per request ---------------------------------
    def answers(run: Callable[[list[_Item]], list[Any]]) -> Callable[[list[_Item]], list[Any]]:
        """``run`` for a batch; when the cluster refuses the batch as invalid (a ValueError: e.g. ``k`` larger
        than the points left after a delete), each request is tried alone, so only the faulty one fails."""
        def batch(items: list[_Item]) -> list[Any]:
            try:
                return run(items)
            except ValueError:
                if len(items) == 1:
                    raise
            out: list[Any] = []
            for item in items:
                try:
                    out.extend(run([item]))
                except Exception as exc:  # noqa: BLE001 - this request's own error; the others still get their answers
                    out.append(exc)
            return out
        return batch

    def geographic() -> bool:
        m = cluster.runtime.meta
        return bool(m is not None and m.geographic)

    def stacked(items: list[_Item], j: int) -> np.ndarray:
        return items[0].args[j] if len(items) == 1 else np.concatenate([it.args[j] for it in items])

    def run_knn(items: list[_Item]) -> list[Response]:
        q = stacked(items, 0)
        kmax = max(it.args[1] for it in items)
        dist, ids = cluster.distributed_knn_search(q, kmax)
        dist, ids = _ties_by_id(np.asarray(dist), np.asarray(ids))
        out, off = [], 0
        for it in items:
            k = it.args[1]
            d, i = dist[off:off + it.n, :k], ids[off:off + it.n, :k]
            off += it.n
            if it.arrow:
                from ..io.files import knn_table

                out.append(_arrow_response(knn_table(d, i)))
            else:
                d, i = (d[0], i[0]) if it.single else (d, i)
                out.append(_json_response({"distances": np.ascontiguousarray(d), "ids": np.ascontiguousarray(i)}))
        return out

    def run_range(items: list[_Item]) -> list[Response]:
        q = stacked(items, 0)
        found = cluster.range_search(q, stacked(items, 1), return_points=True)
        ids = [f[0] for f in found]
        pts = [f[1] for f in found]
        if ids:  # every hit's distance to its centre in one vectorized pass (lon/lat: great-circle metres)
            allp = np.concatenate(pts).reshape(-1, q.shape[1])
            centres = np.repeat(q, np.fromiter((len(p) for p in pts), dtype=np.int64, count=len(pts)), axis=0)
            if geographic():
                from ..core.geo import great_circle_metres

                flat = great_circle_metres(allp, centres)
            else:
                flat = np.sqrt(((allp - centres) ** 2).sum(axis=1))
            dists = np.split(flat, _splits(pts))
        else:
            dists = []
        out, off = [], 0
        for it in items:
            ii, dd = ids[off:off + it.n], dists[off:off + it.n]
            off += it.n
            if it.arrow:
                from ..io.files import range_table

                out.append(_arrow_response(range_table(ii, dd)))
            else:
                out.append(_json_response({"ids": ii[0], "distances": dd[0]} if it.single
                                          else {"ids": ii, "distances": dd}))
        return out

    def run_box(items: list[_Item]) -> list[Response]:
        found = cluster.box_search(stacked(items, 0), stacked(items, 1))
        out, off = [], 0
        for it in items:
            ii = found[off:off + it.n]
            off += it.n
            if it.arrow:
                from ..io.files import range_table

                out.append(_arrow_response(range_table(ii)))
            else:
                out.append(_json_response({"ids": ii[0] if it.single else ii}))
        return out

    runners = {"knn": answers(run_knn), "range": answers(run_range), "box": answers(run_box)}
    coalescers = {kind: _Coalescer(kind, run, pool, metrics, batch_wait_ms / 1e3, max_batch, max_concurrent_batches)
                  for kind, run in runners.items()}

    async def answer(kind: str, item: _Item) -> Response:
        """The request's answer: through a coalesced batch, or alone when it is large (or coalescing is off)."""
        if not coalesce or item.n > max_batch:
            metrics.record_batch(kind, 1, item.n, coalesced=False)
            res = (await blocking(runners[kind], [item]))[0]
        else:
            try:
                res = await coalescers[kind].submit(item)
            except Exception as exc:
                mapped = _request_error(exc)
                if mapped is exc:
                    raise
                raise mapped from None
        if isinstance(res, BaseException):  # failed alone after its batch was refused
            mapped = _request_error(res)
            raise mapped from None
        return res

    # -- kNN ------------------------------------------------------------------------------------------------------
    async def knn_work(req: Request) -> tuple[Response, int]:
        kind, obj, table = await read(req, '{"points": [[0.5, 0.5]], "k": 5}', ("points", "k"))
        m = meta()
        if kind == "json":
            q, single = _json_coords(obj, "points", m.user_dim)
        else:
            q, single = _arrow_coords(table, _column_names(req, m.user_dim, table, m.geographic)), False
        _check_lonlat(q, "points", m.geographic)
        kk = _as_k(_param(obj, req, "k"), m.n_points)
        if len(q) * kk > max_results:
            raise RequestError(422, f"the answer would hold {len(q):,} x {kk} = {len(q) * kk:,} neighbours, more "
                                    f"than this service's limit of {max_results:,} per request; send fewer points "
                                    f"per request or a smaller k")
        return await answer("knn", _Item(len(q), (q, kk), single, _wants_arrow(req, kind))), len(q)

    @app.post("/knn", summary="k nearest neighbours of each point", **_KNN_DOC)
    async def knn(request: Request,
                  k: int | None = Query(None, description="neighbours per point (Arrow bodies; JSON: field k)"),
                  columns: str | None = Query(None, description="coordinate columns of an Arrow body")) -> Response:
        return await handle(request, "knn", knn_work)

    # -- range ----------------------------------------------------------------------------------------------------
    async def range_work(req: Request) -> tuple[Response, int]:
        kind, obj, table = await read(req, '{"points": [[0.5, 0.5]], "radius": 0.05}', ("points", "radius"))
        m = meta()
        if kind == "json":
            q, single = _json_coords(obj, "points", m.user_dim)
            r = _as_radius(_param(obj, req, "radius"), len(q))
        else:
            q, single = _arrow_coords(table, _column_names(req, m.user_dim, table, m.geographic)), False
            r = _as_radius(_arrow_column(table, "radius").astype(np.float64) if "radius" in table.column_names
                           else req.query_params.get("radius"), len(q))
        _check_lonlat(q, "points", m.geographic)
        return await answer("range", _Item(len(q), (q, r), single, _wants_arrow(req, kind))), len(q)

    @app.post("/range", summary="every point within a radius of each point", **_RANGE_DOC)
    async def range_(request: Request,
                     radius: float | None = Query(None, description="ball radius (Arrow bodies; JSON: field radius)"),
                     columns: str | None = Query(None)) -> Response:
        return await handle(request, "range", range_work)

    # -- box ------------------------------------------------------------------------------------------------------
    async def box_work(req: Request) -> tuple[Response, int]:
        kind, obj, table = await read(req, '{"lo": [0.1, 0.1], "hi": [0.2, 0.3]}', ("lo", "hi"))
        m = meta()
        if kind == "json":
            lo, single = _json_coords(obj, "lo", m.user_dim)
            hi, single_hi = _json_coords(obj, "hi", m.user_dim)
            if lo.shape != hi.shape or single != single_hi:
                raise RequestError(422, f"lo and hi must have the same shape; got {len(lo)} and {len(hi)} "
                                        f"corner(s)")
        else:
            names = _column_names(req, m.user_dim, table, m.geographic, "lo_")
            lo = _arrow_coords(table, [f"lo_{n}" for n in names], "box corners")
            hi = _arrow_coords(table, [f"hi_{n}" for n in names], "box corners")
            single = False
        if m.geographic:  # lon_lo > lon_hi: a box across the antimeridian; latitudes must be ordered
            _check_lonlat(lo, "lo", True)
            _check_lonlat(hi, "hi", True)
            bad = np.flatnonzero(lo[:, 1] > hi[:, 1])
            if len(bad):
                raise RequestError(422, f"box {int(bad[0])} has latitude lo {lo[bad[0], 1]} > hi {hi[bad[0], 1]}; "
                                        f"each box needs lat_lo <= lat_hi (lon_lo > lon_hi is allowed: a box across "
                                        f"the antimeridian)")
        else:
            bad = np.flatnonzero((lo > hi).any(axis=1))
            if len(bad):
                raise RequestError(422, f"box {int(bad[0])} has lo > hi in some dimension (lo {lo[bad[0]].tolist()}, "
                                        f"hi {hi[bad[0]].tolist()}); each box needs lo <= hi")
        return await answer("box", _Item(len(lo), (lo, hi), single, _wants_arrow(req, kind))), len(lo)

    @app.post("/box", summary="every point inside each box lo <= p <= hi", **_BOX_DOC)
    async def box(request: Request, columns: str | None = Query(None, description="coordinate names x,y[,z]: the "
                                                                               "Arrow body has lo_<name> and hi_<name>")
                  ) -> Response:
        return await handle(request, "box", box_work)

    # -- polygon ----------------------------------------------------------------------------------------------------
    async def polygon_work(req: Request) -> tuple[Response, int]:
        kind, obj, _ = await read(req, '{"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}',
                                  _POLYGON_FIELDS)
        if kind != "json":
            raise RequestError(415, f"/polygon takes a GeoJSON body ({JSON_TYPE} or {GEOJSON_TYPE}): a Polygon or "
                                    f"MultiPolygon geometry or a Feature holding one")
        gtype = obj.get("type")
        if gtype == "Feature":
            geom = obj.get("geometry")
            gtype = geom.get("type") if isinstance(geom, dict) else None
        else:
            geom = {k: v for k, v in obj.items() if k in ("type", "coordinates")}
        if gtype not in ("Polygon", "MultiPolygon"):
            many = " (one polygon per request: for many, use 'distspatial polygons' or cluster.points_in_polygons)" \
                if gtype in ("FeatureCollection", "GeometryCollection") else ""
            raise RequestError(422, f"the body must be a GeoJSON Polygon or MultiPolygon geometry, or a Feature "
                                    f"holding one; got type {json.dumps(gtype)}{many}")
        predicate = _param(obj, req, "predicate") or "within"
        if predicate not in ("within", "intersects"):
            raise RequestError(422, f"predicate must be 'within' (interior; points on an edge or vertex are not in "
                                    f"it) or 'intersects' (interior or boundary), got {json.dumps(predicate)}")
        meta()
        try:
            ids = await blocking(cluster.polygon_search, geom, predicate)
        except ImportError as exc:
            raise RequestError(501, f"this service cannot answer polygon queries: {exc}") from None
        except TypeError as exc:  # e.g. coordinates that are not numbers
            raise RequestError(422, f"not a valid GeoJSON polygon: {' '.join(str(exc).split())}") from None
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) > max_results:
            raise RequestError(422, f"the polygon holds {len(ids):,} points, more than this service's limit of "
                                    f"{max_results:,} per answer; split the polygon, or run 'distspatial polygons' "
                                    f"(which writes a file)")
        if _wants_arrow(req, kind):
            return _arrow_response({"id": ids}), 1
        return _json_response({"ids": ids, "count": int(len(ids))}), 1

    @app.post("/polygon", summary="ids of the points in a GeoJSON polygon", **_POLYGON_DOC)
    async def polygon(request: Request,
                      predicate: str | None = Query(None, description="within (default) or intersects")) -> Response:
        return await handle(request, "polygon", polygon_work)

    app._direct = {path: functools.partial(handle, endpoint=name, work=work) for path, name, work in
                   (("/knn", "knn", knn_work), ("/range", "range", range_work), ("/box", "box", box_work))}

    # -- ingest / delete ------------------------------------------------------------------------------------------
    def audit(request: Request, response: Response) -> Response:
        """Log a write that access control let through: when, from where, which token (its name), what, and
        how many points it added or deleted (0 when it failed)."""
        scope = request.scope
        principal = scope.get("distspatial.principal")
        client = scope.get("client")
        status_code = response.status_code
        points = scope.get("distspatial.affected", 0) if status_code < 400 else 0
        if status_code < 400:
            metrics.write_accepted()
        audit_log.info(
            "write time=%s client=%s token=%s method=%s endpoint=%s status=%d points=%d",
            datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            f"{client[0]}:{client[1]}" if client else "-",
            principal.name if principal is not None else ("-" if tokens is not None else "anonymous"),
            scope.get("method", "?"), request.url.path, status_code, points)
        return response

    @app.post("/ingest", summary="add points to the live index", **_INGEST_DOC)
    async def ingest(request: Request, columns: str | None = Query(None)) -> Response:
        async def work(req: Request):
            kind, obj, table = await read(req, '{"points": [[0.5, 0.5]], "ids": [1000001]}',
                                          ("points", "ids", "timestamps"))
            m = meta()
            ts = None
            if kind == "json":
                pts, _ = _json_coords(obj, "points", m.user_dim)
                ids = _as_ids(obj["ids"], len(pts)) if obj.get("ids") is not None else None
                if obj.get("timestamps") is not None:
                    ts = _as_numbers(obj["timestamps"], len(pts), "timestamps")
            else:
                pts = _arrow_coords(table, _column_names(req, m.user_dim, table, m.geographic))
                ids = _arrow_column(table, "id", "integer").astype(np.int64) if "id" in table.column_names else None
                ts = _arrow_column(table, "timestamp").astype(np.float64) if "timestamp" in table.column_names else None
            _check_lonlat(pts, "points", m.geographic)
            new_ids = await blocking(cluster.ingest, pts, ids, ts)
            req.scope["distspatial.affected"] = len(pts)
            if _wants_arrow(req, kind):
                return _arrow_response({"id": np.asarray(new_ids, dtype=np.int64)}), len(pts)
            return _json_response({"ids": np.asarray(new_ids).tolist(), "n_points": int(cluster.n_points)}), len(pts)

        return audit(request, await handle(request, "ingest", work))

    @app.post("/delete", summary="delete points by id",
              openapi_extra={"requestBody": {"required": True, "content": {JSON_TYPE: {"schema": {
                  "type": "object", "required": ["ids"], "properties": {"ids": {"type": "array", "items": {
                      "type": "integer"}}}, "example": {"ids": [3, 7]}}}}}},
              responses={200: {"description": "how many of the ids existed and were deleted"}, **_ERRORS})
    async def delete(request: Request) -> Response:
        async def work(req: Request):
            kind, obj, table = await read(req, '{"ids": [3, 7]}', ("ids",))
            meta()
            if kind == "json":
                if obj.get("ids") is None:
                    raise RequestError(422, "missing field 'ids': a list of integer ids")
                ids = _as_ids(obj["ids"], -1)
            else:
                if "id" not in table.column_names:
                    raise RequestError(422, f"the Arrow table needs an integer column 'id'; it has "
                                            f"{', '.join(table.column_names) or 'no columns'}")
                ids = _arrow_column(table, "id", "integer").astype(np.int64)
            n = await blocking(cluster.delete, ids)
            req.scope["distspatial.affected"] = int(n)
            return _json_response({"deleted": int(n), "n_points": int(cluster.n_points)}), len(ids)

        return audit(request, await handle(request, "delete", work))

    # -- read-only endpoints --------------------------------------------------------------------------------------
    @app.get("/stats", summary="cluster statistics (per node and totals)")
    async def stats(request: Request) -> Response:
        async def work(req: Request):
            st = await blocking(cluster.statistics)
            out = _jsonable(st)
            out["compression_ratio"] = _jsonable(st.compression_ratio)
            out["service"] = metrics.snapshot()
            return _json_response(out), 0

        return await handle(request, "stats", work)

    @app.get("/health", summary="node health: 200 when queries can be answered, else 503",
             responses={503: {"description": "no data distributed, the cluster is shut down, or partitions lost"}})
    async def health(request: Request) -> Response:
        async def work(req: Request):
            meta_, why = _current_meta(cluster)
            if meta_ is None and "shut down" in why:
                return _json_response({"status": "unavailable", "reason": why}, 503), 0  # no details in it
            h = await blocking(cluster.health)
            failed = set(h.get("failed_nodes", []))
            lost = [p.partition_id for p in meta_.partitions if all(o in failed for o in p.owners)] if meta_ else []
            if meta_ is None:
                state, reason = "unavailable", why
            elif lost:
                state, reason = "unavailable", f"every replica of partitions {lost} is lost"
            elif failed or h.get("under_replicated"):
                state, reason = "degraded", "some nodes failed or partitions are under-replicated; queries work"
            else:
                state, reason = "ok", "every node answers"
            out = {"status": state, "reason": reason, "points": int(cluster.n_points),
                   "lost_partitions": lost, **_jsonable(h)}
            if tokens is not None and req.scope.get("distspatial.principal") is None:
                out = {"status": state, "reason": reason}  # the details need a token
            return _json_response(out, 503 if state == "unavailable" else 200), 0

        return await handle(request, "health", work)

    @app.get("/status.json", summary="what the status page shows: nodes, partitions, load, query rates")
    async def status_json(request: Request) -> Response:
        async def work(req: Request):
            return _json_response(await blocking(status.get)), 0

        return await handle(request, "status", work)

    @app.get("/", response_class=HTMLResponse, summary="live status page", include_in_schema=True)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    return app


def _version() -> str:
    try:
        from .. import __version__

        return __version__
    except Exception:  # pragma: no cover
        return "0"


# -- running it ----------------------------------------------------------------------------------------------------
def listen(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket (``port`` 0: a free one); connections made before uvicorn accepts wait in the backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without it a
    # response written in two parts (headers, body) waits for the client's delayed ACK (~40 ms per request)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    """Whether ``host`` reaches this machine only (``127.0.0.0/8``, ``::1``, ``localhost``); every other address,
    ``0.0.0.0``/``::`` (all interfaces) and names included, counts as exposed."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, tokens: Any = None, read_only: bool = False, insecure_no_auth: bool = False) -> None:
    """Refuse (:class:`ValueError`, one line) to serve beyond this machine without tokens: on a non-loopback
    ``host`` anyone who reaches the port could ingest and delete. ``read_only`` (nothing can be changed) or an
    explicit ``insecure_no_auth`` allows it."""
    if tokens is not None or read_only or insecure_no_auth or is_loopback(host):
        return
    raise ValueError(f"refusing to listen on {host or '0.0.0.0'} without authentication: anyone who reaches the port "
                     f"could ingest and delete points; give --token-file FILE (or set DISTSPATIAL_TOKEN), "
                     f"--read-only, or --insecure-no-auth")


def _url(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}"


def _server(app: Any, log_level: str, access_log: bool) -> Any:
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=5,
                            lifespan="on")
    return uvicorn.Server(config)


def run_server(
    cluster: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "warning",
    access_log: bool = False,
    on_ready: Callable[[str], None] | None = None,
    sock: socket.socket | None = None,
    insecure_no_auth: bool = False,
    **app_options: Any,
) -> None:
    """Serve ``cluster`` on ``host:port`` until SIGINT or SIGTERM (then return normally, after a graceful
    shutdown). ``port=0`` takes a free port; ``on_ready(url)`` is called once the socket listens. ``sock``: a
    socket from :func:`listen` to serve on instead (bound early, so a busy port fails before any work).
    ``app_options`` go to :func:`create_app`. A non-loopback ``host`` needs ``tokens``, ``read_only`` or
    ``insecure_no_auth`` (:func:`check_exposure`). Writes are audited to the ``distspatial.audit`` logger,
    which gets a stderr handler here unless it has one."""
    check_exposure(host, app_options.get("tokens"), bool(app_options.get("read_only")), insecure_no_auth)
    if not audit_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("distspatial audit: %(message)s"))
        audit_log.addHandler(handler)
        audit_log.propagate = False
    if audit_log.level == logging.NOTSET:
        audit_log.setLevel(logging.INFO)
    app = create_app(cluster, **app_options)
    sock = sock if sock is not None else listen(host, port)
    server = _server(app, log_level, access_log)
    stops: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    # uvicorn handles SIGINT/SIGTERM while serving and raises them again afterwards; swallow that second one so
    # the caller (the CLI) returns normally and shuts the cluster down.
    previous = {s: signal.signal(s, lambda sig, frame: stops.append(sig)) for s in (signal.SIGINT, signal.SIGTERM)} \
        if main else {}
    try:
        if on_ready is not None:
            on_ready(_url(host, sock))
        server.run(sockets=[sock])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        sock.close()


class BackgroundServer:
    """uvicorn serving ``cluster`` (or a ready app) in a daemon thread: ``with BackgroundServer(c) as s: s.url``."""

    def __init__(self, cluster_or_app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 insecure_no_auth: bool = False, **app_options: Any) -> None:
        guard = getattr(cluster_or_app, "_guard", None)
        if guard is not None:  # a ready app: its own access settings
            check_exposure(host, guard.tokens, guard.read_only, insecure_no_auth)
        else:
            check_exposure(host, app_options.get("tokens"), bool(app_options.get("read_only")), insecure_no_auth)
        self.app = cluster_or_app if isinstance(cluster_or_app, FastAPI) else create_app(cluster_or_app,
                                                                                       **app_options)
        self.host, self.port, self.log_level = host, port, log_level
        self.url = ""
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self._sock = listen(self.host, self.port)
        self.url = _url(self.host, self._sock)
        self._server = _server(self.app, self.log_level, False)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="distspatial-http-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server did not start within {timeout_s:g} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None

    def __enter__(self) -> BackgroundServer:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
