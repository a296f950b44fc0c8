"""HDF5 cube shards: written whole under a temporary name and renamed, indexed with checksums, and verified against the
manifest before any stage uses them.

Layout of one shard (the contract later stages and users' scripts read)::

    cube          uint8 (N, Z, Y, X), one sample per HDF5 chunk, each chunk with a Fletcher-32 checksum
    synapse_id, pre_root_id, post_root_id   int64 (N)
    label         int8 (N)   1 = excitatory, 0 = inhibitory
    split         int8 (N)   0 = train, 1 = val, 2 = test
    center_vx     int64 (N, 3)  x, y, z voxels at the imagery mip
    edge          int8 (N)   1 when part of the cube lies outside the volume (zero-filled)
    missing       int8 (N)   number of missing (zero-filled) imagery chunks the cube overlaps
    attrs: imagery_url, mip, resolution_nm, cube_shape_zyx, materialization_version, extraction_digest,
           synhpc_version, shard, n, missing_chunks, complete

Usage::

    write_shard(path, cubes, rows, attrs, compression="zstd")
    build_index(run, sizes={0: 256, 1: 200}, digest)   # cubes/index.json with row counts and sha256 per shard
    rows = verified_rows(run)                          # every row dataset, checked against index and manifest
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# hdf5plugin registers the zstd (and other) filters with HDF5 when imported; every process that opens a shard goes
# through this module, so a compressed shard never meets a reader without its filter.
import h5py
import hdf5plugin
import numpy as np

from synhpc.atomic import write_text
from synhpc.errors import DataError
from synhpc.rundir import RunDir, read_json, shard_name

ROW_DATASETS = {
    "synapse_id": np.int64,
    "pre_root_id": np.int64,
    "post_root_id": np.int64,
    "label": np.int8,
    "split": np.int8,
    "center_vx": np.int64,
    "edge": np.int8,
    "missing": np.int8,
}
# Row datasets that must equal the manifest's columns of the same rows: what decides which neuron a cube trains on.
MANIFEST_COLUMNS = {"synapse_id": "synapse_id", "pre_root_id": "pre_root_id", "label": "label", "split": "split"}
COMPRESSIONS = ("none", "zstd", "lz4", "blosc", "gzip", "lzf")


def compression_options(name: str) -> dict[str, Any]:
    """h5py keyword arguments for a compression name; zstd, lz4 and blosc come from hdf5plugin."""
    if name == "none":
        return {}
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 4}
    if name == "lzf":
        return {"compression": "lzf"}
    if name == "zstd":
        return dict(hdf5plugin.Zstd(clevel=3))
    if name == "lz4":
        return dict(hdf5plugin.LZ4())
    if name == "blosc":
        return dict(hdf5plugin.Blosc(cname="zstd", clevel=3, shuffle=hdf5plugin.Blosc.NOSHUFFLE))
    raise ValueError(f"unknown compression {name!r} (known: {', '.join(COMPRESSIONS)})")


def open_shard(path: Path) -> h5py.File:
    """A shard opened read-only, or a one-line DataError naming it."""
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise DataError(f"{path}: shard missing") from None
    except OSError as exc:
        raise DataError(f"{path}: unreadable shard ({str(exc).splitlines()[0]})") from None


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
            f.create_dataset("cube", data=cubes, chunks=(1, *cubes.shape[1:]), fletcher32=True, **compression_options(compression))
            for name, dtype in ROW_DATASETS.items():
                values = rows[name] if name in rows else np.zeros(len(cubes), dtype=dtype)
                f.create_dataset(name, data=np.asarray(values, dtype=dtype))
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


def shard_complete(path: Path, expected_n: int | None = None, digest: str | None = None) -> bool:
    """True when the shard exists, opens, is marked complete, holds ``expected_n`` rows and (when given) was cut by
    the extraction with ``digest``."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("complete", False) or (expected_n is not None and int(f.attrs["n"]) != expected_n):
                return False
            return digest is None or f.attrs.get("extraction_digest") == digest
    except (OSError, KeyError):
        return False


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def build_index(run: RunDir, sizes: Mapping[int, int], digest: str) -> dict[str, Any]:
    """Verify every expected shard is complete and from this extraction, then write ``cubes/index.json`` with each
    shard's row count, size and sha256; else name the missing ones."""
    missing = [s for s, n in sorted(sizes.items()) if not shard_complete(run.shard(s), n, digest)]
    if missing:
        names = ", ".join(shard_name(s) for s in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise DataError(f"{run.cubes}: {len(missing)} shard(s) missing, incomplete or from another extraction: {names}")
    entries, cache = [], {}
    for s, n in sorted(sizes.items()):
        path = run.shard(s)
        stat = path.stat()
        sha = file_sha256(path)
        with open_shard(path) as f:
            missing, edge = int(f.attrs.get("missing_chunks", 0)), int(np.count_nonzero(f["edge"][...]))
        entries.append({"file": path.name, "n": int(n), "bytes": stat.st_size, "sha256": sha, "missing_chunks": missing, "edge_cubes": edge})
        cache[path.name] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
    index = {
        "extraction_digest": digest, "n": int(sum(sizes.values())),
        # Imagery chunks read as zeros (fill_missing) and cubes crossing the volume edge, over all shards.
        "missing_chunks": sum(e["missing_chunks"] for e in entries), "edge_cubes": sum(e["edge_cubes"] for e in entries),
        "shards": entries,
    }  # fmt: skip
    write_text(run.index, json.dumps(index, indent=1))
    _write_verified(run, cache)
    return index


def read_index(run: RunDir) -> dict[str, Any]:
    if not run.index.is_file():
        raise DataError(f"{run.index}: no shard index; run `synhpc extract` first")
    index = read_json(run.index, "shard index")
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list) or "extraction_digest" not in index:
        raise DataError(f"{run.index}: not a synhpc shard index (rebuild it: `python -m jobs.index {run.path}`)")
    return index


# Shards verified in this process: (path, bytes, mtime_ns) -> sha256. A process verifies each shard once.
_VERIFIED_HERE: dict[tuple[str, int, int], str] = {}


def _write_verified(run: RunDir, cache: dict[str, Any]) -> None:
    try:
        write_text(run.verified, json.dumps(cache, indent=1))
    except OSError:
        pass  # a read-only run folder still verifies; it only hashes again next time


def verify_checksums(run: RunDir, index: dict[str, Any]) -> None:
    """Every indexed shard exists with the size and sha256 the index recorded.

    Hashing every shard on every start would cost minutes on a large run, so a shard whose size and mtime match the
    last verification (``cubes/verified.json``) is trusted; any write to a shard changes its mtime and forces a hash.
    """
    try:
        cache = json.loads(run.verified.read_text()) if run.verified.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    changed = False
    for entry in index["shards"]:
        path = run.cubes / entry["file"]
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise DataError(f"{path}: shard listed in {run.index.name} is missing") from None
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if _VERIFIED_HERE.get(key) == entry["sha256"]:
            continue
        if stat.st_size != entry["bytes"]:
            raise DataError(f"{path}: {stat.st_size} bytes, but {run.index.name} recorded {entry['bytes']} (changed or replaced after indexing)")
        seen = cache.get(entry["file"], {})
        if not (seen.get("bytes") == stat.st_size and seen.get("mtime_ns") == stat.st_mtime_ns and seen.get("sha256") == entry["sha256"]):
            if file_sha256(path) != entry["sha256"]:
                raise DataError(f"{path}: content does not match its sha256 in {run.index.name} (corrupt, edited or replaced)")
            cache[entry["file"]] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": entry["sha256"]}
            changed = True
        _VERIFIED_HERE[key] = entry["sha256"]
    if changed:
        _write_verified(run, cache)


def verified_rows(run: RunDir, manifest: Any = None) -> dict[str, np.ndarray]:
    """All per-row datasets of every indexed shard, concatenated, plus ``shard`` and ``row`` for lazy cube reads,
    after checking each shard's checksum, its extraction digest, and its ids, roots, labels and splits against the
    run's manifest (``synapses.csv``) row by row.

    ``manifest``: the manifest frame when the caller has it already (else it is read).
    """
    from synhpc.manifest import read_manifest, read_provenance

    index = read_index(run)
    digest = read_provenance(run).get("extraction_digest")
    if index["extraction_digest"] != digest:
        raise DataError(f"{run.index}: indexes extraction {index['extraction_digest']}, but this run's provenance.json says {digest}")
    verify_checksums(run, index)
    manifest = read_manifest(run) if manifest is None else manifest
    by_shard = {int(s): part.sort_values("row") for s, part in manifest.groupby("shard")}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in (*ROW_DATASETS, "shard", "row")}
    for i, entry in enumerate(index["shards"]):
        path = run.cubes / entry["file"]
        with open_shard(path) as f:
            if f.attrs.get("extraction_digest") != digest:
                raise DataError(f"{path}: cut by another extraction ({f.attrs.get('extraction_digest')}, this run's is {digest})")
            try:
                rows = {name: f[name][...] for name in ROW_DATASETS}
            except KeyError as exc:
                raise DataError(f"{path}: not a synhpc shard (missing dataset {exc})") from None
            n = int(f.attrs["n"])
        shard = int(entry["file"][len("shard-") : len("shard-") + 5])
        _check_against_manifest(path, rows, by_shard.get(shard), n)
        for name in ROW_DATASETS:
            parts[name].append(rows[name])
        parts["shard"].append(np.full(n, i, dtype=np.int32))
        parts["row"].append(np.arange(n, dtype=np.int32))
    return {name: np.concatenate(values) for name, values in parts.items()}


def _check_against_manifest(path: Path, rows: dict[str, np.ndarray], expected: Any, n: int) -> None:
    if expected is None or len(expected) != n or any(len(rows[name]) != n for name in MANIFEST_COLUMNS):
        want = 0 if expected is None else len(expected)
        raise DataError(f"{path}: holds {n} rows where the manifest has {want} for this shard (foreign or damaged shard)")
    for name, column in MANIFEST_COLUMNS.items():
        want = expected[column].to_numpy()
        bad = np.flatnonzero(rows[name] != want)
        if len(bad):
            r = int(bad[0])
            raise DataError(f"{path}: row {r} has {name} {rows[name][r]} where the manifest has {want[r]} (edited or foreign shard)")
