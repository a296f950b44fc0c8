"""Training job: resume-or-start :func:`synhpc.training.train` on a run folder, as a requeueable submitit callable.

Runs: ``synhpc.training.train`` on the run's ``config.yaml``. Needs: ``<run>/config.yaml`` and the shard index
``<run>/cubes/index.json`` (the extraction and index jobs). Resumes: training checkpoints periodically
(write-to-temp + ``os.replace``) and on SIGTERM/USR1/USR2; every start, first or requeued, resumes from the newest
checkpoint, so SLURM's own requeue (preemption, ``scontrol requeue``) and submitit's USR2 checkpoint-and-requeue both
continue where the run stopped, with the same final weights as an uninterrupted run.

Usage::

    job = executor.submit(TrainJob(), str(run_dir))          # submitit (slurm/submit.py does this)
    srun python -m jobs.train RUN_DIR                          # raw sbatch (slurm/templates/train_ddp.sbatch)
"""

from __future__ import annotations

import os
from typing import Any

import submitit

from jobs import run_dir_main
from synhpc.config import load_run_config


def _distributed_rank() -> int:
    """Export torchrun-style variables (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) when the job has several
    tasks; return this process's global rank (0 for a single task)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return 0
    # Outside submitit (raw srun), TorchDistributedEnvironment needs to be told it runs under SLURM.
    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return env.rank


class TrainJob(submitit.helpers.Checkpointable):
    """Callable training job; ``checkpoint()`` (submitit, on its preemption signal) resubmits the same call.

    Training has already written a checkpoint by the time submitit's handler runs (synhpc.preemption.StopFlag hands
    the signal over after saving), so the resubmission only has to start again.
    """

    def __call__(self, run_dir: str) -> dict[str, Any]:
        _distributed_rank()  # every rank trains (DDP); only rank 0 writes checkpoints and logs
        from synhpc.training import train

        cfg = load_run_config(run_dir)
        return train(cfg, progress=False)

    def checkpoint(self, run_dir: str) -> submitit.helpers.DelayedSubmission:  # type: ignore[override]
        return submitit.helpers.DelayedSubmission(TrainJob(), run_dir)


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.train RUN_DIR``: train outside submitit (each srun task runs this)."""
    return run_dir_main("train", TrainJob(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
