"""Command line: ``distspatial <command>``.

Commands: ``demo`` (the README's main job), ``knn``, ``range``, ``kmeans``, ``dbscan``, ``hierarchical``,
``polygons`` (a point-in-polygon join), ``stats``, ``serve`` (an HTTP query
service and status page, :mod:`distspatial.ui.service`) (on a point file: ``.npy``, ``.csv``, ``.parquet``,
``.las``/``.laz``, or with ``--cluster NAME`` on a running named cluster), ``up`` / ``down`` / ``ls`` (start a
named cluster with the data of a file and return once it serves; tear one down; list them) and ``bench`` (kNN
against scipy's cKDTree on generated data). ``distspatial <command> --help`` lists the options.

Geographic data: ``--crs EPSG:4326`` (or a GeoParquet input, whose CRS comes from the file) makes the coordinate
columns longitude, latitude in degrees; every distance, ``--radius`` and ``--eps`` is then in metres (great circle
on the mean Earth radius), and results come back as longitude/latitude.

Exit status: 0 success; 1 failure (a runtime error, or a check that did not hold); 2 bad usage or bad input
(an unknown option, a missing file or column, a non-numeric or non-finite value), reported as one line on stderr;
130 interrupted. ``--traceback`` shows the full traceback instead of the one-line message.

Adding a command is a function decorated with :func:`subcommand`: it receives a :class:`Session` whose
``cluster`` holds the distributed input (``points``, ``ids`` and ``columns`` are on the session too) and
returns the exit status; ``prepare`` (optional) runs after the input is read and before Ray starts, to
read and check further inputs so that mistakes fail fast. For example::

    @subcommand("dbscan", "density-based clustering", output="id, label",
                arguments=[arg("--eps", type=_positive_float, required=True), arg("--min-samples", type=int)])
    def _dbscan(s: Session) -> int:
        labels = s.cluster.distributed_dbscan(s.args.eps, s.args.min_samples)
        s.emit(labels_table(labels, s.ids), "labels")
        return 0
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

__all__ = ["main", "run_demo", "subcommand", "arg", "Session", "SUBCOMMANDS"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _brute_knn(points: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The k smallest distances of each query by brute force (numpy), a few queries at a time."""
    out = np.empty((len(queries), k))
    step = max(1, 2_000_000 // max(1, len(points)))
    for a in range(0, len(queries), step):
        q = queries[a : a + step]
        d2 = ((points[None, :, :] - q[:, None, :]) ** 2).sum(axis=2)
        part = np.partition(d2, k - 1, axis=1)[:, :k]
        out[a : a + step] = np.sqrt(np.sort(part, axis=1))
    return out


def check_kmeans(points: np.ndarray, centroids: np.ndarray, labels: np.ndarray, inertia: float, converged: bool,
                 block: int = 200_000) -> list[str]:
    """Check a k-means answer with NumPy alone (not with the library's own sums): every point's label is its
    nearest centroid (points numerically equidistant from two centroids may take either), the inertia is the
    sum of squared distances to the nearest centroids, and, when the run converged (labels stable), every
    centroid is the mean of the points labelled with it. Returns the problems found (empty: all hold).

    Costs one pass over the points with ``len(centroids)`` distances each, in blocks of ``block`` rows.
    """
    n, d = points.shape
    k = len(centroids)
    problems: list[str] = []
    labels = np.asarray(labels)
    if labels.shape != (n,) or centroids.shape != (k, d):
        return [f"shapes: labels {labels.shape}, centroids {centroids.shape} for {n} points of dimension {d}"]
    if n and (labels.min() < 0 or labels.max() >= k):
        return [f"labels outside [0, {k})"]
    wrong = ties = 0
    first_wrong = -1
    own = 0.0
    for a in range(0, n, block):
        x = points[a:a + block]
        d2 = ((x[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
        if k > 1:
            two = np.partition(d2, 1, axis=1)[:, :2]
            best, second = two.min(axis=1), two.max(axis=1)
            tied = second - best <= 1e-9 * (1.0 + second)
        else:
            best, tied = d2[:, 0], np.zeros(len(x), dtype=bool)
        got = d2[np.arange(len(x)), labels[a:a + block]]
        bad = (got > best) & ~tied
        if bad.any() and first_wrong < 0:
            first_wrong = a + int(np.flatnonzero(bad)[0])
        wrong += int(bad.sum())
        ties += int(tied.sum())
        own += float(best.sum())
    if wrong:
        problems.append(f"{wrong:,} points are not labelled with their nearest centroid (first: row {first_wrong})")
    if not np.isclose(own, inertia, rtol=1e-6, atol=1e-12):
        problems.append(f"inertia {inertia:.9g}, but the points' squared distances to their nearest centroids sum to "
                        f"{own:.9g}")
    if converged:
        counts = np.bincount(labels, minlength=k)
        sums = np.stack([np.bincount(labels, weights=points[:, j], minlength=k) for j in range(d)], axis=1)
        full = counts > 0
        means = sums[full] / counts[full, None]
        scale = 1.0 + float(np.abs(points).max()) if n else 1.0
        off = np.abs(means - centroids[full]).max(axis=1) > 1e-9 * scale
        if off.any():
            j = int(np.flatnonzero(full)[np.flatnonzero(off)[0]])
            problems.append(f"{int(off.sum())} centroids are not the mean of their points (first: centroid {j})")
    return problems


def run_demo(
    n_points: int = 1_000_000,
    nodes: int = 4,
    n_queries: int = 100_000,
    k: int = 10,
    clusters: int = 8,
    curve: str = "hilbert",
    address: str | None = None,
    checks: int = 200,
    seed: int = 0,
    out=sys.stdout,
) -> bool:
    """Generate skewed points, distribute, run k-means and batched kNN, check against brute force; report."""
    from .. import DistributedSpatialCluster
    from .. import NodeConfig
    from ..io.datasets import skewed_points

    def say(msg: str) -> None:
        print(msg, file=out, flush=True)

    t0 = time.perf_counter()
    pts = skewed_points(n_points, 2, seed=seed)
    queries = skewed_points(n_queries, 2, seed=seed, sample_seed=seed + 1)
    say(f"generated {n_points:,} skewed 2-D points and {n_queries:,} queries in {time.perf_counter() - t0:.2f} s")
    cfg = NodeConfig().with_node_count(nodes).with_curve(curve).with_address(address)
    ok = True
    with DistributedSpatialCluster(cfg) as cluster:
        say(f"started {cluster!r}")
        t = time.perf_counter()
        cluster.distribute_data(pts)
        say(f"distribute_data: {time.perf_counter() - t:.2f} s -> {cluster!r}")

        t = time.perf_counter()
        max_iter = 100
        res = cluster.distributed_kmeans(clusters, max_iter, tol=0, seed=seed)  # tol=0: until labels settle
        say(f"distributed_kmeans(k={clusters}): {res.n_iter} iterations in {time.perf_counter() - t:.2f} s "
            f"(init {res.init_seconds:.2f} s), inertia {res.inertia:.6g}")
        converged = res.n_iter < max_iter
        problems = check_kmeans(pts, res.centroids, res.labels, res.inertia, converged)
        say("  checked with numpy: labels are the nearest centroids, inertia "
            + ("and centroids are the means of their points" if converged else
               f"(not converged in {max_iter} iterations: centroids not checked)")
            + (": exact" if not problems else ": WRONG"))
        for p in problems:
            say(f"  MISMATCH: {p}")
        ok &= not problems

        t = time.perf_counter()
        dist, ids = cluster.distributed_knn_search(queries, k)
        dt = time.perf_counter() - t
        say(f"batched kNN: {n_queries:,} queries, k={k}, in {dt:.2f} s ({n_queries / dt:,.0f} queries/s)")
        rng = np.random.default_rng(seed)
        sample = rng.choice(n_queries, size=min(checks, n_queries), replace=False)
        ref = _brute_knn(pts, queries[sample], k)
        exact_d = np.allclose(dist[sample], ref, rtol=0, atol=1e-12)
        own = np.sqrt(((pts[ids[sample]] - queries[sample][:, None, :]) ** 2).sum(axis=2))
        exact_i = np.allclose(own, dist[sample], rtol=0, atol=1e-12)
        say(f"  checked {len(sample)} queries against brute force: distances {'exact' if exact_d else 'WRONG'}, "
            f"ids {'consistent' if exact_i else 'WRONG'}")
        ok &= exact_d and exact_i

        d1, i1 = cluster.distributed_knn_search(queries[0], k)
        single_ok = bool(np.allclose(d1, _brute_knn(pts, queries[:1], k)[0], rtol=0, atol=1e-12))
        say(f"single-point kNN: {'exact' if single_ok else 'WRONG'}")
        ok &= single_ok
        r = float(np.median(dist[:, -1]))
        t = time.perf_counter()
        got = cluster.range_search(queries[:100], r)
        dt = time.perf_counter() - t
        want = [np.flatnonzero(((pts - q) ** 2).sum(axis=1) <= r * r) for q in queries[:100]]
        range_ok = all(np.array_equal(g, w) for g, w in zip(got, want))
        say(f"range_search: 100 balls of radius {r:.4g} in {dt * 1e3:.1f} ms, "
            f"{sum(len(g) for g in got):,} hits, {'exact' if range_ok else 'WRONG'}")
        ok &= range_ok
        say("")
        say(str(cluster.statistics()))
    say("")
    say(f"demo {'PASSED' if ok else 'FAILED'}: every checked answer {'equals' if ok else 'does NOT equal'} "
        f"the brute-force reference; total {time.perf_counter() - t0:.1f} s")
    return ok



# -- argument types -------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not np.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text}")
    return v


def _positive_float(text: str) -> float:
    v = _nonneg_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _crs(text: str) -> str:
    """``--crs``: a CRS pyproj (or, without it, the built-in lon/lat names) recognises; its canonical name."""
    from ..core.crs import resolve_crs

    try:
        return resolve_crs(text).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _is_dir_output(text: str | None) -> bool:
    """``-o DIR/``: a directory of part files written by the nodes (knn and range)."""
    return bool(text) and (text.endswith(("/", os.sep)) or os.path.isdir(text))


def _output_path(text: str) -> str:
    from ..io.files import GEO_WRITE_SUFFIX, DataFileError, WRITE_FORMATS, detect_format

    if _is_dir_output(text) or text.lower().endswith(GEO_WRITE_SUFFIX):
        return text
    try:
        detect_format(text, WRITE_FORMATS)
    except DataFileError as exc:
        raise argparse.ArgumentTypeError(f"{exc.problem} in {text!r}: {exc.fix}") from None
    return text


def _plot_path(text: str) -> str:
    """``--plot`` target: an image name matplotlib writes; matplotlib must be installed."""
    import importlib.util

    if os.path.splitext(text)[1].lower() not in (".png", ".svg", ".pdf", ".jpg", ".jpeg"):
        raise argparse.ArgumentTypeError(f"{text!r}: plots are written as .png, .svg, .pdf or .jpg; name the file so")
    if importlib.util.find_spec("matplotlib") is None:
        raise argparse.ArgumentTypeError("--plot needs matplotlib: pip install 'distspatial[plots]'")
    return text


def _save_plot(s: Session, fig: Any) -> None:
    fig.savefig(s.args.plot, dpi=120)
    s.say(f"wrote the plot to {s.args.plot}")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# -- subcommand registry ----------------------------------------------------------------------------------------
def arg(*flags: str, **kwargs: Any) -> tuple[tuple[str, ...], dict]:
    """One ``add_argument`` call for :func:`subcommand`'s ``arguments``."""
    return flags, kwargs


@dataclass
class Subcommand:
    name: str
    help: str
    run: Callable[[Session], int]
    arguments: list = field(default_factory=list)
    data: bool = True  # takes an input point file and distributes it before ``run``
    output: str = ""  # what --output holds
    prepare: Callable[[Session], None] | None = None
    named: bool = False  # ``up``: NAME first; the named cluster created keeps running after the command


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, help: str, *, arguments: list | None = None, data: bool = True, output: str = "",
               prepare: Callable[[Session], None] | None = None, named: bool = False):
    """Register ``fn(session) -> exit status`` as ``distspatial NAME``.

    Args:
        arguments: ``arg(...)`` entries added to the command's parser.
        data: the command reads an input point file (``INPUT``, ``--columns``, ``--id-column``) and distributes it
            before ``fn`` runs; ``False`` for commands that make their own data (``bench``).
        output: what ``--output`` holds (shown in ``--help``).
        prepare: called after the input is read and before Ray starts (read and check more files).
    """

    def register(fn: Callable[[Session], int]) -> Callable[[Session], int]:
        SUBCOMMANDS[name] = Subcommand(name, help, fn, list(arguments or []), data, output, prepare, named)
        return fn

    return register


@dataclass
class Session:
    """What a subcommand works with: parsed ``args``, the input (``points``, ``ids``, ``columns``), the running
    ``cluster``, and helpers to print (``say``), time steps (``timed``) and write results (``emit``)."""

    args: argparse.Namespace
    out: Any = None
    points: np.ndarray | None = None
    ids: np.ndarray | None = None
    columns: list[str] = field(default_factory=list)
    n_points: int | None = None  # known before distribution unless out of core on a CSV
    dim: int = 0
    cluster: Any = None
    extra: dict = field(default_factory=dict)  # whatever ``prepare`` read (queries, ...)

    @property
    def progress(self) -> bool:
        return not getattr(self.args, "no_progress", False)

    def say(self, msg: str = "") -> None:
        print(msg, file=self.out or sys.stdout, flush=True)

    def timed(self, label: str) -> _Timed:
        return _Timed(self, label)

    def row_ids(self) -> np.ndarray:
        """The ids results speak in (in the order of algorithm labels): the id column's values, else the input
        row numbers; out of core, the cluster's ``point_ids()``."""
        if self.points is None:
            return self.cluster.point_ids()
        return self.ids if self.ids is not None else np.arange(len(self.points), dtype=np.int64)

    def sample(self, n: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
        """``(rows into row_ids(), points)`` of at most ``n`` points, for plots (from the cluster out of core)."""
        if self.points is not None:
            return np.arange(len(self.points)), self.points
        ids, pts = self.cluster.sample_points(n, seed=0)
        return self.cluster.runtime.rows_of_ids(ids), pts

    def read(self, path: str, columns: Any = None, id_column: str | None = None, what: str = "input"):
        """``(points, ids, source)`` of a point file, read in chunks with a progress bar."""
        from ..io.files import open_points
        from ..core.progress import progress_bar

        src = open_points(path, columns, id_column)
        with progress_bar(src.n_rows, f"reading {os.path.basename(path)}", self.progress, unit="pts") as bar:
            pts, ids = src.read(getattr(self.args, "chunk_rows", None), bar.update)
        return pts, ids, src

    def emit(self, table: dict, what: str, preview_rows: int = 10, points: np.ndarray | None = None) -> None:
        """Write ``table`` to ``--output`` if given, else print its first rows. ``points``: each row's point, the
        geometry of a ``.geoparquet`` output (default: the points of the rows' ids, from the input read)."""
        from ..io.files import write_results

        n = len(next(iter(table.values()))) if table else 0
        path = getattr(self.args, "output", None)
        if _is_dir_output(path):
            raise ValueError(f"--output {path} (a directory of part files written by the nodes) works with knn and "
                             f"range only; give a .parquet or .csv file for the {what}")
        if path:
            from ..io.files import GEO_WRITE_SUFFIX

            if points is None or not path.lower().endswith(GEO_WRITE_SUFFIX):
                points = self._geometry(table, path)
            with self.timed(f"wrote {n:,} rows of {what} ({', '.join(table)}"
                            f"{', geometry' if points is not None else ''}) to {path}"):
                write_results(path, table, points=points,
                              crs=getattr(self.cluster, "crs", None) if points is not None else None)
            return
        self.say(f"{what}: {n:,} rows; first {min(n, preview_rows)}:")
        self.say(_preview(table, preview_rows))
        if n > preview_rows:
            self.say(f"... (--output FILE.parquet or FILE.csv writes all {n:,} rows)")


    @property
    def geographic(self) -> bool:
        """The data set is longitude/latitude (distances in metres)."""
        return bool(getattr(self.cluster, "geographic", False))

    @property
    def units(self) -> str:
        """What distances are measured in, for messages: ``"m"`` for geographic data, else ``""``."""
        return " m" if self.geographic else ""

    def _geometry(self, table: dict, path: str) -> np.ndarray | None:
        """``-o x.geoparquet``: the coordinates of each row's point (its ``id``) as read from the input, for the
        GeoParquet geometry column; ``None`` for other outputs."""
        from ..io.files import GEO_WRITE_SUFFIX

        if not path.lower().endswith(GEO_WRITE_SUFFIX):
            return None
        if "id" not in table:
            raise ValueError(f"--output {path}: these results have no point ids to draw a geometry from; write "
                             ".parquet or .csv")
        if self.points is None:
            raise ValueError(f"--output {path}: a GeoParquet result takes the points' coordinates from the input "
                             "read into this process, which was loaded by the nodes here; write .parquet or .csv "
                             "(join the coordinates afterwards), or load the input in memory")
        ids = np.asarray(table["id"], dtype=np.int64)
        if self.ids is None:
            return self.points[ids]
        order = np.argsort(self.ids, kind="stable")
        return self.points[order[np.searchsorted(self.ids, ids, sorter=order)]]


class _Timed:
    def __init__(self, session: Session, label: str) -> None:
        self.session, self.label = session, label

    def __enter__(self) -> _Timed:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, *rest: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        if exc_type is None:
            self.session.say(f"{self.label}: {self.seconds:.2f} s")


def _preview(table: dict, rows: int) -> str:
    names = list(table)
    cells = [names]
    n = len(table[names[0]]) if names else 0
    for r in range(min(n, rows)):
        row = []
        for c in names:
            v = table[c][r]
            row.append(f"{v:.6g}" if isinstance(v, (float, np.floating)) else str(v))
        cells.append(row)
    widths = [max(len(line[j]) for line in cells) for j in range(len(names))]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in cells)


# -- the commands -----------------------------------------------------------------------------------------------
def _read_queries(s: Session) -> None:
    """``--queries FILE``: columns ``--query-columns``, else ``--columns`` when the file has them all, else every
    column but ``--query-id-column``."""
    from ..io.files import open_points

    a = s.args
    cols = a.query_columns
    if cols is None and a.columns is not None:
        probe = open_points(a.queries, None, a.query_id_column)
        cols = s.columns if all(c in probe.available for c in s.columns) else None
    q, qids, src = s.read(a.queries, cols, a.query_id_column, "queries")
    if q.shape[1] != s.dim:
        from ..io.files import DataFileError

        raise DataFileError(a.queries, f"the queries have {q.shape[1]} coordinate column(s) ({', '.join(src.columns)})"
                            f" but the input has {s.dim} ({', '.join(s.columns)})",
                            "choose matching columns with --query-columns")
    s.extra["queries"], s.extra["query_ids"] = q, qids


def _check_k(s: Session) -> None:
    if s.n_points is not None and s.args.k > s.n_points:
        raise ValueError(f"-k {s.args.k} is larger than the number of input points ({s.n_points}); "
                         f"use -k <= {s.n_points}")


def _prepare_knn(s: Session) -> None:
    _check_k(s)
    _prepare_queries(s)


def _prepare_queries(s: Session) -> None:
    """Read the queries here, unless ``-o DIR/``: then the nodes read them and write the answers."""
    if _is_dir_output(getattr(s.args, "output", None)):
        if s.args.query_id_column:
            raise ValueError("--query-id-column does not apply with --output DIR/: the part files name each query by "
                             "its row in the query file(s)")
        return
    _read_queries(s)


_QUERY_ARGS = [
    arg("--queries", required=True, metavar="FILE", help="query points (same formats as INPUT)"),
    arg("--query-columns", metavar="A,B", help="coordinate columns of the query file (default: --columns if the "
        "file has them, else all but --query-id-column)"),
    arg("--query-id-column", metavar="NAME", help="column labelling each query in the output (default: its row)"),
]


@subcommand("knn", "exact k nearest neighbours of every query point", prepare=_prepare_knn,
            output="query, rank (1 = nearest), id, distance (metres for a geographic CRS): one row per neighbour",
            arguments=[*_QUERY_ARGS, arg("-k", type=_positive_int, default=10, help="neighbours per query (10)")])
def _knn(s: Session) -> int:
    from ..io.files import knn_table

    a = s.args
    if _is_dir_output(getattr(a, "output", None)):
        with s.timed(f"knn: {a.queries} -> {a.output} (part files written by the nodes), k={a.k}"):
            s.cluster.knn_join(a.queries, a.k, output=a.output, columns=a.query_columns or a.columns)
        s.say(f"wrote part-<node>-<n>.parquet files (query = row in the query file(s), rank (1 = nearest), id, "
              f"distance) to {a.output}")
        return EXIT_OK
    q = s.extra["queries"]
    with s.timed(f"knn: {len(q):,} queries, k={s.args.k}"):
        dist, ids = s.cluster.distributed_knn_search(q, s.args.k)
    s.emit(knn_table(dist, ids, s.extra["query_ids"]), "neighbours")
    return EXIT_OK


@subcommand("range", "every point within a radius of each query point", prepare=_prepare_queries,
            output="query, id, distance (metres for a geographic CRS): one row per point found, sorted by query then "
                   "id (DIR/: within each part file)",
            arguments=[*_QUERY_ARGS, arg("--radius", type=_nonneg_float, required=True,
                                         help="ball radius: in metres (great circle) for a geographic CRS (--crs "
                                              "EPSG:4326 or a lon/lat GeoParquet input), else in the coordinates' "
                                              "units")])
def _range(s: Session) -> int:
    from ..io.files import range_table

    a = s.args
    if _is_dir_output(getattr(a, "output", None)):
        with s.timed(f"range: {a.queries} -> {a.output} (part files written by the nodes), radius {a.radius:g}"):
            s.cluster.range_search(a.queries, a.radius, output=a.output, columns=a.query_columns or a.columns)
        s.say(f"wrote part-<node>-<n>.parquet files (query = row in the query file(s), id, distance; sorted by "
              f"query then id within each file) to {a.output}")
        return EXIT_OK
    q = s.extra["queries"]
    with s.timed(f"range: {len(q):,} balls of radius {s.args.radius:g}{s.units}"):
        found = s.cluster.range_search(q, s.args.radius, return_points=True)
    hits = [ids for ids, _ in found]
    dists = _hit_distances(q, [pts for _, pts in found], s.geographic)
    s.say(f"points found: {sum(len(h) for h in hits):,} in total")
    s.emit(range_table(hits, dists, s.extra["query_ids"]), "points found")
    return EXIT_OK


def _hit_distances(centres: np.ndarray, points: list[np.ndarray], geographic: bool) -> list[np.ndarray]:
    """The distance of every hit to its centre, in one vectorized pass: great-circle metres for lon/lat, else
    Euclidean."""
    from ..core.geo import great_circle_metres

    counts = np.fromiter((len(p) for p in points), dtype=np.int64, count=len(points))
    if not counts.sum():
        return [np.empty(0) for _ in points]
    allp = np.concatenate([np.asarray(p).reshape(-1, centres.shape[1]) for p in points])
    c = np.repeat(centres, counts, axis=0)
    d = great_circle_metres(allp, c) if geographic else np.sqrt(((allp - c) ** 2).sum(axis=1))
    return np.split(d, np.cumsum(counts)[:-1])


@subcommand("kmeans", "distributed k-means (k-means|| init, Lloyd iterations)", prepare=_check_k,
            output="id, label: one row per input point",
            arguments=[
                arg("-k", type=_positive_int, default=8, help="clusters (8)"),
                arg("--max-iter", type=_positive_int, default=300, help="Lloyd iterations at most (300)"),
                arg("--tol", type=_nonneg_float, default=1e-4, help="relative tolerance, 0 = until labels settle"),
                arg("--init", choices=["k-means||", "random"], default="k-means||"),
                arg("--seed", type=_nonneg_int, default=None, help="random seed (default: nondeterministic)"),
                arg("--centroids", type=_output_path, metavar="PATH", help="also write the centroids here"),
                arg("--plot", type=_plot_path, metavar="PNG", help="also draw the clusters into this image "
                    "(.png/.svg/.pdf; needs distspatial[plots])"),
            ])
def _kmeans(s: Session) -> int:
    from ..io.files import centroids_table, labels_table, write_results

    a = s.args
    with s.timed(f"kmeans: k={a.k}"):
        res = s.cluster.distributed_kmeans(a.k, a.max_iter, tol=a.tol, init=a.init, seed=a.seed)
    sizes = np.bincount(res.labels, minlength=a.k)
    s.say(f"{res.n_iter} iterations, inertia {res.inertia:.6g}; cluster sizes min {sizes.min():,} "
          f"max {sizes.max():,}")
    cent = centroids_table(res.centroids, s.columns)
    if a.centroids:
        write_results(a.centroids, cent)
        s.say(f"wrote {len(res.centroids)} centroids to {a.centroids}")
    else:
        s.say("centroids:")
        s.say(_preview(cent, 50))
    s.emit(labels_table(res.labels, s.row_ids()), "labels")
    if a.plot:
        from .plots import plot_clusters

        rows, pts = s.sample()
        _save_plot(s, plot_clusters(pts, res.labels[rows], res.centroids, geographic=s.geographic))
    return EXIT_OK


@subcommand("dbscan", "exact DBSCAN (the same clusters as scikit-learn's), labels per point",
            output="id, label: one row per input point (-1 = noise)",
            arguments=[
                arg("--eps", type=_positive_float, required=True,
                    help="neighbourhood radius (metres for a geographic CRS)"),
                arg("--min-samples", type=_positive_int, default=5, help="points within eps that make a core point"
                    " (5, the point itself included)"),
                arg("--plot", type=_plot_path, metavar="PNG", help="also draw the clusters into this image"),
            ])
def _dbscan(s: Session) -> int:
    from ..io.files import labels_table

    a = s.args
    with s.timed(f"dbscan: eps={a.eps}{s.units}, min_samples={a.min_samples}"):
        res = s.cluster.distributed_dbscan(a.eps, a.min_samples)
    s.say(f"{res.n_clusters} clusters, {len(res.core_sample_indices):,} core points, {res.n_noise:,} noise points")
    s.emit(labels_table(res.labels, s.row_ids()), "labels")
    if a.plot:
        from .plots import plot_clusters

        rows, pts = s.sample()
        _save_plot(s, plot_clusters(pts, res.labels[rows], geographic=s.geographic))
    return EXIT_OK


@subcommand("hierarchical", "multi-level Ward clustering (micro-clusters on the nodes, Ward on the coordinator)",
            output="id, label: one row per input point",
            arguments=[
                arg("--n-clusters", type=_positive_int, default=None, help="clusters to cut the tree into"),
                arg("--distance-threshold", type=_nonneg_float, default=None,
                    help="or: cut at this Ward height (not for a geographic CRS: use --n-clusters)"),
                arg("--micro-clusters", type=_positive_int, default=2000, help="leaves of the tree (2000)"),
                arg("--linkage-output", type=_output_path, metavar="PATH",
                    help="also write the linkage matrix (idx1, idx2, distance, count) here"),
                arg("--plot", type=_plot_path, metavar="PNG", help="also draw the clusters into this image"),
            ])
def _hierarchical(s: Session) -> int:
    from ..io.files import labels_table, write_results

    a = s.args
    if (a.n_clusters is None) == (a.distance_threshold is None):
        raise ValueError("give exactly one of --n-clusters and --distance-threshold")
    with s.timed("hierarchical (ward)"):
        res = s.cluster.distributed_hierarchical(a.n_clusters, a.distance_threshold,
                                                 n_micro_clusters=a.micro_clusters)
    s.say(f"{res.n_clusters} clusters from {len(res.micro_counts):,} micro-clusters")
    if a.linkage_output:
        Z = res.linkage
        write_results(a.linkage_output, {"idx1": Z[:, 0].astype(np.int64), "idx2": Z[:, 1].astype(np.int64),
                                         "distance": Z[:, 2], "count": Z[:, 3].astype(np.int64)})
    s.emit(labels_table(res.labels, s.row_ids()), "labels")
    if a.plot:
        from .plots import plot_clusters

        rows, pts = s.sample()
        _save_plot(s, plot_clusters(pts, res.labels[rows], geographic=s.geographic))
    return EXIT_OK


POLYGON_SUFFIXES = {".parquet": "geoparquet", ".geoparquet": "geoparquet", ".pq": "geoparquet",
                    ".geojson": "geojson", ".json": "geojson", ".wkt": "wkt", ".txt": "wkt"}


def read_polygon_file(path: str) -> tuple[np.ndarray, Any]:
    """``(polygons, crs)`` of a polygon file: GeoParquet (its primary geometry column and its CRS), GeoJSON (a
    FeatureCollection, a Feature or a geometry; longitude/latitude by RFC 7946: crs ``None`` here, not checked) or
    WKT (one Polygon / MultiPolygon per non-empty line). Every row must be a Polygon or MultiPolygon; errors name
    the file and the row (a :class:`~distspatial.io.files.DataFileError`, a ValueError)."""
    import json

    from ..algorithms.polygons import as_polygons
    from ..io.files import DataFileError

    ext = os.path.splitext(path)[1].lower()
    kind = POLYGON_SUFFIXES.get(ext)
    if kind is None:
        raise DataFileError(path, f"{ext or 'no suffix'} is not a polygon file format this command reads",
                            "give GeoParquet (.parquet, .geoparquet), GeoJSON (.geojson, .json) or WKT (.wkt, one "
                            "polygon per line)")
    if not os.path.isfile(path):
        raise DataFileError(path, "no such file", "check the path of POLYGONS")
    crs = None
    try:
        if kind == "geoparquet":
            import pyarrow.parquet as pq

            from ..io.geoparquet import _CRS84

            geoms = as_polygons(path)
            geo = json.loads((pq.read_schema(path).metadata or {}).get(b"geo", b"{}") or b"{}")
            col = geo.get("columns", {}).get(geo.get("primary_column", ""), {})
            crs = col.get("crs", _CRS84) if col else None
            if isinstance(crs, dict):
                ident = crs.get("id") or {}
                crs = f"{ident['authority']}:{ident['code']}" if "authority" in ident else json.dumps(crs)
        elif kind == "geojson":
            with open(path, encoding="utf-8") as f:
                try:
                    obj = json.load(f)
                except json.JSONDecodeError as exc:
                    raise DataFileError(path, f"not valid JSON ({exc.msg} at line {exc.lineno})",
                                        "give a GeoJSON FeatureCollection, Feature or Polygon geometry") from None
            if not isinstance(obj, dict) or "type" not in obj:
                raise DataFileError(path, "not a GeoJSON object (no 'type')",
                                    "give a GeoJSON FeatureCollection, Feature or Polygon geometry")
            geoms = as_polygons(obj)
        else:
            with open(path, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
            geoms = as_polygons([line for line in lines if line])
    except DataFileError:
        raise
    except (ValueError, TypeError) as exc:
        raise DataFileError(path, " ".join(str(exc).split()), "every row must be a Polygon or MultiPolygon") from None
    return geoms, crs


def _prepare_polygons(s: Session) -> None:
    """Read and check POLYGONS before Ray starts: the format, every geometry, and its CRS against the points'."""
    from ..core.crs import resolve_crs

    a = s.args
    if s.dim != 2:
        raise ValueError(f"polygon queries take 2-D points (x, y) or longitude/latitude; the input has {s.dim} "
                         f"dimensions ({', '.join(s.columns)}): pick two with --columns")
    if a.count and a.output and a.output.lower().endswith(".geoparquet"):
        raise ValueError(f"--count writes one row per polygon (polygon, count): give --output as .parquet or .csv, "
                         f"not {a.output}")
    geoms, crs = read_polygon_file(a.polygons)
    points_crs = getattr(s.cluster, "crs", None) if s.cluster is not None else None
    points_crs = points_crs or getattr(a, "crs", None) or s.extra.get("crs")
    if crs is not None and points_crs is not None:
        try:
            pc, qc = resolve_crs(points_crs).name, resolve_crs(crs).name
        except ValueError:
            pc = qc = None
        if pc is not None and pc != qc and not {pc, qc} <= {"EPSG:4326", "OGC:CRS84"}:
            raise ValueError(f"the polygons of {a.polygons} are in {qc}, the points in {pc}: reproject the polygons "
                             f"first (e.g. geopandas: gdf.to_crs({pc!r}).to_parquet(...))")
    s.extra["polygons"] = geoms
    s.say(f"read {len(geoms):,} polygons from {a.polygons}")


@subcommand("polygons", "which polygons each point lies in: a point-in-polygon join, as geopandas.sjoin "
            "(needs distspatial[geo])", prepare=_prepare_polygons,
            output="id, polygon (the polygon's 0-based row in POLYGONS), then the point's coordinates (INPUT's "
                   "coordinate columns; .geoparquet: as the geometry column): one row per point and polygon it lies "
                   "in, sorted by id then polygon. --count: polygon, count (one row per polygon)",
            arguments=[
                arg("polygons", metavar="POLYGONS",
                    help="polygon file: GeoParquet (.parquet/.geoparquet), GeoJSON (.geojson/.json: a "
                         "FeatureCollection, Feature or geometry) or WKT (.wkt: one polygon per line); Polygons and "
                         "MultiPolygons, holes allowed, in the points' CRS (lon/lat for geographic data, edges "
                         "straight in lon/lat as in GeoPandas)"),
                arg("--predicate", choices=["within", "intersects"], default="within",
                    help="within: the polygon's interior (a point on an edge or vertex is not in it); intersects: "
                         "interior or boundary"),
                arg("--count", action="store_true", help="write the number of points per polygon instead"),
            ])
def _polygons(s: Session) -> int:
    a = s.args
    geoms = s.extra["polygons"]
    if a.count:
        with s.timed(f"points_in_polygons: {len(geoms):,} polygons, predicate {a.predicate}, counts"):
            counts = s.cluster.points_in_polygons(geoms, a.predicate, aggregate="count")
        s.say(f"{int(counts.sum()):,} (point, polygon) pairs; {int((counts > 0).sum()):,} polygons hold points")
        s.emit({"polygon": np.arange(len(geoms), dtype=np.int64), "count": counts}, "counts per polygon")
        return EXIT_OK
    with s.timed(f"points_in_polygons: {len(geoms):,} polygons, predicate {a.predicate}"):
        join, pts = s.cluster.points_in_polygons(geoms, a.predicate, return_points=True)
    s.say(f"{len(join.id):,} (point, polygon) pairs; {len(np.unique(join.id)):,} points lie in some polygon")
    table = {"id": join.id, "polygon": join.polygon}
    path = getattr(a, "output", None)
    if not (path and path.lower().endswith(".geoparquet")):
        pts = np.asarray(pts).reshape(len(join.id), -1)
        names = ["lon", "lat"] if s.geographic and s.columns == ["x", "y"] else list(s.columns)
        for j, name in enumerate(names):
            table[name if name not in table else f"point_{name}"] = pts[:, j]
    s.emit(table, "points in polygons", points=np.asarray(pts))
    return EXIT_OK


@subcommand("stats", "distribute the input and print the cluster's statistics",
            output="one row per node: the statistics' per-node fields",
            arguments=[arg("--plot", type=_plot_path, metavar="PNG", help="also draw the partitions, their nodes and "
                           "the curve order into this image (.png/.svg/.pdf; needs distspatial[plots])")])
def _stats(s: Session) -> int:
    st = s.cluster.statistics()
    meta = s.cluster.metadata
    lo, hi = meta.lo, meta.hi
    if meta.geographic:
        where = ""
        if s.points is not None:
            lo, hi = s.points.min(axis=0), s.points.max(axis=0)
            where = f"; longitude {lo[0]:.6g} .. {hi[0]:.6g}, latitude {lo[1]:.6g} .. {hi[1]:.6g}"
        s.say(f"input: {meta.n_points:,} points, longitude/latitude ({', '.join(s.columns)}) in {meta.crs}: "
              f"distances in metres (great circle), stored as 3-D unit vectors{where}")
    else:
        s.say(f"input: {meta.n_points:,} points, {meta.dim} dimensions ({', '.join(s.columns)})"
              + (f" in {meta.crs}" if meta.crs else "")
              + f"; bounds {np.array2string(lo, precision=6)} .. {np.array2string(hi, precision=6)}")
    s.say(str(st))
    if s.args.output:
        rows = [dataclasses.asdict(n) for n in st.nodes]
        s.emit({k: np.array([r[k] for r in rows]) for k in rows[0]}, "node statistics")
    if s.args.plot:
        from .plots import plot_partitions

        _save_plot(s, plot_partitions(s.cluster, points=s.sample()[1]))
    return EXIT_OK


def _port(text: str) -> int:
    v = _nonneg_int(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0..65535, got {v}")
    return v


def _prepare_serve(s: Session) -> None:
    """Fail before Ray starts: the service's packages are there, the tokens can be read, the address may be
    served with them, and the port is free (the socket is kept)."""
    try:
        from .service import check_exposure, listen
    except ImportError as exc:
        raise RuntimeError(str(exc)) from None
    import warnings

    from ..core.access import TokenSet, load_token_file

    a = s.args
    if a.token is not None:
        raise ValueError("tokens are not taken on the command line, where 'ps' shows them to every user: put them "
                         "in a file given with --token-file FILE (lines 'read: TOKEN', 'write:NAME: TOKEN') or in "
                         "the DISTSPATIAL_TOKEN environment variable")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = load_token_file(a.token_file) if a.token_file else TokenSet.from_env()
    for w in caught:  # a token file others can read: say so, serve anyway
        print(f"distspatial serve: warning: {w.message}", file=sys.stderr)
    if a.insecure_no_auth and tokens is not None:
        raise ValueError("--insecure-no-auth with tokens configured (--token-file or DISTSPATIAL_TOKEN): choose one")
    check_exposure(a.host, tokens, a.read_only, a.insecure_no_auth)
    if a.on_nodes and (a.audit_log or a.low_latency):
        raise ValueError("--on-nodes serves from the nodes' processes: --audit-log (the nodes log writes to their "
                         "own Ray logs) and --low-latency (their answers are local already) do not apply")
    s.extra["tokens"] = tokens
    if a.audit_log:
        import logging

        from .service import audit_log

        handler = logging.FileHandler(a.audit_log, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        audit_log.addHandler(handler)
        audit_log.setLevel(logging.INFO)
        audit_log.propagate = False
    s.extra["socket"] = listen(a.host, a.port)


@subcommand("serve", "serve HTTP queries (kNN, range, box, ingest) and a live status page over the input "
            "(needs distspatial[serve])", prepare=_prepare_serve,
            arguments=[
                arg("--host", default="127.0.0.1", help="address to listen on (127.0.0.1; 0.0.0.0: every interface)"),
                arg("--port", type=_port, default=8000, help="TCP port (8000; 0: a free one, printed at start)"),
                arg("--workers", type=_positive_int, default=8, help="threads running cluster calls (8)"),
                arg("--max-body-mb", type=_positive_float, default=64.0, help="largest request body in MiB (64)"),
                arg("--batch-wait-ms", type=_nonneg_float, default=1.0,
                    help="concurrent /knn (and /range, /box) requests are gathered into one cluster call: the first "
                         "of a batch waits at most this long for others (1.0; 0: no wait)"),
                arg("--max-batch", type=_positive_int, default=256,
                    help="most query points in one gathered batch; a request with more goes alone (256)"),
                arg("--no-coalesce", action="store_true", help="one cluster call per request (no gathering)"),
                arg("--on-nodes", action="store_true",
                    help="run the service in every node's process on --port (SO_REUSEPORT: the nodes of a machine "
                         "share the port), answering gathered batches from the partitions that node holds without "
                         "a Ray call; with --replication equal to --nodes every answer is local. Needs a "
                         "loopback --host or tokens as usual; not with --audit-log or --low-latency"),
                arg("--low-latency", action="store_true",
                    help="send small batches through Ray compiled graphs (DistributedSpatialCluster."
                         "set_low_latency): ~3x shorter round trips, but each node keeps a core busy while the "
                         "service runs; for machines with a core per node to spare"),
                arg("--max-queue", type=_positive_int, default=256,
                    help="requests admitted at once (queued or being answered); more get 503 with Retry-After at "
                         "once (256)"),
                arg("--body-timeout-s", type=_positive_float, default=10.0,
                    help="a request body not received this long after its headers gets 408 and the connection is "
                         "closed (10)"),
                arg("--request-timeout-s", type=_positive_float, default=30.0,
                    help="a request not answered this long after its headers gets 504 (30)"),
                arg("--token-file", metavar="FILE", default=None,
                    help="requests must carry 'Authorization: Bearer TOKEN' with a token of this file: lines "
                         "'read: TOKEN' (queries, status page) and 'write[:NAME]: TOKEN' (also ingest, delete); "
                         "chmod 600 it. Default: the write token in $DISTSPATIAL_TOKEN, if set"),
                arg("--read-only", action="store_true",
                    help="serve queries and the status page only; writes get 405 (a query replica)"),
                arg("--insecure-no-auth", action="store_true",
                    help="listen on a non-loopback --host without any token (anyone who reaches the port may "
                         "ingest and delete); without it such a --host needs --token-file or --read-only"),
                arg("--cors-origin", action="append", default=[], metavar="ORIGIN",
                    help="let web pages of ORIGIN (https://app.example.com; '*': any) call the service from a "
                         "browser (repeatable); default: no CORS"),
                arg("--audit-log", metavar="FILE", default=None,
                    help="append the audit log of writes (time, client, token name, endpoint, points) to FILE "
                         "(default: stderr)"),
                arg("--token", default=None, help=argparse.SUPPRESS),  # refused with a pointer to --token-file
            ])
def _serve(s: Session) -> int:
    from .service import run_server

    a = s.args
    options = dict(workers=a.workers, max_body_bytes=int(a.max_body_mb * 2**20), coalesce=not a.no_coalesce,
                   batch_wait_ms=a.batch_wait_ms, max_batch=a.max_batch, max_queue=a.max_queue,
                   body_timeout_s=a.body_timeout_s, request_timeout_s=a.request_timeout_s,
                   tokens=s.extra["tokens"], read_only=a.read_only, cors_origins=tuple(a.cors_origin))
    if a.on_nodes:
        from .service import run_on_nodes

        sock = s.extra["socket"]
        port = sock.getsockname()[1]
        sock.close()  # the nodes bind the port themselves
        run_on_nodes(s.cluster, a.host, port, **options,
                     on_ready=lambda url: s.say(f"serving on {url} from nodes {s.cluster.node_ids} (status page "
                                                f"{url}/, API docs {url}/docs); {_access_summary(s)}; Ctrl-C stops"))
        s.say("stopped serving")
        return EXIT_OK
    if a.low_latency:
        s.cluster.set_low_latency(True)
    run_server(s.cluster, a.host, a.port, sock=s.extra["socket"], insecure_no_auth=a.insecure_no_auth, **options,
               on_ready=lambda url: s.say(f"serving on {url} (status page {url}/, API docs {url}/docs); "
                                          f"{_access_summary(s)}; Ctrl-C stops"))
    s.say("stopped serving")
    return EXIT_OK


def _access_summary(s: Session) -> str:
    """How the service controls access, in a few words (token names, never tokens)."""
    a, tokens = s.args, s.extra.get("tokens")
    parts = []
    if tokens is not None:
        scopes = tokens.scopes()
        parts.append("tokens required (" + ", ".join(f"{scope}: {', '.join(names)}" for scope, names in scopes.items()
                                                     if names) + ")")
    else:
        parts.append("no tokens" + (" (--insecure-no-auth)" if a.insecure_no_auth else ""))
    if a.read_only:
        parts.append("read-only")
    if a.cors_origin:
        parts.append(f"CORS for {', '.join(a.cors_origin)}")
    return ", ".join(parts)


@subcommand("up", "start a named cluster holding INPUT's points and return once it serves; other commands then "
            "work on it with --cluster NAME, and 'distspatial down NAME' tears it down", named=True)
def _up(s: Session) -> int:
    c = s.cluster
    meta = c.metadata
    s.say(f"cluster {c.name!r} serves {meta.n_points:,} points of {meta.user_dim} dimensions"
          + (f" ({meta.crs}: longitude/latitude, distances in metres)" if meta.geographic else "")
          + f" in {meta.n_partitions} "
          f"partitions on {len(c.live_node_ids)} nodes; query it with --cluster {c.name} or "
          f"DistributedSpatialCluster.attach({c.name!r}); stop it with 'distspatial down {c.name}'")
    return EXIT_OK


@subcommand("bench", "quick benchmark: batched kNN against scipy's cKDTree on generated data", data=False,
            output="one row per measurement: name, seconds",
            arguments=[
                arg("--points", type=_positive_int, default=200_000, help="points to generate (200,000)"),
                arg("--queries", type=_positive_int, default=20_000, help="queries (20,000)"),
                arg("-k", type=_positive_int, default=10, help="neighbours per query (10)"),
                arg("--dim", type=_positive_int, default=2, help="dimensions (2)"),
                arg("--seed", type=_nonneg_int, default=0),
            ])
def _bench(s: Session) -> int:
    from scipy.spatial import cKDTree

    from ..io.datasets import skewed_points

    a = s.args
    if a.k > a.points:
        raise ValueError(f"-k {a.k} is larger than --points {a.points}")
    pts = skewed_points(a.points, a.dim, seed=a.seed)
    q = skewed_points(a.queries, a.dim, seed=a.seed, sample_seed=a.seed + 1)
    s.say(f"bench: {a.points:,} skewed {a.dim}-D points, {a.queries:,} queries, k={a.k}")
    with s.timed("cKDTree build") as t_build:
        tree = cKDTree(pts)
    with s.timed("cKDTree query (workers=-1)") as t_ref:
        ref_d, _ = tree.query(q, a.k, workers=-1)
    with s.timed("distribute_data") as t_dist:
        s.cluster.distribute_data(pts)
    s.cluster.distributed_knn_search(q[: min(100, len(q))], a.k)  # warm up (first call compiles/caches)
    with s.timed("distributed_knn_search") as t_knn:
        dist, _ = s.cluster.distributed_knn_search(q, a.k)
    exact = bool(np.allclose(dist.reshape(ref_d.shape), ref_d, rtol=0, atol=1e-12))
    ratio = t_knn.seconds / t_ref.seconds if t_ref.seconds > 0 else float("inf")
    s.say(f"query time ratio distributed / cKDTree: {ratio:.2f} "
          f"({a.queries / t_knn.seconds:,.0f} vs {a.queries / t_ref.seconds:,.0f} queries/s); "
          f"answers {'exact' if exact else 'WRONG'}")
    if s.args.output:
        s.emit({"name": np.array(["ckdtree_build", "ckdtree_query", "distribute", "distributed_query", "ratio"]),
                "seconds": np.array([t_build.seconds, t_ref.seconds, t_dist.seconds, t_knn.seconds, ratio])},
               "timings")
    return EXIT_OK if exact else EXIT_FAILED


# -- parser and driver ------------------------------------------------------------------------------------------
def _cluster_options() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    g = p.add_argument_group("cluster")
    g.add_argument("--nodes", type=_positive_int, default=None, metavar="N", help="logical nodes (default 4)")
    g.add_argument("--address", default=None, help="join an existing Ray cluster ('auto', 'ray://host:port'); "
                   "default: start an embedded local runtime (stopped at the end)")
    g.add_argument("--cluster", default=None, metavar="NAME",
                   help="work on the running named cluster NAME ('distspatial up', 'distspatial ls') instead of "
                        "loading INPUT (no INPUT then); --address says where it runs")
    g.add_argument("--curve", choices=["hilbert", "morton"], default="hilbert", help="space-filling curve")
    g.add_argument("--partitions", type=_positive_int, default=None, metavar="N",
                   help="partitions cut per node (default 4)")
    g.add_argument("--replication", type=_positive_int, default=None, metavar="R",
                   help="copies of each partition on distinct nodes (default 1; <= --nodes)")
    o = p.add_argument_group("output")
    o.add_argument("--output", "-o", type=_output_path, default=None, metavar="PATH",
                   help="write the results to PATH (.parquet or .csv; .geoparquet: with each row's point as "
                        "geometry); knn, range: DIR/ for part files written by the nodes")
    o.add_argument("--no-progress", action="store_true", help="no progress bars (they show only on a terminal)")
    o.add_argument("--traceback", action="store_true", help="show full tracebacks of errors")
    return p


def _input_options() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    g = p.add_argument_group("input")
    g.add_argument("input", metavar="INPUT", nargs="?", default=None,
                   help="point file (.npy, .csv/.tsv, .parquet (GeoParquet: its point geometry and CRS), .las/.laz), a "
                        "directory or glob of them, or a "
                        "URI (s3://, gs://, hdfs://); not with --cluster. Several files, or one over 32 MiB on "
                        "several nodes, are read by the nodes in parallel: on several machines every machine "
                        "must reach them")
    g.add_argument("--columns", metavar="X,Y[,Z]", default=None,
                   help="coordinate columns (default: all but --id-column; LAS/LAZ: x,y,z; plain .npy and "
                        "headerless CSV columns are named 0,1,...)")
    g.add_argument("--id-column", metavar="NAME", default=None,
                   help="integer id column; results report these ids (default: the input row number)")
    g.add_argument("--crs", type=_crs, default=None, metavar="CRS",
                   help="coordinate reference system of INPUT (EPSG:4326, OGC:CRS84, an EPSG code; others need "
                        "pyproj). A geographic one makes the coordinate columns longitude, latitude in degrees "
                        "(--columns lon,lat) and every distance, --radius and --eps great-circle metres; a projected "
                        "one is carried with the data. Default: a GeoParquet input's own CRS, else none (planar)")
    g.add_argument("--chunk-rows", type=_positive_int, default=None, metavar="N",
                   help="rows read per chunk (default 1,048,576)")
    g.add_argument("--out-of-core", action="store_true",
                   help="never hold the whole input on this machine: read it twice, chunk by chunk, and ingest "
                        "the chunks into the cluster (automatic when the file is larger than half the free memory; "
                        "inputs the nodes read in parallel never pass through this machine anyway)")
    g.add_argument("--read-here", action="store_true",
                   help="read the input in this process and send it to the nodes, never in parallel by the nodes "
                        "(for a file that only this machine has)")
    return p


def _add_demo(sub) -> argparse.ArgumentParser:
    demo = sub.add_parser("demo", help="distribute a skewed 1M-point set, run k-means and kNN, check and report")
    demo.add_argument("--points", type=int, default=1_000_000, help="points to generate (default 1,000,000)")
    demo.add_argument("--nodes", type=int, default=4, help="logical nodes (default 4)")
    demo.add_argument("--queries", type=int, default=100_000, help="batched kNN queries (default 100,000)")
    demo.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    demo.add_argument("--clusters", type=int, default=8, help="k-means clusters (default 8)")
    demo.add_argument("--curve", choices=["hilbert", "morton"], default="hilbert")
    demo.add_argument("--address", default=None, help="join an existing Ray cluster ('auto', 'ray://host:port')")
    demo.add_argument("--seed", type=int, default=0)
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distspatial", description="Distributed spatial index on Ray",
                     epilog="exit status: 0 ok, 1 failed, 2 bad usage or input, 130 interrupted")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.subcommand_parsers = {"demo": _add_demo(sub)}
    cluster = _cluster_options()
    inputs = _input_options()
    name = _Parser(add_help=False)
    name.add_argument("name", metavar="NAME", help="the cluster's name (letters, digits, '_', '-', '.')")
    for cmd in SUBCOMMANDS.values():
        parents = [inputs, cluster] if cmd.data else [cluster]
        if cmd.named:
            parents = [name] + parents
        epilog = f"--output holds: {cmd.output}" if cmd.output else None
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, parents=parents, epilog=epilog)
        for flags, kwargs in cmd.arguments:
            p.add_argument(*flags, **kwargs)
        parser.subcommand_parsers[cmd.name] = p
    down = sub.add_parser("down", help="tear a named cluster down (its nodes, controller and stored state)",
                          parents=[name])
    down.add_argument("--address", default=None, help="the Ray cluster it runs on (default: the local one)")
    ls = sub.add_parser("ls", help="list the named clusters running")
    ls.add_argument("--address", default=None, help="the Ray cluster to look at (default: the local one)")
    parser.subcommand_parsers.update(down=down, ls=ls)
    return parser


def _config(args: argparse.Namespace):
    from .. import NodeConfig

    cfg = NodeConfig()
    if args.nodes is not None:
        cfg = cfg.with_node_count(args.nodes)
    if args.partitions is not None:
        cfg = cfg.with_partitions_per_node(args.partitions)
    if args.replication is not None:
        if args.replication > cfg.node_count:
            raise ValueError(f"--replication {args.replication} needs at least that many nodes; "
                             f"--nodes is {cfg.node_count}")
        cfg = cfg.with_replication_factor(args.replication)
    if getattr(args, "crs", None) is not None:
        cfg = cfg.with_crs(args.crs)
    return cfg.with_curve(args.curve).with_address(args.address)


def _check_crs(s: Session, args: argparse.Namespace, file_crs: Any) -> Any:
    """The input's CRS (``--crs``, else a GeoParquet file's own; ``None``: none), checked before Ray starts: a
    ``--crs`` that contradicts the file's, or a geographic CRS on other than two columns, is refused. Says which
    CRS and units the run uses. Returns what ``distribute_data(crs=...)`` takes."""
    from ..core.crs import resolve_crs

    given = getattr(args, "crs", None)
    if given is not None and file_crs is not None:
        wgs84 = {"EPSG:4326", "OGC:CRS84"}  # the same lon/lat data (only the official axis order differs)
        try:
            found = resolve_crs(file_crs).name
            same = found == given or {found, given} <= wgs84
        except ValueError:
            same = False
        if not same:
            shown = file_crs if len(str(file_crs)) <= 60 else str(file_crs)[:60] + "..."
            raise ValueError(f"--crs {given} contradicts the CRS of {args.input} ({shown}): reprojection is not "
                             f"offered; drop --crs to use the file's, or reproject the file first")
    crs = given if given is not None else file_crs
    info = resolve_crs(crs) if crs is not None else None
    if info is not None and info.geographic:
        if s.dim != 2:
            raise ValueError(f"a geographic CRS ({info.name}) takes two coordinate columns, longitude and latitude; "
                             f"the input has {s.dim} ({', '.join(s.columns)}): pick them with --columns lon,lat")
        s.say(f"coordinates: longitude, latitude in degrees ({info.name}); distances in metres (great circle)")
    elif info is not None:
        s.say(f"coordinates: {info.name} ({info.description}), distances in {info.units}")
    return crs


def _run(cmd: Subcommand, args: argparse.Namespace, out) -> int:
    from .. import DistributedSpatialCluster

    s = Session(args, out)
    if cmd.data and cmd.named and args.cluster is not None:
        raise ValueError(f"'distspatial {cmd.name}' starts a cluster; --cluster works on one already running")
    if cmd.data and args.cluster is not None:
        if args.input is not None:
            raise ValueError(f"give INPUT or --cluster {args.cluster}, not both: a running cluster already holds "
                             "its data")
        return _run_on_cluster(cmd, s, DistributedSpatialCluster.attach(args.cluster, args.address))
    if cmd.data and args.input is None:
        raise ValueError("INPUT is missing: name a point file, or --cluster NAME for a running named cluster")
    cfg = _config(args)  # bad cluster options fail before any file is read
    if _is_dir_output(getattr(args, "output", None)) and cmd.name not in ("knn", "range"):
        raise ValueError(f"--output {args.output} (a directory of part files written by the nodes) works with knn "
                         "and range only; give a .parquet or .csv file")
    if cmd.named:
        cfg = cfg.with_name(args.name)
    out_of_core = parallel = False
    if cmd.data:
        parallel = _parallel_load(args, cfg)
        out_of_core = not parallel and _out_of_core(args)
    crs = None
    if cmd.data and parallel:
        from ..io.shares import source_crs

        _probe_files(s, args)
        crs = _check_crs(s, args, source_crs(args.input, args.columns))
    elif cmd.data and out_of_core:
        from ..io.files import open_points

        src = open_points(args.input, args.columns, args.id_column)
        s.columns, s.dim, s.n_points = src.columns, src.dim, src.n_rows
        s.say(f"out of core: {args.input} is read twice in chunks and ingested into the cluster")
        crs = _check_crs(s, args, src.geo.crs_input if src.geo is not None else None)
    elif cmd.data:
        s.points, s.ids, src = s.read(args.input, args.columns, args.id_column)
        s.columns, s.dim, s.n_points = src.columns, s.points.shape[1], len(s.points)
        s.say(f"read {len(s.points):,} points of {s.points.shape[1]} dimensions ({', '.join(s.columns)}) "
              f"from {args.input}")
        crs = _check_crs(s, args, src.geo.crs_input if src.geo is not None else None)
    s.extra["crs"] = crs
    if cmd.prepare is not None:
        cmd.prepare(s)
    cluster = DistributedSpatialCluster(cfg)
    try:
        s.cluster = cluster
        if cmd.data and parallel:
            with s.timed(f"distribute_files over {cfg.node_count} nodes"):
                meta = cluster.distribute_files(args.input, args.columns, args.id_column, crs=crs)
            s.n_points = meta.n_points
            s.say(f"the nodes read {meta.n_points:,} points of {meta.dim} dimensions ({', '.join(s.columns)}) "
                  f"from {args.input}")
        elif cmd.data and out_of_core:
            with s.timed(f"distribute_chunks over {cfg.node_count} nodes"):
                cluster.distribute_chunks(args.input, args.columns, args.id_column, args.chunk_rows or (1 << 20),
                                          crs=crs)
            s.n_points = cluster.metadata.n_points
        elif cmd.data:
            with s.timed(f"distribute_data over {cfg.node_count} nodes"):
                cluster.distribute_data(s.points, s.ids, crs=crs)  # --crs, else a GeoParquet input's own
        status = cmd.run(s)
    except BaseException:
        cluster.shutdown()
        raise
    if cmd.named:
        cluster.close()  # the named cluster keeps running
    else:
        cluster.shutdown()  # stops the runtime at the end if it started one
    return status


def _run_on_cluster(cmd: Subcommand, s: Session, cluster: Any) -> int:
    """Run ``cmd`` on a running named cluster; the client disconnects at the end and the cluster runs on."""
    try:
        s.cluster = cluster
        meta = cluster.metadata
        if getattr(s.args, "crs", None) is not None:
            raise ValueError(f"--crs does not apply with --cluster: the running cluster's data set has its own CRS "
                             f"({meta.crs or 'none'})")
        s.dim, s.n_points = meta.user_dim, meta.n_points
        s.columns = ["lon", "lat"] if meta.geographic else [str(j) for j in range(meta.dim)]
        s.say(f"cluster {cluster.name!r}: {meta.n_points:,} points of {meta.user_dim} dimensions"
              + (f" (longitude/latitude in {meta.crs}: distances in metres)" if meta.geographic else ""))
        if cmd.prepare is not None:
            cmd.prepare(s)
        return cmd.run(s)
    finally:
        cluster.close()


def _down(args: argparse.Namespace, out) -> int:
    from .. import DistributedSpatialCluster

    cluster = DistributedSpatialCluster.attach(args.name, args.address)
    n = cluster.n_points
    cluster.shutdown()
    print(f"cluster {args.name!r} ({n:,} points) is down", file=out or sys.stdout)
    return EXIT_OK


def _ls(args: argparse.Namespace, out) -> int:
    from .. import DistributedSpatialCluster

    rows = DistributedSpatialCluster.list_clusters(args.address)
    out = out or sys.stdout
    if not rows:
        print("no named clusters are running", file=out)
        return EXIT_OK
    print(_preview({k: [str(r.get(k, "")) for r in rows] for k in ("name", "points", "dim", "partitions", "nodes",
                                                                    "version", "restarts", "token")}, len(rows)),
          file=out)  # token: True when writes and teardown need the cluster's token
    return EXIT_OK


#: a single local input file at least this large is read by the nodes in parallel when there are several
PARALLEL_MIN_BYTES = 32 << 20


def _parallel_load(args: argparse.Namespace, cfg: Any) -> bool:
    """Whether the nodes read the input (``DistributedSpatialCluster.distribute_files``) rather than this process:
    always for a directory, glob, URI (a single process could not read those anyway), and on several nodes for a
    file of :data:`PARALLEL_MIN_BYTES` or more (measured: as fast as reading it here on one node, faster on more,
    and this process never holds the points). A small single file is read here, where every bad value is found
    before Ray starts. ``--read-here`` forces reading here."""
    from ..io.shares import is_uri

    path = str(args.input)
    if getattr(args, "read_here", False):
        return False
    if is_uri(path) or os.path.isdir(path) or any(c in path for c in "*?["):
        return True
    try:
        return cfg.node_count > 1 and os.path.getsize(path) >= PARALLEL_MIN_BYTES
    except OSError:  # missing: the reader names it
        return False


def _probe_files(s: Session, args: argparse.Namespace) -> None:
    """Columns, dimensions and (where the metadata tells) the point count of an input the nodes will read, from
    the files' metadata only (Parquet footers, .npy headers, a CSV file's first block): bad columns and mixed
    dimensions fail here, before Ray starts; bad values when the nodes read them."""
    from ..io.files import open_points
    from ..io.shares import expand_source, is_uri, plan_shares, share_columns

    shares = plan_shares(args.input, 1, args.columns, args.id_column)
    first = shares[0].path if shares else expand_source(args.input)[0]
    cols = share_columns(first, args.columns, args.id_column) if is_uri(first) else \
        open_points(first, args.columns, args.id_column).columns
    s.columns, s.dim = list(cols), len(cols)
    known = [sh.n_rows for sh in shares]
    s.n_points = int(sum(known)) if known and None not in known else None
    files = len({sh.path for sh in shares})
    s.say(f"the nodes will read {args.input} ({files} file(s), "
          + (f"{s.n_points:,} points, " if s.n_points is not None else "")
          + f"{s.dim} dimensions: {', '.join(s.columns)}) in parallel")


def _out_of_core(args: argparse.Namespace) -> bool:
    """``--out-of-core``, or the input file is larger than half the memory available here."""
    if getattr(args, "out_of_core", False):
        return True
    try:
        import psutil

        return os.path.getsize(args.input) > psutil.virtual_memory().available // 2
    except OSError:
        return False


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, ValueError) else f"{type(exc).__name__}: {text}"


def main(argv: list[str] | None = None, out=None) -> int:
    """Run ``distspatial`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # reported by the subcommand's parser, whose --help lists the options
            parser.subcommand_parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # --help (0) and usage errors (2): argparse has printed the message
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    if args.command == "demo":
        if args.points < 1 or args.queries < 1 or args.k < 1 or args.k > args.points or args.clusters < 1:
            try:
                parser.error("--points, --queries, -k and --clusters must be >= 1 and -k <= --points")
            except SystemExit:
                return EXIT_USAGE
        ok = run_demo(args.points, args.nodes, args.queries, args.k, args.clusters, args.curve, args.address,
                      seed=args.seed, out=out or sys.stdout)
        return EXIT_OK if ok else EXIT_FAILED
    prog = f"distspatial {args.command}"
    try:
        if args.command == "down":
            return _down(args, out)
        if args.command == "ls":
            return _ls(args, out)
        return _run(SUBCOMMANDS[args.command], args, out)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, LookupError) as exc:  # bad input (DataFileError is a ValueError), an unknown cluster
        if getattr(args, "traceback", False):
            raise
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if getattr(args, "traceback", False):
            raise
        print(f"{prog}: error: {_one_line(exc)} (--traceback shows where)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
