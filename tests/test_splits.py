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


def test_cap_per_neuron_keeps_at_most_cap_each():
    from synhpc.splits import cap_per_neuron

    roots = np.repeat([1, 2, 3], [50, 5, 2])
    keep = cap_per_neuron(roots, 4, seed=0)
    assert pd.Series(roots[keep]).value_counts().sort_index().tolist() == [4, 4, 2]
    np.testing.assert_array_equal(keep, cap_per_neuron(roots, 4, seed=0))


def test_spatial_conflicts_leave_one_split_per_block():
    from synhpc.splits import spatial_conflicts

    pos = np.array([[10, 10, 10], [20, 20, 20], [30, 30, 30], [1500, 10, 10], [1600, 10, 10]], dtype=float)
    split = np.array([0, 0, 2, 1, 1])
    drop = spatial_conflicts(pos, split, block_nm=1000.0)
    assert drop.tolist() == [False, False, True, False, False]  # the test synapse sat among train synapses


def test_balance_classes_equalises_each_split():
    from synhpc.splits import balance_classes

    label = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 1])
    split = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    keep = balance_classes(label, split, seed=0)
    for s in range(3):
        kept = label[keep & (split == s)]
        assert (kept == 1).sum() == (kept == 0).sum() == 1


def test_manifest_options_report_their_drops(extracted_run, tmp_path):
    from synhpc.config import load_config
    from synhpc.manifest import plan_manifest

    _, args = extracted_run
    cfg = load_config("configs/demo.yaml", [*args, "split.max_per_neuron=10", "split.spatial_block_um=0.15", "split.balance_classes=true"])
    frame, drops, _, _ = plan_manifest(cfg)
    assert frame.groupby("pre_root_id").size().max() <= 10
    for s in range(3):
        labels = frame["label"][frame["split"] == s]
        assert (labels == 1).sum() == (labels == 0).sum()
    assert drops["split_neuron_cap"] > 0 and "split_spatial_conflict" in drops and drops["split_class_balance"] >= 0
    assert (frame.groupby("pre_root_id")["split"].nunique() == 1).all()
    # Voxel centres still belong to their own rows after rows were dropped.
    np.testing.assert_array_equal(frame[["cx", "cy", "cz"]].to_numpy(), np.floor(frame[["x", "y", "z"]].to_numpy() * [0.5, 0.5, 1]).astype(np.int64))
