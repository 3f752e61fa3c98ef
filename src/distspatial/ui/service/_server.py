"""Running the HTTP service: :func:`listen`, :func:`run_server`, :class:`BackgroundServer`."""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading
import time
from typing import Any, Callable

try:
    import uvicorn
    from fastapi import FastAPI
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the HTTP service needs FastAPI and uvicorn ({_exc}); install them with: pip install 'distspatial[serve]'"
    ) from _exc


from ._app import create_app
from ._requests import audit_log


# -- running it ----------------------------------------------------------------------------------------------------
def listen(host: str = "127.0.0.1", port: int = 0, reuse_port: bool = False) -> socket.socket:
    """A listening socket (``port`` 0: a free one); connections made before uvicorn accepts wait in the backlog.
    ``reuse_port``: several processes listen on the same port and the kernel spreads new connections among them
    (``SO_REUSEPORT``; the service hosted by every node of a machine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without it a
    # response written in two parts (headers, body) waits for the client's delayed ACK (~40 ms per request)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    """Whether ``host`` reaches this machine only (``127.0.0.0/8``, ``::1``, ``localhost``); every other address,
    ``0.0.0.0``/``::`` (all interfaces) and names included, counts as exposed."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, tokens: Any = None, read_only: bool = False, insecure_no_auth: bool = False) -> None:
    """Refuse (:class:`ValueError`, one line) to serve beyond this machine without tokens: on a non-loopback
    ``host`` anyone who reaches the port could ingest and delete. ``read_only`` (nothing can be changed) or an
    explicit ``insecure_no_auth`` allows it."""
    if tokens is not None or read_only or insecure_no_auth or is_loopback(host):
        return
    raise ValueError(f"refusing to listen on {host or '0.0.0.0'} without authentication: anyone who reaches the port "
                     f"could ingest and delete points; give --token-file FILE (or set DISTSPATIAL_TOKEN), "
                     f"--read-only, or --insecure-no-auth")


def _url(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}"


def _server(app: Any, log_level: str, access_log: bool) -> Any:
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=5,
                            lifespan="on")
    return uvicorn.Server(config)


def run_server(
    cluster: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "warning",
    access_log: bool = False,
    on_ready: Callable[[str], None] | None = None,
    sock: socket.socket | None = None,
    insecure_no_auth: bool = False,
    **app_options: Any,
) -> None:
    """Serve ``cluster`` on ``host:port`` until SIGINT or SIGTERM (then return normally, after a graceful
    shutdown). ``port=0`` takes a free port; ``on_ready(url)`` is called once the socket listens. ``sock``: a
    socket from :func:`listen` to serve on instead (bound early, so a busy port fails before any work).
    ``app_options`` go to :func:`create_app`. A non-loopback ``host`` needs ``tokens``, ``read_only`` or
    ``insecure_no_auth`` (:func:`check_exposure`). Writes are audited to the ``distspatial.audit`` logger,
    which gets a stderr handler here unless it has one."""
    check_exposure(host, app_options.get("tokens"), bool(app_options.get("read_only")), insecure_no_auth)
    if not audit_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("distspatial audit: %(message)s"))
        audit_log.addHandler(handler)
        audit_log.propagate = False
    if audit_log.level == logging.NOTSET:
        audit_log.setLevel(logging.INFO)
    app = create_app(cluster, **app_options)
    sock = sock if sock is not None else listen(host, port)
    server = _server(app, log_level, access_log)
    stops: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    # uvicorn handles SIGINT/SIGTERM while serving and raises them again afterwards; swallow that second one so
    # the caller (the CLI) returns normally and shuts the cluster down.
    previous = {s: signal.signal(s, lambda sig, frame: stops.append(sig)) for s in (signal.SIGINT, signal.SIGTERM)} \
        if main else {}
    try:
        if on_ready is not None:
            on_ready(_url(host, sock))
        server.run(sockets=[sock])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        sock.close()


class BackgroundServer:
    """uvicorn serving ``cluster`` (or a ready app) in a daemon thread: ``with BackgroundServer(c) as s: s.url``."""

    def __init__(self, cluster_or_app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 insecure_no_auth: bool = False, reuse_port: bool = False, **app_options: Any) -> None:
        guard = getattr(cluster_or_app, "_guard", None)
        if guard is not None:  # a ready app: its own access settings
            check_exposure(host, guard.tokens, guard.read_only, insecure_no_auth)
        else:
            check_exposure(host, app_options.get("tokens"), bool(app_options.get("read_only")), insecure_no_auth)
        self.app = cluster_or_app if isinstance(cluster_or_app, FastAPI) else create_app(cluster_or_app,
                                                                                       **app_options)
        self.host, self.port, self.log_level, self.reuse_port = host, port, log_level, reuse_port
        self.url = ""
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self._sock = listen(self.host, self.port, self.reuse_port)
        self.url = _url(self.host, self._sock)
        self._server = _server(self.app, self.log_level, False)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="distspatial-http-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server did not start within {timeout_s:g} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None

    def __enter__(self) -> BackgroundServer:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
