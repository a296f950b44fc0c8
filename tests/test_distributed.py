"""Data-parallel training: two gloo ranks on CPU end with bit-identical weights, and only rank 0 writes."""

from __future__ import annotations

import multiprocessing as mp
import shutil

import pytest
from conftest import run_ranks

from synhpc.config import load_config


def _rank(rank: int, world: int, port: int, args: list[str], out: mp.Queue) -> None:
    import os

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from synhpc.training import train

    cfg = load_config("configs/demo.yaml", args)
    out.put((rank, train(cfg, progress=False)))


@pytest.mark.slow
def test_two_gloo_ranks_hold_identical_weights(extracted_run, tmp_path):
    base, args = extracted_run
    run = tmp_path / "ddp"
    run.mkdir()
    for name in ("cubes", "synapses.csv", "provenance.json", "config.yaml"):
        (shutil.copytree if (base / name).is_dir() else shutil.copy)(base / name, run / name)
    args = [*args, f"run.root={tmp_path}", "run.name=ddp", "train.epochs=2", "train.sampler=balanced"]
    results = run_ranks(_rank, args)
    assert results[0]["weights_sha256"] == results[1]["weights_sha256"]
    single = load_config("configs/demo.yaml", args)
    assert results[0]["steps"] == results[1]["steps"]
    # Each rank takes half of every global batch: half the steps of one process over the same data.
    from synhpc.datasets import SPLITS, ShardSet
    from synhpc.rundir import RunDir

    n_train = len(ShardSet(RunDir(run)).indices(SPLITS["train"]))
    per_epoch = -(-n_train // (single.train.batch_size * 2))
    assert results[0]["steps"] == per_epoch * single.train.epochs
    assert (run / "best.pt").is_file() and len(list((run / "checkpoints").glob("ckpt-*.pt"))) >= 1

    # What status and submit read: the progress record knows the world size, so the 2-rank run counts as finished
    # (a single process would have planned twice the steps).
    from slurm.status import status, training_state

    state = training_state(RunDir(run))
    assert (state.progress.world_size, state.progress.planned_steps, state.progress.done_steps) == (2, per_epoch * single.train.epochs, results[0]["steps"])
    assert state.done
    assert f"step {results[0]['steps']}/{results[0]['steps']} on 2 rank(s)" in status(run) and ", done" in status(run)
