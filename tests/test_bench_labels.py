"""`synhpc bench labels`: the label-efficiency sweep trains from scratch and from the pretrained backbone on neuron
budgets, evaluates on the fixed test split and writes its CSV, JSON and plot; a second call reads the runs back."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from synhpc.config import load_config
from synhpc.label_budget import neurons_kept


@pytest.mark.slow
def test_label_sweep_writes_curve_and_resumes(extracted_run, tmp_path):
    from synhpc.bench_labels import COLUMNS, bench_labels
    from synhpc.rundir import RunDir

    source, args = extracted_run
    base = tmp_path / "logs" / "labelled"
    shutil.copytree(source, base, ignore=shutil.ignore_patterns("jobs", "checkpoints", "bench", "pretrain"))
    cfg = load_config("configs/demo.yaml", [
        *args, f"run.root={base.parent}", f"run.name={base.name}", "train.epochs=1", "evaluate.bootstrap=20", "evaluate.tta_views=1",
        "pretrain.epochs=1", "pretrain.batch_size=16", "pretrain.monitor=0", "labels.fractions=[0.25, 1.0]", "labels.arms=[scratch, finetune, probe]",
    ])  # fmt: skip
    out = tmp_path / "bench"
    frame = bench_labels(cfg, out)
    assert list(frame.columns) == COLUMNS
    assert len(frame) == 2 * 3 * 2  # fractions x arms x (synapse, neuron)
    assert set(frame["level"]) == {"synapse", "neuron"}
    manifest = pd.read_csv(RunDir(base).manifest)
    train = manifest[manifest["split"] == 0]
    per_class = {c: train.loc[train["label"] == c, "pre_root_id"].nunique() for c in (0, 1)}
    quarter = frame[frame["fraction"] == 0.25]
    assert (quarter["train_neurons_e"] == neurons_kept(per_class[1], 0.25)).all()
    assert (quarter["train_neurons_i"] == neurons_kept(per_class[0], 0.25)).all()
    full = frame[frame["fraction"] == 1.0]
    assert (full["train_synapses"] == len(train)).all() and (quarter["train_synapses"] < len(train)).all()
    # Equal steps: a quarter of the neurons trains for more epochs.
    assert (quarter["epochs"] > 1).all() and (full["epochs"] == 1).all()
    # Every arm is scored on the same test synapses and neurons.
    assert frame.groupby("level")["n"].nunique().eq(1).all()
    ok = frame[["balanced_accuracy", "roc_auc", "balanced_accuracy_lo", "balanced_accuracy_hi"]].to_numpy()
    assert np.isfinite(ok).all() and ((ok >= 0) & (ok <= 1)).all()
    assert (frame["balanced_accuracy_lo"] <= frame["balanced_accuracy"] + 1e-12).all()
    info = json.loads((out / "bench_labels.json").read_text())
    assert info["pretraining"]["sha256"] and info["goal"] == {}  # no 10% point in this sweep
    assert (out / "bench_labels.png").stat().st_size > 0 and (out / "bench_labels.csv").is_file()
    # The pretrained arms trained from the run's backbone, recorded in their model cards.
    sweep = RunDir(base).label_sweep
    card = {name.rsplit("-", 1)[0]: json.loads((sweep / name / "model.json").read_text()) for name in frame["run"]}
    assert card["finetune-f0250-r0"]["pretraining"]["sha256"] == info["pretraining"]["sha256"] and card["finetune-f0250-r0"]["pretraining"]["freeze"] is False
    assert card["finetune-f0250-r0"]["label_budget"]["fraction"] == 0.25 and card["probe-f0250-r0"]["pretraining"]["freeze"] is True
    assert "label_budget" not in card["scratch-f1000-r0"] and "pretraining" not in card["scratch-f1000-r0"]
    # Run folders carry their training digest: the one in the model card.
    assert all(name.endswith(card[name.rsplit("-", 1)[0]]["training"]["training_digest"][:8]) for name in frame["run"])
    # A second call trains nothing and reads the same numbers back.
    before = {p: p.stat().st_mtime_ns for p in sweep.glob("*/best.pt")}
    again = bench_labels(cfg, out)
    assert {p: p.stat().st_mtime_ns for p in sweep.glob("*/best.pt")} == before
    pd.testing.assert_frame_equal(again.drop(columns="seconds"), frame.drop(columns="seconds"))
