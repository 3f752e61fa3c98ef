"""Dispatch: send per-partition work to replica nodes, one message per node, and fail over on node loss.

A round of work is a list of partitions. :class:`Dispatcher` picks one live replica per partition
(:meth:`RoutingTable.node_for`), asks the caller to build one call per node for the partitions it got, and
collects the results. When a node dies or does not answer within ``communication_timeout_ms``, its partitions are
regrouped onto other replicas and re-sent, up to ``max_retries`` times; the caller sees only complete results.
Errors raised by the node code itself (bad arguments, bugs) are not retried: they propagate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

from ..core.codec import decode_all, message_bytes
from ..core.errors import NodeFailureError, PartitionLostError, PartitionMovedError
from ..core.stats import CommunicationCounters

class RoutingTable(Protocol):
    """What the dispatcher needs of a routing table (:class:`distspatial.kernels.routing.RoutingTable`)."""

    owners: Any
    n_partitions: int

    def node_for(self, partition: int, load: dict[int, float] | None = None, exclude: set[int] | None = None) -> int:
        ...


try:  # Ray >= 2.20
    from ray.exceptions import ActorUnavailableError
except ImportError:  # pragma: no cover
    ActorUnavailableError = RayActorError  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)

__all__ = ["Dispatcher", "NodeMessages", "NODE_FAILURES"]

#: exceptions that mean "this node is gone or unreachable", as opposed to an error in the work itself.
NODE_FAILURES = (RayActorError, ActorUnavailableError, GetTimeoutError, ObjectLostError)

def ping_ref(actor: Any) -> Any:
    """A liveness ping in the node's ``control`` concurrency group: answered even while the node is busy with a
    long call (which then counts as slow, not dead)."""
    return actor.ping.options(concurrency_group="control").remote()


class NodeMessages:
    """Sending data messages to node actors and receiving their results, counted on this side (the client's
    runtime and the controller both talk to nodes this way). Needs ``self.comm`` (CommunicationCounters) and
    ``self.actor(node)``."""

    comm: CommunicationCounters

    def actor(self, node: int) -> Any:  # pragma: no cover - provided by the class that mixes this in
        raise NotImplementedError

    def send(self, node: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``node.method(*args, **kwargs)`` and count the message (object references count 0 bytes here:
        their bytes are counted by the node that produced them)."""
        self.comm.sent(node, message_bytes(args, kwargs))
        return getattr(self.actor(node), method).remote(*args, **kwargs)

    def send_multi(self, node: int, method: str, n_out: int, *args: Any) -> list:
        """Like :meth:`send` for a method with ``n_out`` results (Ray ``num_returns``): a list of references,
        which can travel on to other nodes without passing through the sender."""
        self.comm.sent(node, message_bytes(args))
        ref = getattr(self.actor(node), method).options(num_returns=n_out).remote(*args)
        return [ref] if n_out == 1 else list(ref)

    def recv(self, node: int, ref: Any, timeout: float | None = None) -> Any:
        """``ray.get`` a data message's result from ``node``, counting and decoding it."""
        res = ray.get(ref, timeout=timeout)
        self.comm.received(node, message_bytes(res))
        return decode_all(res)


#: ``build(node_id, partition_ids) -> (object_ref, context, payload_bytes)``
BuildCall = Callable[[int, list[int]], tuple[Any, Any, int]]



class Dispatcher:
    """Runs rounds of per-partition work on the nodes (see module docstring)."""

    def __init__(
        self,
        actors: dict[int, Any],
        timeout_s: float,
        max_retries: int,
        comm: CommunicationCounters,
        on_failure: Callable[[int, str], None] | None = None,
    ) -> None:
        self.actors = actors
        self.on_failure = on_failure  # told of every node this dispatcher marks failed (a client tells its controller)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.comm = comm
        self.failed_nodes: set[int] = set()
        self.failures: list[tuple[float, int, str]] = []
        self.inflight: dict[int, int] = {}  # calls sent and not yet answered, per node (read balancing)
        self._lock = threading.Lock()
        #: how long a call may run on a node that still answers pings (busy, e.g. compiling or a huge step)
        self.busy_limit_s = max(10 * timeout_s, 120.0)

    def alive(self, nodes: set[int], timeout_s: float | None = None) -> set[int]:
        """The nodes among ``nodes`` that answer a control-group ping within ``timeout_s`` (default: short)."""
        refs = {n: ping_ref(self.actors[n]) for n in nodes if n in self.actors}
        alive = set()
        for n, ref in refs.items():
            try:
                ray.get(ref, timeout=timeout_s or min(5.0, self.timeout_s))
                alive.add(n)
            except Exception:
                pass
        return alive

    def mark_failed(self, node: int, reason: str) -> None:
        with self._lock:
            if node not in self.failed_nodes:
                log.warning("distspatial: node %d marked failed: %s", node, reason)
                self.failed_nodes.add(node)
                self.failures.append((time.time(), node, reason))
            else:
                return
        if self.on_failure is not None:
            self.on_failure(node, reason)

    def mark_failed_if_dead(self, timeout_s: float | None = None) -> list[int]:
        """Ping every node not yet failed; mark those that do not answer. Returns the newly failed ones."""
        live = {n for n in self.actors if n not in self.failed_nodes}
        newly = sorted(live - self.alive(live, timeout_s or self.timeout_s))
        for n in newly:
            self.mark_failed(n, "no answer to a ping")
        return newly

    def assign(
        self,
        partitions: list[int],
        routing: RoutingTable,
        exclude: set[int],
        missing: list[int] | None = None,
        balance: bool = True,
    ) -> dict[int, list[int]]:
        """``{node: [partition, ...]}`` choosing one live replica per partition.

        With ``balance``, each partition goes to the replica with the fewest calls in flight (counting the ones
        this round already gave it), else always to its first live owner (stable, as k-means state needs).
        Partitions without a live replica raise :class:`PartitionLostError`, or, when ``missing`` is a list, are
        appended to it and skipped (the caller asked for a partial answer).
        """
        by_node: dict[int, list[int]] = {}
        lost = []
        load = {n: float(c) for n, c in self.inflight.items()} if balance else None
        for pid in partitions:
            try:
                node = routing.node_for(pid, load=load, exclude=exclude)
                if load is not None:
                    load[node] = load.get(node, 0.0) + 1.0 / max(1, len(partitions))
            except LookupError:
                lost.append(pid)
                continue
            by_node.setdefault(node, []).append(pid)
        if lost and missing is not None:
            missing.extend(lost)
        elif lost:
            every = [p for p in range(routing.n_partitions) if all(o in exclude for o in routing.owners[p])]
            raise PartitionLostError(
                f"every replica of partitions {every} is unavailable (failed nodes: {sorted(exclude)}); this call "
                f"needs {sorted(lost)}. Restore from a checkpoint, distribute the data again, or pass "
                f"allow_partial=True for an answer from the other partitions",
                every,
            )
        return by_node

    def run(
        self,
        partitions: list[int],
        routing: RoutingTable,
        build: BuildCall,
        current: Callable[[], RoutingTable] | None = None,
        missing: list[int] | None = None,
        balance: bool = True,
    ) -> list[tuple[Any, Any]]:
        """Run one round over ``partitions``; returns ``[(context, result), ...]`` covering each partition once.

        ``current()`` gives the newest routing table, used to re-plan partitions that moved while the round ran.
        With ``missing`` (a list), partitions that have no live replica are skipped and recorded there.
        """
        exclude = set(self.failed_nodes)
        pending = self.assign(sorted(set(int(p) for p in partitions)), routing, exclude, missing, balance)
        results: list[tuple[Any, Any]] = []
        attempt = 0
        while pending:
            calls = []
            gone: list[int] = []
            for node, pids in pending.items():
                try:
                    ref, ctx, nbytes = build(node, pids)
                except PartitionMovedError:  # the node was removed after this round was planned: re-plan
                    gone.extend(pids)
                    continue
                self.comm.sent(node, nbytes)
                with self._lock:
                    self.inflight[node] = self.inflight.get(node, 0) + 1
                calls.append((ref, node, pids, ctx))
            refs = [c[0] for c in calls]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
            waited = self.timeout_s
            # no answer yet: a node that still answers a ping is busy (possibly waiting on a peer that is gone),
            # not gone itself -- wait on for those (bounded); the ones that do not answer are given up below
            silent: set[int] = set()
            while len(ready) < len(refs) and waited < self.busy_limit_s:
                got = set(ready)
                slow = [c for c in calls if c[0] not in got and c[1] not in silent]
                alive = self.alive({c[1] for c in slow})
                silent |= {c[1] for c in slow} - alive
                busy = [c for c in slow if c[1] in alive]
                if not busy:
                    break
                more, _ = ray.wait([c[0] for c in busy], num_returns=len(busy), timeout=self.timeout_s)
                ready = list(ready) + list(more)
                waited += self.timeout_s
            ready_set = set(ready)
            with self._lock:
                for _, node, _, _ in calls:
                    self.inflight[node] -= 1
            retry: list[int] = list(gone)
            moved = bool(gone)
            for ref, node, pids, ctx in calls:
                if ref not in ready_set:
                    self.mark_failed(node, f"no answer within {waited:.1f} s")
                    exclude.add(node)
                    retry.extend(pids)
                    continue
                try:
                    res = ray.get(ref)
                except NODE_FAILURES as exc:
                    self.mark_failed(node, type(exc).__name__)
                    exclude.add(node)
                    retry.extend(pids)
                    continue
                except RayTaskError as exc:
                    if not isinstance(getattr(exc, "cause", None), PartitionMovedError):
                        raise
                    moved = True  # planned on an older metadata version: re-plan with the current one
                    retry.extend(pids)
                    continue
                self.comm.received(node, message_bytes(res))
                results.append((ctx, decode_all(res)))
            if retry:
                attempt += 1
                if attempt > self.max_retries:
                    raise NodeFailureError(
                        f"partitions {sorted(retry)} failed on {attempt} nodes in a row "
                        f"(max_retries={self.max_retries}); failed nodes: {sorted(exclude)}"
                    )
                if moved and current is not None:
                    routing = current()
                pending = self.assign(sorted(retry), routing, exclude, missing, balance)
            else:
                pending = {}
        return results
