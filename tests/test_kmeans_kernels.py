"""Tests of the exact Lloyd k-means kernels: the NumPy one (distspatial.kernels.kmeans_kernels) and the compiled one
(distspatial.kernels.kmeans_compiled, when Numba is installed). Every test runs against both implementations.

The reference everywhere is the naive full computation: squared distances
``(x_0-c_0)**2 + (x_1-c_1)**2 + ...`` summed sequentially over the dimensions,
labels = argmin with the lowest index winning ties.
"""

from __future__ import annotations

import ast

import numpy as np
import pytest

from distspatial.kernels import kmeans_compiled as kc
from distspatial.kernels import kmeans_kernels as kk
from distspatial.kernels.kmeans_kernels import LloydState, squared_distances_min

IMPLEMENTATIONS = [kk.LloydState] + ([kc.CompiledLloydState] if kc.HAVE_NUMBA else [])


@pytest.fixture(autouse=True, params=IMPLEMENTATIONS, ids=lambda c: c.__name__)
def lloyd_impl(request, monkeypatch):
    """Run every test of this module with each Lloyd state implementation."""
    monkeypatch.setitem(globals(), "LloydState", request.param)
    return request.param


# --------------------------------------------------------------------------
# reference and data
# --------------------------------------------------------------------------


def ref_distances(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    D = np.zeros((X.shape[0], C.shape[0]))
    for i in range(X.shape[1]):
        diff = X[:, i][:, None] - C[:, i][None, :]
        D += diff * diff
    return D


def ref_assign(X: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    D = ref_distances(X, C)
    lab = D.argmin(axis=1)
    return lab, D[np.arange(X.shape[0]), lab]


def ref_reduce(X: np.ndarray, lab: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(lab, minlength=k)
    sums = np.stack([np.bincount(lab, weights=X[:, i], minlength=k) for i in range(X.shape[1])], axis=1)
    return sums, counts


def make_data(kind: str, n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "uniform":
        X = rng.random((n, d))
    elif kind == "blobs":  # skewed: Gaussian hot spots of unequal size and spread + background
        hubs = rng.random((6, d)) * 20.0
        w = rng.dirichlet(np.ones(6) * 0.5)
        which = rng.choice(6, n, p=w)
        X = hubs[which] + rng.normal(size=(n, d)) * rng.uniform(0.1, 2.0, 6)[which, None]
        X[: n // 5] = rng.random((n // 5, d)) * 20.0
    elif kind == "duplicates":  # many identical points, on an integer lattice (exact ties)
        base = rng.integers(0, 5, size=(25, d)).astype(float)
        X = base[rng.integers(0, 25, n)]
    elif kind == "offset":  # far from the origin (e.g. projected coordinates)
        X = 1e6 + rng.random((n, d)) * 100.0
    else:
        raise ValueError(kind)
    return np.ascontiguousarray(X)


def run_and_compare(X: np.ndarray, C: np.ndarray, iters: int, states: int = 1) -> None:
    """Lloyd loop with the kernel (points split over ``states`` partitions),
    centres updated from the kernel's own sums, compared with the reference at
    every iteration."""
    k = C.shape[0]
    parts = np.array_split(np.arange(X.shape[0]), states)
    sts = [LloydState(X[p]) for p in parts]
    prev = None
    for it in range(iters):
        sums = np.zeros((k, X.shape[1]))
        counts = np.zeros(k, dtype=np.int64)
        inertia = 0.0
        changed = 0
        for st in sts:
            s, c, inr, ch = st.step(C)
            assert s.shape == (k, X.shape[1]) and s.dtype == np.float64
            assert c.shape == (k,) and c.dtype == np.int64
            assert isinstance(inr, float) and isinstance(ch, int)
            sums += s
            counts += c
            inertia += inr
            changed += ch
        lab, dmin = ref_assign(X, C)
        labels = np.concatenate([st.labels for st in sts])
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(labels, lab, err_msg=f"labels differ at iteration {it}")
        rsums, rcounts = ref_reduce(X, lab, k)
        np.testing.assert_array_equal(counts, rcounts)
        scale = np.abs(X).sum(axis=0).max() + 1.0
        np.testing.assert_allclose(sums, rsums, rtol=1e-9, atol=1e-12 * scale)
        ref_inertia = float(dmin.sum())
        assert abs(inertia - ref_inertia) <= 1e-9 * max(ref_inertia, 1e-300), (it, inertia, ref_inertia)
        assert changed == (X.shape[0] if prev is None else int(np.count_nonzero(lab != prev)))
        prev = lab
        nonempty = counts > 0
        C = C.copy()
        C[nonempty] = sums[nonempty] / counts[nonempty, None]


# --------------------------------------------------------------------------
# squared_distances_min
# --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 16, 500])
@pytest.mark.parametrize("kind", ["uniform", "blobs", "offset"])
@pytest.mark.parametrize("d", [2, 3])
def test_squared_distances_min_equals_brute_force(k: int, kind: str, d: int) -> None:
    rng = np.random.default_rng(k * 100 + d)
    X = make_data(kind, 6000, d, rng)
    C = X[rng.choice(X.shape[0], k, replace=False)] + rng.normal(size=(k, d)) * 1e-3
    lab, dmin = squared_distances_min(X, C)
    rlab, rdmin = ref_assign(X, C)
    assert lab.dtype == np.int32 and dmin.dtype == np.float64
    np.testing.assert_array_equal(lab, rlab)
    np.testing.assert_array_equal(dmin, rdmin)  # exact, not just close


@pytest.mark.parametrize("k", [16, 500])
def test_squared_distances_min_ties_and_high_dimension(k: int) -> None:
    rng = np.random.default_rng(7)
    # lattice points and lattice centres: many exact ties, duplicated centres
    X = rng.integers(0, 4, size=(3000, 3)).astype(float)
    C = rng.integers(0, 4, size=(k, 3)).astype(float)
    C[1] = C[0]
    lab, dmin = squared_distances_min(X, C)
    rlab, rdmin = ref_assign(X, C)
    np.testing.assert_array_equal(lab, rlab)
    np.testing.assert_array_equal(dmin, rdmin)
    # d = 20 (BLAS path for both k)
    X = rng.normal(size=(2000, 20))
    C = rng.normal(size=(k, 20))
    lab, dmin = squared_distances_min(X, C)
    rlab, rdmin = ref_assign(X, C)
    np.testing.assert_array_equal(lab, rlab)
    np.testing.assert_allclose(dmin, rdmin, rtol=1e-13)


def test_squared_distances_min_badly_conditioned_blas() -> None:
    """Centres far away from the data make the BLAS form's rounding error much
    larger than the gaps between the near centres: only the exact refinement of
    the near ties gives the right labels."""
    rng = np.random.default_rng(21)
    X = rng.random((4000, 2))
    C = np.concatenate([rng.random((498, 2)), [[3e8, 1e8], [3e8, -1e8]]])
    lab, dmin = squared_distances_min(X, C)
    rlab, rdmin = ref_assign(X, C)
    np.testing.assert_array_equal(lab, rlab)
    np.testing.assert_array_equal(dmin, rdmin)


def test_squared_distances_min_input_checks() -> None:
    with pytest.raises(ValueError):
        squared_distances_min(np.zeros((3, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError):
        squared_distances_min(np.zeros(3), np.zeros((2, 1)))
    lab, dmin = squared_distances_min(np.zeros((0, 2)), np.ones((4, 2)))
    assert lab.shape == (0,) and dmin.shape == (0,)
    # int input is accepted (converted)
    lab, dmin = squared_distances_min(np.array([[0, 0], [3, 4]]), np.array([[0.0, 0.0]]))
    assert lab.tolist() == [0, 0] and dmin.tolist() == [0.0, 25.0]


# --------------------------------------------------------------------------
# LloydState against the reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 16])
@pytest.mark.parametrize("d", [1, 2, 3, 8])
@pytest.mark.parametrize("kind", ["uniform", "blobs", "duplicates"])
def test_lloyd_state_matches_reference(kind: str, d: int, k: int) -> None:
    rng = np.random.default_rng(abs(hash((kind, d, k))) % (2**32))
    X = make_data(kind, 3000, d, rng)
    if kind == "duplicates":
        C = X[rng.choice(X.shape[0], k, replace=False)].copy()  # may contain equal centres
    else:
        C = X[rng.choice(X.shape[0], k, replace=False)].copy()
    run_and_compare(X, C, iters=10)


@pytest.mark.parametrize("rebuild_load", [0.0, 0.4, np.inf])
@pytest.mark.parametrize("kind", ["blobs", "duplicates", "offset"])
def test_lloyd_state_layout_paths(monkeypatch: pytest.MonkeyPatch, rebuild_load: float, kind: str) -> None:
    """Re-sort after every step / the default policy / never re-sort (all
    changed points stay in the overflow), two partitions, grid first step."""
    monkeypatch.setattr(kk, "_REBUILD_LOAD", rebuild_load)
    monkeypatch.setattr(kk, "_GRID_MIN_POINTS", 1000)
    rng = np.random.default_rng(11)
    X = make_data(kind, 8000, 2, rng)
    C = X[rng.choice(X.shape[0], 12, replace=False)].copy()
    run_and_compare(X, C, iters=15, states=2)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_grid_first_step(monkeypatch: pytest.MonkeyPatch, d: int) -> None:
    monkeypatch.setattr(kk, "_GRID_MIN_POINTS", 1000)
    rng = np.random.default_rng(d)
    for kind in ("blobs", "duplicates", "offset", "outliers"):
        if kind == "outliers":  # a few points far outside the sampled bounding box
            X = make_data("uniform", 20000, d, rng)
            X[rng.choice(20000, 7, replace=False)] = rng.normal(size=(7, d)) * 1e4
        else:
            X = make_data(kind, 20000, d, rng)
        for k in (2, 16, 70):
            C = X[rng.choice(X.shape[0], k, replace=False)].copy()
            st = LloydState(X)
            st.step(C)
            np.testing.assert_array_equal(st.labels, ref_assign(X, C)[0])


def test_lloyd_state_many_centres_and_blas_path() -> None:
    rng = np.random.default_rng(5)
    # k * (d + 1) > 80: the BLAS kernel with exact refinement in the first step
    # and in the candidate search
    X = make_data("blobs", 3000, 6, rng)
    run_and_compare(X, X[rng.choice(3000, 40, replace=False)].copy(), iters=8)
    X = make_data("uniform", 4000, 2, rng)
    run_and_compare(X, X[rng.choice(4000, 120, replace=False)].copy(), iters=6)


def test_lloyd_state_changing_centres_and_k() -> None:
    """Arbitrary centre jumps (as when the caller re-seeds empty clusters),
    a change of k (full recomputation), repeated identical centres."""
    rng = np.random.default_rng(3)
    X = make_data("blobs", 4000, 2, rng)
    st = LloydState(X)
    for C in (
        X[:5].copy(),
        X[5:10].copy(),
        X[5:10].copy() + np.array([[30.0, -4.0], [0, 0], [0, 0], [0, 0], [0, 0]]),
        X[100:107].copy(),  # k changes
        X[100:107].copy(),
        np.repeat(X[200:201], 3, axis=0),  # three identical centres: label 0 wins
    ):
        sums, counts, inertia, changed = st.step(C)
        lab, dmin = ref_assign(X, C)
        np.testing.assert_array_equal(st.labels, lab)
        rsums, rcounts = ref_reduce(X, lab, C.shape[0])
        np.testing.assert_array_equal(counts, rcounts)
        np.testing.assert_allclose(sums, rsums, rtol=1e-9)
        assert inertia == pytest.approx(dmin.sum(), rel=1e-9)
    assert np.all(st.labels == 0)
    # same centres again: nothing changes
    _, _, inertia2, changed = st.step(np.repeat(X[200:201], 3, axis=0))
    assert changed == 0 and inertia2 == pytest.approx(inertia, rel=1e-12)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_lloyd_state_exact_ties(d: int) -> None:
    """Lattice points and successive sets of lattice centres (same k, so the
    bounds are used), sometimes with duplicated centres: exact ties must go to
    the lowest index in every path (short path, buckets, overflow)."""
    rng = np.random.default_rng(100 + d)
    X = rng.integers(0, 6, size=(4000, d)).astype(float)
    st = LloydState(X)
    prev = None
    for it in range(12):
        C = rng.integers(0, 6, size=(7, d)).astype(float)
        if it % 3 == 2:
            C[rng.integers(0, 7)] = C[rng.integers(0, 7)]
        if it % 4 == 3:  # small moves only, so that the bounds prune
            C = prev_C + rng.integers(-1, 2, size=(7, d)) * 0.5
        sums, counts, inertia, changed = st.step(C)
        lab, dmin = ref_assign(X, C)
        np.testing.assert_array_equal(st.labels, lab, err_msg=f"step {it}")
        np.testing.assert_array_equal(counts, np.bincount(lab, minlength=7))
        assert inertia == dmin.sum()  # small integers and halves: exact
        assert changed == (4000 if prev is None else int(np.count_nonzero(lab != prev)))
        prev, prev_C = lab, C


def test_farthest() -> None:
    rng = np.random.default_rng(9)
    X = make_data("blobs", 5000, 2, rng)
    X[17] = X[23]  # a tie
    st = LloydState(X)
    with pytest.raises(RuntimeError):
        st.farthest(3)
    C = X[rng.choice(5000, 6, replace=False)].copy()
    for _ in range(4):
        sums, counts, _, _ = st.step(C)
        lab, dmin = ref_assign(X, C)
        order = np.lexsort((np.arange(X.shape[0]), -dmin))
        for m in (1, 7, 100):
            pts, d2 = st.farthest(m)
            np.testing.assert_array_equal(d2, dmin[order[:m]])
            np.testing.assert_array_equal(pts, X[order[:m]])
            rows, d2 = st.farthest_indices(m)
            np.testing.assert_array_equal(rows, order[:m])
            np.testing.assert_array_equal(d2, dmin[order[:m]])
            np.testing.assert_array_equal(st.labels[rows], lab[order[:m]])
        C = sums / counts[:, None]
    pts, d2 = st.farthest(10**9)
    assert pts.shape == (5000, 2) and d2.shape == (5000,)
    assert st.farthest(0)[0].shape == (0, 2)


def test_lloyd_state_edge_cases() -> None:
    st = LloydState(np.zeros((0, 3)))
    sums, counts, inertia, changed = st.step(np.ones((2, 3)))
    assert sums.shape == (2, 3) and counts.tolist() == [0, 0] and inertia == 0.0 and changed == 0
    st = LloydState(np.array([[1.0, 2.0]]))
    assert st.labels.tolist() == [-1]
    with pytest.raises(ValueError):
        st.step(np.ones((2, 3)))
    sums, counts, inertia, changed = st.step(np.array([[1.0, 2.0], [0.0, 0.0]]))
    assert st.labels.tolist() == [0] and counts.tolist() == [1, 0] and inertia == 0.0 and changed == 1


# --------------------------------------------------------------------------
# against scikit-learn
# --------------------------------------------------------------------------


def lloyd_with_kernel(parts: list[np.ndarray], C0: np.ndarray, max_iter: int) -> tuple[np.ndarray, float, int]:
    """The coordinator loop of the distributed version, with sklearn's semantics:
    labels for the current centres, new centres = sums / counts; stop when the
    labels no longer change; final E-step with the final centres."""
    states = [LloydState(p) for p in parts]
    C = C0.copy()
    converged = False
    n_iter = 0
    for it in range(max_iter):
        results = [st.step(C) for st in states]
        changed = sum(r[3] for r in results)
        if it > 0 and changed == 0:
            converged = True  # centres are already the means of these labels
            n_iter = it + 1  # sklearn counts the iteration that found no change
            break
        sums = sum(r[0] for r in results)
        counts = sum(r[1] for r in results)
        assert np.all(counts > 0)
        C = sums / counts[:, None]
        n_iter = it + 1
    if converged:
        inertia = sum(r[2] for r in results)
    else:
        inertia = float(sum(squared_distances_min(p, C)[1].sum() for p in parts))
    return C, inertia, n_iter


@pytest.mark.parametrize("max_iter", [1, 5, 300])
def test_full_lloyd_matches_sklearn(max_iter: int) -> None:
    sklearn = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(42)
    X = make_data("blobs", 20000, 2, rng)
    k = 8
    C0 = X[rng.choice(X.shape[0], k, replace=False)].copy()
    km = sklearn.KMeans(n_clusters=k, init=C0, n_init=1, algorithm="lloyd", tol=0.0, max_iter=max_iter)
    km.fit(X)
    C, inertia, n_iter = lloyd_with_kernel(np.array_split(X, 3), C0, max_iter)
    assert inertia == pytest.approx(km.inertia_, rel=1e-6)
    np.testing.assert_allclose(C, km.cluster_centers_, rtol=1e-9, atol=1e-9)
    if max_iter == 300:
        assert n_iter == km.n_iter_ < 300  # converged the same way


@pytest.mark.parametrize("module", [kk, kc])
def test_kernel_modules_do_not_import_ray(module) -> None:
    tree = ast.parse(open(module.__file__).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0] if node.level == 0 else "distspatial")
    assert imported <= {"numpy", "numba", "__future__", "distspatial"}, imported
