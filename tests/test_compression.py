"""The transfer codec: bit-exact round trips on every kind of array, and real savings on curve-ordered data."""

import numpy as np
import pytest

from distspatial.core.codec import EncodedArray, decode, encode, maybe_decode, wire_and_raw


def _same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def _extremes(dtype):
    info = np.finfo(dtype)
    vals = [0.0, -0.0, np.inf, -np.inf, np.nan, info.max, -info.max, info.tiny, info.smallest_subnormal,
            -info.smallest_subnormal, 1.0, -1.0]
    a = np.array(vals, dtype=dtype)
    u = a.view(np.uint64 if dtype == np.float64 else np.uint32)
    # NaNs with unusual payloads and the sign bit set
    extra = np.array([u[4] | 1, u[4] | (u.dtype.type(1) << u.dtype.type(u.itemsize * 8 - 1)) | 5], dtype=u.dtype)
    return np.concatenate([u, extra]).view(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64, np.int32, np.uint64, np.int16, np.uint8])
@pytest.mark.parametrize("kind", ["random", "constant", "empty", "curve", "extreme"])
def test_round_trip_is_bit_exact(dtype, kind):
    rng = np.random.default_rng(0)
    if kind == "random":
        a = (rng.standard_normal((5000, 3)) * 1e6).astype(dtype) if np.dtype(dtype).kind != "u" else \
            rng.integers(0, np.iinfo(dtype).max, (5000, 3), dtype=dtype, endpoint=True)
    elif kind == "constant":
        a = np.full((4000, 2), 7, dtype=dtype)
    elif kind == "empty":
        a = np.empty((0, 2), dtype=dtype)
    elif kind == "curve":
        a = np.cumsum(rng.random((6000, 2)), axis=0).astype(dtype)
    else:
        if np.dtype(dtype).kind != "f":
            info = np.iinfo(dtype)
            a = np.array([info.min, info.max, 0, 1, info.max - 1, info.min + 1] * 50, dtype=dtype)
        else:
            a = np.tile(_extremes(dtype), 40)
    enc = encode(a, min_bytes=0)
    out = decode(enc) if isinstance(enc, EncodedArray) else enc
    _same_bits(a, out)


def test_small_arrays_travel_raw_and_helpers():
    a = np.arange(10.0)
    assert encode(a) is a  # below the default threshold
    assert maybe_decode(a) is a
    assert wire_and_raw(a) == (80, 80)
    big = np.cumsum(np.ones((100_000, 2)), axis=0)
    enc = encode(big)
    assert isinstance(enc, EncodedArray)
    wire, raw = wire_and_raw(enc)
    assert raw == big.nbytes and wire < raw / 20, "smooth data compresses well"
    np.testing.assert_array_equal(maybe_decode(enc), big)


def test_curve_ordered_partitions_compress():
    from distspatial.io.datasets import skewed_points
    from distspatial.kernels.partitioning import partition_points

    plan = partition_points(skewed_points(400_000, 2, seed=3), 4)
    pts, ids = plan.part(1)
    enc = encode(pts)
    assert enc.wire_bytes < 0.85 * pts.nbytes
    _same_bits(pts, decode(enc))
