"""The HTTP query service (distspatial.ui.service) on a real socket with a real HTTP client, its status page in
headless Chromium, and ``distspatial serve`` as a subprocess. Answers are checked against scipy's cKDTree."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
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
                        "--no-progress"], timeout_s=90)
    url = srv.url
    try:
        assert requests.get(url + "/health", timeout=TIMEOUT).json()["points"] == 3000
        q = np.random.default_rng(22).random((40, 2))
        r = requests.post(url + "/knn", json={"points": q.tolist(), "k": 5}, timeout=TIMEOUT)
        d, i = cKDTree(pts).query(q, 5)
        np.testing.assert_array_equal(r.json()["ids"], i)
        np.testing.assert_allclose(r.json()["distances"], d, rtol=0, atol=1e-12)
        assert 'id="map"' in requests.get(url + "/", timeout=TIMEOUT).text
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
