"""Compiled (Numba) parts of the query planning and merging of :mod:`distspatial.kernels.query_planning`. No Ray.

``put_rows``: answers put back in the caller's order, ``dst[rows[j]] = src[j]`` row by row (~0.6x NumPy's
fancy assignment for rows in curve order, i.e. scattered over the caller's array).

The pairs ``(query, partition)`` a ball can reach, found per query in one pass instead of a dozen NumPy passes
over the whole batch (~0.17-0.3 s for 500K queries over 8 partitions before, about a tenth of a node's batched
kNN time): the grid cells a ball touches (:func:`corner_cells`), then, with the cells' curve keys computed by
the exact NumPy key functions, the partitions whose key ranges meet those cells and whose boxes pass the
MINDIST test (:func:`cell_and_box_pairs`). The arithmetic is the NumPy path's, in the same order: quantization
as :func:`~distspatial.core.curves.quantize`, box distances as
:func:`~distspatial.kernels.routing.box_mindist2`, so both paths plan the same pairs (``tests/test_planning.py``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["corner_cells", "cell_and_box_pairs", "put_rows", "READY"]

#: set once :func:`warm_up` has loaded every kernel here (small batches take the NumPy path until then)
READY = False


@njit(cache=True, nogil=True, inline="always")
def _cell(x, lo, scale, top):  # pragma: no cover - compiled
    """Grid coordinate of ``x`` as ``quantize`` computes it (NaN and negatives -> 0, clipped at ``top``)."""
    f = (x - lo) * scale
    if not f > 0.0:
        f = 0.0
    if f > top:
        f = top
    return np.uint64(f)


@njit(cache=True, nogil=True)
def corner_cells(queries, limit2, lo, scale, top, shift, max_corners):  # pragma: no cover - compiled
    """For each query whose ball (radius ``sqrt(limit2[i])``) spans at most two cells per dimension at the grid
    level ``bits - shift``: the full-resolution grid coordinates of the lower corners of the (at most ``2**d``)
    cells it touches. Returns ``(handled (m,) bool, owner (c,) int64, grid (c, d) uint64)``: ``owner`` names
    each cell's query, ascending."""
    m, d = queries.shape
    handled = np.zeros(m, dtype=np.bool_)
    owner = np.empty(m * max_corners, dtype=np.int64)
    grid = np.empty((m * max_corners, d), dtype=np.uint64)
    clo = np.empty(d, dtype=np.uint64)
    wide = np.empty(d, dtype=np.bool_)
    sh = np.uint64(shift)
    c = 0
    for i in range(m):
        lim = limit2[i]
        if not (lim >= 0.0 and lim < np.inf):
            continue
        r = np.sqrt(lim)
        ok = True
        for t in range(d):
            a = _cell(queries[i, t] - r, lo[t], scale[t], top) >> sh
            b = _cell(queries[i, t] + r, lo[t], scale[t], top) >> sh
            if b - a > np.uint64(1):
                ok = False
                break
            clo[t] = a
            wide[t] = b != a
        if not ok:
            continue
        handled[i] = True
        for pattern in range(1 << d):
            fits = True
            for t in range(d):
                if (pattern >> t) & 1 and not wide[t]:
                    fits = False
                    break
            if not fits:
                continue
            for t in range(d):
                grid[c, t] = (clo[t] + np.uint64((pattern >> t) & 1)) << sh
            owner[c] = i
            c += 1
    return handled, owner[:c], grid[:c]


@njit(cache=True, nogil=True, inline="always")
def _box_d2(queries, i, lo, hi, p):  # pragma: no cover - compiled
    """Squared MINDIST from query ``i`` to box ``p``, the arithmetic of ``routing.box_mindist2``."""
    s = 0.0
    for t in range(queries.shape[1]):
        x = queries[i, t]
        gap = max(lo[p, t] - x, 0.0) + max(x - hi[p, t], 0.0)
        s += gap * gap
    return s


@njit(cache=True, nogil=True, inline="always")
def _within(queries, i, lo, hi, p, lim, strict):  # pragma: no cover - compiled
    """The box test: box ``p`` closer to query ``i`` than ``sqrt(lim)`` (or as close, unless ``strict``)."""
    d2 = _box_d2(queries, i, lo, hi, p)
    return d2 < lim or (d2 == lim and not strict)


@njit(cache=True, nogil=True)
def cell_and_box_pairs(queries, limit2, exclude, strict, box_lo, box_hi, by_key, handled, owner, first,
                       last):  # pragma: no cover - compiled
    """Pairs ``(query, partition)`` in query order: for a ``handled`` query the partitions (positions
    ``first[c]..last[c]`` of ``by_key``) of its cells ``c`` (``owner[c] == query``), each once, that pass the box
    test; for any other query every partition passing the box test. The box test keeps ``d2 < limit2`` when
    ``strict``, else ``d2 <= limit2``; ``exclude[i]`` (a partition or -1) is never paired with query ``i``."""
    m = queries.shape[0]
    n_parts = box_lo.shape[0]
    n_cells = owner.shape[0]
    # first pass: count, second: fill (no growing buffers)
    seen = np.full(n_parts, -1, dtype=np.int64)  # the last query each partition was tested for
    total = 0
    for rnd in range(2):
        if rnd == 1:
            rows = np.empty(total, dtype=np.int64)
            parts = np.empty(total, dtype=np.int64)
            seen[:] = -1
        n = 0
        c = 0
        for i in range(m):
            lim = limit2[i]
            ex = exclude[i]
            if handled[i]:
                while c < n_cells and owner[c] == i:
                    for pos in range(first[c], last[c] + 1):
                        p = by_key[pos]
                        if p == ex or seen[p] == i:
                            continue
                        seen[p] = i
                        if _within(queries, i, box_lo, box_hi, p, lim, strict):
                            if rnd == 1:
                                rows[n], parts[n] = i, p
                            n += 1
                    c += 1
            else:
                for p in range(n_parts):
                    if p == ex:
                        continue
                    if _within(queries, i, box_lo, box_hi, p, lim, strict):
                        if rnd == 1:
                            rows[n], parts[n] = i, p
                        n += 1
        total = n
    return rows, parts


@njit(cache=True, nogil=True)
def put_rows(dst, rows, src):  # pragma: no cover - compiled
    """``dst[rows[j], :] = src[j, :]`` for every ``j``."""
    k = src.shape[1]
    for j in range(rows.shape[0]):
        r = rows[j]
        for t in range(k):
            dst[r, t] = src[j, t]

def warm_up() -> None:
    """Compile (or load from Numba's disk cache, ~0.3 s) the kernels on tiny inputs: nodes and clients call this
    in a background thread at start, so that their first large kNN batch does not pay it."""
    from ..core.curves import grid_keys, quantization

    q = np.array([[0.25, 0.25], [0.5, 0.75]])
    lim = np.array([0.01, np.inf])
    grid_keys(np.zeros((1, 2), dtype=np.uint64), "hilbert", 2)  # the corner cells' keys
    lo, scale, top = quantization(np.zeros(2), np.ones(2), 2)  # the array types (read-only) of real calls
    handled, owner, grid = corner_cells(q, lim, lo, scale, top, 1, 4)
    box = np.array([[0.0, 0.0], [0.5, 0.5]])
    pos = np.zeros(len(owner), dtype=np.int64)
    cell_and_box_pairs(q, lim, np.full(2, -1, dtype=np.int64), True, box, box + 0.5, np.arange(2, dtype=np.int64),
                       handled, owner, pos, pos)
    rows = np.arange(2, dtype=np.int64)
    put_rows(np.empty((2, 2)), rows, q)
    put_rows(np.empty((2, 2), dtype=np.int64), rows, np.zeros((2, 2), dtype=np.int64))
    global READY
    READY = True
