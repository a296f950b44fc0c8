"""Collect every run's summary.csv under a root into one table.

Usage::

    table, skipped = gather(Path("logs"))   # also writes logs/summary.csv
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from synhpc.atomic import write_csv
from synhpc.config import RUN_CONFIG

SUMMARY = "summary.csv"  # defined here, not in evaluation, so gather (login node) never imports torch


def gather(root: Path) -> tuple[pd.DataFrame, list[str]]:
    """Concatenate ``<root>/*/summary.csv``; runs without one are listed as skipped."""
    frames, skipped = [], []
    for run in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        path = run / SUMMARY
        if path.is_file():
            frames.append(pd.read_csv(path))
        elif (run / RUN_CONFIG).is_file():
            skipped.append(run.name)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if frames:
        write_csv(table, root / SUMMARY)
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
