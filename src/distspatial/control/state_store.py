"""The controller's durable state, kept in Ray's GCS key-value store (as Ray Serve's controller keeps its own).

A named cluster's controller writes its hard state here on every change (metadata, node ids, id counters, the
outcome of recent writes); when Ray restarts the controller, the new instance reads it back and re-adopts the
running node actors by name. The store lives as long as the Ray cluster (with GCS fault tolerance, as long as its
Redis), so a cluster survives its controller and every client, but not the loss of the Ray head without GCS FT.

Keys are ``<cluster name>/<part>`` in the KV namespace ``distspatial``; values are pickled (state) or codec
encoded (large arrays, written in chunks of at most :data:`CHUNK` bytes).
"""

from __future__ import annotations

import pickle
from typing import Any

from ray.experimental import internal_kv

__all__ = ["KV_NAMESPACE", "save", "load", "delete_cluster", "save_blob", "load_blob", "stored_clusters"]

KV_NAMESPACE = "distspatial"
CHUNK = 32 << 20  # bytes per KV value (GCS values are best kept well below its message size limit)


def _key(cluster: str, part: str) -> bytes:
    return f"{cluster}/{part}".encode()


def save(cluster: str, part: str, value: Any) -> None:
    """Store ``value`` (picklable) under ``cluster/part``, replacing what was there."""
    internal_kv._internal_kv_put(_key(cluster, part), pickle.dumps(value, protocol=5), overwrite=True,
                                 namespace=KV_NAMESPACE)


def load(cluster: str, part: str) -> Any:
    """The value stored under ``cluster/part``, or ``None``."""
    raw = internal_kv._internal_kv_get(_key(cluster, part), namespace=KV_NAMESPACE)
    return None if raw is None else pickle.loads(raw)


def save_blob(cluster: str, part: str, data: bytes) -> None:
    """Store a large byte string in chunks (``part/0``, ``part/1``, ... and ``part/n``)."""
    chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
    for i, c in enumerate(chunks):
        internal_kv._internal_kv_put(_key(cluster, f"{part}/{i}"), c, overwrite=True, namespace=KV_NAMESPACE)
    save(cluster, f"{part}/n", len(chunks))


def load_blob(cluster: str, part: str) -> bytes | None:
    n = load(cluster, f"{part}/n")
    if n is None:
        return None
    out = []
    for i in range(n):
        c = internal_kv._internal_kv_get(_key(cluster, f"{part}/{i}"), namespace=KV_NAMESPACE)
        if c is None:
            return None
        out.append(c)
    return b"".join(out)


def delete_cluster(cluster: str) -> None:
    """Remove everything stored for ``cluster``."""
    internal_kv._internal_kv_del(_key(cluster, ""), del_by_prefix=True, namespace=KV_NAMESPACE)


def stored_clusters() -> list[str]:
    """Names of the clusters with stored state (running, or whose controller is being restarted)."""
    keys = internal_kv._internal_kv_list(b"", namespace=KV_NAMESPACE)
    return sorted({k.decode().split("/", 1)[0] for k in keys if k.decode().endswith("/state")})
