"""distspatial.ui.plots (matplotlib, Agg): the figures are valid images of the expected size that show what they
should (node colours on the partition map, cluster colours, a heat map), and the CLI's --plot writes them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="plots need the 'plots' extra: pip install 'distspatial[plots]'")
Image = pytest.importorskip("PIL.Image", reason="pillow comes with matplotlib")

from distspatial import DistributedSpatialCluster, NodeConfig  # noqa: E402
from distspatial.ui.plots import NODE_COLORS, plot_clusters, plot_heatmap, plot_partitions  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(fig, path, dpi=100):
    fig.savefig(path, dpi=dpi)
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = Image.open(path)
    img.verify()  # a complete, uncorrupted file
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _pixels_near(rgb: np.ndarray, hex_color: str, tol: int = 40) -> int:
    c = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb.reshape(-1, 3) - c) <= tol).all(axis=1).sum())


@pytest.fixture(scope="module")
def cluster(ray_local):
    rng = np.random.default_rng(0)
    pts = np.vstack([rng.normal([0.3, 0.3], 0.05, (3000, 2)), rng.random((5000, 2))])
    cfg = dataclasses.replace(NodeConfig().with_node_count(3).with_replication_factor(2), cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        c.distribute_data(pts)
        c.test_points = pts
        yield c


def test_plot_partitions_from_the_cluster(cluster, tmp_path):
    fig = plot_partitions(cluster, max_points=3000)
    ax = fig.axes[0]
    meta = cluster.metadata
    assert len(ax.patches) == meta.n_partitions  # one box per partition
    edge = {tuple(np.round(p.get_edgecolor()[:3], 3)) for p in ax.patches}
    owners = {p.owners[0] for p in meta.partitions}
    want = {tuple(np.round(np.array([int(NODE_COLORS[n][i : i + 2], 16) for i in (1, 3, 5)]) / 255, 3)) for n in owners}
    assert edge == want  # boxes edged in their primary owner's colour
    scatter = ax.collections[0]
    assert len(scatter.get_offsets()) == 3000  # a sample of max_points
    curve = [ln for ln in ax.lines if len(ln.get_xdata()) == meta.n_partitions]
    assert curve, "no curve-order line through the partition centres"
    assert "8,000 points" in ax.get_title() and f"{meta.n_partitions} partitions" in ax.get_title()
    rgb = _png(fig, tmp_path / "parts.png")
    assert rgb.shape == (700, 800, 3)  # figsize (8, 7) at 100 dpi
    for n in owners:
        assert _pixels_near(rgb, NODE_COLORS[n], tol=10) > 200, f"node {n}'s colour is missing"


def test_plot_partitions_with_given_points_colours_by_home_partition(cluster, tmp_path):
    from distspatial.core.curves import curve_keys
    from distspatial.kernels.routing import RoutingTable

    meta = cluster.metadata
    pts = cluster.test_points
    fig = plot_partitions(cluster, max_points=None, points=pts, show_curve=False, label_partitions=False)
    colors = fig.axes[0].collections[0].get_facecolors()
    home = RoutingTable(meta).home_partitions(curve_keys(pts, meta.lo, meta.hi, meta.curve, meta.bits))
    assert len(colors) == len(pts)
    # points of one partition share a colour; partitions next to each other in id get different colours
    for p in range(meta.n_partitions):
        c = colors[home == p]
        assert len(c) and (c == c[0]).all()
    assert not np.allclose(colors[home == 0][0], colors[home == 1][0])
    # each point's partition box contains it (the home partition is the one that holds it)
    for p in meta.partitions:
        sel = pts[home == p.partition_id]
        assert ((sel >= p.lo - 1e-12) & (sel <= p.hi + 1e-12)).all()
    _png(fig, tmp_path / "given.png")
    with pytest.raises(ValueError, match="shape"):
        plot_partitions(cluster, points=np.zeros((5, 3)))
    with pytest.raises(ValueError, match="dims"):
        plot_partitions(cluster, points=pts, dims=(0, 1, 2))


def test_plot_partitions_into_given_axes_and_metadata(cluster, tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    a1, a2 = fig.subplots(1, 2)
    out = plot_partitions(cluster.metadata, ax=a2, points=cluster.test_points, max_points=500)
    assert out is fig and len(a2.patches) == cluster.metadata.n_partitions and not a1.patches
    rgb = _png(fig, tmp_path / "axes.png", dpi=50)
    assert rgb.shape == (200, 500, 3)


def test_plot_clusters(tmp_path):
    rng = np.random.default_rng(1)
    centers = np.array([[0.0, 0.0], [5.0, 5.0], [0.0, 5.0]])
    labels = np.repeat([0, 1, 2], 2000)
    pts = centers[labels] + rng.normal(0, 0.5, (6000, 2))
    labels_noise = labels.copy()
    labels_noise[:100] = -1
    fig = plot_clusters(pts, labels_noise, centers, max_points=4000)
    ax = fig.axes[0]
    assert len(ax.collections[0].get_offsets()) == 4000
    assert len(ax.collections[1].get_offsets()) == 3  # the centroids
    assert "3 clusters" in ax.get_title() and "100 noise" in ax.get_title()
    rgb = _png(fig, tmp_path / "clusters.png", dpi=80)
    assert rgb.shape == (560, 640, 3)
    for c in NODE_COLORS[:3]:  # tab10: the first three cluster colours are drawn
        assert _pixels_near(rgb, c, tol=30) > 100

    class Result:  # a KMeansResult-like object unpacks
        def __init__(self):
            self.labels, self.centroids = labels, centers

    fig = plot_clusters(pts, Result())
    assert len(fig.axes[0].collections[1].get_offsets()) == 3
    with pytest.raises(ValueError, match="one label per point"):
        plot_clusters(pts, labels[:10])


def test_plot_heatmap_grid_and_window(tmp_path):
    from distspatial.live.windows import GridCountsResult, WindowResult

    counts = np.zeros((40, 20), dtype=np.int64)
    counts[30:35, 2:5] = 500  # a hot spot at high x, low y
    counts += 1
    grid = GridCountsResult(counts, 7, np.array([0.0, 0.0]), np.array([2.0, 1.0]), (0, 1))
    fig = plot_heatmap(grid)
    ax = fig.axes[0]
    im = ax.images[0]
    assert im.get_array().shape == (20, 40)  # y rows, x columns
    assert tuple(im.get_extent()) == (0.0, 2.0, 0.0, 1.0)
    assert "7 outside" in ax.get_title() and len(fig.axes) == 2  # with a colour bar
    rgb = _png(fig, tmp_path / "heat.png")
    assert rgb.shape == (650, 800, 3)
    # the hot spot is the brightest (viridis yellow) region of the image
    assert _pixels_near(rgb, "#fde725", tol=30) > 500

    win = WindowResult(start=0.0, end=60.0, count=int(counts.sum()), aggregates={"grid": grid}, late_dropped=0)
    fig = plot_heatmap(win, log=True)
    assert "window [0, 60)" in fig.axes[0].get_title()
    _png(fig, tmp_path / "window.png")
    fig = plot_heatmap(np.arange(12).reshape(4, 3), lo=[0, 0], hi=[4, 3], colorbar=False)
    assert len(fig.axes) == 1
    with pytest.raises(ValueError, match="2-D"):
        plot_heatmap(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="no 2-D grid"):
        plot_heatmap(WindowResult(0.0, 1.0, 0, {"n": 3}, 0))


def test_cli_plot_options(ray_local, cluster, tmp_path, capsys):
    from distspatial.ui.cli import main

    pts = np.random.default_rng(2).random((2000, 2))
    np.save(tmp_path / "p.npy", pts)
    out = tmp_path / "km.png"
    assert main(["kmeans", str(tmp_path / "p.npy"), "-k", "4", "--seed", "0", "--nodes", "2", "--no-progress",
                 "--plot", str(out)]) == 0
    assert Image.open(out).size == (960, 840)  # (8, 7) inches at 120 dpi
    assert f"wrote the plot to {out}" in capsys.readouterr().out
    out = tmp_path / "parts.png"
    assert main(["stats", str(tmp_path / "p.npy"), "--nodes", "2", "--no-progress", "--plot", str(out)]) == 0
    rgb = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert rgb.shape == (840, 960, 3) and _pixels_near(rgb, NODE_COLORS[1], tol=10) > 100
    assert main(["kmeans", str(tmp_path / "p.npy"), "--plot", str(tmp_path / "km.txt")]) == 2
    assert ".png, .svg, .pdf" in capsys.readouterr().err
