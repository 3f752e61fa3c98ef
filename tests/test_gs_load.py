"""``distribute_files`` from a Google-Cloud-Storage-compatible server: gcp-storage-emulator (a GCS JSON-API server
on localhost, run as a subprocess: the stand-in for the external service only) holds Parquet and CSV point files;
the Ray node actors open them themselves through the ``gs://`` URI, which carries everything pyarrow needs:
``gs://anonymous@bucket/key?endpoint_override=host:port&scheme=http`` (pyarrow takes ``anonymous`` from the user
info; its GCS URIs accept only ``scheme``, ``endpoint_override``, ``retry_limit_seconds``, ``project_id`` and
``default_bucket_location`` as query options). Answers are checked against scipy's cKDTree over the files' points
in input order (a directory's files sorted by key, rows in file order), as in ``tests/test_s3_load.py``.

The emulator runs in its own process: it is a single-threaded ``http.server``, and run as a thread of the test
process it never answers pyarrow's first object download (``?alt=media``; listing and uploads work): the read
hangs with the server thread waiting to run, i.e. on the GIL."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from scipy.spatial import cKDTree

pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is not installed "
                                                   "(pip install gcp-storage-emulator)")

from distspatial import DistributedSpatialCluster, NodeConfig
from distspatial.io.files import DataFileError

BUCKET = "points"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parquet_bytes(pts: np.ndarray, row_group: int) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({n: pts[:, j] for j, n in enumerate("xyz")}), sink, row_group_size=row_group)
    return sink.getvalue().to_pybytes()


def _csv_bytes(pts: np.ndarray) -> bytes:
    return ("x,y,z\n" + "".join(",".join(repr(float(v)) for v in row) + "\n" for row in pts)).encode()


@pytest.fixture(scope="module")
def gcs():
    """The emulator on a free localhost port with a bucket of point files; yields ``(uri(key), points, cuts)``:
    ``uri("pts/")`` is the ``gs://`` URI of a key with the endpoint, ``points`` the points of ``pts/`` in input
    order (keys sorted) and ``cuts`` the row ranges of its files."""
    from pyarrow import fs as pafs

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                               "--port", str(port), "--in-memory", "--quiet", "--default-bucket", BUCKET],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:  # "/" is the emulator's health check
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"gcp-storage-emulator did not start (exit code {server.poll()})")
                time.sleep(0.1)
        endpoint = f"127.0.0.1:{port}"
        store = pafs.GcsFileSystem(anonymous=True, endpoint_override=endpoint, scheme="http")
        rng = np.random.default_rng(22)
        pts = rng.random((6000, 3))
        pts[:1500] = 0.3 + 0.05 * rng.standard_normal((1500, 3))  # a dense cluster: partitions of unequal extent
        cuts = [0, 2000, 3500, 4500, 6000]
        files = {  # key -> bytes; keys in sorted order are the input order
            "pts/a0.parquet": _parquet_bytes(pts[cuts[0]:cuts[1]], 500),  # 4 row groups
            "pts/a1.parquet": _parquet_bytes(pts[cuts[1]:cuts[2]], 500),
            "pts/b.csv": _csv_bytes(pts[cuts[2]:cuts[3]]),
            "pts/sub dir/c.parquet": _parquet_bytes(pts[cuts[3]:cuts[4]], 500),  # a space: percent-escaped
        }
        for key, data in files.items():  # through pyarrow's GCS client (resumable uploads)
            with store.open_output_stream(f"{BUCKET}/{key}") as f:
                f.write(data)

        def uri(key: str) -> str:
            return f"gs://anonymous@{BUCKET}/{key}?endpoint_override={endpoint}&scheme=http&retry_limit_seconds=5"

        yield uri, pts, cuts
    finally:
        server.terminate()
        server.wait(timeout=10)


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


def test_directory_and_glob_uris_every_node_reads_from_the_server(cluster, gcs):
    uri, pts, cuts = gcs
    meta = cluster.distribute_files(uri("pts/"))  # Parquet and CSV, "sub dir/" included
    assert meta.n_points == len(pts) and meta.dim == 3
    _check_knn(cluster, pts)
    np.testing.assert_array_equal(cluster.point_ids(), np.arange(len(pts)))
    # both node processes read shares themselves (from the server, over HTTP), and no share twice
    reports = [ray.get(a.loading_report.remote()) for a in cluster.runtime.actors.values()]
    assert all(r["shares"] for r in reports), reports
    read = sorted(s for r in reports for s in r["shares"])
    assert read == list(range(len(read))) and len(read) >= 4
    assert sum(r["points"] for r in reports) == len(pts)
    shown = repr(reports) + repr(ray.get(cluster.runtime.controller.file_load_report.remote()))
    assert "sub%20dir/c.parquet" in shown and "b.csv" in shown
    # a glob: "*" within one directory (sub dir/ left out), in sorted key order
    meta = cluster.distribute_files(uri("pts/*.parquet"))
    assert meta.n_points == cuts[2]
    _check_knn(cluster, pts[:cuts[2]], seed=1)


def test_missing_object_names_the_file(cluster, gcs):
    uri, pts, cuts = gcs
    dataset = cluster.metadata.dataset_id
    with pytest.raises(DataFileError) as err:
        cluster.distribute_files([uri("pts/a0.parquet"), uri("pts/nope.parquet")])
    assert "gs://points/pts/nope.parquet" in str(err.value) and "no such file" in str(err.value)
    assert err.value.path.startswith("gs://points/pts/nope.parquet")
    assert cluster.metadata.dataset_id == dataset, "nothing was published"
    _check_knn(cluster, pts[:cuts[2]], seed=2)  # the previous data set still answers
