import math

import numpy as np
import pandas as pd
import pytest

from synhpc.neuron_curve import CURVE_COLUMNS, accuracy_vs_synapses


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
    test = curve[curve["split"] == "test"].set_index("k")
    assert test["n_neurons"].tolist() == [4, 3, 2, 1, 0]
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
