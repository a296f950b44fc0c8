"""Table benchmark: how fast, and in how much memory, the labelled synapse subset comes out of a dump in the real
public layout, at growing sizes, extrapolated to the 337,312,429-row minnie65 synapse dump.

Usage::

    frame = bench_tables(cfg, cfg.run_dir / "bench")      # also bench_tables.csv and bench_tables.json there
    frame = bench_tables(cfg, out, sizes=(1_000_000,))    # a quick look

For each size a synapse dump is generated once (cached under ``<run.root>/bench/dumps/``, reused by reruns) in
the layout of ``synapses_pni_2_v1_filtered_view.csv.gz``: headerless gzip CSV, the public 15 columns in their
order, a ``_header.csv`` sidecar, realistic digit counts (18-digit root ids, 17-digit supervoxel ids), ~67 bytes
per row compressed (the real dump: ~60). Presynaptic roots are drawn from ``n_roots`` roots; ``n_labelled`` of
them (the cell-type table's neurons, in a headerless ``_merged`` table) own ``labelled_share`` of the rows, a
heavy-tailed few owning most, as proofread axons do (2,182 cells, ~2.1 M of 337 M synapses: 0.6 %).

Every measurement runs in a fresh child process, so its peak RSS (``ru_maxrss``) is that scan's alone:
``synhpc`` is the real :func:`synhpc.tables.load_labelled_synapses` (cell types, streamed scan with drop counts,
subset parquet written and read back) with an empty cache; ``duckdb`` (only when duckdb is installed) is DuckDB's
best case for the same selection, ``COPY (SELECT ... WHERE pre_pt_root_id IN (SELECT ...)) TO parquet`` without
the drop counts; ``imports`` is the child's footprint before reading anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synhpc.atomic import write_csv, write_text
from synhpc.config import Config

FULL_DUMP_ROWS = 337_312_429
GOAL_SECONDS = 20 * 60  # the full dump's labelled subset ...
GOAL_RSS_MB = 8 * 1024  # ... in this much memory, on 4 cores
SYNAPSE_COLUMNS = ["id", *(f"{p}_pt_position_{a}" for p in ("pre", "ctr", "post") for a in "xyz"), "size",
                   "pre_pt_supervoxel_id", "pre_pt_root_id", "post_pt_supervoxel_id", "post_pt_root_id"]
ROOT_BASE = 864691135000000000
SUPERVOXEL_BASE = 88000000000000000
CHUNK_ROWS = 1_000_000


def _generation(n_rows: int, n_labelled: int, n_roots: int, labelled_share: float, seed: int) -> dict[str, Any]:
    return {"rows": n_rows, "n_labelled": n_labelled, "n_roots": n_roots, "labelled_share": labelled_share,
            "seed": seed, "layout": "headerless csv.gz + _header.csv, gzip level 1, 1 M-row members", "version": 1}


def generate_dumps(dumps_dir: Path, n_rows: int, *, n_labelled: int = 2000, n_roots: int = 1_000_000,
                   labelled_share: float = 0.01, seed: int = 0) -> tuple[Path, Path]:
    """A synapse dump of ``n_rows`` rows and its cell-type table, in the real layout; generated once per parameters.

    Usage: ``synapses, cells = generate_dumps(Path("logs/bench/dumps"), 1_000_000)``
    """
    from synhpc.dumps import write_dump

    dumps_dir = Path(dumps_dir)
    dumps_dir.mkdir(parents=True, exist_ok=True)
    params = _generation(n_rows, n_labelled, n_roots, labelled_share, seed)
    syn = dumps_dir / f"synapses_{n_rows}_filtered_view.csv.gz"
    cells = dumps_dir / f"celltypes_{n_rows}_merged.csv.gz"
    stamp = dumps_dir / f"synapses_{n_rows}.json"
    if syn.is_file() and cells.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == params:
        return syn, cells
    rng = np.random.default_rng(seed)
    roots = ROOT_BASE + rng.choice(10**12, n_roots + n_labelled, replace=False)
    labelled, others = roots[:n_labelled], roots[n_labelled:]
    # Heavy tail: a root's share of the labelled rows falls off as 1/rank.
    weights = 1.0 / np.arange(1, n_labelled + 1)
    weights /= weights.sum()

    def chunks():
        for start in range(0, n_rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, n_rows - start)
            yield _synapse_chunk(rng, start, n, labelled, others, weights, labelled_share)

    write_dump(chunks(), syn, compresslevel=1)
    is_exc = rng.random(n_labelled) < 0.8
    n_non = n_labelled // 4
    cell_roots = np.concatenate([labelled, others[:n_non]])
    n_cells = len(cell_roots)
    system = np.concatenate([np.where(is_exc, "excitatory_neuron", "inhibitory_neuron"), np.full(n_non, "nonneuron")])
    cell_type = np.concatenate([np.where(is_exc, "23P", "BC"), np.full(n_non, "astrocyte")])
    table = pd.DataFrame({
        "id": np.arange(n_cells, dtype=np.int64) + 100_000,
        "target_id": np.arange(n_cells, dtype=np.int64) + 200_000,
        "classification_system": system,
        "cell_type": cell_type,
        "volume": rng.uniform(100, 900, n_cells),
        "pt_supervoxel_id": SUPERVOXEL_BASE + rng.integers(0, 10**16, n_cells),
        "pt_root_id": cell_roots,
        "pt_position_x": rng.integers(100_000, 350_000, n_cells),
        "pt_position_y": rng.integers(70_000, 300_000, n_cells),
        "pt_position_z": rng.integers(14_838, 27_868, n_cells),
    })
    write_dump(table, cells)
    write_text(stamp, json.dumps(params))
    return syn, cells


def _synapse_chunk(rng: np.random.Generator, start: int, n: int, labelled: np.ndarray, others: np.ndarray,
                   weights: np.ndarray, labelled_share: float) -> Any:
    import pyarrow as pa

    is_labelled = rng.random(n) < labelled_share
    pre = others[rng.integers(0, len(others), n)]
    pre[is_labelled] = labelled[rng.choice(len(labelled), int(is_labelled.sum()), p=weights)]
    ctr = np.column_stack([rng.integers(100_000, 350_000, n), rng.integers(70_000, 300_000, n),
                           rng.integers(14_838, 27_868, n)])
    columns: dict[str, np.ndarray] = {"id": 100_000_000 + start + np.arange(n, dtype=np.int64)}
    for name, shift in (("pre", -1), ("ctr", 0), ("post", 1)):
        jitter = rng.integers(0, 20, (n, 3)) * shift
        for axis, values in zip("xyz", (ctr + jitter * [1, 1, 0]).T):
            columns[f"{name}_pt_position_{axis}"] = values
    columns["size"] = np.exp(rng.normal(6.0, 1.2, n)).astype(np.int64) + 1
    columns["pre_pt_supervoxel_id"] = SUPERVOXEL_BASE + rng.integers(0, 10**16, n)
    columns["pre_pt_root_id"] = pre
    columns["post_pt_supervoxel_id"] = SUPERVOXEL_BASE + rng.integers(0, 10**16, n)
    columns["post_pt_root_id"] = others[rng.integers(0, len(others), n)]
    return pa.table({c: columns[c] for c in SYNAPSE_COLUMNS})


def _run_child(task: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "synhpc.bench_tables", json.dumps(task)], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"bench tables child ({task['engine']}) failed: {tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_tables(cfg: Config, out_dir: Path, *, sizes: Sequence[int] = (1_000_000, 10_000_000, 30_000_000),
                 engines: Sequence[str] = ("synhpc", "duckdb"), dumps_dir: Path | None = None,
                 repeats: int = 1) -> pd.DataFrame:
    """Rows/s and peak RSS of the labelled-subset scan per dump size (and engine); writes csv + json.

    Usage: ``print(bench_tables(cfg, cfg.run_dir / "bench").to_string())``

    With ``repeats`` > 1 each measurement runs that many times, engines interleaved, and a row keeps the fastest
    time and the largest peak RSS (on a shared machine the slow runs measure the neighbours).
    """
    import pyarrow as pa

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dumps_dir = Path(dumps_dir) if dumps_dir is not None else Path(cfg.run.root) / "bench" / "dumps"
    engines = [e for e in engines if e != "duckdb" or _has_duckdb()]
    baseline = _run_child({"engine": "imports"})
    rows: list[dict[str, Any]] = []
    generated: dict[int, float] = {}
    for n_rows in sizes:
        start = time.perf_counter()
        syn, cells = generate_dumps(dumps_dir, n_rows)
        generated[n_rows] = round(time.perf_counter() - start, 1)
        results: dict[str, list[dict[str, Any]]] = {engine: [] for engine in engines}
        loads: dict[str, list[float]] = {engine: [] for engine in engines}
        for _ in range(max(1, repeats)):
            for engine in engines:
                with tempfile.TemporaryDirectory(dir=out_dir, prefix=".bench-tables-") as scratch:
                    results[engine].append(_run_child({"engine": engine, "synapses": str(syn), "cells": str(cells),
                                                       "scratch": scratch}))
                loads[engine].append(os.getloadavg()[0])
        for engine in engines:
            result = min(results[engine], key=lambda r: r["seconds"])
            result["maxrss_mb"] = max(r["maxrss_mb"] for r in results[engine])
            rate = n_rows / result["seconds"]
            rows.append({
                "engine": engine,
                "rows": n_rows,
                "labelled_rows": result["kept"],
                "dump_mb": round(syn.stat().st_size / 2**20, 1),
                "seconds": round(result["seconds"], 2),
                "rows_per_s": round(rate),
                "mb_per_s": round(syn.stat().st_size / 2**20 / result["seconds"], 1),
                "peak_rss_mb": round(result["maxrss_mb"], 1),
                # What the caller gets back grows with the labelled rows; the scan itself should not.
                "subset_mb": round(result.get("subset_mb", float("nan")), 1),
                "imports_rss_mb": round(baseline["maxrss_mb"], 1),
                "threads": result["threads"],
                "loadavg_1m": round(float(np.mean(loads[engine])), 1),  # other work on the machine slows every row
                "repeats": len(results[engine]),
                "drop_counts": engine == "synhpc",
                "full_dump_minutes": round(FULL_DUMP_ROWS / rate / 60, 1),
            })
    frame = pd.DataFrame(rows)
    write_csv(frame, out_dir / "bench_tables.csv")
    ours = frame[frame["engine"] == "synhpc"] if len(frame) else frame
    largest = ours.sort_values("rows").iloc[-1] if len(ours) else None
    summary = None
    if largest is not None:
        summary = {
            "full_dump_rows": FULL_DUMP_ROWS,
            "extrapolated_minutes": float(largest["full_dump_minutes"]),
            "from_rows": int(largest["rows"]),
            "threads": int(largest["threads"]),
            "peak_rss_mb": float(ours["peak_rss_mb"].max()),
            "goal": {"minutes": GOAL_SECONDS / 60, "rss_mb": GOAL_RSS_MB, "cores": 4},
            "meets_goal": bool(largest["full_dump_minutes"] * 60 <= GOAL_SECONDS
                               and ours["peak_rss_mb"].max() <= GOAL_RSS_MB),
        }
    info = {
        "machine": _machine(),
        "pyarrow": pa.__version__,
        "pyarrow_cpu_count": pa.cpu_count(),
        "duckdb": _duckdb_version(),
        "generation": {str(n): _generation(n, 2000, 1_000_000, 0.01, 0) | {"seconds_this_run": generated[n]}
                       for n in sizes},
        "summary": summary,
        "rows": json.loads(frame.to_json(orient="records")),
    }
    write_text(out_dir / "bench_tables.json", json.dumps(info, indent=1))
    return frame


def _machine() -> dict[str, Any]:
    import platform

    return {"cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def _has_duckdb() -> bool:
    return _duckdb_version() is not None


def _duckdb_version() -> str | None:
    try:
        import duckdb
    except ImportError:
        return None
    return str(duckdb.__version__)


# -------------------------------------------------------------------------------------------- child processes


def _child(task: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    import resource

    import pyarrow as pa

    from synhpc.config import TablesConfig
    from synhpc.tables import load_labelled_synapses

    result: dict[str, Any] = {"threads": pa.cpu_count(), "kept": 0, "seconds": 0.0}
    start = time.perf_counter()
    if task["engine"] == "synhpc":
        cfg = TablesConfig(synapses=task["synapses"], cell_types=task["cells"], cache_dir=task["scratch"],
                           subset_cache_min_mb=0.0)
        frame, _, provenance = load_labelled_synapses(cfg)
        if provenance["subset_cache_hit"]:
            raise RuntimeError("bench tables: the scratch cache was not empty")
        result["kept"] = len(frame)
        result["subset_mb"] = float(frame.memory_usage(index=True).sum()) / 2**20
    elif task["engine"] == "duckdb":
        result |= _duckdb_scan(task)
    result["seconds"] = time.perf_counter() - start
    result["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return result


def _duckdb_scan(task: dict[str, Any]) -> dict[str, Any]:
    import duckdb
    import pyarrow as pa

    from synhpc.dumps import open_dump, read_dump, read_sidecar
    from synhpc.tables import cell_labels

    dump = open_dump(task["cells"])
    labels, _ = cell_labels(read_dump(dump), "aibs_metamodel_celltypes_v661", task["cells"])
    names = [n for n, _ in read_sidecar(open_dump(task["synapses"]).sidecar)]
    threads = os.cpu_count() or 1
    con = duckdb.connect(config={"threads": threads})
    con.register("labels", pa.table({"root": labels.index.to_numpy(np.int64), "label": labels.to_numpy(np.int8)}))
    columns = "{" + ", ".join(f"'{n}': 'BIGINT'" for n in names) + "}"
    out = Path(task["scratch"]) / "subset.parquet"
    con.execute(
        f"COPY (SELECT s.id AS synapse_id, s.pre_pt_root_id AS pre_root_id, s.post_pt_root_id AS post_root_id, "
        f"s.size, s.ctr_pt_position_x AS x, s.ctr_pt_position_y AS y, s.ctr_pt_position_z AS z, l.label "
        f"FROM read_csv('{task['synapses']}', header = false, auto_detect = false, delim = ',', "
        f"columns = {columns}) s JOIN labels l ON s.pre_pt_root_id = l.root "
        f"WHERE s.pre_pt_root_id <> s.post_pt_root_id) TO '{out}' (FORMAT parquet)"
    )
    kept = con.execute(f"SELECT count(*) FROM '{out}'").fetchone()[0]
    return {"kept": int(kept), "threads": threads}


def _imports_only() -> dict[str, Any]:
    import resource

    import pyarrow as pa

    import synhpc.tables  # noqa: F401

    return {"threads": pa.cpu_count(), "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


if __name__ == "__main__":  # the child side of _run_child
    task = json.loads(sys.argv[1])
    print(json.dumps(_child(task) if task["engine"] != "imports" else _imports_only()))
