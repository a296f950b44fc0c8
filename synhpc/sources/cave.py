"""Synapse and cell-type tables from a CAVE materialization engine, pinned to one materialization version.

Usage::

    syn, cells, info = fetch_tables(cfg.tables)            # token from CAVE_TOKEN or caveclient's secrets
    syn, cells, info = fetch_tables(cfg.tables, token=tok, page_size=200)

Synapses are fetched in pages of presynaptic root ids (``filter_in_dict``) so that no request asks the server for
the whole 337 M-row table; positions come back split (``<name>_x/_y/_z``) in the table's own voxel units, which
are checked against ``tables.position_resolution_nm``. Every failure is a one-line :class:`DataError` or
:class:`ConfigError`; the token never appears in messages, logs or the returned provenance.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from synhpc.config import TablesConfig
from synhpc.errors import ConfigError, DataError, SynhpcError

# Public minnie65 versions (2026-06), shown when the server cannot be asked which versions it has.
MICRONS_PUBLIC_VERSIONS = [117, 343, 661, 795, 943, 1078, 1181, 1300, 1412, 1507, 1621, 1718, 1822]

POSITIONS = ["pre_pt_position", "ctr_pt_position", "post_pt_position"]
SYNAPSE_COLUMNS = ["id", "valid", "pre_pt_root_id", "post_pt_root_id", "size"] + [
    f"{p}_{a}" for p in POSITIONS for a in "xyz"
]
SUPERVOXEL_COLUMNS = ["pre_pt_supervoxel_id", "post_pt_supervoxel_id"]
# Asked of the server by schema name (positions unsplit): the CAVE synapse schema always has all of these, and
# selecting them skips bookkeeping columns (created, deleted, superceded_id) on a table this large.
SYNAPSE_SELECT = ["id", "valid", "pre_pt_supervoxel_id", "pre_pt_root_id", "post_pt_supervoxel_id",
                  "post_pt_root_id", "size", *POSITIONS]


def fetch_tables(
    cfg: TablesConfig, *, token: str | None = None, page_size: int = 500, max_rows: int = 200_000
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Synapse rows and cell-type rows from CAVE at the pinned materialization version, plus provenance.

    Usage: ``syn, cells, info = fetch_tables(cfg.tables)``

    ``page_size`` presynaptic roots go into one synapse query. ``max_rows`` is the row limit asked of every query
    (keep it at or below the server's own limit, 200k on MICrONS): a page that reaches it is split in two and asked
    again, so a silently truncated answer is never taken for a complete one.
    """
    if not cfg.datastack:
        raise ConfigError("tables.datastack is required for the cave source (e.g. minnie65_public)")
    if page_size < 1 or max_rows < 1:
        raise ConfigError(f"cave source: page_size ({page_size}) and max_rows ({max_rows}) must be positive")
    token = token or os.environ.get("CAVE_TOKEN") or None  # None lets caveclient read its own secrets file
    where = cfg.server_address or "caveclient's default server"
    version = int(cfg.materialization_version)

    if not version:
        try:
            with _cave_errors(where, cfg.datastack, token):
                available = _available_versions(_connect(cfg, token))
        except SynhpcError:
            available = MICRONS_PUBLIC_VERSIONS  # an unreachable server should not hide the config mistake
        raise ConfigError(
            "tables.materialization_version is required for the cave source "
            f"(public versions: {', '.join(map(str, available))})"
        )

    with _cave_errors(where, cfg.datastack, token):
        client = _connect(cfg, token)
        mat = client.materialize
        available = _available_versions(client)
        if version not in available:
            raise DataError(
                f"tables.materialization_version {version} is not available for {cfg.datastack} on {where} "
                f"(available: {', '.join(map(str, available))})"
            )
        tables = set(mat.get_tables(version=version))
        for key, name in (("synapse_table", cfg.synapse_table), ("cell_type_table", cfg.cell_type_table)):
            if name not in tables:
                raise DataError(f"tables.{key} '{name}' is not in {cfg.datastack} version {version}")
        syn_res = _resolution(mat, cfg.synapse_table, version)
        cell_res = _resolution(mat, cfg.cell_type_table, version)
        expected = [float(v) for v in cfg.position_resolution_nm]
        if syn_res != expected:
            raise DataError(
                f"{cfg.synapse_table} v{version}: positions are in {_fmt(syn_res)} nm voxels but "
                f"tables.position_resolution_nm is {_fmt(expected)}"
            )

        cells = mat.query_table(
            cfg.cell_type_table, split_positions=True, materialization_version=version, limit=max_rows,
            metadata=False, desired_resolution=None,
        )
        if len(cells) >= max_rows:
            raise DataError(f"{cfg.cell_type_table} v{version}: {len(cells)} rows reached the query limit {max_rows}; "
                            "raise max_rows (the answer may be truncated)")
        roots = _pre_roots(cfg, cells)
        pages: list[pd.DataFrame] = []
        for start in range(0, len(roots), page_size):
            pages.extend(_synapse_pages(mat, cfg, version, roots[start:start + page_size], max_rows))

    syn = _finish_synapses(pages, cfg)
    info = {
        "source": "cave",
        "datastack": cfg.datastack,
        "server_address": cfg.server_address or str(getattr(client, "server_address", "")),
        "materialization_version": version,
        "synapse_table": cfg.synapse_table,
        "cell_type_table": cfg.cell_type_table,
        "voxel_resolution_nm": syn_res,
        "cell_type_voxel_resolution_nm": cell_res,
        "pre_roots": len(roots),
        "page_size": page_size,
        "n_pages": len(pages),
        "rows_per_page": [len(p) for p in pages],
        "rows": {"synapses": len(syn), "cell_types": len(cells)},
        "filters": {"valid": True, "min_size": cfg.min_size, "drop_autapses": cfg.drop_autapses,
                    "pre_root_ids": "config" if cfg.pre_root_ids else "cell_type_table"},
    }
    return syn, cells.reset_index(drop=True), info


def _connect(cfg: TablesConfig, token: str | None) -> Any:
    # Imported here: caveclient is heavy and only this source needs it.
    from caveclient import CAVEclient

    # No desired_resolution: caveclient would rescale positions silently, and we want the table's own units.
    return CAVEclient(cfg.datastack, server_address=cfg.server_address or None, auth_token=token,
                      write_server_cache=False)


def _available_versions(client: Any) -> list[int]:
    return sorted(int(v) for v in client.materialize.get_versions())


def _resolution(mat: Any, table: str, version: int) -> list[float | None]:
    res = mat.get_table_metadata(table, version=version, log_warning=False)["voxel_resolution"]
    return [None if v is None else float(v) for v in res]


def _fmt(res: list[float | None]) -> str:
    return "x".join("?" if v is None else f"{v:g}" for v in res)


def _pre_roots(cfg: TablesConfig, cells: pd.DataFrame) -> list[int]:
    """Presynaptic roots to ask for: the configured ones, else every labelled root (others cannot be used)."""
    if cfg.pre_root_ids:
        return sorted({int(r) for r in cfg.pre_root_ids})
    if "pt_root_id" not in cells.columns:
        raise DataError(f"{cfg.cell_type_table}: no pt_root_id column (has {', '.join(map(str, cells.columns))})")
    roots = pd.to_numeric(cells["pt_root_id"], errors="coerce").dropna().astype(np.int64)
    return sorted(int(r) for r in roots.unique() if r != 0)  # root 0 is "no segment", not a cell


def _synapse_pages(mat: Any, cfg: TablesConfig, version: int, roots: list[int], max_rows: int) -> list[pd.DataFrame]:
    """One query for ``roots``; halves the root list while an answer reaches the row limit."""
    page = mat.query_table(
        cfg.synapse_table,
        filter_in_dict={"pre_pt_root_id": roots},
        filter_equal_dict={"valid": True},
        filter_greater_equal_dict={"size": int(cfg.min_size)} if cfg.min_size > 0 else None,
        select_columns=SYNAPSE_SELECT,
        split_positions=True,
        materialization_version=version,
        limit=max_rows,
        metadata=False,
        desired_resolution=None,
    )
    if len(page) < max_rows:
        return [page]
    if len(roots) == 1:
        raise DataError(f"{cfg.synapse_table} v{version}: presynaptic root {roots[0]} has at least {max_rows} "
                        "synapses, the query limit; raise max_rows")
    half = len(roots) // 2
    return (_synapse_pages(mat, cfg, version, roots[:half], max_rows)
            + _synapse_pages(mat, cfg, version, roots[half:], max_rows))


def _finish_synapses(pages: list[pd.DataFrame], cfg: TablesConfig) -> pd.DataFrame:
    """Concatenate pages, re-apply the filters client-side (cheap, and a server that ignored one cannot leak
    rows), drop autapses, dedupe by id and order by id."""
    pages = [p for p in pages if len(p)] or [pd.DataFrame(columns=SYNAPSE_COLUMNS)]
    syn = pd.concat(pages, ignore_index=True)
    missing = [c for c in SYNAPSE_COLUMNS if c not in syn.columns]
    if missing:
        raise DataError(f"{cfg.synapse_table}: the server's answer lacks column(s) {', '.join(missing)}")
    syn = syn[SYNAPSE_COLUMNS + [c for c in SUPERVOXEL_COLUMNS if c in syn.columns]]
    keep = syn["valid"].astype(bool)
    if cfg.min_size > 0:
        keep &= syn["size"] >= cfg.min_size
    if cfg.drop_autapses:
        keep &= syn["pre_pt_root_id"] != syn["post_pt_root_id"]
    syn = syn[keep].drop_duplicates("id").sort_values("id", kind="stable")
    return syn.reset_index(drop=True)


@contextmanager
def _cave_errors(where: str, datastack: str, token: str | None) -> Iterator[None]:
    """Turn requests/caveclient failures into one-line DataErrors that never carry the token."""
    import requests
    from caveclient.base import AuthException, ServerIncompatibilityError

    def fail(message: str) -> DataError:
        if token:
            message = message.replace(token, "***")
        return DataError(message.splitlines()[0] if message else "CAVE request failed")

    try:
        yield
    except SynhpcError:
        raise
    except requests.HTTPError as exc:
        response = exc.response
        status = getattr(response, "status_code", "?")
        method = getattr(getattr(response, "request", None), "method", "") or ""
        path = urlparse(getattr(response, "url", "") or "").path
        if status in (401, 403):
            raise fail(f"CAVE server {where} rejected the credentials (HTTP {status}) for {datastack}: "
                       "check CAVE_TOKEN or caveclient's token file") from None
        if status == 404 and "/datastack/full/" in path:
            raise fail(f"datastack '{datastack}' not found on CAVE server {where}") from None
        raise fail(f"CAVE server {where}: HTTP {status} for {method} {path}") from None
    except AuthException:
        raise fail(f"CAVE server {where} redirected to a login page for {datastack}: no valid token "
                   "(set CAVE_TOKEN or caveclient's token file)") from None
    except ServerIncompatibilityError as exc:
        raise fail(f"CAVE server {where} is too old for caveclient: {exc}".replace("\n", " ")) from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise fail(f"CAVE server {where} is unreachable ({type(exc).__name__})") from None
    except (ValueError, KeyError, TypeError) as exc:
        # caveclient raises these for malformed answers (e.g. a server that is not CAVE at all).
        raise fail(f"CAVE server {where}: unexpected answer ({type(exc).__name__}: {exc})") from None
