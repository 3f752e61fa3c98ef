"""Joining an existing Ray cluster by address (`ray start --head` in its own processes), and leaving it running."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))

SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, ray
    from distspatial import DistributedSpatialCluster, NodeConfig
    pts = np.random.default_rng(0).random((5000, 2))
    cfg = NodeConfig().with_node_count(2).with_address(sys.argv[1])
    with DistributedSpatialCluster(cfg) as c:
        c.distribute_data(pts)
        d, i = c.distributed_knn_search(pts[:50], 3)
        assert np.all(d[:, 0] == 0) and np.array_equal(i[:, 0], np.arange(50)), "each point finds itself first"
        print("NODES", ray.get_runtime_context().gcs_address, len(ray.nodes()))
    print("DONE", ray.is_initialized())
    """
)


@pytest.fixture()
def external_cluster():
    """A Ray head started by `ray start --head --block` in its own process group; only that group is stopped."""
    if not os.path.exists(RAY):
        pytest.skip("the `ray` command line is not installed next to this Python")
    port = 6390 + os.getpid() % 200
    address = f"127.0.0.1:{port}"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")  # a private test cluster
    temp_dir = tempfile.mkdtemp(prefix="dsray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--object-store-memory=150000000", f"--temp-dir={temp_dir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            st = subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, timeout=60, env=env)
            if st.returncode == 0:
                break
            if head.poll() is not None:
                pytest.fail("`ray start --head` exited early")
            time.sleep(1)
        else:
            pytest.fail("the Ray head did not come up within 90 s")
        yield address, env
    finally:  # the head's daemons and workers share its process group: stop exactly those, nothing else
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_join_existing_cluster_and_leave_it_running(external_cluster):
    address, env = external_cluster
    out = subprocess.run([sys.executable, "-c", SCRIPT, address], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "DONE False" in out.stdout  # our driver disconnected ...
    status = subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, text=True, timeout=60,
                            env=env)
    assert status.returncode == 0, "... but the external cluster still runs: " + status.stdout + status.stderr
