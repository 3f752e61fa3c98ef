"""Partitioning: cut a point set into balanced partitions along a space-filling curve. Pure NumPy; no Ray.

Points get curve keys over the global bounds (:mod:`distspatial.core.curves`), and ``n_partitions`` partitions of
equal point count are cut at key quantiles after one stable sort by key, which also leaves every partition's
points in curve order. Each partition is a contiguous curve-key range, so a neighbourhood lives in few
partitions, and its bounding box is tight.

>>> import numpy as np
>>> plan = partition_points(np.random.default_rng(0).random((1000, 2)), 4)
>>> plan.sizes.tolist()
[250, 250, 250, 250]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.curves import curve_keys, default_bits, sort_keys

__all__ = ["PartitionPlan", "partition_points"]


@dataclass
class PartitionPlan:
    """Points and ids reordered so that partition ``p`` is rows ``cuts[p]:cuts[p + 1]``."""

    points: np.ndarray  # (n, d), grouped by partition
    ids: np.ndarray  # (n,) int64 global ids, same order
    cuts: np.ndarray  # (P + 1,) row offsets
    key_lo: np.ndarray  # (P,) uint64, inclusive
    key_hi: np.ndarray  # (P,) uint64, inclusive
    box_lo: np.ndarray  # (P, d)
    box_hi: np.ndarray  # (P, d)
    lo: np.ndarray  # (d,) global bounds
    hi: np.ndarray  # (d,)
    curve: str
    bits: int

    @property
    def n_partitions(self) -> int:
        return len(self.cuts) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.cuts)

    def part(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        """``(points, ids)`` of partition ``p`` (views)."""
        a, b = self.cuts[p], self.cuts[p + 1]
        return self.points[a:b], self.ids[a:b]


def partition_points(
    points: np.ndarray, n_partitions: int, ids: np.ndarray | None = None, curve: str = "hilbert"
) -> PartitionPlan:
    """Cut validated ``(n, d)`` float64 ``points`` into ``min(n_partitions, n)`` equal-count curve partitions.

    ``ids`` defaults to the row numbers. Points with equal keys (duplicates) may be split between two
    neighbouring partitions, whose key ranges then share their boundary key.
    """
    n, d = points.shape
    lo = np.array([points[:, j].min() for j in range(d)])  # column reductions: much faster than axis=0
    hi = np.array([points[:, j].max() for j in range(d)])
    bits = default_bits(d)
    keys = curve_keys(points, lo, hi, curve, bits)
    n_parts = max(1, min(int(n_partitions), n))
    cuts = np.linspace(0, n, n_parts + 1).astype(np.int64)
    # A full sort (not just a partition at the cuts): points in curve order inside a partition make node kernels
    # walk space coherently (k-means passes run ~2.5x faster: the same centre and branch for runs of points).
    order, sorted_keys = sort_keys(keys)
    del keys
    sorted_pts = np.take(points, order, axis=0)  # np.take is ~5x faster than fancy indexing of rows
    sorted_ids = order.astype(np.int64, copy=False) if ids is None else np.take(ids, order)
    starts = cuts[:-1]
    return PartitionPlan(
        points=sorted_pts,
        ids=sorted_ids,
        cuts=cuts,
        key_lo=np.minimum.reduceat(sorted_keys, starts),
        key_hi=np.maximum.reduceat(sorted_keys, starts),
        box_lo=np.minimum.reduceat(sorted_pts, starts, axis=0),
        box_hi=np.maximum.reduceat(sorted_pts, starts, axis=0),
        lo=lo,
        hi=hi,
        curve=curve,
        bits=bits,
    )
