import math

import numpy as np
import pandas as pd
import pytest

from synhpc.neuron_curve import BAND_COLUMNS, BASE_COLUMNS, CURVE_COLUMNS, accuracy_vs_synapses


def _pred():
    rows = []
    # test: A (E) one strong E synapse and two weak I ones; B (I) mostly I; C (I) a single wrong synapse; D (E) clean.
    for root, label, logits in (("A", 1, [3, -1, -1]), ("B", 0, [-1, -1, -1, 0.5]), ("C", 0, [2]), ("D", 1, [1] * 5)):
        rows += [("test", root, label, x) for x in logits]
    # val: two neurons with one E-ish and one I-ish synapse each: a 1-1 vote tie.
    for root, label in (("E", 0), ("F", 1)):
        rows += [("val", root, label, x) for x in (1.0, -1.0)]
    return pd.DataFrame(rows, columns=["split", "pre_root_id", "label", "logit"])


def _row(curve, split, k):
    return curve[(curve["split"] == split) & (curve["k"] == k)].iloc[0]


def test_columns_and_coverage():
    curve = accuracy_vs_synapses(_pred(), 0.5, ks=(1, 3, 4, 5, 10), n_draws=5)
    assert list(curve.columns) == CURVE_COLUMNS
    # The original columns come first, in their original order; bands and the support flag follow.
    assert CURVE_COLUMNS[:9] == BASE_COLUMNS == [
        "split", "k", "n_neurons", "n_excitatory", "n_inhibitory", "accuracy_mean_logit", "accuracy_majority",
        "balanced_accuracy_mean_logit", "balanced_accuracy_majority",
    ]  # fmt: skip
    assert CURVE_COLUMNS[9:] == [f"{r}_{e}" for r in BASE_COLUMNS[5:] for e in ("lo", "hi")] + ["low_support"]
    test = curve[curve["split"] == "test"].set_index("k")
    assert test["n_neurons"].tolist() == [4, 3, 2, 1, 0]
    assert test["low_support"].tolist() == [True] * 5  # never 5 neurons here
    assert test[BAND_COLUMNS].loc[10].isna().all()
    assert (test.loc[5, "n_excitatory"], test.loc[5, "n_inhibitory"]) == (1, 0)
    assert math.isnan(test.loc[10, "accuracy_mean_logit"])


def test_hand_computed_k3():
    # A: mean logit 1/3 -> E (right), 1 of 3 votes -> I (wrong). B: any 3 of its 4 synapses -> I by both rules. D right.
    r = _row(accuracy_vs_synapses(_pred(), 0.5, ks=(3,), n_draws=10), "test", 3)
    assert r["accuracy_mean_logit"] == 1.0
    assert r["accuracy_majority"] == pytest.approx(2 / 3)
    assert r["balanced_accuracy_mean_logit"] == 1.0
    assert r["balanced_accuracy_majority"] == pytest.approx((0.5 + 1.0) / 2)


def test_all_synapses_and_single_class_rows():
    curve = accuracy_vs_synapses(_pred(), 0.5, ks=(4, 5), n_draws=3)
    assert _row(curve, "test", 4)["accuracy_mean_logit"] == 1.0  # B and D
    assert _row(curve, "test", 5)["balanced_accuracy_majority"] == 1.0  # D alone: the one class present


def test_tie_goes_to_excitatory():
    r = _row(accuracy_vs_synapses(_pred(), 0.5, ks=(2,), n_draws=3), "val", 2)
    # Both neurons vote 1-1 -> excitatory; mean logit 0 -> sigmoid 0.5 >= tau -> excitatory. Only F (E) is right.
    assert r["accuracy_majority"] == 0.5 and r["accuracy_mean_logit"] == 0.5
    assert r["balanced_accuracy_mean_logit"] == 0.5


def test_k1_expectation_over_draws():
    # A right w.p. 1/3, B 3/4, C never, D always.
    r = _row(accuracy_vs_synapses(_pred(), 0.5, ks=(1,), n_draws=3000, seed=1), "test", 1)
    assert r["accuracy_mean_logit"] == pytest.approx((1 / 3 + 3 / 4 + 0 + 1) / 4, abs=0.01)
    assert r["accuracy_mean_logit"] == r["accuracy_majority"]  # one synapse: both rules agree


def test_seeded_and_probability_column_used():
    pred = _pred()
    a = accuracy_vs_synapses(pred, 0.5, ks=(1, 2), seed=4)
    pd.testing.assert_frame_equal(a, accuracy_vs_synapses(pred, 0.5, ks=(1, 2), seed=4))
    # Given probabilities drive the vote; the mean-logit rule still reads logits.
    flipped = pred.assign(probability=np.where(pred["logit"] > 0, 0.1, 0.9))
    r = _row(accuracy_vs_synapses(flipped, 0.5, ks=(5,)), "test", 5)
    assert r["accuracy_majority"] == 0.0 and r["accuracy_mean_logit"] == 1.0


def _deterministic(n_e=10, right_e=8, n_i=10, per=3):
    """Neurons with ``per`` identical synapses each: at k = per every draw calls a neuron the same way. Of the
    excitatory ones, ``right_e`` are called right; every inhibitory one is."""
    rows = []
    for j in range(n_e):
        rows += [("test", f"e{j}", 1, 2.0 if j < right_e else -2.0)] * per
    for j in range(n_i):
        rows += [("test", f"i{j}", 0, -2.0)] * per
    return pd.DataFrame(rows, columns=["split", "pre_root_id", "label", "logit"])


def test_band_is_the_percentile_interval_of_resampled_neurons():
    # Stratified resampling: inhibitory accuracy is always 1, excitatory accuracy is X/10 with X ~ Binomial(10, 0.8),
    # whose 2.5% and 97.5% quantiles are 5 and 10 (P(X <= 4) = 0.006, P(X <= 5) = 0.033, P(X <= 9) = 0.89).
    r = _row(accuracy_vs_synapses(_deterministic(), 0.5, ks=(3,), n_draws=2, n_boot=4000, seed=0), "test", 3)
    assert r["accuracy_mean_logit"] == 0.9 and r["balanced_accuracy_mean_logit"] == 0.9
    assert (r["accuracy_mean_logit_lo"], r["accuracy_mean_logit_hi"]) == (pytest.approx(15 / 20), 1.0)
    assert (r["balanced_accuracy_mean_logit_lo"], r["balanced_accuracy_mean_logit_hi"]) == (pytest.approx(0.75), 1.0)
    assert (r["accuracy_majority_lo"], r["accuracy_majority_hi"]) == (pytest.approx(0.75), 1.0)
    assert not r["low_support"]


def test_all_right_gives_a_point_band_and_bands_narrow_with_more_neurons():
    r = _row(accuracy_vs_synapses(_deterministic(right_e=10), 0.5, ks=(3,), n_boot=200), "test", 3)
    assert all(r[c] == 1.0 for c in BAND_COLUMNS)
    widths = []
    for n in (10, 40, 160):
        r = _row(accuracy_vs_synapses(_deterministic(n_e=n, right_e=n * 7 // 10, n_i=n), 0.5, ks=(3,), n_draws=1, n_boot=500), "test", 3)
        assert r["accuracy_mean_logit_lo"] <= r["accuracy_mean_logit"] <= r["accuracy_mean_logit_hi"]
        widths.append(r["accuracy_mean_logit_hi"] - r["accuracy_mean_logit_lo"])
    assert widths[0] > widths[1] > widths[2]


def test_bands_do_not_move_the_points_and_are_seeded():
    pred = _deterministic(right_e=6).assign(logit=lambda f: f["logit"] + np.random.default_rng(0).normal(0, 3, len(f)))
    plain = accuracy_vs_synapses(pred, 0.5, ks=(1, 2, 3), n_boot=0)
    banded = accuracy_vs_synapses(pred, 0.5, ks=(1, 2, 3), n_boot=300, seed=0)
    pd.testing.assert_frame_equal(plain[BASE_COLUMNS], banded[BASE_COLUMNS], check_exact=True)
    assert plain[BAND_COLUMNS].isna().all().all() and banded[BAND_COLUMNS].notna().all().all()
    pd.testing.assert_frame_equal(banded, accuracy_vs_synapses(pred, 0.5, ks=(1, 2, 3), n_boot=300, seed=0))
    other = accuracy_vs_synapses(pred, 0.5, ks=(1, 2, 3), n_boot=300, seed=1)
    assert not np.array_equal(banded[BAND_COLUMNS].to_numpy(), other[BAND_COLUMNS].to_numpy())


def test_low_support_flag_follows_the_neuron_count():
    curve = accuracy_vs_synapses(_pred(), 0.5, ks=(1, 3, 4, 5, 10), n_draws=2, n_boot=20, min_neurons=2)
    test = curve[curve["split"] == "test"]
    assert test["low_support"].tolist() == [False, False, False, True, True]
    assert curve["low_support"].dtype == bool


def test_bad_parameters():
    for kwargs in ({"n_boot": -1}, {"alpha": 0.0}, {"n_draws": 0}):
        with pytest.raises(ValueError):
            accuracy_vs_synapses(_pred(), 0.5, **kwargs)
