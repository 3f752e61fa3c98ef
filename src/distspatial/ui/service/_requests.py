"""Request handling of the HTTP service: media types and defaults, :class:`RequestError`, JSON encoding
and responses, reading and validating JSON and Arrow bodies, request timeouts and the error a cluster call's
exception gets."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from typing import Any

import numpy as np

try:
    from fastapi import Request
    from fastapi.responses import Response
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the HTTP service needs FastAPI and uvicorn ({_exc}); install them with: pip install 'distspatial[serve]'"
    ) from _exc

try:  # a faster JSON library (the 'serve' extra); the standard json module otherwise, with the same answers
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

from ...core.errors import AccessDeniedError, DistSpatialError, NotDistributedError

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
