"""Evaluation: the threshold is chosen on validation and applied unchanged to test, at synapse and neuron level.

Usage::

    summary = evaluate(cfg)   # DataFrame, also written to <run>/summary.csv

Neuron level: the mean of a presynaptic neuron's synapse logits, squashed and compared with the same tau.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from synhpc.config import Config
from synhpc.datasets import SPLITS, ShardSet
from synhpc.errors import DataError
from synhpc.metrics import binary_metrics, choose_threshold
from synhpc.models import build_model
from synhpc.training import BEST, TRAIN_LOG, predict_logits, training_digest

SUMMARY = "summary.csv"
PREDICTIONS = "predictions.csv"
TAU_SWEEP = "tau_sweep.csv"
SUMMARY_COLUMNS = ["run", "model", "level", "split", "n", "accuracy", "balanced_accuracy", "roc_auc", "mcc", "tau", "tp", "fp", "tn", "fn"]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def load_best(cfg: Config) -> torch.nn.Module:
    path = cfg.run_dir / BEST
    if not path.is_file():
        raise DataError(f"{path}: no trained model; run `synhpc train` first")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("digest") != training_digest(cfg):
        raise DataError(f"{path}: model was trained with a different model/training config than this one")
    model = build_model(cfg.model, cfg.cubes.shape_zyx)
    model.load_state_dict(state["model"])
    return model


def neuron_level(pred: pd.DataFrame) -> pd.DataFrame:
    """One row per (split, presynaptic neuron): mean synapse logit and its label."""
    grouped = pred.groupby(["split", "pre_root_id"], sort=True)
    out = grouped.agg(label=("label", "first"), logit=("logit", "mean"), n_synapses=("logit", "size")).reset_index()
    out["probability"] = _sigmoid(out["logit"].to_numpy())
    return out


def evaluate(cfg: Config) -> pd.DataFrame:
    torch.set_num_threads(cfg.train.threads)
    run_dir = cfg.run_dir
    model = load_best(cfg)
    data = ShardSet(run_dir / "cubes")
    parts = []
    for name in ("val", "test"):
        idx = data.indices(SPLITS[name])
        logits = predict_logits(model, data, idx, cfg.evaluate.batch_size)
        parts.append(
            pd.DataFrame(
                {
                    "synapse_id": data.rows["synapse_id"][idx],
                    "pre_root_id": data.rows["pre_root_id"][idx],
                    "post_root_id": data.rows["post_root_id"][idx],
                    "split": name,
                    "label": data.rows["label"][idx].astype(int),
                    "logit": logits.astype(np.float64),
                }
            )
        )
    pred = pd.concat(parts, ignore_index=True)
    pred["probability"] = _sigmoid(pred["logit"].to_numpy())
    val = pred[pred["split"] == "val"]
    tau, sweep = choose_threshold(val["label"].to_numpy(), val["probability"].to_numpy(), cfg.evaluate.threshold_metric)
    pred["prediction"] = (pred["probability"] >= tau).astype(int)
    neurons = neuron_level(pred)

    rows = []
    for level, frame in (("synapse", pred), ("neuron", neurons)):
        for split in ("val", "test"):
            part = frame[frame["split"] == split]
            metrics = binary_metrics(part["label"].to_numpy(), part["probability"].to_numpy(), tau)
            rows.append({"run": cfg.run.name, "model": cfg.model.name, "level": level, "split": split, **metrics, "tau": tau})
    summary = pd.DataFrame(rows)[SUMMARY_COLUMNS]
    _write_csv(pred, run_dir / PREDICTIONS)
    _write_csv(sweep, run_dir / TAU_SWEEP)
    _write_csv(neurons, run_dir / "neurons.csv")
    _write_csv(summary, run_dir / SUMMARY)

    from synhpc import plots  # matplotlib import is slow; only evaluation pays for it

    plots.confusion_matrix(summary, run_dir / "confusion_matrix.png")
    plots.threshold_sweep(sweep, tau, cfg.evaluate.threshold_metric, run_dir / "tau_sweep.png")
    if (run_dir / TRAIN_LOG).is_file():
        plots.training_curves(pd.read_csv(run_dir / TRAIN_LOG), run_dir / "training_curves.png")
    return summary
