"""Online queries (issue #15): the HTTP service against a plain FastAPI + cKDTree app, measured in one run.

    python benchmarks/bench_service.py --http                  # 144,000 points, 16 and 64 clients, 10 s each
    python benchmarks/bench_service.py --http --points 4000000 --nodes 2
    python benchmarks/bench_service.py --http --quick          # 3 s per measurement
    python benchmarks/bench_service.py --http --nodes 2 --replicated   # adds --replication 2 (every node: all)
    python benchmarks/bench_service.py --api                   # Python API latency, 4,000,000 points, 2 nodes

Sections (one function each; with no section flag every section runs):

* ``--api`` (:func:`section_api`): single-point kNN (k=10) through the Python API on the embedded runtime, 2
  nodes, ``--api-points`` uniform points, calls one after the other: p50/p99, next to a trivial Ray actor call
  (the floor of any path with one hop) and the same query on one cKDTree.

* ``--http`` (:func:`section_http`): ``distspatial serve`` (a subprocess: embedded Ray runtime, ``--nodes``
  nodes; ``--uncoalesced`` adds a row with ``--no-coalesce``, ``--replicated`` one with ``--replication``
  ``--nodes``) over ``--points`` uniform 2-D points, and the peer: a plain FastAPI app around one scipy cKDTree
  (pydantic request model, ``async def`` handler, ``tree.query`` per request), served by uvicorn with the same
  settings in its own process. A separate load-generator process (asyncio, raw keep-alive sockets, one
  coroutine per client: the same generator for both) sends single-point kNN requests (k=10, JSON) for
  ``--duration`` seconds with 16 and with 64 concurrent clients and reports requests/s, p50, p99 and errors
  (non-200 answers, broken connections). The peer is measured first and stopped before our service starts, so
  neither competes with the other; the load generator shares the machine's cores with the server it drives.
  A sample of the answers of both is checked against a cKDTree built here.

Prints a Markdown table (and ``--json PATH`` writes the figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
K = 10


# -- the peer: a plain FastAPI app around one cKDTree -------------------------------------------------------------
def peer_app(points_file: str):
    """What one would write without distspatial: load the points, build a cKDTree, answer /knn."""
    from fastapi import FastAPI
    from pydantic import BaseModel
    from scipy.spatial import cKDTree

    tree = cKDTree(np.load(points_file))
    app = FastAPI()

    class KnnRequest(BaseModel):
        points: list[float] | list[list[float]]
        k: int

    async def knn(req: KnnRequest) -> dict:
        d, i = tree.query(np.asarray(req.points, dtype=np.float64), req.k)
        return {"distances": d.tolist(), "ids": i.tolist()}

    knn.__annotations__["req"] = KnnRequest  # a local class: give FastAPI the type itself, not its name
    app.post("/knn")(knn)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "points": int(tree.n)}

    return app


def serve_peer(points_file: str) -> None:
    """The peer's process: uvicorn on a free port (printed as ``serving on URL``) until SIGTERM."""
    import uvicorn

    sys.path.insert(0, os.path.join(HERE, "..", "src"))
    from distspatial.ui.service import listen

    app = peer_app(points_file)
    sock = listen("127.0.0.1", 0)
    print(f"serving on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    server.run(sockets=[sock])


# -- the load generator (a separate process) ----------------------------------------------------------------------
async def _client(host: str, port: int, bodies: list[bytes], stop_at: float, lat: list[float], errors: list[str],
                  samples: list[tuple[int, bytes]], n_samples: int, seed: int) -> None:
    rng = random.Random(seed)
    reader = writer = None
    head = (f"POST /knn HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: application/json\r\n").encode()
    while time.perf_counter() < stop_at:
        j = rng.randrange(len(bodies))
        body = bodies[j]
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            t0 = time.perf_counter()
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            status_line_and_headers = await reader.readuntil(b"\r\n\r\n")
            lines = status_line_and_headers.split(b"\r\n")
            status = int(lines[0].split()[1])
            length, close = 0, False
            for ln in lines[1:]:
                name, _, value = ln.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            payload = await reader.readexactly(length)
            dt = time.perf_counter() - t0
            if status == 200:
                lat.append(dt)
                if len(samples) < n_samples:
                    samples.append((j, payload))
            else:
                errors.append(f"{status}: {payload[:120]!r}")
            if close:
                writer.close()
                reader = writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


def load(url: str, clients: int, duration_s: float, queries_file: str, warmup_s: float = 1.0) -> dict:
    """``clients`` keep-alive connections sending single-point kNN requests for ``duration_s`` seconds (after
    ``warmup_s`` seconds not counted); requests/s, p50/p99 (ms), errors and a sample of answers."""
    host, port = url.split("//")[1].split(":")
    port = int(port)
    q = np.load(queries_file)
    bodies = [json.dumps({"points": p, "k": K}, separators=(",", ":")).encode() for p in q.tolist()]

    async def run(seconds: float, lat: list, errors: list, samples: list, n_samples: int) -> None:
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(_client(host, port, bodies, stop_at, lat, errors, samples, n_samples, seed=c)
                               for c in range(clients)))

    if warmup_s > 0:
        asyncio.run(run(warmup_s, [], [], [], 0))
    lat: list[float] = []
    errors: list[str] = []
    samples: list[tuple[int, bytes]] = []
    t0 = time.perf_counter()
    asyncio.run(run(duration_s, lat, errors, samples, 200))
    elapsed = time.perf_counter() - t0
    a = np.sort(np.asarray(lat)) * 1e3 if lat else np.array([np.nan])
    return {
        "clients": clients, "seconds": elapsed, "requests": len(lat), "requests_per_s": len(lat) / elapsed,
        "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a[-1]),
        "errors": len(errors), "error_examples": sorted(set(errors))[:5],
        "samples": [(j, p.decode()) for j, p in samples],
    }


# -- helpers ------------------------------------------------------------------------------------------------------
class _Server:
    """A server subprocess; :attr:`url` once it printed ``serving on URL``."""

    def __init__(self, cmd: list[str], timeout_s: float = 600.0) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.lines: list[str] = []
        deadline = time.monotonic() + timeout_s
        self.url = None
        while self.url is None:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited ({self.proc.poll()}):\n{''.join(self.lines)}")
            self.lines.append(line)
            if "serving on " in line:
                self.url = line.split("serving on ")[1].split()[0]
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start:\n" + "".join(self.lines))
        # keep draining its output so it never blocks on a full pipe
        import threading

        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True).start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _drive(url: str, clients: int, duration_s: float, queries_file: str) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--load", url, "--clients", str(clients),
                          "--duration", str(duration_s), "--queries-file", queries_file],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check(samples: list, q: np.ndarray, tree) -> int:
    """Wrong answers among the sampled ones (ids must equal cKDTree's up to ties, distances to 1e-12)."""
    wrong = 0
    for j, payload in samples:
        body = json.loads(payload)
        d, i = tree.query(q[j], K)
        got_d = np.asarray(body["distances"], dtype=float).reshape(-1)
        got_i = np.asarray(body["ids"]).reshape(-1)
        same_d = np.allclose(got_d, d, rtol=0, atol=1e-12)
        wrong += not (same_d and np.array_equal(np.sort(got_i[got_d < d[-1]]), np.sort(i[d < d[-1]])))
    return wrong


# -- sections -----------------------------------------------------------------------------------------------------
def section_http(args: argparse.Namespace) -> list[dict]:
    """Ours (``distspatial serve``) and the peer (FastAPI + cKDTree), single-point kNN k=10 over HTTP."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(0)
    pts = rng.random((args.points, 2))
    q = rng.random((10_000, 2))
    tree = cKDTree(pts)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pf, qf = os.path.join(tmp, "points.npy"), os.path.join(tmp, "queries.npy")
        np.save(pf, pts)
        np.save(qf, q)
        servers = {
            "peer (FastAPI + cKDTree)": [sys.executable, os.path.abspath(__file__), "--serve-peer", pf],
            "distspatial serve": [sys.executable, "-m", "distspatial.ui.cli", "serve", pf, "--port", "0",
                                  "--nodes", str(args.nodes), "--no-progress", *args.serve_args.split()],
        }
        if args.uncoalesced:
            servers["distspatial serve --no-coalesce"] = servers["distspatial serve"] + ["--no-coalesce"]
        if args.replicated:
            servers[f"distspatial serve --replication {args.nodes}"] = servers["distspatial serve"] + [
                "--replication", str(args.nodes)]
        if args.low_latency:
            servers["distspatial serve --low-latency"] = servers["distspatial serve"] + ["--low-latency"]
        if args.on_nodes:
            servers[f"distspatial serve --on-nodes --replication {args.nodes}"] = servers["distspatial serve"] + [
                "--on-nodes", "--replication", str(args.nodes)]

        def measure(srv: _Server, name: str, clients: int, rnd: int) -> dict:
            r = _drive(srv.url, clients, args.duration, qf)
            r["wrong"] = _check(r.pop("samples"), q, tree)
            r["server"], r["round"] = name, rnd
            rows.append(r)
            print(f"#   {name}, {clients} clients, round {rnd}: {r['requests_per_s']:,.0f} requests/s, p50 "
                  f"{r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, errors {r['errors']} "
                  f"{r['error_examples'][:2]}, wrong {r['wrong']}", file=sys.stderr)
            return r

        # The peer stays up (idle while ours is measured) and is measured again right before each of our rows:
        # this VM's speed moves by up to 2x between minutes, so only rows measured side by side compare.
        peer_name = next(iter(servers))
        peer = _Server(servers.pop(peer_name))
        pairs = []
        try:
            for name, cmd in servers.items():
                t0 = time.perf_counter()
                srv = _Server(cmd)
                print(f"# {name}: up in {time.perf_counter() - t0:.1f} s at {srv.url}", file=sys.stderr)
                try:
                    for clients in args.clients:
                        for rnd in range(args.rounds):
                            a = measure(peer, peer_name, clients, rnd)
                            b = measure(srv, name, clients, rnd)
                            pairs.append((name, clients, a, b))
                finally:
                    srv.stop()
        finally:
            peer.stop()
    print(f"\nHTTP, single-point kNN (k={K}, JSON), {args.points:,} uniform 2-D points, {args.nodes} nodes, "
          f"{args.duration:g} s per row, load generator in its own process on the same {os.cpu_count()} cores; "
          f"the peer measured right before each of our rows ({args.rounds} round(s) each)\n")
    print("| server | clients | round | requests/s | p50 ms | p99 ms | errors | wrong answers (of sample) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['clients']} | {r['round']} | {r['requests_per_s']:,.0f} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r['errors']} | {r['wrong']} |")
    print()
    for name in servers:
        for clients in args.clients:
            got = [(a, b) for n, c, a, b in pairs if n == name and c == clients]
            ratios = [b["requests_per_s"] / max(1e-9, a["requests_per_s"]) for a, b in got]
            for _, b in got:
                b["ratio_to_peer"] = b["requests_per_s"] / max(1e-9, got[0][0]["requests_per_s"])
            print(f"{name} / peer at {clients} clients: **{float(np.median(ratios)):.2f}x** requests/s (median of "
                  f"{len(ratios)} side-by-side pairs: {', '.join(f'{x:.2f}' for x in ratios)}; p99 "
                  f"{float(np.median([b['p99_ms'] for _, b in got])):.1f} vs "
                  f"{float(np.median([a['p99_ms'] for a, _ in got])):.1f} ms)")
    return rows


def section_api(args: argparse.Namespace) -> list[dict]:
    """Python API, single-point kNN (k=10) on the embedded runtime, 2 nodes: p50/p99 of calls one after the
    other, next to the same call to one cKDTree and to a trivial Ray actor call (the floor of any one-hop path)."""
    import ray
    from scipy.spatial import cKDTree

    from distspatial import DistributedSpatialCluster, NodeConfig

    n = args.api_points
    rng = np.random.default_rng(0)
    pts = rng.random((n, 2))
    q = rng.random((20_000, 2))
    calls = 2_000 if args.quick else 10_000
    tree = cKDTree(pts)

    def timed(fn) -> np.ndarray:
        lat = np.empty(calls)
        for i in range(calls):
            t = time.perf_counter()
            fn(q[i])
            lat[i] = time.perf_counter() - t
        return lat * 1e3

    cfg = NodeConfig().with_node_count(2).replace(num_cpus=os.cpu_count())
    rows = []
    with DistributedSpatialCluster(cfg) as c:
        c.progress = False
        c.distribute_data(pts)

        @ray.remote(num_cpus=0)
        class Echo:
            def echo(self, x):
                return x

        echo = Echo.remote()
        for i in range(500):  # warm-up: kernels loaded, routing cached on client and nodes
            c.distributed_knn_search(q[i], 10)
            ray.get(echo.echo.remote(q[i].tobytes()))
        d, _ = c.distributed_knn_search(q[:2000], 10)
        assert np.allclose(d, tree.query(q[:2000], 10)[0]), "wrong kNN answers"
        ours = timed(lambda x: c.distributed_knn_search(x, 10))
        wrong = sum(not np.allclose(c.distributed_knn_search(x, 10)[0], tree.query(x, 10)[0]) for x in q[:300])
        floor = timed(lambda x: ray.get(echo.echo.remote(x.tobytes())))  # the cheapest message: bytes
        one_hop = c._one_hop.calls
        c.set_low_latency(True)  # compiled-graph channels: a core per node while open
        for i in range(300):
            c.distributed_knn_search(q[i], 10)
        low = timed(lambda x: c.distributed_knn_search(x, 10))
        wrong += sum(not np.allclose(c.distributed_knn_search(x, 10)[0], tree.query(x, 10)[0]) for x in q[:300])
        channels = c._one_hop.open_channels
        c.set_low_latency(False)
    peer = timed(lambda x: tree.query(x, 10))
    for name, lat in (("distspatial single-point kNN", ours),
                      (f"same, set_low_latency(True) (compiled graphs to nodes {channels})", low),
                      ("trivial Ray actor call, 16 bytes (floor)", floor),
                      ("one cKDTree, same query", peer)):
        rows.append({"what": name, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))})
    print(f"\nPython API, single-point kNN k=10, {n:,} points, 2 nodes, {calls:,} calls one after the other "
          f"({one_hop:,} took the one-hop path; {wrong} of 600 checked answers wrong)")
    print("| call | p50 ms | p99 ms |\n|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--http", action="store_true", help="the HTTP section: ours against FastAPI + cKDTree")
    ap.add_argument("--quick", action="store_true", help="short measurements (3 s each)")
    ap.add_argument("--points", type=int, default=144_000, help="points in the index (144,000)")
    ap.add_argument("--nodes", type=int, default=4, help="nodes of our cluster (4, as distspatial serve)")
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64],
                    help="concurrent clients, comma-separated (16,64)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per measurement (10; --quick: 3)")
    ap.add_argument("--serve-args", default="", help="extra options of distspatial serve, e.g. '--batch-wait-ms 2'")
    ap.add_argument("--uncoalesced", action="store_true", help="also measure our service with --no-coalesce")
    ap.add_argument("--on-nodes", action="store_true",
                    help="also measure our service with --on-nodes --replication = --nodes (served from the nodes)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="peer/ours pairs per server and client count (the peer is measured before each of ours)")
    ap.add_argument("--low-latency", action="store_true",
                    help="also measure our service with --low-latency (compiled graphs: a core per node)")
    ap.add_argument("--replicated", action="store_true",
                    help="also measure our service with --replication = --nodes (every node holds every partition)")
    ap.add_argument("--api", action="store_true", help="the Python API section: single-point kNN latency")
    ap.add_argument("--api-points", type=int, default=4_000_000, help="points of the --api section (4,000,000)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    # the subprocesses' modes
    ap.add_argument("--serve-peer", metavar="POINTS_NPY", help=argparse.SUPPRESS)
    ap.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--queries-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.serve_peer:
        serve_peer(args.serve_peer)
        return
    if args.load:
        r = load(args.load, args.clients[0], args.duration, args.queries_file)
        print(json.dumps(r))
        return
    sections = {"api": section_api, "http": section_http}
    chosen = [name for name in sections if getattr(args, name)] or list(sections)
    results = {name: sections[name](args) for name in chosen}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
