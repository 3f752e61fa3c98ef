"""The runtime interface: what algorithms, live updates and the public facade use to reach the cluster.

A :class:`ClusterRuntime` is one client's connection to one cluster. It caches a
:class:`~distspatial.control.controller.ClusterView` (metadata, routing table, node handles, failed nodes) and
sends work straight to the nodes; the controller is asked only for writes and when the cached view is outdated.
Everything an algorithm needs is here, under public names (no algorithm reaches into the facade or the
controller):

* state: :attr:`config`, :attr:`meta`, :attr:`routing`, :attr:`version`, :attr:`actors`, :attr:`failed_nodes`,
  :attr:`live_node_ids`, :attr:`mean_variance`, :meth:`require_data`, :meth:`sync` (fetch a newer view);
* node calls: :meth:`send`, :meth:`send_multi`, :meth:`recv`, :meth:`mark_failed`, :meth:`partitions_call`
  (one replica of every partition, always the same one: algorithm state stays there), :meth:`run_assignment`
  (query rows grouped by partition, one message per node, failover to replicas);
* consistency: :meth:`stable` runs a query and plans it again when a node refuses the plan's version;
* ids: :meth:`rows_of_ids`, :meth:`point_ids`, :meth:`next_run_id`;
* writes: :meth:`call_controller` (errors mapped: a torn-down cluster raises
  :class:`~distspatial.core.errors.ClusterGoneError`, an unresponsive controller
  :class:`~distspatial.core.errors.ControllerUnavailableError`).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from ..control.controller import ClusterView, is_guarded
from ..core.metadata import GlobalIndexMetadata
from ..kernels.routing import RoutingTable
from ..core.codec import encode_all, message_bytes
from ..core.config import NodeConfig
from ..core.errors import (ClusterGoneError, ControllerUnavailableError, NotDistributedError, PartitionLostError,
                           PartitionMovedError, StaleMetadataError)
from ..core.stats import CommunicationCounters
from ..node.dispatch import Dispatcher, NodeMessages
from ..kernels.query_planning import Assignment, stack_groups

log = logging.getLogger(__name__)

__all__ = ["ClusterRuntime", "MAX_REPLANS"]

#: a query refused this many times in a row (the layout changing under it without pause) gives up
MAX_REPLANS = 100


class ClusterRuntime(NodeMessages):
    """One client's connection to a cluster (see module docstring)."""

    def __init__(self, controller: Any, view: ClusterView, controller_timeout_s: float = 120.0) -> None:
        # controller_timeout_s bounds the small calls (views, versions, settings); writes and control work
        # (a distribute of 40M points, a checkpoint) take as long as they take
        self.controller = controller
        self.name = view.name
        self.controller_timeout_s = controller_timeout_s
        self.comm = CommunicationCounters()
        self.closed: str | None = None  # why this client may not be used any more (None: open)
        #: the cluster's token, sent with every state-changing call (the controller checks it); None: none held
        self.token: str | None = None
        cfg = view.config
        self.dispatch = Dispatcher(dict(view.actors), cfg.communication_timeout_ms / 1000.0, cfg.max_retries,
                                   self.comm, on_failure=self._report_failure)
        self._lock = threading.Lock()
        self._view = view
        self._routing: RoutingTable | None = RoutingTable(view.meta) if view.meta is not None else None
        self.dispatch.failed_nodes.update(view.failed)
        self._id_map: tuple[int, Any] | None = None  # (data set id, (sorted ids, rows) or None)
        self._live_ids: tuple[int, np.ndarray] | None = None  # (version, sorted live ids)
        self.replans = 0  # queries planned again because a node refused an outdated plan

    # -- the cached view ------------------------------------------------------------------------------------
    @property
    def view(self) -> ClusterView:
        return self._view

    @property
    def config(self) -> NodeConfig:
        return self._view.config

    @property
    def meta(self) -> GlobalIndexMetadata | None:
        return self._view.meta

    @property
    def routing(self) -> RoutingTable | None:
        return self._routing

    @property
    def version(self) -> int:
        return self._view.version

    @property
    def actors(self) -> dict[int, Any]:
        return self.dispatch.actors

    @property
    def failed_nodes(self) -> set[int]:
        return self.dispatch.failed_nodes

    @property
    def live_node_ids(self) -> list[int]:
        return [n for n in sorted(self.actors) if n not in self.failed_nodes]

    @property
    def mean_variance(self) -> float:
        """Mean over dimensions of the points' variance (scikit-learn's scale for k-means ``tol``): as loaded, or,
        once points were ingested or deleted, of the live points now (from per-partition moments on the nodes,
        merged with Chan et al.'s pairwise formula)."""
        if not self._view.modified:
            return self._view.mean_variance
        n, mean, m2 = 0, None, None
        for _, parts in self.partitions_call("moments"):
            for cnt, mu, sq in parts:
                if cnt == 0:
                    continue
                if mean is None:
                    n, mean, m2 = cnt, mu, sq
                    continue
                delta = mu - mean
                total = n + cnt
                mean = mean + delta * (cnt / total)
                m2 = m2 + sq + delta**2 * (n * cnt / total)
                n = total
        return float(np.mean(m2 / n)) if n else 0.0

    def snapshot(self) -> tuple[GlobalIndexMetadata, RoutingTable, int]:
        """``(meta, routing, version)`` of one view, for planning a query (they always belong together)."""
        with self._lock:
            return self.require_data(), self._routing, self._view.version

    def require_data(self) -> GlobalIndexMetadata:
        if self.closed:
            raise RuntimeError(self.closed)
        if self._view.meta is None:
            raise NotDistributedError("no data has been distributed yet; call cluster.distribute_data(points) first")
        return self._view.meta

    def install(self, view: ClusterView) -> None:
        """Take ``view`` if it is newer than the cached one (a light one keeps the node handles, unless the node
        set changed: then the whole view is fetched)."""
        if view.actors is None:
            if view.members != self._view.members:
                view = self.call_controller("view", view.version, timeout_s=self.controller_timeout_s)
            else:
                view = dataclasses.replace(view, actors=self._view.actors, node_info=self._view.node_info)
        with self._lock:
            if view.version < self._view.version:
                return
            self._view = view
            self._routing = RoutingTable(view.meta) if view.meta is not None else None
            actors = dict(view.actors)
            self.dispatch.actors = actors
            self.dispatch.failed_nodes.update(view.failed)
            # a node the controller no longer knows is gone for good; one it knows but we marked failed stays out
            self.dispatch.failed_nodes.intersection_update(set(actors) | set(view.failed))

    def refresh(self, min_version: int = 0) -> ClusterView:
        """Fetch the controller's view (at least ``min_version``) and take it."""
        view = self.call_controller("view", min_version, timeout_s=self.controller_timeout_s)
        self.install(view)
        return view

    def sync(self) -> None:
        """Fetch a newer view if the controller has one (one small call); algorithms start with this so that
        they see every change another client made."""
        if self.call_controller("current_version", timeout_s=self.controller_timeout_s) != self._view.version:
            self.refresh()

    # -- the controller -------------------------------------------------------------------------------------
    def call_controller(self, method: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> Any:
        """``controller.method(*args, **kwargs)``, waiting up to ``timeout_s`` (``None``: as long as it takes);
        the controller's own errors are raised as they are. A state-changing method goes through the
        controller's token check with :attr:`token` (:class:`~distspatial.core.errors.AccessDeniedError` when
        refused)."""
        if self.closed:
            raise RuntimeError(self.closed)
        try:
            if is_guarded(method, args):
                ref = self.controller.guarded.remote(self.token, method, *args, **kwargs)
            else:
                ref = getattr(self.controller, method).remote(*args, **kwargs)
            return ray.get(ref, timeout=timeout_s)
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        except GetTimeoutError:
            raise ControllerUnavailableError(
                f"the controller of cluster {self.name or '(unnamed)'} did not answer {method!r} within "
                f"{timeout_s:g} s (it may be restarting); retry the call") from None
        except RayActorError as exc:
            raise ClusterGoneError(
                f"cluster {self.name or '(unnamed)'} is gone: its controller was shut down "
                f"({type(exc).__name__}); create or attach to a running cluster "
                "(DistributedSpatialCluster.list_clusters() lists them)") from None

    def _report_failure(self, node: int, reason: str) -> None:
        try:  # fire and forget: the controller checks the node and recovers
            self.controller.report_failure.remote(node, reason)
        except Exception:
            pass

    def check_alive(self) -> None:
        """Raise :class:`ClusterGoneError` when the cluster was torn down (by this or another client)."""
        self.call_controller("current_version", timeout_s=30.0)

    # -- node calls -----------------------------------------------------------------------------------------
    def actor(self, node: int) -> Any:
        """The actor of ``node``; :class:`PartitionMovedError` when it was removed (a call planned before
        ``remove_node`` is then re-planned by the dispatcher)."""
        try:
            return self.actors[node]
        except KeyError:
            raise PartitionMovedError(f"node {node} was removed after the call was planned") from None

    def mark_failed(self, node: int, reason: str) -> None:
        """Stop sending work to ``node`` (the controller is told and checks it)."""
        self.dispatch.mark_failed(node, reason)

    def mark_failed_if_dead(self) -> list[int]:
        """Ping every node not marked failed; mark those that do not answer. Returns the newly failed ones."""
        return self.dispatch.mark_failed_if_dead()

    def partitions_call(self, method: str, *args: Any, partitions: list[int] | None = None) -> list[tuple[list[int], Any]]:
        """Call ``node.method(*args, partition_ids)`` on one replica of each partition; ``[(pids, result)]``.
        Algorithm steps keep per-partition state on the node: always the same replica (the first live owner)."""
        meta = self.require_data()
        pids = list(range(meta.n_partitions)) if partitions is None else partitions

        def build(node: int, part_ids: list[int]):
            ref = getattr(self.actor(node), method).remote(*args, part_ids)
            return ref, part_ids, message_bytes(args, part_ids)

        return self.run_partitions(pids, build, balance=False)

    def run_partitions(
        self, pids: list[int], build, missing: list[int] | None = None, balance: bool = True
    ) -> list[tuple[Any, Any]]:
        """One dispatcher round; partitions lost on every replica are first reloaded by the controller (from
        the latest checkpoint of the data set, when there is one); still lost, they are skipped and recorded in
        ``missing`` when it is a list (a partial answer the caller asked for), else :class:`PartitionLostError`
        names them (or :class:`ClusterGoneError` when the whole cluster was torn down)."""
        try:
            return self.dispatch.run(pids, self._routing, build, self._current_routing, balance=balance)
        except PartitionLostError:
            self.check_alive()
            self.call_controller("recover_lost", sorted(self.failed_nodes))
            self.refresh()
            return self.dispatch.run(pids, self._routing, build, self._current_routing, missing, balance)

    def _current_routing(self) -> RoutingTable:
        """The routing of the newest view (the dispatcher re-plans partitions that moved with it)."""
        self.refresh()
        return self._routing

    def run_assignment(
        self, assign: Assignment, method: str, row_args, missing: list[int] | None = None, version: int | None = None,
        later_round: bool = False, **options: Any,
    ) -> list[tuple[Any, Any]]:
        """Run node ``method`` on the rows of ``assign``; each node gets one message for all its partitions.

        ``row_args(rows)`` gives the per-row arrays for those rows; the node is called as
        ``method(*row_args(rows), segments, **options, version=version)``: a node that knows a newer version
        refuses (:class:`StaleMetadataError`, handled by :meth:`stable`). A ``later_round`` of a query (kNN round
        2) is refused only when partitions changed since ``version`` (the first round already established that
        the plan saw every write acknowledged before the query began). Returns ``[(rows, result), ...]``.
        """
        groups = assign.groups()
        if version is not None:
            options["layout" if later_round else "version"] = version
        compress = self.config.compression

        def build(node: int, pids: list[int]):
            rows, segments = stack_groups(groups, pids)
            args = encode_all(row_args(rows), compress)
            ref = getattr(self.actor(node), method).options(concurrency_group="reads").remote(
                *args, segments, **options)
            return ref, rows, message_bytes(args, segments, options)

        return self.run_partitions(list(groups), build, missing)

    def stable(self, plan_and_run: Callable[[], Any], missing: list[int] | None = None) -> Any:
        """Run a query that plans on :meth:`snapshot` and return its answer; when a node refuses the plan's
        version (the layout or the data changed since: another client's write, a split, a migration), fetch
        the newer view and plan again, so the answer is exact for a version at least as new as any write
        acknowledged before the call."""
        for _ in range(MAX_REPLANS):
            try:
                return plan_and_run()
            except StaleMetadataError as exc:
                self.replans += 1
                if self._view.version < exc.version:  # another thread of this client may have it already
                    self.refresh(exc.version)
                if missing is not None:
                    missing.clear()
        raise ControllerUnavailableError(f"the layout changed {MAX_REPLANS} times during one query; retry it")

    # -- ids ------------------------------------------------------------------------------------------------
    def rows_of_ids(self, ids: np.ndarray) -> np.ndarray:
        """Row of each global id in algorithm results: its input row, or after live updates its position in
        :meth:`point_ids`."""
        if self._view.modified:
            return np.searchsorted(self.sorted_live_ids(), ids)
        idmap = self.id_map()
        if idmap is None:
            return ids
        id_sorted, id_rows = idmap
        return id_rows[np.searchsorted(id_sorted, ids)]

    def id_map(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(sorted user ids, input row of each)``, fetched from the controller once per data set."""
        meta = self.require_data()
        cached = self._id_map
        if cached is None or cached[0] != meta.dataset_id:
            cached = self._id_map = (meta.dataset_id, self.call_controller("id_map") if self._view.has_id_map else None)
        return cached[1]

    def sorted_live_ids(self) -> np.ndarray:
        meta = self.require_data()
        cached = self._live_ids
        if cached is None or cached[0] != meta.version:
            chunks = [ids for _, parts in self.partitions_call("partition_ids") for _, ids in parts]
            cached = self._live_ids = (meta.version, np.sort(np.concatenate(chunks)) if chunks else np.empty(0, np.int64))
        return cached[1]

    def point_ids(self) -> np.ndarray:
        """Ids of the points in the order algorithm labels use (see ``DistributedSpatialCluster.point_ids``)."""
        meta = self.require_data()
        if self._view.modified:
            return self.sorted_live_ids().copy()
        idmap = self.id_map()
        if idmap is None:
            return np.arange(meta.n_points, dtype=np.int64)
        id_sorted, id_rows = idmap
        out = np.empty_like(id_sorted)
        out[id_rows] = id_sorted
        return out

    @staticmethod
    def next_run_id() -> int:
        """A new id for an algorithm run's state on the nodes (random: unique across clients)."""
        return random.getrandbits(62)

    @staticmethod
    def new_token() -> int:
        """A new write token (the controller applies a write once per token, retries included)."""
        return random.getrandbits(63)
