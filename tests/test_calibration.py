import inspect
import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, log_loss

from synhpc.calibration import BIN_COLUMNS, T_BOUNDS, apply_temperature, brier_score, expected_calibration_error, fit_temperature, nll
from synhpc.errors import DataError
from synhpc.metrics import sigmoid


def _synthetic(t0, n=40_000, seed=0):
    """Logits z and labels drawn from sigmoid(z / t0): the calibrating temperature is t0."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 3.0, n)
    y = (rng.random(n) < sigmoid(z / t0)).astype(int)
    return z, y


def test_ece_hand_computed_uniform_bins():
    labels = np.array([0, 1, 1, 0])
    probs = np.array([0.1, 0.5, 0.8, 0.9])
    ece, bins = expected_calibration_error(labels, probs, n_bins=2)
    # [0, 0.5]: 0.1 and 0.5 (0.5 sits on the edge: right-closed bins) -> mean 0.3, half positive, gap -0.2.
    # (0.5, 1]: 0.8 and 0.9 -> mean 0.85, half positive, gap 0.35. ECE = (2 * 0.2 + 2 * 0.35) / 4.
    assert list(bins.columns) == BIN_COLUMNS
    assert bins["count"].tolist() == [2, 2]
    assert bins["lo"].tolist() == [0.0, 0.5] and bins["hi"].tolist() == [0.5, 1.0]
    np.testing.assert_allclose(bins["mean_probability"], [0.3, 0.85])
    np.testing.assert_allclose(bins["fraction_positive"], [0.5, 0.5])
    np.testing.assert_allclose(bins["gap"], [-0.2, 0.35])
    assert ece == pytest.approx((2 * 0.2 + 2 * 0.35) / 4)


def test_ece_empty_bins_weigh_nothing_and_extremes_are_binned():
    ece, bins = expected_calibration_error(np.array([0, 1, 1]), np.array([0.0, 1.0, 1.0]), n_bins=4)
    assert bins["count"].tolist() == [1, 0, 0, 2]
    assert math.isnan(bins.loc[1, "mean_probability"]) and math.isnan(bins.loc[2, "gap"])
    assert ece == 0.0


def test_ece_perfect_and_worst_case():
    assert expected_calibration_error(np.array([1, 0]), np.array([1.0, 0.0]))[0] == 0.0
    assert expected_calibration_error(np.array([0, 1]), np.array([1.0, 0.0]))[0] == 1.0


def test_ece_quantile_bins_hold_equal_mass_and_keep_ties_together():
    probs = np.linspace(0.05, 0.95, 8)
    _, bins = expected_calibration_error(np.array([0, 0, 0, 1, 0, 1, 1, 1]), probs, n_bins=4, strategy="quantile")
    assert bins["count"].tolist() == [2, 2, 2, 2]
    tied = np.array([0.2] * 6 + [0.9] * 2)
    _, bins = expected_calibration_error(np.array([0, 1, 0, 0, 1, 0, 1, 1]), tied, n_bins=4, strategy="quantile")
    assert sorted(bins["count"][bins["count"] > 0].tolist()) == [2, 6]
    assert bins["count"].sum() == 8


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_ece_bins_match_scikit_learn_calibration_curve(strategy):
    for seed in range(5):
        z, y = _synthetic(1.5, n=3000, seed=seed)
        probs = np.round(sigmoid(z), 2 if seed % 2 else 12)  # ties on bin edges in half of the cases
        _, bins = expected_calibration_error(y, probs, n_bins=10, strategy=strategy)
        true, pred = calibration_curve(y, probs, n_bins=10, strategy=strategy)
        full = bins[bins["count"] > 0]
        np.testing.assert_allclose(full["fraction_positive"], true, rtol=0, atol=1e-12)
        np.testing.assert_allclose(full["mean_probability"], pred, rtol=0, atol=1e-12)


def test_brier_hand_computed_and_parity():
    assert brier_score(np.array([1, 0]), np.array([0.8, 0.3])) == pytest.approx((0.2**2 + 0.3**2) / 2)
    z, y = _synthetic(2.0, n=2000)
    assert brier_score(y, sigmoid(z)) == pytest.approx(brier_score_loss(y, sigmoid(z)), abs=1e-15)
    assert brier_score(np.ones(3, dtype=int), np.array([1.0, 1.0, 1.0])) == 0.0  # one class is fine here


@pytest.mark.parametrize("t0", [0.5, 2.0, 4.0])
def test_temperature_recovers_the_generating_temperature(t0):
    z, y = _synthetic(t0)
    t = fit_temperature(z, y)
    assert t == pytest.approx(t0, rel=0.05)
    # The fitted T is the NLL minimiser: nudging it either way does not help.
    assert nll(y, apply_temperature(z, t)) <= min(nll(y, apply_temperature(z, t * 1.01)), nll(y, apply_temperature(z, t / 1.01)))


def test_calibration_improves_ece_on_overconfident_logits():
    z, y = _synthetic(2.5, seed=1)
    before = expected_calibration_error(y, sigmoid(z))[0]
    after = expected_calibration_error(y, sigmoid(apply_temperature(z, fit_temperature(z, y))))[0]
    assert before > 0.08 and after < 0.02
    assert nll(y, z) == pytest.approx(log_loss(y, sigmoid(z)), rel=1e-9)


def test_unit_temperature_is_identity_and_fit_is_deterministic():
    z, y = _synthetic(1.0, seed=2)
    assert np.array_equal(apply_temperature(z, 1.0), z)
    assert fit_temperature(z, y) == pytest.approx(1.0, rel=0.05)
    assert fit_temperature(z, y) == fit_temperature(z.copy(), y.copy())


def test_fit_takes_validation_arrays_only():
    assert list(inspect.signature(fit_temperature).parameters) == ["val_logits", "val_labels", "bounds"]
    assert inspect.signature(fit_temperature).parameters["bounds"].kind is inspect.Parameter.KEYWORD_ONLY


def test_degenerate_inputs_give_a_defined_result_or_a_one_line_error():
    with pytest.raises(DataError, match="one class"):
        fit_temperature(np.array([1.0, 2.0]), np.array([1, 1]))
    with pytest.raises(DataError, match="no predictions"):
        fit_temperature(np.array([]), np.array([]))
    with pytest.raises(DataError, match="not finite"):
        fit_temperature(np.array([1.0, np.nan]), np.array([0, 1]))
    with pytest.raises(DataError, match="0 .inhibitory. or 1"):
        fit_temperature(np.array([1.0, 2.0]), np.array([0, 2]))
    with pytest.raises(DataError, match="2 labels for 3"):
        fit_temperature(np.array([1.0, 2.0, 3.0]), np.array([0, 1]))
    with pytest.raises(DataError, match="temperature"):
        apply_temperature(np.array([1.0]), 0.0)
    # All-zero logits do not depend on T.
    assert fit_temperature(np.zeros(4), np.array([0, 1, 0, 1])) == 1.0
    # All-equal logits with balanced labels: the best calibration is P = 0.5, i.e. the largest T allowed.
    assert fit_temperature(np.full(4, 2.0), np.array([0, 1, 0, 1])) == T_BOUNDS[1]
    # Separable validation data: confidence grows without limit, the fit stops exactly at the lower bound.
    assert fit_temperature(np.array([-1.0, -0.5, 0.5, 1.0]), np.array([0, 0, 1, 1])) == T_BOUNDS[0]
    # Anti-informative logits: no T > 0 flips the sign, so the flattest one is best.
    assert fit_temperature(np.array([-1.0, 1.0]), np.array([1, 0])) == T_BOUNDS[1]
    for fn in (brier_score, lambda y, p: expected_calibration_error(y, p)):
        with pytest.raises(DataError):
            fn(np.array([], dtype=int), np.array([]))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        expected_calibration_error(np.array([0, 1]), np.array([-0.1, 0.5]))
