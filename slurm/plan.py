"""What an extraction will do before it does it: counts, shards, SLURM arrays, storage and time.

Usage::

    plan = make_plan(cfg)                  # reads the tables and the volume's info file; cuts no cube
    print(format_plan(plan))
    for ids in array_chunks(plan["tasks"], plan["max_array_size"]): ...

The storage and time figures come from constants measured by :func:`synhpc.bench.bench_extract` on a 2-core
Debian 12 VM against local ``file://`` volumes (see ``COMPRESSION_RATIO`` and ``CUBES_PER_S_PER_CORE``); remote
imagery (S3/GCS) is usually network bound and slower, so pass a measured ``rate_cubes_per_s`` for those.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slurm.launch import task_groups
from slurm.queue import max_array_size as cluster_max_array_size
from synhpc.config import Config
from synhpc.manifest import plan_manifest, split_targets
from synhpc.splits import SPLIT_NAMES, split_report

# SLURM's MaxArraySize default: array indices 0..1000.
SLURM_DEFAULT_MAX_ARRAY_SIZE = 1001

# Compressed / raw size of a cube shard (``synhpc bench extract``: 256 cubes of 16x48x48 EM-like uint8 from the
# bench volume, 2026-11 on a 2-core VM). Real EM is noisier than the synthetic texture; treat these as optimistic.
COMPRESSION_RATIO: dict[str, float] = {"none": 1.0, "lzf": 1.0, "gzip": 0.86, "zstd": 0.86}

# Cubes per second one extraction process reaches per core with the current CubeReader on local raw chunks
# (``synhpc bench extract``: 16x48x48 cubes, 64x64x16 chunks, dense layout ~1,800 cubes/s in one 2-core process;
# the sparse layout reaches only ~200 cubes/s, so sparse selections take up to ~4x longer).
CUBES_PER_S_PER_CORE = 800.0

# Every cube is one HDF5 chunk with a Fletcher-32 checksum appended.
CHUNK_CHECKSUM_BYTES = 4

# Held-out splits with fewer neurons than this per class give very noisy estimates (the notebooks had 3).
FEW_NEURONS = 10


def array_chunks(n_tasks: int, max_array_size: int) -> list[range]:
    """Split task ids ``0..n_tasks-1`` into consecutive ranges of at most ``max_array_size`` ids.

    SLURM rejects an array index >= MaxArraySize, and submitit numbers every array from 0, so each range becomes
    one ``sbatch --array=0-(len-1)`` submission.

    Usage: ``[len(r) for r in array_chunks(2500, 1001)] == [1001, 1001, 498]``
    """
    if max_array_size < 1:
        raise ValueError(f"max_array_size must be >= 1, got {max_array_size}")
    if n_tasks < 0:
        raise ValueError(f"n_tasks must be >= 0, got {n_tasks}")
    return [range(start, min(start + max_array_size, n_tasks)) for start in range(0, n_tasks, max_array_size)]


def _parallelism(cfg: Config) -> tuple[int, int]:
    """(tasks at once, cores per task): the profile's extract stage on SLURM, ``execution.workers`` locally."""
    if cfg.execution.executor == "slurm":
        from slurm.profile import load_profile

        res = load_profile(cfg.execution.profile).extract
        return res.array_parallelism, res.cpus_per_task
    return cfg.execution.workers, 1


def _n_tasks(cfg: Config, n_shards: int) -> int:
    return len(task_groups(list(range(n_shards)), cfg.execution))


def _counts(manifest) -> dict[str, dict[str, int]]:
    """Synapses and presynaptic neurons per split and class."""
    out: dict[str, dict[str, int]] = {}
    split = manifest["split"].to_numpy()
    label = manifest["label"].to_numpy()
    roots = manifest["pre_root_id"].to_numpy()
    for s, name in enumerate(SPLIT_NAMES):
        row: dict[str, int] = {}
        for value, cls in ((1, "excitatory"), (0, "inhibitory")):
            mask = (split == s) & (label == value)
            row[cls] = int(mask.sum())
            row[f"{cls}_neurons"] = int(len(np.unique(roots[mask])))
        row["total"] = row["excitatory"] + row["inhibitory"]
        out[name] = row
    return out


def make_plan(cfg: Config, *, max_array_size: int | None = None, rate_cubes_per_s: float | None = None) -> dict[str, Any]:
    """Everything ``synhpc extract`` would do for ``cfg``, computed from the manifest alone.

    ``max_array_size``: this argument, else the cluster's ``MaxArraySize``, else SLURM's default 1001.
    ``rate_cubes_per_s``: total extraction rate; default ``CUBES_PER_S_PER_CORE`` times the cores the executor uses
    at once (parallel tasks x cores per task, from the cluster profile on SLURM).

    Usage: ``print(format_plan(make_plan(cfg)))``
    """
    manifest, drops, provenance, volume = plan_manifest(cfg)
    n = int(len(manifest))
    n_shards = int(manifest["shard"].nunique()) if n else 0
    n_tasks = _n_tasks(cfg, n_shards)
    source = "argument"
    if max_array_size is None:
        max_array_size = cluster_max_array_size()
        source = "scontrol"
        if max_array_size is None:
            max_array_size, source = SLURM_DEFAULT_MAX_ARRAY_SIZE, "slurm default"
    arrays = array_chunks(n_tasks, max_array_size) if cfg.execution.executor == "slurm" else []

    z, y, x = cfg.cubes.shape_zyx
    cube_bytes = z * y * x  # uint8
    raw = n * cube_bytes
    ratio = COMPRESSION_RATIO[cfg.cubes.compression]

    parallel, cpus = _parallelism(cfg)
    cores = min(parallel, max(1, n_tasks)) * cpus
    rate_source = "argument"
    if rate_cubes_per_s is None:
        rate_cubes_per_s = CUBES_PER_S_PER_CORE * cores
        rate_source = f"{CUBES_PER_S_PER_CORE:g} cubes/s/core x {cores} core(s), measured on local file:// chunks"
    if rate_cubes_per_s <= 0:
        raise ValueError(f"rate_cubes_per_s must be positive, got {rate_cubes_per_s}")

    counts = _counts(manifest)
    shares = split_report(manifest, manifest["split"].to_numpy(), split_targets(cfg)) if n else None
    warnings = []
    for name in SPLIT_NAMES[1:]:
        for cls in ("excitatory", "inhibitory"):
            k = counts[name][f"{cls}_neurons"]
            if k < FEW_NEURONS:
                warnings.append(f"{name} has only {k} {cls} neuron(s): per-neuron estimates will be noisy")
    return {
        "synapses": n,
        "neurons": int(manifest["pre_root_id"].nunique()),
        "counts": counts,
        "drops": {k: int(v) for k, v in drops.items()},
        "cube_shape_zyx": [int(v) for v in cfg.cubes.shape_zyx],
        "shard_size": int(cfg.cubes.shard_size),
        "shards": n_shards,
        "executor": cfg.execution.executor,
        "tasks": n_tasks,
        "max_array_size": int(max_array_size),
        "max_array_size_source": source,
        "arrays": [[r.start, r.stop] for r in arrays],
        "array_specs": [f"0-{len(r) - 1}%{parallel}" for r in arrays],
        "compression": cfg.cubes.compression,
        "compression_ratio": ratio,
        "raw_bytes": int(raw),
        "storage_bytes": int(round(raw * ratio)) + CHUNK_CHECKSUM_BYTES * n,
        "rate_cubes_per_s": float(rate_cubes_per_s),
        "rate_source": rate_source,
        "seconds": n / rate_cubes_per_s,
        "volume": volume,
        "materialization_version": provenance.get("materialization_version"),
        "extraction_digest": provenance.get("extraction_digest"),
        "split_shares": [] if shares is None else shares.to_dict(orient="records"),
        "warnings": warnings,
    }


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(plan: dict[str, Any]) -> str:
    """A short human-readable report of :func:`make_plan`'s result.

    Usage: ``print(format_plan(make_plan(cfg)))``
    """
    lines = [f"synapses: {plan['synapses']:,} from {plan['neurons']:,} presynaptic neurons"]
    lines.append(f"  {'split':<6} {'excit.':>10} {'(neurons)':>10} {'inhib.':>10} {'(neurons)':>10} {'total':>10}")
    for name, row in plan["counts"].items():
        lines.append(
            f"  {name:<6} {row['excitatory']:>10,} {row['excitatory_neurons']:>10,} {row['inhibitory']:>10,} "
            f"{row['inhibitory_neurons']:>10,} {row['total']:>10,}"
        )
    if plan.get("split_shares"):
        lines.append(f"  achieved shares (target): {'class':<10} {'split':<5} {'neurons':>8} {'synapses':>9}")
        for row in plan["split_shares"]:
            lines.append(
                f"  {'':<25} {row['class']:<10} {row['split']:<5} {row['neuron_share']:>8.3f} {row['synapse_share']:>9.3f}  ({row['target']:.3f})"
            )
    dropped = {k: v for k, v in plan["drops"].items() if v}
    if dropped:
        lines.append("dropped: " + ", ".join(f"{k} {v:,}" for k, v in dropped.items()))
    z, y, x = plan["cube_shape_zyx"]
    lines.append(f"cubes: {z}x{y}x{x} (z, y, x) uint8; {plan['shards']:,} shard(s) of <= {plan['shard_size']}")
    lines.append(f"tasks: {plan['tasks']:,} on executor '{plan['executor']}'")
    if plan["executor"] == "slurm":
        lines.append(
            f"arrays: {len(plan['arrays'])} sbatch --array submission(s) (MaxArraySize {plan['max_array_size']}, "
            f"{plan['max_array_size_source']}): " + ", ".join(plan["array_specs"][:5]) + (" ..." if len(plan["arrays"]) > 5 else "")
        )
    note = "" if plan["compression"] == "none" else f" (raw {_size(plan['raw_bytes'])} x {plan['compression_ratio']:.2f} {plan['compression']})"
    lines.append(f"storage: {_size(plan['storage_bytes'])}{note}")
    lines.append(f"time: ~{_duration(plan['seconds'])} at {plan['rate_cubes_per_s']:,.0f} cubes/s ({plan['rate_source']})")
    lines.extend(f"warning: {w}" for w in plan["warnings"])
    return "\n".join(lines)





# Parquet bytes per predicted synapse (CAVE columns + logit, probability, prediction; snappy), measured on a
# 4,096-row part of MICrONS-like values. Random 64-bit ids barely compress, so this hardly depends on the data.
PARQUET_BYTES_PER_SYNAPSE = 60.0

# Synapses per second one prediction task scores on a 2-core CPU, small3d 16x48x48 with 8 TTA views: 12-18 measured
# on a loaded machine (`synhpc bench predict -c configs/demo.yaml`; the model, not the imagery, sets the pace). On a
# GPU pass the rate `synhpc bench predict` measures there as --rate.
PREDICT_CUBES_PER_S = 15.0


def make_prediction_plan(cfg: Config, *, synapses: int | None = None, rate_cubes_per_s: float | None = None,
                         max_array_size: int | None = None) -> dict[str, Any]:
    """What ``synhpc predict`` would do for ``cfg``: synapses, parts, SLURM arrays, storage and compute.

    ``synapses``: plan for that many synapses without reading the tables (what-if, e.g. the whole minnie65 table).
    ``rate_cubes_per_s``: synapses one task scores per second (``synhpc bench predict``); the task's resources come
    from the profile's ``predict`` stage on SLURM.
    """
    source = "argument"
    drops: dict[str, int] = {}
    if synapses is None:
        from synhpc.manifest import volume_info
        from synhpc.predict import place_synapses
        from synhpc.selection import select_synapses

        frame, drops, _ = select_synapses(cfg.tables, cfg.predict)
        synapses = len(place_synapses(cfg, frame, volume_info(cfg), drops))
        source = "selection"
    n = int(synapses)
    parts = -(-n // cfg.predict.part_size)
    limit = max_array_size or cluster_max_array_size() or SLURM_DEFAULT_MAX_ARRAY_SIZE
    rate = float(rate_cubes_per_s or PREDICT_CUBES_PER_S)
    if rate <= 0:
        raise ValueError(f"rate_cubes_per_s must be positive, got {rate}")
    slurm = cfg.execution.executor == "slurm"
    if slurm:
        from slurm.profile import load_profile

        res = load_profile(cfg.execution.profile).predict
        parallel, gpus = res.array_parallelism, res.gpus_per_node
    else:
        parallel, gpus = cfg.execution.workers, 0
    task_hours = n / rate / 3600.0
    z, y, x = cfg.cubes.shape_zyx
    cube_bytes = n * z * y * x * COMPRESSION_RATIO[cfg.cubes.compression] if cfg.predict.keep_cubes else 0.0
    return {
        "synapses": n,
        "synapses_source": source,
        "drops": drops,
        "part_size": cfg.predict.part_size,
        "parts": parts,
        "arrays": [[r.start, r.stop] for r in array_chunks(parts, limit)] if slurm else [],
        "max_array_size": limit,
        "rate_cubes_per_s": rate,
        "rate_source": "argument" if rate_cubes_per_s else f"{PREDICT_CUBES_PER_S:g} synapses/s per task (2-core CPU, 8 TTA views)",
        "task_hours": task_hours,
        "gpu_hours": task_hours * gpus,
        "parallel_tasks": parallel,
        "wall_hours": task_hours / max(1, min(parallel, parts)),
        "parquet_bytes": n * PARQUET_BYTES_PER_SYNAPSE,
        "cube_bytes": cube_bytes,
        "executor": cfg.execution.executor,
    }


def format_prediction_plan(plan: dict[str, Any]) -> str:
    """A short human-readable report of :func:`make_prediction_plan`'s result."""
    lines = [f"synapses: {plan['synapses']:,} ({plan['synapses_source']})"]
    dropped = {k: v for k, v in plan["drops"].items() if v}
    if dropped:
        lines.append("dropped: " + ", ".join(f"{k} {v:,}" for k, v in dropped.items()))
    lines.append(f"parts: {plan['parts']:,} of <= {plan['part_size']:,} synapses (one task and one parquet file each)")
    if plan["executor"] == "slurm":
        lines.append(f"arrays: {len(plan['arrays'])} sbatch --array submission(s) of <= {plan['max_array_size']} tasks")
    lines.append(f"storage: predictions {_size(plan['parquet_bytes'])}" + (f", kept cubes {_size(plan['cube_bytes'])}" if plan["cube_bytes"] else " (cubes not kept)"))
    lines.append(
        f"compute: {plan['task_hours']:,.1f} task-hours at {plan['rate_cubes_per_s']:,.0f} synapses/s per task ({plan['rate_source']})"
        + (f", {plan['gpu_hours']:,.1f} GPU-hours" if plan["gpu_hours"] else "")
    )
    lines.append(f"wall time: ~{_duration(plan['wall_hours'] * 3600)} with {min(plan['parallel_tasks'], max(1, plan['parts']))} tasks at once")
    return "\n".join(lines)
