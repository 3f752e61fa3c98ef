"""Plots of a distributed index and of analytics results, with matplotlib (``pip install 'distspatial[plots]'``).

Every function draws into ``ax`` when given (a matplotlib ``Axes``), else into a new figure, and returns the
``Figure``; figures are made without ``pyplot`` (no GUI backend, no global state), so they work in scripts,
servers and notebooks alike. Save with ``fig.savefig("out.png")``.

* :func:`plot_partitions`: points coloured by partition (a uniform sample of at most ``max_points``), partition
  boxes edged in the colour of the node serving them, and the space-filling-curve order as a line through the
  partition centres.
* :func:`plot_clusters`: points coloured by cluster label (k-means, DBSCAN noise in grey), centroids marked.
* :func:`plot_heatmap`: a 2-D grid of counts (a window's :class:`~distspatial.live.windows.GridCountsResult`, a
  :class:`~distspatial.live.windows.WindowResult` holding one, or an array with its ``lo``/``hi``).

Node colours are those of the HTTP status page (matplotlib's ``tab10``, node id modulo 10).

Geographic data (longitude/latitude, a cluster with a geographic CRS; ``geographic=True`` for
:func:`plot_clusters`) is drawn with longitude on x and latitude on y: in an equirectangular projection true to
scale at the drawn points' middle latitude (``set_aspect(1 / cos(lat))``) when they span at most 60 degrees of
latitude within 75 degrees of the equator, else in plate carree (one degree of longitude as wide as one of
latitude); the axis labels and the title say which.

>>> from distspatial.ui.plots import plot_partitions
>>> plot_partitions(cluster).savefig("partitions.png", dpi=120)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

try:
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"plotting needs matplotlib ({_exc}); install it with: pip install 'distspatial[plots]'") from _exc

__all__ = ["plot_partitions", "plot_clusters", "plot_heatmap", "NODE_COLORS", "sample_cluster_points",
           "lonlat_aspect"]

#: node colours (matplotlib's tab10), shared with the HTTP status page; node ``n`` gets ``NODE_COLORS[n % 10]``.
NODE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
               "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
#: without a node-side sample, :func:`plot_partitions` fetches every point only up to this many.
FETCH_LIMIT = 5_000_000


def _axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _subsample(n: int, max_points: int | None, seed: int) -> np.ndarray | slice:
    if max_points is None or n <= max_points:
        return slice(None)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=int(max_points), replace=False))


def _marker_size(n: int) -> float:
    return float(np.clip(3e4 / max(1, n), 0.3, 12.0))


def _check_dims(dims: Sequence[int], d: int) -> tuple[int, int | None]:
    dims = tuple(int(x) for x in dims)
    if len(dims) != 2 or any(x < 0 for x in dims):
        raise ValueError(f"dims must name two coordinate columns, e.g. (0, 1); got {dims}")
    if dims[0] >= d:
        raise ValueError(f"dims {dims} name column {dims[0]}, but the points have {d} dimension(s)")
    return dims[0], (dims[1] if dims[1] < d else None)  # 1-D data: drawn along x


def sample_cluster_points(cluster: Any, max_points: int = 200_000, seed: int = 0) -> np.ndarray:
    """At most ``max_points`` of the cluster's points, a uniform sample (fewer only when the index holds fewer).

    Uses ``cluster.sample_points(n, seed=...)`` when the cluster has it (sampled on the nodes); otherwise every
    point is fetched with one box query over the partitions' boxes and sampled here, which is refused (with a
    ``ValueError``) above :data:`FETCH_LIMIT` points: pass ``points=`` to :func:`plot_partitions` then.
    """
    sampler = getattr(cluster, "sample_points", None)
    if callable(sampler):
        out = sampler(max_points, seed=seed)
        return np.asarray(out[1] if isinstance(out, tuple) else out, dtype=np.float64)
    meta = cluster.metadata
    if meta.n_points > FETCH_LIMIT:
        raise ValueError(f"the index holds {meta.n_points:,} points; fetching them all to sample {max_points:,} is "
                         f"refused above {FETCH_LIMIT:,}: pass points= (a sample you hold) or show_points=False")
    lo = np.min([p.lo for p in meta.partitions], axis=0)
    hi = np.max([p.hi for p in meta.partitions], axis=0)
    _, pts = cluster.box_search(lo, hi, return_points=True)
    pts = np.asarray(pts, dtype=np.float64)
    return pts[_subsample(len(pts), max_points, seed)]


def lonlat_aspect(ax: Any, lonlat: np.ndarray) -> str:
    """Draw ``ax`` as a lon/lat map: axis labels in degrees and an aspect ratio true to the Earth's shape
    (equirectangular at the middle latitude, or plate carree for wide latitude ranges); returns the projection's
    name for titles. The aspect is set with ``adjustable="datalim"``."""
    lat = np.asarray(lonlat, dtype=np.float64).reshape(-1, 2)[:, 1]
    lat = lat[np.isfinite(lat)]
    lo, hi = (float(lat.min()), float(lat.max())) if len(lat) else (0.0, 0.0)
    mid = (lo + hi) / 2
    if hi - lo <= 60.0 and abs(mid) <= 75.0:
        aspect = 1.0 / np.cos(np.radians(mid))
        name = f"equirectangular, true scale at {abs(mid):.1f}\N{DEGREE SIGN}{'N' if mid >= 0 else 'S'}"
    else:
        aspect = 1.0
        name = "plate carree"
    ax.set_aspect(aspect, adjustable="datalim")
    ax.set_xlabel(f"longitude (\N{DEGREE SIGN}; {name})")
    ax.set_ylabel("latitude (\N{DEGREE SIGN})")
    return name


def _home_partitions(meta: Any, points: np.ndarray) -> np.ndarray:
    """The partition each point belongs to, by its curve key (as the index routes it)."""
    from ..core.curves import curve_keys
    from ..kernels.routing import RoutingTable

    keys = curve_keys(points, meta.lo, meta.hi, meta.curve, meta.bits)
    return RoutingTable(meta).home_partitions(keys)


def _points_to_draw(cluster: Any, meta: Any, points: Any, dim: int, max_points: int | None, seed: int,
                    shape_error: str) -> np.ndarray:
    """The points a partition plot draws: ``points`` checked to be ``(n, dim)`` (``shape_error`` says what is
    expected) and subsampled to ``max_points``, or a sample from ``cluster``."""
    from ..core.metadata import GlobalIndexMetadata

    if points is None:
        if isinstance(cluster, GlobalIndexMetadata):
            raise ValueError("plot_partitions(metadata) needs points=...; or pass the cluster itself")
        return sample_cluster_points(cluster, max_points or meta.n_points, seed)
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != dim:
        raise ValueError(f"{shape_error}, got {pts.shape}")
    return pts[_subsample(len(pts), max_points, seed)]


def plot_partitions(
    cluster: Any,
    ax: Any = None,
    max_points: int | None = 200_000,
    *,
    points: Any = None,
    dims: Sequence[int] = (0, 1),
    show_points: bool = True,
    show_curve: bool = True,
    label_partitions: bool | None = None,
    seed: int = 0,
    title: str | None = None,
    figsize: tuple[float, float] = (8.0, 7.0),
) -> Any:
    """Partitions of ``cluster`` (a :class:`~distspatial.DistributedSpatialCluster`, or its
    :class:`~distspatial.GlobalIndexMetadata` with ``points=``): returns the ``Figure``.

    Args:
        points: the points to draw (e.g. the array given to ``distribute_data``); default: a sample fetched
            from the cluster (:func:`sample_cluster_points`). Either way at most ``max_points`` are drawn, a
            uniform random sample (``seed``), so millions of points plot in seconds.
        dims: the two coordinate columns on the axes (the partition of a point uses all its coordinates).
        show_points, show_curve: draw the points; draw the curve order through the partition centres.
        label_partitions: write ``p<id>`` and the owner nodes in each box (default: when at most 64 partitions).

    Boxes are edged in the colour of their primary owner node (legend: nodes), points are coloured by partition
    (a cyclic palette), and the line visits the partition centres in curve-key order, from the marked start.
    """
    from ..core.metadata import GlobalIndexMetadata

    meta = cluster if isinstance(cluster, GlobalIndexMetadata) else cluster.metadata
    if getattr(meta, "geographic", False):
        return _plot_geo_partitions(cluster, meta, ax, max_points, points, show_points, show_curve,
                                    label_partitions, seed, title, figsize)
    dx, dy = _check_dims(dims, meta.dim)
    fig, ax = _axes(ax, figsize)
    parts = meta.partitions
    n_drawn = 0
    if show_points:
        pts = _points_to_draw(cluster, meta, points, meta.dim, max_points, seed,
                              f"points must have shape (n, {meta.dim}) like the index")
        if len(pts):
            home = _home_partitions(meta, pts)
            cmap = matplotlib.colormaps["tab20"]
            colors = cmap(home % cmap.N)
            ys = pts[:, dy] if dy is not None else np.zeros(len(pts))
            ax.scatter(pts[:, dx], ys, s=_marker_size(len(pts)), c=colors, linewidths=0, alpha=0.6,
                       rasterized=True, zorder=1)
            n_drawn = len(pts)

    def box(p: Any) -> tuple[float, float, float, float]:
        x0, x1 = float(p.lo[dx]), float(p.hi[dx])
        y0, y1 = (float(p.lo[dy]), float(p.hi[dy])) if dy is not None else (-0.5, 0.5)
        return x0, y0, x1, y1

    nodes = sorted({o for p in parts for o in p.owners})
    label = label_partitions if label_partitions is not None else len(parts) <= 64
    for p in parts:
        x0, y0, x1, y1 = box(p)
        owner = p.owners[0] if p.owners else -1
        color = NODE_COLORS[owner % len(NODE_COLORS)] if owner >= 0 else "#000000"
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.8, zorder=3))
        if label:
            owners = ",".join(str(o) for o in p.owners)
            ax.text((x0 + x1) / 2, (y0 + y1) / 2, f"p{p.partition_id}\nn{owners}", ha="center", va="center",
                    fontsize=7, color=color, zorder=5,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7})
    if show_curve and len(parts) > 1:
        order = sorted(parts, key=lambda p: p.key_lo)
        cx = np.array([(box(p)[0] + box(p)[2]) / 2 for p in order])
        cy = np.array([(box(p)[1] + box(p)[3]) / 2 for p in order])
        ax.plot(cx, cy, color="#1d2330", linewidth=1.0, alpha=0.8, marker=".", markersize=4, zorder=4)
        ax.plot(cx[:1], cy[:1], color="#1d2330", marker="o", markersize=7, linestyle="none", zorder=4)
    handles = [Line2D([], [], color=NODE_COLORS[n % len(NODE_COLORS)], linewidth=2.5, label=f"node {n}")
               for n in nodes]
    if show_curve and len(parts) > 1:
        handles.append(Line2D([], [], color="#1d2330", marker="o", markersize=5, linewidth=1,
                              label=f"{meta.curve} order"))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
                  title="primary owner", title_fontsize=8)
    all_lo = np.min([p.lo for p in parts], axis=0) if parts else meta.lo
    all_hi = np.max([p.hi for p in parts], axis=0) if parts else meta.hi
    pad_x = 0.02 * max(1e-12, float(all_hi[dx] - all_lo[dx]))
    ax.set_xlim(float(all_lo[dx]) - pad_x, float(all_hi[dx]) + pad_x)
    if dy is not None:
        pad_y = 0.02 * max(1e-12, float(all_hi[dy] - all_lo[dy]))
        ax.set_ylim(float(all_lo[dy]) - pad_y, float(all_hi[dy]) + pad_y)
        ext = (all_hi[[dx, dy]] - all_lo[[dx, dy]]).astype(float)
        if ext.min() > 0 and ext.max() / ext.min() < 8:
            ax.set_aspect("equal", adjustable="box")
    else:
        ax.set_ylim(-1, 1)
        ax.set_yticks([])
    ax.set_xlabel(f"x{dx}" if meta.dim > 3 else "xyz"[dx])
    if dy is not None:
        ax.set_ylabel(f"x{dy}" if meta.dim > 3 else "xyz"[dy])
    shown = f", {n_drawn:,} shown" if show_points and n_drawn < meta.n_points else ""
    ax.set_title(title if title is not None else
                 f"{meta.n_points:,} points{shown}, {len(parts)} partitions on {len(nodes)} nodes ({meta.curve})",
                 fontsize=10)
    return fig


def _plot_geo_partitions(cluster: Any, meta: Any, ax: Any, max_points: int | None, points: Any, show_points: bool,
                         show_curve: bool, label_partitions: bool | None, seed: int, title: str | None,
                         figsize: tuple[float, float]) -> Any:
    """:func:`plot_partitions` of a geographic data set: the partitions' boxes are 3-D (unit vectors on the
    sphere), so the points are drawn in lon/lat coloured by partition, each partition labelled at the (spherical)
    mean of its drawn points, the curve order through those."""
    from ..core.geo import lonlat_to_unit, unit_to_lonlat

    pts = _points_to_draw(cluster, meta, points, 2, max_points, seed,
                          "points of a geographic data set are (n, 2) longitude, latitude")
    fig, ax = _axes(ax, figsize)
    parts = meta.partitions
    xyz = lonlat_to_unit(pts) if len(pts) else np.empty((0, 3))
    home = _home_partitions(meta, xyz) if len(pts) else np.empty(0, dtype=np.int64)
    if show_points and len(pts):
        cmap = matplotlib.colormaps["tab20"]
        ax.scatter(pts[:, 0], pts[:, 1], s=_marker_size(len(pts)), c=cmap(home % cmap.N), linewidths=0, alpha=0.6,
                   rasterized=True, zorder=1)
    # each partition's drawn points: their mean direction, back to lon/lat (vectorized per coordinate)
    n_parts = max((p.partition_id for p in parts), default=-1) + 1
    counts = np.bincount(home, minlength=n_parts)
    sums = np.stack([np.bincount(home, weights=xyz[:, j], minlength=n_parts) for j in range(3)], axis=1) \
        if len(pts) else np.zeros((n_parts, 3))
    centre = unit_to_lonlat(sums) if n_parts else np.empty((0, 2))
    by_id = {p.partition_id: p for p in parts}
    nodes = sorted({o for p in parts for o in p.owners})
    label = label_partitions if label_partitions is not None else len(parts) <= 64
    if label:
        for pid in np.flatnonzero(counts):
            p = by_id.get(int(pid))
            owner = p.owners[0] if p is not None and p.owners else -1
            color = NODE_COLORS[owner % len(NODE_COLORS)] if owner >= 0 else "#000000"
            owners = ",".join(str(o) for o in p.owners) if p is not None else "?"
            ax.text(centre[pid, 0], centre[pid, 1], f"p{pid}\nn{owners}", ha="center", va="center", fontsize=7,
                    color=color, zorder=5, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                                                 "alpha": 0.7})
    if show_curve and len(parts) > 1:
        order = [p.partition_id for p in sorted(parts, key=lambda p: p.key_lo) if counts[p.partition_id]]
        if order:
            ax.plot(centre[order, 0], centre[order, 1], color="#1d2330", linewidth=1.0, alpha=0.8, marker=".",
                    markersize=4, zorder=4)
            ax.plot(centre[order[:1], 0], centre[order[:1], 1], color="#1d2330", marker="o", markersize=7,
                    linestyle="none", zorder=4)
    handles = [Line2D([], [], color=NODE_COLORS[n % len(NODE_COLORS)], linewidth=2.5, label=f"node {n}")
               for n in nodes] if label else []
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
                  title="primary owner (labels)", title_fontsize=8)
    name = lonlat_aspect(ax, pts)
    shown = f", {len(pts):,} shown" if len(pts) < meta.n_points else ""
    ax.set_title(title if title is not None else
                 f"{meta.n_points:,} points{shown}, {len(parts)} partitions on {len(nodes)} nodes ({meta.curve})\n"
                 f"{meta.crs} lon/lat, {name}; colour: partition", fontsize=10)
    return fig


def plot_clusters(
    points: Any,
    labels: Any = None,
    centroids: Any = None,
    ax: Any = None,
    max_points: int | None = 200_000,
    *,
    dims: Sequence[int] = (0, 1),
    seed: int = 0,
    title: str | None = None,
    figsize: tuple[float, float] = (8.0, 7.0),
    geographic: bool = False,
) -> Any:
    """Points coloured by cluster label; returns the ``Figure``.

    ``geographic=True``: the points (and centroids) are longitude, latitude in degrees, drawn as a lon/lat map
    (:func:`lonlat_aspect`: equirectangular true to scale at the middle latitude, or plate carree).

    ``labels`` is one integer per point (``-1``: noise, drawn grey), or a result with ``labels`` (and
    ``centroids``), such as :class:`~distspatial.KMeansResult`; ``centroids`` (``(k, d)``) are drawn as
    crosses labelled with their cluster. At most ``max_points`` points are drawn (a uniform sample).
    """
    if labels is not None and hasattr(labels, "labels"):
        if centroids is None:
            centroids = getattr(labels, "centroids", None)
        labels = labels.labels
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2:
        raise ValueError(f"points must have shape (n, d), got {pts.shape}")
    lab = np.zeros(len(pts), dtype=np.int64) if labels is None else np.asarray(labels).astype(np.int64, copy=False)
    if lab.shape != (len(pts),):
        raise ValueError(f"labels must hold one label per point ({len(pts)}), got shape {lab.shape}")
    dx, dy = _check_dims(dims, pts.shape[1])
    fig, ax = _axes(ax, figsize)
    sel = _subsample(len(pts), max_points, seed)
    p, lb = pts[sel], lab[sel]
    ys = p[:, dy] if dy is not None else np.zeros(len(p))
    k = int(lab.max()) + 1 if len(lab) and lab.max() >= 0 else 0
    cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
    colors = np.where((lb >= 0)[:, None], cmap(np.maximum(lb, 0) % cmap.N), np.array([[0.6, 0.6, 0.6, 1.0]]))
    ax.scatter(p[:, dx], ys, s=_marker_size(len(p)), c=colors, linewidths=0, alpha=0.7, rasterized=True, zorder=1)
    if centroids is not None:
        c = np.asarray(centroids, dtype=np.float64).reshape(-1, pts.shape[1])
        cy = c[:, dy] if dy is not None else np.zeros(len(c))
        ax.scatter(c[:, dx], cy, marker="X", s=120, c=[cmap(j % cmap.N) for j in range(len(c))],
                   edgecolors="black", linewidths=1.2, zorder=3)
        if len(c) <= 30:
            for j in range(len(c)):
                ax.annotate(str(j), (c[j, dx], cy[j]), xytext=(6, 6), textcoords="offset points", fontsize=8,
                            zorder=4)
    noise = int((lab < 0).sum())
    projection = ""
    if geographic:
        if (dx, dy) != (0, 1) or pts.shape[1] != 2:
            raise ValueError(f"geographic=True draws (n, 2) longitude, latitude points with dims (0, 1); got points "
                             f"{pts.shape}, dims {tuple(dims)}")
        projection = f"\nlon/lat, {lonlat_aspect(ax, p)}"
    elif dy is not None:
        ext = np.ptp(pts[:, [dx, dy]], axis=0) if len(pts) else np.ones(2)
        if ext.min() > 0 and ext.max() / ext.min() < 8:
            ax.set_aspect("equal", adjustable="datalim")
    else:
        ax.set_yticks([])
    shown = f", {len(p):,} shown" if len(p) < len(pts) else ""
    ax.set_title(title if title is not None else
                 f"{len(pts):,} points{shown}, {k} clusters" + (f", {noise:,} noise" if noise else "") + projection,
                 fontsize=10)
    return fig


def plot_heatmap(
    result: Any,
    lo: Any = None,
    hi: Any = None,
    ax: Any = None,
    *,
    name: str | None = None,
    log: bool = False,
    cmap: str = "viridis",
    colorbar: bool = True,
    title: str | None = None,
    figsize: tuple[float, float] = (8.0, 6.5),
) -> Any:
    """A heat map of 2-D grid counts; returns the ``Figure``.

    ``result``: a :class:`~distspatial.live.windows.GridCountsResult`; a :class:`~distspatial.live.windows.WindowResult`
    (its grid aggregate: the one named ``name``, else the first grid among its aggregates); or an ``(nx, ny)``
    array of counts with ``lo``/``hi`` the grid's corners (default: cell indices). ``counts[i, j]`` is the cell
    ``i`` along x, ``j`` along y. ``log=True`` colours by a log scale (empty cells blank).
    """
    from matplotlib.colors import LogNorm

    window = None
    if hasattr(result, "aggregates"):  # a WindowResult
        window = result
        aggs = result.aggregates
        if name is not None:
            if name not in aggs:
                raise ValueError(f"the window has no aggregate {name!r}; it has {', '.join(map(repr, aggs)) or 'none'}")
            result = aggs[name]
        else:
            grids = [v for v in aggs.values() if hasattr(v, "counts") and hasattr(v, "lo")
                     and np.ndim(v.counts) == 2]
            if not grids:
                raise ValueError(f"the window holds no 2-D grid counts (aggregates: {', '.join(map(repr, aggs))}); "
                                 f"add a GridCounts aggregation with 2-D lo/hi")
            result = grids[0]
    if hasattr(result, "counts") and hasattr(result, "lo"):
        counts, lo_, hi_ = np.asarray(result.counts), np.asarray(result.lo, float), np.asarray(result.hi, float)
    else:
        counts = np.asarray(result)
        lo_ = np.zeros(2) if lo is None else np.asarray(lo, dtype=np.float64)
        hi_ = np.asarray(counts.shape[:2], dtype=np.float64) if hi is None else np.asarray(hi, dtype=np.float64)
    if counts.ndim != 2:
        raise ValueError(f"plot_heatmap draws 2-D grids; got counts of shape {counts.shape} (use 2-D lo/hi in "
                         f"GridCounts, or sum the other axes first)")
    if lo_.shape != (2,) or hi_.shape != (2,):
        raise ValueError(f"lo and hi must be 2 numbers each, got {lo_.tolist()} and {hi_.tolist()}")
    fig, ax = _axes(ax, figsize)
    data = counts.T.astype(np.float64)
    norm = None
    if log:
        data = np.ma.masked_less_equal(data, 0)
        vmax = float(data.max()) if data.count() else 1.0
        norm = LogNorm(vmin=max(1.0, float(data.min()) if data.count() else 1.0), vmax=max(1.0, vmax))
    im = ax.imshow(data, origin="lower", extent=(lo_[0], hi_[0], lo_[1], hi_[1]), cmap=cmap, norm=norm,
                   interpolation="nearest", aspect="equal" if _near_square(lo_, hi_) else "auto")
    if colorbar:
        fig.colorbar(im, ax=ax, label="count" + (" (log)" if log else ""), shrink=0.85)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    if title is None:
        total = int(np.asarray(counts).sum())
        title = f"{total:,} points on a {counts.shape[0]} x {counts.shape[1]} grid"
        if window is not None:
            title = f"window [{window.start:g}, {window.end:g}): {window.count:,} events; " + title
        over = getattr(result, "overflow", 0)
        if over:
            title += f" ({over:,} outside)"
    ax.set_title(title, fontsize=10)
    return fig


def _near_square(lo: np.ndarray, hi: np.ndarray) -> bool:
    ext = hi - lo
    return bool(ext.min() > 0 and ext.max() / ext.min() < 8)
