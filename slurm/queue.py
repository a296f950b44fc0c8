"""SLURM's view of jobs: job ids parsed in one place, and one call each to sacct, squeue, scontrol and scancel.

Every query degrades instead of hanging a login-node command: a missing binary or a controller that does not answer
within a few seconds gives an empty answer (states read ``unknown``), never a traceback.

Usage::

    JobId.parse("123_4")                  # JobId(base='123', task='4')
    states = job_states(["123", "124_0"])  # {"123": "COMPLETED", "124_0": "RUNNING"}
    max_array_size()                       # 1001, or None off the cluster
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

SACCT_TIMEOUT_S = 10.0
SCONTROL_TIMEOUT_S = 5.0  # a login node answers at once; a dead controller would stall `plan` for many seconds
# States in which a job may still write into the run folder.
ACTIVE_STATES = frozenset({
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED",
    "RESIZING", "SIGNALING", "STAGE_OUT",
})  # fmt: skip
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED",
})  # fmt: skip
_JOB_ID = re.compile(r"^(\d+)(?:_(\d+|\[[^\]]*\]))?$")


@dataclass(frozen=True)
class JobId:
    """A SLURM job id: ``base`` alone, or an array task ``base_task`` (``task`` may be a pending range ``[2-4]``)."""

    base: str
    task: str = ""

    @classmethod
    def parse(cls, text: str) -> JobId:
        match = _JOB_ID.match(str(text).strip())
        if match is None:
            raise ValueError(f"not a SLURM job id: {text!r}")
        return cls(match.group(1), match.group(2) or "")

    def __str__(self) -> str:
        return f"{self.base}_{self.task}" if self.task else self.base

    def covers(self, other: JobId) -> bool:
        """True when ``other`` is this job or, for a whole-array id, one of its tasks."""
        return self.base == other.base and (not self.task or self.task == other.task)


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (subprocess.TimeoutExpired, OSError):
        return None


def job_states(job_ids: list[str], timeout: float = SACCT_TIMEOUT_S) -> dict[str, str]:
    """{job or array task id: state} from one ``sacct -X`` call; {} without SLURM.

    Usage: ``job_states(["123"])`` -> ``{"123_0": "COMPLETED", "123_1": "RUNNING"}`` for an array.
    """
    bases = sorted({JobId.parse(j).base for j in job_ids if str(j)}, key=int)
    proc = _run(["sacct", "-X", "-P", "-n", "-j", ",".join(bases), "--format=JobID,State"], timeout) if bases else None
    states: dict[str, str] = {}
    for line in proc.stdout.splitlines() if proc is not None else []:
        jid, sep, state = line.partition("|")
        if sep:
            states[jid.strip()] = state.strip().split()[0] if state.strip() else "unknown"  # "CANCELLED by 0"
    return states


def stage_state(job_id: str, states: dict[str, str]) -> dict[str, int]:
    """Count the states of one job (or every task of one array job): {"COMPLETED": 3, "RUNNING": 1}."""
    wanted = JobId.parse(job_id)
    counts: dict[str, int] = {}
    for jid, state in states.items():
        try:
            found = JobId.parse(jid)
        except ValueError:
            continue
        if wanted.covers(found):
            counts[state] = counts.get(state, 0) + 1
    return counts


@dataclass(frozen=True)
class QueuedJob:
    array_or_job: str  # squeue's %F: the array's base id (the job's own id when it is no array)
    job_id: str
    state: str
    reason: str


def queued(job_ids: list[str], timeout: float = 30.0) -> list[QueuedJob]:
    """The given jobs (or tasks of the given arrays) that squeue still lists."""
    bases = {JobId.parse(j).base for j in job_ids if str(j)}
    proc = _run(["squeue", "-h", "-o", "%F|%i|%T|%r"], timeout) if bases else None
    found = []
    for line in proc.stdout.splitlines() if proc is not None else []:
        parts = line.split("|")
        if len(parts) == 4 and parts[0] in bases:
            found.append(QueuedJob(*parts))
    return found


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        _run(["scancel", *sorted(set(job_ids))], 30.0)


def max_array_size() -> int | None:
    """``MaxArraySize`` from ``scontrol show config``; None when scontrol is missing, fails or omits it."""
    proc = _run(["scontrol", "show", "config"], SCONTROL_TIMEOUT_S)
    if proc is None or proc.returncode != 0:
        return None
    match = re.search(r"^\s*MaxArraySize\s*=\s*(\d+)", proc.stdout, flags=re.MULTILINE)
    return int(match.group(1)) if match else None


def afterok(job_ids: list[str]) -> str:
    """``afterok:`` dependency on every given job; an array's base id covers all of its tasks."""
    bases = sorted({JobId.parse(j).base for j in job_ids}, key=int)
    return "afterok:" + ":".join(bases) if bases else ""
