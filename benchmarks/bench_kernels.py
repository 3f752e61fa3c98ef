"""Node kernels close to the hardware limit: k-means pass vs the memory-bandwidth floor, batch kNN. No Ray needed.

Runs on the CPU always and on CUDA when asked (``--device cuda``/``auto``). It imports the kernel modules
(``distspatial.kernels.backend``, ``distspatial.kernels.gpu_kernels``) without running ``distspatial/__init__.py`` (which
imports the coordinator and so Ray): a bare package object pointing at ``src/distspatial`` is registered first.

k-means: ``--n`` 2-D float32 points (skewed: Gaussian hot spots over a uniform background), stored in curve
(Hilbert) order as partitions are, ``--k`` centres; ``--iters`` Lloyd iterations, each one
``kmeans_assign_sums`` (labels, per-cluster sums, counts, inertia). Floor: the time to stream the points'
bytes at the measured copy bandwidth, bandwidth counted STREAM-style (read + write bytes of a large
``np.copyto`` / a device-to-device ``copy_``), i.e. floor = copy time / 2; the ratio to the plain copy time
is printed too. Also on the CPU: the same pass on randomly ordered points, and the stateful Hamerly kernel
(``kmeans_compiled``) for comparison.

kNN: ``--knn-points`` points, ``--knn-queries`` queries (skewed like the data), ``--knn-k`` neighbours. CPU:
``cKDTree`` with queries in random order vs Morton order. GPU: the grid kNN of ``TorchBackend`` (float32 and
float64) vs a PyTorch brute-force baseline (cdist-style BLAS form + topk, tiled; timed on a subset of the
queries and scaled) and vs the CPU path; answers checked against the CPU path on a sample.

Run:  python benchmarks/bench_kernels.py                       # CPU part, defaults for a 2-core machine
      python benchmarks/bench_kernels.py --device cuda         # GPU: N=100M k-means, 1M x 10M kNN
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types

import numpy as np

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "distspatial")
if "distspatial" not in sys.modules:  # the kernel modules only, not the package __init__ (which imports Ray)
    _pkg = types.ModuleType("distspatial")
    _pkg.__path__ = [os.path.abspath(_SRC)]
    sys.modules["distspatial"] = _pkg

from distspatial.kernels.backend import CpuBackend, cpu_assign_sums, cuda_available  # noqa: E402
from distspatial.core.curves import curve_keys  # noqa: E402
from distspatial.kernels.kmeans_compiled import HAVE_NUMBA, CompiledLloydState  # noqa: E402


def skewed(n: int, d: int = 2, seed: int = 0, dtype: type = np.float64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n_hot = int(n * 0.8)
    hubs = rng.random((20, d)) * 100.0
    weights = rng.dirichlet(np.ones(20))
    spread = rng.uniform(0.5, 3.0, 20)
    which = rng.choice(20, n_hot, p=weights)
    out = np.empty((n, d), dtype=dtype)
    out[:n_hot] = hubs[which] + rng.normal(size=(n_hot, d)) * spread[which, None]
    out[n_hot:] = rng.random((n - n_hot, d)) * 100.0
    return out


def curve_order(X: np.ndarray) -> np.ndarray:
    lo, hi = X.min(axis=0).astype(np.float64), X.max(axis=0).astype(np.float64)
    keys = np.empty(len(X), dtype=np.uint64)
    step = 1 << 22
    for s in range(0, len(X), step):
        keys[s : s + step] = curve_keys(X[s : s + step].astype(np.float64), lo, hi, curve="hilbert")
    return np.argsort(keys, kind="stable")


def best_of(fn, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def cpu_copy_time(nbytes: int, repeat: int) -> float:
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.zeros_like(src)  # both touched: no page faults in the timing
    return best_of(lambda: np.copyto(dst, src), repeat)


def lloyd_times(run_step, C0: np.ndarray, iters: int) -> tuple[list[float], np.ndarray]:
    C = C0.copy()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sums, counts = run_step(C)
        ts.append(time.perf_counter() - t0)
        C = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], C)
    return ts, C


# --------------------------------------------------------------------------------------------------- CPU


def bench_cpu_kmeans(args: argparse.Namespace) -> None:
    n, k = args.n, args.k
    print(f"\n== CPU k-means pass: n={n:,} 2-D float32, k={k}, threads={args.threads}, {args.iters} iterations ==")
    X = skewed(n, 2, seed=0, dtype=np.float32)
    X = np.ascontiguousarray(X[curve_order(X)])
    rng = np.random.default_rng(1)
    C0 = X[rng.choice(n, k, replace=False)].astype(np.float64)
    t_copy = cpu_copy_time(X.nbytes, args.repeat)
    floor = t_copy / 2.0
    bw = 2.0 * X.nbytes / t_copy
    print(f"points {X.nbytes / 1e6:.0f} MB; np.copyto of that size {t_copy * 1e3:.2f} ms = {bw / 1e9:.1f} GB/s "
          f"(read+write); floor (points bytes / bandwidth) {floor * 1e3:.2f} ms")
    labels = np.empty(n, dtype=np.int32)

    def step(C, data=X):
        _, sums, counts, _ = cpu_assign_sums(data, C, threads=args.threads, labels_out=labels)
        return sums, counts

    step(C0)  # compile / warm up
    rows = []
    ts, _ = lloyd_times(step, C0, args.iters)
    rows.append(("blocked pass, curve order (partition layout)", ts))
    X64 = X.astype(np.float64)  # what a node holds
    ts, _ = lloyd_times(lambda C: step(C, X64), C0, args.iters)
    rows.append(("blocked pass, float64 copy, curve order (floor x2)", [t / 2 for t in ts]))
    del X64
    Xr = X[rng.permutation(n)]
    ts, _ = lloyd_times(lambda C: step(C, Xr), C0, args.iters)
    rows.append(("blocked pass, random order", ts))
    del Xr
    if HAVE_NUMBA and not args.skip_hamerly:
        st = CompiledLloydState(X)  # float64 copy, stateful Hamerly bounds

        def hstep(C):
            sums, counts, _, _ = st.step(C)
            return sums, counts

        ts, _ = lloyd_times(hstep, C0, args.iters)
        rows.append(("Hamerly state (kmeans_compiled, float64 copy, floor x2)", [t / 2 for t in ts]))
    print("  (float64 rows are divided by 2: their points have twice the bytes, so their floor is twice as long)")
    for name, ts in rows:
        med = float(np.median(ts))
        print(f"  {name:<70s} median {med * 1e3:8.2f} ms/iter (min {min(ts) * 1e3:.2f})  "
              f"{med / floor:5.2f}x floor  ({med / t_copy:4.2f}x copy time)")


def bench_cpu_knn(args: argparse.Namespace) -> None:
    from scipy.spatial import cKDTree

    n, m, k = args.knn_points, args.knn_queries, args.knn_k
    print(f"\n== CPU kNN: {m:,} queries, k={k}, over {n:,} 2-D points (cKDTree, workers={args.threads}) ==")
    X = skewed(n, 2, seed=2)
    Q = skewed(m, 2, seed=3)
    t0 = time.perf_counter()
    tree = cKDTree(X, leafsize=16, balanced_tree=False, compact_nodes=False)
    print(f"  tree build {time.perf_counter() - t0:.2f} s")
    P = CpuBackend().prepare(X, tree=tree)
    plain = CpuBackend(threads=args.threads, presorted_queries=True)
    morton = CpuBackend(threads=args.threads)
    t_plain = best_of(lambda: plain.knn(P, Q, k), args.repeat)
    t_morton = best_of(lambda: morton.knn(P, Q, k), args.repeat)
    a, b = plain.knn(P, Q, k), morton.knn(P, Q, k)
    assert np.array_equal(a[0], b[0])
    print(f"  random query order {t_plain:.3f} s ({m / t_plain / 1e6:.2f} M queries/s); Morton order (sort "
          f"included) {t_morton:.3f} s ({m / t_morton / 1e6:.2f} M queries/s): {t_plain / t_morton:.2f}x")


# --------------------------------------------------------------------------------------------------- GPU


def bench_gpu(args: argparse.Namespace) -> None:
    import torch

    from distspatial.kernels.gpu_kernels import TorchBackend, torch_knn_bruteforce, triton_status

    dev = "cuda"
    sync = torch.cuda.synchronize
    print(f"\n== GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton_status()} ==")
    n, k = args.n, args.k
    X = skewed(n, 2, seed=0, dtype=np.float32)
    X = np.ascontiguousarray(X[curve_order(X)])
    rng = np.random.default_rng(1)
    C0 = X[rng.choice(n, k, replace=False)].astype(np.float64)
    Xt = torch.as_tensor(X, device=dev)
    buf = torch.empty_like(Xt)

    def gpu_time(fn, repeat):
        fn()
        sync()
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return min(ts), float(np.median(ts))

    t_copy, _ = gpu_time(lambda: buf.copy_(Xt), max(5, args.repeat))
    floor = t_copy / 2.0
    print(f"k-means: n={n:,} 2-D float32, k={k}; device copy {t_copy * 1e3:.3f} ms = "
          f"{2 * X.nbytes / t_copy / 1e9:.0f} GB/s; floor {floor * 1e3:.3f} ms")
    del buf
    for dtype in ("float32", "float64"):
        for fused in (True, False):
            if fused and triton_status() != "compiled":
                continue
            b = TorchBackend(device=dev, dtype=dtype, use_triton=fused)
            P = b.prepare(X)
            C = C0.copy()
            t_min, t_med = gpu_time(lambda: b.assign_device(P, C), args.iters)
            name = f"{dtype} {'Triton fused' if fused else 'eager tiles'}"
            print(f"  {name:<24s} median {t_med * 1e3:8.3f} ms/iter (min {t_min * 1e3:.3f})  "
                  f"{t_med / floor:5.2f}x floor  (labels, sums, counts, inertia; sums/counts to host)")
            del P
            torch.cuda.empty_cache()

    n, m, kq = args.knn_points, args.knn_queries, args.knn_k
    print(f"\nkNN: {m:,} queries, k={kq}, over {n:,} 2-D points")
    Xk = skewed(n, 2, seed=2)
    Qk = skewed(m, 2, seed=3)
    for dtype in ("float32", "float64"):
        b = TorchBackend(device=dev, dtype=dtype)
        t0 = time.perf_counter()
        P = b.prepare(Xk)
        _ = P.grid
        sync()
        t_build = time.perf_counter() - t0
        t_min, t_med = gpu_time(lambda: b.knn_device(P, Qk, kq), args.repeat)
        print(f"  grid kNN {dtype}: build {t_build:.2f} s; queries {t_med:.3f} s ({m / t_med / 1e6:.1f} M/s)")
        if dtype == "float32":
            t_grid32 = t_med
        sample = rng.choice(m, min(m, 20_000), replace=False)
        d_gpu, i_gpu = b.knn(P, Qk[sample], kq)
        del P
        torch.cuda.empty_cache()
    # brute-force baseline on a subset of the queries (scaled to all of them)
    ms = min(m, args.brute_queries)
    Xf = torch.as_tensor(Xk, dtype=torch.float32, device=dev)
    Qf = torch.as_tensor(Qk[:ms], dtype=torch.float32, device=dev)
    t_bf, _ = gpu_time(lambda: torch_knn_bruteforce(Xf, Qf, kq, exact=False, q_tile=2048, p_tile=1 << 20), 1)
    t_bf_all = t_bf * m / ms
    print(f"  brute force cdist+topk float32: {ms:,} queries {t_bf:.3f} s -> {t_bf_all:.1f} s for {m:,} "
          f"(scaled); grid float32 is {t_bf_all / t_grid32:.0f}x faster")
    from scipy.spatial import cKDTree

    t0 = time.perf_counter()
    tree = cKDTree(Xk, leafsize=16, balanced_tree=False, compact_nodes=False)
    t_tree = time.perf_counter() - t0
    cpu = CpuBackend(threads=os.cpu_count() or 1)
    Pc = cpu.prepare(Xk, tree=tree)
    t_cpu = best_of(lambda: cpu.knn(Pc, Qk, kq), 1)
    print(f"  CPU cKDTree ({os.cpu_count()} workers): build {t_tree:.2f} s, queries {t_cpu:.3f} s; grid float32 "
          f"{t_cpu / t_grid32:.1f}x faster")
    d_cpu, i_cpu = cpu.knn(Pc, Qk[sample], kq)
    print(f"  float64 grid vs CPU on {len(sample):,} queries: distances identical: "
          f"{np.array_equal(d_gpu, d_cpu)}, rows identical: {(i_gpu == i_cpu).mean() * 100:.4f} %")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--n", type=int, default=None, help="k-means points (default 20M on CPU, 100M on GPU)")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--knn-points", type=int, default=None, help="default 1M on CPU, 10M on GPU")
    ap.add_argument("--knn-queries", type=int, default=None, help="default 200K on CPU, 1M on GPU")
    ap.add_argument("--knn-k", type=int, default=10)
    ap.add_argument("--brute-queries", type=int, default=20_000, help="GPU brute-force baseline: queries timed")
    ap.add_argument("--skip-kmeans", action="store_true")
    ap.add_argument("--skip-knn", action="store_true")
    ap.add_argument("--skip-hamerly", action="store_true")
    args = ap.parse_args(argv)
    gpu = args.device == "cuda" or (args.device == "auto" and cuda_available())
    if args.device == "cuda" and not cuda_available():
        sys.exit("--device cuda: torch sees no CUDA device here")
    args.n = args.n or (100_000_000 if gpu else 20_000_000)
    args.knn_points = args.knn_points or (10_000_000 if gpu else 1_000_000)
    args.knn_queries = args.knn_queries or (1_000_000 if gpu else 200_000)
    print(f"bench_kernels: numpy {np.__version__}, {os.cpu_count()} CPUs, device {'cuda' if gpu else 'cpu'}")
    if gpu:
        bench_gpu(args)
    else:
        if not args.skip_kmeans:
            bench_cpu_kmeans(args)
        if not args.skip_knn:
            bench_cpu_knn(args)
    print(f"\nRay imported: {'ray' in sys.modules}")


if __name__ == "__main__":
    main()
