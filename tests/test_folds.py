"""k-fold cross-validation by neuron: every fold is a full run, every neuron is tested in exactly one fold, and the
gathered summary carries each cross-validation's spread over its folds."""

from __future__ import annotations

import pandas as pd
import pytest

from synhpc.cli import main
from synhpc.config import load_config
from synhpc.errors import ConfigError
from synhpc.folds import fold_configs


def test_three_fold_cross_validation(extracted_run, tmp_path, capsys):
    _, args = extracted_run
    run_args = [*args, f"run.root={tmp_path}", "run.name=cv", "split.folds=3", "split.tolerance=0.15", "train.epochs=1", "evaluate.bootstrap=0", "evaluate.inspect=0"]
    assert main(["cv", "-c", "configs/demo.yaml", *run_args]) == 0
    tested = []
    for fold in range(3):
        manifest = pd.read_csv(tmp_path / f"cv-fold{fold}" / "synapses.csv")
        assert (manifest.groupby("pre_root_id")["split"].nunique() == 1).all()
        tested.append(set(manifest.loc[manifest["split"] == 2, "pre_root_id"]))
        if fold:  # validation of fold f is the test fold of f + 1
            previous = pd.read_csv(tmp_path / f"cv-fold{fold - 1}" / "synapses.csv")
            assert set(previous.loc[previous["split"] == 1, "pre_root_id"]) == tested[fold]
    assert not (tested[0] & tested[1]) and not (tested[1] & tested[2]) and not (tested[0] & tested[2])
    everyone = set(pd.read_csv(tmp_path / "cv-fold0" / "synapses.csv")["pre_root_id"])
    assert set().union(*tested) == everyone
    gathered = pd.read_csv(tmp_path / "summary.csv")
    cv = pd.read_csv(tmp_path / "summary_cv.csv")
    row = cv[(cv["cv"] == "cv") & (cv["model"] == "small3d") & (cv["level"] == "synapse") & (cv["split"] == "test")].iloc[0]
    per_fold = gathered[(gathered["model"] == "small3d") & (gathered["level"] == "synapse") & (gathered["split"] == "test")]
    assert row["folds"] == 3 and sorted(per_fold["split_fold"]) == [0, 1, 2]
    assert row["balanced_accuracy_mean"] == pytest.approx(per_fold["balanced_accuracy"].mean())
    assert row["balanced_accuracy_sd"] == pytest.approx(per_fold["balanced_accuracy"].std())
    assert "cv: 3 folds" in capsys.readouterr().out


def test_fold_settings_are_checked():
    with pytest.raises(ConfigError, match="split.folds must be >= 3"):
        fold_configs(load_config("configs/demo.yaml"))
    with pytest.raises(ConfigError, match="already names a fold"):
        fold_configs(load_config("configs/demo.yaml", ["split.folds=5", "run.name=x-fold2"]))
    with pytest.raises(ConfigError, match=r"split.fold must lie in \[0, split.folds\)"):
        load_config("configs/demo.yaml", ["split.folds=5", "split.fold=5"])
