"""The summary table: its columns, reading one run's ``summary.csv`` safely, and gathering every run's into one.

Nothing here imports torch, so ``gather`` and ``status`` run on a login node in well under a second.

Usage::

    table, skipped = gather(Path("logs"))   # also writes logs/summary.csv
    print(format_table(table))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from synhpc.atomic import write_csv
from synhpc.errors import DataError
from synhpc.rundir import RunDir, cv_gathered, gathered_summary

CI_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "mcc")
# Synapse-level calibration (temperature fitted on validation); NaN on neuron-level rows.
CALIBRATION_COLUMNS = ["temperature", "nll_before", "nll_after", "brier_before", "brier_after", "ece_before", "ece_after"]
# What a run was, so gathered rows of a sweep compare without joining files.
RUN_COLUMNS = [
    "model_width", "epochs", "lr", "precision", "cube_shape_zyx", "split_seed", "split_folds", "split_fold",
    "materialization_version", "extraction_digest", "training_digest",
]  # fmt: skip
SUMMARY_COLUMNS = [
    "run", "model", "level", "split", "n", "accuracy", "balanced_accuracy", "roc_auc", "mcc", "tau",
    *[f"{m}_{end}" for m in CI_METRICS for end in ("lo", "hi")],
    "pr_auc", "precision_e", "recall_e", "f1_e", "precision_i", "recall_i", "f1_i", "tp", "fp", "tn", "fn",
    *CALIBRATION_COLUMNS, *RUN_COLUMNS,
]  # fmt: skip


def run_columns(cfg: Any, card: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    """The RUN_COLUMNS of one evaluated run: the model's own settings from its card, the data's from the run."""
    return {
        "model_width": card["model"].get("width"),
        "epochs": card["training"].get("epochs"),
        "lr": card.get("training", {}).get("lr"),
        "precision": card["training"].get("precision"),
        "cube_shape_zyx": "x".join(str(v) for v in card["input"]["cube_shape_zyx"]),
        "split_seed": cfg.split.seed,
        "split_folds": cfg.split.folds,
        "split_fold": cfg.split.fold if cfg.split.folds else -1,
        "materialization_version": cfg.tables.materialization_version,
        "extraction_digest": provenance.get("extraction_digest"),
        "training_digest": card["training"].get("training_digest"),
    }


def read_summary(path: Path) -> pd.DataFrame:
    """One run's summary.csv; a damaged file or one with other columns is a one-line error naming it."""
    try:
        frame = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: unreadable summary ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    missing = [c for c in SUMMARY_COLUMNS if c not in frame.columns]
    extra = [c for c in frame.columns if c not in SUMMARY_COLUMNS]
    if missing or extra:
        what = f"lacks column '{missing[0]}'" if missing else f"has unexpected column '{extra[0]}'"
        raise DataError(f"{path}: {what}; not a summary written by this synhpc (evaluate the run again)")
    return frame[SUMMARY_COLUMNS]


def gather(root: Path) -> tuple[pd.DataFrame, list[str]]:
    """Concatenate ``<root>/*/summary.csv``; runs without one are listed as skipped. Fold runs of a
    cross-validation (``<name>-fold<f>``) are also summarised over their folds in ``<root>/summary_cv.csv``."""
    frames, skipped = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        run = RunDir(folder)
        if run.summary.is_file():
            frames.append(read_summary(run.summary))
        elif run.config.is_file() and not run.predict_provenance.is_file():  # prediction runs have no summary
            skipped.append(run.name)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SUMMARY_COLUMNS)
    if frames:
        write_csv(table, gathered_summary(root))
        from synhpc.folds import cv_summary

        cv = cv_summary(table)
        if not cv.empty:
            write_csv(cv, cv_gathered(root))
    return table, skipped


def format_table(table: pd.DataFrame) -> str:
    """A readable table; balanced accuracy carries its 95% CI over neurons when the summary has one."""
    shown = table.copy()
    if {"balanced_accuracy_lo", "balanced_accuracy_hi"} <= set(shown.columns):
        shown["bal_acc_95ci"] = [
            f"[{lo:.3f}, {hi:.3f}]" if pd.notna(lo) else "" for lo, hi in zip(shown["balanced_accuracy_lo"], shown["balanced_accuracy_hi"])
        ]
    cols = [c for c in ("run", "model", "level", "split", "n", "accuracy", "balanced_accuracy", "bal_acc_95ci", "roc_auc", "mcc", "tau") if c in shown]
    return shown[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}")
