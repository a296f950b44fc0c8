"""Synapse and cell-type tables -> one labelled synapse frame, with every dropped row counted by reason.

Usage::

    labelled, drops, provenance = load_labelled_synapses(cfg.tables)
    targets = load_targets(cfg.tables, synapse_ids=labelled["synapse_id"])   # when tables.targets is set

``labelled`` has columns ``synapse_id, pre_root_id, post_root_id, size, x, y, z, label`` (in the table's row
order) with positions still in the table's units (``cfg.tables.position_resolution_nm``); :mod:`synhpc.geometry`
converts them, once.

The synapse table is never loaded whole: :mod:`synhpc.dumps` streams it in blocks, and each block is checked,
filtered (invalid, below ``min_size``, autapse, presynaptic root not requested, presynaptic root unlabelled --
counted in that order) and labelled before the next is read, so memory follows the labelled rows, not the table.
For synapse tables of at least ``tables.subset_cache_min_mb`` (the public dump is ~20 GB) the labelled rows are
written once to ``<tables.cache_dir>/subsets/<name>-<key>.parquet``, whose key digests what decides its content
(the synapse file's identity: path, size and mtime, or URL, size and ETag; its sidecar; the labels derived from
the cell-type table and its vocabulary; the filters; the position column), and later loads read that file.

Errors name the file, the row and the column. Duplicate synapse ids are looked for among the rows kept (a check
over all 337 M ids would need memory that grows with the table).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable, Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from synhpc.config import TablesConfig, digest_of
from synhpc.dumps import (
    FALSE_VALUES,
    TRUE_VALUES,
    Dump,
    LocalFile,
    cast_column,
    first_null,
    iter_batches,
    open_dump,
    read_dump,
)
from synhpc.errors import ConfigError, DataError

LABELS = {"excitatory": 1, "inhibitory": 0}
TARGETS = ("spine", "shaft", "soma")
FRAME_COLUMNS = ["synapse_id", "pre_root_id", "post_root_id", "size", "x", "y", "z", "label"]
# The cached subset keeps each row's place in the source table, for error messages about it.
SUBSET_SCHEMA = pa.schema([("synapse_id", pa.int64()), ("pre_root_id", pa.int64()), ("post_root_id", pa.int64()),
                           ("size", pa.int64()), ("x", pa.float64()), ("y", pa.float64()), ("z", pa.float64()),
                           ("label", pa.int8()), ("source_row", pa.int64())])
# Bumped whenever what the scan keeps or counts changes, so no older cache file is ever taken for a current one.
SUBSET_FORMAT = 1
ROW_GROUP_ROWS = 1 << 20
ID, PRE, POST, SIZE, VALID = "id", "pre_pt_root_id", "post_pt_root_id", "size", "valid"


@cache
def vocabularies() -> dict[str, dict[str, Any]]:
    """Per cell-type table: the class column and ``class -> excitatory | inhibitory | drop``."""
    text = resources.files("synhpc").joinpath("data/vocabularies.yaml").read_text()
    return yaml.safe_load(text)


def read_table(location: str, *, header: str = "", cache_dir: str = "logs/cache/tables") -> pd.DataFrame:
    """A whole (small) table, every column: csv (header row, or headerless with a ``_header.csv`` sidecar),
    csv.gz, parquet or feather, local or remote.

    Usage: ``cells = read_table("aibs_metamodel_celltypes_v661_merged.csv.gz")``
    """
    return read_dump(open_dump(location, header=header, cache_dir=cache_dir))


# ---------------------------------------------------------------------------------------------------- cell types


def cell_labels(cells: pd.DataFrame, table: str, source: str,
                where: Callable[[int], str] = "row {}".format) -> tuple[pd.Series, dict[str, int]]:
    """Label per root id (1/0) from a cell-type table; invalid rows, drop classes, root 0 and conflicting
    duplicates are counted. ``where(row)`` words a row's place in messages (``Dump.where`` adds the line).

    Usage: ``labels, drops = cell_labels(cells, "aibs_metamodel_celltypes_v661", "cells.csv")``
    """
    vocab = _vocabulary(table)
    column = vocab["column"]
    _require(cells, ["pt_root_id", column], source)
    drops: dict[str, int] = {}
    if VALID in cells.columns:
        valid = _truth(cells[VALID], source, VALID, where)
        drops["cell_type_invalid"] = int((~valid).sum())
        cells = cells[valid]
    classes = cells[column].astype(str)
    unknown = sorted(set(classes) - set(vocab["classes"]))
    if unknown:
        row = int(cells.index[np.flatnonzero(classes.to_numpy() == unknown[0])[0]])
        raise DataError(f"{source}: {where(row)}: unknown cell-type class {column}={unknown[0]!r} for table {table}")
    meaning = classes.map(vocab["classes"])
    drops["cell_type_drop_class"] = int((meaning == "drop").sum())
    roots = pd.to_numeric(cells["pt_root_id"], errors="coerce")
    if roots.isna().any():
        row = int(cells.index[np.flatnonzero(roots.isna().to_numpy())[0]])
        raise DataError(f"{source}: {where(row)}, column pt_root_id: {cells['pt_root_id'].loc[row]!r} is not an integer")
    roots = roots.astype(np.int64)
    unattached = (roots == 0) & (meaning != "drop")  # root 0 is "no segment": a nucleus without a cell
    if unattached.any():
        drops["cell_type_root_zero"] = int(unattached.sum())
    kept = pd.DataFrame({"root": roots, "label": meaning.map(LABELS)})[(meaning != "drop") & ~unattached]
    per_root = kept.groupby("root")["label"].agg(["min", "max", "size"])
    conflicting = per_root["min"] != per_root["max"]
    drops["cell_type_conflicting_roots"] = int(conflicting.sum())
    drops["cell_type_duplicate_rows_merged"] = int((per_root.loc[~conflicting, "size"] - 1).sum())
    labels = per_root.loc[~conflicting, "min"].astype(np.int8)
    labels.index.name = "pre_root_id"
    return labels, drops


def _vocabulary(table: str) -> dict[str, Any]:
    vocab = vocabularies().get(table)
    if vocab is None:
        raise ConfigError(f"tables.cell_type_table: no vocabulary for '{table}' (known: {', '.join(vocabularies())})")
    return vocab


def _truth(values: pd.Series, source: str, column: str, where: Callable[[int], str]) -> np.ndarray:
    """Booleans from bool, 0/1 or Postgres ``t``/``f`` text (``astype(bool)`` would read "f" as True)."""
    if values.dtype == bool:
        return values.to_numpy()
    text = values.astype(str).str.strip()
    truth, falsity = text.isin(TRUE_VALUES), text.isin(FALSE_VALUES)
    bad = ~(truth | falsity)
    if bad.any():
        row = int(values.index[np.flatnonzero(bad.to_numpy())[0]])
        raise DataError(f"{source}: {where(row)}, column {column}: {values.loc[row]!r} is not a boolean (t/f, true/false, 1/0)")
    return truth.to_numpy()


def _require(frame: pd.DataFrame, columns: list[str], source: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: missing column '{missing[0]}'")


def _read_cell_types(cfg: TablesConfig) -> tuple[pd.DataFrame, Dump]:
    dump = open_dump(cfg.cell_types, header=cfg.cell_types_header, cache_dir=cfg.cache_dir,
                     what="tables.cell_types", header_key="tables.cell_types_header")
    column = _vocabulary(cfg.cell_type_table)["column"]
    for needed in ("pt_root_id", column):
        if needed not in dump.columns:
            raise DataError(f"{dump.location}: missing column '{needed}'")
    types = {"pt_root_id": pa.int64(), column: pa.string()}
    if VALID in dump.columns:
        types[VALID] = pa.bool_()
    cells = read_dump(dump, types)
    nulls = cells["pt_root_id"].isna() | (cells[VALID].isna() if VALID in cells else False)
    if nulls.any():
        row = int(np.flatnonzero(nulls.to_numpy())[0])
        column_name = "pt_root_id" if pd.isna(cells["pt_root_id"].iloc[row]) else VALID
        raise DataError(f"{dump.location}: {dump.where(row)}, column {column_name}: empty value")
    return cells, dump


# ------------------------------------------------------------------------------------------------------ synapses


class _SynapseScan:
    """Checks, filters and labels one block of synapse rows at a time, counting every dropped row by reason."""

    def __init__(self, cfg: TablesConfig, labels: pd.Series, dump: Dump) -> None:
        self.cfg, self.dump = cfg, dump
        columns = set(dump.columns)
        for needed in (ID, PRE, POST):
            if needed not in columns:
                raise DataError(f"{dump.location}: missing column '{needed}'")
        split = [f"{cfg.position}_{axis}" for axis in "xyz"]
        if all(c in columns for c in split):
            self.positions: list[str] = split
            self.packed = False
        elif cfg.position in columns:
            self.positions, self.packed = [cfg.position], True
        else:
            raise DataError(f"{dump.location}: missing column '{cfg.position}' (or '{cfg.position}_x/_y/_z')")
        self.types: dict[str, pa.DataType | None] = {ID: pa.int64(), PRE: pa.int64(), POST: pa.int64()}
        if SIZE in columns:
            self.types[SIZE] = pa.float64()
        if VALID in columns:
            self.types[VALID] = pa.bool_()
        for c in self.positions:
            self.types[c] = None if self.packed else pa.float64()  # packed points are parsed for kept rows only
        self.required = [c for c in self.types if not (self.packed and c in self.positions)]
        self.roots = pa.array(labels.index.to_numpy(np.int64), type=pa.int64())
        self.root_labels = labels.to_numpy(np.int8)
        self.requested = np.unique(np.asarray(cfg.pre_root_ids, dtype=np.int64)) if cfg.pre_root_ids else None
        self.rows = 0
        self.drops: dict[str, int] = {}
        if VALID in columns:
            self.drops["synapse_invalid"] = 0
        if cfg.min_size > 0:
            self.drops["synapse_below_min_size"] = 0
        if cfg.drop_autapses:
            self.drops["synapse_autapse"] = 0
        if self.requested is not None:
            self.drops["synapse_pre_root_not_requested"] = 0
        self.drops["synapse_pre_root_unlabelled"] = 0

    def __call__(self, first: int, batch: pa.RecordBatch) -> pa.Table | None:
        n = batch.num_rows
        self.rows += n
        col = {name: cast_column(batch.column(name), t, self.dump, name, first) for name, t in self.types.items()}
        for name in self.required:
            i = first_null(col[name])
            if i is not None:
                raise DataError(f"{self.dump.location}: {self.dump.where(first + i)}, column {name}: empty value")
        ids = col[ID].to_numpy()
        pre, post = col[PRE].to_numpy(), col[POST].to_numpy()
        size = col[SIZE].to_numpy() if SIZE in col else np.zeros(n)
        if not np.isfinite(size).all():
            i = int(np.flatnonzero(~np.isfinite(size))[0])
            raise DataError(f"{self.dump.location}: {self.dump.where(first + i)}, column {SIZE}: {size[i]} is not a size")
        if not self.packed:
            xyz = np.column_stack([col[c].to_numpy() for c in self.positions])
            bad = ~np.isfinite(xyz).all(axis=1)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DataError(f"{self.dump.location}: {self.dump.where(first + i)}: synapse {int(ids[i])} has a "
                                f"NaN or infinite {self.cfg.position}")
        keep = np.ones(n, dtype=bool)

        def drop(reason: str, mask: np.ndarray) -> None:
            self.drops[reason] += int(np.count_nonzero(mask & keep))
            np.logical_and(keep, ~mask, out=keep)

        if VALID in col:
            drop("synapse_invalid", ~col[VALID].to_numpy(zero_copy_only=False))
        if self.cfg.min_size > 0:
            drop("synapse_below_min_size", size < self.cfg.min_size)
        if self.cfg.drop_autapses:
            drop("synapse_autapse", pre == post)
        if self.requested is not None:
            drop("synapse_pre_root_not_requested", ~np.isin(pre, self.requested))
        root_index = pc.index_in(col[PRE], value_set=self.roots)  # null where the root has no label
        drop("synapse_pre_root_unlabelled", ~np.asarray(root_index.is_valid()))
        kept = np.flatnonzero(keep)
        if kept.size == 0:
            return None
        if self.packed:
            xyz = _parse_points(col[self.positions[0]].take(pa.array(kept)).to_pylist(), self.dump,
                                self.positions[0], first + kept)
        else:
            xyz = xyz[kept]
        return pa.table({
            "synapse_id": ids[kept],
            "pre_root_id": pre[kept],
            "post_root_id": post[kept],
            "size": size[kept].astype(np.int64),
            "x": xyz[:, 0],
            "y": xyz[:, 1],
            "z": xyz[:, 2],
            "label": self.root_labels[root_index.take(pa.array(kept)).to_numpy()],
            "source_row": (first + kept).astype(np.int64),
        }, schema=SUBSET_SCHEMA)


_POINT_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf", flags=re.IGNORECASE)
_HEX = re.compile(r"^(?:[0-9A-Fa-f]{2})+$")


def _parse_points(values: list[Any], dump: Dump, column: str, rows: np.ndarray) -> np.ndarray:
    """3D points from packed values: ``[x y z]`` / ``POINTZ(x y z)`` text, PostGIS hex EWKB, or 3-lists."""
    out = np.empty((len(values), 3), dtype=np.float64)
    for k, value in enumerate(values):
        point = _point(value)
        if point is None or not np.isfinite(point).all():
            raise DataError(f"{dump.location}: {dump.where(int(rows[k]))}, column {column}: cannot read a finite 3D "
                            f"point from {str(value)[:80]!r}")
        out[k] = point
    return out


def _point(value: Any) -> list[float] | None:
    if isinstance(value, (list, tuple, np.ndarray)):
        return [float(v) for v in value] if len(value) == 3 else None
    if value is None:
        return None
    text = str(value).strip()
    if len(text) >= 42 and _HEX.match(text):  # EWKB: byte order, type (+Z/SRID flags), [srid], 3 doubles
        raw = bytes.fromhex(text)
        order = "<" if raw[0] == 1 else ">"
        kind = struct.unpack(order + "I", raw[1:5])[0]
        offset = 9 if kind & 0x20000000 else 5
        if (kind & 0xFFFF) % 1000 != 1 or len(raw) < offset + 24:
            return None
        return list(struct.unpack(order + "3d", raw[offset:offset + 24]))
    numbers = _POINT_NUMBER.findall(text)
    return [float(v) for v in numbers] if len(numbers) == 3 else None


def _labels_digest(labels: pd.Series) -> str:
    data = labels.index.to_numpy(np.int64).tobytes() + labels.to_numpy(np.int8).tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def _subset_key(cfg: TablesConfig, dump: Dump, labels: pd.Series) -> dict[str, Any]:
    return {
        "format": SUBSET_FORMAT,
        "synapses": {k: v for k, v in dump.provenance().items() if k != "local"},
        "cell_type_table": cfg.cell_type_table,
        "labels": _labels_digest(labels),
        "position": cfg.position,
        "filters": {"min_size": cfg.min_size, "drop_autapses": cfg.drop_autapses,
                    "pre_root_ids": sorted(int(r) for r in cfg.pre_root_ids)},
    }


def _stem(location: str) -> str:
    name = location.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"(\.(csv|tsv|txt|parquet|pq|feather|arrow))?(\.(gz|bz2|zst))?$", "", name) or "synapses"


def labelled_subset(cfg: TablesConfig, dump: Dump, labels: pd.Series) -> tuple[pd.DataFrame, dict[str, int], dict[str, Any]]:
    """The labelled synapse rows of ``dump`` (``FRAME_COLUMNS``), the drops, and how they were obtained.

    Usage: ``rows, drops, info = labelled_subset(cfg.tables, dump, labels)``

    Reads the cached subset when one exists for the same inputs; otherwise scans ``dump`` once, writing the subset
    to a temporary file that becomes the cache file only after every check has passed.
    """
    if cfg.subset_cache_min_mb < 0:
        raise ConfigError(f"tables.subset_cache_min_mb must be >= 0, got {cfg.subset_cache_min_mb}")
    scan = _SynapseScan(cfg, labels, dump)
    size = dump.file.identity.get("size") or 0
    if not cfg.cache_dir or size < cfg.subset_cache_min_mb * (1 << 20):
        parts = [t for t in (scan(first, b) for first, b in iter_batches(dump, scan.types)) if t is not None]
        table = pa.concat_tables(parts) if parts else SUBSET_SCHEMA.empty_table()
        _check_duplicates(table.select(["synapse_id", "source_row"]), dump)
        return _to_frame(table.select(FRAME_COLUMNS)), scan.drops, {"rows_scanned": scan.rows, "subset_cache": None}
    key = _subset_key(cfg, dump, labels)
    path = Path(cfg.cache_dir) / "subsets" / f"{_stem(dump.location)}-{digest_of(key)}.parquet"
    cached = _read_subset(path)
    if cached is not None:
        frame, meta = cached
        return frame, meta["drops"], {"rows_scanned": meta["rows_scanned"], "subset_cache": str(path),
                                      "subset_cache_hit": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with pq.ParquetWriter(tmp, SUBSET_SCHEMA) as writer:
            pending: list[pa.Table] = []
            held = 0
            for first, batch in iter_batches(dump, scan.types):
                kept = scan(first, batch)
                if kept is None:
                    continue
                pending.append(kept)
                held += kept.num_rows
                if held >= ROW_GROUP_ROWS:  # few large row groups: kept rows arrive ~1 % of a block at a time
                    writer.write_table(pa.concat_tables(pending))
                    pending, held = [], 0
            if pending:
                writer.write_table(pa.concat_tables(pending))
            del pending
            writer.add_key_value_metadata({"synhpc": json.dumps({"key": key, "drops": scan.drops,
                                                                 "rows_scanned": scan.rows})})
        _check_duplicates(pq.read_table(tmp, columns=["synapse_id", "source_row"]), dump)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return (_to_frame(pq.read_table(path, columns=FRAME_COLUMNS)), scan.drops,
            {"rows_scanned": scan.rows, "subset_cache": str(path), "subset_cache_hit": False})


def _to_frame(table: pa.Table) -> pd.DataFrame:
    # The caller passes its only reference: self_destruct frees each arrow column once converted, so the peak stays
    # near one copy of the subset, not two.
    return table.to_pandas(self_destruct=True, split_blocks=True)


def _read_subset(path: Path) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """A complete cache file's rows and metadata; None when absent or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        meta = json.loads(pq.read_metadata(path).metadata[b"synhpc"])
        if pq.read_schema(path).remove_metadata() != SUBSET_SCHEMA:
            return None
        return _to_frame(pq.read_table(path, columns=FRAME_COLUMNS)), meta
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowException):
        return None


def _check_duplicates(ids_rows: pa.Table, dump: Dump) -> None:
    """One-line error at the first repeated synapse id (``ids_rows``: synapse_id and source_row)."""
    ids = ids_rows.column("synapse_id").to_numpy()
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        row = int(ids_rows.column("source_row")[i].as_py())
        raise DataError(f"{dump.location}: {dump.where(row)}: duplicate synapse id {int(ids[i])}")


def _frame_source(location: str, frame: pd.DataFrame) -> Dump:
    """A :class:`Dump` stand-in for rows already in memory (the CAVE source), so one scan serves both."""
    return Dump(location, LocalFile(location, Path(location), {}), "memory", tuple(frame.columns), {})


def load_labelled_synapses(cfg: TablesConfig) -> tuple[pd.DataFrame, dict[str, int], dict[str, Any]]:
    """Read both tables from the configured source and attach presynaptic labels.

    Usage: ``frame, drops, provenance = load_labelled_synapses(cfg.tables)``
    """
    if cfg.source == "cave":
        from synhpc.sources.cave import fetch_tables

        syn_raw, cells_raw, provenance = fetch_tables(cfg)
        syn_source = f"cave:{cfg.synapse_table}@v{cfg.materialization_version}"
        labels, cell_drops = cell_labels(cells_raw, cfg.cell_type_table,
                                         f"cave:{cfg.cell_type_table}@v{cfg.materialization_version}")
        dump = _frame_source(syn_source, syn_raw)
        scan = _SynapseScan(cfg, labels, dump)
        table = pa.Table.from_pandas(syn_raw, preserve_index=False)
        parts = [scan(first, b) for first, b in _memory_batches(table)]
        parts = [p for p in parts if p is not None]
        table = pa.concat_tables(parts) if parts else SUBSET_SCHEMA.empty_table()
        _check_duplicates(table.select(["synapse_id", "source_row"]), dump)
        subset = _to_frame(table.select(FRAME_COLUMNS))
        syn_drops = scan.drops
    else:
        cells, cell_dump = _read_cell_types(cfg)
        labels, cell_drops = cell_labels(cells, cfg.cell_type_table, cell_dump.location, cell_dump.where)
        dump = open_dump(cfg.synapses, header=cfg.synapses_header, cache_dir=cfg.cache_dir,
                         what="tables.synapses", header_key="tables.synapses_header")
        subset, syn_drops, info = labelled_subset(cfg, dump, labels)
        syn_source = dump.location
        provenance = {
            "source": "files",
            "synapses": cfg.synapses,
            "cell_types": cfg.cell_types,
            "files": {"synapses": dump.provenance(), "cell_types": cell_dump.provenance()},
            **info,
        }
    provenance |= {"materialization_version": cfg.materialization_version, "position": cfg.position}
    # Same order as ever in drops.csv: synapse filters, then cell-type bookkeeping, then unlabelled roots.
    unlabelled = syn_drops.pop("synapse_pre_root_unlabelled")
    drops = {**syn_drops, **cell_drops, "synapse_pre_root_unlabelled": unlabelled}
    frame = subset
    if frame.empty:
        raise DataError(f"{syn_source}: no labelled synapses left after filtering (drops: {drops})")
    return frame, drops, provenance


def _memory_batches(table: pa.Table) -> Iterator[tuple[int, pa.RecordBatch]]:
    first = 0
    for batch in table.to_batches(max_chunksize=1 << 20):
        yield first, batch
        first += batch.num_rows


# ------------------------------------------------------------------------------------------------------- targets


def load_targets(cfg: TablesConfig, synapse_ids: Any = None) -> pd.DataFrame:
    """Postsynaptic target compartment per synapse from ``tables.targets``: columns ``synapse_id`` (int64) and
    ``target`` (str, one of spine, shaft, soma).

    Usage: ``targets = load_targets(cfg.tables, synapse_ids=manifest["synapse_id"])``

    Accepted tables (any layout :func:`synhpc.dumps.open_dump` reads): the synapse id in ``synapse_id``, else
    ``target_id`` (a CAVE reference annotation such as ``synapse_target_predictions_ssa``, whose ``id`` is the
    annotation's own), else ``id``; the compartment in ``target``, else ``tag`` (case and surrounding spaces
    ignored); rows with ``valid`` false are skipped. ``synapse_ids`` keeps only those synapses while streaming (use
    it for a table of the whole volume). A synapse listed twice with one compartment is kept once; with two
    different ones it is dropped. Counts are in ``frame.attrs["drops"]``.
    """
    if not cfg.targets:
        raise ConfigError("tables.targets is empty: set it to a synapse target table (csv, csv.gz, parquet or URL)")
    dump = open_dump(cfg.targets, header=cfg.targets_header, cache_dir=cfg.cache_dir, what="tables.targets",
                     header_key="tables.targets_header")
    id_column = next((c for c in ("synapse_id", "target_id", "id") if c in dump.columns), None)
    tag_column = next((c for c in ("target", "tag") if c in dump.columns), None)
    if id_column is None or tag_column is None:
        missing = "synapse_id (or target_id, id)" if id_column is None else "target (or tag)"
        raise DataError(f"{dump.location}: missing column {missing}")
    types: dict[str, pa.DataType] = {id_column: pa.int64(), tag_column: pa.string()}
    if VALID in dump.columns:
        types[VALID] = pa.bool_()
    wanted = None if synapse_ids is None else pa.array(np.unique(np.asarray(synapse_ids, dtype=np.int64)))
    allowed = pa.array(TARGETS)
    drops = {"target_invalid": 0} if VALID in types else {}
    parts = []
    for first, batch in iter_batches(dump, types):
        ids, tags = batch.column(id_column), pc.utf8_lower(pc.utf8_trim_whitespace(batch.column(tag_column)))
        for name, array in ((id_column, ids), (tag_column, tags)):
            i = first_null(array)
            if i is not None:
                raise DataError(f"{dump.location}: {dump.where(first + i)}, column {name}: empty value")
        unknown = pc.invert(pc.is_in(tags, value_set=allowed))
        if pc.any(unknown).as_py():
            i = int(np.flatnonzero(np.asarray(unknown))[0])
            raise DataError(f"{dump.location}: {dump.where(first + i)}, column {tag_column}: unknown target "
                            f"{batch.column(tag_column)[i].as_py()!r} (expected {', '.join(TARGETS)})")
        keep = pa.array(np.ones(batch.num_rows, dtype=bool))
        if VALID in types:
            valid = batch.column(VALID).fill_null(False)
            drops["target_invalid"] += int(pc.sum(pc.invert(valid)).as_py() or 0)
            keep = pc.and_(keep, valid)
        if wanted is not None:
            keep = pc.and_(keep, pc.is_in(ids, value_set=wanted))
        parts.append(pa.table({"synapse_id": ids.filter(keep), "target": tags.filter(keep)}))
    table = pa.concat_tables(parts) if parts else pa.table({"synapse_id": pa.array([], pa.int64()),
                                                            "target": pa.array([], pa.string())})
    frame = table.to_pandas()
    unique = frame.drop_duplicates()
    conflicting = unique["synapse_id"].duplicated(keep=False)
    drops["target_duplicate_rows_merged"] = len(frame) - len(unique)
    drops["target_conflicting_synapses"] = int(unique.loc[conflicting, "synapse_id"].nunique())
    frame = unique[~conflicting].reset_index(drop=True)
    frame["target"] = frame["target"].astype(object)
    frame.attrs["drops"] = drops
    frame.attrs["source"] = dump.provenance()
    return frame
