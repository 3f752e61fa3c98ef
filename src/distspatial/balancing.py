"""Load balancing: per-node load metrics, balancing strategies and rebalance plans. No Ray.

A :class:`LoadBalancer` turns :class:`LoadMetrics` (measured on the nodes and refreshed with the heartbeats)
and the placement in :class:`~distspatial.metadata.GlobalIndexMetadata` into a :class:`RebalancePlan` of
:class:`PartitionMigration` s. The coordinator carries a plan out with online migrations (copy node to node,
switch the metadata version, drop the source copy).

Strategies:

* ``RoundRobin``: replicas per node even (counts only);
* ``LeastLoaded``: points per node even;
* ``ProportionalLoad``: points per node proportional to each node's capacity weight (heterogeneous machines);
* ``AdaptiveLoad``: half data size, half recent query load (queries served per partition).

>>> bal = LoadBalancer(Strategy.LEAST_LOADED, threshold=1.1)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .metadata import GlobalIndexMetadata

__all__ = ["Strategy", "LoadMetrics", "PartitionMigration", "RebalancePlan", "LoadBalancer"]


class Strategy(enum.Enum):
    ROUND_ROBIN = "RoundRobin"
    LEAST_LOADED = "LeastLoaded"
    PROPORTIONAL_LOAD = "ProportionalLoad"
    ADAPTIVE_LOAD = "AdaptiveLoad"


@dataclass
class LoadMetrics:
    """Measured load of one node (from its own counters and psutil readings)."""

    node_id: int
    cpu_percent: float = 0.0  # of the node's process, since the previous reading
    memory_fraction: float = 0.0  # used / total memory of its machine
    rss_bytes: int = 0
    partitions: int = 0
    points: int = 0
    operations: int = 0  # calls served
    queries: int = 0
    busy_seconds: float = 0.0
    bytes_in_per_s: float = 0.0
    bytes_out_per_s: float = 0.0
    mean_call_ms: float = 0.0

    def load_score(self, points_share: float = 0.0, query_share: float = 0.0) -> float:
        """A load figure in [0, ~1]: the node's share of points and of queries, nudged up by CPU and memory
        pressure (``points_share`` / ``query_share`` are fractions of the cluster's totals)."""
        return 0.5 * points_share + 0.5 * query_share + 0.1 * min(1.0, self.cpu_percent / 100.0) + 0.1 * max(
            0.0, self.memory_fraction - 0.8
        )


@dataclass(frozen=True)
class PartitionMigration:
    partition: int
    source: int
    target: int
    priority: float  # how much this move lowers the heaviest node's load
    nbytes: int


@dataclass
class RebalancePlan:
    strategy: Strategy
    migrations: list[PartitionMigration] = field(default_factory=list)
    imbalance_before: float = 1.0  # max / mean load
    imbalance_after: float = 1.0  # expected after the migrations
    loads_before: dict[int, float] = field(default_factory=dict)
    loads_after: dict[int, float] = field(default_factory=dict)

    @property
    def expected_improvement(self) -> float:
        return self.imbalance_before - self.imbalance_after

    @property
    def migration_bytes(self) -> int:
        return sum(m.nbytes for m in self.migrations)

    def __str__(self) -> str:
        lines = [f"RebalancePlan({self.strategy.value}): imbalance {self.imbalance_before:.3f} -> "
                 f"{self.imbalance_after:.3f}, {len(self.migrations)} migrations, {self.migration_bytes / 1e6:.1f} MB"]
        lines += [f"  partition {m.partition}: node {m.source} -> node {m.target} (priority {m.priority:.3f})"
                  for m in self.migrations]
        return "\n".join(lines)


class LoadBalancer:
    """Plans migrations that bring max/mean load under ``threshold`` (see module docstring)."""

    def __init__(
        self,
        strategy: Strategy = Strategy.ADAPTIVE_LOAD,
        threshold: float = 1.2,
        capacity: dict[int, float] | None = None,
        max_migrations: int = 64,
    ) -> None:
        if threshold < 1.0:
            raise ValueError(f"threshold is a max/mean ratio and must be >= 1.0, got {threshold}")
        self.strategy = strategy
        self.threshold = threshold
        self.capacity = capacity or {}
        self.max_migrations = max_migrations

    def partition_weights(self, meta: GlobalIndexMetadata, part_queries: dict[int, int]) -> dict[int, float]:
        n = max(1, meta.n_points)
        q_total = sum(part_queries.values())
        w = {}
        for p in meta.partitions:
            size = p.size / n
            if self.strategy is Strategy.ROUND_ROBIN:
                w[p.partition_id] = 1.0
            elif self.strategy is Strategy.ADAPTIVE_LOAD and q_total > 0:
                w[p.partition_id] = 0.5 * size + 0.5 * part_queries.get(p.partition_id, 0) / q_total
            else:
                w[p.partition_id] = size
        return w

    def plan(
        self, meta: GlobalIndexMetadata, nodes: list[int], part_queries: dict[int, int] | None = None
    ) -> RebalancePlan:
        """Greedy plan: move the partition that best relieves the heaviest node to the lightest node that does
        not hold it, until max/mean <= threshold or no move helps."""
        weights = self.partition_weights(meta, part_queries or {})
        cap = {n: self.capacity.get(n, 1.0) if self.strategy is Strategy.PROPORTIONAL_LOAD else 1.0 for n in nodes}
        owners = {p.partition_id: list(o for o in p.owners if o in cap) for p in meta.partitions}
        raw = {n: 0.0 for n in nodes}
        for pid, own in owners.items():
            for o in own:
                raw[o] += weights[pid]

        def loads() -> dict[int, float]:
            return {n: raw[n] / cap[n] for n in nodes}

        def imbalance(ld: dict[int, float]) -> float:
            mean = sum(ld.values()) / len(ld) if ld else 0.0
            return max(ld.values()) / mean if mean > 0 else 1.0

        before = loads()
        plan = RebalancePlan(self.strategy, imbalance_before=imbalance(before), loads_before=before)
        nbytes = {p.partition_id: p.nbytes for p in meta.partitions}
        moved: set[int] = set()
        while imbalance(loads()) > self.threshold and len(plan.migrations) < self.max_migrations:
            ld = loads()
            src = max(nodes, key=lambda n: (ld[n], -n))
            best = None
            for pid, own in owners.items():
                if src not in own:
                    continue
                for dst in nodes:
                    if dst in own:
                        continue
                    new_src = (raw[src] - weights[pid]) / cap[src]
                    new_dst = (raw[dst] + weights[pid]) / cap[dst]
                    peak = max(new_src, new_dst)
                    # lowest resulting peak; then the lighter destination; then a partition not moved yet
                    key = (peak, new_dst, pid in moved, pid, dst)
                    if peak < ld[src] - 1e-12 and (best is None or key < best):
                        best = key
            if best is None:
                break
            peak, _, _, pid, dst = best
            moved.add(pid)
            raw[src] -= weights[pid]
            raw[dst] += weights[pid]
            owners[pid] = [dst if o == src else o for o in owners[pid]]
            plan.migrations.append(PartitionMigration(pid, src, dst, ld[src] - peak, nbytes[pid]))
        plan.loads_after = loads()
        plan.imbalance_after = imbalance(plan.loads_after)
        return plan
