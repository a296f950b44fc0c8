"""Evaluation: the threshold and the calibration temperature are chosen on validation and applied unchanged to test,
at synapse and neuron level, with 95% CIs from resampling presynaptic neurons and leak-free baselines scored the same
way.

Usage::

    summary = evaluate(cfg)   # DataFrame, also written to <run>/summary.csv

The model comes from the run's model card and weights alone (``model.json`` + ``best.pt``, or
``evaluate.checkpoint``), never from the training config; evaluating the run's own model writes tau, the temperature
and the validation metrics back into its card, which is what ``synhpc predict`` uses. Neuron level: the mean of a
presynaptic neuron's synapse logits, squashed and compared with the same tau.

Calibration: one temperature T (``synhpc.calibration.fit_temperature``) fitted on the validation synapses' logits;
probabilities become ``sigmoid(logit / T)``. Decisions keep using the uncalibrated probability against tau (the same
decisions: T only rescales logits). Brier score and expected calibration error (15 equal-width bins on
P(excitatory), weighted by bin counts) are reported before and after, at synapse level.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from synhpc.atomic import write_csv
from synhpc.baselines import connectivity_baseline, majority_baseline, target_baseline
from synhpc.bootstrap import neuron_bootstrap_ci, neuron_metric, synapse_metric
from synhpc.calibration import apply_temperature, brier_score, expected_calibration_error, fit_temperature, nll
from synhpc.config import Config
from synhpc.datasets import ShardSet
from synhpc.gather import CALIBRATION_COLUMNS, CI_METRICS, SUMMARY_COLUMNS, run_columns
from synhpc.inference import predict_rows
from synhpc.manifest import read_manifest, read_provenance
from synhpc.metrics import binary_metrics, choose_threshold, sigmoid
from synhpc.modelcard import check_compatible, load_model, write_card
from synhpc.neuron_curve import accuracy_vs_synapses
from synhpc.rundir import RunDir
from synhpc.splits import SPLITS

ECE_BINS = 15


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def neuron_level(pred: pd.DataFrame) -> pd.DataFrame:
    """One row per (split, presynaptic neuron): mean synapse logit and its label."""
    grouped = pred.groupby(["split", "pre_root_id"], sort=True)
    out = grouped.agg(label=("label", "first"), logit=("logit", "mean"), n_synapses=("logit", "size")).reset_index()
    # Means of equal logits differ in the last bits with the count averaged; that noise must not rank neurons.
    out["logit"] = out["logit"].round(9)
    out["probability"] = sigmoid(out["logit"].to_numpy())
    return out


def predict_splits(cfg: Config, model: torch.nn.Module, data: ShardSet, splits: tuple[str, ...] = ("val", "test")) -> pd.DataFrame:
    """Per-synapse logits for ``splits`` with test-time augmentation (``evaluate.tta_views``)."""
    parts = []
    for name in splits:
        idx = data.indices(SPLITS[name])
        logits = predict_rows(model, data, idx, cfg.evaluate.batch_size, views=cfg.evaluate.tta_views)
        rows = {key: data.rows[key][idx] for key in ("synapse_id", "pre_root_id", "post_root_id")}
        parts.append(pd.DataFrame({**rows, "split": name, "label": data.rows["label"][idx].astype(int), "logit": logits.astype(np.float64)}))
    pred = pd.concat(parts, ignore_index=True)
    pred["probability"] = sigmoid(pred["logit"].to_numpy())
    return pred


def calibration(pred: pd.DataFrame) -> tuple[float, dict[str, dict[str, float]]]:
    """The temperature fitted on validation synapses, and per split the calibration scores before and after it."""
    val = pred[pred["split"] == "val"]
    temperature = fit_temperature(val["logit"].to_numpy(), val["label"].to_numpy())
    scores = {}
    for split, part in pred.groupby("split"):
        y, z = part["label"].to_numpy(), part["logit"].to_numpy()
        after = apply_temperature(z, temperature)
        scores[split] = {
            "temperature": temperature,
            "nll_before": nll(y, z), "nll_after": nll(y, after),
            "brier_before": brier_score(y, sigmoid(z)), "brier_after": brier_score(y, sigmoid(after)),
            "ece_before": expected_calibration_error(y, sigmoid(z), ECE_BINS)[0],
            "ece_after": expected_calibration_error(y, sigmoid(after), ECE_BINS)[0],
        }  # fmt: skip
    return temperature, scores


def score(pred: pd.DataFrame, *, run: str, model: str, metric: str, n_boot: int, seed: int) -> tuple[pd.DataFrame, float, pd.DataFrame, float]:
    """Summary rows (synapse and neuron level, val and test) with tau and the temperature chosen on val and
    neuron-resampled CIs; returns (rows, tau, sweep, temperature)."""
    val = pred[pred["split"] == "val"]
    tau, sweep = choose_threshold(val["label"].to_numpy(), val["probability"].to_numpy(), metric)
    temperature, calibrated = calibration(pred)
    rows = []
    for level, frame, metric_for in (("synapse", pred, synapse_metric), ("neuron", neuron_level(pred), neuron_metric)):
        for split in ("val", "test"):
            part = frame[frame["split"] == split]
            metrics = binary_metrics(part["label"].to_numpy(), part["probability"].to_numpy(), tau)
            row: dict[str, Any] = {"run": run, "model": model, "level": level, "split": split, **metrics, "tau": tau}
            # Neuron-level CIs resample neurons too, so they need the synapse rows behind each neuron.
            source = pred[pred["split"] == split]
            for name in CI_METRICS:
                lo, hi = neuron_bootstrap_ci(source, metric_for(name, tau), n_boot=n_boot, seed=seed) if n_boot else (np.nan, np.nan)
                row[f"{name}_lo"], row[f"{name}_hi"] = lo, hi
            # The temperature is fitted on synapses; neuron-level rows carry none.
            row |= calibrated[split] if level == "synapse" else dict.fromkeys(CALIBRATION_COLUMNS, np.nan)
            rows.append(row)
    return pd.DataFrame(rows), tau, sweep, temperature


def baseline_predictions(manifest: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Majority class, the leak-free connectivity model and (when the manifest has postsynaptic targets) the
    target-compartment model, fitted on train rows, as val/test prediction frames."""
    train = manifest[manifest["split"] == SPLITS["train"]]
    held = manifest[manifest["split"].isin([SPLITS["val"], SPLITS["test"]])].reset_index(drop=True)
    names = {v: k for k, v in SPLITS.items()}
    fits = [("majority", majority_baseline), ("connectivity", connectivity_baseline)]
    if "target" in manifest.columns and manifest["target"].notna().any():
        fits.append(("target", target_baseline))
    out = {}
    for name, fit in fits:
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
    from synhpc.distributed import resolve_device

    torch.set_num_threads(cfg.train.threads)
    run = RunDir(cfg.run_dir)
    data = ShardSet(run)  # the shards are verified before anything else is read
    own_model = not cfg.evaluate.checkpoint
    model, card = load_model(cfg.evaluate.checkpoint or run.path, resolve_device(cfg.train.device))
    provenance = read_provenance(run)
    check_compatible(card, cfg, provenance.get("volume", {}).get("resolution_nm"), source=cfg.evaluate.checkpoint or str(run.model_card))
    pred = predict_splits(cfg, model, data, tuple(name for name in SPLITS if name in cfg.evaluate.splits))
    common = {"run": cfg.run.name, "metric": cfg.evaluate.threshold_metric, "n_boot": cfg.evaluate.bootstrap, "seed": cfg.run.seed}
    summary, tau, sweep, temperature = score(pred, model=card["model"]["name"], **common)
    pred["probability_calibrated"] = sigmoid(apply_temperature(pred["logit"].to_numpy(), temperature))
    pred["prediction"] = (pred["probability"] >= tau).astype(int)
    tables = [summary]
    if cfg.evaluate.baselines:
        for name, frame in baseline_predictions(read_manifest(run)).items():
            tables.append(score(frame, model=f"baseline:{name}", **common)[0])
    summary = pd.concat(tables, ignore_index=True)
    summary = summary.assign(**run_columns(cfg, card, provenance))[SUMMARY_COLUMNS]
    curve = accuracy_vs_synapses(pred, tau, seed=cfg.run.seed, n_boot=cfg.evaluate.bootstrap)

    write_csv(pred, run.predictions)
    write_csv(sweep, run.tau_sweep)
    write_csv(neuron_level(pred), run.neuron_predictions)
    write_csv(curve, run.accuracy_vs_synapses)
    write_csv(summary, run.summary)
    if own_model:
        _record_decision(run, card, summary, pred, tau, temperature)

    from synhpc import plots  # matplotlib import is slow; only evaluation pays for it
    from synhpc.inspect import write_inspection

    mine = summary[summary["model"] == card["model"]["name"]]
    test = pred[pred["split"] == "test"]
    plots.confusion_matrix(mine, run.plot("confusion_matrix"))
    plots.threshold_sweep(sweep, tau, cfg.evaluate.threshold_metric, run.plot("tau_sweep"))
    plots.roc_curve(pred, run.plot("roc"))
    plots.accuracy_vs_synapses(curve, run.plot("accuracy_vs_synapses"))
    plots.reliability_diagram(test["label"].to_numpy(), test["probability"].to_numpy(), test["probability_calibrated"].to_numpy(),
                              run.plot("reliability"), temperature=temperature, n_bins=ECE_BINS, title="test")  # fmt: skip
    if run.train_log.is_file():
        plots.training_curves(pd.read_csv(run.train_log), run.training_curves)
    write_inspection(cfg, run, data, pred, tau)
    return summary


def _record_decision(run: RunDir, card: dict[str, Any], summary: pd.DataFrame, pred: pd.DataFrame, tau: float, temperature: float) -> None:
    """Tau, temperature, the validation class prior and the validation metrics into the run's model card: what
    prediction needs to turn logits into calibrated probabilities and calls."""
    val = pred[pred["split"] == "val"]
    row = summary[(summary["model"] == card["model"]["name"]) & (summary["level"] == "synapse") & (summary["split"] == "val")].iloc[0]
    card["decision"] |= {
        "tau": float(tau),
        "temperature": float(temperature),
        # P(excitatory) among validation synapses: the prior the calibrated probabilities carry (per-root evidence
        # is combined relative to it).
        "prior_excitatory": float(val["label"].mean()),
    }
    kept = ("balanced_accuracy", "roc_auc", "pr_auc", "mcc", "accuracy", "ece_before", "ece_after", "brier_before", "brier_after")
    card["validation"] = {k: float(row[k]) for k in kept} | {"n": int(row["n"])}
    write_card(run, card)
