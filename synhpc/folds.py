"""k-fold cross-validation by neuron: one run per fold (``<run.name>-fold<f>``: test = fold f, validation = fold f+1,
training = the rest), each extracted, trained and evaluated like any run, and one summary of their spread.

Usage::

    for fold_cfg in fold_configs(cfg):        # cfg.split.folds = k >= 3
        ...                                   # extract, train, evaluate (or submit) each
    table = cv_summary(gathered)              # mean, sd, min, max per (model, level, split) over the folds
"""

from __future__ import annotations

import copy
import re

import pandas as pd

from synhpc.config import Config
from synhpc.errors import ConfigError

FOLD_NAME = re.compile(r"^(?P<base>.+)-fold(?P<fold>\d+)$")
CV_METRICS = ("balanced_accuracy", "roc_auc", "mcc", "accuracy", "ece_after")


def fold_configs(cfg: Config) -> list[Config]:
    """One config per fold; ``split.fold`` and ``run.name`` differ, everything else is ``cfg``."""
    if cfg.split.folds < 3:
        raise ConfigError("split.folds must be >= 3 for cross-validation (e.g. split.folds=5)")
    if FOLD_NAME.match(cfg.run.name):
        raise ConfigError(f"run.name '{cfg.run.name}' already names a fold; give the cross-validation's own name")
    out = []
    for fold in range(cfg.split.folds):
        one = copy.deepcopy(cfg)
        one.split.fold = fold
        one.run.name = f"{cfg.run.name}-fold{fold}"
        out.append(one)
    return out


def cv_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per cross-validation (run name without its fold suffix), model, level and split: folds, and the mean,
    standard deviation, minimum and maximum of each metric over the folds."""
    names = table["run"].astype(str).str.extract(FOLD_NAME)
    folds = table[names["base"].notna()].assign(cv=names["base"].dropna())
    if folds.empty:
        return pd.DataFrame()
    metrics = [m for m in CV_METRICS if m in folds.columns]
    grouped = folds.groupby(["cv", "model", "level", "split"], sort=True)
    out = grouped.agg(folds=("run", "nunique"), n=("n", "sum"))
    for metric in metrics:
        stats = grouped[metric].agg(["mean", "std", "min", "max"])
        out[[f"{metric}_{s}" for s in ("mean", "sd", "min", "max")]] = stats.to_numpy()
    return out.reset_index()
