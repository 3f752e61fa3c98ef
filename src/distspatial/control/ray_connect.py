"""Connecting to Ray: start the embedded local runtime, or join an existing cluster.

The rule for ``shutdown``: we stop only a runtime we started. Joining a cluster (``address``) or finding Ray
already initialised by the caller (a test's ``ray.cluster_utils.Cluster``, a notebook) means we only remove our
own actors when we are done.
"""

from __future__ import annotations

import logging
import os

import ray

from ..core.config import NodeConfig

__all__ = ["connect", "disconnect", "cluster_cpus", "ray_nodes"]


def connect(config: NodeConfig) -> bool:
    """Make sure Ray is initialised for ``config``; returns True when this call started the runtime."""
    if ray.is_initialized():
        return False
    kwargs: dict = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": True,
        "configure_logging": True,
    }
    if config.address is None:
        kwargs["num_cpus"] = config.num_cpus or os.cpu_count() or 1
        if config.object_store_memory is not None:
            kwargs["object_store_memory"] = config.object_store_memory
        ray.init(**kwargs)
        return True
    ray.init(address=config.address, **kwargs)
    # Joined an external cluster: ray.shutdown() only disconnects this driver, which is what we want at the end.
    return True


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
