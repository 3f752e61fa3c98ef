"""Exact distributed DBSCAN, driven from the coordinator (same core points, noise and clusters as scikit-learn).

Each partition is extended by a *halo*: the points of other partitions inside its box grown by ``eps``, which
holds every eps-neighbour of its points. Halo points travel node to node (Ray object references; the driver
never holds them):

0. the node serving each partition lists the eps-grid cells its points occupy (``dbscan_cells``); every node
   serving a source partition cuts, for each partition whose grown box meets it, the piece of its points in a
   cell next to one of the target's cells (``dbscan_halo``, one object per target): a superset of the points
   within eps of the target's points, much smaller than the grown box on skewed data;
1. the node serving each partition counts neighbours over its points + halo and keeps the core flags
   (``dbscan_core``; :func:`~distspatial.kernels.dbscan_kernels.core_flags`, exact, bounded memory);
2. the source nodes send the core flags of the halo pieces they cut (``dbscan_halo_core``), and each partition
   labels its local clusters over its own and its halo's core points (``dbscan_local``;
   :func:`~distspatial.kernels.dbscan_kernels.local_clusters`), returning its labels and, for each halo core point,
   the local cluster it joined;
3. the coordinator unites the local clusters through those shared core points (union-find as connected
   components, :func:`~distspatial.kernels.dbscan_kernels.merge_labels`) and numbers clusters as scikit-learn does.

A node failure during the run restarts it on the remaining replicas (up to ``max_retries`` times).
Memory: neighbour pairs are never all materialized (grid cells and chunked KD-tree queries with a pair budget);
each node holds its partitions' halos, which for an ``eps`` comparable to the data's extent approach the data set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..kernels.dbscan_kernels import PartLabels, merge_labels
from ..node.dispatch import NODE_FAILURES
from ..core.errors import NodeFailureError
from ..client.runtime import ClusterRuntime


__all__ = ["DBSCANResult", "run_dbscan"]


@dataclass
class DBSCANResult:
    """Result of :meth:`DistributedSpatialCluster.distributed_dbscan`.

    ``labels``: cluster of every point (``-1`` = noise), in the order of :meth:`point_ids` (the rows given to
    ``distribute_data``), numbered like ``sklearn.cluster.DBSCAN``. ``core_sample_indices``: rows of the core
    points (as sklearn's ``core_sample_indices_``). ``halo_points``: halo points moved node to node.
    """

    labels: np.ndarray
    core_sample_indices: np.ndarray
    n_clusters: int
    halo_points: int
    seconds: float

    @property
    def n_noise(self) -> int:
        return int(np.count_nonzero(self.labels == -1))


def _pieces(meta, routing, eps: float):
    """For each target partition p, the source partitions q != p whose box meets p's box grown by eps."""
    glo, ghi = routing.box_lo - eps, routing.box_hi + eps
    meets = routing.boxes_meet(glo, ghi)
    np.fill_diagonal(meets, False)
    empty = np.array([p.size == 0 for p in meta.partitions])
    meets[:, empty] = False
    return meets, glo, ghi


def _run_once(rt: ClusterRuntime, eps: float, min_samples: int, run: int) -> DBSCANResult:
    t0 = time.perf_counter()
    meta = rt.require_data()
    routing = rt.routing
    failed = rt.failed_nodes
    n_parts = meta.n_partitions
    serve = {p: routing.node_for(p, exclude=failed) for p in range(n_parts)}
    meets, glo, ghi = _pieces(meta, routing, eps)
    origin = meta.lo - eps
    targets: dict[int, list[int]] = {}
    for p in range(n_parts):
        targets.setdefault(serve[p], []).append(p)
    # round 0: the cells each partition occupies, then halo pieces cut by the nodes serving the source
    # partitions (points in a cell next to an occupied cell of the target), one object per target
    cell_ref = {}
    for node, pids in targets.items():
        for p, ref in zip(pids, rt.send_multi(node, "dbscan_cells", len(pids), run, float(eps), origin, pids)):
            cell_ref[p] = ref
    requests: dict[int, list[tuple[int, np.ndarray, np.ndarray, list[int], int]]] = {}
    for p in range(n_parts):
        by_node: dict[int, list[int]] = {}
        for q in np.flatnonzero(meets[p]):
            by_node.setdefault(serve[int(q)], []).append(int(q))
        for node, qs in by_node.items():
            requests.setdefault(node, []).append((p, glo[p], ghi[p], qs, len(requests.get(node, []))))
    halo_refs: dict[int, list] = {p: [] for p in range(n_parts)}
    for node, reqs in requests.items():
        refs = rt.send_multi(node, "dbscan_halo", len(reqs), run, float(eps), origin, reqs,
                           *[cell_ref[r[0]] for r in reqs])
        for r, ref in zip(reqs, refs):
            halo_refs[r[0]].append((node, ref))
    # round 1: core flags on the node serving each partition
    calls = []
    for node, pids in targets.items():
        layout = [(p, len(halo_refs[p])) for p in pids]
        refs = [r for p in pids for _, r in halo_refs[p]]
        calls.append((node, rt.send(node, "dbscan_core", run, float(eps), int(min_samples), layout, *refs)))
    halo_points = 0
    for node, ref in calls:
        halo_points += int(rt.recv(node, ref))
    # round 2: halo core flags from the source nodes, then local clusters
    flag_refs: dict[int, list] = {p: [] for p in range(n_parts)}
    for node, reqs in requests.items():
        refs = rt.send_multi(node, "dbscan_halo_core", len(reqs), run, [r[0] for r in reqs])
        for r, ref in zip(reqs, refs):
            flag_refs[r[0]].append(ref)
    calls = []
    for node, pids in targets.items():
        layout = [(p, len(flag_refs[p])) for p in pids]
        refs = [r for p in pids for r in flag_refs[p]]
        calls.append((node, rt.send(node, "dbscan_local", run, float(eps), layout, *refs)))
    parts = []
    for node, ref in calls:
        for pid, ids, labels, link_comp, link_ids, core in rt.recv(node, ref):
            parts.append(PartLabels(ids, labels, link_comp, link_ids, core))
    order = rt.point_ids()
    labels = merge_labels(parts, order)
    core_ids = np.concatenate([p.ids[p.core] for p in parts]) if parts else np.empty(0, np.int64)
    core_rows = np.sort(rt.rows_of_ids(core_ids))
    n_clusters = int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0
    return DBSCANResult(labels, core_rows, n_clusters, halo_points, time.perf_counter() - t0)


def run_dbscan(rt: ClusterRuntime, eps: float, min_samples: int) -> DBSCANResult:
    if isinstance(eps, bool) or not np.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if isinstance(min_samples, bool) or not isinstance(min_samples, (int, np.integer)) or min_samples < 1:
        raise ValueError(f"min_samples must be an int >= 1, got {min_samples!r}")
    rt.require_data()
    attempts = rt.config.max_retries + 1
    for attempt in range(attempts):
        run = rt.next_run_id()
        try:
            return _run_once(rt, float(eps), int(min_samples), run)
        except NODE_FAILURES as exc:
            # find which nodes are gone, then start over on the replicas that remain
            rt.mark_failed_if_dead()
            if attempt == attempts - 1:
                raise NodeFailureError(f"DBSCAN failed on {attempts} attempts: {exc}") from exc
        finally:
            for a in rt.actors.values():
                a.dbscan_end.remote(run)
    raise AssertionError("unreachable")
