"""Evaluation statistics at prediction scale: seconds for the threshold sweep, the metrics, the neuron-resampled
confidence intervals and calibration on synthetic validation sets of 20k to 1M synapses.

Usage::

    frame = bench_metrics(run_dir / "bench")   # also bench_metrics.csv and bench_metrics.json there

The synthetic set mimics a held-out split: presynaptic neurons with a heavy-tailed number of synapses (lognormal
shares, ~100 synapses per neuron on average), half of them excitatory, a per-neuron logit offset plus per-synapse
noise (over-confident by a factor 5/3, which temperature scaling undoes), and continuous float64 probabilities, so
every synapse is its own threshold candidate (the sweep's worst case). Each step runs once; the bootstrap steps draw
``n_boot`` resamples as ``evaluation.score`` does for one split. Timings on a shared machine vary by tens of percent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synhpc.atomic import write_csv, write_text
from synhpc.bootstrap import neuron_bootstrap_ci, neuron_metric, synapse_metric
from synhpc.calibration import apply_temperature, expected_calibration_error, fit_temperature
from synhpc.metrics import binary_metrics, choose_threshold, sigmoid

COUNT_METRICS = ("accuracy", "balanced_accuracy", "mcc")


def _measure(frame: pd.DataFrame, n: int, n_boot: int, seed: int) -> dict[str, Any]:
    """Seconds of each statistic on one synthetic validation set of ``n`` synapses."""
    labels, probs, logits = frame["label"].to_numpy(), frame["probability"].to_numpy(), frame["logit"].to_numpy()
    row: dict[str, Any] = {"size": n, "n_neurons": int(frame["pre_root_id"].nunique()), "n_boot": n_boot}
    row["choose_threshold_s"], (tau, sweep) = _seconds(lambda: choose_threshold(labels, probs, "balanced_accuracy"))
    row["candidates"] = len(sweep)
    row["binary_metrics_s"], metrics = _seconds(lambda: binary_metrics(labels, probs, tau))
    row["ci_counts_s"], _ = _seconds(lambda: [neuron_bootstrap_ci(frame, synapse_metric(m, tau), n_boot=n_boot, seed=seed) for m in COUNT_METRICS])
    row["ci_roc_auc_s"], (lo, hi) = _seconds(lambda: neuron_bootstrap_ci(frame, synapse_metric("roc_auc", tau), n_boot=n_boot, seed=seed))
    row["ci_neuron_s"], _ = _seconds(lambda: [neuron_bootstrap_ci(frame, neuron_metric(m, tau), n_boot=n_boot, seed=seed) for m in (*COUNT_METRICS, "roc_auc")])
    row["fit_temperature_s"], temperature = _seconds(lambda: fit_temperature(logits, labels))
    row["ece_s"], (ece, _) = _seconds(lambda: expected_calibration_error(labels, sigmoid(apply_temperature(logits, temperature))))
    row |= {"tau": tau, "balanced_accuracy": metrics["balanced_accuracy"], "roc_auc": metrics["roc_auc"], "roc_auc_lo": lo, "roc_auc_hi": hi}
    return row | {"temperature": temperature, "ece_after": ece}


def synthetic_split(n: int, *, seed: int = 0, synapses_per_neuron: int = 100) -> pd.DataFrame:
    """A held-out-like prediction frame: pre_root_id, label, logit, probability (see the module docstring).

    Usage::

        frame = synthetic_split(200_000)
    """
    rng = np.random.default_rng(seed)
    n_neurons = max(20, n // synapses_per_neuron)
    share = rng.lognormal(0.0, 1.0, n_neurons)
    pre = rng.choice(n_neurons, size=n, p=share / share.sum())
    neuron_label = (rng.random(n_neurons) < 0.5).astype(int)
    neuron_label[:2] = (0, 1)  # both classes, whatever the draw
    label = neuron_label[pre]
    logit = 1.5 * (2 * label - 1) + rng.normal(0.0, 1.0, n_neurons)[pre] + rng.normal(0.0, 2.0, n)
    return pd.DataFrame({"pre_root_id": pre + 10**17, "label": label, "logit": logit, "probability": sigmoid(logit)})


def _seconds(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_metrics(out_dir: Path, *, sizes: Sequence[int] = (20_000, 200_000, 1_000_000), seed: int = 0, n_boot: int = 1000) -> pd.DataFrame:
    """One row per size: seconds for ``choose_threshold``, ``binary_metrics``, the neuron-resampled CIs
    (``ci_counts_s``: accuracy, balanced accuracy and MCC at synapse level; ``ci_roc_auc_s``; ``ci_neuron_s``: the
    four metrics at neuron level), ``fit_temperature`` and ECE; writes bench_metrics.csv and .json in ``out_dir``.

    Usage::

        print(bench_metrics(Path("logs/bench"), sizes=(20_000,)).to_string())
    """
    from synhpc.bench import machine_info

    rows = [_measure(synthetic_split(int(n), seed=seed), int(n), n_boot, seed) for n in sizes]
    frame = pd.DataFrame(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(frame, out_dir / "bench_metrics.csv")
    info = machine_info() | {"seed": seed, "synapses_per_neuron": 100}
    write_text(out_dir / "bench_metrics.json", json.dumps({"machine": info, "rows": json.loads(frame.to_json(orient="records"))}, indent=1))
    return frame
