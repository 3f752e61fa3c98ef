"""Queries planned and merged on the nodes (issue #14): the client sends one message per node and gets final
answers; the nodes plan the later rounds and ask each other. Answers are checked against scipy's cKDTree and
NumPy brute force."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import ray
from scipy.spatial import cKDTree

from distspatial import DistributedSpatialCluster, NodeConfig
from distspatial.datasets import skewed_points

from .conftest import assert_knn_ids_match


def _data(kind: str, n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return rng.random((n, d))
    if kind == "skewed":
        return skewed_points(n, d, seed=seed)
    base = rng.random((n // 50, d))  # duplicate-heavy: every point 50 times
    return np.repeat(base, 50, axis=0)


def _ball_ref(pts: np.ndarray, c: np.ndarray, r: float) -> list[np.ndarray]:
    tree = cKDTree(pts)
    return [np.sort(np.asarray(h, dtype=np.int64)) for h in tree.query_ball_point(c, r)]


@pytest.mark.parametrize("d", [2, 3, 5])
@pytest.mark.parametrize("kind", ["skewed", "uniform", "duplicates"])
def test_node_planned_answers_equal_references(ray_local, kind, d):
    pts = _data(kind, 30_000, d, seed=d)
    rng = np.random.default_rng(7 + d)
    q = np.concatenate([pts[rng.choice(len(pts), 300)], rng.random((200, d))])  # on points and anywhere
    cfg = NodeConfig().with_node_count(3).with_partitions_per_node(4).with_fault_tolerance(True).replace(
        cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        c.distribute_data(pts)
        before = c._rt.comm.totals()["messages_sent"]
        dist, ids = c.distributed_knn_search(q, 8)
        sent = c._rt.comm.totals()["messages_sent"] - before
        assert sent <= 3, f"the client sent {sent} messages for one batch: more than one per node"
        assert_knn_ids_match(pts, q, dist, ids, 8, min_separated=0.0 if kind == "duplicates" else 0.99)
        r = 0.08 if d <= 3 else 0.25
        got = c.range_search(q[:150], r)
        for g, ref in zip(got, _ball_ref(pts, q[:150], r)):
            np.testing.assert_array_equal(g, ref)
        lo, hi = q[:100] - r, q[:100] + r
        got = c.box_search(lo, hi)
        for i, g in enumerate(got):
            ref = np.flatnonzero(np.all((pts >= lo[i]) & (pts <= hi[i]), axis=1))
            np.testing.assert_array_equal(g, ref)


def _wait_dead(actor, timeout_s: float = 60.0) -> None:
    """Wait for the event "the actor is dead": ``ray.kill`` is asynchronous, so a ping sent right after it may
    still be answered; ping until one fails."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.ping.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            return
        assert time.monotonic() < deadline, "the killed actor still answers"


def test_a_peer_dead_before_round_two_fails_over_to_a_replica(ray_local):
    """All queries have their home on one node; the node that the follow-ups would reach first is killed after
    the client's view was taken: the home node's own dispatcher fails over to the other replica."""
    pts = skewed_points(40_000, 2, seed=5)
    cfg = NodeConfig().with_node_count(3).with_partitions_per_node(3).with_fault_tolerance(True).replace(
        cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        meta = c.distribute_data(pts)
        ids0 = c._rt.partitions_call("partition_ids", partitions=[0])[0][1][0][1]
        q = pts[ids0[:400]] + 1e-4  # home: partition 0 (or its neighbours)
        c.distributed_knn_search(q, 50)  # the home nodes now hold this version's routing, the victim alive in it
        victim = next(n for n in c._rt.live_node_ids if n not in meta.partitions[0].owners)
        actor = c._rt.actors[victim]
        ray.kill(actor, no_restart=True)
        _wait_dead(actor)
        dist, ids = c.distributed_knn_search(q, 50)  # k large enough to reach other partitions
        assert_knn_ids_match(pts, q, dist, ids, 50)
        got = c.range_search(q[:50], 0.05)
        for g, ref in zip(got, _ball_ref(pts, q[:50], 0.05)):
            np.testing.assert_array_equal(g, ref)


def test_splits_while_batches_run_stay_exact(ray_local):
    """Partitions split (a layout change) while kNN and range batches run: a round planned on an older layout
    is refused and planned again; every answer stays exact."""
    pts = skewed_points(60_000, 2, seed=9)
    q = skewed_points(3_000, 2, seed=9, sample_seed=4)
    tree = cKDTree(pts)
    ref_d, _ = tree.query(q, 10)
    ref_ball = _ball_ref(pts, q[:200], 0.03)
    cfg = NodeConfig().with_node_count(2).with_partitions_per_node(2).replace(cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        c.distribute_data(pts)
        stop = threading.Event()
        errors: list[BaseException] = []
        splits = []

        def split_loop() -> None:
            try:
                while not stop.is_set() and len(splits) < 6:
                    meta = c.metadata
                    big = max(meta.partitions, key=lambda p: p.size).partition_id
                    splits.append(c.split_partition(big))
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        t = threading.Thread(target=split_loop)
        t.start()
        try:
            rounds = 0
            while t.is_alive() or rounds < 3:
                dist, _ = c.distributed_knn_search(q, 10)
                np.testing.assert_allclose(dist, ref_d, rtol=0, atol=1e-12)
                for g, ref in zip(c.range_search(q[:200], 0.03), ref_ball):
                    np.testing.assert_array_equal(g, ref)
                rounds += 1
        finally:
            stop.set()
            t.join(timeout=120)
        assert not errors, errors
        assert len(splits) == 6 and c.metadata.n_partitions == 10


def _read_parts(out_dir: str) -> tuple[np.ndarray, ...]:
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(glob.glob(f"{out_dir}/part-*.parquet"))
    assert files, "no part files written"
    t = pa.concat_tables([pq.read_table(f) for f in files])
    q, rank, ids, dist = (t[c].to_numpy() for c in ("query", "rank", "id", "distance"))
    o = np.lexsort((rank, q))
    return q[o], rank[o], ids[o], dist[o], files


def _write_queries(tmp_path, q: np.ndarray) -> str:
    """Three query files (Parquet, CSV, Parquet) in one directory, in this order of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "queries"
    d.mkdir()
    a, b = len(q) // 3, 2 * len(q) // 3
    pq.write_table(pa.table({"x": q[:a, 0], "y": q[:a, 1]}), d / "a.parquet", row_group_size=max(1, a // 3))
    np.savetxt(d / "b.csv", q[a:b], delimiter=",", header="x,y", comments="", fmt="%.17g")
    pq.write_table(pa.table({"x": q[b:, 0], "y": q[b:, 1]}), d / "c.parquet")
    return str(d)


def test_knn_join_files_to_a_directory_written_by_the_nodes(ray_local, tmp_path):
    pts = skewed_points(50_000, 2, seed=12)
    small = skewed_points(3_000, 2, seed=12, sample_seed=5)
    large = skewed_points(12_000, 2, seed=12, sample_seed=6)
    cfg = NodeConfig().with_node_count(2).replace(cpus_per_node=0.2)
    tree = cKDTree(pts)
    with DistributedSpatialCluster(cfg) as c:
        c.distribute_data(pts)
        received = []
        for name, q in (("small", small), ("large", large)):
            (tmp_path / name).mkdir()
            src = _write_queries(tmp_path / name, q)
            before = c._rt.comm.totals()["bytes_received"]
            out = c.knn_join(src, k=5, output=str(tmp_path / name / "out") + "/", columns="x,y", chunk_rows=1_000)
            received.append(c._rt.comm.totals()["bytes_received"] - before)
            qid, rank, ids, dist, files = _read_parts(out)
            assert all(f.rsplit("/", 1)[1].startswith("part-0000") for f in files)
            np.testing.assert_array_equal(qid, np.repeat(np.arange(len(q)), 5))  # every query once, input order
            np.testing.assert_array_equal(rank, np.tile(np.arange(1, 6), len(q)))  # rank from 1, as the CLI
            assert_knn_ids_match(pts, q, dist.reshape(-1, 5), ids.reshape(-1, 5), 5)
            ref_d, _ = tree.query(q, 5)
            np.testing.assert_allclose(dist.reshape(-1, 5), ref_d, rtol=0, atol=1e-12)
        # the client receives file lists only: not proportional to the queries (4x more queries here)
        assert received[1] < 2 * received[0] + 4096, received
        with pytest.raises(FileExistsError, match="part-"):
            c.knn_join(src, k=5, output=str(tmp_path / "large" / "out") + "/", columns="x,y")


def test_knn_join_to_a_directory_survives_a_dead_node(ray_local, tmp_path):
    """A node is dead when the join starts (the client still lists it): its shares are read again by the
    others, and the answers stay exact and complete."""
    pts = skewed_points(40_000, 2, seed=13)
    q = skewed_points(6_000, 2, seed=13, sample_seed=7)
    cfg = NodeConfig().with_node_count(3).with_fault_tolerance(True).replace(cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        c.distribute_data(pts)
        src = _write_queries(tmp_path, q)
        victim = c._rt.live_node_ids[1]
        actor = c._rt.actors[victim]
        ray.kill(actor, no_restart=True)
        _wait_dead(actor)
        out = c.knn_join(src, k=3, output=str(tmp_path / "out"), columns="x,y", chunk_rows=500)
        qid, rank, ids, dist, files = _read_parts(out)
        assert not any(f"part-{victim:05d}-" in f for f in files)
        np.testing.assert_array_equal(qid, np.repeat(np.arange(len(q)), 3))
        ref_d, _ = cKDTree(pts).query(q, 3)
        np.testing.assert_allclose(dist.reshape(-1, 3), ref_d, rtol=0, atol=1e-12)


def _read_range_parts(out_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """``(query, id, distance)`` of every part file, sorted by query then id (each file is sorted so already)."""
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(glob.glob(f"{out_dir}/part-*.parquet"))
    assert files, "no part files written"
    tables = [pq.read_table(f) for f in files]
    for t in tables:
        assert t.column_names == ["query", "id", "distance"]
        qf, idf = t["query"].to_numpy(), t["id"].to_numpy()
        assert np.all((np.diff(qf) > 0) | ((np.diff(qf) == 0) & (np.diff(idf) > 0))), "a part file is not sorted"
    t = pa.concat_tables(tables)
    q, ids, dist = (t[c].to_numpy() for c in ("query", "id", "distance"))
    o = np.lexsort((ids, q))
    return q[o], ids[o], dist[o], files


def _range_ref(pts: np.ndarray, q: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cKDTree's answer as sorted ``(query, id, distance)`` rows."""
    hits = cKDTree(pts).query_ball_point(q, r)
    counts = np.array([len(h) for h in hits])
    rows = np.repeat(np.arange(len(q)), counts)
    ids = np.concatenate([np.sort(np.asarray(h, dtype=np.int64)) for h in hits])
    return rows, ids, np.linalg.norm(pts[ids] - q[rows], axis=1)


def test_range_search_files_to_a_directory_written_by_the_nodes(ray_local, tmp_path):
    """Every (query, id) pair within the radius once, with its distance, against cKDTree over the union of the
    query files: a scalar radius, and a radius per query read from a column of the files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pts = skewed_points(40_000, 2, seed=21)
    q = np.concatenate([pts[::20][:2_000], skewed_points(2_000, 2, seed=21, sample_seed=8)])
    cfg = NodeConfig().with_node_count(2).replace(cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        c.distribute_data(pts)
        src = _write_queries(tmp_path, q)
        r = 0.0002  # the data are very dense in places: ~30 hits a query
        out = c.range_search(src, r, output=str(tmp_path / "out") + "/", columns="x,y", chunk_rows=700)
        qid, ids, dist, files = _read_range_parts(out)
        rq, rid, rd = _range_ref(pts, q, np.full(len(q), r))
        assert len(rq) > 5 * len(q) and (np.bincount(rq, minlength=len(q)) == 0).any()  # many hits, some none
        np.testing.assert_array_equal(qid, rq)
        np.testing.assert_array_equal(ids, rid)
        np.testing.assert_allclose(dist, rd, rtol=0, atol=1e-12)
        assert len({f.rsplit("/", 1)[1][:10] for f in files}) == 2  # both nodes wrote
        # kNN of query files through distributed_knn_search(output=): knn_join's directory output
        out = c.distributed_knn_search(src, 4, output=str(tmp_path / "knn"), columns="x,y")
        qk, rank, _, dk, _ = _read_parts(out)
        np.testing.assert_array_equal(qk, np.repeat(np.arange(len(q)), 4))
        np.testing.assert_array_equal(rank, np.tile(np.arange(1, 5), len(q)))
        np.testing.assert_allclose(dk.reshape(-1, 4), cKDTree(pts).query(q, 4)[0], rtol=0, atol=1e-12)
        # the radius from a column of the query files (coordinates: every other column)
        radii = np.random.default_rng(3).uniform(0, 0.0004, len(q))
        (tmp_path / "rq").mkdir()
        pq.write_table(pa.table({"x": q[:3_000, 0], "y": q[:3_000, 1], "r": radii[:3_000]}), tmp_path / "rq" / "a.parquet",
                       row_group_size=1_000)
        pq.write_table(pa.table({"x": q[3_000:, 0], "y": q[3_000:, 1], "r": radii[3_000:]}), tmp_path / "rq" / "b.parquet")
        out = c.range_search(str(tmp_path / "rq" / "*.parquet"), "r", output=str(tmp_path / "out_r"))
        qid, ids, dist, _ = _read_range_parts(out)
        rq, rid, rd = _range_ref(pts, q, radii)
        np.testing.assert_array_equal(qid, rq)
        np.testing.assert_array_equal(ids, rid)
        np.testing.assert_allclose(dist, rd, rtol=0, atol=1e-12)
        # an array of centres to one file, and the errors
        out = c.range_search(q[:500], r, output=str(tmp_path / "few.parquet"), chunk_rows=200)
        t = pq.read_table(out)
        rq, rid, rd = _range_ref(pts, q[:500], np.full(500, r))
        np.testing.assert_array_equal(t["query"].to_numpy(), rq)
        np.testing.assert_array_equal(t["id"].to_numpy(), rid)
        np.testing.assert_allclose(t["distance"].to_numpy(), rd, rtol=0, atol=1e-12)
        with pytest.raises(FileExistsError, match="part-"):
            c.range_search(src, r, output=str(tmp_path / "out"), columns="x,y")
        with pytest.raises(ValueError, match="directory of part files"):
            c.range_search(src, r, output=str(tmp_path / "x.parquet"), columns="x,y")
        with pytest.raises(ValueError, match="return_points"):
            c.range_search(src, r, return_points=True, output=str(tmp_path / "o2"), columns="x,y")
        radii[3_100] = -1.0
        pq.write_table(pa.table({"x": q[3_000:, 0], "y": q[3_000:, 1], "r": radii[3_000:]}), tmp_path / "rq" / "b.parquet")
        with pytest.raises(ValueError, match=r"b.parquet: negative radius .* row 100, column 'r'"):
            c.range_search(str(tmp_path / "rq"), "r", columns="x,y", output=str(tmp_path / "out_bad"))


def test_range_search_to_a_directory_survives_a_node_killed_mid_job(ray_local, tmp_path):
    """A node killed while the nodes write (once its first part file is there): its part files are removed,
    its shares answered again by the others, and the union still equals cKDTree exactly."""
    import os
    import time

    pts = skewed_points(40_000, 2, seed=23)
    q = skewed_points(6_000, 2, seed=23, sample_seed=9)
    cfg = NodeConfig().with_node_count(3).with_fault_tolerance(True).replace(cpus_per_node=0.2)
    with DistributedSpatialCluster(cfg) as c:
        c.distribute_data(pts)
        src = _write_queries(tmp_path, q)
        victim = c._rt.live_node_ids[1]
        out_dir = str(tmp_path / "out")
        os.makedirs(out_dir)
        killed = threading.Event()

        def kill_on_first_part():
            end = time.monotonic() + 60
            while time.monotonic() < end:
                if any(f.startswith(f"part-{victim:05d}-") for f in os.listdir(out_dir)):
                    ray.kill(c._rt.actors[victim], no_restart=True)
                    killed.set()
                    return
                time.sleep(0.002)

        t = threading.Thread(target=kill_on_first_part)
        t.start()
        c.range_search(src, 0.0003, output=out_dir, columns="x,y", chunk_rows=100)
        t.join()
        assert killed.is_set()
        qid, ids, dist, files = _read_range_parts(out_dir)
        assert not any(f"part-{victim:05d}-" in f for f in files)
        rq, rid, rd = _range_ref(pts, q, np.full(len(q), 0.0003))
        np.testing.assert_array_equal(qid, rq)
        np.testing.assert_array_equal(ids, rid)
        np.testing.assert_allclose(dist, rd, rtol=0, atol=1e-12)
        assert victim in c.failed_node_ids
