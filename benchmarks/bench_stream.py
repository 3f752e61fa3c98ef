"""Streaming figures (issue #6): sustained ingest rate with concurrent batched kNN queries, and query latency.

    python benchmarks/bench_stream.py            # 2M base points, 120 batches of 100K, queries of 100 points
    python benchmarks/bench_stream.py --quick

One run, same data:
1. distspatial: a writer thread ingests batches (every replica holds a batch before the next); a reader thread
   runs kNN (k=10) batches of 100 queries back to back. First half of the batches as fast as the cluster
   acknowledges them, second half offered at ``--rate`` points/s (a live feed). Reported: points/s acknowledged
   while queries run, query latency p50/p99 during each, with no ingest, and in the seconds after the feed
   stops, while the nodes rebuild the KD-trees of the partitions that grew (deferred to a pause in the feed,
   see ``LocalPartition``).
2. Peer: scipy ``cKDTree`` kept current by rebuilding it after each batch (the single-machine way to keep a
   static KD-tree exact under appends), same batches; ratio of sustained ingest rates.
"""

from __future__ import annotations

import argparse
import os
import threading
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--rate", type=float, default=1e6, help="paced run: points/s offered by the writer (1e6)")
    args = ap.parse_args()
    import numpy as np
    import ray
    from scipy.spatial import cKDTree

    from distspatial import DistributedSpatialCluster, NodeConfig
    from distspatial.io.datasets import skewed_points

    n, n_batches, batch, qb = (500_000, 20, 50_000, 100) if args.quick else (2_000_000, 120, 100_000, 100)
    base = skewed_points(n, 2, seed=1)
    batches = [skewed_points(batch, 2, seed=1, sample_seed=10 + b) for b in range(n_batches)]
    queries = [skewed_points(qb, 2, seed=1, sample_seed=1000 + j) for j in range(50)]

    # peer: cKDTree rebuilt after each batch
    pts = base
    t = time.perf_counter()
    n_peer = max(3, n_batches // 12)
    for b in batches[:n_peer]:
        pts = np.concatenate([pts, b])
        cKDTree(pts, balanced_tree=False, compact_nodes=False)
    peer_rate = n_peer * batch / (time.perf_counter() - t)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    try:
        with DistributedSpatialCluster(NodeConfig().with_node_count(args.nodes)) as c:
            c.distribute_data(base)
            quiet = []
            for j in range(40):  # latency with no ingest
                t0 = time.perf_counter()
                c.distributed_knn_search(queries[j % 50], 10)
                quiet.append(time.perf_counter() - t0)
            lat, done = [], threading.Event()

            def reader():
                j = 0
                while not done.is_set():
                    t0 = time.perf_counter()
                    c.distributed_knn_search(queries[j % 50], 10)
                    lat.append(time.perf_counter() - t0)
                    j += 1

            def run(pace: float | None):
                lat.clear()
                done.clear()
                th = threading.Thread(target=reader)
                th.start()
                t = time.perf_counter()
                for j, b in enumerate(batches_iter()):
                    if pace:  # offer batches at the given rate (a live feed), not as fast as possible
                        wait = t + j * batch / pace - time.perf_counter()
                        if wait > 0:
                            time.sleep(wait)
                    c.ingest(b)
                dt = time.perf_counter() - t
                done.set()
                th.join()
                return n_batches * batch / dt, np.array(lat) * 1e3

            half = n_batches // 2
            batches_iter = lambda: batches[:half]  # noqa: E731
            n_batches_all, n_batches = n_batches, half
            rate, lat_ms = run(None)  # as fast as the cluster acknowledges
            batches_iter = lambda: batches[half:]  # noqa: E731
            paced_rate, paced_ms = run(args.rate)
            n_batches = n_batches_all
            # the feed stopped: the nodes now rebuild the grown partitions' KD-trees in the background
            after = []
            t_end = time.perf_counter() + 4.0
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                c.distributed_knn_search(queries[len(after) % 50], 10)
                after.append(time.perf_counter() - t0)
            nodes = c.statistics().nodes
            rebuilds, in_runs = sum(s.base_rebuilds for s in nodes), sum(s.delta_points for s in nodes)
            # exactness spot check after the run
            allp = np.concatenate([base] + batches)
            d, _ = c.distributed_knn_search(queries[0], 10)
            ref, _ = cKDTree(allp).query(queries[0], 10)
            assert np.allclose(d, ref, rtol=0, atol=1e-12), "answers after ingest are not exact"
    finally:
        ray.shutdown()
    quiet_ms = np.array(quiet) * 1e3
    print(f"# distspatial streaming ({'quick' if args.quick else 'full'}), {os.cpu_count()} cores, "
          f"{args.nodes} nodes, base {n:,} points, {n_batches} batches of {batch:,}\n")
    print("| measure | distspatial | peer | ratio |")
    print("|---|---|---|---|")
    print(f"| sustained ingest, kNN batches running | {rate / 1e6:.2f} M points/s | cKDTree rebuilt per batch: "
          f"{peer_rate / 1e6:.2f} M points/s | **{rate / peer_rate:.1f}x** |")
    print(f"| kNN latency during full-speed ingest ({qb} queries, k=10), p50 / p99 | "
          f"{np.percentile(lat_ms, 50):.1f} / {np.percentile(lat_ms, 99):.1f} ms ({len(lat_ms)} calls) | | |")
    print(f"| ingest offered at {args.rate / 1e6:.2f} M points/s: achieved | {paced_rate / 1e6:.2f} M points/s | | |")
    print(f"| kNN latency during that paced ingest, p50 / p99 | {np.percentile(paced_ms, 50):.1f} / "
          f"{np.percentile(paced_ms, 99):.1f} ms ({len(paced_ms)} calls) | | |")
    print(f"| kNN latency without ingest, p50 / p99 | {np.percentile(quiet_ms, 50):.1f} / "
          f"{np.percentile(quiet_ms, 99):.1f} ms | | |")
    after_ms = np.array(after) * 1e3
    print(f"| kNN latency in the 4 s after the feed stops (deferred KD-tree rebuilds: "
          f"{rebuilds} done, {in_runs:,} points still in runs), p50 / p99 | {np.percentile(after_ms, 50):.1f} / "
          f"{np.percentile(after_ms, 99):.1f} ms ({len(after_ms)} calls) | | |")


if __name__ == "__main__":
    main()
