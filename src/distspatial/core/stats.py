"""Statistics: communication counters, query latencies and the :class:`ClusterStatistics` report."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CommunicationCounters", "LatencyRecorder", "NodeStatistics", "ClusterStatistics", "QueryStatus"]


class CommunicationCounters:
    """Messages and bytes between the coordinator and each node, counted where the messages are made."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.messages_sent: dict[int, int] = {}
        self.bytes_sent: dict[int, int] = {}
        self.messages_received: dict[int, int] = {}
        self.bytes_received: dict[int, int] = {}
        self.raw_bytes_sent: dict[int, int] = {}  # before compression (equal to bytes_sent when uncompressed)

    def sent(self, node: int, nbytes: int, raw: int | None = None) -> None:
        """Count one message of ``nbytes`` on the wire (``raw`` bytes before compression)."""
        with self._lock:
            self.messages_sent[node] = self.messages_sent.get(node, 0) + 1
            self.bytes_sent[node] = self.bytes_sent.get(node, 0) + int(nbytes)
            self.raw_bytes_sent[node] = self.raw_bytes_sent.get(node, 0) + int(nbytes if raw is None else raw)

    def received(self, node: int, nbytes: int) -> None:
        with self._lock:
            self.messages_received[node] = self.messages_received.get(node, 0) + 1
            self.bytes_received[node] = self.bytes_received.get(node, 0) + int(nbytes)

    def totals(self) -> dict[str, int]:
        with self._lock:
            return {
                "messages_sent": sum(self.messages_sent.values()),
                "bytes_sent": sum(self.bytes_sent.values()),
                "messages_received": sum(self.messages_received.values()),
                "bytes_received": sum(self.bytes_received.values()),
                "raw_bytes_sent": sum(self.raw_bytes_sent.values()),
            }


class LatencyRecorder:
    """Wall time of the last ``maxlen`` query calls and the number of queries each answered."""

    def __init__(self, maxlen: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._calls: deque[tuple[float, int]] = deque(maxlen=maxlen)
        self.total_queries = 0
        self.total_seconds = 0.0

    def record(self, seconds: float, n_queries: int) -> None:
        with self._lock:
            self._calls.append((seconds, n_queries))
            self.total_queries += n_queries
            self.total_seconds += seconds

    def summary(self) -> dict[str, float]:
        """Per-call latency mean/p50/p99 (seconds) and throughput (queries per second of query time)."""
        with self._lock:
            lat = np.array([c[0] for c in self._calls], dtype=np.float64)
            total_q, total_s = self.total_queries, self.total_seconds
        if len(lat) == 0:
            return {"latency_mean_s": 0.0, "latency_p50_s": 0.0, "latency_p99_s": 0.0, "throughput_qps": 0.0}
        return {
            "latency_mean_s": float(lat.mean()),
            "latency_p50_s": float(np.percentile(lat, 50)),
            "latency_p99_s": float(np.percentile(lat, 99)),
            "throughput_qps": total_q / total_s if total_s > 0 else 0.0,
        }


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0


@dataclass(frozen=True)
class QueryStatus:
    """How complete an answer is (returned with ``allow_partial=True``)."""

    partial: bool
    missing_partitions: tuple[int, ...] = ()

    @classmethod
    def of(cls, missing: list[int] | None) -> QueryStatus:
        lost = tuple(sorted(set(missing or [])))
        return cls(bool(lost), lost)


@dataclass
class NodeStatistics:
    """One node as seen by the last statistics call.

    Message and byte counts are the node's own (counted in the node process, coordinator and node-to-node
    traffic together): ``messages_received`` = data calls served, ``messages_sent`` = their results,
    ``bytes_*`` on the wire (compressed where compressed), ``raw_bytes_sent`` before compression.
    ``mean_call_ms``: mean service time of a data call on the node. ``delta_points`` / ``runs``: points ingested
    since the partitions' KD-trees were last built and the curve runs holding them; ``base_rebuilds``: KD-tree
    rebuilds done (see :class:`~distspatial.kernels.local_index.LocalPartition`).
    """

    node_id: int
    status: str  # "alive" or "failed"
    ray_node_id: str
    host: str
    partitions: int
    points: int
    bytes_held: int
    queries_served: int
    calls_served: int
    busy_seconds: float
    messages_sent: int
    bytes_sent: int
    messages_received: int
    bytes_received: int
    raw_bytes_sent: int = 0
    mean_call_ms: float = 0.0
    delta_points: int = 0
    runs: int = 0
    base_rebuilds: int = 0


@dataclass
class ClusterStatistics:
    """What :meth:`DistributedSpatialCluster.statistics` reports.

    Communication totals cover every party: the coordinator (the driver) and every live node, each counting
    the messages it produced or took in (:func:`~distspatial.core.codec.message_bytes`). So
    ``bytes_sent == bytes_received`` whenever every message sent has arrived (calls lost with a failed node
    make the difference). ``coordinator`` holds the driver's own counters. Heartbeats and other control calls
    are not counted.
    """

    nodes: list[NodeStatistics]
    n_points: int
    n_partitions: int
    metadata_version: int
    queries: int
    latency_mean_s: float
    latency_p50_s: float
    latency_p99_s: float
    throughput_qps: float
    load_balance_score: float  # max / mean points per live node (1.0 = perfect)
    messages_sent: int
    bytes_sent: int
    messages_received: int
    bytes_received: int
    extra: dict = field(default_factory=dict)
    raw_bytes_sent: int = 0  # bytes sent before compression
    coordinator: dict = field(default_factory=dict)  # the driver's own messages/bytes sent and received
    crs: str | None = None  # the data set's coordinate reference system (None: plain coordinates)

    @property
    def compression_ratio(self) -> float:
        """Raw / wire bytes of everything sent (1.0 without compression)."""
        return self.raw_bytes_sent / self.bytes_sent if self.bytes_sent else 1.0

    def _repr_html_(self) -> str:
        """Notebook view: the summary lines and a per-node table."""
        from html import escape

        head = "<br>".join(escape(line) for line in str(self).splitlines()[:3])
        cols = ("node", "status", "partitions", "points", "queries", "busy s", "MB sent", "MB received", "host")
        rows = "".join(
            f"<tr><td>{n.node_id}</td><td>{n.status}</td><td>{n.partitions}</td><td>{n.points:,}</td>"
            f"<td>{n.queries_served:,}</td><td>{n.busy_seconds:.2f}</td><td>{n.bytes_sent / 1e6:.1f}</td>"
            f"<td>{n.bytes_received / 1e6:.1f}</td><td>{escape(n.host)}</td></tr>"
            for n in self.nodes
        )
        return (f"<div><p>{head}</p><table><thead><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr></thead>"
                f"<tbody>{rows}</tbody></table></div>")

    def __str__(self) -> str:
        lines = [
            f"distspatial cluster: {len(self.nodes)} nodes, {self.n_points:,} points, {self.n_partitions} partitions "
            f"(metadata v{self.metadata_version})",
            f"queries {self.queries:,}: latency mean {self.latency_mean_s * 1e3:.2f} ms, "
            f"p50 {self.latency_p50_s * 1e3:.2f} ms, p99 {self.latency_p99_s * 1e3:.2f} ms, "
            f"throughput {self.throughput_qps:,.0f} q/s",
            f"load balance (max/mean points): {self.load_balance_score:.3f}; messages sent {self.messages_sent:,} "
            f"({self.bytes_sent / 1e6:.1f} MB, compression {self.compression_ratio:.2f}x), received "
            f"{self.messages_received:,} ({self.bytes_received / 1e6:.1f} MB)",
            f"{'node':>4} {'status':>7} {'parts':>5} {'points':>12} {'MB':>9} {'queries':>10} {'busy s':>8}  host",
        ]
        for n in self.nodes:
            lines.append(
                f"{n.node_id:>4} {n.status:>7} {n.partitions:>5} {n.points:>12,} {n.bytes_held / 1e6:>9.1f} "
                f"{n.queries_served:>10,} {n.busy_seconds:>8.2f}  {n.host}"
            )
        return "\n".join(lines)
