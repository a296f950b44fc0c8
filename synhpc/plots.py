"""PNG plots of a run: confusion matrix, threshold sweep, training curves, ROC, accuracy vs synapses per neuron,
reliability diagram.

Usage::

    confusion_matrix(summary, run_dir / "confusion_matrix.png")
    reliability_diagram(test_labels, test_probs, calibrated_probs, run_dir / "reliability.png", temperature=T)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # batch nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import NullFormatter, StrMethodFormatter  # noqa: E402
from sklearn.metrics import roc_curve as _sk_roc_curve  # noqa: E402

from synhpc.calibration import expected_calibration_error  # noqa: E402
from synhpc.metrics import roc_auc  # noqa: E402
from synhpc.neuron_curve import MIN_NEURONS  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Lay out ``fig`` and write it as a PNG whole (temporary sibling, rename), then close it."""
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
    save_figure(fig, path)


def threshold_sweep(sweep: pd.DataFrame, tau: float, metric: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(sweep["tau"], sweep[metric], lw=1.5)
    ax.axvline(tau, color="k", ls="--", lw=1, label=f"chosen on val: {tau:.3f}")
    ax.set_xlabel("threshold on P(excitatory)")
    ax.set_ylabel(f"validation {metric.replace('_', ' ')}")
    ax.set_xlim(0, 1)
    ax.legend(loc="lower center")
    save_figure(fig, path)


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
    save_figure(fig, path)


_SPLIT_ORDER = ("val", "test")


def _splits(frame: pd.DataFrame) -> list:
    present = list(frame["split"].unique())
    return [s for s in _SPLIT_ORDER if s in present] + sorted((s for s in present if s not in _SPLIT_ORDER), key=str)


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
        # Every distinct threshold, so tied scores move in one diagonal step.
        fpr, tpr, _ = _sk_roc_curve(labels, scores, drop_intermediate=False)
        ax.plot(fpr, tpr, lw=1.5, label=f"{split}: AUC {roc_auc(labels, scores):.3f} (n={len(part)})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="chance")
    ax.set_xlabel("false positive rate (inhibitory called excitatory)")
    ax.set_ylabel("true positive rate (excitatory)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, Path(path))


def accuracy_vs_synapses(curve: pd.DataFrame, path: Path, *, min_neurons: int = MIN_NEURONS) -> None:
    """Neuron accuracy (mean-logit and majority-vote rules) against synapses drawn per neuron, one colour per split,
    with the 95% bootstrap bands over neurons (shaded for the mean-logit rule, error bars for majority vote), open
    markers for points resting on fewer than ``min_neurons`` neurons (``low_support``), and the number of neurons
    behind each point underneath (log scale, dotted line at ``min_neurons``).

    Usage::

        accuracy_vs_synapses(curve, run_dir / "neuron_accuracy.png")
    """
    fig, (ax, cnt) = plt.subplots(2, 1, figsize=(5.6, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    any_low = False
    for i, split in enumerate(_splits(curve)):
        part = curve[curve["split"] == split].sort_values("k")
        low = part["low_support"].to_numpy(dtype=bool) if "low_support" in part else part["n_neurons"].to_numpy() < min_neurons
        any_low |= bool(low.any())
        color = f"C{i}"
        # Mean logit (the rule of the neuron-level summary rows): shaded band; majority vote: error bars.
        for rule, marker, ls, name in (("mean_logit", "o", "-", "mean logit"), ("majority", "s", "--", "majority vote")):
            col = f"accuracy_{rule}"
            shown = part[col].notna().to_numpy()
            ax.plot(part["k"], part[col], ls=ls, color=color, label=f"{split}, {name}")
            ax.plot(part["k"][shown & ~low], part[col][shown & ~low], ls="none", marker=marker, color=color)
            ax.plot(part["k"][shown & low], part[col][shown & low], ls="none", marker=marker, mfc="none", mec=color, mew=1.2)
            if f"{col}_lo" not in part or not part[f"{col}_lo"].notna().any():
                continue
            lo, hi = part[f"{col}_lo"].to_numpy(), part[f"{col}_hi"].to_numpy()
            if rule == "mean_logit":
                ax.fill_between(part["k"], lo, hi, color=color, alpha=0.2, lw=0)
            else:
                y = part[col].to_numpy()
                # The point is a mean over draws and the band a percentile: they can disagree by a rounding error.
                yerr = np.clip(np.nan_to_num([y - lo, hi - y]), 0, None)
                ax.errorbar(part["k"], y, yerr=yerr, ls="none", color=color, lw=0.8, capsize=2, alpha=0.7)
        some = part["n_neurons"] > 0  # log scale: a k without neurons has no point
        cnt.plot(part["k"][some], part["n_neurons"][some], marker=".", color=color, label=split)
    if any_low:
        ax.plot([], [], ls="none", marker="o", mfc="none", mec="grey", label=f"open: < {min_neurons} neurons")
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_ylabel("neuron accuracy (95% band over neurons)")
    band_cols = [c for c in ("accuracy_mean_logit_lo", "accuracy_majority_lo") if c in curve]
    lowest = float(np.nanmin(curve[band_cols].to_numpy(dtype=float))) if band_cols and curve[band_cols].notna().any().any() else 0.4
    ax.set_ylim(max(0.0, min(0.4, lowest - 0.02)), 1.02)
    ax.legend(loc="lower right", fontsize=7)
    cnt.axhline(min_neurons, color="grey", ls=":", lw=1)
    cnt.text(1.0, min_neurons, f" {min_neurons}", transform=cnt.get_yaxis_transform(), va="center", fontsize=7, color="grey")
    cnt.set_xscale("log")
    cnt.set_yscale("log")
    cnt.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    cnt.yaxis.set_minor_formatter(NullFormatter())
    cnt.set_xlabel("synapses drawn per neuron (k)")
    cnt.set_ylabel("neurons")
    ks = np.sort(curve["k"].unique())
    if len(ks):
        cnt.set_xticks(ks, [str(int(k)) for k in ks])
        cnt.xaxis.set_minor_formatter(NullFormatter())
    save_figure(fig, Path(path))


def reliability_diagram(
    labels: np.ndarray,
    before: np.ndarray,
    after: np.ndarray | None,
    path: Path,
    *,
    temperature: float | None = None,
    n_bins: int = 15,
    strategy: str = "uniform",
    title: str = "test",
) -> None:
    """Fraction excitatory against mean predicted P(excitatory) per bin, before and (optionally) after temperature
    scaling, with the diagonal of perfect calibration, ECE in the legend and the bin counts underneath (binning as
    in ``calibration.expected_calibration_error``; empty bins are not drawn).

    Usage::

        reliability_diagram(y, sigmoid(z), sigmoid(apply_temperature(z, T)), run_dir / "reliability.png", temperature=T)
    """
    fig, (ax, cnt) = plt.subplots(2, 1, figsize=(4.8, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="perfect calibration")
    curves = [("before", before, "o", "C3")]
    if after is not None:
        curves.append((f"after (T = {temperature:.3g})" if temperature is not None else "after", after, "s", "C0"))
    for name, probs, marker, color in curves:
        ece, bins = expected_calibration_error(labels, probs, n_bins=n_bins, strategy=strategy)
        full = bins[bins["count"] > 0]
        ax.plot(full["mean_probability"], full["fraction_positive"], marker=marker, color=color, label=f"{name}: ECE {ece:.3f}")
        cnt.stairs(bins["count"].to_numpy(), np.r_[bins["lo"].to_numpy(), bins["hi"].iloc[-1]], color=color, label=name)
    ax.set_ylabel("fraction excitatory")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}: reliability ({strategy} bins, n = {len(labels)})", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    cnt.set_xlabel("predicted P(excitatory)")
    cnt.set_ylabel("synapses per bin")
    save_figure(fig, Path(path))


def section_gallery(sections: list[np.ndarray], titles: list[str], path: Path, *, title: str = "", columns: int = 6) -> None:
    """A grid of EM sections (uint8 Y, X), each with a short title; an empty list draws a labelled blank figure.

    Usage: ``section_gallery([cube[cube.shape[0] // 2] for cube in cubes], ["123 E p=0.91", ...], path)``
    """
    n = max(1, len(sections))
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 2.0 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, section, text in zip(axes.ravel(), sections, titles):
        ax.imshow(section, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(text, fontsize=7)
    if not sections:
        axes[0, 0].text(0.5, 0.5, "nothing to show", ha="center", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, Path(path))
