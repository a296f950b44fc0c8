"""Gather job: every run's summary.csv under ``run.root`` into ``<run.root>/summary.csv``.

Needs: the run's ``config.yaml`` (for ``run.root``). Resumes: rereads every summary and rewrites the table atomically,
so it can run any number of times. Never imports torch: it also runs on a login node.

Usage::

    job = executor.submit(gather_job, run_dir)
    python -m jobs.gather RUN_DIR
"""

from __future__ import annotations

from collections.abc import Sequence

from jobs import run_dir_main


def gather_job(run_dir: str) -> str:
    """Collect every run's summary under the run's ``run.root``; returns the path of the combined table."""
    from pathlib import Path

    from synhpc.config import load_run_config
    from synhpc.gather import gather
    from synhpc.rundir import gathered_summary

    root = Path(load_run_config(run_dir).run.root)
    gather(root)
    return str(gathered_summary(root))


def main(argv: Sequence[str] | None = None) -> int:
    return run_dir_main("gather", gather_job, argv)


if __name__ == "__main__":
    raise SystemExit(main())
