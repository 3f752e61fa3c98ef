"""Analytics figures (issue #5): DBSCAN and kNN join against scikit-learn, same data, one run.

    python benchmarks/bench_analytics.py            # DBSCAN on 400K points, kNN join 1M x 2M
    python benchmarks/bench_analytics.py --quick

1. DBSCAN (eps, min_samples chosen for dense hot spots with background noise), skewed 2-D data: scikit-learn
   ``DBSCAN(n_jobs=-1)`` against ``distributed_dbscan``; the run checks the two agree (core points, noise,
   clusters) and prints the time ratio.
2. kNN join (k=10): scikit-learn ``NearestNeighbors(algorithm="kd_tree", n_jobs=-1).kneighbors`` against
   ``knn_join`` (the other set given as an array); distances checked equal.
3. Hierarchical (Ward): scikit-learn ``AgglomerativeClustering`` on a 20K subsample (it needs O(n^2) memory) vs
   ``distributed_hierarchical`` on the full set; ARI between them on the subsample.
"""

from __future__ import annotations

import argparse
import os
import time


def best(fn, repeats):
    out, t_best = None, float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        t_best = min(t_best, time.perf_counter() - t)
    return out, t_best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import numpy as np
    import ray
    from sklearn.cluster import DBSCAN, AgglomerativeClustering
    from sklearn.metrics import adjusted_rand_score
    from sklearn.neighbors import NearestNeighbors

    from distspatial import DistributedSpatialCluster, NodeConfig
    from distspatial.io.datasets import skewed_points

    n_db, n_join, m_join, n_h = (100_000, 300_000, 300_000, 200_000) if args.quick else (
        400_000, 2_000_000, 1_000_000, 1_000_000)
    X = skewed_points(n_db, 2, seed=3)
    eps, ms = 0.002, 20
    P = skewed_points(n_join, 2, seed=5)
    Q = skewed_points(m_join, 2, seed=5, sample_seed=9)
    H = skewed_points(n_h, 2, seed=7)
    rows = []
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    try:
        with DistributedSpatialCluster(NodeConfig().with_node_count(args.nodes)) as c:
            ref, t_ref = best(lambda: DBSCAN(eps=eps, min_samples=ms, n_jobs=-1).fit(X), args.repeats)
            c.distribute_data(X)
            res, t_us = best(lambda: c.distributed_dbscan(eps, ms), args.repeats)
            assert np.array_equal(res.core_sample_indices, ref.core_sample_indices_)
            assert np.array_equal(res.labels == -1, ref.labels_ == -1)
            rows.append((f"DBSCAN, {n_db:,} skewed 2-D points, eps={eps}, min_samples={ms}",
                         "sklearn DBSCAN n_jobs=-1", t_ref, t_us,
                         f"{res.n_clusters} clusters, {res.n_noise:,} noise, {res.halo_points:,} halo points"))

            nn = NearestNeighbors(n_neighbors=10, algorithm="kd_tree", n_jobs=-1).fit(P)
            (rd, _), t_ref = best(lambda: nn.kneighbors(Q), args.repeats)
            c.distribute_data(P)
            (d, _), t_us = best(lambda: c.knn_join(Q, 10), args.repeats)
            assert np.allclose(d, rd, rtol=0, atol=1e-12)
            rows.append((f"kNN join, {m_join:,} x {n_join:,} points, k=10", "sklearn NearestNeighbors kd_tree",
                         t_ref, t_us, "fit time of the peer not counted; distribute not counted"))

            sub = np.random.default_rng(0).choice(n_h, 20_000, replace=False)
            agg, t_ref = best(lambda: AgglomerativeClustering(n_clusters=20, linkage="ward").fit(H[sub]), 1)
            c.distribute_data(H)
            hres, t_us = best(lambda: c.distributed_hierarchical(n_clusters=20), args.repeats)
            ari = adjusted_rand_score(agg.labels_, hres.labels[sub])
            rows.append((f"Ward hierarchical, 20 clusters", "sklearn Agglomerative on 20K subsample", t_ref, t_us,
                         f"ours on all {n_h:,} points; ARI vs sklearn on the subsample {ari:.2f}"))
    finally:
        ray.shutdown()
    print(f"# distspatial analytics ({'quick' if args.quick else 'full'}), {os.cpu_count()} cores, "
          f"{args.nodes} nodes\n")
    print("| workload | peer | peer time | distspatial time | ratio (peer / ours) | notes |")
    print("|---|---|---|---|---|---|")
    for name, peer, tp, tu, note in rows:
        print(f"| {name} | {peer} | {tp:.2f} s | {tu:.2f} s | **{tp / tu:.2f}x** | {note} |")


if __name__ == "__main__":
    main()
