"""Checkpoints taken and loaded by the controller (file layout and checksums: :mod:`~distspatial.io.checkpoint_files`).

Each partition is written by a node that holds it (so with several machines the path must be storage every
machine reaches); the controller writes the manifest last. Periodic checkpoints run in a controller thread and
are taken only when the data changed. A checkpoint of the current data set is also where partitions lost on
every replica come back from (:meth:`~distspatial.control.recovery.RecoveryMixin.restore_redundancy`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray

from ..io import checkpoint_files as ck
from ..core.metadata import GlobalIndexMetadata, PartitionInfo
from .placement import place_partitions

log = logging.getLogger(__name__)

__all__ = ["CheckpointMixin"]


class CheckpointMixin:
    """Checkpoints of :class:`~distspatial.control.controller.ClusterController`."""

    def checkpoint(self, path: str) -> str:
        """Write every partition and the metadata under ``path``; returns the new checkpoint's directory."""
        with self.lock:  # no write may land between the partition files and the manifest
            meta = self.require_data()
            fs, root = ck.resolve(path)
            fs.create_dir(root, recursive=True)
            ckpt = ck.new_checkpoint_dir(root, meta.version)
            fs.create_dir(ckpt, recursive=True)
            ckpt_uri = ckpt if "://" not in path else path.split("://", 1)[0] + "://" + ckpt
            files = {}
            for _, written in self.partitions_call("write_partitions", ckpt_uri):
                for pid, name, nbytes, raw, digest in written:
                    files[pid] = {"file": name, "bytes": nbytes, "raw_bytes": raw, "sha256": digest}
            manifest: dict[str, Any] = {
                "dim": meta.dim, "lo": meta.lo.tolist(), "hi": meta.hi.tolist(), "curve": meta.curve,
                "bits": meta.bits, "version": meta.version, "n_points": meta.n_points,
                "mean_variance": self.mean_variance, "crs": meta.crs, "geographic": meta.geographic,
                "partitions": [
                    {"id": p.partition_id, "key_lo": str(p.key_lo), "key_hi": str(p.key_hi), "lo": p.lo.tolist(),
                     "hi": p.hi.tolist(), "size": p.size, "nbytes": p.nbytes, **files[p.partition_id]}
                    for p in meta.partitions
                ],
                "user_ids": None,
                "modified": self.modified,  # ingest/delete since distribute: labels follow sorted ids
                "next_id": self.next_id,
                "has_user_ids": self.has_user_ids,
            }
            if self.id_sorted is not None and not self.modified:
                data, raw, digest = ck.encode_arrays(sorted=self.id_sorted, rows=self.id_rows)
                ck.write_bytes(fs, ck.join(ckpt, "ids.dsz"), data)
                manifest["user_ids"] = {"file": "ids.dsz", "raw_bytes": raw, "sha256": digest}
            ck.write_manifest(fs, root, ckpt, manifest)
            manifest["data_changes"] = self.data_changes  # what the files hold: the data as of this count
            self.checkpoint_info = (meta.dataset_id, ckpt_uri, manifest)
            self._persist()
            log.info("distspatial: checkpoint of %d partitions written to %s", meta.n_partitions, ckpt_uri)
            return ckpt_uri

    def _periodic_checkpoints(self) -> None:
        done = None  # (data set, data changes) at the last checkpoint taken here
        while not self._stop_periodic.wait(self.config.checkpoint_interval_s):
            meta = self.meta
            if meta is None or done == (meta.dataset_id, self.data_changes):
                continue
            try:
                with self.lock:  # the state the checkpoint holds
                    state = (self.meta.dataset_id, self.data_changes)
                    self.checkpoint(self.config.checkpoint_path)
                done = state
            except Exception:
                log.exception("distspatial: periodic checkpoint failed")

    def load_checkpoint(self, path: str) -> Any:
        """Replace the data set by the checkpoint at ``path`` (its ``LATEST`` or one checkpoint directory), every
        file verified against its checksum. Returns the new view."""
        fs, ckpt, man = ck.read_manifest(path)
        ckpt_uri = ckpt if "://" not in path else path.split("://", 1)[0] + "://" + ckpt
        with self.lock:
            parts_m = man["partitions"]
            live = self.live_node_ids
            owners = place_partitions(len(parts_m), live, min(self.config.replication_factor, len(live)),
                                      self.machines())
            self.dataset_counter += 1
            dataset = self.dataset_counter
            loads = []
            for node in live:
                files = [(p["id"], ck.join(ckpt_uri, p["file"]), p["raw_bytes"], p["sha256"])
                         for p in parts_m if node in owners[p["id"]]]
                loads.append((node, self.send(node, "load_partition_files", dataset, files)))
            try:
                for node, ref in loads:
                    self.recv(node, ref)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.as_instanceof_cause()
                if isinstance(cause, ck.CheckpointError):
                    msg = str(cause).splitlines()[-1]
                    raise ck.CheckpointError(msg.split("CheckpointError: ", 1)[-1]) from None
                raise
            parts = tuple(
                PartitionInfo(
                    partition_id=p["id"], key_lo=int(p["key_lo"]), key_hi=int(p["key_hi"]), lo=np.array(p["lo"]),
                    hi=np.array(p["hi"]), size=p["size"], nbytes=p["nbytes"], owners=owners[p["id"]],
                )
                for p in parts_m
            )
            meta = GlobalIndexMetadata(
                dim=man["dim"], lo=np.array(man["lo"]), hi=np.array(man["hi"]), curve=man["curve"], bits=man["bits"],
                partitions=parts, version=max(self.version, man["version"]) + 1, dataset_id=dataset,
                crs=man.get("crs"), geographic=bool(man.get("geographic", False)),
            )
            if meta.n_points != man["n_points"]:
                raise ck.CheckpointError(
                    f"checkpoint {ckpt_uri} holds {meta.n_points} points, manifest says {man['n_points']}")
            if man["user_ids"]:
                u = man["user_ids"]
                fs2, upath = ck.resolve(ck.join(ckpt_uri, u["file"]))
                arr = ck.decode_arrays(ck.read_bytes(fs2, upath), u["raw_bytes"], u["sha256"], upath)
                self.id_sorted, self.id_rows = arr["sorted"], arr["rows"]
            else:
                self.id_sorted = self.id_rows = None
            self.mean_variance = man["mean_variance"]
            self.modified = bool(man.get("modified", False))
            self.next_id = int(man.get("next_id", meta.n_points))
            self.has_user_ids = bool(man.get("has_user_ids", self.id_sorted is not None))
            self.checkpoint_info = (dataset, ckpt_uri, {**man, "data_changes": self.data_changes})
            self.part_stamp = {}
            self.store_id_map()
            self.publish(meta, layout=True)
            return self.view()
