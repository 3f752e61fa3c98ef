"""A node's side of a parallel file load (``DistributedSpatialCluster.distribute_files``).

The controller runs three rounds; every point is read by exactly one node and travels once, node to node:

1. :meth:`LoadingMixin.stage_shares`: read this node's shares of the input (:func:`~distspatial.io.shares.
   read_share`), keep them here ("staged", under the load's id) and answer a small summary: rows per share, the
   bounds, mean and sum of squared deviations (for the variance), the largest id, and a uniform sample of at most
   ``sample_size`` points (each share's points draw random priorities from a generator seeded by
   ``(seed, share index)``; the smallest priorities are kept, so the merged sample does not depend on which node
   read which share).
2. :meth:`LoadingMixin.shuffle_staged`: curve keys over the global bounds, each point's partition (the key cuts
   the controller took at the merged sample's key quantiles), ids (the input row numbers, from the share row
   offsets the controller derived from the counts, or the id column), and **one result per partition** (Ray
   ``num_returns``): the ``(points, ids, keys)`` of the staged points that fall in it. With user ids, one more
   result per node: the ids whose hash lands on that node (the duplicate check, :meth:`check_unique_ids`).
   The controller passes these references on to the partitions' owners; the data never passes through it.
3. :meth:`LoadingMixin.load_pieces`: an owner receives its partitions' pieces from every node, orders each
   partition's points by curve key and builds it (``SpatialNode._load``, as ``load_partitions``).

Staged data is dropped once shuffled, and by :meth:`drop_load` when the load fails or is abandoned. Errors say
which node on which host failed to read which file (on several machines every node must reach the files).
"""

from __future__ import annotations

import socket
from typing import Any

import numpy as np

from ..io.common import redact_uri
from ..io.files import DataFileError
from ..core.crs import to_unit
from ..core.curves import sort_keys
from ..io.shares import Share, check_same_columns, read_share, share_columns

__all__ = ["LoadingMixin", "id_bucket"]


def id_bucket(ids: np.ndarray, n: int) -> np.ndarray:
    """The node (``0 <= b < n``) that checks each id for duplicates: a multiplicative hash, so ids in ranges
    spread evenly."""
    with np.errstate(over="ignore"):
        h = ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((h >> np.uint64(32)) % np.uint64(max(1, n))).astype(np.int64)


class LoadingMixin:
    """The loading rounds of :class:`~distspatial.node.spatial_node.SpatialNode` (see module docstring). Needs
    ``node_id``, ``counters``, ``_lock`` and ``_load(dataset_id, partition_ids, arrays)``."""

    node_id: int

    def _staging(self) -> dict[int, dict[str, Any]]:
        st = getattr(self, "_staged", None)
        if st is None:
            st = self._staged = {}
        return st

    def _reading_error(self, share: Share, exc: BaseException) -> Exception:
        host = socket.gethostname()
        who = f"node {self.node_id} on host {host}"
        if isinstance(exc, DataFileError):
            if exc.row is None and exc.column is None and ("no such file" in exc.problem
                                                             or "cannot be opened" in exc.problem):
                return DataFileError(exc.path, f"{who} cannot open it: {exc.problem}",
                                     "on several machines the files must be on storage every machine reaches "
                                     "(a shared or mounted filesystem, or s3://, gs://, hdfs://)" +
                                     (f"; {exc.fix}" if exc.fix else ""))
            return DataFileError(exc.path, f"{exc.problem} (read by {who})", exc.fix, row=exc.row, column=exc.column)
        if isinstance(exc, OSError):
            return DataFileError(share.path, f"{who} cannot open it: {exc}",
                                 "on several machines the files must be on storage every machine reaches")
        return DataFileError(share.path, f"{who} cannot read {share.describe()}: {type(exc).__name__}: {exc}",
                             "check the file")

    def stage_shares(
        self, load_id: int, shares: list[Share], columns: Any, id_column: str | None, sample_size: int, seed: int,
        geographic: bool = False,
    ) -> dict[str, Any]:
        """Read ``shares`` and keep them under ``load_id``; returns the summary (see module docstring):
        ``{"node", "host", "shares": [(index, rows, dim, path)], "n", "dim", "lo", "hi", "mean", "m2", "id_max",
        "sample_prio", "sample"}``."""
        staged = self._staging()
        staged.pop(load_id, None)
        mine: dict[str, Any] = {"shares": [], "points": [], "ids": []}
        staged[load_id] = mine
        out: dict[str, Any] = {"node": self.node_id, "host": socket.gethostname(), "shares": []}
        n, d = 0, None
        lo = hi = mean = m2 = None
        id_max = None
        prios, samples = [], []
        try:
            for share in shares:
                try:
                    pts, ids = read_share(share, columns, id_column)
                    if geographic:  # longitude/latitude -> the unit vectors a geographic data set stores
                        pts = to_unit(pts, "points", share.row_start)
                except Exception as exc:
                    raise self._reading_error(share, exc) from None
                m = len(pts)
                out["shares"].append((share.index, m, pts.shape[1], share.path))
                if d is not None and m and pts.shape[1] != d:
                    first = next(s for s in out["shares"] if s[1])
                    check_same_columns([(p, share_columns(p, columns, id_column)) for p in (first[3], share.path)])
                mine["shares"].append(share.index)
                mine["points"].append(pts)
                mine["ids"].append(ids)
                if not m:
                    continue
                d = pts.shape[1]
                clo = np.array([pts[:, j].min() for j in range(d)])  # column reductions: faster than axis=0
                chi = np.array([pts[:, j].max() for j in range(d)])
                cmean = np.array([pts[:, j].mean() for j in range(d)])
                cm2 = np.array([float(np.square(pts[:, j] - cmean[j]).sum()) for j in range(d)])
                if n == 0:
                    lo, hi, mean, m2 = clo, chi, cmean, cm2
                else:  # Chan et al.: pairwise update of mean and squared deviations
                    delta = cmean - mean
                    tot = n + m
                    mean = mean + delta * (m / tot)
                    m2 = m2 + cm2 + delta * delta * (n * m / tot)
                    lo, hi = np.minimum(lo, clo), np.maximum(hi, chi)
                n += m
                if ids is not None:
                    id_max = int(ids.max()) if id_max is None else max(id_max, int(ids.max()))
                pr = np.random.default_rng([int(seed), int(share.index)]).random(m)
                if m > sample_size:
                    keep = np.argpartition(pr, sample_size)[:sample_size]
                    prios.append(pr[keep])
                    samples.append(np.take(pts, keep, axis=0))
                else:
                    prios.append(pr)
                    samples.append(pts)
        except BaseException:
            staged.pop(load_id, None)
            raise
        prio = np.concatenate(prios) if prios else np.empty(0)
        sample = np.concatenate(samples) if samples else np.empty((0, d or 0))
        if len(prio) > sample_size:
            keep = np.argpartition(prio, sample_size)[:sample_size]
            prio, sample = prio[keep], np.take(sample, keep, axis=0)
        out.update(n=n, dim=d, lo=lo, hi=hi, mean=mean, m2=m2, id_max=id_max, sample_prio=prio, sample=sample)
        with self._lock:
            self.counters["shares_read"] = self.counters.get("shares_read", 0) + len(shares)
            self.counters["points_read"] = self.counters.get("points_read", 0) + n
        self.last_load = {"load_id": load_id, "shares": [s.index for s in shares], "points": n,
                          "paths": sorted({redact_uri(s.path) for s in shares})}
        return out

    def shuffle_staged(
        self, load_id: int, lo: np.ndarray, hi: np.ndarray, curve: str, bits: int, key_cuts: np.ndarray,
        row_offsets: dict[int, int] | None, n_id_buckets: int = 0,
    ) -> Any:
        """Split the staged points of ``load_id`` by partition (partition ``p`` holds keys in ``[key_cuts[p-1],
        key_cuts[p])``); one ``(points, ids, keys)`` result per partition, then, with ``n_id_buckets``, one
        array of ids per checking node (call with ``num_returns = len(key_cuts) + 1 + n_id_buckets``). Ids are
        ``row_offsets[share] + row`` (input row numbers) or, with ``row_offsets`` ``None``, the id column's.
        The staged data is dropped here (the results live in Ray's object store until the owners read them)."""
        from ..core.curves import curve_keys

        mine = self._staging().pop(load_id, None)
        if mine is None:
            raise RuntimeError(f"node {self.node_id}: nothing staged for load {load_id} (dropped or never staged)")
        d = len(lo)
        n_parts = len(key_cuts) + 1
        with_pts = [j for j, p in enumerate(mine["points"]) if len(p)]
        if with_pts:
            pts = mine["points"][with_pts[0]] if len(with_pts) == 1 else \
                np.concatenate([mine["points"][j] for j in with_pts])
            if row_offsets is None:
                ids = np.concatenate([mine["ids"][j] for j in with_pts]).astype(np.int64, copy=False)
            else:
                ids = np.concatenate([np.arange(row_offsets[mine["shares"][j]],
                                                row_offsets[mine["shares"][j]] + len(mine["points"][j]),
                                                dtype=np.int64) for j in with_pts])
        else:
            pts, ids = np.empty((0, d)), np.empty(0, np.int64)
        mine.clear()  # the per-share arrays: only the concatenation is left
        keys = curve_keys(pts, lo, hi, curve, bits) if len(pts) else np.empty(0, np.uint64)
        part = np.searchsorted(np.asarray(key_cuts, dtype=np.uint64), keys, side="right")
        # partition numbers as the narrowest unsigned type: numpy sorts those with a radix sort
        order = np.argsort(part.astype(np.min_scalar_type(max(1, n_parts - 1))), kind="stable")
        starts = np.searchsorted(part[order], np.arange(n_parts + 1))
        pts_s, ids_s, keys_s = np.take(pts, order, axis=0), ids[order], keys[order]
        del pts, keys, part
        out: list[Any] = [(pts_s[starts[p]:starts[p + 1]], ids_s[starts[p]:starts[p + 1]],
                           keys_s[starts[p]:starts[p + 1]]) for p in range(n_parts)]
        if n_id_buckets:
            bucket = id_bucket(ids, n_id_buckets)
            border = np.argsort(bucket.astype(np.min_scalar_type(max(1, n_id_buckets - 1))), kind="stable")
            bstarts = np.searchsorted(bucket[border], np.arange(n_id_buckets + 1))
            ids_b = ids[border]
            out.extend(ids_b[bstarts[b]:bstarts[b + 1]] for b in range(n_id_buckets))
        with self._lock:
            self.counters["bytes_out"] += pts_s.nbytes + ids_s.nbytes + keys_s.nbytes
        out.append(np.diff(starts))  # points per partition: the small result the controller waits on
        return tuple(out)

    def check_unique_ids(self, *id_pieces: np.ndarray) -> tuple[int, list[int]]:
        """The ids hashed to this node by every node's shuffle: ``(how many are repeated, up to 5 of them)``."""
        ids = np.concatenate(id_pieces) if id_pieces else np.empty(0, np.int64)
        if len(ids) < 2:
            return 0, []
        s = np.sort(ids)
        rep = s[1:][s[1:] == s[:-1]]
        return int(len(rep)), [int(x) for x in np.unique(rep)[:5]]

    def load_pieces(self, dataset_id: int, partition_ids: list[int], n_sources: int, *pieces: Any) -> list[tuple]:
        """Build ``partition_ids`` of data set ``dataset_id`` from their pieces (``n_sources`` per partition,
        partition after partition: ``(points, ids, keys)`` from every node's :meth:`shuffle_staged`), each in
        curve-key order. Like ``load_partitions``, loading a new data set drops the previous one's partitions.
        Returns ``[(pid, size, key_lo, key_hi, box_lo, box_hi)]``."""
        if len(pieces) != n_sources * len(partition_ids):
            raise ValueError(f"load_pieces: {len(pieces)} pieces for {len(partition_ids)} partitions x {n_sources}")
        arrays: list[np.ndarray] = []
        info = []
        received = 0
        for j, pid in enumerate(partition_ids):
            got = [pc for pc in pieces[j * n_sources:(j + 1) * n_sources] if len(pc[1])]
            if not got:
                raise ValueError(f"node {self.node_id}: partition {pid} received no points")
            pts = np.concatenate([g[0] for g in got]) if len(got) > 1 else got[0][0]
            ids = np.concatenate([g[1] for g in got]) if len(got) > 1 else got[0][1]
            keys = np.concatenate([g[2] for g in got]) if len(got) > 1 else got[0][2]
            # curve order inside the partition (stable, as distribute_data leaves it); np.take and the sort make
            # arrays of this process (the pieces are views of Ray's object store)
            order, keys = sort_keys(keys)
            pts, ids = np.take(pts, order, axis=0), np.take(ids, order)
            received += pts.nbytes + ids.nbytes + keys.nbytes
            d = pts.shape[1]
            arrays += [pts, ids]
            info.append((int(pid), len(ids), int(keys[0]), int(keys[-1]),
                         np.array([pts[:, c].min() for c in range(d)]), np.array([pts[:, c].max() for c in range(d)])))
        del pieces
        self._load(dataset_id, partition_ids, arrays)
        with self._lock:
            self.counters["calls"] += 1
            self.counters["bytes_in"] += received
        return info

    def drop_load(self, load_id: int | None = None) -> int:
        """Forget what is staged for ``load_id`` (``None``: every load); returns how many loads were dropped."""
        staged = self._staging()
        if load_id is None:
            n = len(staged)
            staged.clear()
            return n
        return int(staged.pop(load_id, None) is not None)

    def staged_loads(self) -> dict[int, int]:
        """``{load id: points staged}`` (empty unless a load is in progress)."""
        return {k: int(sum(len(p) for p in v.get("points", []))) for k, v in self._staging().items()}

    def loading_report(self) -> dict[str, Any]:
        """What this node read in the latest load: ``{"load_id", "shares" (indexes), "points", "paths", "host",
        "ray_node_id"}`` (empty before any)."""
        rep = dict(getattr(self, "last_load", {}) or {})
        if rep:
            rep["host"] = socket.gethostname()
            try:
                import ray

                rep["ray_node_id"] = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
            except Exception:
                rep["ray_node_id"] = ""
        return rep

