"""Balancing rounds, run by the controller: load metrics from the nodes, splits and read replicas for partitions
that are too large or too hot (:class:`~distspatial.control.balancing.TuningPolicy`), and migrations planned by
:class:`~distspatial.control.balancing.LoadBalancer`. Everything runs online (copy, publish, drop)."""

from __future__ import annotations

import logging
import time

import ray

from ..core.errors import NodeFailureError
from .balancing import LoadBalancer, LoadMetrics, RebalancePlan, Strategy

log = logging.getLogger(__name__)

__all__ = ["BalancingMixin"]


class BalancingMixin:
    """Load balancing of :class:`~distspatial.control.controller.ClusterController`."""

    def load_metrics(self) -> dict[int, LoadMetrics]:
        """Measured load of every live node (rates since the previous call)."""
        now = time.monotonic()
        refs = {n: self.actors[n].stats.remote(True) for n in self.live_node_ids}
        out, prev = {}, self.last_load
        for n, ref in refs.items():
            try:
                s = ray.get(ref, timeout=self.config.communication_timeout_ms / 1000)
            except Exception as exc:
                self.dispatch.mark_failed(n, f"load metrics: {type(exc).__name__}")
                continue
            p = prev.get(n)
            dt = now - p[0] if p else 0.0
            rate_in = (s["bytes_in"] - p[1]["bytes_in"]) / dt if p and dt > 0 else 0.0
            rate_out = (s["bytes_out"] - p[1]["bytes_out"]) / dt if p and dt > 0 else 0.0
            out[n] = LoadMetrics(
                node_id=n, cpu_percent=float(s.get("cpu_percent", 0.0)), memory_fraction=s["memory_fraction"],
                rss_bytes=s["rss"], partitions=len(s["partitions"]), points=s["points"], operations=s["calls"],
                queries=s["queries"], busy_seconds=s["busy_s"], bytes_in_per_s=rate_in, bytes_out_per_s=rate_out,
                mean_call_ms=1e3 * s["busy_s"] / max(1, s["calls"]),
            )
            self.part_queries.update({(n, int(k)): v for k, v in s["part_queries"].items()})
            self.last_load[n] = (now, s)
        return out

    def add_read_replica(self, partition_id: int, node: int | None = None) -> int:
        """Give a query-hot partition one more replica (beyond ``replication_factor``), on ``node`` or on the
        live node with the fewest replicas that lacks it; reads then spread over more nodes. Returns the node."""
        with self.lock:
            meta = self.require_data()
            if not 0 <= partition_id < meta.n_partitions:
                raise ValueError(f"partition_id must be in [0, {meta.n_partitions}), got {partition_id}")
            owners = meta.partitions[partition_id].owners
            cand = [n for n in self.live_node_ids if n not in owners]
            if node is not None:
                if node not in cand:
                    raise ValueError(f"node {node} is not a live node without partition {partition_id}; "
                                     f"candidates: {cand}")
                cand = [node]
            if not cand:
                raise ValueError(f"every live node already holds partition {partition_id}")
            target = self.fewest_replicas(cand)
            self.copy_partitions({partition_id: target})
            if target not in self.meta.partitions[partition_id].owners:
                raise NodeFailureError(f"copying partition {partition_id} to node {target} failed")
            return target

    def rebalance(
        self, dry_run: bool = False, strategy: Strategy | str | None = None, threshold: float | None = None,
        max_migrations: int | None = None,
    ) -> RebalancePlan:
        """Plan (and unless ``dry_run``, carry out) splits, read replicas and migrations that even out load
        (see :meth:`distspatial.DistributedSpatialCluster.rebalance`)."""
        self.require_data()
        strat = Strategy(strategy) if isinstance(strategy, str) else (strategy or Strategy.ADAPTIVE_LOAD)
        self.load_metrics()  # refresh per-partition query counts
        part_q: dict[int, int] = {}
        for (_, pid), v in self.part_queries.items():
            part_q[pid] = part_q.get(pid, 0) + v
        recent = {p: v - self.part_q_tuned.get(p, 0) for p, v in part_q.items()}
        balancer = LoadBalancer(strat, threshold if threshold is not None else self.balance_threshold,
                                self.node_capacity, max_migrations or 64)
        with self.lock:
            actions = balancer.tune(self.meta, recent, len(self.live_node_ids), self.config.replication_factor,
                                    self.tuning_policy)
            if not dry_run:
                self.part_q_tuned = part_q
                for a in actions:
                    try:
                        if a.kind == "split":
                            self.split_partition(a.partition)
                        else:
                            self.add_read_replica(a.partition)
                        log.info("distspatial: %s partition %d (%s)", a.kind.replace("_", " "), a.partition, a.reason)
                    except (ValueError, NodeFailureError) as exc:
                        log.warning("distspatial: %s of partition %d skipped: %s", a.kind, a.partition, exc)
            plan = balancer.plan(self.meta, self.live_node_ids, part_q)
            plan.actions = actions
            if not dry_run:
                for m in plan.migrations:
                    if m.source in self.meta.partitions[m.partition].owners:
                        self.move_partition(m.partition, m.source, m.target)
                if plan.migrations or actions:
                    log.info("distspatial: rebalanced: %s", str(plan).splitlines()[0])
        return plan
