"""kNN join and distance matrices, driven from the coordinator.

**kNN join** (:func:`knn_join`): every row of another point set gets its ``k`` nearest neighbours in the
distributed set. Rows are processed in chunks through the exact, pruned batch kNN path (each node sees only the
queries whose k-th-distance ball reaches its partitions, with the current bound; see ``planner.py``), so the
driver never holds more than one chunk of queries and answers. The other set can be an array, a file
(``.npy``/CSV/Parquet/LAS, read in chunks by :mod:`distspatial.io`) or any iterable of ``(n, d)`` chunks;
answers are returned whole, yielded chunk by chunk, or written chunk by chunk to a Parquet/CSV file.
The self-join (all-kNN of the distributed set, each point excluding itself) reads the set partition by
partition from the nodes.

**Results written by the nodes** (:func:`write_by_nodes`, for :func:`join_to_directory` and
:func:`range_to_directory`): query files (a file, directory, glob or list) and an output directory: the nodes
read shares of the files and each writes its own ``part-<node>-<n>.parquet`` files (kNN: ``query, rank, id,
distance``, rank from 1; range: ``query, id, distance``, sorted by query then id in each file); only share
descriptions pass through the driver. :func:`range_to_file` writes the range search of an array of centres to
one file through the driver.

**Distance matrix** (:func:`distance_matrix`): tiles of ``cdist(a, b)`` computed on the nodes (round robin,
bounded tiles in flight, failover to another node), assembled in memory when the matrix fits the memory budget,
else written tile by tile into an ``.npy`` file (memory-mapped); a clear error when neither is possible.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from ..core.crs import to_unit
from ..core.geo import chord_to_metres, metres_to_chord
from ..core.validation import check_k
from ..client import queries
from ..client.runtime import ClusterRuntime


__all__ = ["knn_join", "distance_matrix", "range_to_directory", "range_to_file", "join_to_directory", "write_by_nodes",
           "DEFAULT_MEMORY_BUDGET"]

#: default limit for a distance matrix returned in memory
DEFAULT_MEMORY_BUDGET = 2 * 1024**3


def _knn(rt: ClusterRuntime, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN of a batch on the current view (planned again if the layout changes under it)."""
    return rt.stable(lambda: queries.knn(rt, np.ascontiguousarray(q, dtype=np.float64), k))


def _is_array(x: Any) -> bool:
    """An array (or array-like object), as opposed to a file path or an iterable of chunks."""
    return not isinstance(x, (str, os.PathLike)) and (isinstance(x, np.ndarray) or hasattr(x, "__array__"))


def _chunks(other: Any, chunk_rows: int, columns: Any) -> Iterator[np.ndarray]:
    if isinstance(other, (str, os.PathLike)):
        from ..io.files import iter_point_chunks

        yield from iter_point_chunks(other, columns, chunk_rows)
    elif _is_array(other):
        arr = np.asarray(other)
        for a in range(0, max(1, len(arr)), chunk_rows):
            yield arr[a:a + chunk_rows]
    elif isinstance(other, Iterable):
        yield from other
    else:
        raise TypeError(f"other_points must be an array, a file path or an iterable of (n, d) chunks, "
                        f"got {type(other).__name__}")


def _drop_self(dist: np.ndarray, ids: np.ndarray, self_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From ``k + 1`` neighbours per row remove the row's own id (or the last one when duplicates crowd it
    out)."""
    m = len(ids)
    hit = ids == self_ids[:, None]
    pos = np.where(hit.any(axis=1), hit.argmax(axis=1), k)
    keep = np.arange(k + 1)[None, :] != pos[:, None]
    return dist[keep].reshape(m, k), ids[keep].reshape(m, k)


def _self_chunks(rt: ClusterRuntime) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(points, ids)`` of each partition, read from a live replica."""
    meta = rt.require_data()
    for p in meta.partitions:
        node = rt.routing.node_for(p.partition_id, exclude=rt.failed_nodes)
        pts, ids = rt.recv(node, rt.send(node, "export_partition", p.partition_id,
                                                     rt.config.compression))
        yield pts, ids


def _join_chunks(rt, other, k, self_join, chunk_rows, columns):
    """Yield ``(query ids or None, distances, ids)`` per chunk. A geographic data set: queries are
    longitude/latitude (converted to unit vectors, rows named), distances great-circle metres."""
    meta = rt.require_data()
    geo = meta.geographic
    if self_join:
        k = check_k(k, meta.n_points - 1) if meta.n_points > 1 else check_k(k, 0)
        for pts, pids in _self_chunks(rt):
            for a in range(0, len(pts), chunk_rows):
                q, qid = pts[a:a + chunk_rows], pids[a:a + chunk_rows]
                d, i = _knn(rt, q, k + 1)
                d, i = _drop_self(d.reshape(len(q), k + 1), i.reshape(len(q), k + 1), qid, k)
                yield qid, (chord_to_metres(d) if geo else d), i
    else:
        k = check_k(k, meta.n_points)
        row = 0
        for chunk in _chunks(other, chunk_rows, columns):
            chunk = np.asarray(chunk, dtype=np.float64)
            if chunk.size == 0:  # an empty chunk gets an empty answer: answers match chunks by position
                yield None, np.empty((0, k)), np.empty((0, k), dtype=np.int64)
                continue
            if chunk.ndim != 2 or chunk.shape[1] != meta.user_dim:
                raise ValueError(f"chunks of other_points must be (n, {meta.user_dim}) arrays"
                                 f"{' of longitude, latitude' if geo else ''}, got shape {chunk.shape}")
            if geo:
                chunk = to_unit(chunk, "other_points", row)
            row += len(chunk)
            d, i = _knn(rt, chunk, k)
            yield None, (chord_to_metres(d) if geo else d), i


def knn_join(
    rt: ClusterRuntime,
    other_points: Any,
    k: int,
    self_join: bool = False,
    output: str | os.PathLike | None = None,
    chunk_rows: int = 250_000,
    columns: Any = None,
) -> Any:
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if self_join and other_points is not None:
        raise ValueError("self_join=True joins the distributed set with itself: pass other_points=None")
    if not self_join and other_points is None:
        raise ValueError("pass other_points, or self_join=True for the all-kNN of the distributed set")
    meta = rt.require_data()
    check_k(k, meta.n_points - 1 if self_join else meta.n_points)
    if output is not None and _is_directory_target(str(output)) and not self_join and not _is_array(other_points) \
            and _is_file_source(other_points):
        return join_to_directory(rt, other_points, k, str(output), columns, chunk_rows)
    gen = _join_chunks(rt, other_points, k, self_join, chunk_rows, columns)
    if output is not None:
        return _write_join(gen, str(output))
    if self_join:
        meta = rt.require_data()
        kk = None
        dist = ids = None
        for qid, d, i in gen:
            if dist is None:
                kk = d.shape[1]
                dist = np.empty((meta.n_points, kk))
                ids = np.empty((meta.n_points, kk), dtype=np.int64)
            rows = rt.rows_of_ids(qid)
            dist[rows], ids[rows] = d, i
        return dist, ids
    if _is_array(other_points):
        parts = list(gen)
        if not parts:
            return np.empty((0, k)), np.empty((0, k), dtype=np.int64)
        return np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
    return ((d, i) for _, d, i in gen)  # a stream: one (distances, ids) per chunk, nothing collected


def _is_directory_target(output: str) -> bool:
    """``output`` names a directory: ends with a separator, is one, or has no file extension."""
    return output.endswith(("/", os.sep)) or os.path.isdir(output) or not os.path.splitext(output)[1]


def _is_file_source(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike)) or (isinstance(x, (list, tuple)) and x and
                                                 all(isinstance(p, (str, os.PathLike)) for p in x))


def join_to_directory(rt: ClusterRuntime, source: Any, k: int, out_dir: str, columns: Any = None,
                      block_rows: int = 250_000) -> str:
    """kNN join of query files with the nodes reading and writing: shares of ``source`` (files, a directory, a
    glob) go to the live nodes, each answers its queries through the nodes of their home partitions and writes
    ``part-<node>-<n>.parquet`` files (``query`` = row in input order, ``rank`` from 1, ``id``, ``distance``)
    into ``out_dir``, which every machine must reach. A node that dies meanwhile: its part files are removed and
    its shares read again by another node. Returns ``out_dir``; nothing but share descriptions passes through
    here."""
    return write_by_nodes(rt, source, {"kind": "knn", "k": int(k)}, out_dir, columns, block_rows)


def range_to_directory(rt: ClusterRuntime, source: Any, radius: float | str, out_dir: str, columns: Any = None,
                       block_rows: int = 250_000) -> str:
    """Range search of query files with the nodes reading and writing (as :func:`join_to_directory`): part files
    with ``query`` (row in input order), ``id``, ``distance``, one row per point within the query's radius,
    sorted by query then id within each file. ``radius``: a number, or the name of a column of the query files
    holding each query's radius (``columns`` then names the coordinates; ``None``: every other column)."""
    from ..core.validation import check_radius
    from ..io.files import _parse_columns

    if isinstance(radius, str):
        cols = _parse_columns(columns)
        if cols is None:
            from ..io.shares import expand_source, share_columns

            files = expand_source(_resolve(source))
            cols = [c for c in share_columns(files[0]) if c != radius] if files else []
        elif radius in cols:
            raise ValueError(f"the radius column {radius!r} is also listed among the coordinate columns {cols}")
        task = {"kind": "range", "radius": None, "radius_column": radius}
        return write_by_nodes(rt, source, task, out_dir, [*cols, radius], block_rows)
    r = float(check_radius(radius, 1)[0])
    return write_by_nodes(rt, source, {"kind": "range", "radius": r}, out_dir, columns, block_rows)


def _resolve(source: Any) -> Any:
    """Local paths made absolute (the nodes run in other working directories); URIs as they are."""
    from ..io.shares import is_uri

    def one(p: Any) -> str:
        s = os.fspath(p)
        return s if is_uri(s) else os.path.abspath(os.path.expanduser(s))

    return [one(p) for p in source] if isinstance(source, (list, tuple)) else one(source)


def write_by_nodes(rt: ClusterRuntime, source: Any, task: dict[str, Any], out_dir: str, columns: Any = None,
                   block_rows: int = 250_000) -> str:
    """The driver loop of node-written results (kNN joins and range searches of query files): shares of
    ``source`` go to the live nodes (largest first, to the least loaded), each node's ``join_shares`` reads its
    shares, answers ``task`` block by block and writes ``part-<node>-<n>.parquet`` into ``out_dir``. Query ids are
    rows in input order: shares whose metadata do not give their row count (CSV, LAS) are counted by the nodes
    first. A node that dies meanwhile: its part files are removed and its shares read again by the others (up to
    ``max_retries`` times). An ``out_dir`` already holding part files is refused. Returns ``out_dir``."""
    import glob as _glob

    from ..core.errors import NodeFailureError
    from ..io.shares import plan_shares
    from ..node.dispatch import NODE_FAILURES

    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    if rt.meta is not None and rt.meta.geographic:  # the nodes read lon/lat, search unit vectors, write metres
        task = {**task, "geographic": True}
    source = _resolve(source)
    out_dir = os.path.abspath(os.path.expanduser(out_dir))  # the nodes run in other working directories
    os.makedirs(out_dir, exist_ok=True)
    if _glob.glob(os.path.join(out_dir, "part-*.parquet")):
        raise FileExistsError(f"{out_dir} already holds part-*.parquet files; pass a new or empty directory")
    live = rt.live_node_ids
    shares = plan_shares(source, 4 * len(live), columns)
    if not shares:
        return out_dir
    # query ids are rows in input order: shares that do not say their row count are counted by the nodes
    unknown = [s for s in shares if s.n_rows is None]
    counts = {s.index: s.n_rows for s in shares if s.n_rows is not None}
    if unknown:
        per = [unknown[j::len(live)] for j in range(len(live))]
        refs = [(n, part, rt.send(n, "count_shares", part, columns)) for n, part in zip(live, per) if part]
        for n, part, ref in refs:
            counts.update(zip((s.index for s in part), rt.recv(n, ref)))
    offsets = dict(zip((s.index for s in shares), np.cumsum([0] + [counts[s.index] for s in shares])[:-1].tolist()))
    pending = {n: [] for n in live}
    for s in sorted(shares, key=lambda s: -s.nbytes):  # largest first, to the least loaded
        pending[min(pending, key=lambda n: sum(x.nbytes for x in pending[n]))].append(s)
    version = rt.version
    for _ in range(rt.config.max_retries + 1):
        calls = {n: rt.send(n, "join_shares", part, [offsets[s.index] for s in part], columns, task, out_dir,
                            version, block_rows)
                 for n, part in pending.items() if part}
        retry: list = []
        for n, ref in calls.items():
            try:
                rt.recv(n, ref)
            except NODE_FAILURES as exc:
                rt.mark_failed(n, f"{task['kind']} into {out_dir}: {type(exc).__name__}")
                for f in _glob.glob(os.path.join(out_dir, f"part-{n:05d}-*.parquet")):
                    os.remove(f)
                retry += pending[n]
        if not retry:
            return out_dir
        live = list(rt.live_node_ids)
        if not live:
            break
        pending = {n: retry[j::len(live)] for j, n in enumerate(live)}
    raise NodeFailureError(f"the {task['kind']} job into {out_dir} lost its nodes {rt.config.max_retries + 1} times; "
                           "part files of the shares answered remain")


def _write_join(gen, path: str) -> str:
    """Write the join as a long table (query row, rank from 1, id, distance), chunk by chunk."""
    import pyarrow as pa

    def tables():
        start = 0
        for qid, d, i in gen:
            m, k = d.shape
            query = (np.arange(start, start + m) if qid is None else qid).repeat(k)
            start += m
            yield pa.table({"query": query, "rank": np.tile(np.arange(1, k + 1), m), "id": i.reshape(-1),
                            "distance": d.reshape(-1)})

    return _write_tables(tables(), path)


def range_to_file(rt: ClusterRuntime, centers: np.ndarray, radii: np.ndarray, path: str,
                  chunk_rows: int = 250_000, geographic: bool = False) -> str:
    """Range search of an array of centres (``radii``: one per centre) written chunk by chunk to one Parquet or
    CSV file: ``query`` (row), ``id``, ``distance``, one row per point found, sorted by query then id.
    ``geographic``: ``centers`` are unit vectors and ``radii`` metres (searched with chords a few ulps longer,
    kept where the great-circle metres are <= the radius); distances are written in metres."""
    import pyarrow as pa

    search_r = metres_to_chord(radii) if geographic else radii

    def tables():
        if not len(centers):
            yield pa.table({"query": np.empty(0, np.int64), "id": np.empty(0, np.int64), "distance": np.empty(0)})
        for a in range(0, len(centers), chunk_rows):
            c, r = centers[a:a + chunk_rows], search_r[a:a + chunk_rows]
            found = rt.stable(lambda c=c, r=r: queries.ball(rt, c, r, True, None))
            counts = np.fromiter((len(f[0]) for f in found), np.int64, len(found))
            ids = np.concatenate([f[0] for f in found]).astype(np.int64, copy=False)
            rows = np.repeat(np.arange(len(c)), counts)
            diff = np.concatenate([f[1] for f in found]).reshape(len(ids), c.shape[1]) - c[rows]
            if geographic:  # the chord as the kNN kernels and the facade compute it: inclusive at a reported distance
                dist = chord_to_metres(np.sqrt(np.square(diff).sum(axis=1)))
                keep = dist <= radii[a:a + chunk_rows][rows]
                rows, ids, dist = rows[keep], ids[keep], dist[keep]
            else:
                dist = np.sqrt(np.einsum("ij,ij->i", diff, diff))
            yield pa.table({"query": rows + a, "id": ids, "distance": dist})

    return _write_tables(tables(), path)


def _write_tables(tables: Iterable[Any], path: str) -> str:
    """Write pyarrow tables of one schema one after the other into ``path`` (``.parquet`` or ``.csv``)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    ext = path.lower().rsplit(".", 1)[-1]
    if ext not in ("parquet", "csv"):
        raise ValueError(f"output must end in .parquet or .csv, got {path!r}")
    writer = None
    try:
        for table in tables:
            if writer is None:
                writer = (pq.ParquetWriter(path, table.schema) if ext == "parquet"
                          else pacsv.CSVWriter(path, table.schema))
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    return path


def distance_matrix(
    rt: ClusterRuntime,
    a: Any,
    b: Any = None,
    output: str | os.PathLike | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    tile_rows: int = 4096,
) -> np.ndarray:
    from ..core.validation import check_points

    geo = rt.meta is not None and rt.meta.geographic  # lon/lat rows, great-circle metres
    if geo:
        A = to_unit(a, "a")
        B = A if b is None else to_unit(b, "b")
    else:
        A = check_points(a)
        B = A if b is None else check_points(b)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"a has {A.shape[1]} columns and b has {B.shape[1]}: both need the same dimension")
    n, m = len(A), len(B)
    need = n * m * 8
    if output is None:
        if need > memory_budget:
            raise MemoryError(
                f"the {n:,} x {m:,} distance matrix needs {need / 1e9:.2f} GB, more than memory_budget="
                f"{memory_budget / 1e9:.2f} GB; pass output='matrix.npy' to write it tile by tile to a file, or "
                "raise memory_budget")
        out = np.empty((n, m))
    else:
        path = str(output)
        if not path.endswith(".npy"):
            raise ValueError(f"output must be an .npy file (written as a memory-mapped array), got {path!r}")
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path)) or ".").free
        if need + 4096 > free:
            raise OSError(f"the distance matrix needs {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free "
                          f"where {path!r} would go")
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(n, m))
    tile = max(1, int(tile_rows))
    tiles = [(i, j) for i in range(0, n, tile) for j in range(0, m, tile)]
    _run_tiles(rt, A, B, tiles, tile, out)
    if geo:  # chords -> metres, in place, a block of rows at a time (out may be a memory-mapped file)
        step = max(1, (1 << 22) // max(1, m))
        for r in range(0, n, step):
            out[r:r + step] = chord_to_metres(out[r:r + step])
    if output is not None:
        out.flush()
        return out
    return out


def _run_tiles(rt, A, B, tiles, tile, out) -> None:
    """Compute ``tiles`` on the live nodes, a bounded number in flight per node; a tile whose node fails is
    sent to another node."""
    import ray

    from ..node.dispatch import NODE_FAILURES

    pending = list(reversed(tiles))
    inflight: dict[Any, tuple[int, tuple[int, int]]] = {}
    per_node = 2
    while pending or inflight:
        live = rt.live_node_ids
        if not live:
            raise RuntimeError("no live node left to compute distance tiles on")
        busy = {}
        for node, _ in inflight.values():
            busy[node] = busy.get(node, 0) + 1
        for node in live:
            while pending and busy.get(node, 0) < per_node:
                i, j = pending.pop()
                a_blk, b_blk = A[i:i + tile], B[j:j + tile]
                ref = rt.send(node, "distance_tile", a_blk, b_blk)
                inflight[ref] = (node, (i, j))
                busy[node] = busy.get(node, 0) + 1
        ready, _ = ray.wait(list(inflight), num_returns=1)
        for ref in ready:
            node, (i, j) = inflight.pop(ref)
            try:
                blk = rt.recv(node, ref)
            except NODE_FAILURES as exc:
                rt.mark_failed(node, type(exc).__name__)
                pending.append((i, j))
                continue
            out[i:i + blk.shape[0], j:j + blk.shape[1]] = blk
