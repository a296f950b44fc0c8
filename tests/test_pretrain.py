"""Contrastive pretraining and its uses: NT-Xent on known inputs, crops that keep the synapse, the backbone/head split
of every zoo model, model.init and model.freeze in training, the label budget, embeddings from predict, and
pretraining killed at a checkpoint and started again ending with the weights of an uninterrupted run."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_ranks

from synhpc.config import ModelConfig, load_config
from synhpc.contrastive import centre_crops, crop_boxes, nt_xent, resize_crops
from synhpc.errors import DataError
from synhpc.models import REGISTRY, build_model
from synhpc.models.backbone import BACKBONE_FORMAT, load_backbone, split_model

ENV = os.environ | {"PYTHONUNBUFFERED": "1"}
SHAPE = (8, 24, 24)
TINY = ["cubes.shape_zyx=[8, 24, 24]", "model.width=4", "train.threads=1"]


# ------------------------------------------------------------------------------------------------------ NT-Xent


def _naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """The loss written out one anchor at a time, in float64."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / t) / den)
    return total / (2 * n)


def test_nt_xent_on_known_inputs():
    # Two orthogonal cubes, each view identical to its pair: every anchor's positive has similarity 1 and its two
    # negatives 0, so the loss is log(1 + 2 exp(-1 / t)) and every positive ranks first.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss, top1 = nt_xent(z, z.clone(), temperature=0.5, gather=False)
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(-2.0)), abs=1e-6)
    assert top1.item() == 1.0
    # Projections are compared by direction only.
    assert nt_xent(3 * z, 0.5 * z, 0.5, gather=False)[0].item() == pytest.approx(loss.item(), abs=1e-6)
    # Swapped pairs: each anchor's most similar candidate is a negative.
    assert nt_xent(z, z.flip(0), 0.5, gather=False)[1].item() == 0.0
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    assert nt_xent(a, b, 0.2, gather=False)[0].item() == pytest.approx(_naive_nt_xent(a, b, 0.2), rel=1e-5)


# ------------------------------------------------------------------------------------------------------ crops


@pytest.mark.parametrize("shape", [(16, 48, 48), (7, 9, 11), (1, 4, 5)])
def test_crop_boxes_keep_the_centre_in_their_central_half(shape):
    boxes = crop_boxes(shape, 500, torch.Generator().manual_seed(0), crop_min=0.3, crop_min_z=0.5)
    for axis, size in enumerate(shape):
        start, length = boxes[:, axis, 0], boxes[:, axis, 1]
        margin, centre = length // 4, size // 2
        assert (start >= 0).all() and (start + length <= size).all() and (length >= 1).all()
        assert (start + margin <= centre).all() and (centre <= start + length - 1 - margin).all()
    assert len(set(boxes[:, 1, 0].tolist())) > 1 or shape[1] < 8  # starts do vary


def test_full_crop_is_the_cube_and_the_synapse_stays_near_the_middle():
    gen = torch.Generator().manual_seed(1)
    cubes = torch.randint(0, 256, (3, 1, *SHAPE), generator=gen, dtype=torch.uint8)
    full = torch.tensor([[0, SHAPE[0]], [0, SHAPE[1]], [0, SHAPE[2]]]).expand(3, 3, 2)
    assert torch.equal(resize_crops(cubes, full).round().to(torch.uint8), cubes)
    # A bright voxel at the centre (where the synapse is) lands in the central half of every zoomed crop.
    marker = torch.zeros(64, 1, *SHAPE)
    marker[:, 0, SHAPE[0] // 2, SHAPE[1] // 2, SHAPE[2] // 2] = 255.0
    out = centre_crops(marker, gen, p=1.0, crop_min=0.5, crop_min_z=0.5)
    assert not torch.equal(out, marker)
    for cube in out[:, 0]:
        peak = np.unravel_index(int(cube.argmax()), SHAPE)
        assert all(n // 4 - 1 <= p <= 3 * n // 4 for p, n in zip(peak, SHAPE)), peak
    assert centre_crops(marker, gen, p=0.0, crop_min=0.5).equal(marker)


# ------------------------------------------------------------------------------------------------------ split


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_backbone_split_reproduces_the_model(name):
    torch.manual_seed(0)
    shape = tuple(max(m, s) for m, s in zip(REGISTRY[name].min_shape, SHAPE))
    model = REGISTRY[name].build(ModelConfig(name=name, width=4, dropout=0.3), shape).eval()
    split = split_model(model)
    x = torch.randn(2, 1, *shape)
    with torch.no_grad():
        features = split.backbone(x)
        assert features.shape == (2, split.dim)
        assert torch.equal(split.head(features), model(x))
    ids = lambda m: {id(p) for p in m.parameters()}  # noqa: E731
    assert ids(split.backbone).isdisjoint(ids(split.head)) and ids(split.backbone) | ids(split.head) == ids(model)
    head = [k for k in model.state_dict() if k in split.head_keys]
    assert head and all(k.endswith(("weight", "bias")) for k in head) and len(head) == 2  # one Linear


# ------------------------------------------------------------------------------------------------------ init / freeze


def _backbone_file(path: Path, seed: int = 5, name: str = "small3d") -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name=name, width=4), SHAPE)
    weights = split_model(model).backbone_state(model)
    torch.save({"format": BACKBONE_FORMAT, "format_version": 1, "model_config": {"name": name, "width": 4}, "cube_shape_zyx": list(SHAPE),
                "feature_dim": 16, "weights": weights, "pretrain_digest": "abc", "step": 7}, path)  # fmt: skip
    return weights


def _trainer(*overrides: str):
    from synhpc.distributed import DistInfo
    from synhpc.training import Trainer

    cfg = load_config(None, [*TINY, "train.warmup_steps=1", "train.lr=0.01", *overrides])
    return cfg, Trainer(cfg, n_pos=8, n_neg=8, per_epoch=3, info=DistInfo(0, 1, 0, torch.device("cpu")))


def _steps(trainer, n: int = 3) -> None:
    gen = torch.Generator().manual_seed(2)
    trainer.model.train()
    for _ in range(n):
        trainer.train_step(torch.randint(0, 256, (8, 1, *SHAPE), generator=gen, dtype=torch.uint8), (torch.arange(8) % 2).float())


def test_init_loads_the_backbone_keeps_a_fresh_head_and_is_recorded(tmp_path):
    from synhpc.modelcard import card_from_training
    from synhpc.shards import file_sha256
    from synhpc.training import training_digest

    weights = _backbone_file(tmp_path / "backbone.pt")
    cfg, trainer = _trainer(f"model.init={tmp_path}")
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    _, plain = _trainer()
    head = split_model(plain.model).head_keys
    assert all(torch.equal(state[k], plain.model.state_dict()[k]) for k in head)  # the head is built as without init
    record = trainer.card_extra["pretraining"]
    assert record["sha256"] == file_sha256(tmp_path / "backbone.pt") and record["path"] == str((tmp_path / "backbone.pt").resolve())
    assert record["pretrain_digest"] == "abc" and record["freeze"] is False
    assert trainer.digest != plain.digest and plain.digest == training_digest(load_config(None, [*TINY, "train.warmup_steps=1", "train.lr=0.01"]))
    card = card_from_training(cfg, epoch=0, step=3, training_digest=trainer.digest, weights_sha256="x", provenance={}, counts={}, validation={}, ema=True,
                              extra=trainer.card_extra)  # fmt: skip
    assert card["pretraining"]["sha256"] == record["sha256"] and card["training"]["init"] == str(tmp_path)
    _steps(trainer)  # fine-tuning: the backbone moves
    assert not all(torch.equal(trainer.model.state_dict()[k], v) for k, v in weights.items())


def test_freeze_really_freezes_the_backbone(tmp_path):
    weights = _backbone_file(tmp_path / "backbone.pt")
    _, trainer = _trainer(f"model.init={tmp_path / 'backbone.pt'}", "model.freeze=true")
    head_before = {k: v.clone() for k, v in trainer.model.state_dict().items() if k not in weights}
    _steps(trainer)
    state = trainer.model.state_dict()
    for key, value in weights.items():  # parameters and BatchNorm statistics alike
        assert torch.equal(state[key], value), key
    assert any(not torch.equal(state[k], v) for k, v in head_before.items())


def test_init_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match="model.init: .*nowhere not found"):
        load_backbone(build_model(ModelConfig(width=4), SHAPE), tmp_path / "nowhere", expect="small3d")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no backbone.pt"):
        load_backbone(build_model(ModelConfig(width=4), SHAPE), tmp_path / "empty", expect="small3d")
    _backbone_file(tmp_path / "backbone.pt")
    with pytest.raises(DataError, match="holds a small3d backbone, but model.name is unet3d"):
        load_backbone(build_model(ModelConfig(name="unet3d", width=4), SHAPE), tmp_path, expect="unet3d")
    with pytest.raises(DataError, match="does not fit this small3d model .*check model.width") as err:
        load_backbone(build_model(ModelConfig(width=8), SHAPE), tmp_path, expect="small3d")
    assert "\n" not in str(err.value)
    with pytest.raises(Exception, match="model.freeze needs model.init"):
        load_config(None, ["model.freeze=true"])


# ------------------------------------------------------------------------------------------------------ label budget


def test_label_budget_is_per_class_nested_and_never_empty():
    from synhpc.label_budget import neuron_subset, neurons_kept

    roots = np.repeat(np.arange(30), 3)
    labels = (roots < 10).astype(int)  # 10 excitatory, 20 inhibitory neurons
    kept = {}
    for fraction in (0.05, 0.1, 0.25, 0.5, 1.0):
        mask = neuron_subset(roots, labels, fraction, seed=4)
        chosen = set(roots[mask])
        kept[fraction] = chosen
        assert len({r for r in chosen if r < 10}) == neurons_kept(10, fraction) >= 1
        assert len({r for r in chosen if r >= 10}) == neurons_kept(20, fraction)
        assert all(mask[roots == r].all() for r in chosen)  # whole neurons only
    fractions = sorted(kept)
    assert all(kept[a] <= kept[b] for a, b in zip(fractions, fractions[1:]))
    assert kept[1.0] == set(range(30)) and neurons_kept(20, 0.05) == 1 and neurons_kept(10, 0.25) == 3
    assert set(roots[neuron_subset(roots, labels, 0.25, seed=5)]) != kept[0.25]


# ------------------------------------------------------------------------------------------------------ embeddings


@pytest.mark.slow
def test_predict_writes_one_embedding_per_synapse_beside_each_part(extracted_run, tmp_path):
    from slurm.launch import run_prediction
    from synhpc.datasets import ShardSet
    from synhpc.evaluation import evaluate
    from synhpc.modelcard import load_model
    from synhpc.models.backbone import embed_batches
    from synhpc.rundir import RunDir
    from synhpc.training import train

    base, args = extracted_run
    shutil.copytree(base, tmp_path / "model", ignore=shutil.ignore_patterns("jobs", "checkpoints"))
    common = [*args, f"run.root={tmp_path}", "execution.executor=debug", "evaluate.bootstrap=0", "evaluate.tta_views=8"]
    cfg = load_config("configs/demo.yaml", [*common, "run.name=model", "train.epochs=1"])
    train(cfg, progress=False)
    evaluate(cfg)
    runs = {}
    for name, embeddings in (("plain", "false"), ("embedded", "true")):
        pcfg = load_config("configs/demo.yaml", [*common, f"run.name={name}", "predict.part_size=64", f"predict.embeddings={embeddings}"])
        pcfg.predict.model = str(tmp_path / "model")
        run_prediction(pcfg, progress=False)
        runs[name] = RunDir(pcfg.run_dir)
    plain, embedded = runs["plain"], runs["embedded"]
    assert not list(plain.parts.glob("embeddings-*.parquet"))
    parts = sorted(embedded.parts.glob("part-*.parquet"))
    model, _ = load_model(tmp_path / "model")
    data = ShardSet(RunDir(tmp_path / "model"))
    where = {int(s): i for i, s in enumerate(data.rows["synapse_id"])}
    checked = 0
    for part in parts:
        number = int(part.stem.split("-")[1])
        scores, emb = pd.read_parquet(part), pd.read_parquet(embedded.part_embeddings(number))
        assert list(emb.columns) == ["id", "pre_pt_root_id", "embedding"]
        assert emb["id"].tolist() == scores["id"].tolist() and emb["pre_pt_root_id"].tolist() == scores["pre_pt_root_id"].tolist()
        matrix = np.stack(emb["embedding"].to_numpy())
        assert matrix.shape == (len(scores), split_model(model).dim) and matrix.dtype == np.float32
        # Adding embeddings changes no prediction.
        pd.testing.assert_frame_equal(scores, pd.read_parquet(plain.part(number)))
        # Labelled synapses: the embedding of the same cube read from the training shards.
        known = [i for i, s in enumerate(emb["id"]) if int(s) in where]
        cubes = torch.from_numpy(np.stack([data.cube(where[int(emb["id"][i])]) for i in known]))[:, None]
        np.testing.assert_allclose(matrix[known], embed_batches(model, [cubes], views=8), rtol=1e-5, atol=1e-5)
        checked += len(known)
    assert checked > 0


# ------------------------------------------------------------------------------------------------------ pretraining


def _pretrain_args(extracted_run, root: Path, name: str) -> list[str]:
    _, args = extracted_run
    return [*args, f"run.root={root}", f"run.name={name}", "execution.executor=debug", "pretrain.epochs=2", "pretrain.batch_size=16",
            "pretrain.checkpoint_every=2", "pretrain.monitor=64", "pretrain.warmup_steps=3", "pretrain.projection_hidden=32", "pretrain.projection_dim=16"]  # fmt: skip


# Runs pretraining in a fresh process; with KILL_AT set, the process SIGKILLs itself right after writing the
# checkpoint of that step (deterministically: no timing decides where it dies).
_RUNNER = textwrap.dedent(
    """
    import os, signal, sys
    import synhpc.pretrain as pretrain
    from synhpc.config import load_config

    kill_at = int(os.environ.get("KILL_AT", "-1"))
    original = pretrain._checkpoint

    def checkpoint(run, trainer):
        original(run, trainer)
        if trainer.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    pretrain._checkpoint = checkpoint
    result = pretrain.run_pretraining(load_config("configs/demo.yaml", sys.argv[1:]), progress=False)
    print("WEIGHTS", result["weights_sha256"], result["steps"])
    """
)


def _run(args: list[str], kill_at: int = -1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _RUNNER, *args], capture_output=True, text=True, env=ENV | {"KILL_AT": str(kill_at)})


def _final(run: Path) -> tuple[str, dict, pd.DataFrame]:
    from synhpc.pretrain import MEASURED_COLUMNS

    backbone = torch.load(run / "backbone.pt", weights_only=True)
    log = pd.read_csv(run / "pretrain_log.csv").drop(columns=MEASURED_COLUMNS)
    return (run / "backbone.pt").name, backbone["weights"], log


@pytest.mark.slow
def test_pretraining_killed_at_checkpoints_resumes_to_identical_weights(extracted_run, tmp_path):
    reference = _run(_pretrain_args(extracted_run, tmp_path, "reference"))
    assert reference.returncode == 0, reference.stderr[-2000:]
    ref_sha, total = reference.stdout.split("WEIGHTS ")[1].split()
    per_epoch = int(total) // 2
    args = _pretrain_args(extracted_run, tmp_path, "killed")
    # Killed after a mid-epoch checkpoint, then again right after the first epoch's closing checkpoint.
    assert 4 < per_epoch < int(total)  # step 4: a periodic checkpoint (every 2); per_epoch: the epoch's own
    for kill_at in (4, per_epoch):
        killed = _run(args, kill_at)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = _run(args)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-2000:]
    assert resumed.stdout.split("WEIGHTS ")[1].split() == [ref_sha, total]
    _, ref_weights, ref_log = _final(tmp_path / "reference" / "pretrain")
    _, weights, log = _final(tmp_path / "killed" / "pretrain")
    assert ref_weights.keys() == weights.keys() and all(torch.equal(ref_weights[k], weights[k]) for k in weights)
    pd.testing.assert_frame_equal(ref_log, log)
    # The pretraining cubes: every synapse of the table but the held-out neurons', unlabelled ones marked -1.
    from synhpc.rundir import RunDir

    prun = RunDir(tmp_path / "killed" / "pretrain")
    # model.init may also name a pretraining checkpoint: the newest holds the backbone.pt weights.
    from synhpc.models.backbone import read_backbone

    from_checkpoint, meta, _ = read_backbone(sorted(prun.checkpoints.glob("ckpt-*.pt"))[-1])
    assert from_checkpoint.keys() == weights.keys() and all(torch.equal(from_checkpoint[k], weights[k]) for k in weights)
    assert meta["model_config"]["name"] == "small3d" and meta["cube_shape_zyx"] == list(SHAPE)
    manifest = pd.read_csv(prun.manifest)
    assert set(manifest["split"]) == {-1} and (manifest["label"] >= -1).all()
    labelled = pd.read_csv(Path(extracted_run[0]) / "synapses.csv")
    held = set(labelled.loc[labelled["split"] > 0, "pre_root_id"])
    assert held and not held & set(manifest["pre_root_id"]) and set(labelled.loc[labelled["split"] == 0, "synapse_id"]) <= set(manifest["synapse_id"])


def _pretrain_rank(rank: int, world: int, port: int, run_dir: str, out: mp.Queue) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from synhpc.config import load_run_config
    from synhpc.pretrain import pretrain

    out.put((rank, pretrain(load_run_config(run_dir), progress=False)))


@pytest.mark.slow
def test_pretraining_on_two_gloo_ranks_keeps_them_identical(extracted_run, tmp_path):
    from synhpc.pretrain import extract_pretraining_data, pretrain_config

    cfg = load_config("configs/demo.yaml", [*_pretrain_args(extracted_run, tmp_path, "ddp"), "pretrain.batch_size=8", "pretrain.epochs=1"])
    extract_pretraining_data(cfg, progress=False)
    run_dir = str(pretrain_config(cfg).run_dir)
    results = run_ranks(_pretrain_rank, run_dir)
    assert results[0]["weights_sha256"] == results[1]["weights_sha256"]
    from synhpc.rundir import RunDir

    progress = RunDir(run_dir).read_progress()
    assert progress.world_size == 2 and progress.finished and results[0]["steps"] == progress.planned_steps
    assert (Path(run_dir) / "backbone.pt").is_file()


def test_pretrain_errors_are_one_line(extracted_run, tmp_path, capsys):
    from synhpc.cli import main

    args = _pretrain_args(extracted_run, tmp_path, "few")
    assert main(["pretrain", "-c", "configs/demo.yaml", *args, "pretrain.batch_size=100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "fewer than one global batch" in err and len(err.splitlines()) == 1
    assert main(["train", "-c", "configs/demo.yaml", *extracted_run[1], f"model.init={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.init:" in err and "not found" in err and len(err.splitlines()) == 1


@pytest.mark.slurm
@pytest.mark.slow
def test_pretraining_through_submit_matches_a_local_run(slurm_cluster, extracted_run, tmp_path):
    import time

    from slurm.profile import load_profile
    from slurm.queue import job_states
    from slurm.submit import submit_pretraining
    from synhpc.pretrain import run_pretraining
    from synhpc.rundir import RunDir

    local = load_config("configs/demo.yaml", _pretrain_args(extracted_run, tmp_path, "local"))
    reference = run_pretraining(local, progress=False)
    cfg = load_config("configs/demo.yaml", [*_pretrain_args(extracted_run, tmp_path, "submitted"), "execution.executor=slurm"])
    jobs = submit_pretraining(cfg, load_profile("local"))
    assert list(jobs["stage"]) == ["extract", "index", "pretrain"]
    assert jobs["dependency"].tolist()[1:] == [f"afterok:{j}" for j in jobs["job_id"].tolist()[:-1]]
    prun = RunDir(cfg.run_dir).pretrain
    deadline = time.monotonic() + 300
    while not (prun.pretrain_record.is_file() and set(job_states(list(jobs["job_id"])).values()) <= {"COMPLETED"}):
        states = job_states(list(jobs["job_id"]))
        assert not {s for s in states.values() if s in ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY")}, states
        assert time.monotonic() < deadline, states
        time.sleep(1)
    got = torch.load(prun.backbone, weights_only=True)["weights"]
    want = torch.load(reference["backbone"], weights_only=True)["weights"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert (prun.path / "jobs.csv").is_file()
    assert submit_pretraining(cfg, load_profile("local")).empty  # everything done: nothing to submit


def test_init_lr_scale_slows_only_the_backbone(tmp_path):
    _backbone_file(tmp_path / "backbone.pt")
    _, trainer = _trainer(f"model.init={tmp_path}", "model.init_lr_scale=0.1")
    head, backbone = trainer.optimizer.param_groups
    _steps(trainer, 1)
    assert backbone["lr"] == pytest.approx(0.1 * head["lr"]) and head["lr"] > 0 and "lr_scale" not in head
    assert {id(p) for p in head["params"]} == {id(p) for p in split_model(trainer.model).head.parameters()}
    _, plain = _trainer()
    assert len(plain.optimizer.param_groups) == 1  # no model.init: the optimizer is the one it always was


def test_where_training_starts_from_never_changes_the_pretraining():
    """model.init, freeze and init_lr_scale steer fine-tuning; a pretraining (its digest, resume and backbone record)
    must not depend on them, or a label sweep with another init_lr_scale would refuse the backbone it just made."""
    from synhpc.pretrain import pretrain_digest

    base = load_config("configs/demo.yaml")
    start = load_config("configs/demo.yaml", ["model.init_lr_scale=0.1", "model.freeze=true", "model.init=elsewhere"])
    wider = load_config("configs/demo.yaml", ["model.width=32"])
    assert pretrain_digest(start, "data") == pretrain_digest(base, "data") != pretrain_digest(wider, "data")
