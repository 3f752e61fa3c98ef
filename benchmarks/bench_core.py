"""Core benchmark: distspatial against scipy cKDTree and scikit-learn KMeans, same data, one run, ratios.

Workload (issue #2): skewed 2-D points (Gaussian hot spots of varied size with Pareto weights over a 20% uniform
background), queries drawn from the same distribution.

    python benchmarks/bench_core.py                 # full sizes: 4M points, 1M queries, 10M distribute
    python benchmarks/bench_core.py --quick         # a smaller run (400K / 100K / 1M) for a smoke test

Prints a Markdown table; ratios are "ours / peer" for throughput (higher is better) and "peer / ours" is never
used: every ratio row says which way is better.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time

import numpy as np


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--nodes", default="2,4", help="node counts to run (default 2,4)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each query/k-means run (best is kept)")
    args = ap.parse_args()

    import ray
    from scipy.spatial import cKDTree
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_info

    from distspatial import DistributedSpatialCluster, NodeConfig
    from distspatial.io.datasets import skewed_points

    n_index, n_query, n_dist = (400_000, 100_000, 1_000_000) if args.quick else (4_000_000, 1_000_000, 10_000_000)
    k_nn, k_means, iters = 10, 16, 20
    node_counts = [int(x) for x in args.nodes.split(",")]

    print(f"# distspatial core benchmark ({'quick' if args.quick else 'full'})")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"numpy {np.__version__}, BLAS {[i.get('internal_api') for i in threadpool_info()]}")
    pts = skewed_points(n_index, 2, seed=1)
    queries = skewed_points(n_query, 2, seed=1, sample_seed=2)
    init = pts[np.random.default_rng(3).choice(n_index, k_means, replace=False)]
    rows = []

    # -- peers ---------------------------------------------------------------------------------------------
    tree, t_build = timed(cKDTree, pts)
    best_q = min(timed(tree.query, queries, k_nn, workers=-1)[1] for _ in range(args.repeats))
    ref_d, _ = tree.query(queries[:2000], k_nn)
    del tree
    km_best = np.inf
    for _ in range(args.repeats):
        km = KMeans(k_means, init=init, n_init=1, algorithm="lloyd", max_iter=iters, tol=0)
        _, t = timed(km.fit, pts)
        km_best = min(km_best, t / km.n_iter_)
    sk_inertia = km.inertia_
    big = skewed_points(n_dist, 2, seed=4)
    _, t_build_big = timed(cKDTree, big)
    gc.collect()

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    try:
        for nodes in node_counts:
            cfg = NodeConfig().with_node_count(nodes)
            with DistributedSpatialCluster(cfg) as cluster:
                _, t_dist = timed(cluster.distribute_data, pts)
                best = np.inf
                for _ in range(args.repeats):
                    (d, ids), t = timed(cluster.distributed_knn_search, queries, k_nn)
                    best = min(best, t)
                exact = bool(np.allclose(d[:2000], ref_d, rtol=0, atol=1e-12))
                km_ours = np.inf
                for _ in range(args.repeats):
                    res = cluster.distributed_kmeans(k_means, iters, tol=0, init=init)
                    km_ours = min(km_ours, res.loop_seconds / res.n_iter)
                same = abs(res.inertia - sk_inertia) <= 1e-6 * sk_inertia
                _, t_big = timed(cluster.distribute_data, big)
            rows.append((nodes, t_dist, best, exact, km_ours, same, t_big))
    finally:
        ray.shutdown()

    print()
    print(f"data: {n_index:,} skewed 2-D points; {n_query:,} kNN queries (k={k_nn}) from the same distribution; "
          f"k-means k={k_means}, {iters} Lloyd iterations, same explicit init, tol=0; distribute {n_dist:,} points")
    print()
    print("| measure | peer | peer time | nodes | distspatial time | ratio | better |")
    print("|---|---|---|---|---|---|---|")
    for nodes, t_dist, best, exact, km_ours, same, t_big in rows:
        print(f"| batched kNN throughput ({n_query:,} q) | cKDTree query, workers=-1 | {best_q:.2f} s "
              f"({n_query / best_q:,.0f} q/s) | {nodes} | {best:.2f} s ({n_query / best:,.0f} q/s) | "
              f"**{best_q / best:.2f}x** throughput{'' if exact else ' (MISMATCH)'} | higher |")
        print(f"| k-means time per Lloyd iteration | sklearn KMeans lloyd | {km_best * 1e3:.1f} ms | {nodes} | "
              f"{km_ours * 1e3:.1f} ms | **{km_ours / km_best:.2f}x** time{'' if same else ' (INERTIA DIFFERS)'} "
              f"| lower |")
        print(f"| distribute {n_dist:,} points vs build | cKDTree build | {t_build_big:.2f} s | {nodes} | "
              f"{t_big:.2f} s | **{t_big / t_build_big:.2f}x** time | lower |")
        print(f"| (distribute {n_index:,} points) | cKDTree build {n_index:,} | {t_build:.2f} s | {nodes} | "
              f"{t_dist:.2f} s | {t_dist / t_build:.2f}x time | lower |")


if __name__ == "__main__":
    main()
