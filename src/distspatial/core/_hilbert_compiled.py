"""Compiled (Numba) Hilbert keys of grid cells for 2 <= d <= 4 (a few cells at a time: the corner cells of the
follow-up planning), the state machine of :mod:`distspatial.core._curves_compiled` walked cell by cell.

The walk is that kernel's loop body: sharing it through a compiled call made the bulk point kernel 2x slower
(0.12 -> 0.25-0.35 s for 4M points), so it is written in both places. Module-level functions, imported on first
use: Numba caches these on disk (not closures over other compiled functions)."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, inline="always")
def _walk(q, d, tab1, tab, levels, bits):  # pragma: no cover - compiled
    """The Hilbert key of grid cell ``q`` (``d`` uint64 coordinates; bits above ``bits`` ignored)."""
    one = np.uint64(1)
    du = np.uint64(d)
    width = np.uint64(levels * d)
    mask1 = (one << du) - one
    mask = (one << width) - one
    lmask = (one << np.uint64(levels)) - one
    state = np.uint64(0)
    key = np.uint64(0)
    sh = bits
    for _ in range(bits % levels):
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
    return key


@njit(cache=True, nogil=True)
def hilbert_grid(grid, tab1, tab, levels, bits, out):  # pragma: no cover - compiled
    """``out[i]``: the Hilbert key of grid cell ``grid[i]``."""
    n, d = grid.shape
    q = np.empty(d, np.uint64)
    for i in range(n):
        for j in range(d):
            q[j] = grid[i, j]
        out[i] = _walk(q, d, tab1, tab, levels, bits)
