"""The FastAPI app of the HTTP service: :func:`create_app` and its endpoints."""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Callable

import numpy as np

try:
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, Response
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the HTTP service needs FastAPI and uvicorn ({_exc}); install them with: pip install 'distspatial[serve]'"
    ) from _exc

from ...core.access import TokenSet, load_token_file
from ...core.errors import NotDistributedError
from ._access import _AccessGuard, _header, _page_csp
from ._coalesce import _Coalescer, _Item, _splits, _ties_by_id
from ._metrics import ServiceMetrics, StatusCollector, _current_meta
from ._openapi import _BOX_DOC, _ERRORS, _INGEST_DOC, _KNN_DOC, _POLYGON_DOC, _POLYGON_FIELDS, _RANGE_DOC
from ._requests import (
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
    RequestError,
    _arrow_column,
    _arrow_coords,
    _arrow_response,
    _arrow_table,
    _as_ids,
    _as_k,
    _as_numbers,
    _as_radius,
    _body_kind,
    _check_fields,
    _check_lonlat,
    _column_names,
    _error_response,
    _Expired,
    _json_coords,
    _json_response,
    _jsonable,
    _param,
    _parse_json,
    _read_body,
    _request_error,
    _wants_arrow,
    _within,
    audit_log,
)


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
    inline_batches: bool = False,
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
        inline_batches: run gathered batches on the event loop's thread instead of ``workers`` threads: for a
            service hosted in a node whose answers are local (``serve --on-nodes``), where handing each batch to
            a thread and back costs more than answering it.

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
                from ...io.files import knn_table

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
                from ...core.geo import great_circle_metres

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
                from ...io.files import range_table

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
                from ...io.files import range_table

                out.append(_arrow_response(range_table(ii)))
            else:
                out.append(_json_response({"ids": ii[0] if it.single else ii}))
        return out

    runners = {"knn": answers(run_knn), "range": answers(run_range), "box": answers(run_box)}
    coalescers = {kind: _Coalescer(kind, run, None if inline_batches else pool, metrics, batch_wait_ms / 1e3,
                                   max_batch, max_concurrent_batches)
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
        from ... import __version__

        return __version__
    except Exception:  # pragma: no cover
        return "0"
