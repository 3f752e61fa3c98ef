"""The README's main job: `distspatial demo`, run for real (small sizes) in its own process and Ray runtime."""

import subprocess
import sys

import pytest


def test_demo_runs_and_checks_itself():
    out = subprocess.run(
        [sys.executable, "-m", "distspatial.ui.cli", "demo", "--points", "60000", "--queries", "5000", "--nodes", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "demo PASSED" in text
    assert "distances exact" in text and "range_search" in text and "distributed_kmeans" in text
    assert "load balance" in text  # the statistics report


@pytest.mark.parametrize("args, message", [
    (["demo", "--points", "0"], "must be >= 1"),
    (["demo", "--curve", "peano"], "invalid choice"),
    (["nonsense"], "invalid choice"),
])
def test_cli_rejects_bad_arguments(args, message):
    out = subprocess.run([sys.executable, "-m", "distspatial.ui.cli", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr


# -- subcommands on point files ----------------------------------------------------------------------------------
# Ray costs seconds to start, so these share the module's runtime (conftest.ray_local): in-process calls attach to
# it, subprocesses join it with --address (and only disconnect). Errors are caught before Ray starts.
import os  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.csv as pv  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

from distspatial.ui.cli import main  # noqa: E402

CLI = os.path.join(os.path.dirname(sys.executable), "distspatial")  # the console script of this venv


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(3)
    centres = np.array([[0.0, 0.0], [5.0, 5.0], [0.0, 6.0]])
    pts = np.concatenate([c + rng.standard_normal((1000, 2)) * 0.4 for c in centres])
    ids = np.arange(len(pts), dtype=np.int64) * 7 + 5
    q = rng.uniform(-1, 6, (40, 2))
    pq.write_table(pa.table({"x": pts[:, 0], "y": pts[:, 1], "id": ids, "name": ["p"] * len(pts)}),
                   d / "pts.parquet", row_group_size=700)
    pv.write_csv(pa.table({"qid": np.arange(40) + 100, "x": q[:, 0], "y": q[:, 1]}), d / "queries.csv")
    np.save(d / "pts.npy", pts)
    return {"dir": d, "pts": pts, "ids": ids, "q": q}


def _gcs(ray) -> str:
    return ray.get_runtime_context().gcs_address


def test_knn_console_script(ray_local, data):
    """The installed `distspatial` script, in its own process, joined to the module's runtime by address."""
    d = data["dir"]
    out = subprocess.run(
        [CLI, "knn", str(d / "pts.parquet"), "--columns", "x,y", "--id-column", "id", "--queries",
         str(d / "queries.csv"), "--query-id-column", "qid", "-k", "5", "--nodes", "2", "--address", _gcs(ray_local),
         "--output", str(d / "knn.parquet")],
        capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "read 3,000 points of 2 dimensions (x, y)" in out.stdout and "wrote 200 rows" in out.stdout
    t = pq.read_table(d / "knn.parquet").to_pydict()
    assert list(t) == ["query", "rank", "id", "distance"]
    ref_d, ref_i = cKDTree(data["pts"]).query(data["q"], 5)
    np.testing.assert_array_equal(t["query"], np.repeat(np.arange(40) + 100, 5))
    np.testing.assert_array_equal(t["rank"], np.tile(np.arange(1, 6), 40))
    np.testing.assert_allclose(np.reshape(t["distance"], (40, 5)), ref_d, rtol=0, atol=1e-12)
    rows = (np.reshape(t["id"], (40, 5)) - 5) // 7  # back from the id column to rows
    own = np.sqrt(((data["pts"][rows] - data["q"][:, None, :]) ** 2).sum(axis=2))
    np.testing.assert_allclose(own, ref_d, rtol=0, atol=1e-12)
    assert ray_local.cluster_resources().get("CPU") == 2  # the joined runtime is still there


def test_stats_disconnects_what_it_joined(ray_local, data):
    d = data["dir"]
    code = (f"import ray; from distspatial.ui.cli import main; "
            f"rc = main(['stats', {str(d / 'pts.npy')!r}, '--nodes', '2', '--partitions', '2', '--replication', '2', "
            f"'--curve', 'morton', '--address', {_gcs(ray_local)!r}, '-o', {str(d / 'nodes.csv')!r}]); "
            f"print('RESULT', rc, ray.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert "RESULT 0 False" in out.stdout, out.stdout + out.stderr
    assert "3,000 points, 4 partitions" in out.stdout and "load balance" in out.stdout
    nodes = pv.read_csv(d / "nodes.csv").to_pydict()
    assert nodes["node_id"] == [0, 1] and sum(nodes["points"]) == 6000  # every point on both nodes (2 replicas)


def test_kmeans_in_process(ray_local, data, capsys):
    from sklearn.cluster import KMeans

    d = data["dir"]
    rc = main(["kmeans", str(d / "pts.parquet"), "--columns", "x,y", "-k", "3", "--seed", "1", "--tol", "0",
               "--nodes", "2", "--no-progress", "-o", str(d / "labels.csv"), "--centroids", str(d / "c.parquet")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "inertia" in out.out and "wrote 3 centroids" in out.out
    assert ray_local.is_initialized()  # an attached runtime is left running
    lab = pv.read_csv(d / "labels.csv").to_pydict()
    np.testing.assert_array_equal(lab["id"], np.arange(3000))  # no --id-column: row numbers
    labels = np.asarray(lab["label"])
    cent = pq.read_table(d / "c.parquet").to_pydict()
    assert list(cent) == ["cluster", "x", "y"] and len(cent["x"]) == 3
    c = np.column_stack([cent["x"], cent["y"]])
    pts = data["pts"]
    inertia = float(((pts - c[labels]) ** 2).sum())
    ref = KMeans(3, n_init=3, random_state=0).fit(pts)
    assert np.isclose(inertia, ref.inertia_, rtol=1e-9)
    pairs = set(zip(labels.tolist(), ref.labels_.tolist()))
    assert len(pairs) == 3  # the same partition up to renaming


def test_range_in_process(ray_local, data, capsys):
    d = data["dir"]
    rc = main(["range", str(d / "pts.npy"), "--queries", str(d / "queries.csv"), "--query-columns", "x,y",
               "--radius", "0.3", "--nodes", "2", "-o", str(d / "range.csv")])
    assert rc == 0, capsys.readouterr().err
    t = pv.read_csv(d / "range.csv").to_pydict()
    want = cKDTree(data["pts"]).query_ball_point(data["q"], 0.3)
    got = [sorted(i for qq, i in zip(t["query"], t["id"]) if qq == j) for j in range(40)]
    assert got == [sorted(w) for w in want]
    dist = np.linalg.norm(data["pts"][t["id"]] - data["q"][t["query"]], axis=1)
    np.testing.assert_allclose(t["distance"], dist, rtol=0, atol=1e-12)


def test_dbscan_and_hierarchical_in_process(ray_local, data, capsys):
    from sklearn.cluster import DBSCAN, AgglomerativeClustering
    from sklearn.metrics import adjusted_rand_score

    d = data["dir"]
    rc = main(["dbscan", str(d / "pts.parquet"), "--columns", "x,y", "--id-column", "id", "--eps", "0.3",
               "--min-samples", "8", "--nodes", "2", "-o", str(d / "db.csv")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    t = pv.read_csv(d / "db.csv").to_pydict()
    np.testing.assert_array_equal(t["id"], data["ids"])  # input order, reported in the id column
    ref = DBSCAN(eps=0.3, min_samples=8).fit(data["pts"])
    np.testing.assert_array_equal(t["label"], ref.labels_)
    assert f"{ref.labels_.max() + 1} clusters" in out.out
    rc = main(["hierarchical", str(d / "pts.npy"), "--n-clusters", "3", "--nodes", "2", "-o", str(d / "h.csv"),
               "--linkage-output", str(d / "Z.csv")])
    assert rc == 0, capsys.readouterr().err
    lab = pv.read_csv(d / "h.csv").to_pydict()["label"]
    agg = AgglomerativeClustering(3, linkage="ward").fit(data["pts"])
    assert adjusted_rand_score(agg.labels_, lab) > 0.95
    assert set(pv.read_csv(d / "Z.csv").to_pydict()) == {"idx1", "idx2", "distance", "count"}
    assert main(["hierarchical", str(d / "pts.npy"), "--nodes", "2"]) == 2
    assert "exactly one of --n-clusters" in capsys.readouterr().err


def test_out_of_core_reads_the_file_in_chunks(ray_local, data, capsys):
    d = data["dir"]
    rc = main(["knn", str(d / "pts.parquet"), "--columns", "x,y", "--out-of-core", "--chunk-rows", "500",
               "--queries", str(d / "queries.csv"), "--query-columns", "x,y", "-k", "3", "--nodes", "2",
               "-o", str(d / "knn_ooc.parquet")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "out of core" in out.out and "distribute_chunks" in out.out
    t = pq.read_table(d / "knn_ooc.parquet").to_pydict()
    ref_d, _ = cKDTree(data["pts"]).query(data["q"], 3)
    np.testing.assert_allclose(np.reshape(t["distance"], (40, 3)), ref_d, rtol=0, atol=1e-12)
    rc = main(["kmeans", str(d / "pts.npy"), "--out-of-core", "-k", "3", "--seed", "1", "--nodes", "2",
               "-o", str(d / "km_ooc.csv")])
    assert rc == 0, capsys.readouterr().err
    lab = pv.read_csv(d / "km_ooc.csv").to_pydict()
    np.testing.assert_array_equal(lab["id"], np.arange(3000))


def test_bench_in_process(ray_local, capsys):
    rc = main(["bench", "--points", "5000", "--queries", "500", "-k", "4", "--nodes", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "query time ratio distributed / cKDTree" in out and "answers exact" in out


@pytest.fixture(scope="module")
def bad_files(data):
    d = data["dir"]
    (d / "pts.txt").write_text("x,y\n1,2\n")
    (d / "inf.csv").write_text("x,y\n1,2\n3,4\n5,6\n7,inf\n")
    (d / "text.csv").write_text("x,y\n1,2\n3,4\n5,six\n")
    (d / "empty.csv").write_text("")
    np.save(d / "q3.npy", np.zeros((4, 3)))
    return d


@pytest.mark.parametrize("args, message", [
    (["knn", "{d}/nope.parquet", "--queries", "{d}/queries.csv"], "nope.parquet: no such file"),
    (["stats", "{d}/pts.txt"], "unknown file extension '.txt'; use one of .csv"),
    (["stats", "{d}/pts.parquet", "--columns", "x,lat"],
     "no column 'lat'; the file has the columns 'x', 'y', 'id', 'name'"),
    (["stats", "{d}/pts.parquet"], "column 'name' is not numeric (type string)"),
    (["stats", "{d}/text.csv"], "column 'y' is not numeric: data row 2 (0-based, header not counted) holds 'six'"),
    (["kmeans", "{d}/inf.csv"], "data row 3 (0-based, header not counted), column 'y' holds the non-finite value inf"),
    (["stats", "{d}/empty.csv"], "the file is empty (0 bytes)"),
    (["knn", "{d}/pts.npy", "--queries", "{d}/q3.npy"], "the queries have 3 coordinate column(s)"),
    (["knn", "{d}/pts.npy", "--queries", "{d}/queries.csv", "-k", "5000"], "-k 5000 is larger than the number"),
    (["kmeans", "{d}/pts.npy", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["knn", "{d}/pts.npy"], "the following arguments are required: --queries"),
    (["stats", "{d}/pts.npy", "-o", "{d}/out.xlsx"], "unknown file extension '.xlsx'"),
    (["stats", "{d}/pts.npy", "--nodes", "2", "--replication", "3"], "--replication 3 needs at least that many"),
    (["range", "{d}/pts.npy", "--queries", "{d}/queries.csv", "--radius", "-1"], "must be finite and >= 0"),
    (["kmeans", "{d}/pts.npy", "-k", "0"], "must be >= 1"),
])
def test_input_errors_exit_2_with_one_line(bad_files, args, message, capsys, monkeypatch):
    import distspatial

    def no_cluster(*a, **k):
        raise AssertionError("the error must be caught before a cluster starts")

    monkeypatch.setattr(distspatial, "DistributedSpatialCluster", no_cluster)
    rc = main([a.format(d=bad_files) for a in args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err and err.startswith(f"distspatial {args[0]}: error: ")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_value_in_a_real_process(bad_files):
    out = subprocess.run([CLI, "knn", str(bad_files / "inf.csv"), "--queries", str(bad_files / "queries.csv")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert "inf.csv: data row 3 (0-based, header not counted), column 'y' holds the non-finite value inf" in out.stderr


def test_demo_kmeans_check_is_independent_and_finds_wrong_answers():
    """The demo's k-means check (NumPy only) accepts scikit-learn's converged answer and rejects a wrong label,
    a wrong inertia, labels in the wrong row order and a centroid that is not the mean of its points."""
    from sklearn.cluster import KMeans

    from distspatial.ui.cli import check_kmeans

    rng = np.random.default_rng(4)
    pts = np.concatenate([c + rng.standard_normal((2_000, 2)) * 0.6 for c in ([0, 0], [4, 0], [0, 4])])
    ref = KMeans(3, n_init=1, random_state=0, tol=0, algorithm="lloyd").fit(pts)
    assert ref.n_iter_ < ref.max_iter
    C, lab, inertia = ref.cluster_centers_, ref.labels_, ref.inertia_
    assert check_kmeans(pts, C, lab, inertia, converged=True) == []
    assert check_kmeans(pts, C, lab, inertia, converged=True, block=777) == []
    d2 = ((pts[:, None] - C[None]) ** 2).sum(-1)
    far = int(np.argmin(d2[:, 0] - np.sort(d2, axis=1)[:, 1]))  # deep inside cluster 0's cell
    bad = lab.copy()
    bad[far] = (lab[far] + 1) % 3
    assert "not labelled with their nearest centroid (first: row" in " ".join(check_kmeans(pts, C, bad, inertia, True))
    assert any("inertia" in p for p in check_kmeans(pts, C, lab, inertia * 1.001, True))
    assert any("nearest centroid" in p for p in check_kmeans(pts, C, lab[::-1], inertia, True))
    C2 = C.copy()
    C2[1] += 1e-4  # labels and inertia barely change; the centroid is no longer the mean of its points
    problems = check_kmeans(pts, C2, lab, float(np.min(((pts[:, None] - C2[None]) ** 2).sum(-1), axis=1).sum()), True)
    assert problems == ["1 centroids are not the mean of their points (first: centroid 1)"], problems
    assert check_kmeans(pts, C2, lab, float(np.min(((pts[:, None] - C2[None]) ** 2).sum(-1), axis=1).sum()),
                        converged=False) == []  # not converged: centroids are not expected to be means yet


def test_knn_output_directory_written_by_the_nodes(ray_local, data, capsys):
    """``knn -o DIR/``: the nodes read the query file and write part files; their union equals cKDTree."""
    d = data["dir"]
    out_dir = str(d / "knn_parts") + "/"
    rc = main(["knn", str(d / "pts.npy"), "--queries", str(d / "queries.csv"), "--query-columns", "x,y", "-k", "4",
               "--nodes", "2", "--no-progress", "-o", out_dir])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "part files written by the nodes" in out.out
    files = sorted(os.listdir(out_dir))
    assert files and all(f.startswith("part-") and f.endswith(".parquet") for f in files)
    t = pa.concat_tables([pq.read_table(os.path.join(out_dir, f)) for f in files])
    qq, rank, dist = t["query"].to_numpy(), t["rank"].to_numpy(), t["distance"].to_numpy()
    o = np.lexsort((rank, qq))
    ref_d, _ = cKDTree(data["pts"]).query(data["q"], 4)
    np.testing.assert_array_equal(qq[o], np.repeat(np.arange(40), 4))
    np.testing.assert_allclose(dist[o].reshape(40, 4), ref_d, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(rank[o], np.tile(np.arange(1, 5), 40))  # rank from 1, as in the file output
    rc = main(["kmeans", str(d / "pts.npy"), "-k", "3", "--nodes", "2", "--no-progress", "-o", out_dir])
    assert rc != 0 and "knn and range only" in capsys.readouterr().err


def test_range_output_directory_written_by_the_nodes(ray_local, data, capsys):
    """``range -o DIR/``: the nodes read the query file and write part files (query, id, distance); their union
    equals cKDTree's query_ball_point, every (query, id) pair once."""
    d = data["dir"]
    out_dir = str(d / "range_parts") + "/"
    rc = main(["range", str(d / "pts.npy"), "--queries", str(d / "queries.csv"), "--query-columns", "x,y",
               "--radius", "0.5", "--nodes", "2", "--no-progress", "-o", out_dir])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "part files written by the nodes" in out.out
    files = sorted(os.listdir(out_dir))
    assert files and all(f.startswith("part-") and f.endswith(".parquet") for f in files)
    t = pa.concat_tables([pq.read_table(os.path.join(out_dir, f)) for f in files])
    assert t.column_names == ["query", "id", "distance"]
    qq, ids, dist = t["query"].to_numpy(), t["id"].to_numpy(), t["distance"].to_numpy()
    o = np.lexsort((ids, qq))
    pts, q = data["pts"], data["q"]
    hits = cKDTree(pts).query_ball_point(q, 0.5)
    ref_q = np.repeat(np.arange(len(q)), [len(h) for h in hits])
    ref_ids = np.concatenate([np.sort(h) for h in hits]).astype(np.int64)
    np.testing.assert_array_equal(qq[o], ref_q)
    np.testing.assert_array_equal(ids[o], ref_ids)
    np.testing.assert_allclose(dist[o], np.linalg.norm(pts[ref_ids] - q[ref_q], axis=1), rtol=0, atol=1e-12)
