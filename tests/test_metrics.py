import math
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from synhpc.errors import DataError
from synhpc.evaluation import neuron_level
from synhpc.metrics import average_precision, binary_metrics, choose_threshold, confusion, roc_auc, sweep_scores


def test_hand_computed_metrics():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    probs = np.array([0.9, 0.6, 0.3, 0.7, 0.2, 0.1, 0.4, 0.05])
    m = binary_metrics(labels, probs, 0.5)
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (2, 1, 4, 1)
    assert m["accuracy"] == 6 / 8
    assert m["balanced_accuracy"] == (2 / 3 + 4 / 5) / 2
    assert math.isclose(m["mcc"], (2 * 4 - 1 * 1) / math.sqrt(3 * 3 * 5 * 5))
    # 15 positive/negative pairs; wrong: 0.6 < 0.7, 0.3 < 0.7, 0.3 < 0.4.
    assert math.isclose(m["roc_auc"], 12 / 15)
    assert math.isclose(m["precision_e"], 2 / 3) and math.isclose(m["recall_e"], 2 / 3) and math.isclose(m["f1_e"], 2 / 3)
    assert math.isclose(m["precision_i"], 4 / 5) and math.isclose(m["recall_i"], 4 / 5) and math.isclose(m["f1_i"], 4 / 5)
    # Ranked: 0.9 P, 0.7 N, 0.6 P, 0.4 N, 0.3 P, ... -> precision at each positive: 1, 2/3, 3/5.
    assert math.isclose(m["pr_auc"], (1 + 2 / 3 + 3 / 5) / 3)


def test_auc_ties_and_single_class():
    assert roc_auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5
    assert math.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_threshold_chosen_on_given_predictions():
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([0.1, 0.2, 0.35, 0.3, 0.8, 0.9])
    tau, sweep = choose_threshold(labels, probs)
    # tau between 0.35 and 0.8 misses the 0.3 positive: BA 5/6; tau in (0.2, 0.3] misses the 0.35 negative: BA 5/6;
    # the tie goes to the candidate nearest 0.5.
    assert math.isclose(tau, (0.35 + 0.8) / 2)
    assert math.isclose(sweep["balanced_accuracy"].max(), (1 + 2 / 3) / 2)


def test_neuron_level_means_logits_per_neuron():
    pred = pd.DataFrame({"split": ["test"] * 4, "pre_root_id": [1, 1, 2, 2], "label": [1, 1, 0, 0], "logit": [2.0, -1.0, -3.0, 1.0]})
    n = neuron_level(pred)
    assert n["logit"].tolist() == [0.5, -1.0] and n["n_synapses"].tolist() == [2, 2]


# --- The implementation this module replaced, kept verbatim as the reference for exact behaviour. -------------------


def _old_confusion(labels, pred):
    labels, pred = np.asarray(labels).astype(bool), np.asarray(pred).astype(bool)
    return {"tp": int((labels & pred).sum()), "fn": int((labels & ~pred).sum()), "tn": int((~labels & ~pred).sum()), "fp": int((~labels & pred).sum())}


def _old_rates(c):
    tpr = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else math.nan
    tnr = c["tn"] / (c["tn"] + c["fp"]) if c["tn"] + c["fp"] else math.nan
    return tpr, tnr


def _old_mcc(c):
    tp, tn, fp, fn = (float(c[k]) for k in ("tp", "tn", "fp", "fn"))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def _old_prf(tp, fp, fn):
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return precision, recall, f1


def _old_binary_metrics(labels, probs, tau):
    labels = np.asarray(labels).astype(int)
    pred = np.asarray(probs) >= tau
    c = _old_confusion(labels, pred)
    tpr, tnr = _old_rates(c)
    p_e, r_e, f_e = _old_prf(c["tp"], c["fp"], c["fn"])
    p_i, r_i, f_i = _old_prf(c["tn"], c["fn"], c["fp"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of two NaNs on empty input
        ba = float(np.nanmean([tpr, tnr]))
    return {
        "n": int(len(labels)),
        "accuracy": float((pred == labels.astype(bool)).mean()) if len(labels) else math.nan,
        "balanced_accuracy": ba,
        "roc_auc": roc_auc(labels, probs),
        "pr_auc": average_precision(labels, probs),
        "mcc": _old_mcc(c),
        "precision_e": p_e, "recall_e": r_e, "f1_e": f_e,
        "precision_i": p_i, "recall_i": r_i, "f1_i": f_i,
        **c,
    }  # fmt: skip


def _old_threshold_score(labels, probs, tau, metric):
    c = _old_confusion(labels, np.asarray(probs) >= tau)
    tpr, tnr = _old_rates(c)
    if metric == "balanced_accuracy":
        return float(np.nanmean([tpr, tnr]))
    if metric == "youden":
        return float(tpr + tnr - 1)
    if metric == "f1":
        denom = 2 * c["tp"] + c["fp"] + c["fn"]
        return 2 * c["tp"] / denom if denom else 0.0
    raise ValueError(metric)


def _old_choose_threshold(labels, probs, metric="balanced_accuracy"):
    probs = np.asarray(probs, dtype=np.float64)
    unique = np.unique(probs)
    candidates = np.concatenate([[0.0], (unique[:-1] + unique[1:]) / 2, [np.nextafter(unique[-1], np.inf)]]) if len(unique) else np.array([0.5])
    scores = np.array([_old_threshold_score(labels, probs, t, metric) for t in candidates])
    best = np.flatnonzero(scores == scores.max())
    tau = float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])
    return tau, pd.DataFrame({"tau": candidates, metric: scores})


def _random_cases(n_cases=150, seed=0):
    """Labels and scores with heavy ties, exact 0/1, adjacent floats, constant scores and single-class draws."""
    rng = np.random.default_rng(seed)
    for i in range(n_cases):
        n = int(rng.integers(1, 120))
        labels = rng.integers(0, 2, n) if i % 7 else np.full(n, i % 2)
        p = 1 / (1 + np.exp(-(rng.normal(0, 1.5, n) + 1.5 * labels)))
        kind = i % 5
        if kind == 1:
            p = np.round(p, 1)  # many ties
        elif kind == 2:
            p = np.clip(np.round(p * 4) / 4, 0, 1)  # ties at 0, 0.25, 0.5, 0.75, 1
        elif kind == 3:
            p = np.nextafter(0.5, rng.choice([-np.inf, np.inf], n))  # two adjacent floats: a midpoint rounds onto one
        elif kind == 4 and i % 3 == 0:
            p = np.full(n, 0.3)
        yield labels, p


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("metric", ["balanced_accuracy", "youden", "f1"])
def test_sorted_sweep_equals_the_quadratic_one_exactly(metric):
    compared = 0
    for labels, probs in _random_cases():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                expected = _old_choose_threshold(labels, probs, metric)
        except ValueError:  # the old code crashed where the metric is undefined everywhere
            with pytest.raises(DataError):
                choose_threshold(labels, probs, metric)
            continue
        tau, sweep = choose_threshold(labels, probs, metric)
        assert tau == expected[0]
        pd.testing.assert_frame_equal(sweep, expected[1], check_exact=True)
        compared += 1
    assert compared > 120


def test_binary_metrics_equal_the_previous_implementation_exactly():
    rng = np.random.default_rng(1)
    for labels, probs in _random_cases(seed=2):
        for tau in (0.5, float(rng.uniform()), 0.0, 1.0):
            new, old = binary_metrics(labels, probs, tau), _old_binary_metrics(labels, probs, tau)
            assert list(new) == list(old)
            assert all(_same(new[k], old[k]) and type(new[k]) is type(old[k]) for k in old), (new, old)


def test_binary_metrics_empty_input_conventions():
    m = binary_metrics(np.array([], dtype=int), np.array([]), 0.5)
    assert m["n"] == 0 and m["mcc"] == 0.0 and (m["tp"], m["fn"], m["tn"], m["fp"]) == (0, 0, 0, 0)
    assert all(math.isnan(m[k]) for k in ("accuracy", "balanced_accuracy", "roc_auc", "pr_auc", "precision_e", "recall_i"))
    assert m["f1_e"] == 0.0 and m["f1_i"] == 0.0


def test_choose_threshold_undefined_or_bad_input_is_a_one_line_error():
    with pytest.raises(DataError, match="undefined"):
        choose_threshold(np.array([], dtype=int), np.array([]))
    with pytest.raises(DataError, match="undefined"):
        choose_threshold(np.ones(4, dtype=int), np.array([0.1, 0.2, 0.3, 0.4]), "youden")
    with pytest.raises(DataError, match="NaN"):
        choose_threshold(np.array([0, 1]), np.array([0.2, np.nan]))
    with pytest.raises(ValueError, match="unknown threshold metric"):
        choose_threshold(np.array([0, 1]), np.array([0.2, 0.7]), "auc")


def test_choose_threshold_tie_rule_prefers_nearest_half_then_lower():
    # Perfectly separable at any tau in (0.2, 0.8]: candidates 0.5 (midpoint) wins; with scores 0.3/0.7 too.
    tau, _ = choose_threshold(np.array([0, 1]), np.array([0.2, 0.8]))
    assert tau == 0.5
    # All scores equal: candidates 0 and nextafter(0.3); both give BA 0.5, the one nearer 0.5 is nextafter(0.3).
    tau, sweep = choose_threshold(np.array([0, 1, 1]), np.full(3, 0.3))
    assert sweep["tau"].tolist() == [0.0, np.nextafter(0.3, 1)] and tau == np.nextafter(0.3, 1)
    # 0.375 and 0.625 both give BA 3/4 and are equally close to 0.5: the lower one.
    tau, sweep = choose_threshold(np.array([0, 0, 1, 1]), np.array([0.25, 0.5, 0.5, 0.75]))
    assert sweep["balanced_accuracy"].tolist() == [0.5, 0.75, 0.75, 0.5] and tau == 0.375


# --- Parity with scikit-learn for what is computed here. ------------------------------------------------------------


def _silent(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_parity_with_scikit_learn_on_random_data_with_ties_and_single_class():
    single_class = 0
    for labels, probs in _random_cases(n_cases=90, seed=3):
        two_classes = labels.min() != labels.max()
        single_class += not two_classes
        # ROC-AUC: the same definition; scikit-learn's curve integration differs by a few ulps at most.
        if two_classes:
            assert roc_auc(labels, probs) == pytest.approx(skm.roc_auc_score(labels, probs), rel=0, abs=1e-12)
        else:
            assert math.isnan(roc_auc(labels, probs))
        if labels.any():
            assert average_precision(labels, probs) == pytest.approx(skm.average_precision_score(labels, probs), rel=0, abs=1e-12)
        else:
            assert math.isnan(average_precision(labels, probs))
        for tau in (0.5, 0.31):
            m, pred = binary_metrics(labels, probs, tau), (probs >= tau).astype(int)
            assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred), abs=1e-15)
            # scikit-learn averages the recalls of the classes present in the labels, as binary_metrics does.
            assert m["balanced_accuracy"] == pytest.approx(_silent(skm.balanced_accuracy_score, labels, pred), abs=1e-15)
            p, r, f, _ = _silent(skm.precision_recall_fscore_support, labels, pred, labels=[1, 0], zero_division=np.nan)
            for i, suffix in enumerate(("e", "i")):
                assert _same(m[f"precision_{suffix}"], p[i]) or m[f"precision_{suffix}"] == pytest.approx(p[i], abs=1e-15)
                assert _same(m[f"recall_{suffix}"], r[i]) or m[f"recall_{suffix}"] == pytest.approx(r[i], abs=1e-15)
                # F1 with no true positive is 0 here; scikit-learn says NaN only when the class is absent and never
                # predicted (0/0), 0 otherwise.
                expected_f = 0.0 if math.isnan(f[i]) else f[i]
                assert m[f"f1_{suffix}"] == pytest.approx(expected_f, abs=1e-15)
    assert single_class > 5


def test_sweep_parity_with_scikit_learn_roc_curve():
    for i, (labels, probs) in enumerate(_random_cases(n_cases=60, seed=4)):
        if labels.min() == labels.max():
            continue
        fpr, tpr, thresholds = skm.roc_curve(labels, probs, drop_intermediate=False)
        # roc_curve's thresholds are the distinct scores (plus +inf): the rule there is also score >= threshold.
        youden = sweep_scores(labels, probs, thresholds, "youden")
        np.testing.assert_allclose(youden, tpr - fpr, rtol=0, atol=1e-12)
        ba = sweep_scores(labels, probs, thresholds, "balanced_accuracy")
        np.testing.assert_allclose(ba, (tpr + 1 - fpr) / 2, rtol=0, atol=1e-12)
        if i % 4:
            continue  # F1 through scikit-learn costs one call per threshold
        f1 = sweep_scores(labels, probs, thresholds[1:], "f1")
        expected = [skm.f1_score(labels, (probs >= t).astype(int), zero_division=0.0) for t in thresholds[1:]]
        np.testing.assert_allclose(f1, expected, rtol=0, atol=1e-12)


def test_confusion_matches_scikit_learn_and_handles_one_class():
    assert confusion(np.array([1, 1]), np.array([True, False])) == {"tp": 1, "fn": 1, "tn": 0, "fp": 0}
    assert confusion(np.array([0, 0, 0]), np.array([0, 1, 1])) == {"tp": 0, "fn": 0, "tn": 1, "fp": 2}
    assert binary_metrics(np.array([1, 1, 1]), np.array([0.9, 0.8, 0.7]), 0.5)["mcc"] == 0.0


def test_bench_metrics_writes_csv_and_json(tmp_path):
    import json

    from synhpc.bench_metrics import bench_metrics

    frame = bench_metrics(tmp_path, sizes=(3000,), n_boot=20)
    assert frame["size"].tolist() == [3000] and frame["candidates"].iloc[0] == 3001
    for col in ("choose_threshold_s", "binary_metrics_s", "ci_counts_s", "ci_roc_auc_s", "ci_neuron_s", "fit_temperature_s", "ece_s"):
        assert frame[col].iloc[0] >= 0
    assert frame["roc_auc_lo"].iloc[0] <= frame["roc_auc"].iloc[0] <= frame["roc_auc_hi"].iloc[0]
    assert pd.read_csv(tmp_path / "bench_metrics.csv").shape == frame.shape
    assert len(json.loads((tmp_path / "bench_metrics.json").read_text())["rows"]) == 1
