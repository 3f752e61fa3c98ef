"""One hop for small queries: a few online kNN, range or box queries go in one call to one node, no planning here.

The regular path (:mod:`distspatial.client.queries`) is built for batches: it splits the batch by home partition
through the dispatcher (failover, read balancing, counting), which costs about a millisecond of the client's time
per call whatever the batch size. A single query, or a handful, needs none of that: :class:`OneHop` keeps, per
metadata version, what the split needs (the quantization for curve keys, the partitions' key ranges and live
owners), computes the keys, picks a replica of the home partition (rotating among the live ones), and sends the
queries to it in one call with one pickled argument
(:meth:`~distspatial.node.query_rounds.QueryRoundsMixin.one_hop`). That node answers in its home partition and,
only when the k-th distance reaches past it, asks its peers (node-side planning, so the answer is exact). A
small kNN batch whose home partitions no single node holds goes as one call per node, all in flight together.

**Low latency** (opt-in, :meth:`OneHop.set_low_latency`): the one-hop calls go through a Ray compiled graph per
node (``experimental_compile``: a shared-memory channel to an execution loop in the node), ~0.45 ms a round trip
on 2 cores against ~1.4 ms for an actor call. The node's loop polls its channel: each node with a channel uses a
whole core while it is open, idle or not, so this is for machines with a core per node to spare; the channels
close with :meth:`OneHop.set_low_latency` ``(False)``, when the node set changes, on a channel failure (that call
falls back to an actor call) and with the client.

What it does not handle it leaves to the regular path, by returning ``None``: a node that fails, does not answer
within the communication timeout, or no longer holds a partition (the regular path then fails over, re-routes or
recovers), and partial answers. A node that knows a newer metadata version refuses the call
(:class:`~distspatial.core.errors.StaleMetadataError`), which propagates, so the caller's
:meth:`~distspatial.client.runtime.ClusterRuntime.stable` fetches the new view and plans again, as for any query.
"""

from __future__ import annotations

import dataclasses
import itertools
import pickle
import threading
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from ..core.codec import decode_all
from ..core.curves import small_batch_keys, warm_compiled_kernels
from ..core.errors import PartitionLostError, PartitionMovedError, StaleMetadataError
from .runtime import ClusterRuntime

__all__ = ["OneHop", "MAX_QUERIES"]

#: batches up to this many queries take the one-hop path when one node holds all their home partitions
MAX_QUERIES = 64

_warmed = threading.Event()


def _warm_in_background() -> None:
    """Load the compiled curve-key and planning kernels once per process, off the query's path."""
    if not _warmed.is_set():
        _warmed.set()
        threading.Thread(target=_warm, daemon=True, name="warm-curve-kernels").start()


def _warm() -> None:
    from ..kernels import query_planning

    warm_compiled_kernels()
    query_planning.warm_up()


@dataclass(frozen=True)
class _Plan:
    """What a one-hop call needs of one metadata version."""

    version: int  # the metadata version calls are sent with (may be newer than the view's: see _resend)
    base: int  # the version of the client's view the plan was made from
    keys: Callable[[np.ndarray], np.ndarray]
    key_lo: np.ndarray  # partitions' first keys, in curve order
    by_key: np.ndarray  # partition index of each position in curve order
    owners: tuple[tuple[int, ...], ...]  # live owners of each partition (empty: none live)
    failed: frozenset[int]


class OneHop:
    """The one-hop path of one client (see module docstring). ``calls`` / ``fallbacks`` count its use."""

    def __init__(self, rt: ClusterRuntime) -> None:
        self._rt = rt
        self._plan: _Plan | None = None
        self._turn = itertools.count()
        self._methods: dict[int, Any] = {}  # node -> its knn_batch handle in the "reads" group
        self._members = -1  # the node set those handles belong to
        self._low_latency = False
        self._channels: dict[int, _Channel | None] = {}  # node -> its compiled graph (None: could not open one)
        self._channels_lock = threading.Lock()
        self._local: tuple[int, Callable[[bytes], bytes]] | None = None  # (node, its one_hop) in this process
        self.calls = 0
        self.local_calls = 0  # calls answered by the node of this process, without Ray
        self.fallbacks = 0
        self.resent = 0  # calls sent again under a newer version with the layout unchanged (no view fetch)

    def _plan_now(self) -> _Plan:
        meta, routing, version = self._rt.snapshot()
        failed = frozenset(self._rt.failed_nodes)
        plan = self._plan
        if plan is not None and plan.base == version and plan.failed == failed:
            return plan
        _warm_in_background()
        if plan is None or plan.failed != failed or self._members != self._rt.view.members:
            self._methods = {}
            self._members = self._rt.view.members
            self._close_channels()
        owners = tuple(tuple(n for n in o if n not in failed) for o in routing.owners)
        plan = _Plan(version, version, small_batch_keys(meta.lo, meta.hi, meta.curve, meta.bits), routing.key_lo,
                     routing.by_key, owners, failed)
        self._plan = plan
        return plan

    def knn(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Exact ``(distances (m, k), ids (m, k))`` of a small batch in one call to one node, or ``None`` when
        the batch is not for this path (see module docstring)."""
        m = len(q)
        if m == 0 or m > MAX_QUERIES:
            return None
        plan = self._plan_now()
        pos = np.searchsorted(plan.key_lo, plan.keys(q), side="right") - 1
        np.clip(pos, 0, len(plan.key_lo) - 1, out=pos)
        home = plan.by_key[pos]
        if m == 1:
            order = None
            segments = [(int(home[0]), 0, 1)]
            parts = [int(home[0])]
        else:
            order = np.argsort(home, kind="stable")
            home = home[order]
            q = q[order]
            parts_a, starts = np.unique(home, return_index=True)
            parts = parts_a.tolist()
            bounds = starts.tolist() + [m]
            segments = [(p, bounds[i], bounds[i + 1]) for i, p in enumerate(parts)]
        node = self._node_for(plan, parts)
        if node is not None:
            out = self._call(node, ("knn", q, segments, k, plan.version))
            if out is None:
                return None
            dist, ids, _ = out
        else:  # the home partitions lie on several nodes: one call to each, all in flight together
            got = self._knn_spread(plan, q, segments, k)
            if got is None:
                return None
            dist, ids = got
        if order is None:
            return dist, ids
        out_d, out_i = np.empty_like(dist), np.empty_like(ids)
        out_d[order], out_i[order] = dist, ids
        return out_d, out_i

    def _knn_spread(self, plan: _Plan, q: np.ndarray, segments: list[tuple[int, int, int]],
                    k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """kNN of rows sorted by home partition (``segments``) whose partitions no single live node holds: a
        replica per partition (rotating), one ``one_hop`` call per node, answers put back in row order."""
        per_node: dict[int, list[tuple[int, int, int]]] = {}
        for p, a, b in segments:
            owners = plan.owners[p]
            if not owners:
                return None
            per_node.setdefault(owners[next(self._turn) % len(owners)], []).append((p, a, b))
        calls = []
        for node, segs in per_node.items():
            rows = np.concatenate([np.arange(a, b) for _, a, b in segs])
            local, at = [], 0
            for p, a, b in segs:
                local.append((p, at, at + b - a))
                at += b - a
            calls.append((node, rows, ("knn", q[rows], local, k, plan.version)))
        outs = self._call_many([(node, req) for node, _, req in calls])
        if outs is None:
            return None
        dist = np.empty((len(q), k))
        ids = np.empty((len(q), k), dtype=np.int64)
        for (_, rows, _), (d_, i_, _) in zip(calls, outs):
            dist[rows], ids[rows] = d_, i_
        return dist, ids

    def hits(self, kind: str, anchor: np.ndarray, arrays: tuple[np.ndarray, np.ndarray],
             return_points: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """A small range (``kind`` "ball", ``arrays`` = centres, radii) or box ("box", lo, hi) batch in one call
        to a node holding the home partition of ``anchor[0]`` (the first query's centre), which plans the
        partitions to visit and asks its peers: ``(counts (m,), ids, points or None)``, each query's hits after
        those of the queries before it, sorted by id; ``None`` when not for this path."""
        m = len(anchor)
        if m == 0 or m > MAX_QUERIES:
            return None
        plan = self._plan_now()
        pos = np.searchsorted(plan.key_lo, plan.keys(anchor[:1]), side="right") - 1
        home = int(plan.by_key[min(max(int(pos[0]), 0), len(plan.key_lo) - 1)])
        node = self._node_for(plan, [home])
        if node is None:
            return None
        out = self._call(node, (kind, *arrays, return_points, plan.version))
        return None if out is None else out[:3]

    def _call(self, node: int, request: tuple) -> Any:
        """``node.one_hop(request)`` in its "reads" group, counted; ``None`` when the node fails, does not
        answer within the communication timeout, or no longer holds a partition (the regular path handles
        those: failover, re-routing, recovery)."""
        out = self._call_many([(node, request)])
        return None if out is None else out[0]

    def _call_many(self, calls: list[tuple[int, tuple]]) -> list[Any] | None:
        """:meth:`_call` for several ``(node, request)`` at once (all sent, then all awaited). A node that knows
        a newer metadata version but no newer partition layout than the plan's (live ingest: every batch is a
        version, the key ranges and owners stay) gets the same requests again under that version, once, without
        a fetch from the controller; otherwise the refusal propagates (the caller fetches the view and plans
        again)."""
        try:
            return self._send_and_wait(calls)
        except StaleMetadataError as exc:
            plan = self._plan
            if plan is None or exc.layout is None or exc.layout > plan.base or exc.version <= plan.version:
                raise
            self._plan = dataclasses.replace(plan, version=exc.version)
            self.resent += 1
            return self._send_and_wait([(node, (*req[:-1], exc.version)) for node, req in calls])

    # -- low latency: compiled-graph channels ------------------------------------------------------------------
    def set_low_latency(self, enabled: bool) -> None:
        """Send one-hop calls through compiled-graph channels (``True``; opened per node on first use) or actor
        calls (``False``: open channels are closed). See the module docstring for the cost."""
        self._low_latency = bool(enabled)
        if not enabled:
            self._close_channels()

    @property
    def low_latency(self) -> bool:
        return self._low_latency

    @property
    def open_channels(self) -> list[int]:
        """Nodes with an open channel."""
        return sorted(n for n, ch in self._channels.items() if ch is not None)

    def close(self) -> None:
        """Close the channels and wait (up to 10 s) for their loops to stop: called before the nodes go."""
        self._low_latency = False
        self._close_channels(wait_s=10.0)

    def _close_channels(self, wait_s: float = 0.0) -> None:
        with self._channels_lock:
            channels, self._channels = self._channels, {}
        stopping = [ch.close() for ch in channels.values() if ch is not None]
        for t in stopping:
            if t is not None:
                t.join(wait_s)

    def _channel(self, node: int) -> _Channel | None:
        with self._channels_lock:
            if node in self._channels:
                return self._channels[node]
            ch = _Channel.open(self._rt.actor(node))
            self._channels[node] = ch
            return ch

    def _send_compiled(self, node: int, blob: bytes) -> bytes | None:
        """``one_hop(blob)`` on ``node`` through its channel; ``None`` when there is none or it failed (then it is
        closed, and the call goes as an actor call). Errors the node raised propagate as from an actor call."""
        ch = self._channel(node)
        if ch is None:
            return None
        try:
            return ch.call(blob, self._rt.dispatch.timeout_s)
        except _ChannelBroken:
            with self._channels_lock:
                if self._channels.get(node) is ch:
                    self._channels[node] = None  # not reopened until the node set changes
            ch.close()
            return None

    # -- a client inside a node's process -----------------------------------------------------------------------
    def set_local(self, node: int, one_hop: Callable[[bytes], bytes]) -> None:
        """This client runs in the process of ``node`` (a hosted service): calls to it go to ``one_hop`` directly,
        no Ray, and it is preferred among the replicas holding a query's home partitions."""
        self._local = (int(node), one_hop)

    def _send_local(self, blob: bytes) -> bytes | None:
        assert self._local is not None
        try:
            got = self._local[1](blob)
        except (PartitionMovedError, PartitionLostError):
            return None
        self.local_calls += 1
        return got

    def _send_and_wait(self, calls: list[tuple[int, tuple]]) -> list[Any] | None:
        rt = self._rt
        if self._local is not None and len(calls) == 1 and calls[0][0] == self._local[0]:
            blob = pickle.dumps(calls[0][1], protocol=pickle.HIGHEST_PROTOCOL)
            got = self._send_local(blob)
            if got is None:
                self.fallbacks += 1
                return None
            self.calls += 1
            return [decode_all(pickle.loads(got))]
        if self._low_latency and len(calls) == 1:
            node, request = calls[0]
            blob = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
            try:
                got = self._send_compiled(node, blob)
            except (PartitionMovedError, PartitionLostError):
                self.fallbacks += 1
                return None
            if got is not None:
                rt.comm.sent(node, len(blob))
                rt.comm.received(node, len(got))
                self.calls += 1
                return [decode_all(pickle.loads(got))]
        try:
            refs = []
            for node, request in calls:
                method = self._methods.get(node)
                if method is None:  # the handle with its options, made once per node set (``options``: ~50 us)
                    method = self._methods[node] = rt.actor(node).one_hop.options(concurrency_group="reads")
                blob = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)  # one bytes object: see one_hop
                rt.comm.sent(node, len(blob))
                refs.append(method.remote(blob))
            outs, first_error = [], None
            for (node, _), ref in zip(calls, refs):  # every answer fetched, errors too (none left unhandled)
                try:
                    blob = ray.get(ref, timeout=rt.dispatch.timeout_s)
                except Exception as exc:  # noqa: BLE001 - the first one is raised below
                    first_error = first_error or exc
                    continue
                rt.comm.received(node, len(blob))
                outs.append(decode_all(pickle.loads(blob)))
            if first_error is not None:
                raise first_error
        except (RayActorError, GetTimeoutError, PartitionMovedError, PartitionLostError):
            self.fallbacks += 1
            return None
        self.calls += 1
        return outs

    def _node_for(self, plan: _Plan, parts: list[int]) -> int | None:
        """A live node holding every partition of ``parts`` (rotating among replicas), or ``None``."""
        common: Any = plan.owners[parts[0]]
        for p in parts[1:]:
            common = [n for n in common if n in plan.owners[p]]
        if not common:
            return None
        if self._local is not None and self._local[0] in common:
            return self._local[0]
        return common[next(self._turn) % len(common)]


class _ChannelBroken(Exception):
    """A compiled-graph channel no longer works (its node died, it timed out): close it, use actor calls."""


class _Channel:
    """A compiled graph ``node.one_hop(input)`` (Ray's ``experimental_compile``), one call at a time."""

    def __init__(self, graph: Any) -> None:
        self._graph = graph
        self._lock = threading.Lock()  # one execution in flight: answers are read in the order they were sent
        self._closed = False

    @classmethod
    def open(cls, actor: Any) -> _Channel | None:
        """The channel to ``actor``, checked with one ping; ``None`` when it cannot be opened (e.g. the node's
        loop thread is taken by another client's channel)."""
        from ray.dag import InputNode

        try:
            with InputNode() as inp:
                dag = actor.one_hop.bind(inp)
            ch = cls(dag.experimental_compile())
        except Exception:  # noqa: BLE001 - any failure to compile: actor calls instead
            return None
        try:
            if ch.call(_PING, 5.0) != b"":
                raise _ChannelBroken("unexpected answer to a ping")
        except Exception:  # noqa: BLE001
            ch.close()
            return None
        return ch

    def call(self, blob: bytes, timeout_s: float) -> bytes:
        from ray.exceptions import RayChannelError, RayTaskError

        with self._lock:
            if self._closed:
                raise _ChannelBroken("closed")
            try:
                return ray.get(self._graph.execute(blob), timeout=timeout_s)
            except RayTaskError as exc:  # the node's own error (stale version, moved partition): as an actor call
                cause = getattr(exc, "cause", None)
                if isinstance(cause, RayActorError):
                    raise _ChannelBroken(str(exc)) from None
                raise
            except (RayChannelError, RayActorError, GetTimeoutError, TimeoutError) as exc:
                raise _ChannelBroken(str(exc)) from None

    def close(self) -> threading.Thread | None:
        """Tear the graph down in a background thread (returned; it waits for the node's loop to stop: up to
        Ray's teardown timeout when the node is gone)."""
        with self._lock:
            if self._closed:
                return None
            self._closed = True
        graph = self._graph

        def teardown() -> None:
            try:
                graph.teardown()
            except Exception:  # noqa: BLE001 - nothing more to do with a graph that fails to stop
                pass

        t = threading.Thread(target=teardown, daemon=True, name="distspatial-channel-teardown")
        t.start()
        return t


#: the request a new channel is checked with (``one_hop`` answers ``b""``)
_PING = pickle.dumps(("ping",), protocol=pickle.HIGHEST_PROTOCOL)
