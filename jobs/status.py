"""``synhpc status RUN_DIR``: what the run's SLURM jobs are doing and what is on disk, in one screen.

Reads ``<run>/jobs.csv`` (written by ``jobs/submit.py``), asks ``sacct`` once for every job's state, and reports
shards done/total, training epoch/step and the age of the newest checkpoint, and whether evaluation is current.
Without SLURM (no ``sacct``, or it does not answer within a few seconds) the job states read ``unknown`` and the
on-disk part still works. Nothing here imports torch, so it answers in well under a second.

Usage::

    print(status("logs/microns-v1300"))
    states = job_states(["123", "124_0"])     # {"123": "COMPLETED", "124_0": "RUNNING"}
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from synhpc.config import RUN_CONFIG
from synhpc.gather import SUMMARY

JOBS_CSV = "jobs.csv"
STAGES = ("extract", "index", "train", "evaluate", "gather")
CHECKPOINT_GLOB = "ckpt-*.pt"
SACCT_TIMEOUT_S = 10.0


# ------------------------------------------------------------------------------------------------ on-disk state


@dataclass
class TrainingProgress:
    planned_steps: int | None
    step: int  # newest checkpoint's step (0 without one)
    epoch: int | None  # last finished epoch in train_log.csv
    logged_step: int | None
    checkpoint_age_s: float | None
    best_exists: bool

    @property
    def done(self) -> bool:
        if self.planned_steps is None:
            return False
        if self.step >= self.planned_steps:
            return True
        return self.best_exists and self.logged_step is not None and self.logged_step >= self.planned_steps


def _read_config(run_dir: Path) -> dict:
    path = run_dir / RUN_CONFIG
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def planned_steps(run_dir: Path, config: dict | None = None) -> int | None:
    """Total optimizer steps training will take: ceil(train rows / batch) * epochs (as synhpc.training plans)."""
    config = _read_config(run_dir) if config is None else config
    manifest = run_dir / "synapses.csv"
    if not config or not manifest.is_file():
        return None
    n_train = int((pd.read_csv(manifest, usecols=["split"])["split"] == 0).sum())
    train = config.get("train", {})
    return math.ceil(n_train / train["batch_size"]) * train["epochs"]


def training_progress(run_dir: Path, config: dict | None = None) -> TrainingProgress:
    """Where training stands from files alone: checkpoint names carry the step, train_log.csv the epochs."""
    run_dir = Path(run_dir)
    ckpts = sorted((run_dir / "checkpoints").glob(CHECKPOINT_GLOB)) if (run_dir / "checkpoints").is_dir() else []
    step, age = 0, None
    for path in reversed(ckpts):
        try:
            step = int(path.stem.split("-")[1])
            age = time.time() - path.stat().st_mtime
            break
        except (ValueError, IndexError, OSError):
            continue
    epoch = logged = None
    log = run_dir / "train_log.csv"
    if log.is_file():
        try:
            frame = pd.read_csv(log, usecols=["epoch", "step"])
            if len(frame):
                epoch, logged = int(frame["epoch"].iloc[-1]), int(frame["step"].iloc[-1])
        except (ValueError, pd.errors.EmptyDataError):
            pass
    return TrainingProgress(planned_steps(run_dir, config), step, epoch, logged, age, (run_dir / "best.pt").is_file())


def evaluation_current(run_dir: Path) -> bool:
    """summary.csv exists and was written after the best model it evaluates."""
    summary, best = Path(run_dir) / SUMMARY, Path(run_dir) / "best.pt"
    return summary.is_file() and best.is_file() and summary.stat().st_mtime >= best.stat().st_mtime


def shard_counts(run_dir: Path) -> tuple[int, int | None]:
    """(shards on disk, shards planned); shards are renamed into place whole, so a visible file is complete."""
    cubes = Path(run_dir) / "cubes"
    done = len(list(cubes.glob("shard-*.h5"))) if cubes.is_dir() else 0
    manifest = Path(run_dir) / "synapses.csv"
    total = int(pd.read_csv(manifest, usecols=["shard"])["shard"].nunique()) if manifest.is_file() else None
    return done, total


# ------------------------------------------------------------------------------------------------ SLURM state


def read_jobs(run_dir: Path) -> pd.DataFrame:
    """The run's jobs.csv (every submission, oldest first), or an empty frame."""
    path = Path(run_dir) / JOBS_CSV
    if not path.is_file():
        return pd.DataFrame(columns=["submission", "stage", "job_id", "array_range", "items", "submitted_at", "dependency"])
    return pd.read_csv(path, dtype={"job_id": str, "array_range": str, "items": str, "dependency": str}, keep_default_na=False)


def job_states(job_ids: list[str], timeout: float = SACCT_TIMEOUT_S) -> dict[str, str]:
    """{job id or array task id: state} from one ``sacct -X`` call; {} without SLURM.

    Usage: ``job_states(["123"])`` -> ``{"123_0": "COMPLETED", "123_1": "RUNNING"}`` for an array.
    """
    ids = sorted({str(j).split("_")[0] for j in job_ids if str(j)})
    if not ids or shutil.which("sacct") is None:
        return {}
    try:
        proc = subprocess.run(
            ["sacct", "-X", "-P", "-n", "-j", ",".join(ids), "--format=JobID,State"],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
    except (subprocess.TimeoutExpired, OSError):
        return {}
    states: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        jid, sep, state = line.partition("|")
        if sep:
            # "CANCELLED by 0" -> "CANCELLED"
            states[jid.strip()] = state.strip().split()[0] if state.strip() else "unknown"
    return states


def stage_state(job_id: str, states: dict[str, str]) -> dict[str, int]:
    """Count the states of one job (or every task of one array job): {"COMPLETED": 3, "RUNNING": 1}."""
    base = str(job_id).split("_")[0]
    found = {k: v for k, v in states.items() if k == base or k.startswith(base + "_")}
    counts: dict[str, int] = {}
    for state in found.values():
        counts[state] = counts.get(state, 0) + 1
    return counts


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
    """A human-readable report of the run's jobs and on-disk progress.

    Usage: ``print(status("logs/demo"))``
    """
    run_dir = Path(run_dir)
    lines = [f"run: {run_dir.resolve()}"]
    if not run_dir.is_dir():
        return "\n".join([*lines, "  (no such run folder)"])
    config = _read_config(run_dir)
    jobs = read_jobs(run_dir)
    latest = jobs[jobs["submission"].astype(int) == jobs["submission"].astype(int).max()] if len(jobs) else jobs
    states = job_states(list(latest["job_id"])) if len(latest) else {}
    lines.append("jobs (latest submission" + (f" #{int(latest['submission'].iloc[0])}, {latest['submitted_at'].iloc[0]}" if len(latest) else ": none") + "):")
    for stage in STAGES:
        rows = latest[latest["stage"] == stage]
        for _, row in rows.iterrows():
            extra = f" array {row['array_range']}" if row["array_range"] else ""
            dep = f" after {row['dependency']}" if row["dependency"] else ""
            lines.append(f"  {stage:<9} {row['job_id']:<10} {_summarize(stage_state(row['job_id'], states))}{extra}{dep}")
        if rows.empty and len(latest):
            lines.append(f"  {stage:<9} -          not submitted (done or not needed)")

    done, total = shard_counts(run_dir)
    index = (run_dir / "cubes" / "index.json").is_file()
    lines.append(f"shards: {done}/{total if total is not None else '?'} on disk, index {'written' if index else 'missing'}")
    progress = training_progress(run_dir, config)
    epochs = config.get("train", {}).get("epochs", "?")
    epoch = "none finished" if progress.epoch is None else f"{progress.epoch + 1}/{epochs} finished"
    planned = progress.planned_steps if progress.planned_steps is not None else "?"
    lines.append(
        f"training: epochs {epoch}, step {progress.step}/{planned} (newest checkpoint {_age(progress.checkpoint_age_s)} old)"
        + (", done" if progress.done else "")
    )
    summary = run_dir / "summary.csv"
    if evaluation_current(run_dir):
        lines.append(f"evaluation: done -> {summary}")
    elif summary.is_file():
        lines.append(f"evaluation: stale ({summary} is older than best.pt)")
    else:
        lines.append("evaluation: not yet")
    root_summary = run_dir.parent / "summary.csv"
    if root_summary.is_file():
        lines.append(f"gathered: {root_summary}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m jobs.status RUN_DIR", file=sys.stderr)
        return 2
    print(status(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
