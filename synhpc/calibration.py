"""Probability calibration: temperature scaling fitted on validation, Brier score and expected calibration error.

A network trained with cross-entropy ranks synapses well but is often over- or under-confident; per-axon calls that
add synapse log-odds inherit that error once per synapse. Temperature scaling divides every logit by one scalar
T > 0 chosen to minimise the validation negative log-likelihood: rankings, ROC-AUC and (with the threshold rescaled
alike) decisions are unchanged, only confidence moves.

Usage::

    T = fit_temperature(val_logits, val_labels)                  # validation only: the API takes nothing else
    test_probs = sigmoid(apply_temperature(test_logits, T))
    brier = brier_score(test_labels, test_probs)
    ece, bins = expected_calibration_error(test_labels, test_probs, n_bins=15)   # bins: one row per bin, for plots
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar

from synhpc.errors import DataError

# T outside [1e-2, 1e2] means the validation set is separable or carries no signal; the fit then stops at the bound.
T_BOUNDS = (1e-2, 1e2)
BIN_COLUMNS = ["bin", "lo", "hi", "count", "mean_probability", "fraction_positive", "gap"]


def _labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{where}: {len(y)} labels for {n} predictions")
    if len(y) == 0:
        raise DataError(f"{where}: no predictions")
    if not np.isin(y, (0, 1)).all():
        raise DataError(f"{where}: labels must be 0 (inhibitory) or 1 (excitatory)")
    return y.astype(np.float64)


def _finite(values: np.ndarray, where: str, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise DataError(f"{where}: {what} must be one-dimensional")
    if not np.isfinite(x).all():
        raise DataError(f"{where}: {int((~np.isfinite(x)).sum())} of {len(x)} {what} are not finite")
    return x


def nll(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy (natural log) of ``sigmoid(logits)`` against ``labels``, computed stably.

    Usage::

        before, after = nll(y, z), nll(y, apply_temperature(z, T))
    """
    z = _finite(logits, "nll", "logits")
    y = _labels(labels, len(z), "nll")
    # -log sigmoid(z) for positives and -log(1 - sigmoid(z)) for negatives, both as log(1 + exp(-s z)).
    return float(np.mean(np.logaddexp(0.0, -(2.0 * y - 1.0) * z)))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated logits ``logits / temperature`` (float64); squash with ``metrics.sigmoid`` for probabilities.

    Usage::

        probs = sigmoid(apply_temperature(logits, T))
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise DataError(f"temperature must be a finite number > 0, got {temperature}")
    return np.asarray(logits, dtype=np.float64) / float(temperature)


def fit_temperature(val_logits: np.ndarray, val_labels: np.ndarray, *, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The T in ``bounds`` minimising the validation NLL of ``sigmoid(val_logits / T)``.

    The NLL is convex in 1/T, hence unimodal in log T, so a bounded Brent search on log T finds the global minimum
    deterministically; the two bounds are compared too, so separable data or an anti-informative model ends exactly
    at a bound instead of near it. All-zero logits do not depend on T and give T = 1. Validation arrays only: the
    signature leaves no room for test data. Bad input (empty, one class, non-finite, labels not 0/1) is a
    one-line ``DataError``.

    Usage::

        T = fit_temperature(pred.loc[pred.split == "val", "logit"], pred.loc[pred.split == "val", "label"])
    """
    z = _finite(val_logits, "fit_temperature", "validation logits")
    y = _labels(val_labels, len(z), "fit_temperature")
    if y.min() == y.max():
        raise DataError(f"fit_temperature: validation labels hold one class only ({int(y[0])}); no temperature is defined")
    lo, hi = bounds
    if not 0 < lo <= 1 <= hi:
        raise ValueError(f"bounds must satisfy 0 < lo <= 1 <= hi, got {bounds}")
    if not z.any():
        return 1.0
    signed = -(2.0 * y - 1.0) * z

    def loss(t: float) -> float:
        return float(np.mean(np.logaddexp(0.0, signed / t)))

    result = minimize_scalar(lambda u: loss(math.exp(u)), bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-10})
    t_opt = min(max(math.exp(float(result.x)), lo), hi)
    # The bounds themselves, exactly: exp(log(lo)) is not always lo. Equal losses resolve to the smaller T.
    return min((loss(t), t) for t in (t_opt, lo, hi))[1]


def brier_score(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean squared difference between ``probs`` (P(excitatory)) and the 0/1 ``labels``.

    Usage::

        brier_score(test["label"], test["probability"])
    """
    p = _finite(probs, "brier_score", "probabilities")
    y = _labels(labels, len(p), "brier_score")
    return float(np.mean((p - y) ** 2))


def _edges(p: np.ndarray, n_bins: int, strategy: str) -> np.ndarray:
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, n_bins + 1)
    if strategy == "quantile":
        return np.concatenate([[0.0], np.unique(np.quantile(p, np.arange(1, n_bins) / n_bins)), [1.0]])
    raise ValueError(f"unknown binning strategy {strategy!r}; choose 'uniform' or 'quantile'")


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 15, strategy: str = "uniform") -> tuple[float, pd.DataFrame]:
    """ECE of P(excitatory): sum over bins of (bin count / n) * |mean predicted probability - fraction positive|.

    Binning is on the predicted probability of the positive class (not on the confidence of the predicted class).
    ``strategy="uniform"``: ``n_bins`` equal-width bins on [0, 1]. ``strategy="quantile"``: equal-mass bins whose
    inner edges are the 1/n_bins, ..., (n_bins-1)/n_bins quantiles of ``probs`` (linear interpolation; repeated
    edges merged, so tied probabilities never straddle two bins and fewer bins can result). Bins are right-closed
    ``(lo, hi]``, the first ``[0, hi]``: the convention of scikit-learn's ``calibration_curve``, whose per-bin
    means these equal.

    Returns the ECE and one row per bin (``BIN_COLUMNS``: bin, lo, hi, count, mean_probability, fraction_positive,
    gap = mean_probability - fraction_positive; NaN for empty bins, which weigh nothing).

    Usage::

        ece, bins = expected_calibration_error(y, p, n_bins=15, strategy="quantile")
    """
    p = _finite(probs, "expected_calibration_error", "probabilities")
    y = _labels(labels, len(p), "expected_calibration_error")
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if ((p < 0) | (p > 1)).any():
        raise DataError("expected_calibration_error: probabilities must lie in [0, 1]")
    edges = _edges(p, int(n_bins), strategy)
    k = len(edges) - 1
    which = np.searchsorted(edges[1:-1], p, side="left")  # bin i holds edges[i] < p <= edges[i + 1]
    count = np.bincount(which, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(which, weights=p, minlength=k) / count
        frac = np.bincount(which, weights=y, minlength=k) / count
    gap = mean_p - frac
    ece = float(np.sum(count[count > 0] * np.abs(gap[count > 0])) / len(p))
    bins = pd.DataFrame({"bin": np.arange(k), "lo": edges[:-1], "hi": edges[1:], "count": count, "mean_probability": mean_p, "fraction_positive": frac, "gap": gap})
    return ece, bins[BIN_COLUMNS]
