"""Evaluation and gather jobs: threshold on validation, metrics on test, then the cross-run summary table.

Runs: :func:`synhpc.evaluation.evaluate` (writes ``<run>/summary.csv``, predictions, plots) and
:func:`synhpc.gather.gather` (writes ``<run.root>/summary.csv``). Needs: ``<run>/config.yaml``, ``<run>/best.pt`` and
the shard index. Resumes: evaluation is short and idempotent (every output is written atomically), so a requeued or
resubmitted job simply runs again; ``jobs/submit.py`` skips it while ``summary.csv`` is newer than ``best.pt``.

Usage::

    job = executor.submit(evaluate_job, str(run_dir))
    python -m jobs.evaluate RUN_DIR [--gather]
"""

from __future__ import annotations

import sys
from pathlib import Path



def evaluate_job(run_dir: str) -> str:
    """Evaluate the run in ``run_dir``; returns the path of its summary.csv."""
    from synhpc.config import load_run_config
    from synhpc.evaluation import SUMMARY, evaluate

    cfg = load_run_config(run_dir)
    evaluate(cfg)
    return str(cfg.run_dir / SUMMARY)


def gather_job(run_dir: str) -> str:
    """Collect every run's summary.csv under the run's ``run.root``; returns the path of the combined table."""
    from synhpc.config import load_run_config
    from synhpc.gather import SUMMARY, gather

    root = Path(load_run_config(run_dir).run.root)
    gather(root)
    return str(root / SUMMARY)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or len(args) > 2 or (len(args) == 2 and args[1] != "--gather"):
        print("usage: python -m jobs.evaluate RUN_DIR [--gather]", file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    print(f"evaluate: {evaluate_job(args[0])}", flush=True)
    if len(args) == 2:
        print(f"gather: {gather_job(args[0])}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
