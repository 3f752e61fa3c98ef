"""Routing: which partitions (and which replicas of them) a query must visit.

A :class:`RoutingTable` is derived from one :class:`~distspatial.core.metadata.GlobalIndexMetadata` snapshot and turns
it into arrays that make routing decisions vectorized over whole query batches:

* ``home_partitions(keys)``: the partition whose curve-key range holds each query's key (binary search);
* ``mindist2(queries)``: squared distance from every query to every partition's bounding box, ``(m, P)``;
* ``node_for(partition)``: the replica that serves reads of a partition.

Pure NumPy; no Ray.
"""

from __future__ import annotations

import numpy as np

from ..core.metadata import GlobalIndexMetadata

__all__ = ["RoutingTable", "box_mindist2"]


def box_mindist2(points: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Squared distance from each of ``points`` (m, d) to each box ``[lo[j], hi[j]]`` (P, d) -> (m, P).

    >>> box_mindist2(np.array([[0.0, 0.0]]), np.array([[1.0, 0.0]]), np.array([[2.0, 1.0]]))
    array([[1.]])
    """
    m, d = points.shape
    out = np.zeros((m, lo.shape[0]), dtype=np.float64)
    for j in range(d):  # loop over dimensions only
        x = points[:, j : j + 1]
        gap = np.maximum(lo[None, :, j] - x, 0.0) + np.maximum(x - hi[None, :, j], 0.0)
        out += gap * gap
    return out


class RoutingTable:
    """Routing arrays derived from one metadata version (see module docstring)."""

    def __init__(self, meta: GlobalIndexMetadata) -> None:
        self.version = meta.version
        parts = meta.partitions
        self.n_partitions = len(parts)
        key_lo = np.array([p.key_lo for p in parts], dtype=np.uint64)
        key_hi = np.array([p.key_hi for p in parts], dtype=np.uint64)
        # partitions in curve order (a split appends a partition whose keys sit between others)
        self.by_key = np.argsort(key_lo, kind="stable").astype(np.int64)
        self.key_lo, self.key_hi = key_lo[self.by_key], key_hi[self.by_key]
        self.dim, self.curve, self.bits = meta.dim, meta.curve, meta.bits
        self.lo, self.hi = meta.lo, meta.hi
        self.box_lo = np.array([p.lo for p in parts], dtype=np.float64).reshape(len(parts), meta.dim)
        self.box_hi = np.array([p.hi for p in parts], dtype=np.float64).reshape(len(parts), meta.dim)
        self.sizes = np.array([p.size for p in parts], dtype=np.int64)
        self.owners: list[tuple[int, ...]] = [p.owners for p in parts]
        ext = np.asarray(meta.hi, dtype=np.float64) - np.asarray(meta.lo, dtype=np.float64)
        #: the smallest positive extent of the key grid's box (0 when none): the planner's cell-level scale
        self.min_extent = float(ext[ext > 0].min()) if np.any(ext > 0) else 0.0
        self._quantization: tuple[np.ndarray, np.ndarray, float] | None = None

    @property
    def quantization(self) -> tuple[np.ndarray, np.ndarray, float]:
        """``(lo, scale, top)`` of the curve keys' quantization (:func:`~distspatial.core.curves.quantization`)."""
        if self._quantization is None:
            from ..core.curves import quantization

            self._quantization = quantization(self.lo, self.hi, self.bits)
        return self._quantization

    def home_partitions(self, keys: np.ndarray) -> np.ndarray:
        """Partition index whose key range holds each key (keys below the first range go to partition 0)."""
        idx = np.searchsorted(self.key_lo, keys, side="right").astype(np.int64) - 1
        np.clip(idx, 0, self.n_partitions - 1, out=idx)
        return self.by_key[idx]

    def partitions_in_key_range(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[first, last]`` positions in curve order (``by_key``) of the partitions whose key ranges overlap
        ``[a, b]`` (empty when first > last)."""
        first = np.searchsorted(self.key_hi, a, side="left").astype(np.int64)
        last = np.searchsorted(self.key_lo, b, side="right").astype(np.int64) - 1
        return first, last

    def mindist2(self, queries: np.ndarray) -> np.ndarray:
        """Squared MINDIST from each query to each partition box, shape ``(m, P)``."""
        return box_mindist2(queries, self.box_lo, self.box_hi)

    def boxes_meet(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """``(m, P)`` mask: query box ``[lo[i], hi[i]]`` intersects partition ``j``'s box (closed boxes)."""
        return np.all((self.box_lo[None, :, :] <= hi[:, None, :]) & (self.box_hi[None, :, :] >= lo[:, None, :]), axis=2)

    def boxes_intersecting(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Indices of partitions whose box intersects the query box ``[lo, hi]``."""
        return np.flatnonzero(self.boxes_meet(lo[None, :], hi[None, :])[0])

    def node_for(self, partition: int, load: dict[int, float] | None = None, exclude: set[int] | None = None) -> int:
        """The replica node that serves a read of ``partition``: the least loaded live owner, the primary
        (first owner) on ties or when no load is given.

        Raises ``LookupError`` when every owner is excluded.
        """
        owners = [n for n in self.owners[partition] if not exclude or n not in exclude]
        if not owners:
            raise LookupError(f"no live replica of partition {partition}")
        if load is None or len(owners) == 1:
            return owners[0]
        return min(owners, key=lambda n: (load.get(n, 0.0), owners.index(n)))
