"""Evaluation on a trained tiny run: tau comes from validation only and is applied unchanged to test."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pandas as pd
import pytest

from synhpc.config import load_config
from synhpc.errors import ConfigError, DataError
from synhpc.evaluation import evaluate
from synhpc.metrics import binary_metrics, choose_threshold
from synhpc.training import train


@pytest.fixture(scope="module")
def evaluated(extracted_run, tmp_path_factory):
    base, args = extracted_run
    root = tmp_path_factory.mktemp("eval")
    shutil.copytree(base / "cubes", root / "ev" / "cubes")
    for name in ("synapses.csv", "provenance.json"):
        shutil.copy(base / name, root / "ev" / name)
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
    neurons = pd.read_csv(cfg.run_dir / "neuron_predictions.csv")
    n_test = summary[(summary["model"] == cfg.model.name) & (summary["level"] == "neuron") & (summary["split"] == "test")]["n"].iloc[0]
    assert n_test == (neurons["split"] == "test").sum()
    for name in ("confusion_matrix.png", "tau_sweep.png", "roc.png", "accuracy_vs_synapses.png", "training_curves.png", "accuracy_vs_synapses.csv", "model.json"):
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


def test_corrupt_or_replaced_model_is_one_line_error(evaluated, tmp_path):
    cfg = copy.deepcopy(evaluated[0])
    shutil.copy(cfg.run_dir / "model.json", tmp_path / "model.json")
    (tmp_path / "best.pt").write_bytes(b"not a checkpoint")
    cfg.evaluate.checkpoint = str(tmp_path)
    with pytest.raises(DataError, match=r"best.pt: does not match the sha256 in its model card"):
        evaluate(cfg)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(DataError, match=r"model.json: unreadable model card"):
        evaluate(cfg)
    cfg.evaluate.checkpoint = str(tmp_path / "elsewhere")
    with pytest.raises(DataError, match=r"elsewhere: no model card"):
        evaluate(cfg)


def test_model_loads_from_card_and_weights_alone(evaluated, tmp_path):
    """A copied model folder scores the run without the training config: another recipe cannot break it."""
    cfg, summary = evaluated
    for name in ("model.json", "best.pt"):
        shutil.copy(cfg.run_dir / name, tmp_path / name)
    other = copy.deepcopy(cfg)
    other.evaluate.checkpoint = str(tmp_path)
    other.train.lr, other.augment.elastic_p, other.model.width = 0.5, 0.7, 99  # none of this reaches inference
    pd.testing.assert_frame_equal(evaluate(other), summary)


def test_card_from_another_cube_shape_is_refused(evaluated, tmp_path):
    import json

    cfg = copy.deepcopy(evaluated[0])
    card = json.loads((cfg.run_dir / "model.json").read_text())
    card["input"]["cube_shape_zyx"] = [16, 48, 48]
    (tmp_path / "model.json").write_text(json.dumps(card))
    shutil.copy(cfg.run_dir / "best.pt", tmp_path / "best.pt")
    cfg.evaluate.checkpoint = str(tmp_path)
    with pytest.raises((DataError, ConfigError), match=r"takes cubes.shape_zyx \[16, 48, 48\], this config cuts \[8, 24, 24\]|do not fit"):
        evaluate(cfg)
