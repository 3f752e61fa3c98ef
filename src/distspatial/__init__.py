"""distspatial: a distributed spatial index and spatial analytics on Ray.

>>> from distspatial import DistributedSpatialCluster, NodeConfig
>>> cfg = NodeConfig().with_node_count(4)

See ``docs/architecture.md`` for how the pieces fit together.
"""

from .core.config import NodeConfig
from .cluster import DistributedSpatialCluster
from .core.errors import DistSpatialError, NodeFailureError, NotDistributedError, PartitionLostError
from .algorithms.kmeans import KMeansResult
from .typed_queries import QueryParameters, QueryResults, QueryType
from .core.metadata import GlobalIndexMetadata, PartitionInfo
from .kernels.routing import RoutingTable
from .core.stats import ClusterStatistics, NodeStatistics, QueryStatus

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
