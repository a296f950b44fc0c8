"""Cluster profiles (jobs/profiles.py): loading, overrides, one-line errors, and the exact sbatch script the launcher
builds for Hyak with a container image. No SLURM needed: executors are built but never submit."""

from __future__ import annotations

import shlex

import pandas as pd
import pytest
import submitit

from slurm import queue as queue_mod
from slurm import status as status_mod
from slurm.container import container_python
from slurm.profile import available_profiles, check_submittable, load_profile, stage_parameters
from synhpc.errors import ConfigError, DataError
from synhpc.rundir import RunDir, TrainProgress

HYAK_READY = [
    "account=mylab",
    "paths.run_root=/gscratch/mylab/synhpc/logs",
    "paths.jobs=/gscratch/mylab/synhpc/jobs",
    "paths.cache=/gscratch/mylab/synhpc/cache",
    "container.image=/gscratch/mylab/containers/synhpc.sif",
]


def test_shipped_profiles_load():
    assert {"local", "hyak"} <= set(available_profiles())
    local = load_profile("local")
    assert (local.partition, local.account, local.container.image) == ("debug", "", "")
    assert local.train.gpus_per_node == 0 and 1 <= local.train.cpus_per_task <= 2 and local.train.mem_gb <= 4
    check_submittable(local)  # nothing to fill in
    hyak = load_profile("hyak")
    assert hyak.partition == "ckpt-all" and hyak.requeue and hyak.account_required
    assert hyak.train.gpus_per_node >= 1 and hyak.container.binds == ["/gscratch"]
    assert all(getattr(hyak.paths, k).startswith("/gscratch/<lab>/") for k in ("run_root", "jobs", "cache"))


def test_overrides_apply_and_are_typed():
    p = load_profile("hyak", ["account=mylab", "train.gpus_per_node=4", "train.mem_gb=96", "extract.array_parallelism=8", "container.binds=[/gscratch, /tmp]"])
    assert (p.account, p.train.gpus_per_node, p.train.mem_gb, p.extract.array_parallelism) == ("mylab", 4, 96.0, 8)
    assert p.container.binds == ["/gscratch", "/tmp"]
    with pytest.raises(ConfigError, match=r"train\.gpus_per_node must be an integer"):
        load_profile("local", ["train.gpus_per_node=many"])


@pytest.mark.parametrize("override, key", [("train.gpu=1", "train.gpu"), ("acount=x", "acount"), ("paths.scratch=/x", "paths.scratch")])
def test_unknown_key_is_one_line_error_naming_it(override, key):
    with pytest.raises(ConfigError) as err:
        load_profile("local", [override])
    message = str(err.value)
    assert f"unknown key '{key}'" in message and "\n" not in message


def test_unknown_profile_and_bad_values():
    with pytest.raises(ConfigError, match="profile 'nope' not found.*local"):
        load_profile("nope")
    with pytest.raises(ConfigError, match=r"train\.time_min must be > 10"):
        load_profile("local", ["train.time_min=5"])
    with pytest.raises(ConfigError, match="must be one of USR2, USR1, TERM"):
        load_profile("local", ["preempt_signal=KILL"])


def test_hyak_needs_account_then_lab_paths():
    with pytest.raises(ConfigError, match="account is not set") as err:
        check_submittable(load_profile("hyak"))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"paths\.run_root, paths\.jobs, paths\.cache, container\.image"):
        check_submittable(load_profile("hyak", ["account=mylab"]))
    check_submittable(load_profile("hyak", HYAK_READY))


def test_submit_with_hyak_and_no_account_fails_before_touching_anything(tmp_path):
    from slurm.submit import submit_pipeline
    from synhpc.config import load_config

    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=x"])
    with pytest.raises(ConfigError, match="account is not set"):
        submit_pipeline(cfg, load_profile("hyak"))
    assert not (tmp_path / "x").exists()


@pytest.fixture
def no_srun(monkeypatch):
    """Build SLURM executors on machines without srun (submitit refuses otherwise); nothing is submitted."""
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))


def _sbatch_lines(executor: submitit.AutoExecutor) -> list[str]:
    inner = executor._executor
    return inner._make_submission_file_text(inner._submitit_command_str, "uid").splitlines()


def test_hyak_train_job_sbatch_script_exactly(tmp_path, no_srun):
    from slurm.launch import stage_executor as make_stage_executor

    profile = load_profile("hyak", HYAK_READY)
    executor = make_stage_executor(profile, "train", tmp_path / "train", dependency="afterok:123")
    python = "apptainer exec --nv --bind /gscratch /gscratch/mylab/containers/synhpc.sif python"
    assert executor._executor.python == python == container_python("/gscratch/mylab/containers/synhpc.sif", ["/gscratch"])
    lines = _sbatch_lines(executor)
    sbatch = [line for line in lines if line.startswith("#SBATCH")]
    folder = tmp_path / "train"
    assert sbatch == [
        "#SBATCH --account=mylab",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --dependency=afterok:123",
        f"#SBATCH --error={folder}/%j_0_log.err",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --job-name=synhpc-train",
        "#SBATCH --mem=64GB",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={folder}/%j_0_log.out",
        "#SBATCH --partition=ckpt-all",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --time=1440",
        "#SBATCH --wckey=submitit",
    ]
    setup = lines[lines.index("# setup") + 1 : lines.index("# command") - 1]
    cache = "/gscratch/mylab/synhpc/cache"
    assert setup == [
        f"export XDG_CACHE_HOME={cache}",
        f"export TORCH_HOME={cache}/torch",
        f"export CLOUD_VOLUME_CACHE_DIR={cache}/cloudvolume",
        f"export MPLCONFIGDIR={cache}/matplotlib",
        "export HDF5_USE_FILE_LOCKING=FALSE",
        "export PYTHONUNBUFFERED=1",
        f"mkdir -p {cache}",
    ]
    command = lines[-1]
    assert command.startswith("srun --unbuffered --output ")
    assert command.endswith(f"{python} -u -m submitit.core._submit {folder}")
    assert "--cleanenv" not in "\n".join(lines)


def test_hyak_extract_array_has_no_nv_and_term_signal_is_exported(tmp_path, no_srun):
    from slurm.launch import stage_executor as make_stage_executor

    profile = load_profile("hyak", [*HYAK_READY, "preempt_signal=TERM", "signal_delay_s=300"])
    executor = make_stage_executor(profile, "extract", tmp_path / "extract")
    assert executor._executor.python == "apptainer exec --bind /gscratch /gscratch/mylab/containers/synhpc.sif python"
    lines = _sbatch_lines(executor)
    assert "#SBATCH --signal=TERM@300" in lines and "export SUBMITIT_PREEMPT_SIGNAL=TERM" in lines
    assert "#SBATCH --mem=16GB" in lines and "#SBATCH --cpus-per-task=4" in lines and "#SBATCH --partition=ckpt-all" in lines
    assert not any("gpus" in line for line in lines)
    assert stage_parameters(profile, "extract")["slurm_array_parallelism"] == 64


def test_local_profile_runs_the_submitting_python(tmp_path, no_srun):
    import sys

    from slurm.launch import stage_executor as make_stage_executor

    executor = make_stage_executor(load_profile("local"), "train", tmp_path / "t")
    assert executor._executor.python == shlex.quote(sys.executable)
    lines = _sbatch_lines(executor)
    assert "#SBATCH --partition=debug" in lines and "#SBATCH --requeue" in lines
    assert not any(line.startswith(("#SBATCH --account", "#SBATCH --gpus")) for line in lines)


def test_status_without_slurm_shows_disk_state(tmp_path, monkeypatch):
    monkeypatch.setattr(queue_mod.shutil, "which", lambda name: None)
    run = tmp_path / "run"
    (run / "cubes").mkdir(parents=True)
    (run / "cubes" / "shard-00000.h5").write_bytes(b"")
    pd.DataFrame({"split": [0, 0, 1], "shard": [0, 1, 1]}).to_csv(run / "synapses.csv", index=False)
    (run / "config.yaml").write_text("train: {epochs: 2, batch_size: 2}\n")
    RunDir(run).write_progress(TrainProgress(planned_steps=2, done_steps=0, steps_per_epoch=1, epochs=2, world_size=1, batch_size=2, training_digest="x", updated_at=0.0))
    pd.DataFrame([{"submission": 1, "stage": "train", "job_id": "77", "array_range": "", "items": "", "submitted_at": "t", "dependency": ""}]).to_csv(run / "jobs.csv", index=False)
    text = status_mod.status(run)
    assert "train     77         unknown" in text
    assert "shards: 1/2 on disk, index missing" in text
    assert "step 0/2" in text and "evaluation: not yet" in text
    with pytest.raises(DataError, match="missing: no such run folder"):
        status_mod.status(tmp_path / "missing")


def test_the_override_example_in_hyak_yaml_works():
    """The command in the profile's header comment is what users copy: its profile.* overrides must load and leave
    nothing to fill in."""
    import re

    from slurm.profile import PROFILE_DIR
    from slurm.submit import split_overrides

    header = "".join(line.lstrip("# ").rstrip("\\\n") + " " for line in (PROFILE_DIR / "hyak.yaml").read_text().splitlines() if line.startswith("#"))
    command = re.search(r"synhpc submit -c \S+ --profile hyak (.*?)(?:Checkpoint|$)", header).group(1).split()
    config_overrides, profile_overrides = split_overrides(command)
    assert config_overrides == [] and len(profile_overrides) >= 5
    profile = load_profile("hyak", profile_overrides)
    check_submittable(profile)
    assert profile.account == "mylab" and profile.paths.run_root == "/gscratch/mylab/synhpc/logs"
