"""``synhpc submit``: the whole pipeline as SLURM jobs chained by dependencies, skipping whatever is already done.

On the login node :func:`synhpc.manifest.prepare_run` writes the manifest and ``config.yaml`` into the run folder.
Then, with submitit and ``afterok`` dependencies::

    extract array(s) (missing shards only; split below MaxArraySize) -> index -> train -> evaluate -> gather

Each submission is appended to ``<run>/jobs.csv`` (:data:`slurm.status.JOBS_COLUMNS`). Skipped: complete shards;
extraction and index when all shards and ``cubes/index.json`` exist; training when its progress record says every
planned step ran (whatever the world size) and ``best.pt`` exists; evaluation when ``summary.csv`` is newer than
``best.pt``. Resume = submit again: training restarts from its newest checkpoint.

Usage::

    jobs = submit_pipeline(load_config("configs/microns.yaml"), load_profile("hyak", ["account=mylab"]))
"""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path
from typing import Any

import pandas as pd

from slurm.launch import stage_executor
from slurm.plan import array_chunks
from slurm.profile import Profile, check_submittable, job_folder
from slurm.queue import ACTIVE_STATES, JobId, afterok, cancel, max_array_size, queued
from slurm.status import JOBS_COLUMNS, evaluation_current, read_jobs, training_state
from synhpc.atomic import write_csv
from synhpc.config import Config, load_config
from synhpc.cubes import missing_shards
from synhpc.errors import ConfigError, SynhpcError
from synhpc.manifest import prepare_run
from synhpc.rundir import STAGES, RunDir, gathered_summary
from synhpc.shards import build_index


class SubmitError(SynhpcError):
    """The pipeline cannot be submitted (SLURM refused, or jobs of an earlier submission are still active)."""


# ------------------------------------------------------------------------------------------------ SLURM queries


def cluster_max_array_size() -> int:
    """The cluster's MaxArraySize (array indices must stay below it); submitting without it would be a guess."""
    value = max_array_size()
    if value is None:
        raise SubmitError("could not read MaxArraySize from `scontrol show config`; is SLURM reachable from here?")
    return value


def _clear_previous(run: RunDir) -> None:
    """Refuse to submit over jobs that may still run; cancel those that never can (a failed dependency)."""
    previous = read_jobs(run)
    if previous.empty:
        return
    active = [job for job in queued(list(previous["job_id"])) if job.state in ACTIVE_STATES]
    stuck = [job for job in active if job.state == "PENDING" and "DependencyNeverSatisfied" in job.reason]
    if len(stuck) < len(active):
        ids = ", ".join(sorted({job.job_id for job in active if job not in stuck}))
        raise SubmitError(f"{run.path}: jobs of an earlier submission are still active ({ids}); wait for them or scancel them, then submit again")
    cancel([job.array_or_job for job in stuck])


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
    run = RunDir(cfg.run_dir)
    _clear_previous(run)
    sizes, digest = prepare_run(cfg)  # manifest and the resolved config.yaml every job reads
    run.cubes.mkdir(parents=True, exist_ok=True)
    missing = missing_shards(run, sizes, digest)

    previous = read_jobs(run)
    submission = int(previous["submission"].astype(int).max()) + 1 if len(previous) else 1
    rows: list[dict[str, Any]] = []

    def record(stage: str, job_id: str, dependency: str, array_range: str = "", items: str = "") -> None:
        rows.append({
            "submission": submission, "stage": stage, "job_id": job_id, "array_range": array_range, "items": items,
            "submitted_at": dt.datetime.now().isoformat(timespec="seconds"), "dependency": dependency,
        })  # fmt: skip

    def submit_one(stage: str, fn: Any, dependency: str) -> str:
        executor = stage_executor(profile, stage, job_folder(profile, run.path, stage), dependency)
        try:
            job = executor.submit(fn, str(run.path))
        except Exception as exc:  # submitit wraps sbatch's stderr in several exception types
            raise SubmitError(f"sbatch refused the {stage} job: {str(exc).strip().splitlines()[-1]}") from None
        record(stage, job.job_id, dependency)
        return job.job_id

    from jobs.evaluate import evaluate_job
    from jobs.extract import extract_job
    from jobs.gather import gather_job
    from jobs.index import index_job
    from jobs.train import TrainJob

    try:
        upstream: list[str] = []
        if missing and "extract" in wanted:
            # Indices run 0..MaxArraySize-1, so one array holds at most MaxArraySize tasks; submitit does not split.
            folder = job_folder(profile, run.path, "extract")
            for ids in array_chunks(len(missing), cluster_max_array_size()):
                part = missing[ids.start : ids.stop]
                executor = stage_executor(profile, "extract", folder)
                try:
                    jobs = executor.map_array(extract_job, [str(run.path)] * len(part), [[s] for s in part])
                except Exception as exc:
                    raise SubmitError(f"sbatch refused the extraction array: {str(exc).strip().splitlines()[-1]}") from None
                array_id = JobId.parse(jobs[0].job_id).base
                record("extract", array_id, "", f"0-{len(part) - 1}", " ".join(map(str, part)))
                upstream.append(array_id)
        if "index" in wanted:
            if missing:
                upstream = [submit_one("index", index_job, afterok(upstream))] if upstream else []
            elif not run.index.is_file():
                build_index(run, sizes, digest)  # every shard is complete: a few file reads, not worth a job
        if missing and "index" not in wanted:
            return _write(run, previous, rows)

        train_needed = "train" in wanted and (bool(missing) or not training_state(run).done)
        if train_needed:
            upstream = [submit_one("train", TrainJob(), afterok(upstream))]
        if "evaluate" in wanted and (train_needed or bool(missing) or not evaluation_current(run)):
            upstream = [submit_one("evaluate", evaluate_job, afterok(upstream))]
        root_summary = gathered_summary(cfg.run.root)
        gathered = root_summary.is_file() and run.summary.is_file() and root_summary.stat().st_mtime >= run.summary.stat().st_mtime
        if "gather" in wanted and (upstream or not gathered):
            submit_one("gather", gather_job, afterok(upstream))
    except BaseException:
        # Keep what was submitted on record even if a later stage failed, so `status` and the next submit see it.
        _write(run, previous, rows)
        raise
    return _write(run, previous, rows)


def submit_prediction(cfg: Config, profile: Profile) -> pd.DataFrame:
    """Submit a prediction run: an array of the parts not yet scored (split below MaxArraySize), then the per-root
    table after all of them; finished parts and an up-to-date roots.csv are skipped.

    Usage: ``submit_prediction(cfg, load_profile("hyak", ["account=mylab"]))`` with ``cfg.predict.model`` set.
    """
    from jobs.predict import predict_job, roots_job
    from synhpc.predict import missing_parts, plan_prediction
    from synhpc.rundir import read_json

    check_submittable(profile)
    cfg = cluster_config(cfg, profile)
    run = RunDir(cfg.run_dir)
    _clear_previous(run)
    plan = plan_prediction(cfg)  # on the login node: the selection, the plan and config.yaml every task reads
    missing = missing_parts(run, plan, read_json(run.predict_provenance, "prediction record")["digest"])
    previous = read_jobs(run)
    submission = int(previous["submission"].astype(int).max()) + 1 if len(previous) else 1
    rows: list[dict[str, Any]] = []

    def record(stage: str, job_id: str, dependency: str, array_range: str = "", items: str = "") -> None:
        rows.append({
            "submission": submission, "stage": stage, "job_id": job_id, "array_range": array_range, "items": items,
            "submitted_at": dt.datetime.now().isoformat(timespec="seconds"), "dependency": dependency,
        })  # fmt: skip

    try:
        upstream: list[str] = []
        folder = job_folder(profile, run.path, "predict")
        for ids in array_chunks(len(missing), cluster_max_array_size()) if missing else []:
            part = missing[ids.start : ids.stop]
            try:
                jobs = stage_executor(profile, "predict", folder).map_array(predict_job, [str(run.path)] * len(part), [[p] for p in part])
            except Exception as exc:
                raise SubmitError(f"sbatch refused the prediction array: {str(exc).strip().splitlines()[-1]}") from None
            array_id = JobId.parse(jobs[0].job_id).base
            record("predict", array_id, "", f"0-{len(part) - 1}", " ".join(map(str, part)))
            upstream.append(array_id)
        stale = not run.roots.is_file() or any(run.part(p).stat().st_mtime > run.roots.stat().st_mtime for p in set(plan["part"]) if run.part(p).is_file())
        if upstream or stale:
            executor = stage_executor(profile, "roots", job_folder(profile, run.path, "roots"), afterok(upstream))
            try:
                job = executor.submit(roots_job, str(run.path))
            except Exception as exc:
                raise SubmitError(f"sbatch refused the roots job: {str(exc).strip().splitlines()[-1]}") from None
            record("roots", job.job_id, afterok(upstream))
    except BaseException:
        _write(run, previous, rows)
        raise
    return _write(run, previous, rows)


def _write(run: RunDir, previous: pd.DataFrame, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Append this submission to jobs.csv (atomically) and return its rows."""
    new = pd.DataFrame(rows, columns=JOBS_COLUMNS)
    if rows:
        table = pd.concat([previous.astype(str), new.astype(str)], ignore_index=True) if len(previous) else new
        write_csv(table, run.jobs_csv)
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


def submit_command(config: str | None, profile: str, overrides: list[str] | tuple[str, ...], until: str = "gather", predict: str | None = None) -> str:
    """What ``synhpc submit -c CONFIG --profile NAME [--predict MODEL] [overrides]`` does and prints.

    Usage: ``print(submit_command("configs/microns.yaml", "hyak", ["profile.account=mylab"]))``
    """
    from slurm.profile import load_profile

    config_overrides, profile_overrides = split_overrides(overrides)
    cfg = load_config(config, config_overrides)
    prof = load_profile(profile, profile_overrides)
    if predict is not None:
        cfg.predict.model = predict
        jobs = submit_prediction(cfg, prof)
    elif cfg.split.folds:
        from synhpc.folds import fold_configs

        # k-fold cross-validation: every fold is its own run and pipeline; each ends in a gather of run.root.
        jobs = pd.concat([submit_pipeline(fold, prof, until=until).assign(run=fold.run.name) for fold in fold_configs(cfg)], ignore_index=True)
    else:
        jobs = submit_pipeline(cfg, prof, until=until)
    run_dir = cluster_config(cfg, prof).run_dir
    if jobs.empty:
        return f"submit: nothing to do, every stage of {run_dir} is done\nstatus: synhpc status {run_dir}"
    lines = [f"submit: {run_dir} (profile {prof.name})"]
    for _, row in jobs.iterrows():
        unit = "parts" if row["stage"] == "predict" else "shards"
        what = f" array {row['array_range']} ({unit} {_short(row['items'])})" if row["array_range"] else ""
        dep = f" after {row['dependency']}" if row["dependency"] else ""
        where = f"{row['run']}: " if "run" in row else ""
        lines.append(f"  {where}{row['stage']:<9} job {row['job_id']}{what}{dep}")
    lines.append(f"status: synhpc status {run_dir}")
    return "\n".join(lines)


def _short(items: str, keep: int = 8) -> str:
    parts = str(items).split()
    return " ".join(parts) if len(parts) <= keep else " ".join(parts[:keep]) + f" ... ({len(parts)} in all)"
