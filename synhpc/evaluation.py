"""Evaluation: the threshold is chosen on validation and applied unchanged to test, at synapse and neuron level,
with 95% CIs from resampling presynaptic neurons and leak-free baselines scored the same way.

Usage::

    summary = evaluate(cfg)   # DataFrame, also written to <run>/summary.csv

Neuron level: the mean of a presynaptic neuron's synapse logits, squashed and compared with the same tau.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from synhpc.atomic import write_csv
from synhpc.baselines import connectivity_baseline, majority_baseline
from synhpc.bootstrap import neuron_bootstrap_ci, neuron_metric, synapse_metric
from synhpc.config import Config
from synhpc.datasets import SPLITS, ShardSet
from synhpc.errors import DataError
from synhpc.gather import SUMMARY
from synhpc.manifest import read_manifest
from synhpc.metrics import binary_metrics, choose_threshold, sigmoid
from synhpc.models import build_model
from synhpc.neuron_curve import accuracy_vs_synapses
from synhpc.training import BEST, TRAIN_LOG, predict_logits, training_digest

PREDICTIONS = "predictions.csv"
TAU_SWEEP = "tau_sweep.csv"
NEURON_LEVEL = "neuron_level.csv"
CI_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "mcc")
SUMMARY_COLUMNS = [
    "run", "model", "level", "split", "n", "accuracy", "balanced_accuracy", "roc_auc", "mcc", "tau",
    *[f"{m}_{end}" for m in CI_METRICS for end in ("lo", "hi")],
    "pr_auc", "precision_e", "recall_e", "f1_e", "precision_i", "recall_i", "f1_i", "tp", "fp", "tn", "fn",
]  # fmt: skip


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def load_model(cfg: Config) -> torch.nn.Module:
    """``evaluate.checkpoint`` or the run's ``best.pt``; refuses a file trained under another model/recipe."""
    path = Path(cfg.evaluate.checkpoint) if cfg.evaluate.checkpoint else cfg.run_dir / BEST
    if not path.is_file():
        raise DataError(f"{path}: no trained model; run `synhpc train` first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"{path}: not a readable synhpc checkpoint ({exc.__class__.__name__})") from None
    if state.get("digest") != training_digest(cfg):
        raise DataError(f"{path}: model was trained with a different model/training config than this one")
    model = build_model(cfg.model, cfg.cubes.shape_zyx)
    model.load_state_dict(state["model"])  # the EMA weights when training kept an average
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def neuron_level(pred: pd.DataFrame) -> pd.DataFrame:
    """One row per (split, presynaptic neuron): mean synapse logit and its label."""
    grouped = pred.groupby(["split", "pre_root_id"], sort=True)
    out = grouped.agg(label=("label", "first"), logit=("logit", "mean"), n_synapses=("logit", "size")).reset_index()
    # Means of equal logits differ in the last bits with the count averaged; that noise must not rank neurons.
    out["logit"] = out["logit"].round(9)
    out["probability"] = sigmoid(out["logit"].to_numpy())
    return out


def predict(cfg: Config, model: torch.nn.Module, data: ShardSet, splits: tuple[str, ...] = ("val", "test")) -> pd.DataFrame:
    """Per-synapse logits for ``splits`` with test-time augmentation (``evaluate.tta_views``)."""
    parts = []
    for name in splits:
        idx = data.indices(SPLITS[name])
        logits = predict_logits(model, data, idx, cfg.evaluate.batch_size, views=cfg.evaluate.tta_views)
        rows = {key: data.rows[key][idx] for key in ("synapse_id", "pre_root_id", "post_root_id")}
        parts.append(pd.DataFrame({**rows, "split": name, "label": data.rows["label"][idx].astype(int), "logit": logits.astype(np.float64)}))
    pred = pd.concat(parts, ignore_index=True)
    pred["probability"] = sigmoid(pred["logit"].to_numpy())
    return pred


def score(pred: pd.DataFrame, *, run: str, model: str, metric: str, n_boot: int, seed: int) -> tuple[pd.DataFrame, float, pd.DataFrame]:
    """Summary rows (synapse and neuron level, val and test) with tau chosen on val and neuron-resampled CIs."""
    val = pred[pred["split"] == "val"]
    tau, sweep = choose_threshold(val["label"].to_numpy(), val["probability"].to_numpy(), metric)
    rows = []
    for level, frame, metric_for in (("synapse", pred, synapse_metric), ("neuron", neuron_level(pred), neuron_metric)):
        for split in ("val", "test"):
            part = frame[frame["split"] == split]
            row = {"run": run, "model": model, "level": level, "split": split, **binary_metrics(part["label"].to_numpy(), part["probability"].to_numpy(), tau), "tau": tau}
            # Neuron-level CIs resample neurons too, so they need the synapse rows behind each neuron.
            source = pred[pred["split"] == split]
            for name in CI_METRICS:
                lo, hi = neuron_bootstrap_ci(source, metric_for(name, tau), n_boot=n_boot, seed=seed) if n_boot else (np.nan, np.nan)
                row[f"{name}_lo"], row[f"{name}_hi"] = lo, hi
            rows.append(row)
    return pd.DataFrame(rows)[SUMMARY_COLUMNS], tau, sweep


def baseline_predictions(manifest: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Majority class and the leak-free connectivity model, fitted on train rows, as val/test prediction frames."""
    train = manifest[manifest["split"] == SPLITS["train"]]
    held = manifest[manifest["split"].isin([SPLITS["val"], SPLITS["test"]])].reset_index(drop=True)
    names = {v: k for k, v in SPLITS.items()}
    out = {}
    for name, fit in (("majority", majority_baseline), ("connectivity", connectivity_baseline)):
        prob = np.asarray(fit(train, held), dtype=np.float64)
        out[name] = pd.DataFrame(
            {
                "synapse_id": held["synapse_id"],
                "pre_root_id": held["pre_root_id"],
                "split": held["split"].map(names),
                "label": held["label"].astype(int),
                "probability": prob,
                "logit": _logit(prob),
            }
        )
    return out


def evaluate(cfg: Config) -> pd.DataFrame:
    torch.set_num_threads(cfg.train.threads)
    run_dir = cfg.run_dir
    model = load_model(cfg)
    data = ShardSet(run_dir / "cubes")
    pred = predict(cfg, model, data, tuple(name for name in SPLITS if name in cfg.evaluate.splits))
    common = {"run": cfg.run.name, "metric": cfg.evaluate.threshold_metric, "n_boot": cfg.evaluate.bootstrap, "seed": cfg.run.seed}
    summary, tau, sweep = score(pred, model=cfg.model.name, **common)
    pred["prediction"] = (pred["probability"] >= tau).astype(int)
    tables = [summary]
    if cfg.evaluate.baselines:
        for name, frame in baseline_predictions(read_manifest(run_dir)).items():
            tables.append(score(frame, model=f"baseline:{name}", **common)[0])
    summary = pd.concat(tables, ignore_index=True)
    curve = accuracy_vs_synapses(pred, tau)

    write_csv(pred, run_dir / PREDICTIONS)
    write_csv(sweep, run_dir / TAU_SWEEP)
    write_csv(neuron_level(pred), run_dir / "neurons.csv")
    write_csv(curve, run_dir / NEURON_LEVEL)
    write_csv(summary, run_dir / SUMMARY)

    from synhpc import plots  # matplotlib import is slow; only evaluation pays for it

    plots.confusion_matrix(summary[summary["model"] == cfg.model.name], run_dir / "confusion_matrix.png")
    plots.threshold_sweep(sweep, tau, cfg.evaluate.threshold_metric, run_dir / "tau_sweep.png")
    plots.roc_curve(pred, run_dir / "roc.png")
    plots.accuracy_vs_synapses(curve, run_dir / "accuracy_vs_synapses.png")
    if (run_dir / TRAIN_LOG).is_file():
        plots.training_curves(pd.read_csv(run_dir / TRAIN_LOG), run_dir / "training_curves.png")
    return summary
