"""HDF5 cube shards: written whole under a temporary name and renamed, so a visible shard is a complete shard.

Layout of one shard (the contract later stages and users' scripts read)::

    cube          uint8 (N, Z, Y, X), one sample per HDF5 chunk
    synapse_id, pre_root_id, post_root_id   int64 (N)
    label         int8 (N)   1 = excitatory, 0 = inhibitory
    split         int8 (N)   0 = train, 1 = val, 2 = test
    center_vx     int64 (N, 3)  x, y, z voxels at the imagery mip
    edge          int8 (N)   1 when part of the cube lies outside the volume (zero-filled)
    attrs: imagery_url, mip, resolution_nm, cube_shape_zyx, materialization_version, config_digest,
           synhpc_version, n, complete

Usage::

    write_shard(path, cubes, rows, attrs, compression="none")
    index = build_index(run_dir / "cubes", expected={0: 256, 1: 200})
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from synhpc.atomic import write_text
from synhpc.errors import DataError

ROW_DATASETS = {
    "synapse_id": np.int64,
    "pre_root_id": np.int64,
    "post_root_id": np.int64,
    "label": np.int8,
    "split": np.int8,
    "center_vx": np.int64,
    "edge": np.int8,
}
INDEX_NAME = "index.json"


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.h5"


def compression_options(name: str) -> dict[str, Any]:
    """h5py keyword arguments for a compression name; zstd comes from hdf5plugin."""
    if name == "none":
        return {}
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 4}
    if name == "lzf":
        return {"compression": "lzf"}
    if name == "zstd":
        import hdf5plugin

        return dict(hdf5plugin.Zstd(clevel=3))
    raise ValueError(f"unknown compression {name!r}")


def write_shard(
    path: Path, cubes: np.ndarray, rows: Mapping[str, np.ndarray], attrs: Mapping[str, Any], compression: str = "none"
) -> None:
    """Write a shard atomically: temp file in the same folder, fsync, ``os.replace``.

    The temp name carries host, pid and a random part: a requeued task can run twice on two nodes with the same
    pid, and two writers must never truncate each other's file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("cube", data=cubes, chunks=(1, *cubes.shape[1:]), **compression_options(compression))
            for name, dtype in ROW_DATASETS.items():
                f.create_dataset(name, data=np.asarray(rows[name], dtype=dtype))
            for key, value in attrs.items():
                f.attrs[key] = value
            f.attrs["n"] = len(cubes)
            f.attrs["complete"] = True
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temps(path: Path, older_than_s: float = 6 * 3600) -> int:
    """Delete temp files a killed writer of ``path`` left behind; younger ones may belong to a live writer
    (checkpoint-partition jobs live 4-9 h, so 6 h without a write means dead)."""
    removed = 0
    for stale in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):
        try:
            if time.time() - stale.stat().st_mtime > older_than_s:
                stale.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def shard_complete(path: Path, expected_n: int | None = None) -> bool:
    """True when the shard exists, opens, is marked complete and holds ``expected_n`` rows."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return bool(f.attrs.get("complete", False)) and (expected_n is None or int(f.attrs["n"]) == expected_n)
    except OSError:
        return False


def build_index(cubes_dir: Path, expected: Mapping[int, int]) -> dict[str, Any]:
    """Verify every expected shard is complete, then write ``index.json`` listing them; else name the missing ones."""
    missing = [s for s, n in sorted(expected.items()) if not shard_complete(cubes_dir / shard_name(s), n)]
    if missing:
        names = ", ".join(shard_name(s) for s in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise DataError(f"{cubes_dir}: {len(missing)} shard(s) missing or incomplete: {names}")
    index = {"shards": [{"file": shard_name(s), "n": n} for s, n in sorted(expected.items())], "n": int(sum(expected.values()))}
    write_text(cubes_dir / INDEX_NAME, json.dumps(index, indent=1))
    return index


def read_index(cubes_dir: Path) -> dict[str, Any]:
    path = cubes_dir / INDEX_NAME
    if not path.is_file():
        raise DataError(f"{path}: no shard index; run `synhpc extract` first")
    return json.loads(path.read_text())


def read_rows(cubes_dir: Path) -> dict[str, np.ndarray]:
    """All per-row datasets of every indexed shard, concatenated, plus ``shard`` and ``row`` for lazy cube reads."""
    index = read_index(cubes_dir)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in (*ROW_DATASETS, "shard", "row")}
    for i, entry in enumerate(index["shards"]):
        with h5py.File(cubes_dir / entry["file"], "r") as f:
            for name in ROW_DATASETS:
                parts[name].append(f[name][...])
            n = int(f.attrs["n"])
        parts["shard"].append(np.full(n, i, dtype=np.int32))
        parts["row"].append(np.arange(n, dtype=np.int32))
    return {name: np.concatenate(values) for name, values in parts.items()}
