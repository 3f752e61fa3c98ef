"""Writes, run by the controller one at a time: load a data set, ingest, delete, update, split a partition.

**Distribute.** The client cuts the partitions (:func:`~distspatial.kernels.partitioning.partition_points`) and
puts each one into Ray's object store; the controller places them (:func:`~distspatial.control.placement.
place_partitions`), hands every owner node the object references (the node reads the arrays from the object
store and keeps a copy of its own), and only when every node has built its partitions publishes the metadata.
A large data set arrives in waves (:meth:`WritesMixin.begin_distribute`, :meth:`WritesMixin.stage_partitions`):
the object store then holds a wave or two at a time, not the whole set (its pages stay allocated afterwards).

**Ingest** (:func:`ingest`). Each point gets its curve key (points outside the original global bounds are
accepted: their keys are those of the nearest point of the bounds, which keeps routing and the planner's exact
cell test correct), goes to the partition whose key range holds the key, and every live replica of that
partition appends it in one message per node (``SpatialNode.append``). The batch is acknowledged (the call
returns) only after every replica has it and the metadata version whose partition sizes, boxes and key ranges
include the new points is published, every node told of it: every query started after the call returns, from
any client, sees the points. A node that fails during the call is marked failed (recovery re-replicates its
partitions); the batch still succeeds if every partition kept one replica.

**Idempotence.** Every write carries a token chosen by the client. Ids given to an ingest are recorded (and, in
a named cluster, stored) under its token before any node is asked, and the token is the batch id the nodes use
to ignore a replay: a write that Ray retries after a controller restart is applied once, with the same ids.

**Delete / update.** ``delete(ids)`` goes to every live node (each drops the ids it holds; deleted points are
masked until the next merge). ``update(ids, points)`` is a delete followed by an ingest under the same lock
(moving objects). After any of these, algorithm labels follow the ascending live ids (``point_ids()``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

import numpy as np
import ray

from ..core.curves import curve_keys, warm_compiled_kernels
from ..core.codec import message_bytes
from ..core.errors import NodeFailureError
from ..core.validation import check_ids, check_points
from ..node.dispatch import NODE_FAILURES
from .balancing import LoadBalancer
from ..core.metadata import GlobalIndexMetadata, PartitionInfo
from .placement import place_partitions
from .view import ClusterView

log = logging.getLogger(__name__)

__all__ = ["WritesMixin"]


class WritesMixin:
    """Writes of :class:`~distspatial.control.controller.ClusterController` (see module docstring); each runs
    under the controller's lock and ends with :meth:`publish`."""

    def _write_timeout(self) -> float:
        return max(30.0, self.config.communication_timeout_ms / 1000)

    def _place_new_dataset(self, n_parts: int) -> tuple[int, dict[int, tuple[int, ...]]]:
        """Owners of ``n_parts`` partitions of a new data set on the live nodes, and the data set's id."""
        live = self.live_node_ids
        owners = place_partitions(n_parts, live, min(self.config.replication_factor, len(live)), self.machines())
        self.dataset_counter += 1
        return self.dataset_counter, owners

    def _send_parts(self, dataset: int, owners: dict[int, tuple[int, ...]], items: list, node_args,
                    every_live_node: bool = False, method: str = "load_partitions", pid_of=int) -> None:
        """Load ``items`` of data set ``dataset`` onto their partitions' owners, all nodes at once: partition ids
        (``load_partitions``), or slices ``(pid, first row, end row, rows)`` with ``method="load_slices"`` and
        ``pid_of`` their partition. ``node_args(node, mine) -> (args, wire, raw)``: the node's arrays for its
        items. ``every_live_node``: live nodes owning none of them get an empty load (a node drops the previous
        data set's partitions on its first load of a new one). Raises when a node fails to load."""
        nodes = {n for it in items for n in owners[pid_of(it)]}
        if every_live_node:
            nodes |= set(self.live_node_ids)
        loads = []
        for node in sorted(nodes):
            mine = [it for it in items if node in owners[pid_of(it)]]
            args, wire, raw = node_args(node, mine)
            head = message_bytes(dataset, mine)
            self.comm.sent(node, int(wire) + head, int(raw) + head)
            loads.append((node, getattr(self.actors[node], method).remote(dataset, mine, *args)))
        for node, ref in loads:
            self.recv(node, ref)

    def _load_parts(self, n_parts: int, node_args) -> tuple[int, dict[int, tuple[int, ...]]]:
        """Place ``n_parts`` partitions on the live nodes and load them (``node_args(node, pids) -> (args, wire,
        raw)``); returns ``(data set id, owners)``. Raises when a node fails to load (nothing is published)."""
        dataset, owners = self._place_new_dataset(n_parts)
        self._send_parts(dataset, owners, list(range(n_parts)), node_args, every_live_node=True)
        return dataset, owners

    def _drop_dataset(self) -> None:
        """No data set (a load failed or began): publish the empty layout."""
        self.meta, self.routing = None, None
        self.publish(layout=True)

    def begin_distribute(self, n_parts: int, token: int) -> dict[int, tuple[int, ...]]:
        """Start a distribute that arrives in waves (:meth:`stage_partitions`, then :meth:`distribute` with
        ``staged``), so that the client's object store holds one or two waves at a time, not the whole
        data set. The previous data set is dropped now (every node frees it; nothing is published until the
        last wave). Returns each partition's owner nodes, for the client to put partitions of every node into
        each wave."""
        with self.lock:
            dataset, owners = self._place_new_dataset(int(n_parts))
            self._staged = None
            self._drop_dataset()
            try:
                self._send_parts(dataset, owners, [], lambda node, pids: ([], 0, 0), every_live_node=True)
            except Exception:
                self._drop_dataset()
                raise
            self._staged = {"token": token, "dataset": dataset, "owners": owners, "n_parts": int(n_parts),
                            "rows": {}, "totals": {}}
            return owners

    def _staged_load(self, token: int) -> dict:
        st = self._staged
        if st is None or st["token"] != token:
            raise RuntimeError("this distribute_data was interrupted (another load began, or the controller "
                               "restarted) and nothing of it was published; call distribute_data again")
        return st

    def stage_partitions(self, token: int, pieces: list[tuple[int, int, int, int]], refs: list[tuple],
                         sizes: list[tuple[int, int]]) -> int:
        """One wave of a distribute begun by :meth:`begin_distribute`: ``pieces`` of partitions, each
        ``(partition id, first row, end row, rows of the partition)`` with its ``(points_ref, ids_ref)`` and
        ``(wire, raw)`` bytes, onto the partitions' owners (a node builds a partition when its last piece
        arrives). Returns how many partitions are complete so far."""
        with self.lock:
            st = self._staged_load(token)
            self._send_staged(st, pieces, refs, sizes)
            return sum(1 for p, rows in st["rows"].items() if rows == st["totals"][p])

    def _send_staged(self, st: dict, pieces: list[tuple[int, int, int, int]], refs: list[tuple],
                     sizes: list[tuple[int, int]]) -> None:
        at = {tuple(pc): j for j, pc in enumerate(pieces)}

        def args(node: int, mine: list):
            js = [at[tuple(pc)] for pc in mine]
            wire, raw = np.sum([sizes[j] for j in js], axis=0)
            return [r for j in js for r in refs[j]], wire, raw

        try:
            self._send_parts(st["dataset"], st["owners"], pieces, args, method="load_slices",
                             pid_of=lambda pc: int(pc[0]))
        except Exception:
            self._staged = None
            self._drop_dataset()
            raise
        for pid, start, stop, total in pieces:
            st["totals"][int(pid)] = int(total)
            st["rows"][int(pid)] = st["rows"].get(int(pid), 0) + int(stop) - int(start)

    def distribute(
        self, layout: dict[str, Any], refs: list[tuple], sizes: list[tuple[int, int]],
        id_map: tuple[np.ndarray, np.ndarray] | None, mean_variance: float, token: int | None = None,
        staged: list[tuple[int, int, int, int]] | None = None,
    ) -> ClusterView:
        """Load a new data set cut by the client: ``layout`` (dim, lo, hi, curve, bits, per-partition key_lo,
        key_hi, box_lo, box_hi, counts, next_id), one ``(points_ref, ids_ref)`` per partition and its
        ``(wire, raw)`` bytes; ``id_map`` = (sorted user ids, row of each) or ``None``. Replaces any data set.

        ``staged``: the last wave of a load begun by :meth:`begin_distribute` (``token`` the same): ``refs`` and
        ``sizes`` are then those of the pieces ``staged`` (as in :meth:`stage_partitions`); every partition
        must be complete after it."""
        with self.lock:
            if token is not None and token in self.recent:
                return self.view(light=True)
            if staged is not None:
                st = self._staged_load(token)
                self._send_staged(st, staged, refs, sizes)
                n_parts, dataset, owners = st["n_parts"], st["dataset"], st["owners"]
                self._staged = None
                missing = [p for p in range(n_parts) if st["rows"].get(p, 0) != int(layout["counts"][p])]
                if missing:
                    self._drop_dataset()
                    raise RuntimeError(f"distribute_data: {len(missing)} of {n_parts} partitions did not arrive "
                                       "whole; nothing was published")
            else:
                n_parts = len(refs)

                def args(node: int, pids: list[int]):
                    wire, raw = np.sum([sizes[p] for p in pids], axis=0) if pids else (0, 0)
                    return [r for p in pids for r in refs[p]], wire, raw

                try:
                    dataset, owners = self._load_parts(n_parts, args)
                except Exception:
                    self._drop_dataset()
                    raise
            d = int(layout["dim"])
            counts = layout["counts"]
            parts = tuple(
                PartitionInfo(partition_id=p, key_lo=int(layout["key_lo"][p]), key_hi=int(layout["key_hi"][p]),
                              lo=np.asarray(layout["box_lo"][p]).copy(), hi=np.asarray(layout["box_hi"][p]).copy(),
                              size=int(counts[p]), nbytes=int(counts[p]) * (d * 8 + 8), owners=owners[p])
                for p in range(n_parts)
            )
            meta = GlobalIndexMetadata(dim=d, lo=layout["lo"], hi=layout["hi"], curve=layout["curve"],
                                       bits=layout["bits"], partitions=parts, version=self.version + 1, dataset_id=dataset,
                                       crs=layout.get("crs"), geographic=bool(layout.get("geographic", False)))
            self.modified, self.next_id = False, int(layout["next_id"])
            self.has_user_ids = id_map is not None
            self.id_sorted, self.id_rows = id_map if id_map is not None else (None, None)
            self.mean_variance = float(mean_variance)
            self.store_id_map()
            self.remember(token, "distributed")
            self.publish(meta, layout=True)
            log.info("distspatial: distributed %d points in %d partitions", meta.n_points, n_parts)
            return self.view(light=True)

    def begin_chunked(
        self, d: int, lo: np.ndarray, hi: np.ndarray, bits: int, key_lo: np.ndarray,
        key_hi: np.ndarray, mean_variance: float, has_user_ids: bool, crs: str | None = None,
        geographic: bool = False,
    ) -> ClusterView:
        """Start a chunked load: empty partitions with the given curve-key ranges (cut by the client from a key
        sample) on the nodes, published; the chunks then arrive by :func:`ingest`."""
        with self.lock:
            n_parts = len(key_lo)
            empty_pts, empty_ids = np.empty((0, d)), np.empty(0, np.int64)
            dataset, owners = self._load_parts(
                n_parts, lambda node, pids: ([a for _ in pids for a in (empty_pts, empty_ids)], 0, 0))
            parts = tuple(PartitionInfo(p, int(key_lo[p]), int(max(key_lo[p], key_hi[p])), np.full(d, np.inf),
                                        np.full(d, -np.inf), 0, 0, owners[p]) for p in range(n_parts))
            self.id_sorted = self.id_rows = None
            self.has_user_ids = has_user_ids
            self.next_id, self.modified = 0, False
            self.mean_variance = float(mean_variance)
            self.publish(GlobalIndexMetadata(dim=d, lo=lo, hi=hi, curve=self.config.curve, bits=bits, partitions=parts,
                                            version=self.version + 1, dataset_id=dataset, crs=crs,
                                            geographic=bool(geographic)), layout=True)
            return self.view(light=True)

    def end_chunked(self, user_ids: bool, rows: int) -> ClusterView:
        """Finish a chunked load: without user ids the ids are the source's rows, exactly as ``distribute_data``
        would number them; with them, algorithm labels follow the ascending ids, as after any ingest."""
        with self.lock:
            self.has_user_ids = self.modified = bool(user_ids)
            if not user_ids:
                self.next_id = int(rows)
            self.publish()
            return self.view(light=True)

    def ingest(
        self, points: Any, ids: Any = None, timestamps: Any = None,
        centers: np.ndarray | None = None, token: int | None = None,
    ) -> tuple[np.ndarray, Any, ClusterView]:
        """Append a batch; returns ``(ids, streaming k-means stats or None, view)``. See the module docstring."""
        if not self._kernels_warm:  # the first ingest: load the key kernels beside it
            self._kernels_warm = True
            threading.Thread(target=warm_compiled_kernels, daemon=True, name="warm-curve-kernels").start()
        with self.lock:
            meta = self.require_data()
            pts = check_points(points)
            n, d = pts.shape
            if d != meta.dim:
                raise ValueError(f"points have {d} columns but the distributed data set has {meta.dim}")
            done = self.recent.get(token) if token is not None else None
            if isinstance(done, tuple) and done[0] == "acked":  # a retry of a batch already acknowledged
                return self._ids_of(done, ids), None, self.view(light=True)
            if ids is None:
                if self.has_user_ids:
                    raise ValueError("this data set was distributed with user ids: pass ids for the new points")
                first = done[1] if isinstance(done, tuple) else self.next_id  # a retry keeps the ids it was given
                ids = np.arange(first, first + n, dtype=np.int64)
                record = ("pending", first, n)
            else:
                ids = check_ids(ids, n)
                record = ("pending", None, n)
            self.next_id = max(self.next_id, int(ids.max()) + 1)
            if token is not None and done is None:
                self.remember(token, record)
                self._persist()  # the ids are stored before any node sees the batch
            batch = token if token is not None else int(np.random.default_rng().integers(1 << 62))
            stats = self._append(meta, pts, ids, batch, centers)
            self.modified = True
            self.remember(token, ("acked",) + record[1:])
            self._split_grown_partitions()
            return ids, stats, self.view(light=True)

    @staticmethod
    def _ids_of(record: tuple, ids: Any) -> np.ndarray:
        if record[1] is None:
            return check_ids(ids, record[2])
        return np.arange(record[1], record[1] + record[2], dtype=np.int64)

    def _append(self, meta: GlobalIndexMetadata, pts: np.ndarray, ids: np.ndarray, batch: int,
                centers: np.ndarray | None) -> Any:
        """Route a batch by curve key, append it on every live replica, publish the grown metadata."""
        n, d = pts.shape
        # quantization clamps to the bounds: a point outside them gets the key of the nearest point of the bounds
        keys = curve_keys(pts, meta.lo, meta.hi, meta.curve, meta.bits)
        home = self.routing.home_partitions(keys)
        # partition numbers as the narrowest unsigned type: numpy sorts those with a radix sort (~9x faster)
        order = np.argsort(home.astype(np.min_scalar_type(max(1, meta.n_partitions - 1))), kind="stable")
        home_s = home[order]
        pts_s, ids_s, keys_s = np.take(pts, order, axis=0), ids[order], keys[order]
        parts, starts = np.unique(home_s, return_index=True)
        bounds = np.append(starts, n)
        seg_of = {int(p): (int(a), int(b)) for p, a, b in zip(parts, bounds[:-1], bounds[1:])}
        failed = self.dispatch.failed_nodes
        by_node: dict[int, list[int]] = {}
        for p in seg_of:
            for o in meta.partitions[p].owners:
                if o not in failed:
                    by_node.setdefault(o, []).append(p)
        stat_node: dict[int, int] = {}  # streaming k-means: each partition's new points are counted by one replica
        for node, pids in by_node.items():
            for p in pids:
                stat_node.setdefault(p, node)
        # one message per machine: the rows of the partitions its nodes hold, put in the object store once; each
        # node there gets the same references and the segments of its own partitions, read from shared memory
        # (one copy per machine, not per node; the controller owns the objects, so a client that dies meanwhile
        # takes nothing with it)
        machine_of = self.machines()
        by_machine: dict[str, list[int]] = {}
        for node in by_node:
            by_machine.setdefault(machine_of.get(node, str(node)), []).append(node)
        calls = []
        for nodes in by_machine.values():
            pids = sorted({p for node in nodes for p in by_node[node]})
            if len(pids) == len(seg_of):  # every partition of the batch: the sorted batch as it is
                pack_pts, pack_ids, at = pts_s, ids_s, {p: seg_of[p] for p in pids}
            else:
                rows = np.concatenate([np.arange(*seg_of[p]) for p in pids])
                lens = np.cumsum([0] + [seg_of[p][1] - seg_of[p][0] for p in pids])
                pack_pts, pack_ids = np.take(pts_s, rows, axis=0), ids_s[rows]
                at = {p: (int(lens[j]), int(lens[j + 1])) for j, p in enumerate(pids)}
            pack = (ray.put(pack_pts), ray.put(pack_ids)) if len(nodes) > 1 else (pack_pts, pack_ids)
            for node in nodes:
                segments = [(p, *at[p]) for p in by_node[node]]
                mine = [p for p in by_node[node] if stat_node[p] == node] if centers is not None else None
                self.comm.sent(node, message_bytes(batch, pack_pts, pack_ids, segments, centers, mine))
                calls.append((node, self.actor(node).append.remote(batch, *pack, segments, centers, mine)))
        applied: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
        stats = None
        for node, ref in calls:
            try:
                res, st = self.recv(node, ref, timeout=self._write_timeout())
            except NODE_FAILURES as exc:
                self.dispatch.mark_failed(node, f"ingest: {type(exc).__name__}")
                continue
            for pid, size, blo, bhi in res:
                applied[pid] = (size, blo, bhi)
            if st is not None:
                stats = st if stats is None else (stats[0] + st[0], stats[1] + st[1])
        lost = sorted(set(seg_of) - set(applied))
        if lost:
            raise NodeFailureError(f"ingest batch reached no replica of partitions {lost} (failed nodes: "
                                   f"{sorted(self.dispatch.failed_nodes)}); the batch is not acknowledged. Retrying "
                                   "the call (same ids) after recovery applies it once")
        self.data_changed(applied)
        new_parts = list(meta.partitions)
        for pid, (size, blo, bhi) in applied.items():
            a, b = seg_of[pid]
            p = meta.partitions[pid]
            new_parts[pid] = dataclasses.replace(
                p, size=int(size), nbytes=int(size) * (8 * d + 8), lo=np.minimum(p.lo, blo), hi=np.maximum(p.hi, bhi),
                key_lo=min(p.key_lo, int(keys_s[a:b].min())), key_hi=max(p.key_hi, int(keys_s[a:b].max())),
            )
        # the nodes learn the new version only now, when every replica has the batch: a query that a node refused
        # meanwhile would wait for the slowest replica's append (p99 during ingest ~2x)
        self.publish(dataclasses.replace(meta, partitions=tuple(new_parts)))
        return stats

    def delete(self, ids: Any, token: int | None = None) -> tuple[int, ClusterView]:
        """Delete points by id from every replica; returns ``(how many distinct points were deleted, view)``."""
        arr = np.unique(np.asarray(ids).astype(np.int64, copy=False).ravel())
        with self.lock:
            meta = self.require_data()
            if token is not None and token in self.recent:
                return int(self.recent[token][1]), self.view(light=True)
            if len(arr) == 0:
                return 0, self.view(light=True)
            refs = [(n, self.send(n, "delete", arr)) for n in self.live_node_ids]
            sizes: dict[int, int] = {}
            deleted: dict[int, int] = {}
            for node, ref in refs:
                try:
                    res = self.recv(node, ref, timeout=self._write_timeout())
                except NODE_FAILURES as exc:
                    self.dispatch.mark_failed(node, f"delete: {type(exc).__name__}")
                    continue
                for pid, n_del, size in res:
                    deleted[pid] = max(deleted.get(pid, 0), n_del)  # replicas report the same partition
                    sizes[pid] = size
            n = int(sum(deleted.values()))
            self.remember(token, ("deleted", n))
            if deleted:
                self.data_changed(deleted)
                parts = [dataclasses.replace(p, size=sizes[p.partition_id],
                                             nbytes=sizes[p.partition_id] * (8 * meta.dim + 8))
                         if p.partition_id in sizes else p for p in meta.partitions]
                self.modified = True
                self.publish(dataclasses.replace(meta, partitions=tuple(parts)))
            return n, self.view(light=True)

    def update(
        self, ids: Any, points: Any, timestamps: Any = None, centers: np.ndarray | None = None,
        token: int | None = None,
    ) -> tuple[int, np.ndarray, Any, ClusterView]:
        """Move points: delete ``ids`` and ingest them at ``points`` under one lock; returns ``(how many of the ids
        existed, ids, streaming k-means stats or None, view)``."""
        arr = check_ids(ids, len(np.asarray(ids)))
        pts = check_points(points)
        if len(pts) != len(arr):
            raise ValueError(f"update needs one point per id: {len(arr)} ids, {len(pts)} points")
        with self.lock:
            done = self.recent.get(("update", token)) if token is not None else None
            if done is not None:  # a retry of an update already applied: moving the points again would delete them
                existed = done
                new_ids, stats, view = self.ingest(pts, arr, timestamps, centers, token)
                return existed, new_ids, stats, view
            existed, _ = self.delete(arr)
            self.remember(None if token is None else ("update", token), existed)
            new_ids, stats, view = self.ingest(pts, arr, timestamps, centers, token)
        return existed, new_ids, stats, view

    def _split_grown_partitions(self) -> None:
        """Split partitions that ingest made too large (``tuning_policy``), a bounded number per call."""
        # the size rule of the balancer's tuning policy (no query counts: only "too large" splits come out)
        actions = LoadBalancer.tune(self.meta, {}, len(self.live_node_ids), self.config.replication_factor,
                                    self.tuning_policy)
        for a in actions:
            try:
                self.split_partition(a.partition)
            except (ValueError, NodeFailureError) as exc:
                log.warning("distspatial: split of grown partition %d skipped: %s", a.partition, exc)

    def split_partition(self, partition_id: int) -> int:
        """Split a partition at its curve-key median into two (same owners); returns the new partition's id.

        The nodes are first told the coming version, so a query planned on the current layout is refused and
        planned again on the split one (nodes split before the metadata with both halves is published)."""
        with self.lock:
            meta = self.require_data()
            if isinstance(partition_id, bool) or not isinstance(partition_id, (int, np.integer)) or \
                    not 0 <= partition_id < meta.n_partitions:
                raise ValueError(f"partition_id must be in [0, {meta.n_partitions}), got {partition_id!r}")
            part = meta.partitions[partition_id]
            if part.size < 2:
                raise ValueError(f"partition {partition_id} has {part.size} point(s); nothing to split")
            new_id = meta.n_partitions
            owners = [o for o in part.owners if o not in self.dispatch.failed_nodes]
            self.tell_nodes(self.version + 1, layout=True)
            published = False
            try:
                pid = int(partition_id)
                refs = [self.actors[o].split_partition.remote(pid, new_id, meta.lo, meta.hi, meta.curve, meta.bits)
                        for o in owners]
                import ray

                results = ray.get(refs)
                (klo0, khi0, blo0, bhi0, n0), (klo1, khi1, blo1, bhi1, n1) = results[0]
                if not all(r[0][4] == n0 and r[1][4] == n1 for r in results):
                    raise NodeFailureError(f"replicas of partition {pid} split differently")
                per_point = part.nbytes // max(1, part.size)
                first = dataclasses.replace(part, key_lo=klo0, key_hi=khi0, lo=blo0, hi=bhi0, size=n0,
                                            nbytes=n0 * per_point, owners=tuple(owners))
                second = PartitionInfo(new_id, klo1, khi1, blo1, bhi1, n1, n1 * per_point, tuple(owners))
                parts = list(meta.partitions)
                parts[pid] = first
                parts.append(second)
                self.data_changed([pid, new_id])
                self.publish(dataclasses.replace(meta, partitions=tuple(parts)), layout=True)
                published = True
            finally:
                if not published:  # the nodes were told a version: make it exist (nothing changed)
                    self.publish(layout=True)
            log.info("distspatial: split partition %d -> %d + %d points (new id %d)", pid, n0, n1, new_id)
            return new_id
