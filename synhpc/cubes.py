"""Cut the cubes of one shard and write it.

Usage::

    path = extract_shard(cfg, manifest, shard=3, provenance=read_provenance(cfg.run_dir))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synhpc import __version__
from synhpc.config import Config
from synhpc.imagery import CubeReader
from synhpc.shards import remove_stale_temps, shard_complete, shard_name, write_shard

CUBES_DIR = "cubes"


def shard_sizes(manifest: pd.DataFrame) -> dict[int, int]:
    return {int(s): int(n) for s, n in manifest.groupby("shard").size().items()}


def shard_done(cfg: Config, shard: int, n: int, digest: str) -> bool:
    path = cfg.run_dir / CUBES_DIR / shard_name(shard)
    if not shard_complete(path, n):
        return False
    import h5py

    with h5py.File(path, "r") as f:
        return f.attrs.get("config_digest") == digest


def extract_shard(cfg: Config, manifest: pd.DataFrame, shard: int, provenance: dict[str, Any], reader: CubeReader | None = None) -> Path:
    """Read and write every cube of ``shard``; a complete shard with the same digest is left as it is."""
    rows = manifest[manifest["shard"] == shard].sort_values("row")
    out = cfg.run_dir / CUBES_DIR / shard_name(shard)
    digest = provenance["extraction_digest"]
    if shard_done(cfg, shard, len(rows), digest):
        return out
    reader = reader or CubeReader(cfg.imagery.url, cfg.imagery.mip, fill_missing=cfg.imagery.fill_missing, threads=cfg.imagery.threads, retries=cfg.imagery.retries)
    centers = rows[["cx", "cy", "cz"]].to_numpy(np.int64)
    cubes, edge = reader.cubes(centers, cfg.cubes.shape_zyx)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    write_shard(
        out,
        cubes,
        {
            "synapse_id": rows["synapse_id"].to_numpy(),
            "pre_root_id": rows["pre_root_id"].to_numpy(),
            "post_root_id": rows["post_root_id"].to_numpy(),
            "label": rows["label"].to_numpy(),
            "split": rows["split"].to_numpy(),
            "center_vx": centers,
            "edge": edge,
        },
        {
            "imagery_url": cfg.imagery.url,
            "mip": cfg.imagery.mip,
            "resolution_nm": reader.resolution_nm,
            "cube_shape_zyx": np.asarray(cfg.cubes.shape_zyx, dtype=np.int64),
            "materialization_version": cfg.tables.materialization_version,
            "position_resolution_nm": np.asarray(cfg.tables.position_resolution_nm, dtype=np.float64),
            "config_digest": digest,
            "synhpc_version": __version__,
            "shard": shard,
        },
        compression=cfg.cubes.compression,
    )
    return out
