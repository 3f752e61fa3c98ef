"""Kernel backends (backend.py, gpu_kernels.py) against independent references: scipy cKDTree, NumPy brute
force, scikit-learn. No Ray.

* CpuBackend: always.
* TorchBackend on torch's CPU device (the same code path as on CUDA except the Triton kernel): when torch is
  installed (``pip install 'distspatial[gpu]'``, or the CPU build of torch).
* The Triton k-means kernel through Triton's interpreter: when triton is installed (run in a subprocess, since
  ``TRITON_INTERPRET`` must be set before the kernel is defined).
* TorchBackend on CUDA: only where a GPU is present (CI has none).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy.spatial import cKDTree

from distspatial.kernels.backend import (
    AssignLloydState,
    CpuBackend,
    GpuUnavailableError,
    cpu_assign_sums,
    csr_to_lists,
    cuda_available,
)
from distspatial.kernels.backend_choice import get_backend
from distspatial.core.config import NodeConfig
from distspatial.core.curves import curve_keys

try:
    import torch  # noqa: F401

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False

try:
    import importlib.util

    HAVE_TRITON = importlib.util.find_spec("triton") is not None
except Exception:  # pragma: no cover
    HAVE_TRITON = False

HAVE_CUDA = cuda_available()
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed (pip install 'distspatial[gpu]')")
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA GPU visible to torch (CI has none)")


# ------------------------------------------------------------------------------------------------ references


def ref_assign(X: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and exact squared distances by brute force, dimension-order sums, first index on ties."""
    X = np.asarray(X, dtype=np.float64)
    D = (X[:, None, 0] - C[None, :, 0]) ** 2
    for t in range(1, X.shape[1]):
        D = D + (X[:, None, t] - C[None, :, t]) ** 2
    lab = D.argmin(axis=1)
    return lab, D[np.arange(len(X)), lab]


def ref_sums(X: np.ndarray, lab: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    sums = np.stack([np.bincount(lab, weights=X[:, t], minlength=k) for t in range(X.shape[1])], axis=1)
    return sums, np.bincount(lab, minlength=k)


def ref_ball(X: np.ndarray, Q: np.ndarray, r: np.ndarray) -> list[np.ndarray]:
    out = []
    for q, rr in zip(Q, r):
        d2 = ((X - q) ** 2).sum(axis=1)
        out.append(np.flatnonzero(d2 <= rr * rr))
    return out


def ref_box(X: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(np.all((X >= a) & (X <= b), axis=1)) for a, b in zip(lo, hi)]


def skewed(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hubs = rng.random((5, d))
    which = rng.integers(0, 5, n)
    pts = hubs[which] + rng.normal(size=(n, d)) * rng.uniform(0.005, 0.05, 5)[which, None]
    pts[: n // 5] = rng.random((n // 5, d))
    return pts


def curve_sorted(X: np.ndarray) -> np.ndarray:
    return X[np.argsort(curve_keys(X, X.min(0), X.max(0)), kind="stable")]


def backends() -> list:
    """Every backend, as pytest params: the torch ones are kept (and reported as skipped, with the reason) where
    torch or a CUDA GPU is missing, so a run says what it did not test."""
    out = [pytest.param(CpuBackend(), id="cpu-cpu-0"),
           pytest.param(CpuBackend(threads=2, presorted_queries=True), id="cpu-cpu-1")]
    torch_cpu = torch_cuda = None
    if HAVE_TORCH:
        from distspatial.kernels.gpu_kernels import TorchBackend

        torch_cpu = TorchBackend(device="cpu")
        if HAVE_CUDA:
            torch_cuda = TorchBackend(device="cuda")
    out.append(pytest.param(torch_cpu, id="torch-cpu-2", marks=pytest.mark.skipif(
        not HAVE_TORCH, reason="torch not installed: the torch backend is not tested")))
    out.append(pytest.param(torch_cuda, id="torch-cuda-3", marks=pytest.mark.skipif(
        not HAVE_CUDA, reason="no CUDA GPU visible to torch: the torch backend on CUDA is not tested")))
    return out


BACKENDS = backends()


# ------------------------------------------------------------------------------------------------ selection


def test_get_backend_cpu_and_auto():
    assert isinstance(get_backend("cpu"), CpuBackend)
    b = get_backend("auto")
    assert b.name == ("torch" if HAVE_CUDA else "cpu")
    with pytest.raises(ValueError, match="device must be one of"):
        get_backend("gpu")
    with pytest.raises(ValueError):
        get_backend("cpu:1")


@pytest.mark.skipif(HAVE_CUDA, reason="a GPU is present here")
def test_cuda_without_gpu_names_the_fix():
    with pytest.raises(GpuUnavailableError, match=r"distspatial\[gpu\]|with_device\('auto'\)"):
        get_backend("cuda")


def test_node_config_device():
    assert NodeConfig().device == "cpu"
    assert NodeConfig().with_device("auto").device == "auto"
    assert NodeConfig().with_device("cuda").with_node_count(2).device == "cuda"
    with pytest.raises(ValueError, match="NodeConfig.device"):
        NodeConfig().with_device("gpu")
    with pytest.raises(ValueError, match="NodeConfig.device"):
        NodeConfig(device=None)


# ------------------------------------------------------------------------------------------------ k-means


@pytest.mark.parametrize("d", [1, 2, 3, 5])
@pytest.mark.parametrize("k", [1, 3, 16, 70])
def test_cpu_assign_sums_exact(d, k):
    rng = np.random.default_rng(d * 100 + k)
    X = curve_sorted(skewed(30_000, d, seed=k))
    C = X[rng.choice(len(X), k, replace=False)].copy()
    X[:7] = C[0]  # points exactly on a centre
    if k > 1:
        X[7] = (C[0] + C[1]) / 2  # (near-)tie between two centres
    lab_ref, d2_ref = ref_assign(X, C)
    sums_ref, counts_ref = ref_sums(X, lab_ref, k)
    for threads in (1, 2):
        lab, sums, counts, inertia = cpu_assign_sums(X, C, threads=threads)
        assert lab.dtype == np.int32
        np.testing.assert_array_equal(lab, lab_ref)
        np.testing.assert_array_equal(counts, counts_ref)
        np.testing.assert_allclose(sums, sums_ref, rtol=1e-12, atol=1e-9)
        assert inertia == pytest.approx(d2_ref.sum(), rel=1e-12)


def test_cpu_assign_sums_float32_unsorted_ties_and_labels_out():
    rng = np.random.default_rng(3)
    X = rng.random((50_000, 2)).astype(np.float32)  # random order: most blocks straddle boundaries
    C = np.array([[0.25, 0.5], [0.75, 0.5], [0.5, 0.25], [0.25, 0.5]])  # centre 3 duplicates centre 0
    X[:100] = np.float32(0.5)  # equidistant from centres 0, 1 (and 3): lowest index wins
    lab_ref, d2_ref = ref_assign(X, C)
    out = np.empty(len(X), dtype=np.int32)
    lab, sums, counts, inertia = cpu_assign_sums(X, C, labels_out=out)
    assert lab is out
    np.testing.assert_array_equal(lab, lab_ref)
    assert (lab[:100] == 0).all() and not (lab == 3).any()
    np.testing.assert_allclose(sums, ref_sums(X, lab_ref, 4)[0], rtol=1e-12)
    assert inertia == pytest.approx(d2_ref.sum(), rel=1e-12)


def test_cpu_assign_sums_matches_sklearn_lloyd_trajectory():
    sklearn = pytest.importorskip("sklearn.cluster")
    X = curve_sorted(skewed(20_000, 2, seed=9))
    C0 = X[np.random.default_rng(0).choice(len(X), 8, replace=False)]
    km = sklearn.KMeans(8, init=C0, n_init=1, algorithm="lloyd", tol=0.0, max_iter=15).fit(X)
    C = C0.copy()
    for _ in range(km.n_iter_):
        lab, sums, counts, inertia = cpu_assign_sums(X, C)
        C = sums / np.maximum(counts, 1)[:, None]
    np.testing.assert_allclose(C, km.cluster_centers_, rtol=1e-9, atol=1e-12)
    lab, *_ = cpu_assign_sums(X, C)
    np.testing.assert_array_equal(lab, km.labels_)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [2, 3, 4])
def test_backend_kmeans_assign_sums(backend, d):
    rng = np.random.default_rng(d)
    X = curve_sorted(skewed(12_000, d, seed=d))
    for k in (1, 6, 40):
        C = X[rng.choice(len(X), k, replace=False)].copy()
        lab_ref, d2_ref = ref_assign(X, C)
        sums_ref, counts_ref = ref_sums(X, lab_ref, k)
        lab, sums, counts, inertia = backend.kmeans_assign_sums(backend.prepare(X), C)
        np.testing.assert_array_equal(lab, lab_ref)
        np.testing.assert_array_equal(counts, counts_ref)
        np.testing.assert_allclose(sums, sums_ref, rtol=1e-12, atol=1e-9)
        assert inertia == pytest.approx(d2_ref.sum(), rel=1e-12)
        lab2, d2 = backend.nearest_center(X, C)
        np.testing.assert_array_equal(lab2, lab_ref)
        np.testing.assert_array_equal(d2, d2_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_lloyd_state_runs_lloyd(backend):
    X = curve_sorted(skewed(8_000, 2, seed=4))
    C = X[:: len(X) // 5][:5].copy()
    st = backend.lloyd_state(backend.prepare(X))
    ref_C = C.copy()
    for it in range(6):
        sums, counts, inertia, changed = st.step(C)
        last_C = ref_C
        lab_ref, d2_ref = ref_assign(X, ref_C)
        s_ref, c_ref = ref_sums(X, lab_ref, 5)
        np.testing.assert_array_equal(counts, c_ref)
        np.testing.assert_array_equal(st.labels, lab_ref)
        assert inertia == pytest.approx(d2_ref.sum(), rel=1e-12)
        if it == 0:
            assert changed == len(X)
        C = sums / counts[:, None]
        ref_C = s_ref / c_ref[:, None]
    rows, d2 = st.farthest_indices(3)  # as of the last step's centres
    lab_ref, d2_ref = ref_assign(X, last_C)
    np.testing.assert_allclose(d2, np.sort(d2_ref)[::-1][:3], rtol=1e-9)
    np.testing.assert_allclose(d2_ref[rows], d2, rtol=1e-9)


def test_assign_lloyd_state_on_cpu_pass():
    X = curve_sorted(skewed(6_000, 2, seed=5))
    C = X[:4].copy() + 0.01
    st = CpuBackend(hamerly=False).lloyd_state(X)
    assert isinstance(st, AssignLloydState)
    _, _, _, ch1 = st.step(C)
    _, _, _, ch2 = st.step(C)
    assert ch1 == len(X) and ch2 == 0


# ------------------------------------------------------------------------------------------------ queries


def _knn_check(backend, X, Q, k, bound=None):
    P = backend.prepare(X)
    dist, rows = backend.knn(P, Q, k, bound)
    ref_d, ref_i = cKDTree(X).query(Q, k=min(k, len(X)))
    ref_d = np.asarray(ref_d).reshape(len(Q), -1)
    kk = ref_d.shape[1]
    if bound is not None:
        ref_d = np.where(ref_d <= bound[:, None], ref_d, np.inf)
    np.testing.assert_array_equal(dist[:, :kk], ref_d)  # identical distances (same exact form)
    assert np.isinf(dist[:, kk:]).all() and (rows[:, kk:] == -1).all()
    ok = np.isfinite(dist)
    assert ((rows >= 0) == ok).all()
    own = np.sqrt(((X[np.where(ok, rows, 0)] - Q[:, None, :]) ** 2).sum(axis=2))
    np.testing.assert_allclose(own[ok], dist[ok], rtol=1e-15)
    srt = np.sort(np.where(ok, rows, -1 - np.arange(rows.shape[1])), axis=1)
    assert not (srt[:, 1:] == srt[:, :-1]).any()
    return dist, rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_backend_knn(backend, d):
    X = skewed(6_000, d, seed=d)
    rng = np.random.default_rng(d)
    Q = np.concatenate([rng.random((2_500, d)) * 1.4 - 0.2, X[:200] + 1e-4])  # some far outside
    for k in (1, 10):
        dist, rows = _knn_check(backend, X, Q, k)
        # rows agree with the brute-force reference (random data: no ties)
        ref_i = cKDTree(X).query(Q, k=k)[1].reshape(len(Q), k)
        assert (rows == ref_i).mean() > 0.999


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_knn_bound_small_partition_and_empty(backend):
    rng = np.random.default_rng(7)
    X = rng.random((3_000, 2))
    Q = rng.random((500, 2))
    bound = rng.uniform(0.0, 0.03, len(Q))
    _knn_check(backend, X, Q, 8, bound)
    _knn_check(backend, X[:5], Q, 8)  # fewer points than k
    d, r = backend.knn(X, np.empty((0, 2)), 3)
    assert d.shape == (0, 3) and r.shape == (0, 3)


def test_cpu_knn_morton_order_matches_plain_order():
    rng = np.random.default_rng(2)
    X = rng.random((20_000, 2))
    Q = rng.random((5_000, 2))
    a = CpuBackend().knn(X, Q, 5)
    b = CpuBackend(presorted_queries=True).knn(X, Q, 5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [2, 3, 4])
def test_backend_radius_and_box(backend, d):
    X = skewed(5_000, d, seed=11 + d)
    rng = np.random.default_rng(d)
    Q = rng.random((150, d)) * 1.2 - 0.1
    r = rng.uniform(0.0, 0.15, len(Q))
    r[0] = 0.0
    r[1] = 5.0  # covers everything
    P = backend.prepare(X)
    off, rows = backend.radius(P, Q, r)
    got = csr_to_lists(off, rows)
    for g, want in zip(got, ref_ball(X, Q, r)):
        np.testing.assert_array_equal(g, want)
    lo = Q - rng.uniform(0, 0.1, Q.shape)
    hi = Q + rng.uniform(0, 0.1, Q.shape)
    lo[0], hi[0] = X[3], X[3]  # degenerate box holding one point exactly
    off, rows = backend.box(P, lo, hi)
    for g, want in zip(csr_to_lists(off, rows), ref_box(X, lo, hi)):
        np.testing.assert_array_equal(g, want)
    assert 3 in csr_to_lists(off, rows)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_distance_tile(backend):
    rng = np.random.default_rng(5)
    a = rng.random((40, 3))
    b = rng.random((70, 3))
    ref = ((a[:, None, 0] - b[None, :, 0]) ** 2 + (a[:, None, 1] - b[None, :, 1]) ** 2) + (
        a[:, None, 2] - b[None, :, 2]
    ) ** 2
    np.testing.assert_array_equal(backend.distance_tile(a, b), ref)


# ------------------------------------------------------------------------------------------------ torch extras


@needs_torch
def test_torch_float32_tolerance():
    from distspatial.kernels.gpu_kernels import TorchBackend

    rng = np.random.default_rng(8)
    X = skewed(8_000, 2, seed=8) * 1000.0 + 5e5  # geodata-like offset: float32 mode shifts to the partition
    Q = X[rng.choice(len(X), 500)] + rng.normal(size=(500, 2))
    b32 = TorchBackend(device="cpu", dtype="float32")
    d32, r32 = b32.knn(X, Q, 10)
    d64, r64 = cKDTree(X).query(Q, 10)
    tol = 4e-7 * (np.ptp(X, axis=0).max() + d64)
    assert (np.abs(d32 - d64) <= tol).all()
    assert (r32 == r64).mean() > 0.99
    C = X[:: len(X) // 6][:6]
    lab, sums, counts, inertia = b32.kmeans_assign_sums(X, C)
    lab_ref, d2_ref = ref_assign(X, C)
    assert (lab == lab_ref).mean() > 0.999
    np.testing.assert_allclose(sums, ref_sums(X, lab, 6)[0], rtol=1e-6)
    assert inertia == pytest.approx(d2_ref.sum(), rel=1e-4)


@needs_torch
def test_torch_grid_window_growth_for_sparse_and_dense_regions():
    """Queries far from the data and inside a very dense cluster still get certified exact answers."""
    from distspatial.kernels.gpu_kernels import TorchBackend

    rng = np.random.default_rng(12)
    X = np.concatenate([rng.normal(size=(5_000, 2)) * 1e-4, rng.random((300, 2)) * 100.0])
    Q = np.concatenate([rng.normal(size=(200, 2)) * 1e-4, rng.random((200, 2)) * 300.0 - 100.0])
    _knn_check(TorchBackend(device="cpu", points_per_cell=2), X, Q, 12)


@pytest.mark.skipif(not (HAVE_TORCH and HAVE_TRITON), reason="needs torch and triton (Triton interpreter)")
def test_triton_kmeans_kernel_in_interpreter():
    """The fused Triton k-means kernel, run by Triton's interpreter on CPU tensors, equals the CPU backend."""
    code = textwrap.dedent(
        """
        import numpy as np
        from distspatial.kernels.backend import CpuBackend
        from distspatial.kernels.gpu_kernels import TorchBackend, triton_status
        assert triton_status() == "interpreter", triton_status()
        rng = np.random.default_rng(0)
        for d, k in [(1, 3), (2, 16), (3, 5), (3, 40)]:
            X = rng.random((3000, d)); C = rng.random((k, d)); X[:4] = C[0]
            for dtype in ("float64", "float32"):
                b = TorchBackend(device="cpu", dtype=dtype, use_triton=True)
                lab, sums, counts, inertia = b.kmeans_assign_sums(X, C)
                rl, rs, rc, ri = CpuBackend().kmeans_assign_sums(X, C)
                if dtype == "float64":
                    assert (lab == rl).all() and (counts == rc).all()
                    assert np.allclose(sums, rs, rtol=1e-12) and abs(inertia - ri) <= 1e-12 * ri
                else:
                    assert (lab == rl).mean() > 0.999 and np.allclose(sums, rs, rtol=1e-5)
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@needs_cuda
def test_cuda_triton_and_eager_agree():
    from distspatial.kernels.gpu_kernels import TorchBackend, triton_status

    if triton_status() != "compiled":
        pytest.skip("triton not available on this CUDA machine")
    X = curve_sorted(skewed(200_000, 2, seed=1))
    C = X[:: len(X) // 16][:16].copy()
    fused = TorchBackend(device="cuda", use_triton=True).kmeans_assign_sums(X, C)
    eager = TorchBackend(device="cuda", use_triton=False).kmeans_assign_sums(X, C)
    np.testing.assert_array_equal(fused[0], eager[0])
    np.testing.assert_array_equal(fused[2], eager[2])
    np.testing.assert_allclose(fused[1], eager[1], rtol=1e-12)
