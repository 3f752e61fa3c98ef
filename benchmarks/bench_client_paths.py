"""The client/controller split (issue #13): the query and ingest paths against the code before it, and attach time.

    python benchmarks/bench_client_paths.py --before /tmp/before    # /tmp/before: a checkout of the earlier commit
    python benchmarks/bench_client_paths.py --quick                 # small sizes, this code only

One run, same data, same machine: the measurements run in fresh processes on this checkout and (``--before DIR``)
on ``DIR/src``, alternating, ``--rounds`` times each; medians and their ratios are printed ("after / before"; the
goal is within 5%):

* batched kNN: 1,000,000 queries, k=10, over 4,000,000 skewed 2-D points, 2 nodes; and scipy's cKDTree
  (``workers=-1``) on the same queries, as the peer both runs are compared with;
* single-point kNN latency (k=10), 1,000 calls one after the other: p50 and p99;
* ingest: 20 batches of 100,000 points into a 2,000,000-point index, back to back (points per second);
* attach (this code only): a named cluster holding 10,000,000 points is created by one process, a second
  process attaches to it (``DistributedSpatialCluster.attach``) and answers one query: the attach call's time
  (goal < 2 s: metadata only, no data moved).

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(quick: bool, repeats: int) -> dict:
    """The three query/ingest measurements on whatever distspatial is importable (run in a fresh process)."""
    from scipy.spatial import cKDTree

    from distspatial import DistributedSpatialCluster, NodeConfig
    from distspatial.datasets import skewed_points

    n, m, n_base, batch, n_batches = ((400_000, 100_000, 200_000, 20_000, 10) if quick
                                      else (4_000_000, 1_000_000, 2_000_000, 100_000, 20))
    pts = skewed_points(n, 2, seed=1)
    q = skewed_points(m, 2, seed=1, sample_seed=2)
    out: dict = {}
    tree = cKDTree(pts)
    peer = min(_timed(tree.query, q, 10, workers=-1) for _ in range(repeats))
    out["peer_knn_qps"] = m / peer
    cfg = NodeConfig().with_node_count(2).replace(num_cpus=os.cpu_count())
    with DistributedSpatialCluster(cfg) as c:
        c.progress = False
        c.distribute_data(pts)
        c.distributed_knn_search(q[:1000], 10)  # warm-up
        best = min(_timed(c.distributed_knn_search, q, 10) for _ in range(repeats))
        out["knn_qps"] = m / best
        d, _ = c.distributed_knn_search(q[:2000], 10)
        assert np.allclose(d, tree.query(q[:2000], 10)[0]), "wrong kNN answers"
        lat = []
        for i in range(1000):
            t = time.perf_counter()
            c.distributed_knn_search(q[i], 10)
            lat.append(time.perf_counter() - t)
        out["single_p50_ms"] = 1e3 * float(np.percentile(lat, 50))
        out["single_p99_ms"] = 1e3 * float(np.percentile(lat, 99))
    batches = [skewed_points(batch, 2, seed=1, sample_seed=10 + b) for b in range(n_batches)]
    with DistributedSpatialCluster(cfg) as c:
        c.progress = False
        c.distribute_data(pts[:n_base])
        c.ingest(batches[0][:1000])  # warm-up (compiles the curve-run kernels on the nodes)
        t = time.perf_counter()
        for b in batches:
            c.ingest(b)
        out["ingest_pps"] = n_batches * batch / (time.perf_counter() - t)
    return out


def _timed(fn, *args, **kwargs) -> float:
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t


ATTACH = textwrap.dedent(
    """
    import json, sys, time, numpy as np
    from distspatial import DistributedSpatialCluster
    t = time.perf_counter()
    c = DistributedSpatialCluster.attach("bench-attach", sys.argv[1])
    t_attach = time.perf_counter() - t
    t = time.perf_counter()
    d, i = c.distributed_knn_search(np.array([0.5, 0.5]), 10)
    t_query = time.perf_counter() - t
    print(json.dumps({"attach_s": t_attach, "first_query_s": t_query, "points": c.n_points}))
    c.close()
    """
)


def measure_attach(quick: bool) -> dict:
    """Create a 10M-point named cluster on a `ray start --head` runtime, attach from a second process."""
    import shutil
    import signal
    import socket

    import ray

    from distspatial import DistributedSpatialCluster, NodeConfig
    from distspatial.datasets import skewed_points

    n = 1_000_000 if quick else 10_000_000
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    temp = tempfile.mkdtemp(prefix="dsbench", dir="/tmp")
    ray_exe = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen([ray_exe, "start", "--head", "--block", f"--port={port}", f"--num-cpus={os.cpu_count()}",
                             "--include-dashboard=false", f"--temp-dir={temp}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        for _ in range(90):
            if subprocess.run([ray_exe, "status", f"--address={address}"], capture_output=True, env=env).returncode == 0:
                break
            time.sleep(1)
        pts = skewed_points(n, 2, seed=1)
        c = DistributedSpatialCluster(NodeConfig().with_name("bench-attach").with_address(address).with_node_count(2))
        c.progress = False
        t = time.perf_counter()
        c.distribute_data(pts)
        t_dist = time.perf_counter() - t
        del pts
        c.close()
        ray.shutdown()
        out = subprocess.run([sys.executable, "-c", ATTACH, address], capture_output=True, text=True, env=env,
                             timeout=600)
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout.strip().splitlines()[-1])
        res["distribute_s"] = t_dist
        res["n"] = n
        ray.init(address=address, logging_level="ERROR")
        DistributedSpatialCluster.attach("bench-attach", address).shutdown()
        ray.shutdown()
        return res
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of the batched kNN (best is kept)")
    ap.add_argument("--before", metavar="DIR", help="a checkout of the code before the change, measured in the "
                                                    "same run")
    ap.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)  # the subprocess's mode
    ap.add_argument("--no-attach", action="store_true", help="skip the attach measurement")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per side, alternating; medians reported")
    args = ap.parse_args()
    if args.measure_only:
        print(json.dumps(measure(args.quick, args.repeats)))
        return
    sides = {"after": os.path.join(HERE, "..", "src")}
    if args.before:
        sides["before"] = os.path.join(args.before, "src")
    samples: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(args.rounds):  # alternate the sides (after, before / before, after, ...): drift hits both
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            samples[name].append(_run_in(sides[name], args))
    runs = {name: {key: float(np.median([x[key] for x in xs])) for key in xs[0]} for name, xs in samples.items()}
    print("# client paths: this code" + (" against the code before the change" if args.before else "") +
          f" (median of {args.rounds} alternating runs per side)")
    print()
    print("| measure | peer (cKDTree) | " + " | ".join(runs) + (" | after / before |" if args.before else " |"))
    print("|---|---|" + "---|" * len(runs) + ("---|" if args.before else ""))
    for key, label, better in [("knn_qps", "batched kNN, queries/s (1M q, k=10, 4M points, 2 nodes)", "higher"),
                               ("single_p50_ms", "single-point kNN p50, ms", "lower"),
                               ("single_p99_ms", "single-point kNN p99, ms", "lower"),
                               ("ingest_pps", "ingest, points/s (100K batches into 2M)", "higher")]:
        peer = f"{runs['after']['peer_knn_qps']:,.0f} q/s" if key == "knn_qps" else ""
        vals = " | ".join(f"{r[key]:,.2f}" if r[key] < 100 else f"{r[key]:,.0f}" for r in runs.values())
        ratio = f" | {runs['after'][key] / runs['before'][key]:.3f} ({better} is better)" if args.before else ""
        print(f"| {label} | {peer} | {vals}{ratio} |")
    for name, r in runs.items():
        print(f"\n{name}: batched kNN {r['knn_qps'] / r['peer_knn_qps']:.2f}x cKDTree(workers=-1) "
              f"({r['peer_knn_qps']:,.0f} q/s in that process)")
    if not args.no_attach:
        a = measure_attach(args.quick)
        print(f"\nattach to a running {a['n']:,}-point named cluster: {a['attach_s']:.3f} s (goal < 2 s); "
              f"first query after it {1e3 * a['first_query_s']:.1f} ms; distributing it took {a['distribute_s']:.1f} s")


def _run_in(src: str, args) -> dict:
    """Measure in a fresh process importing distspatial from ``src``."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
    cmd = [sys.executable, os.path.abspath(__file__), "--measure-only", "--repeats", str(args.repeats)]
    if args.quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"measurement in {src} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
