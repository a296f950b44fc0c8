"""PNG plots of a run: confusion matrix, threshold sweep, training curves.

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
    b.plot(log["epoch"], log["val_balanced_accuracy"], marker="o", label="val balanced acc")
    b.plot(log["epoch"], log["val_roc_auc"], marker="s", label="val ROC-AUC")
    b.set_xlabel("epoch")
    b.set_ylim(0.4, 1.0)
    b.legend(loc="lower right")
    _save(fig, path)
