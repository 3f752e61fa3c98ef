"""Tests for distspatial.core.curves (Hilbert / Morton keys)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from distspatial.core import curves

U64 = np.uint64


def full_grid(d: int, bits: int) -> np.ndarray:
    return np.array(list(itertools.product(range(2**bits), repeat=d)), dtype=U64).reshape(-1, d)


def ref_morton(cell, bits: int) -> int:
    """Pure-Python bit interleave: highest level first, dimension 0 most significant within a level."""
    key = 0
    for lvl in range(bits - 1, -1, -1):
        for c in cell:
            key = (key << 1) | ((int(c) >> lvl) & 1)
    return key


def random_grid(rng, n: int, d: int, bits: int) -> np.ndarray:
    g = rng.integers(0, 2**bits, size=(n, d), dtype=U64, endpoint=False)
    top = U64(2**bits - 1)
    g[0] = 0
    g[1] = top  # extreme values exercise the top bits
    g[2, 0] = top
    return g


# ------------------------------------------------------------------------------------------------ default_bits


def test_default_bits():
    assert curves.default_bits(1) == 32
    assert curves.default_bits(2) == 32
    assert curves.default_bits(3) == 21
    assert curves.default_bits(4) == 16
    assert curves.default_bits(7) == 9
    assert curves.default_bits(64) == 1
    assert curves.default_bits(65) == 1
    assert curves.default_bits(1000) == 1
    for d in range(1, 65):
        b = curves.default_bits(d)
        assert 1 <= b <= 32 and d * b <= 64
    with pytest.raises(ValueError):
        curves.default_bits(0)


def test_curves_constant():
    assert curves.CURVES == ("hilbert", "morton")


# ------------------------------------------------------------------------------------------------ Hilbert


HILBERT_IMPLS = {
    "public": curves.hilbert_keys,
    "skilling": curves._hilbert_skilling,
}


@pytest.mark.parametrize("impl", sorted(HILBERT_IMPLS))
@pytest.mark.parametrize(
    "d,bits",
    [(d, b) for d in (1, 2, 3, 4) for b in (1, 2, 3, 4) if d * b <= 16] + [(5, 2), (6, 2), (3, 5)],
)
def test_hilbert_full_grid_bijection_and_adjacency(impl, d, bits):
    grid = full_grid(d, bits)
    rng = np.random.default_rng(d * 100 + bits)
    grid = grid[rng.permutation(len(grid))]  # order of the input must not matter
    keys = HILBERT_IMPLS[impl](grid, bits)
    assert keys.dtype == U64 and keys.shape == (len(grid),)
    # bijection onto range(2**(d*bits))
    assert np.array_equal(np.sort(keys), np.arange(2 ** (d * bits), dtype=U64))
    # consecutive keys are grid neighbours (Manhattan distance exactly 1)
    walk = grid[np.argsort(keys)].astype(np.int64)
    steps = np.abs(np.diff(walk, axis=0)).sum(axis=1)
    assert np.all(steps == 1)
    # starts at the origin
    assert np.all(walk[0] == 0)


@pytest.mark.parametrize("d", [2, 3, 4])
@pytest.mark.parametrize("bits", [2, 3])
def test_hilbert_table_full_grid(d, bits):
    if d * bits > 12:
        pytest.skip("grid too large")
    grid = full_grid(d, bits)
    assert np.array_equal(curves._hilbert_table(grid, bits), curves._hilbert_skilling(grid, bits))


def test_hilbert_small_hand_checked():
    # 2x2: (0,0) (0,1) (1,1) (1,0)  -- dimension 0 is the most significant bit of each key digit
    g = np.array([[0, 0], [0, 1], [1, 1], [1, 0]], dtype=U64)
    assert curves.hilbert_keys(g, 1).tolist() == [0, 1, 2, 3]
    assert curves._hilbert_skilling(g, 1).tolist() == [0, 1, 2, 3]
    # 4x4 walk
    order = [(0, 0), (1, 0), (1, 1), (0, 1), (0, 2), (0, 3), (1, 3), (1, 2),
             (2, 2), (2, 3), (3, 3), (3, 2), (3, 1), (2, 1), (2, 0), (3, 0)]  # fmt: skip
    g = np.array(order, dtype=U64)
    assert curves.hilbert_keys(g, 2).tolist() == list(range(16))
    # d == 1: identity
    g = np.arange(16, dtype=U64).reshape(-1, 1)
    assert curves.hilbert_keys(g, 4).tolist() == list(range(16))
    assert curves._hilbert_skilling(g, 4).tolist() == list(range(16))


@pytest.mark.parametrize("d", [2, 3, 4])
def test_hilbert_fast_path_equals_general_path(d):
    rng = np.random.default_rng(42 + d)
    for bits in range(1, 64 // d + 1):
        g = random_grid(rng, 2000, d, bits)
        fast = curves._hilbert_table(g, bits)
        ref = curves._hilbert_skilling(g, bits)
        assert fast.dtype == U64
        np.testing.assert_array_equal(fast, ref, err_msg=f"d={d} bits={bits}")
        np.testing.assert_array_equal(curves.hilbert_keys(g, bits), ref)


@pytest.mark.parametrize("d", [2, 3, 4])
def test_hilbert_top_key_full_bits(d):
    # Skilling's curve ends at (2**bits - 1, 0, ..., 0): with d*bits == 64 that key uses the top uint64 bit.
    bits = 64 // d
    g = np.zeros((2, d), dtype=U64)
    g[0, 0] = 2**bits - 1
    expected = [2 ** (d * bits) - 1, 0]
    assert curves.hilbert_keys(g, bits).tolist() == expected
    assert curves._hilbert_skilling(g, bits).tolist() == expected


def test_hilbert_table_other_step_sizes(monkeypatch):
    """Different table-size limits change how levels are grouped into steps, never the keys."""
    rng = np.random.default_rng(7)
    grids = {d: [(b, random_grid(rng, 500, d, b)) for b in range(1, 64 // d + 1)] for d in (2, 3, 4)}
    ref = {d: [curves._hilbert_skilling(g, b) for b, g in grids[d]] for d in grids}
    for main_lim, first_lim in [(1, 1), (1 << 12, 1 << 9), (1 << 14, 1 << 16)]:
        monkeypatch.setattr(curves, "_MAIN_TABLE_LIMIT", main_lim)
        monkeypatch.setattr(curves, "_FIRST_TABLE_LIMIT", first_lim)
        curves._plan.cache_clear()
        try:
            for d in grids:
                for (b, g), r in zip(grids[d], ref[d]):
                    np.testing.assert_array_equal(curves._hilbert_table(g, b), r, err_msg=f"{main_lim} {d} {b}")
        finally:
            curves._plan.cache_clear()


def test_high_bits_are_ignored():
    rng = np.random.default_rng(3)
    for d, bits in [(2, 10), (3, 7), (5, 4), (1, 9)]:
        g = random_grid(rng, 300, d, bits)
        noisy = g | (rng.integers(1, 16, size=g.shape, dtype=U64) << U64(bits))
        for fn in (curves.hilbert_keys, curves._hilbert_skilling, curves.morton_keys):
            np.testing.assert_array_equal(fn(noisy, bits), fn(g, bits))


def test_keys_accept_other_integer_dtypes_and_layouts():
    rng = np.random.default_rng(5)
    g = random_grid(rng, 1000, 3, 10)
    ref_h, ref_m = curves.hilbert_keys(g, 10), curves.morton_keys(g, 10)
    for variant in (g.astype(np.uint32), g.astype(np.int64), np.asfortranarray(g)):
        np.testing.assert_array_equal(curves.hilbert_keys(variant, 10), ref_h)
        np.testing.assert_array_equal(curves.morton_keys(variant, 10), ref_m)


def test_invalid_bits():
    g = np.zeros((3, 3), dtype=U64)
    for fn in (curves.hilbert_keys, curves.morton_keys):
        with pytest.raises(ValueError):
            fn(g, 22)  # 3 * 22 > 64
        with pytest.raises(ValueError):
            fn(g, 0)
    with pytest.raises(ValueError):
        curves.curve_keys(np.zeros((3, 3)), np.zeros(3), np.ones(3), bits=22)
    with pytest.raises(ValueError):
        curves.quantize(np.zeros((3, 3)), np.zeros(3), np.ones(3), 65)


# ------------------------------------------------------------------------------------------------ Morton


@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 7, 64])
def test_morton_matches_reference(d):
    rng = np.random.default_rng(d)
    for bits in sorted({b for b in (1, 2, 3, 64 // d // 2, 64 // d) if 1 <= b <= 64 // d}):
        g = random_grid(rng, 200, d, bits)
        keys = curves.morton_keys(g, bits)
        assert keys.dtype == U64
        assert keys.tolist() == [ref_morton(row, bits) for row in g.tolist()], f"d={d} bits={bits}"


def test_morton_full_grid_is_bijection():
    grid = full_grid(3, 3)
    keys = curves.morton_keys(grid, 3)
    assert np.array_equal(np.sort(keys), np.arange(2**9, dtype=U64))


def test_morton_hand_checked():
    g = np.array([[1, 0], [0, 1], [3, 3], [2, 1]], dtype=U64)
    assert curves.morton_keys(g, 2).tolist() == [0b10, 0b01, 0b1111, 0b1001]


# ------------------------------------------------------------------------------------------------ quantize


def test_quantize_basic_clip_and_zero_extent():
    pts = np.array(
        [
            [0.0, 5.0, -3.0],
            [0.25, 5.0, 0.0],
            [0.5, 5.0, 100.0],
            [0.999, 7.0, 1.0],
            [1.0, 5.0, 2.0],
            [-0.5, 5.0, 3.0],
            [2.0, -1.0, 4.0],
        ]
    )
    lo = np.array([0.0, 5.0, 0.0])
    hi = np.array([1.0, 5.0, 4.0])  # dimension 1 has zero extent
    q = curves.quantize(pts, lo, hi, 2)
    assert q.dtype == U64 and q.shape == pts.shape
    assert q[:, 0].tolist() == [0, 1, 2, 3, 3, 0, 3]  # clipped below and above, hi -> last cell
    assert q[:, 1].tolist() == [0] * 7  # zero extent -> 0, even for values off the degenerate range
    assert q[:, 2].tolist() == [0, 0, 3, 1, 2, 3, 3]


def test_quantize_nan_inf_and_scalar_bounds():
    pts = np.array([[np.nan], [np.inf], [-np.inf], [0.5]])
    q = curves.quantize(pts, 0.0, 1.0, 3)
    assert q[:, 0].tolist() == [0, 7, 0, 4]


def test_quantize_64_bits_and_monotone():
    pts = np.array([[0.0], [0.5], [0.75], [1.0], [5.0]])
    q = curves.quantize(pts, np.zeros(1), np.ones(1), 64)
    assert q.dtype == U64
    vals = [int(v) for v in q[:, 0]]
    assert vals[0] == 0 and vals[1] == 2**63 and vals[2] == 3 * 2**62
    assert 2**64 - 4096 <= vals[3] <= 2**64 - 1 and vals[4] == vals[3]
    rng = np.random.default_rng(0)
    x = np.sort(rng.normal(size=(5000, 1)), axis=0)
    for bits in (1, 5, 32, 53, 64):
        qq = curves.quantize(x, x.min(), x.max(), bits)[:, 0]
        assert np.all(qq[1:] >= qq[:-1])
        assert int(qq.max()) <= 2**bits - 1


def test_quantize_layouts_and_dtypes_agree():
    rng = np.random.default_rng(1)
    pts = rng.uniform(-2, 2, size=(3000, 3))
    lo, hi = np.full(3, -1.0), np.full(3, 1.5)
    ref = curves.quantize(pts, lo, hi, 12)
    np.testing.assert_array_equal(curves.quantize(np.asfortranarray(pts), lo, hi, 12), ref)
    wide = np.concatenate([pts, pts], axis=1)[:, ::2]  # non-contiguous view
    np.testing.assert_array_equal(curves.quantize(wide, lo, hi, 12), curves.quantize(np.ascontiguousarray(wide), lo, hi, 12))
    f32 = pts.astype(np.float32)
    np.testing.assert_array_equal(curves.quantize(f32, lo, hi, 12), curves.quantize(f32.astype(np.float64), lo, hi, 12))


def test_quantize_rejects_bad_bounds():
    pts = np.zeros((4, 2))
    with pytest.raises(ValueError):
        curves.quantize(pts, np.ones(2), np.zeros(2), 4)  # hi < lo
    with pytest.raises(ValueError):
        curves.quantize(pts, np.zeros(3), np.ones(3), 4)  # wrong shape
    with pytest.raises(ValueError):
        curves.quantize(pts, np.array([0.0, np.nan]), np.ones(2), 4)
    with pytest.raises(ValueError):
        curves.quantize(np.zeros(4), 0.0, 1.0, 4)  # not 2-D


# ------------------------------------------------------------------------------------------------ curve_keys


def test_curve_keys_rejects_unknown_curve():
    with pytest.raises(ValueError) as exc:
        curves.curve_keys(np.zeros((2, 2)), np.zeros(2), np.ones(2), curve="peano")
    msg = str(exc.value)
    assert "peano" in msg
    for name in curves.CURVES:
        assert name in msg


@pytest.mark.parametrize("curve", ["hilbert", "morton"])
@pytest.mark.parametrize("d", [1, 2, 3, 4, 5])
def test_curve_keys_is_quantize_then_keys(curve, d):
    rng = np.random.default_rng(10 + d)
    pts = rng.normal(size=(5000, d)) * np.arange(1, d + 1)  # above _COMPILED_MIN_POINTS: the compiled path
    lo, hi = np.quantile(pts, 0.05, axis=0), np.quantile(pts, 0.95, axis=0)  # some points get clipped
    for bits in (None, 3):
        b = curves.default_bits(d) if bits is None else bits
        q = curves.quantize(pts, lo, hi, b)
        ref = curves._hilbert_skilling(q, b) if curve == "hilbert" else np.array([ref_morton(r, b) for r in q.tolist()], dtype=U64)
        keys = curves.curve_keys(pts, lo, hi, curve=curve, bits=bits)
        assert keys.dtype == U64 and keys.shape == (len(pts),)
        np.testing.assert_array_equal(keys, ref)


@pytest.mark.parametrize("d", [2, 3, 4])
def test_compiled_hilbert_keys_equal_skilling_reference(d):
    """The compiled kernel (large inputs) against Skilling's transform of the NumPy quantization: NaN, +-inf,
    points outside the bounds, a zero-extent dimension, every bit width; also below the threshold (NumPy path)."""
    rng = np.random.default_rng(40 + d)
    pts = rng.random((6000, d)) * 3 - 1
    pts[::97, 0] = np.nan
    pts[::89, -1] = np.inf
    pts[::83, 0] = -np.inf
    lo, hi = np.zeros(d), np.ones(d)
    hi[-1] = 0.0  # zero extent: every key's last coordinate is 0
    assert len(pts) >= curves._COMPILED_MIN_POINTS
    for bits in sorted({1, 2, 3, 5, 7, curves.default_bits(d), 64 // d}):
        ref = curves._hilbert_skilling(curves.quantize(pts, lo, hi, bits), bits)
        np.testing.assert_array_equal(curves.curve_keys(pts, lo, hi, bits=bits), ref)
        np.testing.assert_array_equal(curves.curve_keys(pts[:100], lo, hi, bits=bits), ref[:100])
    f32 = pts.astype(np.float32)  # other dtypes: the same keys as their float64 values
    np.testing.assert_array_equal(curves.curve_keys(f32, lo, hi), curves.curve_keys(f32.astype(np.float64), lo, hi))


def test_curve_keys_chunking_does_not_change_result(monkeypatch):
    rng = np.random.default_rng(2)
    pts = rng.random((5003, 2))
    pts3 = rng.random((5003, 3))
    ref = {c: curves.curve_keys(pts, np.zeros(2), np.ones(2), curve=c) for c in curves.CURVES}
    ref3 = curves.curve_keys(pts3, np.zeros(3), np.ones(3))
    monkeypatch.setattr(curves, "_CHUNK", 1000)
    for c in curves.CURVES:
        np.testing.assert_array_equal(curves.curve_keys(pts, np.zeros(2), np.ones(2), curve=c), ref[c])
    np.testing.assert_array_equal(curves.curve_keys(pts3, np.zeros(3), np.ones(3)), ref3)
    q = curves.quantize(pts, np.zeros(2), np.ones(2), 32)
    np.testing.assert_array_equal(curves.hilbert_keys(q, 32), ref["hilbert"])


@pytest.mark.parametrize("curve", ["hilbert", "morton"])
def test_curve_keys_more_than_64_dims(curve):
    rng = np.random.default_rng(4)
    d = 70
    pts = rng.random((500, d))
    lo, hi = np.zeros(d), np.ones(d)
    small = [3, 10, 20, 41, 55, 69]
    hi[small] = 0.01  # these six dimensions have the smallest extent and must be ignored
    keys = curves.curve_keys(pts, lo, hi, curve=curve)
    assert keys.dtype == U64 and keys.shape == (500,)
    assert len(np.unique(keys)) > 400  # 64 one-bit dimensions of random data: (almost) all distinct
    kept = [j for j in range(d) if j not in small]
    np.testing.assert_array_equal(keys, curves.curve_keys(pts[:, kept], lo[kept], hi[kept], curve=curve, bits=1))
    # changing an ignored dimension does not change the key
    pts2 = pts.copy()
    pts2[:, small] = rng.random((500, len(small)))
    np.testing.assert_array_equal(curves.curve_keys(pts2, lo, hi, curve=curve), keys)
    with pytest.raises(ValueError):
        curves.curve_keys(pts, lo, hi, curve=curve, bits=2)
    assert curves.curve_keys(pts, lo, hi, curve=curve, bits=1).tolist() == keys.tolist()


@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 70])
def test_empty_input(d):
    pts = np.empty((0, d))
    lo, hi = np.zeros(d), np.ones(d)
    for curve in curves.CURVES:
        k = curves.curve_keys(pts, lo, hi, curve=curve)
        assert k.dtype == U64 and k.shape == (0,)
    q = curves.quantize(pts, lo, hi, 1)
    assert q.dtype == U64 and q.shape == (0, d)
    if d <= 64:
        for fn in (curves.hilbert_keys, curves.morton_keys):
            k = fn(np.empty((0, d), dtype=U64), 1)
            assert k.dtype == U64 and k.shape == (0,)


@pytest.mark.parametrize("d", [2, 3, 5])
def test_locality(d):
    rng = np.random.default_rng(100 + d)
    pts = rng.random((20000, d))
    lo, hi = np.zeros(d), np.ones(d)

    def mean_step(order):
        p = pts[order]
        return np.linalg.norm(np.diff(p, axis=0), axis=1).mean()

    random_step = mean_step(rng.permutation(len(pts)))
    hil = mean_step(np.argsort(curves.curve_keys(pts, lo, hi, "hilbert"), kind="stable"))
    mor = mean_step(np.argsort(curves.curve_keys(pts, lo, hi, "morton"), kind="stable"))
    assert hil < 0.5 * random_step
    assert mor < 0.5 * random_step
    if d == 2:
        assert hil < 0.1 * random_step


# ------------------------------------------------------------------- Hilbert: properties at the library's widths
# Checked from the definition only (no second implementation): the key map is a bijection onto [0, 2**(d*bits))
# and consecutive keys are grid cells at Manhattan distance exactly 1. There is no inverse in the library, so at
# widths too large to enumerate the cell of key K + 1 is found among the 2d grid neighbours of the cell of key K
# (by the unit-step property it must be one of them, and by injectivity exactly one).

#: (d, bits) the library keys data with: default_bits(d) for the dimensions it partitions (d*bits up to 64).
LIBRARY_WIDTHS = [(d, curves.default_bits(d)) for d in range(1, 9)]


def cube(d: int, side_bits: int, base=None) -> np.ndarray:
    """Every cell of the cube ``base + [0, 2**side_bits)**d`` as ``(n, d)`` uint64, dimension 0 slowest."""
    axes = np.indices((2**side_bits,) * d, dtype=np.uint64).reshape(d, -1).T
    return axes if base is None else axes + np.asarray(base, dtype=U64)[None, :]


def neighbour_keys(cells: np.ndarray, bits: int) -> np.ndarray:
    """``(n, 2d)`` Hilbert keys of the cells at +-1 in each dimension (``+`` then ``-``), and the ``(n, 2d)``
    mask of those inside the grid (the key of a cell off the grid is meaningless)."""
    n, d = cells.shape
    steps = np.concatenate([np.eye(d, dtype=np.int64), -np.eye(d, dtype=np.int64)])
    nb = cells.astype(np.int64)[:, None, :] + steps[None, :, :]  # bits <= 32 here: fits int64
    inside = ((nb >= 0) & (nb < 2**bits)).all(axis=2)
    keys = curves.hilbert_keys(np.where(inside[..., None], nb, 0).reshape(-1, d).astype(U64), bits).reshape(n, 2 * d)
    return keys, inside


def _assert_unit_walk(cells_in_key_order: np.ndarray) -> None:
    steps = np.abs(np.diff(cells_in_key_order.astype(np.int64), axis=0)).sum(axis=1)
    bad = np.flatnonzero(steps != 1)
    assert len(bad) == 0, f"{len(bad)} steps of Manhattan length != 1, first after position {bad[:5]}"


@pytest.mark.parametrize("d,bits", [(2, 9), (2, 10), (3, 6), (4, 5), (5, 4), (6, 3)])
def test_hilbert_full_grid_above_16_bits(d, bits):
    """Whole grids of 2**18..2**20 cells: keys are exactly 0..N-1 and the key-ordered walk takes unit steps."""
    grid = cube(d, bits)
    keys = curves.hilbert_keys(grid, bits)
    order = np.argsort(keys, kind="stable")
    assert np.array_equal(keys[order], np.arange(2 ** (d * bits), dtype=U64)), "not a bijection onto [0, 2**(d*bits))"
    walk = grid[order]
    _assert_unit_walk(walk)
    assert np.all(walk[0] == 0)


@pytest.mark.parametrize("d,bits", [w for w in LIBRARY_WIDTHS if w[0] > 1])
def test_hilbert_aligned_subcubes_at_library_widths(d, bits):
    """An aligned cube of side 2**s (any position, full key width) holds one contiguous, aligned key range
    [a, a + 2**(d*s)) that it walks in unit steps; the walk enters from and leaves to a grid neighbour of its
    first and last cells. (The query planner relies on the aligned-range part.)"""
    s = 16 // d  # 2**(d*s) <= 65536 cells per cube
    n = 2 ** (d * s)
    rng = np.random.default_rng(1000 + d)
    top = 2**bits - 2**s
    bases = [np.zeros(d, np.int64), np.full(d, top), np.r_[top, np.zeros(d - 1, np.int64)]]
    bases += [rng.integers(0, 2 ** (bits - s), d) * 2**s for _ in range(6)]
    local = cube(d, s)
    total = 2 ** (d * bits)
    for base in bases:
        cells = local + np.asarray(base, dtype=U64)[None, :]
        keys = curves.hilbert_keys(cells, bits)
        order = np.argsort(keys, kind="stable")
        a = int(keys[order[0]])
        assert a % n == 0, f"range start {a} not aligned to {n} (base {base})"
        assert np.array_equal(keys[order] - U64(a), np.arange(n, dtype=U64)), f"keys of cube {base} not contiguous"
        walk = cells[order]
        _assert_unit_walk(walk)
        ends = np.stack([walk[0], walk[-1]])
        nk, inside = neighbour_keys(ends, bits)
        if a > 0:
            assert ((nk[0] == U64(a - 1)) & inside[0]).sum() == 1, f"key {a - 1} is not a neighbour of key {a}'s cell"
        else:
            assert np.all(walk[0] == 0)
        if a + n < total:
            assert ((nk[1] == U64(a + n)) & inside[1]).sum() == 1, f"key {a + n} is not a neighbour of key {a + n - 1}'s cell"


@pytest.mark.parametrize("d,bits", LIBRARY_WIDTHS)
def test_hilbert_walks_and_injectivity_at_library_widths(d, bits):
    """From sampled cells (corners and the grid's ends included), walk 300 keys forward: the cell of key K + 1
    is exactly one grid neighbour of the cell of key K (and the cell of K - 1 exactly one other). Sampled distinct
    cells get distinct keys, all below 2**(d*bits)."""
    rng = np.random.default_rng(2000 + d)
    total = 2 ** (d * bits)
    last = U64(total - 1)
    top = 2**bits - 1
    starts = rng.integers(0, 2**bits, size=(48, d), dtype=np.int64)
    starts[0], starts[1] = 0, top
    starts[2] = np.r_[top, np.zeros(d - 1, np.int64)]  # where the curve ends (Skilling's orientation)
    starts[3] = np.r_[top - 1, np.zeros(d - 1, np.int64)]
    cur = starts.astype(U64)
    key = curves.hilbert_keys(cur, bits)
    assert int(key.max()) <= total - 1
    for step in range(300):
        nk, inside = neighbour_keys(cur, bits)
        has_prev, has_next = key != U64(0), key != last
        prev_hits = (nk == key[:, None] - U64(1)) & inside & has_prev[:, None]  # uint64: K - 1, K + 1 may wrap
        next_hits = (nk == key[:, None] + U64(1)) & inside & has_next[:, None]
        assert np.all(prev_hits.sum(axis=1) == has_prev), f"step {step}: key - 1 is not on exactly one neighbour"
        assert np.all(next_hits.sum(axis=1) == has_next), f"step {step}: key + 1 is not on exactly one neighbour"
        move = np.flatnonzero(has_next)
        j = next_hits[move].argmax(axis=1)
        sign = np.where(j < d, 1, -1).astype(np.int64)
        nxt = cur[move].astype(np.int64)
        nxt[np.arange(len(move)), j % d] += sign
        cur = nxt.astype(U64)
        key = key[move] + U64(1)
        np.testing.assert_array_equal(curves.hilbert_keys(cur, bits), key)
    # injectivity on a large sample of distinct cells, at the full width
    cells = np.unique(rng.integers(0, 2**bits, size=(200_000, d), dtype=np.int64), axis=0).astype(U64)
    keys = curves.hilbert_keys(cells, bits)
    assert len(np.unique(keys)) == len(cells)
    assert int(keys.max()) <= total - 1


@pytest.mark.parametrize("d,bits", [w for w in LIBRARY_WIDTHS if w[0] > 1])
def test_hilbert_coarse_levels_at_library_widths(d, bits):
    """At every coarse level L (aligned cubes of side 2**(bits - L), up to 4096 of them): each cube's corners map
    into one aligned key range [j*N, (j+1)*N), N = 2**(d*(bits - L)); the ranges j are a permutation of
    0..2**(d*L)-1; one corner holds the range's first key and one its last (the curve enters and leaves a cube at
    corners); and the last cell of range j is a grid neighbour of the first cell of range j + 1. This covers the
    key boundaries between the large blocks, which sampled walks almost never reach."""
    corner_offsets = cube(d, 1).astype(np.int64)  # (2**d, d) of 0/1
    for level in range(1, 12 // d + 1):
        side = 2 ** (bits - level)
        n_cell = 2 ** (d * (bits - level))
        bases = cube(d, level).astype(np.int64) * side  # (C, d)
        corners = bases[:, None, :] + corner_offsets[None, :, :] * (side - 1)  # (C, 2**d, d)
        keys = curves.hilbert_keys(corners.reshape(-1, d).astype(U64), bits).reshape(len(bases), -1)
        block = keys // U64(n_cell)
        assert np.all(block == block[:, :1]), f"level {level}: a cube's corners fall in different key ranges"
        j = block[:, 0].astype(np.int64)
        assert np.array_equal(np.sort(j), np.arange(len(bases))), f"level {level}: ranges are not a permutation"
        low = keys % U64(n_cell)
        first, last = low == U64(0), low == U64(n_cell - 1)
        assert np.all(first.sum(axis=1) == 1) and np.all(last.sum(axis=1) == 1), f"level {level}: entry/exit"
        order = np.argsort(j)
        entry = corners[np.arange(len(bases)), first.argmax(axis=1)][order]
        exit_ = corners[np.arange(len(bases)), last.argmax(axis=1)][order]
        gap = np.abs(entry[1:] - exit_[:-1]).sum(axis=1)
        bad = np.flatnonzero(gap != 1)
        assert len(bad) == 0, f"level {level}: keys {[(int(b) + 1) * n_cell for b in bad[:3]]} not next to the keys before"
        _assert_unit_walk((bases[order] // side).astype(U64))  # the cubes themselves, in key order
        assert np.all(entry[0] == 0)


def test_sort_keys_is_numpys_stable_argsort():
    """The compiled radix sort of long key arrays gives exactly NumPy's stable order (ties in input order),
    with the keys in that order: many duplicates, keys using every bit, a digit shared by all keys (skipped
    pass), and the short-array NumPy path."""
    from distspatial.core.curves import _RADIX_MIN_KEYS, sort_keys

    rng = np.random.default_rng(3)
    n = _RADIX_MIN_KEYS * 3 + 17
    cases = [
        rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True),  # top bit set on about half
        rng.integers(0, 50, n).astype(np.uint64) << np.uint64(40),  # many ties; low digits all zero
        (rng.integers(0, 2**20, n).astype(np.uint64) | np.uint64(0xABC) << np.uint64(30)),
        np.full(n, 7, dtype=np.uint64),
        rng.integers(0, 2**62, 1000, dtype=np.uint64),  # below the radix threshold
    ]
    for keys in cases:
        order, sorted_keys = sort_keys(keys)
        ref = np.argsort(keys, kind="stable")
        assert np.array_equal(order, ref)
        assert np.array_equal(sorted_keys, keys[ref])
