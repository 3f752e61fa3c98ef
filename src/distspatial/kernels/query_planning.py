"""Query planning: which query goes to which partition in which round. Pure NumPy; no Ray.

kNN over a batch runs in two rounds (:func:`knn_home` then :func:`knn_followups`):

1. every query goes to its *home* partition, the one whose curve-key range holds the query's own curve key
   (queries are sorted by key first, so each partition's queries are one contiguous run, in curve order, which
   is also the order a KD-tree answers fastest);
2. with the k-th distance ``r`` found in round 1, a query goes on to every other partition whose bounding box is
   closer than ``r`` (MINDIST pruning); those partitions return only candidates within ``r``.

Range and box queries need one round (:func:`ball_pairs`, :func:`box_pairs`). The result of planning is always a
set of ``(query row, partition)`` pairs grouped by partition: :class:`Assignment`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

from .local_index import merge_topk
from .routing import RoutingTable

__all__ = ["Assignment", "knn_home", "home_in_curve_order", "put_rows", "knn_followups", "warm_up", "ball_pairs", "box_pairs", "merge_candidates", "stack_groups"]



@dataclass
class Assignment:
    """Query rows grouped by partition: rows ``rows[starts[j]:starts[j+1]]`` go to ``partitions[j]``."""

    rows: np.ndarray  # int64 query row of each pair, grouped by partition
    partitions: np.ndarray  # int64 partition ids, one per group
    starts: np.ndarray  # int64, len(partitions) + 1
    n_queries: int = 0  # rows of the query batch (some may have no pair)

    @classmethod
    def from_pairs(cls, rows: np.ndarray, parts: np.ndarray, n_queries: int) -> Assignment:
        """Group pairs by partition, keeping the rows' order inside each partition."""
        # partition numbers as the narrowest unsigned type: numpy sorts those with a radix sort
        narrow = parts.astype(np.min_scalar_type(max(1, int(parts.max())))) if len(parts) and parts.min() >= 0 else parts
        order = np.argsort(narrow, kind="stable")
        rows, parts = rows[order], parts[order]
        return cls._from_sorted(rows, parts, n_queries)

    @classmethod
    def _from_sorted(cls, rows: np.ndarray, parts: np.ndarray, n_queries: int) -> Assignment:
        if len(parts) == 0:
            return cls(rows.astype(np.int64), np.empty(0, np.int64), np.zeros(1, np.int64), n_queries)
        cut = np.flatnonzero(parts[1:] != parts[:-1]) + 1
        starts = np.concatenate([[0], cut, [len(parts)]]).astype(np.int64)
        return cls(rows.astype(np.int64, copy=False), parts[starts[:-1]].astype(np.int64), starts, n_queries)

    def groups(self) -> dict[int, np.ndarray]:
        """``{partition: rows}``."""
        return {int(p): self.rows[a:b] for p, a, b in zip(self.partitions, self.starts[:-1], self.starts[1:])}

    @property
    def n_pairs(self) -> int:
        return len(self.rows)


def knn_home(sorted_keys: np.ndarray, routing: RoutingTable) -> Assignment:
    """Round 1: each query (already sorted by curve key) to its home partition."""
    home = routing.home_partitions(sorted_keys)
    return Assignment._from_sorted(np.arange(len(home), dtype=np.int64), home, len(home))


def home_in_curve_order(keys: np.ndarray, routing: RoutingTable) -> Assignment:
    """Round 1 planned by a client: each query (``keys``: curve keys in caller order) to its home partition, the
    rows of each partition in curve order, so the node answering them needs no sort of its own (and no scatter
    back: its answers come in the order of the rows it was sent)."""
    order = np.argsort(keys)  # equal keys share a partition: no stable sort needed (NumPy's is ~2x faster here)
    return Assignment._from_sorted(order.astype(np.int64, copy=False), routing.home_partitions(np.take(keys, order)),
                                   len(keys))


#: answers of at least this many rows are put in place by the compiled row copy
_PUT_MIN_ROWS = 16_384


def put_rows(dst: np.ndarray, rows: np.ndarray, src: np.ndarray) -> None:
    """``dst[rows] = src`` for 2-D ``dst`` and ``src`` of one dtype: answers put back in the caller's order;
    compiled for large ``rows`` (scattered rows, as curve order leaves them: ~0.6x NumPy's time)."""
    if len(rows) >= _PUT_MIN_ROWS and dst.dtype == src.dtype and dst.flags.c_contiguous and src.ndim == 2:
        from ._planning_compiled import put_rows as compiled

        compiled(dst, np.ascontiguousarray(rows, dtype=np.int64), np.ascontiguousarray(src))
    else:
        dst[rows] = src


#: the cell test enumerates 2**d cells per query; above this dimension only the box test is used.
_CELL_MAX_DIM = 4


def _cell_level(radii: np.ndarray, routing: RoutingTable) -> int:
    """Grid level whose cells are at least as wide as the typical ball's diameter (0 = no useful level)."""
    ext = routing.min_extent
    if len(radii) <= 64:  # a few online queries: no NumPy calls (each costs more than the whole choice here)
        finite = sorted(x for x in radii.tolist() if math.isfinite(x))
        r = finite[len(finite) // 2] if finite else math.nan
    else:
        sample = radii[:: max(1, len(radii) // 8192)]  # the level is a heuristic (any level plans exactly)
        finite = sample[np.isfinite(sample)]
        r = float(np.median(finite)) if len(finite) else math.nan
    if math.isnan(r) or ext <= 0:
        return 0
    if r <= 0:
        return routing.bits
    level = math.floor(math.log2(ext / (2.0 * r)))
    return max(0, min(routing.bits, level))


def _expand_ranges(rows: np.ndarray, first: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All pairs ``(row, p)`` with ``first <= p <= last``, vectorized."""
    cnt = np.maximum(last - first + 1, 0)
    total = int(cnt.sum())
    if total == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    offs = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    return np.repeat(rows, cnt), np.repeat(first, cnt) + offs


def _cell_pairs(
    centers: np.ndarray, radii: np.ndarray, routing: RoutingTable
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact space-partition test: the partitions whose curve-key range meets a grid cell the ball touches.

    Data points get their keys from the same quantization, so a point inside a ball lies in one of the cells
    between the cells of ``center - r`` and ``center + r``, and its key lies in that cell's key range (an
    aligned cell is one contiguous key range on both curves). Used for balls spanning at most two cells per
    dimension at a level chosen from the radii; returns ``(rows, partitions, handled_mask)``.
    """
    from ..core.curves import hilbert_keys, morton_keys, quantize

    m, d = centers.shape
    handled = np.zeros(m, dtype=bool)
    level = _cell_level(radii, routing)
    if d > _CELL_MAX_DIM or level == 0 or routing.dim != d:
        return np.empty(0, np.int64), np.empty(0, np.int64), handled
    bits = routing.bits
    shift = np.uint64(bits - level)
    finite = np.isfinite(radii)
    idx = np.flatnonzero(finite)
    r = radii[idx, None]
    g_lo = quantize(centers[idx] - r, routing.lo, routing.hi, bits) >> shift
    g_hi = quantize(centers[idx] + r, routing.lo, routing.hi, bits) >> shift
    # Work on columns: reductions along a short last axis are slow in numpy.
    lo_cols = [np.ascontiguousarray(g_lo[:, j]) for j in range(d)]
    spans = [g_hi[:, j] - lo_cols[j] for j in range(d)]
    ok = spans[0] <= 1
    for j in range(1, d):
        ok &= spans[j] <= 1
    sel_ok = np.flatnonzero(ok)
    idx = idx[sel_ok]
    lo_cols = [c[sel_ok] for c in lo_cols]
    wide = [spans[j][sel_ok] == 1 for j in range(d)]  # the ball reaches the next cell in dimension j
    handled[idx] = True
    key_shift = np.uint64(d * (bits - level))
    low_mask = (np.uint64(1) << key_shift) - np.uint64(1) if key_shift < 64 else np.uint64(2**64 - 1)
    to_keys = hilbert_keys if routing.curve == "hilbert" else morton_keys
    rows_out, parts_out = [], []
    for pattern in range(1 << d):  # each corner cell of the (at most 2 x ... x 2) block the ball touches
        dims = [j for j in range(d) if (pattern >> j) & 1]
        if dims:
            fresh = wide[dims[0]].copy()
            for j in dims[1:]:
                fresh &= wide[j]
            sel = np.flatnonzero(fresh)
        else:
            sel = np.arange(len(idx))
        cell = np.empty((len(sel), d), dtype=np.uint64)
        for j in range(d):
            cell[:, j] = lo_cols[j][sel] + np.uint64(1 if j in dims else 0)
        if len(cell) == 0:
            continue
        key = to_keys(cell << shift, bits)
        a = key & ~low_mask
        first, last = routing.partitions_in_key_range(a, a | low_mask)
        r_, p_ = _expand_ranges(idx[sel], first, last)
        rows_out.append(r_)
        parts_out.append(routing.by_key[p_])
    if not rows_out:
        return np.empty(0, np.int64), np.empty(0, np.int64), handled
    return np.concatenate(rows_out), np.concatenate(parts_out), handled


def _pairs_within(
    queries: np.ndarray, limit2: np.ndarray, routing: RoutingTable, strict: bool, exclude: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(query, partition)`` that can hold a point within ``sqrt(limit2)`` of the query: each pair passes
    the box (MINDIST) test and, where it applies, the cell test. Compiled (:func:`_pairs_compiled`), except for a
    small batch in a process that has not loaded the compiled kernels yet (:func:`warm_up` loads them in the
    background: a few online queries never wait for a compile, which takes seconds on a cold cache)."""
    if len(queries) * routing.n_partitions <= _SMALL_PAIRS and not _compiled_ready():
        return _pairs_within_small(queries, limit2, routing, strict, exclude)
    return _pairs_compiled(queries, limit2, routing, strict, exclude)


def _compiled_ready() -> bool:
    # the warm-up thread may be importing the module right now: it is in sys.modules before READY exists
    return getattr(sys.modules.get(__package__ + "._planning_compiled"), "READY", False)


def _pairs_compiled(
    queries: np.ndarray, limit2: np.ndarray, routing: RoutingTable, strict: bool, exclude: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_pairs_within` of a large batch in two compiled passes around the NumPy key functions: the cells
    each ball touches (when it spans at most two per dimension at the level :func:`_cell_level` picks), their
    curve keys, then per query the partitions of those cells (or of every partition, for the other queries)
    that pass the box test. The same pairs as :func:`_cell_pairs` with the box test (at the same level), in one
    pass per query."""
    from ..core.curves import grid_keys
    from ._planning_compiled import cell_and_box_pairs, corner_cells

    m, d = queries.shape
    q = np.ascontiguousarray(queries, dtype=np.float64)
    limit2 = np.ascontiguousarray(limit2, dtype=np.float64)
    level = _cell_level(np.sqrt(limit2), routing)
    first = last = owner = np.empty(0, np.int64)
    handled = np.zeros(m, dtype=bool)
    if d <= _CELL_MAX_DIM and level > 0 and routing.dim == d:
        bits = routing.bits
        q_lo, scale, top = routing.quantization
        handled, owner, grid = corner_cells(q, limit2, q_lo, scale, top, bits - level, 1 << d)
        if len(owner):
            key_shift = np.uint64(d * (bits - level))
            low_mask = (np.uint64(1) << key_shift) - np.uint64(1) if key_shift < 64 else np.uint64(2**64 - 1)
            key = grid_keys(grid, routing.curve, bits)
            a = key & ~low_mask
            first, last = routing.partitions_in_key_range(a, a | low_mask)
    ex = np.full(m, -1, dtype=np.int64) if exclude is None else np.ascontiguousarray(exclude, dtype=np.int64)
    return cell_and_box_pairs(q, limit2, ex, strict, routing.box_lo, routing.box_hi, routing.by_key, handled,
                              owner, first, last)


#: batches with at most this many (query, partition) combinations are planned box test first
_SMALL_PAIRS = 4096


def _pairs_within_small(
    queries: np.ndarray, limit2: np.ndarray, routing: RoutingTable, strict: bool, exclude: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_pairs_within` for a small batch: the same pairs (box test, and the cell test where it applies),
    the cell test run only on the queries the box test leaves with some partition."""
    m = len(queries)
    d2 = routing.mindist2(queries)
    lim = limit2[:, None]
    mask = d2 < lim if strict else d2 <= lim
    if exclude is not None:
        mask[np.arange(m), exclude] = False
    rows, parts = np.nonzero(mask)
    if not len(rows):
        return rows.astype(np.int64), parts.astype(np.int64)
    live = np.unique(rows)
    cell_rows, cell_parts, handled = _cell_pairs(queries[live], np.sqrt(limit2[live]), routing)
    if handled.any():
        n_p = routing.n_partitions
        in_cells = np.isin(rows * n_p + parts, live[cell_rows] * n_p + cell_parts)
        was_handled = np.zeros(m, dtype=bool)
        was_handled[live[handled]] = True
        keep = in_cells | ~was_handled[rows]
        rows, parts = rows[keep], parts[keep]
    return rows.astype(np.int64), parts.astype(np.int64)


def box_mindist2_pairs(points: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Squared distance from ``points[i]`` to box ``[lo[i], hi[i]]``, row by row."""
    gap = np.maximum(lo - points, 0.0) + np.maximum(points - hi, 0.0)
    return (gap * gap).sum(axis=1)


def knn_followups(
    queries: np.ndarray, kth: np.ndarray, home: np.ndarray, routing: RoutingTable
) -> Assignment:
    """Round 2: pairs ``(query, partition)`` whose box is strictly closer than the query's k-th distance.

    A box exactly at the k-th distance can only hold ties, so it is skipped.
    """
    rows, parts = _pairs_within(queries, kth * kth, routing, strict=True, exclude=home)
    return Assignment.from_pairs(rows, parts, len(queries))


def ball_pairs(centers: np.ndarray, radii: np.ndarray, routing: RoutingTable) -> Assignment:
    """Pairs ``(query, partition)`` whose box lies within each query's radius (inclusive)."""
    rows, parts = _pairs_within(centers, radii * radii, routing, strict=False, exclude=None)
    return Assignment.from_pairs(rows, parts, len(centers))


def box_pairs(lo: np.ndarray, hi: np.ndarray, routing: RoutingTable) -> Assignment:
    """Pairs ``(query box, partition)`` whose boxes intersect."""
    rows, parts = np.nonzero(routing.boxes_meet(lo, hi))
    return Assignment.from_pairs(rows, parts, len(lo))


def merge_candidates(dist: np.ndarray, ids: np.ndarray, rows: np.ndarray, d_: np.ndarray, i_: np.ndarray,
                     k: int) -> None:
    """Merge candidate rows ``(d_, i_)`` of queries ``rows`` into the running top-k ``(dist, ids)`` in place;
    ``rows`` may repeat a query (two partitions in one message): merged in passes of unique rows."""
    pending = np.arange(len(rows))
    while len(pending):
        r = rows[pending]
        _, first = np.unique(r, return_index=True)
        take = pending[first]
        rr = rows[take]
        dist[rr], ids[rr] = merge_topk(dist[rr], ids[rr], d_[take], i_[take], k)
        pending = np.setdiff1d(pending, take, assume_unique=True)


def stack_groups(groups: dict[int, np.ndarray], pids: list[int]) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """The rows of partitions ``pids`` (from :meth:`Assignment.groups`) one after another, and the segments
    ``(partition, start, stop)`` addressing them in that message: one message per node for several partitions."""
    parts = [groups[p] for p in pids]
    rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
    bounds = np.cumsum([0] + [len(r) for r in parts])
    return rows, [(int(p), int(bounds[j]), int(bounds[j + 1])) for j, p in enumerate(pids)]


def warm_up() -> None:
    """Load the compiled planning and merging kernels (Numba's disk cache; compiled on a first run) now: nodes
    and clients call this in a background thread at start, off the path of their first large batch."""
    from ._planning_compiled import warm_up as load

    load()
