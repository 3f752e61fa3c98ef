"""Fault tolerance: heartbeats, node health, failure classification and recovery plans.

The :class:`FaultDetector` pings every node each ``heartbeat_interval_ms`` (in a background thread, or on demand
with :meth:`FaultDetector.check`), keeps a :class:`NodeHealth` per node, classifies problems into a
:class:`FailureType`, and turns them into a :class:`RecoveryPlan` of :class:`RecoveryAction` s, which the
controller carries out (``ClusterController.recover``). Everything it decides is visible in
``cluster.health()`` and logged.

Classification (first match wins):

* the actor is dead (``RayActorError``), or silent for ``failure_threshold`` heartbeats while Ray reports its
  machine dead -> ``NodeUnresponsive`` -> Replicate its partitions elsewhere, Restart a replacement node;
* silent for ``failure_threshold`` heartbeats while Ray still reports its machine alive ->
  ``NetworkPartition`` -> Isolate it (no reads), Replicate its partitions elsewhere;
* answers, but holds fewer partitions than the metadata says -> ``PartialFailure`` -> Replicate the missing ones
  onto it again;
* answers, but its machine's memory use passes ``memory_threshold`` -> ``ResourceExhaustion`` -> Migrate a
  partition away;
* answers, but its median heartbeat latency is ``latency_factor`` times the cluster's -> ``HighLatency`` ->
  WaitAndRetry (reads prefer other replicas meanwhile).
"""

from __future__ import annotations

import enum
import logging
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray

from ..node.dispatch import NODE_FAILURES, ping_ref

log = logging.getLogger(__name__)

__all__ = ["FailureType", "RecoveryStrategy", "NodeHealth", "RecoveryAction", "RecoveryPlan", "FaultDetector"]


class FailureType(enum.Enum):
    NODE_UNRESPONSIVE = "NodeUnresponsive"
    HIGH_LATENCY = "HighLatency"
    RESOURCE_EXHAUSTION = "ResourceExhaustion"
    PARTIAL_FAILURE = "PartialFailure"
    NETWORK_PARTITION = "NetworkPartition"


class RecoveryStrategy(enum.Enum):
    RESTART = "Restart"
    MIGRATE = "Migrate"
    REPLICATE = "Replicate"
    ISOLATE = "Isolate"
    WAIT_AND_RETRY = "WaitAndRetry"


@dataclass
class NodeHealth:
    """What the heartbeats know of one node."""

    node_id: int
    last_contact: float = 0.0
    consecutive_failures: int = 0
    response_times: deque = field(default_factory=lambda: deque(maxlen=20))
    memory_fraction: float = 0.0  # used / total memory of the node's machine, from the node's own reading
    partitions_held: int = 0
    status: str = "alive"  # alive | suspect | failed | isolated
    failure: FailureType | None = None

    @property
    def median_response_s(self) -> float:
        return statistics.median(self.response_times) if self.response_times else 0.0

    def health_score(self) -> float:
        """1.0 = healthy, 0.0 = failed; lowered by missed heartbeats, latency and memory pressure."""
        if self.status in ("failed", "isolated"):
            return 0.0
        score = 1.0 / (1.0 + self.consecutive_failures)
        score *= 1.0 / (1.0 + 10.0 * self.median_response_s)  # 100 ms median halves the score
        if self.memory_fraction > 0.8:
            score *= max(0.0, (1.0 - self.memory_fraction) / 0.2)
        return float(min(1.0, max(0.0, score)))


@dataclass
class RecoveryAction:
    strategy: RecoveryStrategy
    node_id: int
    failure: FailureType
    reason: str
    partitions: list[int] = field(default_factory=list)


@dataclass
class RecoveryPlan:
    actions: list[RecoveryAction]
    created: float = field(default_factory=time.time)

    def __bool__(self) -> bool:
        return bool(self.actions)


_STRATEGIES = {
    FailureType.NODE_UNRESPONSIVE: [RecoveryStrategy.REPLICATE, RecoveryStrategy.RESTART],
    FailureType.NETWORK_PARTITION: [RecoveryStrategy.ISOLATE, RecoveryStrategy.REPLICATE],
    FailureType.PARTIAL_FAILURE: [RecoveryStrategy.REPLICATE],
    FailureType.RESOURCE_EXHAUSTION: [RecoveryStrategy.MIGRATE],
    FailureType.HIGH_LATENCY: [RecoveryStrategy.WAIT_AND_RETRY],
}


class FaultDetector:
    """Heartbeats and failure classification for one cluster (see module docstring); ``cluster`` is the
    :class:`~distspatial.control.controller.ClusterController` whose nodes it watches."""

    def __init__(
        self,
        cluster: Any,
        interval_s: float,
        timeout_s: float,
        failure_threshold: int = 2,
        memory_threshold: float = 0.95,
        latency_factor: float = 10.0,
        auto_recover: bool = True,
    ) -> None:
        self.cluster = cluster
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.failure_threshold = failure_threshold
        self.memory_threshold = memory_threshold
        self.latency_factor = latency_factor
        self.auto_recover = auto_recover
        self.health: dict[int, NodeHealth] = {}
        self.history: list[tuple[float, RecoveryPlan]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beats = 0
        self.rebalance_every = 10  # heartbeats between automatic rebalance rounds (load balancing on)
        self.max_migrations_per_round = 4
        self._lock = threading.Lock()

    # -- heartbeats -----------------------------------------------------------------------------------------
    def check(self) -> RecoveryPlan:
        """Ping every node once, update health, classify; carry the plan out when ``auto_recover``."""
        with self._lock:
            plan = self._check_locked()
            if plan and self.auto_recover:
                self.cluster.recover(plan)
            if self.cluster.config.auto_scale:
                self.cluster.follow_ray_cluster()
            self._beats += 1
            if self.cluster.config.load_balancing and self._beats % self.rebalance_every == 0:
                # bounded rate: one small plan every `rebalance_every` heartbeats
                if self.cluster.meta is not None:
                    self.cluster.rebalance(max_migrations=self.max_migrations_per_round)
            return plan

    def _check_locked(self) -> RecoveryPlan:
        cluster = self.cluster
        actors = dict(cluster.actors)
        now = time.time()
        sent = {}
        dead_machines = _dead_ray_nodes()
        actions: list[RecoveryAction] = []
        for node, actor in actors.items():
            h = self.health.setdefault(node, NodeHealth(node, last_contact=now))
            if h.status == "isolated" and cluster.node_info.get(node, {}).get("ray_node_id") in dead_machines:
                # Ray now reports the machine we cut off as dead: a node death after all; start a replacement
                h.status, h.failure = "failed", FailureType.NODE_UNRESPONSIVE
                actions.append(RecoveryAction(RecoveryStrategy.RESTART, node, h.failure, "its Ray node is dead"))
            if h.status in ("failed", "isolated"):
                continue
            sent[node] = (ping_ref(actor), time.perf_counter())
        refs = [r for r, _ in sent.values()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s) if refs else ([], [])
        ready = set(ready)
        meta = cluster.meta
        for node, (ref, t0) in sent.items():
            h = self.health[node]
            failure, reason = None, ""
            if ref in ready:
                try:
                    info = ray.get(ref)
                except NODE_FAILURES as exc:
                    failure, reason = FailureType.NODE_UNRESPONSIVE, f"actor gone ({type(exc).__name__})"
                else:
                    h.response_times.append(time.perf_counter() - t0)
                    h.last_contact = time.time()
                    h.consecutive_failures = 0
                    h.memory_fraction = float(info.get("memory_fraction", 0.0))
                    held = set(info.get("partitions", []))
                    h.partitions_held = len(held)
                    if h.status == "suspect":
                        h.status = "alive"
                    expected = set(meta.partitions_of(node)) if meta else set()
                    missing = sorted(expected - held)
                    if missing:
                        failure, reason = FailureType.PARTIAL_FAILURE, f"holds none of partitions {missing}"
                        actions.append(RecoveryAction(RecoveryStrategy.REPLICATE, node, failure, reason, missing))
                        h.failure = failure
                        continue
                    if h.memory_fraction > self.memory_threshold:
                        failure = FailureType.RESOURCE_EXHAUSTION
                        reason = f"machine memory {h.memory_fraction:.0%} used"
            else:
                h.consecutive_failures += 1
                if h.consecutive_failures >= self.failure_threshold:
                    machine = cluster.node_info.get(node, {}).get("ray_node_id", "")
                    if machine in dead_machines:
                        failure, reason = FailureType.NODE_UNRESPONSIVE, "its Ray node is dead"
                    else:
                        failure = FailureType.NETWORK_PARTITION
                        reason = f"no heartbeat answer {h.consecutive_failures} times, but Ray reports its node alive"
                else:
                    h.status = "suspect"
            if failure is None:
                h.failure = None
                continue
            h.failure = failure
            parts = meta.partitions_of(node) if meta else []
            for strategy in _STRATEGIES[failure]:
                actions.append(RecoveryAction(strategy, node, failure, reason, list(parts)))
        # latency outliers, among the nodes that answered
        answered = [h for n, h in self.health.items() if n in sent and h.response_times and h.failure is None]
        if len(answered) >= 3:
            med = statistics.median(h.median_response_s for h in answered)
            for h in answered:
                if med > 0 and h.median_response_s > self.latency_factor * med and h.median_response_s > 0.05:
                    h.failure = FailureType.HIGH_LATENCY
                    actions.append(RecoveryAction(RecoveryStrategy.WAIT_AND_RETRY, h.node_id, h.failure,
                                                  f"median heartbeat {h.median_response_s * 1e3:.0f} ms"))
        plan = RecoveryPlan(actions)
        if plan:
            self.history.append((time.time(), plan))
            for a in actions:
                log.warning("distspatial: node %d %s (%s) -> %s", a.node_id, a.failure.value, a.reason,
                            a.strategy.value)
        return plan

    # -- background thread ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="distspatial-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + self.interval_s + 5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # never let the heartbeat thread die silently
                log.exception("distspatial: heartbeat check failed")

    def report(self) -> dict[int, dict[str, Any]]:
        """Per node: status, health score, last contact, failures in a row, median response, memory."""
        return {
            n: {
                "status": h.status,
                "health_score": h.health_score(),
                "last_contact": h.last_contact,
                "consecutive_failures": h.consecutive_failures,
                "median_response_ms": h.median_response_s * 1e3,
                "memory_fraction": h.memory_fraction,
                "failure": h.failure.value if h.failure else None,
            }
            for n, h in sorted(self.health.items())
        }


def _dead_ray_nodes() -> set[str]:
    try:
        return {n["NodeID"] for n in ray.nodes() if not n.get("Alive")}
    except Exception:  # pragma: no cover - GCS unreachable
        return set()
