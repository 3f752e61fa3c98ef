"""The coordinator: :class:`DistributedSpatialCluster`, living in the driver process.

It owns the node actors, the versioned :class:`~distspatial.control.metadata.GlobalIndexMetadata` (the one place that
records partitions and their placement) and the :class:`~distspatial.control.routing.RoutingTable` derived from it.
Public calls validate their input, plan with :mod:`distspatial.client.planner`, run rounds of per-partition work through
:class:`~distspatial.client.dispatch.Dispatcher` (one message per node per round, failover to replicas) and merge.

Example::

    >>> import numpy as np
    >>> from distspatial import DistributedSpatialCluster, NodeConfig
    >>> pts = np.random.default_rng(0).random((10_000, 2))
    >>> with DistributedSpatialCluster(NodeConfig().with_node_count(2)) as cluster:  # doctest: +SKIP
    ...     cluster.distribute_data(pts)
    ...     dist, ids = cluster.distributed_knn_search(np.array([0.5, 0.5]), 5)
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import numpy as np
import ray

from .algorithms import dbscan as _dbscan
from .algorithms import hierarchical as _hierarchical
from .algorithms import join as _join
from .live import ingest as _ingest
from .algorithms import kmeans as _kmeans
from .core.codec import decode_all, encode, encode_all, message_bytes, wire_and_raw
from .control.balancing import LoadBalancer, LoadMetrics, RebalancePlan, Strategy, TuningPolicy
from .core.config import NodeConfig
from .core.curves import curve_keys
from .client.dispatch import Dispatcher, ping_ref
from .algorithms.hierarchical import HierarchicalResult
from .core.errors import NodeFailureError, NotDistributedError, PartitionLostError, PartitionMovedError
from .control.fault import FailureType, FaultDetector, RecoveryPlan, RecoveryStrategy
from .kernels.local_index import merge_topk
from .control.metadata import GlobalIndexMetadata, PartitionInfo
from .node.spatial_node import SpatialNode
from .kernels.partitioning import partition_points
from .control.placement import place_partitions
from .client.planner import Assignment, ball_pairs, box_pairs, knn_followups, knn_home
from .control.routing import RoutingTable
from .control.ray_connect import cluster_cpus, connect, disconnect
from .core.progress import make_bar, progress_bar
from .core.stats import ClusterStatistics, CommunicationCounters, LatencyRecorder, NodeStatistics, QueryStatus, Timer
from .core.validation import check_ids, check_k, check_points, check_queries, check_radius

log = logging.getLogger(__name__)

__all__ = ["DistributedSpatialCluster"]


def threads_for(cfg: NodeConfig, total_cpus: float) -> int:
    """Compute threads per node: ``threads_per_node`` or the cluster's CPUs divided by the node count."""
    return cfg.threads_per_node or max(1, int(total_cpus // cfg.node_count))


def _new_actor(node_id: int, cpus: float, threads: int, ray_node: str | None = None, compress: bool = False,
               device: str = "cpu", gpus: float = 0.0) -> Any:
    """Start one node actor, placed with Ray's SPREAD strategy or pinned to the Ray node ``ray_node``."""
    strategy: Any = "SPREAD"
    if ray_node is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        strategy = NodeAffinitySchedulingStrategy(node_id=ray_node, soft=False)
    return (
        # queries (knn/ball/box) run in their own thread (group "reads"), so they never wait behind an append or
        # an algorithm step; liveness pings in "control" (a busy node still answers); everything else runs one
        # call at a time in the default group
        ray.remote(concurrency_groups={"reads": 1, "control": 1})(SpatialNode)
        .options(num_cpus=cpus, num_gpus=gpus, scheduling_strategy=strategy, max_concurrency=1)
        .remote(node_id, threads, compress, device)
    )


def _gpus_per_node(cfg: NodeConfig) -> float:
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


def _free_cpus(wanted: float, wait_s: float = 10.0) -> float:
    """CPUs free in the runtime, waiting up to ``wait_s`` for ``wanted`` (actors just killed release theirs late)."""
    deadline = time.monotonic() + wait_s
    while True:
        free = float(ray.available_resources().get("CPU", 0.0))
        if free + 1e-9 >= wanted or time.monotonic() > deadline:
            return free
        time.sleep(0.1)


class DistributedSpatialCluster:
    """A distributed spatial index over Ray actors (see module docstring).

    Args:
        config: the cluster's :class:`NodeConfig`; ``None`` uses the defaults (4 nodes, embedded runtime).
    """

    def __init__(self, config: NodeConfig | None = None) -> None:
        self.config = config if config is not None else NodeConfig()
        if not isinstance(self.config, NodeConfig):
            raise ValueError(f"config must be a NodeConfig, got {type(config).__name__}")
        self._started_ray = connect(self.config)
        self._closed = False
        self._meta: GlobalIndexMetadata | None = None
        self._routing: RoutingTable | None = None
        # splits begun / published: a query planned while one ran is planned again (see _stable_layout)
        self._splits_begun = self._splits_done = 0
        self._dataset_counter = 0
        self._id_sorted: np.ndarray | None = None  # user ids, sorted (None: ids are row numbers)
        self._id_rows: np.ndarray | None = None  # row of each sorted id
        self._mean_variance = 0.0
        self._modified = False  # points were ingested or deleted since distribute_data / restore
        self._next_id = 0  # next automatic id for ingested points
        self._has_user_ids = False  # distribute_data was given ids: ingest needs them too
        self._batch_counter = 0  # ingest batch ids (replays are no-ops on the nodes)
        self._live_ids: tuple[int, np.ndarray] | None = None  # (metadata version, sorted live ids)
        self.comm = CommunicationCounters()
        self.latency = LatencyRecorder()
        self._run_counter = 0
        self._checkpoint: tuple[int, str, dict] | None = None  # (data set id, uri, manifest) of the latest
        self._autoscale_skip: set[str] = set()  # Ray nodes where a node of ours could not start
        self._last_load: dict[int, tuple[float, dict]] = {}  # previous stats sample per node (for rates)
        self._part_queries: dict[tuple[int, int], int] = {}  # (node, partition) -> queries served there
        self.balance_threshold = 1.25  # max/mean load that triggers an automatic rebalance
        self.node_capacity: dict[int, float] = {}  # capacity weights for ProportionalLoad (default 1.0)
        self.progress = True  # progress bars for long work (shown only when stderr is a terminal)
        self.tuning_policy = TuningPolicy()  # when rebalance() splits partitions or adds read replicas
        self._part_q_tuned: dict[int, int] = {}  # per-partition query counts at the previous rebalance
        try:
            self._actors, self._node_info = self._start_nodes()
        except BaseException:
            disconnect(self._started_ray)
            raise
        self._dispatch = Dispatcher(
            self._actors, self.config.communication_timeout_ms / 1000.0, self.config.max_retries, self.comm
        )
        self._meta_lock = threading.RLock()  # serialises metadata changes (distribute, recovery); reads need none
        self._threads = threads_for(self.config, cluster_cpus())
        self._fault = FaultDetector(
            self,
            interval_s=self.config.heartbeat_interval_ms / 1000.0,
            timeout_s=min(self.config.communication_timeout_ms, 5 * self.config.heartbeat_interval_ms) / 1000.0,
        )
        if self.config.fault_tolerance or self.config.auto_scale or self.config.load_balancing:
            self._fault.start()
        self._stop_periodic = threading.Event()
        if self.config.checkpoint_interval_s is not None:
            threading.Thread(target=self._periodic_checkpoints, name="distspatial-checkpoint", daemon=True).start()

    # -- life cycle -----------------------------------------------------------------------------------------
    def _start_nodes(self) -> tuple[dict[int, Any], dict[int, dict]]:
        cfg = self.config
        total = cluster_cpus()
        # Node actors are long-lived and idle between calls; by default they share the CPUs still free (at most
        # one each), so two clusters can live in one runtime. Set cpus_per_node to reserve more.
        free = _free_cpus(cfg.node_count * (cfg.cpus_per_node or 0.01))
        cpus = cfg.cpus_per_node or max(0.01, min(1.0, int(free / cfg.node_count * 100) / 100))
        threads = threads_for(cfg, total)
        if cfg.address is None and cpus * cfg.node_count > free + 1e-9:
            raise RuntimeError(
                f"{cfg.node_count} nodes x {cpus:g} CPUs do not fit in the {free:g} CPUs still free in this Ray "
                f"runtime (another cluster may hold them); set NodeConfig.cpus_per_node lower or shut the other down"
            )
        self._cpus_per_node = cpus
        gpus = _gpus_per_node(cfg)
        actors = {i: _new_actor(i, cpus, threads, compress=cfg.compression, device=cfg.device, gpus=gpus)
                  for i in range(cfg.node_count)}
        refs = {i: ping_ref(a) for i, a in actors.items()}
        ready, missing = ray.wait(list(refs.values()), num_returns=len(refs), timeout=max(60.0, cfg.communication_timeout_ms / 1000))
        if missing:
            for a in actors.values():
                ray.kill(a)
            raise RuntimeError(
                f"only {len(ready)} of {cfg.node_count} node actors started within the timeout; the Ray cluster has "
                f"{total:g} CPUs and each node asks for {cpus:g} (set NodeConfig.cpus_per_node lower or add machines)"
            )
        info = dict(zip(refs.keys(), ray.get(list(refs.values()))))
        return actors, info

    def shutdown(self) -> None:
        """Stop the node actors, and the Ray runtime if this cluster started it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if getattr(self, "_fault", None) is not None:
            self._fault.stop()
        if getattr(self, "_stop_periodic", None) is not None:
            self._stop_periodic.set()
        for a in getattr(self, "_actors", {}).values():
            try:
                ray.kill(a)
            except Exception:  # already gone
                pass
        disconnect(self._started_ray)

    def __enter__(self) -> DistributedSpatialCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if not self._closed and self._started_ray:
                self.shutdown()
        except Exception:
            pass

    def __repr__(self) -> str:
        m = self._meta
        pts = m.n_points if m else 0
        parts = m.n_partitions if m else 0
        state = "closed" if self._closed else "running"
        return (
            f"DistributedSpatialCluster(nodes={self.config.node_count}, points={pts}, partitions={parts}, "
            f"curve={self.config.curve!r}, replication={self.config.replication_factor}, {state})"
        )

    def _repr_html_(self) -> str:
        """Notebook view: the configuration and, per node, its partitions and points (from the metadata; no
        call to the nodes)."""
        from html import escape

        m = self._meta
        failed = self._dispatch.failed_nodes if hasattr(self, "_dispatch") else set()
        rows = []
        for n in self.node_ids:
            parts = m.partitions_of(n) if m else []
            pts = sum(m.partitions[p].size for p in parts) if m else 0
            status = "failed" if n in failed else ("closed" if self._closed else "alive")
            rows.append(f"<tr><td>{n}</td><td>{status}</td><td>{len(parts)}</td><td>{pts:,}</td></tr>")
        head = escape(repr(self))
        return (f"<div><b>{head}</b><table><thead><tr><th>node</th><th>status</th><th>partitions</th>"
                f"<th>points</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>")

    @property
    def metadata(self) -> GlobalIndexMetadata:
        """The current metadata snapshot (raises :class:`NotDistributedError` before ``distribute_data``)."""
        return self._require_data()

    @property
    def n_points(self) -> int:
        return self._meta.n_points if self._meta else 0

    @property
    def node_ids(self) -> list[int]:
        """Ids of every node started, failed ones included (see :meth:`statistics` for their status)."""
        return sorted(self._actors)

    @property
    def live_node_ids(self) -> list[int]:
        """Ids of the nodes not marked failed."""
        return [n for n in sorted(self._actors) if n not in self._dispatch.failed_nodes]

    def _machines(self) -> dict[int, str]:
        """Ray node (machine) of each node, for placing replicas on distinct machines."""
        return {i: info.get("ray_node_id", "") or str(i) for i, info in self._node_info.items()}

    def _fewest_replicas(self, candidates: list[int]) -> int:
        """The candidate node holding the fewest partition replicas now (lowest id on ties)."""
        meta = self._meta
        return min(candidates, key=lambda n: (len(meta.partitions_of(n)), n))

    def _require_data(self) -> GlobalIndexMetadata:
        if self._closed:
            raise RuntimeError("this cluster has been shut down; create a new DistributedSpatialCluster")
        if self._meta is None:
            raise NotDistributedError("no data has been distributed yet; call cluster.distribute_data(points) first")
        return self._meta

    # -- distribute -----------------------------------------------------------------------------------------
    def distribute_data(self, points: Any, ids: Any = None) -> GlobalIndexMetadata:
        """Partition ``points`` along the space-filling curve and load the partitions onto the nodes.

        Args:
            points: ``(n, d)`` numeric array, finite.
            ids: optional unique integer id per point; default: the row number. Every result speaks in these ids.

        Returns the new :class:`GlobalIndexMetadata`. Replaces any previously distributed data set. Input is
        validated before anything changes, so a bad call leaves the cluster as it was.
        """
        if self._closed:
            raise RuntimeError("this cluster has been shut down; create a new DistributedSpatialCluster")
        pts = check_points(points)
        n, d = pts.shape
        id_arr = check_ids(ids, n) if ids is not None else None
        cfg = self.config
        with self._meta_lock, Timer() as t:
            plan = partition_points(pts, cfg.partition_count, id_arr, cfg.curve)
            n_parts, cuts = plan.n_partitions, plan.cuts
            machine_of = self._machines()
            live = self.live_node_ids
            owners = place_partitions(n_parts, live, min(cfg.replication_factor, len(live)), machine_of)
            self._dataset_counter += 1
            dataset = self._dataset_counter
            # One object per partition in Ray's object store; each owner node reads it from there.
            refs, sizes = {}, {}
            for p in range(n_parts):
                objs = [encode(a) if cfg.compression else a for a in plan.part(p)]
                sizes[p] = np.sum([wire_and_raw(o) for o in objs], axis=0)
                refs[p] = tuple(ray.put(o) for o in objs)
            loads = []
            bar = make_bar(len(live), "distribute", self.progress, unit="node")
            for node in live:
                pids = [p for p in range(n_parts) if node in owners[p]]
                args = [r for p in pids for r in refs[p]]
                wire, raw = np.sum([sizes[p] for p in pids], axis=0) if pids else (0, 0)
                head = message_bytes(dataset, pids)
                self.comm.sent(node, int(wire) + head, int(raw) + head)
                loads.append((node, self._actors[node].load_partitions.remote(dataset, pids, *args)))
            try:
                for node, ref in loads:
                    self._recv(node, ref)
                    bar.update(1)
            except Exception:
                self._meta, self._routing = None, None
                raise
            finally:
                bar.close()
            parts = tuple(
                PartitionInfo(
                    partition_id=p,
                    key_lo=int(plan.key_lo[p]),
                    key_hi=int(plan.key_hi[p]),
                    lo=plan.box_lo[p].copy(),
                    hi=plan.box_hi[p].copy(),
                    size=int(cuts[p + 1] - cuts[p]),
                    nbytes=int((cuts[p + 1] - cuts[p]) * (d * 8 + 8)),
                    owners=owners[p],
                )
                for p in range(n_parts)
            )
            version = (self._meta.version + 1) if self._meta else 1
            meta = GlobalIndexMetadata(
                dim=d, lo=plan.lo, hi=plan.hi, curve=cfg.curve, bits=plan.bits, partitions=parts, version=version,
                dataset_id=dataset,
            )
            self._modified, self._next_id, self._live_ids = False, n if id_arr is None else int(id_arr.max()) + 1, None
            self._has_user_ids = id_arr is not None
            if id_arr is None:
                self._id_sorted = self._id_rows = None
            else:
                self._id_rows = np.argsort(id_arr, kind="stable")
                self._id_sorted = id_arr[self._id_rows]
            self._mean_variance = float(np.mean([pts[:, j].var() for j in range(d)]))
            self._meta, self._routing = meta, RoutingTable(meta)  # switch in one step
        log.info("distributed %d points in %d partitions over %d nodes in %.2f s", n, n_parts, cfg.node_count, t.seconds)
        return meta

    def distribute_chunks(
        self, source: Any, columns: Any = None, id_column: str | None = None, chunk_rows: int = 1 << 20,
        sample_size: int = 200_000,
    ) -> GlobalIndexMetadata:
        """Distribute a data set too large for the driver's memory, chunk by chunk.

        ``source``: a point file (``.npy``, CSV, Parquet, LAS; ``columns`` and ``id_column`` as in
        :func:`distspatial.io.open_points`) or a callable returning a fresh iterator of ``(n, d)`` chunks (or
        ``(points, ids)`` pairs): it is read twice, once for the bounds and a key sample that cut the
        partitions, once to ingest. Ids are the source's row numbers unless ``id_column`` / ids are given.

        >>> cluster.distribute_chunks("lidar.laz", chunk_rows=2_000_000)  # doctest: +SKIP
        """
        return _ingest.distribute_chunks(self, source, columns, id_column, chunk_rows, sample_size)

    def _actor(self, node: int) -> Any:
        """The actor of ``node``; :class:`PartitionMovedError` when it was removed (a call planned before
        ``remove_node`` is then re-planned by the dispatcher)."""
        try:
            return self._actors[node]
        except KeyError:
            raise PartitionMovedError(f"node {node} was removed after the call was planned") from None

    def _send(self, node: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``node.method(*args, **kwargs)`` and count the message (object references count 0 bytes here:
        their bytes are counted by the node that produced them)."""
        self.comm.sent(node, message_bytes(args, kwargs))
        return getattr(self._actors[node], method).remote(*args, **kwargs)

    def _send_multi(self, node: int, method: str, n_out: int, *args: Any) -> list:
        """Like :meth:`_send` for a method with ``n_out`` results (Ray ``num_returns``): a list of references,
        which can travel on to other nodes without passing through the driver."""
        self.comm.sent(node, message_bytes(args))
        ref = getattr(self._actors[node], method).options(num_returns=n_out).remote(*args)
        return [ref] if n_out == 1 else list(ref)

    def _recv(self, node: int, ref: Any, timeout: float | None = None) -> Any:
        """``ray.get`` a data message's result from ``node``, counting and decoding it."""
        res = ray.get(ref, timeout=timeout)
        self.comm.received(node, message_bytes(res))
        return decode_all(res)

    def _rows_of_ids(self, ids: np.ndarray) -> np.ndarray:
        """Row of each global id in algorithm results: its input row, or after live updates its position in
        :meth:`point_ids`."""
        if self._modified:
            return np.searchsorted(self._sorted_live_ids(), ids)
        if self._id_sorted is None:
            return ids
        return self._id_rows[np.searchsorted(self._id_sorted, ids)]

    def _sorted_live_ids(self) -> np.ndarray:
        meta = self._require_data()
        cached = self._live_ids
        if cached is None or cached[0] != meta.version:
            chunks = [ids for _, parts in self._partitions_call("partition_ids") for _, ids in parts]
            cached = self._live_ids = (meta.version, np.sort(np.concatenate(chunks)) if chunks else np.empty(0, np.int64))
        return cached[1]

    def _set_meta(self, meta: GlobalIndexMetadata) -> None:
        """Switch to a new metadata version (and its routing table) in one step."""
        self._meta, self._routing = meta, RoutingTable(meta)

    def sample_points(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, points)`` of a uniform random sample of at most ``n`` points, drawn on the nodes (each
        partition in proportion to its size); for plots and previews of data sets too large to fetch."""
        meta = self._require_data()
        # draw a little more on the nodes (Bernoulli), then exactly min(n, points) here
        frac = 1.0 if n >= meta.n_points else min(1.0, 1.1 * n / max(1, meta.n_points) + 64 / max(1, meta.n_points))
        ids, pts = [], []
        for _, parts in self._partitions_call("sample_fraction", float(frac), int(seed)):
            for i, p in parts:
                ids.append(i)
                pts.append(p)
        if not ids:
            return np.empty(0, np.int64), np.empty((0, meta.dim))
        ids, pts = np.concatenate(ids), np.concatenate(pts)
        if len(ids) > n:
            keep = np.sort(np.random.default_rng(seed).choice(len(ids), n, replace=False))
            ids, pts = ids[keep], np.take(pts, keep, axis=0)
        return ids, pts

    def plot_partitions(self, **kwargs: Any) -> Any:
        """Draw the partitions, their nodes and the curve order (see :func:`distspatial.ui.plots.plot_partitions`;
        needs ``distspatial[plots]``)."""
        from .ui.plots import plot_partitions

        return plot_partitions(self, **kwargs)

    def point_ids(self) -> np.ndarray:
        """Ids of the points in the order algorithm labels use: the rows given to ``distribute_data`` (their
        ids), or after :meth:`ingest` / :meth:`delete` / :meth:`update` all live ids in ascending order."""
        meta = self._require_data()
        if self._modified:
            return self._sorted_live_ids().copy()
        if self._id_sorted is None:
            return np.arange(meta.n_points, dtype=np.int64)
        out = np.empty_like(self._id_sorted)
        out[self._id_rows] = self._id_sorted
        return out

    # -- live updates ---------------------------------------------------------------------------------------
    def ingest(self, points: Any, ids: Any = None, timestamps: Any = None) -> np.ndarray:
        """Append points to the running index; returns their ids (new automatic ids when ``ids`` is None).

        Each point goes to the partition owning its curve-key range (points outside the original bounds are
        accepted); the call returns once every replica holds the batch, and every query started afterwards
        sees it, exactly. ``ids`` must be new (use :meth:`update` to move existing points); a data set
        distributed with user ids needs them. See :mod:`distspatial.live.ingest`.

        >>> new_ids = cluster.ingest(np.random.random((1000, 2)))  # doctest: +SKIP
        """
        if np.asarray(points).size == 0:
            return np.empty(0, dtype=np.int64)
        return _ingest.ingest(self, points, ids, timestamps)[0]

    def stream(
        self,
        source: Any,
        *operators: Any,
        kmeans: Any = None,
        update: bool = False,
        max_in_flight: int = 2,
        on_event: Any = None,
        background: bool = False,
    ) -> Any:
        """Consume a stream of batches into the live index and run streaming analytics on it.

        ``source``: an iterable or async iterator of ``(points, timestamps[, ids])`` batches (or dicts with
        those keys). ``operators``: :class:`~distspatial.live.windows.WindowedAggregator`,
        :class:`~distspatial.live.continuous.GeofenceMonitor`, :class:`~distspatial.live.continuous.KnnWatch`;
        ``kmeans``: a :class:`~distspatial.live.streaming.StreamingKMeans` updated on the nodes. ``update=True``:
        batches carry ids of moving objects, which are moved rather than added. At most ``max_in_flight``
        batches wait in memory (backpressure). Events go to ``on_event`` and to the returned
        :class:`~distspatial.live.streaming.StreamHandle` (``handle.events()``); ``background=True`` returns at
        once while the stream runs in a thread.

        >>> agg = WindowedAggregator(WindowSpec.tumbling(60), GridCounts([0, 0], [1, 1], (32, 32)))  # doctest: +SKIP
        >>> handle = cluster.stream(feed, agg, kmeans=StreamingKMeans(8))  # doctest: +SKIP
        """
        from .live.streaming import run_stream

        return run_stream(self, source, list(operators), kmeans, update, max_in_flight, on_event, background)

    def delete(self, ids: Any) -> int:
        """Delete points by id (every replica); returns how many were found and deleted."""
        return _ingest.delete(self, ids)

    def update(self, ids: Any, points: Any, timestamps: Any = None) -> int:
        """Move existing points to new positions (delete + ingest under one lock); returns how many existed."""
        return _ingest.update(self, ids, points, timestamps)[0]

    def _split_grown_partitions(self) -> None:
        """Split partitions that ingest made too large (``tuning_policy``), a bounded number per call."""
        # the size rule of the balancer's tuning policy (no query counts: only "too large" splits come out)
        actions = LoadBalancer.tune(self._meta, {}, len(self.live_node_ids), self.config.replication_factor,
                                    self.tuning_policy)
        for a in actions:
            try:
                self.split_partition(a.partition)
            except (ValueError, NodeFailureError) as exc:
                log.warning("distspatial: split of grown partition %d skipped: %s", a.partition, exc)

    # -- queries --------------------------------------------------------------------------------------------
    def _run_assignment(
        self, assign: Assignment, method: str, row_args, missing: list[int] | None = None, **options: Any
    ) -> list[tuple[Any, Any]]:
        """Run node ``method`` on the rows of ``assign``; each node gets one message for all its partitions.

        ``row_args(rows)`` gives the per-row arrays for those rows; the node is called as
        ``method(*row_args(rows), segments, **options)``. Returns ``[(rows, result), ...]``.
        """
        groups = assign.groups()

        def build(node: int, pids: list[int]):
            row_parts = [groups[p] for p in pids]
            rows = np.concatenate(row_parts) if len(row_parts) > 1 else row_parts[0]
            bounds = np.cumsum([0] + [len(r) for r in row_parts])
            segments = [(p, int(bounds[i]), int(bounds[i + 1])) for i, p in enumerate(pids)]
            args = encode_all(row_args(rows), self.config.compression)
            ref = getattr(self._actor(node), method).options(concurrency_group="reads").remote(
                *args, segments, **options)
            return ref, rows, message_bytes(args, segments, options)

        return self._run_partitions(list(groups), build, missing)

    def distributed_knn_search(self, query: Any, k: int, allow_partial: bool = False) -> tuple:
        """Exact k nearest neighbours of one point or a batch.

        Args:
            query: a point ``(d,)`` or a batch ``(m, d)``.
            k: neighbours per query, ``1 <= k <= n_points``.

        Returns ``(distances, ids)``: shape ``(k,)`` each for one point, ``(m, k)`` for a batch, sorted by
        distance (Euclidean), ids as given to ``distribute_data``.

        When every replica of some partitions is lost (and no checkpoint has them), the call raises
        :class:`PartitionLostError`; with ``allow_partial=True`` it answers from the partitions still there and
        returns ``((distances, ids), QueryStatus)``, whose ``partial`` and ``missing_partitions`` say so
        (slots beyond the points found hold ``inf`` / ``-1``).

        >>> dist, ids = cluster.distributed_knn_search(np.array([0.5, 0.5]), 10)  # doctest: +SKIP
        """
        meta = self._require_data()
        q, single = check_queries(query, meta.dim)
        k = check_k(k, meta.n_points)
        missing: list[int] | None = [] if allow_partial else None
        with Timer() as t:
            dist, ids = self._stable_layout(lambda: self._knn(q, k, meta, missing), missing)
        self.latency.record(t.seconds, len(q))
        out = (dist[0], ids[0]) if single else (dist, ids)
        return (out, QueryStatus.of(missing)) if allow_partial else out

    def _stable_layout(self, plan_and_run: Callable[[], Any], missing: list[int] | None = None) -> Any:
        """Run a query that plans on ``self._routing`` and return its answer, planned and run again when a
        partition split began meanwhile: nodes split before the coordinator publishes the halves, so a plan
        made on the older layout could miss the upper half. Queries wait for a split in progress to finish."""
        while True:
            begun = self._splits_begun
            if begun != self._splits_done:  # a split is being carried out: wait for its metadata
                with self._meta_lock:
                    if self._splits_begun != self._splits_done:  # ... by this thread itself: no waiting
                        return plan_and_run()
                continue
            out = plan_and_run()
            if self._splits_begun == begun:
                return out
            if missing is not None:
                missing.clear()

    def _knn(
        self, q: np.ndarray, k: int, meta: GlobalIndexMetadata, missing: list[int] | None = None,
        routing: RoutingTable | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        routing = routing or self._routing
        m = len(q)
        keys = curve_keys(q, meta.lo, meta.hi, meta.curve, meta.bits)
        order = np.argsort(keys, kind="stable")
        qs = np.take(q, order, axis=0)
        home = knn_home(keys[order], routing)
        dist = np.empty((m, k))
        ids = np.empty((m, k), dtype=np.int64)

        # round 1: the k best in the home partition
        dist.fill(np.inf)  # rows whose home partition is lost (partial answers) keep these
        ids.fill(-1)
        for rows, (d_, i_) in self._run_assignment(
            home, "knn", lambda rows: (np.take(qs, rows, axis=0), None), missing, k=k
        ):
            dist[rows], ids[rows] = d_, i_

        kth = dist[:, k - 1]
        home_part = np.empty(m, dtype=np.int64)
        for p, a, b in zip(home.partitions, home.starts[:-1], home.starts[1:]):
            home_part[home.rows[a:b]] = p
        follow = knn_followups(qs, kth, home_part, routing)
        if follow.n_pairs:  # round 2: only candidates within the k-th distance
            results = self._run_assignment(
                follow, "knn", lambda rows: (np.take(qs, rows, axis=0), kth[rows]), missing, k=k
            )
            # Merge node by node; a node's rows may repeat a query (two partitions), so merge per segment.
            for rows, (d_, i_) in results:
                self._merge_rows(dist, ids, rows, d_, i_, k)
        out_d = np.empty_like(dist)
        out_i = np.empty_like(ids)
        out_d[order] = dist
        out_i[order] = ids
        return out_d, out_i

    @staticmethod
    def _merge_rows(dist, ids, rows, d_, i_, k) -> None:
        """Merge candidate rows into the running top-k; ``rows`` may repeat (handled by unique passes)."""
        pending = np.arange(len(rows))
        while len(pending):
            r = rows[pending]
            _, first = np.unique(r, return_index=True)
            take = pending[first]
            rr = rows[take]
            dist[rr], ids[rr] = merge_topk(dist[rr], ids[rr], d_[take], i_[take], k)
            pending = np.setdiff1d(pending, take, assume_unique=True)

    def range_search(
        self, center: Any, radius: Any, return_points: bool = False, allow_partial: bool = False
    ) -> np.ndarray | list[np.ndarray] | tuple:
        """Ids of all points within ``radius`` of ``center`` (inclusive), sorted by id.

        One centre ``(d,)`` gives an array; a batch ``(m, d)`` (radius scalar or ``(m,)``) gives a list of arrays.
        With ``return_points=True`` each result is ``(ids, points)``. ``allow_partial`` as in
        :meth:`distributed_knn_search`.
        """
        meta = self._require_data()
        missing: list[int] | None = [] if allow_partial else None
        c, single = check_queries(center, meta.dim, "center")
        r = check_radius(radius, len(c))
        with Timer() as t:
            out = self._stable_layout(lambda: self._collect_hits(
                ball_pairs(c, r, self._routing), "ball", lambda rows: (c[rows], r[rows]), meta.dim, return_points,
                missing), missing)
        self.latency.record(t.seconds, len(c))
        out = out[0] if single else out
        return (out, QueryStatus.of(missing)) if allow_partial else out

    def box_search(
        self, lo: Any, hi: Any, return_points: bool = False, allow_partial: bool = False
    ) -> np.ndarray | list[np.ndarray] | tuple:
        """Ids of all points with ``lo <= p <= hi`` in every dimension, sorted by id.

        One box (``lo``, ``hi`` of shape ``(d,)``) gives an array; a batch ``(m, d)`` gives a list of arrays.
        """
        meta = self._require_data()
        missing: list[int] | None = [] if allow_partial else None
        lo_a, single = check_queries(lo, meta.dim, "lo")
        hi_a, _ = check_queries(hi, meta.dim, "hi")
        if lo_a.shape != hi_a.shape:
            raise ValueError(f"lo and hi must have the same shape, got {np.shape(lo)} and {np.shape(hi)}")
        bad = np.flatnonzero((lo_a > hi_a).any(axis=1))
        if len(bad):
            raise ValueError(f"box {int(bad[0])} has lo > hi in some dimension; each box needs lo <= hi")
        with Timer() as t:
            out = self._stable_layout(lambda: self._collect_hits(
                box_pairs(lo_a, hi_a, self._routing), "box", lambda rows: (lo_a[rows], hi_a[rows]), meta.dim,
                return_points, missing), missing)
        self.latency.record(t.seconds, len(lo_a))
        out = out[0] if single else out
        return (out, QueryStatus.of(missing)) if allow_partial else out

    def _collect_hits(
        self, assign: Assignment, method: str, row_args, d: int, return_points: bool, missing: list[int] | None = None
    ) -> list:
        """Run a hit-list query (``ball``/``box``) and split the hits per query, sorted by id."""
        m = assign.n_queries
        q_parts, id_parts, pt_parts = [], [], []
        for rows, (counts, ids, pts) in self._run_assignment(
            assign, method, row_args, missing, return_points=return_points
        ):
            q_parts.append(np.repeat(rows, counts))
            id_parts.append(ids)
            if return_points:
                pt_parts.append(pts)
        q_all = np.concatenate(q_parts) if q_parts else np.empty(0, np.int64)
        id_all = np.concatenate(id_parts) if id_parts else np.empty(0, np.int64)
        order = np.lexsort((id_all, q_all))
        id_all = id_all[order]
        splits = np.cumsum(np.bincount(q_all, minlength=m))[:-1]
        id_lists = np.split(id_all, splits)
        if not return_points:
            return id_lists
        pt_all = np.concatenate(pt_parts)[order] if pt_parts else np.empty((0, d))
        return list(zip(id_lists, np.split(pt_all, splits)))

    # -- algorithms -----------------------------------------------------------------------------------------
    def distributed_kmeans(
        self,
        k: int,
        max_iterations: int = 300,
        tol: float = 1e-4,
        init: str | np.ndarray = "k-means||",
        seed: int | None = None,
        oversampling_factor: float | None = None,
        init_rounds: int = 2,
    ) -> _kmeans.KMeansResult:
        """Lloyd's k-means over the distributed points; points never leave their nodes.

        Args:
            k: clusters, ``1 <= k <= n_points``.
            max_iterations: Lloyd iterations at most.
            tol: stop when the summed squared centroid movement is at most ``tol * mean(variance per
                dimension)`` (scikit-learn's convention); ``0`` runs until labels stop changing.
            init: ``"k-means||"`` (Bahmani et al. 2012), ``"random"`` or a ``(k, d)`` array of centroids.
            seed: seeds the initialisation (default: ``NodeConfig.seed``).
            oversampling_factor: k-means|| points sampled per round (default ``2 * k``).
            init_rounds: k-means|| rounds (default 2, as in Spark).

        Returns a :class:`~distspatial.algorithms.kmeans.KMeansResult` that unpacks to ``(centroids, labels)``; labels are
        in the order of the rows given to ``distribute_data``. It also has ``inertia`` and ``n_iter``.
        """
        meta = self._require_data()
        return _kmeans.run_kmeans(
            self, meta, k, max_iterations, tol, init, self.config.seed if seed is None else seed,
            oversampling_factor, init_rounds,
        )

    def distributed_hierarchical(
        self,
        n_clusters: int | None = None,
        distance_threshold: float | None = None,
        linkage: str = "ward",
        n_micro_clusters: int = 2000,
        seed: int | None = None,
    ) -> HierarchicalResult:
        """Multi-level hierarchical clustering: micro-clusters on the nodes, weighted Ward on the coordinator.

        Exactly one of ``n_clusters`` / ``distance_threshold`` (Ward height, scipy's convention) is set.
        ``n_micro_clusters`` leaves in total, spread over the partitions by size. Returns a
        :class:`~distspatial.algorithms.hierarchical.HierarchicalResult` (unpacks to ``(labels, linkage)``; labels in the
        order of the rows given to ``distribute_data``; ``linkage`` in scipy's format over the micro-clusters).

        >>> labels, Z = cluster.distributed_hierarchical(n_clusters=5)  # doctest: +SKIP
        >>> scipy.cluster.hierarchy.dendrogram(Z, no_plot=True)  # doctest: +SKIP
        """
        return _hierarchical.run_hierarchical(self, n_clusters, distance_threshold, linkage, int(n_micro_clusters),
                                              (self.config.seed or 0) if seed is None else seed)

    def distributed_dbscan(self, eps: float, min_samples: int = 5) -> Any:
        """Exact DBSCAN: the same core points, noise and clusters as ``sklearn.cluster.DBSCAN(eps,
        min_samples)`` (border points may join either adjacent cluster, as in sklearn).

        Partitions are extended by halos of width ``eps`` that move node to node; local clusters are merged
        on the coordinator through shared core points. Returns a :class:`~distspatial.algorithms.dbscan.DBSCANResult`
        (``labels`` in the order of :meth:`point_ids`, ``-1`` for noise; ``core_sample_indices``).

        >>> res = cluster.distributed_dbscan(eps=0.01, min_samples=10)  # doctest: +SKIP
        >>> res.n_clusters, res.n_noise  # doctest: +SKIP
        """
        return _dbscan.run_dbscan(self, eps, min_samples)

    def knn_join(
        self,
        other_points: Any = None,
        k: int = 1,
        self_join: bool = False,
        output: str | None = None,
        chunk_rows: int = 250_000,
        columns: Any = None,
    ) -> Any:
        """Exact kNN join: the ``k`` nearest points of the distributed set for every row of ``other_points``.

        ``other_points``: an ``(m, d)`` array -> ``(distances (m, k), ids (m, k))``; a file path (``.npy``, CSV,
        Parquet, LAS; ``columns`` picks coordinates) or an iterable of ``(n, d)`` chunks -> a generator of
        ``(distances, ids)`` per chunk (nothing is collected on the driver). With ``output`` (``.parquet`` or
        ``.csv``) the answers are written chunk by chunk as rows ``(query, rank, id, distance)`` and the path is
        returned. ``self_join=True`` (no ``other_points``): the all-kNN of the distributed set, each point
        excluding itself, rows in ``distribute_data`` order (``query`` = the point's id in a file).

        >>> dist, ids = cluster.knn_join(other, k=5)  # doctest: +SKIP
        >>> cluster.knn_join("big.parquet", k=5, columns="x,y", output="join.parquet")  # doctest: +SKIP
        """
        return _join.knn_join(self, other_points, k, self_join, output, chunk_rows, columns)

    def distance_matrix(
        self, a: Any, b: Any = None, output: str | None = None, memory_budget: int = _join.DEFAULT_MEMORY_BUDGET,
        tile_rows: int = 4096,
    ) -> np.ndarray:
        """Euclidean distance matrix between the rows of ``a`` and ``b`` (``b=None``: ``a`` with itself), computed
        in ``tile_rows`` x ``tile_rows`` tiles on the nodes.

        Returned whole when ``rows(a) * rows(b) * 8`` bytes fit ``memory_budget`` (default 2 GiB); otherwise
        pass ``output="matrix.npy"`` and the tiles are written into that memory-mapped file as they arrive
        (returned as a ``numpy.memmap``). Neither possible: :class:`MemoryError` (or :class:`OSError` when the
        disk is too small) saying so, before any work starts.

        >>> D = cluster.distance_matrix(a, b)  # doctest: +SKIP
        """
        return _join.distance_matrix(self, a, b, output, memory_budget, tile_rows)

    def query(self, query_type: Any, params: Any) -> Any:
        """Typed entry point: ``query(QueryType.KNearestNeighbors, QueryParameters(query_point=p, k=5))`` ->
        a :class:`~distspatial.algorithms.query.QueryResults` (``NearestNeighbors``, ``RangeSearch``, ``Clustering`` or
        ``DistanceMatrix``). Runs the same code as the named method of each query type."""
        from .algorithms.query import run_query

        return run_query(self, query_type, params)

    def _partitions_call(self, method: str, *args: Any, partitions: list[int] | None = None) -> list[tuple[list[int], Any]]:
        """Call ``node.method(*args, partition_ids)`` on one replica of each partition; ``[(pids, result)]``."""
        meta = self._require_data()
        pids = list(range(meta.n_partitions)) if partitions is None else partitions

        def build(node: int, part_ids: list[int]):
            ref = getattr(self._actor(node), method).remote(*args, part_ids)
            return ref, part_ids, message_bytes(args, part_ids)

        # algorithm steps keep per-partition state on the node: always the same replica (the first live owner)
        return self._run_partitions(pids, build, balance=False)

    def _run_partitions(
        self, pids: list[int], build, missing: list[int] | None = None, balance: bool = True
    ) -> list[tuple[Any, Any]]:
        """One dispatcher round; partitions lost on every replica are first reloaded from the latest checkpoint
        of this data set when there is one; else they are skipped and recorded in ``missing`` when it is a list
        (a partial answer the caller asked for), else :class:`PartitionLostError` names them."""
        def current() -> RoutingTable:
            return self._routing

        try:
            return self._dispatch.run(pids, self._routing, build, current, balance=balance)
        except PartitionLostError:
            ckp = self._checkpoint
            if ckp is not None and self._meta is not None and ckp[0] == self._meta.dataset_id:
                self.restore_redundancy()
            elif missing is None:
                raise
            return self._dispatch.run(pids, self._routing, build, current, missing, balance)

    def _next_run_id(self) -> int:
        self._run_counter += 1
        return self._run_counter

    # -- fault tolerance ------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """Node health from the heartbeats, failed nodes, and the recovery plans carried out so far.

        >>> cluster.health()["nodes"][0]["status"]  # doctest: +SKIP
        'alive'
        """
        if not self._fault.health:
            self._fault.check()
        return {
            "nodes": self._fault.report(),
            "failed_nodes": sorted(self._dispatch.failed_nodes),
            "recoveries": [
                {"time": t, "actions": [(a.strategy.value, a.node_id, a.failure.value, a.reason) for a in plan.actions]}
                for t, plan in self._fault.history
            ],
            "under_replicated": self._under_replicated(),
        }

    def _under_replicated(self) -> list[int]:
        meta = self._meta
        if meta is None:
            return []
        live = [n for n in self._actors if n not in self._dispatch.failed_nodes]
        want = min(self.config.replication_factor, len(live))
        return [p.partition_id for p in meta.partitions if len([o for o in p.owners if o in live]) < want]

    def _recover(self, plan: RecoveryPlan) -> None:
        """Carry out a recovery plan: isolate, restart, re-replicate, migrate (see :mod:`distspatial.control.fault`)."""
        with self._meta_lock:
            for a in plan.actions:
                if a.failure in (FailureType.NODE_UNRESPONSIVE, FailureType.NETWORK_PARTITION):
                    self._dispatch.mark_failed(a.node_id, a.failure.value)
                    h = self._fault.health.get(a.node_id)
                    if h is not None and h.status != "failed":
                        h.status = "isolated" if a.failure is FailureType.NETWORK_PARTITION else "failed"
            if any(a.strategy is RecoveryStrategy.RESTART for a in plan.actions):
                for _ in range(sum(a.strategy is RecoveryStrategy.RESTART for a in plan.actions)):
                    self._start_replacement()
            for a in plan.actions:
                if a.strategy is RecoveryStrategy.REPLICATE and a.failure is FailureType.PARTIAL_FAILURE:
                    self._copy_partitions({p: a.node_id for p in a.partitions})
                elif a.strategy is RecoveryStrategy.MIGRATE:
                    self._migrate_one(a.node_id)
            self.restore_redundancy()

    def _start_replacement(self, ray_node: str | None = None) -> int | None:
        """Start one more node actor if the runtime has room (on Ray node ``ray_node`` if given); its id."""
        cpus = self._cpus_per_node
        if ray_node is None and float(ray.available_resources().get("CPU", 0.0)) + 1e-9 < cpus:
            log.warning("distspatial: no room for a replacement node (%.2f CPUs needed)", cpus)
            return None
        node = max(self._actors) + 1
        actor = _new_actor(node, cpus, self._threads, ray_node, self.config.compression, self.config.device,
                           _gpus_per_node(self.config))
        try:
            info = ray.get(ping_ref(actor), timeout=max(30.0, self.config.communication_timeout_ms / 1000))
        except Exception as exc:
            log.warning("distspatial: replacement node %d did not start: %s", node, exc)
            ray.kill(actor)
            return None
        self._actors[node] = actor
        self._node_info[node] = info
        log.warning("distspatial: started replacement node %d", node)
        return node

    def follow_ray_cluster(self) -> list[int]:
        """``auto_scale``: give every alive Ray node that hosts no live node of ours a new node, then rebalance.

        Ray nodes that leave are handled as failures (their partitions are re-replicated). Returns new node ids.
        """
        with self._meta_lock:
            alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0}
            hosted = {self._node_info.get(n, {}).get("ray_node_id") for n in self.live_node_ids}
            new = []
            for ray_node in sorted(alive - hosted - self._autoscale_skip):
                node = self._start_replacement(ray_node)
                if node is not None:
                    new.append(node)
                else:  # no room there: do not stall every heartbeat on it again
                    self._autoscale_skip.add(ray_node)
            if new:
                log.warning("distspatial: Ray nodes joined; started nodes %s", new)
                self._rebalance_counts()
            return new

    def restore_redundancy(self) -> dict[int, int]:
        """Copy under-replicated partitions from a live replica onto other live nodes until each has
        ``replication_factor`` replicas (or as many as there are live nodes); dead owners leave the metadata.

        Returns ``{partition: new owner}`` for the copies made.
        """
        with self._meta_lock:
            meta = self._meta
            if meta is None:
                return {}
            failed = self._dispatch.failed_nodes
            live = [n for n in sorted(self._actors) if n not in failed]
            want = min(self.config.replication_factor, len(live))
            targets: dict[int, int] = {}
            load = {n: 0 for n in live}
            for p in meta.partitions:
                for o in p.owners:
                    if o in load:
                        load[o] += 1
            machine = {n: self._node_info.get(n, {}).get("ray_node_id", str(n)) for n in live}
            lost = [p.partition_id for p in meta.partitions if not any(o in load for o in p.owners)]
            if lost and live:
                self._reload_from_checkpoint(lost, live, load)
                meta = self._meta
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
            self._copy_partitions(targets)
            # drop dead owners from the metadata even where nothing had to be copied
            meta = self._meta
            stale = {p.partition_id: tuple(o for o in p.owners if o not in failed)
                     for p in meta.partitions if any(o in failed for o in p.owners)}
            if stale:
                self._meta = meta.with_owners(stale)
                self._routing = RoutingTable(self._meta)
            return targets

    def _reload_from_checkpoint(self, lost: list[int], live: list[int], load: dict[int, int]) -> None:
        """Partitions with no live replica come back from the latest checkpoint of this data set, if any."""
        from .control import checkpoint as ck

        ckp = self._checkpoint
        meta = self._meta
        if ckp is None or ckp[0] != meta.dataset_id:
            log.error("distspatial: partitions %s lost on every replica and no checkpoint of this data set", lost)
            return
        _, uri, man = ckp
        by_id = {p["id"]: p for p in man["partitions"]}
        owners = {}
        for pid in lost:
            target = min(live, key=lambda n: (load[n], n))
            p = by_id[pid]
            try:
                self._recv(target, self._send(target, "load_partition_files",
                    meta.dataset_id, [(pid, ck.join(uri, p["file"]), p["raw_bytes"], p["sha256"])]))
            except Exception as exc:
                log.error("distspatial: restoring partition %d from %s failed: %s", pid, uri, exc)
                continue
            load[target] += 1
            owners[pid] = (target,)
        if owners:
            self._meta = meta.with_owners(owners)
            self._routing = RoutingTable(self._meta)
            log.warning("distspatial: partitions %s restored from checkpoint %s", sorted(owners), uri)

    def _copy_partitions(self, targets: dict[int, int]) -> None:
        """Copy each partition in ``targets`` from a live replica to its target node, node to node; then add
        the target to the partition's owners in a new metadata version."""
        if not targets:
            return
        meta = self._meta
        failed = self._dispatch.failed_nodes
        loads, added = [], {}
        for pid, target in targets.items():
            src = next((o for o in meta.partitions[pid].owners if o not in failed and o != target), None)
            if src is None:
                continue
            # the partition travels node to node; each node counts the bytes it sends or receives
            pts_ref, ids_ref = self._send_multi(src, "export_partition", 2, pid, self.config.compression)
            loads.append((pid, target, self._send(target, "load_partitions", meta.dataset_id, [pid], pts_ref, ids_ref)))
        for pid, target, ref in loads:
            try:
                self._recv(target, ref, timeout=max(60.0, self.config.communication_timeout_ms / 1000))
                added[pid] = target
            except Exception as exc:
                log.warning("distspatial: copying partition %d to node %d failed: %s", pid, target, exc)
        if added:
            owners = {}
            for p in meta.partitions:
                if p.partition_id in added:
                    keep = tuple(o for o in p.owners if o not in failed and o != added[p.partition_id])
                    owners[p.partition_id] = keep + (added[p.partition_id],)
            self._meta = self._meta.with_owners(owners)
            self._routing = RoutingTable(self._meta)
            log.info("distspatial: copied partitions %s", added)

    def _move_partition(self, pid: int, src: int, dst: int) -> None:
        """Online migration: copy ``pid`` from ``src`` to ``dst`` node to node, switch the metadata (new
        version), then drop the source copy. Queries planned on the old version still find ``src``'s copy until
        it is dropped, and the new version's owners hold it before it is."""
        self._copy_partitions({pid: dst})
        meta = self._meta
        if dst not in meta.partitions[pid].owners:
            raise NodeFailureError(f"moving partition {pid} from node {src} to node {dst} failed")
        self._meta = meta.with_owners({pid: tuple(o for o in meta.partitions[pid].owners if o != src)})
        self._routing = RoutingTable(self._meta)
        if src in self._actors and src not in self._dispatch.failed_nodes:
            self._actors[src].drop_partitions.remote([pid])

    def _migrate_one(self, node: int) -> None:
        """Move one partition off ``node`` (memory pressure) to the least loaded live node without it."""
        meta = self._meta
        mine = meta.partitions_of(node) if meta else []
        live = [n for n in self._actors if n not in self._dispatch.failed_nodes and n != node]
        if not mine:
            return
        pid = mine[-1]
        cand = [n for n in live if n not in meta.partitions[pid].owners]
        if cand:
            self._move_partition(pid, node, self._fewest_replicas(cand))

    # -- elastic scaling ------------------------------------------------------------------------------------
    def add_nodes(self, n: int = 1) -> list[int]:
        """Start ``n`` more nodes and move partitions onto them until replicas per node are even (within one).

        Queries keep running: each partition is copied before the metadata switches and dropped after.
        Returns the new node ids. Raises ``RuntimeError`` when the Ray cluster has no room for them.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        with self._meta_lock:
            new = []
            for _ in range(n):
                node = self._start_replacement()
                if node is None:
                    raise RuntimeError(
                        f"no room in the Ray cluster for another node ({self._cpus_per_node:g} CPUs each); "
                        f"started {len(new)} of {n}: {new}")
                new.append(node)
            self._rebalance_counts()
            return new

    def remove_node(self, node_id: int) -> None:
        """Drain ``node_id`` gracefully (its partitions first get replicas elsewhere), then stop it."""
        with self._meta_lock:
            if node_id not in self._actors:
                raise ValueError(f"no node {node_id}; nodes are {self.node_ids}")
            live = [n for n in self._actors if n not in self._dispatch.failed_nodes and n != node_id]
            if not live:
                raise ValueError("cannot remove the last live node")
            meta = self._meta
            if meta is not None:
                for pid in meta.partitions_of(node_id):
                    owners = self._meta.partitions[pid].owners
                    cand = [m for m in live if m not in owners]
                    if cand:
                        self._move_partition(pid, node_id, self._fewest_replicas(cand))
                    else:  # every other live node already holds it: just forget this copy
                        self._meta = self._meta.with_owners({pid: tuple(o for o in owners if o != node_id)})
                        self._routing = RoutingTable(self._meta)
            actor = self._actors.pop(node_id)
            self._node_info.pop(node_id, None)
            self._fault.health.pop(node_id, None)
            ray.kill(actor)
            log.info("distspatial: node %d drained and removed", node_id)

    def _rebalance_counts(self) -> None:
        """Move partitions from the nodes with the most replicas to those with the fewest until even."""
        meta = self._meta
        if meta is None:
            return
        live = [n for n in sorted(self._actors) if n not in self._dispatch.failed_nodes]
        while True:
            meta = self._meta
            count = {n: len(meta.partitions_of(n)) for n in live}
            hi = max(live, key=lambda n: (count[n], -n))
            lo = min(live, key=lambda n: (count[n], n))
            if count[hi] - count[lo] <= 1:
                return
            movable = [p for p in meta.partitions_of(hi) if lo not in meta.partitions[p].owners]
            if not movable:
                return
            self._move_partition(movable[-1], hi, lo)

    # -- load balancing -------------------------------------------------------------------------------------
    def load_metrics(self) -> dict[int, LoadMetrics]:
        """Measured load of every live node (rates since the previous call)."""
        now = time.monotonic()
        refs = {n: self._actors[n].stats.remote(True) for n in self.live_node_ids}
        out, prev = {}, self._last_load
        for n, ref in refs.items():
            try:
                s = ray.get(ref, timeout=self.config.communication_timeout_ms / 1000)
            except Exception as exc:
                self._dispatch.mark_failed(n, f"load metrics: {type(exc).__name__}")
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
            self._part_queries.update({(n, int(k)): v for k, v in s["part_queries"].items()})
            self._last_load[n] = (now, s)
        return out

    def split_partition(self, partition_id: int) -> int:
        """Split a partition at its curve-key median into two (same owners); returns the new partition's id.

        All replicas split in place, then the metadata switches to a version with both halves. Use it for a
        partition that grew too large or too hot; :meth:`rebalance` can then move one half elsewhere.
        """
        with self._meta_lock:
            meta = self._require_data()
            if not 0 <= partition_id < meta.n_partitions:
                raise ValueError(f"partition_id must be in [0, {meta.n_partitions}), got {partition_id}")
            part = meta.partitions[partition_id]
            if part.size < 2:
                raise ValueError(f"partition {partition_id} has {part.size} point(s); nothing to split")
            new_id = meta.n_partitions
            owners = [o for o in part.owners if o not in self._dispatch.failed_nodes]
            self._splits_begun += 1  # before any node splits: queries running now will be planned again
            try:
                return self._split_on_nodes(meta, part, new_id, owners)
            finally:
                self._splits_done = self._splits_begun

    def _split_on_nodes(self, meta: GlobalIndexMetadata, part: PartitionInfo, new_id: int, owners: list[int]) -> int:
        """Split ``part`` on its live ``owners``, then publish metadata with both halves (under the metadata lock)."""
        import dataclasses

        pid = part.partition_id
        refs = [self._actors[o].split_partition.remote(pid, new_id, meta.lo, meta.hi, meta.curve, meta.bits)
                for o in owners]
        results = ray.get(refs)
        (klo0, khi0, blo0, bhi0, n0), (klo1, khi1, blo1, bhi1, n1) = results[0]
        assert all(r[0][4] == n0 and r[1][4] == n1 for r in results), "replicas split differently"
        per_point = part.nbytes // max(1, part.size)
        first = dataclasses.replace(part, key_lo=klo0, key_hi=khi0, lo=blo0, hi=bhi0, size=n0, nbytes=n0 * per_point,
                                    owners=tuple(owners))
        second = PartitionInfo(new_id, klo1, khi1, blo1, bhi1, n1, n1 * per_point, tuple(owners))
        parts = list(meta.partitions)
        parts[pid] = first
        parts.append(second)
        self._set_meta(dataclasses.replace(meta, partitions=tuple(parts), version=meta.version + 1))
        log.info("distspatial: split partition %d -> %d + %d points (new id %d)", pid, n0, n1, new_id)
        return new_id

    def add_read_replica(self, partition_id: int, node: int | None = None) -> int:
        """Give a query-hot partition one more replica (beyond ``replication_factor``), on ``node`` or on the
        live node with the fewest replicas that lacks it; reads then spread over more nodes. Returns the node."""
        with self._meta_lock:
            meta = self._require_data()
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
            target = self._fewest_replicas(cand)
            self._copy_partitions({partition_id: target})
            if target not in self._meta.partitions[partition_id].owners:
                raise NodeFailureError(f"copying partition {partition_id} to node {target} failed")
            return target

    def rebalance(
        self, dry_run: bool = False, strategy: Strategy | str | None = None, threshold: float | None = None,
        max_migrations: int | None = None,
    ) -> RebalancePlan:
        """Plan (and unless ``dry_run``, carry out) splits, read replicas and migrations that even out load.

        ``strategy``: ``"RoundRobin"``, ``"LeastLoaded"``, ``"ProportionalLoad"`` or ``"AdaptiveLoad"``
        (default; data size and recent query load). First, partitions too large or too hot since the previous
        call are split or given a read replica (``cluster.tuning_policy``, a
        :class:`~distspatial.control.balancing.TuningPolicy`; listed in ``plan.actions``); then migrations move
        partitions off the heaviest nodes. Everything runs online: queries stay exact. With load balancing on
        (``NodeConfig.with_load_balancing``), the heartbeat thread calls this at a bounded rate.

        >>> print(cluster.rebalance(dry_run=True))  # doctest: +SKIP
        RebalancePlan(AdaptiveLoad): imbalance 2.800 -> 1.000, 6 migrations, 48.0 MB
        """
        self._require_data()
        strat = Strategy(strategy) if isinstance(strategy, str) else (strategy or Strategy.ADAPTIVE_LOAD)
        self.load_metrics()  # refresh per-partition query counts
        part_q: dict[int, int] = {}
        for (_, pid), v in self._part_queries.items():
            part_q[pid] = part_q.get(pid, 0) + v
        recent = {p: v - self._part_q_tuned.get(p, 0) for p, v in part_q.items()}
        balancer = LoadBalancer(strat, threshold if threshold is not None else self.balance_threshold,
                                self.node_capacity, max_migrations or 64)
        with self._meta_lock:
            actions = balancer.tune(self._meta, recent, len(self.live_node_ids), self.config.replication_factor,
                                    self.tuning_policy)
            if not dry_run:
                self._part_q_tuned = part_q
                for a in actions:
                    try:
                        if a.kind == "split":
                            self.split_partition(a.partition)
                        else:
                            self.add_read_replica(a.partition)
                        log.info("distspatial: %s partition %d (%s)", a.kind.replace("_", " "), a.partition, a.reason)
                    except (ValueError, NodeFailureError) as exc:
                        log.warning("distspatial: %s of partition %d skipped: %s", a.kind, a.partition, exc)
            plan = balancer.plan(self._meta, self.live_node_ids, part_q)
            plan.actions = actions
            if not dry_run:
                for m in plan.migrations:
                    if m.source in self._meta.partitions[m.partition].owners:
                        self._move_partition(m.partition, m.source, m.target)
                if plan.migrations or actions:
                    log.info("distspatial: rebalanced: %s", str(plan).splitlines()[0])
        return plan

    # -- checkpoints ----------------------------------------------------------------------------------------
    def checkpoint(self, path: str) -> str:
        """Write every partition (compressed, with SHA-256 checksums) and the metadata under ``path``.

        ``path`` is a local directory or a pyarrow filesystem URI (``s3://...``, ``gs://...``); with several
        machines it must be storage every machine can reach, since each partition is written by a node that
        holds it. Files get temporary names first; the manifest is written last and ``LATEST`` after it, so a
        crash never spoils the previous checkpoint. Returns the new checkpoint's directory.

        >>> cluster.checkpoint("/tmp/ckpt")  # doctest: +SKIP
        '/tmp/ckpt/ckpt-20261125-101500-a1b2c3-v1'
        """
        from .control import checkpoint as ck

        meta = self._require_data()
        fs, root = ck.resolve(path)
        fs.create_dir(root, recursive=True)
        ckpt = ck.new_checkpoint_dir(root, meta.version)
        fs.create_dir(ckpt, recursive=True)
        ckpt_uri = ckpt if "://" not in path else path.split("://", 1)[0] + "://" + ckpt
        files = {}
        with progress_bar(meta.n_partitions, "checkpoint", self.progress, unit="part") as bar:
            for _, written in self._partitions_call("write_partitions", ckpt_uri):
                for pid, name, nbytes, raw, digest in written:
                    files[pid] = {"file": name, "bytes": nbytes, "raw_bytes": raw, "sha256": digest}
                bar.update(len(written))
        manifest: dict[str, Any] = {
            "dim": meta.dim, "lo": meta.lo.tolist(), "hi": meta.hi.tolist(), "curve": meta.curve, "bits": meta.bits,
            "version": meta.version, "n_points": meta.n_points, "mean_variance": self._mean_variance,
            "partitions": [
                {"id": p.partition_id, "key_lo": str(p.key_lo), "key_hi": str(p.key_hi), "lo": p.lo.tolist(),
                 "hi": p.hi.tolist(), "size": p.size, "nbytes": p.nbytes, **files[p.partition_id]}
                for p in meta.partitions
            ],
            "user_ids": None,
            "modified": self._modified,  # ingest/delete since distribute: labels follow sorted ids
            "next_id": self._next_id,
            "has_user_ids": self._has_user_ids,
        }
        if self._id_sorted is not None and not self._modified:
            data, raw, digest = ck.encode_arrays(sorted=self._id_sorted, rows=self._id_rows)
            ck.write_bytes(fs, ck.join(ckpt, "ids.dsz"), data)
            manifest["user_ids"] = {"file": "ids.dsz", "raw_bytes": raw, "sha256": digest}
        ck.write_manifest(fs, root, ckpt, manifest)
        self._checkpoint = (meta.dataset_id, ckpt_uri, manifest)
        log.info("distspatial: checkpoint of %d partitions written to %s", meta.n_partitions, ckpt_uri)
        return ckpt_uri

    def _periodic_checkpoints(self) -> None:
        done = None  # (data set, point count) at the last checkpoint taken here: a proxy for "data changed"
        while not self._stop_periodic.wait(self.config.checkpoint_interval_s):
            meta = self._meta
            if meta is None or done == (meta.dataset_id, meta.n_points):
                continue
            try:
                self.checkpoint(self.config.checkpoint_path)
                done = (meta.dataset_id, meta.n_points)
            except Exception:
                log.exception("distspatial: periodic checkpoint failed")

    @classmethod
    def restore(cls, path: str, config: NodeConfig | None = None) -> DistributedSpatialCluster:
        """A new cluster holding the data of the checkpoint at ``path`` (its ``LATEST``, or one checkpoint
        directory), every file verified against its checksum. The node count may differ from the original.

        Raises :class:`~distspatial.control.checkpoint.CheckpointError` naming the missing or corrupt file.
        """
        from .control import checkpoint as ck

        fs, ckpt, manifest = ck.read_manifest(path)
        cluster = cls(config)
        try:
            cluster._load_checkpoint(fs, ckpt if "://" not in path else path.split("://", 1)[0] + "://" + ckpt,
                                     manifest)
        except BaseException:
            cluster.shutdown()
            raise
        return cluster

    def _load_checkpoint(self, fs, ckpt_uri: str, man: dict[str, Any]) -> None:
        from .control import checkpoint as ck

        cfg = self.config
        parts_m = man["partitions"]
        machine_of = self._machines()
        owners = place_partitions(len(parts_m), self.live_node_ids, cfg.replication_factor, machine_of)
        self._dataset_counter += 1
        dataset = self._dataset_counter
        loads = []
        for node in self.live_node_ids:
            files = [(p["id"], ck.join(ckpt_uri, p["file"]), p["raw_bytes"], p["sha256"])
                     for p in parts_m if node in owners[p["id"]]]
            loads.append((node, self._send(node, "load_partition_files", dataset, files)))
        try:
            for node, ref in loads:
                self._recv(node, ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            if isinstance(cause, ck.CheckpointError):
                msg = str(cause).splitlines()[-1]
                raise ck.CheckpointError(msg.split("CheckpointError: ", 1)[-1]) from None
            raise
        parts = tuple(
            PartitionInfo(
                partition_id=p["id"], key_lo=int(p["key_lo"]), key_hi=int(p["key_hi"]), lo=np.array(p["lo"]),
                hi=np.array(p["hi"]), size=p["size"], nbytes=p["nbytes"], owners=owners[p["id"]],
            )
            for p in parts_m
        )
        meta = GlobalIndexMetadata(
            dim=man["dim"], lo=np.array(man["lo"]), hi=np.array(man["hi"]), curve=man["curve"], bits=man["bits"],
            partitions=parts, version=man["version"] + 1, dataset_id=dataset,
        )
        if meta.n_points != man["n_points"]:
            raise ck.CheckpointError(f"checkpoint {ckpt_uri} holds {meta.n_points} points, manifest says {man['n_points']}")
        if man["user_ids"]:
            u = man["user_ids"]
            fs2, path = ck.resolve(ck.join(ckpt_uri, u["file"]))
            arr = ck.decode_arrays(ck.read_bytes(fs2, path), u["raw_bytes"], u["sha256"], path)
            self._id_sorted, self._id_rows = arr["sorted"], arr["rows"]
        else:
            self._id_sorted = self._id_rows = None
        self._mean_variance = man["mean_variance"]
        self._modified = bool(man.get("modified", False))
        self._next_id = int(man.get("next_id", meta.n_points))
        self._has_user_ids = bool(man.get("has_user_ids", self._id_sorted is not None))
        self._meta, self._routing = meta, RoutingTable(meta)
        self._checkpoint = (dataset, ckpt_uri, man)

    # -- statistics -----------------------------------------------------------------------------------------
    def statistics(self) -> ClusterStatistics:
        """Per-node and cluster-wide statistics (see :class:`~distspatial.core.stats.ClusterStatistics`)."""
        refs = {i: a.stats.remote() for i, a in self._actors.items() if i not in self._dispatch.failed_nodes}
        node_stats = {}
        for i, ref in refs.items():
            try:
                node_stats[i] = ray.get(ref, timeout=self.config.communication_timeout_ms / 1000)
            except Exception as exc:
                self._dispatch.mark_failed(i, f"statistics: {type(exc).__name__}")
        c = self.comm
        nodes = []
        for i in self.node_ids:
            s = node_stats.get(i)
            alive = s is not None
            nodes.append(
                NodeStatistics(
                    node_id=i,
                    status="alive" if alive else "failed",
                    ray_node_id=(s or self._node_info.get(i, {})).get("ray_node_id", ""),
                    host=(s or self._node_info.get(i, {})).get("host", ""),
                    partitions=len(s["partitions"]) if alive else 0,
                    points=s["points"] if alive else 0,
                    bytes_held=s["bytes"] if alive else 0,
                    queries_served=s["queries"] if alive else 0,
                    calls_served=s["calls"] if alive else 0,
                    busy_seconds=s["busy_s"] if alive else 0.0,
                    messages_sent=s["calls"] if alive else 0,
                    bytes_sent=s["bytes_out"] if alive else 0,
                    messages_received=s["calls"] if alive else 0,
                    bytes_received=s["bytes_in"] if alive else 0,
                    raw_bytes_sent=s["raw_bytes_out"] if alive else 0,
                    mean_call_ms=1e3 * s["busy_s"] / max(1, s["calls"]) if alive else 0.0,
                    delta_points=s.get("delta_points", 0) if alive else 0,
                    runs=s.get("runs", 0) if alive else 0,
                    base_rebuilds=s.get("base_rebuilds", 0) if alive else 0,
                )
            )
        pts = np.array([n.points for n in nodes if n.status == "alive"], dtype=np.float64)
        balance = float(pts.max() / pts.mean()) if len(pts) and pts.mean() > 0 else 1.0
        lat = self.latency.summary()
        tot = c.totals()
        meta = self._meta
        return ClusterStatistics(
            nodes=nodes,
            n_points=meta.n_points if meta else 0,
            n_partitions=meta.n_partitions if meta else 0,
            metadata_version=meta.version if meta else 0,
            queries=self.latency.total_queries,
            load_balance_score=balance,
            **lat,
            messages_sent=tot["messages_sent"] + sum(n.messages_sent for n in nodes),
            bytes_sent=tot["bytes_sent"] + sum(n.bytes_sent for n in nodes),
            messages_received=tot["messages_received"] + sum(n.messages_received for n in nodes),
            bytes_received=tot["bytes_received"] + sum(n.bytes_received for n in nodes),
            raw_bytes_sent=tot["raw_bytes_sent"] + sum(n.raw_bytes_sent for n in nodes),
            coordinator=tot,
        )
