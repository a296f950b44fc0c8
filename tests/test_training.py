"""Training resumes after SIGKILL with exactly the result of an uninterrupted run."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from synhpc.checkpoint import checkpoints, load_latest, save_checkpoint
from synhpc.config import load_config
from synhpc.training import MEASURED_COLUMNS

ENV = os.environ | {"PYTHONUNBUFFERED": "1"}


def stage(stage_name: str, args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "synhpc", stage_name, "-c", "configs/demo.yaml", *args], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, f"synhpc {stage_name} failed: {proc.stderr.strip().splitlines()[-1:]}"
    return proc


def clone_run(base: Path, name: str) -> Path:
    """A new run that shares the base run's extracted cubes and manifest."""
    target = base.parent / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    shutil.copytree(base / "cubes", target / "cubes")
    for name in ("synapses.csv", "provenance.json"):
        shutil.copy(base / name, target / name)
    return target


def final_state(run: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    best = torch.load(run / "best.pt", weights_only=True)
    summary = pd.read_csv(run / "summary.csv").drop(columns=["run"])
    log = pd.read_csv(run / "train_log.csv").drop(columns=MEASURED_COLUMNS)
    return best, summary, log


def assert_same_result(a: Path, b: Path) -> None:
    best_a, summary_a, log_a = final_state(a)
    best_b, summary_b, log_b = final_state(b)
    assert best_a["step"] == best_b["step"]
    for key, tensor in best_a["model"].items():
        assert torch.equal(tensor, best_b["model"][key]), key
    pd.testing.assert_frame_equal(summary_a, summary_b)
    pd.testing.assert_frame_equal(log_a, log_b)


@pytest.fixture(scope="module")
def reference_run(extracted_run) -> tuple[Path, int]:
    base, args = extracted_run
    reference = clone_run(base, "reference")
    ref_args = [*args, "run.name=reference"]
    stage("train", ref_args)
    stage("evaluate", ref_args)
    return reference, int(pd.read_csv(reference / "train_log.csv")["step"].iloc[-1])


@pytest.mark.slow
@pytest.mark.parametrize("sig, trials", [(signal.SIGKILL, 2), (signal.SIGTERM, 1), (signal.SIGUSR2, 1)], ids=["KILL", "TERM", "USR2"])
def test_stop_anywhere_then_restart_matches_uninterrupted(extracted_run, reference_run, sig, trials):
    base, args = extracted_run
    reference, total = reference_run
    rng = random.Random()
    for trial in range(trials):
        name = f"stopped-{sig.name}-{trial}"
        killed = clone_run(base, name)
        run_args = [*args, f"run.name={name}"]
        # A checkpoint in the first half: the other half of the run is still ahead when the signal is sent, so it
        # lands in a running process however loaded the machine is.
        target = rng.randrange(3, total // 2)
        proc = subprocess.Popen([sys.executable, "-m", "synhpc", "train", "-c", "configs/demo.yaml", *run_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            done = [int(p.stem.split("-")[1]) for p in checkpoints(killed / "checkpoints")]
            if done and max(done) >= target:
                break
            time.sleep(0.01)
        time.sleep(rng.random() * 0.05)  # land somewhere inside a step, not just after a checkpoint
        proc.send_signal(sig)
        proc.wait()
        # SIGKILL kills outright; TERM/USR2 finish the step, checkpoint and exit with 128 + signal.
        assert proc.returncode in (-sig, 128 + sig), f"training ended with {proc.returncode} before the signal; slow the run down"
        resumed = stage("train", run_args)
        assert "resuming from" in resumed.stdout
        stage("evaluate", run_args)
        assert_same_result(reference, killed)


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    save_checkpoint(tmp_path, 3, {"step": 3})
    save_checkpoint(tmp_path, 6, {"step": 6})
    (tmp_path / "ckpt-00000006.pt").write_bytes(b"truncated")
    state, path = load_latest(tmp_path)
    assert state == {"step": 3} and path.name == "ckpt-00000003.pt"
    assert "ckpt-00000006.pt is unreadable" in caplog.text


def test_checkpoint_rotation_keeps_newest_two(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"step": step})
    assert [p.name for p in checkpoints(tmp_path)] == ["ckpt-00000004.pt", "ckpt-00000003.pt"]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.name=resnet3000", "model.name: unknown model 'resnet3000' (known: "),
        ("cubes.shape_zyx=[2, 8, 8]", "cubes.shape_zyx [2, 8, 8] is too small for model small3d"),
    ],
)
def test_bad_model_settings_are_one_line_errors(extracted_run, override, message):
    _, args = extracted_run
    proc = subprocess.run([sys.executable, "-m", "synhpc", "train", "-c", "configs/demo.yaml", *args, "run.name=bad", override], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    run_root = next(a.split("=", 1)[1] for a in args if a.startswith("run.root="))
    assert not (Path(run_root) / "bad").exists()


def test_edited_shard_is_refused_before_training(extracted_run, tmp_path):
    """Moving every training synapse into validation inside a shard (labels and splits are what decide what a model
    learns from) is caught by the shard checks, before any checkpoint exists."""
    import h5py

    from synhpc.errors import DataError
    from synhpc.training import train

    base, args = extracted_run
    run = clone_run(base, "edited")
    for shard in (run / "cubes").glob("shard-*.h5"):
        with h5py.File(shard, "r+") as f:
            f["split"][...] = np.where(f["split"][...] == 0, 1, f["split"][...])
    cfg = load_config("configs/demo.yaml", [*args, f"run.root={run.parent}", "run.name=edited"])
    with pytest.raises(DataError, match=r"shard-00000.h5: content does not match its sha256 in index.json"):
        train(cfg, progress=False)
    assert not (run / "checkpoints").exists()
