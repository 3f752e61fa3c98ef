"""Typed query API: one entry point, ``cluster.query(QueryType, QueryParameters) -> QueryResults``.

A thin layer over the named methods (``distributed_knn_search``, ``range_search``, ``box_search``,
``knn_join``, ``distance_matrix``, ``distributed_kmeans``, ``distributed_hierarchical``,
``distributed_dbscan``): each query type maps to exactly one of them, so there is no second implementation.
Useful where the query type is data (a service, a queue of requests, a notebook form).

>>> from distspatial.typed_queries import QueryType, QueryParameters
>>> res = cluster.query(QueryType.KNearestNeighbors, QueryParameters(query_point=p, k=5))  # doctest: +SKIP
>>> res.distances, res.ids  # doctest: +SKIP
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "QueryType", "QueryParameters", "QueryResults", "NearestNeighbors", "RangeSearch", "Clustering",
    "DistanceMatrix", "run_query",
]


class QueryType(enum.Enum):
    KNearestNeighbors = "knn"
    RangeSearch = "range"
    BoxSearch = "box"
    KNNJoin = "knn_join"
    DistanceMatrix = "distance_matrix"
    KMeans = "kmeans"
    Hierarchical = "hierarchical"
    DBSCAN = "dbscan"


@dataclass
class QueryParameters:
    """Parameters of a typed query; each query type reads the fields it needs (see :data:`REQUIRED`)."""

    query_point: Any = None  # a point (d,) or a batch (m, d): kNN and range centres
    k: int | None = None
    radius: Any = None
    lo: Any = None  # box corners
    hi: Any = None
    other_points: Any = None  # kNN join / distance matrix rows
    self_join: bool = False
    return_points: bool = False
    output: str | None = None
    n_clusters: int | None = None  # k-means (k) and hierarchical
    distance_threshold: float | None = None
    max_iterations: int = 300
    eps: float | None = None  # DBSCAN
    min_samples: int = 5
    seed: int | None = None


#: fields each query type needs (checked before anything runs)
REQUIRED: dict[QueryType, tuple[str, ...]] = {
    QueryType.KNearestNeighbors: ("query_point", "k"),
    QueryType.RangeSearch: ("query_point", "radius"),
    QueryType.BoxSearch: ("lo", "hi"),
    QueryType.KNNJoin: ("k",),
    QueryType.DistanceMatrix: ("other_points",),
    QueryType.KMeans: ("n_clusters",),
    QueryType.Hierarchical: (),
    QueryType.DBSCAN: ("eps",),
}


@dataclass
class QueryResults:
    """Base of the typed results; ``query_type`` says which query made it."""

    query_type: QueryType


@dataclass
class NearestNeighbors(QueryResults):
    distances: np.ndarray
    ids: np.ndarray


@dataclass
class RangeSearch(QueryResults):
    ids: Any  # an array for one query, a list of arrays for a batch
    points: Any = None


@dataclass
class Clustering(QueryResults):
    labels: np.ndarray
    centroids: np.ndarray | None = None
    linkage: np.ndarray | None = None
    n_clusters: int = 0
    details: Any = None  # the named method's full result (KMeansResult, HierarchicalResult, DBSCANResult)


@dataclass
class DistanceMatrix(QueryResults):
    matrix: np.ndarray


def run_query(cluster: Any, query_type: QueryType | str, params: QueryParameters) -> QueryResults:
    """Run a typed query on ``cluster`` (a :class:`~distspatial.DistributedSpatialCluster`, taken by its named
    methods, so this module needs no import of the facade)."""
    qt = query_type if isinstance(query_type, QueryType) else _parse_type(query_type)
    if not isinstance(params, QueryParameters):
        raise TypeError(f"params must be a QueryParameters, got {type(params).__name__}")
    missing = [f for f in REQUIRED[qt] if getattr(params, f) is None]
    if missing:
        raise ValueError(f"{qt.name} needs QueryParameters({', '.join(f + '=...' for f in missing)})")
    p = params
    if qt is QueryType.KNearestNeighbors:
        d, i = cluster.distributed_knn_search(p.query_point, p.k)
        return NearestNeighbors(qt, d, i)
    if qt is QueryType.KNNJoin:
        d, i = cluster.knn_join(p.other_points, p.k, self_join=p.self_join)
        return NearestNeighbors(qt, d, i)
    if qt in (QueryType.RangeSearch, QueryType.BoxSearch):
        res = (cluster.range_search(p.query_point, p.radius, return_points=p.return_points)
               if qt is QueryType.RangeSearch else cluster.box_search(p.lo, p.hi, return_points=p.return_points))
        if not p.return_points:
            return RangeSearch(qt, res)
        if isinstance(res, tuple):
            return RangeSearch(qt, res[0], res[1])
        return RangeSearch(qt, [r[0] for r in res], [r[1] for r in res])
    if qt is QueryType.DistanceMatrix:
        return DistanceMatrix(qt, cluster.distance_matrix(p.other_points, p.query_point, output=p.output))
    if qt is QueryType.KMeans:
        r = cluster.distributed_kmeans(p.n_clusters, p.max_iterations, seed=p.seed)
        return Clustering(qt, r.labels, centroids=r.centroids, n_clusters=len(r.centroids), details=r)
    if qt is QueryType.Hierarchical:
        r = cluster.distributed_hierarchical(p.n_clusters, p.distance_threshold, seed=p.seed)
        return Clustering(qt, r.labels, linkage=r.linkage, n_clusters=r.n_clusters, details=r)
    r = cluster.distributed_dbscan(p.eps, p.min_samples)
    return Clustering(qt, r.labels, n_clusters=r.n_clusters, details=r)


def _parse_type(name: str) -> QueryType:
    for qt in QueryType:
        if name in (qt.name, qt.value):
            return qt
    raise ValueError(f"unknown query type {name!r}; one of {[qt.name for qt in QueryType]}")

