import numpy as np
import pandas as pd
import pytest

from synhpc.errors import DataError
from synhpc.splits import assign_splits, check_splits


def synthetic_frame(n_neurons=40, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    roots = np.arange(n_neurons) + 10**17
    labels = (np.arange(n_neurons) % 3 != 0).astype(np.int8)
    counts = np.maximum(1, rng.lognormal(2.0, 1.0, n_neurons).astype(int))  # heavy-tailed ownership
    return pd.DataFrame({"pre_root_id": np.repeat(roots, counts), "label": np.repeat(labels, counts)})


def test_neuron_disjoint_and_every_split_has_both_classes():
    frame = synthetic_frame()
    split = assign_splits(frame, (0.7, 0.15, 0.15), seed=0)
    per_root = pd.DataFrame({"root": frame["pre_root_id"], "split": split}).groupby("root")["split"].nunique()
    assert (per_root == 1).all()
    for s in range(3):
        assert set(frame["label"][split == s]) == {0, 1}


def test_fractions_close_to_target_and_seeded():
    frame = synthetic_frame(200, seed=1)
    a = assign_splits(frame, (0.7, 0.15, 0.15), seed=3)
    b = assign_splits(frame, (0.7, 0.15, 0.15), seed=3)
    c = assign_splits(frame, (0.7, 0.15, 0.15), seed=4)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    share = np.bincount(a, minlength=3) / len(a)
    assert abs(share[0] - 0.7) < 0.08 and abs(share[1] - 0.15) < 0.06


def test_too_few_neurons_in_a_class_is_an_error():
    frame = pd.DataFrame({"pre_root_id": [1, 2, 3, 4, 5], "label": [1, 1, 1, 0, 0]})
    with pytest.raises(DataError, match="class inhibitory has 2 presynaptic neuron"):
        assign_splits(frame, (0.7, 0.15, 0.15), seed=0)


def test_check_splits_detects_leak_and_missing_class():
    with pytest.raises(DataError, match="presynaptic neuron 7 appears in two splits"):
        check_splits(np.array([7, 7, 8, 9]), np.array([1, 1, 0, 0]), np.array([0, 1, 1, 2]))
    with pytest.raises(DataError, match="split test has no excitatory synapses"):
        check_splits(np.array([1, 2, 3, 4, 5, 6]), np.array([1, 0, 1, 0, 0, 0]), np.array([0, 0, 1, 1, 2, 2]))
