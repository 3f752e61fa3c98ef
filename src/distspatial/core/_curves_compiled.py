"""Compiled (Numba) Hilbert keys for 2 <= d <= 4: quantization and the table walk in one pass over the points.

The same state machine as the NumPy table path of :mod:`distspatial.core.curves` (the tables come from there),
walked point by point with tables small enough to stay in the L1 cache (the NumPy path gathers from tables of
up to 2**19 entries, one level group at a time over the whole chunk); the tables are passed in. Quantization is the same arithmetic in
the same order, so both paths give identical keys (checked in ``tests/test_curves.py``). Compiled on first use
and cached on disk (``cache=True``).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_U64 = np.uint64


@lru_cache(maxsize=None)
def _kernel():
    from numba import njit

    @njit(cache=True, nogil=True)
    def hilbert_points(points, lo, scale, top, tab1, tab, levels, bits, out):  # pragma: no cover - compiled
        n, d = points.shape
        one = np.uint64(1)
        du = np.uint64(d)
        width = np.uint64(levels * d)
        mask1 = (one << du) - one
        mask = (one << width) - one
        lmask = (one << np.uint64(levels)) - one
        lead = bits % levels
        q = np.empty(d, np.uint64)
        for i in range(n):
            for j in range(d):
                f = (points[i, j] - lo[j]) * scale[j]
                if not f > 0.0:  # NaN (inf * 0 for a zero-extent dimension) and negatives -> 0
                    f = 0.0
                if f > top:
                    f = top
                q[j] = np.uint64(f)
            state = np.uint64(0)
            key = np.uint64(0)
            sh = bits
            for _ in range(lead):
                sh -= 1
                s = np.uint64(sh)
                digit = np.uint64(0)
                for j in range(d):
                    digit = (digit << one) | ((q[j] >> s) & one)
                e = tab1[(state << du) | digit]
                key = (key << du) | (e & mask1)
                state = e >> du
            while sh > 0:
                sh -= levels
                s = np.uint64(sh)
                digit = np.uint64(0)
                for j in range(d):
                    digit = (digit << np.uint64(levels)) | ((q[j] >> s) & lmask)
                e = tab[(state << width) | digit]
                key = (key << width) | (e & mask)
                state = e >> width
            out[i] = key

    return hilbert_points



def hilbert_points(points: np.ndarray, lo: np.ndarray, scale: np.ndarray, top: float, bits: int,
                   tables: tuple[np.ndarray, np.ndarray, int]) -> np.ndarray:
    """Hilbert keys of ``(n, d)`` points (2 <= d <= 4) quantized with ``lo``/``scale``/``top`` (as
    :func:`~distspatial.core.curves._quantize_into`) to ``bits`` per dimension; ``(n,)`` uint64. ``tables``:
    ``(one-level table, levels-level table, levels)`` as :func:`~distspatial.core.curves._small_tables` makes
    them (uint64 entries ``(next_state << width) | key bits``, indexed ``state << width | digit``)."""
    d = points.shape[1]
    tab1, tab, levels = tables
    out = np.empty(points.shape[0], dtype=_U64)
    pts = np.ascontiguousarray(points, dtype=np.float64)
    _kernel()(pts, np.ascontiguousarray(lo[:d], dtype=np.float64), np.ascontiguousarray(scale[:d], dtype=np.float64),
              float(top), tab1, tab, int(levels), int(bits), out)
    return out


@lru_cache(maxsize=None)
def _morton_kernel():
    from numba import njit

    @njit(cache=True, nogil=True)
    def morton_points(points, lo, scale, top, bits, out):  # pragma: no cover - compiled
        n, d = points.shape
        one = np.uint64(1)
        du = np.uint64(d)
        for i in range(n):
            key = np.uint64(0)
            for j in range(d):
                f = (points[i, j] - lo[j]) * scale[j]
                if not f > 0.0:
                    f = 0.0
                if f > top:
                    f = top
                q = np.uint64(f)
                # bit b of dimension j goes to bit b*d + (d-1-j): dimension 0 most significant within a level
                pos = np.uint64(d - 1 - j)
                for b in range(bits):
                    key |= ((q >> np.uint64(b)) & one) << pos
                    pos += du
            out[i] = key

    return morton_points


def morton_points(points: np.ndarray, lo: np.ndarray, scale: np.ndarray, top: float, bits: int) -> np.ndarray:
    """Morton keys of ``(n, d)`` points quantized as :func:`hilbert_points` does; ``(n,)`` uint64."""
    d = points.shape[1]
    out = np.empty(points.shape[0], dtype=_U64)
    pts = np.ascontiguousarray(points, dtype=np.float64)
    _morton_kernel()(pts, np.ascontiguousarray(lo[:d], dtype=np.float64),
                     np.ascontiguousarray(scale[:d], dtype=np.float64), float(top), int(bits), out)
    return out
