"""Neuron-disjoint, label-stratified, seeded train/val/test splits.

A synapse-level split lets a model (or a connectivity feature) recognise the presynaptic neuron instead of the
synapse type; splitting by presynaptic root removes that leak.

Usage::

    split = assign_splits(frame, fractions=(0.7, 0.15, 0.15), seed=0)  # int8 per row: 0 train, 1 val, 2 test
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from synhpc.errors import DataError

SPLIT_NAMES = ("train", "val", "test")


def assign_splits(frame: pd.DataFrame, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Give each presynaptic neuron one split so that every split holds both classes and roughly ``fractions``
    of each class's synapses.

    Neurons are visited in a seeded random order and each goes to the split furthest below its synapse target.
    Heavy-tailed neurons (a few own most synapses) make exact fractions impossible; the greedy rule keeps them close.
    """
    targets = np.asarray(fractions, dtype=np.float64)
    rng = np.random.default_rng(seed)
    split_of_root: dict[int, int] = {}
    counts = frame.groupby(["label", "pre_root_id"]).size()
    for label in sorted(frame["label"].unique()):
        per_root = counts.loc[label]
        roots, sizes = per_root.index.to_numpy(), per_root.to_numpy()
        name = "excitatory" if label == 1 else "inhibitory"
        if len(roots) < len(targets):
            raise DataError(
                f"class {name} has {len(roots)} presynaptic neuron(s); a neuron-disjoint split needs at least {len(targets)}"
            )
        order = rng.permutation(len(roots))
        filled = np.zeros(len(targets))
        total = sizes.sum()
        # Seed val and test with one neuron each first so no split can end up without this class.
        for split, i in zip((1, 2), order[:2]):
            split_of_root[int(roots[i])] = split
            filled[split] += sizes[i]
        for i in order[2:]:
            deficit = targets * total - filled
            split = int(np.argmax(deficit))
            split_of_root[int(roots[i])] = split
            filled[split] += sizes[i]
    split = frame["pre_root_id"].map(split_of_root).to_numpy().astype(np.int8)
    check_splits(frame["pre_root_id"].to_numpy(), frame["label"].to_numpy(), split)
    return split


def check_splits(pre_root_id: np.ndarray, label: np.ndarray, split: np.ndarray) -> None:
    """Raise if a presynaptic neuron sits in two splits or a split lacks a class."""
    pairs = pd.DataFrame({"root": pre_root_id, "split": split}).drop_duplicates()
    shared = pairs["root"].duplicated()
    if shared.any():
        raise DataError(f"presynaptic neuron {int(pairs['root'][shared].iloc[0])} appears in two splits")
    for s, name in enumerate(SPLIT_NAMES):
        present = set(np.unique(label[split == s]).tolist())
        for value, cls in ((1, "excitatory"), (0, "inhibitory")):
            if value not in present:
                raise DataError(f"split {name} has no {cls} synapses")


def cap_per_neuron(pre_root_id: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Keep-mask holding at most ``cap`` random synapses of each presynaptic neuron (a few neurons own most
    synapses; uncapped, they dominate both training and the metrics)."""
    rng = np.random.default_rng([seed, 1])
    order = rng.permutation(len(pre_root_id))
    rank = pd.Series(pre_root_id[order]).groupby(pre_root_id[order]).cumcount().to_numpy()
    keep = np.zeros(len(pre_root_id), dtype=bool)
    keep[order[rank < cap]] = True
    return keep


def spatial_conflicts(positions_nm: np.ndarray, split: np.ndarray, block_nm: float) -> np.ndarray:
    """Drop-mask: in each cubic block holding synapses of several splits, those not of the block's largest split
    (ties go to train, then val), so nearby synapses never straddle splits."""
    blocks = np.floor(np.asarray(positions_nm) / block_nm).astype(np.int64)
    frame = pd.DataFrame({"bx": blocks[:, 0], "by": blocks[:, 1], "bz": blocks[:, 2], "split": split})
    counts = frame.groupby(["bx", "by", "bz", "split"]).size().rename("n").reset_index()
    counts = counts.sort_values(["bx", "by", "bz", "n", "split"], ascending=[True, True, True, False, True])
    winner = counts.drop_duplicates(["bx", "by", "bz"]).set_index(["bx", "by", "bz"])["split"]
    keep_split = winner.reindex(pd.MultiIndex.from_frame(frame[["bx", "by", "bz"]])).to_numpy()
    return keep_split != split


def balance_classes(label: np.ndarray, split: np.ndarray, seed: int) -> np.ndarray:
    """Keep-mask with, in every split, as many synapses of the majority class as the minority has."""
    rng = np.random.default_rng([seed, 2])
    keep = np.zeros(len(label), dtype=bool)
    for s in np.unique(split):
        idx = [np.flatnonzero((split == s) & (label == c)) for c in (0, 1)]
        n = min(len(i) for i in idx)
        for i in idx:
            keep[rng.choice(i, n, replace=False)] = True
    return keep
