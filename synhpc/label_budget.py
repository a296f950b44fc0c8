"""Training on a share of the labelled neurons (``labels.fraction``): the label budget of a label-efficiency curve.

Labels come per presynaptic neuron (a cell type labels all its synapses at once), so the budget is counted in
neurons, within each class: ``k_c = max(1, floor(fraction * n_c + 1/2))`` of the ``n_c`` training neurons of class c,
the first k_c of a seeded order of that class's neurons. The orders depend on (seed, class) only, so the neurons of a
smaller fraction are always among those of a larger one (5% within 10% within 25% ...). Validation and test never
change.

Usage::

    keep = neuron_subset(rows["pre_root_id"][train_idx], rows["label"][train_idx], fraction=0.1, seed=0)
    train_idx = train_idx[keep]
"""

from __future__ import annotations

import numpy as np

from synhpc.errors import DataError


def neurons_kept(n: int, fraction: float) -> int:
    """How many of ``n`` neurons of one class a fraction keeps (at least one; rounding half up)."""
    return min(n, max(1, int(np.floor(fraction * n + 0.5))))


def neuron_subset(pre_root_ids: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the rows whose presynaptic neuron is in the budget (see the module doc)."""
    roots = np.asarray(pre_root_ids, dtype=np.int64)
    labels = np.asarray(labels)
    keep_roots = []
    for cls in (0, 1):
        mine = np.unique(roots[labels == cls])
        if len(mine) == 0:
            raise DataError(f"labels.fraction: the train split has no {'excitatory' if cls else 'inhibitory'} neuron")
        order = np.random.default_rng([seed, cls]).permutation(mine)
        keep_roots.append(order[: neurons_kept(len(mine), fraction)])
    return np.isin(roots, np.concatenate(keep_roots))


def budget_record(pre_root_ids: np.ndarray, labels: np.ndarray, keep: np.ndarray, fraction: float, seed: int) -> dict:
    """What a model card says of the budget ``keep`` (:func:`neuron_subset` of ``fraction`` and ``seed``): fraction,
    seed, and the neurons and synapses kept per class."""
    roots, labels = np.asarray(pre_root_ids)[keep], np.asarray(labels)[keep]
    return {
        "fraction": float(fraction),
        "seed": int(seed),
        "train_neurons": {name: int(len(np.unique(roots[labels == c]))) for c, name in ((1, "excitatory"), (0, "inhibitory"))},
        "train_synapses": {name: int((labels == c).sum()) for c, name in ((1, "excitatory"), (0, "inhibitory"))},
    }
