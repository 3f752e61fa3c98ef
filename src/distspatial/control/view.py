"""What a client caches of a cluster: the :class:`ClusterView` the controller hands out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.config import NodeConfig
from ..core.metadata import GlobalIndexMetadata

__all__ = ["ClusterView"]


@dataclass
class ClusterView:
    """What a client needs to plan and send queries (soft state, replaced when ``version`` changes).

    A light view (the answer to a write) leaves ``actors`` and ``node_info`` out (``None``): the client keeps its
    own unless ``members`` (counting changes of the node set) says they changed."""

    name: str | None
    version: int
    config: NodeConfig
    meta: GlobalIndexMetadata | None
    actors: dict[int, Any] | None
    node_info: dict[int, dict] | None
    failed: frozenset[int]
    members: int = 0
    has_user_ids: bool = False
    modified: bool = False
    mean_variance: float = 0.0
    has_id_map: bool = False
