"""The HTTP service hosted by every node (``distspatial serve --on-nodes``, issue #15): each node's process serves
the same port (SO_REUSEPORT) and answers gathered batches from the partitions it holds, without a Ray call.
Real Ray runtime and node processes, real HTTP over fresh connections (the kernel picks the node per
connection); answers checked against scipy's cKDTree and NumPy brute force."""

from __future__ import annotations

import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray
from scipy.spatial import cKDTree

pytest.importorskip("fastapi", reason="the service needs the 'serve' extra: pip install 'distspatial[serve]'")
requests = pytest.importorskip("requests", reason="the tests' HTTP client: pip install 'distspatial[webtest]'")

from distspatial import DistributedSpatialCluster, NodeConfig  # noqa: E402
from distspatial.ui.service import serve_here  # noqa: E402

from ._serve import ServeProcess  # noqa: E402

TIMEOUT = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            requests.get(url + "/health", timeout=5).raise_for_status()
            return
        except requests.RequestException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _wait_gone(pid: int, timeout_s: float = 60.0) -> None:
    """Wait until process ``pid`` has exited (Ray reports an actor dead a moment before its process is gone)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:  # a zombie keeps its pid until reaped, but not its sockets
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[-1].startswith("Z"):
                    return
        except OSError:
            return
        assert time.monotonic() < deadline, f"process {pid} did not exit"
        time.sleep(0.05)


def _check_answers(url: str, pts: np.ndarray, q: np.ndarray) -> None:
    """kNN, range and box answers of requests on fresh connections (8 at a time) equal the references."""
    tree = cKDTree(pts)

    def knn(x):
        return requests.post(url + "/knn", json={"points": x.tolist(), "k": 7}, timeout=TIMEOUT).json()

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(knn, q))
    d, i = tree.query(q, 7)
    np.testing.assert_allclose([g["distances"] for g in got], d, rtol=0, atol=1e-12)
    np.testing.assert_array_equal([g["ids"] for g in got], i)  # uniform random points: no ties
    for x in q[:10]:
        r = requests.post(url + "/range", json={"points": x.tolist(), "radius": 0.05}, timeout=TIMEOUT).json()
        np.testing.assert_array_equal(np.sort(r["ids"]), np.sort(tree.query_ball_point(x, 0.05)))
        lo, hi = x - 0.04, x + 0.02
        r = requests.post(url + "/box", json={"lo": lo.tolist(), "hi": hi.tolist()}, timeout=TIMEOUT).json()
        np.testing.assert_array_equal(np.sort(r["ids"]), np.flatnonzero(np.all((pts >= lo) & (pts <= hi), 1)))


def test_every_node_serves_the_port_and_a_killed_node_leaves_the_others_serving(ray_local):
    pts = np.random.default_rng(31).random((20_000, 2))
    cfg = NodeConfig().with_node_count(2).replace(replication_factor=2, cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        c.progress = False
        c.distribute_data(pts)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        assert c.host_on_nodes("http", serve_here, "127.0.0.1", port, {"inline_batches": True}) == [0, 1]
        _wait_ready(url)
        for node in (0, 1):
            assert ray.get(c._rt.actors[node].hosted.remote()) == ["http"]
        # hosting again starts nothing new (the supervisor calls this every second)
        assert c.host_on_nodes("http", serve_here, "127.0.0.1", port, {"inline_batches": True}) == [0, 1]
        q = np.random.default_rng(32).random((200, 2))
        _check_answers(url, pts, q)
        victim = c._rt.actors[1]
        pid = ray.get(victim.ping.remote())["pid"]
        ray.kill(victim, no_restart=True)
        _wait_gone(pid)  # its listening socket closes with the process (connections it held are lost)
        # the dead node's listener is gone with its process: fresh connections reach node 0 only
        _check_answers(url, pts, q[:80])
        assert 0 in c.host_on_nodes("http", serve_here, "127.0.0.1", port, {"inline_batches": True})


def test_cli_serve_on_nodes(ray_local, tmp_path):
    """``distspatial serve --on-nodes``: serves from the nodes on one port, answers exactly, stops on SIGTERM."""
    pts = np.random.default_rng(33).random((5000, 2))
    np.save(tmp_path / "pts.npy", pts)
    address = ray_local.get_runtime_context().gcs_address
    srv = ServeProcess([str(tmp_path / "pts.npy"), "--address", address, "--nodes", "2", "--replication", "2",
                        "--on-nodes", "--port", "0", "--no-progress"], timeout_s=120)
    try:
        assert "from nodes [0, 1]" in srv.output
        assert requests.get(srv.url + "/health", timeout=TIMEOUT).json()["points"] == 5000
        _check_answers(srv.url, pts, np.random.default_rng(34).random((60, 2)))
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0, srv.output
    finally:
        srv.kill()
    assert any("stopped serving" in ln for ln in srv.lines), "".join(srv.lines)


def test_cli_serve_on_nodes_refuses_options_that_do_not_apply(tmp_path, capsys):
    from distspatial.ui.cli import main

    np.save(tmp_path / "p.npy", np.zeros((10, 2)))
    assert main(["serve", str(tmp_path / "p.npy"), "--on-nodes", "--low-latency", "--no-progress"]) != 0
    assert "--on-nodes serves from the nodes" in capsys.readouterr().err
