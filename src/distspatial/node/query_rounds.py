"""Queries planned and merged on the nodes: the client only splits a batch by home partition.

A client computes each query's curve key and home partition (the key range holding it), and sends each node the
queries whose home partitions it serves (:meth:`QueryRoundsMixin.knn_batch`), with the metadata version it
planned on. The node then does what the client used to do, for its share of the batch:

1. sorts its queries by curve key (the order a partition's index answers fastest) and answers them in their home
   partitions, which it holds;
2. from the k-th distances, plans the follow-ups with the routing table of that version
   (:func:`~distspatial.kernels.query_planning.knn_followups`: cell and MINDIST tests): partitions it holds
   itself are searched here, the others are asked directly of a replica node, in that node's ``peer``
   concurrency group (which never calls out, so two nodes asking each other cannot deadlock);
3. merges the candidates and returns final answers in the order the queries came.

The routing table of a version comes from the controller once per version (``view``), with the node handles of
the peers; a node whose peers fail marks them failed and tells the controller, and the dispatcher retries their
partitions on other replicas. A peer that refuses a round because the partition layout changed since the
client's plan makes the whole call refused (:class:`~distspatial.core.errors.StaleMetadataError`): the client
plans again. Partitions lost on every replica raise :class:`~distspatial.core.errors.PartitionLostError`, or
with ``allow_partial`` are left out and named in the answer.
"""

from __future__ import annotations

import os
import pickle
import threading
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayTaskError

from ..core.codec import encode_all, message_bytes
from ..core.curves import curve_keys
from ..core.errors import PartitionLostError, PartitionMovedError, StaleMetadataError
from ..core.stats import CommunicationCounters
from ..kernels.query_planning import (ball_pairs, box_pairs, home_in_curve_order, knn_followups, knn_home,
                                      merge_candidates, put_rows, stack_groups)
from ..kernels.routing import RoutingTable
from .dispatch import Dispatcher
from .messages import Segment, data_message

__all__ = ["QueryRoundsMixin", "JoinWriterMixin", "PEER_GROUP"]

#: the concurrency group of a node in which peers' follow-up rounds run (never calls other nodes)
PEER_GROUP = "peer"

#: batches of at most this many queries are answered in the client's split, without keys or sorting here
SMALL_BATCH = 64


class QueryRoundsMixin:
    """Node-side planning and merging of query batches (see module docstring). Mixed into
    :class:`~distspatial.node.spatial_node.SpatialNode`; uses its ``partitions``, ``node_id``, ``compress``,
    ``counters``, ``_lock``, ``_check_version`` and ``_knn_local``."""

    _controller: Any = None
    _rounds_view: tuple[int, RoutingTable, Dispatcher] | None = None
    _rounds_members = -1  # the controller's count of node-set changes the cached dispatcher's handles belong to
    _rounds_lock: threading.Lock | None = None

    def set_controller(self, controller: Any) -> None:
        """The controller's actor handle (to fetch the routing of a metadata version and report failed peers)."""
        self._controller = controller
        self._rounds_view = None

    def _rounds_at(self, version: int) -> tuple[RoutingTable, Dispatcher]:
        """Routing table and peer dispatcher of metadata ``version``, fetched from the controller once."""
        cached = self._rounds_view
        if cached is not None and cached[0] == version:
            return cached[1], cached[2]
        if self._controller is None:
            raise RuntimeError(f"node {self.node_id} has no controller to ask for metadata version {version}")
        if self._rounds_lock is None:
            self._rounds_lock = threading.Lock()
        with self._rounds_lock:
            cached = self._rounds_view
            if cached is not None and cached[0] == version:
                return cached[1], cached[2]
            view = ray.get(self._controller.view.remote(version, 30.0))
            if view.version != version or view.meta is None:
                raise StaleMetadataError(f"node {self.node_id}: query planned on metadata version {version}, the "
                                         f"newest is {view.version}", view.version)
            cfg = view.config
            controller = self._controller

            def report(node: int, reason: str) -> None:
                try:
                    controller.report_failure.remote(node, f"seen by node {self.node_id}: {reason}")
                except Exception:
                    pass

            disp = Dispatcher(dict(view.actors), cfg.communication_timeout_ms / 1000.0, cfg.max_retries,
                              CommunicationCounters(), on_failure=report)
            disp.failed_nodes.update(view.failed)
            self._rounds_view = (version, RoutingTable(view.meta), disp)
            self._rounds_members = view.members
            return self._rounds_view[1], disp

    def set_routing(self, version: int, meta: Any, members: int, failed: frozenset[int]) -> None:
        """The metadata of ``version``, sent with the version itself (``set_meta_version``): keep its routing (the
        peers' handles stay, unless the node set changed: then the next query fetches the whole view). Saves a
        query arriving after a write the round trip to the controller."""
        cached = self._rounds_view
        if meta is None or cached is None or members != self._rounds_members or version <= cached[0]:
            return
        disp = cached[2]
        disp.failed_nodes.update(failed)
        self._rounds_view = (int(version), RoutingTable(meta), disp)

    @data_message(compress_result=True)
    def knn_batch(
        self, queries: np.ndarray, segments: list[Segment], k: int, version: int,
        allow_partial: bool = False, homeless: bool = False, presorted: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Exact k nearest neighbours of ``queries`` (whose home partitions, as ``segments`` name them, are held
        here), planned on metadata ``version``: ``(distances (m, k), ids (m, k), partitions left out)`` in the
        order of ``queries``. Partitions are left out only with ``allow_partial`` (lost on every replica).
        ``homeless``: the queries' home partitions are lost (a partial answer): no first round, every partition
        is searched (the answer is exact over the points still there). ``presorted``: ``segments`` are the home
        split of ``version`` with each segment's rows in curve order (the client sorted them: no sort here)."""
        self._check_version(version)
        routing, disp = self._rounds_at(version)
        if homeless:
            m = len(queries)
            dist, ids = np.full((m, k), np.inf), np.full((m, k), -1, dtype=np.int64)
            missing: list[int] = []
            self._followups(disp, routing, queries, dist, ids, np.full(m, np.inf), None, k, version,
                            missing if allow_partial else None)
            self._check_version(None, layout=version)  # as below
            return dist, ids, missing
        held = {p for p, _, _ in segments}
        missing_home = sorted(held - set(self.partitions))
        if missing_home:
            raise PartitionMovedError(f"node {self.node_id} does not hold partitions {missing_home}")
        if presorted or len(queries) <= SMALL_BATCH:
            return self._knn_small(disp, routing, queries, segments, k, version, allow_partial)
        keys = curve_keys(queries, routing.lo, routing.hi, routing.curve, routing.bits)
        order = np.argsort(keys)
        qs = np.take(queries, order, axis=0)
        home = knn_home(keys[order], routing)
        home_segments = [(int(p), int(a), int(b)) for p, a, b in zip(home.partitions, home.starts[:-1], home.starts[1:])]
        stray = sorted({p for p, _, _ in home_segments} - set(self.partitions))
        if stray:  # the client's split and this one disagree: they planned on different layouts
            raise StaleMetadataError(f"node {self.node_id}: queries of partitions {stray} are not held here "
                                     f"(version {version})", self.meta_version)
        dist, ids = self._knn_local(qs, None, home_segments, k)  # round 1: the home partitions
        kth = dist[:, k - 1].copy()
        home_part = np.repeat(home.partitions, np.diff(home.starts))
        missing = []
        self._followups(disp, routing, qs, dist, ids, kth, home_part, k, version, missing if allow_partial else None)
        # a split moves points between partition ids after raising layout_version: if one began while the
        # partitions held here were searched, this answer may miss points (the client plans again)
        self._check_version(None, layout=version)
        out_d = np.empty_like(dist)
        out_i = np.empty_like(ids)
        out_d[order] = dist
        out_i[order] = ids
        return out_d, out_i, missing

    def one_hop(self, request: bytes) -> bytes:
        """A few online queries in one pickled message (the one-hop path of :mod:`distspatial.client.fast_path`):
        ``("knn", queries, segments, k, version)`` answered as :meth:`knn_batch`, ``("ball", centers, radii,
        return_points, version)`` as :meth:`ball_batch`, ``("box", lo, hi, return_points, version)`` as
        :meth:`box_batch`; the answer pickled likewise. Small messages as one ``bytes`` object: Ray serializes
        each argument on its own and NumPy arrays as out-of-band buffers, which costs more than the query (a
        round trip ~0.45 ms shorter than the same tuple of arrays, ~0.3 ms more for separate arguments). Ray
        unpickles every message anyway: no new trust boundary."""
        req = pickle.loads(request)
        kind = req[0]
        if kind == "ping":  # a client checking a new channel (client.fast_path)
            return b""
        if kind == "knn":
            out = self.knn_batch(*req[1:])
        elif kind == "ball":
            _, centers, radii, return_points, version = req
            out = self.ball_batch(centers, radii, [], return_points, version)
        elif kind == "box":
            _, lo, hi, return_points, version = req
            out = self.box_batch(lo, hi, [], return_points, version)
        else:
            raise ValueError(f"unknown one-hop query kind {kind!r}; expected 'knn', 'ball' or 'box'")
        return pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)

    def _knn_small(self, disp: Dispatcher, routing: RoutingTable, queries: np.ndarray, segments: list[Segment],
                   k: int, version: int, allow_partial: bool) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """:meth:`knn_batch` answered in the client's ``segments``: the home split itself (computed on
        ``version``'s routing, which this node holds), so no curve keys, no sort and no scatter back. For a few
        queries (online ones, often one) and for a batch whose rows the client put in curve order."""
        dist, ids = self._knn_local(queries, None, segments, k)
        home_part = np.empty(len(queries), dtype=np.int64)
        for p, a, b in segments:
            home_part[a:b] = p
        missing: list[int] = []
        self._followups(disp, routing, queries, dist, ids, dist[:, k - 1].copy(), home_part, k, version,
                        missing if allow_partial else None)
        self._check_version(None, layout=version)  # as in knn_batch
        return dist, ids, missing

    def _followups(self, disp: Dispatcher, routing: RoutingTable, qs: np.ndarray, dist: np.ndarray, ids: np.ndarray,
                   kth: np.ndarray, home_part: np.ndarray | None, k: int, version: int,
                   missing: list[int] | None) -> None:
        """Round 2 of a kNN share: partitions closer than each query's k-th distance (``home_part`` excluded),
        the ones held here searched here, the rest on peers; merged into ``(dist, ids)`` in place."""
        follow = knn_followups(qs, kth, home_part, routing)
        if not follow.n_pairs:
            return
        groups = follow.groups()
        local = [p for p in groups if p in self.partitions]
        if local:
            rows, segs = stack_groups(groups, local)
            d_, i_ = self._knn_local(np.take(qs, rows, axis=0), kth[rows], segs, k)
            merge_candidates(dist, ids, rows, d_, i_, k)
        remote = [p for p in groups if p not in self.partitions]
        if remote:
            for rows, (d_, i_) in self._ask_peers(disp, routing, groups, remote, "knn", (qs, kth), {"k": k},
                                                  version, missing):
                merge_candidates(dist, ids, rows, d_, i_, k)

    @data_message(compress_result=True)
    def ball_batch(
        self, centers: np.ndarray, radii: np.ndarray, segments: list[Segment], return_points: bool, version: int,
        allow_partial: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[int]]:
        """Range search of a share of a batch (the balls whose centres' home partitions ``segments`` name),
        planned here on metadata ``version``: ``(counts (m,), ids, points or None, partitions left out)``, the
        hits of row i after those of rows < i, each row's sorted by id (the layout of ``ball``)."""
        self._check_version(version)
        routing, disp = self._rounds_at(version)
        assign = ball_pairs(centers, radii, routing)
        return self._hits_rounds(disp, routing, assign, "ball", (centers, radii), self._ball_local, return_points,
                                 version, allow_partial)

    @data_message(compress_result=True)
    def box_batch(
        self, lo: np.ndarray, hi: np.ndarray, segments: list[Segment], return_points: bool, version: int,
        allow_partial: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[int]]:
        """Box search of a share of a batch, planned here; the layout of :meth:`ball_batch`."""
        self._check_version(version)
        routing, disp = self._rounds_at(version)
        assign = box_pairs(lo, hi, routing)
        return self._hits_rounds(disp, routing, assign, "box", (lo, hi), self._box_local, return_points, version,
                                 allow_partial)

    def _hits_rounds(self, disp: Dispatcher, routing: RoutingTable, assign: Any, method: str,
                     row_arrays: tuple[np.ndarray, ...], local_fn: Any, return_points: bool, version: int,
                     allow_partial: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[int]]:
        """Run a hit-list query's pairs (partitions held here searched here, the rest on peers) and pack the hits
        per row, sorted by id."""
        m = assign.n_queries
        groups = assign.groups()
        missing: list[int] = []
        found: list[tuple[np.ndarray, tuple]] = []
        local = [p for p in groups if p in self.partitions]
        if local:
            rows, segs = stack_groups(groups, local)
            found.append((rows, local_fn(*(np.take(a, rows, axis=0) for a in row_arrays), segs, return_points)))
        remote = [p for p in groups if p not in self.partitions]
        if remote:
            found += self._ask_peers(disp, routing, groups, remote, method, row_arrays, {"return_points": return_points},
                                     version, missing if allow_partial else None)
        self._check_version(None, layout=version)  # a split during the local searches: plan again (as knn_batch)
        q_parts = [np.repeat(rows, res[0]) for rows, res in found]
        q_all = np.concatenate(q_parts) if q_parts else np.empty(0, np.int64)
        id_all = np.concatenate([res[1] for _, res in found]) if found else np.empty(0, np.int64)
        order = np.lexsort((id_all, q_all))
        pts = None
        if return_points:
            d = row_arrays[0].shape[1]
            pts = np.concatenate([res[2] for _, res in found])[order] if found else np.empty((0, d))
        return np.bincount(q_all, minlength=m).astype(np.int64), id_all[order], pts, missing

    def _ask_peers(self, disp: Dispatcher, routing: RoutingTable, groups: dict[int, np.ndarray], pids: list[int],
                   method: str, row_arrays: tuple[np.ndarray, ...], options: dict[str, Any], version: int,
                   missing: list[int] | None) -> list[tuple[np.ndarray, Any]]:
        """A later round on other nodes (``method`` over the rows of ``row_arrays`` in ``groups``): one message
        per peer in its ``peer`` group, failover to replicas; bytes counted as this node's."""
        compress = self.compress

        def build(node: int, part_ids: list[int]):
            rows, segs = stack_groups(groups, part_ids)
            args = encode_all(tuple(np.take(a, rows, axis=0) for a in row_arrays), compress)
            ref = getattr(disp.actors[node], method).options(concurrency_group=PEER_GROUP).remote(
                *args, segs, **options, layout=version)
            return ref, rows, message_bytes(args, segs, options, version)

        controller = self._controller

        def newest() -> RoutingTable:
            """A replica moved meanwhile (a migration keeps partition ids): the newest owners and node handles."""
            view = ray.get(controller.view.remote(0, 30.0))
            disp.actors.update(view.actors)
            disp.failed_nodes.update(view.failed)
            return RoutingTable(view.meta)

        comm = disp.comm = CommunicationCounters()
        try:
            return disp.run(pids, routing, build, newest, missing, balance=True)
        except RayTaskError as exc:  # a peer's own refusal: raise it as it is, for the client to handle
            cause = getattr(exc, "cause", None)
            if isinstance(cause, (StaleMetadataError, PartitionLostError)):
                raise cause from None
            raise
        finally:
            tot = comm.totals()
            with self._lock:
                self.counters["bytes_out"] += tot["bytes_sent"]
                self.counters["raw_bytes_out"] += tot["raw_bytes_sent"]
                self.counters["bytes_in"] += tot["bytes_received"]


class JoinWriterMixin:
    """Node-written results: each node reads its share of the query files and writes its part files.

    :meth:`join_shares` runs in the node's default concurrency group (it waits on other nodes' ``reads`` group,
    never the other way round). For each block of its queries it splits them by home partition and sends each
    part to a node holding it (itself included) as a ``knn_batch`` or ``ball_batch`` (which plan and merge the
    later rounds), and writes the answers as ``part-<node>-<n>.parquet``: a billion-row result never passes
    through one process. kNN: columns ``query`` (the row in input order), ``rank`` (1 = nearest), ``id``,
    ``distance``; range: ``query``, ``id``, ``distance``, sorted by query then id. Uses ``_rounds_at`` and the
    node's identity from :class:`QueryRoundsMixin`.
    """

    def join_shares(
        self, shares: list[Any], offsets: list[int], columns: Any, task: dict[str, Any], out_dir: str,
        version: int, block_rows: int = 250_000,
    ) -> dict[str, Any]:
        """Answer the queries of ``shares`` (query ids ``offsets[j] + row`` for share j) and write them under
        ``out_dir``. ``task``: ``{"kind": "knn", "k": k}`` or ``{"kind": "range", "radius": r}`` (``r`` a float,
        or ``None``: the last of ``columns`` is each query's radius, named ``task["radius_column"]``). Returns
        ``{"rows": queries answered, "files": [paths], "node": node id}``."""
        import pyarrow.parquet as pq

        from ..io.shares import read_share

        files: list[str] = []
        rows_done = 0
        knn = task["kind"] == "knn"
        geo = bool(task.get("geographic"))  # lon/lat rows in, great-circle metres out (radii in metres)
        for share, offset in zip(shares, offsets):
            q, _ = read_share(share, columns, None)
            radius = None if knn else self._share_radii(share, q, task)
            if radius is not None and task["radius"] is None:
                q = np.ascontiguousarray(q[:, :-1])
            dim = self._rounds_at_latest(version)[0].dim
            if geo:
                q = self._share_unit(share, q)
            if q.shape[1] != dim:
                raise ValueError(f"{share.describe()}: {q.shape[1]} coordinate columns, but the distributed data set "
                                 f"has {dim} (pick them with columns=...)")
            for b, a in enumerate(range(0, len(q), block_rows)):
                block = q[a:a + block_rows]
                if knn:
                    table, version = self._knn_part(block, offset + a, task["k"], version, geo)
                else:
                    table, version = self._range_part(block, radius[a:a + block_rows], offset + a, version, geo)
                # n = share * 10**4 + block: unique across nodes and across a share read again after a failure
                path = os.path.join(out_dir, f"part-{self.node_id:05d}-{share.index * 10_000 + b:09d}.parquet")
                pq.write_table(table, path)
                files.append(path)
                rows_done += len(block)
        return {"rows": rows_done, "files": files, "node": self.node_id}

    def count_shares(self, shares: list[Any], columns: Any) -> list[int]:
        """Rows of each share (read through: CSV and LAS files do not say without it)."""
        from ..io.shares import read_share

        return [share.n_rows if share.n_rows is not None else len(read_share(share, columns, None)[0])
                for share in shares]

    @staticmethod
    def _share_radii(share: Any, q: np.ndarray, task: dict[str, Any]) -> np.ndarray:
        """Each query's radius: the task's scalar, or the share's last column (checked >= 0: a clear error naming
        file, row and column)."""
        from ..io.files import DataFileError

        if task["radius"] is not None:
            return np.full(len(q), float(task["radius"]))
        r = np.ascontiguousarray(q[:, -1])
        bad = np.flatnonzero(r < 0)  # finite already (read_share)
        if len(bad):
            col = task.get("radius_column")
            row = share.row_start + int(bad[0])
            raise DataFileError(share.path, f"negative radius {r[bad[0]]!r} in row {row}, column {col!r}",
                                "every radius must be >= 0", row=row, column=col)
        return r

    @staticmethod
    def _share_unit(share: Any, q: np.ndarray) -> np.ndarray:
        """A share's longitude/latitude rows (a geographic data set) as unit vectors: checked (a clear error naming
        file and row: two columns, finite, |latitude| <= 90), longitudes wrapped into [-180, 180]."""
        from ..core.geo import check_lonlat, lonlat_to_unit
        from ..io.files import DataFileError

        if q.ndim != 2 or q.shape[1] != 2:
            raise DataFileError(share.path, f"{q.shape[1]} coordinate columns for a geographic data set",
                                "give two columns, longitude and latitude in degrees (pick them with columns=...)")
        bad = np.flatnonzero(~np.isfinite(q).all(axis=1) | (np.abs(q[:, 1]) > 90.0))
        if len(bad):
            row = share.row_start + int(bad[0])
            raise DataFileError(share.path, f"row {row}: longitude/latitude {q[bad[0]].tolist()} is not a valid "
                                f"position (latitude outside [-90, 90] or not finite)",
                                "columns are longitude, latitude in degrees (were they swapped?)", row=row)
        return lonlat_to_unit(check_lonlat(q, share.describe()))

    def _rounds_at_latest(self, version: int) -> tuple[RoutingTable, Dispatcher]:
        try:
            return self._rounds_at(version)
        except StaleMetadataError as exc:
            return self._rounds_at(int(exc.version))

    def _knn_part(self, q: np.ndarray, first: int, k: int, version: int, geo: bool = False) -> tuple[Any, int]:
        """One kNN part file's table (rank from 1, as the command line's tables) and the version answered on.
        ``geo``: ``q`` are unit vectors, distances written in great-circle metres."""
        import pyarrow as pa

        m = len(q)
        dist = np.full((m, k), np.inf)
        ids = np.full((m, k), -1, dtype=np.int64)
        found, version = self._by_home(q, (), "knn_batch", {"k": k, "presorted": True}, version)
        for rows, (d_, i_, _) in found:
            put_rows(dist, rows, d_)
            put_rows(ids, rows, i_)
        if geo:
            from ..core.geo import chord_to_metres

            dist = chord_to_metres(dist)
        return pa.table({
            "query": np.repeat(np.arange(first, first + m, dtype=np.int64), k),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), m),
            "id": ids.reshape(-1),
            "distance": dist.reshape(-1),
        }), version

    def _range_part(self, q: np.ndarray, radii: np.ndarray, first: int, version: int,
                    geo: bool = False) -> tuple[Any, int]:
        """One range part file's table (every point within each query's radius, sorted by query then id, with
        its distance) and the version answered on. ``geo``: ``q`` are unit vectors and ``radii`` metres: searched
        with chords a few ulps longer, kept where the great-circle metres are <= the radius, written in metres."""
        import pyarrow as pa

        if geo:
            from ..core.geo import chord_to_metres, metres_to_chord

            found, version = self._by_home(q, (metres_to_chord(radii),), "ball_batch", {"return_points": True},
                                           version)
        else:
            found, version = self._by_home(q, (radii,), "ball_batch", {"return_points": True}, version)
        rows = np.concatenate([np.repeat(r, res[0]) for r, res in found])
        ids = np.concatenate([res[1] for _, res in found])
        diff = np.concatenate([res[2] for _, res in found]) - np.take(q, rows, axis=0)
        if geo:  # the chord as the kNN kernels and the facade compute it: inclusive at a reported distance
            dist = chord_to_metres(np.sqrt(np.square(diff).sum(axis=1)))
            keep = dist <= radii[rows]
            rows, ids, dist = rows[keep], ids[keep], dist[keep]
        else:
            dist = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        order = np.lexsort((ids, rows))
        return pa.table({"query": rows[order] + first, "id": ids[order], "distance": dist[order]}), version

    def _by_home(self, q: np.ndarray, extra: tuple[np.ndarray, ...], method: str, options: dict[str, Any],
                 version: int) -> tuple[list[tuple[np.ndarray, Any]], int]:
        """Send the rows of ``q`` (and the same rows of ``extra``) to nodes of their home partitions, each
        partition's rows in curve order, as ``method`` calls (``knn_batch``, ``ball_batch``: they plan and merge the later rounds); re-planned on a newer version
        when the layout changed meanwhile. Returns ``([(rows, answer)], the version answered on)``."""
        for _ in range(100):
            try:
                routing, disp = self._rounds_at(version)
            except StaleMetadataError as exc:  # data or layout changed since the client's plan: the newest
                version = int(exc.version)
                continue
            keys = curve_keys(q, routing.lo, routing.hi, routing.curve, routing.bits)
            home = home_in_curve_order(keys, routing)
            groups = home.groups()

            def build(node: int, pids: list[int]):
                rows, segs = stack_groups(groups, pids)
                ref = getattr(disp.actors[node], method).options(concurrency_group="reads").remote(
                    *(np.take(a, rows, axis=0) for a in (q, *extra)), segs, **options, version=version)
                return ref, rows, 0

            try:
                return disp.run(list(groups), routing, build, None, None, balance=True), version
            except RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if not isinstance(cause, StaleMetadataError):
                    raise
                version = max(version + 1, int(cause.version))
        raise StaleMetadataError(f"node {self.node_id}: the layout kept changing during a block of a join", version)
