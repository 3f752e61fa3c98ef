"""Connecting to Ray: start the embedded local runtime, or join an existing cluster.

The rule for ``shutdown``: we stop only a runtime we started. Joining a cluster (``address``) or finding Ray
already initialised by the caller (a test's ``ray.cluster_utils.Cluster``, a notebook) means we only remove our
own actors when we are done.
"""

from __future__ import annotations

import json
import logging
import os

import ray

from ..core.config import NodeConfig

__all__ = ["connect", "join", "start_local_head", "disconnect", "cluster_cpus", "ray_nodes"]


_KWARGS: dict = {
    "include_dashboard": False,
    "logging_level": logging.WARNING,
    "log_to_driver": True,
    "configure_logging": True,
}


#: settings of a Ray runtime we start. The raylet frees objects that went out of scope in batches, by default
#: once a second: a load sending a few hundred MB through the object store in that second would leave all of it
#: touched in the store's shared memory (whose pages stay allocated), instead of reusing a bounded amount.
#: For a cluster started by ``ray start``, pass the same with ``--system-config``.
SYSTEM_CONFIG: dict = {"free_objects_period_milliseconds": 50}


def _system_config() -> dict:
    """:data:`SYSTEM_CONFIG` less what the environment sets (``RAY_<name>`` wins)."""
    return {k: v for k, v in SYSTEM_CONFIG.items() if f"RAY_{k}" not in os.environ}


def connect(config: NodeConfig) -> bool:
    """Make sure Ray is initialised for ``config``; returns True when this call started the runtime (or joined
    one: then :func:`disconnect` only disconnects). A named cluster with ``address=None`` needs a runtime that
    outlives this process: a local one already running is joined, else one is started (``ray start --head``)."""
    if ray.is_initialized():
        return False
    kwargs = dict(_KWARGS)
    if config.address is None and config.name is not None:
        try:
            ray.init(address="auto", **kwargs)
        except ConnectionError:
            start_local_head(config.num_cpus, config.object_store_memory)
            ray.init(address="auto", **kwargs)
        return True
    if config.address is None:
        kwargs["num_cpus"] = config.num_cpus or os.cpu_count() or 1
        if config.object_store_memory is not None:
            kwargs["object_store_memory"] = config.object_store_memory
        # "local": a runtime of our own even when `ray start` runs on this machine (a named cluster's, say),
        # which ray.init() would otherwise join
        ray.init(address="local", _system_config=_system_config(), **kwargs)
        return True
    ray.init(address=config.address, **kwargs)
    # Joined an external cluster: ray.shutdown() only disconnects this driver, which is what we want at the end.
    return True


def join(address: str | None) -> bool:
    """Join the Ray cluster at ``address`` (``None``: the local one, ``"auto"``) unless Ray is initialised;
    returns True when this call joined (undo with :func:`disconnect`). Raises ``ConnectionError`` when no Ray
    runtime runs there."""
    if ray.is_initialized():
        return False
    ray.init(address=address or "auto", **_KWARGS)
    return True


def start_local_head(num_cpus: int | None = None, object_store_memory: int | None = None) -> None:
    """Start a local Ray head (``ray start --head``); it outlives this process (stop it with ``ray stop``)."""
    import shutil
    import subprocess
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), "ray")
    if not os.path.exists(exe):
        exe = shutil.which("ray") or "ray"
    cmd = [exe, "start", "--head", f"--num-cpus={num_cpus or os.cpu_count() or 1}", "--include-dashboard=false",
           "--disable-usage-stats"]
    system_config = _system_config()
    if system_config:
        cmd.append(f"--system-config={json.dumps(system_config)}")
    if object_store_memory is not None:
        cmd.append(f"--object-store-memory={object_store_memory}")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        err = out.stderr.strip().splitlines()
        raise RuntimeError(f"could not start a local Ray runtime for a named cluster ({' '.join(cmd)}): "
                           f"{err[-1] if err else out.returncode}")


def disconnect(started: bool) -> None:
    """Undo :func:`connect`: shut down (or disconnect from) Ray only when ``connect`` initialised it."""
    if started and ray.is_initialized():
        ray.shutdown()


def cluster_cpus() -> float:
    """CPUs of the whole Ray cluster."""
    return float(ray.cluster_resources().get("CPU", 1.0))


def ray_nodes() -> list[dict]:
    """Alive Ray nodes (machines) of the cluster."""
    return [n for n in ray.nodes() if n.get("Alive")]
