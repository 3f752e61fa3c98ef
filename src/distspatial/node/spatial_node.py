"""A logical cluster node: the partitions it holds and the work it does on them.

:class:`SpatialNode` is a plain Python class; the coordinator runs each instance as a Ray actor
(``ray.remote(SpatialNode)``). The module imports no Ray at import time (``ping`` asks Ray for its node id only
when running inside Ray), so a node can be driven directly in a unit test.
Every method takes and returns NumPy arrays and small tuples, which Ray moves through its object store
(zero-copy reads of arrays on the receiving side).

Work is always addressed to partitions, never to the node as a whole: a call names the partitions it covers,
because with replicas a node may hold a partition that another replica serves for this call.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import numpy as np

from ..core.codec import encode
from ..core.errors import PartitionMovedError, StaleMetadataError
from ..core.memory import release_free_memory
from ..kernels.local_index import LocalPartition, wide_ids
from .loading import LoadingMixin
from .messages import Segment, data_message
from .polygon_rounds import PolygonRoundsMixin
from .query_rounds import JoinWriterMixin, QueryRoundsMixin

__all__ = ["SpatialNode", "Segment"]



class SpatialNode(LoadingMixin, QueryRoundsMixin, JoinWriterMixin, PolygonRoundsMixin):
    """State and kernels of one logical node (see module docstring); query rounds of a batch in
    :class:`~distspatial.node.query_rounds.QueryRoundsMixin`, parallel file loads in
    :class:`~distspatial.node.loading.LoadingMixin`, polygon queries in
    :class:`~distspatial.node.polygon_rounds.PolygonRoundsMixin`."""

    def __init__(self, node_id: int, threads: int = 1, compress: bool = False, device: str = "cpu") -> None:
        from ..kernels.backend import CpuBackend
        from ..kernels.backend_choice import get_backend

        self.node_id = node_id
        self.threads = max(1, int(threads))
        # kernel backend (NodeConfig.device): on the CPU the partitions' KD-trees answer queries; on a GPU the
        # backend answers them over each partition's live points, prepared once per partition version
        self.backend = get_backend(device, threads=self.threads, **({"hamerly": False} if device == "cpu" else {}))
        self.on_gpu = not isinstance(self.backend, CpuBackend)
        self._prepared: dict[int, tuple[int, Any]] = {}
        self.compress = bool(compress)  # compress large query results (NodeConfig.compression)
        self.partitions: dict[int, LocalPartition] = {}
        self._incoming: dict[int, dict] = {}  # partitions arriving in slices (load_slices), until complete
        self.dataset_id = -1
        self._kmeans: dict[tuple[int, int], Any] = {}
        self._mind2: dict[tuple[int, int], np.ndarray] = {}
        self._snapshots: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # (run, pid) -> data seen
        self._dbscan: dict[tuple, Any] = {}  # (run, kind, partition) -> DBSCAN state
        self._applied: dict[int, set[int]] = {}  # partition -> ingest batches applied (replays are no-ops)
        import threading

        self._lock = threading.Lock()  # counters: updated by the query thread and the default thread
        self._hosted: dict[str, threading.Thread] = {}  # name -> thread of a hosted service (see host)
        from ..kernels import curve_runs, query_planning

        def warm_up() -> None:
            curve_runs.warm_up()
            query_planning.warm_up()

        # the partitions' delta kernels and the follow-up planning (Numba): compiled or loaded now, off the path
        # of the first live ingest and the first large batch (the curve-key kernels load with the first large
        # batch; small ones need no keys here)
        threading.Thread(target=warm_up, daemon=True, name="distspatial-warm-up").start()
        import gc

        # Everything imported so far (Ray, NumPy, SciPy, Numba: ~150K objects) never becomes garbage: keep it out
        # of the cyclic collector's full passes, which otherwise stall a query for tens of milliseconds.
        gc.freeze()
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.part_queries: dict[int, int] = {}  # queries served per partition (for query-aware balancing)
        # Newest metadata version the controller told this node of, and the newest one that changed what a
        # partition id holds (a split, a new data set). A query's first message planned on a version older than
        # meta_version is refused (StaleMetadataError: the client re-plans, so it sees every write acknowledged
        # before it started); later rounds are refused only when the layout changed under them.
        self.meta_version = 0
        self.layout_version = 0
        self.counters = {
            "calls": 0,
            "queries": 0,
            "busy_s": 0.0,
            "bytes_in": 0,
            "bytes_out": 0,
            "raw_bytes_out": 0,  # before compression
        }

    # -- hosted services -----------------------------------------------------------------------------------
    def host(self, name: str, fn: Any, *args: Any) -> bool:
        """Run ``fn(self, *args)`` in a daemon thread of this node's process as the service ``name``, unless
        one of that name runs already (then ``False``). For services that answer next to the partitions, such as
        the HTTP service of ``distspatial serve --on-nodes``: the node knows nothing of them (``fn`` comes from
        the layer above, by reference). A restarted node hosts nothing until asked again."""
        t = self._hosted.get(name)
        if t is not None and t.is_alive():
            return False
        t = threading.Thread(target=fn, args=(self, *args), daemon=True, name=f"distspatial-hosted-{name}")
        t.start()
        self._hosted[name] = t
        return True

    def hosted(self) -> list[str]:
        """Names of the services running here (:meth:`host`)."""
        return sorted(n for n, t in self._hosted.items() if t.is_alive())

    # -- bookkeeping ----------------------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        """Liveness and identity: node id, process, host, Ray node, partitions and memory held."""
        try:
            import psutil

            rss = psutil.Process().memory_info().rss
            vm = psutil.virtual_memory()
            mem_fraction = 1.0 - vm.available / vm.total
        except Exception:  # pragma: no cover - psutil is a dependency, but stay robust
            rss, mem_fraction = -1, 0.0
        ray_node, ip = os.environ.get("RAY_NODE_ID", ""), ""
        try:  # only meaningful inside a Ray actor
            import ray

            if ray.is_initialized():
                ray_node = ray.get_runtime_context().get_node_id()
                ip = ray.util.get_node_ip_address()
        except Exception:
            pass
        return {
            "node_id": self.node_id,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "ip": ip,
            "ray_node_id": ray_node,
            "partitions": sorted(self.partitions),
            "points": int(sum(p.size for p in self.partitions.values())),
            "bytes": int(sum(p.nbytes for p in self.partitions.values())),
            "rss": int(rss),
            "memory_fraction": float(mem_fraction),
            "dataset_id": self.dataset_id,
            "meta_version": self.meta_version,
            "time": time.time(),
        }

    def stats(self, new_window: bool = False) -> dict[str, Any]:
        """Counters of work served since start, per-partition query counts, and the process's CPU use (percent
        of one core) since the start of the current measuring window; ``new_window=True`` (load metrics)
        starts a new one, so other readers (statistics, a status page) do not shorten the balancer's window."""
        info = self.ping()
        with self._lock:
            info.update(self.counters)
            info["part_queries"] = dict(self.part_queries)
        parts = list(self.partitions.values())
        info["delta_points"] = sum(p.delta_size for p in parts)
        info["runs"] = sum(p.n_runs for p in parts)
        info["base_rebuilds"] = sum(p.merges for p in parts)
        try:
            import psutil

            t = psutil.Process().cpu_times()
            now, used = time.monotonic(), t.user + t.system
            w0, u0 = getattr(self, "_cpu_window", (self.started_mono, 0.0))
            info["cpu_percent"] = 100.0 * (used - u0) / max(1e-9, now - w0)
            if new_window:
                self._cpu_window = (now, used)
        except Exception:  # pragma: no cover
            info["cpu_percent"] = 0.0
        return info

    def set_meta_version(self, version: int, layout: bool = False, meta: Any = None, members: int = -1,
                         failed: frozenset[int] = frozenset()) -> int:
        """Refuse queries planned on a metadata version older than ``version`` from now on (never lowers it);
        ``layout``: the change alters what partition ids hold, so every round of an older plan is refused.
        Called by the controller before it acknowledges a change; returns the node's version. ``meta`` (that
        version's metadata), ``members`` and ``failed`` refresh the routing the node plans query rounds on
        (:meth:`~distspatial.node.query_rounds.QueryRoundsMixin.set_routing`)."""
        self.meta_version = max(self.meta_version, int(version))
        if layout:
            self.layout_version = max(self.layout_version, int(version))
        if meta is not None:
            self.set_routing(int(version), meta, members, failed)
        return self.meta_version

    def _check_version(self, version: int | None, layout: int | None = None) -> None:
        """``version``: a query's first round was planned on it (fresh enough?); ``layout``: a later round of a
        plan made on it (is the partition layout still the same?)."""
        if version is not None and version < self.meta_version:
            raise StaleMetadataError(
                f"node {self.node_id}: query planned on metadata version {version}, the newest is "
                f"{self.meta_version}", self.meta_version, self.layout_version)
        if layout is not None and layout < self.layout_version:
            raise StaleMetadataError(
                f"node {self.node_id}: a round planned on version {layout}, but partitions changed in version "
                f"{self.layout_version}", self.layout_version)

    def _count(self, pid: int, n: int) -> None:
        with self._lock:
            self.part_queries[pid] = self.part_queries.get(pid, 0) + n
            self.counters["queries"] += n

    # -- data placement -------------------------------------------------------------------------------------
    @data_message()
    def load_partitions(self, dataset_id: int, partition_ids: list[int], *arrays: np.ndarray) -> list[int]:
        """Hold partitions of data set ``dataset_id``: ``arrays`` is ``points_0, ids_0, points_1, ids_1, ...``.

        The arrays are passed as top-level arguments so that Ray resolves object references to zero-copy views
        of its object store. A KD-tree is built over each partition. Loading a new data set drops every
        partition of the previous one. Returns the partition ids loaded.
        """
        return self._load(dataset_id, partition_ids, arrays)

    def _load(self, dataset_id: int, partition_ids: list[int], arrays: Any) -> list[int]:
        if len(arrays) != 2 * len(partition_ids):
            raise ValueError("load_partitions needs one (points, ids) pair per partition id")
        if dataset_id != self.dataset_id:
            self.clear()
            self.dataset_id = dataset_id
        pts = ids = None
        for j, pid in enumerate(partition_ids):  # compressed transfers were decoded by data_message
            # arrays read from Ray's object store are views of an object owned by the sender (a client that
            # may exit): keep a copy of our own, so a partition never depends on another process
            pts, ids = (a if a.flags.writeable else a.copy() for a in (arrays[2 * j], arrays[2 * j + 1]))
            self.partitions[int(pid)] = LocalPartition(pts, ids)
        del arrays, pts, ids
        release_free_memory()  # the transient copies of the load (the heap keeps them otherwise)
        return [int(p) for p in partition_ids]

    @data_message()
    def load_slices(self, dataset_id: int, pieces: list[tuple[int, int, int, int]], *arrays: np.ndarray) -> list[int]:
        """Pieces of partitions of data set ``dataset_id``, each ``(partition id, first row, end row, rows of the
        partition)``, ``arrays`` their ``points, ids`` in turn (top-level: Ray passes object-store views). The
        rows are copied into the partition's arrays; a partition's KD-tree is built when its last piece arrives
        (the client sends a large data set in bounded waves of pieces). Returns the partitions completed."""
        if len(arrays) != 2 * len(pieces):
            raise ValueError("load_slices needs one (points, ids) pair per slice")
        if dataset_id != self.dataset_id:
            self.clear()
            self.dataset_id = dataset_id
        done = []
        for j, (pid, start, stop, total) in enumerate(pieces):
            pts, ids = arrays[2 * j], arrays[2 * j + 1]
            if len(pts) != stop - start or len(ids) != stop - start or not 0 <= start <= stop <= total:
                raise ValueError(f"load_slices: slice {j} of partition {pid} does not fit rows {start}:{stop} of "
                                 f"{total}")
            buf = self._incoming.get(pid)
            if buf is None:
                buf = self._incoming[pid] = {"points": np.empty((total, pts.shape[1]), dtype=pts.dtype),
                                             "ids": np.empty(total, dtype=ids.dtype), "starts": set(), "rows": 0}
            if start in buf["starts"]:  # a replayed piece
                continue
            buf["points"][start:stop], buf["ids"][start:stop] = pts, ids
            buf["starts"].add(start)
            buf["rows"] += stop - start
            if buf["rows"] == total:
                del self._incoming[pid]
                self.partitions[int(pid)] = LocalPartition(buf["points"], buf["ids"])
                done.append(int(pid))
        del arrays
        if done:
            release_free_memory()
        return done

    @data_message()
    def export_partition(self, partition_id: int, compress: bool = False) -> tuple[Any, Any]:
        """``(points, ids)`` of a partition, for copying it to another node (call with ``num_returns=2``: the
        two results then travel node to node through Ray's object store, not through the driver), compressed
        with :func:`distspatial.core.codec.encode` when ``compress``."""
        part = self._part(partition_id)
        if compress:
            return encode(part.points), encode(wide_ids(part.ids))
        return part.points, wide_ids(part.ids)

    @data_message()
    def write_partitions(self, ckpt_uri: str, partition_ids: list[int]) -> list[tuple[int, str, int, int, str]]:
        """Write each partition to ``ckpt_uri/part-XXXXX.dsz``: ``[(pid, file, bytes, raw bytes, sha256)]``."""
        from ..io.checkpoint_files import join, write_partition_file

        out = []
        for pid in partition_ids:
            part = self._part(pid)
            name = f"part-{pid:05d}.dsz"
            nbytes, raw, digest = write_partition_file(join(ckpt_uri, name), part.points, wide_ids(part.ids))
            out.append((pid, name, nbytes, raw, digest))
        return out

    @data_message()
    def load_partition_files(self, dataset_id: int, files: list[tuple[int, str, int, str]]) -> list[int]:
        """Load partitions from checkpoint files ``[(pid, file_uri, raw bytes, sha256)]``, verifying checksums."""
        from ..io.checkpoint_files import read_partition_file

        arrays: list[np.ndarray] = []
        for _, uri, raw, digest in files:
            arrays.extend(read_partition_file(uri, raw, digest))
        return self._load(dataset_id, [f[0] for f in files], arrays)

    def split_partition(
        self, pid: int, new_pid: int, lo: np.ndarray, hi: np.ndarray, curve: str, bits: int
    ) -> tuple[tuple[int, int, np.ndarray, np.ndarray, int], tuple[int, int, np.ndarray, np.ndarray, int]]:
        """Split partition ``pid`` at its curve-key median: the lower half keeps ``pid``, the upper half becomes
        ``new_pid``. Every replica holds the same rows in the same order, so every replica splits the same way.
        Returns ``(key_lo, key_hi, box_lo, box_hi, size)`` of both halves."""
        from ..core.curves import curve_keys

        part = self._part(pid)
        keys = curve_keys(part.points, lo, hi, curve, bits)
        order = np.argsort(keys, kind="stable")  # already sorted unless rows were appended
        mid = len(order) // 2
        halves = []
        for new_id, rows in ((pid, order[:mid]), (new_pid, order[mid:])):
            pts, ids = part.points[rows], part.ids[rows]
            self.partitions[new_id] = LocalPartition(pts, ids)
            halves.append((int(keys[rows].min()), int(keys[rows].max()), pts.min(axis=0), pts.max(axis=0), len(rows)))
        for key in [k for k in self._kmeans if k[1] == pid]:  # algorithm state of the old rows is stale
            del self._kmeans[key]
        for key in [k for k in self._mind2 if k[1] == pid]:
            del self._mind2[key]
        for key in [k for k in self._snapshots if k[1] == pid]:
            del self._snapshots[key]
        return halves[0], halves[1]

    # -- live updates ---------------------------------------------------------------------------------------
    @data_message()
    def append(
        self, batch: int, points: np.ndarray, ids: np.ndarray, segments: list[Segment],
        centers: np.ndarray | None = None, stat_partitions: list[int] | None = None,
    ) -> tuple[list[tuple[int, int, np.ndarray, np.ndarray]], Any]:
        """Append ``points[start:stop]`` (ids alike) to each segment's partition, once per ``batch`` id (a
        replayed batch changes nothing). Returns ``[(pid, size after, new points' box lo, box hi)]`` and, with
        ``centers``, the per-cluster ``(sums, counts)`` of the new points of ``stat_partitions`` (streaming
        k-means; each partition is counted by one replica only)."""
        out = []
        for pid, a, b in segments:
            part = self._part(pid)
            done = self._applied.setdefault(pid, set())
            if batch not in done:
                part.append(points[a:b], ids[a:b])
                done.add(batch)
            new = points[a:b]
            out.append((pid, part.size, new.min(axis=0), new.max(axis=0)))
        stats = None
        if centers is not None:
            mine = set(stat_partitions or ())
            rows = [np.arange(a, b) for pid, a, b in segments if pid in mine]
            points = np.take(points, np.concatenate(rows), axis=0) if rows else points[:0]
            _, sums, counts, _ = self.backend.kmeans_assign_sums(points, centers)
            stats = (sums, counts)
        return out, stats

    @data_message()
    def delete(self, ids: np.ndarray) -> list[tuple[int, int, int]]:
        """Delete these ids from every partition held here: ``[(pid, deleted, size after)]`` where any went."""
        out = []
        for pid, part in self.partitions.items():
            n = part.delete(ids)
            if n:
                out.append((pid, n, part.size))
        return out

    @data_message()
    def partition_ids(self, partition_ids: list[int]) -> list[tuple[int, np.ndarray]]:
        """``[(pid, ids)]``: the ids each partition holds now."""
        return [(pid, wide_ids(self._part(pid).ids)) for pid in partition_ids]

    def drop_partitions(self, partition_ids: list[int]) -> None:
        for pid in partition_ids:
            self.partitions.pop(pid, None)

    def clear(self) -> None:
        """Drop all data and algorithm state."""
        self.partitions.clear()
        self._incoming.clear()
        self._kmeans.clear()
        self._mind2.clear()
        self._snapshots.clear()
        self._applied.clear()
        self.dataset_id = -1

    def _prep(self, pid: int) -> Any:
        """The backend's prepared form of a partition's live points (rebuilt when the partition changed)."""
        part = self._part(pid)
        got = self._prepared.get(pid)
        if got is None or got[0] != part.version:
            got = self._prepared[pid] = (part.version, self.backend.prepare(part.points))
        return got[1]

    def _part(self, pid: int) -> LocalPartition:
        try:
            return self.partitions[pid]
        except KeyError:
            raise PartitionMovedError(f"node {self.node_id} does not hold partition {pid}") from None

    # -- queries --------------------------------------------------------------------------------------------
    @data_message(compress_result=True)
    def knn(
        self, queries: np.ndarray, bounds: np.ndarray | None, segments: list[Segment], k: int,
        version: int | None = None, layout: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest neighbours of ``queries[start:stop]`` within each segment's partition.

        Returns ``(distances (m, k), ids (m, k))`` aligned with ``queries``. With ``bounds`` (m,), only
        candidates within each query's bound come back; the other slots are ``inf`` / ``-1``. ``version`` /
        ``layout``: the metadata version a first / later round was planned on (see :meth:`_check_version`).
        """
        self._check_version(version, layout)
        return self._knn_local(queries, bounds, segments, k)

    def _knn_local(self, queries: np.ndarray, bounds: np.ndarray | None, segments: list[Segment],
                   k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`knn` on the partitions held here, without the version check or message counting."""
        m = len(queries)
        dist = np.empty((m, k), dtype=np.float64)
        ids = np.empty((m, k), dtype=np.int64)
        for pid, a, b in segments:
            bnd = None if bounds is None else bounds[a:b]
            part = self._part(pid)
            if self.on_gpu:
                with part.lock:
                    dd, rows = self.backend.knn(self._prep(pid), queries[a:b], k, bnd)
                    dist[a:b], ids[a:b] = dd, np.where(rows >= 0, part.ids[np.maximum(rows, 0)], -1)
            else:
                # a few queries: no worker threads (starting them costs more than the queries)
                dist[a:b], ids[a:b] = part.knn(queries[a:b], k, bnd, workers=self.threads if b - a >= 256 else 1)
            self._count(pid, b - a)
        return dist, ids

    @data_message(compress_result=True)
    def ball(
        self, centers: np.ndarray, radii: np.ndarray, segments: list[Segment], return_points: bool = False,
        version: int | None = None, layout: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Points within ``radii[i]`` of ``centers[i]`` (inclusive), for each segment's partition.

        Returns ``(counts (m,), ids (sum counts,), points or None)``: row i's hits are the ``counts[i]``
        entries after those of rows ``< i``. ``version`` / ``layout`` as in :meth:`knn`.
        """
        self._check_version(version, layout)
        return self._ball_local(centers, radii, segments, return_points)

    def _ball_local(self, centers: np.ndarray, radii: np.ndarray, segments: list[Segment],
                    return_points: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """:meth:`ball` on the partitions held here, without the version check or message counting."""
        m = len(centers)
        counts = np.zeros(m, dtype=np.int64)
        id_chunks, pt_chunks = [], []
        for pid, a, b in segments:
            part = self._part(pid)
            with part.lock:  # rows index the partition as it is now: no append may reorder it before the lookup
                if self.on_gpu:
                    from ..kernels.backend import csr_to_lists

                    hits = csr_to_lists(*self.backend.radius(self._prep(pid), centers[a:b], radii[a:b]))
                else:
                    hits = part.radius(centers[a:b], radii[a:b], workers=self.threads)
                rows = np.concatenate(hits) if hits else np.empty(0, dtype=np.int64)
                id_chunks.append(wide_ids(part.ids[rows]))
                if return_points:
                    pt_chunks.append(part.points[rows])
            self._count(pid, b - a)
            counts[a:b] = [len(h) for h in hits]
        return _pack_hits(counts, id_chunks, pt_chunks, return_points, centers)

    @data_message(compress_result=True)
    def box(
        self, lo: np.ndarray, hi: np.ndarray, segments: list[Segment], return_points: bool = False,
        version: int | None = None, layout: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Points inside the boxes ``[lo[i], hi[i]]`` (inclusive); same return layout as :meth:`ball`."""
        self._check_version(version, layout)
        return self._box_local(lo, hi, segments, return_points)

    def _box_local(self, lo: np.ndarray, hi: np.ndarray, segments: list[Segment],
                   return_points: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """:meth:`box` on the partitions held here, without the version check or message counting."""
        m = len(lo)
        counts = np.zeros(m, dtype=np.int64)
        id_chunks, pt_chunks = [], []
        for pid, a, b in segments:
            part = self._part(pid)
            self._count(pid, b - a)
            with part.lock:  # as in ``ball``
                if self.on_gpu:
                    from ..kernels.backend import csr_to_lists

                    per_box = csr_to_lists(*self.backend.box(self._prep(pid), lo[a:b], hi[a:b]))
                for i in range(a, b):  # one search per box; batches of boxes are short
                    rows = per_box[i - a] if self.on_gpu else part.box(lo[i], hi[i])
                    counts[i] = len(rows)
                    id_chunks.append(wide_ids(part.ids[rows]))
                    if return_points:
                        pt_chunks.append(part.points[rows])
        return _pack_hits(counts, id_chunks, pt_chunks, return_points, lo)

    @data_message()
    def sample_fraction(self, fraction: float, seed: int, partition_ids: list[int]) -> list:
        """``[(ids, points)]``: each point of each partition kept with probability ``fraction``."""
        out = []
        for pid in partition_ids:
            part = self._part(pid)
            keep = np.random.default_rng([seed, pid]).random(part.size) < fraction
            out.append((wide_ids(part.ids[keep]), part.points[keep]))
        return out

    @data_message()
    def moments(self, partition_ids: list[int]) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """``[(count, mean (d,), sum of squared deviations (d,))]`` of each partition's live points."""
        out = []
        for pid in partition_ids:
            pts = self._part(pid).points
            mean = pts.mean(axis=0) if len(pts) else np.zeros(pts.shape[1])
            out.append((len(pts), mean, ((pts - mean) ** 2).sum(axis=0)))
        return out

    @data_message()
    def sample(self, pid: int, rows: np.ndarray) -> np.ndarray:
        """Points at ``rows`` of partition ``pid``."""
        return self._part(pid).points[rows]

    # -- k-means --------------------------------------------------------------------------------------------
    @data_message()
    def kmeans_step(
        self, run: int, centers: np.ndarray, partition_ids: list[int]
    ) -> tuple[np.ndarray, np.ndarray, float, int]:
        """One Lloyd assignment over ``partition_ids``: ``(sums (k, d), counts (k,), inertia, n_changed)``."""
        k, d = centers.shape
        sums = np.zeros((k, d))
        counts = np.zeros(k, dtype=np.int64)
        inertia, changed = 0.0, 0
        for pid in partition_ids:
            state = self._kmeans.get((run, pid))
            if state is None:
                state = self._kmeans[(run, pid)] = self.backend.lloyd_state(self._run_data(run, pid)[0])
            s, c, i, ch = state.step(centers)
            sums += s
            counts += c
            inertia += i
            changed += ch
        return sums, counts, inertia, changed

    @data_message()
    def kmeans_farthest(self, run: int, m: int, partition_ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``m`` points farthest from their assigned centre: ``(distances, points, labels)``."""
        dists, pts, labs = [], [], []
        for pid in partition_ids:
            state = self._kmeans[(run, pid)]
            rows, dd = state.farthest_indices(m)
            dists.append(dd)
            pts.append(self._run_data(run, pid)[0][rows])
            labs.append(state.labels[rows])
        dist = np.concatenate(dists)
        order = np.argsort(-dist, kind="stable")[:m]
        return dist[order], np.concatenate(pts)[order], np.concatenate(labs)[order]

    @data_message()
    def kmeans_labels(
        self, run: int, centers: np.ndarray, partition_ids: list[int]
    ) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """``(partition_id, ids, labels)`` for each partition of the finished run: each point's nearest of the
        final ``centers`` (lowest index on ties). Computed here rather than read from the run's state, which this
        replica may lack or hold from an earlier step (steps can go to different replicas of a partition, and
        a replica can arrive by recovery or migration during the run)."""
        out = []
        for pid in partition_ids:
            points, ids = self._run_data(run, pid)
            out.append((pid, ids, self.backend.nearest_center(points, centers)[0]))
        return out

    def kmeans_end(self, run: int) -> None:
        """Free the state of run ``run``."""
        for key in [k for k in self._kmeans if k[0] == run]:
            del self._kmeans[key]
        for key in [k for k in self._mind2 if k[0] == run]:
            del self._mind2[key]
        for key in [k for k in self._snapshots if k[0] == run]:
            del self._snapshots[key]

    def _run_data(self, run: int, pid: int) -> tuple[np.ndarray, np.ndarray]:
        """``(points, ids)`` of a partition as an algorithm run first saw it: points ingested or deleted while
        the run goes on do not change the rows its per-point state refers to."""
        snap = self._snapshots.get((run, pid))
        if snap is None:
            part = self._part(pid)
            snap = self._snapshots[(run, pid)] = (part.points, wide_ids(part.ids))
        return snap

    @data_message()
    def kmeanspar_update(self, run: int, new_centers: np.ndarray, partition_ids: list[int]) -> float:
        """k-means|| bookkeeping: fold ``new_centers`` into each point's min squared distance; return the cost."""
        cost = 0.0
        for pid in partition_ids:
            _, d2 = self.backend.nearest_center(self._run_data(run, pid)[0], new_centers)
            prev = self._mind2.get((run, pid))
            if prev is not None:
                np.minimum(prev, d2, out=d2)
            self._mind2[(run, pid)] = d2
            cost += float(d2.sum())
        return cost

    @data_message()
    def kmeanspar_sample(self, run: int, factor: float, seed: int, partition_ids: list[int]) -> np.ndarray:
        """k-means|| oversampling: keep each point with probability ``min(1, factor * d2)``.

        Each partition draws from its own generator seeded by ``(seed, partition_id)``, so the sample does not
        depend on which replica or node computes it.
        """
        out = []
        for pid in partition_ids:
            d2 = self._mind2[(run, pid)]
            rng = np.random.default_rng([seed, pid])
            keep = rng.random(len(d2)) < factor * d2
            out.append(self._run_data(run, pid)[0][keep])
        d = next(iter(self.partitions.values())).points.shape[1] if self.partitions else 0
        return np.concatenate(out) if out else np.empty((0, d))

    @data_message(compress_result=True)
    def distance_tile(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Euclidean distances between the rows of ``a`` and ``b`` (one tile of a distance matrix)."""
        return np.sqrt(self.backend.distance_tile(a, b))

    # -- DBSCAN (see distspatial.algorithms.dbscan) -----------------------------------------------------------------
    @data_message()
    def dbscan_cells(self, run: int, eps: float, origin: np.ndarray, partition_ids: list[int]) -> Any:
        """For each partition, the sorted hashes of the eps-grid cells its points occupy (one result each)."""
        out = [np.unique(_cell_hash(_cells(self._run_data(run, p)[0], origin, eps))) for p in partition_ids]
        return out[0] if len(out) == 1 else tuple(out)

    @data_message()
    def dbscan_halo(self, run: int, eps: float, origin: np.ndarray,
                    requests: list[tuple[int, np.ndarray, np.ndarray, list[int], int]], *cell_sets: np.ndarray) -> Any:
        """Halo pieces: for each ``(target, lo, hi, sources, c)``, ``(ids, points)`` of the points of the
        ``sources`` partitions inside ``[lo, hi]`` whose eps-grid cell is next to a cell of ``cell_sets[c]``
        (the target's occupied cells): a superset of the points within eps of the target's points. One result
        per request (Ray ``num_returns``)."""
        out = []
        for target, lo, hi, sources, c in requests:
            sel, ids, pts = [], [], []
            for q in sources:
                data = self._run_data(run, q)
                rows = np.flatnonzero(np.all((data[0] >= lo) & (data[0] <= hi), axis=1))
                if len(rows):
                    rows = rows[_near_cells(_cells(np.take(data[0], rows, axis=0), origin, eps), cell_sets[c])]
                sel.append((q, rows))
                ids.append(data[1][rows])
                pts.append(np.take(data[0], rows, axis=0))
            self._dbscan[(run, "sel", target)] = sel
            d = pts[0].shape[1] if pts else 0
            out.append((np.concatenate(ids) if ids else np.empty(0, np.int64),
                        np.concatenate(pts) if pts else np.empty((0, d))))
        return out[0] if len(out) == 1 else tuple(out)

    @data_message()
    def dbscan_core(self, run: int, eps: float, min_samples: int, layout: list[tuple[int, int]], *pieces: Any) -> int:
        """Core flags of each partition in ``layout`` (``(pid, number of halo pieces)``) over its points and
        halo; kept for :meth:`dbscan_local`. Returns the number of halo points received."""
        from ..kernels.dbscan_kernels import core_flags

        received, j = 0, 0
        for pid, n_pieces in layout:
            got = pieces[j:j + n_pieces]
            j += n_pieces
            pts, ids = self._run_data(run, pid)
            d = pts.shape[1]
            h_ids = np.concatenate([g[0] for g in got]) if got else np.empty(0, np.int64)
            h_pts = np.concatenate([g[1] for g in got]) if got else np.empty((0, d))
            received += len(h_ids)
            core = core_flags(pts, h_pts, eps, min_samples, workers=self.threads)
            self._dbscan[(run, "part", pid)] = (h_ids, h_pts, core)
        return received

    @data_message()
    def dbscan_halo_core(self, run: int, targets: list[int]) -> Any:
        """Core flags of the halo pieces this node cut for ``targets`` (same rows, same order)."""
        out = []
        for target in targets:
            flags = [self._dbscan[(run, "part", q)][2][rows] for q, rows in self._dbscan[(run, "sel", target)]]
            out.append(np.concatenate(flags) if flags else np.empty(0, bool))
        return out[0] if len(out) == 1 else tuple(out)

    @data_message()
    def dbscan_local(self, run: int, eps: float, layout: list[tuple[int, int]], *flag_pieces: np.ndarray) -> list:
        """Local clusters of each partition: ``[(pid, ids, labels, link_comp, link_ids, core)]``."""
        from ..kernels.dbscan_kernels import local_clusters

        out, j = [], 0
        for pid, n_pieces in layout:
            got = flag_pieces[j:j + n_pieces]
            j += n_pieces
            pts, ids = self._run_data(run, pid)
            h_ids, h_pts, core = self._dbscan[(run, "part", pid)]
            h_core = np.concatenate(got) if got else np.empty(0, bool)
            labels, link_comp, rows = local_clusters(pts, core, h_pts, h_core, eps, workers=self.threads)
            out.append((pid, ids, labels, link_comp, h_ids[rows], core))
        return out

    def dbscan_end(self, run: int) -> None:
        """Free the state of DBSCAN run ``run``."""
        for key in [k for k in self._dbscan if k[0] == run]:
            del self._dbscan[key]
        for key in [k for k in self._snapshots if k[0] == run]:
            del self._snapshots[key]

    # -- hierarchical clustering (level 1) ------------------------------------------------------------------
    @data_message()
    def micro_clusters(self, per_partition: dict[int, int], seed: int, partition_ids: list[int]) -> list[tuple]:
        """Micro-cluster summaries of each partition: ``[(pid, MicroClusters without labels, ids, labels)]``."""
        from ..kernels.hierarchical_kernels import micro_clusters

        out = []
        for pid in partition_ids:
            part = self._part(pid)
            mc = micro_clusters(part.points, per_partition[pid], seed=int(seed) * 1_000_003 + pid)
            out.append((pid, mc.summary(), wide_ids(part.ids), mc.labels))
        return out

    @data_message()
    def nearest_counts(self, centers: np.ndarray, partition_ids: list[int]) -> np.ndarray:
        """How many points of ``partition_ids`` have each of ``centers`` as their nearest."""
        counts = np.zeros(len(centers), dtype=np.int64)
        for pid in partition_ids:
            labels, _ = self.backend.nearest_center(self._part(pid).points, centers)
            counts += np.bincount(labels, minlength=len(centers))
        return counts



_HASH = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                  0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9], dtype=np.uint64)


def _cells(points: np.ndarray, origin: np.ndarray, eps: float) -> np.ndarray:
    """Integer eps-grid cell of each point: ``floor((x - origin) / eps)``."""
    return np.floor((points - origin) / eps).astype(np.int64)


def _cell_hash(cells: np.ndarray) -> np.ndarray:
    """A linear hash of cell coordinates (wrapping uint64), so ``hash(c + o) = hash(c) + hash(o)``.
    Collisions only add points to a halo, never drop one."""
    d = cells.shape[1]
    mult = np.resize(_HASH, d) + np.arange(d, dtype=np.uint64) * np.uint64(2)
    h = np.zeros(len(cells), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(d):
            h += cells[:, j].astype(np.uint64) * mult[j]
    return h


def _near_cells(cells: np.ndarray, occupied: np.ndarray) -> np.ndarray:
    """Mask of the cells having an occupied cell among their 3^d neighbours (themselves included)."""
    import itertools

    base = _cell_hash(cells)
    keep = np.zeros(len(cells), dtype=bool)
    if len(occupied) == 0:
        return keep
    d = cells.shape[1]
    for off in itertools.product((-1, 0, 1), repeat=d):
        with np.errstate(over="ignore"):
            h = base + _cell_hash(np.array([off], dtype=np.int64))[0]
        pos = np.minimum(np.searchsorted(occupied, h), len(occupied) - 1)
        keep |= occupied[pos] == h
    return keep


def _pack_hits(
    counts: np.ndarray, id_chunks: list, pt_chunks: list, return_points: bool, like: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    ids = np.concatenate(id_chunks) if id_chunks else np.empty(0, dtype=np.int64)
    pts = None
    if return_points:
        pts = np.concatenate(pt_chunks) if pt_chunks else np.empty((0, like.shape[1]))
    return counts, ids, pts
