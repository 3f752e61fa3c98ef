"""Polygon benchmark (issue 16): a point-in-polygon join, ``cluster.points_in_polygons`` against
``geopandas.sjoin(points, polygons, predicate="within")``, same points, same polygons, one run, ratio printed.

Workload: 10M planar points (70% around 200 "towns", Gaussian, over a 30% uniform background) in a 1,000 x 1,000
km square (metres); 1,000 "districts": the Voronoi cells of 1,000 random seeds clipped to the square, edges cut
every 5 km (about 30 vertices each), so every point lies in one district (or on a border). The answers are
compared pair by pair (point id, polygon row).

    python benchmarks/bench_polygons.py            # full: 10M points x 1,000 polygons
    python benchmarks/bench_polygons.py --quick    # 1M points x 200 polygons

Timed: geopandas.sjoin on a GeoDataFrame of the points already built (building it, shapely points from the
coordinates, is timed apart), and ours on a cluster the points were already distributed to (the distribute is timed
apart); ours runs ``--repeat`` times (the first call included), the median is the figure.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def town_points(n: int, seed: int, size: float = 1e6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, size, (200, 2))
    spread = rng.uniform(2e3, 30e3, 200)
    w = rng.pareto(1.2, 200) + 0.05
    w /= w.sum()
    n_c = int(0.7 * n)
    which = rng.choice(200, n_c, p=w)
    pts = np.vstack([centres[which] + rng.normal(size=(n_c, 2)) * spread[which, None],
                     rng.uniform(0, size, (n - n_c, 2))])
    return np.clip(pts, 0, size)[rng.permutation(n)]


def districts(k: int, seed: int, size: float = 1e6) -> np.ndarray:
    import shapely

    rng = np.random.default_rng(seed)
    frame = shapely.box(0, 0, size, size)
    cells = shapely.get_parts(shapely.voronoi_polygons(shapely.multipoints(rng.uniform(0, size, (k, 2))),
                                                       extend_to=frame))
    cells = shapely.intersection(cells, frame)
    return shapely.segmentize(cells, 5e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1M points x 200 polygons")
    ap.add_argument("--points", type=int, default=None)
    ap.add_argument("--polygons", type=int, default=None)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--predicate", default="within", choices=["within", "intersects"])
    args = ap.parse_args()
    n = args.points or (1_000_000 if args.quick else 10_000_000)
    k = args.polygons or (200 if args.quick else 1_000)

    import geopandas as gpd
    import shapely

    from distspatial import DistributedSpatialCluster, NodeConfig

    print(f"# points_in_polygons: {n:,} points x {k:,} polygons, predicate={args.predicate}; {os.cpu_count()} "
          f"CPUs, {platform.processor() or platform.machine()}; load average {os.getloadavg()[0]:.1f}")
    pts = town_points(n, 1)
    polys = districts(k, 2)
    print(f"polygons: {len(polys):,}, vertices per polygon {shapely.get_num_coordinates(polys).mean():.1f}")

    gpts, t_build = timed(lambda: gpd.GeoDataFrame(geometry=gpd.points_from_xy(pts[:, 0], pts[:, 1])))
    gpolys = gpd.GeoDataFrame(geometry=polys)
    joined, t_gpd = timed(gpd.sjoin, gpts, gpolys, predicate=args.predicate)
    ref = np.stack([joined.index.to_numpy(), joined["index_right"].to_numpy()], 1).astype(np.int64)
    ref = ref[np.lexsort((ref[:, 1], ref[:, 0]))]
    del joined, gpts
    print(f"geopandas: GeoDataFrame of the points {t_build:.2f} s (not counted), sjoin {t_gpd:.2f} s, "
          f"{len(ref):,} pairs")

    cfg = NodeConfig().with_node_count(args.nodes).replace(num_cpus=max(args.nodes, 2))
    with DistributedSpatialCluster(cfg) as cluster:
        _, t_dist = timed(cluster.distribute_data, pts)
        times = []
        for _ in range(max(1, args.repeat)):
            res, t = timed(cluster.points_in_polygons, gpolys, predicate=args.predicate)
            times.append(t)
        got = np.stack([res.id, res.polygon], 1)
        same = got.shape == ref.shape and np.array_equal(got, ref)
        counts, t_count = timed(cluster.points_in_polygons, gpolys, predicate=args.predicate, aggregate="count")
        same_counts = np.array_equal(counts, np.bincount(ref[:, 1], minlength=len(polys)))
    ours = float(np.median(times))
    print(f"distspatial ({args.nodes} nodes): distribute {t_dist:.2f} s (not counted); points_in_polygons "
          f"{', '.join(f'{t:.2f}' for t in times)} s (median {ours:.2f} s), aggregate='count' {t_count:.2f} s; "
          f"pairs equal to sjoin: {same}, counts equal: {same_counts}")
    print(f"ratio (geopandas.sjoin / ours): {t_gpd / ours:.2f}x ({n / ours / 1e6:.2f}M points/s vs "
          f"{n / t_gpd / 1e6:.2f}M points/s)")
    if not (same and same_counts):
        raise SystemExit("answers differ from geopandas.sjoin")


if __name__ == "__main__":
    main()
