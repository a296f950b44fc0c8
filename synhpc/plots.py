"""PNG plots of a run: confusion matrix, threshold sweep, training curves, ROC, accuracy vs synapses per neuron.

Usage::

    confusion_matrix(summary, run_dir / "confusion_matrix.png")
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # batch nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from synhpc.metrics import roc_auc  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def confusion_matrix(summary: pd.DataFrame, path: Path) -> None:
    """Test-split confusion matrices, synapse and neuron level side by side."""
    test = summary[summary["split"] == "test"]
    fig, axes = plt.subplots(1, len(test), figsize=(4 * len(test), 3.6), squeeze=False)
    for ax, (_, row) in zip(axes[0], test.iterrows()):
        m = np.array([[row["tn"], row["fp"]], [row["fn"], row["tp"]]], dtype=int)
        ax.imshow(m, cmap="Blues")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black")
        ax.set_xticks([0, 1], ["inhibitory", "excitatory"])
        ax.set_yticks([0, 1], ["inhibitory", "excitatory"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"test, {row['level']} level\nbalanced acc {row['balanced_accuracy']:.3f} (tau {row['tau']:.3f})")
    _save(fig, path)


def threshold_sweep(sweep: pd.DataFrame, tau: float, metric: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(sweep["tau"], sweep[metric], lw=1.5)
    ax.axvline(tau, color="k", ls="--", lw=1, label=f"chosen on val: {tau:.3f}")
    ax.set_xlabel("threshold on P(excitatory)")
    ax.set_ylabel(f"validation {metric.replace('_', ' ')}")
    ax.set_xlim(0, 1)
    ax.legend(loc="lower center")
    _save(fig, path)


def training_curves(log: pd.DataFrame, path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.plot(log["epoch"], log["train_loss"], marker="o")
    a.set_xlabel("epoch")
    a.set_ylabel("train loss")
    if "train_balanced_accuracy" in log:
        b.plot(log["epoch"], log["train_balanced_accuracy"], marker="^", ls=":", label="train balanced acc")
    b.plot(log["epoch"], log["val_balanced_accuracy"], marker="o", label="val balanced acc")
    b.plot(log["epoch"], log["val_roc_auc"], marker="s", label="val ROC-AUC")
    b.set_xlabel("epoch")
    b.set_ylim(0.4, 1.0)
    b.legend(loc="lower right")
    _save(fig, path)


_SPLIT_ORDER = ("val", "test")


def _splits(frame: pd.DataFrame) -> list:
    present = list(frame["split"].unique())
    return [s for s in _SPLIT_ORDER if s in present] + sorted((s for s in present if s not in _SPLIT_ORDER), key=str)


def _roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1); tied scores move in one diagonal step."""
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    s, lab = np.asarray(scores, dtype=np.float64)[order], labels[order]
    last_of_tie = np.concatenate([s[1:] != s[:-1], [True]])
    tp, fp = np.cumsum(lab)[last_of_tie], np.cumsum(~lab)[last_of_tie]
    pos, neg = max(int(lab.sum()), 1), max(int((~lab).sum()), 1)
    return np.concatenate([[0.0], fp / neg]), np.concatenate([[0.0], tp / pos])


def roc_curve(pred: pd.DataFrame, path: Path) -> None:
    """Synapse-level ROC curve of each split in ``pred`` (val and test), AUC in the legend.

    Usage::

        roc_curve(pred, run_dir / "roc.png")
    """
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for split in _splits(pred):
        part = pred[pred["split"] == split]
        labels, scores = part["label"].to_numpy(), part["probability"].to_numpy()
        if labels.min() == labels.max():  # one class: no curve exists
            continue
        fpr, tpr = _roc_points(labels, scores)
        ax.plot(fpr, tpr, lw=1.5, label=f"{split}: AUC {roc_auc(labels, scores):.3f} (n={len(part)})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="chance")
    ax.set_xlabel("false positive rate (inhibitory called excitatory)")
    ax.set_ylabel("true positive rate (excitatory)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, Path(path))


def accuracy_vs_synapses(curve: pd.DataFrame, path: Path) -> None:
    """Neuron accuracy (mean-logit and majority-vote rules) against synapses drawn per neuron, one line per split,
    with the number of neurons behind each point underneath.

    Usage::

        accuracy_vs_synapses(curve, run_dir / "neuron_accuracy.png")
    """
    fig, (ax, cnt) = plt.subplots(2, 1, figsize=(5.4, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for i, split in enumerate(_splits(curve)):
        part = curve[curve["split"] == split].sort_values("k")
        color = f"C{i}"
        ax.plot(part["k"], part["accuracy_mean_logit"], marker="o", color=color, label=f"{split}, mean logit")
        ax.plot(part["k"], part["accuracy_majority"], marker="s", ls="--", color=color, label=f"{split}, majority vote")
        cnt.plot(part["k"], part["n_neurons"], marker=".", color=color, label=split)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_ylabel("neuron accuracy")
    ax.set_ylim(0.4, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    cnt.set_xscale("log")
    cnt.set_xlabel("synapses drawn per neuron (k)")
    cnt.set_ylabel("neurons")
    ks = np.sort(curve["k"].unique())
    if len(ks):
        cnt.set_xticks(ks, [str(int(k)) for k in ks])
        cnt.xaxis.set_minor_formatter(NullFormatter())
    _save(fig, Path(path))
