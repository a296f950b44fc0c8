"""Cut the cubes of one shard and write it; which shards of a run are still to do.

Usage::

    path = extract_shard(cfg, manifest, shard=3, provenance=read_provenance(run))
    todo = missing_shards(run, shard_sizes(manifest), digest)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synhpc import __version__
from synhpc.config import Config
from synhpc.errors import DataError
from synhpc.imagery import CubeReader
from synhpc.rundir import RunDir
from synhpc.shards import remove_stale_temps, shard_complete, write_shard


def shard_sizes(manifest: pd.DataFrame) -> dict[int, int]:
    return {int(s): int(n) for s, n in manifest.groupby("shard").size().items()}


def missing_shards(run: RunDir, sizes: dict[int, int], digest: str) -> list[int]:
    """Shards not yet on disk complete with this extraction's digest, in order."""
    return [s for s in sorted(sizes) if not shard_complete(run.shard(s), sizes[s], digest)]


def open_reader(cfg: Config) -> CubeReader:
    im = cfg.imagery
    return CubeReader(im.url, im.mip, fill_missing=im.fill_missing, threads=im.threads, retries=im.retries)


def extract_shard(cfg: Config, manifest: pd.DataFrame, shard: int, provenance: dict[str, Any], reader: CubeReader | None = None) -> Path:
    """Read and write every cube of ``shard``; a complete shard with the same digest is left as it is.

    A failure names the shard, so the one line an array task reports says where it stopped.
    """
    run = RunDir(cfg.run_dir)
    rows = manifest[manifest["shard"] == shard].sort_values("row")
    out = run.shard(shard)
    digest = provenance["extraction_digest"]
    if shard_complete(out, len(rows), digest):
        return out
    try:
        reader = reader or open_reader(cfg)
        centers = rows[["cx", "cy", "cz"]].to_numpy(np.int64)
        missing_before = reader.missing_chunks
        cubes, edge, missing = reader.cubes(centers, cfg.cubes.shape_zyx)
    except DataError as exc:
        raise DataError(f"{out.name}: {exc}") from None
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
            "missing": np.minimum(missing, 127),
        },
        {
            "imagery_url": cfg.imagery.url,
            "mip": cfg.imagery.mip,
            "resolution_nm": reader.resolution_nm,
            "cube_shape_zyx": np.asarray(cfg.cubes.shape_zyx, dtype=np.int64),
            "materialization_version": cfg.tables.materialization_version,
            "position_resolution_nm": np.asarray(cfg.tables.position_resolution_nm, dtype=np.float64),
            "extraction_digest": digest,
            "synhpc_version": __version__,
            "shard": shard,
            "missing_chunks": int(reader.missing_chunks - missing_before),  # distinct chunks read as zeros
        },
        compression=cfg.cubes.compression,
    )
    return out
