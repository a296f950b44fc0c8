import math

import numpy as np
import pandas as pd

from synhpc.evaluation import neuron_level
from synhpc.metrics import binary_metrics, choose_threshold, roc_auc


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
