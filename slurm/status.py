"""``synhpc status RUN_DIR``: what the run's SLURM jobs are doing and what is on disk, in one screen.

Reads ``<run>/jobs.csv`` (written by :mod:`slurm.submit`), asks ``sacct`` once for every job's state, and reports
shards done/total, training progress (the record training writes: planned and done steps, world size) and the age of
the newest checkpoint, and whether evaluation is current.
Without SLURM (no ``sacct``, or it does not answer within a few seconds) the job states read ``unknown`` and the
on-disk part still works. Nothing here imports torch, so it answers in well under a second.

Usage::

    print(status("logs/microns-v1300"))
    training_state(RunDir("logs/demo")).done   # True once every planned step ran and best.pt exists
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from slurm.queue import job_states, stage_state
from synhpc.errors import DataError
from synhpc.rundir import PREDICTION_STAGES, STAGES, RunDir, TrainProgress, gathered_summary

# jobs.csv: one row per submitted job (an extraction array is one row; ``items`` lists its shards).
JOBS_COLUMNS = ["submission", "stage", "job_id", "array_range", "items", "submitted_at", "dependency"]


# ------------------------------------------------------------------------------------------------ on-disk state


@dataclass
class TrainingState:
    """Training as the run folder records it: the progress record rank 0 writes at every checkpoint, and the newest
    checkpoint's age."""

    progress: TrainProgress | None
    epoch: int | None  # last finished epoch in train_log.csv
    checkpoint_age_s: float | None
    best_exists: bool

    @property
    def step(self) -> int:
        return self.progress.done_steps if self.progress else 0

    @property
    def planned_steps(self) -> int | None:
        return self.progress.planned_steps if self.progress else None

    @property
    def done(self) -> bool:
        """Every planned step of every rank is done and the best model exists (the world size is in the record, so
        a multi-GPU run that planned fewer steps per rank is recognised as finished)."""
        return self.progress is not None and self.progress.finished and self.best_exists


def training_state(run: RunDir) -> TrainingState:
    progress = run.read_progress()
    age = None
    if run.checkpoints.is_dir():
        ckpts = sorted(run.checkpoints.glob("ckpt-*.pt"))
        if ckpts:
            try:
                age = time.time() - ckpts[-1].stat().st_mtime
            except OSError:
                age = None
    epoch = None
    if run.train_log.is_file():
        try:
            frame = pd.read_csv(run.train_log, usecols=["epoch"])
            epoch = int(frame["epoch"].iloc[-1]) if len(frame) else None
        except (ValueError, pd.errors.EmptyDataError):
            epoch = None
    return TrainingState(progress, epoch, age, run.best.is_file())


def shard_counts(run: RunDir) -> tuple[int, int | None]:
    """(shards on disk, shards planned); shards are renamed into place whole, so a visible file is complete."""
    done = len(list(run.cubes.glob("shard-*.h5"))) if run.cubes.is_dir() else 0
    total = int(pd.read_csv(run.manifest, usecols=["shard"])["shard"].nunique()) if run.manifest.is_file() else None
    return done, total


def prediction_lines(run: RunDir) -> list[str]:
    """Parts on disk out of planned, and whether the per-root table is there."""
    from synhpc.rundir import read_json

    record = read_json(run.predict_provenance, "prediction record")
    done = len(list(run.parts.glob("part-*.parquet"))) if run.parts.is_dir() else 0
    lines = [f"prediction: {record['synapses']:,} synapses, parts {done}/{record['parts']} on disk (model {record['model']})"]
    lines.append(f"roots: {run.roots}" if run.roots.is_file() else "roots: not yet")
    return lines


# ------------------------------------------------------------------------------------------------ SLURM state


def read_jobs(run: RunDir) -> pd.DataFrame:
    """The run's jobs.csv (every submission, oldest first), or an empty frame; a damaged file is a one-line error."""
    if not run.jobs_csv.is_file():
        return pd.DataFrame(columns=JOBS_COLUMNS)
    try:
        jobs = pd.read_csv(run.jobs_csv, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{run.jobs_csv}: unreadable job record ({exc.__class__.__name__})") from None
    if list(jobs.columns) != JOBS_COLUMNS:
        raise DataError(f"{run.jobs_csv}: columns {list(jobs.columns)} are not {JOBS_COLUMNS}")
    return jobs


def _summarize(counts: dict[str, int]) -> str:
    if not counts:
        return "unknown"
    return ", ".join(f"{state} x{n}" if n > 1 else state for state, n in sorted(counts.items()))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def status(run_dir: str | Path) -> str:
    """A human-readable report of the run's jobs and on-disk progress; a missing run is a one-line error.

    Usage: ``print(status("logs/demo"))``
    """
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise DataError(f"{run.path}: no such run folder")
    if not run.config.is_file():
        raise DataError(f"{run.path}: not a synhpc run folder (no {run.config.name})")
    lines = [f"run: {run.path.resolve()}"]
    jobs = read_jobs(run)
    latest = jobs[jobs["submission"].astype(int) == jobs["submission"].astype(int).max()] if len(jobs) else jobs
    states = job_states(list(latest["job_id"])) if len(latest) else {}
    lines.append("jobs (latest submission" + (f" #{int(latest['submission'].iloc[0])}, {latest['submitted_at'].iloc[0]}" if len(latest) else ": none") + "):")
    predicting = run.predict_provenance.is_file()
    for stage in PREDICTION_STAGES if predicting else STAGES:
        rows = latest[latest["stage"] == stage]
        for _, row in rows.iterrows():
            extra = f" array {row['array_range']}" if row["array_range"] else ""
            dep = f" after {row['dependency']}" if row["dependency"] else ""
            lines.append(f"  {stage:<9} {row['job_id']:<10} {_summarize(stage_state(row['job_id'], states))}{extra}{dep}")
        if rows.empty and len(latest):
            lines.append(f"  {stage:<9} -          not submitted (done or not needed)")

    if predicting:
        return "\n".join([*lines, *prediction_lines(run)])
    done, total = shard_counts(run)
    lines.append(f"shards: {done}/{total if total is not None else '?'} on disk, index {'written' if run.index.is_file() else 'missing'}")
    training = training_state(run)
    progress = training.progress
    if progress is None:
        lines.append("training: not started")
    else:
        epoch = "none finished" if training.epoch is None else f"{training.epoch + 1}/{progress.epochs} finished"
        lines.append(
            f"training: epochs {epoch}, step {progress.done_steps}/{progress.planned_steps} on {progress.world_size} rank(s) "
            f"(newest checkpoint {_age(training.checkpoint_age_s)} old)" + (", done" if training.done else "")
        )
    if run.evaluation_current():
        lines.append(f"evaluation: done -> {run.summary}")
    elif run.summary.is_file():
        lines.append(f"evaluation: stale ({run.summary} is older than {run.best.name})")
    else:
        lines.append("evaluation: not yet")
    root_summary = gathered_summary(run.path.parent)
    if root_summary.is_file():
        lines.append(f"gathered: {root_summary}")
    return "\n".join(lines)
