"""The extraction manifest: every labelled synapse with its split, voxel centre, shard and row, decided before any
cube is cut, so that shards can be written independently, in any order, by any number of tasks.

Usage::

    manifest, drops, provenance, volume = plan_manifest(cfg)
    write_manifest(cfg.run_dir, manifest, drops, provenance)
    rows = read_manifest(cfg.run_dir)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synhpc import __version__
from synhpc.atomic import write_csv, write_text
from synhpc.config import Config, digest_of
from synhpc.errors import DataError
from synhpc.geometry import to_voxels
from synhpc.imagery import open_volume
from synhpc.splits import assign_splits, balance_classes, cap_per_neuron, check_splits, spatial_conflicts
from synhpc.tables import load_labelled_synapses

MANIFEST = "synapses.csv"
DROPS = "drops.csv"
PROVENANCE = "provenance.json"


def extraction_digest(cfg: Config) -> str:
    """Hash of everything that decides the cubes' content; I/O tuning (threads, retries) does not count."""
    data = cfg.to_dict()
    imagery = {k: v for k, v in data["imagery"].items() if k not in ("threads", "retries")}
    cubes = {k: v for k, v in data["cubes"].items() if k != "compression"}
    keyed = {"tables": data["tables"], "imagery": imagery, "cubes": cubes, "split": data["split"]}
    return digest_of(keyed)


def morton_order(cells: np.ndarray) -> np.ndarray:
    """Indices that sort integer (x, y, z) cells along a Z-order curve, so shards are spatially coherent."""
    cells = np.asarray(cells, dtype=np.int64)
    cells = cells - cells.min(axis=0)
    code = np.zeros(len(cells), dtype=np.int64)
    for bit in range(20):
        for axis in range(3):
            code |= ((cells[:, axis] >> bit) & 1) << (3 * bit + axis)
    return np.argsort(code, kind="stable")


def volume_info(cfg: Config) -> dict[str, Any]:
    vol = open_volume(cfg.imagery.url, cfg.imagery.mip, cfg.imagery.fill_missing)
    return {
        "resolution_nm": [float(v) for v in vol.resolution],
        "chunk_vx": [int(v) for v in vol.chunk_size],
        "lo": [int(v) for v in vol.bounds.minpt],
        "hi": [int(v) for v in vol.bounds.maxpt],
    }


def plan_manifest(cfg: Config) -> tuple[pd.DataFrame, dict[str, int], dict[str, Any], dict[str, Any]]:
    """Labelled synapses -> split, voxel centre, shard and row for each."""
    frame, drops, provenance = load_labelled_synapses(cfg.tables)
    volume = volume_info(cfg)
    centers = to_voxels(frame[["x", "y", "z"]].to_numpy(), cfg.tables.position_resolution_nm, volume["resolution_nm"])
    lo, hi = np.asarray(volume["lo"]), np.asarray(volume["hi"])
    outside = ((centers < lo) | (centers >= hi)).any(axis=1)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise DataError(
            f"synapse {int(frame['synapse_id'].iloc[i])}: {cfg.tables.position} {frame[['x', 'y', 'z']].iloc[i].tolist()} "
            f"(x {cfg.tables.position_resolution_nm} nm) maps to voxel {centers[i].tolist()} outside the volume {lo.tolist()}-{hi.tolist()}; "
            "check tables.position_resolution_nm and imagery.mip"
        )
    frame["cx"], frame["cy"], frame["cz"] = centers[:, 0], centers[:, 1], centers[:, 2]
    frame = _split(frame, cfg, drops)
    centers = frame[["cx", "cy", "cz"]].to_numpy()
    order = morton_order(centers // np.asarray(volume["chunk_vx"]))
    frame = frame.take(order)
    frame.index = pd.RangeIndex(len(frame))  # cheaper than reset_index on millions of rows
    position = np.arange(len(frame))
    frame["shard"] = position // cfg.cubes.shard_size
    frame["row"] = position % cfg.cubes.shard_size
    provenance = provenance | {
        "imagery_url": cfg.imagery.url,
        "mip": cfg.imagery.mip,
        "volume": volume,
        "extraction_digest": extraction_digest(cfg),
        "synhpc_version": __version__,
    }
    return frame, drops, provenance, volume


def _split(frame: pd.DataFrame, cfg: Config, drops: dict[str, int]) -> pd.DataFrame:
    """Optional per-neuron cap, the neuron-disjoint split, then optional spatial separation and class balance;
    every row removed is counted in ``drops``."""
    sc = cfg.split
    if sc.max_per_neuron > 0:
        keep = cap_per_neuron(frame["pre_root_id"].to_numpy(), sc.max_per_neuron, sc.seed)
        drops["split_neuron_cap"] = int((~keep).sum())
        frame = frame[keep].reset_index(drop=True)
    frame["split"] = assign_splits(frame, sc.fractions, sc.seed)
    if sc.spatial_block_um > 0:
        nm = frame[["x", "y", "z"]].to_numpy() * np.asarray(cfg.tables.position_resolution_nm)
        drop = spatial_conflicts(nm, frame["split"].to_numpy(), sc.spatial_block_um * 1000.0)
        drops["split_spatial_conflict"] = int(drop.sum())
        frame = frame[~drop].reset_index(drop=True)
    if sc.balance_classes:
        keep = balance_classes(frame["label"].to_numpy(), frame["split"].to_numpy(), sc.seed)
        drops["split_class_balance"] = int((~keep).sum())
        frame = frame[keep].reset_index(drop=True)
    check_splits(frame["pre_root_id"].to_numpy(), frame["label"].to_numpy(), frame["split"].to_numpy())
    return frame


def write_manifest(run_dir: Path, frame: pd.DataFrame, drops: dict[str, int], provenance: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_csv(pd.DataFrame({"reason": list(drops), "rows": list(drops.values())}), run_dir / DROPS)
    write_text(run_dir / PROVENANCE, json.dumps(provenance, indent=1, default=str))
    write_csv(frame, run_dir / MANIFEST)


def read_manifest(run_dir: Path) -> pd.DataFrame:
    path = run_dir / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest; run `synhpc extract` first")
    return pd.read_csv(path)


def read_provenance(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / PROVENANCE).read_text())
