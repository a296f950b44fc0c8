"""Evaluation job: threshold and calibration on validation, metrics on test, summary.csv, predictions and plots.

Runs: :func:`synhpc.evaluation.evaluate` on the run's ``config.yaml``. Needs: ``best.pt`` with its ``model.json`` and
the shard index. Resumes: short and idempotent (every output is written atomically), so a requeued or resubmitted
job simply runs again; ``synhpc submit`` skips it while ``summary.csv`` is newer than ``best.pt``.

Usage::

    job = executor.submit(evaluate_job, run_dir)
    python -m jobs.evaluate RUN_DIR
"""

from __future__ import annotations

from collections.abc import Sequence

from jobs import run_dir_main


def evaluate_job(run_dir: str) -> str:
    """Evaluate the run in ``run_dir``; returns the path of its summary.csv."""
    from synhpc.config import load_run_config
    from synhpc.evaluation import evaluate
    from synhpc.rundir import RunDir

    evaluate(load_run_config(run_dir))
    return str(RunDir(run_dir).summary)


def main(argv: Sequence[str] | None = None) -> int:
    return run_dir_main("evaluate", evaluate_job, argv)


if __name__ == "__main__":
    raise SystemExit(main())
