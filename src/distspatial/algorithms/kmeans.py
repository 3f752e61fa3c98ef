"""Distributed k-means: k-means|| initialisation and Lloyd iterations, driven from the coordinator.

Per Lloyd iteration every node returns only per-cluster sums and counts of the partitions it serves
(``O(k * d)`` numbers per node); points never leave their node. The iteration follows scikit-learn's ``lloyd``
step by step (labels from the current centres, new centres = means, empty clusters re-seeded from the points
farthest from their centres, strict convergence when no label changes, ``tol`` relative to the data's mean
variance, a final assignment to the final centres), so with the same explicit ``init`` the result matches
``sklearn.cluster.KMeans(init=..., n_init=1, algorithm="lloyd")``.

k-means|| (Bahmani et al., VLDB 2012): one random centre, then ``init_rounds`` rounds in which every point is
sampled with probability ``min(1, l * d^2(x, C) / cost)``, computed on the nodes with per-partition generators;
the candidates are weighted by the points nearest to them and reduced to ``k`` centres on the coordinator by
weighted k-means++ and weighted Lloyd.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..kernels.kmeans_kernels import squared_distances_min
from ..core.progress import make_bar
from ..core.stats import Timer
from ..client.runtime import ClusterRuntime
from ..core.metadata import GlobalIndexMetadata

__all__ = ["KMeansResult", "run_kmeans", "weighted_kmeans_pp", "weighted_lloyd"]


@dataclass
class KMeansResult:
    """Result of :meth:`DistributedSpatialCluster.distributed_kmeans`; unpacks to ``(centroids, labels)``.

    >>> centroids, labels = KMeansResult(np.zeros((1, 2)), np.zeros(3, np.int32), 0.0, 1, 0.0)
    """

    centroids: np.ndarray
    labels: np.ndarray
    inertia: float
    n_iter: int
    seconds: float
    init_seconds: float = 0.0
    loop_seconds: float = 0.0  # the Lloyd iterations alone (excludes init and the final assignment)

    def __iter__(self):
        return iter((self.centroids, self.labels))

    def __len__(self) -> int:
        return 2


def weighted_kmeans_pp(points: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Weighted k-means++ seeding (greedy, 2 + log k trials per step as in scikit-learn) on a small set."""
    n = len(points)
    n_trials = 2 + int(np.log(k))
    w = weights.astype(np.float64)
    centers = np.empty((k, points.shape[1]))
    first = rng.choice(n, p=w / w.sum())
    centers[0] = points[first]
    closest = ((points - centers[0]) ** 2).sum(axis=1)
    for c in range(1, k):
        pot = w * closest
        total = pot.sum()
        if total <= 0:  # every remaining candidate coincides with a centre
            centers[c] = points[rng.integers(n)]
            continue
        cand = np.searchsorted(np.cumsum(pot), rng.random(n_trials) * total)
        cand = np.minimum(cand, n - 1)
        d2 = ((points[None, :, :] - points[cand][:, None, :]) ** 2).sum(axis=2)
        new_closest = np.minimum(closest[None, :], d2)
        best = int(np.argmin((w[None, :] * new_closest).sum(axis=1)))
        centers[c] = points[cand[best]]
        closest = new_closest[best]
    return centers


def weighted_lloyd(points: np.ndarray, weights: np.ndarray, centers: np.ndarray, iters: int = 30) -> np.ndarray:
    """A few weighted Lloyd iterations on the coordinator's small candidate set."""
    centers = centers.copy()
    k = len(centers)
    for _ in range(iters):
        labels, _ = squared_distances_min(points, centers)
        wsum = np.bincount(labels, weights=weights, minlength=k)
        moved = False
        for j in range(points.shape[1]):
            s = np.bincount(labels, weights=weights * points[:, j], minlength=k)
            nz = wsum > 0
            new = np.where(nz, s / np.where(nz, wsum, 1), centers[:, j])
            moved |= not np.array_equal(new, centers[:, j])
            centers[:, j] = new
        if not moved:
            break
    return centers


def _sample_points(rt: ClusterRuntime, meta: GlobalIndexMetadata, rows: np.ndarray) -> np.ndarray:
    """Points at global positions ``rows`` of the partition order (partition by partition)."""
    sizes = np.array([p.size for p in meta.partitions])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    part = np.searchsorted(offsets, rows, side="right") - 1
    out = np.empty((len(rows), meta.dim))
    refs = []
    for pid in np.unique(part):
        sel = np.flatnonzero(part == pid)
        node = rt.routing.node_for(int(pid), exclude=rt.failed_nodes)
        refs.append((sel, node, rt.send(node, "sample", int(pid), rows[sel] - offsets[pid])))
    for sel, node, ref in refs:
        out[sel] = rt.recv(node, ref)
    return out


def _kmeans_parallel(
    rt: ClusterRuntime,
    meta: GlobalIndexMetadata,
    run: int,
    k: int,
    rng: np.random.Generator,
    seed: int,
    factor: float | None,
    rounds: int,
) -> np.ndarray:
    n = meta.n_points
    l = float(factor) if factor is not None else 2.0 * k
    cand = _sample_points(rt, meta, rng.integers(0, n, size=1))
    cost = sum(r for _, r in rt.partitions_call("kmeanspar_update", run, cand))
    for rnd in range(rounds):
        if cost <= 0:
            break
        new = [r for _, r in rt.partitions_call("kmeanspar_sample", run, l / cost, seed * 1000 + rnd)]
        new = np.concatenate(new) if new else np.empty((0, meta.dim))
        if len(new) == 0:
            continue
        cand = np.concatenate([cand, new])
        cost = sum(r for _, r in rt.partitions_call("kmeanspar_update", run, new))
    if len(cand) < k:  # too few candidates (tiny or degenerate data): top up with random points
        extra = _sample_points(rt, meta, rng.choice(n, size=min(n, k), replace=False))
        cand = np.concatenate([cand, extra])
    weights = sum(r for _, r in rt.partitions_call("nearest_counts", cand)).astype(np.float64)
    centers = weighted_kmeans_pp(cand, weights, k, rng)
    return weighted_lloyd(cand, weights, centers)


def _initial_centers(
    rt: ClusterRuntime, meta: GlobalIndexMetadata, run: int, k: int, init: Any, seed: int | None,
    factor: float | None, rounds: int,
) -> np.ndarray:
    if isinstance(init, str):
        seed = int(np.random.SeedSequence(seed).generate_state(1)[0]) if seed is None else seed
        rng = np.random.default_rng(seed)
        if init == "random":
            return _sample_points(rt, meta, np.sort(rng.choice(meta.n_points, size=k, replace=False)))
        if init == "k-means||":
            return _kmeans_parallel(rt, meta, run, k, rng, seed, factor, rounds)
        raise ValueError(f"init must be 'k-means||', 'random' or a (k, d) array of centroids, got {init!r}")
    arr = np.asarray(init, dtype=np.float64)
    if arr.shape != (k, meta.dim):
        raise ValueError(f"init array must have shape (k, d) = ({k}, {meta.dim}), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("init array contains NaN or infinite values")
    return arr.copy()


def run_kmeans(
    rt: ClusterRuntime,
    meta: GlobalIndexMetadata,
    k: int,
    max_iterations: int,
    tol: float,
    init: Any,
    seed: int | None,
    factor: float | None,
    rounds: int,
    progress: bool = False,
) -> KMeansResult:
    """The algorithm behind :meth:`DistributedSpatialCluster.distributed_kmeans` (see module docstring)."""
    from ..core.validation import check_k

    k = check_k(k, meta.n_points)
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, (int, np.integer)) or max_iterations < 1:
        raise ValueError(f"max_iterations must be an int >= 1, got {max_iterations!r}")
    if not np.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if not isinstance(rounds, (int, np.integer)) or rounds < 0:
        raise ValueError(f"init_rounds must be an int >= 0, got {rounds!r}")
    if factor is not None and not factor > 0:
        raise ValueError(f"oversampling_factor must be > 0, got {factor!r}")
    run = rt.next_run_id()
    t_start = time.perf_counter()
    try:
        with Timer() as t_init:
            centers = _initial_centers(rt, meta, run, k, init, seed, factor, rounds)
        tol_scaled = tol * rt.mean_variance
        i = 0
        t_loop = time.perf_counter()
        bar = make_bar(max_iterations, "k-means", progress, unit="iter")
        for i in range(max_iterations):
            sums, counts, inertia_i, changed = _lloyd_step(rt, run, centers)
            bar.update(1)
            bar.set_postfix(inertia=f"{inertia_i:.6g}", changed=changed)
            empty = np.flatnonzero(counts == 0)
            if len(empty):
                _relocate_empty(rt, run, centers, sums, counts, empty)
            new_centers = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centers)
            shift = float(((new_centers - centers) ** 2).sum())
            centers = new_centers
            if i > 0 and changed == 0:  # labels stable: converged exactly
                break
            if shift <= tol_scaled:
                break
        bar.close()
        loop_seconds = time.perf_counter() - t_loop
        # Final assignment to the final centres (scikit-learn does the same unless labels already converged).
        _, _, inertia, _ = _lloyd_step(rt, run, centers)
        labels = np.empty(meta.n_points, dtype=np.int32)
        for _, parts in rt.partitions_call("kmeans_labels", run, centers):
            for _, ids, lab in parts:
                labels[rt.rows_of_ids(ids)] = lab
    finally:
        for a in rt.actors.values():
            a.kmeans_end.remote(run)
    seconds = time.perf_counter() - t_start
    return KMeansResult(centers, labels, float(inertia), i + 1, seconds, t_init.seconds, loop_seconds)


def _lloyd_step(rt: ClusterRuntime, run: int, centers: np.ndarray):
    k, d = centers.shape
    sums = np.zeros((k, d))
    counts = np.zeros(k, dtype=np.int64)
    inertia, changed = 0.0, 0
    for _, (s, c, i, ch) in rt.partitions_call("kmeans_step", run, centers):
        sums += s
        counts += c
        inertia += i
        changed += ch
    return sums, counts, inertia, changed


def _relocate_empty(rt, run, centers, sums, counts, empty) -> None:
    """scikit-learn's rule: each empty cluster takes one of the points farthest from their centres."""
    m = len(empty)
    dists, pts, labs = [], [], []
    for _, (dd, pp, ll) in rt.partitions_call("kmeans_farthest", run, m):
        dists.append(dd)
        pts.append(pp)
        labs.append(ll)
    dist = np.concatenate(dists)
    order = np.argsort(-dist, kind="stable")[:m]
    pts = np.concatenate(pts)[order]
    labs = np.concatenate(labs)[order]
    for new_id, x, old_id in zip(empty, pts, labs):
        sums[old_id] -= x
        counts[old_id] -= 1
        sums[new_id] = x
        counts[new_id] = 1
