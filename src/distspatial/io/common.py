"""What the readers and writers of :mod:`distspatial.io` share: :class:`DataFileError` and the conversion of a
result table to Arrow. (Kept apart so that :mod:`~distspatial.io.files` and
:mod:`~distspatial.io.geoparquet` both use them without importing each other.)"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["DataFileError", "redact_uri"]

# the user info of a URI (``s3://KEY:SECRET@bucket/...``): up to the first "@" of the authority, or, for a secret
# with an unescaped "/" (``KEY:ab/cd@bucket``), up to the first "@" after a "user:" that is not ``host:port/``
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)(?:[^\s/?#@]*@|[^\s/?#@:]*:(?!\d*(?:[/?#\s]|$))[^\s@]*?@)")
# query parameters that may carry a secret (``?secret_key=...``, ``&session_token=...``, SAS signatures)
_SECRET_QUERY = re.compile(r"([?&][^=&\s#]*(?:secret|token|passw|credential|signature|sig\b|key)[^=&\s#]*=)"
                           r"[^&\s#:;,'\"()]*", re.IGNORECASE)
_SAFE_QUERY_KEYS = ("endpoint_override", "region", "scheme")


def redact_uri(text: Any) -> str:
    """``text`` with the credentials of every URI in it removed: the user info (``s3://KEY:SECRET@bucket/a`` ->
    ``s3://bucket/a``) and the values of query parameters that look secret (``secret_key=***``). Local paths and
    URIs without credentials come back unchanged; used for every path or message shown to users.

    >>> redact_uri("s3://AK:S%2FK@bkt/dir/a.parquet?region=us-east-1&session_token=xyz: no such file")
    's3://bkt/dir/a.parquet?region=us-east-1&session_token=***: no such file'
    """
    out = _USERINFO.sub(r"\1", str(text))

    def hide(m: re.Match) -> str:
        name = m.group(1)[1:-1]
        return m.group(0) if name.lower() in _SAFE_QUERY_KEYS else m.group(1) + "***"

    return _SECRET_QUERY.sub(hide, out) if "://" in out else out


class DataFileError(ValueError):
    """A point or result file cannot be used. ``str(err)`` is ``"<path>: <problem>; <how to fix it>"``.

    Attributes: ``path``, ``problem``, ``fix``, and where it applies ``row`` (0-based data row, the header of a
    CSV file not counted) and ``column``.
    """

    def __init__(self, path: Any, problem: str, fix: str = "", *, row: int | None = None,
                 column: str | None = None) -> None:
        # credentials in a URI never reach a message, a log or a traceback (see redact_uri)
        self.path = redact_uri(path)
        self.problem = redact_uri(problem)
        self.fix = redact_uri(fix)
        self.row = row
        self.column = column
        super().__init__(f"{self.path}: {self.problem}" + (f"; {self.fix}" if self.fix else ""))

    def __reduce__(self):  # pickled with its fields, so the error crosses Ray (raised on a node) intact
        return (_data_file_error, (self.path, self.problem, self.fix, self.row, self.column))


def _data_file_error(path: str, problem: str, fix: str, row: int | None, column: str | None) -> DataFileError:
    return DataFileError(path, problem, fix, row=row, column=column)


def _to_table(path: str, table_like: Any) -> pa.Table:
    if isinstance(table_like, pa.Table):
        return table_like
    if isinstance(table_like, pa.RecordBatch):
        return pa.Table.from_batches([table_like])
    if isinstance(table_like, Mapping):
        cols = {}
        for name, values in table_like.items():
            arr = np.asarray(values)
            if arr.ndim != 1:
                raise ValueError(f"column {name!r} of the results must be 1-D, got shape {arr.shape}")
            cols[str(name)] = arr
        lengths = {n: len(a) for n, a in cols.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"result columns differ in length: {lengths}")
        return pa.table(cols)
    try:
        return pa.table(table_like)  # pandas DataFrames and other Arrow-compatible tables
    except Exception as exc:
        raise ValueError(f"cannot write a {type(table_like).__name__} to {path}: give a mapping of column name "
                         f"to 1-D array or a pyarrow.Table ({exc})") from None


def write_atomically(path: str, write: Callable[[str], None], error: Callable[[str, str, str], Exception]) -> str:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it to ``path`` (readers never see a
    half-written file; a failed write leaves nothing behind). ``error(path, problem, fix)`` makes the exception for
    a missing directory. Returns ``path``."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise error(path, f"cannot write: the directory {parent} does not exist", "create it first")
    fd, tmp = tempfile.mkstemp(prefix=".distspatial-", suffix=os.path.basename(path), dir=parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
