"""Checkpoints: every partition (compressed, checksummed) plus the metadata, on any pyarrow filesystem.

Layout under a root (a local directory or a URI pyarrow understands, e.g. ``s3://bucket/prefix``)::

    ROOT/LATEST                         name of the newest complete checkpoint (replaced last, atomically)
    ROOT/ckpt-<time>-v<version>/
        part-00000.dsz ...              one file per partition, written by a node that holds it
        ids.dsz                         user ids (only when ``distribute_data`` was given ids)
        MANIFEST.json                   metadata, file names, sizes and SHA-256 checksums; written last

Every file is first written under a temporary name and then moved into place, the manifest after all partition
files, ``LATEST`` after the manifest. A crash midway leaves a directory without a manifest (ignored) and
``LATEST`` still naming the previous checkpoint. Restoring verifies every checksum and names the first bad
file. Pure Python, NumPy and pyarrow; no Ray (the coordinator and nodes call these functions).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from ..core.codec import EncodedArray, decode, encode

__all__ = [
    "CheckpointError",
    "resolve",
    "write_bytes",
    "read_bytes",
    "encode_arrays",
    "decode_arrays",
    "write_manifest",
    "read_manifest",
    "new_checkpoint_dir",
]

MANIFEST = "MANIFEST.json"
LATEST = "LATEST"
FORMAT = 2  # 2: partition files use the shuffle codec of compression.py


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or corrupt; the message names what and where."""


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or a filesystem URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` under a temporary name, then move it to ``path`` (atomic on local and POSIX stores)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp, compression=None) as out:  # no extension-based recompression
        out.write(data)
    fs.move(tmp, path)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    try:
        with fs.open_input_stream(path, compression=None) as f:
            return f.read()
    except (FileNotFoundError, OSError) as exc:
        raise CheckpointError(f"cannot read checkpoint file {path}: {exc}") from None


def encode_arrays(**arrays: np.ndarray) -> tuple[bytes, int, str]:
    """``(file bytes, raw size, sha256 of the file bytes)`` holding ``arrays``.

    Each array goes through the transfer codec (:func:`distspatial.core.codec.encode`: row delta, byte shuffle,
    zstd), so partitions stored in curve order shrink as much on disk as on the wire. File layout: an 8-byte
    little-endian header length, a JSON header (name, dtype, shape, delta flag, payload length per array), then
    the payloads in that order.
    """
    heads, payloads, raw = [], [], 0
    for name, a in arrays.items():
        enc = encode(np.asarray(a), min_bytes=0)
        if isinstance(enc, EncodedArray):
            heads.append({"name": name, "dtype": enc.dtype, "shape": list(enc.shape), "delta": enc.delta,
                          "codec": "shuffle-zstd", "bytes": len(enc.payload)})
            payloads.append(enc.payload)
        else:  # dtypes the codec does not handle (e.g. bool) are stored as raw bytes
            a = np.ascontiguousarray(enc)
            heads.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "delta": False,
                          "codec": "raw", "bytes": a.nbytes})
            payloads.append(a.tobytes())
        raw += int(np.asarray(a).nbytes)
    header = json.dumps(heads).encode()
    data = b"".join([len(header).to_bytes(8, "little"), header, *payloads])
    return data, raw, hashlib.sha256(data).hexdigest()


def decode_arrays(data: bytes, raw_size: int, sha256: str, where: str) -> dict[str, np.ndarray]:
    """Verify and decode bytes made by :func:`encode_arrays`; :class:`CheckpointError` names ``where``."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise CheckpointError(f"checksum mismatch in {where}: expected {sha256[:16]}..., got {digest[:16]}... "
                              "(the file is corrupt or was changed); restore an older checkpoint")
    try:
        hlen = int.from_bytes(data[:8], "little")
        heads = json.loads(data[8:8 + hlen])
        out, pos = {}, 8 + hlen
        for h in heads:
            payload = data[pos:pos + h["bytes"]]
            pos += h["bytes"]
            if h["codec"] == "raw":
                out[h["name"]] = np.frombuffer(payload, dtype=h["dtype"]).reshape(h["shape"]).copy()
            else:
                out[h["name"]] = decode(EncodedArray(h["dtype"], tuple(h["shape"]), h["delta"], payload))
        if sum(a.nbytes for a in out.values()) != raw_size:
            raise ValueError(f"decoded {sum(a.nbytes for a in out.values())} bytes, the manifest says {raw_size}")
        return out
    except Exception as exc:
        raise CheckpointError(f"cannot decode {where}: {exc}") from None


def new_checkpoint_dir(root: str, version: int) -> str:
    return join(root, f"ckpt-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}-v{version}")


def write_manifest(fs: pafs.FileSystem, root: str, ckpt_dir: str, manifest: dict[str, Any]) -> None:
    """Write the manifest (after every partition file), then point ``LATEST`` at the checkpoint."""
    manifest = dict(manifest, format=FORMAT, written=time.time())
    write_bytes(fs, join(ckpt_dir, MANIFEST), json.dumps(manifest, indent=1).encode())
    write_bytes(fs, join(root, LATEST), ckpt_dir.rstrip("/").rsplit("/", 1)[-1].encode())


def read_manifest(uri: str) -> tuple[pafs.FileSystem, str, dict[str, Any]]:
    """``(fs, checkpoint dir, manifest)`` for a checkpoint root (its ``LATEST``) or one checkpoint directory."""
    fs, path = resolve(uri)
    info = fs.get_file_info(join(path, MANIFEST))
    if info.type == pafs.FileType.File:
        ckpt = path
    else:
        latest = fs.get_file_info(join(path, LATEST))
        if latest.type != pafs.FileType.File:
            raise CheckpointError(f"no checkpoint at {uri}: neither {MANIFEST} nor {LATEST} is there")
        ckpt = join(path, read_bytes(fs, join(path, LATEST)).decode().strip())
    raw = read_bytes(fs, join(ckpt, MANIFEST))
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"manifest {join(ckpt, MANIFEST)} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"manifest {join(ckpt, MANIFEST)} has format {manifest.get('format')}, expected {FORMAT}")
    return fs, ckpt, manifest


def write_partition_file(file_uri: str, points: np.ndarray, ids: np.ndarray) -> tuple[int, int, str]:
    """Write one partition; returns ``(compressed bytes, raw bytes, sha256)``. Runs on the node."""
    fs, path = resolve(file_uri)
    data, raw, digest = encode_arrays(points=points, ids=ids)
    write_bytes(fs, path, data)
    return len(data), raw, digest


def read_partition_file(file_uri: str, raw_size: int, sha256: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and verify one partition written by :func:`write_partition_file`. Runs on the node."""
    fs, path = resolve(file_uri)
    arrays = decode_arrays(read_bytes(fs, path), raw_size, sha256, file_uri)
    return arrays["points"], arrays["ids"]
