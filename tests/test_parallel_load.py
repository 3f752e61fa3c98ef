"""Parallel load of point files by the nodes (``distribute_files``), on several real Ray nodes
(``ray.cluster_utils.Cluster``: separate raylets), answers checked against scipy's cKDTree over the union of the
files; plus the share planner and reader (``distspatial.io.shares``) without Ray."""

from __future__ import annotations

import os
import pickle
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from scipy.spatial import cKDTree

from distspatial import DistributedSpatialCluster, NodeConfig
from distspatial.core.errors import NodeFailureError
from distspatial.io.datasets import skewed_points
from distspatial.io.files import DataFileError
from distspatial.io.shares import plan_shares, read_share

from .conftest import assert_knn_ids_match, raylet_cluster


# -- writing inputs ------------------------------------------------------------------------------------------------
def _parquet(path, pts, ids=None, row_group=1000, names=("x", "y", "z")):
    cols = {names[j]: pts[:, j] for j in range(pts.shape[1])}
    if ids is not None:
        cols["id"] = ids
    pq.write_table(pa.table(cols), path, row_group_size=row_group)


def _csv(path, pts, names=("x", "y", "z"), ids=None):
    head = list(names[:pts.shape[1]]) + (["id"] if ids is not None else [])
    with open(path, "w") as f:
        f.write(",".join(head) + "\n")
        for r, row in enumerate(pts):
            f.write(",".join(repr(float(v)) for v in row) + (f",{ids[r]}" if ids is not None else "") + "\n")


def _mixed_dir(root, pts):
    """pts split over 3 Parquet files (several row groups), 2 CSV files and one .npy, in sorted-name order."""
    os.makedirs(root / "more", exist_ok=True)
    cuts = np.linspace(0, len(pts), 7).astype(int)
    p = [pts[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    _parquet(root / "a0.parquet", p[0])
    _parquet(root / "a1.parquet", p[1], row_group=700)
    _csv(root / "b0.csv", p[2])
    _parquet(root / "c.parquet", p[3])
    _csv(root / "d.csv", p[4])
    np.save(root / "more" / "e.npy", p[5])  # columns "0", "1": columns=None reads every column
    (root / "_SUCCESS").write_text("")  # dataset writers' markers are skipped
    return root


# -- the Ray cluster: three raylets -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    # 2 logical CPUs per raylet: room for the module's cluster (3 x 0.5) and one more made by the CLI test
    with raylet_cluster(num_cpus=2) as cw:
        yield cw


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    cfg = NodeConfig().with_node_count(3).with_replication_factor(2).replace(cpus_per_node=0.5)
    with DistributedSpatialCluster(cfg) as cl:
        yield cl


def _staged(cl):
    return {n: ray.get(a.staged_loads.remote()) for n, a in cl.runtime.actors.items()
            if n not in cl.failed_node_ids}


def _check_exact(cl, pts, row_ids=None, seed=0):
    q = np.random.default_rng(seed).random((300, pts.shape[1])) * (pts.max(0) - pts.min(0)) + pts.min(0)
    dist, ids = cl.distributed_knn_search(q, 8)
    assert_knn_ids_match(pts, q, dist, ids, 8, row_ids=row_ids)
    tree = cKDTree(pts)
    got = cl.range_search(q[:40], 0.03)
    ref_ids = np.arange(len(pts)) if row_ids is None else np.asarray(row_ids)
    for g, c in zip(got, q[:40]):
        np.testing.assert_array_equal(np.sort(g), np.sort(ref_ids[tree.query_ball_point(c, 0.03)]))


# -- loads ----------------------------------------------------------------------------------------------------------
def test_directory_of_parquet_csv_npy_each_node_reads_its_share(cluster, tmp_path):
    pts = skewed_points(24_000, 2, n_hotspots=5, seed=3)
    _mixed_dir(tmp_path, pts)
    meta = cluster.distribute_files(tmp_path)
    assert meta.n_points == len(pts) and meta.dim == 2
    _check_exact(cluster, pts)  # ids are the rows of the concatenated input (sorted file names)
    np.testing.assert_array_equal(cluster.point_ids(), np.arange(len(pts)))
    np.testing.assert_array_equal(meta.lo, pts.min(0))
    np.testing.assert_array_equal(meta.hi, pts.max(0))
    # every node read shares of its own, on its own raylet, and no share was read twice
    reports = {n: ray.get(a.loading_report.remote()) for n, a in cluster.runtime.actors.items()}
    assert len({r["ray_node_id"] for r in reports.values()}) == 3, "one node per raylet"
    read = [s for r in reports.values() for s in r["shares"]]
    assert all(r["shares"] for r in reports.values()), reports
    assert sorted(read) == list(range(len(read))), "shares disjoint and complete"
    assert sum(r["points"] for r in reports.values()) == len(pts)
    ctrl = ray.get(cluster.runtime.controller.file_load_report.remote())
    for index, _, node, _ in ctrl["shares"]:
        assert index in reports[node]["shares"]
    assert not any(_staged(cluster).values()), "nothing stays staged"
    for p in meta.partitions:
        assert len({cluster.node_info[o]["ray_node_id"] for o in p.owners}) == 2, "replicas on two raylets"


def test_glob_list_and_file_uri(cluster, tmp_path):
    pts = skewed_points(9_000, 3, seed=4)
    _parquet(tmp_path / "p1.parquet", pts[:4000], row_group=900)
    _parquet(tmp_path / "p0.parquet", pts[4000:7000], row_group=900)
    np.save(tmp_path / "n.npy", pts[7000:])
    # a glob: sorted names (p0 before p1); through pyarrow's filesystem (file://)
    meta = cluster.distribute_files(f"file://{tmp_path}/p*.parquet")
    union = np.concatenate([pts[4000:7000], pts[:4000]])
    assert meta.n_points == 7000
    _check_exact(cluster, union)
    # a list keeps its order; .npy read by row ranges through the filesystem
    meta = cluster.distribute_files([f"file://{tmp_path}/n.npy", tmp_path / "p1.parquet"], columns=None)
    _check_exact(cluster, np.concatenate([pts[7000:], pts[:4000]]))


def test_id_column_ids_and_duplicates(cluster, tmp_path):
    rng = np.random.default_rng(5)
    pts = rng.random((8_000, 2))
    ids = rng.choice(10**12, 8_000, replace=False).astype(np.int64)
    _parquet(tmp_path / "a.parquet", pts[:5000], ids[:5000])
    _csv(tmp_path / "b.csv", pts[5000:], ids=ids[5000:])
    meta = cluster.distribute_files(tmp_path, columns="x,y", id_column="id")
    assert meta.n_points == 8000
    _check_exact(cluster, pts, row_ids=ids)
    np.testing.assert_array_equal(cluster.point_ids(), np.sort(ids))  # labels follow ascending ids
    dataset = cluster.metadata.dataset_id  # (versions may move meanwhile: heartbeats, recovery)
    # a repeated id across two files: refused by the nodes' check, the data set above still answers
    dup = tmp_path / "dup"
    dup.mkdir()
    _parquet(dup / "a.parquet", pts[:100], ids[:100])
    _parquet(dup / "b.parquet", pts[100:200], np.r_[ids[150], ids[101:200]])
    with pytest.raises(ValueError, match=r"repeated id.*" + str(ids[150])):
        cluster.distribute_files(dup, columns="x,y", id_column="id")
    assert cluster.metadata.n_points == 8000 and cluster.metadata.dataset_id == dataset
    _check_exact(cluster, pts, row_ids=ids, seed=1)
    assert not any(_staged(cluster).values())


def test_client_receives_the_same_bytes_whatever_n(cluster, tmp_path):
    rt = cluster.runtime

    def load(n):
        d = tmp_path / str(n)
        d.mkdir()
        pts = np.random.default_rng(n).random((n, 2))
        for j, (a, b) in enumerate(zip(range(0, n, n // 4), range(n // 4, n + 1, n // 4))):
            _parquet(d / f"{j}.parquet", pts[a:b], row_group=max(1000, n // 16))
        before = rt.comm.totals()
        ctrl_before = rt.call_controller("comm_totals")
        nodes_before = sum(s.get("bytes_in", 0) for s in (ray.get(a.stats.remote()) for a in rt.actors.values()))
        meta = cluster.distribute_files(d, sample_size=500)
        after = rt.comm.totals()
        ctrl = rt.call_controller("comm_totals")
        nodes_in = sum(s.get("bytes_in", 0) for s in (ray.get(a.stats.remote()) for a in rt.actors.values()))
        assert meta.n_points == n
        return ({k: after[k] - before[k] for k in after}, ctrl["bytes_received"] - ctrl_before["bytes_received"],
                len(pickle.dumps(meta)), nodes_in - nodes_before)

    small, big = load(20_000), load(80_000)
    assert small[0]["bytes_received"] == big[0]["bytes_received"] == 0, "the client exchanged nothing with nodes"
    assert big[2] < small[2] + 256, "the answer (metadata: a few bytes per partition) does not grow with n"
    assert big[1] < 1.3 * small[1] + 4096, f"controller received {small[1]} then {big[1]} bytes"
    assert big[1] < 80_000 * 16 / 4, "the controller never sees the points"
    # the points did travel, node to node (each piece once per replica: 24 bytes per point and copy at least)
    assert big[3] >= 80_000 * 24


# -- bad input and faults -------------------------------------------------------------------------------------------
def test_corrupt_csv_row_names_file_row_column_and_keeps_the_data_set(cluster, tmp_path):
    good = np.random.default_rng(7).random((3_000, 2))
    cluster.distribute_data(good)
    dataset = cluster.metadata.dataset_id  # (versions may move meanwhile: heartbeats, recovery)
    bad = tmp_path / "in"
    bad.mkdir()
    _parquet(bad / "a.parquet", good[:2000])
    lines = ["x,y"] + [f"{float(a)!r},{float(b)!r}" for a, b in good[2000:2100]]
    lines[1 + 57] = "0.5,abc"
    (bad / "b.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError) as err:
        cluster.distribute_files(bad)
    e = err.value
    assert e.path.endswith("b.csv") and e.row == 57 and e.column == "y", str(e)
    assert "b.csv" in str(e) and "row 57" in str(e) and "'y'" in str(e) and "abc" in str(e)
    assert cluster.metadata.dataset_id == dataset, "nothing was published"
    _check_exact(cluster, good)  # the previous data set still answers
    assert not any(_staged(cluster).values()), "staged data dropped on every node"
    # a non-finite value in a Parquet file: the row within that file
    vals = good[:1500].copy()
    vals[1234, 0] = np.inf
    _parquet(bad / "a.parquet", vals, row_group=500)
    (bad / "b.csv").unlink()
    with pytest.raises(DataFileError, match=r"a\.parquet: row 1234 .*column 'x'.*inf"):
        cluster.distribute_files(bad)
    assert cluster.metadata.dataset_id == dataset


def test_mixed_dimensions_and_missing_files(cluster, tmp_path):
    _parquet(tmp_path / "a.parquet", np.random.default_rng(0).random((500, 2)))
    _csv(tmp_path / "b.csv", np.random.default_rng(1).random((500, 3)))
    with pytest.raises(DataFileError, match=r"b\.csv: has 3 coordinate column.*a\.parquet has 2"):
        cluster.distribute_files(tmp_path)  # CSV: found by the nodes
    _parquet(tmp_path / "b.parquet", np.random.default_rng(1).random((500, 3)))
    with pytest.raises(DataFileError, match=r"b\.parquet: has 3 coordinate column.*a\.parquet has 2"):
        cluster.distribute_files([tmp_path / "a.parquet", tmp_path / "b.parquet"])  # Parquet: from the footers
    missing = tmp_path / "nope" / "c.parquet"
    with pytest.raises(DataFileError, match="nope/c.parquet: no such file"):
        cluster.distribute_files([tmp_path / "a.parquet", missing])
    with pytest.raises(DataFileError, match="matches no file"):
        cluster.distribute_files(str(tmp_path / "*.las"))
    assert not any(_staged(cluster).values())


def test_node_killed_while_reading_fails_cleanly(ray_cluster, tmp_path):
    """A node dies while it reads its share (it is blocked on a named pipe the test holds): a clear error, nothing
    published, the previous data set still answers from its replicas, the other nodes drop what they staged.
    The pipe is named .las: laspy reads a file as a stream (pyarrow's readers seek, which a pipe refuses)."""
    pytest.importorskip("laspy")
    cfg = NodeConfig().with_node_count(3).with_replication_factor(2).replace(cpus_per_node=0.5)
    with DistributedSpatialCluster(cfg) as cl:
        before = np.random.default_rng(8).random((4_000, 2))
        cl.distribute_data(before)
        version = cl.metadata.version
        _parquet(tmp_path / "a.parquet", before[:2000])
        _parquet(tmp_path / "b.parquet", before[2000:])
        fifo = tmp_path / "z.las"
        os.mkfifo(fifo)
        out: dict = {}

        def load():
            try:
                cl.distribute_files(tmp_path)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                out["error"] = exc

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        opened: dict = {}
        opener = threading.Thread(target=lambda: opened.setdefault("fd", os.open(fifo, os.O_WRONLY)), daemon=True)
        opener.start()
        opener.join(120)  # returns once a node opened the pipe to read it: that node is staging now
        assert "fd" in opened, "no node opened the named pipe"
        deadline = time.monotonic() + 30  # the reader's descriptor may appear a moment after our open returns
        while not (readers := [n for n, info in cl.node_info.items() if _has_open(info["pid"], fifo)]) and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(readers) == 1, readers
        victim = readers[0]
        ray.kill(cl.runtime.actors[victim], no_restart=True)
        loader.join(120)  # the pipe stays open meanwhile: the reader never sees its end, only its death
        os.close(opened["fd"])
        err = out.get("error")
        assert isinstance(err, NodeFailureError), repr(err)
        assert f"node {victim}" in str(err) and "nothing was published" in str(err)
        assert cl.metadata.version > version and cl.metadata.n_points == len(before)
        assert cl.metadata.dataset_id == 1, "still the data set loaded before"
        _check_exact(cl, before)  # answered by the replicas of the dead node's partitions
        assert not any(_staged(cl).values())


def _has_open(pid: int, path) -> bool:
    target = os.path.realpath(path)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except OSError:
            pass
    return False


# -- the planner and reader, no Ray ---------------------------------------------------------------------------------
def test_plan_shares_cuts_row_groups_and_npy_rows_reading_only_metadata(tmp_path):
    pts = np.random.default_rng(9).random((10_000, 2))
    _parquet(tmp_path / "a.parquet", pts[:6000], row_group=1000)
    np.save(tmp_path / "b.npy", pts[6000:])
    _csv(tmp_path / "c.csv", pts[:10])
    shares = plan_shares(tmp_path, 8)
    assert [s.index for s in shares] == list(range(len(shares)))
    pq_sh = [s for s in shares if s.kind == "parquet"]
    assert len(pq_sh) > 1 and sorted(g for s in pq_sh for g in s.row_groups) == list(range(6))
    np_sh = [s for s in shares if s.kind == "npy"]
    assert len(np_sh) > 1 and np_sh[0].row_start == 0 and np_sh[-1].row_stop == 4000
    assert [s.kind for s in shares][-1] == "csv" and shares[-1].n_rows is None
    got = np.concatenate([read_share(s)[0] for s in shares])
    np.testing.assert_array_equal(got, np.concatenate([pts, pts[:10]]))
    assert plan_shares(tmp_path, 8) == shares, "deterministic"
    with pytest.raises(DataFileError, match="column 'q'"):
        plan_shares(tmp_path / "a.parquet", 2, columns="x,q")


def test_read_share_reports_rows_of_the_file_not_of_the_share(tmp_path):
    pts = np.random.default_rng(10).random((3000, 2))
    tbl = pa.table({"x": pa.array(pts[:, 0]), "y": pa.array([None if r == 2500 else v for r, v in
                                                            enumerate(pts[:, 1])], pa.float64())})
    pq.write_table(tbl, tmp_path / "a.parquet", row_group_size=1000)
    shares = plan_shares(tmp_path / "a.parquet", 3)
    assert len(shares) == 3
    read_share(shares[0])
    with pytest.raises(DataFileError) as err:
        read_share(shares[2])
    assert err.value.row == 2500 and err.value.column == "y" and "missing" in str(err.value)
    e2 = pickle.loads(pickle.dumps(err.value))  # crosses Ray intact
    assert (e2.row, e2.column, str(e2)) == (2500, "y", str(err.value))


def test_cli_reads_a_directory_through_the_nodes(ray_cluster, tmp_path, capsys):
    from distspatial.ui.cli import main

    pts = skewed_points(6_000, 2, seed=11)
    (tmp_path / "in").mkdir()
    _parquet(tmp_path / "in" / "p0.parquet", pts[:3500])
    _csv(tmp_path / "in" / "p1.csv", pts[3500:])
    q = np.random.default_rng(12).random((50, 2))
    _csv(tmp_path / "q.csv", q)
    rc = main(["knn", str(tmp_path / "in"), "--queries", str(tmp_path / "q.csv"), "-k", "4", "--nodes", "2",
               "--no-progress", "-o", str(tmp_path / "knn.parquet")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "distribute_files over 2 nodes" in out.out and "the nodes read 6,000 points of 2 dimensions" in out.out
    t = pq.read_table(tmp_path / "knn.parquet").to_pydict()
    assert_knn_ids_match(pts, q, np.reshape(t["distance"], (50, 4)), np.reshape(t["id"], (50, 4)), 4)
