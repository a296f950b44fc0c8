import numpy as np
import pandas as pd
import pytest

from synhpc.baselines import (
    FEATURES,
    PRIOR_STRENGTH,
    connectivity_baseline,
    connectivity_features,
    leaky_presynaptic_fraction,
    majority_baseline,
    target_baseline,
)
from synhpc.metrics import binary_metrics, choose_threshold
from synhpc.splits import assign_splits


def _table(seed=0, n_neurons=300, n_post=1500, informative=False):
    """Presynaptic neurons whose synapses share the neuron's label. Null table: sizes and post roots are random, so
    nothing but the neuron's identity predicts the label. Informative table: E and I neurons send 75% of their
    synapses into different post-root pools."""
    rng = np.random.default_rng(seed)
    neuron_label = rng.permutation(np.arange(n_neurons) % 2)
    n = rng.integers(5, 40, n_neurons)
    pre = np.repeat(10**17 + np.arange(n_neurons), n)
    label = np.repeat(neuron_label, n)
    if informative:
        pool = np.where(rng.random(len(pre)) < 0.75, label, 1 - label)
        post = pool * (n_post // 2) + rng.integers(0, n_post // 2, len(pre))
    else:
        post = rng.integers(0, n_post, len(pre))
    return pd.DataFrame(
        {
            "synapse_id": np.arange(len(pre)),
            "pre_root_id": pre,
            "post_root_id": 5 * 10**17 + post,
            "size": rng.lognormal(6, 1, len(pre)).astype(int),
            "label": label,
        }
    )


def _synapse_split(frame, seed=0):
    return np.random.default_rng(seed).choice(3, size=len(frame), p=[0.7, 0.15, 0.15]).astype(np.int8)


def _test_score(frame, split, baseline):
    """Balanced accuracy on test with the threshold chosen on val, as the real evaluation does."""
    train, val, test = (frame[split == s] for s in (0, 1, 2))
    tau, _ = choose_threshold(val["label"].to_numpy(), baseline(train, val))
    return binary_metrics(test["label"].to_numpy(), baseline(train, test), tau)["balanced_accuracy"]


@pytest.fixture(scope="module")
def null_table():
    return _table(seed=0)


def test_leak_demonstration(null_table):
    frame = null_table
    synapse_split, neuron_split = _synapse_split(frame), assign_splits(frame, (0.7, 0.15, 0.15), seed=0)
    # The original 'meta model' looks perfect when a neuron's synapses sit on both sides of the split...
    assert _test_score(frame, synapse_split, leaky_presynaptic_fraction) > 0.98
    # ...and is at chance once test neurons are unseen.
    assert abs(_test_score(frame, neuron_split, leaky_presynaptic_fraction) - 0.5) < 0.1
    # The leak-free connectivity model has nothing to find here, whichever split.
    assert abs(_test_score(frame, synapse_split, connectivity_baseline) - 0.5) < 0.1
    assert abs(_test_score(frame, neuron_split, connectivity_baseline) - 0.5) < 0.1


def test_connectivity_finds_real_partner_signal():
    frame = _table(seed=1, n_post=200, informative=True)
    split = assign_splits(frame, (0.7, 0.15, 0.15), seed=1)
    assert _test_score(frame, split, connectivity_baseline) > 0.65


def test_majority_baseline_is_chance(null_table):
    train, test = null_table.iloc[:4000], null_table.iloc[4000:]
    probs = majority_baseline(train, test)
    assert len(np.unique(probs)) == 1 and probs[0] in (0.0, 1.0)
    m = binary_metrics(test["label"].to_numpy(), probs, 0.5)
    assert m["balanced_accuracy"] == 0.5 and m["roc_auc"] == 0.5


def test_features_exclude_own_presynaptic_neuron():
    train = pd.DataFrame(
        {
            "pre_root_id": [1, 1, 1, 2, 3],
            "post_root_id": [10, 10, 11, 10, 11],
            "size": [100, 200, 300, 400, 500],
            "label": [1, 1, 1, 0, 0],
        }
    )
    evaluate = pd.DataFrame({"pre_root_id": [1, 2, 9, 9], "post_root_id": [10, 10, 10, 99], "size": [50, 50, 50, 50]}, index=[7, 8, 9, 5])
    prior = 3 / 5
    f = connectivity_features(evaluate, train)
    assert list(f.columns) == FEATURES and list(f.index) == [7, 8, 9, 5]
    # Neuron 1 onto post 10: only neuron 2's (inhibitory) synapse counts, never its own two excitatory ones.
    assert f.loc[7, "post_exc_fraction"] == pytest.approx((0 + PRIOR_STRENGTH * prior) / (1 + PRIOR_STRENGTH))
    assert f.loc[7, "log_post_synapses"] == pytest.approx(np.log1p(1))
    # Neuron 2 onto post 10: neuron 1's two excitatory synapses.
    assert f.loc[8, "post_exc_fraction"] == pytest.approx((2 + PRIOR_STRENGTH * prior) / (2 + PRIOR_STRENGTH))
    # An unseen neuron sees all three; an unseen post root gets the prior.
    assert f.loc[9, "post_exc_fraction"] == pytest.approx((2 + PRIOR_STRENGTH * prior) / (3 + PRIOR_STRENGTH))
    assert f.loc[5, "post_exc_fraction"] == pytest.approx(prior) and f.loc[5, "post_seen"] == 0


def test_leaky_fraction_values_and_prior():
    train = pd.DataFrame({"pre_root_id": [1, 1, 2], "label": [1, 0, 0]})
    evaluate = pd.DataFrame({"pre_root_id": [1, 2, 3]})
    np.testing.assert_allclose(leaky_presynaptic_fraction(train, evaluate), [0.5, 0.0, 1 / 3])


def test_connectivity_baseline_seeded(null_table):
    train, test = null_table.iloc[:4000], null_table.iloc[4000:]
    a = connectivity_baseline(train, test, seed=3)
    np.testing.assert_array_equal(a, connectivity_baseline(train, test, seed=3))
    assert a.shape == (len(test),) and ((a >= 0) & (a <= 1)).all()


# Spine / shaft / soma shares per class, as the synthetic world draws them (excitatory axons mostly onto spines).
_TARGET_P = {1: [0.80, 0.18, 0.02], 0: [0.25, 0.55, 0.20]}


def _with_targets(frame, seed=0, informative=True):
    rng = np.random.default_rng(seed)
    tags = np.array(["spine", "shaft", "soma"])
    if informative:
        u = rng.random(len(frame))
        cum = np.array([np.cumsum(_TARGET_P[int(v)]) for v in frame["label"]])
        target = tags[(u[:, None] > cum).sum(axis=1)]
    else:
        target = tags[rng.integers(0, 3, len(frame))]
    return frame.assign(target=target)


def test_target_baseline_values_prior_and_missing_tags():
    train = pd.DataFrame({"target": ["spine", "spine", "spine", "shaft", "shaft", None], "label": [1, 1, 0, 0, 0, 1]})
    evaluate = pd.DataFrame({"target": ["spine", "shaft", "soma", None]})
    prior = 3 / 6
    expected = [
        (2 + PRIOR_STRENGTH * prior) / (3 + PRIOR_STRENGTH),  # spine: 2 of 3 excitatory
        (0 + PRIOR_STRENGTH * prior) / (2 + PRIOR_STRENGTH),  # shaft: 0 of 2
        prior,  # a tag never seen in training
        prior,  # no prediction for this synapse
    ]
    np.testing.assert_allclose(target_baseline(train, evaluate), expected)
    np.testing.assert_allclose(target_baseline(train, evaluate, prior_strength=0.0)[:2], [2 / 3, 0.0])
    with pytest.raises(ValueError, match="the evaluated frame has no 'target' column"):
        target_baseline(train, evaluate.rename(columns={"target": "tag"}))


def test_target_baseline_reads_only_training_labels():
    frame = _with_targets(_table(seed=2))
    train, test = frame.iloc[:5000], frame.iloc[5000:]
    a = target_baseline(train, test)
    b = target_baseline(train, test.assign(label=1 - test["label"]))
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 3  # one score per compartment


def test_target_baseline_finds_the_compartment_shortcut_on_neuron_disjoint_splits(null_table):
    informative = _with_targets(null_table, seed=1)
    split = assign_splits(informative, (0.7, 0.15, 0.15), seed=0)
    # With these shares the best rule (spine -> excitatory) scores (0.80 + 0.75) / 2 = 0.775 on balanced accuracy.
    assert abs(_test_score(informative, split, target_baseline) - 0.775) < 0.04
    # Compartments drawn independently of the class carry nothing.
    assert abs(_test_score(_with_targets(null_table, seed=1, informative=False), split, target_baseline) - 0.5) < 0.06
