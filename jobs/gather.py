"""Gather job: every run's summary.csv under ``run.root`` into ``<run.root>/summary.csv``.

Needs: the run's ``config.yaml`` (for ``run.root``). Resumes: rereads every summary and rewrites the table atomically,
so it can run any number of times. Never imports torch: it also runs on a login node.

Usage::

    job = executor.submit(gather_job, run_dir)
    python -m jobs.gather RUN_DIR
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from synhpc.errors import SynhpcError


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
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m jobs.gather RUN_DIR", file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        print(f"gather: {gather_job(args[0])}", flush=True)
    except SynhpcError as exc:
        print(f"jobs.gather: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
