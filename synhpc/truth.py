"""The synthetic world's ground truth, read only by tests and the demo's report: how well prediction labels the
orphan axons (presynaptic neurons the cell-type table does not list), whose true classes only the world knows.

Usage::

    truth = read_truth(cfg.world.path)                      # pre_root_id, true_label, in_cell_type_table, ...
    orphans = truth.loc[~truth["in_cell_type_table"], "pre_root_id"]
    report = score_roots(pd.read_csv(run.roots), truth)     # per-root accuracy by synapses per root
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from synhpc.errors import DataError

# Synapses-per-root bins of the report: [1, 5), [5, 10), [10, 20), [20, 50), [50, inf).
BINS = (1, 5, 10, 20, 50)


def read_truth(world_path: str | Path) -> pd.DataFrame:
    from synhpc.world import TRUTH_FILE

    path = Path(world_path) / TRUTH_FILE
    if not path.is_file():
        raise DataError(f"{path}: no truth file (only the synthetic world writes one)")
    return pd.read_csv(path, keep_default_na=False)


def score_roots(roots: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Per synapses-per-root bin (and for roots with >= 10 synapses): roots, how many got a call, accuracy of the
    calls made, and accuracy of the sign of the mean log-odds (a call for every root)."""
    joined = roots.merge(truth[["pre_root_id", "true_label"]], on="pre_root_id", how="inner")
    if len(joined) < len(roots):
        missing = sorted(set(roots["pre_root_id"]) - set(joined["pre_root_id"]))
        raise DataError(f"root {missing[0]} has predictions but no truth row")
    called = joined["call"] != "undetermined"
    correct_call = (joined["call"] == "excitatory").astype(int) == joined["true_label"]
    correct_sign = (joined["mean_log_odds"] >= 0).astype(int) == joined["true_label"]
    rows = []
    edges = [*BINS, np.inf]
    groups = [(f"{lo}-{hi - 1}" if np.isfinite(hi) else f">={lo}", (joined["n_synapses"] >= lo) & (joined["n_synapses"] < hi)) for lo, hi in zip(edges[:-1], edges[1:])]
    groups.append((">=10", joined["n_synapses"] >= 10))
    groups.append(("all", np.ones(len(joined), dtype=bool)))
    for name, mask in groups:
        mask = np.asarray(mask)
        n_called = int((mask & called).sum())
        rows.append({
            "synapses_per_root": name,
            "roots": int(mask.sum()),
            "called": n_called,
            "call_accuracy": float(correct_call[mask & called].mean()) if n_called else np.nan,
            "sign_accuracy": float(correct_sign[mask].mean()) if mask.any() else np.nan,
        })  # fmt: skip
    return pd.DataFrame(rows)
