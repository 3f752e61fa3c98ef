"""Placement policy: which nodes hold the replicas of each partition.

Pure Python; the result is recorded in :class:`~distspatial.core.metadata.GlobalIndexMetadata` (the only place that
keeps placement), never beside it.
"""

from __future__ import annotations

__all__ = ["place_partitions"]


def place_partitions(
    n_partitions: int,
    node_ids: list[int],
    replication_factor: int,
    machine_of: dict[int, str] | None = None,
) -> dict[int, tuple[int, ...]]:
    """Owners of each partition: ``{partition_id: (primary, replica, ...)}``.

    Primaries take contiguous runs of the curve order (``n_partitions / len(node_ids)`` each), so a spatial
    neighbourhood is mostly on one node and a query batch sends few messages. Each further replica goes to a
    distinct node, preferring a node on a different machine (``machine_of``: node id -> Ray node id) from the
    replicas already chosen, then the node with the fewest replicas so far.

    >>> place_partitions(4, [0, 1], 2)
    {0: (0, 1), 1: (0, 1), 2: (1, 0), 3: (1, 0)}
    """
    if not node_ids:
        raise ValueError("place_partitions needs at least one node")
    if not 1 <= replication_factor <= len(node_ids):
        raise ValueError(
            f"replication_factor must be in [1, {len(node_ids)}] (the node count), got {replication_factor}"
        )
    machine_of = machine_of or {}
    nodes = list(node_ids)
    load = {n: 0 for n in nodes}
    owners: dict[int, tuple[int, ...]] = {}
    for pid in range(n_partitions):
        primary = nodes[pid * len(nodes) // n_partitions]
        chosen = [primary]
        load[primary] += 1
        start = nodes.index(primary)
        ring = nodes[start + 1 :] + nodes[:start]
        while len(chosen) < replication_factor:
            used = {machine_of.get(n, n) for n in chosen}
            best = min(
                (n for n in ring if n not in chosen),
                key=lambda n: (machine_of.get(n, n) in used, load[n], ring.index(n)),
            )
            chosen.append(best)
            load[best] += 1
        owners[pid] = tuple(chosen)
    return owners
