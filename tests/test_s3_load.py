"""``distribute_files`` from an S3-compatible object store: moto's S3 server (a real HTTP server on localhost, the
stand-in for the external service only) holds Parquet and CSV point files; the Ray node actors (separate
processes) open them themselves through the ``s3://`` URI, whose user info and query string carry the
credentials and the endpoint (no environment variables). Answers are checked against scipy's cKDTree over the
files' points in input order (a directory's files sorted by key, rows in file order: ids are those row numbers,
as in ``tests/test_parallel_load.py``). Errors name the file and never show the secret key."""

from __future__ import annotations

import logging
import socket
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from scipy.spatial import cKDTree

pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'moto[server]')")
pytest.importorskip("flask", reason="moto[server] is not installed (pip install 'moto[server]')")

from distspatial import DistributedSpatialCluster, NodeConfig
from distspatial.io.files import DataFileError

BUCKET = "points"
ACCESS_KEY = "testingAccessKey"
SECRET_KEY = "sEcReT/with+slash=Sign"  # a "/" and a "+": percent-escaped in the URI
SECRET_FORMS = (SECRET_KEY, quote(SECRET_KEY, safe=""), "sEcReT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parquet_bytes(pts: np.ndarray, row_group: int) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({n: pts[:, j] for j, n in enumerate("xyz"[:pts.shape[1]])}), sink,
                   row_group_size=row_group)
    return sink.getvalue().to_pybytes()


def _csv_bytes(pts: np.ndarray) -> bytes:
    lines = [",".join("xyz"[:pts.shape[1]])] + [",".join(repr(float(v)) for v in row) for row in pts]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free localhost port, a bucket with point files; yields ``(uri(key), points)``:
    ``uri("pts/")`` is the ``s3://`` URI of a key with the credentials and the endpoint, and ``points`` the
    3-D points of ``pts/`` in input order (keys sorted)."""
    from moto.server import ThreadedMotoServer
    from pyarrow import fs as pafs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"127.0.0.1:{port}"
        store = pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, endpoint_override=endpoint,
                                  scheme="http", region="us-east-1", allow_bucket_creation=True)
        store.create_dir(BUCKET)
        rng = np.random.default_rng(21)
        pts = rng.random((12_000, 3))
        pts[:3000] = 0.3 + 0.05 * rng.standard_normal((3000, 3))  # a dense cluster: partitions of unequal extent
        cuts = [0, 4000, 6500, 8000, 10_500, 12_000]
        files = {  # key -> bytes; keys in sorted order are the input order
            "pts/a0.parquet": _parquet_bytes(pts[cuts[0]:cuts[1]], 1000),  # 4 row groups
            "pts/a1.parquet": _parquet_bytes(pts[cuts[1]:cuts[2]], 700),
            "pts/b.csv": _csv_bytes(pts[cuts[2]:cuts[3]]),
            "pts/c.parquet": _parquet_bytes(pts[cuts[3]:cuts[4]], 1000),
            "pts/sub dir/d.parquet": _parquet_bytes(pts[cuts[4]:cuts[5]], 1000),  # a space: percent-escaped
            "pts/_SUCCESS": b"",  # dataset writers' marker: skipped
        }
        bad = pts[:200].copy()
        bad_csv = _csv_bytes(bad).decode().splitlines()
        bad_csv[1 + 123] = "0.5,abc,0.25"
        files["bad/a.parquet"] = _parquet_bytes(bad, 100)
        files["bad/z.csv"] = ("\n".join(bad_csv) + "\n").encode()
        for key, data in files.items():
            with store.open_output_stream(f"{BUCKET}/{key}") as f:
                f.write(data)

        def uri(key: str, bucket: str = BUCKET) -> str:
            return (f"s3://{ACCESS_KEY}:{quote(SECRET_KEY, safe='')}@{bucket}/{key}"
                    f"?endpoint_override={endpoint}&scheme=http&region=us-east-1")

        yield uri, pts, cuts
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(ray_local):
    c = DistributedSpatialCluster(NodeConfig().with_node_count(2).replace(cpus_per_node=0.5))
    c.progress = False
    yield c
    c.shutdown()


def _check_knn(cl, pts, seed=0, k=8):
    q = np.random.default_rng(seed).random((200, 3)) * 1.1 - 0.05
    dist, ids = cl.distributed_knn_search(q, k)
    ref_d, ref_i = cKDTree(pts).query(q, k)
    np.testing.assert_allclose(dist, ref_d, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(ids, ref_i)  # random floats: no ties, so ids compare exactly


def _assert_no_secret(err: BaseException) -> None:
    for text in (str(err), getattr(err, "path", ""), repr(err.args)):
        for secret in SECRET_FORMS:
            assert secret not in text, f"the secret key shows in the error: {text}"


def test_directory_uri_every_node_reads_from_the_store(cluster, s3):
    uri, pts, _ = s3
    meta = cluster.distribute_files(uri("pts/"))
    assert meta.n_points == len(pts) and meta.dim == 3
    _check_knn(cluster, pts)
    np.testing.assert_array_equal(cluster.point_ids(), np.arange(len(pts)))
    # both node processes read shares themselves (from the server, over HTTP), and no share twice
    reports = [ray.get(a.loading_report.remote()) for a in cluster.runtime.actors.values()]
    assert all(r["shares"] for r in reports), reports
    read = sorted(s for r in reports for s in r["shares"])
    assert read == list(range(len(read))) and len(read) >= 5
    assert sum(r["points"] for r in reports) == len(pts)
    shown = repr(reports) + repr(ray.get(cluster.runtime.controller.file_load_report.remote()))
    assert "sub%20dir/d.parquet" in shown and "b.csv" in shown
    assert not any(s in shown for s in SECRET_FORMS), "reports show the paths without credentials"


def test_single_file_and_glob_uris(cluster, s3):
    uri, pts, cuts = s3
    meta = cluster.distribute_files(uri("pts/b.csv"))  # one CSV file
    assert meta.n_points == cuts[3] - cuts[2]
    _check_knn(cluster, pts[cuts[2]:cuts[3]], seed=1)
    meta = cluster.distribute_files(uri("pts/a1.parquet"))  # one Parquet file, cut by row groups
    assert meta.n_points == cuts[2] - cuts[1]
    _check_knn(cluster, pts[cuts[1]:cuts[2]], seed=2)
    # a glob: "*" within one directory (sub dir/ left out), in sorted key order
    meta = cluster.distribute_files(uri("pts/*.parquet"))
    want = np.concatenate([pts[cuts[0]:cuts[2]], pts[cuts[3]:cuts[4]]])
    assert meta.n_points == len(want)
    _check_knn(cluster, want, seed=3)
    # "**": any depth; a list of URIs keeps its order
    meta = cluster.distribute_files([uri("pts/**/d.parquet"), uri("pts/a0.parquet")])
    _check_knn(cluster, np.concatenate([pts[cuts[4]:], pts[:cuts[1]]]), seed=4)


def test_missing_object_and_bucket_name_the_file_without_the_secret(cluster, s3):
    uri, pts, cuts = s3
    cluster.distribute_files(uri("pts/c.parquet"))
    dataset = cluster.metadata.dataset_id
    with pytest.raises(DataFileError) as err:
        cluster.distribute_files([uri("pts/a0.parquet"), uri("pts/nope.parquet")])
    assert "s3://points/pts/nope.parquet" in str(err.value) and "no such file" in str(err.value)
    assert err.value.path.startswith("s3://points/pts/nope.parquet")
    _assert_no_secret(err.value)
    with pytest.raises(DataFileError) as err:
        cluster.distribute_files(uri("pts/x.parquet", bucket="no-such-bucket"))
    assert "s3://no-such-bucket/pts/x.parquet" in str(err.value)
    assert "bucket 'no-such-bucket' does not exist" in str(err.value)
    _assert_no_secret(err.value)
    with pytest.raises(DataFileError, match="matches no point file") as err:
        cluster.distribute_files(uri("pts/*.npy"))
    _assert_no_secret(err.value)
    with pytest.raises(DataFileError, match="cannot open the filesystem") as err:  # pyarrow's message quotes the URI
        cluster.distribute_files(uri("pts/a space.parquet"))
    assert "s3://points/pts/a space.parquet" in str(err.value)
    _assert_no_secret(err.value)
    assert cluster.metadata.dataset_id == dataset, "nothing was published"
    _check_knn(cluster, pts[cuts[3]:cuts[4]], seed=5)  # the previous data set still answers


def test_bad_value_found_by_a_node_names_file_row_column_without_the_secret(cluster, s3):
    uri, _, _ = s3
    with pytest.raises(DataFileError) as err:
        cluster.distribute_files(uri("bad/"))  # CSV values are checked by the node that reads the file
    e = err.value
    assert e.path.startswith("s3://points/bad/z.csv") and e.row == 123 and e.column == "y", str(e)
    assert "read by node" in str(e) and "abc" in str(e)
    _assert_no_secret(e)
