"""Executors: where a job runs (this process, local subprocesses, or SLURM) behind one call.

Usage::

    executor = make_executor(cfg.execution, cfg.run_dir / "jobs" / "extract", name="extract")
    jobs = executor.map_array(run_task, [run_dir] * 4, [[0, 4], [1, 5], [2], [3]])
"""

from __future__ import annotations

from pathlib import Path

import submitit

from synhpc.config import ExecutionConfig


def make_executor(execution: ExecutionConfig, folder: Path, name: str) -> submitit.Executor:
    """A submitit executor for ``execution.executor``; the job folder holds one log pair per task."""
    folder.mkdir(parents=True, exist_ok=True)
    if execution.executor == "debug":
        return submitit.DebugExecutor(folder)
    if execution.executor == "local":
        executor = submitit.LocalExecutor(folder)
        executor.update_parameters(timeout_min=execution.timeout_min)
        return executor
    executor = submitit.AutoExecutor(folder, cluster="slurm")
    executor.update_parameters(
        name=f"synhpc-{name}",
        timeout_min=execution.timeout_min,
        cpus_per_task=execution.cpus_per_task,
        slurm_array_parallelism=execution.max_parallel,
    )
    return executor


def task_groups(items: list[int], execution: ExecutionConfig) -> list[list[int]]:
    """Split work items into tasks: one per item on SLURM (the array throttles), ``max_parallel`` groups locally
    (local executors start every task at once)."""
    if execution.executor == "slurm":
        return [[item] for item in items]
    n = max(1, min(execution.max_parallel, len(items)))
    return [items[i::n] for i in range(n) if items[i::n]]
