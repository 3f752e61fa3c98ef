"""distspatial: a distributed spatial index and spatial analytics on Ray.

>>> from distspatial import DistributedSpatialCluster, NodeConfig
>>> cfg = NodeConfig().with_node_count(4)

See ``docs/architecture.md`` for how the pieces fit together.
"""

from .config import NodeConfig
from .coordinator import DistributedSpatialCluster
from .errors import DistSpatialError, NodeFailureError, NotDistributedError, PartitionLostError
from .kmeans import KMeansResult
from .query import QueryParameters, QueryResults, QueryType
from .metadata import GlobalIndexMetadata, PartitionInfo
from .routing import RoutingTable
from .stats import ClusterStatistics, NodeStatistics, QueryStatus

__version__ = "0.1.0"

__all__ = [
    "NodeConfig",
    "DistributedSpatialCluster",
    "KMeansResult",
    "GlobalIndexMetadata",
    "PartitionInfo",
    "RoutingTable",
    "ClusterStatistics",
    "NodeStatistics",
    "QueryStatus",
    "QueryType",
    "QueryParameters",
    "QueryResults",
    "DistSpatialError",
    "NotDistributedError",
    "NodeFailureError",
    "PartitionLostError",
    "__version__",
]
