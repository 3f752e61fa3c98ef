"""Moved to :mod:`distspatial.core.metadata` (kept while work in progress imports it from here)."""
from ..core.metadata import GlobalIndexMetadata, PartitionInfo  # noqa: F401

__all__ = ["GlobalIndexMetadata", "PartitionInfo"]
