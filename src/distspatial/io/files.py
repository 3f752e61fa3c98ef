"""Point files in and result tables out.

Reading (``.npy``, ``.csv``/``.tsv`` (optionally ``.gz``/``.bz2``/``.zst``), ``.parquet``, ``.las``/``.laz``)::

    >>> pts = read_points("cloud.parquet", columns="x,y,z")                    # doctest: +SKIP
    >>> pts, ids = read_points("cities.csv", columns=["lon", "lat"], id_column="id")  # doctest: +SKIP
    >>> for chunk in iter_point_chunks("big.parquet", "x,y", chunk_rows=1_000_000):   # doctest: +SKIP
    ...     ...

Everything is read in chunks of at most ``chunk_rows`` rows (``.npy`` through a memory map, Parquet by record
batches, CSV with pyarrow's streaming reader, LAS/LAZ with laspy's chunk iterator), so a file never has to fit in
memory twice; :func:`read_points` only concatenates the chunks. Every chunk is a C-contiguous float64 ``(n, d)``
array whose values are checked to be finite.

Problems with a file raise :class:`DataFileError` (a ``ValueError``) whose message names the file, says what is
wrong (with the 0-based data row and the column where there is one) and how to fix it.

Writing: :func:`write_results` writes a table (a mapping of column name to 1-D array, or a ``pyarrow.Table``)
to Parquet or CSV by the file's extension; :func:`knn_table`, :func:`range_table`, :func:`labels_table` and
:func:`centroids_table` build the usual result tables in long format.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from .common import DataFileError, _data_file_error, _to_table, write_atomically  # noqa: F401  (re-exported)

__all__ = [
    "DataFileError",
    "PointSource",
    "open_points",
    "iter_point_chunks",
    "read_points",
    "detect_format",
    "write_results",
    "knn_table",
    "range_table",
    "labels_table",
    "centroids_table",
    "DEFAULT_CHUNK_ROWS",
    "READ_FORMATS",
    "WRITE_FORMATS",
]

DEFAULT_CHUNK_ROWS = 1 << 20
_CSV_BLOCK = 8 << 20  # bytes per block of pyarrow's streaming CSV reader
_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")
READ_FORMATS = {".npy": "npy", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet",
                ".geoparquet": "parquet", ".las": "las", ".laz": "las"}
WRITE_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv"}
GEO_WRITE_SUFFIX = ".geoparquet"  # a result file with a point geometry column (write_results(..., points=...))
_CSV_NULLS = ["", "NA", "N/A", "#N/A", "NULL", "null", "None"]  # "nan" is read as NaN and reported as non-finite
_LAS_HINT = "install the optional extra: pip install 'distspatial[las]' (laspy with the lazrs LAZ backend)"


# -- format detection and column selection ----------------------------------------------------------------------
def _suffix(path: str) -> tuple[str, str]:
    """``(extension, compression suffix)`` of ``path``, lower case: ``data.CSV.gz`` -> ``(".csv", ".gz")``."""
    root, ext = os.path.splitext(path.lower())
    comp = ""
    if ext in _COMPRESSED:
        comp = ext
        ext = os.path.splitext(root)[1]
    return ext, comp


def detect_format(path: Any, formats: Mapping[str, str] = READ_FORMATS) -> str:
    """The format name (``npy``, ``csv``, ``parquet``, ``las``) for ``path``'s extension, or :class:`DataFileError`."""
    p = os.fspath(path)
    ext, comp = _suffix(p)
    fmt = formats.get(ext)
    if fmt is None or (comp and fmt != "csv"):
        known = ", ".join(sorted(formats)) + (" (CSV/TSV also compressed: .gz, .bz2, .zst, .lz4)"
                                              if ".csv" in formats and formats is READ_FORMATS else "")
        raise DataFileError(p, f"unknown file extension {(ext + comp) or '(none)'!r}",
                            f"use one of {known}")
    return fmt


def _parse_columns(columns: Any) -> list[str] | None:
    if columns is None:
        return None
    if isinstance(columns, str):
        names = [c.strip() for c in columns.split(",")]
    elif isinstance(columns, Iterable):
        names = [str(c).strip() for c in columns]
    else:
        names = [str(columns)]
    if not names or any(not n for n in names):
        raise ValueError(f"columns must be a comma-separated list of column names like 'x,y', got {columns!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"columns name {', '.join(map(repr, dup))} more than once: {columns!r}")
    return names


def _show(names: Sequence[str], limit: int = 30) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_present(path: str, wanted: Sequence[str], available: Sequence[str], what: str = "column") -> None:
    missing = [c for c in wanted if c not in available]
    if missing:
        raise DataFileError(
            path, f"no {what} {_show(missing)}", f"the file has the columns {_show(list(available))}; "
            f"choose from them (--columns / columns=...)", column=missing[0])


def _row_text(fmt: str, row: int) -> str:
    return f"data row {row} (0-based, header not counted)" if fmt == "csv" else f"row {row} (0-based)"


# -- the source object ----------------------------------------------------------------------------------------
@dataclass
class PointSource:
    """An opened point file: which columns will be read, how many rows (if known), and chunked reading.

    Build it with :func:`open_points`; :meth:`chunks` yields ``(points, ids)`` of at most ``chunk_rows`` rows
    (``ids`` is ``None`` without an id column). This is the read path a streaming ``distribute`` would consume.
    """

    path: str
    format: str
    columns: list[str]  # the coordinate columns read, in order
    available: list[str]  # every column of the file
    id_column: str | None = None
    n_rows: int | None = None  # None where the format does not say without reading (CSV)
    _opts: dict = field(default_factory=dict, repr=False)

    @property
    def dim(self) -> int:
        return len(self.columns)

    @property
    def geo(self) -> Any:
        """The GeoParquet point column read (:class:`~distspatial.io.geoparquet.GeoColumn`: name, encoding, CRS,
        bbox), or ``None`` for plain coordinate columns."""
        return self._opts.get("geo")

    @property
    def read_columns(self) -> list[str]:
        """The file's columns actually read: the coordinate columns (or the geometry column) and the id column."""
        geo = self._opts.get("geo")
        return ([geo.name] if geo is not None else list(self.columns)) + ([self.id_column] if self.id_column else [])

    def chunks(self, chunk_rows: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """``(points (n, d) float64, ids (n,) int64 or None)`` per chunk, every chunk ``chunk_rows`` rows but the
        last. Raises :class:`DataFileError` for a non-finite or missing value or when the file holds no rows."""
        rows = DEFAULT_CHUNK_ROWS if chunk_rows is None else chunk_rows
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
            raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
        if self.n_rows == 0:
            raise self._empty()
        blocks = _READERS[self.format](self, int(rows))
        offset = 0
        for pts, ids in _rebatch(blocks, int(rows)):
            self._check_finite(pts, offset)
            offset += len(pts)
            yield pts, ids
        if offset == 0:
            raise self._empty()

    def read(self, chunk_rows: int | None = None, on_chunk: Callable[[int], Any] | None = None):
        """Every point: ``(points (n, d) float64, ids (n,) int64 or None)``, read chunk by chunk into one array
        (preallocated when the row count is known); ``on_chunk(rows)`` is called after each chunk."""
        if self.n_rows:
            pts = np.empty((self.n_rows, self.dim))
            ids = np.empty(self.n_rows, dtype=np.int64) if self.id_column else None
            at = 0
            for p, i in self.chunks(chunk_rows):
                if at + len(p) > self.n_rows:  # pragma: no cover - a header that lies about the length
                    raise DataFileError(self.path, f"the header says {self.n_rows} points but there are more",
                                        "the file may be corrupt")
                pts[at:at + len(p)] = p
                if ids is not None:
                    ids[at:at + len(p)] = i
                at += len(p)
                if on_chunk is not None:
                    on_chunk(len(p))
            if at != self.n_rows:  # pragma: no cover - a truncated file
                raise DataFileError(self.path, f"the header says {self.n_rows} points but {at} were read",
                                    "the file may be truncated")
            return pts, ids
        ps, is_ = [], []
        for p, i in self.chunks(chunk_rows):
            ps.append(p)
            if i is not None:
                is_.append(i)
            if on_chunk is not None:
                on_chunk(len(p))
        pts = ps[0] if len(ps) == 1 else np.concatenate(ps)
        ids = (is_[0] if len(is_) == 1 else np.concatenate(is_)) if self.id_column else None
        return pts, ids

    def _empty(self) -> DataFileError:
        what = "no data rows (only a header)" if self.format == "csv" else "no points (0 rows)"
        return DataFileError(self.path, f"the file holds {what}", "give a file with at least one point")

    def _check_finite(self, pts: np.ndarray, offset: int) -> None:
        ok = np.isfinite(pts)
        if ok.all():
            return
        r, c = np.argwhere(~ok)[0]
        n_bad = int((~ok.all(axis=1)).sum())
        raise DataFileError(
            self.path,
            f"{_row_text(self.format, offset + int(r))}, column {self.columns[c]!r} holds the non-finite value "
            f"{float(pts[r, c])!r} ({n_bad} such row(s) in this chunk of {len(pts)} starting at row {offset})",
            "coordinates must be finite: drop or fix those rows", row=offset + int(r), column=self.columns[c])


def _rebatch(blocks: Iterator[tuple[np.ndarray, np.ndarray | None]], rows: int):
    """Re-cut blocks of any size into chunks of exactly ``rows`` rows (the last may be shorter)."""
    pend_p: list[np.ndarray] = []
    pend_i: list[np.ndarray] = []
    have = 0
    with_ids = None
    for pts, ids in blocks:
        if len(pts) == 0:
            continue
        with_ids = ids is not None
        pend_p.append(pts)
        if with_ids:
            pend_i.append(ids)
        have += len(pts)
        if have < rows:
            continue
        allp = pend_p[0] if len(pend_p) == 1 else np.concatenate(pend_p)
        alli = (pend_i[0] if len(pend_i) == 1 else np.concatenate(pend_i)) if with_ids else None
        full = (have // rows) * rows
        for a in range(0, full, rows):
            yield np.ascontiguousarray(allp[a:a + rows]), (alli[a:a + rows] if with_ids else None)
        pend_p = [allp[full:]] if full < have else []
        pend_i = [alli[full:]] if with_ids and full < have else []
        have -= full
    if have:
        allp = pend_p[0] if len(pend_p) == 1 else np.concatenate(pend_p)
        alli = (pend_i[0] if len(pend_i) == 1 else np.concatenate(pend_i)) if with_ids else None
        yield np.ascontiguousarray(allp), alli


# -- Arrow columns (Parquet, CSV) -> float64 ---------------------------------------------------------------------
def _arrow_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _arrow_to_numpy(src: PointSource, batch: pa.RecordBatch | pa.Table, offset: int):
    """``(points, ids)`` from an Arrow batch; a null (missing) value raises with its row."""
    n = batch.num_rows
    names = batch.schema.names
    geo = src._opts.get("geo")
    if geo is not None:  # GeoParquet: the points of the geometry column
        from .geoparquet import decode_points

        out = decode_points(src.path, geo, batch.column(names.index(geo.name)), offset)
    else:
        out = np.empty((n, src.dim), dtype=np.float64)
    for j, name in enumerate(src.columns if geo is None else ()):
        col = batch.column(names.index(name))
        if col.null_count:
            _raise_null(src, col, name, offset)
        out[:, j] = col.cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False)
    ids = None
    if src.id_column is not None:
        col = batch.column(names.index(src.id_column))
        if col.null_count:
            _raise_null(src, col, src.id_column, offset)
        try:
            ids = np.asarray(col.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
        except pa.ArrowInvalid as exc:
            raise DataFileError(src.path, f"id column {src.id_column!r} holds a value that is not a 64-bit "
                                f"integer ({exc})", "ids must be integers in the int64 range") from None
    return out, ids


def _raise_null(src: PointSource, col, name: str, offset: int):
    import pyarrow.compute as pc

    r = int(np.flatnonzero(pc.is_null(col).to_numpy(zero_copy_only=False))[0])
    raise DataFileError(
        src.path, f"{_row_text(src.format, offset + r)}, column {name!r} is missing (empty or NA)",
        "every point needs a value in every coordinate column: drop or fill those rows",
        row=offset + r, column=name)


def _check_arrow_types(path: str, schema: pa.Schema, columns: Sequence[str], id_column: str | None) -> None:
    for name in columns:
        t = schema.field(name).type
        if not _arrow_numeric(t):
            raise DataFileError(path, f"column {name!r} is not numeric (type {t})",
                                "choose numeric coordinate columns with --columns / columns=...", column=name)
    if id_column is not None:
        t = schema.field(id_column).type
        if not pa.types.is_integer(t):
            raise DataFileError(path, f"id column {id_column!r} must hold integers, its type is {t}",
                                "choose an integer id column or leave ids out (row numbers are used)",
                                column=id_column)


# -- .npy ---------------------------------------------------------------------------------------------------------
def _open_npy(path: str, columns: list[str] | None, id_column: str | None) -> PointSource:
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        raise DataFileError(path, "not a valid .npy file (no NumPy header)", "write it with numpy.save")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise DataFileError(path, "the array holds Python objects, not numbers",
                                "save a numeric array, e.g. np.save(path, points.astype(float))") from None
        raise DataFileError(path, f"not a valid .npy file ({exc})", "write it with numpy.save") from None
    except Exception as exc:  # truncated header, not an npy file at all
        raise DataFileError(path, f"not a valid .npy file ({type(exc).__name__}: {exc})",
                            "write it with numpy.save") from None
    if not isinstance(arr, np.ndarray):  # pragma: no cover - np.load of .npz
        raise DataFileError(path, "not a single .npy array", "write it with numpy.save")
    return _npy_source(path, arr, columns, id_column)


def _npy_source(path: str, arr: np.ndarray, columns: list[str] | None, id_column: str | None) -> PointSource:
    """A :class:`PointSource` over an ``.npy`` array already opened (memory map or rows read), columns checked."""
    structured = arr.dtype.names is not None
    if structured:
        if arr.ndim != 1:
            raise DataFileError(path, f"a structured array must be 1-D, got shape {arr.shape}",
                                "save one record per point")
        available = list(arr.dtype.names)
    else:
        if arr.ndim != 2:
            hint = "save points.reshape(-1, 1) for 1-D data" if arr.ndim == 1 else "save an (n, d) array"
            raise DataFileError(path, f"holds an array of shape {arr.shape}; points need a 2-D (n, d) array", hint)
        available = [str(i) for i in range(arr.shape[1])]
    cols = columns if columns is not None else [c for c in available if c != id_column]
    _check_present(path, cols, available)
    if id_column is not None:
        _check_present(path, [id_column], available, "id column")
    for name in cols + ([id_column] if id_column else []):
        dt = arr.dtype[name] if structured else arr.dtype
        numeric = (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)) and dt.shape == ()
        if name == id_column and not np.issubdtype(dt, np.integer):
            raise DataFileError(path, f"id column {name!r} must hold integers, its dtype is {dt}",
                                "choose an integer id column or leave ids out (row numbers are used)", column=name)
        if not numeric:
            what = f"column {name!r}" if structured else "the array"
            raise DataFileError(path, f"{what} is not numeric (dtype {dt})",
                                "save the points as integers or floats", column=name if structured else None)
    if not cols:
        raise DataFileError(path, "no coordinate columns left besides the id column", "choose columns")
    return PointSource(path, "npy", cols, available, id_column, int(arr.shape[0]),
                       {"array": arr, "structured": structured})


def _read_npy(src: PointSource, rows: int):
    arr = src._opts["array"]
    structured = src._opts["structured"]
    idx = [int(c) for c in src.columns] if not structured else None
    full = idx == list(range(arr.shape[1])) if not structured else False
    for a in range(0, arr.shape[0], rows):
        part = arr[a:a + rows]
        if structured:
            pts = np.empty((len(part), src.dim))
            for j, c in enumerate(src.columns):
                pts[:, j] = part[c]
            ids = np.asarray(part[src.id_column], dtype=np.int64) if src.id_column else None
        else:
            pts = np.array(part if full else part[:, idx], dtype=np.float64, order="C")
            ids = np.asarray(part[:, int(src.id_column)], dtype=np.int64) if src.id_column else None
        yield pts, ids


# -- Parquet ------------------------------------------------------------------------------------------------------
def _open_parquet(path: str, columns: list[str] | None, id_column: str | None, handle: Any = None) -> PointSource:
    """``handle``: an open random-access file (a pyarrow filesystem's) to read instead of ``path``."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path if handle is None else handle)
    except (pa.ArrowException, OSError) as exc:
        raise DataFileError(path, f"not a valid Parquet file ({exc})", "write it with pyarrow or pandas") from None
    schema = pf.schema_arrow
    available = list(schema.names)
    geo = _geoparquet_column(path, schema, columns, available)
    if geo is not None:  # GeoParquet: coordinates x, y[, z] of the geometry column's points
        if id_column is not None:
            _check_present(path, [id_column], available, "id column")
            _check_arrow_types(path, schema, [], id_column)
        return PointSource(path, "parquet", geo.coordinate_names, available, id_column, int(pf.metadata.num_rows),
                           {"file": pf, "geo": geo})
    if columns is None:
        columns = [c for c in available if c != id_column]
    _check_present(path, columns, available)
    if id_column is not None:
        _check_present(path, [id_column], available, "id column")
    _check_arrow_types(path, schema, columns, id_column)
    return PointSource(path, "parquet", columns, available, id_column, int(pf.metadata.num_rows), {"file": pf})


def _geoparquet_column(path: str, schema: pa.Schema, columns: list[str] | None, available: list[str]):
    """The GeoParquet point column to read, when the file has ``geo`` metadata and ``columns`` ask for it: not
    given, the geometry column's name, or ``x, y[, z]`` that are not plain columns of the file."""
    if b"geo" not in (schema.metadata or {}):
        return None
    from .geoparquet import geo_column

    if columns is not None and len(columns) == 1:
        named = geo_column(path, schema, columns[0]) if columns[0] in available else None
        if named is not None:
            return named
    if columns is not None and (all(c in available for c in columns) or
                                not set(columns) <= {"x", "y", "z"}):
        return None  # plain coordinate columns of a GeoParquet file
    geo = geo_column(path, schema)
    if geo is not None and columns is not None and columns != geo.coordinate_names:
        raise DataFileError(path, f"columns {columns} do not match the geometry column {geo.name!r}, whose points "
                            f"have the coordinates {geo.coordinate_names}",
                            f"leave columns out (or give {','.join(geo.coordinate_names)}) to read its points",
                            column=geo.name)
    return geo


def _read_parquet(src: PointSource, rows: int):
    pf = src._opts["file"]
    offset = 0
    for batch in pf.iter_batches(batch_size=rows, columns=src.read_columns):
        yield _arrow_to_numpy(src, batch, offset)
        offset += batch.num_rows


# -- CSV ----------------------------------------------------------------------------------------------------------
def _csv_options(path: str) -> dict:
    ext, _ = _suffix(path)
    return {"delimiter": "\t" if ext == ".tsv" else ","}


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _open_csv(path: str, columns: list[str] | None, id_column: str | None,
              opener: Callable[[], Any] | None = None) -> PointSource:
    """``opener``: returns a fresh input stream of the file (a pyarrow filesystem's), read instead of ``path``."""
    import pyarrow.csv as pv

    parse = pv.ParseOptions(delimiter=_csv_options(path)["delimiter"])
    try:
        probe = pv.open_csv(path if opener is None else opener(), read_options=pv.ReadOptions(block_size=1 << 20),
                            parse_options=parse)
    except pa.ArrowInvalid as exc:
        if "empty" in str(exc).lower():
            raise DataFileError(path, "the file is empty", "give a CSV file with a header line and points") from None
        raise DataFileError(path, f"could not be parsed as CSV ({exc})",
                            "check the delimiter and that every line has the same number of fields") from None
    schema = probe.schema
    names = list(schema.names)
    header = not all(_is_number(n) for n in names)
    opts: dict = {"parse": parse, "column_names": None, "open": opener}
    if not header:  # a headerless file: columns are called "0", "1", ...
        names = [str(i) for i in range(len(names))]
        opts["column_names"] = names
        schema = None
    if columns is None:
        columns = [c for c in names if c != id_column]
    _check_present(path, columns, names)
    if id_column is not None:
        _check_present(path, [id_column], names, "id column")
    src = PointSource(path, "csv", columns, names, id_column, None, opts)
    if schema is not None:  # types inferred from the first block: catch text columns here, with the row
        for name in columns + ([id_column] if id_column else []):
            t = schema.field(name).type
            bad = not (pa.types.is_integer(t) if name == id_column else (_arrow_numeric(t) or pa.types.is_null(t)))
            if bad:
                _locate_csv_problem(src, 0, f"column {name!r} is not numeric", only=[name])
    return src


def _csv_reader(src: PointSource, types: dict, skip: int = 0, block: int = _CSV_BLOCK):
    import pyarrow.csv as pv

    ro = pv.ReadOptions(block_size=block, column_names=src._opts["column_names"], skip_rows_after_names=skip)
    co = pv.ConvertOptions(include_columns=list(types), column_types=types, strings_can_be_null=True,
                           null_values=_CSV_NULLS)
    opener = src._opts.get("open")
    return pv.open_csv(src.path if opener is None else opener(), read_options=ro, parse_options=src._opts["parse"],
                       convert_options=co)


def _read_csv(src: PointSource, rows: int):
    types = {c: pa.float64() for c in src.columns}
    if src.id_column:
        types[src.id_column] = pa.int64()
    offset = 0
    block = int(min(max(1 << 16, rows * 16 * (src.dim + 1)), _CSV_BLOCK))
    try:
        reader = _csv_reader(src, types, block=block)
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            pts, ids = _arrow_to_numpy(src, batch, offset)
            offset += batch.num_rows
            yield pts, ids
    except pa.ArrowInvalid as exc:
        _locate_csv_problem(src, offset, None, exc)


def _locate_csv_problem(src: PointSource, offset: int, problem: str | None, exc: Exception | None = None,
                        only: list[str] | None = None):
    """Find the first data row at or after ``offset`` whose value does not parse (in the columns ``only``, default
    all read); raise DataFileError naming it."""
    want = only or src.columns + ([src.id_column] if src.id_column else [])
    try:
        reader = _csv_reader(src, {c: pa.string() for c in want}, skip=offset)
        row = offset
        for batch in reader:
            best: tuple[int, int, Any] | None = None
            for j, name in enumerate(want):
                vals = batch.column(batch.schema.names.index(name)).to_pylist()
                parse = int if name == src.id_column else float
                for r, v in enumerate(vals):
                    if best is not None and r >= best[0]:
                        break
                    if v is None:
                        best = (r, j, None)
                        break
                    try:
                        ok = np.isfinite(parse(v))
                    except (ValueError, OverflowError):
                        ok = False
                    if not ok:
                        best = (r, j, v)
                        break
            if best is not None:
                r, j, v = best
                name = want[j]
                where = _row_text("csv", row + r)
                if v is None:
                    raise DataFileError(src.path, f"{where}, column {name!r} is missing (empty or NA)",
                                        "every point needs a value in every coordinate column: drop or fill "
                                        "those rows", row=row + r, column=name)
                kind = "an integer" if name == src.id_column else "a finite number"
                text = (f"{problem}: {where} holds {v!r}" if problem
                        else f"{where}, column {name!r} holds {v!r}, which is not {kind}")
                raise DataFileError(src.path, text,
                                    "fix that value or choose other columns with --columns / columns=...",
                                    row=row + r, column=name)
            row += batch.num_rows
    except pa.ArrowInvalid as exc2:
        exc = exc or exc2
    detail = f" ({exc})" if exc is not None else ""
    raise DataFileError(src.path, (problem or "could not be read as CSV") + detail,
                        "check the file's delimiter and values")


# -- LAS / LAZ ----------------------------------------------------------------------------------------------------
def _laspy():
    try:
        import laspy
    except ImportError:
        return None
    return laspy


def _open_las(path: str, columns: list[str] | None, id_column: str | None) -> PointSource:
    laspy = _laspy()
    if laspy is None:
        raise DataFileError(path, "reading LAS/LAZ files needs the laspy package, which is not installed", _LAS_HINT)
    try:
        with laspy.open(path) as reader:
            n = int(reader.header.point_count)
            dims = list(reader.header.point_format.dimension_names)
    except Exception as exc:  # laspy.errors.LaspyException and OSError
        raise DataFileError(path, f"not a valid LAS/LAZ file ({exc})", "check the file") from None
    available = ["x", "y", "z"] + dims  # x, y, z: scaled coordinates; X, Y, Z: the raw integers
    cols = columns if columns is not None else ["x", "y", "z"]
    _check_present(path, cols, available)
    if id_column is not None:
        _check_present(path, [id_column], available, "id column")
    return PointSource(path, "las", cols, available, id_column, n, {})


def _read_las(src: PointSource, rows: int):
    laspy = _laspy()
    try:
        with laspy.open(src.path) as reader:
            for chunk in reader.chunk_iterator(rows):
                pts = np.empty((len(chunk), src.dim))
                for j, c in enumerate(src.columns):
                    pts[:, j] = np.asarray(chunk[c], dtype=np.float64)
                ids = None
                if src.id_column:
                    raw = np.asarray(chunk[src.id_column])
                    if not np.issubdtype(raw.dtype, np.integer):
                        raise DataFileError(src.path, f"id column {src.id_column!r} must hold integers, its dtype "
                                            f"is {raw.dtype}", "choose an integer dimension such as "
                                            "point_source_id, or leave ids out", column=src.id_column)
                    ids = raw.astype(np.int64)
                yield pts, ids
    except DataFileError:
        raise
    except Exception as exc:
        text = str(exc)
        fix = _LAS_HINT if "backend" in text.lower() or "laz" in text.lower() else "check the file"
        raise DataFileError(src.path, f"could not read points ({type(exc).__name__}: {text})", fix) from None


_OPENERS: dict[str, Callable] = {"npy": _open_npy, "parquet": _open_parquet, "csv": _open_csv, "las": _open_las}
_READERS: dict[str, Callable] = {"npy": _read_npy, "parquet": _read_parquet, "csv": _read_csv, "las": _read_las}


# -- public reading API -------------------------------------------------------------------------------------------
def open_points(path: Any, columns: Any = None, id_column: str | None = None) -> PointSource:
    """Open a point file and check its columns, reading no more than the header (CSV: the first block).

    Args:
        path: a ``.npy``, ``.csv``/``.tsv`` (optionally compressed), ``.parquet``/``.pq`` or ``.las``/``.laz`` file.
        columns: coordinate columns, ``"x,y"`` or a list. Default: every column but ``id_column`` (LAS/LAZ: the
            scaled ``x, y, z``). A plain 2-D ``.npy`` array and a headerless CSV file name their columns
            ``"0"``, ``"1"``, ...; a structured ``.npy`` array by its field names.
        id_column: a column of unique integer ids to read alongside (not a coordinate).
    """
    p = os.fspath(path)
    fmt = detect_format(p)
    cols = _parse_columns(columns)
    if id_column is not None:
        id_column = str(id_column).strip()
        if cols is not None and id_column in cols:
            raise ValueError(f"id column {id_column!r} is also listed among the coordinate columns {cols}")
    if not os.path.exists(p):
        parent = os.path.dirname(os.path.abspath(p))
        hint = "check the path" if os.path.isdir(parent) else f"the directory {parent} does not exist either"
        raise DataFileError(p, "no such file", hint)
    if os.path.isdir(p):
        raise DataFileError(p, "is a directory, not a file", "give the path of a point file")
    if os.path.isfile(p) and os.path.getsize(p) == 0:
        raise DataFileError(p, "the file is empty (0 bytes)", "give a file with at least one point")
    return _OPENERS[fmt](p, cols, id_column)


def iter_point_chunks(path: Any, columns: Any = None, chunk_rows: int | None = None,
                      id_column: str | None = None) -> Iterator:
    """Yield the points of ``path`` as float64 ``(n, d)`` chunks of ``chunk_rows`` rows (the last may be shorter)
    without loading the whole file; with ``id_column``, yield ``(points, ids)`` pairs instead.

    Arguments as in :func:`open_points`; ``chunk_rows`` defaults to :data:`DEFAULT_CHUNK_ROWS`.
    """
    src = open_points(path, columns, id_column)
    for pts, ids in src.chunks(chunk_rows):
        yield (pts, ids) if id_column is not None else pts


def read_points(path: Any, columns: Any = None, chunk_rows: int | None = None, id_column: str | None = None,
                on_chunk: Callable[[int], Any] | None = None):
    """Read every point of ``path``: a float64 ``(n, d)`` array, or ``(points, ids)`` with ``id_column``.

    Reads chunk by chunk (``chunk_rows`` rows; see :func:`iter_point_chunks`) into one array, preallocated when
    the format tells the row count; ``on_chunk(rows)`` is called after each chunk (a progress bar's ``update``).
    See :meth:`PointSource.read`.
    """
    pts, ids = open_points(path, columns, id_column).read(chunk_rows, on_chunk)
    return (pts, ids) if id_column is not None else pts


# -- writing ------------------------------------------------------------------------------------------------------
def write_results(path: Any, table_like: Any, points: Any = None, crs: Any = None) -> str:
    """Write a result table to ``path`` as Parquet (``.parquet``/``.pq``), GeoParquet (``.geoparquet``, or
    ``.parquet`` with ``points``) or CSV (``.csv``, ``.tsv``).

    ``table_like``: a mapping of column name -> 1-D array (e.g. from :func:`knn_table`), a ``pyarrow.Table`` or
    anything ``pyarrow.table`` accepts. ``points``: one ``(x, y[, z])`` per row, written as a WKB point
    ``geometry`` column with GeoParquet metadata (``crs``: anything pyproj takes; ``None``: unknown) by
    :func:`distspatial.io.geoparquet.write_geoparquet`. The file is written next to its destination and renamed
    into place, so a failed write leaves no partial file. Returns the path.
    """
    p = os.fspath(path)
    fmt = "geoparquet" if _suffix(p) == (GEO_WRITE_SUFFIX, "") else detect_format(p, WRITE_FORMATS)
    if fmt == "geoparquet" or (points is not None and fmt == "parquet"):
        if points is None:
            raise DataFileError(p, "a .geoparquet result needs the points' coordinates (points=...)",
                                "pass points= (one per row) or write .parquet / .csv without geometry")
        from .geoparquet import write_geoparquet

        return write_geoparquet(p, table_like, points, crs)
    if points is not None:
        raise DataFileError(p, "points (a geometry column) can be written to GeoParquet only",
                            "name the file .geoparquet or .parquet")
    table = _to_table(p, table_like)

    def write(tmp: str) -> None:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(table, tmp, compression="zstd")
            return
        import pyarrow.csv as pv

        delim = "\t" if _suffix(p)[0] == ".tsv" else ","
        opts: dict = {"delimiter": delim, "quoting_style": "needed"}
        if not any(ch in name for name in table.column_names for ch in (delim, '"', "\n", "\r")):
            opts["quoting_header"] = "none"  # plain names: a header line without quotes
        try:
            wo = pv.WriteOptions(**opts)
        except TypeError:  # pyarrow without quoting_header
            opts.pop("quoting_header", None)
            wo = pv.WriteOptions(**opts)
        pv.write_csv(table, tmp, write_options=wo)

    return write_atomically(p, write, DataFileError)


def _query_labels(m: int, query_ids: Any) -> np.ndarray:
    if query_ids is None:
        return np.arange(m, dtype=np.int64)
    q = np.asarray(query_ids)
    if q.shape != (m,):
        raise ValueError(f"query_ids must have one id per query ({m}), got shape {q.shape}")
    return q


def knn_table(distances: Any, ids: Any, query_ids: Any = None) -> dict[str, np.ndarray]:
    """kNN results in long format: columns ``query, rank, id, distance``, one row per (query, neighbour).

    ``rank`` is 1 for the nearest; ``query`` is the query's row (or ``query_ids``). Slots of a partial answer
    (id ``-1``) are left out.
    """
    d = np.atleast_2d(np.asarray(distances, dtype=np.float64))
    i = np.atleast_2d(np.asarray(ids, dtype=np.int64))
    if d.shape != i.shape:
        raise ValueError(f"distances and ids differ in shape: {d.shape} and {i.shape}")
    m, k = d.shape
    q = _query_labels(m, query_ids)
    keep = (i >= 0).ravel() if (i < 0).any() else slice(None)
    return {
        "query": np.repeat(q, k)[keep],
        "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), m)[keep],
        "id": i.ravel()[keep],
        "distance": d.ravel()[keep],
    }


def range_table(hits: Sequence[Any], distances: Sequence[Any] | None = None, query_ids: Any = None) -> dict:
    """Radius/box results in long format: columns ``query, id`` (and ``distance`` when given), one row per hit."""
    m = len(hits)
    q = _query_labels(m, query_ids)
    counts = np.array([len(h) for h in hits], dtype=np.int64)
    out = {"query": np.repeat(q, counts),
           "id": np.concatenate([np.asarray(h, dtype=np.int64) for h in hits]) if m else np.empty(0, np.int64)}
    if distances is not None:
        out["distance"] = (np.concatenate([np.asarray(x, dtype=np.float64) for x in distances]) if m
                           else np.empty(0))
    return out


def labels_table(labels: Any, ids: Any = None) -> dict[str, np.ndarray]:
    """One row per point: columns ``id, label`` (ids default to the row numbers)."""
    lab = np.asarray(labels)
    return {"id": _query_labels(len(lab), ids), "label": lab}


def centroids_table(centroids: Any, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """One row per cluster: ``cluster`` and one column per coordinate (named like the input columns)."""
    c = np.atleast_2d(np.asarray(centroids, dtype=np.float64))
    names = list(columns) if columns is not None else [f"x{j}" for j in range(c.shape[1])]
    if len(names) != c.shape[1]:
        raise ValueError(f"{len(names)} column names for {c.shape[1]}-D centroids")
    out: dict[str, np.ndarray] = {"cluster": np.arange(len(c), dtype=np.int64)}
    for j, n in enumerate(names):
        out[n if n not in out else f"{n}_"] = c[:, j]
    return out
