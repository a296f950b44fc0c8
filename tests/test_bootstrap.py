import numpy as np
import pandas as pd
import pytest

from synhpc.bootstrap import bootstrap_distribution, neuron_bootstrap_ci, neuron_metric, synapse_metric


def _noisy(n_neurons, per=10, seed=0):
    """Neurons with shared labels and noisy, weakly informative synapse scores (ties included)."""
    rng = np.random.default_rng(seed)
    labels = np.tile([0, 1], n_neurons // 2)
    frame = pd.DataFrame({"pre_root_id": np.repeat(1000 + 3 * np.arange(n_neurons), per), "label": np.repeat(labels, per)})
    # A per-neuron offset makes synapses of one neuron correlated, as in real data.
    offset = np.repeat(rng.normal(0, 0.15, n_neurons), per)
    frame["probability"] = np.round(np.clip(0.35 + 0.3 * frame["label"] + offset + rng.normal(0, 0.2, len(frame)), 0.01, 0.99), 2)
    frame["logit"] = np.log(frame["probability"] / (1 - frame["probability"]))
    return frame


@pytest.mark.parametrize("name", ["accuracy", "balanced_accuracy", "roc_auc", "mcc"])
def test_ci_contains_point_estimate(name):
    frame = _noisy(40)
    for fn in (synapse_metric(name, 0.5), neuron_metric(name, 0.5)):
        lo, hi = neuron_bootstrap_ci(frame, fn, n_boot=300)
        assert lo <= fn(frame) <= hi


@pytest.mark.parametrize("name", ["accuracy", "balanced_accuracy", "roc_auc", "mcc"])
@pytest.mark.parametrize("stratify", [True, False])
def test_vectorised_path_equals_generic_resampling_exactly(name, stratify):
    # Integer weights keep every sum exact, so the fast path is bit-identical to scoring the duplicated rows; four
    # neurons unstratified give one-class resamples (NaN AUC, 0 MCC) too.
    for frame in (_noisy(20, per=7), _noisy(4, per=5, seed=2), _noisy(12, per=6, seed=3).assign(probability=lambda f: f["probability"].round(1))):
        for fn in (synapse_metric(name, 0.45), neuron_metric(name, 0.45)):
            fast = bootstrap_distribution(frame, fn, n_boot=12, seed=3, stratify=stratify)
            slow = bootstrap_distribution(frame, lambda f, fn=fn: fn(f), n_boot=12, seed=3, stratify=stratify)  # DataFrame path
            np.testing.assert_array_equal(fast, slow)


def test_vectorised_auc_with_labels_that_vary_within_a_neuron():
    # Not the E/I setting (a neuron has one transmitter), but the weighted AUC must not rely on it.
    frame = _noisy(10, per=6, seed=4)
    frame["label"] = np.random.default_rng(0).integers(0, 2, len(frame))
    fn = synapse_metric("roc_auc", 0.5)
    fast = bootstrap_distribution(frame, fn, n_boot=30, seed=1)
    np.testing.assert_array_equal(fast, bootstrap_distribution(frame, lambda f: fn(f), n_boot=30, seed=1))


def test_perfect_classification_gives_one():
    frame = _noisy(10)
    frame["probability"] = np.where(frame["label"] == 1, 0.9, 0.1)
    for name in ("accuracy", "balanced_accuracy", "roc_auc", "mcc"):
        assert neuron_bootstrap_ci(frame, synapse_metric(name, 0.5), n_boot=200) == (1.0, 1.0)


def test_width_shrinks_with_more_neurons():
    fn = synapse_metric("balanced_accuracy", 0.5)
    widths = []
    for n in (10, 40, 160):
        lo, hi = neuron_bootstrap_ci(_noisy(n, seed=1), fn, n_boot=400)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]


def test_seed_determinism():
    frame, fn = _noisy(30), synapse_metric("roc_auc", 0.5)
    assert neuron_bootstrap_ci(frame, fn, seed=5) == neuron_bootstrap_ci(frame, fn, seed=5)
    assert neuron_bootstrap_ci(frame, fn, seed=5) != neuron_bootstrap_ci(frame, fn, seed=6)


def test_resamples_neurons_not_synapses():
    # 19 small neurons classified right, one big neuron whose 100 synapses are all wrong: whether that neuron is
    # drawn 0, 1 or 2+ times swings accuracy widely, while synapse resampling only sees binomial noise.
    pre = np.concatenate([np.repeat(np.arange(19), 5), np.full(100, 99)])
    label = np.concatenate([np.repeat(np.arange(19) % 2, 5), np.ones(100, dtype=int)])
    prob = np.where(label == 1, 0.9, 0.1)
    prob[-100:] = 0.1
    frame = pd.DataFrame({"pre_root_id": pre, "label": label, "probability": prob})
    fn = synapse_metric("accuracy", 0.5)
    lo_n, hi_n = neuron_bootstrap_ci(frame, fn, n_boot=1000, stratify=False)
    lo_s, hi_s = neuron_bootstrap_ci(frame.assign(pre_root_id=np.arange(len(frame))), fn, n_boot=1000, stratify=False)
    assert (hi_n - lo_n) > 3 * (hi_s - lo_s)
    assert lo_n < 0.35 and hi_n == 1.0  # the big neuron is missing from some resamples


def test_neuron_drawn_twice_counts_twice_for_generic_metric():
    frame = _noisy(6, per=3)
    seen = []
    bootstrap_distribution(frame, lambda f: seen.append(f["pre_root_id"].nunique()) or 0.0, n_boot=50)
    assert set(seen) == {6}
