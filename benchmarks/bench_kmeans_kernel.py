"""Per-iteration cost of the Lloyd kernel versus scikit-learn's Lloyd.

Data: ``--n`` (default 4M) 2-D skewed points: 20 Gaussian hot spots with
random weights and spreads (80 %) plus a uniform background (20 %), k = 16,
initial centres = k random data points.

* scikit-learn: ``KMeans(init=C0, n_init=1, algorithm="lloyd", tol=0,
  max_iter=T)`` on all points with 2 threads.  Per-iteration time =
  (time(T=ITERS) - time(T=1)) / (ITERS - 1), which removes the fixed cost of
  ``fit`` (input checks, copies, the final E-step); the plain time(T)/T is
  printed too.
* ours: the points are split into two halves, one :class:`LloydState` per
  half (as two nodes would hold them), each ``step`` single-threaded
  (threadpoolctl limits BLAS to 1 thread; the kernel itself is numpy only).
  The coordinator combines the sums/counts exactly as the distributed version
  would, so the run follows the same Lloyd trajectory as scikit-learn, whose
  final inertia is checked against ours.  Reported per iteration: the mean
  over ITERS steps (first call included) of one half's step time, i.e. the
  time of one node holding n/2 points; the two nodes run in parallel on two
  cores, so this is the time of a distributed iteration without Ray overhead.

Every measurement is repeated ``--repeat`` times and the minimum is kept
(the machine is shared; timings are noisy).

Run:  python benchmarks/bench_kmeans_kernel.py [--n 4000000] [--iters 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from distspatial.core.curves import curve_keys  # noqa: E402
from distspatial.kernels.kmeans_compiled import HAVE_NUMBA, CompiledLloydState  # noqa: E402
from distspatial.kernels.kmeans_kernels import LloydState, squared_distances_min  # noqa: E402


def make_data(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n_hot = int(n * 0.8)
    hubs = rng.random((20, 2)) * 100.0
    weights = rng.dirichlet(np.ones(20))
    spread = rng.uniform(0.5, 3.0, 20)
    which = rng.choice(20, n_hot, p=weights)
    hot = hubs[which] + rng.normal(size=(n_hot, 2)) * spread[which, None]
    background = rng.random((n - n_hot, 2)) * 100.0
    X = np.concatenate([hot, background])
    rng.shuffle(X)
    return np.ascontiguousarray(X)


def time_sklearn(X: np.ndarray, C0: np.ndarray, iters: int, repeat: int) -> tuple[float, float, float]:
    from sklearn.cluster import KMeans

    def fit(t: int) -> tuple[float, float]:
        km = KMeans(n_clusters=C0.shape[0], init=C0, n_init=1, algorithm="lloyd", tol=0.0, max_iter=t)
        t0 = time.perf_counter()
        km.fit(X)
        return time.perf_counter() - t0, float(km.inertia_)

    with threadpool_limits(limits=2):
        fit(1)  # warm-up (imports, thread pools)
        t1 = min(fit(1)[0] for _ in range(repeat))
        runs = [fit(iters) for _ in range(repeat)]
    tT = min(r[0] for r in runs)
    return (tT - t1) / (iters - 1), tT / iters, runs[0][1]


def run_ours(impl, halves: list, C0: np.ndarray, iters: int) -> tuple[float, float, float, list[float], float]:
    """One distributed-style run; returns (init s, mean step s, steady mean s, per-iter s, inertia)."""
    t0 = time.perf_counter()
    states = [impl(h) for h in halves]
    t_init = (time.perf_counter() - t0) / 2
    C = C0.copy()
    per_iter = []
    with threadpool_limits(limits=1):
        for _ in range(iters):
            ts, tot_s, tot_c = [], 0.0, 0
            for st in states:
                t0 = time.perf_counter()
                s, c, _, _ = st.step(C)
                ts.append(time.perf_counter() - t0)
                tot_s = tot_s + s
                tot_c = tot_c + c
            per_iter.append(max(ts))
            nonempty = tot_c > 0
            C = C.copy()
            C[nonempty] = tot_s[nonempty] / tot_c[nonempty, None]
        # scikit-learn's final E-step: inertia of the labels for the final centres
        inertia = float(sum(squared_distances_min(h, C)[1].sum() for h in halves))
    return t_init, float(np.mean(per_iter)), float(np.mean(per_iter[2:])), per_iter, inertia


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4_000_000)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--random-order", action="store_true",
                    help="keep each half in random order (the cluster keeps partitions in Hilbert order)")
    args = ap.parse_args()

    X = make_data(args.n, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    C0 = X[rng.choice(args.n, args.k, replace=False)].copy()
    print(f"data: {args.n} x 2 skewed points, k={args.k}, {args.iters} Lloyd iterations")

    halves = [np.ascontiguousarray(h) for h in np.array_split(X, 2)]
    if not args.random_order:  # as distribute_data leaves them: each partition in curve order
        halves = [np.ascontiguousarray(h[np.argsort(curve_keys(h, X.min(0), X.max(0)), kind="stable")])
                  for h in halves]
    impls = [LloydState] + ([CompiledLloydState] if HAVE_NUMBA else [])
    if HAVE_NUMBA:
        CompiledLloydState(halves[0][:10]).step(C0[:2])  # compile (cached on disk after the first run)
    results = {}
    for impl in impls:
        best = None
        for _ in range(args.repeat):
            r = run_ours(impl, halves, C0, args.iters)
            if best is None or r[1] < best[1]:
                best = r
        results[impl.__name__] = best
        t_init, t_step, t_steady, per_iter, inertia = best
        print(f"ours   : {impl.__name__}.step on {args.n // 2} points, 1 thread, "
              f"{'random' if args.random_order else 'curve'} order")
        print(f"         construction {t_init * 1e3:7.1f} ms (once per partition)")
        print(f"         mean step    {t_step * 1e3:7.1f} ms per iteration (first call included)")
        print(f"         steps 3..{args.iters}   {t_steady * 1e3:7.1f} ms per iteration")
        print("         per step ms : " + " ".join(f"{t * 1e3:.0f}" for t in per_iter))
        print(f"         inertia {inertia:.10e}")

    if args.skip_sklearn:
        return
    sk_iter, sk_plain, sk_inertia = time_sklearn(X, C0, args.iters, args.repeat)
    print(f"sklearn: KMeans lloyd on {args.n} points, 2 threads")
    print(f"         {sk_iter * 1e3:7.1f} ms per iteration (fit(T={args.iters}) - fit(T=1)) / {args.iters - 1}")
    print(f"         {sk_plain * 1e3:7.1f} ms per iteration (fit(T={args.iters}) / {args.iters})")
    print(f"         inertia {sk_inertia:.10e}")
    for name, (_, t_step, t_steady, _, inertia) in results.items():
        print(f"ratio {name} / sklearn per iteration: {t_step / sk_iter:.3f} (mean step), "
              f"{t_steady / sk_iter:.3f} (steps 3..{args.iters}); inertia rel. diff "
              f"{abs(inertia - sk_inertia) / sk_inertia:.1e}")


if __name__ == "__main__":
    main()
