"""Binary classification metrics and threshold selection (1 = excitatory is the positive class).

Usage::

    m = binary_metrics(labels, probs, tau=0.5)   # accuracy, balanced_accuracy, roc_auc, mcc, tp/fp/tn/fn
    tau, sweep = choose_threshold(val_labels, val_probs, "balanced_accuracy")
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """P(excitatory) from logits, in float64."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def confusion(labels: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    labels, pred = np.asarray(labels).astype(bool), np.asarray(pred).astype(bool)
    return {
        "tp": int((labels & pred).sum()),
        "fn": int((labels & ~pred).sum()),
        "tn": int((~labels & ~pred).sum()),
        "fp": int((~labels & pred).sum()),
    }


def _rates(c: dict[str, int]) -> tuple[float, float]:
    tpr = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else math.nan
    tnr = c["tn"] / (c["tn"] + c["fp"]) if c["tn"] + c["fp"] else math.nan
    return tpr, tnr


def mcc(c: dict[str, int]) -> float:
    tp, tn, fp, fn = (float(c[k]) for k in ("tp", "tn", "fp", "fn"))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


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


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return precision, recall, f1


def binary_metrics(labels: np.ndarray, probs: np.ndarray, tau: float) -> dict[str, float]:
    """Accuracy, balanced accuracy, ROC-AUC, PR-AUC, MCC, per-class precision/recall/F1 and the confusion counts.

    Per-class scores are suffixed ``_e`` (excitatory, the positive class) and ``_i`` (inhibitory).
    """
    labels = np.asarray(labels).astype(int)
    pred = np.asarray(probs) >= tau
    c = confusion(labels, pred)
    tpr, tnr = _rates(c)
    p_e, r_e, f_e = _prf(c["tp"], c["fp"], c["fn"])
    p_i, r_i, f_i = _prf(c["tn"], c["fn"], c["fp"])
    return {
        "n": int(len(labels)),
        "accuracy": float((pred == labels.astype(bool)).mean()) if len(labels) else math.nan,
        "balanced_accuracy": float(np.nanmean([tpr, tnr])),
        "roc_auc": roc_auc(labels, probs),
        "pr_auc": average_precision(labels, probs),
        "mcc": mcc(c),
        "precision_e": p_e,
        "recall_e": r_e,
        "f1_e": f_e,
        "precision_i": p_i,
        "recall_i": r_i,
        "f1_i": f_i,
        **c,
    }


def threshold_score(labels: np.ndarray, probs: np.ndarray, tau: float, metric: str) -> float:
    c = confusion(labels, np.asarray(probs) >= tau)
    tpr, tnr = _rates(c)
    if metric == "balanced_accuracy":
        return float(np.nanmean([tpr, tnr]))
    if metric == "youden":
        return float(tpr + tnr - 1)
    if metric == "f1":
        denom = 2 * c["tp"] + c["fp"] + c["fn"]
        return 2 * c["tp"] / denom if denom else 0.0
    raise ValueError(f"unknown threshold metric {metric!r}")


def choose_threshold(labels: np.ndarray, probs: np.ndarray, metric: str = "balanced_accuracy") -> tuple[float, pd.DataFrame]:
    """Best threshold on these (validation) predictions; candidates are midpoints between sorted unique scores.

    Ties go to the candidate closest to 0.5, so an uninformative sweep does not drift to an extreme.
    """
    probs = np.asarray(probs, dtype=np.float64)
    unique = np.unique(probs)
    candidates = np.concatenate([[0.0], (unique[:-1] + unique[1:]) / 2, [np.nextafter(unique[-1], np.inf)]]) if len(unique) else np.array([0.5])
    scores = np.array([threshold_score(labels, probs, t, metric) for t in candidates])
    best = np.flatnonzero(scores == scores.max())
    tau = float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])
    return tau, pd.DataFrame({"tau": candidates, metric: scores})
