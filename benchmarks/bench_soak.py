"""A soak of the HTTP service (issue #15): a fixed request rate with ingest beside it, a node killed midway.

    python benchmarks/bench_soak.py                  # 1,000,000 points, 3 nodes, 2 replicas, 120 s
    python benchmarks/bench_soak.py --quick          # 200,000 points, 40 s

1. The service (``BackgroundServer`` in this process, as ``distspatial serve`` runs it: cluster and HTTP server in
   one process) serves ``--points`` uniform points in [0, 1]^2 on ``--nodes`` nodes with two replicas of every
   partition and heartbeats on.
2. Its maximum rate is measured: 16 keep-alive clients in a separate process (the load generator of
   ``bench_service.py``), single-point kNN (k=10), closed loop.
3. The soak: a separate process sends single-point kNN requests open-loop at **half that rate** for
   ``--duration`` seconds (each request has a scheduled start; its latency counts from then, so a stall is not
   hidden by requests not sent), and beside them ingests 500 new points every 50 ms through ``POST /ingest``
   (10,000 points/s, into [2, 3] x [0, 1]: never within reach of a query's 10 nearest neighbours, so every answer
   can be checked against a cKDTree over the base points). Every answer is checked.
4. Halfway, one node's process is killed (SIGKILL, no warning). The cluster detects it, serves its partitions
   from the replicas, re-replicates them and starts a replacement node; the times are taken from
   ``cluster.health()``.

Printed: requests, errors (non-200 answers and broken connections) and wrong answers, and p50/p99 latency before
the kill, from the kill until full redundancy is back, and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
K = 10


# -- the open-loop load generator (its own process) ---------------------------------------------------------------
async def _ticks(first: float, step: float, t_end: float):
    """Scheduled wall times ``first, first + step, ...`` before ``t_end``, each yielded once it has come (open
    loop: a late answer does not delay the next request's schedule)."""
    i = 0
    while (sched := first + i * step) < t_end:
        i += 1
        delay = sched - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        yield sched


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response with a Content-Length."""
    lines = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
    length = next(int(v) for n_, _, v in (ln.partition(b":") for ln in lines[1:])
                  if n_.strip().lower() == b"content-length")
    return int(lines[0].split()[1]), await reader.readexactly(length)


async def _soak_client(host: str, port: int, bodies: list[bytes], ref: np.ndarray, rate_each: float,
                       t_start: float, t_end: float, offset: float, out: list) -> None:
    """Requests at ``t_start + offset + i / rate_each`` on one keep-alive connection; records
    ``(scheduled wall time, latency from schedule, status, wrong)``."""
    head = (f"POST /knn HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n").encode()
    reader = writer = None
    rng = np.random.default_rng(int(offset * 1e6))
    async for sched in _ticks(t_start + offset, 1.0 / rate_each, t_end):
        j = int(rng.integers(len(bodies)))
        body = bodies[j]
        status, wrong = 0, False
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            status, payload = await _response(reader)
            if status == 200:
                got = json.loads(payload)
                d = np.asarray(got["distances"], dtype=float).reshape(-1)
                wrong = not np.allclose(d, ref[j], rtol=0, atol=1e-9)
        except (OSError, asyncio.IncompleteReadError, ValueError, StopIteration) as exc:
            status = -1
            if writer is not None:
                writer.close()
            reader = writer = None
            out.append((sched, time.time() - sched, status, False, f"{type(exc).__name__}: {exc}"[:200]))
            continue
        out.append((sched, time.time() - sched, status, wrong, "" if status == 200 else payload[:200].decode()))
    if writer is not None:
        writer.close()


async def _ingest_loop(host: str, port: int, t_start: float, t_end: float, out: list) -> None:
    rng = np.random.default_rng(99)
    reader, writer = await asyncio.open_connection(host, port)
    async for sched in _ticks(t_start, 0.05, t_end):
        pts = np.column_stack([rng.uniform(2, 3, 500), rng.random(500)])
        body = json.dumps({"points": pts.tolist()}).encode()
        try:
            writer.write(b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d"
                         b"\r\n\r\n" % len(body) + body)
            status, _ = await _response(reader)
        except (OSError, asyncio.IncompleteReadError, ValueError, StopIteration):
            status = -1
            writer.close()
            reader, writer = await asyncio.open_connection(host, port)
        out.append((sched, time.time() - sched, status))
    writer.close()


def generate(url: str, rate: float, duration_s: float, points_file: str, queries_file: str,
             connections: int) -> None:
    """The soak's load: prints ``started <wall time>`` when it begins, then one JSON line of records."""
    from scipy.spatial import cKDTree

    host, port = url.split("//")[1].split(":")
    q = np.load(queries_file)
    ref = cKDTree(np.load(points_file)).query(q, K)[0]
    bodies = [json.dumps({"points": p, "k": K}, separators=(",", ":")).encode() for p in q.tolist()]
    t_start = time.time() + 0.5
    t_end = t_start + duration_s
    print(f"started {t_start!r}", flush=True)
    records: list = []
    ingests: list = []

    async def run() -> None:
        each = rate / connections
        await asyncio.gather(_ingest_loop(host, int(port), t_start, t_end, ingests),
                             *(_soak_client(host, int(port), bodies, ref, each, t_start, t_end, c / rate, records)
                               for c in range(connections)))

    asyncio.run(run())
    print(json.dumps({"records": records, "ingests": ingests}), flush=True)


# -- the driver ---------------------------------------------------------------------------------------------------
def _window(recs: list, a: float, b: float) -> dict:
    sel = [r for r in recs if a <= r[0] < b]
    ok = np.array([r[1] for r in sel if r[2] == 200]) * 1e3
    return {"requests": len(sel), "errors": sum(r[2] != 200 for r in sel), "wrong": sum(bool(r[3]) for r in sel),
            "p50_ms": float(np.percentile(ok, 50)) if len(ok) else float("nan"),
            "p99_ms": float(np.percentile(ok, 99)) if len(ok) else float("nan"),
            "max_ms": float(ok.max()) if len(ok) else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200,000 points, 40 s")
    ap.add_argument("--points", type=int, default=None, help="base points (1,000,000; --quick 200,000)")
    ap.add_argument("--nodes", type=int, default=3, help="nodes (3; two replicas of every partition)")
    ap.add_argument("--duration", type=float, default=None, help="soak seconds (120; --quick 40)")
    ap.add_argument("--rate", type=float, default=None, help="requests/s (default: half the measured maximum)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    ap.add_argument("--generate", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        url, rate, dur, pf, qf, conns = args.generate
        generate(url, float(rate), float(dur), pf, qf, int(conns))
        return
    n = args.points or (200_000 if args.quick else 1_000_000)
    duration = args.duration or (40.0 if args.quick else 120.0)

    sys.path.insert(0, HERE)
    from bench_service import _drive  # the closed-loop load generator of the HTTP benchmark

    from distspatial import DistributedSpatialCluster, NodeConfig
    from distspatial.ui.service import BackgroundServer

    rng = np.random.default_rng(0)
    pts = rng.random((n, 2))
    q = rng.random((20_000, 2))
    cfg = (NodeConfig().with_node_count(args.nodes).with_fault_tolerance(True)
           .replace(num_cpus=os.cpu_count(), cpus_per_node=0.25))
    with tempfile.TemporaryDirectory() as tmp, DistributedSpatialCluster(cfg) as c:
        c.progress = False
        pf, qf = os.path.join(tmp, "points.npy"), os.path.join(tmp, "queries.npy")
        np.save(pf, pts)
        np.save(qf, q)
        c.distribute_data(pts)
        with BackgroundServer(c) as srv:
            rate = args.rate
            if rate is None:
                top = _drive(srv.url, 16, 6.0 if args.quick else 10.0, qf)
                rate = top["requests_per_s"] / 2
                print(f"# maximum: {top['requests_per_s']:,.0f} requests/s (16 clients, closed loop); soak at "
                      f"{rate:,.0f}/s", file=sys.stderr)
            gen = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--generate", srv.url, str(rate),
                                    str(duration), pf, qf, "32"], stdout=subprocess.PIPE, text=True)
            t_start = float(gen.stdout.readline().split()[1])
            victim = c.live_node_ids[-1]
            pid = c.node_info[victim]["pid"]
            events: dict[str, float] = {}

            def kill_and_watch() -> None:
                time.sleep(max(0.0, t_start + duration / 2 - time.time()))
                os.kill(pid, signal.SIGKILL)
                events["kill"] = time.time()
                while time.time() < t_start + duration:
                    h = c.health()
                    failed = set(h.get("failed_nodes", []))
                    if "detected" not in events and victim in failed:
                        events["detected"] = time.time()
                    if "detected" in events and not h.get("under_replicated") and \
                            len(c.live_node_ids) >= args.nodes and "redundant" not in events:
                        events["redundant"] = time.time()
                        break
                    time.sleep(0.25)

            watcher = threading.Thread(target=kill_and_watch, daemon=True)
            watcher.start()
            out = json.loads(gen.stdout.read().strip().splitlines()[-1])
            gen.wait()
            watcher.join(30)
        recs = out["records"]
        kill = events.get("kill", t_start + duration / 2)
        back = events.get("redundant", t_start + duration)
        windows = {"before the kill": _window(recs, t_start, kill),
                   "kill -> redundancy back": _window(recs, kill, back),
                   "after": _window(recs, back, t_start + duration + 1)}
        total = _window(recs, t_start, t_start + duration + 1)
        ing = out["ingests"]
        ing_ok = sum(s == 200 for _, _, s in ing)
    print(f"\nSoak: {n:,} points, {args.nodes} nodes x 2 replicas, single-point kNN k={K} at {rate:,.0f} requests/s "
          f"open loop for {duration:g} s, ingest 10,000 points/s beside it ({ing_ok} of {len(ing)} ingest calls "
          f"answered 200); node {victim} SIGKILLed at {kill - t_start:.1f} s, detected after "
          f"{events.get('detected', float('nan')) - kill:.1f} s, redundancy back after {back - kill:.1f} s\n")
    print("| window | requests | errors | wrong | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, w in {**windows, "whole soak": total}.items():
        print(f"| {name} | {w['requests']:,} | {w['errors']} | {w['wrong']} | {w['p50_ms']:.2f} | {w['p99_ms']:.2f} "
              f"| {w['max_ms']:.0f} |")
    err = [r[4] for r in recs if r[2] != 200][:5]
    if err:
        print("\nerrors, first ones:", err)
    print(f"\nerror rate {total['errors'] / max(1, total['requests']):.4%} (goal <= 0.1%), wrong answers "
          f"{total['wrong']} (goal 0)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rate": rate, "windows": windows, "total": total, "events": events}, f, indent=1)


if __name__ == "__main__":
    main()
