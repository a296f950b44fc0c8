"""Neuron-level accuracy as a function of how many synapses each neuron contributes.

The published anchors report neuron accuracy against synapses per neuron (consensus over more synapses is more
reliable); evaluating every neuron on all its synapses mixes neurons with 3 and 300 synapses. Here each neuron with
at least k synapses is judged from a random subset of exactly k of them, redrawn ``n_draws`` times.

Usage::

    curve = accuracy_vs_synapses(pred, tau, ks=(1, 2, 5, 10, 20, 50), n_draws=20, seed=0)

Two neuron rules, both with the validation threshold ``tau``:
  * mean logit: sigmoid(mean of the k logits) >= tau (the rule of ``evaluation.neuron_level``);
  * majority vote: excitatory when at least half of the k synapse predictions (probability >= tau) are
    excitatory. Ties (even k, exactly half) go to excitatory, matching the ``>= tau`` convention of the synapse rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from synhpc.metrics import sigmoid

CURVE_COLUMNS = [
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


def _balanced(labels: np.ndarray, pred: np.ndarray) -> float:
    rates = [float((pred[labels == c] == c).mean()) for c in (0, 1) if (labels == c).any()]
    return float(np.mean(rates)) if rates else np.nan


def accuracy_vs_synapses(
    pred: pd.DataFrame,
    tau: float,
    ks: Sequence[int] = (1, 2, 5, 10, 20, 50),
    *,
    n_draws: int = 20,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (split, k): neuron accuracy from k randomly drawn synapses per neuron, averaged over draws.

    ``pred`` has split, pre_root_id, label and logit (probability is taken as sigmoid(logit) when absent). Only
    neurons with >= k synapses enter row k (``n_neurons``; class counts alongside); rows with none hold NaN.
    Accuracies are means over ``n_draws`` draws of the per-draw accuracy over those neurons; synapses are drawn
    without replacement, so a neuron with exactly k synapses is the same in every draw; within a draw the
    subsets for increasing k are nested.

    Usage::

        curve = accuracy_vs_synapses(pred[pred.split != "train"], tau)
    """
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive, got {tuple(ks)}")
    rng = np.random.default_rng(seed)
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
                rows.append({"split": split, "k": k, "n_neurons": 0, "n_excitatory": 0, "n_inhibitory": 0})
                continue
            acc_mean, acc_vote, bal_mean, bal_vote = [], [], [], []
            for order, position in zip(orders, positions):
                keep = order[(position < k) & eligible[codes[order]]]
                mean_logit = np.bincount(codes[keep], weights=logit[keep], minlength=n_neurons)[eligible] / k
                votes = np.bincount(codes[keep], weights=vote[keep], minlength=n_neurons)[eligible]
                truth = labels[eligible]
                # sigmoid(mean logit) >= tau, written on the probability scale to share the synapse rule exactly.
                by_mean = (sigmoid(mean_logit) >= tau).astype(int)
                by_vote = (2 * votes >= k).astype(int)  # ties -> excitatory
                acc_mean.append(float((by_mean == truth).mean()))
                acc_vote.append(float((by_vote == truth).mean()))
                bal_mean.append(_balanced(truth, by_mean))
                bal_vote.append(_balanced(truth, by_vote))
            rows.append(
                {
                    "split": split,
                    "k": k,
                    "n_neurons": int(eligible.sum()),
                    "n_excitatory": n_e,
                    "n_inhibitory": n_i,
                    "accuracy_mean_logit": float(np.mean(acc_mean)),
                    "accuracy_majority": float(np.mean(acc_vote)),
                    "balanced_accuracy_mean_logit": float(np.mean(bal_mean)),
                    "balanced_accuracy_majority": float(np.mean(bal_vote)),
                }
            )
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)
