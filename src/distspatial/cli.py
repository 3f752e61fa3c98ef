"""Command line: ``distspatial demo`` (more commands arrive with the user-facing issue)."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

__all__ = ["main", "run_demo"]


def _brute_knn(points: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The k smallest distances of each query by brute force (numpy), a few queries at a time."""
    out = np.empty((len(queries), k))
    step = max(1, 2_000_000 // max(1, len(points)))
    for a in range(0, len(queries), step):
        q = queries[a : a + step]
        d2 = ((points[None, :, :] - q[:, None, :]) ** 2).sum(axis=2)
        part = np.partition(d2, k - 1, axis=1)[:, :k]
        out[a : a + step] = np.sqrt(np.sort(part, axis=1))
    return out


def run_demo(
    n_points: int = 1_000_000,
    nodes: int = 4,
    n_queries: int = 100_000,
    k: int = 10,
    clusters: int = 8,
    curve: str = "hilbert",
    address: str | None = None,
    checks: int = 200,
    seed: int = 0,
    out=sys.stdout,
) -> bool:
    """Generate skewed points, distribute, run k-means and batched kNN, check against brute force; report."""
    from . import DistributedSpatialCluster, NodeConfig
    from .datasets import skewed_points

    def say(msg: str) -> None:
        print(msg, file=out, flush=True)

    t0 = time.perf_counter()
    pts = skewed_points(n_points, 2, seed=seed)
    queries = skewed_points(n_queries, 2, seed=seed, sample_seed=seed + 1)
    say(f"generated {n_points:,} skewed 2-D points and {n_queries:,} queries in {time.perf_counter() - t0:.2f} s")
    cfg = NodeConfig().with_node_count(nodes).with_curve(curve).with_address(address)
    ok = True
    with DistributedSpatialCluster(cfg) as cluster:
        say(f"started {cluster!r}")
        t = time.perf_counter()
        cluster.distribute_data(pts)
        say(f"distribute_data: {time.perf_counter() - t:.2f} s -> {cluster!r}")

        t = time.perf_counter()
        res = cluster.distributed_kmeans(clusters, 50, seed=seed)
        say(f"distributed_kmeans(k={clusters}): {res.n_iter} iterations in {time.perf_counter() - t:.2f} s "
            f"(init {res.init_seconds:.2f} s), inertia {res.inertia:.6g}")
        ref_inertia = float(((pts - res.centroids[res.labels]) ** 2).sum())
        if not np.isclose(ref_inertia, res.inertia, rtol=1e-6):
            ok = False
            say(f"  MISMATCH: inertia recomputed from labels is {ref_inertia:.6g}")

        t = time.perf_counter()
        dist, ids = cluster.distributed_knn_search(queries, k)
        dt = time.perf_counter() - t
        say(f"batched kNN: {n_queries:,} queries, k={k}, in {dt:.2f} s ({n_queries / dt:,.0f} queries/s)")
        rng = np.random.default_rng(seed)
        sample = rng.choice(n_queries, size=min(checks, n_queries), replace=False)
        ref = _brute_knn(pts, queries[sample], k)
        exact_d = np.allclose(dist[sample], ref, rtol=0, atol=1e-12)
        own = np.sqrt(((pts[ids[sample]] - queries[sample][:, None, :]) ** 2).sum(axis=2))
        exact_i = np.allclose(own, dist[sample], rtol=0, atol=1e-12)
        say(f"  checked {len(sample)} queries against brute force: distances {'exact' if exact_d else 'WRONG'}, "
            f"ids {'consistent' if exact_i else 'WRONG'}")
        ok &= exact_d and exact_i

        d1, i1 = cluster.distributed_knn_search(queries[0], k)
        single_ok = bool(np.allclose(d1, _brute_knn(pts, queries[:1], k)[0], rtol=0, atol=1e-12))
        say(f"single-point kNN: {'exact' if single_ok else 'WRONG'}")
        ok &= single_ok
        r = float(np.median(dist[:, -1]))
        t = time.perf_counter()
        got = cluster.range_search(queries[:100], r)
        dt = time.perf_counter() - t
        want = [np.flatnonzero(((pts - q) ** 2).sum(axis=1) <= r * r) for q in queries[:100]]
        range_ok = all(np.array_equal(g, w) for g, w in zip(got, want))
        say(f"range_search: 100 balls of radius {r:.4g} in {dt * 1e3:.1f} ms, "
            f"{sum(len(g) for g in got):,} hits, {'exact' if range_ok else 'WRONG'}")
        ok &= range_ok
        say("")
        say(str(cluster.statistics()))
    say("")
    say(f"demo {'PASSED' if ok else 'FAILED'}: every checked answer {'equals' if ok else 'does NOT equal'} "
        f"the brute-force reference; total {time.perf_counter() - t0:.1f} s")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distspatial", description="Distributed spatial index on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="distribute a skewed 1M-point set, run k-means and kNN, check and report")
    demo.add_argument("--points", type=int, default=1_000_000, help="points to generate (default 1,000,000)")
    demo.add_argument("--nodes", type=int, default=4, help="logical nodes (default 4)")
    demo.add_argument("--queries", type=int, default=100_000, help="batched kNN queries (default 100,000)")
    demo.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    demo.add_argument("--clusters", type=int, default=8, help="k-means clusters (default 8)")
    demo.add_argument("--curve", choices=["hilbert", "morton"], default="hilbert")
    demo.add_argument("--address", default=None, help="join an existing Ray cluster ('auto', 'ray://host:port')")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.points < 1 or args.queries < 1 or args.k < 1 or args.k > args.points or args.clusters < 1:
            parser.error("--points, --queries, -k and --clusters must be >= 1 and -k <= --points")
        ok = run_demo(args.points, args.nodes, args.queries, args.k, args.clusters, args.curve, args.address,
                      seed=args.seed)
        return 0 if ok else 1
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
