"""Moved to :mod:`distspatial.kernels.routing` (kept while work in progress imports it from here)."""
from ..kernels.routing import RoutingTable, box_mindist2  # noqa: F401

__all__ = ["RoutingTable", "box_mindist2"]
