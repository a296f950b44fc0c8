"""Which synapses a prediction run labels: a streaming pass over the synapse table that keeps the rows a
``predict`` selection asks for (presynaptic roots, synapse ids, a bounding box, labelled or not), after the same table
filters training uses (invalid, below ``tables.min_size``, autapses), counting every dropped row by reason.

Usage::

    frame, drops, provenance = select_synapses(cfg.tables, cfg.predict)

``frame`` has ``synapse_id, pre_root_id, post_root_id, size, x, y, z, label`` (positions in the table's units;
``label`` is the presynaptic cell type's class where the cell-type table has one, else missing). Memory follows the
selected rows, not the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from synhpc.config import PredictConfig, TablesConfig
from synhpc.dumps import cast_column, first_null, iter_batches, open_dump, read_dump
from synhpc.errors import ConfigError, DataError

ID, PRE, POST, SIZE, VALID = "id", "pre_pt_root_id", "post_pt_root_id", "size", "valid"


def read_ids(location: str, columns: tuple[str, ...], key: str, cache_dir: str) -> np.ndarray:
    """Integer ids from a file: a plain list (one per line) or a table with one of ``columns``; a value that is not an
    integer is a one-line error naming the file and the line."""
    path = Path(location)
    if location and path.suffix.lower() in (".txt", ".ids", "") and path.is_file():
        ids = []
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                ids.append(int(text))
            except ValueError:
                raise DataError(f"{location}: line {number}: {text[:40]!r} is not an integer id ({key})") from None
        return np.unique(np.asarray(ids, dtype=np.int64))
    dump = open_dump(location, cache_dir=cache_dir, what=key)
    column = next((c for c in columns if c in dump.columns), None)
    if column is None:
        raise DataError(f"{location}: needs a column named {' or '.join(columns)} ({key})")
    frame = read_dump(dump, {column: pa.int64()})
    if frame[column].isna().any():
        row = int(np.flatnonzero(frame[column].isna().to_numpy())[0])
        raise DataError(f"{location}: {dump.where(row)}, column {column}: empty value ({key})")
    return np.unique(frame[column].to_numpy(np.int64))


def select_synapses(tables: TablesConfig, predict: PredictConfig) -> tuple[pd.DataFrame, dict[str, int], dict[str, Any]]:
    """The synapses ``predict`` selects from ``tables.synapses``, with their presynaptic labels where known."""
    from synhpc.tables import _parse_points, _read_cell_types, cell_labels

    if tables.source != "files":
        raise ConfigError("predict reads the synapse table from files: set tables.source: files (the static dumps, e.g. configs/microns-dumps.yaml)")
    roots = np.unique(np.asarray(predict.pre_root_ids, dtype=np.int64)) if predict.pre_root_ids else None
    if predict.pre_root_ids_file:
        listed = read_ids(predict.pre_root_ids_file, ("pre_root_id", "pre_pt_root_id", "pt_root_id", "root_id"), "predict.pre_root_ids_file", tables.cache_dir)
        roots = listed if roots is None else np.intersect1d(roots, listed)
    wanted_ids = read_ids(predict.synapse_ids_file, ("synapse_id", "id"), "predict.synapse_ids_file", tables.cache_dir) if predict.synapse_ids_file else None
    cells, cell_dump = _read_cell_types(tables)
    labels, _ = cell_labels(cells, tables.cell_type_table, cell_dump.location, cell_dump.where)
    dump = open_dump(tables.synapses, header=tables.synapses_header, cache_dir=tables.cache_dir, what="tables.synapses", header_key="tables.synapses_header")
    for needed in (ID, PRE, POST):
        if needed not in dump.columns:
            raise DataError(f"{dump.location}: missing column '{needed}'")
    split = [f"{tables.position}_{axis}" for axis in "xyz"]
    packed = not all(c in dump.columns for c in split)
    positions = [tables.position] if packed else split
    if packed and tables.position not in dump.columns:
        raise DataError(f"{dump.location}: missing column '{tables.position}' (or '{tables.position}_x/_y/_z')")
    types: dict[str, Any] = {ID: pa.int64(), PRE: pa.int64(), POST: pa.int64()}
    if SIZE in dump.columns:
        types[SIZE] = pa.float64()
    if VALID in dump.columns:
        types[VALID] = pa.bool_()
    for c in positions:
        types[c] = None if packed else pa.float64()
    label_roots = pa.array(labels.index.to_numpy(np.int64), type=pa.int64())
    label_values = labels.to_numpy(np.int8)
    drops: dict[str, int] = {}
    parts = []
    for first, batch in iter_batches(dump, types):
        col = {name: cast_column(batch.column(name), t, dump, name, first) for name, t in types.items()}
        for name in (c for c in types if not (packed and c in positions)):
            i = first_null(col[name])
            if i is not None:
                raise DataError(f"{dump.location}: {dump.where(first + i)}, column {name}: empty value")
        ids, pre, post = col[ID].to_numpy(), col[PRE].to_numpy(), col[POST].to_numpy()
        size = col[SIZE].to_numpy() if SIZE in col else np.zeros(len(ids))
        keep = np.ones(len(ids), dtype=bool)

        def drop(reason: str, mask: np.ndarray, keep: np.ndarray = keep) -> None:
            drops[reason] = drops.get(reason, 0) + int(np.count_nonzero(mask & keep))
            np.logical_and(keep, ~mask, out=keep)

        if VALID in col:
            drop("synapse_invalid", ~col[VALID].to_numpy(zero_copy_only=False))
        if tables.min_size > 0:
            drop("synapse_below_min_size", size < tables.min_size)
        if tables.drop_autapses:
            drop("synapse_autapse", pre == post)
        if roots is not None:
            drop("synapse_pre_root_not_selected", ~np.isin(pre, roots))
        if wanted_ids is not None:
            drop("synapse_id_not_selected", ~np.isin(ids, wanted_ids))
        index = pc.index_in(col[PRE], value_set=label_roots)
        known = np.asarray(index.is_valid())
        if predict.labelled == "labelled":
            drop("synapse_pre_root_unlabelled", ~known)
        elif predict.labelled == "unlabelled":
            drop("synapse_pre_root_labelled", known)
        if packed:
            xyz = np.full((len(ids), 3), np.nan)
            kept = np.flatnonzero(keep)
            xyz[kept] = _parse_points(col[positions[0]].take(pa.array(kept)).to_pylist(), dump, positions[0], first + kept)
        else:
            xyz = np.column_stack([col[c].to_numpy() for c in positions])
        bad = keep & ~np.isfinite(xyz).all(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{dump.location}: {dump.where(first + i)}: synapse {int(ids[i])} has a NaN or infinite {tables.position}")
        if predict.bbox:
            lo, hi = np.asarray(predict.bbox[:3]), np.asarray(predict.bbox[3:])
            drop("synapse_outside_bbox", ~((xyz >= lo) & (xyz < hi)).all(axis=1))
        kept = np.flatnonzero(keep)
        if kept.size:
            label = np.full(kept.size, np.nan)
            idx = index.to_numpy(zero_copy_only=False)[kept]
            has = known[kept]
            label[has] = label_values[idx[has].astype(np.int64)]
            parts.append(pd.DataFrame({
                "synapse_id": ids[kept], "pre_root_id": pre[kept], "post_root_id": post[kept], "size": size[kept].astype(np.int64),
                "x": xyz[kept, 0], "y": xyz[kept, 1], "z": xyz[kept, 2], "label": label,
            }))  # fmt: skip
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["synapse_id", "pre_root_id", "post_root_id", "size", "x", "y", "z", "label"])
    dup = frame["synapse_id"].duplicated()
    if dup.any():
        raise DataError(f"{dump.location}: duplicate synapse id {int(frame['synapse_id'][dup].iloc[0])}")
    if frame.empty:
        raise DataError(
            f"{dump.location}: the prediction selection is empty (drops: {drops}); "
            "check predict.pre_root_ids, predict.synapse_ids_file, predict.bbox and predict.labelled"
        )
    provenance = {"synapses": dump.provenance(), "cell_types": cell_dump.provenance(), "position": tables.position,
                  "materialization_version": tables.materialization_version}  # fmt: skip
    return frame, drops, provenance
