"""Access tokens: who may read and who may change the data (the HTTP service and named clusters).

A token is a random string of at least :data:`MIN_TOKEN_LENGTH` characters (``python -c "import secrets;
print(secrets.token_urlsafe(32))"`` makes a good one). It is never taken from a command line, where ``ps`` shows it
to every user of the machine: it comes from a token file or from the ``DISTSPATIAL_TOKEN`` environment variable.

Token file (``distspatial serve --token-file PATH``), one token per line, ``#`` starts a comment::

    # SCOPE[:NAME]: TOKEN
    read: 0rH3l0b0pIbVQ7m1x5TDnqQpC8kQ0E2y
    write:alice: fA0Hh0YVn3cQ0G1q7m9c2x8b3kPzL4tR
    write:ingest-job: 3qF8s0mW2pVd6yN1e4Gk7hB9cZ5tJxLu

Scopes: ``read`` (queries, statistics, the status page) and ``write`` (ingest and delete, and everything ``read``
allows). ``NAME`` (letters, digits, ``_ . @ -``; default: the scope) is what the audit log records instead of the
token. A file that other users can read gets a warning (``chmod 600 PATH``). ``DISTSPATIAL_TOKEN`` holds one
token with the write scope, named ``env``.

Only a SHA-256 digest of each token is kept in memory, and tokens are compared in constant time
(:func:`hmac.compare_digest`, every configured token compared, no early exit). A named cluster's controller keeps
a salted HMAC of its token (:func:`make_verifier`), never the token itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
import secrets
import stat
import warnings
from typing import Iterable

__all__ = ["SCOPES", "ENV_VAR", "MIN_TOKEN_LENGTH", "Token", "TokenSet", "TokenFileError", "check_token",
           "load_token_file", "make_verifier", "verify", "env_token"]

SCOPES = ("read", "write")
ENV_VAR = "DISTSPATIAL_TOKEN"
MIN_TOKEN_LENGTH = 16
_TOKEN = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces (what fits in an Authorization header)
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_LINE = re.compile(r"(?P<scope>[A-Za-z]+)(?::(?P<name>[^:\s]*))?\s*:\s*(?P<token>.*)")


class TokenFileError(ValueError):
    """A token file that cannot be used; the message names the file and the line, never a token."""


def check_token(token: str, where: str) -> str:
    """``token`` when it is usable (printable ASCII without spaces, at least :data:`MIN_TOKEN_LENGTH` long);
    else :class:`ValueError` saying why (``where`` names its source; the token is never repeated)."""
    if not isinstance(token, str):
        raise ValueError(f"{where}: a token must be a string, got {type(token).__name__}")
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"{where}: a token must be printable ASCII without spaces")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"{where}: the token is {len(token)} characters long; use at least {MIN_TOKEN_LENGTH} "
                         f"random ones (python -c \"import secrets; print(secrets.token_urlsafe(32))\")")
    return token


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


@dataclasses.dataclass(frozen=True)
class Token:
    """One configured token: its ``name`` (what logs show), ``scope`` (``"read"`` or ``"write"``) and the
    SHA-256 ``digest`` of the token (the token itself is not kept)."""

    name: str
    scope: str
    digest: bytes = dataclasses.field(repr=False)

    def allows(self, scope: str) -> bool:
        """Whether this token may do what ``scope`` needs (``write`` allows reads too)."""
        return self.scope == "write" or scope == "read"


class TokenSet:
    """The tokens a service accepts; :meth:`check` finds the one a request carries, in constant time."""

    def __init__(self, tokens: Iterable[Token], source: str = "") -> None:
        self.tokens = tuple(tokens)
        self.source = source
        if not self.tokens:
            raise ValueError(f"{source or 'the token set'} holds no tokens")

    @classmethod
    def from_tokens(cls, entries: Iterable[tuple[str, str, str]], source: str = "tokens") -> TokenSet:
        """From ``(name, scope, token)`` triples (tokens checked as a token file's are)."""
        out = []
        for name, scope, token in entries:
            if scope not in SCOPES:
                raise ValueError(f"{source}: unknown scope {scope!r} (read or write)")
            out.append(Token(name, scope, _digest(check_token(token, f"{source}: token {name!r}"))))
        _check_unique(out, source)
        return cls(out, source)

    @classmethod
    def from_env(cls, environ: dict | None = None) -> TokenSet | None:
        """The write token in ``DISTSPATIAL_TOKEN`` (named ``env``), or ``None`` when it is not set."""
        token = env_token(environ)
        return None if token is None else cls([Token("env", "write", _digest(token))], ENV_VAR)

    def check(self, presented: str) -> Token | None:
        """The configured token equal to ``presented``, or ``None``: every token is compared (digests, with
        :func:`hmac.compare_digest`), so the time taken does not tell how much of a guess was right."""
        d = _digest(presented)
        found = None
        for t in self.tokens:
            if hmac.compare_digest(d, t.digest):
                found = t
        return found

    def scopes(self) -> dict[str, list[str]]:
        """Token names per scope (for messages and ``/stats``; no token)."""
        return {s: [t.name for t in self.tokens if t.scope == s] for s in SCOPES}

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"TokenSet({', '.join(f'{t.name}:{t.scope}' for t in self.tokens)})"


def _check_unique(tokens: list[Token], source: str) -> None:
    seen_names: dict[str, int] = {}
    seen: dict[bytes, str] = {}
    for t in tokens:
        if t.name in seen_names:
            raise TokenFileError(f"{source}: two tokens are named {t.name!r}; give each its own name "
                                 f"({t.scope}:NAME: TOKEN)")
        seen_names[t.name] = 1
        if t.digest in seen:
            raise TokenFileError(f"{source}: tokens {seen[t.digest]!r} and {t.name!r} are the same token; each "
                                 f"name needs its own")
        seen[t.digest] = t.name


def load_token_file(path: str | os.PathLike) -> TokenSet:
    """Read a token file (format in the module docstring). Raises :class:`TokenFileError` for a missing,
    unreadable or malformed file (naming the line, never showing a token); warns (:class:`UserWarning`) when
    group or other users may read it."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise TokenFileError(f"token file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"token file {path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise TokenFileError(f"token file {path}: not a regular file")
    if os.name == "posix" and st.st_mode & 0o044:
        warnings.warn(f"token file {path} can be read by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                      f"restrict it: chmod 600 {path}", UserWarning, stacklevel=2)
    tokens: list[Token] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"token file {path}, line {lineno}"
        m = _LINE.fullmatch(line)
        if m is None:
            raise TokenFileError(f"{where}: expected 'SCOPE: TOKEN' or 'SCOPE:NAME: TOKEN' with SCOPE read or "
                                 f"write")
        scope = m["scope"].lower()
        if scope not in SCOPES:
            shown = m["scope"] if len(m["scope"]) <= 16 else m["scope"][:16] + "..."
            raise TokenFileError(f"{where}: unknown scope {shown!r}; the scopes are read and write")
        name = m["name"] if m["name"] is not None else scope
        if not _NAME.fullmatch(name):
            raise TokenFileError(f"{where}: a token name is 1-64 letters, digits or _ . @ -")
        token = m["token"].strip()
        if not token:
            raise TokenFileError(f"{where}: the token is missing after '{scope}{':' + name if m['name'] else ''}:'")
        try:
            check_token(token, where)
        except ValueError as exc:
            raise TokenFileError(str(exc)) from None
        tokens.append(Token(name, scope, _digest(token)))
    if not tokens:
        raise TokenFileError(f"token file {path}: holds no tokens; add lines such as 'read: TOKEN' and "
                             f"'write:NAME: TOKEN'")
    _check_unique(tokens, f"token file {path}")
    return TokenSet(tokens, f"token file {path}")


def env_token(environ: dict | None = None) -> str | None:
    """The token in ``DISTSPATIAL_TOKEN`` (checked), or ``None`` when the variable is unset or empty."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    return check_token(value, ENV_VAR) if value else None


# -- named clusters: the controller keeps a salted HMAC, never the token ----------------------------------------
def make_verifier(token: str) -> tuple[bytes, bytes]:
    """``(salt, HMAC-SHA256(salt, token))``: what a controller stores to check ``token`` later."""
    salt = secrets.token_bytes(16)
    return salt, hmac.new(salt, token.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


def verify(verifier: tuple[bytes, bytes], presented: str | None) -> bool:
    """Whether ``presented`` is the token ``verifier`` was made from (constant time)."""
    salt, digest = verifier
    if not isinstance(presented, str):
        presented = ""
    return hmac.compare_digest(hmac.new(salt, presented.encode("utf-8", "surrogateescape"), hashlib.sha256).digest(),
                               digest)
