"""Access control of the HTTP service: tokens and scopes on a real ``distspatial serve`` process, read-only mode and
CORS on a real uvicorn server, the refusal to listen beyond this machine without auth, the audit log, and the
status page asking for a token in headless Chromium. The token must never show up in logs, answers or the page."""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service needs the 'serve' extra: pip install 'distspatial[serve]'")
pytest.importorskip("uvicorn", reason="the service needs the 'serve' extra: pip install 'distspatial[serve]'")
requests = pytest.importorskip("requests", reason="the tests' HTTP client: pip install 'distspatial[webtest]'")

from scipy.spatial import cKDTree  # noqa: E402

from distspatial import DistributedSpatialCluster, NodeConfig  # noqa: E402
from distspatial.core.access import TokenFileError, TokenSet, load_token_file  # noqa: E402
from distspatial.ui.service import BackgroundServer  # noqa: E402

from ._serve import ServeProcess  # noqa: E402
from .test_service import _chromium  # noqa: E402

TIMEOUT = 30
READ = secrets.token_urlsafe(24)
WRITE = secrets.token_urlsafe(24)
WRONG = secrets.token_urlsafe(24)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    """``distspatial serve`` with a token file (a read token 'viewer', a write token 'alice') on 3,000 points."""
    d = tmp_path_factory.mktemp("access")
    pts = np.random.default_rng(31).random((3000, 2))
    np.save(d / "pts.npy", pts)
    tokens = d / "tokens"
    tokens.write_text(f"# who may do what\nread:viewer: {READ}\n\nwrite:alice: {WRITE}\n")
    tokens.chmod(0o600)
    address = ray_local.get_runtime_context().gcs_address
    srv = ServeProcess([str(d / "pts.npy"), "--address", address, "--nodes", "2", "--port", "0", "--no-progress",
                        "--token-file", str(tokens)], env={**os.environ, "DISTSPATIAL_TOKEN": ""}, timeout_s=90)
    try:
        yield dataclasses.make_dataclass("Served", ["url", "points", "proc"])(srv.url, pts, srv)
    finally:
        srv.kill()


def test_tokens_and_scopes_on_every_path(served):
    url, seen = served.url, []

    def call(method: str, path: str, headers: dict | None = None, **kw) -> requests.Response:
        r = requests.request(method, url + path, headers=headers, timeout=TIMEOUT, **kw)
        seen.append(r)
        return r

    knn = {"json": {"points": [0.5, 0.5], "k": 3}}
    reads = [("POST", "/knn", knn), ("POST", "/range", {"json": {"points": [0.5, 0.5], "radius": 0.01}}),
             ("POST", "/box", {"json": {"lo": [0.1, 0.1], "hi": [0.2, 0.2]}}), ("GET", "/stats", {}),
             ("GET", "/status.json", {})]
    writes = [("POST", "/ingest", {"json": {"points": [[7.0, 7.0], [7.5, 7.5]]}}), ("POST", "/delete",
                                                                                   {"json": {"ids": [0]}})]
    for method, path, kw in reads + writes:  # no token, a wrong one, a malformed header: 401 with a JSON detail
        for headers, says in ((None, "needs a token"), (bearer(WRONG), "not one this service accepts"),
                              ({"Authorization": f"Basic {WRONG}"}, "must be 'Bearer <token>'")):
            r = call(method, path, headers, **kw)
            assert r.status_code == 401, (path, r.status_code, r.text)
            assert says in r.json()["detail"] and r.headers["WWW-Authenticate"].startswith("Bearer")
    for method, path, kw in reads:  # a read token reads
        assert call(method, path, bearer(READ), **kw).status_code == 200, path
    for method, path, kw in writes:  # ... but may not write: 403 naming the token and the scope needed
        r = call(method, path, bearer(READ), **kw)
        assert r.status_code == 403 and "token 'viewer' has the read scope" in r.json()["detail"], r.text
        assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    r = call("POST", "/ingest", bearer(WRITE), json={"points": [[7.0, 7.0], [7.5, 7.5]]})  # a write token writes
    assert r.status_code == 200, r.text
    new = r.json()["ids"]
    r = call("POST", "/knn", bearer(WRITE), json={"points": [7.0, 7.0], "k": 1})  # ... and reads
    assert r.json()["ids"] == [new[0]] and r.json()["distances"] == [0.0]
    r = call("POST", "/delete", bearer(WRITE), json={"ids": new})
    assert r.status_code == 200 and r.json()["deleted"] == 2
    q = np.random.default_rng(3).random((20, 2))  # answers are still exact
    r = call("POST", "/knn", bearer(READ), json={"points": q.tolist(), "k": 4})
    np.testing.assert_array_equal(r.json()["ids"], cKDTree(served.points).query(q, 4)[1])

    # public without a token: the status page's HTML (no data in it) and /health (status and reason only)
    page = call("GET", "/")
    assert page.status_code == 200 and 'id="auth"' in page.text
    health = call("GET", "/health").json()
    assert set(health) == {"status", "reason"} and health["status"] == "ok"
    assert "points" in call("GET", "/health", bearer(READ)).json()
    assert "bearer" in call("GET", "/openapi.json").json()["components"]["securitySchemes"]
    # browser hygiene on every answer; no CORS without --cors-origin; writes from other origins refused
    for r in seen:
        assert r.headers["X-Content-Type-Options"] == "nosniff", r.url
        assert "default-src 'none'" in r.headers["Content-Security-Policy"] and "frame-ancestors 'none'" in \
            r.headers["Content-Security-Policy"]
    assert "'unsafe-inline'" not in page.headers["Content-Security-Policy"]
    r = call("POST", "/knn", {**bearer(READ), "Origin": "https://elsewhere.example"}, **knn)
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers
    r = call("POST", "/delete", {**bearer(WRITE), "Origin": "https://elsewhere.example"}, json={"ids": [1]})
    assert r.status_code == 403 and "another origin" in r.json()["detail"]
    r = call("OPTIONS", "/knn", {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers

    # /stats counts refusals per reason and accepted writes; it names tokens, never shows one
    stats = call("GET", "/stats", bearer(READ))
    access = stats.json()["service"]["access"]
    assert access["auth"] == "token" and access["tokens"] == {"read": ["viewer"], "write": ["alice"]}
    assert access["refused"]["missing_token"] == 7 and access["refused"]["invalid_token"] == 14
    assert access["refused"]["insufficient_scope"] == 2 and access["refused"]["cross_origin"] == 2
    assert access["writes_accepted"] == 2

    # the audit log (the service's stderr): one line per write let through, with the token's name
    served.proc.proc.send_signal(signal.SIGTERM)
    assert served.proc.proc.wait(60) == 0, served.proc.output
    served.proc.kill()
    out = served.proc.output
    audit = [ln for ln in out.splitlines() if ln.startswith("distspatial audit: write ")]
    assert len(audit) == 2, out
    assert "token=alice method=POST endpoint=/ingest status=200 points=2" in audit[0]
    assert "endpoint=/delete status=200 points=2" in audit[1] and "client=127.0.0.1:" in audit[1]
    assert "tokens required (read: viewer, write: alice)" in out
    for text in [out] + [r.text for r in seen] + [str(dict(r.headers)) for r in seen]:
        for token in (READ, WRITE, WRONG):
            assert token not in text, "a token leaked"


def test_read_only_and_cors(ray_local):
    cfg = dataclasses.replace(NodeConfig().with_node_count(2), cpus_per_node=0.1)
    pts = np.random.default_rng(4).random((2000, 2))
    cluster = DistributedSpatialCluster(cfg)
    try:
        cluster.distribute_data(pts)
        with pytest.raises(ValueError, match="refusing to listen on 0.0.0.0 without authentication"):
            BackgroundServer(cluster, host="0.0.0.0")
        with BackgroundServer(cluster, read_only=True, cors_origins=("https://app.example",)) as srv:
            for path, body in (("/ingest", {"points": [[0.5, 0.5]]}), ("/delete", {"ids": [1]})):
                r = requests.post(srv.url + path, json=body, timeout=TIMEOUT)
                assert r.status_code == 405 and "read-only" in r.json()["detail"] and "Allow" in r.headers
            r = requests.post(srv.url + "/knn", json={"points": [0.5, 0.5], "k": 2}, timeout=TIMEOUT,
                              headers={"Origin": "https://app.example"})
            assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert r.json()["ids"] == cKDTree(pts).query([0.5, 0.5], 2)[1].tolist()
            pre = requests.options(srv.url + "/knn", timeout=TIMEOUT, headers={
                "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            assert pre.status_code == 204 and "Authorization" in pre.headers["Access-Control-Allow-Headers"]
            assert requests.get(srv.url + "/stats", timeout=TIMEOUT).json()["service"]["access"]["refused"][
                "read_only"] == 2
        assert cluster.n_points == 2000  # nothing was written
    finally:
        cluster.shutdown()


def _serve_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distspatial.ui.cli", "serve", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "DISTSPATIAL_TOKEN": "", **(env or {})})


def test_refuses_to_serve_beyond_this_machine_without_auth(tmp_path, capsys, monkeypatch):
    from distspatial.ui.cli import main

    np.save(tmp_path / "p.npy", np.random.default_rng(0).random((50, 2)))
    p = str(tmp_path / "p.npy")
    r = _serve_cli(p, "--host", "0.0.0.0", "--port", "0", "--no-progress")  # a real process: exit 2, one line
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to listen on 0.0.0.0 without authentication" in lines[0], r.stderr
    assert "--token-file" in lines[0] and "--read-only" in lines[0] and "--insecure-no-auth" in lines[0]
    monkeypatch.delenv("DISTSPATIAL_TOKEN", raising=False)
    assert main(["serve", p, "--token", WRITE, "--no-progress"]) == 2  # never on the command line
    err = capsys.readouterr().err
    assert "not taken on the command line" in err and WRITE not in err, err
    bad = tmp_path / "bad"
    bad.write_text(f"read: {READ}\nadmin: {WRITE}\n")
    bad.chmod(0o600)
    assert main(["serve", p, "--token-file", str(bad), "--host", "0.0.0.0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "line 2: unknown scope 'admin'" in err and READ not in err and WRITE not in err, err
    monkeypatch.setenv("DISTSPATIAL_TOKEN", "short")
    assert main(["serve", p, "--host", "0.0.0.0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "at least 16" in err and "short" not in err, err


def test_token_file_format(tmp_path):
    f = tmp_path / "t"
    f.write_text(f"read: {READ}\nwrite:alice: {WRITE}\nwrite:bob@ci: {WRONG}\n")
    f.chmod(0o644)
    with pytest.warns(UserWarning, match="can be read by other users .*chmod 600"):
        ts = load_token_file(f)
    assert ts.scopes() == {"read": ["read"], "write": ["alice", "bob@ci"]}
    assert ts.check(WRITE).name == "alice" and ts.check(READ).scope == "read" and ts.check("x" * 30) is None
    assert READ not in repr(ts)
    f.chmod(0o600)
    for text, says in ((f"read {READ}\n", "line 1: expected 'SCOPE: TOKEN'"),
                       (f"read: {READ}\nread: {WRITE}\n", "two tokens are named 'read'"),
                       (f"read: {READ}\nwrite:w: {READ}\n", "are the same token"),
                       ("write: abc\n", "line 1: the token is 3 characters long"),
                       ("# nothing\n\n", "holds no tokens"),
                       ("write:: " + WRITE + "\n", "a token name is")):
        f.write_text(text)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(TokenFileError, match=says) as info:
                load_token_file(f)
        assert READ not in str(info.value) and WRITE not in str(info.value)
    with pytest.raises(TokenFileError, match="no such file"):
        load_token_file(tmp_path / "missing")
    assert TokenSet.from_env({"DISTSPATIAL_TOKEN": WRITE}).check(WRITE).name == "env"
    assert TokenSet.from_env({}) is None


def test_status_page_asks_for_a_token_in_headless_chromium(ray_local):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium missing: pip install 'distspatial[webtest]'")
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    found = _chromium()
    if found is None:
        pytest.skip("chromium and chromedriver not installed (apt-get install chromium chromium-driver)")
    browser, driver_path = found
    cfg = dataclasses.replace(NodeConfig().with_node_count(2), cpus_per_node=0.1)
    cluster = DistributedSpatialCluster(cfg)
    tokens = TokenSet.from_tokens([("viewer", "read", READ), ("alice", "write", WRITE)])
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        cluster.distribute_data(np.random.default_rng(8).random((4000, 2)))
        with BackgroundServer(cluster, tokens=tokens, status_interval_s=0.2) as srv:
            drv = webdriver.Chrome(service=Service(driver_path), options=opts)
            try:
                drv.set_page_load_timeout(30)
                drv.get(srv.url + "/")
                wait = WebDriverWait(drv, 20, ignored_exceptions=(StaleElementReferenceException,))
                body = lambda d: d.find_element(By.TAG_NAME, "body")  # noqa: E731
                wait.until(lambda d: body(d).get_attribute("data-auth") == "needed")
                form = drv.find_element(By.ID, "auth")
                assert form.is_displayed() and "needs a token" in form.text
                assert drv.find_element(By.ID, "conn").text == "token needed"
                assert drv.find_element(By.ID, "total-points").text == "\u2013"  # no data without a token

                def enter(token: str) -> None:
                    drv.find_element(By.ID, "token").send_keys(token)
                    drv.find_element(By.ID, "token-submit").click()

                enter(WRONG)
                wait.until(lambda d: body(d).get_attribute("data-auth") == "needed"
                           and "not accepted" in d.find_element(By.ID, "auth").text)
                enter(READ)
                wait.until(lambda d: int(body(d).get_attribute("data-updates") or 0) >= 2)  # live data, polled
                assert not drv.find_element(By.ID, "auth").is_displayed()
                wait.until(lambda d: d.find_element(By.ID, "total-points").text == "4,000")
                assert drv.find_element(By.ID, "conn").text == "live"
                assert len(drv.find_elements(By.CSS_SELECTOR, "#map rect.partition")) == cluster.metadata.n_partitions
                # the token is in the page's memory only: not in the URL, the document or web storage
                assert READ not in drv.current_url and READ not in drv.page_source
                assert drv.execute_script("return window.localStorage.length + window.sessionStorage.length") == 0
                assert drv.execute_script("return document.cookie") == ""
                problems = [e["message"] for e in drv.get_log("browser")
                            if "Content Security Policy" in e["message"] or e["level"] == "SEVERE"
                            and "401" not in e["message"]]
                assert not problems, problems  # the CSP lets the page's own script and style run, nothing else
            finally:
                drv.quit()
    finally:
        cluster.shutdown()
