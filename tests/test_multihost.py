"""A multi-host test: three test hosts in network namespaces made here (veth pairs on a bridge, private addresses
inside the namespaces), a Ray head and two Ray workers on them, the cluster spread across them; then one host
is cut off (its link set down). The cut must be detected as a network partition, every answer must stay exact,
and redundancy must come back on the hosts still reachable.

Needs root and `ip netns`; skips with the reason otherwise. Traffic stays inside the namespaces this test makes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
TAG = uuid.uuid4().hex[:4]
BRIDGE = f"dsbr{TAG}"
SUBNET = "10.213.7"
HOSTS = [(f"dsh{TAG}{i}", f"{SUBNET}.{10 + i}") for i in range(3)]
PORT = 6411

DRIVER = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from scipy.spatial import cKDTree
    from distspatial import DistributedSpatialCluster, NodeConfig
    from distspatial.io.datasets import skewed_points

    address, workdir, victim_ip = sys.argv[1], sys.argv[2], sys.argv[3]
    pts = skewed_points(30_000, 2, seed=61)
    q = skewed_points(1_000, 2, seed=61, sample_seed=1)
    ref, _ = cKDTree(pts).query(q, 10)
    cfg = NodeConfig().with_node_count(3).with_fault_tolerance(True).with_address(address).replace(
        cpus_per_node=0.5, heartbeat_interval_ms=200, communication_timeout_ms=3_000)
    out = {}
    with DistributedSpatialCluster(cfg) as c:
        c.distribute_data(pts)
        ips = {i: info["ip"] for i, info in c.node_info.items()}
        out["node_ips"] = ips
        victim = [i for i, ip in ips.items() if ip == victim_ip]
        out["victim"] = victim
        d, _ = c.distributed_knn_search(q, 10)
        out["exact_before"] = bool(np.allclose(d, ref, rtol=0, atol=1e-12))
        open(workdir + "/READY", "w").write("1")
        while not __import__("os").path.exists(workdir + "/CUT"):
            time.sleep(0.05)
        t0 = time.time()
        exact = []
        while time.time() - t0 < 25:
            d, _ = c.distributed_knn_search(q, 10)
            exact.append(bool(np.allclose(d, ref, rtol=0, atol=1e-12)))
            h = c.health()
            if not h["under_replicated"] and h["failed_nodes"]:
                break
        out["exact_after"] = exact
        h = c.health()
        out["health"] = {str(k): v for k, v in h["nodes"].items()}
        out["failed_nodes"] = h["failed_nodes"]
        out["under_replicated"] = h["under_replicated"]
        out["seconds_to_redundancy"] = time.time() - t0
        everything = c.range_search(np.full(2, 0.5), 2.0)
        out["all_points"] = bool(np.array_equal(everything, np.arange(len(pts))))
        json.dump(out, open(workdir + "/result.json", "w"))
    """
)


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, check=check)


def _netns_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make network namespaces"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"dsprobe{TAG}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot make a network namespace here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if not os.path.exists(RAY):
        return "the `ray` command line is not installed next to this Python"
    return None


@pytest.fixture()
def hosts(tmp_path):
    reason = _netns_available()
    if reason:
        pytest.skip(reason)
    procs: list[subprocess.Popen] = []
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    try:
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
        _sh("ip", "link", "set", BRIDGE, "up")
        for i, (ns, ip) in enumerate(HOSTS):
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", f"{ns}r", "type", "veth", "peer", "name", f"{ns}n")
            _sh("ip", "link", "set", f"{ns}n", "netns", ns)
            _sh("ip", "link", "set", f"{ns}r", "master", BRIDGE)
            _sh("ip", "link", "set", f"{ns}r", "up")
            _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", f"{ns}n")
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", f"{ns}n", "up")
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        head_ns, head_ip = HOSTS[0]
        for i, (ns, ip) in enumerate(HOSTS):
            temp = f"/tmp/dsnet{TAG}{i}"
            args = ["ip", "netns", "exec", ns, RAY, "start", "--block", f"--node-ip-address={ip}", "--num-cpus=1",
                    "--object-store-memory=100000000", f"--temp-dir={temp}"]
            args += ["--head", f"--port={PORT}", "--include-dashboard=false"] if i == 0 else [f"--address={head_ip}:{PORT}"]
            log = open(tmp_path / f"ray-{i}.log", "w")
            procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
            if i == 0:
                _wait_ray(head_ns, f"{head_ip}:{PORT}", env, nodes=1)
        _wait_ray(head_ns, f"{head_ip}:{PORT}", env, nodes=3)
        yield env, tmp_path
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        for i, (ns, _) in enumerate(HOSTS):
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            subprocess.run(["ip", "link", "del", f"{ns}r"], capture_output=True)
            shutil.rmtree(f"/tmp/dsnet{TAG}{i}", ignore_errors=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


def _wait_ray(ns: str, address: str, env: dict, nodes: int, timeout: float = 90) -> None:
    code = f"import ray; ray.init(address='{address}', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60, env=env)
        last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
        if r.returncode == 0 and last.isdigit() and int(last) >= nodes:
            return
        time.sleep(1)
    pytest.fail(f"Ray cluster in the namespaces did not reach {nodes} nodes: {last}")


def test_host_cut_off_is_a_network_partition_and_recovered(hosts):
    env, work = hosts
    head_ns, head_ip = HOSTS[0]
    victim_ns, victim_ip = HOSTS[2]
    driver = subprocess.Popen(
        ["ip", "netns", "exec", head_ns, sys.executable, "-c", DRIVER, f"{head_ip}:{PORT}", str(work), victim_ip],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    deadline = time.monotonic() + 180
    while not (work / "READY").exists():
        if driver.poll() is not None or time.monotonic() > deadline:
            out = driver.communicate(timeout=30)[0] if driver.poll() is not None else ""
            driver.kill()
            pytest.fail(f"driver did not get ready: {out[-3000:]}")
        time.sleep(0.2)
    _sh("ip", "link", "set", f"{victim_ns}r", "down")  # cut the host off: its link goes down
    (work / "CUT").write_text("1")
    try:
        out = driver.communicate(timeout=240)[0]
    except subprocess.TimeoutExpired:
        driver.kill()
        pytest.fail("driver hung after the cut")
    assert driver.returncode == 0, out[-3000:]
    res = json.loads((work / "result.json").read_text())
    assert len(set(res["node_ips"].values())) == 3, "one node per test host"
    assert res["exact_before"] and res["exact_after"] and all(res["exact_after"])
    (victim,) = res["victim"]
    assert res["failed_nodes"] == [victim]
    assert res["health"][str(victim)]["failure"] == "NetworkPartition", res["health"]
    assert res["under_replicated"] == [], "redundancy restored on the reachable hosts"
    assert res["all_points"], "no point lost"
