"""Executors: where a batch job runs (this process, local subprocesses, or SLURM with a profile's resources), decided
in one place, and ``synhpc extract``'s launch-and-wait loop on top of them.

Usage::

    executor = stage_executor(load_profile("hyak"), "train", folder, dependency="afterok:123")
    executor = extraction_executor(cfg, folder)          # cfg.execution.executor: debug | local | slurm
    summary = run_extraction(cfg)                        # {"cubes": n, "seconds": s, "shards": k, "submitted": m}
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import submitit

from slurm.profile import Profile, executor_options, load_profile, stage_parameters
from synhpc.config import Config, ExecutionConfig
from synhpc.errors import DataError
from synhpc.rundir import RunDir

# Local subprocesses are ours to stop (Ctrl-C); a generous limit only guards against a hung task.
LOCAL_TIMEOUT_MIN = 24 * 60


def stage_executor(profile: Profile, stage: str, folder: Path, dependency: str = "") -> submitit.AutoExecutor:
    """A SLURM executor for ``stage`` with the profile's resources, requeue, signal, setup and interpreter.

    Usage: ``stage_executor(profile, "train", RunDir(run).job_folder("train"), dependency="afterok:123")``
    """
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(folder, cluster="slurm", **executor_options(profile, stage))
    executor.update_parameters(**stage_parameters(profile, stage, dependency=dependency))
    return executor


def extraction_executor(cfg: Config, folder: Path, stage: str = "extract") -> submitit.Executor:
    """Where ``synhpc extract`` (and ``synhpc predict``) run their array tasks: this process (debug), local
    subprocesses, or a SLURM array with the resources of profile ``execution.profile``'s ``stage``."""
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.execution.executor == "debug":
        return submitit.DebugExecutor(folder)
    if cfg.execution.executor == "local":
        executor = submitit.LocalExecutor(folder)
        executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
        return executor
    return stage_executor(load_profile(cfg.execution.profile), stage, folder)


def task_groups(items: list[int], execution: ExecutionConfig) -> list[list[int]]:
    """Split work items into tasks: one per item on SLURM (the array throttles), ``execution.workers`` groups
    locally (local executors start every task at once)."""
    if execution.executor == "slurm":
        return [[item] for item in items]
    n = max(1, min(execution.workers, len(items)))
    return [items[i::n] for i in range(n) if items[i::n]]


def run_tasks(cfg: Config, stage: str, fn: Callable[[str, list[int]], int], run_path: Path, items: list[int], sizes: dict[int, int],
              output: Callable[[int], Path], *, unit: str, progress: bool) -> None:
    """Run ``fn(run_path, group)`` for groups of ``items`` through the configured executor and wait; the bar counts
    the ``unit``s of items whose ``output`` file is in place (outputs are renamed into place whole). A failed task is
    one line: its own cause first, then its job id and log."""
    from tqdm import tqdm

    executor = extraction_executor(cfg, RunDir(run_path).job_folder(stage), stage=stage)
    groups = task_groups(items, cfg.execution)
    jobs = executor.map_array(fn, [str(Path(run_path).resolve())] * len(groups), groups)
    pending = set(items)
    with tqdm(total=sum(sizes.values()), unit=unit, desc=stage, disable=not progress) as bar:
        while True:
            finished = all(job.done() for job in jobs)
            done = {item for item in pending if output(item).is_file()}
            bar.update(sum(sizes[item] for item in done))
            pending -= done
            if finished:
                break
            time.sleep(0.5)
    for job in jobs:
        try:
            job.result()
        except Exception as exc:  # submitit wraps the task's exception with its traceback
            raise DataError(f"{task_failure(exc)} ({stage} task {job.job_id}; log: {job.paths.stderr})") from None


def cut_missing_shards(cfg: Config, run: RunDir, sizes: dict[int, int], digest: str, *, progress: bool) -> list[int]:
    """Cut the shards of a prepared ``run`` that are not complete through the configured executor, and wait;
    returns the shards it cut (complete ones are skipped, so a rerun resumes)."""
    from jobs.extract import extract_job
    from synhpc.cubes import missing_shards

    missing = missing_shards(run, sizes, digest)
    run.cubes.mkdir(parents=True, exist_ok=True)
    if missing:
        run_tasks(cfg, "extract", extract_job, run.path, missing, {s: sizes[s] for s in missing}, run.shard, unit="cube", progress=progress)
    return missing


def run_extraction(cfg: Config, *, progress: bool = True) -> dict[str, float]:
    """Prepare the run, extract every missing shard through the configured executor, wait, and build the index."""
    from synhpc.manifest import prepare_run
    from synhpc.shards import build_index

    start = time.perf_counter()
    run = RunDir(cfg.run_dir)
    sizes, digest = prepare_run(cfg)
    missing = cut_missing_shards(cfg, run, sizes, digest, progress=progress)
    index = build_index(run, sizes, digest)
    seconds = time.perf_counter() - start
    return {"cubes": sum(sizes.values()), "shards": len(sizes), "submitted": len(missing), "seconds": seconds,
            "missing_chunks": index["missing_chunks"], "edge_cubes": index["edge_cubes"]}


def run_prediction(cfg: Config, *, progress: bool = True) -> dict[str, float]:
    """Plan the prediction run, score every missing part through the configured executor (one task per part on
    SLURM), wait, and write the per-root table."""
    from jobs.predict import predict_job
    from synhpc.predict import aggregate_roots, missing_parts, part_sizes, plan_prediction
    from synhpc.rundir import read_json

    start = time.perf_counter()
    run = RunDir(cfg.run_dir)
    plan = plan_prediction(cfg)
    digest = read_json(run.predict_provenance, "prediction record")["digest"]
    sizes = part_sizes(plan)
    missing = missing_parts(run, plan, digest)
    if missing:
        run_tasks(cfg, "predict", predict_job, run.path, missing, {p: sizes[p] for p in missing}, run.part, unit="synapse", progress=progress)
    roots = aggregate_roots(run)
    return {"synapses": int(len(plan)), "parts": len(sizes), "submitted": len(missing), "roots": len(roots), "seconds": time.perf_counter() - start}


def task_failure(exc: BaseException) -> str:
    """The one-line cause of a failed task: the task's own error message when it raised a synhpc error, else the
    last line of what submitit reports (the exception line of the task's traceback)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    for line in reversed(lines):
        for marker in ("DataError: ", "ConfigError: ", "SynhpcError: "):
            if marker in line:
                return line.split(marker, 1)[1]
    return lines[-1] if lines else exc.__class__.__name__
