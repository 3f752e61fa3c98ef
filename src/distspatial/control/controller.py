"""The controller: one Ray actor per cluster that owns the control plane.

It holds the hard state of a cluster and is the only writer of it: the node actors and where they run, the
versioned :class:`~distspatial.core.metadata.GlobalIndexMetadata` and its routing table, id allocation, the
outcome of recent writes, the failure detector and recovery, elastic scaling, balancing rounds and checkpoints.
Writes (distribute, ingest, delete, update, split, migration) run here one at a time, under :attr:`lock`, so two
clients writing at once get disjoint ids and every acknowledged batch is seen by both afterwards.

The controller is **not on the query path**: clients fetch a :class:`ClusterView` (metadata, node handles, failed
nodes) once, plan and send queries straight to the nodes, and fetch a new view only when a node refuses a call
planned on an older version (:class:`~distspatial.core.errors.StaleMetadataError`). Every change goes through
:meth:`ClusterController.publish`: new version, state saved, every live node told the new version *before* the
change is acknowledged, so a client with an outdated view can never miss an acknowledged point.

A named cluster's controller is a detached, named actor (``<name>:controller`` in the namespace ``distspatial``)
that Ray restarts when it dies (``max_restarts=-1``, calls retried); it writes its state to Ray's GCS key-value
store (:mod:`~distspatial.control.state_store`) on every change and, restarted, reads it back, finds its node
actors again by name and carries on with a version above any it handed out. Writes carry a client token and
are idempotent, so a call that Ray retries after a restart is applied once. An unnamed cluster's controller and
nodes belong to the process that created them and die with it (no state is stored).

A cluster created with a token (``NodeConfig.with_token`` or ``DISTSPATIAL_TOKEN``) is given a salted HMAC of it
(:func:`~distspatial.core.access.make_verifier`; the token itself never reaches the controller's arguments or
its stored state). Clients send every state-changing call (:data:`GUARDED`) through :meth:`ClusterController.guarded`
with their token, checked in constant time; a missing or wrong token raises
:class:`~distspatial.core.errors.AccessDeniedError`. Reads (views, queries to the nodes, health, metrics) stay open.
This guards distspatial's API, not Ray: whoever can reach the Ray cluster can run any code in it (Ray's own token
authentication, ``RAY_AUTH_MODE=token``, guards its ports).

The work itself is grouped by concern: :mod:`~distspatial.control.writes` (data set and live updates),
:mod:`~distspatial.control.recovery` (replication, recovery, elastic scaling),
:mod:`~distspatial.control.balance_rounds` (load metrics, splits, read replicas, migrations) and
:mod:`~distspatial.control.checkpointing` (checkpoints).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pickle
import threading
import time
from typing import Any

import numpy as np
import ray

from ..core.access import verify
from ..core.config import NodeConfig
from ..core.errors import AccessDeniedError, NotDistributedError
from ..core.stats import CommunicationCounters
from ..core.codec import decode_all, encode, message_bytes
from ..node.actors import (NAMESPACE, free_cpus, gpus_per_node, node_actor_name, start_node_actor,
                           threads_for)
from ..node.dispatch import Dispatcher, NodeMessages, ping_ref
from . import state_store
from .balance_rounds import BalancingMixin
from .balancing import TuningPolicy
from .checkpointing import CheckpointMixin
from .fault import FaultDetector
from .loading import LoadingMixin
from ..core.metadata import GlobalIndexMetadata
from .recovery import RecoveryMixin
from ..kernels.routing import RoutingTable
from .view import ClusterView
from .writes import WritesMixin

log = logging.getLogger(__name__)

__all__ = ["ClusterController", "ClusterView", "controller_actor_name", "NAMESPACE", "RECENT_WRITES", "GUARDED",
           "is_guarded"]

#: controller methods that change the cluster (its data, layout, settings, or its existence): clients call them
#: through :meth:`ClusterController.guarded`, which checks the cluster's token first
GUARDED = frozenset((
    "distribute", "begin_distribute", "stage_partitions", "distribute_files", "load_checkpoint", "begin_chunked",
    "end_chunked", "ingest", "delete", "update",
    "set_options", "add_nodes", "remove_node", "move_partition", "split_partition", "add_read_replica", "rebalance",
    "restore_redundancy", "follow_ray_cluster", "checkpoint", "shutdown",
))


def is_guarded(method: str, args: tuple = ()) -> bool:
    """Whether a client's call of controller ``method`` needs the token (a dry-run rebalance only plans)."""
    if method == "rebalance" and args and args[0] is True:
        return False
    return method in GUARDED

#: outcomes of this many recent writes are kept (and stored), so a write retried after a restart is applied once
RECENT_WRITES = 2048


def controller_actor_name(cluster: str) -> str:
    """Ray actor name of the controller of the named cluster ``cluster``."""
    return f"{cluster}:controller"


class ClusterController(NodeMessages, WritesMixin, LoadingMixin, RecoveryMixin, BalancingMixin, CheckpointMixin):
    """The control plane of one cluster, run as a Ray actor (see module docstring).

    Args:
        name: the cluster's name (``None``: an unnamed cluster, nothing stored, owned by its creator).
        config: the cluster's :class:`NodeConfig`.
    """

    def __init__(self, name: str | None, config: NodeConfig, verifier: tuple[bytes, bytes] | None = None) -> None:
        self.name = name
        self.named = name is not None
        self.config = config
        self.verifier = verifier  # (salt, HMAC of the token) or None: no token needed
        self.lock = threading.RLock()  # serialises every change of the state below (held for a whole write)
        # guards the published version, notified on every new one; views are read under it alone, so a client
        # asking for a view never waits for a write in progress
        self.changed = threading.Condition(threading.Lock())
        self.comm = CommunicationCounters()
        self.version = 0
        self.members = 0  # changes of the node set (clients fetch node handles again when it moves)
        self.published = 0  # newest version every live node was told of
        self.meta: GlobalIndexMetadata | None = None
        self.routing: RoutingTable | None = None
        self.actors: dict[int, Any] = {}
        self.node_info: dict[int, dict] = {}
        self.dataset_counter = 0
        self._staged: dict | None = None  # a distribute arriving in waves (WritesMixin.begin_distribute)
        self.next_id = 0  # next automatic id for ingested points
        self.has_user_ids = False  # distribute_data was given ids: ingest needs them too
        self.modified = False  # points were ingested or deleted since distribute_data / restore
        self.mean_variance = 0.0
        self._kernels_warm = False  # the compiled curve-key kernels are loaded (started on the first ingest)
        self.id_sorted: np.ndarray | None = None  # user ids, sorted (None: ids are row numbers)
        self.id_rows: np.ndarray | None = None  # row of each sorted id
        self.recent: collections.OrderedDict[int, Any] = collections.OrderedDict()  # write token -> outcome
        self.checkpoint_info: tuple[int, str, dict] | None = None  # (data set id, uri, manifest) of the latest
        # data changes (ingest, delete, update, split) so far, and the count at each partition's latest change:
        # a checkpoint restores a lost partition only if the partition did not change after it was taken
        self.data_changes = 0
        self.part_stamp: dict[int, int] = {}
        self.autoscale_skip: set[str] = set()  # Ray nodes where a node of ours could not start
        self.last_load: dict[int, tuple[float, dict]] = {}  # previous stats sample per node (for rates)
        self.part_queries: dict[tuple[int, int], int] = {}  # (node, partition) -> queries served there
        self.part_q_tuned: dict[int, int] = {}  # per-partition query counts at the previous rebalance
        self.balance_threshold = 1.25  # max/mean load that triggers an automatic rebalance
        self.node_capacity: dict[int, float] = {}  # capacity weights for ProportionalLoad (default 1.0)
        self.tuning_policy = TuningPolicy()  # when rebalance() splits partitions or adds read replicas
        self.progress = False  # the controller has no terminal
        self.restarts = 0
        self.gone = False
        self.threads = threads_for(config, float(ray.cluster_resources().get("CPU", 1.0)))
        self.cpus_per_node = 0.0
        self.dispatch = Dispatcher(self.actors, config.communication_timeout_ms / 1000.0, config.max_retries,
                                   self.comm)
        saved = state_store.load(name, "state") if self.named else None
        if saved is not None:
            self._adopt(saved)
        else:
            self._start_nodes()
            self.publish()
        self.fault = FaultDetector(
            self,
            interval_s=config.heartbeat_interval_ms / 1000.0,
            timeout_s=min(config.communication_timeout_ms, 5 * config.heartbeat_interval_ms) / 1000.0,
        )
        if config.fault_tolerance or config.auto_scale or config.load_balancing or self.named:
            self.fault.start()  # a named cluster recovers its nodes whether or not a client is attached
        self._stop_periodic = threading.Event()
        if config.checkpoint_interval_s is not None:
            threading.Thread(target=self._periodic_checkpoints, name="distspatial-checkpoint", daemon=True).start()

    # -- start, adopt, persist ------------------------------------------------------------------------------
    def _start_nodes(self) -> None:
        cfg = self.config
        total = float(ray.cluster_resources().get("CPU", 1.0))
        # Node actors are long-lived and idle between calls; by default they share the CPUs still free (at most
        # one each), so two clusters can live in one runtime. Set cpus_per_node to reserve more.
        free = free_cpus(cfg.node_count * (cfg.cpus_per_node or 0.01))
        cpus = cfg.cpus_per_node or max(0.01, min(1.0, int(free / cfg.node_count * 100) / 100))
        if cfg.address is None and not self.named and cpus * cfg.node_count > free + 1e-9:
            raise RuntimeError(
                f"{cfg.node_count} nodes x {cpus:g} CPUs do not fit in the {free:g} CPUs still free in this Ray "
                f"runtime (another cluster may hold them); set NodeConfig.cpus_per_node lower or shut the other down"
            )
        self.cpus_per_node = cpus
        gpus = gpus_per_node(cfg)
        actors = {i: start_node_actor(i, cpus, self.threads, compress=cfg.compression, device=cfg.device, gpus=gpus,
                                      cluster=self.name)
                  for i in range(cfg.node_count)}
        refs = {i: ping_ref(a) for i, a in actors.items()}
        ready, missing = ray.wait(list(refs.values()), num_returns=len(refs),
                                  timeout=max(60.0, cfg.communication_timeout_ms / 1000))
        if missing:
            for a in actors.values():
                ray.kill(a)
            raise RuntimeError(
                f"only {len(ready)} of {cfg.node_count} node actors started within the timeout; the Ray cluster has "
                f"{total:g} CPUs and each node asks for {cpus:g} (set NodeConfig.cpus_per_node lower or add machines)"
            )
        self.actors.update(actors)
        self.node_info.update(zip(refs.keys(), ray.get(list(refs.values()))))
        self.introduce(actors)
        self.members += 1

    def introduce(self, actors: dict[int, Any]) -> None:
        """Give nodes this controller's handle (they fetch the routing of a version from it to plan query
        rounds, and report peers that fail); waits until every live one has it."""
        me = ray.get_runtime_context().current_actor
        refs = [a.set_controller.options(concurrency_group="control").remote(me) for a in actors.values()]
        try:
            ray.wait(refs, num_returns=len(refs), timeout=max(10.0, self.config.communication_timeout_ms / 1000))
        except Exception:  # a node that died meanwhile is found by the failure detector
            pass

    def _adopt(self, saved: dict[str, Any]) -> None:
        """Carry on from stored state after a restart: find the node actors by name, take a version above any
        handed out (the nodes remember the newest they were told of), publish it."""
        for key, value in saved["fields"].items():
            setattr(self, key, value)
        self.restarts += 1
        self.dispatch.failed_nodes.update(saved["failed"])
        if saved.get("has_id_map"):
            blob = state_store.load_blob(self.name, "idmap")
            if blob is not None:
                self.id_sorted, self.id_rows = decode_all(pickle.loads(blob))
        floors = [self.version]
        for node in saved["nodes"]:
            try:
                actor = ray.get_actor(node_actor_name(self.name, node), namespace=NAMESPACE)
                info = ray.get(ping_ref(actor), timeout=max(10.0, self.config.communication_timeout_ms / 1000))
            except Exception as exc:  # gone while the controller was away: recovery re-replicates its partitions
                log.warning("distspatial: node %d not found after controller restart: %s", node, exc)
                self.dispatch.mark_failed(node, "not found after controller restart")
                self.actors[node] = None
                continue
            self.actors[node] = actor
            self.node_info[node] = info
            floors.append(int(info.get("meta_version", 0)))
        self.actors = {n: a for n, a in self.actors.items() if a is not None}
        self.dispatch.actors = self.actors
        self.introduce(self.actors)
        self.members += 1
        self.version = max(floors)
        log.warning("distspatial: controller of %r restarted (%d), %d nodes adopted, version %d", self.name,
                    self.restarts, len(self.actors), self.version)
        self.publish()

    _PERSISTED = ("version", "meta", "node_info", "dataset_counter", "next_id", "has_user_ids", "modified",
                  "mean_variance", "recent", "checkpoint_info", "data_changes", "part_stamp", "members", "cpus_per_node", "balance_threshold", "node_capacity",
                  "tuning_policy", "restarts", "autoscale_skip", "verifier")

    def _persist(self) -> None:
        if not self.named:
            return
        state_store.save(self.name, "state", {
            "fields": {k: getattr(self, k) for k in self._PERSISTED},
            "nodes": sorted(self.actors),
            "failed": sorted(self.dispatch.failed_nodes),
            "has_id_map": self.id_sorted is not None,
            "config": self.config,
            "saved": time.time(),
        })

    def store_id_map(self) -> None:
        """Store the user-id map (large: written once per data set, not on every change)."""
        if not self.named or self.id_sorted is None:
            return
        state_store.save_blob(self.name, "idmap", pickle.dumps((encode(self.id_sorted), encode(self.id_rows))))

    def publish(self, meta: GlobalIndexMetadata | None = None, *, layout: bool = False) -> int:
        """Make a change visible: a new version (metadata with it, routing derived from it), state stored, and
        every live node told the version before this returns (``layout``: the change altered what partition ids
        hold). Returns the version."""
        with self.lock:
            base = meta if meta is not None else self.meta
            version = max(self.version + 1, base.version if base is not None else 0)
            new_meta = dataclasses.replace(base, version=version) if base is not None else None
            routing = RoutingTable(new_meta) if new_meta is not None else None
            with self.changed:
                self.version = version
                if new_meta is not None:
                    self.meta, self.routing = new_meta, routing
            self._persist()
            self.tell_nodes(version, layout)
            with self.changed:
                self.published = version  # views wait for this: every node knows the version
                self.changed.notify_all()
            return version

    def tell_nodes(self, version: int, layout: bool = False) -> None:
        """Every live node refuses queries planned on a version below ``version`` once this returns."""
        live = [n for n in self.actors if n not in self.dispatch.failed_nodes]
        if not live:
            return
        # with the version, the metadata it publishes (the nodes plan query rounds on it: a query after a write
        # then needs no routing fetch); ``self.meta`` is already that version's when publish() calls this
        meta = self.meta if self.meta is not None and self.meta.version == version else None
        failed = frozenset(self.dispatch.failed_nodes)
        refs = [self.actors[n].set_meta_version.options(concurrency_group="control").remote(
            version, layout, meta, self.members, failed) for n in live]
        try:
            ray.wait(refs, num_returns=len(refs), timeout=min(10.0, self.config.communication_timeout_ms / 1000))
        except Exception:  # a dead node answers nothing, stale or not; recovery handles it
            pass

    def data_changed(self, partitions: Any) -> None:
        """Record that the points of ``partitions`` changed (a checkpoint taken before no longer holds them)."""
        self.data_changes += 1
        for p in partitions:
            self.part_stamp[int(p)] = self.data_changes

    def remember(self, token: int | None, outcome: Any) -> None:
        """Keep the outcome of write ``token`` (a retried write returns it instead of applying twice)."""
        if token is None:
            return
        self.recent[token] = outcome
        while len(self.recent) > RECENT_WRITES:
            self.recent.popitem(last=False)

    # -- access -------------------------------------------------------------------------------------------
    def guarded(self, token: str | None, method: str, *args: Any, **kwargs: Any) -> Any:
        """Carry out state-changing ``method`` (one of :data:`GUARDED`) for a client holding ``token``."""
        if method not in GUARDED:
            raise ValueError(f"{method!r} is not a guarded controller method")
        self.authorize(token, method)
        return getattr(self, method)(*args, **kwargs)

    def authorize(self, token: str | None, what: str) -> None:
        """Raise :class:`AccessDeniedError` unless this cluster needs no token or ``token`` is its token."""
        if self.verifier is None:
            return
        name = self.name or "(unnamed)"
        if token is None:
            raise AccessDeniedError(
                f"cluster {name!r} was created with a token and {what} needs it; attach with "
                f"DistributedSpatialCluster.attach({name!r}, token=...) or set DISTSPATIAL_TOKEN (queries need no "
                f"token)")
        if not verify(self.verifier, token):
            log.warning("distspatial: cluster %r refused %s: wrong token", name, what)
            raise AccessDeniedError(f"the token given for cluster {name!r} is not the one it was created with; "
                                    f"{what} refused")

    # -- what clients ask ---------------------------------------------------------------------------------
    def ready(self) -> dict[str, Any]:
        """Liveness and a summary (name, version, points, nodes, restarts)."""
        return self.info()

    def info(self) -> dict[str, Any]:
        meta = self.meta
        return {"name": self.name, "version": self.version, "points": meta.n_points if meta else 0,
                "partitions": meta.n_partitions if meta else 0, "dim": meta.user_dim if meta else None,
                "crs": meta.crs if meta else None,
                "nodes": len(self.live_node_ids), "restarts": self.restarts, "address": self.config.address,
                "token": self.verifier is not None}

    def view(self, min_version: int = 0, timeout_s: float = 30.0, light: bool = False) -> ClusterView:
        """The current :class:`ClusterView`, waiting up to ``timeout_s`` until its version is ``min_version``
        (``light``: without node handles and node info, see :class:`ClusterView`)."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while self.published < min_version and not self.gone:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.changed.wait(left)
            return ClusterView(
                name=self.name, version=self.version, config=self.config, meta=self.meta,
                actors=None if light else dict(self.actors), node_info=None if light else dict(self.node_info),
                failed=frozenset(self.dispatch.failed_nodes), members=self.members,
                has_user_ids=self.has_user_ids, modified=self.modified, mean_variance=self.mean_variance,
                has_id_map=self.id_sorted is not None,
            )

    def current_version(self) -> int:
        return self.version

    def id_map(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(sorted user ids, input row of each)`` of the data set, or ``None`` when ids are row numbers."""
        return None if self.id_sorted is None else (self.id_sorted, self.id_rows)

    def report_failure(self, node: int, reason: str) -> None:
        """A client saw ``node`` fail: check it now (a ping) and recover when it is really gone."""
        if node in self.dispatch.failed_nodes or node not in self.actors:
            return
        if self.dispatch.mark_failed_if_dead(min(5.0, self.config.communication_timeout_ms / 1000)):
            log.warning("distspatial: node %d reported failed by a client (%s)", node, reason)
            threading.Thread(target=self.fault.check, daemon=True).start()

    def recover_lost(self, suspects: list[int]) -> dict[int, int]:
        """A client found partitions with no reachable replica: check the nodes it saw fail (a ping each), mark the
        dead ones failed, and restore redundancy now (from replicas, else from the latest checkpoint where that
        holds the partition as it is). Returns ``{partition: new owner}`` for the copies made."""
        with self.lock:
            suspects = [n for n in suspects if n in self.actors and n not in self.dispatch.failed_nodes]
            alive = self.dispatch.alive(set(suspects), min(5.0, self.config.communication_timeout_ms / 1000))
            dead = [n for n in suspects if n not in alive]
            for n in dead:
                self.dispatch.mark_failed(n, "reported by a client, no answer to a ping")
            before = self.version
            out = self.restore_redundancy()
            if dead and self.version == before:  # nothing to copy, but the views must learn of the failures
                self.publish()
            return out  # nothing changed: no new version, so a query that cannot be answered is not re-planned

    def set_options(self, **options: Any) -> None:
        """Set ``balance_threshold``, ``node_capacity``, ``tuning_policy`` or the failure detector's
        ``memory_threshold`` / ``latency_factor`` / ``rebalance_every``."""
        with self.lock:
            for k, v in options.items():
                if k in ("balance_threshold", "node_capacity", "tuning_policy"):
                    setattr(self, k, v)
                elif k in ("memory_threshold", "latency_factor", "rebalance_every"):
                    setattr(self.fault, k, v)
                else:
                    raise ValueError(f"unknown controller option {k!r}")
            self._persist()

    def check_health(self) -> Any:
        """One heartbeat round now, its recovery plan carried out; returns the plan."""
        return self.fault.check()

    def options(self) -> dict[str, Any]:
        return {"balance_threshold": self.balance_threshold, "node_capacity": dict(self.node_capacity),
                "tuning_policy": self.tuning_policy}

    def comm_totals(self) -> dict[str, int]:
        """The controller's own message counters (node-to-node copies are counted by the nodes)."""
        return self.comm.totals()

    # -- helpers used by the concerns -----------------------------------------------------------------------
    @property
    def live_node_ids(self) -> list[int]:
        return [n for n in sorted(self.actors) if n not in self.dispatch.failed_nodes]

    @property
    def node_ids(self) -> list[int]:
        return sorted(self.actors)

    def require_data(self) -> GlobalIndexMetadata:
        if self.meta is None:
            raise NotDistributedError("no data has been distributed yet; call cluster.distribute_data(points) first")
        return self.meta

    def machines(self) -> dict[int, str]:
        """Ray node (machine) of each node, for placing replicas on distinct machines."""
        return {i: info.get("ray_node_id", "") or str(i) for i, info in self.node_info.items()}

    def fewest_replicas(self, candidates: list[int]) -> int:
        """The candidate node holding the fewest partition replicas now (lowest id on ties)."""
        meta = self.meta
        return min(candidates, key=lambda n: (len(meta.partitions_of(n)), n))

    def actor(self, node: int) -> Any:
        return self.actors[node]

    def partitions_call(self, method: str, *args: Any) -> list[tuple[list[int], Any]]:
        """Call ``node.method(*args, partition_ids)`` on one replica of each partition."""
        meta = self.require_data()

        def build(node: int, part_ids: list[int]):
            ref = getattr(self.actors[node], method).remote(*args, part_ids)
            return ref, part_ids, message_bytes(args, part_ids)

        return self.dispatch.run(list(range(meta.n_partitions)), self.routing, build, lambda: self.routing,
                                 balance=False)

    # -- tear down ------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the node actors and forget the stored state; the caller then kills this actor."""
        with self.lock:
            self.gone = True
            self.fault.stop()
            self._stop_periodic.set()
            for a in self.actors.values():
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # already gone
                    pass
            if self.named:
                state_store.delete_cluster(self.name)
            with self.changed:
                self.changed.notify_all()
