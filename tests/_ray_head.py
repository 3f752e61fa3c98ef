"""A Ray runtime that outlives drivers (`ray start --head --block` in its own process group), as in a deployment."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


def start_ray_head(num_cpus: int = 2, object_store_memory: int = 200_000_000):
    """Start the head; returns ``(address, env, stop)``: ``stop()`` kills exactly its process group."""
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    # the test session runs its private runtimes without token auth (conftest.py sets it for the whole run:
    # Ray reads the mode once per process, so one process must not mix modes)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    temp_dir = tempfile.mkdtemp(prefix="dsray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
         "--include-dashboard=false", f"--object-store-memory={object_store_memory}", f"--temp-dir={temp_dir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )

    def stop() -> None:
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
        deadline = time.monotonic() + 30  # until every process of the group is gone (its ports free again)
        while time.monotonic() < deadline:
            try:
                os.killpg(head.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        shutil.rmtree(temp_dir, ignore_errors=True)

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        st = subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, timeout=60, env=env)
        if st.returncode == 0:
            return address, env, stop
        if head.poll() is not None:
            break
        time.sleep(1)
    stop()
    pytest.fail("the Ray head did not come up")


def connected_head():
    """Generator for a module fixture: the head, this process connected to it; yields ``(address, env)``."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    address, env, stop = start_ray_head()
    try:
        ray.init(address=address, logging_level="ERROR")
        yield address, env
    finally:
        ray.shutdown()
        stop()
