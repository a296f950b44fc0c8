"""The single-node SLURM cluster (slurm/cluster.sh) as the project uses it: submitit arrays, sacct, MaxArraySize,
requeue. Skipped without SLURM; see tests/slurm_fixture.py."""

from __future__ import annotations

import operator
import re
import subprocess
import time

import pytest
from slurm_fixture import scontrol_config

pytestmark = pytest.mark.slurm

JOB_TIMEOUT_S = 45


def _sh(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)


def _wait(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def test_submitit_map_array_completes_and_sacct_reports_it(slurm_cluster, tmp_path):  # noqa: F811
    submitit = pytest.importorskip("submitit")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(
        slurm_partition=slurm_cluster.partition,
        timeout_min=5,
        cpus_per_task=1,
        mem_gb=0.5,
        slurm_array_parallelism=4,
        name="synhpc-test-array",
    )
    # A stdlib function: pickled by reference, importable on the node whatever tests/ looks like there.
    jobs = executor.map_array(operator.mul, [1, 2, 3, 4], [10, 20, 30, 40])
    assert len(jobs) == 4
    array_id = jobs[0].job_id.split("_")[0]
    assert all(j.job_id.startswith(array_id + "_") for j in jobs), [j.job_id for j in jobs]

    try:
        _wait(lambda: all(j.done() for j in jobs), JOB_TIMEOUT_S, what=f"array {array_id} to finish")
    except AssertionError:
        for job in jobs:
            job.cancel(check=False)
        raise
    assert [j.result() for j in jobs] == [10, 40, 90, 160]

    def all_completed():
        states = slurm_cluster.sacct_states(array_id)
        tasks = {k: v for k, v in states.items() if re.fullmatch(rf"{array_id}_\d+", k)}
        return tasks if len(tasks) == 4 and set(tasks.values()) == {"COMPLETED"} else None

    tasks = _wait(all_completed, 30, what=f"sacct to report array {array_id} COMPLETED")
    assert sorted(tasks) == [f"{array_id}_{i}" for i in range(4)]
    # submitit reads the same accounting (without slurmdbd its states stay UNKNOWN). `job.state` may hold a value
    # cached before sacct had the record: force a fresh sacct call.
    assert {j.watcher.get_state(j.job_id, mode="force") for j in jobs} == {"COMPLETED"}


def test_max_array_size_is_read_from_scontrol(slurm_cluster):  # noqa: F811
    out = _sh("scontrol", "show", "config").stdout
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)\s*$", out, re.MULTILINE)
    assert m, "MaxArraySize missing from `scontrol show config`"
    value = slurm_cluster.max_array_size()
    assert value == int(m.group(1)) == int(scontrol_config()["MaxArraySize"])
    assert value >= 2

    # An array index must stay below MaxArraySize: SLURM rejects 0-MaxArraySize (submitit would not split it).
    too_big = _sh("sbatch", "--hold", "-p", slurm_cluster.partition, f"--array=0-{value}", "--wrap", "true")
    if too_big.returncode == 0:  # pragma: no cover - only on a broken cluster
        _sh("scancel", too_big.stdout.split()[-1])
    assert too_big.returncode != 0
    assert "array" in too_big.stderr.lower()


def _job_field(job_id: str, field: str) -> str:
    out = _sh("scontrol", "show", "job", job_id).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else ""


@pytest.mark.slow
def test_requeued_job_starts_again_quickly(slurm_cluster, tmp_path):  # noqa: F811
    out = tmp_path / "requeue-%j.out"
    sub = _sh("sbatch", "--parsable", "--requeue", "-p", slurm_cluster.partition, "-o", str(out),
              "--mem=100M", "-t", "5", "--wrap", "echo start $SLURM_RESTART_COUNT; sleep 120")
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    try:
        _wait(lambda: _job_field(job_id, "JobState") == "RUNNING", 20, 0.2, what="the job to run")
        req = _sh("scontrol", "requeue", job_id)
        assert req.returncode == 0, req.stderr
        # AuthInfo=cred_expire=10 and sched_interval=2 make it seconds, not the default ~2 minutes; the settings are
        # checked, the wait below is only a bound against hanging.
        config = slurm_cluster.config()
        assert "cred_expire=10" in config.get("AuthInfo", "") and "sched_interval=2" in config.get("SchedulerParameters", "")
        _wait(lambda: _job_field(job_id, "Restarts") == "1" and _job_field(job_id, "JobState") == "RUNNING",
              120, 0.2, what="the requeued job to run again")
    finally:
        _sh("scancel", job_id)
