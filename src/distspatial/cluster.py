"""The public facade: :class:`DistributedSpatialCluster`, a client of one cluster.

A cluster is a controller actor (:class:`~distspatial.control.controller.ClusterController`: metadata, writes,
recovery, balancing, checkpoints) and its node actors (the partitions). This object is a client of it: queries
are planned on a cached view and sent straight to the nodes (:mod:`distspatial.client.queries`), algorithms run
through the same runtime interface (:class:`~distspatial.client.runtime.ClusterRuntime`), and writes go to the
controller, which orders them.

* ``DistributedSpatialCluster(config)`` creates a cluster. Unnamed (the default), it lives and dies with this
  client, as a plain object would; with ``NodeConfig().with_name("cities")`` it is a named cluster that outlives
  the process: ``close()`` disconnects and leaves it running, ``shutdown()`` tears it down.
* ``DistributedSpatialCluster.attach("cities")`` attaches another process to a running named cluster;
  ``DistributedSpatialCluster.list_clusters()`` lists them.
* A named cluster created with a token (``NodeConfig().with_token(t)``, or ``DISTSPATIAL_TOKEN`` in the
  environment) takes writes and ``shutdown()`` only from clients holding it (``attach(name, token=t)`` or the
  same environment variable); others may query. Ray's own authentication guards the Ray cluster itself.

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
import os
from typing import Any, Callable

import numpy as np
import ray

from .algorithms import dbscan as _dbscan
from .algorithms import hierarchical as _hierarchical
from .algorithms import join as _join
from .algorithms import kmeans as _kmeans
from .algorithms import polygons as _polygons
from .algorithms.hierarchical import HierarchicalResult
from .client import queries as _queries
from .client.runtime import ClusterRuntime
from .client.fast_path import OneHop
from .client.upload import upload_partitions
from .control.balancing import LoadMetrics, RebalancePlan, Strategy, TuningPolicy
from .control.controller import NAMESPACE, ClusterController, controller_actor_name
from .core.memory import release_free_memory
from .core.metadata import GlobalIndexMetadata
from .control.ray_connect import connect, disconnect, join
from .control import state_store
from .core.access import check_token, env_token, make_verifier
from .core.config import NodeConfig
from .core.crs import CRSInfo, resolve_crs, to_unit
from .core.geo import chord_to_metres, lonlat_box_to_unit_bounds, metres_to_chord, unit_to_lonlat
from .core.errors import AccessDeniedError, ClusterExistsError, ClusterGoneError, ClusterNotFoundError
from .core.stats import ClusterStatistics, LatencyRecorder, NodeStatistics, QueryStatus, Timer
from .core.validation import check_ids, check_k, check_points, check_queries, check_radius
from .io.geoparquet import is_geopandas, points_from_geopandas
from .kernels.partitioning import partition_points
from .live import ingest as _ingest

log = logging.getLogger(__name__)

__all__ = ["DistributedSpatialCluster"]


def _controller_options(name: str | None) -> dict[str, Any]:
    """Ray options of a controller actor. An unnamed one belongs to the process that creates it and runs on
    that process's machine (placed elsewhere, the loss of that machine would take the whole cluster with it).
    A named one is detached, restarted by Ray (calls retried), and runs on the head node where it can (the head
    holds the GCS, without which the cluster is lost anyway)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    common: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 64}
    if name is None:
        here = ray.get_runtime_context().get_node_id()
        return {**common, "max_restarts": 0,
                "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=here, soft=False)}
    head = next((n["NodeID"] for n in ray.nodes()
                 if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {})), None)
    placement = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=head, soft=True)} if head else {}
    return {**common, **placement, "name": controller_actor_name(name), "namespace": NAMESPACE,
            "lifetime": "detached", "max_restarts": -1, "max_task_retries": -1}


def _find_controller(name: str) -> Any | None:
    try:
        return ray.get_actor(controller_actor_name(name), namespace=NAMESPACE)
    except ValueError:
        return None


def _running_clusters() -> list[str]:
    names = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a.get("namespace") == NAMESPACE and a.get("name", "").endswith(":controller"):
            names.append(a["name"].rsplit(":", 1)[0])
    return sorted(names)


class DistributedSpatialCluster:
    """A client of a distributed spatial index on Ray (see module docstring).

    Args:
        config: the cluster's :class:`NodeConfig`; ``None`` uses the defaults (4 nodes, embedded runtime).
        exist_ok: with a named config, attach to a running cluster of that name instead of raising
            :class:`~distspatial.core.errors.ClusterExistsError` (its own configuration then applies).
    """

    def __init__(self, config: NodeConfig | None = None, *, exist_ok: bool = False) -> None:
        config = config if config is not None else NodeConfig()
        if not isinstance(config, NodeConfig):
            raise ValueError(f"config must be a NodeConfig, got {type(config).__name__}")
        self._started_ray = connect(config)
        self._closed = False
        self.latency = LatencyRecorder()
        self.progress = True  # progress bars for long work (shown only when stderr is a terminal)
        # a named cluster takes DISTSPATIAL_TOKEN when the config has no token; the token itself stays here
        token = config.token if config.token is not None else (env_token() if config.name is not None else None)
        try:
            controller = self._create_controller(config.replace(token=None), exist_ok,
                                                 make_verifier(token) if token is not None else None)
            view = ray.get(controller.view.remote())
        except BaseException:
            disconnect(self._started_ray)
            raise
        self._rt = ClusterRuntime(controller, view)
        self._rt.token = token
        self._one_hop = OneHop(self._rt)
        self.config = view.config

    @staticmethod
    def _create_controller(config: NodeConfig, exist_ok: bool, verifier: tuple[bytes, bytes] | None = None) -> Any:
        name = config.name
        if name is not None:
            found = _find_controller(name)
            if found is not None:
                if exist_ok:
                    return found
                raise ClusterExistsError(
                    f"a cluster named {name!r} is already running; attach to it with "
                    f"DistributedSpatialCluster.attach({name!r}), pass exist_ok=True, or shut it down first "
                    f"(distspatial down {name})")
            state_store.delete_cluster(name)  # state left by a cluster of that name that is gone
        try:
            controller = ray.remote(ClusterController).options(**_controller_options(name)).remote(name, config,
                                                                                                  verifier)
            ray.get(controller.ready.remote())
        except ValueError as exc:  # created by another process in the meantime
            if name is not None and "already exists" in str(exc):
                if exist_ok:
                    return _find_controller(name)
                raise ClusterExistsError(f"a cluster named {name!r} is already running") from None
            raise
        except ray.exceptions.RayActorError as exc:  # the constructor failed (e.g. nodes did not fit)
            cause = getattr(exc, "cause", None) or getattr(getattr(exc, "error", None), "cause", None)
            if name is not None:
                state_store.delete_cluster(name)
            if isinstance(cause, Exception):
                raise cause from None
            raise RuntimeError(f"the cluster's controller did not start: {exc}") from None
        return controller

    @classmethod
    def attach(cls, name: str, address: str | None = None, token: str | None = None) -> DistributedSpatialCluster:
        """A client of the running named cluster ``name`` (on the Ray cluster at ``address``: ``None`` or
        ``"auto"`` the local one, or ``"ray://host:port"`` / ``"host:port"``). Only metadata is fetched.
        ``token``: the cluster's token, if it was created with one (default: ``DISTSPATIAL_TOKEN``); without it
        the client may query, while writes and :meth:`shutdown` raise
        :class:`~distspatial.core.errors.AccessDeniedError`.

        Raises :class:`~distspatial.core.errors.ClusterNotFoundError` (listing the running clusters) when no
        cluster of that name runs.

        >>> cluster = DistributedSpatialCluster.attach("cities")  # doctest: +SKIP
        """
        try:
            started = join(address)
        except ConnectionError:
            raise ClusterNotFoundError(f"no cluster named {name!r}: no Ray runtime runs at "
                                       f"{address or 'this machine (address auto)'}") from None
        try:
            token = check_token(token, "attach: token") if token is not None else env_token()
            controller = _find_controller(name)
            if controller is None:
                running = _running_clusters()
                raise ClusterNotFoundError(
                    f"no cluster named {name!r} is running; running clusters: {', '.join(running) or 'none'}")
            try:
                view = ray.get(controller.view.remote(), timeout=120)
            except ray.exceptions.RayActorError:
                raise ClusterNotFoundError(f"cluster {name!r} was just shut down") from None
        except BaseException:
            disconnect(started)
            raise
        return cls._from_controller(controller, token, view, started)

    @classmethod
    def _from_controller(cls, controller: Any, token: str | None, view: Any = None,
                         started_ray: bool = False) -> DistributedSpatialCluster:
        """A client of the cluster of ``controller`` (its ``view`` fetched unless given) in a process connected to
        its Ray cluster (``started_ray``: by this client, which then disconnects on close)."""
        if view is None:
            view = ray.get(controller.view.remote(), timeout=120)
        self = cls.__new__(cls)
        self._started_ray = started_ray
        self._closed = False
        self.latency = LatencyRecorder()
        self.progress = True
        self._rt = ClusterRuntime(controller, view)
        self._rt.token = token
        self._one_hop = OneHop(self._rt)
        self.config = view.config
        return self

    def host_on_nodes(self, name: str, fn: Callable[..., Any], *args: Any) -> list[int]:
        """Run ``fn(client, *args)`` in every live node's process, as that node's service ``name``, where it is
        not running yet (a restarted or added node gets it when this is called again); returns the nodes that
        run it now. ``client`` is a client of this cluster inside the node's process whose small queries (the
        one-hop path) are answered by that node without a Ray call when it holds their home partitions. This is
        how ``distspatial serve --on-nodes`` runs the HTTP service in every node; ``fn`` must be importable
        there (a module-level function of an installed package).

        >>> cluster.host_on_nodes("http", my_package.serve_here, 8000)  # doctest: +SKIP
        [0, 1]
        """
        self._require_open()
        self._rt.refresh()
        rt = self._rt
        refs = {n: rt.actor(n).host.remote(name, _run_hosted, rt.controller, rt.token, fn, *args)
                for n in rt.live_node_ids}
        hosting = []
        for n, ref in refs.items():
            try:
                ray.get(ref, timeout=60)
                hosting.append(n)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                continue  # a node going away: the next call hosts it on its replacement
        return hosting

    @staticmethod
    def list_clusters(address: str | None = None) -> list[dict[str, Any]]:
        """The named clusters running on the Ray cluster at ``address`` (as in :meth:`attach`): a dict each
        with ``name``, ``points``, ``partitions``, ``dim``, ``nodes``, ``version``, ``restarts``. Empty when
        no Ray runtime runs there.

        >>> [c["name"] for c in DistributedSpatialCluster.list_clusters()]  # doctest: +SKIP
        ['cities']
        """
        try:
            started = join(address)
        except ConnectionError:
            return []
        try:
            out = []
            for name in _running_clusters():
                ctl = _find_controller(name)
                try:
                    info = ray.get(ctl.info.remote(), timeout=30) if ctl is not None else None
                except Exception:
                    info = None
                out.append(info or {"name": name, "status": "not answering (restarting?)"})
            return out
        finally:
            disconnect(started)

    # -- life cycle -----------------------------------------------------------------------------------------
    @property
    def name(self) -> str | None:
        """The cluster's name (``None``: unnamed, lives with this client)."""
        return self._rt.name

    @property
    def comm(self) -> Any:
        """This client's own message counters (:class:`~distspatial.core.stats.CommunicationCounters`)."""
        return self._rt.comm

    @property
    def runtime(self) -> ClusterRuntime:
        """The runtime interface this client uses (for algorithm and live-update code; see
        :mod:`distspatial.client.runtime`)."""
        return self._rt

    def close(self) -> None:
        """Disconnect this client. A named cluster keeps running (others may attach); an unnamed one lives
        only with its client and is torn down (as :meth:`shutdown`). Idempotent."""
        if self._closed:
            return
        if self._rt.name is None:
            self.shutdown()
            return
        self._closed = True
        self._one_hop.close()
        self._rt.closed = (f"this client is closed; the cluster {self.name!r} still runs: attach again with "
                           f"DistributedSpatialCluster.attach({self.name!r})")
        disconnect(self._started_ray)

    def shutdown(self) -> None:
        """Tear the cluster down: its nodes, its controller and its stored state (a named cluster too, for
        every client attached to it), and the Ray runtime if this client started it. Idempotent.

        A cluster created with a token is torn down only by a client holding it: others get
        :class:`~distspatial.core.errors.AccessDeniedError`, and the cluster and this client stay as they were."""
        if self._closed:
            return
        rt = getattr(self, "_rt", None)
        if rt is not None:
            one_hop = getattr(self, "_one_hop", None)
            if one_hop is not None:
                one_hop.close()
            try:
                rt.call_controller("shutdown", timeout_s=60)
            except AccessDeniedError:
                raise  # nothing was stopped
            except (ClusterGoneError, Exception) as exc:  # already gone: nothing left to stop
                log.debug("distspatial: shutdown: %s", exc)
        self._closed = True
        if rt is not None:
            try:
                ray.kill(rt.controller, no_restart=True)
            except Exception:
                pass
            if rt.name is not None:
                state_store.delete_cluster(rt.name)
            rt.closed = "this cluster has been shut down; create a new DistributedSpatialCluster"
        disconnect(self._started_ray)

    def __enter__(self) -> DistributedSpatialCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if not self._closed and self._started_ray and self._rt.name is None:
                self.shutdown()
        except Exception:
            pass

    def __repr__(self) -> str:
        m = self._rt.meta
        pts = m.n_points if m else 0
        parts = m.n_partitions if m else 0
        state = "closed" if self._closed else "running"
        named = f"name={self.name!r}, " if self.name else ""
        return (
            f"DistributedSpatialCluster({named}nodes={len(self.node_ids)}, points={pts}, partitions={parts}, "
            f"curve={self.config.curve!r}, replication={self.config.replication_factor}, {state})"
        )

    def _repr_html_(self) -> str:
        """Notebook view: the configuration and, per node, its partitions and points (from the metadata; no
        call to the nodes)."""
        from html import escape

        m = self._rt.meta
        failed = self._rt.failed_nodes
        rows = []
        for n in self.node_ids:
            parts = m.partitions_of(n) if m else []
            pts = sum(m.partitions[p].size for p in parts) if m else 0
            status = "failed" if n in failed else ("closed" if self._closed else "alive")
            rows.append(f"<tr><td>{n}</td><td>{status}</td><td>{len(parts)}</td><td>{pts:,}</td></tr>")
        head = escape(repr(self))
        return (f"<div><b>{head}</b><table><thead><tr><th>node</th><th>status</th><th>partitions</th>"
                f"<th>points</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>")

    def set_low_latency(self, enabled: bool = True) -> None:
        """Send this client's small queries (one-hop: up to 64 queries whose home partitions one node holds)
        through Ray compiled graphs instead of actor calls: a single-point kNN takes ~0.45 ms instead of ~1.4 ms
        at p50 (2 cores, 4M points). **Cost**: each node this client has sent such a query to keeps a loop
        polling the channel, a whole core per node, idle or not, until ``set_low_latency(False)``, the client
        closes or the node set changes. For machines with a core per node to spare; batches, writes and other
        clients are unaffected (actor calls as before). A channel that fails is closed and that query goes as an
        actor call; a node serves one such client at a time (a second one gets actor calls).

        >>> cluster.set_low_latency(True)  # doctest: +SKIP
        >>> dist, ids = cluster.distributed_knn_search([0.5, 0.5], k=10)  # doctest: +SKIP
        """
        self._one_hop.set_low_latency(enabled)

    @property
    def metadata(self) -> GlobalIndexMetadata:
        """The current metadata snapshot (raises :class:`NotDistributedError` before ``distribute_data``)."""
        self._require_open()
        self._rt.sync()
        return self._rt.require_data()

    @property
    def n_points(self) -> int:
        m = self._rt.meta
        return m.n_points if m else 0

    @property
    def crs(self) -> str | None:
        """The data set's coordinate reference system (``"EPSG:4326"``, ...; before any data: the configured one;
        ``None``: none). It travels with the data (metadata, checkpoints, clients that attach)."""
        m = self._rt.meta
        return m.crs if m is not None else self.config.crs

    @property
    def geographic(self) -> bool:
        """Whether the data set is longitude/latitude (a geographic CRS): points in and out in degrees, every
        distance in metres (great circle on the mean Earth radius; see the guide's "Geographic data")."""
        m = self._rt.meta
        return m.geographic if m is not None else bool(self.config.crs and _resolve(self.config.crs).geographic)

    @property
    def dim(self) -> int | None:
        """Coordinates per point as given and returned: 2 (longitude, latitude) for geographic data, else the
        data's dimension; ``None`` before any data."""
        m = self._rt.meta
        return m.user_dim if m is not None else None

    @property
    def node_ids(self) -> list[int]:
        """Ids of every node started, failed ones included (see :meth:`statistics` for their status)."""
        return sorted(self._rt.actors)

    @property
    def live_node_ids(self) -> list[int]:
        """Ids of the nodes not marked failed."""
        return self._rt.live_node_ids

    @property
    def failed_node_ids(self) -> list[int]:
        """Ids of the nodes this client or the controller found failed (the controller's own view, with its
        recovery actions: :meth:`health`)."""
        return sorted(self._rt.failed_nodes)

    @property
    def node_info(self) -> dict[int, dict[str, Any]]:
        """Where each node runs: ``{node: {"ray_node_id", "host", "ip", "pid", ...}}`` (as of the cached view)."""
        return {n: dict(i) for n, i in self._rt.view.node_info.items()}

    def _require_open(self) -> None:
        if self._rt.closed:
            raise RuntimeError(self._rt.closed)

    # -- the controller's settings --------------------------------------------------------------------------
    @property
    def balance_threshold(self) -> float:
        """Max/mean load that triggers an automatic rebalance (kept by the controller)."""
        return self._rt.call_controller("options", timeout_s=120)["balance_threshold"]

    @balance_threshold.setter
    def balance_threshold(self, value: float) -> None:
        self._rt.call_controller("set_options", balance_threshold=float(value))

    @property
    def node_capacity(self) -> dict[int, float]:
        """Capacity weights for ``ProportionalLoad`` (default 1.0 per node; kept by the controller). Assign a
        new dict to change them."""
        return self._rt.call_controller("options", timeout_s=120)["node_capacity"]

    @node_capacity.setter
    def node_capacity(self, value: dict[int, float]) -> None:
        self._rt.call_controller("set_options", node_capacity=dict(value))

    @property
    def tuning_policy(self) -> TuningPolicy:
        """When :meth:`rebalance` splits partitions or adds read replicas (kept by the controller)."""
        return self._rt.call_controller("options", timeout_s=120)["tuning_policy"]

    @tuning_policy.setter
    def tuning_policy(self, value: TuningPolicy) -> None:
        self._rt.call_controller("set_options", tuning_policy=value)

    # -- distribute -----------------------------------------------------------------------------------------
    def distribute_data(self, points: Any, ids: Any = None, crs: Any = None) -> GlobalIndexMetadata:
        """Partition ``points`` along the space-filling curve and load the partitions onto the nodes.

        Args:
            points: ``(n, d)`` numeric array, finite; or a GeoPandas ``GeoDataFrame`` / ``GeoSeries`` of points
                (its geometry's coordinates in row order; its CRS is the data set's unless ``crs`` is given; the
                index is not used as ids: pass ``ids=gdf.index`` for that).
            ids: optional unique integer id per point; default: the row number. Every result speaks in these ids.
            crs: the data's coordinate reference system (default: ``NodeConfig.crs``). A geographic one
                (``"EPSG:4326"``, ``"OGC:CRS84"``) makes ``points`` ``(n, 2)`` longitude/latitude in degrees and
                every distance great-circle metres (stored as 3-D unit vectors; see the guide's "Geographic
                data"); a projected one is carried with the data.

        Returns the new :class:`GlobalIndexMetadata`. Replaces any previously distributed data set. Input is
        validated before anything changes, so a bad call leaves the cluster as it was.
        """
        self._require_open()
        if is_geopandas(points):  # a GeoDataFrame / GeoSeries of points: its coordinates, and its CRS unless given
            points, geo_crs = points_from_geopandas(points)
            crs = crs if crs is not None else geo_crs
        info = _resolve(crs if crs is not None else self.config.crs)
        pts = check_points(to_unit(points, "points") if info is not None and info.geographic else points)
        n, d = pts.shape
        id_arr = check_ids(ids, n) if ids is not None else None
        cfg = self.config
        with Timer() as t:
            plan = partition_points(pts, cfg.partition_count, id_arr, cfg.curve)
            layout = {"dim": d, "lo": plan.lo, "hi": plan.hi, "curve": cfg.curve, "bits": plan.bits,
                      "key_lo": plan.key_lo, "key_hi": plan.key_hi, "box_lo": plan.box_lo, "box_hi": plan.box_hi,
                      "counts": np.diff(plan.cuts), "next_id": n if id_arr is None else int(id_arr.max()) + 1,
                      "crs": None if info is None else info.name, "geographic": info is not None and info.geographic}
            id_map = None
            if id_arr is not None:
                rows = np.argsort(id_arr, kind="stable")
                id_map = (id_arr[rows], rows)
            mean_variance = float(np.mean([pts[:, j].var() for j in range(d)]))
            # through Ray's object store, in bounded waves when large; each owner node copies its partitions
            view = upload_partitions(self._rt, plan, layout, id_map, mean_variance, compression=cfg.compression,
                                     progress=self.progress)
            self._rt.install(view)
            n_parts = plan.n_partitions
            del plan
        release_free_memory()  # the cut's sorted copies
        log.info("distributed %d points in %d partitions in %.2f s", n, n_parts, t.seconds)
        return view.meta

    def distribute_chunks(
        self, source: Any, columns: Any = None, id_column: str | None = None, chunk_rows: int = 1 << 20,
        sample_size: int = 200_000, crs: Any = None,
    ) -> GlobalIndexMetadata:
        """Distribute a data set too large for the driver's memory, chunk by chunk.

        ``source``: a point file (``.npy``, CSV, Parquet, LAS; ``columns`` and ``id_column`` as in
        :func:`distspatial.io.open_points`) or a callable returning a fresh iterator of ``(n, d)`` chunks (or
        ``(points, ids)`` pairs): it is read twice, once for the bounds and a key sample that cut the
        partitions, once to ingest. Ids are the source's row numbers unless ``id_column`` / ids are given.
        ``crs`` as in :meth:`distribute_data` (geographic: the chunks are longitude/latitude); a GeoParquet file's
        own CRS when not given.

        >>> cluster.distribute_chunks("lidar.laz", chunk_rows=2_000_000)  # doctest: +SKIP
        """
        self._require_open()
        return _ingest.distribute_chunks(self._rt, source, columns, id_column, chunk_rows, sample_size,
                                         progress=self.progress,
                                         crs=_resolve(crs if crs is not None else self._file_crs(source, columns)))

    def distribute_files(
        self, source: Any, columns: Any = None, id_column: str | None = None, *, sample_size: int = 200_000,
        crs: Any = None,
    ) -> GlobalIndexMetadata:
        """Load point files with the nodes reading them in parallel; nothing passes through this process.

        ``source``: a file, a directory (every point file under it: ``.parquet``, ``.csv``/``.tsv`` (also
        compressed), ``.npy``, ``.las``/``.laz``), a glob (``"data/*.parquet"``), a list of these, or a URI
        pyarrow's filesystems open (``s3://``, ``gs://``, ``hdfs://``, ``file://``). The files are cut into shares
        (Parquet row groups, ``.npy`` row ranges, CSV and LAS files), each node reads its own and the points go
        node to node to their partitions (:mod:`distspatial.control.loading`). On several machines every machine
        must reach the files (a shared or mounted filesystem, or object storage); a node that cannot open one
        says which file and which host.

        ``columns`` / ``id_column`` as in :func:`distspatial.io.open_points` (the same in every file). Ids are the
        rows of the input (files in sorted order for a directory or glob, in the given order for a list; rows in
        file order), exactly as ``distribute_data`` of the concatenated input would number them; with
        ``id_column`` they are that column's values, which must be unique (checked by the nodes), and algorithm
        labels then follow :meth:`point_ids` (ascending ids). ``sample_size``: points of the uniform sample whose
        curve-key quantiles cut the partitions. ``crs`` as in :meth:`distribute_data` (geographic: the columns are
        longitude, latitude, converted by the nodes as they read; a bad coordinate names file and row). A GeoParquet
        source's points (``x, y[, z]`` of its geometry column) come with the CRS of its ``geo`` metadata, used when
        ``crs`` is not given (GeoParquet's default when the file names none: OGC:CRS84, lon/lat).

        Replaces the data set. A bad file (missing, a corrupt row or a non-numeric value: the error names file,
        row and column; mixed dimensions), duplicate ids or a node dying while the files are read: an error, and
        the previous data set is left as it was. A failure while the nodes build the partitions leaves no data
        set (as ``distribute_data``). Never a half-loaded one.

        >>> meta = cluster.distribute_files("s3://bucket/points/", columns="x,y")   # doctest: +SKIP
        >>> meta = cluster.distribute_files(["a.parquet", "b.csv"], id_column="id")  # doctest: +SKIP
        """
        self._require_open()
        from .io.common import redact_uri
        from .io.shares import is_uri

        def resolve(p: Any) -> str:  # the controller and the nodes may run elsewhere: absolute local paths
            s = os.fspath(p)
            return s if is_uri(s) else os.path.abspath(os.path.expanduser(s))

        if isinstance(source, (str, os.PathLike)):
            src: Any = resolve(source)
        elif isinstance(source, (list, tuple)):
            src = [resolve(p) for p in source]
        else:
            raise TypeError(f"source must be a path, a glob, a URI or a list of them, got {type(source).__name__}")
        if isinstance(sample_size, bool) or not isinstance(sample_size, (int, np.integer)) or sample_size < 1:
            raise ValueError(f"sample_size must be a positive int, got {sample_size!r}")
        seed = self.config.seed if self.config.seed is not None else 0
        info = _resolve(crs if crs is not None else self._file_crs(src, columns))
        with Timer() as t:
            view = self._rt.call_controller("distribute_files", src, columns, id_column, int(sample_size), seed,
                                            self._rt.new_token(), None if info is None else info.name,
                                            info is not None and info.geographic)
            self._rt.install(view)
        log.info("loaded %d points from %s in %.2f s", view.meta.n_points, redact_uri(str(source)), t.seconds)
        return view.meta

    def _file_crs(self, source: Any, columns: Any) -> Any:
        """The CRS of a GeoParquet source's geometry column (its ``geo`` metadata), else ``NodeConfig.crs``."""
        if callable(source):
            return self.config.crs
        from .io.shares import source_crs

        found = source_crs(source, columns)
        return found if found is not None else self.config.crs

    def sample_points(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, points)`` of a uniform random sample of at most ``n`` points, drawn on the nodes (each
        partition in proportion to its size); for plots and previews of data sets too large to fetch."""
        self._rt.sync()
        meta = self._rt.require_data()
        # draw a little more on the nodes (Bernoulli), then exactly min(n, points) here
        frac = 1.0 if n >= meta.n_points else min(1.0, 1.1 * n / max(1, meta.n_points) + 64 / max(1, meta.n_points))
        ids, pts = [], []
        for _, parts in self._rt.partitions_call("sample_fraction", float(frac), int(seed)):
            for i, p in parts:
                ids.append(i)
                pts.append(p)
        if not ids:
            return np.empty(0, np.int64), np.empty((0, meta.user_dim))
        ids, pts = np.concatenate(ids), np.concatenate(pts)
        if len(ids) > n:
            keep = np.sort(np.random.default_rng(seed).choice(len(ids), n, replace=False))
            ids, pts = ids[keep], np.take(pts, keep, axis=0)
        return ids, (unit_to_lonlat(pts) if meta.geographic else pts)

    def plot_partitions(self, **kwargs: Any) -> Any:
        """Draw the partitions, their nodes and the curve order (see :func:`distspatial.ui.plots.plot_partitions`;
        needs ``distspatial[plots]``)."""
        from .ui.plots import plot_partitions

        return plot_partitions(self, **kwargs)

    def point_ids(self) -> np.ndarray:
        """Ids of the points in the order algorithm labels use: the rows given to ``distribute_data`` (their
        ids), or after :meth:`ingest` / :meth:`delete` / :meth:`update` all live ids in ascending order."""
        self._rt.sync()
        return self._rt.point_ids()

    # -- live updates ---------------------------------------------------------------------------------------
    def ingest(self, points: Any, ids: Any = None, timestamps: Any = None) -> np.ndarray:
        """Append points to the running index; returns their ids (new automatic ids when ``ids`` is None).

        Each point goes to the partition owning its curve-key range (points outside the original bounds are
        accepted); the call returns once every replica holds the batch, and every query started afterwards
        sees it, exactly. ``ids`` must be new (use :meth:`update` to move existing points); a data set
        distributed with user ids needs them. See :mod:`distspatial.live.ingest`.

        >>> new_ids = cluster.ingest(np.random.random((1000, 2)))  # doctest: +SKIP
        """
        self._require_open()
        if np.asarray(points).size == 0:
            return np.empty(0, dtype=np.int64)
        return _ingest.ingest(self._rt, points, ids, timestamps)[0]

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
        self._require_open()
        return _ingest.delete(self._rt, ids)

    def update(self, ids: Any, points: Any, timestamps: Any = None) -> int:
        """Move existing points to new positions (delete + ingest under one lock); returns how many existed."""
        self._require_open()
        return _ingest.update(self._rt, ids, points, timestamps)[0]

    # -- queries --------------------------------------------------------------------------------------------
    def distributed_knn_search(
        self, query: Any, k: int, allow_partial: bool = False, *, output: str | os.PathLike | None = None,
        columns: Any = None,
    ) -> tuple | str:
        """Exact k nearest neighbours of one point or a batch.

        Args:
            query: a point ``(d,)`` or a batch ``(m, d)``; with ``output``, also a query file, a directory, a glob
                or a list of files (``columns`` picks the coordinates).
            k: neighbours per query, ``1 <= k <= n_points``.
            output: write the answers instead of returning them (the path is returned), as :meth:`knn_join`
                does (this is that call): a ``.parquet``/``.csv`` file, written here chunk by chunk, or, for query
                files, a directory (``"out/"``) into which the *nodes* write ``part-<node>-<n>.parquet`` files
                from their shares of the query files. Rows ``query`` (row in input order), ``rank`` (1 =
                nearest), ``id``, ``distance``. Not with ``allow_partial``.

        Returns ``(distances, ids)``: shape ``(k,)`` each for one point, ``(m, k)`` for a batch, sorted by
        distance (Euclidean; for geographic data great-circle metres, queries longitude/latitude), ids as given to
        ``distribute_data``.

        When every replica of some partitions is lost (and no checkpoint has them), the call raises
        :class:`PartitionLostError`; with ``allow_partial=True`` it answers from the partitions still there and
        returns ``((distances, ids), QueryStatus)``, whose ``partial`` and ``missing_partitions`` say so
        (slots beyond the points found hold ``inf`` / ``-1``).

        >>> dist, ids = cluster.distributed_knn_search(np.array([0.5, 0.5]), 10)  # doctest: +SKIP
        >>> cluster.distributed_knn_search("queries/", 10, columns="x,y", output="knn/")  # doctest: +SKIP
        """
        self._require_open()
        if output is not None:
            if allow_partial:
                raise ValueError("allow_partial=True returns a partial answer with its status: it does not apply "
                                 "with output=")
            if not _join._is_file_source(query):
                query = check_queries(query, self._rt.require_data().user_dim)[0]
            return self.knn_join(query, k, output=os.fspath(output), columns=columns)
        meta = self._rt.require_data()
        q, single = _queries_in(meta, query)
        k = check_k(k, meta.n_points)
        missing: list[int] | None = [] if allow_partial else None
        with Timer() as t:
            dist, ids = self._rt.stable(lambda: _queries.knn(self._rt, q, k, missing, self._one_hop), missing)
        if meta.geographic:
            dist = chord_to_metres(dist)
        self.latency.record(t.seconds, len(q))
        out = (dist[0], ids[0]) if single else (dist, ids)
        return (out, QueryStatus.of(missing)) if allow_partial else out

    def range_search(
        self, center: Any, radius: Any, return_points: bool = False, allow_partial: bool = False, *,
        output: str | os.PathLike | None = None, columns: Any = None, chunk_rows: int = 250_000,
    ) -> np.ndarray | list[np.ndarray] | tuple | str:
        """Ids of all points within ``radius`` of ``center`` (inclusive), sorted by id.

        One centre ``(d,)`` gives an array; a batch ``(m, d)`` (radius scalar or ``(m,)``) gives a list of arrays.
        With ``return_points=True`` each result is ``(ids, points)``. ``allow_partial`` as in
        :meth:`distributed_knn_search`. Geographic data: centres longitude/latitude, ``radius`` in metres
        (great circle, inclusive), points returned as longitude/latitude.

        With ``output`` the answers are written, not returned (the path is returned), as a long table: ``query``
        (the centre's row in input order), ``id``, ``distance``, one row per point found, sorted by query then id
        (within each part file for a directory):

        * ``center`` a query file, a directory, a glob or a list of files (``columns`` picks the coordinates) and
          ``output`` a directory (``"out/"``): the *nodes* read shares of the query files and each writes its
          own ``part-<node>-<n>.parquet`` files there (one Parquet dataset; nothing passes through this process;
          on several machines every machine must reach the files and ``output``). ``radius`` is a number or the
          name of a column of the query files holding each query's radius (``columns`` then names the
          coordinates; by default every other column). A node dying meanwhile: its part files are removed and its
          shares answered again by the others. A directory already holding part files is refused.
        * ``center`` an array and ``output`` a ``.parquet``/``.csv`` file: answered here ``chunk_rows`` centres at
          a time and written chunk by chunk.

        Not with ``return_points`` or ``allow_partial``.

        >>> ids = cluster.range_search(np.array([0.5, 0.5]), 0.01)  # doctest: +SKIP
        >>> cluster.range_search("queries/*.parquet", 0.01, columns="x,y", output="hits/")  # doctest: +SKIP
        >>> cluster.range_search("queries/", "r", columns="x,y", output="hits/")  # per-query radius column r
        ...                                                                       # doctest: +SKIP
        """
        self._require_open()
        if output is not None:
            return self._range_to_output(center, radius, return_points, allow_partial, os.fspath(output), columns,
                                         chunk_rows)
        meta = self._rt.require_data()
        missing: list[int] | None = [] if allow_partial else None
        c, single = _queries_in(meta, center, "center")
        r = check_radius(radius, len(c))
        geo = meta.geographic
        rq = metres_to_chord(r) if geo else r  # a chord a few ulps longer: filtered by metres below
        with Timer() as t:
            out = self._rt.stable(lambda: _queries.ball(self._rt, c, rq, return_points or geo, missing,
                                                        self._one_hop), missing)
            if geo:
                out = _geo_ball_filter(out, c, r, return_points)
        self.latency.record(t.seconds, len(c))
        out = out[0] if single else out
        return (out, QueryStatus.of(missing)) if allow_partial else out

    def _range_to_output(self, center: Any, radius: Any, return_points: bool, allow_partial: bool, output: str,
                         columns: Any, chunk_rows: int) -> str:
        if return_points or allow_partial:
            raise ValueError("return_points and allow_partial do not apply with output=: the output holds query, id "
                             "and distance")
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
        meta = self._algorithm_start()
        if _join._is_file_source(center):
            if not _join._is_directory_target(output):
                raise ValueError(f"range_search of query files writes a directory of part files (the nodes write "
                                 f"them): pass output='{os.path.splitext(output)[0]}/' (got {output!r})")
            if not isinstance(radius, str) and np.ndim(radius) != 0:
                raise ValueError("with query files, radius is a number or the name of a column of the files holding "
                                 f"each query's radius, got an array of shape {np.shape(radius)}")
            return _join.range_to_directory(self._rt, center, radius, output, columns, chunk_rows)
        if _join._is_directory_target(output):
            raise ValueError("a directory output is written by the nodes from query files: pass the queries as a "
                             "file, directory or glob, or give output='x.parquet' for an array of centres")
        c, _ = _queries_in(meta, center, "center")
        r = check_radius(radius, len(c))
        return _join.range_to_file(self._rt, c, r, output, int(chunk_rows), meta.geographic)

    def box_search(
        self, lo: Any, hi: Any, return_points: bool = False, allow_partial: bool = False
    ) -> np.ndarray | list[np.ndarray] | tuple:
        """Ids of all points with ``lo <= p <= hi`` in every dimension, sorted by id.

        One box (``lo``, ``hi`` of shape ``(d,)``) gives an array; a batch ``(m, d)`` gives a list of arrays.

        Geographic data: ``lo = (lon_lo, lat_lo)``, ``hi = (lon_hi, lat_hi)`` in degrees, edges inclusive;
        ``lon_lo > lon_hi`` is a box across the antimeridian (``(170, -10)`` to ``(-170, 10)``: 20 degrees wide);
        longitudes outside [-180, 180] are wrapped, a box 360 degrees wide or more holds every longitude; points
        are returned as longitude/latitude.
        """
        self._require_open()
        meta = self._rt.require_data()
        missing: list[int] | None = [] if allow_partial else None
        if meta.geographic:
            return self._geo_box_search(lo, hi, return_points, missing)
        lo_a, single = check_queries(lo, meta.dim, "lo")
        hi_a, _ = check_queries(hi, meta.dim, "hi")
        if lo_a.shape != hi_a.shape:
            raise ValueError(f"lo and hi must have the same shape, got {np.shape(lo)} and {np.shape(hi)}")
        bad = np.flatnonzero((lo_a > hi_a).any(axis=1))
        if len(bad):
            raise ValueError(f"box {int(bad[0])} has lo > hi in some dimension; each box needs lo <= hi")
        with Timer() as t:
            out = self._rt.stable(lambda: _queries.box(self._rt, lo_a, hi_a, return_points, missing,
                                                       self._one_hop), missing)
        self.latency.record(t.seconds, len(lo_a))
        out = out[0] if single else out
        return (out, QueryStatus.of(missing)) if allow_partial else out

    def _geo_box_search(self, lo: Any, hi: Any, return_points: bool, missing: list[int] | None) -> Any:
        """Box search of longitude/latitude boxes: pruned by a 3-D box around each box's unit vectors, then
        tested exactly on the candidates' longitude/latitude (antimeridian-crossing boxes, lon 180 == -180)."""
        lo_a, single = _lonlat_corners(lo, "lo")
        hi_a, _ = _lonlat_corners(hi, "hi")
        if lo_a.shape != hi_a.shape:
            raise ValueError(f"lo and hi must have the same shape, got {np.shape(lo)} and {np.shape(hi)}")
        bad = np.flatnonzero(lo_a[:, 1] > hi_a[:, 1])
        if len(bad):
            raise ValueError(f"box {int(bad[0])} has latitude lo {lo_a[bad[0], 1]} > hi {hi_a[bad[0], 1]}; each box "
                             f"needs lat_lo <= lat_hi (lon_lo > lon_hi is allowed: a box across the antimeridian)")
        raw_lo = np.asarray(lo, dtype=np.float64).reshape(-1, 2)[:, 0]
        raw_hi = np.asarray(hi, dtype=np.float64).reshape(-1, 2)[:, 0]
        full = raw_hi - raw_lo >= 360.0  # every longitude (the wrap would make it a sliver)
        lo_a[full, 0], hi_a[full, 0] = -180.0, 180.0
        m = len(lo_a)
        b3 = [lonlat_box_to_unit_bounds(lo_a[i], hi_a[i]) for i in range(m)]  # per box, not per point
        lo3 = np.array([b[0] for b in b3]).reshape(m, 3)
        hi3 = np.array([b[1] for b in b3]).reshape(m, 3)
        with Timer() as t:
            out = self._rt.stable(lambda: _queries.box(self._rt, lo3, hi3, True, missing, self._one_hop), missing)
            out = _geo_box_filter(out, lo_a, hi_a, return_points)
        self.latency.record(t.seconds, m)
        out = out[0] if single else out
        return (out, QueryStatus.of(missing)) if missing is not None else out

    # -- polygon queries ------------------------------------------------------------------------------------
    def polygon_search(self, polygon: Any, predicate: str = "within", return_points: bool = False) -> Any:
        """Ids (sorted) of the points in ``polygon``: a shapely Polygon / MultiPolygon (holes allowed), WKT, WKB or
        a GeoJSON mapping. ``predicate``: ``"within"`` (interior: a point on an edge or vertex is not in it) or
        ``"intersects"`` (interior or boundary), as ``geopandas.sjoin``. With ``return_points``: ``(ids,
        points)``. For geographic data the polygon is in lon/lat degrees, edges straight in lon/lat (as in
        GeoPandas). Needs ``distspatial[geo]`` (shapely). See :mod:`distspatial.algorithms.polygons`.

        >>> ids = cluster.polygon_search("POLYGON ((0 0, 4 0, 4 4, 0 4, 0 0))")  # doctest: +SKIP
        """
        self._require_open()
        self._rt.sync()
        return _polygons.polygon_search(self._rt, polygon, predicate, self._polygons_geographic(), return_points,
                                        crs=getattr(self, "crs", None))

    def points_in_polygons(self, polygons: Any, predicate: str = "within", aggregate: str | None = None,
                           return_points: bool = False) -> Any:
        """For every point the polygon rows it falls in (a point-in-polygon join, as ``geopandas.sjoin(points,
        polygons, predicate=predicate)``), or with ``aggregate="count"`` the number of points per polygon.

        Args:
            polygons: a GeoDataFrame / GeoSeries, a GeoParquet file (``.parquet``/``.geoparquet``), a list of
                shapely geometries, WKT, WKB or GeoJSON mappings, or a GeoJSON FeatureCollection; Polygons and
                MultiPolygons (holes allowed). A polygon's index is its 0-based row.
            predicate: ``"within"`` (interior; points on an edge or vertex excluded) or ``"intersects"``
                (boundary included).
            aggregate: ``None`` or ``"count"``.
            return_points: also return the matched points' coordinates (lon/lat for geographic data).

        A GeoDataFrame / GeoSeries in another CRS than the data set's is refused (reproject it: ``to_crs``).

        Returns a :class:`~distspatial.algorithms.polygons.PolygonJoin` (``id``, ``polygon``: int64 arrays, one
        row per (point, polygon) pair, sorted by id then polygon; unpacks as ``ids, polygon_rows = ...``;
        ``.table()`` for :func:`distspatial.io.write_results`), ``(PolygonJoin, points)`` with ``return_points``,
        or with ``aggregate="count"`` an int64 array of one count per polygon. For geographic data polygons are
        lon/lat with edges straight in lon/lat (as in GeoPandas). Needs ``distspatial[geo]`` (shapely).

        >>> ids, rows = cluster.points_in_polygons(districts_gdf)                     # doctest: +SKIP
        >>> counts = cluster.points_in_polygons("districts.parquet", aggregate="count")  # doctest: +SKIP
        """
        self._require_open()
        self._rt.sync()
        return _polygons.points_in_polygons(self._rt, polygons, predicate, aggregate, self._polygons_geographic(),
                                            return_points, crs=getattr(self, "crs", None))

    def _polygons_geographic(self) -> bool:
        """Whether polygon queries test lon/lat (a geographic data set stores unit vectors)."""
        return bool(getattr(self, "geographic", False))

    # -- algorithms -----------------------------------------------------------------------------------------
    def _algorithm_start(self) -> GlobalIndexMetadata:
        """Algorithms start on the newest view (they read every partition, so a change made by another client
        must be there)."""
        self._require_open()
        self._rt.sync()
        return self._rt.require_data()

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

        Geographic data: k-means on the sphere, run on the stored 3-D unit vectors (Lloyd's in 3-D, squared chord
        distances); the centroids returned are the cluster means projected onto the sphere (their mean
        direction) as ``(k, 2)`` longitude/latitude, ``init`` an array is longitude/latitude, and ``inertia``
        is the 3-D objective (sum of squared chords on the unit sphere, multiply by ``EARTH_RADIUS_M**2`` for m^2).
        """
        meta = self._algorithm_start()
        if meta.geographic and not isinstance(init, str):
            init = to_unit(init, "init")
        res = _kmeans.run_kmeans(
            self._rt, meta, k, max_iterations, tol, init, self.config.seed if seed is None else seed,
            oversampling_factor, init_rounds, self.progress,
        )
        if meta.geographic:
            c = np.asarray(res.centroids, dtype=np.float64)
            norm = np.linalg.norm(c, axis=1, keepdims=True)
            res.centroids = unit_to_lonlat(np.where(norm > 0, c / np.where(norm > 0, norm, 1.0), c))
        return res

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

        Geographic data: Ward on the stored 3-D unit vectors (heights in those units), ``n_clusters`` only.
        """
        meta = self._algorithm_start()
        if meta.geographic and distance_threshold is not None:
            raise ValueError("distance_threshold is a Ward height in the stored 3-D unit vectors for a geographic "
                             "data set, not metres: pass n_clusters instead")
        return _hierarchical.run_hierarchical(self._rt, n_clusters, distance_threshold, linkage, int(n_micro_clusters),
                                              (self.config.seed or 0) if seed is None else seed)

    def distributed_dbscan(self, eps: float, min_samples: int = 5) -> Any:
        """Exact DBSCAN: the same core points, noise and clusters as ``sklearn.cluster.DBSCAN(eps,
        min_samples)`` (border points may join either adjacent cluster, as in sklearn).

        Partitions are extended by halos of width ``eps`` that move node to node; local clusters are merged
        on the coordinator through shared core points. Returns a :class:`~distspatial.algorithms.dbscan.DBSCANResult`
        (``labels`` in the order of :meth:`point_ids`, ``-1`` for noise; ``core_sample_indices``).

        >>> res = cluster.distributed_dbscan(eps=0.01, min_samples=10)  # doctest: +SKIP
        >>> res.n_clusters, res.n_noise  # doctest: +SKIP

        Geographic data: ``eps`` in metres (great circle), as ``DBSCAN(eps=eps / EARTH_RADIUS_M,
        metric="haversine")`` on ``[lat, lon]`` radians.
        """
        meta = self._algorithm_start()
        if meta.geographic and isinstance(eps, (int, float, np.number)) and not isinstance(eps, bool) \
                and np.isfinite(eps) and eps > 0:
            eps = float(metres_to_chord(eps))
        return _dbscan.run_dbscan(self._rt, eps, min_samples)

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
        ``.csv``) the answers are written chunk by chunk as rows ``(query, rank, id, distance)`` (rank 1 = the
        nearest, as the command line's tables) and the path is returned. With ``other_points`` a file, directory, glob or list of files and ``output`` a directory
        (``"out/"``), the *nodes* read shares of the query files and each writes its own
        ``part-<node>-<n>.parquet`` files there (same columns; ``query`` = row in input order): nothing passes
        through this process; on several machines ``output`` must be storage every machine reaches. ``self_join=True`` (no ``other_points``): the all-kNN of the distributed set, each point
        excluding itself, rows in ``distribute_data`` order (``query`` = the point's id in a file). Geographic
        data: queries longitude/latitude (file columns too), distances metres.

        >>> dist, ids = cluster.knn_join(other, k=5)  # doctest: +SKIP
        >>> cluster.knn_join("big.parquet", k=5, columns="x,y", output="join.parquet")  # doctest: +SKIP
        >>> cluster.knn_join("queries/", k=5, columns="x,y", output="join/")  # doctest: +SKIP
        """
        self._algorithm_start()
        return _join.knn_join(self._rt, other_points, k, self_join, output, chunk_rows, columns)

    def distance_matrix(
        self, a: Any, b: Any = None, output: str | None = None, memory_budget: int = _join.DEFAULT_MEMORY_BUDGET,
        tile_rows: int = 4096,
    ) -> np.ndarray:
        """Euclidean distance matrix between the rows of ``a`` and ``b`` (``b=None``: ``a`` with itself), computed
        in ``tile_rows`` x ``tile_rows`` tiles on the nodes.

        Returned whole when ``rows(a) * rows(b) * 8`` bytes fit ``memory_budget`` (default 2 GiB); otherwise
        pass ``output="matrix.npy"`` and the tiles are written into that memory-mapped file as they arrive
        (returned as a ``numpy.memmap``). On a geographic cluster ``a`` and ``b`` are longitude/latitude and the
        distances great-circle metres. Neither possible: :class:`MemoryError` (or :class:`OSError` when the
        disk is too small) saying so, before any work starts.

        >>> D = cluster.distance_matrix(a, b)  # doctest: +SKIP
        """
        self._require_open()
        return _join.distance_matrix(self._rt, a, b, output, memory_budget, tile_rows)

    def query(self, query_type: Any, params: Any) -> Any:
        """Typed entry point: ``query(QueryType.KNearestNeighbors, QueryParameters(query_point=p, k=5))`` ->
        a :class:`~distspatial.typed_queries.QueryResults` (``NearestNeighbors``, ``RangeSearch``, ``Clustering`` or
        ``DistanceMatrix``). Runs the same code as the named method of each query type."""
        from .typed_queries import run_query

        return run_query(self, query_type, params)

    # -- fault tolerance, elastic scaling, balancing (carried out by the controller) -------------------------
    def _control(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Ask the controller to carry out ``method``, then take its newest view."""
        self._require_open()
        out = self._rt.call_controller(method, *args, **kwargs)
        self._rt.refresh()
        return out

    def health(self) -> dict[str, Any]:
        """Node health from the heartbeats, failed nodes, and the recovery plans carried out so far.

        >>> cluster.health()["nodes"][0]["status"]  # doctest: +SKIP
        'alive'
        """
        return self._control("health")

    def restore_redundancy(self) -> dict[int, int]:
        """Copy under-replicated partitions from a live replica onto other live nodes until each has
        ``replication_factor`` replicas (or as many as there are live nodes); dead owners leave the metadata.

        Returns ``{partition: new owner}`` for the copies made.
        """
        return self._control("restore_redundancy")

    def follow_ray_cluster(self) -> list[int]:
        """``auto_scale``: give every alive Ray node that hosts no live node of ours a new node, then rebalance.

        Ray nodes that leave are handled as failures (their partitions are re-replicated). Returns new node ids.
        """
        return self._control("follow_ray_cluster")

    def add_nodes(self, n: int = 1) -> list[int]:
        """Start ``n`` more nodes and move partitions onto them until replicas per node are even (within one).

        Queries keep running: each partition is copied before the metadata switches and dropped after.
        Returns the new node ids. Raises ``RuntimeError`` when the Ray cluster has no room for them.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        return self._control("add_nodes", n)

    def remove_node(self, node_id: int) -> None:
        """Drain ``node_id`` gracefully (its partitions first get replicas elsewhere), then stop it."""
        return self._control("remove_node", node_id)

    def check_health(self) -> Any:
        """Run one heartbeat round now (the controller also runs them every ``heartbeat_interval_ms`` when
        fault tolerance, load balancing or auto scaling is on, and always for a named cluster) and carry out the
        :class:`~distspatial.control.fault.RecoveryPlan` it produces; returns that plan (falsy when all is well).

        >>> plan = cluster.check_health()  # doctest: +SKIP
        """
        return self._control("check_health")

    def move_partition(self, partition_id: int, source: int, target: int) -> None:
        """Move one replica of ``partition_id`` from node ``source`` to node ``target`` online: copied node to
        node, the metadata switched, then the source copy dropped; queries stay exact throughout.

        >>> cluster.move_partition(3, source=0, target=2)  # doctest: +SKIP
        """
        meta = self._rt.require_data()
        if not 0 <= partition_id < meta.n_partitions:
            raise ValueError(f"partition_id must be in [0, {meta.n_partitions}), got {partition_id}")
        if source not in meta.partitions[partition_id].owners:
            raise ValueError(f"node {source} holds no replica of partition {partition_id} "
                             f"(owners: {list(meta.partitions[partition_id].owners)})")
        return self._control("move_partition", partition_id, source, target)

    def load_metrics(self) -> dict[int, LoadMetrics]:
        """Measured load of every live node (rates since the previous call)."""
        return self._control("load_metrics")

    def split_partition(self, partition_id: int) -> int:
        """Split a partition at its curve-key median into two (same owners); returns the new partition's id.

        All replicas split in place, then the metadata switches to a version with both halves. Use it for a
        partition that grew too large or too hot; :meth:`rebalance` can then move one half elsewhere.
        """
        return self._control("split_partition", partition_id)

    def add_read_replica(self, partition_id: int, node: int | None = None) -> int:
        """Give a query-hot partition one more replica (beyond ``replication_factor``), on ``node`` or on the
        live node with the fewest replicas that lacks it; reads then spread over more nodes. Returns the node."""
        return self._control("add_read_replica", partition_id, node)

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
        self._rt.require_data()
        return self._control("rebalance", dry_run, strategy, threshold, max_migrations)

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
        self._rt.require_data()
        return self._control("checkpoint", _absolute(path))

    @classmethod
    def restore(cls, path: str, config: NodeConfig | None = None) -> DistributedSpatialCluster:
        """A new cluster holding the data of the checkpoint at ``path`` (its ``LATEST``, or one checkpoint
        directory), every file verified against its checksum. The node count may differ from the original.

        Raises :class:`~distspatial.io.checkpoint_files.CheckpointError` naming the missing or corrupt file.
        """
        from .io import checkpoint_files as ck

        path = _absolute(path)
        ck.read_manifest(path)  # a missing or bad checkpoint fails here, before any actor starts
        cluster = cls(config)
        try:
            cluster._rt.install(cluster._rt.call_controller("load_checkpoint", path))
        except BaseException:
            cluster.shutdown()
            raise
        return cluster

    # -- statistics -----------------------------------------------------------------------------------------
    def statistics(self) -> ClusterStatistics:
        """Per-node and cluster-wide statistics (see :class:`~distspatial.core.stats.ClusterStatistics`)."""
        self._require_open()
        self._rt.sync()
        rt = self._rt
        refs = {i: a.stats.remote() for i, a in rt.actors.items() if i not in rt.failed_nodes}
        node_stats = {}
        for i, ref in refs.items():
            try:
                node_stats[i] = ray.get(ref, timeout=self.config.communication_timeout_ms / 1000)
            except Exception as exc:
                rt.mark_failed(i, f"statistics: {type(exc).__name__}")
        info = rt.view.node_info
        nodes = []
        for i in self.node_ids:
            s = node_stats.get(i)
            alive = s is not None
            nodes.append(
                NodeStatistics(
                    node_id=i,
                    status="alive" if alive else "failed",
                    ray_node_id=(s or info.get(i, {})).get("ray_node_id", ""),
                    host=(s or info.get(i, {})).get("host", ""),
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
        # this client's and the controller's own messages ("coordinator": everything not counted by a node)
        tot = rt.comm.totals()
        for key, v in rt.call_controller("comm_totals", timeout_s=120).items():
            tot[key] = tot.get(key, 0) + v
        meta = rt.meta
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
            crs=meta.crs if meta else None,
        )


def _resolve(crs: Any) -> CRSInfo | None:
    return resolve_crs(crs)


def _queries_in(meta: GlobalIndexMetadata, q: Any, what: str = "query") -> tuple[np.ndarray, bool]:
    """Queries as given -> as the nodes take them: ``(array (m, dim), single)``; a geographic data set's
    longitude/latitude (validated, rows named) become unit vectors."""
    if not meta.geographic:
        return check_queries(q, meta.dim, what)
    try:
        a = np.asarray(q, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be longitude, latitude in degrees: (2,) or (m, 2) numbers") from None
    return to_unit(a, what), a.ndim == 1


def _lonlat_corners(x: Any, what: str) -> tuple[np.ndarray, bool]:
    """Box corners ``(2,)`` / ``(m, 2)`` longitude/latitude, validated (rows named), longitudes wrapped."""
    from .core.geo import check_lonlat

    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be longitude, latitude in degrees: (2,) or (m, 2) numbers") from None
    single = a.ndim == 1
    return check_lonlat(a.reshape(1, -1) if single else a, what), single


def _hits(out: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``[(ids, points), ...]`` per query -> (counts, query of each hit, ids, points) concatenated."""
    counts = np.array([len(i) for i, _ in out], dtype=np.int64)
    ids = np.concatenate([i for i, _ in out]) if out else np.empty(0, np.int64)
    pts = np.concatenate([p.reshape(-1, 3) for _, p in out]) if out else np.empty((0, 3))
    return counts, np.repeat(np.arange(len(out)), counts), ids, pts


def _regroup(keep: np.ndarray, counts: np.ndarray, qrow: np.ndarray, ids: np.ndarray, pts: np.ndarray | None,
             return_points: bool) -> list:
    """The hits kept, one id array (or ``(ids, lon/lat points)``) per query, in their order (sorted by id)."""
    cuts = np.cumsum(np.bincount(qrow[keep], minlength=len(counts)))[:-1]
    id_lists = np.split(ids[keep], cuts)
    if not return_points:
        return id_lists
    return list(zip(id_lists, np.split(pts[keep], cuts)))


def _geo_ball_filter(out: list, c: np.ndarray, r: np.ndarray, return_points: bool) -> list:
    """Range hits of a geographic data set (searched with a chord a few ulps long) kept where the great-circle
    distance in metres (as :func:`~distspatial.core.geo.chord_to_metres` of the 3-D chord) is <= the radius."""
    counts, qrow, ids, pts = _hits(out)
    chord = np.sqrt(np.square(pts - c[qrow]).sum(axis=1))
    keep = np.flatnonzero(chord_to_metres(chord) <= r[qrow])
    return _regroup(keep, counts, qrow, ids, unit_to_lonlat(pts) if return_points else None, return_points)


def _geo_box_filter(out: list, lo: np.ndarray, hi: np.ndarray, return_points: bool) -> list:
    """Box candidates (of the 3-D box around each lon/lat box) tested exactly on longitude/latitude: latitude in
    [lat_lo, lat_hi]; longitude in [lon_lo, lon_hi], or outside (lon_hi, lon_lo) for a box across the
    antimeridian; longitude 180 and -180 are the same meridian."""
    counts, qrow, ids, pts = _hits(out)
    ll = unit_to_lonlat(pts)
    lon, lat = ll[:, 0], ll[:, 1]
    a, b = lo[qrow, 0], hi[qrow, 0]
    ok_lat = (lat >= lo[qrow, 1]) & (lat <= hi[qrow, 1])
    alt = np.where(lon == -180.0, 180.0, np.where(lon == 180.0, -180.0, lon))
    inside = ((lon >= a) & (lon <= b)) | ((alt >= a) & (alt <= b))
    across = (lon >= a) | (lon <= b)
    keep = np.flatnonzero(ok_lat & np.where(a <= b, inside, across))
    return _regroup(keep, counts, qrow, ids, ll, return_points)


def _absolute(path: str) -> str:
    """Local paths are made absolute here: the controller and the nodes run in other working directories."""
    return path if "://" in str(path) else os.path.abspath(os.fspath(path))


def _run_hosted(node: Any, controller: Any, token: str | None, fn: Callable[..., Any], *args: Any) -> None:
    """In a node's process (:meth:`DistributedSpatialCluster.host_on_nodes`): a client whose one-hop calls to
    this node go to it directly, then ``fn(client, *args)``."""
    client = DistributedSpatialCluster._from_controller(controller, token)
    client.progress = False
    client._one_hop.set_local(node.node_id, node.one_hop)
    fn(client, *args)
