"""Distributed analytics beyond k-means on a real local Ray runtime, checked against scikit-learn and scipy."""

import numpy as np
import pytest
from scipy.cluster.hierarchy import dendrogram, fcluster, is_valid_linkage
from sklearn.cluster import AgglomerativeClustering
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from distspatial import DistributedSpatialCluster, NodeConfig

from .conftest import assert_knn_ids_match


@pytest.fixture(scope="module")
def cluster(ray_local):
    cfg = NodeConfig().with_node_count(3).replace(cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        yield c


@pytest.mark.parametrize("d", [2, 3, 5])
def test_hierarchical_matches_sklearn_ward_on_separated_data(cluster, d):
    X, _ = make_blobs(30_000, n_features=d, centers=6, cluster_std=0.4, random_state=d, center_box=(-20, 20))
    cluster.distribute_data(X)
    res = cluster.distributed_hierarchical(n_clusters=6, n_micro_clusters=400, seed=1)
    labels, Z = res
    assert labels.shape == (len(X),) and set(np.unique(labels)) == set(range(6))
    assert is_valid_linkage(Z) and Z.shape == (len(res.micro_counts) - 1, 4)
    assert res.micro_counts.sum() == len(X) and res.point_counts[-1] == len(X)
    dendrogram(Z, no_plot=True)
    sub = np.random.default_rng(0).choice(len(X), 3000, replace=False)
    ref = AgglomerativeClustering(n_clusters=6, linkage="ward").fit_predict(X[sub])
    assert adjusted_rand_score(ref, labels[sub]) >= 0.9
    assert len(np.unique(fcluster(Z, 6, criterion="maxclust"))) == 6
    gap = Z[-6, 2] + 0.5 * (Z[-5, 2] - Z[-6, 2])  # inside the height gap above the 6-cluster level
    by_height = cluster.distributed_hierarchical(distance_threshold=gap, n_micro_clusters=400, seed=1)
    assert adjusted_rand_score(labels, by_height.labels) == 1.0


def test_hierarchical_with_ids_and_errors(cluster):
    X, _ = make_blobs(5_000, n_features=2, centers=3, cluster_std=0.3, random_state=4, center_box=(-10, 10))
    ids = np.arange(len(X))[::-1] * 7 + 3
    cluster.distribute_data(X, ids=ids)
    res = cluster.distributed_hierarchical(n_clusters=3, n_micro_clusters=100)
    ref = AgglomerativeClustering(n_clusters=3, linkage="ward").fit_predict(X)
    assert adjusted_rand_score(ref, res.labels) >= 0.99, "labels are in input-row order even with user ids"
    with pytest.raises(ValueError, match="Exactly one of n_clusters and distance_threshold"):
        cluster.distributed_hierarchical()
    with pytest.raises(ValueError, match="'ward' only"):
        cluster.distributed_hierarchical(n_clusters=2, linkage="single")
    with pytest.raises(ValueError, match="raise n_micro_clusters"):
        cluster.distributed_hierarchical(n_clusters=500, n_micro_clusters=50)


def test_knn_join_array_file_stream_and_self_join(cluster, tmp_path):
    import pyarrow.parquet as pq

    from distspatial.io.datasets import skewed_points

    pts = skewed_points(40_000, 3, seed=31)
    pts[:500] = pts[500:1000]  # duplicates: the self-join must drop the point itself, not its twin
    other = skewed_points(7_000, 3, seed=31, sample_seed=5)
    cluster.distribute_data(pts)
    d, i = cluster.knn_join(other, 4)
    sep = 0.95  # the 500 duplicate pairs tie in about 2 % of the answers: their ids are compared as a set
    assert_knn_ids_match(pts, other, d, i, 4, min_separated=sep)
    # a stream of chunks: nothing collected, same answers
    chunks = list(cluster.knn_join(iter(np.array_split(other, 3)), 4))
    assert len(chunks) == 3
    assert_knn_ids_match(pts, other, np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks]), 4,
                         min_separated=sep)
    # from a file, written chunk by chunk
    np.save(tmp_path / "other.npy", other)
    out = cluster.knn_join(str(tmp_path / "other.npy"), 4, output=str(tmp_path / "join.parquet"), chunk_rows=2_000)
    t = {c: col.to_numpy() for c, col in zip(pq.read_table(out).column_names, pq.read_table(out).columns)}
    assert len(t["query"]) == 4 * len(other) and t["query"].max() == len(other) - 1
    o = np.lexsort((t["rank"], t["query"]))
    np.testing.assert_array_equal(t["query"][o], np.repeat(np.arange(len(other)), 4))
    np.testing.assert_array_equal(t["rank"][o], np.tile(np.arange(1, 5), len(other)))
    assert_knn_ids_match(pts, other, t["distance"][o].reshape(-1, 4), t["id"][o].reshape(-1, 4), 4, min_separated=sep)
    # all-kNN of the distributed set itself, excluding each point
    sd, si = cluster.knn_join(k=3, self_join=True, chunk_rows=10_000)
    assert_knn_ids_match(pts, pts, sd, si, 3, self_rows=np.arange(len(pts)), min_separated=sep)
    assert np.all(sd[500:1000, 0] == 0) and np.all(sd[:500, 0] == 0), "duplicates are each other's neighbours"
    np.testing.assert_array_equal(si[:500, 0], np.arange(500, 1000))
    np.testing.assert_array_equal(si[500:1000, 0], np.arange(500))
    # ... and written to Parquet: query = the point's id
    out = cluster.knn_join(k=3, self_join=True, output=str(tmp_path / "self.parquet"), chunk_rows=7_000)
    t = {c: col.to_numpy() for c, col in zip(pq.read_table(out).column_names, pq.read_table(out).columns)}
    o = np.lexsort((t["rank"], t["query"]))
    np.testing.assert_array_equal(t["query"][o], np.repeat(np.arange(len(pts)), 3))
    np.testing.assert_array_equal(t["id"][o].reshape(-1, 3), si)
    np.testing.assert_array_equal(t["distance"][o].reshape(-1, 3), sd)
    with pytest.raises(ValueError, match="self_join=True"):
        cluster.knn_join(None, 3)
    with pytest.raises(ValueError, match="other_points=None"):
        cluster.knn_join(other, 3, self_join=True)


def test_knn_join_with_user_ids_array_stream_file_and_self_join(cluster, tmp_path):
    import pyarrow.parquet as pq

    rng = np.random.default_rng(32)
    pts = rng.random((30_000, 2))
    uid = rng.choice(10**12, size=len(pts), replace=False)  # unsorted user ids
    other = rng.random((5_000, 2))
    cluster.distribute_data(pts, ids=uid)
    d, i = cluster.knn_join(other, 5)
    assert_knn_ids_match(pts, other, d, i, 5, row_ids=uid)
    # a stream of chunks of uneven sizes, answers chunk by chunk in order
    parts = [other[:1], other[1:1_234], other[1_234:]]
    got = list(cluster.knn_join(iter(parts), 5))
    assert [len(g[0]) for g in got] == [len(p) for p in parts]
    assert_knn_ids_match(pts, other, np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got]), 5,
                         row_ids=uid)
    # written to Parquet from a CSV file, chunk by chunk
    import pyarrow as pa
    import pyarrow.csv as pv

    pv.write_csv(pa.table({"x": other[:, 0], "y": other[:, 1]}), tmp_path / "other.csv")
    out = cluster.knn_join(str(tmp_path / "other.csv"), 5, columns="x,y", output=str(tmp_path / "j.parquet"),
                           chunk_rows=1_500)
    t = pq.read_table(out).to_pydict()
    o = np.lexsort((t["rank"], t["query"]))
    np.testing.assert_array_equal(np.asarray(t["query"])[o], np.repeat(np.arange(len(other)), 5))
    assert_knn_ids_match(pts, other, np.asarray(t["distance"])[o].reshape(-1, 5),
                         np.asarray(t["id"])[o].reshape(-1, 5), 5, row_ids=uid)
    # the self-join: rows in distribute_data order, neighbours as user ids
    sd, si = cluster.knn_join(k=4, self_join=True, chunk_rows=8_000)
    assert_knn_ids_match(pts, pts, sd, si, 4, row_ids=uid, self_rows=np.arange(len(pts)))
    out = cluster.knn_join(k=4, self_join=True, output=str(tmp_path / "s.parquet"))
    t = pq.read_table(out).to_pydict()
    o = np.lexsort((t["rank"], t["query"]))
    q = np.asarray(t["query"])[o].reshape(-1, 4)
    assert (q == q[:, :1]).all()
    rows = np.argsort(uid)[np.searchsorted(np.sort(uid), q[:, 0])]
    np.testing.assert_array_equal(uid[rows], q[:, 0])
    np.testing.assert_array_equal(np.sort(rows), np.arange(len(pts)))
    np.testing.assert_array_equal(np.asarray(t["id"])[o].reshape(-1, 4), si[rows])
    np.testing.assert_array_equal(np.asarray(t["distance"])[o].reshape(-1, 4), sd[rows])


def test_knn_join_stream_keeps_one_answer_per_chunk_even_for_an_empty_chunk(cluster):
    """Answers of a stream are matched to its chunks by position: an empty chunk gets an empty answer."""
    rng = np.random.default_rng(33)
    pts = rng.random((10_000, 2))
    cluster.distribute_data(pts)
    parts = [rng.random((300, 2)), np.empty((0, 2)), rng.random((200, 2))]
    got = list(cluster.knn_join(iter(parts), 3))
    assert [g[0].shape for g in got] == [(300, 3), (0, 3), (200, 3)]
    for p, (d, i) in zip(parts, got):
        if len(p):
            assert_knn_ids_match(pts, p, d, i, 3)


def test_self_join_after_ingest_follows_point_ids(cluster):
    rng = np.random.default_rng(34)
    pts = rng.random((15_000, 2))
    uid = rng.choice(10**9, size=len(pts), replace=False)
    cluster.distribute_data(pts, ids=uid)
    new = rng.random((5_000, 2)) * 1.2 - 0.1
    new_uid = 10**9 + rng.choice(10**9, size=len(new), replace=False)
    cluster.ingest(new, ids=new_uid)
    allp, alli = np.concatenate([pts, new]), np.concatenate([uid, new_uid])
    order = np.argsort(alli)
    assert np.array_equal(cluster.point_ids(), alli[order])
    sd, si = cluster.knn_join(k=3, self_join=True)
    assert_knn_ids_match(allp, allp[order], sd, si, 3, row_ids=alli, self_rows=order)
    d, i = cluster.knn_join(new[:2_000] + 1e-3, 3)
    assert_knn_ids_match(allp, new[:2_000] + 1e-3, d, i, 3, row_ids=alli)


def test_distance_matrix_in_memory_on_disk_and_too_big(cluster, tmp_path):
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(3)
    a, b = rng.random((1_500, 3)), rng.random((900, 3))
    np.testing.assert_allclose(cluster.distance_matrix(a, b, tile_rows=400), cdist(a, b), rtol=0, atol=1e-12)
    np.testing.assert_allclose(cluster.distance_matrix(a[:300]), cdist(a[:300], a[:300]), rtol=0, atol=1e-12)
    with pytest.raises(MemoryError, match="output='matrix.npy'"):
        cluster.distance_matrix(a, b, memory_budget=1_000_000)
    path = tmp_path / "dm.npy"
    cluster.distance_matrix(a, b, output=str(path), memory_budget=1_000_000, tile_rows=512)
    np.testing.assert_allclose(np.load(path), cdist(a, b), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="same dimension"):
        cluster.distance_matrix(a, b[:, :2])


def test_typed_query_api_runs_the_named_methods(cluster):
    from scipy.spatial import cKDTree

    from distspatial import QueryParameters, QueryType
    from distspatial.typed_queries import Clustering, DistanceMatrix, NearestNeighbors, RangeSearch

    rng = np.random.default_rng(8)
    pts = rng.random((5_000, 2))
    cluster.distribute_data(pts)
    tree = cKDTree(pts)
    q = rng.random((20, 2))
    r = cluster.query(QueryType.KNearestNeighbors, QueryParameters(query_point=q, k=3))
    assert isinstance(r, NearestNeighbors)
    np.testing.assert_allclose(r.distances, tree.query(q, 3)[0], rtol=0, atol=1e-12)
    r = cluster.query("RangeSearch", QueryParameters(query_point=q[0], radius=0.05))
    assert isinstance(r, RangeSearch) and np.array_equal(r.ids, np.sort(tree.query_ball_point(q[0], 0.05)))
    r = cluster.query(QueryType.BoxSearch, QueryParameters(lo=[0.1, 0.1], hi=[0.2, 0.3], return_points=True))
    inside = np.flatnonzero(((pts >= [0.1, 0.1]) & (pts <= [0.2, 0.3])).all(1))
    assert np.array_equal(r.ids, inside) and np.array_equal(r.points, pts[inside])
    r = cluster.query(QueryType.KNNJoin, QueryParameters(other_points=q, k=2))
    np.testing.assert_allclose(r.distances, tree.query(q, 2)[0], rtol=0, atol=1e-12)
    r = cluster.query(QueryType.DistanceMatrix, QueryParameters(other_points=q))
    assert isinstance(r, DistanceMatrix) and r.matrix.shape == (20, 20)
    r = cluster.query(QueryType.KMeans, QueryParameters(n_clusters=4, seed=2))
    assert isinstance(r, Clustering) and r.labels.shape == (5_000,) and r.centroids.shape == (4, 2)
    r = cluster.query(QueryType.Hierarchical, QueryParameters(n_clusters=3))
    assert r.linkage.shape[1] == 4 and set(np.unique(r.labels)) == {0, 1, 2}
    with pytest.raises(ValueError, match=r"KNearestNeighbors needs QueryParameters\(k=...\)"):
        cluster.query(QueryType.KNearestNeighbors, QueryParameters(query_point=q))
    with pytest.raises(ValueError, match="unknown query type"):
        cluster.query("nearest", QueryParameters())


def test_notebook_html_and_progress_bars(cluster, capsys):
    import io

    from distspatial.core import progress

    rng = np.random.default_rng(2)
    cluster.distribute_data(rng.random((3_000, 2)))
    html = cluster._repr_html_()
    assert "<table>" in html and html.count("<tr><td>") == 3 and "alive" in html
    st = cluster.statistics()._repr_html_()
    assert "<table>" in st and "MB sent" in st and st.count("<tr><td>") == 3
    # progress bars: silent off a terminal (pytest captures stderr, which is not a TTY)
    cluster.distributed_kmeans(3, max_iterations=5, seed=1)
    assert "k-means" not in capsys.readouterr().err
    buf = io.StringIO()
    bar = progress.make_bar(5, "k-means", True, stream=buf, force=True, backend="line", min_interval=0)
    bar.update(5)
    bar.set_postfix(inertia="1.5")
    bar.close()
    assert "k-means" in buf.getvalue() and "inertia" in buf.getvalue()


def _dbscan_data(kind, d, seed):
    rng = np.random.default_rng(seed)
    if kind == "blobs":
        X, _ = make_blobs(6_000, n_features=d, centers=5, cluster_std=0.5, random_state=seed, center_box=(-8, 8))
        return np.concatenate([X, rng.uniform(-10, 10, (600, d))])
    if kind == "uniform":
        return rng.random((5_000, d))
    base = rng.random((800, d)).round(2)  # duplicate-heavy: many points on few grid values
    return base[rng.integers(0, len(base), 5_000)]


@pytest.mark.parametrize("kind,d,eps,ms", [
    ("blobs", 2, 0.3, 8), ("blobs", 3, 0.6, 10), ("blobs", 5, 1.2, 6),
    ("uniform", 2, 0.02, 5), ("uniform", 3, 0.08, 6), ("duplicates", 2, 0.015, 12), ("duplicates", 3, 0.05, 20),
])
def test_dbscan_matches_sklearn(cluster, kind, d, eps, ms):
    from sklearn.cluster import DBSCAN

    X = _dbscan_data(kind, d, seed=d)
    cluster.distribute_data(X)
    res = cluster.distributed_dbscan(eps, ms)
    ref = DBSCAN(eps=eps, min_samples=ms).fit(X)
    assert np.array_equal(res.core_sample_indices, ref.core_sample_indices_), "same core points"
    assert np.array_equal(res.labels == -1, ref.labels_ == -1), "same noise"
    core = ref.core_sample_indices_
    assert np.array_equal(res.labels[core], ref.labels_[core]), "same clusters, numbered as sklearn"
    assert res.n_clusters == ref.labels_.max() + 1
    # a border point joins a cluster of some core point within eps
    border = np.setdiff1d(np.flatnonzero(res.labels >= 0), core)
    for b in border[:200]:
        near = core[np.sqrt(((X[core] - X[b]) ** 2).sum(1)) <= eps]
        assert res.labels[b] in set(res.labels[near].tolist())
    if kind != "uniform":
        assert res.halo_points > 0


def test_dbscan_edge_cases_and_errors(cluster):
    from sklearn.cluster import DBSCAN

    X = _dbscan_data("blobs", 2, seed=3)
    cluster.distribute_data(X)
    tiny = cluster.distributed_dbscan(1e-9, 2)
    assert np.all(tiny.labels == -1) and len(tiny.core_sample_indices) == 0, "eps so small everything is noise"
    huge = cluster.distributed_dbscan(100.0, 5)
    assert np.all(huge.labels == 0) and huge.n_clusters == 1, "eps so large everything is one cluster"
    one = cluster.distributed_dbscan(0.2, 1)
    ref = DBSCAN(eps=0.2, min_samples=1).fit(X)
    assert len(one.core_sample_indices) == len(X) and np.array_equal(one.labels, ref.labels_)
    with pytest.raises(ValueError, match="eps must be"):
        cluster.distributed_dbscan(0, 3)
    with pytest.raises(ValueError, match="min_samples"):
        cluster.distributed_dbscan(0.1, 0)


def test_dbscan_with_user_ids_after_ingest(cluster):
    from sklearn.cluster import DBSCAN

    X = _dbscan_data("blobs", 2, seed=11)
    ids = np.arange(len(X))[::-1] * 5 + 7
    cluster.distribute_data(X[:5_000], ids=ids[:5_000])
    cluster.ingest(X[5_000:], ids=ids[5_000:])  # the rest arrives live
    res = cluster.distributed_dbscan(0.3, 8)
    order = cluster.point_ids()  # labels follow ascending ids after an ingest
    rows = np.argsort(ids)
    assert np.array_equal(order, ids[rows])
    ref = DBSCAN(eps=0.3, min_samples=8).fit(X[rows])
    assert np.array_equal(res.core_sample_indices, ref.core_sample_indices_)
    assert np.array_equal(res.labels[ref.core_sample_indices_], ref.labels_[ref.core_sample_indices_])


@pytest.mark.parametrize("kind,d", [("blobs", 2), ("uniform", 3), ("duplicates", 2), ("blobs", 5), ("duplicates", 3)])
def test_knn_join_and_self_join_on_varied_data(cluster, kind, d):
    from scipy.spatial import cKDTree

    X = _dbscan_data(kind, d, seed=d + 20)
    cluster.distribute_data(X)
    other = _dbscan_data(kind, d, seed=d + 21)[:2_000] + 1e-3
    tree = cKDTree(X)
    dist, ids = cluster.knn_join(other, 4)
    np.testing.assert_allclose(dist, tree.query(other, 4)[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.sqrt(((X[ids] - other[:, None]) ** 2).sum(-1)), dist, rtol=0, atol=1e-12)
    # ids equal cKDTree's wherever the distances are not tied (the duplicate-heavy data is mostly ties)
    min_sep = 0.0 if kind == "duplicates" else 0.99
    assert_knn_ids_match(X, other, dist, ids, 4, min_separated=min_sep)
    sd, si = cluster.knn_join(k=2, self_join=True)
    rd, _ = tree.query(X, 3)
    np.testing.assert_allclose(sd, rd[:, 1:], rtol=0, atol=1e-12)  # duplicates: distance 0 to a twin
    assert not np.any(si == np.arange(len(X))[:, None])
    assert_knn_ids_match(X, X, sd, si, 2, self_rows=np.arange(len(X)), min_separated=min_sep)
