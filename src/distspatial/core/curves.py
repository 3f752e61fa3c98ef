"""Space-filling curve keys (Hilbert and Morton/Z-order) for n-dimensional points.

Pure numpy, no Ray.  Points are first *quantized* onto a ``2**bits`` grid per dimension, then each grid
cell is mapped to a single ``uint64`` key whose order follows the chosen curve::

    >>> import numpy as np
    >>> from distspatial.core.curves import curve_keys
    >>> pts = np.array([[0.1, 0.1], [0.9, 0.1], [0.9, 0.9], [0.1, 0.9]])
    >>> curve_keys(pts, lo=np.zeros(2), hi=np.ones(2), curve="hilbert", bits=1).tolist()
    [0, 3, 2, 1]
    >>> curve_keys(pts, lo=np.zeros(2), hi=np.ones(2), curve="morton", bits=1).tolist()
    [0, 2, 3, 1]

Hilbert order is the one of J. Skilling, "Programming the Hilbert curve" (AIP Conf. Proc. 707, 2004):
``AxestoTranspose`` followed by interleaving the transposed bits (dimension 0 most significant within each bit
level).  It is defined for any number of dimensions ``d >= 1``.  For ``2 <= d <= 4`` an equivalent
table-driven state machine (several bit levels per step, gathers from small lookup tables) is used because it
is several times faster than the bit-by-bit loop; both produce exactly the same keys (tested).

All arithmetic is done on unsigned integers with explicitly typed constants (``np.uint64(...)``) so numpy
never promotes to float.  Large inputs are processed in chunks of rows to bound temporary memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from functools import lru_cache

import numpy as np

__all__ = ["CURVES", "default_bits", "quantize", "quantization", "grid_keys", "morton_keys", "hilbert_keys", "curve_keys", "sort_keys",
           "warm_compiled_kernels",
           "small_batch_keys"]

#: Names accepted by :func:`curve_keys`.
CURVES = ("hilbert", "morton")

_U64 = np.uint64
_U32 = np.uint32
_ONE64 = np.uint64(1)

#: Rows processed per chunk.  Small enough that a chunk's temporaries stay in the L2 cache.
_CHUNK = 1 << 16
# from this many points on, Hilbert keys for d <= 4 and Morton keys for d <= 64 come from the compiled kernels
# (``_curves_compiled``): one pass, ~6x faster; below it the NumPy paths (no kernel load for a few queries)
_COMPILED_MIN_POINTS = 4096

#: Dimensions handled by the table-driven Hilbert state machine (larger ``d`` uses Skilling's loop).
_TABLE_DIMS = (2, 3, 4)
#: Upper bound on table entries for the main step (``n_states * 2**(levels*d)``) and for the first step
#: (``2**(levels*d)``, the first step always starts from the initial state).
_MAIN_TABLE_LIMIT = 1 << 19
_FIRST_TABLE_LIMIT = 1 << 20


# ---------------------------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------------------------


def default_bits(d: int) -> int:
    """Bits per dimension used when ``bits`` is not given: ``min(32, 64 // d)`` (so ``d * bits <= 64``).

    For ``d > 64`` the answer is 1: :func:`curve_keys` then keys on the 64 dimensions of largest extent.

        >>> default_bits(2), default_bits(3), default_bits(64), default_bits(100)
        (32, 21, 1, 1)
    """
    d = int(d)
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    if d > 64:
        return 1
    return min(32, 64 // d)


def _check_bits(bits: int, d: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    bits = int(bits)
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    if d * bits > 64:
        raise ValueError(f"d * bits must be <= 64 to fit a uint64 key, got d={d}, bits={bits}")
    return bits


def _as_grid(grid: np.ndarray) -> np.ndarray:
    grid = np.asarray(grid)
    if grid.ndim != 2:
        raise ValueError(f"grid must have shape (n, d), got {grid.shape}")
    if grid.shape[1] < 1:
        raise ValueError("grid must have at least one dimension")
    if grid.dtype != _U64:
        if grid.dtype.kind not in "ui":
            raise TypeError(f"grid must hold unsigned integers, got {grid.dtype}")
        grid = grid.astype(_U64)
    return grid


def _as_bounds(points: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    points = np.asarray(points)
    if points.ndim != 2:
        raise ValueError(f"points must have shape (n, d), got {points.shape}")
    d = points.shape[1]
    if d < 1:
        raise ValueError("points must have at least one dimension")
    if points.dtype.kind not in "fiu":
        raise TypeError(f"points must be numeric, got {points.dtype}")
    try:
        lo = np.broadcast_to(np.asarray(lo, dtype=np.float64), (d,))
        hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), (d,))
    except ValueError:
        raise ValueError(f"lo and hi must be scalars or have shape ({d},)") from None
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError("lo and hi must be finite")
    if np.any(hi < lo):
        raise ValueError("hi must be >= lo in every dimension")
    return points, lo, hi


# ---------------------------------------------------------------------------------------------------------------
# quantization
# ---------------------------------------------------------------------------------------------------------------


def _quant_params(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, float]:
    extent = hi - lo
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        scale = np.where(extent > 0, np.float64(2.0**bits) / np.where(extent > 0, extent, 1.0), 0.0)
    # Largest double strictly below 2**bits: truncating it gives 2**bits - 1 (for bits <= 52) and it never
    # overflows uint64 (for bits == 64).
    top = float(np.nextafter(np.float64(2.0**bits), 0.0))
    return np.ascontiguousarray(lo), np.ascontiguousarray(scale), top


def _quantize_into(chunk: np.ndarray, lo: np.ndarray, scale: np.ndarray, top: float, out: np.ndarray) -> None:
    """Quantize a (m, d) chunk of points into ``out`` (any (m, d) shaped, possibly transposed, integer view).

    ``lo``/``scale`` are ``(d,)`` or row-major tiled to at least ``m * d`` values (much faster: numpy
    broadcasting along a short last axis runs a slow inner loop of length d).
    """
    m, d = chunk.shape
    if lo.shape[0] >= m * d and d > 1 and chunk.flags.c_contiguous:
        f = np.subtract(chunk.reshape(-1), lo[: m * d], dtype=np.float64)
        with np.errstate(invalid="ignore"):  # inf * 0 for zero-extent dims -> NaN -> 0 below
            f *= scale[: m * d]
        f = f.reshape(m, d)
    else:
        lo, scale = lo[:d], scale[:d]
        f = np.subtract(chunk, lo, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            f *= scale
    np.fmax(f, 0.0, out=f)  # fmax/fmin map NaN to the other operand: NaN -> 0
    np.fmin(f, top, out=f)
    np.copyto(out, f, casting="unsafe")  # truncation == floor for non-negative values


@lru_cache(maxsize=None)
def _small_tables(d: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Tables for the compiled Hilbert kernel: one level, and as many levels as keep ``states * 2**(levels*d)``
    within 8192 entries (64 KiB of uint64, cache resident), both indexed ``state << width | digit``."""
    n_states = _automaton(d)[0].shape[0]
    levels = 1
    while n_states << ((levels + 1) * d) <= 8192:
        levels += 1
    tab1 = _step_table(d, 1, False, 1)[0].astype(_U64)
    tab = _step_table(d, levels, False, levels)[0].astype(_U64)
    return tab1, tab, levels


@lru_cache(maxsize=None)
def _have_numba() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:  # pragma: no cover - numba is a dependency; keep the NumPy path as the fallback
        return False
    return True


def _compiled_loaded(curve: str) -> bool:
    """The compiled kernel of ``curve`` is loaded in this process already: small batches (a single query's key,
    ~5 us compiled against ~0.4 ms of NumPy calls) use it then, but never pay its loading themselves."""
    from . import _curves_compiled as cc

    return (cc._kernel if curve == "hilbert" else cc._morton_kernel).cache_info().currsize > 0


def small_batch_keys(lo: np.ndarray, hi: np.ndarray, curve: str, bits: int) -> Callable[[np.ndarray], np.ndarray]:
    """A function ``points (m, d) -> keys (m,)`` equal to ``curve_keys(points, lo, hi, curve, bits)``, with the
    bounds checked and the quantization set up once: for the keys of a few online queries per call (a few
    microseconds with the compiled kernels loaded, instead of ~0.1 ms of argument handling)."""
    lo_a, hi_a = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    d = lo_a.shape[0]
    if d > 64 or not _have_numba() or not (curve == "morton" or (curve == "hilbert" and d in _TABLE_DIMS)):
        return functools.partial(curve_keys, lo=lo_a, hi=hi_a, curve=curve, bits=bits)
    _as_bounds(np.zeros((1, d)), lo_a, hi_a)
    q_lo, scale, top = _quant_params(lo_a, hi_a, _check_bits(bits, d))
    tables = _small_tables(d) if curve == "hilbert" else None

    def keys(points: np.ndarray) -> np.ndarray:
        if not _compiled_loaded(curve):
            return curve_keys(points, lo_a, hi_a, curve, bits)
        from ._curves_compiled import hilbert_points, morton_points

        if tables is not None:
            return hilbert_points(points, q_lo, scale, top, bits, tables)
        return morton_points(points, q_lo, scale, top, bits)

    return keys


#: key arrays at least this long are sorted by the compiled radix sort (shorter: NumPy's stable sort)
_RADIX_MIN_KEYS = 1 << 16


def sort_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(order, keys[order])``: the stable ascending order of uint64 curve ``keys`` (ties in input order), as
    ``np.argsort(keys, kind="stable")``; a compiled radix sort for long arrays (~2.5x faster at 10M)."""
    keys = np.asarray(keys)
    if len(keys) >= _RADIX_MIN_KEYS and keys.dtype == _U64 and _have_numba():
        from ._curves_compiled import radix_argsort

        return radix_argsort(keys)
    order = np.argsort(keys, kind="stable")
    return order, np.take(keys, order)


def warm_compiled_kernels() -> None:
    """Load the compiled curve-key kernels now (from Numba's disk cache; compiled on a first run), so that the
    first large batch does not pay it (~0.2 s). Safe to call from a background thread."""
    if _have_numba():
        pts = np.zeros((_COMPILED_MIN_POINTS, 2))
        for curve in ("hilbert", "morton"):
            curve_keys(pts, np.zeros(2), np.ones(2), curve)


def _tiled(v: np.ndarray, n: int) -> np.ndarray:
    """``v`` repeated for min(n, _CHUNK) rows (row-major), for :func:`_quantize_into`."""
    return np.tile(v, max(1, min(n, _CHUNK))) if v.shape[0] > 1 else v


def quantization(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, float]:
    """``(lo, scale, top)`` such that :func:`quantize` maps a coordinate ``x`` of dimension ``t`` to the cell
    ``uint64(min(max((x - lo[t]) * scale[t], 0), top))`` (NaN -> 0): for compiled kernels that quantize a few
    values of their own and must agree with :func:`quantize` exactly.

        >>> lo, scale, top = quantization(np.array([0.0]), np.array([1.0]), 2)
        >>> int((0.5 - lo[0]) * scale[0])
        2
    """
    _, lo_a, hi_a = _as_bounds(np.zeros((1, np.size(lo))), lo, hi)
    return _quant_params(lo_a, hi_a, _check_bits(bits, 1))


def quantize(points: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """Map ``(n, d)`` float points onto a ``2**bits`` grid per dimension, returning ``(n, d)`` uint64 cells.

    Cell ``floor((p - lo) / (hi - lo) * 2**bits)``, clipped to ``[0, 2**bits - 1]``: points outside
    ``[lo, hi]`` are clipped (``hi`` itself maps to the last cell), a zero-extent dimension (``hi == lo``)
    maps to 0, NaN maps to 0.  ``lo``/``hi`` are ``(d,)`` arrays (or scalars); ``1 <= bits <= 64``.

        >>> quantize(np.array([[0.0, 5.0], [0.5, 5.0], [1.0, 5.0], [2.0, 5.0]]), [0.0, 5.0], [1.0, 5.0], 2).tolist()
        [[0, 0], [2, 0], [3, 0], [3, 0]]
    """
    points, lo, hi = _as_bounds(points, lo, hi)
    n, d = points.shape
    bits = _check_bits(bits, 1)
    lo, scale, top = _quant_params(lo, hi, bits)
    lo, scale = _tiled(lo, n), _tiled(scale, n)
    out = np.empty((n, d), dtype=_U64)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        _quantize_into(points[s:e], lo, scale, top, out[s:e])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Morton
# ---------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _spread_table(d: int, width: int) -> np.ndarray:
    """table[v] = bits of v (``width`` bits) moved to positions 0, d, 2d, ..."""
    v = np.arange(1 << width, dtype=_U64)
    out = np.zeros(1 << width, dtype=_U64)
    for j in range(width):
        out |= ((v >> _U64(j)) & _ONE64) << _U64(j * d)
    out.setflags(write=False)
    return out


def _morton_cols(cols: list[np.ndarray], bits: int) -> np.ndarray:
    """Morton keys of one chunk given as ``d`` contiguous uint64 columns."""
    d = len(cols)
    m = cols[0].shape[0]
    width = min(bits, 11 if d == 2 else 8)
    table = _spread_table(d, width)
    key = np.zeros(m, dtype=_U64)
    tmp = np.empty(m, dtype=_U64)
    spread = np.empty(m, dtype=_U64)
    for lvl in range(0, bits, width):
        w = min(width, bits - lvl)
        mask = _U64((1 << w) - 1)
        for i, c in enumerate(cols):
            np.right_shift(c, _U64(lvl), out=tmp)
            tmp &= mask
            np.take(table, tmp, out=spread)
            spread <<= _U64(lvl * d + (d - 1 - i))
            key |= spread
    return key


def morton_keys(grid: np.ndarray, bits: int) -> np.ndarray:
    """Morton (Z-order) keys: interleave the low ``bits`` bits of the ``d`` grid coordinates.

    Within each bit level dimension 0 is the most significant bit; the highest level comes first.  ``grid`` is
    ``(n, d)`` unsigned, ``d * bits <= 64``; coordinate bits above ``bits`` are ignored.  Returns ``(n,)`` uint64.

        >>> morton_keys(np.array([[1, 0], [0, 1], [3, 3]], dtype=np.uint64), bits=2).tolist()
        [2, 1, 15]
    """
    grid = _as_grid(grid)
    n, d = grid.shape
    bits = _check_bits(bits, d)
    out = np.empty(n, dtype=_U64)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        cols = [np.ascontiguousarray(grid[s:e, i]) for i in range(d)]
        out[s:e] = _morton_cols(cols, bits)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Hilbert: Skilling's algorithm, vectorized over points (any d)
# ---------------------------------------------------------------------------------------------------------------


def _hilbert_skilling_cols(cols: list[np.ndarray], bits: int) -> np.ndarray:
    """Skilling's AxestoTranspose on ``d`` uint64 columns (modified in place), then bit interleave."""
    d = len(cols)
    m = cols[0].shape[0]
    full = _U64((1 << bits) - 1) if bits < 64 else _U64(0xFFFFFFFFFFFFFFFF)
    for c in cols:
        c &= full  # ignore bits above `bits`
    x0 = cols[0]
    bit = np.empty(m, dtype=_U64)
    sel = np.empty(m, dtype=_U64)
    t = np.empty(m, dtype=_U64)
    # Inverse undo excess work (levels bits-1 .. 1; Q = 2**k, P = Q - 1)
    for k in range(bits - 1, 0, -1):
        kk = _U64(k)
        p = _U64((1 << k) - 1)
        for i in range(d):
            xi = cols[i]
            np.right_shift(xi, kk, out=bit)
            bit &= _ONE64
            np.multiply(bit, p, out=sel)  # P where bit k of X[i] is set (invert low bits of X[0]), else 0
            if i == 0:
                x0 ^= sel
                continue
            # bit clear: exchange the low bits of X[0] and X[i]
            np.bitwise_xor(x0, xi, out=t)
            np.bitwise_xor(sel, p, out=bit)  # P where bit k clear, else 0
            t &= bit
            xi ^= t
            t ^= sel  # the two cases are exclusive: apply invert-or-exchange to X[0] in one go
            x0 ^= t
    # Gray encode
    for i in range(1, d):
        cols[i] ^= cols[i - 1]
    tt = np.zeros(m, dtype=_U64)
    last = cols[d - 1]
    for k in range(bits - 1, 0, -1):
        np.right_shift(last, _U64(k), out=bit)
        bit &= _ONE64
        np.multiply(bit, _U64((1 << k) - 1), out=sel)
        tt ^= sel
    for c in cols:
        c ^= tt
    return _morton_cols(cols, bits)  # interleave of the transposed bits


def _hilbert_skilling(grid: np.ndarray, bits: int) -> np.ndarray:
    """Reference Hilbert keys via the vectorized Skilling loop (used for d outside the table dims, and tests)."""
    grid = _as_grid(grid)
    n, d = grid.shape
    bits = _check_bits(bits, d)
    out = np.empty(n, dtype=_U64)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        cols = [np.array(grid[s:e, i], dtype=_U64, copy=True) for i in range(d)]
        out[s:e] = _hilbert_skilling_cols(cols, bits)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Hilbert: table-driven state machine (same order as Skilling), 2 <= d <= 4
# ---------------------------------------------------------------------------------------------------------------
#
# Processing bit levels from the top, Skilling's loop keeps, for the lower bits, a signed permutation of the
# original coordinates (``perm``/``flip``: low bits of X[i] are those of X_orig[perm[i]], inverted if flip[i]).
# At a level, the transformed bits b_i decide (for i = 0..d-1) "invert X[0]" (b_i = 1) or "swap X[0], X[i]"
# (b_i = 0) for the lower levels.  The Gray step is a per-level prefix XOR g_i = b_0 ^ ... ^ b_i, and the final
# ``t`` correction XORs each level with the parity of g_{d-1} over all higher levels.  So the whole map is a
# finite automaton over (perm, flip, parity), reading one d-bit digit per level and emitting d key bits.


def _level_step(state: tuple, digit: int, d: int) -> tuple[tuple, int]:
    perm, flip, par = state
    orig = [(digit >> (d - 1 - j)) & 1 for j in range(d)]
    b = [orig[perm[i]] ^ flip[i] for i in range(d)]
    perm = list(perm)
    flip = list(flip)
    for i in range(d):
        if b[i]:
            flip[0] ^= 1
        else:
            perm[0], perm[i] = perm[i], perm[0]
            flip[0], flip[i] = flip[i], flip[0]
    g = 0
    out = 0
    for i in range(d):
        g ^= b[i]
        out = (out << 1) | (g ^ par)
    return (tuple(perm), tuple(flip), par ^ g), out


@lru_cache(maxsize=None)
def _automaton(d: int) -> tuple[np.ndarray, np.ndarray]:
    """(next_state, out) tables of shape (n_states, 2**d); state 0 is the initial state."""
    start = (tuple(range(d)), (0,) * d, 0)
    index = {start: 0}
    order = [start]
    rows_next: list[list[int]] = []
    rows_out: list[list[int]] = []
    pos = 0
    while pos < len(order):
        s = order[pos]
        pos += 1
        nxt_row, out_row = [], []
        for c in range(1 << d):
            nxt, out = _level_step(s, c, d)
            if nxt not in index:
                index[nxt] = len(order)
                order.append(nxt)
            nxt_row.append(index[nxt])
            out_row.append(out)
        rows_next.append(nxt_row)
        rows_out.append(out_row)
    return np.array(rows_next, dtype=np.int64), np.array(rows_out, dtype=np.int64)


@lru_cache(maxsize=None)
def _step_table(d: int, levels: int, first: bool, main_levels: int) -> tuple[np.ndarray, int]:
    """Table for ``levels`` bit levels at once.

    Index: ``state * 2**(levels*d) + digit`` (``state`` only 0 when ``first``) where ``digit`` concatenates the
    ``levels``-bit chunks of each coordinate, dimension 0 most significant.  Entry:
    ``(next_state << shift) | out`` with ``out`` the ``levels*d`` key bits and ``shift`` returned alongside;
    ``next_state << (main_levels*d)`` is the next main-table offset.
    """
    nxt1, out1 = _automaton(d)
    n_states = 1 if first else nxt1.shape[0]
    width = levels * d
    digits = np.arange(1 << width, dtype=np.int64)
    state = np.repeat(np.arange(n_states, dtype=np.int64), 1 << width)
    digit = np.tile(digits, n_states)
    out = np.zeros_like(digit)
    lmask = (1 << levels) - 1
    chunks = [(digit >> (levels * (d - 1 - j))) & lmask for j in range(d)]
    for t in range(levels):
        c = np.zeros_like(digit)
        for j in range(d):
            c |= ((chunks[j] >> (levels - 1 - t)) & 1) << (d - 1 - j)
        out = (out << d) | out1[state, c]
        state = nxt1[state, c]
    shift = max(width, main_levels * d)
    entry = (state << shift) | out
    dtype = _U32 if int(entry.max()) < (1 << 32) else _U64
    table = entry.astype(dtype)
    table.setflags(write=False)
    return table, shift


@lru_cache(maxsize=None)
def _plan(d: int, bits: int) -> tuple[int, int]:
    """(first_levels, main_levels) for the table path."""
    n_states = _automaton(d)[0].shape[0]
    main = 1
    while n_states << ((main + 1) * d) <= _MAIN_TABLE_LIMIT:
        main += 1
    first_max = max(main, 1)
    while 1 << ((first_max + 1) * d) <= _FIRST_TABLE_LIMIT:
        first_max += 1
    rest = max(bits - first_max, 0)
    n_main = -(-rest // main)
    return bits - main * n_main, main


def _hilbert_table_cols(cols: list[np.ndarray], bits: int) -> np.ndarray:
    """Hilbert keys of one chunk of ``d`` uint32 (or uint64) columns via the multi-level state machine."""
    d = len(cols)
    m = cols[0].shape[0]
    first, main = _plan(d, bits)
    dt = cols[0].dtype.type
    tab0, shift0 = _step_table(d, first, True, main)
    tab, _ = _step_table(d, main, False, main)
    tdt = np.result_type(tab0.dtype, tab.dtype, cols[0].dtype).type

    idx = np.empty(m, dtype=tdt)
    tmp = np.empty(m, dtype=tdt)
    ent = np.empty(m, dtype=tdt)
    key = np.empty(m, dtype=_U64)

    def digit_into(levels: int, sh: int, idx: np.ndarray, tmp: np.ndarray) -> None:
        lmask = dt((1 << levels) - 1)
        for j, c in enumerate(cols):
            dst = idx if j == 0 else tmp
            np.right_shift(c, dt(sh), out=dst)
            dst &= lmask
            if j:
                idx <<= tdt(levels)
                idx |= tmp
        # idx now = sum chunk_j << levels*(d-1-j)

    sh = bits - first
    digit_into(first, sh, idx, tmp)
    np.take(tab0, idx, out=ent)
    low = tdt((1 << (first * d)) - 1)
    np.bitwise_and(ent, low, out=tmp)
    key[:] = tmp
    if sh == 0:
        return key
    state = np.empty(m, dtype=tdt)
    np.right_shift(ent, tdt(shift0), out=state)
    state <<= tdt(main * d)
    low = tdt((1 << (main * d)) - 1)
    high = tdt(~int(low) & int(np.iinfo(tdt).max))
    ksh = _U64(main * d)
    while sh > 0:
        sh -= main
        digit_into(main, sh, idx, tmp)
        idx += state
        np.take(tab, idx, out=ent)
        np.bitwise_and(ent, low, out=tmp)
        key <<= ksh
        key |= tmp
        if sh:
            np.bitwise_and(ent, high, out=state)
    return key


def _hilbert_table(grid: np.ndarray, bits: int) -> np.ndarray:
    """Hilbert keys via the table-driven state machine (2 <= d <= 4); same order as :func:`_hilbert_skilling`."""
    grid = _as_grid(grid)
    n, d = grid.shape
    bits = _check_bits(bits, d)
    if d not in _TABLE_DIMS:
        raise ValueError(f"table path supports d in {_TABLE_DIMS}, got {d}")
    cdt = _U32 if bits <= 32 else _U64
    out = np.empty(n, dtype=_U64)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        cols = [np.ascontiguousarray(grid[s:e, i], dtype=cdt) for i in range(d)]
        out[s:e] = _hilbert_table_cols(cols, bits)
    return out


def hilbert_keys(grid: np.ndarray, bits: int) -> np.ndarray:
    """Hilbert keys of ``(n, d)`` unsigned grid cells, for any ``d >= 1`` with ``d * bits <= 64``.

    Skilling's (2004) ``AxestoTranspose`` then interleave of the transposed bits (dimension 0 most significant
    within a level).  Consecutive keys are grid cells at Manhattan distance 1.  Coordinate bits above ``bits``
    are ignored.  For ``d == 1`` the key is the coordinate itself.  Returns ``(n,)`` uint64.

        >>> hilbert_keys(np.array([[0, 0], [0, 1], [1, 1], [1, 0]], dtype=np.uint64), bits=1).tolist()
        [0, 1, 2, 3]
    """
    grid = _as_grid(grid)
    n, d = grid.shape
    bits = _check_bits(bits, d)
    if d in _TABLE_DIMS:
        return _hilbert_table(grid, bits)
    if d == 1:
        full = _U64((1 << bits) - 1) if bits < 64 else _U64(0xFFFFFFFFFFFFFFFF)
        return (grid[:, 0] & full).astype(_U64)
    return _hilbert_skilling(grid, bits)


def grid_keys(grid: np.ndarray, curve: str, bits: int) -> np.ndarray:
    """Curve keys of ``(n, d)`` unsigned grid cells: :func:`hilbert_keys` or :func:`morton_keys`, Hilbert keys in
    2-4 dimensions by the compiled kernel (a few microseconds for a few cells, against ~0.1 ms of NumPy calls).

        >>> grid_keys(np.array([[0, 0], [0, 1], [1, 1], [1, 0]], dtype=np.uint64), "hilbert", 1).tolist()
        [0, 1, 2, 3]
    """
    grid = _as_grid(grid)
    d = grid.shape[1]
    if curve == "hilbert" and d in _TABLE_DIMS and _have_numba():
        from ._curves_compiled import hilbert_grid

        return hilbert_grid(grid, _check_bits(bits, d), _small_tables(d))
    return (hilbert_keys if curve == "hilbert" else morton_keys)(grid, bits)


# ---------------------------------------------------------------------------------------------------------------
# points -> keys
# ---------------------------------------------------------------------------------------------------------------


def curve_keys(
    points: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    curve: str = "hilbert",
    bits: int | None = None,
) -> np.ndarray:
    """Quantize ``(n, d)`` points to the ``[lo, hi]`` box and return their ``(n,)`` uint64 curve keys.

    ``curve`` is one of :data:`CURVES`; ``bits`` (per dimension) defaults to :func:`default_bits`\\ ``(d)``.
    For ``d > 64`` only the 64 dimensions of largest extent ``hi - lo`` are used (ties: lower index first; kept
    in their original order), with 1 bit each; ``bits`` must then be None or 1.

        >>> pts = np.array([[0.1, 0.1], [0.1, 0.9], [0.9, 0.9], [0.9, 0.1]])
        >>> curve_keys(pts, np.zeros(2), np.ones(2), bits=1).tolist()
        [0, 1, 2, 3]
    """
    if curve not in CURVES:
        raise ValueError(f"unknown curve {curve!r}; allowed values: {', '.join(map(repr, CURVES))}")
    points, lo, hi = _as_bounds(points, lo, hi)
    n, d = points.shape
    if d > 64:
        if bits is not None and int(bits) != 1:
            raise ValueError(f"for d > 64 only bits=1 is supported (64 dimensions of largest extent), got {bits}")
        bits = 1
        extent = hi - lo
        dims = np.sort(np.argsort(-extent, kind="stable")[:64])
        lo, hi = lo[dims], hi[dims]
        d = 64
    else:
        dims = None
        bits = default_bits(d) if bits is None else _check_bits(bits, d)
    lo, scale, top = _quant_params(lo, hi, bits)
    use_table = curve == "hilbert" and d in _TABLE_DIMS
    if dims is None and (use_table or curve == "morton") and (n >= _COMPILED_MIN_POINTS or _compiled_loaded(curve)) \
            and _have_numba():
        from ._curves_compiled import hilbert_points, morton_points

        if use_table:
            return hilbert_points(points, lo, scale, top, bits, _small_tables(d))
        return morton_points(points, lo, scale, top, bits)
    lo, scale = _tiled(lo, n), _tiled(scale, n)
    cdt = _U32 if (use_table and bits <= 32) else _U64
    out = np.empty(n, dtype=_U64)
    buf = np.empty((d, min(n, _CHUNK)), dtype=cdt)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        b = buf[:, : e - s]
        chunk = points[s:e] if dims is None else np.ascontiguousarray(points[s:e, dims])
        _quantize_into(chunk, lo, scale, top, b.T)
        cols = [b[i] for i in range(d)]
        if curve == "morton":
            out[s:e] = _morton_cols(cols, bits)
        elif use_table:
            out[s:e] = _hilbert_table_cols(cols, bits)
        elif d == 1:
            out[s:e] = cols[0]
        else:
            out[s:e] = _hilbert_skilling_cols(cols, bits)
    return out
