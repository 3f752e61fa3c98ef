"""Shares of a point data set: cut the input into disjoint pieces that separate processes read in parallel.

A *source* is a point file, a directory (every point file under it, recursively), a glob (``"data/*.parquet"``,
``**`` recursive), a list of any of these, or a URI that pyarrow's filesystems understand (``s3://``, ``gs://``,
``hdfs://``, ``file://``). A URI may carry pyarrow's options in its query string and the credentials in its user
info (``s3://KEY:SECRET@bucket/dir/?endpoint_override=host:9000&scheme=http&region=us-east-1``): every file
expanded from it keeps them, so each process opens it alone. In a URI ``?`` starts that query string: its globs
use ``*``, ``**`` and ``[...]``. Messages and :meth:`Share.describe` show URIs without credentials
(:func:`~distspatial.io.common.redact_uri`). :func:`plan_shares` expands a source in a fixed order (a directory's
and a glob's files sorted by path; a list in the order given) and cuts it into :class:`Share`\\ s, reading **only
metadata**: file sizes, Parquet footers (row groups) and ``.npy`` headers, never the points. :func:`read_share`
reads one share as a float64 ``(n, d)`` array (and the ids of ``id_column``), in any process that reaches the files.

How files are cut:

* Parquet: whole row groups, consecutive ones grouped up to about ``total bytes / n_shares_hint``;
* ``.npy`` (plain or structured arrays): row ranges, read through a memory map (local) or by byte range (remote);
* CSV/TSV (also compressed) and LAS/LAZ: one share per file (a single large CSV file is read by one process:
  split it into several files to read it in parallel).

A share's ``index`` is its position in the input order: the rows of the data set are the shares' rows in
``index`` order (a file's rows in file order), so the row numbers of "the concatenated input" are well defined
without reading anything (row offsets follow from the shares' row counts, known after reading for CSV).

Errors are :class:`~distspatial.io.files.DataFileError` (a ``ValueError``) naming the file and, for a bad value,
the 0-based row within that file and the column: a missing file, an unknown extension, a missing or non-numeric
column, a missing (null) or non-finite value, mixed dimensions across files (:func:`check_same_columns`).

Example::

    >>> shares = plan_shares("lidar/", n_shares_hint=8, columns="x,y,z")      # doctest: +SKIP
    >>> pts, ids = read_share(shares[0], "x,y,z")                                # doctest: +SKIP

No Ray here: the cluster's loader (``DistributedSpatialCluster.distribute_files``) plans on its controller and
has each node call :func:`read_share` on its shares.
"""

from __future__ import annotations

import glob as _glob
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import numpy as np
import pyarrow as pa

from .common import redact_uri
from .files import (
    READ_FORMATS,
    DataFileError,
    PointSource,
    _arrow_to_numpy,
    _npy_source,
    _open_csv,
    _open_parquet,
    _parse_columns,
    _READERS,
    detect_format,
    open_points,
)

__all__ = ["Share", "plan_shares", "read_share", "share_columns", "check_same_columns", "expand_source",
           "is_uri", "source_crs"]

#: rows read per block inside a share (bounded working memory besides the share's own arrays)
BLOCK_ROWS = 1 << 20
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Share:
    """One disjoint piece of a source, read by one process (see module docstring).

    Attributes:
        index: position in the input order (shares ``0, 1, ...`` concatenated are the data set).
        path: a local path or a URI (``s3://bucket/key``).
        kind: the format: ``"parquet"``, ``"csv"``, ``"npy"`` or ``"las"``.
        row_start, row_stop: rows ``[row_start, row_stop)`` of the file (``row_stop`` ``None``: to the end).
        row_groups: Parquet row groups read (``None``: not Parquet).
        n_rows: rows in the share when the metadata tells (``None`` for CSV and LAS).
        nbytes: bytes to read, about (for balancing shares over readers).
    """

    index: int
    path: str
    kind: str
    row_start: int = 0
    row_stop: int | None = None
    row_groups: tuple[int, ...] | None = None
    n_rows: int | None = None
    nbytes: int = 0

    def describe(self) -> str:
        """``path`` (without credentials) and the part read: ``a.parquet (row groups 2-3)``, ``b.npy (rows 0:10)``."""
        path = redact_uri(self.path)
        if self.row_groups is not None:
            g = self.row_groups
            return f"{path} (row group{'s' if len(g) != 1 else ''} {g[0]}" + (f"-{g[-1]})" if len(g) > 1 else ")")
        if self.kind == "npy":
            return f"{path} (rows {self.row_start}:{self.row_stop})"
        return path


# -- expanding a source ----------------------------------------------------------------------------------------------
def is_uri(path: str) -> bool:
    """``scheme://...`` (pyarrow filesystem) other than a Windows drive path."""
    head, sep, _ = path.partition("://")
    return bool(sep) and len(head) > 1 and head.replace("+", "").replace("-", "").isalnum()


def _split_query(uri: str) -> tuple[str, str]:
    """``(URI before "?", query string after it)``: pyarrow's options (``?region=...&endpoint_override=...``)."""
    head, _, query = uri.partition("?")
    return head, query


def _kind(path: str) -> str:
    """:func:`detect_format` of a local path or of a URI's path (not of its query string)."""
    return detect_format(_split_query(path)[0] if is_uri(path) else path)


def _glob_regex(pattern: str) -> re.Pattern:
    """A glob as a regex over whole paths: ``*`` and ``[...]`` within one directory, ``**`` across any."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            j = pattern.index("]", i + 2)
            body = pattern[i + 1:j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def _readable(name: str) -> bool:
    base = os.path.basename(name)
    if base.startswith((".", "_")):  # hidden files, _SUCCESS, _metadata, .crc of dataset writers
        return False
    try:
        detect_format(name)
        return True
    except DataFileError:
        return False


def _missing(path: str) -> DataFileError:
    parent = os.path.dirname(os.path.abspath(path)) if not is_uri(path) else path.rsplit("/", 1)[0]
    hint = "check the path" if is_uri(path) or os.path.isdir(parent) else \
        f"the directory {parent} does not exist either"
    return DataFileError(path, "no such file or directory", hint)


def _expand_local(src: str) -> list[str]:
    if any(c in src for c in _GLOB_CHARS):
        found = sorted(p for p in _glob.glob(src, recursive=True) if not os.path.isdir(p))
        if not found:
            raise DataFileError(src, "the pattern matches no file", "check the pattern and the directory")
        return found
    if os.path.isdir(src):
        found = []
        for root, dirs, files in os.walk(src):
            dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
            found.extend(os.path.join(root, f) for f in files if _readable(f))
        if not found:
            raise DataFileError(src, "the directory holds no point file", "point files end in " +
                                ", ".join(sorted(READ_FORMATS)))
        return sorted(found)
    if not os.path.exists(src):
        raise _missing(src)
    return [src]


def _expand_uri(src: str) -> list[str]:
    from pyarrow import fs as pafs

    head, query = _split_query(src)  # the query string (pyarrow's options) goes with every file's URI
    tail = "?" + query if query else ""
    glob_at = min((head.find(c) for c in "*[" if c in head), default=-1)
    base = (head if glob_at < 0 else head[: head.rfind("/", 0, glob_at)]).rstrip("/")
    if not base.partition("://")[2]:
        raise DataFileError(src, "a pattern cannot match bucket or host names", "put the pattern in the path")
    filesystem, root = _filesystem(base + tail)
    root = root.rstrip("/")
    # the URI of a path of this filesystem: s3://KEY:SECRET@bucket/dir -> root bucket/dir, prefix s3://KEY:SECRET@;
    # hdfs://host:9000/dir -> root /dir, prefix hdfs://host:9000; file:///tmp/dir -> root /tmp/dir, prefix file://
    scheme, rest = base.split("://", 1)
    authority = rest.split("/", 1)[0]
    userinfo = authority.rpartition("@")[0]
    prefix = f"{scheme}://" + (authority if root.startswith("/") else (userinfo + "@" if userinfo else ""))
    try:
        info = filesystem.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            bucket = root.split("/", 1)[0]  # object stores (s3://, gs://): the first part of the path
            if not root.startswith("/") and filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise DataFileError(src, f"no such file or directory: the bucket {bucket!r} does not exist",
                                    "check the bucket name, the endpoint and the credentials")
            raise _missing(src)
        if info.type == pafs.FileType.File and glob_at < 0:
            return [src]
        listed = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as exc:  # e.g. no such bucket, access denied, the server unreachable
        raise DataFileError(src, f"cannot be listed ({exc})", "check the URI and the credentials") from None
    files = sorted(i.path for i in listed if i.type == pafs.FileType.File)
    if glob_at >= 0:  # the pattern in the filesystem's terms (percent escapes decoded, as pyarrow does)
        pattern = _glob_regex(root + "/" + unquote(head[len(base):].lstrip("/")))
        files = [f for f in files if pattern.match(f)]
    else:
        files = [f for f in files if _readable(f) and not any(
            part.startswith((".", "_")) for part in f[len(root):].strip("/").split("/")[:-1])]
    if not files:
        raise DataFileError(src, "matches no point file", "check the URI; point files end in " +
                            ", ".join(sorted(READ_FORMATS)))
    return [prefix + quote(f, safe="/:@!$&'()*+,;=~") + tail for f in files]


def expand_source(source: Any) -> list[str]:
    """The files of ``source`` in input order (see module docstring). Raises :class:`DataFileError` naming a path that does not exist or a pattern that matches nothing."""
    if isinstance(source, (str, os.PathLike)):
        items = [os.fspath(source)]
    elif isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        items = [os.fspath(s) for s in source]
        if not items:
            raise ValueError("the list of input files is empty")
    else:
        raise TypeError(f"source must be a path, a glob, a URI or a list of them, got {type(source).__name__}")
    out: list[str] = []
    for item in items:
        out.extend(_expand_uri(item) if is_uri(item) else _expand_local(item))
    return out


# -- opening one file -------------------------------------------------------------------------------------------------
def _filesystem(path: str):
    from pyarrow import fs as pafs

    try:
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise DataFileError(path, f"cannot open the filesystem ({exc})", "check the URI and the credentials") from None


def _file_size(path: str) -> int:
    if not is_uri(path):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise _missing(path) from None
        except OSError as exc:
            raise DataFileError(path, f"cannot be opened ({exc.strerror or exc})", "check its permissions") from None
        return int(st.st_size)
    fs, p = _filesystem(path)
    info = fs.get_file_info(p)
    if info.size is None:
        raise _missing(path)
    return int(info.size)


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran order, dtype, offset of the data)`` of an open ``.npy`` file."""
    from numpy.lib import format as npf

    version = npf.read_magic(f)
    read = npf.read_array_header_1_0 if version == (1, 0) else npf.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return shape, fortran, dtype, f.tell()


def _open(path: str, kind: str, columns: list[str] | None, id_column: str | None,
          rows: tuple[int, int | None] = (0, None)) -> PointSource:
    """A :class:`PointSource` for ``path``; for a remote ``.npy`` file only ``rows`` are read."""
    if not is_uri(path):
        return open_points(path, columns, id_column)
    fs, p = _filesystem(path)
    try:
        if kind == "parquet":
            return _open_parquet(path, columns, id_column, handle=fs.open_input_file(p))
        if kind == "csv":
            if fs.get_file_info(p).size is None:
                raise _missing(path)
            return _open_csv(path, columns, id_column, opener=lambda: fs.open_input_stream(p))
        if kind == "npy":
            with fs.open_input_file(p) as f:
                try:
                    shape, fortran, dtype, at = _npy_header(f)
                except Exception as exc:
                    raise DataFileError(path, f"not a valid .npy file ({exc})", "write it with numpy.save") from None
                if fortran or dtype.hasobject:
                    raise DataFileError(path, "a Fortran-ordered or object array cannot be read by row ranges",
                                        "save a C-ordered numeric array with numpy.save")
                n = shape[0] if shape else 0
                a, b = rows[0], n if rows[1] is None else rows[1]
                row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
                buf = f.read_at((b - a) * row_bytes, at + a * row_bytes) if b > a else b""
                arr = np.frombuffer(buf, dtype=dtype).reshape((b - a,) + tuple(shape[1:]))
                src = _npy_source(path, arr, columns, id_column)
                src._opts["remote_rows"] = (a, b)
                return src
    except FileNotFoundError:
        raise _missing(path) from None
    except OSError as exc:
        raise DataFileError(path, f"cannot be opened ({exc})", "check the URI and the credentials") from None
    raise DataFileError(path, "LAS/LAZ files are read from a local or mounted filesystem only",
                        "copy or mount the files where every node reaches them")


def share_columns(path: str, columns: Any = None, id_column: str | None = None) -> list[str]:
    """The coordinate columns :func:`read_share` reads from ``path`` (metadata only: the header / footer)."""
    return _open(path, _kind(path), _parse_columns(columns), id_column, (0, 0)).columns


def check_same_columns(found: Sequence[tuple[str, Sequence[str]]]) -> None:
    """``found``: ``(path, coordinate columns)`` per file; raise :class:`DataFileError` naming two files whose
    numbers of coordinate columns differ (mixed dimensions)."""
    if not found:
        return
    path0, cols0 = found[0]
    for path, cols in found[1:]:
        if len(cols) != len(cols0):
            raise DataFileError(
                path, f"has {len(cols)} coordinate column(s) ({', '.join(map(str, cols))}) but {path0} has "
                f"{len(cols0)} ({', '.join(map(str, cols0))}): every file of a data set needs the same dimensions",
                "choose the same coordinate columns in every file (columns=...) or load the files separately")


# -- planning ---------------------------------------------------------------------------------------------------------
def plan_shares(source: Any, n_shares_hint: int, columns: Any = None, id_column: str | None = None) -> list[Share]:
    """Cut ``source`` into disjoint :class:`Share`\\ s in input order, reading only metadata (see module docstring).

    Args:
        source: a file, a directory, a glob, a list of these, or a pyarrow filesystem URI.
        n_shares_hint: about how many shares to make (Parquet row groups and ``.npy`` rows are grouped into shares
            of about ``total bytes / n_shares_hint``; CSV and LAS files are one share each, whatever the hint).
        columns, id_column: as in :func:`distspatial.io.open_points`; Parquet and ``.npy`` files are checked
            here (columns present and numeric, the same number of coordinate columns in each), CSV and LAS when
            read.

    Raises :class:`DataFileError` naming the file for a missing file, an unknown extension, a bad column or mixed
    dimensions. Files with no rows (Parquet, ``.npy``) are left out.

    >>> plan_shares("points/", 8)                                       # doctest: +SKIP
    [Share(index=0, path='points/part-0.parquet', kind='parquet', row_groups=(0, 1), n_rows=2000000, ...), ...]
    """
    hint = max(1, int(n_shares_hint))
    cols = _parse_columns(columns)
    if id_column is not None:
        id_column = str(id_column).strip()
        if cols is not None and id_column in cols:
            raise ValueError(f"id column {id_column!r} is also listed among the coordinate columns {cols}")
    files = expand_source(source)
    # per file: (path, kind, units, bytes per row); a unit is (row_start, row_stop, row group, n_rows, nbytes)
    per_file: list[tuple[str, str, list[tuple], int]] = []
    seen_cols: list[tuple[str, list[str]]] = []
    for path in files:
        kind = _kind(path)
        size = _file_size(path)
        if kind == "parquet":
            src = _open(path, kind, cols, id_column)
            md = src._opts["file"].metadata
            seen_cols.append((path, src.columns))
            units, at = [], 0
            for g in range(md.num_row_groups):
                rg = md.row_group(g)
                if rg.num_rows:
                    units.append((at, at + rg.num_rows, g, rg.num_rows, max(1, rg.total_byte_size)))
                at += rg.num_rows
            per_file.append((path, kind, units, 0))
        elif kind == "npy":
            src = _open(path, kind, cols, id_column, (0, 0))
            seen_cols.append((path, src.columns))
            n = _npy_rows(path) if is_uri(path) else int(src.n_rows or 0)
            if n:
                per_file.append((path, kind, [(0, n, None, n, max(1, size))], max(1, size // n)))
        else:  # CSV, LAS: one share per file; columns checked when read
            per_file.append((path, kind, [(0, None, None, None, max(1, size))], 0))
    check_same_columns(seen_cols)
    total = sum(u[4] for _, _, units, _ in per_file for u in units)
    target = max(1, total // hint)
    shares: list[Share] = []
    for path, kind, units, row_bytes in per_file:
        if kind == "npy":
            n = units[0][1]
            step = max(1, target // row_bytes)
            for a in range(0, n, step):
                b = min(n, a + step)
                shares.append(Share(len(shares), path, kind, a, b, None, b - a, (b - a) * row_bytes))
        elif kind == "parquet":  # consecutive row groups up to about the target size
            group: list[tuple] = []
            for u in units:
                if group and sum(g[4] for g in group) + u[4] / 2 > target:
                    shares.append(_group_share(len(shares), path, group))
                    group = []
                group.append(u)
            if group:
                shares.append(_group_share(len(shares), path, group))
        else:
            shares.append(Share(len(shares), path, kind, 0, None, None, None, units[0][4]))
    return shares


def _group_share(index: int, path: str, group: list[tuple]) -> Share:
    return Share(index, path, "parquet", group[0][0], group[-1][1], tuple(g[2] for g in group),
                 sum(g[3] for g in group), sum(g[4] for g in group))


def _npy_rows(path: str) -> int:
    fs, p = _filesystem(path)
    with fs.open_input_file(p) as f:
        shape = _npy_header(f)[0]
    return int(shape[0]) if shape else 0


# -- reading ----------------------------------------------------------------------------------------------------------
def _blocks(src: PointSource, share: Share) -> Iterator[tuple[np.ndarray, np.ndarray | None, int]]:
    """``(points, ids, file row of the first)`` blocks of the share."""
    if share.kind == "parquet":
        pf = src._opts["file"]
        at = share.row_start
        for batch in pf.iter_batches(batch_size=BLOCK_ROWS, row_groups=list(share.row_groups or ()),
                                     columns=src.read_columns):
            pts, ids = _arrow_to_numpy(src, batch, at)
            yield pts, ids, at
            at += batch.num_rows
        return
    if share.kind == "npy":
        arr = src._opts["array"]
        a, b = share.row_start, share.row_stop if share.row_stop is not None else int(src.n_rows or 0)
        if "remote_rows" in src._opts:  # the rows read are the share's
            a0 = src._opts["remote_rows"][0]
            view = arr[a - a0: b - a0]
        else:
            view = arr[a:b]
        sub = PointSource(src.path, "npy", src.columns, src.available, src.id_column, len(view),
                          {**src._opts, "array": view})
        at = a
        for pts, ids in _READERS["npy"](sub, BLOCK_ROWS):
            yield pts, ids, at
            at += len(pts)
        return
    at = 0
    for pts, ids in _READERS[share.kind](src, BLOCK_ROWS):
        yield pts, ids, at
        at += len(pts)


def read_share(share: Share, columns: Any = None, id_column: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Read one share: ``(points (n, d) float64 C-contiguous, ids (n,) int64 or None)``.

    ``columns`` / ``id_column`` as given to :func:`plan_shares`. Raises :class:`DataFileError` naming the file,
    and for a bad value the 0-based row within the file (CSV: header not counted) and the column: a value that
    is missing, not a number or not finite. A missing file names it too. Never reads outside the share.

    >>> pts, _ = read_share(plan_shares("a.npy", 4)[1])                       # doctest: +SKIP
    """
    cols = _parse_columns(columns)
    rows = (share.row_start, share.row_stop)
    if not is_uri(share.path) and not os.path.exists(share.path):
        raise _missing(share.path)
    src = _open(share.path, share.kind, cols, id_column, rows)
    n = share.n_rows
    pts_out = np.empty((n, src.dim)) if n is not None else None
    ids_out = np.empty(n, np.int64) if n is not None and id_column is not None else None
    pieces: list[tuple[np.ndarray, np.ndarray | None]] = []
    got = 0
    for pts, ids, at in _blocks(src, share):
        src._check_finite(pts, at)
        if pts_out is not None:
            if got + len(pts) > n:
                raise DataFileError(share.path, f"holds more rows than its metadata says ({n} in "
                                    f"{share.describe()})", "the file changed after the load was planned: retry")
            pts_out[got:got + len(pts)] = pts
            if ids_out is not None:
                ids_out[got:got + len(pts)] = ids
        else:
            pieces.append((pts, ids))
        got += len(pts)
    if pts_out is not None:
        if got != n:
            raise DataFileError(share.path, f"{got} rows read but its metadata says {n} ({share.describe()})",
                                "the file may be truncated or changed after the load was planned")
        return pts_out, ids_out
    if not pieces:
        return np.empty((0, src.dim)), (np.empty(0, np.int64) if id_column is not None else None)
    pts = pieces[0][0] if len(pieces) == 1 else np.concatenate([p for p, _ in pieces])
    ids = None
    if id_column is not None:
        ids = pieces[0][1] if len(pieces) == 1 else np.concatenate([i for _, i in pieces])
    return np.ascontiguousarray(pts), ids


def source_crs(source: Any, columns: Any = None) -> Any:
    """The CRS a GeoParquet source declares for the points read from it (its first file's geometry column: a
    name such as ``"EPSG:4326"`` / ``"OGC:CRS84"`` where the PROJJSON has an id, else the PROJJSON as a JSON
    string), or ``None``: not GeoParquet, plain coordinate columns read, or the file says the CRS is unknown.
    Reads metadata only."""
    try:
        first = expand_source(source)[0]
    except (DataFileError, TypeError, ValueError):
        return None
    if _kind(first) != "parquet":
        return None
    geo = _open(first, "parquet", _parse_columns(columns), None).geo
    return None if geo is None else geo.crs_input
