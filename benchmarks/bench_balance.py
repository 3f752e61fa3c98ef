"""Communication and balancing figures (issue #4), one run, same data.

    python benchmarks/bench_balance.py            # 4M points / 200K queries / 10M distribute
    python benchmarks/bench_balance.py --quick

1. Bytes moved by one batch kNN (k=10) through distspatial's two-round routing, against broadcasting every
   query to every node (each node answering with its k best): the broadcast figure is that scheme's exact byte
   count, m*d*8 out and m*k*16 back per node.
2. Wire bytes of distributing 10M points with and without compression (`statistics()`: wire and raw bytes).
3. Time to rebalance a 4-node cluster whose node 0 holds 70% of the points (LeastLoaded, threshold 1.1).
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import numpy as np
    import ray

    from distspatial import DistributedSpatialCluster, NodeConfig
    from distspatial.io.datasets import skewed_points

    n, m, n_big = (400_000, 20_000, 1_000_000) if args.quick else (4_000_000, 200_000, 10_000_000)
    k, nodes = 10, 4
    pts = skewed_points(n, 2, seed=1)
    q = skewed_points(m, 2, seed=1, sample_seed=2)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    rows = []
    try:
        with DistributedSpatialCluster(NodeConfig().with_node_count(nodes)) as c:
            c.distribute_data(pts)
            before = c.comm.totals()
            c.distributed_knn_search(q, k)
            after = c.comm.totals()
            ours = (after["bytes_sent"] - before["bytes_sent"]) + (after["bytes_received"] - before["bytes_received"])
            msgs = after["messages_sent"] - before["messages_sent"]
            broadcast = nodes * (m * 2 * 8 + m * k * 16)
            rows.append(("bytes moved by one batch kNN", f"{m:,} queries, k={k}, {nodes} nodes",
                         f"{ours / 1e6:.1f} MB in {msgs} messages", f"{broadcast / 1e6:.1f} MB (broadcast)",
                         f"**{broadcast / ours:.2f}x** fewer bytes"))

            meta = c.metadata
            for p in meta.partitions:  # pile 70% of the points onto node 0
                if p.owners[0] != 0 and p.partition_id % 10 < 6:
                    c.move_partition(p.partition_id, p.owners[0], 0)
            share = sum(p.size for p in c.metadata.partitions if 0 in p.owners) / meta.n_points
            t = time.perf_counter()
            plan = c.rebalance(strategy="LeastLoaded", threshold=1.1)
            dt = time.perf_counter() - t
            rows.append(("rebalance a 4-node cluster", f"node 0 holds {share:.0%} of {n:,} points",
                         f"{dt:.2f} s, {len(plan.migrations)} migrations, {plan.migration_bytes / 1e6:.0f} MB",
                         f"imbalance {plan.imbalance_before:.2f} -> {plan.imbalance_after:.2f}", ""))
        big = skewed_points(n_big, 2, seed=4)
        wire = {}
        for compress in (False, True):
            with DistributedSpatialCluster(NodeConfig().with_node_count(nodes).with_compression(compress)) as c:
                t = time.perf_counter()
                c.distribute_data(big)
                dt = time.perf_counter() - t
                st = c.statistics()
                wire[compress] = (st.bytes_sent, st.raw_bytes_sent, dt)
        (w0, r0, t0), (w1, r1, t1) = wire[False], wire[True]
        rows.append((f"wire bytes of distributing {n_big:,} points", "compression off / on",
                     f"{w1 / 1e6:.0f} MB compressed ({t1:.2f} s)", f"{w0 / 1e6:.0f} MB raw ({t0:.2f} s)",
                     f"**{w0 / w1:.2f}x** fewer bytes"))
    finally:
        ray.shutdown()
    print(f"# distspatial communication and balancing ({'quick' if args.quick else 'full'})\n")
    print("| measure | setting | distspatial | reference | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
