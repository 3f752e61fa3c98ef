"""Reliability figures: a Ray node killed under query load, and checkpoint throughput.

    python benchmarks/bench_reliability.py            # prints a Markdown table for docs/reliability.md

Part 1 runs on several real Ray nodes on this machine (``ray.cluster_utils.Cluster``: a head and 3 workers, each
its own raylet and object store). 4 distspatial nodes, replication 2, heartbeats every 200 ms. A thread runs
batched kNN queries (2,000 queries, k=10) without pause and checks every answer against cKDTree; the Ray node of
one distspatial node is killed (raylet and workers, no warning). Measured: time from the kill to detection (the
node marked failed), to full redundancy (every partition back at 2 live replicas), queries that failed or were
wrong, and points lost (a range query over everything, count and id checksum).

Part 2 (local runtime): checkpoint write and restore of 2,000,000 2-D points, as MB/s of raw partition data.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time

import numpy as np


def kill_under_load(n_points: int) -> dict:
    import ray
    from ray.cluster_utils import Cluster
    from scipy.spatial import cKDTree

    from distspatial import DistributedSpatialCluster, NodeConfig
    from distspatial.io.datasets import skewed_points

    mb = 1024**2
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 200 * mb,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
    workers = [c.add_node(num_cpus=1, object_store_memory=200 * mb) for _ in range(3)]
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="ERROR")
    pts = skewed_points(n_points, 2, seed=7)
    q = skewed_points(2_000, 2, seed=7, sample_seed=8)
    ref, _ = cKDTree(pts).query(q, 10)
    cfg = NodeConfig().with_node_count(4).with_fault_tolerance(True).replace(
        cpus_per_node=0.25, heartbeat_interval_ms=200, communication_timeout_ms=5_000)
    out: dict = {}
    try:
        with DistributedSpatialCluster(cfg) as cluster:
            cluster.distribute_data(pts)
            hosts = {info["ray_node_id"]: i for i, info in cluster.node_info.items()}
            victim = next(w for w in workers if w.node_id in hosts)
            stats = {"ok": 0, "wrong": 0, "failed": 0, "lat": []}
            stop = threading.Event()

            def load():
                while not stop.is_set():
                    t0 = time.perf_counter()
                    try:
                        d, _ = cluster.distributed_knn_search(q, 10)
                        good = np.allclose(d, ref, rtol=0, atol=1e-12)
                        stats["ok" if good else "wrong"] += 1
                    except Exception:
                        stats["failed"] += 1
                    stats["lat"].append(time.perf_counter() - t0)

            th = threading.Thread(target=load)
            th.start()
            time.sleep(2.0)
            before = len(stats["lat"])
            t_kill = time.perf_counter()
            c.remove_node(victim, allow_graceful=False)
            t_detect = t_full = None
            while time.perf_counter() - t_kill < 120:
                if t_detect is None and set(cluster.failed_node_ids):
                    t_detect = time.perf_counter() - t_kill
                if t_detect is not None and not cluster.health()["under_replicated"]:
                    t_full = time.perf_counter() - t_kill
                    break
                time.sleep(0.01)
            time.sleep(2.0)
            stop.set()
            th.join()
            center = pts.mean(axis=0)
            everything = cluster.range_search(center, float(np.sqrt(((pts - center) ** 2).sum(1)).max()) + 1)
            lat = np.array(stats["lat"][before:])
            out = {
                "detect_s": t_detect, "redundant_s": t_full, "ok": stats["ok"], "wrong": stats["wrong"],
                "failed": stats["failed"], "lost": len(pts) - len(everything),
                "checksum_ok": bool(np.array_equal(everything, np.arange(len(pts)))),
                "p50_ms": float(np.percentile(lat, 50) * 1e3), "max_ms": float(lat.max() * 1e3),
                "baseline_p50_ms": float(np.percentile(stats["lat"][:before], 50) * 1e3),
            }
    finally:
        ray.shutdown()
        c.shutdown()
    return out


def checkpoint_throughput(n_points: int) -> dict:
    import ray

    from distspatial import DistributedSpatialCluster, NodeConfig
    from distspatial.io.datasets import skewed_points

    pts = skewed_points(n_points, 2, seed=9)
    raw_mb = pts.nbytes * 1.5 / 1e6  # points + int64 ids
    root = tempfile.mkdtemp(prefix="dsckpt")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        with DistributedSpatialCluster(NodeConfig().with_node_count(2)) as c:
            c.distribute_data(pts)
            t = time.perf_counter()
            c.checkpoint(root)
            t_write = time.perf_counter() - t
        t = time.perf_counter()
        with DistributedSpatialCluster.restore(root, NodeConfig().with_node_count(2)) as r:
            t_restore = time.perf_counter() - t
            assert r.n_points == n_points
        on_disk = sum(f.stat().st_size for f in __import__("pathlib").Path(root).rglob("*") if f.is_file()) / 1e6
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    return {"raw_mb": raw_mb, "disk_mb": on_disk, "write_s": t_write, "restore_s": t_restore}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=400_000)
    ap.add_argument("--checkpoint-points", type=int, default=2_000_000)
    args = ap.parse_args()
    k = kill_under_load(args.points)
    ck = checkpoint_throughput(args.checkpoint_points)
    print(f"# distspatial reliability ({args.points:,} points under load; checkpoint of {args.checkpoint_points:,})")
    print()
    print("| figure | value | goal |")
    print("|---|---|---|")
    print(f"| node death -> detected (node marked failed) | {k['detect_s']:.2f} s | faster than Ray's GCS check |")
    print(f"| node death -> full redundancy (every partition at 2 live replicas) | {k['redundant_s']:.2f} s | bounded |")
    print(f"| kNN batches answered during the run / wrong / failed | {k['ok']} / {k['wrong']} / {k['failed']} | 0 wrong, 0 failed |")
    print(f"| batch latency p50 before / after the kill, max after | {k['baseline_p50_ms']:.0f} ms / {k['p50_ms']:.0f} ms, max {k['max_ms']:.0f} ms | |")
    print(f"| points lost (range query over everything; ids all present) | {k['lost']} ({'checksum ok' if k['checksum_ok'] else 'MISMATCH'}) | 0 |")
    print(f"| checkpoint write ({ck['raw_mb']:.0f} MB raw -> {ck['disk_mb']:.0f} MB on disk) | {ck['write_s']:.2f} s ({ck['raw_mb'] / ck['write_s']:.0f} MB/s) | |")
    print(f"| restore (new cluster, checksums verified) | {ck['restore_s']:.2f} s ({ck['raw_mb'] / ck['restore_s']:.0f} MB/s) | |")


if __name__ == "__main__":
    main()
