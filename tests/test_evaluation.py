"""Evaluation on a trained tiny run: tau comes from validation only and is applied unchanged to test."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pandas as pd
import pytest

from synhpc.config import load_config
from synhpc.errors import DataError
from synhpc.evaluation import evaluate
from synhpc.metrics import binary_metrics, choose_threshold
from synhpc.training import train


@pytest.fixture(scope="module")
def evaluated(extracted_run, tmp_path_factory):
    base, args = extracted_run
    root = tmp_path_factory.mktemp("eval")
    shutil.copytree(base / "cubes", root / "ev" / "cubes")
    shutil.copy(base / "synapses.csv", root / "ev" / "synapses.csv")
    cfg = load_config("configs/demo.yaml", [*args, f"run.root={root}", "run.name=ev", "train.epochs=1", "evaluate.bootstrap=200"])
    train(cfg, progress=False)
    return cfg, evaluate(cfg)


def test_threshold_chosen_on_validation_and_applied_to_test(evaluated):
    cfg, summary = evaluated
    pred = pd.read_csv(cfg.run_dir / "predictions.csv")
    val, test = pred[pred["split"] == "val"], pred[pred["split"] == "test"]
    tau, _ = choose_threshold(val["label"].to_numpy(), val["probability"].to_numpy(), "balanced_accuracy")
    mine = summary[summary["model"] == cfg.model.name]
    assert mine["tau"].nunique() == 1  # one tau for val and test, synapse and neuron level
    assert mine["tau"].iloc[0] == pytest.approx(tau, abs=1e-12)  # CSV round trip of the probabilities
    row = mine[(mine["level"] == "synapse") & (mine["split"] == "test")].iloc[0]
    expected = binary_metrics(test["label"].to_numpy(), test["probability"].to_numpy(), tau)
    for key in ("n", "accuracy", "balanced_accuracy", "roc_auc", "mcc", "tp", "fp", "tn", "fn"):
        assert row[key] == pytest.approx(expected[key]), key
    assert ((test["probability"] >= tau).astype(int) == test["prediction"]).all()


def test_summary_has_levels_cis_and_baselines(evaluated):
    cfg, summary = evaluated
    assert set(summary["model"]) == {cfg.model.name, "baseline:majority", "baseline:connectivity"}
    assert set(zip(summary["level"], summary["split"])) == {(lv, s) for lv in ("synapse", "neuron") for s in ("val", "test")}
    ok = summary.dropna(subset=["balanced_accuracy_lo"])
    assert len(ok) == len(summary)
    assert (ok["balanced_accuracy_lo"] <= ok["balanced_accuracy"] + 1e-12).all() and (ok["balanced_accuracy"] <= ok["balanced_accuracy_hi"] + 1e-12).all()
    neurons = pd.read_csv(cfg.run_dir / "neurons.csv")
    n_test = summary[(summary["model"] == cfg.model.name) & (summary["level"] == "neuron") & (summary["split"] == "test")]["n"].iloc[0]
    assert n_test == (neurons["split"] == "test").sum()
    for name in ("confusion_matrix.png", "tau_sweep.png", "roc.png", "accuracy_vs_synapses.png", "training_curves.png", "neuron_level.csv"):
        assert (cfg.run_dir / name).stat().st_size > 0, name


def test_train_split_predictions_on_request(evaluated):
    cfg, summary = evaluated
    cfg = copy.deepcopy(cfg)
    cfg.evaluate.splits = ["train", "val", "test"]
    again = evaluate(cfg)
    pred = pd.read_csv(cfg.run_dir / "predictions.csv")
    assert set(pred["split"]) == {"train", "val", "test"}
    pd.testing.assert_frame_equal(again, summary)  # scoring still uses val and test only


def test_majority_baseline_is_chance(evaluated):
    _, summary = evaluated
    majority = summary[summary["model"] == "baseline:majority"]
    assert np.allclose(majority["balanced_accuracy"], 0.5)


def test_corrupt_model_file_is_one_line_error(evaluated, tmp_path):
    cfg = copy.deepcopy(evaluated[0])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    cfg.evaluate.checkpoint = str(bad)
    with pytest.raises(DataError, match="not a readable synhpc checkpoint"):
        evaluate(cfg)
