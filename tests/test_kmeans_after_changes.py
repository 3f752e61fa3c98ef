"""Distributed k-means after the data changed (ingest, delete, update, partition splits, checkpoint/restore,
chunked and out-of-core loads), checked against scikit-learn's Lloyd from the same explicit init.

The points in label order come from the tests' own bookkeeping: the rows given to ``distribute_data`` (or the
file's rows) while nothing changed, else every live id in ascending order (README: "algorithm labels follow
``cluster.point_ids()``"); ``point_ids()`` itself is checked against that order, not trusted.
"""

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from distspatial import DistributedSpatialCluster, NodeConfig


def _cfg(n=3, **kw):
    return NodeConfig().with_node_count(n).with_partitions_per_node(2).replace(cpus_per_node=0.2, **kw)


@pytest.fixture(scope="module")
def cluster(ray_local):
    with DistributedSpatialCluster(_cfg()) as c:
        yield c


def _blobs(n, seed, d=2, centers=8, std=1.0, box=(-10, 10)):
    """Overlapping Gaussian blobs: continuous coordinates (no ties), Lloyd needs tens of iterations."""
    X, _ = make_blobs(n, n_features=d, centers=centers, cluster_std=std, random_state=seed, center_box=box)
    return X


def _init(X, k, seed):
    return X[np.random.default_rng(seed).choice(len(X), k, replace=False)].copy()


def assert_matches_sklearn(res, X, init, max_iter, tol=0.0):
    """Same iterations, centroids and inertia as scikit-learn's Lloyd from ``init``; the same label for every
    point that is not (numerically) equidistant from its two nearest centroids."""
    k = len(init)
    ref = KMeans(k, init=init, n_init=1, algorithm="lloyd", max_iter=max_iter, tol=tol).fit(X)
    assert res.labels.shape == (len(X),)
    assert res.n_iter == ref.n_iter_, f"iterations: {res.n_iter} vs scikit-learn's {ref.n_iter_}"
    np.testing.assert_allclose(res.centroids, ref.cluster_centers_, rtol=1e-7, atol=1e-9)
    assert res.inertia == pytest.approx(ref.inertia_, rel=1e-9)
    d2 = ((X[:, None, :] - ref.cluster_centers_[None, :, :]) ** 2).sum(axis=2)
    two = np.sort(d2, axis=1)[:, :2]
    clear = two[:, 1] - two[:, 0] > 1e-9 * (1.0 + two[:, 1])
    assert clear.mean() > 0.999, "the data has too many ties to compare labels"
    np.testing.assert_array_equal(res.labels[clear], ref.labels_[clear])
    return ref


# -- live updates ------------------------------------------------------------------------------------------------
def test_after_ingest_with_automatic_ids(cluster):
    X = _blobs(20_000, seed=1)
    cluster.distribute_data(X)
    # a batch inside the data and one far outside the original bounds: the clusters move
    new = np.concatenate([_blobs(6_000, seed=2), _blobs(4_000, seed=3) * 0.5 + 25.0])
    ids = cluster.ingest(new)
    assert np.array_equal(ids, np.arange(20_000, 30_000))
    allp = np.concatenate([X, new])
    assert np.array_equal(cluster.point_ids(), np.arange(len(allp)))
    init = _init(allp, 7, seed=4)
    res = cluster.distributed_kmeans(7, 60, tol=0, init=init)
    assert_matches_sklearn(res, allp, init, 60)


def test_after_ingest_delete_and_update_with_user_ids(cluster):
    rng = np.random.default_rng(5)
    X = _blobs(20_000, seed=6, d=3)
    ids = rng.choice(10**9, size=len(X), replace=False)  # unsorted user ids
    cluster.distribute_data(X, ids=ids)
    pos = dict(zip(ids.tolist(), X))
    new = _blobs(8_000, seed=7, d=3) + 3.0
    new_ids = 10**9 + rng.choice(10**9, size=len(new), replace=False)
    cluster.ingest(new, ids=new_ids)
    pos.update(zip(new_ids.tolist(), new))
    gone = np.concatenate([ids[rng.choice(len(ids), 2_000, replace=False)], new_ids[:500]])
    assert cluster.delete(gone) == len(gone)
    for i in gone.tolist():
        del pos[i]
    live = np.array(sorted(pos))
    moved = rng.choice(live, 3_000, replace=False)
    to = rng.normal(0.0, 4.0, (len(moved), 3))
    assert cluster.update(moved, to) == len(moved)
    pos.update(zip(moved.tolist(), to))
    want_ids = np.array(sorted(pos))
    assert np.array_equal(cluster.point_ids(), want_ids), "labels follow ascending ids after live updates"
    allp = np.array([pos[i] for i in want_ids.tolist()])
    init = _init(allp, 6, seed=8)
    res = cluster.distributed_kmeans(6, 60, tol=0, init=init)
    assert_matches_sklearn(res, allp, init, 60)


def test_tol_is_relative_to_the_variance_of_the_current_points(cluster):
    """tol follows scikit-learn's convention (docstring): relative to the mean per-dimension variance of the
    data clustered, i.e. after an ingest of the points there now, not of those distributed first."""
    X = _blobs(20_000, seed=9)
    cluster.distribute_data(X)
    new = _blobs(10_000, seed=10) * 3.0 + 20.0  # the variance grows about tenfold
    cluster.ingest(new)
    allp = np.concatenate([X, new])
    init = _init(X, 6, seed=11)
    strict = KMeans(6, init=init, n_init=1, algorithm="lloyd", max_iter=100, tol=0).fit(allp)
    ref = KMeans(6, init=init, n_init=1, algorithm="lloyd", max_iter=100, tol=1e-3).fit(allp)
    assert ref.n_iter_ < strict.n_iter_, "tol must matter on this data for the test to mean anything"
    res = cluster.distributed_kmeans(6, 100, tol=1e-3, init=init)
    assert_matches_sklearn(res, allp, init, 100, tol=1e-3)


# -- partition splits ------------------------------------------------------------------------------------------
def test_after_split_partition(cluster):
    X = _blobs(24_000, seed=12, d=2, std=1.5)
    meta = cluster.distribute_data(X)
    biggest = sorted(meta.partitions, key=lambda p: -p.size)[:2]
    for p in biggest:
        cluster.split_partition(p.partition_id)
    assert cluster.metadata.n_partitions == meta.n_partitions + 2
    assert cluster.metadata.n_points == len(X)
    order = cluster.point_ids()
    assert np.array_equal(np.sort(order), np.arange(len(X)))
    allp = X[order]  # documented: distribute_data rows, or ascending ids after live updates: both are X here
    init = _init(X, 8, seed=13)
    res = cluster.distributed_kmeans(8, 60, tol=0, init=init)
    assert_matches_sklearn(res, allp, init, 60)


def test_after_ingest_into_a_hot_spot_splits_partitions(cluster):
    rng = np.random.default_rng(14)
    X = _blobs(16_000, seed=14)
    meta = cluster.distribute_data(X)
    hot = np.array([1.0, -2.0]) + rng.normal(0, 0.3, (24_000, 2))
    for chunk in np.array_split(hot, 4):
        cluster.ingest(chunk)
    assert cluster.metadata.n_partitions > meta.n_partitions, "grown partitions were split"
    allp = np.concatenate([X, hot])
    assert np.array_equal(cluster.point_ids(), np.arange(len(allp)))
    init = _init(allp, 6, seed=15)
    res = cluster.distributed_kmeans(6, 60, tol=0, init=init)
    assert_matches_sklearn(res, allp, init, 60)


# -- chunked loads -----------------------------------------------------------------------------------------------
def test_after_distribute_chunks_from_a_file(cluster, tmp_path):
    from distspatial.io import write_results

    X = _blobs(30_000, seed=16, d=3)
    path = tmp_path / "pts.parquet"
    write_results(str(path), {"x": X[:, 0], "y": X[:, 1], "z": X[:, 2]})
    cluster.distribute_chunks(str(path), columns="x,y,z", chunk_rows=4_000, sample_size=3_000)
    assert np.array_equal(cluster.point_ids(), np.arange(len(X))), "ids are the file's rows"
    init = _init(X, 6, seed=17)
    res = cluster.distributed_kmeans(6, 60, tol=0, init=init)
    assert_matches_sklearn(res, X, init, 60)
    # tol relative to the variance of the file's points (computed chunk by chunk)
    res = cluster.distributed_kmeans(6, 60, tol=1e-3, init=init)
    assert_matches_sklearn(res, X, init, 60, tol=1e-3)


def test_after_distribute_chunks_from_a_callable_with_user_ids(cluster):
    rng = np.random.default_rng(18)
    X = _blobs(30_000, seed=18)
    ids = rng.choice(10**12, size=len(X), replace=False)  # unsorted: labels follow ascending ids
    cluster.distribute_chunks(lambda: ((X[a:a + 7_000], ids[a:a + 7_000]) for a in range(0, len(X), 7_000)),
                              sample_size=4_000)
    order = np.argsort(ids)
    assert np.array_equal(cluster.point_ids(), ids[order])
    init = _init(X, 7, seed=19)
    res = cluster.distributed_kmeans(7, 60, tol=0, init=init)
    assert_matches_sklearn(res, X[order], init, 60)


def test_out_of_core_cli_kmeans_is_a_lloyd_fixed_point_and_optimal(ray_local, tmp_path, capsys):
    """The CLI has no explicit init, so: its centroids and labels must be a fixed point of scikit-learn's Lloyd
    (it ran to convergence with --tol 0), and on well-separated blobs reach scikit-learn's best inertia."""
    import pyarrow as pa
    import pyarrow.csv as pv
    import pyarrow.parquet as pq

    from distspatial.ui.cli import main

    rng = np.random.default_rng(20)
    X = _blobs(20_000, seed=20, centers=5, std=0.6, box=(-20, 20))
    ids = rng.choice(10**9, size=len(X), replace=False)
    pq.write_table(pa.table({"x": X[:, 0], "y": X[:, 1], "id": ids}), tmp_path / "pts.parquet", row_group_size=3_000)
    rc = main(["kmeans", str(tmp_path / "pts.parquet"), "--columns", "x,y", "--id-column", "id", "--out-of-core",
               "--chunk-rows", "3000", "-k", "5", "--seed", "2", "--tol", "0", "--max-iter", "300", "--nodes", "2",
               "--no-progress", "-o", str(tmp_path / "labels.csv"), "--centroids", str(tmp_path / "c.parquet")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "out of core" in out.out
    lab = pv.read_csv(tmp_path / "labels.csv").to_pydict()
    row = {v: i for i, v in enumerate(ids.tolist())}
    rows = np.array([row[v] for v in lab["id"]])
    assert np.array_equal(np.sort(rows), np.arange(len(X))), "one label per input point"
    labels = np.asarray(lab["label"])
    cent = pq.read_table(tmp_path / "c.parquet").to_pydict()
    C = np.column_stack([cent["x"], cent["y"]])
    Xo = X[rows]
    ref = KMeans(5, init=C, n_init=1, algorithm="lloyd", max_iter=300, tol=0).fit(Xo)
    assert ref.n_iter_ <= 2, "the CLI's centroids are not a fixed point of Lloyd"  # 2: labels stable once more
    np.testing.assert_allclose(ref.cluster_centers_, C, rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(labels, ref.labels_)
    best = KMeans(5, n_init=10, random_state=0).fit(X)
    assert ref.inertia_ == pytest.approx(best.inertia_, rel=1e-6)
    # the same file in memory gives the same clusters (up to numbering)
    rc = main(["kmeans", str(tmp_path / "pts.parquet"), "--columns", "x,y", "--id-column", "id", "-k", "5",
               "--seed", "2", "--tol", "0", "--nodes", "2", "--no-progress", "-o", str(tmp_path / "mem.csv")])
    assert rc == 0, capsys.readouterr().err
    mem = pv.read_csv(tmp_path / "mem.csv").to_pydict()
    assert np.array_equal(mem["id"], ids), "in memory: labels in the file's row order"
    by_id = dict(zip(lab["id"], labels.tolist()))
    pairs = set(zip(mem["label"], [by_id[i] for i in mem["id"]]))
    assert len(pairs) == 5


# -- checkpoint / restore ----------------------------------------------------------------------------------------
def test_after_restore_of_an_unchanged_data_set_with_user_ids(ray_local, tmp_path):
    rng = np.random.default_rng(21)
    X = _blobs(20_000, seed=21, d=2)
    ids = rng.choice(10**12, size=len(X), replace=False)
    with DistributedSpatialCluster(_cfg(3)) as c:
        c.distribute_data(X, ids=ids)
        c.checkpoint(str(tmp_path / "ck"))
    with DistributedSpatialCluster.restore(str(tmp_path / "ck"), _cfg(2)) as r:
        assert np.array_equal(r.point_ids(), ids), "unchanged: labels in distribute_data row order"
        init = _init(X, 6, seed=22)
        res = r.distributed_kmeans(6, 60, tol=0, init=init)
        assert_matches_sklearn(res, X, init, 60)
        res = r.distributed_kmeans(6, 60, tol=1e-3, init=init)
        assert_matches_sklearn(res, X, init, 60, tol=1e-3)


def test_after_restore_of_a_data_set_changed_live(ray_local, tmp_path):
    rng = np.random.default_rng(23)
    X = _blobs(16_000, seed=23, d=2)
    with DistributedSpatialCluster(_cfg(3)) as c:
        c.distribute_data(X)
        new = _blobs(8_000, seed=24) + np.array([4.0, -3.0])
        c.ingest(new)
        gone = rng.choice(16_000, 1_000, replace=False)
        c.delete(gone)
        pid = max(c.metadata.partitions, key=lambda p: p.size).partition_id
        c.split_partition(pid)
        c.checkpoint(str(tmp_path / "ck"))
    allp = np.concatenate([X, new])
    keep = np.setdiff1d(np.arange(len(allp)), gone)
    with DistributedSpatialCluster.restore(str(tmp_path / "ck"), _cfg(2)) as r:
        assert np.array_equal(r.point_ids(), keep), "changed live: labels follow ascending ids"
        init = _init(allp[keep], 7, seed=25)
        res = r.distributed_kmeans(7, 60, tol=0, init=init)
        assert_matches_sklearn(res, allp[keep], init, 60)
        # ... and after more changes on the restored cluster
        more = _blobs(5_000, seed=26) - 6.0
        new_ids = r.ingest(more)
        assert new_ids.min() == len(allp)
        allq = np.concatenate([allp[keep], more])
        res = r.distributed_kmeans(7, 60, tol=0, init=init)
        assert_matches_sklearn(res, allq, init, 60)
