"""Parallel file load (``distribute_files``) against one scipy cKDTree build over the same points.

A Parquet dataset of 8 files (40M uniform 2-D points; ``--quick``: 4M) is written once (``--data``, reused when
present). For each size (a quarter of the files, then all of them: 10M and 40M; ``--quick``: 1M and 4M) a fresh
subprocess starts an embedded Ray runtime, creates a cluster, runs ``distribute_files`` and reports its wall time,
the client's CPU time during it (``time.process_time``, every thread of this process) as % of wall, and the
client's peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``, read right after the load); then, in another fresh
subprocess, the same points are read into memory and a ``cKDTree`` is built (wall time of the build alone and of
read + build). Ratios are printed in one run::

    python benchmarks/bench_load.py --quick
    python benchmarks/bench_load.py --nodes 2        # 40M: needs ~10 GB of memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

N_FILES = 8


def write_dataset(root: str, n: int, seed: int = 0) -> list[str]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(root, exist_ok=True)
    marker = os.path.join(root, f".complete-{n}")
    paths = [os.path.join(root, f"part-{j:02d}.parquet") for j in range(N_FILES)]
    if os.path.exists(marker):
        return paths
    per = n // N_FILES
    for j, p in enumerate(paths):
        pts = np.random.default_rng([seed, j]).random((per, 2))
        pq.write_table(pa.table({"x": pts[:, 0], "y": pts[:, 1]}), p, row_group_size=1 << 20, compression="snappy")
    open(marker, "w").close()
    return paths


def _load(paths: list[str], nodes: int) -> dict:
    import resource

    import ray

    from distspatial import DistributedSpatialCluster, NodeConfig

    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with DistributedSpatialCluster(NodeConfig().with_node_count(nodes)) as cluster:
        # warm up the nodes (imports of pyarrow, key kernels) on a tiny load of the first file's first row group
        cluster.distribute_files(paths[0])
        c0, t0 = time.process_time(), time.perf_counter()
        meta = cluster.distribute_files(paths)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        n = meta.n_points
    ray.shutdown()
    return {"n": n, "wall_s": wall, "client_cpu_s": cpu, "client_cpu_pct": 100 * cpu / wall,
            "client_peak_rss_mb": rss / 1024, "client_rss_before_mb": rss0 / 1024}


def _kdtree(paths: list[str]) -> dict:
    import numpy as np
    import pyarrow.parquet as pq
    from scipy.spatial import cKDTree

    t0 = time.perf_counter()
    tables = [pq.read_table(p) for p in paths]
    pts = np.empty((sum(t.num_rows for t in tables), 2))
    at = 0
    for t in tables:
        pts[at:at + t.num_rows, 0] = t.column("x").to_numpy()
        pts[at:at + t.num_rows, 1] = t.column("y").to_numpy()
        at += t.num_rows
    del tables
    t1 = time.perf_counter()
    tree = cKDTree(pts)
    t2 = time.perf_counter()
    del tree
    return {"n": len(pts), "read_s": t1 - t0, "build_s": t2 - t1, "read_build_s": t2 - t0}


def _child(kind: str, paths: list[str], nodes: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--nodes", str(nodes), "--paths", json.dumps(paths)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4M points (1M and 4M) instead of 40M (10M and 40M)")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--data", default=None, help="dataset directory (default: a folder in the temp directory)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--paths", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        paths = json.loads(a.paths)
        res = _load(paths, a.nodes) if a.child == "load" else _kdtree(paths)
        print(json.dumps(res))
        return
    n = 4_000_000 if a.quick else 40_000_000
    root = a.data or os.path.join(tempfile.gettempdir(), f"distspatial-bench-load-{n}")
    t = time.perf_counter()
    paths = write_dataset(root, n)
    print(f"dataset: {N_FILES} Parquet files, {n:,} 2-D points in {root} ({time.perf_counter() - t:.1f} s)")
    print(f"machine: {os.cpu_count()} CPUs; cluster: {a.nodes} nodes, embedded Ray runtime")
    rows = []
    for files in (paths[: N_FILES // 4], paths):
        load = _child("load", files, a.nodes)
        tree = _child("tree", files, a.nodes)
        rows.append((load, tree))
        print(f"n={load['n']:>11,}: distribute_files {load['wall_s']:.2f} s | cKDTree build {tree['build_s']:.2f} s "
              f"(read+build {tree['read_build_s']:.2f} s) | ratio load/build {load['wall_s'] / tree['build_s']:.2f}, "
              f"load/(read+build) {load['wall_s'] / tree['read_build_s']:.2f} | client CPU {load['client_cpu_s']:.2f} s "
              f"= {load['client_cpu_pct']:.1f}% of wall | client peak RSS {load['client_peak_rss_mb']:.0f} MB "
              f"(before the cluster {load['client_rss_before_mb']:.0f} MB)")
    (small, _), (big, _) = rows
    print(f"client peak RSS {big['n']:,} / {small['n']:,} points: {big['client_peak_rss_mb'] / small['client_peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
