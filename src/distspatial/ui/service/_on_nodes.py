"""The HTTP service hosted by every node (``distspatial serve --on-nodes``).

Each node's process runs the same app (:func:`~distspatial.ui.service._app.create_app`) on the same port: the
sockets are opened with ``SO_REUSEPORT``, so the kernel spreads new connections over the nodes of a machine. The
app's client lives in the node's process (:meth:`~distspatial.cluster.DistributedSpatialCluster.host_on_nodes`),
so a gathered batch whose home partitions that node holds is answered there, without a Ray call; others go one
hop to the node holding them, as from any client. With ``--replication`` equal to the node count every node
holds every partition and no request leaves the process that parsed it. A node that dies takes its listener with it; connections then go to
the others, and the supervisor (the ``serve`` command) hosts the service again on the node that replaces it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ._server import BackgroundServer

__all__ = ["serve_here", "run_on_nodes"]

log = logging.getLogger("distspatial.service")


def serve_here(cluster: Any, host: str, port: int, app_options: dict[str, Any]) -> None:
    """Serve ``cluster`` (a client inside a node's process) on ``host:port`` with ``SO_REUSEPORT`` until the
    process ends (the node's hosted-service thread)."""
    BackgroundServer(cluster, host, port, reuse_port=True, insecure_no_auth=True, **app_options).start()
    threading.Event().wait()


def run_on_nodes(cluster: Any, host: str, port: int, *, on_ready: Any = None, poll_s: float = 1.0,
                 ready_timeout_s: float = 120.0, **app_options: Any) -> None:
    """Serve ``cluster`` from every node on ``host:port`` (``port`` must be a real port: every node binds it)
    until SIGINT or SIGTERM, hosting the service again every ``poll_s`` seconds on nodes that lack it (a node
    restarted or added). Batches run on each node's event loop (``inline_batches``) when every node holds every
    partition, in worker threads otherwise. ``on_ready(url)`` once the port answers."""
    import signal
    import urllib.request

    if not 0 < port < 65536:
        raise ValueError(f"serving on the nodes needs a port number every node can bind, got {port}")
    full = cluster.config.replication_factor >= len(cluster.node_ids)
    app_options = {"inline_batches": full, **app_options}
    stop = threading.Event()
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, lambda sig, frame: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)} \
        if main else {}
    try:
        cluster.host_on_nodes("http", serve_here, host, port, app_options)
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        probe = url.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]")
        deadline = time.monotonic() + ready_timeout_s
        while not stop.is_set():
            try:
                with urllib.request.urlopen(probe + "/health", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the nodes' service did not answer on {url} within {ready_timeout_s:g} s "
                                       f"(see the nodes' logs)") from None
                stop.wait(0.1)
        if on_ready is not None and not stop.is_set():
            on_ready(url)
        while not stop.wait(poll_s):
            try:
                cluster.host_on_nodes("http", serve_here, host, port, app_options)
            except Exception as exc:  # noqa: BLE001 - keep supervising; say why this round failed
                log.warning("hosting the service on the nodes failed this round: %s", exc)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
