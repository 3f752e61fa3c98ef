"""Exceptions raised by distspatial (bad input raises the built-in ``ValueError``)."""

from __future__ import annotations

__all__ = [
    "DistSpatialError", "NotDistributedError", "NodeFailureError", "PartitionLostError", "PartitionMovedError",
    "StaleMetadataError", "ClusterNotFoundError", "ClusterExistsError", "ClusterGoneError", "ControllerUnavailableError",
    "AccessDeniedError",
]


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

    def __reduce__(self):  # survives pickling through Ray with its partitions
        return (type(self), (str(self), self.partitions))


class PartitionMovedError(DistSpatialError, KeyError):
    """A node was asked for a partition it no longer holds (it moved after the call was planned); the
    dispatcher re-plans such calls with the current routing."""


class StaleMetadataError(DistSpatialError):
    """A node was sent work planned on a metadata version older than the newest one it was told of (another
    client or the controller changed the layout or the data since); ``version`` is the node's. The client
    fetches that version from the controller and plans the query again, so answers stay exact. ``layout``, when
    the node says it: the version in which its partition layout last changed (a client whose plan is at least that
    new may resend the same plan under ``version`` without fetching anything)."""

    def __init__(self, message: str, version: int, layout: int | None = None) -> None:
        super().__init__(message)
        self.version = int(version)
        self.layout = None if layout is None else int(layout)

    def __reduce__(self):
        return (type(self), (str(self), self.version, self.layout))


class ClusterNotFoundError(DistSpatialError, LookupError):
    """No running cluster has this name (the message lists the running ones)."""


class ClusterExistsError(DistSpatialError, ValueError):
    """A cluster with this name is already running (attach to it, or pass ``exist_ok=True``)."""


class ClusterGoneError(DistSpatialError, RuntimeError):
    """The cluster this client was attached to has been shut down (by this or another client)."""


class ControllerUnavailableError(DistSpatialError, RuntimeError):
    """The cluster's controller did not answer in time (it may be restarting); the call changed nothing that a
    retry would duplicate, so it is safe to retry."""


class AccessDeniedError(DistSpatialError, PermissionError):
    """A named cluster created with a token (``NodeConfig.with_token``) refused a write or a teardown from a
    client without that token; queries stay open. Attach with the token
    (``DistributedSpatialCluster.attach(name, token=...)`` or ``DISTSPATIAL_TOKEN``)."""
