"""``synhpc submit``: the whole pipeline as SLURM jobs chained by dependencies, skipping whatever is already done.

On the login node: :func:`jobs.extract.prepare` writes the manifest and ``config.yaml`` into the run folder. Then, with
submitit and ``afterok`` dependencies::

    extract array(s) (missing shards only; split below MaxArraySize) -> index -> train -> evaluate -> gather

Each submission is appended to ``<run>/jobs.csv`` (submission, stage, job_id, array_range, items, submitted_at,
dependency). Skipped: complete shards; extraction and index when all shards and ``cubes/index.json`` exist; training
when the newest checkpoint's step equals the planned total (or ``best.pt`` + ``train_log.csv`` reach it); evaluation
when ``summary.csv`` is newer than ``best.pt``. Resume = submit again: training restarts from its newest checkpoint.

Usage::

    jobs = submit_pipeline(load_config("configs/microns.yaml"), load_profile("hyak", ["account=mylab"]))
"""

from __future__ import annotations

import copy
import datetime as dt
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import submitit

from jobs.extract import missing_shards, prepare, run_task
from jobs.plan import array_chunks, cluster_max_array_size
from jobs.profiles import STAGES, Profile, check_submittable, executor_options, job_folder, stage_parameters
from jobs.status import JOBS_CSV, evaluation_current, read_jobs, training_progress
from jobs.train import TrainJob
from synhpc.config import Config, load_config, load_run_config
from synhpc.cubes import CUBES_DIR
from synhpc.errors import ConfigError, SynhpcError
from synhpc.gather import SUMMARY
from synhpc.shards import INDEX_NAME, build_index

COLUMNS = ["submission", "stage", "job_id", "array_range", "items", "submitted_at", "dependency"]
# States in which a job from an earlier submission may still write into the run folder.
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT"}


class SubmitError(SynhpcError):
    """The pipeline cannot be submitted (SLURM refused, or jobs of an earlier submission are still active)."""


# ------------------------------------------------------------------------------------------------ small jobs


def index_task(run_dir: str) -> int:
    """Index job: verify every shard of the manifest and write ``cubes/index.json``; returns the cube count."""
    from synhpc.cubes import shard_sizes
    from synhpc.manifest import read_manifest

    cfg = load_run_config(run_dir)
    index = build_index(cfg.run_dir / CUBES_DIR, shard_sizes(read_manifest(cfg.run_dir)))
    return int(index["n"])


# ------------------------------------------------------------------------------------------------ SLURM queries


def max_array_size() -> int:
    """The cluster's MaxArraySize (array indices must stay below it); submitting without it would be a guess."""
    value = cluster_max_array_size()
    if value is None:
        raise SubmitError("could not read MaxArraySize from `scontrol show config`; is SLURM reachable from here?")
    return value


def _queue(job_ids: list[str]) -> list[tuple[str, str, str, str]]:
    """(array/base job id, job id, state, reason) of the given jobs that squeue still lists."""
    bases = {str(j).split("_")[0] for j in job_ids if str(j)}
    if not bases:
        return []
    proc = subprocess.run(["squeue", "-h", "-o", "%F|%i|%T|%r"], capture_output=True, text=True, timeout=30, check=False)
    rows = []
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 4 and parts[0] in bases:
            rows.append((parts[0], parts[1], parts[2], parts[3]))
    return rows


def _clear_previous(run_dir: Path) -> None:
    """Refuse to submit over jobs that may still run; cancel those that never can (a failed dependency)."""
    previous = read_jobs(run_dir)
    if previous.empty:
        return
    active = [row for row in _queue(list(previous["job_id"])) if row[2] in ACTIVE]
    stuck = [row for row in active if row[2] == "PENDING" and "DependencyNeverSatisfied" in row[3]]
    if len(stuck) < len(active):
        ids = ", ".join(sorted({row[1] for row in active if row not in stuck}))
        raise SubmitError(f"{run_dir}: jobs of an earlier submission are still active ({ids}); wait for them or scancel them, then submit again")
    if stuck:
        subprocess.run(["scancel", *sorted({row[0] for row in stuck})], capture_output=True, timeout=30, check=False)


# ------------------------------------------------------------------------------------------------ submission


def cluster_config(cfg: Config, profile: Profile) -> Config:
    """The config the jobs will read: run.root absolute (from the profile when it sets one), executor slurm.

    Jobs start in the submission's working directory, but an absolute run folder keeps every path unambiguous.
    """
    cfg = copy.deepcopy(cfg)
    if profile.paths.run_root:
        cfg.run.root = profile.paths.run_root
    cfg.run.root = str(Path(cfg.run.root).resolve())
    cfg.execution.executor = "slurm"
    return cfg


def make_stage_executor(profile: Profile, stage: str, folder: Path, dependency: str = "") -> submitit.AutoExecutor:
    """A SLURM executor for ``stage`` with the profile's resources, requeue, signal, setup and interpreter.

    Usage: ``make_stage_executor(profile, "train", run_dir / "jobs" / "train", dependency="afterok:123")``
    """
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(folder, cluster="slurm", **executor_options(profile, stage))
    executor.update_parameters(**stage_parameters(profile, stage, dependency=dependency))
    return executor


def _afterok(job_ids: list[str]) -> str:
    # An array's base id covers all of its tasks.
    bases = sorted({j.split("_")[0] for j in job_ids}, key=int)
    return "afterok:" + ":".join(bases) if bases else ""


def submit_pipeline(cfg: Config, profile: Profile, *, until: str = "gather") -> pd.DataFrame:
    """Submit every stage that is not done, up to and including ``until``; return (and append to jobs.csv) the jobs.

    Usage: ``submit_pipeline(cfg, load_profile("local"))`` -> DataFrame with one row per submitted job
    (an extraction array is one row; ``items`` lists its shards).
    """
    if until not in STAGES:
        raise ConfigError(f"until must be one of {', '.join(STAGES)}; got '{until}'")
    check_submittable(profile)
    wanted = STAGES[: STAGES.index(until) + 1]
    cfg = cluster_config(cfg, profile)
    run_dir = cfg.run_dir
    _clear_previous(run_dir)
    sizes, digest = prepare(cfg)  # manifest and the resolved config.yaml every job reads
    run = str(run_dir)
    cubes_dir = run_dir / CUBES_DIR
    cubes_dir.mkdir(parents=True, exist_ok=True)
    missing = missing_shards(cfg, sizes, digest)

    previous = read_jobs(run_dir)
    submission = int(previous["submission"].astype(int).max()) + 1 if len(previous) else 1
    rows: list[dict[str, Any]] = []

    def record(stage: str, job_id: str, dependency: str, array_range: str = "", items: str = "") -> None:
        rows.append({
            "submission": submission, "stage": stage, "job_id": job_id, "array_range": array_range, "items": items,
            "submitted_at": dt.datetime.now().isoformat(timespec="seconds"), "dependency": dependency,
        })

    def submit_one(stage: str, fn: Any, dependency: str) -> str:
        executor = make_stage_executor(profile, stage, job_folder(profile, run_dir, stage), dependency)
        try:
            job = executor.submit(fn, run)
        except Exception as exc:  # submitit wraps sbatch's stderr in several exception types
            raise SubmitError(f"sbatch refused the {stage} job: {str(exc).strip().splitlines()[-1]}") from None
        record(stage, job.job_id, dependency)
        return job.job_id

    try:
        upstream: list[str] = []
        if missing and "extract" in wanted:
            # Indices run 0..MaxArraySize-1, so one array holds at most MaxArraySize tasks; submitit does not split.
            folder = job_folder(profile, run_dir, "extract")
            for ids in array_chunks(len(missing), max_array_size()):
                part = missing[ids.start : ids.stop]
                executor = make_stage_executor(profile, "extract", folder)
                try:
                    jobs = executor.map_array(run_task, [run] * len(part), [[s] for s in part])
                except Exception as exc:
                    raise SubmitError(f"sbatch refused the extraction array: {str(exc).strip().splitlines()[-1]}") from None
                array_id = jobs[0].job_id.split("_")[0]
                record("extract", array_id, "", f"0-{len(part) - 1}", " ".join(map(str, part)))
                upstream.append(array_id)
        if "index" in wanted:
            if missing:
                upstream = [submit_one("index", index_task, _afterok(upstream))] if upstream else []
            elif not (cubes_dir / INDEX_NAME).is_file():
                build_index(cubes_dir, sizes)  # every shard is complete: a few file opens, not worth a job
        if missing and "index" not in wanted:
            return _write(run_dir, previous, rows)

        train_needed = "train" in wanted and (bool(missing) or not training_progress(run_dir).done)
        if train_needed:
            upstream = [submit_one("train", TrainJob(), _afterok(upstream))]
        if "evaluate" in wanted and (train_needed or bool(missing) or not evaluation_current(run_dir)):
            upstream = [submit_one("evaluate", _evaluate_job(), _afterok(upstream))]
        root_summary = Path(cfg.run.root) / SUMMARY
        run_summary = run_dir / "summary.csv"
        gathered = root_summary.is_file() and run_summary.is_file() and root_summary.stat().st_mtime >= run_summary.stat().st_mtime
        if "gather" in wanted and (upstream or not gathered):
            submit_one("gather", _gather_job(), _afterok(upstream))
    except BaseException:
        # Keep what was submitted on record even if a later stage failed, so `status` and the next submit see it.
        _write(run_dir, previous, rows)
        raise
    return _write(run_dir, previous, rows)


def _evaluate_job() -> Any:
    from jobs.evaluate import evaluate_job

    return evaluate_job


def _gather_job() -> Any:
    from jobs.evaluate import gather_job

    return gather_job


def _write(run_dir: Path, previous: pd.DataFrame, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Append this submission to jobs.csv (atomically) and return its rows."""
    new = pd.DataFrame(rows, columns=COLUMNS)
    if rows:
        table = pd.concat([previous.astype(str), new.astype(str)], ignore_index=True) if len(previous) else new
        tmp = run_dir / f".{JOBS_CSV}.tmp"
        table.to_csv(tmp, index=False)
        tmp.replace(run_dir / JOBS_CSV)
    return new


# ------------------------------------------------------------------------------------------------ command line

PROFILE_PREFIX = "profile."


def split_overrides(overrides: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Config overrides and ``profile.``-prefixed profile overrides (prefix removed): the two share key names
    (``train.epochs`` is the recipe, ``profile.train.gpus_per_node`` the job's resources).

    Usage: ``split_overrides(["train.epochs=3", "profile.account=mylab"])`` -> ``(["train.epochs=3"], ["account=mylab"])``
    """
    config, profile = [], []
    for text in overrides:
        if text.startswith(PROFILE_PREFIX):
            profile.append(text[len(PROFILE_PREFIX) :])
        else:
            config.append(text)
    return config, profile


def submit_command(config: str | None, profile: str, overrides: list[str] | tuple[str, ...], until: str = "gather") -> str:
    """What ``synhpc submit -c CONFIG --profile NAME [overrides]`` does and prints.

    Usage: ``print(submit_command("configs/microns.yaml", "hyak", ["profile.account=mylab"]))``
    """
    from jobs.profiles import load_profile

    config_overrides, profile_overrides = split_overrides(overrides)
    cfg = load_config(config, config_overrides)
    prof = load_profile(profile, profile_overrides)
    jobs = submit_pipeline(cfg, prof, until=until)
    run_dir = cluster_config(cfg, prof).run_dir
    if jobs.empty:
        return f"submit: nothing to do, every stage of {run_dir} is done\nstatus: synhpc status {run_dir}"
    lines = [f"submit: {run_dir} (profile {prof.name})"]
    for _, row in jobs.iterrows():
        what = f" array {row['array_range']} (shards {_short(row['items'])})" if row["array_range"] else ""
        dep = f" after {row['dependency']}" if row["dependency"] else ""
        lines.append(f"  {row['stage']:<9} job {row['job_id']}{what}{dep}")
    lines.append(f"status: synhpc status {run_dir}")
    return "\n".join(lines)


def _short(items: str, keep: int = 8) -> str:
    parts = str(items).split()
    return " ".join(parts) if len(parts) <= keep else " ".join(parts[:keep]) + f" ... ({len(parts)} in all)"
