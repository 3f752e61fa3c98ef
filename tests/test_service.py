"""The HTTP query service (distspatial.ui.service) on a real socket with a real HTTP client, its status page in
headless Chromium, and ``distspatial serve`` as a subprocess. Answers are checked against scipy's cKDTree."""

from __future__ import annotations

import dataclasses
import io
import shutil
import signal
import socket
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service needs the 'serve' extra: pip install 'distspatial[serve]'")
pytest.importorskip("uvicorn", reason="the service needs the 'serve' extra: pip install 'distspatial[serve]'")
requests = pytest.importorskip("requests", reason="the tests' HTTP client: pip install 'distspatial[webtest]'")

import pyarrow as pa  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

from distspatial import DistributedSpatialCluster, NodeConfig  # noqa: E402
from distspatial.ui.service import ARROW_STREAM, NODE_COLORS, BackgroundServer  # noqa: E402

from ._serve import ServeProcess  # noqa: E402

MAX_BODY = 2**20  # the test server's body limit (1 MiB)
TIMEOUT = 30  # seconds per HTTP request: a hung connection fails the test instead of hanging it


@pytest.fixture(scope="module")
def svc(ray_local):
    rng = np.random.default_rng(7)
    pts = rng.random((20_000, 2))
    # a small CPU share per node leaves room in the runtime for the CLI test's own cluster
    cfg = dataclasses.replace(NodeConfig().with_node_count(3), cpus_per_node=0.2)
    cluster = DistributedSpatialCluster(cfg)
    server = None
    try:
        cluster.distribute_data(pts)
        server = BackgroundServer(cluster, max_body_bytes=MAX_BODY, workers=8).start()
        yield SimpleNamespace(url=server.url, cluster=cluster, points=pts.copy(), ids=np.arange(len(pts)), rng=rng)
    finally:
        if server is not None:
            server.stop()
        cluster.shutdown()


# -- references and helpers ----------------------------------------------------------------------------------------
def ref_knn(s, q, k):
    d, i = cKDTree(s.points).query(np.atleast_2d(q), k)
    d, i = d.reshape(len(np.atleast_2d(q)), k), i.reshape(len(np.atleast_2d(q)), k)
    return d, s.ids[i]


def ref_range(s, q, r):
    tree = cKDTree(s.points)
    return [np.sort(s.ids[tree.query_ball_point(c, r)]) for c in np.atleast_2d(q)]


def ref_box(s, lo, hi):
    return [np.sort(s.ids[np.all((s.points >= a) & (s.points <= b), axis=1)])
            for a, b in zip(np.atleast_2d(lo), np.atleast_2d(hi))]


def post(s, path, json=None, data=None, headers=None, session=None, **kw):
    return (session or requests).post(s.url + path, json=json, data=data, headers=headers, timeout=TIMEOUT, **kw)


def arrow_bytes(columns: dict) -> bytes:
    table = pa.table(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def read_arrow(resp) -> pa.Table:
    assert resp.headers["content-type"].startswith(ARROW_STREAM), resp.text[:300]
    with pa.ipc.open_stream(pa.BufferReader(resp.content)) as r:
        return r.read_all()


def queries(s, m, seed=0):
    return np.random.default_rng(seed).random((m, 2)) * 1.1 - 0.05  # a few just outside the data's box


# -- JSON endpoints ------------------------------------------------------------------------------------------------
def test_knn_json_batch_and_single_point(svc):
    q = queries(svc, 200)
    r = post(svc, "/knn", json={"points": q.tolist(), "k": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    dist, ids = np.array(body["distances"]), np.array(body["ids"])
    ref_d, ref_i = ref_knn(svc, q, 7)
    assert dist.shape == ids.shape == (200, 7)
    np.testing.assert_allclose(dist, ref_d, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(ids, ref_i)

    r = post(svc, "/knn", json={"points": [0.25, 0.75], "k": 3})  # one point: one answer, not a list of answers
    assert r.status_code == 200, r.text
    ref_d, ref_i = ref_knn(svc, np.array([0.25, 0.75]), 3)
    assert np.array(r.json()["ids"]).shape == (3,)
    np.testing.assert_array_equal(r.json()["ids"], ref_i[0])
    np.testing.assert_allclose(r.json()["distances"], ref_d[0], rtol=0, atol=1e-12)


def test_range_json(svc):
    q = queries(svc, 50, seed=1)
    r = post(svc, "/range", json={"points": q.tolist(), "radius": 0.03})
    assert r.status_code == 200, r.text
    body = r.json()
    want = ref_range(svc, q, 0.03)
    assert len(body["ids"]) == len(body["distances"]) == 50
    for got, dist, w, c in zip(body["ids"], body["distances"], want, q):
        np.testing.assert_array_equal(got, w)
        rows = np.searchsorted(svc.ids, got)
        np.testing.assert_allclose(dist, np.sqrt(((svc.points[rows] - c) ** 2).sum(axis=1)), rtol=0, atol=1e-12)
    assert sum(len(w) for w in want) > 500  # the check had something to check
    radii = np.linspace(0.0, 0.05, 5)
    r = post(svc, "/range", json={"points": q[:5].tolist(), "radius": radii.tolist()})  # one radius per point
    assert r.status_code == 200, r.text
    for got, c, rad in zip(r.json()["ids"], q[:5], radii):
        np.testing.assert_array_equal(got, ref_range(svc, c, rad)[0])
    r = post(svc, "/range", json={"points": [0.5, 0.5], "radius": 0.02})
    np.testing.assert_array_equal(r.json()["ids"], ref_range(svc, np.array([0.5, 0.5]), 0.02)[0])


def test_box_json(svc):
    r = post(svc, "/box", json={"lo": [0.1, 0.2], "hi": [0.15, 0.3]})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(r.json()["ids"], ref_box(svc, [0.1, 0.2], [0.15, 0.3])[0])
    lo = np.random.default_rng(3).random((20, 2)) * 0.9
    hi = lo + np.random.default_rng(4).random((20, 2)) * 0.1
    r = post(svc, "/box", json={"lo": lo.tolist(), "hi": hi.tolist()})
    assert r.status_code == 200, r.text
    for got, want in zip(r.json()["ids"], ref_box(svc, lo, hi)):
        np.testing.assert_array_equal(got, want)


# -- Arrow bodies --------------------------------------------------------------------------------------------------
def test_knn_arrow_in_and_out(svc):
    q = queries(svc, 300, seed=5)
    r = post(svc, "/knn?k=4", data=arrow_bytes({"x": q[:, 0], "y": q[:, 1]}), headers={"Content-Type": ARROW_STREAM})
    assert r.status_code == 200, r.text
    t = read_arrow(r)
    assert t.column_names == ["query", "rank", "id", "distance"] and t.num_rows == 300 * 4
    ref_d, ref_i = ref_knn(svc, q, 4)
    np.testing.assert_array_equal(t["query"].to_numpy(), np.repeat(np.arange(300), 4))
    np.testing.assert_array_equal(t["rank"].to_numpy(), np.tile(np.arange(1, 5), 300))
    np.testing.assert_array_equal(t["id"].to_numpy(), ref_i.ravel())
    np.testing.assert_allclose(t["distance"].to_numpy(), ref_d.ravel(), rtol=0, atol=1e-12)

    # other column names and types (float32 read exactly as float64); JSON answer on request
    q32 = q[:10].astype(np.float32)
    r = post(svc, "/knn?k=2&columns=lon,lat", data=arrow_bytes({"lat": q32[:, 1], "lon": q32[:, 0], "name": ["a"] * 10}),
             headers={"Content-Type": ARROW_STREAM, "Accept": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
    np.testing.assert_array_equal(r.json()["ids"], ref_knn(svc, q32.astype(np.float64), 2)[1])


def test_json_in_arrow_out_and_range_box_arrow(svc):
    q = queries(svc, 30, seed=6)
    r = post(svc, "/knn", json={"points": q.tolist(), "k": 3}, headers={"Accept": ARROW_STREAM})
    assert r.status_code == 200
    np.testing.assert_array_equal(read_arrow(r)["id"].to_numpy(), ref_knn(svc, q, 3)[1].ravel())

    radius = np.full(30, 0.04)
    radius[::3] = 0.01
    r = post(svc, "/range", data=arrow_bytes({"x": q[:, 0], "y": q[:, 1], "radius": radius}),
             headers={"Content-Type": ARROW_STREAM})
    assert r.status_code == 200, r.text
    t = read_arrow(r)
    assert t.column_names == ["query", "id", "distance"]
    qcol, idcol = t["query"].to_numpy(), t["id"].to_numpy()
    for j in range(30):
        np.testing.assert_array_equal(idcol[qcol == j], ref_range(svc, q[j], radius[j])[0])

    r = post(svc, "/range?radius=0.02", data=arrow_bytes({"x": q[:, 0], "y": q[:, 1]}),
             headers={"Content-Type": ARROW_STREAM})
    t = read_arrow(r)
    for j in range(30):
        np.testing.assert_array_equal(t["id"].to_numpy()[t["query"].to_numpy() == j], ref_range(svc, q[j], 0.02)[0])

    lo = np.abs(q[:8]) % 0.9
    hi = lo + 0.05
    r = post(svc, "/box", data=arrow_bytes({"lo_x": lo[:, 0], "lo_y": lo[:, 1], "hi_x": hi[:, 0], "hi_y": hi[:, 1]}),
             headers={"Content-Type": ARROW_STREAM})
    assert r.status_code == 200, r.text
    t = read_arrow(r)
    assert t.column_names == ["query", "id"]
    for j, want in enumerate(ref_box(svc, lo, hi)):
        np.testing.assert_array_equal(t["id"].to_numpy()[t["query"].to_numpy() == j], want)


# -- ingest, delete ------------------------------------------------------------------------------------------------
def test_ingest_json_and_arrow_then_queries_see_the_points(svc):
    new = np.array([[0.123456, 0.654321], [1.5, -0.25]])  # the second lies outside the original bounds
    r = post(svc, "/ingest", json={"points": new.tolist()})
    assert r.status_code == 200, r.text
    new_ids = np.array(r.json()["ids"])
    assert len(new_ids) == 2 and r.json()["n_points"] == len(svc.points) + 2
    svc.points, svc.ids = np.vstack([svc.points, new]), np.concatenate([svc.ids, new_ids])

    more = np.random.default_rng(11).random((50, 2))
    given = np.arange(10_000_000, 10_000_050)
    r = post(svc, "/ingest", data=arrow_bytes({"x": more[:, 0], "y": more[:, 1], "id": given}),
             headers={"Content-Type": ARROW_STREAM})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(read_arrow(r)["id"].to_numpy(), given)
    svc.points, svc.ids = np.vstack([svc.points, more]), np.concatenate([svc.ids, given])

    r = post(svc, "/knn", json={"points": new.tolist(), "k": 1})
    assert r.json()["ids"] == [[int(new_ids[0])], [int(new_ids[1])]] and r.json()["distances"] == [[0.0], [0.0]]
    q = queries(svc, 100, seed=12)
    r = post(svc, "/knn", json={"points": q.tolist(), "k": 5})
    np.testing.assert_array_equal(r.json()["ids"], ref_knn(svc, q, 5)[1])



def test_delete(svc):
    victim = int(svc.ids[-1])
    r = post(svc, "/delete", json={"ids": [victim, 987_654_321]})
    assert r.status_code == 200, r.text
    assert r.json()["deleted"] == 1
    keep = svc.ids != victim
    svc.points, svc.ids = svc.points[keep], svc.ids[keep]
    q = queries(svc, 50, seed=13)
    r = post(svc, "/knn", json={"points": q.tolist(), "k": 3})
    np.testing.assert_array_equal(r.json()["ids"], ref_knn(svc, q, 3)[1])


# -- read-only endpoints -------------------------------------------------------------------------------------------
def test_stats_health_status_openapi(svc):
    r = requests.get(svc.url + "/stats", timeout=TIMEOUT)
    assert r.status_code == 200
    st = r.json()
    assert st["n_points"] == len(svc.points) and len(st["nodes"]) == 3
    assert st["n_partitions"] == svc.cluster.metadata.n_partitions
    assert sum(n["points"] for n in st["nodes"]) == len(svc.points) and st["queries"] > 0
    assert st["service"]["endpoints"] and "compression_ratio" in st

    r = requests.get(svc.url + "/health", timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    assert set(r.json()["nodes"]) == {"0", "1", "2"} and r.json()["failed_nodes"] == []

    r = requests.get(svc.url + "/status.json", timeout=TIMEOUT)
    s = r.json()
    assert s["state"] == "ok" and s["cluster"]["points"] == len(svc.points)
    assert [n["node_id"] for n in s["nodes"]] == [0, 1, 2] and all(n["status"] == "alive" for n in s["nodes"])
    assert len(s["partitions"]) == svc.cluster.metadata.n_partitions
    assert sorted(p["curve_rank"] for p in s["partitions"]) == list(range(len(s["partitions"])))
    for p, info in zip(s["partitions"], svc.cluster.metadata.partitions):
        assert p["owners"] == list(info.owners) and p["size"] == info.size
        np.testing.assert_allclose(p["lo"], info.lo)
    knn = {e["endpoint"]: e for e in s["service"]["endpoints"]}["knn"]
    assert knn["requests"] >= 5 and knn["queries"] >= 300 and knn["errors"] == 0

    spec = requests.get(svc.url + "/openapi.json", timeout=TIMEOUT).json()
    for path in ("/knn", "/range", "/box", "/ingest", "/delete"):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert "application/json" in content, path
        if path != "/delete":
            assert ARROW_STREAM in content, path
    assert {"/stats", "/health", "/status.json", "/"} <= set(spec["paths"])
    page = requests.get(svc.url + "/", timeout=TIMEOUT)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="map"' in page.text and "status.json" in page.text and "http://" not in page.text.split("<svg")[0]


# -- bad requests --------------------------------------------------------------------------------------------------
J = {"Content-Type": "application/json"}
A = {"Content-Type": ARROW_STREAM}

BAD = [
    # (path, body (bytes or JSON-able), headers, status, what the message must say)
    ("/knn", b'{"points": [[0.5, 0.5]], "k": ', J, 400, "malformed JSON"),
    ("/knn", b"", J, 400, "empty"),
    ("/knn", b"\xff\xfe{}", J, 400, "UTF-8"),
    ("/knn", [1, 2], J, 422, "must be an object"),
    ("/knn", {"points": [[0.5, 0.5]]}, J, 422, "missing k"),
    ("/knn", {"points": [[0.5, 0.5]], "k": 0}, J, 422, "k must be >= 1"),
    ("/knn", {"points": [[0.5, 0.5]], "k": 2.5}, J, 422, "positive integer"),
    ("/knn", {"points": [[0.5, 0.5]], "k": "five"}, J, 422, "positive integer"),
    ("/knn", {"points": [[0.5, 0.5]], "k": True}, J, 422, "positive integer"),
    ("/knn", {"points": [[0.5, 0.5]], "k": 10**9}, J, 422, "larger than the number of points"),
    ("/knn", {"points": [[0.5, 0.5, 0.5]], "k": 1}, J, 422, "needs 2 coordinates"),
    ("/knn", {"points": [0.5], "k": 1}, J, 422, "needs 2 coordinates"),
    ("/knn", {"points": [[0.5, 0.5], [0.5]], "k": 1}, J, 422, "ragged"),
    ("/knn", {"points": [[[0.5, 0.5]]], "k": 1}, J, 422, "shape"),
    ("/knn", {"points": [["a", "b"]], "k": 1}, J, 422, "numbers only"),
    ("/knn", {"points": [], "k": 1}, J, 422, "empty"),
    ("/knn", {"points": "0.5,0.5", "k": 1}, J, 422, "must be a point"),
    ("/knn", {"k": 1}, J, 422, "missing field 'points'"),
    ("/knn", b'{"points": [[NaN, 0.5]], "k": 1}', J, 422, "non-finite"),
    ("/knn", b'{"points": [[0.1, 0.2], [Infinity, 0.5]], "k": 1}', J, 422, "row 1 holds a non-finite"),
    ("/knn", b'{"points": [[1e999, 0.5]], "k": 1}', J, 422, "non-finite"),
    ("/knn", {"points": [[0.5, 0.5]], "k": 1, "radius": 3}, J, 422, "unknown field(s) 'radius'"),
    ("/knn", b"points=1", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported Content-Type"),
    ("/knn", b"x", {"Content-Type": "text/csv"}, 415, ARROW_STREAM),
    ("/knn?k=1", b"not arrow at all", A, 400, "not a valid Arrow IPC stream"),
    ("/knn?k=1", b"", A, 400, "empty"),
    ("/knn?k=1", arrow_bytes({"x": [0.5], "z": [0.5]}), A, 422, "needs columns x, y"),
    ("/knn?k=1", arrow_bytes({"x": [0.5, None], "y": [0.5, 0.5]}), A, 422, "null"),
    ("/knn?k=1", arrow_bytes({"x": ["a"], "y": ["b"]}), A, 422, "must hold numbers"),
    ("/knn?k=1", arrow_bytes({"x": [float("nan")], "y": [0.5]}), A, 422, "non-finite"),
    ("/knn", arrow_bytes({"x": [0.5], "y": [0.5]}), A, 422, "missing k"),
    ("/knn?k=abc", arrow_bytes({"x": [0.5], "y": [0.5]}), A, 422, "k"),
    ("/knn?k=1&columns=x", arrow_bytes({"x": [0.5], "y": [0.5]}), A, 422, "?columns="),
    ("/range", {"points": [[0.5, 0.5]], "radius": -1}, J, 422, "radius must be finite and >= 0"),
    ("/range", {"points": [[0.5, 0.5]]}, J, 422, "missing radius"),
    ("/range", {"points": [[0.5, 0.5]], "radius": [0.1, 0.2]}, J, 422, "one per point"),
    ("/range", {"points": [[0.5, 0.5]], "radius": "wide"}, J, 422, "radius must be a number"),
    ("/box", {"lo": [0.5, 0.5], "hi": [0.4, 0.6]}, J, 422, "lo > hi"),
    ("/box", {"lo": [0.5, 0.5]}, J, 422, "missing field 'hi'"),
    ("/box", {"lo": [[0.5, 0.5]], "hi": [[0.6, 0.6], [0.7, 0.7]]}, J, 422, "same shape"),
    ("/box", arrow_bytes({"lo_x": [0.1], "lo_y": [0.1]}), A, 422, "hi_x, hi_y"),
    ("/ingest", {"points": [[0.5, 0.5]], "ids": [1, 2]}, J, 422, "one id per point"),
    ("/ingest", {"points": [[0.5, 0.5]], "ids": ["a"]}, J, 422, "integers"),
    ("/ingest", {"points": [[0.5, float("inf")]]}, J, 422, "non-finite"),
    ("/ingest", {"points": [[0.5, 0.5], [0.6, 0.6]], "ids": [7, 7]}, J, 422, "unique"),
    ("/delete", {}, J, 422, "missing field 'ids'"),
]


def _send(svc, path, body, headers):
    data = body if isinstance(body, bytes) else __import__("json").dumps(body).encode()
    return requests.post(svc.url + path, data=data, headers=headers, timeout=TIMEOUT)


@pytest.mark.parametrize("path, body, headers, status, says", BAD, ids=[f"{b[0]}-{b[4]}" for b in BAD])
def test_bad_request_gets_4xx_with_message(svc, path, body, headers, status, says):
    r = _send(svc, path, body, headers)
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    detail = r.json()["detail"]
    assert says.lower() in detail.lower(), detail


def test_body_too_large_and_other_http_errors(svc):
    big = b'{"points": [' + b"[0.5, 0.5]," * (MAX_BODY // 10) + b'[0.5, 0.5]], "k": 1}'
    r = requests.post(svc.url + "/knn", data=big, headers=J, timeout=TIMEOUT)
    assert r.status_code == 413 and "limit of 1,048,576 bytes" in r.json()["detail"], r.text

    def chunks():  # no Content-Length: the limit holds while streaming
        for _ in range(40):
            yield b" " * 65536

    r = requests.post(svc.url + "/knn", data=chunks(), headers=J, timeout=TIMEOUT)
    assert r.status_code == 413 and "at least" in r.json()["detail"], r.text


    assert requests.get(svc.url + "/knn", timeout=TIMEOUT).status_code == 405
    assert requests.get(svc.url + "/nope", timeout=TIMEOUT).status_code == 404
    # the service still answers correctly after all that
    r = post(svc, "/knn", json={"points": [[0.3, 0.3]], "k": 2})
    np.testing.assert_array_equal(r.json()["ids"], ref_knn(svc, np.array([0.3, 0.3]), 2)[1])


def test_max_results_limit(svc):
    from distspatial.ui.service import create_app

    app = create_app(svc.cluster, max_results=100)
    with BackgroundServer(app) as srv:
        r = requests.post(srv.url + "/knn", json={"points": [[0.5, 0.5]] * 30, "k": 4}, timeout=TIMEOUT)
        assert r.status_code == 422 and "limit of 100" in r.json()["detail"], r.text
        r = requests.post(srv.url + "/knn", json={"points": [[0.5, 0.5]] * 25, "k": 4}, timeout=TIMEOUT)
        assert r.status_code == 200


def test_no_data_distributed_is_503(ray_local, svc):
    cfg = dataclasses.replace(NodeConfig().with_node_count(1), cpus_per_node=0.1)
    with DistributedSpatialCluster(cfg) as empty, BackgroundServer(empty) as srv:
        r = requests.post(srv.url + "/knn", json={"points": [[0.5, 0.5]], "k": 1}, timeout=TIMEOUT)
        assert r.status_code == 503 and "distribute_data" in r.json()["detail"]
        h = requests.get(srv.url + "/health", timeout=TIMEOUT)
        assert h.status_code == 503 and h.json()["status"] == "unavailable"
        s = requests.get(srv.url + "/status.json", timeout=TIMEOUT)
        assert s.status_code == 200 and s.json()["partitions"] == [] and s.json()["state"] == "unavailable"


# -- concurrency ---------------------------------------------------------------------------------------------------
def test_concurrent_clients_all_answers_exact(svc):
    n_threads, per_thread = 8, 20
    tree = cKDTree(svc.points)
    failures: list[str] = []
    lock = threading.Lock()

    def client(t: int) -> None:
        rng = np.random.default_rng(100 + t)
        with requests.Session() as sess:
            for j in range(per_thread):
                try:
                    kind = (t + j) % 3
                    q = rng.random((int(rng.integers(1, 30)), 2))
                    if kind == 0:
                        k = int(rng.integers(1, 9))
                        r = post(svc, "/knn", json={"points": q.tolist(), "k": k}, session=sess)
                        d, i = tree.query(q, k)
                        d, i = d.reshape(len(q), k), svc.ids[i.reshape(len(q), k)]
                        ok = (r.status_code == 200 and np.array_equal(r.json()["ids"], i)
                              and np.allclose(r.json()["distances"], d, rtol=0, atol=1e-12))
                    elif kind == 1:
                        rad = float(rng.uniform(0.0, 0.03))
                        r = post(svc, "/range", json={"points": q.tolist(), "radius": rad}, session=sess)
                        want = [np.sort(svc.ids[tree.query_ball_point(c, rad)]).tolist() for c in q]
                        ok = r.status_code == 200 and r.json()["ids"] == want
                    else:
                        lo = q * 0.9
                        hi = lo + rng.random(q.shape) * 0.05
                        r = post(svc, "/box", json={"lo": lo.tolist(), "hi": hi.tolist()}, session=sess)
                        want = [w.tolist() for w in ref_box(svc, lo, hi)]
                        ok = r.status_code == 200 and r.json()["ids"] == want
                    if not ok:
                        with lock:
                            failures.append(f"thread {t} request {j} kind {kind}: {r.status_code} {r.text[:200]}")
                except Exception as exc:  # a hung or reset connection fails the test
                    with lock:
                        failures.append(f"thread {t} request {j}: {type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not any(th.is_alive() for th in threads), "a client thread hung"
    assert not failures, failures[:5]
    elapsed = time.perf_counter() - t0
    stats = requests.get(svc.url + "/status.json", timeout=TIMEOUT).json()["service"]
    done = sum(e["requests"] for e in stats["endpoints"] if e["endpoint"] in ("knn", "range", "box"))
    assert done >= n_threads * per_thread
    assert elapsed < 60


# -- coalescing, admission, timeouts -------------------------------------------------------------------------------
def wait_until(cond, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll ``cond()`` until it holds (a state the test waits for, not a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def assert_knn_exact(s, q, k, got_d, got_i) -> None:
    """``(got_d, got_i)`` (k,) is q's exact kNN: distances equal cKDTree's; ids closer than the k-th distance
    equal; ids at the k-th distance among the points at that distance; equal distances in id order."""
    got_d, got_i = np.asarray(got_d, dtype=float), np.asarray(got_i)
    d, i = cKDTree(s.points).query(q, min(len(s.points), k + 32))
    np.testing.assert_allclose(got_d, d[:k], rtol=0, atol=1e-12)
    kth = d[k - 1]
    np.testing.assert_array_equal(np.sort(got_i[got_d < kth - 1e-12]), np.sort(s.ids[i[d < kth - 1e-12]]))
    assert set(got_i[np.abs(got_d - kth) <= 1e-12]) <= set(s.ids[i[np.abs(d - kth) <= 1e-12]].tolist())
    assert not ((got_d[1:] == got_d[:-1]) & (got_i[1:] < got_i[:-1])).any(), "ties not in id order"


def fire(n: int, send) -> tuple[list, list[threading.Thread]]:
    """``send(j)`` for j < n from n threads released together: the list their results (or exceptions) go to,
    in order, and the threads."""
    out: list = [None] * n
    barrier = threading.Barrier(n)

    def run(j: int) -> None:
        barrier.wait()
        try:
            out[j] = send(j)
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            out[j] = exc

    threads = [threading.Thread(target=run, args=(j,)) for j in range(n)]
    for t in threads:
        t.start()
    return out, threads


def test_coalesced_batches_mixed_k_range_box_borders_duplicates(svc):
    """Single-point kNN (mixed k), range and box requests sent together are answered in a few coalesced batches
    (one cluster call each), every answer exact: queries on partition borders and at duplicated points."""
    from distspatial.ui.service import create_app

    # duplicates: 4 more copies of an existing point and 3 copies of a new one
    dup_old, dup_new = svc.points[123], np.array([0.4321, 0.8765])
    r = post(svc, "/ingest", json={"points": [dup_old.tolist()] * 4 + [dup_new.tolist()] * 3})
    assert r.status_code == 200, r.text
    svc.points = np.vstack([svc.points, [dup_old] * 4, [dup_new] * 3])
    svc.ids = np.concatenate([svc.ids, r.json()["ids"]])

    meta = svc.cluster.metadata
    lo, hi = np.array([p.lo for p in meta.partitions]), np.array([p.hi for p in meta.partitions])
    border = np.vstack([lo, hi, np.c_[lo[:, 0], (lo[:, 1] + hi[:, 1]) / 2], np.c_[(lo[:, 0] + hi[:, 0]) / 2, hi[:, 1]]])
    rng = np.random.default_rng(41)
    border = border[rng.permutation(len(border))[:24]] + rng.choice([-1e-9, 0.0, 1e-9], size=(min(24, len(border)), 2))
    knn_q = np.vstack([border, [dup_old, dup_old, dup_new, dup_new + 1e-7], rng.random((6, 2))])
    knn_k = [1 + (j * 5) % 13 for j in range(len(knn_q))]  # k from 1 to 13, mixed in one batch
    knn_k[len(border)] = 2  # k=2 at a point held 5 times: ties cut at k
    range_q, radii = rng.random((8, 2)), rng.uniform(0.0, 0.03, 8)
    box_lo = rng.random((8, 2)) * 0.9
    box_hi = box_lo + rng.random((8, 2)) * 0.08
    jobs = ([("/knn", {"points": p.tolist(), "k": k}) for p, k in zip(knn_q, knn_k)]
            + [("/range", {"points": p.tolist(), "radius": float(r)}) for p, r in zip(range_q, radii)]
            + [("/box", {"lo": a.tolist(), "hi": b.tolist()}) for a, b in zip(box_lo, box_hi)])

    # one worker thread, one batch of a kind at a time, no wait: while the first batch of each kind waits for
    # the busy worker, every other request of that kind gathers into the next batch
    app = create_app(svc.cluster, workers=1, max_concurrent_batches=1, batch_wait_ms=0)
    block = threading.Event()
    with BackgroundServer(app) as srv:
        app.state.pool.submit(block.wait)  # the worker is busy (as during a slow cluster call) until released
        try:
            results, threads = fire(len(jobs), lambda j: requests.post(srv.url + jobs[j][0], json=jobs[j][1],
                                                                         timeout=TIMEOUT))
            wait_until(lambda: app.state.metrics.admitted() == len(jobs), what="every request admitted")
        finally:
            block.set()
        for t in threads:
            t.join(TIMEOUT)
        service = requests.get(srv.url + "/stats", timeout=TIMEOUT).json()["service"]

    for (path, body), r in zip(jobs, results):
        assert not isinstance(r, Exception) and r.status_code == 200, (path, body, r)
        got = r.json()
        if path == "/knn":
            assert_knn_exact(svc, np.array(body["points"]), body["k"], got["distances"], got["ids"])
        elif path == "/range":
            np.testing.assert_array_equal(got["ids"], ref_range(svc, np.array(body["points"]), body["radius"])[0])
            rows = np.searchsorted(svc.ids, got["ids"]) if np.all(np.diff(svc.ids) > 0) else None
            if rows is not None:
                np.testing.assert_allclose(got["distances"], np.sqrt(((svc.points[rows] - body["points"]) ** 2)
                                                                     .sum(axis=1)), rtol=0, atol=1e-12)
        else:
            np.testing.assert_array_equal(got["ids"], ref_box(svc, body["lo"], body["hi"])[0])
    # the 5 copies of dup_old are all found at distance 0 by a k=13 query there
    j = len(border) + 1
    assert sorted(results[j].json()["ids"][:5]) == sorted(svc.ids[np.all(svc.points == dup_old, axis=1)].tolist())
    batches = service["batches"]
    n_of = {"knn": len(knn_q), "range": len(range_q), "box": len(box_lo)}
    for kind, n in n_of.items():
        b = batches[kind]
        # the first request went alone (it found the worker busy), all the others in one batch after it
        assert b["batches"] == 2 and b["requests"] == n and b["max_requests"] == n - 1, (kind, b)
        assert b["sizes"]["1"] == 1 and sum(b["sizes"].values()) == 2
    assert service["admission"]["admitted"] == 0 and service["admission"]["refused"] == 0


def test_overload_gets_503_retry_after_accepted_exact(svc):
    """More concurrent clients than the admission limit: the extra ones get 503 with Retry-After at once while
    the admitted ones wait for a busy cluster call; the service keeps answering and the admitted answers are exact.
    A request still waiting at the request timeout gets 504."""
    from distspatial.ui.service import create_app

    app = create_app(svc.cluster, workers=1, max_queue=4, retry_after_s=2, request_timeout_s=60)
    block = threading.Event()
    n = 12
    q = queries(svc, n, seed=51)
    ks = [1 + j % 6 for j in range(n)]
    with BackgroundServer(app) as srv:
        app.state.pool.submit(block.wait)
        try:
            results, threads = fire(n, lambda j: requests.post(srv.url + "/knn", json={"points": q[j].tolist(),
                                                                                       "k": ks[j]}, timeout=TIMEOUT))
            wait_until(lambda: app.state.metrics.admitted() == 4 and sum(r is not None for r in results) == n - 4,
                       what="4 admitted and the others answered")
            refused = [r for r in results if r is not None]
            for r in refused:
                assert r.status_code == 503 and r.headers["Retry-After"] == "2", r.text
                assert r.headers["content-type"].startswith("application/json") and "busy" in r.json()["detail"]
            # the service stays up: the page and further requests are answered at once (the latter refused)
            assert requests.get(srv.url + "/", timeout=TIMEOUT).status_code == 200
            t0 = time.perf_counter()
            more = requests.post(srv.url + "/range", json={"points": [0.5, 0.5], "radius": 0.01}, timeout=TIMEOUT)
            assert more.status_code == 503 and "Retry-After" in more.headers and time.perf_counter() - t0 < 5
        finally:
            block.set()
        for t in threads:
            t.join(TIMEOUT)
        accepted = [j for j, r in enumerate(results) if r.status_code == 200]
        assert len(accepted) == 4
        for j in accepted:
            assert_knn_exact(svc, q[j], ks[j], results[j].json()["distances"], results[j].json()["ids"])
        adm = requests.get(srv.url + "/stats", timeout=TIMEOUT).json()["service"]["admission"]
        assert adm["refused"] == n - 4 + 1 and adm["admitted"] == 0 and adm["max_queue"] == 4
        # after the overload: exact answers again
        r = requests.post(srv.url + "/knn", json={"points": [0.3, 0.7], "k": 3}, timeout=TIMEOUT)
        assert r.status_code == 200
        assert_knn_exact(svc, np.array([0.3, 0.7]), 3, r.json()["distances"], r.json()["ids"])

    # the request timeout: a request that waits for a busy cluster longer than it gets 504; its slot is freed
    app = create_app(svc.cluster, workers=1, request_timeout_s=2.0)  # room for the next request on a busy machine
    block = threading.Event()
    with BackgroundServer(app) as srv:
        app.state.pool.submit(block.wait)
        try:
            r = requests.post(srv.url + "/knn", json={"points": [0.5, 0.5], "k": 2}, timeout=TIMEOUT)
            assert r.status_code == 504 and "request timeout" in r.json()["detail"], r.text
        finally:
            block.set()
        r = requests.post(srv.url + "/knn", json={"points": [0.5, 0.5], "k": 2}, timeout=TIMEOUT)
        assert r.status_code == 200
        assert_knn_exact(svc, np.array([0.5, 0.5]), 2, r.json()["distances"], r.json()["ids"])
        adm = requests.get(srv.url + "/stats", timeout=TIMEOUT).json()["service"]["admission"]
        assert adm["request_timeouts"] == 1 and adm["admitted"] == 0


def _raw_request_head(url: str, length: int) -> tuple[tuple[str, int], bytes]:
    host, port = url.split("//")[1].rsplit(":", 1)
    head = (f"POST /knn HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()
    return (host, int(port)), head


def _read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        b = sock.recv(65536)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def test_slow_body_client_times_out_without_blocking_others(svc):
    """A client that sends the headers and part of the body, then stalls, gets 408 after the body timeout and its
    connection is closed; other clients are answered meanwhile."""
    import select

    body = b'{"points": [[0.5, 0.5]], "k": 3}'
    with BackgroundServer(svc.cluster, body_timeout_s=2.0) as srv:
        addr, head = _raw_request_head(srv.url, len(body))
        with socket.create_connection(addr, timeout=TIMEOUT) as slow, \
                socket.create_connection(addr, timeout=TIMEOUT) as silent:
            slow.sendall(head + body[:10])  # part of the body, then nothing
            silent.sendall(head)  # the headers only
            t0 = time.perf_counter()
            with requests.Session() as sess:
                for j in range(5):
                    q = queries(svc, 1, seed=60 + j)[0]
                    r = sess.post(srv.url + "/knn", json={"points": q.tolist(), "k": 4}, timeout=TIMEOUT)
                    assert r.status_code == 200, r.text
                    assert_knn_exact(svc, q, 4, r.json()["distances"], r.json()["ids"])
            if time.perf_counter() - t0 < 1.5:  # answered while the slow clients still hold their connections
                assert not select.select([slow, silent], [], [], 0)[0]
            for sock in (slow, silent):
                answer = _read_until_closed(sock)  # the server answers, then closes the connection
                assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
                assert b"body timeout" in answer and b'"detail"' in answer
            assert time.perf_counter() - t0 >= 1.9
        adm = requests.get(srv.url + "/stats", timeout=TIMEOUT).json()["service"]["admission"]
        assert adm["body_timeouts"] == 2 and adm["admitted"] == 0
        # a complete body sent slowly in two parts, within the timeout, is answered
        with socket.create_connection(addr, timeout=TIMEOUT) as ok:
            ok.sendall(head + body[:10])
            ok.sendall(body[10:])
            assert ok.recv(65536).startswith(b"HTTP/1.1 200")


# -- the status page in a real browser -----------------------------------------------------------------------------
def _chromium() -> tuple[str, str] | None:
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def _hex_rgb(h: str) -> tuple[int, int, int]:
    return tuple(int(h[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def test_status_page_in_headless_chromium(svc, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium missing: pip install 'distspatial[webtest]'")
    from selenium.webdriver.chrome.service import Service
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    found = _chromium()
    if found is None:
        pytest.skip("chromium and chromedriver not installed (apt-get install chromium chromium-driver)")
    browser, driver_path = found
    Image = pytest.importorskip("PIL.Image", reason="pillow (comes with matplotlib) checks the screenshot")

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1300",
              "--force-device-scale-factor=1", "--hide-scrollbars"):
        opts.add_argument(a)
    post(svc, "/knn", json={"points": queries(svc, 20).tolist(), "k": 3})  # some load to show
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        drv.set_page_load_timeout(30)
        drv.get(svc.url + "/")
        updates = lambda d: int(d.find_element(By.TAG_NAME, "body").get_attribute("data-updates") or 0)  # noqa: E731
        WebDriverWait(drv, 30, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda d: updates(d) >= 2)  # the page polled /status.json twice

        def fresh(read):
            """``read(drv)``, again when the page re-rendered under it (a stale element), at most 10 times."""
            for attempt in range(10):
                try:
                    return read(drv)
                except StaleElementReferenceException:
                    if attempt == 9:
                        raise

        meta = svc.cluster.metadata

        def check_page(drv) -> None:  # the page re-renders every second: read it whole, again if it changed
            rows = drv.find_elements(By.CSS_SELECTOR, "#nodes tr.node-row")
            assert [r.get_attribute("data-node") for r in rows] == ["0", "1", "2"]
            assert all(r.get_attribute("data-status") == "alive" for r in rows)
            points_cells = [int(r.find_element(By.CSS_SELECTOR, "td.points").text.replace(",", "")) for r in rows]
            assert sum(points_cells) == meta.n_points
            assert drv.find_element(By.ID, "total-points").text == f"{meta.n_points:,}"
            assert drv.find_element(By.ID, "total-partitions").text == str(meta.n_partitions)
            assert drv.find_element(By.ID, "nodes-alive").text == "3 / 3"
            assert drv.find_element(By.ID, "state").text == "ok"
            assert drv.find_element(By.ID, "conn").text == "live"

            rects = drv.find_elements(By.CSS_SELECTOR, "#map rect.partition")
            assert len(rects) == meta.n_partitions
            by_id = {int(r.get_attribute("data-partition")): r for r in rects}
            for p in meta.partitions:
                r = by_id[p.partition_id]
                assert int(r.get_attribute("data-owner")) == p.owners[0]
                assert r.get_attribute("fill") == NODE_COLORS[p.owners[0]]
                assert float(r.get_attribute("width")) > 0 and float(r.get_attribute("height")) > 0
            curve = drv.find_element(By.CSS_SELECTOR, "#map polyline.curve-order").get_attribute("points").split()
            assert len(curve) == meta.n_partitions
            assert len(drv.find_elements(By.CSS_SELECTOR, "#nodes .load-bar")) == 3
            assert drv.find_element(By.CSS_SELECTOR, "#endpoints tr[data-endpoint='knn']")

        fresh(check_page)

        # live: queries made now show up on the page within a few polls
        total = lambda d: int(d.find_element(By.ID, "queries-total").text.replace(",", ""))  # noqa: E731
        before = fresh(total)
        post(svc, "/knn", json={"points": queries(svc, 250, seed=9).tolist(), "k": 2})
        WebDriverWait(drv, 15, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda d: total(d) >= before + 250)

        size = drv.execute_script("return [window.innerWidth, window.innerHeight, window.devicePixelRatio]")
        png = drv.get_screenshot_as_png()
    finally:
        drv.quit()
    path = tmp_path / "status.png"
    path.write_bytes(png)
    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert img.size == (int(size[0] * size[2]), int(size[1] * size[2]))
    pix = np.asarray(img).reshape(-1, 3).astype(int)
    assert pix.std() > 20, "the screenshot is blank"
    for node in range(3):  # every owner's colour fills partition boxes on the map
        close = (np.abs(pix - np.array(_hex_rgb(NODE_COLORS[node]))) <= 3).all(axis=1).sum()
        assert close > 2000, f"node {node}'s colour covers only {close} pixels of the screenshot"


# -- distspatial serve as a process --------------------------------------------------------------------------------
def test_cli_serve_subprocess(ray_local, svc, tmp_path):
    """``distspatial serve`` joined to the test's Ray runtime: serves on a free port, answers exactly, and stops
    cleanly (exit 0) on SIGTERM."""
    pts = np.random.default_rng(21).random((3000, 2))
    np.save(tmp_path / "pts.npy", pts)
    address = ray_local.get_runtime_context().gcs_address
    srv = ServeProcess([str(tmp_path / "pts.npy"), "--address", address, "--nodes", "2", "--port", "0",
                        "--no-progress", "--batch-wait-ms", "2", "--max-batch", "64", "--max-queue", "32",
                        "--body-timeout-s", "5", "--request-timeout-s", "20"], timeout_s=90)
    url = srv.url
    try:
        assert requests.get(url + "/health", timeout=TIMEOUT).json()["points"] == 3000
        q = np.random.default_rng(22).random((40, 2))
        r = requests.post(url + "/knn", json={"points": q.tolist(), "k": 5}, timeout=TIMEOUT)
        d, i = cKDTree(pts).query(q, 5)
        np.testing.assert_array_equal(r.json()["ids"], i)
        np.testing.assert_allclose(r.json()["distances"], d, rtol=0, atol=1e-12)
        assert 'id="map"' in requests.get(url + "/", timeout=TIMEOUT).text
        adm = requests.get(url + "/stats", timeout=TIMEOUT).json()["service"]["admission"]
        assert adm["max_queue"] == 32  # the options reached the service
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0, srv.output
    finally:
        srv.kill()
    lines = srv.lines
    assert any("stopped serving" in ln for ln in lines), "".join(lines)


def test_cli_serve_bad_options_fail_fast(tmp_path, capsys):
    from distspatial.ui.cli import main

    np.save(tmp_path / "p.npy", np.zeros((10, 2)))
    assert main(["serve", str(tmp_path / "p.npy"), "--port", "70000"]) == 2
    assert "0..65535" in capsys.readouterr().err
    with socket.socket() as busy:  # a port in use fails before Ray or the cluster start
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        t0 = time.perf_counter()
        assert main(["serve", str(tmp_path / "p.npy"), "--port", str(port), "--no-progress"]) == 1
        assert time.perf_counter() - t0 < 10
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
