"""Replication, recovery and elastic scaling: the controller's part that keeps every partition on enough nodes.

Every step copies before it switches and drops after: a partition is copied node to node (``export_partition``
results travel as Ray object references, never through the controller), the metadata switches to a version with
the new owner (published: nodes told before the call returns), and only then is a source copy dropped. Queries
planned on the older version are refused by the nodes and planned again, so they stay exact throughout.
Partitions with no live replica come back from the latest checkpoint of the data set, or stay lost (queries
raise :class:`~distspatial.core.errors.PartitionLostError`, or answer partially with ``allow_partial``).
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from ..core.errors import NodeFailureError
from ..node.actors import gpus_per_node, start_node_actor
from ..node.dispatch import ping_ref
from .fault import FailureType, RecoveryPlan, RecoveryStrategy

log = logging.getLogger(__name__)

__all__ = ["RecoveryMixin"]


class RecoveryMixin:
    """Recovery and elastic scaling of :class:`~distspatial.control.controller.ClusterController`."""

    # -- recovery -------------------------------------------------------------------------------------------
    def recover(self, plan: RecoveryPlan) -> None:
        """Carry out a recovery plan: isolate, restart, re-replicate, migrate (see :mod:`distspatial.control.fault`)."""
        with self.lock:
            for a in plan.actions:
                if a.failure in (FailureType.NODE_UNRESPONSIVE, FailureType.NETWORK_PARTITION):
                    self.dispatch.mark_failed(a.node_id, a.failure.value)
                    h = self.fault.health.get(a.node_id)
                    if h is not None and h.status != "failed":
                        h.status = "isolated" if a.failure is FailureType.NETWORK_PARTITION else "failed"
            for _ in range(sum(a.strategy is RecoveryStrategy.RESTART for a in plan.actions)):
                self.start_replacement()
            for a in plan.actions:
                if a.strategy is RecoveryStrategy.REPLICATE and a.failure is FailureType.PARTIAL_FAILURE:
                    self.copy_partitions({p: a.node_id for p in a.partitions})
                elif a.strategy is RecoveryStrategy.MIGRATE:
                    self._migrate_one(a.node_id)
            self.restore_redundancy()
            self.publish()  # failed and new nodes reach the clients' views

    def start_replacement(self, ray_node: str | None = None) -> int | None:
        """Start one more node actor if the runtime has room (on Ray node ``ray_node`` if given); its id."""
        cpus = self.cpus_per_node
        if ray_node is None and float(ray.available_resources().get("CPU", 0.0)) + 1e-9 < cpus:
            log.warning("distspatial: no room for a replacement node (%.2f CPUs needed)", cpus)
            return None
        node = max(self.actors, default=-1) + 1
        actor = start_node_actor(node, cpus, self.threads, ray_node, self.config.compression, self.config.device,
                                 gpus_per_node(self.config), cluster=self.name)
        try:
            info = ray.get(ping_ref(actor), timeout=max(30.0, self.config.communication_timeout_ms / 1000))
            ray.get(actor.set_meta_version.options(concurrency_group="control").remote(self.version, True))
            self.introduce({node: actor})
        except Exception as exc:
            log.warning("distspatial: replacement node %d did not start: %s", node, exc)
            ray.kill(actor)
            return None
        self.actors[node] = actor
        self.node_info[node] = info
        self.members += 1
        log.warning("distspatial: started replacement node %d", node)
        return node

    def follow_ray_cluster(self) -> list[int]:
        """``auto_scale``: give every alive Ray node that hosts no live node of ours a new node, then rebalance.

        Ray nodes that leave are handled as failures (their partitions are re-replicated). Returns new node ids.
        """
        with self.lock:
            alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0}
            hosted = {self.node_info.get(n, {}).get("ray_node_id") for n in self.live_node_ids}
            new = []
            for ray_node in sorted(alive - hosted - self.autoscale_skip):
                node = self.start_replacement(ray_node)
                if node is not None:
                    new.append(node)
                else:  # no room there: do not stall every heartbeat on it again
                    self.autoscale_skip.add(ray_node)
            if new:
                log.warning("distspatial: Ray nodes joined; started nodes %s", new)
                self._rebalance_counts()
                self.publish()
            return new

    def under_replicated(self) -> list[int]:
        meta = self.meta
        if meta is None:
            return []
        live = self.live_node_ids
        want = min(self.config.replication_factor, len(live))
        return [p.partition_id for p in meta.partitions if len([o for o in p.owners if o in live]) < want]

    def health(self) -> dict[str, Any]:
        """Node health from the heartbeats, failed nodes, and the recovery plans carried out so far."""
        if not self.fault.health:
            self.fault.check()
        return {
            "nodes": self.fault.report(),
            "failed_nodes": sorted(self.dispatch.failed_nodes),
            "recoveries": [
                {"time": t, "actions": [(a.strategy.value, a.node_id, a.failure.value, a.reason) for a in plan.actions]}
                for t, plan in self.fault.history
            ],
            "under_replicated": self.under_replicated(),
            "controller_restarts": self.restarts,
        }

    def restore_redundancy(self) -> dict[int, int]:
        """Copy under-replicated partitions from a live replica onto other live nodes until each has
        ``replication_factor`` replicas (or as many as there are live nodes); dead owners leave the metadata.

        Returns ``{partition: new owner}`` for the copies made.
        """
        with self.lock:
            meta = self.meta
            if meta is None:
                return {}
            failed = self.dispatch.failed_nodes
            live = self.live_node_ids
            want = min(self.config.replication_factor, len(live))
            targets: dict[int, int] = {}
            load = {n: 0 for n in live}
            for p in meta.partitions:
                for o in p.owners:
                    if o in load:
                        load[o] += 1
            machine = {n: self.node_info.get(n, {}).get("ray_node_id", str(n)) for n in live}
            lost = [p.partition_id for p in meta.partitions if not any(o in load for o in p.owners)]
            if lost and live:
                self._reload_from_checkpoint(lost, live, load)
                meta = self.meta
            for p in meta.partitions:
                alive = [o for o in p.owners if o in load]
                if not alive or len(alive) >= want:
                    continue
                used = {machine[o] for o in alive}
                cand = [n for n in live if n not in alive]
                if not cand:
                    continue
                target = min(cand, key=lambda n: (machine[n] in used, load[n], n))
                targets[p.partition_id] = target
                load[target] += 1
            self.copy_partitions(targets)
            # drop dead owners from the metadata even where nothing had to be copied
            meta = self.meta
            stale = {p.partition_id: tuple(o for o in p.owners if o not in failed)
                     for p in meta.partitions if any(o in failed for o in p.owners)}
            if stale:
                self.publish(meta.with_owners(stale))
            return targets

    def _reload_from_checkpoint(self, lost: list[int], live: list[int], load: dict[int, int]) -> None:
        """Partitions with no live replica come back from the latest checkpoint of this data set, if any."""
        from ..io import checkpoint_files as ck

        ckp = self.checkpoint_info
        meta = self.meta
        if ckp is None or ckp[0] != meta.dataset_id:
            log.error("distspatial: partitions %s lost on every replica and no checkpoint of this data set", lost)
            return
        _, uri, man = ckp
        by_id = {p["id"]: p for p in man["partitions"]}
        taken = man.get("data_changes", 0)
        stale = [pid for pid in lost if pid not in by_id or self.part_stamp.get(pid, 0) > taken]
        if stale:  # the checkpoint would bring back old points (or none of a newer partition): stay lost
            log.error("distspatial: partitions %s lost on every replica changed after the latest checkpoint %s; "
                      "they cannot be restored from it", stale, uri)
        owners = {}
        for pid in [p for p in lost if p not in stale]:
            target = min(live, key=lambda n: (load[n], n))
            p = by_id[pid]
            try:
                self.recv(target, self.send(target, "load_partition_files",
                          meta.dataset_id, [(pid, ck.join(uri, p["file"]), p["raw_bytes"], p["sha256"])]))
            except Exception as exc:
                log.error("distspatial: restoring partition %d from %s failed: %s", pid, uri, exc)
                continue
            load[target] += 1
            owners[pid] = (target,)
        if owners:
            self.publish(meta.with_owners(owners))
            log.warning("distspatial: partitions %s restored from checkpoint %s", sorted(owners), uri)

    def copy_partitions(self, targets: dict[int, int]) -> None:
        """Copy each partition in ``targets`` from a live replica to its target node, node to node; then add
        the target to the partition's owners in a new metadata version."""
        if not targets:
            return
        meta = self.meta
        failed = self.dispatch.failed_nodes
        loads, added = [], {}
        for pid, target in targets.items():
            src = next((o for o in meta.partitions[pid].owners if o not in failed and o != target), None)
            if src is None:
                continue
            # the partition travels node to node; each node counts the bytes it sends or receives
            pts_ref, ids_ref = self.send_multi(src, "export_partition", 2, pid, self.config.compression)
            loads.append((pid, target, self.send(target, "load_partitions", meta.dataset_id, [pid], pts_ref, ids_ref)))
        for pid, target, ref in loads:
            try:
                self.recv(target, ref, timeout=max(60.0, self.config.communication_timeout_ms / 1000))
                added[pid] = target
            except Exception as exc:
                log.warning("distspatial: copying partition %d to node %d failed: %s", pid, target, exc)
        if added:
            owners = {}
            for p in meta.partitions:
                if p.partition_id in added:
                    keep = tuple(o for o in p.owners if o not in failed and o != added[p.partition_id])
                    owners[p.partition_id] = keep + (added[p.partition_id],)
            self.publish(self.meta.with_owners(owners))
            log.info("distspatial: copied partitions %s", added)

    def move_partition(self, pid: int, src: int, dst: int) -> None:
        """Online migration: copy ``pid`` from ``src`` to ``dst`` node to node, switch the metadata (published),
        then drop the source copy."""
        with self.lock:
            self.copy_partitions({pid: dst})
            meta = self.meta
            if dst not in meta.partitions[pid].owners:
                raise NodeFailureError(f"moving partition {pid} from node {src} to node {dst} failed")
            self.publish(meta.with_owners({pid: tuple(o for o in meta.partitions[pid].owners if o != src)}))
            if src in self.actors and src not in self.dispatch.failed_nodes:
                self.actors[src].drop_partitions.remote([pid])

    def _migrate_one(self, node: int) -> None:
        """Move one partition off ``node`` (memory pressure) to the least loaded live node without it."""
        meta = self.meta
        mine = meta.partitions_of(node) if meta else []
        live = [n for n in self.live_node_ids if n != node]
        if not mine:
            return
        pid = mine[-1]
        cand = [n for n in live if n not in meta.partitions[pid].owners]
        if cand:
            self.move_partition(pid, node, self.fewest_replicas(cand))

    # -- elastic scaling ------------------------------------------------------------------------------------
    def add_nodes(self, n: int = 1) -> list[int]:
        """Start ``n`` more nodes and move partitions onto them until replicas per node are even (within one)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        with self.lock:
            new = []
            for _ in range(n):
                node = self.start_replacement()
                if node is None:
                    self.publish()
                    raise RuntimeError(
                        f"no room in the Ray cluster for another node ({self.cpus_per_node:g} CPUs each); "
                        f"started {len(new)} of {n}: {new}")
                new.append(node)
            self._rebalance_counts()
            self.publish()
            return new

    def remove_node(self, node_id: int) -> None:
        """Drain ``node_id`` gracefully (its partitions first get replicas elsewhere), then stop it."""
        with self.lock:
            if node_id not in self.actors:
                raise ValueError(f"no node {node_id}; nodes are {self.node_ids}")
            live = [n for n in self.live_node_ids if n != node_id]
            if not live:
                raise ValueError("cannot remove the last live node")
            if self.meta is not None:
                for pid in self.meta.partitions_of(node_id):
                    owners = self.meta.partitions[pid].owners
                    cand = [m for m in live if m not in owners]
                    if cand:
                        self.move_partition(pid, node_id, self.fewest_replicas(cand))
                    else:  # every other live node already holds it: just forget this copy
                        self.publish(self.meta.with_owners({pid: tuple(o for o in owners if o != node_id)}))
            actor = self.actors.pop(node_id)
            self.node_info.pop(node_id, None)
            self.members += 1
            self.fault.health.pop(node_id, None)
            ray.kill(actor, no_restart=True)
            self.publish()
            log.info("distspatial: node %d drained and removed", node_id)

    def _rebalance_counts(self) -> None:
        """Move partitions from the nodes with the most replicas to those with the fewest until even."""
        if self.meta is None:
            return
        live = self.live_node_ids
        while True:
            meta = self.meta
            count = {n: len(meta.partitions_of(n)) for n in live}
            hi = max(live, key=lambda n: (count[n], -n))
            lo = min(live, key=lambda n: (count[n], n))
            if count[hi] - count[lo] <= 1:
                return
            movable = [p for p in meta.partitions_of(hi) if lo not in meta.partitions[p].owners]
            if not movable:
                return
            self.move_partition(movable[-1], hi, lo)
