"""Geodata benchmark (issue 16): kNN on longitude/latitude points in great-circle metres, distspatial against
scikit-learn's ``BallTree(metric="haversine")``, same data, same queries, same k, one run, ratios.

Workload: 4M lon/lat points, 70% around 60 "cities" (Gaussian, 0.02-0.5 degrees, Pareto weights; some near the
poles and the antimeridian) over a 30% uniform background on the sphere; 1M queries from the same distribution;
k = 10. Our cluster answers in metres (EPSG:4326); BallTree's haversine distances are multiplied by the mean Earth
radius, and the first 2,000 answers are compared (distances to 1e-9 relative).

    python benchmarks/bench_geo.py            # full: 4M points, 1M queries
    python benchmarks/bench_geo.py --quick    # 400K points, 100K queries

BallTree.query is one call on one thread, as users run it; the run also times it on two threads (the query
batch cut in two halves, BallTree releases the GIL), since the machine has 2 cores. ``--peer-queries N`` times the
peers on the first N queries only (throughput is queries per second either way) when the full run is too long.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def lonlat_points(n: int, seed: int, cities_seed: int = 7) -> np.ndarray:
    """``(n, 2)`` lon/lat: 70% around 60 cities (fixed by ``cities_seed``), 30% uniform on the sphere."""
    crng = np.random.default_rng(cities_seed)
    n_city = 60
    clon = crng.uniform(-180, 180, n_city)
    clat = np.degrees(np.arcsin(crng.uniform(-0.95, 0.95, n_city)))
    clon[:3], clat[:3] = [179.9, -179.95, 20.0], [-17.7, 51.9, 89.6]  # Fiji, Aleutians, near the pole
    spread = crng.uniform(0.02, 0.5, n_city)
    w = crng.pareto(1.2, n_city) + 0.05
    w /= w.sum()
    rng = np.random.default_rng(seed)
    n_c = int(0.7 * n)
    which = rng.choice(n_city, n_c, p=w)
    lon = clon[which] + rng.normal(0, 1, n_c) * spread[which] / np.maximum(np.cos(np.radians(clat[which])), 0.05)
    lat = np.clip(clat[which] + rng.normal(0, 1, n_c) * spread[which], -90, 90)
    v = rng.normal(size=(n - n_c, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ulon, ulat = np.degrees(np.arctan2(v[:, 1], v[:, 0])), np.degrees(np.arcsin(v[:, 2]))
    out = np.column_stack([np.concatenate([lon, ulon]), np.concatenate([lat, ulat])])
    out[:, 0] = np.mod(out[:, 0] + 180.0, 360.0) - 180.0
    return out[rng.permutation(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run (400K points, 100K queries)")
    ap.add_argument("--nodes", default="2", help="node counts to run (default 2)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats of our kNN batch (best is kept)")
    ap.add_argument("--peer-queries", type=int, default=None,
                    help="time BallTree on the first N queries only (default: all of them)")
    args = ap.parse_args()

    import ray
    from sklearn.neighbors import BallTree

    from distspatial import DistributedSpatialCluster, NodeConfig
    from distspatial.core.geo import EARTH_RADIUS_M

    n_index, n_query = (400_000, 100_000) if args.quick else (4_000_000, 1_000_000)
    k = 10
    n_peer = min(n_query, args.peer_queries or n_query)
    print(f"# distspatial geodata kNN benchmark ({'quick' if args.quick else 'full'})")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"numpy {np.__version__}")
    pts = lonlat_points(n_index, seed=1)
    queries = lonlat_points(n_query, seed=2)

    def rad(a):
        return np.radians(a[:, ::-1])  # [lat, lon]

    tree, t_build = timed(BallTree, rad(pts), metric="haversine")
    (ref_d, _), t_peer1 = timed(tree.query, rad(queries[:n_peer]), k)
    ref_d = ref_d * EARTH_RADIUS_M

    def halves(q):
        parts = np.array_split(rad(q), 2)
        with ThreadPoolExecutor(2) as ex:
            return list(ex.map(lambda p: tree.query(p, k), parts))

    _, t_peer2 = timed(halves, queries[:n_peer])
    peer1_qps, peer2_qps = n_peer / t_peer1, n_peer / t_peer2
    print(f"BallTree(haversine): build {t_build:.1f} s, {n_peer:,} queries: 1 thread {t_peer1:.1f} s "
          f"({peer1_qps:,.0f} q/s), 2 threads {t_peer2:.1f} s ({peer2_qps:,.0f} q/s)", flush=True)

    # context, not the peer: scipy's cKDTree on the same 3-D unit vectors we store (all cores)
    from scipy.spatial import cKDTree

    from distspatial.core.geo import lonlat_to_unit

    kd, t_kd_build = timed(cKDTree, lonlat_to_unit(pts))
    q3 = lonlat_to_unit(queries)
    _, t_kd = timed(kd.query, q3, k, workers=-1)
    kd_qps = n_query / t_kd
    del kd, q3
    print(f"cKDTree on unit vectors: build {t_kd_build:.1f} s, {n_query:,} queries {t_kd:.2f} s ({kd_qps:,.0f} q/s, "
          f"workers=-1)", flush=True)

    rows = []
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    try:
        for nodes in [int(x) for x in args.nodes.split(",")]:
            with DistributedSpatialCluster(NodeConfig().with_node_count(nodes).with_crs("EPSG:4326")) as cluster:
                cluster.progress = False
                _, t_dist = timed(cluster.distribute_data, pts)
                best = np.inf
                for _ in range(args.repeats):
                    (d, _ids), t = timed(cluster.distributed_knn_search, queries, k)
                    best = min(best, t)
                m = min(2000, n_peer)
                exact = bool(np.allclose(d[:m], ref_d[:m], rtol=1e-9, atol=1e-6))
                rows.append((nodes, t_dist, best, exact))
                print(f"nodes {nodes}: distribute {t_dist:.1f} s, {n_query:,} queries best {best:.2f} s "
                      f"({n_query / best:,.0f} q/s), metres equal BallTree's: {exact}", flush=True)
    finally:
        ray.shutdown()

    print()
    print(f"data: {n_index:,} lon/lat points (70% around 60 cities, 30% uniform on the sphere); {n_query:,} kNN "
          f"queries (k={k}) from the same distribution; distances great-circle metres (R = {EARTH_RADIUS_M} m)")
    print()
    print("| measure | peer | peer throughput | nodes | distspatial throughput | ratio (vs 1 thread / 2 threads) |")
    print("|---|---|---|---|---|---|")
    for nodes, t_dist, best, exact in rows:
        ours = n_query / best
        print(f"| kNN k={k}, {n_query:,} queries | BallTree haversine ({n_peer:,} q) | {peer1_qps:,.0f} q/s "
              f"(2 threads: {peer2_qps:,.0f} q/s) | {nodes} | {ours:,.0f} q/s | **{ours / peer1_qps:.1f}x** / "
              f"**{ours / peer2_qps:.1f}x**{'' if exact else ' (MISMATCH)'} |")
        print(f"| (distribute / build {n_index:,} points) | BallTree build | {t_build:.1f} s | {nodes} | "
              f"{t_dist:.1f} s | {t_dist / t_build:.2f}x time |")
        print(f"| (context) kNN k={k}, same queries | scipy cKDTree on the 3-D unit vectors, workers=-1 | "
              f"{kd_qps:,.0f} q/s | {nodes} | {ours:,.0f} q/s | {ours / kd_qps:.2f}x |")


if __name__ == "__main__":
    main()
