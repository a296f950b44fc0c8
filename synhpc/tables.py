"""Synapse and cell-type tables -> one labelled synapse frame, with every dropped row counted by reason.

Usage::

    labelled, drops, provenance = load_labelled_synapses(cfg.tables)

``labelled`` has columns ``synapse_id, pre_root_id, post_root_id, size, x, y, z, label`` with positions still in
the table's units (``cfg.tables.position_resolution_nm``); :mod:`synhpc.geometry` converts them, once.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from synhpc.config import TablesConfig
from synhpc.errors import ConfigError, DataError

LABELS = {"excitatory": 1, "inhibitory": 0}


@cache
def vocabularies() -> dict[str, dict[str, Any]]:
    """Per cell-type table: the class column and ``class -> excitatory | inhibitory | drop``."""
    text = resources.files("synhpc").joinpath("data/vocabularies.yaml").read_text()
    return yaml.safe_load(text)


def read_table(location: str) -> pd.DataFrame:
    """Read a static table dump: csv, csv.gz, parquet or feather, from a local path or URL."""
    name = location.split("?")[0].lower()
    is_url = re.match(r"^[a-z][a-z0-9+.-]*://", location) is not None
    if not is_url and not Path(location).is_file():
        raise DataError(f"table file not found: {location}")
    try:
        if name.endswith((".parquet", ".pq")):
            return pd.read_parquet(location)
        if name.endswith((".feather", ".arrow")):
            return pd.read_feather(location)
        if name.endswith((".csv", ".csv.gz", ".csv.bz2", ".csv.zst", ".tsv", ".tsv.gz")):
            return pd.read_csv(location, sep="\t" if ".tsv" in name else ",", low_memory=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{location}: cannot read table ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
    raise DataError(f"{location}: unknown table format (use .csv, .csv.gz, .parquet or .feather)")


def _positions(frame: pd.DataFrame, column: str, source: str) -> np.ndarray:
    """Positions as float (n, 3) from split ``<column>_x/_y/_z`` columns or one packed column."""
    split = [f"{column}_{axis}" for axis in "xyz"]
    if all(c in frame.columns for c in split):
        return frame[split].to_numpy(dtype=np.float64)
    if column in frame.columns:
        return np.array([_parse_point(v, source, column, i) for i, v in enumerate(frame[column])], dtype=np.float64).reshape(-1, 3)
    raise DataError(f"{source}: missing column '{column}' (or '{column}_x/_y/_z')")


def _parse_point(value: Any, source: str, column: str, row: int) -> list[float]:
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) == 3:
        return [float(v) for v in value]
    numbers = re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan", str(value), flags=re.IGNORECASE)
    if len(numbers) != 3:
        raise DataError(f"{source}: row {row}: cannot read a 3D point from {column}={value!r}")
    return [float(v) for v in numbers]


def _require(frame: pd.DataFrame, columns: list[str], source: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: missing column '{missing[0]}'")


def cell_labels(cells: pd.DataFrame, table: str, source: str) -> tuple[pd.Series, dict[str, int]]:
    """Label per root id (1/0) from a cell-type table; drops and conflicting duplicates are counted."""
    vocab = vocabularies().get(table)
    if vocab is None:
        raise ConfigError(f"tables.cell_type_table: no vocabulary for '{table}' (known: {', '.join(vocabularies())})")
    column = vocab["column"]
    _require(cells, ["pt_root_id", column], source)
    if "valid" in cells.columns:
        cells = cells[cells["valid"].astype(bool)]
    classes = cells[column].astype(str)
    unknown = sorted(set(classes) - set(vocab["classes"]))
    if unknown:
        row = int(np.flatnonzero(classes.to_numpy() == unknown[0])[0])
        raise DataError(f"{source}: row {row}: unknown cell-type class {column}={unknown[0]!r} for table {table}")
    meaning = classes.map(vocab["classes"])
    drops = {"cell_type_drop_class": int((meaning == "drop").sum())}
    kept = pd.DataFrame({"root": cells["pt_root_id"].astype(np.int64), "label": meaning.map(LABELS)})[meaning != "drop"]
    per_root = kept.groupby("root")["label"].agg(["min", "max", "size"])
    conflicting = per_root["min"] != per_root["max"]
    drops["cell_type_conflicting_roots"] = int(conflicting.sum())
    drops["cell_type_duplicate_rows_merged"] = int((per_root.loc[~conflicting, "size"] - 1).sum())
    labels = per_root.loc[~conflicting, "min"].astype(np.int8)
    labels.index.name = "pre_root_id"
    return labels, drops


def normalize_synapses(syn: pd.DataFrame, cfg: TablesConfig, source: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """Select, filter and rename synapse rows; positions stay in table units."""
    _require(syn, ["id", "pre_pt_root_id", "post_pt_root_id"], source)
    pos = _positions(syn, cfg.position, source)
    frame = pd.DataFrame(
        {
            "synapse_id": syn["id"].to_numpy(np.int64),
            "pre_root_id": syn["pre_pt_root_id"].to_numpy(np.int64),
            "post_root_id": syn["post_pt_root_id"].to_numpy(np.int64),
            "size": syn["size"].to_numpy(np.int64) if "size" in syn.columns else np.zeros(len(syn), np.int64),
            "x": pos[:, 0],
            "y": pos[:, 1],
            "z": pos[:, 2],
        }
    )
    dup = frame["synapse_id"].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(f"{source}: row {row}: duplicate synapse id {int(frame['synapse_id'].iloc[row])}")
    bad = ~np.isfinite(pos).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{source}: row {row}: synapse {int(frame['synapse_id'].iloc[row])} has a NaN or infinite {cfg.position}")
    drops: dict[str, int] = {}
    keep = np.ones(len(frame), dtype=bool)
    if "valid" in syn.columns:
        invalid = ~syn["valid"].astype(bool).to_numpy()
        drops["synapse_invalid"] = int((invalid & keep).sum())
        keep &= ~invalid
    if cfg.min_size > 0:
        small = frame["size"].to_numpy() < cfg.min_size
        drops["synapse_below_min_size"] = int((small & keep).sum())
        keep &= ~small
    if cfg.drop_autapses:
        autapse = (frame["pre_root_id"] == frame["post_root_id"]).to_numpy()
        drops["synapse_autapse"] = int((autapse & keep).sum())
        keep &= ~autapse
    if cfg.pre_root_ids:
        outside = ~frame["pre_root_id"].isin(cfg.pre_root_ids).to_numpy()
        drops["synapse_pre_root_not_requested"] = int((outside & keep).sum())
        keep &= ~outside
    return frame[keep].reset_index(drop=True), drops


def load_labelled_synapses(cfg: TablesConfig) -> tuple[pd.DataFrame, dict[str, int], dict[str, Any]]:
    """Read both tables from the configured source and attach presynaptic labels."""
    if cfg.source == "cave":
        from synhpc.sources.cave import fetch_tables

        syn_raw, cells_raw, provenance = fetch_tables(cfg)
        syn_source = f"cave:{cfg.synapse_table}@v{cfg.materialization_version}"
        cell_source = f"cave:{cfg.cell_type_table}@v{cfg.materialization_version}"
    else:
        syn_raw, cells_raw = read_table(cfg.synapses), read_table(cfg.cell_types)
        syn_source, cell_source = cfg.synapses, cfg.cell_types
        provenance = {"synapses": cfg.synapses, "cell_types": cfg.cell_types}
    provenance |= {"materialization_version": cfg.materialization_version, "position": cfg.position}
    synapses, drops = normalize_synapses(syn_raw, cfg, syn_source)
    labels, cell_drops = cell_labels(cells_raw, cfg.cell_type_table, cell_source)
    drops |= cell_drops
    label = synapses["pre_root_id"].map(labels)
    drops["synapse_pre_root_unlabelled"] = int(label.isna().sum())
    synapses = synapses[label.notna()].reset_index(drop=True)
    synapses["label"] = label.dropna().astype(np.int8).to_numpy()
    if synapses.empty:
        raise DataError(f"{syn_source}: no labelled synapses left after filtering (drops: {drops})")
    return synapses, drops, provenance
