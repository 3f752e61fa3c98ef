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

from ._access import PUBLIC_PATHS, WRITE_PATHS  # noqa: F401
from ._app import create_app
from ._metrics import BATCH_SIZE_BUCKETS, REFUSAL_REASONS, ServiceMetrics, StatusCollector  # noqa: F401
from ._requests import (  # noqa: F401
    ARROW_STREAM,
    DEFAULT_BATCH_WAIT_MS,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONCURRENT_BATCHES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_RESULTS,
    DEFAULT_REQUEST_TIMEOUT_S,
    GEOJSON_TYPE,
    JSON_TYPE,
    NODE_COLORS,
    RequestError,
    audit_log,
    coordinate_names,
)
from ._on_nodes import run_on_nodes, serve_here
from ._server import BackgroundServer, check_exposure, is_loopback, listen, run_server

__all__ = [
    "create_app", "run_server", "run_on_nodes", "serve_here", "BackgroundServer", "RequestError", "ServiceMetrics", "StatusCollector",
    "coordinate_names", "listen", "ARROW_STREAM", "NODE_COLORS", "check_exposure", "is_loopback", "REFUSAL_REASONS",
    "GEOJSON_TYPE",
]

