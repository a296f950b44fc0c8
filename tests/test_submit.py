"""`synhpc submit` on the local SLURM cluster: the whole pipeline, requeue/USR2 mid-training, a cancelled array task,
and arrays split below MaxArraySize. Skipped without SLURM (see tests/slurm_fixture.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from slurm_fixture import CLUSTER_SCRIPT, MARKER, REPO_ROOT

from slurm.profile import load_profile
from slurm.queue import job_states, stage_state
from slurm.queue import max_array_size as max_array_size
from slurm.status import read_jobs, status, training_state
from slurm.submit import submit_pipeline
from synhpc.config import load_config
from synhpc.rundir import STAGES, RunDir
from synhpc.training import MEASURED_COLUMNS

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
CONFIG = "configs/demo.yaml"


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, check=False)


def _logs(run_dir: Path) -> str:
    """Tails of every job's stderr, for failure messages."""
    out = []
    for path in sorted((run_dir / "jobs").rglob("*_log.err")):
        out.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-8:]))
    return "\n".join(out)[-6000:]


def _task_states(jobs: pd.DataFrame) -> dict[str, str]:
    """{job or array task id: state}; an array's row lists its shards, one task each."""
    states = job_states(list(jobs["job_id"]))
    out = {}
    for _, row in jobs.iterrows():
        found = {k: v for k, v in states.items() if k == row["job_id"] or k.startswith(row["job_id"] + "_")}
        n = len(str(row["items"]).split()) if row["array_range"] else 1
        if row["array_range"] and len(found) < n:  # pending tasks show up as one "123_[2-4]" entry
            found[f"{row['job_id']}_pending"] = "PENDING"
        out |= found or {row["job_id"]: "unknown"}
    return out


def wait_all(run_dir: Path, jobs: pd.DataFrame, timeout: float) -> dict[str, str]:
    """Wait until every job of ``jobs`` is COMPLETED; fail early (with log tails) on any other final state."""
    deadline = time.monotonic() + timeout
    while True:
        states = _task_states(jobs)
        if set(states.values()) == {"COMPLETED"}:
            return states
        bad = {k: v for k, v in states.items() if v in TERMINAL - {"COMPLETED"}}
        if bad or time.monotonic() > deadline:
            _sh("scancel", *{j.split("_")[0] for j in jobs["job_id"]})
            raise AssertionError(f"jobs did not complete: {states}\n{_logs(run_dir)}")
        time.sleep(1)


def clone(base: Path, name: str) -> Path:
    """A new run folder holding a copy of the base run's cubes (and index), manifest and provenance."""
    target = base.parent / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(base / "cubes", target / "cubes")
    for file in ("synapses.csv", "provenance.json"):
        shutil.copy(base / file, target / file)
    return target


@pytest.fixture(scope="module")
def base(extracted_run) -> tuple[Path, list[str]]:
    """The session's labelled world and FAST_TRAINING run, submitted through SLURM from now on."""
    run_dir, args = extracted_run
    return run_dir, [*args, "execution.executor=slurm"]


def test_pipeline_on_slurm_matches_in_process_run(slurm_cluster, base):  # noqa: F811
    from slurm.launch import run_extraction
    from synhpc.evaluation import evaluate
    from synhpc.training import train

    base_dir, args = base
    cfg = load_config(CONFIG, [*args, "run.name=piped"])
    jobs = submit_pipeline(cfg, load_profile("local"))
    assert list(jobs["stage"]) == list(STAGES)
    assert jobs["dependency"].tolist()[1:] == [f"afterok:{j}" for j in jobs["job_id"].tolist()[:-1]]
    assert (cfg.run_dir / "jobs.csv").is_file() and (cfg.run_dir / "config.yaml").is_file()

    # The same stages in this process (debug executor) while the cluster works.
    ref = load_config(CONFIG, [*args, "run.name=inproc", "execution.executor=debug"])
    run_extraction(ref, progress=False)
    train(ref, progress=False)
    evaluate(ref)

    wait_all(cfg.run_dir, jobs, timeout=150)
    got = pd.read_csv(cfg.run_dir / "summary.csv")
    want = pd.read_csv(ref.run_dir / "summary.csv")
    assert set(got["run"]) == {"piped"}
    pd.testing.assert_frame_equal(got.drop(columns="run"), want.drop(columns="run"))

    text = status(cfg.run_dir)
    for stage in STAGES:
        line = next(line for line in text.splitlines() if line.strip().startswith(stage))
        assert re.search(r"\bCOMPLETED\b", line) and not re.search(r"PENDING|RUNNING|FAILED|unknown", line), text
    assert "shards: 5/5 on disk, index written" in text and "done ->" in text
    assert "piped" in set(pd.read_csv(cfg.run_dir.parent / "summary.csv")["run"])

    # Everything is done: submitting again submits nothing.
    assert submit_pipeline(cfg, load_profile("local")).empty


def _running_with_checkpoint(job_id: str, run_dir: Path, total: int) -> bool:
    """Training has checkpointed and most of it is still ahead. Read from the progress record training writes, not
    from sacct, which learns of a job's start seconds late on a loaded machine."""
    step = training_state(RunDir(run_dir)).step
    return 6 <= step <= 3 * total // 4


def test_training_requeued_or_usr2_mid_run_matches_uninterrupted(slurm_cluster, base):  # noqa: F811
    from synhpc.training import train

    base_dir, args = base
    long = [*args, "train.epochs=8"]
    runs = {}
    for how in ("requeue", "usr2"):
        run_dir = clone(base_dir, f"train-{how}")
        cfg = load_config(CONFIG, [*long, f"run.name=train-{how}"])
        jobs = submit_pipeline(cfg, load_profile("local"), until="train")
        assert list(jobs["stage"]) == ["train"], jobs  # cubes and index exist: no extraction
        runs[how] = (run_dir, jobs["job_id"].iloc[0], jobs)
    manifest = pd.read_csv(runs["requeue"][0] / "synapses.csv")
    total = -(-int((manifest["split"] == 0).sum()) // cfg.train.batch_size) * cfg.train.epochs
    assert total >= 100  # 8 epochs x 14 steps

    pending = dict(runs)
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        for how, (run_dir, job_id, _) in list(pending.items()):
            if _running_with_checkpoint(job_id, run_dir, total):
                cmd = ["scontrol", "requeue", job_id] if how == "requeue" else ["scancel", "--signal=USR2", job_id]
                proc = _sh(*cmd)
                assert proc.returncode == 0, proc.stderr
                del pending[how]
        time.sleep(0.2)
    assert not pending, f"training never seen mid-run: {pending}"

    reference = clone(base_dir, "train-reference")
    ref_cfg = load_config(CONFIG, [*long, "run.name=train-reference", "execution.executor=debug"])
    train(ref_cfg, progress=False)
    want_log = pd.read_csv(reference / "train_log.csv").drop(columns=MEASURED_COLUMNS)
    want_best = torch.load(reference / "best.pt", weights_only=True)

    for how, (run_dir, job_id, jobs) in runs.items():
        wait_all(run_dir, jobs, timeout=120)
        log = (run_dir / "jobs" / "train" / f"{job_id}_0_log.out").read_text()
        assert "resuming from" in log, f"{how}: the job did not restart from a checkpoint\n{log[-2000:]}"
        got_log = pd.read_csv(run_dir / "train_log.csv").drop(columns=MEASURED_COLUMNS)
        pd.testing.assert_frame_equal(got_log, want_log)
        got_best = torch.load(run_dir / "best.pt", weights_only=True)
        assert got_best["step"] == want_best["step"]
        for key, tensor in want_best["model"].items():
            assert torch.equal(got_best["model"][key], tensor), f"{how}: {key}"
        assert training_state(RunDir(run_dir)).done


def test_cancelled_array_task_is_the_only_one_resubmitted(slurm_cluster, base):  # noqa: F811
    _, args = base
    cfg = load_config(CONFIG, [*args, "run.name=killed"])
    profile = load_profile("local")
    jobs = submit_pipeline(cfg, profile, until="index")
    assert list(jobs["stage"]) == ["extract", "index"] and jobs["items"].iloc[0] == "0 1 2 3 4"
    array = jobs["job_id"].iloc[0]
    victim = f"{array}_1"
    deadline = time.monotonic() + 60
    # squeue, not sacct: accounting learns of a task's start late, and a task lives only a few seconds.
    while _sh("squeue", "-h", "-j", victim, "-o", "%T").stdout.strip() != "RUNNING":
        assert time.monotonic() < deadline, f"{victim} never ran: {job_states([array])}"
        time.sleep(0.05)
    assert _sh("scancel", victim).returncode == 0

    def tasks_final() -> dict[str, str]:
        states = {k: v for k, v in job_states([array]).items() if re.fullmatch(rf"{array}_\d", k)}
        return states if len(states) == 5 and set(states.values()) <= TERMINAL else {}

    deadline = time.monotonic() + 90
    while not (final := tasks_final()):
        assert time.monotonic() < deadline, job_states([array])
        time.sleep(1)
    assert final[victim] == "CANCELLED" and sum(v == "COMPLETED" for v in final.values()) == 4, final
    on_disk = {int(p.stem.split("-")[1]) for p in (cfg.run_dir / "cubes").glob("shard-*.h5")}
    assert on_disk == {0, 2, 3, 4}

    # The index job waits on a dependency that can never be met; resubmitting cancels it and redoes shard 1 only.
    index_job = jobs["job_id"].iloc[1]
    deadline = time.monotonic() + 30
    while "DependencyNeverSatisfied" not in _sh("squeue", "-h", "-j", index_job, "-o", "%r").stdout:
        assert time.monotonic() < deadline, _sh("squeue", "-h", "-j", index_job, "-o", "%T %r").stdout
        time.sleep(0.5)
    again = submit_pipeline(cfg, profile, until="index")
    assert list(again["stage"]) == ["extract", "index"]
    assert (again["items"].iloc[0], again["array_range"].iloc[0]) == ("1", "0-0")
    wait_all(cfg.run_dir, again, timeout=90)
    assert stage_state(jobs["job_id"].iloc[1], job_states([jobs["job_id"].iloc[1]])) == {"CANCELLED": 1}
    assert (cfg.run_dir / "cubes" / "index.json").is_file()
    assert read_jobs(RunDir(cfg.run_dir))["submission"].astype(int).tolist() == [1, 1, 2, 2]


def _local_cluster() -> bool:
    conf = Path(os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf")
    return conf.is_file() and MARKER in conf.read_text()


def _cluster_up(max_array: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SYNHPC_SLURM_MAX_ARRAY_SIZE"}
    if max_array is not None:
        env["SYNHPC_SLURM_MAX_ARRAY_SIZE"] = max_array
    proc = subprocess.run(["bash", str(CLUSTER_SCRIPT), "up"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_extraction_split_below_max_array_size(slurm_cluster, base):  # noqa: F811
    if not _local_cluster():
        pytest.skip("needs slurm/cluster.sh's cluster to change MaxArraySize")
    _, args = base
    cfg = load_config(CONFIG, [*args, "run.name=split", "cubes.shard_size=32"])
    _cluster_up("4")
    try:
        assert max_array_size() == 4
        jobs = submit_pipeline(cfg, load_profile("local"), until="index")
        extract = jobs[jobs["stage"] == "extract"]
        assert [len(items.split()) for items in extract["items"]] == [4, 4, 2]
        assert extract["array_range"].tolist() == ["0-3", "0-3", "0-1"]
        assert " ".join(extract["items"]) == " ".join(map(str, range(10)))
        assert jobs["dependency"].iloc[-1] == "afterok:" + ":".join(extract["job_id"])
        wait_all(cfg.run_dir, jobs, timeout=120)
        assert (cfg.run_dir / "cubes" / "index.json").is_file()
    finally:
        _cluster_up(None)
    assert max_array_size() == 1001


@pytest.mark.parametrize("template", ["extract_array", "train_ddp", "evaluate"])
def test_sbatch_templates_parse_and_are_accepted(slurm_cluster, template, tmp_path):  # noqa: F811
    path = REPO_ROOT / "slurm" / "templates" / f"{template}.sbatch"
    assert _sh("bash", "-n", str(path)).returncode == 0
    # Command-line options override the #SBATCH placeholders (ckpt-all, GPUs, 64 GB) that the test node lacks.
    proc = subprocess.run(
        ["sbatch", "--test-only", "-p", slurm_cluster.partition, "--mem=500M", "--gpus-per-node=0", "-c", "1", "-t", "20",
         "-o", str(tmp_path / "x.out"), str(path)],
        capture_output=True, text=True, timeout=30, cwd=tmp_path, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "to start at" in proc.stderr
