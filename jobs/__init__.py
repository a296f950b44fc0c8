"""Batch jobs: one module per kind of job (what it runs, what it needs, how it resumes), launched through submitit
or run as ``python -m jobs.<name>`` (plain sbatch scripts, ``srun``).

Usage::

    from jobs import run_dir_main
    raise SystemExit(run_dir_main("index", index_job))      # a job's ``python -m`` entry taking one RUN_DIR
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


def one_line_errors(name: str, body: Callable[[], object]) -> int:
    """Exit status of ``body()`` as a ``python -m jobs.<name>`` entry: 0, or 2 with a user-caused error
    (:class:`synhpc.errors.SynhpcError`) as one line on stderr, as from the ``synhpc`` command."""
    from synhpc.errors import SynhpcError

    try:
        body()
    except SynhpcError as exc:
        print(f"jobs.{name}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def run_dir_main(name: str, job: Callable[[str], object], argv: Sequence[str] | None = None) -> int:
    """``python -m jobs.<name> RUN_DIR``: run ``job(RUN_DIR)`` and print what it returns; errors as
    :func:`one_line_errors`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(f"usage: python -m jobs.{name} RUN_DIR", file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    return one_line_errors(name, lambda: print(f"{name}: {job(args[0])}", flush=True))
