"""Global index metadata: the one place where partitions and their placement are recorded.

:class:`GlobalIndexMetadata` is an immutable, versioned snapshot: global bounds, the curve, and per partition its
key range, bounding box, size and owner nodes. Every change (a new data set, a replica moved, a partition split)
makes a new snapshot with ``version + 1``; the coordinator swaps its reference in one assignment, so a query
planned against one version never sees half of another. Routing structures are derived from a snapshot
(:class:`~distspatial.kernels.routing.RoutingTable`), never stored beside it.

Pure Python/NumPy; no Ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PartitionInfo", "GlobalIndexMetadata"]


@dataclass(frozen=True)
class PartitionInfo:
    """What the coordinator knows of one partition.

    Attributes:
        partition_id: dense id in ``[0, partition_count)``.
        key_lo, key_hi: inclusive range of the space-filling-curve keys of its points.
        lo, hi: bounding box of its points, shape ``(d,)``.
        size: number of points.
        nbytes: bytes of its points and ids on a node.
        owners: node ids holding a replica, primary first.
    """

    partition_id: int
    key_lo: int
    key_hi: int
    lo: np.ndarray
    hi: np.ndarray
    size: int
    nbytes: int
    owners: tuple[int, ...]


@dataclass(frozen=True)
class GlobalIndexMetadata:
    """Versioned snapshot of the distributed index (see module docstring)."""

    dim: int
    lo: np.ndarray
    hi: np.ndarray
    curve: str
    bits: int
    partitions: tuple[PartitionInfo, ...]
    version: int = 1
    dataset_id: int = 0
    id_dtype: np.dtype = field(default_factory=lambda: np.dtype(np.int64))
    #: the data set's coordinate reference system (canonical name, e.g. ``"EPSG:4326"``; ``None``: none given)
    crs: str | None = None
    #: a geographic CRS: users give and get longitude/latitude (``user_dim`` 2, distances in metres) while
    #: ``dim``, ``lo``/``hi`` and every partition box are those of the stored 3-D unit vectors
    geographic: bool = False

    @property
    def user_dim(self) -> int:
        """Coordinates per point as users give them: 2 (longitude, latitude) for a geographic data set, else
        ``dim``."""
        return 2 if self.geographic else self.dim

    @property
    def n_points(self) -> int:
        """Points in the index."""
        return int(sum(p.size for p in self.partitions))

    @property
    def n_partitions(self) -> int:
        return len(self.partitions)

    def partitions_of(self, node_id: int) -> list[int]:
        """Ids of the partitions that ``node_id`` holds a replica of."""
        return [p.partition_id for p in self.partitions if node_id in p.owners]

    def with_owners(self, owners: dict[int, tuple[int, ...]]) -> GlobalIndexMetadata:
        """A new version with the owner lists of some partitions replaced."""
        parts = tuple(
            dataclasses.replace(p, owners=tuple(owners[p.partition_id])) if p.partition_id in owners else p
            for p in self.partitions
        )
        return dataclasses.replace(self, partitions=parts, version=self.version + 1)

    def describe(self) -> str:
        return (
            f"GlobalIndexMetadata(v{self.version}, dim={self.dim}, points={self.n_points}, "
            f"partitions={self.n_partitions}, curve={self.curve}"
            + (f", crs={self.crs}" if self.crs else "") + ")"
        )
