"""Exceptions raised by distspatial (bad input raises the built-in ``ValueError``)."""

from __future__ import annotations

__all__ = ["DistSpatialError", "NotDistributedError", "NodeFailureError", "PartitionLostError", "PartitionMovedError"]


class DistSpatialError(Exception):
    """Base class of distspatial's own errors."""


class NotDistributedError(DistSpatialError, RuntimeError):
    """A query or algorithm was called before ``distribute_data``."""


class NodeFailureError(DistSpatialError, RuntimeError):
    """A node call failed on every replica within ``max_retries``."""


class PartitionLostError(NodeFailureError):
    """Every replica of some partitions is gone; ``partitions`` names them."""

    def __init__(self, message: str, partitions: list[int]) -> None:
        super().__init__(message)
        self.partitions = list(partitions)


class PartitionMovedError(DistSpatialError, KeyError):
    """A node was asked for a partition it no longer holds (it moved after the call was planned); the
    dispatcher re-plans such calls with the current routing."""
