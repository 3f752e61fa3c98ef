"""distspatial.io (point files in, result tables out) and distspatial.core.progress, on real files in tmp_path. No Ray."""

from __future__ import annotations

import gzip
import io as std_io

import numpy as np
import pyarrow as pa
import pyarrow.csv as pv
import pyarrow.parquet as pq
import pytest

from distspatial.io import files as dio
from distspatial.io import DataFileError, iter_point_chunks, open_points, read_points, write_results
from distspatial.core.progress import LineBar, NullBar, progress_bar

RNG = np.random.default_rng(7)
PTS = RNG.random((50, 3)) * 100 - 50
IDS = np.arange(50, dtype=np.int64) * 3 + 1000


def _csv(path, header=True, delimiter=","):
    lines = [delimiter.join(["id", "x", "y", "z"])] if header else []
    lines += [delimiter.join([str(i)] + [repr(float(v)) for v in p]) for i, p in zip(IDS, PTS)]
    data = "\n".join(lines) + "\n"
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(data)
    else:
        path.write_text(data)
    return path


def _parquet(path, row_group_size=16):
    t = pa.table({"id": IDS, "x": PTS[:, 0], "y": PTS[:, 1], "z": PTS[:, 2].astype(np.float32),
                  "name": [f"p{i}" for i in range(50)]})
    pq.write_table(t, path, row_group_size=row_group_size)
    return path


def _las(path, n=50):
    laspy = pytest.importorskip("laspy", reason="laspy is not installed (pip install 'distspatial[las]')")
    if str(path).endswith(".laz"):
        pytest.importorskip("lazrs", reason="no LAZ backend installed (pip install 'distspatial[las]')")
    header = laspy.LasHeader(point_format=3, version="1.2")
    header.scales = np.array([0.001, 0.001, 0.001])
    header.offsets = np.array([-50.0, -50.0, -50.0])
    las = laspy.LasData(header)
    las.x, las.y, las.z = PTS[:n, 0], PTS[:n, 1], PTS[:n, 2]
    las.intensity = np.arange(n, dtype=np.uint16)
    las.write(str(path))
    return path


# -- reading every format --------------------------------------------------------------------------------------
def test_npy_plain_is_memory_mapped_and_columns_by_index(tmp_path):
    p = tmp_path / "pts.npy"
    np.save(p, PTS)
    np.testing.assert_array_equal(read_points(p), PTS)
    np.testing.assert_array_equal(read_points(p, columns="2,0"), PTS[:, [2, 0]])
    src = open_points(p)
    assert src.format == "npy" and src.n_rows == 50 and src.available == ["0", "1", "2"]
    assert isinstance(src._opts["array"], np.memmap)
    np.save(tmp_path / "i32.npy", (PTS * 10).astype(np.int32))
    got = read_points(tmp_path / "i32.npy")
    assert got.dtype == np.float64 and np.array_equal(got, (PTS * 10).astype(np.int32))


def test_npy_structured_with_id_field(tmp_path):
    rec = np.zeros(50, dtype=[("id", "i8"), ("x", "f8"), ("y", "f4"), ("z", "f8")])
    rec["id"], rec["x"], rec["y"], rec["z"] = IDS, PTS[:, 0], PTS[:, 1], PTS[:, 2]
    np.save(tmp_path / "rec.npy", rec)
    pts, ids = read_points(tmp_path / "rec.npy", columns=["x", "y"], id_column="id")
    np.testing.assert_array_equal(ids, IDS)
    np.testing.assert_allclose(pts, np.column_stack([PTS[:, 0], PTS[:, 1].astype(np.float32)]))
    assert read_points(tmp_path / "rec.npy", id_column="id")[0].shape == (50, 3)  # default: all fields but the id


@pytest.mark.parametrize("name, header, delimiter", [
    ("pts.csv", True, ","), ("plain.csv", False, ","), ("pts.tsv", True, "\t"), ("pts.csv.gz", True, ","),
])
def test_csv_variants(tmp_path, name, header, delimiter):
    p = _csv(tmp_path / name, header, delimiter)
    if header:
        pts, ids = read_points(p, columns="x,y,z", id_column="id")
        np.testing.assert_array_equal(ids, IDS)
    else:  # a headerless file: columns are "0", "1", ...
        assert open_points(p).available == ["0", "1", "2", "3"]
        pts, ids = read_points(p, columns="1,2,3", id_column="0")
        np.testing.assert_array_equal(ids, IDS)
    np.testing.assert_array_equal(pts, PTS)  # repr() round-trips doubles exactly


def test_parquet_columns_by_name(tmp_path):
    p = _parquet(tmp_path / "pts.parquet")
    src = open_points(p, "x,y,z", id_column="id")
    assert src.n_rows == 50 and src.columns == ["x", "y", "z"]
    pts, ids = src.read()
    np.testing.assert_array_equal(ids, IDS)
    np.testing.assert_array_equal(pts[:, :2], PTS[:, :2])
    np.testing.assert_array_equal(pts[:, 2], PTS[:, 2].astype(np.float32))
    np.testing.assert_array_equal(read_points(p, ["y"]), PTS[:, 1:2])


@pytest.mark.parametrize("name", ["cloud.las", "cloud.laz"])
def test_las_and_laz_scaled_coordinates(tmp_path, name):
    p = _las(tmp_path / name)
    pts = read_points(p)  # default x, y, z, scaled
    np.testing.assert_allclose(pts, PTS, atol=0.0005 + 1e-9)
    pts2, ids = read_points(p, "x,y", chunk_rows=7, id_column="intensity")
    np.testing.assert_array_equal(pts2, pts[:, :2])
    np.testing.assert_array_equal(ids, np.arange(50))
    assert "X" in open_points(p).available and "classification" in open_points(p).available


def test_las_without_laspy_says_how_to_install(tmp_path, monkeypatch):
    p = tmp_path / "x.las"
    p.write_bytes(b"LASF" + b"\0" * 300)
    monkeypatch.setattr(dio, "_laspy", lambda: None)
    with pytest.raises(DataFileError, match=r"needs the laspy package.*pip install 'distspatial\[las\]'"):
        read_points(p)


# -- chunked reading ---------------------------------------------------------------------------------------------
def _formats(tmp_path):
    np.save(tmp_path / "a.npy", PTS)
    files = [(tmp_path / "a.npy", None, None), (_csv(tmp_path / "a.csv"), "x,y,z", "id"),
             (_parquet(tmp_path / "a.parquet", row_group_size=9), "x,y,z", "id")]
    try:
        import laspy  # noqa: F401

        files.append((_las(tmp_path / "a.las"), None, None))
    except ImportError:
        pass
    return files


@pytest.mark.parametrize("chunk_rows", [1, 7, 16, 50, 1000])
def test_chunks_equal_whole_read(tmp_path, chunk_rows):
    for path, cols, idc in _formats(tmp_path):
        whole = read_points(path, cols, id_column=idc)
        chunks = list(iter_point_chunks(path, cols, chunk_rows, id_column=idc))
        if idc is None:
            sizes = [len(c) for c in chunks]
            got = np.concatenate(chunks)
        else:
            sizes = [len(c[0]) for c in chunks]
            got = np.concatenate([c[0] for c in chunks])
            np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), whole[1])
            whole = whole[0]
        assert all(c.dtype == np.float64 and c.flags.c_contiguous
                   for c in (chunks if idc is None else [c[0] for c in chunks]))
        assert sizes[:-1] == [chunk_rows] * (len(sizes) - 1) and 0 < sizes[-1] <= chunk_rows, (path, sizes)
        np.testing.assert_array_equal(got, whole, err_msg=str(path))


def test_read_calls_on_chunk(tmp_path):
    np.save(tmp_path / "a.npy", PTS)
    seen = []
    read_points(tmp_path / "a.npy", chunk_rows=20, on_chunk=seen.append)
    assert seen == [20, 20, 10]


def test_big_csv_streams_in_blocks_and_reports_rows_of_later_blocks(tmp_path):
    n = 60_000
    rng = np.random.default_rng(1)
    pts = rng.random((n, 2))
    p = tmp_path / "big.csv"
    pv.write_csv(pa.table({"x": pts[:, 0], "y": pts[:, 1]}), p)
    assert p.stat().st_size > 2 << 20  # the first 1 MiB is probed for column types; then 64 KiB blocks
    got = list(iter_point_chunks(p, chunk_rows=100))
    assert len(got) == n // 100
    np.testing.assert_array_equal(np.concatenate(got), pts)
    lines = p.read_text().splitlines()
    bad = lines.copy()
    bad[1 + 51_234] = "0.5,abc"  # data row 51234 (line 0 is the header), far beyond the first block
    (tmp_path / "bad.csv").write_text("\n".join(bad) + "\n")
    with pytest.raises(DataFileError, match=r"data row 51234 \(0-based, header not counted\), column 'y' holds "
                                            r"'abc', which is not a finite number") as e:
        read_points(tmp_path / "bad.csv", chunk_rows=100)
    assert e.value.row == 51234 and e.value.column == "y"
    nan = lines.copy()
    nan[1 + 55_000] = "nan,0.5"
    (tmp_path / "nan.csv").write_text("\n".join(nan) + "\n")
    with pytest.raises(DataFileError, match=r"data row 55000 .*column 'x' holds the non-finite value nan") as e:
        read_points(tmp_path / "nan.csv", chunk_rows=100)
    assert e.value.row == 55000


# -- errors ------------------------------------------------------------------------------------------------------
def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataFileError, match=r"nope\.csv: no such file; check the path"):
        read_points(tmp_path / "nope.csv")
    with pytest.raises(DataFileError, match=r"the directory .*missing does not exist either"):
        read_points(tmp_path / "missing" / "x.npy")
    (tmp_path / "pts.txt").write_text("1,2\n")
    with pytest.raises(DataFileError, match=r"pts\.txt: unknown file extension '\.txt'; use one of .*\.csv.*\.parquet"):
        read_points(tmp_path / "pts.txt")
    assert issubclass(DataFileError, ValueError)


def test_missing_column_lists_available(tmp_path):
    p = _parquet(tmp_path / "pts.parquet")
    with pytest.raises(DataFileError, match=r"no column 'lat'; the file has the columns 'id', 'x', 'y', 'z', 'name'"):
        read_points(p, "x,lat")
    c = _csv(tmp_path / "pts.csv")
    with pytest.raises(DataFileError, match=r"no column 'q'.*'id', 'x', 'y', 'z'") as e:
        read_points(c, ["x", "q"])
    assert e.value.column == "q"
    np.save(tmp_path / "a.npy", PTS)
    with pytest.raises(DataFileError, match=r"no column '3'; the file has the columns '0', '1', '2'"):
        read_points(tmp_path / "a.npy", "0,3")
    with pytest.raises(DataFileError, match=r"no id column 'key'"):
        read_points(c, "x,y", id_column="key")
    with pytest.raises(ValueError, match="more than once"):
        read_points(c, "x,x")


def test_non_numeric_columns(tmp_path):
    p = _parquet(tmp_path / "pts.parquet")
    with pytest.raises(DataFileError, match=r"column 'name' is not numeric \(type string\)"):
        read_points(p)  # default: every column, and 'name' is text
    with pytest.raises(DataFileError, match=r"id column 'x' must hold integers"):
        read_points(p, "y", id_column="x")
    (tmp_path / "t.csv").write_text("x,y\n1,2\n3,abc\n5,6\n")
    with pytest.raises(DataFileError, match=r"t\.csv: column 'y' is not numeric: data row 1 \(0-based, header not "
                                            r"counted\) holds 'abc'; fix that value") as e:
        read_points(tmp_path / "t.csv")
    assert (e.value.row, e.value.column) == (1, "y")
    np.save(tmp_path / "s.npy", np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(DataFileError, match=r"the array is not numeric \(dtype <U1\)"):
        read_points(tmp_path / "s.npy")
    np.save(tmp_path / "o.npy", np.array([[1, None]], dtype=object), allow_pickle=True)
    with pytest.raises(DataFileError, match="Python objects, not numbers"):
        read_points(tmp_path / "o.npy")


def test_non_finite_values_name_row_and_column(tmp_path):
    a = PTS.copy()
    a[17, 1] = np.inf
    a[30, 0] = np.nan
    np.save(tmp_path / "a.npy", a)
    with pytest.raises(DataFileError, match=r"a\.npy: row 17 \(0-based\), column '1' holds the non-finite value inf"
                                            r" \(2 such row\(s\).*coordinates must be finite") as e:
        read_points(tmp_path / "a.npy")
    assert (e.value.row, e.value.column) == (17, "1")
    with pytest.raises(DataFileError, match=r"row 30 \(0-based\), column '0' holds the non-finite value nan"):
        list(iter_point_chunks(tmp_path / "a.npy", "0", chunk_rows=8))  # row counted across chunks
    pq.write_table(pa.table({"x": a[:, 0], "y": a[:, 1]}), tmp_path / "a.parquet", row_group_size=10)
    with pytest.raises(DataFileError, match=r"row 17 \(0-based\), column 'y' holds the non-finite value inf"):
        read_points(tmp_path / "a.parquet", chunk_rows=5)
    pq.write_table(pa.table({"x": pa.array([1.0, 2.0, None, 4.0]), "y": [1.0, 2.0, 3.0, 4.0]}), tmp_path / "n.parquet")
    with pytest.raises(DataFileError, match=r"row 2 \(0-based\), column 'x' is missing \(empty or NA\)"):
        read_points(tmp_path / "n.parquet")
    (tmp_path / "e.csv").write_text("x,y\n1,2\n3,\n")
    with pytest.raises(DataFileError, match=r"data row 1 \(0-based, header not counted\), column 'y' is missing"):
        read_points(tmp_path / "e.csv")
    (tmp_path / "i.csv").write_text("x,y\n1,2\n3,-inf\n")
    with pytest.raises(DataFileError, match=r"data row 1 .*column 'y' holds the non-finite value -inf"):
        read_points(tmp_path / "i.csv")


def test_empty_files(tmp_path):
    (tmp_path / "zero.csv").write_bytes(b"")
    with pytest.raises(DataFileError, match=r"zero\.csv: the file is empty \(0 bytes\)"):
        read_points(tmp_path / "zero.csv")
    (tmp_path / "head.csv").write_text("x,y\n")
    with pytest.raises(DataFileError, match=r"head\.csv: the file holds no data rows \(only a header\)"):
        read_points(tmp_path / "head.csv")
    np.save(tmp_path / "e.npy", np.empty((0, 2)))
    with pytest.raises(DataFileError, match=r"holds no points \(0 rows\)"):
        read_points(tmp_path / "e.npy")
    pq.write_table(pa.table({"x": pa.array([], pa.float64())}), tmp_path / "e.parquet")
    with pytest.raises(DataFileError, match=r"holds no points"):
        list(iter_point_chunks(tmp_path / "e.parquet"))


def test_bad_contents(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataFileError, match=r"junk\.parquet: not a valid Parquet file"):
        read_points(tmp_path / "junk.parquet")
    (tmp_path / "junk.npy").write_bytes(b"nope")
    with pytest.raises(DataFileError, match=r"junk\.npy: not a valid \.npy file"):
        read_points(tmp_path / "junk.npy")
    np.save(tmp_path / "one.npy", np.arange(5.0))
    with pytest.raises(DataFileError, match=r"shape \(5,\); points need a 2-D \(n, d\) array; save "
                                            r"points\.reshape\(-1, 1\)"):
        read_points(tmp_path / "one.npy")
    (tmp_path / "ragged.csv").write_text("x,y\n1,2\n3,4,5\n")
    with pytest.raises(DataFileError, match=r"ragged\.csv: could not be parsed as CSV"):
        read_points(tmp_path / "ragged.csv")
    with pytest.raises(ValueError, match="chunk_rows must be a positive int"):
        list(iter_point_chunks(_csv(tmp_path / "ok.csv"), chunk_rows=0))


# -- writing -----------------------------------------------------------------------------------------------------
def test_write_results_parquet_and_csv_round_trip(tmp_path):
    d = np.array([[0.1, 0.2], [0.3, 0.4]])
    i = np.array([[5, 7], [1, 9]])
    t = dio.knn_table(d, i, query_ids=np.array([100, 200]))
    assert list(t) == ["query", "rank", "id", "distance"]
    np.testing.assert_array_equal(t["query"], [100, 100, 200, 200])
    np.testing.assert_array_equal(t["rank"], [1, 2, 1, 2])
    for name in ("r.parquet", "r.csv", "r.tsv"):
        write_results(tmp_path / name, t)
    back = pq.read_table(tmp_path / "r.parquet").to_pydict()
    assert back["id"] == [5, 7, 1, 9] and back["distance"] == [0.1, 0.2, 0.3, 0.4]
    text = (tmp_path / "r.csv").read_text().splitlines()
    assert text[0] == "query,rank,id,distance" and text[1] == "100,1,5,0.1"
    assert (tmp_path / "r.tsv").read_text().splitlines()[0] == "query\trank\tid\tdistance"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".distspatial-")]  # no temp files left


def test_write_results_errors_and_tables(tmp_path):
    with pytest.raises(DataFileError, match=r"unknown file extension '\.xlsx'; use one of \.csv, \.parquet"):
        write_results(tmp_path / "r.xlsx", {"a": [1]})
    with pytest.raises(DataFileError, match=r"cannot write: the directory .*nodir does not exist"):
        write_results(tmp_path / "nodir" / "r.csv", {"a": [1]})
    with pytest.raises(ValueError, match="differ in length"):
        write_results(tmp_path / "r.csv", {"a": [1, 2], "b": [1]})
    r = dio.range_table([np.array([3, 4]), np.array([], np.int64), np.array([9])],
                        [np.array([0.1, 0.2]), np.array([]), np.array([0.5])])
    np.testing.assert_array_equal(r["query"], [0, 0, 2])
    np.testing.assert_array_equal(r["id"], [3, 4, 9])
    write_results(tmp_path / "range.parquet", r)
    assert pq.read_table(tmp_path / "range.parquet").num_rows == 3
    lab = dio.labels_table(np.array([0, 1, 1]), ids=np.array([10, 20, 30]))
    assert list(lab) == ["id", "label"]
    c = dio.centroids_table(np.array([[1.0, 2.0], [3.0, 4.0]]), ["x", "y"])
    assert list(c) == ["cluster", "x", "y"]
    write_results(tmp_path / "t.parquet", pa.table({"a": [1, 2]}))  # a pyarrow.Table as is
    partial = dio.knn_table(np.array([[0.1, np.inf]]), np.array([[4, -1]]))
    np.testing.assert_array_equal(partial["id"], [4])  # slots of a partial answer are dropped


# -- progress ----------------------------------------------------------------------------------------------------
class _Tty(std_io.StringIO):
    def isatty(self):
        return True


def test_progress_silent_when_not_a_terminal_or_disabled():
    s = std_io.StringIO()
    with progress_bar(100, "work", True, stream=s) as bar:
        bar.update(50)
        bar.set_postfix(inertia=1.5)
        bar.update(50)
    assert s.getvalue() == "" and isinstance(bar, NullBar) and bar.n == 100
    t = _Tty()
    with progress_bar(100, "work", enabled=False, stream=t, force=True) as bar:
        bar.update(10)
    assert t.getvalue() == ""


def test_progress_line_backend_prints_when_forced_or_on_a_terminal():
    s = std_io.StringIO()
    with progress_bar(200, "reading x.csv", True, stream=s, force=True, unit="pts", backend="line",
                      min_interval=0) as bar:
        assert isinstance(bar, LineBar)
        bar.update(50)
        bar.set_postfix(inertia=12.25, it=3)
        bar.update(150)
    out = s.getvalue()
    assert out.endswith("\n") and "\r" in out
    last = out.rstrip("\n").split("\r")[-1]
    assert last.startswith("reading x.csv: 100% 200/200 pts") and "inertia=12.25 it=3" in last, last
    t = _Tty()
    with progress_bar(None, "iterations", True, stream=t, backend="line") as bar:  # a terminal: no force needed
        bar.update(3)
    assert "iterations: 3 it" in t.getvalue()


def test_progress_tqdm_backend_when_installed():
    pytest.importorskip("tqdm", reason="tqdm is not installed (pip install 'distspatial[progress]')")
    s = std_io.StringIO()
    with progress_bar(10, "kmeans", True, stream=s, force=True, unit="iter") as bar:
        for _ in range(10):
            bar.update(1)
        bar.set_postfix(inertia=2.5)
    assert bar.n == 10
    out = s.getvalue()
    assert "kmeans" in out and "100%" in out and "inertia=2.5" in out
    with pytest.raises(ValueError, match="backend must be"):
        with progress_bar(1, "x", True, stream=s, force=True, backend="fancy"):
            pass
