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
from slurm.status import JOBS_COLUMNS, read_jobs, training_state
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


class Submission:
    """One submission's jobs: each sbatch made through it is recorded, and on leaving the ``with`` block (even when a
    later sbatch failed) appended to ``<record>/jobs.csv``, so `status` and the next submit see what was sent.

    Job folders are ``job_folder(profile, owner, name)``: named after the run that owns the jobs, so two runs' jobs
    never share one.

    Usage::

        with Submission(profile, record=run, owner=run.path) as sub:
            ids = sub.array("extract", extract_job, str(run.path), shards, what="the extraction array")
            sub.job("index", index_job, str(run.path), dependency=afterok(ids))
        jobs = sub.frame
    """

    def __init__(self, profile: Profile, *, record: RunDir, owner: Path) -> None:
        self.profile, self.record, self.owner = profile, record, owner
        self.previous = read_jobs(record)
        self.number = int(self.previous["submission"].astype(int).max()) + 1 if len(self.previous) else 1
        self.rows: list[dict[str, Any]] = []
        self.frame = pd.DataFrame(columns=JOBS_COLUMNS)

    def __enter__(self) -> Submission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.frame = _write(self.record, self.previous, self.rows)

    def _add(self, stage: str, job_id: str, dependency: str, array_range: str = "", items: str = "") -> None:
        self.rows.append({
            "submission": self.number, "stage": stage, "job_id": job_id, "array_range": array_range, "items": items,
            "submitted_at": dt.datetime.now().isoformat(timespec="seconds"), "dependency": dependency,
        })  # fmt: skip

    def job(self, stage: str, fn: Any, run_path: str, *, dependency: str = "", resources: str | None = None, folder: str | None = None) -> str:
        """Submit ``fn(run_path)`` with the profile's ``resources`` (default: the stage's) after ``dependency``."""
        executor = stage_executor(self.profile, resources or stage, job_folder(self.profile, self.owner, folder or stage), dependency)
        try:
            job = executor.submit(fn, run_path)
        except Exception as exc:  # submitit wraps sbatch's stderr in several exception types
            raise SubmitError(f"sbatch refused the {folder or stage} job: {_last_line(exc)}") from None
        self._add(stage, job.job_id, dependency)
        return job.job_id

    def array(self, stage: str, fn: Any, run_path: str, items: list[int], *, what: str, folder: str | None = None) -> list[str]:
        """Submit ``fn(run_path, [item])`` for every item as array tasks (the stage's resources), one array per
        MaxArraySize items: indices run 0..MaxArraySize-1 and submitit does not split. Returns the array ids."""
        ids: list[str] = []
        path = job_folder(self.profile, self.owner, folder or stage)
        for chunk in array_chunks(len(items), cluster_max_array_size()) if items else []:
            part = items[chunk.start : chunk.stop]
            try:
                jobs = stage_executor(self.profile, stage, path).map_array(fn, [run_path] * len(part), [[i] for i in part])
            except Exception as exc:
                raise SubmitError(f"sbatch refused {what}: {_last_line(exc)}") from None
            array_id = JobId.parse(jobs[0].job_id).base
            self._add(stage, array_id, "", f"0-{len(part) - 1}", " ".join(map(str, part)))
            ids.append(array_id)
        return ids


def _last_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[-1]


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

    from jobs.evaluate import evaluate_job
    from jobs.extract import extract_job
    from jobs.gather import gather_job
    from jobs.index import index_job
    from jobs.train import TrainJob

    path = str(run.path)
    with Submission(profile, record=run, owner=run.path) as sub:
        upstream: list[str] = []
        if missing and "extract" in wanted:
            upstream = sub.array("extract", extract_job, path, missing, what="the extraction array")
        if "index" in wanted:
            if missing:
                upstream = [sub.job("index", index_job, path, dependency=afterok(upstream))] if upstream else []
            elif not run.index.is_file():
                build_index(run, sizes, digest)  # every shard is complete: a few file reads, not worth a job
        # Shards still being cut and no index wanted: nothing later could start.
        if not (missing and "index" not in wanted):
            train_needed = "train" in wanted and (bool(missing) or not training_state(run).done)
            if train_needed:
                upstream = [sub.job("train", TrainJob(), path, dependency=afterok(upstream))]
            if "evaluate" in wanted and (train_needed or bool(missing) or not run.evaluation_current()):
                upstream = [sub.job("evaluate", evaluate_job, path, dependency=afterok(upstream))]
            root_summary = gathered_summary(cfg.run.root)
            gathered = root_summary.is_file() and run.summary.is_file() and root_summary.stat().st_mtime >= run.summary.stat().st_mtime
            if "gather" in wanted and (upstream or not gathered):
                sub.job("gather", gather_job, path, dependency=afterok(upstream))
    return sub.frame


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
    with Submission(profile, record=run, owner=run.path) as sub:
        upstream = sub.array("predict", predict_job, str(run.path), missing, what="the prediction array")
        stale = not run.roots.is_file() or any(run.part(p).stat().st_mtime > run.roots.stat().st_mtime for p in set(plan["part"]) if run.part(p).is_file())
        if upstream or stale:
            sub.job("roots", roots_job, str(run.path), dependency=afterok(upstream))
    return sub.frame


def submit_pretraining(cfg: Config, profile: Profile) -> pd.DataFrame:
    """Submit the run's contrastive pretraining (``<run>/pretrain``): an extraction array of its missing shards (the
    extract stage's resources, split below MaxArraySize), the index, then one requeueable pretraining job (the
    pretrain stage's resources; one DDP rank per task). Done parts are skipped: complete shards, the index, and the
    pretraining itself once ``backbone.pt`` is written and every planned step ran.

    Usage: ``submit_pretraining(cfg, load_profile("hyak", ["account=mylab"]))``
    """
    from jobs.extract import extract_job
    from jobs.index import index_job
    from jobs.pretrain import PretrainJob
    from synhpc.pretrain import prepare_pretraining, pretraining_done

    check_submittable(profile)
    cfg = cluster_config(cfg, profile)
    run = RunDir(cfg.run_dir)
    prun = run.pretrain
    _clear_previous(prun)
    sizes, digest = prepare_pretraining(cfg)  # on the login node: selection, manifest and the config every job reads
    prun.cubes.mkdir(parents=True, exist_ok=True)
    missing = missing_shards(prun, sizes, digest)
    path = str(prun.path)
    with Submission(profile, record=prun, owner=run.path) as sub:
        upstream = sub.array("extract", extract_job, path, missing, what="the pretraining extraction array", folder="pretrain-extract")
        if upstream:
            upstream = [sub.job("index", index_job, path, dependency=afterok(upstream), folder="pretrain-index")]
        elif not prun.index.is_file():
            build_index(prun, sizes, digest)  # every shard is complete: a few file reads, not worth a job
        if upstream or not pretraining_done(prun):
            sub.job("pretrain", PretrainJob(), path, dependency=afterok(upstream))
    return sub.frame


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


def submit_command(config: str | None, profile: str, overrides: list[str] | tuple[str, ...], until: str = "gather", predict: str | None = None,
                   pretrain: bool = False) -> str:
    """What ``synhpc submit -c CONFIG --profile NAME [--predict MODEL | --pretrain] [overrides]`` does and prints.

    Usage: ``print(submit_command("configs/microns.yaml", "hyak", ["profile.account=mylab"]))``
    """
    from slurm.profile import load_profile

    config_overrides, profile_overrides = split_overrides(overrides)
    cfg = load_config(config, config_overrides)
    prof = load_profile(profile, profile_overrides)
    if predict is not None:
        cfg.predict.model = predict
        jobs = submit_prediction(cfg, prof)
    elif pretrain:
        jobs = submit_pretraining(cfg, prof)
    elif cfg.split.folds:
        from synhpc.folds import fold_configs

        # k-fold cross-validation: every fold is its own run and pipeline; each ends in a gather of run.root.
        jobs = pd.concat([submit_pipeline(fold, prof, until=until).assign(run=fold.run.name) for fold in fold_configs(cfg)], ignore_index=True)
    else:
        jobs = submit_pipeline(cfg, prof, until=until)
    run_dir = cluster_config(cfg, prof).run_dir
    if pretrain:
        run_dir = RunDir(run_dir).pretrain.path
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
