"""Cluster configuration: :class:`NodeConfig`.

A ``NodeConfig`` is an immutable value. Builder methods return a new, validated copy, so a configuration can be
shared between clusters without surprises::

    >>> from distspatial import NodeConfig
    >>> cfg = NodeConfig().with_node_count(4).with_fault_tolerance(True)
    >>> cfg.node_count, cfg.replication_factor
    (4, 2)

Every invalid value raises :class:`ValueError` naming the field and the allowed range.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from .curves import CURVES

__all__ = ["NodeConfig", "DEVICES"]

#: Where node kernels run (``NodeConfig.device``): ``"cpu"``, ``"cuda"`` (fails without a usable GPU) or
#: ``"auto"`` (cuda when available on the node, else cpu); see :func:`distspatial.kernels.backend_choice.get_backend`.
DEVICES = ("cpu", "cuda", "auto")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"NodeConfig.{name} must be an int, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"NodeConfig.{name} must be {allowed}, got {value}")


def _check_positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"NodeConfig.{name} must be a number > 0, got {value!r}")


@dataclass(frozen=True)
class NodeConfig:
    """Configuration of a :class:`~distspatial.DistributedSpatialCluster`.

    Attributes:
        node_count: logical nodes (one Ray actor each), in [1, 4096].
        partitions_per_node: partitions cut per node, in [1, 1024]; the partition is the unit of placement,
            replication and migration.
        replication_factor: copies of each partition on distinct nodes, in [1, node_count].
        fault_tolerance: replicas and failover reads (``with_fault_tolerance`` sets ``replication_factor >= 2``).
        load_balancing: whether the cluster may move partitions to even out load.
        compression: compress partition transfers.
        address: ``None`` starts an embedded local Ray runtime; ``"auto"`` or ``"ray://host:port"`` (or a
            ``host:port`` GCS address) joins an existing Ray cluster, which ``shutdown`` never stops.
        curve: space-filling curve for partitioning, ``"hilbert"`` (default) or ``"morton"``.
        communication_timeout_ms: how long one node call may take before it counts as failed, > 0.
        heartbeat_interval_ms: period of node heartbeats, > 0.
        max_retries: retries of a failed node call on another replica, in [0, 100].
        cpus_per_node: Ray CPUs reserved per node actor; ``None`` divides the CPUs still free evenly (at most 1).
        threads_per_node: compute threads a node uses for one query batch; ``None`` = max(1, cpus // nodes).
        num_cpus: CPUs of the embedded runtime; ``None`` = all of the machine's. Ignored with ``address``.
        object_store_memory: bytes of the embedded runtime's object store; ``None`` lets Ray choose.
        seed: default seed for randomized algorithms when a call passes none.
        checkpoint_path: where periodic checkpoints go (a directory or pyarrow URI); needs
            ``checkpoint_interval_s``.
        checkpoint_interval_s: seconds between periodic checkpoints (taken only when the data changed).
        auto_scale: follow the Ray cluster: a Ray node that joins gets a new node (and partitions); one that
            leaves is recovered from as a failure. Checked with every heartbeat.
        name: a name makes the cluster outlive the process that created it: its controller and nodes are
            detached Ray actors that other processes attach to (``DistributedSpatialCluster.attach(name)``) until
            ``shutdown()``. Letters, digits, ``_``, ``-`` and ``.``; at most 63 characters. With ``address=None``
            a named cluster runs in a local Ray runtime started on its own (``ray start --head``) if none runs.
        device: where node kernels run: ``"cpu"`` (default), ``"cuda"`` (needs PyTorch with CUDA on every node:
            ``pip install distspatial[gpu]``) or ``"auto"`` (cuda where a node has a GPU, else cpu).
        crs: the coordinate reference system of the data sets distributed without ``crs=`` (canonical name, see
            :func:`~distspatial.core.crs.resolve_crs`); a geographic one (``"EPSG:4326"``) means longitude/latitude
            in degrees and great-circle distances in metres. ``None``: plain Euclidean coordinates.
        token: a named cluster created with a token lets only clients holding it write (distribute, ingest,
            delete, update, rebalance, checkpoint, settings) and tear it down; queries stay open. ``None``: the
            ``DISTSPATIAL_TOKEN`` environment variable when set, else no token. Set it with :meth:`with_token`;
            it is not shown by ``repr``, and the controller keeps only a salted hash of it (the config the
            cluster stores and hands to clients has ``token=None``).
    """

    node_count: int = 4
    partitions_per_node: int = 4
    replication_factor: int = 1
    fault_tolerance: bool = False
    load_balancing: bool = False
    compression: bool = False
    address: str | None = None
    curve: str = "hilbert"
    communication_timeout_ms: int = 30_000
    heartbeat_interval_ms: int = 1_000
    max_retries: int = 3
    cpus_per_node: float | None = None
    threads_per_node: int | None = None
    num_cpus: int | None = None
    object_store_memory: int | None = None
    seed: int | None = None
    checkpoint_path: str | None = None
    checkpoint_interval_s: float | None = None
    auto_scale: bool = False
    device: str = "cpu"
    name: str | None = None
    crs: str | None = None
    token: str | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_int("node_count", self.node_count, 1, 4096)
        _check_int("partitions_per_node", self.partitions_per_node, 1, 1024)
        _check_int("replication_factor", self.replication_factor, 1, self.node_count)
        _check_int("max_retries", self.max_retries, 0, 100)
        _check_positive_number("communication_timeout_ms", self.communication_timeout_ms)
        _check_positive_number("heartbeat_interval_ms", self.heartbeat_interval_ms)
        if self.curve not in CURVES:
            raise ValueError(f"NodeConfig.curve must be one of {CURVES}, got {self.curve!r}")
        for flag in ("fault_tolerance", "load_balancing", "compression", "auto_scale"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"NodeConfig.{flag} must be a bool, got {getattr(self, flag)!r}")
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            raise ValueError(
                f"NodeConfig.address must be None (embedded runtime), 'auto', 'ray://host:port' or 'host:port', "
                f"got {self.address!r}"
            )
        if self.cpus_per_node is not None:
            _check_positive_number("cpus_per_node", self.cpus_per_node)
        if self.threads_per_node is not None:
            _check_int("threads_per_node", self.threads_per_node, 1, 1024)
        if self.num_cpus is not None:
            _check_int("num_cpus", self.num_cpus, 1)
        if self.object_store_memory is not None:
            _check_int("object_store_memory", self.object_store_memory, 75 * 1024 * 1024)
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
        if (self.checkpoint_path is None) != (self.checkpoint_interval_s is None):
            raise ValueError("NodeConfig.checkpoint_path and NodeConfig.checkpoint_interval_s go together: set both "
                             "for periodic checkpoints, or neither")
        if self.checkpoint_interval_s is not None:
            _check_positive_number("checkpoint_interval_s", self.checkpoint_interval_s)
        if self.name is not None and (not isinstance(self.name, str) or not _NAME.fullmatch(self.name)):
            raise ValueError(f"NodeConfig.name must be 1-63 letters, digits, '_', '-' or '.' (starting with a letter "
                             f"or digit), got {self.name!r}")
        if self.device not in DEVICES:
            raise ValueError(f"NodeConfig.device must be one of {DEVICES}, got {self.device!r}")
        if self.token is not None:
            from .access import check_token

            check_token(self.token, "NodeConfig.token")
        if self.crs is not None and not isinstance(self.crs, str):
            raise ValueError(f"NodeConfig.crs must be a CRS name such as 'EPSG:4326' (use with_crs), got {self.crs!r}")

    def with_auto_scale(self, enabled: bool = True) -> NodeConfig:
        """Follow Ray nodes joining and leaving the Ray cluster (heartbeats are started for it)."""
        return self.replace(auto_scale=enabled)

    def with_periodic_checkpoints(self, path: str, interval_s: float) -> NodeConfig:
        """Checkpoint to ``path`` every ``interval_s`` seconds whenever the data changed."""
        return self.replace(checkpoint_path=path, checkpoint_interval_s=interval_s)

    # -- builders -------------------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> NodeConfig:
        """A validated copy with ``changes`` applied (``NodeConfig().replace(curve="morton")``)."""
        return dataclasses.replace(self, **changes)

    def with_node_count(self, n: int) -> NodeConfig:
        """Set the number of logical nodes; the replication factor is capped at ``n``."""
        _check_int("node_count", n, 1, 4096)
        return self.replace(node_count=n, replication_factor=min(self.replication_factor, n))

    def with_fault_tolerance(self, enabled: bool = True) -> NodeConfig:
        """Turn replicas on (``replication_factor`` 1 becomes 2 when there are >= 2 nodes) or off (back to 1)."""
        if not isinstance(enabled, bool):
            raise ValueError(f"NodeConfig.fault_tolerance must be a bool, got {enabled!r}")
        if enabled:
            r = max(self.replication_factor, min(2, self.node_count))
        else:
            r = 1
        return self.replace(fault_tolerance=enabled, replication_factor=r)

    def with_load_balancing(self, enabled: bool = True) -> NodeConfig:
        """Allow the cluster to rebalance partitions by itself."""
        return self.replace(load_balancing=enabled)

    def with_compression(self, enabled: bool = True) -> NodeConfig:
        """Compress partition transfers."""
        return self.replace(compression=enabled)

    def with_name(self, name: str | None) -> NodeConfig:
        """Name the cluster: it outlives its creator and other processes attach to it (see ``name``)."""
        return self.replace(name=name)

    def with_token(self, token: str | None) -> NodeConfig:
        """Require ``token`` for writes and teardown of the named cluster created with this config (see
        ``token``; at least 16 random characters, e.g. ``secrets.token_urlsafe(32)``); ``None``: no token."""
        return self.replace(token=token)

    def with_address(self, address: str | None) -> NodeConfig:
        """Join an existing Ray cluster (``"auto"``, ``"ray://host:port"``); ``None`` = embedded runtime."""
        return self.replace(address=address)

    def with_curve(self, curve: str) -> NodeConfig:
        """Choose the space-filling curve, ``"hilbert"`` or ``"morton"``."""
        return self.replace(curve=curve)

    def with_partitions_per_node(self, n: int) -> NodeConfig:
        """Set how many partitions are cut per node."""
        return self.replace(partitions_per_node=n)

    def with_device(self, device: str) -> NodeConfig:
        """Run node kernels on ``"cpu"``, ``"cuda"`` or ``"auto"`` (cuda where available, else cpu)."""
        return self.replace(device=device)

    def with_crs(self, crs: Any) -> NodeConfig:
        """Give data sets a coordinate reference system (``"EPSG:4326"``, ``"OGC:CRS84"``, an EPSG code, a
        ``pyproj.CRS``; ``None``: none). A geographic CRS makes points longitude/latitude in degrees and every
        distance great-circle metres; a projected one is carried with the data (Euclidean distances in its
        units). Validated here (``ValueError`` for an unknown CRS; any but the common lon/lat names need pyproj:
        ``pip install distspatial[geo]``)."""
        from .crs import resolve_crs

        info = resolve_crs(crs)
        return self.replace(crs=None if info is None else info.name)

    def with_replication_factor(self, r: int) -> NodeConfig:
        """Set the number of copies of each partition."""
        return self.replace(replication_factor=r, fault_tolerance=r > 1 or self.fault_tolerance)

    @property
    def partition_count(self) -> int:
        """Partitions cut by ``distribute_data``: ``node_count * partitions_per_node``."""
        return self.node_count * self.partitions_per_node
