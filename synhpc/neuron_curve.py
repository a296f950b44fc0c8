"""Neuron-level accuracy as a function of how many synapses each neuron contributes.

The published anchors report neuron accuracy against synapses per neuron (consensus over more synapses is more
reliable); evaluating every neuron on all its synapses mixes neurons with 3 and 300 synapses. Here each neuron with
at least k synapses is judged from a random subset of exactly k of them, redrawn ``n_draws`` times.

Usage::

    curve = accuracy_vs_synapses(pred, tau, ks=(1, 2, 5, 10, 20, 50), n_draws=20, seed=0, n_boot=1000)

Two neuron rules, both with the validation threshold ``tau``:
  * mean logit: sigmoid(mean of the k logits) >= tau (the rule of ``evaluation.neuron_level``);
  * majority vote: excitatory when at least half of the k synapse predictions (probability >= tau) are
    excitatory. Ties (even k, exactly half) go to excitatory, matching the ``>= tau`` convention of the synapse rule.

Uncertainty: a handful of neurons behind a point says little, whatever its accuracy. Each point therefore carries a
percentile bootstrap band over neurons (neurons resampled with replacement within each class, as
``bootstrap.neuron_bootstrap_ci`` does), the number of neurons behind it, and a ``low_support`` flag below
``min_neurons`` (5) neurons.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from synhpc.metrics import sigmoid

BASE_COLUMNS = [
    "split",
    "k",
    "n_neurons",
    "n_excitatory",
    "n_inhibitory",
    "accuracy_mean_logit",
    "accuracy_majority",
    "balanced_accuracy_mean_logit",
    "balanced_accuracy_majority",
]
# Appended after the original columns (readers by name or position keep working): ``{rate}_lo``/``{rate}_hi`` for
# each rate, the percentile band of the bootstrap over neurons, and ``low_support``.
BAND_COLUMNS = [f"{rate}_{end}" for rate in BASE_COLUMNS[5:] for end in ("lo", "hi")]
CURVE_COLUMNS = [*BASE_COLUMNS, *BAND_COLUMNS, "low_support"]
MIN_NEURONS = 5


def _balanced(labels: np.ndarray, pred: np.ndarray) -> float:
    rates = [float((pred[labels == c] == c).mean()) for c in (0, 1) if (labels == c).any()]
    return float(np.mean(rates)) if rates else np.nan


def _multiplicity(rng: np.random.Generator, labels: np.ndarray, n_boot: int) -> np.ndarray:
    """(n_boot, neurons) draw counts, each class's neurons resampled with replacement among themselves."""
    n = len(labels)
    cells = []
    for c in (0, 1):
        pool = np.flatnonzero(labels == c)
        if len(pool):
            drawn = pool[rng.integers(0, len(pool), size=(n_boot, len(pool)))]
            cells.append((np.arange(n_boot)[:, None] * n + drawn).ravel())  # (resample, neuron) as one flat index
    return np.bincount(np.concatenate(cells), minlength=n_boot * n).reshape(n_boot, n)


def _bands(m: np.ndarray, labels: np.ndarray, right: np.ndarray, alpha: float) -> tuple[float, float, float, float]:
    """Percentile bands (accuracy lo, hi, balanced accuracy lo, hi) over resamples ``m`` of neurons, each neuron
    called right with probability ``right`` (its fraction of synapse draws called right)."""
    acc = (m @ right) / m.sum(1)
    # Stratified resamples keep each class's neuron count fixed, so a class mean divides by that count.
    per_class = [(m[:, labels == c] @ right[labels == c]) / (labels == c).sum() for c in (0, 1) if (labels == c).any()]
    bal = np.mean(per_class, axis=0)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    a_lo, a_hi = np.percentile(acc, q)
    b_lo, b_hi = np.percentile(bal, q)
    return float(a_lo), float(a_hi), float(b_lo), float(b_hi)


def accuracy_vs_synapses(
    pred: pd.DataFrame,
    tau: float,
    ks: Sequence[int] = (1, 2, 5, 10, 20, 50),
    *,
    n_draws: int = 20,
    seed: int = 0,
    n_boot: int = 1000,
    alpha: float = 0.05,
    min_neurons: int = MIN_NEURONS,
) -> pd.DataFrame:
    """One row per (split, k): neuron accuracy from k randomly drawn synapses per neuron, averaged over draws.

    ``pred`` has split, pre_root_id, label and logit (probability is taken as sigmoid(logit) when absent). Only
    neurons with >= k synapses enter row k (``n_neurons``; class counts alongside); rows with none hold NaN.
    Accuracies are means over ``n_draws`` draws of the per-draw accuracy over those neurons; synapses are drawn
    without replacement, so a neuron with exactly k synapses is the same in every draw; within a draw the
    subsets for increasing k are nested.

    Columns (``CURVE_COLUMNS``): split, k, n_neurons, n_excitatory, n_inhibitory, the four rates, then for each of the four rates ``{rate}_lo`` and
    ``{rate}_hi``, the percentile ``1 - alpha`` band of ``n_boot`` bootstrap resamples of the row's neurons
    (stratified by class; each neuron counts with its fraction of draws called right, so the band is the
    uncertainty from which neurons were sampled, not from which synapses), and ``low_support``: fewer than
    ``min_neurons`` neurons behind the point, where no band means much. Bands are NaN for rows without neurons
    or with ``n_boot=0``. The bootstrap has its own random stream: the point estimates do not depend on
    ``n_boot``.

    Usage::

        curve = accuracy_vs_synapses(pred[pred.split != "train"], tau, n_boot=1000)
    """
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive, got {tuple(ks)}")
    if n_draws < 1 or n_boot < 0 or not 0 < alpha < 1:
        raise ValueError(f"need n_draws >= 1, n_boot >= 0 and 0 < alpha < 1, got {n_draws}, {n_boot}, {alpha}")
    rng = np.random.default_rng(seed)
    boot_rng = np.random.default_rng([seed, 1])
    rows = []
    for split in sorted(pred["split"].unique(), key=str):
        part = pred[pred["split"] == split]
        codes, _ = pd.factorize(part["pre_root_id"], sort=True)
        logit = part["logit"].to_numpy(dtype=np.float64)
        prob = part["probability"].to_numpy(dtype=np.float64) if "probability" in part else sigmoid(logit)
        vote = prob >= tau
        counts = np.bincount(codes)
        labels = np.zeros(len(counts), dtype=int)
        labels[codes] = part["label"].to_numpy().astype(int)
        n_rows = len(part)
        n_neurons = len(counts)
        # Sorting rows by (neuron, random key) and keeping each neuron's first k rows draws k synapses without
        # replacement for every neuron at once. One order per draw serves every k (the k-subsets are nested),
        # which costs one sort per draw instead of one per (draw, k) and makes the curve smoother across k.
        orders, positions = [], []
        for _ in range(n_draws):
            order = np.lexsort((rng.random(n_rows), codes))
            sorted_codes = codes[order]
            orders.append(order)
            positions.append(np.arange(n_rows) - np.searchsorted(sorted_codes, sorted_codes, side="left"))
        for k in ks:
            k = int(k)
            eligible = counts >= k
            n_e, n_i = int((labels[eligible] == 1).sum()), int((labels[eligible] == 0).sum())
            if not eligible.any():
                rows.append({"split": split, "k": k, "n_neurons": 0, "n_excitatory": 0, "n_inhibitory": 0, "low_support": True})
                continue
            acc_mean, acc_vote, bal_mean, bal_vote = [], [], [], []
            truth = labels[eligible]
            right_mean, right_vote = np.zeros(len(truth)), np.zeros(len(truth))
            for order, position in zip(orders, positions):
                keep = order[(position < k) & eligible[codes[order]]]
                mean_logit = np.bincount(codes[keep], weights=logit[keep], minlength=n_neurons)[eligible] / k
                votes = np.bincount(codes[keep], weights=vote[keep], minlength=n_neurons)[eligible]
                # sigmoid(mean logit) >= tau, written on the probability scale to share the synapse rule exactly.
                by_mean = (sigmoid(mean_logit) >= tau).astype(int)
                by_vote = (2 * votes >= k).astype(int)  # ties -> excitatory
                right_mean += by_mean == truth
                right_vote += by_vote == truth
                acc_mean.append(float((by_mean == truth).mean()))
                acc_vote.append(float((by_vote == truth).mean()))
                bal_mean.append(_balanced(truth, by_mean))
                bal_vote.append(_balanced(truth, by_vote))
            row = {
                "split": split,
                "k": k,
                "n_neurons": int(eligible.sum()),
                "n_excitatory": n_e,
                "n_inhibitory": n_i,
                "accuracy_mean_logit": float(np.mean(acc_mean)),
                "accuracy_majority": float(np.mean(acc_vote)),
                "balanced_accuracy_mean_logit": float(np.mean(bal_mean)),
                "balanced_accuracy_majority": float(np.mean(bal_vote)),
                "low_support": bool(eligible.sum() < min_neurons),
            }
            if n_boot:
                m = _multiplicity(boot_rng, truth, n_boot)
                for rule, right in (("mean_logit", right_mean), ("majority", right_vote)):
                    bands = _bands(m, truth, right / n_draws, alpha)
                    names = (f"{rate}_{rule}_{end}" for rate in ("accuracy", "balanced_accuracy") for end in ("lo", "hi"))
                    row |= dict(zip(names, bands))
            rows.append(row)
    curve = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    curve[BAND_COLUMNS] = curve[BAND_COLUMNS].astype(np.float64)
    curve["low_support"] = curve["low_support"].astype(bool)
    return curve
