"""Named clusters: a controller actor that outlives its creator, clients that attach, restarts and kills.

Everything runs on a real Ray runtime started by `ray start --head` (it outlives the drivers, as in a deployment)
with real driver processes that exit or are killed with SIGKILL; answers are checked against scipy's cKDTree.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import ray
from scipy.spatial import cKDTree

from distspatial import DistributedSpatialCluster, NodeConfig
from distspatial.core.errors import ClusterExistsError, ClusterGoneError, ClusterNotFoundError

from ._ray_head import connected_head
from ._serve import ServeProcess
from .conftest import assert_knn_ids_match


@pytest.fixture(scope="module")
def ray_head():
    yield from connected_head()


N_BASE = 20_000


def _cfg(name: str, address: str, nodes: int = 2, rf: int = 1) -> NodeConfig:
    return (NodeConfig().with_name(name).with_address(address).with_node_count(nodes)
            .replace(cpus_per_node=0.2, replication_factor=rf, heartbeat_interval_ms=200))


def _base() -> np.ndarray:
    return np.random.default_rng(5).random((N_BASE, 2))


def _batch(b: int, n: int = 2_000) -> np.ndarray:
    return np.random.default_rng(100 + b).random((n, 2))


PRELUDE = textwrap.dedent(
    """
    import sys, numpy as np
    from distspatial import DistributedSpatialCluster, NodeConfig
    name, address = sys.argv[1], sys.argv[2]
    def cfg(nodes=2, rf=1):
        return (NodeConfig().with_name(name).with_address(address).with_node_count(nodes)
                .replace(cpus_per_node=0.2, replication_factor=rf, heartbeat_interval_ms=200))
    def base():
        return np.random.default_rng(5).random((20000, 2))
    """
)

CREATE_AND_LEAVE = PRELUDE + textwrap.dedent(
    """
    c = DistributedSpatialCluster(cfg(nodes=3, rf=int(sys.argv[3])))
    c.distribute_data(base())
    print("READY", c.metadata.version, flush=True)
    c.close()  # the process exits; the named cluster keeps running
    """
)

INGEST_FOREVER = PRELUDE + textwrap.dedent(
    """
    c = DistributedSpatialCluster(cfg())
    c.distribute_data(base())
    print("BASE", flush=True)
    b = 0
    while True:
        ids = c.ingest(np.random.default_rng(100 + b).random((2000, 2)))
        print("ACK", b, int(ids[0]), int(ids[-1]), flush=True)
        b += 1
    """
)

WATCHER = PRELUDE + textwrap.dedent(
    """
    c = DistributedSpatialCluster.attach(name, address)
    print("ATTACHED", flush=True)
    for line in sys.stdin:
        j, first = map(int, line.split())
        pts = np.random.default_rng(200 + j).random((50, 2)) + 2.0 + j  # far from everything else
        d, i = c.distributed_knn_search(pts, 1)
        ok = bool(np.all(d[:, 0] == 0) and np.array_equal(i[:, 0], np.arange(first, first + 50)))
        print("SEEN", j, "ok" if ok else f"WRONG {d[:3, 0]} {i[:3, 0]}", flush=True)
    """
)


def _run(script: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _check_exact(c: DistributedSpatialCluster, pts: np.ndarray, ids: np.ndarray, seed: int = 0) -> None:
    """kNN (ids too) and range answers equal cKDTree over ``pts`` whose ids are ``ids``."""
    rng = np.random.default_rng(seed)
    q = rng.random((300, 2))
    d, i = c.distributed_knn_search(q, 5)
    assert_knn_ids_match(pts, q, d, i, 5, row_ids=ids)
    tree = cKDTree(pts)
    got = c.range_search(q[:40], 0.03)
    for j in range(40):
        np.testing.assert_array_equal(got[j], np.sort(ids[tree.query_ball_point(q[j], 0.03)]))


def test_named_cluster_outlives_its_creator_and_clients_attach(ray_head):
    address, env = ray_head
    _run(CREATE_AND_LEAVE, "cities", address, "1", env=env)
    names = [c["name"] for c in DistributedSpatialCluster.list_clusters(address)]
    assert "cities" in names
    t0 = time.perf_counter()
    c = DistributedSpatialCluster.attach("cities", address)
    attach_s = time.perf_counter() - t0
    try:
        assert c.n_points == N_BASE and c.name == "cities"
        pts = _base()
        _check_exact(c, pts, np.arange(N_BASE))
        with pytest.raises(ClusterNotFoundError, match="running clusters: .*cities"):
            DistributedSpatialCluster.attach("no-such-cluster", address)
        with pytest.raises(ClusterExistsError, match="already running"):
            DistributedSpatialCluster(_cfg("cities", address))
        same = DistributedSpatialCluster(_cfg("cities", address), exist_ok=True)  # attaches instead
        assert same.n_points == N_BASE
        same.close()
        c.close()  # leaves it running
        with pytest.raises(RuntimeError, match="still runs: attach again"):
            c.distributed_knn_search(pts[0], 1)
        other = DistributedSpatialCluster.attach("cities", address)
        watcher = DistributedSpatialCluster.attach("cities", address)
        other.shutdown()  # tears the named cluster down for everyone
        assert "cities" not in [x["name"] for x in DistributedSpatialCluster.list_clusters(address)]
        t0 = time.perf_counter()
        with pytest.raises(ClusterGoneError, match="gone"):  # a clear error, not a hang
            watcher.distributed_knn_search(pts[:10], 3)
        assert time.perf_counter() - t0 < 60
        with pytest.raises(ClusterGoneError):
            watcher.ingest(pts[:10])
        with pytest.raises(ClusterNotFoundError, match="no cluster named 'cities'"):
            DistributedSpatialCluster.attach("cities", address)
    finally:
        c.close()
    print(f"attach to a {N_BASE}-point cluster: {attach_s:.2f} s")


def test_driver_killed_mid_ingest_loses_and_duplicates_nothing(ray_head):
    address, env = ray_head
    proc = subprocess.Popen([sys.executable, "-c", INGEST_FOREVER, "feed", address], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    acked: dict[int, tuple[int, int]] = {}
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            if line.startswith("ACK"):
                _, b, first, last = line.split()
                acked[int(b)] = (int(first), int(last))
                if len(acked) >= 6:
                    break
            assert time.monotonic() < deadline, "the feed did not acknowledge 6 batches in time"
        assert len(acked) >= 6, proc.stderr.read() if proc.poll() is not None else "feed stopped early"
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of the next ingest call
        proc.wait(timeout=30)
    c = DistributedSpatialCluster.attach("feed", address)
    try:
        ids = c.point_ids()
        assert len(np.unique(ids)) == len(ids), "a point is present twice"
        present = set(ids.tolist())
        assert set(range(N_BASE)) <= present
        pts, row_ids = [_base()], [np.arange(N_BASE)]
        b, first = 0, N_BASE
        while True:  # acknowledged batches are all there; the one in flight entirely or not at all
            rng_ids = np.arange(first, first + 2_000)
            held = np.isin(rng_ids, ids)
            if b in acked:
                assert acked[b] == (first, first + 1_999) and held.all(), f"acknowledged batch {b} is missing"
            elif not held.any():
                break
            assert held.all(), f"batch {b} is partly present"
            pts.append(_batch(b))
            row_ids.append(rng_ids)
            b, first = b + 1, first + 2_000
        all_ids = np.concatenate(row_ids)
        assert len(ids) == len(all_ids), "points that no batch explains"
        _check_exact(c, np.concatenate(pts), all_ids, seed=1)
    finally:
        c.shutdown()


def test_controller_restart_under_queries_and_ingest(ray_head):
    """The controller actor is killed while a client queries and ingests: Ray restarts it, it reloads its state
    from the GCS store and re-adopts the nodes; no version goes backwards, no acknowledged point is lost, answers
    stay exact, and the time until writes are taken again is measured."""
    address, _ = ray_head
    c = DistributedSpatialCluster(_cfg("restart", address))
    try:
        pts = _base()
        c.distribute_data(pts)
        stop = threading.Event()
        acked: list[tuple[int, np.ndarray, float, float]] = []  # (batch, ids, start, end)
        versions: list[int] = []
        errors: list[BaseException] = []

        def writer():
            b = 0
            try:
                while not stop.is_set():
                    t0 = time.monotonic()
                    ids = c.ingest(_batch(b, 1_000))
                    acked.append((b, ids, t0, time.monotonic()))
                    versions.append(c.runtime.version)
                    b += 1
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        def reader():
            rng = np.random.default_rng(3)
            try:
                while not stop.is_set():
                    rows = rng.choice(N_BASE, 20, replace=False)
                    d, i = c.distributed_knn_search(pts[rows], 1)  # the base points are always there
                    assert np.all(d[:, 0] == 0) and np.array_equal(i[:, 0], rows)
                    versions.append(c.runtime.version)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while len(acked) < 5 and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
        before = c.runtime.call_controller("info")
        kill_at = time.monotonic()
        ray.kill(ray.get_actor("restart:controller", namespace="distspatial"), no_restart=False)
        while not any(a[2] > kill_at for a in acked) and time.monotonic() < deadline and not errors:
            time.sleep(0.05)  # until a write started after the kill is acknowledged
        n_after = len(acked) + 3
        while len(acked) < n_after and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(timeout=120)
            assert not t.is_alive()
        assert not errors, errors
        info = c.runtime.call_controller("info")
        assert info["restarts"] == before["restarts"] + 1, "the controller was restarted by Ray"
        assert info["version"] > before["version"], "no version goes backwards"
        assert c.metadata.version >= max(versions)
        resumed = min(a[3] for a in acked if a[2] > kill_at) - kill_at
        print(f"controller restart: writes taken again {resumed:.2f} s after the kill")
        ids = c.point_ids()
        assert len(np.unique(ids)) == len(ids)
        all_ids = np.concatenate([np.arange(N_BASE)] + [a[1] for a in acked])
        assert len(ids) == len(all_ids) and np.array_equal(np.sort(all_ids), ids), "acknowledged points lost"
        _check_exact(c, np.concatenate([pts] + [_batch(a[0], 1_000) for a in acked]), all_ids, seed=2)
    finally:
        c.shutdown()


def test_a_second_client_process_sees_each_acknowledged_batch(ray_head):
    address, env = ray_head
    c = DistributedSpatialCluster(_cfg("shared", address))
    try:
        c.distribute_data(_base())
        w = subprocess.Popen([sys.executable, "-c", WATCHER, "shared", address], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert w.stdout.readline().strip() == "ATTACHED", w.stderr.read()
            for j in range(5):
                pts = np.random.default_rng(200 + j).random((50, 2)) + 2.0 + j
                ids = c.ingest(pts)
                w.stdin.write(f"{j} {ids[0]}\n")
                w.stdin.flush()
                assert w.stdout.readline().split() == ["SEEN", str(j), "ok"]
        finally:
            w.kill()
            w.wait(timeout=30)
    finally:
        c.shutdown()


def test_a_node_killed_after_the_creator_exited_is_recovered(ray_head):
    address, env = ray_head
    _run(CREATE_AND_LEAVE, "orphan", address, "2", env=env)
    c = DistributedSpatialCluster.attach("orphan", address)
    try:
        victim = c.runtime.actors[0]
        ray.kill(victim, no_restart=True)  # nobody but the controller watches this cluster now
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            h = c.runtime.call_controller("health")
            if 0 in h["failed_nodes"] and not h["under_replicated"]:
                break
            time.sleep(0.2)
        assert 0 in h["failed_nodes"] and not h["under_replicated"], h
        c.runtime.refresh()
        assert all(0 not in p.owners and len(p.owners) == 2 for p in c.metadata.partitions)
        _check_exact(c, _base(), np.arange(N_BASE), seed=4)
    finally:
        c.shutdown()


def _cli(*args: str, env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distspatial.ui.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_command_line_up_query_serve_down(ray_head, tmp_path):
    """`distspatial up` starts a named cluster and returns; knn/stats/serve work on it with --cluster (no input
    read again); `ls` lists it; `down` tears it down; the errors are one clear line with exit status 2."""
    import pyarrow.parquet as pq
    import requests

    address, env = ray_head
    pts = _base()
    np.save(tmp_path / "pts.npy", pts)
    q = np.random.default_rng(9).random((50, 2))
    np.save(tmp_path / "q.npy", q)
    up = _cli("up", "cli", str(tmp_path / "pts.npy"), "--address", address, "--nodes", "2", "--no-progress",
              env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "serves 20,000 points" in up.stdout
    ls = _cli("ls", "--address", address, env=env)
    assert ls.returncode == 0 and "cli" in ls.stdout and "20000" in ls.stdout, ls.stdout + ls.stderr
    knn = _cli("knn", "--cluster", "cli", "--address", address, "--queries", str(tmp_path / "q.npy"), "-k", "3",
               "-o", str(tmp_path / "knn.parquet"), "--no-progress", env=env)
    assert knn.returncode == 0, knn.stdout + knn.stderr
    t = pq.read_table(tmp_path / "knn.parquet").to_pydict()
    order = np.lexsort((np.asarray(t["rank"]), np.asarray(t["query"])))
    d, i = cKDTree(pts).query(q, 3)
    np.testing.assert_array_equal(np.asarray(t["id"])[order].reshape(50, 3), i)
    np.testing.assert_allclose(np.asarray(t["distance"])[order].reshape(50, 3), d, rtol=0, atol=1e-12)
    stats = _cli("stats", "--cluster", "cli", "--address", address, env=env)
    assert stats.returncode == 0 and "20,000 points" in stats.stdout, stats.stdout + stats.stderr
    # errors: an unknown cluster, both INPUT and --cluster, a name that exists
    bad = _cli("knn", "--cluster", "nope", "--address", address, "--queries", str(tmp_path / "q.npy"), env=env)
    assert bad.returncode == 2 and "running clusters: " in bad.stderr and "cli" in bad.stderr, bad.stderr
    both = _cli("stats", str(tmp_path / "pts.npy"), "--cluster", "cli", "--address", address, env=env)
    assert both.returncode == 2 and "not both" in both.stderr, both.stderr
    again = _cli("up", "cli", str(tmp_path / "pts.npy"), "--address", address, "--no-progress", env=env)
    assert again.returncode == 2 and "already running" in again.stderr, again.stderr
    # serve --cluster: answers from the running cluster; an ingest through it is seen by every client
    srv = ServeProcess(["--cluster", "cli", "--address", address, "--port", "0", "--no-progress"], env=env)
    try:
        r = requests.post(srv.url + "/knn", json={"points": q.tolist(), "k": 3}, timeout=60)
        np.testing.assert_array_equal(r.json()["ids"], i)
        new = np.array([[5.0, 5.0]])
        got = requests.post(srv.url + "/ingest", json={"points": new.tolist()}, timeout=60).json()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0, srv.output
    finally:
        srv.kill()
    c = DistributedSpatialCluster.attach("cli", address)  # the service stopped; the cluster and its data did not
    try:
        assert c.n_points == N_BASE + 1
        d1, i1 = c.distributed_knn_search(new[0], 1)
        assert d1[0] == 0 and i1[0] == got["ids"][0]
    finally:
        c.close()
    down = _cli("down", "cli", "--address", address, env=env)
    assert down.returncode == 0 and "is down" in down.stdout, down.stdout + down.stderr
    assert "cli" not in [x["name"] for x in DistributedSpatialCluster.list_clusters(address)]
    gone = _cli("down", "cli", "--address", address, env=env)
    assert gone.returncode == 2 and "no cluster named 'cli'" in gone.stderr, gone.stderr


def test_a_token_guards_writes_and_teardown_of_a_named_cluster(ray_head, monkeypatch):
    """A cluster created with a token: a client attached without it (or with a wrong one) may query but not
    ingest, delete or tear down; with it (given, or in DISTSPATIAL_TOKEN) it may. Only a salted hash is stored,
    and the check survives a controller restart."""
    import secrets

    from ray.experimental import internal_kv

    from distspatial.core.errors import AccessDeniedError

    address, _ = ray_head
    monkeypatch.delenv("DISTSPATIAL_TOKEN", raising=False)
    token = secrets.token_urlsafe(24)
    pts = _base()[:5000]
    owner = DistributedSpatialCluster(_cfg("guarded", address).with_token(token))
    try:
        owner.distribute_data(pts)
        assert owner.config.token is None and token not in repr(_cfg("x", address).with_token(token))
        raw = internal_kv._internal_kv_get(b"guarded/state", namespace="distspatial")
        assert raw and token.encode() not in raw  # the stored state holds a salted HMAC, not the token
        stranger = DistributedSpatialCluster.attach("guarded", address)
        d, i = stranger.distributed_knn_search(pts[:20], 1)  # reads stay open
        np.testing.assert_array_equal(i[:, 0], np.arange(20))
        with pytest.raises(AccessDeniedError, match="created with a token and ingest needs it"):
            stranger.ingest(_batch(0, 10))
        with pytest.raises(AccessDeniedError, match="delete needs it"):
            stranger.delete([0, 1])
        with pytest.raises(AccessDeniedError, match="shutdown needs it"):
            stranger.shutdown()
        with pytest.raises(AccessDeniedError):
            stranger.rebalance()
        assert "guarded" in [x["name"] for x in DistributedSpatialCluster.list_clusters(address)]
        assert stranger.n_points == len(pts)  # nothing changed, and the refused client still works
        wrong = DistributedSpatialCluster.attach("guarded", address, token=secrets.token_urlsafe(24))
        with pytest.raises(AccessDeniedError, match="not the one it was created with"):
            wrong.ingest(_batch(0, 10))
        wrong.close()

        ray.kill(ray.get_actor("guarded:controller", namespace="distspatial"), no_restart=False)
        with pytest.raises(AccessDeniedError):  # the restarted controller read its verifier back
            stranger.delete([0])
        holder = DistributedSpatialCluster.attach("guarded", address, token=token)
        new = holder.ingest(_batch(1, 10))
        assert holder.delete(new[:4]) == 4 and holder.n_points == len(pts) + 6
        monkeypatch.setenv("DISTSPATIAL_TOKEN", token)
        from_env = DistributedSpatialCluster.attach("guarded", address)
        assert from_env.delete(new[4:]) == 6
        from_env.close()
        stranger.close()
        holder.shutdown()
        assert "guarded" not in [x["name"] for x in DistributedSpatialCluster.list_clusters(address)]
    finally:
        if "guarded" in [x["name"] for x in DistributedSpatialCluster.list_clusters(address)]:
            DistributedSpatialCluster.attach("guarded", address, token=token).shutdown()
        owner.close()
