"""The extraction manifest: every labelled synapse with its split, voxel centre, shard and row, decided before any
cube is cut, so that shards can be written independently, in any order, by any number of tasks.

Usage::

    sizes, digest = prepare_run(cfg)                  # plan + write (unless the same extraction is there) + config.yaml
    manifest, drops, provenance, volume = plan_manifest(cfg)
    rows = read_manifest(RunDir(cfg.run_dir))
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from synhpc import __version__
from synhpc.atomic import write_csv, write_text
from synhpc.config import Config, digest_of, save_config
from synhpc.errors import DataError
from synhpc.geometry import to_voxels
from synhpc.imagery import open_volume
from synhpc.rundir import RunDir, read_json
from synhpc.splits import (
    assign_folds,
    assign_splits,
    balance_classes,
    cap_per_neuron,
    check_splits,
    fold_split,
    spatial_conflicts,
    split_report,
)
from synhpc.tables import load_labelled_synapses, load_targets

# Sections of the config that decide the cubes; a stage given a config that differs here from the run's refuses it.
EXTRACTION_SECTIONS = ("tables", "imagery", "cubes", "split")
# Keys inside those sections that tune I/O or storage but not content.
NOT_CONTENT = {"imagery": ("threads", "retries"), "cubes": ("compression",), "tables": ("cache_dir", "subset_cache_min_mb")}


def extraction_content(cfg: Config) -> dict[str, Any]:
    """The part of the config that decides every cube's content and every synapse's split."""
    data = cfg.to_dict()
    return {s: {k: v for k, v in data[s].items() if k not in NOT_CONTENT.get(s, ())} for s in EXTRACTION_SECTIONS}


def extraction_digest(cfg: Config) -> str:
    """Hash of everything that decides the cubes' content; I/O tuning (threads, retries) does not count."""
    return digest_of(extraction_content(cfg))


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
    if cfg.tables.targets:
        # The postsynaptic compartment (spine, shaft, soma) per synapse, for the target baseline; missing stays empty.
        targets = load_targets(cfg.tables, synapse_ids=frame["synapse_id"])
        frame = frame.merge(targets, on="synapse_id", how="left")
        provenance["targets"] = {"table": cfg.tables.targets, "synapses_without_target": int(frame["target"].isna().sum())}
    volume = volume_info(cfg)
    centers = to_voxels(frame[["x", "y", "z"]].to_numpy(), cfg.tables.position_resolution_nm, volume["resolution_nm"])
    lo, hi = np.asarray(volume["lo"]), np.asarray(volume["hi"])
    outside = ((centers < lo) | (centers >= hi)).any(axis=1)
    # Real tables hold synapses whose centre lies outside the imaged volume (segmentation and EM bounds differ): such
    # a cube would be mostly zeros, so it is dropped and counted. All of them outside means the units are wrong.
    if outside.all():
        raise DataError(
            f"synapse {int(frame['synapse_id'].iloc[0])}: {cfg.tables.position} {frame[['x', 'y', 'z']].iloc[0].tolist()} "
            f"(x {cfg.tables.position_resolution_nm} nm) maps to voxel {centers[0].tolist()} outside the volume {lo.tolist()}-{hi.tolist()}, "
            "as do all others; check tables.position_resolution_nm and imagery.mip"
        )
    drops["synapse_centre_outside_imagery"] = int(outside.sum())
    frame, centers = frame[~outside].reset_index(drop=True), centers[~outside]
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
    if sc.folds:
        folds = assign_folds(frame, sc.folds, sc.seed, tolerance=sc.tolerance)
        frame["split"] = fold_split(folds, sc.fold, sc.folds)
    else:
        frame["split"] = assign_splits(frame, sc.fractions, sc.seed, tolerance=sc.tolerance)
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


def split_targets(cfg: Config) -> list[float]:
    """The (train, val, test) fractions a split aims at: ``split.fractions``, or one fold each for val and test."""
    k = cfg.split.folds
    return [(k - 2) / k, 1 / k, 1 / k] if k else list(cfg.split.fractions)


def write_manifest(run: RunDir, frame: pd.DataFrame, drops: dict[str, int], provenance: dict[str, Any], targets: list[float]) -> None:
    """Manifest, drops, achieved split shares and provenance; provenance last, because its digest is what says
    "this manifest is done"."""
    run.path.mkdir(parents=True, exist_ok=True)
    write_csv(pd.DataFrame({"reason": list(drops), "rows": list(drops.values())}), run.drops)
    write_csv(split_report(frame, frame["split"].to_numpy(), targets), run.split_shares)
    write_csv(frame, run.manifest)
    write_text(run.provenance, json.dumps(provenance, indent=1, default=str))


def read_manifest(run: RunDir) -> pd.DataFrame:
    if not run.manifest.is_file():
        raise DataError(f"{run.manifest}: no manifest; run `synhpc extract` first")
    try:
        return pd.read_csv(run.manifest)
    except (OSError, ValueError) as exc:
        raise DataError(f"{run.manifest}: unreadable manifest ({exc.__class__.__name__})") from None


def read_provenance(run: RunDir) -> dict[str, Any]:
    return read_json(run.provenance, "provenance record (run `synhpc extract` first)")


def prepare_run(cfg: Config) -> tuple[dict[int, int], str]:
    """Plan the manifest and write it (unless the same extraction is already there) with the resolved config;
    return shard sizes and the extraction digest. A run folder prepared by a different extraction is refused."""
    from synhpc.cubes import shard_sizes

    run = RunDir(cfg.run_dir)
    check_same_extraction(cfg, run)
    manifest, drops, provenance, _ = plan_manifest(cfg)
    if not run.provenance.is_file() or not run.manifest.is_file():
        write_manifest(run, manifest, drops, provenance, split_targets(cfg))
    save_config(cfg, run.config)
    return shard_sizes(manifest), provenance["extraction_digest"]


def check_same_extraction(cfg: Config, run: RunDir) -> None:
    """Refuse ``cfg`` when the run folder was extracted with other content settings (cube shape, mip, imagery,
    tables, split): its shards, manifest and config would contradict each other. Names the first key that differs."""
    if not run.provenance.is_file():
        return
    recorded = read_provenance(run).get("extraction_digest")
    if recorded == extraction_digest(cfg):
        return
    key, was, now = "the extraction settings", "?", "?"
    if run.config.is_file():
        from synhpc.config import load_run_config

        before, after = extraction_content(load_run_config(run.path)), extraction_content(cfg)
        for section in EXTRACTION_SECTIONS:
            for name in sorted(set(before[section]) | set(after[section])):
                if before[section].get(name) != after[section].get(name):
                    key, was, now = f"{section}.{name}", before[section].get(name), after[section].get(name)
                    break
            if key != "the extraction settings":
                break
    raise DataError(
        f"{run.path}: was extracted with {key} = {was!r}, this config has {now!r}; "
        "use a new run.name (or the run's own settings) instead of mixing two extractions in one folder"
    )
