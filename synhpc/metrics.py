"""Binary classification metrics and threshold selection (1 = excitatory is the positive class).

Everything here is O(n log n) or better: on a million validation synapses the threshold sweep takes ~0.2 s (it sorts
the scores once and counts the synapses at or above every candidate by binary search) and ``binary_metrics`` ~1 s.

Usage::

    m = binary_metrics(labels, probs, tau=0.5)   # accuracy, balanced_accuracy, roc_auc, mcc, tp/fp/tn/fn
    tau, sweep = choose_threshold(val_labels, val_probs, "balanced_accuracy")

Where the numbers come from: the confusion counts and MCC are scikit-learn's (``confusion_matrix``,
``matthews_corrcoef``; its MCC is bit-identical to the textbook formula on counts up to ~19k rows, where all products
are exact integers). ROC-AUC and average precision stay here although scikit-learn has both with the same definitions:
scikit-learn integrates its curves with float sums that land 1-2 ulps off in about 40% of random cases, which would
change the digits of ``summary.csv``, while the rank formula below rounds once, and both run in about half
scikit-learn's time. Rates, balanced accuracy and precision/recall/F1 are arithmetic on the four counts.
``tests/test_metrics.py`` checks everything computed here against scikit-learn.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, matthews_corrcoef

from synhpc.errors import DataError

THRESHOLD_METRICS = ("balanced_accuracy", "youden", "f1")


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """P(excitatory) from logits, in float64."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def confusion(labels: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    """``tp``, ``fn``, ``tn``, ``fp`` with any non-zero label or prediction counted as excitatory.

    Usage::

        c = confusion(labels, probs >= tau)
    """
    y = np.asarray(labels).astype(bool).astype(np.int8)
    p = np.asarray(pred).astype(bool).astype(np.int8)  # int8: the cheapest input for scikit-learn's checks
    if len(y) == 0:  # scikit-learn refuses empty input; an empty split simply has no counts
        return {"tp": 0, "fn": 0, "tn": 0, "fp": 0}
    (tn, fp), (fn, tp) = confusion_matrix(y, p, labels=[0, 1])
    return {"tp": int(tp), "fn": int(fn), "tn": int(tn), "fp": int(fp)}


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half; NaN when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return math.nan
    ranks = pd.Series(np.asarray(scores, dtype=np.float64)).rank(method="average").to_numpy()
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """PR-AUC as average precision (step-wise, no interpolation); NaN without positives."""
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        return math.nan
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    s, lab = np.asarray(scores, dtype=np.float64)[order], labels[order]
    last_of_tie = np.concatenate([s[1:] != s[:-1], [True]])
    tp = np.cumsum(lab)[last_of_tie]
    seen = np.flatnonzero(last_of_tie) + 1
    precision, recall = tp / seen, tp / lab.sum()
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def binary_metrics(labels: np.ndarray, probs: np.ndarray, tau: float) -> dict[str, float]:
    """Accuracy, balanced accuracy, ROC-AUC, PR-AUC, MCC, per-class precision/recall/F1 and the confusion counts.

    Per-class scores are suffixed ``_e`` (excitatory, the positive class) and ``_i`` (inhibitory). Undefined values:
    accuracy is NaN on empty input; balanced accuracy averages the class recalls that exist (NaN with none); ROC-AUC
    is NaN with one class, PR-AUC NaN without positives; MCC is 0 when any margin is empty; precision and recall are
    NaN on an empty denominator, F1 is 0 when there is no true positive.

    Usage::

        m = binary_metrics(test["label"], test["probability"], tau)
    """
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs)
    pred = probs >= tau
    c = confusion(labels, pred)
    tp, fn, tn, fp = c["tp"], c["fn"], c["tn"], c["fp"]
    # int8 halves scikit-learn's input checks against int64/bool arrays (0.3 s instead of 0.5-0.8 s at 1 M rows).
    y8, p8 = labels.astype(bool).astype(np.int8), pred.astype(np.int8)
    rates = [r for r in (_ratio(tp, tp + fn), _ratio(tn, tn + fp)) if not math.isnan(r)]
    out = {
        "n": int(len(labels)),
        "accuracy": _ratio(tp + tn, len(labels)),
        "balanced_accuracy": sum(rates) / len(rates) if rates else math.nan,
        "roc_auc": roc_auc(labels, probs),
        "pr_auc": average_precision(labels, probs),
        # An empty margin makes MCC 0/0, which scikit-learn also reports as 0 (after a warning for one class).
        "mcc": float(matthews_corrcoef(y8, p8)) if min(tp + fn, tn + fp, tp + fp, tn + fn) else 0.0,
    }
    for suffix, (hit, false_alarm, miss) in (("e", (tp, fp, fn)), ("i", (tn, fn, fp))):
        out[f"precision_{suffix}"] = _ratio(hit, hit + false_alarm)
        out[f"recall_{suffix}"] = _ratio(hit, hit + miss)
        out[f"f1_{suffix}"] = 2 * hit / (2 * hit + false_alarm + miss) if hit else 0.0
    return out | c


def threshold_candidates(probs: np.ndarray) -> np.ndarray:
    """0, the midpoints between consecutive distinct scores, and the next float above the largest score (nothing
    predicted excitatory); ``[0.5]`` for no scores."""
    unique = np.unique(np.asarray(probs, dtype=np.float64))
    if not len(unique):
        return np.array([0.5])
    return np.concatenate([[0.0], (unique[:-1] + unique[1:]) / 2, [np.nextafter(unique[-1], np.inf)]])


def sweep_scores(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, metric: str) -> np.ndarray:
    """``metric`` of the rule ``probs >= t`` at every ``t`` in ``thresholds``, from one sort per class.

    Balanced accuracy averages the recalls that exist; Youden's J is NaN when a class is absent; F1 is 0 without a
    true positive (the conventions of :func:`binary_metrics`).

    Usage::

        ba = sweep_scores(labels, probs, np.array([0.3, 0.5]), "balanced_accuracy")
    """
    if metric not in THRESHOLD_METRICS:
        raise ValueError(f"unknown threshold metric {metric!r}")
    labels = np.asarray(labels).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    pos, neg = np.sort(probs[labels]), np.sort(probs[~labels])
    n_pos, n_neg = len(pos), len(neg)
    # searchsorted(side="left") counts the scores strictly below t, so the rest are exactly those with score >= t,
    # also where a midpoint rounds onto one of two adjacent floats.
    tp = n_pos - np.searchsorted(pos, t, side="left")
    fp = n_neg - np.searchsorted(neg, t, side="left")
    fn, tn = n_pos - tp, n_neg - fp
    tpr = tp / n_pos if n_pos else np.full(len(t), np.nan)
    tnr = tn / n_neg if n_neg else np.full(len(t), np.nan)
    if metric == "balanced_accuracy":
        if n_pos and n_neg:
            return (tpr + tnr) / 2
        return tpr if n_pos else tnr
    if metric == "youden":
        return tpr + tnr - 1
    denom = 2 * tp + fp + fn
    return np.where(tp > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def choose_threshold(labels: np.ndarray, probs: np.ndarray, metric: str = "balanced_accuracy") -> tuple[float, pd.DataFrame]:
    """Best threshold on these (validation) predictions; candidates from :func:`threshold_candidates`.

    Ties go to the candidate closest to 0.5 (the lower one if two are equally close), so an uninformative sweep does
    not drift to an extreme. Returns tau and the sweep (columns ``tau`` and ``metric``). O(n log n).

    Usage::

        tau, sweep = choose_threshold(val["label"], val["probability"], "youden")
    """
    if metric not in THRESHOLD_METRICS:
        raise ValueError(f"unknown threshold metric {metric!r}")
    probs = np.asarray(probs, dtype=np.float64)
    if np.isnan(probs).any():
        raise DataError(f"choose_threshold: {int(np.isnan(probs).sum())} of {len(probs)} probabilities are NaN")
    candidates = threshold_candidates(probs)
    scores = sweep_scores(labels, probs, candidates, metric)
    if np.isnan(scores).all():
        raise DataError(f"choose_threshold: {metric} is undefined on {len(probs)} validation predictions (a class is missing)")
    best = np.flatnonzero(scores == np.nanmax(scores))
    tau = float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])
    return tau, pd.DataFrame({"tau": candidates, metric: scores})
