"""Starting node actors: resources, placement, names.

A node actor is :class:`~distspatial.node.spatial_node.SpatialNode` run by Ray. Queries (``knn``, ``ball``,
``box``, ``knn_batch``) run in their own concurrency group ("reads"), so they never wait behind an append or an
algorithm step; other nodes' follow-up rounds of a batch in "peer" (never calling out: no deadlock between two
nodes asking each other); liveness pings in "control" (a busy node still answers); everything else runs one
call at a time. A node of a
named cluster is a named, detached actor (``<cluster>:node-<id>`` in the namespace ``distspatial``): it outlives
the process that created it and the controller, which finds it again by name after a restart.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from ..core.config import NodeConfig
from .query_rounds import PEER_GROUP
from .spatial_node import SpatialNode

__all__ = ["NAMESPACE", "node_actor_name", "start_node_actor", "gpus_per_node", "free_cpus", "threads_for"]

#: Ray namespace of every named actor of distspatial (controllers and nodes)
NAMESPACE = "distspatial"


def node_actor_name(cluster: str, node_id: int) -> str:
    """Ray actor name of node ``node_id`` of the named cluster ``cluster``."""
    return f"{cluster}:node-{node_id}"


def threads_for(cfg: NodeConfig, total_cpus: float) -> int:
    """Compute threads per node: ``threads_per_node`` or the cluster's CPUs divided by the node count."""
    return cfg.threads_per_node or max(1, int(total_cpus // cfg.node_count))


def start_node_actor(node_id: int, cpus: float, threads: int, ray_node: str | None = None, compress: bool = False,
                     device: str = "cpu", gpus: float = 0.0, cluster: str | None = None) -> Any:
    """Start one node actor, placed with Ray's SPREAD strategy or pinned to the Ray node ``ray_node``; named and
    detached when ``cluster`` (a cluster name) is given."""
    strategy: Any = "SPREAD"
    if ray_node is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        strategy = NodeAffinitySchedulingStrategy(node_id=ray_node, soft=False)
    named: dict[str, Any] = {}
    if cluster is not None:
        named = {"name": node_actor_name(cluster, node_id), "namespace": NAMESPACE, "lifetime": "detached"}
    return (
        ray.remote(concurrency_groups={"reads": 1, "control": 1, PEER_GROUP: 1})(SpatialNode)
        .options(num_cpus=cpus, num_gpus=gpus, scheduling_strategy=strategy, max_concurrency=1, **named)
        .remote(node_id, threads, compress, device)
    )


def gpus_per_node(cfg: NodeConfig) -> float:
    """GPU share each node actor asks Ray for: with device "cuda" (or "auto" on a cluster with GPUs) the nodes
    share the cluster's GPUs evenly (fractions are fine: Ray packs several actors on one GPU)."""
    if cfg.device == "cpu":
        return 0.0
    total = float(ray.cluster_resources().get("GPU", 0.0))
    if total <= 0:
        if cfg.device.startswith("cuda"):
            raise RuntimeError("NodeConfig.device='cuda' but the Ray cluster has no GPUs; use with_device('auto') "
                               "to fall back to the CPU, or start Ray on machines with GPUs")
        return 0.0
    return min(1.0, total / cfg.node_count)


def free_cpus(wanted: float, wait_s: float = 10.0) -> float:
    """CPUs free in the runtime, waiting up to ``wait_s`` for ``wanted`` (actors just killed release theirs late)."""
    deadline = time.monotonic() + wait_s
    while True:
        free = float(ray.available_resources().get("CPU", 0.0))
        if free + 1e-9 >= wanted or time.monotonic() > deadline:
            return free
        time.sleep(0.1)
