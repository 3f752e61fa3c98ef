"""Access control of the HTTP service: write and public paths, Content-Security-Policy and other headers,
:class:`_AccessGuard` in front of every route."""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any, Callable

try:
    from fastapi.responses import Response
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the HTTP service needs FastAPI and uvicorn ({_exc}); install them with: pip install 'distspatial[serve]'"
    ) from _exc

from ...core.access import TokenSet
from ._metrics import ServiceMetrics
from ._requests import _error_response

#: endpoints that change the data: the write scope, 405 on a read-only service (every path not listed here or in
#: PUBLIC_PATHS needs the read scope: a new endpoint that changes the data must be added here)
WRITE_PATHS = frozenset(("/ingest", "/delete", "/update"))
#: answered without a token: the status page's HTML (it holds no data; it asks for a token), the API docs and
#: the OpenAPI spec, and /health (status and reason only, the details with a read token)
PUBLIC_PATHS = frozenset(("/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/health"))
_DOC_PAGES = frozenset(("/docs", "/docs/oauth2-redirect", "/redoc"))
#: the interactive API pages load Swagger UI / ReDoc from their CDN and run an inline script
_DOCS_CSP = ("default-src 'none'; script-src 'unsafe-inline' https://cdn.jsdelivr.net; style-src 'unsafe-inline' "
             "https://cdn.jsdelivr.net https://fonts.googleapis.com; font-src https://fonts.gstatic.com; img-src "
             "'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; connect-src 'self'; worker-src blob:; "
             "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def _page_csp(page: str) -> str:
    """The Content-Security-Policy of every answer but the API docs: nothing may load or run but the status
    page's own inline script and style (allowed by their SHA-256, so an injected one would not run), fetches
    to this origin only, no framing, no form submission, no plugins."""
    scripts = " ".join(_csp_hash(t) for t in re.findall(r"<script>(.*?)</script>", page, re.S)) or "'none'"
    styles = " ".join(_csp_hash(t) for t in re.findall(r"<style>(.*?)</style>", page, re.S)) or "'none'"
    return (f"default-src 'none'; script-src {scripts}; style-src {styles}; connect-src 'self'; img-src 'self' "
            f"data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _header(scope: Any, name: bytes) -> str | None:
    for k, v in scope.get("headers") or ():
        if k == name:
            return v.decode("latin-1")
    return None


class _AccessGuard:
    """Access control in front of every route (the FastAPI ones and the direct query path): tokens and their
    scopes, read-only mode, writes from other web origins, CORS; and the security headers of every answer.

    ``check(scope, path)`` returns ``None`` for a request that may go on (its token, a :class:`Token` or
    ``None``, is left in ``scope["distspatial.principal"]``), else the response to send instead (401, 403, 405,
    or a CORS preflight answer). Refusals are counted in ``metrics`` per reason."""

    def __init__(self, tokens: TokenSet | None, read_only: bool, cors_origins: tuple[str, ...],
                 metrics: ServiceMetrics, page_csp: str) -> None:
        self.tokens, self.read_only, self.metrics = tokens, read_only, metrics
        self.cors = tuple(o.rstrip("/") for o in cors_origins)
        self.cors_any = "*" in self.cors
        common = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                  (b"referrer-policy", b"no-referrer")]
        self.headers = common + [(b"content-security-policy", page_csp.encode())]
        self.doc_headers = common + [(b"content-security-policy", _DOCS_CSP.encode())]

    def allowed_origin(self, origin: str) -> bool:
        return self.cors_any or origin.rstrip("/") in self.cors

    def sender(self, send: Callable, path: str, origin: str | None) -> Callable:
        """``send`` adding the security headers (and CORS ones for an allowed origin) to the response start."""
        extra = self.doc_headers if path in _DOC_PAGES else self.headers
        if origin is not None and self.cors and self.allowed_origin(origin):
            extra = extra + [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                             (b"access-control-expose-headers", b"Retry-After, WWW-Authenticate")]

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        return send_with_headers

    def refuse(self, reason: str, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        self.metrics.refuse(reason)
        return _error_response(status, message, headers)

    def check(self, scope: Any, path: str, origin: str | None) -> Response | None:
        method = scope["method"]
        if method == "OPTIONS" and origin is not None and _header(scope, b"access-control-request-method"):
            return self.preflight(origin)
        write = path in WRITE_PATHS
        if write and self.read_only:
            return self.refuse("read_only", 405, f"this service is read-only (--read-only): {method} {path} changes "
                                                 f"the data; send writes to a service that is not read-only",
                               {"Allow": ""})
        if (write and origin is not None and method not in ("GET", "HEAD")
                and not self.same_origin(scope, origin) and not (self.cors and self.allowed_origin(origin))):
            shown = origin if len(origin) <= 80 else origin[:80] + "..."
            return self.refuse("cross_origin", 403, f"a {method} {path} from a web page at another origin ({shown}) "
                                                    f"may not change the data here; start the service with "
                                                    f"--cors-origin ORIGIN to allow a page's origin")
        principal = None
        auth = _header(scope, b"authorization") if self.tokens is not None else None
        if auth is not None:
            scheme, _, presented = auth.strip().partition(" ")
            presented = presented.strip()
            if scheme.lower() != "bearer" or not presented:
                if path not in PUBLIC_PATHS:
                    return self.refuse("invalid_token", 401, "the Authorization header must be 'Bearer <token>'",
                                       {"WWW-Authenticate": 'Bearer realm="distspatial", error="invalid_request"'})
            else:
                principal = self.tokens.check(presented)
                if principal is None and path not in PUBLIC_PATHS:
                    return self.refuse("invalid_token", 401, "the token sent is not one this service accepts; check "
                                                             "the token (a new token file needs a restart)",
                                       {"WWW-Authenticate": 'Bearer realm="distspatial", error="invalid_token"'})
        scope["distspatial.principal"] = principal
        if self.tokens is None or path in PUBLIC_PATHS:
            return None
        if principal is None:
            return self.refuse("missing_token", 401, "this service needs a token: send the header 'Authorization: "
                                                     "Bearer <token>'",
                               {"WWW-Authenticate": 'Bearer realm="distspatial"'})
        if write and not principal.allows("write"):
            return self.refuse("insufficient_scope", 403, f"token {principal.name!r} has the {principal.scope} "
                                                          f"scope; {method} {path} changes the data and needs a "
                                                          f"token with the write scope",
                               {"WWW-Authenticate": 'Bearer realm="distspatial", error="insufficient_scope", '
                                                    'scope="write"'})
        return None

    @staticmethod
    def same_origin(scope: Any, origin: str) -> bool:
        """The page that sent the request was served from here (its origin's host:port is the request's Host;
        behind a proxy that keeps the Host header, the public name)."""
        host = _header(scope, b"host")
        if host is None:
            return False
        netloc = origin.split("://", 1)[-1].rstrip("/")
        if netloc == host:
            return True
        defaults = {"http": "80", "https": "443"}
        scheme = origin.split("://", 1)[0].lower()
        return ":" not in netloc.rsplit("]", 1)[-1] and f"{netloc}:{defaults.get(scheme, '')}" == host

    def preflight(self, origin: str) -> Response:
        if not self.cors or not self.allowed_origin(origin):
            return self.refuse("cross_origin", 403, "cross-origin requests are not allowed here (start the service "
                                                    "with --cors-origin ORIGIN to allow a web page's origin)")
        return Response(status_code=204, headers={
            "Access-Control-Allow-Methods": "GET, POST", "Access-Control-Max-Age": "600",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, Accept"})
