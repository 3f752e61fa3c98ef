"""Parallel load of point files by the nodes: :meth:`LoadingMixin.distribute_files` of the controller.

The controller only plans and reduces; every point is read by one node and travels once, node to node:

1. **Plan** (:func:`~distspatial.io.shares.plan_shares`, metadata only): the source's files in input order, cut
   into shares (Parquet row groups, ``.npy`` row ranges, CSV and LAS files); shares are dealt to the live nodes
   balanced by bytes (largest first to the least loaded).
2. **Stage** (``SpatialNode.stage_shares``): every node reads its shares in parallel and answers a summary: rows
   per share, bounds, mean and squared deviations, largest id, a uniform sample. The controller merges them:
   global bounds, point count, variance, a uniform sample of ``sample_size`` points, and cuts the partitions at
   the sample's curve-key quantiles exactly as ``distribute_chunks`` does (repeated cut keys merged, so no
   partition is empty). Without an id column the ids are the input row numbers: share ``i``'s rows start at the
   sum of the rows of shares ``0..i-1``, exactly as ``distribute_data`` of the concatenated input numbers them.
3. **Shuffle** (``SpatialNode.shuffle_staged``): every node computes its points' curve keys and partitions and
   leaves one object per partition in Ray's object store; with an id column, also one object of ids per node,
   which checks them for duplicates (``check_unique_ids``: ids hashed to nodes, so no process sees all ids).
4. **Load** (``SpatialNode.load_pieces``): each owner (replicas as configured, :func:`~distspatial.control.
   placement.place_partitions`) receives its partitions' pieces straight from the nodes that shuffled them and
   builds them; then the metadata is published once.

**Failures.** A bad file (missing, a corrupt row, a non-numeric or non-finite value, mixed dimensions), duplicate
ids or a node dying while reading or shuffling: the error is raised (naming the file, row and column, or the
node and its host) and every node drops what it staged; the previous data set was not touched and still
answers. A failure while the owners build their partitions (step 4, after they dropped the previous data set)
leaves no data set, as a failed ``distribute_data`` does. Never a half-published one.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray

from ..core.curves import curve_keys, default_bits
from ..core.errors import NodeFailureError
from ..io.shares import Share, check_same_columns, plan_shares, share_columns
from ..node.dispatch import NODE_FAILURES
from ..core.metadata import GlobalIndexMetadata, PartitionInfo
from .placement import place_partitions
from .view import ClusterView

log = logging.getLogger(__name__)

__all__ = ["LoadingMixin", "assign_shares", "cut_at_sample_quantiles"]

#: shares planned per live node (more than one, so that bytes balance over nodes)
SHARES_PER_NODE = 4


def assign_shares(shares: list[Share], nodes: list[int]) -> dict[int, list[Share]]:
    """Deal ``shares`` to ``nodes`` balanced by bytes: largest first, each to the node with the fewest bytes so far
    (lowest id on ties); each node's shares in input order. Deterministic.

    >>> from distspatial.io.shares import Share
    >>> out = assign_shares([Share(i, f"f{i}", "csv", nbytes=b) for i, b in enumerate([5, 3, 3, 1])], [0, 1])
    >>> {n: [s.index for s in ss] for n, ss in out.items()}
    {0: [0, 3], 1: [1, 2]}
    """
    load = {n: 0 for n in nodes}
    out: dict[int, list[Share]] = {n: [] for n in nodes}
    for s in sorted(shares, key=lambda s: (-s.nbytes, s.index)):
        node = min(nodes, key=lambda n: (load[n], n))
        out[node].append(s)
        load[node] += max(1, s.nbytes)
    return {n: sorted(ss, key=lambda s: s.index) for n, ss in out.items()}


def cut_at_sample_quantiles(sample_keys: np.ndarray, n_partitions: int) -> np.ndarray:
    """Partition cuts (uint64, ascending, distinct): partition ``p`` holds keys in ``[cuts[p-1], cuts[p])``. Cut at
    the sorted sample keys' quantiles as ``distribute_chunks`` does; repeated cuts (duplicate-heavy data) and a
    cut at the smallest key are dropped, so every partition holds at least the sample point at its cut.

    >>> cut_at_sample_quantiles(np.array([5, 1, 1, 1, 9, 7], dtype=np.uint64), 3).tolist()  # sorted: 1 1 1 5 7 9
    [7]
    """
    keys = np.sort(np.asarray(sample_keys, dtype=np.uint64))
    p = max(1, min(int(n_partitions), len(keys)))
    if p == 1:
        return np.empty(0, np.uint64)
    bounds = keys[(np.arange(1, p) * len(keys)) // p]
    bounds = np.unique(bounds)
    return bounds[bounds > keys[0]]


class LoadingMixin:
    """``distribute_files`` of :class:`~distspatial.control.controller.ClusterController` (module docstring)."""

    def _drop_staged(self, nodes: list[int], load_id: int) -> None:
        """Every node forgets what it staged for ``load_id`` (run after its calls in flight: one actor, in order)."""
        refs = []
        for n in nodes:
            if n in self.dispatch.failed_nodes:
                continue
            try:
                refs.append(self.actors[n].drop_load.remote(load_id))
            except Exception:  # pragma: no cover - a dead actor handle
                pass
        if refs:
            try:
                ray.wait(refs, num_returns=len(refs), timeout=5.0)
            except Exception:  # pragma: no cover
                pass

    def _gather(self, calls: dict[int, Any], what: str, count: bool = True) -> dict[int, Any]:
        """Results of one call per node, the first failure raised as soon as it happens: a node that died is
        marked failed and reported as :class:`NodeFailureError`; an error of the node's work (a bad file) as is."""
        pending = {ref: node for node, ref in calls.items()}
        out: dict[int, Any] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                node = pending.pop(ref)
                try:
                    out[node] = self.recv(node, ref) if count else ray.get(ref)
                except NODE_FAILURES as exc:
                    self.dispatch.mark_failed(node, f"parallel load: {type(exc).__name__}")
                    info = self.node_info.get(node, {})
                    raise NodeFailureError(
                        f"node {node} on host {info.get('host', '?')} failed while {what} "
                        f"({type(exc).__name__}); the load is abandoned and nothing was published") from None
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, Exception):
                        raise cause from None
                    raise
        return out

    def distribute_files(
        self, source: Any, columns: Any = None, id_column: str | None = None, sample_size: int = 200_000,
        seed: int = 0, token: int | None = None, crs: str | None = None, geographic: bool = False,
    ) -> ClusterView:
        """Load the point files of ``source`` onto the nodes, each node reading its own shares (module
        docstring); replaces the data set. Returns the light view of the new version.

        ``source``: a file, directory, glob, list of them or pyarrow URI, as every node sees it (absolute local
        paths: the client resolves relative ones). Raises ``DataFileError`` (a ``ValueError``) for bad input,
        :class:`NodeFailureError` when a node dies, ``ValueError`` for duplicate ids or no points."""
        sample_size = int(sample_size)
        if sample_size < 1:
            raise ValueError(f"sample_size must be >= 1, got {sample_size}")
        with self.lock:
            if token is not None and token in self.recent:
                return self.view(light=True)
            live = self.live_node_ids
            if not live:
                raise NodeFailureError("no live node to load the files")
            shares = plan_shares(source, SHARES_PER_NODE * len(live), columns, id_column)
            if not shares:
                raise ValueError(f"{source!r} holds no points (every file is empty)")
            by_node = {n: ss for n, ss in assign_shares(shares, live).items()}
            load_id = int(np.random.default_rng().integers(1, 1 << 62))
            loading = False  # owners began replacing their partitions: a failure then leaves no data set
            try:
                load = self._stage(load_id, live, shares, by_node, columns, id_column, sample_size, seed,
                                   crs, geographic)
                loading = True
                meta, state = load()
            except BaseException:
                self._drop_staged(live, load_id)
                if loading:
                    self.meta, self.routing = None, None
                    self.publish(layout=True)
                elif any(n in self.dispatch.failed_nodes for n in live):
                    self.publish()  # views learn of the failed node; the previous data set stays
                raise
            self.modified, self.next_id = state["modified"], state["next_id"]
            self.has_user_ids = state["has_user_ids"]
            self.id_sorted = self.id_rows = None
            self.mean_variance = state["mean_variance"]
            self.remember(token, "distributed")
            self.publish(meta, layout=True)
            self.last_file_load = state["report"]
            log.info("distspatial: loaded %d points from %d shares in %d partitions", meta.n_points, len(shares),
                     meta.n_partitions)
            return self.view(light=True)

    def _stage(self, load_id: int, live: list[int], shares: list[Share], by_node: dict[int, list[Share]],
               columns: Any, id_column: str | None, sample_size: int, seed: int, crs: str | None = None,
               geographic: bool = False):
        """Stage, merge, cut, shuffle, check ids; returns a function that runs the load step (owners replace
        their partitions) and returns ``(metadata, state)``. Everything before it leaves the data set as it was."""
        # -- stage -------------------------------------------------------------------------------------------------
        calls = {n: self.send(n, "stage_shares", load_id, by_node[n], columns, id_column, sample_size, int(seed),
                              bool(geographic)) for n in live}
        summ = self._gather(calls, "reading its shares of the input")
        counts = np.zeros(len(shares), np.int64)
        dims: dict[int, tuple[int, str]] = {}
        read_by: dict[int, int] = {}
        for node, s in summ.items():
            for index, rows, dim, path in s["shares"]:
                counts[index] = rows
                read_by[index] = node
                if rows:
                    dims[index] = (dim, path)
        if len(read_by) != len(shares):  # pragma: no cover - a node answered for fewer shares than it was given
            raise RuntimeError(f"shares {sorted(set(range(len(shares))) - set(read_by))} were not read")
        if len({d for d, _ in dims.values()}) > 1:
            first = dims[min(dims)]
            other = next(v for _, v in sorted(dims.items()) if v[0] != first[0])
            check_same_columns([(p, share_columns(p, columns, id_column)) for _, p in (first, other)])
        n = int(counts.sum())
        if n == 0:
            raise ValueError("the input holds no points")
        parts = [s for s in summ.values() if s["n"]]
        d = int(parts[0]["dim"])
        lo = np.min([s["lo"] for s in parts], axis=0)
        hi = np.max([s["hi"] for s in parts], axis=0)
        tot, mean, m2 = 0, np.zeros(d), np.zeros(d)
        for s in parts:  # Chan et al.: merge means and squared deviations
            m = s["n"]
            delta = s["mean"] - mean
            new = tot + m
            mean = mean + delta * (m / new)
            m2 = m2 + s["m2"] + delta * delta * (tot * m / new)
            tot = new
        mean_variance = float(np.mean(m2 / n))
        prio = np.concatenate([s["sample_prio"] for s in parts])
        sample = np.concatenate([s["sample"] for s in parts])
        if len(prio) > sample_size:
            keep = np.argpartition(prio, sample_size)[:sample_size]
            sample = np.take(sample, keep, axis=0)
        curve, bits = self.config.curve, default_bits(d)
        cuts = cut_at_sample_quantiles(curve_keys(sample, lo, hi, curve, bits), min(self.config.partition_count, n))
        n_parts = len(cuts) + 1
        # -- shuffle -----------------------------------------------------------------------------------------------
        user_ids = id_column is not None
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        n_buckets = len(live) if user_ids else 0
        n_out = n_parts + n_buckets + 1
        pieces: dict[int, list] = {}
        status = {}
        for node in live:
            mine = None if user_ids else {s.index: int(offsets[s.index]) for s in by_node[node]}
            refs = self.send_multi(node, "shuffle_staged", n_out, load_id, lo, hi, curve, bits, cuts, mine,
                                   n_buckets)
            pieces[node], status[node] = refs[:-1], refs[-1]
        sizes = self._gather(status, "splitting its points by partition")
        part_sizes = np.sum([sizes[nd] for nd in live], axis=0)
        if user_ids:
            checks = {b_node: self.actors[b_node].check_unique_ids.remote(*[pieces[src][n_parts + b] for src in live])
                      for b, b_node in enumerate(live)}
            dups = self._gather(checks, "checking the ids for duplicates", count=False)
            n_dup = sum(v[0] for v in dups.values())
            if n_dup:
                examples = sorted({x for v in dups.values() for x in v[1]})[:5]
                raise ValueError(f"id column {id_column!r} holds {n_dup} repeated id(s), e.g. {examples}: ids must be "
                                 "unique; nothing was loaded")

        def load() -> tuple[GlobalIndexMetadata, dict]:
            owners = place_partitions(n_parts, live, min(self.config.replication_factor, len(live)), self.machines())
            self.dataset_counter += 1
            dataset = self.dataset_counter
            calls = {}
            for node in live:
                pids = [p for p in range(n_parts) if node in owners[p]]
                args = [pieces[src][p] for p in pids for src in live]
                self.comm.sent(node, 8 * (len(pids) + 3))
                calls[node] = self.actors[node].load_pieces.remote(dataset, pids, len(live), *args)
            built = self._gather(calls, "building its partitions")
            info: dict[int, tuple] = {}
            for node, rows in built.items():
                for pid, size, klo, khi, blo, bhi in rows:
                    if size != part_sizes[pid]:
                        raise RuntimeError(f"partition {pid} has {size} points on node {node}, {part_sizes[pid]} "
                                           "were shuffled to it")
                    info[pid] = (size, klo, khi, blo, bhi)
            parts_info = tuple(
                PartitionInfo(partition_id=p, key_lo=int(info[p][1]), key_hi=int(info[p][2]),
                              lo=np.asarray(info[p][3], dtype=np.float64), hi=np.asarray(info[p][4], dtype=np.float64),
                              size=int(info[p][0]), nbytes=int(info[p][0]) * (d * 8 + 8), owners=owners[p])
                for p in range(n_parts))
            meta = GlobalIndexMetadata(dim=d, lo=lo, hi=hi, curve=curve, bits=bits, partitions=parts_info,
                                       version=self.version + 1, dataset_id=dataset, crs=crs,
                                       geographic=bool(geographic))
            id_max = max((s["id_max"] for s in parts if s["id_max"] is not None), default=n - 1)
            state = {"modified": user_ids, "has_user_ids": user_ids, "mean_variance": mean_variance,
                     "next_id": int(id_max) + 1 if user_ids else n,
                     "report": {"shares": [(s.index, s.describe(), read_by[s.index], int(counts[s.index]))
                                           for s in shares], "n": n}}
            return meta, state

        return load

    def file_load_report(self) -> dict[str, Any]:
        """The latest ``distribute_files``: ``{"shares": [(index, share, node that read it, rows)], "n"}``."""
        return dict(getattr(self, "last_file_load", {}) or {})
