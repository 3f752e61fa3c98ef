"""Memory held per point once loaded (issue #14): how much the machine's used memory grows across
``distribute_data`` (the input array allocated before), 2-D, one replica, 2 nodes on the embedded runtime; next to
it, the same for one scipy cKDTree over the same points with its ids (the single-machine peer).

    .venv/bin/python benchmarks/bench_memory.py            # 1M, 10M, 40M points
    .venv/bin/python benchmarks/bench_memory.py --sizes 1000000

Each size runs in a fresh process, ``--repeat`` times (the median is shown). "Used" is ``total - available``
(psutil): it counts the nodes' memory, the client's, and Ray's shared-memory object store pages still held. Next
to it, from ``/proc/meminfo``: the growth of anonymous memory (every process's heap) plus shared memory (the
object store's pages): what the processes hold. And "used" less the free pages on the kernel's per-CPU lists
(``/proc/zoneinfo`` pagesets' counts): on this VM's kernel (6.18) those lists grow to ~110 MB per CPU after heavy
allocation and count as used, which made "used" move by ~10 B per point at 10M between runs of the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

CHILD = r"""
import gc, json, os, sys, time
import numpy as np, psutil
n = int(sys.argv[1]); which = sys.argv[2]
def used():
    vm = psutil.virtual_memory()
    mi = {}
    for line in open("/proc/meminfo"):
        k, v = line.split(":")
        mi[k] = int(v.split()[0]) * 1024
    # free pages the kernel keeps on its per-CPU lists are in neither MemFree nor MemAvailable (kernel 6.x tunes
    # those lists up to ~110 MB per CPU here): "used" less them
    pcp = sum(int(line.split()[1]) for line in open("/proc/zoneinfo") if line.strip().startswith("count:")) * 4096
    used = vm.total - vm.available
    return np.array([used, used - pcp, mi["AnonPages"] + mi["Shmem"], mi["Shmem"]])
rng = np.random.default_rng(0)
pts = rng.random((n, 2))
if which == "ckdtree":
    from scipy.spatial import cKDTree
    gc.collect(); u0 = used()
    tree = cKDTree(pts)
    ids = np.arange(n, dtype=np.int64)
    gc.collect(); time.sleep(1.0); u1 = used()
else:
    from distspatial import DistributedSpatialCluster, NodeConfig
    c = DistributedSpatialCluster(NodeConfig().with_node_count(2).replace(num_cpus=os.cpu_count()))
    c.progress = False
    c.distributed_knn_search  # noqa
    gc.collect(); time.sleep(1.0); u0 = used()
    c.distribute_data(pts)
    gc.collect()
    time.sleep(3.0)  # background frees (object store, the nodes' first copies) settle
    u1 = used()
    c.shutdown()
print(json.dumps({"n": n, "which": which, "bytes_per_point": ((u1 - u0) / n).tolist()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 40_000_000])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print("| points | distspatial: used | used less per-CPU free lists | anon + shared | of it object store "
          "| cKDTree + ids: used | less per-CPU lists | anon + shared |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        res = {}
        for which in ("distspatial", "ckdtree"):
            runs = []
            for _ in range(args.repeat):
                out = subprocess.run([sys.executable, "-c", CHILD, str(n), which], capture_output=True, text=True,
                                     timeout=1800, env=dict(os.environ, RAY_AUTH_MODE="disabled"))
                if out.returncode:
                    sys.exit(out.stderr[-3000:])
                runs.append(json.loads(out.stdout.strip().splitlines()[-1])["bytes_per_point"])
            res[which] = np.median(np.array(runs), axis=0)
        ds, ck = res["distspatial"], res["ckdtree"]
        print(f"| {n:,} | {ds[0]:.0f} B | {ds[1]:.0f} B | {ds[2]:.0f} B | {ds[3]:.1f} B | {ck[0]:.0f} B | {ck[1]:.0f} B "
              f"| {ck[2]:.0f} B |", flush=True)


if __name__ == "__main__":
    main()
