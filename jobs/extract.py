"""Extraction job: tables -> manifest -> one array task per group of shards -> verified shard index.

Runs: :func:`synhpc.cubes.extract_shard` for each shard of a task. Needs: the run folder's ``config.yaml``,
``synapses.csv`` and ``provenance.json`` (written here before submission) and read access to the imagery.
Resumes: shards are written atomically and complete shards are skipped, so rerunning submits only missing shards.

Usage::

    summary = run_extraction(cfg)   # {"cubes": n, "seconds": s, "shards": k, "submitted": m}
"""

from __future__ import annotations

import time

from tqdm import tqdm

from jobs.launch import make_executor, task_groups
from synhpc.config import RUN_CONFIG, Config, load_run_config, save_config
from synhpc.cubes import CUBES_DIR, extract_shard, shard_done, shard_sizes
from synhpc.errors import DataError
from synhpc.manifest import plan_manifest, read_manifest, read_provenance, write_manifest
from synhpc.shards import build_index



def run_task(run_dir: str, shards: list[int]) -> int:
    """One array task: extract ``shards`` of the run in ``run_dir``; returns the number of cubes written."""
    cfg = load_run_config(run_dir)
    manifest = read_manifest(cfg.run_dir)
    provenance = read_provenance(cfg.run_dir)
    done = 0
    for shard in shards:
        extract_shard(cfg, manifest, shard, provenance)
        done += int((manifest["shard"] == shard).sum())
    return done


def prepare(cfg: Config) -> tuple[dict[int, int], str]:
    """Write config and manifest (unless an identical one exists); return shard sizes and the extraction digest."""
    run_dir = cfg.run_dir
    manifest, drops, provenance, _ = plan_manifest(cfg)
    try:
        same = read_provenance(run_dir).get("extraction_digest") == provenance["extraction_digest"]
    except (OSError, ValueError):
        same = False
    if not same:
        write_manifest(run_dir, manifest, drops, provenance)
    save_config(cfg, run_dir / RUN_CONFIG)
    return shard_sizes(manifest), provenance["extraction_digest"]


def missing_shards(cfg: Config, sizes: dict[int, int], digest: str) -> list[int]:
    """Shards not yet on disk complete with this extraction's digest, in order."""
    return [s for s in sorted(sizes) if not shard_done(cfg, s, sizes[s], digest)]


def run_extraction(cfg: Config, *, progress: bool = True) -> dict[str, float]:
    """Extract every missing shard through the configured executor, wait, and build the index."""
    start = time.perf_counter()
    sizes, digest = prepare(cfg)
    missing = missing_shards(cfg, sizes, digest)
    cubes_dir = cfg.run_dir / CUBES_DIR
    cubes_dir.mkdir(parents=True, exist_ok=True)
    if missing:
        executor = make_executor(cfg.execution, cfg.run_dir / "jobs" / "extract", "extract")
        groups = task_groups(missing, cfg.execution)
        jobs = executor.map_array(run_task, [str(cfg.run_dir.resolve())] * len(groups), groups)
        _wait(jobs, cfg, sizes, digest, missing, progress)
    build_index(cubes_dir, sizes)
    seconds = time.perf_counter() - start
    return {"cubes": sum(sizes.values()), "shards": len(sizes), "submitted": len(missing), "seconds": seconds}


def _wait(jobs: list, cfg: Config, sizes: dict[int, int], digest: str, missing: list[int], progress: bool) -> None:
    """Poll until every task ends; the bar counts cubes in completed shards on disk."""
    total = sum(sizes[s] for s in missing)
    pending = set(missing)
    with tqdm(total=total, unit="cube", desc="extract", disable=not progress) as bar:
        while True:
            finished = all(job.done() for job in jobs)
            for s in [s for s in pending if shard_done(cfg, s, sizes[s], digest)]:
                pending.discard(s)
                bar.update(sizes[s])
            if finished:
                break
            time.sleep(0.5)
    for job in jobs:
        try:
            job.result()
        except Exception as exc:
            raise DataError(f"extraction task {job.job_id} failed ({_last_line(exc)}); log: {job.paths.stderr}") from None


def _last_line(exc: Exception) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else exc.__class__.__name__
