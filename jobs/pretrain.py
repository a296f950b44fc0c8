"""Pretraining job: resume-or-start :func:`synhpc.pretrain.pretrain` on a pretraining run folder, as a requeueable
submitit callable (one DDP rank per task).

Runs: ``synhpc.pretrain.pretrain`` on ``<run>/pretrain/config.yaml``. Needs: that folder prepared on the login node
(``synhpc submit --pretrain`` or ``synhpc pretrain`` write its manifest, provenance and config) and its shards cut and
indexed (``jobs.extract`` and ``jobs.index`` on the same folder). Resumes: pretraining checkpoints periodically
(write-to-temp + ``os.replace``) and on SIGTERM/USR1/USR2, and every start resumes from the newest checkpoint, so
requeues and submitit's USR2 checkpoint-and-requeue both end with the weights of an uninterrupted run.

Usage::

    job = executor.submit(PretrainJob(), str(run_dir / "pretrain"))    # slurm/submit.py does this
    srun python -m jobs.pretrain RUN_DIR/pretrain                      # raw sbatch, one task per GPU
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import submitit

from jobs import run_dir_main


class PretrainJob(submitit.helpers.Checkpointable):
    """Callable pretraining job; ``checkpoint()`` (submitit, on its preemption signal) resubmits the same call.

    Pretraining has already written a checkpoint when submitit's handler runs (``synhpc.preemption.StopFlag`` hands
    the signal over after saving), so the resubmission only has to start again.
    """

    def __call__(self, run_dir: str) -> dict[str, Any]:
        from jobs.train import _distributed_rank

        _distributed_rank()  # every rank pretrains (DDP); only rank 0 writes checkpoints, the log and the backbone
        from synhpc.config import load_run_config
        from synhpc.pretrain import pretrain

        return pretrain(load_run_config(run_dir), progress=False)

    def checkpoint(self, run_dir: str) -> submitit.helpers.DelayedSubmission:  # type: ignore[override]
        return submitit.helpers.DelayedSubmission(PretrainJob(), run_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jobs.pretrain RUN_DIR/pretrain``: pretrain outside submitit (each srun task runs this)."""
    return run_dir_main("pretrain", PretrainJob(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
