"""Load balancing: per-node load metrics, balancing strategies and rebalance plans. No Ray.

A :class:`LoadBalancer` turns :class:`LoadMetrics` (measured on the nodes and refreshed with the heartbeats)
and the placement in :class:`~distspatial.core.metadata.GlobalIndexMetadata` into a :class:`RebalancePlan` of
:class:`PartitionMigration` s. The coordinator carries a plan out with online migrations (copy node to node,
switch the metadata version, drop the source copy).

Strategies:

* ``RoundRobin``: replicas per node even (counts only);
* ``LeastLoaded``: points per node even;
* ``ProportionalLoad``: points per node proportional to each node's capacity weight (heterogeneous machines);
* ``AdaptiveLoad``: half data size, half recent query load (queries served per partition).

Before migrations, :meth:`LoadBalancer.tune` applies a :class:`TuningPolicy` to single partitions: one that
holds far more points than the mean is split at its curve-key median; one that serves far more queries than
the mean gains a read replica (reads spread over replicas) or, when it has all it may have, is split.

>>> bal = LoadBalancer(Strategy.LEAST_LOADED, threshold=1.1)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..core.metadata import GlobalIndexMetadata

__all__ = [
    "Strategy", "LoadMetrics", "PartitionMigration", "PartitionAction", "TuningPolicy", "RebalancePlan", "LoadBalancer",
]


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


@dataclass(frozen=True)
class TuningPolicy:
    """When a single partition is split or gets an extra read replica (see :meth:`LoadBalancer.tune`).

    Args:
        split_size_factor: split a partition holding more than this many times the mean partition size.
        hot_query_factor: a partition that served more than this many times the mean queries per partition
            since the previous round is hot.
        min_hot_queries: ignore query heat until a round saw at least this many partition-queries in total.
        min_split_points: never split a partition smaller than this.
        max_read_replicas: extra replicas (beyond ``replication_factor``) a hot partition may gain.
        max_actions: splits + replicas per round (a bounded rate).
    """

    split_size_factor: float = 3.0
    hot_query_factor: float = 4.0
    min_hot_queries: int = 1000
    min_split_points: int = 4096
    max_read_replicas: int = 1
    max_actions: int = 2

    def __post_init__(self) -> None:
        if self.split_size_factor <= 1.0 or self.hot_query_factor <= 1.0:
            raise ValueError("split_size_factor and hot_query_factor are multiples of the mean and must be > 1")
        if min(self.min_hot_queries, self.min_split_points, self.max_read_replicas, self.max_actions) < 0:
            raise ValueError("TuningPolicy counts must be >= 0")


@dataclass(frozen=True)
class PartitionAction:
    """A change to one partition: ``kind`` is ``"split"`` or ``"read_replica"``; ``reason`` says why."""

    partition: int
    kind: str
    reason: str


@dataclass
class RebalancePlan:
    strategy: Strategy
    migrations: list[PartitionMigration] = field(default_factory=list)
    actions: list[PartitionAction] = field(default_factory=list)  # splits and read replicas, done first
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
                 f"{self.imbalance_after:.3f}, {len(self.migrations)} migrations, {self.migration_bytes / 1e6:.1f} MB"
                 + (f", {len(self.actions)} partition actions" if self.actions else "")]
        lines += [f"  {a.kind} partition {a.partition}: {a.reason}" for a in self.actions]
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

    @staticmethod
    def tune(
        meta: GlobalIndexMetadata,
        recent_queries: dict[int, int],
        n_live: int,
        replication: int,
        policy: TuningPolicy | None = None,
    ) -> list[PartitionAction]:
        """Splits and read replicas for partitions too large or too hot (see :class:`TuningPolicy`).

        ``recent_queries``: queries each partition served since the previous round.

        >>> LoadBalancer.tune(meta, {0: 90_000, 1: 100}, n_live=4, replication=1)  # doctest: +SKIP
        [PartitionAction(partition=0, kind='read_replica', reason='served 90000 queries, 9.4x the mean')]
        """
        pol = policy or TuningPolicy()
        n_parts = max(1, meta.n_partitions)
        mean_size = meta.n_points / n_parts
        q_total = sum(recent_queries.values())
        mean_q = q_total / n_parts
        acts: list[tuple[float, PartitionAction]] = []
        for p in meta.partitions:
            pid = p.partition_id
            if p.size > pol.split_size_factor * mean_size and p.size >= pol.min_split_points:
                ratio = p.size / mean_size
                acts.append((ratio, PartitionAction(pid, "split", f"holds {p.size} points, {ratio:.1f}x the mean")))
                continue
            q = recent_queries.get(pid, 0)
            if q_total >= pol.min_hot_queries and q > pol.hot_query_factor * mean_q:
                ratio = q / mean_q
                why = f"served {q} queries, {ratio:.1f}x the mean"
                if len(p.owners) < min(n_live, replication + pol.max_read_replicas):
                    acts.append((ratio, PartitionAction(pid, "read_replica", why)))
                elif p.size >= pol.min_split_points:
                    acts.append((ratio, PartitionAction(pid, "split", why)))
        acts.sort(key=lambda a: (-a[0], a[1].partition))
        return [a for _, a in acts[: pol.max_actions]]
